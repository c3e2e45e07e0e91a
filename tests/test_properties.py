"""Property-based tests (hypothesis) for spec parsing and cell hashing."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.cells import canonical_hash, count_cells, expand, group_cells
from orchestrator.spec import TOP_LEVEL_KEYS, Spec, SpecError, parse_spec

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True),
                    st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
keys = st.sampled_from(list(TOP_LEVEL_KEYS) + ["bogus"])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(values, st.dictionaries(keys, values, max_size=8)))
def test_any_data_is_a_spec_or_a_spec_error(data):
    try:
        spec = parse_spec(data, source="fuzz.yaml")
    except SpecError as exc:
        assert exc.problems and all(p.startswith("fuzz.yaml") for p in exc.problems)
    else:
        assert isinstance(spec, Spec)


valid_specs = st.fixed_dictionaries({
    "name": st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True),
    "models": st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True).map(
        lambda names: [{"name": n, "path": f"/models/{n}"} for n in names]),
    "methods": st.lists(st.sampled_from([
        {"name": "baseline"}, {"name": "rtn"}, {"name": "rtn", "sym": [True, False]},
        {"name": "rtn", "sym": False, "zero_point": ["int", "float"]}]), min_size=1, max_size=3),
    "bits": st.lists(st.integers(2, 8), min_size=1, max_size=4, unique=True),
    "group_sizes": st.lists(st.sampled_from([-1, 16, 32, 64, 128]), min_size=1, max_size=4, unique=True),
    "datasets": st.lists(st.sampled_from(["x", "y"]), min_size=1, max_size=2, unique=True).map(
        lambda names: [{"name": n, "task": "perplexity", "path": f"/d/{n}.txt", "limit": 2} for n in names]),
    "seed": st.integers(0, 3),
})


def shuffled(data, rng: random.Random):
    if isinstance(data, dict):
        items = list(data.items())
        rng.shuffle(items)
        return {k: shuffled(v, rng) for k, v in items}
    if isinstance(data, list):
        return [shuffled(v, rng) for v in data]
    return data


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(valid_specs, st.integers(0, 2**32))
def test_cell_ids_unique_stable_and_order_free(raw, salt):
    spec = parse_spec(raw)
    cells = expand(spec)
    ids = [c.cell_id for c in cells]
    assert len(set(ids)) == len(ids)
    assert len(cells) <= count_cells(spec)
    again = [c.cell_id for c in expand(parse_spec(shuffled(raw, random.Random(salt))))]
    assert sorted(again) == sorted(ids)
    for cell in cells[:20]:  # the assembled hash is the plain canonical-JSON hash
        assert cell.cell_id == canonical_hash(cell.identity())[:24]
        assert cell.group_id == canonical_hash({**cell.quant_identity(), "schema_version": 1})[:24]
    for group in group_cells(cells):
        assert {c.group_id for c in group.cells} == {group.group_id}
        assert len({c.dataset.name for c in group.cells}) == len(group.cells)

"""Read evaluation data from a builtin source, a local file or a hub id.

Local files: ``.txt`` (the whole file is one document), ``.jsonl`` / ``.json`` (records),
``.parquet``. Hub ids: ``owner/name`` or ``owner/name:config``, read with the ``datasets``
library (honours ``HF_DATASETS_OFFLINE``). Builtin sources ship with qsweep: the project-written
fixtures (``builtin:boolq``, ``builtin:gsm8k``, ``builtin:msmarco``, ``builtin:wikitext``) and
``builtin:pydoc-topics``, the CPython documentation topics every Python installation carries.
Every failure to find or read data raises ``DataError`` naming the path or id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.errors import DataError
from tasks.locations import is_local

FIXTURES = Path(__file__).parent / "fixtures"


def local_file(path: str) -> Path | None:
    """The local file behind ``path`` (fixtures included), or None for a hub id."""
    if path.startswith("builtin:"):
        name = path.removeprefix("builtin:")
        fixture = FIXTURES / f"{name}.jsonl"
        if fixture.is_file():
            return fixture
        if name == "pydoc-topics":
            return None
        raise DataError(f"unknown builtin dataset '{path}'; known: builtin:pydoc-topics, "
                        + ", ".join(f"builtin:{p.stem}" for p in sorted(FIXTURES.glob("*.jsonl"))))
    local = Path(path).expanduser()
    if local.exists():
        return local
    if is_local(path):
        raise DataError(f"dataset file {path} does not exist")
    return None


def load_records(path: str, split: str) -> list[dict[str, Any]]:
    """The dataset's records, in order."""
    local = local_file(path)
    if local is None:
        return _read_hub(path, split)
    if local.suffix == ".jsonl":
        return [json.loads(line) for line in local.read_text().splitlines() if line.strip()]
    if local.suffix == ".json":
        records = json.loads(local.read_text())
        if not isinstance(records, list):
            raise DataError(f"{local}: expected a JSON list of records")
        return records
    if local.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(local).to_pylist()
    raise DataError(f"{local}: unsupported file type '{local.suffix}' for records; use .jsonl, .json or .parquet")


def load_texts(path: str, split: str = "test", text_field: str = "text") -> list[str]:
    """Documents of a text dataset, in order."""
    if path == "builtin:pydoc-topics":
        # The CPython documentation topics that pydoc ships (Python Software Foundation License),
        # in name order; split "test" is every other topic from the first, any other split
        # ("train": calibration) the rest, so calibrating on them never sees evaluated text.
        from pydoc_data.topics import topics

        keys = sorted(topics)
        return [topics[key] for i, key in enumerate(keys) if (i % 2 == 0) == (split == "test")]
    local = local_file(path)
    if local is not None and local.suffix == ".txt":
        return [local.read_text()]
    records = load_records(path, split)
    if not records or text_field not in records[0]:
        fields = sorted(records[0]) if records else []
        raise DataError(f"dataset {path}: no '{text_field}' field (fields: {fields}); set text_field")
    return [str(r[text_field]) for r in records]


def _read_hub(hub_id: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"dataset '{hub_id}' is not a local file and the `datasets` package is "
                        "not installed to read it from the hub") from None
    name, _, config = hub_id.partition(":")
    try:
        data = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # noqa: BLE001 - any failure to find data is a data error
        raise DataError(f"dataset '{hub_id}' (split {split}) could not be loaded: "
                        f"{type(exc).__name__}: {str(exc)[:300]}") from None
    return data.to_list()


def prompt_texts(path: str, split: str = "test", text_field: str | None = None) -> list[str]:
    """Text drawn from any dataset, for profiling prompts: the text field when there is one,
    else every string value of a record (question, passage, answer, passages' texts) joined by
    newlines, in record order."""
    if path == "builtin:pydoc-topics" or (local_file(path) or Path()).suffix == ".txt":
        return load_texts(path, split, text_field or "text")
    records = load_records(path, split)
    if text_field and records and text_field in records[0]:
        return [str(r[text_field]) for r in records]
    return ["\n".join(_strings(r)) for r in records]


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []

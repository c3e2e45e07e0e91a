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
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.errors import AccessError, DataError, access_advice, hub_refusal
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


def load_records(path: str, split: str, fields: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The dataset's records, in order; ``fields`` (the task's name -> the dataset's) renames."""
    records = _records(path, split)
    return [rename(r, fields) for r in records] if fields else records


def rename(record: dict[str, Any], fields: dict[str, str] | None) -> dict[str, Any]:
    """``record`` with each of the dataset's field names in ``fields`` also under the task's."""
    if not fields:
        return record
    return record | {ours: record[theirs] for ours, theirs in fields.items() if theirs in record}


def record_fields(path: str, split: str) -> list[str] | None:
    """The top-level field names of the dataset's records (None for plain text: a ``.txt`` file
    or ``builtin:pydoc-topics``), read without building the records: a file's first record or
    schema, a hub dataset's columns."""
    if path == "builtin:pydoc-topics":
        return None
    local = local_file(path)
    if local is None:
        return list(_hub_dataset(path, split).column_names)
    if local.suffix == ".txt":
        return None
    if local.suffix == ".jsonl":
        with open(local) as f:
            first = next((line for line in f if line.strip()), None)
        return sorted(json.loads(first)) if first else []
    if local.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(local).names)
    records = _records(path, split)
    return sorted(records[0]) if records else []


def check_schema(dataset: Any) -> str:
    """The name of the schema of ``dataset``'s task that its records fit, read from the data's
    fields alone (the worker calls it before loading any model; ``qsweep plan`` for the files it
    can see); DataError naming the fields found and the setting that maps them."""
    from tasks.evaluate.registry import get_task, match_schema

    settings = dataset.settings
    where = f"dataset {dataset.name} ({dataset.path}, split {settings.get('split')})"
    found = record_fields(dataset.path, settings.get("split", "test"))
    if found is None:  # plain text
        if "text_field" in get_task(dataset.task).config.model_fields:
            return "plain text"
        raise DataError(f"{where}: plain text, but task '{dataset.task}' reads records; give a "
                        ".jsonl, .json or .parquet file or a hub dataset")
    return match_schema(dataset.task, settings, found, where).name


def _records(path: str, split: str) -> list[dict[str, Any]]:
    local = local_file(path)
    if local is None:
        return _hub_dataset(path, split).to_list()
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


def _hub_dataset(hub_id: str, split: str) -> Any:
    """The split of a hub dataset (``owner/name`` or ``owner/name:config``) as ``datasets``
    loads it: downloaded once into its cache (memory-mapped, not held in Python objects), from
    there alone with ``HF_DATASETS_OFFLINE=1``."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"dataset '{hub_id}' is not a local file and the `datasets` package is "
                        "not installed to read it from the hub") from None
    name, _, config = hub_id.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # noqa: BLE001 - any failure to find data is a data error
        raise hub_data_error(hub_id, split, exc) from None


def hub_data_error(hub_id: str, split: str | None, exc: BaseException) -> Exception:
    """The error to raise for a hub dataset that did not load: a refusal of access says what to
    do (AccessError); anything else is a DataError naming the dataset and split."""
    refusal = hub_refusal(exc)
    if refusal:
        return AccessError(access_advice("dataset", hub_id, refusal))
    offline = (" (HF_DATASETS_OFFLINE=1: only what `qsweep fetch` put in the cache loads)"
               if os.environ.get("HF_DATASETS_OFFLINE") == "1" else "")
    return DataError(f"dataset '{hub_id}'" + (f" (split {split})" if split else "") +
                     f" could not be loaded{offline}: {type(exc).__name__}: {str(exc)[:300]}")


def prompt_texts(path: str, split: str = "test", text_field: str | None = None) -> list[str]:
    """Text drawn from any dataset, for profiling prompts: the text field when there is one,
    else every string value of a record (question, passage, answer, passages' texts) joined by
    newlines, in record order."""
    return list(Reading(path, split, text_field))


@dataclass
class Reading:
    """Texts of a dataset read lazily, one record at a time (``records`` counts those read):
    a calibration set takes only the records its windows need, not a split whole."""

    path: str
    split: str
    text_field: str | None
    records: int = 0
    streamed: bool = False  # read over the network as it went (no copy of the split in the cache)

    def __iter__(self) -> Iterator[str]:
        if self.path == "builtin:pydoc-topics" or (local_file(self.path) or Path()).suffix == ".txt":
            for text in load_texts(self.path, self.split, self.text_field or "text"):
                self.records += 1
                yield text
            return
        for record in self._rows():
            self.records += 1
            value = record.get(self.text_field) if self.text_field else None
            yield str(value) if value is not None else "\n".join(_strings(record))

    def _rows(self) -> Iterator[dict[str, Any]]:
        local = local_file(self.path)
        if local is not None and local.suffix == ".jsonl":  # line by line
            with open(local) as f:
                yield from (json.loads(line) for line in f if line.strip())
            return
        if local is not None:
            yield from _records(self.path, self.split)
            return
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        if offline:  # what `qsweep fetch` prepared: memory-mapped, read row by row
            yield from _hub_dataset(self.path, self.split)
            return
        import datasets

        name, _, config = self.path.partition(":")
        try:
            rows = iter(datasets.load_dataset(name, config or None, split=self.split, streaming=True))
            self.streamed = True
            yield from rows
        except Exception as exc:  # noqa: BLE001 - any failure to find data is a data error
            raise hub_data_error(self.path, self.split, exc) from None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []

"""Read evaluation texts from a builtin source, a local file or a hub id.

Local files: ``.txt`` (the whole file is one document), ``.jsonl`` / ``.json`` (records with a
text field), ``.parquet`` (a text column). Hub ids: ``owner/name`` or ``owner/name:config``,
read with the ``datasets`` library (honours ``HF_DATASETS_OFFLINE``). Builtin sources are
written from text every Python installation carries, so the demo runs on any machine.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.errors import DataError


def builtin_texts(name: str) -> list[str]:
    if name == "pydoc-topics":
        # The CPython documentation topics that pydoc ships (Python Software Foundation License).
        from pydoc_data.topics import topics

        return [topics[key] for key in sorted(topics)]
    raise DataError(f"unknown builtin dataset 'builtin:{name}'; known: builtin:pydoc-topics")


def load_texts(path: str, split: str = "test", text_field: str = "text") -> list[str]:
    """Documents of a dataset, in order; raises DataError naming the path when it cannot."""
    if path.startswith("builtin:"):
        return builtin_texts(path.removeprefix("builtin:"))
    local = Path(path).expanduser()
    if local.exists():
        return _read_local(local, text_field)
    if path.startswith((".", "/", "~")) or Path(path).suffix in {".txt", ".jsonl", ".json", ".parquet"}:
        raise DataError(f"dataset file {path} does not exist")
    return _read_hub(path, split, text_field)


def _read_local(path: Path, text_field: str) -> list[str]:
    if path.suffix == ".txt":
        return [path.read_text()]
    if path.suffix in {".jsonl", ".json"}:
        text = path.read_text()
        records = ([json.loads(line) for line in text.splitlines() if line.strip()]
                   if path.suffix == ".jsonl" else json.loads(text))
        if not isinstance(records, list) or not records or text_field not in records[0]:
            raise DataError(f"{path}: expected records with a '{text_field}' field")
        return [str(r[text_field]) for r in records]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise DataError(f"{path}: no column '{text_field}' (columns: {table.column_names})")
        return [str(t) for t in table.column(text_field).to_pylist()]
    raise DataError(f"{path}: unsupported file type '{path.suffix}'; use .txt, .jsonl, .json or .parquet")


def _read_hub(hub_id: str, split: str, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"dataset '{hub_id}' is not a local file and the `datasets` package is "
                        "not installed to read it from the hub") from None
    name, _, config = hub_id.partition(":")
    try:
        data = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # noqa: BLE001 - any failure to find data is a data error
        raise DataError(f"dataset '{hub_id}' (split {split}) could not be loaded: {exc}") from None
    return [str(t) for t in data[text_field]]

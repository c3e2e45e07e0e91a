"""Where a model or a dataset lives, decided in one place; and the facts of the machine a cell
will run on, gathered there.

A name is ``builtin:<x>`` (ships with qsweep), ``known:<x>`` (a catalogued model prepared on
first use), a local path (starts with ``.``, ``/`` or ``~``, or ends in a data-file suffix), or a
hub id (anything else, e.g. ``owner/name`` or ``owner/name:config``). Imports neither torch nor
Ray: the driver calls it, and a Ray task runs ``machine_facts`` on a worker node.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

LOCAL_SUFFIXES = {".txt", ".jsonl", ".json", ".parquet"}
Kind = Literal["builtin", "known", "local", "hub"]


def kind(path: str) -> Kind:
    if path.startswith("builtin:"):
        return "builtin"
    if path.startswith("known:"):
        return "known"
    if path.startswith((".", "/", "~")) or Path(path).suffix in LOCAL_SUFFIXES:
        return "local"
    return "hub"


def is_local(path: str) -> bool:
    return kind(path) == "local"


def machine_facts(paths: list[str]) -> dict[str, Any]:
    """On the machine that calls it: its host name, memory, free scratch disk, and for each
    local path whether it is a directory or a file there."""
    import psutil

    found = {}
    for path in paths:
        local = Path(path).expanduser()
        found[path] = "dir" if local.is_dir() else "file" if local.exists() else None
    scratch = Path(os.environ.get("QSWEEP_SCRATCH") or Path.home())
    while not scratch.exists() and scratch != scratch.parent:
        scratch = scratch.parent
    return {"host": socket.gethostname(), "memory_bytes": psutil.virtual_memory().total,
            "disk_free_bytes": psutil.disk_usage(str(scratch)).free, "paths": found}

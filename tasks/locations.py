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
    """On the machine that calls it: its host name, host memory, the memory and name of the GPU
    it was given (the first of ``CUDA_VISIBLE_DEVICES``, read through NVML; None without one),
    and for each local path whether it is a directory or a file there."""
    import psutil

    gpu_bytes, gpu_name = visible_gpu()
    return {"host": socket.gethostname(), "memory_bytes": psutil.virtual_memory().total,
            "gpu_memory_bytes": gpu_bytes, "gpu_name": gpu_name, "paths": path_kinds(paths)}


def path_kinds(paths: list[str]) -> dict[str, str | None]:
    """Each local path on this machine: 'dir', 'file', or None when it is not there."""
    found = {}
    for path in paths:
        local = Path(path).expanduser()
        found[path] = "dir" if local.is_dir() else "file" if local.exists() else None
    return found


def visible_gpu() -> tuple[int | None, str | None]:
    """(total bytes, name) of the first GPU in ``CUDA_VISIBLE_DEVICES`` per NVML (the driver
    forwards CUDA_DEVICE_ORDER=PCI_BUS_ID, so indices agree with torch's); (None, None) without."""
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        return None, None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            first = visible[0].strip()
            handle = (pynvml.nvmlDeviceGetHandleByUUID(first) if first.startswith(("GPU-", "MIG-"))
                      else pynvml.nvmlDeviceGetHandleByIndex(int(first)))
            name = pynvml.nvmlDeviceGetName(handle)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total), name.decode() if isinstance(name, bytes) else name
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver, no NVML: the worker's own run will tell
        return None, None

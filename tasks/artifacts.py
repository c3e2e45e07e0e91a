"""Opt-in cache of quantized models by quantization-group hash, with a size cap.

```bash
qsweep run sweeps/study.yaml --artifact-cache ~/.cache/qsweep/artifacts --artifact-cache-gb 20
```

A group's id hashes everything its quantization depends on (model, method and parameters, bits,
group size, calibration, seed), so adding a dataset to a finished study finds its quantized
models here instead of quantizing again. An entry is a folder ``<group_id>/`` holding the
quantized module (``model.pt``, torch's pickle: this cache is written and read only by qsweep on
this machine), the method's report and row columns (``report.pt``) and the checkpoint the method
saved, if any (``checkpoint/``), which ``qsweep export`` copies. Entries are written to a
temporary folder and renamed, so a crash leaves no half entry; past the cap the least recently
used entries are removed. The folder is named ``<group_id>-<device type>`` (a model quantized on
a GPU can hold CUDA-only packed modules), and an entry loads onto the reader's device
(``map_location``: ``cuda:1`` reads what ``cuda:0`` wrote). The cache can never fail a group: a
``put`` that cannot finish (no space, an entry another actor published first, a model that does
not pickle) is logged and skipped, and an unreadable entry is a miss.

Environment (set by ``qsweep run --artifact-cache``; forwarded to actors):
``QSWEEP_ARTIFACT_CACHE`` (folder) and ``QSWEEP_ARTIFACT_CACHE_GB`` (cap, default 20).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
DEFAULT_CAP_GB = 20.0


@dataclass
class Artifact:
    model: Any
    report: Any  # QuantReport, model removed; checkpoint_dir points into the cache entry
    columns: dict[str, Any]  # row columns the quantization produced (calibration identity, engine)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class ArtifactCache:
    def __init__(self, root: str | Path, cap_bytes: int):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.cap_bytes = cap_bytes

    @classmethod
    def from_env(cls) -> ArtifactCache | None:
        root = os.environ.get("QSWEEP_ARTIFACT_CACHE")
        if not root:
            return None
        cap = float(os.environ.get("QSWEEP_ARTIFACT_CACHE_GB") or DEFAULT_CAP_GB)
        return cls(root, int(cap * 2**30))

    def entry(self, group_id: str, device: str) -> Path:
        return self.root / f"{group_id}-{torch.device(device).type}"

    def has(self, group_id: str, device: str = "cpu") -> bool:
        return (self.entry(group_id, device) / "report.pt").is_file()

    def get(self, group_id: str, device: str = "cpu") -> Artifact | None:
        if not self.has(group_id, device):
            return None
        entry = self.entry(group_id, device)
        try:
            saved = torch.load(entry / "report.pt", weights_only=False, map_location=device)
            model = torch.load(entry / "model.pt", weights_only=False, map_location=device)
        except Exception as exc:  # noqa: BLE001 - a bad entry is a miss, and is removed
            log.warning("artifact cache: entry %s unreadable (%s); quantizing again", group_id, exc)
            shutil.rmtree(entry, ignore_errors=True)
            return None
        os.utime(entry)  # recently used
        report = saved["report"]
        if (entry / "checkpoint").is_dir():
            report.checkpoint_dir = str(entry / "checkpoint")
        return Artifact(model, report, saved["columns"])

    def put(self, group_id: str, model: Any, report: Any, columns: dict[str, Any],
            device: str = "cpu") -> bool:
        """Store an entry; False (with a warning) when it was not stored: it alone exceeds the
        cap, or writing it failed. Never raises for the cache's own reasons."""
        entry = self.entry(group_id, device)
        if entry.exists():
            return False
        staging = None
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{group_id[:12]}-", dir=self.root))
            return self._stage(staging, entry, model, report, columns)
        except Exception as exc:  # noqa: BLE001 - a cache failure must not fail the group
            log.warning("artifact cache: %s not stored (%s: %s); the group's rows are kept",
                        entry.name, type(exc).__name__, str(exc)[:300])
            return False
        finally:
            if staging is not None and staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _stage(self, staging: Path, entry: Path, model: Any, report: Any, columns: dict[str, Any]) -> bool:
        """Write the entry into ``staging`` and publish it as ``entry`` by rename."""
        torch.save(model, staging / "model.pt")
        checkpoint = report.checkpoint_dir
        if checkpoint and Path(checkpoint).is_dir():
            shutil.copytree(checkpoint, staging / "checkpoint")
        stored = report.__class__(**{**vars(report), "model": None, "checkpoint_dir": None})
        torch.save({"report": stored, "columns": columns}, staging / "report.pt")
        size = _folder_bytes(staging)
        if size > self.cap_bytes:
            log.warning("artifact cache: %s is %.2f GB, over the cap of %.2f GB; not cached",
                        entry.name, size / 2**30, self.cap_bytes / 2**30)
            return False
        staging.rename(entry)  # fails when another actor published this entry first
        self._evict(keep=entry)
        return True

    def _evict(self, keep: Path) -> None:
        entries = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        sizes = {p: _folder_bytes(p) for p in entries}
        total = sum(sizes.values())
        for entry in sorted(entries, key=lambda p: p.stat().st_mtime):
            if total <= self.cap_bytes:
                break
            if entry == keep:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            total -= sizes[entry]
            log.info("artifact cache: evicted %s (%.1f MB) at %s", entry.name, sizes[entry] / 1e6,
                     time.strftime("%H:%M:%S"))

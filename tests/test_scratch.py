"""Checkpoints in flight go to the node's own disk, never the (often network-shared) home."""

from __future__ import annotations

from pathlib import Path

from tasks.worker import scratch_dir


def test_scratch_is_node_local_by_default(monkeypatch, tmp_path):
    for name in ("QSWEEP_SCRATCH", "SLURM_TMPDIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert scratch_dir() == tmp_path / "tmp" / "qsweep-scratch"
    assert not str(scratch_dir()).startswith(str(Path.home() / ".cache"))
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path / "job"))
    assert scratch_dir() == tmp_path / "job" / "qsweep-scratch"
    monkeypatch.setenv("QSWEEP_SCRATCH", str(tmp_path / "mine"))
    assert scratch_dir() == tmp_path / "mine" and scratch_dir().is_dir()

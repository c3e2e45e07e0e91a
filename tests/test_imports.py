"""Layering rules: orchestrator/ and analysis/ import without torch; tasks/ never imports Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_driver_side_imports_no_torch():
    code = """
import sys
import orchestrator.cli, orchestrator.driver, orchestrator.spec, orchestrator.cells
import orchestrator.store, orchestrator.preflight, orchestrator.schema, analysis.views
import analysis.derived, analysis.quality, analysis.recommend, analysis.named
import analysis.plots, analysis.report
from orchestrator.cli import main
assert main(["plan", "sweeps/demo.yaml", "--results", sys.argv[1]]) == 0
heavy = [m for m in ("torch", "transformers", "tasks.worker") if m in sys.modules]
assert not heavy, heavy
"""
    result = subprocess.run([sys.executable, "-c", code, str(ROOT / ".no-results")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_tasks_never_import_ray():
    offenders = [str(p) for p in (ROOT / "tasks").rglob("*.py")
                 if "import ray" in p.read_text() or "from ray" in p.read_text()]
    assert offenders == []

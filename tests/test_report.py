"""``qsweep report`` on a synthetic store: the plots, the page, and the page in a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from test_analysis import make_store

from orchestrator.cli import main

FIGURES = ("quality_vs_bits.png", "recovery_heatmap.png", "pareto.png", "latency_memory.png", "status.png")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    assert main(["report", "--results", make_store(root / "results"), "--out", str(root / "out")]) == 0
    return root / "out"


def test_report_writes_plots_and_one_self_contained_page(report):
    for name in FIGURES:
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = (report / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == len(FIGURES)
    assert not re.search(r"(src|href)=['\"](?!data:)", page)  # nothing outside the page
    assert "Table 1" in page and "rtn(sym:true) w4 g64" in page
    assert "beats baseline beyond its uncertainty" in page and "larger than baseline" in page
    assert "out of memory" in page and "dequantized" in page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed "
                    "(apt-get install -y chromium); the report's browser check needs it")
def test_report_renders_in_headless_chromium(report, tmp_path):
    from matplotlib.image import imread

    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    url = (report / "report.html").as_uri()
    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=60,
                         check=False).stdout
    loaded = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert loaded, "the page's image check did not run"
    assert loaded.group(1) == loaded.group(2) == str(len(FIGURES))
    shot = tmp_path / "shot.png"
    subprocess.run([*browser, "--window-size=1280,1600", f"--screenshot={shot}", url],
                   capture_output=True, timeout=60, check=True)
    pixels = imread(shot)
    assert pixels.shape[0] >= 1000 and pixels.std() > 0.05  # not blank

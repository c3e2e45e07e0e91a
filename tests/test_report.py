"""``qsweep report`` on a synthetic store: the plots, the page, and the page in a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

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


@pytest.fixture(scope="module")
def large_report(tmp_path_factory):
    """A store of 10,000 synthetic ok cells (bench/analysis_1m.py's generator): 10 models x 5
    datasets, 200 configs each."""
    import importlib.util

    import pyarrow.parquet as pq

    # bench/ is not a package: load the generator from its file
    spec = importlib.util.spec_from_file_location(
        "analysis_bench", Path(__file__).resolve().parent.parent / "bench" / "analysis_1m.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    synthetic = bench.synthetic

    root = tmp_path_factory.mktemp("large")
    parts = root / "results" / "bench" / "compacted"
    parts.mkdir(parents=True)
    table = synthetic(10_000, models=10, datasets=5)
    assert table.num_rows == 10_000
    pq.write_table(table, parts / "part-0000.parquet")
    assert main(["report", "--results", str(root / "results"), "--out", str(root / "out")]) == 0
    return root / "out"


def test_report_of_ten_thousand_cells_stays_readable(large_report):
    from matplotlib.image import imread

    from analysis.plots import MAX_PANELS, TOP_K
    from analysis.report import MAX_TABLE_ROWS

    page = (large_report / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == len(FIGURES)
    # facets by model and dataset, capped, and the page says what it leaves out
    assert f"Showing the first {MAX_PANELS} of 50 (model, dataset) panels" in page
    assert f"Each panel draws its {TOP_K} best methods as lines" in page
    assert f"At most {TOP_K} front points per panel are named" in page
    assert f"Each model shows its baseline and its {TOP_K} fastest configs" in page
    assert "10000 cells (ok: 10000" in page
    assert page.count("<tr>") <= 4 * (MAX_TABLE_ROWS + 1)  # tables capped too
    for name in FIGURES:  # no figure grows with the store: a few thousand pixels at most
        height, width = imread(large_report / name).shape[:2]
        assert height <= 4000 and width <= 1500, (name, height, width)
    assert len(page) < 8_000_000


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed "
                    "(apt-get install -y chromium); the report's browser check needs it")
def test_report_of_ten_thousand_cells_renders_in_headless_chromium_under_5_s(large_report, tmp_path):
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*browser, "--dump-dom", (large_report / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=60, check=False).stdout
    loaded = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert loaded and loaded.group(1) == loaded.group(2) == str(len(FIGURES))
    load_ms = int(re.search(r'data-load-ms="(\d+)"', dom).group(1))  # navigation start to load
    assert load_ms < 5000, load_ms

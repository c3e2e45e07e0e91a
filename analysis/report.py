"""``qsweep report``: PNG plots and one self-contained HTML page (images embedded as data URIs).

Sections: Table 1, quality vs effective bits per weight, recovery heatmaps (group size x bits),
layer sensitivity heatmaps (when the store has a sensitivity study), Pareto fronts, latency and memory per config, anomalies (flagged, never shown as wins), failed
and skipped cells. A small inline script checks that every image decoded and says so at the
top of the page (``data-images`` on ``<body>``: "loaded/total"; ``data-load-ms``: how long the
page took to load).

A large store stays readable: figures facet by model and dataset with at most
``plots.MAX_PANELS`` panels and ``plots.TOP_K`` series per panel, tables show at most
``MAX_TABLE_ROWS`` rows, and each says what it leaves out and which query gives the rest.
"""

from __future__ import annotations

import base64
import html
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from analysis import plots
from analysis.views import connect, dicts

CELL_COLUMNS = ("cell_id", "model", "dtype", "method", "method_params", "bits", "group_size", "dataset",
                "status", "error_class", "error_stage", "error_message", "primary_metric",
                "primary_value", "weight_bytes", "bits_per_weight", "kernel", "tpot_p50_ms",
                "peak_rss_bytes", "cuda_peak_reserved_bytes", "nvml_peak_process_bytes")

MAX_TABLE_ROWS = 100

CHECK_IMAGES = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.images = loaded + "/" + images.length;
  document.body.dataset.loadMs = Math.round(performance.now());  // navigation start to load
  if (loaded < images.length) {
    const note = document.createElement("p");
    note.className = "warn";
    note.textContent = (images.length - loaded) + " of " + images.length + " figures failed to load";
    document.body.prepend(note);
  }
});
</script>"""

STYLE = """<style>
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; color: #222; }
table { border-collapse: collapse; font-size: 12px; margin: .5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; }
th { background: #f2f2f2; }
img { max-width: 100%; border: 1px solid #eee; }
.warn { color: #a00; font-weight: bold; }
.note { color: #555; font-size: 13px; }
</style>"""


def _rows(con, sql: str) -> list[dict[str, Any]]:
    return dicts(con.execute(sql))


def write_report(results: str, out: str | Path) -> Path:
    """Write the plots and ``report.html`` under ``out``; returns the page's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    con = connect(results)
    cells = _rows(con, f"select {', '.join(CELL_COLUMNS)} from cells order by model, dataset, method, bits, group_size")
    deltas = _rows(con, "select * from baseline_deltas where is_primary")
    anomalies = _rows(con, "select model, dataset, metric, config, baseline_value, value, p_value, "
                      "weight_bytes, baseline_weight_bytes, anomaly from baseline_deltas "
                      "where anomaly is not null order by model, dataset, metric")
    front = _rows(con, "select * from pareto")
    table1 = _rows(con, "select * from table1")
    failures = _rows(con, "select status, error_class, error_stage, count(*) as cells, "
                     "any_value(method || coalesce(' w' || bits, '') || coalesce(' g' || group_size, '') "
                     "|| ' / ' || dataset) as example, any_value(error_message) as message "
                     "from cells where status <> 'ok' group by all order by cells desc")
    flagged = {r["cell_id"] for r in deltas if r["anomaly"]}
    sensitivity = _rows(con, "select * from sensitivity")

    figures = [
        ("Quality vs effective bits per weight", "quality_vs_bits.png",
         plots.quality_vs_bits(cells, flagged, out / "quality_vs_bits.png"),
         ("Primary metric of each cell against its effective bits per weight, one line per method "
         "and parameters; the dashed line is the unquantized baseline.")),
        ("Recovery by group size and bits", "recovery_heatmap.png",
         plots.recovery_heatmap(deltas, out / "recovery_heatmap.png"),
         ("Recovery % of the baseline (higher is better for every metric: quantized/baseline, or "
         "baseline/quantized for perplexity), the best over a method's parameters.")),
        ("Pareto fronts", "pareto.png", plots.pareto_fronts(cells, front, flagged, out / "pareto.png"),
         "Cells no other cell beats on quality, weight size and per-token latency at once."),
        ("Latency and memory per config", "latency_memory.png",
         plots.latency_memory(cells, out / "latency_memory.png"),
         ("Hatched bars ran with dequantized weights (fake-quant): their latency is that of dense "
         "matmuls, not a packed low-bit kernel, so no speed-up is claimed; their size is the "
         "packed-format arithmetic.")),
        ("Cells by status", "status.png", plots.status_summary(cells, out / "status.png"),
         "Every cell in the store by method and outcome."),
    ]
    if sensitivity:  # a sensitivity study in the store (orchestrator.sensitivity)
        figures.insert(2, ("Layer sensitivity", "sensitivity.png",
                           plots.sensitivity_heatmap(sensitivity, out / "sensitivity.png"),
                           ("KL divergence from the baseline when only one unit (a block, a layer "
                            "type or a layer) is quantized at each option and the rest is kept in the "
                            "model's dtype; darker is more sensitive. `qsweep allocate` turns it into "
                            "a mixed-precision spec.")))
    counts = {s: sum(1 for c in cells if c["status"] == s) for s in ("ok", "failed", "timeout", "skipped")}
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>qsweep report</title>", STYLE, "</head><body>",
        "<h1>qsweep report</h1>",
        (f"<p class='note'>Store: {html.escape(str(results))}; {len(cells)} cells "
        f"({', '.join(f'{k}: {v}' for k, v in counts.items())}); written "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC.</p>"),
        "<h2>Table 1: baseline vs best quantized</h2>",
        ("<p class='note'>Best = best primary score among quantized cells with no anomaly; memory "
        "change = weight bytes vs the baseline's.</p>"),
        _table(table1, "table1"),
        "<h2>Anomalies</h2>",
        ("<p class='note'>Flagged, not wins: better than the baseline beyond the paired test's "
        "uncertainty (p &lt; 0.05), a non-finite metric, or weights larger than the baseline's.</p>"),
        _table(anomalies, "anomalies") if anomalies else "<p>None.</p>",
    ]
    for title, name, figure, caption in figures:
        data = base64.b64encode(Path(figure.path).read_bytes()).decode()
        caption = " ".join(filter(None, [caption, figure.omitted]))
        parts += [f"<h2>{html.escape(title)}</h2>", f"<p class='note'>{html.escape(caption)}</p>",
                  (f"<img src='data:image/png;base64,{data}' alt='{html.escape(title)}' "
                  f"data-file='{name}'>")]
    parts += ["<h2>Failed and skipped cells</h2>", _table(failures, "failures") if failures else "<p>None.</p>",
              CHECK_IMAGES, "</body></html>"]
    page = out / "report.html"
    page.write_text("\n".join(parts))
    return page


def _table(rows: list[dict[str, Any]], query: str) -> str:
    """At most MAX_TABLE_ROWS rows; beyond, a note naming the ``qsweep query`` that has them all."""
    if not rows:
        return "<p>No rows.</p>"
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r.values()) + "</tr>"
                   for r in rows[:MAX_TABLE_ROWS])
    more = (f"<p class='note'>The first {MAX_TABLE_ROWS} of {len(rows)} rows; all of them: "
            f"<code>qsweep query --results RESULTS {query}</code>.</p>" if len(rows) > MAX_TABLE_ROWS else "")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

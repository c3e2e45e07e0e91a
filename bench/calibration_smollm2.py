"""Calibration as a study axis on SmolLM2-135M: GPTQ at 3-bit group 64, calibrated in-domain and
out-of-domain on 16, 64 and 128 samples, measured on held-out text, on this machine's CPU.

```bash
python bench/calibration_smollm2.py --out /tmp/calib
```

One spec, one run: ``calibration:`` is a list of two sets whose ``samples`` is a list, so the
six calibrations cross the one GPTQ config like any axis (the baseline runs once). Every cell
is measured on the CPython documentation topics' held-out ``test`` split (8 windows of 512
tokens). In-domain calibration is the same topics' ``train`` split (other topics, no shared
text: ``calibration_overlap`` says so per row). Out-of-domain calibration is licence and
copyright text: the paragraphs of this machine's ``/usr/share/common-licenses`` and
``/usr/share/doc/*/copyright`` files, de-duplicated, written to ``licences.txt`` (its sha256 is
printed, since it depends on the packages installed). Windows are 256 tokens, so 128 samples
(32,768 tokens) fit in both sets. The script prints perplexity, KL against the baseline and the
calibration's tokens per cell, and the whole run's wall time.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sensitivity_smollm2 import qsweep, query  # noqa: E402

SAMPLES = [16, 64, 128]
SEQ_LEN = 256
GPTQ = {"name": "gptq", "engine": "gptqmodel", "sym": False, "bits": [3], "group_sizes": [64]}


def licence_text(path: Path) -> Path:
    """Paragraphs (80 characters or more, whitespace folded) of the machine's licence and
    copyright files, each once, in file-name order: English legal prose, far from the Python
    documentation the cells are measured on."""
    files = sorted({os.path.realpath(p) for p in glob.glob("/usr/share/common-licenses/*")
                    + glob.glob("/usr/share/doc/*/copyright")})
    seen: set[bytes] = set()
    parts: list[str] = []
    for name in files:
        try:
            text = Path(name).read_text(errors="replace")
        except OSError:
            continue
        for paragraph in text.split("\n\n"):
            folded = " ".join(paragraph.split())
            digest = hashlib.sha1(folded.encode()).digest()
            if len(folded) >= 80 and digest not in seen:
                seen.add(digest)
                parts.append(folded)
    if not parts:
        sys.exit("no licence text found under /usr/share/common-licenses or /usr/share/doc/*/copyright")
    path.write_text("\n\n".join(parts))
    return path


def study_spec(out_of_domain: Path) -> dict:
    return {
        "name": "calibration-study",
        "models": [{"name": "smollm2-135m", "dtype": "float32"}],
        "methods": [{"name": "baseline"}, GPTQ],
        "datasets": [{"name": "heldout", "task": "perplexity", "path": "builtin:pydoc-topics", "limit": 8,
                      "seq_len": 512, "batch_size": 4}],
        "calibration": [{"dataset": "pydoc-topics", "samples": SAMPLES, "seq_len": SEQ_LEN},
                        {"dataset": str(out_of_domain), "samples": SAMPLES, "seq_len": SEQ_LEN}],
        # speed is not what this study measures: the least profiling a row allows
        "profile": {"prompt_len": 8, "gen_len": 2, "batch_sizes": [1], "repeats": 1, "warmup": 0},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the spec, the licence text and the store")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    licences = licence_text(out / "licences.txt")
    digest = hashlib.sha256(licences.read_bytes()).hexdigest()
    print(f"out-of-domain text: {licences} ({licences.stat().st_size:,} bytes, sha256 {digest[:16]})")
    spec = study_spec(licences)
    spec_path = out / "calibration-study.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    start = time.perf_counter()
    qsweep("run", str(spec_path), "--results", str(out / "results"), "--no-progress")
    wall = time.perf_counter() - start
    rows = query(out / "results", """select c.calibration, c.calibration_tokens, c.calibration_overlap,
               d.value as perplexity, d.kl_divergence, d.baseline_value, c.time_quantize_s
        from baseline_deltas d join cells c using (cell_id)
        where d.is_primary and d.method = 'gptq' order by c.calibration""")
    print(f"\nGPTQ (gptqmodel, asymmetric) 3-bit g64 on SmolLM2-135M, float32; held-out: pydoc-topics test "
          f"split, 8 x 512 tokens; baseline perplexity {rows[0]['baseline_value']:.3f}; whole spec {wall:.0f} s "
          f"wall on {os.cpu_count()} CPUs")
    print(f"{'calibration':<30} {'samples':>7} {'tokens':>7} {'overlap':>8} {'ppl':>8} {'KL':>8} {'quantize s':>10}")
    table = []
    for r in rows:
        calibration = json.loads(r["calibration"]) if isinstance(r["calibration"], str) else r["calibration"]
        domain = "in-domain (pydoc train)" if calibration["dataset"] == "pydoc-topics" else "out-of-domain (licences)"
        table.append({"domain": domain, **calibration, **{k: r[k] for k in r if k != "calibration"}})
    for t in sorted(table, key=lambda t: (t["domain"], t["samples"])):
        print(f"{t['domain']:<30} {t['samples']:>7} {t['calibration_tokens']:>7} {t['calibration_overlap']:8.4f} "
              f"{t['perplexity']:8.3f} {t['kl_divergence']:8.4f} {t['time_quantize_s']:10.1f}")
    (out / "summary.json").write_text(json.dumps({"wall_s": wall, "licences_sha256": digest, "rows": table},
                                                 indent=1, default=str))


if __name__ == "__main__":
    main()

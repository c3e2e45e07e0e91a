"""One Pareto plot of the sensitivity proofs: held-out perplexity and KL against bits per
weight, each method's uniform configurations as a line and its allocated mixed configuration
as a star; reads the ``summary-<method>.json`` files ``bench/sensitivity_smollm2.py`` writes.

    python bench/sensitivity_pareto.py --out bench/results/sensitivity_pareto.png \\
        bench/results/sensitivity_smollm2_rtn.json bench/results/sensitivity_smollm2_gsq.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summaries", nargs="+", help="summary JSON files of bench/sensitivity_smollm2.py")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for path, color in zip(args.summaries, ("tab:blue", "tab:orange", "tab:green", "tab:purple")):
        summary = json.loads(Path(path).read_text())
        method = summary["method"]
        rows = sorted(summary["heldout"], key=lambda r: r["bits_per_weight"])
        uniform = [r for r in rows if not r["sweep"].startswith("mixed")]
        mixed = [r for r in rows if r["sweep"].startswith("mixed")]
        for ax, key in ((axes[0], "perplexity"), (axes[1], "kl_divergence")):
            ax.plot([r["bits_per_weight"] for r in uniform], [r[key] for r in uniform], "o-", color=color,
                    label=f"{method} uniform")
            for r in uniform:
                ax.annotate(f"w{r['bits']} g{r['group_size']}", (r["bits_per_weight"], r[key]), fontsize=7)
            ax.plot([r["bits_per_weight"] for r in mixed], [r[key] for r in mixed], "*", color=color,
                    markersize=14, markeredgecolor="black", label=f"{method} mixed (qsweep allocate)")
    for ax, label in ((axes[0], "held-out perplexity (log)"), (axes[1], "KL vs baseline, nats (log)")):
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (quantized layers, scales and zeros included)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M, per-block allocation at a uniform config's bits per weight "
                 "(held-out pydoc test topics; dequantized models, packed-format sizes)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The report of ``bench lowshot``: per-n summaries with 95% CIs, the markdown tables in the paper's layout
(Hariharan & Girshick, ICCV 2017, table 1: novel top-5 for every n, then all top-5) and the novel top-5 plot.
They are written through :func:`bench.report.write_results`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from bench.report import markdown_table

METRIC_KEYS = ("novel_top1", "novel_top5", "base_top1", "base_top5", "all_top1", "all_top5")


def summarise(records: list[dict], ns: Sequence[int], mean_ci95) -> dict:
    """{method: {"n=<n>" | "mean": {metric: {mean, ci95, std, values}}}}; "mean" averages the per-experiment mean
    over n (the paper's last row)."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in records):
        rows = [r for r in records if r["method"] == method]
        per: dict[str, dict] = {}
        exps = sorted({r["experiment"] for r in rows})
        for n in ns:
            sel = [r for r in rows if r["n"] == n]
            per[f"n={n}"] = {k: _stat([r[k] for r in sel], mean_ci95) for k in METRIC_KEYS}
        per["mean"] = {k: _stat([float(np.mean([r[k] for r in rows if r["experiment"] == e])) for e in exps],
                                mean_ci95) for k in METRIC_KEYS}
        out[method] = per
    return out


def _stat(values: list[float], mean_ci95) -> dict:
    mean, ci = mean_ci95(values)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": mean, "ci95": ci, "std": std, "values": [float(v) for v in values]}


_SHOWN_HPARAMS = ("lr", "wd", "iterations", "batch_size", "solver", "precision", "momentum", "dampening",
                  "max_per_label", "generator_lr", "episodes", "per_class")
TABLE_ORDER = (("novel_top5", "Novel top-5"), ("all_top5", "All top-5"), ("novel_top1", "Novel top-1"),
               ("all_top1", "All top-1"), ("base_top5", "Base top-5"), ("base_top1", "Base top-1"))


def _fmt(stat: dict) -> str:
    if stat["mean"] is None or not math.isfinite(stat["mean"]):
        return ""
    return f"{stat['mean']:.2f} ± {stat['ci95']:.2f}"


def markdown_report(cfg, metrics: dict, ns: Sequence[int]) -> str:
    p = metrics["protocol"]
    summary = metrics["summary"]
    lines = [f"# bench lowshot: {cfg.store}", "",
             f"Setup **{p['setup']}**: {len(p['classes']['setup_base'])} base / {len(p['classes']['setup_novel'])} "
             f"novel classes of {p['classes']['num_classes']} (classes from {p['classes']['request']['source']}); "
             f"{p['n_base_rows']:,} base training rows; {p['n_test_images']:,} test images ({p['n_test_novel']:,} "
             f"novel, {p['n_test_base']:,} base); {p['experiments']} experiment(s). Accuracy in %, mean ± 95% CI "
             f"over experiments (Student t; the CI is an extension, the paper reports means).",
             "Heads: " + "; ".join(f"**{m}** " + ", ".join(f"{k} {v}" for k, v in info["hparams"].items()
                                                            if k in _SHOWN_HPARAMS)
                                  for m, info in metrics["methods"].items())
             + f" (defaults from {metrics['hparams']['table_7_6']['why']}); seed {cfg.seed}.", ""]
    # The paper's Table 1 layout: novel top-5 for every n, then all top-5.
    cols = {"method": "method"}
    for key, title in TABLE_ORDER[:2]:
        for n in ns:
            cols[f"{key}:{n}"] = f"{title.split()[0]} n={n}"
    rows = []
    for method, per in summary.items():
        row = {"method": method}
        for key, _ in TABLE_ORDER[:2]:
            for n in ns:
                row[f"{key}:{n}"] = _fmt(per[f"n={n}"][key])
        rows.append(row)
    lines += ["## Top-5 accuracy: novel, then all classes (the paper's layout)", "", markdown_table(rows, cols)]
    for key, title in TABLE_ORDER:
        cols = {"method": "method", **{f"n={n}": f"n={n}" for n in ns}, "mean": "mean"}
        rows = [{"method": m, **{c: _fmt(per[c][key]) for c in cols if c != "method"}} for m, per in summary.items()]
        lines += [f"## {title}", "", markdown_table(rows, cols)]
    return "\n".join(lines)


def plot_novel_top5(path: Path, metrics: dict, ns: Sequence[int], title: str) -> None:
    """Draw the novel top-5 accuracy against n (mean and 95% CI per head) into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    for method, per in metrics["summary"].items():
        means = [per[f"n={n}"]["novel_top5"]["mean"] for n in ns]
        cis = [per[f"n={n}"]["novel_top5"]["ci95"] for n in ns]
        ax.errorbar(ns, means, yerr=cis, marker="o", capsize=3, label=method)
    if len(ns) > 1 and min(ns) > 0:
        ax.set_xscale("log")
    ax.set_xticks(list(ns))
    ax.set_xticklabels([str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("examples per novel class (n)")
    ax.set_ylabel("novel top-5 accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path)
    finally:
        plt.close(fig)

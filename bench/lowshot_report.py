"""The report of ``bench lowshot``: per-n summaries with 95% CIs, the markdown tables in the paper's layout
(Hariharan & Girshick, ICCV 2017, table 1: novel top-5 for every n, then all top-5; top-1 first for
classifiers over fewer than 50 classes, where top-5 is near 100% for every head) and the novel top-5 plot.
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


#: top-5 leads the tables (the paper's layout, ImageNet's 1,000 classes) only where 5 guesses are at most this
#: share of the classifier's classes; with fewer classes top-5 is near 100% for every head and top-1 leads
TOP5_LEADS_UP_TO = 0.1


def lead_metrics(num_classes: int) -> tuple[str, str]:
    """The two metrics the report leads with for a classifier over ``num_classes`` classes: ("novel_top5",
    "all_top5") where 5 guesses cover at most :data:`TOP5_LEADS_UP_TO` of them (50 classes or more), else
    ("novel_top1", "all_top1")."""
    k = "top5" if 5 <= TOP5_LEADS_UP_TO * num_classes else "top1"
    return f"novel_{k}", f"all_{k}"


def flat_heads(metrics: dict, ns: Sequence[int]) -> list[str]:
    """Lines for the heads whose novel top-1 does not climb with n (mean at the largest n not above the mean at
    the smallest), with the share of novel test images they assign to a base class at both ends."""
    if len(ns) < 2:
        return []
    lines = []
    for method, per in metrics["summary"].items():
        lo, hi = per[f"n={ns[0]}"]["novel_top1"]["mean"], per[f"n={ns[-1]}"]["novel_top1"]["mean"]
        if not (math.isfinite(lo) and math.isfinite(hi)) or hi > lo:
            continue
        share = {n: [r["novel_as_base"] for r in metrics["runs"] if r["method"] == method and r["n"] == n
                     and "novel_as_base" in r] for n in (ns[0], ns[-1])}
        why = ""
        if share[ns[0]] and share[ns[-1]]:
            a, b = float(np.mean(share[ns[0]])), float(np.mean(share[ns[-1]]))
            why = (f": {a:.0f}% of the novel test images are classified as a base class at n={ns[0]} and "
                   f"{b:.0f}% at n={ns[-1]}, so more novel examples do not change which classes win")
        lines.append(f"- **{method}**: novel top-1 does not improve with n ({lo:.1f}% at n={ns[0]}, {hi:.1f}% at "
                     f"n={ns[-1]}){why}.")
    return lines


def timing_line(metrics: dict) -> str:
    """Seconds per head (training every classifier and scoring the test images; what ``prepare`` trains once per
    store, e.g. a generator or a matching network, in brackets)."""
    parts = []
    for method, info in metrics["methods"].items():
        prep = info.get("prepare_seconds")
        extra = f" (of which {prep:.1f} s training what it reuses for every run)" if prep and prep >= 0.05 else ""
        parts.append(f"{method} {info['seconds']:.1f} s{extra}")
    return "Time on the cached features: " + "; ".join(parts) + f"; {metrics['seconds']['total']:.1f} s in all."


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
    if "seconds" in metrics and all("seconds" in info for info in metrics["methods"].values()):
        lines += [timing_line(metrics), ""]
    # The paper's Table 1 layout (novel top-5 for every n, then all top-5) where top-5 discriminates; top-1
    # otherwise (lead_metrics)
    lead = lead_metrics(int(p["classes"]["num_classes"]))
    titles = dict(TABLE_ORDER)
    cols = {"method": "method"}
    for key in lead:
        for n in ns:
            cols[f"{key}:{n}"] = f"{titles[key].split()[0]} n={n}"
    rows = []
    for method, per in summary.items():
        row = {"method": method}
        for key in lead:
            for n in ns:
                row[f"{key}:{n}"] = _fmt(per[f"n={n}"][key])
        rows.append(row)
    k = lead[0].split("_")[1].replace("top", "Top-")
    why = ("the paper's layout" if k == "Top-5" else
           f"top-1 leads: with {p['classes']['num_classes']} classes top-5 is near 100% for every head")
    lines += [f"## {k} accuracy: novel, then all classes ({why})", "", markdown_table(rows, cols)]
    flat = flat_heads(metrics, ns)
    if flat:
        lines += [""] + flat + [""]
    order = [t for t in TABLE_ORDER if t[0] in lead] + [t for t in TABLE_ORDER if t[0] not in lead]
    for key, title in order:
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

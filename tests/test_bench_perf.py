"""bench/report.py helpers and a smoke run of ``bench perf --quick``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.report import markdown_table, mean_ci95, timer, timer_interleaved, write_results

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- mean_ci95
def test_mean_ci95_matches_scipy_t():
    stats = pytest.importorskip("scipy.stats")
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    mean, half = mean_ci95(values)
    sem = math.sqrt(2.5) / math.sqrt(5)  # sample sd sqrt(2.5)
    assert mean == pytest.approx(3.0)
    assert half == pytest.approx(stats.t.ppf(0.975, 4) * sem)
    assert half == pytest.approx(1.9632, abs=1e-4)  # by hand: 2.7764 * 0.70711


def test_mean_ci95_one_value_and_empty():
    assert mean_ci95([0.25]) == (0.25, 0.0)
    assert mean_ci95([2.0, 2.0, 2.0]) == (2.0, 0.0)
    with pytest.raises(ValueError):
        mean_ci95([])


# ---------------------------------------------------------------------------------------------- tables
def test_markdown_table_layout():
    rows = [{"name": "a|b", "x": 0.123456, "n": 3}, {"name": "c", "x": 1234.5}]
    text = markdown_table(rows, ["name", "x", "n"])
    lines = text.strip().split("\n")
    assert lines[0] == "| name | x | n |"
    assert lines[1] == "| --- | --- | --- |"
    assert lines[2] == "| a\\|b | 0.123 | 3 |"
    assert lines[3] == "| c | 1,234 |  |"  # missing value: empty cell


def test_markdown_table_header_names():
    text = markdown_table([{"k": True}], {"k": "flag"})
    assert text.splitlines() == ["| flag |", "| --- |", "| yes |"]


# ---------------------------------------------------------------------------------------------- timer, results
def test_timer_counts_warmup_and_repeats():
    calls = []
    t = timer(lambda: calls.append(1) or len(calls), repeats=3, warmup=2)
    assert len(calls) == 5
    assert t.result == 5
    assert 0 <= t.best <= t.median
    best, median = t
    assert (best, median) == (t.best, t.median)
    both = timer_interleaved({"a": lambda: 1, "b": lambda: 2}, repeats=2, warmup=0)
    assert both["a"].result == 1 and len(both["b"].times) == 2


def test_write_results(tmp_path):
    store = SimpleNamespace(path=tmp_path / "s.zarr", fingerprint_hash="abc", store_uuid="u1")
    path = write_results(tmp_path / "out", "demo", {"seed": 0}, {"acc": float("nan"), "n": 3}, store=store)
    data = json.loads(path.read_text())
    assert data["bench"] == "demo" and data["config"] == {"seed": 0}
    assert data["store"]["fingerprint_hash"] == "abc"
    assert data["metrics"] == {"acc": None, "n": 3}  # NaN is not JSON: written as null
    assert "numpy" in data["versions"] and "zarr" in data["versions"]
    assert data["created"]


# ---------------------------------------------------------------------------------------------- smoke run
def test_bench_perf_quick_smoke(tmp_path):
    out = tmp_path / "perf"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.cli", "perf", "--quick", "--sections", "store,knn", "--out", str(out),
         "--workdir", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NOT comparable" in proc.stdout and "SYNTHETIC" in proc.stdout
    data = json.loads((out / "results.json").read_text())
    rows = data["metrics"]["rows"]
    assert data["metrics"]["comparable_with_targets"] is False
    figures = " / ".join(r["figure"] for r in rows)
    for needle in ("full scan: store.load_features", "store.gather", "exact search: faiss flat",
                   "IVF search", "HNSW search", "scikit-learn"):
        assert needle in figures
    targeted = [r for r in rows if r["target"] is not None]
    assert len(targeted) >= 6
    for r in rows:
        if r["ratio"] is not None:
            assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r
        assert math.isfinite(r["value"]) and r["value"] >= 0, r
    for r in targeted:
        assert r["ratio"] is not None and r["passed"] is None  # --quick: not judged against the targets
    assert (out / "perf.md").read_text().startswith("# bench perf")
    assert not any((tmp_path / "work").iterdir())  # the temporary store was removed


def test_bench_perf_bad_section_is_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "perf", "--sections", "nope"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown section" in proc.stderr


@pytest.mark.parametrize("name", [pytest.param("extract", marks=pytest.mark.slow),
                                  pytest.param("train", marks=pytest.mark.slow),
                                  pytest.param("lowshot", marks=pytest.mark.slow), "fsor-meta"])
def test_model_sections_quick(name, tmp_path):
    """The sections that time a backbone run end to end on tiny sizes and return one row per figure."""
    from bench.perf import PerfArgs, load_sections

    args = PerfArgs(sections=(name,), quick=True, workdir=str(tmp_path), threads=1)
    rows = load_sections()[name](args)
    assert rows and all(r["section"] == name and r["value"] >= 0 for r in rows)
    assert all(r["ratio"] > 0 for r in rows if r["reference"] is not None)   # every comparison has its ratio
    assert any(r["ratio"] is not None for r in rows)   # and each section compares something
    assert all(r["passed"] is None for r in rows)  # --quick figures are never judged against a target


def test_lowshot_small_store_rows(tmp_path):
    """The demo-sized case of the lowshot section: the rule picks one thread, the --threads 1 run gives the same
    accuracies, and the flop rate is the hand count over the head's time."""
    from bench import perf_lowshot

    captured = {}
    real = perf_lowshot._loop_against_bare_products

    def spy(*args, **kwargs):
        captured["args"] = args
        return real(*args, **kwargs)

    perf_lowshot._loop_against_bare_products = spy
    try:
        rows = perf_lowshot.small_store_rows("lowshot", tmp_path, quick=True, iterations=20)
    finally:
        perf_lowshot._loop_against_bare_products = real
    assert len(rows) == 2
    loop, one = rows
    assert "default threads (1)" in loop["figure"] and loop["unit"] == "GFLOP/s"
    assert loop["ratio"] == pytest.approx(loop["value"] / loop["reference"])
    # by hand: 5 experiments x 5 n, 10 classes, 64 dims, batch 200 -> nb = 100 base rows (half of the test setup's
    # classes are base), novel rows min(|novel| * n, 100) per classifier
    _, _, _, protocol, C, d, ns, E, batch, iters, seconds, threads = captured["args"]
    nb_classes, nn_classes = len(protocol.classes.base_2), len(protocol.classes.novel_2)
    nb = round(batch * nb_classes / (nb_classes + nn_classes))
    novel_rows = E * sum(min(nn_classes * n, batch - nb) for n in ns)
    assert loop["value"] == pytest.approx(4 * d * C * (nb * E * len(ns) + novel_rows) * iters / seconds / 1e9)
    assert (C, d, batch, threads) == (10, 64, 200, 1)
    assert "identical accuracies: yes" in one["note"]

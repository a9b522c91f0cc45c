"""bench lowshot: the protocol (classes, sample subsets, split files), metrics, refusals and the command end to end."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import head_cache
from bench import lowshot as ls
from bench.kit import parse_shots
from bench.lowshot import LowShotConfig, LowShotMethod
from featstore.errors import UserError
from featstore.store import FeatureStore, Layout

ROOT = Path(__file__).resolve().parents[1]
C, DRAWERS, DIM = 20, 20, 32


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_store(path, *, classes=C, drawers=DRAWERS, dim=DIM, seed=0, pad=0, provenance=None, names=None,
               fingerprint=None, splits=None):
    """Omniglot-like: ``classes`` x ``drawers`` rows, class-contiguous, meta "drawer" 1..drawers, clustered ReLU
    features; ``pad`` all-zero rows labelled 0 at the end (an HDF5 import whose count was not honoured)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)).astype(np.float32) * 1.2
    labels = np.repeat(np.arange(classes), drawers)
    drawer = np.tile(np.arange(1, drawers + 1), classes)
    x = np.maximum(centres[labels] + rng.standard_normal((len(labels), dim)).astype(np.float32), 0)
    if pad:
        x = np.concatenate([x, np.zeros((pad, dim), np.float32)])
        labels = np.concatenate([labels, np.zeros(pad, np.int64)])
        drawer = np.concatenate([drawer, np.zeros(pad, np.int64)])
    n = len(labels)
    store = FeatureStore.create(path, Layout(n=n, dim=dim, dtype="float32", chunk_rows=128),
                                fingerprint=fingerprint or {"model": "synthetic", "seed": seed},
                                classes=names or [f"char{c:02d}" for c in range(classes)], labels=labels,
                                ids=[f"s{i}" for i in range(n)], meta={"drawer": drawer},
                                provenance=provenance, splits=splits)
    for c in range(store.n_chunks):
        lo, hi = store.chunk_range(c)
        store.write_chunk(c, x[lo:hi])
    store.close()
    return FeatureStore.open(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("lowshot") / "s.zarr")


def cfg_for(store, out, **kw):
    base = dict(store=str(store.path), out=str(out), iterations=60, batch_size=60, threads=1, quiet=True)
    base.update(kw)
    return LowShotConfig(**base)


# ---------------------------------------------------------------------------------------------------- parsing
def test_parse_shots():
    assert parse_shots("1..20") == [1, 2, 5, 10, 20]
    assert parse_shots("2..10") == [2, 5, 10]
    assert parse_shots("1,3,7") == [1, 3, 7]
    assert parse_shots("7, 3,3") == [3, 7]
    assert parse_shots("5") == [5]
    assert parse_shots([20, 1]) == [1, 20]
    for bad in ("", "0", "a..b", "3..1", "1;2", "-1", "21..30"):
        with pytest.raises(UserError):
            parse_shots(bad)


def test_rule_mask(store):
    drawer = store.meta("drawer")
    np.testing.assert_array_equal(ls.rule_mask(store, "drawer<=16"), drawer <= 16)
    np.testing.assert_array_equal(ls.rule_mask(store, "drawer >= 3 & drawer!=5"), (drawer >= 3) & (drawer != 5))
    with pytest.raises(UserError, match="no per-sample field 'alphabet'"):
        ls.rule_mask(store, "alphabet<3")
    with pytest.raises(UserError, match="FIELD OP VALUE"):
        ls.rule_mask(store, "drawer~3")


# ---------------------------------------------------------------------------------------------------- metrics
def test_topk_hits_and_subset_accuracies_by_hand():
    logits = torch.tensor([[0.9, 0.1, 0.0, 0.0, 0.0, 0.0],   # label 0: top-1 hit
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],   # label 5: ranked 6th -> miss at top-5
                           [0.1, 0.6, 0.5, 0.0, 0.0, 0.0],   # label 2: 2nd -> top-5 hit only
                           [0.0, 0.0, 0.0, 0.0, 0.2, 0.9]])  # label 4: 2nd -> top-5 hit only
    labels = np.array([0, 5, 2, 4])
    hits = ls.topk_hits(logits, labels, ks=(1, 5))
    np.testing.assert_array_equal(hits, [[1, 0, 0, 0], [1, 0, 1, 1]])
    acc = ls.subset_accuracies(hits, labels, base=[0, 2], novel=[4, 5])
    assert acc == {"novel_top1": 0.0, "novel_top5": 50.0, "base_top1": 50.0, "base_top5": 100.0,
                   "all_top1": 25.0, "all_top5": 75.0}
    # fewer than 5 classes: top-5 = every class
    assert ls.topk_hits(torch.zeros(2, 3), np.array([0, 2]), ks=(5,)).all()


# ---------------------------------------------------------------------------------------------------- protocol
@pytest.mark.parametrize("subsets", [dict(train_rule="drawer<=16", test_rule="drawer>=17"), dict()])
def test_split_files_nested_and_disjoint(store, tmp_path, subsets):
    ns = [1, 2, 5, 10]
    cfg = cfg_for(store, tmp_path, setup="all", **subsets)
    proto = ls.build_protocol(cfg, store, store, ns)
    test = set(proto.test_rows.tolist())
    assert not test & set(proto.train_rows.tolist())
    base, novel = proto.classes.for_setup("all")
    assert len(base) == 10 and len(novel) == 10 and not set(base) & set(novel)
    if subsets:
        np.testing.assert_array_equal(proto.test_rows, np.flatnonzero(store.meta("drawer") >= 17))
    labels = store.labels
    sets = []
    for sf in proto.splitfiles:
        prev = set()
        for n in ns:
            rows = set(np.concatenate([sf[c][:n] for c in novel]).tolist())
            assert len(rows) == n * len(novel)
            assert prev <= rows            # n = 1 within n = 2 within n = 5 ...
            assert not rows & test         # training examples are never test images
            prev = rows
        assert all((labels[sf[c]] == c).all() for c in range(C))
        sets.append(prev)
    assert len({frozenset(s) for s in sets}) == 5  # five different experiments
    # Saved next to the results and reused as they are.
    assert (tmp_path / "splitfile_5.json").is_file() and (tmp_path / "splitfiles.json").is_file()
    again = ls.build_protocol(cfg_for(store, tmp_path, setup="all", seed=99, **subsets), store, store, ns)
    assert all(np.array_equal(a[c], b[c]) for a, b in zip(proto.splitfiles, again.splitfiles) for c in range(C))
    assert again.notes and "seed 0" in again.notes[0]


def test_val_and_test_setups_are_halves(store, tmp_path):
    proto = ls.build_protocol(cfg_for(store, tmp_path), store, store, [1])
    cl = proto.classes
    assert sorted(cl.base_1 + cl.base_2 + cl.novel_1 + cl.novel_2) == list(range(C))
    assert cl.for_setup("test") == (cl.base_2, cl.novel_2) and cl.for_setup("val") == (cl.base_1, cl.novel_1)


def test_infeasible_n_names_the_class_and_largest_n(store, tmp_path):
    cfg = cfg_for(store, tmp_path, setup="all", train_rule="drawer<=16", test_rule="drawer>=17")
    with pytest.raises(UserError, match=r"novel class 'char\d\d' has only 16 .* largest feasible n is 16"):
        ls.build_protocol(cfg, store, store, parse_shots("1..20"))
    assert not (tmp_path / "protocol.json").exists() and not (tmp_path / "splitfile_1.json").exists()
    ls.build_protocol(cfg, store, store, [1, 16])  # a failed run fixed nothing: the same --out works


def test_refusals(store, tmp_path):
    with pytest.raises(UserError, match="no split 'nope'"):
        ls.build_protocol(cfg_for(store, tmp_path / "a", train_split="nope"), store, store, [1])
    with pytest.raises(UserError, match="share"):
        ls.build_protocol(cfg_for(store, tmp_path / "b", train_rule="drawer<=10", test_rule="drawer>=10"),
                          store, store, [1])
    # label_idx.json for another class list
    bad = tmp_path / "label_idx.json"
    bad.write_text(json.dumps({"label_names": [f"x{i}" for i in range(1000)], "base_classes_1": [0],
                               "base_classes_2": [1], "novel_classes_1": [2], "novel_classes_2": [3]}))
    with pytest.raises(UserError, match="1000 label_names but store .* has 20 classes"):
        ls.build_protocol(cfg_for(store, tmp_path / "c", label_idx=str(bad)), store, store, [1])
    # a foreign split file whose rows do not carry the class of their row
    sdir = tmp_path / "splits"
    sdir.mkdir()
    rows = [[int(r) for r in np.flatnonzero(store.labels == (c + 1) % C)[:5]] for c in range(C)]
    for e in (1, 2):
        (sdir / f"splitfile_{e}.json").write_text(json.dumps(rows))
    with pytest.raises(UserError, match="whose label is .* do not match"):
        ls.build_protocol(cfg_for(store, tmp_path / "d", splitfile_dir=str(sdir), experiments=2), store, store, [1])
    with pytest.raises(UserError, match="unknown head 'nope' for bench lowshot; known: .*logreg"):
        ls.resolve_method("nope")
    # options changed in an --out that already holds a protocol
    ls.build_protocol(cfg_for(store, tmp_path / "e"), store, store, [1])
    with pytest.raises(UserError, match="other training / test subsets"):
        ls.build_protocol(cfg_for(store, tmp_path / "e", test_fraction=0.3), store, store, [1])


def test_padding_rows_are_refused(tmp_path):
    padded = make_store(tmp_path / "padded.zarr", pad=3)
    assert ls.trailing_zero_rows(padded) == 3
    with pytest.raises(UserError, match="ends with 3 all-zero feature row"):
        ls.check_store(padded, "store")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "bench.lowshot", "--store", str(padded.path), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench lowshot: error:") and "featstore import" in lines[0]
    assert not (tmp_path / "out" / "results.json").exists()


def test_checkpoint_classes_are_base_and_never_novel(tmp_path):
    names = [f"char{c:02d}" for c in range(C)]
    seen = make_store(tmp_path / "seen.zarr", provenance={"checkpoint_classes": names[:8]})
    proto = ls.build_protocol(cfg_for(seen, tmp_path / "a"), seen, seen, [1])
    assert proto.classes.all_base == list(range(8))
    s2 = make_store(tmp_path / "s2.zarr", provenance={"checkpoint_classes": names[:8]},
                    splits={"novelset": np.flatnonzero(np.repeat(np.arange(C), DRAWERS) >= 5)})
    with pytest.raises(UserError, match="trained on 3 of the novel classes"):
        ls.build_protocol(cfg_for(s2, tmp_path / "b", novel_classes="novelset"), s2, s2, [1])


# ---------------------------------------------------------------------------------------------------- runs
def test_original_label_idx_and_split_files_verbatim(store, tmp_path):
    """ImageNet-style assets: label_idx.json with the four class lists and C x 20 split files (row c = 20 rows of
    class c) are read as they are; the training set for n is the first n columns."""
    idx = {"label_names": store.classes, "base_classes_1": [0, 1, 2], "base_classes_2": [3, 4, 5, 6],
           "novel_classes_1": [7, 8, 9], "novel_classes_2": [10, 11, 12, 13, 14]}
    (tmp_path / "label_idx.json").write_text(json.dumps(idx))
    sdir = tmp_path / "exp"
    sdir.mkdir()
    rng = np.random.default_rng(5)
    drawer = store.meta("drawer")
    train = drawer <= 16
    files = []
    for e in (1, 2):
        rows = [[int(r) for r in rng.permutation(np.flatnonzero((store.labels == c) & train))] for c in range(C)]
        (sdir / f"splitfile_{e}.json").write_text(json.dumps(rows))
        files.append(rows)
    cfg = cfg_for(store, tmp_path / "out", label_idx=str(tmp_path / "label_idx.json"), splitfile_dir=str(sdir),
                  experiments=2, n="1,3", train_rule="drawer<=16", test_rule="drawer>=17")
    metrics = ls.run_lowshot(cfg)
    p = metrics["protocol"]
    assert p["classes"]["setup_base"] == [3, 4, 5, 6] and p["classes"]["setup_novel"] == [10, 11, 12, 13, 14]
    assert p["splitfiles"]["kind"] == "external (verbatim)" and not (sdir / "splitfiles.json").exists()
    runs = {(r["experiment"], r["n"]): r for r in metrics["runs"]}
    assert runs[(2, 3)]["novel_train_images"] == 15
    assert len(runs) == 4
    # the files were not rewritten
    assert json.loads((sdir / "splitfile_1.json").read_text()) == files[0]


class NearestMeanMethod(LowShotMethod):
    """A minimal plug-in (what heads/analogy.py and heads/matching.py provide): class means of the base pool and
    of the n novel examples; scores = negative squared distance."""

    def __init__(self, **unused):
        self.calls = []

    def prepare(self, store_features, labels, base_classes, seed):
        assert set(torch.unique(labels).tolist()) <= set(base_classes)   # never a novel row
        self.calls.append("prepare")

    def scores(self, train_feats, train_labels, test_feats, n, experiment):
        assert set(torch.unique(train_labels).tolist()) == set(self.novel_classes)
        assert len(train_labels) == n * len(self.novel_classes)
        means = torch.zeros(self.num_classes, train_feats.shape[1])
        for c in self.base_classes:
            means[c] = self.base_feats[self.base_labels == c].mean(0)
        for c in self.novel_classes:
            means[c] = train_feats[train_labels == c].mean(0)
        return -torch.cdist(test_feats, means) ** 2


def test_end_to_end_command(store, tmp_path, monkeypatch):
    """`python -m bench.lowshot` writes results.json, the markdown table and the PNG; "all" is the image-weighted
    mean of base and novel."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "bench.lowshot", "--store", str(store.path), "--n", "1,2,5", "--head", "logreg",
           "--experiments", "3", "--setup", "all", "--train-rule", "drawer<=16", "--test-rule", "drawer>=17",
           "--iterations", "150", "--batch-size", "100", "--lr", "0.5", "--wd", "0.001", "--out", str(out),
           "--threads", "1", "--seed", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "| logreg |" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["bench"] == "lowshot" and res["store"]["fingerprint_hash"] == store.fingerprint_hash
    m = res["metrics"]
    assert len(m["runs"]) == 9
    base, novel = m["protocol"]["classes"]["setup_base"], m["protocol"]["classes"]["setup_novel"]
    nb, nn = m["protocol"]["n_test_base"], m["protocol"]["n_test_novel"]
    assert nb == len(base) * 4 and nn == len(novel) * 4
    for r in m["runs"]:
        for k in (1, 5):
            assert r[f"all_top{k}"] == pytest.approx((nb * r[f"base_top{k}"] + nn * r[f"novel_top{k}"]) / (nb + nn))
    s = m["summary"]["logreg"]
    assert set(s) == {"n=1", "n=2", "n=5", "mean"}
    assert s["n=5"]["novel_top5"]["mean"] >= s["n=1"]["novel_top5"]["mean"] - 5
    assert s["n=5"]["novel_top1"]["mean"] > 50  # the clusters are easy: the classifier learns
    assert len(s["n=1"]["novel_top5"]["values"]) == 3 and s["n=1"]["novel_top5"]["ci95"] >= 0
    md = (out / "lowshot.md").read_text()
    assert md.index("Novel n=1") < md.index("All n=1") and "## Novel top-1" in md and "± " in md
    assert (out / "lowshot_novel_top5.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Same --out, a plug-in head beside logreg, in-process: the split files are reused.
    monkeypatch.setitem(ls.ADAPTERS, "nearest-mean", NearestMeanMethod)
    cfg = cfg_for(store, out, heads=("logreg", "nearest-mean"), n="1,2,5", experiments=3, setup="all",
                  train_rule="drawer<=16", test_rule="drawer>=17", seed=3, lr=0.5, wd=0.001)
    m2 = ls.run_lowshot(cfg)
    assert set(m2["summary"]) == {"logreg", "nearest-mean"}
    assert m2["protocol"]["splitfiles"]["generated_now"] == []
    assert m2["summary"]["nearest-mean"]["n=5"]["novel_top1"]["mean"] > 50
    assert "| nearest-mean |" in (out / "lowshot.md").read_text()


def test_topk_hits_agree_with_bench_metrics():
    metrics = pytest.importorskip("bench.metrics")
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(200, 12, generator=g), torch.randint(0, 12, (200,), generator=g)
    hits = ls.topk_hits(logits, labels.numpy(), ks=(1, 5))
    ref = metrics.topk_accuracy(logits, labels, ks=(1, 5))
    assert hits[0].mean() == pytest.approx(ref[1]) and hits[1].mean() == pytest.approx(ref[5])


def test_analogy_and_matching_heads_plug_in(tmp_path, monkeypatch):
    """The generation ("analogy", logreg on real + hallucinated rows) and matching-network heads run through the
    protocol (tiny settings), cache what prepare trained in the store, and reuse it from any results folder."""
    store = make_store(tmp_path / "s.zarr")
    pytest.importorskip("heads.analogy")
    pytest.importorskip("heads.matching")
    opts = ("generator_iterations=30", "clusters_per_class=3", "classifier_iterations=30", "max_per_label=5",
            "episodes=10", "per_class=8")
    cfg = cfg_for(store, tmp_path, heads=("analogy", "mn"), n="1,2", experiments=2, setup="all",
                  train_rule="drawer<=16", test_rule="drawer>=17", head_options=opts)
    m = ls.run_lowshot(cfg)
    assert set(m["summary"]) == {"analogy", "matching"}
    assert m["methods"]["analogy"]["hparams"]["max_per_label"] == 5
    caches = FeatureStore.open(store.path).blob_names("cache")      # kept in the store, not in --out
    assert len(caches) == 2 and caches[0].startswith("analogy-generator-") and not (tmp_path / "cache").exists()
    # a second results folder reuses them, with the same numbers
    m2 = ls.run_lowshot(dataclasses.replace(cfg, out=str(tmp_path / "again")))
    assert m2["methods"]["analogy"]["hparams"]["generator"]["loaded"] is True
    assert "cache/analogy-generator-" in m2["methods"]["analogy"]["hparams"]["generator"]["cache"]
    assert m2["methods"]["matching"]["hparams"]["loaded"] is True
    assert m2["summary"]["matching"]["n=1"]["novel_top5"]["values"] == \
        m["summary"]["matching"]["n=1"]["novel_top5"]["values"]
    assert m2["summary"]["analogy"]["n=1"]["novel_top5"]["values"] == \
        m["summary"]["analogy"]["n=1"]["novel_top5"]["values"]
    # other training rows (same count) are another key: trained again, never a stale reuse
    other = dataclasses.replace(cfg, out=str(tmp_path / "other"), train_rule="drawer>=5", test_rule="drawer<=4")
    m3 = ls.run_lowshot(other)
    assert m3["methods"]["analogy"]["hparams"]["generator"]["loaded"] is False
    # while another process writes the store, the cache goes to --out/cache (and says so)
    holder = FeatureStore.open(store.path)
    holder.acquire_lock()
    try:
        monkeypatch.setattr(head_cache, "CACHE_LOCK_WAIT", 0.1)
        busy = dataclasses.replace(cfg, out=str(tmp_path / "busy"), head_options=opts + ("episodes=11",))
        m4 = ls.run_lowshot(busy)
    finally:
        holder.release_lock()
    assert m4["methods"]["matching"]["hparams"]["cache"].startswith(str(tmp_path / "busy" / "cache"))
    assert any("not cached in the store" in note for note in m4["notes"])
    with pytest.raises(UserError, match="--head-option bogus"):
        ls.run_lowshot(cfg_for(store, tmp_path, heads=("logreg",), head_options=("bogus=1",)))


def test_head_options_scoped_to_one_head():
    table = {"plain": {"lr": 0.1, "wd": 1e-4}, "generation": {"lr": 0.1, "wd": 1e-3, "max_per_label": 20,
                                                             "generator_lr": 0.1}}
    cfg = ls.LowShotConfig(store="s", out="o", head_options=("iterations=7", "analogy.generator_iterations=50",
                                                             "mn.episodes=9"))
    analogy = ls.method_options(cfg, ls.resolve_method("analogy"), table, "analogy")
    matching = ls.method_options(cfg, ls.resolve_method("matching"), table, "matching")
    assert analogy["iterations"] == 7 and analogy["generator_iterations"] == 50 and "episodes" not in analogy
    assert matching["episodes"] == 9 and "generator_iterations" not in matching
    with pytest.raises(UserError, match="KEY=VALUE"):
        ls.parse_head_options(["analogy.=3"])
    # --max-per-label overrides the per-representation value for the generation head
    assert analogy["max_per_label"] == 20
    padded = ls.method_options(dataclasses.replace(cfg, max_per_label=5), ls.resolve_method("analogy"), table,
                               "analogy")
    assert padded["max_per_label"] == 5 and ls.make_method("analogy", padded).generator_options["max_per_label"] == 5


def test_options_no_chosen_head_takes_are_refused(store, tmp_path):
    """A classifier option given for heads that do not take it is an error naming the heads and what they take;
    --head-option NAME.KEY for a key the head does not take names the keys it takes."""
    matching_only = ls.LowShotConfig(store=str(store.path), out=str(tmp_path), heads=("matching",), lr=0.5)
    with pytest.raises(UserError, match=r"^--lr was given, but none of the heads matching takes it \(matching "
                                        r"takes episodes, per_class"):
        ls.check_config(matching_only)
    ls.check_config(dataclasses.replace(matching_only, heads=("logreg", "mn")))   # logreg takes --lr
    with pytest.raises(UserError, match="--max-per-label was given, but none of the heads logreg"):
        ls.check_config(ls.LowShotConfig(store="s", out="o", heads=("logreg",), max_per_label=5))
    with pytest.raises(UserError, match=r"head 'logreg' takes no option 'episodes'; it takes: lr, wd"):
        ls.check_config(ls.LowShotConfig(store="s", out="o", heads=("logreg",), head_options=("logreg.episodes=3",)))
    with pytest.raises(UserError, match="head 'analogy' is not among --head logreg"):
        ls.check_config(ls.LowShotConfig(store="s", out="o", heads=("logreg",),
                                         head_options=("analogy.max_per_label=3",)))
    # on the command line an option counts as given when it is written, even at its default value
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "bench.lowshot", "--store", str(store.path), "--out",
                           str(tmp_path / "out"), "--head", "matching", "--iterations", "10000"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--iterations was given, but none of the heads matching takes it" in lines[0]
    assert not (tmp_path / "out").exists()


def test_old_and_new_spellings_of_options():
    ctx = ls.lowshot_command.make_context("lowshot", ["--store", "s", "--out", "o", "--n", "1,2", "--wd", "0.01"])
    new = ls.lowshot_command.make_context("lowshot", ["--store", "s", "--out", "o", "--shots", "1,2",
                                                      "--weight-decay", "0.01"])
    assert ctx.params["n_spec"] == new.params["n_spec"] == "1,2" and ctx.params["wd"] == new.params["wd"] == 0.01
    assert ls._explicit(ctx) == ("wd",) and ls._explicit(new) == ("wd",)
    assert ls._explicit(ls.lowshot_command.make_context("lowshot", ["--store", "s", "--out", "o"])) == ()


def test_report_leads_with_top1_below_50_classes_and_explains_flat_heads():
    from bench.lowshot_report import flat_heads, lead_metrics

    assert lead_metrics(10) == ("novel_top1", "all_top1")
    assert lead_metrics(49) == ("novel_top1", "all_top1")
    assert lead_metrics(50) == ("novel_top5", "all_top5")
    assert lead_metrics(1000) == ("novel_top5", "all_top5")
    stat = {"flat": {1: 50.0, 20: 46.0}, "rises": {1: 60.0, 20: 95.0}}
    metrics = {"summary": {m: {f"n={n}": {"novel_top1": {"mean": v}} for n, v in s.items()} for m, s in stat.items()},
               "runs": [{"method": "flat", "n": 1, "novel_as_base": 40.0}, {"method": "flat", "n": 1,
                                                                           "novel_as_base": 44.0},
                        {"method": "flat", "n": 20, "novel_as_base": 54.0}]}
    lines = flat_heads(metrics, [1, 20])
    assert len(lines) == 1 and lines[0].startswith("- **flat**")
    assert "42% of the novel test images are classified as a base class at n=1 and 54% at n=20" in lines[0]


def test_novel_as_base_by_hand():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 2.0], [9.0, 0.0, 0.0]])
    labels = np.array([2, 2, 2, 0])        # three novel images (class 2): predicted 1, 0, 2 -> two go to base
    assert ls.novel_as_base(logits, labels, base=[0, 1], novel=[2]) == pytest.approx(200 / 3)

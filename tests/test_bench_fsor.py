"""bench fsor end to end on a small clustered store the test builds; the option vocabulary; closed episodes; errors;
the meta-training hook; the perf section's helpers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench.fsor import run_fsor
from bench.perf_fsor import fsor_section, loop_protonet_reference, vectorised_protonet
from featstore.episodes import EpisodeSampler
from featstore.errors import UserError
from featstore.store import FeatureStore, Layout
from heads.base import EPISODES, HEADS, MAPS, Head, MetaTrainData, register_head
from heads.protonet import ProtoNet

ROOT = Path(__file__).resolve().parents[1]
N_CLASSES, PER_CLASS, DIM, VIEWS = 40, 25, 16, 6


def build_store(path: Path, seed: int = 0) -> Path:
    """40 well-separated Gaussian clusters x 25 rows x 16 dims, 6 views; train 0-15, val 16-27, test 28-39."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    labels = labels[rng.permutation(len(labels))]
    centres = rng.standard_normal((N_CLASSES, DIM)) * 3.0
    x = ((centres[labels] + rng.standard_normal((len(labels), DIM))) * 0.3).astype(np.float32)
    views = (x[None] + rng.standard_normal((VIEWS, *x.shape)).astype(np.float32) * 0.05).astype(np.float32)
    splits = {"train": np.flatnonzero(labels < 16), "val": np.flatnonzero((labels >= 16) & (labels < 28)),
              "test": np.flatnonzero(labels >= 28)}
    layout = Layout(n=len(labels), dim=DIM, dtype="float32", chunk_rows=256, views=VIEWS)
    store = FeatureStore.create(path, layout, fingerprint={"model": "fsor-test"},
                                classes=[f"c{i}" for i in range(N_CLASSES)], labels=labels,
                                ids=[f"s{i}" for i in range(len(labels))], splits=splits)
    for c in range(store.n_chunks):
        lo, hi = store.chunk_range(c)
        store.write_chunk(c, x[lo:hi], views=views[:, lo:hi])
    store.close()
    return path


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    return build_store(tmp_path_factory.mktemp("fsor") / "s.zarr")


def cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "bench.fsor", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bench_fsor_end_to_end(store_path, tmp_path):
    out = tmp_path / "out"
    proc = cli("--store", store_path, "--split", "test", "--ways", 5, "--shots", "1,5", "--open-ways", 5,
               "--queries", 15, "--episodes", 60, "--episode-batch", 25, "--head", "protonet",
               "--head", "protonet:open_score=distance", "--seed", 3, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| protonet | 1 |" in proc.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["bench"] == "fsor" and data["config"]["episodes"] == 60 and data["config"]["shots"] == [1, 5]
    assert data["config"]["views_per_support"] == 5  # the store has views: 5 per support image by default
    assert data["store"]["fingerprint_hash"] == FeatureStore.open(store_path).fingerprint_hash
    heads = data["metrics"]["heads"]
    assert set(heads) == {"protonet", "protonet:open_score=distance"}
    for spec, per_shot in heads.items():
        assert set(per_shot) == {"1-shot", "5-shot"}
        for k, entry in per_shot.items():
            for m in ("acc", "auroc", "f1_macro", "f1_paper", "oscr", "aupr_out", "fpr95"):
                assert entry[m]["mean"] is not None and entry[m]["ci95"] >= 0, (spec, k, m)
            assert entry["acc"]["mean"] > 95, (spec, k)  # well-separated clusters
            assert entry["decision"].startswith("val (threshold")  # the store's val split has 12 classes
            assert entry["f1_paper"]["mean"] >= entry["f1_macro"]["mean"] - 1e-9
    dist = heads["protonet:open_score=distance"]
    assert dist["1-shot"]["auroc"]["mean"] > 90 and dist["5-shot"]["auroc"]["mean"] > 90
    assert dist["5-shot"]["f1_macro"]["mean"] > 80
    md = (out / "results.md").read_text()
    assert md.startswith("# bench fsor") and "paper F1" in md and "macro-F1 (N+1)" in md
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    episodes = np.load(out / "episodes_5shot.npz")
    assert episodes["support"].shape == (60, 25) and episodes["query"].shape == (60, 150)
    labels = FeatureStore.open(store_path).labels
    assert (labels[episodes["query"]] >= 28).all()  # test classes only
    assert not list(out.glob(".*tmp*"))


def test_same_seed_same_numbers_whatever_the_batch(store_path):
    common = dict(split="test", shots=(1,), episodes=40, heads=("protonet:open_score=distance",), seed=5,
                  quiet=True, threshold="median")
    a = run_fsor(store_path, episode_batch=40, **common)["heads"]
    b = run_fsor(store_path, episode_batch=7, chunk=3, **common)["heads"]
    c = run_fsor(store_path, batch=40, **{**common, "seed": 6})["heads"]  # the older name of episode_batch
    key = "protonet:open_score=distance"
    for m in ("acc", "auroc", "f1_macro", "f1_paper"):
        assert a[key]["1-shot"][m]["mean"] == pytest.approx(b[key]["1-shot"][m]["mean"], abs=1e-9)
    assert a[key]["1-shot"]["decision"] == "median"
    assert a[key]["1-shot"]["auroc"]["mean"] != c[key]["1-shot"]["auroc"]["mean"]


@pytest.mark.parametrize("args, needle", [
    (["--split", "nope"], "no split 'nope'"),
    (["--ways", 12], "12 usable classes but 12-way with 5 open classes needs 17"),
    (["--head", "nosuchhead"], "unknown head 'nosuchhead'; known: "),
    (["--head", "protonet", "--head-option", "protonet.colour=red"],
     "head 'protonet' takes no option 'colour'; it takes: metric, unknown_score"),
    (["--head-option", "tane.epochs=3"], "head 'tane' is not among --head protonet"),
    (["--shots", "3..4"], "none of the canonical values 1, 2, 5, 10, 20 lies in 3..4"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    (["--threads", 0], "--threads must be at least 1"),
])
def test_bad_input_is_one_line_exit_2(store_path, tmp_path, args, needle):
    out = tmp_path / "out"
    proc = cli("--store", store_path, "--episodes", 5, "--out", out, "--quiet", *args)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line and needle in line, line
    assert not out.exists()  # nothing written by a failed run


def test_bad_values_in_process(store_path):
    with pytest.raises(UserError, match="no store"):
        run_fsor(store_path.parent / "missing.zarr", episodes=2, quiet=True)
    with pytest.raises(UserError, match="has only 6"):
        run_fsor(store_path, episodes=2, views_per_support=9, quiet=True)
    with pytest.raises(UserError, match="bad head parameter"):
        run_fsor(store_path, episodes=2, heads=("protonet:metric",), quiet=True)
    with pytest.raises(UserError, match="head 'protonet' takes no option 'colour'; it takes: metric"):
        run_fsor(store_path, episodes=2, heads=("protonet:colour=red",), quiet=True)
    with pytest.raises(UserError, match="head 'protonet': unknown_score must be one of"):
        run_fsor(store_path, episodes=2, heads=("protonet",), head_options=("protonet.unknown_score=x",), quiet=True)
    with pytest.raises(UserError, match="--open-ways must be 0"):
        run_fsor(store_path, episodes=2, open_ways=-1, quiet=True)


class MetaDummy(Head):
    """A head with an unknown column that records its meta-training call."""

    input_kind = EPISODES
    needs_meta_training = True
    has_unknown_column = True
    calls: list = []

    def meta_train(self, data: MetaTrainData, seed=None):
        type(self).calls.append(dict(n=data.features.shape[0], train=len(data.train_rows), val=len(data.val_rows),
                                     base=tuple(data.base_weights.shape), seed=seed, classes=list(data.base_classes),
                                     shots=data.shots, ways=data.ways, queries=data.queries,
                                     open_ways=data.open_ways, views=tuple(data.support_views.shape),
                                     weights=data.base_weights, labels=data.labels, rows=data.train_rows,
                                     features=data.features))
        return self

    def fit(self, features, labels):
        self.inner_ = ProtoNet(unknown_score="distance").fit(features, labels)
        return self

    def logits_with_negative(self, features):
        logits = self.inner_.logits(features)
        return torch.cat([logits, torch.full_like(logits[..., :1], -1.0)], dim=-1)  # unknown beyond d^2 = 1

    def logits(self, features):
        return self.inner_.logits(features)

    def open_score(self, features):
        return torch.softmax(self.logits_with_negative(features), -1)[..., -1]


def test_meta_training_hook(store_path):
    if "test_meta_dummy" not in HEADS:
        register_head("test_meta_dummy")(MetaDummy)
    MetaDummy.calls.clear()
    result = run_fsor(store_path, shots=(1, 5), episodes=20, episode_batch=10, heads=("test_meta_dummy",), seed=11,
                      queries=7, quiet=True)
    assert [c["shots"] for c in MetaDummy.calls] == [1, 5]  # once per shot setting, before the test episodes
    call = MetaDummy.calls[0]
    assert call["n"] == N_CLASSES * PER_CLASS and call["train"] == 16 * PER_CLASS and call["val"] == 12 * PER_CLASS
    assert call["base"] == (16, DIM) and call["classes"] == list(range(16)) and call["seed"] == 11
    assert (call["ways"], call["queries"], call["open_ways"]) == (5, 7, 5)  # the test episodes' shape
    assert call["views"] == (VIEWS, N_CLASSES * PER_CLASS, DIM)  # the store's cached views
    rows = call["rows"][call["labels"][call["rows"]] == 3]
    assert torch.allclose(call["weights"][3], call["features"][torch.from_numpy(rows)].mean(0), atol=1e-5)
    entry = result["heads"]["test_meta_dummy"]["5-shot"]
    assert entry["decision"] == "argmax" and entry["threshold"] is None  # (N+1)-way argmax, no threshold
    assert entry["acc"]["mean"] > 95


def test_loop_reference_agrees_with_vectorised(store_path):
    store = FeatureStore.open(store_path)
    sampler = EpisodeSampler(store.labels, store.split("test"), ways=5, shots=1, queries=15, open_ways=5, seed=2)
    x = store.load_features()
    vec = vectorised_protonet(torch.from_numpy(x), sampler, 30, batch=16)
    for impl in ("numpy", "sklearn"):
        loop = loop_protonet_reference(x, sampler, 30, metrics=impl)
        for k in ("acc", "auroc", "f1_macro", "f1_paper"):
            assert np.allclose(vec[k], loop[k], atol=1e-6), (impl, k)


def test_perf_section_quick(tmp_path):
    args = SimpleNamespace(store=None, workdir=str(tmp_path / "work"), seed=0, quick=True, dim=16, notes=[])
    rows = fsor_section(args)
    has_easyfsl = importlib.util.find_spec("easyfsl") is not None
    assert len(rows) == (4 if has_easyfsl else 3) and all(r["section"] == "fsor" for r in rows)
    target = rows[0]
    assert target["target"] == ">= 20" and target["passed"] is None  # --quick: not judged
    assert target["ratio"] > 1 and "agree" in target["note"]
    assert "SYNTHETIC" in args.notes[0]
    if has_easyfsl:  # closed 5-way 1-shot tasks against easyfsl's PrototypicalNetworks, same accuracies
        row = rows[2]
        assert row["target"] == ">= 3" and row["passed"] is None and "easyfsl" in row["reference_name"]
        assert "agree" in row["note"] and row["ratio"] > 0
    else:
        assert any("easyfsl is not installed" in n for n in args.notes)
    assert not any((tmp_path / "work").iterdir())  # the temporary store was removed


def test_base_memory_is_the_checkpoint_classifier(tmp_path, monkeypatch):
    """TANE's base memory: the backbone classifier rows of the base classes, matched by name."""
    from bench.fsor import checkpoint_base_weights
    from extract.backbones import create_backbone, save_checkpoint, sha256_file
    from featstore.store import FeatureStore, Layout

    backbone = create_backbone("conv4", small_input=True)
    weight = torch.randn(3, backbone.feature_dim)
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, backbone, classes=["b", "c", "a"], classifier={"weight": weight})
    labels = np.repeat(np.arange(4), 2)
    store = FeatureStore.create(tmp_path / "s.zarr", Layout(n=8, dim=backbone.feature_dim, dtype="float32"),
                                fingerprint={"checkpoint_sha256": sha256_file(ckpt)}, classes=["a", "b", "c", "d"],
                                labels=labels, provenance={"config": {"checkpoint": str(ckpt)}})
    got = checkpoint_base_weights(store, np.array([0, 1, 2]), torch.device("cpu"))
    torch.testing.assert_close(got, weight[[2, 0, 1]])  # store classes a, b, c -> checkpoint rows 2, 0, 1
    assert checkpoint_base_weights(store, np.array([0, 3]), torch.device("cpu")) is None  # "d" was not trained on
    # a path recorded relative to where extract ran is also looked for beside the store, whatever the cwd
    rel = FeatureStore.create(tmp_path / "rel.zarr", Layout(n=8, dim=backbone.feature_dim, dtype="float32"),
                              fingerprint={"checkpoint_sha256": sha256_file(ckpt)}, classes=["a", "b", "c", "d"],
                              labels=labels, provenance={"config": {"checkpoint": "ckpt.pt"}})
    monkeypatch.chdir(tmp_path.parent)
    torch.testing.assert_close(checkpoint_base_weights(rel, np.array([1]), torch.device("cpu")), weight[[0]])
    ckpt.write_bytes(ckpt.read_bytes() + b"x")  # changed since extraction: never trusted
    assert checkpoint_base_weights(store, np.array([0, 1]), torch.device("cpu")) is None


def test_head_option_and_the_older_spec_are_the_same_head(store_path):
    common = dict(split="test", shots="1..2", episodes=30, seed=4, quiet=True, threshold="median", threads=1)
    new = run_fsor(store_path, heads=("protonet",), head_options=("protonet.unknown_score=distance",), **common)
    old = run_fsor(store_path, heads=("protonet:open_score=distance",), **common)  # the documented alias
    bare = run_fsor(store_path, heads=("protonet",), head_options=("unknown_score=distance",), **common)
    assert set(new["heads"]["protonet"]) == {"1-shot", "2-shot"}  # 1..2: the canonical 1, 2
    for k in ("1-shot", "2-shot"):
        for m in ("acc", "auroc", "f1_macro", "f1_paper", "oscr", "aupr_out", "fpr95"):
            assert new["heads"]["protonet"][k][m] == old["heads"]["protonet:open_score=distance"][k][m]
            assert new["heads"]["protonet"][k][m] == bare["heads"]["protonet"][k][m]
    msp = run_fsor(store_path, heads=("protonet",), **common)["heads"]["protonet"]["1-shot"]
    assert msp["auroc"] != new["heads"]["protonet"]["1-shot"]["auroc"]  # the option reached the head


def _hard_store(path: Path) -> Path:
    """12 overlapping clusters x 20 rows x 8 dims (1-shot accuracy far from 100%), split 'test' only."""
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(12), 20)
    x = (rng.standard_normal((12, 8))[labels] * 0.8 + rng.standard_normal((len(labels), 8))).astype(np.float32)
    store = FeatureStore.create(path, Layout(n=len(labels), dim=8, dtype="float32", chunk_rows=64),
                                fingerprint={"model": "fsor-closed-test"}, classes=[f"c{i}" for i in range(12)],
                                labels=labels, ids=[f"s{i}" for i in range(len(labels))],
                                splits={"test": np.arange(len(labels))})
    for c in range(store.n_chunks):
        lo, hi = store.chunk_range(c)
        store.write_chunk(c, x[lo:hi])
    store.close()
    return path


def test_closed_episodes_equal_a_numpy_nearest_centroid(tmp_path):
    """--open-ways 0: plain N-way K-shot episodes; accuracy (mean, 95% CI) equals nearest-centroid in numpy."""
    from scipy import stats

    path = _hard_store(tmp_path / "hard.zarr")
    out = tmp_path / "closed"
    proc = cli("--store", path, "--split", "test", "--ways", 5, "--shots", "1,5", "--open-ways", 0, "--queries", 6,
               "--episodes", 200, "--episode-batch", 64, "--head", "protonet", "--seed", 9, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["open_ways"] == 0
    x = FeatureStore.open(path).load_features().astype(np.float64)
    for k in (1, 5):
        entry = data["metrics"]["heads"]["protonet"][f"{k}-shot"]
        assert set(entry) == {"acc", "episodes"}  # no open metric, decision or threshold
        ep = np.load(out / f"episodes_{k}shot.npz")
        assert ep["query"].shape == (200, 5 * 6) and ep["open_classes"].shape == (200, 0)
        protos = x[ep["support"]].reshape(200, 5, k, -1).mean(2)                     # class-major supports
        q = x[ep["query"]]
        d2 = ((q[:, :, None, :] - protos[:, None, :, :]) ** 2).sum(-1)               # [E, m, N]
        truth = np.repeat(np.arange(5), 6)
        acc = (d2.argmin(-1) == truth).mean(1) * 100
        assert 30 < acc.mean() < 95  # far from both chance and perfect: the comparison means something
        half = stats.t.ppf(0.975, len(acc) - 1) * acc.std(ddof=1) / np.sqrt(len(acc))
        assert entry["acc"]["mean"] == pytest.approx(acc.mean(), abs=1e-9)
        assert entry["acc"]["ci95"] == pytest.approx(half, abs=1e-9)
    assert set(data["metrics"]["metric_names"]) == {"acc"}
    assert not (out / "roc.png").exists()
    md = (out / "results.md").read_text()
    assert "closed episodes" in md and "AUROC" not in md
    assert "| protonet | 1 |" in proc.stdout and "AUROC" not in proc.stdout


class MapsDummy(Head):
    """A head that needs spatial maps, which bench fsor does not give."""

    input_kind = MAPS


def test_unmet_needs_are_refused_in_one_line(store_path, tmp_path):
    if "test_maps_dummy" not in HEADS:
        register_head("test_maps_dummy")(MapsDummy)
    with pytest.raises(UserError, match="head 'test_maps_dummy' needs maps inputs; bench fsor gives episodes"):
        run_fsor(store_path, episodes=2, heads=("test_maps_dummy",), quiet=True)
    if "test_meta_dummy" not in HEADS:
        register_head("test_meta_dummy")(MetaDummy)
    with pytest.raises(UserError, match="needs meta-training, which bench fsor does not run .*no split 'nosuch'"):
        run_fsor(store_path, episodes=2, heads=("test_meta_dummy",), train_split="nosuch", quiet=True)


def test_batch_is_the_older_name_of_episode_batch(store_path, tmp_path):
    runs = {}
    for flag in ("--batch", "--episode-batch"):
        out = tmp_path / flag.strip("-")
        proc = cli("--store", store_path, "--episodes", 14, flag, 6, "--shots", 1, "--threshold", "median",
                   "--seed", 2, "--out", out, "--quiet")
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[flag] = json.loads((out / "results.json").read_text())
        assert runs[flag]["config"]["episode_batch"] == 6
    assert runs["--batch"]["metrics"]["heads"] == runs["--episode-batch"]["metrics"]["heads"]


def test_a_pooled_head_is_fitted_episode_by_episode(store_path):
    common = dict(episodes=4, shots=(1,), quiet=True, threshold="median", episode_batch=4, seed=1)
    with pytest.raises(UserError, match="head 'logreg' on 5-way 1-shot episodes: the base pool has 5 rows"):
        run_fsor(store_path, heads=("logreg",), **common)  # its default batch of 1000 rows: one line, no traceback
    got = run_fsor(store_path, heads=("logreg",), head_options=("logreg.batch_size=5", "logreg.iterations=50"),
                   **common)["heads"]["logreg"]["1-shot"]
    assert got["acc"]["mean"] > 95 and got["decision"] == "median"

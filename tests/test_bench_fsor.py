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
               "--head", "protonet:open_score=msp", "--seed", 3, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| protonet | 1 |" in proc.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["bench"] == "fsor" and data["config"]["episodes"] == 60 and data["config"]["shots"] == [1, 5]
    assert data["config"]["views_per_support"] == 5  # the store has views: 5 per support image by default
    assert data["store"]["fingerprint_hash"] == FeatureStore.open(store_path).fingerprint_hash
    heads = data["metrics"]["heads"]
    assert set(heads) == {"protonet", "protonet:open_score=msp"}
    for spec, per_shot in heads.items():
        assert set(per_shot) == {"1-shot", "5-shot"}
        for k, entry in per_shot.items():
            for m in ("acc", "auroc", "f1_macro", "f1_paper", "oscr", "aupr_out", "fpr95tpr"):
                assert entry[m]["mean"] is not None and entry[m]["ci95"] >= 0, (spec, k, m)
            assert entry["acc"]["mean"] > 95, (spec, k)  # well-separated clusters
            assert entry["decision"].startswith("val (threshold")  # the store's val split has 12 classes
            assert entry["f1_paper"]["mean"] >= entry["f1_macro"]["mean"] - 1e-9
    dist = heads["protonet"]  # the default open score: the distance to the nearest prototype
    assert data["config"]["head_params"] == {"protonet": {}, "protonet:open_score=msp": {"open_score": "msp"}}
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
        for m in ("acc", "auroc", "f1_macro", "f1_paper", "oscr", "aupr_out", "fpr95tpr"):
            assert new["heads"]["protonet"][k][m] == old["heads"]["protonet:open_score=distance"][k][m]
            assert new["heads"]["protonet"][k][m] == bare["heads"]["protonet"][k][m]
    default = run_fsor(store_path, heads=("protonet",), **common)["heads"]["protonet"]
    assert default == new["heads"]["protonet"]  # distance is the default
    msp = run_fsor(store_path, heads=("protonet",), head_options=("protonet.unknown_score=msp",), **common)
    old_msp = run_fsor(store_path, heads=("protonet:open_score=msp",), **common)  # the older alias
    assert msp["heads"]["protonet"] == old_msp["heads"]["protonet:open_score=msp"]
    for k in ("1-shot", "2-shot"):  # the option reached the head: the same closed decisions, another open score
        assert msp["heads"]["protonet"][k]["acc"] == default[k]["acc"]
        assert msp["heads"]["protonet"][k]["auroc"] != default[k]["auroc"]


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


def _overlap_store(path: Path, provenance: dict | None = None) -> Path:
    """10 clusters x 20 rows x 8 dims, 2 views; train = classes 0-5, val = 6-9 and a test split holding all ten."""
    rng = np.random.default_rng(8)
    labels = np.repeat(np.arange(10), 20)
    x = (rng.standard_normal((10, 8))[labels] * 3 + rng.standard_normal((len(labels), 8))).astype(np.float32)
    views = (x[None] + 0.05 * rng.standard_normal((2, *x.shape))).astype(np.float32)
    splits = {"train": np.flatnonzero(labels < 6), "val": np.flatnonzero(labels >= 6), "test": np.arange(len(labels))}
    store = FeatureStore.create(path, Layout(n=len(labels), dim=8, dtype="float32", chunk_rows=64, views=2),
                                fingerprint={"model": "fsor-overlap-test"}, classes=[f"c{i}" for i in range(10)],
                                labels=labels, ids=[f"s{i}" for i in range(len(labels))], splits=splits,
                                provenance=provenance)
    for c in range(store.n_chunks):
        lo, hi = store.chunk_range(c)
        store.write_chunk(c, x[lo:hi], views=views[:, lo:hi])
    store.close()
    return path


def test_overlapping_class_sets_are_refused_unless_allowed(tmp_path):
    path = _overlap_store(tmp_path / "overlap.zarr")
    if "test_meta_dummy" not in HEADS:
        register_head("test_meta_dummy")(MetaDummy)
    common = dict(shots=(1,), episodes=6, episode_batch=6, quiet=True, ways=3, open_ways=2, queries=5)
    with pytest.raises(UserError, match=r"^test split 'test' and meta-training split 'train' share 6 class\(es\): "
                                        r"c0, c1, c2, c3, c4 and 1 more; pass --allow-overlap"):
        run_fsor(path, heads=("test_meta_dummy",), **common)
    # no meta-training head: the val split still sets the threshold, and its classes are test classes too
    with pytest.raises(UserError, match=r"^test split 'test' and validation split 'val' share 4 class\(es\): "
                                        r"c6, c7, c8, c9; pass --allow-overlap"):
        run_fsor(path, heads=("protonet",), **common)
    # nothing on the train or val split is used: nothing to refuse
    assert run_fsor(path, heads=("protonet",), threshold="median", **common)["notes"][-1].startswith("OSCR follows")

    out = tmp_path / "allowed"
    proc = cli("--store", path, "--ways", 3, "--open-ways", 2, "--queries", 5, "--shots", 1, "--episodes", 6,
               "--head", "protonet", "--out", out, "--quiet")
    assert proc.returncode == 2 and "validation split 'val' share 4 class(es)" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and not out.exists()
    proc = cli("--store", path, "--ways", 3, "--open-ways", 2, "--queries", 5, "--shots", 1, "--episodes", 6,
               "--head", "protonet", "--allow-overlap", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["allow_overlap"] is True
    line = ("--allow-overlap: test split 'test' and validation split 'val' share 4 class(es): c6, c7, c8, c9; "
            "these figures are not on unseen classes")
    assert line in data["metrics"]["notes"]
    assert f"- {line}" in (out / "results.md").read_text()
    got = run_fsor(path, heads=("test_meta_dummy",), allow_overlap=True, **common)
    assert any(n.startswith("--allow-overlap: test split 'test' and meta-training split 'train' share 6")
               for n in got["notes"])


def test_backbone_training_classes_are_refused_as_test_classes(tmp_path):
    path = _overlap_store(tmp_path / "seen.zarr", provenance={"checkpoint_classes": ["c2", "c0", "elsewhere"]})
    common = dict(shots=(1,), episodes=4, quiet=True, ways=3, open_ways=2, queries=5, threshold="median")
    with pytest.raises(UserError, match=r"^test split 'test' and the backbone's training classes \(provenance "
                                        r"checkpoint_classes\) share 2 class\(es\): c0, c2; pass --allow-overlap"):
        run_fsor(path, heads=("protonet",), **common)
    got = run_fsor(path, heads=("protonet",), allow_overlap=True, **common)
    assert any("backbone's training classes" in n and "c0, c2" in n for n in got["notes"])
    # a test split without those classes (val: classes 6-9) passes
    clean = run_fsor(path, split="val", heads=("protonet",), **{**common, "ways": 2})
    assert clean["heads"]["protonet"]["1-shot"]["episodes"] == 4 and not any("overlap" in n for n in clean["notes"])


def test_val_split_equal_to_the_test_split_is_refused(store_path):
    for allow in (False, True):
        with pytest.raises(UserError, match="--val-split 'test' is the test split: the F1 threshold"):
            run_fsor(store_path, val_split="test", episodes=4, shots=(1,), quiet=True, allow_overlap=allow)


class NaNDummy(ProtoNet):
    """ProtoNet with the distance score, NaN for every query of an episode whose first query has x[0] > 0."""

    def logits_and_open_score(self, features):
        logits, scores = super().logits_and_open_score(features)
        bad = features[..., :1, 0] > 0  # [E, 1]
        return logits, torch.where(bad, torch.full_like(scores, float("nan")), scores)


def test_episodes_averaged_are_counted_when_some_scores_are_nan(tmp_path):
    from sklearn.metrics import roc_auc_score, roc_curve

    if "test_nan_dummy" not in HEADS:
        register_head("test_nan_dummy")(NaNDummy)
    path = _hard_store(tmp_path / "hard.zarr")
    out = tmp_path / "nan"
    E = 60
    got = run_fsor(path, heads=("test_nan_dummy",), head_options=("test_nan_dummy.unknown_score=distance",),
                   shots=(1,), episodes=E, episode_batch=16, queries=6, open_ways=5, ways=5, seed=2, quiet=True,
                   out=out)
    entry = got["heads"]["test_nan_dummy"]["1-shot"]
    x = FeatureStore.open(path).load_features().astype(np.float64)
    ep = np.load(out / "episodes_1shot.npz")
    bad = x[ep["query"][:, 0], 0] > 0
    assert 0 < bad.sum() < E  # some episodes, not all
    good = ~bad
    assert entry["acc"]["episodes"] == E  # the logits are finite everywhere
    for m in ("auroc", "oscr", "aupr_out", "fpr95tpr", "f1_macro", "f1_paper"):  # median rule: it uses the scores
        assert entry[m]["episodes"] == good.sum(), m
    assert entry["episodes"] == good.sum() and entry["dropped"]["auroc"] == bad.sum()
    assert "acc" not in entry["dropped"]
    assert any(f"auroc {bad.sum()}" in n and f"of {E} episodes left out" in n for n in got["notes"])
    assert json.loads((out / "results.json").read_text())["config"]["episodes"] == E
    # the means are those of the good episodes, computed here with scikit-learn
    protos = x[ep["support"]]  # [E, 5, D]: 1-shot, class-major
    q = x[ep["query"]]
    score = ((q[:, :, None] - protos[:, None]) ** 2).sum(-1).min(-1)  # nearest prototype's squared distance
    unknown = ep["query_labels"] < 0
    auroc = [roc_auc_score(unknown, score[e]) for e in np.flatnonzero(good)]
    assert entry["auroc"]["mean"] == pytest.approx(100 * np.mean(auroc), abs=1e-6)
    fpr95 = []
    for e in np.flatnonzero(good):
        f, t, _ = roc_curve(~unknown, -score[e], drop_intermediate=False)
        fpr95.append(f[np.argmax(t >= 0.95)])
    assert entry["fpr95tpr"]["mean"] == pytest.approx(100 * np.mean(fpr95), abs=1e-6)


def _unsplit_store(path: Path, provenance: dict | None = None, splits: dict | None = None, views: int = 0) -> Path:
    """12 clusters c0..c11 x 20 rows x 8 dims, ``views`` views; ``splits`` {name: classes} (none by default)."""
    rng = np.random.default_rng(12)
    labels = np.repeat(np.arange(12), 20)
    x = (rng.standard_normal((12, 8))[labels] * 3 + rng.standard_normal((len(labels), 8))).astype(np.float32)
    rows = {name: np.flatnonzero(np.isin(labels, cs)) for name, cs in (splits or {}).items()}
    v = (x[None] + 0.05 * rng.standard_normal((views, *x.shape))).astype(np.float32) if views else None
    store = FeatureStore.create(path, Layout(n=len(labels), dim=8, dtype="float32", chunk_rows=64, views=views),
                                fingerprint={"model": "fsor-unsplit-test"}, classes=[f"c{i}" for i in range(12)],
                                labels=labels, ids=[f"s{i}" for i in range(len(labels))], splits=rows or None,
                                provenance=provenance)
    for c in range(store.n_chunks):
        lo, hi = store.chunk_range(c)
        store.write_chunk(c, x[lo:hi], views=None if v is None else v[:, lo:hi])
    store.close()
    return path


def test_without_splits_the_test_classes_are_those_the_backbone_was_not_trained_on(tmp_path):
    seen = ["c0", "c3", "c1", "c5", "c2", "c4", "not-in-this-store"]  # extraction's record: c0..c5 and one other
    path = _unsplit_store(tmp_path / "unsplit.zarr", provenance={"checkpoint_classes": seen})
    out = tmp_path / "out"
    proc = cli("--store", path, "--ways", 3, "--open-ways", 2, "--queries", 5, "--shots", "1,5", "--episodes", 40,
               "--episode-batch", 16, "--seed", 4, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = proc.stdout.splitlines()[0]
    assert ("on the 6 classes the backbone was not trained on (c6, c7, c8, c9, c10 and 1 more; provenance "
            "checkpoint_classes)") in first, first
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["split"] is None and data["config"]["test_classes"] == [f"c{i}" for i in range(6, 12)]
    line = ("no --split and the store has no split 'test': the test episodes are drawn from the 6 classes the "
            "backbone was not trained on (provenance checkpoint_classes: 7 classes, 6 of them in this store): "
            "c6, c7, c8, c9, c10, c11")
    assert data["metrics"]["notes"][0] == line
    assert f"- {line}" in (out / "results.md").read_text()
    labels = FeatureStore.open(path).labels
    unseen = set(range(6, 12))
    for k in (1, 5):
        ep = np.load(out / f"episodes_{k}shot.npz")
        assert set(np.unique(ep["classes"])) | set(np.unique(ep["open_classes"])) == unseen  # all six, only them
        assert set(labels[ep["support"]].ravel()) <= unseen and set(labels[ep["query"]].ravel()) == unseen
        entry = data["metrics"]["heads"]["protonet"][f"{k}-shot"]
        assert entry["episodes"] == 40 and entry["decision"] == "median"  # no val split: the median rule
    # the same episodes as a split holding exactly those rows
    split = _unsplit_store(tmp_path / "split.zarr", provenance={"checkpoint_classes": seen},
                           splits={"held": list(range(6, 12))})
    common = dict(ways=3, open_ways=2, queries=5, shots=(1,), episodes=40, episode_batch=16, seed=4, quiet=True)
    a = run_fsor(path, **common)["heads"]["protonet"]["1-shot"]
    b = run_fsor(split, split="held", **common)["heads"]["protonet"]["1-shot"]
    assert a == b


def test_without_a_test_split_the_splits_in_use_are_left_out_of_the_default_test_classes(tmp_path):
    path = _unsplit_store(tmp_path / "val.zarr", provenance={"checkpoint_classes": ["c0", "c1", "c2"]},
                          splits={"val": [3, 4, 5, 6]})
    common = dict(ways=2, open_ways=2, queries=5, shots=(1,), episodes=8, quiet=True, out=None)
    got = run_fsor(path, **common)  # the val split sets the threshold: its classes are no test classes
    assert got["notes"][0].endswith("(provenance checkpoint_classes: 3 classes, 3 of them in this store), less the "
                                    "4 of validation split 'val': c7, c8, c9, c10, c11")
    assert got["heads"]["protonet"]["1-shot"]["decision"].startswith("val (threshold")
    median = run_fsor(path, threshold="median", **common)  # nothing uses the val split
    assert median["notes"][0].endswith("(provenance checkpoint_classes: 3 classes, 3 of them in this store): c3, "
                                       "c4, c5, c6, c7, c8, c9, c10, c11")
    # a meta-trained head: the meta-training and validation splits' classes are left out too
    if "test_meta_dummy" not in HEADS:
        register_head("test_meta_dummy")(MetaDummy)
    meta = _unsplit_store(tmp_path / "meta.zarr", provenance={"checkpoint_classes": ["c0", "c1", "c2"]},
                          splits={"train": [3, 4, 5], "val": [6, 7]}, views=2)
    out = tmp_path / "meta"
    got = run_fsor(meta, heads=("test_meta_dummy",), **{**common, "out": out})
    assert got["notes"][0].endswith("less the 3 of meta-training split 'train' and the 2 of validation split "
                                    "'val': c8, c9, c10, c11")
    ep = np.load(out / "episodes_1shot.npz")
    assert set(np.unique(np.concatenate([ep["classes"], ep["open_classes"]], 1))) == {8, 9, 10, 11}
    # a split named by the user is taken as it is, and the refusals still hold
    with pytest.raises(UserError, match=r"^test split 'val' and the backbone's training classes"):
        run_fsor(_unsplit_store(tmp_path / "seen.zarr", provenance={"checkpoint_classes": ["c3"]},
                                splits={"val": [3, 4, 5, 6, 7]}), split="val", **{**common, "threshold": "median"})


def test_without_splits_or_provenance_the_error_names_the_options(tmp_path):
    path = _unsplit_store(tmp_path / "bare.zarr")
    out = tmp_path / "out"
    proc = cli("--store", path, "--ways", 3, "--open-ways", 2, "--episodes", 4, "--out", out, "--quiet")
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert "has no split 'test'" in line and "provenance checkpoint_classes" in line
    assert "pass --split NAME" in line and "featstore split" in line, line
    assert not out.exists()
    # every class seen by the backbone: nothing left to test on
    every = _unsplit_store(tmp_path / "every.zarr", provenance={"checkpoint_classes": [f"c{i}" for i in range(12)]})
    with pytest.raises(UserError, match=r"trained on every class of store .* pass --split NAME"):
        run_fsor(every, ways=3, open_ways=2, episodes=4, quiet=True)
    # a meta-training head on a store without a train split: the options to pass, in one line
    if "test_meta_dummy" not in HEADS:
        register_head("test_meta_dummy")(MetaDummy)
    seen = _unsplit_store(tmp_path / "seen.zarr", provenance={"checkpoint_classes": ["c0", "c1"]})
    with pytest.raises(UserError, match=r"needs meta-training.*no split 'train'.*give --train-split .*--val-split.*"
                                        r"featstore split"):
        run_fsor(seen, heads=("test_meta_dummy",), ways=3, open_ways=2, episodes=4, quiet=True)

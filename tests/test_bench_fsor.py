"""bench fsor end to end on a small clustered store the test builds; errors; the meta-training hook; speed helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench.fsor import (loop_protonet_reference, perf_fsor_section, run_fsor, vectorised_protonet)
from featstore.episodes import EpisodeSampler
from featstore.errors import UserError
from featstore.store import FeatureStore, Layout
from heads.base import HEADS, Head, register_head
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
               "--queries", 15, "--episodes", 60, "--batch", 25, "--head", "protonet",
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
    a = run_fsor(store_path, batch=40, **common)["heads"]
    b = run_fsor(store_path, batch=7, chunk=3, **common)["heads"]
    c = run_fsor(store_path, batch=40, **{**common, "seed": 6})["heads"]
    key = "protonet:open_score=distance"
    for m in ("acc", "auroc", "f1_macro", "f1_paper"):
        assert a[key]["1-shot"][m]["mean"] == pytest.approx(b[key]["1-shot"][m]["mean"], abs=1e-9)
    assert a[key]["1-shot"]["decision"] == "median"
    assert a[key]["1-shot"]["auroc"]["mean"] != c[key]["1-shot"]["auroc"]["mean"]


@pytest.mark.parametrize("args, needle", [
    (["--split", "nope"], "no split 'nope'"),
    (["--ways", 12], "12 usable classes but 12-way with 5 open classes needs 17"),
    (["--head", "nosuchhead"], "head 'nosuchhead' is not available (registered heads: "),
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
    with pytest.raises(UserError, match="head 'protonet:colour=red'"):
        run_fsor(store_path, episodes=2, heads=("protonet:colour=red",), quiet=True)


class MetaDummy(Head):
    """A head with an unknown column that records its meta-training call."""

    needs_meta_training = True
    calls: list = []

    def meta_train(self, features, labels, train_rows, val_rows, base_weights, seed, base_classes=None,
                   shots=None):
        type(self).calls.append(dict(n=features.shape[0], train=len(train_rows), val=len(val_rows),
                                     base=tuple(base_weights.shape), seed=seed, classes=list(base_classes),
                                     shots=shots, weights=base_weights, labels=labels, rows=train_rows,
                                     features=features))

    def fit(self, features, labels):
        self.inner_ = ProtoNet(open_score="distance").fit(features, labels)
        return self

    def logits(self, features):
        logits = self.inner_.logits(features)
        return torch.cat([logits, torch.full_like(logits[..., :1], -1.0)], dim=-1)  # unknown beyond d^2 = 1

    def open_score(self, features):
        return torch.softmax(self.logits(features), -1)[..., -1]


def test_meta_training_hook(store_path):
    if "test_meta_dummy" not in HEADS:
        register_head("test_meta_dummy")(MetaDummy)
    MetaDummy.calls.clear()
    result = run_fsor(store_path, shots=(1, 5), episodes=20, batch=10, heads=("test_meta_dummy",), seed=11,
                      quiet=True)
    assert [c["shots"] for c in MetaDummy.calls] == [1, 5]  # once per shot setting, before the test episodes
    call = MetaDummy.calls[0]
    assert call["n"] == N_CLASSES * PER_CLASS and call["train"] == 16 * PER_CLASS and call["val"] == 12 * PER_CLASS
    assert call["base"] == (16, DIM) and call["classes"] == list(range(16)) and call["seed"] == 11
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
    rows = perf_fsor_section(args)
    assert len(rows) == 3 and all(r["section"] == "fsor" for r in rows)
    target = rows[0]
    assert target["target"] == ">= 20" and target["passed"] is None  # --quick: not judged
    assert target["ratio"] > 1 and "agree" in target["note"]
    assert "SYNTHETIC" in args.notes[0]
    assert not any((tmp_path / "work").iterdir())  # the temporary store was removed


def test_base_memory_is_the_checkpoint_classifier(tmp_path, monkeypatch):
    """TANE's base memory: the backbone classifier rows of the base classes, matched by name (fsor.md 5.3)."""
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

"""The `featstore` command end to end (subprocess): info, verify, index, search, export, import, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from featstore.index import load_index
from featstore.store import FeatureStore, Layout

ROOT = Path(__file__).resolve().parents[1]
N, D, CLASSES = 300, 16, ["cat", "dog", "fox", "owl"]


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FEATSTORE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "featstore.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        digest.update(str(p.relative_to(path)).encode())
        if p.is_file():
            digest.update(p.read_bytes())
    return digest.hexdigest()


def make_store(path, *, done_chunks=None, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((len(CLASSES), D)).astype(np.float32) * 3
    labels = np.arange(N) % len(CLASSES)
    x = (centers[labels] + rng.standard_normal((N, D))).astype(np.float32)
    store = FeatureStore.create(path, Layout(n=N, dim=D, dtype="float32", chunk_rows=128),
                                fingerprint={"model": "resnet10", "checkpoint_sha256": "ab" * 32,
                                             "transform": {"resize": 32}, "dataset": "toy"},
                                classes=CLASSES, labels=labels, ids=[f"img/{i:04d}.png" for i in range(N)],
                                splits={"base": np.arange(0, N, 2)})
    try:
        for c in range(store.n_chunks) if done_chunks is None else done_chunks:
            lo, hi = store.chunk_range(c)
            store.write_chunk(c, x[lo:hi])
    finally:
        store.close()
    return x, labels


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "toy.zarr"
    x, labels = make_store(path)
    return path, x, labels


def test_info_text_and_json(store):
    path, _, _ = store
    res = run("info", path)
    assert res.returncode == 0, res.stderr
    for text in ("rows:", "300", "dim:", "16", "float32", "3/3", "cat, dog, fox, owl", "base (150 rows)",
                 "resnet10", "ab" * 32, "resize", "toy", "zarr", "crc32c per chunk"):
        assert text in res.stdout, text
    res = run("info", path, "--json")
    data = json.loads(res.stdout)
    assert data["rows"] == N and data["dim"] == D and data["complete"] and data["indexes"] == {}


def test_verify_ok_and_problems(tmp_path, store):
    path, _, _ = store
    res = run("verify", path)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    partial = tmp_path / "partial.zarr"
    make_store(partial, done_chunks=[0])
    res = run("verify", partial)
    assert res.returncode == 1 and "2 of 3 chunks not done" in res.stdout and res.stderr == ""


def test_index_then_search(store, tmp_path):
    path, x, labels = store
    res = run("index", path, "--kind", "ivf", "--nlist", "4", "--nprobe", "4", "--name", "ivf", "--seed", "3")
    assert res.returncode == 0, res.stderr
    assert "ivf" in res.stdout and "300 rows" in res.stdout
    fi = load_index(path, "ivf")
    assert fi.kind == "ivf" and fi.params["nlist"] == 4 and fi.params["seed"] == 3
    res = run("search", path, "--row", 7, "-k", 5, "--index", "ivf", "--json")
    assert res.returncode == 0, res.stderr
    hits = json.loads(res.stdout)["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert hits[0]["row"] == 7 and hits[0]["id"] == "img/0007.png" and hits[0]["class"] == CLASSES[labels[7]]
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert all(h["label"] == labels[7] for h in hits)  # well separated classes
    # a missing index is built (and saved) by search; the text output lists rank, row, id, label, class, score
    res = run("search", path, "--id", "img/0010.png", "-k", 3)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0].split() == ["rank", "row", "id", "label", "class", "score"] and len(lines) == 4
    assert lines[1].split()[:5] == ["1", "10", "img/0010.png", str(labels[10]), CLASSES[labels[10]]]
    assert FeatureStore.open(path).index_names() == ["default", "ivf"]
    queries = tmp_path / "q.npy"
    np.save(queries, x[[3, 4]])
    res = run("search", path, "--queries", queries, "-k", 2, "--json")
    hits = json.loads(res.stdout)["results"]
    assert [(h["query"], h["rank"]) for h in hits] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert hits[0]["row"] == 3 and hits[2]["row"] == 4
    res = run("info", path)
    assert "default (flat, ip, cosine, 300 rows)" in res.stdout
    assert run("verify", path).stdout.strip() == "ok"


def test_index_on_a_split(store):
    path, _, _ = store
    res = run("index", path, "--split", "base", "--kind", "hnsw", "--hnsw-m", 8, "--metric", "l2")
    assert res.returncode == 0, res.stderr
    res = run("search", path, "--row", 1, "-k", 10, "--json")
    rows = [h["row"] for h in json.loads(res.stdout)["results"]]
    assert len(rows) == 10 and all(r % 2 == 0 for r in rows)


def test_split_from_splits_rule_and_exclusion(tmp_path):
    path = tmp_path / "meta.zarr"
    labels = np.arange(40) % 4
    drawer = np.arange(40) // 4 + 1  # 1..10
    st = FeatureStore.create(path, Layout(n=40, dim=4, dtype="float32", chunk_rows=16), fingerprint={"m": 1},
                             classes=CLASSES, labels=labels, splits={"even": np.arange(0, 40, 2),
                                                                     "first": np.arange(10)},
                             meta={"drawer": drawer})
    st.close()
    res = run("split", path, "train", "--of", "even", "--rule", "drawer<=6", "--exclude", "first")
    assert res.returncode == 0, res.stderr
    expected = [r for r in range(40) if r % 2 == 0 and drawer[r] <= 6 and r >= 10]
    np.testing.assert_array_equal(FeatureStore.open(path).split("train"), expected)
    assert f"{len(expected)} rows of 2 classes" in res.stdout
    before = tree_hash(path)
    for args in (["train", "--rule", "drawer>=7"],  # exists already and no --overwrite
                 ["x", "--of", "nope"], ["x", "--rule", "drawer>99"], ["x", "--rule", "size<3"]):
        res = run("split", path, *args)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, (args, res.stderr)
    assert tree_hash(path) == before
    assert run("split", path, "train", "--rule", "drawer>=7", "--overwrite").returncode == 0
    np.testing.assert_array_equal(FeatureStore.open(path).split("train"), np.flatnonzero(drawer >= 7))
    assert run("split", path, "held", "--rule", "class>=2").returncode == 0  # "class": the row's label
    np.testing.assert_array_equal(FeatureStore.open(path).split("held"), np.flatnonzero(labels >= 2))


def test_export_import_round_trip(store, tmp_path):
    path, x, labels = store
    out = tmp_path / "feats.h5"
    res = run("export", path, "--hdf5", out)
    assert res.returncode == 0, res.stderr
    with h5py.File(out, "r") as h5:
        assert h5["all_feats"].dtype == np.float32 and h5["all_feats"].shape == (N, D)
        assert h5["all_labels"].dtype == np.int32 and h5["count"].dtype == np.int32
        assert h5["count"].shape == (1,) and int(h5["count"][0]) == N
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    back = tmp_path / "back.zarr"
    res = run("import", out, "--out", back, "--classes", classes)
    assert res.returncode == 0, res.stderr
    st = FeatureStore.open(back)
    assert st.complete and st.classes == CLASSES and st.ids[5] == "row/5"
    np.testing.assert_array_equal(st.load_features(), x)
    np.testing.assert_array_equal(st.labels, labels)
    assert st.fingerprint["model"] == "imported-hdf5" and st.fingerprint["dtype"] == "float32"
    assert st.fingerprint["source_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert run("verify", back).stdout.strip() == "ok"
    # a split exports only its rows
    res = run("export", path, "--hdf5", tmp_path / "base.h5", "--split", "base")
    with h5py.File(tmp_path / "base.h5", "r") as h5:
        np.testing.assert_array_equal(h5["all_feats"][:], x[::2])
        np.testing.assert_array_equal(h5["all_labels"][:], labels[::2])
    assert not list(tmp_path.glob(".*tmp*"))


def test_import_drops_padding_rows(tmp_path):
    rng = np.random.default_rng(1)
    count, padded = 61, 64  # the originals pad to a multiple of the batch with zero rows labelled 0
    feats = np.zeros((padded, 8), np.float32)
    feats[:count] = rng.random((count, 8), dtype=np.float32)
    labels = np.zeros(padded, np.int32)
    labels[:count] = rng.integers(1, 5, count)
    src = tmp_path / "orig.h5"
    with h5py.File(src, "w") as h5:
        h5["all_feats"], h5["all_labels"], h5["count"] = feats, labels, np.array([count], np.int32)
    res = run("import", src, "--out", tmp_path / "imp.zarr", "--dtype", "float16", "--chunk-rows", 16)
    assert res.returncode == 0, res.stderr
    assert "dropped 3 padding row" in res.stderr
    st = FeatureStore.open(tmp_path / "imp.zarr")
    assert st.n == count and st.layout.dtype == "float16" and st.classes == ["0", "1", "2", "3", "4"]
    np.testing.assert_array_equal(st.labels, labels[:count])
    np.testing.assert_allclose(st.load_features(), feats[:count], atol=1e-3)


def _bad_h5(path: Path, kind: str) -> Path:
    with h5py.File(path, "w") as h5:
        if kind == "missing":
            h5["all_feats"] = np.zeros((4, 2), np.float32)
        elif kind == "count":
            h5["all_feats"], h5["all_labels"] = np.zeros((4, 2), np.float32), np.zeros(4, np.int32)
            h5["count"] = np.array([9], np.int32)
        elif kind == "dims":
            h5["all_feats"], h5["all_labels"] = np.zeros(4, np.float32), np.zeros(4, np.int32)
            h5["count"] = np.array([4], np.int32)
    return path


def _v2(path: Path) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["featstore"]["format_version"] = 2
    (path / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("case", [
    "missing-store", "not-a-store", "version-2-info", "version-2-index", "version-2-search", "unknown-kind",
    "row-out-of-range", "unknown-id", "no-query", "unknown-split", "import-missing-datasets",
    "import-count-too-large", "import-wrong-dims", "import-not-hdf5", "import-over-other-store",
])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(tmp_path, case):
    path = tmp_path / "toy.zarr"
    make_store(path)
    other = tmp_path / "plain"
    other.mkdir()
    (other / "notes.txt").write_text("not a store")
    if case.startswith("version-2"):
        _v2(path)
    args = {
        "missing-store": ["info", tmp_path / "nowhere.zarr"],
        "not-a-store": ["verify", other],
        "version-2-info": ["info", path],
        "version-2-index": ["index", path],
        "version-2-search": ["search", path, "--row", 0],
        "unknown-kind": ["index", path, "--kind", "lsh"],
        "row-out-of-range": ["search", path, "--row", N],
        "unknown-id": ["search", path, "--id", "img/none.png"],
        "no-query": ["search", path],
        "unknown-split": ["index", path, "--split", "novel"],
        "import-missing-datasets": ["import", _bad_h5(other / "a.h5", "missing"), "--out", tmp_path / "n.zarr"],
        "import-count-too-large": ["import", _bad_h5(other / "b.h5", "count"), "--out", tmp_path / "n.zarr"],
        "import-wrong-dims": ["import", _bad_h5(other / "c.h5", "dims"), "--out", tmp_path / "n.zarr"],
        "import-not-hdf5": ["import", other / "notes.txt", "--out", tmp_path / "n.zarr"],
        "import-over-other-store": ["import", _bad_h5(other / "d.h5", "ok"), "--out", path],
    }[case]
    if case == "import-over-other-store":
        with h5py.File(other / "d.h5", "a") as h5:
            h5["all_feats"], h5["all_labels"] = np.ones((4, D), np.float32), np.zeros(4, np.int32)
            h5["count"] = np.array([4], np.int32)
    before = tree_hash(tmp_path)
    res = run(*args)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("featstore: error: "), res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert tree_hash(tmp_path) == before
    assert not (tmp_path / "n.zarr").exists()


def test_debug_shows_the_traceback(tmp_path):
    res = run("info", tmp_path / "nowhere.zarr", "--debug")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_every_command_has_help():
    res = run("--help")
    assert res.returncode == 0
    for command in ("info", "verify", "index", "search", "export", "import"):
        assert command in res.stdout
        sub = run(command, "--help")
        assert sub.returncode == 0 and "Usage:" in sub.stdout

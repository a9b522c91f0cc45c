"""FAISS indexes: exactness of flat search, recall of IVF / HNSW, save / load inside a store, staleness."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from featstore.errors import StoreLockedError, UserError
from featstore.index import (
    FeatureIndex,
    build_faiss,
    build_index,
    default_nlist,
    get_index,
    is_stale,
    load_index,
    save_index,
    search,
)
from featstore.store import FeatureStore, Layout


def make_store(path, x, *, labels=None, fingerprint=None, chunk_rows=64, done_chunks=None, splits=None):
    n, d = x.shape
    labels = np.arange(n) % 5 if labels is None else labels
    store = FeatureStore.create(path, Layout(n=n, dim=d, dtype="float32", chunk_rows=chunk_rows),
                                fingerprint=fingerprint or {"model": "test", "seed": 0},
                                classes=[f"c{i}" for i in range(int(labels.max()) + 1)], labels=labels,
                                ids=[f"s/{i}" for i in range(n)], splits=splits)
    try:
        for c in range(store.n_chunks) if done_chunks is None else done_chunks:
            lo, hi = store.chunk_range(c)
            store.write_chunk(c, x[lo:hi])
    finally:
        store.close()
    return path


def brute(x, q, k, metric):
    if metric == "ip":
        s = q @ x.T
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    else:
        s = (q * q).sum(1)[:, None] - 2 * q @ x.T + (x * x).sum(1)[None, :]
        order = np.argsort(s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order, s


def assert_same_neighbours(scores, rows, ref_scores, ref_rows, full, tol=1e-4):
    """Scores equal; rows equal except where two candidates tie within tol (then the scores must agree)."""
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=tol)
    mismatch = rows != ref_rows
    if mismatch.any():
        qi, _ = np.nonzero(mismatch)
        np.testing.assert_allclose(full[qi, rows[mismatch]], ref_scores[mismatch], atol=tol)


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def mixture(n, d, centers, seed, n_queries=500):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32) * 2.0
    lab = rng.integers(0, centers, n + n_queries)
    pts = (c[lab] + 0.5 * rng.standard_normal((n + n_queries, d))).astype(np.float32)
    return pts[:n], pts[n:]


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_equals_numpy_brute_force(metric):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 48)).astype(np.float32)
    q = rng.standard_normal((200, 48)).astype(np.float32)
    if metric == "ip":  # cosine: the callers pass normalised rows
        x, q = unit(x).astype(np.float32), unit(q).astype(np.float32)
    index = build_faiss(x, "flat", metric)
    scores, rows = search(index, q, 10)
    assert scores.dtype == np.float32 and rows.dtype == np.int64 and scores.shape == rows.shape == (200, 10)
    ref_scores, ref_rows, full = brute(x.astype(np.float64), q.astype(np.float64), 10, metric)
    assert_same_neighbours(scores, rows, ref_scores, ref_rows, full)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_feature_index_flat_matches_brute_force_on_store(tmp_path, metric):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((700, 24)).astype(np.float32)
    path = make_store(tmp_path / "s.zarr", x)
    fi = build_index(path, kind="flat", metric=metric)
    assert fi.normalized == (metric == "ip") and fi.rows is None and fi.ntotal == 700
    q = rng.standard_normal((30, 24)).astype(np.float32)
    scores, rows = fi.search(q, 7)
    xb, qb = (unit(x), unit(q)) if metric == "ip" else (x, q)
    ref_scores, ref_rows, full = brute(xb.astype(np.float64), qb.astype(np.float64), 7, metric)
    assert_same_neighbours(scores, rows, ref_scores, ref_rows, full)
    # k larger than the index is clipped
    assert fi.search(q[:1], 10_000)[1].shape == (1, 700)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_on_clustered_data(kind):
    x, q = mixture(20_000, 64, 100, seed=3)
    x, q = unit(x).astype(np.float32), unit(q).astype(np.float32)
    exact = build_faiss(x, "flat", "ip")
    _, truth = search(exact, q, 10)
    params = {"seed": 0} if kind == "ivf" else {"ef_construction": 100}
    approx = build_faiss(x, kind, "ip", **params)
    if kind == "ivf":
        assert approx.nlist == default_nlist(20_000) == 512  # 4 sqrt(n) = 566, capped at n // 39
    _, got = search(approx, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)])
    assert recall >= 0.9, recall


def test_ivf_is_reproducible_with_a_seed():
    x, q = mixture(4000, 16, 20, seed=4, n_queries=50)
    a = search(build_faiss(x, "ivf", "l2", nlist=40, nprobe=4, seed=7), q, 5)
    b = search(build_faiss(x, "ivf", "l2", nlist=40, nprobe=4, seed=7), q, 5)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


def test_bad_kind_and_metric():
    x = np.zeros((10, 4), np.float32)
    with pytest.raises(UserError, match="unknown index kind"):
        build_faiss(x, "lsh")
    with pytest.raises(UserError, match="unknown metric"):
        build_faiss(x, "flat", "cosine")


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, kind):
    x, q = mixture(2000, 32, 10, seed=5, n_queries=20)
    path = make_store(tmp_path / "s.zarr", x, chunk_rows=512)
    params = {"nlist": 20, "nprobe": 5, "seed": 1} if kind == "ivf" else {}
    if kind == "hnsw":
        params = {"hnsw_m": 16, "ef_search": 64, "ef_construction": 80}
    built = build_index(path, kind=kind, metric="l2", **params)
    save_index(path, built, name="main")
    store = FeatureStore.open(path)
    assert store.index_names() == ["main"]
    assert store.verify() == []
    loaded = load_index(store, "main")
    assert (loaded.kind, loaded.metric, loaded.normalized) == (kind, "l2", False)
    assert loaded.params == built.params and loaded.built_from == built.built_from
    if kind == "ivf":
        assert loaded.params == {"nlist": 20, "nprobe": 5, "seed": 1} and loaded.index.nprobe == 5
    if kind == "hnsw":
        assert loaded.index.hnsw.efSearch == 64
    assert not is_stale(store, loaded)
    s1, r1 = built.search(q, 5)
    s2, r2 = loaded.search(q, 5)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_allclose(s1, s2)
    # no temporary or old nodes left behind; a second save replaces the first
    save_index(path, build_index(path, kind="flat", metric="ip"), name="main")
    assert load_index(path, "main").kind == "flat"
    assert sorted(p.name for p in (tmp_path / "s.zarr" / "index").iterdir()) == ["main", "zarr.json"]
    assert not (tmp_path / "s.zarr" / ".featstore.lock").exists()  # the lock lives on zarr.json: no foreign file
    holder = FeatureStore.open(path)
    holder.acquire_lock()
    try:   # saving takes the writer lock
        with pytest.raises(StoreLockedError, match="being written by another process"):
            save_index(path, build_index(path, kind="flat", metric="ip"), name="main")
    finally:
        holder.release_lock()


def test_missing_index(tmp_path):
    path = make_store(tmp_path / "s.zarr", np.ones((10, 4), np.float32))
    with pytest.raises(UserError, match="featstore index"):
        load_index(path, "nope")
    with pytest.raises(UserError, match="featstore index"):
        get_index(path, "nope", rebuild=False)
    fi = get_index(path, "nope")
    assert isinstance(fi, FeatureIndex) and FeatureStore.open(path).index_names() == ["nope"]


def test_stale_after_store_replaced_at_same_path(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    path = tmp_path / "s.zarr"
    make_store(path, x)
    save_index(path, build_index(path), "default")
    saved = tmp_path / "saved_index"
    shutil.copytree(path / "index" / "default", saved)
    old = load_index(path)
    # another backbone's features at the same path, with the old index node carried over
    shutil.rmtree(path)
    y = rng.standard_normal((300, 8)).astype(np.float32)
    make_store(path, y, fingerprint={"model": "other", "seed": 0})
    shutil.copytree(saved, path / "index" / "default")
    store = FeatureStore.open(path)
    assert is_stale(store, old)
    assert is_stale(store, load_index(store))
    assert any("stale" in p for p in store.verify())
    with pytest.raises(UserError, match="cannot be used"):
        get_index(path, rebuild=False)
    fresh = get_index(path)
    assert not is_stale(path, fresh)
    assert fresh.built_from["fingerprint_hash"] == FeatureStore.open(path).fingerprint_hash
    _, rows = fresh.search(y[:5], 1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(5))
    reloaded = load_index(path)  # the rebuilt index was saved
    assert reloaded.built_from == fresh.built_from and FeatureStore.open(path).verify() == []


def test_done_only_index_goes_stale_when_more_rows_are_done(tmp_path):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((256, 8)).astype(np.float32)
    path = make_store(tmp_path / "s.zarr", x, chunk_rows=64, done_chunks=[0, 2])
    with pytest.raises(UserError, match="not complete"):
        build_index(path)
    part = build_index(path, done_only=True)
    np.testing.assert_array_equal(part.rows, np.r_[0:64, 128:192])
    save_index(path, part)
    _, rows = load_index(path).search(x[130:131], 1)
    assert rows[0, 0] == 130
    assert not is_stale(path, load_index(path))
    store = FeatureStore.create(path, Layout(n=256, dim=8, dtype="float32", chunk_rows=64),
                                fingerprint={"model": "test", "seed": 0}, classes=[])
    for c in (1, 3):
        lo, hi = store.chunk_range(c)
        store.write_chunk(c, x[lo:hi])
    # the writer still holds the lock: a rebuild is returned but cannot be saved yet
    assert is_stale(store, load_index(path))
    unsaved = get_index(path)
    assert unsaved.ntotal == 256 and load_index(path).ntotal == 128
    store.close()
    fresh = get_index(path)
    assert fresh.ntotal == 256 and fresh.rows is None
    _, rows = fresh.search(x[70:71], 1)
    assert rows[0, 0] == 70


def test_index_on_a_split_returns_only_split_rows(tmp_path):
    x, q = mixture(1000, 16, 10, seed=8, n_queries=40)
    split = np.arange(0, 1000, 3)
    path = make_store(tmp_path / "s.zarr", x, chunk_rows=256, splits={"base": split})
    fi = build_index(path, split="base", kind="flat", metric="ip")
    np.testing.assert_array_equal(fi.rows, split)
    assert fi.built_from["split"] == "base" and fi.built_from["rows"] == len(split)
    _, rows = fi.search(q, 10)
    assert np.isin(rows, split).all()
    _, rows = fi.search(x[split[:20]], 1)
    np.testing.assert_array_equal(rows[:, 0], split[:20])  # a split row finds itself
    save_index(path, fi, "base")
    loaded = load_index(path, "base")
    np.testing.assert_array_equal(loaded.rows, split)
    np.testing.assert_array_equal(loaded.search(q, 10)[1], fi.search(q, 10)[1])
    # changing the split makes the index stale; get_index rebuilds it over the new split
    store = FeatureStore.open(path)
    store.add_split("base", np.arange(0, 1000, 2), overwrite=True)
    assert is_stale(path, loaded)
    rebuilt = get_index(path, "base")
    np.testing.assert_array_equal(rebuilt.rows, np.arange(0, 1000, 2))
    with pytest.raises(UserError, match="no split"):
        build_index(path, split="nope")


def test_save_refuses_an_index_of_another_store(tmp_path):
    x = np.random.default_rng(9).standard_normal((50, 4)).astype(np.float32)
    a = make_store(tmp_path / "a.zarr", x)
    b = make_store(tmp_path / "b.zarr", x)
    with pytest.raises(UserError, match="other features"):
        save_index(b, build_index(a))
    assert FeatureStore.open(b).index_names() == []

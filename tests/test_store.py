import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr

from featstore.errors import UserError
from featstore.store import FeatureStore, Layout, fingerprint_hash

FP = {"model": "test", "checkpoint_sha256": "abc", "transform": {"size": 32}}


def make_store(path, n=1000, dim=16, chunk_rows=128, dtype="float16", compression="none", seed=0, write=True,
               **kwargs):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(dtype)
    labels = rng.integers(0, 5, n)
    layout = Layout(n=n, dim=dim, dtype=dtype, chunk_rows=chunk_rows, compression=compression,
                    shard_rows=kwargs.pop("shard_rows", None))
    store = FeatureStore.create(path, layout, fingerprint=kwargs.pop("fingerprint", FP),
                                classes=[f"c{i}" for i in range(5)], labels=labels,
                                ids=[f"s{i}" for i in range(n)], **kwargs)
    if write:
        for c in range(store.n_chunks):
            lo, hi = store.chunk_range(c)
            store.write_chunk(c, x[lo:hi])
    return store, x, labels


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("compression", ["none", "lz4", "zstd"])
def test_round_trip(tmp_path, dtype, compression):
    store, x, labels = make_store(tmp_path / "s.zarr", dtype=dtype, compression=compression,
                                  splits={"train": np.arange(0, 1000, 2)}, meta={"drawer": np.arange(1000) % 20})
    store.close()
    r = FeatureStore.open(tmp_path / "s.zarr")
    assert r.complete
    np.testing.assert_array_equal(r.load_features(dtype=dtype), x)
    np.testing.assert_array_equal(r.labels, labels)
    assert list(r.ids[:3]) == ["s0", "s1", "s2"]
    assert r.classes == [f"c{i}" for i in range(5)]
    np.testing.assert_array_equal(r.split("train"), np.arange(0, 1000, 2))
    np.testing.assert_array_equal(r.meta("drawer"), np.arange(1000) % 20)
    rows = np.random.default_rng(1).integers(0, 1000, 300)
    np.testing.assert_array_equal(r.gather(rows, dtype=dtype), x[rows])
    assert r.verify() == []


def test_sharded_store_reads_the_same(tmp_path):
    store, x, _ = make_store(tmp_path / "s.zarr", chunk_rows=100, shard_rows=400)
    r = FeatureStore.open(store.path)
    np.testing.assert_array_equal(r.load_features(dtype="float16"), x)
    rows = np.array([999, 0, 401, 401, 57])
    np.testing.assert_array_equal(r.gather(rows, dtype="float16"), x[rows])


def test_plain_zarr_reads_the_store_without_featstore(tmp_path):
    store, x, labels = make_store(tmp_path / "s.zarr")
    code = textwrap.dedent(f"""
        import json, numpy as np, zarr
        g = zarr.open_group({str(store.path)!r}, mode="r")
        total = float(np.asarray(g["features"][:], dtype="f8").sum())
        print(json.dumps({{"shape": list(g["features"].shape), "sum": total,
                          "labels": int(g["labels"][:].sum()), "done": bool(g["done"][:].all()),
                          "id": str(g["ids"][5]), "version": g.attrs["featstore"]["format_version"]}}))
    """)
    out = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert out["shape"] == [1000, 16]
    assert out["sum"] == pytest.approx(float(x.astype("f8").sum()))
    assert out["labels"] == int(labels.sum()) and out["done"] and out["id"] == "s5" and out["version"] == 1


def test_readers_see_only_done_chunks(tmp_path):
    store, x, _ = make_store(tmp_path / "s.zarr", write=False)
    for c in (0, 2):
        lo, hi = store.chunk_range(c)
        store.write_chunk(c, x[lo:hi])
    r = FeatureStore.open(store.path)
    assert not r.complete
    mask = r.done_rows()
    assert mask.sum() == 256 and mask[:128].all() and mask[256:384].all()
    with pytest.raises(UserError, match="not complete"):
        r.load_features()
    with pytest.raises(UserError, match="not done"):
        r.gather(np.array([130]))
    np.testing.assert_array_equal(r.gather(np.flatnonzero(mask), dtype="float16"), x[mask])
    assert any("not done" in p for p in r.verify())


def test_fingerprint_mismatch_is_refused_and_store_unchanged(tmp_path):
    store, x, _ = make_store(tmp_path / "s.zarr")
    store.close()
    before = (tmp_path / "s.zarr" / "zarr.json").read_bytes()
    layout = Layout(n=1000, dim=16, chunk_rows=128)
    with pytest.raises(UserError, match=r"another fingerprint \(checkpoint_sha256 \('abc' vs 'def'\)\)"):
        FeatureStore.create(tmp_path / "s.zarr", layout, fingerprint={**FP, "checkpoint_sha256": "def"},
                            classes=["a"])
    with pytest.raises(UserError, match="another layout"):
        FeatureStore.create(tmp_path / "s.zarr", Layout(n=1000, dim=16, chunk_rows=64), fingerprint=FP,
                            classes=["a"])
    assert (tmp_path / "s.zarr" / "zarr.json").read_bytes() == before
    np.testing.assert_array_equal(FeatureStore.open(tmp_path / "s.zarr").load_features(dtype="float16"), x)


def test_second_writer_is_refused(tmp_path):
    store, _, _ = make_store(tmp_path / "s.zarr", write=False)
    code = textwrap.dedent(f"""
        from featstore.store import FeatureStore, Layout
        from featstore.errors import UserError
        try:
            FeatureStore.create({str(store.path)!r}, Layout(n=1000, dim=16, chunk_rows=128), fingerprint={FP!r},
                                classes=[])
        except UserError as e:
            print("refused:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.startswith("refused:") and "being written by another process" in out
    store.close()  # the lock goes with the writer; now a second writer may resume
    again = FeatureStore.create(store.path, Layout(n=1000, dim=16, chunk_rows=128), fingerprint=FP, classes=[])
    again.close()


def test_other_format_version_is_refused(tmp_path):
    store, _, _ = make_store(tmp_path / "s.zarr")
    store.close()
    meta_path = tmp_path / "s.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["featstore"]["format_version"] = 2
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="format version 2"):
        FeatureStore.open(tmp_path / "s.zarr")


def test_not_a_store(tmp_path):
    with pytest.raises(UserError, match="no store"):
        FeatureStore.open(tmp_path / "missing.zarr")
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="not a Zarr"):
        FeatureStore.open(tmp_path / "folder")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(UserError, match="not a featstore store"):
        FeatureStore.open(tmp_path / "plain.zarr")


def test_failed_creation_leaves_nothing(tmp_path):
    layout = Layout(n=10, dim=4, chunk_rows=4)
    with pytest.raises(UserError, match="ids are not unique"):
        FeatureStore.create(tmp_path / "s.zarr", layout, fingerprint=FP, classes=["a"], ids=["x"] * 10)
    assert list(tmp_path.iterdir()) == []


def test_add_split_is_atomic_and_replaces(tmp_path):
    store, _, _ = make_store(tmp_path / "s.zarr")
    store.add_split("novel", [5, 1, 3])
    with pytest.raises(UserError, match="already has"):
        store.add_split("novel", [1])
    store.add_split("novel", [7], overwrite=True)
    r = FeatureStore.open(store.path)
    np.testing.assert_array_equal(r.split("novel"), [7])
    assert not [p for p in (tmp_path / "s.zarr" / "splits").iterdir() if p.name.startswith(".")]
    with pytest.raises(UserError, match="outside"):
        store.add_split("bad", [1000])


def test_fingerprint_hash_is_canonical():
    assert fingerprint_hash({"a": 1, "b": [1, 2]}) == fingerprint_hash({"b": [1, 2], "a": 1})
    assert fingerprint_hash({"a": 1}) != fingerprint_hash({"a": 2})


def test_concurrent_reader_during_write(tmp_path):
    """A reader polling while another process writes only ever sees fully written, done chunks."""
    path = tmp_path / "s.zarr"
    writer = textwrap.dedent(f"""
        import time, numpy as np
        from featstore.store import FeatureStore, Layout
        n, d = 4000, 32
        s = FeatureStore.create({str(path)!r}, Layout(n=n, dim=d, chunk_rows=250), fingerprint={{"model": "w"}},
                                classes=["a"], labels=np.zeros(n, int), ids=[str(i) for i in range(n)])
        for c in range(s.n_chunks):
            lo, hi = s.chunk_range(c)
            s.write_chunk(c, np.full((hi - lo, d), c + 1, dtype="float16"))
            time.sleep(0.03)
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer])
    seen = set()
    try:
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:
            if not (path / "zarr.json").exists():
                time.sleep(0.01)
                continue
            r = FeatureStore.open(path)
            rows = np.flatnonzero(r.done_rows())
            if len(rows):
                x = r.gather(rows, dtype="float16")
                expected = (rows // 250 + 1).astype("float16")
                assert (x == expected[:, None]).all()
                seen.add(len(rows))
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert len(seen) >= 2  # the reader really saw the store grow
    assert FeatureStore.open(path).complete


def make_maps_store(path, n=300, chunk_rows=64, shape=(4, 3, 3), done=None):
    rng = np.random.default_rng(3)
    maps = rng.standard_normal((n, *shape)).astype(np.float16)
    store = FeatureStore.create(path, Layout(n=n, dim=8, chunk_rows=chunk_rows, maps_shape=shape), fingerprint=FP,
                                classes=["c0"], labels=np.zeros(n, dtype=np.int64), ids=[f"s{i}" for i in range(n)])
    for c in range(store.n_chunks) if done is None else done:
        lo, hi = store.chunk_range(c)
        store.write_chunk(c, np.zeros((hi - lo, 8), dtype=np.float16), maps=maps[lo:hi])
    return store, maps


def test_gather_maps_equals_a_full_read(tmp_path):
    store, maps = make_maps_store(tmp_path / "m.zarr")
    full = store.load_maps()
    np.testing.assert_array_equal(full, maps.astype(np.float32))
    rows = np.random.default_rng(0).permutation(300)[:90]       # across all chunks, in random order
    rows = np.concatenate([rows, rows[:5]])                      # with repeats
    got = store.gather_maps(rows)
    assert got.shape == (95, 4, 3, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, full[rows])
    np.testing.assert_array_equal(store.load_maps(rows, dtype="float16"), maps[rows])
    assert store.gather_maps(np.array([], dtype=np.int64)).shape == (0, 4, 3, 3)


def test_gather_maps_reads_only_the_chunks_it_needs(tmp_path, monkeypatch):
    store, maps = make_maps_store(tmp_path / "m.zarr")
    arr = store._array("maps")
    reads = []
    cls = type(arr)
    real = cls.__getitem__
    monkeypatch.setattr(cls, "__getitem__",
                        lambda self, key: (self is arr and reads.append(key)) or real(self, key))
    np.testing.assert_array_equal(store.gather_maps([130, 5, 129]), maps[[130, 5, 129]].astype(np.float32))
    block = arr.chunks[0]
    assert len(reads) == len({130 // block, 5 // block})
    assert all(k.stop - k.start <= block for k in (key[0] if isinstance(key, tuple) else key for key in reads))


def test_maps_of_undone_chunks_are_refused(tmp_path):
    store, maps = make_maps_store(tmp_path / "m.zarr", done=[0, 2])   # chunk 1 (rows 64..127) not written
    np.testing.assert_array_equal(store.gather_maps([0, 140]), maps[[0, 140]].astype(np.float32))
    with pytest.raises(UserError, match=r"row 70 .* chunk 1.*extract --maps") as info:
        store.gather_maps([0, 70])
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"chunk 1 is not done.*extract --maps"):
        store.load_maps()
    with pytest.raises(UserError, match="chunk 1"):
        store.load_maps(np.array([100]))
    assert store.gather_maps([70], require_done=False).shape == (1, 4, 3, 3)


def test_a_store_without_maps_names_extract_maps(tmp_path):
    store, _, _ = make_store(tmp_path / "s.zarr", n=50)
    for call in (lambda: store.gather_maps([0]), store.load_maps, lambda: store.load_maps([1])):
        with pytest.raises(UserError, match="has no maps.*extract --maps") as info:
            call()
        assert "\n" not in str(info.value)


def test_busy_writer_lock_is_its_own_error_class(tmp_path):
    from featstore.errors import StoreLockedError

    store, _, _ = make_store(tmp_path / "s.zarr", n=50)   # holds the writer lock
    other = FeatureStore.open(store.path)
    with pytest.raises(StoreLockedError, match="being written by another process"):
        other.acquire_lock()
    store.close()
    other.acquire_lock()
    other.close()


def test_unknown_rule_field_is_its_own_error_class(tmp_path):
    from featstore.errors import UnknownFieldError
    from featstore.rules import rule_mask

    store, _, _ = make_store(tmp_path / "s.zarr", n=50, meta={"drawer": np.arange(50) % 20})
    with pytest.raises(UnknownFieldError, match=r"no per-sample field 'colour'.*\(it has: class, drawer\)"):
        rule_mask(store, "colour<3")
    assert rule_mask(store, "drawer<=4").sum() == 15

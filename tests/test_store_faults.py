"""A damaged or interrupted store: missing, truncated and changed chunks, corrupt metadata, kills while a node is
replaced, the writer lock (every node writer, forked children, kill -9), plain Zarr without warnings, read-only
stores, and head caches that do not load. Each damage is checked against what was written."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from featstore import store as store_module
from featstore.cli import cli
from featstore.errors import CorruptStoreError, ReadOnlyStoreError, StoreLockedError, UserError
from featstore.index import build_index, load_index, save_index
from featstore.store import FeatureStore, Layout

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
N, D, CR = 300, 8, 128
FP = {"model": "faults"}


def make(path, *, compression="none", checksum=True, shard_rows=None, done=None, dtype="float32"):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D)).astype(dtype)
    store = FeatureStore.create(path, Layout(n=N, dim=D, dtype=dtype, chunk_rows=CR, compression=compression,
                                             shard_rows=shard_rows),
                                fingerprint=FP, classes=["a", "b", "c"], labels=np.arange(N) % 3,
                                ids=[f"s{i}" for i in range(N)], splits={"base": np.arange(0, N, 2)},
                                meta={"drawer": np.arange(N) % 7}, checksum=checksum)
    try:
        for c in range(store.n_chunks) if done is None else done:
            lo, hi = store.chunk_range(c)
            store.write_chunk(c, x[lo:hi])
    finally:
        store.close()
    return Path(path), x


def chunk_file(path: Path, array: str, chunk: int) -> Path:
    st = FeatureStore.open(path)
    coords = (chunk,) + (0,) * (st.group[array].ndim - 1)
    return path / array / st.group[array].metadata.encode_chunk_key(coords)


def flip(path: Path, offset: int = 17) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x5A
    path.write_bytes(bytes(data))


def verify_cli(path):
    res = CliRunner().invoke(cli, ["verify", str(path)])
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, [line for line in res.output.splitlines() if line.strip()]


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "featstore.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def one_line_error(res):
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    return res.returncode == 2 and len(lines) == 1 and lines[0].startswith("featstore: error: ") and \
        "Traceback" not in res.stderr


# ---------------------------------------------------------------------------------------------------- chunks
@pytest.mark.parametrize("layout", ["raw", "raw-no-checksum", "zstd", "sharded"])
def test_a_deleted_done_chunk_is_an_error_never_zeros(tmp_path, layout):
    kw = {"raw": {}, "raw-no-checksum": {"checksum": False}, "zstd": {"compression": "zstd"},
          "sharded": {"shard_rows": 2 * CR, "checksum": True}}[layout]
    path, x = make(tmp_path / "s.zarr", **kw)
    fresh = FeatureStore.open(path)
    np.testing.assert_array_equal(fresh.load_features(), x)
    chunk_file(path, "features", 1).unlink()   # sharded: shard 1 holds chunk 2
    st = FeatureStore.open(path)
    with pytest.raises(CorruptStoreError, match="missing"):
        st.load_features()
    rows = np.array([0, 140, 290]) if layout != "sharded" else np.array([0, 290])
    with pytest.raises(CorruptStoreError, match="missing"):
        st.gather(rows)
    np.testing.assert_array_equal(st.gather(np.array([0, 5])), x[[0, 5]])   # other chunks still read
    code, lines = verify_cli(path)
    assert code == 1 and len(lines) == 1 and "missing" in lines[0], lines


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_changed_bytes_fail_the_checksum_in_featstore_and_in_plain_zarr(tmp_path, compression):
    path, x = make(tmp_path / "s.zarr", compression=compression)
    assert FeatureStore.open(path).has_checksums
    flip(chunk_file(path, "features", 1), 40)
    st = FeatureStore.open(path)
    with pytest.raises(CorruptStoreError, match="crc32c"):
        st.load_features()
    with pytest.raises(CorruptStoreError, match="crc32c"):
        st.gather(np.array([200]))
    np.testing.assert_array_equal(st.gather(np.array([3, 299])), x[[3, 299]])
    with pytest.raises(ValueError, match="checksum"):   # plain zarr checks the same codec
        zarr.open_group(str(path), mode="r")["features"][:]
    code, lines = verify_cli(path)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("chunk 1 of features") or \
        lines[0].startswith("rows 128..255 of features"), lines
    assert "crc32c checksum" in lines[0], lines


def test_changed_labels_and_split_bytes_are_listed_one_line_each(tmp_path):
    path, _ = make(tmp_path / "s.zarr")
    flip(chunk_file(path, "labels", 0), 3)
    flip([p for p in (path / "splits" / "base").rglob("*") if p.is_file() and p.name != "zarr.json"][0], 5)
    code, lines = verify_cli(path)
    assert code == 1 and len(lines) == 2, lines
    assert lines[0].startswith("rows 0..127 of labels") and "crc32c" in lines[0], lines
    assert "splits/base" in lines[1] and "checksum" in lines[1], lines


def test_store_without_checksums_still_reads_and_verify_says_so(tmp_path):
    """A store as featstore wrote it before checksums: features chunks without crc32c, a lock file inside."""
    path, x = make(tmp_path / "old.zarr", checksum=False)
    (path / ".featstore.lock").write_text("12345")
    meta = json.loads((path / "features" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes"]
    st = FeatureStore.open(path)
    assert not st.has_checksums
    np.testing.assert_array_equal(st.load_features(), x)
    rows = np.array([299, 0, 130])
    np.testing.assert_array_equal(st.gather(rows), x[rows])
    code, lines = verify_cli(path)
    assert code == 0 and lines[0].startswith("ok (this store has no chunk checksums"), lines
    # a writer of the old store removes the lock file Zarr does not know, and later writes work
    st.add_split("odd", np.arange(1, N, 2))
    assert not (path / ".featstore.lock").exists()
    assert FeatureStore.open(path).split("odd").tolist() == list(range(1, N, 2))


def test_an_old_writer_holding_the_lock_file_inside_is_respected(tmp_path):
    path, _ = make(tmp_path / "old.zarr", checksum=False)
    fd = os.open(path / ".featstore.lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(StoreLockedError, match="pid 4242"):
            FeatureStore.open(path).add_split("x", [1, 2])
    finally:
        os.close(fd)
    assert "x" not in FeatureStore.open(path).split_names


# ---------------------------------------------------------------------------------------------------- verify
DAMAGES = ["truncate-chunk", "empty-chunk", "garbage-chunk", "delete-labels-chunk", "root-json", "features-json",
           "split-json", "index-json", "delete-ids-chunk", "flip-index", "delete-done-flag", "attrs-missing-key"]


def damage(path: Path, kind: str) -> None:
    if kind == "truncate-chunk":
        os.truncate(chunk_file(path, "features", 2), 100)
    elif kind == "empty-chunk":
        os.truncate(chunk_file(path, "features", 0), 0)
    elif kind == "garbage-chunk":
        chunk_file(path, "features", 1).write_bytes(os.urandom(5000))
    elif kind == "delete-labels-chunk":
        chunk_file(path, "labels", 1).unlink()
    elif kind == "delete-ids-chunk":
        chunk_file(path, "ids", 0).unlink()
    elif kind == "root-json":
        (path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gr')
    elif kind == "features-json":
        (path / "features" / "zarr.json").write_text("{not json")
    elif kind == "split-json":
        (path / "splits" / "base" / "zarr.json").write_text("[]")
    elif kind == "index-json":
        (path / "index" / "default" / "zarr.json").write_bytes(b"\xff\xfe")
    elif kind == "flip-index":
        flip([p for p in (path / "index" / "default").rglob("*") if p.is_file() and p.name != "zarr.json"][0])
    elif kind == "delete-done-flag":
        (path / "done" / "c" / "1").unlink()
    elif kind == "attrs-missing-key":
        meta = json.loads((path / "zarr.json").read_text())
        del meta["attributes"]["featstore"]["layout"]
        (path / "zarr.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    path, x = make(tmp_path_factory.mktemp("idx") / "s.zarr")
    save_index(path, build_index(path, kind="flat", metric="l2"), "default")
    return path, x


@pytest.mark.parametrize("kind", DAMAGES)
def test_verify_lists_what_is_broken_and_never_crashes(tmp_path, indexed, kind):
    import shutil

    path = tmp_path / "s.zarr"
    shutil.copytree(indexed[0], path)
    damage(path, kind)
    res = run_cli("verify", path)
    assert "Traceback" not in res.stderr and res.stderr == "", res.stderr
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    assert res.returncode == 1 and lines, (res.returncode, res.stdout)
    assert all(len(line) < 400 for line in lines)
    row = {"truncate-chunk": 260, "garbage-chunk": 130}.get(kind, 0)   # a row of the damaged chunk
    for args in (["info", path], ["search", path, "--row", row], ["index", path, "--name", "other"]):
        other = run_cli(*args)
        assert other.returncode in (0, 2) and "Traceback" not in other.stderr, (args, other.stderr)
        assert other.returncode == 0 or one_line_error(other), (args, other.stderr)
    if kind in ("truncate-chunk", "empty-chunk", "garbage-chunk", "root-json", "features-json"):
        assert one_line_error(run_cli("search", path, "--row", row))


@pytest.mark.parametrize("seed", range(48))
def test_random_damage_to_any_file_is_reported_or_harmless(tmp_path, indexed, seed):
    """Any one store file truncated, emptied, replaced by random bytes, deleted or with a flipped byte: verify
    returns (never raises), and reads either give exactly what was written or raise UserError."""
    import shutil

    rng = np.random.default_rng(seed)
    path = tmp_path / "s.zarr"
    shutil.copytree(indexed[0], path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    target = files[rng.integers(len(files))]
    how = ["truncate", "empty", "random", "delete", "flip"][rng.integers(5)]
    data = target.read_bytes()
    if how == "truncate":
        target.write_bytes(data[: rng.integers(max(1, len(data)))])
    elif how == "empty":
        target.write_bytes(b"")
    elif how == "random":
        target.write_bytes(rng.bytes(max(1, len(data))))
    elif how == "delete":
        target.unlink()
    elif data:
        flip(target, int(rng.integers(len(data))))
    try:
        st = FeatureStore.open(path, check_metadata=False)
    except UserError:
        return
    problems = st.verify()
    assert isinstance(problems, list)
    rel = target.relative_to(path).as_posix()
    data_chunk = rel.split("/")[0] in ("features", "labels", "ids") and "/c/" in f"/{rel}" and how != "flip" or \
        (rel.startswith("features/c/") and how == "flip")
    if data_chunk:
        assert problems, (rel, how)
    try:
        x = FeatureStore.open(path).load_features()
    except UserError:
        return
    np.testing.assert_array_equal(x, indexed[1])


# ---------------------------------------------------------------------------------------------------- nodes
KILL = textwrap.dedent("""
    import os, sys
    import numpy as np
    from featstore import store as sm
    from featstore.index import build_index, save_index
    path, at, when, exchange = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    calls = [0]
    real_rename, real_exchange = os.rename, getattr(sm, "_exchange", None)

    def counted(fn):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == at and when == "before":
                os._exit(137)
            out = fn(*args, **kwargs)
            if calls[0] == at and when == "after":
                os._exit(137)
            return out
        return wrapper

    os.rename = counted(real_rename)
    if real_exchange is not None:
        sm._exchange = counted(real_exchange) if exchange == "yes" else counted(lambda a, b: False)
    if sys.argv[5] == "index":
        save_index(path, build_index(path, kind="flat", metric="ip", split="base"), "default")
    else:
        sm.FeatureStore.open(path).add_split("base", np.arange(0, 30), overwrite=True)
""")


def _hidden(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for group in ("splits", "index") for p in (path / group).iterdir()
                  if p.name.startswith(".") and p.name != ".zarr.json")


@pytest.mark.parametrize("node", ["index", "split"])
@pytest.mark.parametrize("at,when", [(1, "before"), (1, "after"), (2, "before"), (2, "after")])
def test_a_kill_while_replacing_a_node_leaves_the_old_or_the_new_one(tmp_path, node, at, when):
    path, _ = make(tmp_path / "s.zarr")
    save_index(path, build_index(path, kind="flat", metric="l2"), "default")   # the old index: all rows, l2
    res = subprocess.run([sys.executable, "-c", KILL, str(path), str(at), when, "yes", node], env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode in (0, 137), res.stderr
    st = FeatureStore.open(path)
    if node == "index":
        loaded = load_index(st, "default")
        assert (loaded.ntotal, loaded.metric) in ((N, "l2"), (N // 2, "ip"))   # old or new, nothing else
    else:
        assert st.split("base").tolist() in (list(range(0, N, 2)), list(range(30)))
    assert st.verify() == [], st.verify()
    assert not any(name.startswith(".") for name in st.split_names + st.index_names())
    # the next writer removes what the killed one left, and writes
    st.add_split("later", np.arange(5))
    assert _hidden(path) == []
    assert FeatureStore.open(path).verify() == []


def test_without_an_atomic_exchange_a_kill_between_renames_is_reported_and_undone(tmp_path):
    path, _ = make(tmp_path / "s.zarr")
    save_index(path, build_index(path, kind="flat", metric="l2"), "default")
    res = subprocess.run([sys.executable, "-c", KILL, str(path), "2", "after", "no", "index"], env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 137, res.stderr
    st = FeatureStore.open(path)
    problems = st.verify()
    assert len(problems) == 1 and problems[0].startswith("index/default is missing"), problems
    code, lines = verify_cli(path)
    assert code == 1 and lines == problems
    st.acquire_lock()   # any writer puts the previous node back
    st.release_lock()
    assert load_index(path, "default").ntotal == N and FeatureStore.open(path).verify() == []
    assert _hidden(path) == []


def test_the_next_writer_cleans_leftovers_but_not_a_live_build(tmp_path):
    path, _ = make(tmp_path / "s.zarr")
    for leftover in ("splits/.base.tmp-0000", "index/.gone.old-1111", "splits/.base.old-2222", ".cache.tmp-3333"):
        (path / leftover).mkdir(parents=True)
        (path / leftover / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    dead = tmp_path / ".s.zarr.tmp-dead"
    live = tmp_path / ".s.zarr.tmp-live"
    for build in (dead, live):
        build.mkdir()
        (build / "zarr.json").write_text("{}")
    fd = os.open(live / "zarr.json", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        st = FeatureStore.open(path)
        st.acquire_lock()
        st.release_lock()
        assert not dead.exists() and live.exists()
    finally:
        os.close(fd)
    assert _hidden(path) == [] and not (path / ".cache.tmp-3333").exists()
    assert (path / "index" / "gone").is_dir()      # moved aside with no node under its name: put back
    assert FeatureStore.open(path).split("base").tolist() == list(range(0, N, 2))


# ---------------------------------------------------------------------------------------------------- locking
def test_every_node_writer_takes_the_writer_lock(tmp_path):
    path, _ = make(tmp_path / "s.zarr", done=[0])
    writer = FeatureStore.create(path, Layout(n=N, dim=D, dtype="float32", chunk_rows=CR), fingerprint=FP,
                                 classes=["a", "b", "c"])       # an extraction resuming: holds the lock
    try:
        with pytest.raises(StoreLockedError):
            FeatureStore.open(path).add_split("picked", [1, 2, 3])
        res = run_cli("split", path, "picked", "--of", "base")
        assert one_line_error(res) and "being written by another process" in res.stderr, res.stderr
        assert "picked" not in FeatureStore.open(path).split_names
    finally:
        writer.close()
    assert run_cli("split", path, "picked", "--of", "base").returncode == 0


def test_two_processes_adding_the_same_split(tmp_path):
    path, _ = make(tmp_path / "s.zarr")
    for overwrite in ([], ["--overwrite"]):
        name = f"picked{len(overwrite)}"
        procs = [subprocess.Popen([sys.executable, "-m", "featstore.cli", "split", str(path), name, "--of", "base",
                                   *overwrite], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
        codes = sorted(code for code, _ in results)
        assert codes == ([0, 0] if overwrite else [0, 2]), results
        assert all("Traceback" not in err for _, err in results)
        if not overwrite:
            assert any("already has a split" in err for _, err in results)
        st = FeatureStore.open(path)
        assert st.split(name).tolist() == list(range(0, N, 2))
        assert not any(n.startswith(".") for n in st.split_names) and _hidden(path) == []


HOLD = textwrap.dedent("""
    import multiprocessing, os, sys, time
    from featstore.store import FeatureStore
    st = FeatureStore.open(sys.argv[1])
    st.acquire_lock()
    if sys.argv[2] == "fork":
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
    else:
        proc = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,), daemon=False)
        proc.start()
        child = proc.pid
    print(child, flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("how", ["fork", "multiprocessing"])
def test_the_lock_dies_with_its_writer_even_when_forked_children_live_on(tmp_path, how):
    path, _ = make(tmp_path / "s.zarr")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path), how], env=ENV, stdout=subprocess.PIPE,
                              text=True)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid}"):
            FeatureStore.open(path).acquire_lock()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        os.kill(child, 0)                   # the forked child is still alive
        st = FeatureStore.open(path)
        st.acquire_lock()                   # ... and the lock is free at once
        st.release_lock()
    finally:
        for pid in (child,):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_plain_zarr_reads_every_node_without_a_warning(tmp_path):
    path, x = make(tmp_path / "s.zarr")
    save_index(path, build_index(path, kind="flat"), "default")
    st = FeatureStore.open(path)
    st.write_blob("cache", "thing", b"abc" * 10, {"key": "k"})
    st.acquire_lock()   # held while plain zarr reads
    try:
        code = textwrap.dedent(f"""
            import warnings, numpy as np, zarr
            warnings.simplefilter("error")
            g = zarr.open_group({str(path)!r}, mode="r")
            names = sorted(name for name, _ in g.members(max_depth=None))
            total = float(np.asarray(g["features"][:], dtype="f8").sum())
            print(len(names), total, bytes(g["cache/thing"][:]).decode())
        """)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    finally:
        st.release_lock()
    assert res.returncode == 0 and res.stderr == "", res.stderr
    count, total, blob = res.stdout.split()
    assert float(total) == pytest.approx(float(x.astype("f8").sum())) and blob == "abc" * 10
    assert sorted(p.name for p in path.iterdir() if p.name.startswith(".")) == []


# ---------------------------------------------------------------------------------------------------- read-only
def test_search_on_a_store_whose_lock_cannot_be_opened_searches_in_memory(tmp_path, monkeypatch):
    path, x = make(tmp_path / "s.zarr")
    for err in (errno.EROFS, errno.EACCES):
        def refuse(folder, err=err):
            raise OSError(err, os.strerror(err), str(folder))

        monkeypatch.setattr(store_module, "_open_lock_file", refuse)
        with pytest.raises(ReadOnlyStoreError):
            FeatureStore.open(path).acquire_lock()
        res = CliRunner().invoke(cli, ["search", str(path), "--row", "7", "-k", "3", "--json"])
        assert res.exit_code == 0, res.output
        found = json.loads(res.stdout)["results"]
        assert found[0]["row"] == 7 and len(found) == 3
    assert FeatureStore.open(path).index_names() == []


def test_search_on_a_read_only_mount(tmp_path):
    (tmp_path / "src").mkdir()
    make(tmp_path / "src" / "s.zarr")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "--bind", str(tmp_path / "src"), str(mnt)], capture_output=True).returncode:
        pytest.skip("no bind mounts here")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], capture_output=True).returncode:
            pytest.skip("no read-only remounts here")
        res = run_cli("search", mnt / "s.zarr", "--row", "3", "-k", "2")
        assert res.returncode == 0 and "not saved" in res.stderr, res.stderr
        assert one_line_error(run_cli("split", mnt / "s.zarr", "x", "--of", "base"))
        assert run_cli("verify", mnt / "s.zarr").returncode == 0
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ---------------------------------------------------------------------------------------------------- head caches
def test_a_head_cache_that_does_not_load_is_reported_and_rebuilt(tmp_path):
    pytest.importorskip("heads.matching")
    import torch

    from bench import lowshot as ls

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    classes, drawers, dim = 12, 12, 16
    centres = rng.standard_normal((classes, dim)).astype(np.float32) * 1.2
    labels = np.repeat(np.arange(classes), drawers)
    feats = np.maximum(centres[labels] + rng.standard_normal((len(labels), dim)).astype(np.float32), 0)
    st = FeatureStore.create(tmp_path / "s.zarr", Layout(n=len(labels), dim=dim, dtype="float32", chunk_rows=64),
                             fingerprint={"model": "cache"}, classes=[f"c{i}" for i in range(classes)],
                             labels=labels, ids=[f"s{i}" for i in range(len(labels))],
                             meta={"drawer": np.tile(np.arange(1, drawers + 1), classes)})
    for c in range(st.n_chunks):
        lo, hi = st.chunk_range(c)
        st.write_chunk(c, feats[lo:hi])
    st.close()
    cfg = ls.LowShotConfig(store=str(st.path), out=str(tmp_path / "a"), threads=1,
                           quiet=True, heads=("mn",), n="1", experiments=1, setup="all", train_rule="drawer<=9",
                           test_rule="drawer>=10", head_options=("episodes=4", "per_class=4"))
    first = ls.run_lowshot(cfg)
    assert first["methods"]["matching"]["hparams"]["loaded"] is False
    (name,) = FeatureStore.open(st.path).blob_names("cache")
    _, attrs = FeatureStore.open(st.path).read_blob("cache", name)
    # a pickle that torch.load(weights_only=True) refuses, under the right key
    FeatureStore.open(st.path).write_blob("cache", name, pickle.dumps(Path("/etc/passwd"), protocol=2), attrs)
    second = ls.run_lowshot(dataclasses.replace(cfg, out=str(tmp_path / "b")))
    assert second["methods"]["matching"]["hparams"]["loaded"] is False
    notes = [n for n in second["notes"] if "cannot be read" in n]
    assert len(notes) == 1 and f"cache/{name}" in notes[0], second["notes"]
    assert second["summary"]["matching"]["n=1"]["novel_top5"]["values"] == \
        first["summary"]["matching"]["n=1"]["novel_top5"]["values"]
    # rebuilt and saved over the bad entry: the next run loads it; a flipped byte is refused by the checksum
    third = ls.run_lowshot(dataclasses.replace(cfg, out=str(tmp_path / "c")))
    assert third["methods"]["matching"]["hparams"]["loaded"] is True
    flip([p for p in (st.path / "cache" / name).rglob("*") if p.is_file() and p.name != "zarr.json"][0], 99)
    fourth = ls.run_lowshot(dataclasses.replace(cfg, out=str(tmp_path / "d")))
    assert fourth["methods"]["matching"]["hparams"]["loaded"] is False
    assert any("crc32c" in n or "checksum" in n for n in fourth["notes"]), fourth["notes"]

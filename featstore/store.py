"""The feature store: one data set seen through one backbone checkpoint with one transform (format version 1).

A store is a Zarr v3 group on local disk that plain ``zarr.open_group(path)`` reads without featstore:

============  ==========================  ==========================================================
node          shape / type                meaning
============  ==========================  ==========================================================
features      [N, D] float16 | float32    pooled features, row chunks of ``chunk_rows``
labels        [N] int64                   index into ``classes``
ids           [N] str                     stable sample id
classes       [C] str                     class names
done          [n_chunks] bool             chunk i is true only after all its arrays are written
maps          [N, C, H, W] float16        optional spatial maps (row chunks dividing ``chunk_rows``)
views         [V, N, D]                   optional extra augmented views
splits/<s>    [k] int64                   sorted row indices of a named subset
meta/<m>      [N]                         per-sample metadata (e.g. Omniglot drawer)
index/<i>     [bytes] uint8 + attrs       a serialised FAISS index and the fingerprint it was built from
cache/<c>     [bytes] uint8 + attrs       what a head trained once on this store's features (an analogy
                                          generator, a matching network), under a content key
============  ==========================  ==========================================================

Crash safety rests on three rules. (1) A new store is built in a hidden temporary folder and renamed into place, so
a half-created store never appears under its name. (2) After creation no metadata file is rewritten: a chunk is
written, then its ``done`` flag (one file per flag, so ranks never race on a shared file); "complete" is derived
from the flags rather than stored, so finishing a store rewrites nothing. (3) Nodes added later (splits, indexes,
head caches) are written under a temporary name and swapped into place in one step (``renameat2`` with
``RENAME_EXCHANGE``), under the writer lock; the next writer removes what a killed one left behind. A kill -9 at any
moment therefore leaves a store that holds the old node or the new one and resumes to the bit-identical result.

One writer at a time is enforced with an advisory ``flock`` on the group's own ``zarr.json`` (never rewritten after
creation, and a file plain Zarr knows, so readers see no foreign file). The kernel drops it when the writer dies;
forked children (DataLoader workers) close their copy at fork, so they never keep a dead writer's lock alive. Any
number of readers may open the store and see only done chunks.

Every chunk of the data arrays carries a crc32c (Zarr v3's ``crc32c`` codec, which plain Zarr verifies too). Reads
check it, and refuse a done chunk whose file is missing, truncated or changed (:class:`CorruptStoreError`) rather
than return fill values. Stores written before checksums existed read as before; ``verify`` says they have none.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import zarr

from featstore import FORMAT_VERSION, __version__
from featstore.errors import (
    CorruptStoreError,
    IncompleteStoreError,
    MissingArrayError,
    ReadOnlyStoreError,
    StoreLockedError,
    UserError,
)

ATTR_KEY = "featstore"
LOCK_FILE = "zarr.json"              # the writer lock: an flock on the group's metadata file
LEGACY_LOCK_NAME = ".featstore.lock"  # where stores written before kept it (a file plain Zarr warns about)
NODE_GROUPS = ("splits", "meta", "index", "cache")
REQUIRED_NODES = ("features", "labels", "ids", "classes", "done")
COMPRESSIONS = ("none", "lz4", "zstd")
MAX_MAPS_CHUNK_BYTES = 32 << 20
BLOB_CHUNK_BYTES = 64 << 20   # chunk size of byte nodes (indexes, head caches)
MAX_LISTED = 10               # damaged chunks verify lists one by one per array, before a count


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint_hash(fingerprint: dict) -> str:
    """sha256 of the canonical JSON of a fingerprint: the identity of the features a store holds."""
    return hashlib.sha256(canonical_json(fingerprint).encode()).hexdigest()


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """Dotted path and both values of the first place where two JSON-like values differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{prefix}{key} ({a.get(key, '<absent>')!r} vs {b.get(key, '<absent>')!r})"
            diff = first_difference(a[key], b[key], f"{prefix}{key}.")
            if diff:
                return diff
        return None
    if a != b:
        return f"{prefix.rstrip('.')} ({_short(a)} vs {_short(b)})"
    return None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def library_versions() -> dict:
    import numcodecs

    versions = {"featstore": __version__, "zarr": zarr.__version__, "numpy": np.__version__,
                "numcodecs": numcodecs.__version__}
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:  # stores can be made (import from HDF5) without torch
        pass
    return versions


def _codecs(compression: str, checksum: bool = True) -> tuple | None:
    """The bytes-to-bytes codecs of a data array: the compressor (if any), then a crc32c of the stored bytes."""
    out: list = []
    if compression in ("lz4", "zstd"):
        # level 1: the same ratio as level 3 on ReLU-like features at about 3x the encode speed.
        out.append(zarr.codecs.BloscCodec(cname=compression, clevel=1, shuffle="bitshuffle"))
    elif compression != "none":
        raise UserError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")
    if checksum:
        out.append(zarr.codecs.Crc32cCodec())
    return tuple(out) or None


def _small_codecs() -> tuple:
    """Codecs of splits and per-sample meta: zarr's default compressor, then a crc32c."""
    return (zarr.codecs.ZstdCodec(level=0), zarr.codecs.Crc32cCodec())


def _crc_ok(data: np.ndarray) -> bool:
    """True when the last 4 bytes of ``data`` (uint8) are the little-endian crc32c of the bytes before them, as
    Zarr's ``crc32c`` codec writes them."""
    import google_crc32c  # a dependency of zarr, the implementation its crc32c codec uses

    return int(google_crc32c.value(data[:-4])) == int.from_bytes(data[-4:].tobytes(), "little")


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------- locks and atomic node replacement
_LOCK_HOLDERS: "weakref.WeakSet[FeatureStore]" = weakref.WeakSet()


def _forget_locks_in_child() -> None:
    """Run in every child forked by a lock holder (DataLoader workers): close its copy of the lock descriptor.

    An flock belongs to the open file description, which fork shares: a child keeping its copy would keep the
    lock of a killed writer alive until the child exits. Closing a duplicate never releases the parent's lock
    (only ``LOCK_UN`` or the last close does), and the child forgets it holds one, so it never unlocks it."""
    for store in list(_LOCK_HOLDERS):
        fd, store._lock_fd = store._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    _LOCK_HOLDERS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def _open_lock_file(folder: Path) -> int:
    """A descriptor of ``folder/zarr.json`` to lock (close-on-exec, so exec'd programs never inherit it). Opened
    for writing where allowed, though never written: NFS emulates flock with byte-range locks, which need it."""
    try:
        return os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
    return os.open(folder / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)


def _lock_holder(fd: int) -> str:
    """Pid of the process holding an flock on ``fd``'s file, from /proc/locks (Linux), or "unknown"."""
    try:
        st = os.fstat(fd)
        inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) > 5 and "->" not in parts and parts[1] == "FLOCK" and parts[5] == inode:
                    return parts[4]
    except OSError:
        pass
    return "unknown"


def _take_lock(folder: Path, wait: float, label: str) -> int:
    """An exclusive flock on ``folder/zarr.json``: the descriptor, or StoreLockedError after ``wait`` seconds."""
    try:
        fd = _open_lock_file(folder)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise ReadOnlyStoreError(f"{label} cannot be written here ({exc.strerror})") from None
        raise
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            holder = _lock_holder(fd)
            os.close(fd)
            raise StoreLockedError(f"{label} is being written by another process (pid {holder}); wait for it to "
                                   f"finish or stop it") from None


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):   # glibc < 2.28, musl without it
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``). False where the system or
    the file system cannot (then nothing moved)."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _build_folder_is_dead(folder: Path) -> bool:
    """A hidden build folder whose creator is gone: its zarr.json is not locked (or, before that file exists, it
    has not changed for a minute)."""
    try:
        fd = _open_lock_file(folder)
    except FileNotFoundError:
        try:
            return time.time() - folder.stat().st_mtime > 60
        except OSError:
            return False
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        _unlock(fd)


# ---------------------------------------------------------------------- metadata checks
def metadata_problems(path: Path) -> list[str]:
    """One line per Zarr metadata file of a store that is missing or does not parse (root, arrays, node groups).

    Cheap (a few small files); run at every open so that commands fail with one line, not a parser traceback."""
    return [line for _, line in _metadata_report(path)]


def _metadata_report(path: Path) -> list[tuple[str, str]]:
    """(node, problem) pairs of :func:`metadata_problems`; the node is "" for the root."""
    problems: list[tuple[str, str]] = []

    def node(rel: str) -> dict | None:
        file = path / rel / "zarr.json" if rel else path / "zarr.json"
        shown = f"{rel}/zarr.json" if rel else "zarr.json"
        try:
            meta = json.loads(file.read_bytes())
        except FileNotFoundError:
            problems.append((rel, f"metadata file {shown} is missing"))
            return None
        except (OSError, ValueError) as exc:
            problems.append((rel, f"metadata file {shown} does not parse ({_one_line(exc, 80)})"))
            return None
        if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or \
                meta.get("node_type") not in ("array", "group"):
            problems.append((rel, f"metadata file {shown} is not Zarr v3 node metadata"))
            return None
        if meta["node_type"] == "array":
            try:   # what zarr itself checks when it opens the array (no I/O)
                from zarr.core.metadata.v3 import ArrayV3Metadata

                ArrayV3Metadata.from_dict(dict(meta))
            except ImportError:
                pass
            except Exception as exc:  # noqa: BLE001 - zarr's validators raise several types
                problems.append((rel, f"metadata file {shown} is not valid array metadata ({_one_line(exc, 80)})"))
                return None
        return meta

    root = node("")
    if root is None or not isinstance((root.get("attributes") or {}).get(ATTR_KEY), dict):
        return problems   # not a featstore store: opening says so
    for name in REQUIRED_NODES:
        node(name)
    for name in ("maps", "views"):
        if (path / name).is_dir():
            node(name)
    for group in NODE_GROUPS:
        if not (path / group).is_dir():
            continue
        if node(group) is None:
            continue
        with contextlib.suppress(OSError):
            for entry in sorted(os.scandir(path / group), key=lambda e: e.name):
                if entry.is_dir() and not entry.name.startswith("."):
                    node(f"{group}/{entry.name}")
    return problems


@dataclass(frozen=True)
class Layout:
    """What fixes the shape of a store's arrays; must match exactly to resume or append."""

    n: int
    dim: int
    dtype: str = "float16"
    chunk_rows: int = 4096
    compression: str = "none"
    shard_rows: int | None = None
    maps_shape: tuple[int, int, int] | None = None
    views: int = 0

    def check(self) -> None:
        if self.n <= 0 or self.dim <= 0:
            raise UserError(f"a store needs at least one row and one feature dimension (got {self.n} x {self.dim})")
        if self.dtype not in ("float16", "float32"):
            raise UserError(f"--dtype must be float16 or float32, not {self.dtype!r}")
        if self.chunk_rows <= 0:
            raise UserError(f"chunk rows must be positive, not {self.chunk_rows}")
        if self.compression not in COMPRESSIONS:
            raise UserError(f"unknown compression {self.compression!r}; choose one of {', '.join(COMPRESSIONS)}")
        if self.shard_rows is not None and (self.shard_rows <= 0 or self.shard_rows % self.chunk_rows):
            raise UserError(f"shard rows ({self.shard_rows}) must be a positive multiple of chunk rows "
                            f"({self.chunk_rows})")
        if self.views < 0:
            raise UserError(f"views must be >= 0, not {self.views}")

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk_rows)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["maps_shape"] = list(self.maps_shape) if self.maps_shape else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Layout":
        d = dict(d)
        d["maps_shape"] = tuple(d["maps_shape"]) if d.get("maps_shape") else None
        return cls(**d)


class FeatureStore:
    """A feature store on disk. Open with :meth:`open` (read) or :meth:`create` (write or resume).

    Reading: ``load_features()`` returns the ``[N, D]`` array (float32 by default) of done rows; ``gather(rows)``
    fetches a row subset, ``gather_maps(rows)`` the spatial maps of one (reading only the chunks that hold them);
    ``labels``, ``ids``, ``classes`` and ``splits`` come into memory on first use. Rows of chunks that are not done
    are refused (:class:`~featstore.errors.IncompleteStoreError`) unless ``require_done=False``.
    """

    def __init__(self, path: str | os.PathLike, group: zarr.Group, writable: bool = False):
        self.path = Path(path)
        self.group = group
        self.writable = writable
        self._lock_fd: int | None = None
        attrs = dict(group.attrs).get(ATTR_KEY)
        if not isinstance(attrs, dict):
            raise UserError(f"{self.path} is a Zarr group but not a featstore store (no '{ATTR_KEY}' attributes)")
        version = attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(f"store {self.path} has format version {version}; this featstore {__version__} reads "
                            f"version {FORMAT_VERSION}")
        self.attrs: dict = attrs
        try:
            self.layout = Layout.from_json(attrs["layout"])
            attrs["fingerprint"], attrs["fingerprint_hash"], attrs["store_uuid"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptStoreError(f"store {self.path} has damaged featstore attributes ({_one_line(exc, 60)}); "
                                    f"re-create it") from None
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ opening and creating
    @classmethod
    def open(cls, path: str | os.PathLike, *, check_metadata: bool = True) -> "FeatureStore":
        """Open an existing store read-only. Raises UserError when the path is not a store of our format, and
        CorruptStoreError when its metadata is damaged (``check_metadata=False`` opens it anyway if the root
        metadata parses: what :meth:`verify` needs to list every damaged file)."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"no store at {path}")
        if not (path / "zarr.json").is_file():
            raise UserError(f"{path} is not a Zarr v3 store (no zarr.json)")
        problems = metadata_problems(path)
        if problems and (check_metadata or problems[0].startswith("metadata file zarr.json ")):
            more = f" (and {len(problems) - 1} more; featstore verify {path} lists them)" if len(problems) > 1 else ""
            raise CorruptStoreError(f"store {path} is damaged: {problems[0]}{more}")
        try:
            group = zarr.open_group(str(path), mode="r")
        except Exception as exc:  # zarr raises a zoo of types for unreadable metadata
            raise CorruptStoreError(f"cannot open store {path}: {_one_line(exc)}") from None
        return cls(path, group)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        layout: Layout,
        *,
        fingerprint: dict,
        classes: Sequence[str],
        provenance: dict | None = None,
        splits: dict[str, np.ndarray] | None = None,
        class_splits: dict[str, list[int]] | None = None,
        meta: dict[str, np.ndarray] | None = None,
        labels: np.ndarray | None = None,
        ids: Sequence[str] | None = None,
        lock: bool = True,
        checksum: bool = True,
    ) -> "FeatureStore":
        """Create a store for writing, or reopen an unfinished one with the same fingerprint and layout to resume.

        ``labels`` and ``ids`` known up front (they come from the data source) are written at creation; otherwise
        they are written chunk by chunk by :meth:`write_chunk`. ``checksum`` adds a crc32c to every chunk of a new
        store (a resumed store keeps what it was created with). Refuses (UserError, nothing changed on disk) a
        path holding a store with another fingerprint or layout, or a store another process is writing.
        """
        layout.check()
        path = Path(path)
        if path.exists():
            store = cls._reopen_for_append(path, layout, fingerprint)
            if lock:
                store.acquire_lock()
            return store
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise UserError(f"cannot create {path}: the folder {parent} does not exist")
        tmp = parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        fd = None
        try:
            # the build folder is locked from its first file on: a later writer removes only unlocked ones
            fd = cls._build(tmp, layout, fingerprint=fingerprint, classes=classes, provenance=provenance or {},
                            splits=splits or {}, class_splits=class_splits or {}, meta=meta or {}, labels=labels,
                            ids=ids, checksum=checksum)
            try:
                os.rename(tmp, path)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):  # another creator won the race: join its store
                    _unlock(fd)
                    fd = None
                    shutil.rmtree(tmp, ignore_errors=True)
                    store = cls._reopen_for_append(path, layout, fingerprint)
                    if lock:
                        store.acquire_lock()
                    return store
                raise
        except BaseException:
            if fd is not None:
                _unlock(fd)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        store = cls(path, zarr.open_group(str(path), mode="r+"), writable=True)
        if lock:
            store._lock_fd = fd
            _LOCK_HOLDERS.add(store)
            store._clean_leftovers()
        else:
            _unlock(fd)
        return store

    @classmethod
    def _reopen_for_append(cls, path: Path, layout: Layout, fingerprint: dict) -> "FeatureStore":
        existing = cls.open(path)
        diff = first_difference(existing.fingerprint, fingerprint)
        if diff:
            raise UserError(f"store {path} holds features with another fingerprint ({diff}); write to a new --out "
                            f"or delete the old store")
        diff = first_difference(existing.layout.to_json(), layout.to_json())
        if diff:
            raise UserError(f"store {path} has another layout ({diff}); write to a new --out or delete the old store")
        return cls(path, zarr.open_group(str(path), mode="r+"), writable=True)

    @staticmethod
    def _build(tmp: Path, layout: Layout, *, fingerprint, classes, provenance, splits, class_splits, meta, labels,
               ids, checksum) -> int:
        """Write a new store into ``tmp``; returns a descriptor holding the writer lock on it."""
        n = layout.n
        if labels is not None and len(labels) != n:
            raise UserError(f"{len(labels)} labels for {n} rows")
        if ids is not None and len(ids) != n:
            raise UserError(f"{len(ids)} ids for {n} rows")
        if ids is not None and len(set(ids)) != n:
            raise UserError("sample ids are not unique")
        attrs = {
            "format_version": FORMAT_VERSION,
            "layout": layout.to_json(),
            "fingerprint": fingerprint,
            "fingerprint_hash": fingerprint_hash(fingerprint),
            "store_uuid": uuid.uuid4().hex,
            "provenance": {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "versions": library_versions(), **provenance},
            "class_splits": {k: [int(c) for c in v] for k, v in class_splits.items()},
        }
        # attributes in the first write: the root zarr.json, which carries the writer lock, is never replaced
        group = zarr.open_group(str(tmp), mode="w-", attributes={ATTR_KEY: attrs})
        fd = _take_lock(tmp, 0.0, f"store {tmp}")
        try:
            FeatureStore._build_arrays(group, layout, classes=classes, splits=splits, meta=meta, labels=labels,
                                       ids=ids, checksum=checksum)
        except BaseException:
            _unlock(fd)
            raise
        return fd

    @staticmethod
    def _build_arrays(group: zarr.Group, layout: Layout, *, classes, splits, meta, labels, ids, checksum) -> None:
        n, cr = layout.n, layout.chunk_rows
        codecs = _codecs(layout.compression, checksum)
        plain = _codecs("none", checksum)
        # every chunk has a file: resume, direct reads and the missing-chunk check rely on it
        exact = {"write_empty_chunks": True}
        feat_kwargs: dict[str, Any] = dict(chunks=(cr, layout.dim), dtype=layout.dtype, fill_value=0,
                                           compressors=codecs, config=exact)
        if layout.shard_rows:
            feat_kwargs["shards"] = (layout.shard_rows, layout.dim)
        group.create_array("features", shape=(n, layout.dim), **feat_kwargs)
        group.create_array("labels", shape=(n,), chunks=(cr,), dtype="int64", fill_value=-1, compressors=codecs,
                           config=exact)
        group.create_array("ids", shape=(n,), chunks=(cr,), dtype=str, compressors=plain, config=exact)
        group.create_array("classes", shape=(len(classes),), chunks=(max(1, len(classes)),), dtype=str,
                           compressors=plain)
        if len(classes):
            group["classes"][:] = np.asarray(list(classes), dtype=str)
        group.create_array("done", shape=(layout.n_chunks,), chunks=(1,), dtype=bool, fill_value=False,
                           compressors=None)
        if layout.maps_shape:
            c, h, w = layout.maps_shape
            per_row = c * h * w * 2
            maps_rows = cr
            while maps_rows > 1 and maps_rows * per_row > MAX_MAPS_CHUNK_BYTES and maps_rows % 2 == 0:
                maps_rows //= 2
            group.create_array("maps", shape=(n, c, h, w), chunks=(maps_rows, c, h, w), dtype="float16",
                               fill_value=0, compressors=codecs, config=exact)
        if layout.views:
            group.create_array("views", shape=(layout.views, n, layout.dim), chunks=(1, cr, layout.dim),
                               dtype=layout.dtype, fill_value=0, compressors=codecs, config=exact)
        if labels is not None:
            group["labels"][:] = np.asarray(labels, dtype=np.int64)
        if ids is not None:
            group["ids"][:] = np.asarray(list(ids), dtype=str)
        sg = group.create_group("splits")
        for name, rows in splits.items():
            _write_split(sg, name, rows, n)
        mg = group.create_group("meta")
        for name, values in meta.items():
            values = np.asarray(values)
            if len(values) != n:
                raise UserError(f"meta {name!r} has {len(values)} values for {n} rows")
            mg.create_array(name, data=values, chunks=(max(1, min(n, 1 << 20)),),
                            compressors=_small_codecs() if values.dtype.kind != "U" else plain)
        group.create_group("index")

    # ------------------------------------------------------------------ locking
    def acquire_lock(self, wait: float = 0.0) -> None:
        """Take the single-writer lock (an flock on the group's ``zarr.json``; the kernel drops it if the writer
        dies), waiting up to ``wait`` seconds for another writer to finish. StoreLockedError when another process
        keeps it; ReadOnlyStoreError when this process cannot write the store. Then removes what a killed writer
        left behind (temporary nodes, build folders; a node a replacement had moved aside is put back)."""
        if self._lock_fd is not None:
            return
        label = f"store {self.path}"
        if not os.access(self.path, os.W_OK):
            raise ReadOnlyStoreError(f"{label} cannot be written here (read-only file system or no permission)")
        fd = _take_lock(self.path, wait, label)
        try:
            self._retire_legacy_lock()
        except BaseException:
            _unlock(fd)
            raise
        self._lock_fd = fd
        _LOCK_HOLDERS.add(self)
        self._clean_leftovers()

    def _retire_legacy_lock(self) -> None:
        """Stores written before kept their lock in ``.featstore.lock`` inside the group, a file plain Zarr warns
        about. Refuse while an older featstore holds it; otherwise remove it."""
        legacy = self.path / LEGACY_LOCK_NAME
        if not legacy.is_file():
            return
        try:
            fd = os.open(legacy, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise StoreLockedError(f"store {self.path} is being written by another process (pid {holder}); "
                                       f"wait for it to finish or stop it") from None
            with contextlib.suppress(OSError):
                legacy.unlink()
        finally:
            _unlock(fd)

    def _clean_leftovers(self) -> None:
        """What a writer killed mid-way left: hidden ``.NAME.tmp-*`` nodes (unfinished, or the previous node after
        an exchange) are removed; a ``.NAME.old-*`` node whose NAME is missing (a two-rename replacement killed in
        between) is put back, otherwise removed; unlocked build folders of this store's name go."""
        def remove(path: str) -> None:
            shutil.rmtree(path, ignore_errors=True)

        with contextlib.suppress(OSError):
            for entry in os.scandir(self.path):
                if entry.name.startswith(".") and ".tmp-" in entry.name and entry.is_dir():
                    remove(entry.path)
        for parent in NODE_GROUPS:
            folder = self.path / parent
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if not entry.name.startswith(".") or not entry.is_dir():
                    continue
                if ".tmp-" in entry.name:
                    remove(entry.path)
                elif ".old-" in entry.name:
                    final = folder / entry.name[1:entry.name.rindex(".old-")]
                    if final.exists():
                        remove(entry.path)
                    else:
                        with contextlib.suppress(OSError):
                            os.rename(entry.path, final)
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.path.parent):
                if entry.name.startswith(f".{self.path.name}.tmp-") and entry.is_dir() and \
                        _build_folder_is_dead(Path(entry.path)):
                    remove(entry.path)

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            _LOCK_HOLDERS.discard(self)
            _unlock(fd)

    def close(self) -> None:
        self.release_lock()

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ properties
    @property
    def fingerprint(self) -> dict:
        return self.attrs["fingerprint"]

    @property
    def fingerprint_hash(self) -> str:
        return self.attrs["fingerprint_hash"]

    @property
    def store_uuid(self) -> str:
        return self.attrs["store_uuid"]

    @property
    def provenance(self) -> dict:
        return self.attrs.get("provenance", {})

    @property
    def class_splits(self) -> dict[str, list[int]]:
        return self.attrs.get("class_splits", {})

    @property
    def n(self) -> int:
        return self.layout.n

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def n_chunks(self) -> int:
        return self.layout.n_chunks

    def chunk_range(self, i: int) -> tuple[int, int]:
        cr = self.layout.chunk_rows
        return i * cr, min(self.n, (i + 1) * cr)

    def done_chunks(self) -> np.ndarray:
        """[n_chunks] bool, read fresh from disk while the store is unfinished (a writer may be appending).

        Flags only ever go from false to true, so once every chunk is done the answer is cached.
        """
        if self._cache.get("complete"):
            return np.ones(self.n_chunks, dtype=bool)
        done = np.asarray(self._read_node("done"), dtype=bool)
        if done.all():
            self._cache["complete"] = True
        return done

    def done_rows(self) -> np.ndarray:
        """[N] bool mask of rows in done chunks."""
        return np.repeat(self.done_chunks(), self.layout.chunk_rows)[: self.n]

    @property
    def complete(self) -> bool:
        return bool(self.done_chunks().all())

    @property
    def classes(self) -> list[str]:
        if "classes" not in self._cache:
            self._cache["classes"] = [str(c) for c in np.asarray(self._read_node("classes")).tolist()]
        return self._cache["classes"]

    @property
    def labels(self) -> np.ndarray:
        if "labels" not in self._cache:
            self._cache["labels"] = np.asarray(self._read_node("labels"), dtype=np.int64)
        return self._cache["labels"]

    @property
    def ids(self) -> np.ndarray:
        if "ids" not in self._cache:
            self._cache["ids"] = np.asarray(np.asarray(self._read_node("ids")).tolist(), dtype=str)
        return self._cache["ids"]

    @property
    def split_names(self) -> list[str]:
        return self._node_names("splits")

    def split(self, name: str) -> np.ndarray:
        """Sorted int64 row indices of a named split."""
        if name not in self.split_names:
            known = ", ".join(self.split_names) or "none"
            raise UserError(f"store {self.path} has no split {name!r} (it has: {known})")
        return np.asarray(self._read_node(f"splits/{name}"), dtype=np.int64)

    @property
    def meta_names(self) -> list[str]:
        return self._node_names("meta")

    def meta(self, name: str) -> np.ndarray:
        if name not in self.meta_names:
            raise UserError(f"store {self.path} has no per-sample meta {name!r} (it has: "
                            f"{', '.join(self.meta_names) or 'none'})")
        return np.asarray(self._read_node(f"meta/{name}"))

    def _node_names(self, parent: str) -> list[str]:
        """Names of the nodes of group ``parent`` (folders with a zarr.json, listed without zarr, so that one
        damaged node does not hide the others); hidden names (nodes being written or left by a killed writer)
        are not nodes of the store."""
        try:
            entries = list(os.scandir(self.path / parent))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise CorruptStoreError(f"store {self.path}: group {parent} cannot be listed ({_one_line(exc)})") \
                from None
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir()
                      and os.path.isfile(os.path.join(e.path, "zarr.json")))

    def _read_node(self, name: str) -> np.ndarray:
        """All of a small array (flags, labels, ids, classes, a split), with a missing chunk of rows in done
        chunks or a failed checksum as CorruptStoreError rather than fill values or a decoder traceback."""
        try:
            arr = self.group[name]
        except Exception as exc:  # noqa: BLE001
            raise CorruptStoreError(f"store {self.path}: node {name} cannot be opened ({_one_line(exc)}); "
                                    f"featstore verify {self.path} lists what is damaged") from None
        if name in ("labels", "ids"):
            self._require_chunk_files(name, self.done_chunks())
        try:
            return np.asarray(arr[:])
        except Exception as exc:  # noqa: BLE001
            why = "its bytes fail their crc32c checksum: changed after they were written" if "checksum" in str(exc) \
                else _one_line(exc)
            raise CorruptStoreError(f"store {self.path}: node {name} cannot be read ({why}); featstore verify "
                                    f"{self.path} lists what is damaged") from None

    def info(self) -> dict:
        done = self.done_chunks()
        return {
            "path": str(self.path),
            "format_version": FORMAT_VERSION,
            "rows": self.n,
            "dim": self.dim,
            "dtype": self.layout.dtype,
            "chunk_rows": self.layout.chunk_rows,
            "compression": self.layout.compression,
            "shard_rows": self.layout.shard_rows,
            "chunks_done": f"{int(done.sum())}/{len(done)}",
            "complete": bool(done.all()),
            "classes": len(self.classes),
            "maps": list(self.layout.maps_shape) if self.layout.maps_shape else None,
            "views": self.layout.views,
            "splits": {name: int(self.group["splits"][name].shape[0]) for name in self.split_names},
            "checksums": self.has_checksums,
            "meta": self.meta_names,
            "indexes": self.index_names(),
            "caches": self.blob_names("cache"),
            "fingerprint_hash": self.fingerprint_hash,
            "fingerprint": self.fingerprint,
            "provenance": self.provenance,
        }

    # ------------------------------------------------------------------ writing
    def _require_writable(self) -> None:
        if not self.writable:
            raise UserError(f"store {self.path} is open read-only")

    def write_chunk(self, i: int, features: np.ndarray, *, labels: np.ndarray | None = None,
                    ids: Sequence[str] | None = None, maps: np.ndarray | None = None,
                    views: np.ndarray | None = None) -> None:
        """Write the rows of chunk i (``features`` [rows, D], ``maps`` [rows, C, H, W], ``views`` [V, rows, D])
        and then mark it done. Writing a done chunk again rewrites it; resuming callers skip done chunks."""
        self._require_writable()
        if not 0 <= i < self.n_chunks:
            raise IndexError(f"chunk {i} out of range 0..{self.n_chunks - 1}")
        lo, hi = self.chunk_range(i)
        if features.shape != (hi - lo, self.dim):
            raise ValueError(f"chunk {i} needs features of shape {(hi - lo, self.dim)}, got {features.shape}")
        g = self.group
        g["features"][lo:hi] = features.astype(self.layout.dtype, copy=False)
        if labels is not None:
            g["labels"][lo:hi] = np.asarray(labels, dtype=np.int64)
        if ids is not None:
            g["ids"][lo:hi] = np.asarray(list(ids), dtype=str)
        if self.layout.maps_shape:
            if maps is None:
                raise ValueError(f"store {self.path} has maps; chunk {i} came without them")
            g["maps"][lo:hi] = maps.astype(np.float16, copy=False)
        if self.layout.views:
            if views is None or views.shape != (self.layout.views, hi - lo, self.dim):
                raise ValueError(f"chunk {i} needs views of shape {(self.layout.views, hi - lo, self.dim)}")
            g["views"][:, lo:hi] = views.astype(self.layout.dtype, copy=False)
        g["done"][i] = True

    def add_split(self, name: str, rows: Iterable[int], *, overwrite: bool = False, wait: float = 0.0) -> None:
        """Add a named subset (row indices) atomically, under the writer lock (StoreLockedError if another process
        still writes the store after ``wait`` seconds): written under a temporary name, then swapped in."""
        rows = np.unique(np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows, dtype=np.int64))
        _check_rows(rows, self.n, f"split {name!r}")
        had_lock = self._lock_fd is not None
        if not had_lock:
            self.acquire_lock(wait)
        try:
            # checked under the lock: two processes adding the same name cannot both pass
            if name in self.split_names and not overwrite:
                raise UserError(f"store {self.path} already has a split {name!r}; pass --overwrite to replace it")
            self._atomic_child("splits", name, lambda grp, tmp: _write_split(grp, tmp, rows, self.n))
        finally:
            if not had_lock:
                self.release_lock()

    def _atomic_child(self, parent: str, name: str, write) -> None:
        """Write node ``parent/name`` under a hidden name and swap it into place (replacing an old one) in one
        atomic step, under the writer lock (taken here unless this process holds it).

        After a kill at any moment the store holds the old node or the new one under ``name``; a hidden node left
        behind is removed by the next writer (:meth:`_clean_leftovers`). Where the file system cannot exchange two
        paths, the old node is renamed aside first: a kill between the two renames leaves it as ``.NAME.old-*``,
        which :meth:`verify` reports and the next writer puts back."""
        if not name or "/" in name or name.startswith("."):
            raise UserError(f"bad node name {name!r}")
        had_lock = self._lock_fd is not None
        if not had_lock:
            self.acquire_lock()
        try:
            self._replace_child(parent, name, write)
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise ReadOnlyStoreError(f"store {self.path} cannot be written here ({exc.strerror})") from None
            raise
        finally:
            if not had_lock:
                self.release_lock()
        self.group = zarr.open_group(str(self.path), mode="r+" if self.writable else "r")
        self._cache.pop(("array", f"{parent}/{name}"), None)

    def _replace_child(self, parent: str, name: str, write) -> None:
        folder = self.path / parent
        if not (folder / "zarr.json").is_file():   # a group that stores of an older layout lack
            tmp_group = self.path / f".{parent}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                zarr.open_group(str(tmp_group), mode="w")
                os.rename(tmp_group, folder)
            except OSError:
                if not (folder / "zarr.json").is_file():
                    raise
            finally:
                shutil.rmtree(tmp_group, ignore_errors=True)
        group = zarr.open_group(str(folder), mode="r+")
        tmp = f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        staged, final = folder / tmp, folder / name
        try:
            write(group, tmp)
            if not final.exists():
                os.rename(staged, final)
            elif not _exchange(staged, final):
                old = folder / f".{name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
                try:
                    os.rename(staged, final)
                except BaseException:
                    os.rename(old, final)   # put the previous node back rather than lose it
                    raise
                shutil.rmtree(old, ignore_errors=True)
            # after an exchange the staged name holds the previous node
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def write_blob(self, parent: str, name: str, data: bytes | np.ndarray, attrs: dict, *,
                   wait: float = 0.0) -> None:
        """Store bytes as node ``parent/name`` (a uint8 array with ``attrs`` and a crc32c per chunk), atomically,
        under the writer lock (taken here unless this process holds it). StoreLockedError if another process
        still writes the store after ``wait`` seconds; ReadOnlyStoreError if the store cannot be written."""
        blob = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else \
            np.ascontiguousarray(data).view(np.uint8).reshape(-1)

        def write(group, tmp):
            chunk = int(max(1, min(blob.size, BLOB_CHUNK_BYTES)))
            arr = group.create_array(tmp, shape=blob.shape, dtype="uint8", chunks=(chunk,),
                                     compressors=_codecs("none"), attributes=attrs,
                                     config={"write_empty_chunks": True})
            arr[:] = blob

        had_lock = self._lock_fd is not None
        if not had_lock:
            self.acquire_lock(wait)
        try:
            self._atomic_child(parent, name, write)
        finally:
            if not had_lock:
                self.release_lock()

    def read_blob(self, parent: str, name: str) -> tuple[np.ndarray, dict] | None:
        """(uint8 bytes, attrs) of node ``parent/name``, or None when there is none. CorruptStoreError when its
        bytes are missing or fail their checksum."""
        if name not in self.blob_names(parent):
            return None
        node = f"{parent}/{name}"
        self._require_chunk_files(node, None)
        data = self._read_node(node)
        return np.asarray(data, dtype=np.uint8), dict(self.group[parent][name].attrs)

    def blob_names(self, parent: str) -> list[str]:
        return self._node_names(parent)

    # ------------------------------------------------------------------ reading
    def _array(self, name: str):
        """Array handles are cached: opening one re-reads its metadata file, too slow for per-chunk use."""
        key = ("array", name)
        if key not in self._cache:
            try:
                self._cache[key] = self.group[name]
            except Exception as exc:  # noqa: BLE001 - zarr raises a zoo of types for unreadable metadata
                raise CorruptStoreError(f"store {self.path}: array {name} cannot be opened ({_one_line(exc)}); "
                                        f"featstore verify {self.path} lists what is damaged") from None
        return self._cache[key]

    def _codec_names(self, array: str) -> list[str]:
        """Class names of an array's codecs, with those inside a sharding codec appended."""
        codecs = list(getattr(self._array(array).metadata, "codecs", ()))
        names = [type(c).__name__ for c in codecs]
        if names[:1] == ["ShardingCodec"]:
            names += [type(c).__name__ for c in codecs[0].codecs]
        return names

    @property
    def has_checksums(self) -> bool:
        """True when every features chunk carries a crc32c (False for stores written before checksums existed)."""
        return "Crc32cCodec" in self._codec_names("features")

    def _raw_format(self, array: str) -> bool | None:
        """For an unsharded, uncompressed array whose chunk files hold raw little-endian C-order bytes, whether a
        4-byte crc32c follows them; None when zarr must decode the chunks."""
        key = ("raw", array)
        if key not in self._cache:
            names = self._codec_names(array)
            dtype = np.dtype(self._array(array).dtype)
            raw = names[:1] == ["BytesCodec"] and names[1:] in ([], ["Crc32cCodec"]) and np.little_endian \
                and dtype.byteorder in ("=", "<", "|")
            self._cache[key] = (names[1:] == ["Crc32cCodec"]) if raw else None
        return self._cache[key]

    def _chunk_key(self, array: str, coords: tuple[int, ...]) -> str:
        return self._array(array).metadata.encode_chunk_key(coords)

    def _missing_chunk_files(self, array: str, chunks: Iterable[int] | None, limit: int | None = None) -> list[str]:
        """Storage files (chunks, or shards) of ``array`` that must exist but do not: those holding the rows of
        the given features chunks (None: every chunk of the array). Every written chunk has a file
        (``write_empty_chunks``), so a missing one was lost, never a chunk of fill values."""
        arr = self._array(array)
        grid = tuple(arr.metadata.chunk_grid.chunk_shape)   # the shard shape for sharded arrays
        axis = 1 if array == "views" else 0
        if chunks is None:
            blocks: Iterable[int] = range(-(-arr.shape[axis] // grid[axis]))
        else:
            cr, g = self.layout.chunk_rows, grid[axis]
            blocks = sorted({b for c in chunks for b in range(c * cr // g, (min(self.n, (c + 1) * cr) - 1) // g + 1)})
        lead = range(arr.shape[0]) if axis == 1 else (None,)
        missing = []
        for b in blocks:
            for v in lead:
                coords = [0] * arr.ndim
                coords[axis] = b
                if v is not None:
                    coords[0] = v
                key = self._chunk_key(array, tuple(coords))
                if not os.path.isfile(self.path / array / key):
                    missing.append(f"{array}/{key}")
                    if limit is not None and len(missing) >= limit:
                        return missing
        return missing

    def _require_chunk_files(self, array: str, chunks: Iterable[int] | None) -> None:
        missing = self._missing_chunk_files(array, chunks, limit=1)
        if missing:
            raise CorruptStoreError(f"store {self.path}: chunk file {missing[0]} is missing (the rows it held are "
                                    f"lost); featstore verify {self.path} lists every damaged file")

    def _damaged(self, array: str, chunk: int, why: str) -> CorruptStoreError:
        return CorruptStoreError(f"store {self.path}: chunk {chunk} of {array} is damaged: {why}; re-create the "
                                 f"store (featstore verify {self.path} lists every damaged chunk)")

    def _raw_chunk(self, chunk: int, *, done: bool, mapped: bool = False) -> np.ndarray | None:
        """Chunk ``chunk`` of an uncompressed features array, ``[chunk_rows, D]``: read (or memory-mapped) after
        checking its size and crc32c. A done chunk whose file is missing or has another size is CorruptStoreError,
        never fill values; a chunk not done yet without a complete file is None (its rows are undefined). Zarr
        writes chunk files atomically, so a checksum mismatch is damage, done or not."""
        crc = self._raw_format("features")
        dtype = np.dtype(self._array("features").dtype)
        nbytes = self.layout.chunk_rows * self.dim * dtype.itemsize
        expected = nbytes + (4 if crc else 0)
        key = self._chunk_key("features", (chunk, 0))
        path = self.path / "features" / key
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            if done:
                raise self._damaged("features", chunk, f"its file features/{key} is missing") from None
            return None
        if size != expected:
            if done:
                raise self._damaged("features", chunk, f"its file features/{key} has {size} bytes, not {expected} "
                                                       f"(truncated or overwritten)")
            return None
        data = np.memmap(path, dtype=np.uint8, mode="r", shape=(expected,)) if mapped else \
            np.fromfile(path, dtype=np.uint8)
        if data.size != expected:
            raise self._damaged("features", chunk, f"its file features/{key} changed size while being read")
        if crc and not _crc_ok(data):
            raise self._damaged("features", chunk, "its bytes fail their crc32c checksum (changed after they were "
                                                   "written)")
        return data[:nbytes].view(dtype).reshape(self.layout.chunk_rows, self.dim)

    def _chunk_memmap(self, chunk: int, *, done: bool) -> np.ndarray | None:
        """A read-only memory map of an uncompressed features chunk ``[chunk_rows, D]``, checked once (size,
        crc32c) when first mapped, or None (compressed or sharded arrays; a chunk not done yet without a file).

        Maps of done chunks are cached: a done chunk is never rewritten by a resume, so its map stays valid.
        """
        key = ("memmap", chunk)
        if key in self._cache:
            return self._cache[key]
        if self._raw_format("features") is None:
            return None
        mapped = self._raw_chunk(chunk, done=done, mapped=True)
        if done and mapped is not None:
            self._cache[key] = mapped
        return mapped

    def _zarr_rows(self, array: str, chunk: int, *, done: bool) -> np.ndarray:
        """The rows of features chunk ``chunk`` of ``array`` decoded by zarr (``[V, rows, D]`` for views), with a
        missing file of a done chunk, a failed checksum or an undecodable chunk as CorruptStoreError."""
        lo, hi = self.chunk_range(chunk)
        if done:
            self._require_chunk_files(array, (chunk,))
        arr = self._array(array)
        try:
            return np.asarray(arr[:, lo:hi] if array == "views" else arr[lo:hi])
        except Exception as exc:  # noqa: BLE001 - zarr and its codecs raise ValueError, RuntimeError, ...
            why = "their bytes fail the crc32c checksum: changed after they were written" if "checksum" in str(exc) \
                else _one_line(exc)
            raise CorruptStoreError(f"store {self.path}: rows {lo}..{hi - 1} of {array} cannot be read ({why}); "
                                    f"featstore verify {self.path} lists every damaged chunk") from None

    def _read_rows(self, lo: int, hi: int, out: np.ndarray, done: np.ndarray) -> None:
        """Features rows lo:hi into ``out`` (any float dtype), reading raw chunk files directly; rows of chunks
        not done yet that have no file read as zeros (Zarr's fill value)."""
        cr = self.layout.chunk_rows
        raw = self._raw_format("features") is not None
        scratch: list = []
        for c in range(lo // cr, -(-hi // cr)):
            a, b = max(lo, c * cr), min(hi, (c + 1) * cr)
            flag = bool(done[c])
            if raw:
                if not self._read_raw_into(c, flag, out[a - lo:b - lo], a - c * cr, scratch):
                    out[a - lo:b - lo] = 0
                continue
            out[a - lo:b - lo] = self._zarr_rows("features", c, done=flag)[a - c * cr:b - c * cr]

    def _read_raw_into(self, chunk: int, done: bool, target: np.ndarray, start: int, scratch: list) -> bool:
        """Rows ``start:start + len(target)`` of raw features chunk ``chunk`` into ``target``, checked like
        :meth:`_raw_chunk` (size, crc32c over the whole file). Reads straight into ``target`` when it has the
        stored dtype and the rows start the chunk (a full scan: no intermediate copy), else through a reused
        buffer. False for a chunk not done yet without a complete file."""
        import google_crc32c

        crc = self._raw_format("features")
        dtype = np.dtype(self._array("features").dtype)
        row_bytes = self.dim * dtype.itemsize
        nbytes = self.layout.chunk_rows * row_bytes
        expected = nbytes + (4 if crc else 0)
        key = self._chunk_key("features", (chunk, 0))
        try:
            fh = open(self.path / "features" / key, "rb", buffering=0)
        except FileNotFoundError:
            if done:
                raise self._damaged("features", chunk, f"its file features/{key} is missing") from None
            return False
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size != expected:
                if done:
                    raise self._damaged("features", chunk, f"its file features/{key} has {size} bytes, not "
                                                           f"{expected} (truncated or overwritten)")
                return False
            direct = target.dtype == dtype and start == 0 and target.flags.c_contiguous
            if direct:
                head = target
            else:
                if not scratch:
                    scratch.append(np.empty((self.layout.chunk_rows, self.dim), dtype=dtype))
                head = scratch[0][: start + len(target)]
            got = fh.readinto(memoryview(head.reshape(-1).view(np.uint8)))
            rest = fh.read() if crc else b""
        if got != head.size * dtype.itemsize or (crc and got + len(rest) != expected):
            raise self._damaged("features", chunk, f"its file features/{key} changed size while being read")
        if crc:
            value = google_crc32c.extend(google_crc32c.value(head.reshape(-1).view(np.uint8)), rest[:-4])
            if int(value) != int.from_bytes(rest[-4:], "little"):
                raise self._damaged("features", chunk, "its bytes fail their crc32c checksum (changed after they "
                                                       "were written)")
        if not direct:
            target[:] = head[start:]
        return True

    def load_features(self, rows: np.ndarray | None = None, *, dtype: str = "float32",
                      require_done: bool = True) -> np.ndarray:
        """Features as one in-memory array: ``[N, D]`` (or ``[len(rows), D]`` for a row subset).

        Heads should call this once and gather in memory; never index a store row by row in a hot loop.
        Raises UserError if a requested row lies in a chunk that is not done yet (unless require_done=False),
        CorruptStoreError if a done chunk is missing, truncated or fails its checksum.
        """
        if rows is not None:
            return self.gather(rows, dtype=dtype, require_done=require_done)
        done = self.done_chunks()
        if require_done and not done.all():
            raise IncompleteStoreError(f"store {self.path} is not complete ({int(done.sum())}/{len(done)} chunks "
                                       f"done); finish the extraction (run the same command again) or read "
                                       f"done_rows() only")
        out = np.empty((self.n, self.dim), dtype=dtype)
        self._read_rows(0, self.n, out, done)
        return out

    def gather(self, rows: np.ndarray, *, dtype: str = "float32", require_done: bool = True) -> np.ndarray:
        """``[len(rows), D]`` features of the given rows (any order, repeats allowed)."""
        rows = np.asarray(rows, dtype=np.int64)
        _check_rows(rows, self.n, "rows")
        cr = self.layout.chunk_rows
        chunk_of = rows // cr
        done = self.done_chunks()
        if require_done:
            if not done[chunk_of].all():
                bad = int(rows[~done[chunk_of]][0])
                raise IncompleteStoreError(f"row {bad} of store {self.path} is in a chunk that is not done yet")
        out = np.empty((len(rows), self.dim), dtype=dtype)
        if len(rows) == 0:
            return out
        order = np.argsort(chunk_of, kind="stable")
        sorted_chunks = chunk_of[order]
        bounds = np.flatnonzero(np.diff(sorted_chunks)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(rows)]])
        for s, e in zip(starts, ends):
            c = int(sorted_chunks[s])
            positions = order[s:e]
            local = rows[positions] - c * cr
            chunk = self._chunk_memmap(c, done=bool(done[c]))
            if chunk is None:
                chunk = self._zarr_rows("features", c, done=bool(done[c]))
            out[positions] = chunk[local]
        return out

    def load_views(self, rows: np.ndarray | None = None, dtype: str = "float32") -> np.ndarray:
        """``[V, n, D]`` extra views (all rows, or the given ones)."""
        if not self.layout.views:
            raise MissingArrayError(f"store {self.path} has no views; extract with --views K")
        self._require_chunk_files("views", np.flatnonzero(self.done_chunks()))
        try:
            data = np.asarray(self._array("views")[:], dtype=dtype)
        except Exception as exc:  # noqa: BLE001
            raise CorruptStoreError(f"store {self.path}: views cannot be read ({_one_line(exc)}); featstore "
                                    f"verify {self.path} lists every damaged chunk") from None
        return data if rows is None else data[:, np.asarray(rows, dtype=np.int64)]

    def load_maps(self, rows: np.ndarray | None = None, dtype: str = "float32", *,
                  require_done: bool = True) -> np.ndarray:
        """``[N, C, H, W]`` spatial maps (or ``[len(rows), C, H, W]``: see :meth:`gather_maps`).

        Refuses (IncompleteStoreError) a store with chunks not done yet, unless ``require_done=False``."""
        if rows is not None:
            return self.gather_maps(rows, dtype=dtype, require_done=require_done)
        self._require_maps()
        done = self.done_chunks()
        if require_done and not done.all():
            first = int(np.flatnonzero(~done)[0])
            raise IncompleteStoreError(
                f"store {self.path} has maps of {int(done.sum())}/{len(done)} chunks only (chunk {first} is not "
                f"done); resume the extraction (the same extract --maps command again) or gather done rows only")
        self._require_chunk_files("maps", np.flatnonzero(done))
        try:
            return np.asarray(self._array("maps")[:], dtype=dtype)
        except Exception as exc:  # noqa: BLE001
            raise CorruptStoreError(f"store {self.path}: maps cannot be read ({_one_line(exc)}); featstore "
                                    f"verify {self.path} lists every damaged chunk") from None

    def gather_maps(self, rows: np.ndarray, *, dtype: str = "float32", require_done: bool = True) -> np.ndarray:
        """``[len(rows), C, H, W]`` maps of the given rows, in the given order (repeats allowed).

        Only the maps chunks holding the rows are read, each once. Refuses (IncompleteStoreError naming the chunk)
        a row of a chunk that is not done yet, unless ``require_done=False``."""
        self._require_maps()
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        _check_rows(rows, self.n, "rows")
        done = self.done_chunks()
        chunk_of = rows // self.layout.chunk_rows
        if require_done and len(rows):
            pending = ~done[chunk_of]
            if pending.any():
                bad = int(np.flatnonzero(pending)[0])
                raise IncompleteStoreError(
                    f"row {int(rows[bad])} of store {self.path} is in chunk {int(chunk_of[bad])}, whose maps are not "
                    f"written yet; resume the extraction (the same extract --maps command again) first")
        arr = self._array("maps")
        out = np.empty((len(rows), *self.layout.maps_shape), dtype=dtype)
        if len(rows) == 0:
            return out
        self._require_chunk_files("maps", [int(c) for c in np.unique(chunk_of) if done[c]])
        # the maps array may use smaller row chunks than the features (MAX_MAPS_CHUNK_BYTES)
        block = int(arr.chunks[0])
        block_of = rows // block
        order = np.argsort(block_of, kind="stable")
        sorted_blocks = block_of[order]
        bounds = np.flatnonzero(np.diff(sorted_blocks)) + 1
        for s, e in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(rows)]])):
            b = int(sorted_blocks[s])
            lo, hi = b * block, min(self.n, (b + 1) * block)
            positions = order[s:e]
            try:
                values = np.asarray(arr[lo:hi])
            except Exception as exc:  # noqa: BLE001
                raise CorruptStoreError(f"store {self.path}: maps rows {lo}..{hi - 1} cannot be read "
                                        f"({_one_line(exc)}); featstore verify {self.path} lists every damaged "
                                        f"chunk") from None
            out[positions] = values[rows[positions] - lo]
        return out

    def _require_maps(self) -> None:
        if not self.layout.maps_shape:
            raise MissingArrayError(f"store {self.path} has no maps; extract it again with extract --maps LAYER")

    # ------------------------------------------------------------------ verification
    def verify(self, *, check_values: bool = True) -> list[str]:
        """Problems found, one line each (empty list = healthy): damaged metadata, done chunks whose file is
        missing, truncated or fails its checksum (features, labels, ids, maps, views), bad labels, duplicate ids,
        non-finite values, unreadable splits, meta, indexes and head caches, a fingerprint hash that does not match
        the fingerprint, stale indexes, a node a killed writer left moved aside. Never raises for a damaged store.
        Without checksums (:attr:`has_checksums` False) changed bytes cannot be detected."""
        report = _metadata_report(self.path)
        problems = [line for _, line in report]
        broken = {node for node, _ in report}
        prefix = f"store {self.path}: "

        def line(exc: BaseException) -> str:
            text = str(exc)
            text = text[len(prefix):] if text.startswith(prefix) else _one_line(exc)
            for tail in ("; re-create the store (featstore verify", "; featstore verify"):
                text = text.split(tail)[0]
            return text

        if fingerprint_hash(self.fingerprint) != self.fingerprint_hash:
            problems.append("fingerprint hash does not match the recorded fingerprint")
        if "done" in broken:
            problems.append("the done flags cannot be read, so no chunk can be checked")
            return problems
        try:
            done = self.done_chunks()
        except UserError as exc:
            problems.append(line(exc))
            return problems
        if not done.all():
            missing = np.flatnonzero(~done)
            problems.append(f"{len(missing)} of {len(done)} chunks not done (first: {int(missing[0])}); run the "
                            f"extraction again to resume")
        done_idx = [int(c) for c in np.flatnonzero(done)]
        if "features" not in broken:
            try:
                problems += self._verify_features(done_idx, check_values, line)
            except UserError as exc:
                problems.append(line(exc))
        row_arrays = ["labels", "ids"] + (["maps"] if self.layout.maps_shape else []) + \
            (["views"] if self.layout.views else [])
        for name in row_arrays:
            if name in broken:
                continue
            if not (self.path / name / "zarr.json").is_file():
                problems.append(f"array {name} is missing")
                broken.add(name)
                continue
            try:
                found = self._verify_row_array(name, done_idx, line)
            except UserError as exc:
                found = [line(exc)]
            problems += found
            if found:
                broken.add(name)
        rows = self.done_rows()
        if "labels" not in broken:
            with contextlib.suppress(UserError):
                labels = self.labels[rows]
                if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
                    problems.append(f"labels outside 0..{len(self.classes) - 1}")
        if "ids" not in broken:
            with contextlib.suppress(UserError):
                ids = self.ids[rows]
                if len(np.unique(ids)) != len(ids):
                    problems.append("duplicate sample ids")
        for parent in ("splits", "meta", "index", "cache"):
            if parent in broken:
                continue
            try:
                names = self._node_names(parent)
            except UserError as exc:
                problems.append(line(exc))
                continue
            for name in names:
                if f"{parent}/{name}" in broken:
                    continue
                try:
                    if parent in ("index", "cache"):
                        self.read_blob(parent, name)
                    else:
                        values = self._read_node(f"{parent}/{name}")
                        if parent == "splits" and len(values) and (values.min() < 0 or values.max() >= self.n):
                            problems.append(f"split {name!r} has rows outside 0..{self.n - 1}")
                except UserError as exc:
                    problems.append(line(exc))
                    broken.add(f"{parent}/{name}")
        problems += self._moved_aside_nodes()
        if "index" not in broken:
            for name in self.index_names():
                if f"index/{name}" in broken:
                    continue
                try:
                    reason = stale_reason(self, dict(self.group["index"][name].attrs).get("built_from", {}))
                except Exception as exc:  # noqa: BLE001 - a damaged index node is reported, never raised
                    problems.append(f"index {name!r} cannot be checked ({_one_line(exc)})")
                    continue
                if reason:
                    problems.append(f"index {name!r} is stale ({reason}); rebuild it with featstore index "
                                    f"{self.path} --name {name}")
        return problems

    def _verify_features(self, done_idx: list[int], check_values: bool, line) -> list[str]:
        """One line per damaged done features chunk (at most MAX_LISTED, then a count), and the first chunk with
        non-finite values."""
        out, damaged, nonfinite = [], 0, None
        raw = self._raw_format("features") is not None
        for c in done_idx:
            try:
                block = self._raw_chunk(c, done=True) if raw else self._zarr_rows("features", c, done=True)
            except UserError as exc:
                damaged += 1
                if damaged <= MAX_LISTED:
                    out.append(line(exc))
                continue
            if check_values and nonfinite is None:
                lo, hi = self.chunk_range(c)
                if not np.isfinite(block[: hi - lo]).all():
                    nonfinite = c
        if damaged > MAX_LISTED:
            out.append(f"... and {damaged - MAX_LISTED} more damaged chunks of features")
        if nonfinite is not None:
            out.append(f"non-finite features in chunk {nonfinite}")
        return out

    def _verify_row_array(self, name: str, done_idx: list[int], line) -> list[str]:
        """One line per missing or undecodable chunk of ``name`` among the done chunks (at most MAX_LISTED)."""
        out = [f"chunk file {key} is missing (its rows are lost)"
               for key in self._missing_chunk_files(name, done_idx, limit=MAX_LISTED)]
        if out:
            return out
        for c in done_idx:
            try:
                self._zarr_rows(name, c, done=False)
            except UserError as exc:
                out.append(line(exc))
                if len(out) >= MAX_LISTED:
                    out.append(f"... (further damaged chunks of {name} not listed)")
                    break
        return out

    def _moved_aside_nodes(self) -> list[str]:
        """Nodes a replacement killed between its two renames left as ``.NAME.old-*`` with NAME missing (file
        systems without an atomic exchange only)."""
        out = []
        for parent in NODE_GROUPS:
            with contextlib.suppress(OSError):
                for entry in sorted(os.scandir(self.path / parent), key=lambda e: e.name):
                    if entry.name.startswith(".") and ".old-" in entry.name and entry.is_dir():
                        name = entry.name[1:entry.name.rindex(".old-")]
                        if not (self.path / parent / name).exists():
                            out.append(f"{parent}/{name} is missing: a writer was killed while replacing it; the "
                                       f"previous one is kept as {parent}/{entry.name} and the next writer of "
                                       f"the store puts it back")
        return out

    def index_names(self) -> list[str]:
        return self.blob_names("index")


def write_store(path: str | os.PathLike, layout: Layout, features: np.ndarray, **create: Any) -> FeatureStore:
    """A complete store from in-memory ``features [n, d]``: :meth:`FeatureStore.create` with ``create``
    (fingerprint, classes, labels, ids, splits...), every chunk written in order, closed, then opened read-only."""
    store = FeatureStore.create(path, layout, **create)
    try:
        for i in range(store.n_chunks):
            lo, hi = store.chunk_range(i)
            store.write_chunk(i, features[lo:hi])
    finally:
        store.close()
    return FeatureStore.open(path)


def rows_sha256(rows: np.ndarray) -> str:
    """sha256 of row indices as little-endian int64: which rows an index covers."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype="<i8").tobytes()).hexdigest()


def index_rows(store: FeatureStore, split: str | None, done_only: bool) -> np.ndarray:
    """Store rows an index over ``store`` covers (sorted int64). Refuses rows in unfinished chunks unless
    ``done_only``, in which case those rows are left out."""
    rows = store.split(split) if split is not None else np.arange(store.n, dtype=np.int64)
    done = store.done_rows()
    missing = ~done[rows]
    if missing.any():
        if not done_only:
            total = store.done_chunks()
            raise IncompleteStoreError(
                f"store {store.path} is not complete ({int(total.sum())}/{len(total)} chunks done"
                f"{'' if split is None else f', split {split!r} has unfinished rows'}); finish the extraction "
                f"first or index the done rows only (--done-only)")
        rows = rows[~missing]
    if len(rows) == 0:
        raise UserError(f"no done rows to index in store {store.path}"
                        f"{'' if split is None else f' (split {split!r})'}")
    return rows


def stale_reason(store: FeatureStore, built_from: dict) -> str | None:
    """Why an index built from ``built_from`` no longer matches the store, or None when it is fresh.

    Here rather than in :mod:`featstore.index` because :meth:`FeatureStore.verify` reports stale indexes and the
    index module builds on this one (never the other way round)."""
    if built_from.get("fingerprint_hash") != store.fingerprint_hash:
        return "the store's fingerprint changed"
    if built_from.get("store_uuid") != store.store_uuid:
        return "it was built from another store"
    split = built_from.get("split")
    if split is not None and split not in store.split_names:
        return f"split {split!r} no longer exists"
    try:
        rows = index_rows(store, split, built_from.get("selection") == "done")
    except UserError as exc:
        return str(exc)
    if len(rows) != built_from.get("rows") or rows_sha256(rows) != built_from.get("rows_sha256"):
        return "the set of rows changed"
    return None


def _check_rows(rows: np.ndarray, n: int, what: str) -> None:
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise UserError(f"{what} outside 0..{n - 1}")


def _write_split(group: zarr.Group, name: str, rows: Iterable[int], n: int) -> None:
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    _check_rows(rows, n, f"split {name!r}")
    group.create_array(name, data=rows, chunks=(max(1, min(len(rows), 1 << 20)),), compressors=_small_codecs())


@contextlib.contextmanager
def open_store(path: str | os.PathLike):
    store = FeatureStore.open(path)
    try:
        yield store
    finally:
        store.close()

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
head caches) are written under a temporary name and renamed into place, under the writer lock. A kill -9 at any
moment therefore leaves a store that resumes to the bit-identical result. One writer at a time is enforced with an
advisory lock (released by the kernel when the writer dies); any number of readers may open the store and see only
done chunks.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import zarr

from featstore import FORMAT_VERSION, __version__
from featstore.errors import IncompleteStoreError, MissingArrayError, StoreLockedError, UserError

ATTR_KEY = "featstore"
LOCK_NAME = ".featstore.lock"
COMPRESSIONS = ("none", "lz4", "zstd")
MAX_MAPS_CHUNK_BYTES = 32 << 20
BLOB_CHUNK_BYTES = 64 << 20   # chunk size of byte nodes (indexes, head caches)


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


def _codecs(compression: str) -> tuple | None:
    if compression == "none":
        return None
    if compression in ("lz4", "zstd"):
        # level 1: the same ratio as level 3 on ReLU-like features at about 3x the encode speed.
        return (zarr.codecs.BloscCodec(cname=compression, clevel=1, shuffle="bitshuffle"),)
    raise UserError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")


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
        except (KeyError, TypeError) as exc:
            raise UserError(f"store {self.path} has damaged featstore attributes (missing {exc}); re-create it") \
                from None
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ opening and creating
    @classmethod
    def open(cls, path: str | os.PathLike) -> "FeatureStore":
        """Open an existing store read-only. Raises UserError when the path is not a store of our format."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"no store at {path}")
        if not (path / "zarr.json").is_file():
            raise UserError(f"{path} is not a Zarr v3 store (no zarr.json)")
        try:
            group = zarr.open_group(str(path), mode="r")
        except Exception as exc:  # zarr raises a zoo of types for unreadable metadata
            raise UserError(f"cannot open store {path}: {exc}") from None
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
    ) -> "FeatureStore":
        """Create a store for writing, or reopen an unfinished one with the same fingerprint and layout to resume.

        ``labels`` and ``ids`` known up front (they come from the data source) are written at creation; otherwise
        they are written chunk by chunk by :meth:`write_chunk`. Refuses (UserError, nothing changed on disk) a
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
        try:
            cls._build(tmp, layout, fingerprint=fingerprint, classes=classes, provenance=provenance or {},
                       splits=splits or {}, class_splits=class_splits or {}, meta=meta or {}, labels=labels, ids=ids)
            try:
                os.rename(tmp, path)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):  # another creator won the race: join its store
                    shutil.rmtree(tmp, ignore_errors=True)
                    store = cls._reopen_for_append(path, layout, fingerprint)
                    if lock:
                        store.acquire_lock()
                    return store
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        store = cls(path, zarr.open_group(str(path), mode="r+"), writable=True)
        if lock:
            store.acquire_lock()
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
               ids) -> None:
        n, cr = layout.n, layout.chunk_rows
        if labels is not None and len(labels) != n:
            raise UserError(f"{len(labels)} labels for {n} rows")
        if ids is not None and len(ids) != n:
            raise UserError(f"{len(ids)} ids for {n} rows")
        if ids is not None and len(set(ids)) != n:
            raise UserError("sample ids are not unique")
        group = zarr.open_group(str(tmp), mode="w-")
        group.attrs[ATTR_KEY] = {
            "format_version": FORMAT_VERSION,
            "layout": layout.to_json(),
            "fingerprint": fingerprint,
            "fingerprint_hash": fingerprint_hash(fingerprint),
            "store_uuid": uuid.uuid4().hex,
            "provenance": {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "versions": library_versions(), **provenance},
            "class_splits": {k: [int(c) for c in v] for k, v in class_splits.items()},
        }
        codecs = _codecs(layout.compression)
        exact = {"write_empty_chunks": True}  # every chunk has a file: resume and direct reads rely on it
        feat_kwargs: dict[str, Any] = dict(chunks=(cr, layout.dim), dtype=layout.dtype, fill_value=0,
                                           compressors=codecs, config=exact)
        if layout.shard_rows:
            feat_kwargs["shards"] = (layout.shard_rows, layout.dim)
        group.create_array("features", shape=(n, layout.dim), **feat_kwargs)
        group.create_array("labels", shape=(n,), chunks=(cr,), dtype="int64", fill_value=-1, compressors=codecs)
        group.create_array("ids", shape=(n,), chunks=(cr,), dtype=str)
        group.create_array("classes", shape=(len(classes),), chunks=(max(1, len(classes)),), dtype=str)
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
            mg.create_array(name, data=values, chunks=(max(1, min(n, 1 << 20)),))
        group.create_group("index")

    # ------------------------------------------------------------------ locking
    def acquire_lock(self, wait: float = 0.0) -> None:
        """Take the single-writer lock (advisory flock; the kernel drops it if the writer dies), waiting up to
        ``wait`` seconds for another writer to finish."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise StoreLockedError(f"store {self.path} is being written by another process (pid {holder}); "
                                       f"wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

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
        done = np.asarray(self.group["done"][:], dtype=bool)
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
            self._cache["classes"] = [str(c) for c in np.asarray(self.group["classes"][:]).tolist()]
        return self._cache["classes"]

    @property
    def labels(self) -> np.ndarray:
        if "labels" not in self._cache:
            self._cache["labels"] = np.asarray(self.group["labels"][:], dtype=np.int64)
        return self._cache["labels"]

    @property
    def ids(self) -> np.ndarray:
        if "ids" not in self._cache:
            self._cache["ids"] = np.asarray(np.asarray(self.group["ids"][:]).tolist(), dtype=str)
        return self._cache["ids"]

    @property
    def split_names(self) -> list[str]:
        return sorted(name for name, _ in self.group["splits"].arrays()) if "splits" in self.group else []

    def split(self, name: str) -> np.ndarray:
        """Sorted int64 row indices of a named split."""
        if name not in self.split_names:
            known = ", ".join(self.split_names) or "none"
            raise UserError(f"store {self.path} has no split {name!r} (it has: {known})")
        return np.asarray(self.group["splits"][name][:], dtype=np.int64)

    @property
    def meta_names(self) -> list[str]:
        return sorted(name for name, _ in self.group["meta"].arrays()) if "meta" in self.group else []

    def meta(self, name: str) -> np.ndarray:
        if name not in self.meta_names:
            raise UserError(f"store {self.path} has no per-sample meta {name!r} (it has: "
                            f"{', '.join(self.meta_names) or 'none'})")
        return np.asarray(self.group["meta"][name][:])

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

    def add_split(self, name: str, rows: Iterable[int], *, overwrite: bool = False) -> None:
        """Add a named subset (row indices) atomically: written under a temporary name, then renamed."""
        rows = np.unique(np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows, dtype=np.int64))
        if name in self.split_names and not overwrite:
            raise UserError(f"store {self.path} already has a split {name!r}")
        _check_rows(rows, self.n, f"split {name!r}")
        self._atomic_child("splits", name, lambda grp, tmp: _write_split(grp, tmp, rows, self.n))

    def _atomic_child(self, parent: str, name: str, write) -> None:
        """Write node ``parent/name`` under a hidden name and rename it into place (replacing an old one)."""
        if not name or "/" in name or name.startswith("."):
            raise UserError(f"bad node name {name!r}")
        if not (self.path / parent / "zarr.json").is_file():   # a group that stores of an older layout lack
            tmp_group = self.path / f".{parent}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                zarr.open_group(str(tmp_group), mode="w")
                os.rename(tmp_group, self.path / parent)
            except OSError:
                if not (self.path / parent / "zarr.json").is_file():
                    raise
            finally:
                shutil.rmtree(tmp_group, ignore_errors=True)
        group = zarr.open_group(str(self.path / parent), mode="r+")
        tmp = f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            write(group, tmp)
            final, old = self.path / parent / name, None
            if final.exists():
                old = self.path / parent / f".{name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
            try:
                os.rename(self.path / parent / tmp, final)
            except BaseException:
                if old is not None:  # put the previous node back rather than lose it
                    os.rename(old, final)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(self.path / parent / tmp, ignore_errors=True)
        self.group = zarr.open_group(str(self.path), mode="r+" if self.writable else "r")

    def write_blob(self, parent: str, name: str, data: bytes | np.ndarray, attrs: dict, *,
                   wait: float = 0.0) -> None:
        """Store bytes as node ``parent/name`` (a uint8 array with ``attrs``), atomically, under the writer lock
        (taken here unless this process holds it). UserError if another process still writes the store after
        ``wait`` seconds."""
        blob = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else \
            np.ascontiguousarray(data).view(np.uint8).reshape(-1)

        def write(group, tmp):
            chunk = int(max(1, min(blob.size, BLOB_CHUNK_BYTES)))
            arr = group.create_array(tmp, shape=blob.shape, dtype="uint8", chunks=(chunk,), compressors=None)
            arr[:] = blob
            arr.attrs.update(attrs)

        had_lock = self._lock_fd is not None
        if not had_lock:
            self.acquire_lock(wait)
        try:
            self._atomic_child(parent, name, write)
        finally:
            if not had_lock:
                self.release_lock()

    def read_blob(self, parent: str, name: str) -> tuple[np.ndarray, dict] | None:
        """(uint8 bytes, attrs) of node ``parent/name``, or None when there is none."""
        if name not in self.blob_names(parent):
            return None
        arr = self.group[parent][name]
        return np.asarray(arr[:], dtype=np.uint8), dict(arr.attrs)

    def blob_names(self, parent: str) -> list[str]:
        if parent not in self.group:
            return []
        return sorted(name for name, _ in self.group[parent].arrays() if not name.startswith("."))

    # ------------------------------------------------------------------ reading
    def _array(self, name: str):
        """Array handles are cached: opening one re-reads its metadata file, too slow for per-chunk use."""
        key = ("array", name)
        if key not in self._cache:
            self._cache[key] = self.group[name]
        return self._cache[key]

    def _raw_chunk_path(self, array: str, chunk: int) -> Path | None:
        """Path of an uncompressed, unsharded chunk file holding raw little-endian C-order bytes, or None."""
        arr = self._array(array)
        meta = arr.metadata
        codecs = getattr(meta, "codecs", ())
        if len(codecs) != 1 or type(codecs[0]).__name__ != "BytesCodec":
            return None
        if np.dtype(arr.dtype).byteorder not in ("=", "<", "|") or not np.little_endian:
            return None
        key = meta.encode_chunk_key((chunk,) + (0,) * (arr.ndim - 1))
        return self.path / array / key

    def _chunk_memmap(self, chunk: int, *, done: bool) -> np.ndarray | None:
        """A read-only memory map of an uncompressed features chunk ``[chunk_rows, D]``, or None.

        Maps of done chunks are cached: a done chunk is never rewritten by a resume, so its map stays valid.
        """
        key = ("memmap", chunk)
        if key in self._cache:
            return self._cache[key]
        path = self._raw_chunk_path("features", chunk)
        if path is None or not path.is_file():
            return None
        mapped = np.memmap(path, dtype=np.dtype(self._array("features").dtype), mode="r",
                           shape=(self.layout.chunk_rows, self.dim))
        if done:
            self._cache[key] = mapped
        return mapped

    def _read_rows(self, array: str, lo: int, hi: int, out: np.ndarray) -> None:
        """Read rows lo:hi of a 2-D array into ``out`` (any float dtype), bypassing zarr for raw chunk files."""
        cr = self.layout.chunk_rows
        arr = self._array(array)
        dtype = np.dtype(arr.dtype)
        c0, c1 = lo // cr, -(-hi // cr)
        for c in range(c0, c1):
            a, b = max(lo, c * cr), min(hi, (c + 1) * cr)
            path = self._raw_chunk_path(array, c)
            if path is not None and path.is_file():
                # Read only the needed rows of the raw chunk: the same bytes zarr would decode, at memmap speed.
                row_bytes = dtype.itemsize * self.dim
                with open(path, "rb") as fh:
                    fh.seek((a - c * cr) * row_bytes)
                    block = np.fromfile(fh, dtype=dtype, count=(b - a) * self.dim).reshape(b - a, self.dim)
                out[a - lo:b - lo] = block
            else:
                out[a - lo:b - lo] = arr[a:b]

    def load_features(self, rows: np.ndarray | None = None, *, dtype: str = "float32",
                      require_done: bool = True) -> np.ndarray:
        """Features as one in-memory array: ``[N, D]`` (or ``[len(rows), D]`` for a row subset).

        Heads should call this once and gather in memory; never index a store row by row in a hot loop.
        Raises UserError if a requested row lies in a chunk that is not done yet (unless require_done=False).
        """
        if rows is not None:
            return self.gather(rows, dtype=dtype, require_done=require_done)
        if require_done and not self.complete:
            done = self.done_chunks()
            raise IncompleteStoreError(f"store {self.path} is not complete ({int(done.sum())}/{len(done)} chunks "
                                       f"done); finish the extraction (run the same command again) or read "
                                       f"done_rows() only")
        out = np.empty((self.n, self.dim), dtype=dtype)
        self._read_rows("features", 0, self.n, out)
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
                lo, hi = self.chunk_range(c)
                chunk = np.asarray(self._array("features")[lo:hi])
            out[positions] = chunk[local]
        return out

    def load_views(self, rows: np.ndarray | None = None, dtype: str = "float32") -> np.ndarray:
        """``[V, n, D]`` extra views (all rows, or the given ones)."""
        if not self.layout.views:
            raise MissingArrayError(f"store {self.path} has no views; extract with --views K")
        data = np.asarray(self.group["views"][:], dtype=dtype)
        return data if rows is None else data[:, np.asarray(rows, dtype=np.int64)]

    def load_maps(self, rows: np.ndarray | None = None, dtype: str = "float32", *,
                  require_done: bool = True) -> np.ndarray:
        """``[N, C, H, W]`` spatial maps (or ``[len(rows), C, H, W]``: see :meth:`gather_maps`).

        Refuses (IncompleteStoreError) a store with chunks not done yet, unless ``require_done=False``."""
        if rows is not None:
            return self.gather_maps(rows, dtype=dtype, require_done=require_done)
        self._require_maps()
        if require_done and not self.complete:
            done = self.done_chunks()
            first = int(np.flatnonzero(~done)[0])
            raise IncompleteStoreError(
                f"store {self.path} has maps of {int(done.sum())}/{len(done)} chunks only (chunk {first} is not "
                f"done); resume the extraction (the same extract --maps command again) or gather done rows only")
        return np.asarray(self._array("maps")[:], dtype=dtype)

    def gather_maps(self, rows: np.ndarray, *, dtype: str = "float32", require_done: bool = True) -> np.ndarray:
        """``[len(rows), C, H, W]`` maps of the given rows, in the given order (repeats allowed).

        Only the maps chunks holding the rows are read, each once. Refuses (IncompleteStoreError naming the chunk)
        a row of a chunk that is not done yet, unless ``require_done=False``."""
        self._require_maps()
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        _check_rows(rows, self.n, "rows")
        if require_done and len(rows):
            done = self.done_chunks()
            chunk_of = rows // self.layout.chunk_rows
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
            out[positions] = np.asarray(arr[lo:hi])[rows[positions] - lo]
        return out

    def _require_maps(self) -> None:
        if not self.layout.maps_shape:
            raise MissingArrayError(f"store {self.path} has no maps; extract it again with extract --maps LAYER")

    # ------------------------------------------------------------------ verification
    def verify(self, *, check_values: bool = True) -> list[str]:
        """Problems found (empty list = healthy): missing chunks, bad labels, duplicate ids, non-finite values,
        a fingerprint hash that does not match the fingerprint, stale indexes."""
        problems = []
        if fingerprint_hash(self.fingerprint) != self.fingerprint_hash:
            problems.append("fingerprint hash does not match the recorded fingerprint")
        done = self.done_chunks()
        if not done.all():
            missing = np.flatnonzero(~done)
            problems.append(f"{len(missing)} of {len(done)} chunks not done (first: {int(missing[0])}); run the "
                            f"extraction again to resume")
        rows = self.done_rows()
        labels = self.labels[rows]
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            problems.append(f"labels outside 0..{len(self.classes) - 1}")
        ids = self.ids[rows]
        if len(np.unique(ids)) != len(ids):
            problems.append("duplicate sample ids")
        if check_values and rows.any():
            cr = self.layout.chunk_rows
            buf = np.empty((cr, self.dim), dtype=np.float32)
            for c in np.flatnonzero(done):
                lo, hi = self.chunk_range(int(c))
                self._read_rows("features", lo, hi, buf[: hi - lo])
                if not np.isfinite(buf[: hi - lo]).all():
                    problems.append(f"non-finite features in chunk {int(c)}")
                    break
        for name in self.split_names:
            split = self.split(name)
            if len(split) and (split.min() < 0 or split.max() >= self.n):
                problems.append(f"split {name!r} has rows outside 0..{self.n - 1}")
        for name in self.index_names():
            reason = stale_reason(self, dict(self.group["index"][name].attrs).get("built_from", {}))
            if reason:
                problems.append(f"index {name!r} is stale ({reason}); rebuild it with featstore index")
        return problems

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
    group.create_array(name, data=rows, chunks=(max(1, min(len(rows), 1 << 20)),))


@contextlib.contextmanager
def open_store(path: str | os.PathLike):
    store = FeatureStore.open(path)
    try:
        yield store
    finally:
        store.close()

"""FAISS indexes over a store's features: build, save inside the store, load, search, rebuild when stale.

An index lives in the store as node ``index/<name>``: a 1-D uint8 Zarr array whose bytes are
``faiss.serialize_index(index)``, followed (only when the index covers a subset of the rows: done rows of an
unfinished store, or a split) by the covered store rows as little-endian int64. Attributes::

    kind, metric, normalized, params      how it was built ("flat" | "ivf" | "hnsw", "ip" | "l2", ...)
    index_nbytes                          length of the FAISS bytes at the start of the array
    rows_array                            null (faiss id i = store row i) or {"offset", "count", "dtype": "<i8"}
    built_from                            {fingerprint_hash, store_uuid, rows, rows_sha256, selection, split,
                                           created}

A plain reader needs only ``faiss.deserialize_index(arr[:attrs["index_nbytes"]])``. An index is *stale* when the
store's fingerprint or uuid, or the set of rows it would cover today, differ from ``built_from``;
:func:`get_index` rebuilds a stale or missing index and saves it.

Scores: ``ip`` returns inner products (cosine similarity when ``normalized``), higher is closer; ``l2`` returns
*squared* Euclidean distances, lower is closer. Rows that an approximate index could not fill come back as -1.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featstore.errors import ReadOnlyStoreError, StoreLockedError, UserError
from featstore.runtime import use_all_threads
from featstore.store import FeatureStore, index_rows, rows_sha256, stale_reason

KINDS = ("flat", "ivf", "hnsw")
METRICS = ("ip", "l2")
GPU_MAX_K = 2048  # FAISS GPU k-selection limit


def _faiss():
    import faiss

    use_all_threads()
    return faiss


def _check_kind_metric(kind: str, metric: str) -> None:
    if kind not in KINDS:
        raise UserError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def default_nlist(n: int) -> int:
    """About 4 sqrt(n) inverted lists, but at least 39 training points per list (FAISS's minimum)."""
    return int(max(1, min(round(4 * np.sqrt(max(n, 1))), n // 39)))


def _as_f32(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise UserError(f"{what} must be a 2-D array [n, d], got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def build_faiss(x: np.ndarray, kind: str = "flat", metric: str = "ip", *, nlist: int | None = None,
                nprobe: int = 16, hnsw_m: int = 32, ef_search: int = 128, ef_construction: int = 200,
                seed: int = 0):
    """A CPU FAISS index over the rows of ``x`` ([n, d] float32), faiss id i = row i of ``x``.

    ``ip`` callers pass L2-normalised rows to get cosine similarity. IVF is trained (k-means) with ``seed``; HNSW
    insertion runs on all threads and is therefore not bit-reproducible run to run (its recall is).
    """
    faiss = _faiss()
    _check_kind_metric(kind, metric)
    x = _as_f32(x, "features")
    n, d = x.shape
    if n == 0:
        raise UserError("cannot build an index over zero rows")
    fmetric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    if kind == "flat":
        index = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
    elif kind == "ivf":
        nlist = default_nlist(n) if nlist is None else int(nlist)
        if not 1 <= nlist <= n:
            raise UserError(f"--nlist must be between 1 and the number of rows ({n}), not {nlist}")
        quantizer = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, fmetric)
        index.own_fields = True
        quantizer.this.disown()  # the IVF index owns (and frees) its quantizer
        index.cp.seed = int(seed)
        index.cp.min_points_per_centroid = 1  # no warning spam on small sets; nlist is capped above instead
        index.train(x)
        index.nprobe = int(max(1, min(nprobe, nlist)))
    else:
        if hnsw_m < 2:
            raise UserError(f"--hnsw-m must be at least 2, not {hnsw_m}")
        index = faiss.IndexHNSWFlat(d, int(hnsw_m), fmetric)
        index.hnsw.efConstruction = int(ef_construction)
        index.hnsw.efSearch = int(ef_search)
    index.add(x)
    return index


def _to_gpu(index, kind: str):
    """The index on all GPUs for flat and IVF when FAISS sees a GPU; otherwise (and for HNSW) the index itself."""
    faiss = _faiss()
    if kind == "hnsw" or not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() <= 0:
        return index
    # index_cpu_to_all_gpus on a machine without GPUs returns an empty index whose search asserts: checked above.
    return faiss.index_cpu_to_all_gpus(index)


def search(index, queries: np.ndarray, k: int, *, kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(scores [q, k] float32, ids [q, k] int64)`` of the k nearest faiss ids of every query, in one call.

    ``index`` is a CPU index; flat and IVF move to the GPU when ``faiss.get_num_gpus() > 0``. ``k`` larger than the
    index is clipped to its size. (For repeated searches use :class:`FeatureIndex`, which keeps the GPU copy.)
    """
    if isinstance(index, FeatureIndex):
        return index.search(queries, k)
    gpu = _to_gpu(index, kind or _kind_of(index)) if k <= GPU_MAX_K else index
    return _search(gpu, index.ntotal, queries, k)


def _search(index, ntotal: int, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    queries = _as_f32(np.atleast_2d(queries), "queries")
    if queries.shape[1] != index.d:
        raise UserError(f"queries have {queries.shape[1]} dimensions; the index has {index.d}")
    if k < 1:
        raise UserError(f"k must be at least 1, not {k}")
    k = int(min(k, ntotal))
    scores, ids = index.search(queries, k)
    return np.asarray(scores, dtype=np.float32), np.asarray(ids, dtype=np.int64)


def _kind_of(index) -> str:
    name = type(index).__name__
    if "HNSW" in name:
        return "hnsw"
    if "IVF" in name:
        return "ivf"
    return "flat"


def _normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in place (float32 C-contiguous); zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.maximum(norms, 1e-12, out=norms)
    x /= norms
    return x


@dataclass
class FeatureIndex:
    """A FAISS index over (a subset of) a store's rows, with how it was built and from which features.

    ``rows`` maps faiss ids to store rows (None: faiss id i is store row i). :meth:`search` returns store rows.
    """

    index: Any
    kind: str
    metric: str
    normalized: bool
    params: dict
    built_from: dict
    rows: np.ndarray | None = None
    _device_index: Any = field(default=None, repr=False, compare=False)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def store_rows(self) -> np.ndarray:
        """Store rows covered by the index, in faiss id order."""
        return np.arange(self.ntotal, dtype=np.int64) if self.rows is None else self.rows

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [q, k] float32, store rows [q, k] int64)``; queries are normalised when the index is cosine."""
        q = _as_f32(np.atleast_2d(queries), "queries")
        if q.shape[1] != self.dim:
            raise UserError(f"queries have {q.shape[1]} dimensions; the index has {self.dim}")
        if self.normalized:
            q = _normalize(q.copy())
        if k <= GPU_MAX_K:
            if self._device_index is None:
                self._device_index = _to_gpu(self.index, self.kind)
            target = self._device_index
        else:
            target = self.index
        scores, ids = _search(target, self.ntotal, q, k)
        if self.rows is not None:
            valid = ids >= 0
            ids = np.where(valid, self.rows[np.where(valid, ids, 0)], -1)
        return scores, ids


# ---------------------------------------------------------------------- opening
def _open(store: FeatureStore | str | os.PathLike) -> tuple[FeatureStore, bool]:
    if isinstance(store, FeatureStore):
        return store, False
    return FeatureStore.open(store), True


def build_index(store: FeatureStore | str | os.PathLike, *, kind: str = "flat", metric: str = "ip",
                normalize: bool | None = None, split: str | None = None, done_only: bool = False,
                **params) -> FeatureIndex:
    """Build an index over a store (all rows, a split's rows, or with ``done_only`` the rows of done chunks).

    ``normalize`` defaults to True for ``ip`` (cosine) and False for ``l2``. ``params`` go to :func:`build_faiss`
    (nlist, nprobe, hnsw_m, ef_search, ef_construction, seed). Features are read once.
    """
    _check_kind_metric(kind, metric)
    allowed = {"nlist", "nprobe", "hnsw_m", "ef_search", "ef_construction", "seed"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise UserError(f"unknown index parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
    params = {key: value for key, value in params.items() if value is not None}
    store, _ = _open(store)
    normalize = (metric == "ip") if normalize is None else bool(normalize)
    rows = index_rows(store, split, done_only)
    all_rows = len(rows) == store.n
    x = store.load_features() if all_rows else store.gather(rows)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if normalize:
        _normalize(x)
    index = build_faiss(x, kind, metric, **params)
    del x
    recorded = _recorded_params(index, kind, params)
    built_from = {
        "fingerprint_hash": store.fingerprint_hash,
        "store_uuid": store.store_uuid,
        "rows": int(len(rows)),
        "rows_sha256": rows_sha256(rows),
        "selection": "done" if done_only else "all",
        "split": split,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return FeatureIndex(index=index, kind=kind, metric=metric, normalized=normalize, params=recorded,
                        built_from=built_from, rows=None if all_rows else rows)


def _recorded_params(index, kind: str, given: dict) -> dict:
    out: dict[str, Any] = {}
    if kind == "ivf":
        out = {"nlist": int(index.nlist), "nprobe": int(index.nprobe), "seed": int(given.get("seed", 0))}
    elif kind == "hnsw":
        out = {"hnsw_m": int(given.get("hnsw_m", 32)), "ef_search": int(index.hnsw.efSearch),
               "ef_construction": int(index.hnsw.efConstruction)}
    return out


# ---------------------------------------------------------------------- saving and loading
def save_index(store_path: FeatureStore | str | os.PathLike, index: FeatureIndex, name: str = "default", *,
               wait: float = 0.0) -> None:
    """Store ``index`` as node ``index/<name>`` of the store, atomically, under the store's writer lock (waiting
    up to ``wait`` seconds for another writer: StoreLockedError after that; ReadOnlyStoreError when the store
    cannot be written)."""
    faiss = _faiss()
    store, opened = _open(store_path)
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"bad index name {name!r}; use letters, digits, '-' or '_'")
    built = index.built_from
    if built.get("store_uuid") != store.store_uuid or built.get("fingerprint_hash") != store.fingerprint_hash:
        raise UserError(f"this index was built from other features than those of store {store.path}; build it "
                        f"from this store (featstore index {store.path})")
    blob = np.asarray(faiss.serialize_index(index.index), dtype=np.uint8)
    nbytes = int(blob.size)
    rows_array = None
    if index.rows is not None:
        rows = np.ascontiguousarray(index.rows, dtype="<i8")
        rows_array = {"offset": nbytes, "count": int(len(rows)), "dtype": "<i8"}
        blob = np.concatenate([blob, rows.view(np.uint8)])
    attrs = {"kind": index.kind, "metric": index.metric, "normalized": bool(index.normalized),
             "params": index.params, "built_from": built, "index_nbytes": nbytes, "rows_array": rows_array,
             "faiss_version": faiss.__version__}

    try:
        store.write_blob("index", name, blob, attrs, wait=wait)
    finally:
        if opened:
            store.close()


def load_index(store: FeatureStore | str | os.PathLike, name: str = "default") -> FeatureIndex:
    """The index saved as ``index/<name>`` (UserError naming the fix when there is none)."""
    faiss = _faiss()
    store, _ = _open(store)
    names = store.index_names()
    if name not in names:
        raise UserError(f"store {store.path} has no index {name!r} (it has: {', '.join(names) or 'none'}); build "
                        f"it with: featstore index {store.path} --name {name}")
    blob, attrs = store.read_blob("index", name)
    nbytes = int(attrs.get("index_nbytes", blob.size))
    try:
        index = faiss.deserialize_index(np.ascontiguousarray(blob[:nbytes]))
    except Exception as exc:  # noqa: BLE001 - FAISS raises RuntimeError with a C++ message
        raise UserError(f"index {name!r} of store {store.path} cannot be read ({' '.join(str(exc).split())[:120]});"
                        f" rebuild it with: featstore index {store.path} --name {name}") from None
    rows = None
    spec = attrs.get("rows_array")
    if spec:
        off, count = int(spec["offset"]), int(spec["count"])
        rows = blob[off:off + 8 * count].view(np.dtype(spec.get("dtype", "<i8"))).astype(np.int64)
    kind = attrs.get("kind", _kind_of(index))
    params = dict(attrs.get("params", {}))
    if kind == "ivf" and "nprobe" in params:
        index.nprobe = int(params["nprobe"])
    if kind == "hnsw" and "ef_search" in params:
        index.hnsw.efSearch = int(params["ef_search"])
    return FeatureIndex(index=index, kind=kind, metric=attrs.get("metric", "ip"),
                        normalized=bool(attrs.get("normalized", False)), params=params,
                        built_from=dict(attrs.get("built_from", {})), rows=rows)


def index_attrs(store: FeatureStore, name: str) -> dict:
    """The attributes of ``index/<name>`` without reading the index bytes."""
    return dict(store.group["index"][name].attrs)


def is_stale(store: FeatureStore | str | os.PathLike, index: FeatureIndex) -> bool:
    """True when the store's fingerprint or uuid, or the rows the index should cover, differ from its build."""
    store, _ = _open(store)
    return stale_reason(store, index.built_from) is not None


def get_index(store_path: FeatureStore | str | os.PathLike, name: str = "default", *, kind: str | None = None,
              metric: str | None = None, rebuild: bool = True, **build_kwargs) -> FeatureIndex:
    """The saved index ``name``, rebuilt (and saved) when missing, stale, or of another kind / metric than asked.

    A stale index is rebuilt with its recorded kind, metric, normalisation, parameters and split. With
    ``rebuild=False`` a missing or stale index is a UserError naming the fix. A rebuilt index that cannot be
    saved because another process holds the store's writer lock, or because the store is read-only here, is
    returned unsaved (with a note on stderr).
    """
    if kind is not None or metric is not None:
        _check_kind_metric(kind or "flat", metric or "ip")
    store, opened = _open(store_path)
    try:
        existing, reason = None, "it does not exist"
        if name in store.index_names():
            existing = load_index(store, name)
            reason = stale_reason(store, existing.built_from)
            if reason is None and kind is not None and kind != existing.kind:
                reason = f"it is a {existing.kind} index, not {kind}"
            if reason is None and metric is not None and metric != existing.metric:
                reason = f"its metric is {existing.metric}, not {metric}"
            if reason is None:
                return existing
        if not rebuild:
            raise UserError(f"index {name!r} of store {store.path} cannot be used ({reason}); build it with: "
                            f"featstore index {store.path} --name {name}")
        if existing is not None:
            spec = {"kind": existing.kind, "metric": existing.metric, "normalize": existing.normalized,
                    "split": existing.built_from.get("split"),
                    "done_only": existing.built_from.get("selection") == "done", **existing.params}
            if kind is not None and kind != existing.kind:  # other kind: the old kind's parameters do not apply
                spec = {k: v for k, v in spec.items() if k in ("kind", "metric", "normalize", "split", "done_only")}
            if metric is not None and metric != existing.metric:
                spec.pop("normalize")
        else:
            spec = {}
        spec.update({k: v for k, v in build_kwargs.items() if v is not None})
        if kind is not None:
            spec["kind"] = kind
        if metric is not None:
            spec["metric"] = metric
        built = build_index(store, **spec)
        try:
            save_index(store, built, name)
        except (StoreLockedError, ReadOnlyStoreError) as exc:
            print(f"featstore: note: index {name!r} rebuilt in memory but not saved ({exc})", file=sys.stderr)
        return built
    finally:
        if opened:
            store.close()

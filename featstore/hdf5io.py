"""The low-shot paper's HDF5 feature files, both ways.

Layout of the files that ``save_features.py`` of the original code writes (Hariharan & Girshick 2017,
facebookresearch/low-shot-shrink-hallucinate)::

    all_feats   float32 [max_count, d]   row i = sample i of the list
    all_labels  int32   [max_count]
    count       int32   [1]              the true number of samples

The original files pad ``all_feats`` / ``all_labels`` to a multiple of the batch size with zero rows labelled 0.
:func:`export_hdf5` writes no padding (``max_count == count``); :func:`import_hdf5` drops rows >= ``count``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from featstore.atomic import atomic_path
from featstore.checkpoint import sha256_file
from featstore.errors import IncompleteStoreError, UserError
from featstore.runtime import progress_bar
from featstore.store import FeatureStore, Layout

HDF5_DATASETS = ("all_feats", "all_labels", "count")


def _bar(total: int, desc: str, progress: bool):
    return progress_bar(total, desc, quiet=not progress, unit="rows")


def export_hdf5(store: FeatureStore | str | os.PathLike, out_path: str | os.PathLike, split: str | None = None,
                *, progress: bool = False, block_rows: int | None = None) -> int:
    """Write the store's rows (or a split's rows) as ``all_feats`` / ``all_labels`` / ``count``; returns the count.

    Features become float32, labels int32. Written to a temporary file beside ``out_path`` and renamed into place,
    so a failed export leaves no partial file. Refuses a store whose requested rows are not all done, and an
    ``out_path`` that (symlinks resolved) is the store or lies inside it or any other Zarr store.
    """
    import h5py

    if not isinstance(store, FeatureStore):
        store = FeatureStore.open(store)
    out_path = Path(out_path)
    _refuse_inside_store(out_path, store)
    parent = out_path.parent if str(out_path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write {out_path}: the folder {parent} does not exist")
    if out_path.is_dir():
        raise UserError(f"cannot write {out_path}: it is a folder; give a file name such as features.h5")
    rows = store.split(split) if split is not None else None
    done = store.done_rows()
    if (rows is None and not done.all()) or (rows is not None and not done[rows].all()):
        chunks = store.done_chunks()
        raise IncompleteStoreError(f"store {store.path} is not complete ({int(chunks.sum())}/{len(chunks)} chunks "
                                   f"done); finish the extraction before exporting")
    count = store.n if rows is None else len(rows)
    if count == 0:
        raise UserError(f"split {split!r} of store {store.path} is empty; nothing to export")
    labels = store.labels if rows is None else store.labels[rows]
    if len(labels) and (labels.min() < np.iinfo(np.int32).min or labels.max() > np.iinfo(np.int32).max):
        raise UserError("labels do not fit in int32")
    block = int(block_rows or max(store.layout.chunk_rows, 1))
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as h5:
        feats = h5.create_dataset("all_feats", shape=(count, store.dim), dtype="float32")
        h5.create_dataset("all_labels", data=labels.astype(np.int32))
        h5.create_dataset("count", data=np.array([count], dtype=np.int32))
        with _bar(count, "export", progress) as bar:
            for lo in range(0, count, block):
                hi = min(count, lo + block)
                sel = np.arange(lo, hi, dtype=np.int64) if rows is None else rows[lo:hi]
                feats[lo:hi] = store.gather(sel, dtype="float32")
                bar.update(hi - lo)
    return count


def _refuse_inside_store(out_path: Path, store: FeatureStore) -> None:
    """UserError when ``out_path`` (symlinks resolved) is the store, lies in it, or lies in any Zarr hierarchy.

    Renaming the finished file over ``S.zarr/zarr.json`` or a chunk would destroy or silently change a store."""
    real = Path(os.path.realpath(out_path))
    store_real = Path(os.path.realpath(store.path))
    for folder in (real, *real.parents):
        if folder == store_real or (folder.is_dir() and any((folder / marker).exists()
                                                            for marker in ("zarr.json", ".zgroup", ".zarray"))):
            where = "the store being exported" if folder == store_real else f"the Zarr store {folder}"
            raise UserError(f"refusing to write {out_path}: it lies inside {where}; write the HDF5 file outside "
                            "any store")




# Labels above this need a classes file: without one the names "0".."<max label>" are made, and a file with a stray
# huge label (2**31 - 1) would otherwise ask for billions of them. ImageNet-21k has 21,841 classes.
MAX_IMPLIED_CLASSES = 100_000


def read_hdf5_header(h5) -> tuple[int, int, int]:
    """``(count, rows, dim)`` of an open h5py file in the low-shot layout; UserError when it is not one."""
    import h5py

    name = getattr(h5, "filename", "the file")
    missing = [key for key in HDF5_DATASETS if key not in h5]
    if missing:
        raise UserError(f"{name} is not a low-shot feature file: no dataset(s) {', '.join(missing)} (needs "
                        f"all_feats, all_labels, count)")
    for key in HDF5_DATASETS:
        link = h5.get(key, getlink=True)
        if isinstance(link, h5py.ExternalLink):  # would make h5py open (and read) another file on this machine
            raise UserError(f"{name}: {key} is a link into another file ({link.filename}); import the file itself")
        node = h5[key]
        if not isinstance(node, h5py.Dataset):
            raise UserError(f"{name}: {key} must be a dataset, not a {type(node).__name__.lower()}")
        if node.is_virtual or node.external:
            raise UserError(f"{name}: {key} keeps its data in other files; import a self-contained file")
    feats, labels, count_ds = h5["all_feats"], h5["all_labels"], h5["count"]
    if len(feats.shape) != 2 or feats.shape[1] == 0:
        raise UserError(f"{name}: all_feats must be 2-D [rows, dim], got shape {feats.shape}")
    if len(labels.shape) != 1:
        raise UserError(f"{name}: all_labels must be 1-D [rows], got shape {labels.shape}")
    if labels.shape[0] != feats.shape[0]:
        raise UserError(f"{name}: all_feats has {feats.shape[0]} rows but all_labels has {labels.shape[0]}")
    if count_ds.shape is None or count_ds.size != 1:
        raise UserError(f"{name}: count must hold one number, got shape {count_ds.shape}")
    if not np.issubdtype(feats.dtype, np.floating) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{name}: all_feats must be floating point and all_labels integer (got {feats.dtype}, "
                        f"{labels.dtype})")
    count = _count_value(count_ds, name)
    rows = int(feats.shape[0])
    if count > rows:
        raise UserError(f"{name}: count is {count} but the file holds only {rows} rows")
    if count <= 0:
        raise UserError(f"{name}: count is {count}; there are no rows to import")
    return count, rows, int(feats.shape[1])


def _count_value(count_ds, name: str) -> int:
    """The integer in ``count``: an integer dtype, or a float holding a whole number (never truncated)."""
    kind = count_ds.dtype
    if not (np.issubdtype(kind, np.integer) or np.issubdtype(kind, np.floating)):
        raise UserError(f"{name}: count must be a number, not {kind}")
    value = np.asarray(count_ds[()]).reshape(-1)[0]
    if np.issubdtype(kind, np.floating):
        if not np.isfinite(value) or value != np.floor(value):
            raise UserError(f"{name}: count is {float(value):g}, not a whole number of rows")
    return int(value)


def _read(dataset, rows: slice, path: Path) -> np.ndarray:
    """``dataset[rows]``; a damaged file (a bad chunk, a filter missing here) is one line, not h5py's traceback."""
    try:
        return np.asarray(dataset[rows])
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: cannot read {dataset.name.lstrip('/')} rows {rows.start}..{rows.stop - 1} "
                        f"({' '.join(str(exc).split())[:100]})") from None


def import_hdf5(h5_path: str | os.PathLike, out_store_path: str | os.PathLike, classes: Sequence[str] | None = None,
                chunk_rows: int = 4096, dtype: str = "float32", compression: str = "none", *,
                progress: bool = False) -> FeatureStore:
    """Make a complete store from a low-shot HDF5 file; returns it opened read-only.

    Rows >= ``count`` (the originals' zero padding labelled 0) are dropped with a note on stderr. The fingerprint is
    ``{"model": "imported-hdf5", "source_sha256": ..., "dtype": ...}``; ids are ``row/<i>``; classes are the given
    names or ``"0"`` .. ``"<max label>"``. Running it again on an interrupted import resumes it.

    The file is checked before the store is made (UserError, one line): the three names must be datasets of this
    file (no groups, no links or storage in other files), ``count`` an integer or a float holding a whole number,
    labels non-negative and, without ``classes``, below ``max(count, MAX_IMPLIED_CLASSES)``.
    """
    import h5py

    h5_path = Path(h5_path)
    if not h5_path.is_file():
        raise UserError(f"no HDF5 file at {h5_path}")
    Layout(n=1, dim=1, dtype=dtype, chunk_rows=chunk_rows, compression=compression).check()
    try:
        h5 = h5py.File(h5_path, "r")
    except OSError as exc:
        raise UserError(f"{h5_path} is not a readable HDF5 file ({' '.join(str(exc).split())[:100]})") from None
    with h5:
        count, rows, dim = read_hdf5_header(h5)
        labels = _read(h5["all_labels"], slice(0, count), h5_path)
        if np.issubdtype(labels.dtype, np.unsignedinteger) and labels.max() > np.iinfo(np.int64).max:
            raise UserError(f"{h5_path}: label {int(labels.max())} does not fit in int64")
        labels = labels.astype(np.int64)
        if labels.min() < 0:
            raise UserError(f"{h5_path}: negative labels (first at row {int(np.argmax(labels < 0))})")
        n_classes = int(labels.max()) + 1
        if classes is None:
            bound = max(count, MAX_IMPLIED_CLASSES)
            if n_classes > bound:
                raise UserError(f"{h5_path}: label {n_classes - 1} (row {int(np.argmax(labels == n_classes - 1))}) "
                                f"is implausible for {count} rows; give the class names (--classes, one per line) "
                                "if there really are that many classes")
            classes = [str(c) for c in range(n_classes)]
        else:
            classes = [str(c) for c in classes]
            if len(classes) < n_classes:
                raise UserError(f"{len(classes)} class names given but the labels go up to {n_classes - 1}; give at "
                                f"least {n_classes} names (one per line)")
            if len(set(classes)) != len(classes):
                raise UserError("the class names are not unique")
        dropped = rows - count
        if dropped:
            print(f"featstore: dropped {dropped} padding row(s) >= count ({count}) from {h5_path}", file=sys.stderr)
        fingerprint = {"model": "imported-hdf5", "source_sha256": sha256_file(h5_path), "dtype": dtype}
        layout = Layout(n=count, dim=dim, dtype=dtype, chunk_rows=chunk_rows, compression=compression)
        provenance = {"source": {"hdf5": str(h5_path.resolve()), "count": count, "rows_in_file": rows,
                                 "dropped_padding_rows": dropped}}
        store = FeatureStore.create(out_store_path, layout, fingerprint=fingerprint, classes=classes,
                                    provenance=provenance, labels=labels, ids=[f"row/{i}" for i in range(count)])
        try:
            done = store.done_chunks()
            feats = h5["all_feats"]
            with _bar(count, "import", progress) as bar:
                for i in range(store.n_chunks):
                    lo, hi = store.chunk_range(i)
                    if not done[i]:  # resume: finished chunks are never rewritten
                        block = _read(feats, slice(lo, hi), h5_path).astype(np.float32, copy=False)
                        store.write_chunk(i, block)
                    bar.update(hi - lo)
        finally:
            store.close()
    return FeatureStore.open(out_store_path)

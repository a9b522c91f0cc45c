"""featstore/hdf5io.py on files it did not write: malformed HDF5 imports, and exports aimed into a store."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from featstore.cli import main
from featstore.hdf5io import MAX_IMPLIED_CLASSES
from featstore.store import FeatureStore, Layout, write_store

N, D = 40, 6


def featstore(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run the ``featstore`` command in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["featstore", *map(str, args)])
    monkeypatch.delenv("FEATSTORE_DEBUG", raising=False)
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_exit_2(code: int, out: str, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("featstore: error: "), err
    assert "Traceback" not in err
    return lines[0]


def tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        digest.update(str(p.relative_to(path)).encode())
        if p.is_file() and not p.is_symlink():
            digest.update(p.read_bytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------------
# import of malformed files


def _write(path: Path, **datasets) -> Path:
    """An HDF5 file with the good layout, each keyword replacing one dataset (a callable gets the file)."""
    good = {"all_feats": np.ones((N, D), np.float32), "all_labels": np.arange(N, dtype=np.int32) % 4,
            "count": np.array([N], np.int32)}
    with h5py.File(path, "w") as h5:
        for key, value in {**good, **datasets}.items():
            if callable(value):
                value(h5, key)
            else:
                h5[key] = value
    return path


def _group(h5, key):
    h5.create_group(key).create_dataset("x", data=np.zeros(3))


def _labels_with(value, dtype=np.int64):
    labels = (np.arange(N) % 4).astype(dtype)
    labels[7] = value
    return labels


def _external(tmp):
    def make(h5, key):
        with h5py.File(tmp / "elsewhere.h5", "w") as other:
            other["x"] = np.ones((N, D), np.float32)
        h5[key] = h5py.ExternalLink(str(tmp / "elsewhere.h5"), "/x")
    return make


MALFORMED = {
    "count-string": lambda tmp: {"count": np.array([b"40"])},
    "count-vlen-string": lambda tmp: {"count": lambda h5, k: h5.create_dataset(k, data=["40"],
                                                                               dtype=h5py.string_dtype())},
    "count-float-50.7": lambda tmp: {"count": np.array([N - 0.3])},
    "count-nan": lambda tmp: {"count": np.array([np.nan])},
    "count-bool": lambda tmp: {"count": np.array([True])},
    "count-group": lambda tmp: {"count": _group},
    "feats-group": lambda tmp: {"all_feats": _group},
    "labels-group": lambda tmp: {"all_labels": _group},
    "feats-external-link": lambda tmp: {"all_feats": _external(tmp)},
    "label-2^31-1": lambda tmp: {"all_labels": _labels_with(2**31 - 1, np.int32)},
    "label-2^63-1": lambda tmp: {"all_labels": _labels_with(2**63 - 1)},
    "label-uint64-max": lambda tmp: {"all_labels": _labels_with(2**64 - 1, np.uint64)},
    "label-just-above-bound": lambda tmp: {"all_labels": _labels_with(MAX_IMPLIED_CLASSES)},
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_import_malformed_is_one_line_exit_2(tmp_path, monkeypatch, capsys, case):
    src = _write(tmp_path / "bad.h5", **MALFORMED[case](tmp_path))
    out = tmp_path / "new.zarr"
    line = assert_one_line_exit_2(*featstore(monkeypatch, capsys, "import", src, "--out", out, "-q"))
    assert "bad.h5" in line or "elsewhere" in line
    assert not out.exists()


def test_import_integral_float_count_and_plausible_labels(tmp_path, monkeypatch, capsys):
    # a float count that holds a whole number is that number; a label of 999 among 40 rows (the novel classes
    # of ImageNet-1k) is plausible and gives the names "0".."999"
    src = _write(tmp_path / "ok.h5", count=np.array([30.0]), all_labels=_labels_with(999))
    code, _, err = featstore(monkeypatch, capsys, "import", src, "--out", tmp_path / "ok.zarr", "-q")
    assert code == 0, err
    st = FeatureStore.open(tmp_path / "ok.zarr")
    assert st.n == 30 and len(st.classes) == 1000 and st.classes[999] == "999"
    np.testing.assert_array_equal(st.labels, _labels_with(999)[:30])


def test_import_huge_label_with_classes_file_is_checked_against_it(tmp_path, monkeypatch, capsys):
    src = _write(tmp_path / "big.h5", all_labels=_labels_with(2**31 - 1, np.int32))
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(f"c{k}" for k in range(10)) + "\n")
    line = assert_one_line_exit_2(*featstore(monkeypatch, capsys, "import", src, "--out", tmp_path / "n.zarr",
                                             "--classes", names, "-q"))
    assert "10 class names" in line


# ------------------------------------------------------------------------------------------------------------
# export into a store


def _store(path: Path) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((N, D)).astype(np.float32)
    write_store(path, Layout(n=N, dim=D, dtype="float32", chunk_rows=16), x, fingerprint={"model": "toy"},
                classes=["a", "b", "c", "d"], labels=np.arange(N) % 4, ids=[f"r/{i}" for i in range(N)])
    return x


TARGETS = ["zarr.json", "features/c/0/0", "features/zarr.json", "new.h5", "features/new.h5", "nofolder/new.h5",
           ".", "link-to-zarr.json", "link-to-store/x.h5", "other-store/x.h5"]


@pytest.mark.parametrize("target", TARGETS)
def test_export_into_a_store_is_refused_and_the_store_is_untouched(tmp_path, monkeypatch, capsys, target):
    path = tmp_path / "S.zarr"
    x = _store(path)
    _store(tmp_path / "other-store")
    os.symlink(path / "zarr.json", tmp_path / "link-to-zarr.json")
    os.symlink(path, tmp_path / "link-to-store")
    out = tmp_path / target if target.startswith(("link", "other")) else path / target
    before = tree_hash(tmp_path)
    line = assert_one_line_exit_2(*featstore(monkeypatch, capsys, "export", path, "--hdf5", out, "-q"))
    assert "inside" in line
    assert tree_hash(tmp_path) == before
    st = FeatureStore.open(path)
    assert st.verify() == [] and st.complete
    np.testing.assert_array_equal(st.load_features(), x)


def test_export_beside_a_store_still_works(tmp_path, monkeypatch, capsys):
    path = tmp_path / "S.zarr"
    x = _store(path)
    code, _, err = featstore(monkeypatch, capsys, "export", path, "--hdf5", tmp_path / "S.h5", "-q")
    assert code == 0, err
    with h5py.File(tmp_path / "S.h5", "r") as h5:
        np.testing.assert_array_equal(h5["all_feats"][:], x)

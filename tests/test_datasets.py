"""Tests for extract/datasets.py: every source on tiny data made here, the transforms, and the real data sets.

The made-up data sets are a few images each; the real ones (Omniglot tars, Fashion-MNIST IDX files) come from
the `shared_data` fixture and skip where FEATSTORE_DATA is not set.
"""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing as mp
import os
import pickle
import struct
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from extract.datasets import (
    Source,
    build_augment,
    build_transform,
    list_sources,
    open_source,
    read_idx,
    register_source,
    transform_spec,
)
from featstore.errors import UserError


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


# ------------------------------------------------------------------------------------------------------------
# registry and common errors


def test_registry_lists_all_sources():
    names = list_sources()
    for n in ["digits", "fashion-mnist", "omniglot", "cifar10", "cifar100", "imagefolder", "csv", "imagenet-lowshot"]:
        assert n in names
    assert names == sorted(names)


def test_unknown_source_lists_known_ones():
    with pytest.raises(UserError) as e:
        open_source("nosuch", "/tmp")
    assert "nosuch" in str(e.value) and "omniglot" in str(e.value) and "fashion-mnist" in str(e.value)


def test_duplicate_registration_raises():
    with pytest.raises(UserError, match="twice"):
        register_source("digits")(type("Dup", (Source,), {}))


def test_missing_root_and_no_root(tmp_path):
    missing = tmp_path / "nope"
    for name in ["fashion-mnist", "omniglot", "cifar10", "cifar100", "imagefolder", "csv", "imagenet-lowshot"]:
        with pytest.raises(UserError) as e:
            open_source(name, missing)
        assert str(missing) in str(e.value)
        with pytest.raises(UserError, match="needs a root"):
            open_source(name)


def test_unknown_option(tmp_path):
    with pytest.raises(UserError, match="no option colour"):
        open_source("imagefolder", tmp_path, colour=True)


# ------------------------------------------------------------------------------------------------------------
# digits


def test_digits():
    from sklearn.datasets import load_digits

    s = open_source("digits")
    assert len(s) == 1797 and s.classes == [str(k) for k in range(10)]
    assert s.ids[0] == "digits/0" and s.ids[-1] == "digits/1796"
    assert s.grayscale and s.native_size == 8 and s.root is None
    d = load_digits()
    np.testing.assert_array_equal(s.labels, d.target)
    img = s.load(5)
    assert img.mode == "L" and img.size == (8, 8)
    np.testing.assert_array_equal(_pixels(img), np.rint(d.images[5] * 255 / 16).astype(np.uint8))
    assert _pixels(s.load(0)).max() <= 255
    assert s.manifest_hash() == open_source("digits").manifest_hash()
    json.dumps(s.describe())
    with pytest.raises(UserError, match="unknown split 'train'"):
        open_source("digits", split="train")


# ------------------------------------------------------------------------------------------------------------
# fashion-mnist


def _write_idx(path: Path, arr: np.ndarray, magic: int, gz: bool) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def fashion_root(tmp_path):
    rng = _rng(1)
    root = tmp_path / "fm"
    root.mkdir()
    xtr = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    ytr = np.arange(20) % 10
    xte = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)
    yte = np.arange(10)[::-1]
    _write_idx(root / "train-images-idx3-ubyte", xtr, 2051, gz=True)
    _write_idx(root / "train-labels-idx1-ubyte", ytr, 2049, gz=True)
    _write_idx(root / "t10k-images-idx3-ubyte", xte, 2051, gz=False)  # one plain file: both forms are read
    _write_idx(root / "t10k-labels-idx1-ubyte", yte, 2049, gz=False)
    return root, xtr, ytr, xte, yte


def test_fashion_mnist(fashion_root):
    root, xtr, ytr, xte, yte = fashion_root
    s = open_source("fashion-mnist", root)
    assert len(s) == 30 and s.classes[0] == "T-shirt/top" and s.classes[9] == "Ankle boot"
    assert s.ids[:2] == ["train/0", "train/1"] and s.ids[20] == "test/0"
    np.testing.assert_array_equal(s.labels, np.concatenate([ytr, yte]))
    np.testing.assert_array_equal(s.splits["train"], np.arange(20))
    np.testing.assert_array_equal(s.splits["test"], np.arange(20, 30))
    assert s.splits["train"].dtype == np.int64
    img = s.load(3)
    assert img.mode == "L" and img.size == (28, 28)
    np.testing.assert_array_equal(_pixels(img), xtr[3])
    np.testing.assert_array_equal(_pixels(s.load(22)), xte[2])
    assert s.ids == open_source("fashion-mnist", root).ids

    t = open_source("fashion-mnist", root, split="test")
    assert len(t) == 10 and t.ids[0] == "test/0" and t.classes == s.classes
    np.testing.assert_array_equal(t.labels, yte)
    np.testing.assert_array_equal(_pixels(t.load(2)), xte[2])
    assert list(t.splits) == ["test"]
    assert t.manifest_hash() != s.manifest_hash()
    with pytest.raises(UserError) as e:
        open_source("fashion-mnist", root, split="val")
    assert "train" in str(e.value) and "test" in str(e.value)


def test_fashion_mnist_errors(fashion_root, tmp_path):
    root = fashion_root[0]
    h = open_source("fashion-mnist", root).manifest_hash()
    # a changed label changes the manifest
    _write_idx(root / "t10k-labels-idx1-ubyte", np.arange(10), 2049, gz=False)
    assert open_source("fashion-mnist", root).manifest_hash() != h
    # wrong magic number
    _write_idx(root / "t10k-labels-idx1-ubyte", np.arange(10), 2051, gz=False)
    with pytest.raises(UserError) as e:
        open_source("fashion-mnist", root)
    assert "magic" in str(e.value) and "t10k-labels-idx1-ubyte" in str(e.value)
    # missing file
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(UserError) as e:
        open_source("fashion-mnist", root)
    assert "t10k-labels-idx1-ubyte" in str(e.value) and str(root) in str(e.value)
    # truncated data
    p = tmp_path / "short"
    p.write_bytes(struct.pack(">IIII", 2051, 2, 28, 28) + b"\0" * 10)
    with pytest.raises(UserError, match="header says"):
        read_idx(p, 2051)


# ------------------------------------------------------------------------------------------------------------
# omniglot: the same tiny tree as a folder, a tar and a zip


OMNI = {  # set -> alphabet -> number of characters; character ids count up like the real ones
    "images_background": {"Latin": 2, "Greek": 1},
    "images_evaluation": {"Angelic": 2},
}
DRAWERS = 3


def _omni_files() -> dict[str, bytes]:
    """Relative path -> PNG bytes of 1-bit 105x105 images, each different."""
    rng = _rng(2)
    files = {}
    cid = 0
    for s, alphas in OMNI.items():
        for alpha, n in sorted(alphas.items()):
            for c in range(1, n + 1):
                cid += 1
                for d in range(1, DRAWERS + 1):
                    arr = rng.random((105, 105)) > 0.1
                    buf = io.BytesIO()
                    Image.fromarray(arr).convert("1").save(buf, format="PNG")
                    files[f"{s}/{alpha}/character{c:02d}/{cid:04d}_{d:02d}.png"] = buf.getvalue()
    return files


@pytest.fixture(scope="module")
def omni_roots(tmp_path_factory):
    files = _omni_files()
    base = tmp_path_factory.mktemp("omni")
    tree, tar_root, zip_root = base / "tree", base / "tar", base / "zip"
    for rel, data in files.items():
        p = tree / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    tar_root.mkdir()
    zip_root.mkdir()
    for s in OMNI:
        with tarfile.open(tar_root / f"{s}.tar", "w", format=tarfile.GNU_FORMAT) as tf:
            tf.add(tree / s, arcname=s)  # directories included, as GNU tar writes them
        with zipfile.ZipFile(zip_root / f"{s}.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for rel in sorted(files):
                if rel.startswith(s + "/"):
                    zf.writestr(rel, files[rel])
            zf.writestr("__MACOSX/._junk", b"x")  # junk the official zips' relatives carry; must be ignored
    return {"tree": tree, "tar": tar_root, "zip": zip_root, "files": files}


def test_omniglot_tree_tar_zip_agree(omni_roots):
    files = omni_roots["files"]
    srcs = {k: open_source("omniglot", omni_roots[k]) for k in ("tree", "tar", "zip")}
    ref = srcs["tree"]
    n = sum(len(a) and sum(a.values()) for a in OMNI.values()) * DRAWERS
    assert len(ref) == n == len(files) == 15
    assert ref.ids == sorted(files, key=lambda r: (r.rsplit("/", 1)[0], r))
    assert ref.classes[0] == "images_background/Greek/character01"
    assert ref.classes[-1] == "images_evaluation/Angelic/character02"
    assert len(ref.classes) == 5
    assert ref.alphabets == ["images_background/Greek", "images_background/Latin", "images_evaluation/Angelic"]
    np.testing.assert_array_equal(ref.meta["drawer"], np.tile(np.arange(1, DRAWERS + 1), 5))
    np.testing.assert_array_equal(ref.meta["alphabet"], np.repeat([0, 1, 1, 2, 2], DRAWERS))
    np.testing.assert_array_equal(ref.splits["background"], np.arange(9))
    np.testing.assert_array_equal(ref.splits["evaluation"], np.arange(9, 15))
    for k, s in srcs.items():
        assert s.ids == ref.ids and s.classes == ref.classes, k
        np.testing.assert_array_equal(s.labels, ref.labels)
        np.testing.assert_array_equal(s.meta["drawer"], ref.meta["drawer"])
        assert s.manifest_hash() == ref.manifest_hash(), k  # sizes from stat and from the archive index agree
        for i in (0, 7, 14):
            img = s.load(i)
            assert img.mode == "L" and img.size == (105, 105)
            want = np.asarray(Image.open(io.BytesIO(files[s.ids[i]])).convert("L"))
            np.testing.assert_array_equal(_pixels(img), want)
            assert set(np.unique(_pixels(img))) <= {0, 255}
    for s in srcs.values():
        s.close()


def test_omniglot_split_and_missing_set(omni_roots, tmp_path):
    s = open_source("omniglot", omni_roots["tar"], split="evaluation")
    assert len(s) == 6 and len(s.classes) == 2 and all(c.startswith("images_evaluation/") for c in s.classes)
    assert s.ids[0] == "images_evaluation/Angelic/character01/0004_01.png"
    assert list(s.splits) == ["evaluation"] and s.split == "evaluation"
    with pytest.raises(UserError) as e:
        open_source("omniglot", omni_roots["tar"], split="test")
    assert "background" in str(e.value) and "evaluation" in str(e.value)
    # only the background tar present: the whole source is background, evaluation is a clear error
    only = tmp_path / "only"
    only.mkdir()
    (only / "images_background.tar").write_bytes((omni_roots["tar"] / "images_background.tar").read_bytes())
    assert len(open_source("omniglot", only)) == 9
    with pytest.raises(UserError, match="images_evaluation"):
        open_source("omniglot", only, split="evaluation")
    with pytest.raises(UserError, match="no images_background"):
        open_source("omniglot", tmp_path)  # holds only the folder "only": no sets here
    # a gzip'd tar is refused with the fix
    gz = tmp_path / "gz"
    gz.mkdir()
    tar_bytes = (omni_roots["tar"] / "images_background.tar").read_bytes()
    (gz / "images_background.tar").write_bytes(gzip.compress(tar_bytes))
    with pytest.raises(UserError, match="gunzip"):
        open_source("omniglot", gz)


_FORKED: dict = {}


def _child_load(i):
    # runs in a forked worker: the source was inherited from the parent, handle and all (no pickling)
    src = _FORKED["src"]
    data = np.asarray(src.load(i)).tobytes()
    arch = next(iter(src._archives.values()))
    return data, os.getpid(), arch._pid


@pytest.mark.parametrize("form", ["tar", "zip"])
def test_omniglot_archive_after_fork_and_pickle(omni_roots, form):
    s = open_source("omniglot", omni_roots[form])
    parent = [np.asarray(s.load(i)).tobytes() for i in range(len(s))]  # the parent opens its handle first
    assert all(a._pid == os.getpid() for a in s._archives.values())
    # fork (DataLoader's default on Linux): the children inherit the open handle and must reopen their own
    _FORKED["src"] = s
    try:
        with mp.get_context("fork").Pool(2) as pool:
            got = pool.map(_child_load, range(len(s)))
    finally:
        _FORKED.clear()
    assert [g[0] for g in got] == parent
    assert all(pid != os.getpid() and handle_pid == pid for _, pid, handle_pid in got)
    # the parent still reads correctly afterwards, with its own handle
    assert np.asarray(s.load(3)).tobytes() == parent[3]
    assert all(a._pid == os.getpid() for a in s._archives.values())
    # pickling (spawned workers) drops the handle and reopens on the other side
    s2 = pickle.loads(pickle.dumps(s))
    assert all(a._handle is None for a in s2._archives.values())
    assert np.asarray(s2.load(5)).tobytes() == parent[5]
    s.close()
    s2.close()


def test_omniglot_corrupt_png(omni_roots, tmp_path):
    root = tmp_path / "bad"
    for rel, data in omni_roots["files"].items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    victim = "images_background/Latin/character01/0002_02.png"
    (root / victim).write_bytes(b"this is not a png at all")
    s = open_source("omniglot", root)
    i = s.ids.index(victim)
    with pytest.raises(UserError) as e:
        s.load(i)
    assert victim in str(e.value) and str(root) in str(e.value) and "cannot read image" in str(e.value)
    # the same in a tar
    tar_root = tmp_path / "badtar"
    tar_root.mkdir()
    with tarfile.open(tar_root / "images_background.tar", "w") as tf:
        tf.add(root / "images_background", arcname="images_background")
    t = open_source("omniglot", tar_root)
    with pytest.raises(UserError) as e:
        t.load(t.ids.index(victim))
    assert victim in str(e.value) and str(tar_root) in str(e.value)


# ------------------------------------------------------------------------------------------------------------
# cifar


def _cifar_rows(rng, n):
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.fixture
def cifar10_root(tmp_path):
    rng = _rng(3)
    d = tmp_path / "c10" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rows, labels = [], []
    for k in range(1, 6):
        x = _cifar_rows(rng, 2)
        y = [(2 * (k - 1)) % 10, (2 * (k - 1) + 1) % 10]
        _dump(d / f"data_batch_{k}", {b"batch_label": b"x", b"data": x, b"labels": y, b"filenames": [b"a", b"b"]})
        rows.append(x)
        labels += y
    xt = _cifar_rows(rng, 3)
    _dump(d / "test_batch", {b"data": xt, b"labels": [7, 8, 9]})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump(d / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return d, np.concatenate(rows), labels, xt


def test_cifar10(cifar10_root):
    d, xtr, ytr, xte = cifar10_root
    for root in (d.parent, d):  # the folder holding cifar-10-batches-py, or that folder itself
        s = open_source("cifar10", root)
        assert len(s) == 13 and s.classes[0] == "airplane" and s.classes[9] == "truck"
        assert s.ids[:2] == ["train/0", "train/1"] and s.ids[10:] == ["test/0", "test/1", "test/2"]
        np.testing.assert_array_equal(s.labels, ytr + [7, 8, 9])
        img = s.load(4)
        assert img.mode == "RGB" and img.size == (32, 32) and s.native_size == 32 and not s.grayscale
        want = xtr[4].reshape(3, 32, 32).transpose(1, 2, 0)  # R plane, G plane, B plane
        np.testing.assert_array_equal(_pixels(img), want)
        np.testing.assert_array_equal(_pixels(s.load(11)), xte[1].reshape(3, 32, 32).transpose(1, 2, 0))
    t = open_source("cifar10", d, split="test")
    assert t.ids == ["test/0", "test/1", "test/2"] and list(t.labels) == [7, 8, 9]
    h = s.manifest_hash()
    _dump(d / "test_batch", {b"data": xte, b"labels": [7, 8, 0]})
    assert open_source("cifar10", d).manifest_hash() != h
    (d / "data_batch_3").unlink()
    with pytest.raises(UserError) as e:
        open_source("cifar10", d.parent)
    assert "data_batch_3" in str(e.value)
    (d / "data_batch_2").write_bytes(b"garbage")
    with pytest.raises(UserError, match="data_batch_2"):
        open_source("cifar10", d.parent)


def test_cifar10_wrong_folder(tmp_path):
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        open_source("cifar10", tmp_path)


def test_cifar100(tmp_path):
    rng = _rng(4)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    xtr, xte = _cifar_rows(rng, 4), _cifar_rows(rng, 2)
    _dump(d / "train", {b"data": xtr, b"fine_labels": [0, 1, 2, 99], b"coarse_labels": [4, 1, 14, 19]})
    _dump(d / "test", {b"data": xte, b"fine_labels": [99, 0], b"coarse_labels": [19, 4]})
    fine = [f"c{k}".encode() for k in range(100)]
    _dump(d / "meta", {b"fine_label_names": fine, b"coarse_label_names": [f"s{k}".encode() for k in range(20)]})
    s = open_source("cifar100", tmp_path)
    assert len(s) == 6 and len(s.classes) == 100 and s.classes[99] == "c99"
    np.testing.assert_array_equal(s.labels, [0, 1, 2, 99, 99, 0])
    np.testing.assert_array_equal(s.meta["coarse"], [4, 1, 14, 19, 19, 4])
    assert s.coarse_classes[19] == "s19"
    np.testing.assert_array_equal(_pixels(s.load(5)), xte[1].reshape(3, 32, 32).transpose(1, 2, 0))
    assert open_source("cifar100", d, split="train").ids == ["train/0", "train/1", "train/2", "train/3"]


# ------------------------------------------------------------------------------------------------------------
# imagefolder


def _save(path: Path, arr: np.ndarray, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


@pytest.fixture
def folder_root(tmp_path):
    rng = _rng(5)
    root = tmp_path / "if"
    arrs = {}
    for rel in ["dog/b.png", "dog/a.PNG", "cat/z.png", "cat/sub/y.png"]:
        arrs[rel] = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        _save(root / rel, arrs[rel], "PNG")
    _save(root / "cat/photo.JPG", rng.integers(0, 256, (9, 7, 3), dtype=np.uint8), "JPEG")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(b"ignored")
    (root / "README.md").write_text("ignored")
    return root, arrs


def test_imagefolder(folder_root):
    root, arrs = folder_root
    s = open_source("imagefolder", root)
    assert s.classes == ["cat", "dog"]
    assert s.ids == ["cat/photo.JPG", "cat/sub/y.png", "cat/z.png", "dog/a.PNG", "dog/b.png"]
    np.testing.assert_array_equal(s.labels, [0, 0, 0, 1, 1])
    assert s.ids == open_source("imagefolder", root).ids
    for i, rel in enumerate(s.ids):
        img = s.load(i)
        assert img.mode == "RGB"
        if rel in arrs:
            np.testing.assert_array_equal(_pixels(img), arrs[rel])
    assert s.load(0).size == (7, 9)
    # all five files are probed: four 5x6 and one 7x9; the most common size gives the side (its longer one)
    assert s.probe()["sizes"] == {"5x6": 4, "7x9": 1} and s.probe()["mixed_sizes"]
    assert s.native_size == 6 and s.splits == {}
    g = open_source("imagefolder", root, grayscale=True)
    assert g.grayscale and g.load(1).mode == "L"
    d = s.describe()
    assert d["N"] == 5 and d["num_classes"] == 2 and d["root"] == str(root.resolve())
    json.dumps(d)
    with pytest.raises(UserError, match="unknown split 'train'.*none"):
        open_source("imagefolder", root, split="train")


def test_imagefolder_manifest_changes(folder_root):
    root, arrs = folder_root
    h0 = open_source("imagefolder", root).manifest_hash()
    assert open_source("imagefolder", root).manifest_hash() == h0
    # a file with other content and another size
    _save(root / "dog/b.png", np.zeros((20, 20, 3), np.uint8), "PNG")
    h1 = open_source("imagefolder", root).manifest_hash()
    assert h1 != h0
    # the same file name under another class: another label
    (root / "dog/b.png").rename(root / "cat/b.png")
    assert open_source("imagefolder", root).manifest_hash() not in (h0, h1)


def test_imagefolder_errors(folder_root, tmp_path):
    root, _ = folder_root
    (root / "empty").mkdir()
    with pytest.raises(UserError) as e:
        open_source("imagefolder", root)
    assert "empty" in str(e.value) and "no images" in str(e.value)
    (root / "empty").rmdir()
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG garbage garbage garbage")
    s = open_source("imagefolder", root)
    i = s.ids.index("dog/broken.png")
    with pytest.raises(UserError) as e:
        s.load(i)
    msg = str(e.value)
    assert msg.startswith("cannot read image dog/broken.png (") and str(root.resolve()) in msg and "\n" not in msg
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.png").write_bytes(b"")
    with pytest.raises(UserError, match="no class folders"):
        open_source("imagefolder", flat)
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        open_source("imagefolder", f)


# ------------------------------------------------------------------------------------------------------------
# csv (miniImageNet style)


@pytest.fixture
def csv_root(tmp_path):
    rng = _rng(6)
    root = tmp_path / "mini"
    rows = {
        "train": [("n2_0.jpg", "n2"), ("n1_0.jpg", "n1"), ("n2_1.jpg", "n2")],
        "val": [("n5_0.jpg", "n5"), ("n4_0.jpg", "n4")],
        "test": [("n9_0.jpg", "n9")],
    }
    arrs = {}
    for part, rr in rows.items():
        (root).mkdir(exist_ok=True)
        (root / f"{part}.csv").write_text("filename,label\n" + "".join(f"{f},{l}\n" for f, l in rr))
        for f, _ in rr:
            arrs[f] = rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)
            _save(root / "images" / f, arrs[f], "PNG")  # PNG content under .jpg: PIL sniffs, pixels stay exact
    return root, rows, arrs


def test_csv(csv_root):
    root, rows, arrs = csv_root
    s = open_source("csv", root)
    assert s.classes == ["n2", "n1", "n5", "n4", "n9"]
    assert s.ids == [f"images/{f}" for part in ("train", "val", "test") for f, _ in rows[part]]
    np.testing.assert_array_equal(s.labels, [0, 1, 0, 2, 3, 4])
    np.testing.assert_array_equal(s.splits["train"], [0, 1, 2])
    np.testing.assert_array_equal(s.splits["val"], [3, 4])
    np.testing.assert_array_equal(s.splits["test"], [5])
    np.testing.assert_array_equal(_pixels(s.load(3)), arrs["n5_0.jpg"])
    v = open_source("csv", root, split="val")
    assert v.classes == ["n5", "n4"] and v.ids == ["images/n5_0.jpg", "images/n4_0.jpg"]
    np.testing.assert_array_equal(v.labels, [0, 1])
    np.testing.assert_array_equal(_pixels(v.load(1)), arrs["n4_0.jpg"])
    with pytest.raises(UserError, match="train, val, test"):
        open_source("csv", root, split="base")
    h = s.manifest_hash()
    (root / "test.csv").write_text("filename,label\nn9_0.jpg,n8\n")
    assert open_source("csv", root).manifest_hash() != h


def test_csv_errors(csv_root):
    root, _, _ = csv_root
    (root / "val.csv").write_text("file,label\nx.jpg,n1\n")
    with pytest.raises(UserError, match="header"):
        open_source("csv", root)
    (root / "val.csv").write_text("filename,label\nmissing.jpg,n1\n")
    with pytest.raises(UserError) as e:
        open_source("csv", root, split="val")
    assert "missing.jpg" in str(e.value)
    (root / "val.csv").unlink()
    with pytest.raises(UserError) as e:
        open_source("csv", root, split="val")
    assert "val.csv" in str(e.value) and str(root) in str(e.value)
    assert len(open_source("csv", root)) == 4  # the files present: train + test


# ------------------------------------------------------------------------------------------------------------
# imagenet-lowshot


@pytest.fixture
def lowshot_root(tmp_path):
    rng = _rng(7)
    root = tmp_path / "ls"
    # custom label order: not sorted by WNID
    names = ["n05", "n01", "n04", "n02", "n03", "n06"]
    idx = {
        "label_names": names,
        "base_classes": [0, 2, 4],
        "base_classes_1": [0, 4],
        "base_classes_2": [2],
        "novel_classes_1": [1, 5],
        "novel_classes_2": [3],
    }
    (root).mkdir()
    (root / "label_idx.json").write_text(json.dumps(idx))
    arrs = {}
    lists = {}
    for part, per in (("train", 2), ("val", 1)):
        image_names, image_labels = [], []
        for k, wnid in enumerate(names):
            for j in range(per):
                rel = f"{part}/{wnid}/{wnid}_{j}.JPEG"
                arrs[rel] = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
                _save(root / rel, arrs[rel], "PNG")
                image_names.append(rel)
                image_labels.append(k)
        lists[part] = {"label_names": names, "image_labels": image_labels, "image_names": image_names}
        (root / f"{part}.json").write_text(json.dumps(lists[part]))
    return root, idx, lists, arrs


def test_imagenet_lowshot(lowshot_root):
    root, idx, lists, arrs = lowshot_root
    s = open_source("imagenet-lowshot", root)
    assert s.classes == idx["label_names"]  # never re-sorted
    assert s.ids == lists["train"]["image_names"] and len(s) == 12
    np.testing.assert_array_equal(s.labels, lists["train"]["image_labels"])
    assert s.class_splits["base"] == [0, 2, 4] and s.class_splits["novel"] == [1, 3, 5]
    assert s.class_splits["novel_2"] == [3]
    np.testing.assert_array_equal(s.splits["base_1"], [0, 1, 8, 9])
    np.testing.assert_array_equal(s.splits["novel"], [2, 3, 6, 7, 10, 11])
    assert set(s.splits) == {"base", "base_1", "base_2", "novel", "novel_1", "novel_2"}
    np.testing.assert_array_equal(_pixels(s.load(7)), arrs[s.ids[7]])
    assert s.load(0).mode == "RGB"
    v = open_source("imagenet-lowshot", root, split="val")
    w = open_source("imagenet-lowshot", root, list="val")
    assert v.ids == w.ids == lists["val"]["image_names"] and len(v) == 6
    np.testing.assert_array_equal(v.splits["novel_1"], [1, 5])
    assert v.describe()["options"] == {"list": "val"}
    b = open_source("imagenet-lowshot", root, split="base")
    assert b.classes == s.classes and b.ids == [s.ids[i] for i in s.splits["base"]]
    np.testing.assert_array_equal(b.labels, s.labels[s.splits["base"]])
    np.testing.assert_array_equal(b.splits["base_2"], [2, 3])
    assert "novel" not in b.splits
    with pytest.raises(UserError, match="disagree"):
        open_source("imagenet-lowshot", root, split="val", list="train")
    with pytest.raises(UserError) as e:
        open_source("imagenet-lowshot", root, split="novel_3")
    assert "novel_1" in str(e.value)
    h = s.manifest_hash()
    assert h == open_source("imagenet-lowshot", root).manifest_hash()
    _save(root / s.ids[4], np.zeros((50, 50, 3), np.uint8), "PNG")
    assert open_source("imagenet-lowshot", root).manifest_hash() != h


def test_imagenet_lowshot_errors(lowshot_root):
    root, idx, lists, _ = lowshot_root
    (root / "train.json").write_text('{"label_names": [')
    with pytest.raises(UserError) as e:
        open_source("imagenet-lowshot", root)
    assert "malformed" in str(e.value) and "train.json" in str(e.value)
    bad = dict(lists["train"], label_names=sorted(idx["label_names"]))
    (root / "train.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="custom order"):
        open_source("imagenet-lowshot", root)
    (root / "train.json").write_text(json.dumps({k: v for k, v in lists["train"].items() if k != "image_labels"}))
    with pytest.raises(UserError, match="image_labels"):
        open_source("imagenet-lowshot", root)
    (root / "label_idx.json").unlink()
    with pytest.raises(UserError) as e:
        open_source("imagenet-lowshot", root, list="val")
    assert "label_idx.json" in str(e.value)


# ------------------------------------------------------------------------------------------------------------
# transforms


def test_build_transform_tflite_gray_to_rgb():
    arr = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    img = Image.fromarray(arr)
    t = build_transform({"size": 4, "resize": None, "channels": 3, "normalize": "tflite", "interpolation": "bilinear"})
    out = t(img)
    assert out.shape == (3, 4, 4) and out.dtype == torch.float32
    want = (arr.astype(np.float32) - 127.0) / 128.0
    for c in range(3):
        np.testing.assert_allclose(out[c].numpy(), want, atol=1e-6)
    assert out.min().item() == pytest.approx(-127 / 128) and out.max().item() == pytest.approx((240 - 127) / 128)


def test_build_transform_imagenet_and_custom():
    arr = np.zeros((2, 2, 3), np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = 255, 128, 0
    img = Image.fromarray(arr)
    out = build_transform({"size": 2, "resize": None, "channels": 3, "normalize": "imagenet"})(img)
    np.testing.assert_allclose(out[0].numpy(), (1.0 - 0.485) / 0.229, rtol=1e-5)
    np.testing.assert_allclose(out[1].numpy(), (128 / 255 - 0.456) / 0.224, rtol=1e-5)
    np.testing.assert_allclose(out[2].numpy(), (0.0 - 0.406) / 0.225, rtol=1e-5)
    none = build_transform({"size": 2, "resize": None, "channels": 3, "normalize": "none"})(img)
    np.testing.assert_allclose(none[1].numpy(), 128 / 255, rtol=1e-6)
    gray = build_transform({"size": 2, "resize": None, "channels": 1, "normalize": {"mean": [0.5], "std": [0.25]}})
    g = gray(Image.fromarray(np.full((2, 2), 51, np.uint8)))
    assert g.shape == (1, 2, 2)
    np.testing.assert_allclose(g.numpy(), (0.2 - 0.5) / 0.25, rtol=1e-5)


def test_build_transform_resize_and_centre_crop():
    # 8 wide, 4 high, short side already 4: only the centre crop acts (columns 2..5)
    arr = np.tile(np.arange(8, dtype=np.uint8) * 30, (4, 1))
    t = build_transform({"size": 4, "resize": 4, "channels": 1, "normalize": "none"})
    out = t(Image.fromarray(arr))
    np.testing.assert_allclose(out[0].numpy() * 255, arr[:, 2:6], atol=1e-4)
    # short side 8 -> 4 halves both sides (16x8 -> 8x4), then the centre 4x4
    big = Image.fromarray(np.zeros((8, 16, 3), np.uint8))
    out = build_transform({"size": 4, "resize": 4, "channels": 3, "normalize": "none", "interpolation": "bicubic"})(big)
    assert out.shape == (3, 4, 4)
    squash = build_transform({"size": 5, "resize": None, "channels": 3, "normalize": "none"})(big)
    assert squash.shape == (3, 5, 5)
    # a grayscale image gives the same tensor as its RGB copy (the transform replicates after resizing)
    g = Image.fromarray(_rng(9).integers(0, 256, (37, 53), dtype=np.uint8))
    for resize in (None, 40):
        t = build_transform({"size": 32, "resize": resize, "channels": 3, "normalize": "tflite",
                             "interpolation": "bicubic"})
        assert torch.equal(t(g), t(g.convert("RGB")))


def test_build_transform_bad_specs():
    ok = {"size": 4, "resize": None, "channels": 3, "normalize": "none", "interpolation": "bilinear"}
    for bad in (
        dict(ok, size=0),
        dict(ok, resize=2),
        dict(ok, channels=2),
        dict(ok, normalize="zscore"),
        dict(ok, interpolation="cubic"),
        dict(ok, normalise="none"),
        dict(ok, channels=1, normalize="imagenet"),
        dict(ok, normalize={"mean": [0.5, 0.5], "std": [1, 1]}),
    ):
        with pytest.raises(UserError):
            build_transform(bad)


def test_transform_spec_merges_source():
    gray = open_source("digits")
    spec = transform_spec({"size": 224, "resize": 256, "channels": 3, "normalize": "tflite",
                           "interpolation": "bicubic"}, gray)
    assert spec["size"] == 224 and spec["resize"] == 256 and spec["channels"] == 3
    assert spec["source_grayscale"] is True and spec["channel_op"] == "replicate" and spec["source_native_size"] == 8
    small = transform_spec({"size": 224, "resize": 256, "channels": 3, "normalize": "tflite"}, gray, size=84)
    assert small["size"] == 84 and small["resize"] == 96 and small["interpolation"] == "bilinear"
    native = transform_spec({"channels": 1, "normalize": "none"}, gray)
    assert native["size"] == 8 and native["channel_op"] == "none"
    json.dumps(spec)
    assert build_transform(spec)(gray.load(0)).shape == (3, 224, 224)  # notes are accepted by build_transform
    assert transform_spec(spec, gray) == spec  # idempotent: a recorded spec re-merges to itself
    with pytest.raises(UserError, match="unknown input spec key"):
        transform_spec({"size": 32, "mean": [0.5]}, gray)


def test_build_augment_deterministic():
    rng = _rng(8)
    img = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    spec = {"size": 32, "resize": None, "channels": 3, "normalize": "imagenet"}
    aug = build_augment(spec)
    assert aug.recipe["kind"] == "fsor" and aug.recipe["scale"] == [0.6, 1.0]
    a = aug(img, torch.Generator().manual_seed(1))
    b = aug(img, torch.Generator().manual_seed(1))
    c = aug(img, torch.Generator().manual_seed(2))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the global RNG is not touched, and the number of draws per view is fixed
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    aug(img, g1)
    aug(Image.fromarray(rng.integers(0, 256, (3, 90, 3), dtype=np.uint8)), g2)  # extreme ratio: fallback path
    assert torch.equal(torch.rand(1), before)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
    # a view differs from the clean transform, within the normalised range
    clean = build_transform(spec)(img)
    assert not torch.equal(a, clean)
    pad = build_augment({"size": 8, "resize": None, "channels": 1, "normalize": "none"}, kind="padcrop", pad=2)
    g = Image.fromarray(np.full((8, 8), 255, np.uint8))
    views = [pad(g, torch.Generator().manual_seed(s)) for s in range(6)]
    assert all(v.shape == (1, 8, 8) for v in views)
    assert any(v.min().item() == 0.0 for v in views)  # the zero padding shows up in shifted crops
    with pytest.raises(UserError, match="unknown augmentation kind"):
        build_augment(spec, kind="mixup")


# ------------------------------------------------------------------------------------------------------------
# real data (skips without FEATSTORE_DATA)


@pytest.mark.data
def test_real_omniglot_tars(shared_data):
    root = shared_data / "omniglot"
    if not (root / "images_background.tar").is_file():
        pytest.skip("no omniglot tars under FEATSTORE_DATA")
    t0 = time.perf_counter()
    s = open_source("omniglot", root)
    assert time.perf_counter() - t0 < 15  # header listing only, no image reads
    assert len(s) == 32460 and len(s.classes) == 1623
    bg = open_source("omniglot", root, split="background")
    assert len(bg) == 19280 and len(bg.classes) == 964
    assert np.bincount(bg.labels).tolist() == [20] * 964
    assert len(s.splits["evaluation"]) == 13180
    assert len({c for c in s.classes if c.startswith("images_evaluation/")}) == 659
    assert s.meta["drawer"].min() == 1 and s.meta["drawer"].max() == 20
    assert np.bincount(s.meta["drawer"])[1:].tolist() == [1623] * 20
    assert len(s.alphabets) == 50
    i = s.ids.index("images_background/Latin/character01/0683_01.png")
    assert s.classes[s.labels[i]] == "images_background/Latin/character01" and s.meta["drawer"][i] == 1
    img = s.load(i)
    assert img.mode == "L" and img.size == (105, 105)
    assert sorted(np.unique(np.asarray(img)).tolist()) == [0, 255]
    j = int(s.splits["evaluation"][-1])
    assert sorted(np.unique(np.asarray(s.load(j))).tolist()) == [0, 255]
    assert bg.ids == s.ids[:19280]
    assert s.manifest_hash() == open_source("omniglot", root).manifest_hash()


@pytest.mark.data
def test_real_fashion_mnist(shared_data):
    root = shared_data / "fashion-mnist"
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("no fashion-mnist IDX files under FEATSTORE_DATA")
    s = open_source("fashion-mnist", root)
    assert len(s) == 70000 and len(s.splits["train"]) == 60000 and len(s.splits["test"]) == 10000
    assert np.bincount(s.labels[s.splits["train"]]).tolist() == [6000] * 10
    assert np.bincount(s.labels[s.splits["test"]]).tolist() == [1000] * 10
    # labels match the raw label file, pixels the raw image file
    raw = read_idx(root / "train-labels-idx1-ubyte.gz", 2049)
    np.testing.assert_array_equal(s.labels[:60000], raw)
    img = s.load(60000)
    assert img.mode == "L" and img.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(img), read_idx(root / "t10k-images-idx3-ubyte.gz", 2051)[0])
    assert s.ids[60000] == "test/0"
    tr = open_source("fashion-mnist", root, split="train")
    assert len(tr) == 60000 and tr.ids == s.ids[:60000]

"""Data roots are data, never code: crafted CIFAR pickles, symlink loops and links out of an image folder, 16-bit
PNGs. Every refusal is one UserError line naming the file."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.datasets import open_source
from featstore.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------
# CIFAR pickles


class _Calls:
    """Pickles as a call of ``func(*args)``: what a crafted file does to run code on load."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path) -> dict:
    touch = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')"
    return {
        "os.system": _Calls(os.system, f"touch {marker}"),
        "builtins.exec": _Calls(exec, touch),
        "builtins.eval": _Calls(eval, f"__import__('pathlib').Path({str(marker)!r}).write_text('ran')"),
        "builtins.open": _Calls(open, str(marker), "w"),
        "subprocess.call": _Calls(subprocess.call, ["touch", str(marker)]),
        # a numpy callable other than the three the format needs
        "numpy.save": _Calls(np.save, str(marker), np.zeros(1)),
    }


def _dump(path: Path, obj, protocol: int = 2) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _cifar10(folder: Path, rng, protocol: int = 2, keys=bytes, numpy1_names: bool = False, py2: bool = False):
    """A cifar-10-batches-py folder (2 rows per train batch, 3 test rows); returns (train x, train y, test x)."""
    folder.mkdir(parents=True, exist_ok=True)

    def key(k: str):
        return k.encode() if keys is bytes else k

    def write(name: str, obj) -> None:
        if py2:
            data = _py2_pickle(obj)
        else:
            data = pickle.dumps(obj, protocol=protocol)
        if numpy1_names:  # pickles written by numpy 1.x name numpy.core, not numpy._core
            assert protocol <= 2 or py2  # GLOBAL opcodes are text lines only up to protocol 2
            data = data.replace(b"numpy._core.", b"numpy.core.")
        (folder / name).write_bytes(data)

    xs, ys = [], []
    for k in range(1, 6):
        x = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        y = [(2 * k) % 10, (2 * k + 1) % 10]
        write(f"data_batch_{k}", {key("batch_label"): key("training batch"), key("data"): x, key("labels"): y,
                                  key("filenames"): [key("a.png"), key("b.png")]})
        xs.append(x)
        ys += y
    xt = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    write("test_batch", {key("data"): xt, key("labels"): [7, 8, 9]})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    write("batches.meta", {key("label_names"): [key(n) for n in names], key("num_vis"): 3072,
                           key("num_cases_per_batch"): 10000})
    return np.concatenate(xs), ys, xt


class _Py2Pickler(pickle._Pickler):
    """Writes bytes with the BINSTRING opcodes of a python 2 ``str``, as the official CIFAR files do."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n))
                   + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _py2_pickle(obj) -> bytes:
    import io

    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


@pytest.mark.parametrize("form", ["protocol-2-bytes-keys", "protocol-2-numpy1-names", "py2-binstring",
                                  "py2-binstring-numpy1-names", "protocol-2-str-keys", "protocol-4", "protocol-5"])
def test_cifar_real_formats_load(tmp_path, form):
    folder = tmp_path / "cifar-10-batches-py"
    opts = {
        "protocol-2-bytes-keys": {},
        "protocol-2-numpy1-names": {"numpy1_names": True},
        "py2-binstring": {"py2": True},
        "py2-binstring-numpy1-names": {"py2": True, "numpy1_names": True},
        "protocol-2-str-keys": {"keys": str},  # re-pickled by python 3 with latin1-decoded keys
        "protocol-4": {"protocol": 4},
        "protocol-5": {"protocol": 5},
    }[form]
    xtr, ytr, xte = _cifar10(folder, np.random.default_rng(0), **opts)
    s = open_source("cifar10", tmp_path)
    assert len(s) == 13 and s.classes[1] == "automobile"
    np.testing.assert_array_equal(s.labels, ytr + [7, 8, 9])
    np.testing.assert_array_equal(np.asarray(s.load(3)), xtr[3].reshape(3, 32, 32).transpose(1, 2, 0))
    np.testing.assert_array_equal(np.asarray(s.load(12)), xte[2].reshape(3, 32, 32).transpose(1, 2, 0))


@pytest.mark.parametrize("where", ["batches.meta", "data_batch_3"])
@pytest.mark.parametrize("payload", ["os.system", "builtins.exec", "builtins.eval", "builtins.open",
                                     "subprocess.call", "numpy.save"])
@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_crafted_pickle_is_refused_and_runs_nothing(tmp_path, where, payload, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    _cifar10(folder, np.random.default_rng(1))
    marker = tmp_path / "marker"
    crafted = _payloads(marker)[payload]
    # hidden one level down, beside real content: the unpickler must refuse it wherever it sits
    if where == "batches.meta":
        obj = {b"label_names": [b"a"] * 10, b"num_vis": crafted}
    else:
        obj = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [crafted, 1]}
    _dump(folder / where, obj, protocol)
    with pytest.raises(UserError) as e:
        open_source("cifar10", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(folder / where) in msg and "refused" in msg
    # the global as the file names it (python 3 writes builtins as __builtin__ at protocol 2)
    assert f".{crafted.func.__name__}," in msg
    assert not marker.exists() and not (tmp_path / "marker.npy").exists()


def test_cifar_codecs_encode_only_latin1(tmp_path):
    # python 3 protocol-2 pickles spell bytes as _codecs.encode(text, "latin1"); any other codec is refused
    folder = tmp_path / "cifar-10-batches-py"
    _cifar10(folder, np.random.default_rng(2))
    import codecs

    _dump(folder / "batches.meta", {b"label_names": [_Calls(codecs.encode, "x", "rot13")] * 10})
    with pytest.raises(UserError, match="batches.meta"):
        open_source("cifar10", tmp_path)


def test_cifar_crafted_pickle_through_the_extract_command(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _cifar10(folder, np.random.default_rng(3))
    marker = tmp_path / "marker"
    _dump(folder / "batches.meta", {b"label_names": [b"a"] * 10, b"x": _Calls(os.system, f"touch {marker}")})
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("FEATSTORE_DEBUG", None)
    res = subprocess.run([sys.executable, "-m", "extract.cli", "--model", "resnet10", "--random-init",
                          "--dataset", "cifar10", "--data-root", tmp_path, "--out", tmp_path / "o.zarr", "-q"],
                         capture_output=True, text=True, env=env, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "posix.system" in lines[0], res.stderr
    assert not marker.exists() and not (tmp_path / "o.zarr").exists()


# ------------------------------------------------------------------------------------------------------------
# image folders with links


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)


@pytest.fixture
def two_classes(tmp_path):
    root = tmp_path / "root"
    _png(root / "a" / "x.png", 10)
    _png(root / "b" / "y.png", 200)
    return root


def test_imagefolder_symlink_loop_is_refused(two_classes):
    os.symlink("..", two_classes / "a" / "up")  # a/up -> root: a, b, a/up/a, a/up/b, a/up/a/up/... forever
    for follow in (False, True):
        with pytest.raises(UserError) as e:
            open_source("imagefolder", two_classes, follow_links=follow)
        assert "loop" in str(e.value) and "a/up" in str(e.value) and "\n" not in str(e.value)


def test_imagefolder_self_loop_is_refused(two_classes):
    os.symlink(".", two_classes / "a" / "here")
    with pytest.raises(UserError, match="loop"):
        open_source("imagefolder", two_classes)


@pytest.mark.parametrize("link", ["folder", "file"])
def test_imagefolder_link_to_another_class_is_refused(two_classes, link):
    # b's image reached from a would be labelled a as well as b
    if link == "folder":
        os.symlink("../b", two_classes / "a" / "more")
    else:
        os.symlink("../b/y.png", two_classes / "a" / "y.png")
    with pytest.raises(UserError) as e:
        open_source("imagefolder", two_classes)
    assert "b/y.png" in str(e.value) and "twice" in str(e.value)


@pytest.mark.parametrize("link", ["class-folder", "sub-folder", "file"])
def test_imagefolder_links_out_of_root_need_follow_links(tmp_path, two_classes, link):
    outside = tmp_path / "outside"
    _png(outside / "z.png", 99)
    if link == "class-folder":
        os.symlink(outside, two_classes / "c")
        want = ["a/x.png", "b/y.png", "c/z.png"]
    elif link == "sub-folder":
        os.symlink(outside, two_classes / "b" / "sub")
        want = ["a/x.png", "b/sub/z.png", "b/y.png"]
    else:
        os.symlink(outside / "z.png", two_classes / "b" / "z.png")
        want = ["a/x.png", "b/y.png", "b/z.png"]
    with pytest.raises(UserError) as e:
        open_source("imagefolder", two_classes)
    assert "outside the root" in str(e.value) and "follow" in str(e.value)
    s = open_source("imagefolder", two_classes, follow_links=True)
    assert s.ids == want
    k = s.ids.index(want[-1] if link != "sub-folder" else "b/sub/z.png")
    assert int(np.asarray(s.load(k))[0, 0, 0]) == 99


def test_imagefolder_link_inside_root_is_read(two_classes, tmp_path):
    store = two_classes / "b" / "pool"
    _png(store / "q.png", 50)
    os.symlink("pool", two_classes / "b" / "alias")  # b/pool reached twice: refused
    with pytest.raises(UserError, match="twice"):
        open_source("imagefolder", two_classes)
    os.unlink(two_classes / "b" / "alias")
    (two_classes / "b" / "pool" / "q.png").rename(tmp_path / "q.png")
    os.rename(tmp_path / "q.png", two_classes / "q-real.png")  # a file in root itself is no sample
    os.symlink("../../q-real.png", two_classes / "b" / "pool" / "q.png")
    s = open_source("imagefolder", two_classes)
    assert s.ids == ["a/x.png", "b/pool/q.png", "b/y.png"] and list(s.labels) == [0, 1, 1]


def test_extract_cli_follow_links_only_for_imagefolder(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "extract.cli", "--model", "resnet10", "--random-init",
                          "--dataset", "digits", "--follow-links", "--out", tmp_path / "o.zarr"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2 and "--follow-links" in res.stderr and len(res.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------------------
# 16-bit images


def _gradient16() -> np.ndarray:
    return (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472


@pytest.mark.parametrize("grayscale", [True, False])
def test_16_bit_png_is_scaled_not_clipped(tmp_path, grayscale):
    arr = _gradient16()
    path = tmp_path / "root" / "g" / "grad.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(arr).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I;16")  # the case PIL's convert("L") clips to 0 and 255
    img = open_source("imagefolder", tmp_path / "root", grayscale=grayscale).load(0)
    got = np.asarray(img)
    want = (arr // 256).astype(np.uint8)  # the high byte
    if not grayscale:
        assert img.mode == "RGB"
        want = np.repeat(want[..., None], 3, axis=2)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) == 256


def test_16_bit_png_matches_pil_reduction_of_16_bit_rgb(tmp_path):
    # PIL reads 16-bit RGB PNGs by the high byte; the grey file of the same picture must load alike
    import zlib

    arr = _gradient16()[:8, :8]
    h, w = arr.shape
    rows = b"".join(b"\0" + np.repeat(arr[r][:, None], 3, axis=1).astype(">u2").tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    root = tmp_path / "root"
    (root / "c").mkdir(parents=True)
    (root / "c" / "rgb.png").write_bytes(png)
    Image.fromarray(arr).save(root / "c" / "grey.png")
    s = open_source("imagefolder", root, grayscale=True)
    grey, rgb = (np.asarray(s.load(s.ids.index(f"c/{n}.png"))) for n in ("grey", "rgb"))
    np.testing.assert_array_equal(grey, rgb)


@pytest.mark.parametrize("mode,values", [("I", (0, 70000)), ("F", (-1.0, 2.0)), ("I", (0, 255))])
def test_32_bit_pixels_outside_8_bits_are_refused(tmp_path, mode, values):
    arr = np.linspace(values[0], values[1], 16).reshape(4, 4).astype(np.int32 if mode == "I" else np.float32)
    path = tmp_path / "root" / "c" / "wide.tif"
    path.parent.mkdir(parents=True)
    Image.fromarray(arr, mode=mode).save(path)
    s = open_source("imagefolder", tmp_path / "root", grayscale=True)
    if values[1] <= 255 and values[0] >= 0:
        np.testing.assert_array_equal(np.asarray(s.load(0)), arr.astype(np.uint8))
    else:
        with pytest.raises(UserError, match="outside 0..255"):
            s.load(0)


@pytest.mark.parametrize("flag,want", [((), {}), (("--follow-links",), {"follow_links": True})])
def test_extract_cli_passes_follow_links_to_the_source(monkeypatch, tmp_path, flag, want):
    from click.testing import CliRunner

    import extract.run
    from extract.cli import cli

    seen = {}

    def fake_run(cfg):
        seen["options"] = cfg.source_options
        raise UserError("stop here")

    monkeypatch.setattr(extract.run, "run_extraction", fake_run)
    res = CliRunner().invoke(cli, ["--model", "resnet10", "--dataset", "imagefolder", "--data-root", str(tmp_path),
                                   "--out", str(tmp_path / "o.zarr"), *flag])
    assert isinstance(res.exception, UserError) and seen["options"] == want

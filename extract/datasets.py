"""Data sources (pixels in, PIL images out) and the image transforms of the extraction loop.

A *source* lists the samples of one data set in a fixed order and loads them one at a time:

========================  =====================================================  ==================================
name                      root holds                                             ids
========================  =====================================================  ==================================
``digits``                nothing (scikit-learn's bundled ``load_digits``)        ``digits/<i>``
``fashion-mnist``         the four IDX files, gzip'd or not                      ``train/<i>``, ``test/<i>``
``omniglot``              ``images_{background,evaluation}`` as folders,         ``images_background/<Alphabet>/``
                          uncompressed ``.tar`` or the official ``.zip``          ``characterNN/IIII_DD.png``
``cifar10``/``cifar100``  ``cifar-10-batches-py/`` / ``cifar-100-python/``       ``train/<i>``, ``test/<i>``
                          (or that folder itself)
``imagefolder``           ``<class>/<file>``                                     ``<class>/<file>``
``csv``                   ``images/`` + ``train.csv``/``val.csv``/``test.csv``   ``images/<filename>``
``imagenet-lowshot``      ``train.json``, ``val.json``, ``label_idx.json``       the list's ``image_names``
========================  =====================================================  ==================================

``open_source(name, root, split, **options)`` returns a :class:`Source`; ``load(i)`` gives a PIL image of mode
``"L"`` or ``"RGB"``; ``build_transform(spec)`` turns it into a float tensor ``[C, H, W]``.

Files under a data root are data, never code: the CIFAR pickles are read by an unpickler that resolves only the
globals their numpy arrays need (``_reconstruct``, ``_frombuffer``, ``ndarray``, ``dtype``, and ``_codecs.encode``
for latin1 only) and refuses any other in one line naming the file and the global; nothing else is unpickled.
An image folder follows symbolic links only inside its root (``follow_links=True`` allows links out of it) and
refuses link loops and files reached twice. 16-bit grey images load as their high byte.

Image size: digits, fashion-mnist, cifar and omniglot fix it by their format (``native_size`` 8, 28, 32, 105).
The file sources (imagefolder, csv, imagenet-lowshot) read the size and mode of a sample of their files once
(:meth:`Source.probe`: the first and seven seeded others; the most common size wins), so that ``native_size``
drives the same small-image rule there (the small-input stem and the shift augmentation for 64 px or less); the
probe is part of the transform spec and so of the store's fingerprint.

Process safety: a source holds no open file between calls except the archive handle of the omniglot tar/zip
forms, which is reopened lazily whenever ``os.getpid()`` changes (DataLoader workers fork) and is dropped when
the source is pickled (spawned workers). Sources are therefore safe to hand to a ``DataLoader`` with any number
of workers and any start method. Tar members are read with ``os.pread`` (no shared file offset), so threads may
share one source too.
"""

from __future__ import annotations

import builtins  # imagenet-lowshot's option is called `list`, which shadows the builtin there
import csv as _csv
import gzip
import hashlib
import inspect
import io
import json
import math
import os
import pickle
import re
import struct
import tarfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image, ImageOps

from featstore.errors import UserError

__all__ = [
    "Source",
    "register_source",
    "list_sources",
    "open_source",
    "read_idx",
    "build_transform",
    "transform_spec",
    "build_augment",
    "probe_note",
    "IMAGE_EXTENSIONS",
    "NORMALIZATIONS",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")

# --------------------------------------------------------------------------------------------------------------
# registry


_REGISTRY: dict[str, type["Source"]] = {}


def register_source(name: str) -> Callable[[type["Source"]], type["Source"]]:
    """Class decorator: make a :class:`Source` subclass available to :func:`open_source` as ``name``.

    The class is constructed as ``cls(root, split, **options)``; its keyword-only constructor arguments are the
    options it accepts. Registering a name twice raises :class:`UserError`.
    """
    key = _normal_name(name)

    def deco(cls: type["Source"]) -> type["Source"]:
        if key in _REGISTRY:
            raise UserError(f"data source '{key}' is registered twice; give the second one another name")
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    return deco


def list_sources() -> list[str]:
    """Names of all registered sources, sorted."""
    return sorted(_REGISTRY)


def open_source(name: str, root: str | os.PathLike | None = None, split: str | None = None, **options: Any) -> "Source":
    """Open the data source ``name`` at ``root``; ``split`` keeps only that named subset (ids unchanged).

    Raises :class:`UserError` for an unknown name, a missing root, an unknown option or split, and for files
    that are missing or malformed.
    """
    key = _normal_name(name)
    cls = _REGISTRY.get(key)
    if cls is None:
        raise UserError(f"unknown data source '{name}'; known sources: {', '.join(list_sources())}")
    accepted = _accepted_options(cls)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UserError(
            f"data source '{key}' has no option {', '.join(unknown)}; "
            f"its options are: {', '.join(accepted) if accepted else 'none'}"
        )
    path: Path | None = None
    if cls.needs_root:
        if root is None or str(root) == "":
            raise UserError(f"data source '{key}' needs a root folder; pass the folder that holds {cls.root_hint}")
        path = Path(root).expanduser()
        if not path.exists():
            raise UserError(f"data root not found: {path}; pass the folder that holds {cls.root_hint}")
        if not path.is_dir():
            raise UserError(f"data root is not a folder: {path}; pass the folder that holds {cls.root_hint}")
        path = path.resolve()
    # A root given to a source that needs none (digits) is ignored rather than refused: one CLI line fits all.
    return cls(path, split, **options)


def _normal_name(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def _accepted_options(cls: type) -> list[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------------------
# the Source base


class Source:
    """One data set as an ordered list of samples.

    Attributes (N samples, C classes):
        name: registry name.  root: resolved data root (str) or None.  split: the split kept at open time.
        classes: list[str] of length C; label k means ``classes[k]``.
        labels: int64 [N].  ids: list[str] [N], stable and unique (relative path, or ``<split>/<index>``).
        grayscale: whether ``load`` returns mode "L" (else "RGB").
        native_size: image side when the format fixes it; for sources whose files may hold any size
        (``probes_files``: imagefolder, csv, imagenet-lowshot) the longer side of the most common size among
        the probed files (:meth:`probe`), None when no file could be read.
        splits: name -> sorted int64 array of sample indices (into this source, after ``split``).
        class_splits: name -> sorted list of class indices (imagenet-lowshot).
        meta: name -> array [N] of per-sample metadata (omniglot: "drawer", "alphabet").
    """

    name: str = ""
    needs_root: bool = True
    root_hint: str = "the data set"
    # the format does not fix the image size: native_size comes from a probe of a sample of the files
    probes_files: bool = False

    def __init__(self) -> None:
        self.root: str | None = None
        self.split: str | None = None
        self.options: dict[str, Any] = {}
        self.classes: list[str] = []
        self.labels: np.ndarray = np.zeros(0, np.int64)
        self.ids: list[str] = []
        self.grayscale: bool = False
        self._native_size: int | None = None
        self._probe: dict[str, Any] | None = None
        self.splits: dict[str, np.ndarray] = {}
        self.class_splits: dict[str, list[int]] = {}
        self.meta: dict[str, np.ndarray] = {}
        # storage row of each sample (array sources index their in-memory arrays with it)
        self._rows: np.ndarray = np.zeros(0, np.int64)
        # byte size of each sample's file (file trees and archives); part of the manifest hash
        self._sizes: np.ndarray | None = None
        self._manifest: str | None = None

    # -- the public surface ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"<Source {self.name} N={len(self)} classes={len(self.classes)} root={self.root} split={self.split}>"

    def load(self, i: int) -> Image.Image:
        """Sample ``i`` as a PIL image of mode "L" (grayscale sources) or "RGB".

        16-bit grey pixels become their high byte (``v >> 8``); 32-bit integer or float pixels outside 0..255 are
        refused (PIL's ``convert`` would clip them)."""
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        i %= len(self)
        mode = "L" if self.grayscale else "RGB"
        try:
            img = self._read(i)
            img.load()
            img = _to_8_bits(img, self.ids[i])
            # palette, 1-bit, RGBA, CMYK... all become the source's one mode ("1" -> "L" gives 0/255)
            return img if img.mode == mode else img.convert(mode)
        except UserError:
            raise
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib.error... for broken files
            raise UserError(f"cannot read image {self.ids[i]} ({self.root}): {_one_line(exc)}") from exc

    @property
    def native_size(self) -> int | None:
        if self._native_size is None and self.probes_files:
            return self.probe()["side"]
        return self._native_size

    @native_size.setter
    def native_size(self, value: int | None) -> None:
        self._native_size = value

    def probe(self) -> dict[str, Any]:
        """Size and mode of a sample of the images: the first and up to ``PROBE_SAMPLES - 1`` others drawn with
        seed 0 (a function of the sample count only, so the same tree probes the same files).

        Returns ``{"files": k read, "unreadable": u, "size": [w, h], "side": max(w, h), "mode": PIL mode,
        "mixed_sizes": bool, "mixed_modes": bool, "sizes": {"WxH": count}, "modes": {mode: count}}``. ``size`` is
        the most common size (ties: the largest area), ``mode`` the most common mode as the file holds it (before
        ``load`` converts it); both None when no probed file could be read (``load`` then reports the file).
        Computed once per source (after ``split``).
        """
        if self._probe is None:
            self._probe = _probe_images(self)
        return dict(self._probe)

    def manifest_hash(self) -> str:
        """sha256 hex over ids, labels, classes, class splits and file sizes (or pixel arrays held in memory).

        Identifies the data set content for the store's fingerprint without decoding a single image file; file
        sizes come from ``stat`` (trees) or the archive index (omniglot tar/zip), so a tree, a tar and a zip of
        the same files hash alike.
        """
        if self._manifest is None:
            h = hashlib.sha256()
            h.update(b"featstore-manifest-v1\0")
            h.update(json.dumps(self.classes, ensure_ascii=False).encode())
            h.update(b"\0ids\0")
            h.update("\n".join(self.ids).encode())
            h.update(b"\0labels\0")
            h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
            if self.class_splits:
                h.update(json.dumps(self.class_splits, sort_keys=True).encode())
            sizes = self._file_sizes()
            if sizes is not None:
                h.update(b"\0sizes\0")
                h.update(np.ascontiguousarray(sizes, dtype="<i8").tobytes())
            for part in self._content_parts():
                h.update(b"\0content\0")
                h.update(part)
            self._manifest = h.hexdigest()
        return self._manifest

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary: name, root, split, N, number of classes, split sizes, options."""
        return {
            "name": self.name,
            "root": self.root,
            "split": self.split,
            "N": len(self),
            "num_classes": len(self.classes),
            "grayscale": self.grayscale,
            "native_size": self.native_size,
            **({"probe": self.probe()} if self.probes_files else {}),
            "splits": {k: int(len(v)) for k, v in self.splits.items()},
            "class_splits": {k: len(v) for k, v in self.class_splits.items()},
            "options": {k: v for k, v in self.options.items()},
        }

    def close(self) -> None:
        """Release open archive handles (they reopen on the next ``load``)."""

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- for subclasses -------------------------------------------------------------------------------------
    def _read(self, i: int) -> Image.Image:
        """The image of sample ``i`` in any PIL mode; exceptions become UserError in ``load``."""
        raise NotImplementedError

    def _file_sizes(self) -> np.ndarray | None:
        return self._sizes

    def _content_parts(self) -> Iterable[bytes]:
        return ()

    def _file_size_by_stat(self) -> np.ndarray:
        """Sizes of ``root/<id>`` for file-backed sources (one stat per file, no reads)."""
        root = Path(self.root or ".")
        sizes = np.empty(len(self.ids), np.int64)
        for k, rel in enumerate(self.ids):
            try:
                sizes[k] = os.stat(root / rel).st_size
            except OSError as exc:
                raise UserError(
                    f"missing image file {rel} in {root}: {exc.strerror or exc}; restore it or fix the list"
                ) from exc
        return sizes

    def _finish(self, split: str | None, *, native_split: bool = False) -> None:
        """Check invariants and apply ``split`` (unless the subclass already did, ``native_split``)."""
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.ids)
        if len(self.labels) != n:
            raise UserError(f"{self.name}: {len(self.labels)} labels for {n} samples in {self.root}; fix the lists")
        if len(self._rows) != n:
            self._rows = np.arange(n, dtype=np.int64)
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise UserError(
                f"{self.name}: labels outside 0..{len(self.classes) - 1} in {self.root}; fix the label files"
            )
        if len(set(self.ids)) != n:
            dup = _first_duplicate(self.ids)
            raise UserError(f"{self.name}: sample id {dup} appears twice in {self.root}; remove the duplicate")
        self.splits = {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in self.splits.items()}
        self.class_splits = {k: sorted(int(c) for c in v) for k, v in self.class_splits.items()}
        if split is not None and not native_split:
            if split not in self.splits:
                raise UserError(
                    f"unknown split '{split}' for data source '{self.name}'; available: "
                    f"{', '.join(self.splits) if self.splits else 'none (open it without split)'}"
                )
            self._select(self.splits[split])
        self.split = split
        if n and len(self) == 0:
            raise UserError(f"split '{split}' of data source '{self.name}' is empty in {self.root}")

    def _select(self, idx: np.ndarray) -> None:
        """Keep samples ``idx`` (sorted); classes stay as they are so that label k still means classes[k]."""
        idx = np.asarray(idx, dtype=np.int64)
        old_n = len(self.ids)
        pos = np.full(old_n, -1, dtype=np.int64)
        pos[idx] = np.arange(len(idx), dtype=np.int64)
        self.ids = [self.ids[k] for k in idx]
        self.labels = self.labels[idx]
        self._rows = self._rows[idx]
        if self._sizes is not None:
            self._sizes = self._sizes[idx]
        self.meta = {k: np.asarray(v)[idx] for k, v in self.meta.items()}
        new_splits = {}
        for k, s in self.splits.items():
            p = pos[s]
            p = p[p >= 0]
            if len(p):
                new_splits[k] = np.sort(p)
        self.splits = new_splits
        self._manifest = None
        self._probe = None


PROBE_SAMPLES = 8


def _probe_images(source: Source) -> dict[str, Any]:
    n = len(source)
    picks = [0] if n else []
    if n > 1:
        rest = np.random.default_rng(0).choice(np.arange(1, n), size=min(n - 1, PROBE_SAMPLES - 1), replace=False)
        picks += sorted(int(i) for i in rest)
    sizes: dict[tuple[int, int], int] = {}
    modes: dict[str, int] = {}
    unreadable = 0
    for i in picks:
        try:
            img = source._read(i)  # the file's own size and mode, before load() converts it
        except Exception:  # a broken file is reported by load(), with its id, when it is read for real
            unreadable += 1
            continue
        sizes[img.size] = sizes.get(img.size, 0) + 1
        modes[img.mode] = modes.get(img.mode, 0) + 1
    size = max(sizes, key=lambda wh: (sizes[wh], wh[0] * wh[1], wh)) if sizes else None
    mode = max(modes, key=lambda m: (modes[m], m)) if modes else None
    return {
        "files": int(sum(sizes.values())),
        "unreadable": unreadable,
        "size": list(size) if size else None,
        "side": max(size) if size else None,
        "mode": mode,
        "mixed_sizes": len(sizes) > 1,
        "mixed_modes": len(modes) > 1,
        "sizes": {f"{w}x{h}": c for (w, h), c in sorted(sizes.items())},
        "modes": dict(sorted(modes.items())),
    }


def probe_note(source: Any) -> str | None:
    """One line for the user when the probed files of ``source`` differ in size (None otherwise)."""
    if not getattr(source, "probes_files", False):
        return None
    p = source.probe()
    if not p["mixed_sizes"]:
        return None
    seen = ", ".join(f"{wh} x{c}" for wh, c in p["sizes"].items())
    return (f"note: the {p['files']} probed images of {source.name} differ in size ({seen}); the input size and "
            f"augmentation follow the most common, {p['size'][0]}x{p['size'][1]} (pass --image-size to choose)")


def _to_8_bits(img: Image.Image, sample_id: str) -> Image.Image:
    """16-bit grey ("I;16*") scaled to "L" by the high byte (v >> 8); "I"/"F" kept only when within 0..255.

    PIL's ``convert("L")`` clips these modes at 255, which turns a 16-bit picture into (nearly) two grey levels.
    The high byte is what PIL itself keeps of 16-bit RGB and grey+alpha PNGs ("RGB;16B", "LA;16B"), so a 16-bit
    grey file and the same picture as 16-bit RGB load alike; it maps the 8-bit values stored as 257 * v back to v.
    """
    if img.mode.startswith("I;16"):
        arr = np.asarray(img)  # uint16 in the file's byte order
        return Image.fromarray((arr.astype(np.uint16) >> 8).astype(np.uint8), mode="L")
    if img.mode in ("I", "F"):  # 32-bit integer or float pixels: no agreed 8-bit scale
        arr = np.asarray(img)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if not (0 <= lo and hi <= 255):
            raise UserError(f"image {sample_id} has {img.mode} pixels ({'float' if img.mode == 'F' else '32-bit'})"
                            f" from {lo:g} to {hi:g}, outside 0..255; convert it to 8 bits per channel")
    return img


def _first_duplicate(items: list[str]) -> str:
    seen: set[str] = set()
    for x in items:
        if x in seen:
            return x
        seen.add(x)
    return ""


def _open_image_file(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()  # decode now, inside load()'s try, and close the file: no descriptor outlives the call
    return img


def _missing(path: Path, what: str) -> UserError:
    return UserError(f"missing {what}: {path}; put it there or pass the right root")


# --------------------------------------------------------------------------------------------------------------
# digits


@register_source("digits")
class DigitsSource(Source):
    """scikit-learn's bundled ``load_digits``: 1,797 8x8 images, values 0..16 scaled to 0..255 (mode "L").

    No root and no splits: the whole set in scikit-learn's order; ids ``digits/<i>``; classes "0".."9".
    """

    needs_root = False
    root_hint = "nothing (bundled with scikit-learn)"

    def __init__(self, root: Path | None = None, split: str | None = None) -> None:
        super().__init__()
        from sklearn.datasets import load_digits

        d = load_digits()
        # 0..16 -> 0..255 with rounding, so 16 maps to 255 exactly
        self._images = np.rint(np.asarray(d.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
        self.labels = np.asarray(d.target, dtype=np.int64)
        self.classes = [str(k) for k in range(10)]
        self.ids = [f"digits/{i}" for i in range(len(self.labels))]
        self.grayscale = True
        self.native_size = 8
        self._finish(split)

    def _read(self, i: int) -> Image.Image:
        return Image.fromarray(self._images[self._rows[i]])

    def _content_parts(self) -> Iterable[bytes]:
        yield np.ascontiguousarray(self._images[self._rows]).tobytes()


# --------------------------------------------------------------------------------------------------------------
# fashion-mnist


IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


def read_idx(path: str | os.PathLike, magic: int | None = None) -> np.ndarray:
    """Read one IDX file (gzip'd or not; detected from its first bytes) as a uint8 array of its dims.

    ``magic`` (2051 images, 2049 labels) is checked when given. Raises UserError for a wrong magic number,
    a non-uint8 type, a truncated file or a broken gzip stream.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise _missing(path, "IDX file") from exc
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read IDX file {path}: {_one_line(exc)}; download it again") from exc
    if len(data) < 4:
        raise UserError(f"not an IDX file (too short): {path}; download it again")
    (value,) = struct.unpack(">I", data[:4])
    ndim = data[3]
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08 or (magic is not None and value != magic):
        want = f" (expected {magic})" if magic is not None else ""
        raise UserError(f"wrong IDX magic number {value}{want} in {path}; is this the right file?")
    if len(data) < 4 + 4 * ndim:
        raise UserError(f"truncated IDX header in {path}; download it again")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    count = int(np.prod(dims, dtype=np.int64)) if ndim else 0
    body = len(data) - 4 - 4 * ndim
    if body != count:
        raise UserError(f"IDX file {path} holds {body} bytes of data, its header says {count}; download it again")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


@register_source("fashion-mnist")
class FashionMNISTSource(Source):
    """Fashion-MNIST from its four IDX files: 60,000 train then 10,000 test 28x28 images (mode "L").

    Files: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` in root (also found in ``root/fashion-mnist``
    or torchvision's ``root/FashionMNIST/raw``). ids ``train/<i>``, ``test/<i>``; splits train/test. The uint8
    arrays stay in memory (55 MB).
    """

    root_hint = (
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"
    )
    _FILES = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }

    def __init__(self, root: Path, split: str | None = None) -> None:
        super().__init__()
        folder = self._find_folder(root)
        self.root = str(folder)
        images, labels, ids, splits = [], [], [], {}
        start = 0
        for part, (img_name, lab_name) in self._FILES.items():
            x = read_idx(self._file(folder, img_name), IDX_IMAGES_MAGIC)
            y = read_idx(self._file(folder, lab_name), IDX_LABELS_MAGIC)
            if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
                raise UserError(
                    f"fashion-mnist {part}: {x.shape} images but {y.shape} labels in {folder}; download them again"
                )
            images.append(x)
            labels.append(y.astype(np.int64))
            ids.extend(f"{part}/{i}" for i in range(len(y)))
            splits[part] = np.arange(start, start + len(y), dtype=np.int64)
            start += len(y)
        self._images = np.concatenate(images)
        self.labels = np.concatenate(labels)
        self.ids = ids
        self.splits = splits
        self.classes = list(FASHION_CLASSES)
        self.grayscale = True
        self.native_size = int(self._images.shape[1])
        self._finish(split)

    @classmethod
    def _find_folder(cls, root: Path) -> Path:
        for cand in (root, root / "fashion-mnist", root / "FashionMNIST" / "raw"):
            if any((cand / (n + ext)).is_file() for n in ("train-images-idx3-ubyte",) for ext in ("", ".gz")):
                return cand
        return root

    @staticmethod
    def _file(folder: Path, stem: str) -> Path:
        for ext in (".gz", ""):
            if (folder / (stem + ext)).is_file():
                return folder / (stem + ext)
        raise UserError(f"missing {stem}.gz (or {stem}) in {folder}; put the four Fashion-MNIST IDX files there")

    def _read(self, i: int) -> Image.Image:
        return Image.fromarray(self._images[self._rows[i]])

    def _content_parts(self) -> Iterable[bytes]:
        yield np.ascontiguousarray(self._images[self._rows]).tobytes()


# --------------------------------------------------------------------------------------------------------------
# cifar


# The CIFAR python version is only distributed as pickles. A pickle can name any importable callable and have the
# unpickler call it, so these files are read with an unpickler that resolves only the globals that the format's
# numpy arrays need and refuses every other one before anything is called: a crafted file runs no code.
def _numpy_global(modules: tuple[str, ...], name: str) -> Callable[..., Any]:
    import importlib

    for module in modules:  # numpy 2 names its internals numpy._core; numpy 1 (and old pickles) numpy.core
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {name} in {' or '.join(modules)}")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 writes bytes at pickle protocol <= 2 as _codecs.encode(text, "latin1"); nothing else is allowed
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_RECONSTRUCT = ("numpy._core.multiarray", "numpy.core.multiarray")
_FROMBUFFER = ("numpy._core.numeric", "numpy.core.numeric")
_CIFAR_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    # ndarray at protocol <= 4: _reconstruct(ndarray, shape, dtype) then __setstate__; numpy 1 wrote numpy.core.
    **{(m, "_reconstruct"): (lambda: _numpy_global(_RECONSTRUCT, "_reconstruct")) for m in _RECONSTRUCT},
    # ndarray at protocol 5: _frombuffer(buffer, dtype, shape, order)
    **{(m, "_frombuffer"): (lambda: _numpy_global(_FROMBUFFER, "_frombuffer")) for m in _FROMBUFFER},
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`_CIFAR_GLOBALS` (dicts, lists, strings, bytes and numbers
    need no global)."""

    def find_class(self, module: str, name: str) -> Any:
        make = _CIFAR_GLOBALS.get((module, name))
        if make is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return make()


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise _missing(path, "CIFAR file")
    try:
        with open(path, "rb") as f:
            # encoding="bytes" keeps python 2 pickles (the official files) readable: their str become bytes
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise UserError(f"refused to read CIFAR pickle {path}: it calls {exc}, which the CIFAR format never "
                        "holds (only dicts, lists, strings, numbers and numpy arrays are read)") from None
    except Exception as exc:
        raise UserError(f"cannot read CIFAR pickle {path}: {_one_line(exc)}; download it again") from exc
    if not isinstance(obj, dict):
        raise UserError(f"CIFAR pickle {path} holds a {type(obj).__name__}, not a dict; download it again")
    # keys are bytes in the official files (python 2 pickles); accept str keys too
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _pick(d: dict, key: str, path: Path) -> Any:
    if key not in d:
        raise UserError(f"CIFAR pickle {path} has no key '{key}'; download it again")
    return d[key]


class _CifarBase(Source):
    folder_name = ""
    train_files: tuple[str, ...] = ()
    test_file = ""
    meta_file = ""
    label_key = ""
    names_key = ""

    def __init__(self, root: Path, split: str | None = None) -> None:
        super().__init__()
        folder = root / self.folder_name if (root / self.folder_name).is_dir() else root
        if not (folder / self.meta_file).is_file() and not (folder / self.test_file).is_file():
            raise UserError(
                f"no {self.folder_name}/ in {root}; pass the folder that holds it (or the folder itself)"
            )
        self.root = str(folder)
        meta = _unpickle(folder / self.meta_file)
        self.classes = [_text(c) for c in _pick(meta, self.names_key, folder / self.meta_file)]
        coarse_names = meta.get("coarse_label_names")
        data, labels, coarse, ids, splits = [], [], [], [], {}
        start = 0
        for part, files in (("train", self.train_files), ("test", (self.test_file,))):
            n_part = 0
            for fname in files:
                d = _unpickle(folder / fname)
                x = np.asarray(_pick(d, "data", folder / fname), dtype=np.uint8)
                y = np.asarray(_pick(d, self.label_key, folder / fname), dtype=np.int64)
                if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
                    raise UserError(
                        f"CIFAR pickle {folder / fname}: data {x.shape} and {len(y)} labels, expected [n, 3072] "
                        "and n labels; download it again"
                    )
                data.append(x)
                labels.append(y)
                if "coarse_labels" in d:
                    coarse.append(np.asarray(d["coarse_labels"], dtype=np.int64))
                n_part += len(y)
            ids.extend(f"{part}/{i}" for i in range(n_part))
            splits[part] = np.arange(start, start + n_part, dtype=np.int64)
            start += n_part
        # rows are R plane, G plane, B plane of 32x32 each -> HWC for PIL
        self._images = np.ascontiguousarray(np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        self.labels = np.concatenate(labels)
        self.ids = ids
        self.splits = splits
        if coarse and sum(len(c) for c in coarse) == len(self.labels):
            self.meta["coarse"] = np.concatenate(coarse)
            self.coarse_classes = [_text(c) for c in coarse_names] if coarse_names is not None else []
        self.grayscale = False
        self.native_size = 32
        self._finish(split)

    def _read(self, i: int) -> Image.Image:
        return Image.fromarray(self._images[self._rows[i]])

    def _content_parts(self) -> Iterable[bytes]:
        yield np.ascontiguousarray(self._images[self._rows]).tobytes()


def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


@register_source("cifar10")
class Cifar10Source(_CifarBase):
    """CIFAR-10 python pickles: 50,000 train (data_batch_1..5) then 10,000 test 32x32 RGB images.

    root holds ``cifar-10-batches-py/`` or is it. ids ``train/<i>``, ``test/<i>``; splits train/test;
    classes from ``batches.meta`` (label_names).
    """

    root_hint = "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)"
    folder_name = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{k}" for k in range(1, 6))
    test_file = "test_batch"
    meta_file = "batches.meta"
    label_key = "labels"
    names_key = "label_names"


@register_source("cifar100")
class Cifar100Source(_CifarBase):
    """CIFAR-100 python pickles: 50,000 train then 10,000 test 32x32 RGB images, 100 fine labels.

    root holds ``cifar-100-python/`` or is it. ids ``train/<i>``, ``test/<i>``; splits train/test; classes from
    ``meta`` (fine_label_names); the 20 superclasses are in ``meta["coarse"]`` with names in ``coarse_classes``.
    """

    root_hint = "cifar-100-python/ (train, test, meta)"
    folder_name = "cifar-100-python"
    train_files = ("train",)
    test_file = "test"
    meta_file = "meta"
    label_key = "fine_labels"
    names_key = "fine_label_names"


# --------------------------------------------------------------------------------------------------------------
# omniglot


class _Archive:
    """Random access to the members of an uncompressed tar or a zip, indexed once, opened once per process.

    The handle is (re)opened lazily whenever ``os.getpid()`` differs from the opener's: a forked DataLoader
    worker must not share the parent's file offset (zip) or a handle the parent may close. Pickling drops it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.kind = "zip" if path.suffix.lower() == ".zip" else "tar"
        self.members: dict[str, tuple[str, int, int]] = {}  # name -> (member name, data offset (tar), size)
        self.id_to_member: dict[str, str] = {}  # sample id -> member name, filled by the source
        self._handle: Any = None
        self._pid: int | None = None
        try:
            if self.kind == "zip":
                with zipfile.ZipFile(path) as zf:
                    for info in zf.infolist():
                        if not info.is_dir():
                            self.members[_clean_member(info.filename)] = (info.filename, -1, info.file_size)
            else:
                with open(path, "rb") as f:
                    if f.read(2) == b"\x1f\x8b":
                        raise UserError(
                            f"{path} is a compressed tar; random access needs an uncompressed .tar: gunzip it"
                        )
                # "r:" = no compression; the iteration reads only the 512-byte headers and seeks over the data
                with tarfile.open(path, "r:") as tf:
                    for m in tf:
                        if m.isfile():
                            if m.issparse():
                                raise UserError(f"sparse tar member {m.name} in {path}; re-create the tar")
                            self.members[_clean_member(m.name)] = (m.name, m.offset_data, m.size)
        except UserError:
            raise
        except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
            raise UserError(f"cannot read archive {path}: {_one_line(exc)}; download it again") from exc

    def read(self, name: str) -> bytes:
        member, offset, size = self.members[name]
        pid = os.getpid()
        if self._handle is None or self._pid != pid:
            # Not closing an inherited handle: after a fork it is the child's copy; dropping it is enough.
            self._handle = zipfile.ZipFile(self.path) if self.kind == "zip" else os.open(self.path, os.O_RDONLY)
            self._pid = pid
        if self.kind == "zip":
            return self._handle.read(member)  # ZipFile serialises reads on its shared file internally
        data = os.pread(self._handle, size, offset)  # positional read: no shared offset, thread-safe
        if len(data) != size:
            raise OSError(f"short read ({len(data)} of {size} bytes): truncated archive {self.path}")
        return data

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            if self.kind == "zip":
                self._handle.close()
            else:
                os.close(self._handle)
        self._handle = None
        self._pid = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handle"] = None
        state["_pid"] = None
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _clean_member(name: str) -> str:
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


_OMNIGLOT_FILE = re.compile(r"^(\d+)_(\d+)\.png$", re.IGNORECASE)


@register_source("omniglot")
class OmniglotSource(Source):
    """Omniglot (Lake et al.): 105x105 1-bit drawings returned as mode "L" with values 0 and 255.

    root holds, per set, ``images_background/`` (extracted tree), ``images_background.tar`` (uncompressed) or
    ``images_background.zip`` (official), same for ``images_evaluation``; the first form found wins, in that
    order. Archives are read member by member, never extracted. Also found in ``root/omniglot``.

    Class ``<set>/<Alphabet>/characterNN`` (e.g. ``images_background/Latin/character01``), so background and
    evaluation never collide: 964 + 659 classes of 20 drawings. ids = relative paths inside the tree, sorted
    by class then file name. splits "background"/"evaluation"; meta "drawer" (1..20, the ``_DD`` suffix) and
    "alphabet" (index into ``alphabets``, e.g. "images_background/Latin"). ``split=`` reads only that set (the
    other may be absent) and keeps only its classes.
    """

    root_hint = "images_background/ and/or images_evaluation/ (folders, .tar or .zip)"
    SETS = ("background", "evaluation")

    def __init__(self, root: Path, split: str | None = None) -> None:
        super().__init__()
        if root.name in ("images_background", "images_evaluation") and root.is_dir():
            root = root.parent
        base = root
        if not self._available(root) and (root / "omniglot").is_dir():
            base = root / "omniglot"
        found = self._available(base)
        if split is not None and split not in self.SETS:
            raise UserError(f"unknown split '{split}' for data source 'omniglot'; available: {', '.join(self.SETS)}")
        wanted = [split] if split is not None else [s for s in self.SETS if s in found]
        if not wanted:
            raise UserError(f"no images_background or images_evaluation (folder, .tar or .zip) in {root}")
        missing = [s for s in wanted if s not in found]
        if missing:
            raise UserError(
                f"missing images_{missing[0]}/ (or .tar / .zip) in {base}; put it there or pick another split"
            )
        self.root = str(base)
        self._archives: dict[str, _Archive] = {}
        self._storage: dict[str, str] = {}
        entries: list[tuple[str, str, int]] = []  # (class, id, size or -1)
        for s in wanted:
            kind, path = found[s]
            self._storage[s] = f"{kind}:{path.name}"
            entries.extend(self._index_set(s, kind, path))
        if not entries:
            raise UserError(f"no omniglot PNG files under {base}; check the folder")
        entries.sort(key=lambda e: (e[0], e[1]))
        self.classes = sorted({e[0] for e in entries})
        cls_index = {c: k for k, c in enumerate(self.classes)}
        self.alphabets = sorted({c.rsplit("/", 1)[0] for c in self.classes})
        alpha_index = {a: k for k, a in enumerate(self.alphabets)}
        self.ids = [e[1] for e in entries]
        self.labels = np.fromiter((cls_index[e[0]] for e in entries), np.int64, len(entries))
        drawers = np.empty(len(entries), np.int64)
        for k, (_, rel, _) in enumerate(entries):
            m = _OMNIGLOT_FILE.match(rel.rsplit("/", 1)[1])
            if m is None:
                raise UserError(f"unexpected omniglot file name {rel} in {base}; expected IIII_DD.png")
            drawers[k] = int(m.group(2))
        self.meta = {
            "drawer": drawers,
            "alphabet": np.fromiter((alpha_index[e[0].rsplit("/", 1)[0]] for e in entries), np.int64, len(entries)),
        }
        sizes = np.array([e[2] for e in entries], dtype=np.int64)
        self._sizes = sizes if (sizes >= 0).all() else None  # folders: stat lazily in manifest_hash
        self.splits = {
            s: np.array([k for k, e in enumerate(entries) if e[1].startswith(f"images_{s}/")], dtype=np.int64)
            for s in wanted
        }
        self.grayscale = True
        self.native_size = 105
        self._finish(split, native_split=True)

    @staticmethod
    def _available(base: Path) -> dict[str, tuple[str, Path]]:
        found = {}
        for s in OmniglotSource.SETS:
            stem = f"images_{s}"
            for kind, p in (("dir", base / stem), ("tar", base / f"{stem}.tar"), ("zip", base / f"{stem}.zip")):
                if (kind == "dir" and p.is_dir()) or (kind != "dir" and p.is_file()):
                    found[s] = (kind, p)
                    break
        return found

    def _index_set(self, s: str, kind: str, path: Path) -> list[tuple[str, str, int]]:
        top = f"images_{s}"
        out = []
        if kind == "dir":
            for alpha in sorted(os.scandir(path), key=lambda e: e.name):
                if not alpha.is_dir() or alpha.name.startswith("."):
                    continue
                for char in sorted(os.scandir(alpha.path), key=lambda e: e.name):
                    if not char.is_dir() or char.name.startswith("."):
                        continue
                    for f in os.scandir(char.path):
                        if f.name.lower().endswith(".png") and not f.name.startswith(".") and f.is_file():
                            character = f"{top}/{alpha.name}/{char.name}"
                            out.append((character, f"{character}/{f.name}", -1))
            return out
        arch = _Archive(path)
        self._archives[s] = arch
        remap: dict[str, str] = {}
        for name, (_, _, size) in arch.members.items():
            parts = name.split("/")
            if parts and parts[0] == top:
                parts = parts[1:]
            # <Alphabet>/<characterNN>/<file>.png; anything else (__MACOSX, ._ files, READMEs) is not a drawing
            if len(parts) != 3 or not parts[2].lower().endswith(".png") or any(p.startswith(("_", ".")) for p in parts):
                continue
            rel = f"{top}/{parts[0]}/{parts[1]}/{parts[2]}"
            remap[rel] = name
            out.append((f"{top}/{parts[0]}/{parts[1]}", rel, size))
        arch.id_to_member = remap
        return out

    def _read(self, i: int) -> Image.Image:
        rel = self.ids[i]
        s = rel.split("/", 1)[0][len("images_") :]
        arch = self._archives.get(s)
        if arch is None:
            return _open_image_file(Path(self.root or ".") / rel)
        return Image.open(io.BytesIO(arch.read(arch.id_to_member[rel])))

    def _file_sizes(self) -> np.ndarray | None:
        if self._sizes is None:
            self._sizes = self._file_size_by_stat_mixed()
        return self._sizes

    def _file_size_by_stat_mixed(self) -> np.ndarray:
        # one set may be a folder and the other an archive: take archive sizes from the index, stat the rest
        sizes = np.empty(len(self.ids), np.int64)
        root = Path(self.root or ".")
        for k, rel in enumerate(self.ids):
            s = rel.split("/", 1)[0][len("images_") :]
            arch = self._archives.get(s)
            if arch is not None:
                sizes[k] = arch.members[arch.id_to_member[rel]][2]
            else:
                try:
                    sizes[k] = os.stat(root / rel).st_size
                except OSError as exc:
                    raise UserError(f"missing image file {rel} in {root}: {exc.strerror or exc}") from exc
        return sizes

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["storage"] = dict(self._storage)
        return d

    def close(self) -> None:
        for a in self._archives.values():
            a.close()


# --------------------------------------------------------------------------------------------------------------
# imagefolder


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


@register_source("imagefolder")
class ImageFolderSource(Source):
    """``root/<class>/<file>`` (files may sit in sub-folders of a class folder), torchvision-style.

    Classes are the sorted class-folder names; ids the relative paths ``<class>/<file>``, sorted by class then
    path. Files with extensions in :data:`IMAGE_EXTENSIONS` (any case) count; hidden files and files directly
    in root are ignored. ``grayscale=True`` makes ``load`` return mode "L" (default "RGB"). No splits.

    Symbolic links inside the tree are followed while they point inside root; a link out of root is refused
    unless ``follow_links=True``. Either way a link to one of its own parent folders (a loop) and two ids for
    one real file (a link to another class's image or folder) are refused, so every image has one id and one
    label.
    """

    root_hint = "one sub-folder of images per class"
    probes_files = True

    def __init__(self, root: Path, split: str | None = None, *, grayscale: bool = False,
                 follow_links: bool = False) -> None:
        super().__init__()
        self.root = str(root)
        self.options = {"grayscale": bool(grayscale), "follow_links": bool(follow_links)}
        self._follow_links = bool(follow_links)
        class_dirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not class_dirs:
            raise UserError(f"no class folders in {root}; imagefolder expects root/<class>/<image files>")
        ids, labels = [], []
        seen: dict[str, str] = {}  # real path -> the id that first reached it
        for k, c in enumerate(class_dirs):
            files = self._walk(root, c, seen)
            if not files:
                raise UserError(
                    f"class folder {root / c} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                    "add images or remove the folder"
                )
            files.sort()
            ids.extend(files)
            labels.extend([k] * len(files))
        self.classes = class_dirs
        self.ids = ids
        self.labels = np.asarray(labels, dtype=np.int64)
        self.grayscale = bool(grayscale)
        self._finish(split)

    def _real(self, root: Path, rel: str) -> str:
        """Real path of ``root/rel``; refuses a link that leaves root unless links may be followed anywhere."""
        real = os.path.realpath(root / rel)
        if not self._follow_links and os.path.commonpath([real, str(root)]) != str(root):
            raise UserError(f"imagefolder: {rel} in {root} is a link to {real}, outside the root; pass "
                            "follow_links=True (extract --follow-links) to read linked files outside it")
        return real

    def _walk(self, root: Path, top: str, seen: dict[str, str]) -> list[str]:
        """Image ids under ``root/top``, depth first; ``seen`` maps real files to ids across all classes."""
        files: list[str] = []
        # (relative folder, real paths of it and its parents): a folder whose real path is among its own
        # parents' is a loop (os.walk(followlinks=True) would go round it until the path is too long)
        stack = [(top, (self._real(root, top),))]
        while stack:
            rel_dir, parents = stack.pop()
            try:
                entries = sorted(os.scandir(root / rel_dir), key=lambda e: e.name)
            except OSError as exc:
                raise UserError(f"cannot list {root / rel_dir}: {exc.strerror or exc}") from exc
            for e in entries:
                if e.name.startswith("."):
                    continue
                rel = f"{rel_dir}/{e.name}"
                if e.is_dir():  # follows links
                    real = self._real(root, rel) if e.is_symlink() else os.path.join(parents[-1], e.name)
                    if real in parents:
                        raise UserError(f"imagefolder: {rel} in {root} is a link to {real}, one of its own "
                                        "parent folders (a loop); remove the link")
                    stack.append((rel, (*parents, real)))
                elif _is_image_name(e.name):
                    real = self._real(root, rel) if e.is_symlink() else os.path.join(parents[-1], e.name)
                    if real in seen:
                        raise UserError(f"imagefolder: {rel} and {seen[real]} in {root} are one file ({real}) "
                                        "reached twice through a link; remove the link or the copy")
                    seen[real] = rel
                    files.append(rel)
        return files

    def _read(self, i: int) -> Image.Image:
        return _open_image_file(Path(self.root or ".") / self.ids[i])

    def _file_sizes(self) -> np.ndarray | None:
        if self._sizes is None:
            self._sizes = self._file_size_by_stat()
        return self._sizes


# --------------------------------------------------------------------------------------------------------------
# csv (miniImageNet style)


@register_source("csv")
class CsvSource(Source):
    """miniImageNet-style split files: root holds ``images/`` and ``train.csv``, ``val.csv``, ``test.csv``.

    Each csv has the header ``filename,label``. Rows keep the csv order; ids ``images/<filename>``. Classes in
    order of first appearance, going through the files in train, val, test order. Without ``split`` all csv
    files present are concatenated (splits train/val/test); ``split="val"`` reads only ``val.csv`` and keeps only
    its classes (labels 0..C_val-1). ``grayscale=True`` returns mode "L".
    """

    root_hint = "images/ plus train.csv, val.csv, test.csv (header filename,label)"
    probes_files = True
    PARTS = ("train", "val", "test")

    def __init__(self, root: Path, split: str | None = None, *, grayscale: bool = False) -> None:
        super().__init__()
        self.root = str(root)
        self.options = {"grayscale": bool(grayscale)}
        if split is not None and split not in self.PARTS:
            raise UserError(f"unknown split '{split}' for data source 'csv'; available: {', '.join(self.PARTS)}")
        if not (root / "images").is_dir():
            raise _missing(root / "images", "images folder")
        parts = [split] if split is not None else [p for p in self.PARTS if (root / f"{p}.csv").is_file()]
        if not parts:
            raise UserError(f"no train.csv, val.csv or test.csv in {root}; put the split files there")
        classes: dict[str, int] = {}
        ids, labels, splits = [], [], {}
        for p in parts:
            path = root / f"{p}.csv"
            if not path.is_file():
                raise _missing(path, "split file")
            start = len(ids)
            for fname, label in self._read_csv(path):
                if label not in classes:
                    classes[label] = len(classes)
                ids.append(f"images/{fname}")
                labels.append(classes[label])
            splits[p] = np.arange(start, len(ids), dtype=np.int64)
        self.classes = list(classes)
        self.ids = ids
        self.labels = np.asarray(labels, dtype=np.int64)
        self.splits = splits
        self.grayscale = bool(grayscale)
        if ids and not (root / ids[0]).is_file():
            raise _missing(root / ids[0], f"image listed in {parts[0]}.csv")
        self._finish(split, native_split=True)

    @staticmethod
    def _read_csv(path: Path) -> list[tuple[str, str]]:
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(_csv.reader(f))
        except (OSError, UnicodeDecodeError, _csv.Error) as exc:
            raise UserError(f"cannot read split file {path}: {_one_line(exc)}") from exc
        if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
            raise UserError(f"split file {path} must start with the header 'filename,label'; fix its first line")
        out = []
        for line_no, row in enumerate(rows[1:], start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise UserError(f"malformed row {line_no} in {path}: expected 'filename,label'")
            out.append((row[0].strip(), row[1].strip()))
        return out

    def _read(self, i: int) -> Image.Image:
        return _open_image_file(Path(self.root or ".") / self.ids[i])

    def _file_sizes(self) -> np.ndarray | None:
        if self._sizes is None:
            self._sizes = self._file_size_by_stat()
        return self._sizes


# --------------------------------------------------------------------------------------------------------------
# imagenet-lowshot


_LOWSHOT_CLASS_KEYS = {
    "base": "base_classes",
    "base_1": "base_classes_1",
    "base_2": "base_classes_2",
    "novel_1": "novel_classes_1",
    "novel_2": "novel_classes_2",
}


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise _missing(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"malformed {what} {path}: {_one_line(exc)}; fix or replace the file") from exc


@register_source("imagenet-lowshot")
class ImageNetLowShotSource(Source):
    """ImageNet through the low-shot benchmark's lists (Hariharan & Girshick): custom label order, base/novel.

    root holds ``train.json`` and ``val.json`` (``label_names``, ``image_labels``, ``image_names``; names
    relative to root) and ``label_idx.json`` (``label_names`` and the class lists ``base_classes``,
    ``base_classes_1``, ``base_classes_2``, ``novel_classes_1``, ``novel_classes_2``). ``list="train"`` (default)
    or ``"val"`` picks the list; ``split="train"``/``"val"`` does the same, any other split name keeps that
    sample subset of the list. Row i is list index i (the benchmark's split files index rows of train.json);
    label k means ``label_names[k]``, never re-sorted. class_splits base, base_1, base_2, novel_1, novel_2, novel;
    sample splits the same names. Images load as "RGB".
    """

    root_hint = "train.json, val.json and label_idx.json"
    probes_files = True
    LISTS = ("train", "val")

    def __init__(self, root: Path, split: str | None = None, *, list: str | None = None) -> None:  # noqa: A002
        super().__init__()
        self.root = str(root)
        if split in self.LISTS:
            if list is not None and list != split:
                raise UserError(f"split '{split}' and list '{list}' disagree; give only one of them")
            list, sample_split = split, None
        else:
            sample_split = split
        list = list or "train"
        if list not in self.LISTS:
            raise UserError(f"unknown list '{list}' for imagenet-lowshot; use list=train or list=val")
        self.options = {"list": list}
        idx = _load_json(root / "label_idx.json", "label index")
        lst = _load_json(root / f"{list}.json", "image list")
        for what, obj, keys in (
            ("label_idx.json", idx, ["label_names", *_LOWSHOT_CLASS_KEYS.values()]),
            (f"{list}.json", lst, ["label_names", "image_labels", "image_names"]),
        ):
            if not isinstance(obj, dict):
                raise UserError(f"malformed {root / what}: expected a JSON object; fix or replace the file")
            missing = [k for k in keys if k not in obj]
            if missing:
                raise UserError(f"malformed {root / what}: no key {', '.join(missing)}; fix or replace the file")
        names = [str(c) for c in idx["label_names"]]
        if [str(c) for c in lst["label_names"]] != names:
            raise UserError(
                f"label_names of {root / (list + '.json')} differ from label_idx.json; both must use the same "
                "custom order"
            )
        image_names, image_labels = lst["image_names"], lst["image_labels"]
        if (
            not isinstance(image_names, builtins.list)
            or not isinstance(image_labels, builtins.list)
            or len(image_names) != len(image_labels)
        ):
            raise UserError(
                f"malformed {root / (list + '.json')}: image_names and image_labels must be lists of one length"
            )
        try:
            self.labels = np.asarray(image_labels, dtype=np.int64)
        except (TypeError, ValueError) as exc:
            raise UserError(f"malformed {root / (list + '.json')}: image_labels must be integers") from exc
        self.classes = names
        self.ids = [str(n) for n in image_names]
        n_cls = len(names)
        class_splits: dict[str, list[int]] = {}
        for short, key in _LOWSHOT_CLASS_KEYS.items():
            vals = idx[key]
            if not isinstance(vals, builtins.list) or not all(isinstance(v, int) and 0 <= v < n_cls for v in vals):
                raise UserError(
                    f"malformed {root / 'label_idx.json'}: {key} must be a list of class indices 0..{n_cls - 1}"
                )
            class_splits[short] = sorted(int(v) for v in vals)
        class_splits["novel"] = sorted(set(class_splits["novel_1"]) | set(class_splits["novel_2"]))
        self.class_splits = class_splits
        in_range = (self.labels >= 0) & (self.labels < n_cls)
        if not in_range.all():
            raise UserError(f"malformed {root / (list + '.json')}: image_labels outside 0..{n_cls - 1}")
        self.splits = {}
        for short, cls_list in class_splits.items():
            mask = np.zeros(n_cls, dtype=bool)
            mask[cls_list] = True
            self.splits[short] = np.nonzero(mask[self.labels])[0].astype(np.int64)
        self.grayscale = False
        if self.ids and not (root / self.ids[0]).is_file():
            raise _missing(root / self.ids[0], f"first image of {list}.json")
        self._finish(sample_split)
        self.split = split

    def _read(self, i: int) -> Image.Image:
        return _open_image_file(Path(self.root or ".") / self.ids[i])

    def _file_sizes(self) -> np.ndarray | None:
        if self._sizes is None:
            self._sizes = self._file_size_by_stat()
        return self._sizes


# --------------------------------------------------------------------------------------------------------------
# transforms


NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
_SPEC_KEYS = ("size", "resize", "channels", "normalize", "interpolation")
# informational keys written by transform_spec; build_transform accepts and ignores them
_NOTE_KEYS = ("source_grayscale", "source_native_size", "channel_op", "source_probe")


def _check_spec(spec: dict) -> dict:
    """Validate a transform spec and return its canonical form (the five keys, plus notes if present)."""
    if not isinstance(spec, dict):
        raise UserError(f"transform spec must be a dict, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(_SPEC_KEYS) - set(_NOTE_KEYS))
    if unknown:
        raise UserError(f"unknown transform spec key {', '.join(unknown)}; known: {', '.join(_SPEC_KEYS)}")
    size = spec.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise UserError(f"transform spec 'size' must be a positive integer, got {size!r}")
    resize = spec.get("resize")
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < size):
        raise UserError(f"transform spec 'resize' must be null or an integer >= size ({size}), got {resize!r}")
    channels = spec.get("channels", 3)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise UserError(f"transform spec 'channels' must be 1 or 3, got {channels!r}")
    interp = spec.get("interpolation", "bilinear")
    if interp not in _INTERPOLATIONS:
        raise UserError(f"unknown interpolation {interp!r}; use one of {', '.join(_INTERPOLATIONS)}")
    norm = spec.get("normalize", "none")
    if isinstance(norm, str):
        if norm not in ("imagenet", "tflite", "none"):
            raise UserError(f"unknown normalize {norm!r}; use imagenet, tflite, none or "
                            "{'mean': [...], 'std': [...]}")
        if norm == "imagenet" and channels != 3:
            raise UserError("normalize 'imagenet' needs channels 3; give {'mean': [m], 'std': [s]} for one channel")
        norm_c: Any = norm
    elif isinstance(norm, dict) and set(norm) == {"mean", "std"}:
        try:
            mean = [float(v) for v in norm["mean"]]
            std = [float(v) for v in norm["std"]]
        except (TypeError, ValueError) as exc:
            raise UserError("normalize mean and std must be lists of numbers") from exc
        if len(mean) not in (1, channels) or len(std) not in (1, channels) or any(s <= 0 for s in std):
            raise UserError(f"normalize mean/std must have 1 or {channels} entries and positive std")
        norm_c = {"mean": mean, "std": std}
    else:
        raise UserError(f"normalize must be imagenet, tflite, none or {{'mean': [...], 'std': [...]}}, got {norm!r}")
    out = {"size": int(size), "resize": None if resize is None else int(resize), "channels": int(channels),
           "normalize": norm_c, "interpolation": interp}
    for k in _NOTE_KEYS:
        if k in spec:
            out[k] = spec[k]
    return out


def _to_tensor(img: Image.Image, spec: dict):
    import torch

    arr = np.array(img, dtype=np.uint8)  # a copy: torch.from_numpy wants a writable array
    t = torch.from_numpy(arr)
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    t = t.to(torch.float32)
    norm = spec["normalize"]
    if norm == "tflite":
        return ((t - 127.0) / 128.0).contiguous()  # (x*255 - 127) / 128 with x in [0, 1], computed on 0..255
    t = t / 255.0
    if norm == "none":
        return t.contiguous()
    mean, std = NORMALIZATIONS[norm] if isinstance(norm, str) else (norm["mean"], norm["std"])
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return ((t - m) / s).contiguous()


def _to_channels(img: Image.Image, channels: int) -> Image.Image:
    mode = "RGB" if channels == 3 else "L"
    # "L" -> "RGB" replicates the channel; "RGB" -> "L" uses ITU-R 601-2 luma (PIL's convert)
    return img if img.mode == mode else img.convert(mode)


def _frame(img: Image.Image, spec: dict) -> Image.Image:
    """The deterministic geometry: short side to ``resize`` then centre crop, or squash to size x size."""
    size, resize = spec["size"], spec["resize"]
    resample = _INTERPOLATIONS[spec["interpolation"]]
    w, h = img.size
    if resize is None:
        return img if (w, h) == (size, size) else img.resize((size, size), resample)
    # torchvision's Resize(int): the short side becomes `resize`, the long side int(resize * long / short)
    if w <= h:
        nw, nh = resize, int(resize * h / w)
    else:
        nw, nh = int(resize * w / h), resize
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    # torchvision's CenterCrop offsets: round((dim - size) / 2)
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def build_transform(spec: dict) -> Callable[[Image.Image], Any]:
    """A callable PIL image -> float32 tensor [channels, size, size] following ``spec``.

    spec: ``size`` (output side), ``resize`` (short side before a centre crop of ``size``; None squashes to
    size x size), ``channels`` (3: grayscale replicated to RGB; 1: RGB to luma), ``normalize`` ("imagenet",
    "tflite" = (x*255-127)/128, "none" = x in [0, 1], or {"mean": [...], "std": [...]} on x in [0, 1]) and
    ``interpolation`` ("bilinear" or "bicubic", PIL's antialiased filters). Raises UserError for a bad spec.
    """
    spec = _check_spec(spec)

    def transform(img: Image.Image):
        if img.mode == "L" and spec["channels"] == 3:
            # replicating after the resize gives the same pixels (the three planes are equal) for a third of the work
            return _to_tensor(_frame(img, spec).convert("RGB"), spec)
        return _to_tensor(_frame(_to_channels(img, spec["channels"]), spec), spec)

    transform.spec = spec  # type: ignore[attr-defined]
    return transform


def transform_spec(input_spec: dict, source: Source, size: int | None = None) -> dict:
    """The full transform spec recorded in the store: a backbone's input spec fitted to ``source``.

    ``size`` overrides the backbone's size and scales ``resize`` with it (same crop ratio, e.g. 256/224 at 84 px
    -> resize 96). Missing keys default to: size = the source's native size, channels 3, normalize "imagenet"
    (3 channels) or "none" (1 channel), interpolation "bilinear". The result adds notes from the source:
    ``source_grayscale``, ``source_native_size`` and ``channel_op`` ("replicate" gray -> RGB, "luma" RGB -> gray,
    or "none"), so two sources that need different channel handling never share a fingerprint; sources whose
    files may hold any size also add ``source_probe`` (:meth:`Source.probe`: the size and mode found).
    """
    spec = {k: v for k, v in dict(input_spec or {}).items() if k not in _NOTE_KEYS}
    unknown = sorted(set(spec) - set(_SPEC_KEYS))
    if unknown:
        raise UserError(f"unknown input spec key {', '.join(unknown)}; known: {', '.join(_SPEC_KEYS)}")
    base_size = spec.get("size") or source.native_size
    if size is not None:
        if base_size and spec.get("resize") is not None:
            spec["resize"] = int(round(size * spec["resize"] / base_size))
        spec["size"] = int(size)
    elif base_size:
        spec["size"] = int(base_size)
    else:
        raise UserError(f"no input size for data source '{source.name}' (its images vary); pass a size")
    spec.setdefault("resize", None)
    spec.setdefault("channels", 3)
    spec.setdefault("normalize", "imagenet" if spec["channels"] == 3 else "none")
    spec.setdefault("interpolation", "bilinear")
    spec["source_grayscale"] = bool(source.grayscale)
    spec["source_native_size"] = source.native_size
    if getattr(source, "probes_files", False):
        spec["source_probe"] = source.probe()
    if source.grayscale and spec["channels"] == 3:
        spec["channel_op"] = "replicate"
    elif not source.grayscale and spec["channels"] == 1:
        spec["channel_op"] = "luma"
    else:
        spec["channel_op"] = "none"
    return _check_spec(spec)


def build_augment(
    spec: dict,
    kind: str = "fsor",
    *,
    scale: tuple[float, float] = (0.6, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    pad: int = 8,
) -> Callable[[Image.Image, Any], Any]:
    """A seeded random augmentation: callable (PIL image, torch.Generator) -> tensor [channels, size, size].

    kind "fsor": random resized crop of the whole image (area fraction in ``scale``, aspect ratio in ``ratio``,
    torchvision's 10 tries then centre fallback) straight to size x size, horizontal flip with p 0.5, then the
    spec's normalisation. kind "padcrop": the clean framing, zero padding of ``pad`` pixels, a random
    size x size crop, flip (the support views of TANE and DNPG). Every call draws a fixed number of values
    from the generator and nothing from the global RNGs, so the same generator seed gives the same view and
    view k of a seeded generator does not depend on the image sizes seen before. The callable carries
    ``.recipe`` (JSON) for the store's attributes.
    """
    import torch

    spec = _check_spec(spec)
    size, resample = spec["size"], _INTERPOLATIONS[spec["interpolation"]]
    if kind == "fsor":
        lo, hi = float(scale[0]), float(scale[1])
        if not 0 < lo <= hi <= 1:
            raise UserError(f"augment scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        log_r = (math.log(ratio[0]), math.log(ratio[1]))
        tries = 10

        def augment(img: Image.Image, generator: "torch.Generator"):
            u = torch.rand(4 * tries + 1, generator=generator, dtype=torch.float64).tolist()
            img = _to_channels(img, spec["channels"])
            w, h = img.size
            area = w * h
            box = None
            for t in range(tries):
                target = area * (lo + (hi - lo) * u[4 * t])
                r = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[4 * t + 1])
                cw = int(round(math.sqrt(target * r)))
                ch = int(round(math.sqrt(target / r)))
                if 0 < cw <= w and 0 < ch <= h:
                    top = min(int(u[4 * t + 2] * (h - ch + 1)), h - ch)
                    left = min(int(u[4 * t + 3] * (w - cw + 1)), w - cw)
                    box = (left, top, left + cw, top + ch)
                    break
            if box is None:  # centre crop with the ratio clamped, as torchvision does
                in_ratio = w / h
                if in_ratio < ratio[0]:
                    cw, ch = w, int(round(w / ratio[0]))
                elif in_ratio > ratio[1]:
                    ch, cw = h, int(round(h * ratio[1]))
                else:
                    cw, ch = w, h
                top, left = (h - ch) // 2, (w - cw) // 2
                box = (left, top, left + cw, top + ch)
            out = img.resize((size, size), resample, box=box)  # crop and resize in one resampling pass
            if u[-1] < 0.5:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return _to_tensor(out, spec)

        recipe = {"kind": "fsor", "scale": [lo, hi], "ratio": [float(ratio[0]), float(ratio[1])], "flip": 0.5}
    elif kind == "padcrop":
        if pad < 0:
            raise UserError(f"augment pad must be >= 0, got {pad}")

        def augment(img: Image.Image, generator: "torch.Generator"):
            u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
            img = _frame(_to_channels(img, spec["channels"]), spec)
            if pad:
                img = ImageOps.expand(img, border=pad, fill=0)
            top = min(int(u[0] * (2 * pad + 1)), 2 * pad)
            left = min(int(u[1] * (2 * pad + 1)), 2 * pad)
            out = img.crop((left, top, left + size, top + size))
            if u[2] < 0.5:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return _to_tensor(out, spec)

        recipe = {"kind": "padcrop", "pad": int(pad), "flip": 0.5}
    else:
        raise UserError(f"unknown augmentation kind {kind!r}; use fsor or padcrop")
    augment.spec = spec  # type: ignore[attr-defined]
    augment.recipe = recipe  # type: ignore[attr-defined]
    return augment

"""The image probe of the file sources (size and mode of a sample of the files) and the small-image rule it feeds:
the input size, the stem and the ``--augment auto`` plan of an image folder follow what its files hold, through
the same code path the built-in sources take."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from extract import datasets as ds
from extract.run import ExtractConfig, run_extraction
from extract.train import TrainConfig, train
from featstore.cli import cli as featstore_cli
from featstore.store import FeatureStore


def _tree(root: Path, size: tuple[int, int], mode: str, fmt: str, per_class: int = 6, classes: int = 3,
          seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    ext = {"PNG": "png", "JPEG": "jpg"}[fmt]
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(
                root / f"c{c}" / f"{k:02d}.{ext}", fmt)
    return root


@pytest.fixture
def grey28(tmp_path):
    return _tree(tmp_path / "grey28", (28, 28), "L", "PNG")


@pytest.fixture
def rgb_jpegs(tmp_path):
    return _tree(tmp_path / "rgb", (120, 96), "RGB", "JPEG")


def _opened_with_pil(root: Path, ids) -> tuple[Counter, Counter]:
    """Sizes and modes of the given files as PIL reads them (the expected values, found without the source)."""
    sizes, modes = Counter(), Counter()
    for rel in ids:
        with Image.open(root / rel) as img:
            sizes[f"{img.size[0]}x{img.size[1]}"] += 1
            modes[img.mode] += 1
    return sizes, modes


def _probed_ids(source) -> list[str]:
    # the probe's sample: the first file and seven others drawn with seed 0 among the rest
    rest = np.random.default_rng(0).choice(np.arange(1, len(source)), size=ds.PROBE_SAMPLES - 1, replace=False)
    return [source.ids[0]] + [source.ids[int(i)] for i in sorted(rest)]


def test_probe_grey_png_tree(grey28):
    s = ds.open_source("imagefolder", grey28)
    p = s.probe()
    sizes, modes = _opened_with_pil(grey28, _probed_ids(s))
    assert p["sizes"] == dict(sizes) == {"28x28": 8} and p["modes"] == dict(modes) == {"L": 8}
    assert p["files"] == 8 and p["unreadable"] == 0 and p["size"] == [28, 28] and p["mode"] == "L"
    assert not p["mixed_sizes"] and not p["mixed_modes"]
    assert s.native_size == 28
    assert s.describe()["probe"] == p and s.describe()["native_size"] == 28
    spec = ds.transform_spec({"size": 84, "channels": 3, "normalize": "imagenet"}, s)
    assert spec["source_probe"] == p and spec["source_native_size"] == 28
    json.dumps(spec)
    assert ds.transform_spec(spec, s) == spec  # a recorded spec re-merges to itself
    assert ds.probe_note(s) is None


def test_probe_rgb_jpeg_tree(rgb_jpegs):
    s = ds.open_source("imagefolder", rgb_jpegs)
    p = s.probe()
    sizes, modes = _opened_with_pil(rgb_jpegs, _probed_ids(s))
    assert p["sizes"] == dict(sizes) == {"120x96": 8} and p["modes"] == dict(modes) == {"RGB": 8}
    assert p["size"] == [120, 96] and p["side"] == 120 and p["mode"] == "RGB"
    assert s.native_size == 120


def test_probe_is_per_split_and_for_csv_and_lowshot(tmp_path):
    root = tmp_path / "csv"
    (root / "images").mkdir(parents=True)
    rows = {"train": [], "val": []}
    for k in range(10):
        part, size = ("train", 28) if k < 6 else ("val", 40)
        Image.fromarray(np.full((size, size), k, np.uint8)).save(root / "images" / f"{k}.png")
        rows[part].append(f"{k}.png,{'a' if k % 2 else 'b'}{part}")
    for part, lines in rows.items():
        (root / f"{part}.csv").write_text("filename,label\n" + "\n".join(lines) + "\n")
    assert ds.open_source("csv", root, split="train").native_size == 28
    assert ds.open_source("csv", root, split="val").probe()["sizes"] == {"40x40": 4}
    src = ds.open_source("csv", root)
    both = src.probe()
    sizes, _ = _opened_with_pil(root, _probed_ids(src))
    assert both["sizes"] == dict(sizes) and set(sizes) == {"28x28", "40x40"} and both["mixed_sizes"]
    assert both["size"] == ([28, 28] if sizes["28x28"] >= sizes["40x40"] else [40, 40])

    lowshot = tmp_path / "lowshot"
    (lowshot / "img").mkdir(parents=True)
    names = []
    for k in range(4):
        Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(lowshot / "img" / f"{k}.jpg")
        names.append(f"img/{k}.jpg")
    idx = {"label_names": ["x", "y"], "base_classes": [0], "base_classes_1": [0], "base_classes_2": [0],
           "novel_classes_1": [1], "novel_classes_2": [1]}
    (lowshot / "label_idx.json").write_text(json.dumps(idx))
    for part in ("train", "val"):
        (lowshot / f"{part}.json").write_text(json.dumps(
            {"label_names": ["x", "y"], "image_labels": [0, 0, 1, 1], "image_names": names}))
    p = ds.open_source("imagenet-lowshot", lowshot).probe()
    assert p["files"] == 4 and p["size"] == [60, 50] and p["mode"] == "RGB"


def test_probe_mixed_sizes_says_so(tmp_path):
    root = tmp_path / "mixed"
    (root / "a").mkdir(parents=True)
    for k in range(8):  # every file is probed: 5 at 28 px, 3 at 100 px
        side = 28 if k < 5 else 100
        Image.fromarray(np.zeros((side, side), np.uint8)).save(root / "a" / f"{k}.png")
    s = ds.open_source("imagefolder", root)
    p = s.probe()
    assert p["mixed_sizes"] and p["sizes"] == {"28x28": 5, "100x100": 3}
    assert p["size"] == [28, 28] and s.native_size == 28  # the most common size decides
    note = ds.probe_note(s)
    assert "differ in size" in note and "28x28 x5" in note and "100x100 x3" in note and "most common" in note
    # a tie goes to the larger size
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(root / "a" / "4.png")
    tie = ds.open_source("imagefolder", root).probe()
    assert tie["sizes"] == {"28x28": 4, "100x100": 4} and tie["size"] == [100, 100]


def test_probe_skips_a_broken_file(tmp_path):
    root = _tree(tmp_path / "t", (28, 28), "L", "PNG", per_class=2, classes=2)
    (root / "c0" / "00.png").write_bytes(b"\x89PNG not really")
    s = ds.open_source("imagefolder", root)  # opening reads no file for real; the probe skips the broken one
    p = s.probe()
    assert p["files"] == 3 and p["unreadable"] == 1 and p["size"] == [28, 28]


TRAIN = dict(model="conv4", dataset="imagefolder", epochs=1, batch_size=6, steps_per_epoch=1, val="none",
             checkpoint_every=1, threads=1, quiet=True)


def test_auto_follows_the_probe_like_the_built_in_sources(grey28, rgb_jpegs, tmp_path):
    grey = train(TrainConfig(out=str(tmp_path / "grey"), data_root=str(grey28), **TRAIN))
    # the same path as fashion-mnist's 28-px images: the small-input stem at its 32-px input, a 3-px shift
    assert grey["config"]["small_input"] is True
    assert grey["transform"]["size"] == 32 and grey["transform"]["source_probe"]["size"] == [28, 28]
    assert grey["augment"] == {"kind": "shift", "shift": 3, "pad": "replicate", "flip": True}
    assert grey["data"]["source"]["probe"]["mode"] == "L"
    rgb = train(TrainConfig(out=str(tmp_path / "rgb"), data_root=str(rgb_jpegs), **TRAIN))
    assert rgb["config"]["small_input"] is False and rgb["transform"]["size"] == 84
    assert rgb["augment"]["kind"] == "lowshot" and rgb["augment"]["scale"] == [0.08, 1.0]
    assert rgb["augment"]["jitter"] == 0.4 and rgb["augment"]["flip"] is True


def test_probe_in_the_store_fingerprint_and_info(grey28, tmp_path):
    out = tmp_path / "s.zarr"
    run_extraction(ExtractConfig(model="conv4", out=str(out), dataset="imagefolder", data_root=str(grey28),
                                 random_init=True, workers=0, threads=1, quiet=True, chunk_rows=8))
    st = FeatureStore.open(out)
    assert st.fingerprint["transform"]["source_probe"]["size"] == [28, 28]
    assert st.fingerprint["transform"]["size"] == 32 and st.fingerprint["weights"]["small_input"] is True
    shown = CliRunner().invoke(featstore_cli, ["info", str(out)])
    assert shown.exit_code == 0 and "source_probe" in shown.output and "28x28" in shown.output

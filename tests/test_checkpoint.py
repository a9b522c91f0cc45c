"""featstore.checkpoint: reading checkpoints (weights only) and the classifier rows a store's checkpoint holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from featstore.checkpoint import checkpoint_classifier, classifier_rows, load_weights_only, read_checkpoint, sha256_file
from featstore.errors import CheckpointError, UserError
from featstore.store import FeatureStore, Layout

DIM = 6


def write_checkpoint(path, names, weight, bias=None):
    classifier = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    torch.save({"format": "featstore-checkpoint", "version": 1, "model": "test", "state_dict": {},
                "classifier": classifier, "classes": list(names), "provenance": {}}, path)
    return path


def make_store(path, ckpt, classes=("a", "b", "c", "d"), recorded=None):
    return FeatureStore.create(path, Layout(n=8, dim=DIM, dtype="float32"),
                               fingerprint={"checkpoint_sha256": sha256_file(ckpt)}, classes=list(classes),
                               labels=np.repeat(np.arange(4), 2),
                               provenance={"config": {"checkpoint": recorded or str(ckpt)}})


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, DIM, generator=g), torch.randn(3, generator=g)


def test_rows_are_matched_by_class_name(tmp_path, weights):
    weight, bias = weights
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", ["b", "c", "a"], weight, bias)
    store = make_store(tmp_path / "s.zarr", ckpt)
    w, b, names, sha = checkpoint_classifier(store)
    assert names == ["b", "c", "a"] and sha == sha256_file(ckpt) and w.dtype == np.float32
    np.testing.assert_array_equal(w, weight.numpy())
    rows_w, rows_b = classifier_rows(store, np.array([0, 1, 2]))   # store classes a, b, c -> rows 2, 0, 1
    assert rows_w.dtype == np.float32 and rows_w.shape == (3, DIM)
    np.testing.assert_array_equal(rows_w, weight.numpy()[[2, 0, 1]])
    np.testing.assert_array_equal(rows_b, bias.numpy()[[2, 0, 1]])
    rows_w, rows_b = classifier_rows(store, [2, 0])
    np.testing.assert_array_equal(rows_w, weight.numpy()[[1, 2]])


def test_no_bias_gives_none(tmp_path, weights):
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", ["a", "b", "c"], weights[0])
    rows_w, rows_b = classifier_rows(make_store(tmp_path / "s.zarr", ckpt), [1])
    assert rows_b is None
    np.testing.assert_array_equal(rows_w, weights[0].numpy()[[1]])


def test_a_class_missing_gives_none(tmp_path, weights):
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", ["b", "c", "a"], weights[0])
    store = make_store(tmp_path / "s.zarr", ckpt)
    assert classifier_rows(store, [0, 3]) is None   # "d" was not trained on


def test_a_changed_or_missing_checkpoint_gives_none(tmp_path, weights):
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", ["a", "b", "c"], weights[0])
    store = make_store(tmp_path / "s.zarr", ckpt)
    ckpt.write_bytes(ckpt.read_bytes() + b"x")   # changed since extraction: never trusted
    assert checkpoint_classifier(store) is None and classifier_rows(store, [0]) is None
    ckpt.unlink()
    assert classifier_rows(store, [0]) is None


def test_a_checkpoint_without_classifier_gives_none(tmp_path):
    ckpt = tmp_path / "plain.pt"
    torch.save(nn.Linear(DIM, 2).state_dict(), ckpt)
    assert classifier_rows(make_store(tmp_path / "s.zarr", ckpt), [0]) is None


def test_a_relative_path_is_looked_for_beside_the_store(tmp_path, weights, monkeypatch):
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", ["a", "b", "c"], weights[0])
    store = make_store(tmp_path / "s.zarr", ckpt, recorded="ckpt.pt")
    monkeypatch.chdir(tmp_path.parent)
    np.testing.assert_array_equal(classifier_rows(store, [2])[0], weights[0].numpy()[[2]])


def test_read_checkpoint_one_line_errors(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", ["a"], torch.zeros(1, DIM))
    assert read_checkpoint(ckpt)["classes"] == ["a"]
    cases = {"missing": tmp_path / "nothing.pt", "folder": tmp_path}
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint at all")
    cases["junk"] = junk
    module = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), module)   # a pickled module: refused by weights_only
    cases["module"] = module
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), tensor)
    cases["tensor"] = tensor
    needles = {"missing": "not found", "folder": "is a folder", "junk": "not a torch checkpoint",
               "module": "state dict", "tensor": "not a dict"}
    for case, path in cases.items():
        with pytest.raises(CheckpointError, match=needles[case]) as info:
            read_checkpoint(path)
        assert isinstance(info.value, UserError) and "\n" not in str(info.value) and str(path) in str(info.value)
    assert isinstance(load_weights_only(tensor), torch.Tensor)

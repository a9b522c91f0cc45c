"""Representation training (stage 1 of the low-shot pipeline, stage P1 of FSOR) and fine-tuning.

``train(TrainConfig(...))`` trains a registered backbone plus a linear classifier over a set of *base* classes of a
data source, evaluates top-1 / top-5 on a held-out part of every base class after each epoch, and writes into
``out/``: ``epoch_XXX.pt`` every ``checkpoint_every`` epochs and at the end, ``last.pt`` (the newest of them),
``metrics.json`` and ``curve.png``. Checkpoints are :func:`extract.backbones.save_checkpoint` files, so
``extract --checkpoint out/last.pt`` extracts features with the trained trunk; they also hold the classifier
(``classifier``: ``{"weight": [C, d], "bias"?}``), the base class names in classifier order (``classes``), the
config, the data manifest hash and the base/novel class split (``provenance``), and under ``train_state`` the
optimizer and RNG states that ``resume`` needs.

Recipe (Hariharan & Girshick, ICCV 2017, and its original code): loss = mean CE + lambda * aux (SGM / batch SGM / L2,
:mod:`extract.losses`; the default is the baseline, lambda = 0), SGD momentum 0.9, weight decay on every parameter, lr x
gamma every ``step_epochs`` (or cosine), optional constant warm-up lr. FSOR pretraining (TANE, Huang et al. CVPR 2022;
DNPG, Zhang et al. ACM MM 2024): ``rotation="invariant"`` expands every batch to its four 90-degree rotations with the
class label (TANE), ``rotation="aux"`` adds a 4-way rotation head with weight 0.7 (DNPG).
After every epoch the BatchNorm statistics are recomputed under the epoch's final weights (``bn_stats="precise"``;
Wu & Johnson 2021): the running averages of a short run at lr 0.1 lag the weights so far that the evaluation mode
can fall far below the training accuracy (5 classes of 28-px digits, 3 epochs: 48% validation top-1 with the running
averages, 96% with the recomputed statistics).

Speed on small CPUs: the base-class images are decoded once into a uint8 tensor ``[N, C, R, R]`` when they fit
(``memory_limit_gb``), and every augmentation runs batched on tensors (pad + random shift, random resized crop
through ``roi_align``, colour jitter, flip); larger data sets stream through DataLoader workers into the same
batched augmentation. Omniglot's 964 x 16 training images at 28 px are 12 MB.

Determinism: the model init is a function of ``seed``; the shuffle of epoch e, the augmentation of step s and
the global torch RNG at the start of every epoch are functions of (seed, epoch[, step], rank). A run resumed from
a checkpoint (taken at an epoch boundary) therefore ends bit-identical to an uninterrupted run on the same
machine with the same thread count (on the CPU; CUDA kernels with atomic adds can differ in the last bits).

Distributed: under ``torchrun`` every rank takes a DistributedSampler-style share of the epoch's permutation
(padded by wrapping to a multiple of the world size, rank r takes every world-th element) in batches of
``ceil(batch_size / world)``, so the global batch stays about ``batch_size``; gradients are averaged by DDP (gloo
on CPU, nccl on CUDA); batch SGM is computed per rank. Rank 0 writes every file. A plain process runs unchanged.

Fine-tuning (the joint backbone + head stage of TANE and DNPG): :func:`set_trainable_stages`, :func:`param_groups`,
:func:`set_bn_mode`, :func:`finetune` and :func:`write_finetuned` train a backbone together with any head module and
save the result as a new checkpoint, from which ``extract.run`` builds a new store (the store's fingerprint holds the
checkpoint's sha256, so features of the old trunk are never reused).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import click
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extract import backbones as bb
from extract import datasets as ds
from extract.losses import AUX_KINDS, AuxLoss, rotate_batch
from extract.run import _barrier, dist_info, wants_small_input
from featstore.atomic import write_json_atomic, write_with
from featstore.checkpoint import load_weights_only
from featstore.errors import CheckpointError, UserError
from featstore.rules import select_mask
from featstore.runtime import check_threads, progress_bar, resolve_device, thread_limits

__all__ = [
    "TrainConfig",
    "train",
    "resolve_base_classes",
    "holdout",
    "resolve_augment",
    "BatchAugment",
    "FramedImages",
    "load_training_data",
    "lr_at",
    "set_trainable_stages",
    "param_groups",
    "set_bn_mode",
    "finetune",
    "write_finetuned",
    "train_command",
]

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("step", "cosine")
ROTATIONS = ("none", "invariant", "aux")
AUGMENTS = ("auto", "none", "shift", "shift-flip", "lowshot")
BN_STATS = ("precise", "ema")
# Training images the precise BatchNorm statistics are computed from (pycls takes 8,192 for ImageNet; on 28-px
# digits 256 to 8,192 give the same validation top-1, and the forward pass costs time on small CPUs).
PRECISE_BN_IMAGES = 1024
# Handwriting and drawn characters: a mirrored character is another character, so "auto" never flips these.
NO_FLIP_SOURCES = ("omniglot", "digits")
# Config fields that may change between a run and its resumption (they do not change what is computed).
RESUMABLE_CHANGES = ("out", "resume", "quiet", "workers", "device", "threads", "checkpoint_every",
                     "memory_limit_gb", "channels_last")
TRAIN_STATE_KEY = "train_state"


# ----------------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything that decides what a training run computes and where it goes (the CLI maps onto it 1:1).

    Data: ``dataset`` / ``data_root`` / ``split`` open the source (:func:`extract.datasets.open_source`).
    ``base_classes``: None (every class of the source), a range of class indices ``"0-963"`` / ``"0-4,7"``
    (inclusive), a file of class names (one a line, ``#`` comments), or a split name of the source (a class split
    such as imagenet-lowshot's ``base``, or a sample split such as omniglot's ``background``: its classes).
    ``val``: the validation holdout of every base class: a fraction ``"0.1"`` (drawn with ``val_seed``), a meta
    rule ``"drawer>=17"`` (operators ``>= <= > < == !=``), ``"split=test"`` (a sample split of the source), or
    ``"none"`` (no validation). ``image_size``/``small_input`` default as in ``extract`` (the model's input size;
    the small-image stem for sources of 64 px or less: the format's size, or for file sources the size their
    probed files hold, :meth:`extract.datasets.Source.probe`).

    Optimisation (defaults: the low-shot recipe): ``optimizer`` sgd|adam, ``lr``, ``momentum``, ``nesterov``,
    ``weight_decay`` (every parameter), ``schedule`` step|cosine, ``step_epochs`` (one value: a period; several:
    milestones), ``gamma``, ``warmup_epochs`` at the constant ``warmup_lr`` (default lr / 10).
    ``aux`` none|sgm|batchsgm|l2 with ``aux_weight`` (baseline: none / 0), ``detach_p``; ``rotation``
    none|invariant|aux with ``rotation_weight`` (0.7, only for aux). ``augment``: auto (<= 64 px: random shift of
    ``shift`` px (default size/10, 1..4) by replicate padding + crop, plus a flip for natural images; larger:
    random resized crop 8-100% area + colour jitter 0.4 + flip, the low-shot recipe) | none | shift | shift-flip |
    lowshot. ``bias``: classifier bias (the low-shot recipe has none). ``bn_stats``: "precise" (default) replaces
    the BatchNorm running statistics at the end of every epoch by plain averages over the clean views of up to
    :data:`PRECISE_BN_IMAGES` training images under the epoch's final weights (PreciseBN: Wu & Johnson, "Rethinking
    'Batch' in BatchNorm", 2021; pycls); "ema" keeps the running averages (momentum 0.1) training leaves. Only the
    statistics differ: the weights follow the same path either way.

    Run: ``checkpoint_every`` K epochs (and the last), ``steps_per_epoch`` (cap, for quick runs), ``seed``,
    ``device``, ``workers`` (decode processes), ``threads`` (torch threads), ``channels_last``,
    ``memory_limit_gb`` (decode into memory below this size, else stream), ``quiet``, ``resume``.
    """

    model: str
    out: str
    dataset: str = "digits"
    data_root: str | None = None
    split: str | None = None
    base_classes: str | None = None
    val: str = "0.1"
    val_seed: int = 0
    image_size: int | None = None
    small_input: bool | None = None
    model_options: dict = field(default_factory=dict)
    epochs: int = 90
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "step"
    step_epochs: list = field(default_factory=lambda: [30])
    gamma: float = 0.1
    warmup_epochs: int = 0
    warmup_lr: float | None = None
    aux: str = "none"
    aux_weight: float = 0.0
    detach_p: bool = False
    rotation: str = "none"
    rotation_weight: float = 0.7
    augment: str = "auto"
    shift: int | None = None
    bn_stats: str = "precise"
    bias: bool = False
    checkpoint_every: int = 10
    steps_per_epoch: int | None = None
    seed: int = 0
    device: str = "cpu"
    workers: int = 0
    threads: int | None = None
    channels_last: bool = False
    memory_limit_gb: float = 8.0
    quiet: bool = False
    resume: bool = False


def _validate(cfg: TrainConfig) -> None:
    def positive(name: str, value: Any) -> None:
        if value is None or value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, not {value}")

    if cfg.model not in bb.list_backbones():
        raise UserError(f"unknown model {cfg.model!r}; choose one of: {', '.join(bb.list_backbones())}")
    for name in ("epochs", "batch_size", "checkpoint_every", "lr"):
        positive(name, getattr(cfg, name))
    if cfg.steps_per_epoch is not None:
        positive("steps_per_epoch", cfg.steps_per_epoch)
    if cfg.image_size is not None:
        positive("image_size", cfg.image_size)
    if cfg.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {cfg.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {cfg.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if cfg.rotation not in ROTATIONS:
        raise UserError(f"unknown rotation mode {cfg.rotation!r}; choose one of: {', '.join(ROTATIONS)}")
    if cfg.bn_stats not in BN_STATS:
        raise UserError(f"unknown bn_stats {cfg.bn_stats!r}; choose one of: {', '.join(BN_STATS)}")
    if cfg.augment not in AUGMENTS:
        raise UserError(f"unknown augmentation {cfg.augment!r}; choose one of: {', '.join(AUGMENTS)}")
    if cfg.aux not in AUX_KINDS:
        raise UserError(f"unknown auxiliary loss {cfg.aux!r}; choose one of: {', '.join(AUX_KINDS)}")
    AuxLoss(cfg.aux, cfg.aux_weight, rotation_weight=cfg.rotation_weight)  # checks the weights
    steps = list(cfg.step_epochs or [])
    if cfg.schedule == "step" and (not steps or any(int(s) <= 0 for s in steps)):
        raise UserError(f"--step-epochs must be one period or a list of positive epochs, not {cfg.step_epochs}")
    if len(steps) > 1 and sorted(steps) != steps:
        raise UserError(f"--step-epochs milestones must increase, not {cfg.step_epochs}")
    if not 0 <= cfg.warmup_epochs < cfg.epochs:
        raise UserError(f"--warmup-epochs must be in 0..epochs-1, not {cfg.warmup_epochs}")
    if cfg.warmup_lr is not None and cfg.warmup_lr <= 0:
        raise UserError(f"--warmup-lr must be positive, not {cfg.warmup_lr}")
    if cfg.momentum < 0 or cfg.weight_decay < 0 or cfg.gamma <= 0:
        raise UserError("--momentum and --weight-decay must be >= 0 and --gamma > 0")
    if cfg.nesterov and (cfg.optimizer != "sgd" or cfg.momentum <= 0):
        raise UserError("--nesterov needs --optimizer sgd with a positive --momentum")
    if cfg.shift is not None and cfg.shift < 0:
        raise UserError(f"--shift must be >= 0, not {cfg.shift}")
    if cfg.workers < 0:
        raise UserError(f"--workers must be >= 0, not {cfg.workers}")
    resolve_device(cfg.device)
    check_threads(cfg.threads)


# ----------------------------------------------------------------------------------------------------------------
# classes and the validation holdout
# ----------------------------------------------------------------------------------------------------------------

_RANGE = re.compile(r"^\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*$")


def resolve_base_classes(source: Any, spec: str | None) -> list[int]:
    """Class indices (into ``source.classes``) of the base classes, in classifier order.

    ``spec``: None or "all" (every class, in the source's order), a range ``"0-963"`` / ``"0-4,7"`` (inclusive,
    in the order written), the path of a file of class names (one a line; blank lines and ``#`` comments skipped),
    or a split name of the source (``source.class_splits`` first, then the classes present in
    ``source.splits[name]``). Raises :class:`UserError` for unknown names, out-of-range indices and repeats.
    """
    n = len(source.classes)
    if spec is None or str(spec).strip().lower() in ("", "all"):
        return list(range(n))
    spec = str(spec).strip()
    if _RANGE.match(spec):
        out: list[int] = []
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            a, b = int(lo), int(hi) if hi else int(lo)
            if a > b:
                raise UserError(f"class range {part.strip()!r} runs backwards; write it as {b}-{a}")
            if b >= n:
                raise UserError(f"class index {b} in --base-classes {spec!r} is out of range: {source.name} has "
                                f"{n} classes (0-{n - 1})")
            out.extend(range(a, b + 1))
        _no_repeats(out, source, spec)
        return out
    path = Path(spec).expanduser()
    if path.is_file():
        index = {name: k for k, name in enumerate(source.classes)}
        out = []
        text = path.read_text(encoding="utf-8")
        for line_no, line in enumerate(text.splitlines(), start=1):
            name = line.split("#", 1)[0].strip() if not line.strip().startswith("#") else ""
            if not name:
                continue
            if name not in index:
                raise UserError(f"unknown class {name!r} in {path} (line {line_no}): not a class of {source.name}; "
                                f"fix the name (classes look like {source.classes[0]!r})")
            out.append(index[name])
        if not out:
            raise UserError(f"class list {path} names no class; write one class name per line")
        _no_repeats(out, source, str(path))
        return out
    class_splits = getattr(source, "class_splits", {}) or {}
    if spec in class_splits:
        return [int(c) for c in class_splits[spec]]
    if spec in source.splits:
        return sorted(int(c) for c in np.unique(source.labels[source.splits[spec]]))
    names = sorted(set(class_splits) | set(source.splits))
    raise UserError(f"--base-classes {spec!r} is not a class range (0-9), an existing class-list file or a split of "
                    f"{source.name} (splits: {', '.join(names) if names else 'none'})")


def _no_repeats(indices: list[int], source: Any, where: str) -> None:
    seen: set[int] = set()
    for c in indices:
        if c in seen:
            raise UserError(f"class {source.classes[c]!r} appears twice in --base-classes {where}; list it once")
        seen.add(c)




def holdout(labels: np.ndarray, val: str, *, seed: int = 0, meta: Mapping[str, np.ndarray] | None = None,
            splits: Mapping[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split samples with classifier labels ``labels [n]`` into (train positions, validation positions).

    ``val``: a fraction in (0, 1) of every class, drawn with ``seed`` (round(fraction * n_c), at most n_c - 1);
    a rule on per-sample metadata ``"drawer>=17"`` (``meta[name]`` is an array [n]); ``"split=NAME"`` (positions
    in ``splits[NAME]``); or ``"none"`` (empty validation). Raises :class:`UserError` for a malformed rule, an
    unknown key, an empty validation part (unless "none") or an empty training part.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    text = str(val).strip()
    mask = np.zeros(n, dtype=bool)
    if text.lower() in ("none", "0", "0.0"):
        train_pos = np.arange(n, dtype=np.int64)
        if n == 0:
            raise UserError("the training part is empty; check --base-classes and --split")
        return train_pos, np.zeros(0, dtype=np.int64)
    try:
        fraction: float | None = float(text)
    except ValueError:
        fraction = None
    if fraction is not None:
        if not 0 < fraction < 1:
            raise UserError(f"--val fraction must be in (0, 1), not {text}")
        rng = np.random.default_rng(seed)
        for c in np.unique(labels):
            members = np.nonzero(labels == c)[0]
            k = min(int(round(fraction * len(members))), len(members) - 1)
            if k > 0:
                mask[rng.permutation(members)[:k]] = True
    else:
        if not any(op in text for op in "<>=!"):  # a word such as "sometimes": not a rule at all
            raise UserError(f"--val {text!r} is neither a fraction (0.1), a rule (drawer>=17), split=NAME nor none")
        mask = select_mask(text, n, dict(meta or {}), splits, option="--val", where="the data source")
    if not mask.any():
        raise UserError(f"the validation part (--val {text}) is empty; hold out more (a larger fraction or another "
                        "rule), or pass --val none")
    if mask.all():
        raise UserError(f"the training part is empty: --val {text} holds out every sample; hold out fewer")
    return np.nonzero(~mask)[0].astype(np.int64), np.nonzero(mask)[0].astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# batched augmentation on uint8 tensors
# ----------------------------------------------------------------------------------------------------------------


def resolve_augment(kind: str, size: int, source_name: str, shift: int | None = None) -> dict:
    """The augmentation plan (JSON) for ``kind`` at ``size`` px for data source ``source_name``.

    "auto": ``size <= 64`` -> random shift (replicate padding + crop) of ``shift`` px (default round(size / 10)
    clamped to 1..4: 3 px at 28-32 px), with a horizontal flip unless the source holds characters
    (:data:`NO_FLIP_SOURCES`); larger -> "lowshot" (random resized crop of 8-100% of the area, aspect 3/4-4/3,
    brightness / contrast / saturation jitter 0.4 one after another, flip (again not for characters);
    the low-shot recipe). An explicit "lowshot" always flips.
    """
    flip = True
    if kind == "auto":
        flip = source_name not in NO_FLIP_SOURCES
        if size <= 64:
            kind = "shift-flip" if flip else "shift"
        else:
            kind = "lowshot"
    if kind == "none":
        return {"kind": "none"}
    if kind in ("shift", "shift-flip"):
        px = shift if shift is not None else max(1, min(4, int(round(size / 10))))
        return {"kind": "shift", "shift": int(px), "pad": "replicate", "flip": kind == "shift-flip"}
    if kind == "lowshot":
        return {"kind": "lowshot", "scale": [0.08, 1.0], "ratio": [3 / 4, 4 / 3], "jitter": 0.4, "flip": flip}
    raise UserError(f"unknown augmentation {kind!r}; choose one of: {', '.join(AUGMENTS)}")


class BatchAugment:
    """Turns uint8 image batches ``[b, Cs, R, R]`` into normalised float batches ``[b, C, S, S]`` on their device.

    ``plan`` from :func:`resolve_augment`; ``spec`` the transform spec of the backbone (``size`` S, ``channels`` C,
    ``normalize``); ``stored`` R (>= S: images are kept at the spec's ``resize`` side so that the clean view is the
    extraction transform's centre crop). :meth:`clean` is the validation / extraction view; calling the object with
    a ``torch.Generator`` gives a random view. Every call draws a fixed number of values per image from the
    generator (on the CPU) and nothing from the global RNGs.
    """

    def __init__(self, plan: dict, spec: dict, stored: int, channels_last: bool = False) -> None:
        self.plan, self.spec, self.stored = dict(plan), dict(spec), int(stored)
        self.size, self.channels = int(spec["size"]), int(spec.get("channels", 3))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        norm = spec.get("normalize", "none")
        self.tflite = norm == "tflite"
        if norm in ("none", "tflite"):
            self.mean = self.std = None
        else:
            mean, std = ds.NORMALIZATIONS[norm] if isinstance(norm, str) else (norm["mean"], norm["std"])
            self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
            self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """Float [b, Cs, S, S] in [0, 1] -> channels of the model, normalised, in the memory format."""
        if x.shape[1] != self.channels:
            if x.shape[1] == 1:
                x = x.expand(-1, self.channels, -1, -1)
            else:  # RGB -> luma, as PIL's convert("L")
                w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
                x = (x * w).sum(1, keepdim=True)
        if self.tflite:
            x = (x * 255.0 - 127.0) / 128.0
        elif self.mean is not None:
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x.contiguous(memory_format=self.memory_format)

    def _centre(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.size:
            return x
        off = int(round((x.shape[-1] - self.size) / 2.0))
        return x[..., off:off + self.size, off:off + self.size]

    def clean(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic view (centre crop, no augmentation)."""
        return self._finish(self._centre(x).float() / 255.0)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        kind = self.plan["kind"]
        if kind == "none":
            return self.clean(x)
        if kind == "shift":
            return self._finish(self._shift(self._centre(x).float() / 255.0, generator))
        return self._finish(self._lowshot(x.float() / 255.0, generator))

    def _flip(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if not self.plan.get("flip"):
            return x
        flip = (u < 0.5).to(x.device).view(-1, 1, 1, 1)
        return torch.where(flip, x.flip(-1), x)

    def _shift(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, c, size, _ = x.shape
        u = torch.rand(b, 3, generator=generator, dtype=torch.float64)
        s = int(self.plan["shift"])
        if s > 0:
            oy = (u[:, 0] * (2 * s + 1)).long().clamp_(max=2 * s).to(x.device)
            ox = (u[:, 1] * (2 * s + 1)).long().clamp_(max=2 * s).to(x.device)
            padded = F.pad(x, (s, s, s, s), mode="replicate")
            ar = torch.arange(size, device=x.device)
            rows = (oy[:, None] + ar).view(b, 1, size, 1)
            cols = (ox[:, None] + ar).view(b, 1, 1, size)
            bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
            ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
            x = padded[bi, ci, rows, cols]
        return self._flip(x, u[:, 2])

    def _lowshot(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from torchvision.ops import roi_align

        b, c, side, _ = x.shape
        tries = 10
        u = torch.rand(b, tries, 4, generator=generator, dtype=torch.float64)
        v = torch.rand(b, 4, generator=generator, dtype=torch.float64)
        lo, hi = self.plan["scale"]
        r0, r1 = (math.log(r) for r in self.plan["ratio"])
        area = side * side * (lo + (hi - lo) * u[..., 0])
        ratio = torch.exp(r0 + (r1 - r0) * u[..., 1])
        w = torch.round(torch.sqrt(area * ratio))
        h = torch.round(torch.sqrt(area / ratio))
        ok = (w > 0) & (w <= side) & (h > 0) & (h <= side)
        first = ok.to(torch.int64).argmax(1)
        pick = lambda t: t.gather(1, first[:, None])[:, 0]  # noqa: E731
        w, h = pick(w), pick(h)
        top = torch.minimum(torch.floor(pick(u[..., 2]) * (side - h + 1)), side - h)
        left = torch.minimum(torch.floor(pick(u[..., 3]) * (side - w + 1)), side - w)
        none_ok = ~ok.any(1)  # torchvision's fallback: the whole (square) image
        w[none_ok], h[none_ok], top[none_ok], left[none_ok] = side, side, 0, 0
        boxes = torch.stack([torch.arange(b, dtype=torch.float64), left, top, left + w, top + h], 1)
        out = roi_align(x, boxes.to(device=x.device, dtype=x.dtype), output_size=self.size, spatial_scale=1.0,
                        sampling_ratio=-1, aligned=True)
        j = float(self.plan.get("jitter", 0.0))
        if j > 0:
            factors = (1.0 + j * (2.0 * v[:, :3] - 1.0)).to(device=x.device, dtype=x.dtype)
            out = (out * factors[:, 0].view(-1, 1, 1, 1)).clamp_(0, 1)
            mean = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
            f = factors[:, 1].view(-1, 1, 1, 1)
            out = (f * out + (1 - f) * mean).clamp_(0, 1)
            if c == 3:
                f = factors[:, 2].view(-1, 1, 1, 1)
                out = (f * out + (1 - f) * _gray(out)).clamp_(0, 1)
        return self._flip(out, v[:, 3])


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor([0.2989, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------


class FramedImages(torch.utils.data.Dataset):
    """Position k -> ``(image, error)``: the framed uint8 image ``[Cs, R, R]`` of source sample ``indices[k]`` and
    "", or :attr:`blank_like` and the one-line error of a file that cannot be read (raised by the caller, so that a
    worker process never dies with a traceback).

    ``frame_spec``: what is decoded (``size``, ``resize``, ``channels``, ``normalize`` "none", ``interpolation``);
    ``blank_like`` is a zero image of the shape and dtype every item has."""

    def __init__(self, source: ds.Source, indices: np.ndarray, frame_spec: dict) -> None:
        self.source, self.indices = source, np.asarray(indices, dtype=np.int64)
        self.transform = ds.build_transform(frame_spec)
        c, r = frame_spec["channels"], frame_spec["size"]
        self.blank_like = torch.zeros(c, r, r, dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        try:
            x = self.transform(self.source.load(int(self.indices[k])))
            return (x * 255.0).round_().to(torch.uint8), ""
        except UserError as exc:
            return self.blank_like, str(exc)


def _loader(frames: FramedImages, batches: list[list[int]], workers: int):
    # its own generator: creating the loader must not draw from the global RNG (the training stream's)
    return torch.utils.data.DataLoader(frames, batch_sampler=batches, num_workers=workers,
                                       persistent_workers=False, prefetch_factor=4 if workers else None,
                                       generator=torch.Generator().manual_seed(0))


def _checked_one(item) -> torch.Tensor:
    x, error = item
    if error:
        raise UserError(error)
    return x


def _checked(batch):
    x, errors = batch
    bad = [e for e in errors if e]
    if bad:
        raise UserError(bad[0])
    return x


@dataclass
class _Data:
    source: Any
    base: list[int]                  # source class index of each classifier row
    sample_index: np.ndarray         # source sample index of each base sample (position)
    labels: torch.Tensor             # classifier label of each position
    train_pos: np.ndarray
    val_pos: np.ndarray
    spec: dict                       # the backbone's transform spec (what extraction will use)
    frame_spec: dict                 # what is decoded: [Cs, R, R] uint8
    images: torch.Tensor | None      # [N, Cs, R, R] uint8 in memory, or None (streamed)
    workers: int

    def load_batches(self, batches: list[list[int]]) -> Iterable[torch.Tensor]:
        """Decode the given batches of positions (worker processes when ``workers`` > 0), in order."""
        frames = FramedImages(self.source, self.sample_index, self.frame_spec)
        if self.workers == 0:
            return (torch.stack([_checked_one(frames[k]) for k in b]) for b in batches)
        return (_checked(b) for b in _loader(frames, batches, self.workers))

    def iterate(self, batches: list[list[int]]) -> Iterable[torch.Tensor]:
        """uint8 batches for lists of positions, in order."""
        if self.images is not None:
            return (self.images.index_select(0, torch.as_tensor(b, device=self.images.device)) for b in batches)
        return self.load_batches(batches)


def load_training_data(cfg: TrainConfig, progress: bool = False) -> "_Data":
    """The base-class images of ``cfg`` decoded into memory with its training / validation split, exactly as
    :func:`train` sees them (for baselines on the same split): ``.images`` uint8 ``[n, C, S, S]``, ``.labels``
    ``[n]`` in 0..len(base)-1, ``.train_pos`` / ``.val_pos`` positions into them, ``.base`` source class indices."""
    _validate(cfg)
    source = ds.open_source(cfg.dataset, root=cfg.data_root, split=cfg.split)
    small_input = cfg.small_input
    if small_input is None:
        small_input = wants_small_input(cfg.model, cfg.image_size or source.native_size)
    backbone = bb.create_backbone(cfg.model, small_input=small_input, **cfg.model_options)
    spec = ds.transform_spec(backbone.input_spec, source, size=cfg.image_size)
    data = _prepare_data(cfg, source, spec, progress, torch.device("cpu"))
    if data.images is None:
        raise UserError(f"the base-class images take more than --memory-limit-gb {cfg.memory_limit_gb}; raise it")
    return data


def _prepare_data(cfg: TrainConfig, source: Any, spec: dict, progress: bool, device: torch.device) -> _Data:
    """Base classes, the holdout and the decoded images (in memory when they fit) for transform ``spec``."""
    base = resolve_base_classes(source, cfg.base_classes)
    row_of = np.full(len(source.classes), -1, dtype=np.int64)
    row_of[np.asarray(base, dtype=np.int64)] = np.arange(len(base))
    sample_index = np.nonzero(row_of[source.labels] >= 0)[0].astype(np.int64)
    if len(sample_index) == 0:
        raise UserError(f"no samples of the base classes in {source.name} (split {cfg.split}); check --base-classes")
    labels = row_of[source.labels[sample_index]]
    missing = sorted(set(range(len(base))) - set(np.unique(labels).tolist()))
    if missing:
        raise UserError(f"base class {source.classes[base[missing[0]]]!r} has no samples in {source.name} "
                        f"(split {cfg.split}); drop it from --base-classes")
    pos_of = np.full(len(source), -1, dtype=np.int64)
    pos_of[sample_index] = np.arange(len(sample_index))
    meta = {k: np.asarray(v)[sample_index] for k, v in source.meta.items()}
    splits = {k: pos_of[v][pos_of[v] >= 0] for k, v in source.splits.items()}
    train_pos, val_pos = holdout(labels, cfg.val, seed=cfg.val_seed, meta=meta, splits=splits)
    short = sorted(set(range(len(base))) - set(np.unique(labels[train_pos]).tolist()))
    if short:
        raise UserError(f"base class {source.classes[base[short[0]]]!r} has no training samples left after the "
                        f"validation holdout --val {cfg.val}; hold out less")

    stored = spec["resize"] or spec["size"]
    store_channels = 1 if (source.grayscale or spec["channels"] == 1) else 3
    frame_spec = {"size": stored, "resize": stored if spec["resize"] else None, "channels": store_channels,
                  "normalize": "none", "interpolation": spec["interpolation"]}
    data = _Data(source, base, sample_index, torch.as_tensor(labels), train_pos, val_pos, spec, frame_spec,
                 None, cfg.workers)
    n_bytes = len(sample_index) * store_channels * stored * stored
    if n_bytes <= cfg.memory_limit_gb * 2**30:
        images = torch.empty(len(sample_index), store_channels, stored, stored, dtype=torch.uint8)
        chunk = 512
        batches = [list(range(s, min(len(sample_index), s + chunk))) for s in range(0, len(sample_index), chunk)]
        with progress_bar(len(sample_index), "decode", quiet=not progress, unit="img", leave=True) as bar:
            for b, x in zip(batches, data.load_batches(batches)):
                images[b[0]:b[-1] + 1] = x
                bar.update(len(b))
        if device.type == "cuda" and n_bytes <= 2 * 2**30:
            images = images.to(device)
        data.images = images
    return data


# ----------------------------------------------------------------------------------------------------------------
# model, schedule, RNG
# ----------------------------------------------------------------------------------------------------------------


class _Net(nn.Module):
    """Backbone + linear classifier (+ 4-way rotation head): images -> (features, logits[, rotation logits])."""

    def __init__(self, backbone: bb.Backbone, num_classes: int, bias: bool, rotation_head: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.feature_dim, num_classes, bias=bias)
        self.rotation = nn.Linear(backbone.feature_dim, 4) if rotation_head else None

    def forward(self, x: torch.Tensor):
        features = self.backbone(x)
        logits = self.classifier(features)
        if self.rotation is None:
            return features, logits
        return features, logits, self.rotation(features)


def lr_at(cfg: TrainConfig, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """The learning rate at ``step`` of ``epoch`` (0-based): warm-up, then step decay or per-step cosine to 0.

    Step schedule: ``lr * gamma ** k`` with k the number of milestones <= epoch (one ``step_epochs`` value is a
    period: milestones at every multiple). Milestones count from epoch 0, as in the original low-shot trainer
    (warm-up epochs only override the rate). Cosine: from ``lr`` at the end of warm-up to 0 at the end of the last
    epoch.
    """
    if epoch < cfg.warmup_epochs:
        return float(cfg.warmup_lr if cfg.warmup_lr is not None else cfg.lr / 10)
    if cfg.schedule == "cosine":
        span = max(1, cfg.epochs - cfg.warmup_epochs)
        t = (epoch - cfg.warmup_epochs + step / max(1, steps_per_epoch)) / span
        return float(cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t))))
    steps = [int(s) for s in cfg.step_epochs]
    k = epoch // steps[0] if len(steps) == 1 else sum(1 for m in steps if epoch >= m)
    return float(cfg.lr * cfg.gamma ** k)


def _derive(seed: int, *parts: Any) -> int:
    digest = hashlib.blake2b(":".join(map(str, (seed, *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of epoch ``epoch``: a function of (seed, epoch) only."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_derive(seed, "perm", epoch)))


def rank_batches(perm: torch.Tensor, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of an epoch: DistributedSampler's share (padded by wrapping, every world-th element)
    in batches of ceil(batch_size / world); the plain process gets ``perm`` in batches of ``batch_size``."""
    order = perm.tolist()
    if world > 1:
        total = -(-len(order) // world) * world
        order = (order * (total // max(1, len(order)) + 1))[:total]
        order = order[rank::world]
        batch_size = -(-batch_size // world)
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:  # BatchNorm cannot train on one image: merge it
        single = batches.pop()
        batches[-1] = batches[-1] + single
    return batches


def _rng_state() -> dict:
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: Mapping) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state(("MT19937", s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))
    if "python" in state:
        s = state["python"]
        random.setstate((s["version"], tuple(int(v) for v in s["state"].tolist()), s["gauss_next"]))
    if state.get("cuda") and torch.cuda.is_available():
        for index, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, index)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _counters(module: nn.Module) -> dict:
    """Forward counters that live outside the state dict (ResNet-12's DropBlock ramp)."""
    return {name: int(m.training_forwards) for name, m in module.named_modules() if hasattr(m, "training_forwards")}


def _set_counters(module: nn.Module, counters: Mapping) -> None:
    for name, m in module.named_modules():
        if name in counters and hasattr(m, "training_forwards"):
            m.training_forwards = int(counters[name])


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _plain(value: Any) -> Any:
    """JSON round trip: numpy scalars and paths become plain numbers and strings."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


# ----------------------------------------------------------------------------------------------------------------
# distributed
# ----------------------------------------------------------------------------------------------------------------


def _init_dist(device: str) -> tuple[bool, bool]:
    """(distributed, initialised here)."""
    _, world = dist_info()
    if world <= 1:
        return False, False
    import torch.distributed as dist

    if dist.is_initialized():
        return True, False
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return True, True


def _all_sum(values: list[float], distributed: bool, device: torch.device) -> list[float]:
    if not distributed:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------------------------------------------
# checkpoints and reports
# ----------------------------------------------------------------------------------------------------------------


def _checkpoint_epoch(path: Path) -> int:
    m = re.match(r"^epoch_(\d+)\.pt$", path.name)
    return int(m.group(1)) if m else -1


def find_resume_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest checkpoint of a run folder: ``last.pt``, or the newest ``epoch_XXX.pt`` when it was written
    after ``last.pt`` (a kill between writing an epoch file and copying it to ``last.pt``)."""
    out = Path(out)
    epochs = sorted(out.glob("epoch_*.pt"), key=_checkpoint_epoch)
    last = out / "last.pt"
    if not last.is_file():
        return epochs[-1] if epochs else None
    if epochs and epochs[-1].stat().st_mtime_ns > last.stat().st_mtime_ns:
        return epochs[-1]
    return last


def _copy_atomic(src: Path, dst: Path) -> None:
    write_with(dst, lambda tmp: shutil.copyfile(src, tmp))


def plot_curve(history: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """``curve.png``: train loss (left axis) and validation top-1 (right axis) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    if any(h.get("val_top1") is not None for h in history):
        ax2 = ax.twinx()
        ax2.plot(epochs, [h.get("val_top1") for h in history], "s-", color="tab:red", label="val top-1")
        ax2.set_ylabel("validation top-1 (%)", color="tab:red")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        write_with(path, fig.savefig, suffix=".png")
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) the run of ``cfg``; returns the metrics also written to ``out/metrics.json``.

    Everything about the request is checked before ``out`` is touched. A folder that already holds checkpoints
    is continued only with ``resume`` (and only with the same config, apart from :data:`RESUMABLE_CHANGES`); with
    ``resume`` and no checkpoint the run starts fresh. The caller's global RNG state is left as it was.
    """
    _validate(cfg)
    with thread_limits(cfg.threads):
        return _train_in_process(cfg)


def _train_in_process(cfg: TrainConfig) -> dict:
    device = resolve_device(cfg.device)
    distributed, owns_group = _init_dist(cfg.device)
    rank, world = dist_info()
    if cfg.device == "cuda" and distributed:   # one GPU per torchrun process
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            state = np.random.get_state(), random.getstate()
            try:
                return _train(cfg, device, rank, world, distributed)
            finally:
                np.random.set_state(state[0])
                random.setstate(state[1])
    finally:
        if owns_group:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.barrier()
            dist.destroy_process_group()


def _train(cfg: TrainConfig, device: torch.device, rank: int, world: int, distributed: bool) -> dict:
    started = time.perf_counter()
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the run")
    resume_from = find_resume_checkpoint(out) if out.is_dir() else None
    if resume_from is not None and not cfg.resume:
        raise UserError(f"{out} already holds checkpoints ({resume_from.name}); pass --resume to continue that run "
                        "or choose a new --out")
    show = not cfg.quiet and rank == 0 and sys.stderr.isatty()

    # model (its init is a function of the seed)
    source = ds.open_source(cfg.dataset, root=cfg.data_root, split=cfg.split)
    note = ds.probe_note(source)
    if note and not cfg.quiet and rank == 0 and cfg.image_size is None:
        click.echo(note, err=True)
    small_input = cfg.small_input
    if small_input is None:
        small_input = wants_small_input(cfg.model, cfg.image_size or source.native_size)
    _seed_everything(cfg.seed)
    backbone = bb.create_backbone(cfg.model, small_input=small_input, **cfg.model_options)
    spec = ds.transform_spec(backbone.input_spec, source, size=cfg.image_size)
    _check_input_size(backbone, spec)
    data = _prepare_data(cfg, source, spec, show, device)
    plan = resolve_augment(cfg.augment, spec["size"], data.source.name, cfg.shift)
    stored = data.frame_spec["size"]
    augment = BatchAugment(plan, spec, stored, channels_last=cfg.channels_last)
    base_names = [data.source.classes[c] for c in data.base]
    torch.manual_seed(_derive(cfg.seed, "head"))
    net = _Net(backbone, len(data.base), cfg.bias, cfg.rotation == "aux")
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    net = net.to(device=device, memory_format=memory_format)
    params = list(net.parameters())
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                                           nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = AuxLoss(cfg.aux, cfg.aux_weight, detach_p=cfg.detach_p,
                      rotation_weight=cfg.rotation_weight if cfg.rotation == "aux" else 0.0)

    config_record = _plain({k: v for k, v in asdict(cfg).items()})
    config_record["small_input"] = small_input
    history: list[dict] = []
    start_epoch = 0
    if resume_from is not None:
        start_epoch, history = _load_resume(resume_from, cfg, config_record, net, optimizer, base_names, device)
    else:
        _set_counters(net, {})

    manifest = data.source.manifest_hash()
    selection = hashlib.sha256(np.ascontiguousarray(data.sample_index[data.train_pos]).tobytes() + b"|" +
                               np.ascontiguousarray(data.sample_index[data.val_pos]).tobytes()).hexdigest()
    base_set = set(data.base)
    novel = [c for c in range(len(data.source.classes)) if c not in base_set]
    provenance_base = {
        "trainer": "extract.train",
        "config": config_record,
        "manifest_hash": manifest,
        "data": _plain({"source": data.source.describe(), "manifest_hash": manifest, "selection_sha256": selection,
                        "n_train": len(data.train_pos), "n_val": len(data.val_pos), "val": cfg.val,
                        "in_memory": data.images is not None}),
        "class_split": {"base": [int(c) for c in data.base], "novel": novel,
                        "novel_names": [data.source.classes[c] for c in novel]},
        "transform": spec,
        "augment": plan,
        "extract_hint": f"extract --model {cfg.model} --checkpoint CKPT --dataset {cfg.dataset} "
                        f"--image-size {spec['size']}",
        "versions": {"torch": str(torch.__version__), "python": sys.version.split()[0]},
        "world_size": world,
    }

    ddp = net
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    _barrier(distributed)
    provenance_base["setup_seconds"] = time.perf_counter() - started  # open, decode, build (this invocation)

    metrics = _metrics(cfg, history, provenance_base, world, device, out)
    for epoch in range(start_epoch, cfg.epochs):
        tic = time.perf_counter()
        torch.manual_seed(_derive(cfg.seed, "torch", epoch, rank))
        perm = epoch_permutation(len(data.train_pos), cfg.seed, epoch)
        batches = rank_batches(torch.as_tensor(data.train_pos)[perm], cfg.batch_size, rank, world)
        if cfg.steps_per_epoch:
            batches = batches[:cfg.steps_per_epoch]
        sums = _train_epoch(cfg, ddp, net, optimizer, loss_fn, data, augment, batches, epoch, rank, device,
                            memory_format, show)
        sums = _all_sum(sums, distributed, device)
        last = epoch + 1 == cfg.epochs
        saving = last or (epoch + 1) % cfg.checkpoint_every == 0
        # only evaluation and checkpoints read the statistics (training batches use their own), so they are
        # recomputed only for those: the weights follow the same path either way
        if cfg.bn_stats == "precise" and (saving or len(data.val_pos)):
            precise_bn_stats(net.backbone, data, augment, device, cfg.batch_size)
        if distributed:  # DDP broadcasts buffers before each forward; make the BN statistics equal for evaluation
            import torch.distributed as dist

            for buffer in net.buffers():
                dist.broadcast(buffer, 0)
        top1, top5 = _evaluate(net, data, augment, rank, world, device, distributed, cfg.batch_size)
        seconds = time.perf_counter() - tic
        n = max(1.0, sums[4])
        record = {"epoch": epoch + 1, "train_loss": sums[0] / n, "train_ce": sums[1] / n, "train_aux": sums[2] / n,
                  "train_rot": sums[3] / n, "train_top1": 100.0 * sums[5] / n, "val_top1": top1, "val_top5": top5,
                  "lr": lr_at(cfg, epoch, 0, max(1, len(batches))), "seconds": seconds, "world_size": world}
        history.append(_plain(record))
        metrics = _metrics(cfg, history, provenance_base, world, device, out)
        if rank == 0:
            if saving:
                _save(out, epoch + 1, cfg, net, optimizer, base_names, provenance_base, history, metrics)
                metrics["checkpoint_sha256"] = bb.sha256_file(out / "last.pt")
            write_json_atomic(out / "metrics.json", metrics)
            plot_curve(history, out / "curve.png", f"{cfg.model} on {cfg.dataset}: {len(data.base)} classes")
        if show:
            from tqdm import tqdm

            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f}, "
                       f"val top-1 {_fmt(top1)}, top-5 {_fmt(top5)}, {seconds:.1f} s", file=sys.stderr)
        _barrier(distributed)
    if rank == 0 and (out / "last.pt").is_file():
        metrics["checkpoint_sha256"] = bb.sha256_file(out / "last.pt")
        write_json_atomic(out / "metrics.json", metrics)
    return metrics


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def _check_input_size(backbone: bb.Backbone, spec: dict) -> None:
    size, channels = spec["size"], spec.get("channels", 3)
    was = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            backbone(torch.zeros(1, channels, size, size))
    except RuntimeError as exc:
        raise UserError(f"{size}-px images are too small for {backbone.name} "
                        f"({str(exc).splitlines()[0][:80]}); pass a larger --image-size") from None
    finally:
        backbone.train(was)


def _train_epoch(cfg, ddp, net, optimizer, loss_fn, data, augment, batches, epoch, rank, device, memory_format,
                 show) -> list[float]:
    ddp.train()
    sums = torch.zeros(6, dtype=torch.float64)
    steps = len(batches)
    bar = progress_bar(steps, f"epoch {epoch + 1}/{cfg.epochs}", quiet=not show, unit="step")
    try:
        for step, (positions, x_u8) in enumerate(zip(batches, data.iterate(batches))):
            gen = torch.Generator().manual_seed(_derive(cfg.seed, "aug", epoch, step, rank))
            x = augment(x_u8.to(device, non_blocking=True), gen)
            y = data.labels[torch.as_tensor(positions)].to(device)
            rot_y = None
            if cfg.rotation != "none":
                x, rot_y = rotate_batch(x)
                x = x.contiguous(memory_format=memory_format)
                y = y.repeat(4)
            lr = lr_at(cfg, epoch, step, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            outputs = ddp(x)
            parts = loss_fn(outputs[0], outputs[1], y, outputs[2] if len(outputs) > 2 else None,
                            rot_y if cfg.rotation == "aux" else None)
            loss = parts["loss"]
            if not torch.isfinite(loss):
                raise UserError(f"training diverged at epoch {epoch + 1}, step {step + 1} (loss {loss.item()}); "
                                "lower --lr or the auxiliary weight")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            b = float(len(y))
            correct = (outputs[1].detach().argmax(1) == y).sum().item()
            sums += torch.tensor([loss.item() * b, parts["ce"].item() * b, parts["aux"].item() * b,
                                  parts["rot"].item() * b, b, float(correct)], dtype=torch.float64)
            bar.update(1)
            if show:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2g}", refresh=False)
    finally:
        bar.close()
    return sums.tolist()


def precise_bn_stats(model: nn.Module, data: "_Data", augment: "BatchAugment", device: torch.device,
                     batch_size: int, limit: int = PRECISE_BN_IMAGES) -> int:
    """Set every BatchNorm's running mean and variance of ``model`` to the mean and unbiased variance of its input
    over the clean views of ``limit`` training images (all of them when fewer) under the current weights.

    The running averages kept during training (momentum 0.1) mix batches seen under the weights of the last ~10
    steps; early in a run at a high learning rate those differ enough from the final weights that the evaluation
    mode can sit far below the training accuracy (PreciseBN: Wu & Johnson, "Rethinking 'Batch' in BatchNorm",
    2021). The images are a fixed spread of the training positions in a fixed mixed order (seed 0, so batches hold
    many classes, as in training), forwarded in batches of ``batch_size`` with the BatchNorm layers normalising by
    batch statistics as in training; the statistics are accumulated over all of them in float64 (not an average of
    per-batch variances, which would leave out the spread between batches). Draws nothing from the global RNGs;
    every other module stays in evaluation mode, so dropout, DropBlock and their counters are untouched. Returns
    the number of images used.
    """
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
           and m.track_running_stats]
    n = len(data.train_pos)
    if not bns or n == 0:
        return 0
    order = np.random.default_rng(0).permutation(n)[:limit]
    positions = data.train_pos[order]
    sums: dict[int, list] = {id(m): [0.0, 0.0, 0] for m in bns}

    def accumulate(module: nn.Module, inputs: tuple) -> None:
        x = inputs[0].detach().to(torch.float64)
        dims = [d for d in range(x.dim()) if d != 1]
        acc = sums[id(module)]
        acc[0] = acc[0] + x.sum(dims)
        acc[1] = acc[1] + (x * x).sum(dims)
        acc[2] += x.numel() // x.shape[1]

    was = model.training
    model.eval()
    hooks = []
    for m in bns:
        m.train()
        hooks.append(m.register_forward_pre_hook(accumulate))
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    try:
        batches = [positions[s:s + batch_size].tolist() for s in range(0, len(positions), batch_size)]
        with torch.no_grad():
            for x_u8 in data.iterate(batches):
                model(augment.clean(x_u8.to(device)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    with torch.no_grad():
        for m, (mean0, var0, tracked) in zip(bns, saved):
            total, squares, count = sums[id(m)]
            if count < 2:  # nothing seen: keep what training left
                m.running_mean.copy_(mean0)
                m.running_var.copy_(var0)
            else:
                mean = total / count
                var = (squares - count * mean * mean).clamp_(min=0) / (count - 1)
                m.running_mean.copy_(mean.to(m.running_mean.dtype))
                m.running_var.copy_(var.to(m.running_var.dtype))
            m.num_batches_tracked.copy_(tracked)
    return len(positions)


def _evaluate(net, data: _Data, augment: BatchAugment, rank: int, world: int, device: torch.device,
              distributed: bool, batch_size: int) -> tuple[float | None, float | None]:
    """Top-1 / top-5 (%) over all classifier logits on the clean validation images (this rank's share)."""
    if len(data.val_pos) == 0:
        return None, None
    n = len(data.val_pos)
    mine = data.val_pos[n * rank // world: n * (rank + 1) // world]
    size = max(256, batch_size)
    batches = [mine[s:s + size].tolist() for s in range(0, len(mine), size)]
    k = min(5, net.classifier.out_features)
    counts = [0.0, 0.0, 0.0]
    net.eval()
    with torch.no_grad():
        for positions, x_u8 in zip(batches, data.iterate(batches)):
            logits = net(augment.clean(x_u8.to(device)))[1]
            y = data.labels[torch.as_tensor(positions)].to(device)
            top = logits.topk(k, dim=1).indices
            counts[0] += float((top[:, 0] == y).sum())
            counts[1] += float((top == y[:, None]).any(1).sum())
            counts[2] += float(len(y))
    net.train()
    counts = _all_sum(counts, distributed, device)
    return 100.0 * counts[0] / counts[2], 100.0 * counts[1] / counts[2]


def _metrics(cfg, history, provenance, world, device, out) -> dict:
    final = history[-1] if history else {}
    with_val = [h for h in history if h.get("val_top1") is not None]
    best = max(with_val, key=lambda h: h["val_top1"]) if with_val else None
    return _plain({
        "config": provenance["config"],
        "epochs_done": len(history),
        "final": {k: final.get(k) for k in ("epoch", "train_loss", "train_top1", "val_top1", "val_top5")},
        "best": {"epoch": best["epoch"], "val_top1": best["val_top1"]} if best else None,
        "seconds": sum(h["seconds"] for h in history),
        "setup_seconds": provenance.get("setup_seconds"),
        "history": history,
        "data": provenance["data"],
        "num_classes": len(provenance["class_split"]["base"]),
        "transform": provenance["transform"],
        "augment": provenance["augment"],
        "world_size": world,
        "device": str(device),
        "checkpoint": str(Path(out) / "last.pt"),
    })


def _classifier_state(net: _Net) -> dict:
    state = {"weight": net.classifier.weight}
    if net.classifier.bias is not None:
        state["bias"] = net.classifier.bias
    return _to_cpu(state)


def _save(out: Path, epochs_done: int, cfg: TrainConfig, net: _Net, optimizer, base_names, provenance_base,
          history, metrics) -> None:
    provenance = dict(provenance_base)
    provenance["metrics"] = {k: metrics[k] for k in ("final", "best", "seconds", "epochs_done")}
    train_state = {
        "epoch": epochs_done,
        "epochs": cfg.epochs,
        "optimizer": _to_cpu(optimizer.state_dict()),
        "scheduler": {"kind": cfg.schedule, "epoch": epochs_done, "lr_next": lr_at(cfg, min(epochs_done,
                                                                                             cfg.epochs - 1))},
        "rng": _rng_state(),
        "counters": _counters(net),
        "history": history,
        "rotation_head": _to_cpu(net.rotation.state_dict()) if net.rotation is not None else None,
    }
    path = out / f"epoch_{epochs_done:03d}.pt"
    bb.save_checkpoint(path, net.backbone, classes=base_names, classifier=_classifier_state(net),
                       provenance=provenance, extra={TRAIN_STATE_KEY: train_state})
    _copy_atomic(path, out / "last.pt")


def _load_resume(path: Path, cfg: TrainConfig, config_record: dict, net: _Net, optimizer, base_names,
                 device) -> tuple[int, list[dict]]:
    try:
        raw = load_weights_only(path)
    except CheckpointError as exc:
        raise UserError(f"cannot read {path} to resume ({(exc.reason or str(exc))[:100]}); delete it and resume "
                        "from an older epoch_XXX.pt (rename it to last.pt)") from None
    state = raw.get(TRAIN_STATE_KEY) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or raw.get("format") != bb.CHECKPOINT_FORMAT:
        raise UserError(f"{path} was not written by extract train; choose another --out")
    saved = (raw.get("provenance") or {}).get("config") or {}
    for key, value in config_record.items():
        if key in RESUMABLE_CHANGES:
            continue
        if saved.get(key) != value:
            raise UserError(f"cannot resume {path.parent}: {key} was {saved.get(key)!r}, now {value!r}; use the "
                            "same settings or a new --out")
    if list(raw.get("classes") or []) != base_names:
        raise UserError(f"cannot resume {path.parent}: its base classes differ from the data's; use a new --out")
    net.backbone.load_state_dict(raw["state_dict"], strict=True)
    net.classifier.load_state_dict(raw["classifier"], strict=True)
    if net.rotation is not None:
        net.rotation.load_state_dict(state["rotation_head"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    _set_counters(net, state.get("counters") or {})
    _set_rng_state(state.get("rng") or {})
    history = list(state.get("history") or [])
    return int(state["epoch"]), history


# ----------------------------------------------------------------------------------------------------------------
# fine-tuning (TANE / DNPG)
# ----------------------------------------------------------------------------------------------------------------


def set_trainable_stages(backbone: bb.Backbone, tune_part: int) -> list[str]:
    """Make the last ``tune_part`` stages of ``backbone.stage_names`` trainable and freeze the rest.

    ``tune_part``: 0 = nothing trainable (the frozen variant), 1 = the last stage only, ...,
    ``len(stage_names)`` = everything. For ResNet-12 (4 stages) this is exactly TANE / DNPG's ``tune_part``
    (4 = all, 1 = stage 4); torchvision ResNets have a 5th stage ``stem`` in front, trainable only at 5.
    Parameters outside every stage (none in the registered models) are trainable only when everything is.
    Sets ``requires_grad``; returns the names of the trainable stages.
    """
    names = list(backbone.stage_names)
    if isinstance(tune_part, bool) or not isinstance(tune_part, int) or not 0 <= tune_part <= len(names):
        raise UserError(f"tune_part must be an integer in 0..{len(names)} for {getattr(backbone, 'name', 'it')} "
                        f"(stages: {', '.join(names)}), not {tune_part!r}")
    trainable = names[len(names) - tune_part:] if tune_part else []
    in_stage: set[int] = set()
    for name, module in backbone.stages():
        for p in module.parameters():
            p.requires_grad_(name in trainable)
            in_stage.add(id(p))
    for p in backbone.parameters():
        if id(p) not in in_stage:
            p.requires_grad_(tune_part == len(names))
    return trainable


def param_groups(backbone: nn.Module, head: nn.Module, backbone_lr: float, head_lr: float,
                 weight_decay: float = 5e-4) -> list[dict]:
    """Optimizer groups: ``backbone`` (its parameters with ``requires_grad``, at ``backbone_lr``; left out when
    none or when the lr is 0) and ``head`` (at ``head_lr``), both with ``weight_decay``. Each group carries a
    ``name``; schedules must scale each group from its own base lr (setting the backbone to the head's rate
    would wreck the pretrained trunk)."""
    groups = []
    trunk = [p for p in backbone.parameters() if p.requires_grad]
    if trunk and backbone_lr > 0:
        groups.append({"name": "backbone", "params": trunk, "lr": float(backbone_lr),
                       "weight_decay": float(weight_decay)})
    own = [p for p in head.parameters() if p.requires_grad]
    if own:
        groups.append({"name": "head", "params": own, "lr": float(head_lr), "weight_decay": float(weight_decay)})
    return groups


def set_bn_mode(backbone: nn.Module, train: bool) -> nn.Module:
    """Put every BatchNorm layer of ``backbone`` in train (``True``: batch statistics, running stats updated) or
    eval mode (running statistics fixed); other modules keep their mode. Returns ``backbone``."""
    for m in backbone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(train)
    return backbone


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def _default_loss(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, *extra: Any) -> torch.Tensor:
    return F.cross_entropy(head(features), labels)


def finetune(backbone: bb.Backbone, head: nn.Module,
             batches: Iterable[Sequence[Any]] | Callable[[int], Iterable[Sequence[Any]]],
             loss_fn: Callable[..., torch.Tensor] | None = None, *, tune_part: int, backbone_lr: float,
             head_lr: float, epochs: int = 1, bn_train: bool = True, device: str | torch.device = "cpu",
             weight_decay: float = 5e-4, momentum: float = 0.9, nesterov: bool = True,
             milestones: Sequence[int] = (), gamma: float = 0.1, max_steps: int | None = None,
             on_step: Callable[[int, int, float], None] | None = None) -> bb.Backbone:
    """Train ``backbone`` (its last ``tune_part`` stages) and ``head`` together; returns the backbone (eval mode).

    ``batches``: items ``(images [B, C, H, W], labels [B], *extra)``, already augmented, e.g. from a DataLoader
    or an episode iterator (an episode puts support and query images in one tensor and passes its structure in
    ``extra``); either re-iterable (a list, a DataLoader) or a callable ``epoch -> iterable``. ``loss_fn(head,
    features [B, d], labels, *extra) -> scalar`` (default: cross-entropy of ``head(features)``).

    Semantics of TANE / DNPG (their fine-tuning code): ``backbone_lr == 0`` or ``tune_part == 0`` is the frozen
    variant (the backbone in eval mode, features without gradients: identical to cached features). Otherwise the
    backbone is in train mode (dropout / DropBlock active) and ``bn_train`` decides whether BatchNorm layers of
    *all* stages re-estimate their statistics on the fine-tuning batches (True, as the original) or keep them
    (False).
    Optimiser: SGD (Nesterov) momentum 0.9, weight decay 5e-4, two groups (:func:`param_groups`), each decayed by
    ``gamma`` at ``milestones`` (epochs) from its own base lr. ``on_step(epoch, step, loss)`` is called after every
    step; ``max_steps`` caps the steps per epoch. ``requires_grad`` flags are restored on return.
    """
    device = resolve_device(device, option="device")
    if epochs <= 0:
        raise UserError(f"epochs must be positive, not {epochs}")
    if not callable(batches) and iter(batches) is batches and epochs > 1:
        raise UserError("finetune over several epochs needs re-iterable batches (a list, a DataLoader) or a "
                        "callable epoch -> batches, not a one-shot iterator")
    loss_fn = loss_fn or _default_loss
    flags = [p.requires_grad for p in backbone.parameters()]
    frozen = tune_part == 0 or backbone_lr <= 0
    set_trainable_stages(backbone, 0 if frozen else tune_part)
    backbone.to(device)
    head.to(device)
    groups = param_groups(backbone, head, 0.0 if frozen else backbone_lr, head_lr, weight_decay)
    if not groups:
        raise UserError("nothing to train: the head has no trainable parameters and the backbone is frozen")
    for g in groups:
        g["initial_lr"] = g["lr"]
    optimizer = torch.optim.SGD(groups, lr=head_lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                                weight_decay=weight_decay)
    try:
        for epoch in range(epochs):
            decay = gamma ** sum(1 for m in milestones if epoch >= m)
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * decay
            if frozen:
                backbone.eval()
            else:
                backbone.train()
                set_bn_mode(backbone, bn_train)
            head.train()
            items = batches(epoch) if callable(batches) else batches
            for step, item in enumerate(items):
                if max_steps is not None and step >= max_steps:
                    break
                if not isinstance(item, (tuple, list)) or len(item) < 2:
                    raise UserError("finetune batches must be tuples (images, labels, *extra)")
                images, labels, *extra = _move(list(item), device)
                if frozen:
                    with torch.no_grad():
                        features = backbone(images)
                else:
                    features = backbone(images)
                loss = loss_fn(head, features, labels, *extra)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if on_step is not None:
                    on_step(epoch, step, float(loss.detach()))
    finally:
        for p, flag in zip(backbone.parameters(), flags):
            p.requires_grad_(flag)
    return backbone.eval()


def write_finetuned(backbone: bb.Backbone, out_checkpoint: str | os.PathLike, *, head: nn.Module | None = None,
                    classes: list[str] | None = None, parent: str | os.PathLike | None = None,
                    settings: Mapping[str, Any] | None = None,
                    provenance: Mapping[str, Any] | None = None) -> str:
    """Save a fine-tuned backbone (and its head) as a new checkpoint; returns the file's sha256.

    ``parent``: the checkpoint the fine-tuning started from (its sha256 is recorded); ``settings``: the
    fine-tuning arguments (tune_part, lrs, epochs, bn_train, ...). A head that is an ``nn.Linear`` is stored as
    ``{"weight", "bias"?}``, any other module as its state dict. Re-extract a store from the new file with
    ``extract --checkpoint``: the store's fingerprint holds this sha256, so features of the old trunk are never
    mixed in or reused.
    """
    record: dict[str, Any] = {"trainer": "extract.train.finetune", **dict(provenance or {})}
    if parent is not None:
        record["parent_checkpoint"] = str(parent)
        record["parent_sha256"] = bb.sha256_file(parent)
    if settings is not None:
        record["finetune"] = _plain(dict(settings))
    classifier = None
    if isinstance(head, nn.Linear):
        classifier = {"weight": head.weight}
        if head.bias is not None:
            classifier["bias"] = head.bias
    elif head is not None:
        classifier = dict(head.state_dict())
    path = Path(out_checkpoint)
    bb.save_checkpoint(path, backbone, classes=classes, classifier=_to_cpu(classifier) if classifier else None,
                       provenance=_plain(record))
    return bb.sha256_file(path)


# ----------------------------------------------------------------------------------------------------------------
# command line: `extract train` (registered in extract/cli.py) and `python -m extract.train`
# ----------------------------------------------------------------------------------------------------------------

def _parse_steps(_ctx, _param, value: str | None) -> list[int]:
    if value is None:
        return [30]
    try:
        steps = [int(v) for v in str(value).replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give one period (30) or increasing milestones (30,60)") from None
    if not steps:
        raise click.BadParameter("give one period (30) or increasing milestones (30,60)")
    return steps


def _parse_model_options(_ctx, _param, values: tuple[str, ...]) -> dict:
    options: dict[str, Any] = {}
    for item in values:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: write KEY=VALUE, e.g. drop_rate=0.1")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options


@click.command("train", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", required=True, help="Backbone name (see `extract list`).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (checkpoints, metrics).")
@click.option("--dataset", default="digits", show_default=True, help="Data source (see `extract list`).")
@click.option("--data-root", type=click.Path(), default=None, help="Folder of the data set on disk.")
@click.option("--split", default=None, help="Subset of the source to open (e.g. train, background).")
@click.option("--base-classes", default=None, help="Base classes: a range (0-963), a file of class names, or a split "
              "name of the source (default: all classes).")
@click.option("--val", default="0.1", show_default=True, help="Validation holdout per base class: a fraction, a "
              "meta rule (drawer>=17), split=NAME, or none.")
@click.option("--val-seed", type=int, default=0, show_default=True, help="Seed of a fractional holdout.")
@click.option("--image-size", type=int, default=None, help="Input side in px (default: as extract).")
@click.option("--small-input/--imagenet-stem", default=None, help="Stem for 28-32 px inputs (default: by size).")
@click.option("--model-option", "model_options", multiple=True, callback=_parse_model_options, metavar="KEY=VALUE",
              help="Backbone option, e.g. drop_rate=0.1 (repeatable).")
@click.option("--epochs", type=int, default=90, show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True,
              help="Images per training step (the global batch, split over torchrun ranks).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="sgd", show_default=True)
@click.option("--lr", type=float, default=0.1, show_default=True)
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--nesterov/--no-nesterov", default=False, show_default=True)
@click.option("--weight-decay", "--wd", "weight_decay", type=float, default=1e-4, show_default=True,
              help="L2 weight decay on every parameter (--wd is the same option).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="step", show_default=True)
@click.option("--step-epochs", default="30", show_default=True, callback=_parse_steps,
              help="Step schedule: one period (30) or milestones (30,60).")
@click.option("--gamma", type=float, default=0.1, show_default=True, help="Step decay factor.")
@click.option("--warmup-epochs", type=int, default=0, show_default=True)
@click.option("--warmup-lr", type=float, default=None, help="Constant lr of the warm-up epochs (default lr/10).")
@click.option("--aux", type=click.Choice(AUX_KINDS), default="none", show_default=True,
              help="Auxiliary loss (Hariharan & Girshick 2017); the baseline is none.")
@click.option("--aux-weight", type=float, default=0.0, show_default=True,
              help="lambda (published ResNet-10: sgm 0.02, batchsgm 5, l2 0.03).")
@click.option("--detach-p", is_flag=True, help="Treat softmax p as a constant in SGM / batch SGM.")
@click.option("--rotation", type=click.Choice(ROTATIONS), default="none", show_default=True,
              help="invariant: four rotations with the class label (TANE); aux: plus a rotation head (DNPG).")
@click.option("--rotation-weight", type=float, default=0.7, show_default=True, help="Weight of the rotation head.")
@click.option("--augment", type=click.Choice(AUGMENTS), default="auto", show_default=True)
@click.option("--shift", type=int, default=None, help="Shift augmentation in px (default size/10, 1..4).")
@click.option("--bias/--no-bias", default=False, show_default=True, help="Classifier bias.")
@click.option("--bn-stats", type=click.Choice(BN_STATS), default="precise", show_default=True,
              help="BatchNorm statistics kept after every epoch: precise (recomputed under the epoch's final "
              "weights on clean training images) or ema (the running averages of training).")
@click.option("--checkpoint-every", type=int, default=10, show_default=True, help="Checkpoint every K epochs.")
@click.option("--steps-per-epoch", type=int, default=None, help="Cap on steps per epoch (quick runs).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the model init, the shuffles and the augmentations.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--workers", type=int, default=0, show_default=True, help="Decode worker processes.")
@click.option("--threads", type=int, default=None,
              help="CPU threads for torch, BLAS and FAISS [default: leave the thread pools as they are].")
@click.option("--channels-last/--no-channels-last", default=False, show_default=True)
@click.option("--memory-limit-gb", type=float, default=8.0, show_default=True,
              help="Decode the images into memory when they take less than this; else stream.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
def train_command(**options: Any) -> None:
    """Train a backbone + linear classifier on the base classes of a data set (checkpoints for `extract`)."""
    cfg = TrainConfig(**options)
    metrics = train(cfg)
    if not cfg.quiet and dist_info()[0] == 0:
        final = metrics.get("final") or {}
        click.echo(f"{metrics['checkpoint']}: {metrics['epochs_done']} epochs, {metrics['seconds']:.1f} s; "
                   f"val top-1 {_fmt(final.get('val_top1'))}, top-5 {_fmt(final.get('val_top5'))}")


assert {p.name for p in train_command.params} == {f.name for f in fields(TrainConfig)}, "CLI and TrainConfig differ"


if __name__ == "__main__":
    from featstore.cli_support import run_cli

    run_cli(train_command, "extract train")

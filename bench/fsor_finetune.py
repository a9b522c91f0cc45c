"""``bench fsor-finetune``: the fine-tuned variant of TANE / DNPG, end to end (TANE, Huang et al., CVPR 2022;
DNPG, Zhang et al., ACM MM 2024; original code github.com/shiyuanh/TANE, github.com/iCGY96/DNPG).

The frozen variant (``bench fsor --head tane``) meta-trains the head on cached features. The papers instead train
the head together with the backbone (the original code's ``tunefeat`` > 0), after which every cached feature is
stale.
This command runs that path in one go:

1. **Backbone** from ``checkpoint`` (a featstore checkpoint: model name, ``small_input`` and ``model_options`` come
   from the file; its classifier rows and class names, where present, seed TANE's base memory).
2. **Base rows**: the samples of the training source that satisfy ``train_rule`` (``"drawer<=16"``, ``"class<900"``,
   ``"split=background"``, ``"all"``; several joined by ``&``); the base classes are their classes. ``val_rule``
   selects the validation samples the same way (``"drawer>=17"``: held-out drawings of the base classes; or other
   classes); the two must not share a sample, and the test data never enters the selection. The test classes
   must be novel: a test class that is a base class, a validation class or one the starting checkpoint was
   trained on (matched by name) is refused in one line unless ``--allow-overlap``, which is then recorded in
   ``finetune.json`` and in the notes of the FSOR results.
3. **Head initialisation** on the base rows' clean features through the *frozen* starting backbone, computed once:
   TANE's base memory = the checkpoint's classifier rows of the base classes (class means where the checkpoint has
   no classifier for all of them); DNPG's memory = Phase 2 (GCPL centres, RPL points) on those features.
4. **Joint meta-training** through :func:`extract.train.finetune`: each step takes ``episodes_per_step``
   (ways + open_ways)-way ``shots``-shot ``queries``-query episodes of base-class *images* (episode i is a function
   of (seed, i) only), augments supports and open supports with the ``extract train`` recipe
   (:class:`extract.train.BatchAugment`; queries stay clean, as in the original code), runs support and query
   images through the backbone as one batch and calls ``head.training_step`` (primary + swapped task).
   ``tune_part`` / ``backbone_lr`` / ``bn_train`` keep the original code's semantics (0 or lr 0 = the frozen
   variant).
5. **Epoch selection** on validation episodes (``val_rule`` rows, clean features through the current backbone; the
   episode's own classes are masked out of the base memory as in training), by accuracy + AUROC; the last and the
   val-best figures are both logged (selection never looks at the test split: the original code selects on test
   episodes, which biases the reported numbers).
6. **Checkpoint** ``out/finetuned.pt`` by :func:`extract.train.write_finetuned`: backbone, head state (under
   ``classifier``), base class names, settings and the parent's sha256; :func:`load_finetuned_head` rebuilds the
   head from it.
7. **Re-extraction** of the test data (``test_split`` of the test source) into ``out/store.zarr`` with
   :func:`extract.run.run_extraction` from the new checkpoint (its fingerprint holds the new sha256).
8. **FSOR benchmark** (:func:`bench.fsor.run_fsor`) on the new store with the head *loaded from the checkpoint*,
   not meta-trained again (``ready_heads``), beside optional baseline heads; results in ``out/results.json``,
   ``results.md``, ``roc.png``; the fine-tuning record in ``out/finetune.json``.

Randomness: the backbone and head initialisation, Phase 2, the episodes, the augmentation of every step, dropout /
DropBlock of every epoch, the validation episodes, the extraction views and the test episodes are functions of
``seed``; the caller's global RNG state is left as it was.

Notes. With ``bn_train`` (the original) the BatchNorm statistics of *every* stage follow the episode batches, so
only the parameters of the first ``n - tune_part`` stages stay bit-identical; ``--bn-eval`` keeps the statistics
too. DNPG's Phase 2 here sees clean features (the paper uses the pretraining augmentation). An ``out`` that already
holds a fine-tuning with the same settings is reused (only extraction and benchmark run, e.g. after a failed
extraction or for other test settings); another fine-tuning is never overwritten. The test source must have a named
split (the store's episodes are drawn from it). This is the one bench that touches pixels: it drives ``extract``,
imported inside the functions so that the other ``bench`` commands never load it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np
import torch

from bench.kit import make_head, progress_bar, resolve_device, thread_limits, user_errors
from featstore.atomic import write_json_atomic
from featstore.checkpoint import read_checkpoint
from featstore.errors import UserError
from featstore.rules import select_mask
from heads import sample_episodes
from heads.base import EPISODES, check_needs, class_means, head_class
from heads.scores import batched_auroc

__all__ = ["FsorFinetuneConfig", "run_fsor_finetune", "load_finetuned_head", "select_rows", "fsor_finetune_command"]

CHECKPOINT_NAME = "finetuned.pt"
STORE_NAME = "store.zarr"
RECORD_NAME = "finetune.json"
AUGMENTS = ("auto", "none", "shift", "shift-flip", "lowshot")  # extract.train's kinds (imported lazily there)
# Settings that do not change the fine-tuned checkpoint: a finished fine-tuning is reused when only these differ.
EVALUATION_FIELDS = ("test_dataset", "test_data_root", "test_split", "test_shots", "test_queries", "test_episodes",
                     "views", "baseline_heads", "batch_size", "workers", "device", "threads", "quiet",
                     "allow_overlap")


@dataclass
class FsorFinetuneConfig:
    """Everything that decides what ``bench fsor-finetune`` computes and where it goes (the CLI maps onto it 1:1).

    Training data: ``dataset`` / ``data_root`` / ``split`` open the source; ``train_rule`` / ``val_rule`` pick the
    base and validation samples (see :func:`select_rows`). ``image_size``: input side (default: the parent
    checkpoint's training transform, else the backbone's input size).

    Head: ``head`` = ``tane`` or ``dnpg``, optionally with hyper-parameters (``dnpg:phase2_epochs=10,n_neg=3``).
    ``None`` fine-tuning values take the head's own (paper) hyper-parameters: ``head_lr`` <- ``learning_rate``,
    ``epochs``, ``episodes_per_epoch``, ``episodes_per_step``, ``val_episodes``; ``weight_decay`` and ``momentum``
    always come from the head (both parameter groups use them, as in the original code).

    Fine-tuning: ``tune_part`` (trainable last stages; 0 = frozen), ``backbone_lr`` (0 = frozen), ``bn_train``,
    ``milestones`` / ``gamma`` (step decay applied to each parameter group's own lr, so the backbone's smaller lr
    decays too), ``augment`` (``extract train``'s kinds) and
    ``augment_queries``. Episodes: ``ways``, ``open_ways``, ``shots``, ``queries``; ``val_queries`` (default: as
    many as the smallest validation class allows, at most ``queries``).

    Test: ``test_dataset`` / ``test_data_root`` (default: the training ones) and ``test_split`` (required: the
    novel classes, e.g. omniglot's ``evaluation``); ``test_shots`` (default ``[shots]``), ``test_queries``
    (default ``queries``), ``test_episodes``; ``views``: augmented views per image in the new store (test supports
    average up to 5 of them); ``baseline_heads``: head specs evaluated beside it on the same store.

    Run: ``batch_size`` (embedding and extraction), ``workers`` (decode processes), ``seed``, ``device``,
    ``threads``, ``quiet``, ``out`` (a new folder, or one without a fine-tuned checkpoint).

    ``allow_overlap``: run even when the test classes are base, validation or backbone training classes (each
    overlap is recorded in ``finetune.json`` and in the notes of the FSOR results); refused otherwise.
    """

    checkpoint: str
    out: str
    dataset: str
    test_split: str | None = None
    data_root: str | None = None
    split: str | None = None
    train_rule: str = "all"
    val_rule: str = "none"
    image_size: int | None = None
    head: str = "tane"
    tune_part: int = 4
    backbone_lr: float = 1e-4
    head_lr: float | None = None
    epochs: int | None = None
    episodes_per_epoch: int | None = None
    episodes_per_step: int | None = None
    ways: int = 5
    open_ways: int = 5
    shots: int = 1
    queries: int = 15
    val_episodes: int | None = None
    val_queries: int | None = None
    bn_train: bool = True
    milestones: list = field(default_factory=list)
    gamma: float = 0.1
    augment: str = "auto"
    augment_queries: bool = False
    test_dataset: str | None = None
    test_data_root: str | None = None
    test_shots: list = field(default_factory=list)
    test_queries: int | None = None
    test_episodes: int = 1000
    views: int = 0
    baseline_heads: list = field(default_factory=list)
    batch_size: int = 256
    workers: int = 0
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    quiet: bool = False
    allow_overlap: bool = False


# ----------------------------------------------------------------------------------------------------------------
# sample selection rules
# ----------------------------------------------------------------------------------------------------------------

def select_rows(source: Any, rule: str, option: str = "--train-rule") -> np.ndarray:
    """Sorted int64 sample indices of ``source`` that satisfy ``rule`` (the grammar of :mod:`featstore.rules`:
    ``all``, ``none``, ``drawer<=16``, ``split=NAME``, joined by ``&``; the field ``class`` is the sample's class
    index unless the source has a field of that name)."""
    fields = {"class": np.asarray(source.labels), **{k: np.asarray(v) for k, v in source.meta.items()}}
    mask = select_mask(rule, len(source.labels), fields, source.splits, option=option, where=source.name)
    return np.flatnonzero(mask).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------------


def _derive(seed: int, *parts: Any) -> int:
    """A 63-bit seed from (seed, parts): independent streams that do not depend on the order they are drawn in."""
    digest = hashlib.blake2b(":".join(map(str, (seed, *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _positive(option: str, value: Any, zero_ok: bool = False) -> None:
    if value is None or isinstance(value, bool) or (value < 0 if zero_ok else value <= 0):
        raise UserError(f"{option} must be {'>= 0' if zero_ok else 'positive'}, not {value}")


def _write_record(path: Path, obj: Any) -> None:
    from bench.report import jsonable

    write_json_atomic(path, jsonable(obj))


def _read_checkpoint(path: str) -> dict:
    """The raw featstore checkpoint dict (model name, options and provenance are needed before building)."""
    raw = read_checkpoint(Path(path).expanduser())
    if raw.get("format") != "featstore-checkpoint":
        raise UserError(f"checkpoint {path} was not written by featstore (extract train / save_checkpoint), so it "
                        "does not name its model; re-save it with extract.backbones.save_checkpoint")
    return raw


def _decode(source: Any, indices: np.ndarray, frame_spec: dict, workers: int, progress: bool) -> torch.Tensor:
    """uint8 images ``[len(indices), Cs, R, R]`` in memory: decoded once, augmented on tensors at every step
    (as ``extract train`` does), because an episode step touches hundreds of images in random order."""
    from extract.train import FramedImages  # the framing (and the error line per broken file) of `extract train`

    data = FramedImages(source, indices, frame_spec)
    chunk = 256
    batches = [list(range(s, min(len(data), s + chunk))) for s in range(0, len(data), chunk)]
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    out = torch.empty(len(data), *data.blank_like.shape, dtype=torch.uint8)
    with progress_bar(len(data), "decode", quiet=not progress, unit="img") as bar:
        for b, (x, errors) in zip(batches, loader):
            bad = [e for e in errors if e]
            if bad:
                raise UserError(bad[0])
            out[b[0]:b[-1] + 1] = x
            bar.update(len(b))
    return out


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    """Every submodule in eval mode inside; each submodule's own mode restored after (BN may be in eval while the
    rest trains, ``bn_train=False``)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _embed(backbone: torch.nn.Module, augment: Any, images: torch.Tensor, positions: np.ndarray, batch_size: int,
           device: torch.device) -> torch.Tensor:
    """Clean-view features ``[len(positions), D]`` float32 on ``device`` of the decoded ``images [N, Cs, R, R]``,
    with the backbone in eval mode and no gradients (what extraction would store)."""
    parts = []
    with _eval_mode(backbone), torch.no_grad():
        for lo in range(0, len(positions), batch_size):
            idx = torch.as_tensor(positions[lo:lo + batch_size], dtype=torch.long)
            parts.append(backbone(augment.clean(images[idx].to(device))).float())
    if not parts:
        return torch.zeros(0, backbone.feature_dim, device=device)
    return torch.cat(parts)


def _class_means(features: torch.Tensor, labels: np.ndarray, classes: np.ndarray) -> torch.Tensor:
    """Mean feature per class: features [n, D], labels [n] (values in ``classes``) -> [len(classes), D]."""
    index = torch.as_tensor(np.searchsorted(classes, labels), device=features.device)
    return class_means(features, index, len(classes))[0]


def _episode_error(option_hint: str, exc: Exception) -> UserError:
    return UserError(f"{' '.join(str(exc).split())} ({option_hint})")


# ----------------------------------------------------------------------------------------------------------------
# the head
# ----------------------------------------------------------------------------------------------------------------


def _finetuned_label(spec: str) -> str:
    """``tane`` -> ``tane-finetuned``; ``dnpg:n_neg=3`` -> ``dnpg-finetuned:n_neg=3`` (the spec's syntax)."""
    name, sep, rest = spec.partition(":")
    return f"{name.strip()}-finetuned" + (f":{rest.strip()}" if sep else "")


def _make_head(spec: str, device: torch.device, feat_dim: int, n_base: int, seed: int):
    """A TANE / DNPG head for ``feat_dim``-d features and ``n_base`` base classes (seeded initialisation)."""
    from bench.fsor import parse_head_spec

    name, options = parse_head_spec(spec)
    with user_errors():
        cls = head_class(name)
    if cls not in _finetunable():
        raise UserError(f"head {spec!r} cannot be fine-tuned with a backbone here; choose tane or dnpg")
    with user_errors():
        check_needs(cls, inputs=EPISODES, meta_training=True, protocol="bench fsor-finetune")
    head = make_head(name, options, {"device": device, "feat_dim": feat_dim, "n_base_classes": n_base, "seed": seed})
    if head.feat_dim != feat_dim or head.n_base_classes != n_base:
        raise UserError(f"head {spec!r} sets feat_dim={head.feat_dim} / n_base_classes={head.n_base_classes}, but "
                        f"the backbone gives {feat_dim}-d features and the base rows hold {n_base} classes; drop "
                        "those parameters from --head")
    if getattr(head, "semantic_dim", None) is not None:
        raise UserError(f"head {spec!r}: word vectors (semantic_dim) are not available to fsor-finetune; drop "
                        "semantic_dim (SEMAN-G then uses its visual stand-in)")
    return head


def _finetunable() -> tuple[type, ...]:
    """The heads whose base memory this command can install before joint training (TANE's classifier rows, DNPG's
    Phase 2) and that train through ``training_step``."""
    return head_class("tane"), head_class("dnpg")


def load_finetuned_head(checkpoint: str | os.PathLike, device: str | torch.device = "cpu"):
    """The head saved by ``bench fsor-finetune`` in ``checkpoint``, rebuilt from its spec and loaded strictly.

    Returns the head in eval mode on ``device``, ready for ``fit(support [E, S, D], labels [E, S])`` /
    ``logits_with_negative(query [E, m, D]) -> [E, m, N+1]``; no meta-training is needed or done.
    """
    raw = _read_checkpoint(str(checkpoint))
    record = (raw.get("provenance") or {}).get("fsor_finetune") or {}
    spec = (record.get("head") or {}).get("spec")
    if not spec or not isinstance(raw.get("classifier"), dict):
        raise UserError(f"checkpoint {checkpoint} holds no fine-tuned FSOR head; write one with bench fsor-finetune")
    h = record["head"]
    head = _make_head(spec, torch.device(device), int(h["feat_dim"]), int(h["n_base_classes"]), int(h["seed"]))
    try:
        head.load_state_dict(raw["classifier"], strict=True)
    except RuntimeError as exc:
        raise UserError(f"the head in {checkpoint} does not fit {spec!r} ({str(exc).splitlines()[0][:120]})") from None
    return head.eval()


def _init_head(head, base_feats: torch.Tensor, base_labels: np.ndarray, base_classes: np.ndarray, info: dict,
               class_names: list[str], seed: int) -> str:
    """Install the base memory before joint training; returns what it was built from.

    base_feats [n, D]: clean features of the base rows through the starting backbone; base_labels [n] their
    source class ids; base_classes [B] sorted ids (memory row order).
    """
    if isinstance(head, head_class("dnpg")):  # Phase 2 is feature-level and runs on the frozen backbone
        head.fit_open_weights(base_feats, base_labels, base_classes=base_classes, seed=seed)
        return "dnpg phase 2 (gcpl centres, rpl points) on the starting backbone's base features"
    means = _class_means(base_feats, base_labels, base_classes)
    weights, source = means, "class means of the starting backbone's base features"
    classifier = info.get("classifier") if isinstance(info.get("classifier"), dict) else {}
    names = list(info.get("classes") or [])
    w = classifier.get("weight")
    if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == base_feats.shape[1] and len(names) == len(w):
        row = {name: k for k, name in enumerate(names)}
        wanted = [class_names[c] for c in base_classes]
        if all(name in row for name in wanted):
            # TANE's memory is the pretraining classifier's weights of the base classes: rows matched by name
            weights = w[torch.as_tensor([row[name] for name in wanted])].to(base_feats)
            source = "checkpoint classifier rows"
    sem = None
    if getattr(head, "neg_gen_type", None) == "semang":  # the visual stand-in for base word vectors (heads.tane)
        sem = torch.nn.functional.normalize(means, dim=-1)
    head.set_base_memory(weights, base_classes, sem)
    return source


def _val_metrics(head, feats: torch.Tensor, batch, chunk: int = 100) -> tuple[float, float]:
    """Mean closed accuracy and mean per-episode AUROC of val episodes on features ``feats [n_val, D]``.

    ``batch``: episodes whose row ids index ``feats``. As in meta-training, each episode's own classes are masked
    out of the base memory (they are base classes when the validation images are held-out images of them); the
    head's ``fit`` would leave them in and let calibration copy the class's own weight.
    """
    accs, aurocs = [], []
    dev = head.device
    with _eval_mode(head), torch.no_grad():
        for lo in range(0, batch.support.shape[0], chunk):
            sl = slice(lo, lo + chunk)
            sup = feats[batch.support[sl].to(dev)]  # [e, N*K, D]
            qry = feats[batch.query[sl].to(dev)]  # [e, m, D]
            s_lab = batch.support_labels[sl].to(dev)
            q_lab = batch.query_labels[sl].to(dev)
            classes = batch.classes[sl]
            n = classes.shape[1]
            out = head._task_forward(class_means(sup, s_lab, n)[0], head._key_mask(classes, sup.shape[0]),
                                     head._class_semantics(classes))
            scores = head._scores(qry, out)  # [e, m, N+1]
            known = q_lab >= 0
            pred = scores[..., :n].argmax(-1)
            accs.append(((pred == q_lab) & known).sum(1).float() / known.sum(1).clamp_min(1))
            # float32, as NegProtoHead.evaluate_episodes: the selection criterion compares these values
            aurocs.append(batched_auroc(torch.softmax(scores, -1)[..., -1], ~known).to(torch.float32))
    return float(torch.cat(accs).mean()), float(torch.nanmean(torch.cat(aurocs)))


# ----------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------


def _check_config(cfg: FsorFinetuneConfig) -> None:
    """Plain value checks, before anything is read."""
    for option, value in (("--ways", cfg.ways), ("--open-ways", cfg.open_ways), ("--shots", cfg.shots),
                          ("--queries", cfg.queries), ("--test-episodes", cfg.test_episodes),
                          ("--batch-size", cfg.batch_size), ("--gamma", cfg.gamma)):
        _positive(option, value)
    for option, value in (("--epochs", cfg.epochs), ("--episodes-per-epoch", cfg.episodes_per_epoch),
                          ("--episodes-per-step", cfg.episodes_per_step), ("--val-queries", cfg.val_queries),
                          ("--test-queries", cfg.test_queries), ("--head-lr", cfg.head_lr),
                          ("--image-size", cfg.image_size), ("--threads", cfg.threads)):
        if value is not None:
            _positive(option, value)
    for option, value in (("--backbone-lr", cfg.backbone_lr), ("--tune-part", cfg.tune_part),
                          ("--val-episodes", cfg.val_episodes), ("--views", cfg.views), ("--workers", cfg.workers)):
        if value is not None:
            _positive(option, value, zero_ok=True)
    if any(int(k) <= 0 for k in cfg.test_shots):
        raise UserError(f"--test-shots must be positive integers, not {cfg.test_shots}")
    if any(int(m) <= 0 for m in cfg.milestones) or list(cfg.milestones) != sorted(cfg.milestones):
        raise UserError(f"--milestones must be increasing positive epochs, not {cfg.milestones}")
    if cfg.augment not in AUGMENTS:
        raise UserError(f"unknown augmentation {cfg.augment!r}; choose one of: {', '.join(AUGMENTS)}")
    if not cfg.test_split:
        raise UserError("--test-split is required: the split of the test source that holds the novel classes "
                        "(e.g. evaluation for omniglot, test for csv)")
    resolve_device(cfg.device)
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")


def _finished_finetune(cfg: FsorFinetuneConfig) -> dict | None:
    """The record of a fine-tuning already in ``out`` with the same settings (only the extraction and benchmark
    are then run again, e.g. after a failed extraction or with other test settings), or None when ``out`` holds
    none. Raises :class:`UserError` when ``out`` holds another fine-tuning: it is never overwritten."""
    from bench.report import jsonable
    from extract import backbones as bb

    out = Path(cfg.out).expanduser()
    ckpt = out / CHECKPOINT_NAME
    if not ckpt.exists():
        return None
    try:
        record = json.loads((out / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("checkpoint_sha256") != bb.sha256_file(ckpt):
        raise UserError(f"{out} holds a fine-tuned checkpoint without its {RECORD_NAME}; choose a new --out")
    saved = record.get("config") or {}
    for key, value in jsonable(asdict(cfg)).items():
        if key not in EVALUATION_FIELDS and saved.get(key) != value:
            raise UserError(f"{out} already holds a fine-tuning with {key}={saved.get(key)!r}, not {value!r}; choose "
                            "a new --out (the same fine-tuning settings redo only the extraction and the benchmark)")
    if record.get("parent_sha256") != bb.sha256_file(cfg.checkpoint):
        raise UserError(f"{cfg.checkpoint} changed since {out} was fine-tuned from it; choose a new --out")
    return record


def check_class_sets(cfg: FsorFinetuneConfig) -> list[str]:
    """Refuse (one line, naming them) test classes that are base classes (``train_rule``), validation classes
    (``val_rule``) or classes the starting backbone was trained on (the checkpoint's class names), matched by name
    across the sources; with ``allow_overlap`` return those lines as notes instead. Validation classes may be base
    classes (held-out drawings of them): that is not checked."""
    from bench.fsor import refuse_or_note_overlap
    from extract import datasets as ds

    raw = _read_checkpoint(cfg.checkpoint)
    source = ds.open_source(cfg.dataset, root=cfg.data_root, split=cfg.split)
    labels = np.asarray(source.labels, dtype=np.int64)

    def names_of(rows: np.ndarray) -> set[str]:
        return {str(source.classes[c]) for c in np.unique(labels[rows])}

    base = names_of(select_rows(source, cfg.train_rule, "--train-rule"))
    val = names_of(select_rows(source, cfg.val_rule, "--val-rule"))
    test_source = ds.open_source(cfg.test_dataset or cfg.dataset, root=cfg.test_data_root or cfg.data_root,
                                 split=cfg.test_split)
    test = {str(test_source.classes[c]) for c in np.unique(np.asarray(test_source.labels, dtype=np.int64))}
    seen = {str(c) for c in raw.get("classes") or []}
    names = sorted(base | val | test | seen)
    index = {name: k for k, name in enumerate(names)}
    notes: list[str] = []
    what = f"--test-split {cfg.test_split!r}"
    for other, label in ((base, f"the base classes of --train-rule {cfg.train_rule!r}"),
                         (val, f"the validation classes of --val-rule {cfg.val_rule!r}"),
                         (seen, f"the classes checkpoint {Path(cfg.checkpoint).name} was trained on")):
        refuse_or_note_overlap([index[n] for n in test], [index[n] for n in other], what, label, names,
                               cfg.allow_overlap, notes)
    return notes


def run_fsor_finetune(cfg: FsorFinetuneConfig, echo: Callable[[str], None] | None = None) -> dict:
    """Fine-tune ``cfg.head`` with the backbone of ``cfg.checkpoint``, re-extract the test data, run FSOR on it.

    Returns ``{"checkpoint", "checkpoint_sha256", "parent_sha256", "store", "store_fingerprint_hash",
    "history", "best_epoch", "selected", "fsor": run_fsor's metrics, ...}`` (also written to
    ``out/finetune.json``). Everything about the request is checked before ``out`` is touched. When ``out``
    already holds a fine-tuning with the same settings (apart from :data:`EVALUATION_FIELDS`), it is reused: only
    the extraction (which resumes) and the benchmark run.
    """
    _check_config(cfg)
    done = _finished_finetune(cfg)
    notes = check_class_sets(cfg)
    device = resolve_device(cfg.device)
    with thread_limits(cfg.threads):
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            if done is None:
                result = _finetune_stage(cfg, device, echo)
            else:
                result = {**done, "config": asdict(cfg), "reused_finetuning": True}
                if echo and not cfg.quiet:
                    echo(f"reusing the fine-tuning in {cfg.out} ({CHECKPOINT_NAME}, sha256 "
                         f"{done['checkpoint_sha256'][:12]})")
            result.pop("overlap_notes", None)  # a reused record's: this request's are set below
            if notes:
                result["overlap_notes"] = notes
            return _evaluate_stage(cfg, result, device, echo, notes)


def _finetune_stage(cfg: FsorFinetuneConfig, device: torch.device, echo: Callable[[str], None] | None) -> dict:
    """Steps 1-6 of the module docstring: returns the record written to ``out/finetune.json``.

    The joint loop cannot be the head's own ``meta_train`` loop: that one trains the head alone on cached
    features with one optimizer, while here every step runs images through the backbone under
    :func:`extract.train.finetune` (two parameter groups, BatchNorm modes, per-group decay), and validation masks
    each episode's own classes out of the base memory, which ``NegProtoHead.evaluate_episodes`` does not. The
    selection rule (val accuracy + AUROC, the first best kept) is the same."""
    from extract.train import finetune, write_finetuned

    started = time.perf_counter()
    show = not cfg.quiet and sys.stderr.isatty()
    out = Path(cfg.out).expanduser()

    parent = _load_parent(cfg)
    data = _base_data(cfg, parent)
    head = _make_head(cfg.head, device, parent.backbone.feature_dim, data.n_base, cfg.seed)
    schedule = _schedule(cfg, head, len(data.val_rows))
    val_batch, val_queries, base_names = _check_episode_requests(cfg, data, schedule)
    pixels = _load_pixels(cfg, data, parent, device, show)
    backbone = parent.backbone

    # -- head initialisation on the starting backbone's clean base features (computed once)
    base_feats = _embed(backbone, pixels.augment, pixels.images, pixels.pos_of[data.train_rows], cfg.batch_size,
                        device)
    memory = _init_head(head, base_feats, data.labels[data.train_rows], data.base_classes, parent.info,
                        data.source.classes, cfg.seed)
    del base_feats

    # -- joint meta-training
    if schedule.n_val:  # validation episodes index the validation features directly
        val_index = np.full(len(data.labels), -1, dtype=np.int64)
        val_index[data.val_rows] = np.arange(len(data.val_rows))
        for name in ("support", "query"):
            setattr(val_batch, name, torch.as_tensor(val_index[getattr(val_batch, name).numpy()]))
    steps = _EpisodeSteps(cfg, data, pixels, schedule, device)
    selection = _EpochSelection(cfg, schedule, backbone, head, pixels, data.val_rows, val_batch, device, show)
    try:
        finetune(backbone, head, steps.batches, steps.loss, tune_part=cfg.tune_part, backbone_lr=cfg.backbone_lr,
                 head_lr=schedule.head_lr, epochs=schedule.epochs, bn_train=cfg.bn_train, device=device,
                 weight_decay=head.weight_decay, momentum=head.momentum, nesterov=head.momentum > 0,
                 milestones=[int(m) for m in cfg.milestones], gamma=cfg.gamma, on_step=selection.on_step)
    finally:
        selection.close()
    selected, best_epoch = selection.restore_best()
    backbone.eval()
    head.eval()

    # -- the new checkpoint: backbone + head + how they were made
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT_NAME
    settings = {"tune_part": cfg.tune_part, "backbone_lr": cfg.backbone_lr, "head_lr": schedule.head_lr,
                "epochs": schedule.epochs, "episodes_per_epoch": schedule.epe, "episodes_per_step": schedule.eps,
                "bn_train": cfg.bn_train, "milestones": list(cfg.milestones), "gamma": cfg.gamma,
                "weight_decay": head.weight_decay, "momentum": head.momentum, "ways": cfg.ways,
                "open_ways": cfg.open_ways, "shots": cfg.shots, "queries": cfg.queries, "augment": pixels.plan,
                "augment_queries": cfg.augment_queries, "seed": cfg.seed, "train_rule": cfg.train_rule,
                "val_rule": cfg.val_rule, "val_episodes": schedule.n_val,
                "val_queries": val_queries if schedule.n_val else None}
    record = {
        "head": {"spec": cfg.head, "label": _finetuned_label(cfg.head), "feat_dim": backbone.feature_dim,
                 "n_base_classes": data.n_base, "seed": cfg.seed, "base_memory": memory,
                 "base_classes": [int(c) for c in data.base_classes]},
        "data": {"source": data.source.describe(), "manifest_hash": data.source.manifest_hash(),
                 "n_train": int(len(data.train_rows)), "n_val": int(len(data.val_rows))},
        "transform": data.spec,
        "history": selection.history,
        "best_epoch": best_epoch,
        "selected": selected,
    }
    sha = write_finetuned(backbone, ckpt, head=head, classes=base_names, parent=cfg.checkpoint, settings=settings,
                          provenance={"driver": "bench.fsor_finetune", "transform": data.spec,
                                      "fsor_finetune": record})
    result = {"config": asdict(cfg), "checkpoint": str(ckpt), "checkpoint_sha256": sha,
              "parent_checkpoint": str(cfg.checkpoint), "parent_sha256": parent.sha256, "model": parent.model_name,
              "label": _finetuned_label(cfg.head), "settings": settings, **record,
              "finetune_seconds": time.perf_counter() - started}
    _write_record(out / RECORD_NAME, result)
    if echo and not cfg.quiet:
        history = selection.history
        kept = history[best_epoch - 1] if len(history) >= best_epoch else {}
        val = (f"; val acc {kept['val_acc']:.4f}, auroc {kept['val_auroc']:.4f}" if "val_acc" in kept else "")
        echo(f"fine-tuned {cfg.head} with {parent.model_name} (tune_part {cfg.tune_part}): {schedule.epochs} "
             f"epochs, kept epoch {best_epoch} ({selected}){val}; wrote {ckpt}")
    return result


@dataclass
class _Parent:
    """The starting checkpoint: its raw dict, the backbone built and loaded from it, ``load_checkpoint``'s info."""

    raw: dict
    model_name: str
    backbone: torch.nn.Module
    info: dict
    sha256: str


def _load_parent(cfg: FsorFinetuneConfig) -> _Parent:
    """Step 1: the backbone, exactly as the checkpoint describes it."""
    from extract import backbones as bb

    raw = _read_checkpoint(cfg.checkpoint)
    model_name = raw.get("model")
    torch.manual_seed(_derive(cfg.seed, "backbone"))  # overwritten by the weights; seeded all the same
    backbone = bb.create_backbone(model_name, small_input=bool(raw.get("small_input", False)),
                                  **dict(raw.get("model_options") or {}))
    info = bb.load_checkpoint(backbone, cfg.checkpoint)
    n_stages = len(backbone.stage_names)
    if cfg.tune_part > n_stages:
        raise UserError(f"--tune-part {cfg.tune_part}: {model_name} has {n_stages} stages "
                        f"({', '.join(backbone.stage_names)}); use 0..{n_stages}")
    return _Parent(raw, model_name, backbone, info, info["sha256"])


@dataclass
class _BaseData:
    """Step 2: the training source, its base and validation rows and the transform of the checkpoint."""

    source: Any
    labels: np.ndarray
    train_rows: np.ndarray
    val_rows: np.ndarray
    base_classes: np.ndarray
    spec: dict

    @property
    def n_base(self) -> int:
        return len(self.base_classes)


def _base_data(cfg: FsorFinetuneConfig, parent: _Parent) -> _BaseData:
    from extract import datasets as ds

    source = ds.open_source(cfg.dataset, root=cfg.data_root, split=cfg.split)
    train_rows = select_rows(source, cfg.train_rule, "--train-rule")
    val_rows = select_rows(source, cfg.val_rule, "--val-rule")
    if len(train_rows) == 0:
        raise UserError(f"--train-rule {cfg.train_rule!r} selects no sample of {source.name}; loosen it")
    if len(np.intersect1d(train_rows, val_rows)):
        raise UserError(f"--train-rule {cfg.train_rule!r} and --val-rule {cfg.val_rule!r} share "
                        f"{len(np.intersect1d(train_rows, val_rows))} samples; validation must be held out")
    labels = np.asarray(source.labels, dtype=np.int64)
    base_classes = np.unique(labels[train_rows])
    ways_all = cfg.ways + cfg.open_ways
    if ways_all >= len(base_classes):
        raise UserError(f"--ways + --open-ways = {ways_all} leaves no base memory out of the {len(base_classes)} "
                        "base classes of --train-rule; use fewer ways or more classes")
    provenance = parent.info.get("provenance") or {}
    size = cfg.image_size or ((provenance.get("transform") or {}).get("size"))
    spec = ds.transform_spec(parent.backbone.input_spec, source, size=size)
    return _BaseData(source, labels, train_rows, val_rows, base_classes, spec)


@dataclass
class _Schedule:
    """The fine-tuning schedule: the command's values, else the head's (paper) hyper-parameters."""

    head_lr: float
    epochs: int
    epe: int  # episodes per epoch
    eps: int  # episodes per step
    n_val: int  # validation episodes per epoch (0: no selection, the last epoch is kept)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.epe // self.eps)


def _schedule(cfg: FsorFinetuneConfig, head, n_val_rows: int) -> _Schedule:
    epe = int(cfg.episodes_per_epoch if cfg.episodes_per_epoch is not None else head.episodes_per_epoch)
    return _Schedule(
        head_lr=float(cfg.head_lr if cfg.head_lr is not None else head.learning_rate),
        epochs=int(cfg.epochs if cfg.epochs is not None else head.epochs),
        epe=epe,
        eps=min(epe, int(cfg.episodes_per_step if cfg.episodes_per_step is not None else head.episodes_per_step)),
        n_val=int(cfg.val_episodes if cfg.val_episodes is not None else head.val_episodes) if n_val_rows else 0)


def _check_episode_requests(cfg: FsorFinetuneConfig, data: _BaseData, schedule: _Schedule):
    """Every episode request must be satisfiable before hours of training: probe one of each. Returns the
    validation episodes (None without), their queries per class and the base class names."""
    from extract import datasets as ds

    labels, ways_all = data.labels, cfg.ways + cfg.open_ways
    try:
        sample_episodes(labels, data.train_rows, ways=ways_all, shots=cfg.shots, queries=cfg.queries,
                        seed=[cfg.seed, 0])
    except ValueError as exc:
        raise _episode_error("--train-rule, --ways, --open-ways, --shots, --queries", exc) from None
    val_queries, val_batch = cfg.val_queries, None
    if schedule.n_val:
        if val_queries is None:  # held-out drawings are few per class (omniglot: 4): use what the classes have
            counts = np.bincount(labels[data.val_rows])
            counts = np.sort(counts[counts > 0])[::-1]
            val_queries = min(cfg.queries, int(counts[min(ways_all, len(counts)) - 1]) - cfg.shots)
            if val_queries < 1:
                raise UserError(f"--val-rule {cfg.val_rule!r} leaves too few samples per class for {cfg.shots}-shot "
                                "validation episodes with a query; hold out more, or --val-rule none")
        try:
            val_batch = sample_episodes(labels, data.val_rows, ways=cfg.ways, shots=cfg.shots, queries=val_queries,
                                        open_ways=cfg.open_ways, seed=[cfg.seed, 1], count=schedule.n_val)
        except ValueError as exc:
            raise _episode_error("--val-rule, --val-queries", exc) from None
    test_source = ds.open_source(cfg.test_dataset or cfg.dataset, root=cfg.test_data_root or cfg.data_root,
                                 split=cfg.test_split)
    test_shots = [int(k) for k in cfg.test_shots] or [cfg.shots]
    test_queries = int(cfg.test_queries or cfg.queries)
    try:
        sample_episodes(test_source.labels, ways=cfg.ways, shots=max(test_shots), queries=test_queries,
                        open_ways=cfg.open_ways, seed=[cfg.seed, 2])
    except ValueError as exc:
        raise _episode_error("--test-split, --test-shots, --test-queries", exc) from None
    base_names = [data.source.classes[c] for c in data.base_classes]
    return val_batch, val_queries, base_names


@dataclass
class _Pixels:
    """Decoded uint8 images of the base and validation rows, where each source row sits, and the augmentation."""

    images: torch.Tensor
    pos_of: np.ndarray  # source row -> position in images (-1: not decoded)
    plan: dict
    augment: Any


def _load_pixels(cfg: FsorFinetuneConfig, data: _BaseData, parent: _Parent, device: torch.device,
                 show: bool) -> _Pixels:
    """Pixels in memory (base and validation rows) and the training augmentation of ``extract train``; the
    backbone moves to ``device`` and is probed once with the input size."""
    from extract.train import BatchAugment, resolve_augment

    spec, source = data.spec, data.source
    stored = spec["resize"] or spec["size"]
    frame_spec = {"size": stored, "resize": stored if spec["resize"] else None,
                  "channels": 1 if (source.grayscale or spec["channels"] == 1) else 3, "normalize": "none",
                  "interpolation": spec["interpolation"]}
    rows = np.union1d(data.train_rows, data.val_rows)
    images = _decode(source, rows, frame_spec, cfg.workers, show)
    pos_of = np.full(len(data.labels), -1, dtype=np.int64)
    pos_of[rows] = np.arange(len(rows))
    plan = resolve_augment(cfg.augment, spec["size"], source.name)
    augment = BatchAugment(plan, spec, stored)
    backbone = parent.backbone
    backbone.to(device)
    try:  # fail here, in one line, if the size does not fit (eval mode: a probe must not move BN statistics)
        with _eval_mode(backbone), torch.no_grad():
            backbone(augment.clean(images[:1].to(device)))
    except RuntimeError as exc:
        raise UserError(f"{spec['size']}-px images do not fit {parent.model_name} "
                        f"({str(exc).splitlines()[0][:80]}); pass another --image-size") from None
    return _Pixels(images, pos_of, plan, augment)


class _EpisodeSteps:
    """The training data of :func:`extract.train.finetune`: ``batches(epoch)`` yields one step of
    ``episodes_per_step`` (ways + open_ways)-way episodes of base images at a time; ``loss`` is the head's."""

    def __init__(self, cfg: FsorFinetuneConfig, data: _BaseData, pixels: _Pixels, schedule: _Schedule,
                 device: torch.device):
        self.cfg, self.data, self.pixels, self.schedule, self.device = cfg, data, pixels, schedule, device

    def batches(self, epoch: int):
        # dropout / DropBlock of epoch e draw from the global RNG: seed it per epoch (finetune calls this once
        # per epoch, after setting the train modes)
        torch.manual_seed(_derive(self.cfg.seed, "torch", epoch))
        epe, eps = self.schedule.epe, self.schedule.eps
        return (self.step(epoch * epe + s * eps, min(eps, epe - s * eps)) for s in range(self.schedule.steps_per_epoch))

    def step(self, start: int, count: int):
        """One step: (images [E*S + E*m, C, H, W], labels [E*S + E*m], structure) of episodes start..start+E-1."""
        cfg, pos_of, images, augment, device = self.cfg, self.pixels.pos_of, self.pixels.images, \
            self.pixels.augment, self.device
        ep = sample_episodes(self.data.labels, self.data.train_rows, ways=cfg.ways + cfg.open_ways, shots=cfg.shots,
                             queries=cfg.queries, seed=[cfg.seed, 0], start=start, count=count)
        sup = torch.as_tensor(pos_of[ep.support.numpy()].reshape(-1))
        qry = torch.as_tensor(pos_of[ep.query.numpy()].reshape(-1))
        gen = torch.Generator().manual_seed(_derive(cfg.seed, "augment", start))
        xs = augment(images[sup].to(device), gen)  # supports and open supports: the training augmentation
        xq = augment(images[qry].to(device), gen) if cfg.augment_queries else augment.clean(images[qry].to(device))
        y = torch.cat([ep.support_labels.reshape(-1), ep.query_labels.reshape(-1)])
        return torch.cat([xs, xq]), y, {"episodes": count, "support": ep.support.shape[1], "classes": ep.classes}

    def loss(self, h, feats: torch.Tensor, y: torch.Tensor, extra: dict) -> torch.Tensor:
        """feats [E*S + E*m, D] -> support [E, S, D] and query [E, m, D]; the head's primary + swapped loss."""
        e, s = int(extra["episodes"]), int(extra["support"])
        n, d = e * s, feats.shape[1]
        loss = h.training_step(feats[:n].reshape(e, s, d), y[:n].reshape(e, s), feats[n:].reshape(e, -1, d),
                               y[n:].reshape(e, -1), ways=self.cfg.ways, episode_classes=extra["classes"])
        if not torch.isfinite(loss):
            raise UserError(f"fine-tuning diverged (loss {loss.item()}); lower --backbone-lr or --head-lr")
        return loss


class _EpochSelection:
    """``on_step`` of :func:`extract.train.finetune`: the progress bar, one history record per epoch and, with
    validation episodes, the val-best backbone and head (accuracy + AUROC through the backbone as it is then)."""

    def __init__(self, cfg: FsorFinetuneConfig, schedule: _Schedule, backbone, head, pixels: _Pixels,
                 val_rows: np.ndarray, val_batch, device: torch.device, show: bool):
        self.cfg, self.schedule, self.backbone, self.head = cfg, schedule, backbone, head
        self.pixels, self.val_rows, self.val_batch, self.device, self.show = pixels, val_rows, val_batch, device, show
        self.history: list[dict] = []
        self.best = {"score": -math.inf, "epoch": None, "backbone": None, "head": None}
        self.sums = {"loss": 0.0, "steps": 0, "tic": time.perf_counter()}
        self.bar = progress_bar(schedule.epochs * schedule.steps_per_epoch, f"fine-tune {cfg.head}",
                                quiet=not show, unit="step")

    def on_step(self, epoch: int, step: int, loss: float) -> None:
        cfg, sums = self.cfg, self.sums
        sums["loss"] += loss
        sums["steps"] += 1
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if step != self.schedule.steps_per_epoch - 1:
            return
        decay = cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= int(m))
        record = {"epoch": epoch + 1, "train_loss": sums["loss"] / max(1, sums["steps"]),
                  "backbone_lr": cfg.backbone_lr * decay if cfg.tune_part and cfg.backbone_lr > 0 else 0.0,
                  "head_lr": self.schedule.head_lr * decay}
        if self.schedule.n_val:
            self._select(epoch, record)
        record["seconds"] = time.perf_counter() - sums["tic"]
        self.history.append(record)
        sums.update(loss=0.0, steps=0, tic=time.perf_counter())
        if self.show:
            self.bar.write(f"epoch {epoch + 1}/{self.schedule.epochs}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"), file=sys.stderr)

    def _select(self, epoch: int, record: dict) -> None:
        """Validation episodes through the backbone as it is now; keep the first best of accuracy + AUROC."""
        feats = _embed(self.backbone, self.pixels.augment, self.pixels.images, self.pixels.pos_of[self.val_rows],
                       self.cfg.batch_size, self.device)
        acc, auroc = _val_metrics(self.head, feats, self.val_batch)
        record.update(val_acc=acc, val_auroc=auroc)
        score = acc + (auroc if math.isfinite(auroc) else 0.0)  # the criterion of NegProtoHead.meta_train
        if score > self.best["score"]:
            self.best.update(score=score, epoch=epoch + 1,
                             backbone={k: v.detach().clone() for k, v in self.backbone.state_dict().items()},
                             head={k: v.detach().clone() for k, v in self.head.state_dict().items()})

    def close(self) -> None:
        self.bar.close()

    def restore_best(self) -> tuple[str, int]:
        """Load the val-best weights where there were validation episodes; ("val-best" | "last", its epoch)."""
        if self.best["epoch"] is None:
            return "last", self.schedule.epochs
        self.backbone.load_state_dict(self.best["backbone"])
        self.head.load_state_dict(self.best["head"])
        return "val-best", self.best["epoch"]


def _evaluate_stage(cfg: FsorFinetuneConfig, result: dict, device: torch.device,
                    echo: Callable[[str], None] | None, notes: tuple[str, ...] | list[str] = ()) -> dict:
    """Steps 7-8: re-extract the test split with the new checkpoint, run FSOR with the saved head; returns
    ``result`` completed (and rewrites ``out/finetune.json``)."""
    from extract.run import ExtractConfig, run_extraction
    from featstore.store import FeatureStore

    started = time.perf_counter()
    out = Path(cfg.out).expanduser()
    ckpt = out / CHECKPOINT_NAME
    raw = _read_checkpoint(str(ckpt))
    test_shots = [int(k) for k in cfg.test_shots] or [cfg.shots]
    test_queries = int(cfg.test_queries or cfg.queries)

    # -- re-extraction with the new checkpoint: the old trunk's features never serve the new head
    store_path = out / STORE_NAME
    extracted = run_extraction(ExtractConfig(
        model=raw["model"], out=str(store_path), dataset=cfg.test_dataset or cfg.dataset,
        data_root=cfg.test_data_root or cfg.data_root, split=cfg.test_split, checkpoint=str(ckpt),
        image_size=int(result["transform"]["size"]), small_input=bool(raw.get("small_input", False)),
        batch_size=cfg.batch_size, workers=cfg.workers, views=cfg.views, device=cfg.device, seed=cfg.seed,
        quiet=cfg.quiet))

    store = FeatureStore.open(store_path)
    result.update(store=str(store_path), store_fingerprint_hash=store.fingerprint_hash, store_rows=store.n,
                  extract_seconds=extracted.seconds)

    # -- the benchmark, with the head exactly as saved (loaded from the file, not meta-trained again)
    from bench.fsor import run_fsor

    ready = load_finetuned_head(ckpt, device)
    metrics = run_fsor(store_path, split=cfg.test_split, ways=cfg.ways, shots=test_shots, open_ways=cfg.open_ways,
                       queries=test_queries, episodes=cfg.test_episodes, heads=tuple(cfg.baseline_heads),
                       seed=cfg.seed, device=cfg.device, out=out, quiet=cfg.quiet,
                       echo=None if cfg.quiet else echo, ready_heads={_finetuned_label(cfg.head): ready},
                       allow_overlap=cfg.allow_overlap, notes=notes)
    result.update(fsor=metrics, results=str(out / "results.json"), evaluate_seconds=time.perf_counter() - started)
    _write_record(out / RECORD_NAME, result)
    return result


# ----------------------------------------------------------------------------------------------------------------
# command line: `bench fsor-finetune` (registered in bench/cli.py) and `python -m bench.fsor_finetune`
# ----------------------------------------------------------------------------------------------------------------


def _ints(_ctx, param, value: str | None) -> list[int]:
    if value is None or not str(value).strip():
        return []
    try:
        return [int(v) for v in str(value).replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated integers such as 1,5") from None


@click.command("fsor-finetune", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", required=True, type=click.Path(), help="Starting featstore checkpoint (backbone "
              "and, for TANE's base memory, its classifier).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for finetuned.pt, finetune.json, store.zarr and the FSOR results.")
@click.option("--dataset", required=True, help="Training data source (see `extract list`).")
@click.option("--data-root", type=click.Path(), default=None, help="Folder of the training data set.")
@click.option("--split", default=None, help="Subset of the training source to open (e.g. background).")
@click.option("--train-rule", default="all", show_default=True,
              help="Base samples: all, FIELD<=VALUE (drawer<=16, class<900), split=NAME, joined by &.")
@click.option("--val-rule", default="none", show_default=True,
              help="Validation samples for epoch selection, same syntax (drawer>=17), or none.")
@click.option("--image-size", type=int, default=None,
              help="Input side in px [default: the checkpoint's training size, else the model's].")
@click.option("--head", default="tane", show_default=True,
              help="tane or dnpg, optionally with hyper-parameters: dnpg:phase2_epochs=10,n_neg=3.")
@click.option("--head-option", "head_options", multiple=True,
              help="NAME.KEY=VALUE for the fine-tuned head or a --baseline-head (KEY=VALUE: every head that takes "
                   "it); folded into the head specs, which the results record.")
@click.option("--tune-part", type=int, default=4, show_default=True,
              help="Trainable last backbone stages (TANE/DNPG tune_part); 0 = frozen backbone.")
@click.option("--backbone-lr", type=float, default=1e-4, show_default=True, help="Backbone lr (tunefeat); 0 = frozen.")
@click.option("--head-lr", type=float, default=None, help="Head lr [default: the head's learning_rate].")
@click.option("--epochs", type=int, default=None, help="Epochs [default: the head's].")
@click.option("--episodes-per-epoch", type=int, default=None, help="[default: the head's, 600].")
@click.option("--episodes-per-step", type=int, default=None, help="[default: the head's, 2].")
@click.option("--ways", type=int, default=5, show_default=True, help="Known classes per episode (N).")
@click.option("--open-ways", type=int, default=5, show_default=True, help="Pseudo-open / unknown classes (M).")
@click.option("--shots", type=int, default=1, show_default=True, help="Support images per class (K).")
@click.option("--queries", type=int, default=15, show_default=True, help="Queries per class.")
@click.option("--val-episodes", type=int, default=None, help="Validation episodes per epoch [default: the head's].")
@click.option("--val-queries", type=int, default=None,
              help="Queries per validation class [default: what the held-out samples allow, <= --queries].")
@click.option("--bn-train/--bn-eval", default=True, show_default=True,
              help="Re-estimate BatchNorm statistics of all stages on the episodes (the original) or keep them.")
@click.option("--milestones", default=None, callback=_ints, help="Epochs at which both lrs decay by --gamma (30,60).")
@click.option("--gamma", type=float, default=0.1, show_default=True)
@click.option("--augment", type=click.Choice(AUGMENTS), default="auto", show_default=True,
              help="Support augmentation (extract train's kinds).")
@click.option("--augment-queries", is_flag=True, help="Augment queries too (the papers do not).")
@click.option("--test-dataset", default=None, help="Test data source [default: --dataset].")
@click.option("--test-data-root", type=click.Path(), default=None, help="[default: --data-root].")
@click.option("--test-split", required=True, help="Split of the test source with the novel classes (evaluation).")
@click.option("--test-shots", default=None, callback=_ints, help="Comma-separated K of the test [default: --shots].")
@click.option("--test-queries", type=int, default=None, help="[default: --queries].")
@click.option("--test-episodes", type=int, default=1000, show_default=True)
@click.option("--views", type=int, default=0, show_default=True,
              help="Augmented views per image in the new store (test supports average up to 5).")
@click.option("--baseline-head", "baseline_heads", multiple=True,
              help="Head spec run beside the fine-tuned head on the new store (repeatable), e.g. protonet.")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Images per embedding batch.")
@click.option("--workers", type=int, default=0, show_default=True, help="Decode worker processes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--threads", type=int, default=None, help="torch threads (default: all cores).")
@click.option("--quiet", is_flag=True, help="No progress bars or summaries.")
@click.option("--allow-overlap", is_flag=True,
              help="Run even when test classes are base, validation or backbone training classes (recorded).")
def fsor_finetune_command(**options: Any) -> None:
    """Fine-tune TANE / DNPG together with the backbone, re-extract the test data, run the FSOR protocol."""
    from bench.fsor import fold_head_options

    folded = fold_head_options([options["head"], *options["baseline_heads"]], options.pop("head_options"))
    options["head"], options["baseline_heads"] = folded[0], list(folded[1:])
    run_fsor_finetune(FsorFinetuneConfig(**options), echo=click.echo)


# --head-option is folded into the head specs before the config is built
_CLI_ONLY = {"head_options"}
assert {p.name for p in fsor_finetune_command.params} - _CLI_ONLY == {f.name for f in fields(FsorFinetuneConfig)}, \
    "CLI and FsorFinetuneConfig differ"


if __name__ == "__main__":
    from featstore.cli_support import run_cli

    run_cli(fsor_finetune_command, "bench fsor-finetune")

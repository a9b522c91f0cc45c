"""``bench fsor``: few-shot open-set recognition on a feature store (the episodic test protocol of TANE, Huang et
al., CVPR 2022, and DNPG, Zhang et al., ACM MM 2024; their test scripts: github.com/shiyuanh/TANE,
github.com/iCGY96/DNPG).

Every test episode is N known classes with K support and Q queries each plus M unknown classes with Q queries
each (defaults 5 / {1, 5} / 15 / 5: 75 known + 75 unknown queries), drawn from one split of the store by
:class:`featstore.episodes.EpisodeSampler`: episode i is a pure function of (seed, i), so every head, run and
machine sees the same episodes for one seed, and they are saved as ``episodes_<K>shot.npz`` beside the results.
When the store has cached views, each support image is the mean of ``views_per_support`` (default 5) of them,
chosen from the episode's random stream (the papers' 5 augmented support views); queries use the clean features.

Per episode and head: closed accuracy (argmax over the N known columns, on the known queries), AUROC (the head's
open score, unknown positive), OSCR (by its definition, Dhamija et al. 2018: ARPL's evaluation code gives about
0.2 points less, see :mod:`bench.metrics`), AUPR-out, FPR@95TPR (``fpr95tpr``: the fraction of unknowns accepted
as known at the threshold that accepts 95% of the knowns, the OOD literature's convention; lower is better), and
two F1 scores of the (N+1)-way decision: ``f1_macro`` (standard macro-F1 over all N + 1 labels) and ``f1_paper``
(the TANE / DNPG code's F1, a macro average over the labels that occur in the predictions only; see
:mod:`bench.metrics`). Every figure is the mean over episodes with a Student-t 95% CI, in percent. An episode
whose open scores (or logits) are not all finite, or that lacks what a metric needs, gets NaN for the metrics
that use them and is left out of their means: each metric records the episodes it averaged, and the notes say
how many were left out.

Class sets must be disjoint: the test split's classes against the meta-training split's (when a head is
meta-trained), against the backbone's training classes (``provenance["checkpoint_classes"]`` of the store, where
extraction recorded them) and against the validation split's (when thresholds or model selection use it); an
overlap is refused in one line naming the classes unless ``allow_overlap`` (``--allow-overlap``), which is then
recorded in the config and the notes. ``--val-split`` equal to ``--split`` is always refused (the threshold would
be fitted on the test episodes themselves).

Test classes without a split: ``split`` None (no ``--split``) takes the store's split ``test``; a store without
one is tested on every row of the classes its backbone was not trained on (``provenance["checkpoint_classes"]``,
matched by name), less the classes of the meta-training and validation splits where this run uses them, so the
default test set is disjoint from all three by construction; the first line of the output and a note
name them. A store that records neither is refused in one line naming ``--split`` and ``featstore split``.

``--open-ways 0`` runs plain N-way K-shot episodes (no unknown class): closed accuracy with its 95% CI only; no
open metric, threshold or ROC curve exists for them.

The open-set decision for F1 (the (N+1)-th label):

- a head that declares ``has_unknown_column`` (``logits_with_negative`` gives N + 1 columns, as TANE / DNPG) gets
  the papers' rule: the (N+1)-way argmax; no threshold;
- any other head flags a query as unknown when its open score exceeds a threshold. ``threshold`` picks the rule:
  ``"val"`` = the 95th percentile of the open scores of the *known* queries of validation episodes (same protocol
  on ``val_split``, as many as the test episodes up to 1000), i.e. 95% of the knowns are accepted, chosen without
  looking at the test split; ``"median"`` = per test episode, the median of its queries' open scores
  (transductive: it uses the protocol's 50% share of unknowns); ``"auto"`` (default) = ``"val"`` when the store
  has a usable ``val_split``, else ``"median"``. The rule used is written next to every result.

Heads come from the head registry (:mod:`heads.base`): ``--head NAME`` (repeatable) with ``--head-option
NAME.KEY=VALUE`` (constructor hyper-parameters, e.g. ``--head protonet --head-option protonet.metric=cosine``; a
bare ``KEY=VALUE`` goes to every head that takes KEY). The older spelling ``--head NAME:KEY=VALUE,...`` still
works and labels its results with the whole spec, so one head can run twice with different settings
(``--head protonet --head protonet:unknown_score=msp``). Constructor parameters ``device``, ``feat_dim`` (the
store's dimension) and ``n_base_classes`` (classes of ``train_split``) are filled in where the head takes them and
no option sets them. What a head declares decides what it is given (:func:`heads.base.check_needs` refuses, in
one line, a head whose needs this protocol cannot meet, e.g. spatial maps).

Meta-training: a head declaring ``needs_meta_training`` gets, once per shot setting and before any test episode,
``head.meta_train(MetaTrainData(...), seed=seed)`` (:class:`heads.base.MetaTrainData`) with

- ``features`` the store's ``[n, D]`` float32 tensor on the device, ``labels`` the store's ``[n]`` labels;
- ``train_rows`` / ``val_rows`` the rows of ``train_split`` / ``val_split`` (None when the store has no such
  split; model selection belongs on the validation split, never on test);
- ``base_classes`` the sorted classes of ``train_rows`` and ``base_weights`` their ``[B, D]`` rows of the
  backbone's classifier, read from the store's checkpoint (matched by class name), or, where that checkpoint is
  not at hand, the mean feature of each train class (a head may replace them with its own);
- ``support_views`` the store's ``[V, n, D]`` views (None when it has none); ``ways, shots, queries, open_ways``
  the test episodes' shape; ``progress`` unless ``--quiet``.

Test episodes then call ``fit(support [E, N*K, D], support_labels [E, N*K])`` and ``logits_with_negative`` plus
``open_score`` (heads with an unknown column) or ``logits_and_open_score(queries [E, m, D])``. A head of pooled
inputs (``[n, d]`` only) is fitted episode by episode.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import click
import numpy as np
import torch

from bench import metrics as M
from bench.kit import (
    check_head_options,
    head_options_for,
    make_head,
    markdown_table,
    mean_ci95,
    parse_head_options,
    parse_shots,
    parse_value,
    progress_bar,
    refuse_overlap,
    resolve_device,
    thread_limits,
    user_errors,
    write_results,
)
from featstore.atomic import write_atomic, write_with
from featstore.episodes import EpisodeBatch, EpisodeSampler
from featstore.errors import UserError
from heads.base import (
    EPISODES,
    POOLED,
    MetaTrainData,
    accepted_params,
    check_needs,
    check_options,
    class_means,
    head_class,
)

METRIC_KEYS = ("acc", "auroc", "f1_macro", "f1_paper", "oscr", "aupr_out", "fpr95tpr")
CLOSED_KEYS = ("acc",)
METRIC_NAMES = {"acc": "closed accuracy (known queries)", "auroc": "AUROC (unknown positive)",
                "f1_macro": "standard macro-F1 over N+1 labels", "f1_paper": "papers' F1 (macro over predicted "
                "labels only)", "oscr": "OSCR (Dhamija et al. 2018, by its definition)", "aupr_out": "AUPR-out",
                "fpr95tpr": "FPR@95TPR: unknowns accepted as known at the threshold that accepts 95% of the knowns "
                "(lower is better)"}
OSCR_NOTE = ("OSCR follows its definition (Dhamija et al., NeurIPS 2018). ARPL's evaluation code (compute_oscr, "
             "github.com/iCGY96/ARPL) misses one operating point each time a known follows an unknown in the score "
             "order and gives about 0.2 points less on 75 + 75-query episodes; CSSR's version of it "
             "(github.com/xyzedd/CSSR) ends the curve at (1, 1) and gives about 0.1 points more: compare published "
             "OSCR with that in mind")
THRESHOLD_RULES = ("auto", "val", "median")
CALIBRATION_EPISODES = 1000
PROTOCOL = "bench fsor"


# ---------------------------------------------------------------------------------------------------- heads
@dataclass(frozen=True)
class HeadSpec:
    """One ``--head``: the label its results go under, the registered name and its hyper-parameters."""

    label: str
    name: str
    options: dict


def parse_head_spec(spec: str) -> tuple[str, dict]:
    """``"name"`` or the older ``"name:key=value,key=value"`` -> (name, hyper-parameters)."""
    name, _, rest = spec.partition(":")
    params = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise UserError(f"bad head parameter {part!r} in {spec!r}; write --head NAME --head-option "
                            f"NAME.KEY=VALUE (or the older NAME:KEY=VALUE,KEY=VALUE)")
        params[key.strip().replace("-", "_")] = parse_value(value.strip())
    return name.strip(), params


def fold_head_options(specs: Sequence[str], head_options: Sequence[str]) -> list[str]:
    """``--head-option`` items folded into head specs: ``(["tane"], ["tane.epochs=4"])`` -> ``["tane:epochs=4"]``.

    For commands that record and reload a head by its spec (``bench fsor-finetune``); every option is checked as
    :func:`resolve_heads` does (an option a head does not take is a one-line error naming those it takes)."""
    parsed = parse_head_options(head_options)
    if not parsed:
        return list(specs)
    inline = [parse_head_spec(spec) for spec in specs]
    names = list(dict.fromkeys(name for name, _ in inline))
    with user_errors():
        classes = {name: head_class(name) for name in names}
    accepted = {n: accepted_params(c) + list(c.param_aliases) for n, c in classes.items()}
    check_head_options(names, parsed, accepted)
    out = []
    for name, params in inline:
        params = {**params, **head_options_for(name, parsed, accepted[name])}
        for key, value in params.items():
            if isinstance(value, (list, dict)) or "," in str(value):
                raise UserError(f"--head-option {name}.{key}: a list or a value with a comma cannot be written into "
                                f"a head spec; give a single value")
        text = ",".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in params.items())
        out.append(f"{name}:{text}" if text else name)
    return out


def resolve_heads(heads: Sequence[str], head_options: Sequence[str] = ()) -> list[HeadSpec]:
    """``--head`` values and ``--head-option`` items -> one :class:`HeadSpec` per ``--head``, every name and option
    checked against the registry (one-line UserError naming what the head takes)."""
    if len(set(heads)) != len(heads):
        raise UserError("the same --head is given twice")
    inline = {label: parse_head_spec(label) for label in heads}
    names = list(dict.fromkeys(name for name, _ in inline.values()))
    with user_errors():
        classes = {name: head_class(name) for name in names}
        for label, (name, params) in inline.items():
            check_options(classes[name], params, name)
    accepted = {n: accepted_params(c) + list(c.param_aliases) for n, c in classes.items()}
    parsed = parse_head_options(head_options)
    check_head_options(names, parsed, accepted)
    return [HeadSpec(label, name, {**head_options_for(name, parsed, accepted[name]), **params})
            for label, (name, params) in inline.items()]


def build_head(spec: HeadSpec, defaults: dict):
    """The head of ``spec``, with ``defaults`` (device, the store's feat_dim...) where it takes them."""
    return make_head(spec.name, spec.options, defaults)


def check_head_needs(head, *, meta_training: bool, hint: str = "") -> None:
    """One line (UserError) when the head needs what bench fsor cannot give (it gives episodes of pooled
    features, and runs meta-training where the store has the train split)."""
    with user_errors():
        check_needs(head, inputs=EPISODES, meta_training=meta_training, protocol=PROTOCOL, hint=hint)


def meta_train_head(head, *, store, features: torch.Tensor, labels: np.ndarray, train_split: str, val_split: str,
                    seed: int, ways: int, shots: int, queries: int, open_ways: int, device: torch.device,
                    quiet: bool) -> None:
    """Meta-training of a head with ``needs_meta_training`` on the store's train split (see the module
    docstring for what :class:`heads.base.MetaTrainData` carries)."""
    train_rows = store.split(train_split)
    val_rows = store.split(val_split) if val_split in store.split_names else None
    base_classes, inverse = np.unique(labels[train_rows], return_inverse=True)
    base_weights = checkpoint_base_weights(store, base_classes, features.device)
    if base_weights is None:  # no usable checkpoint classifier: the class-mean features stand in for its rows
        idx = torch.from_numpy(train_rows).to(features.device)
        base_weights, _ = class_means(features.index_select(0, idx),
                                      torch.from_numpy(inverse.reshape(-1)).to(features.device), len(base_classes))
    views = torch.from_numpy(store.load_views()).to(device) if store.layout.views else None
    data = MetaTrainData(features=features, labels=labels, train_rows=train_rows, val_rows=val_rows,
                         base_classes=base_classes, base_weights=base_weights, support_views=views, ways=ways,
                         shots=shots, queries=queries, open_ways=open_ways, progress=not quiet)
    try:
        head.meta_train(data, seed=seed)
    except ValueError as exc:  # an episode request the split cannot serve: a user error, not a crash
        raise UserError(f"head {head.head_name!r} meta-training on --train-split {train_split!r} / --val-split "
                        f"{val_split!r}: {' '.join(str(exc).split())}") from None


def checkpoint_base_weights(store, base_classes: np.ndarray, device: torch.device) -> torch.Tensor | None:
    """``[B, D]`` rows of the backbone's own classifier for the store classes ``base_classes`` (TANE's base memory:
    the pretraining classifier's weights of the base classes), matched by class name; None when the store's
    checkpoint is gone, changed, has no classifier, or was not trained on every one of these classes."""
    from featstore.checkpoint import classifier_rows

    found = classifier_rows(store, base_classes)
    if found is None:
        return None
    weight, _bias = found
    return torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)).to(device)


# ---------------------------------------------------------------------------------------------------- one batch
def evaluate_batch(logits: torch.Tensor, scores: torch.Tensor, query_labels: torch.Tensor, ways: int,
                   tau: float | None, rule: str | None, keys: Sequence[str] = METRIC_KEYS) -> dict[str, torch.Tensor]:
    """Per-episode metrics ``[E]`` of one batch (fractions, not percent).

    ``logits`` ``[E, m, N]`` or ``[E, m, N+1]`` (last column unknown), ``scores`` ``[E, m]`` open scores,
    ``query_labels`` ``[E, m]`` (-1 unknown). ``rule``: ``"argmax"`` (N+1 columns), ``"val"`` (score > tau) or
    ``"median"`` (score > the episode's median score); only the F1 keys use it (None for closed episodes).
    """
    with single_intraop_thread(logits.device.type == "cpu"):  # [E, m] ops: small, barrier-bound when threaded
        return _evaluate_batch(logits, scores, query_labels, ways, tau, rule, keys)


def _open_predictions(logits, scores, closed, ways, tau, rule):
    if rule == "argmax":
        return logits.argmax(-1)
    if rule == "val":
        return M.open_predictions(closed, scores > tau, ways)
    if rule == "median":
        return M.open_predictions(closed, scores > scores.median(dim=-1, keepdim=True).values, ways)
    raise ValueError(f"unknown decision rule {rule!r}")


def _evaluate_batch(logits, scores, query_labels, ways, tau, rule, keys):
    y = query_labels.to(logits.device)
    unknown = y < 0
    closed = logits[..., :ways].argmax(-1)
    open_pred = None
    if {"f1_macro", "f1_paper"} & set(keys):
        open_pred = _open_predictions(logits, scores, closed, ways, tau, rule)
    fns = {
        "acc": lambda: M.batched_closed_accuracy(closed, y),
        "auroc": lambda: M.batched_auroc(scores, unknown),
        "f1_macro": lambda: M.batched_open_macro_f1(open_pred, y, ways),
        "f1_paper": lambda: M.batched_paper_f1(open_pred, y, ways),
        "oscr": lambda: M.batched_oscr(scores, unknown, closed == y),
        "aupr_out": lambda: M.batched_aupr(scores, unknown),
        "fpr95tpr": lambda: M.batched_fpr_at_95tpr(scores, unknown),
    }
    # an episode with a non-finite open score or logit has no ranking or decision to measure: NaN, left out of
    # the means (and counted) rather than ranked wherever the sort puts a NaN
    bad_logits = ~torch.isfinite(logits).flatten(1).all(-1)
    bad_scores = ~torch.isfinite(scores).all(-1) | bad_logits
    bad = {"acc": bad_logits, "f1_macro": bad_logits if rule == "argmax" else bad_scores}
    bad["f1_paper"] = bad["f1_macro"]
    out = {}
    for k in keys:
        value = fns[k]()
        invalid = bad.get(k, bad_scores).to(value.device)
        out[k] = torch.where(invalid, torch.full_like(value, float("nan")), value)
    return out


def _head_outputs(head, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if type(head).has_unknown_column:  # [.., N+1]: the unknown column for the (N+1)-way argmax
        return head.logits_with_negative(queries), head.open_score(queries)
    return head.logits_and_open_score(queries)


def _run_head(head, support: torch.Tensor, support_labels: torch.Tensor, queries: torch.Tensor, ways: int):
    support_labels = support_labels.to(support.device)
    try:
        with torch.no_grad():
            if type(head).input_kind == POOLED:  # [n, d] only: one fit per episode
                parts = [_head_outputs(head.fit(support[e], support_labels[e]), queries[e])
                         for e in range(len(support))]
                logits, scores = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
            else:
                head.fit(support, support_labels)
                logits, scores = _head_outputs(head, queries)
    except ValueError as exc:  # hyper-parameters that do not fit these episodes: the head's own one-line reason
        raise UserError(f"head {head.head_name!r} on {ways}-way {support.shape[-2] // ways}-shot episodes: "
                        f"{' '.join(str(exc).split())}") from None
    _check_columns(head, logits, ways)
    return logits, scores.to(logits.dtype)


def _check_columns(head, logits: torch.Tensor, ways: int) -> None:
    expected = ways + 1 if type(head).has_unknown_column else ways
    if logits.shape[-1] != expected:
        raise UserError(f"head {head.head_name!r} returned {logits.shape[-1]} logit columns for a {ways}-way "
                        f"episode (expected {expected}"
                        + (", the last for unknown)" if type(head).has_unknown_column else ")"))


def default_chunk(device: torch.device) -> int:
    """Episodes per head call: small on a CPU so that the gathered features stay in the L2 cache (measured on
    2 cores: 8 episodes of 150 x 640 floats run 2.5x faster than 500), everything at once on a GPU."""
    return 8 if torch.device(device).type == "cpu" else 1 << 30


@contextlib.contextmanager
def single_intraop_thread(active: bool):
    """torch intra-op threads = 1 inside (restored after). The episode loop on a CPU runs many small ops (a chunk
    of episodes, [E, m] metrics); with 2+ OpenMP threads each op ends in a barrier, and on a shared machine a
    descheduled thread stalls every barrier (measured on 2 busy cores: 3000 ProtoNet episodes in 0.9 s with 1
    thread, 10.5 s with 2; 0.4 s vs 0.6 s when the cores were idle). Meta-training keeps the configured threads."""
    if not active:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_heads_chunked(heads: dict, data: "EpisodeFeatures", batch: EpisodeBatch, ways: int, chunk: int):
    """{label: (logits [E, m, C], scores [E, m])} for every head on one batch, gathering features ``chunk``
    episodes at a time (each head is fitted on each chunk's support). On a CPU this runs single-threaded
    (see :func:`single_intraop_thread`)."""
    parts: dict = {label: ([], []) for label in heads}
    with single_intraop_thread(data.device.type == "cpu"):
        for lo in range(0, len(batch), chunk):
            sub = batch if chunk >= len(batch) else _slice(batch, lo, lo + chunk)
            sf, qf = data.gather(sub)
            for label, head in heads.items():
                logits, scores = _run_head(head, sf, sub.support_labels, qf, ways)
                parts[label][0].append(logits)
                parts[label][1].append(scores)
    return {label: (torch.cat(lg), torch.cat(sc)) for label, (lg, sc) in parts.items()}


def _slice(batch: EpisodeBatch, lo: int, hi: int) -> EpisodeBatch:
    return EpisodeBatch(**{f.name: (None if getattr(batch, f.name) is None else getattr(batch, f.name)[lo:hi])
                           for f in fields(batch)})


class EpisodeFeatures:
    """Features (and a split's views) in memory, gathered by episode batches.

    ``features`` may be kept in the store's float16: a gather then reads half the bytes and converts only the rows
    an episode batch needs, once (float16 -> float32 is exact, so the numbers are those of a float32 copy)."""

    def __init__(self, store, rows: np.ndarray | None, vps: int, device: torch.device,
                 features: torch.Tensor | None = None):
        self.features = torch.from_numpy(store.load_features()).to(device) if features is None else features
        self.views = self.row_map = None
        if vps:
            self.views = torch.from_numpy(store.load_views(rows)).to(device)
            row_map = torch.full((store.n,), -1, dtype=torch.long)
            row_map[torch.from_numpy(rows)] = torch.arange(len(rows))
            self.row_map = row_map.to(device)
        self.device = device

    def gather(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(support [E, N*K, D], query [E, m, D])`` float32 features of the batch."""
        if self.views is not None and batch.support_views is not None and batch.support_views.shape[-1]:
            return (batch.support_features(self.features, self.views, self.row_map).float(),
                    batch.query_features(self.features).float())
        # support and query rows in one index_select
        s, q = batch.support.to(self.features.device), batch.query.to(self.features.device)
        rows = torch.cat([s.reshape(-1), q.reshape(-1)])
        x = self.features.index_select(0, rows).float()
        d = x.shape[-1]
        return x[:s.numel()].reshape(*s.shape, d), x[s.numel():].reshape(*q.shape, d)


# ---------------------------------------------------------------------------------------------------- class sets
ALLOW_OVERLAP = "--allow-overlap"


def refuse_or_note_overlap(a: Sequence[int], b: Sequence[int], what_a: str, what_b: str, names: Sequence[str],
                           allow_overlap: bool, notes: list[str]) -> None:
    """UserError naming the classes ``a`` and ``b`` share (and the flag that allows it); with ``allow_overlap`` the
    same line goes into ``notes`` instead."""
    if not allow_overlap:
        refuse_overlap(a, b, what_a, what_b, names=names, allow_flag=ALLOW_OVERLAP)
        return
    try:
        refuse_overlap(a, b, what_a, what_b, names=names)
    except UserError as exc:
        notes.append(f"{ALLOW_OVERLAP}: {exc}; these figures are not on unseen classes")


def check_class_sets(store, rows: np.ndarray, *, split: str | None, train_split: str | None, val_split: str | None,
                     allow_overlap: bool, notes: list[str]) -> None:
    """Refuse test classes (those of ``rows``, split ``split``) that are also meta-training classes (``train_split``,
    None when no head is meta-trained), the backbone's training classes (the store's
    ``provenance["checkpoint_classes"]``, matched by name, where extraction recorded them) or validation classes
    (``val_split``, None when nothing uses it); ``val_split == split`` is refused whatever ``allow_overlap``.
    ``split`` None: the default test classes (:func:`unseen_test_rows`)."""
    labels, names = store.labels, list(store.classes)
    test = np.unique(labels[rows])
    if val_split is not None and split is not None and val_split == split:
        raise UserError(f"--val-split {val_split!r} is the test split: the F1 threshold and model selection would "
                        f"be fitted on the test episodes themselves; give another --val-split, or --threshold median")
    what = f"test split {split!r}" if split is not None else "the default test classes"
    if train_split is not None:
        refuse_or_note_overlap(test, np.unique(labels[store.split(train_split)]), what,
                               f"meta-training split {train_split!r}", names, allow_overlap, notes)
    seen = [str(c) for c in (store.provenance or {}).get("checkpoint_classes") or []]
    if seen:
        index = {name: k for k, name in enumerate(names)}
        refuse_or_note_overlap(test, [index[c] for c in seen if c in index], what,
                               "the backbone's training classes (provenance checkpoint_classes)", names,
                               allow_overlap, notes)
    if val_split is not None:
        refuse_or_note_overlap(test, np.unique(labels[store.split(val_split)]), what,
                               f"validation split {val_split!r}", names, allow_overlap, notes)


DEFAULT_SPLIT = "test"
UNSEEN = "the classes the backbone was not trained on (provenance checkpoint_classes)"  # the sampler's name


def _class_names(classes: Sequence[int], names: Sequence[str], shown: int = 5) -> str:
    more = f" and {len(classes) - shown} more" if len(classes) > shown else ""
    return ", ".join(names[c] for c in classes[:shown]) + more


def unseen_test_rows(store, leave_out: Sequence[tuple[str, str]] = ()) -> tuple[np.ndarray, list[int], str]:
    """The test set of a store without a ``test`` split: ``(rows, classes, note)``, every row of the classes its
    backbone was not trained on (``provenance["checkpoint_classes"]``, matched by class name), less the classes of
    the splits in ``leave_out`` (``(what, split name)`` pairs: the meta-training and validation splits this run
    uses); ``note`` says which. A one-line UserError naming ``--split`` and ``featstore split`` when the store
    records no such classes, or none is left."""
    recorded = [str(c) for c in (store.provenance or {}).get("checkpoint_classes") or []]
    hint = (f"pass --split NAME, or make a test split with `featstore split {store.path} {DEFAULT_SPLIT} --rule ...` "
            f"(or --of / --exclude)")
    if not recorded:
        raise UserError(f"store {store.path} has no split {DEFAULT_SPLIT!r} (it has: "
                        f"{', '.join(store.split_names) or 'none'}) and records no classes its backbone was trained "
                        f"on (provenance checkpoint_classes) to test on the others; {hint}")
    names, labels = list(store.classes), store.labels
    seen = set(recorded)
    matched = len(seen & set(names))
    test = [int(c) for c in np.unique(labels[labels >= 0]) if names[c] not in seen]
    dropped = []
    for what, name in leave_out:
        other = set(np.unique(labels[store.split(name)]).tolist())
        before = len(test)
        test = [c for c in test if c not in other]
        if len(test) < before:
            dropped.append(f"the {before - len(test)} of {what} {name!r}")
    if not test:
        raise UserError(f"the backbone was trained on every class of store {store.path}"
                        + (f" not in {' or '.join(dropped)}" if dropped else "")
                        + f" (provenance checkpoint_classes); nothing is left to test on: {hint}")
    note = (f"no --split and the store has no split {DEFAULT_SPLIT!r}: the test episodes are drawn from the "
            f"{len(test)} classes the backbone was not trained on (provenance checkpoint_classes: {len(seen)} "
            f"classes, {matched} of them in this store)" + (f", less {' and '.join(dropped)}" if dropped else "")
            + f": {_class_names(test, names, shown=20)}")
    return np.flatnonzero(np.isin(labels, test)), test, note


# ---------------------------------------------------------------------------------------------------- driver
def _fmt(mean: float, half: float) -> str:
    return f"{mean:.3f} ± {half:.3f}"


def _positive(values: Sequence[tuple[str, int]]) -> None:
    for what, value in values:
        if value < 1:
            raise UserError(f"{what} must be at least 1, not {value}")


def run_fsor(store_path: str | os.PathLike, *, split: str | None = None, ways: int = 5,
             shots: Sequence[int] | str = (1, 5), open_ways: int = 5, queries: int = 15, episodes: int = 3000,
             heads: Sequence[str] = ("protonet",),
             head_options: Sequence[str] = (), seed: int = 0, episode_batch: int = 500, device: str = "cpu",
             threads: int | None = None, out: str | os.PathLike | None = None, views_per_support: int | None = None,
             threshold: str = "auto", train_split: str = "train", val_split: str = "val", quiet: bool = False,
             chunk: int | None = None, echo: Callable[[str], None] | None = None,
             ready_heads: Mapping[str, Any] | None = None, batch: int | None = None, allow_overlap: bool = False,
             notes: Sequence[str] = ()) -> dict:
    """Run the FSOR protocol for every head and shot setting; return the metrics (and write them under ``out``).

    Returns ``{"heads": {label: {"<K>-shot": {metric: {"mean", "ci95", "episodes"}, "episodes": ..., "decision":
    ..., "threshold": ...}}}, "unit": "percent", "notes": [...], ...}`` (closed episodes, ``open_ways=0``: accuracy
    only). ``metric["episodes"]`` is the number of episodes that metric averaged (its finite values), the entry's
    ``"episodes"`` the fewest over its metrics, and ``"dropped"`` (only where any) ``{metric: episodes left
    out}``; ``config["episodes"]`` is the number run. See the module docstring for the
    protocol, the metrics and the F1 decision rule. ``heads`` / ``head_options``: ``--head`` / ``--head-option``
    values; ``shots``: a list, or ``"1,5"`` / ``"1..20"``; ``threads``: torch, BLAS and FAISS threads (None:
    leave them); ``batch``: the older name of ``episode_batch``; ``split`` None: the store's split ``test``, or
    where it has none the classes its backbone was not trained on (module docstring).

    ``ready_heads``: ``{label: head}`` of heads trained elsewhere (a head fine-tuned together with the backbone of
    this store and loaded from that checkpoint), on ``device``. They run beside ``heads`` under their label, as
    they are: never built from a spec and never meta-trained here (the store's train split is not used for them).

    ``allow_overlap``: run even when the test classes overlap the meta-training, validation or backbone training
    classes (each overlap is then recorded in the notes); ``notes``: the caller's lines, put first in the notes.
    """
    if batch is not None:
        episode_batch = batch
    shots = tuple(parse_shots(shots if isinstance(shots, str) else list(shots)))
    from featstore.store import FeatureStore

    store = FeatureStore.open(store_path)
    with thread_limits(threads, work=episode_work(store.dim, int(episode_batch), ways, open_ways, queries)):
        return _run_fsor(store_path, store, split=split, ways=ways, shots=shots, open_ways=open_ways, queries=queries,
                         episodes=episodes, heads=tuple(heads), head_options=tuple(head_options), seed=seed,
                         episode_batch=int(episode_batch), device=device, threads=threads, out=out,
                         views_per_support=views_per_support, threshold=threshold, train_split=train_split,
                         val_split=val_split, quiet=quiet, chunk=chunk, echo=echo, ready_heads=ready_heads,
                         allow_overlap=bool(allow_overlap), extra_notes=tuple(notes))


def episode_work(dim: int, episode_batch: int, ways: int, open_ways: int, queries: int) -> float:
    """Multiply-adds of the largest product of one episode batch, ``[E, N, d] x [E, d, (N + M) * Q]`` (prototypes
    against queries), which :func:`featstore.runtime.default_threads` turns into a thread count."""
    return float(episode_batch) * max(ways, 1) * (ways + open_ways) * queries * dim


def _run_fsor(store_path, store, *, split, ways, shots, open_ways, queries, episodes, heads, head_options, seed,
              episode_batch, device, threads, out, views_per_support, threshold, train_split, val_split, quiet,
              chunk, echo, ready_heads, allow_overlap, extra_notes) -> dict:
    batch = episode_batch
    ready = dict(ready_heads or {})
    _positive((("--ways", ways), ("--queries", queries), ("--episodes", episodes), ("--episode-batch", batch)))
    if open_ways < 0:
        raise UserError(f"--open-ways must be 0 (closed N-way K-shot episodes) or more, not {open_ways}")
    closed_only = open_ways == 0
    keys = CLOSED_KEYS if closed_only else METRIC_KEYS
    if not heads and not ready:
        raise UserError("give at least one --head")
    if threshold not in THRESHOLD_RULES:
        raise UserError(f"--threshold must be one of {', '.join(THRESHOLD_RULES)}, not {threshold!r}")
    dev = resolve_device(device)
    chunk = default_chunk(dev) if chunk is None else int(chunk)
    if chunk < 1:
        raise UserError(f"chunk must be at least 1, not {chunk}")
    specs = resolve_heads(heads, head_options)  # fail early (before reading the store) on a head or option
    labels_all = tuple(s.label for s in specs) + tuple(ready)
    if len(set(labels_all)) != len(labels_all):
        raise UserError("the same --head is given twice")

    if split is None and DEFAULT_SPLIT in store.split_names:
        split = DEFAULT_SPLIT
    if split is not None:
        rows = store.split(split)
    has_train = train_split in store.split_names
    train_hint = ("" if has_train else f"store {store.path} has no split {train_split!r}; its splits: "
                  f"{', '.join(store.split_names) or 'none'}; give --train-split (and --val-split for model "
                  f"selection), or make them with `featstore split`")
    for spec in specs:
        check_head_needs(head_class(spec.name), meta_training=has_train, hint=train_hint)
    for head in ready.values():
        check_head_needs(head, meta_training=True)  # trained elsewhere
    head_defaults: dict[str, Any] = {"device": dev, "feat_dim": store.dim}
    if has_train:
        head_defaults["n_base_classes"] = len(np.unique(store.labels[store.split(train_split)]))
    for spec in specs:  # and on a bad hyper-parameter value
        build_head(spec, head_defaults)
    n_views = store.layout.views
    vps = (min(5, n_views) if n_views else 0) if views_per_support is None else int(views_per_support)
    val_rows = None
    if threshold in ("auto", "val") and not closed_only:
        if val_split in store.split_names:
            val_rows = store.split(val_split)
        elif threshold == "val":
            raise UserError(f"--threshold val needs a split {val_split!r}; store {store.path} has: "
                            f"{', '.join(store.split_names) or 'none'} (use --threshold median or --val-split)")
    meta_training = has_train and any(head_class(s.name).needs_meta_training for s in specs)
    head_types = [head_class(s.name) for s in specs] + [type(h) for h in ready.values()]
    calibrated = val_rows is not None and any(not c.has_unknown_column for c in head_types)
    uses_val = calibrated or (meta_training and val_split in store.split_names)
    notes: list[str] = list(extra_notes)
    test_classes = None
    if split is None:  # no test split: the classes the backbone never saw, less the splits this run uses
        used = ([("meta-training split", train_split)] if meta_training else []) + (
            [("validation split", val_split)] if uses_val else [])
        rows, test_classes, note = unseen_test_rows(store, used)
        notes.append(note)
    where = f"split {split!r}" if split is not None else UNSEEN
    samplers = {k: EpisodeSampler(store.labels, rows, ways=ways, shots=k, queries=queries, open_ways=open_ways,
                                  seed=seed, n_views=n_views, views_per_support=vps, name=where,
                                  class_names=store.classes) for k in shots}
    check_class_sets(store, rows, split=split, train_split=train_split if meta_training else None,
                     val_split=val_split if uses_val else None, allow_overlap=allow_overlap, notes=notes)
    if closed_only:
        notes.append("closed episodes (--open-ways 0): accuracy only; no open score, F1 decision or ROC curve")
    else:
        notes.append(OSCR_NOTE)
    t_start = time.perf_counter()
    data = EpisodeFeatures(store, rows if val_rows is None else np.union1d(rows, val_rows), vps, dev)
    labels = store.labels

    results: dict[str, dict] = {label: {} for label in labels_all}
    pooled: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    episode_files = {}
    bar = progress_bar(episodes * len(shots), "fsor", quiet=quiet, unit="ep")
    try:
        for k in shots:
            sampler = samplers[k]
            head_objs, rules, taus = {}, {}, {}
            for spec in specs:
                head = build_head(spec, head_defaults)
                if type(head).needs_meta_training:
                    meta_train_head(head, store=store, features=data.features, labels=labels,
                                    train_split=train_split, val_split=val_split, seed=seed, ways=ways, shots=k,
                                    queries=queries, open_ways=open_ways, device=dev, quiet=quiet)
                head_objs[spec.label] = head
            head_objs.update(ready)  # trained elsewhere: evaluated as they are
            for label, head in head_objs.items():
                if closed_only:
                    rules[label], taus[label] = None, None
                elif type(head).has_unknown_column:
                    rules[label], taus[label] = "argmax", None
                else:
                    rules[label], taus[label] = _calibrate(head, threshold, store, val_rows, data, ways, k, queries,
                                                           open_ways, seed, n_views, vps, episodes, batch, chunk,
                                                           val_split, notes)
            per_ep = {label: {m: [] for m in keys} for label in labels_all}
            scores_all = {label: [] for label in labels_all}
            unknown_all, support_rows, query_rows, cls_all, open_all = [], [], [], [], []
            first_query_labels = None
            for b in sampler.batches(episodes, batch):
                b = b.to(dev)
                if first_query_labels is None:
                    first_query_labels = b.query_labels[0].cpu().numpy().astype(np.int8)
                outs = run_heads_chunked(head_objs, data, b, ways, chunk)
                unknown_all.append(b.is_unknown.cpu().numpy())
                support_rows.append(b.support.cpu().numpy().astype(np.int32))
                query_rows.append(b.query.cpu().numpy().astype(np.int32))
                cls_all.append(b.classes.cpu().numpy().astype(np.int32))
                open_all.append(b.open_classes.cpu().numpy().astype(np.int32))
                for label, (logits, scores) in outs.items():
                    got = evaluate_batch(logits, scores, b.query_labels, ways, taus[label], rules[label], keys=keys)
                    for m in keys:
                        per_ep[label][m].append(got[m].cpu().numpy())
                    scores_all[label].append(scores.float().cpu().numpy())
                bar.update(len(b))
            unknown = np.concatenate(unknown_all)
            episode_files[k] = dict(support=np.concatenate(support_rows), query=np.concatenate(query_rows),
                                    classes=np.concatenate(cls_all), open_classes=np.concatenate(open_all),
                                    query_labels=first_query_labels)
            for label in labels_all:
                entry: dict[str, Any] = {}
                for m in keys:
                    values = np.concatenate(per_ep[label][m]) * 100
                    finite = values[np.isfinite(values)]
                    mean, half = mean_ci95(finite) if finite.size else (float("nan"), float("nan"))
                    entry[m] = {"mean": mean, "ci95": half, "episodes": int(finite.size)}
                if not closed_only:
                    entry["decision"] = _rule_text(rules[label], taus[label])
                    entry["threshold"] = taus[label]
                entry["episodes"] = min(entry[m]["episodes"] for m in keys)
                dropped = {m: episodes - entry[m]["episodes"] for m in keys if entry[m]["episodes"] < episodes}
                if dropped:
                    entry["dropped"] = dropped
                    notes.append(f"{label}, {k}-shot: " + ", ".join(f"{m} {n}" for m, n in dropped.items())
                                 + f" of {episodes} episodes left out of the means (a non-finite value: open scores "
                                   "or logits not finite, or no known or unknown query)")
                results[label][f"{k}-shot"] = entry
                pooled[(label, k)] = (np.concatenate(scores_all[label]), unknown)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t_start

    config = {"store": str(store_path), "split": split, "ways": ways, "shots": list(shots), "open_ways": open_ways,
              "queries": queries, "episodes": episodes, "heads": [s.label for s in specs] + list(ready),
              "head_options": list(head_options), "seed": seed, "episode_batch": batch, "device": str(dev),
              "threads": threads, "chunk": min(chunk, batch), "views_per_support": vps, "store_views": n_views,
              "threshold": threshold, "train_split": train_split, "val_split": val_split,
              "allow_overlap": allow_overlap, "head_params": {s.label: s.options for s in specs}}
    if test_classes is not None:
        config["test_classes"] = [store.classes[c] for c in test_classes]
    if ready:
        config["ready_heads"] = list(ready)
    metrics = {"unit": "percent", "heads": results,
               "metric_names": {k: METRIC_NAMES[k] for k in keys},
               "f1_note": "f1_macro is the standard macro-F1 over all N+1 labels; f1_paper is the TANE/DNPG code's "
                          "F1, averaged only over labels that occur in the predictions",
               "notes": notes, "seconds": elapsed}
    if closed_only:
        del metrics["f1_note"]
    table, md_notes = _markdown(results, labels_all, shots, closed_only)
    head_line = (f"{ways}-way {'/'.join(map(str, shots))}-shot, "
                 + ("closed episodes (no unknown class)" if closed_only else f"{open_ways} open classes")
                 + f", {queries} queries, {episodes} episodes on "
                 + (f"split {split!r}" if test_classes is None else
                    f"the {len(test_classes)} classes the backbone was not trained on "
                    f"({_class_names(test_classes, store.classes)}; provenance checkpoint_classes)")
                 + f" of {store.path} (seed {seed}, "
                   f"{vps} support views); mean ± 95% CI over episodes, in percent")
    if out is not None:
        out = Path(out)
        path = write_results(out, "fsor", config, metrics, store=store)
        md = ["# bench fsor", "", head_line, "", table, *md_notes, *[f"- {n}" for n in notes], ""]
        write_atomic(out / "results.md", "\n".join(md))
        written = [str(path), str(out / "results.md")]
        if not closed_only:
            write_with(out / "roc.png", lambda p: _plot_roc(p, pooled, labels_all, shots))
            written.append(str(out / "roc.png"))
        for k, arrays in episode_files.items():
            write_with(out / f"episodes_{k}shot.npz", lambda p, a=arrays: np.savez_compressed(p, **a))
        if echo:
            echo(f"{head_line}\n\n{table}\nwrote {', '.join(written[:-1])} and {written[-1]}")
    elif echo:
        echo(f"{head_line}\n\n{table}")
    return metrics


def _markdown(results: dict, labels: Sequence[str], shots: Sequence[int], closed_only: bool) -> tuple[str, list]:
    if closed_only:
        rows = [{"head": label, "shots": k, "acc": _fmt(results[label][f"{k}-shot"]["acc"]["mean"],
                                                       results[label][f"{k}-shot"]["acc"]["ci95"])}
                for label in labels for k in shots]
        table = markdown_table(rows, {"head": "head", "shots": "K", "acc": "accuracy"})
        return table, ["- accuracy: argmax over the N classes of each closed N-way K-shot episode."]
    rows = []
    for label in labels:
        for k in shots:
            e = results[label][f"{k}-shot"]
            rows.append({"head": label, "shots": k, **{m: _fmt(e[m]["mean"], e[m]["ci95"]) for m in METRIC_KEYS},
                         "decision": e["decision"]})
    columns = {"head": "head", "shots": "K", "acc": "accuracy", "auroc": "AUROC", "f1_macro": "macro-F1 (N+1)",
               "f1_paper": "paper F1", "oscr": "OSCR", "aupr_out": "AUPR-out", "fpr95tpr": "FPR@95TPR",
               "decision": "F1 decision"}
    notes = [
        "- accuracy: argmax over the N known columns, on the known queries; AUROC: the head's open score, "
        "unknown positive.",
        "- macro-F1 (N+1): standard macro-F1 over all N + 1 labels (never-predicted labels score 0).",
        "- paper F1: the TANE / DNPG code's F1, macro-averaged only over labels that occur in the predictions "
        "(not comparable with the standard one).",
        "- F1 decision: `argmax` = (N+1)-way argmax of a head with an unknown column; `val` = open score above "
        "the 95th percentile of known validation queries' scores; `median` = above the episode's median.",
        "- FPR@95TPR: the fraction of unknown queries accepted as known at the threshold that accepts 95% of the "
        "known queries (the out-of-distribution literature's convention); lower is better."]
    return markdown_table(rows, columns), notes


def _rule_text(rule: str, tau: float | None) -> str:
    if rule == "val":
        return f"val (threshold {tau:.4g})"
    return rule


def _calibrate(head, rule: str, store, val_rows, data: EpisodeFeatures, ways: int, shots: int, queries: int,
               open_ways: int, seed: int, n_views: int, vps: int, episodes: int, batch: int, chunk: int,
               val_split: str, notes: list[str]):
    """(rule, tau) for a head without an unknown column: tau = 95th percentile of known val queries' scores."""
    if rule == "median" or val_rows is None:
        if rule == "auto":
            msg = f"no split {val_split!r}: the F1 decision of N-column heads uses the per-episode median rule"
            if msg not in notes:
                notes.append(msg)
        return "median", None
    try:
        sampler = EpisodeSampler(store.labels, val_rows, ways=ways, shots=shots, queries=queries, open_ways=open_ways,
                                 seed=seed, n_views=n_views, views_per_support=vps, name=f"split {val_split!r}",
                                 class_names=store.classes)
    except UserError as exc:
        if rule == "val":
            raise
        notes.append(f"split {val_split!r} cannot give {shots}-shot episodes ({exc}); median rule used")
        return "median", None
    known_scores = []
    for b in sampler.batches(min(CALIBRATION_EPISODES, episodes), batch):
        b = b.to(data.device)
        _, scores = run_heads_chunked({"h": head}, data, b, ways, chunk)["h"]
        known_scores.append(scores[~b.is_unknown.to(scores.device)].double().cpu())
    known = torch.cat(known_scores)
    finite = known[torch.isfinite(known)]
    if finite.numel() < known.numel():
        notes.append(f"head {head.head_name!r}, {shots}-shot: {known.numel() - finite.numel()} of {known.numel()} "
                     f"known validation scores not finite, left out of the threshold")
    if not finite.numel():
        raise UserError(f"head {head.head_name!r} gave no finite open score on the {shots}-shot validation episodes "
                        f"of split {val_split!r}; use --threshold median")
    tau = float(torch.quantile(finite, 0.95))
    return "val", tau


def _plot_roc(path: Path, pooled: dict, heads: Sequence[str], shots: Sequence[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shots), figsize=(5.2 * len(shots), 5.0), squeeze=False)
    for ax, k in zip(axes[0], shots):
        for label in heads:
            scores, unknown = pooled[(label, k)]
            s, u = scores.reshape(-1), unknown.reshape(-1)
            finite = np.isfinite(s)
            s, u = s[finite], u[finite]
            if not (u.any() and (~u).any()):
                continue
            fpr, tpr = M.roc_points(s, u)
            if len(fpr) > 4000:  # thin the curve for the plot only
                idx = np.unique(np.linspace(0, len(fpr) - 1, 4000).astype(int))
                fpr, tpr = fpr[idx], tpr[idx]
            area = M.auroc(s, u)
            ax.plot(fpr, tpr, lw=1.5, label=f"{label} ({100 * area:.1f})")
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        ax.set_title(f"{k}-shot, all episodes pooled", fontsize=10)
        ax.set_xlabel("FPR (knowns flagged unknown)")
        ax.set_ylabel("TPR (unknowns detected)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.legend(loc="lower right", fontsize=7, title="head (pooled AUROC, %)", title_fontsize=7)
    fig.suptitle("FSOR: ROC of the open score (unknown = positive)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- command
def _shots(ctx, param, value: str) -> list[int]:
    return parse_shots(value)


@click.command("fsor")
@click.option("--store", "store", required=True, type=click.Path(), help="The feature store.")
@click.option("--split", default=None,
              help="Split the test episodes are drawn from [default: 'test'; where the store has none, every class "
                   "its backbone was not trained on (provenance checkpoint_classes), less the train / val splits "
                   "in use].")
@click.option("--ways", type=int, default=5, show_default=True, help="Known classes per episode (N).")
@click.option("--shots", default="1,5", show_default=True, callback=_shots,
              help="Support examples per class (K): a list such as 1,5, or a range such as 1..20 (the canonical "
                   "1, 2, 5, 10, 20 inside it).")
@click.option("--open-ways", type=int, default=5, show_default=True,
              help="Unknown classes per episode (M); 0 = closed N-way K-shot episodes (accuracy only).")
@click.option("--queries", type=int, default=15, show_default=True, help="Queries per class (known and unknown).")
@click.option("--episodes", type=int, default=3000, show_default=True, help="Test episodes per shot setting.")
@click.option("--head", "heads", multiple=True, default=("protonet",), show_default=True,
              help="A registered head (repeat for several). The older NAME:KEY=VALUE,... also works and labels the "
                   "results with the whole spec.")
@click.option("--head-option", "head_options", multiple=True, metavar="NAME.KEY=VALUE",
              help="A hyper-parameter of head NAME (repeatable); a bare KEY=VALUE goes to every head that takes it.")
@click.option("--seed", type=int, default=0, show_default=True, help="Protocol seed: episode i = f(seed, i).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Write results.json, results.md, roc.png and the episode lists into this folder.")
@click.option("--episode-batch", "--batch", "episode_batch", type=int, default=500, show_default=True,
              help="Episodes sampled and evaluated per tensor batch (--batch is the older name).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--threads", type=int, default=None,
              help="Threads of torch, BLAS and FAISS [default: leave them as they are].")
@click.option("--views-per-support", type=int, default=None,
              help="Cached views averaged per support image [default: 5 when the store has views, else 0].")
@click.option("--threshold", type=click.Choice(THRESHOLD_RULES), default="auto", show_default=True,
              help="F1 decision of heads without an unknown column: val = 95% of known val queries accepted, "
                   "median = per-episode median, auto = val if the store has a val split.")
@click.option("--train-split", default="train", show_default=True, help="Split for meta-training heads.")
@click.option("--val-split", default="val", show_default=True, help="Split for model selection and thresholds.")
@click.option("--allow-overlap", is_flag=True,
              help="Run even when the test classes overlap the meta-training, validation or backbone training "
                   "classes (recorded in results.json and results.md).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def fsor_command(store, split, ways, shots, open_ways, queries, episodes, heads, head_options, seed, out,
                 episode_batch, device, threads, views_per_support, threshold, train_split, val_split,
                 allow_overlap, quiet) -> None:
    """Few-shot open-set recognition: N-way K-shot episodes with M unknown classes, per-episode accuracy,
    AUROC and F1 (standard and the papers' variant), mean and 95% CI; --open-ways 0 for closed episodes."""
    run_fsor(store, split=split, ways=ways, shots=shots, open_ways=open_ways, queries=queries, episodes=episodes,
             heads=heads, head_options=head_options, seed=seed, episode_batch=episode_batch, device=device,
             threads=threads, out=out, views_per_support=views_per_support, threshold=threshold,
             train_split=train_split, val_split=val_split, allow_overlap=allow_overlap, quiet=quiet,
             echo=click.echo)


if __name__ == "__main__":
    from featstore.cli_support import run_cli

    run_cli(fsor_command, "bench fsor")

"""Metrics shared by every bench: closed-set accuracy, open-set detection and open-set classification.

Conventions (one everywhere):

- ``scores`` are *open* scores: **higher = more likely unknown**; ``is_unknown`` is the positive class of AUROC
  and AUPR-out. FPR@95TPR follows the out-of-distribution literature instead: the *knowns* are its positives
  (see ``fpr_at_95tpr``).
- Labels below 0 mean unknown. For open-set classification with ``n_known = N`` known classes the prediction
  ``N`` means "unknown".
- Every detection / F1 metric has a plain form on one episode (1-D input, returns a float) and a batched form on
  ``[E, m]`` tensors that returns ``[E]`` values (one per episode) as one tensor program; the plain form is the
  batched one with E = 1. Ties are handled as scikit-learn does (average ranks; one ROC / PR point per distinct
  score). An episode without positives or without negatives gets NaN (scikit-learn raises).

Definitions:

- ``auroc``: area under the ROC curve of unknown-vs-known (= scikit-learn's ``roc_auc_score(is_unknown,
  scores)``), by the Mann-Whitney statistic on average ranks.
- ``aupr``: average precision (scikit-learn's ``average_precision_score``), unknown positive by default
  (AUPR-out) or known positive with score ``-scores`` (``positive="known"``, AUPR-in).
- ``fpr_at_95tpr`` (FPR@95TPR, lower is better): the fraction of *unknowns accepted as known* at the threshold
  that accepts 95% of the knowns, knowns positive, as ODIN defines it (Liang et al., ICLR 2018: the probability
  that an out-of-distribution example is taken for an in-distribution one when 95% of the in-distribution
  examples are accepted). A sample is accepted as known when its open score is <= t; t is the
  *smallest* open score at which the accepted knowns reach >= 95% (every sample tied at t is accepted). That is
  ``fpr[argmax(tpr >= 0.95)]`` of ``roc_curve(~is_unknown, -scores, drop_intermediate=False)``: the first ROC
  point with TPR >= 0.95, one point per distinct score (OpenOOD's ``fpr_recall`` takes the same index of
  ``roc_curve`` with its default ``drop_intermediate=True``, which can drop that point when it lies on a
  straight stretch of the curve and then give a larger FPR; OpenOOD v1.5's ``compute_all_metrics`` reports the
  reverse reading below, out-of-distribution positive).
- ``known_rejection_at_95_unknown_recall``: the reverse reading, *not* the FPR@95TPR above: the fraction of
  knowns flagged unknown at the largest threshold that flags >= 95% of the unknowns (unknowns positive;
  ``fpr[argmax(tpr >= 0.95)]`` of ``roc_curve(is_unknown, scores, drop_intermediate=False)``).
- ``oscr``: open-set classification rate (Dhamija et al., NeurIPS 2018): the area under CCR(t) against FPR(t),
  where a sample is accepted as known when its open score is <= t, CCR(t) = accepted and correctly classified
  knowns / all knowns, FPR(t) = accepted unknowns / all unknowns; the curve runs from (0, 0) to (1, CCR at full
  acceptance) through one point per distinct score (trapezoids). With every known correct it equals AUROC. This
  is the definition. Two evaluation codes that open-set papers report with differ from it, so compare published
  OSCR with care: ARPL's ``core/evaluation.py`` ``compute_oscr`` (Chen et al., TPAMI 2021;
  github.com/iCGY96/ARPL) counts at each cut-off position of the sorted scores the correct knowns strictly above
  it but the unknowns from it on, so the operating point where a known follows an unknown in the sort is never
  formed, its trapezoid cuts that corner of the curve, and (its loop also stopping one position early) its OSCR
  comes out lower -- by 0.17 points on average (0.09-0.28) on episodes of 75 known + 75 unknown queries with
  Gaussian scores in our check; CSSR's ``metrics.py`` version (Huang et al., TPAMI 2022; github.com/xyzedd/CSSR,
  "modified from ARPL") uses one strict threshold for both counts but closes the curve at (1, 1) instead of
  (1, CCR at full acceptance), which adds area when the lowest-scored sample is an unknown (0.13 points higher on
  average in the same check).
- ``open_macro_f1``: the standard macro-F1 over all N + 1 labels (unknown = label N); a label never predicted
  scores 0 (= ``f1_score(labels, pred, labels=range(N + 1), average="macro", zero_division=0)``).
- ``paper_f1``: the F1 of the FSOR papers' test code (TANE / DNPG), macro-F1 averaged only over the labels that
  appear in the predictions (= ``f1_score(labels, pred, labels=np.unique(pred), average="macro")``);
  never-predicted classes do not count, so it is higher than the standard one. Report both, and say which is which.
- ``mean_ci95``: mean and Student-t 95% half-width across episodes (re-exported from :mod:`bench.report`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from bench.report import mean_ci95
from heads.scores import batched_auroc, sorted_groups
from heads.scores import score_pair as _pair
from heads.scores import to_tensor as _t

__all__ = [
    "topk_accuracy", "closed_accuracy", "auroc", "aupr", "fpr_at_95tpr", "oscr", "open_macro_f1", "paper_f1",
    "known_rejection_at_95_unknown_recall", "batched_auroc", "batched_aupr", "batched_fpr_at_95tpr",
    "batched_known_rejection_at_95_unknown_recall", "batched_oscr", "batched_open_macro_f1",
    "batched_paper_f1", "batched_closed_accuracy", "open_predictions", "roc_points", "mean_ci95",
]


def _single(fn, *args, name: str = "this metric") -> float:
    args = [_t(a, dtype=None) for a in args]
    if any(a.dim() != 1 for a in args):
        raise ValueError(f"{name} takes 1-D inputs of one episode (use batched_{name} for [E, m] batches)")
    return float(fn(*[a.unsqueeze(0) for a in args])[0])


# ------------------------------------------------------------------------------------------------ closed set
def topk_accuracy(logits: Any, labels: Any, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy for every k in ``ks``, over the samples with a label >= 0 (unknowns are skipped).

    ``logits`` ``[n, C]`` (or ``[..., n, C]``: pooled over all leading axes). A k above C counts as C.
    """
    x = _t(logits, dtype=None)
    y = _t(labels, dtype=None).long().to(x.device)
    x = x.reshape(-1, x.shape[-1])
    y = y.reshape(-1)
    keep = y >= 0
    x, y = x[keep], y[keep]
    if y.numel() == 0:
        return {int(k): float("nan") for k in ks}
    kmax = min(max(ks), x.shape[-1])
    top = x.topk(kmax, dim=-1).indices
    hit = top == y.unsqueeze(-1)
    return {int(k): float(hit[:, :min(k, kmax)].any(dim=-1).double().mean()) for k in ks}


def batched_closed_accuracy(pred: Any, labels: Any) -> torch.Tensor:
    """[E] accuracy of closed-set predictions over the known samples (labels >= 0) of each episode."""
    p = _t(pred, dtype=None).long()
    y = _t(labels, dtype=None).long().to(p.device)
    known = y >= 0
    return ((p == y) & known).sum(-1).double() / known.sum(-1).double()


def closed_accuracy(pred: Any, labels: Any) -> float:
    return _single(batched_closed_accuracy, pred, labels, name="closed_accuracy")


# ------------------------------------------------------------------------------------------------ detection
# The ranking helpers and the batched AUROC live in heads.scores (heads score episodes with them too).
def auroc(scores: Any, is_unknown: Any) -> float:
    """AUROC of one episode, unknown positive (scikit-learn's roc_auc_score(is_unknown, scores))."""
    return _single(batched_auroc, scores, is_unknown, name="auroc")


def batched_aupr(scores: Any, is_unknown: Any, positive: str = "unknown") -> torch.Tensor:
    """[E] average precision; ``positive="unknown"`` (AUPR-out) or ``"known"`` (AUPR-in, score -scores)."""
    s, y = _pair(scores, is_unknown)
    if positive == "known":
        s, y = -s, ~y
    elif positive != "unknown":
        raise ValueError(f"positive must be 'unknown' or 'known', not {positive!r}")
    order, _, _, end, _ = sorted_groups(s, descending=True)
    ys = torch.gather(y, -1, order).double()
    tp = ys.cumsum(-1)
    m = s.shape[-1]
    seen = torch.arange(1, m + 1, device=s.device, dtype=torch.float64)
    precision_at_end = torch.gather(tp / seen, -1, end)         # precision at the threshold of each tie group
    pos = ys.sum(-1)
    out = (precision_at_end * ys).sum(-1) / pos
    return torch.where(pos > 0, out, torch.full_like(out, float("nan")))


def aupr(scores: Any, is_unknown: Any, positive: str = "unknown") -> float:
    """Average precision of one episode (scikit-learn's average_precision_score)."""
    return _single(lambda s, y: batched_aupr(s, y, positive), scores, is_unknown, name="aupr")


def _roc_at_group_ends(s: torch.Tensor, y: torch.Tensor):
    """TPR and FPR at every tie-group end of the descending sort (the ROC points) and the group-end mask."""
    order, _, _, _, last = sorted_groups(s, descending=True)
    ys = torch.gather(y, -1, order).double()
    tp = ys.cumsum(-1)
    fp = (1 - ys).cumsum(-1)
    pos = ys.sum(-1, keepdim=True)
    neg = (1 - ys).sum(-1, keepdim=True)
    return tp / pos, fp / neg, last


def _first_fpr_at_tpr(s: torch.Tensor, y: torch.Tensor, tpr: float) -> torch.Tensor:
    """[E] FPR at the first ROC point (descending ``s``, ``y`` positive) whose TPR reaches ``tpr``; FPR only grows
    along the curve, so that is the smallest FPR among the points with TPR >= ``tpr``."""
    t, f, last = _roc_at_group_ends(s, y)
    ok = last & (t >= tpr - 1e-12)
    out = torch.where(ok, f, torch.full_like(f, float("inf"))).amin(dim=-1)
    pos, neg = y.sum(-1), (~y).sum(-1)
    return torch.where((pos > 0) & (neg > 0), out, torch.full_like(out, float("nan")))


def batched_fpr_at_95tpr(scores: Any, is_unknown: Any, tpr: float = 0.95) -> torch.Tensor:
    """[E] FPR@95TPR: the fraction of unknowns accepted as known (open score <= t) at the smallest threshold t that
    accepts >= ``tpr`` of the knowns (knowns positive, as the OOD literature; see the module docstring)."""
    s, y = _pair(scores, is_unknown)
    return _first_fpr_at_tpr(-s, ~y, tpr)


def fpr_at_95tpr(scores: Any, is_unknown: Any, tpr: float = 0.95) -> float:
    """FPR@95TPR of one episode (``fpr[argmax(tpr >= 0.95)]`` of ``roc_curve(~is_unknown, -scores,
    drop_intermediate=False)``): unknowns accepted when 95% of the knowns are accepted; lower is better."""
    return _single(lambda s, y: batched_fpr_at_95tpr(s, y, tpr), scores, is_unknown, name="fpr_at_95tpr")


def batched_known_rejection_at_95_unknown_recall(scores: Any, is_unknown: Any, recall: float = 0.95) -> torch.Tensor:
    """[E] the fraction of knowns flagged unknown (open score >= t) at the largest threshold t that flags >=
    ``recall`` of the unknowns (unknowns positive). Not the literature's FPR@95TPR (that is ``fpr_at_95tpr``)."""
    s, y = _pair(scores, is_unknown)
    return _first_fpr_at_tpr(s, y, recall)


def known_rejection_at_95_unknown_recall(scores: Any, is_unknown: Any, recall: float = 0.95) -> float:
    """One episode of :func:`batched_known_rejection_at_95_unknown_recall` (``fpr[argmax(tpr >= 0.95)]`` of
    ``roc_curve(is_unknown, scores, drop_intermediate=False)``)."""
    return _single(lambda s, y: batched_known_rejection_at_95_unknown_recall(s, y, recall), scores, is_unknown,
                   name="known_rejection_at_95_unknown_recall")


def roc_points(scores: Any, is_unknown: Any) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of one (pooled) score set, from (0, 0), one point per distinct score."""
    s = _t(scores).reshape(1, -1)
    y = _t(is_unknown, dtype=None).bool().reshape(1, -1)
    t, f, last = _roc_at_group_ends(s, y)
    fpr = np.concatenate([[0.0], f[0][last[0]].cpu().numpy()])
    tpr = np.concatenate([[0.0], t[0][last[0]].cpu().numpy()])
    return fpr, tpr


def batched_oscr(scores: Any, is_unknown: Any, correct: Any) -> torch.Tensor:
    """[E] OSCR (Dhamija et al., NeurIPS 2018): area under CCR against FPR as the acceptance threshold on the open
    score rises, by the definition (see the module docstring: ARPL's ``compute_oscr`` gives about 0.2 points less).

    ``scores`` ``[E, m]`` open scores, ``is_unknown`` ``[E, m]``, ``correct`` ``[E, m]``: the closed-set
    prediction of the sample is right (ignored for unknowns).
    """
    s, y = _pair(scores, is_unknown)
    c = _t(correct, dtype=None).bool().to(s.device) & ~y
    order, _, start, _, last = sorted_groups(s, descending=False)  # most known first
    ys = torch.gather(y, -1, order).double()
    cs = torch.gather(c, -1, order).double()
    n_unknown = ys.sum(-1, keepdim=True)
    n_known = (1 - ys).sum(-1, keepdim=True)
    fpr = ys.cumsum(-1) / n_unknown
    ccr = cs.cumsum(-1) / n_known
    zero = torch.zeros_like(fpr[:, :1])
    prev = (start - 1).clamp_min(0)
    has_prev = start > 0
    fpr_prev = torch.where(has_prev, torch.gather(fpr, -1, prev), zero.expand_as(fpr))
    ccr_prev = torch.where(has_prev, torch.gather(ccr, -1, prev), zero.expand_as(ccr))
    area = ((fpr - fpr_prev) * (ccr + ccr_prev) / 2 * last).sum(-1)
    pos, neg = y.sum(-1), (~y).sum(-1)
    return torch.where((pos > 0) & (neg > 0), area, torch.full_like(area, float("nan")))


def oscr(scores: Any, is_unknown: Any, correct: Any) -> float:
    return _single(batched_oscr, scores, is_unknown, correct, name="oscr")


# ------------------------------------------------------------------------------------------------ open-set F1
def _f1_parts(pred: Any, labels: Any, n_known: int):
    p = _t(pred, dtype=None).long()
    y = _t(labels, dtype=None).long().to(p.device)
    if p.shape != y.shape or p.dim() != 2:
        raise ValueError(f"pred and labels must have one shape [E, m]; got {tuple(p.shape)} and {tuple(y.shape)}")
    C = n_known + 1
    y = torch.where((y < 0) | (y >= n_known), torch.full_like(y, n_known), y)
    if bool(((p < 0) | (p > n_known)).any()):
        raise ValueError(f"open-set predictions must lie in 0..{n_known} ({n_known} = unknown)")
    E = p.shape[0]
    pred_count = torch.zeros(E, C, dtype=torch.float64, device=p.device).scatter_add_(
        1, p, torch.ones_like(p, dtype=torch.float64))
    true_count = torch.zeros_like(pred_count).scatter_add_(1, y, torch.ones_like(y, dtype=torch.float64))
    tp = torch.zeros_like(pred_count).scatter_add_(1, y, (p == y).double())
    denom = pred_count + true_count
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))
    return f1, pred_count


def batched_open_macro_f1(pred: Any, labels: Any, n_known: int) -> torch.Tensor:
    """[E] standard macro-F1 over all N + 1 labels (unknown = label N; labels < 0 count as unknown)."""
    f1, _ = _f1_parts(pred, labels, n_known)
    return f1.mean(-1)


def batched_paper_f1(pred: Any, labels: Any, n_known: int) -> torch.Tensor:
    """[E] the FSOR papers' F1: macro average over the labels that occur in the predictions only."""
    f1, pred_count = _f1_parts(pred, labels, n_known)
    used = pred_count > 0
    return (f1 * used).sum(-1) / used.sum(-1).double()


def open_macro_f1(pred: Any, labels: Any, n_known: int) -> float:
    """Standard macro-F1 of one episode over N + 1 labels (never-predicted labels score 0)."""
    return _single(lambda p, y: batched_open_macro_f1(p, y, n_known), pred, labels, name="open_macro_f1")


def paper_f1(pred: Any, labels: Any, n_known: int) -> float:
    """The papers' F1 of one episode (macro over predicted labels only); see the module docstring."""
    return _single(lambda p, y: batched_paper_f1(p, y, n_known), pred, labels, name="paper_f1")


def open_predictions(closed_pred: Any, unknown: Any, n_known: int) -> torch.Tensor:
    """(N+1)-way predictions: the closed prediction, or ``n_known`` where ``unknown`` is true."""
    p = _t(closed_pred, dtype=None).long()
    u = _t(unknown, dtype=None).bool().to(p.device)
    return torch.where(u, torch.full_like(p, n_known), p)

"""Rank statistics of open scores, batched over episodes: the one AUROC of the project.

Scores follow the featstore convention (higher = more likely unknown) and ``is_unknown`` is the positive class.
Every function takes ``[E, m]`` tensors (E episodes of m samples) and runs as one tensor program in float64. Ties
are handled as scikit-learn does: tied samples share the average of their ranks, so a tied (unknown, known) pair
counts one half. An episode without positives or without negatives gets NaN (scikit-learn raises).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["to_tensor", "score_pair", "sorted_groups", "average_ranks", "batched_auroc"]


def to_tensor(x: Any, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """numpy or torch -> a detached tensor (float64 by default: exact counts in the rank statistics)."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.detach()
    return t.to(dtype) if dtype is not None else t


def score_pair(scores: Any, is_unknown: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores [E, m] float64, is_unknown [E, m] bool)`` on one device; ValueError unless both are [E, m]."""
    s = to_tensor(scores)
    y = to_tensor(is_unknown, dtype=None).bool()
    if s.dim() != 2 or s.shape != y.shape:
        raise ValueError(f"batched metrics need scores and labels of one shape [E, m]; got {tuple(s.shape)} and "
                         f"{tuple(y.shape)}")
    return s, y.to(s.device)


def sorted_groups(s: torch.Tensor, descending: bool):
    """Sort each row of ``s [E, m]``; return (order, sorted values, start index, end index, group-end mask) of
    each sorted position's tie group."""
    vals, order = torch.sort(s, dim=-1, descending=descending, stable=True)
    E, m = s.shape
    idx = torch.arange(m, device=s.device).expand(E, m)
    new = torch.ones_like(vals, dtype=torch.bool)
    new[:, 1:] = vals[:, 1:] != vals[:, :-1]
    start = torch.where(new, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    last = torch.ones_like(vals, dtype=torch.bool)
    last[:, :-1] = new[:, 1:]
    end = torch.where(last, idx, torch.full_like(idx, m - 1)).flip(-1).cummin(dim=-1).values.flip(-1)
    return order, vals, start, end, last


#: the name the metric modules used before this module held the ranking helpers


def average_ranks(scores: Any) -> torch.Tensor:
    """[E, m] 1-based ranks, ties get the average of their ranks (scipy.stats.rankdata 'average')."""
    s = to_tensor(scores)
    order, _, start, end, _ = sorted_groups(s, descending=False)
    ranks_sorted = (start + end).double() / 2 + 1
    return torch.empty_like(ranks_sorted).scatter_(-1, order, ranks_sorted)


def batched_auroc(scores: Any, is_unknown: Any) -> torch.Tensor:
    """[E] AUROC with unknown positive (Mann-Whitney U on average ranks), float64.

    O(m log m) per episode. The numerator (a sum of halves) and the denominator are exact in float64, so casting
    the result to float32 gives the correctly rounded float32 quotient, the value of a float32 pairwise count."""
    s, y = score_pair(scores, is_unknown)
    ranks = average_ranks(s)
    pos = y.sum(-1).double()
    neg = (~y).sum(-1).double()
    u = (ranks * y).sum(-1) - pos * (pos + 1) / 2
    out = u / (pos * neg)
    return torch.where((pos > 0) & (neg > 0), out, torch.full_like(out, float("nan")))

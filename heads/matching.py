"""Matching networks with full-context embeddings (Vinyals et al., NeurIPS 2016) on cached features, as used by
the low-shot ImageNet benchmark (Hariharan & Girshick, ICCV 2017, and its official code).

- Embedding f: the raw cached feature (no learned network besides the LSTMs).
- Support encoder g (full-context embedding of the support set): a one-layer bidirectional LSTM with hidden size d
  run over the whole support set as one sequence; g_i = x_i + h_fwd,i + h_bwd,i, and ĝ_i = g_i / (|g_i| + 1e-5).
- Query encoder: an attention LSTM with K steps: h = f(x), c = 0; each step a = softmax(h gᵀ) over the
  *unnormalised* g, r = a g, (h, c) = LSTMCell([f(x), r], (h, c)), h = h + f(x). As in the benchmark's
  implementation, the read-out r is fed as the cell *input* (the paper concatenates it into the hidden state).
- Output: scores = h ĝᵀ (only the support side is normalised: the query norm acts as a temperature); softmax over
  the support items; class probability = attention summed per class; log-probabilities; NLL loss.

``fce=False`` turns both LSTMs off: g = x, h = f(x) (plain cosine attention over the support, query unnormalised).

Training (:meth:`MatchingNetwork.meta_train`) runs on base-class episodes: every episode takes ``ways`` base
classes (default: all) in a random order, k ~ U{1..meta_shots} support rows per class (without replacement, sorted
by row index) and ``meta_queries`` query rows per class (default 1), excluded from the support unless
``query_in_support=True`` (the original's behaviour: the query is drawn independently and may duplicate a
support item). Labels are re-indexed in the episode's class order; the support sequence is grouped by class in
that order. SGD, lr 0.1, momentum 0.9 with dampening 0.9, weight decay 1e-3, ``episodes`` 60,000 (one SGD step
each), lr / 10 after 20k and 40k.

Testing (:meth:`MatchingNetwork.fit` + :meth:`MatchingNetwork.logits`): the whole support set is encoded once;
queries are scored in batches. :func:`lowshot_support` builds the benchmark's support set: ``per_class`` (100)
random train rows of every base class, then all novel examples tiled as a block to as many items per class as the
base classes hold (ceil(100 / n) copies on ImageNet).
"""

from __future__ import annotations

import math
import sys
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ._cpu_blas import matmul
from .base import Head, MetaTrainData, as_tensor, register_head

__all__ = ["MatchingNetwork", "MatchingNet", "lowshot_support", "class_log_probs"]

_EPS = 1e-5


# ------------------------------------------------------------------------------------------------ the network
def class_log_probs(scores: torch.Tensor, support_class: torch.Tensor, n_classes: int) -> torch.Tensor:
    """log sum_{i in class c} softmax(scores)_i for scores [..., m, n] and support class indices [..., n] in
    [0, n_classes): [..., m, n_classes]; classes without support items get -inf. Computed with a per-class
    log-sum-exp (exactly log(softmax(scores) @ onehot), without underflow to log 0 for far classes)."""
    idx = support_class.unsqueeze(-2).expand_as(scores)
    shape = (*scores.shape[:-1], n_classes)
    cmax = torch.full(shape, -math.inf, dtype=scores.dtype, device=scores.device)
    cmax = cmax.scatter_reduce(-1, idx, scores, reduce="amax", include_self=True)
    safe = torch.where(torch.isfinite(cmax), cmax, torch.zeros_like(cmax)).detach()  # a constant shift
    sums = torch.zeros(shape, dtype=scores.dtype, device=scores.device)
    sums = sums.scatter_add(-1, idx, torch.exp(scores - safe.gather(-1, idx)))
    return torch.log(sums) + safe - torch.logsumexp(scores, dim=-1, keepdim=True)


class MatchingNet(nn.Module):
    """The learnable part: the support biLSTM and the query attention LSTM (absent when ``fce=False``)."""

    def __init__(self, dim: int, steps: int = 5, fce: bool = True):
        super().__init__()
        self.dim, self.steps, self.fce = int(dim), int(steps), bool(fce)
        if self.fce:
            self.encoder = nn.LSTM(dim, dim, num_layers=1, batch_first=True, bidirectional=True)
            self.cell = nn.LSTMCell(2 * dim, dim)

    def encode_support(self, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """support [E, n, d] (one sequence per episode) -> (g, ĝ), each [E, n, d]."""
        if self.fce:
            out, _ = self.encoder(support)
            g = support + out[..., :self.dim] + out[..., self.dim:]
        else:
            g = support
        return g, g / (g.norm(dim=-1, keepdim=True) + _EPS)

    def attention_weights(self, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """softmax over the support of h gᵀ: h [E, m, d], g [E, n, d] -> [E, m, n]."""
        return torch.softmax(matmul(h, g.transpose(-1, -2)), dim=-1)

    def embed_query(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The K-step attention LSTM: f [E, m, d], g [E, n, d] -> h [E, m, d] (f itself when fce is off)."""
        if not self.fce:
            return f
        E, m, d = f.shape
        h, c = f, torch.zeros_like(f)
        for _ in range(self.steps):
            r = matmul(self.attention_weights(h, g), g)
            h, c = self.cell(torch.cat((f, r), dim=-1).reshape(E * m, 2 * d), (h.reshape(E * m, d),
                                                                               c.reshape(E * m, d)))
            h, c = h.reshape(E, m, d) + f, c.reshape(E, m, d)
        return h

    def scores(self, f: torch.Tensor, g: torch.Tensor, g_hat: torch.Tensor) -> torch.Tensor:
        """f [E, m, d] queries, (g, ĝ) [E, n, d] -> [E, m, n]: the embedded queries against ĝ."""
        return matmul(self.embed_query(f, g), g_hat.transpose(-1, -2))

    def log_probs(self, f: torch.Tensor, g: torch.Tensor, g_hat: torch.Tensor, support_class: torch.Tensor,
                  n_classes: int) -> torch.Tensor:
        """f [E, m, d] queries, (g, ĝ) [E, n, d], support_class [E, n] -> [E, m, n_classes] log-probabilities."""
        return class_log_probs(self.scores(f, g, g_hat), support_class, n_classes)


# ------------------------------------------------------------------------------------------------ the support
def lowshot_support(base_features: Any, base_labels: Any, novel_features: Any, novel_labels: Any, *,
                    per_class: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The benchmark's test-time support set: for every base class in sorted label order,
    ``per_class`` train rows drawn without replacement and kept in row order (all of them, when a class has
    fewer); then the novel examples, in the order given (the benchmark passes them sorted by row index), tiled
    ceil(T / n) times as one block, n = the number of examples per novel class (the smallest count when they
    differ) and T = the fewest items a base class got, at most ``per_class``. On ImageNet (about 1,300 rows per
    base class) T = per_class = 100, the paper's setting, where every class holds 100 items; on a data set with
    fewer rows per base class (Omniglot: 16) the novel classes are tiled to the same T, so that the summed
    attention does not favour them by their number of copies. Returns (features [s, d], labels [s]) on the
    features' device."""
    bl = np.asarray(base_labels.cpu() if isinstance(base_labels, torch.Tensor) else base_labels).reshape(-1)
    nl = np.asarray(novel_labels.cpu() if isinstance(novel_labels, torch.Tensor) else novel_labels).reshape(-1)
    bf, nf = as_tensor(base_features), as_tensor(novel_features)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 11]))
    rows = []
    for lab in np.unique(bl):
        idx = np.flatnonzero(bl == lab)
        rows.append(np.sort(rng.choice(idx, per_class, replace=False)) if idx.size > per_class else idx)
    target = min([len(r) for r in rows] + [per_class])
    rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    feats = [bf[torch.as_tensor(rows, device=bf.device)]]
    labels = [torch.as_tensor(bl[rows], dtype=torch.int64)]
    if nl.size:
        n = int(np.unique(nl, return_counts=True)[1].min())
        reps = math.ceil(target / n)
        feats.append(nf.to(bf.device).repeat(reps, 1))
        labels.append(torch.as_tensor(np.tile(nl, reps), dtype=torch.int64))
    return torch.cat(feats), torch.cat(labels).to(bf.device)


# ------------------------------------------------------------------------------------------------ the head
@register_head("matching")
class MatchingNetwork(Head):
    """Matching network with full-context embeddings on cached features (see the module docstring).

    Hyper-parameters: ``feat_dim`` (None: taken from the first data seen), ``steps`` K = 5 attention steps,
    ``fce`` (True), ``lr`` 0.1, ``momentum`` 0.9, ``dampening`` 0.9, ``weight_decay`` 1e-3, ``lr_steps``
    (20,000, 40,000) with ``lr_decay`` 0.1, ``query_in_support`` (False; True = the original's bug-compatible
    independent query draw); meta-training episodes: ``episodes`` 60,000 SGD steps (one episode each), ``ways``
    classes per episode (None = all, as the original's 389), ``meta_shots`` the maximum support size per class
    (k ~ U{1..meta_shots}), ``meta_queries`` query rows per class; ``batch_size`` 128 (test-time query batches),
    ``seed``, ``device``.

    Learnt state: ``net_`` (after :meth:`meta_train`, or untrained weights when :meth:`fit` comes first),
    ``feat_dim_`` (the width it was built for), ``loss_history_`` [episodes] (per-episode NLL), and after
    :meth:`fit`: ``g_``, ``g_hat_`` [E, s, d], ``support_class_`` [E, s], ``classes_`` (label value of each logit
    column).
    """

    needs_meta_training = True

    def __init__(self, feat_dim: int | None = None, steps: int = 5, fce: bool = True, lr: float = 0.1,
                 momentum: float = 0.9, dampening: float = 0.9, weight_decay: float = 1e-3,
                 lr_steps: Sequence[int] = (20_000, 40_000), lr_decay: float = 0.1,
                 query_in_support: bool = False, episodes: int = 60_000, ways: int | None = None,
                 meta_shots: int = 10, meta_queries: int = 1, batch_size: int = 128, seed: int = 0,
                 device: str | torch.device = "cpu"):
        super().__init__(device)
        self.feat_dim = None if feat_dim is None else int(feat_dim)
        self.steps, self.fce = int(steps), bool(fce)
        self.lr, self.momentum, self.dampening, self.weight_decay = float(lr), float(momentum), float(dampening), \
            float(weight_decay)
        self.lr_steps, self.lr_decay = tuple(int(s) for s in lr_steps), float(lr_decay)
        self.query_in_support, self.batch_size, self.seed = bool(query_in_support), int(batch_size), int(seed)
        if episodes < 0 or meta_shots < 1 or meta_queries < 1:
            raise ValueError(f"episodes must be >= 0, meta_shots and meta_queries >= 1 (got {episodes}, {meta_shots}, "
                             f"{meta_queries})")
        self.episodes, self.meta_shots, self.meta_queries = int(episodes), int(meta_shots), int(meta_queries)
        self.ways = None if ways is None else int(ways)
        self.feat_dim_: int | None = None
        self.net_: MatchingNet | None = None
        self.loss_history_: np.ndarray | None = None
        self.g_ = self.g_hat_ = self.support_class_ = self.classes_ = None
        self._batched = False

    def hparams(self) -> dict:
        """The hyper-parameters that shape the trained network (a cache key; the width once it is known)."""
        feat_dim = self.feat_dim if self.feat_dim is not None else self.feat_dim_
        return {"feat_dim": feat_dim, "steps": self.steps, "fce": self.fce, "lr": self.lr,
                "momentum": self.momentum, "dampening": self.dampening, "weight_decay": self.weight_decay,
                "lr_steps": list(self.lr_steps), "lr_decay": self.lr_decay,
                "query_in_support": self.query_in_support, "seed": self.seed}

    # -- the network -------------------------------------------------------------------------------------------
    def _build(self, dim: int) -> MatchingNet:
        built = self.feat_dim if self.net_ is None else self.net_.dim
        if built is not None and built != dim:
            raise ValueError(f"features have d = {dim}, the matching network was built for d = {built}")
        if self.net_ is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                net = MatchingNet(dim, self.steps, self.fce)
            self.net_ = net.to(self.device)
        self.feat_dim_ = dim
        return self.net_

    # -- meta-training on base classes ---------------------------------------------------------------------------
    def meta_train(self, data: MetaTrainData, seed: int | None = None) -> "MatchingNetwork":
        """Train on episodes drawn from the base-class rows ``data.features[data.train_rows]`` with labels
        ``data.labels[data.train_rows]`` (the episode schedule is the constructor's: ``episodes``, ``ways``,
        ``meta_shots``, ``meta_queries``, ``lr``, ``lr_steps``). ``seed``: the episode RNG (default: the head's
        seed); ``data.progress``: True for a bar on a terminal, or a callable ``(stage, done, total, loss)``.
        """
        rows = data.train_rows
        n = int(data.features.shape[0])
        every_row = len(rows) == n and bool(np.array_equal(rows, np.arange(n)))
        if every_row:  # no copy of the features
            x, y = self._tensor(data.features), data.labels
        else:
            feats = data.features
            x = self._tensor(feats[torch.as_tensor(rows, device=feats.device)] if isinstance(feats, torch.Tensor)
                             else np.asarray(feats)[rows])
            y = data.labels[rows]
        shots, queries, episodes, progress = self.meta_shots, self.meta_queries, self.episodes, data.progress
        if x.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"features must be [n, d] with n = len(labels) = {y.shape[0]}")
        order = np.argsort(y, kind="stable")
        classes, starts, counts = np.unique(y[order], return_index=True, return_counts=True)
        need = queries + (0 if self.query_in_support else 1)
        if counts.min() < need:
            bad = classes[counts < need]
            raise ValueError(f"{bad.size} class(es) (e.g. {bad[0]}) have fewer than {need} rows, too few for a "
                             f"support example plus {queries} query row(s); drop them or pass query_in_support")
        ways = classes.size if self.ways is None else self.ways
        if not 2 <= ways <= classes.size:
            raise ValueError(f"ways must be between 2 and the {classes.size} classes given, got {ways}")
        net = self._build(x.shape[1]).train()
        rng = np.random.default_rng(np.random.SeedSequence([int(self.seed if seed is None else seed)
                                                            & 0xFFFFFFFF, 12]))
        base_lr = self.lr
        opt = torch.optim.SGD(net.parameters(), lr=base_lr, momentum=self.momentum, dampening=self.dampening,
                              weight_decay=self.weight_decay)
        losses = torch.zeros(episodes, dtype=torch.float64, device=self.device)
        bar = None
        if progress is True:
            from tqdm import tqdm

            bar = tqdm(total=episodes, desc="matching network", leave=False, dynamic_ncols=True,
                       disable=not sys.stderr.isatty())
        try:
            for ep in range(episodes):
                lr_now = base_lr * self.lr_decay ** sum(ep >= s for s in self.lr_steps)
                for group in opt.param_groups:
                    group["lr"] = lr_now
                s_rows, s_cls, q_rows = self._episode(rng, order, starts, counts, ways, shots, queries)
                s_idx = torch.as_tensor(s_rows, device=self.device)
                q_idx = torch.as_tensor(q_rows, device=self.device)
                support = x[s_idx].unsqueeze(0)
                s_class = torch.as_tensor(s_cls, device=self.device).unsqueeze(0)
                q_class = torch.arange(ways, device=self.device).repeat_interleave(queries)
                opt.zero_grad(set_to_none=True)
                g, g_hat = net.encode_support(support)
                logp = net.log_probs(x[q_idx].unsqueeze(0), g, g_hat, s_class, ways)[0]
                loss = nn.functional.nll_loss(logp, q_class)
                loss.backward()
                opt.step()
                losses[ep] = loss.detach()
                if bar is not None or callable(progress):
                    if (ep + 1) % 10 == 0 or ep + 1 == episodes:
                        val = float(losses[max(0, ep - 9):ep + 1].mean())
                        if bar is not None:
                            bar.update((ep + 1) - bar.n)
                            bar.set_postfix(loss=f"{val:.4f}", refresh=False)
                        else:
                            progress("matching network", ep + 1, episodes, val)
        finally:
            if bar is not None:
                bar.close()
        self.net_ = net.eval()
        self.loss_history_ = losses.cpu().numpy()
        return self

    def _episode(self, rng: np.random.Generator, order: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                 ways: int, shots: int, queries: int):
        """Row indices of one episode: (support rows grouped by class in the episode order, their episode class
        indices, query rows [ways * queries] class by class)."""
        chosen = rng.permutation(starts.size)[:ways]
        s_rows, s_cls, q_rows = [], [], []
        for pos, c in enumerate(chosen):
            n_c = int(counts[c])
            rows_c = order[starts[c]:starts[c] + n_c]
            if self.query_in_support:
                k = int(rng.integers(1, min(shots, n_c) + 1))
                sup = rng.choice(n_c, k, replace=False)
                qry = rng.integers(n_c, size=queries)
            else:
                k = int(rng.integers(1, min(shots, n_c - queries) + 1))
                pick = rng.choice(n_c, k + queries, replace=False)
                sup, qry = pick[:k], pick[k:]
            s_rows.append(np.sort(rows_c[sup]))
            s_cls.append(np.full(k, pos, dtype=np.int64))
            q_rows.append(rows_c[qry])
        return np.concatenate(s_rows), np.concatenate(s_cls), np.concatenate(q_rows)

    # -- the Head contract ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, features, labels, n_classes: int | None = None) -> "MatchingNetwork":
        """Encode the support set once. ``features`` [s, d] (or batched episodes [E, s, d]), ``labels`` [s] (or
        [E, s]). Logit columns are the sorted support labels (``classes_``), or, with ``n_classes``, the label
        values 0..n_classes-1 with -inf for classes that have no support item (the benchmark's 1000-way
        scoring)."""
        x = self._tensor(features)
        y = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
        y = y.to(self.device, torch.int64)
        self._batched = x.ndim == 3
        if not self._batched:
            x, y = x.unsqueeze(0), y.reshape(1, -1)
        if x.ndim != 3 or y.shape != x.shape[:2]:
            raise ValueError(f"features [s, d] / [E, s, d] and labels [s] / [E, s] do not match: "
                             f"{tuple(x.shape)} vs {tuple(y.shape)}")
        if n_classes is None:
            self.classes_, s_class = torch.unique(y, sorted=True, return_inverse=True)
        else:
            if int(y.min()) < 0 or int(y.max()) >= n_classes:
                raise ValueError(f"support labels must lie in [0, {n_classes})")
            self.classes_, s_class = torch.arange(n_classes, device=self.device), y
        net = self._build(x.shape[-1]).eval()
        self.g_, self.g_hat_ = net.encode_support(x)
        self.support_class_ = s_class
        return self

    def fit_lowshot(self, base_features, base_labels, novel_features, novel_labels, *, per_class: int = 100,
                    seed: int = 0, n_classes: int | None = None) -> "MatchingNetwork":
        """:meth:`fit` on :func:`lowshot_support` (the benchmark's test-time support set)."""
        feats, labels = lowshot_support(base_features, base_labels, novel_features, novel_labels,
                                        per_class=per_class, seed=seed)
        return self.fit(feats, labels, n_classes=n_classes)

    @torch.no_grad()
    def logits(self, features) -> torch.Tensor:
        """Log-probabilities [m, C] (or [E, m, C] after a batched fit) over ``classes_``."""
        self._check_fitted("g_")
        f = self._tensor(features)
        if not self._batched:
            f = f.unsqueeze(0)
        if f.ndim != 3 or f.shape[0] != self.g_.shape[0] or f.shape[-1] != self.g_.shape[-1]:
            raise ValueError(f"queries of shape {tuple(f.shape)} do not match the support "
                             f"{tuple(self.g_.shape)}")
        net, C = self.net_.eval(), int(self.classes_.numel())
        out = [net.log_probs(f[:, s:s + self.batch_size], self.g_, self.g_hat_, self.support_class_, C)
               for s in range(0, f.shape[1], self.batch_size)]
        res = torch.cat(out, dim=1) if out else f.new_zeros((f.shape[0], 0, C))
        return res if self._batched else res[0]

    @torch.no_grad()
    def attention(self, features) -> torch.Tensor:
        """The final attention over the support items, softmax(h ĝᵀ): [m, s] (or [E, m, s])."""
        self._check_fitted("g_")
        f = self._tensor(features)
        if not self._batched:
            f = f.unsqueeze(0)
        h = self.net_.embed_query(f, self.g_)
        a = torch.softmax(h @ self.g_hat_.transpose(-1, -2), dim=-1)
        return a if self._batched else a[0]

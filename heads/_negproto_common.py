"""Shared machinery of the negative-prototype FSOR heads (TANE, DNPG): episodes, attention, losses, meta-training.

Both heads follow one recipe (TANE, Huang et al., CVPR 2022, and DNPG, Zhang et al., ACM MM 2024; original code
github.com/shiyuanh/TANE and github.com/iCGY96/DNPG):

- a support prototype p_c (mean of the support views of class c) is calibrated by attending over a *base memory*
  (one vector per base class);
- a generator turns the task into negative prototype(s) (NPs);
- a query is scored by cosine logits against ``[p̂_1 .. p̂_N, NP]``; the open score is the softmax probability of the
  negative column (higher = more unknown, the featstore convention);
- meta-training uses each (N + M)-way base-class episode twice: the primary task (first N classes closed, the M
  pseudo-open classes unknown) and the swapped task (pseudo-open classes closed, the primary classes unknown).

This module holds what the two heads share: a seeded episode sampler with the ``EpisodeBatch`` fields (``heads``
does not import ``featstore``, so it carries its own), the attention block, the reciprocal-unit BCE and the
swap-alignment loss, and :class:`NegProtoHead`, which implements ``meta_train``,
``training_step``, ``fit``, ``logits`` and ``open_score`` on top of two method hooks.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from heads.base import EPISODES, Head, MetaTrainData, NotFittedError, as_tensor
from heads.base import class_means as _class_means
from heads.scores import batched_auroc

# ----------------------------------------------------------------------------------------------------------------
# episodes
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Episodes:
    """A batch of E episodes as index tensors (the fields of ``featstore.episodes.EpisodeBatch``).

    support:        [E, N*K] store rows, class-major
    support_labels: [E, N*K] in 0..N-1
    query:          [E, N*Q + M*Q] store rows, known queries first
    query_labels:   [E, N*Q + M*Q] 0..N-1 known, -1 unknown
    classes:        [E, N] store class ids of the known ways
    open_classes:   [E, M]
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    classes: torch.Tensor
    open_classes: torch.Tensor
    support_views: torch.Tensor | None = None


def sample_episodes(
    labels: Any,
    rows: Any = None,
    *,
    ways: int,
    shots: int,
    queries: int,
    open_ways: int = 0,
    seed: int | Sequence[int] = 0,
    start: int = 0,
    count: int = 1,
) -> Episodes:
    """Sample ``count`` episodes (indices ``start .. start+count-1``) from the store rows ``rows``.

    Episode i draws from ``numpy.random.default_rng([*seed, i])``, so an episode depends only on (seed, index):
    the same episode comes back across epochs, runs and heads (the originals reseed episode i with i). Known
    classes need ``shots + queries``
    rows, open classes ``queries`` rows; rows are drawn without replacement within an episode.
    """
    labels = np.asarray(labels).reshape(-1)
    rows = np.arange(len(labels)) if rows is None else np.asarray(rows).reshape(-1).astype(np.int64)
    seed_seq = [int(s) for s in (seed if isinstance(seed, (list, tuple)) else [seed])]
    classes, inverse = np.unique(labels[rows], return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=len(classes)))])
    per_class = [rows[order[bounds[i] : bounds[i + 1]]] for i in range(len(classes))]
    sizes = np.diff(bounds)
    known_ok = np.flatnonzero(sizes >= shots + queries)
    open_ok = np.flatnonzero(sizes >= queries)
    if len(known_ok) < ways or len(open_ok) < ways + open_ways:
        raise ValueError(
            f"cannot sample {ways}-way {shots}-shot {queries}-query episodes with {open_ways} open ways: only "
            f"{len(known_ok)} classes have {shots + queries} rows among the {len(classes)} classes of these rows; "
            "use fewer ways/shots/queries or more classes"
        )
    sup, sup_lab, qry, qry_lab, cls, ocls = [], [], [], [], [], []
    for i in range(start, start + count):
        rng = np.random.default_rng([*seed_seq, i])
        known = rng.choice(known_ok, ways, replace=False)
        if open_ways:
            pool = np.setdiff1d(open_ok, known)
            if len(pool) < open_ways:  # the known draw used up classes the open draw needed
                raise ValueError(f"not enough classes for {ways} known + {open_ways} open ways")
            opened = rng.choice(pool, open_ways, replace=False)
        else:
            opened = np.zeros(0, dtype=np.int64)
        s, q = [], []
        for c in known:
            pick = rng.choice(per_class[c], shots + queries, replace=False)
            s.append(pick[:shots])
            q.append(pick[shots:])
        for c in opened:
            q.append(rng.choice(per_class[c], queries, replace=False))
        sup.append(np.concatenate(s))
        sup_lab.append(np.repeat(np.arange(ways), shots))
        qry.append(np.concatenate(q))
        qry_lab.append(np.concatenate([np.repeat(np.arange(ways), queries), np.full(open_ways * queries, -1)]))
        cls.append(classes[known])
        ocls.append(classes[opened])

    def stack(parts: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(parts).astype(np.int64))

    return Episodes(stack(sup), stack(sup_lab), stack(qry), stack(qry_lab), stack(cls), stack(ocls))


# ----------------------------------------------------------------------------------------------------------------
# small tensor helpers and the two special losses
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def rng_scope(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` and restore the caller's global RNG state afterwards.

    Heads are deterministic given their seed without changing the random state of the program around them.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def batched(x: torch.Tensor, dims: int) -> tuple[torch.Tensor, bool]:
    """Add a leading episode axis when ``x`` has ``dims - 1`` dimensions; returns (x, was_unbatched)."""
    if x.dim() == dims - 1:
        return x.unsqueeze(0), True
    if x.dim() != dims:
        raise ValueError(f"expected a tensor with {dims - 1} or {dims} dimensions, got shape {tuple(x.shape)}")
    return x, False


def class_means(feats: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per-episode class means: feats [E, S, D], labels [E, S] in 0..n-1 (others ignored) -> [E, n, D].

    Works for any number of views per class (K shots, or the K x 5 augmented views of the originals' test
    episodes). The means are :func:`heads.base.class_means`; a class without a support sample is an error here.
    """
    means, counts = _class_means(feats, labels, n_classes)
    if bool((counts == 0).any()):
        raise ValueError("a class has no support sample in some episode: support labels must cover 0..N-1")
    return means


def cosine(x: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """Cosine similarity x [E, m, D] vs protos [E, P, D] -> [E, m, P] (``F.normalize`` eps as the originals)."""
    return F.normalize(x, dim=-1) @ F.normalize(protos, dim=-1).transpose(-1, -2)


def reciprocal_unit_loss(units: torch.Tensor, query: torch.Tensor, labels: torch.Tensor, tau: torch.Tensor | float):
    """TANE's reciprocal-unit BCE (the TANE paper's L_unit; DNPG reuses it with its own temperature).

    z_ic = 1 - tau * cos(u_c, f(x_i)), t_ic = 1 if y_i = c else 0 (unknown queries, any label outside 0..N-1:
    all zeros), loss = mean over (episode, i, c) of BCE-with-logits(z_ic, t_ic). Minimising it pushes u_c away
    from class-c samples (z large where t = 1 needs a small cosine) and towards everything else: a cosine-space
    reciprocal point. units [E, N, D], query [E, m, D], labels [E, m].
    """
    n = units.shape[1]
    z = 1.0 - tau * cosine(query, units)  # [E, m, N]
    known = (labels >= 0) & (labels < n)
    target = F.one_hot(labels.clamp(0, n - 1), n).to(z.dtype) * known.unsqueeze(-1)
    return F.binary_cross_entropy_with_logits(z, target)


def swap_alignment_loss(
    protos: torch.Tensor, negs: torch.Tensor, protos_swap: torch.Tensor, negs_swap: torch.Tensor
) -> torch.Tensor:
    """DNPG's swap-alignment loss L_SA (the DNPG paper's L_SA), a two-way Chamfer match in cosine space.

    protos P [E, N, D] and negs Q [E, J, D] of the primary task; protos_swap P' [E, M, D] and negs_swap Q' of the
    swapped task. With everything L2-normalised:
    a = mean_{q in Q'} max_{p in P} cos(q, p); b = mean_{p in P} max_{q in Q'} cos(p, q); c, d the same for
    (Q, P'); L_SA = -(a + b + c + d) / 2. The NPs of one task must land on (a, c) and cover (b, d) the real
    prototypes of the classes that task treats as unknown. Means run over episodes and elements, as in the
    original (all episodes have the same sizes, so this is the mean of the per-episode values).
    """
    qs_p = cosine(negs_swap, protos)  # [E, J', N]
    qp_s = cosine(negs, protos_swap)  # [E, J, M]
    a = qs_p.amax(-1).mean()
    b = qs_p.amax(-2).mean()
    c = qp_s.amax(-1).mean()
    d = qp_s.amax(-2).mean()
    return -(a + b + c + d) / 2


# ----------------------------------------------------------------------------------------------------------------
# attention over the base memory
# ----------------------------------------------------------------------------------------------------------------


class CrossAttention(nn.Module):
    """TANE's single-head attention of class prototypes over a base memory (the TANE paper's prototype
    calibration).

    alpha_cb = softmax_b(<W_q q_c + U_q s_c, W_k k_b + U_k s_b> / sqrt(dim)), dropout on alpha;
    out_c = q_c + Dropout(W_o sum_b alpha_cb W_v v_b) (``residual=False`` drops the q_c term).
    Projections are bias-free and initialised as in the original code. The memory may be shared by all episodes
    ([B, D] or [1, B, D]: projected once) or per episode ([E, B, D]); ``key_mask`` [E, B] (True = usable) removes
    the episode's own classes from the memory during meta-training. Each prototype attends independently (no
    attention among support prototypes).
    """

    def __init__(self, dim: int, sem_dim: int | None = None, attn_dropout: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.dim = dim
        self.w_q = nn.Linear(dim, dim, bias=False)
        self.w_k = nn.Linear(dim, dim, bias=False)
        self.w_v = nn.Linear(dim, dim, bias=False)
        std = math.sqrt(2.0 / (dim + dim))
        for lin in (self.w_q, self.w_k, self.w_v):
            nn.init.normal_(lin.weight, mean=0.0, std=std)
        if sem_dim is not None:  # SEMAN-G: semantic terms added to query and key
            self.u_q = nn.Linear(sem_dim, dim, bias=False)
            self.u_k = nn.Linear(sem_dim, dim, bias=False)
            for lin in (self.u_q, self.u_k):
                # the original's std sqrt(2 / 600) for 300-d word vectors
                nn.init.normal_(lin.weight, mean=0.0, std=math.sqrt(2.0 / (2 * sem_dim)))
        else:
            self.u_q = self.u_k = None
        self.w_o = nn.Linear(dim, dim, bias=False)
        nn.init.xavier_normal_(self.w_o.weight)
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        q_sem: torch.Tensor | None = None,
        k_sem: torch.Tensor | None = None,
        residual: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [E, N, D]; k, v [B, D] or [E|1, B, D]; returns (out [E, N, D], alpha after dropout [E, N, B])."""
        k = k.unsqueeze(0) if k.dim() == 2 else k
        v = v.unsqueeze(0) if v.dim() == 2 else v
        qp, kp = self.w_q(q), self.w_k(k)
        if self.u_q is not None and q_sem is not None:
            qp = qp + self.u_q(q_sem)
            kp = kp + self.u_k(k_sem if k_sem.dim() == 3 else k_sem.unsqueeze(0))
        score = qp @ kp.transpose(-1, -2) / math.sqrt(self.dim)  # [E, N, B]
        if key_mask is not None:
            score = score.masked_fill(~key_mask.unsqueeze(1), float("-inf"))
        alpha = self.attn_dropout(torch.softmax(score, dim=-1))
        out = self.dropout(self.w_o(alpha @ self.w_v(v)))
        return (q + out if residual else out), alpha

    def self_attend(self, q: torch.Tensor) -> torch.Tensor:
        """TANE's degenerate ``att`` variant: each prototype is its own single key and value.

        alpha = 1 (then dropout), so this is the residual linear map q + Dropout(W_o Dropout(1) W_v q).
        """
        e, n, d = q.shape
        flat = q.reshape(e * n, 1, d)
        out, _ = self.forward(flat, flat, flat)
        return out.reshape(e, n, d)


# ----------------------------------------------------------------------------------------------------------------
# the shared head
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TaskOutput:
    """What a negative-prototype generator returns for one task (E episodes, N ways, J negatives)."""

    calibrated: torch.Tensor  # [E, N, D] calibrated prototypes p̂_c
    units: torch.Tensor  # [E, N, D] per-class reciprocal units u_c (L_unit)
    negs: torch.Tensor  # [E, J, D] negative prototypes


class NegProtoHead(Head):
    """Base of the TANE / DNPG heads: meta-training, episode losses and the test-time interface.

    Subclasses define ``_task_forward(protos, key_mask, support_sem) -> TaskOutput``, ``_scores(query, out)
    -> [E, m, N+1]`` (known logits, then the negative column), ``_unit_tau()`` and ``_prepare_base(...)``;
    optionally ``_extra_loss(primary, swapped) -> (name, weight, value)``.

    Usage::

        data = MetaTrainData(feats, labels, train_rows, val_rows, base_weights=W)
        head = TANEHead(feat_dim=640, n_base_classes=64).meta_train(data)
        head.fit(feats[batch.support], batch.support_labels)      # [E, N*K, D], [E, N*K]
        head.logits(feats[batch.query])                           # [E, m, N] closed-set logits
        head.open_score(feats[batch.query])                       # [E, m] P(negative column)
    """

    input_kind = EPISODES
    needs_meta_training = True
    gives_unknown_score = True
    has_unknown_column = True

    def __init__(
        self,
        feat_dim: int,
        n_base_classes: int,
        *,
        funit: float,
        train_weight_base: bool,
        learning_rate: float,
        momentum: float,
        weight_decay: float,
        cosine: bool,
        lr_decay_epochs: Sequence[int],
        lr_decay_rate: float,
        plateau_patience: int,
        epochs: int,
        episodes_per_epoch: int,
        episodes_per_step: int,
        val_episodes: int,
        device: str | torch.device,
        seed: int,
    ):
        super().__init__(device)
        self.feat_dim = int(feat_dim)
        self.n_base_classes = int(n_base_classes)
        self.funit = float(funit)
        self.train_weight_base = bool(train_weight_base)
        self.learning_rate = float(learning_rate)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.cosine = bool(cosine)
        self.lr_decay_epochs = tuple(int(e) for e in lr_decay_epochs)
        self.lr_decay_rate = float(lr_decay_rate)
        self.plateau_patience = int(plateau_patience)
        self.epochs = int(epochs)
        self.episodes_per_epoch = int(episodes_per_epoch)
        self.episodes_per_step = int(episodes_per_step)
        self.val_episodes = int(val_episodes)
        self.seed = int(seed)
        # base memory: one row per base class, in the order of base_classes_ (sorted store class ids)
        self.base_weights_ = nn.Parameter(torch.zeros(n_base_classes, feat_dim), requires_grad=self.train_weight_base)
        self.register_buffer("base_classes_", torch.arange(n_base_classes))
        self.register_buffer("base_ready_", torch.tensor(False))
        # fitted test episodes
        self._fitted: TaskOutput | None = None
        self.squeeze_ = False
        self.prototypes_: torch.Tensor | None = None
        self.neg_prototypes_: torch.Tensor | None = None
        self.history_: list[dict] = []
        self.best_epoch_: int | None = None
        self.last_losses_: dict[str, float] = {}

    # -- hooks ------------------------------------------------------------------------------------------------
    def _task_forward(self, protos, key_mask, support_sem) -> TaskOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def _scores(self, query: torch.Tensor, out: TaskOutput) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _unit_tau(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _extra_loss(self, primary: TaskOutput, swapped: TaskOutput | None) -> tuple[str, float, torch.Tensor] | None:
        """An extra loss term of the method: (name, weight, unweighted value), or None."""
        return None

    def _prepare_base(self, feats, labels, train_rows, base_classes, base_weights, support_views, seed, data):
        """Install the base memory before meta-training (``data``: the :class:`MetaTrainData`, for what else the
        method reads from it)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _class_semantics(self, store_classes: torch.Tensor) -> torch.Tensor | None:
        """Word vectors [E, N, S] of the given store classes, for heads that use them (TANE SEMAN-G)."""
        return None

    # -- checks -----------------------------------------------------------------------------------------------
    def _check_base(self) -> None:
        if not bool(self.base_ready_):
            raise NotFittedError(
                f"{type(self).__name__} has no base memory yet: call meta_train(...) (or set the base memory) first"
            )

    def _check_episodes(self) -> None:
        if self.prototypes_ is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted yet: call fit(support, support_labels) first")

    def _key_mask(self, episode_classes, n_episodes: int) -> torch.Tensor | None:
        """[E, B] True where a base class may be attended to: all but the episode's own classes (so the
        generator cannot copy them).

        episode_classes [E, W] store class ids; ids that are not base classes remove nothing.
        """
        if episode_classes is None:
            return None
        ec = as_tensor(episode_classes, self.device, None).long().reshape(n_episodes, -1)
        mask = ~(ec.unsqueeze(-1) == self.base_classes_.view(1, 1, -1)).any(1)
        if not bool(mask.any(1).all()):
            raise ValueError("an episode uses every base class: the base memory would be empty; use fewer ways")
        return mask

    # -- losses -----------------------------------------------------------------------------------------------
    def _task_losses(self, out: TaskOutput, query, labels):
        """(L_cls, L_unit) of one task. labels [E, m] in 0..N-1, anything else = unknown (class N)."""
        n = out.calibrated.shape[1]
        scores = self._scores(query, out)  # [E, m, N+1]
        target = torch.where((labels >= 0) & (labels < n), labels, torch.full_like(labels, n))
        l_cls = F.cross_entropy(scores.reshape(-1, n + 1), target.reshape(-1))
        l_unit = reciprocal_unit_loss(out.units, query, target, self._unit_tau())
        return l_cls, l_unit

    def training_step(
        self,
        support,
        support_labels,
        query,
        query_labels,
        *,
        ways: int = 5,
        episode_classes=None,
        support_semantics=None,
    ) -> torch.Tensor:
        """The meta-training loss of a batch of E (ways + M)-way base-class episodes (differentiable).

        support [E, S, D] with support_labels [E, S] in 0..W-1 (W = ways + M; any number of views per class);
        query [E, m, D] with query_labels [E, m] in 0..W-1, or -1 for a query whose class has no support (unknown
        to both tasks). Classes 0..ways-1 form the primary closed set; classes ways..W-1 are the pseudo-open
        classes, whose supports build the swapped task. The labels of both tasks are rebuilt explicitly (the
        original reuses the primary label vector for the swapped task, which is right only when both query blocks
        have the same number of classes in class order). Without pseudo-open supports (W == ways) only the primary
        task is used.

        ``episode_classes`` [E, W]: store class ids of the episode's classes (``batch.classes``), which are removed
        from the base memory so the generator cannot copy them. ``support_semantics`` [E, W, S]: word vectors (TANE
        SEMAN-G with word vectors only). Dropout follows the module's train/eval mode; the caller sets it.
        Returns L = sum_T L_cls(T) + funit * sum_T L_unit(T) (+ the method's extra term); the components are kept
        in ``last_losses_``.
        """
        support = as_tensor(support, self.device)
        query = as_tensor(query, self.device)
        support, _ = batched(support, 3)
        query, _ = batched(query, 3)
        s_lab = as_tensor(support_labels, self.device, None).long().reshape(support.shape[:2])
        q_lab = as_tensor(query_labels, self.device, None).long().reshape(query.shape[:2])
        n_ep = support.shape[0]
        w = int(s_lab.max()) + 1
        if w < ways:
            raise ValueError(f"support labels cover {w} classes but ways={ways}")
        protos_all = class_means(support, s_lab, w)
        key_mask = self._key_mask(episode_classes, n_ep)
        sem_all = None
        if support_semantics is not None:
            sem_all = as_tensor(support_semantics, self.device).reshape(n_ep, w, -1)

        # primary task: classes 0..ways-1 known; pseudo-open and unknown queries are unknown (label -1 -> N)
        primary = torch.where(q_lab < ways, q_lab, torch.full_like(q_lab, -1))
        tasks = [(protos_all[:, :ways], primary, None if sem_all is None else sem_all[:, :ways])]
        if w > ways:
            # swapped task: the pseudo-open classes become the closed set (labels shifted to 0..M-1) and the
            # primary queries become unknown
            swapped = torch.where(q_lab >= ways, q_lab - ways, torch.full_like(q_lab, -1))
            tasks.append((protos_all[:, ways:], swapped, None if sem_all is None else sem_all[:, ways:]))
        if len(tasks) == 2 and w == 2 * ways:
            # N == M: run both tasks as one batch of 2E episodes, so the base memory is projected once
            both = self._task_forward(
                torch.cat([tasks[0][0], tasks[1][0]]),
                None if key_mask is None else torch.cat([key_mask, key_mask]),
                None if sem_all is None else torch.cat([tasks[0][2], tasks[1][2]]),
            )
            outs = [
                TaskOutput(both.calibrated[:n_ep], both.units[:n_ep], both.negs[:n_ep]),
                TaskOutput(both.calibrated[n_ep:], both.units[n_ep:], both.negs[n_ep:]),
            ]
        else:
            outs = [self._task_forward(p, key_mask, sem) for p, _, sem in tasks]
        l_cls, l_unit = self._task_losses(outs[0], query, primary)
        losses = {"cls": l_cls.item(), "unit": l_unit.item()}
        if len(tasks) == 2:
            l_cls_s, l_unit_s = self._task_losses(outs[1], query, tasks[1][1])
            losses.update(cls_swap=l_cls_s.item(), unit_swap=l_unit_s.item())
            l_cls, l_unit = l_cls + l_cls_s, l_unit + l_unit_s
        out_p, out_s = outs[0], (outs[1] if len(tasks) == 2 else None)
        loss = l_cls + self.funit * l_unit
        extra = self._extra_loss(out_p, out_s)
        if extra is not None:
            name, weight, value = extra
            losses[name] = value.item()
            loss = loss + weight * value
        losses["total"] = loss.item()
        self.last_losses_ = losses
        return loss

    # -- test-time interface ----------------------------------------------------------------------------------
    def _calibrate(self, support, support_labels, support_semantics=None) -> tuple[TaskOutput, bool]:
        self._check_base()
        support = as_tensor(support, self.device)
        support, squeeze = batched(support, 3)
        if support.shape[-1] != self.feat_dim:
            raise ValueError(f"support features have dimension {support.shape[-1]}, the head expects {self.feat_dim}")
        labels = as_tensor(support_labels, self.device, None).long().reshape(support.shape[:2])
        n = int(labels.max()) + 1
        protos = class_means(support, labels, n)
        sem = None
        if support_semantics is not None:
            sem = as_tensor(support_semantics, self.device).reshape(support.shape[0], n, -1)
        was_training = self.training
        self.eval()  # no dropout at test time
        try:
            with torch.no_grad():
                out = self._task_forward(protos, None, sem)  # test memory = every base class
        finally:
            self.train(was_training)
        return out, squeeze

    def fit(self, support_feats, support_labels, support_semantics=None) -> "NegProtoHead":
        """Calibrate the prototypes and generate the negative prototype(s) of E test episodes.

        support_feats [E, S, D] or [S, D]; support_labels [E, S] or [S] in 0..N-1 (any number of views per class:
        with the 5 augmented test views, pass all K x 5 of them). Stores ``prototypes_`` [E, N, D] and
        ``neg_prototypes_`` [E, J, D]. Returns self.
        """
        out, squeeze = self._calibrate(support_feats, support_labels, support_semantics)
        self._fitted = out
        self.prototypes_ = out.calibrated
        self.neg_prototypes_ = out.negs
        self.squeeze_ = squeeze
        return self

    def _query(self, query) -> tuple[torch.Tensor, bool]:
        self._check_episodes()
        q = as_tensor(query, self.device)
        q, squeeze = batched(q, 3)
        if q.shape[0] != self.prototypes_.shape[0]:
            raise ValueError(f"query has {q.shape[0]} episodes, fit saw {self.prototypes_.shape[0]}")
        return q, squeeze

    def logits_with_negative(self, query) -> torch.Tensor:
        """[E, m, N+1] logits: the N calibrated prototypes, then the negative column (for (N+1)-way F1)."""
        q, squeeze = self._query(query)
        with torch.no_grad():
            s = self._scores(q, self._fitted)
        return s[0] if squeeze else s

    def logits(self, query) -> torch.Tensor:
        """Closed-set logits [E, m, N] (or [m, N] for an unbatched fit): the first N columns."""
        s = self.logits_with_negative(query)
        return s[..., :-1]

    def open_score(self, query) -> torch.Tensor:
        """P_{N+1}: softmax probability of the negative column, [E, m] (higher = unknown)."""
        return torch.softmax(self.logits_with_negative(query), dim=-1)[..., -1]

    # -- meta-training ----------------------------------------------------------------------------------------
    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def evaluate_episodes(self, feats: torch.Tensor, batch, chunk: int = 200) -> tuple[float, float]:
        """Mean closed accuracy (known queries, argmax over N) and mean per-episode AUROC of ``open_score``."""
        accs, aurocs = [], []
        for i in range(0, batch.support.shape[0], chunk):
            sl = slice(i, i + chunk)
            sem = self._class_semantics(batch.classes[sl])
            out, _ = self._calibrate(feats[batch.support[sl]], batch.support_labels[sl], sem)
            q = feats[batch.query[sl]]
            lab = batch.query_labels[sl].to(self.device)
            with torch.no_grad():
                s = self._scores(q, out)
            known = lab >= 0
            pred = s[..., :-1].argmax(-1)
            accs.append(((pred == lab) & known).sum(1).float() / known.sum(1).clamp_min(1))
            # float32, as the pairwise count it replaced: the selection criterion below compares these values
            aurocs.append(batched_auroc(torch.softmax(s, -1)[..., -1], ~known).to(torch.float32))
        acc, auroc = torch.cat(accs), torch.cat(aurocs)
        return float(acc.mean()), float(torch.nanmean(auroc))

    def meta_train(self, data: MetaTrainData, seed: int | None = None) -> "NegProtoHead":
        """Meta-train the head on cached base-class features (backbone frozen: the "-frozen" variant).

        ``data.features`` [n, D] (the whole store, in memory), ``data.labels`` [n] store class ids;
        ``data.train_rows``: rows of the base classes (episodes and the base memory come from them);
        ``data.val_rows``: rows of the validation classes, used only for model selection (val accuracy + val AUROC;
        the originals select on test episodes, which biases the reported numbers) and the plateau schedule (without
        val episodes, ``cosine=True`` keeps the learning rate constant and the last epoch is kept).
        ``data.base_weights`` [B, D]: the backbone classifier rows of the base classes, row b <->
        ``data.base_classes[b]`` (the sorted distinct labels of train_rows unless given).

        Each epoch draws ``episodes_per_epoch`` (ways + open_ways)-way ``shots``-shot ``queries``-query episodes
        from train_rows (episode i of the run is seeded by (seed, i)) and takes one SGD step (Nesterov) per
        ``episodes_per_step`` episodes, batched as one tensor program; each episode is used as primary and swapped
        task. The episode shape is the protocol's (``data.ways`` ...) where given, else 5-way 1-shot 15-query with
        5 open ways; the schedule (``epochs``, ``episodes_per_epoch``, ``episodes_per_step``, ``learning_rate``,
        ``val_episodes``, ...) is the constructor's (change it with ``set_params``). ``seed`` (default: the
        constructor's) fixes the episodes, the dropout and the view choice. ``data.support_views`` [V, n, D]
        (optional): cached augmented views of every row (crop + jitter + flip, as the originals augment supports
        and open-supports); each training support then uses one of its V views at random (queries and validation
        use the clean features). ``data.progress``: True prints one line per epoch on stderr; a callable gets
        ``(head name, epoch, epochs, train loss)`` after every epoch.
        After training, the val-best weights are loaded (``history_`` logs every epoch, including the last;
        ``best_epoch_`` is 1-based). Returns self.
        """
        shape = data.episode_shape(ways=5, shots=1, queries=15, open_ways=5)
        ways, shots, queries, open_ways = shape["ways"], shape["shots"], shape["queries"], shape["open_ways"]
        epochs, epe, eps = self.epochs, self.episodes_per_epoch, self.episodes_per_step
        lr = self.learning_rate
        seed = self.seed if seed is None else int(seed)
        n_val = self.val_episodes
        progress: bool | Callable[..., None] = data.progress
        feats = as_tensor(data.features, self.device)
        views = None if data.support_views is None else as_tensor(data.support_views, self.device)
        if views is not None and (views.dim() != 3 or views.shape[1:] != feats.shape):
            raise ValueError(f"support_views must be [V, {feats.shape[0]}, {feats.shape[1]}], got {tuple(views.shape)}")
        labels_np = data.labels
        train_rows = data.train_rows
        base_classes = np.asarray(data.base_classes).reshape(-1)
        if len(base_classes) != self.n_base_classes:
            raise ValueError(
                f"train_rows hold {len(base_classes)} base classes, the head was built for n_base_classes="
                f"{self.n_base_classes}"
            )
        if ways + open_ways >= self.n_base_classes:
            raise ValueError(
                f"ways + open_ways = {ways + open_ways} leaves no base memory out of {self.n_base_classes} classes"
            )
        with rng_scope(seed, self.device):
            self._prepare_base(feats, labels_np, train_rows, base_classes, data.base_weights, views, seed, data)

        val_batch = None
        if data.val_rows is not None and n_val > 0 and len(data.val_rows) > 0:
            val_batch = sample_episodes(
                labels_np, data.val_rows, ways=ways, shots=shots, queries=queries, open_ways=open_ways,
                seed=[seed, 1], start=0, count=n_val,
            )  # fmt: skip

        params = self._trainable()
        opt = torch.optim.SGD(
            params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay, nesterov=self.momentum > 0
        )
        plateau = None
        if self.cosine and val_batch is not None:
            # the original's `cosine` flag: ReduceLROnPlateau on the best accuracy so far (here: val, not test)
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="max", factor=0.1, patience=self.plateau_patience
            )
        best_score, best_state, best_acc = -math.inf, None, 0.0
        self.history_ = []
        with rng_scope(seed, self.device):
            for epoch in range(1, epochs + 1):
                if not self.cosine:  # step schedule (one parameter group: the head)
                    factor = self.lr_decay_rate ** sum(epoch > d for d in self.lr_decay_epochs)
                    for g in opt.param_groups:
                        g["lr"] = lr * factor
                batch = sample_episodes(
                    labels_np, train_rows, ways=ways + open_ways, shots=shots, queries=queries, open_ways=0,
                    seed=[seed, 0], start=(epoch - 1) * epe, count=epe,
                )  # fmt: skip
                self.train()
                total, steps = 0.0, 0
                for i in range(0, epe, eps):
                    sl = slice(i, min(i + eps, epe))
                    s_rows = batch.support[sl].to(self.device)
                    if views is None:
                        s_feats = feats[s_rows]
                    else:  # one random augmented view per support
                        v = torch.randint(0, views.shape[0], s_rows.shape, device=self.device)
                        s_feats = views[v, s_rows]
                    loss = self.training_step(
                        s_feats,
                        batch.support_labels[sl],
                        feats[batch.query[sl].to(self.device)],
                        batch.query_labels[sl],
                        ways=ways,
                        episode_classes=batch.classes[sl],
                        support_semantics=self._class_semantics(batch.classes[sl]),
                    )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.item()
                    steps += 1
                self.eval()
                record = {"epoch": epoch, "train_loss": total / max(steps, 1), "lr": opt.param_groups[0]["lr"]}
                if val_batch is not None:
                    acc, auroc = self.evaluate_episodes(feats, val_batch)
                    record.update(val_acc=acc, val_auroc=auroc)
                    best_acc = max(best_acc, acc)
                    if acc + auroc > best_score:
                        best_score = acc + auroc
                        best_state = {k: v.detach().clone() for k, v in self.state_dict().items()}
                        self.best_epoch_ = epoch
                    if plateau is not None:
                        plateau.step(best_acc)
                self.history_.append(record)
                if callable(progress):
                    progress(self.head_name, epoch, epochs, record["train_loss"])
                elif progress:
                    msg = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
                    print(f"[{self.head_name}] {msg}", file=sys.stderr, flush=True)
        if best_state is not None:
            self.load_state_dict(best_state)
        else:
            self.best_epoch_ = epochs
        self.eval()
        self._fitted = self.prototypes_ = self.neg_prototypes_ = None  # episodes fitted before training are stale
        return self

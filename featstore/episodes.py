"""Vectorised sampling of few-shot (open-set) episodes: N-way K-shot, Q queries per class, plus M unknown classes.

An episode draws ``ways + open_ways`` distinct classes from the candidate rows (a store split, or all rows): the first
``ways`` are the known classes, the rest are the unknown ("open") ones. Every known class contributes ``shots``
support rows and ``queries`` query rows (disjoint); every unknown class contributes ``queries`` query rows (and,
with ``open_shots > 0``, ``open_shots`` "open-support" rows for the swapped task of TANE / DNPG meta-training).

Determinism. Episode ``i`` is a pure function of ``(seed, i)`` and of the candidate set: it does not depend on the
batch it is drawn in, on the batch size or on which other episodes are drawn. Every random number is a
counter-based hash (splitmix64 of ``(seed, i, stream, j)``) rather than the state of a generator, which is what
makes a batch of thousands of episodes a handful of numpy array operations:

- classes: keys ``[E, C]`` over the candidate classes, argsort, the first ``N + M`` (known first);
- examples: ``K + Q`` distinct rows of each chosen class by Floyd's algorithm vectorised over ``[E, N + M]``
  (``K + Q`` steps, whatever the class sizes), put in random order by sorted keys (support first, then queries);
- support views: keys ``[E, N * K, V]`` over the store's cached views, the first ``views_per_support``.

So identical episodes are seen by every head, run and machine for one seed (heads are compared on the same
episodes, not just on the same number of them), and the view choice of the support augmentation is seeded from
the episode too.

Layout of an :class:`EpisodeBatch` (E episodes; all row ids are *store rows*):

- ``support`` ``[E, N*K]`` class-major (way 0's K shots first), ``support_labels`` in ``0..N-1``;
- ``query`` ``[E, N*Q + M*Q]``: the N*Q known queries first (class-major), then the M*Q unknown ones;
  ``query_labels`` ``0..N-1`` for known and ``-1`` for unknown;
- ``classes`` ``[E, N]`` and ``open_classes`` ``[E, M]``: store class ids;
- ``support_views`` ``[E, N*K, V']`` view ids (into the store's ``views`` array) per support row, or None.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Iterator, Sequence

import numpy as np
import torch

from featstore.errors import UserError

__all__ = ["EpisodeBatch", "EpisodeSampler", "episode_keys"]

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)

# Independent random streams of one episode.
STREAM_CLASSES, STREAM_EXAMPLES, STREAM_VIEWS, STREAM_OPEN_VIEWS, STREAM_ORDER = 0, 1, 2, 3, 4


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * _M1
        x = x ^ (x >> np.uint64(27))
        x = x * _M2
        return x ^ (x >> np.uint64(31))


def _episode_base(seed: int, episodes: np.ndarray, stream: int) -> np.ndarray:
    """[E] uint64 state of (seed, episode, stream)."""
    s = np.asarray([seed & _MASK64], dtype=np.uint64)
    e = np.asarray(episodes, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        b = _mix64(_mix64(s ^ np.uint64(0x5EED5EED5EED5EED)) + (e + np.uint64(1)) * _GOLDEN)
        return _mix64(b ^ ((np.uint64(stream) + np.uint64(1)) * _M2))


def episode_keys(seed: int, episodes: np.ndarray, stream: int, positions: np.ndarray) -> np.ndarray:
    """uint64 random keys for ``positions`` (any shape ``[E, ...]``) of each episode: a pure function of
    ``(seed, episode, stream, position)``. Sorting keys gives a random permutation independent of batching."""
    base = _episode_base(seed, episodes, stream)
    pos = np.asarray(positions).astype(np.uint64)
    base = base.reshape((-1,) + (1,) * (pos.ndim - 1))
    with np.errstate(over="ignore"):
        return _mix64(base + (pos + np.uint64(1)) * _GOLDEN)


def _first_k_by_key(keys: np.ndarray, k: int) -> np.ndarray:
    """Indices (along the last axis) of the k smallest keys, in increasing key order."""
    n = keys.shape[-1]
    if k <= 0:
        return np.zeros(keys.shape[:-1] + (0,), dtype=np.int64)
    if k < n // 4:
        part = np.argpartition(keys, k - 1, axis=-1)[..., :k]
        order = np.argsort(np.take_along_axis(keys, part, axis=-1), axis=-1, kind="stable")
        return np.take_along_axis(part, order, axis=-1)
    return np.argsort(keys, axis=-1, kind="stable")[..., :k]


def _uniform(keys: np.ndarray) -> np.ndarray:
    """uint64 keys -> float64 in [0, 1)."""
    return (keys >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def _choose_distinct(seed: int, episodes: np.ndarray, n: np.ndarray, k: int) -> np.ndarray:
    """For every ``[E, S]`` entry, ``k`` distinct integers of ``0..n-1`` in uniformly random order.

    Floyd's algorithm vectorised over the entries (k steps over ``[E, S]`` arrays, so the cost does not grow with
    the class sizes), then a random order from sorted keys. Step t draws from the hash of (seed, episode,
    STREAM_EXAMPLES, slot, t): a pure function of the episode.
    """
    E, S = n.shape
    chosen = np.empty((E, S, k), dtype=np.int64)
    slots = np.arange(S, dtype=np.int64) * (k + 1)
    for t in range(k):
        j = n - k + t                                                    # [E, S]
        u = _uniform(episode_keys(seed, episodes, STREAM_EXAMPLES, np.broadcast_to(slots + t, (E, S))))
        r = np.minimum((u * (j + 1)).astype(np.int64), j)
        if t:
            r = np.where((chosen[:, :, :t] == r[..., None]).any(axis=-1), j, r)
        chosen[:, :, t] = r
    keys = episode_keys(seed, episodes, STREAM_ORDER,
                        np.broadcast_to(slots[:, None] + np.arange(k), (E, S, k)))
    return np.take_along_axis(chosen, np.argsort(keys, axis=-1, kind="stable"), axis=-1)


def _long(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.int64, order="C"))


@dataclass
class EpisodeBatch:
    """E episodes as index tensors (store rows); see the module docstring for the layout."""

    support: torch.Tensor         # [E, N*K] store rows, class-major
    support_labels: torch.Tensor  # [E, N*K] in 0..N-1
    query: torch.Tensor           # [E, N*Q + M*Q] store rows, known queries first
    query_labels: torch.Tensor    # [E, N*Q + M*Q] 0..N-1 known, -1 unknown
    classes: torch.Tensor         # [E, N] store class ids of the known ways
    open_classes: torch.Tensor    # [E, M] store class ids of the unknown classes
    support_views: torch.Tensor | None = None       # [E, N*K, V'] view ids per support row
    episodes: torch.Tensor | None = None            # [E] episode indices
    open_support: torch.Tensor | None = None        # [E, M*open_shots] rows (meta-training: swapped task)
    open_support_views: torch.Tensor | None = None  # [E, M*open_shots, V'] view ids

    def __len__(self) -> int:
        return int(self.support.shape[0])

    @property
    def ways(self) -> int:
        return int(self.classes.shape[1])

    @property
    def open_ways(self) -> int:
        return int(self.open_classes.shape[1])

    @property
    def is_unknown(self) -> torch.Tensor:
        """[E, m] bool: the query is from an unknown class."""
        return self.query_labels < 0

    def to(self, device: torch.device | str) -> "EpisodeBatch":
        """The same batch with every tensor on ``device``."""
        return EpisodeBatch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
                               for f in fields(self)})

    def support_features(self, features: torch.Tensor, views: torch.Tensor | None = None,
                         views_row_map: torch.Tensor | None = None) -> torch.Tensor:
        """``[E, N*K, D]`` support features: rows of ``features`` (``[n_rows, D]``, indexed by store row), or, when
        ``views`` (``[V, n, D]``) is given and the batch has ``support_views``, the mean of the chosen views of each
        support row. ``views_row_map`` maps store rows to the second axis of ``views`` (when only a split's views
        were loaded)."""
        return _gather(self.support, self.support_views, features, views, views_row_map)

    def open_support_features(self, features: torch.Tensor, views: torch.Tensor | None = None,
                              views_row_map: torch.Tensor | None = None) -> torch.Tensor:
        """``[E, M*open_shots, D]``, like :meth:`support_features` for the open-support rows."""
        if self.open_support is None:
            raise ValueError("this batch has no open support (sample with open_shots > 0)")
        return _gather(self.open_support, self.open_support_views, features, views, views_row_map)

    def query_features(self, features: torch.Tensor) -> torch.Tensor:
        """``[E, m, D]`` query features (queries are never augmented)."""
        return gather_rows(features, self.query)


def gather_rows(features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``features[rows]`` for an index tensor of any shape: ``[*rows.shape, D]``."""
    rows = rows.to(features.device)
    return features.index_select(0, rows.reshape(-1)).reshape(*rows.shape, features.shape[-1])


def _gather(rows, view_ids, features, views, row_map):
    if views is None or view_ids is None or view_ids.shape[-1] == 0:
        return gather_rows(features, rows)
    rows = rows.to(views.device)
    if row_map is not None:
        rows = row_map.to(views.device)[rows]
        if bool((rows < 0).any()):
            raise ValueError("a support row has no entry in views_row_map")
    v, n, d = views.shape
    flat = view_ids.to(views.device) * n + rows.unsqueeze(-1)       # [E, S, V'] into views.reshape(V*n, D)
    picked = views.reshape(v * n, d).index_select(0, flat.reshape(-1)).reshape(*flat.shape, d)
    return picked.mean(dim=-2)


class EpisodeSampler:
    """N-way K-shot episodes with Q queries per known class and M unknown classes of Q queries each.

    ``labels``: the store's label array indexed by store row (``store.labels``), or the candidates' own labels
    aligned with ``rows`` (same length). ``rows``: candidate store rows (a split); None = all rows.
    ``n_views``: number of cached views in the store (``store.layout.views``); with ``views_per_support > 0`` each
    support row gets that many distinct view ids drawn from the episode's random stream.
    ``open_shots``: open-support rows per unknown class (meta-training's swapped task); 0 at test.
    ``drop_small``: drop (with a warning) classes with too few rows instead of raising UserError.
    ``name`` / ``class_names``: used in error messages only.
    """

    def __init__(self, labels: np.ndarray, rows: np.ndarray | None = None, *, ways: int = 5, shots: int = 1,
                 queries: int = 15, open_ways: int = 5, seed: int = 0, n_views: int = 0, views_per_support: int = 0,
                 open_shots: int = 0, drop_small: bool = False, name: str = "the candidate rows",
                 class_names: Sequence[str] | None = None):
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise UserError(f"labels must be one-dimensional, got shape {labels.shape}")
        for what, value, low in (("ways", ways, 1), ("shots", shots, 1), ("queries", queries, 1),
                                 ("open ways", open_ways, 0), ("open shots", open_shots, 0), ("views", n_views, 0),
                                 ("views per support", views_per_support, 0)):
            if int(value) != value or value < low:
                raise UserError(f"{what} must be an integer >= {low}, not {value!r}")
        if views_per_support > n_views:
            if n_views == 0:
                raise UserError(f"{views_per_support} views per support image requested but the store has no "
                                f"views; extract with --views or use 0 views per support")
            raise UserError(f"{views_per_support} views per support image requested but the store has only "
                            f"{n_views}; use at most {n_views}")
        if rows is None:
            rows = np.arange(len(labels), dtype=np.int64)
            cand_labels = labels
        else:
            rows = np.asarray(rows, dtype=np.int64).ravel()
            if len(labels) == len(rows):
                cand_labels = labels  # aligned with rows (identical to labels[rows] for a sorted full row set)
            else:
                if len(rows) and (rows.min() < 0 or rows.max() >= len(labels)):
                    raise UserError(f"candidate rows outside 0..{len(labels) - 1}")
                cand_labels = labels[rows]
        cand_labels = np.asarray(cand_labels, dtype=np.int64)
        keep = cand_labels >= 0  # unlabelled rows never enter an episode
        rows, cand_labels = rows[keep], cand_labels[keep]

        self.ways, self.shots, self.queries, self.open_ways = int(ways), int(shots), int(queries), int(open_ways)
        self.open_shots = int(open_shots)
        self.seed = int(seed)
        self.n_views, self.views_per_support = int(n_views), int(views_per_support)
        self.name = name
        self.need = max(self.shots, self.open_shots if self.open_ways else 0) + self.queries

        def cname(c: int) -> str:
            if class_names is not None and 0 <= c < len(class_names):
                return f"class {c} ({class_names[c]!r})"
            return f"class {c}"

        class_ids, counts = np.unique(cand_labels, return_counts=True)
        small = counts < self.need
        what = f"{self.shots}-shot + {self.queries} queries" + (
            f" (open support {self.open_shots} + {self.queries})" if self.open_shots > self.shots and self.open_ways
            else "")
        if small.any():
            worst = int(np.argmin(counts))
            if not drop_small:
                raise UserError(
                    f"{cname(int(class_ids[worst]))} has {int(counts[worst])} examples in {name} "
                    f"({int(small.sum())} class(es) below the need); {what} needs {self.need} per class: use "
                    f"fewer shots/queries or drop small classes")
            warnings.warn(f"dropping {int(small.sum())} class(es) of {name} with fewer than {self.need} examples "
                          f"(smallest: {cname(int(class_ids[worst]))} with {int(counts[worst])})", stacklevel=2)
            dropped = np.isin(cand_labels, class_ids[small])
            rows, cand_labels = rows[~dropped], cand_labels[~dropped]
            class_ids, counts = class_ids[~small], counts[~small]
        total = self.ways + self.open_ways
        if len(class_ids) < total:
            raise UserError(f"{name} has {len(class_ids)} usable classes but {self.ways}-way with {self.open_ways} "
                            f"open classes needs {total}; use fewer ways / open ways or a larger split")
        order = np.lexsort((rows, cand_labels))  # grouped by class, rows ascending inside a class
        self.grouped_rows = rows[order]
        self.class_ids = class_ids.astype(np.int64)
        self.counts = counts.astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    @property
    def n_classes(self) -> int:
        return len(self.class_ids)

    @property
    def rows(self) -> np.ndarray:
        return self.grouped_rows

    def sample(self, start: int, count: int) -> EpisodeBatch:
        """Episodes ``start .. start + count - 1`` as one batch."""
        if start < 0 or count < 0:
            raise ValueError(f"episode range must be non-negative (start {start}, count {count})")
        N, K, Q, M, OK = self.ways, self.shots, self.queries, self.open_ways, self.open_shots
        S = N + M
        ep = np.arange(start, start + count, dtype=np.int64)
        E = len(ep)
        # 1. classes: the S smallest keys over the candidate classes; the first N are known.
        C = self.n_classes
        ckeys = episode_keys(self.seed, ep, STREAM_CLASSES, np.broadcast_to(np.arange(C), (E, C)))
        slot = _first_k_by_key(ckeys, S)                                   # [E, S] indices into class_ids
        # 2. examples: `need` distinct rows per chosen class (support first, then queries), uniformly at random.
        cnt, off = self.counts[slot], self.offsets[slot]                   # [E, S]
        local = _choose_distinct(self.seed, ep, cnt, self.need)            # [E, S, need] in 0..cnt-1
        picked = self.grouped_rows[off[..., None] + local]
        support = picked[:, :N, :K].reshape(E, N * K)
        known_q = picked[:, :N, K:K + Q].reshape(E, N * Q)
        open_q = picked[:, N:, OK:OK + Q].reshape(E, M * Q)
        query = np.concatenate([known_q, open_q], axis=1)
        support_labels = np.broadcast_to(np.repeat(np.arange(N), K), (E, N * K))
        query_labels = np.broadcast_to(np.concatenate([np.repeat(np.arange(N), Q), np.full(M * Q, -1)]),
                                       (E, (N + M) * Q))
        classes = self.class_ids[slot]
        views = open_views = open_support = None
        V, Vp = self.n_views, self.views_per_support
        if Vp > 0:
            vpos = np.broadcast_to(np.arange(N * K * V).reshape(N * K, V), (E, N * K, V))
            views = _first_k_by_key(episode_keys(self.seed, ep, STREAM_VIEWS, vpos), Vp)
        if OK > 0 and M > 0:
            open_support = picked[:, N:, :OK].reshape(E, M * OK)
            if Vp > 0:
                vpos = np.broadcast_to(np.arange(M * OK * V).reshape(M * OK, V), (E, M * OK, V))
                open_views = _first_k_by_key(episode_keys(self.seed, ep, STREAM_OPEN_VIEWS, vpos), Vp)
        return EpisodeBatch(
            support=_long(support), support_labels=_long(support_labels), query=_long(query),
            query_labels=_long(query_labels), classes=_long(classes[:, :N]), open_classes=_long(classes[:, N:]),
            support_views=None if views is None else _long(views), episodes=_long(ep),
            open_support=None if open_support is None else _long(open_support),
            open_support_views=None if open_views is None else _long(open_views))

    def batches(self, total: int, batch_size: int, start: int = 0) -> Iterator[EpisodeBatch]:
        """Episodes ``start .. start + total - 1`` in batches of ``batch_size`` (the last may be smaller)."""
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, not {batch_size}")
        for lo in range(start, start + total, batch_size):
            yield self.sample(lo, min(batch_size, start + total - lo))

    def __iter__(self) -> Iterator[EpisodeBatch]:
        """An endless stream of single-episode batches 0, 1, 2, ... (meta-training loops); use
        :meth:`batches` for a fixed number of episodes."""
        i = 0
        while True:
            yield self.sample(i, 1)
            i += 1

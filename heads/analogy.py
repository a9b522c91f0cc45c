"""Analogy-based feature hallucination (Hariharan & Girshick, ICCV 2017), on cached features.

As in the paper and its official code. The pipeline, each stage also usable on its own:

1. :func:`cluster_classes`: every base class is clustered into ``clusters_per_class`` centroids, either with
   the faithful port of Lua-torch ``unsup.kmeans`` (:func:`kmeans_faithful`: random unit Gaussian init,
   argmax(c.x - |c|^2/2) assignment in row blocks, mean update, a centroid whose *cumulative* count is still 0
   is re-seeded to a random data point, a centroid that loses its points keeps its stale position; seeded here,
   unseeded in the original) or with FAISS k-means (``kmeans="faiss"``, a different variant, labelled so).
2. :func:`mine_analogies`: for every class i and ordered centroid pair (a, b), the pair (a', b') of another
   class j that maximises the cosine between the normalised differences
   ``(c_a - c_b) / (|c_a - c_b| + 1e-5)``, with a running best that starts at 0 (only positive cosines win),
   ties to the earliest j; records with score <= 0, A = B or C = D are dropped. Exact (exhaustive) search as
   a blocked GEMM with running max/argmax, the own class masked out; see the function for the exact savings.
3. :class:`AnalogyGenerator`: the MLP [A, C, D] (3d) -> hidden -> hidden -> d with ReLUs (the last one too),
   trained to predict B with CE under a frozen linear classifier + ``mse_weight`` x MSE, SGD with momentum 0.9
   and dampening 0.9, weight decay 1e-4, batch 128, 120k iterations, lr / 10 after 40k and 80k; the analogy
   list is permuted once and walked in order, wrapping (the last batch of a pass may be short).
4. :meth:`AnalogyGenerator.generate`: pads each novel class with m < M real examples by M - m features
   G(seed, C, D), exactly as the official code's generation step.

Heads do no file I/O: :meth:`AnalogyGenerator.to_arrays` / :meth:`AnalogyGenerator.from_arrays` and
:meth:`AnalogyGenerator.cache_key` let the caller (``bench/lowshot.py``) store the trained generator in the
feature store, keyed by the store fingerprint and the hyper-parameters.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .base import as_tensor

__all__ = [
    "AnalogyGenerator",
    "AnalogyNet",
    "cluster_classes",
    "difference_vectors",
    "kmeans_faithful",
    "kmeans_faiss",
    "mine_analogies",
]

#: bump when a change alters what a given set of hyper-parameters produces (invalidates cached generators)
FORMAT_VERSION = 1
_EPS = 1e-5  # the original's epsilon in the difference normalisation


# ------------------------------------------------------------------------------------------------ small helpers
def _to_numpy(x: Any, dtype=None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    return x.astype(dtype, copy=False) if dtype is not None else x


class _Reporter:
    """``progress=True`` -> a tqdm bar on stderr (only on a terminal); a callable -> called as
    ``progress(stage, done, total, loss)``; False / None -> quiet."""

    def __init__(self, progress, stage: str, total: int):
        self.fn = progress if callable(progress) else None
        self.stage, self.total, self.done, self.bar = stage, total, 0, None
        if progress is True:
            import sys

            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=stage, leave=False, dynamic_ncols=True,
                            disable=not sys.stderr.isatty())

    def update(self, n: int = 1, loss: float | None = None) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if self.fn is not None:
            self.fn(self.stage, self.done, self.total, loss)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _class_seed(seed: int, label: int, stream: int) -> np.random.SeedSequence:
    """Independent, reproducible RNG stream per (seed, class label, purpose)."""
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(stream), int(label)])


# ------------------------------------------------------------------------------------------------ 6.3 clustering
def kmeans_faithful(x: np.ndarray, k: int, iters: int = 20, block: int = 1000,
                    rng: np.random.Generator | None = None, init: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Port of Lua-torch ``unsup.kmeans`` as used by the original (float64, like the original's numpy port).

    - init: ``rng.standard_normal((k, d))``, each row scaled to unit length (not data points); ``init``
      overrides it (tests);
    - each of ``iters`` iterations: assignment argmax_c (c.x - |c|^2 / 2) over row blocks of ``block``
      (first index on ties); every centroid that received points becomes their mean; cumulative counts are
      updated; then every centroid whose *cumulative* count is still 0 is re-seeded, in index order, to
      ``x[rng.integers(n)]``. A centroid that had points earlier and loses them keeps its stale position.

    Returns (centroids [k, d] float64, cumulative counts [k] int64).
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if n == 0:
        raise ValueError("kmeans_faithful: no rows to cluster")
    rng = rng if rng is not None else np.random.default_rng(0)
    if init is None:
        c = rng.standard_normal((k, d))
        c /= np.sqrt((c ** 2).sum(axis=1, keepdims=True))
    else:
        c = np.array(init, dtype=np.float64).reshape(k, d)
    total = np.zeros(k, dtype=np.int64)
    block = max(1, int(block))
    for _ in range(iters):
        half_c2 = 0.5 * (c ** 2).sum(axis=1)
        sums = np.zeros((k, d))
        counts = np.zeros(k, dtype=np.int64)
        for s in range(0, n, block):
            xb = x[s:s + block]
            assign = np.argmax(xb @ c.T - half_c2, axis=1)
            np.add.at(sums, assign, xb)
            counts += np.bincount(assign, minlength=k)
        got = counts > 0
        c[got] = sums[got] / counts[got, None]
        total += counts
        for j in np.flatnonzero(total == 0):
            c[j] = x[int(rng.integers(n))]
    return c, total


def kmeans_faiss(x: np.ndarray, k: int, iters: int = 20, seed: int = 0) -> np.ndarray:
    """FAISS k-means (k-means with data-point init and FAISS's own empty-cluster handling): **not** the
    faithful variant. Needs at least ``k`` rows."""
    import faiss

    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.shape[0] < k:
        raise ValueError(f"kmeans='faiss' needs at least {k} rows per class, got {x.shape[0]}; "
                         "use kmeans='faithful' or fewer clusters_per_class")
    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=int(seed) % (2 ** 31 - 1), verbose=False)
    km.train(x)
    return np.asarray(km.centroids, dtype=np.float64).reshape(k, x.shape[1])


def cluster_classes(features: Any, labels: Any, classes: Sequence[int], k: int, *, method: str = "faithful",
                    iters: int = 20, block: int = 1000, seed: int = 0, progress=None) -> np.ndarray:
    """Cluster the rows of every class in ``classes`` (in that order) into ``k`` centroids.

    Each class has its own RNG stream derived from (seed, class label), so a class's centroids do not depend
    on the other classes. Returns [len(classes), k, d] float64.
    """
    if method not in ("faithful", "faiss"):
        raise ValueError(f"unknown kmeans variant {method!r}; use 'faithful' or 'faiss'")
    labels = _to_numpy(labels).reshape(-1)
    feats = features
    out = []
    rep = _Reporter(progress, "cluster", len(classes))
    try:
        for lab in classes:
            rows = np.flatnonzero(labels == lab)
            if rows.size == 0:
                raise ValueError(f"base class {lab} has no rows to cluster")
            if rows.size < k and method == "faithful":
                warnings.warn(f"class {lab} has {rows.size} rows for {k} clusters: the unused centroids are "
                              "re-seeded to data points (duplicates)", stacklevel=2)
            x = _to_numpy(feats[torch.as_tensor(rows)] if isinstance(feats, torch.Tensor) else
                          np.asarray(feats)[rows], np.float64)
            if method == "faithful":
                rng = np.random.default_rng(_class_seed(seed, lab, 1))
                c, _ = kmeans_faithful(x, k, iters, block, rng)
            else:
                c = kmeans_faiss(x, k, iters, int(_class_seed(seed, lab, 1).generate_state(1)[0]))
            out.append(c)
            rep.update(1)
    finally:
        rep.close()
    return np.stack(out)


# ------------------------------------------------------------------------------------------------ 6.4 mining
def difference_vectors(c: np.ndarray) -> np.ndarray:
    """All K^2 ordered differences of one class's centroids, row a*K + b = (c_a - c_b) / (|c_a - c_b| + 1e-5)
    (float64; the a = b rows are zero). The reference form; :func:`mine_analogies` uses only a < b."""
    c = np.asarray(c, dtype=np.float64)
    diff = (c[:, None, :] - c[None, :, :]).reshape(-1, c.shape[1])
    return diff / (np.sqrt((diff ** 2).sum(axis=1, keepdims=True)) + _EPS)


def _upper_differences(c: np.ndarray, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    diff = c[ia] - c[ib]
    return diff / (np.sqrt((diff ** 2).sum(axis=1, keepdims=True)) + _EPS)


def _span_basis(c: np.ndarray) -> np.ndarray:
    """Orthonormal basis [d, r] (float64) of the span of a class's centroid differences."""
    dev = c[1:] - c[0]
    if dev.shape[0] == 0:
        return np.zeros((c.shape[1], 0))
    # a small SVD: one thread (multi-threaded LAPACK took seconds instead of milliseconds on a loaded machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, s, vt = (t.numpy() for t in torch.linalg.svd(torch.from_numpy(dev), full_matrices=False))
    finally:
        torch.set_num_threads(threads)
    if s.size == 0 or s[0] == 0:
        return np.zeros((c.shape[1], 0))
    r = int((s > s[0] * max(dev.shape) * np.finfo(np.float64).eps).sum())
    return vt[:r].T.copy()


_NUMPY_ROW_REDUCTIONS = True  # tests switch it off to exercise the torch path used on accelerators


def _row_extrema(scores: torch.Tensor):
    """Row max, first argmax, row min, first argmin. On the CPU through numpy, whose row reductions are several
    times faster than torch's for this shape; same values, first-occurrence indices either way."""
    if scores.device.type == "cpu" and _NUMPY_ROW_REDUCTIONS:
        a = scores.numpy()
        amx, amn = a.argmax(axis=1), a.argmin(axis=1)
        r = np.arange(a.shape[0])
        return (torch.from_numpy(a[r, amx]), torch.from_numpy(amx), torch.from_numpy(a[r, amn]),
                torch.from_numpy(amn))
    mx, amx = scores.max(dim=1)
    mn, amn = scores.min(dim=1)
    return mx, amx, mn, amn


def mine_analogies(centroids: Any, *, block: int = 2048, project: str | bool = "auto",
                   device: str | torch.device = "cpu", progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Exact analogy mining (quadruplets A : B :: C : D) over centroids [n_classes, K, d].

    For every class i and ordered pair (a, b), a != b, find over all classes j != i and their ordered pairs
    (a', b') the maximum cosine between the normalised differences; the running best starts at 0 and is
    replaced only by a strictly larger score, visiting j in increasing order (ties go to the earliest j;
    within a class, to the earliest pair). Records are (A, B, C, D) = rows of the concatenated centroid table
    (class_position * K + cluster), in the order (i, a, b) row-major; records with score <= 0, A = B or C = D
    are dropped.

    Exactness-preserving savings over the brute-force 10^4 x 10^4 GEMM per class pair:

    - a = b pairs are zero vectors (score 0, which never beats the initial 0): they are neither queried nor
      searched;
    - delta(b, a) = -delta(a, b) exactly, so the GEMM runs only over a < b queries and a' < b' keys (a quarter
      of the products): for a query q and key u with s = q.u, the four ordered combinations score +-s, so
      max and min of each GEMM row give the answers of q and of its reverse;
    - ``project``: the differences of class j lie in the span of its centroid differences (rank r <= K - 1).
      When r < 0.75 d ("auto"), keys and queries are projected onto an orthonormal basis of that span, which
      leaves every inner product unchanged up to float rounding and shrinks the GEMM depth from d to r.
      ``project=False`` keeps the plain GEMM on the d-dimensional vectors.

    The GEMM runs in float32 (the original's precision; differences are computed in float64), so two
    candidates closer than ~1e-6 may be ordered differently than an exact computation would. Exact ties
    within one class (duplicated centroids) between a pair and a reversed pair are broken by the smaller
    ordered index; between two reversed pairs by the earliest unordered pair.

    Returns (analogies [P, 4] int64, scores [P] float32).
    """
    cents = np.asarray(centroids, dtype=np.float64)
    if cents.ndim != 3:
        raise ValueError(f"centroids must be [n_classes, K, d], got shape {cents.shape}")
    nc, K, d = cents.shape
    if nc < 2 or K < 2:
        return np.zeros((0, 4), dtype=np.int64), np.zeros(0, dtype=np.float32)
    device = torch.device(device)
    ia, ib = np.triu_indices(K, 1)
    U = ia.size
    nq = nc * U
    queries = torch.empty((nq, d), dtype=torch.float32, device=device)
    for i in range(nc):
        queries[i * U:(i + 1) * U] = torch.from_numpy(_upper_differences(cents[i], ia, ib).astype(np.float32))
    row_class = torch.arange(nc, device=device).repeat_interleave(U)
    fwd_idx = torch.as_tensor(ia * K + ib, device=device)  # ordered index of key (a', b')
    rev_idx = torch.as_tensor(ib * K + ia, device=device)  # ordered index of key (b', a')

    # running best per query (a < b) and per reversed query (b, a)
    best = torch.zeros(nq, dtype=torch.float32, device=device)
    best_j = torch.full((nq,), -1, dtype=torch.int64, device=device)
    key_q = torch.zeros(nq, dtype=torch.int64, device=device)
    key_r = torch.zeros(nq, dtype=torch.int64, device=device)
    block = max(1, int(block))
    rep = _Reporter(progress, "mine", nc)
    try:
        for j in range(nc):
            diffs_j = _upper_differences(cents[j], ia, ib)
            basis = None
            if project:
                b64 = _span_basis(cents[j])
                if b64.shape[1] == 0:  # all centroids of j coincide: every key is zero, nothing can win
                    rep.update(1)
                    continue
                if project is True or b64.shape[1] < 0.75 * d:
                    basis = torch.from_numpy(b64.astype(np.float32)).to(device)
                    keys = torch.from_numpy((diffs_j @ b64).astype(np.float32)).to(device)
            if basis is None:
                keys = torch.from_numpy(diffs_j.astype(np.float32)).to(device)
            keys_t = keys.T.contiguous()
            for s in range(0, nq, block):
                e = min(s + block, nq)
                rc = row_class[s:e]
                valid = rc != j
                if not bool(valid.any()):
                    continue
                qb = queries[s:e]
                if basis is not None:
                    qb = qb @ basis
                mx, amx, mn, amn = _row_extrema(qb @ keys_t)
                neg = -mn
                # query (a, b): keys (a', b') score s, reversed keys (b', a') score -s
                p_key, n_key = fwd_idx[amx], rev_idx[amn]
                take_n = (neg > mx) | ((neg == mx) & (n_key < p_key))
                score = torch.where(take_n, neg, mx)
                # reversed query (b, a): keys (a', b') score -s, reversed keys (b', a') score s (same best)
                rp_key, rn_key = fwd_idx[amn], rev_idx[amx]
                take_rn = (mx > neg) | ((mx == neg) & (rn_key < rp_key))
                upd = valid & (score > best[s:e])
                best[s:e] = torch.where(upd, score, best[s:e])
                best_j[s:e] = torch.where(upd, torch.full_like(best_j[s:e], j), best_j[s:e])
                key_q[s:e] = torch.where(upd, torch.where(take_n, n_key, p_key), key_q[s:e])
                key_r[s:e] = torch.where(upd, torch.where(take_rn, rn_key, rp_key), key_r[s:e])
            rep.update(1)
    finally:
        rep.close()

    best_np, j_np = best.cpu().numpy(), best_j.cpu().numpy()
    kq_np, kr_np = key_q.cpu().numpy(), key_r.cpu().numpy()
    # assemble in (i, a, b) row-major order over all ordered pairs
    score_full = np.zeros((nc, K, K), dtype=np.float32)
    j_full = np.full((nc, K, K), -1, dtype=np.int64)
    key_full = np.zeros((nc, K, K), dtype=np.int64)
    b3, j3 = best_np.reshape(nc, U), j_np.reshape(nc, U)
    score_full[:, ia, ib] = b3
    score_full[:, ib, ia] = b3
    j_full[:, ia, ib] = j3
    j_full[:, ib, ia] = j3
    key_full[:, ia, ib] = kq_np.reshape(nc, U)
    key_full[:, ib, ia] = kr_np.reshape(nc, U)
    ii, aa, bb = np.meshgrid(np.arange(nc), np.arange(K), np.arange(K), indexing="ij")
    jj = j_full
    rec = np.stack([ii * K + aa, ii * K + bb, jj * K + key_full // K, jj * K + key_full % K], axis=-1)
    rec, sc = rec.reshape(-1, 4), score_full.reshape(-1)
    keep = (sc > 0) & (rec[:, 0] != rec[:, 1]) & (rec[:, 2] != rec[:, 3]) & (j_full.reshape(-1) >= 0)
    return rec[keep].astype(np.int64), sc[keep].astype(np.float32)


# ------------------------------------------------------------------------------------------------ 6.5 network
class AnalogyNet(nn.Module):
    """[A, C, D] (3d) -> hidden -> ReLU -> hidden -> ReLU -> d -> ReLU (non-negative, like real features)."""

    def __init__(self, dim: int, hidden: int = 512):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.net = nn.Sequential(nn.Linear(3 * dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, dim), nn.ReLU())

    def forward(self, a: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat((a, c, d), dim=1))


# ------------------------------------------------------------------------------------------------ the generator
@dataclass
class _HParams:
    clusters_per_class: int = 100
    kmeans: str = "faithful"
    kmeans_iters: int = 20
    hidden: int = 512
    iterations: int = 120_000
    batch: int = 128
    lr: float = 0.1
    lr_steps: tuple = (40_000, 80_000)
    lr_decay: float = 0.1
    momentum: float = 0.9
    dampening: float = 0.9
    weight_decay: float = 1e-4
    mse_weight: float = 10.0
    seed: int = 0


# stage -> the hyper-parameters that determine its output
_STAGE_KEYS = {
    "centroids": ("clusters_per_class", "kmeans", "kmeans_iters", "seed"),
    "analogies": ("clusters_per_class", "kmeans", "kmeans_iters", "seed"),
    "generator": tuple(f.name for f in _HParams.__dataclass_fields__.values()),
}


class AnalogyGenerator:
    """The paper's analogy generator (fit on base classes, then :meth:`generate` for novel classes).

    Hyper-parameters (defaults = the original's hard-coded values): ``clusters_per_class`` 100; ``kmeans``
    "faithful" (the Lua-torch port, seeded) or "faiss" (a different variant); ``kmeans_iters`` 20;
    ``hidden`` 512; ``iterations`` 120,000; ``batch`` 128; ``lr`` (the original's ``initlr``) 0.1, divided by
    ``1 / lr_decay`` = 10 after each iteration count in ``lr_steps`` (40k, 80k); ``momentum`` 0.9 with
    ``dampening`` 0.9; ``weight_decay`` 1e-4; ``mse_weight`` 10; ``seed``. Execution-only options that do not
    change the result (up to float rounding) and are not part of :meth:`cache_key`: ``device``,
    ``mining_block`` (query rows per GEMM block), ``mining_project``, ``kmeans_block``, ``log_every``.

    Learnt state: ``base_classes_`` (sorted base labels), ``centroids_`` [n_base * K, d] (row =
    class_position * K + cluster), ``analogies_`` [P, 4], ``analogy_scores_`` [P], ``net_``,
    ``loss_history_`` [L, 4] (iteration, loss, ce, mse; means over ``log_every`` iterations).
    """

    def __init__(self, clusters_per_class: int = 100, kmeans: str = "faithful", hidden: int = 512,
                 iterations: int = 120_000, batch: int = 128, lr: float = 0.1,
                 lr_steps: Sequence[int] = (40_000, 80_000), mse_weight: float = 10.0, seed: int = 0,
                 device: str | torch.device = "cpu", mining_block: int = 2048, *, kmeans_iters: int = 20,
                 kmeans_block: int = 1000, lr_decay: float = 0.1, momentum: float = 0.9,
                 dampening: float = 0.9, weight_decay: float = 1e-4, mining_project: str | bool = "auto",
                 log_every: int = 100):
        if kmeans not in ("faithful", "faiss"):
            raise ValueError(f"unknown kmeans variant {kmeans!r}; use 'faithful' or 'faiss'")
        if clusters_per_class < 2:
            raise ValueError("clusters_per_class must be at least 2")
        self.hp = _HParams(int(clusters_per_class), kmeans, int(kmeans_iters), int(hidden), int(iterations),
                           int(batch), float(lr), tuple(int(s) for s in lr_steps), float(lr_decay),
                           float(momentum), float(dampening), float(weight_decay), float(mse_weight), int(seed))
        self.device = torch.device(device)
        self.mining_block = int(mining_block)
        self.mining_project = mining_project
        self.kmeans_block = int(kmeans_block)
        self.log_every = max(1, int(log_every))
        self.base_classes_: np.ndarray | None = None
        self.centroids_: torch.Tensor | None = None
        self.analogies_: np.ndarray | None = None
        self.analogy_scores_: np.ndarray | None = None
        self.net_: AnalogyNet | None = None
        self.loss_history_: np.ndarray | None = None

    # -- identity ------------------------------------------------------------------------------------------
    def hparams(self) -> dict:
        d = asdict(self.hp)
        d["lr_steps"] = list(d["lr_steps"])
        return d

    @property
    def variant(self) -> str:
        """"faithful" or "faiss-kmeans" (the latter is not the paper's clustering)."""
        return "faithful" if self.hp.kmeans == "faithful" else "faiss-kmeans"

    def cache_key(self, store_fingerprint_hash: str, stage: str = "generator", **context: Any) -> str:
        """sha256 of the store fingerprint hash and the hyper-parameters that determine ``stage``
        ("centroids", "analogies" or "generator"). ``context`` adds anything else the result depends on and
        the store fingerprint does not capture (JSON-able: e.g. the base-class list, a digest of the frozen
        classifier from :meth:`input_digest`)."""
        if stage not in _STAGE_KEYS:
            raise ValueError(f"unknown stage {stage!r}; use one of {', '.join(_STAGE_KEYS)}")
        hp = self.hparams()
        payload = {"method": "analogy-generator", "format": FORMAT_VERSION, "stage": stage,
                   "fingerprint_hash": str(store_fingerprint_hash),
                   "hparams": {k: hp[k] for k in _STAGE_KEYS[stage]}, "context": context}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    @staticmethod
    def input_digest(*arrays: Any) -> str:
        """sha256 over arrays (dtype, shape, bytes): e.g. base labels and the frozen classifier weights."""
        h = hashlib.sha256()
        for a in arrays:
            if a is None:
                h.update(b"none")
                continue
            a = np.ascontiguousarray(_to_numpy(a))
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    # -- fitting -------------------------------------------------------------------------------------------
    def fit(self, base_features: Any, base_labels: Any, classifier_weight: Any, classifier_bias: Any = None,
            *, centroids: Any = None, analogies: Any = None, progress=False) -> "AnalogyGenerator":
        """Cluster, mine and train on the base classes.

        ``base_features`` [n, d] and ``base_labels`` [n] (label values index the classifier rows);
        ``classifier_weight`` [C, d] and optional ``classifier_bias`` [C]: the frozen linear classifier of the
        CE term (the ConvNet's own last layer in the faithful setting). ``centroids`` ([n_base, K, d] or
        [n_base * K, d]) and ``analogies`` ([P, 4]) skip the clustering / mining stages when the caller has them
        cached (base classes are then the sorted unique labels; the arrays must match them).
        ``progress``: True for a bar on a terminal, or a callable ``(stage, done, total, loss)``.
        """
        labels = _to_numpy(base_labels).reshape(-1).astype(np.int64)
        n = labels.shape[0]
        if getattr(base_features, "shape", (None,))[0] != n:
            raise ValueError(f"base_features has {getattr(base_features, 'shape', ['?'])[0]} rows, "
                             f"base_labels {n}")
        classes = np.unique(labels)
        if classes.size < 2:
            raise ValueError("the analogy generator needs at least 2 base classes")
        w = as_tensor(classifier_weight, self.device).detach()
        if w.ndim != 2 or w.shape[1] != base_features.shape[1]:
            raise ValueError(f"classifier_weight must be [C, {base_features.shape[1]}], got {tuple(w.shape)}")
        if classes.min() < 0 or classes.max() >= w.shape[0]:
            raise ValueError(f"base labels must index the classifier's {w.shape[0]} rows "
                             f"(got labels {classes.min()}..{classes.max()})")
        b = None if classifier_bias is None else as_tensor(classifier_bias, self.device).detach().reshape(-1)
        K = self.hp.clusters_per_class
        d = int(base_features.shape[1])

        if centroids is None:
            cents = cluster_classes(base_features, labels, classes, K, method=self.hp.kmeans,
                                    iters=self.hp.kmeans_iters, block=self.kmeans_block, seed=self.hp.seed,
                                    progress=progress)
        else:
            cents = _to_numpy(centroids, np.float64).reshape(classes.size, K, d)
        if analogies is None:
            an, sc = mine_analogies(cents, block=self.mining_block, project=self.mining_project,
                                    device=self.device, progress=progress)
        else:
            an, sc = _to_numpy(analogies).astype(np.int64).reshape(-1, 4), None
        if an.shape[0] == 0:
            raise ValueError("no analogies were mined (all cosines <= 0?): cannot train the generator")
        self.base_classes_ = classes
        self.centroids_ = torch.from_numpy(cents.reshape(-1, d).astype(np.float32)).to(self.device)
        self.analogies_, self.analogy_scores_ = an, sc
        self._train(w, b, progress)
        return self

    def _lr_at(self, it: int) -> float:
        return self.hp.lr * self.hp.lr_decay ** sum(it >= s for s in self.hp.lr_steps)

    def _train(self, weight: torch.Tensor, bias: torch.Tensor | None, progress) -> None:
        hp, dev = self.hp, self.device
        d = self.centroids_.shape[1]
        rng = np.random.default_rng(np.random.SeedSequence([hp.seed & 0xFFFFFFFF, 2]))
        perm = self.analogies_[rng.permutation(self.analogies_.shape[0])]
        perm_t = torch.from_numpy(perm).to(dev)
        centroid_labels = torch.from_numpy(np.repeat(self.base_classes_, hp.clusters_per_class)).to(dev)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.seed)
            net = AnalogyNet(d, hp.hidden)
        net = net.to(dev).train()
        opt = torch.optim.SGD(net.parameters(), lr=hp.lr, momentum=hp.momentum, dampening=hp.dampening,
                              weight_decay=hp.weight_decay)
        ce_fn, table = nn.CrossEntropyLoss(), self.centroids_
        history, acc, cnt = [], torch.zeros(3, dtype=torch.float64, device=dev), 0
        start, P = 0, perm_t.shape[0]
        rep = _Reporter(progress, "train generator", hp.iterations)
        try:
            for it in range(hp.iterations):
                lr = self._lr_at(it)
                for g in opt.param_groups:
                    g["lr"] = lr
                stop = min(start + hp.batch, P)
                idx = perm_t[start:stop]
                start = 0 if stop == P else stop
                A, B, C, D = (table[idx[:, k]] for k in range(4))
                y = centroid_labels[idx[:, 1]]
                opt.zero_grad(set_to_none=True)
                bhat = net(A, C, D)
                scores = bhat @ weight.T
                if bias is not None:
                    scores = scores + bias
                ce = ce_fn(scores, y)
                mse = torch.mean((bhat - B) ** 2)
                loss = ce + hp.mse_weight * mse
                loss.backward()
                opt.step()
                acc += torch.stack((loss.detach(), ce.detach(), mse.detach())).double()
                cnt += 1
                if cnt == self.log_every or it == hp.iterations - 1:
                    means = (acc / cnt).tolist()
                    history.append((it + 1, *means))
                    rep.update(cnt, means[0])
                    acc.zero_()
                    cnt = 0
        finally:
            rep.close()
        self.net_ = net.eval()
        self.loss_history_ = np.asarray(history, dtype=np.float64).reshape(-1, 4)
        self._check_alive(perm_t[:2048], table)

    @torch.no_grad()
    def _check_alive(self, sample: torch.Tensor, table: torch.Tensor) -> None:
        """Refuse a generator that diverged or died: non-finite weights, or all-zero outputs (every unit of the last
        ReLU dead, which a too-large lr for the features' scale leaves behind); it would hallucinate zero vectors
        labelled as novel examples."""
        if not all(torch.isfinite(p).all() for p in self.net_.parameters()):
            raise ValueError(f"the analogy generator diverged (non-finite weights) with lr {self.hp.lr:g}; lower lr")
        out = self.net_(table[sample[:, 0]], table[sample[:, 2]], table[sample[:, 3]])
        if sample.shape[0] and float((out == 0).all(dim=1).float().mean()) > 0.99:
            raise ValueError(f"the analogy generator collapsed: it outputs all-zero features (dead ReLUs after "
                             f"training with lr {self.hp.lr:g}; features of norm "
                             f"{float(table.norm(dim=1).mean()):.3g} need a smaller lr)")

    # -- generation (6.7) ----------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if self.net_ is None or self.centroids_ is None:
            from .base import NotFittedError

            raise NotFittedError("AnalogyGenerator is not fitted yet: call fit(...) or from_arrays(...) first")

    def plan(self, novel_labels: Any, max_per_label: int, seed: int) -> np.ndarray:
        """The generation plan [g, 3]: (seed row into the novel arrays, centroid row C, centroid row D).

        For each novel class (sorted label order) with m real examples, g = max(M - m, 0) draws, each
        independently: seed uniform with replacement among the class's rows; base class uniform over all base
        classes the generator was fit on; C and D uniform over that class's centroids (they may coincide).
        """
        self._check_fitted()
        labels = _to_numpy(novel_labels).reshape(-1)
        K, nb = self.hp.clusters_per_class, int(self.base_classes_.size)
        rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 3]))
        parts = []
        for lab in np.unique(labels):
            idx = np.flatnonzero(labels == lab)
            g = max(int(max_per_label) - idx.size, 0)
            if g == 0:
                continue
            seeds = rng.choice(idx, g, replace=True)
            base = rng.integers(nb, size=g)
            cc = rng.integers(K, size=g)
            cd = rng.integers(K, size=g)
            parts.append(np.stack([seeds, base * K + cc, base * K + cd], axis=1))
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 3), dtype=np.int64)

    @torch.no_grad()
    def generate(self, novel_features: Any, novel_labels: Any, max_per_label: int, seed: int = 0,
                 batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the *generated* features and their labels (the caller concatenates them with the real ones,
        which the original treats identically): ([g, d] float32, [g] int64) on the generator's device, each
        labelled with its seed's class. Classes with m >= ``max_per_label`` get nothing."""
        self._check_fitted()
        feats = as_tensor(novel_features, self.device)
        labels_np = _to_numpy(novel_labels).reshape(-1).astype(np.int64)
        if feats.ndim != 2 or feats.shape[0] != labels_np.shape[0]:
            raise ValueError(f"novel_features must be [m, d] with m = len(novel_labels) = {labels_np.shape[0]}")
        if feats.shape[1] != self.centroids_.shape[1]:
            raise ValueError(f"novel features have d = {feats.shape[1]}, the generator d = "
                             f"{self.centroids_.shape[1]}")
        plan = self.plan(labels_np, max_per_label, seed)
        d = feats.shape[1]
        if plan.shape[0] == 0:
            return (torch.zeros((0, d), dtype=torch.float32, device=self.device),
                    torch.zeros(0, dtype=torch.int64, device=self.device))
        plan_t = torch.from_numpy(plan).to(self.device)
        out = torch.empty((plan.shape[0], d), dtype=torch.float32, device=self.device)
        self.net_.eval()
        for s in range(0, plan.shape[0], batch_size):
            p = plan_t[s:s + batch_size]
            out[s:s + batch_size] = self.net_(feats[p[:, 0]], self.centroids_[p[:, 1]], self.centroids_[p[:, 2]])
        return out, torch.from_numpy(labels_np[plan[:, 0]]).to(self.device)

    # -- (de)serialisation for the caller's cache ----------------------------------------------------------
    def to_arrays(self, include_analogies: bool = False) -> dict[str, np.ndarray]:
        """Everything needed to generate, as numpy arrays: ``centroids`` [n_base * K, d] float32,
        ``base_classes`` [n_base] int64, ``clusters_per_class`` [] int64, ``hparams_json`` uint8 (UTF-8 JSON),
        ``loss_history`` [L, 4], ``net.<param>`` tensors; with ``include_analogies`` also ``analogies`` [P, 4]
        int32 and (when mined here) ``analogy_scores`` [P] float32."""
        self._check_fitted()
        out = {
            "centroids": self.centroids_.detach().cpu().numpy().astype(np.float32),
            "base_classes": np.asarray(self.base_classes_, dtype=np.int64),
            "clusters_per_class": np.asarray(self.hp.clusters_per_class, dtype=np.int64),
            "hparams_json": np.frombuffer(json.dumps(self.hparams(), sort_keys=True).encode(), dtype=np.uint8),
            "loss_history": np.asarray(self.loss_history_, dtype=np.float64),
        }
        for name, t in self.net_.state_dict().items():
            out[f"net.{name}"] = t.detach().cpu().numpy()
        if include_analogies and self.analogies_ is not None:
            out["analogies"] = self.analogies_.astype(np.int32)
            if self.analogy_scores_ is not None:
                out["analogy_scores"] = self.analogy_scores_.astype(np.float32)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], device: str | torch.device = "cpu", **overrides: Any
                    ) -> "AnalogyGenerator":
        """Rebuild a fitted generator from :meth:`to_arrays` output (hyper-parameters from ``hparams_json``;
        ``overrides`` for execution-only options such as ``mining_block``)."""
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        hp = json.loads(bytes(arrays["hparams_json"].astype(np.uint8)).decode())
        hp.update(overrides)
        gen = cls(device=device, **hp)
        cents = arrays["centroids"].astype(np.float32)
        d = cents.shape[1]
        gen.base_classes_ = arrays["base_classes"].astype(np.int64)
        if cents.shape[0] != gen.base_classes_.size * gen.hp.clusters_per_class:
            raise ValueError("centroid table does not match base_classes x clusters_per_class")
        gen.centroids_ = torch.from_numpy(cents.copy()).to(gen.device)
        state = {k[4:]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith("net.")}
        net = AnalogyNet(d, gen.hp.hidden)
        net.load_state_dict(state)
        gen.net_ = net.to(gen.device).eval()
        gen.loss_history_ = arrays.get("loss_history")
        if "analogies" in arrays:
            gen.analogies_ = arrays["analogies"].astype(np.int64)
            gen.analogy_scores_ = arrays.get("analogy_scores")
        return gen

    def __repr__(self) -> str:
        fitted = "fitted" if self.net_ is not None else "unfitted"
        return f"AnalogyGenerator({self.variant}, K={self.hp.clusters_per_class}, {fitted})"

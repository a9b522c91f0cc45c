"""The low-shot linear classifier of Hariharan & Girshick, "Low-shot Visual Recognition by Shrinking and
Hallucinating Features" (ICCV 2017), section 4 of the paper and ``low_shot.py`` of the official code.

One linear layer with bias over **all** C classes, on raw (unnormalised) features, softmax cross-entropy::

    logits = x @ W.T + b            x [n, d], W [C, d], b [C]  ->  [n, C]

Training (faithful defaults):

- SGD with momentum 0.9 and **dampening 0.9** (PyTorch's rule: g = grad + wd * w; buf = g on the first step,
  then buf = mu * buf + (1 - dampening) * g; w -= lr * buf). With dampening = momentum the buffer is a moving
  average of gradients, so lr = 1 here is about lr = 0.1 with standard momentum (dampening 0).
- 10,000 iterations of batch 1,000, constant lr, weight decay on weight and bias, PyTorch's default init of
  ``nn.Linear`` (uniform in +-1/sqrt(d)).
- Batch composition (as ``low_shot.py``): ``frac = |base classes| / (|base classes| + |novel classes|)`` from class
  counts; every batch holds ``round(frac * batch)`` base rows drawn uniformly **without replacement** from the base
  pool, and the rest novel rows drawn uniformly **with replacement** from the novel pool. Every class then gets about
  ``batch / (|base| + |novel|)`` rows per batch: class-balanced training.
- Hyper-parameters per representation (test setup): ResNet-10 baseline lr 0.1 / wd 0.01, SGM and batch
  SGM lr 1 / wd 0.001, L2 lr 0.1 / wd 0.001; ResNet-50 baseline 0.1 / 0.01, SGM 0.1 / 0.001 (all with dampening 0.9).

Many classifiers at once: :meth:`LowShotLogReg.fit_many` trains P independent classifiers (one per (experiment,
n) low-shot problem of a setup) as one batched tensor program with weights ``[P, C, d]``. All P classifiers see
the same base rows in every iteration (one shared base stream drawn from ``base_seed``: one gather and one GEMM
``[b, d] @ [d, P*C]`` per iteration instead of P), and each has its own initialisation and its own novel stream
(from ``seeds[p]``), so a classifier's result does not depend on which others are batched with it. Set
``share_base_batches=False`` for fully independent base streams (P gathers per iteration).

``solver="lbfgs"`` minimises the expectation of the SGD objective instead (full batch, L-BFGS with strong-Wolfe
line search, zero init)::

    L(W, b) = (nb/B) * mean_base CE + (nv/B) * mean_novel CE + wd/2 * (|W|^2 + |b|^2)

which is the fixed point SGD's iterates fluctuate around. Each L-BFGS iteration is a pass over the whole base pool,
so it is faster than 10,000 SGD iterations when the base pool has fewer than a few million rows x iterations / 100
(all stores but ImageNet); see the tests for the accuracy agreement.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import numpy as np
import torch

from heads._cpu_blas import BACKENDS as GEMM_BACKENDS
from heads._cpu_blas import Products
from heads.base import Head, as_tensor, register_head

SOLVERS = ("sgd", "lbfgs")
#: logits per block of the SGD loop (256 MiB of float32), a bound on its buffers. Smaller blocks that stay in the
#: cache were slower: the products then re-read W once per block.
LOGIT_BLOCK = 1 << 26
PRECISIONS = ("fp32", "bf16")
#: multiply-adds of a padded novel block below which pools of any size share one step of the SGD loop: each step
#: costs about 0.25 ms of fixed overhead (a dozen small torch ops), about 1e7 multiply-adds at the products'
#: rate; the demo's 25 novel pools (3 to 60 rows, 64 dims, 10 classes) then take one step instead of five
MERGE_WORK = 4e6


def default_init(num_problems: int, num_classes: int, dim: int, seeds: Sequence[int]) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """PyTorch's ``nn.Linear(dim, num_classes)`` init for each problem: W, b ~ U(-1/sqrt(d), 1/sqrt(d)).

    Returns CPU float32 ``W [P, C, d]`` and ``b [P, C]``; problem p is drawn from its own generator ``seeds[p]``.
    """
    bound = 1.0 / math.sqrt(dim)
    W = torch.empty(num_problems, num_classes, dim)
    b = torch.empty(num_problems, num_classes)
    for p in range(num_problems):
        g = torch.Generator().manual_seed(int(seeds[p]))
        W[p].uniform_(-bound, bound, generator=g)
        b[p].uniform_(-bound, bound, generator=g)
    return W, b


def base_rows_per_batch(batch_size: int, n_base_classes: int, n_novel_classes: int) -> int:
    """``round(frac * batch)`` with ``frac = |base| / (|base| + |novel|)`` (class counts), as ``low_shot.py``."""
    total = n_base_classes + n_novel_classes
    if total == 0:
        return 0
    return int(round(batch_size * n_base_classes / total))


def _sample_without_replacement(rng: np.random.Generator, n: int, k: int, t: int) -> np.ndarray:
    """``[t, k]`` int64: t independent uniform draws of k distinct indices out of n."""
    if k == 0:
        return np.zeros((t, 0), dtype=np.int64)
    return np.stack([rng.choice(n, size=k, replace=False, shuffle=False) for _ in range(t)]).astype(np.int64)


@register_head("logreg")
class LowShotLogReg(Head):
    """The paper's low-shot classifier: linear with bias over all classes, class-balanced SGD (see module doc).

    Parameters (defaults = ``low_shot.py``): ``num_classes`` C (all classes of the store; inferred from the labels
    when None), ``lr`` 0.1, ``wd`` 1e-3, ``momentum`` 0.9, ``dampening`` 0.9, ``iterations`` 10,000, ``batch_size``
    1,000, ``solver`` "sgd" | "lbfgs", ``seed`` (init and sampling), ``share_base_batches`` (see module doc),
    ``lbfgs_iterations`` / ``lbfgs_tol`` for the full-batch solver, ``block_rows`` (rows per block of the full-batch
    passes), ``precision`` "fp32" (default, faithful) or "bf16" (SGD matrix products in bfloat16 with float32
    weights, softmax and updates: several times faster on GPUs and on CPUs with AMX / AVX512-BF16, slower on
    others), ``gemm`` "auto" | "torch" | "numpy" (which BLAS computes the float32 CPU products: heads/_cpu_blas.py;
    "auto" takes numpy's OpenBLAS where torch's MKL runs slow kernels, on AMD CPUs), ``device``.

    Learnt state: ``weight_ [P, C, d]``, ``bias_ [P, C]`` (P = 1 after :meth:`fit`), ``loss_history_ [k, P]``
    (mean batch loss every ``log_every`` iterations; SGD only), ``n_iter_`` (iterations run), ``gemm_`` (the
    product backend the SGD loop used).
    """

    def __init__(self, num_classes: int | None = None, *, lr: float = 0.1, wd: float = 1e-3, momentum: float = 0.9,
                 dampening: float = 0.9, iterations: int = 10_000, batch_size: int = 1000, solver: str = "sgd",
                 seed: int = 0, share_base_batches: bool = True, lbfgs_iterations: int = 300,
                 lbfgs_tol: float = 1e-6, block_rows: int = 8192, log_every: int = 100, chunk: int = 100,
                 precision: str = "fp32", gemm: str = "auto", device: str | torch.device = "cpu"):
        super().__init__(device)
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if iterations < 0 or batch_size < 1:
            raise ValueError(f"iterations must be >= 0 and batch_size >= 1 (got {iterations}, {batch_size})")
        if lr <= 0 or wd < 0:
            raise ValueError(f"lr must be > 0 and wd >= 0 (got {lr}, {wd})")
        if not (0 <= momentum < 1 and 0 <= dampening <= 1):
            raise ValueError(f"momentum must lie in [0, 1) and dampening in [0, 1] (got {momentum}, {dampening})")
        if solver == "sgd" and momentum > 0 and dampening == 0:
            warnings.warn("standard momentum (dampening 0): the step is about lr / (1 - momentum) = "
                          f"{lr / (1 - momentum):g} x grad; the paper's learning rates assume dampening 0.9, so "
                          "divide them by 10 for this setting", stacklevel=2)
        self.num_classes = num_classes
        self.lr, self.wd, self.momentum, self.dampening = float(lr), float(wd), float(momentum), float(dampening)
        self.iterations, self.batch_size, self.solver, self.seed = int(iterations), int(batch_size), solver, int(seed)
        self.share_base_batches = bool(share_base_batches)
        self.lbfgs_iterations, self.lbfgs_tol = int(lbfgs_iterations), float(lbfgs_tol)
        self.block_rows, self.log_every, self.chunk = int(block_rows), int(log_every), int(chunk)
        if gemm not in GEMM_BACKENDS:
            raise ValueError(f"unknown gemm backend {gemm!r}; choose one of {', '.join(GEMM_BACKENDS)}")
        self.precision, self.gemm = precision, gemm
        self.gemm_: str | None = None
        self.weight_: torch.Tensor | None = None
        self.bias_: torch.Tensor | None = None
        self.loss_history_: torch.Tensor | None = None
        self.n_iter_: int = 0

    # ------------------------------------------------------------------------------------------------ fitting
    def fit(self, features, labels, *, base_classes: Sequence[int] | None = None,
            novel_classes: Sequence[int] | None = None, progress: Callable[[int], None] | None = None
            ) -> "LowShotLogReg":
        """One classifier. ``features [n, d]``, ``labels [n]`` in 0..C-1.

        With ``base_classes`` (and optionally ``novel_classes``; default: every other label present), rows of base
        classes form the base pool and the others the novel pool, mixed per batch as in the paper. Without it all
        rows are one pool sampled without replacement (plain mini-batch SGD on the mean cross-entropy).
        """
        x = self._tensor(features)
        y = self._tensor(labels, dtype=None).long()
        if x.ndim != 2 or y.shape != (x.shape[0],):
            raise ValueError(f"features must be [n, d] and labels [n]; got {tuple(x.shape)} and {tuple(y.shape)}")
        if base_classes is None:
            classes = torch.unique(y).tolist()
            return self.fit_many(x, y, [(x[:0], y[:0])], base_classes=classes, novel_classes=[],
                                 progress=progress)
        is_base = torch.isin(y, torch.as_tensor(list(base_classes), device=y.device, dtype=torch.long))
        if novel_classes is None:
            novel_classes = sorted(set(torch.unique(y[~is_base]).tolist()))
        return self.fit_many(x[is_base], y[is_base], [(x[~is_base], y[~is_base])], base_classes=base_classes,
                             novel_classes=novel_classes, progress=progress)

    def fit_many(self, base_features, base_labels, problems: Sequence[tuple], *, base_classes: Sequence[int],
                 novel_classes: Sequence[int], seeds: Sequence[int] | None = None, base_seed: int | None = None,
                 progress: Callable[[int], None] | None = None) -> "LowShotLogReg":
        """P classifiers trained together on one shared base pool.

        ``base_features [Nb, d]``, ``base_labels [Nb]``: the base pool (all training rows of the setup's base
        classes). ``problems``: P pairs ``(novel_features [m_p, d], novel_labels [m_p])`` (the n examples per
        novel class of one experiment, plus generated ones if any). ``base_classes`` / ``novel_classes``: class
        index lists; only their sizes matter (they fix the batch mix). ``seeds[p]``: init and novel-sampling seed
        of problem p (default ``self.seed + p``); ``base_seed``: seed of the shared base stream (default
        ``self.seed``). ``progress(k)`` is called after every k iterations (for a progress bar).

        Sets ``weight_ [P, C, d]`` and ``bias_ [P, C]``.
        """
        dev = self.device
        xb = as_tensor(base_features, dev)
        yb = as_tensor(base_labels, dev, dtype=None).long()
        if xb.ndim != 2 or yb.shape != (xb.shape[0],):
            raise ValueError(f"base features must be [Nb, d] and labels [Nb]; got {tuple(xb.shape)}, "
                             f"{tuple(yb.shape)}")
        d = xb.shape[1]
        P = len(problems)
        if P == 0:
            raise ValueError("fit_many needs at least one problem")
        novel = []
        for p, (fx, fy) in enumerate(problems):
            fx = as_tensor(fx, dev)
            fy = as_tensor(fy, dev, dtype=None).long()
            if fx.ndim != 2 or fx.shape[1] != d or fy.shape != (fx.shape[0],):
                raise ValueError(f"problem {p}: novel features must be [m, {d}] and labels [m]; got "
                                 f"{tuple(fx.shape)}, {tuple(fy.shape)}")
            novel.append((fx, fy))
        seeds = [self.seed + p for p in range(P)] if seeds is None else [int(s) for s in seeds]
        if len(seeds) != P:
            raise ValueError(f"{len(seeds)} seeds for {P} problems")
        base_seed = self.seed if base_seed is None else int(base_seed)
        label_max = max([int(yb.max()) if len(yb) else -1] + [int(fy.max()) if len(fy) else -1 for _, fy in novel])
        C = self.num_classes if self.num_classes is not None else label_max + 1
        if label_max >= C:
            raise ValueError(f"labels go up to {label_max} but num_classes is {C}")
        nb = base_rows_per_batch(self.batch_size, len(base_classes), len(novel_classes))
        nv = self.batch_size - nb
        if self.solver == "sgd" and nb > 0 and len(yb) < nb:
            raise ValueError(f"the base pool has {len(yb)} rows but every batch takes {nb} base rows without "
                             f"replacement; lower the batch size (below {math.ceil(len(yb) * self.batch_size / nb)})")
        if nb == 0 and len(yb):
            xb, yb = xb[:0], yb[:0]
        if nv > 0 and any(len(fy) == 0 for _, fy in novel):
            raise ValueError("a problem has no novel rows but the batch mix asks for novel rows")
        if self.solver == "sgd":
            W, b, history = self._sgd(xb, yb, novel, C, nb, nv, seeds, base_seed, progress)
            self.loss_history_ = history
            self.n_iter_ = self.iterations
        else:
            W, b, n_iter = self._lbfgs(xb, yb, novel, C, nb, nv, progress)
            self.loss_history_ = None
            self.n_iter_ = n_iter
        self.weight_, self.bias_ = W, b
        return self

    # ------------------------------------------------------------------------------------------------ SGD
    def _sgd(self, xb, yb, novel, C, nb, nv, seeds, base_seed, progress):
        dev = self.device
        P, d = len(novel), xb.shape[1]
        B = float(self.batch_size)
        mm = Products(dev, self.precision, self.gemm)
        self.gemm_ = mm.name
        W0, b0 = default_init(P, C, d, seeds)
        # Problems whose novel pool is not larger than the novel rows of a batch (small n) are cheaper as "the
        # whole pool, each row weighted by how often it was drawn" than as a gather of nv rows: the same gradient
        # from fewer rows. They go first, sorted by pool size and bucketed (sizes within 25%, zero-weight padding),
        # so that every bucket and the gathered rest are contiguous slices of W.
        sizes = [len(fy) for _, fy in novel]
        small = sorted((p for p in range(P) if nv > 0 and sizes[p] <= nv), key=lambda p: sizes[p])
        large = [p for p in range(P) if nv > 0 and sizes[p] > nv]
        rest = [p for p in range(P) if nv == 0]
        order = small + large + rest
        inv = np.argsort(order)
        W = W0[order].to(dev).contiguous()
        b = b0[order].to(dev).contiguous()
        PA, PB = len(small), len(large)
        buckets = []   # (start, end, X [g, R, d], Y [g, R])
        i = 0
        while i < PA:
            j = i
            # a bucket takes the next pool while it is within 25% of the bucket's first, or while the padded block
            # stays so small (MERGE_WORK) that its wasted products cost less than the fixed cost of one more step
            while j < PA and (sizes[small[j]] <= 1.25 * sizes[small[i]]
                              or (j - i + 1) * sizes[small[j]] * d * C <= MERGE_WORK):
                j += 1
            R = max(sizes[p] for p in small[i:j])
            X = torch.zeros(j - i, R, d, device=dev)
            Y = torch.zeros(j - i, R, dtype=torch.long, device=dev)
            for k, p in enumerate(small[i:j]):
                X[k, : sizes[p]] = novel[p][0]
                Y[k, : sizes[p]] = novel[p][1]
            buckets.append((i, j, mm.rows(X), Y))
            i = j
        if PB:
            pool = torch.cat([novel[p][0] for p in large])
            pool_y = torch.cat([novel[p][1] for p in large])
            offsets = torch.as_tensor(np.cumsum([0] + [sizes[p] for p in large])[:-1], device=dev)[:, None]
        gens = [torch.Generator().manual_seed(int(seeds[p]) + 7_919) for p in order[: PA + PB]]
        base_rngs = ([np.random.default_rng(base_seed)] if self.share_base_batches else
                     [np.random.default_rng([base_seed, int(seeds[p])]) for p in order])
        # The momentum buffers take the gradient directly: every matrix product of an iteration accumulates into
        # them with the dampening and 1/B folded into its scale (the first product also applies the momentum
        # decay), then weight decay and the step are one pass each. This is torch.optim.SGD's rule (g = grad +
        # wd w; buf = mu buf + (1 - dampening) g, buf = g at the first step; w -= lr buf) in two passes over W.
        bufW = torch.zeros_like(W)
        bufb = torch.zeros_like(b)
        T = self.iterations
        history = []
        loss_acc = torch.zeros(P, device=dev)
        loss_n = 0
        base_block = max(16, min(nb, LOGIT_BLOCK // (P * C)))
        # [rows, P]: where the logits of (base row i, problem p) start in the flattened [rows, P * C] logits
        row_starts = torch.arange(base_block, device=dev)[:, None] * (P * C) + torch.arange(P, device=dev) * C
        for t0 in range(0, T, self.chunk):
            tc = min(self.chunk, T - t0)
            # ---- random numbers for tc iterations, drawn on the CPU (device-agnostic, reproducible)
            if nb:
                bidx = torch.from_numpy(np.stack([_sample_without_replacement(r, len(yb), nb, tc)
                                                  for r in base_rngs], axis=1)).to(dev)  # [tc, 1 or P, nb]
            if PA + PB:
                nidx = torch.stack([torch.randint(sizes[p], (tc, nv), generator=g) for p, g
                                    in zip(order, gens)], dim=1).to(dev)  # [tc, PA+PB, nv]
            for k in range(tc):
                t = t0 + k
                first = t == 0 or not self.momentum
                beta = 0.0 if first else self.momentum          # decay of the buffer
                alpha = (1.0 if first else 1.0 - self.dampening) / B   # weight of this iteration's summed gradient
                loss = torch.zeros(P, device=dev)
                Wl = mm.weights(W)
                if nb and self.share_base_batches:
                    # products [r, d] x [d, P * C] for the base rows of all problems (in row blocks when the
                    # logits would outgrow LOGIT_BLOCK)
                    rows = bidx[k, 0]
                    for lo in range(0, nb, base_block):
                        r = min(base_block, nb - lo)
                        x = mm.rows(xb[rows[lo:lo + r]])                   # [r, d]
                        g = mm.softmax_of_linear(x, Wl.view(P * C, d), b.view(1, -1), groups=P)   # [r, P, C]
                        flat, target = g.view(-1), (row_starts[:r] + yb[rows[lo:lo + r]][:, None]).view(-1)
                        hit = flat[target]
                        loss -= torch.log(hit.clamp_min(1e-38)).view(r, P).sum(0)
                        flat.index_add_(0, target, torch.full_like(hit, -1.0))   # softmax - onehot
                        g = g.view(r, P * C)
                        decay = beta if lo == 0 else 1.0
                        mm.accumulate(bufW.view(P * C, d), g, x, decay, alpha)
                        bufb.mul_(decay).add_(g.sum(0).view(P, C), alpha=alpha)
                elif nb:
                    rows = bidx[k]                                         # [P, nb]
                    self._dense_step(mm, Wl, b, bufW, bufb, beta, alpha, loss, slice(0, P), xb[rows], yb[rows])
                else:
                    bufW.mul_(beta)
                    bufb.mul_(beta)
                for i, j, X, Y in buckets:
                    counts = torch.zeros(Y.shape, device=dev)
                    counts.scatter_add_(1, nidx[k, i:j], torch.ones(j - i, nv, device=dev))
                    self._dense_step(mm, Wl, b, bufW, bufb, 1.0, alpha, loss, slice(i, j), X, Y, counts)
                if PB:
                    rows = nidx[k, PA:] + offsets                          # [PB, nv]
                    self._dense_step(mm, Wl, b, bufW, bufb, 1.0, alpha, loss, slice(PA, PA + PB), pool[rows],
                                     pool_y[rows])
                # ---- weight decay (on W and b, as torch.optim.SGD) and the step
                if self.wd:
                    bufW.add_(W, alpha=alpha * B * self.wd)
                    bufb.add_(b, alpha=alpha * B * self.wd)
                W.add_(bufW, alpha=-self.lr)
                b.add_(bufb, alpha=-self.lr)
                loss_acc += loss / B
                loss_n += 1
                if self.log_every and (t + 1) % self.log_every == 0:
                    history.append((loss_acc / loss_n).cpu())
                    loss_acc.zero_()
                    loss_n = 0
            if progress is not None:
                progress(tc)
        if not torch.isfinite(W).all():
            raise FloatingPointError("the low-shot classifier diverged (non-finite weights); lower lr")
        hist = torch.stack(history)[:, inv] if history else torch.zeros(0, P)
        return W[inv], b[inv], hist

    @staticmethod
    def _dense_step(mm, Wl, b, bufW, bufb, beta, alpha, loss, sl, x, y, weights=None):
        """Cross-entropy gradient of problems ``sl`` on their own rows ``x [p, r, d]``, ``y [p, r]`` with optional
        row weights ``[p, r]`` (multiplicities), folded into the momentum buffers: ``buf[sl] = beta * buf[sl] +
        alpha * summed gradient``; the summed loss goes into ``loss[sl]``. ``mm``: the :class:`Products` of the
        loop, ``Wl`` the weights in its dtype."""
        x = mm.rows(x)
        C = Wl.shape[1]
        step = max(1, LOGIT_BLOCK // (x.shape[1] * C))      # problems per block
        for lo in range(0, x.shape[0], step):
            hi = min(lo + step, x.shape[0])
            q = slice(sl.start + lo, sl.start + hi)
            xs, ys = x[lo:hi], y[lo:hi].unsqueeze(2)
            g = mm.softmax_of_linear(xs, Wl[q], b[q].unsqueeze(1))[:, :, 0]     # [p, r, C]
            hit = g.gather(2, ys)
            per_row = -torch.log(hit.clamp_min(1e-38))[:, :, 0]
            g.scatter_add_(2, ys, torch.full_like(hit, -1.0))
            if weights is not None:
                g.mul_(weights[lo:hi].unsqueeze(2))
                per_row = per_row * weights[lo:hi]
            loss[q] += per_row.sum(1)
            mm.accumulate(bufW[q], g, xs, beta, alpha)
            bufb[q].mul_(beta).add_(g.sum(1), alpha=alpha)

    # ------------------------------------------------------------------------------------------------ L-BFGS
    def _full_objective(self, mm, W, b, xb, yb, novel, nb, nv):
        """Expected SGD objective (module doc) summed over problems: (loss, dL/dW, dL/db); ``mm`` the
        :class:`Products` of the products."""
        P, C, d = W.shape
        B = float(self.batch_size)
        gW = torch.zeros_like(W)
        gb = torch.zeros_like(b)
        total = torch.zeros((), device=W.device, dtype=torch.float64)
        if nb and len(yb):
            scale = (nb / B) / len(yb)
            Wf = W.view(P * C, d)
            for lo in range(0, len(yb), self.block_rows):
                x, y = xb[lo:lo + self.block_rows], yb[lo:lo + self.block_rows]
                r = len(y)
                z = mm.linear(x, Wf, b.view(1, -1)).view(r, P, C)
                lse = torch.logsumexp(z, dim=2, keepdim=True)
                ar = torch.arange(r, device=W.device)
                total += (lse[:, :, 0] - z[ar, :, y]).sum(dtype=torch.float64) * scale
                g = torch.exp_(z.sub_(lse))
                g[ar, :, y] -= 1.0
                g.mul_(scale)
                mm.accumulate(gW.view(P * C, d), g.view(r, P * C), x, 1.0, 1.0)
                gb += g.sum(0)
        if nv:
            for p, (fx, fy) in enumerate(novel):
                scale = (nv / B) / len(fy)
                for lo in range(0, len(fy), self.block_rows):
                    x, y = fx[lo:lo + self.block_rows], fy[lo:lo + self.block_rows]
                    z = mm.linear(x, W[p], b[p].view(1, -1))
                    lse = torch.logsumexp(z, dim=1, keepdim=True)
                    total += (lse[:, 0] - z.gather(1, y[:, None])[:, 0]).sum(dtype=torch.float64) * scale
                    g = torch.exp_(z.sub_(lse))
                    g[torch.arange(len(y), device=W.device), y] -= 1.0
                    g.mul_(scale)
                    mm.accumulate(gW[p], g, x, 1.0, 1.0)
                    gb[p] += g.sum(0)
        if self.wd:
            total += 0.5 * self.wd * (W.double().pow(2).sum() + b.double().pow(2).sum())
            gW.add_(W, alpha=self.wd)
            gb.add_(b, alpha=self.wd)
        return total, gW, gb

    def _lbfgs(self, xb, yb, novel, C, nb, nv, progress):
        P, d = len(novel), xb.shape[1]
        mm = Products(self.device, "fp32", self.gemm)
        self.gemm_ = mm.name
        W = torch.zeros(P, C, d, device=self.device, requires_grad=True)
        b = torch.zeros(P, C, device=self.device, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], lr=1, max_iter=self.lbfgs_iterations, history_size=20,
                                tolerance_grad=self.lbfgs_tol, tolerance_change=1e-12,
                                line_search_fn="strong_wolfe")
        evals = [0]

        def closure():
            with torch.no_grad():
                loss, gW, gb = self._full_objective(mm, W.detach(), b.detach(), xb, yb, novel, nb, nv)
            W.grad, b.grad = gW, gb
            evals[0] += 1
            return loss.float()

        opt.step(closure)
        n_iter = int(opt.state[opt._params[0]].get("n_iter", 0))
        if progress is not None:
            progress(self.iterations)
        Wd, bd = W.detach(), b.detach()
        if not torch.isfinite(Wd).all():
            raise FloatingPointError("L-BFGS diverged (non-finite weights)")
        self.n_evals_ = evals[0]
        return Wd, bd, n_iter

    # ------------------------------------------------------------------------------------------------ scoring
    def logits(self, features, problem: int | None = None) -> torch.Tensor:
        """``[n, C]`` scores ``x @ W.T + b`` (of problem ``problem``; all P as ``[P, n, C]`` when None and P > 1)."""
        self._check_fitted("weight_")
        x = self._tensor(features)
        if problem is None:
            if self.weight_.shape[0] == 1:
                return torch.addmm(self.bias_[0], x, self.weight_[0].t())
            return torch.baddbmm(self.bias_.unsqueeze(1), x.expand(self.weight_.shape[0], -1, -1),
                                 self.weight_.transpose(1, 2))
        return torch.addmm(self.bias_[problem], x, self.weight_[problem].t())

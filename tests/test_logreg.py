"""The low-shot linear classifier (heads/logreg.py): PyTorch-exact SGD, batching, solvers, scikit-learn."""

import numpy as np
import pytest
import torch

from heads.base import HEADS
from heads.logreg import LowShotLogReg, base_rows_per_batch, default_init


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny problems: one thread avoids OpenMP barriers on a busy 2-core machine.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def blobs(classes=6, per=150, d=16, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d)) * scale

    def draw(m):
        y = np.repeat(np.arange(classes), m)
        x = np.maximum(centres[y] + rng.standard_normal((len(y), d)), 0)
        return x.astype(np.float32), y

    return draw(per), draw(60)


def lowshot_problem(seed=0, d=12, n_base=4, n_novel=3, base_per=60, shots=2, test_per=40):
    """Base classes 0..n_base-1 with many rows, novel classes with ``shots`` rows each, 2 unused classes."""
    rng = np.random.default_rng(seed)
    C = n_base + n_novel + 2
    centres = rng.standard_normal((C, d)) * 1.5

    def draw(classes, per):
        y = np.repeat(np.asarray(classes), per)
        return np.maximum(centres[y] + rng.standard_normal((len(y), d)), 0).astype(np.float32), y

    base = list(range(n_base))
    novel = list(range(n_base, n_base + n_novel))
    xb, yb = draw(base, base_per)
    xn, yn = draw(novel, shots)
    xt, yt = draw(base + novel, test_per)
    return C, base, novel, (xb, yb), (xn, yn), (xt, yt)


def test_registered_and_batch_mix():
    assert HEADS["logreg"] is LowShotLogReg
    assert base_rows_per_batch(1000, 196, 311) == 387     # ImageNet test setup: 196 base, 311 novel classes
    assert base_rows_per_batch(1000, 193, 300) == 391     # validation setup
    W, b = default_init(2, 5, 16, [0, 1])
    assert W.shape == (2, 5, 16) and b.shape == (2, 5) and W.abs().max() <= 0.25
    assert not torch.equal(W[0], W[1])


@pytest.mark.parametrize("gemm", ["torch", "numpy"])
def test_sgd_is_torch_optim_sgd_with_dampening(gemm):
    """One problem, same batches: our batched update equals nn.Linear + torch.optim.SGD(momentum 0.9,
    dampening 0.9, weight decay) + CrossEntropyLoss, both when novel rows are gathered and when the whole
    novel pool is weighted by draw counts, with either BLAS computing the products."""
    C, base, novel, (xb, yb), (xn, yn), _ = lowshot_problem(shots=8)
    T, batch = 30, 40
    nb = base_rows_per_batch(batch, len(base), len(novel))
    nv = batch - nb
    for shots in (8, 3):  # 24 > nv (gathered) and 9 <= nv (weighted pool)
        keep = np.concatenate([np.flatnonzero(yn == c)[:shots] for c in novel])
        fx, fy = xn[keep], yn[keep]
        assert (len(fy) > nv) == (shots == 8)
        head = LowShotLogReg(num_classes=C, lr=0.5, wd=1e-2, iterations=T, batch_size=batch, seed=3, chunk=T,
                             gemm=gemm)
        head.fit_many(xb, yb, [(fx, fy)], base_classes=base, novel_classes=novel, seeds=[11], base_seed=5)

        # The same random numbers, drawn the way the head draws them.
        rng = np.random.default_rng(5)
        bidx = [rng.choice(len(yb), size=nb, replace=False, shuffle=False) for _ in range(T)]
        nidx = torch.randint(len(fy), (T, nv), generator=torch.Generator().manual_seed(11 + 7_919))
        lin = torch.nn.Linear(xb.shape[1], C)
        W0, b0 = default_init(1, C, xb.shape[1], [11])
        with torch.no_grad():
            lin.weight.copy_(W0[0])
            lin.bias.copy_(b0[0])
        opt = torch.optim.SGD(lin.parameters(), lr=0.5, momentum=0.9, dampening=0.9, weight_decay=1e-2)
        for t in range(T):
            x = torch.cat([torch.from_numpy(xb[bidx[t]]), torch.from_numpy(fx)[nidx[t]]])
            y = torch.cat([torch.from_numpy(yb[bidx[t]]), torch.from_numpy(fy)[nidx[t]]]).long()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin(x), y).backward()
            opt.step()
        torch.testing.assert_close(head.weight_[0], lin.weight.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(head.bias_[0], lin.bias.detach(), atol=1e-5, rtol=1e-4)
        assert head.gemm_ == gemm


def test_fit_many_equals_separate_fits():
    """A classifier's result does not depend on which others are batched with it (shared base stream)."""
    C, base, novel, (xb, yb), (xn, yn), (xt, _) = lowshot_problem(shots=10)
    problems = []
    for shots in (1, 10, 2):
        keep = np.concatenate([np.flatnonzero(yn == c)[:shots] for c in novel])
        problems.append((xn[keep], yn[keep]))
    kw = dict(num_classes=C, lr=0.5, wd=1e-3, iterations=60, batch_size=40, chunk=25)
    many = LowShotLogReg(**kw).fit_many(xb, yb, problems, base_classes=base, novel_classes=novel,
                                        seeds=[1, 2, 3], base_seed=9)
    for p, prob in enumerate(problems):
        one = LowShotLogReg(**kw).fit_many(xb, yb, [prob], base_classes=base, novel_classes=novel,
                                           seeds=[p + 1], base_seed=9)
        torch.testing.assert_close(many.weight_[p], one.weight_[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(many.logits(xt, problem=p), one.logits(xt), atol=1e-4, rtol=1e-4)
    assert many.logits(xt).shape == (3, len(xt), C)
    assert many.loss_history_.shape == (0, 3) or many.loss_history_.shape[1] == 3


def test_independent_base_batches_and_bf16_still_learn():
    C, base, novel, (xb, yb), (xn, yn), (xt, yt) = lowshot_problem(shots=5)
    accs = []
    for extra in ({"share_base_batches": False}, {"precision": "bf16"}):
        head = LowShotLogReg(num_classes=C, lr=0.5, wd=1e-3, iterations=300, batch_size=40, **extra)
        head.fit(np.concatenate([xb, xn]), np.concatenate([yb, yn]), base_classes=base, novel_classes=novel)
        accs.append(float((head.predict(xt).numpy() == yt).mean()))
    assert min(accs) > 0.8, accs


def test_against_scikit_learn():
    """Same data, same objective: scikit-learn's multinomial LogisticRegression with C = 1 / (wd * N) on features
    with a constant column (so that, like ours, the bias is penalised too)."""
    from sklearn.linear_model import LogisticRegression

    (x, y), (xt, yt) = blobs()
    wd = 1e-3
    sk = LogisticRegression(C=1 / (wd * len(y)), fit_intercept=False, max_iter=5000, tol=1e-8)
    sk.fit(np.hstack([x, np.ones((len(x), 1), np.float32)]), y)
    sk_pred = sk.predict(np.hstack([xt, np.ones((len(xt), 1), np.float32)]))
    sk_acc = (sk_pred == yt).mean()

    full = LowShotLogReg(wd=wd, solver="lbfgs", lbfgs_tol=1e-7).fit(x, y)
    np.testing.assert_allclose(full.weight_[0].numpy(), sk.coef_[:, :-1], atol=2e-2)
    np.testing.assert_allclose(full.bias_[0].numpy(), sk.coef_[:, -1], atol=2e-2)
    assert (full.predict(xt).numpy() == sk_pred).mean() >= 0.99

    sgd = LowShotLogReg(lr=0.1, wd=wd, iterations=2000, batch_size=200, seed=1).fit(x, y)
    pred = sgd.predict(xt).numpy()
    assert abs((pred == yt).mean() - sk_acc) <= 0.02
    assert (pred == sk_pred).mean() >= 0.95


def test_lbfgs_reaches_the_sgd_accuracy_on_a_lowshot_problem():
    C, base, novel, (xb, yb), (xn, yn), (xt, yt) = lowshot_problem(seed=2, shots=3)
    x, y = np.concatenate([xb, xn]), np.concatenate([yb, yn])
    accs = {}
    for solver in ("sgd", "lbfgs"):
        head = LowShotLogReg(num_classes=C, lr=0.5, wd=1e-2, iterations=3000, batch_size=40, solver=solver)
        head.fit(x, y, base_classes=base, novel_classes=novel)
        pred = head.predict(xt).numpy()
        accs[solver] = {part: float((pred == yt)[np.isin(yt, cls)].mean()) for part, cls in
                        (("base", base), ("novel", novel))}
    for part in ("base", "novel"):
        assert abs(accs["sgd"][part] - accs["lbfgs"][part]) <= 0.05, accs


def test_errors():
    with pytest.raises(ValueError, match="solver"):
        LowShotLogReg(solver="adam")
    with pytest.raises(ValueError, match="gemm"):
        LowShotLogReg(gemm="mkl")
    with pytest.raises(ValueError, match="numpy backend"):
        LowShotLogReg(gemm="numpy", precision="bf16", iterations=1, batch_size=5).fit(
            np.ones((10, 3), np.float32), np.arange(10) % 2)
    with pytest.warns(UserWarning, match="dampening"):
        LowShotLogReg(dampening=0.0)
    x = np.ones((10, 3), np.float32)
    with pytest.raises(ValueError, match="base pool has 10 rows"):
        LowShotLogReg(batch_size=50, iterations=1).fit(x, np.zeros(10, int))
    with pytest.raises(ValueError, match="num_classes"):
        LowShotLogReg(num_classes=2, batch_size=5, iterations=1).fit(x, np.arange(10) % 4)
    from heads.base import NotFittedError

    with pytest.raises(NotFittedError):
        LowShotLogReg().logits(x)


def test_small_softmax_by_hand_matches_torch():
    from heads._cpu_blas import SMALL_SOFTMAX, Products

    g = torch.Generator().manual_seed(0)
    x, W, bias = torch.randn(40, 16, generator=g), torch.randn(5 * 10, 16, generator=g), torch.randn(50, generator=g)
    mm = Products("cpu", "fp32", "torch")
    got = mm.softmax_of_linear(x, W, bias.view(1, -1), groups=5).clone()          # [40, 5, 10]
    ref = torch.softmax((x @ W.T + bias).view(40, 5, 10), dim=-1)
    assert 10 <= SMALL_SOFTMAX
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-7)
    assert torch.allclose(got.sum(-1), torch.ones(40, 5), atol=1e-6)


def test_merged_novel_buckets_give_the_same_classifiers(monkeypatch):
    """Small novel pools of every size share one step (MERGE_WORK); the weights equal those of one step per
    bucket of similar sizes up to float rounding (zero-weight padding rows add nothing)."""
    import heads.logreg as lr_mod

    g = torch.Generator().manual_seed(1)
    xb, yb = torch.randn(120, 8, generator=g).relu(), torch.randint(0, 3, (120,), generator=g)
    problems = [(torch.randn(3 * n, 8, generator=g).relu(), torch.tensor([3, 4, 5] * n)) for n in (1, 2, 5, 10)]

    def fit():
        return LowShotLogReg(num_classes=6, iterations=50, batch_size=60).fit_many(
            xb, yb, problems, base_classes=[0, 1, 2], novel_classes=[3, 4, 5])

    merged = fit()
    monkeypatch.setattr(lr_mod, "MERGE_WORK", 0)
    separate = fit()
    assert torch.allclose(merged.weight_, separate.weight_, rtol=1e-5, atol=1e-6)
    assert torch.allclose(merged.bias_, separate.bias_, rtol=1e-5, atol=1e-6)

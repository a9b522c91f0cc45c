"""bench.metrics against scikit-learn (random and tied inputs) and batched forms against per-episode loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score, roc_curve, top_k_accuracy_score

from bench import metrics as M
from bench.report import mean_ci95


def cases(n=60, seed=0):
    """(scores, is_unknown) pairs: continuous scores, heavily tied integer scores, all-tied scores."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        m = int(rng.integers(4, 80))
        y = rng.random(m) < rng.uniform(0.2, 0.8)
        y[0], y[1] = True, False
        if i % 3 == 0:
            s = rng.standard_normal(m) + y
        elif i % 3 == 1:
            s = rng.integers(0, 4, m).astype(float) + y * rng.integers(0, 2, m)
        else:
            s = np.full(m, 0.5) if i % 2 else rng.integers(0, 2, m).astype(float)
        out.append((s, y))
    return out


def test_auroc_aupr_fpr95_match_sklearn():
    for s, y in cases():
        assert M.auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert M.aupr(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert M.aupr(s, y, positive="known") == pytest.approx(average_precision_score(~y, -s), abs=1e-12)
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        f, t = M.roc_points(s, y)
        assert np.allclose(f, fpr) and np.allclose(t, tpr)


def test_fpr_at_95tpr_is_the_ood_convention_against_roc_curve():
    """FPR@95TPR: knowns positive (score -s), the first ROC point with TPR >= 0.95, on random and tied scores."""
    rng = np.random.default_rng(11)
    extra = [(rng.integers(0, 3, 200).astype(float), rng.random(200) < 0.5) for _ in range(20)]  # heavy ties
    for s, y in cases() + extra:
        fpr, tpr, thr = roc_curve(~y, -s, drop_intermediate=False)
        i = np.argmax(tpr >= 0.95)
        assert M.fpr_at_95tpr(s, y) == pytest.approx(fpr[i], abs=1e-12)
        # the same by counting: t = the smallest open score accepting >= 95% of the knowns (ties at t accepted)
        t = np.sort(s[~y])[int(np.ceil(0.95 * (~y).sum() - 1e-9)) - 1]
        assert -thr[i] == t and M.fpr_at_95tpr(s, y) == pytest.approx((s[y] <= t).mean(), abs=1e-12)
        # the reverse reading keeps its own name
        fpr_u, tpr_u, _ = roc_curve(y, s, drop_intermediate=False)
        assert M.known_rejection_at_95_unknown_recall(s, y) == pytest.approx(fpr_u[np.argmax(tpr_u >= 0.95)],
                                                                            abs=1e-12)


def test_fpr_at_95tpr_toy_case():
    """100 knowns, 100 unknowns (open scores): at 95% of knowns accepted (t = 1.9) the unknowns at 0.5 and 1.5
    are accepted: FPR@95TPR = 10/100. Flagging 95% of the unknowns instead (t = 1.5) rejects 44 + 5 knowns:
    0.49, the reverse reading."""
    known = np.r_[np.linspace(0.0, 0.4, 51), np.linspace(1.6, 1.9, 44), np.full(5, 6.0)]
    unknown = np.r_[np.full(5, 0.5), np.full(5, 1.5), np.full(90, 5.0)]
    s = np.r_[known, unknown]
    y = np.r_[np.zeros(100, bool), np.ones(100, bool)]
    assert M.fpr_at_95tpr(s, y) == pytest.approx(0.10, abs=1e-12)
    assert M.known_rejection_at_95_unknown_recall(s, y) == pytest.approx(0.49, abs=1e-12)
    fpr, tpr, _ = roc_curve(~y, -s)  # scikit-learn's defaults, knowns positive
    assert fpr[np.argmax(tpr >= 0.95)] == pytest.approx(0.10)


def test_torch_input_and_degenerate_episodes():
    s = torch.tensor([0.1, 0.4, 0.35, 0.8])
    y = torch.tensor([False, False, True, True])
    assert M.auroc(s, y) == pytest.approx(0.75)
    assert math.isnan(M.auroc([0.1, 0.2], [True, True]))  # one class only: undefined
    assert math.isnan(M.aupr([0.1, 0.2], [False, False]))
    with pytest.raises(ValueError, match="1-D"):
        M.auroc(np.zeros((2, 3)), np.zeros((2, 3), bool))


def oscr_reference(scores, is_unknown, correct):
    """OSCR by its definition: accept when score <= t for every distinct t; trapezoids from (0, 0)."""
    known = ~is_unknown
    pts = [(0.0, 0.0)]
    for t in np.unique(scores):
        acc = scores <= t
        pts.append(((acc & is_unknown).sum() / is_unknown.sum(), (acc & known & correct).sum() / known.sum()))
    x, h = np.array(pts).T
    return float(np.sum((x[1:] - x[:-1]) * (h[1:] + h[:-1]) / 2))


def test_oscr():
    rng = np.random.default_rng(3)
    for s, y in cases():
        correct = rng.random(len(s)) < 0.7
        assert M.oscr(s, y, correct) == pytest.approx(oscr_reference(s, y, correct), abs=1e-12)
        # every known correctly classified: OSCR is the AUROC
        assert M.oscr(s, y, np.ones(len(s), bool)) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_f1_variants_match_sklearn():
    rng = np.random.default_rng(4)
    for i in range(80):
        n_known = int(rng.integers(2, 6))
        m = int(rng.integers(5, 60))
        labels = np.where(rng.random(m) < 0.4, -1, rng.integers(0, n_known, m))
        pred = rng.integers(0, n_known + 1, m) if i % 2 else rng.integers(0, 2, m)  # often few labels predicted
        truth = np.where(labels < 0, n_known, labels)
        std = f1_score(truth, pred, labels=np.arange(n_known + 1), average="macro", zero_division=0)
        paper = f1_score(truth, pred, labels=np.unique(pred), average="macro", zero_division=0)
        assert M.open_macro_f1(pred, labels, n_known) == pytest.approx(std, abs=1e-12)
        assert M.paper_f1(pred, labels, n_known) == pytest.approx(paper, abs=1e-12)
        assert M.paper_f1(pred, labels, n_known) >= M.open_macro_f1(pred, labels, n_known) - 1e-12
    with pytest.raises(ValueError, match="0..3"):
        M.open_macro_f1([0, 4], [0, 1], 3)


def test_f1_by_hand():
    # N = 2; truth 0 0 1 U, pred 0 U U U: F1(0) = 2/3, F1(1) = 0 (never predicted), F1(U) = 2*1/(3+1) = 0.5
    pred, labels = [0, 2, 2, 2], [0, 0, 1, -1]
    assert M.open_macro_f1(pred, labels, 2) == pytest.approx((2 / 3 + 0 + 0.5) / 3)
    assert M.paper_f1(pred, labels, 2) == pytest.approx((2 / 3 + 0.5) / 2)


def test_topk_and_closed_accuracy():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((50, 7))
    labels = rng.integers(0, 7, 50)
    got = M.topk_accuracy(logits, labels, ks=(1, 3, 5, 10))
    for k in (1, 3, 5):
        assert got[k] == pytest.approx(top_k_accuracy_score(labels, logits, k=k, labels=np.arange(7)))
    assert got[10] == 1.0
    masked = labels.copy()
    masked[:10] = -1  # unknowns are skipped
    assert M.topk_accuracy(logits, masked, ks=(1,))[1] == pytest.approx(
        (logits[10:].argmax(1) == labels[10:]).mean())
    assert M.closed_accuracy(logits.argmax(1), masked) == pytest.approx((logits[10:].argmax(1) == labels[10:]).mean())


def test_batched_equal_per_episode_loops():
    rng = np.random.default_rng(6)
    E, m, N = 40, 30, 5
    scores = rng.integers(0, 6, (E, m)).astype(np.float32)  # many ties
    scores[::2] += rng.standard_normal((E // 2, m)).astype(np.float32)
    unknown = rng.random((E, m)) < 0.5
    unknown[:, 0], unknown[:, 1] = True, False
    labels = np.where(unknown, -1, rng.integers(0, N, (E, m)))
    closed = rng.integers(0, N, (E, m))
    pred = np.where(rng.random((E, m)) < 0.4, N, closed)
    correct = closed == labels
    st, ut = torch.from_numpy(scores), torch.from_numpy(unknown)
    batched = {
        "auroc": (M.batched_auroc(st, ut), lambda e: M.auroc(scores[e], unknown[e])),
        "aupr": (M.batched_aupr(st, ut), lambda e: M.aupr(scores[e], unknown[e])),
        "fpr95": (M.batched_fpr_at_95tpr(st, ut),
                  lambda e: (lambda f, t, _: f[np.argmax(t >= 0.95)])(*roc_curve(~unknown[e], -scores[e],
                                                                                  drop_intermediate=False))),
        "known_rejection": (M.batched_known_rejection_at_95_unknown_recall(st, ut),
                            lambda e: M.known_rejection_at_95_unknown_recall(scores[e], unknown[e])),
        "oscr": (M.batched_oscr(st, ut, correct), lambda e: oscr_reference(scores[e], unknown[e], correct[e])),
        "f1": (M.batched_open_macro_f1(pred, labels, N), lambda e: M.open_macro_f1(pred[e], labels[e], N)),
        "paper": (M.batched_paper_f1(pred, labels, N), lambda e: M.paper_f1(pred[e], labels[e], N)),
        "acc": (M.batched_closed_accuracy(closed, labels),
                lambda e: (closed[e][labels[e] >= 0] == labels[e][labels[e] >= 0]).mean()),
    }
    for name, (values, one) in batched.items():
        assert values.shape == (E,), name
        for e in range(E):
            assert float(values[e]) == pytest.approx(float(one(e)), abs=1e-9), (name, e)
    # and against scikit-learn directly
    for e in range(E):
        assert float(batched["auroc"][0][e]) == pytest.approx(roc_auc_score(unknown[e], scores[e]), abs=1e-9)


def test_open_predictions_and_ci():
    p = M.open_predictions(torch.tensor([0, 1, 2]), torch.tensor([False, True, False]), 3)
    assert p.tolist() == [0, 3, 2]
    assert M.mean_ci95 is mean_ci95
    mean, half = M.mean_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0 and half > 0

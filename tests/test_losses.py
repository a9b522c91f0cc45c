"""The auxiliary losses of representation training against values and gradients computed by hand in numpy."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from extract.losses import AuxLoss, batch_sgm_loss, l2_feature_loss, rotate_batch, sgm_loss
from featstore.errors import UserError

RNG = np.random.default_rng(7)
X = RNG.normal(size=(3, 4))          # features [B, d]
S = RNG.normal(size=(3, 5)) * 2      # logits [B, C]
Y = np.array([1, 4, 0])              # targets [B]


def softmax(s):
    e = np.exp(s - s.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def one_hot(y, c):
    out = np.zeros((len(y), c))
    out[np.arange(len(y)), y] = 1
    return out


def tensors():
    x = torch.tensor(X, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(S, dtype=torch.float64, requires_grad=True)
    return x, s, torch.tensor(Y)


def softmax_backward(p, g):
    """d/ds of a function of p = softmax(s), given g = d/dp: p * (g - <g, p>)."""
    return p * (g - (g * p).sum(1, keepdims=True))


def finite_difference(f, a, eps=1e-6):
    grad = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        up, down = a.copy(), a.copy()
        up[idx] += eps
        down[idx] -= eps
        grad[idx] = (f(up) - f(down)) / (2 * eps)
    return grad


def sgm_numpy(x, s, y=Y):
    e = softmax(s) - one_hot(y, s.shape[1])
    return np.mean((e ** 2).sum(1) * (x ** 2).sum(1))


def batch_sgm_numpy(x, s, y=Y):
    e = softmax(s) - one_hot(y, s.shape[1])
    g = e.T @ x / len(x)
    return (g ** 2).sum()


def test_sgm_value_and_gradients():
    x, s, y = tensors()
    loss = sgm_loss(x, s, y)
    B = len(X)
    p = softmax(S)
    e = p - one_hot(Y, 5)
    a = (e ** 2).sum(1)                     # ||p - y||^2
    b = (X ** 2).sum(1)                     # ||x||^2
    assert loss.item() == pytest.approx((a * b).sum() / B, rel=1e-12)
    loss.backward()
    # by hand: d/dx_i = (2/B) a_i x_i ; d/ds_i = (b_i/B) * softmax_backward(p_i, 2 e_i)
    grad_x = 2 * a[:, None] * X / B
    grad_s = b[:, None] / B * softmax_backward(p, 2 * e)
    np.testing.assert_allclose(x.grad.numpy(), grad_x, rtol=1e-10)
    np.testing.assert_allclose(s.grad.numpy(), grad_s, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(x.grad.numpy(), finite_difference(lambda v: sgm_numpy(v, S), X), rtol=1e-6)
    np.testing.assert_allclose(s.grad.numpy(), finite_difference(lambda v: sgm_numpy(X, v), S), rtol=1e-5,
                               atol=1e-9)


def test_sgm_detach_p_stops_the_gradient_through_p():
    x, s, y = tensors()
    loss = sgm_loss(x, s, y, detach_p=True)
    assert loss.item() == pytest.approx(sgm_numpy(X, S), rel=1e-12)
    loss.backward()
    assert s.grad is None or torch.count_nonzero(s.grad) == 0
    e = softmax(S) - one_hot(Y, 5)
    np.testing.assert_allclose(x.grad.numpy(), 2 * (e ** 2).sum(1)[:, None] * X / len(X), rtol=1e-10)


def test_batch_sgm_value_and_gradients():
    x, s, y = tensors()
    loss = batch_sgm_loss(x, s, y)
    B = len(X)
    p = softmax(S)
    e = p - one_hot(Y, 5)
    G = sum(np.outer(e[i], X[i]) for i in range(B)) / B     # [C, d], the batch-average gradient w.r.t. W
    assert G.shape == (5, 4)
    assert loss.item() == pytest.approx((G ** 2).sum(), rel=1e-12)
    loss.backward()
    grad_x = 2 / B * e @ G                                   # d||G||^2 / dx_i = (2/B) G^T e_i
    grad_s = softmax_backward(p, 2 / B * X @ G.T)            # d||G||^2 / de_i = (2/B) G x_i, then softmax
    np.testing.assert_allclose(x.grad.numpy(), grad_x, rtol=1e-10)
    np.testing.assert_allclose(s.grad.numpy(), grad_s, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(s.grad.numpy(), finite_difference(lambda v: batch_sgm_numpy(X, v), S), rtol=1e-5,
                               atol=1e-9)


def test_batch_sgm_is_not_the_mean_of_per_example_sgm():
    x, s, y = tensors()
    assert batch_sgm_loss(x, s, y).item() < sgm_loss(x, s, y).item()


def test_l2_value_and_gradient():
    x = torch.tensor(X, requires_grad=True)
    loss = l2_feature_loss(x)
    assert loss.item() == pytest.approx((X ** 2).sum() / (2 * len(X)), rel=1e-12)
    loss.backward()
    np.testing.assert_allclose(x.grad.numpy(), X / len(X), rtol=1e-12)


def test_float32_inputs_work():
    x = torch.tensor(X, dtype=torch.float32)
    s = torch.tensor(S, dtype=torch.float32)
    assert sgm_loss(x, s, torch.tensor(Y)).item() == pytest.approx(sgm_numpy(X, S), rel=1e-5)
    assert batch_sgm_loss(x, s, torch.tensor(Y)).item() == pytest.approx(batch_sgm_numpy(X, S), rel=1e-5)


def test_rotate_batch():
    x = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).view(2, 1, 2, 2)   # image 0: [[0, 1], [2, 3]]
    x4, labels = rotate_batch(x)
    assert x4.shape == (8, 1, 2, 2)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(x4[:2], x)
    # 90 degrees counter-clockwise: the right column moves to the top row
    assert x4[2, 0].tolist() == [[1.0, 3.0], [0.0, 2.0]]
    assert x4[4, 0].tolist() == [[3.0, 2.0], [1.0, 0.0]]
    assert x4[6, 0].tolist() == [[2.0, 0.0], [3.0, 1.0]]
    # each block turned back by its own angle gives the originals
    for k in range(4):
        assert torch.equal(torch.rot90(x4[2 * k:2 * k + 2], -k, dims=(-2, -1)), x)
    with pytest.raises(ValueError):
        rotate_batch(torch.zeros(1, 1, 2, 3))


def test_aux_loss_combines_ce_and_the_weighted_term():
    x, s, y = tensors()
    out = AuxLoss("sgm", 0.02)(x, s, y)
    ce = -np.log(softmax(S)[np.arange(3), Y]).mean()
    assert out["ce"].item() == pytest.approx(ce, rel=1e-12)
    assert out["aux"].item() == pytest.approx(sgm_numpy(X, S), rel=1e-12)
    assert out["loss"].item() == pytest.approx(ce + 0.02 * sgm_numpy(X, S), rel=1e-12)
    base = AuxLoss()(x, s, y)
    assert base["loss"].item() == pytest.approx(ce, rel=1e-12) and base["aux"].item() == 0
    rot_logits = torch.tensor(RNG.normal(size=(3, 4)))
    rot_y = torch.tensor([0, 3, 2])
    with_rot = AuxLoss("l2", 0.03, rotation_weight=0.7)(x, s, y, rot_logits, rot_y)
    expected = ce + 0.03 * (X ** 2).sum() / 6 + 0.7 * F.cross_entropy(rot_logits, rot_y).item()
    assert with_rot["loss"].item() == pytest.approx(expected, rel=1e-12)


def test_aux_loss_refuses_hidden_defaults():
    with pytest.raises(UserError, match="needs a positive weight"):
        AuxLoss("l2")
    with pytest.raises(UserError, match="needs an auxiliary loss"):
        AuxLoss("none", 0.1)
    with pytest.raises(UserError, match="unknown auxiliary loss"):
        AuxLoss("sgm2", 1.0)

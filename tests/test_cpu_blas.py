"""heads/_cpu_blas.py: the numpy route gives torch's products, softmax and gradients."""

import numpy as np
import pytest
import torch

from heads._cpu_blas import Products, _NumpyMatmul, numpy_blas_is_faster


def test_rule_is_a_fixed_answer():
    assert numpy_blas_is_faster() in (True, False)
    assert numpy_blas_is_faster() == numpy_blas_is_faster()


@pytest.mark.parametrize("batched", [False, True])
def test_products_agree_across_backends(batched):
    g = torch.Generator().manual_seed(0)
    lead = (3,) if batched else ()
    x = torch.rand(*lead, 7, 5, generator=g)
    W = torch.randn(*lead, 8, 5, generator=g)
    bias = torch.randn(*lead, 1, 8, generator=g)
    want = torch.softmax((x @ W.transpose(-1, -2) + bias).view(*lead, 7, 2, 4), dim=-1)
    grads = torch.rand(*lead, 7, 8, generator=g)
    acc0 = torch.randn(*lead, 8, 5, generator=g)
    for backend in ("torch", "numpy"):
        mm = Products("cpu", "fp32", backend)
        torch.testing.assert_close(mm.softmax_of_linear(x, mm.weights(W), bias, groups=2), want)
        for beta in (0.0, 0.9):
            acc = acc0.clone()
            mm.accumulate(acc, grads, x, beta, 0.25)
            torch.testing.assert_close(acc, beta * acc0 + 0.25 * grads.transpose(-1, -2) @ x)
    low = Products("cpu", "bf16")
    assert low.name == "torch-bf16"
    torch.testing.assert_close(low.softmax_of_linear(x, low.weights(W), bias, groups=2), want, atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="float32 products on the CPU"):
        Products("cpu", "bf16", "numpy")


def test_numpy_matmul_forward_and_gradients_equal_torch():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 4, 6, generator=g, requires_grad=True)
    b = torch.randn(2, 6, 3, generator=g)
    bt = b.transpose(-1, -2).contiguous().requires_grad_()   # a transposed view as the second operand
    out = _NumpyMatmul.apply(a, bt.transpose(-1, -2))
    ref_a, ref_b = a.detach().clone().requires_grad_(), bt.detach().clone().requires_grad_()
    ref = ref_a @ ref_b.transpose(-1, -2)
    torch.testing.assert_close(out, ref)
    up = torch.randn(2, 4, 3, generator=g)
    (out * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(a.grad, ref_a.grad)
    torch.testing.assert_close(bt.grad, ref_b.grad)
    assert np.isfinite(a.grad.numpy()).all()

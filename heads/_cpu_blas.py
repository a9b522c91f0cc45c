"""Matrix products of the heads' hot loops, on the CPU BLAS that is fast on this machine.

torch's CPU wheels link Intel MKL, which dispatches only its AVX2 kernels on AMD processors, while numpy's
OpenBLAS runs its AVX-512 kernels there: on an AMD EPYC (Zen 4) with one thread, float32 GEMMs of the low-shot
classifier's base step ran at 64 GFLOP/s through torch and 89 through numpy (``bench perf --sections lowshot``
measures both, docs/performance.md). :class:`Products` therefore routes float32 CPU products through numpy where that
combination is present and through torch everywhere else (GPUs, Intel CPUs, other BLAS builds), and bfloat16
products through torch (oneDNN uses the AVX512-BF16 / AMX units where the CPU has them). The choice is a fixed rule,
not a timing, so the same machine always takes the same path and gives the same numbers.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

BACKENDS = ("auto", "torch", "numpy")
#: softmax groups of at most this many logits are computed by hand on the CPU (see softmax_of_linear)
SMALL_SOFTMAX = 32


@functools.lru_cache(maxsize=1)
def numpy_blas_is_faster() -> bool:
    """True where torch's BLAS is MKL, numpy's is OpenBLAS with an AVX-512 kernel, and the CPU is an AMD one."""
    try:
        vendor = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                       if line.startswith("vendor_id")), "")
    except OSError:
        return False
    if vendor != "AuthenticAMD" or not torch.backends.mkl.is_available():
        return False
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return False
    numpy_libs = [info for info in threadpool_info() if info.get("internal_api") == "openblas"
                  and "numpy" in str(info.get("filepath", "")).lower()]
    avx512_cores = ("skylakex", "cooperlake", "sapphirerapids", "zen4", "zen5")
    return any(str(info.get("architecture", "")).lower() in avx512_cores for info in numpy_libs)


class Products:
    """The products and the softmax of the SGD loop for one device and precision, into reused buffers.

    ``precision`` "fp32" or "bf16" (matrix products in bfloat16 with float32 results); ``backend`` "auto" (the rule
    of the module doc), "torch" or "numpy" (float32 CPU products through numpy's BLAS). Inputs and outputs are torch
    tensors; numpy is reached through zero-copy views. Results land in buffers that are allocated once and reused:
    fresh multi-megabyte tensors every iteration cost more in page faults than the arithmetic on them.
    """

    def __init__(self, device: torch.device | str = "cpu", precision: str = "fp32", backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown matrix-product backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.device = torch.device(device)
        self.low = torch.bfloat16 if precision == "bf16" else None
        on_cpu32 = self.device.type == "cpu" and self.low is None
        if backend == "numpy" and not on_cpu32:
            raise ValueError("the numpy backend computes float32 products on the CPU only")
        self.numpy = on_cpu32 and (backend == "numpy" or (backend == "auto" and numpy_blas_is_faster()))
        self.name = "numpy" if self.numpy else ("torch-bf16" if self.low is not None else "torch")
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 tensor of ``shape`` backed by the reused buffer ``name`` (contents undefined)."""
        size = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < size:
            buf = self._buffers[name] = torch.empty(size, device=self.device)
        return buf[:size].view(shape)

    def weights(self, W: torch.Tensor) -> torch.Tensor:
        """W in the dtype of the products (a bfloat16 copy for bf16; W itself otherwise): once per iteration."""
        return W if self.low is None else W.to(self.low)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """Rows in the dtype of the products (callers convert constant inputs once)."""
        return x if self.low is None or x.dtype == self.low else x.to(self.low)

    def linear(self, x: torch.Tensor, Wl: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``x @ Wl^T + bias``: x [..., r, d], Wl [..., C, d] (from :meth:`weights`), bias broadcast to the result
        [..., r, C], float32, in the buffer "logits" (valid until the next call; callers may change it in place)."""
        shape = (*x.shape[:-1], Wl.shape[-2])
        z = self.buffer("logits", shape)
        if self.numpy:
            np.matmul(x.numpy(), np.swapaxes(Wl.numpy(), -1, -2), out=z.numpy())
            z.add_(bias)
        elif self.low is None:
            if x.ndim == 2:
                torch.addmm(bias, x, Wl.t(), out=z)
            else:
                torch.baddbmm(bias, x, Wl.transpose(-1, -2), out=z)
        else:
            z.copy_(torch.matmul(self.rows(x), Wl.transpose(-1, -2))).add_(bias)
        return z

    def softmax_of_linear(self, x: torch.Tensor, Wl: torch.Tensor, bias: torch.Tensor, groups: int = 1
                          ) -> torch.Tensor:
        """softmax(x @ Wl^T + bias) over groups of C = Wl.shape[-2] // groups logits: x [..., r, d], Wl [..., G * C,
        d] (from :meth:`weights`), bias broadcast to the logits [..., r, G * C]. Returns [..., r, G, C] in the
        buffer "softmax" (valid until the next call)."""
        z = self.linear(x, Wl, bias)
        shape = z.shape
        grouped = (*shape[:-1], groups, shape[-1] // groups)
        out = self.buffer("softmax", grouped)
        if grouped[-1] > SMALL_SOFTMAX or self.device.type != "cpu":
            return torch._softmax(z.view(grouped), -1, False, out=out)
        # torch's CPU softmax over a short last dimension runs at about 18 ns an element (a [100, 25, 10] block:
        # 450 us); max, subtract, exp and a division by the row sums take 80 us for the same block
        z = z.view(grouped)
        torch.sub(z, z.amax(-1, keepdim=True), out=out)
        out.exp_()
        return out.div_(out.sum(-1, keepdim=True))

    def accumulate(self, out: torch.Tensor, g: torch.Tensor, x: torch.Tensor, beta: float, alpha: float) -> None:
        """``out = beta * out + alpha * g^T x`` in place: g [..., r, C], x [..., r, d], out [..., C, d] float32."""
        if self.low is None and not self.numpy:
            if out.ndim == 2:
                out.addmm_(g.transpose(-1, -2), x, beta=beta, alpha=alpha)
            else:
                out.baddbmm_(g.transpose(-1, -2), x, beta=beta, alpha=alpha)
            return
        prod = self.buffer("product", tuple(out.shape))
        if self.numpy:
            np.matmul(np.swapaxes(g.numpy(), -1, -2), x.numpy(), out=prod.numpy())
        else:
            prod.copy_(torch.matmul(g.to(self.low).transpose(-1, -2), self.rows(x)))
        if beta == 0.0:
            torch.mul(prod, alpha, out=out)
        else:
            out.mul_(beta).add_(prod, alpha=alpha)


class _NumpyMatmul(torch.autograd.Function):
    """``a @ b`` (and its gradients) through numpy's BLAS: a [..., m, k], b [..., k, n], float32 CPU tensors."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return torch.from_numpy(np.matmul(a.detach().numpy(), b.detach().numpy()))

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        g = grad.contiguous().numpy()
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.from_numpy(np.matmul(g, np.swapaxes(b.detach().numpy(), -1, -2)))
        if ctx.needs_input_grad[1]:
            grad_b = torch.from_numpy(np.matmul(np.swapaxes(a.detach().numpy(), -1, -2), g))
        return grad_a, grad_b


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for same-rank operands of equal batch shape, with autograd: through numpy's BLAS for float32 CPU
    tensors where the module doc's rule holds (and no autocast is active), through torch everywhere else."""
    if (a.device.type == "cpu" and b.device.type == "cpu" and a.dtype == b.dtype == torch.float32
            and a.shape[:-2] == b.shape[:-2] and not torch.is_autocast_enabled("cpu") and numpy_blas_is_faster()):
        return _NumpyMatmul.apply(a, b)
    return a @ b

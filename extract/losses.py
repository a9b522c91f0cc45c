"""Training losses of the representation stage: cross-entropy plus a feature-shrinking or rotation term.

Notation (as in Hariharan & Girshick, ICCV 2017): ``x_i`` is the pooled feature of example i (``features [B, d]``),
``s_i = W x_i`` its logits (``logits [B, C]``; no bias in the low-shot recipe), ``p_i = softmax(s_i)``, ``y_i`` the
one-hot label, B the batch size.

==============  ==========================================================  ===============================
term            value                                                       paper
==============  ==========================================================  ===============================
SGM             (1/B) sum_i ||p_i - y_i||^2 * ||x_i||^2                     Hariharan & Girshick, ICCV 2017
batch SGM       ||G||_F^2 with G = (1/B) sum_i (p_i - y_i) x_i^T  [C, d]    Hariharan & Girshick, ICCV 2017
L2              (1/(2B)) sum_i ||x_i||^2                                    Hariharan & Girshick, ICCV 2017
rotation        CE of a 4-way head on the 0/90/180/270 degree copies        Gidaris et al. ICLR 2018; DNPG
==============  ==========================================================  ===============================

SGM is the squared Frobenius norm of the per-example cross-entropy gradient with respect to W, which factorises as
``||p - y||^2 ||x||^2``; batch SGM is the squared norm of the batch-average gradient. As in the original code the
gradients flow through ``p`` as well as through ``x`` (the term also pushes towards confident predictions);
``detach_p=True`` treats ``p`` as a constant instead (the paper leaves this open).

The total loss is ``mean CE + lambda * aux`` with one scalar lambda, applied from the first step (no ramp). The
baseline is lambda = 0 (no auxiliary term): the original trainer's defaults (L2 with lambda 0.1) silently trained
a shrunk model, so :class:`AuxLoss` has no auxiliary term unless asked for one. Published lambdas (ResNet-10):
SGM 0.02, batch SGM 5, L2 0.03 (ResNet-50 SGM 0.005).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featstore.errors import UserError

__all__ = [
    "AUX_KINDS",
    "PUBLISHED_AUX_WEIGHTS",
    "sgm_loss",
    "batch_sgm_loss",
    "l2_feature_loss",
    "rotate_batch",
    "AuxLoss",
]

AUX_KINDS = ("none", "sgm", "batchsgm", "l2")
# the published lambdas of the ResNet-10 rows (Hariharan & Girshick 2017; for reference and CLI help, never
# applied silently)
PUBLISHED_AUX_WEIGHTS = {"sgm": 0.02, "batchsgm": 5.0, "l2": 0.03}


def _residual(logits: torch.Tensor, targets: torch.Tensor, detach_p: bool) -> torch.Tensor:
    """``p - y``: softmax of ``logits [B, C]`` minus the one-hot of ``targets [B]``, shape ``[B, C]`` (float32+)."""
    if logits.ndim != 2 or targets.ndim != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"logits must be [B, C] and targets [B], got {tuple(logits.shape)} and {tuple(targets.shape)}")
    s = logits.detach() if detach_p else logits
    p = torch.softmax(s.float() if s.dtype in (torch.float16, torch.bfloat16) else s, dim=1)
    y = F.one_hot(targets.long(), num_classes=logits.shape[1]).to(p.dtype)
    return p - y


def _check_features(features: torch.Tensor, batch: int | None = None) -> None:
    if features.ndim != 2 or (batch is not None and features.shape[0] != batch):
        raise ValueError(f"features must be [B, d] with B = {batch}, got {tuple(features.shape)}")


def sgm_loss(features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, *,
             detach_p: bool = False) -> torch.Tensor:
    """Squared gradient magnitude: ``(1/B) sum_i ||p_i - y_i||^2 * ||x_i||^2`` (a scalar).

    ``features [B, d]`` (x), ``logits [B, C]`` (s = W x), ``targets [B]`` (class indices). Gradients reach both
    ``features`` and ``logits`` (and through them W); with ``detach_p`` the factor ``||p - y||^2`` is a constant.
    Hariharan & Girshick, "Low-shot Visual Recognition by Shrinking and Hallucinating Features", ICCV 2017.
    """
    residual = _residual(logits, targets, detach_p)
    _check_features(features, residual.shape[0])
    return (residual.pow(2).sum(1) * features.pow(2).sum(1)).mean()


def batch_sgm_loss(features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, *,
                   detach_p: bool = False) -> torch.Tensor:
    """Batch SGM: ``||G||_F^2`` with ``G = (1/B) sum_i (p_i - y_i) x_i^T`` of shape ``[C, d]`` (a scalar).

    The squared norm of the batch-average cross-entropy gradient with respect to W (not the average of the
    per-example norms). Shapes and ``detach_p`` as in :func:`sgm_loss`. Hariharan & Girshick, ICCV 2017.
    """
    residual = _residual(logits, targets, detach_p)
    _check_features(features, residual.shape[0])
    grad = residual.t().to(features.dtype) @ features / residual.shape[0]  # [C, d]
    return grad.pow(2).sum()


def l2_feature_loss(features: torch.Tensor) -> torch.Tensor:
    """Feature shrinking: ``(1/(2B)) sum_i ||x_i||^2`` for ``features [B, d]`` (a scalar). Hariharan & Girshick 2017."""
    _check_features(features)
    return features.pow(2).sum(1).mean() / 2


def rotate_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[B, C, H, W]`` -> (their four rotations ``[4B, C, H, W]``, rotation labels ``[4B]``).

    Rotation-major order: rows ``k*B .. (k+1)*B - 1`` hold every image turned by ``k * 90`` degrees
    counter-clockwise (as displayed, row 0 at the top; ``torch.rot90(x, k, (-2, -1))``), with label k. The class
    labels of the expanded batch are therefore ``targets.repeat(4)``. Non-square images are refused (90-degree
    turns would change their shape). Used by the rotation-invariant CE of TANE and the rotation head of DNPG in
    their pretraining (Gidaris et al., "Unsupervised Representation Learning by Predicting Image Rotations", ICLR
    2018).
    """
    if x.ndim != 4:
        raise ValueError(f"rotate_batch expects [B, C, H, W], got {tuple(x.shape)}")
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotate_batch needs square images, got {x.shape[-2]}x{x.shape[-1]}")
    views = [x] + [torch.rot90(x, k, dims=(-2, -1)) for k in (1, 2, 3)]
    labels = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])
    return torch.cat(views, 0), labels


class AuxLoss(nn.Module):
    """``CE(logits, targets) + weight * aux + rotation_weight * CE(rot_logits, rot_targets)``.

    ``kind``: "none" (the baseline; ``weight`` must be 0), "sgm", "batchsgm" or "l2" (``weight`` must be > 0:
    there is no hidden default; the published values are in :data:`PUBLISHED_AUX_WEIGHTS`).
    ``rotation_weight`` (DNPG: 0.7) applies only when rotation logits are passed.

    ``forward(features [B, d], logits [B, C], targets [B], rot_logits [B, 4] = None, rot_targets [B] = None)``
    returns a dict of scalars: ``loss`` (the total, to backpropagate), ``ce``, ``aux`` and ``rot`` (0 where unused).
    """

    def __init__(self, kind: str = "none", weight: float = 0.0, *, detach_p: bool = False,
                 rotation_weight: float = 0.0) -> None:
        super().__init__()
        if kind not in AUX_KINDS:
            raise UserError(f"unknown auxiliary loss {kind!r}; choose one of: {', '.join(AUX_KINDS)}")
        if kind == "none" and weight != 0:
            raise UserError(f"an auxiliary weight ({weight}) needs an auxiliary loss; pick sgm, batchsgm or l2")
        if kind != "none" and not weight > 0:
            raise UserError(f"auxiliary loss {kind} needs a positive weight, e.g. {PUBLISHED_AUX_WEIGHTS[kind]} "
                            "(the published ResNet-10 value)")
        if rotation_weight < 0:
            raise UserError(f"rotation weight must be >= 0, got {rotation_weight}")
        self.kind, self.weight, self.detach_p = kind, float(weight), bool(detach_p)
        self.rotation_weight = float(rotation_weight)

    def aux(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The auxiliary term alone (unweighted)."""
        if self.kind == "sgm":
            return sgm_loss(features, logits, targets, detach_p=self.detach_p)
        if self.kind == "batchsgm":
            return batch_sgm_loss(features, logits, targets, detach_p=self.detach_p)
        if self.kind == "l2":
            return l2_feature_loss(features)
        return logits.new_zeros(())

    def forward(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                rot_logits: torch.Tensor | None = None,
                rot_targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(logits, targets)
        aux = self.aux(features, logits, targets)
        total = ce + self.weight * aux if self.kind != "none" else ce
        rot = logits.new_zeros(())
        if rot_logits is not None:
            if rot_targets is None:
                raise ValueError("rot_logits given without rot_targets")
            rot = F.cross_entropy(rot_logits, rot_targets)
            total = total + self.rotation_weight * rot
        return {"loss": total, "ce": ce.detach(), "aux": aux.detach(), "rot": rot.detach()}

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, weight={self.weight}, detach_p={self.detach_p}, "
                f"rotation_weight={self.rotation_weight}")

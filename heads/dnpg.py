"""DNPG: Diversified Negative Prototypes Generator (Zhang, Chen, Zou, Li, Li, ACM MM 2024, arXiv 2408.13373).

Original code: github.com/iCGY96/DNPG. A TANE-derived head:

- Phase 2 (:meth:`DNPGHead.fit_open_weights`, purely feature-level): reverse classification on base-class
  features learns GCPL prototypes c_k (one per base class) and RPL reciprocal points r_{k,1..M} (M = 4); the base
  memory is b_k = kappa c_k and the "open weights" o_k = kappa mean_j r_{k,j} (kappa = 0.03).
- Phase 3 head: raw-prototype calibration p̂_c = p_c + Dropout(W_o sum_k alpha_ck W_v b_k) (TANE ATT-G); the
  multiple-NP generator reuses the same alpha over the open weights, u_c = Dropout(W_o'' sum_k alpha_ck W_v'' o_k)
  (no residual: "learning unknowns from unknowns"); m = mean_c u_c; NP_j = MLP_j(m), j = 1..J (J = 5).
- Logits: tau1 cos(x, p̂_c) for the N known classes, max_j [tau2 cos(x, NP_j) + beta] for the negative column.
- Losses per task (primary and swapped): (N+1)-way CE + funit * reciprocal BCE on u_c (temperature tau3), plus
  gamma * L_SA, the swap-alignment loss between the NPs of one task and the prototypes of the other.
- Test: open score = softmax probability of the negative column.
"""

from __future__ import annotations

import math
import sys
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from heads._negproto_common import (
    CrossAttention,
    NegProtoHead,
    TaskOutput,
    cosine,
    rng_scope,
    swap_alignment_loss,
)
from heads.base import NotFittedError, as_tensor, register_head


def sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """d(x, c) = ||x - c||^2 / D for x [n, D], c [K, D] -> [n, K] (the ARPL ``Dist`` module, l2 metric)."""
    d = (x * x).sum(1, keepdim=True) - 2 * x @ c.t() + (c * c).sum(1).unsqueeze(0)
    return d / x.shape[1]


def reverse_classification_losses(
    x: torch.Tensor,
    y: torch.Tensor,
    centers: torch.Tensor,
    points: torch.Tensor,
    radius: torch.Tensor,
    *,
    temp: float = 0.07,
    weight_pl: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DNPG Phase-2 losses (GCPL + RPL, the ARPL code base) on features x [n, D] with base labels y [n] in 0..B-1.

    GCPL: logits -d(x, c_k)/T, loss CE + weight_pl * 1/2 mean((x - c_y)^2).
    RPL: points [B, M, D]; S_k(x) = mean_j d(x, r_kj); classification by farness, loss CE(S/T) + weight_pl *
    mean_j (d(x, r_yj) - R)^2 over the M points of the true class: rows Mk..Mk+M-1 of the original's class-major
    points (its radius term indexes the points by raw class id, which regularises the wrong rows).
    Returns (gcpl_loss, rpl_loss, gcpl_logits, rpl_logits).
    """
    d_c = sq_dist(x, centers)  # [n, B]
    gcpl_logits = -d_c / temp
    gcpl = F.cross_entropy(gcpl_logits, y) + weight_pl * 0.5 * ((x - centers[y]) ** 2).mean()
    b, m, dim = points.shape
    d_r = sq_dist(x, points.reshape(b * m, dim)).reshape(-1, b, m)  # [n, B, M]
    rpl_logits = d_r.mean(-1) / temp
    d_true = d_r[torch.arange(len(y), device=y.device), y]  # [n, M]
    rpl = F.cross_entropy(rpl_logits, y) + weight_pl * ((d_true - radius) ** 2).mean()
    return gcpl, rpl, gcpl_logits, rpl_logits


@register_head("dnpg")
class DNPGHead(NegProtoHead):
    """DNPG head on cached features, batched over episodes.

    Parameters (defaults = the published command of the original code):
        feat_dim: D. n_base_classes: B.
        n_neg: number of negative prototypes J (5; 8 suggested for CIFAR-FS). agg: ``mlp`` (J MLPs, the paper)
            or ``avg`` (a single NP = mean_c u_c).
        funit 1 (L_unit weight), gamma 0.3 (L_SA weight), open_weight_sum_cali kappa = 0.03.
        train_weight_base: base and open weights trainable in phase 3 (True).
        learn_neg_bias: learn beta (False: beta frozen at 0, the miniImageNet setting; True elsewhere).
        temperature: init of tau1, tau2, tau3 (10). attn_dropout / dropout 0.1.
        learning_rate 0.07, momentum 0.9, weight_decay 5e-4 (SGD Nesterov); cosine True = ReduceLROnPlateau on the
            best *val* accuracy (patience ``plateau_patience`` 10); else step decay at ``lr_decay_epochs`` (35).
        epochs 40, episodes_per_epoch 600, episodes_per_step 2, val_episodes 600.
        phase2_epochs 50, phase2_batch_size 256 (published command 128), phase2_lr 0.05 (Adam), weight_pl 0.1,
            phase2_temp 0.07, num_centers 4: Phase 2.
        phase2: whether :meth:`meta_train` runs Phase 2 first: True = always (on ``train_rows``, with the
            support views of the data as its augmented views), False = never (open weights must be installed),
            None = when no open weights are installed yet.
        device, seed.

    Learnt state: ``gcpl_centers_`` [B, D], ``rpl_points_`` [B, M, D], ``radius_`` (Phase 2); ``base_weights_``
    and ``open_weights_`` [B, D] (the memory, kappa-scaled), ``base_classes_`` [B]; after ``fit``:
    ``prototypes_`` [E, N, D] and ``neg_prototypes_`` [E, J, D].
    """

    def __init__(
        self,
        feat_dim: int = 640,
        n_base_classes: int = 64,
        *,
        n_neg: int = 5,
        agg: str = "mlp",
        funit: float = 1.0,
        gamma: float = 0.3,
        open_weight_sum_cali: float = 0.03,
        train_weight_base: bool = True,
        learn_neg_bias: bool = False,
        temperature: float = 10.0,
        attn_dropout: float = 0.1,
        dropout: float = 0.1,
        learning_rate: float = 0.07,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        cosine: bool = True,
        lr_decay_epochs: Sequence[int] = (35,),
        lr_decay_rate: float = 0.1,
        plateau_patience: int = 10,
        epochs: int = 40,
        episodes_per_epoch: int = 600,
        episodes_per_step: int = 2,
        val_episodes: int = 600,
        phase2_epochs: int = 50,
        phase2_batch_size: int = 256,
        phase2_lr: float = 0.05,
        weight_pl: float = 0.1,
        phase2_temp: float = 0.07,
        num_centers: int = 4,
        phase2: bool | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ):
        if agg not in ("avg", "mlp"):
            raise ValueError(f"agg must be 'avg' or 'mlp', got {agg!r}")
        if n_neg < 1:
            raise ValueError("n_neg must be at least 1")
        super().__init__(
            feat_dim, n_base_classes, funit=funit, train_weight_base=train_weight_base,
            learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay, cosine=cosine,
            lr_decay_epochs=lr_decay_epochs, lr_decay_rate=lr_decay_rate, plateau_patience=plateau_patience,
            epochs=epochs, episodes_per_epoch=episodes_per_epoch, episodes_per_step=episodes_per_step,
            val_episodes=val_episodes, device=device, seed=seed,
        )  # fmt: skip
        self.n_neg = int(n_neg)
        self.agg = agg
        self.temperature = float(temperature)
        self.attn_dropout = float(attn_dropout)
        self.dropout = float(dropout)
        self.gamma = float(gamma)
        self.open_weight_sum_cali = float(open_weight_sum_cali)
        self.learn_neg_bias = bool(learn_neg_bias)
        self.phase2_epochs = int(phase2_epochs)
        self.phase2_batch_size = int(phase2_batch_size)
        self.phase2_lr = float(phase2_lr)
        self.weight_pl = float(weight_pl)
        self.phase2_temp = float(phase2_temp)
        self.num_centers = int(num_centers)
        self.phase2 = None if phase2 is None else bool(phase2)
        d = self.feat_dim
        with rng_scope(self.seed, torch.device("cpu")):  # initialisation depends on the seed only
            # (a) raw-prototype calibration (TANE ATT-G: no semantics, no gate)
            self.calib_attn = CrossAttention(d, None, attn_dropout, dropout)
            # (b) multiple-NP generator: only W_v'' and W_o'' (the attention weights come from (a))
            self.open_w_v = nn.Linear(d, d, bias=False)
            nn.init.normal_(self.open_w_v.weight, mean=0.0, std=math.sqrt(2.0 / (d + d)))
            self.open_w_o = nn.Linear(d, d, bias=False)
            nn.init.xavier_normal_(self.open_w_o.weight)
            self.open_dropout = nn.Dropout(dropout)
            # (c) J independent MLPs -> J diversified negative prototypes
            if agg == "mlp":
                self.np_mlps = nn.ModuleList(
                    nn.Sequential(nn.Linear(d, d), nn.LeakyReLU(0.5), nn.Dropout(0.5), nn.Linear(d, d))
                    for _ in range(self.n_neg)
                )
            # (d) separate temperatures for prototypes, NPs and the reciprocal units; the NP bias beta
            self.tau_proto = nn.Parameter(torch.tensor(float(temperature)))
            self.tau_neg = nn.Parameter(torch.tensor(float(temperature)))
            self.tau_unit = nn.Parameter(torch.tensor(float(temperature)))
            self.neg_bias = nn.Parameter(torch.tensor(0.0), requires_grad=self.learn_neg_bias)
        self.open_weights_ = nn.Parameter(torch.zeros(n_base_classes, d), requires_grad=self.train_weight_base)
        self.register_buffer("gcpl_centers_", torch.zeros(n_base_classes, d))
        self.register_buffer("rpl_points_", torch.zeros(n_base_classes, self.num_centers, d))
        self.register_buffer("radius_", torch.tensor(0.0))
        self.phase2_history_: list[dict] = []
        self.to(self.device)

    # -- Phase 2: open weights by reverse classification ------------------------------------------------------
    def set_open_weights(self, gcpl_centers, rpl_points, base_classes=None) -> "DNPGHead":
        """Install Phase-2 artifacts: GCPL centres [B, D] and RPL points [B, M, D] or [B*M, D] (class-major).

        Sets the memory b_k = kappa c_k and o_k = kappa mean_j r_kj.
        """
        c = as_tensor(gcpl_centers, self.device)
        r = as_tensor(rpl_points, self.device)
        b, d = self.n_base_classes, self.feat_dim
        if tuple(c.shape) != (b, d):
            raise ValueError(f"gcpl_centers must be [{b}, {d}], got {tuple(c.shape)}")
        if r.numel() != b * self.num_centers * d:
            raise ValueError(f"rpl_points must be [{b}, {self.num_centers}, {d}] (class-major), got {tuple(r.shape)}")
        r = r.reshape(b, self.num_centers, d)
        kappa = self.open_weight_sum_cali
        with torch.no_grad():
            self.gcpl_centers_.copy_(c)
            self.rpl_points_.copy_(r)
            self.base_weights_.copy_(kappa * c)
            self.open_weights_.copy_(kappa * r.mean(1))
            if base_classes is not None:
                self.base_classes_.copy_(as_tensor(base_classes, self.device, None).long().reshape(-1))
            self.base_ready_.fill_(True)
        return self

    def fit_open_weights(
        self,
        features,
        labels,
        rows=None,
        *,
        base_classes=None,
        views=None,
        epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        seed: int | None = None,
        progress: bool = False,
    ) -> "DNPGHead":
        """Phase 2 on cached base-class features: learn GCPL centres and RPL points.

        features [n, D], labels [n] store class ids, rows: the base-class rows (default all); base_classes [B]:
        the store id of each memory row (default: sorted labels of rows). views [V, n, D] (optional): cached
        augmented views; each epoch every row uses one of its V + 1 views (clean or augmented), picked at random,
        in place of the original's on-the-fly augmentation. Adam, constant lr; GCPL + RPL with R initialised at 0.
        Returns self (memory installed; ``phase2_history_`` holds loss and GCPL / RPL training accuracy per epoch).
        """
        epochs = self.phase2_epochs if epochs is None else int(epochs)
        bs = self.phase2_batch_size if batch_size is None else int(batch_size)
        lr = self.phase2_lr if lr is None else float(lr)
        seed = self.seed if seed is None else int(seed)
        feats = as_tensor(features, self.device)
        labels_np = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
        rows = np.arange(len(labels_np)) if rows is None else np.asarray(rows).reshape(-1).astype(np.int64)
        base_classes = np.unique(labels_np[rows]) if base_classes is None else np.asarray(base_classes).reshape(-1)
        if len(base_classes) != self.n_base_classes:
            raise ValueError(f"{len(base_classes)} base classes in rows, the head expects {self.n_base_classes}")
        order = np.argsort(base_classes, kind="stable")
        pos = np.minimum(np.searchsorted(base_classes, labels_np[rows], sorter=order), len(order) - 1)
        mapped = order[pos]  # base row of every training row
        if not np.array_equal(base_classes[mapped], labels_np[rows]):
            raise ValueError("rows contain labels that are not in base_classes")
        y_all = torch.as_tensor(mapped, device=self.device)
        rows_t = torch.as_tensor(rows, device=self.device)
        view_t = None if views is None else as_tensor(views, self.device)
        b, m, d = self.n_base_classes, self.num_centers, self.feat_dim
        self.phase2_history_ = []
        with rng_scope(seed, self.device):
            centers = nn.Parameter(0.1 * torch.randn(b, d, device=self.device))  # ARPL Dist init
            points = nn.Parameter(0.1 * torch.randn(b, m, d, device=self.device))
            radius = nn.Parameter(torch.zeros((), device=self.device))  # R = 0 (the original leaves it uninitialised)
            opt = torch.optim.Adam([centers, points, radius], lr=lr)
            n = len(rows)
            for epoch in range(1, epochs + 1):
                perm = torch.randperm(n, device=self.device)
                if view_t is not None:
                    pick = torch.randint(0, view_t.shape[0] + 1, (n,), device=self.device)
                total, hit_g, hit_r = 0.0, 0, 0
                for i in range(0, n, bs):
                    idx = perm[i : i + bs]
                    r = rows_t[idx]
                    x = feats[r]
                    if view_t is not None:  # view 0 = the clean feature, 1..V = cached augmentations
                        v = pick[idx]
                        aug = v > 0
                        x = torch.where(aug.unsqueeze(1), view_t[(v - 1).clamp_min(0), r], x)
                    y = y_all[idx]
                    gcpl, rpl, lg, lr_ = reverse_classification_losses(
                        x, y, centers, points, radius, temp=self.phase2_temp, weight_pl=self.weight_pl
                    )
                    loss = gcpl + rpl
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(idx)
                    hit_g += int((lg.argmax(1) == y).sum())
                    hit_r += int((lr_.argmax(1) == y).sum())  # farness: farthest reciprocal points
                rec = {"epoch": epoch, "loss": total / n, "gcpl_acc": hit_g / n, "rpl_acc": hit_r / n}
                self.phase2_history_.append(rec)
                if progress:
                    print("[dnpg phase 2] " + " ".join(f"{k}={v}" for k, v in rec.items()), file=sys.stderr)
        with torch.no_grad():
            self.radius_.fill_(float(radius))
        return self.set_open_weights(centers.detach(), points.detach(), base_classes)

    def _prepare_base(self, feats, labels, train_rows, base_classes, base_weights, support_views, seed, data):
        # base_weights (the backbone classifier rows) are not used: DNPG's memory is kappa x the GCPL centres.
        # Phase 2 uses the pretraining augmentation, the same recipe as the support views: it reuses them.
        if self.phase2 or (self.phase2 is None and not bool(self.base_ready_)):
            self.fit_open_weights(feats, labels, train_rows, base_classes=base_classes, views=support_views, seed=seed)
        elif not bool(self.base_ready_):
            raise NotFittedError("phase2=False but no open weights are installed: set_open_weights(...) first")
        elif not np.array_equal(self.base_classes_.cpu().numpy(), np.asarray(base_classes)):
            raise ValueError("the installed open weights belong to other base classes than train_rows")

    # -- Phase 3 ----------------------------------------------------------------------------------------------
    def _task_forward(self, protos, key_mask, support_sem) -> TaskOutput:
        calibrated, alpha = self.calib_attn(protos, self.base_weights_, self.base_weights_, key_mask)
        # the same (dropped-out) attention, read out over the open weights, no residual
        units = self.open_dropout(self.open_w_o(alpha @ self.open_w_v(self.open_weights_)))
        m = units.mean(1, keepdim=True)  # [E, 1, D]
        if self.agg == "mlp":
            negs = torch.cat([mlp(m) for mlp in self.np_mlps], dim=1)  # [E, J, D]
        else:
            negs = m
        return TaskOutput(calibrated, units, negs)

    def _scores(self, query, out: TaskOutput) -> torch.Tensor:
        known = self.tau_proto * cosine(query, out.calibrated)
        # the negative column is the closest NP (max over j), with the NP bias beta
        neg = (self.tau_neg * cosine(query, out.negs) + self.neg_bias).amax(-1, keepdim=True)
        return torch.cat([known, neg], dim=-1)

    def _unit_tau(self):
        return self.tau_unit

    def _extra_loss(self, primary: TaskOutput, swapped: TaskOutput | None):
        if swapped is None:  # no pseudo-open supports in this batch: no swapped task to align with
            return None
        return "sa", self.gamma, swap_alignment_loss(primary.calibrated, primary.negs, swapped.calibrated, swapped.negs)

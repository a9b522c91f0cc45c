"""TANE: Task-Adaptive Negative Envision for few-shot open-set recognition (Huang et al., CVPR 2022).

Original code: github.com/shiyuanh/TANE. On pooled features f(x) in R^D (640 for ResNet-12):

- (a) prototype calibration: p̂_c = p_c + Dropout(W_o sum_b alpha_cb W_v w_b), alpha over the base memory
  (the backbone classifier rows w_b of the base classes, minus the episode's own classes in meta-training);
- (b) negative generator (same structure, separate weights): reciprocal unit u_c = p̂_c + Dropout(W_o' ...);
- (c) one negative prototype per task: n = mean_c u_c (``agg="avg"``) or MLP(mean_c u_c) (``agg="mlp"``);
- classifier: tau * cos(f(x), [p̂_1 .. p̂_N, n]), one learnt temperature tau (init 10);
- losses (both the primary and the swapped task): (N+1)-way CE + funit * BCE(1 - tau cos(u_c, f(x)), [y = c]);
- test: open score = softmax probability of the negative column (higher = more unknown).

``neg_gen_type`` (the original's option of that name): ``attg`` (ATT-G, attention over base weights; the default
here), ``semang`` (SEMAN-G: semantic terms in query and key plus a task gate), ``att`` (degenerate: each prototype
attends only to itself), ``mlp`` (no attention). SEMAN-G needs 300-d class word vectors, which featstore does not
have: with ``semantic_dim=None`` the "semantic" vector of a class is replaced by a visual descriptor (see
:class:`TANEHead`); pass ``semantic_dim`` plus ``MetaTrainData.class_semantics`` to ``meta_train`` (and
``support_semantics`` to ``fit``) to use real word vectors.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from heads._negproto_common import CrossAttention, NegProtoHead, TaskOutput, cosine, rng_scope
from heads.base import as_tensor, register_head

NEG_GEN_TYPES = ("semang", "attg", "att", "mlp")


def _semantic_mlp(dim: int) -> nn.Sequential:
    # the semantic MLP m(.) of SEMAN-G in the original: Linear -> LeakyReLU 0.1 -> Dropout 0.1 -> Linear
    return nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(0.1), nn.Dropout(0.1), nn.Linear(dim, dim))


@register_head("tane")
class TANEHead(NegProtoHead):
    """TANE negative-prototype head on cached features, batched over episodes.

    Parameters (defaults = the original code's defaults; the published command's values in brackets):
        feat_dim: D (640 for ResNet-12). n_base_classes: B (64 on miniImageNet).
        neg_gen_type: ``attg`` (default here, because we have no word vectors; the original default is
            ``semang``), ``semang``, ``att``, ``mlp``.
        agg: ``avg`` (published command) or ``mlp`` (paper text) to form the negative prototype.
        base_seman_calib: SEMAN-G only: pass base semantics through the calibrator's semantic MLP.
        semantic_dim: SEMAN-G only. None: no word vectors; the semantic input of a base class is its L2-normalised
            mean feature over the training rows and that of a support class its L2-normalised support prototype
            (a visual stand-in, not the paper). An int S: real word vectors of dimension S (300 in the paper),
            given as ``MetaTrainData.class_semantics`` [C, S] (indexed by store class id) and ``fit(...,
            support_semantics=[E, N, S])``.
        funit: weight of L_unit (1). train_weight_base: make the base weights trainable (0 [published 1]).
        temperature: initial tau (10). attn_dropout / dropout: 0.1 / 0.1 in the attention blocks.
        learning_rate 0.05 [0.03], momentum 0.9, weight_decay 5e-4 (SGD Nesterov); cosine: the original's flag, i.e.
            ReduceLROnPlateau (factor 0.1, ``plateau_patience`` 10) on the best *val* accuracy; otherwise a step
            schedule x ``lr_decay_rate`` (0.1) after each of ``lr_decay_epochs`` (30).
        epochs 65, episodes_per_epoch 600 (= n_train_runs 300 x n_train_para 2), episodes_per_step 2,
        val_episodes 600: the meta-training schedule.
        device, seed: where it runs; the seed fixes the initialisation, dropout and the training episodes.

    Learnt state: ``base_weights_`` [B, D] (memory; trainable iff train_weight_base), ``base_classes_`` [B] (store
    class id of each memory row), the attention blocks, ``tau``; after ``fit``: ``prototypes_`` [E, N, D],
    ``neg_prototypes_`` [E, 1, D]. ``history_`` / ``best_epoch_`` log meta-training.
    """

    def __init__(
        self,
        feat_dim: int = 640,
        n_base_classes: int = 64,
        *,
        neg_gen_type: str = "attg",
        agg: str = "avg",
        base_seman_calib: bool = False,
        semantic_dim: int | None = None,
        funit: float = 1.0,
        train_weight_base: bool = False,
        temperature: float = 10.0,
        attn_dropout: float = 0.1,
        dropout: float = 0.1,
        learning_rate: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        cosine: bool = False,
        lr_decay_epochs: Sequence[int] = (30,),
        lr_decay_rate: float = 0.1,
        plateau_patience: int = 10,
        epochs: int = 65,
        episodes_per_epoch: int = 600,
        episodes_per_step: int = 2,
        val_episodes: int = 600,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ):
        if neg_gen_type not in NEG_GEN_TYPES:
            raise ValueError(f"neg_gen_type must be one of {NEG_GEN_TYPES}, got {neg_gen_type!r}")
        if agg not in ("avg", "mlp"):
            raise ValueError(f"agg must be 'avg' or 'mlp', got {agg!r}")
        super().__init__(
            feat_dim, n_base_classes, funit=funit, train_weight_base=train_weight_base,
            learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay, cosine=cosine,
            lr_decay_epochs=lr_decay_epochs, lr_decay_rate=lr_decay_rate, plateau_patience=plateau_patience,
            epochs=epochs, episodes_per_epoch=episodes_per_epoch, episodes_per_step=episodes_per_step,
            val_episodes=val_episodes, device=device, seed=seed,
        )  # fmt: skip
        self.neg_gen_type = neg_gen_type
        self.agg = agg
        self.temperature = float(temperature)
        self.attn_dropout = float(attn_dropout)
        self.dropout = float(dropout)
        self.base_seman_calib = bool(base_seman_calib)
        self.semantic_dim = None if semantic_dim is None else int(semantic_dim)
        d = self.feat_dim
        s = d if self.semantic_dim is None else self.semantic_dim  # the visual stand-in lives in feature space
        self._sem_dim = s
        with rng_scope(self.seed, torch.device("cpu")):  # initialisation depends on the seed only
            if neg_gen_type in ("semang", "attg", "att"):
                sem = s if neg_gen_type == "semang" else None
                self.calib_attn = CrossAttention(d, sem, attn_dropout, dropout)
                self.neg_attn = CrossAttention(d, sem, attn_dropout, dropout)
            if neg_gen_type == "semang":
                self.calib_sem_mlp = _semantic_mlp(s)
                self.neg_sem_mlp = _semantic_mlp(s)
                # task gates: g = 1 + sigmoid(G [mean_b w_b ; mean_b s_b]) in (1, 2), one pair per block
                self.calib_gate_v = nn.Linear(d + s, d)
                self.calib_gate_s = nn.Linear(d + s, s)
                self.neg_gate_v = nn.Linear(d + s, d)
                self.neg_gate_s = nn.Linear(d + s, s)
                self.register_buffer("base_semantics_", torch.zeros(n_base_classes, s))
            if agg == "mlp":
                self.agg_mlp = nn.Sequential(nn.Linear(d, d), nn.LeakyReLU(0.5), nn.Dropout(0.5), nn.Linear(d, d))
            self.tau = nn.Parameter(torch.tensor(float(temperature)))
        self.class_semantics_: torch.Tensor | None = None
        self.to(self.device)

    # -- base memory ------------------------------------------------------------------------------------------
    def set_base_memory(self, base_weights, base_classes=None, base_semantics=None) -> "TANEHead":
        """Install the base memory without meta-training (fine-tuning path, checkpoints).

        base_weights [B, D] classifier rows; base_classes [B] store class ids (default 0..B-1); base_semantics
        [B, S] (SEMAN-G only: word vectors, or for the visual stand-in the normalised base-class mean features).
        """
        w = as_tensor(base_weights, self.device)
        if tuple(w.shape) != (self.n_base_classes, self.feat_dim):
            raise ValueError(f"base_weights must be [{self.n_base_classes}, {self.feat_dim}], got {tuple(w.shape)}")
        with torch.no_grad():
            self.base_weights_.copy_(w)
            if base_classes is not None:
                self.base_classes_.copy_(as_tensor(base_classes, self.device, None).long().reshape(-1))
            if self.neg_gen_type == "semang":
                if base_semantics is None:
                    raise ValueError("neg_gen_type='semang' needs base_semantics [B, S]")
                self.base_semantics_.copy_(as_tensor(base_semantics, self.device))
            self.base_ready_.fill_(True)
        return self

    def _prepare_base(self, feats, labels, train_rows, base_classes, base_weights, support_views, seed, data):
        class_semantics = data.class_semantics
        if base_weights is None:
            raise ValueError("TANE needs base_weights [B, D]: the backbone classifier rows of the base classes")
        base_sem = None
        if self.neg_gen_type == "semang":
            if self.semantic_dim is None:
                # visual stand-in for the base word vectors: normalised class-mean feature of each base class
                order = np.argsort(base_classes, kind="stable")
                pos = order[np.searchsorted(base_classes, labels[train_rows], sorter=order)]
                rows = torch.as_tensor(train_rows, device=self.device)
                idx = torch.as_tensor(pos, device=self.device)
                sums = torch.zeros(len(base_classes), self.feat_dim, device=self.device)
                sums.index_add_(0, idx, feats[rows])
                base_sem = F.normalize(sums, dim=-1)
            else:
                if class_semantics is None:
                    raise ValueError("semantic_dim is set: meta_train needs class_semantics [n_classes, S] in its data")
                self.class_semantics_ = as_tensor(class_semantics, self.device)
                base_sem = self.class_semantics_[torch.as_tensor(base_classes, device=self.device)]
        self.set_base_memory(base_weights, base_classes, base_sem)

    def _class_semantics(self, store_classes):
        if self.neg_gen_type != "semang" or self.semantic_dim is None:
            return None
        return self.class_semantics_[store_classes.to(self.device)]

    # -- the generator ----------------------------------------------------------------------------------------
    def _gate(self, lin_v: nn.Linear, lin_s: nn.Linear, sem: torch.Tensor, key_mask):
        """SEMAN-G task gate from the mean of [w_b ; s_b] over the episode's base memory: ([E|1,1,D], [E|1,1,S])."""
        t = torch.cat([self.base_weights_, sem], dim=-1)  # [B, D+S]
        if key_mask is None:
            t = t.mean(0, keepdim=True)  # same memory for every episode: one gate
        else:
            m = key_mask.to(t.dtype)
            t = m @ t / m.sum(1, keepdim=True)
        return (1 + torch.sigmoid(lin_v(t))).unsqueeze(1), (1 + torch.sigmoid(lin_s(t))).unsqueeze(1)

    def _task_forward(self, protos, key_mask, support_sem) -> TaskOutput:
        mem = self.base_weights_
        kind = self.neg_gen_type
        if kind == "mlp":
            calibrated = units = protos
        elif kind == "att":
            calibrated = self.calib_attn.self_attend(protos)
            units = self.neg_attn.self_attend(calibrated)
        elif kind == "attg":
            calibrated, _ = self.calib_attn(protos, mem, mem, key_mask)
            units, _ = self.neg_attn(calibrated, mem, mem, key_mask)
        else:  # semang
            if support_sem is None:
                if self.semantic_dim is not None:
                    raise ValueError("semantic_dim is set: pass support_semantics [E, N, S] with the support")
                support_sem = F.normalize(protos, dim=-1)  # visual stand-in for the support word vectors
            base_sem = self.base_semantics_
            # (a) calibration: semantic MLP on the support vector (and on the base vectors if base_seman_calib);
            # keys gated, values the ungated base weights
            k_sem = self.calib_sem_mlp(base_sem) if self.base_seman_calib else base_sem
            g_v, g_s = self._gate(self.calib_gate_v, self.calib_gate_s, k_sem, key_mask)
            calibrated, _ = self.calib_attn(
                protos, g_v * mem, mem, key_mask, q_sem=self.calib_sem_mlp(support_sem), k_sem=g_s * k_sem
            )
            # (b) generator: its own semantic MLP and gate, raw base vectors
            g_v, g_s = self._gate(self.neg_gate_v, self.neg_gate_s, base_sem, key_mask)
            units, _ = self.neg_attn(
                calibrated, g_v * mem, mem, key_mask, q_sem=self.neg_sem_mlp(support_sem), k_sem=g_s * base_sem
            )
        neg = units.mean(1, keepdim=True)  # one negative prototype per task
        if self.agg == "mlp":
            neg = self.agg_mlp(neg)
        return TaskOutput(calibrated, units, neg)

    def _scores(self, query, out: TaskOutput) -> torch.Tensor:
        # one temperature shared by all logits (and by L_unit), as in the original Metric_Cosine
        return self.tau * cosine(query, torch.cat([out.calibrated, out.negs], dim=1))

    def _unit_tau(self):
        return self.tau

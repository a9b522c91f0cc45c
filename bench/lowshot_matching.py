"""``bench lowshot --head matching``: matching networks with full-context embeddings (Vinyals et al., NIPS 2016;
the low-shot benchmark's matching-network rows, Hariharan & Girshick, ICCV 2017), driving the
registered head ``matching`` (:class:`heads.matching.MatchingNetwork`)."""

from __future__ import annotations

import io

import numpy as np

from bench.head_cache import sha256_json
from bench.lowshot_adapter import LowShotMethod


class MatchingMethod(LowShotMethod):
    """``prepare``: meta-training on episodes over all base classes (``episodes``, default 60,000; lr / 10 after a
    third and two thirds of them, the original's 20k and 40k of 60k), cached in the store
    (:class:`bench.head_cache.HeadCache`). Per run: the support set is ``per_class`` (100) random training rows of
    every setup base class (all of them where a class has fewer) plus the novel examples tiled as a block to as
    many items per class as the base classes have (:func:`heads.matching.lowshot_support`), encoded once; scores =
    log-probabilities over all classes (-inf for classes without support)."""

    name = "matching"
    drives = ("matching",)

    def __init__(self, episodes: int = 60_000, per_class: int = 100, steps: int = 5, fce: bool = True,
                 mn_lr: float = 0.1, query_in_support: bool = False, device: str = "cpu"):
        self.options_ = dict(episodes=int(episodes), per_class=int(per_class), steps=int(steps), fce=bool(fce),
                             mn_lr=float(mn_lr), query_in_support=bool(query_in_support))
        self.device = device
        self.mn = None
        self.info: dict = {}

    def describe(self) -> dict:
        return {**self.options_, **self.info}

    def prepare(self, store_features, labels, base_classes, seed) -> None:
        import torch

        from heads.analogy import AnalogyGenerator
        from heads.base import MetaTrainData, head_class
        from heads.matching import MatchingNet

        o = self.options_
        ctx = self.context
        # the original divides lr by 10 after 20,000 and 40,000 of its 60,000 episodes: a third and two thirds of
        # training, kept as fractions when --head-option episodes=... shortens it
        mn = head_class("matching")(steps=o["steps"], fce=o["fce"], lr=o["mn_lr"],
                                    query_in_support=o["query_in_support"], episodes=o["episodes"],
                                    lr_steps=(o["episodes"] // 3, 2 * o["episodes"] // 3), seed=seed,
                                    device=self.device)

        key = sha256_json({"method": "matching", "fingerprint": ctx.store.fingerprint_hash if ctx else None,
                           "hparams": mn.hparams(), "episodes": o["episodes"], "rows": int(len(labels)),
                           "inputs": AnalogyGenerator.input_digest(store_features, labels),
                           "base_classes": [int(c) for c in base_classes]})
        cache = ctx.cache if ctx is not None else None
        d = int(store_features.shape[1])

        def decode(raw: bytes):
            net = MatchingNet(d, o["steps"], o["fce"])
            net.load_state_dict(torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True))
            return net

        hit = cache.load("matching-network", key, decode) if cache is not None else None
        if hit is not None:
            mn.feat_dim, mn.net_ = d, hit[0].to(self.device).eval()
            self.info = {"cache": hit[1], "loaded": True, "lr_steps": list(mn.lr_steps)}
        else:
            y = np.asarray(labels).reshape(-1).astype(np.int64)
            data = MetaTrainData(features=torch.as_tensor(store_features, dtype=torch.float32).to(self.device),
                                 labels=y, train_rows=np.arange(len(y)),
                                 progress=not (ctx.quiet if ctx else True))
            mn.meta_train(data, seed=None)
            where = None
            if cache is not None:
                buf = io.BytesIO()
                torch.save({k: v.cpu() for k, v in mn.net_.state_dict().items()}, buf)
                where = cache.save("matching-network", key, buf.getvalue(),
                                   {"hparams": mn.hparams(), "episodes": o["episodes"]})
            self.info = {"cache": where, "loaded": False, "lr_steps": list(mn.lr_steps),
                         "first_loss": float(np.mean(mn.loss_history_[:100])) if o["episodes"] else None,
                         "final_loss": float(np.mean(mn.loss_history_[-100:])) if o["episodes"] else None}
        self.mn = mn

    def scores(self, train_feats, train_labels, test_feats, n, experiment):
        self.mn.fit_lowshot(self.base_feats, self.base_labels, train_feats, train_labels,
                            per_class=self.options_["per_class"], seed=self.run_seed(n, experiment),
                            n_classes=self.num_classes)
        return self.mn.logits(test_feats)

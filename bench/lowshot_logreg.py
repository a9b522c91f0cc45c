"""``bench lowshot --head logreg``: the paper's baseline classifier (Hariharan & Girshick, ICCV 2017;
facebookresearch/low-shot-shrink-hallucinate, ``low_shot.py``) through the registered head ``logreg``
(:class:`heads.logreg.LowShotLogReg`)."""

from __future__ import annotations

import numpy as np

from bench.lowshot_adapter import LowShotMethod, LowShotRun


class LogRegMethod(LowShotMethod):
    """Linear with bias over all classes on base + novel rows, one classifier per run; all runs of a setup train
    as one batched program sharing the base batches (``max_problems`` per batch)."""

    name = "logreg"
    drives = ("logreg",)

    @classmethod
    def defaults(cls, table: dict) -> dict:
        """The per-representation values of the original README, no generation."""
        return dict(table["plain"])

    def __init__(self, lr: float = 0.1, wd: float = 1e-3, momentum: float = 0.9, dampening: float = 0.9,
                 iterations: int = 10_000, batch_size: int = 1000, solver: str = "sgd",
                 share_base_batches: bool = True, precision: str = "fp32", device: str = "cpu",
                 max_problems: int | None = None, gemm: str = "auto"):
        self.hparams = dict(lr=lr, wd=wd, momentum=momentum, dampening=dampening, iterations=iterations,
                            batch_size=batch_size, solver=solver, share_base_batches=share_base_batches,
                            precision=precision, gemm=gemm)
        self.device = device
        self.max_problems = max_problems
        self.last_head_ = None

    def describe(self) -> dict:
        return {**self.hparams, "max_problems": self.max_problems,
                "gemm_used": None if self.last_head_ is None else self.last_head_.gemm_,
                "classifier": "linear with bias over all classes, raw features, default init"}

    def setup(self, base_feats, base_labels, base_classes, novel_classes, num_classes, seed) -> None:
        import torch

        super().setup(base_feats, base_labels, base_classes, novel_classes, num_classes, seed)
        self._xb = torch.as_tensor(base_feats, dtype=torch.float32).to(self.device)
        self._yb = torch.as_tensor(base_labels).long().to(self.device)

    def _head(self):
        from heads.base import head_class

        return head_class("logreg")(num_classes=self.num_classes, device=self.device, **self.hparams)

    def _chunks(self, runs):
        size = self.max_problems or max(1, len(runs))
        return [runs[i:i + size] for i in range(0, len(runs), size)]

    def work_units(self, runs) -> int:
        return self.hparams["iterations"] * len(self._chunks(list(runs)))

    def scores(self, train_feats, train_labels, test_feats, n, experiment):
        run = LowShotRun(experiment, n, train_feats, train_labels, np.zeros(0, np.int64),
                         self.run_seed(n, experiment))
        return next(iter(self.scores_many([run], test_feats)))

    def scores_many(self, runs, test_feats):
        import torch

        x_test = torch.as_tensor(test_feats, dtype=torch.float32).to(self.device)
        base_seed = self.run_seed(0, 0, stream=1)
        for chunk in self._chunks(list(runs)):
            head = self._head()
            head.fit_many(self._xb, self._yb, [(r.features, r.labels) for r in chunk],
                          base_classes=self.base_classes, novel_classes=self.novel_classes,
                          seeds=[r.seed for r in chunk], base_seed=base_seed, progress=self.progress)
            self.last_head_ = head
            for p in range(len(chunk)):
                yield head.logits(x_test, problem=p)

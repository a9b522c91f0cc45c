"""``bench lowshot --head analogy``: analogy-based hallucination + the logreg classifier (Hariharan & Girshick,
ICCV 2017; facebookresearch/low-shot-shrink-hallucinate; the paper's "generation" rows), driving the registered head
``logreg`` and :class:`heads.analogy.AnalogyGenerator`."""

from __future__ import annotations

import io

import numpy as np

from bench.head_cache import npz_bytes
from bench.lowshot_adapter import LowShotRun
from bench.lowshot_logreg import LogRegMethod
from featstore.errors import UserError


class AnalogyLogRegMethod(LogRegMethod):
    """``prepare``: the analogy generator (:class:`heads.analogy.AnalogyGenerator`: 100 centroids per base class,
    analogy mining, the generator MLP) trained on the training rows of all base classes against a frozen linear
    classifier: the backbone's own (when the store's checkpoint file is found, matching its sha256), else the
    original code's fallback (linear with bias, SGD lr 0.1, momentum 0.9, wd 1e-4, batch 1000,
    ``classifier_iterations``). Cached in the store (:class:`bench.head_cache.HeadCache`) under a hash of the store
    fingerprint, the training rows' features and labels, the base classes, the classifier and the
    hyper-parameters. The generator's lr drops by 10 after a third and two thirds of ``generator_iterations`` (the
    original's 40k and 80k of 120k). Per run: every novel class with m < ``max_per_label`` examples gets
    max_per_label - m generated ones (seeded by the run), and the logreg head trains on real + generated rows.
    Defaults (lr, wd, max_per_label, generator lr): the original README's per-representation values, "with
    generation".
    """

    name = "analogy"
    drives = ("logreg",)   # and heads.analogy.AnalogyGenerator, which is not a classifier head

    @classmethod
    def defaults(cls, table: dict) -> dict:
        return dict(table["generation"])

    def __init__(self, lr: float = 0.1, wd: float = 1e-3, momentum: float = 0.9, dampening: float = 0.9,
                 iterations: int = 10_000, batch_size: int = 1000, solver: str = "sgd",
                 share_base_batches: bool = True, precision: str = "fp32", device: str = "cpu",
                 max_problems: int | None = None, gemm: str = "auto", max_per_label: int = 20,
                 generator_lr: float = 0.1, generator_iterations: int = 120_000, clusters_per_class: int = 100,
                 kmeans: str = "faithful", classifier_iterations: int = 10_000):
        super().__init__(lr=lr, wd=wd, momentum=momentum, dampening=dampening, iterations=iterations,
                         batch_size=batch_size, solver=solver, share_base_batches=share_base_batches,
                         precision=precision, device=device, max_problems=max_problems, gemm=gemm)
        self.generator_options = dict(max_per_label=int(max_per_label), generator_lr=float(generator_lr),
                                      generator_iterations=int(generator_iterations),
                                      clusters_per_class=int(clusters_per_class), kmeans=kmeans,
                                      classifier_iterations=int(classifier_iterations))
        self.generator = None
        self.generator_info: dict = {}

    def describe(self) -> dict:
        return {**super().describe(), **self.generator_options, "generator": self.generator_info}

    def prepare(self, store_features, labels, base_classes, seed) -> None:
        import torch

        from featstore.checkpoint import checkpoint_classifier
        from heads.analogy import AnalogyGenerator

        go = self.generator_options
        ctx = self.context
        gen = AnalogyGenerator(clusters_per_class=go["clusters_per_class"], kmeans=go["kmeans"],
                               iterations=go["generator_iterations"], lr=go["generator_lr"], seed=seed,
                               lr_steps=(go["generator_iterations"] // 3, 2 * go["generator_iterations"] // 3),
                               device=self.device)
        labels_np = np.asarray(labels).astype(np.int64)
        own = checkpoint_classifier(ctx.store) if ctx is not None else None
        if own is not None:
            index = {name: k for k, name in enumerate(own[2])}
            names = ctx.class_names
            if all(names[c] in index for c in base_classes):
                classifier = {"source": "checkpoint", "sha256": own[3]}
            else:
                own = None
        if own is None:
            classifier = {"source": "fallback", "lr": 0.1, "momentum": 0.9, "wd": 1e-4, "batch": 1000,
                          "iterations": go["classifier_iterations"]}
        key = gen.cache_key(ctx.store.fingerprint_hash if ctx else "none", "generator",
                            base_classes=[int(c) for c in base_classes], rows=int(len(labels_np)),
                            inputs=AnalogyGenerator.input_digest(store_features, labels_np), classifier=classifier)
        cache = ctx.cache if ctx is not None else None
        def decode(raw: bytes):
            with np.load(io.BytesIO(raw), allow_pickle=False) as data:
                return AnalogyGenerator.from_arrays(dict(data), device=self.device)

        hit = cache.load("analogy-generator", key, decode) if cache is not None else None
        if hit is not None:
            self.generator = hit[0]
            self.generator_info = {"cache": hit[1], "loaded": True, "classifier": classifier,
                                   "variant": gen.variant}
            return
        quiet = ctx.quiet if ctx is not None else True
        if own is not None:
            weight, bias, names_ckpt, _ = own
            row_of = {c: index[ctx.class_names[c]] for c in base_classes}
            fit_labels = np.array([row_of[int(c)] for c in labels_np], dtype=np.int64)
        else:
            import warnings

            from heads.base import head_class

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # dampening 0 is what the original fallback uses
                clf = head_class("logreg")(num_classes=ctx.num_classes if ctx else int(labels_np.max()) + 1,
                                           lr=0.1, wd=1e-4, momentum=0.9, dampening=0.0,
                                           iterations=go["classifier_iterations"],
                                           batch_size=min(1000, len(labels_np)), seed=seed, device=self.device)
            clf.fit(store_features, labels_np)
            weight, bias = clf.weight_[0].cpu().numpy(), clf.bias_[0].cpu().numpy()
            fit_labels = labels_np
        try:
            gen.fit(torch.as_tensor(store_features, dtype=torch.float32), fit_labels, weight, bias,
                    progress=not quiet)
        except ValueError as exc:
            raise UserError(f"head 'analogy': {exc}; try --head-option analogy.generator_lr="
                            f"{go['generator_lr'] / 10:g}") from None
        self.generator = gen
        where = None
        if cache is not None:
            where = cache.save("analogy-generator", key, npz_bytes(gen.to_arrays()),
                               {"hparams": gen.hparams(), "classifier": classifier})
        self.generator_info = {"cache": where, "loaded": False, "classifier": classifier, "variant": gen.variant,
                               "final_loss": [float(v) for v in gen.loss_history_[-1, 1:]]}

    def scores_many(self, runs, test_feats):
        import torch

        M = self.generator_options["max_per_label"]
        padded = []
        for r in runs:
            fx, fy = self.generator.generate(r.features, r.labels, M, seed=r.seed)
            feats = torch.cat([torch.as_tensor(r.features, dtype=torch.float32), fx.cpu()])
            labs = torch.cat([torch.as_tensor(r.labels).long(), fy.cpu().long()])
            padded.append(LowShotRun(r.experiment, r.n, feats, labs, r.rows, r.seed))
        yield from super().scores_many(padded, test_feats)

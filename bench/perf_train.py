"""``bench perf --sections train``: ``extract train`` against a bare forward + backward + step loop.

The reference is the same backbone and linear classifier (same initialisation seed, optimizer, batch size, thread
count and memory layout) stepping over batches already in memory as float tensors: no data pipeline, no
augmentation, no logging. The figure is ``extract train``'s training throughput over it: what batch assembly,
augmentation, the schedule, loss bookkeeping and the progress machinery cost on top of the compute. Validation is
off (``--val none``) and only the training steps are timed on both sides (the epoch's ``seconds``). Both are timed
best of ``repeats``, interleaved so that load on the machine hits both.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.perf_common import PerfArgs, log, make_row, section

TRAIN_TARGET = 0.8


@section("train")
def train_section(args: PerfArgs) -> list[dict]:
    import torch
    from torch import nn

    from extract import backbones as bb
    from extract import datasets as ds
    from extract.train import TrainConfig, train

    model_name, dataset, size, batch_size = "resnet10", "digits", 32, 64
    steps = 8 if args.quick else 28  # 28 x 64 = the 1,797 digits once
    repeats = 2 if args.quick else 3
    source = ds.open_source(dataset)

    torch.manual_seed(args.seed)
    backbone = bb.create_backbone(model_name, small_input=True)
    spec = ds.transform_spec(backbone.input_spec, source, size=size)
    channels = spec.get("channels", 3)
    net = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, len(source.classes), bias=False))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(steps, batch_size, channels, size, size, generator=gen)
    labels = torch.randint(0, len(source.classes), (steps, batch_size), generator=gen)
    loss_fn = nn.CrossEntropyLoss()

    def bare_loop() -> float:
        net.train()
        start = time.perf_counter()
        for x, y in zip(images, labels):
            loss = loss_fn(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return time.perf_counter() - start

    workdir = Path(tempfile.mkdtemp(prefix="perf-train-", dir=args.workdir))
    cfg = dict(model=model_name, dataset=dataset, val="none", image_size=size, small_input=True, epochs=1,
               batch_size=batch_size, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, schedule="step",
               steps_per_epoch=steps, seed=args.seed, threads=args.threads, quiet=True)

    def training() -> float:
        out = workdir / "run"
        shutil.rmtree(out, ignore_errors=True)
        metrics = train(TrainConfig(out=str(out), **cfg))
        return float(metrics["history"][-1]["seconds"])

    try:
        log(f"train: {model_name} on {dataset} at {size} px, {steps} steps of batch {batch_size}, "
            f"{args.threads} threads")
        bare_loop()  # warm-up: allocator, oneDNN kernels
        training()
        bare_times, train_times = [], []
        for _ in range(repeats):
            bare_times.append(bare_loop())
            train_times.append(training())
        bare_s, train_s = min(bare_times), min(train_times)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    images_seen = steps * batch_size
    ratio = bare_s / train_s
    return [
        make_row("train", f"extract train {model_name} {size}px, {steps} steps of {batch_size} (img/s)",
                 images_seen / train_s, unit="img/s", reference=images_seen / bare_s,
                 reference_name="bare forward+backward+step on in-memory tensors (img/s)", ratio=ratio,
                 ratio_is="extract train / bare loop throughput", target=f">= {TRAIN_TARGET}",
                 passed=ratio >= TRAIN_TARGET, quick=args.quick,
                 note=f"best of {repeats}; bare times {np.round(bare_times, 3).tolist()} s, train times "
                      f"{np.round(train_times, 3).tolist()} s (epoch time, which includes the shift augmentation)"),
    ]

"""``bench perf --sections extract``: the extraction loop against the backbone's bare forward pass.

The reference is the backbone alone on the same batches (chunk-aligned, the same batch size), already decoded and
transformed into one in-memory tensor, with the same thread count, layout (channels-last) and inference mode. The
figure is ``extract``'s throughput over it: what data loading, the store writes and the loop itself cost on top of
the compute. Both are timed over whole passes, best of ``repeats``, interleaved so that load on the machine hits both.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.perf_common import PerfArgs, log, make_row, section

EXTRACT_TARGET = 0.85


@section("extract")
def extract_section(args: PerfArgs) -> list[dict]:
    import torch

    from extract import backbones as bb
    from extract import datasets as ds
    from extract.run import ExtractConfig, chunk_batches, run_extraction

    model_name, dataset, size = "resnet10", "digits", 32
    batch_size, chunk_rows, repeats = 64, 1024, 2 if args.quick else 3
    limit = 512 if args.quick else None
    source = ds.open_source(dataset)
    n = min(limit or len(source), len(source))

    torch.manual_seed(args.seed)
    model = bb.create_backbone(model_name, small_input=True).eval().to(memory_format=torch.channels_last)
    spec = ds.transform_spec(model.input_spec, source, size=size)
    transform = ds.build_transform(spec)
    images = torch.stack([transform(source.load(i)) for i in range(n)]).contiguous(memory_format=torch.channels_last)
    batches = [b for c in range(-(-n // chunk_rows))
               for b in chunk_batches(c * chunk_rows, min(n, (c + 1) * chunk_rows), batch_size)]

    def forward_pass() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                model(images[b[0]:b[-1] + 1]).float().numpy()
        return time.perf_counter() - start

    workdir = Path(tempfile.mkdtemp(prefix="perf-extract-", dir=args.workdir))
    cfg = dict(model=model_name, dataset=dataset, random_init=True, seed=args.seed, image_size=size,
               small_input=True, batch_size=batch_size, chunk_rows=chunk_rows, workers=1, limit=limit,
               threads=args.threads, quiet=True)

    def extraction() -> float:
        out = workdir / "s.zarr"
        shutil.rmtree(out, ignore_errors=True)
        result = run_extraction(ExtractConfig(out=str(out), **cfg))
        assert result.complete and result.rows_computed == n
        return result.seconds

    try:
        log(f"extract: {model_name} on {n} {dataset} images at {size} px, batch {batch_size}, "
            f"{args.threads} threads")
        forward_pass()  # warm-up: allocator, oneDNN kernels
        extraction()
        forward_times, extract_times = [], []
        for _ in range(repeats):
            forward_times.append(forward_pass())
            extract_times.append(extraction())
        forward_s, extract_s = min(forward_times), min(extract_times)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ratio = forward_s / extract_s
    return [
        make_row("extract", f"extract {model_name} {size}px, {n} images (img/s)", n / extract_s, unit="img/s",
                 reference=n / forward_s, reference_name="bare forward pass (img/s)", ratio=ratio,
                 ratio_is="extract / forward throughput", target=f">= {EXTRACT_TARGET}",
                 passed=ratio >= EXTRACT_TARGET, quick=args.quick,
                 note=f"best of {repeats}; forward times {np.round(forward_times, 3).tolist()} s, extract times "
                      f"{np.round(extract_times, 3).tolist()} s"),
    ]

"""The extraction loop: data source -> backbone -> feature store. Resumable, torchrun-aware.

Three stages overlap: DataLoader workers decode and transform images, the main thread runs the backbone, and a writer
thread encodes and writes finished chunks while the next ones are computed.

Batches never straddle a chunk and always start at a chunk's first row, so the batch composition of every chunk is
the same whether a run is fresh, resumed after a kill, or split across torchrun ranks; the stored features are then
bit-identical in all three cases (the forward pass of a fixed batch is deterministic on a fixed machine).
"""

from __future__ import annotations

import hashlib
import os
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from extract import backbones as bb
from extract import datasets as ds
from featstore.checkpoint import load_weights_only
from featstore.errors import UserError
from featstore.runtime import progress_bar, resolve_device, thread_limits
from featstore.store import FeatureStore, Layout


@dataclass
class ExtractConfig:
    """Everything that decides what an extraction computes and where it goes (the CLI maps onto it 1:1)."""

    model: str
    out: str
    dataset: str = "digits"
    data_root: str | None = None
    split: str | None = None
    checkpoint: str | None = None
    random_init: bool = False
    image_size: int | None = None
    small_input: bool | None = None
    batch_size: int = 64
    workers: int = 1
    dtype: str = "float16"
    chunk_rows: int = 4096
    compression: str = "none"
    shard_rows: int | None = None
    maps: str | None = None
    views: int = 0
    device: str = "cpu"
    seed: int = 0
    channels_last: bool = True
    threads: int | None = None
    quiet: bool = False
    limit: int | None = None
    source_options: dict = field(default_factory=dict)


@dataclass
class ExtractResult:
    path: str
    rows: int
    rows_computed: int
    chunks_computed: int
    seconds: float
    complete: bool

    @property
    def images_per_second(self) -> float:
        return self.rows_computed / self.seconds if self.seconds > 0 else float("nan")


# ---------------------------------------------------------------------------- distributed helpers
def dist_info() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when run as a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _init_dist(device: str) -> bool:
    rank, world = dist_info()
    if world <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return True


def _broadcast(obj: Any, distributed: bool) -> Any:
    if not distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(distributed: bool) -> None:
    if distributed:
        import torch.distributed as dist

        dist.barrier()


def rank_chunks(n_chunks: int, rank: int, world: int) -> range:
    """The contiguous chunk range a rank owns."""
    return range(n_chunks * rank // world, n_chunks * (rank + 1) // world)


# ---------------------------------------------------------------------------- model and weights
def peek_checkpoint(path: str) -> dict:
    """The checkpoint's top-level dict before any model is built ({} for a file that holds something else, which
    :func:`extract.backbones.load_checkpoint` then refuses with the reason). One line for an unreadable file."""
    obj = load_weights_only(Path(path))
    return obj if isinstance(obj, dict) else {}


def prepare_model(cfg: ExtractConfig, source: ds.Source) -> tuple[bb.Backbone, dict, dict]:
    """Build the backbone with its weights; returns (model, weights record for the fingerprint, checkpoint info)."""
    if cfg.model not in bb.list_backbones():
        raise UserError(f"unknown model {cfg.model!r}; known: {', '.join(bb.list_backbones())}")
    small_input = cfg.small_input
    ckpt_info: dict = {}
    options: dict = {}
    if cfg.checkpoint:
        peek = peek_checkpoint(cfg.checkpoint)
        if peek.get("format") == "featstore-checkpoint":
            if peek.get("model") != cfg.model:
                raise UserError(f"checkpoint {cfg.checkpoint} is for model {peek.get('model')!r}, not {cfg.model!r}")
            if small_input is None:
                small_input = bool(peek.get("small_input", False))
            # options that change the computation but not the weights' shapes (a stem stride) must come back
            options = dict(peek.get("model_options") or {})
    if small_input is None:
        small_input = wants_small_input(cfg.model, cfg.image_size or source.native_size)
    torch.manual_seed(cfg.seed)  # random init, where asked for, is a function of the seed
    if cfg.checkpoint:
        model = bb.create_backbone(cfg.model, small_input=small_input, **options)
        ckpt_info = bb.load_checkpoint(model, cfg.checkpoint)
        weights = {"kind": "checkpoint", "sha256": ckpt_info["sha256"]}
        if options:
            weights["model_options"] = options
    else:
        probe = bb.create_backbone(cfg.model, small_input=small_input)
        if probe.has_pretrained and not cfg.random_init:
            model = bb.create_backbone(cfg.model, small_input=small_input, pretrained=True)
            weights = {"kind": "pretrained", **(model.weights_provenance or {})}
        elif cfg.random_init:
            model, weights = probe, {"kind": "random-init", "seed": cfg.seed}
        else:
            raise UserError(f"model {cfg.model} has no pretrained weights and no --checkpoint was given; pass "
                            f"--checkpoint FILE (random features are a debugging aid: --random-init)")
    weights["small_input"] = small_input
    return model, weights, ckpt_info


def wants_small_input(model: str, size: int | None) -> bool:
    """The small-image stem for inputs of 64 px or less, where the model has one and expects larger inputs."""
    if size is None or size > 64:
        return False
    if bb.create_backbone(model).input_spec.get("size", 224) <= 64:
        return False
    try:
        bb.create_backbone(model, small_input=True)
    except UserError:  # a fixed pretrained stem (efficientnet_lite0)
        return False
    return True


def _maps_shape(model: torch.nn.Module, layer: str, spec: dict) -> tuple[int, int, int]:
    modules = dict(model.named_modules())
    if layer not in modules:
        stages = getattr(model, "stage_names", [])
        raise UserError(f"--maps {layer}: no such layer in {model.name}; try one of {', '.join(stages)}")
    size = spec["size"]
    with torch.inference_mode():
        out = _forward_with_maps(model, torch.zeros(1, spec.get("channels", 3), size, size), layer)[1]
    return tuple(int(s) for s in out.shape[1:])


def _forward_with_maps(model: torch.nn.Module, x: torch.Tensor, layer: str | None):
    if layer is None:
        return model(x), None
    captured = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("maps", out))
    try:
        feats = model(x)
    finally:
        handle.remove()
    return feats, captured["maps"]


# ---------------------------------------------------------------------------- data
class _Images(Dataset):
    """Sample i -> (image tensor [C, H, W], extra views [K, C, H, W] or empty, i, error message or "").

    A corrupt image is returned as an error message rather than raised, so the main process can stop with one clear
    line instead of a worker traceback.
    """

    def __init__(self, source: ds.Source, spec: dict, views: int, seed: int):
        self.source, self.views, self.seed = source, views, seed
        self.transform = ds.build_transform(spec)
        self.augment = ds.build_augment(spec) if views else None
        size, channels = spec["size"], spec.get("channels", 3)
        self._blank = torch.zeros(channels, size, size)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        try:
            image = self.source.load(i)
            x = self.transform(image)
            if self.views:
                vs = []
                for v in range(self.views):
                    gen = torch.Generator().manual_seed(_view_seed(self.seed, i, v))
                    vs.append(self.augment(image, gen))
                views = torch.stack(vs)
            else:
                views = torch.empty(0)
            return x, views, i, ""
        except UserError as exc:
            return self._blank, torch.empty(0), i, str(exc)


def _view_seed(seed: int, index: int, view: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{index}:{view}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class _FirstRows:
    """The first ``limit`` samples of a source (quick looks and tests); splits and meta are cut to match."""

    def __init__(self, source: ds.Source, limit: int):
        if limit <= 0:
            raise UserError(f"--limit must be positive, not {limit}")
        self._source, n = source, min(limit, len(source))
        self.name, self.classes, self.grayscale = source.name, source.classes, source.grayscale
        self.native_size = source.native_size
        self.probes_files = getattr(source, "probes_files", False)
        self.probe = source.probe
        self.labels, self.ids = source.labels[:n], list(source.ids[:n])
        self.splits = {k: v[v < n] for k, v in source.splits.items()}
        self.class_splits = getattr(source, "class_splits", {})
        self.meta = {k: np.asarray(v)[:n] for k, v in source.meta.items()}

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int):
        return self._source.load(i)

    def manifest_hash(self) -> str:
        return hashlib.sha256(f"{self._source.manifest_hash()}:first:{len(self)}".encode()).hexdigest()

    def describe(self) -> dict:
        return {**self._source.describe(), "limit": len(self)}


def chunk_batches(lo: int, hi: int, batch_size: int) -> list[list[int]]:
    """Batches covering rows lo:hi of one chunk, each starting at lo + k * batch_size."""
    return [list(range(s, min(hi, s + batch_size))) for s in range(lo, hi, batch_size)]


# ---------------------------------------------------------------------------- the writer thread
class _ChunkWriter:
    """Writes finished chunks in a background thread; re-raises its first error in the caller's thread."""

    def __init__(self, store: FeatureStore, depth: int = 2):
        self.store = store
        self.jobs: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="featstore-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is None:
                try:
                    i, feats, maps, views = job
                    self.store.write_chunk(i, feats, maps=maps, views=views)
                except BaseException as exc:  # handed to the main thread
                    self.error = exc

    def put(self, job) -> None:
        self.check()
        self.jobs.put(job)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        self.check()


# ---------------------------------------------------------------------------- the loop
def fingerprint_for(cfg: ExtractConfig, source: ds.Source, spec: dict, weights: dict) -> dict:
    import torchvision

    return {
        "model": cfg.model,
        "weights": weights,
        "checkpoint_sha256": weights.get("sha256"),
        "transform": spec,
        "dataset": {"name": source.name, "split": cfg.split, "limit": cfg.limit,
                    "manifest_hash": source.manifest_hash()},
        "outputs": {"dtype": cfg.dtype, "maps": cfg.maps, "views": cfg.views,
                    "view_seed": cfg.seed if cfg.views else None},
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
    }


def run_extraction(cfg: ExtractConfig) -> ExtractResult:
    """Extract (or resume extracting) the features of ``cfg.dataset`` through ``cfg.model`` into ``cfg.out``.

    Everything that can be wrong with the request is checked before the store is touched; a store that exists is
    resumed only if its fingerprint and layout equal the request's.
    """
    if cfg.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, not {cfg.batch_size}")
    if cfg.views < 0:
        raise UserError(f"--views must be >= 0, not {cfg.views}")
    if cfg.workers < 0:
        raise UserError(f"--workers must be >= 0, not {cfg.workers}")
    device = resolve_device(cfg.device)
    with thread_limits(cfg.threads):
        return _run_extraction(cfg, device)


def _run_extraction(cfg: ExtractConfig, device: torch.device) -> ExtractResult:
    distributed = _init_dist(cfg.device)
    rank, world = dist_info()
    if cfg.device == "cuda" and distributed:   # one GPU per torchrun process
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")

    source = ds.open_source(cfg.dataset, root=cfg.data_root, split=cfg.split, **cfg.source_options)
    if cfg.limit is not None:
        source = _FirstRows(source, cfg.limit)
    note = ds.probe_note(source)
    if note and not cfg.quiet and rank == 0 and cfg.image_size is None:
        print(note, file=sys.stderr)
    model, weights, ckpt_info = prepare_model(cfg, source)
    spec = ds.transform_spec(model.input_spec, source, size=cfg.image_size)
    maps_shape = _maps_shape(model, cfg.maps, spec) if cfg.maps else None
    layout = Layout(n=len(source), dim=model.feature_dim, dtype=cfg.dtype, chunk_rows=cfg.chunk_rows,
                    compression=cfg.compression, shard_rows=cfg.shard_rows, maps_shape=maps_shape, views=cfg.views)
    fingerprint = fingerprint_for(cfg, source, spec, weights)
    config = {k: v for k, v in asdict(cfg).items() if k != "quiet"}
    if cfg.checkpoint:   # absolute, so that readers elsewhere find the checkpoint (its sha256 is the fingerprint's)
        config["checkpoint"] = os.path.abspath(cfg.checkpoint)
    provenance = {"source": source.describe(), "config": config}
    if ckpt_info.get("classes") is not None:
        provenance["checkpoint_classes"] = list(ckpt_info["classes"])
    if ckpt_info.get("provenance"):
        provenance["checkpoint_provenance"] = ckpt_info["provenance"]

    # Rank 0 creates (or reopens) the store and holds the writer lock; the other ranks join only if that worked.
    error = None
    store = None
    if rank == 0:
        try:
            store = FeatureStore.create(
                cfg.out, layout, fingerprint=fingerprint, classes=source.classes, provenance=provenance,
                splits=source.splits, class_splits=getattr(source, "class_splits", {}), meta=source.meta,
                labels=source.labels, ids=source.ids)
        except (UserError, OSError) as exc:
            error = exc
    message = _broadcast(None if error is None else f"{type(error).__name__}: {error}", distributed)
    if error is not None:
        raise error
    if message is not None:
        raise UserError(message.split(": ", 1)[1])
    if rank != 0:
        store = FeatureStore.create(cfg.out, layout, fingerprint=fingerprint, classes=source.classes, lock=False)
    assert store is not None
    try:
        result = _extract_chunks(cfg, store, source, model, spec, device, rank, world)
    finally:
        if rank == 0:
            _barrier(distributed)
            store.close()
        else:
            _barrier(distributed)
    result.complete = FeatureStore.open(cfg.out).complete
    return result


def _extract_chunks(cfg: ExtractConfig, store: FeatureStore, source: ds.Source, model: bb.Backbone, spec: dict,
                    device: torch.device, rank: int, world: int) -> ExtractResult:
    done = store.done_chunks()
    todo = [c for c in rank_chunks(store.n_chunks, rank, world) if not done[c]]
    batches = [b for c in todo for b in chunk_batches(*store.chunk_range(c), cfg.batch_size)]
    rows_todo = sum(len(b) for b in batches)
    start = time.perf_counter()
    if not todo:
        return ExtractResult(str(store.path), store.n, 0, 0, 0.0, store.complete)

    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format).eval()
    dataset = _Images(source, spec, cfg.views, cfg.seed)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if cfg.workers else None)
    writer = _ChunkWriter(store)
    chunk_rows = store.layout.chunk_rows
    current, parts, maps_parts, view_parts = None, [], [], []

    def flush() -> None:
        feats = np.concatenate(parts)
        maps = np.concatenate(maps_parts) if maps_parts else None
        views = np.concatenate(view_parts, axis=1) if view_parts else None
        writer.put((current, feats, maps, views))

    progress = progress_bar(rows_todo, f"extract {cfg.model}" + (f" [rank {rank}]" if world > 1 else ""),
                            quiet=cfg.quiet, unit="img", leave=True)
    try:
        with torch.inference_mode():
            for x, views, index, errors in loader:
                bad = [e for e in errors if e]
                if bad:
                    raise UserError(bad[0])
                chunk = int(index[0]) // chunk_rows
                if chunk != current:
                    if current is not None:
                        flush()
                    current, parts, maps_parts, view_parts = chunk, [], [], []
                x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                feats, maps = _forward_with_maps(model, x, cfg.maps)
                parts.append(feats.float().cpu().numpy())
                if maps is not None:
                    maps_parts.append(maps.half().cpu().numpy())
                if cfg.views:
                    b, k = views.shape[:2]
                    flat = views.flatten(0, 1).to(device).contiguous(memory_format=memory_format)
                    vf = model(flat).float().cpu().numpy().reshape(b, k, -1).transpose(1, 0, 2)
                    view_parts.append(vf)
                progress.update(len(index))
            if current is not None:
                flush()
        writer.close()
    except BaseException:
        # Stop the writer without letting it finish the chunk in hand: a failed run never marks partial work done.
        writer.error = writer.error or RuntimeError("aborted")
        writer.jobs.put(None)
        raise
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    return ExtractResult(str(store.path), store.n, rows_todo, len(todo), seconds, False)

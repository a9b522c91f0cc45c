"""``bench perf --sections fsor``: the episode loop of ``bench fsor`` against per-episode references.

Rows (all on the same episodes, drawn by the same batched :class:`featstore.episodes.EpisodeSampler`, sampling
included in every timing):

- 3,000 ProtoNet open-set episodes (5-way 1-shot, 5 open, 15 queries) through the bench's own path (batched
  sampling, chunked gather, batched head and metrics) against a per-episode loop with the FSOR papers' metric calls
  (scikit-learn ``roc_auc_score`` / ``f1_score`` per episode, as the TANE / DNPG test scripts do; target 20x), and
  against a lean per-episode numpy loop (context: both are bound by the same feature gather);
- 3,000 closed 5-way 1-shot tasks through the same path against easyfsl 1.5's ``PrototypicalNetworks`` (an
  identity backbone on the same features), one task at a time as its evaluation loop runs them; target 3x. The
  batched path gathers only the rows each chunk of episodes needs, support and queries in one ``index_select``
  from the store's float16 matrix, converted to float32 once; easyfsl gets the float32 matrix. Skipped with a note
  when easyfsl is not installed;
- the sampling alone (context).

Without ``--store`` a synthetic 20 x 600 x 640 float16 store (miniImageNet's test split shape; ``--dim`` changes
the width) is built in a temporary folder and removed. ``--quick``: 300 episodes.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.fsor import EpisodeFeatures, default_chunk, evaluate_batch, run_heads_chunked, single_intraop_thread
from bench.perf_common import make_row, section
from bench.report import timer, timer_interleaved
from featstore.episodes import EpisodeSampler

S = "fsor"
SPEED_KEYS = ("acc", "auroc", "f1_macro", "f1_paper")
FEW_SHOT_TARGET = 20.0
EASYFSL_TARGET = 3.0


def vectorised_protonet(features: torch.Tensor, sampler: EpisodeSampler, episodes: int, batch: int = 500,
                        chunk: int | None = None, metric: str = "euclidean") -> dict[str, np.ndarray]:
    """Per-episode accuracy, AUROC and both F1s (per-episode median decision) of ProtoNet (``msp`` score) on
    episodes 0..episodes-1 through the bench's own code path; closed episodes (``sampler.open_ways == 0``): the
    accuracy only. ``features`` float32, or float16 (gathered rows are converted once)."""
    from heads.base import canonical_options
    from heads.protonet import ProtoNet

    head = ProtoNet(**canonical_options(ProtoNet, {"metric": metric, "open_score": "msp"}), device=features.device)
    data = EpisodeFeatures(None, None, 0, features.device, features=features)
    chunk = default_chunk(features.device) if chunk is None else chunk
    keys = SPEED_KEYS if sampler.open_ways else ("acc",)
    out: dict[str, list] = {k: [] for k in keys}
    for b in sampler.batches(episodes, batch):
        logits, scores = run_heads_chunked({"p": head}, data, b, sampler.ways, chunk)["p"]
        got = evaluate_batch(logits, scores, b.query_labels, sampler.ways, None,
                             "median" if sampler.open_ways else None, keys=keys)
        for k in keys:
            out[k].append(got[k].cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def loop_protonet_reference(features: np.ndarray, sampler: EpisodeSampler, episodes: int, batch: int = 500,
                            metric: str = "euclidean", metrics: str = "numpy") -> dict[str, np.ndarray]:
    """The same episodes and outputs as :func:`vectorised_protonet`, one episode at a time in a Python loop.

    Episodes are drawn by the same (batched) sampler; per episode the loop gathers the episode's features with
    numpy, takes class means, distances, softmax, the closed accuracy, AUROC and the two F1 scores of the
    median decision. ``metrics="numpy"``: lean per-episode numpy (ranks by scipy, F1 by bincount);
    ``metrics="sklearn"``: scikit-learn's roc_auc_score and f1_score per episode, as the FSOR papers' test scripts
    do. Results equal the vectorised ones to float tolerance.
    """
    from scipy.stats import rankdata

    if metrics == "sklearn":
        from sklearn.metrics import f1_score, roc_auc_score
    elif metrics != "numpy":
        raise ValueError(f"metrics must be 'numpy' or 'sklearn', not {metrics!r}")
    features = np.asarray(features, dtype=np.float32)
    N, K = sampler.ways, sampler.shots
    out: dict[str, list] = {k: [] for k in SPEED_KEYS}
    for b in sampler.batches(episodes, batch):
        support, query, qlab = b.support.numpy(), b.query.numpy(), b.query_labels.numpy()
        for e in range(len(b)):
            sup = features[support[e]]                       # [N*K, D], class-major
            q = features[query[e]]                           # [m, D]
            protos = sup.reshape(N, K, -1).mean(axis=1)
            if metric == "cosine":
                qn = q / np.linalg.norm(q, axis=1, keepdims=True)
                pn = protos / np.linalg.norm(protos, axis=1, keepdims=True)
                logits = (qn @ pn.T) / 0.1
            else:
                d2 = (q * q).sum(1)[:, None] - 2 * q @ protos.T + (protos * protos).sum(1)[None, :]
                logits = -np.maximum(d2, 0)
            z = np.exp(logits - logits.max(1, keepdims=True))
            score = -(z / z.sum(1, keepdims=True)).max(1)    # negative max softmax probability
            y = qlab[e]
            known = y >= 0
            closed = logits.argmax(1)
            out["acc"].append(float((closed[known] == y[known]).mean()))
            median = np.sort(score)[(len(score) - 1) // 2]  # lower median, as torch.median
            pred = np.where(score > median, N, closed)
            truth = np.where(known, y, N)
            if metrics == "sklearn":
                out["auroc"].append(roc_auc_score(~known, score))
                out["f1_macro"].append(f1_score(truth, pred, labels=np.arange(N + 1), average="macro",
                                                zero_division=0))
                out["f1_paper"].append(f1_score(truth, pred, labels=np.unique(pred), average="macro",
                                                zero_division=0))
                continue
            ranks = rankdata(score)
            pos, neg = (~known).sum(), known.sum()
            out["auroc"].append(float((ranks[~known].sum() - pos * (pos + 1) / 2) / (pos * neg)))
            tp = np.bincount(truth[pred == truth], minlength=N + 1)
            n_pred = np.bincount(pred, minlength=N + 1)
            n_true = np.bincount(truth, minlength=N + 1)
            denom = n_pred + n_true
            f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
            out["f1_macro"].append(float(f1.mean()))
            out["f1_paper"].append(float(f1[n_pred > 0].mean()))
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def easyfsl_protonet(features: torch.Tensor, sampler: EpisodeSampler, episodes: int, batch: int = 500) -> np.ndarray:
    """Per-task accuracy of easyfsl's ``PrototypicalNetworks`` (identity backbone) on closed episodes
    0..episodes-1, one task at a time: ``process_support_set`` then ``forward`` on the queries, as easyfsl's own
    evaluation loop does. ``features``: float32 ``[n, D]``. Single-threaded on a CPU like the batched path: its
    per-task ops are as small, and with 2+ threads every one of them waits at a barrier (measured on 2 busy cores:
    3,000 tasks in 3.9 s with 1 thread, 24.6 s with 2)."""
    from easyfsl.methods import PrototypicalNetworks

    model = PrototypicalNetworks(torch.nn.Identity()).eval()
    out = []
    with torch.no_grad(), single_intraop_thread(features.device.type == "cpu"):
        for b in sampler.batches(episodes, batch):
            for e in range(len(b)):
                model.process_support_set(features[b.support[e]], b.support_labels[e])
                pred = model(features[b.query[e]]).argmax(-1)
                out.append(float((pred == b.query_labels[e]).float().mean()))
    return np.asarray(out, dtype=np.float64)


def synthetic_fsor_store(path: Path, n_classes: int = 20, per_class: int = 600, dim: int = 640, seed: int = 0,
                         separation: float = 0.5, scale: float = 0.05):
    """A store shaped like miniImageNet's test split (20 x 600 x 640, float16), clustered, with split 'test'."""
    from featstore.store import Layout, write_store

    rng = np.random.default_rng(seed)
    n = n_classes * per_class
    centres = rng.standard_normal((n_classes, dim)).astype(np.float32) * separation
    labels = np.repeat(np.arange(n_classes), per_class)
    # Noise 1.5 per dimension, centres `separation` apart per dimension: 1-shot ProtoNet accuracy about 65%;
    # `scale` keeps squared distances O(1) so that the softmax does not saturate (no ties in the msp score).
    x = np.maximum(centres[labels] + rng.standard_normal((n, dim)).astype(np.float32) * 1.5, 0) * scale
    layout = Layout(n=n, dim=dim, dtype="float16", chunk_rows=4096)
    return write_store(path, layout, x, fingerprint={"bench": "fsor-synthetic", "seed": seed},
                       classes=[f"class{c}" for c in range(n_classes)], labels=labels,
                       ids=[f"s{i}" for i in range(n)], splits={"test": np.arange(n)})


def _agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray], keys, episodes: int) -> str:
    # float32 (torch, batched) and float32 (numpy or easyfsl, per episode) round differently, so a query whose two
    # best distances nearly tie may flip in a few episodes; the means agree
    differ = np.zeros(episodes, dtype=bool)
    gap = 0.0
    for k in keys:
        differ |= ~np.isclose(a[k], b[k], atol=1e-6)
        gap = max(gap, abs(float(a[k].mean() - b[k].mean())))
    if gap < 1e-3:
        return (f"results agree (largest difference of a mean {gap:.1e}; {int(differ.sum())} of {episodes} episodes "
                f"differ by float rounding)")
    return f"results DIFFER (largest difference of a mean {gap:.1e})"


@section("fsor")
def fsor_section(args) -> list[dict]:
    """The rows of the module docstring. ``args`` is a ``PerfArgs`` (uses store, workdir, seed, quick, dim,
    notes)."""
    from featstore.store import FeatureStore

    quick = bool(getattr(args, "quick", False))
    seed = int(getattr(args, "seed", 0))
    episodes = 300 if quick else 3000
    notes = getattr(args, "notes", None)
    tmp = None
    try:
        if getattr(args, "store", None):
            store = FeatureStore.open(args.store)
            split = "test" if "test" in store.split_names else None
            rows = store.split(split) if split else None
            source = f"store {args.store}" + (", split 'test'" if split else ", all rows")
        else:
            base = Path(args.workdir) if getattr(args, "workdir", None) else None
            if base is not None:
                base.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix="featstore-fsor-", dir=base))
            dim = int(getattr(args, "dim", None) or 640)
            store = synthetic_fsor_store(tmp / "fsor.zarr", seed=seed, dim=dim)
            rows = store.split("test")
            source = f"SYNTHETIC store, 20 classes x 600 rows x {dim} dims (miniImageNet test shape at 640)"
        sampler = EpisodeSampler(store.labels, rows, ways=5, shots=1, queries=15, open_ways=5, seed=seed,
                                 drop_small=True, name="the perf store")
        closed = EpisodeSampler(store.labels, rows, ways=5, shots=1, queries=15, open_ways=0, seed=seed,
                                drop_small=True, name="the perf store")
        x = store.load_features()
        feats = torch.from_numpy(x)
        half = torch.from_numpy(store.load_features(dtype="float16"))
        dim = x.shape[1]
        if notes is not None:
            notes.append(f"fsor: {episodes} episodes 5-way 1-shot + 5 open x 15 queries, and {episodes} closed "
                         f"5-way 1-shot tasks x 15 queries, {source}; batch 500; sampling included in every timing")
        vectorised_protonet(feats, sampler, 100)  # warm-up (allocator, thread pool)
        t = timer_interleaved({
            "vectorised": lambda: vectorised_protonet(feats, sampler, episodes),
            "loop": lambda: loop_protonet_reference(x, sampler, episodes, metrics="numpy"),
            "loop_sklearn": lambda: loop_protonet_reference(x, sampler, episodes, metrics="sklearn"),
        }, repeats=1 if quick else 2, warmup=0)
        vec = t["vectorised"]
        ts = timer(lambda: [b for b in sampler.batches(episodes, 500)], repeats=3, warmup=1)
        what = f"{episodes:,} ProtoNet episodes (5-way 1-shot, 5 open x 15 queries, {dim}-d; acc, AUROC, 2 F1s)"
        out = []
        for name, ref_name, target in (
                ("loop_sklearn", "per-episode loop, numpy head + scikit-learn metrics (as the papers' scripts)",
                 FEW_SHOT_TARGET),
                ("loop", "per-episode loop, lean numpy head and metrics", None)):
            ratio = t[name].best / vec.best
            out.append(make_row(S, f"{what}: vectorised", vec.best, reference=t[name].best,
                                reference_name=ref_name + ", same episodes", ratio=ratio,
                                ratio_is="loop / vectorised", target=None if target is None else f">= {target:g}",
                                passed=None if target is None else ratio >= target, quick=quick,
                                note=f"{episodes / vec.best:,.0f} episodes/s vectorised, "
                                     f"{episodes / t[name].best:,.0f} looped; "
                                     f"{_agreement(vec.result, t[name].result, SPEED_KEYS, episodes)}"
                                     + ("" if target else "; context: both are bound by the same feature gather")))
        out.append(_easyfsl_row(half, feats, closed, episodes, dim, quick, notes))
        out.append(make_row(S, f"sample {episodes:,} episodes (index tensors only)", ts.best, reference=vec.best,
                            reference_name="vectorised episodes", ratio=ts.best / vec.best,
                            ratio_is="sampling / total", quick=quick, note="context"))
        return [r for r in out if r is not None]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _easyfsl_row(half: torch.Tensor, feats: torch.Tensor, sampler: EpisodeSampler, episodes: int, dim: int,
                 quick: bool, notes: list | None) -> dict | None:
    """Closed 5-way 1-shot tasks: the batched path (float16 gather) against easyfsl's PrototypicalNetworks."""
    try:
        import easyfsl  # noqa: F401
    except ImportError:
        if notes is not None:
            notes.append("fsor: easyfsl is not installed, so the row against its PrototypicalNetworks is skipped "
                         "(pip install easyfsl==1.5.0)")
        return None
    from importlib.metadata import version

    vectorised_protonet(half, sampler, 100)  # warm-up
    easyfsl_protonet(feats, sampler, 20)
    t = timer_interleaved({
        "vectorised": lambda: vectorised_protonet(half, sampler, episodes),
        "easyfsl": lambda: easyfsl_protonet(feats, sampler, episodes),
    }, repeats=1 if quick else 2, warmup=0)
    vec, ref = t["vectorised"], t["easyfsl"]
    ratio = ref.best / vec.best
    agree = _agreement(vec.result, {"acc": ref.result}, ("acc",), episodes)
    return make_row(S, f"{episodes:,} closed ProtoNet tasks (5-way 1-shot x 15 queries, {dim}-d; accuracy): "
                       f"batched", vec.best, reference=ref.best,
                    reference_name=f"easyfsl {version('easyfsl')} PrototypicalNetworks, identity backbone, one task "
                                   f"at a time, same tasks and features", ratio=ratio, ratio_is="easyfsl / batched",
                    target=f">= {EASYFSL_TARGET:g}", passed=ratio >= EASYFSL_TARGET, quick=quick,
                    note=f"{episodes / vec.best:,.0f} tasks/s batched (float16 rows gathered per chunk), "
                         f"{episodes / ref.best:,.0f} with easyfsl (float32 matrix); mean accuracy "
                         f"{100 * vec.result['acc'].mean():.2f}% vs {100 * ref.result.mean():.2f}%; {agree}")

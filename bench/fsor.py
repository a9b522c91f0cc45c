"""``bench fsor``: few-shot open-set recognition on a feature store (protocol of fsor.md section 3.2).

Every test episode is N known classes with K support and Q queries each plus M unknown classes with Q queries
each (defaults 5 / {1, 5} / 15 / 5: 75 known + 75 unknown queries), drawn from one split of the store by
:class:`featstore.episodes.EpisodeSampler`: episode i is a pure function of (seed, i), so every head, run and
machine sees the same episodes for one seed, and they are saved as ``episodes_<K>shot.npz`` beside the results.
When the store has cached views, each support image is the mean of ``views_per_support`` (default 5) of them,
chosen from the episode's random stream (the papers' 5 augmented support views); queries use the clean features.

Per episode and head: closed accuracy (argmax over the N known columns, on the known queries), AUROC (the head's
open score, unknown positive), OSCR, AUPR-out, FPR@95TPR, and two F1 scores of the (N+1)-way decision:
``f1_macro`` (standard macro-F1 over all N + 1 labels) and ``f1_paper`` (the TANE / DNPG code's F1, a macro
average over the labels that occur in the predictions only; see :mod:`bench.metrics`). Every figure is the mean
over episodes with a Student-t 95% CI, in percent.

The open-set decision for F1 (the (N+1)-th label):

- a head with an unknown column (``logits_with_negative`` returning N + 1 columns, as TANE / DNPG, or ``logits``
  with N + 1 columns) gets the papers' rule: the (N+1)-way argmax; no threshold;
- a head with N columns (ProtoNet) flags a query as unknown when its open score exceeds a threshold. ``threshold``
  picks the rule: ``"val"`` = the 95th percentile of the open scores of the *known* queries of validation
  episodes (same protocol on ``val_split``, as many as the test episodes up to 1000), i.e. 95% of the knowns
  are accepted, chosen without looking at the test split; ``"median"`` = per test episode, the median of its
  queries' open scores (transductive: it uses the protocol's 50% share of unknowns); ``"auto"`` (default) = ``"val"`` when the
  store has a usable ``val_split``, else ``"median"``. The rule used is written next to every result.

Heads are looked up in the head registry (:mod:`heads.base`); ``heads.protonet`` and, where they exist,
``heads.tane`` / ``heads.dnpg`` are imported. A head spec is ``name`` or ``name:key=value,...`` (constructor
hyper-parameters, e.g. ``protonet:metric=cosine,open_score=distance``). Constructor parameters ``device``,
``feat_dim`` (the store's dimension) and ``n_base_classes`` (classes of ``train_split``) are filled in when the
head accepts them and the spec does not set them.

Meta-training hook: a head class with ``needs_meta_training = True`` gets, once per shot setting and before any
test episode, ::

    head.meta_train(features, labels, train_rows, val_rows, base_weights, seed, **optional)

with ``features`` the store's ``[n, D]`` float32 tensor on the device, ``labels`` the store's ``[n]`` int64 numpy
labels, ``train_rows`` / ``val_rows`` the rows of ``train_split`` / ``val_split`` (None when the store has no
such split; model selection belongs on the validation split, never on test), ``base_weights`` the ``[C_base, D]``
rows of the backbone's classifier for the train classes, read from the store's checkpoint (matched by class name),
or, where that checkpoint is not at hand, the mean feature of each train class (rows in the order of
``optional["base_classes"]``; a head may replace them with its own), and ``optional`` those of ``store, base_classes, ways, shots, queries, open_ways, device, quiet,
support_views`` (the store's ``[V, n, D]`` views, loaded only when asked for and present) that the method's
signature accepts (all of them if it takes ``**kwargs``). Test episodes then call
``fit(support [E, N*K, D], support_labels [E, N*K])``, ``logits_with_negative(queries)`` where the head has it
(else ``logits(queries [E, m, D])``) and ``open_score(queries)``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import click
import numpy as np
import torch

from bench import metrics as M
from bench.report import markdown_table, mean_ci95, write_results
from featstore.episodes import EpisodeBatch, EpisodeSampler
from featstore.errors import UserError

HEAD_MODULES = ("heads.protonet", "heads.tane", "heads.dnpg")
METRIC_KEYS = ("acc", "auroc", "f1_macro", "f1_paper", "oscr", "aupr_out", "fpr95")
METRIC_NAMES = {"acc": "closed accuracy (known queries)", "auroc": "AUROC (unknown positive)",
                "f1_macro": "standard macro-F1 over N+1 labels", "f1_paper": "papers' F1 (macro over predicted "
                "labels only)", "oscr": "OSCR", "aupr_out": "AUPR-out", "fpr95": "FPR@95TPR (lower is better)"}
THRESHOLD_RULES = ("auto", "val", "median")
CALIBRATION_EPISODES = 1000


# ---------------------------------------------------------------------------------------------------- heads
def load_head_modules() -> dict[str, type]:
    """Import the head modules that exist; return the head registry."""
    for name in HEAD_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the module exists but one of its imports is missing: a real error
                raise
    from heads.base import HEADS

    return HEADS


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_head_spec(spec: str) -> tuple[str, dict]:
    """``"name"`` or ``"name:key=value,key=value"`` -> (name, hyper-parameters)."""
    name, _, rest = spec.partition(":")
    params = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise UserError(f"bad head parameter {part!r} in {spec!r}; write name:key=value,key=value")
        params[key.strip()] = _value(value.strip())
    return name.strip(), params


def make_head(spec: str, device: torch.device, registry: dict | None = None, defaults: dict | None = None):
    """A head from its spec. ``defaults`` (e.g. ``feat_dim`` and ``n_base_classes`` from the store) fill constructor
    parameters that the head accepts and the spec does not set; ``device`` always does."""
    registry = load_head_modules() if registry is None else registry
    name, params = parse_head_spec(spec)
    if name not in registry:
        known = ", ".join(sorted(registry)) or "none"
        raise UserError(f"head {name!r} is not available (registered heads: {known})"
                        + ("; its module is not written yet" if name in ("tane", "dnpg") else ""))
    cls = registry[name]
    accepted = inspect.signature(cls.__init__).parameters
    for key, value in {"device": device, **(defaults or {})}.items():
        if key in accepted:
            params.setdefault(key, value)
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise UserError(f"head {spec!r}: {' '.join(str(exc).split())}") from None


def _accepted_kwargs(fn: Callable, optional: dict) -> dict:
    """The entries of ``optional`` that ``fn`` accepts (all with ``**kwargs``); callables are evaluated lazily."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        keys = list(optional)
    else:
        keys = [k for k in optional if k in params]
    return {k: (optional[k]() if callable(optional[k]) else optional[k]) for k in keys}


def meta_train_head(head, *, store, features: torch.Tensor, labels: np.ndarray, train_split: str, val_split: str,
                    seed: int, ways: int, shots: int, queries: int, open_ways: int, device: torch.device,
                    quiet: bool) -> None:
    """The meta-training hook of heads with ``needs_meta_training`` (see the module docstring)."""
    if train_split not in store.split_names:
        raise UserError(f"head {head.head_name!r} needs meta-training on split {train_split!r} but store "
                        f"{store.path} has splits: {', '.join(store.split_names) or 'none'}")
    train_rows = store.split(train_split)
    val_rows = store.split(val_split) if val_split in store.split_names else None
    base_classes, inverse = np.unique(labels[train_rows], return_inverse=True)
    base_weights = checkpoint_base_weights(store, base_classes, features.device)
    if base_weights is None:  # no usable checkpoint classifier: the class-mean features stand in for its rows
        idx = torch.from_numpy(train_rows).to(features.device)
        onehot = torch.zeros(len(base_classes), len(train_rows), dtype=features.dtype, device=features.device)
        onehot[torch.from_numpy(inverse).to(features.device), torch.arange(len(train_rows), device=features.device)] = 1
        base_weights = onehot @ features.index_select(0, idx) / onehot.sum(1, keepdim=True)

    def views():
        return torch.from_numpy(store.load_views()).to(device) if store.layout.views else None

    optional = dict(store=store, base_classes=base_classes, ways=ways, shots=shots, queries=queries,
                    open_ways=open_ways, device=device, quiet=quiet, support_views=views)
    try:
        head.meta_train(features, labels, train_rows, val_rows, base_weights, seed,
                        **_accepted_kwargs(head.meta_train, optional))
    except ValueError as exc:  # an episode request the split cannot serve: a user error, not a crash
        raise UserError(f"head {head.head_name!r} meta-training on --train-split {train_split!r} / --val-split "
                        f"{val_split!r}: {exc}") from None


def checkpoint_base_weights(store, base_classes: np.ndarray, device: torch.device) -> torch.Tensor | None:
    """``[B, D]`` rows of the backbone's own classifier for the store classes ``base_classes`` (TANE's base memory,
    fsor.md 5.3), matched by class name; None when the store's checkpoint is gone, changed, has no classifier, or
    was not trained on every one of these classes."""
    from bench.lowshot import checkpoint_classifier

    found = checkpoint_classifier(store)
    if found is None:
        return None
    weight, _bias, names, _sha = found
    row_of = {name: i for i, name in enumerate(names)}
    try:
        rows = [row_of[store.classes[int(c)]] for c in base_classes]
    except KeyError:
        return None
    return torch.from_numpy(weight[rows]).to(device)


# ---------------------------------------------------------------------------------------------------- one batch
def evaluate_batch(logits: torch.Tensor, scores: torch.Tensor, query_labels: torch.Tensor, ways: int,
                   tau: float | None, rule: str, keys: Sequence[str] = METRIC_KEYS) -> dict[str, torch.Tensor]:
    """Per-episode metrics ``[E]`` of one batch (fractions, not percent).

    ``logits`` ``[E, m, N]`` or ``[E, m, N+1]`` (last column unknown), ``scores`` ``[E, m]`` open scores,
    ``query_labels`` ``[E, m]`` (-1 unknown). ``rule``: ``"argmax"`` (N+1 columns), ``"val"`` (score > tau) or
    ``"median"`` (score > the episode's median score).
    """
    with _single_intraop_thread(logits.device.type == "cpu"):  # [E, m] ops: small, barrier-bound when threaded
        return _evaluate_batch(logits, scores, query_labels, ways, tau, rule, keys)


def _evaluate_batch(logits, scores, query_labels, ways, tau, rule, keys):
    y = query_labels.to(logits.device)
    unknown = y < 0
    closed = logits[..., :ways].argmax(-1)
    if rule == "argmax":
        open_pred = logits.argmax(-1)
    elif rule == "val":
        open_pred = M.open_predictions(closed, scores > tau, ways)
    elif rule == "median":
        open_pred = M.open_predictions(closed, scores > scores.median(dim=-1, keepdim=True).values, ways)
    else:
        raise ValueError(f"unknown decision rule {rule!r}")
    fns = {
        "acc": lambda: M.batched_closed_accuracy(closed, y),
        "auroc": lambda: M.batched_auroc(scores, unknown),
        "f1_macro": lambda: M.batched_open_macro_f1(open_pred, y, ways),
        "f1_paper": lambda: M.batched_paper_f1(open_pred, y, ways),
        "oscr": lambda: M.batched_oscr(scores, unknown, closed == y),
        "aupr_out": lambda: M.batched_aupr(scores, unknown),
        "fpr95": lambda: M.batched_fpr_at_95tpr(scores, unknown),
    }
    return {k: fns[k]() for k in keys}


def _run_head(head, support: torch.Tensor, support_labels: torch.Tensor, queries: torch.Tensor, ways: int):
    with torch.no_grad():
        head.fit(support, support_labels.to(support.device))
        if hasattr(head, "logits_and_open_score"):  # one pass over the queries where the head offers it
            logits, scores = head.logits_and_open_score(queries)
        elif hasattr(head, "logits_with_negative"):  # [.., N+1]: the unknown column for the (N+1)-way argmax
            logits, scores = head.logits_with_negative(queries), head.open_score(queries)
        else:
            logits, scores = head.logits(queries), head.open_score(queries)
    _check_columns(head, logits, ways)
    return logits, scores.to(logits.dtype)


def _check_columns(head, logits: torch.Tensor, ways: int) -> None:
    if logits.shape[-1] not in (ways, ways + 1):
        raise UserError(f"head {head.head_name!r} returned {logits.shape[-1]} logit columns for a {ways}-way "
                        f"episode (expected {ways}, or {ways + 1} with an unknown column)")


def default_chunk(device: torch.device) -> int:
    """Episodes per head call: small on a CPU so that the gathered features stay in the L2 cache (measured on
    2 cores: 8 episodes of 150 x 640 floats run 2.5x faster than 500), everything at once on a GPU."""
    return 8 if torch.device(device).type == "cpu" else 1 << 30


@contextlib.contextmanager
def _single_intraop_thread(active: bool):
    """torch intra-op threads = 1 inside (restored after). The episode loop on a CPU runs many small ops (a chunk
    of episodes, [E, m] metrics); with 2+ OpenMP threads each op ends in a barrier, and on a shared machine a
    descheduled thread stalls every barrier (measured on 2 busy cores: 3000 ProtoNet episodes in 0.9 s with 1
    thread, 10.5 s with 2; 0.4 s vs 0.6 s when the cores were idle). Meta-training keeps the configured threads."""
    if not active:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_heads_chunked(heads: dict, data: "_Data", batch: EpisodeBatch, ways: int, chunk: int):
    """{spec: (logits [E, m, C], scores [E, m])} for every head on one batch, gathering features ``chunk``
    episodes at a time (each head is fitted on each chunk's support). On a CPU this runs single-threaded
    (see :func:`_single_intraop_thread`)."""
    parts: dict = {spec: ([], []) for spec in heads}
    with _single_intraop_thread(data.device.type == "cpu"):
        for lo in range(0, len(batch), chunk):
            sub = batch if chunk >= len(batch) else _slice(batch, lo, lo + chunk)
            sf, qf = data.gather(sub)
            for spec, head in heads.items():
                logits, scores = _run_head(head, sf, sub.support_labels, qf, ways)
                parts[spec][0].append(logits)
                parts[spec][1].append(scores)
    return {spec: (torch.cat(lg), torch.cat(sc)) for spec, (lg, sc) in parts.items()}


def _slice(batch: EpisodeBatch, lo: int, hi: int) -> EpisodeBatch:
    from dataclasses import fields

    return EpisodeBatch(**{f.name: (None if getattr(batch, f.name) is None else getattr(batch, f.name)[lo:hi])
                           for f in fields(batch)})


class _Data:
    """Features (and a split's views) in memory, gathered by episode batches."""

    def __init__(self, store, rows: np.ndarray | None, vps: int, device: torch.device,
                 features: torch.Tensor | None = None):
        self.features = torch.from_numpy(store.load_features()).to(device) if features is None else features
        self.views = self.row_map = None
        if vps:
            self.views = torch.from_numpy(store.load_views(rows)).to(device)
            row_map = torch.full((store.n,), -1, dtype=torch.long)
            row_map[torch.from_numpy(rows)] = torch.arange(len(rows))
            self.row_map = row_map.to(device)
        self.device = device

    def gather(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return (batch.support_features(self.features, self.views, self.row_map),
                batch.query_features(self.features))


# ---------------------------------------------------------------------------------------------------- driver
def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} but no CUDA device is available; use --device cpu")
    return dev


def _progress(total: int, quiet: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="ep", disable=quiet or not sys.stderr.isatty(), leave=False,
                file=sys.stderr, dynamic_ncols=True)


def _fmt(mean: float, half: float) -> str:
    return f"{mean:.3f} ± {half:.3f}"


def run_fsor(store_path: str | os.PathLike, *, split: str = "test", ways: int = 5, shots: Sequence[int] = (1, 5),
             open_ways: int = 5, queries: int = 15, episodes: int = 3000, heads: Sequence[str] = ("protonet",),
             seed: int = 0, batch: int = 500, device: str = "cpu", out: str | os.PathLike | None = None,
             views_per_support: int | None = None, threshold: str = "auto", train_split: str = "train",
             val_split: str = "val", quiet: bool = False, chunk: int | None = None,
             echo: Callable[[str], None] | None = None, ready_heads: Mapping[str, Any] | None = None) -> dict:
    """Run the FSOR protocol for every head and shot setting; return the metrics (and write them under ``out``).

    Returns ``{"heads": {spec: {"<K>-shot": {metric: {"mean", "ci95"}, "decision": ..., "threshold": ...}}},
    "unit": "percent", ...}``. See the module docstring for the protocol, the metrics and the F1 decision rule.

    ``ready_heads``: ``{label: head}`` of heads trained elsewhere (a head fine-tuned together with the backbone of
    this store and loaded from that checkpoint), on ``device``. They run beside ``heads`` under their label, as
    they are: never built from a spec and never meta-trained here (the store's train split is not used for them).
    """
    from featstore.store import FeatureStore

    shots = tuple(int(k) for k in shots)
    ready = dict(ready_heads or {})
    specs = tuple(heads)  # built from their spec (and meta-trained where they need it)
    heads = specs + tuple(ready)  # every head, by label
    for what, value in (("--ways", ways), ("--queries", queries), ("--episodes", episodes), ("--batch", batch)):
        if value < 1:
            raise UserError(f"{what} must be at least 1, not {value}")
    if open_ways < 1:
        raise UserError(f"--open-ways must be at least 1 for open-set episodes, not {open_ways}")
    if not shots or min(shots) < 1:
        raise UserError(f"--shots must be a list of positive integers, not {shots!r}")
    if not heads:
        raise UserError("give at least one --head")
    if threshold not in THRESHOLD_RULES:
        raise UserError(f"--threshold must be one of {', '.join(THRESHOLD_RULES)}, not {threshold!r}")
    dev = _device(device)
    chunk = default_chunk(dev) if chunk is None else int(chunk)
    if chunk < 1:
        raise UserError(f"chunk must be at least 1, not {chunk}")
    registry = load_head_modules()
    if len(set(heads)) != len(heads):
        raise UserError("the same --head is given twice")
    for spec in specs:  # fail early (before reading the store) on an unknown head
        if parse_head_spec(spec)[0] not in registry:
            make_head(spec, dev, registry)

    store = FeatureStore.open(store_path)
    rows = store.split(split)
    head_defaults: dict[str, Any] = {"feat_dim": store.dim}
    if train_split in store.split_names:
        head_defaults["n_base_classes"] = len(np.unique(store.labels[store.split(train_split)]))
    for spec in specs:  # and on a bad hyper-parameter
        make_head(spec, dev, registry, head_defaults)
    n_views = store.layout.views
    vps = (min(5, n_views) if n_views else 0) if views_per_support is None else int(views_per_support)
    samplers = {k: EpisodeSampler(store.labels, rows, ways=ways, shots=k, queries=queries, open_ways=open_ways,
                                  seed=seed, n_views=n_views, views_per_support=vps, name=f"split {split!r}",
                                  class_names=store.classes) for k in shots}
    rule_default = threshold
    val_rows = None
    if threshold in ("auto", "val"):
        if val_split in store.split_names:
            val_rows = store.split(val_split)
        elif threshold == "val":
            raise UserError(f"--threshold val needs a split {val_split!r}; store {store.path} has: "
                            f"{', '.join(store.split_names) or 'none'} (use --threshold median or --val-split)")
    notes: list[str] = []
    t_start = time.perf_counter()
    data = _Data(store, rows if val_rows is None else np.union1d(rows, val_rows), vps, dev)
    labels = store.labels

    results: dict[str, dict] = {spec: {} for spec in heads}
    pooled: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    episode_files = {}
    total = episodes * len(shots)
    bar = _progress(total, quiet, "fsor")
    try:
        for k in shots:
            sampler = samplers[k]
            head_objs, rules, taus = {}, {}, {}
            for spec in heads:
                if spec in ready:  # trained elsewhere: evaluated as it is
                    head_objs[spec] = ready[spec]
                    continue
                head = make_head(spec, dev, registry, head_defaults)
                if getattr(head, "needs_meta_training", False):
                    meta_train_head(head, store=store, features=data.features, labels=labels,
                                    train_split=train_split, val_split=val_split, seed=seed, ways=ways, shots=k,
                                    queries=queries, open_ways=open_ways, device=dev, quiet=quiet)
                head_objs[spec] = head
            # Decision rules: probe the number of logit columns on the first test episode.
            probe = sampler.sample(0, 1).to(dev)
            ps, pq = data.gather(probe)
            for spec, head in head_objs.items():
                logits, _ = _run_head(head, ps, probe.support_labels, pq, ways)
                if logits.shape[-1] == ways + 1:
                    rules[spec], taus[spec] = "argmax", None
                else:
                    rules[spec], taus[spec] = _calibrate(head, rule_default, store, val_rows, data, ways, k,
                                                         queries, open_ways, seed, n_views, vps, episodes, batch,
                                                         chunk, val_split, notes)
            per_ep = {spec: {m: [] for m in METRIC_KEYS} for spec in heads}
            scores_all = {spec: [] for spec in heads}
            unknown_all, support_rows, query_rows, cls_all, open_all = [], [], [], [], []
            for b in sampler.batches(episodes, batch):
                b = b.to(dev)
                outs = run_heads_chunked(head_objs, data, b, ways, chunk)
                unknown_all.append(b.is_unknown.cpu().numpy())
                support_rows.append(b.support.cpu().numpy().astype(np.int32))
                query_rows.append(b.query.cpu().numpy().astype(np.int32))
                cls_all.append(b.classes.cpu().numpy().astype(np.int32))
                open_all.append(b.open_classes.cpu().numpy().astype(np.int32))
                for spec, (logits, scores) in outs.items():
                    got = evaluate_batch(logits, scores, b.query_labels, ways, taus[spec], rules[spec])
                    for m in METRIC_KEYS:
                        per_ep[spec][m].append(got[m].cpu().numpy())
                    scores_all[spec].append(scores.float().cpu().numpy())
                bar.update(len(b))
            unknown = np.concatenate(unknown_all)
            episode_files[k] = dict(support=np.concatenate(support_rows), query=np.concatenate(query_rows),
                                    classes=np.concatenate(cls_all), open_classes=np.concatenate(open_all),
                                    query_labels=probe.query_labels[0].cpu().numpy().astype(np.int8))
            for spec in heads:
                entry: dict[str, Any] = {}
                for m in METRIC_KEYS:
                    values = np.concatenate(per_ep[spec][m]) * 100
                    finite = values[np.isfinite(values)]
                    mean, half = mean_ci95(finite) if finite.size else (float("nan"), float("nan"))
                    entry[m] = {"mean": mean, "ci95": half}
                entry["decision"] = _rule_text(rules[spec], taus[spec])
                entry["threshold"] = taus[spec]
                entry["episodes"] = episodes
                results[spec][f"{k}-shot"] = entry
                pooled[(spec, k)] = (np.concatenate(scores_all[spec]), unknown)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t_start

    config = {"store": str(store_path), "split": split, "ways": ways, "shots": list(shots), "open_ways": open_ways,
              "queries": queries, "episodes": episodes, "heads": list(heads), "seed": seed, "batch": batch,
              "device": str(dev), "chunk": min(chunk, batch), "views_per_support": vps, "store_views": n_views,
              "threshold": threshold,
              "train_split": train_split, "val_split": val_split}
    if ready:
        config["ready_heads"] = list(ready)
    metrics = {"unit": "percent", "heads": results, "metric_names": METRIC_NAMES,
               "f1_note": "f1_macro is the standard macro-F1 over all N+1 labels; f1_paper is the TANE/DNPG code's "
                          "F1, averaged only over labels that occur in the predictions",
               "notes": notes, "seconds": elapsed}
    rows_md = []
    for spec in heads:
        for k in shots:
            e = results[spec][f"{k}-shot"]
            rows_md.append({"head": spec, "shots": k, **{m: _fmt(e[m]["mean"], e[m]["ci95"]) for m in METRIC_KEYS},
                            "decision": e["decision"]})
    columns = {"head": "head", "shots": "K", "acc": "accuracy", "auroc": "AUROC", "f1_macro": "macro-F1 (N+1)",
               "f1_paper": "paper F1", "oscr": "OSCR", "aupr_out": "AUPR-out", "fpr95": "FPR@95",
               "decision": "F1 decision"}
    table = markdown_table(rows_md, columns)
    head_line = (f"{ways}-way {'/'.join(map(str, shots))}-shot, {open_ways} open classes, {queries} queries, "
                 f"{episodes} episodes on split {split!r} of {store.path} (seed {seed}, {vps} support views); "
                 f"mean ± 95% CI over episodes, in percent")
    if out is not None:
        out = Path(out)
        path = write_results(out, "fsor", config, metrics, store=store)
        md = ["# bench fsor", "", head_line, "", table,
              "- accuracy: argmax over the N known columns, on the known queries; AUROC: the head's open score, "
              "unknown positive.",
              "- macro-F1 (N+1): standard macro-F1 over all N + 1 labels (never-predicted labels score 0).",
              "- paper F1: the TANE / DNPG code's F1, macro-averaged only over labels that occur in the predictions "
              "(not comparable with the standard one).",
              "- F1 decision: `argmax` = (N+1)-way argmax of a head with an unknown column; `val` = open score above "
              "the 95th percentile of known validation queries' scores; `median` = above the episode's median.",
              *[f"- {n}" for n in notes], ""]
        _atomic_write(out / "results.md", lambda p: p.write_text("\n".join(md)))
        _atomic_write(out / "roc.png", lambda p: _plot_roc(p, pooled, heads, shots))
        for k, arrays in episode_files.items():
            _atomic_write(out / f"episodes_{k}shot.npz", lambda p, a=arrays: _savez(p, a))
        if echo:
            echo(f"{head_line}\n\n{table}\nwrote {path}, {out / 'results.md'} and {out / 'roc.png'}")
    elif echo:
        echo(f"{head_line}\n\n{table}")
    return metrics


def _savez(path: Path, arrays: dict) -> None:
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def _rule_text(rule: str, tau: float | None) -> str:
    if rule == "val":
        return f"val (threshold {tau:.4g})"
    return rule


def _calibrate(head, rule: str, store, val_rows, data: _Data, ways: int, shots: int, queries: int, open_ways: int,
               seed: int, n_views: int, vps: int, episodes: int, batch: int, chunk: int, val_split: str,
               notes: list[str]):
    """(rule, tau) for a head without an unknown column: tau = 95th percentile of known val queries' scores."""
    if rule == "median" or val_rows is None:
        if rule == "auto":
            msg = f"no split {val_split!r}: the F1 decision of N-column heads uses the per-episode median rule"
            if msg not in notes:
                notes.append(msg)
        return "median", None
    try:
        sampler = EpisodeSampler(store.labels, val_rows, ways=ways, shots=shots, queries=queries, open_ways=open_ways,
                                 seed=seed, n_views=n_views, views_per_support=vps, name=f"split {val_split!r}",
                                 class_names=store.classes)
    except UserError as exc:
        if rule == "val":
            raise
        notes.append(f"split {val_split!r} cannot give {shots}-shot episodes ({exc}); median rule used")
        return "median", None
    known_scores = []
    for b in sampler.batches(min(CALIBRATION_EPISODES, episodes), batch):
        b = b.to(data.device)
        _, scores = run_heads_chunked({"h": head}, data, b, ways, chunk)["h"]
        known_scores.append(scores[~b.is_unknown.to(scores.device)].double().cpu())
    tau = float(torch.quantile(torch.cat(known_scores), 0.95))
    return "val", tau


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _plot_roc(path: Path, pooled: dict, heads: Sequence[str], shots: Sequence[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shots), figsize=(5.2 * len(shots), 5.0), squeeze=False)
    for ax, k in zip(axes[0], shots):
        for spec in heads:
            scores, unknown = pooled[(spec, k)]
            s, u = scores.reshape(-1), unknown.reshape(-1)
            fpr, tpr = M.roc_points(s, u)
            if len(fpr) > 4000:  # thin the curve for the plot only
                idx = np.unique(np.linspace(0, len(fpr) - 1, 4000).astype(int))
                fpr, tpr = fpr[idx], tpr[idx]
            area = M.auroc(s, u)
            ax.plot(fpr, tpr, lw=1.5, label=f"{spec} ({100 * area:.1f})")
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        ax.set_title(f"{k}-shot, all episodes pooled", fontsize=10)
        ax.set_xlabel("FPR (knowns flagged unknown)")
        ax.set_ylabel("TPR (unknowns detected)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.legend(loc="lower right", fontsize=7, title="head (pooled AUROC, %)", title_fontsize=7)
    fig.suptitle("FSOR: ROC of the open score (unknown = positive)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- speed
SPEED_KEYS = ("acc", "auroc", "f1_macro", "f1_paper")


def vectorised_protonet(features: torch.Tensor, sampler: EpisodeSampler, episodes: int, batch: int = 500,
                        chunk: int | None = None, metric: str = "euclidean") -> dict[str, np.ndarray]:
    """Per-episode accuracy, AUROC and both F1s (per-episode median decision) of ProtoNet (``msp`` score) on
    episodes 0..episodes-1: the bench's own code path (batched sampling, chunked gather, batched head and
    metrics)."""
    from heads.protonet import ProtoNet

    head = ProtoNet(metric=metric, open_score="msp", device=features.device)
    data = _Data(None, None, 0, features.device, features=features)
    chunk = default_chunk(features.device) if chunk is None else chunk
    out: dict[str, list] = {k: [] for k in SPEED_KEYS}
    for b in sampler.batches(episodes, batch):
        logits, scores = run_heads_chunked({"p": head}, data, b, sampler.ways, chunk)["p"]
        got = evaluate_batch(logits, scores, b.query_labels, sampler.ways, None, "median", keys=SPEED_KEYS)
        for k in SPEED_KEYS:
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


def _synthetic_fsor_store(path: Path, n_classes: int = 20, per_class: int = 600, dim: int = 640, seed: int = 0,
                          separation: float = 0.5, scale: float = 0.05):
    """A store shaped like miniImageNet's test split (20 x 600 x 640, float16), clustered, with split 'test'."""
    from featstore.store import FeatureStore, Layout

    rng = np.random.default_rng(seed)
    n = n_classes * per_class
    centres = rng.standard_normal((n_classes, dim)).astype(np.float32) * separation
    labels = np.repeat(np.arange(n_classes), per_class)
    # Noise 1.5 per dimension, centres `separation` apart per dimension: 1-shot ProtoNet accuracy about 65%;
    # `scale` keeps squared distances O(1) so that the softmax does not saturate (no ties in the msp score).
    x = np.maximum(centres[labels] + rng.standard_normal((n, dim)).astype(np.float32) * 1.5, 0) * scale
    layout = Layout(n=n, dim=dim, dtype="float16", chunk_rows=4096)
    store = FeatureStore.create(path, layout, fingerprint={"bench": "fsor-synthetic", "seed": seed},
                                classes=[f"class{c}" for c in range(n_classes)], labels=labels,
                                ids=[f"s{i}" for i in range(n)], splits={"test": np.arange(n)})
    try:
        for i in range(store.n_chunks):
            lo, hi = store.chunk_range(i)
            store.write_chunk(i, x[lo:hi])
    finally:
        store.close()
    return FeatureStore.open(path)


def perf_fsor_section(args) -> list[dict]:
    """``bench perf`` section "fsor": 3000 ProtoNet episodes (5-way 1-shot, 5 open, 15 queries) vectorised against a
    per-episode Python loop on the same episodes; target: at least 20x. ``args`` is a ``bench.perf.PerfArgs``
    (uses store, workdir, seed, quick, dim). Without ``--store`` a synthetic 20 x 600 x 640 store (``--dim``
    changes the width) is built in a temporary folder and removed. ``--quick``: 300 episodes.

    Two references, both drawing the same episodes with the same batched sampler: a per-episode loop with the
    FSOR papers' metric calls (scikit-learn roc_auc_score / f1_score per episode; the target row) and a lean
    per-episode numpy loop (context). On a CPU the lean loop is bound by the same per-episode feature gather as
    the vectorised path, so its ratio is far smaller (about 4x on 2 cores at 640 dims)."""
    import shutil

    from bench.perf import make_row
    from bench.report import timer, timer_interleaved
    from featstore.store import FeatureStore

    S = "fsor"
    quick = bool(getattr(args, "quick", False))
    seed = int(getattr(args, "seed", 0))
    episodes = 300 if quick else 3000
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
            store = _synthetic_fsor_store(tmp / "fsor.zarr", seed=seed, dim=dim)
            rows = store.split("test")
            source = f"SYNTHETIC store, 20 classes x 600 rows x {dim} dims (miniImageNet test shape at 640)"
        sampler = EpisodeSampler(store.labels, rows, ways=5, shots=1, queries=15, open_ways=5, seed=seed,
                                 drop_small=True, name="the perf store")
        x = store.load_features()
        feats = torch.from_numpy(x)
        dim = x.shape[1]
        if hasattr(args, "notes"):
            args.notes.append(f"fsor: {episodes} episodes 5-way 1-shot + 5 open x 15 queries, {source}; "
                              f"batch 500; sampling included in both timings")
        vectorised_protonet(feats, sampler, 100)  # warm-up (allocator, thread pool)
        t = timer_interleaved({
            "vectorised": lambda: vectorised_protonet(feats, sampler, episodes),
            "loop": lambda: loop_protonet_reference(x, sampler, episodes, metrics="numpy"),
            "loop_sklearn": lambda: loop_protonet_reference(x, sampler, episodes, metrics="sklearn"),
        }, repeats=1 if quick else 2, warmup=0)
        vec = t["vectorised"]
        # Agreement: float32 (torch, batched) and float32 (numpy, per episode) round differently, so a query whose
        # two best distances nearly tie may flip in a few episodes; the means agree.
        same = {}
        for name in ("loop", "loop_sklearn"):
            differ = np.zeros(episodes, dtype=bool)
            gap = 0.0
            for k in SPEED_KEYS:
                differ |= ~np.isclose(vec.result[k], t[name].result[k], atol=1e-6)
                gap = max(gap, abs(float(vec.result[k].mean() - t[name].result[k].mean())))
            same[name] = (f"results agree (largest difference of a mean {gap:.1e}; {int(differ.sum())} of "
                          f"{episodes} episodes differ by float rounding)" if gap < 1e-3 else
                          f"results DIFFER (largest difference of a mean {gap:.1e})")
        ts = timer(lambda: [b for b in sampler.batches(episodes, 500)], repeats=3, warmup=1)
        what = f"{episodes:,} ProtoNet episodes (5-way 1-shot, 5 open x 15 queries, {dim}-d; acc, AUROC, 2 F1s)"
        rows = []
        for name, ref_name, target in (
                ("loop_sklearn", "per-episode loop, numpy head + scikit-learn metrics (as the papers' scripts)",
                 ">= 20"),
                ("loop", "per-episode loop, lean numpy head and metrics", None)):
            ratio = t[name].best / vec.best
            rows.append(make_row(S, f"{what}: vectorised", vec.best, reference=t[name].best,
                                 reference_name=ref_name + ", same episodes", ratio=ratio,
                                 ratio_is="loop / vectorised", target=target,
                                 passed=None if target is None else ratio >= 20, quick=quick,
                                 note=f"{episodes / vec.best:,.0f} episodes/s vectorised, "
                                      f"{episodes / t[name].best:,.0f} looped; {same[name]}"
                                      + ("" if target else "; context: both are bound by the same feature gather")))
        rows.append(make_row(S, f"sample {episodes:,} episodes (index tensors only)", ts.best, reference=vec.best,
                             reference_name="vectorised episodes", ratio=ts.best / vec.best,
                             ratio_is="sampling / total", quick=quick, note="context"))
        return rows
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- command
def _shots(ctx, param, value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 1,5, not {value!r}") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"expected positive integers such as 1,5, not {value!r}")
    return out


@click.command("fsor")
@click.option("--store", "store", required=True, type=click.Path(), help="The feature store.")
@click.option("--split", default="test", show_default=True, help="Split the test episodes are drawn from.")
@click.option("--ways", type=int, default=5, show_default=True, help="Known classes per episode (N).")
@click.option("--shots", default="1,5", show_default=True, callback=_shots, help="Comma-separated K values.")
@click.option("--open-ways", type=int, default=5, show_default=True, help="Unknown classes per episode (M).")
@click.option("--queries", type=int, default=15, show_default=True, help="Queries per class (known and unknown).")
@click.option("--episodes", type=int, default=3000, show_default=True, help="Test episodes per shot setting.")
@click.option("--head", "heads", multiple=True, default=("protonet",), show_default=True,
              help="Head name, or name:key=value,... (repeat for several heads).")
@click.option("--seed", type=int, default=0, show_default=True, help="Protocol seed: episode i = f(seed, i).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Write results.json, results.md, roc.png and the episode lists into this folder.")
@click.option("--batch", type=int, default=500, show_default=True, help="Episodes per tensor batch.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--views-per-support", type=int, default=None,
              help="Cached views averaged per support image [default: 5 when the store has views, else 0].")
@click.option("--threshold", type=click.Choice(THRESHOLD_RULES), default="auto", show_default=True,
              help="F1 decision of heads without an unknown column: val = 95% of known val queries accepted, "
                   "median = per-episode median, auto = val if the store has a val split.")
@click.option("--train-split", default="train", show_default=True, help="Split for meta-training heads.")
@click.option("--val-split", default="val", show_default=True, help="Split for model selection and thresholds.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def fsor_command(store, split, ways, shots, open_ways, queries, episodes, heads, seed, out, batch, device,
                 views_per_support, threshold, train_split, val_split, quiet) -> None:
    """Few-shot open-set recognition: N-way K-shot episodes with M unknown classes, per-episode accuracy,
    AUROC and F1 (standard and the papers' variant), mean and 95% CI."""
    run_fsor(store, split=split, ways=ways, shots=shots, open_ways=open_ways, queries=queries, episodes=episodes,
             heads=heads, seed=seed, batch=batch, device=device, out=out, views_per_support=views_per_support,
             threshold=threshold, train_split=train_split, val_split=val_split, quiet=quiet, echo=click.echo)


if __name__ == "__main__":
    from featstore.cli_support import run_cli

    run_cli(fsor_command, "bench fsor")

"""``bench lowshot``: the low-shot benchmark of Hariharan & Girshick (ICCV 2017) on any feature store.

The protocol, generalised from ImageNet-1k to any store (:mod:`bench.lowshot_splits` builds the sets):

- **Classes.** Base and novel classes, each cut in two halves: setup ``val`` = base_1 + novel_1 (tune here),
  setup ``test`` = base_2 + novel_2 (report these). Taken from, in this order: ``--label-idx label_idx.json`` (the
  original ``base_classes_1/2`` and ``novel_classes_1/2``); ``--base-classes`` / ``--novel-classes`` (a class split
  of the store, or a sample split whose classes are taken, halved with the seed); the store's class splits
  ``base_1, base_2, novel_1, novel_2`` (imagenet-lowshot stores) or ``base`` / ``novel``; the classes the backbone
  was trained on (``provenance["checkpoint_classes"]``) as base; else half the classes drawn with the seed.
  Novel classes the backbone was trained on are refused. The classifier spans **all** classes of the store.
- **Samples.** Training candidates and test images come from disjoint sample subsets: ``--train-split`` /
  ``--test-split`` (store splits), ``--train-rule "drawer<=16"`` / ``--test-rule "drawer>=17"`` (per-sample meta),
  ``--test-store`` (a second store, e.g. ImageNet val beside the train list), or by default a seeded per-class
  holdout of ``--test-fraction`` of every class as test images.
- **Experiments.** ``splitfile_{e}.json`` fixes the n examples per novel class of experiment e, nested in n
  (1 within 2 within 5 within 10 within 20); the original files are read verbatim, missing ones generated.
- **Runs.** For every head, every experiment and every n (``--shots``): train on all training rows of the setup's
  base classes plus the n examples per novel class, score the setup's test images over all classes, and record
  top-1 / top-5 on novel, base and all (image-weighted over base + novel). Mean and 95% CI over experiments per n.

Heads: ``--head NAME`` (repeatable) names an adapter of :data:`ADAPTERS` (``logreg``: the paper's baseline;
``analogy``: analogy hallucination + logreg; ``matching``: matching networks), each driving registered heads
(:mod:`bench.lowshot_adapter`). The classifier options (``--lr``, ``--weight-decay``, ``--iterations``...) and
``--head-option [NAME.]KEY=VALUE`` reach the adapters that take them; an option no chosen head takes is an error.
What a head's ``prepare`` trains is cached in the store (:mod:`bench.head_cache`). All (experiment, n) runs of a
head happen in one process; the logreg head trains them as one batched program. Hyper-parameters default to the
paper's per-representation values (:func:`bench.lowshot_adapter.default_hparams`).

Outputs in ``--out`` (:mod:`bench.lowshot_report`, written by :func:`bench.report.write_results`):
``results.json``, ``lowshot.md`` (the paper's layout: rows = head, columns = n, novel top-5 first; top-1 first below 50
classes, :func:`bench.lowshot_report.lead_metrics`),
``lowshot_novel_top5.png``, ``protocol.json`` and the generated split files.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import click
import numpy as np

from bench.head_cache import HeadCache
from bench.kit import check_head_options, head_options_for, parse_head_options, parse_shots
from bench.lowshot_adapter import SETUPS, LowShotContext, LowShotMethod, LowShotRun, default_hparams, run_seed
from bench.lowshot_analogy import AnalogyLogRegMethod
from bench.lowshot_logreg import LogRegMethod
from bench.lowshot_matching import MatchingMethod
from bench.lowshot_report import markdown_report, plot_novel_top5, summarise
from bench.lowshot_splits import (
    DEFAULT_TEST_FRACTION,
    build_protocol,
    check_store,
    check_test_store,
    trailing_zero_rows,
)
from featstore.errors import UserError
from featstore.rules import rule_mask
from featstore.runtime import check_threads, chosen_threads, progress_bar, resolve_device, thread_limits

__all__ = ["ADAPTERS", "ALIASES", "LowShotConfig", "LowShotMethod", "LowShotRun", "LowShotContext", "run_lowshot",
           "build_protocol", "check_store", "trailing_zero_rows", "rule_mask", "topk_hits", "subset_accuracies",
           "resolve_method", "method_options", "make_method", "lowshot_command"]

#: ``--head`` names and the adapters they run; the one table of the protocol's heads
ADAPTERS: dict[str, type[LowShotMethod]] = {
    "logreg": LogRegMethod,
    "analogy": AnalogyLogRegMethod,
    "matching": MatchingMethod,
}
ALIASES = {"mn": "matching", "matching-network": "matching", "analogy+logreg": "analogy",
           "analogy-logreg": "analogy", "linear": "logreg"}

#: the classifier options of the command line: config field -> its flag (what the logreg-based heads take)
CLASSIFIER_OPTIONS = {"lr": "--lr", "wd": "--weight-decay", "momentum": "--momentum", "dampening": "--dampening",
                      "iterations": "--iterations", "batch_size": "--batch-size", "solver": "--solver",
                      "precision": "--precision", "share_base_batches": "--independent-base-batches",
                      "max_problems": "--max-problems", "max_per_label": "--max-per-label"}


# ================================================================================================== metrics
def topk_hits(logits, labels, ks: Sequence[int] = (1, 5)) -> np.ndarray:
    """``[len(ks), m]`` bool: is the label among the k highest scores (k capped at C), per test image.

    (Per-image hits are needed to average over the novel / base / all subsets; bench.metrics' ``topk_accuracy``
    gives the averages of the same hits.)
    """
    import torch

    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels, device=logits.device).long()
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices                        # [m, kmax]
    match = top == labels[:, None]
    return np.stack([match[:, : min(k, kmax)].any(dim=1).cpu().numpy() for k in ks])


def subset_accuracies(hits: np.ndarray, labels: np.ndarray, base: Sequence[int], novel: Sequence[int]) -> dict:
    """The paper's 6-vector in percent from ``topk_hits(..., ks=(1, 5))``: novel, base and all (image-weighted
    over the test images of base + novel classes; images of other classes are ignored)."""
    is_novel = np.isin(labels, np.asarray(novel, dtype=np.int64))
    is_base = np.isin(labels, np.asarray(base, dtype=np.int64))
    is_all = is_novel | is_base
    out = {}
    for part, mask in (("novel", is_novel), ("base", is_base), ("all", is_all)):
        for i, k in enumerate((1, 5)):
            out[f"{part}_top{k}"] = 100.0 * float(hits[i][mask].mean()) if mask.any() else float("nan")
    return out


def novel_as_base(logits, labels: np.ndarray, base: Sequence[int], novel: Sequence[int]) -> float:
    """Percent of the test images of novel classes whose top-1 class is a base class (why a head's novel accuracy
    may not climb with n: its base classes win whatever the novel examples)."""
    import torch

    is_novel = np.isin(labels, np.asarray(novel, dtype=np.int64))
    if not is_novel.any():
        return float("nan")
    pred = torch.as_tensor(logits).argmax(dim=1).cpu().numpy()
    return 100.0 * float(np.isin(pred[is_novel], np.asarray(base, dtype=np.int64)).mean())


# ================================================================================================== configuration
@dataclass
class LowShotConfig:
    store: str
    out: str
    heads: tuple[str, ...] = ("logreg",)
    n: str | Sequence[int] = "1..20"
    experiments: int = 5
    setup: str = "test"
    test_store: str | None = None
    train_split: str | None = None
    test_split: str | None = None
    train_rule: str | None = None
    test_rule: str | None = None
    test_fraction: float | None = None
    label_idx: str | None = None
    base_classes: str | None = None
    novel_classes: str | None = None
    splitfile_dir: str | None = None
    seed: int = 0
    iterations: int = 10_000
    batch_size: int = 1000
    lr: float | None = None
    wd: float | None = None
    momentum: float = 0.9
    dampening: float = 0.9
    solver: str = "sgd"
    share_base_batches: bool = True
    precision: str = "fp32"
    max_problems: int | None = None
    max_per_label: int | None = None
    head_options: tuple[str, ...] = ()
    device: str = "cpu"
    threads: int | None = None
    allow_seen_novel: bool = False
    quiet: bool = False
    #: the classifier options given explicitly (field names of CLASSIFIER_OPTIONS); None: those that differ
    #: from their defaults
    given: tuple[str, ...] | None = None

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("given")
        d["heads"] = list(self.heads)
        d["head_options"] = list(self.head_options)
        return d

    def given_options(self) -> list[str]:
        if self.given is not None:
            return [f for f in CLASSIFIER_OPTIONS if f in self.given]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return [f for f in CLASSIFIER_OPTIONS if getattr(self, f) != defaults[f]]


# ================================================================================================== heads
def resolve_method(name: str) -> type[LowShotMethod]:
    """The adapter of ``--head name`` (or an alias: mn -> matching, analogy+logreg -> analogy); UserError listing
    the known names otherwise."""
    key = ALIASES.get(name, name)
    if key not in ADAPTERS:
        raise UserError(f"unknown head {name!r} for bench lowshot; known: {', '.join(sorted(ADAPTERS))} (aliases: "
                        f"{', '.join(f'{a} = {t}' for a, t in ALIASES.items())})")
    return ADAPTERS[key]


def _canonical(name: str) -> str:
    return ALIASES.get(name, name)


def method_options(cfg: LowShotConfig, method_cls: type[LowShotMethod], table: dict, name: str | None = None
                   ) -> dict:
    """Constructor options of one head: its per-representation defaults (the original README's values), the
    classifier options given on the command line that it takes, then the --head-option values it takes
    (``KEY=VALUE`` for every head that takes KEY, ``NAME.KEY=VALUE`` for head ``name`` only) and the run's
    device."""
    accepted = method_cls.options()
    opts = {k: v for k, v in method_cls.defaults(table).items() if k in accepted}
    for field in cfg.given_options():
        if field in accepted:
            opts[field] = getattr(cfg, field)
    if "device" in accepted:
        opts["device"] = cfg.device
    opts.update(head_options_for(name or method_cls.name, parse_head_options(cfg.head_options), accepted,
                                 ALIASES))
    return opts


def make_method(name: str, options: dict) -> LowShotMethod:
    """The adapter of ``name`` built with ``options`` (all must be among its :meth:`LowShotMethod.options`)."""
    cls = resolve_method(name)
    method = cls(**options)
    method.name = _canonical(name)
    return method


def _check_options(cfg: LowShotConfig) -> None:
    """Refuse a classifier option or a --head-option that none of the chosen heads takes (one line)."""
    names = [_canonical(h) for h in cfg.heads]
    accepted = {h: resolve_method(h).options() for h in names}
    takes = "; ".join(f"{h} takes {', '.join(accepted[h]) or 'no options'}" for h in dict.fromkeys(names))
    for field in cfg.given_options():
        if not any(field in accepted[h] for h in names):
            raise UserError(f"{CLASSIFIER_OPTIONS[field]} was given, but none of the heads {', '.join(cfg.heads)} "
                            f"takes it ({takes})")
    check_head_options(cfg.heads, parse_head_options(cfg.head_options), accepted, ALIASES)


def _given_head_options(items: Sequence[str]) -> dict:
    """The --head-option values as results.json records them: {"KEY" | "NAME.KEY": value}."""
    return {(key if head == "*" else f"{head}.{key}"): value
            for head, values in parse_head_options(items).items() for key, value in values.items()}


# ================================================================================================== the run
def check_config(cfg: LowShotConfig) -> list[int]:
    """Every option of ``cfg`` checked (one-line UserErrors); returns the sorted n values of --shots."""
    ns = parse_shots(cfg.n, "--shots")
    if cfg.setup not in SETUPS:
        raise UserError(f"--setup must be one of {', '.join(SETUPS)}, not {cfg.setup!r}")
    if cfg.experiments < 1:
        raise UserError(f"--experiments must be at least 1, not {cfg.experiments}")
    if cfg.iterations < 1 or cfg.batch_size < 2:
        raise UserError(f"--iterations must be >= 1 and --batch-size >= 2 (got {cfg.iterations}, {cfg.batch_size})")
    if (cfg.lr is not None and cfg.lr <= 0) or (cfg.wd is not None and cfg.wd < 0):
        raise UserError("--lr must be positive and --weight-decay non-negative")
    if not 0 <= cfg.momentum < 1 or not 0 <= cfg.dampening <= 1:
        raise UserError("--momentum must lie in [0, 1) and --dampening in [0, 1]")
    if cfg.solver not in ("sgd", "lbfgs"):
        raise UserError(f"--solver must be sgd or lbfgs, not {cfg.solver!r}")
    if cfg.precision not in ("fp32", "bf16"):
        raise UserError(f"--precision must be fp32 or bf16, not {cfg.precision!r}")
    if not cfg.heads:
        raise UserError("give at least one --head")
    if cfg.max_per_label is not None and cfg.max_per_label < 0:
        raise UserError(f"--max-per-label must be 0 (no generation) or more, not {cfg.max_per_label}")
    if cfg.max_problems is not None and cfg.max_problems < 1:
        raise UserError("--max-problems must be at least 1")
    check_threads(cfg.threads)
    _check_options(cfg)
    resolve_device(cfg.device)
    return ns


def run_lowshot(cfg: LowShotConfig, echo: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark; write results.json, lowshot.md and the PNG into ``cfg.out``; return the metrics."""
    ns = check_config(cfg)
    threads = chosen_threads(cfg.threads, lowshot_work(cfg, ns))
    # torch, numpy's BLAS (the CPU products of the logreg head) and FAISS: --threads, else one thread for small
    # problems (featstore.runtime.default_threads); the analogy generator's training runs under the same setting
    with thread_limits(threads):
        return _run_lowshot(cfg, ns, echo or (lambda msg: None), threads)


def lowshot_work(cfg: LowShotConfig, ns: Sequence[int]) -> float:
    """Multiply-adds of the largest matrix product of one step of the run (what
    :func:`featstore.runtime.default_threads` sizes the thread pools by): the logreg heads' logits of a batch for
    all classifiers trained together, ``rows x d x (P x C)`` (rows = the batch for SGD, a block of the base pool
    for L-BFGS), or the analogy generator's hidden layer (batch 128 x d x 512), whichever is larger."""
    from featstore.store import FeatureStore

    store = FeatureStore.open(cfg.store)
    d, C = int(store.dim), len(store.classes)
    P = cfg.experiments * len(ns)
    if cfg.max_problems:
        P = min(P, cfg.max_problems)
    rows = cfg.batch_size if cfg.solver == "sgd" else min(8192, store.n)
    return float(max(rows * d * P * C, 128 * d * 512))


def _run_lowshot(cfg: LowShotConfig, ns: list[int], say: Callable[[str], None], threads: int | None = None
                 ) -> dict:
    import torch

    from bench.report import mean_ci95, write_results
    from featstore.store import FeatureStore

    t_start = time.perf_counter()
    device = str(resolve_device(cfg.device))
    store = FeatureStore.open(cfg.store)
    check_store(store, "store")
    test_store = store
    if cfg.test_store:
        test_store = FeatureStore.open(cfg.test_store)
        check_store(test_store, "test store")
        check_test_store(store, test_store)
    table = default_hparams(store)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    protocol = build_protocol(cfg, store, test_store, ns)
    for note in protocol.notes:
        say(f"note: {note}")
    base, novel = protocol.classes.for_setup(cfg.setup)
    C = len(store.classes)
    labels = store.labels

    t_load = time.perf_counter()
    X = store.load_features(dtype="float32")
    setup_classes = np.asarray(sorted(base + novel), dtype=np.int64)
    test_rows = protocol.test_rows[np.isin(test_store.labels[protocol.test_rows], setup_classes)]
    if not len(test_rows):
        raise UserError("no test images of the setup's classes in the test subset; check --test-split / "
                        "--test-rule")
    x_test = X[test_rows] if test_store is store else test_store.load_features(test_rows, dtype="float32")
    y_test = test_store.labels[test_rows]
    n_test_novel = int(np.isin(y_test, novel).sum())
    n_test_base = int(np.isin(y_test, base).sum())
    if not n_test_novel or not n_test_base:
        raise UserError(f"the test subset has {n_test_novel} images of novel and {n_test_base} of base classes of "
                        f"setup {cfg.setup!r}; both must be present")
    train_labels = labels[protocol.train_rows]
    base_rows = protocol.train_rows[np.isin(train_labels, base)]
    prep_rows = protocol.train_rows[np.isin(train_labels, protocol.classes.all_base)]
    t_load = time.perf_counter() - t_load

    runs_spec = [(e, n) for e in range(1, cfg.experiments + 1) for n in ns]
    head_cache = HeadCache(store, out)
    novel_arr = np.asarray(novel, dtype=np.int64)
    records: list[dict] = []
    method_info: dict[str, dict] = {}
    say(f"bench lowshot: setup {cfg.setup}: {len(base)} base / {len(novel)} novel classes (of {C}), "
        f"{len(base_rows):,} base training rows, {len(test_rows):,} test images; n = {', '.join(map(str, ns))}; "
        f"{cfg.experiments} experiment(s); head(s) {', '.join(cfg.heads)}")
    run_cfg = dataclasses.replace(cfg, device=device)
    for head_name in cfg.heads:
        t0 = time.perf_counter()
        name = _canonical(head_name)
        method = make_method(name, method_options(run_cfg, resolve_method(name), table, name))
        method.context = LowShotContext(store=store, out=out, setup=cfg.setup, num_classes=C,
                                        class_names=list(store.classes), seed=cfg.seed, device=device,
                                        all_base_classes=protocol.classes.all_base, quiet=cfg.quiet,
                                        cache=head_cache)
        runs = []
        for e, n in runs_spec:
            sf = protocol.splitfiles[e - 1]
            rows = np.sort(np.concatenate([sf[c][:n] for c in novel_arr]))
            runs.append(LowShotRun(e, n, torch.from_numpy(X[rows]), torch.from_numpy(labels[rows]), rows,
                                   run_seed(cfg.seed, cfg.setup, e, n, name)))
        try:
            t_prep = time.perf_counter()
            method.prepare(torch.from_numpy(X[prep_rows]), torch.from_numpy(labels[prep_rows]),
                           protocol.classes.all_base, cfg.seed)
            t_prep = time.perf_counter() - t_prep
            method.setup(torch.from_numpy(X[base_rows]), torch.from_numpy(labels[base_rows]), base, novel, C,
                         cfg.seed)
            with progress_bar(method.work_units(runs), f"lowshot {name}", quiet=cfg.quiet) as bar:
                method.progress = bar.update
                for run, scores in zip(runs, method.scores_many(runs, torch.from_numpy(x_test))):
                    scores = torch.as_tensor(scores)
                    if scores.shape != (len(test_rows), C):
                        raise UserError(f"head {name!r} returned scores of shape {tuple(scores.shape)}; expected "
                                        f"[{len(test_rows)}, {C}] (test images x all classes)")
                    hits = topk_hits(scores, y_test, ks=(1, 5))
                    acc = subset_accuracies(hits, y_test, base, novel)
                    acc["novel_as_base"] = novel_as_base(scores, y_test, base, novel)
                    records.append({"method": name, "setup": cfg.setup, "experiment": run.experiment, "n": run.n,
                                    "seed": run.seed, "novel_train_images": int(len(run.rows)), **acc})
        except (ValueError, FloatingPointError) as exc:
            raise UserError(f"head {name!r}: {' '.join(str(exc).split())}") from None
        method_info[name] = {"hparams": method.describe(), "seconds": time.perf_counter() - t0,
                             "prepare_seconds": t_prep}
        say(f"  {name}: {len(runs)} runs in {method_info[name]['seconds']:.1f} s")

    summary = summarise(records, ns, mean_ci95)
    metrics = {
        "unit": "percent",
        "summary": summary,
        "runs": records,
        "protocol": {
            "setup": cfg.setup,
            "classes": {"request": protocol.classes.request, **protocol.classes.lists(),
                        "setup_base": base, "setup_novel": novel, "num_classes": C},
            "samples": protocol.samples,
            "n_train_rows": int(len(protocol.train_rows)), "n_base_rows": int(len(base_rows)),
            "n_test_images": int(len(test_rows)), "n_test_novel": n_test_novel, "n_test_base": n_test_base,
            "batch": {"size": cfg.batch_size, "base_rows": _base_rows(cfg.batch_size, len(base), len(novel))},
            "splitfiles": protocol.splitfile_info, "protocol_seed": protocol.seed, "n": ns,
            "experiments": cfg.experiments, "test_store": cfg.test_store,
        },
        "hparams": {"table_7_6": table, "given": {"lr": cfg.lr, "wd": cfg.wd,
                                                  "head_options": _given_head_options(cfg.head_options)}},
        "methods": method_info,
        "notes": protocol.notes + head_cache.notes
        + ["95% CI: Student t over experiments (an extension; the paper reports means)"],
        "seconds": {"total": time.perf_counter() - t_start, "load": t_load},
        "threads": threads,
    }
    title = f"{Path(cfg.store).name}: setup {cfg.setup}, {cfg.experiments} experiment(s), 95% CI"
    write_results(out, "lowshot", cfg.to_json(), metrics, store=store, markdown=markdown_report(cfg, metrics, ns),
                  plots={"lowshot_novel_top5.png": lambda path: plot_novel_top5(path, metrics, ns, title)})
    say(f"wrote {out / 'results.json'}, {out / 'lowshot.md'} and {out / 'lowshot_novel_top5.png'}")
    return metrics


def _base_rows(batch: int, nb: int, nn: int) -> int:
    from heads.logreg import base_rows_per_batch

    return base_rows_per_batch(batch, nb, nn)


# ================================================================================================== CLI
#: command-line parameter -> LowShotConfig field, for the classifier options whose explicit use is checked
_CLASSIFIER_PARAMS = {"lr": "lr", "wd": "wd", "momentum": "momentum", "dampening": "dampening",
                      "iterations": "iterations", "batch_size": "batch_size", "solver": "solver",
                      "precision": "precision", "independent_base_batches": "share_base_batches",
                      "max_problems": "max_problems", "max_per_label": "max_per_label"}


def _explicit(ctx: click.Context) -> tuple[str, ...]:
    from click.core import ParameterSource

    return tuple(field for param, field in _CLASSIFIER_PARAMS.items()
                 if ctx.get_parameter_source(param) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT))


@click.command("lowshot", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", required=True, type=click.Path(), help="The feature store (training candidates).")
@click.option("--shots", "--n", "n_spec", default="1..20", show_default=True,
              help="Examples per novel class (n): 1..20 = the canonical 1, 2, 5, 10, 20; or a list such as 1,3,7. "
                   "--n is the same option.")
@click.option("--head", "heads", multiple=True, default=("logreg",), show_default=True,
              help=f"Low-shot head(s), repeatable: {', '.join(ADAPTERS)} (aliases: {', '.join(ALIASES)}).")
@click.option("--experiments", type=int, default=5, show_default=True, help="Split files 1..E (experiments).")
@click.option("--setup", type=click.Choice(SETUPS), default="test", show_default=True,
              help="test = base_2 + novel_2 (report), val = base_1 + novel_1 (tune), all = both halves.")
@click.option("--train-split", default=None, help="Store split holding the training candidates.")
@click.option("--test-split", default=None, help="Store split holding the test images.")
@click.option("--train-rule", default=None, help='Per-sample meta rule for training rows, e.g. "drawer<=16".')
@click.option("--test-rule", default=None, help='Per-sample meta rule for test rows, e.g. "drawer>=17".')
@click.option("--test-fraction", type=float, default=None,
              help=f"Default subsets: a seeded per-class holdout of this fraction as test images "
                   f"[default: {DEFAULT_TEST_FRACTION}].")
@click.option("--test-store", default=None, type=click.Path(),
              help="A second store with the test images (e.g. ImageNet val beside the train list).")
@click.option("--label-idx", default=None, type=click.Path(),
              help="The original label_idx.json (base_classes_1/2, novel_classes_1/2).")
@click.option("--base-classes", default=None,
              help="Class split (or sample split) of the store naming the base classes.")
@click.option("--novel-classes", default=None, help="Class split (or sample split) naming the novel classes.")
@click.option("--splitfile-dir", default=None, type=click.Path(),
              help="Folder with splitfile_1..E.json (the original ones are read verbatim) [default: --out].")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Results folder.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--iterations", type=int, default=10_000, show_default=True,
              help="SGD iterations per classifier (logreg, analogy).")
@click.option("--batch-size", type=int, default=1000, show_default=True,
              help="SGD batch size of the classifier (logreg, analogy).")
@click.option("--lr", type=float, default=None,
              help="Learning rate (logreg, analogy) [default: the original README's value for the representation].")
@click.option("--weight-decay", "--wd", "wd", type=float, default=None,
              help="Weight decay (logreg, analogy) [default: the original README's value for the representation]; "
                   "--wd is the same option.")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="(logreg, analogy)")
@click.option("--dampening", type=float, default=0.9, show_default=True,
              help="0.9 as the original; 0 = standard momentum (then divide lr by 10). (logreg, analogy)")
@click.option("--solver", type=click.Choice(["sgd", "lbfgs"]), default="sgd", show_default=True,
              help="sgd = the paper; lbfgs = full-batch minimiser of the same objective. (logreg, analogy)")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: SGD matrix products in bfloat16 (float32 weights and updates); faster on GPUs and AMX "
                   "CPUs. (logreg, analogy)")
@click.option("--independent-base-batches", is_flag=True,
              help="Give every classifier its own base batches (default: the runs of a setup share them). "
                   "(logreg, analogy)")
@click.option("--head-option", "head_options", multiple=True,
              help="NAME.KEY=VALUE for one head, KEY=VALUE for every head that takes KEY; repeatable "
                   "(e.g. analogy.max_per_label=5, matching.episodes=2000).")
@click.option("--max-per-label", type=int, default=None,
              help="Generation heads (analogy): pad every novel class to this many examples [default: the original "
                   "README's value for the representation: 20 baseline, 5 SGM].")
@click.option("--max-problems", type=int, default=None,
              help="Classifiers trained together at most (logreg, analogy) [default: all].")
@click.option("--allow-seen-novel", is_flag=True, help="Allow novel classes the backbone was trained on.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--threads", type=int, default=None,
              help="CPU threads for torch, numpy's BLAS and FAISS [default: 1 when the largest matrix product of a "
                   "step is below 1e8 multiply-adds (small stores, few classes), else all usable cores].")
@click.option("--quiet", is_flag=True, help="No progress bar or messages.")
@click.pass_context
def lowshot_command(ctx, store, n_spec, heads, experiments, setup, train_split, test_split, train_rule, test_rule,
                    test_fraction, test_store, label_idx, base_classes, novel_classes, splitfile_dir, out, seed,
                    iterations, batch_size, lr, wd, momentum, dampening, solver, precision, independent_base_batches,
                    head_options, max_per_label, max_problems, allow_seen_novel, device, threads, quiet) -> None:
    """The low-shot benchmark of Hariharan & Girshick (ICCV 2017) on a feature store: every head, experiment and n
    in one process; top-1 / top-5 on novel, base and all classes with 95% CIs."""
    cfg = LowShotConfig(store=store, out=out, heads=tuple(heads), n=n_spec, experiments=experiments, setup=setup,
                        test_store=test_store, train_split=train_split, test_split=test_split,
                        train_rule=train_rule, test_rule=test_rule, test_fraction=test_fraction,
                        label_idx=label_idx, base_classes=base_classes, novel_classes=novel_classes,
                        splitfile_dir=splitfile_dir, seed=seed, iterations=iterations, batch_size=batch_size,
                        lr=lr, wd=wd, momentum=momentum, dampening=dampening, solver=solver, precision=precision,
                        share_base_batches=not independent_base_batches, max_problems=max_problems,
                        max_per_label=max_per_label, head_options=tuple(head_options), device=device,
                        threads=threads, allow_seen_novel=allow_seen_novel, quiet=quiet, given=_explicit(ctx))
    echo = (lambda msg: None) if quiet else (lambda msg: click.echo(msg, err=True))
    run_lowshot(cfg, echo=echo)
    if not quiet:
        click.echo(Path(out, "lowshot.md").read_text())


if __name__ == "__main__":
    from featstore.cli_support import run_cli

    run_cli(lowshot_command, "bench lowshot")

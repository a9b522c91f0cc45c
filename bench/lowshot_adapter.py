"""How a head plugs into ``bench lowshot``: the adapter base class, what the protocol hands it, run seeds, and the
hyper-parameter defaults per representation.

An adapter (:class:`LowShotMethod`) drives one or more registered heads (``drives``: names of
:func:`heads.base.head_class`) through the protocol's calls; the protocol's table of adapters is
``bench.lowshot.ADAPTERS``. Every call has a default here, so the protocol calls them all without asking.
"""

from __future__ import annotations

import inspect
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    from bench.head_cache import HeadCache

SETUPS = ("test", "val", "all")


def run_seed(seed: int, setup: str, experiment: int, n: int, method: str, stream: int = 0) -> int:
    """The seed of one (setup, experiment, n, method) run: stable across processes and batching."""
    entropy = [int(seed) & 0xFFFFFFFF, SETUPS.index(setup) if setup in SETUPS else 9, int(experiment), int(n),
               zlib.crc32(method.encode()), int(stream)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def default_hparams(store) -> dict:
    """The hyper-parameters per representation that the original README (facebookresearch/low-shot-shrink-
    hallucinate) gives: the low-shot classifier's lr and weight decay, and with generation also the padding size
    and the generator's lr, for the store's representation (read off its checkpoint provenance):
    ``{"plain": {lr, wd}, "generation": {lr, wd, max_per_label, generator_lr}, "why": str}``."""
    prov = store.provenance or {}
    config = ((prov.get("checkpoint_provenance") or {}).get("config") or {})
    aux = str(config.get("aux") or "none").lower()
    weight = float(config.get("aux_weight") or 0.0)
    model = str((store.fingerprint or {}).get("model") or config.get("model") or "")
    deep = "50" in model
    if aux in ("sgm", "batchsgm") and weight > 0:
        what = "ResNet-50 SGM" if deep else f"ResNet-10 {aux}"
        plain = (0.1, 1e-3) if deep else (1.0, 1e-3)
        gen = (0.1, 1e-3, 5, 1.0) if deep else (1.0, 1e-3, 5, 1.0)
    elif aux == "l2" and weight > 0:
        what, plain, gen = "ResNet-10 L2", (0.1, 1e-3), (0.1, 1e-3, 20, 0.1)
    else:
        what = "ResNet-50 baseline" if deep else "baseline representation"
        plain = (0.1, 1e-2)
        gen = (0.1, 1e-2, 20, 0.1) if deep else (0.1, 1e-3, 20, 0.1)
    return {"plain": {"lr": plain[0], "wd": plain[1]},
            "generation": {"lr": gen[0], "wd": gen[1], "max_per_label": gen[2], "generator_lr": gen[3]},
            "why": f"the original README's values for the {what} (aux={aux}, weight={weight:g}, "
                   f"model={model or 'unknown'})"}


@dataclass
class LowShotContext:
    """What the protocol tells a method besides the arrays (set as ``method.context`` before ``prepare``)."""

    store: Any                     # featstore.store.FeatureStore (read-only)
    out: Path                      # results folder
    setup: str                     # "test" | "val" | "all"
    num_classes: int               # C: logits span all classes of the store
    class_names: list[str]
    seed: int
    device: str
    all_base_classes: list[int]    # base_1 + base_2 (what a generator / matching network trains on)
    quiet: bool = False            # no progress bars
    cache: "HeadCache | None" = None   # where prepare() keeps what it trains once per store


@dataclass
class LowShotRun:
    """One (experiment, n) problem: ``features [m, d]`` / ``labels [m]`` are the n examples per novel class
    (sorted store rows ``rows``); ``seed`` = :func:`run_seed` of the run."""

    experiment: int
    n: int
    features: Any
    labels: Any
    rows: np.ndarray
    seed: int


class LowShotMethod:
    """How a low-shot head plugs into ``bench lowshot`` (subclass it and list it in ``bench.lowshot.ADAPTERS``).

    The protocol calls, in order:

    1. ``method.context = LowShotContext(...)``, ``method.progress = callback`` (or None);
    2. ``prepare(store_features [N_b, d], labels [N_b], base_classes, seed)`` once per store: the training rows of
       **all** base classes (base_1 + base_2, never a novel row), e.g. to train an analogy generator or a matching
       network; keep what is expensive in ``context.cache`` (:class:`bench.head_cache.HeadCache`) under a content
       key;
    3. ``setup(base_feats [N_s, d], base_labels [N_s], base_classes, novel_classes, num_classes, seed)`` once per
       setup: the base pool every run trains on (all training rows of the setup's base classes);
    4. ``scores_many(runs, test_feats)``: the ``[t, C]`` scores (torch tensor or numpy array; higher = more
       likely) of every :class:`LowShotRun` in order, over all C classes for the test images; by default
       ``scores(train_feats, train_labels, test_feats, n, experiment)`` run by run (the logreg head instead
       trains all runs as one batch).

    Arrays are torch float32 tensors on the CPU; labels index ``context.class_names``. A method derives per-run
    randomness from ``run_seed(seed, context.setup, experiment, n, name)`` (see :meth:`run_seed`).

    Class declarations: ``name`` (the protocol sets it to the adapter's key in its table), ``drives`` (the
    registered heads it runs), :meth:`defaults` (hyper-parameters per representation); the constructor's
    parameters are the options the adapter takes (:meth:`options`).
    """

    name: ClassVar[str] = "method"
    #: registered heads (heads.base.head_class names) this adapter runs
    drives: ClassVar[tuple[str, ...]] = ()
    seed: int = 0
    context: LowShotContext | None = None
    progress: Callable[[int], None] | None = None

    @classmethod
    def defaults(cls, table: dict) -> dict:
        """Constructor defaults from :func:`default_hparams` ``table`` for the store's representation (none)."""
        return {}

    @classmethod
    def options(cls) -> list[str]:
        """The options this adapter takes: its constructor's named parameters, in signature order."""
        params = inspect.signature(cls.__init__).parameters
        return [p.name for p in params.values()
                if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def prepare(self, store_features, labels, base_classes: Sequence[int], seed: int) -> None:
        """Once per store (default: nothing)."""

    def setup(self, base_feats, base_labels, base_classes: Sequence[int], novel_classes: Sequence[int],
              num_classes: int, seed: int) -> None:
        """Once per setup (default: keep the arguments as attributes)."""
        self.base_feats, self.base_labels = base_feats, base_labels
        self.base_classes, self.novel_classes = list(base_classes), list(novel_classes)
        self.num_classes, self.seed = int(num_classes), int(seed)

    def scores(self, train_feats, train_labels, test_feats, n: int, experiment: int):
        raise NotImplementedError(f"{type(self).__name__} must implement scores or scores_many")

    def scores_many(self, runs: Sequence[LowShotRun], test_feats) -> Iterator:
        for run in runs:
            yield self.scores(run.features, run.labels, test_feats, run.n, run.experiment)
            self.advance(1)

    def work_units(self, runs: Sequence[LowShotRun]) -> int:
        """Size of the progress bar for these runs (``advance`` is called with parts of it)."""
        return len(runs)

    def advance(self, k: int) -> None:
        if self.progress is not None:
            self.progress(k)

    def run_seed(self, n: int, experiment: int, stream: int = 0) -> int:
        setup = self.context.setup if self.context else "test"
        return run_seed(self.seed, setup, experiment, n, self.name, stream)

    def describe(self) -> dict:
        """Hyper-parameters for results.json."""
        return {}

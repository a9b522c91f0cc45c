"""The Head contract: learners on feature tensors, with scikit-learn's estimator conventions.

::

    head = SomeHead(**hparams)          # hyper-parameters only, each stored under its own name
    head.fit(features, labels) -> self  # [n, d] and [n] (or batched episodes [E, n, d] and [E, n])
    head.logits(features) -> [n, C]     # closed-set scores ([E, m, C] for episodes)
    head.open_score(features) -> [n]    # higher = more likely unknown, everywhere in featstore
    head.meta_train(data) -> self       # heads with needs_meta_training: one signature, a MetaTrainData
    head.get_params() / head.clone()    # the constructor arguments / an unfitted copy with the same ones

A head declares what it needs and offers as class attributes, and the protocols read them (never ``hasattr``):

- ``input_kind``: :data:`POOLED` (``[n, d]`` pooled features), :data:`MAPS` (``[n, C, H, W]`` spatial maps) or
  :data:`EPISODES` (batched episodes ``[E, n, d]``; such heads also take ``[n, d]``);
- ``needs_meta_training``: ``meta_train(data)`` must run before ``fit`` (TANE, DNPG, matching networks);
- ``is_transductive``: ``fit`` also looks at the queries;
- ``gives_unknown_score``: ``open_score`` is the method's own unknown score (else it is the generic negative
  maximum softmax probability of the base class);
- ``has_unknown_column``: ``logits_with_negative`` returns ``[.., C + 1]`` scores, the last for "unknown".

:func:`check_needs` turns an unmet need into :class:`UnmetNeedError`, one line that the benches print.

Conventions (stated once, as pytorch-ood does):

- Open scores are larger for unknowns. A head whose natural score is a confidence returns its negation.
- Labels below 0 mean unknown.
- Learnt state ends in an underscore (``prototypes_``); using an unfitted head raises :class:`NotFittedError`.
- Inputs may be numpy arrays or torch tensors; outputs are torch tensors on the head's device.
- Heads import only torch and numpy (and scikit-learn / FAISS where a method needs them); no file I/O, no CLI.
  Extra inputs (base-class weights, maps) come through the constructor, ``fit`` or :class:`MetaTrainData`, never
  from a global.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch

#: Input kinds a head declares in ``input_kind``.
POOLED, MAPS, EPISODES = "pooled", "maps", "episodes"
INPUT_KINDS = (POOLED, MAPS, EPISODES)

HEADS: dict[str, type["Head"]] = {}


# ---------------------------------------------------------------------------------------------------- errors
class HeadError(ValueError):
    """Base of the contract's errors: a bench shows ``str(exc)`` as its one-line message."""


class NotFittedError(HeadError, RuntimeError):
    """A head was used before ``fit`` (or before ``meta_train`` where it needs one)."""


class UnknownHeadError(HeadError, KeyError):
    """No head is registered under that name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownOptionError(HeadError, TypeError):
    """A hyper-parameter the head's constructor does not take (the message lists those it takes)."""


class UnmetNeedError(HeadError):
    """A protocol cannot give a head what it declares it needs (maps, meta-training, an unknown score)."""


# ---------------------------------------------------------------------------------------------------- registry
def register_head(name: str) -> Callable[[type["Head"]], type["Head"]]:
    """Class decorator: make a head available by name to every bench (raises on a duplicate name).

    ``heads/__init__.py`` imports every head module, so the registry is complete once ``heads`` is imported."""

    def register(cls: type["Head"]) -> type["Head"]:
        if name in HEADS and HEADS[name] is not cls:
            raise ValueError(f"head {name!r} is registered twice")
        if cls.input_kind not in INPUT_KINDS:
            raise ValueError(f"head {name!r}: input_kind must be one of {', '.join(INPUT_KINDS)}")
        cls.head_name = name
        HEADS[name] = cls
        return cls

    return register


def _registry() -> dict[str, type["Head"]]:
    import heads  # noqa: F401  (imports every head module: the registry is complete)

    return HEADS


def list_heads() -> list[str]:
    return sorted(_registry())


def head_class(name: str) -> type["Head"]:
    """The class registered as ``name``; :class:`UnknownHeadError` listing the known names otherwise."""
    registry = _registry()
    if name not in registry:
        raise UnknownHeadError(f"unknown head {name!r}; known: {', '.join(sorted(registry)) or 'none'}")
    return registry[name]


def accepted_params(cls: type) -> list[str]:
    """The hyper-parameters ``cls``'s constructor takes, in signature order (``self`` and ``*args`` left out)."""
    params = inspect.signature(cls.__init__).parameters
    return [p.name for p in params.values()
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def canonical_options(cls: type, options: dict) -> dict:
    """``options`` with the head's documented old spellings (``param_aliases``) replaced by the current names."""
    aliases = getattr(cls, "param_aliases", {}) or {}
    out = {}
    for key, value in options.items():
        out[aliases.get(key, key)] = value
    return out


def check_options(cls: type, options: dict, who: str | None = None) -> None:
    """:class:`UnknownOptionError` naming the first option ``cls`` does not take and the ones it does (old
    spellings in ``param_aliases`` count as taken)."""
    accepted = accepted_params(cls) + list(getattr(cls, "param_aliases", {}) or {})
    unknown = [k for k in options if k not in accepted]
    if unknown:
        name = who or getattr(cls, "head_name", cls.__name__)
        raise UnknownOptionError(f"head {name!r} takes no option {unknown[0]!r}; it takes: {', '.join(accepted)}")


def create_head(name: str, **hparams: Any) -> "Head":
    """A head by registered name. Unknown names raise :class:`UnknownHeadError`, options the constructor does not
    take :class:`UnknownOptionError` (never dropped silently)."""
    cls = head_class(name)
    check_options(cls, hparams, name)
    return cls(**canonical_options(cls, hparams))


def check_needs(head: "Head | type[Head]", *, inputs: str = POOLED, meta_training: bool = False,
                unknown_score: bool = False, protocol: str = "this protocol", hint: str = "") -> None:
    """Refuse, in one line, a head whose declared needs the protocol cannot meet.

    ``inputs``: what the protocol gives (:data:`POOLED`, :data:`MAPS` or :data:`EPISODES`; an episode protocol
    serves pooled heads too); ``meta_training``: whether it can run ``meta_train``; ``unknown_score``: whether it
    needs the head's own unknown score."""
    cls = head if isinstance(head, type) else type(head)
    name = getattr(cls, "head_name", cls.__name__)
    served = {POOLED: {POOLED}, EPISODES: {POOLED, EPISODES}, MAPS: {MAPS}}[inputs]
    if cls.input_kind not in served:
        raise UnmetNeedError(f"head {name!r} needs {cls.input_kind} inputs; {protocol} gives {inputs}"
                             + (f" ({hint})" if hint else ""))
    if cls.needs_meta_training and not meta_training:
        raise UnmetNeedError(f"head {name!r} needs meta-training, which {protocol} does not run"
                             + (f" ({hint})" if hint else ""))
    if unknown_score and not cls.gives_unknown_score:
        raise UnmetNeedError(f"head {name!r} gives no unknown score of its own; {protocol} needs one"
                             + (f" ({hint})" if hint else ""))


def as_tensor(x: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = torch.float32):
    """numpy or torch -> torch tensor on ``device`` (no copy when already there)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to(device) if device is not None else t


def class_means(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class means and counts: ``features [n, d]`` or ``[E, n, d]``, ``labels [n]`` / ``[E, n]`` in
    ``0..n_classes-1`` (labels outside are ignored) -> ``(means [C, d] | [E, C, d], counts [C] | [E, C])``.

    One batched product (a one-hot matrix times the features); a class without examples gets a zero mean and
    count 0, which callers check where it matters."""
    x = features
    y = labels.long()
    batched = x.dim() == 3
    if not batched:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    C = int(n_classes)
    onehot = torch.zeros(*y.shape, C, dtype=x.dtype, device=x.device)
    valid = (y >= 0) & (y < C)
    onehot.scatter_(-1, y.clamp(0, max(C - 1, 0)).unsqueeze(-1), valid.unsqueeze(-1).to(x.dtype))
    counts = onehot.sum(dim=1)                                            # [E, C]
    means = torch.bmm(onehot.transpose(1, 2), x) / counts.clamp_min(1).unsqueeze(-1)
    return (means, counts) if batched else (means[0], counts[0])


# ---------------------------------------------------------------------------------------------------- meta-training
@dataclass
class MetaTrainData:
    """What a protocol hands to ``Head.meta_train``: cached features and the rows to learn from.

    - ``features [n, D]``: every row of the store, float32, on the head's device (rows index it);
    - ``labels [n]``: store class ids (int64 numpy);
    - ``train_rows``: rows the training episodes (and the base memory) come from;
    - ``val_rows``: rows of the validation classes, for model selection only (never test rows);
    - ``base_classes [B]``: the sorted distinct labels of ``train_rows`` (row b of ``base_weights`` is class
      ``base_classes[b]``); ``base_weights [B, D]``: the backbone classifier's rows of those classes (or their
      class means);
    - ``support_views [V, n, D]``: cached augmented views of every row (optional);
    - ``class_semantics [C, S]``: word vectors by store class id (optional);
    - ``ways, shots, queries, open_ways``: the protocol's episode shape, which episodic heads train with (None:
      the head's own default);
    - ``progress``: True for a bar on a terminal, or a callable the head reports to.
    """

    features: torch.Tensor
    labels: np.ndarray
    train_rows: np.ndarray
    val_rows: np.ndarray | None = None
    base_classes: np.ndarray | None = None
    base_weights: torch.Tensor | None = None
    support_views: torch.Tensor | None = None
    class_semantics: torch.Tensor | None = None
    ways: int | None = None
    shots: int | None = None
    queries: int | None = None
    open_ways: int | None = None
    progress: bool | Callable[..., None] = False

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels).reshape(-1).astype(np.int64, copy=False)
        self.train_rows = np.asarray(self.train_rows, dtype=np.int64).reshape(-1)
        if self.val_rows is not None:
            self.val_rows = np.asarray(self.val_rows, dtype=np.int64).reshape(-1)
        if self.base_classes is None:
            self.base_classes = np.unique(self.labels[self.train_rows])
        else:
            self.base_classes = np.asarray(self.base_classes, dtype=np.int64)
        if len(self.labels) != int(self.features.shape[0]):
            raise HeadError(f"MetaTrainData: {int(self.features.shape[0])} feature rows but {len(self.labels)} "
                            f"labels")

    def episode_shape(self, **defaults: int) -> dict[str, int]:
        """``ways``, ``shots``, ``queries``, ``open_ways``: the protocol's where given, else ``defaults``."""
        out = {}
        for key in ("ways", "shots", "queries", "open_ways"):
            value = getattr(self, key)
            out[key] = defaults[key] if value is None else int(value)
        return out


# ---------------------------------------------------------------------------------------------------- the base
class Head(torch.nn.Module):
    """Base class of all heads. Subclasses implement ``fit`` and ``logits``; ``open_score`` where they can.

    ``__init__`` stores every hyper-parameter under its own name (validation may happen there too, but the stored
    value is what ``get_params`` returns and what ``clone`` passes back to the constructor)."""

    head_name: ClassVar[str] = "head"
    #: what the head takes: POOLED, MAPS or EPISODES (see the module docstring)
    input_kind: ClassVar[str] = POOLED
    #: True when ``meta_train(data)`` must run before ``fit``
    needs_meta_training: ClassVar[bool] = False
    #: True when ``fit`` also looks at the query set (transductive methods)
    is_transductive: ClassVar[bool] = False
    #: True when ``open_score`` is the method's own unknown score, not the generic negative max-softmax
    gives_unknown_score: ClassVar[bool] = False
    #: True when ``logits_with_negative`` gives ``[.., C + 1]`` scores with an "unknown" column last
    has_unknown_column: ClassVar[bool] = False
    #: old spellings of hyper-parameters that the benches still accept: {old name: constructor name}
    param_aliases: ClassVar[dict[str, str]] = {}

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__()
        self.device = torch.device(device)

    # -- the contract ------------------------------------------------------------------------------------------
    def fit(self, features, labels) -> "Head":
        raise NotImplementedError(f"{type(self).__name__} must implement fit")

    def logits(self, features) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement logits")

    def open_score(self, features) -> torch.Tensor:
        """Default open score: negative maximum softmax probability (higher = more likely unknown)."""
        return -torch.softmax(self.logits(features), dim=-1).amax(dim=-1)

    def logits_and_open_score(self, features) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, open_score)``; heads override it where one pass over the queries gives both."""
        return self.logits(features), self.open_score(features)

    def predict(self, features) -> torch.Tensor:
        return self.logits(features).argmax(dim=-1)

    def meta_train(self, data: MetaTrainData, seed: int | None = None) -> "Head":
        """Learn from cached base-class features before ``fit`` (heads with ``needs_meta_training``)."""
        raise NotImplementedError(f"{type(self).__name__} does not meta-train (needs_meta_training is False)")

    # -- scikit-learn's estimator API ---------------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """The constructor arguments, read back from the attributes of the same names."""
        out = {}
        for name in accepted_params(type(self)):
            if not hasattr(self, name):
                raise AttributeError(f"{type(self).__name__} does not store its hyper-parameter {name!r} under "
                                     f"its own name (the head contract)")
            value = getattr(self, name)
            out[name] = str(value) if isinstance(value, torch.device) else value
        return out

    def set_params(self, **params: Any) -> "Head":
        """Change hyper-parameters of an unfitted head: a new head from ``get_params()`` updated with ``params``,
        whose state this one takes over (so the constructor's validation runs again)."""
        check_options(type(self), params)
        fresh = type(self)(**{**self.get_params(), **params})
        self.__dict__.update(fresh.__dict__)
        return self

    def clone(self) -> "Head":
        """An unfitted copy with the same hyper-parameters (scikit-learn's ``clone``)."""
        return type(self)(**copy.deepcopy(self.get_params()))

    def describe(self) -> dict[str, Any]:
        """Name, declarations and hyper-parameters, as ``results.json`` records them."""
        params = {k: (v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else repr(v))
                  for k, v in self.get_params().items()}
        return {"head": self.head_name, "input_kind": self.input_kind,
                "needs_meta_training": self.needs_meta_training, "is_transductive": self.is_transductive,
                "gives_unknown_score": self.gives_unknown_score, "params": params}

    # -- helpers -----------------------------------------------------------------------------------------------
    def _check_fitted(self, *attrs: str) -> None:
        for attr in attrs:
            if getattr(self, attr, None) is None:
                raise NotFittedError(f"{type(self).__name__} is not fitted yet: call fit(features, labels) first")

    def _tensor(self, x: Any, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        return as_tensor(x, self.device, dtype)

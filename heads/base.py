"""The Head contract: learners on feature tensors, with scikit-learn's estimator conventions.

::

    head = SomeHead(**hparams)          # hyper-parameters only, no data
    head.fit(features, labels) -> self  # [n, d] and [n] (or batched episodes [E, n, d] and [E, n])
    head.logits(features) -> [n, C]     # closed-set scores ([E, m, C] for episodes)
    head.open_score(features) -> [n]    # higher = more likely unknown, everywhere in featstore

Conventions (stated once, as pytorch-ood does):

- Open scores are larger for unknowns. A head whose natural score is a confidence returns its negation.
- Labels below 0 mean unknown.
- Learnt state ends in an underscore (``prototypes_``); using an unfitted head raises :class:`NotFittedError`.
- Inputs may be numpy arrays or torch tensors; outputs are torch tensors on the head's device.
- Heads import only torch and numpy (and scikit-learn / FAISS where a method needs them); no file I/O, no CLI.
  Extra inputs (base-class weights, maps) come through the constructor or ``fit``, never from a global.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

HEADS: dict[str, type["Head"]] = {}


class NotFittedError(RuntimeError):
    """A head was used before ``fit``."""


def register_head(name: str) -> Callable[[type["Head"]], type["Head"]]:
    """Class decorator: make a head available by name to the benches (raises on a duplicate name)."""

    def register(cls: type["Head"]) -> type["Head"]:
        if name in HEADS:
            raise ValueError(f"head {name!r} is registered twice")
        cls.head_name = name
        HEADS[name] = cls
        return cls

    return register


def list_heads() -> list[str]:
    return sorted(HEADS)


def create_head(name: str, **hparams: Any) -> "Head":
    """A head by registered name; unknown names raise ValueError listing the known ones."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; known: {', '.join(list_heads()) or 'none'}")
    return HEADS[name](**hparams)


def as_tensor(x: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = torch.float32):
    """numpy or torch -> torch tensor on ``device`` (no copy when already there)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to(device) if device is not None else t


class Head(torch.nn.Module):
    """Base class of all heads. Subclasses implement ``fit`` and ``logits``; ``open_score`` where they can."""

    head_name: str = "head"
    #: True when ``fit`` also looks at the query set (transductive methods)
    is_transductive: bool = False
    #: True for heads that only make sense trained together with a backbone (fine-tuning path)
    needs_backbone: bool = False

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

    def predict(self, features) -> torch.Tensor:
        return self.logits(features).argmax(dim=-1)

    # -- helpers -----------------------------------------------------------------------------------------------
    def _check_fitted(self, *attrs: str) -> None:
        for attr in attrs:
            if getattr(self, attr, None) is None:
                raise NotFittedError(f"{type(self).__name__} is not fitted yet: call fit(features, labels) first")

    def _tensor(self, x: Any, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        return as_tensor(x, self.device, dtype)

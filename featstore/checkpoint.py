"""Checkpoint files and their provenance: the one place that reads them.

- :func:`sha256_file` -- the identity of a checkpoint (a store's fingerprint records it as ``checkpoint_sha256``);
- :func:`load_weights_only` / :func:`read_checkpoint` -- ``torch.load(weights_only=True)`` on the CPU, with one
  line (:class:`~featstore.errors.CheckpointError`) for a missing, foreign or unsafe file;
- :func:`checkpoint_classifier` -- the linear classifier of the checkpoint a store was extracted with, when that
  file is still there unchanged;
- :func:`classifier_rows` -- its rows for given store classes, matched by class name.

A checkpoint is never unpickled beyond tensors and plain data, so reading one runs no code from the file. torch is
imported on first use: opening a store must not pay for it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from featstore.errors import CheckpointError, UserError

if TYPE_CHECKING:  # pragma: no cover
    from featstore.store import FeatureStore

__all__ = ["sha256_file", "load_weights_only", "read_checkpoint", "checkpoint_classifier", "classifier_rows"]


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk_bytes`` pieces (checkpoints can be larger than memory allows)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(chunk_bytes):
                digest.update(chunk)
    except FileNotFoundError:
        raise UserError(f"file {path} not found; check the path") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a file; give the path of the checkpoint file") from None
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def load_weights_only(path: str | os.PathLike[str]) -> Any:
    """What ``torch.load(path, map_location="cpu", weights_only=True)`` returns (any object it allows).

    CheckpointError (one line, ``reason`` = the first line of torch's message) for a missing file, a folder, bytes
    that are not a torch checkpoint, or a file that pickles Python objects beyond tensors and plain data."""
    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found; check the path")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give the path of the checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _first_line(exc)
        # torch says so only in its message: "Weights only load failed ..."
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            raise CheckpointError(
                f"checkpoint {path} holds Python objects beyond tensors and plain data; re-save just its state dict "
                "(torch.save(model.state_dict(), path)) and load that", reason) from None
        raise CheckpointError(f"checkpoint {path} is not a torch checkpoint ({reason}); check the path",
                              reason) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ValueError... for foreign bytes
        reason = _first_line(exc)
        raise CheckpointError(f"checkpoint {path} is not a torch checkpoint ({reason}); check the path",
                              reason) from None


def read_checkpoint(path: str | os.PathLike[str]) -> dict:
    """The checkpoint's top-level dict (weights only, on the CPU): ours (``save_checkpoint``), a trainer's, or a
    plain state dict. CheckpointError (one line) when it cannot be read or is not a dict."""
    raw = load_weights_only(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(raw).__name__}, not a dict of weights; save the "
                              "model's state_dict() or use extract.backbones.save_checkpoint")
    return raw


def checkpoint_classifier(store: "FeatureStore") -> tuple[np.ndarray, np.ndarray | None, list[str], str] | None:
    """The backbone's own linear classifier, when the store records a checkpoint file that is still there with
    the sha256 of its fingerprint: (weight [k, d], bias [k] or None, class names of the k rows, sha256)."""
    config = (store.provenance or {}).get("config") or {}
    recorded, sha = config.get("checkpoint"), (store.fingerprint or {}).get("checkpoint_sha256")
    if not recorded or not sha:
        return None
    # stores of earlier versions recorded the path as given, relative to where extract ran: try it from here and
    # from beside the store; the sha256 decides
    candidates = [Path(recorded)] if Path(recorded).is_absolute() else [Path(recorded), store.path.parent / recorded]
    path = next((p for p in candidates if p.is_file() and sha256_file(p) == sha), None)
    if path is None:
        return None
    try:
        raw = load_weights_only(path)
        clf, names = raw.get("classifier"), raw.get("classes")
        weight = np.asarray(clf["weight"], dtype=np.float32)
        bias = None if clf.get("bias") is None else np.asarray(clf["bias"], dtype=np.float32)
    except Exception:  # an unreadable or foreign checkpoint: the caller falls back to a trained classifier
        return None
    if names is None or weight.ndim != 2 or weight.shape[0] != len(names) or weight.shape[1] != store.dim:
        return None
    return weight, bias, [str(n) for n in names], sha


def classifier_rows(store: "FeatureStore", class_ids: Sequence[int] | np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Rows of :func:`checkpoint_classifier` for the store classes ``class_ids`` (indices into ``store.classes``),
    matched by class name: (weight [len(class_ids), d] float32, bias [len(class_ids)] or None).

    None when the checkpoint is gone or changed, has no classifier, or was not trained on every one of these
    classes (the classifier's row order is the training run's, not the store's)."""
    found = checkpoint_classifier(store)
    if found is None:
        return None
    weight, bias, names, _sha = found
    row_of = {name: i for i, name in enumerate(names)}
    classes = store.classes
    try:
        rows = [row_of[classes[int(c)]] for c in np.asarray(class_ids).reshape(-1)]
    except KeyError:
        return None
    return weight[rows], None if bias is None else bias[rows]

"""Atomic file writes: a hidden temporary file in the target's folder, flushed, then renamed over the target.

A reader (or a crash at any moment) sees the old file or the new one, never a half-written one. Every file that
featstore, extract and bench write outside a store goes through here.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator


def temporary_sibling(path: str | os.PathLike, suffix: str = "") -> Path:
    """A hidden, unique name beside ``path`` (same folder, so the rename stays on one file system)."""
    path = Path(path)
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}{suffix}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` (parents are created), on error it goes.

    ``suffix`` keeps the extension for writers that choose their format by it (``savefig``, ``np.savez``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path, suffix or path.suffix)
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write bytes or text to ``path`` atomically."""
    with atomic_path(path) as tmp:
        (tmp.write_bytes if isinstance(data, bytes) else tmp.write_text)(data)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2,
                      default: Callable[[Any], Any] | None = None) -> None:
    """``json.dumps(obj)`` to ``path`` atomically (with a final newline)."""
    write_atomic(path, json.dumps(obj, indent=indent, default=default) + "\n")


def write_with(path: str | os.PathLike, write: Callable[[Path], None], suffix: str = "") -> None:
    """Call ``write(tmp)`` on a temporary path, then rename it over ``path``."""
    with atomic_path(path, suffix) as tmp:
        write(tmp)

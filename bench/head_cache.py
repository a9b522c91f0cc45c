"""What a low-shot head trains once per store (an analogy generator, a matching network), cached under a content
key in the store itself, so that every results folder and every later run reuses it."""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from featstore.atomic import write_atomic
from featstore.errors import UserError

#: seconds a head cache waits for another writer of the store before it keeps its entry in --out/cache
CACHE_LOCK_WAIT = 60.0


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class HeadCache:
    """Entries kept in the store as node ``cache/<stem>-<key>``; in ``<out>/cache`` when the store cannot be
    written (read-only files, or another writer past ``wait`` seconds). ``key`` is a content hash (the store's
    fingerprint, the training rows' features and labels, the hyper-parameters), never a name."""

    def __init__(self, store, out: Path, wait: float | None = None):
        self.store, self.folder = store, Path(out) / "cache"
        self.wait = CACHE_LOCK_WAIT if wait is None else wait
        self.notes: list[str] = []

    @staticmethod
    def _name(stem: str, key: str) -> str:
        return f"{stem}-{key[:24]}"

    def load(self, stem: str, key: str) -> tuple[bytes, str] | None:
        """(bytes, where) of a cached entry, or None."""
        name = self._name(stem, key)
        found = self.store.read_blob("cache", name)
        if found is not None and found[1].get("key") == key:
            return found[0].tobytes(), f"store {self.store.path} node cache/{name}"
        path = self.folder / name
        if path.is_file():
            return path.read_bytes(), str(path)
        return None

    def save(self, stem: str, key: str, data: bytes, describe: dict) -> str:
        """Keep ``data``; returns where it went."""
        name = self._name(stem, key)
        attrs = {"key": key, "describe": describe, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "featstore": __import__("featstore").__version__}
        try:
            self.store.write_blob("cache", name, data, attrs, wait=self.wait)
            return f"store {self.store.path} node cache/{name}"
        except (OSError, UserError) as exc:
            reason = " ".join(str(exc).split())[:160]
            write_atomic(self.folder / name, data)
            self.notes.append(f"{stem}: not cached in the store ({reason}); kept in {self.folder / name}")
            return str(self.folder / name)

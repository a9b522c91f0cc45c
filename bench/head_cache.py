"""What a low-shot head trains once per store (an analogy generator, a matching network), cached under a content
key in the store itself, so that every results folder and every later run reuses it."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

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

    def load(self, stem: str, key: str, decode: Callable[[bytes], Any]) -> tuple[Any, str] | None:
        """(``decode(bytes)``, where) of a cached entry, or None when there is none or it cannot be read.

        An entry that does not read back (missing or corrupt chunks, a checksum mismatch, bytes ``decode`` refuses:
        a pickle ``weights_only`` will not load, another network's weights) is never trusted: one line goes to
        :attr:`notes` and the caller trains again, and its save replaces the entry."""
        name = self._name(stem, key)
        where = f"store {self.store.path} node cache/{name}"
        try:
            found = self.store.read_blob("cache", name)
        except UserError as exc:
            self._unreadable(stem, where, exc)
            found = None
        if found is not None and found[1].get("key") == key:
            try:
                return decode(found[0].tobytes()), where
            except Exception as exc:  # noqa: BLE001 - torch.load, np.load and load_state_dict raise many types
                self._unreadable(stem, where, exc)
        path = self.folder / name
        if path.is_file():
            try:
                return decode(path.read_bytes()), str(path)
            except Exception as exc:  # noqa: BLE001
                self._unreadable(stem, str(path), exc)
        return None

    def _unreadable(self, stem: str, where: str, exc: BaseException) -> None:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        prefix = f"store {self.store.path}: "
        if isinstance(exc, UserError):
            reason = reason.removeprefix(prefix).split("; featstore verify")[0]
        else:   # torch.load and np.load explain at length: their first sentence says what failed
            reason = reason.split(". ")[0]
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        note = f"{stem}: the cached entry in {where} cannot be read ({reason}); trained again, and the new one " \
               f"replaces it"
        self.notes.append(note)
        print(f"bench: warning: {note}", file=sys.stderr)   # damage is said even under --quiet

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

"""Per-sample selection rules: ``"drawer<=16"``, ``"drawer>=3 & alphabet!=2"``, ``"split=background & drawer<=16"``.

One grammar for every place that selects samples: ``featstore split`` and ``bench lowshot --train-rule/--test-rule``
(over a store's meta arrays and splits), ``extract train --val`` and ``bench fsor-finetune --train-rule`` (over a data
source's). A rule is ``all``, ``none``, or clauses joined by ``&`` (or ``and``), each ``FIELD OP VALUE`` (OP one of
< <= > >= == != ; text fields take only == and !=) or ``split=NAME``; a sample is selected when every clause holds.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import numpy as np

from featstore.errors import UnknownFieldError, UserError

_RULE_RE = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*(<=|>=|==|!=|<|>|=)\s*(.+?)\s*$")
_SPLIT_RE = re.compile(r"^\s*split\s*[=:]\s*(\S+)\s*$")
_OPS = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal, "==": np.equal, "=": np.equal,
        "!=": np.not_equal}


def select_mask(rule: str, n: int, fields: Mapping[str, np.ndarray] | Callable[[str], np.ndarray | None],
                splits: Mapping[str, np.ndarray] | None = None, *, option: str = "--rule",
                where: str = "the data") -> np.ndarray:
    """``[n]`` bool mask of the samples satisfying ``rule``.

    ``fields``: per-sample arrays ``[n]`` by name, or a function name -> array (None when unknown) so that a store
    reads only the fields a rule names; ``splits``: name -> sample indices. Errors name ``option`` and ``where``.
    """
    text = str(rule).strip()
    if text.lower() == "all":
        return np.ones(n, dtype=bool)
    if text.lower() == "none":
        return np.zeros(n, dtype=bool)
    clauses = [c for c in re.split(r"\s*&\s*|\s+and\s+", text) if c]
    if not clauses:
        raise UserError(f"{option} is empty; write a rule such as drawer<=16")
    lookup = fields if callable(fields) else fields.get
    names = [] if callable(fields) else sorted(fields)
    mask = np.ones(n, dtype=bool)
    for clause in clauses:
        if (m := _SPLIT_RE.match(clause)) is not None:
            name = m.group(1)
            if not splits or name not in splits:
                raise UserError(f"{option} {text!r}: {where} has no split {name!r} (splits: "
                                f"{', '.join(splits or {}) or 'none'})")
            keep = np.zeros(n, dtype=bool)
            keep[np.asarray(splits[name], dtype=np.int64)] = True
            mask &= keep
            continue
        m = _RULE_RE.match(clause)
        if not m:
            raise UserError(f"{option} {rule!r}: cannot read {clause!r}; write FIELD OP VALUE such as drawer<=16 "
                            f"(OP one of <, <=, >, >=, ==, !=) or split=NAME, joined with &")
        name, op, raw = m.groups()
        values = lookup(name)
        if values is None:
            known = f" (it has: {', '.join(names) or 'none'})" if names else ""
            raise UnknownFieldError(f"{option} {rule!r}: {where} has no per-sample field {name!r}{known}")
        values = np.asarray(values)
        raw = raw.strip().strip("'\"")
        if np.issubdtype(values.dtype, np.number) or values.dtype == bool:
            try:
                value = float(raw)
            except ValueError:
                raise UserError(f"{option} {rule!r}: field {name!r} is numeric but {raw!r} is not a number") from None
            mask &= _OPS[op](values.astype(np.float64), value)
        else:
            if op not in ("==", "=", "!="):
                raise UserError(f"{option} {rule!r}: field {name!r} holds text; only == and != apply to it")
            mask &= _OPS[op](values.astype(str), raw)
    return mask


def rule_mask(store, rule: str, option: str = "--train-rule") -> np.ndarray:
    """``[N]`` bool mask of the rows of a feature store satisfying ``rule`` (its meta arrays and splits; the field
    ``class`` is the row's label unless the store has a meta array of that name)."""
    meta_names = set(store.meta_names)

    def field(name: str):
        if name in meta_names:
            return store.meta(name)
        return store.labels if name == "class" else None

    splits = {name: store.split(name) for name in store.split_names} if "split" in str(rule) else {}
    try:
        return select_mask(rule, store.n, field, splits, option=option, where=f"store {store.path}")
    except UnknownFieldError as exc:
        raise UnknownFieldError(f"{exc} (it has: {', '.join(sorted(meta_names | {'class'}))})") from None

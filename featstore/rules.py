"""Per-sample rules over a store's meta arrays: ``"drawer<=16"``, ``"drawer>=3 & alphabet!=2"``.

Used by ``featstore split`` (named subsets), ``bench lowshot --train-rule/--test-rule`` and the FSOR tools.
"""

from __future__ import annotations

import re

import numpy as np

from featstore.errors import UserError

_RULE_RE = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*(<=|>=|==|!=|<|>|=)\s*(.+?)\s*$")
_OPS = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal, "==": np.equal, "=": np.equal,
        "!=": np.not_equal}


def rule_mask(store, rule: str, option: str = "--train-rule") -> np.ndarray:
    """``[N]`` bool mask of the rows satisfying ``rule``: clauses ``META OP VALUE`` joined by ``&`` (OP one of
    < <= > >= == != ; text meta only == and !=), e.g. ``"drawer<=16"`` or ``"drawer>=3 & alphabet!=2"``."""
    mask = np.ones(store.n, dtype=bool)
    clauses = [c for c in re.split(r"\s*&\s*|\s+and\s+", rule.strip()) if c]
    if not clauses:
        raise UserError(f"{option} is empty; write a rule such as drawer<=16")
    for clause in clauses:
        m = _RULE_RE.match(clause)
        if not m:
            raise UserError(f"{option} {rule!r}: cannot read {clause!r}; write META OP VALUE such as drawer<=16 "
                            f"(OP one of <, <=, >, >=, ==, !=; join clauses with &)")
        name, op, raw = m.groups()
        if name not in store.meta_names:
            raise UserError(f"{option} {rule!r}: store {store.path} has no per-sample meta {name!r} (it has: "
                            f"{', '.join(store.meta_names) or 'none'})")
        values = store.meta(name)
        raw = raw.strip().strip("'\"")
        if np.issubdtype(values.dtype, np.number) or values.dtype == bool:
            try:
                value = float(raw)
            except ValueError:
                raise UserError(f"{option} {rule!r}: meta {name!r} is numeric but {raw!r} is not a number") from None
            mask &= _OPS[op](values.astype(np.float64), value)
        else:
            if op not in ("==", "=", "!="):
                raise UserError(f"{option} {rule!r}: meta {name!r} holds text; only == and != apply to it")
            mask &= _OPS[op](values.astype(str), raw)
    return mask

"""The kit every protocol shares: one spelling of shots and head options, the device and thread checks, progress
bars, seeded class splits saved beside the results and reused, refusal of overlapping class sets, mean with 95%
CI and the results writer.

A protocol file (``bench/<name>.py``) is the evaluation procedure only and takes everything else from here:

- :func:`parse_shots` -- ``--shots 1..20`` (the canonical 1, 2, 5, 10, 20 inside a range) or ``1,5``;
- :func:`parse_head_options` / :func:`make_heads` -- ``--head NAME`` with ``--head-option NAME.KEY=VALUE``; an
  option a head does not take is a one-line error naming those it takes;
- :func:`resolve_device`, :func:`thread_limits`, :func:`progress_bar` (from :mod:`featstore.runtime`);
- :func:`seeded_class_split` -- K of the classes drawn with a seed, saved as JSON in the results folder and read
  back on the next run (a different request there is refused);
- :func:`refuse_overlap` -- one line naming the classes two sets share;
- :func:`mean_ci95`, :func:`write_results`, :func:`markdown_table` (from :mod:`bench.report`).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from bench.report import markdown_table, mean_ci95, write_results
from featstore.atomic import write_json_atomic
from featstore.errors import UserError
from featstore.runtime import progress_bar, resolve_device, thread_limits

__all__ = ["CANONICAL_SHOTS", "parse_shots", "parse_value", "parse_head_options", "head_options_for",
           "make_head", "make_heads", "user_errors", "resolve_device", "thread_limits", "progress_bar",
           "seeded_class_split", "refuse_overlap", "mean_ci95", "write_results", "markdown_table"]

CANONICAL_SHOTS = (1, 2, 5, 10, 20)


# ---------------------------------------------------------------------------------------------------- shots
def parse_shots(spec: str | int | Sequence[int], option: str = "--shots") -> list[int]:
    """``"1..20"`` -> the canonical [1, 2, 5, 10, 20] that lie in the range; ``"1,3,7"`` -> [1, 3, 7]; an int or a
    list of ints as given. Sorted, without repeats; one-line UserError on anything else."""
    if isinstance(spec, (int, np.integer)):
        spec = [int(spec)]
    if isinstance(spec, (list, tuple)):
        values = [int(v) for v in spec]
        text = ",".join(str(v) for v in values)
    else:
        text = str(spec).strip()
        m = re.fullmatch(r"(\d+)\s*\.\.\s*(\d+)", text)
        if m:
            lo, hi = int(m[1]), int(m[2])
            if lo > hi:
                raise UserError(f"{option} {text}: the range is empty ({lo} > {hi}); write it as {hi}..{lo}")
            values = [v for v in CANONICAL_SHOTS if lo <= v <= hi]
            if not values:
                raise UserError(f"{option} {text}: none of the canonical values 1, 2, 5, 10, 20 lies in {lo}..{hi}; "
                                f"give a list instead, such as {option} {lo},{hi}")
        else:
            try:
                values = [int(p) for p in text.split(",") if p.strip()]
            except ValueError:
                raise UserError(f"{option} {text!r}: give a range such as 1..20 (the canonical 1, 2, 5, 10, 20) or "
                                f"a comma-separated list such as 1,3,7") from None
    if not values:
        raise UserError(f"{option} is empty; give a range such as 1..20 or a list such as 1,3,7")
    if min(values) < 1:
        raise UserError(f"{option} {text}: every value must be a positive number of examples per class")
    return sorted(set(values))


# ---------------------------------------------------------------------------------------------------- heads
def parse_value(text: str) -> Any:
    """A command-line value: JSON where it parses (numbers, true/false, null, lists), else the text itself;
    ``True``/``None`` in Python's spelling too."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_head_options(items: Sequence[str], option: str = "--head-option") -> dict[str, dict[str, Any]]:
    """``["matching.episodes=2000", "lr=0.5"]`` -> ``{"matching": {"episodes": 2000}, "*": {"lr": 0.5}}``.

    ``NAME.KEY=VALUE`` is for head NAME only, a bare ``KEY=VALUE`` for every head that takes KEY. Dashes in keys
    become underscores."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or ():
        key, sep, raw = str(item).partition("=")
        key = key.strip().replace("-", "_")
        head, dot, name = key.rpartition(".")
        if not sep or not name.isidentifier() or (dot and not head):
            raise UserError(f"{option} {item!r}: write NAME.KEY=VALUE (e.g. matching.episodes=2000) or KEY=VALUE "
                            f"for every head that takes KEY")
        out.setdefault(head or "*", {})[name] = parse_value(raw)
    return out


def head_options_for(name: str, parsed: dict[str, dict[str, Any]], accepted: Sequence[str],
                     aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """The options of head ``name``: the bare ones it accepts, then its own (which must all be accepted)."""
    aliases = aliases or {}
    opts = {k: v for k, v in parsed.get("*", {}).items() if k in accepted}
    for head, values in parsed.items():
        if head != "*" and aliases.get(head, head) == name:
            opts.update(values)
    return opts


def check_head_options(heads: Sequence[str], parsed: dict[str, dict[str, Any]],
                       accepted: dict[str, Sequence[str]], aliases: dict[str, str] | None = None,
                       option: str = "--head-option") -> None:
    """Refuse an option no named head takes, or a NAME.KEY for a head not given with --head or without KEY."""
    aliases = aliases or {}
    canonical = [aliases.get(h, h) for h in heads]
    for key in parsed.get("*", {}):
        if not any(key in accepted[h] for h in canonical):
            raise UserError(f"{option} {key}=...: none of the heads {', '.join(heads)} takes {key!r}; write "
                            f"NAME.KEY=VALUE for one head (" + "; ".join(f"{h} takes {', '.join(accepted[h])}"
                                                                        for h in canonical) + ")")
    for head, values in parsed.items():
        if head == "*":
            continue
        target = aliases.get(head, head)
        if target not in canonical:
            raise UserError(f"{option} {head}.{next(iter(values))}=...: head {head!r} is not among --head "
                            f"{', '.join(heads)}")
        for key in values:
            if key not in accepted[target]:
                raise UserError(f"{option} {head}.{key}=...: head {target!r} takes no option {key!r}; it takes: "
                                f"{', '.join(accepted[target])}")


@contextlib.contextmanager
def user_errors(prefix: str = "") -> Iterator[None]:
    """Turn the head contract's errors (:class:`heads.base.HeadError`) into one-line UserErrors."""
    from heads.base import HeadError

    try:
        yield
    except HeadError as exc:
        raise UserError(f"{prefix}{' '.join(str(exc).split())}") from None


def make_head(name: str, options: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None):
    """A registered head with ``options`` (all must be accepted) and ``defaults`` (only where accepted and not set:
    the store's ``feat_dim``, the protocol's ``device``...). One-line UserError for an unknown head or option, or
    a value the constructor refuses."""
    from heads.base import accepted_params, canonical_options, check_options, head_class

    options = dict(options or {})
    with user_errors():
        cls = head_class(name)
        check_options(cls, options, name)
    options = canonical_options(cls, options)
    accepted = accepted_params(cls)
    for key, value in (defaults or {}).items():
        if key in accepted:
            options.setdefault(key, value)
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise UserError(f"head {name!r}: {' '.join(str(exc).split())}") from None


def make_heads(names: Sequence[str], head_options: Sequence[str], defaults: dict[str, Any] | None = None,
               option: str = "--head-option") -> dict[str, Any]:
    """``--head`` names and ``--head-option`` items -> {name: head}, every option checked first."""
    from heads.base import accepted_params, head_class

    parsed = parse_head_options(head_options, option)
    with user_errors():
        accepted = {n: accepted_params(head_class(n)) + list(head_class(n).param_aliases) for n in names}
    check_head_options(names, parsed, accepted, option=option)
    return {n: make_head(n, head_options_for(n, parsed, accepted[n]), defaults) for n in names}


# ---------------------------------------------------------------------------------------------------- class sets
def seeded_class_split(path: str | Path, classes: Sequence[int], k: int, *, splits: int = 1, seed: int = 0,
                       what: str = "known classes") -> list[list[int]]:
    """``splits`` seeded draws of ``k`` of ``classes`` (sorted within a draw), saved to ``path`` (JSON) and read
    back on the next run: the same request gives the same draws, and a different request in the same folder is
    refused rather than silently mixed."""
    path = Path(path)
    classes = sorted(int(c) for c in classes)
    if not 0 < k < len(classes):
        raise UserError(f"{what}: {k} of {len(classes)} classes; give 1..{len(classes) - 1}")
    request = {"classes": classes, "k": int(k), "splits": int(splits), "seed": int(seed)}
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read the saved class splits {path}: {exc}; remove it to draw new ones") from None
        if saved.get("request") != request:
            raise UserError(f"{path} holds class splits drawn for another request ({saved.get('request')}); use "
                            f"another --out or remove it")
        return [list(map(int, s)) for s in saved["splits"]]
    draws = []
    for i in range(splits):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, i]))
        draws.append(sorted(int(c) for c in rng.choice(classes, size=k, replace=False)))
    write_json_atomic(path, {"request": request, "splits": draws})
    return draws


def refuse_overlap(a: Sequence[int], b: Sequence[int], what_a: str, what_b: str, names: Sequence[str] | None = None,
                   allow_flag: str | None = None) -> list[int]:
    """The classes ``a`` and ``b`` share; UserError naming them (and the flag that allows it) when there are any."""
    shared = sorted(set(int(c) for c in a) & set(int(c) for c in b))
    if shared:
        shown = ", ".join(names[c] if names is not None else str(c) for c in shared[:5])
        more = f" and {len(shared) - 5} more" if len(shared) > 5 else ""
        allow = f"; pass {allow_flag} to allow it (recorded in the results)" if allow_flag else ""
        raise UserError(f"{what_a} and {what_b} share {len(shared)} class(es): {shown}{more}{allow}")
    return shared

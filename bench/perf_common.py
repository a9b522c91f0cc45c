"""What every ``bench perf`` section shares: the arguments, the row format, the section registry and stage
messages. Sections import this module; :mod:`bench.perf` imports the sections (never the other way round).

A row is a dict::

    {section, figure, value, unit, reference, reference_name, ratio, ratio_is, target, passed, note}

``ratio`` is defined per row by ``ratio_is`` (e.g. "memmap / store": higher is better); ``target`` is a string
such as ">= 0.5" or None for context figures, and ``passed`` is True / False, or None where there is no target
or the run was ``--quick`` (small sizes, not comparable with the targets). A section is a function
``(PerfArgs) -> list of rows`` registered with ``@section("name")``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

SECTIONS: dict[str, Callable[["PerfArgs"], list[dict]]] = {}


def section(name: str):
    """Register a benchmark section under ``name``."""

    def register(fn):
        if name in SECTIONS and SECTIONS[name] is not fn:
            raise ValueError(f"bench perf section {name!r} is registered twice")
        SECTIONS[name] = fn
        return fn

    return register


@dataclass
class PerfArgs:
    sections: tuple[str, ...] = ("store", "knn")
    rows: int | None = None           # store section: 200,000; knn section: 100,000 base rows
    dim: int | None = None            # 512 (synthetic data; a --store fixes its own dimension)
    queries: int | None = None        # knn: 10,000 queries; store: 10,000 gathered rows
    store: str | None = None          # a featstore store whose features replace the synthetic data
    workdir: str | None = None        # where the store section writes its temporary store and .npy
    compression: tuple[str, ...] = ()  # extra codecs to compare beside the uncompressed store (lz4, zstd)
    seed: int = 0
    quick: bool = False
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    out: str | None = None
    lowshot_iterations: int | None = None   # lowshot section: SGD iterations per run (1,000; 100 with --quick)
    notes: list[str] = field(default_factory=list)   # filled by sections: what the reader must know
    extra: dict = field(default_factory=dict)        # filled by sections: tuning traces etc. for results.json

    def config(self) -> dict:
        d = asdict(self)
        d.pop("notes"), d.pop("extra")
        return d


def log(msg: str) -> None:
    """Stage messages on a terminal only (quiet when stderr is redirected)."""
    if sys.stderr.isatty():
        print(f"[perf] {msg}", file=sys.stderr, flush=True)


def make_row(section_name: str, figure: str, value: float, *, unit: str = "s", reference: float | None = None,
             reference_name: str | None = None, ratio: float | None = None, ratio_is: str | None = None,
             target: str | None = None, passed: bool | None = None, quick: bool = False, note: str | None = None,
             **extra: Any) -> dict:
    row = {"section": section_name, "figure": figure, "value": float(value), "unit": unit,
           "reference": None if reference is None else float(reference), "reference_name": reference_name,
           "ratio": None if ratio is None else float(ratio), "ratio_is": ratio_is, "target": target,
           "passed": None if (quick or target is None) else bool(passed), "note": note}
    row.update(extra)
    return row

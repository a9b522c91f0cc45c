"""The results writer of every bench, and what its reports share: markdown tables, mean and 95% CI, timers.

Every bench writes its run through :func:`write_results`: ``results.json`` (config, the fingerprint hash of the
store it read, library versions, metrics, created time) and, where the bench has them, a markdown report and PNG
plots beside it, every file written atomically (:mod:`featstore.atomic`). Timings on a shared machine are noisy:
:func:`timer` reports the best and the median of several repeats after warm-up runs, and benches compare figures
as ratios against a reference measured in the same run.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from featstore.atomic import write_atomic, write_with


def jsonable(value: Any) -> Any:
    """Plain JSON types for numpy scalars / arrays, paths, tuples and sets; NaN and inf become null."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (str, int)):
        return value
    return str(value)




def _versions() -> dict:
    from featstore.store import library_versions

    versions = dict(library_versions())
    versions["python"] = platform.python_version()
    for name in ("faiss", "sklearn", "scipy", "h5py"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "unknown")
        except ImportError:
            pass
    return versions


def write_results(out_dir: str | os.PathLike, name: str, config: dict, metrics: Any, store: Any = None, *,
                  markdown: str | None = None, markdown_name: str | None = None,
                  plots: Mapping[str, Callable[[Path], None]] | None = None) -> Path:
    """Write ``out_dir/results.json`` (and the report beside it); return the path of results.json.

    ``store`` (a :class:`featstore.store.FeatureStore`, optional) contributes its path, fingerprint hash and uuid,
    so a result can always be traced back to the features it was measured on. ``markdown``: the text of
    ``<markdown_name or name>.md``; ``plots``: {file name: function drawing into the path it is given} (PNG by the
    file name's suffix). The report comes first and results.json last, each under a temporary name renamed at the
    end, so a failed run never leaves half a file and a results.json always has its report beside it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if markdown is not None:
        write_atomic(out / f"{markdown_name or name}.md", markdown)
    for filename, draw in (plots or {}).items():
        write_with(out / filename, draw, suffix=Path(filename).suffix)
    payload: dict[str, Any] = {
        "bench": name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "store": None,
        "versions": _versions(),
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count()},
        "metrics": metrics,
    }
    if store is not None:
        payload["store"] = {"path": str(store.path), "fingerprint_hash": store.fingerprint_hash,
                            "store_uuid": store.store_uuid}
    path = out / "results.json"
    write_atomic(path, json.dumps(jsonable(payload), indent=2, sort_keys=False) + "\n")
    return path


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 1:
            return f"{value:.3g}" if magnitude < 100 else f"{value:.0f}"
        return f"{value:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | dict) -> str:
    """A GitHub markdown table of ``rows`` with the given columns (a list of keys, or {key: header}).

    Missing values are empty cells; floats get three significant digits; ``|`` in a value is escaped.
    """
    if isinstance(columns, dict):
        keys, headers = list(columns), list(columns.values())
    else:
        keys, headers = list(columns), list(columns)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in keys) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def mean_ci95(values: Iterable[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval (Student t, n-1 degrees of freedom).

    One value gives a half-width of 0; an empty sequence raises ValueError.
    """
    x = np.asarray(list(values), dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("mean_ci95 needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return mean, 0.0
    from scipy import stats

    sem = float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, float(stats.t.ppf(0.975, x.size - 1) * sem)


@dataclass(frozen=True)
class Timing:
    best: float
    median: float
    times: tuple[float, ...]
    result: Any = None

    def __iter__(self):  # best, median = timer(...)
        return iter((self.best, self.median))


def timer(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; best and median wall-clock seconds.

    The result of the last timed call is kept in ``.result`` (for checking what was timed).
    """
    if repeats < 1:
        raise ValueError("timer needs repeats >= 1")
    for _ in range(warmup):
        fn()
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return Timing(best=min(times), median=statistics.median(times), times=tuple(times), result=result)


def timer_interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Like :func:`timer` for several callables, run in turn (a, b, a, b, ...) so that a slow spell of a shared
    machine hits them alike; the ratio of two results is then fairer than from two separate timer() calls."""
    if repeats < 1:
        raise ValueError("timer_interleaved needs repeats >= 1")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: Timing(best=min(t), median=statistics.median(t), times=tuple(t), result=results[name])
            for name, t in times.items()}

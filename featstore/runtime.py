"""What every command shares at run time: the one ``--device`` check, the one thread-limit helper, progress bars.

``extract``, ``featstore`` and ``bench`` all import these from here, so that ``--device`` and ``--threads`` mean
the same thing in the three commands.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

from featstore.errors import UserError


def resolve_device(name: str | Any, option: str = "--device") -> Any:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> ``torch.device``; one line (UserError) for anything else or for
    cuda where torch sees no GPU."""
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    text = str(name)
    if text != "cpu" and not text.startswith("cuda"):
        raise UserError(f"{option} must be cpu, cuda or cuda:N, not {text!r}")
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise UserError(f"{option} must be cpu, cuda or cuda:N, not {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option} {text} was asked for but torch sees no GPU; use {option} cpu")
    return device


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_FAISS_THREADS_SET = False


def use_all_threads() -> None:
    """FAISS runs on every core this process may use, unless OMP_NUM_THREADS says otherwise (once per process;
    featstore.index calls it before its first FAISS call)."""
    global _FAISS_THREADS_SET
    if _FAISS_THREADS_SET:
        return
    _FAISS_THREADS_SET = True
    if os.environ.get("OMP_NUM_THREADS"):
        return
    import faiss

    cores = usable_cores()
    if faiss.omp_get_max_threads() < cores:
        faiss.omp_set_num_threads(cores)


#: multiply-adds of the largest matrix product of one step below which threading does not pay: one thread.
#: Measured on 2 cores (docs/performance.md, "Thread pools that fit the problem"): a [100, 64] x [64, 250]
#: product (1.6e6) took 37 us on one thread and 91 us on two; the low-shot SGD loop on the demo's store
#: (3.2e6 per product, 10,000 small steps) ran 20x longer with two threads than with one, because every product
#: and every small torch op of a step ends in a barrier that waits for the slowest thread.
THREAD_WORK_THRESHOLD = 1e8


def default_threads(work: float | None) -> int | None:
    """The thread count for a job whose largest matrix product of one step costs ``work`` multiply-adds.

    ``1`` below :data:`THREAD_WORK_THRESHOLD` (small products: the pools' barriers cost more than they share);
    else the usable cores, or ``OMP_NUM_THREADS`` when the environment sets it; ``None`` (leave every pool as it
    is) when the work is not known."""
    if work is None:
        return None
    if work < THREAD_WORK_THRESHOLD:
        return 1
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) >= 1:
        return int(env)
    return usable_cores()


def check_threads(threads: int | None, option: str = "--threads") -> None:
    if threads is not None and threads < 1:
        raise UserError(f"{option} must be at least 1, not {threads}")


def chosen_threads(threads: int | None, work: float | None = None) -> int | None:
    """What :func:`thread_limits` applies: ``threads`` when given (``--threads``), else :func:`default_threads`
    of ``work``."""
    check_threads(threads)
    return default_threads(work) if threads is None else int(threads)


@contextlib.contextmanager
def thread_limits(threads: int | None, work: float | None = None) -> Iterator[None]:
    """The same thread count for torch, numpy's BLAS (threadpoolctl) and FAISS (OpenMP) inside the block.

    ``threads`` (``--threads``) wins when given; ``None`` applies :func:`default_threads` of ``work`` (the
    multiply-adds of the job's largest matrix product per step: one thread for small problems), and leaves every
    pool as it is when ``work`` is None too. The previous settings come back on exit."""
    threads = chosen_threads(threads, work)
    if threads is None:
        yield
        return
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    # featstore.index raises FAISS to all cores on its first use; make that happen now, before our setting
    use_all_threads()
    old_torch, old_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(old_torch)
        faiss.omp_set_num_threads(old_faiss)


def progress_bar(total: int | None, desc: str, *, quiet: bool = False, unit: str = "it", leave: bool = False):
    """A tqdm bar on stderr when it is a terminal and ``quiet`` is not set; silent otherwise."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=quiet or not sys.stderr.isatty(), leave=leave,
                file=sys.stderr, dynamic_ncols=True)

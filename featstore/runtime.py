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


def check_threads(threads: int | None, option: str = "--threads") -> None:
    if threads is not None and threads < 1:
        raise UserError(f"{option} must be at least 1, not {threads}")


@contextlib.contextmanager
def thread_limits(threads: int | None) -> Iterator[None]:
    """The same thread count for torch, numpy's BLAS (threadpoolctl) and FAISS (OpenMP) inside the block.

    ``None`` leaves every pool as it is. The previous settings come back on exit."""
    check_threads(threads)
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

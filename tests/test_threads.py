"""The one thread rule (featstore.runtime.default_threads / thread_limits) and its use by bench lowshot."""

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from featstore import runtime
from featstore.errors import UserError


def _blas_threads() -> set[int]:
    return {info["num_threads"] for info in threadpool_info() if info.get("user_api") == "blas"}


def test_small_problem_gets_one_thread(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    # the demo's low-shot product: batch 200 x 64 dims x (25 classifiers x 10 classes)
    assert runtime.default_threads(200 * 64 * 25 * 10) == 1
    assert runtime.default_threads(runtime.THREAD_WORK_THRESHOLD - 1) == 1


def test_large_problem_gets_every_usable_core(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "usable_cores", lambda: 16)
    # bench perf's low-shot problem: batch 1000 x 512 dims x (25 classifiers x 100 classes)
    assert runtime.default_threads(1000 * 512 * 25 * 100) == 16
    assert runtime.default_threads(runtime.THREAD_WORK_THRESHOLD) == 16
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.default_threads(1e12) == 3


def test_unknown_work_leaves_the_pools_alone():
    assert runtime.default_threads(None) is None
    assert runtime.chosen_threads(None) is None
    assert runtime.chosen_threads(4, work=1.0) == 4      # --threads wins over the rule
    with pytest.raises(UserError):
        runtime.chosen_threads(0)


def test_thread_limits_applies_the_rule_and_restores():
    before_torch, before_blas = torch.get_num_threads(), _blas_threads()
    with runtime.thread_limits(None, work=1e4):
        assert torch.get_num_threads() == 1
        assert _blas_threads() <= {1}
    assert torch.get_num_threads() == before_torch
    assert _blas_threads() == before_blas
    with runtime.thread_limits(None):
        assert torch.get_num_threads() == before_torch


def test_lowshot_work_sizes_the_demo_store_below_the_threshold(tmp_path):
    from bench.lowshot import LowShotConfig, lowshot_work
    from featstore.store import Layout, write_store

    n, d = 1797, 64
    rng = np.random.default_rng(0)
    store = write_store(tmp_path / "s.zarr", Layout(n=n, dim=d, dtype="float32", chunk_rows=4096),
                        rng.random((n, d), dtype=np.float32), fingerprint={"model": "t"},
                        classes=[str(c) for c in range(10)], labels=np.arange(n) % 10,
                        ids=[f"r{i}" for i in range(n)])
    cfg = LowShotConfig(store=str(store.path), out=str(tmp_path / "o"), batch_size=200)
    work = lowshot_work(cfg, [1, 2, 5, 10, 20])
    # by hand: the logreg logits, batch x d x (P x C), or the generator's hidden layer, 128 x d x 512
    assert work == max(200 * 64 * (5 * 5) * 10, 128 * 64 * 512)
    assert runtime.default_threads(work) == 1
    big = LowShotConfig(store=str(store.path), out=str(tmp_path / "o"), batch_size=1000, solver="lbfgs")
    assert lowshot_work(big, [1, 2, 5, 10, 20]) == n * 64 * 25 * 10   # L-BFGS: a block of the whole pool

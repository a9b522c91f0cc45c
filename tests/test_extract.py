import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from extract import backbones as bb
from extract import datasets as ds
from extract.run import ExtractConfig, chunk_batches, rank_chunks, run_extraction
from featstore.store import FeatureStore

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def cli(*args, check_rc=None, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "extract.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=timeout)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


def tree_bytes(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
            and p.name != ".featstore.lock"}


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_features_equal_a_direct_forward_pass(tmp_path):
    """The store holds exactly what the backbone computes on the transformed images, in row order."""
    cfg = ExtractConfig(model="conv4", out=str(tmp_path / "s.zarr"), dataset="digits", random_init=True,
                        limit=200, chunk_rows=64, batch_size=16, dtype="float32", workers=0, seed=3, quiet=True)
    result = run_extraction(cfg)
    assert result.complete and result.rows_computed == 200
    store = FeatureStore.open(cfg.out)
    source = ds.open_source("digits")
    torch.manual_seed(3)
    model = bb.create_backbone("conv4", small_input=True).eval()
    spec = store.fingerprint["transform"]
    transform = ds.build_transform(spec)
    with torch.inference_mode():
        x = torch.stack([transform(source.load(i)) for i in range(200)])
        expected = model(x).numpy()
    np.testing.assert_allclose(store.load_features(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(store.labels, source.labels[:200])
    assert list(store.ids) == list(source.ids[:200])
    assert store.fingerprint["weights"] == {"kind": "random-init", "seed": 3, "small_input": True}


def test_batches_are_chunk_aligned():
    assert chunk_batches(64, 128, 24) == [list(range(64, 88)), list(range(88, 112)), list(range(112, 128))]
    assert [list(rank_chunks(10, r, 3)) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]


def test_random_features_need_an_explicit_flag(tmp_path):
    proc = cli("--model", "resnet10", "--dataset", "digits", "--out", tmp_path / "s.zarr")
    assert_one_line_error(proc, "--random-init", "--checkpoint")
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("args,needles", [
    (["--model", "nonet", "--random-init"], ["unknown", "nonet"]),
    (["--model", "conv4", "--random-init", "--dataset", "nodata"], ["nodata"]),
    (["--model", "conv4", "--random-init", "--dataset", "imagefolder", "--data-root", "/no/such/dir"],
     ["/no/such/dir"]),
    (["--model", "conv4", "--checkpoint", "/no/such.pt"], ["/no/such.pt"]),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, needles):
    proc = cli(*args, "--out", tmp_path / "s.zarr")
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "s.zarr").exists()


def test_checkpoint_that_does_not_fit_names_the_first_bad_key(tmp_path):
    ckpt = tmp_path / "c.pt"
    bb.save_checkpoint(ckpt, bb.create_backbone("conv4"))
    proc = cli("--model", "resnet10", "--checkpoint", ckpt, "--out", tmp_path / "s.zarr")
    assert_one_line_error(proc, "conv4")
    torch.save(bb.create_backbone("conv4").state_dict(), ckpt)  # a plain state dict for another model
    proc = cli("--model", "resnet10", "--checkpoint", ckpt, "--out", tmp_path / "s.zarr")
    assert_one_line_error(proc, "does not fit resnet10", "key")
    assert not (tmp_path / "s.zarr").exists()


def test_checkpoint_is_recorded(tmp_path):
    ckpt = tmp_path / "c.pt"
    torch.manual_seed(0)
    bb.save_checkpoint(ckpt, bb.create_backbone("conv4", small_input=True), classes=["a", "b"])
    relative = os.path.relpath(ckpt, ROOT)    # as typed by a user in the folder extract runs in
    cli("--model", "conv4", "--checkpoint", relative, "--limit", 50, "--out", tmp_path / "s.zarr", check_rc=0)
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.fingerprint["checkpoint_sha256"] == bb.sha256_file(ckpt)
    assert store.provenance["checkpoint_classes"] == ["a", "b"]
    assert store.provenance["config"]["checkpoint"] == str(ckpt)   # recorded absolute: found from anywhere


def test_append_with_another_fingerprint_is_refused(tmp_path):
    out = tmp_path / "s.zarr"
    cli("--model", "conv4", "--random-init", "--limit", 100, "--chunk-rows", 32, "--out", out, check_rc=0)
    before = tree_bytes(out)
    proc = cli("--model", "conv4", "--random-init", "--seed", 1, "--limit", 100, "--chunk-rows", 32, "--out", out)
    assert_one_line_error(proc, "another fingerprint", "seed")
    assert tree_bytes(out) == before
    proc = cli("--model", "conv4", "--random-init", "--limit", 100, "--chunk-rows", 32, "--out", out)
    assert proc.returncode == 0 and "nothing to do" in proc.stdout


def test_corrupt_image_is_one_line(tmp_path):
    root = tmp_path / "tree"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((10, 10, 3), 40 * i, np.uint8)).save(root / cls / f"{i}.png")
    (root / "b" / "1.png").write_bytes(b"not a png at all")
    proc = cli("--model", "conv4", "--random-init", "--dataset", "imagefolder", "--data-root", root,
               "--out", tmp_path / "s.zarr")
    assert_one_line_error(proc, "b/1.png")


def test_full_disk_is_one_line_and_leaves_done_chunks_intact(tmp_path, monkeypatch, capsys):
    from extract.cli import cli as group
    from featstore.cli_support import run_cli

    out = tmp_path / "s.zarr"
    real_write = FeatureStore.write_chunk

    def write_until_full(self, i, *args, **kwargs):
        if i >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, i, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "write_chunk", write_until_full)
    monkeypatch.setattr(sys, "argv", ["extract", "--model", "conv4", "--random-init", "--limit", "200",
                                      "--chunk-rows", "32", "--workers", "0", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(group, "extract")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "no space left" in err and "\n" not in err
    monkeypatch.setattr(FeatureStore, "write_chunk", real_write)
    store = FeatureStore.open(out)
    assert store.done_chunks().tolist() == [True, True] + [False] * 5
    assert store.verify(check_values=True)[0].startswith("5 of 7 chunks not done")
    # the same command finishes the job
    result = run_extraction(ExtractConfig(model="conv4", out=str(out), random_init=True, limit=200, chunk_rows=32,
                                          workers=0, quiet=True))
    assert result.complete and result.chunks_computed == 5


def test_views_and_maps(tmp_path):
    cfg = ExtractConfig(model="conv4", out=str(tmp_path / "a.zarr"), random_init=True, limit=40, chunk_rows=16,
                        batch_size=8, views=3, maps="layer2", workers=0, quiet=True)
    run_extraction(cfg)
    store = FeatureStore.open(cfg.out)
    views = store.load_views()
    assert views.shape == (3, 40, store.dim)
    assert not np.allclose(views[0], views[1])
    assert store.load_maps().shape[0] == 40 and store.load_maps().ndim == 4
    cfg.out = str(tmp_path / "b.zarr")
    cfg.batch_size = 5
    run_extraction(cfg)
    np.testing.assert_array_equal(FeatureStore.open(cfg.out).load_views(), views)


def _extract_args(out):
    return ["--model", "resnet10", "--random-init", "--chunk-rows", "128", "--batch-size", "32", "--limit", "1280",
            "--workers", "1", "--threads", "1", "--out", out]


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    killed, clean = tmp_path / "killed.zarr", tmp_path / "clean.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "extract.cli", *_extract_args(killed)], env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    done_dir = killed / "done" / "c"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if done_dir.is_dir() and len(list(done_dir.iterdir())) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the extraction finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = FeatureStore.open(killed)
    n_done = int(partial.done_chunks().sum())
    assert 3 <= n_done < partial.n_chunks
    resumed = cli(*_extract_args(killed), check_rc=0)
    assert f"{(partial.n_chunks - n_done) * 128} rows" in resumed.stdout
    cli(*_extract_args(clean), check_rc=0)
    a, b = FeatureStore.open(killed), FeatureStore.open(clean)
    np.testing.assert_array_equal(a.load_features(dtype="float16"), b.load_features(dtype="float16"))
    feats = lambda p: {k: v for k, v in tree_bytes(p).items() if k.startswith(("features/", "labels/", "ids/"))}
    assert feats(killed) == feats(clean)


def test_torchrun_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    args = ["--model", "resnet10", "--random-init", "--chunk-rows", "100", "--batch-size", "50", "--limit", "700",
            "--workers", "0", "--threads", "1"]
    cli(*args, "--out", one, check_rc=0)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "extract.cli", *args, "--out", two], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = FeatureStore.open(one), FeatureStore.open(two)
    assert b.complete
    np.testing.assert_array_equal(a.load_features(dtype="float16"), b.load_features(dtype="float16"))
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.fingerprint == b.fingerprint


@pytest.mark.parametrize("dataset,classes", [("omniglot", 964 + 659), ("fashion-mnist", 10)])
def test_real_data_extracts_through_worker_processes(tmp_path, shared_data, dataset, classes):
    root = shared_data / dataset
    cfg = ExtractConfig(model="conv4", out=str(tmp_path / "s.zarr"), dataset=dataset, data_root=str(root),
                        random_init=True, image_size=28, limit=96, chunk_rows=32, batch_size=16, workers=2,
                        quiet=True)
    assert run_extraction(cfg).complete
    store = FeatureStore.open(cfg.out)
    assert len(store.classes) == classes and store.n == 96
    source = ds.open_source(dataset, root=root)
    assert list(store.ids) == list(source.ids[:96])
    x = store.load_features()
    assert np.isfinite(x).all() and x.std() > 0


def test_command_line_spellings():
    """--no-channels-last (the old flag) still works beside --channels-last; -q is --quiet."""
    from extract.cli import cli as group

    ctx = group.make_context("extract", ["--model", "conv4", "--out", "s.zarr", "--no-channels-last", "-q",
                                         "--threads", "3"])
    assert ctx.params["channels_last"] is False and ctx.params["quiet"] and ctx.params["threads"] == 3
    ctx = group.make_context("extract", ["--model", "conv4", "--out", "s.zarr"])
    assert ctx.params["channels_last"] is True and ctx.params["threads"] is None


def test_bad_device_and_threads_are_one_line_errors(tmp_path):
    from featstore.errors import UserError

    with pytest.raises(UserError, match="--device must be cpu, cuda or cuda:N"):
        run_extraction(ExtractConfig(model="conv4", out=str(tmp_path / "s.zarr"), device="tpu", random_init=True))
    with pytest.raises(UserError, match="--threads must be at least 1"):
        run_extraction(ExtractConfig(model="conv4", out=str(tmp_path / "s.zarr"), threads=0, random_init=True))
    assert not (tmp_path / "s.zarr").exists()

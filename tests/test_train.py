"""Representation training and fine-tuning on tiny data (scikit-learn digits at 16 px, conv4, a few steps)."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from extract import backbones as bb
from extract import datasets as ds
from extract.train import (
    PRECISE_BN_IMAGES,
    BatchAugment,
    TrainConfig,
    finetune,
    holdout,
    load_training_data,
    lr_at,
    param_groups,
    rank_batches,
    resolve_augment,
    resolve_base_classes,
    set_bn_mode,
    set_trainable_stages,
    train,
    write_finetuned,
)
from featstore.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1"}

TINY = dict(model="conv4", dataset="digits", image_size=16, epochs=1, batch_size=32, optimizer="sgd", lr=0.05,
            checkpoint_every=1, threads=1, quiet=True, steps_per_epoch=6, val="0.2")


def tiny(tmp_path, name="run", **kw) -> TrainConfig:
    return TrainConfig(out=str(tmp_path / name), **{**TINY, **kw})


def cli_args(cfg: TrainConfig) -> list[str]:
    return ["--model", cfg.model, "--dataset", cfg.dataset, "--image-size", str(cfg.image_size),
            "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size), "--optimizer", cfg.optimizer,
            "--lr", str(cfg.lr), "--checkpoint-every", str(cfg.checkpoint_every), "--threads", str(cfg.threads),
            "--val", cfg.val, "--out", cfg.out, "--quiet", "--schedule", cfg.schedule]


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip(tmp_path):
    cfg = tiny(tmp_path, base_classes="0-6", steps_per_epoch=None, epochs=2, optimizer="adam", lr=0.003,
               schedule="cosine")
    metrics = train(cfg)
    out = Path(cfg.out)
    assert sorted(p.name for p in out.iterdir()) == ["curve.png", "epoch_001.pt", "epoch_002.pt", "last.pt",
                                                      "metrics.json"]
    assert json.loads((out / "metrics.json").read_text())["final"] == metrics["final"]
    assert metrics["final"]["val_top1"] > 50  # 7 digit classes after two short epochs
    raw = load(out / "last.pt")  # weights_only: everything in it is plain data
    source = ds.open_source("digits")
    assert raw["classes"] == [str(k) for k in range(7)]
    prov = raw["provenance"]
    assert prov["manifest_hash"] == source.manifest_hash() == prov["data"]["manifest_hash"]
    assert prov["class_split"]["base"] == list(range(7)) and prov["class_split"]["novel"] == [7, 8, 9]
    assert prov["config"]["base_classes"] == "0-6" and prov["transform"]["size"] == 16
    assert set(raw["classifier"]) == {"weight"} and raw["classifier"]["weight"].shape == (7, 64)
    assert raw["train_state"]["epoch"] == 2 and raw["train_state"]["optimizer"]["state"]

    # a fresh model with the checkpoint reproduces the validation accuracy through the extraction transform
    model = bb.create_backbone("conv4", small_input=True)
    info = bb.load_checkpoint(model, out / "last.pt")
    assert info["classes"] == raw["classes"] and torch.equal(info["classifier"]["weight"], raw["classifier"]["weight"])
    assert_same_tensors(model.state_dict(), raw["state_dict"])
    model.eval()
    labels = source.labels[source.labels < 7]
    index = np.nonzero(source.labels < 7)[0]
    _, val_pos = holdout(labels, "0.2", seed=0)
    transform = ds.build_transform(prov["transform"])
    x = torch.stack([transform(source.load(int(index[p]))) for p in val_pos])
    with torch.no_grad():
        logits = model(x) @ info["classifier"]["weight"].t()
        again = bb.create_backbone("conv4", small_input=True)
        bb.load_checkpoint(again, out / "epoch_002.pt")
        assert torch.equal(again.eval()(x), model(x))
    top1 = 100.0 * (logits.argmax(1).numpy() == labels[val_pos]).mean()
    assert abs(top1 - metrics["final"]["val_top1"]) <= 100.0 / len(val_pos) + 1e-9


def test_classifier_bias_and_rotation_head(tmp_path):
    cfg = tiny(tmp_path, bias=True, rotation="aux", steps_per_epoch=2)
    metrics = train(cfg)
    raw = load(Path(cfg.out) / "last.pt")
    assert set(raw["classifier"]) == {"weight", "bias"}
    assert raw["train_state"]["rotation_head"]["weight"].shape == (4, 64)
    assert metrics["history"][0]["train_rot"] > 0
    inv = train(tiny(tmp_path, "inv", rotation="invariant", steps_per_epoch=2))
    assert inv["history"][0]["train_rot"] == 0


def test_streaming_and_in_memory_give_the_same_weights(tmp_path):
    a = tiny(tmp_path, "mem", steps_per_epoch=4)
    b = replace(a, out=str(tmp_path / "stream"), memory_limit_gb=0.0)
    ma, mb = train(a), train(b)
    assert ma["data"]["in_memory"] and not mb["data"]["in_memory"]
    assert_same_tensors(load(Path(a.out) / "last.pt")["state_dict"], load(Path(b.out) / "last.pt")["state_dict"])
    assert ma["final"] == mb["final"]


def test_resume_after_sigkill_gives_the_same_weights(tmp_path):
    cfg = tiny(tmp_path, "killed", epochs=3, steps_per_epoch=None, batch_size=32, schedule="cosine")
    out = Path(cfg.out)
    proc = subprocess.Popen([sys.executable, "-m", "extract.train", *cli_args(cfg)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "epoch_001.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "epoch_003.pt").exists(), "the run ended before the kill; make the epochs longer"
    with pytest.raises(UserError, match="--resume"):
        train(cfg)
    with pytest.raises(UserError, match="lr was 0.05, now 0.1"):
        train(replace(cfg, resume=True, lr=0.1))
    resumed = train(replace(cfg, resume=True))
    straight = train(replace(cfg, out=str(tmp_path / "straight")))
    a, b = load(out / "last.pt"), load(tmp_path / "straight" / "last.pt")
    assert a["train_state"]["epoch"] == b["train_state"]["epoch"] == 3
    assert_same_tensors(a["state_dict"], b["state_dict"])
    assert_same_tensors(a["classifier"], b["classifier"])
    assert [h["val_top1"] for h in resumed["history"]] == [h["val_top1"] for h in straight["history"]]
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in straight["history"]]
    # resuming a finished run does nothing
    assert train(replace(cfg, resume=True))["epochs_done"] == 3


def test_torchrun_two_processes(tmp_path):
    cfg = tiny(tmp_path, "ddp", epochs=1, steps_per_epoch=None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "extract.train", *cli_args(cfg)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(cfg.out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["final"]["val_top1"] is not None
    model = bb.create_backbone("conv4", small_input=True)
    info = bb.load_checkpoint(model, out / "last.pt")
    assert info["classes"] == [str(k) for k in range(10)]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "curve.png", "epoch_001.pt", "last.pt", "metrics.json"]


def test_rank_batches_shard_like_distributed_sampler():
    perm = torch.arange(10)
    assert rank_batches(perm, 4, 0, 1) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert rank_batches(perm, 3, 0, 1) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]  # no one-image batch (BatchNorm)
    r0, r1, r2 = (rank_batches(perm, 6, r, 3) for r in range(3))
    assert r0 == [[0, 3], [6, 9]] and r1 == [[1, 4], [7, 0]] and r2 == [[2, 5], [8, 1]]


# ------------------------------------------------------------------------------------------------ inputs


def test_unknown_class_in_the_base_list_is_a_user_error(tmp_path):
    listing = tmp_path / "base.txt"
    listing.write_text("# base classes\n0\n3\nseven\n")
    with pytest.raises(UserError, match=r"unknown class 'seven' in .*base.txt \(line 4\)"):
        train(tiny(tmp_path, base_classes=str(listing)))
    assert not (tmp_path / "run").exists()
    proc = subprocess.run([sys.executable, "-m", "extract.train", "--model", "conv4", "--out", str(tmp_path / "c"),
                           "--base-classes", str(listing)], cwd=ROOT, env=ENV, capture_output=True, text=True)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "seven" in lines[0], proc.stderr


@pytest.mark.parametrize("val,message", [
    ("0.001", "validation part .* is empty"),
    ("drawer>=17", "no per-sample field 'drawer'"),
    ("1.5", "fraction must be in"),
    ("split=test", "no split 'test'"),
    ("sometimes", "neither a fraction"),
])
def test_bad_validation_parts_are_user_errors(tmp_path, val, message):
    with pytest.raises(UserError, match=message):
        train(tiny(tmp_path, val=val))


@pytest.mark.parametrize("kw,message", [
    (dict(aux="sgm"), "needs a positive weight"),
    (dict(aux_weight=0.1), "needs an auxiliary loss"),
    (dict(image_size=8), "too small for conv4"),
    (dict(base_classes="0-12"), "out of range"),
    (dict(base_classes="test"), "not a class range"),
    (dict(model="nonet"), "unknown model"),
])
def test_bad_requests_are_user_errors(tmp_path, kw, message):
    with pytest.raises(UserError, match=message):
        train(tiny(tmp_path, **kw))


def test_holdout_rules():
    labels = np.repeat(np.arange(3), 20)
    drawer = np.tile(np.arange(1, 21), 3)
    train_pos, val_pos = holdout(labels, "drawer>=17", meta={"drawer": drawer})
    assert len(val_pos) == 12 and (drawer[val_pos] >= 17).all() and (drawer[train_pos] < 17).all()
    t1, v1 = holdout(labels, "0.25", seed=3)
    t2, v2 = holdout(labels, "0.25", seed=3)
    assert np.array_equal(v1, v2) and np.bincount(labels[v1]).tolist() == [5, 5, 5]
    assert not np.array_equal(v1, holdout(labels, "0.25", seed=4)[1])
    assert sorted(np.concatenate([t1, v1]).tolist()) == list(range(60))
    _, v = holdout(labels, "split=b", splits={"b": np.array([1, 2])})
    assert v.tolist() == [1, 2]
    assert len(holdout(labels, "none")[1]) == 0


def test_base_class_specs(tmp_path):
    source = ds.open_source("digits")
    assert resolve_base_classes(source, None) == list(range(10))
    assert resolve_base_classes(source, "0-2,7") == [0, 1, 2, 7]
    listing = tmp_path / "names.txt"
    listing.write_text("9\n\n4  # comment\n")
    assert resolve_base_classes(source, str(listing)) == [9, 4]
    with pytest.raises(UserError, match="twice"):
        resolve_base_classes(source, "1-3,2")
    source.splits = {"some": np.array([0, 1, 2])}
    assert resolve_base_classes(source, "some") == sorted(set(source.labels[:3].tolist()))


def test_learning_rate_schedules():
    cfg = TrainConfig(model="conv4", out="x", lr=0.1, epochs=90, step_epochs=[30])
    assert [round(lr_at(cfg, e), 6) for e in (0, 29, 30, 60, 89)] == [0.1, 0.1, 0.01, 0.001, 0.001]
    cfg = replace(cfg, step_epochs=[60], warmup_epochs=1)
    assert [round(lr_at(cfg, e), 6) for e in (0, 1, 59, 60)] == [0.01, 0.1, 0.1, 0.01]
    cfg = replace(cfg, step_epochs=[20, 50], warmup_epochs=0)
    assert [round(lr_at(cfg, e), 6) for e in (19, 20, 49, 50, 89)] == [0.1, 0.01, 0.01, 0.001, 0.001]
    cos = replace(cfg, schedule="cosine", epochs=10, warmup_epochs=2, warmup_lr=0.005)
    assert lr_at(cos, 0) == 0.005 and lr_at(cos, 2, 0, 10) == pytest.approx(0.1)
    assert lr_at(cos, 6, 0, 10) == pytest.approx(0.05) and lr_at(cos, 9, 10, 10) == pytest.approx(0.0)


def test_batch_augment():
    spec = {"size": 8, "resize": None, "channels": 3, "normalize": "none", "interpolation": "bilinear"}
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    clean = BatchAugment({"kind": "none"}, spec, 8).clean(x)
    assert clean.shape == (5, 3, 8, 8) and torch.equal(clean[:, 0], x[:, 0].float() / 255)
    shift = BatchAugment(resolve_augment("auto", 8, "digits"), spec, 8)
    assert shift.plan == {"kind": "shift", "shift": 1, "pad": "replicate", "flip": False}
    a = shift(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, shift(x, torch.Generator().manual_seed(1)))
    for i in range(5):  # every view is the image moved by at most one pixel (replicated borders)
        base = x[i, 0].float() / 255
        padded = torch.nn.functional.pad(base[None, None], (1, 1, 1, 1), mode="replicate")[0, 0]
        assert any(torch.equal(a[i, 0], padded[dy:dy + 8, dx:dx + 8]) for dy in range(3) for dx in range(3))
    assert resolve_augment("auto", 28, "fashion-mnist")["flip"] is True
    assert resolve_augment("auto", 84, "omniglot") == {"kind": "lowshot", "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3],
                                                       "jitter": 0.4, "flip": False}
    big = {**spec, "size": 72, "resize": 80, "normalize": "imagenet"}
    lowshot = BatchAugment(resolve_augment("auto", 72, "cifar10"), big, 80)
    y = torch.randint(0, 256, (4, 3, 80, 80), dtype=torch.uint8)
    assert lowshot.plan["kind"] == "lowshot" and lowshot(y, torch.Generator().manual_seed(0)).shape == (4, 3, 72, 72)
    ref = ds.build_transform(big)  # the clean view equals the extraction transform (centre crop, normalisation)
    from PIL import Image

    img = Image.fromarray(y[0].permute(1, 2, 0).numpy())
    torch.testing.assert_close(lowshot.clean(y[:1])[0], ref(img), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ fine-tuning


def _step(model: nn.Module, opt: torch.optim.Optimizer):
    x = torch.randn(4, 3, 32, 32)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("name,tune_part", [("conv4", 1), ("conv4", 2), ("conv4", 4), ("resnet10", 4),
                                            ("resnet10", 5), ("resnet12", 1)])
def test_set_trainable_stages_freezes_exactly_the_first_stages(name, tune_part):
    torch.manual_seed(0)
    model = bb.create_backbone(name, small_input=True)
    trainable = set_trainable_stages(model, tune_part)
    names = model.stage_names
    assert trainable == names[len(names) - tune_part:]
    for stage, module in model.stages():
        assert all(p.requires_grad == (stage in trainable) for p in module.parameters()), stage
    before = {k: v.clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=1e-3)
    model.train()
    _step(model, opt)
    for stage, module in model.stages():
        for key, p in module.named_parameters():
            changed = not torch.equal(before[f"{stage}.{key}"], p)
            if stage in trainable:
                assert changed or p.grad is None or not p.grad.any(), f"{stage}.{key} did not move"
            else:
                assert not changed, f"frozen {stage}.{key} moved"
    moved = [k for k, p in model.named_parameters() if not torch.equal(before[k], p)]
    assert moved and all(k.split(".")[0] in trainable for k in moved)
    with pytest.raises(UserError, match="tune_part"):
        set_trainable_stages(model, len(names) + 1)


def test_param_groups_and_bn_mode():
    model = bb.create_backbone("conv4", small_input=True)
    head = nn.Linear(64, 5)
    set_trainable_stages(model, 2)
    groups = param_groups(model, head, 1e-4, 0.03, 5e-4)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [("backbone", 1e-4, 5e-4), ("head", 0.03, 5e-4)]
    assert len(groups[0]["params"]) == len(list(model.layer3.parameters())) + len(list(model.layer4.parameters()))
    assert [g["name"] for g in param_groups(model, head, 0.0, 0.03)] == ["head"]
    model.train()
    set_bn_mode(model, False)
    assert not model.layer1[1].training and model.layer1[0].training and model.training


def test_finetune_and_write_finetuned(tmp_path):
    torch.manual_seed(0)
    model = bb.create_backbone("conv4", small_input=True)
    parent = tmp_path / "parent.pt"
    bb.save_checkpoint(parent, model)
    head = nn.Linear(64, 3)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 3, (8,), generator=gen))
               for _ in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head_before = head.weight.clone()
    losses = []
    finetune(model, head, batches, tune_part=1, backbone_lr=0.01, head_lr=0.1, epochs=2, bn_train=True,
             on_step=lambda e, s, loss: losses.append(loss))
    assert len(losses) == 6 and not model.training
    after = model.state_dict()
    for key in before:
        stage = key.split(".")[0]
        if stage == "layer4" and not key.endswith("num_batches_tracked"):
            assert not torch.equal(before[key], after[key]), key
        elif key.endswith(("weight", "bias")):
            assert torch.equal(before[key], after[key]), key
    # bn_train=True re-estimates the statistics of every stage, frozen ones included (as TANE's and DNPG's
    # fine-tuning does)
    assert not torch.equal(before["layer1.1.running_mean"], after["layer1.1.running_mean"])
    assert not torch.equal(head_before, head.weight)
    assert all(p.requires_grad for p in model.parameters())  # flags restored

    frozen = bb.create_backbone("conv4", small_input=True)
    frozen_before = {k: v.clone() for k, v in frozen.state_dict().items()}
    finetune(frozen, nn.Linear(64, 3), lambda epoch: batches, tune_part=4, backbone_lr=0.0, head_lr=0.1)
    assert_same_tensors(frozen.state_dict(), frozen_before)  # the frozen variant touches nothing, BN included

    # an episode-style item: (images, labels, extra) with a custom loss
    seen = []
    finetune(model, head, [(batches[0][0], batches[0][1], torch.tensor(5))],
             lambda h, f, y, extra: (seen.append(int(extra)) or nn.functional.cross_entropy(h(f), y)),
             tune_part=4, backbone_lr=1e-3, head_lr=0.1)
    assert seen == [5]

    out = tmp_path / "tuned.pt"
    digest = write_finetuned(model, out, head=head, classes=["a", "b", "c"], parent=parent,
                             settings={"tune_part": 1, "backbone_lr": 0.01})
    assert digest == bb.sha256_file(out)
    fresh = bb.create_backbone("conv4", small_input=True)
    info = bb.load_checkpoint(fresh, out)
    assert_same_tensors(fresh.state_dict(), model.state_dict())
    assert info["provenance"]["parent_sha256"] == bb.sha256_file(parent)
    assert info["provenance"]["finetune"]["tune_part"] == 1
    assert set(info["classifier"]) == {"weight", "bias"} and info["classes"] == ["a", "b", "c"]
    with pytest.raises(UserError, match="re-iterable"):
        finetune(model, head, iter(batches), tune_part=1, backbone_lr=0.01, head_lr=0.1, epochs=2)


def test_command_line_spellings():
    """--wd is --weight-decay; --threads reaches TrainConfig; -q is --quiet."""
    from extract.train import train_command

    base = ["--model", "conv4", "--out", "run"]
    ctx = train_command.make_context("train", [*base, "--wd", "0.5", "--threads", "2", "-q"])
    assert ctx.params["weight_decay"] == 0.5 and ctx.params["threads"] == 2 and ctx.params["quiet"]
    ctx = train_command.make_context("train", [*base, "--weight-decay", "0.25"])
    assert ctx.params["weight_decay"] == 0.25 and ctx.params["threads"] is None


def test_bad_threads_and_device_are_refused_before_anything_runs(tmp_path):
    cfg = TrainConfig(model="conv4", out=str(tmp_path / "run"), threads=0)
    with pytest.raises(UserError, match="--threads must be at least 1"):
        train(cfg)
    with pytest.raises(UserError, match="--device must be cpu, cuda or cuda:N"):
        train(replace(cfg, threads=None, device="tpu"))
    assert not (tmp_path / "run").exists()


def _hand_bn_stats(conv: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and unbiased variance of conv(x) over images and positions (numpy, float64)."""
    with torch.no_grad():
        z = conv(x).double().numpy()
    per_channel = z.transpose(1, 0, 2, 3).reshape(z.shape[1], -1)
    return per_channel.mean(1), per_channel.var(1, ddof=1)


def test_precise_bn_stats_are_those_of_the_final_weights(tmp_path):
    cfg = tiny(tmp_path, "precise", lr=0.2)
    train(cfg)
    ema_cfg = tiny(tmp_path, "ema", lr=0.2, bn_stats="ema")
    train(ema_cfg)
    precise, ema = load(Path(cfg.out) / "last.pt"), load(Path(ema_cfg.out) / "last.pt")
    # the statistics are all that differ: the weights followed the same path
    for key, value in precise["state_dict"].items():
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(value, ema["state_dict"][key]), key
    assert torch.equal(precise["state_dict"]["layer1.1.num_batches_tracked"],
                       ema["state_dict"]["layer1.1.num_batches_tracked"])
    data = load_training_data(cfg)
    # the images the statistics come from: a fixed spread (seed 0) of PRECISE_BN_IMAGES training images
    used = data.train_pos[np.random.default_rng(0).permutation(len(data.train_pos))[:PRECISE_BN_IMAGES]]
    assert len(data.train_pos) > PRECISE_BN_IMAGES == len(used)
    clean = BatchAugment({"kind": "none"}, data.spec, data.frame_spec["size"]).clean(data.images[used])
    model = bb.create_backbone("conv4", small_input=precise["small_input"])
    bb.load_checkpoint(model, Path(cfg.out) / "last.pt")
    mean, var = _hand_bn_stats(model.layer1[0], clean)
    np.testing.assert_allclose(precise["state_dict"]["layer1.1.running_mean"].numpy(), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(precise["state_dict"]["layer1.1.running_var"].numpy(), var, rtol=1e-4, atol=1e-5)
    # the running averages of training are another thing (six steps at lr 0.2 from a random start)
    gap = np.abs(ema["state_dict"]["layer1.1.running_var"].numpy() - var).max()
    assert gap > 100 * np.abs(precise["state_dict"]["layer1.1.running_var"].numpy() - var).max()
    with pytest.raises(UserError, match="bn_stats"):
        train(tiny(tmp_path, "bad", bn_stats="batch"))

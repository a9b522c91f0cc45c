"""bench fsor-finetune on a tiny omniglot-style tree the test writes (14 + 6 classes x 8 drawings at 28 px) and a
random conv4 checkpoint: what tune_part trains, the new checkpoint, the re-extracted store, the benchmark with the
head loaded (not meta-trained again), the frozen variant, and one-line errors."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from bench.fsor_finetune import FsorFinetuneConfig, load_finetuned_head, run_fsor_finetune, select_rows
from extract import backbones as bb
from extract import datasets as ds
from featstore.errors import UserError
from featstore.store import FeatureStore

BACKGROUND = {"Alpha": 7, "Beta": 7}  # 14 base classes
EVALUATION = {"Gamma": 6}  # 6 novel classes: 3 known + 2 unknown per test episode
DRAWERS = 8


def _write_tree(root: Path) -> None:
    """images_<set>/<Alphabet>/characterNN/IIII_DD.png: a random 28-px glyph per character, 8 noisy drawers."""
    rng = np.random.default_rng(0)
    cid = 0
    for s, alphabets in (("background", BACKGROUND), ("evaluation", EVALUATION)):
        for alpha, n in alphabets.items():
            for c in range(1, n + 1):
                cid += 1
                glyph = rng.random((28, 28)) > 0.7
                folder = root / f"images_{s}" / alpha / f"character{c:02d}"
                folder.mkdir(parents=True)
                for d in range(1, DRAWERS + 1):
                    drawing = glyph ^ (rng.random((28, 28)) > 0.93)
                    Image.fromarray((drawing * 255).astype(np.uint8)).save(folder / f"{cid:04d}_{d:02d}.png")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("fsorft")
    root = base / "omniglot"
    _write_tree(root)
    source = ds.open_source("omniglot", root, split="background")
    torch.manual_seed(0)
    model = bb.create_backbone("conv4", small_input=True)
    ckpt = base / "parent.pt"
    # a classifier over the base classes, as `extract train` writes it: TANE's base memory comes from its rows
    classifier = {"weight": torch.randn(len(source.classes), model.feature_dim)}
    bb.save_checkpoint(ckpt, model, classes=list(source.classes), classifier=classifier)
    return {"root": root, "checkpoint": ckpt, "classes": list(source.classes), "classifier": classifier["weight"]}


def config(tiny: dict, out: Path, **kw) -> FsorFinetuneConfig:
    settings = dict(checkpoint=str(tiny["checkpoint"]), out=str(out), dataset="omniglot", data_root=str(tiny["root"]),
                    split="background", train_rule="drawer<=6", val_rule="drawer>=7", test_split="evaluation",
                    image_size=28, head="tane", tune_part=1, backbone_lr=0.01, head_lr=0.05, epochs=2,
                    episodes_per_epoch=4, episodes_per_step=2, ways=3, open_ways=2, shots=1, queries=5,
                    val_episodes=4, test_episodes=20, batch_size=64, threads=1, seed=3, quiet=True)
    return FsorFinetuneConfig(**{**settings, **kw})


def cli_args(cfg: FsorFinetuneConfig) -> list[str]:
    return ["fsor-finetune", "--checkpoint", cfg.checkpoint, "--out", cfg.out, "--dataset", cfg.dataset,
            "--data-root", cfg.data_root, "--split", cfg.split, "--train-rule", cfg.train_rule,
            "--val-rule", cfg.val_rule, "--test-split", cfg.test_split, "--image-size", str(cfg.image_size),
            "--head", cfg.head, "--tune-part", str(cfg.tune_part), "--backbone-lr", str(cfg.backbone_lr),
            "--head-lr", str(cfg.head_lr), "--epochs", str(cfg.epochs),
            "--episodes-per-epoch", str(cfg.episodes_per_epoch), "--episodes-per-step", str(cfg.episodes_per_step),
            "--ways", str(cfg.ways), "--open-ways", str(cfg.open_ways), "--shots", str(cfg.shots),
            "--queries", str(cfg.queries), "--val-episodes", str(cfg.val_episodes),
            "--test-episodes", str(cfg.test_episodes), "--batch-size", str(cfg.batch_size),
            "--threads", str(cfg.threads), "--seed", str(cfg.seed), "--quiet"]


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_tune_part_1_trains_the_last_stage_and_the_head_then_benchmarks_the_loaded_head(tiny, tmp_path,
                                                                                        monkeypatch):
    from heads.tane import TANEHead

    def no_meta_training(*_a, **_k):
        raise AssertionError("the fine-tuned head must be loaded, not meta-trained again")

    monkeypatch.setattr(TANEHead, "meta_train", no_meta_training)
    out = tmp_path / "run"
    result = run_fsor_finetune(config(tiny, out))

    # only the last stage's parameters moved; the other stages are bit-identical
    parent, tuned = load(tiny["checkpoint"]), load(out / "finetuned.pt")
    model = bb.create_backbone("conv4", small_input=True)
    for name, _ in model.named_parameters():
        same = torch.equal(parent["state_dict"][name], tuned["state_dict"][name])
        assert same == (not name.startswith("layer4.")), name
    # --bn-train (the original): BN statistics of every stage, frozen ones included, follow the episodes
    assert not torch.equal(parent["state_dict"]["layer1.1.running_mean"], tuned["state_dict"]["layer1.1.running_mean"])

    # the new checkpoint loads, differs from its parent and names it
    fresh = bb.create_backbone("conv4", small_input=True)
    info = bb.load_checkpoint(fresh, out / "finetuned.pt")
    assert info["sha256"] == result["checkpoint_sha256"] != bb.sha256_file(tiny["checkpoint"])
    assert info["provenance"]["parent_sha256"] == bb.sha256_file(tiny["checkpoint"]) == result["parent_sha256"]
    assert info["provenance"]["finetune"]["tune_part"] == 1
    assert info["classes"] == tiny["classes"]  # all 14 background classes are base classes

    # the head trained: its attention moved away from the seeded initialisation; the memory is the checkpoint's
    # classifier (TANE keeps base weights fixed by default)
    head = load_finetuned_head(out / "finetuned.pt")
    init = TANEHead(feat_dim=64, n_base_classes=14, seed=3)
    assert not torch.equal(head.calib_attn.w_q.weight, init.calib_attn.w_q.weight)
    assert torch.equal(head.base_weights_, tiny["classifier"])
    assert result["head"]["base_memory"] == "checkpoint classifier rows"
    assert [h["epoch"] for h in result["history"]] == [1, 2] and "val_acc" in result["history"][0]
    assert result["selected"] == "val-best" and result["best_epoch"] in (1, 2)

    # the new store holds the test split through the new checkpoint
    store = FeatureStore.open(out / "store.zarr")
    assert store.fingerprint["checkpoint_sha256"] == result["checkpoint_sha256"]
    assert store.n == 6 * DRAWERS and store.split_names == ["evaluation"]

    # the benchmark ran on that store with the loaded head
    data = json.loads((out / "results.json").read_text())
    assert data["store"]["fingerprint_hash"] == store.fingerprint_hash
    assert data["config"]["ready_heads"] == ["tane-finetuned"]
    entry = data["metrics"]["heads"]["tane-finetuned"]["1-shot"]
    assert entry["decision"] == "argmax" and entry["episodes"] == 20
    assert 0 <= entry["acc"]["mean"] <= 100 and 0 <= entry["auroc"]["mean"] <= 100
    record = json.loads((out / "finetune.json").read_text())
    assert record["checkpoint_sha256"] == result["checkpoint_sha256"] and record["store"] == str(out / "store.zarr")

    # the same fine-tuning settings reuse the checkpoint (other test settings are fine); others never overwrite it
    again = run_fsor_finetune(config(tiny, out, test_episodes=10))
    assert again["reused_finetuning"] and again["checkpoint_sha256"] == result["checkpoint_sha256"]
    assert json.loads((out / "results.json").read_text())["config"]["episodes"] == 10
    with pytest.raises(UserError, match="already holds a fine-tuning with epochs=2, not 3"):
        run_fsor_finetune(config(tiny, out, epochs=3))
    assert bb.sha256_file(out / "finetuned.pt") == result["checkpoint_sha256"]


def test_same_seed_same_checkpoint(tiny, tmp_path):
    # dropout, BN statistics, episodes and augmentation are all seeded: two runs give the same weights
    states = []
    for name in ("a", "b"):
        run_fsor_finetune(config(tiny, tmp_path / name, tune_part=2, epochs=1, test_episodes=5))
        raw = load(tmp_path / name / "finetuned.pt")
        states.append({**raw["state_dict"], **{f"head.{k}": v for k, v in raw["classifier"].items()}})
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


@pytest.mark.parametrize("frozen,option_spelling", [({"tune_part": 0}, False), ({"backbone_lr": 0.0}, True)])
def test_cli_frozen_backbone_stays_bit_identical(tiny, tmp_path, frozen, option_spelling):
    """(The second run gives the head's setting as --head-option dnpg.phase2_epochs=3: the same head and label.)"""
    from bench.cli import cli

    cfg = config(tiny, tmp_path / "frozen", head="dnpg" if option_spelling else "dnpg:phase2_epochs=3", **frozen)
    args = cli_args(cfg) + ["--baseline-head", "protonet"]
    if option_spelling:
        args += ["--head-option", "dnpg.phase2_epochs=3"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    tuned = load(Path(cfg.out) / "finetuned.pt")
    parent = load(tiny["checkpoint"])
    assert tuned["state_dict"].keys() == parent["state_dict"].keys()
    for key, value in parent["state_dict"].items():  # weights and BN statistics: the backbone ran in eval mode
        assert torch.equal(value, tuned["state_dict"][key]), key
    assert bb.sha256_file(Path(cfg.out) / "finetuned.pt") != bb.sha256_file(tiny["checkpoint"])  # the head is new
    heads = json.loads((Path(cfg.out) / "results.json").read_text())["metrics"]["heads"]
    assert set(heads) == {"protonet", "dnpg-finetuned:phase2_epochs=3"}
    record = json.loads((Path(cfg.out) / "finetune.json").read_text())
    assert record["history"][-1]["backbone_lr"] == 0.0 and record["head"]["base_memory"].startswith("dnpg phase 2")


@pytest.mark.parametrize("change,needle", [
    ({"tune_part": 9}, "--tune-part 9"),
    ({"train_rule": "colour<3"}, "no per-sample field 'colour'"),
    ({"val_rule": "drawer>=6"}, "share"),
    ({"head": "protonet"}, "cannot be fine-tuned"),
    ({"test_split": "nosuch"}, "unknown split 'nosuch'"),
    ({"checkpoint": "missing.pt"}, "not found"),
    ({"queries": 9}, "--train-rule, --ways"),
    ({"test_split": "background"}, "--test-split 'background' and the base classes of --train-rule 'drawer<=6' share "
                                   "14 class(es): "),
])
def test_bad_arguments_exit_2_with_one_line(tiny, tmp_path, monkeypatch, capsys, change, needle):
    from bench import cli

    cfg = replace(config(tiny, tmp_path / "bad"), **change)
    monkeypatch.setattr(sys, "argv", ["bench", *cli_args(cfg)])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.count("\n") == 1 and err.startswith("bench: error:") and needle in err, err
    assert not (tmp_path / "bad").exists()  # nothing written for a bad request


def test_overlapping_class_sets_are_refused_or_recorded(tiny, tmp_path):
    from bench.fsor_finetune import check_class_sets

    assert check_class_sets(config(tiny, tmp_path / "ok")) == []  # evaluation classes: novel
    cfg = config(tiny, tmp_path / "x", train_rule="class<7", val_rule="class>=7", test_split="background")
    with pytest.raises(UserError, match=r"base classes of --train-rule 'class<7' share 7 class\(es\): .*and 2 "
                                        r"more; pass --allow-overlap"):
        check_class_sets(cfg)
    notes = check_class_sets(replace(cfg, allow_overlap=True))
    assert len(notes) == 3 and all(n.startswith("--allow-overlap: --test-split 'background' and ") for n in notes)
    assert "base classes of --train-rule 'class<7' share 7 class(es)" in notes[0]
    assert "validation classes of --val-rule 'class>=7' share 7 class(es)" in notes[1]
    assert "the classes checkpoint parent.pt was trained on share 14 class(es)" in notes[2]


def test_select_rows_rules(tiny):
    source = ds.open_source("omniglot", tiny["root"], split="background")
    drawer = source.meta["drawer"]
    assert np.array_equal(select_rows(source, "drawer<=6"), np.flatnonzero(drawer <= 6))
    both = select_rows(source, "drawer>=7 & class<3")
    assert np.array_equal(both, np.flatnonzero((drawer >= 7) & (source.labels < 3)))
    assert len(select_rows(source, "all")) == len(source) and len(select_rows(source, "none")) == 0
    assert len(select_rows(source, "split=background")) == len(source)
    with pytest.raises(UserError, match="--val-rule 'drawer'"):
        select_rows(source, "drawer", "--val-rule")


def test_head_options_fold_into_the_specs_or_are_refused_in_one_line(tmp_path):
    from bench.cli import cli
    from bench.fsor import fold_head_options

    assert fold_head_options(["tane", "protonet"], ["tane.epochs=4", "protonet.unknown_score=msp"]) == [
        "tane:epochs=4", "protonet:unknown_score=msp"]
    assert fold_head_options(["dnpg:n_neg=3"], ["dnpg.phase2_epochs=10"]) == ["dnpg:n_neg=3,phase2_epochs=10"]
    assert fold_head_options(["tane"], []) == ["tane"]
    result = CliRunner().invoke(cli, ["fsor-finetune", "--checkpoint", str(tmp_path / "none.pt"), "--out",
                                      str(tmp_path / "o"), "--dataset", "digits", "--test-split", "x",
                                      "--head-option", "tane.colour=1"])
    assert result.exit_code != 0
    assert "takes no option 'colour'" in str(result.exception or result.output)
    assert not (tmp_path / "o").exists()

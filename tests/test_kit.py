"""The protocol kit (bench/kit.py): shots, head options, class splits saved and reused, overlap refusal."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.kit import (
    check_head_options,
    head_options_for,
    parse_head_options,
    parse_shots,
    refuse_overlap,
    seeded_class_split,
)
from featstore.errors import UserError


def test_parse_shots_ranges_lists_and_errors():
    assert parse_shots("1..20") == [1, 2, 5, 10, 20]
    assert parse_shots("2..10") == [2, 5, 10]
    assert parse_shots("5,1,5") == [1, 5]
    assert parse_shots(3) == [3]
    for bad in ("20..1", "3..4", "a,b", "", "0,1"):
        with pytest.raises(UserError):
            parse_shots(bad)


def test_head_options_per_head_and_for_every_head():
    parsed = parse_head_options(["matching.episodes=2000", "lr=0.5", "logreg.solver=lbfgs", "flag=true"])
    assert parsed == {"matching": {"episodes": 2000}, "*": {"lr": 0.5, "flag": True}, "logreg": {"solver": "lbfgs"}}
    accepted = {"logreg": ["lr", "solver", "flag"], "matching": ["episodes"]}
    assert head_options_for("logreg", parsed, accepted["logreg"]) == {"lr": 0.5, "flag": True, "solver": "lbfgs"}
    assert head_options_for("matching", parsed, accepted["matching"]) == {"episodes": 2000}
    check_head_options(["logreg", "matching"], parsed, accepted)
    with pytest.raises(UserError, match="takes no option 'iterations'; it takes: episodes"):
        check_head_options(["matching"], {"matching": {"iterations": 1}}, accepted)
    with pytest.raises(UserError, match="none of the heads matching takes 'lr'"):
        check_head_options(["matching"], {"*": {"lr": 1}}, accepted)
    with pytest.raises(UserError, match="not among --head"):
        check_head_options(["matching"], {"logreg": {"lr": 1}}, accepted)
    with pytest.raises(UserError, match="NAME.KEY=VALUE"):
        parse_head_options(["no-equals-sign"])


def test_seeded_class_split_is_saved_reused_and_guarded(tmp_path):
    path = tmp_path / "splits.json"
    first = seeded_class_split(path, range(10), 6, splits=3, seed=4)
    assert len(first) == 3 and all(len(s) == 6 and s == sorted(set(s)) and set(s) <= set(range(10)) for s in first)
    # the draws are the documented ones: a generator seeded by (seed, split index)
    for i, draw in enumerate(first):
        rng = np.random.default_rng(np.random.SeedSequence([4, i]))
        assert draw == sorted(int(c) for c in rng.choice(np.arange(10), size=6, replace=False))
    saved = json.loads(path.read_text())
    saved["splits"][0] = [0, 1, 2, 3, 4, 5]        # a saved file is read back, not redrawn
    path.write_text(json.dumps(saved))
    assert seeded_class_split(path, range(10), 6, splits=3, seed=4)[0] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(UserError, match="another request"):
        seeded_class_split(path, range(10), 6, splits=3, seed=5)
    with pytest.raises(UserError, match="give 1..9"):
        seeded_class_split(tmp_path / "x.json", range(10), 10)
    assert not (tmp_path / "x.json").exists()


def test_refuse_overlap_names_the_shared_classes():
    assert refuse_overlap([1, 2], [3, 4], "test", "train") == []
    with pytest.raises(UserError, match=r"test and train share 2 class\(es\): b, c; pass --allow-overlap"):
        refuse_overlap([1, 2, 0], [2, 1, 9], "test", "train", names=list("abcdefghij"), allow_flag="--allow-overlap")

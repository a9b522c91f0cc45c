"""featstore.episodes: shapes, disjointness, determinism per episode, errors, support views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featstore.episodes import EpisodeBatch, EpisodeSampler, gather_rows
from featstore.errors import UserError


def labels_of(n_classes=12, per_class=25, seed=0):
    """Labels of a store whose rows are shuffled (classes interleaved), plus a split of every other class."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    return labels[rng.permutation(len(labels))]


def sampler(labels, rows=None, **kw):
    opts = dict(ways=5, shots=2, queries=4, open_ways=3, seed=7)
    opts.update(kw)
    return EpisodeSampler(labels, rows, **opts)


def test_shapes_and_labels():
    labels = labels_of()
    s = sampler(labels)
    b = s.sample(0, 10)
    assert isinstance(b, EpisodeBatch) and len(b) == 10
    assert b.support.shape == (10, 10) and b.support_labels.shape == (10, 10)
    assert b.query.shape == (10, 5 * 4 + 3 * 4) and b.query_labels.shape == b.query.shape
    assert b.classes.shape == (10, 5) and b.open_classes.shape == (10, 3)
    assert b.support_views is None and b.open_support is None
    assert b.support.dtype == torch.long and b.query_labels.dtype == torch.long
    # class-major support labels, known queries first, unknown queries labelled -1
    assert b.support_labels[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert b.query_labels[0].tolist() == [c for c in range(5) for _ in range(4)] + [-1] * 12
    for e in range(len(b)):
        sup, q, ql = b.support[e].numpy(), b.query[e].numpy(), b.query_labels[e].numpy()
        cls, ocls = b.classes[e].numpy(), b.open_classes[e].numpy()
        assert np.array_equal(labels[sup], cls[b.support_labels[e].numpy()])
        assert np.array_equal(labels[q[ql >= 0]], cls[ql[ql >= 0]])
        assert np.array_equal(labels[q[ql < 0]], np.repeat(ocls, 4))  # class-major unknown queries
        # support and query disjoint, no row twice, unknown classes disjoint from known ones
        rows = np.concatenate([sup, q])
        assert len(np.unique(rows)) == len(rows)
        assert not set(cls) & set(ocls)
        assert len(set(cls)) == 5 and len(set(ocls)) == 3


def test_rows_restrict_the_candidates_and_aligned_labels_agree():
    labels = labels_of(n_classes=14)
    rows = np.flatnonzero(labels >= 3)
    s = sampler(labels, rows)
    b = s.sample(0, 50)
    used = np.concatenate([b.support.numpy().ravel(), b.query.numpy().ravel()])
    assert np.isin(used, rows).all()
    assert (b.classes >= 3).all() and (b.open_classes >= 3).all()
    # the candidates' own labels (aligned with rows) give the same episodes
    b2 = sampler(labels[rows], rows).sample(0, 50)
    assert torch.equal(b.support, b2.support) and torch.equal(b.query, b2.query)


def test_same_seed_same_episodes_other_seed_others():
    labels = labels_of()
    a = sampler(labels).sample(0, 20)
    b = sampler(labels).sample(0, 20)
    c = sampler(labels, seed=8).sample(0, 20)
    for f in ("support", "query", "classes", "open_classes"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not torch.equal(a.query, c.query)
    assert not torch.equal(a.query[0], a.query[1])  # episodes differ from each other


@pytest.mark.parametrize("views", [0, 6])
def test_episode_i_does_not_depend_on_batching(views):
    labels = labels_of()
    s = sampler(labels, n_views=views, views_per_support=3 if views else 0, open_shots=2)
    big = s.sample(0, 100)
    fields = ["support", "support_labels", "query", "query_labels", "classes", "open_classes", "open_support"]
    if views:
        fields += ["support_views", "open_support_views"]
    for i in (0, 1, 37, 99):
        one = s.sample(i, 1)
        elsewhere = s.sample(i - 3, 10) if i >= 3 else s.sample(i, 10)
        j = 3 if i >= 3 else 0
        for f in fields:
            assert torch.equal(getattr(one, f)[0], getattr(big, f)[i]), (f, i)
            assert torch.equal(getattr(elsewhere, f)[j], getattr(big, f)[i]), (f, i)
    for bs in (1, 7, 100):
        parts = list(s.batches(100, bs))
        assert sum(len(p) for p in parts) == 100
        assert torch.equal(torch.cat([p.query for p in parts]), big.query)
        assert torch.equal(torch.cat([p.episodes for p in parts]), torch.arange(100))
    it = iter(s)
    assert torch.equal(next(it).query[0], big.query[0]) and torch.equal(next(it).query[0], big.query[1])


def test_sampling_is_roughly_uniform():
    labels = labels_of(n_classes=10, per_class=20)
    s = EpisodeSampler(labels, ways=3, shots=1, queries=2, open_ways=2, seed=1)
    b = s.sample(0, 6000)
    known = np.bincount(b.classes.numpy().ravel(), minlength=10) / 6000
    assert np.allclose(known, 0.3, atol=0.03)  # each class is known in 3 of 10 draws
    rows = np.bincount(b.support.numpy().ravel(), minlength=len(labels))
    expected = 6000 * 0.3 / 20  # a known class's row is the single shot 1 time in 20
    assert abs(rows.mean() - expected) < 1e-9 and rows.min() > expected * 0.5 and rows.max() < expected * 1.6


def test_too_few_classes_is_a_user_error():
    labels = labels_of(n_classes=7)
    with pytest.raises(UserError, match=r"split 'test' has 7 usable classes but 5-way with 3 open classes needs 8"):
        sampler(labels, name="split 'test'")


def test_small_class_is_a_user_error_or_dropped():
    labels = np.repeat(np.arange(10), 12)
    labels = labels[labels != 4]
    labels = np.concatenate([labels, np.full(5, 4)])  # class 4 has only 5 examples
    names = [f"n{i}" for i in range(10)]
    with pytest.raises(UserError) as err:
        sampler(labels, shots=2, queries=4, class_names=names)
    msg = str(err.value)
    assert "class 4 ('n4') has 5 examples" in msg and "needs 6 per class" in msg and "\n" not in msg
    with pytest.warns(UserWarning, match="dropping 1 class"):
        s = sampler(labels, shots=2, queries=4, drop_small=True)
    b = s.sample(0, 200)
    assert not (b.classes == 4).any() and not (b.open_classes == 4).any()
    assert s.n_classes == 9


def test_bad_arguments():
    labels = labels_of()
    with pytest.raises(UserError, match="shots must be an integer >= 1"):
        sampler(labels, shots=0)
    with pytest.raises(UserError, match="has only 4"):
        sampler(labels, n_views=4, views_per_support=5)
    with pytest.raises(UserError, match="has no views"):
        sampler(labels, views_per_support=5)


def test_support_views_are_distinct_and_averaged():
    labels = labels_of()
    n, d, V = len(labels), 6, 7
    s = sampler(labels, n_views=V, views_per_support=5)
    b = s.sample(0, 30)
    assert b.support_views.shape == (30, 10, 5)
    sv = b.support_views.numpy()
    assert sv.min() >= 0 and sv.max() < V
    assert all(len(set(v)) == 5 for v in sv.reshape(-1, 5))
    assert len({tuple(v) for v in sv.reshape(-1, 5)}) > 1  # not the same views for everyone
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(n, d, generator=g)
    views = torch.randn(V, n, d, generator=g)
    got = b.support_features(feats, views)
    e, i = 3, 4
    row = int(b.support[e, i])
    expect = views[b.support_views[e, i], row].mean(0)
    assert torch.allclose(got[e, i], expect, atol=1e-6)
    assert torch.allclose(b.query_features(feats), feats[b.query])
    assert torch.allclose(b.support_features(feats), feats[b.support])  # no views given: clean features
    # views loaded for a subset of rows, with a store-row -> view-row map
    rows = np.arange(n)[::-1].copy()
    row_map = torch.full((n,), -1, dtype=torch.long)
    row_map[torch.from_numpy(rows)] = torch.arange(n)
    got2 = b.support_features(feats, views[:, torch.from_numpy(rows)], row_map)
    assert torch.allclose(got, got2, atol=1e-6)


def test_gather_rows_and_to():
    feats = torch.arange(20.0).reshape(10, 2)
    rows = torch.tensor([[1, 2], [3, 9]])
    assert torch.equal(gather_rows(feats, rows), feats[rows])
    b = sampler(labels_of()).sample(0, 2).to("cpu")
    assert b.is_unknown.sum() == 2 * 12 and b.ways == 5 and b.open_ways == 3

"""TANE head (heads/tane.py) on a toy store of clustered 16-d features. CPU, a few seconds."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from heads._negproto_common import (
    CrossAttention,
    class_means,
    reciprocal_unit_loss,
    sample_episodes,
)
from heads.base import HEADS, MetaTrainData, NotFittedError, create_head
from heads.tane import TANEHead

D, N_BASE = 16, 20


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the problems are tiny: thread start-up costs more than it saves on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def toy_store(n_classes=40, per_class=30, noise=0.1, seed=0):
    """Unit-norm random class centres plus small noise: classes 0..19 base, 20..29 val, 30..39 test."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, D))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.concatenate([centres[c] + noise * rng.normal(size=(per_class, D)) for c in range(n_classes)])
    y = np.repeat(np.arange(n_classes), per_class)
    return torch.from_numpy(x.astype(np.float32)), y


@pytest.fixture(scope="module")
def store():
    x, y = toy_store()
    train = np.flatnonzero(y < N_BASE)
    val = np.flatnonzero((y >= N_BASE) & (y < 30))
    test = np.flatnonzero(y >= 30)
    # stand-in for the backbone classifier rows: base-class means
    w = torch.stack([x[torch.from_numpy(y == c)].mean(0) for c in range(N_BASE)])
    return x, y, train, val, test, w


SHAPE = dict(ways=3, shots=1, queries=5, open_ways=3)  # the episode shape a protocol passes in the data
SCHEDULE = dict(episodes_per_epoch=40, val_episodes=40)  # constructor hyper-parameters


def meta_data(x, y, train, val, w, **extra):
    return MetaTrainData(x, y, train, val, base_weights=w, **SHAPE, **extra)


@pytest.fixture(scope="module")
def trained(store):
    x, y, train, val, _, w = store
    return TANEHead(D, N_BASE, seed=0, epochs=6, **SCHEDULE).meta_train(meta_data(x, y, train, val, w))


def base_batch(y, train, count=4, seed=3, ways=3, open_ways=3):
    # (ways + open_ways)-way base episodes: the first `ways` classes are closed, the others pseudo-open
    return sample_episodes(y, train, ways=ways + open_ways, shots=2, queries=4, open_ways=0, seed=seed, count=count)


def test_registered():
    assert HEADS["tane"] is TANEHead
    head = create_head("tane", feat_dim=D, n_base_classes=N_BASE)
    assert head.needs_meta_training and isinstance(head, TANEHead)


def test_training_step_lowers_loss(store):
    x, y, train, _, _, w = store
    head = TANEHead(D, N_BASE, seed=0).set_base_memory(w)
    b = base_batch(y, train)
    args = (x[b.support], b.support_labels, x[b.query], b.query_labels)
    kw = dict(ways=3, episode_classes=b.classes)  # store class ids, removed from the memory
    head.eval()
    with torch.no_grad():
        before = head.training_step(*args, **kw).item()
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    head.train()
    for _ in range(15):
        loss = head.training_step(*args, **kw)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        after = head.training_step(*args, **kw).item()
    assert np.isfinite(before) and after < before - 0.05
    assert {"cls", "unit", "cls_swap", "unit_swap", "total"} <= set(head.last_losses_)


def _np_bce(units, query, labels, tau):
    """The reciprocal BCE written out: z = 1 - tau cos(u_c, x_i), t_ic = [y_i = c], mean BCE-with-logits."""
    u = units / np.linalg.norm(units, axis=-1, keepdims=True)
    q = query / np.linalg.norm(query, axis=-1, keepdims=True)
    z = 1.0 - tau * np.einsum("imd,icd->imc", q, u)
    n = units.shape[1]
    t = np.zeros_like(z)
    for e in range(labels.shape[0]):
        for i, lab in enumerate(labels[e]):
            if 0 <= lab < n:
                t[e, i, lab] = 1.0
    bce = np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))
    return bce.mean()


def test_reciprocal_bce_by_hand():
    # a 2-class toy in 2-d: units along the axes; queries of class 0, class 1 and one unknown
    units = np.array([[[1.0, 0.0], [0.0, 2.0]]])
    query = np.array([[[3.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]])
    labels = np.array([[0, 1, -1]])
    tau = 10.0
    # by hand: cosines [[1, 0], [1/sqrt2, 1/sqrt2], [-1, 0]]; z = 1 - 10 cos
    cos = np.array([[1, 0], [2**-0.5, 2**-0.5], [-1, 0]])
    z = 1 - tau * cos
    t = np.array([[1, 0], [0, 1], [0, 0]])
    expected = np.mean(np.log1p(np.exp(-z)) * t + np.log1p(np.exp(z)) * (1 - t))
    got = reciprocal_unit_loss(torch.tensor(units), torch.tensor(query), torch.tensor(labels), tau)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    assert _np_bce(units, query, labels, tau) == pytest.approx(expected, rel=1e-9)


def test_head_unit_and_swapped_labels_match_numpy():
    # neg_gen_type="mlp": no attention, u_c = p_c, so L_unit of both tasks can be recomputed by hand; N=2 closed and
    # M=3 pseudo-open classes checks that the swapped labels are rebuilt (not reused from the primary task)
    rng = np.random.default_rng(0)
    head = TANEHead(D, N_BASE, neg_gen_type="mlp").set_base_memory(torch.zeros(N_BASE, D))
    head.eval()
    e, ways, w_all, k = 2, 2, 5, 2
    support = rng.normal(size=(e, w_all * k, D)).astype(np.float32)
    s_lab = np.tile(np.repeat(np.arange(w_all), k), (e, 1))
    query = rng.normal(size=(e, 12, D)).astype(np.float32)
    q_lab = np.tile(np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, -1, -1]), (e, 1))
    with torch.no_grad():
        head.training_step(torch.from_numpy(support), torch.from_numpy(s_lab), torch.from_numpy(query),
                           torch.from_numpy(q_lab), ways=ways)  # fmt: skip
    protos = np.stack([[support[i, s_lab[i] == c].mean(0) for c in range(w_all)] for i in range(e)])
    primary = np.where((q_lab >= 0) & (q_lab < ways), q_lab, -1)
    swapped = np.where(q_lab >= ways, q_lab - ways, -1)
    assert head.last_losses_["unit"] == pytest.approx(_np_bce(protos[:, :ways], query, primary, 10.0), rel=1e-5)
    assert head.last_losses_["unit_swap"] == pytest.approx(_np_bce(protos[:, ways:], query, swapped, 10.0), rel=1e-5)


def test_class_means_any_order_and_views():
    feats = torch.arange(12, dtype=torch.float32).reshape(1, 6, 2)
    labels = torch.tensor([[1, 0, 1, 0, 1, 0]])
    m = class_means(feats, labels, 2)
    assert torch.allclose(m[0, 0], feats[0, [1, 3, 5]].mean(0)) and torch.allclose(m[0, 1], feats[0, [0, 2, 4]].mean(0))


def test_episode_classes_are_removed_from_the_memory():
    torch.manual_seed(0)
    att = CrossAttention(8)
    att.eval()
    q, mem = torch.randn(3, 2, 8), torch.randn(5, 8)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, [0, 4]] = mask[2, 2] = False
    _, alpha = att(q, mem, mem, mask)
    assert torch.all(alpha[~mask.unsqueeze(1).expand_as(alpha)] == 0)
    assert torch.allclose(alpha.sum(-1), torch.ones(3, 2))


def test_key_mask_maps_store_class_ids():
    head = TANEHead(D, 4).set_base_memory(torch.randn(4, D), base_classes=[10, 11, 12, 13])
    mask = head._key_mask(torch.tensor([[11, 13, 99], [10, 50, 51]]), 2)  # 99, 50, 51: not base classes
    assert mask.tolist() == [[True, False, True, False], [False, True, True, True]]
    with pytest.raises(ValueError, match="empty"):
        head._key_mask(torch.tensor([[10, 11, 12, 13]]), 1)


@pytest.mark.parametrize("kind", ["attg", "semang", "att", "mlp"])
def test_shapes_batched_and_unbatched(store, kind):
    x, y, train, _, test, w = store
    head = TANEHead(D, N_BASE, neg_gen_type=kind, agg="mlp" if kind == "att" else "avg", epochs=1, **SCHEDULE)
    if kind == "semang":  # no word vectors: the visual stand-in (normalised base-class means)
        head.meta_train(meta_data(x, y, train, None, w))
    else:
        head.set_base_memory(w)
    ep = sample_episodes(y, test, ways=5, shots=2, queries=3, open_ways=5, seed=1, count=4)
    head.fit(x[ep.support], ep.support_labels)
    q = x[ep.query]
    assert head.logits(q).shape == (4, 30, 5)
    assert head.logits_with_negative(q).shape == (4, 30, 6)
    s = head.open_score(q)
    assert s.shape == (4, 30) and bool(((s >= 0) & (s <= 1)).all())
    assert head.prototypes_.shape == (4, 5, D) and head.neg_prototypes_.shape == (4, 1, D)
    head.fit(x[ep.support[0]], ep.support_labels[0])  # one unbatched episode
    assert head.logits(q[0]).shape == (30, 5) and head.open_score(q[0]).shape == (30,)
    assert torch.allclose(head.open_score(q[0]), s[0], atol=1e-5)


def test_semang_with_word_vectors(store):
    x, y, train, val, test, w = store
    sem = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    head = TANEHead(D, N_BASE, neg_gen_type="semang", semantic_dim=6, base_seman_calib=True, epochs=1, **SCHEDULE)
    head.meta_train(meta_data(x, y, train, val, w, class_semantics=sem))
    ep = sample_episodes(y, test, ways=5, shots=1, queries=3, open_ways=5, seed=1, count=2)
    head.fit(x[ep.support], ep.support_labels, support_semantics=sem[ep.classes])
    assert head.open_score(x[ep.query]).shape == (2, 30)
    with pytest.raises(ValueError, match="support_semantics"):
        head.fit(x[ep.support], ep.support_labels)


def test_open_score_separates_unknowns_after_meta_training(store, trained):
    x, y, _, _, test, _ = store
    ep = sample_episodes(y, test, ways=5, shots=1, queries=15, open_ways=5, seed=11, count=40)
    trained.fit(x[ep.support], ep.support_labels)
    scores = trained.open_score(x[ep.query]).numpy()
    unknown = (ep.query_labels < 0).numpy()
    auroc = np.mean([roc_auc_score(unknown[i], scores[i]) for i in range(len(scores))])
    acc = (trained.logits(x[ep.query]).argmax(-1) == ep.query_labels)[:, :75].float().mean().item()
    assert auroc > 0.8, auroc
    assert acc > 0.9, acc
    assert len(trained.history_) == 6 and 1 <= trained.best_epoch_ <= 6
    assert {"val_acc", "val_auroc", "train_loss"} <= set(trained.history_[0])


def test_meta_train_with_support_views(store):
    x, y, train, val, test, w = store
    views = x.unsqueeze(0) + 0.05 * torch.randn(3, *x.shape, generator=torch.Generator().manual_seed(0))
    kw = dict(epochs=1, **SCHEDULE)
    a = TANEHead(D, N_BASE, **kw).meta_train(meta_data(x, y, train, val, w, support_views=views))
    b = TANEHead(D, N_BASE, **kw).meta_train(meta_data(x, y, train, val, w))
    assert not torch.allclose(a.calib_attn.w_q.weight, b.calib_attn.w_q.weight)
    with pytest.raises(ValueError, match="support_views"):
        TANEHead(D, N_BASE, **kw).meta_train(meta_data(x, y, train, val, w, support_views=views[:, :10]))


def test_unfitted_use_raises(store):
    x, _, _, _, _, w = store
    head = TANEHead(D, N_BASE)
    with pytest.raises(NotFittedError):
        head.fit(x[:5], torch.arange(5))  # no base memory: meta_train first
    head.set_base_memory(w)
    with pytest.raises(NotFittedError):
        head.logits(x[:3])
    with pytest.raises(NotFittedError):
        head.open_score(x[:3])


def test_same_seed_same_numbers(store):
    x, y, train, val, test, w = store

    def run(seed):
        h = TANEHead(D, N_BASE, seed=seed, epochs=2, **SCHEDULE).meta_train(meta_data(x, y, train, val, w))
        ep = sample_episodes(y, test, ways=5, shots=1, queries=3, open_ways=5, seed=2, count=3)
        return h.fit(x[ep.support], ep.support_labels).open_score(x[ep.query])

    state = torch.random.get_rng_state()
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone

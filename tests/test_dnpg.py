"""DNPG head (heads/dnpg.py) on a toy store of clustered 16-d features. CPU, a few seconds."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from heads._negproto_common import sample_episodes, swap_alignment_loss
from heads.base import HEADS, MetaTrainData, NotFittedError, create_head
from heads.dnpg import DNPGHead, reverse_classification_losses
from heads.scores import batched_auroc

D, N_BASE = 16, 20
P2 = dict(phase2_epochs=15, phase2_batch_size=64)  # a short Phase 2 for the toy store


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
    return x, y, train, val, test


SHAPE = dict(ways=3, shots=1, queries=5, open_ways=3)  # the episode shape a protocol passes in the data
SCHEDULE = dict(episodes_per_epoch=40, val_episodes=40)  # constructor hyper-parameters


@pytest.fixture(scope="module")
def phase2_head(store):
    x, y, train, _, _ = store
    return DNPGHead(D, N_BASE, seed=0, **P2).fit_open_weights(x, y, train)


@pytest.fixture(scope="module")
def trained(store):
    x, y, train, val, _ = store
    return DNPGHead(D, N_BASE, seed=0, epochs=6, **SCHEDULE, **P2).meta_train(MetaTrainData(x, y, train, val, **SHAPE))


def test_registered():
    assert HEADS["dnpg"] is DNPGHead
    head = create_head("dnpg", feat_dim=D, n_base_classes=N_BASE)
    assert head.needs_meta_training and isinstance(head, DNPGHead)


# -- swap alignment -----------------------------------------------------------------------------------------------
def _np_swap_alignment(p, q, p2, q2):
    """The DNPG paper's L_SA written out with loops over episodes and elements."""

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    vals = []
    for e in range(p.shape[0]):
        a = np.mean([max(cos(qq, pp) for pp in p[e]) for qq in q2[e]])
        b = np.mean([max(cos(pp, qq) for qq in q2[e]) for pp in p[e]])
        c = np.mean([max(cos(qq, pp) for pp in p2[e]) for qq in q[e]])
        d = np.mean([max(cos(pp, qq) for qq in q[e]) for pp in p2[e]])
        vals.append((a, b, c, d))
    a, b, c, d = np.mean(vals, axis=0)
    return -(a + b + c + d) / 2


def test_swap_alignment_by_hand():
    p = np.array([[[1.0, 0.0], [0.0, 1.0]]])  # primary prototypes P (N = 2)
    q = np.array([[[1.0, 1.0], [-1.0, 0.0]]])  # primary NPs Q
    p2 = np.array([[[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]]])  # swapped prototypes P' (M = 3)
    q2 = np.array([[[0.0, 2.0], [3.0, 0.0]]])  # swapped NPs Q'
    # a = 1 (each Q' vector hits a P axis), b = 1, c = (1 + 0)/2, d = (1/sqrt2 + 1 + 0)/3
    expected = -(1 + 1 + 0.5 + (2**-0.5 + 1) / 3) / 2
    t = [torch.tensor(v) for v in (p, q, p2, q2)]
    assert swap_alignment_loss(*t).item() == pytest.approx(expected, rel=1e-12)
    assert _np_swap_alignment(p, q, p2, q2) == pytest.approx(expected, rel=1e-12)
    # random batched example against the loop version
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(3, n, 5)) for n in (4, 5, 6, 5)]
    got = swap_alignment_loss(*[torch.tensor(a) for a in arrays]).item()
    assert got == pytest.approx(_np_swap_alignment(*arrays), rel=1e-10)


def test_head_swap_alignment_term(store, phase2_head):
    # the head's L_SA is gamma-weighted swap_alignment_loss of (calibrated prototypes, NPs) of the two tasks
    x, y, train, _, _ = store
    head = phase2_head
    head.eval()
    b = sample_episodes(y, train, ways=5, shots=2, queries=3, open_ways=0, seed=4, count=3)
    ec = b.classes  # store class ids (= base rows in this toy store)
    with torch.no_grad():
        total = head.training_step(x[b.support], b.support_labels, x[b.query], b.query_labels, ways=2,
                                   episode_classes=ec)  # fmt: skip
        protos = torch.stack([x[b.support[:, 2 * c : 2 * c + 2]].mean(1) for c in range(5)], 1)
        mask = head._key_mask(ec, 3)
        out_p = head._task_forward(protos[:, :2], mask, None)
        out_s = head._task_forward(protos[:, 2:], mask, None)
        sa = swap_alignment_loss(out_p.calibrated, out_p.negs, out_s.calibrated, out_s.negs).item()
    losses = head.last_losses_
    assert losses["sa"] == pytest.approx(sa, rel=1e-5)
    parts = losses["cls"] + losses["cls_swap"] + head.funit * (losses["unit"] + losses["unit_swap"])
    assert total.item() == pytest.approx(parts + head.gamma * sa, rel=1e-5)


# -- Phase 2 ------------------------------------------------------------------------------------------------------
def test_reverse_classification_losses_by_hand():
    rng = np.random.default_rng(1)
    x, c, r = rng.normal(size=(4, 3)), rng.normal(size=(2, 3)), rng.normal(size=(2, 4, 3))
    y, radius, temp, wpl = np.array([0, 1, 1, 0]), 0.3, 0.07, 0.1
    d_c = ((x[:, None] - c[None]) ** 2).sum(-1) / 3  # ||x - c||^2 / D
    d_r = ((x[:, None, None] - r[None]) ** 2).sum(-1) / 3  # [n, B, M]

    def ce(logits):
        logits = logits - logits.max(1, keepdims=True)
        return np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(len(y)), y])

    gcpl = ce(-d_c / temp) + wpl * 0.5 * np.mean((x - c[y]) ** 2)
    # radius term over the M points of the *true* class (rows 4k..4k+3 in the original layout)
    rpl = ce(d_r.mean(-1) / temp) + wpl * np.mean((d_r[np.arange(4), y] - radius) ** 2)
    g, rp, _, _ = reverse_classification_losses(
        *(torch.tensor(v) for v in (x, y, c, r)), torch.tensor(radius), temp=temp, weight_pl=wpl
    )
    # (the torch side expands ||x - c||^2 as the original does, so it agrees to rounding, not bit for bit)
    assert g.item() == pytest.approx(gcpl, rel=1e-6) and rp.item() == pytest.approx(rpl, rel=1e-6)


def test_phase2_open_weights(store, phase2_head):
    x, y, train, _, _ = store
    head = phase2_head
    hist = head.phase2_history_
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["gcpl_acc"] > 0.95 and hist[-1]["rpl_acc"] > 0.95  # RPL classifies by farness
    k = head.open_weight_sum_cali
    assert torch.allclose(head.base_weights_, k * head.gcpl_centers_)
    assert torch.allclose(head.open_weights_, k * head.rpl_points_.mean(1))
    assert head.rpl_points_.shape == (N_BASE, 4, D)
    # every base-class mean is nearest to its own GCPL centre and farthest from its own reciprocal points
    means = torch.stack([x[torch.from_numpy(y == c)].mean(0) for c in range(N_BASE)])
    assert torch.equal(torch.cdist(means, head.gcpl_centers_).argmin(1), torch.arange(N_BASE))
    far = torch.cdist(means, head.rpl_points_.reshape(-1, D)).pow(2).reshape(N_BASE, N_BASE, 4).mean(-1)
    assert torch.equal(far.argmax(1), torch.arange(N_BASE))
    # cached augmented views are accepted (one view per row per epoch)
    views = x.unsqueeze(0) + 0.01 * torch.randn(2, *x.shape, generator=torch.Generator().manual_seed(0))
    h2 = DNPGHead(D, N_BASE, **P2).fit_open_weights(x, y, train, views=views, epochs=2)
    assert len(h2.phase2_history_) == 2


# -- phase 3 ------------------------------------------------------------------------------------------------------
def test_training_step_lowers_loss(store, phase2_head):
    x, y, train, _, _ = store
    head = DNPGHead(D, N_BASE, seed=0).set_open_weights(phase2_head.gcpl_centers_, phase2_head.rpl_points_)
    b = sample_episodes(y, train, ways=6, shots=2, queries=4, open_ways=0, seed=3, count=4)
    args = (x[b.support], b.support_labels, x[b.query], b.query_labels)
    kw = dict(ways=3, episode_classes=b.classes)
    head.eval()
    with torch.no_grad():
        before = head.training_step(*args, **kw).item()
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.07, momentum=0.9)
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
    assert {"cls", "unit", "cls_swap", "unit_swap", "sa", "total"} <= set(head.last_losses_)
    assert head.neg_bias.item() == 0.0  # beta frozen (miniImageNet setting)


def test_shapes_and_negative_column(store, phase2_head):
    x, y, _, _, test = store
    head = phase2_head
    ep = sample_episodes(y, test, ways=5, shots=2, queries=3, open_ways=5, seed=1, count=4)
    head.fit(x[ep.support], ep.support_labels)
    q = x[ep.query]
    assert head.prototypes_.shape == (4, 5, D) and head.neg_prototypes_.shape == (4, 5, D)  # J = 5 NPs
    assert head.logits(q).shape == (4, 30, 5)
    full = head.logits_with_negative(q)
    assert full.shape == (4, 30, 6)
    neg = (head.tau_neg * F.normalize(q, dim=-1) @ F.normalize(head.neg_prototypes_, dim=-1).transpose(1, 2))
    assert torch.allclose(full[..., -1], (neg + head.neg_bias).amax(-1), atol=1e-5)
    s = head.open_score(q)
    assert s.shape == (4, 30) and torch.allclose(s, torch.softmax(full, -1)[..., -1])
    head.fit(x[ep.support[1]], ep.support_labels[1])
    assert head.logits(q[1]).shape == (30, 5) and torch.allclose(head.open_score(q[1]), s[1], atol=1e-5)
    avg = DNPGHead(D, N_BASE, agg="avg").set_open_weights(head.gcpl_centers_, head.rpl_points_)
    assert avg.fit(x[ep.support], ep.support_labels).neg_prototypes_.shape == (4, 1, D)


def test_open_score_separates_unknowns_after_meta_training(store, trained):
    x, y, _, _, test = store
    ep = sample_episodes(y, test, ways=5, shots=1, queries=15, open_ways=5, seed=11, count=40)
    trained.fit(x[ep.support], ep.support_labels)
    scores = trained.open_score(x[ep.query])
    unknown = ep.query_labels < 0
    auroc = np.mean([roc_auc_score(unknown[i].numpy(), scores[i].numpy()) for i in range(len(scores))])
    assert auroc > 0.8, auroc
    assert batched_auroc(scores, unknown).mean().item() == pytest.approx(auroc, abs=1e-6)
    acc = (trained.logits(x[ep.query]).argmax(-1) == ep.query_labels)[:, :75].float().mean().item()
    assert acc > 0.9, acc
    assert len(trained.phase2_history_) == P2["phase2_epochs"]  # meta_train ran Phase 2 first
    assert len(trained.history_) == 6 and 1 <= trained.best_epoch_ <= 6


def test_unfitted_use_raises(store, phase2_head):
    x = store[0]
    head = DNPGHead(D, N_BASE)
    with pytest.raises(NotFittedError):
        head.fit(x[:5], torch.arange(5))  # no open weights: meta_train (or Phase 2) first
    head.set_open_weights(phase2_head.gcpl_centers_, phase2_head.rpl_points_)
    with pytest.raises(NotFittedError):
        head.logits(x[:3])
    with pytest.raises(NotFittedError):
        head.open_score(x[:3])


def test_same_seed_same_numbers(store):
    x, y, train, val, test = store

    def run(seed):
        h = DNPGHead(D, N_BASE, seed=seed, phase2_epochs=3, phase2_batch_size=64, epochs=2, **SCHEDULE)
        h.meta_train(MetaTrainData(x, y, train, val, **SHAPE))
        ep = sample_episodes(y, test, ways=5, shots=1, queries=3, open_ways=5, seed=2, count=3)
        return h.fit(x[ep.support], ep.support_labels).open_score(x[ep.query])

    state = torch.random.get_rng_state()
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.equal(state, torch.random.get_rng_state())


def test_phase2_is_a_constructor_switch(store, phase2_head):
    x, y, train, val, _ = store
    data = MetaTrainData(x, y, train, val, **SHAPE)
    with pytest.raises(NotFittedError, match="phase2=False"):
        DNPGHead(D, N_BASE, phase2=False, epochs=0).meta_train(data)
    installed = DNPGHead(D, N_BASE, phase2=False, epochs=0)
    installed.set_open_weights(phase2_head.gcpl_centers_, phase2_head.rpl_points_)
    assert torch.equal(installed.meta_train(data).gcpl_centers_, phase2_head.gcpl_centers_)  # kept
    again = DNPGHead(D, N_BASE, phase2=True, epochs=0, phase2_epochs=1, phase2_batch_size=64)
    again.set_open_weights(phase2_head.gcpl_centers_, phase2_head.rpl_points_)
    again.meta_train(data)
    assert len(again.phase2_history_) == 1 and not torch.equal(again.gcpl_centers_, phase2_head.gcpl_centers_)
    assert again.clone().get_params()["phase2"] is True

"""heads/matching.py: matching networks with full-context embeddings on features."""

import math

import numpy as np
import pytest
import torch

from heads.base import MetaTrainData, NotFittedError, create_head
from heads.matching import MatchingNet, MatchingNetwork, class_log_probs, lowshot_support


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (2 threads on a shared 2-core machine were many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _clustered(n_classes=8, per_class=30, d=16, noise=0.6, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, d))
    x = np.concatenate([c + noise * rng.standard_normal((per_class, d)) for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(n_classes), per_class)


def test_registered_and_unfitted():
    head = create_head("matching", steps=3)
    assert isinstance(head, MatchingNetwork)
    with pytest.raises(NotFittedError):
        head.logits(np.zeros((2, 4), dtype=np.float32))


def test_fce_embedding_shapes_and_normalisation():
    torch.manual_seed(0)
    net = MatchingNet(6, steps=3, fce=True)
    support, queries = torch.randn(2, 9, 6), torch.randn(2, 4, 6)
    g, g_hat = net.encode_support(support)
    assert g.shape == g_hat.shape == (2, 9, 6)
    norms = g.norm(dim=-1)
    torch.testing.assert_close(g_hat.norm(dim=-1), norms / (norms + 1e-5))
    # residual: g = x + h_fwd + h_bwd
    out, _ = net.encoder(support)
    torch.testing.assert_close(g, support + out[..., :6] + out[..., 6:])
    h = net.embed_query(queries, g)
    assert h.shape == (2, 4, 6)
    a = net.attention_weights(h, g)
    assert a.shape == (2, 4, 9)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 4))
    assert (a >= 0).all()
    # one episode's result does not depend on the other episode in the batch
    g0, _ = net.encode_support(support[:1])
    torch.testing.assert_close(net.embed_query(queries[:1], g0), h[:1])


def test_attention_lstm_matches_a_manual_unroll():
    torch.manual_seed(1)
    net = MatchingNet(5, steps=2, fce=True)
    f, g = torch.randn(1, 3, 5), torch.randn(1, 7, 5)
    h, c = f[0], torch.zeros(3, 5)
    for _ in range(2):
        a = torch.softmax(h @ g[0].T, dim=1)  # over the unnormalised g
        h, c = net.cell(torch.cat((f[0], a @ g[0]), dim=1), (h, c))  # read-out fed as the cell input
        h = h + f[0]
    torch.testing.assert_close(net.embed_query(f, g)[0], h)


def test_logits_without_fce_equal_plain_cosine_attention():
    rng = np.random.default_rng(3)
    support = rng.standard_normal((7, 4)).astype(np.float32)
    labels = np.array([5, 2, 5, 9, 2, 2, 9])
    query = rng.standard_normal((3, 4)).astype(np.float32)
    head = MatchingNetwork(fce=False).fit(support, labels)
    got = head.logits(query)
    # by hand: only the support is normalised; softmax over the items; summed per class; log
    s = support.astype(np.float64)
    g_hat = s / (np.linalg.norm(s, axis=1, keepdims=True) + 1e-5)
    scores = query.astype(np.float64) @ g_hat.T
    p = np.exp(scores - scores.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = np.log(np.stack([p[:, labels == c].sum(1) for c in (2, 5, 9)], axis=1))
    assert head.classes_.tolist() == [2, 5, 9]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.attention(query).sum(1), torch.ones(3))
    np.testing.assert_allclose(head.attention(query).numpy(), p, rtol=1e-5, atol=1e-6)
    # the benchmark's n-way scoring: absent classes get -inf
    wide = MatchingNetwork(fce=False).fit(support, labels, n_classes=11).logits(query)
    assert wide.shape == (3, 11)
    assert torch.isinf(wide[:, [0, 1, 3, 4, 6, 7, 8, 10]]).all()
    np.testing.assert_allclose(wide[:, [2, 5, 9]].numpy(), want, rtol=1e-5, atol=1e-5)
    assert head.predict(query).shape == (3,)


def test_class_log_probs_is_stable_for_far_classes():
    scores = torch.tensor([[0.0, -200.0, -201.0]])
    out = class_log_probs(scores, torch.tensor([0, 1, 1]), 2)
    assert torch.isfinite(out).all()
    want = torch.log(torch.exp(torch.tensor(-200.0, dtype=torch.float64)) * (1 + math.exp(-1)))
    assert abs(float(out[0, 1]) - float(want)) < 1e-3


def test_batched_episodes_equal_single_fits():
    rng = np.random.default_rng(4)
    support = rng.standard_normal((3, 6, 5)).astype(np.float32)
    labels = np.tile(np.array([0, 0, 1, 1, 2, 2]), (3, 1))
    queries = rng.standard_normal((3, 4, 5)).astype(np.float32)
    head = MatchingNetwork(steps=2, seed=1, batch_size=3).fit(support, labels)
    batched = head.logits(queries)
    assert batched.shape == (3, 4, 3)
    for e in range(3):
        single = MatchingNetwork(steps=2, seed=1).fit(support[e], labels[e]).logits(queries[e])
        torch.testing.assert_close(batched[e], single, rtol=1e-5, atol=1e-5)


def test_meta_training_lowers_the_loss():
    x, y = _clustered()
    head = MatchingNetwork(steps=2, seed=0, ways=5, meta_shots=5, meta_queries=2, episodes=240, lr=0.1)
    head.meta_train(MetaTrainData(torch.from_numpy(x), y, np.arange(len(y))), seed=0)
    hist = head.loss_history_
    assert hist.shape == (240,) and np.isfinite(hist).all()
    assert hist[-60:].mean() < 0.8 * hist[:60].mean()
    # and the trained head classifies held-out queries of the same clusters
    sup = np.concatenate([np.flatnonzero(y == c)[:3] for c in range(8)])
    qry = np.concatenate([np.flatnonzero(y == c)[3:] for c in range(8)])
    acc = (head.fit(x[sup], y[sup]).predict(x[qry]).numpy() == y[qry]).mean()
    assert acc > 0.6
    # same seed, same training
    kw = dict(steps=2, seed=0, ways=5, meta_shots=5, meta_queries=2, episodes=20)
    data = MetaTrainData(torch.from_numpy(x), y, np.arange(len(y)))
    again = MatchingNetwork(**kw).meta_train(data, seed=0)
    first = MatchingNetwork(**kw).meta_train(data, seed=0)
    np.testing.assert_array_equal(again.loss_history_, first.loss_history_)
    # training on a subset of the rows equals training on those rows alone
    rows = np.flatnonzero(y < 6)
    sub = MatchingNetwork(**kw).meta_train(MetaTrainData(torch.from_numpy(x), y, rows), seed=0)
    alone = MatchingNetwork(**kw).meta_train(MetaTrainData(torch.from_numpy(x[rows]), y[rows], np.arange(rows.size)),
                                             seed=0)
    np.testing.assert_array_equal(sub.loss_history_, alone.loss_history_)


def test_episodes_follow_the_spec():
    x, y = _clustered(n_classes=6, per_class=12)
    head = MatchingNetwork()
    order = np.argsort(y, kind="stable")
    classes, starts, counts = np.unique(y[order], return_index=True, return_counts=True)
    rng = np.random.default_rng(0)
    for _ in range(20):
        s_rows, s_cls, q_rows = head._episode(rng, order, starts, counts, 4, 10, 1)
        assert q_rows.shape == (4,)
        ep_classes = y[q_rows]
        assert len(set(ep_classes.tolist())) == 4
        for pos, c in enumerate(ep_classes):
            rows = s_rows[s_cls == pos]
            assert 1 <= rows.size <= 10 and np.all(y[rows] == c)
            assert np.all(np.diff(rows) > 0)  # sorted by row index, no repeats
            assert q_rows[pos] not in rows  # the query is excluded from the support
        assert np.all(np.diff(s_cls) >= 0)  # grouped by class in the episode order
    with pytest.raises(ValueError, match="fewer than 2 rows"):
        MatchingNetwork(episodes=1).meta_train(MetaTrainData(torch.from_numpy(x[:13]), y[:13], np.arange(13)))


def test_lowshot_support_layout():
    rng = np.random.default_rng(6)
    base_y = np.repeat([0, 3, 4], [150, 120, 80])
    base_x = rng.standard_normal((base_y.size, 4)).astype(np.float32)
    base_x[:, 0] = np.arange(base_y.size)  # row ids, to check the row order
    novel_y = np.array([1, 1, 1, 2, 2, 2])
    novel_x = rng.standard_normal((6, 4)).astype(np.float32)
    # every base class has 100 or more rows (ImageNet): 100 each, novel tiled ceil(100 / 3) = 34x as a block
    many = base_y < 4
    feats, labels = lowshot_support(base_x[many], base_y[many], novel_x, novel_y, per_class=100, seed=0)
    counts = {int(c): int((labels == c).sum()) for c in labels.unique()}
    assert counts == {0: 100, 3: 100, 1: 102, 2: 102}
    base_part = feats[:200, 0].numpy()
    assert np.all(np.diff(base_part[:100]) > 0) and np.all(np.diff(base_part[100:200]) > 0)
    torch.testing.assert_close(feats[200:], torch.from_numpy(np.tile(novel_x, (34, 1))))  # tiled as a block
    assert labels[200:].tolist() == np.tile(novel_y, 34).tolist()
    # a base class with fewer rows keeps all 80, and the novel classes are tiled to 80 too: ceil(80 / 3) = 27x
    feats, labels = lowshot_support(base_x, base_y, novel_x, novel_y, per_class=100, seed=0)
    counts = {int(c): int((labels == c).sum()) for c in labels.unique()}
    assert counts == {0: 100, 3: 100, 4: 80, 1: 81, 2: 81}
    torch.testing.assert_close(feats[280:], torch.from_numpy(np.tile(novel_x, (27, 1))))
    head = MatchingNetwork(steps=1).fit_lowshot(base_x, base_y, novel_x, novel_y, n_classes=5)
    assert head.logits(novel_x).shape == (6, 5)


def _np_lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One LSTM step in float64 numpy, PyTorch's gate order (i, f, g, o)."""
    z = x @ w_ih.T + h @ w_hh.T + b_ih + b_hh
    i, f, g, o = np.split(z, 4, axis=-1)
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
    c = sig(f) * c + sig(i) * np.tanh(g)
    return sig(o) * np.tanh(c), c


def test_fce_lowshot_logits_equal_the_original_formulas():
    """The benchmark's test-time scoring with full-context embeddings, transcribed from the original code
    (matching_network.py of low-shot-shrink-hallucinate: encode_training_set, FullyContextualEmbedding.forward,
    get_logprobs, encode_lowshot_trainset) in float64 numpy with the head's own weights: G = S + h_fwd + h_bwd of
    the biLSTM over the whole support sequence, G_norm = G / (|G| + 1e-5), K attention steps over the unnormalised
    G with [f, r] as the cell input and h + f, scores F G_normᵀ, log(softmax(scores) Y) with one-hot Y over all
    classes (log 0 = -inf for classes without support)."""
    rng = np.random.default_rng(8)
    d, C = 6, 7
    base_y = np.repeat([0, 2, 5], [12, 9, 10])
    base_x = rng.standard_normal((base_y.size, d)).astype(np.float32)
    novel_y = np.array([1, 3, 3, 1])
    novel_x = rng.standard_normal((4, d)).astype(np.float32)
    queries = rng.standard_normal((5, d)).astype(np.float32)
    head = MatchingNetwork(steps=3, seed=2).fit_lowshot(base_x, base_y, novel_x, novel_y, per_class=8, seed=1,
                                                        n_classes=C)
    got = head.logits(queries).numpy().astype(np.float64)
    S, labels = (t.numpy().astype(np.float64) for t in lowshot_support(base_x, base_y, novel_x, novel_y,
                                                                      per_class=8, seed=1))
    p = {k: v.detach().numpy().astype(np.float64) for k, v in head.net_.state_dict().items()}
    s = len(S)
    fwd, bwd = np.zeros((s, d)), np.zeros((s, d))
    h = c = np.zeros(d)
    for t in range(s):
        h, c = _np_lstm_step(S[t], h, c, *(p[f"encoder.{k}_l0"] for k in ("weight_ih", "weight_hh", "bias_ih",
                                                                          "bias_hh")))
        fwd[t] = h
    h = c = np.zeros(d)
    for t in reversed(range(s)):
        h, c = _np_lstm_step(S[t], h, c, *(p[f"encoder.{k}_l0_reverse"] for k in ("weight_ih", "weight_hh",
                                                                                  "bias_ih", "bias_hh")))
        bwd[t] = h
    G = S + fwd + bwd
    G_norm = G / (np.linalg.norm(G, axis=1, keepdims=True) + 1e-5)
    f = queries.astype(np.float64)
    h, c = f, np.zeros_like(f)
    cell = [p[f"cell.{k}"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    for _ in range(3):
        logit_a = h @ G.T
        a = np.exp(logit_a - logit_a.max(1, keepdims=True))
        a /= a.sum(1, keepdims=True)
        h, c = _np_lstm_step(np.concatenate([f, a @ G], axis=1), h, c, *cell)
        h = h + f
    scores = h @ G_norm.T
    sm = np.exp(scores - scores.max(1, keepdims=True))
    sm /= sm.sum(1, keepdims=True)
    Y = np.zeros((s, C))
    Y[np.arange(s), labels.astype(np.int64)] = 1
    with np.errstate(divide="ignore"):
        want = np.log(sm @ Y)
    # the support: 8 of each base class's rows, the 2 examples per novel class tiled ceil(8 / 2) = 4 times
    assert s == 3 * 8 + 4 * 4
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    assert np.isinf(want[:, [4, 6]]).all() and np.isfinite(want[:, [0, 1, 2, 3, 5]]).all()
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-5, atol=1e-5)

"""heads/analogy.py: faithful k-means, exact analogy mining, generator training, generation."""

import numpy as np
import pytest
import torch

from heads.analogy import AnalogyGenerator, cluster_classes, difference_vectors, kmeans_faithful, mine_analogies
from heads.base import NotFittedError


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: with 2 intra-op threads on a shared 2-core machine, every parallel region waits on
    a descheduled thread (measured 40x slower). One thread for this module, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _clustered(n_classes=4, per_class=40, d=8, seed=0, label_offset=0):
    """Non-negative clustered features on the scale of real pooled features."""
    rng = np.random.default_rng(seed)
    centres = rng.random((n_classes, d))
    x = np.concatenate([np.abs(c + 0.15 * rng.standard_normal((per_class, d))) for c in centres])
    y = np.repeat(np.arange(n_classes) + label_offset, per_class)
    return x.astype(np.float32), y


def _classifier(x, y, n_out):
    """A frozen linear classifier with bias over n_out classes (rows of unseen classes stay 0)."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1.0, max_iter=1000).fit(x, y)
    w, b = np.zeros((n_out, x.shape[1]), dtype=np.float32), np.zeros(n_out, dtype=np.float32)
    w[lr.classes_], b[lr.classes_] = lr.coef_, lr.intercept_
    return w, b


SMALL = dict(clusters_per_class=4, hidden=16, iterations=60, batch=16, lr=0.1, log_every=20)


@pytest.fixture(scope="module")
def base_data():
    x, y = _clustered(n_classes=4, label_offset=2)  # labels 2..5 index a 7-row classifier
    w, b = _classifier(x, y, 7)
    return x, y, w, b


@pytest.fixture(scope="module")
def small_gen(base_data):
    x, y, w, b = base_data
    return AnalogyGenerator(**SMALL, seed=3).fit(x, y, w, b)


def _brute_force(c):
    """The spec's definition, written plainly (float64): per class i and ordered pair, the best positive
    cosine over the ordered pairs of the other classes, strict improvement, j in increasing order."""
    nc, K, _ = c.shape
    diffs = [difference_vectors(ci) for ci in c]
    recs, scores = [], []
    for i in range(nc):
        best, who = np.zeros(K * K), np.zeros((K * K, 2), dtype=np.int64)
        for j in range(nc):
            if j == i:
                continue
            dots = diffs[i] @ diffs[j].T
            m, a = dots.max(1), dots.argmax(1)
            better = m > best
            best[better] = m[better]
            who[better, 0] = j * K + a[better] // K
            who[better, 1] = j * K + a[better] % K
        pair = np.arange(K * K)
        r = np.stack([i * K + pair // K, i * K + pair % K, who[:, 0], who[:, 1]], axis=1)
        keep = (best > 0) & (r[:, 0] != r[:, 1]) & (r[:, 2] != r[:, 3])
        recs.append(r[keep])
        scores.append(best[keep])
    return np.concatenate(recs), np.concatenate(scores)


# ------------------------------------------------------------------------------------------------ k-means
class _ScriptedRng:
    """Stands in for the generator's RNG: returns the scripted re-seeding draws in order."""

    def __init__(self, draws):
        self.draws = list(draws)

    def integers(self, n):
        return self.draws.pop(0)


def test_kmeans_stale_centroid_and_reseeding_by_hand():
    # 1-d data 0, 10, 11; centroids start at 5, 20, -100.
    # it 1: 5 is nearest to all -> mean 7 (count 3); 20 and -100 get nothing: cumulative 0 -> re-seeded in index
    #       order to x[0] = 0 and x[1] = 10.
    # it 2: 0 -> centroid 1 (at 0); 10, 11 -> centroid 2 (at 10) -> 10.5; centroid 0 loses all points but has a
    #       cumulative count of 3: it keeps its stale position 7 (no re-seeding).
    # it 3..20: unchanged.  Cumulative counts: 3, 19 * 1, 19 * 2.
    x = np.array([[0.0], [10.0], [11.0]])
    c, counts = kmeans_faithful(x, 3, iters=20, block=2, rng=_ScriptedRng([0, 1]),
                                init=np.array([[5.0], [20.0], [-100.0]]))
    np.testing.assert_array_equal(c, [[7.0], [0.0], [10.5]])
    np.testing.assert_array_equal(counts, [3, 19, 38])


def test_kmeans_reseeds_while_cumulative_count_is_zero():
    # data 5, 6, 7; init +1, -1 (unit vectors): +1 takes everything -> 6; -1 is re-seeded to x[1] = 6.
    # it 2: both at 6 -> tie -> index 0 takes everything again; centroid 1 still has cumulative count 0 and is
    #       re-seeded again, now to x[2] = 7.  From it 3: {5, 6} -> 5.5 and {7} -> 7.
    x = np.array([[5.0], [6.0], [7.0]])
    c, counts = kmeans_faithful(x, 2, iters=5, rng=_ScriptedRng([1, 2]), init=np.array([[1.0], [-1.0]]))
    np.testing.assert_array_equal(c, [[5.5], [7.0]])
    np.testing.assert_array_equal(counts, [3 + 3 + 2 * 3, 3])


def test_kmeans_default_init_is_unit_gaussian_and_seeded():
    rng = np.random.default_rng(5)
    expected = rng.standard_normal((3, 4))
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    x = np.full((6, 4), 50.0)
    x[:, 0] += np.arange(6)
    c, counts = kmeans_faithful(x, 3, iters=0, rng=np.random.default_rng(5))
    np.testing.assert_allclose(c, expected)
    a, _ = kmeans_faithful(x, 3, iters=3, rng=np.random.default_rng(7))
    b, _ = kmeans_faithful(x, 3, iters=3, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


def test_cluster_classes_shapes_and_faiss_variant():
    x, y = _clustered(n_classes=3, per_class=30, d=6)
    c = cluster_classes(x, y, [0, 1, 2], 5, seed=1)
    assert c.shape == (3, 5, 6)
    # every centroid of class k lies in the convex hull's bounding box of class k's rows (means or data points)
    for k in range(3):
        rows = x[y == k]
        assert np.all(c[k] >= rows.min(0) - 1e-9) and np.all(c[k] <= rows.max(0) + 1e-9)
    # one class's centroids do not depend on the others (per-class RNG streams)
    np.testing.assert_array_equal(cluster_classes(x, y, [1], 5, seed=1)[0], c[1])
    f = cluster_classes(x, y, [0, 1, 2], 5, method="faiss", seed=1)
    assert f.shape == (3, 5, 6)
    assert AnalogyGenerator(kmeans="faiss").variant == "faiss-kmeans"
    with pytest.raises(ValueError, match="at least 5 rows"):
        cluster_classes(x[:4], y[:4], [0], 5, method="faiss")


# ------------------------------------------------------------------------------------------------ mining
@pytest.mark.parametrize("project", [False, "auto", True])
def test_mining_equals_brute_force(project):
    rng = np.random.default_rng(0)
    c = rng.random((3, 4, 16)) * 3  # 3 classes x 4 clusters
    want, want_scores = _brute_force(c)
    got, got_scores = mine_analogies(c, block=5, project=project)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    assert len(got) <= 3 * 4 * 3  # at most K(K-1) records per class


def test_mining_torch_reductions_equal_numpy_ones(monkeypatch):
    import heads.analogy as analogy

    c = np.random.default_rng(3).random((4, 6, 10))
    want = mine_analogies(c, block=9)
    monkeypatch.setattr(analogy, "_NUMPY_ROW_REDUCTIONS", False)  # the path taken on a GPU
    got = mine_analogies(c, block=9)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_mining_equals_brute_force_larger_and_low_dim():
    rng = np.random.default_rng(1)
    for shape in [(5, 6, 8), (4, 7, 3)]:
        c = rng.random(shape) * 2
        want, _ = _brute_force(c)
        np.testing.assert_array_equal(mine_analogies(c, block=7)[0], want)


def test_mining_ties_go_to_the_earliest_class():
    rng = np.random.default_rng(2)
    c = rng.random((3, 4, 5))
    c[2] = c[1]  # classes 1 and 2 identical: every class-0 query ties between j = 1 and j = 2
    got, scores = mine_analogies(c)
    from_class0 = got[got[:, 0] < 4]
    assert len(from_class0) > 0 and np.all(from_class0[:, 2] // 4 == 1)
    # class 1 finds its own copy (class 2) with cosine ~1, and vice versa
    from_class1 = got[(got[:, 0] >= 4) & (got[:, 0] < 8)]
    assert np.all(from_class1[:, 2] // 4 == 2)
    np.testing.assert_allclose(scores[(got[:, 0] >= 4) & (got[:, 0] < 8)], 1.0, atol=1e-4)


def test_mining_drops_zero_and_nonpositive_records():
    c = np.zeros((2, 3, 4))
    c[0] = [[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]]
    c[1] = [[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]  # orthogonal subspaces: every cosine is 0
    got, _ = mine_analogies(c, project=False)
    assert got.shape == (0, 4)
    # the projected GEMM may leave rounding noise where the exact cosine is 0, never more
    _, scores = mine_analogies(c, project=True)
    assert np.all(scores < 1e-6)
    c[1, 1:, 2:] = 0
    c[1, 1, 0] = c[1, 2, 1] = 1  # class 1 = class 0 up to the order: cosines 1 or -1 only
    got, scores = mine_analogies(c)
    assert len(got) == 12 and np.allclose(scores, 1, atol=1e-4)


# ------------------------------------------------------------------------------------------------ training
def test_training_lowers_the_loss(base_data):
    x, y, w, b = base_data
    gen = AnalogyGenerator(clusters_per_class=4, hidden=32, iterations=300, batch=16, lr=0.1, log_every=25,
                           seed=0).fit(x, y, w, b)
    hist = gen.loss_history_
    assert hist.shape == (12, 4) and hist[-1, 0] == 300
    assert hist[-1, 1] < 0.5 * hist[0, 1]
    np.testing.assert_allclose(hist[:, 1], hist[:, 2] + 10 * hist[:, 3], rtol=1e-6)


def test_lr_schedule_and_classifier_checks(base_data):
    x, y, w, b = base_data
    gen = AnalogyGenerator(lr=0.5, lr_steps=(10, 20))
    assert [gen._lr_at(i) for i in (0, 9, 10, 19, 20, 99)] == pytest.approx([0.5, 0.5, 0.05, 0.05, 0.005, 0.005])
    with pytest.raises(ValueError, match="index the classifier"):
        AnalogyGenerator(**SMALL).fit(x, y, w[:4])
    g = AnalogyGenerator(**SMALL).fit(x, y, w)  # the bias is optional (ResNet-10's classifier has none)
    assert np.isfinite(g.loss_history_).all()


def test_a_generator_that_died_is_refused(base_data):
    """Features of norm ~300 with lr 10: the generator's ReLUs die and it would hallucinate zero vectors."""
    x, y, w, b = base_data
    with pytest.raises(ValueError, match="collapsed|diverged"):
        AnalogyGenerator(clusters_per_class=4, hidden=32, iterations=200, batch=16, lr=10.0, seed=0).fit(
            30 * x, y, w, b)


def test_fit_is_deterministic(base_data, small_gen):
    x, y, w, b = base_data
    again = AnalogyGenerator(**SMALL, seed=3).fit(x, y, w, b)
    first, second = small_gen.to_arrays(include_analogies=True), again.to_arrays(include_analogies=True)
    assert first.keys() == second.keys()
    for k in first:
        np.testing.assert_array_equal(first[k], second[k], err_msg=k)
    other = AnalogyGenerator(**SMALL, seed=4).fit(x, y, w, b)
    assert not np.array_equal(other.to_arrays()["centroids"], first["centroids"])


def test_cached_stages_reproduce_the_fit(base_data, small_gen):
    x, y, w, b = base_data
    cents = small_gen.centroids_.cpu().numpy()
    g = AnalogyGenerator(**SMALL, seed=3).fit(x, y, w, b, centroids=cents, analogies=small_gen.analogies_)
    for k, v in small_gen.to_arrays().items():
        np.testing.assert_array_equal(g.to_arrays()[k], v, err_msg=k)


# ------------------------------------------------------------------------------------------------ generation
def _novel(d=8):
    rng = np.random.default_rng(9)
    labels = np.array([20, 21, 21, 21, 22, 22, 22, 22, 22, 23, 23])  # m = 1, 3, 5, 2
    return rng.random((labels.size, d)).astype(np.float32), labels


def test_generation_counts_labels_and_sampling(small_gen):
    feats, labels = _novel()
    out, out_labels = small_gen.generate(feats, labels, max_per_label=3, seed=1)
    # M = 3: class 20 (m = 1) gets 2, class 23 (m = 2) gets 1, classes with m >= M get nothing
    assert out.shape == (3, 8) and out.dtype == torch.float32
    assert out_labels.tolist() == [20, 20, 23]
    assert (out >= 0).all()  # ReLU output
    plan = small_gen.plan(labels, 3, seed=1)
    np.testing.assert_array_equal(labels[plan[:, 0]], out_labels.numpy())  # each seed is a row of its class
    assert np.all(plan[:, 1] // 4 == plan[:, 2] // 4)  # C and D come from the same base class
    # the features are G(seed, C, D)
    cents = small_gen.centroids_
    manual = small_gen.net_(torch.from_numpy(feats[plan[:, 0]]), cents[plan[:, 1]], cents[plan[:, 2]])
    torch.testing.assert_close(out, manual.detach())
    # nothing to do when every class already has M examples
    none, none_labels = small_gen.generate(feats, labels, max_per_label=1, seed=1)
    assert none.shape == (0, 8) and none_labels.shape == (0,)


def test_generation_sampling_rules_at_scale(small_gen):
    feats, labels = _novel()
    M = 400
    plan = small_gen.plan(labels, M, seed=2)
    counts = {lab: int((labels[plan[:, 0]] == lab).sum()) for lab in np.unique(labels)}
    assert counts == {20: M - 1, 21: M - 3, 22: M - 5, 23: M - 2}
    rows22 = plan[labels[plan[:, 0]] == 22, 0]
    assert set(rows22.tolist()) == set(np.flatnonzero(labels == 22).tolist())  # uniform with replacement
    base = plan[:, 1] // 4
    assert set(base.tolist()) == {0, 1, 2, 3}  # every base class is used
    assert np.mean(plan[:, 1] == plan[:, 2]) > 0.1  # C = D is allowed (probability 1/K)
    a = small_gen.generate(feats, labels, 5, seed=7)[0]
    b = small_gen.generate(feats, labels, 5, seed=7)[0]
    torch.testing.assert_close(a, b)
    assert a.std(0).mean() > 1e-3  # not a collapsed generator
    assert not np.array_equal(small_gen.plan(labels, 5, seed=7), small_gen.plan(labels, 5, seed=8))


def test_arrays_round_trip(small_gen):
    arrays = small_gen.to_arrays(include_analogies=True)
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    back = AnalogyGenerator.from_arrays(arrays)
    assert back.hparams() == small_gen.hparams()
    feats, labels = _novel()
    for seed in (0, 1):
        a, la = small_gen.generate(feats, labels, 6, seed=seed)
        b, lb = back.generate(feats, labels, 6, seed=seed)
        assert torch.equal(a, b) and torch.equal(la, lb)
    np.testing.assert_array_equal(back.analogies_, small_gen.analogies_)


def test_cache_key():
    g = AnalogyGenerator(clusters_per_class=10)
    k = g.cache_key("abc")
    assert len(k) == 64 and k == AnalogyGenerator(clusters_per_class=10, device="cpu", mining_block=7).cache_key("abc")
    assert k != g.cache_key("abd")
    assert k != AnalogyGenerator(clusters_per_class=10, mse_weight=5).cache_key("abc")
    assert k != g.cache_key("abc", base_classes=[1, 2])
    # the clustering stage does not depend on the generator's training hyper-parameters
    assert (g.cache_key("abc", stage="centroids")
            == AnalogyGenerator(clusters_per_class=10, lr=1.0).cache_key("abc", stage="centroids"))
    assert g.cache_key("abc", stage="centroids") != AnalogyGenerator(clusters_per_class=10, seed=1).cache_key(
        "abc", stage="centroids")
    assert len(AnalogyGenerator.input_digest(np.arange(3), None)) == 64


def test_unfitted_generator_raises():
    with pytest.raises(NotFittedError):
        AnalogyGenerator().generate(np.zeros((1, 4)), np.zeros(1), 5)
    with pytest.raises(NotFittedError):
        AnalogyGenerator().to_arrays()

"""heads.protonet: hand-computed logits, batched episodes equal a per-episode loop, the Head contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from heads.base import HEADS, NotFittedError, create_head
from heads.protonet import ProtoNet


def test_registered():
    assert HEADS["protonet"] is ProtoNet
    assert isinstance(create_head("protonet", metric="cosine"), ProtoNet)


def test_unknown_score_keeps_its_old_name_as_an_option():
    # the hyper-parameter was called open_score, like the method; benches still accept that spelling
    head = create_head("protonet", open_score="distance")
    assert head.unknown_score == "distance" and callable(head.open_score)
    # the default open score is the distance to the nearest prototype (below chance by max-softmax on saturated
    # Euclidean logits); the papers' max-softmax stays available by name, under both spellings
    assert ProtoNet().unknown_score == "distance" and ProtoNet().get_params()["unknown_score"] == "distance"
    assert create_head("protonet", open_score="msp").unknown_score == "msp"
    assert create_head("protonet", unknown_score="msp").unknown_score == "msp"
    cos = ProtoNet(metric="cosine")
    assert cos.temperature is None and cos.scale_temperature == 0.1
    back = cos.set_params(metric="euclidean")  # the default temperature follows the metric
    assert back.scale_temperature == 1.0 and back.get_params()["temperature"] is None


def test_logits_by_hand():
    support = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]], dtype=np.float32)
    labels = np.array([0, 0, 1])
    head = ProtoNet(temperature=2.0, unknown_score="msp").fit(support, labels)
    assert head.prototypes_.tolist() == [[1.0, 0.0], [0.0, 4.0]]
    q = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    # squared distances: q0 -> (0+1, 1+9) = (1, 10); q1 -> (1+9, 0+1) = (10, 1); logits = -d2 / 2
    assert torch.allclose(head.logits(q), torch.tensor([[-0.5, -5.0], [-5.0, -0.5]]))
    p = torch.softmax(torch.tensor([-0.5, -5.0]), 0).max()
    assert torch.allclose(head.open_score(q), -torch.stack([p, p]))
    assert torch.allclose(ProtoNet(unknown_score="maxlogit", temperature=2.0).fit(support, labels).open_score(q),
                          torch.tensor([0.5, 0.5]))
    assert torch.allclose(ProtoNet(unknown_score="distance").fit(support, labels).open_score(q),
                          torch.tensor([1.0, 1.0]))
    # the default: the Euclidean distance to the nearest prototype, whatever the temperature
    assert torch.allclose(ProtoNet(temperature=2.0).fit(support, labels).open_score(q), torch.tensor([1.0, 1.0]))
    assert head.predict(q).tolist() == [0, 1]
    cos = ProtoNet(metric="cosine").fit(support, labels)  # default temperature 0.1
    # q0 = (1, 1): cos with (1, 0) and (0, 1) = 1/sqrt(2) each
    assert torch.allclose(cos.logits(q)[0], torch.full((2,), 10 / np.sqrt(2)), atol=1e-5)
    assert torch.allclose(ProtoNet(metric="cosine", unknown_score="distance").fit(support, labels).open_score(q)[1],
                          torch.tensor(0.0), atol=1e-6)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("score", ["msp", "maxlogit", "distance"])
def test_batched_equals_per_episode_loop(metric, score):
    g = torch.Generator().manual_seed(1)
    E, N, K, m, d = 7, 5, 3, 11, 8
    support = torch.randn(E, N * K, d, generator=g)
    labels = torch.stack([torch.randperm(N * K, generator=g) % N for _ in range(E)])  # any order of labels
    queries = torch.randn(E, m, d, generator=g)
    head = ProtoNet(metric=metric, unknown_score=score, temperature=0.7).fit(support, labels)
    logits, scores = head.logits(queries), head.open_score(queries)
    assert head.prototypes_.shape == (E, N, d) and logits.shape == (E, m, N) and scores.shape == (E, m)
    both = head.logits_and_open_score(queries)
    assert torch.equal(both[0], logits) and torch.equal(both[1], scores)
    for e in range(E):
        one = ProtoNet(metric=metric, unknown_score=score, temperature=0.7).fit(support[e].numpy(), labels[e].numpy())
        protos = torch.stack([support[e][labels[e] == c].mean(0) for c in range(N)])
        assert torch.allclose(one.prototypes_, protos, atol=1e-6)
        assert torch.allclose(head.prototypes_[e], protos, atol=1e-6)
        assert torch.allclose(logits[e], one.logits(queries[e]), atol=1e-5)
        assert torch.allclose(scores[e], one.open_score(queries[e]), atol=1e-5)
        if metric == "euclidean":  # against the plain definition
            assert torch.allclose(logits[e], -torch.cdist(queries[e], protos) ** 2 / 0.7, atol=1e-4)


def test_unbatched_prototypes_score_batched_queries():
    g = torch.Generator().manual_seed(2)
    head = ProtoNet().fit(torch.randn(6, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 2]))
    q = torch.randn(3, 5, 4, generator=g)
    assert torch.allclose(head.logits(q)[1], head.logits(q[1]))


def test_contract_errors():
    head = ProtoNet()
    with pytest.raises(NotFittedError):
        head.logits(torch.zeros(2, 3))
    with pytest.raises(NotFittedError):
        head.open_score(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="class 1 has no example"):
        ProtoNet().fit(torch.zeros(3, 2), torch.tensor([0, 2, 2]))
    with pytest.raises(ValueError, match="metric"):
        ProtoNet(metric="manhattan")
    with pytest.raises(ValueError, match="unknown_score"):
        ProtoNet(unknown_score="entropy")
    fitted = ProtoNet().fit(torch.zeros(2, 2, 3), torch.tensor([[0, 1], [0, 1]]))
    with pytest.raises(ValueError, match="do not fit"):
        fitted.logits(torch.zeros(3, 4, 3))  # 3 episodes of queries for 2 episodes of prototypes
    # negative labels (unknown) are ignored when averaging
    h = ProtoNet().fit(torch.tensor([[1.0], [3.0], [100.0]]), torch.tensor([0, 0, -1]))
    assert h.prototypes_.tolist() == [[2.0]]

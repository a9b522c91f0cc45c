"""Heads: learners on cached feature tensors (the contract is in :mod:`heads.base`).

Importing the package imports every head module, so the registry of :func:`heads.base.list_heads` is complete.
The modules hold definitions only (no work at import time). The negative-prototype machinery that benches reuse
outside a head (the seeded episode sampler, the head base class) is exported here under public names.
"""

from heads import analogy, dnpg, logreg, matching, protonet, scores, tane  # noqa: F401  (registers the heads)
from heads._negproto_common import Episodes, NegProtoHead, sample_episodes
from heads.base import (
    EPISODES,
    MAPS,
    POOLED,
    Head,
    HeadError,
    MetaTrainData,
    NotFittedError,
    UnknownHeadError,
    UnknownOptionError,
    UnmetNeedError,
    class_means,
    create_head,
    head_class,
    list_heads,
)

__all__ = [
    "EPISODES", "MAPS", "POOLED", "Episodes", "Head", "HeadError", "MetaTrainData", "NegProtoHead",
    "NotFittedError", "UnknownHeadError", "UnknownOptionError", "UnmetNeedError", "class_means", "create_head",
    "head_class", "list_heads", "sample_episodes",
]

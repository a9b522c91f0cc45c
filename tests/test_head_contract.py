"""The Head contract (heads/base.py), checked on every registered head: a head is tested because it is registered.

Per head: construction from (at most) the few required arguments below, ``fit`` returning self, learnt state
ending in ``_``, :class:`NotFittedError` before fitting, same seed same numbers, float32 and float16 CPU inputs,
``get_params`` / ``set_params`` / ``clone``, valid class declarations and the one-line refusal of an unknown option.
Heads with ``needs_meta_training`` first run a tiny ``meta_train`` on synthetic base classes. CPU, a few seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from heads.base import (
    EPISODES,
    INPUT_KINDS,
    Head,
    MetaTrainData,
    NotFittedError,
    UnknownOptionError,
    accepted_params,
    class_means,
    create_head,
    head_class,
    list_heads,
)

D, N_BASE, N_CLASSES, PER_CLASS = 8, 8, 12, 12
WAYS, SHOTS, QUERIES = 3, 2, 3

#: the arguments a head needs to be built small and quick here; a registered head that is missing is built with
#: none (and the tests of it fail, saying so, when it cannot be)
HEAD_ARGS: dict[str, dict] = {
    "protonet": {},
    "tane": dict(feat_dim=D, n_base_classes=N_BASE, epochs=1, episodes_per_epoch=4, episodes_per_step=2,
                 val_episodes=4),
    "dnpg": dict(feat_dim=D, n_base_classes=N_BASE, epochs=1, episodes_per_epoch=4, episodes_per_step=2,
                 val_episodes=4, phase2_epochs=1, phase2_batch_size=32),
    "matching": dict(steps=2, episodes=6),
    "logreg": dict(iterations=4, batch_size=4),
}

HEADS = list_heads()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny problems: thread start-up costs more than it saves on a shared machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def store():
    """Clustered features: classes 0..7 base (meta-training), 8..11 validation; every class 12 rows."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(N_CLASSES, D))
    x = np.concatenate([c + 0.3 * rng.normal(size=(PER_CLASS, D)) for c in centres]).astype(np.float32)
    y = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    return torch.from_numpy(x), y


@pytest.fixture(scope="module")
def task(store):
    """One fit/score problem: batched episodes ([E, n, d]) for episode heads, pooled rows ([n, d]) for the rest."""
    x, y = store
    g = torch.Generator().manual_seed(3)
    E = 2
    support = torch.randn(E, WAYS * SHOTS, D, generator=g)
    support_labels = torch.arange(WAYS).repeat_interleave(SHOTS).expand(E, -1).clone()
    queries = torch.randn(E, WAYS * QUERIES, D, generator=g)
    pooled = (support.reshape(-1, D), torch.arange(WAYS).repeat_interleave(SHOTS).repeat(E), queries.reshape(-1, D))
    return {"episodes": (support, support_labels, queries), "pooled": pooled}


def meta_data(store) -> MetaTrainData:
    x, y = store
    train = np.flatnonzero(y < N_BASE)
    val = np.flatnonzero(y >= N_BASE)
    base_weights, _ = class_means(x[torch.from_numpy(train)], torch.from_numpy(y[train]), N_BASE)
    return MetaTrainData(x, y, train, val, base_weights=base_weights, ways=2, shots=1, queries=2, open_ways=2)


def make(name: str, **extra) -> Head:
    args = {**HEAD_ARGS.get(name, {}), **extra}
    try:
        return create_head(name, **args)
    except Exception as exc:  # a new head without an entry above: say what to do
        pytest.fail(f"head {name!r} cannot be built from {args or 'no arguments'} ({type(exc).__name__}: {exc}); "
                    f"add its required arguments to HEAD_ARGS in {__file__}")


def problem(head: Head, task):
    return task["episodes"] if head.input_kind == EPISODES else task["pooled"]


def prepare(head: Head, store) -> Head:
    if head.needs_meta_training:
        assert head.meta_train(meta_data(store), seed=0) is head
    return head


def scores(head: Head, support, labels, queries):
    assert head.fit(support, labels) is head
    return head.logits(queries), head.open_score(queries)


def attributes(head: Head) -> dict[str, object]:
    """Every attribute of the head by name: plain ones and the parameters, buffers and submodules torch keeps."""
    out = {k: v for k, v in vars(head).items() if k not in ("_parameters", "_buffers", "_modules")}
    for group in (head._parameters, head._buffers, head._modules):
        out.update(group)
    return out


def changed(before: dict[str, object], after: dict[str, object]) -> set[str]:
    """Public attributes that are new or hold another object (``training`` is torch's train/eval flag)."""
    def same(a, b):
        return a is b or (isinstance(a, (bool, int, float, str, tuple)) and type(a) is type(b) and a == b)

    names = {k for k, v in after.items() if k not in before or not same(v, before[k])}
    return {k for k in names if not k.startswith("_") and k != "training"}


# ------------------------------------------------------------------------------------------------ the tests
def test_every_head_is_registered_by_importing_heads():
    assert {"protonet", "tane", "dnpg", "matching", "logreg"} <= set(HEADS)
    unknown = set(HEAD_ARGS) - set(HEADS)
    assert not unknown, f"HEAD_ARGS names heads that are not registered: {sorted(unknown)}"


@pytest.mark.parametrize("name", HEADS)
def test_declarations(name):
    cls = head_class(name)
    assert issubclass(cls, Head) and cls.head_name == name
    assert cls.input_kind in INPUT_KINDS
    for flag in ("needs_meta_training", "is_transductive", "gives_unknown_score", "has_unknown_column"):
        assert isinstance(getattr(cls, flag), bool), flag
    if cls.needs_meta_training:
        assert cls.meta_train is not Head.meta_train, "needs_meta_training without a meta_train"
    if cls.gives_unknown_score:
        assert cls.open_score is not Head.open_score, "gives_unknown_score but open_score is the generic one"
    if cls.has_unknown_column:
        assert callable(getattr(cls, "logits_with_negative", None))
    params = accepted_params(cls)
    assert "device" in params
    for old, new in cls.param_aliases.items():
        assert new in params and old not in params, (old, new)
    assert not hasattr(cls, "needs_backbone")


@pytest.mark.parametrize("name", HEADS)
def test_fit_returns_self_and_learnt_state_ends_in_underscore(name, store, task):
    head = make(name)
    params = head.get_params()
    before = attributes(head)
    prepare(head, store)
    support, labels, queries = problem(head, task)
    logits, open_score = scores(head, support, labels, queries)
    assert logits.shape == (*queries.shape[:-1], WAYS) and open_score.shape == queries.shape[:-1]
    assert logits.dtype == open_score.dtype == torch.float32
    assert bool(torch.isfinite(open_score).all())
    learnt = changed(before, attributes(head))
    assert learnt, "fit stored nothing"
    assert all(a.endswith("_") for a in learnt), f"learnt state without a trailing underscore: {sorted(learnt)}"
    assert head.get_params() == params, "fit or meta_train changed a hyper-parameter"
    if head.input_kind == EPISODES:  # episode heads also take one unbatched episode
        one, _ = scores(head, support[0], labels[0], queries[0])
        assert one.shape == (queries.shape[1], WAYS)
        torch.testing.assert_close(one, logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", HEADS)
def test_unfitted_use_raises(name, store, task):
    support, labels, queries = problem(make(name), task)
    head = make(name)
    with pytest.raises(NotFittedError):
        head.logits(queries)
    with pytest.raises(NotFittedError):
        head.open_score(queries)
    if head.needs_meta_training:
        prepare(head, store)
        with pytest.raises(NotFittedError):  # meta-trained, but no support fitted yet
            head.logits(queries)


@pytest.mark.parametrize("name", HEADS)
def test_same_seed_same_numbers(name, store, task):
    first, second = make(name), make(name)
    support, labels, queries = problem(first, task)
    state = torch.random.get_rng_state()
    a = scores(prepare(first, store), support, labels, queries)
    b = scores(prepare(second, store), support, labels, queries)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(state, torch.random.get_rng_state()), "the head changed the global RNG state"


@pytest.mark.parametrize("name", HEADS)
def test_float16_and_float32_cpu_inputs(name, store, task):
    # a store gives float16 or float32 features; a head computes in float32 either way
    head = prepare(make(name), store)
    support, labels, queries = problem(head, task)
    half = scores(head, support.half(), labels, queries.half())
    full = scores(head, support.half().float(), labels, queries.half().float())
    assert half[0].dtype == torch.float32 and half[0].device.type == "cpu"
    assert torch.equal(half[0], full[0]) and torch.equal(half[1], full[1])
    numpy_in = scores(head, support.numpy(), labels.numpy(), queries.numpy())
    direct = scores(head, support, labels, queries)
    assert torch.equal(numpy_in[0], direct[0])


@pytest.mark.parametrize("name", HEADS)
def test_get_params_set_params_and_clone(name, store, task):
    head = make(name)
    params = head.get_params()
    assert list(params) == accepted_params(type(head))
    assert type(head)(**params).get_params() == params
    assert make(name).set_params(**params).get_params() == params
    prepare(head, store)
    support, labels, queries = problem(head, task)
    scores(head, support, labels, queries)
    twin = head.clone()
    assert type(twin) is type(head) and twin is not head
    assert twin.get_params() == head.get_params()
    with pytest.raises(NotFittedError):
        twin.logits(queries)
    # the clone learns the same thing again
    again = scores(prepare(twin, store), support, labels, queries)
    assert torch.equal(again[0], head.logits(queries))


@pytest.mark.parametrize("name", HEADS)
def test_unknown_option_names_the_accepted_ones(name):
    with pytest.raises(UnknownOptionError) as err:
        create_head(name, **HEAD_ARGS.get(name, {}), no_such_option=1)
    message = str(err.value)
    assert "no_such_option" in message and name in message
    for param in accepted_params(head_class(name)):
        assert param in message

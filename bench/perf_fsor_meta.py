"""``bench perf --sections fsor-meta``: meta-training TANE / DNPG on cached features against the same episodes run
through the backbone on images.

Both sides run the identical meta-training step (``NegProtoHead.training_step``, SGD with Nesterov momentum, two
episodes per step, each episode as primary and swapped task) on the identical (ways + open_ways)-way episodes; the
only difference is where the support and query features come from: a row gather from the cached ``[n, D]`` matrix,
or the frozen backbone's forward pass over the episode's images (meta-training on top of a frozen backbone,
which is what a cached store replaces). The ratio is reported, not held to a target: it is the backbone's cost
per episode image over the head's own cost, so it grows with the backbone.

The images are random tensors of miniImageNet's shape (3 x 84 x 84 through ResNet-12, the FSOR papers' backbone;
``--quick``: 3 x 28 x 28 through Conv-4), the backbone is randomly initialised (speed does not depend on the
weights), and one epoch is extrapolated from the timed episodes to the papers' 600 episodes.
"""

from __future__ import annotations

import time

import numpy as np

from bench.perf_common import PerfArgs, log, make_row, section

PAPER_EPISODES_PER_EPOCH = 600


@section("fsor-meta")
def fsor_meta_section(args: PerfArgs) -> list[dict]:
    import torch

    from extract import backbones as bb
    from heads import sample_episodes
    from heads.base import MetaTrainData, create_head

    if args.quick:
        model_name, channels, size, small_input, episodes = "conv4", 3, 28, True, 8
    else:
        model_name, channels, size, small_input, episodes = "resnet12", 3, 84, False, 10
    ways, open_ways, shots, queries, per_step = 5, 5, 1, 15, 2
    n_classes, per_class = 16, shots + queries

    torch.manual_seed(args.seed)
    backbone = bb.create_backbone(model_name, small_input=small_input).eval()
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(n_classes * per_class, channels, size, size, generator=gen)
    labels = np.repeat(np.arange(n_classes), per_class)
    rows = np.arange(len(labels))
    log(f"fsor-meta: caching {len(labels)} images through {model_name} at {size} px")
    with torch.inference_mode():
        cached = torch.cat([backbone(images[i:i + 64]) for i in range(0, len(images), 64)]).float()
    dim = cached.shape[1]
    batch = sample_episodes(labels, rows, ways=ways + open_ways, shots=shots, queries=queries, open_ways=0,
                            seed=[args.seed, 0], start=0, count=episodes)
    images_per_episode = batch.support.shape[1] + batch.query.shape[1]

    def cached_features(idx: torch.Tensor) -> torch.Tensor:
        return cached[idx]

    def backbone_features(idx: torch.Tensor) -> torch.Tensor:
        flat = idx.reshape(-1)
        with torch.inference_mode():
            feats = backbone(images[flat]).float()
        return feats.clone().reshape(*idx.shape, dim)  # out of inference mode, as the head's input

    def epoch(head, features) -> float:
        opt = torch.optim.SGD(head._trainable(), lr=head.learning_rate, momentum=0.9, nesterov=True,
                              weight_decay=head.weight_decay)
        head.train()
        start = time.perf_counter()
        for i in range(0, episodes, per_step):
            sl = slice(i, i + per_step)
            loss = head.training_step(features(batch.support[sl]), batch.support_labels[sl],
                                      features(batch.query[sl]), batch.query_labels[sl], ways=ways,
                                      episode_classes=batch.classes[sl])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - start

    result_rows = []
    base = np.arange(n_classes)
    onehot = torch.from_numpy((labels[None, :] == base[:, None]).astype(np.float32))
    base_weights = onehot @ cached / onehot.sum(1, keepdim=True)  # stand-in classifier rows: class means
    for head_name in ("tane", "dnpg"):
        # epochs 0: meta_train builds the base memory (and DNPG's phase 2) only; the timed epochs follow
        head = create_head(head_name, feat_dim=dim, n_base_classes=n_classes, seed=args.seed, epochs=0)
        head.meta_train(MetaTrainData(features=cached, labels=labels, train_rows=rows, base_weights=base_weights,
                                      ways=ways, shots=shots, queries=queries, open_ways=open_ways), seed=args.seed)
        state = {k: v.clone() for k, v in head.state_dict().items()}
        log(f"fsor-meta: {head_name}, {episodes} episodes on cached features and through the backbone")
        times = {}
        for name, features in (("cached", cached_features), ("backbone", backbone_features)):
            head.load_state_dict(state)
            times[name] = epoch(head, features)
        ratio = times["backbone"] / times["cached"]
        per_epoch = PAPER_EPISODES_PER_EPOCH / episodes
        result_rows.append(make_row(
            "fsor-meta", f"{head_name} meta-training, {PAPER_EPISODES_PER_EPOCH}-episode epoch on cached {dim}-d "
            f"features (extrapolated from {episodes})", times["cached"] * per_epoch,
            reference=times["backbone"] * per_epoch,
            reference_name=f"the same epoch through frozen {model_name} on {size}-px images",
            ratio=ratio, ratio_is="backbone / cached (speedup)", quick=args.quick,
            note=f"{ways}+{open_ways}-way {shots}-shot {queries} queries: {images_per_episode} images per episode; "
                 f"{episodes / times['cached']:.0f} episodes/s cached, {episodes / times['backbone']:.1f} "
                 "through the backbone"))
    return result_rows

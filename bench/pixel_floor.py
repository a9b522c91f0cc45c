"""``bench pixel-floor``: a logistic regression on raw pixels, the floor a trained backbone must clear.

The same classes, the same training / validation split and the same image size as ``extract train`` (the split
comes from the same code: :func:`extract.train.load_training_data`), with scikit-learn's multinomial
``LogisticRegression`` (L-BFGS) on standardised grey-level pixels. Reported: validation top-1 / top-5 (%) and the
fit time, so that ``docs/results.md`` can set a representation's accuracy against what no representation gives.
"""

from __future__ import annotations

import time

import click
import numpy as np

from featstore.atomic import write_json_atomic
from featstore.errors import UserError


def pixel_floor(dataset: str, *, data_root: str | None = None, split: str | None = None,
                base_classes: str | None = None, val: str = "0.1", val_seed: int = 0, image_size: int = 28,
                C: float = 1.0, max_iter: int = 100, seed: int = 0) -> dict:
    """Fit the pixel logistic regression; returns ``{"val_top1", "val_top5", "n_train", "n_val", "classes",
    "seconds", ...}`` (accuracies in %)."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from extract.train import TrainConfig, load_training_data

    if val.strip().lower() in ("none", "0"):
        raise UserError("--val none leaves nothing to measure the floor on; hold out a fraction or a rule")
    cfg = TrainConfig(model="conv4", out="-", dataset=dataset, data_root=data_root, split=split,
                      base_classes=base_classes, val=val, val_seed=val_seed, image_size=image_size, seed=seed,
                      quiet=True)
    data = load_training_data(cfg)
    images = data.images.float().mean(1).flatten(1).numpy() / 255.0  # [n, H*W] grey levels
    labels = data.labels.numpy()
    x_train, y_train = images[data.train_pos], labels[data.train_pos]
    x_val, y_val = images[data.val_pos], labels[data.val_pos]
    scaler = StandardScaler().fit(x_train)
    start = time.perf_counter()
    with torch.no_grad():
        model = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # the iteration cap is part of the recipe
            model.fit(scaler.transform(x_train), y_train)
    seconds = time.perf_counter() - start
    scores = model.decision_function(scaler.transform(x_val))
    top = model.classes_[np.argsort(-scores, axis=1)[:, :5]]
    return {"dataset": dataset, "split": split, "val": val, "image_size": image_size, "classes": len(data.base),
            "n_train": int(len(y_train)), "n_val": int(len(y_val)), "C": C, "max_iter": max_iter,
            "val_top1": 100.0 * float((top[:, 0] == y_val).mean()),
            "val_top5": 100.0 * float((top == y_val[:, None]).any(1).mean()), "seconds": seconds}


@click.command("pixel-floor", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dataset", required=True, help="Data source (see `extract list`).")
@click.option("--data-root", type=click.Path(), default=None)
@click.option("--split", default=None, help="Subset of the source (e.g. background).")
@click.option("--base-classes", default=None, help="As in `extract train` (default: every class).")
@click.option("--val", default="0.1", show_default=True, help="Validation holdout, as in `extract train`.")
@click.option("--val-seed", type=int, default=0, show_default=True)
@click.option("--image-size", type=int, default=28, show_default=True)
@click.option("--C", "C", type=float, default=1.0, show_default=True, help="Inverse L2 strength.")
@click.option("--max-iter", type=int, default=100, show_default=True, help="L-BFGS iterations.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the result as JSON here.")
def pixel_floor_command(dataset, data_root, split, base_classes, val, val_seed, image_size, C, max_iter, seed, out):
    """Logistic regression on raw pixels of the `extract train` split: the floor for a representation."""
    result = pixel_floor(dataset, data_root=data_root, split=split, base_classes=base_classes, val=val,
                         val_seed=val_seed, image_size=image_size, C=C, max_iter=max_iter, seed=seed)
    if out:
        write_json_atomic(out, result)
    click.echo(f"pixel logistic regression, {result['classes']} classes, {result['n_train']} train / "
               f"{result['n_val']} val images at {image_size} px: top-1 {result['val_top1']:.2f}%, top-5 "
               f"{result['val_top5']:.2f}% ({result['seconds']:.0f} s)")

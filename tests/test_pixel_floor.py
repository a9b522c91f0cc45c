"""bench pixel-floor: the pixel logistic regression sees exactly the split `extract train` trains on."""

from __future__ import annotations

import numpy as np
import pytest

from bench.pixel_floor import pixel_floor
from extract.train import TrainConfig, holdout, load_training_data
from featstore.errors import UserError


def test_pixel_floor_uses_the_training_split_and_agrees_with_sklearn():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    result = pixel_floor("digits", base_classes="0-4", val="0.2", image_size=8, max_iter=200)
    digits = load_digits()
    base = np.flatnonzero(digits.target < 5)
    labels = digits.target[base]
    train_pos, val_pos = holdout(labels, "0.2", seed=0)
    assert (result["n_train"], result["n_val"], result["classes"]) == (len(train_pos), len(val_pos), 5)
    # the same problem built straight from scikit-learn's arrays (8 px: the native size, no resampling)
    x = digits.images[base].reshape(len(base), -1) / 16.0
    scaler = StandardScaler().fit(x[train_pos])
    model = LogisticRegression(max_iter=200, random_state=0).fit(scaler.transform(x[train_pos]), labels[train_pos])
    expected = 100.0 * (model.predict(scaler.transform(x[val_pos])) == labels[val_pos]).mean()
    assert result["val_top1"] == pytest.approx(expected, abs=1.5)
    assert result["val_top5"] == 100.0


def test_load_training_data_matches_the_holdout():
    data = load_training_data(TrainConfig(model="conv4", out="-", dataset="digits", base_classes="0-4", val="0.2"))
    assert data.images.dtype.is_floating_point is False and len(data.images) == len(data.labels)
    assert sorted(np.concatenate([data.train_pos, data.val_pos]).tolist()) == list(range(len(data.labels)))


def test_pixel_floor_needs_a_validation_part():
    with pytest.raises(UserError, match="nothing to measure"):
        pixel_floor("digits", val="none")

"""The thumbnail reference model sees the same (perturbed) images as the CNN."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from readingrace.imaging.perturb import apply_perturbation
from readingrace.reference import fit_predict_reference, thumbnails


def _brightness_cohort(n: int = 300, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class 1 images are brighter overall (a pure low-frequency signal) plus white noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = 0.4 + 0.1 * labels[:, None, None] + 0.05 * rng.standard_normal((n, size, size))
    return images.astype(np.float32), labels


def _highpass(x: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    return apply_perturbation(x, {"name": "fourier", "kind": "highpass", "radius": 50}, indices=torch.as_tensor(idx))


def test_thumbnails_apply_the_transform_before_resizing():
    images, _ = _brightness_cohort(n=10)
    index = np.arange(10)
    plain = thumbnails(images, index, size=16)
    zeroed = thumbnails(images, index, size=16, transform=lambda x, idx: torch.zeros_like(x))
    assert plain.shape == zeroed.shape == (10, 256)
    assert np.all(zeroed == 0) and plain.mean() > 0.3
    # the transform gets the images' own indices (seeded per-image perturbations depend on them)
    seen = []
    thumbnails(images, np.array([7, 3, 5]), size=16, chunk=2, transform=lambda x, idx: seen.append(list(idx)) or x)
    assert seen == [[7, 3], [5]]


def test_reference_loses_a_low_frequency_signal_after_high_pass_filtering():
    images, labels = _brightness_cohort()
    split = {"train_index": np.arange(0, 180), "val_index": np.arange(180, 220), "test_index": np.arange(220, 300)}
    test_y = labels[split["test_index"]]
    probs, _ = fit_predict_reference(images, labels, n_classes=2, **split)
    assert roc_auc_score(test_y, probs[:, 1]) > 0.95
    probs_hp, _ = fit_predict_reference(images, labels, n_classes=2, transform=_highpass, **split)
    assert abs(roc_auc_score(test_y, probs_hp[:, 1]) - 0.5) < 0.15

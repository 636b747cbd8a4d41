"""The reference model: logistic regression on 32x32 thumbnails, C tuned on the validation split.

It shows what a CNN adds over coarse intensity and shape: a signal the thumbnail model also finds
is no evidence of anything subtle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from readingrace.threads import threads_for

C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 2, 13))


Transform = Callable[[torch.Tensor, np.ndarray], torch.Tensor]


def thumbnails(images: np.ndarray, index: np.ndarray, size: int = 32, chunk: int = 512,
               transform: Transform | None = None) -> np.ndarray:
    """Anti-aliased ``size`` x ``size`` thumbnails of ``images[index]``, flattened (N, size*size).

    ``transform(batch, batch_indices)`` is applied first: the perturbations the CNN was trained and
    tested with (a C1 filter, a C4 cell), so that the reference sees the same images as the CNN.
    """
    out = []
    for s in range(0, len(index), chunk):
        idx = np.asarray(index[s:s + chunk])
        x = torch.from_numpy(np.asarray(images[idx], dtype=np.float32)).unsqueeze(1)
        if transform is not None:
            x = transform(x, idx)
        out.append(F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                 align_corners=False).flatten(1).numpy())
    return np.concatenate(out) if out else np.zeros((0, size * size), np.float32)


def _macro_auc(y: np.ndarray, p: np.ndarray, n_classes: int) -> float:
    if n_classes == 2:
        return float(roc_auc_score(y, p[:, 1]))
    present = np.unique(y)
    return float(np.mean([roc_auc_score(y == k, p[:, k]) for k in present]))


def fit_predict_reference(
    images: np.ndarray, labels: np.ndarray, *, train_index: np.ndarray, val_index: np.ndarray,
    test_index: np.ndarray, n_classes: int, size: int = 32, c_grid: Sequence[float] = C_GRID,
    transform: Transform | None = None,
) -> tuple[np.ndarray, dict]:
    """Fit on train, pick C by validation macro AUC, refit on train; test probabilities and details.

    ``transform`` perturbs the images before the thumbnails are taken (see :func:`thumbnails`).
    """
    xtr, xva, xte = (thumbnails(images, i, size, transform=transform) for i in (train_index, val_index, test_index))
    scaler = StandardScaler().fit(xtr)
    xtr, xva, xte = scaler.transform(xtr), scaler.transform(xva), scaler.transform(xte)
    ytr, yva = labels[train_index], labels[val_index]
    scores = {}
    best, best_c = None, None
    with threads_for(xtr.size):
        for c in c_grid:
            model = LogisticRegression(C=c, max_iter=2000).fit(xtr, ytr)
            scores[c] = _macro_auc(yva, model.predict_proba(xva), n_classes)
            if best is None or scores[c] > scores[best_c]:
                best, best_c = model, c
    return best.predict_proba(xte), {
        "name": f"logistic regression on {size}x{size} thumbnails",
        "C": best_c, "val_macro_auc": scores[best_c],
    }

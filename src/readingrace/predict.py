"""Apply a trained model to images and write the predictions table."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from readingrace.train import ImageClassifier


def image_batches(images: np.ndarray, index: np.ndarray, *, batch_size: int,
                  device: torch.device) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """``images[index]`` in order as (B, 1, H, W) float32 tensors on ``device``, with their indices."""
    for start in range(0, len(index), batch_size):
        idx = np.asarray(index[start:start + batch_size])
        yield torch.from_numpy(np.asarray(images[idx], dtype=np.float32)).unsqueeze(1).to(device), idx


@torch.no_grad()
def predict_proba(
    model: ImageClassifier, images: np.ndarray, index: np.ndarray, *, batch_size: int = 64,
    bf16: bool = False, transform: Callable[[torch.Tensor, np.ndarray], torch.Tensor] | None = None,
) -> np.ndarray:
    """Softmax probabilities (len(index), n_classes) for ``images[index]``.

    The model's own perturbations (those it was trained with) are applied first; then
    ``transform(batch, batch_indices)``, a test-time perturbation in [0, 1] space.
    """
    model.eval()
    device = next(model.parameters()).device
    out = []
    for x, idx in image_batches(images, index, batch_size=batch_size, device=device):
        x = model.prepare_input(x, idx)
        if transform is not None:
            x = transform(x, idx)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.hparams.n_classes), dtype=np.float32)


def perturbation_transform(spec: dict) -> Callable[[torch.Tensor, np.ndarray], torch.Tensor]:
    """A ``transform`` for :func:`predict_proba` applying one perturbation spec."""
    from readingrace.imaging.perturb import apply_perturbation

    return lambda x, idx: apply_perturbation(x, spec, indices=torch.as_tensor(idx))


def predictions_table(cohort: pd.DataFrame, probs: np.ndarray, classes: Sequence[str], *, target: str,
                      extra: Sequence[str] = ()) -> pd.DataFrame:
    """The predictions.csv table: ids, true label, one ``prob_<class>`` column per class, strata."""
    cols = ["image_id", "patient_id", "study_id"] + [c for c in extra if c in cohort.columns]
    table = cohort[cols].reset_index(drop=True).copy()
    table.insert(3, "label", cohort[target].astype(str).to_numpy())
    for j, c in enumerate(classes):
        table[f"prob_{c}"] = probs[:, j]
    return table

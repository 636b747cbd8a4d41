"""Grad-CAM heatmaps and the hot-box occlusion test (experiment C3).

:func:`gradcam` wraps MONAI's :class:`monai.visualize.GradCAM` with three fixes for this use:

* the class score of a batch is taken per image (``logits[i, target[i]]``); MONAI's default
  ``logits[:, target]`` mixes the images of a batch when their predicted classes differ, so a
  batched map would differ from the per-image one;
* heat is min-max normalised to [0, 1] per image with the hottest pixel at 1 (MONAI's default
  post-processing maps the maximum to 0); a constant (all-zero) map stays 0;
* the hooks are installed on a private copy of the model, so the caller's model keeps its
  parameters, gradients, BatchNorm statistics, training flag and in-place activations.

The heat is computed at the model's input size (the feature map is upsampled bilinearly to the
input's height and width), so boxes drawn from it fit the same image the model saw.

:func:`occlusion_test` is the paper's hot-box experiment: per test image, the Grad-CAM of the
predicted class, the bounding rectangle of heat >= ``threshold`` (:func:`~readingrace.imaging.perturb.hot_box`),
that rectangle set to 0 in [0, 1] space (:func:`~readingrace.imaging.perturb.occlude_boxes`), and
a prediction on the occluded image by the same model. The paper's text thresholds the blue channel
of a jet-coloured heatmap at 0.1; its code's rule equals normalised heat >= 0.65 (the default).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.visualize import GradCAM
from monai.visualize.class_activation_maps import ModelWithHooks
from torch import nn

from readingrace.errors import ConfigError, ReadingRaceError
from readingrace.imaging.perturb import PAPER_HOT_THRESHOLD, hot_box, occlude_boxes

__all__ = ["DEFAULT_LAYERS", "GradCAMExplainer", "default_layer", "gradcam", "occlusion_test", "resolve_layer"]

#: The default Grad-CAM target layer per network family (names inside the MONAI network): the
#: output of the last convolutional stage. DenseNet: the ReLU after ``features.norm5`` (the
#: rectified last feature map, MONAI's documented choice); EfficientNet: the head convolution's
#: BatchNorm ``_bn1`` (its following ``_swish`` module is shared with the stem, so it cannot be
#: hooked).
DEFAULT_LAYERS: dict[str, str] = {"resnet": "layer4", "densenet": "class_layers.relu", "efficientnet": "_bn1"}


class _PerImageHooks(ModelWithHooks):
    """MONAI's hooked model with a per-image class score ``logits[i, target[i]]``."""

    def class_score(self, logits: torch.Tensor, class_idx: Any) -> torch.Tensor:  # noqa: D102
        idx = torch.as_tensor(class_idx, device=logits.device, dtype=torch.long).reshape(-1)
        if idx.numel() == 1:
            idx = idx.expand(logits.shape[0])
        return logits.gather(1, idx.view(-1, 1)).squeeze(1)


def _normalise_per_image(heat: torch.Tensor) -> torch.Tensor:
    """Min-max scale each (1, H, W) map to [0, 1] (hottest = 1); a constant map becomes 0."""
    flat = heat.detach().flatten(1)
    lo = flat.amin(dim=1).view(-1, *[1] * (heat.ndim - 1))
    span = flat.amax(dim=1).view(-1, *[1] * (heat.ndim - 1)) - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (heat.detach() - lo) / safe, torch.zeros_like(heat)).clamp_(0.0, 1.0)


def _network(model: nn.Module) -> tuple[nn.Module, str]:
    """The MONAI network inside ``model`` and its name prefix (``net.`` for an ImageClassifier)."""
    net = getattr(model, "net", None)
    if isinstance(net, nn.Module):
        return net, "net."
    return model, ""


def default_layer(model: nn.Module) -> str:
    """The default target layer's full name in ``model`` (see :data:`DEFAULT_LAYERS`).

    An unknown family falls back to the last ``Conv2d`` of the network.
    """
    from monai.networks.nets import DenseNet, EfficientNet, ResNet

    net, prefix = _network(model)
    for cls, family in ((ResNet, "resnet"), (DenseNet, "densenet"), (EfficientNet, "efficientnet")):
        if isinstance(net, cls):
            return prefix + DEFAULT_LAYERS[family]
    convs = [name for name, mod in net.named_modules() if isinstance(mod, nn.Conv2d)]
    if not convs:
        raise ConfigError(f"gradcam: {type(net).__name__} has no Conv2d layer; pass layer= explicitly")
    return prefix + convs[-1]


def resolve_layer(model: nn.Module, layer: str | None) -> str:
    """The full module name of ``layer`` in ``model`` (names inside ``model.net`` are accepted too)."""
    if layer is None:
        return default_layer(model)
    names = {name for name, _ in model.named_modules()}
    _, prefix = _network(model)
    for candidate in (layer, prefix + layer):
        if candidate in names and candidate:
            return candidate
    tops = sorted(n for n in names if n and n.count(".") <= 1 + prefix.count("."))[-12:]
    raise ConfigError(f"gradcam: layer {layer!r} is not a module of {type(model).__name__}; "
                      f"choose one of its module names, e.g. {tops}")


class GradCAMExplainer:
    """Grad-CAM on a private, eval-mode copy of ``model``: build once, call per batch.

    ``GradCAMExplainer(model, layer)(images, target_class)`` returns the heat (N, H, W) in [0, 1]
    and the class explained per image (N,) (the predicted class where ``target_class`` is None).
    """

    def __init__(self, model: nn.Module, layer: str | None):
        self.layer = resolve_layer(model, layer)
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():  # gradients flow to the input only: no weight gradients
            p.requires_grad_(False)
        self.cam = GradCAM(nn_module=_PerImageHooks(self.model, self.layer, register_forward=True,
                                                    register_backward=True),
                           target_layers=self.layer, postprocessing=_normalise_per_image)

    def __call__(self, images: torch.Tensor, target_class: int | torch.Tensor | None = None,
                 index: np.ndarray | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Heat (N, H, W) in [0, 1] and the class explained per image (N,).

        A model with ``prepare_input`` (an ImageClassifier trained on perturbed images) gets its
        own perturbation first, as in prediction; ``index`` (the images' cache indices) seeds it.
        """
        x = _check_images(images)
        try:
            device = next(self.model.parameters()).device
        except StopIteration:
            device = x.device
        x = x.detach().to(device=device, dtype=torch.float32)
        prepare = getattr(self.model, "prepare_input", None)
        if callable(prepare):
            with torch.no_grad():
                x = prepare(x, index)
        x = x.detach().clone().requires_grad_(True)
        target = _check_target(target_class, len(x), device)
        with torch.enable_grad():
            heat = self.cam(x, class_idx=target)
        used = torch.as_tensor(self.cam.nn_module.class_idx, device=device).reshape(-1).expand(len(x))
        if heat.shape[-2:] != x.shape[-2:]:  # pragma: no cover - MONAI upsamples to the input size
            raise ReadingRaceError(f"gradcam: heat {tuple(heat.shape)} is not at the input size {tuple(x.shape)}")
        return heat[:, 0].detach().float(), used.clone()


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise ReadingRaceError("gradcam: images must be a float torch.Tensor (N, 1, H, W) in [0, 1], got "
                               f"{type(images).__name__} {getattr(images, 'dtype', '')}")
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ReadingRaceError(f"gradcam: images must have shape (N, 1, H, W), got {tuple(images.shape)}")
    if len(images) == 0:
        raise ReadingRaceError("gradcam: no images given")
    return images


def _check_target(target: int | torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
    if target is None:
        return None
    t = torch.as_tensor(target)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ConfigError(f"gradcam: target_class must be an integer class index or a tensor of them, got {target!r}")
    t = t.reshape(-1).to(device=device, dtype=torch.long)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ConfigError(f"gradcam: target_class has {t.numel()} entries for {n} images")
    if (t < 0).any():
        raise ConfigError(f"gradcam: target_class must be >= 0, got {t.tolist()}")
    return t


def gradcam(
    model: nn.Module,
    images: torch.Tensor,
    *,
    target_class: int | torch.Tensor | None = None,
    layer: str | None = None,
    index: np.ndarray | torch.Tensor | None = None,
) -> torch.Tensor:
    """Grad-CAM heat (N, H, W) in [0, 1] per image, at the input size, for (N, 1, H, W) images in [0, 1].

    ``model`` is an :class:`~readingrace.train.ImageClassifier` (it normalises internally) or any
    classifier taking the images as they are. ``target_class``: one class index for all images, a
    tensor of one index per image, or None for each image's predicted class. ``layer`` names the
    target module (inside ``model.net`` or with the ``net.`` prefix); None uses the family default
    (:data:`DEFAULT_LAYERS`). A model trained on perturbed images (``prepare_input``) is explained on
    the images as it sees them; ``index`` (cache indices) seeds a per-image perturbation. The model
    itself is left unchanged (a private eval-mode copy is hooked).
    """
    heat, _ = GradCAMExplainer(model, layer)(images, target_class, index)
    return heat


def _box_table(boxes: torch.Tensor, targets: np.ndarray, index: np.ndarray, h: int, w: int,
               classes: Sequence[str]) -> pd.DataFrame:
    b = boxes.cpu().numpy()
    area = (b[:, 1] - b[:, 0]) * (b[:, 3] - b[:, 2])
    return pd.DataFrame({
        "cache_index": index, "explained_class": [classes[t] for t in targets],
        "y0": b[:, 0], "y1": b[:, 1], "x0": b[:, 2], "x1": b[:, 3],
        "box_fraction": area / float(h * w),
    })


def occlusion_test(
    model: nn.Module,
    images: np.ndarray,
    index: np.ndarray,
    labels: Sequence[str],
    classes: Sequence[str],
    *,
    threshold: float = PAPER_HOT_THRESHOLD,
    fill: float = 0.0,
    batch_size: int = 32,
    layer: str | None = None,
    ids: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """C3 hot-box occlusion: predictions of ``model`` on images whose Grad-CAM hot box is set to ``fill``.

    ``images`` is the (N, S, S) cache (array or memmap) in [0, 1] at the model's input size;
    ``index`` selects the test images; ``labels`` are their true class names. ``ids`` (rows aligned
    with ``index``) supplies ``image_id``, ``patient_id`` and ``study_id`` for the predictions
    table; without it the cache index is used as image and patient id. Returns a dict with
    ``predictions`` (the predictions-table form: ids, ``label``, ``prob_<class>``), ``boxes`` (one row
    per image: the explained (predicted) class, the box ``y0, y1, x0, x1`` and ``box_fraction`` of
    the image area; an empty box means a constant heatmap, nothing occluded) and the settings.
    Compare with the originals via :func:`readingrace.stats.metrics.compare_predictions`.
    """
    from readingrace.predict import predict_proba

    index = np.asarray(index)
    labels = [str(v) for v in labels]
    classes = [str(c) for c in classes]
    if len(labels) != len(index):
        raise ReadingRaceError(f"occlusion_test: {len(labels)} labels for {len(index)} indexed images")
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ReadingRaceError(f"occlusion_test: labels {unknown[:5]} are not among the classes {classes}")
    if ids is not None and len(ids) != len(index):
        raise ReadingRaceError(f"occlusion_test: ids has {len(ids)} rows for {len(index)} indexed images")
    if batch_size < 1:
        raise ConfigError(f"occlusion_test: batch_size must be >= 1, got {batch_size}")
    if images.ndim != 3:
        raise ReadingRaceError(f"occlusion_test: images must be an (N, H, W) array, got shape {images.shape}")
    h, w = int(images.shape[1]), int(images.shape[2])
    explain = GradCAMExplainer(model, layer)
    boxes, targets = [], []
    for start in range(0, len(index), batch_size):
        idx = index[start:start + batch_size]
        x = torch.from_numpy(np.asarray(images[idx], dtype=np.float32)).unsqueeze(1)
        heat, used = explain(x, None, idx)
        if used.max() >= len(classes):
            raise ReadingRaceError(f"occlusion_test: the model predicts class {int(used.max())} but only "
                                   f"{len(classes)} classes were given ({classes})")
        boxes.append(hot_box(heat.cpu(), threshold=threshold, image_size=(h, w)))  # heat is at (h, w)
        targets.append(used.cpu().numpy())
    del explain
    box_t = torch.cat(boxes) if boxes else torch.zeros((0, 4), dtype=torch.int64)
    where = {int(i): k for k, i in enumerate(index)}

    def occlude(batch: torch.Tensor, batch_idx: np.ndarray) -> torch.Tensor:
        rows = torch.as_tensor([where[int(i)] for i in batch_idx], dtype=torch.long)
        return occlude_boxes(batch, box_t[rows].to(batch.device), fill=fill)

    # predict_proba applies the model's own perturbation, then the occlusion: the box was found on
    # the same prepared input by the explainer
    probs = predict_proba(model, images, index, batch_size=batch_size, transform=occlude)
    if ids is not None:
        table = pd.DataFrame({c: ids[c].to_numpy() for c in ("image_id", "patient_id", "study_id") if c in ids})
    else:
        table = pd.DataFrame({"image_id": [str(i) for i in index], "patient_id": [str(i) for i in index]})
    table["label"] = labels
    for j, c in enumerate(classes):
        table[f"prob_{c}"] = probs[:, j]
    box_table = _box_table(box_t, np.concatenate(targets) if targets else np.zeros(0, int), index, h, w, classes)
    return {
        "predictions": table, "boxes": box_table, "threshold": float(threshold), "fill": float(fill),
        "image_size": [h, w], "n_empty_boxes": int((box_table["box_fraction"] == 0).sum()),
        "mean_box_fraction": float(box_table["box_fraction"].mean()) if len(box_table) else float("nan"),
        "rule": (f"Grad-CAM of the predicted class at {h}x{w}; bounding rectangle of min-max normalised heat >= "
                 f"{threshold:g} set to {fill:g} in [0, 1] space; predicted by the same model"),
    }

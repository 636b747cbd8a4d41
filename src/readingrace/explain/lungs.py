"""Lung masks for the lung-only / non-lung experiment (C3): a small trainable 2-D U-Net.

The network is MONAI's :class:`~monai.networks.nets.UNet` (1 channel in, 1 logit out), trained
with Dice + binary cross-entropy (:class:`~monai.losses.DiceCELoss`) on image / mask file pairs.
Weights are never shipped: :func:`train_lung_unet` trains at run time (a few minutes on CPU at
128 px) and can save them; :func:`load_lung_unet` reads a user's file back.

Conventions: images are float (N, H, W) in [0, 1]; masks are bool (N, H, W), True inside the
lungs. Each image is standardised to zero mean and unit variance inside the network, which makes
the model less sensitive to a source's exposure and contrast (e.g. child to adult CXRs).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

from readingrace.config import LungsConfig
from readingrace.errors import CohortError, ConfigError, ImageReadError
from readingrace.imaging.io import load_image, resize

__all__ = [
    "LungMaskSet", "LungUNet", "cached_lung_unet", "clean_masks", "dice_scores", "files_digest", "load_lung_unet",
    "lung_only", "mask_quality", "mask_regions", "masks_for_test_images", "non_lung", "predict_lung_masks",
    "read_mask", "read_masks_csv", "read_pairs", "read_pairs_csv", "save_lung_unet", "train_lung_unet",
]

DEFAULT_CHANNELS: tuple[int, ...] = (16, 32, 64, 128)
DEFAULT_STRIDES: tuple[int, ...] = (2, 2, 2)


class LungUNet(nn.Module):
    """MONAI 2-D U-Net returning one lung logit per pixel, for images at ``size`` x ``size``."""

    def __init__(self, *, size: int = 128, channels: Sequence[int] = DEFAULT_CHANNELS,
                 strides: Sequence[int] = DEFAULT_STRIDES, num_res_units: int = 0):
        super().__init__()
        from monai.networks.nets import UNet

        factor = math.prod(strides)
        if size < factor or size % factor:
            raise ConfigError(f"lung U-Net: size {size} must be a positive multiple of {factor} "
                              "(the product of strides)")
        self.config = {"size": int(size), "channels": [int(c) for c in channels],
                       "strides": [int(s) for s in strides], "num_res_units": int(num_res_units)}
        self.size = int(size)
        self.unet = UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(channels),
                         strides=tuple(strides), num_res_units=num_res_units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1, H, W) for images (N, 1, H, W) in [0, 1] (standardised per image here)."""
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-3)
        return self.unet((x - mean) / std)


# -- reading pairs ------------------------------------------------------------------------------
def read_pairs_csv(path: str | Path) -> pd.DataFrame:
    """A pairs file as ``DataFrame(image_path, mask_path)`` with paths resolved against its folder.

    Accepts columns ``image_path, mask_path`` or ``image, mask`` (the pediatric set's ``pairs.csv``).
    """
    p = Path(path)
    if not p.is_file():
        raise CohortError(f"lung pairs file not found: {p}")
    df = pd.read_csv(p)
    for img_col, mask_col in (("image_path", "mask_path"), ("image", "mask")):
        if img_col in df.columns and mask_col in df.columns:
            break
    else:
        raise CohortError(f"{p}: needs columns image_path, mask_path (or image, mask); found {list(df.columns)[:10]}")
    out = pd.DataFrame({"image_path": df[img_col].astype(str), "mask_path": df[mask_col].astype(str)})
    for col in out.columns:
        out[col] = [str(x if Path(x).is_absolute() else p.parent / x) for x in out[col]]
    return out


def read_mask(path: str | Path, *, size: int | None = None) -> np.ndarray:
    """A binary mask file as bool (H, W): True where the value is above half the format's range.

    8-bit masks (0/255) threshold at 127; a colour mask uses its brightest channel. With ``size`` the
    mask is resized (bilinear on 0/1, then >= 0.5).
    """
    p = Path(path)
    try:
        with Image.open(p) as im:
            arr = np.asarray(im)
    except FileNotFoundError:
        raise ImageReadError(p, "mask file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageReadError(p, f"not a readable mask image ({exc})") from None
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.dtype == bool:
        mask = arr
    elif np.issubdtype(arr.dtype, np.integer):
        mask = arr > (np.iinfo(arr.dtype).max // 2)
    else:
        mask = arr > 0.5
    if size is not None and mask.shape != (size, size):
        mask = resize(mask.astype(np.float32), size) >= 0.5
    return mask


def read_pairs(pairs: pd.DataFrame, *, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, size, size) float32 in [0, 1] and masks (N, size, size) bool from a pairs table."""
    for col in ("image_path", "mask_path"):
        if col not in pairs.columns:
            raise CohortError(f"lung pairs table: missing column {col!r} (found {list(pairs.columns)[:10]})")
    if len(pairs) == 0:
        raise CohortError("lung pairs table: no rows")
    images = np.empty((len(pairs), size, size), dtype=np.float32)
    masks = np.empty((len(pairs), size, size), dtype=bool)
    for i, (img_path, mask_path) in enumerate(zip(pairs["image_path"], pairs["mask_path"], strict=True)):
        img = load_image(img_path)
        mask = read_mask(mask_path)
        if img.shape != mask.shape:
            raise CohortError(f"lung pairs row {i}: image {img_path} is {img.shape} but its mask {mask_path} is "
                              f"{mask.shape}; image and mask must have the same size")
        images[i] = resize(img, size)
        masks[i] = mask if mask.shape == (size, size) else resize(mask.astype(np.float32), size) >= 0.5
    return images, masks


# -- metrics ------------------------------------------------------------------------------------
def dice_scores(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image Dice (N,) of bool masks (MONAI ``compute_dice``); two empty masks count as 1."""
    from monai.metrics import compute_dice

    p = torch.as_tensor(np.asarray(pred, dtype=bool)).unsqueeze(1).float()
    t = torch.as_tensor(np.asarray(truth, dtype=bool)).unsqueeze(1).float()
    if p.shape != t.shape:
        raise ConfigError(f"dice_scores: prediction {tuple(p.shape)} and truth {tuple(t.shape)} differ in shape")
    return compute_dice(p, t, include_background=True, ignore_empty=False).numpy()[:, 0]


# -- training -----------------------------------------------------------------------------------
def _augment(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, *, rotate: float = 10.0, zoom: float = 0.1,
             shift: float = 0.05, gamma: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random affine (rotation, zoom, shift) for image and mask, and a random gamma on the image."""
    n = x.shape[0]
    u = torch.rand(n, 6, generator=g)
    angle = (u[:, 0] * 2 - 1) * math.radians(rotate)
    scale = 1 + (u[:, 1] * 2 - 1) * zoom
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos, -sin, (u[:, 2] * 2 - 1) * shift * 2
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin, cos, (u[:, 3] * 2 - 1) * shift * 2
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    y = (F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False) >= 0.5).float()
    g_exp = torch.exp((u[:, 4] * 2 - 1) * gamma).view(n, 1, 1, 1)
    return x.clamp(0, 1) ** g_exp, y


def train_lung_unet(
    pairs: pd.DataFrame,
    *,
    size: int = 128,
    epochs: int = 20,
    seed: int = 2021,
    val_fraction: float = 0.2,
    out_dir: str | Path | None = None,
    batch_size: int = 16,
    lr: float = 2e-3,
    channels: Sequence[int] = DEFAULT_CHANNELS,
    strides: Sequence[int] = DEFAULT_STRIDES,
    num_res_units: int = 0,
    augment: bool = True,
    data: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[LungUNet, dict[str, Any]]:
    """Train the lung U-Net on image/mask pairs; report Dice on a held-out ``val_fraction`` of the pairs.

    ``pairs`` is ``DataFrame(image_path, mask_path)`` (see :func:`read_pairs_csv`); ``data`` may
    give already-loaded ``(images, masks)`` at ``size`` instead (then ``pairs`` may be None). The
    held-out pairs are drawn at random with ``seed`` and never used for training or model
    selection (a fixed number of epochs, Adam with cosine decay). The pairs carry no patient ids:
    images of one patient may fall on both sides, which can make the held-out Dice optimistic.
    With ``out_dir``, writes ``lung_unet.pt`` (weights, never to be committed) and
    ``lung_unet_report.json``. Returns ``(model in eval mode, report)``.
    """
    from monai.losses import DiceCELoss

    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"lung U-Net: val_fraction must be in (0, 1), got {val_fraction}")
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"lung U-Net: epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    t0 = time.perf_counter()
    images, masks = data if data is not None else read_pairs(pairs, size=size)
    if images.shape[1:] != (size, size) or masks.shape != images.shape:
        raise ConfigError(f"lung U-Net: data must be images and masks of shape (N, {size}, {size}), got "
                          f"{images.shape} and {masks.shape}")
    n = len(images)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_val = max(1, round(val_fraction * n))
    if n - n_val < 1:
        raise ConfigError(f"lung U-Net: {n} pairs are too few for a held-out fraction of {val_fraction}")
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    load_s = time.perf_counter() - t0

    torch.manual_seed(seed)
    model = LungUNet(size=size, channels=channels, strides=strides, num_res_units=num_res_units)
    loss_fn = DiceCELoss(sigmoid=True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = -(-len(train_idx) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    x_all = torch.from_numpy(images).unsqueeze(1)
    y_all = torch.from_numpy(masks).unsqueeze(1).float()
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    for _ in range(epochs):
        perm = torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=g)]
        total = 0.0
        for start in range(0, len(perm), batch_size):
            idx = perm[start:start + batch_size]
            x, y = x_all[idx], y_all[idx]
            if augment:
                x, y = _augment(x, y, g)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        losses.append(round(total / len(perm), 4))
    model.eval()
    raw = predict_lung_masks(model, images[val_idx], clean=False)
    pred = clean_masks(raw)
    dice = dice_scores(pred, masks[val_idx])
    report: dict[str, Any] = {
        "n_pairs": n, "n_train": len(train_idx), "n_heldout": len(val_idx), "size": size,
        "epochs": epochs, "seed": seed, "batch_size": batch_size, "lr": lr, "augment": augment,
        "network": model.config, "loss": "DiceCELoss(sigmoid=True)", "train_loss": losses,
        "heldout_dice_mean": float(np.mean(dice)), "heldout_dice_median": float(np.median(dice)),
        "heldout_dice_p10": float(np.percentile(dice, 10)), "heldout_dice_min": float(np.min(dice)),
        "heldout_dice_mean_unclean": float(np.mean(dice_scores(raw, masks[val_idx]))),
        "heldout_lung_fraction_true": float(masks[val_idx].mean()),
        "heldout_lung_fraction_pred": float(pred.mean()),
        "seconds_load": round(load_s, 1), "seconds": round(time.perf_counter() - t0, 1),
        "note": "held-out pairs drawn at random without patient ids (a patient may be on both sides)",
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_lung_unet(model, out / "lung_unet.pt")
        (out / "lung_unet_report.json").write_text(json.dumps(report, indent=2))
        report["weights"] = str(out / "lung_unet.pt")
    return model, report


def save_lung_unet(model: LungUNet, path: str | Path) -> Path:
    """Save weights and the network settings (a plain state dict; load with :func:`load_lung_unet`)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": model.config, "state_dict": model.state_dict()}, p)
    return p


def load_lung_unet(path: str | Path) -> LungUNet:
    """A lung U-Net saved by :func:`save_lung_unet` (weights only, no pickled code), in eval mode."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"lung U-Net weights not found: {p}; train one with train_lung_unet(..., out_dir=...)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
        model = LungUNet(**state["config"])
        model.load_state_dict(state["state_dict"])
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise ConfigError(f"{p} is not a lung U-Net file written by save_lung_unet: {exc}") from None
    return model.eval()


# -- inference and masking ----------------------------------------------------------------------
def clean_masks(masks: np.ndarray, *, keep: int = 2, min_relative_area: float = 0.1) -> np.ndarray:
    """Per mask: keep the ``keep`` largest connected regions (each at least ``min_relative_area`` of
    the largest) and fill their holes (scipy.ndimage). Removes stray blobs (arm soft tissue, bowel
    gas, markers) that a lung segmentation produces on unfamiliar images."""
    from scipy import ndimage

    masks = np.asarray(masks, dtype=bool)
    out = np.zeros_like(masks)
    for i, m in enumerate(masks):
        labels, n = ndimage.label(m)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        order = np.argsort(sizes)[::-1][:keep]
        chosen = [k + 1 for k in order if sizes[k] >= min_relative_area * sizes[order[0]]]
        out[i] = ndimage.binary_fill_holes(np.isin(labels, chosen))
    return out


@torch.no_grad()
def predict_lung_masks(model: LungUNet, images: np.ndarray | torch.Tensor, *, threshold: float = 0.5,
                       batch_size: int = 32, clean: bool = True) -> np.ndarray:
    """Bool lung masks (N, H, W) for (N, H, W) images in [0, 1] of any size.

    Each image is resized (anti-aliased) to the network's size, and the lung probability resized
    back (bilinear) to the image's size before thresholding at ``threshold``. ``clean`` applies
    :func:`clean_masks` (two largest regions, holes filled).
    """
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"predict_lung_masks: threshold must be in (0, 1), got {threshold}")
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim != 3:
        raise ConfigError(f"predict_lung_masks: images must have shape (N, H, W), got {arr.shape}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    h, w = arr.shape[1:]
    out = np.empty(arr.shape, dtype=bool)
    for start in range(0, len(arr), batch_size):
        x = torch.from_numpy(np.asarray(arr[start:start + batch_size], dtype=np.float32)).unsqueeze(1).to(device)
        if (h, w) != (model.size, model.size):
            x = F.interpolate(x, size=(model.size, model.size), mode="bilinear", align_corners=False, antialias=True)
        prob = torch.sigmoid(model(x).float())
        if (h, w) != (model.size, model.size):
            prob = F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)
        out[start:start + len(x)] = (prob[:, 0] >= threshold).cpu().numpy()
    model.train(was_training)
    return clean_masks(out) if clean else out


def _check_pair(images: Any, masks: Any, where: str) -> None:
    if tuple(images.shape) != tuple(masks.shape):
        raise ConfigError(f"{where}: images {tuple(images.shape)} and masks {tuple(masks.shape)} "
                          "must have the same shape")


def lung_only(images: np.ndarray | torch.Tensor, masks: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Images with everything outside the lungs set to 0 (same type and shape as ``images``)."""
    _check_pair(images, masks, "lung_only")
    if isinstance(images, torch.Tensor):
        m = torch.as_tensor(masks, device=images.device).bool()
        return torch.where(m, images, torch.zeros_like(images))
    return np.where(np.asarray(masks, dtype=bool), images, 0).astype(np.asarray(images).dtype, copy=False)


def non_lung(images: np.ndarray | torch.Tensor, masks: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Images with the lungs set to 0 (same type and shape as ``images``)."""
    _check_pair(images, masks, "non_lung")
    if isinstance(images, torch.Tensor):
        m = torch.as_tensor(masks, device=images.device).bool()
        return torch.where(m, torch.zeros_like(images), images)
    return np.where(np.asarray(masks, dtype=bool), 0, images).astype(np.asarray(images).dtype, copy=False)


# -- masks for a run's test images (run_experiment, evaluate.lungs) ------------------------------
#: Bump when the U-Net training recipe or the cached files change: old cache entries get new keys.
LUNG_CACHE_VERSION = 1
#: Fewest usable user masks to train a U-Net on when no ``unet_pairs`` are given.
MIN_TRAINING_PAIRS = 10
#: A mask's aspect ratio may differ from its image's by this relative amount and still be resized onto it.
ASPECT_TOLERANCE = 0.01


@dataclass
class LungMaskSet:
    """Lung masks of a run's test images, aligned with the test rows.

    ``masks`` (N, S, S) bool at the model's input size (all False where an image has no mask);
    ``table``: one row per test image (``cache_index``, ``mask_source`` ``user`` / ``unet`` / empty,
    ``lung_fraction``, ``n_regions``, ``excluded``: empty or the reason); ``included`` (N,) bool;
    ``unet``: how the U-Net was made (its held-out Dice when trained here) or None when unused.
    """

    masks: np.ndarray
    table: pd.DataFrame
    included: np.ndarray
    unet: dict[str, Any] | None
    source: str
    quality_rule: str
    n_masks_not_in_cohort: int = 0

    def excluded_counts(self) -> dict[str, int]:
        """Excluded test images per reason category (the part of the reason before ':')."""
        reasons = self.table.loc[~self.included, "excluded"].astype(str).str.split(":").str[0]
        return {str(k): int(v) for k, v in reasons.value_counts().sort_index().items()}


def read_masks_csv(path: str | Path) -> pd.DataFrame:
    """A user's mask list as ``DataFrame(image_id, mask_path)``, paths resolved against the CSV's folder.

    Needs columns ``image_id`` (the cohort's image id, as in the run's ``cohort.csv``) and
    ``mask_path`` (or ``mask``). An image listed twice is an error.
    """
    p = Path(path)
    if not p.is_file():
        raise CohortError(f"lung masks file not found: {p} (evaluate.lungs.masks_csv)")
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise CohortError(f"{p}: cannot parse as CSV: {exc}") from None
    mask_col = "mask_path" if "mask_path" in df.columns else "mask"
    if "image_id" not in df.columns or mask_col not in df.columns:
        raise CohortError(f"{p}: needs columns image_id, mask_path; found {list(df.columns)[:10]}")
    if len(df) == 0:
        raise CohortError(f"{p}: no rows; list one mask file per image (image_id, mask_path)")
    blank = (df["image_id"].str.strip() == "") | (df[mask_col].str.strip() == "")
    if blank.any():
        raise CohortError(f"{p} line {int(np.flatnonzero(blank.to_numpy())[0]) + 2}: empty image_id or mask_path "
                          f"({int(blank.sum())} rows); fill or remove them")
    repeat = df["image_id"].duplicated()
    if repeat.any():
        first = df.loc[repeat, "image_id"].iloc[0]
        raise CohortError(f"{p}: image_id {first!r} is listed {int((df['image_id'] == first).sum())} times; "
                          "give one mask per image")
    return pd.DataFrame({"image_id": df["image_id"].str.strip(),
                         "mask_path": [str(x if Path(x).is_absolute() else p.parent / x) for x in df[mask_col]]})


def mask_regions(mask: np.ndarray, *, min_relative_area: float = 0.1) -> list[tuple[int, float, int, int]]:
    """Connected regions of a bool mask as ``(area, centroid column, first row, last row + 1)``, largest
    first; regions under ``min_relative_area`` of the largest are left out (specks, as in :func:`clean_masks`)."""
    from scipy import ndimage

    labels, n = ndimage.label(np.asarray(mask, dtype=bool))
    if n == 0:
        return []
    areas = np.bincount(labels.ravel())[1:]
    cols = ndimage.center_of_mass(np.ones_like(labels), labels, range(1, n + 1))
    spans = ndimage.find_objects(labels)
    regions = sorted(((int(a), float(c[1]), int(sl[0].start), int(sl[0].stop))
                      for a, c, sl in zip(areas, cols, spans, strict=True)), reverse=True)
    return [r for r in regions if r[0] >= min_relative_area * regions[0][0]]


#: Two lung regions must share at least this fraction of the shorter one's rows (side by side, not stacked).
MIN_ROW_OVERLAP = 0.5


def mask_quality(masks: np.ndarray, *, min_fraction: float = 0.1, max_fraction: float = 0.5,
                 two_lungs: bool = True) -> pd.DataFrame:
    """Per mask: ``lung_fraction``, ``n_regions`` and ``excluded`` (empty when the mask is plausible).

    Implausible: a lung fraction outside [min_fraction, max_fraction] (an empty mask has 0) or, with
    ``two_lungs``, not two regions (each >= 10% of the larger) with one on each side of the vertical
    midline (by their centroids) whose row ranges overlap by at least half of the shorter one's
    height (which catches a lung paired with a blob on the arm or in the abdomen).
    """
    masks = np.asarray(masks, dtype=bool)
    rows = []
    for m in masks:
        frac = float(m.mean())
        regions = mask_regions(m)
        reason = ""
        if frac < min_fraction:
            reason = f"lung fraction below {min_fraction:g}: {frac:.3f}"
        elif frac > max_fraction:
            reason = f"lung fraction above {max_fraction:g}: {frac:.3f}"
        elif two_lungs:
            mid = (m.shape[1] - 1) / 2
            if len(regions) != 2:
                reason = f"not two lung regions: {len(regions)}"
            elif (regions[0][1] - mid) * (regions[1][1] - mid) >= 0:
                reason = "both lung regions on one side of the midline: centroids at columns " \
                         f"{regions[0][1]:.0f}, {regions[1][1]:.0f}"
            else:
                (_, _, top_a, end_a), (_, _, top_b, end_b) = regions
                overlap = (min(end_a, end_b) - max(top_a, top_b)) / min(end_a - top_a, end_b - top_b)
                if overlap < MIN_ROW_OVERLAP:
                    reason = f"lung regions not side by side: rows overlap {max(overlap, 0):.2f} of the shorter one"
        rows.append({"lung_fraction": frac, "n_regions": len(regions), "excluded": reason})
    return pd.DataFrame(rows, columns=["lung_fraction", "n_regions", "excluded"])


def quality_rule_text(*, min_fraction: float, max_fraction: float, two_lungs: bool) -> str:
    rule = f"lung fraction in [{min_fraction:g}, {max_fraction:g}]"
    if two_lungs:
        rule += (" and two regions (each >= 10% of the larger), one on each side of the vertical midline, whose rows "
                 f"overlap by >= {MIN_ROW_OVERLAP:g} of the shorter one")
    return rule + " (an automatic rule in place of the paper's manual check of each segmentation)"


def files_digest(paths: Sequence[str | Path]) -> str:
    """SHA-256 over the bytes of the files in order (missing files count as their name only)."""
    h = hashlib.sha256()
    for path in paths:
        p = Path(path)
        h.update(p.name.encode() + b"\0")
        if p.is_file():
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        h.update(b"\1")
    return h.hexdigest()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached_lung_unet(
    load_data: Callable[[], tuple[np.ndarray, np.ndarray]],
    *,
    content: str,
    cache_dir: str | Path,
    size: int,
    epochs: int,
    seed: int,
    batch_size: int = 8,
    channels: Sequence[int] = DEFAULT_CHANNELS,
    say: Callable[[str], None] = print,
) -> tuple[LungUNet, dict[str, Any]]:
    """A U-Net trained on ``load_data()`` once per training-data content and settings, then reused.

    ``content`` is a digest of the training pairs (e.g. :func:`files_digest`); with the settings it
    forms the key of ``cache_dir/<key>/`` (``lung_unet.pt`` and ``lung_unet_report.json``), written
    through a temporary folder and one rename, so concurrent runs never read half a model.
    """
    strides = [2] * (len(channels) - 1)
    settings = {"version": LUNG_CACHE_VERSION, "size": size, "epochs": epochs, "seed": seed,
                "batch_size": batch_size, "channels": list(channels), "strides": strides}
    key = _digest({"content": content, **settings})
    final = Path(cache_dir) / key
    if (final / "lung_unet.pt").is_file() and (final / "lung_unet_report.json").is_file():
        report = json.loads((final / "lung_unet_report.json").read_text())
        say(f"lung U-Net: reusing the cached model {key}")
        return load_lung_unet(final / "lung_unet.pt"), {**report, "key": key, "cached": True}
    images, masks = load_data()
    say(f"lung U-Net: training on {len(images)} image/mask pairs ({size} px, {epochs} epochs)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{key}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # honours the umask (mkdtemp would make it 0700): the cache may be shared
    try:
        model, report = train_lung_unet(None, data=(images, masks), size=size, epochs=epochs, seed=seed,
                                        batch_size=batch_size, channels=channels, strides=strides,
                                        out_dir=tmp)
        report.pop("weights", None)
        (tmp / "lung_unet_report.json").write_text(json.dumps(report, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:  # another run stored the same model first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model, {**report, "key": key, "cached": False}


def _user_masks(table: pd.DataFrame, rows: pd.DataFrame, *, size: int, mode: str
                ) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """The user's masks of ``rows`` (cohort rows with ``image_id``, ``path``) at ``size`` with the
    image cache's resize ``mode``, keyed by row position; failures as reasons by row position."""
    from readingrace.imaging.io import image_shape

    where = dict(zip(table["image_id"], table["mask_path"], strict=True))
    masks: dict[int, np.ndarray] = {}
    reasons: dict[int, str] = {}
    for k, (image_id, path) in enumerate(zip(rows["image_id"].astype(str), rows["path"], strict=True)):
        mask_path = where.get(image_id)
        if mask_path is None:
            continue
        try:
            m = read_mask(mask_path)
        except ImageReadError as exc:
            reasons[k] = ("mask file missing" if "not found" in exc.reason else "mask unreadable") + \
                f": {Path(mask_path).name}"
            continue
        try:
            ih, iw = image_shape(path)
        except ImageReadError:
            ih, iw = load_image(path).shape
        mh, mw = m.shape
        if abs((mh / mw) / (ih / iw) - 1) > ASPECT_TOLERANCE:
            reasons[k] = f"mask size differs from the image: mask {mw}x{mh}, image {iw}x{ih}"
            continue
        masks[k] = resize(m.astype(np.float32), size, mode=mode) >= 0.5
    return masks, reasons


def masks_for_test_images(
    settings: LungsConfig,
    *,
    cohort: pd.DataFrame,
    test_positions: np.ndarray,
    images: np.ndarray,
    image_mode: str = "stretch",
    images_key: str = "",
    cache_dir: str | Path,
    say: Callable[[str], None] = print,
) -> LungMaskSet:
    """Lung masks for the test images of a run, with the quality rule applied (evaluate.lungs).

    ``cohort``: all rows of the run's cohort (``image_id``, ``path``, ``cache_index``);
    ``test_positions``: the test rows' positions in it; ``images``: the image cache (N, S, S) at the
    model's input size, made with resize ``image_mode``; ``images_key`` names that cache (part of
    the U-Net's key when it is trained on user masks). A user mask (``masks_csv``) is used as given
    (resized with the cache's mode); test images without one get a U-Net mask (``missing: unet``)
    or are excluded. The U-Net is loaded (``unet_weights``) or trained on ``unet_pairs`` plus the
    usable user masks of the whole cohort, cached under ``cache_dir``; predicted masks are cleaned
    (:func:`clean_masks`). Masks failing the quality rule are kept in the table and excluded.
    """
    if not settings.enabled:
        raise ConfigError("evaluate.lungs: name a mask source (masks_csv, unet_pairs or unet_weights)")
    size = int(images.shape[1])
    test_positions = np.asarray(test_positions)
    rows = cohort.iloc[test_positions].reset_index(drop=True)
    n = len(rows)
    masks = np.zeros((n, size, size), dtype=bool)
    source = np.full(n, "", dtype=object)
    reasons: dict[int, str] = {}
    rule = {"min_fraction": settings.min_lung_fraction, "max_fraction": settings.max_lung_fraction,
            "two_lungs": settings.two_lungs}
    user_table, n_not_in_cohort = None, 0
    parts: list[str] = []
    if settings.masks_csv:
        user_table = read_masks_csv(settings.masks_csv)
        known = user_table["image_id"].isin(set(cohort["image_id"].astype(str)))
        n_not_in_cohort = int((~known).sum())
        if not known.any():
            raise CohortError(f"{settings.masks_csv}: none of its {len(user_table)} image_id values is in the cohort "
                              f"(e.g. {user_table['image_id'].head(3).tolist()}); use the image_id column of the "
                              "run's cohort.csv")
        user, reasons = _user_masks(user_table, rows, size=size, mode=image_mode)
        for k, m in user.items():
            masks[k], source[k] = m, "user"
        parts.append(f"user masks ({Path(settings.masks_csv).name}) for {len(user)} test images")
        if n_not_in_cohort:
            say(f"lung masks: {n_not_in_cohort} image_id(s) of {settings.masks_csv} are not in the cohort (ignored)")
    need = [k for k in range(n) if source[k] == "" and k not in reasons]
    unet_info: dict[str, Any] | None = None
    if need and user_table is not None and settings.missing == "exclude":
        for k in need:
            reasons[k] = "no mask: not in masks_csv (missing: exclude)"
        need = []
    if need:
        model, unet_info = _lung_unet_for_run(settings, cohort=cohort, images=images, image_mode=image_mode,
                                              images_key=images_key, user_table=user_table, n_missing=len(need),
                                              cache_dir=Path(cache_dir), say=say)
        index = rows["cache_index"].to_numpy()[need]
        mask_key = _digest({"unet": unet_info.get("key") or unet_info.get("sha256"), "images": images_key,
                            "index": index.tolist(), "size": size, "version": LUNG_CACHE_VERSION})
        mask_file = Path(cache_dir) / "masks" / f"{mask_key}.npy"
        predicted = np.load(mask_file) if images_key and mask_file.is_file() else None
        if predicted is None or predicted.shape != (len(need), size, size):
            predicted = predict_lung_masks(model, np.asarray(images[index], dtype=np.float32))
            if images_key:
                mask_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = mask_file.with_name(f".{mask_file.name}.{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    np.save(f, predicted)
                os.replace(tmp, mask_file)
        masks[need], source[need] = predicted, "unet"
        parts.append(f"U-Net masks for {len(need)} test images ({unet_info['origin']})")
    quality = mask_quality(masks, **rule)
    excluded = quality["excluded"].to_numpy(dtype=object)
    for k, reason in reasons.items():
        excluded[k] = reason
    table = pd.DataFrame({"cache_index": rows["cache_index"].to_numpy(), "mask_source": source,
                          "lung_fraction": quality["lung_fraction"].round(4),
                          "n_regions": quality["n_regions"], "excluded": excluded})
    included = table["excluded"].to_numpy(dtype=object) == ""
    return LungMaskSet(masks=masks, table=table, included=included, unet=unet_info,
                         source="; ".join(parts) or "none", quality_rule=quality_rule_text(**rule),
                         n_masks_not_in_cohort=n_not_in_cohort)


def _lung_unet_for_run(settings: LungsConfig, *, cohort: pd.DataFrame, images: np.ndarray, image_mode: str,
                       images_key: str, user_table: pd.DataFrame | None, n_missing: int, cache_dir: Path,
                       say: Callable[[str], None]) -> tuple[LungUNet, dict[str, Any]]:
    """The U-Net for test images without a user mask: a saved one, or one trained (and cached) here."""
    if settings.unet_weights:
        model = load_lung_unet(settings.unet_weights)
        return model, {"origin": f"saved weights {Path(settings.unet_weights).name}",
                       "sha256": files_digest([settings.unet_weights])[:20], "size": model.size}
    size = settings.unet_size or _default_unet_size(int(images.shape[1]), len(settings.unet_channels))
    content: list[str] = []
    loaders: list[Callable[[], tuple[np.ndarray, np.ndarray]]] = []
    origin: list[str] = []
    if settings.unet_pairs:
        pairs = read_pairs_csv(settings.unet_pairs)
        content.append(files_digest([*pairs["image_path"], *pairs["mask_path"]]))
        loaders.append(lambda: read_pairs(pairs, size=size))
        origin.append(f"{len(pairs)} pairs of {Path(settings.unet_pairs).name}")
    if user_table is not None:
        ids = set(user_table["image_id"])
        usable = cohort[cohort["image_id"].astype(str).isin(ids)].reset_index(drop=True)
        user, _ = _user_masks(user_table, usable, size=int(images.shape[1]), mode=image_mode)
        keep = [k for k in sorted(user) if mask_quality(user[k][None], min_fraction=settings.min_lung_fraction,
                                                         max_fraction=settings.max_lung_fraction,
                                                         two_lungs=settings.two_lungs)["excluded"].iloc[0] == ""]
        if keep:
            idx = usable["cache_index"].to_numpy()[keep]
            content.append(_digest({"images": images_key, "index": idx.tolist(),
                                    "masks": files_digest(user_table.set_index("image_id").loc[
                                        usable["image_id"].astype(str).to_numpy()[keep], "mask_path"])}))

            def user_pairs(idx=idx, keep=keep) -> tuple[np.ndarray, np.ndarray]:
                imgs = np.stack([resize(np.asarray(images[i], dtype=np.float32), size) for i in idx])
                msk = np.stack([resize(user[k].astype(np.float32), size) >= 0.5 for k in keep])
                return imgs, msk

            loaders.append(user_pairs)
            origin.append(f"{len(keep)} usable user masks of the cohort")
        if not settings.unet_pairs and len(keep) < MIN_TRAINING_PAIRS:
            raise ConfigError(f"evaluate.lungs: {n_missing} test image(s) have no mask in {settings.masks_csv} and only "
                              f"{len(keep)} usable user mask(s) are there to train a U-Net on (need >= "
                              f"{MIN_TRAINING_PAIRS}); add unet_pairs or unet_weights, or set missing: exclude")
    if not loaders:
        raise ConfigError("evaluate.lungs: test images need predicted masks but no U-Net source is given "
                          "(unet_pairs or unet_weights)")

    def load_all() -> tuple[np.ndarray, np.ndarray]:
        parts = [load() for load in loaders]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    model, report = cached_lung_unet(load_all, content="+".join(content), cache_dir=cache_dir / "unet", size=size,
                                     epochs=settings.unet_epochs, seed=settings.unet_seed,
                                     batch_size=settings.unet_batch_size, channels=settings.unet_channels, say=say)
    return model, {**report, "origin": "trained here on " + " and ".join(origin)}


def _default_unet_size(image_size: int, n_channels: int) -> int:
    """The model's input size, at most 128, rounded down to the U-Net's stride product."""
    factor = 2 ** (n_channels - 1)
    return max(factor, min(image_size, 128) // factor * factor)

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

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

from readingrace.errors import CohortError, ConfigError, ImageReadError
from readingrace.imaging.io import load_image, resize

__all__ = [
    "LungUNet", "clean_masks", "dice_scores", "load_lung_unet", "lung_only", "non_lung", "predict_lung_masks",
    "read_mask", "read_pairs", "read_pairs_csv", "save_lung_unet", "train_lung_unet",
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
    n_val = max(1, int(round(val_fraction * n)))
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
        "n_pairs": n, "n_train": int(len(train_idx)), "n_heldout": int(len(val_idx)), "size": size,
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

"""Training on PyTorch Lightning: the paper's recipe with seeded, resumable epochs.

Recipe (SPEC "Training recipe"): random horizontal flip, rotation +-15 degrees, zoom +-10%; Adam;
cross-entropy; learning rate x0.1 after ``lr_patience`` epochs without validation-loss improvement;
early stopping keeping the best checkpoint by validation loss. Checkpoints at every epoch end
(``last.ckpt``) let a repeated command resume from the last completed epoch. The shuffling order
and the augmentation are derived from (seed, epoch) and (seed, step), so a resumed run sees the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from readingrace.config import AugmentConfig, TrainConfig
from readingrace.errors import ConfigError
from readingrace.models import build_model, loading_checkpoint

#: Intensity normalisation applied inside the model, after any perturbation in [0, 1] space
#: (grey-level mean and std of ImageNet, for compatibility with ImageNet-pretrained weights).
INPUT_MEAN, INPUT_STD = 0.449, 0.226


# -- data ---------------------------------------------------------------------------------------
class ArrayImages(Dataset):
    """Images (N, S, S) in [0, 1] (a numpy array or memmap) with integer labels, selected by index."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, index: np.ndarray | None = None):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.index = np.arange(len(self.labels)) if index is None else np.asarray(index)
        if len(self.index) != len(self.labels):
            raise ValueError("labels must align with the selected images")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        img = torch.from_numpy(np.array(self.images[self.index[i]], dtype=np.float32))
        return img.unsqueeze(0), torch.tensor(self.labels[i]), torch.tensor(int(self.index[i]))


class EpochSampler(Sampler[int]):
    """A permutation that depends only on (seed, epoch); Lightning calls ``set_epoch``."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def make_loader(data: ArrayImages, *, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    sampler = EpochSampler(len(data), seed) if shuffle else None
    return DataLoader(data, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=0)


# -- augmentation -------------------------------------------------------------------------------
def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Per-image random flip, rotation (+-cfg.rotate degrees) and zoom (+-cfg.zoom) of (N, 1, H, W)."""
    n = x.shape[0]
    if not (cfg.flip or cfg.rotate or cfg.zoom):
        return x
    u = torch.rand(n, 3, generator=generator)
    angle = (u[:, 0] * 2 - 1) * math.radians(cfg.rotate)
    scale = 1 + (u[:, 1] * 2 - 1) * cfg.zoom          # >1 zooms in
    flip = torch.where(u[:, 2] < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# -- the Lightning module -----------------------------------------------------------------------
class ImageClassifier(L.LightningModule):
    """A network from :mod:`readingrace.models` trained with cross-entropy."""

    def __init__(self, arch: str, n_classes: int, *, lr: float = 1e-3, lr_factor: float = 0.1,
                 lr_patience: int = 2, augment: dict | None = None, seed: int = 2021,
                 weights: str | None = None, perturb: list[dict] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.net = build_model(arch, n_classes, weights=weights)
        self.augment = AugmentConfig(**(augment or {}))
        self.perturb = list(perturb or [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for images in [0, 1] (already perturbed: see :meth:`prepare_input`)."""
        return self.net((x - INPUT_MEAN) / INPUT_STD)

    def prepare_input(self, x: torch.Tensor, index: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """Apply the model's own perturbations (config ``perturb.train``) in [0, 1] space.

        ``index`` holds the images' global (cache) indices, so seeded per-image perturbations
        (noise) do not depend on how images are batched.
        """
        if not self.perturb:
            return x
        from readingrace.imaging.perturb import apply_perturbation

        idx = None if index is None else torch.as_tensor(np.asarray(index.cpu() if torch.is_tensor(index) else index))
        for spec in self.perturb:
            x = apply_perturbation(x, spec, indices=idx)
        return x

    def training_step(self, batch, batch_idx):  # noqa: D102
        x, y, idx = batch
        g = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + self.global_step)
        x = augment_batch(self.prepare_input(x, idx), self.augment, g)
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):  # noqa: D102
        x, y, idx = batch
        logits = self(self.prepare_input(x, idx))
        loss = F.cross_entropy(logits.float(), y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log("val_acc", acc, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)

    def configure_optimizers(self):  # noqa: D102
        return paper_optimizer(self)


def paper_optimizer(module: L.LightningModule) -> dict:
    """Adam at ``hparams.lr``; LR x ``lr_factor`` after ``lr_patience`` epochs without val-loss improvement."""
    opt = torch.optim.Adam(module.parameters(), lr=module.hparams.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=module.hparams.lr_factor, patience=module.hparams.lr_patience)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}


@dataclass
class TrainResult:
    best_checkpoint: str
    best_val_loss: float
    epochs: int
    seconds: float
    resumed_from_epoch: int | None = None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))


def quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*isinstance.*treespec.*")
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")


def train_model(
    *, images: np.ndarray, labels: np.ndarray, train_index: np.ndarray, val_index: np.ndarray,
    n_classes: int, arch: str, cfg: TrainConfig, seed: int, out_dir: Path,
    weights: str | None = None, progress: bool = False, perturb: list[dict] | None = None,
) -> TrainResult:
    """Train one model (one seed) into ``out_dir``; resume from ``out_dir/checkpoints/last.ckpt``."""
    quiet_lightning()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    done = out_dir / "train_result.json"
    if done.exists():
        return TrainResult(**json.loads(done.read_text()))
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    L.seed_everything(seed, workers=True, verbose=False)
    t0 = time.perf_counter()
    train_data = ArrayImages(images, labels[train_index], train_index)
    val_data = ArrayImages(images, labels[val_index], val_index)
    model = ImageClassifier(arch, n_classes, lr=cfg.lr, lr_factor=cfg.lr_factor, lr_patience=cfg.lr_patience,
                            augment=asdict(cfg.augment), seed=seed, weights=weights, perturb=perturb)
    return fit_resumable(model, make_loader(train_data, batch_size=cfg.batch_size, shuffle=True, seed=seed),
                         make_loader(val_data, batch_size=cfg.batch_size, shuffle=False), cfg=cfg,
                         out_dir=out_dir, progress=progress, t0=t0)


def fit_resumable(model: L.LightningModule, train_loader: DataLoader, val_loader: DataLoader, *,
                  cfg: TrainConfig, out_dir: Path, progress: bool = False, t0: float | None = None) -> TrainResult:
    """Fit with the paper's early stopping and checkpoints in ``out_dir``; resume from the last epoch.

    ``checkpoints/best.ckpt`` is the best epoch by validation loss (weights and hyper-parameters only);
    ``checkpoints/last.ckpt`` the last completed epoch with the optimiser and callback states (resumed from
    when present); logs go to ``logs/attempt-<k>/``.
    """
    t0 = time.perf_counter() if t0 is None else t0
    ckpt_dir = out_dir / "checkpoints"
    # best.ckpt is only ever loaded for its weights (prediction, probes): without the optimiser state it is a
    # third of the size (ResNet18: 45 MB instead of 134 MB); last.ckpt keeps everything for resuming
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min", save_top_k=1, save_weights_only=True)
    # Lightning's save_last only copies when a top-k checkpoint is saved (i.e. the best epoch);
    # resuming needs the last completed epoch, so a second, unmonitored checkpoint keeps it.
    last_epoch = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
    early = L.pytorch.callbacks.EarlyStopping(monitor="val_loss", mode="min", patience=cfg.early_stopping_patience)
    # one log folder per attempt, so resuming never overwrites the curves of earlier epochs
    attempt = len(list((out_dir / "logs").glob("attempt-*"))) + 1
    logger = L.pytorch.loggers.CSVLogger(save_dir=str(out_dir / "logs"), name="", version=f"attempt-{attempt}")
    # placement (TrainConfig.accelerator / devices / strategy / num_nodes): with strategy "ddp" each
    # process trains on its shard of every epoch (Lightning wraps the EpochSampler in a
    # DistributedSamplerWrapper that forwards set_epoch), gradients are averaged, and batch_size is
    # per process. Checkpoints are written by global rank 0 only.
    trainer = L.Trainer(
        max_epochs=cfg.max_epochs, accelerator=cfg.accelerator, devices=cfg.devices,
        strategy=cfg.strategy, num_nodes=cfg.num_nodes,
        precision="bf16-mixed" if use_bf16(cfg.precision) else "32-true",
        callbacks=[checkpoint, last_epoch, early], logger=logger, enable_progress_bar=progress,
        enable_model_summary=False, deterministic=False, log_every_n_steps=1, num_sanity_val_steps=0,
    )
    last = ckpt_dir / "last.ckpt"
    resumed = None
    if last.exists():
        resumed = int(torch.load(last, map_location="cpu", weights_only=True)["epoch"]) + 1
    trainer.fit(model, train_loader, val_loader, ckpt_path=str(last) if last.exists() else None)
    result = TrainResult(
        best_checkpoint=str(Path(checkpoint.best_model_path).relative_to(out_dir)),
        best_val_loss=float(checkpoint.best_model_score), epochs=int(trainer.current_epoch),
        seconds=round(time.perf_counter() - t0, 1), resumed_from_epoch=resumed,
    )
    if trainer.is_global_zero:
        result.write(out_dir / "train_result.json")
    return result


def load_classifier(checkpoint: str | Path) -> ImageClassifier:
    """The trained model from a checkpoint written by :func:`train_model` (eval mode)."""
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
        hp = dict(ckpt["hyper_parameters"])
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ConfigError(f"{checkpoint} is not a readable readingrace checkpoint (loaded weights-only): "
                          f"{type(exc).__name__}: {str(exc)[:200]}") from None
    hp["weights"] = None
    with loading_checkpoint():
        model = ImageClassifier(**hp)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def history(out_dir: Path) -> pd.DataFrame:
    """Per-epoch training curves from the CSV logs of every attempt (one row per epoch; a resumed
    attempt's rows replace those of epochs it repeated)."""
    paths = sorted((Path(out_dir) / "logs").glob("attempt-*/metrics.csv"),
                   key=lambda p: int(p.parent.name.split("-")[1]))
    frames = []
    for k, path in enumerate(paths):
        df = pd.read_csv(path)
        if "epoch" in df:
            frames.append(df.groupby("epoch").mean(numeric_only=True).assign(attempt=k))
    if not frames:
        return pd.DataFrame()
    merged = pd.concat(frames).reset_index()
    return merged.sort_values(["epoch", "attempt"]).groupby("epoch").last().reset_index().drop(columns="attempt")


def use_bf16(precision: str) -> bool:
    """Whether to train with bf16 autocast: "auto" uses it only where it is fast.

    bf16 autocast helps on CUDA and on CPUs with native bf16 instructions (AVX512-BF16, AMX); on
    CPUs without them (e.g. AVX2 only) it is emulated and several times slower than fp32.
    """
    if precision != "auto":
        return precision == "bf16"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))

"""A3's models trained for other tasks: the pathology model and the re-identification model.

**Pathology** (paper: DenseNet121 on the 14 finding labels, 80/10/10 split): a multi-label
network trained with binary cross-entropy on logits, one output per label. Labels are 1
(positive), 0 (negative), -1 (uncertain, CheXpert/MIMIC) or blank. The uncertain-label policy is
named, never implicit (:data:`POLICIES`): ``zeros`` (uncertain -> 0), ``ones`` (uncertain -> 1) or
``ignore`` (uncertain and blank entries are masked out of the loss). Under ``zeros`` and ``ones`` a
blank means "not mentioned" and counts as 0. The split is by patient (80/10/10). Test AUC per
label is computed on certain entries only (1 vs 0), whatever the training policy.

**Re-identification** (paper: patients with >= 20 frontal images, classify the patient): the one
sanctioned exception to patient-disjoint splits. Images of the selected patients are split
80/10/10 *within* each patient (an identity classifier must see every identity in training); the
split is marked :data:`REID_SPLIT_POLICY` in every output. The race probe on its features then uses
patient-disjoint splits of *other* patients by default (:func:`readingrace.probe.run_probe`).

Training reuses the recipe of :func:`readingrace.train.train_model` (seeded epochs, augmentation,
Adam, LR x0.1 on plateau, early stopping, best and last checkpoints, resume).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import binomtest
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset

from readingrace.config import AugmentConfig, TrainConfig
from readingrace.errors import CohortError, ConfigError, SplitError
from readingrace.models import build_model, loading_checkpoint
from readingrace.predict import image_batches
from readingrace.split import check_no_leakage, check_ratios, split_patients
from readingrace.train import (
    INPUT_MEAN,
    INPUT_STD,
    EpochSampler,
    TrainResult,
    fit_resumable,
    paper_optimizer,
    augment_batch,
    quiet_lightning,
    train_model,
)

POLICIES: dict[str, str] = {
    "zeros": "uncertain (-1) -> 0; blank -> 0",
    "ones": "uncertain (-1) -> 1; blank -> 0",
    "ignore": "uncertain (-1) and blank entries masked out of the loss",
}
PATHOLOGY_RATIOS: tuple[float, float, float] = (0.8, 0.1, 0.1)
REID_RATIOS: tuple[float, float, float] = (0.8, 0.1, 0.1)
REID_SPLIT_POLICY = "image-within-patient (A3 re-identification, sanctioned)"
FRONTAL_VIEWS: tuple[str, ...] = ("AP", "PA")


# --------------------------------------------------------------------------------------------
# labels and the loss
# --------------------------------------------------------------------------------------------
def label_matrix(cohort: pd.DataFrame, label_cols: Sequence[str]) -> np.ndarray:
    """The raw label values (N, L) as float: 1, 0, -1 or NaN (blank). Other values raise CohortError."""
    if not label_cols:
        raise ConfigError("no label columns given: name the finding columns (e.g. NIH_LABELS)")
    lacking = [c for c in label_cols if c not in cohort.columns]
    if lacking:
        raise CohortError(f"cohort lacks label column(s) {lacking}; available: {sorted(map(str, cohort.columns))[:20]}")
    out = np.empty((len(cohort), len(label_cols)), dtype=np.float32)
    for j, col in enumerate(label_cols):
        raw = cohort[col]
        v = pd.to_numeric(raw.map(lambda x: float(x) if isinstance(x, (bool, np.bool_)) else x), errors="coerce")
        bad = (raw.notna() & v.isna()) | (v.notna() & ~v.isin([1.0, 0.0, -1.0]))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            who = cohort["image_id"].iloc[i] if "image_id" in cohort.columns else i
            val = raw.iloc[i].item() if isinstance(raw.iloc[i], np.generic) else raw.iloc[i]
            raise CohortError(f"label column {col!r}, image {who!r}: value {val!r} is not 1, 0, -1 or blank "
                              f"({int(bad.sum())} such row(s))")
        out[:, j] = v.to_numpy(dtype=np.float32)
    return out


def encode_targets(values: np.ndarray, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw labels (1/0/-1/NaN) -> (targets, mask) float32 by ``policy`` (see :data:`POLICIES`).

    Masked entries get target 0 (never NaN, so that a masked entry contributes exactly zero loss
    and zero gradient).
    """
    if policy not in POLICIES:
        raise ConfigError(f"uncertain-label policy {policy!r} is not one of {sorted(POLICIES)}")
    v = np.asarray(values, dtype=np.float32)
    pos, unc = v == 1.0, v == -1.0
    if policy == "zeros":
        return pos.astype(np.float32), np.ones_like(v)
    if policy == "ones":
        return (pos | unc).astype(np.float32), np.ones_like(v)
    certain = (v == 0.0) | pos
    return pos.astype(np.float32), certain.astype(np.float32)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over unmasked entries (mask 1); masked entries add nothing."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    mask = mask.float()
    return (loss * mask).sum() / mask.sum().clamp_min(1.0)


# --------------------------------------------------------------------------------------------
# data and the Lightning module
# --------------------------------------------------------------------------------------------
class MultiLabelImages(Dataset):
    """Images (N, S, S) with per-image targets and masks (len(index), L), selected by index."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, mask: np.ndarray, index: np.ndarray):
        self.images, self.index = images, np.asarray(index)
        self.targets = torch.from_numpy(np.asarray(targets, dtype=np.float32))
        self.mask = torch.from_numpy(np.asarray(mask, dtype=np.float32))
        if not (len(self.index) == len(self.targets) == len(self.mask)):
            raise ValueError("targets and mask must align with the selected images")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        img = torch.from_numpy(np.array(self.images[self.index[i]], dtype=np.float32))
        return img.unsqueeze(0), self.targets[i], self.mask[i]


class MultiLabelClassifier(L.LightningModule):
    """A :mod:`readingrace.models` network with one sigmoid output per label (masked BCE)."""

    def __init__(self, arch: str, label_names: Sequence[str], *, policy: str = "ignore", lr: float = 1e-3,
                 lr_factor: float = 0.1, lr_patience: int = 2, augment: dict | None = None, seed: int = 2021,
                 weights: str | None = None):
        super().__init__()
        if policy not in POLICIES:
            raise ConfigError(f"uncertain-label policy {policy!r} is not one of {sorted(POLICIES)}")
        if len(label_names) < 2:
            raise ConfigError(f"a multi-label model needs at least 2 labels, got {list(label_names)}")
        self.save_hyperparameters({"arch": arch, "label_names": list(label_names), "policy": policy, "lr": lr,
                                   "lr_factor": lr_factor, "lr_patience": lr_patience, "augment": augment,
                                   "seed": seed, "weights": weights})
        self.net = build_model(arch, len(label_names), weights=weights)
        self.augment = AugmentConfig(**(augment or {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - INPUT_MEAN) / INPUT_STD)

    def training_step(self, batch, batch_idx):  # noqa: D102
        x, y, m = batch
        g = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + self.global_step)
        loss = masked_bce(self(augment_batch(x, self.augment, g)), y, m)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch, batch_idx):  # noqa: D102
        x, y, m = batch
        loss = masked_bce(self(x), y, m)
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)

    def configure_optimizers(self):  # noqa: D102
        return paper_optimizer(self)


def train_multilabel(
    *, images: np.ndarray, values: np.ndarray, train_index: np.ndarray, val_index: np.ndarray,
    label_names: Sequence[str], arch: str, cfg: TrainConfig, seed: int, out_dir: Path, policy: str = "ignore",
    weights: str | None = None, progress: bool = False,
) -> TrainResult:
    """Train the multi-label model into ``out_dir`` (resumes from ``checkpoints/last.ckpt``).

    ``values`` (len(images), L) holds the raw labels (1/0/-1/NaN) by image position, like ``images``;
    ``train_index``/``val_index`` select positions. Same recipe and outputs as
    :func:`readingrace.train.train_model`.
    """
    quiet_lightning()
    out_dir = Path(out_dir).resolve()   # Lightning's best_model_path is absolute
    out_dir.mkdir(parents=True, exist_ok=True)
    done = out_dir / "train_result.json"
    if done.exists():
        return TrainResult(**json.loads(done.read_text()))
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2 or values.shape[1] != len(label_names):
        raise ConfigError(f"label values {values.shape} must be (images, {len(label_names)} labels)")
    targets, mask = encode_targets(values, policy)
    tr = np.asarray(train_index)
    if (mask[tr].sum(axis=0) == 0).any():
        empty = [label_names[j] for j in np.flatnonzero(mask[tr].sum(axis=0) == 0)]
        raise CohortError(f"label(s) {empty} have no usable (certain) value in the training split")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    L.seed_everything(seed, workers=True, verbose=False)
    t0 = time.perf_counter()
    va = np.asarray(val_index)
    train_data = MultiLabelImages(images, targets[tr], mask[tr], tr)
    val_data = MultiLabelImages(images, targets[va], mask[va], va)
    model = MultiLabelClassifier(arch, list(label_names), policy=policy, lr=cfg.lr, lr_factor=cfg.lr_factor,
                                 lr_patience=cfg.lr_patience, augment=asdict(cfg.augment), seed=seed, weights=weights)
    train_loader = DataLoader(train_data, batch_size=cfg.batch_size, sampler=EpochSampler(len(train_data), seed),
                              num_workers=0)
    val_loader = DataLoader(val_data, batch_size=cfg.batch_size, shuffle=False, num_workers=0)
    return fit_resumable(model, train_loader, val_loader, cfg=cfg, out_dir=out_dir, progress=progress, t0=t0)


def load_multilabel(checkpoint: str | Path) -> MultiLabelClassifier:
    """The trained multi-label model from a checkpoint written by :func:`train_multilabel` (eval mode)."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    hp = dict(ckpt["hyper_parameters"])
    hp["weights"] = None
    arch, names = hp.pop("arch"), hp.pop("label_names")
    with loading_checkpoint():
        model = MultiLabelClassifier(arch, names, **hp)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


@torch.no_grad()
def predict_multilabel(model: MultiLabelClassifier, images: np.ndarray, index: np.ndarray, *,
                       batch_size: int = 64) -> np.ndarray:
    """Sigmoid probabilities (len(index), L) for ``images[index]``."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [torch.sigmoid(model(x).float()).cpu().numpy()
           for x, _ in image_batches(images, index, batch_size=batch_size, device=device)]
    model.train(was)
    n = len(model.hparams.label_names)
    return np.concatenate(out) if out else np.zeros((0, n), dtype=np.float32)


def evaluate_multilabel(
    rows: pd.DataFrame, probs: np.ndarray, values: np.ndarray, label_names: Sequence[str], *,
    n_bootstrap: int = 1000, seed: int = 2021, level: float = 0.95,
) -> pd.DataFrame:
    """Per-label test AUC (certain entries only: 1 vs 0) with patient-clustered bootstrap CIs.

    ``rows`` are the test images (image_id, patient_id, optional study_id), ``probs`` and ``values``
    their predicted probabilities and raw labels (len(rows), L). A label without positives or
    negatives among the test images gets NaN.
    """
    import warnings

    from readingrace.stats.metrics import evaluate_predictions

    records = []
    base = pd.DataFrame({"image_id": rows["image_id"].astype(str).to_numpy(),
                         "patient_id": rows["patient_id"].astype(str).to_numpy()})
    for j, name in enumerate(label_names):
        v = values[:, j]
        certain = (v == 0) | (v == 1)
        n_pos, n_neg = int((v == 1).sum()), int((v == 0).sum())
        rec: dict[str, Any] = {"label": name, "auc": math.nan, "auc_ci_low": math.nan, "auc_ci_high": math.nan,
                               "n_positive": n_pos, "n_negative": n_neg,
                               "n_uncertain_or_blank": int((~certain).sum())}
        if n_pos and n_neg:
            p = probs[certain, j].astype(np.float64)
            frame = base[certain].assign(label=np.where(v[certain] == 1, "present", "absent"),
                                         prob_absent=1 - p, prob_present=p)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = evaluate_predictions(frame, classes=["absent", "present"], n_bootstrap=n_bootstrap,
                                         seed=seed, level=level)
            e = m["per_class"]["present"]
            rec.update(auc=e["auc"], auc_ci_low=e["auc_ci"][0], auc_ci_high=e["auc_ci"][1])
        records.append(rec)
    return pd.DataFrame(records)


def pathology_split(cohort: pd.DataFrame, *, ratios: Sequence[float] = PATHOLOGY_RATIOS, seed: int = 2021,
                    stratify: str | None = None) -> pd.Series:
    """The pathology model's patient split (80/10/10 by default), optionally stratified by a column."""
    return split_patients(cohort, target=stratify, ratios=ratios, seed=seed)


# --------------------------------------------------------------------------------------------
# re-identification
# --------------------------------------------------------------------------------------------
def reid_cohort(cohort: pd.DataFrame, *, min_images: int = 20,
                views: Sequence[str] | None = FRONTAL_VIEWS) -> pd.DataFrame:
    """The frontal images of patients with at least ``min_images`` frontal images (paper: 20).

    ``views=None`` keeps every view (for cohorts without a view column, or already frontal).
    """
    if min_images < 2:
        raise ConfigError(f"min_images must be >= 2 (an identity needs images in train and test), got {min_images}")
    df = cohort
    if views is not None:
        if "view" not in df.columns:
            raise CohortError("re-identification selects frontal images by the 'view' column, which the cohort "
                              "lacks; pass views=None if every image is frontal")
        df = df[df["view"].astype(str).str.upper().isin([v.upper() for v in views])]
    counts = df.groupby("patient_id").size()
    keep = counts.index[counts >= min_images]
    out = df[df["patient_id"].isin(keep)].copy()
    if len(keep) < 2:
        raise CohortError(
            f"re-identification needs >= 2 patients with >= {min_images} frontal images; the cohort has "
            f"{len(keep)} (largest count {int(counts.max()) if len(counts) else 0}); lower min_images or use a "
            "larger cohort")
    return out


def reid_split(cohort: pd.DataFrame, *, ratios: Sequence[float] = REID_RATIOS, seed: int = 2021) -> pd.Series:
    """Image-level split *within* each patient, stratified by patient (the sanctioned A3 exception).

    Every patient has images in every part. Returns 'train'/'val'/'test' aligned with ``cohort.index``.
    """
    r = check_ratios(ratios)
    if len(r) != 3:
        raise SplitError(f"re-identification needs three split ratios (train/val/test), got {list(r)}")
    idx = cohort.index.to_numpy()
    pid = cohort["patient_id"].astype(str).to_numpy()
    try:
        tr, rest = train_test_split(idx, train_size=r[0], random_state=seed, stratify=pid)
        rest_pid = cohort.loc[rest, "patient_id"].astype(str).to_numpy()
        va, te = train_test_split(rest, train_size=r[1] / (r[1] + r[2]), random_state=seed, stratify=rest_pid)
    except ValueError as exc:
        raise SplitError(f"cannot split the images of {len(set(pid))} patients {list(r)} within patients: {exc}; "
                         "each patient needs enough images (raise min_images)") from None
    out = pd.Series(index=cohort.index, dtype=object, name="split")
    out.loc[tr], out.loc[va], out.loc[te] = "train", "val", "test"
    check_no_leakage(cohort.assign(split=out), allowed={"reason": REID_SPLIT_POLICY})
    return out


@dataclass
class ReidResult:
    """A trained re-identification model: its cohort (with split), classes and test accuracy."""

    checkpoint: Path
    patients: list[str]
    cohort: pd.DataFrame
    train: TrainResult
    test_top1: float
    test_top1_ci: tuple[float, float]
    test_top5: float
    chance: float
    split_policy: str = REID_SPLIT_POLICY
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"split_policy": self.split_policy, "n_patients": len(self.patients),
                "n_images": int(len(self.cohort)),
                "images_per_split": self.cohort["split"].value_counts().to_dict(),
                "test_top1_accuracy": self.test_top1, "test_top1_ci_wilson": list(self.test_top1_ci),
                "test_top5_accuracy": self.test_top5, "chance_top1": self.chance,
                "training": asdict(self.train), **self.info}


def train_reid(
    *, images: np.ndarray, cohort: pd.DataFrame, arch: str, cfg: TrainConfig, seed: int, out_dir: Path,
    min_images: int = 20, views: Sequence[str] | None = FRONTAL_VIEWS, ratios: Sequence[float] = REID_RATIOS,
    weights: str | None = None, index_col: str = "cache_index", progress: bool = False,
) -> ReidResult:
    """Select :func:`reid_cohort`, split with :func:`reid_split`, train a patient-id classifier.

    ``cohort[index_col]`` gives each row's position in ``images`` (row position when the column is
    absent). Writes ``reid_cohort.csv`` (with ``split`` and ``split_policy``) into ``out_dir``.
    """
    from readingrace.predict import predict_proba
    from readingrace.train import load_classifier

    out_dir = Path(out_dir)
    df = reid_cohort(cohort, min_images=min_images, views=views)
    df = df.assign(split=reid_split(df, ratios=ratios, seed=seed), split_policy=REID_SPLIT_POLICY)
    patients = sorted(df["patient_id"].astype(str).unique())
    code = {p: i for i, p in enumerate(patients)}
    pos = (df[index_col].to_numpy() if index_col in df.columns else df.index.to_numpy()).astype(np.int64)
    labels = np.full(len(images), -1, dtype=np.int64)
    labels[pos] = df["patient_id"].astype(str).map(code).to_numpy()
    where = {s: pos[(df["split"] == s).to_numpy()] for s in ("train", "val", "test")}
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / "reid_cohort.csv", index=False)
    result = train_model(images=images, labels=labels, train_index=where["train"], val_index=where["val"],
                         n_classes=len(patients), arch=arch, cfg=cfg, seed=seed, out_dir=out_dir,
                         weights=weights, progress=progress)
    model = load_classifier(out_dir / result.best_checkpoint)
    probs = predict_proba(model, images, where["test"], batch_size=max(cfg.batch_size, 64))
    truth = labels[where["test"]]
    top = np.argsort(-probs, axis=1)
    hits1 = int((top[:, 0] == truth).sum())
    top5 = float((top[:, :5] == truth[:, None]).any(axis=1).mean())
    ci = binomtest(hits1, len(truth)).proportion_ci(confidence_level=0.95, method="wilson")
    return ReidResult(checkpoint=out_dir / result.best_checkpoint, patients=patients, cohort=df, train=result,
                      test_top1=hits1 / len(truth), test_top1_ci=(float(ci.low), float(ci.high)), test_top5=top5,
                      chance=1 / len(patients), info={"min_images": min_images, "arch": arch})

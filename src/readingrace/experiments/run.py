"""The main job: cohort -> split -> image cache -> train (per seed) -> predict -> evaluate -> report.

Every stage writes its output into the run folder, so the run can be traced and resumed:
``config.yaml`` (resolved, with its fingerprint), ``cohort.csv`` (with the split), ``manifest.json``,
``seed-<s>/`` (checkpoints, logs, ``predictions.csv``, ``metrics.json``), the reference model's
predictions, and the top-level ``predictions.csv``, ``metrics.json`` and ``report.md``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from readingrace import __version__
from readingrace.cohort.build import build_cohort
from readingrace.cohort.manifest import Manifest
from readingrace.config import ExperimentConfig, cache_home
from readingrace.errors import CohortError, ConfigError, RunError, SplitError, is_interruption
from readingrace.experiments.rundir import RunLock, clean_nan, write_atomic, write_json
from readingrace.split import check_no_leakage, split_patients, split_sizes

log = logging.getLogger("readingrace")

#: Files a run writes; ``--force`` removes exactly these, nothing else in the folder.
RUN_OUTPUTS = ("cohort.csv", "manifest.json", "predictions.csv", "metrics.json", "report.md", "roc.png",
               "curves.png", "reference_predictions.csv", "predictions_occluded.csv", "occlusion_boxes.csv",
               "predictions_lung_only.csv", "predictions_non_lung.csv", "lung_masks.csv", "gallery_lung_masks.png",
               "slice_position.png")


def cache_root(cfg: ExperimentConfig) -> Path:
    """Where preprocessed images (and generated cohorts) are kept, shared by all runs."""
    return Path(cfg.image.cache_dir) if cfg.image.cache_dir else cache_home()


def default_run_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.out) if cfg.out else Path("runs") / cfg.name


@dataclass
class Prepared:
    """A cohort ready for training: the table (with split), its manifest and the cached images."""

    cohort: pd.DataFrame
    manifest: Manifest
    images: np.ndarray
    classes: list[str]
    labels: np.ndarray

    def index(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.cohort["split"].to_numpy() == split)


def prepare(cfg: ExperimentConfig, *, data_root: str | Path | None, say: Callable[[str], None] = print) -> Prepared:
    """Build the cohort, decode and cache its images once, drop unreadable ones, split by patient."""
    from readingrace.imaging.cache import build_cache

    if len(cfg.split.ratios) != 3:
        raise SplitError(f"split.ratios {cfg.split.ratios}: a run needs three parts (train, validation, test), "
                         "e.g. [0.6, 0.1, 0.3]")
    root = check_data_root(cfg, data_root)
    cohort, manifest = build_cohort(cfg.cohort, data_root=root)
    say(f"cohort: {len(cohort)} images of {cohort['patient_id'].nunique()} patients")
    t0 = time.perf_counter()
    cache = build_cache(cohort["path"].tolist(), size=cfg.image.size, cache_root=cache_root(cfg) / "images",
                        mode=cfg.image.mode, dtype=cfg.image.cache_dtype, bit_depth=cfg.image.bit_depth)
    manifest.counts["cache"] = {"key": cache.key, "seconds": round(time.perf_counter() - t0, 2)}
    for i, reason in sorted(cache.reasons.items()):
        manifest.skip(cohort["image_id"].iloc[i], reason, stage="image")
    ok = np.asarray(cache.ok, dtype=bool)
    position = np.arange(len(cohort))
    before = cohort
    cohort = cohort[ok].copy()
    cohort["cache_index"] = position[ok]
    manifest.step("image decodes", before, cohort, detail=f"{int((~ok).sum())} unreadable or constant images skipped")
    target = cfg.cohort.target
    classes = sorted(cohort[target].unique())
    if len(classes) < 2:
        raise CohortError(f"after dropping unreadable images, {target!r} has one class ({classes}); nothing to classify")
    cohort["split"] = split_patients(cohort, target=target, ratios=cfg.split.ratios, seed=cfg.split.seed)
    check_no_leakage(cohort)
    for split in ("train", "val", "test")[: len(cfg.split.ratios)]:
        present = set(cohort.loc[cohort["split"] == split, target])
        absent = [c for c in classes if c not in present]
        if split == "train" and absent:
            raise SplitError(f"class(es) {absent} of {target!r} have no image in the training split; "
                             "collect more patients of that class or drop it")
        if absent:
            manifest.warn(f"class(es) {absent} absent from the {split} split: their AUC is undefined (NaN)")
    manifest.counts["splits"] = split_sizes(cohort, target=target).to_dict("records")
    labels = cohort[target].map({c: i for i, c in enumerate(classes)}).to_numpy()
    return Prepared(cohort=cohort.reset_index(drop=True), manifest=manifest, images=cache.images,
                    classes=classes, labels=labels)


def check_data_root(cfg: ExperimentConfig, data_root: str | Path | None) -> str | Path | None:
    """The data folder of the run (``--data-root`` or ``cohort.data_root``); an error when it does not exist."""
    root = data_root or cfg.cohort.data_root
    if root is not None and not Path(root).exists() and cfg.cohort.source != "synthetic":
        raise CohortError(f"data folder not found: {root}")
    return root


def check_inputs(cfg: ExperimentConfig) -> None:
    """Every input file the config names (model weights, lung masks, pairs and U-Net) exists, and the lung mask
    lists parse: checked before anything is trained or written. Relative paths are relative to the current folder."""
    lungs = cfg.evaluate.lungs
    named = {"model.weights": cfg.model.weights, "evaluate.lungs.masks_csv": lungs.masks_csv,
             "evaluate.lungs.unet_pairs": lungs.unet_pairs, "evaluate.lungs.unet_weights": lungs.unet_weights}
    for key, value in named.items():
        path = Path(value or "")
        if value and not path.is_file():
            note = "" if path.is_absolute() else f" ({value!r} is relative to the current folder {Path.cwd()})"
            raise ConfigError(f"{key}: file not found: {path.resolve()}{note}")
    if lungs.masks_csv or lungs.unet_pairs:
        from readingrace.explain.lungs import read_masks_csv, read_pairs_csv

        if lungs.masks_csv:
            read_masks_csv(lungs.masks_csv)
        if lungs.unet_pairs:  # the U-Net's training pairs: every file must be there (masks_csv misses are skips)
            pairs = read_pairs_csv(lungs.unet_pairs)
            missing = [f for f in (*pairs["image_path"], *pairs["mask_path"]) if not Path(f).is_file()]
            if missing:
                raise ConfigError(f"evaluate.lungs.unet_pairs: {len(missing)} of the {2 * len(pairs)} files "
                                  f"{lungs.unet_pairs} lists are not found, e.g. {missing[0]} (paths are read "
                                  "relative to the pairs file's folder)")


def check_same_cohort(run_dir: Path, cohort: pd.DataFrame, *, target: str) -> None:
    """Refuse a run folder whose ``cohort.csv`` lists other images (or other patients or target values) than
    ``cohort`` (the cohort built now, before images are decoded): its results belong to other data."""
    recorded = run_dir / "cohort.csv"
    if not recorded.is_file():
        return
    columns = ["image_id", "patient_id", target]
    try:
        old = pd.read_csv(recorded, usecols=columns, dtype=str, keep_default_na=False)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise RunError(f"{recorded}: cannot be read to compare the cohort ({exc}); use another --out, or --force "
                       "to redo") from None
    then = set(old["image_id"])
    manifest = run_dir / "manifest.json"
    if manifest.is_file():  # images the run could not decode are not in cohort.csv, but were in its cohort
        try:
            skipped = json.loads(manifest.read_text()).get("skipped", [])
        except (ValueError, OSError):
            skipped = []
        then |= {str(s.get("item")) for s in skipped if isinstance(s, dict) and s.get("stage") == "image"}
    now = cohort[columns].astype(str)
    now_ids = set(now["image_id"])
    gone, new = then - now_ids, now_ids - then
    both = old.merge(now, on="image_id", suffixes=("_then", "_now"))
    relabelled = int(((both["patient_id_then"] != both["patient_id_now"])
                      | (both[f"{target}_then"] != both[f"{target}_now"])).sum())
    if not gone and not new and not relabelled:
        return
    changed = f", {relabelled} with another patient_id or {target}" if relabelled else ""
    example = sorted(gone)[:1] or sorted(new)[:1]
    raise RunError(f"{run_dir}: the cohort differs from the one this run was trained on: {len(then)} images then, "
                   f"{len(now_ids)} now ({len(gone)} gone, {len(new)} new{changed}"
                   + (f"; e.g. {'gone' if gone else 'new'}: {example[0]}" if example else "")
                   + "); use another --out, or --force to redo")


def check_same_split(run_dir: Path, cohort: pd.DataFrame) -> None:
    """Refuse to resume when the images that decode now give another split than the recorded one (an image
    repaired or newly unreadable can move a patient, and with it the split of others)."""
    recorded = run_dir / "cohort.csv"
    if not recorded.is_file():
        return
    old = pd.read_csv(recorded, usecols=["image_id", "split"], dtype=str, keep_default_na=False)
    now = cohort[["image_id", "split"]].astype(str)
    both = old.merge(now, on="image_id", how="outer", suffixes=("_then", "_now"), indicator=True)
    moved = both[(both["_merge"] != "both") | (both["split_then"] != both["split_now"])]
    if len(moved):
        raise RunError(f"{run_dir}: the images that decode now split the patients differently from the run's "
                       f"cohort.csv ({len(moved)} image(s) added, dropped or in another split, e.g. "
                       f"{moved['image_id'].iloc[0]}); its checkpoints were trained on the old split: use another "
                       "--out, or --force to redo")


def _recorded_fingerprint(run_dir: Path) -> str | None:
    """The fingerprint in a run folder's ``config.yaml`` (None when unreadable); libyaml when installed (fast)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return (yaml.load((run_dir / "config.yaml").read_text(), Loader=loader) or {}).get("fingerprint")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def _check_run_dir(run_dir: Path, cfg: ExperimentConfig, force: bool,
                   say: Callable[[str], None] = print) -> dict | None:
    """Existing results for the same config (or None); refuse to mix configs in one folder.

    A folder whose earlier attempt (of another config) never produced a result is taken over, with a notice.
    """
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        return None
    old = yaml.safe_load(cfg_path.read_text()) or {}
    same = old.get("fingerprint") == cfg.fingerprint()
    if old.get("kind") and not force:  # a disease, A3 or other command's folder: never taken over or mixed
        raise RunError(f"{run_dir} holds a `readingrace {old['kind']}` run, not a `readingrace run` run; use --out "
                       "for a new folder")
    if not same and not force and not has_results(run_dir):
        say(f"{run_dir}: replacing the files of an unfinished attempt of another config (fingerprint "
            f"{old.get('fingerprint')}; it produced no checkpoint, predictions or metrics)")
        force = True
    if force:
        for name in RUN_OUTPUTS:
            (run_dir / name).unlink(missing_ok=True)
        for folder in [*run_dir.glob("seed-*"), run_dir / "gradcam"]:
            if folder.is_dir():
                shutil.rmtree(folder)
        return None
    if not same:
        raise RunError(f"{run_dir} holds a run of a different config (fingerprint {old.get('fingerprint')}, "
                       f"this one {cfg.fingerprint()}); use --out for a new folder or --force to replace it")
    metrics = run_dir / "metrics.json"
    return json.loads(metrics.read_text()) if metrics.exists() else None


def has_results(run_dir: Path) -> bool:
    """Whether a run folder holds any result: a checkpoint, predictions or metrics (its own or a seed's)."""
    patterns = ("metrics.json", "*predictions*.csv", "seed-*/metrics.json", "seed-*/*predictions*.csv",
                "seed-*/train_result.json", "seed-*/checkpoints/*.ckpt", "model/checkpoints/*.ckpt",
                "confounders.json", "DONE", "pathology/*", "direct/*")  # also other commands' results
    return any(next(run_dir.glob(pattern), None) is not None for pattern in patterns)


def run_experiment(cfg: ExperimentConfig, *, out: str | Path | None = None, data_root: str | Path | None = None,
                   force: bool = False, progress: bool = False, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume, or report) one experiment; returns its metrics dict."""
    from readingrace.imaging.perturb import describe_perturbation
    from readingrace.predict import predict_proba, predictions_table
    from readingrace.reference import fit_predict_reference
    from readingrace.report.markdown import fmt_ci, write_run_report
    from readingrace.stats.metrics import compare_predictions, evaluate_predictions
    from readingrace.train import load_classifier, train_model

    run_dir = Path(out) if out else default_run_dir(cfg)
    t_start = time.perf_counter()
    if global_rank() != 0:
        # a DDP worker process (Lightning re-runs the command once per device): it trains its shard
        # and leaves the run folder, predictions and report to rank 0
        prep = prepare(cfg, data_root=data_root, say=lambda m: None)
        idx = prep.cohort["cache_index"].to_numpy()
        for seed in cfg.train.seeds:
            train_model(images=prep.images, labels=_labels_for(prep), train_index=idx[prep.index("train")],
                        val_index=idx[prep.index("val")], n_classes=len(prep.classes), arch=cfg.model.name,
                        cfg=cfg.train, seed=seed, out_dir=run_dir / f"seed-{seed}", weights=cfg.model.weights,
                        perturb=cfg.perturb.train)
        return {}
    # before the run folder is touched: the data folder, the files the config names (not needed to report a
    # finished run) and the cohort (memoised: prepare() reuses it), compared below with the run's cohort.csv
    root = check_data_root(cfg, data_root)
    if force or not ((run_dir / "metrics.json").is_file() and _recorded_fingerprint(run_dir) == cfg.fingerprint()):
        check_inputs(cfg)
    cohort_now, _ = build_cohort(cfg.cohort, data_root=root)
    with RunLock(run_dir):
        existing = _check_run_dir(run_dir, cfg, force, say)
        if has_results(run_dir):  # a finished or interrupted run of this config: the same data?
            check_same_cohort(run_dir, cohort_now, target=cfg.cohort.target)
        if existing is not None:
            say(f"results already in {run_dir} (use --force to redo)")
            return existing
        write_atomic(run_dir / "config.yaml", yaml.safe_dump(
            {"fingerprint": cfg.fingerprint(), "readingrace": __version__, **cfg.to_dict()}, sort_keys=False))
        resuming = has_results(run_dir)
        prep = prepare(cfg, data_root=data_root, say=say)
        target, classes = cfg.cohort.target, prep.classes
        cohort = prep.cohort
        if resuming:  # the checkpoints were trained on the recorded split: it must be the same split now
            check_same_split(run_dir, cohort)
        write_atomic(run_dir / "cohort.csv", cohort.to_csv(index=False))
        prep.manifest.write(run_dir / "manifest.json")
        tr, va, te = prep.index("train"), prep.index("val"), prep.index("test")
        if len(te) == 0:
            raise SplitError("the test split is empty: use larger ratios or more patients")
        cache_idx = cohort["cache_index"].to_numpy()
        strata = [s for s in cfg.evaluate.strata if s in cohort.columns]
        missing_strata = sorted(set(cfg.evaluate.strata) - set(strata))
        if missing_strata:
            raise CohortError(f"evaluate.strata {missing_strata} are not cohort columns")
        eval_kw = dict(classes=classes, n_bootstrap=cfg.evaluate.n_bootstrap, seed=cfg.split.seed,
                       level=cfg.evaluate.level, threshold=cfg.evaluate.threshold, strata=strata,
                       study_level=cfg.evaluate.study_level)
        test_rows = cohort.iloc[te]
        per_seed: dict[str, Any] = {}
        first_pred = None
        for seed in cfg.train.seeds:
            seed_dir = run_dir / f"seed-{seed}"
            say(f"training {cfg.model.name} (seed {seed}, {len(tr)} train / {len(va)} val images, "
                f"{cfg.image.size} px)")
            with _TrainingAttempt(seed_dir, seed, say=say):
                result = train_model(images=prep.images, labels=_labels_for(prep), train_index=cache_idx[tr],
                                     val_index=cache_idx[va], n_classes=len(classes), arch=cfg.model.name,
                                     cfg=cfg.train, seed=seed, out_dir=seed_dir, weights=cfg.model.weights,
                                     progress=progress, perturb=cfg.perturb.train)
            model = load_classifier(seed_dir / result.best_checkpoint)
            probs = predict_proba(model, prep.images, cache_idx[te], batch_size=max(cfg.train.batch_size, 64))
            pred = predictions_table(test_rows, probs, classes, target=target, extra=strata)
            write_atomic(seed_dir / "predictions.csv", pred.to_csv(index=False))
            m = evaluate_predictions(pred, **eval_kw)
            m["training"] = {"epochs": result.epochs, "best_val_loss": result.best_val_loss,
                             "seconds": result.seconds, "resumed_from_epoch": result.resumed_from_epoch}
            if cfg.perturb.train:
                m["perturbations"] = [describe_perturbation(p) for p in cfg.perturb.train]
            if cfg.perturb.test:
                m["test_perturbations"] = _test_perturbations(
                    cfg, model, prep.images, cache_idx[te], test_rows, pred, seed_dir, eval_kw)
            if seed == cfg.train.seeds[0] and (cfg.evaluate.occlusion or cfg.evaluate.gradcam_gallery
                                               or cfg.evaluate.lungs.enabled):
                m["localisation"] = _localisation(cfg, model, prep.images, cache_idx[te], test_rows, pred,
                                                  run_dir, eval_kw, cohort=cohort, test_positions=te,
                                                  images_key=prep.manifest.counts["cache"]["key"], say=say)
            write_json(seed_dir / "metrics.json", clean_nan(m))
            per_seed[str(seed)] = m
            if first_pred is None:
                first_pred = pred
            say(f"seed {seed}: test macro AUC {fmt_ci(m['macro_auc'], m['macro_auc_ci'])} "
                f"({result.epochs} epochs, {training_time(seed_dir, result.seconds)})")
        metrics = dict(per_seed[str(cfg.train.seeds[0])])
        write_atomic(run_dir / "predictions.csv", first_pred.to_csv(index=False))
        aucs = [per_seed[s]["macro_auc"] for s in per_seed]
        metrics["seeds"] = {s: {"macro_auc": v["macro_auc"], "macro_auc_ci": v["macro_auc_ci"],
                                "per_class_auc": {c: v["per_class"][c]["auc"] for c in classes},
                                "training": v["training"]} for s, v in per_seed.items()}
        metrics["seed_summary"] = {"n": len(aucs), "macro_auc_mean": float(np.nanmean(aucs)),
                                   "macro_auc_min": float(np.nanmin(aucs)), "macro_auc_max": float(np.nanmax(aucs)),
                                   "reported_seed": cfg.train.seeds[0]}
        if cfg.evaluate.reference:
            say("reference: logistic regression on 32x32 thumbnails")
            ref_probs, details = fit_predict_reference(
                prep.images, _labels_for(prep), train_index=cache_idx[tr], val_index=cache_idx[va],
                test_index=cache_idx[te], n_classes=len(classes), transform=_train_perturbations(cfg))
            if cfg.perturb.train:
                details["name"] += " of the same perturbed images"
            ref_pred = predictions_table(test_rows, ref_probs, classes, target=target, extra=strata)
            write_atomic(run_dir / "reference_predictions.csv", ref_pred.to_csv(index=False))
            metrics["reference"] = {**details, **evaluate_predictions(ref_pred, **eval_kw)}
            metrics["cnn_vs_reference"] = compare_predictions(
                first_pred, ref_pred, classes=classes, n_bootstrap=cfg.evaluate.n_bootstrap, seed=cfg.split.seed,
                level=cfg.evaluate.level)
        metrics.update({
            "target": target, "model": cfg.model.name, "image_size": cfg.image.size,
            "run": {"name": cfg.name, "fingerprint": cfg.fingerprint(), "readingrace": __version__,
                    "seconds": round(time.perf_counter() - t_start, 1)},
        })
        metrics = clean_nan(metrics)
        write_json(run_dir / "metrics.json", metrics)
        write_run_report(run_dir, cfg=cfg, cohort=cohort, manifest=prep.manifest, metrics=metrics)
        say(f"wrote {run_dir / 'report.md'}")
        return metrics


#: Per seed folder: one entry per training attempt, its wall seconds (None while running) and outcome.
ATTEMPTS_FILE = "attempts.json"


class _TrainingAttempt:
    """Around one seed's training: say where a resumed attempt starts, record each attempt's time, and turn
    Lightning's exit on Ctrl-C (``sys.exit(1)`` raised while handling the KeyboardInterrupt) back into a
    KeyboardInterrupt, so callers (the CLI, the suite) see an interruption, not an exit status 1."""

    def __init__(self, seed_dir: Path, seed: int, *, say: Callable[[str], None]):
        self.seed_dir, self.seed, self.say = Path(seed_dir), seed, say
        self.active = False

    def __enter__(self) -> _TrainingAttempt:
        if (self.seed_dir / "train_result.json").exists():
            return self  # trained by an earlier attempt: nothing runs now
        done = completed_epochs(self.seed_dir)
        if done is not None:
            self.say(f"resuming seed {self.seed} from epoch {done}")
        self.active = True
        self.t0 = time.perf_counter()
        self._record(None, "running")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.active:
            outcome = "finished" if exc_type is None else "interrupted" if is_interruption(exc) else "failed"
            self._record(round(time.perf_counter() - self.t0, 1), outcome)
        if exc_type is SystemExit and is_interruption(exc):
            import signal

            signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning leaves Ctrl-C ignored
            raise KeyboardInterrupt from None

    def _record(self, seconds: float | None, outcome: str) -> None:
        attempts = _read_attempts(self.seed_dir)
        if attempts and attempts[-1].get("outcome") == "running" and outcome != "running":
            attempts[-1] = {"seconds": seconds, "outcome": outcome}
        else:
            attempts.append({"seconds": seconds, "outcome": outcome})
        self.seed_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.seed_dir / ATTEMPTS_FILE, attempts)


def _read_attempts(seed_dir: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads((Path(seed_dir) / ATTEMPTS_FILE).read_text())
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


def completed_epochs(seed_dir: Path) -> int | None:
    """Epochs completed by an interrupted attempt (from ``checkpoints/last.ckpt``); None when there is none."""
    import torch

    last = Path(seed_dir) / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    try:
        return int(torch.load(last, map_location="cpu", weights_only=True, mmap=True)["epoch"]) + 1
    except Exception:  # noqa: BLE001 - a damaged checkpoint: training reports it when it resumes
        return None


def training_time(seed_dir: Path, seconds: float) -> str:
    """A seed's training time for the console: all attempts when each was timed, else this attempt's."""
    attempts = [a for a in _read_attempts(seed_dir) if isinstance(a, dict)]
    if len(attempts) <= 1:
        return f"{seconds:.0f} s"
    if all(isinstance(a.get("seconds"), int | float) for a in attempts):
        return f"{sum(a['seconds'] for a in attempts):.0f} s in {len(attempts)} attempts"
    return f"{seconds:.0f} s (this attempt)"


def global_rank() -> int:
    """This process's rank in a distributed (DDP) run; 0 when not distributed."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _test_perturbations(cfg: ExperimentConfig, model, images: np.ndarray, index: np.ndarray, rows: pd.DataFrame,
                        original: pd.DataFrame, seed_dir: Path, eval_kw: dict) -> dict[str, Any]:
    """Each ``perturb.test`` spec: metrics on perturbed test images and a paired comparison."""
    from readingrace.imaging.perturb import describe_perturbation
    from readingrace.predict import perturbation_transform, predict_proba, predictions_table
    from readingrace.stats.metrics import compare_predictions, evaluate_predictions

    out: dict[str, Any] = {}
    for k, spec in enumerate(cfg.perturb.test):
        label = describe_perturbation(spec)
        probs = predict_proba(model, images, index, batch_size=max(cfg.train.batch_size, 64),
                              transform=perturbation_transform(spec))
        pred = predictions_table(rows, probs, eval_kw["classes"], target=cfg.cohort.target, extra=eval_kw["strata"])
        write_atomic(seed_dir / f"predictions_test_perturbation_{k}.csv", pred.to_csv(index=False))
        out[label] = {
            "spec": spec, "predictions": f"{seed_dir.name}/predictions_test_perturbation_{k}.csv",
            "metrics": evaluate_predictions(pred, **eval_kw),
            "comparison": compare_predictions(pred, original, classes=eval_kw["classes"],
                                              n_bootstrap=eval_kw["n_bootstrap"], seed=eval_kw["seed"],
                                              level=eval_kw["level"]),
        }
    return out


def _localisation(cfg: ExperimentConfig, model, images: np.ndarray, index: np.ndarray, rows: pd.DataFrame,
                  original: pd.DataFrame, run_dir: Path, eval_kw: dict, *, cohort: pd.DataFrame | None = None,
                  test_positions: np.ndarray | None = None, images_key: str = "",
                  say: Callable[[str], None] = print) -> dict[str, Any]:
    """C3 on the test split: Grad-CAM galleries, the hot-box occlusion test and lung-only / non-lung
    test images (each paired with the originals)."""
    from readingrace.explain.gallery import gradcam_galleries
    from readingrace.explain.gradcam import occlusion_test
    from readingrace.stats.metrics import compare_predictions, evaluate_predictions

    out: dict[str, Any] = {}
    classes = eval_kw["classes"]
    if cfg.evaluate.gradcam_gallery:
        files = gradcam_galleries(model, images, original, classes, run_dir / "gradcam", index=index,
                                  box_threshold=cfg.evaluate.occlusion_threshold if cfg.evaluate.occlusion else None)
        out["galleries"] = [str(f.relative_to(run_dir)) for f in files]
    if cfg.evaluate.occlusion:
        occ = occlusion_test(model, images, index, rows[cfg.cohort.target].astype(str).tolist(), classes,
                             threshold=cfg.evaluate.occlusion_threshold, ids=rows.reset_index(drop=True))
        pred = occ["predictions"]
        write_atomic(run_dir / "predictions_occluded.csv", pred.to_csv(index=False))
        write_atomic(run_dir / "occlusion_boxes.csv", occ["boxes"].to_csv(index=False))
        out["occlusion"] = {
            "rule": occ["rule"], "threshold": occ["threshold"], "fill": occ["fill"],
            "mean_box_fraction": occ["mean_box_fraction"], "n_empty_boxes": occ["n_empty_boxes"],
            "metrics": evaluate_predictions(pred, **{**eval_kw, "strata": [], "study_level": False}),
            "comparison": compare_predictions(pred, original, classes=classes, n_bootstrap=eval_kw["n_bootstrap"],
                                              seed=eval_kw["seed"], level=eval_kw["level"]),
        }
    if cfg.evaluate.lungs.enabled:
        if cohort is None or test_positions is None:
            raise RunError("evaluate.lungs needs the cohort and the test rows' positions")
        out["lungs"] = _lungs(cfg, model, images, index, rows, original, run_dir, eval_kw, cohort=cohort,
                              test_positions=test_positions, images_key=images_key, say=say)
    return out


def _lungs(cfg: ExperimentConfig, model, images: np.ndarray, index: np.ndarray, rows: pd.DataFrame,
           original: pd.DataFrame, run_dir: Path, eval_kw: dict, *, cohort: pd.DataFrame, test_positions: np.ndarray,
           images_key: str, say: Callable[[str], None]) -> dict[str, Any]:
    """C3 lung-only and non-lung test images: masks (user's or U-Net), quality rule, paired evaluation."""
    import torch

    from readingrace.explain.gallery import gallery
    from readingrace.explain.lungs import lung_only, masks_for_test_images, non_lung
    from readingrace.predict import predict_proba, predictions_table
    from readingrace.stats.metrics import compare_predictions, evaluate_predictions

    lcfg = cfg.evaluate.lungs
    found = masks_for_test_images(lcfg, cohort=cohort, test_positions=test_positions, images=images,
                                  image_mode=cfg.image.mode, images_key=images_key,
                                  cache_dir=cache_root(cfg) / "lungs", say=say)
    write_atomic(run_dir / "lung_masks.csv", found.table.to_csv(index=False))
    keep = np.flatnonzero(found.included)
    out: dict[str, Any] = {
        "mask_source": found.source, "quality_rule": found.quality_rule, "n_test_images": len(index),
        "n_included": len(keep), "n_excluded": len(index) - len(keep), "excluded": found.excluded_counts(),
        "n_masks_not_in_cohort": found.n_masks_not_in_cohort, "masks_table": "lung_masks.csv",
        "mean_lung_fraction": float(found.table["lung_fraction"].iloc[keep].mean()) if len(keep) else None,
    }
    if found.unet is not None:
        out["unet"] = {k: found.unet[k] for k in (
            "origin", "key", "cached", "sha256", "size", "epochs", "seed", "n_pairs", "n_train", "n_heldout",
            "heldout_dice_mean", "heldout_dice_median", "heldout_dice_p10", "heldout_dice_min", "seconds")
            if k in found.unet}
    if lcfg.gallery_images:
        shown = _gallery_rows(found.included, lcfg.gallery_images)
        table = found.table.iloc[shown]
        titles = [f"#{c} {s or 'no mask'}, lung {f:.2f}" + ("" if not e else f"\nexcluded: {e.split(':')[0]}")
                  for c, s, f, e in zip(table["cache_index"], table["mask_source"], table["lung_fraction"],
                                        table["excluded"], strict=True)]
        gallery(np.asarray(images[index[shown]], dtype=np.float32), None, titles, run_dir / "gallery_lung_masks.png",
                outlines=found.masks[shown], suptitle=f"lung masks of test images ({found.source})")
        out["gallery"] = "gallery_lung_masks.png"
    if len(keep) == 0:
        out["note"] = "no test image has a usable lung mask: lung-only and non-lung images were not evaluated"
        say(f"lung masks: {out['note']} (excluded: {out['excluded']})")
        return out
    say(f"lung masks: {len(keep)} of {len(index)} test images usable ({out['excluded'] or 'none excluded'})")
    masks_t = torch.from_numpy(found.masks[keep]).unsqueeze(1)
    where = {int(i): k for k, i in enumerate(index[keep])}
    sub_rows = rows.iloc[keep]
    sub_original = original.set_index("image_id").loc[sub_rows["image_id"].to_numpy()].reset_index()
    metric_kw = {**eval_kw, "strata": [], "study_level": False}
    out["original"] = {"metrics": evaluate_predictions(sub_original, **metric_kw)}
    preds = {}
    for name, apply in (("lung_only", lung_only), ("non_lung", non_lung)):
        def transform(x, idx, apply=apply):
            m = masks_t[torch.as_tensor([where[int(i)] for i in idx], dtype=torch.long)].to(x.device)
            return apply(x, m)

        probs = predict_proba(model, images, index[keep], batch_size=max(cfg.train.batch_size, 64),
                              transform=transform)
        pred = predictions_table(sub_rows, probs, eval_kw["classes"], target=cfg.cohort.target)
        write_atomic(run_dir / f"predictions_{name}.csv", pred.to_csv(index=False))
        preds[name] = pred
        out[name] = {
            "predictions": f"predictions_{name}.csv", "metrics": evaluate_predictions(pred, **metric_kw),
            "comparison": compare_predictions(pred, sub_original, classes=eval_kw["classes"],
                                              n_bootstrap=eval_kw["n_bootstrap"], seed=eval_kw["seed"],
                                              level=eval_kw["level"]),
        }
    out["non_lung_vs_lung_only"] = compare_predictions(
        preds["non_lung"], preds["lung_only"], classes=eval_kw["classes"], n_bootstrap=eval_kw["n_bootstrap"],
        seed=eval_kw["seed"], level=eval_kw["level"])
    return out


def _gallery_rows(included: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` test rows for the mask gallery: a third excluded (if any), the rest usable, spread evenly."""
    bad, good = np.flatnonzero(~included), np.flatnonzero(included)
    n_bad = min(len(bad), n // 3 if len(good) else n)
    n_good = min(len(good), n - n_bad)

    def spread(rows: np.ndarray, k: int) -> np.ndarray:
        return rows[np.linspace(0, len(rows) - 1, k).round().astype(int)] if k else rows[:0]

    return np.sort(np.concatenate([spread(good, n_good), spread(bad, n_bad)]))


def _labels_for(prep: Prepared) -> np.ndarray:
    """Labels indexed by cache position (the training data selects images by cache index)."""
    n = int(prep.cohort["cache_index"].max()) + 1
    out = np.full(n, -1, dtype=np.int64)
    out[prep.cohort["cache_index"].to_numpy()] = prep.labels
    return out


def _train_perturbations(cfg: ExperimentConfig) -> Callable | None:
    """``perturb.train`` as one ``transform(batch, indices)``: what the CNN saw, for the reference model."""
    if not cfg.perturb.train:
        return None
    from readingrace.predict import perturbation_transform

    steps = [perturbation_transform(spec) for spec in cfg.perturb.train]

    def transform(x, idx):
        for step in steps:
            x = step(x, idx)
        return x

    return transform

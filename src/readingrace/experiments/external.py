"""Apply a trained run to another cohort (external validation, A1-ext) and the site-by-site matrix.

The model keeps its own preprocessing (image size, perturbations, intensity normalisation); the
other cohort's images are brought to the model's input by ``image.mode`` of the run (``stretch``
resizes each image to a square; ``pad`` pads the shorter side with zeros first, keeping the aspect
ratio), or by ``mode`` when given. Classes are harmonised by name: test images whose class the
model never learnt are dropped and counted, and a model class absent from the other cohort gets NaN.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from readingrace.cohort.build import build_cohort
from readingrace.config import ExperimentConfig, config_from_dict
from readingrace.errors import CohortError, RunError
from readingrace.experiments.rundir import RunLock, clean_nan, write_atomic, write_json


def load_run_config(run_dir: Path) -> ExperimentConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a run folder (no config.yaml): give the folder `readingrace run` wrote")
    data = yaml.safe_load(path.read_text()) or {}
    data.pop("fingerprint", None)
    data.pop("readingrace", None)
    return config_from_dict(data)


def predict_run(run_dir: str | Path, other: ExperimentConfig, *, out: str | Path, data_root: str | Path | None = None,
                mode: str | None = None, all_splits: bool = True,
                say: Callable[[str], None] = print) -> dict[str, Any]:
    """Predict cohort ``other`` with the trained model(s) of ``run_dir``; write predictions and metrics."""
    from readingrace.experiments.run import cache_root
    from readingrace.imaging.cache import build_cache
    from readingrace.predict import predict_proba, predictions_table
    from readingrace.stats.metrics import evaluate_predictions
    from readingrace.train import load_classifier

    run_dir = Path(run_dir)
    trained = load_run_config(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise RunError(f"{run_dir} has no metrics.json: the run has not finished; rerun `readingrace run` first")
    classes = list(json.loads(metrics_path.read_text())["classes"])
    target = trained.cohort.target
    out = Path(out)
    with RunLock(out):
        cohort, manifest = build_cohort(other.cohort, data_root=data_root or other.cohort.data_root)
        if target not in cohort.columns:
            raise CohortError(f"the other cohort has no {target!r} column to compare with the model's classes")
        known = cohort[target].astype(str).isin(classes)
        cohort = manifest.step(f"{target} among the model's classes {classes}", cohort, cohort[known])
        if not all_splits and "split" in cohort:
            cohort = cohort[cohort["split"] == "test"]
        if cohort.empty:
            raise CohortError(f"no image of the other cohort has a {target} the model knows ({classes})")
        cache = build_cache(cohort["path"].tolist(), size=trained.image.size, cache_root=cache_root(trained) / "images",
                            mode=mode or trained.image.mode, dtype=trained.image.cache_dtype,
                            bit_depth=other.image.bit_depth)
        for i, reason in sorted(cache.reasons.items()):
            manifest.skip(cohort["image_id"].iloc[i], reason, stage="image")
        ok = np.asarray(cache.ok, bool)
        index = np.flatnonzero(ok)
        cohort = manifest.step("image decodes", cohort, cohort[ok])
        say(f"external cohort: {len(cohort)} images of {cohort['patient_id'].nunique()} patients")
        per_seed = {}
        for seed in trained.train.seeds:
            model = load_classifier(run_dir / f"seed-{seed}" / "checkpoints" / "best.ckpt")
            probs = predict_proba(model, cache.images, index, batch_size=64)
            pred = predictions_table(cohort, probs, classes, target=target, extra=trained.evaluate.strata)
            write_atomic(out / f"predictions_seed-{seed}.csv", pred.to_csv(index=False))
            per_seed[seed] = evaluate_predictions(pred, classes=classes, n_bootstrap=trained.evaluate.n_bootstrap,
                                                  seed=trained.split.seed, level=trained.evaluate.level,
                                                  threshold=trained.evaluate.threshold,
                                                  strata=[s for s in trained.evaluate.strata if s in pred])
        first = trained.train.seeds[0]
        write_atomic(out / "predictions.csv", (out / f"predictions_seed-{first}.csv").read_text())
        metrics = dict(per_seed[first])
        metrics.update({
            "target": target, "model": trained.model.name, "trained_run": str(run_dir), "trained_on": trained.name,
            "tested_on": other.name, "input_mode": mode or trained.image.mode,
            "seeds": {str(s): {"macro_auc": m["macro_auc"], "macro_auc_ci": m["macro_auc_ci"]} for s, m in per_seed.items()},
        })
        manifest.write(out / "manifest.json")
        metrics = clean_nan(metrics)
        write_json(out / "metrics.json", metrics)
        return metrics


def external_matrix(results: dict[tuple[str, str], dict[str, Any]]) -> pd.DataFrame:
    """Rows: trained on; columns: tested on; cells: macro AUC [CI] (paper Table 4)."""
    from readingrace.report.markdown import fmt_ci

    rows = sorted({a for a, _ in results})
    cols = sorted({b for _, b in results})
    table = pd.DataFrame(index=rows, columns=cols, dtype=object)
    for (a, b), m in results.items():
        table.loc[a, b] = fmt_ci(m.get("macro_auc"), m.get("macro_auc_ci"))
    return table.fillna("")

"""A3 as one run: does a model trained for disease encode the attribute? (paper Table 5)

One patient split (``split.ratios``, the paper's 80/10/10, stratified by ``cohort.target``) shared by
three models, so all are tested on the same images:

1. ``pathology/``: a multi-label disease model (:func:`readingrace.experiments.disease.run_disease`:
   ``disease.labels``, e.g. the 14 findings + No Finding), with its per-finding AUCs and its
   subgroup performance (AUC, TPR, FPR, underdiagnosis per group).
2. Its penultimate features, frozen (eval mode, no gradients), probed for ``cohort.target``: a new
   softmax layer and a logistic regression (C by patient-grouped CV), trained on the training split.
3. ``direct/``: a model trained directly for the target (:func:`run_experiment`, same config).

The run folder's ``metrics.json`` holds the softmax probe's metrics in the usual schema (so the
report's A table lists it) plus ``probes``, ``direct``, ``comparison`` (each probe minus the direct
model, paired bootstrap on the shared test images) and ``pathology``; ``a3.md`` is the full table.
The re-identification model of the paper needs patients with >= 20 images, which most samples lack;
it is run by ``scripts/nih_pathology_probe.py`` on a generated cohort, not here.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from readingrace import __version__
from readingrace.config import ExperimentConfig, config_from_dict
from readingrace.errors import RunError
from readingrace.experiments.rundir import RunLock, clean_nan, write_atomic, write_json

A3_OUTPUTS = ("metrics.json", "a3.md", "predictions.csv", "predictions_logistic.csv")


def run_a3(cfg: ExperimentConfig, *, out: str | Path, data_root: str | Path | None = None, force: bool = False,
           say: Callable[[str], None] = print) -> dict[str, Any]:
    """Pathology model -> frozen-feature probes for the target -> beside a directly trained model."""
    from readingrace.experiments.disease import run_disease
    from readingrace.experiments.run import prepare, run_experiment
    from readingrace.features import extract_features
    from readingrace.multilabel import load_multilabel
    from readingrace.probe import compare_with_direct, probe_markdown, run_probe
    from readingrace.stats.metrics import evaluate_predictions, to_json_dict

    run_dir = Path(out)
    t0 = time.perf_counter()
    from readingrace.cohort.build import build_cohort
    from readingrace.experiments.run import check_data_root, check_same_cohort

    cohort_now, _ = build_cohort(cfg.cohort, data_root=check_data_root(cfg, data_root))  # memoised
    with RunLock(run_dir):
        cfg_path = run_dir / "config.yaml"
        if cfg_path.is_file():
            old = yaml.safe_load(cfg_path.read_text()) or {}
            if old.get("fingerprint") != cfg.fingerprint() and not force:
                raise RunError(f"{run_dir} holds an A3 run of a different config; use another folder or --force")
            if (run_dir / "metrics.json").is_file() and not force:
                for stage in ("direct", "pathology"):  # the same data as when the probes were fitted?
                    check_same_cohort(run_dir / stage, cohort_now, target=cfg.cohort.target)
                say(f"results already in {run_dir}")
                return json.loads((run_dir / "metrics.json").read_text())
        write_atomic(cfg_path, yaml.safe_dump({"kind": "a3", "fingerprint": cfg.fingerprint(),
                                               "readingrace": __version__, **cfg.to_dict()}, sort_keys=False))
    # the three stages lock their own folders; each is reused when already finished
    pathology = run_disease(cfg, out=run_dir / "pathology", data_root=data_root, force=force,
                            say=lambda m: say(f"pathology: {m}"))
    direct_cfg = config_from_dict(copy.deepcopy({**cfg.to_dict(), "name": f"{cfg.name} direct"}))
    direct = run_experiment(direct_cfg, out=run_dir / "direct", data_root=data_root, force=force,
                            say=lambda m: say(f"direct: {m}"))
    with RunLock(run_dir):
        prep = prepare(cfg, data_root=data_root, say=lambda m: None)
        ckpt = run_dir / "pathology" / "model" / "checkpoints" / "best.ckpt"
        if not ckpt.is_file():
            raise RunError(f"{ckpt} is missing: the pathology model did not finish; rerun the same command")
        model = load_multilabel(ckpt)
        feats = extract_features(model, prep.images, prep.cohort["cache_index"].to_numpy())
        target = cfg.cohort.target
        res = run_probe(feats, prep.cohort, target=target, split=prep.cohort["split"], seed=cfg.split.seed,
                        n_bootstrap=cfg.evaluate.n_bootstrap, level=cfg.evaluate.level,
                        split_note=f"the pathology model's own patient split {list(cfg.split.ratios)} (stratified "
                                   f"by {target}, seed {cfg.split.seed}): the probes train on its training images "
                                   "and are tested on images no model saw")
        direct_pred = pd.read_csv(run_dir / "direct" / "predictions.csv", dtype={"image_id": str, "patient_id": str})
        direct_m = evaluate_predictions(direct_pred, classes=res.classes, n_bootstrap=cfg.evaluate.n_bootstrap,
                                        seed=cfg.split.seed, level=cfg.evaluate.level)
        comparison = compare_with_direct(res, direct_pred, n_bootstrap=cfg.evaluate.n_bootstrap,
                                         seed=cfg.split.seed, level=cfg.evaluate.level)
        for name, pred in res.predictions.items():
            fname = "predictions.csv" if name == "softmax" else f"predictions_{name}.csv"
            write_atomic(run_dir / fname, pred.to_csv(index=False))
        feature_model = f"{cfg.model.name} trained on {len(pathology.get('labels', []))} findings"
        md = ["# A3: does a disease model encode " + target + "?", "",
              probe_markdown(res, feature_model=feature_model, direct=direct_m,
                             direct_name=f"{cfg.model.name} trained directly for {target}", comparison=comparison),
              (f"- pathology model: mean per-finding test AUC {_num(pathology.get('mean_auc'))} "
               "([per finding and subgroups](pathology/report.md))"), ""]
        first = next(iter(res.metrics))
        metrics: dict[str, Any] = dict(to_json_dict(res.metrics[first]))
        metrics.update({
            "target": target, "classes": res.classes, "model": cfg.model.name, "image_size": cfg.image.size,
            "feature_model": feature_model, "probe_reported": first,
            "probes": to_json_dict(res.metrics), "probe_info": to_json_dict(res.info),
            "direct": {"macro_auc": direct_m["macro_auc"], "macro_auc_ci": direct_m["macro_auc_ci"],
                       "run": "direct", "seconds": (direct.get("run") or {}).get("seconds")},
            "comparison": to_json_dict(comparison),
            "pathology": {"mean_auc": pathology.get("mean_auc"), "labels": pathology.get("labels"),
                          "underdiagnosis": pathology.get("underdiagnosis"), "run": "pathology"},
            "run": {"name": cfg.name, "fingerprint": cfg.fingerprint(), "readingrace": __version__,
                    "seconds": round(time.perf_counter() - t0, 1)},
        })
        write_atomic(run_dir / "a3.md", "\n".join(md))
        metrics = clean_nan(metrics)
        write_json(run_dir / "metrics.json", metrics)
        say(f"A3: {first} probe on pathology features {_num(metrics.get('macro_auc'))}, "
            f"direct model {_num(direct_m['macro_auc'])}")
        return metrics


def _num(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):.3f}"

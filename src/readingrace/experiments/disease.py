"""A disease (pathology) model and its subgroup performance: ``readingrace disease CONFIG``.

cohort -> patient split (``split.ratios``, stratified by ``cohort.target``) -> image cache ->
multi-label model (``model.name``, ``train``; :func:`readingrace.multilabel.train_multilabel`, the
first of ``train.seeds``) -> validation and test predictions -> per-finding test AUC with
patient-bootstrap CIs -> subgroup tables (:func:`readingrace.stats.subgroups.subgroup_performance`:
AUC, TPR, FPR, underdiagnosis per group of ``disease.groups``, differences with CIs) -> forest
figures -> ``metrics.json`` and ``report.md``.

The operating threshold of each finding is chosen on the validation split over all its patients
(``disease.operating_point``: ``youden`` or ``f1``) or fixed, and the same threshold is used for
every group. Run folders behave like ``readingrace run``'s: a lock, atomic writes, a folder holding
another config is refused, and a finished run is reported again without recomputation (a trained
model is reused; an interrupted one resumes).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from readingrace import __version__
from readingrace.cohort.schema import CHEXPERT_LABELS, NIH_LABELS
from readingrace.config import DiseaseConfig, ExperimentConfig
from readingrace.errors import CohortError, RunError, SplitError
from readingrace.experiments.rundir import RunLock, clean_nan, write_atomic, write_json

SCHEMA = "readingrace.disease/1"
KIND = "disease"
#: Standard label sets, each with "No Finding" (the underdiagnosis label).
LABEL_SETS: dict[str, tuple[str, ...]] = {
    "nih": (*NIH_LABELS, "No Finding"),
    "chexpert": CHEXPERT_LABELS,
}
#: Cohort columns copied into the predictions tables (besides ids, split and the groups asked for).
CONTEXT_COLUMNS: tuple[str, ...] = ("sex", "age", "age_group", "race", "view", "dataset")
#: Files a disease run writes; ``--force`` removes exactly these (and ``model/``), nothing else.
DISEASE_OUTPUTS: tuple[str, ...] = (
    "cohort.csv", "manifest.json", "predictions.csv", "val_predictions.csv", "per_finding.csv", "subgroups.csv",
    "subgroup_differences.csv", "subgroups.md", "subgroups.json", "metrics.json", "report.md")

__all__ = ["DISEASE_OUTPUTS", "LABEL_SETS", "SCHEMA", "disease_labels", "run_disease"]


def disease_labels(cfg: DiseaseConfig) -> list[str]:
    """The finding columns of the model: a standard set by name, or the configured list."""
    if isinstance(cfg.labels, str):
        return list(LABEL_SETS[cfg.labels])
    return list(dict.fromkeys(cfg.labels))


def _group_columns(spec: str) -> list[str]:
    return [c.strip() for c in spec.split("+")]


def _check_run_dir(run_dir: Path, cfg: ExperimentConfig, force: bool) -> dict[str, Any] | None:
    """Existing results of the same disease config (or None); refuse a folder holding anything else."""
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        return None
    old = yaml.safe_load(cfg_path.read_text()) or {}
    if force:
        for name in DISEASE_OUTPUTS:
            (run_dir / name).unlink(missing_ok=True)
        for fig in run_dir.glob("subgroups_*.png"):
            fig.unlink()
        if (run_dir / "model").is_dir():
            shutil.rmtree(run_dir / "model")
        return None
    if old.get("kind") != KIND:
        raise RunError(f"{run_dir} holds a `readingrace {old.get('kind', 'run')}` run, not a disease run; use --out "
                       "for a new folder or --force to replace it")
    if old.get("fingerprint") != cfg.fingerprint():
        raise RunError(f"{run_dir} holds a run of a different config (fingerprint {old.get('fingerprint')}, "
                       f"this one {cfg.fingerprint()}); use --out for a new folder or --force to replace it")
    metrics = run_dir / "metrics.json"
    return json.loads(metrics.read_text()) if metrics.exists() else None


def _predictions_table(rows: pd.DataFrame, probs: np.ndarray, values: np.ndarray, labels: list[str],
                       extra: list[str]) -> pd.DataFrame:
    """image_id, patient_id, study_id, split, context/group columns, then label_<f> (1/0/-1/blank) and prob_<f>."""
    out = pd.DataFrame({c: rows[c].to_numpy() for c in ("image_id", "patient_id", "study_id", "split")})
    for c in extra:
        if c in rows.columns and c not in out.columns:
            out[c] = rows[c].to_numpy()
    for j, f in enumerate(labels):
        out[f"label_{f}"] = pd.array(values[:, j], dtype="Float64").astype("Int64")
        out[f"prob_{f}"] = probs[:, j].astype(np.float64)
    return out


def _groups_to_report(cfg: DiseaseConfig, test: pd.DataFrame) -> tuple[list[str], list[dict[str, str]]]:
    """The configured groups that the test images have values for; the others as recorded skips."""
    kept, skipped = [], []
    for spec in cfg.groups:
        cols = _group_columns(spec)
        absent = [c for c in cols if c not in test.columns]
        if absent:
            skipped.append({"group": spec, "reason": f"column(s) {absent} not in the cohort"})
        elif any(test[c].isna().all() for c in cols):
            empty = [c for c in cols if test[c].isna().all()]
            skipped.append({"group": spec, "reason": f"column(s) {empty} not recorded for any test image"})
        else:
            kept.append(spec)
    if not kept:
        raise CohortError(f"none of disease.groups {cfg.groups} can be reported: "
                          + "; ".join(f"{s['group']}: {s['reason']}" for s in skipped))
    return kept, skipped


def run_disease(cfg: ExperimentConfig, *, out: str | Path | None = None, data_root: str | Path | None = None,
                force: bool = False, progress: bool = False, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a disease model and report its subgroup performance (or report a finished run again)."""
    dcfg = cfg.disease
    labels = disease_labels(dcfg)
    run_dir = Path(out) if out else (Path(cfg.out) if cfg.out else Path("runs") / cfg.name)
    t_start = time.perf_counter()
    from readingrace.cohort.build import build_cohort
    from readingrace.experiments.run import check_data_root, check_same_cohort, has_results

    cohort_now, _ = build_cohort(cfg.cohort, data_root=check_data_root(cfg, data_root))  # memoised
    with RunLock(run_dir):
        existing = _check_run_dir(run_dir, cfg, force)
        if not force and has_results(run_dir):  # a finished or interrupted run of this config: the same data?
            check_same_cohort(run_dir, cohort_now, target=cfg.cohort.target)
        if existing is not None:
            say(f"results already in {run_dir} (use --force to redo)")
            for row in (existing.get("subgroups") or {}).get("by_group", []):
                if row.get("metric") == "underdiagnosis_rate":
                    say(f"underdiagnosis {row['attribute']}={row['group']}: "
                        f"{_fmt(row['estimate'], row['ci_low'], row['ci_high'])}")
            return existing
        from readingrace.experiments.run import prepare
        from readingrace.multilabel import (
            evaluate_multilabel,
            label_matrix,
            load_multilabel,
            predict_multilabel,
            train_multilabel,
        )
        from readingrace.stats.subgroups import subgroup_performance, write_subgroups

        write_atomic(run_dir / "config.yaml", yaml.safe_dump(
            {"kind": KIND, "fingerprint": cfg.fingerprint(), "readingrace": __version__, **cfg.to_dict()},
            sort_keys=False))
        prep = prepare(cfg, data_root=data_root, say=say)
        cohort = prep.cohort
        values_rows = label_matrix(cohort, labels)          # validated before any training
        write_atomic(run_dir / "cohort.csv", cohort.to_csv(index=False))
        prep.manifest.write(run_dir / "manifest.json")
        tr, va, te = prep.index("train"), prep.index("val"), prep.index("test")
        if len(te) == 0 or len(va) == 0:
            raise SplitError(f"split.ratios {cfg.split.ratios}: the validation and test splits must both hold "
                             "images (the threshold is chosen on validation, the subgroups measured on test)")
        groups, skipped = _groups_to_report(dcfg, cohort.iloc[te])
        for s in skipped:
            say(f"group {s['group']} not reported: {s['reason']}")
        cache_idx = cohort["cache_index"].to_numpy()
        values = np.full((len(prep.images), len(labels)), np.nan, dtype=np.float32)
        values[cache_idx] = values_rows
        seed = cfg.train.seeds[0]
        say(f"training {cfg.model.name} on {len(labels)} findings (seed {seed}, {len(tr)} train / {len(va)} val "
            f"images, {cfg.image.size} px, uncertain labels: {dcfg.policy})")
        result = train_multilabel(images=prep.images, values=values, train_index=cache_idx[tr],
                                  val_index=cache_idx[va], label_names=labels, arch=cfg.model.name, cfg=cfg.train,
                                  seed=seed, out_dir=run_dir / "model", policy=dcfg.policy,
                                  weights=cfg.model.weights, progress=progress)
        model = load_multilabel(run_dir / "model" / result.best_checkpoint)
        batch = max(cfg.train.batch_size, 64)
        extra = list(dict.fromkeys([*CONTEXT_COLUMNS, *(c for g in groups for c in _group_columns(g))]))
        tables = {}
        for name, part in (("val", va), ("test", te)):
            probs = predict_multilabel(model, prep.images, cache_idx[part], batch_size=batch)
            tables[name] = _predictions_table(cohort.iloc[part], probs, values_rows[part], labels, extra)
        write_atomic(run_dir / "val_predictions.csv", tables["val"].to_csv(index=False))
        write_atomic(run_dir / "predictions.csv", tables["test"].to_csv(index=False))

        n_boot, level, boot_seed = cfg.evaluate.n_bootstrap, cfg.evaluate.level, cfg.split.seed
        test_probs = tables["test"][[f"prob_{f}" for f in labels]].to_numpy()
        per_finding = evaluate_multilabel(cohort.iloc[te], test_probs, values_rows[te], labels,
                                          n_bootstrap=n_boot, seed=boot_seed, level=level)
        write_atomic(run_dir / "per_finding.csv", per_finding.to_csv(index=False))
        say(f"test AUC, mean over {int(per_finding['auc'].notna().sum())} findings with positives: "
            f"{np.nanmean(per_finding['auc']):.3f} ({result.epochs} epochs, {result.seconds:.0f} s)")

        op = dcfg.operating_point
        threshold_kw: dict[str, Any] = (
            {"threshold": float(op)} if not isinstance(op, str)
            else {"val_predictions": tables["val"], "threshold_rule": op})
        sub = subgroup_performance(
            tables["test"], findings=labels, groups=groups, no_finding=dcfg.no_finding,
            reference=dict(dcfg.reference) or None, all_pairs=dcfg.all_pairs, n_bootstrap=n_boot, seed=boot_seed,
            level=level, source="test predictions", **threshold_kw)
        files = write_subgroups(sub, run_dir)
        for row in sub.metric("underdiagnosis_rate").itertuples():
            say(f"underdiagnosis {row.attribute}={row.group}: {_fmt(row.estimate, row.ci_low, row.ci_high)} "
                f"({row.n_denominator} images with a finding)")

        metrics: dict[str, Any] = {
            "schema": SCHEMA, "labels": labels, "policy": dcfg.policy, "no_finding": dcfg.no_finding,
            "model": cfg.model.name, "image_size": cfg.image.size, "seed": seed,
            "split": {"ratios": list(cfg.split.ratios), "seed": cfg.split.seed, "stratified_by": cfg.cohort.target,
                      "images": {s: int((cohort["split"] == s).sum()) for s in ("train", "val", "test")},
                      "patients": {s: int(cohort.loc[cohort["split"] == s, "patient_id"].nunique())
                                   for s in ("train", "val", "test")}},
            "training": {"epochs": result.epochs, "best_val_loss": result.best_val_loss, "seconds": result.seconds,
                         "resumed_from_epoch": result.resumed_from_epoch},
            "per_finding": per_finding.to_dict("records"),
            "mean_auc": float(np.nanmean(per_finding["auc"])) if per_finding["auc"].notna().any() else None,
            "operating_point": op, "thresholds": sub.thresholds, "threshold_source": sub.threshold_source,
            "underdiagnosis": sub.underdiagnosis, "groups": groups, "groups_skipped": skipped,
            "subgroups": sub.to_dict(),
            "files": {k: str(Path(v).relative_to(run_dir)) for k, v in files.items()},
            "run": {"name": cfg.name, "fingerprint": cfg.fingerprint(), "readingrace": __version__,
                    "seconds": round(time.perf_counter() - t_start, 1)},
        }
        metrics = clean_nan(metrics)
        write_json(run_dir / "metrics.json", metrics)
        write_atomic(run_dir / "report.md", disease_report(cfg, metrics, sub, per_finding))
        say(f"wrote {run_dir / 'report.md'}")
        return metrics


def _fmt(est: Any, lo: Any, hi: Any) -> str:
    from readingrace.report.markdown import fmt_ci

    def clean(v: Any) -> Any:
        return None if v is None or (isinstance(v, float) and not np.isfinite(v)) else v

    return fmt_ci(clean(est), [clean(lo), clean(hi)])


def disease_report(cfg: ExperimentConfig, metrics: dict[str, Any], sub: Any, per_finding: pd.DataFrame) -> str:
    """The run's report.md: settings, per-finding AUC, subgroup tables and figures, limits. No patient ids."""
    from readingrace.stats.subgroups import SMALL_DENOMINATOR, subgroups_markdown

    sp = metrics["split"]
    tr = metrics["training"]
    pct = round(cfg.evaluate.level * 100)
    lines = [f"# {cfg.name}: disease model and subgroup performance", ""]
    if cfg.description:
        lines += [cfg.description.strip(), ""]
    lines += [
        (f"- model: {cfg.model.name} at {cfg.image.size} px, {len(metrics['labels'])} findings, uncertain labels "
         f"`{metrics['policy']}` in training (test metrics use certain labels only: 1 vs 0), seed {metrics['seed']}"),
        f"- split by patient {sp['ratios']} (seed {sp['seed']}, stratified by {sp['stratified_by']}): "
        + ", ".join(f"{s} {sp['images'][s]} images / {sp['patients'][s]} patients" for s in ("train", "val", "test")),
        f"- training: {tr['epochs']} epochs, {tr['seconds']:.0f} s, best validation loss {tr['best_val_loss']:.4f}",
        f"- operating threshold: {metrics['threshold_source']}",
        f"- underdiagnosis rate: {metrics['underdiagnosis']}",
        f"- intervals: {pct}% patient-clustered bootstrap, {cfg.evaluate.n_bootstrap} replicates",
        "",
        "## Per-finding test AUC", "",
        f"† fewer than {SMALL_DENOMINATOR} positives: the interval is unreliable.", "",
        "| finding | AUC [CI] | positives / negatives | threshold |", "|---|---|---|---|",
    ]
    for r in per_finding.itertuples():
        t = metrics["thresholds"].get(r.label)
        auc = _fmt(r.auc, r.auc_ci_low, r.auc_ci_high) if np.isfinite(r.auc) else "n/a (no positives or negatives)"
        if np.isfinite(r.auc) and min(r.n_positive, r.n_negative) < SMALL_DENOMINATOR:
            auc += " †"
        lines.append(f"| {r.label} | {auc} | {r.n_positive} / {r.n_negative} | "
                     f"{'n/a' if t is None else f'{t:.3f}'} |")
    lines += ["", subgroups_markdown(sub, heading="##")]
    for key, path in metrics["files"].items():
        if key.startswith("figure:"):
            lines += [f"![{key[7:]}]({path})", ""]
    if metrics["groups_skipped"]:
        lines += ["Groups not reported: " + "; ".join(f"{s['group']} ({s['reason']})"
                                                      for s in metrics["groups_skipped"]), ""]
    lines += [
        "## Reading these numbers", "",
        (f"Each interval is a {pct}% patient-clustered bootstrap interval; a difference whose interval contains 0 "
         "is not distinguishable from no difference at this sample size, which is not evidence of equal performance. "
         f"With {sp['images']['test']} test images, groups and rare findings hold few positives, so many intervals "
         "are wide; rows with fewer than 10 images in their denominator are listed in the notes. One threshold per "
         "finding serves every group. No correction for multiple comparisons is applied."), "",
        (f"Wall time {metrics['run']['seconds']:.0f} s (readingrace {metrics['run']['readingrace']}, fingerprint "
         f"{metrics['run']['fingerprint']})."), "",
    ]
    return "\n".join(lines)

"""The run report: cohort table, exclusion flow, per-class metrics with CIs, ROC curves, curves.

Reads what the run wrote; never trains. Patient identifiers never appear in a report.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from readingrace.cohort.manifest import Manifest
from readingrace.config import ExperimentConfig
from readingrace.experiments.rundir import write_atomic


def fmt(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def fmt_ci(value: Any, ci: Sequence[Any] | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if not ci or ci[0] is None:
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"


def md_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def cohort_table(cohort: pd.DataFrame, target: str) -> pd.DataFrame:
    """Images (patients) per split and class."""
    rows = []
    for split in ("train", "val", "test"):
        part = cohort[cohort["split"] == split]
        if part.empty:
            continue
        row = {"split": split, "images": len(part), "patients": part["patient_id"].nunique()}
        for cls, g in part.groupby(target):
            row[str(cls)] = f"{len(g)} ({g['patient_id'].nunique()})"
        rows.append(row)
    return pd.DataFrame(rows).fillna("0 (0)")


def demographics_table(cohort: pd.DataFrame, target: str) -> pd.DataFrame:
    """Table 1: sex, age group and view by class (images, % within class)."""
    rows = []
    for col in ("sex", "age_group", "view", "race"):
        if col == target or col not in cohort or cohort[col].isna().all():
            continue
        tab = pd.crosstab(cohort[col].fillna("missing"), cohort[target])
        pct = tab / tab.sum(axis=0) * 100
        for level in tab.index:
            rows.append({"variable": col, "level": level,
                         **{str(c): f"{tab.loc[level, c]} ({pct.loc[level, c]:.0f}%)" for c in tab.columns}})
    return pd.DataFrame(rows)


REFERENCE_AUC = "reference AUC [95% CI]"
REFERENCE_DIFF = "CNN - reference [95% CI]"


def metrics_table(metrics: dict[str, Any], reference: dict[str, Any] | None = None,
                  comparison: dict[str, Any] | None = None) -> pd.DataFrame:
    """Per class (and macro): AUC, sensitivity, specificity; with ``reference`` (the thumbnail model's
    metrics) its AUC beside the CNN's, with ``comparison`` (``cnn_vs_reference``) the paired difference."""
    rows = []
    diffs = (comparison or {}).get("per_class") or {}
    for cls, m in metrics["per_class"].items():
        row = {"class": cls, "n pos / neg": f"{m['n_positive']} / {m['n_negative']}",
               "AUC [95% CI]": fmt_ci(m["auc"], m.get("auc_ci")),
               "sensitivity": fmt_ci(m["sensitivity"], m.get("sensitivity_ci")),
               "specificity": fmt_ci(m["specificity"], m.get("specificity_ci"))}
        if reference:
            r = reference["per_class"][cls]
            row[REFERENCE_AUC] = fmt_ci(r["auc"], r.get("auc_ci"))
        if comparison:
            d = diffs.get(cls) or {}
            row[REFERENCE_DIFF] = fmt_ci(d.get("difference"), d.get("difference_ci"))
        rows.append(row)
    macro = {"class": "**macro**", "n pos / neg": "", "AUC [95% CI]": fmt_ci(metrics["macro_auc"], metrics.get("macro_auc_ci")),
             "sensitivity": "", "specificity": ""}
    if reference:
        macro[REFERENCE_AUC] = fmt_ci(reference["macro_auc"], reference.get("macro_auc_ci"))
    if comparison:
        macro[REFERENCE_DIFF] = fmt_ci(comparison.get("macro_difference"), comparison.get("macro_difference_ci"))
    rows.append(macro)
    return pd.DataFrame(rows)


def test_time_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """Macro AUC [CI] of the run's first model on each changed version of the test images."""
    loc = metrics.get("localisation") or {}
    items = [(label, tp) for label, tp in (metrics.get("test_perturbations") or {}).items()]
    if loc.get("occlusion"):
        items.append((f"hot-box occlusion (heat >= {loc['occlusion'].get('threshold')})", loc["occlusion"]))
    lungs = loc.get("lungs") or {}
    for key, label in (("original", "images with a usable lung mask"), ("lung_only", "lung-only"),
                       ("non_lung", "non-lung")):
        if lungs.get(key):
            items.append((label, lungs[key]))
    rows = []
    for label, tp in items:
        m, c = tp.get("metrics") or {}, tp.get("comparison") or {}
        rows.append({"test images": label, "n": m.get("n_images"),
                     "macro AUC [95% CI]": fmt_ci(m.get("macro_auc"), m.get("macro_auc_ci")),
                     "minus unchanged [95% CI]": fmt_ci(c.get("macro_difference"), c.get("macro_difference_ci"))
                     if c else ""})
    return pd.DataFrame(rows)


def strata_table(metrics: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for stratum, levels in (metrics.get("strata") or {}).items():
        for level, m in levels.items():
            rows.append({"stratum": stratum, "level": level, "images": m.get("n_images"),
                         "patients": m.get("n_patients"),
                         "macro AUC [95% CI]": fmt_ci(m.get("macro_auc"), m.get("macro_auc_ci")),
                         **{f"AUC {c}": fmt(v["auc"]) for c, v in m["per_class"].items()}})
    return pd.DataFrame(rows)


def plot_roc(pred: pd.DataFrame, classes: Sequence[str], path: Path, *, reference: pd.DataFrame | None = None,
             title: str = "") -> None:
    """One-vs-rest ROC curve per class (reference model dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, cls in enumerate(classes):
        y = (pred["label"].astype(str) == str(cls)).to_numpy()
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, pred[f"prob_{cls}"])
        ax.plot(fpr, tpr, color=colours[k % len(colours)], label=f"{cls} (CNN)")
        if reference is not None:
            fpr, tpr, _ = roc_curve(y, reference[f"prob_{cls}"])
            ax.plot(fpr, tpr, color=colours[k % len(colours)], ls="--", alpha=0.7, label=f"{cls} (reference)")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title or "ROC, one-vs-rest",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(run_dir: Path, seeds: Sequence[int], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from readingrace.train import history

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    drawn = False
    for seed in seeds:
        h = history(run_dir / f"seed-{seed}")
        for col, ls in (("train_loss", "-"), ("val_loss", "--")):
            if col in h:
                ax.plot(h["epoch"], h[col], ls=ls, label=f"{col} (seed {seed})")
                drawn = True
    ax.set(xlabel="epoch", ylabel="cross-entropy", title="training curves")
    ax.legend(fontsize=7)
    fig.tight_layout()
    if drawn:
        fig.savefig(path)
    plt.close(fig)
    return drawn


def write_run_report(run_dir: Path, *, cfg: ExperimentConfig, cohort: pd.DataFrame, manifest: Manifest,
                     metrics: dict[str, Any]) -> Path:
    """Write ``report.md`` (+ ``roc.png``, ``curves.png``) into the run folder."""
    target = cfg.cohort.target
    classes = metrics["classes"]
    pred = pd.read_csv(run_dir / "predictions.csv", dtype={"label": str})
    ref_path = run_dir / "reference_predictions.csv"
    ref = pd.read_csv(ref_path, dtype={"label": str}) if ref_path.exists() else None
    plot_roc(pred, classes, run_dir / "roc.png", reference=ref, title=f"{target}: {cfg.model.name}, test split")
    has_curves = plot_curves(run_dir, cfg.train.seeds, run_dir / "curves.png")
    ci = metrics.get("ci", {})
    flow = manifest.flow_table()
    lines = [
        f"# {cfg.name}: predicting {target} from images",
        "",
        cfg.description or "",
        "",
        (f"Model **{cfg.model.name}** at {cfg.image.size} px ({'pretrained: ' + Path(cfg.model.weights).name if cfg.model.weights else 'random initialisation'}), "
        f"source `{cfg.cohort.source}`, patient split {cfg.split.ratios} (seed {cfg.split.seed}), "
        f"training seed(s) {cfg.train.seeds}. Test-set results; 95% CIs by "
        f"{ci.get('method', 'patient-clustered bootstrap')} ({ci.get('n_bootstrap', '?')} replicates)."),
        "",
        "## Cohort",
        "",
        "Images (patients) per split and class:",
        "",
        md_table(cohort_table(cohort, target)),
        "",
    ]
    demo = demographics_table(cohort, target)
    if not demo.empty:
        lines += ["Characteristics by class (images, % of the class):", "", md_table(demo), ""]
    if not flow.empty:
        lines += ["Exclusion flow:", "", md_table(flow[["step", "images_before", "patients_before", "images_after",
                                                        "patients_after", "detail"]]), ""]
    if manifest.skip_counts():
        lines += [skips_text(manifest), ""]
    lines += ["## Results on the test split", "",
              md_table(metrics_table(metrics, metrics.get("reference"), metrics.get("cnn_vs_reference"))), ""]
    if metrics.get("reference"):
        r = metrics["reference"]
        lines += [(f"Reference: {r.get('name')} (C = {r.get('C'):g}, chosen on validation). A CNN that does no better "
                  "than the reference has found nothing beyond coarse intensity and shape."), ""]
        cmp_ = metrics.get("cnn_vs_reference")
        if cmp_:
            lines += [(f"CNN minus reference, macro AUC (paired, same test images): "
                      f"{fmt_ci(cmp_.get('macro_difference'), cmp_.get('macro_difference_ci'))}."), ""]
    seeds = metrics.get("seeds") or {}
    if len(seeds) > 1:
        s = metrics["seed_summary"]
        lines += [(f"Over {s['n']} training seeds: macro AUC mean {fmt(s['macro_auc_mean'])} "
                  f"(range {fmt(s['macro_auc_min'])}-{fmt(s['macro_auc_max'])}); the table above is seed "
                  f"{s['reported_seed']}."), "",
                  md_table(pd.DataFrame([{"seed": k, "macro AUC [95% CI]": fmt_ci(v["macro_auc"], v["macro_auc_ci"]),
                                          "epochs": v["training"]["epochs"]} for k, v in seeds.items()])), ""]
    tt = test_time_table(metrics)
    if not tt.empty:
        lines += ["## The same model on changed test images", "",
                  ("Test-time perturbations (C2 noise and blur), the hot-box occlusion and the lung-only / non-lung "
                   "images (C3), each with the paired difference from the unchanged test images:"), "",
                  md_table(tt), ""]
        lungs = (metrics.get("localisation") or {}).get("lungs") or {}
        if lungs.get("non_lung_vs_lung_only"):
            c = lungs["non_lung_vs_lung_only"]
            lines += [(f"Non-lung minus lung-only, macro AUC (paired): "
                       f"{fmt_ci(c.get('macro_difference'), c.get('macro_difference_ci'))}. Lung masks: "
                       f"{lungs.get('mask_source', '?')}"
                       + (f" (U-Net held-out Dice {fmt(lungs['unet'].get('heldout_dice_mean'))})"
                          if (lungs.get("unet") or {}).get("heldout_dice_mean") is not None else "")
                       + f"; {lungs.get('n_excluded', 0)} of {lungs.get('n_test_images', '?')} test images excluded "
                       f"by the quality rule {lungs.get('excluded') or ''}."), ""]
    st = strata_table(metrics)
    if not st.empty:
        lines += ["## Within strata", "", ("The same model evaluated within each stratum of the test split "
                  "(a stratum with one class has no AUC):"), "", md_table(st), ""]
    lines += ["## Figures", "", "![ROC curves](roc.png)", ""]
    if has_curves:
        lines += ["![training curves](curves.png)", ""]
    from readingrace.report.figures import plot_slice_position

    if plot_slice_position(metrics, run_dir / "slice_position.png", title=f"{target}: AUC by slice position"):
        lines += [("AUC by slice position (CT; decile 0 = most inferior tenth of each series; the paper's "
                   "slice-wise results):"), "", "![AUC by slice position](slice_position.png)", ""]
    warnings_ = list(manifest.warnings) + list(metrics.get("warnings") or [])
    if warnings_:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warnings_] + [""]
    degenerate = {k: v for k, v in (ci.get("degenerate") or {}).items() if v}
    if degenerate:
        lines += [f"Degenerate bootstrap replicates (one class absent, excluded from the CI): {degenerate}", ""]
    path = run_dir / "report.md"
    write_atomic(path, "\n".join(lines))
    return path


def skips_text(manifest) -> str:
    """Skipped files and patients, counted by reason (never listed: items can hold patient ids)."""
    return "Skipped by reason: " + "; ".join(f"{k}: {v}" for k, v in manifest.skip_counts().items())

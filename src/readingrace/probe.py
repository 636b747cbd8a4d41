"""Probes: does a frozen model's feature space encode race, sex or age, and how strongly?

Two probes on the same frozen features (rows aligned with a cohort table):

- ``softmax`` (:func:`linear_probe`, the paper's A3): a newly initialised softmax layer
  (``nn.Linear`` + cross-entropy) on standardised features, full-batch Adam, early stopping on the
  validation loss (the best epoch's weights are kept).
- ``logistic`` (:func:`logistic_probe`): scikit-learn logistic regression on standardised features,
  ``C`` chosen by cross-validation grouped by patient (:class:`~sklearn.model_selection.StratifiedGroupKFold`,
  ROC-AUC); it fits on train + val, since the cross-validation takes the place of a validation split.

Split rules (:func:`run_probe`): probe splits are always patient-disjoint (checked). The audit
(:func:`run_audit`) of a checkpoint from a readingrace run reuses that run's patient split for every
target, so the probe never tests on patients the feature model trained on; for other models it
says the feature model's patients are unknown. For a
re-identification model the probe by default uses only patients the re-identification model never
saw (``reid_variant="unseen"``); the paper's variant, probing on the re-identification patients
themselves, is ``reid_variant="paper"`` and is flagged in the output.

:func:`run_audit` is the audit of any model (the ``readingrace probe`` command): features from a
checkpoint, a user's ``package.module:function`` or a saved file, probes per target, and a
comparison with a model trained directly for the target when its predictions are given.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from readingrace.cohort.schema import patient_key
from readingrace.errors import CohortError, ConfigError, SplitError
from readingrace.experiments.rundir import RunLock, refuse_foreign_folder, write_atomic
from readingrace.split import check_no_leakage, split_patients
from readingrace.threads import threads_for

PROBES: tuple[str, ...] = ("softmax", "logistic")
PROBE_TEXT = {
    "softmax": "new softmax layer on frozen penultimate features (Adam, early stopping on val loss)",
    "logistic": "logistic regression, C by patient-grouped CV on train+val",
}
DEFAULT_CS = np.logspace(-4, 2, 13)
DEFAULT_PROBE_RATIOS: tuple[float, float, float] = (0.6, 0.1, 0.3)
MAX_CLASSES = 20
REID_VARIANTS = {
    "unseen": "probe on patients the re-identification model never saw (default)",
    "paper": ("PAPER VARIANT: probe on the re-identification patients themselves; the feature extractor was "
              "trained on their images (patient-disjoint probe split among them)"),
}


# --------------------------------------------------------------------------------------------
# the two probes
# --------------------------------------------------------------------------------------------
def _check_features(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ConfigError(f"features must be a 2-D array (images x features), got shape {x.shape}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise CohortError(f"{int(bad.sum())} feature row(s) hold NaN or infinite values (first at row "
                          f"{int(np.flatnonzero(bad)[0])}); the model produced invalid features")
    return x


def linear_probe(
    features: np.ndarray, labels: np.ndarray, *, train_index: np.ndarray, val_index: np.ndarray,
    test_index: np.ndarray, classes: Sequence[str], seed: int = 2021, epochs: int = 500, lr: float = 1e-2,
    weight_decay: float = 0.0, patience: int = 20,
) -> tuple[np.ndarray, dict[str, Any]]:
    """A new softmax layer on standardised features; test probabilities (len(test_index), K) and details.

    ``labels`` are class codes 0..K-1 (K = len(classes)) aligned with ``features``. Full-batch Adam;
    after each epoch the validation loss is computed and training stops after ``patience`` epochs
    without improvement; the best epoch's weights make the test predictions. Seeded and
    deterministic; the global torch RNG state is left untouched.
    """
    x = _check_features(features)
    y = np.asarray(labels, dtype=np.int64)
    tr, va, te = (np.asarray(i, dtype=np.int64) for i in (train_index, val_index, test_index))
    k = len(classes)
    if len(va) == 0:
        raise SplitError("the softmax probe needs a validation split for early stopping (ratios with 3 parts)")
    missing = sorted(set(range(k)) - set(y[tr].tolist()))
    if missing:
        raise SplitError(f"class(es) {[classes[i] for i in missing]} have no image in the probe's training split")
    scaler = StandardScaler().fit(x[tr])
    xt = {n: torch.from_numpy(scaler.transform(x[i]).astype(np.float32)) for n, i in (("tr", tr), ("va", va), ("te", te))}
    ytr, yva = torch.from_numpy(y[tr]), torch.from_numpy(y[va])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = nn.Linear(x.shape[1], k)
    with threads_for(x.shape[0] * x.shape[1]):
        probs, best_epoch, epoch, best_loss = _fit_softmax(layer, xt, ytr, yva, epochs=epochs, lr=lr,
                                                           weight_decay=weight_decay, patience=patience)
    return probs, {"probe": "softmax", "description": PROBE_TEXT["softmax"], "epochs_run": epoch,
                   "best_epoch": best_epoch, "best_val_loss": best_loss, "lr": lr, "weight_decay": weight_decay,
                   "patience": patience, "n_features": int(x.shape[1]), "fit_on": "train",
                   "n_train": int(len(tr)), "n_val": int(len(va))}


def _fit_softmax(layer: nn.Linear, xt: Mapping[str, torch.Tensor], ytr: torch.Tensor, yva: torch.Tensor, *,
                 epochs: int, lr: float, weight_decay: float, patience: int) -> tuple[np.ndarray, int, int, float]:
    opt = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=weight_decay)
    best_loss, best_epoch, best_state, stale = math.inf, -1, None, 0
    epoch = 0
    for epoch in range(1, epochs + 1):
        layer.train()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(layer(xt["tr"]), ytr)
        loss.backward()
        opt.step()
        with torch.no_grad():
            val_loss = float(nn.functional.cross_entropy(layer(xt["va"]), yva))
        if val_loss < best_loss - 1e-6:
            best_loss, best_epoch, stale = val_loss, epoch, 0
            best_state = {n: p.detach().clone() for n, p in layer.state_dict().items()}
        else:
            stale += 1
            if stale >= patience:
                break
    layer.load_state_dict(best_state)
    with torch.no_grad():
        probs = torch.softmax(layer(xt["te"]), dim=1).numpy().astype(np.float64)
    return probs, best_epoch, epoch, best_loss


def logistic_probe(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, train_index: np.ndarray,
    test_index: np.ndarray, Cs: Sequence[float] = DEFAULT_CS, n_folds: int = 5, seed: int = 2021,
    max_iter: int = 2000,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Logistic regression with ``C`` chosen by patient-grouped, stratified K-fold CV (ROC-AUC).

    ``groups`` are patient ids aligned with ``features``. The folds never split a patient. With
    fewer patients per class than ``n_folds``, the number of folds is reduced (down to 2).
    Returns test probabilities (len(test_index), K) in class-code order, and details.
    """
    x = _check_features(features)
    y = np.asarray(labels, dtype=np.int64)
    g = np.asarray(groups).astype(str)
    tr, te = np.asarray(train_index, dtype=np.int64), np.asarray(test_index, dtype=np.int64)
    k = int(y.max()) + 1 if len(y) else 0
    present = np.unique(y[tr])
    if len(present) < 2 or len(present) != k:
        raise SplitError(f"the logistic probe's training rows hold classes {present.tolist()} of {k}; every class needs images")
    per_class = pd.Series(g[tr]).groupby(y[tr]).nunique()
    folds = int(min(n_folds, per_class.min()))
    if folds < 2:
        raise SplitError(f"the logistic probe's CV needs >= 2 patients per class in training; smallest class has {int(per_class.min())}")
    scoring = "roc_auc" if k == 2 else "roc_auc_ovr"
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    search = GridSearchCV(pipe, {"logisticregression__C": [float(c) for c in Cs]}, scoring=scoring, cv=cv,
                          refit=True, error_score="raise")
    with warnings.catch_warnings(record=True) as caught, threads_for(len(tr) * x.shape[1]):
        warnings.simplefilter("always", ConvergenceWarning)
        search.fit(x[tr], y[tr], groups=g[tr])
    n_conv = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    probs = search.predict_proba(x[te])
    res = search.cv_results_
    return probs, {"probe": "logistic", "description": PROBE_TEXT["logistic"],
                   "C": float(search.best_params_["logisticregression__C"]), "cv_auc": float(search.best_score_),
                   "cv": [{"C": float(c), "mean_auc": float(m), "std_auc": float(s)} for c, m, s in
                          zip(res["param_logisticregression__C"], res["mean_test_score"], res["std_test_score"])],
                   "n_folds": folds, "splitter": "StratifiedGroupKFold (groups = patients)", "scoring": scoring,
                   "convergence_warnings": n_conv, "n_features": int(x.shape[1]), "fit_on": "train+val",
                   "n_train": int(len(tr))}


# --------------------------------------------------------------------------------------------
# the probe of one target
# --------------------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    """Test predictions and metrics of each probe for one target, with the split and its rules."""

    target: str
    classes: list[str]
    predictions: dict[str, pd.DataFrame]
    metrics: dict[str, dict[str, Any]]
    cohort: pd.DataFrame            # the probe's rows (with 'split'), in feature-row order
    info: dict[str, Any] = field(default_factory=dict)

    def auc_table(self) -> pd.DataFrame:
        """One row per (probe, class) plus a 'macro' row per probe: AUC and its bootstrap CI."""
        rows = []
        for name, m in self.metrics.items():
            for c in self.classes:
                e = m["per_class"][c]
                rows.append({"model": name, "class": c, "auc": e["auc"], "ci_low": e["auc_ci"][0],
                             "ci_high": e["auc_ci"][1], "n_positive": e["n_positive"]})
            rows.append({"model": name, "class": "macro", "auc": m["macro_auc"], "ci_low": m["macro_auc_ci"][0],
                         "ci_high": m["macro_auc_ci"][1], "n_positive": None})
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (metrics per probe, split counts, flags)."""
        from readingrace.stats.metrics import to_json_dict

        return to_json_dict({"schema": "readingrace.probe/1", "target": self.target, "classes": self.classes,
                             "probes": self.metrics, **self.info})


def _predictions(rows: pd.DataFrame, probs: np.ndarray, classes: Sequence[str], target: str,
                 strata: Sequence[str]) -> pd.DataFrame:
    table = pd.DataFrame({
        "image_id": rows["image_id"].astype(str).to_numpy(),
        "patient_id": rows["patient_id"].astype(str).to_numpy(),
        "study_id": rows["study_id"].to_numpy() if "study_id" in rows.columns else None,
        "label": rows[target].astype(str).to_numpy(),
    })
    for j, c in enumerate(classes):
        table[f"prob_{c}"] = probs[:, j]
    for s in strata:
        table[s] = rows[s].to_numpy()
    return table


def run_probe(
    features: np.ndarray, cohort: pd.DataFrame, *, target: str, split: pd.Series | None = None,
    ratios: Sequence[float] = DEFAULT_PROBE_RATIOS, seed: int = 2021, probes: Sequence[str] = PROBES,
    classes: Sequence[str] | None = None, reid_patients: Collection[str] | None = None,
    reid_variant: str = "unseen", n_bootstrap: int = 1000, level: float = 0.95, strata: Sequence[str] = (),
    linear_options: Mapping[str, Any] | None = None, logistic_options: Mapping[str, Any] | None = None,
    split_note: str | None = None, exclude_patients: Collection[str] | None = None,
) -> ProbeResult:
    """Probe ``features`` (rows aligned with ``cohort``) for ``target``: predictions and metrics per probe.

    ``split`` (train/val/test per cohort row, e.g. the feature model's own split) is used when
    given, else a new patient split stratified by the target (``ratios``, ``seed``). Either way it
    must be patient-disjoint (:class:`LeakageError` otherwise). ``reid_patients``: the patients a
    re-identification feature model was trained on; ``reid_variant="unseen"`` (default) drops them,
    ``"paper"`` keeps only them (flagged). ``exclude_patients`` (e.g. the patients a user's feature
    model trained on) are dropped and counted; listed ids that match no cohort patient are counted and
    flagged, and a list matching none is a :class:`CohortError` (:func:`match_patient_list`). Rows with
    a missing target are dropped and counted.
    """
    from readingrace.stats.metrics import evaluate_predictions

    unknown = [p for p in probes if p not in PROBES]
    if unknown or not probes:
        raise ConfigError(f"unknown probe(s) {unknown or list(probes)}; choose from {list(PROBES)}")
    x = _check_features(features)
    if len(x) != len(cohort):
        raise ConfigError(f"features have {len(x)} rows but the cohort has {len(cohort)}; they must align row by row")
    for col in ("image_id", "patient_id", target, *strata):
        if col not in cohort.columns:
            raise CohortError(f"the cohort lacks column {col!r} needed by the probe")
    df = cohort.reset_index(drop=True).copy()
    keep = np.ones(len(df), dtype=bool)
    info: dict[str, Any] = {"flags": [], "rows_in": int(len(df))}
    if split is not None:
        if len(split) != len(cohort):
            raise ConfigError(f"split has {len(split)} rows, the cohort {len(cohort)}")
        df["split"] = np.asarray(split, dtype=object)
        info["split_source"] = split_note or "given (the feature model's own patient split)"
    if reid_patients is not None:
        if reid_variant not in REID_VARIANTS:
            raise ConfigError(f"reid_variant {reid_variant!r} is not one of {sorted(REID_VARIANTS)}")
        seen = df["patient_id"].astype(str).isin({str(p) for p in reid_patients}).to_numpy()
        keep &= ~seen if reid_variant == "unseen" else seen
        info["reid_variant"] = reid_variant
        info["population"] = REID_VARIANTS[reid_variant]
        if reid_variant == "paper":
            info["flags"].append(REID_VARIANTS["paper"])
        info["reid_patients_excluded" if reid_variant == "unseen" else "reid_patients_used"] = int(
            df.loc[seen, "patient_id"].nunique())
    if exclude_patients is not None:
        listed = {str(p) for p in exclude_patients}
        unmatched = match_patient_list(listed, df["patient_id"])
        named = df["patient_id"].astype(str).isin(listed).to_numpy()
        keep &= ~named
        info["excluded_patients"] = {"listed": len(listed), "in_cohort": int(df.loc[named, "patient_id"].nunique()),
                                     "images": int(named.sum()), "not_in_cohort": len(unmatched),
                                     "not_in_cohort_examples": unmatched[:5]}
        if unmatched:
            info["flags"].append(unmatched_flag(unmatched, len(listed), df["patient_id"]))
    missing_target = df[target].isna().to_numpy() | (df[target].astype(str).str.strip() == "")
    info["rows_missing_target"] = int((missing_target & keep).sum())
    keep &= ~missing_target
    rows_idx = np.flatnonzero(keep)
    df, x = df.iloc[rows_idx].reset_index(drop=True), x[rows_idx]
    if len(df) == 0:
        raise CohortError(f"no rows left to probe for {target!r}")
    df[target] = df[target].astype(str)
    cls = [str(c) for c in classes] if classes is not None else sorted(df[target].unique())
    if len(cls) < 2:
        raise CohortError(f"{target!r} has one class ({cls}) among the probe's rows; nothing to probe")
    if len(cls) > MAX_CLASSES:
        raise ConfigError(f"{target!r} has {len(cls)} distinct values: a probe predicts classes, not a continuous "
                          "value; use a grouped column (age_group, bmi_group)")
    outside = ~df[target].isin(cls)
    if outside.any():
        raise CohortError(f"{int(outside.sum())} row(s) have {target} values not among classes {cls} "
                          f"(e.g. {df.loc[outside, target].iloc[0]!r})")
    if split is None:
        df["split"] = split_patients(df, target=target, ratios=ratios, seed=seed).to_numpy()
        info["split_source"] = split_note or f"new patient split stratified by {target} {list(ratios)}, seed {seed}"
    bad = ~df["split"].isin(["train", "val", "test"])
    if bad.any():
        raise SplitError(f"split values must be train/val/test; found {sorted(df.loc[bad, 'split'].astype(str).unique())[:5]}")
    check_no_leakage(df)   # probe splits are patient-disjoint, always
    y = df[target].map({c: i for i, c in enumerate(cls)}).to_numpy()
    tr, va, te = (np.flatnonzero(df["split"].to_numpy() == s) for s in ("train", "val", "test"))
    sizes = f"images per split: train {len(tr)}, val {len(va)}, test {len(te)}; split: {info['split_source']}"
    if len(te) == 0:
        raise SplitError(f"the probe's test split is empty ({sizes})")
    if len(va) == 0 and "softmax" in probes:
        raise SplitError(f"the softmax probe needs validation images for early stopping, but the probe's validation "
                         f"split is empty ({sizes})")
    absent = [c for c in cls if c not in set(df[target].iloc[tr])]
    if absent:
        raise SplitError(f"class(es) {absent} of {target!r} have no image in the probe's training split")
    info["split_policy"] = "patient-disjoint"
    info["split_counts"] = {s: {"images": int(len(i)), "patients": int(df["patient_id"].iloc[i].nunique())}
                            for s, i in (("train", tr), ("val", va), ("test", te))}
    info["class_counts"] = {s: {c: int((df[target].iloc[i] == c).sum()) for c in cls}
                            for s, i in (("train", tr), ("val", va), ("test", te))}
    test_rows = df.iloc[te]
    preds: dict[str, pd.DataFrame] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for name in probes:
        t0 = time.perf_counter()
        if name == "softmax":
            probs, details = linear_probe(x, y, train_index=tr, val_index=va, test_index=te, classes=cls, seed=seed,
                                          **dict(linear_options or {}))
        else:
            fit = np.concatenate([tr, va])
            probs, details = logistic_probe(x, y, df["patient_id"].to_numpy(), train_index=fit, test_index=te,
                                            seed=seed, **dict(logistic_options or {}))
        details["seconds"] = round(time.perf_counter() - t0, 2)
        pred = _predictions(test_rows, probs, cls, target, strata)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            m = evaluate_predictions(pred, classes=cls, n_bootstrap=n_bootstrap, seed=seed, level=level,
                                     strata=list(strata))
        m["probe"] = details
        preds[name], metrics[name] = pred, m
    return ProbeResult(target=target, classes=cls, predictions=preds, metrics=metrics, cohort=df, info=info)


# --------------------------------------------------------------------------------------------
# comparison with a directly trained model, and the report
# --------------------------------------------------------------------------------------------
def compare_with_direct(result: ProbeResult, direct: pd.DataFrame, *, n_bootstrap: int = 1000,
                        seed: int = 2021, level: float = 0.95) -> dict[str, Any]:
    """Each probe's AUC minus a directly trained model's, paired on the test images both share.

    ``direct`` is a predictions table (``predictions.csv`` of a run for the same target). When the
    test images differ, the comparison uses the shared images and says how many; with none shared
    it returns only a note (compare the two CIs side by side instead).
    """
    from readingrace.stats.metrics import compare_predictions

    direct = direct.copy()
    direct["image_id"] = direct["image_id"].astype(str)
    out: dict[str, Any] = {}
    for name, pred in result.predictions.items():
        shared = sorted(set(pred["image_id"]) & set(direct["image_id"]))
        note = {"n_probe_test": int(len(pred)), "n_direct_test": int(len(direct)), "n_shared": len(shared)}
        if len(shared) < 2:
            out[name] = {**note, "note": "no shared test images: no paired comparison (different splits)"}
            continue
        a = pred[pred["image_id"].isin(shared)]
        b = direct[direct["image_id"].isin(shared)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            try:
                cmp = compare_predictions(a, b, classes=result.classes, n_bootstrap=n_bootstrap, seed=seed, level=level)
            except (CohortError, ConfigError) as exc:
                out[name] = {**note, "note": f"no paired comparison: {exc}"}
                continue
        if len(shared) < max(len(pred), len(direct)):
            note["note"] = f"paired on the {len(shared)} test images both models share"
        out[name] = {**note, **cmp}
    return out


def _ci(m: Mapping[str, Any], key: str = "macro_auc") -> str:
    v, ci = m.get(key), m.get(f"{key}_ci") or [None, None]
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    lo, hi = ci
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None and not math.isnan(lo) else f"{v:.3f}"


def probe_markdown(result: ProbeResult, *, feature_model: str, direct: Mapping[str, Any] | None = None,
                   direct_name: str = "trained directly", comparison: Mapping[str, Any] | None = None) -> str:
    """A Markdown table: each probe's per-class and macro AUC (95% CI) beside the direct model's."""
    cls = result.classes
    binary = len(cls) == 2  # both one-vs-rest AUCs and their mean are one number: one column
    head = ("| model | " + (f"AUC ({cls[0]} vs {cls[1]})" if binary else " | ".join(f"AUC {c}" for c in cls)
                            + " | macro AUC") + " | test images (patients) |")
    lines = [f"### Does `{feature_model}` encode {result.target}?", "", head,
             "|" + "---|" * (3 if binary else len(cls) + 3)]

    def row(label: str, m: Mapping[str, Any]) -> str:
        per = [] if binary else [_ci(m["per_class"][c], "auc") if c in m.get("per_class", {}) else "n/a" for c in cls]
        return f"| {label} | " + "".join(f"{p} | " for p in per) + f"{_ci(m)} | {m.get('n_images')} ({m.get('n_patients')}) |"

    for name, m in result.metrics.items():
        lines.append(row(f"probe: {name}", m))
    if direct is not None:
        lines.append(row(direct_name, direct))
    lines.append("")
    for name, m in result.metrics.items():
        d = m["probe"]
        extra = f"C = {d['C']:.3g}, CV AUC {d['cv_auc']:.3f}" if name == "logistic" else \
            f"best epoch {d['best_epoch']} of {d['epochs_run']}"
        lines.append(f"- {name}: {d['description']}; {extra}; {d['n_features']} features.")
    if comparison:
        for name, c in comparison.items():
            if "macro_difference" in c:
                lo, hi = c["macro_difference_ci"]
                lines.append(f"- {name} probe minus {direct_name}: macro AUC difference {c['macro_difference']:+.3f} "
                             f"[{lo:+.3f}, {hi:+.3f}] (paired bootstrap, {c['n_shared']} shared test images)")
            else:
                lines.append(f"- {name} vs {direct_name}: {c.get('note')}")
    counts = ", ".join(f"{k} {v['images']} images ({v['patients']} patients)"
                       for k, v in (result.info.get("split_counts") or {}).items())
    lines.append(f"- probe split: {result.info.get('split_policy')}; {result.info.get('split_source')}; {counts}")
    class_counts = result.info.get("class_counts") or {}
    if class_counts:
        lines.append("- images per class: " + "; ".join(
            f"{s} " + ", ".join(f"{c} {n}" for c, n in per.items()) for s, per in class_counts.items()))
    excluded = result.info.get("excluded_patients")
    if excluded:
        lines.append(f"- left out: {excluded['in_cohort']} patient(s), {excluded['images']} image(s), of the "
                     f"{excluded['listed']} patient(s) listed as excluded"
                     + (f"; {excluded['not_in_cohort']} listed id(s) match no patient of the cohort (e.g. "
                        f"{excluded['not_in_cohort_examples'][0]!r})" if excluded.get("not_in_cohort") else ""))
    for warning in next(iter(result.metrics.values())).get("warnings", []):
        lines.append(f"- note: {warning}")
    if "feature_model_patients" in result.info:
        lines.append(f"- feature model's patients: `{result.info['feature_model_patients']}`: "
                     f"{result.info.get('feature_model_patients_note', '')}")
    for flag in result.info.get("flags", []):
        lines.append(f"- **flag**: {flag}")
    ci_meta = next(iter(result.metrics.values()))["ci"]
    lines.append(f"- CIs: {ci_meta['method']}, {ci_meta['n_bootstrap']} replicates, level {ci_meta['level']}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# the audit of any model (the `readingrace probe` command)
# --------------------------------------------------------------------------------------------
#: How many folders above a checkpoint to look for its run's cohort.csv (RUN/seed-N/checkpoints/best.ckpt).
RUN_SEARCH_DEPTH = 3
SPLITS = ("train", "val", "test")
UNKNOWN_PATIENTS_FLAG = ("the probe cannot know which patients the feature model saw (not a readingrace run "
                         "checkpoint): its test patients may include the model's training patients; name them "
                         "with --exclude-patients FILE")


def run_folder_of(model: str | Path) -> Path | None:
    """The readingrace run folder a checkpoint belongs to, or None.

    The nearest of the checkpoint's ``RUN_SEARCH_DEPTH`` parent folders holding readingrace's ``config.yaml``
    (with its fingerprint) and a ``cohort.csv`` with ``patient_id`` and ``split`` columns (a ``readingrace
    run`` / ``disease`` folder); a user's own split file beside a model does not count.
    """
    from readingrace.features import CHECKPOINT_SUFFIXES

    path = Path(model)
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES or not path.is_file():
        return None
    for folder in list(path.resolve().parents)[:RUN_SEARCH_DEPTH]:
        table, config = folder / "cohort.csv", folder / "config.yaml"
        if not (table.is_file() and config.is_file()):
            continue
        try:  # a run folder: readingrace's config.yaml (with its fingerprint) beside a cohort.csv with splits
            is_run = bool((yaml.safe_load(config.read_text()) or {}).get("fingerprint")) and \
                {"patient_id", "split"} <= set(pd.read_csv(table, nrows=0).columns)
        except (yaml.YAMLError, ValueError, OSError, UnicodeDecodeError, AttributeError, pd.errors.ParserError,
                pd.errors.EmptyDataError):
            is_run = False  # not a readingrace run folder (a user's own files): the model's patients are unknown
        if is_run:
            return folder
    return None


def run_patient_split(run_dir: str | Path, cohort: pd.DataFrame) -> pd.Series:
    """Each cohort row's split (train/val/test) in the run of ``run_dir``, by patient; NaN for patients
    outside that run. Raises :class:`LeakageError` when the run's cohort.csv puts a patient in two splits."""
    from readingrace.errors import LeakageError

    path = Path(run_dir) / "cohort.csv"
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table = table[table["split"].isin(SPLITS)]
    by_dataset = "dataset" in table.columns and "dataset" in cohort.columns  # patient "1" of another site is not ours
    key = patient_key if by_dataset else (lambda d: d["patient_id"].astype(str))
    table = pd.DataFrame({"key": key(table), "patient_id": table["patient_id"], "split": table["split"]})
    table = table.drop_duplicates(["key", "split"])
    twice = table["patient_id"][table["key"].duplicated()]
    if len(twice):
        raise LeakageError(f"{path} puts patient {twice.iloc[0]!r} in more than one split; it is not a "
                           "patient-disjoint run split")
    return key(cohort).map(dict(zip(table["key"], table["split"])))


def _run_datasets(run_dir: Path) -> set[str]:
    """The dataset names in a run's cohort.csv (empty when it has no dataset column)."""
    table = pd.read_csv(Path(run_dir) / "cohort.csv", dtype=str, keep_default_na=False)
    return set(table["dataset"]) if "dataset" in table.columns else set()


def match_patient_list(listed: Collection[str], patients: pd.Series) -> list[str]:
    """The ``listed`` ids that match no id of ``patients`` (sorted). Ids are compared as written, never
    normalised ("00000061" is not "61"); :class:`CohortError` when none matches, with an id from each side."""
    listed = {str(p) for p in listed}
    known = set(patients.astype(str))
    unmatched = sorted(listed - known)
    if listed and len(unmatched) == len(listed):
        raise CohortError(f"none of the {len(listed)} patient id(s) listed as excluded matches one of the cohort's "
                          f"{len(known)} patients (listed e.g. {unmatched[0]!r}, cohort e.g. "
                          f"{min(known, default='')!r}): ids are compared as written; write them as the cohort's "
                          "patient_id column does")
    return unmatched


def unmatched_flag(unmatched: Sequence[str], n_listed: int, patients: pd.Series) -> str:
    """The report's flag for listed patient ids that match no cohort patient."""
    return (f"{len(unmatched)} of the {n_listed} patient id(s) listed as excluded match no patient of the probed "
            f"cohort (e.g. {unmatched[0]!r}; cohort ids such as {min(patients.astype(str))!r}): ids are compared as "
            "written, so a training patient written differently would stay in the probe")


def check_run_split(split: pd.Series, *, n_outside: int, run_dir: Path, need_val: bool) -> None:
    """:class:`SplitError` when the run's split leaves the probe an empty train, test or (``need_val``,
    for the softmax probe's early stopping) validation split, with the cohort's images per split."""
    counts = {s: int((split == s).sum()) for s in SPLITS}
    empty = [s for s in SPLITS if counts[s] == 0 and (s != "val" or need_val)]
    if not empty:
        return
    raise SplitError(
        f"the feature model's run ({run_dir}) has no {' or '.join(empty)} image of this cohort: of its images, "
        + ", ".join(f"{n} in the run's {s}" for s, n in counts.items()) + f", {n_outside} outside the run. The probe "
        "reuses the run's patient split (train/val/test) so it never tests on patients the model saw, and the "
        "softmax probe needs validation images for early stopping. Probe a cohort that holds patients of every split "
        "of the run (e.g. the run's own config), or copy the checkpoint out of the run folder and list the run's "
        "train and val patients (its cohort.csv) with --exclude-patients: a new patient split is then drawn among "
        "the others")


def read_patient_list(path: str | Path) -> set[str]:
    """Patient ids from a CSV file with a ``patient_id`` column (e.g. a feature model's training patients)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--exclude-patients {path}: file not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CohortError(f"--exclude-patients {path}: not a readable CSV ({exc})") from exc
    if "patient_id" not in table.columns:
        raise CohortError(f"--exclude-patients {path}: needs a patient_id column; found {list(table.columns)[:8]}")
    ids = {p.strip() for p in table["patient_id"] if p.strip()}
    if not ids:
        raise CohortError(f"--exclude-patients {path}: no patient ids")
    return ids


def run_audit(
    *, images: np.ndarray, cohort: pd.DataFrame, out_dir: str | Path, targets: Sequence[str],
    model: str | None = None, layer: str | None = None, arch: str | None = None, features: str | Path | None = None,
    direct_predictions: Mapping[str, str | Path] | None = None, ratios: Sequence[float] = DEFAULT_PROBE_RATIOS,
    seed: int = 2021, probes: Sequence[str] = PROBES, n_bootstrap: int = 1000, level: float = 0.95,
    batch_size: int = 64, reid_patients: Collection[str] | None = None, reid_variant: str = "unseen",
    exclude_patients: Collection[str] | None = None, say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Probe one model (or saved features) for each of ``targets``; write a report into ``out_dir``.

    Exactly one of ``model`` (checkpoint or ``package.module:function``, see
    :func:`readingrace.features.load_user_model`; ``layer`` picks a named layer) and ``features``
    (a saved file, see :func:`readingrace.features.load_saved_features`). ``cohort`` rows map to
    ``images`` through ``cohort["cache_index"]`` (row position when absent).

    Which patients the probe tests on: when ``model`` is a checkpoint inside a readingrace run folder
    (:func:`run_folder_of`), every target uses that run's patient split (probe train/val = the run's
    train/val patients, probe test = its test patients; patients outside the run are left out), so
    no test patient was seen by the feature model; a run split that leaves the probe no train, test or
    (softmax) validation image is a :class:`SplitError` with the counts (:func:`check_run_split`).
    Otherwise each target gets a new patient split stratified by the target, ``exclude_patients``
    (the model's training patients, when the user knows them) are dropped (how many match the cohort
    is said; none matching is an error), and without them the report says
    ``feature_model_patients: unknown`` (flagged). Per target: both probes and, when
    ``direct_predictions[target]`` names a predictions.csv of a model trained directly for it, the
    paired comparison. Writes ``features.npy`` (+ ids), ``probe-<target>/predictions_<probe>.csv``,
    ``probe.json`` and ``probe.md``; returns the JSON dict.
    """
    from readingrace.features import extract_features, load_saved_features, load_user_model, save_features
    from readingrace.stats.metrics import evaluate_predictions, to_json_dict

    if (model is None) == (features is None):
        raise ConfigError("give exactly one of --model (a checkpoint or package.module:function) and --features")
    if features is not None and layer is not None:
        raise ConfigError("--layer applies to --model, not to saved --features")
    out = Path(out_dir)
    refuse_foreign_folder(out)  # before any work; nothing is written until the features exist
    cohort = cohort.reset_index(drop=True)
    ids = cohort["image_id"].astype(str).tolist()
    if exclude_patients is not None:  # before the features: a list matching nothing is an error
        exclude_patients = {str(p) for p in exclude_patients}
        unmatched = match_patient_list(exclude_patients, cohort["patient_id"])
        named = cohort["patient_id"].astype(str).isin(exclude_patients)
        say(f"excluded patients: {len(exclude_patients) - len(unmatched)} of the {len(exclude_patients)} listed are "
            f"in the cohort ({int(named.sum())} image(s) left out)"
            + (f"; {len(unmatched)} match no cohort patient (e.g. {unmatched[0]!r}; cohort ids such as "
               f"{min(cohort['patient_id'].astype(str))!r}): ids are compared as written" if unmatched else ""))
    t0 = time.perf_counter()
    if features is not None:
        feats = load_saved_features(features, ids)
        source = f"saved features {Path(features).name}"
    else:
        net = load_user_model(model, arch=arch)
        index = cohort["cache_index"].to_numpy() if "cache_index" in cohort.columns else np.arange(len(cohort))
        feats = extract_features(net, images, index, layer=layer, batch_size=batch_size)
        source = f"{model}" + (f" layer {layer}" if layer else " (penultimate features)")
    run_dir = run_folder_of(model) if model is not None else None
    probe_cohort, probe_feats, split, split_note, n_outside = cohort, feats, None, None, 0
    if run_dir is not None:
        split = run_patient_split(run_dir, cohort)
        if not split.notna().any():  # another site's cohort: the model saw none of these patients ...
            shared = _run_datasets(run_dir) & set(cohort["dataset"].astype(str)) if "dataset" in cohort else set()
            if shared:  # ... unless it is the same dataset: then its ids are written differently, not unseen
                raise CohortError(
                    f"none of the cohort's patient ids is in the feature model's run ({run_dir / 'cohort.csv'}), "
                    f"although both hold dataset {sorted(shared)[0]!r}: the ids are written differently (e.g. "
                    f"{cohort['patient_id'].astype(str).iloc[0]!r} here), so the probe cannot tell which patients "
                    "the model saw; build the cohort as the run did")
            split = None
    if run_dir is not None and split is None:
        patients, patients_note = "none-in-run", (
            f"none of the cohort's {cohort['patient_id'].nunique()} patients is in the feature model's run "
            f"({run_dir / 'cohort.csv'}): the model saw none of them; a new patient split per target")
    elif run_dir is not None and split is not None:
        inside = split.notna().to_numpy()
        outside = cohort.loc[~inside, "patient_id"]
        n_outside = len(outside)
        split_note = (f"the feature model's run split ({run_dir / 'cohort.csv'}): probe train/val = the run's "
                      "train/val patients, probe test = the run's test patients")
        if len(outside):
            split_note += (f"; {len(outside)} image(s) of {outside.nunique()} patient(s) outside that run "
                           "left out")
        probe_cohort, probe_feats, split = cohort[inside].reset_index(drop=True), feats[inside], split[inside]
        check_run_split(split, n_outside=n_outside, run_dir=run_dir, need_val="softmax" in probes)
        if exclude_patients is not None and not probe_cohort["patient_id"].astype(str).isin(exclude_patients).any():
            say("excluded patients: none of them is among the cohort's patients inside the run (already left out)")
            exclude_patients = None
        patients, patients_note = "run-split", ("none of the probe's test patients was in the feature model's "
                                                "training or validation split (its run's test patients only)")
    elif exclude_patients is not None:
        patients, patients_note = "excluded-by-user", ("the patients named by --exclude-patients are left out; "
                                                       "the probe relies on that list being complete")
    else:
        patients, patients_note = "unknown", "not known: the features do not come from a checkpoint in a readingrace run folder"
    with RunLock(out):
        if features is None:
            save_features(out / "features.npy", feats, ids)
        say(f"features: {feats.shape[0]} images x {feats.shape[1]} ({time.perf_counter() - t0:.1f} s) from {source}")
        report: dict[str, Any] = {"schema": "readingrace.audit/1", "feature_source": source,
                                  "n_features": int(feats.shape[1]), "feature_model_patients": patients,
                                  "feature_model_run": str(run_dir) if run_dir is not None else None,
                                  "rows_outside_run": n_outside, "targets": {}}
        say(f"feature model's patients: {patients}" + (f" ({split_note})" if split_note else ""))
        md = [f"# Audit: does {source} encode {', '.join(targets)}?", ""]
        for target in targets:
            res = run_probe(probe_feats, probe_cohort, target=target, split=split, split_note=split_note,
                            ratios=ratios, seed=seed, probes=probes, reid_patients=reid_patients,
                            reid_variant=reid_variant, exclude_patients=exclude_patients, n_bootstrap=n_bootstrap,
                            level=level)
            res.info.update(feature_model_patients=patients, feature_model_patients_note=patients_note)
            if patients == "unknown":
                res.info["flags"].append(UNKNOWN_PATIENTS_FLAG)
            tdir = out / f"probe-{target}"
            tdir.mkdir(exist_ok=True)
            for name, pred in res.predictions.items():
                pred.to_csv(tdir / f"predictions_{name}.csv", index=False)
            entry = res.to_dict()
            direct_m = comparison = None
            if direct_predictions and target in direct_predictions:
                direct = pd.read_csv(direct_predictions[target], dtype={"image_id": str, "patient_id": str})
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    direct_m = evaluate_predictions(direct, classes=res.classes, n_bootstrap=n_bootstrap, seed=seed,
                                                    level=level)
                comparison = compare_with_direct(res, direct, n_bootstrap=n_bootstrap, seed=seed, level=level)
                entry["direct"] = to_json_dict(direct_m)
                entry["comparison"] = to_json_dict(comparison)
            report["targets"][target] = entry
            md.append(probe_markdown(res, feature_model=source, direct=direct_m, comparison=comparison))
            for name, m in res.metrics.items():
                say(f"{target}: {name} probe macro AUC {_ci(m)}")
        write_atomic(out / "probe.json", json.dumps(report, indent=2, allow_nan=False))
        write_atomic(out / "probe.md", "\n".join(md))
    say(f"wrote {out / 'probe.md'}")
    return report

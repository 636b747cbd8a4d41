"""Tabular confounder experiments B1-B3 and the chi-square tables of the paper's supplement.

* B1 :func:`bmi_glm`: binomial GLMs (statsmodels) of the target on BMI (continuous, rows where it is
  recorded) and on a BMI-recorded indicator.
* B2 :func:`density_logit`: binomial GLMs of the target on breast density, then density + age.
* B3 :func:`labels_models`: XGBoost, random forest and L1 logistic regression on the disease labels,
  hyper-parameters by grouped 5-fold cross-validation.
* :func:`chi_square`: contingency table of an attribute by a stratum with scipy's test.

Every analysis splits by patient (70/30, stratified by the target, seed 2021) with
:func:`readingrace.split.split_patients`, never by row order, and reports test AUCs with
patient-clustered bootstrap CIs from :func:`readingrace.stats.metrics.evaluate_predictions`.
A multi-class target is modelled one-vs-rest (one binomial GLM per class; the probabilities are the
per-class GLM probabilities, not renormalised); a binary target gets one GLM for its second class.
Rows are used as given (one per image or one per patient); CIs always resample patients.
This module never imports torch.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sklearn
import statsmodels.api as sm
from scipy.stats import chi2_contingency
from scipy.stats.contingency import association
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.multiclass import OneVsRestClassifier

from readingrace.cohort.schema import age_group, bmi_group
from readingrace.errors import CohortError, ConfigError, ReadingRaceError, SplitError
from readingrace.split import check_no_leakage, split_patients

DEFAULT_SEED = 2021
DEFAULT_RATIOS: tuple[float, float] = (0.7, 0.3)
B3_MODELS: tuple[str, ...] = ("xgboost", "random_forest", "logistic_l1")
#: The paper's grids (Supplemental Table 1): max depth 1..6 for the trees, C in [1e-5, 10] for L1 LR.
DEFAULT_GRIDS: dict[str, dict[str, list[Any]]] = {
    "xgboost": {"max_depth": [1, 2, 3, 4, 5, 6]},
    "random_forest": {"max_depth": [1, 2, 3, 4, 5, 6]},
    "logistic_l1": {"C": [float(c) for c in np.logspace(-5, 1, 13)]},  # half-decade steps
}
#: How B3 turns label values (1 positive, 0 negative, -1 uncertain, blank unmentioned) into features.
LABEL_POLICIES: dict[str, str] = {
    "ones": "blank -> 0, -1 -> 1 (CheXpert 'U-Ones': uncertain counts as positive)",
    "zeros": "blank -> 0, -1 -> 0 (CheXpert 'U-Zeros': uncertain counts as negative)",
    "raw": "blank -> 0, -1/0/1 kept as numbers (closest to feeding the label file as is)",
    "separate": "two indicators per label, '<label>=1' and '<label>=-1'; blank and 0 give 0",
}
DENSITY_CODINGS: tuple[str, ...] = ("categorical", "ordinal")
_DENSITY_LETTERS = {"A": 1, "B": 2, "C": 3, "D": 4}
_ANALYSES = ("b1", "b2", "b3", "chi_square")
_SPEC_KEYS = {
    "analyses", "target", "classes", "label_cols", "label_policy", "strata", "chi_square_unit",
    "bmi_col", "density_col", "density_coding", "age_col", "seed", "ratios", "split_col",
    "n_folds", "models", "grids", "n_bootstrap", "level", "patient_col", "n_jobs",
}


# ----------------------------------------------------------------------------------------------
# shared helpers


def _require_columns(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise CohortError(
            f"{what} needs column(s) {missing}, which the table lacks (it has {list(df.columns)[:20]}); "
            "add them to the cohort or name the right columns in the options"
        )


def _prepare_target(
    df: pd.DataFrame, target: str, classes: Sequence[str] | None
) -> tuple[pd.DataFrame, list[str], dict[str, int]]:
    """Rows with a usable target (as strings), the class list and the counts dropped."""
    y = df[target]
    keep = y.notna()
    out = df.loc[keep].copy()
    out[target] = out[target].astype(str)
    present = sorted(out[target].unique().tolist())
    cls = [str(c) for c in classes] if classes is not None else present
    known = out[target].isin(cls)
    dropped = {"missing_target": int((~keep).sum()), "other_class": int((~known).sum())}
    out = out.loc[known]
    found = sorted(set(out[target]))
    if len(found) < 2:
        raise CohortError(
            f"target {target!r} has {len(found)} class(es) {found} in the usable rows; "
            "at least two classes are needed"
        )
    absent = [c for c in cls if c not in found]
    if absent:
        raise CohortError(f"class(es) {absent} of {target!r} have no rows (found {found}); "
                          "remove them from 'classes'")
    return out, cls, dropped


def _train_test(
    df: pd.DataFrame,
    *,
    target: str,
    seed: int,
    ratios: Sequence[float],
    split_col: str | None,
    patient_col: str,
) -> pd.Series:
    """'train'/'test' per row by patient: a new stratified split, or the cohort's own ``split_col``.

    With ``split_col``, 'train' and 'val' rows train (cross-validation replaces a validation set)
    and 'test' rows test; any other value is an error.
    """
    if split_col is None:
        if len(tuple(ratios)) != 2:
            raise ConfigError(f"ratios {list(ratios)} must be two numbers (train, test), e.g. [0.7, 0.3]")
        return split_patients(df, target=target, ratios=ratios, seed=seed,
                              patient_col=patient_col, names=("train", "test"))
    _require_columns(df, [split_col], "the cohort's split")
    s = df[split_col].astype("string").str.lower()
    bad = ~s.isin(["train", "val", "test"])
    if bad.any():
        ex = df.index[bad.to_numpy()][0]
        raise SplitError(
            f"column {split_col!r} holds {df.loc[ex, split_col]!r} in row {ex}; expected train, val or "
            "test (or leave split_col unset for a new 70/30 patient split)"
        )
    out = s.replace({"val": "train"}).astype(object).rename("split")
    check_no_leakage(df.assign(split=out), patient_col=patient_col)
    for name in ("train", "test"):
        if not (out == name).any():
            raise SplitError(f"column {split_col!r} has no {name!r} rows")
    return out


def _split_summary(df: pd.DataFrame, split: pd.Series, *, target: str, patient_col: str,
                   seed: int, ratios: Sequence[float], split_col: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"by": split_col or "patient", "seed": seed,
                           "ratios": list(ratios) if split_col is None else None}
    for name in ("train", "test"):
        part = df.loc[split == name]
        out[name] = {
            "rows": int(len(part)),
            "patients": int(part[patient_col].nunique()),
            "class_rows": {str(k): int(v) for k, v in part[target].value_counts().sort_index().items()},
        }
    return out


def _id_columns(df: pd.DataFrame, patient_col: str) -> pd.DataFrame:
    """image_id / patient_id / study_id for a prediction table (image_id from the index if absent)."""
    image_id = df["image_id"].astype(str) if "image_id" in df.columns else pd.Series(
        df.index.astype(str), index=df.index)
    study_id = df["study_id"] if "study_id" in df.columns else image_id
    study_id = study_id.where(study_id.notna(), image_id).astype(str)
    return pd.DataFrame({"image_id": image_id.to_numpy(), "patient_id": df[patient_col].astype(str).to_numpy(),
                         "study_id": study_id.to_numpy()})


def _pred_frame(test: pd.DataFrame, probs: np.ndarray, classes: Sequence[str], *, target: str,
                patient_col: str) -> pd.DataFrame:
    pred = _id_columns(test, patient_col)
    pred["label"] = test[target].astype(str).to_numpy()
    for j, c in enumerate(classes):
        pred[f"prob_{c}"] = probs[:, j]
    return pred


def _evaluate(pred: pd.DataFrame, classes: Sequence[str], *, n_bootstrap: int, seed: int,
              level: float) -> dict[str, Any]:
    try:
        from readingrace.stats.metrics import evaluate_predictions
    except ImportError as exc:  # pragma: no cover - the package ships metrics.py
        raise ReadingRaceError(f"readingrace.stats.metrics is unavailable ({exc}); reinstall readingrace") from None
    with warnings.catch_warnings():
        # one-vs-rest GLM probabilities need not sum to 1 (expected here; still listed in "warnings")
        warnings.filterwarnings("ignore", message=".*do not sum to 1.*", category=UserWarning)
        return evaluate_predictions(pred, classes=list(classes), n_bootstrap=n_bootstrap, seed=seed, level=level)


def _ci(value: Any) -> tuple[float, float]:
    if value is None:
        return (math.nan, math.nan)
    try:
        lo, hi = value
        return (float(lo) if lo is not None else math.nan, float(hi) if hi is not None else math.nan)
    except (TypeError, ValueError):
        return (math.nan, math.nan)


def _auc_rows(analysis: str, model: str, metrics: Mapping[str, Any], classes: Sequence[str],
              pred: pd.DataFrame) -> list[dict[str, Any]]:
    """Tidy rows (one per class and one 'macro') from an evaluate_predictions result."""
    rows = []
    n_pat, n_rows = int(pred["patient_id"].nunique()), int(len(pred))
    per = metrics.get("per_class", {})
    for c in classes:
        m = per.get(c, {})
        lo, hi = _ci(m.get("auc_ci"))
        rows.append({"analysis": analysis, "model": model, "class": c, "auc": _float(m.get("auc")),
                     "auc_ci_low": lo, "auc_ci_high": hi, "test_rows": n_rows, "test_patients": n_pat,
                     "test_positives": int((pred["label"] == c).sum())})
    if len(classes) > 2:
        lo, hi = _ci(metrics.get("macro_auc_ci"))
        rows.append({"analysis": analysis, "model": model, "class": "macro",
                     "auc": _float(metrics.get("macro_auc")), "auc_ci_low": lo, "auc_ci_high": hi,
                     "test_rows": n_rows, "test_patients": n_pat, "test_positives": None})
    return rows


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


# ----------------------------------------------------------------------------------------------
# B1 / B2: binomial GLMs


def _glm_ovr(X_train: pd.DataFrame, y_train: pd.Series, X_test: pd.DataFrame, classes: Sequence[str],
             model: str) -> tuple[np.ndarray, list[dict[str, Any]], list[str]]:
    """One binomial GLM per class (one for ``classes[1]`` when binary): test probabilities,
    coefficient rows and the warnings statsmodels raised (e.g. perfect separation)."""
    fitted = classes[1:] if len(classes) == 2 else classes
    probs = np.zeros((len(X_test), len(classes)))
    coefs: list[dict[str, Any]] = []
    notes: list[str] = []
    Xtr = sm.add_constant(X_train.astype(float), has_constant="add")
    Xte = sm.add_constant(X_test.astype(float), has_constant="add")
    for c in fitted:
        y = (y_train == c).astype(float)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = sm.GLM(y.to_numpy(), Xtr, family=sm.families.Binomial()).fit()
        notes += [f"{model}, class {c}: {w.message}" for w in caught]
        p = np.asarray(res.predict(Xte))
        probs[:, list(classes).index(c)] = p
        ci = res.conf_int()
        for term in Xtr.columns:
            coefs.append({"model": model, "class": c if len(classes) > 2 else f"{c} vs {classes[0]}",
                          "term": term, "coef": float(res.params[term]), "se": float(res.bse[term]),
                          "z": float(res.tvalues[term]), "p": float(res.pvalues[term]),
                          "ci_low": float(ci.loc[term, 0]), "ci_high": float(ci.loc[term, 1]),
                          "odds_ratio": float(np.exp(res.params[term])), "n_train": int(len(y))})
    if len(classes) == 2:
        probs[:, 0] = 1.0 - probs[:, 1]
    return probs, coefs, notes


def _run_glms(
    df: pd.DataFrame,
    split: pd.Series,
    designs: Mapping[str, tuple[pd.DataFrame, str]],
    *,
    analysis: str,
    target: str,
    classes: Sequence[str],
    patient_col: str,
    n_bootstrap: int,
    seed: int,
    level: float,
) -> dict[str, Any]:
    """Fit and evaluate each named design (features, formula text) on its own complete rows."""
    models: dict[str, Any] = {}
    auc_rows: list[dict[str, Any]] = []
    coef_rows: list[dict[str, Any]] = []
    preds: list[pd.DataFrame] = []
    for name, (X, formula) in designs.items():
        rows = X.notna().all(axis=1)
        tr, te = rows & (split == "train"), rows & (split == "test")
        entry: dict[str, Any] = {"formula": formula, "rows_used": int(rows.sum()),
                                 "rows_dropped_missing": int((~rows).sum()),
                                 "train_rows": int(tr.sum()), "test_rows": int(te.sum()),
                                 "train_patients": int(df.loc[tr, patient_col].nunique()),
                                 "test_patients": int(df.loc[te, patient_col].nunique())}
        reason = _glm_unfittable(X.loc[tr], df.loc[tr, target], df.loc[te, target], classes)
        if reason:
            entry["skipped"] = reason
            models[name] = entry
            continue
        probs, coefs, notes = _glm_ovr(X.loc[tr], df.loc[tr, target], X.loc[te], classes, name)
        pred = _pred_frame(df.loc[te], probs, classes, target=target, patient_col=patient_col)
        metrics = _evaluate(pred, classes, n_bootstrap=n_bootstrap, seed=seed, level=level)
        entry.update(metrics=metrics, warnings=notes)
        models[name] = entry
        auc_rows += _auc_rows(analysis, name, metrics, classes, pred)
        coef_rows += coefs
        preds.append(pred.assign(model=name))
    return {"models": models, "auc_table": pd.DataFrame(auc_rows), "coefficients": pd.DataFrame(coef_rows),
            "predictions": pd.concat(preds, ignore_index=True) if preds else pd.DataFrame()}


def _glm_unfittable(X_train: pd.DataFrame, y_train: pd.Series, y_test: pd.Series,
                    classes: Sequence[str]) -> str | None:
    if len(X_train) == 0 or len(y_test) == 0:
        return "no training or no test rows with these columns recorded"
    const = [c for c in X_train.columns if X_train[c].nunique() < 2]
    if const:
        return f"predictor(s) {const} take a single value in the training rows; the model is not identifiable"
    absent = [c for c in classes if not (y_train == c).any()]
    if absent:
        return f"class(es) {absent} have no training rows with these columns recorded"
    return None


def bmi_glm(
    df: pd.DataFrame,
    *,
    target: str = "race",
    bmi_col: str = "bmi",
    seed: int = DEFAULT_SEED,
    classes: Sequence[str] | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    split_col: str | None = None,
    patient_col: str = "patient_id",
    n_bootstrap: int = 1000,
    level: float = 0.95,
) -> dict[str, Any]:
    """B1: binomial GLMs ``target ~ BMI`` (rows with BMI recorded) and ``target ~ BMI recorded``.

    One 70/30 patient split (stratified by the target) of all rows; each model trains on its own
    rows of the training patients and is tested on the test patients (AUC with patient-clustered
    bootstrap CI). Returns models (formula, counts, metrics, warnings), ``auc_table`` and
    ``coefficients`` DataFrames (coef, SE, z, p, 95% Wald CI, odds ratio), ``predictions``, ``split``.
    """
    _require_columns(df, [target, patient_col, bmi_col], "B1 (race ~ BMI)")
    data, cls, dropped = _prepare_target(df, target, classes)
    bmi = pd.to_numeric(data[bmi_col], errors="coerce")
    bad = data[bmi_col].notna() & bmi.isna()
    if bad.any():
        ex = data.index[bad.to_numpy()][0]
        raise CohortError(f"column {bmi_col!r} holds a non-number {data.loc[ex, bmi_col]!r} in row {ex}; "
                          "BMI must be numeric (kg/m2) or blank")
    split = _train_test(data, target=target, seed=seed, ratios=ratios, split_col=split_col,
                        patient_col=patient_col)
    designs = {
        "bmi_continuous": (pd.DataFrame({"bmi": bmi}), f"{target} ~ bmi (rows with BMI recorded)"),
        "bmi_recorded": (pd.DataFrame({"bmi_recorded": bmi.notna().astype(float)}),
                         f"{target} ~ bmi_recorded (all rows)"),
    }
    out = _run_glms(data, split, designs, analysis="b1", target=target, classes=cls,
                    patient_col=patient_col, n_bootstrap=n_bootstrap, seed=seed, level=level)
    return {"analysis": "b1", "target": target, "classes": cls, "rows_dropped": dropped,
            "method": "statsmodels GLM, binomial family, logit link; one-vs-rest per class "
                      "(one model for the second class when binary)",
            "split": _split_summary(data, split, target=target, patient_col=patient_col, seed=seed,
                                    ratios=ratios, split_col=split_col),
            **out, "assignment": _assignment(data, split, patient_col)}


def _density_codes(values: pd.Series, col: str) -> pd.Series:
    """Density 1-4 (numbers, digit strings, or BI-RADS letters A-D) -> float 1..4; blank -> NaN."""
    def code(v: Any) -> float:
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            return math.nan
        s = str(v).strip().upper()
        if s in _DENSITY_LETTERS:
            return float(_DENSITY_LETTERS[s])
        try:
            f = float(s)
        except ValueError:
            return -1.0
        return f if f in (1.0, 2.0, 3.0, 4.0) else -1.0
    out = values.map(code).astype(float)
    bad = out == -1.0
    if bad.any():
        ex = values.index[bad.to_numpy()][0]
        raise CohortError(f"column {col!r} holds {values.loc[ex]!r} in row {ex}; breast density must be "
                          "1-4 (or BI-RADS A-D) or blank")
    return out


def density_logit(
    df: pd.DataFrame,
    *,
    target: str = "race",
    density_col: str = "density",
    age_col: str = "age",
    coding: str = "categorical",
    seed: int = DEFAULT_SEED,
    classes: Sequence[str] | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    split_col: str | None = None,
    patient_col: str = "patient_id",
    n_bootstrap: int = 1000,
    level: float = 0.95,
) -> dict[str, Any]:
    """B2: binomial GLMs ``target ~ density`` and ``target ~ density + age``.

    ``coding="categorical"`` (default) uses indicators for density 2, 3, 4 against 1 (no order
    assumed); ``"ordinal"`` one linear term for 1-4. Age is linear in years. Both models use the
    same rows (density and age recorded) so their AUCs compare; same split and output as :func:`bmi_glm`.
    """
    if coding not in DENSITY_CODINGS:
        raise ConfigError(f"density coding {coding!r} is not one of {list(DENSITY_CODINGS)}")
    _require_columns(df, [target, patient_col, density_col, age_col], "B2 (race ~ density + age)")
    data, cls, dropped = _prepare_target(df, target, classes)
    dens = _density_codes(data[density_col], density_col)
    age = pd.to_numeric(data[age_col], errors="coerce")
    complete = dens.notna() & age.notna()
    if not complete.any():
        raise CohortError(f"no row has both {density_col!r} and {age_col!r} recorded")
    dropped["missing_density_or_age"] = int((~complete).sum())
    data, dens, age = data.loc[complete], dens.loc[complete], age.loc[complete]
    split = _train_test(data, target=target, seed=seed, ratios=ratios, split_col=split_col,
                        patient_col=patient_col)
    if coding == "categorical":
        levels = sorted(dens.loc[split == "train"].unique())
        if len(levels) < 2:
            raise CohortError(f"column {density_col!r} takes a single value in the training patients; "
                              "race ~ density cannot be fitted")
        unseen = ~dens.isin(levels)
        if unseen.any():
            raise CohortError(
                f"density level(s) {sorted(dens[unseen].unique())} occur only in the test patients; "
                "use coding='ordinal' or merge the level"
            )
        X = pd.DataFrame({f"density_{int(lv)}": (dens == lv).astype(float) for lv in levels[1:]},
                         index=data.index)
        term = f"C(density, ref={int(levels[0])})"
    else:
        X = pd.DataFrame({"density": dens}, index=data.index)
        term = "density (1-4, linear)"
    designs = {
        "density": (X, f"{target} ~ {term}"),
        "density_age": (X.assign(age=age), f"{target} ~ {term} + age"),
    }
    out = _run_glms(data, split, designs, analysis="b2", target=target, classes=cls,
                    patient_col=patient_col, n_bootstrap=n_bootstrap, seed=seed, level=level)
    return {"analysis": "b2", "target": target, "classes": cls, "density_coding": coding,
            "rows_dropped": dropped,
            "method": "statsmodels GLM, binomial family, logit link; one-vs-rest per class "
                      "(one model for the second class when binary)",
            "split": _split_summary(data, split, target=target, patient_col=patient_col, seed=seed,
                                    ratios=ratios, split_col=split_col),
            **out, "assignment": _assignment(data, split, patient_col)}


def _assignment(df: pd.DataFrame, split: pd.Series, patient_col: str) -> pd.DataFrame:
    ids = _id_columns(df, patient_col)
    ids["split"] = split.to_numpy()
    return ids


# ----------------------------------------------------------------------------------------------
# B3: disease labels


def encode_labels(df: pd.DataFrame, label_cols: Sequence[str], *, policy: str = "ones") -> pd.DataFrame:
    """Disease-label columns (1, 0, -1 uncertain, blank) -> numeric features by ``policy``.

    See :data:`LABEL_POLICIES`. Values other than 1, 0, -1 and blank raise :class:`CohortError`.
    """
    if policy not in LABEL_POLICIES:
        raise ConfigError(f"label policy {policy!r} is not one of {sorted(LABEL_POLICIES)}")
    if not label_cols:
        raise ConfigError("label_cols is empty: name the disease-label columns")
    _require_columns(df, list(label_cols), "B3 (race ~ disease labels)")
    feats: dict[str, pd.Series] = {}
    for col in label_cols:
        raw = df[col]
        v = pd.to_numeric(raw.map(lambda x: float(x) if isinstance(x, (bool, np.bool_)) else x),
                          errors="coerce")
        bad = (raw.notna() & v.isna()) | (v.notna() & ~v.isin([1.0, 0.0, -1.0]))
        if bad.any():
            ex = df.index[bad.to_numpy()][0]
            raise CohortError(f"label column {col!r} holds {raw.loc[ex]!r} in row {ex}; labels must be "
                              "1 (positive), 0 (negative), -1 (uncertain) or blank")
        v = v.fillna(0.0)
        if policy == "ones":
            feats[col] = v.abs()
        elif policy == "zeros":
            feats[col] = (v == 1.0).astype(float)
        elif policy == "raw":
            feats[col] = v
        else:
            feats[f"{col}=1"] = (v == 1.0).astype(float)
            feats[f"{col}=-1"] = (v == -1.0).astype(float)
    return pd.DataFrame(feats, index=df.index)


def _xgboost_classifier(seed: int) -> Any:
    try:
        import xgboost
    except ImportError:
        raise ReadingRaceError(
            "model 'xgboost' needs the xgboost package: pip install xgboost-cpu "
            "(or drop 'xgboost' from models)"
        ) from None
    return xgboost.XGBClassifier(n_estimators=100, random_state=seed, n_jobs=1)


def _l1_logistic(C: float = 1.0) -> LogisticRegression:
    """L1 logistic regression (liblinear) across scikit-learn versions (``penalty`` is deprecated in 1.8)."""
    major, minor = (int(x) for x in sklearn.__version__.split(".")[:2])
    if (major, minor) >= (1, 8):
        return LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear")
    return LogisticRegression(C=C, penalty="l1", solver="liblinear")  # pragma: no cover


def _estimator(model: str, n_classes: int, seed: int) -> tuple[Any, str]:
    """The estimator and the prefix its grid parameters need."""
    if model == "xgboost":
        return _xgboost_classifier(seed), ""
    if model == "random_forest":
        return RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1), ""
    if model == "logistic_l1":
        # liblinear is binary only: one-vs-rest for several classes, as the paper's scikit-learn did.
        return (_l1_logistic(), "") if n_classes == 2 else (OneVsRestClassifier(_l1_logistic()), "estimator__")
    raise ConfigError(f"unknown B3 model {model!r}; choose from {list(B3_MODELS)}")


def _importances(model: str, est: Any, features: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
    if model in ("xgboost", "random_forest"):
        return {"feature_importance": dict(zip(features, (float(x) for x in est.feature_importances_)))}
    if len(classes) == 2:
        return {"coefficients": {f"{classes[1]} vs {classes[0]}": dict(zip(features, est.coef_[0].tolist()))}}
    return {"coefficients": {c: dict(zip(features, e.coef_[0].tolist()))
                             for c, e in zip(classes, est.estimators_)}}


def labels_models(
    df: pd.DataFrame,
    *,
    target: str = "race",
    label_cols: Sequence[str],
    seed: int = DEFAULT_SEED,
    n_folds: int = 5,
    models: Sequence[str] = B3_MODELS,
    label_policy: str = "ones",
    grids: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    classes: Sequence[str] | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    split_col: str | None = None,
    patient_col: str = "patient_id",
    n_bootstrap: int = 1000,
    level: float = 0.95,
    n_jobs: int = 1,
) -> dict[str, Any]:
    """B3: predict the target from disease labels with XGBoost, random forest and L1 logistic regression.

    Trees: 100 estimators, ``max_depth`` searched over 1..6; L1 logistic regression (liblinear,
    one-vs-rest for more than two classes): ``C`` over 13 log-spaced values 1e-5..10. Everything
    else at library defaults. Hyper-parameters by ``n_folds``-fold :class:`StratifiedGroupKFold`
    (grouped by patient) on the 70% training patients, scored by (macro one-vs-rest) ROC-AUC; the
    best refits on all training rows and is tested on the 30% test patients. ``grids`` overrides
    a model's grid, e.g. ``{"random_forest": {"max_depth": [1, 2]}}``.

    Returns a dict with ``models`` (chosen parameters, CV scores per grid point, test metrics,
    importances or coefficients), ``auc_table`` (tidy DataFrame: model, class, auc, CI),
    ``predictions``, ``split`` and the patient ``assignment``.
    """
    unknown = [m for m in models if m not in B3_MODELS]
    if unknown or not models:
        raise ConfigError(f"unknown or no B3 model(s) {unknown or list(models)}; choose from {list(B3_MODELS)}")
    for m in grids or {}:
        if m not in B3_MODELS:
            raise ConfigError(f"grids names unknown model {m!r}; choose from {list(B3_MODELS)}")
    _require_columns(df, [target, patient_col, *label_cols], "B3 (race ~ disease labels)")
    data, cls, dropped = _prepare_target(df, target, classes)
    X = encode_labels(data, label_cols, policy=label_policy)
    split = _train_test(data, target=target, seed=seed, ratios=ratios, split_col=split_col,
                        patient_col=patient_col)
    tr, te = (split == "train").to_numpy(), (split == "test").to_numpy()
    code = {c: i for i, c in enumerate(cls)}
    y = data[target].map(code).to_numpy()
    groups = data[patient_col].astype(str).to_numpy()
    Xv = X.to_numpy(dtype=np.float64)
    scoring = "roc_auc" if len(cls) == 2 else "roc_auc_ovr"
    cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)

    results: dict[str, Any] = {}
    auc_rows: list[dict[str, Any]] = []
    preds: list[pd.DataFrame] = []
    for model in models:
        est, prefix = _estimator(model, len(cls), seed)
        grid = {k: list(v) for k, v in (grids or {}).get(model, DEFAULT_GRIDS[model]).items()}
        if not grid or any(len(v) == 0 for v in grid.values()):
            raise ConfigError(f"grid for {model!r} is empty: {grid}")
        search = GridSearchCV(est, {prefix + k: v for k, v in grid.items()}, scoring=scoring, cv=cv,
                              refit=True, n_jobs=n_jobs, error_score="raise")
        try:
            search.fit(Xv[tr], y[tr], groups=groups[tr])
        except ValueError as exc:
            raise SplitError(f"B3 {model}: cross-validation on the training patients failed ({exc}); "
                             "use fewer folds or more patients per class") from None
        probs = search.predict_proba(Xv[te])
        pred = _pred_frame(data.loc[te], probs, cls, target=target, patient_col=patient_col)
        metrics = _evaluate(pred, cls, n_bootstrap=n_bootstrap, seed=seed, level=level)
        cvr = search.cv_results_
        cv_rows = [{**{k: cvr[f"param_{prefix}{k}"][i] for k in grid},
                    "mean_auc": float(cvr["mean_test_score"][i]), "std_auc": float(cvr["std_test_score"][i])}
                   for i in range(len(cvr["mean_test_score"]))]
        best = {k[len(prefix):]: _plain(v) for k, v in search.best_params_.items()}
        results[model] = {"grid": grid, "best_params": best, "cv_best_auc": float(search.best_score_),
                          "cv": [{k: _plain(v) for k, v in r.items()} for r in cv_rows],
                          "metrics": metrics,
                          **_importances(model, search.best_estimator_, list(X.columns), cls)}
        auc_rows += [dict(r, **{"best_params": json.dumps(best)}) for r in
                     _auc_rows("b3", model, metrics, cls, pred)]
        preds.append(pred.assign(model=model))
    return {"analysis": "b3", "target": target, "classes": cls, "label_cols": list(label_cols),
            "features": list(X.columns), "label_policy": label_policy,
            "label_policy_text": LABEL_POLICIES[label_policy], "rows_dropped": dropped,
            "cv": {"n_folds": n_folds, "splitter": "StratifiedGroupKFold (groups = patients)",
                   "scoring": scoring},
            "split": _split_summary(data, split, target=target, patient_col=patient_col, seed=seed,
                                    ratios=ratios, split_col=split_col),
            "models": results, "auc_table": pd.DataFrame(auc_rows),
            "predictions": pd.concat(preds, ignore_index=True),
            "assignment": _assignment(data, split, patient_col)}


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


# ----------------------------------------------------------------------------------------------
# chi-square


def chi_square(
    df: pd.DataFrame,
    *,
    attribute: str,
    stratum: str,
    unit: str = "images",
    patient_col: str = "patient_id",
    correction: bool = True,
) -> dict[str, Any]:
    """Chi-square test of independence of ``attribute`` (rows) and ``stratum`` (columns).

    ``unit="images"`` (default) counts rows; ``"patients"`` counts each patient once, with the
    values of their first row that has both recorded (the number of patients whose stratum varies
    is reported). Rows missing either value are left out (counted). ``correction`` is scipy's Yates
    correction, applied only to 2x2 tables. Returns the table, statistic, dof, p, expected counts,
    Cramér's V and a warning when an expected count is below 5.
    """
    if unit not in ("images", "patients"):
        raise ConfigError(f"chi-square unit {unit!r} must be 'images' or 'patients'")
    need = [attribute, stratum] + ([patient_col] if unit == "patients" else [])
    _require_columns(df, need, f"chi-square of {attribute!r} by {stratum!r}")
    complete = df[attribute].notna() & df[stratum].notna()
    data = df.loc[complete]
    varying = None
    if unit == "patients":
        varying = int((data.groupby(patient_col, sort=False)[stratum].nunique() > 1).sum())
        data = data.drop_duplicates(patient_col, keep="first")
    table = pd.crosstab(data[attribute].astype(str), data[stratum].astype(str))
    table = table.reindex(columns=_stratum_order(table.columns))
    if table.shape[0] < 2 or table.shape[1] < 2:
        raise CohortError(
            f"chi-square of {attribute!r} by {stratum!r} needs at least two values of each; "
            f"found {list(table.index)} by {list(table.columns)}"
        )
    res = chi2_contingency(table.to_numpy(), correction=correction)
    expected = pd.DataFrame(res.expected_freq, index=table.index, columns=table.columns)
    out: dict[str, Any] = {
        "attribute": attribute, "stratum": stratum, "unit": unit, "n": int(table.to_numpy().sum()),
        "rows_missing": int((~complete).sum()),
        "table": {str(r): {str(c): int(table.loc[r, c]) for c in table.columns} for r in table.index},
        "statistic": float(res.statistic), "dof": int(res.dof), "p": float(res.pvalue),
        "cramers_v": float(association(table.to_numpy(), method="cramer")),
        "expected": {str(r): {str(c): float(expected.loc[r, c]) for c in table.columns} for r in table.index},
        "yates_correction": bool(correction and res.dof == 1),
    }
    if varying is not None:
        out["patients_with_varying_stratum"] = varying
    if (res.expected_freq < 5).any():
        out["warning"] = "some expected counts are below 5: the chi-square approximation is unreliable"
    return out


def _stratum_order(cols: Sequence[str]) -> list[str]:
    """Known group orders (BMI, age) in their natural order; anything else sorted."""
    for order in (("<18.5", "18.5-25", "25-30", ">=30"), ("0-20", "20-40", "40-60", "60-80", "80+")):
        if set(cols) <= set(order):
            return [c for c in order if c in set(cols)]
    return sorted(cols)


# ----------------------------------------------------------------------------------------------
# dispatch and output


def run_confounders(df: pd.DataFrame, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Run the analyses named in ``spec["analyses"]`` (``b1``, ``b2``, ``b3``, ``chi_square``).

    Keys: target (default race), classes, label_cols and label_policy (b3), models, grids, n_folds,
    bmi_col, density_col, density_coding, age_col, strata (chi-square strata; ``bmi_group`` and
    ``age_group`` are derived from ``bmi``/``age`` when absent; default ``["bmi_group"]``),
    chi_square_unit, seed, ratios, split_col, n_bootstrap, level, patient_col, n_jobs.
    """
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise ConfigError(f"unknown confounder option(s) {unknown}; allowed: {sorted(_SPEC_KEYS)}")
    analyses = spec.get("analyses")
    if isinstance(analyses, str) or not analyses:
        raise ConfigError("confounders: 'analyses' must be a non-empty list, e.g. [b1, b3, chi_square]")
    bad = [a for a in analyses if a not in _ANALYSES]
    if bad:
        raise ConfigError(f"unknown analyses {bad}; choose from {list(_ANALYSES)}")
    target = spec.get("target", "race")
    common = {"target": target, "seed": int(spec.get("seed", DEFAULT_SEED)),
              "classes": spec.get("classes"), "ratios": tuple(spec.get("ratios", DEFAULT_RATIOS)),
              "split_col": spec.get("split_col"), "patient_col": spec.get("patient_col", "patient_id"),
              "n_bootstrap": int(spec.get("n_bootstrap", 1000)), "level": float(spec.get("level", 0.95))}
    out: dict[str, Any] = {"target": target, "analyses": {}}
    if "b1" in analyses:
        out["analyses"]["b1"] = bmi_glm(df, bmi_col=spec.get("bmi_col", "bmi"), **common)
    if "b2" in analyses:
        out["analyses"]["b2"] = density_logit(
            df, density_col=spec.get("density_col", "density"), age_col=spec.get("age_col", "age"),
            coding=spec.get("density_coding", "categorical"), **common)
    if "b3" in analyses:
        if not spec.get("label_cols"):
            raise ConfigError("analysis b3 needs 'label_cols': the disease-label columns")
        out["analyses"]["b3"] = labels_models(
            df, label_cols=list(spec["label_cols"]), n_folds=int(spec.get("n_folds", 5)),
            models=tuple(spec.get("models", B3_MODELS)), label_policy=spec.get("label_policy", "ones"),
            grids=spec.get("grids"), n_jobs=int(spec.get("n_jobs", 1)), **common)
    if "chi_square" in analyses:
        strata = spec.get("strata", ["bmi_group"])
        if isinstance(strata, str):
            strata = [strata]
        strata = [s for s in strata if s != target]   # the attribute against itself tells nothing
        data = _with_derived(df, strata, bmi_col=spec.get("bmi_col", "bmi"), age_col=spec.get("age_col", "age"))
        out["analyses"]["chi_square"] = [
            chi_square(data, attribute=target, stratum=s, unit=spec.get("chi_square_unit", "images"),
                       patient_col=common["patient_col"]) for s in strata]
    return out


def _with_derived(df: pd.DataFrame, strata: Sequence[str], *, bmi_col: str, age_col: str) -> pd.DataFrame:
    out = df
    for s, src, fn in (("bmi_group", bmi_col, bmi_group), ("age_group", age_col, age_group)):
        if s in strata and s not in df.columns and src in df.columns:
            out = out.assign(**{s: fn(df[src])})
    return out


_FRAME_FILES = ("predictions", "assignment")


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: DataFrames as record lists, numpy scalars as Python, NaN/inf as None."""
    if isinstance(obj, pd.DataFrame):
        return [to_jsonable(r) for r in obj.to_dict("records")]
    if isinstance(obj, pd.Series):
        return to_jsonable(obj.to_dict())
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is pd.NA or obj is pd.NaT:
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _as_run(result: Mapping[str, Any]) -> Mapping[str, Any]:
    if "analyses" in result:
        return result
    if "analysis" in result:
        return {"target": result.get("target"), "analyses": {result["analysis"]: result}}
    if "statistic" in result:
        return {"target": result.get("attribute"), "analyses": {"chi_square": [result]}}
    raise ConfigError("write_confounders expects the result of run_confounders or of one analysis")


def write_confounders(result: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``confounders.json`` (NaN -> null), ``confounders.md`` and, per analysis, its test
    predictions and patient split as ``<analysis>_predictions.csv`` / ``<analysis>_split.csv``."""
    run = _as_run(result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    summary: dict[str, Any] = {"target": run.get("target"), "analyses": {}}
    for name, res in run["analyses"].items():
        if isinstance(res, Mapping):
            summary["analyses"][name] = {k: v for k, v in res.items() if k not in _FRAME_FILES}
            for key in _FRAME_FILES:
                frame = res.get(key)
                if isinstance(frame, pd.DataFrame) and len(frame):
                    p = out / f"{name}_{'split' if key == 'assignment' else key}.csv"
                    frame.to_csv(p, index=False)
                    paths[f"{name}_{key}"] = p
        else:
            summary["analyses"][name] = res
    paths["json"] = out / "confounders.json"
    paths["json"].write_text(json.dumps(to_jsonable(summary), indent=2, allow_nan=False) + "\n")
    paths["markdown"] = out / "confounders.md"
    paths["markdown"].write_text(confounders_markdown(run))
    return paths


def _fmt(v: Any, digits: int = 3) -> str:
    f = _float(v)
    if math.isnan(f):
        return "-"
    if f != 0 and abs(f) < 10 ** -digits:
        return f"{f:.1e}"
    return f"{f:.{digits}f}"


def _params(p: Mapping[str, Any]) -> str:
    """``max_depth=3`` / ``C in {1e-05, 3.16e-05, ...}`` for reports."""
    def g(v: Any) -> str:
        return format(v, ".3g") if isinstance(v, float) else str(v)
    return ", ".join(f"{k} in {{{', '.join(g(x) for x in v)}}}" if isinstance(v, (list, tuple)) else f"{k}={g(v)}"
                     for k, v in p.items())


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return lines + [""]


_TITLES = {"b1": "B1: target from BMI (binomial GLM)", "b2": "B2: target from breast density (binomial GLM)",
           "b3": "B3: target from disease labels"}


def _one_row_if_binary(auc: pd.DataFrame) -> pd.DataFrame:
    """For a two-class target both one-vs-rest AUCs are the same number: one row per model, "A vs B"."""
    classes = [c for c in dict.fromkeys(auc["class"]) if c != "macro"]
    if len(classes) != 2:
        return auc
    out = auc[auc["class"] == classes[1]].copy()
    out["class"] = f"{classes[0]} vs {classes[1]}"
    return out


def confounders_markdown(result: Mapping[str, Any]) -> str:
    """A readable Markdown report of :func:`run_confounders` output."""
    run = _as_run(result)
    lines = [f"# Confounder analyses (target: {run.get('target')})", ""]
    for name, res in run["analyses"].items():
        if name == "chi_square":
            for r in res:
                lines += [f"## Chi-square: {r['attribute']} by {r['stratum']} ({r['unit']})", ""]
                cols = list(next(iter(r["table"].values())).keys())
                lines += _md_table([r["attribute"], *cols, "total"],
                                   [[a, *(row[c] for c in cols), sum(row.values())] for a, row in r["table"].items()])
                lines += [f"chi2 = {_fmt(r['statistic'], 2)}, dof = {r['dof']}, p = {_fmt(r['p'], 4)}, "
                          f"Cramér's V = {_fmt(r['cramers_v'])}, n = {r['n']}"
                          + (f"; {r['warning']}" if r.get("warning") else ""), ""]
            continue
        lines += [f"## {_TITLES.get(name, name)}", ""]
        sp = res.get("split", {})
        if sp:
            lines += [f"Split by {sp.get('by')} (seed {sp.get('seed')}): train {sp['train']['patients']} patients "
                      f"/ {sp['train']['rows']} rows, test {sp['test']['patients']} patients / "
                      f"{sp['test']['rows']} rows.", ""]
        for key, text in (("rows_dropped", "Rows dropped"), ("exclusions", "Exclusions"),
                          ("wall_time_s", "Wall time (s)")):
            if res.get(key):
                lines += [f"{text}: " + ", ".join(f"{k} {v}" for k, v in res[key].items()) + ".", ""]
        if name == "b3":
            lines += [f"Label policy `{res['label_policy']}`: {res['label_policy_text']}. "
                      f"{res['cv']['n_folds']}-fold {res['cv']['splitter']}, scoring {res['cv']['scoring']}.", ""]
        auc = res.get("auc_table")
        if isinstance(auc, pd.DataFrame) and len(auc):
            auc = _one_row_if_binary(auc)
            lines += _md_table(["model", "class", "AUC", "CI", "test patients", "test rows"],
                               [[r["model"], r["class"], _fmt(r["auc"]),
                                 f"[{_fmt(r['auc_ci_low'])}, {_fmt(r['auc_ci_high'])}]",
                                 r["test_patients"], r["test_rows"]] for r in auc.to_dict("records")])
        for mname, m in res.get("models", {}).items():
            if "skipped" in m:
                lines += [f"- {mname}: skipped ({m['skipped']})"]
            if name == "b3":
                lines += [f"- {mname}: chosen {_params(m['best_params'])} (CV AUC {_fmt(m['cv_best_auc'])}) "
                          f"from {_params(m['grid'])}"]
            for w in m.get("warnings", []) or []:
                lines += [f"- warning: {w}"]
        lines += [""]
        coef = res.get("coefficients")
        if isinstance(coef, pd.DataFrame) and len(coef):
            lines += _md_table(["model", "class", "term", "coef", "SE", "p", "odds ratio"],
                               [[r["model"], r["class"], r["term"], _fmt(r["coef"], 4), _fmt(r["se"], 4),
                                 _fmt(r["p"], 4), _fmt(r["odds_ratio"])] for r in coef.to_dict("records")])
    return "\n".join(lines).rstrip() + "\n"

"""Classification metrics of a predictions table and the metrics.json schema.

A predictions table has one row per test image: ``image_id``, ``patient_id``, optional ``study_id``,
``label`` (the true class, a string) and one probability column ``prob_<class>`` per class, in any
column order, plus optional stratum columns (view, sex, age_group, ...). The paper group's published
form ``index, asian_pred, black_pred, white_pred, race_ground_truth`` (ground truth as strings or as
codes 0/1/2 = Asian/Black/White) is accepted too; it has no patient id, so every row is its own
cluster (with a warning).

:func:`evaluate_predictions` returns the ``readingrace.metrics/1`` dictionary documented in
``docs/metrics-schema.md``: per class one-vs-rest ROC-AUC, sensitivity and specificity at a
probability threshold, macro AUC, with patient-clustered bootstrap and DeLong intervals.
:func:`compare_predictions` gives the paired comparison of two prediction sets on the same images.

No torch here: numpy, scipy, pandas and scikit-learn only.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from sklearn.metrics import roc_curve

from readingrace.errors import CohortError, ConfigError, RunError
from readingrace.stats.intervals import (
    DEFAULT_LEVEL,
    DEFAULT_N_BOOTSTRAP,
    DEFAULT_SEED,
    WeightedAUC,
    bootstrap_replicates,
    check_options,
    cluster_codes,
    delong_auc,
    delong_paired,
    percentile_ci,
)

SCHEMA = "readingrace.metrics/1"
COMPARISON_SCHEMA = "readingrace.comparison/1"
CI_METHOD = "patient-clustered stratified percentile bootstrap"
DELONG_TRANSFORM = "logit"
DELONG_NOTE = (
    "DeLong variance from structural components (Sun & Xu 2014 fast algorithm, midranks, ties count "
    "1/2); Wald interval on the logit scale, back-transformed (stays within [0, 1]; an AUC of exactly "
    "0 or 1 gives a zero-width interval). DeLong treats images as independent: it ignores patient "
    "clustering, so with several images per patient its interval is too narrow. Prefer auc_ci."
)
PAIRED_DELONG_NOTE = (
    "paired DeLong (Sun & Xu 2014, midranks): Var(a) + Var(b) - 2 Cov(a, b), Wald interval clipped "
    "to [-1, 1], two-sided p-value for a zero difference; it ignores patient clustering"
)
DEFAULT_THRESHOLD = 0.5
PROB_PREFIX = "prob_"
#: The paper group's published predictions form: column -> class.
PAPER_PRED_COLUMNS: dict[str, str] = {"asian_pred": "Asian", "black_pred": "Black", "white_pred": "White"}
PAPER_LABEL_COLUMN = "race_ground_truth"
_BASE_COLUMNS = ("image_id", "patient_id", "study_id", "label")
_UNCLUSTERED_WARNING = (
    "no patient_id column: every image is treated as its own patient, so the bootstrap CI ignores "
    "patient clustering (too narrow when patients have several images); add patient_id to fix this"
)

__all__ = [
    "CI_METHOD", "COMPARISON_SCHEMA", "SCHEMA", "PreparedPredictions", "aggregate_studies",
    "compare_predictions", "evaluate_predictions", "one_vs_rest_auc", "prepare_predictions",
    "read_metrics", "sensitivity_specificity", "to_json_dict", "write_json", "write_metrics",
    "youden_threshold",
]


# --------------------------------------------------------------------------------------------
# input: the predictions table
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreparedPredictions:
    """A validated predictions table in the standard form.

    ``frame`` has ``image_id``, ``patient_id``, ``study_id`` (None where missing) and ``label`` as
    strings, ``prob_<class>`` as float in the order of ``classes``, then any other columns.
    ``clustered`` is False when patient ids were absent (each image its own patient).
    """

    frame: pd.DataFrame
    classes: tuple[str, ...]
    clustered: bool = True
    warnings: tuple[str, ...] = ()
    source: str = "predictions"

    @property
    def prob_columns(self) -> list[str]:
        return [PROB_PREFIX + c for c in self.classes]

    @property
    def label_codes(self) -> NDArray[np.intp]:
        """Index of each row's label in :attr:`classes`."""
        cat = pd.Categorical(self.frame["label"].astype(object), categories=list(self.classes))
        return np.asarray(cat.codes, dtype=np.intp)

    @property
    def probs(self) -> NDArray[np.float64]:
        """(n, n_classes) probabilities in the order of :attr:`classes`."""
        return self.frame[self.prob_columns].to_numpy(dtype=np.float64)

    def subset(self, mask: NDArray[np.bool_]) -> PreparedPredictions:
        return replace(self, frame=self.frame.loc[mask].reset_index(drop=True))


def _missing(values: pd.Series) -> NDArray[np.bool_]:
    """Missing or blank (after stripping) cells."""
    obj = values.astype(object)
    miss = obj.isna().to_numpy(dtype=bool).copy()
    blank = obj[~miss].astype(str).str.strip().eq("").to_numpy(dtype=bool)
    miss[np.flatnonzero(~miss)[blank]] = True
    return miss


def _as_str(values: pd.Series) -> pd.Series:
    """Values as stripped strings (integer-valued floats without '.0'); missing -> None."""
    obj = values.astype(object)
    if pd.api.types.is_float_dtype(values.dtype):
        arr = values.to_numpy(dtype=np.float64)
        whole = np.isfinite(arr) & (arr == np.round(arr))
        obj = obj.copy()
        obj[whole] = arr[whole].astype(np.int64).astype(str)
    miss = obj.isna().to_numpy(dtype=bool).copy()
    out = obj.astype(str).str.strip().astype(object)
    out[miss] = None
    return out


class _Locator:
    """Names a row for error messages: 'line N' of a CSV file (header = line 1) or 'row N' of a table."""

    def __init__(self, source: str, file_rows: bool):
        self.source = source
        self.file_rows = file_rows

    def __call__(self, i: int, image_id: Any = None) -> str:
        where = f"line {i + 2}" if self.file_rows else f"row {i + 1}"
        if image_id is not None and not (isinstance(image_id, float) and math.isnan(image_id)):
            where += f" (image_id {image_id!r})"
        return f"{self.source}, {where}"


def _from_paper_form(df: pd.DataFrame, loc: _Locator, classes: Sequence[str] | None) -> tuple[pd.DataFrame, bool]:
    """Convert ``index, asian_pred, black_pred, white_pred, race_ground_truth`` to the standard form."""
    missing = [c for c in PAPER_PRED_COLUMNS if c not in df.columns]
    if missing:
        raise CohortError(
            f"{loc.source}: paper-form predictions need columns {', '.join(PAPER_PRED_COLUMNS)} and "
            f"{PAPER_LABEL_COLUMN}; missing {', '.join(missing)}"
        )
    out = pd.DataFrame(index=df.index)
    if "image_id" in df.columns:
        out["image_id"] = df["image_id"]
    elif "index" in df.columns:
        out["image_id"] = df["index"]
    elif "Unnamed: 0" in df.columns:
        out["image_id"] = df["Unnamed: 0"]
    else:
        out["image_id"] = [str(i) for i in range(len(df))]
    clustered = "patient_id" in df.columns
    out["patient_id"] = df["patient_id"] if clustered else out["image_id"]
    out["study_id"] = df["study_id"] if "study_id" in df.columns else None

    gt = _as_str(df[PAPER_LABEL_COLUMN])
    by_code = {"0": "Asian", "1": "Black", "2": "White"}
    by_name = {v.lower(): v for v in PAPER_PRED_COLUMNS.values()}
    labels: list[str | None] = []
    for i, v in enumerate(gt):
        if v is None:
            labels.append(None)
        elif v in by_code:
            labels.append(by_code[v])
        elif v.lower() in by_name:
            labels.append(by_name[v.lower()])
        else:
            raise CohortError(
                f"{loc(i, out['image_id'].iloc[i])}, column {PAPER_LABEL_COLUMN!r}: value {v!r} is not "
                "one of Asian/Black/White or the codes 0/1/2 (0 = Asian, 1 = Black, 2 = White)"
            )
    out["label"] = labels
    for col, cls in PAPER_PRED_COLUMNS.items():
        out[PROB_PREFIX + cls] = df[col]
    skip = set(PAPER_PRED_COLUMNS) | {PAPER_LABEL_COLUMN, "index", "Unnamed: 0", *_BASE_COLUMNS}
    for col in df.columns:
        if col not in skip:
            out[col] = df[col]
    if classes is not None and set(classes) != set(PAPER_PRED_COLUMNS.values()):
        raise ConfigError(
            f"{loc.source}: paper-form predictions have classes Asian, Black, White; got classes={list(classes)}"
        )
    return out, clustered


def prepare_predictions(
    pred: pd.DataFrame,
    *,
    classes: Sequence[str] | None = None,
    source: str = "predictions",
    file_rows: bool = False,
) -> PreparedPredictions:
    """Validate a predictions table and bring it to the standard form.

    Raises :class:`CohortError` naming ``source``, the row (``line N`` of a CSV when ``file_rows``)
    and the column for: missing columns, fewer than two classes, missing ids or labels, labels not
    among the classes, probabilities that are not numbers, NaN, or outside [0, 1], duplicate image ids.
    ``classes=None`` takes the classes from the ``prob_<class>`` columns, sorted.
    """
    if not isinstance(pred, pd.DataFrame):
        raise CohortError(f"{source}: expected a pandas DataFrame of predictions, got {type(pred).__name__}")
    if len(pred) == 0:
        raise CohortError(f"{source}: the predictions table has no rows")
    loc = _Locator(source, file_rows)
    df = pred.reset_index(drop=True)
    df.columns = [str(c).strip() for c in df.columns]
    notes: list[str] = []
    display = {c: c for c in df.columns}

    if PAPER_LABEL_COLUMN in df.columns and "label" not in df.columns:
        df, clustered = _from_paper_form(df, loc, classes)
        display.update({PROB_PREFIX + v: k for k, v in PAPER_PRED_COLUMNS.items()})
        display["label"] = PAPER_LABEL_COLUMN
        if not clustered:
            notes.append(f"{source}: {_UNCLUSTERED_WARNING}")
    else:
        clustered = True
        required = ["image_id", "patient_id", "label"]
        lacking = [c for c in required if c not in df.columns]
        if lacking:
            shown = ", ".join(map(str, list(df.columns)[:12]))
            raise CohortError(
                f"{source}: missing column(s) {', '.join(lacking)} (found: {shown}). A predictions table "
                "needs image_id, patient_id, label and one prob_<class> column per class, or the "
                "paper form index, asian_pred, black_pred, white_pred, race_ground_truth"
            )
        if "study_id" not in df.columns:
            df["study_id"] = None

    found = [c[len(PROB_PREFIX):] for c in df.columns if c.startswith(PROB_PREFIX)]
    if classes is None:
        cls = tuple(sorted(found))
    else:
        cls = tuple(str(c) for c in classes)
        if len(set(cls)) != len(cls):
            raise ConfigError(f"{source}: classes contain duplicates: {list(cls)}")
        absent = [PROB_PREFIX + c for c in cls if c not in found]
        if absent:
            raise CohortError(
                f"{source}: missing probability column(s) {', '.join(absent)} for the requested classes "
                f"{list(cls)} (found {[PROB_PREFIX + f for f in found]})"
            )
        extra = [PROB_PREFIX + f for f in found if f not in cls]
        if extra:
            notes.append(f"{source}: probability column(s) {', '.join(extra)} ignored (not among classes {list(cls)})")
    if len(cls) < 2:
        raise CohortError(
            f"{source}: need a prob_<class> column for each of at least two classes, found "
            f"{[PROB_PREFIX + f for f in found]} (for a binary target give both, e.g. prob_F and prob_M)"
        )

    ids = _as_str(df["image_id"])
    for col in ("image_id", "patient_id", "label"):
        bad = np.flatnonzero(_missing(df[col]))
        if bad.size:
            i = int(bad[0])
            hint = ("fill it in or drop the row" if col != "patient_id"
                    else "every image needs its patient's id (the bootstrap resamples patients)")
            raise CohortError(
                f"{loc(i, ids.iloc[i])}, column {display.get(col, col)!r}: value is missing "
                f"({bad.size} row(s) in all); {hint}"
            )
    dup = ids.duplicated(keep=False).to_numpy()
    if dup.any():
        first_id = ids[dup].iloc[0]
        rows = np.flatnonzero((ids == first_id).to_numpy())[:2]
        raise CohortError(
            f"{source}: duplicate image_id {first_id!r} at {loc(int(rows[0])).split(', ', 1)[1]} and "
            f"{loc(int(rows[1])).split(', ', 1)[1]} ({int(dup.sum())} rows share an id); each test image "
            "must appear once"
        )
    labels = _as_str(df["label"])
    unknown = ~labels.isin(cls).to_numpy()
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise CohortError(
            f"{loc(i, ids.iloc[i])}, column {display.get('label', 'label')!r}: label {labels.iloc[i]!r} is "
            f"not among the classes {list(cls)} ({int(unknown.sum())} row(s) in all); add a "
            f"{PROB_PREFIX}{labels.iloc[i]} column or drop those rows"
        )

    out = pd.DataFrame({
        "image_id": ids,
        "patient_id": _as_str(df["patient_id"]),
        "study_id": _as_str(df["study_id"]),
        "label": labels,
    })
    for c in cls:
        col = PROB_PREFIX + c
        raw = df[col]
        num = pd.to_numeric(raw.astype(object), errors="coerce").astype(np.float64)
        values = num.to_numpy()
        shown = display.get(col, col)
        not_number = np.isnan(values) & ~_missing(raw)
        if not_number.any():
            i = int(np.flatnonzero(not_number)[0])
            raise CohortError(
                f"{loc(i, ids.iloc[i])}, column {shown!r}: value {raw.iloc[i]!r} is not a number"
            )
        if np.isnan(values).any():
            i = int(np.flatnonzero(np.isnan(values))[0])
            raise CohortError(
                f"{loc(i, ids.iloc[i])}, column {shown!r}: probability is missing (NaN) "
                f"({int(np.isnan(values).sum())} row(s) in all); predictions must be complete"
            )
        outside = (values < 0.0) | (values > 1.0)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise CohortError(
                f"{loc(i, ids.iloc[i])}, column {shown!r}: value {float(values[i]):g} is outside [0, 1] "
                f"({int(outside.sum())} row(s) in all); give probabilities (softmax/sigmoid), not logits"
            )
        out[col] = values
    for col in df.columns:
        if col not in out.columns and not col.startswith(PROB_PREFIX) and col not in _BASE_COLUMNS:
            out[col] = df[col].to_numpy()

    sums = out[[PROB_PREFIX + c for c in cls]].sum(axis=1).to_numpy()
    dev = np.abs(sums - 1.0)
    if (dev > 0.01).any():
        notes.append(
            f"{source}: the probabilities of {int((dev > 0.01).sum())} row(s) do not sum to 1 (largest "
            f"deviation {float(dev.max()):.3g}); fine for one-vs-rest (sigmoid) outputs: each class is "
            "scored on its own probability"
        )
    return PreparedPredictions(out, cls, clustered, tuple(notes), source)


def _ensure_prepared(
    pred: pd.DataFrame | PreparedPredictions, classes: Sequence[str] | None, source: str
) -> PreparedPredictions:
    if isinstance(pred, PreparedPredictions):
        if classes is not None and tuple(classes) != pred.classes:
            if set(classes) != set(pred.classes):
                raise ConfigError(f"{pred.source}: classes {list(classes)} differ from {list(pred.classes)}")
            return prepare_predictions(pred.frame, classes=classes, source=pred.source)
        return pred
    return prepare_predictions(pred, classes=classes, source=source)


# --------------------------------------------------------------------------------------------
# point metrics
# --------------------------------------------------------------------------------------------
def one_vs_rest_auc(labels: Sequence[str] | NDArray[Any], probs: NDArray[np.float64], classes: Sequence[str]) -> dict[str, float]:
    """Per-class one-vs-rest ROC-AUC (ties count 1/2); NaN for a class without positives or negatives.

    ``probs[:, k]`` is the probability of ``classes[k]``.
    """
    lab = np.asarray(labels, dtype=object)
    p = np.asarray(probs, dtype=np.float64)
    out = {}
    for k, c in enumerate(classes):
        stat = WeightedAUC(lab == c, p[:, k], np.arange(lab.size), lab.size)
        out[str(c)] = float(stat(np.ones((1, lab.size)))[0])
    return out


def sensitivity_specificity(positive: NDArray[np.bool_], score: NDArray[np.float64], threshold: float) -> tuple[float, float]:
    """Sensitivity and specificity with ``score >= threshold`` called positive (NaN for an empty class)."""
    pos = np.asarray(positive, dtype=bool)
    called = np.asarray(score, dtype=np.float64) >= threshold
    sens = float(called[pos].mean()) if pos.any() else math.nan
    spec = float((~called[~pos]).mean()) if (~pos).any() else math.nan
    return sens, spec


def youden_threshold(positive: NDArray[np.bool_], score: NDArray[np.float64]) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1 (``score >= t`` is positive).

    Among equal J the highest threshold wins. NaN when a class is empty.
    """
    pos = np.asarray(positive, dtype=bool)
    if pos.all() or not pos.any():
        return math.nan
    fpr, tpr, thr = roc_curve(pos, np.asarray(score, dtype=np.float64), drop_intermediate=False)
    j = tpr - fpr
    finite = np.isfinite(thr)
    j = np.where(finite, j, -np.inf)
    return float(thr[int(np.argmax(j))])


# --------------------------------------------------------------------------------------------
# study-level aggregation
# --------------------------------------------------------------------------------------------
def aggregate_studies(pred: pd.DataFrame | PreparedPredictions, *, classes: Sequence[str] | None = None) -> PreparedPredictions:
    """One row per study: the mean probability of its images (the paper's study prediction).

    The label and the patient must be constant within a study (else :class:`CohortError` naming the
    study). Images without a study id are their own study (with a warning). The result's
    ``image_id`` is the study id; ``n_images`` counts the images averaged.
    """
    prep = _ensure_prepared(pred, classes, "predictions")
    f = prep.frame.copy()
    notes = list(prep.warnings)
    no_study = f["study_id"].isna().to_numpy()
    if no_study.all():
        notes.append(f"{prep.source}: no study_id given: each image is its own study at study level")
    elif no_study.any():
        notes.append(f"{prep.source}: {int(no_study.sum())} image(s) without study_id are their own study")
    f["study_id"] = np.where(no_study, "image:" + f["image_id"].astype(str), f["study_id"].astype(object))
    g = f.groupby("study_id", sort=False)
    for col, what in (("label", "label"), ("patient_id", "patient")):
        n_unique = g[col].nunique()
        bad = n_unique[n_unique > 1]
        if len(bad):
            study = bad.index[0]
            values = sorted(f.loc[f["study_id"] == study, col].unique().tolist())
            raise CohortError(
                f"{prep.source}: study {study!r} has images with different {what}s {values}; a study "
                f"prediction needs one {what} per study ({len(bad)} such study/studies): fix the study_id "
                "or evaluate at image level"
            )
    agg: dict[str, Any] = {"patient_id": "first", "label": "first", "image_id": "size"}
    agg.update({c: "mean" for c in prep.prob_columns})
    out = g.agg(agg).rename(columns={"image_id": "n_images"}).reset_index()
    out["image_id"] = out["study_id"]
    cols = ["image_id", "patient_id", "study_id", "label", *prep.prob_columns, "n_images"]
    return PreparedPredictions(out[cols], prep.classes, prep.clustered, tuple(notes), prep.source)


# --------------------------------------------------------------------------------------------
# the metric block
# --------------------------------------------------------------------------------------------
def _ci_meta(n_bootstrap: int, seed: int, level: float) -> dict[str, Any]:
    return {"method": CI_METHOD, "level": level, "n_bootstrap": n_bootstrap, "seed": seed,
            "degenerate": {}, "delong": DELONG_NOTE}


def _metric_block(
    prep: PreparedPredictions,
    *,
    level_name: str,
    n_bootstrap: int,
    seed: int,
    level: float,
    threshold: float,
    val_thresholds: Mapping[str, float] | None,
    label: str,
) -> tuple[dict[str, Any], list[str]]:
    """Point estimates, bootstrap and DeLong intervals for one set of predictions."""
    notes: list[str] = []
    f = prep.frame
    classes = prep.classes
    y = prep.label_codes
    p = prep.probs
    n = len(f)
    codes, n_pat, first = cluster_codes(f["patient_id"].to_numpy(dtype=object), n)
    studies = f["study_id"].dropna()
    n_studies = int(studies.nunique()) if len(studies) else None
    if level_name == "study":
        n_studies = n

    # statistics as functions of patient multiplicities m (b, n_patients)
    auc_stats = [WeightedAUC(y == k, p[:, k], codes, n_pat) for k in range(len(classes))]
    thresholds = [[threshold] for _ in classes]
    if val_thresholds:
        for k, c in enumerate(classes):
            t = val_thresholds.get(c, math.nan)
            if math.isfinite(t):
                thresholds[k].append(t)
    count_cols: list[NDArray[np.float64]] = []
    for k in range(len(classes)):
        pos = y == k
        count_cols.append(np.bincount(codes, weights=pos.astype(float), minlength=n_pat))
        count_cols.append(np.bincount(codes, weights=(~pos).astype(float), minlength=n_pat))
        for t in thresholds[k]:
            called = p[:, k] >= t
            count_cols.append(np.bincount(codes, weights=(pos & called).astype(float), minlength=n_pat))
            count_cols.append(np.bincount(codes, weights=(~pos & ~called).astype(float), minlength=n_pat))
    counts = np.column_stack(count_cols)

    def statistic(m: NDArray[np.float64]) -> NDArray[np.float64]:
        aucs = np.column_stack([s(m) for s in auc_stats])
        c = m @ counts
        cols = [aucs]
        j = 0
        for k in range(len(classes)):
            npos, nneg = c[:, j], c[:, j + 1]
            j += 2
            for _ in thresholds[k]:
                with np.errstate(invalid="ignore", divide="ignore"):
                    sens = np.where(npos > 0, c[:, j] / npos, np.nan)
                    spec = np.where(nneg > 0, c[:, j + 1] / nneg, np.nan)
                cols += [sens[:, None], spec[:, None]]
                j += 2
        return np.hstack(cols)

    point = statistic(np.ones((1, n_pat)))[0]
    strata = y[first]
    reps = (bootstrap_replicates(statistic, strata, n_bootstrap=n_bootstrap, seed=seed)
            if n_bootstrap > 0 else np.empty((0, point.size)))

    ci = _ci_meta(n_bootstrap, seed, level)
    degenerate: dict[str, int] = {}
    per_class: dict[str, dict[str, Any]] = {}
    vt_block: dict[str, dict[str, Any]] = {}
    valid_auc: list[int] = []
    col = len(classes)
    for k, c in enumerate(classes):
        pos = y == k
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        auc = float(point[k])
        if math.isfinite(auc):
            valid_auc.append(k)
        else:
            why = "no images of this class" if n_pos == 0 else "no images of other classes"
            msg = f"{label}: class {c!r} has {why}; its AUC is NaN and it is left out of the macro AUC"
            notes.append(msg)
        auc_ci, degenerate[f"auc:{c}"] = percentile_ci(reps[:, k], level=level)
        dl = delong_auc(pos, p[:, k], level=level, transform=DELONG_TRANSFORM)
        entry: dict[str, Any] = {
            "auc": auc, "auc_ci": list(auc_ci), "auc_ci_delong": list(dl.ci), "auc_se_delong": dl.se,
        }
        for t_i, t in enumerate(thresholds[k]):
            sens, spec = float(point[col]), float(point[col + 1])
            sens_ci, n_bad_sens = percentile_ci(reps[:, col], level=level)
            spec_ci, n_bad_spec = percentile_ci(reps[:, col + 1], level=level)
            col += 2
            if t_i == 0:
                entry.update({"sensitivity": sens, "sensitivity_ci": list(sens_ci),
                              "specificity": spec, "specificity_ci": list(spec_ci)})
                degenerate[f"sensitivity:{c}"] = n_bad_sens
                degenerate[f"specificity:{c}"] = n_bad_spec
            else:
                vt_block[c] = {"threshold": t, "sensitivity": sens, "sensitivity_ci": list(sens_ci),
                               "specificity": spec, "specificity_ci": list(spec_ci)}
        entry.update({"n_positive": n_pos, "n_negative": n_neg})
        per_class[c] = entry

    if valid_auc:
        macro = float(np.mean(point[valid_auc]))
        macro_reps = reps[:, valid_auc].mean(axis=1) if reps.size else np.empty(0)
    else:
        macro, macro_reps = math.nan, np.empty(0)
        notes.append(f"{label}: no class has both positives and negatives; the macro AUC is NaN")
    macro_ci, degenerate["macro_auc"] = percentile_ci(macro_reps, level=level)
    ci["degenerate"] = degenerate
    computable = {"macro_auc": macro}
    for c, e in per_class.items():
        computable.update({f"auc:{c}": e["auc"], f"sensitivity:{c}": e["sensitivity"],
                           f"specificity:{c}": e["specificity"]})
    for key, count in degenerate.items():
        if count and n_bootstrap and math.isfinite(computable.get(key, math.nan)):
            notes.append(
                f"{label}: {count} of {n_bootstrap} bootstrap replicates could not compute {key} (a class "
                "missing from the resampled patients); they are excluded from its percentiles"
            )
    block: dict[str, Any] = {
        "level": level_name,
        "n_images": int(f["n_images"].sum()) if "n_images" in f.columns else n,
        "n_patients": n_pat,
        "n_studies": n_studies,
        "threshold": threshold,
        "ci": ci,
        "per_class": per_class,
        "macro_auc": macro,
        "macro_auc_ci": list(macro_ci),
    }
    if val_thresholds is not None:
        for c in classes:
            vt_block.setdefault(c, {"threshold": math.nan, "sensitivity": math.nan,
                                    "sensitivity_ci": [math.nan, math.nan], "specificity": math.nan,
                                    "specificity_ci": [math.nan, math.nan]})
        block["validation_threshold"] = {
            "method": "Youden's J per class, chosen on the validation predictions (never on test); "
                      "the CIs hold the threshold fixed",
            "per_class": {c: vt_block[c] for c in classes},
        }
    return block, notes


def _validation_thresholds(val: PreparedPredictions, label: str) -> tuple[dict[str, float], list[str]]:
    y = val.label_codes
    p = val.probs
    out: dict[str, float] = {}
    notes: list[str] = []
    for k, c in enumerate(val.classes):
        t = youden_threshold(y == k, p[:, k])
        if not math.isfinite(t):
            notes.append(f"{label}: class {c!r} lacks positives or negatives in the validation "
                         "predictions; no validation threshold for it")
        out[c] = t
    return out, notes


def _check_common(n_bootstrap: int, level: float, threshold: float, seed: int) -> None:
    check_options(level=level, n_bootstrap=n_bootstrap)
    if not isinstance(threshold, (int, float)) or not 0.0 <= float(threshold) <= 1.0:
        raise ConfigError(f"threshold must be a probability in [0, 1], got {threshold!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")


def evaluate_predictions(
    pred: pd.DataFrame | PreparedPredictions,
    *,
    classes: Sequence[str] | None = None,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = DEFAULT_SEED,
    level: float = DEFAULT_LEVEL,
    threshold: float = DEFAULT_THRESHOLD,
    strata: Sequence[str] = (),
    study_level: bool = False,
    val_pred: pd.DataFrame | PreparedPredictions | None = None,
) -> dict[str, Any]:
    """Metrics of a predictions table as the ``readingrace.metrics/1`` dictionary.

    Per class one-vs-rest AUC (patient-clustered stratified percentile bootstrap CI and DeLong CI),
    sensitivity/specificity at ``threshold`` (bootstrap CIs), macro AUC; optionally the same block at
    study level (mean probability per study), per value of each ``strata`` column, and at per-class
    thresholds chosen on ``val_pred`` by Youden's J. Problems that do not stop the evaluation (an
    absent class, degenerate replicates) are listed under ``"warnings"`` and raised as Python warnings.
    NaN stays NaN here; :func:`to_json_dict` writes it as null.
    """
    _check_common(n_bootstrap, level, threshold, seed)
    prep = _ensure_prepared(pred, classes, "predictions")
    if isinstance(strata, str):
        strata = (strata,)
    for s in strata:
        if s not in prep.frame.columns or s in _BASE_COLUMNS or s.startswith(PROB_PREFIX):
            avail = [c for c in prep.frame.columns if c not in _BASE_COLUMNS and not c.startswith(PROB_PREFIX)]
            raise CohortError(f"{prep.source}: stratum column {s!r} not found; available: {avail}")
    notes = list(prep.warnings)
    opts: dict[str, Any] = {"n_bootstrap": int(n_bootstrap), "seed": int(seed), "level": float(level),
                            "threshold": float(threshold)}

    val_thr: dict[str, float] | None = None
    val_study: dict[str, float] | None = None
    if val_pred is not None:
        val = _ensure_prepared(val_pred, prep.classes, "validation predictions")
        if val.classes != prep.classes:
            raise CohortError(f"{val.source}: classes {list(val.classes)} differ from the test classes {list(prep.classes)}")
        overlap = set(val.frame["patient_id"]) & set(prep.frame["patient_id"])
        if overlap and prep.clustered and val.clustered:
            notes.append(f"{val.source}: {len(overlap)} patient(s) appear in both validation and test predictions")
        val_thr, n1 = _validation_thresholds(val, "validation")
        notes += n1
        if study_level:
            val_study, n2 = _validation_thresholds(aggregate_studies(val), "validation (study level)")
            notes += n2

    block, n3 = _metric_block(prep, level_name="image", val_thresholds=val_thr, label="image level", **opts)
    notes += n3
    result: dict[str, Any] = {"schema": SCHEMA, "classes": list(prep.classes), **block}

    if study_level:
        studies = aggregate_studies(prep)
        notes += [w for w in studies.warnings if w not in notes]
        sblock, n4 = _metric_block(studies, level_name="study", val_thresholds=val_study,
                                   label="study level", **opts)
        notes += n4
        result["study"] = sblock

    if strata:
        result["strata"] = {}
        for s in strata:
            values = prep.frame[s]
            miss = _missing(values)
            if miss.any():
                notes.append(f"stratum {s}: {int(miss.sum())} image(s) without a value are left out of the strata")
            keys = _as_str(values)
            result["strata"][s] = {}
            for v in sorted(set(keys[~miss].tolist())):
                mask = (keys == v).to_numpy() & ~miss
                sub = prep.subset(mask)
                b, n5 = _metric_block(sub, level_name="image", val_thresholds=val_thr,
                                      label=f"stratum {s}={v}", **opts)
                result["strata"][s][v] = b
                notes += n5

    result["warnings"] = notes
    for w in notes:
        warnings.warn(w, UserWarning, stacklevel=2)
    return result


# --------------------------------------------------------------------------------------------
# paired comparison
# --------------------------------------------------------------------------------------------
def _align(a: PreparedPredictions, b: PreparedPredictions) -> PreparedPredictions:
    """``b`` reordered to ``a``'s rows; the image ids, labels and patients must match."""
    if a.classes != b.classes:
        if set(a.classes) != set(b.classes):
            raise CohortError(f"{b.source}: classes {list(b.classes)} differ from {a.source}'s {list(a.classes)}")
        b = prepare_predictions(b.frame, classes=a.classes, source=b.source)
    ida, idb = a.frame["image_id"], b.frame["image_id"]
    only_a = ida[~ida.isin(idb)]
    only_b = idb[~idb.isin(ida)]
    if len(only_a) or len(only_b):
        raise CohortError(
            f"paired comparison needs the same images: {len(only_a)} image_id(s) of {a.source} are not in "
            f"{b.source} (e.g. {only_a.head(3).tolist()}) and {len(only_b)} of {b.source} are not in "
            f"{a.source} (e.g. {only_b.head(3).tolist()})"
        )
    fb = b.frame.set_index("image_id").loc[ida.to_numpy()].reset_index()
    for col in ("label", "patient_id"):
        differ = (fb[col].to_numpy(dtype=object) != a.frame[col].to_numpy(dtype=object))
        if col == "patient_id" and not (a.clustered and b.clustered):
            continue
        if differ.any():
            i = int(np.flatnonzero(differ)[0])
            raise CohortError(
                f"paired comparison: image {ida.iloc[i]!r} has {col} {a.frame[col].iloc[i]!r} in {a.source} "
                f"but {fb[col].iloc[i]!r} in {b.source} ({int(differ.sum())} image(s) differ)"
            )
    return replace(b, frame=fb)


def compare_predictions(
    a: pd.DataFrame | PreparedPredictions,
    b: pd.DataFrame | PreparedPredictions,
    *,
    classes: Sequence[str] | None = None,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = DEFAULT_SEED,
    level: float = DEFAULT_LEVEL,
    study_level: bool = False,
) -> dict[str, Any]:
    """Paired comparison ``AUC(a) - AUC(b)`` of two prediction sets on the same images.

    Per class: both AUCs, the difference with a paired patient-clustered bootstrap CI (the same
    resampled patients for both sets in every replicate) and the paired DeLong SE, CI and p-value;
    the macro AUC difference with its bootstrap CI. ``study_level`` compares study means instead.
    Returns the ``readingrace.comparison/1`` dictionary (see docs/metrics-schema.md).
    """
    _check_common(n_bootstrap, level, DEFAULT_THRESHOLD, seed)
    pa = _ensure_prepared(a, classes, "predictions a")
    pb = _ensure_prepared(b, pa.classes, "predictions b")
    pb = _align(pa, pb)
    notes = list(pa.warnings) + [w for w in pb.warnings if w not in pa.warnings]
    if study_level:
        pa, pb = aggregate_studies(pa), _align(aggregate_studies(pa), aggregate_studies(pb))
    classes_t = pa.classes
    y = pa.label_codes
    n = len(pa.frame)
    codes, n_pat, first = cluster_codes(pa.frame["patient_id"].to_numpy(dtype=object), n)
    prob_a, prob_b = pa.probs, pb.probs
    stats_a = [WeightedAUC(y == k, prob_a[:, k], codes, n_pat) for k in range(len(classes_t))]
    stats_b = [WeightedAUC(y == k, prob_b[:, k], codes, n_pat) for k in range(len(classes_t))]

    def statistic(m: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.column_stack([s(m) for s in stats_a] + [s(m) for s in stats_b])

    point = statistic(np.ones((1, n_pat)))[0]
    reps = (bootstrap_replicates(statistic, y[first], n_bootstrap=n_bootstrap, seed=seed)
            if n_bootstrap > 0 else np.empty((0, point.size)))
    K = len(classes_t)
    degenerate: dict[str, int] = {}
    per_class: dict[str, dict[str, Any]] = {}
    valid = [k for k in range(K) if math.isfinite(point[k]) and math.isfinite(point[K + k])]
    for k, c in enumerate(classes_t):
        diff_reps = reps[:, k] - reps[:, K + k] if reps.size else np.empty(0)
        diff_ci, degenerate[f"auc_difference:{c}"] = percentile_ci(diff_reps, level=level)
        pos = y == k
        dl = delong_paired(pos, prob_a[:, k], prob_b[:, k], level=level)
        if k not in valid:
            notes.append(f"comparison: class {c!r} lacks positives or negatives; its AUCs are NaN")
        per_class[c] = {
            "auc_a": float(point[k]), "auc_b": float(point[K + k]),
            "difference": float(point[k] - point[K + k]), "difference_ci": list(diff_ci),
            "difference_ci_delong": list(dl.ci), "difference_se_delong": dl.se, "p_delong": dl.p_value,
            "n_positive": int(pos.sum()), "n_negative": int((~pos).sum()),
        }
    if valid:
        macro_a = float(np.mean(point[valid]))
        macro_b = float(np.mean(point[[K + k for k in valid]]))
        macro_reps = (reps[:, valid].mean(axis=1) - reps[:, [K + k for k in valid]].mean(axis=1)
                      if reps.size else np.empty(0))
    else:
        macro_a = macro_b = math.nan
        macro_reps = np.empty(0)
    macro_ci, degenerate["macro_auc_difference"] = percentile_ci(macro_reps, level=level)
    for key, count in degenerate.items():
        if count and n_bootstrap:
            notes.append(f"comparison: {count} of {n_bootstrap} bootstrap replicates could not compute {key}; "
                         "excluded from its percentiles")
    result: dict[str, Any] = {
        "schema": COMPARISON_SCHEMA,
        "a": pa.source, "b": pb.source, "difference": "a - b",
        "classes": list(classes_t),
        "level": "study" if study_level else "image",
        "n_images": n, "n_patients": n_pat,
        "ci": {"method": "paired " + CI_METHOD, "level": float(level), "n_bootstrap": int(n_bootstrap),
               "seed": int(seed), "degenerate": degenerate, "delong": PAIRED_DELONG_NOTE},
        "per_class": per_class,
        "macro_auc_a": macro_a, "macro_auc_b": macro_b,
        "macro_difference": macro_a - macro_b, "macro_difference_ci": list(macro_ci),
        "warnings": notes,
    }
    for w in notes:
        warnings.warn(w, UserWarning, stacklevel=2)
    return result


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------
def to_json_dict(obj: Any) -> Any:
    """A JSON-ready copy: NaN/inf -> None, numpy scalars/arrays -> Python, tuples -> lists, Path -> str."""
    if isinstance(obj, Mapping):
        return {str(k): to_json_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_dict(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [to_json_dict(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str):
        return obj
    if obj is pd.NA or obj is pd.NaT:
        return None
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any], *, overwrite: bool = False) -> Path:
    """Write ``to_json_dict(data)`` atomically; an existing file is an error unless ``overwrite``."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise RunError(f"{p} already exists; replace it with --overwrite (overwrite=True in Python) or choose another folder with --out")
    p.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_json_dict(data), indent=2, allow_nan=False)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, p)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunError(f"cannot write {p}: {e.strerror or e}") from e
    return p


def write_metrics(path: str | os.PathLike[str], metrics: Mapping[str, Any], *, overwrite: bool = False) -> Path:
    """Write a metrics dictionary as JSON (NaN as null); refuses to overwrite unless ``overwrite``."""
    if "schema" not in metrics:
        raise ValueError("not a metrics dictionary: no 'schema' key")
    return write_json(path, metrics, overwrite=overwrite)


def read_metrics(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a metrics.json (any ``readingrace.metrics/1`` file; extra keys kept; null stays None)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise RunError(f"{p}: no such metrics file; run `readingrace evaluate` first") from e
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{p}: not a readable metrics.json ({e})") from e
    schema = data.get("schema") if isinstance(data, dict) else None
    if not isinstance(schema, str) or not schema.startswith("readingrace.metrics/"):
        raise RunError(f"{p}: not a readingrace metrics file (schema {schema!r}, expected {SCHEMA!r})")
    if schema != SCHEMA:
        raise RunError(f"{p}: metrics schema {schema!r} is not supported by this version (reads {SCHEMA!r})")
    return data

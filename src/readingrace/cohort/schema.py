"""The cohort table: one row per image (or CT slice), its columns and its checks.

Required columns are always present (values may be missing where a source does not record them);
optional columns (disease labels, density, slice position, ...) are kept as the source gives them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd

from readingrace.errors import CohortError

#: Columns every cohort table has, in this order.
REQUIRED_COLUMNS: tuple[str, ...] = (
    "image_id", "path", "patient_id", "study_id", "dataset",
    "race", "sex", "age", "bmi", "view", "split",
)

#: The 14 CheXpert-style finding labels used by MIMIC-CXR and CheXpert (B3, A3).
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)

#: NIH ChestX-ray14 findings (the 14 labels of that set, plus "No Finding").
NIH_LABELS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
)

RACE_GROUPS: tuple[str, ...] = ("Asian", "Black", "White")
SEX_VALUES: tuple[str, ...] = ("F", "M")

#: Half-open age bins [lo, hi): 0-20, 20-40, 40-60, 60-80, 80+.
AGE_BINS: tuple[float, ...] = (0, 20, 40, 60, 80, math.inf)
AGE_LABELS: tuple[str, ...] = ("0-20", "20-40", "40-60", "60-80", "80+")
#: BMI groups: underweight < 18.5, normal [18.5, 25), overweight [25, 30), obese >= 30.
BMI_BINS: tuple[float, ...] = (-math.inf, 18.5, 25, 30, math.inf)
BMI_LABELS: tuple[str, ...] = ("<18.5", "18.5-25", "25-30", ">=30")


def _bin(values: pd.Series, edges: tuple[float, ...], labels: tuple[str, ...]) -> pd.Series:
    """Half-open binning [lo, hi) that keeps missing values missing."""
    numeric = pd.to_numeric(values, errors="coerce")
    idx = np.searchsorted(np.asarray(edges[1:-1], dtype=float), numeric.to_numpy(float), side="right")
    out = pd.Series(np.asarray(labels, dtype=object)[idx], index=values.index, dtype=object)
    out[numeric.isna() | (numeric < edges[0])] = None
    return out


def age_group(age: pd.Series) -> pd.Series:
    """Age in years -> '0-20' ... '80+' (half-open; 20.0 is '20-40'); missing or negative -> None."""
    return _bin(age, AGE_BINS, AGE_LABELS)


def bmi_group(bmi: pd.Series) -> pd.Series:
    """BMI -> '<18.5', '18.5-25', '25-30', '>=30' (half-open); missing -> None."""
    return _bin(bmi, BMI_BINS, BMI_LABELS)


def empty_cohort() -> pd.DataFrame:
    """A cohort table with the required columns and no rows."""
    return pd.DataFrame({c: pd.Series(dtype=object) for c in REQUIRED_COLUMNS})


def conform(df: pd.DataFrame, *, dataset: str | None = None) -> pd.DataFrame:
    """Add missing required columns (as missing values) and put required columns first.

    Ids are made strings; ``age`` and ``bmi`` numeric. The input is not modified.
    """
    out = df.copy()
    for col in REQUIRED_COLUMNS:
        if col not in out.columns:
            out[col] = None
    if dataset is not None:
        out["dataset"] = dataset
    for col in ("image_id", "patient_id", "study_id"):
        out[col] = out[col].map(lambda v: None if _missing(v) else str(v))
    for col in ("age", "bmi"):
        out[col] = pd.to_numeric(out[col], errors="coerce").astype(float)
    extra = [c for c in out.columns if c not in REQUIRED_COLUMNS]
    return out[list(REQUIRED_COLUMNS) + extra].reset_index(drop=True)


def _missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def validate_cohort(df: pd.DataFrame, *, require: Iterable[str] = ()) -> None:
    """Raise :class:`CohortError` if the table breaks the cohort contract.

    Checks: required columns present; ``image_id`` and ``patient_id`` never missing; ``image_id``
    unique; columns in ``require`` present and fully filled.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise CohortError(f"cohort table lacks required columns {missing}")
    for col in ("image_id", "patient_id", "path"):
        bad = df.index[df[col].isna()].tolist()
        if bad:
            raise CohortError(f"cohort column {col!r} is empty in {len(bad)} rows (first row {bad[0]})")
    dup = df["image_id"][df["image_id"].duplicated(keep=False)]
    if len(dup):
        raise CohortError(
            f"cohort has {dup.nunique()} duplicated image_id values (e.g. {dup.iloc[0]!r}); "
            "image ids must be unique"
        )
    for col in require:
        if col not in df.columns:
            raise CohortError(f"cohort table lacks column {col!r}")
        n = int(df[col].isna().sum())
        if n:
            raise CohortError(f"cohort column {col!r} is empty in {n} rows")


def patient_key(df: pd.DataFrame) -> pd.Series:
    """A patient's identity across cohorts: (dataset, patient_id), as one string. Two hospitals may both have
    a patient "1"; a table without a dataset column counts as one unnamed dataset."""
    ds = df["dataset"].fillna("").astype(str) if "dataset" in df.columns else pd.Series("", index=df.index)
    return ds + "\x1f" + df["patient_id"].astype(str)

"""A generic hospital export: one CSV row per image over PNG / JPEG / DICOM files, columns mapped in the config.

The paper's Emory CXR (EMX), the digital hand atlas and the Emory C-spine sets come in this form. Options
(``cohort.options``)::

    csv: export/images.csv            # relative to the data root
    columns: {path: file, patient_id: MRN, race: RACE, sex: SEX, age: AGE}   # cohort name -> CSV column
    race_table: generic               # a table of readingrace.cohort.race
    image_root: export/images         # folder the paths are relative to (default: the CSV's folder)

Other keys: ``study_id``, ``image_id``, ``ethnicity``, ``bmi``, ``view`` in ``columns``; ``keep`` (CSV
columns copied as they are), ``ethnicity_table``, ``exclude_hispanic`` (default true), ``check_files``
(default true), ``dataset``. A CSV may list an image more than once (one row per encounter); conflicting
race is judged on all rows *before* duplicates are collapsed.

This module also holds the small helpers shared by the MIMIC, CheXpert and DICOM sources (option and
column checks, sex and age parsing, the missing-file step).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from readingrace.cohort.manifest import Manifest
from readingrace.cohort.race import apply_race
from readingrace.cohort.schema import conform
from readingrace.errors import CohortError, ConfigError

#: At most this many individual skips are listed per reason; the step always has the full count.
MAX_SKIP_RECORDS = 1000

# -- shared helpers --------------------------------------------------------------------------------


def check_options(options: dict[str, Any], allowed: Iterable[str], source: str) -> dict[str, Any]:
    """Reject unknown option keys with a :class:`ConfigError` naming the key and the allowed ones."""
    allowed = set(allowed)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(f"cohort.options: unknown key {unknown[0]!r} for source {source!r}; "
                          f"allowed: {sorted(allowed)}")
    return dict(options)


def resolve(path: str | os.PathLike[str], root: Path) -> Path:
    """``path`` relative to ``root`` unless absolute."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(root) / p


def require_file(path: Path, what: str, hint: str = "") -> Path:
    """``path`` if it is a file, else a :class:`CohortError` saying what was expected."""
    if not path.is_file():
        raise CohortError(f"{what} not found: {path}" + (f"; {hint}" if hint else ""))
    return path


def require_columns(df: pd.DataFrame, columns: Iterable[str], path: Path | str) -> None:
    """:class:`CohortError` naming the file and every missing column."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise CohortError(f"{Path(path).name}: missing column(s) {missing}; the file has {list(df.columns)}")


def read_table(path: Path, *, columns: Iterable[str] | None = None, dtype: Any = str,
               sheet: str | int = 0) -> pd.DataFrame:
    """Read a CSV (optionally gzipped) or Excel file; required ``columns`` checked.

    Values are read as strings by default (``dtype``), blanks as missing; parse failures raise
    :class:`CohortError` naming the file.
    """
    try:
        if path.suffix.lower() in (".xlsx", ".xls"):
            df = pd.read_excel(path, sheet_name=sheet, dtype=dtype)
        else:
            df = pd.read_csv(path, dtype=dtype, keep_default_na=False, na_values=[""], low_memory=False)
    except (OSError, ValueError, EOFError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise CohortError(f"{path}: cannot read as a table: {exc}") from None
    df.columns = [str(c).strip() for c in df.columns]
    if columns is not None:
        require_columns(df, columns, path)
    return df


_SEX = {"m": "M", "male": "M", "f": "F", "female": "F"}
_SEX_UNKNOWN = {"o", "other", "u", "unknown", "unk", "x", "not recorded", "declined"}


def normalise_sex(values: pd.Series, manifest: Manifest, *, what: str = "sex") -> pd.Series:
    """M / F / Male / Female (any case) -> "M" / "F"; known "unknown" spellings and blanks -> None.

    Other strings become None and are reported in the manifest warnings.
    """
    key = values.astype(object).map(lambda v: None if _blank(v) else str(v).strip().casefold())
    out = key.map(_SEX).astype(object)
    odd = key.notna() & out.isna() & ~key.isin(list(_SEX_UNKNOWN))
    if odd.any():
        counts = values[odd].astype(str).str.strip().value_counts().to_dict()
        manifest.warn(f"{what}: values not recognised as M/F set to missing: {counts}")
    return out.where(out.notna(), None)


_AGE_AS = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def parse_dicom_age(value: object) -> float | None:
    """A DICOM Age String ("052Y", "006M", "010D", "002W"; leading zeros optional) in years, else None."""
    if _blank(value):
        return None
    m = _AGE_AS.match(str(value))
    if not m:
        return None
    return int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2).upper()]


def parse_age(values: pd.Series, manifest: Manifest, *, what: str = "age",
              max_age: float = 120.0) -> pd.Series:
    """Ages as numbers or DICOM age strings -> float years; outside [0, max_age] or unreadable -> NaN (warned)."""
    num = pd.to_numeric(values, errors="coerce").astype(float)
    text = values.notna() & num.isna()
    if text.any():
        num[text] = values[text].map(parse_dicom_age).astype(float)
    unreadable = values.notna() & num.isna() & ~values.astype(object).map(_blank).astype(bool)
    if unreadable.any():
        examples = values[unreadable].astype(str).unique()[:5].tolist()
        manifest.warn(f"{what}: {int(unreadable.sum())} values unreadable as an age, set to missing (e.g. {examples})")
    return check_age_range(num, manifest, what=what, max_age=max_age)


def check_age_range(age: pd.Series, manifest: Manifest, *, what: str = "age", max_age: float = 120.0) -> pd.Series:
    """Ages outside [0, max_age] -> NaN with a warning naming the count."""
    bad = age.notna() & ((age < 0) | (age > max_age))
    if bad.any():
        manifest.warn(f"{what}: {int(bad.sum())} values outside [0, {max_age:g}] set to missing")
    return age.where(~bad)


def _blank(v: object) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and v != v) or not str(v).strip()


def check_files(df: pd.DataFrame, manifest: Manifest, *, path_col: str = "path", id_col: str = "image_id",
                step: str = "image file present", where: str = "") -> pd.DataFrame:
    """Keep rows whose file exists; the others are counted in a step and listed (up to a cap) as skips."""
    exists = np.fromiter((os.path.isfile(p) for p in df[path_col]), dtype=bool, count=len(df))
    missing = df.loc[~exists, id_col]
    manifest.skip_many(missing.tolist(), f"missing file: listed in {where or 'the metadata'}, no image file",
                       limit=MAX_SKIP_RECORDS)
    manifest.counts["missing_files"] = manifest.counts.get("missing_files", 0) + int(len(missing))
    return manifest.step(step, df, df.loc[exists], detail=f"{len(missing)} rows without an image file")


def start_flow(df: pd.DataFrame, manifest: Manifest, name: str, detail: str = "") -> pd.DataFrame:
    """The first flow entry: every row read (0 before)."""
    return manifest.step(name, df.iloc[0:0], df, detail=detail)


# -- the export source -----------------------------------------------------------------------------

OPTIONS = {"csv", "columns", "race_table", "ethnicity_table", "image_root", "dataset", "exclude_hispanic",
           "check_files", "keep", "max_age"}
COLUMN_KEYS = ("path", "image_id", "patient_id", "study_id", "race", "ethnicity", "sex", "age", "bmi", "view")


def load(options: dict[str, Any], data_root: Path, manifest: Manifest) -> pd.DataFrame:
    """Build a cohort from a hospital export CSV (see the module docstring for the options)."""
    opts = check_options(options, OPTIONS, "export")
    root = Path(data_root)
    if not opts.get("csv"):
        raise ConfigError("cohort.options.csv: name the export's CSV file (one row per image)")
    csv_path = require_file(resolve(opts["csv"], root), "export CSV", "set cohort.options.csv")
    mapping = dict(opts.get("columns") or {})
    bad = sorted(set(mapping) - set(COLUMN_KEYS))
    if bad:
        raise ConfigError(f"cohort.options.columns: unknown key {bad[0]!r}; map any of {list(COLUMN_KEYS)}")
    for key in ("path", "patient_id"):
        mapping.setdefault(key, key)
    keep = list(opts.get("keep") or [])
    manifest.add_input(csv_path)
    raw = read_table(csv_path, columns=[*mapping.values(), *keep])
    df = pd.DataFrame({key: raw[col] for key, col in mapping.items()}, index=raw.index)
    for col in keep:
        if col not in df.columns:
            df[col] = raw[col]
    df["csv_row"] = raw.index + 2  # the line in the file (header is line 1)
    df = start_flow(df, manifest, "export rows", f"{len(df)} rows in {csv_path.name}")

    blank = df["path"].isna() | df["patient_id"].isna()
    for row in df.loc[blank, "csv_row"].iloc[:MAX_SKIP_RECORDS]:
        manifest.skip(f"{csv_path.name} row {row}", "no path or patient id")
    df = manifest.step("row has path and patient id", df, df[~blank], detail=f"{int(blank.sum())} rows blank")
    df["patient_id"] = df["patient_id"].str.strip()
    if "image_id" not in df.columns:
        df["image_id"] = df["path"]

    if "race" in df.columns:
        df = apply_race(df.rename(columns={"race": "race_raw"}), manifest, raw_col="race_raw",
                        table=opts.get("race_table", "generic"),
                        ethnicity_col="ethnicity" if "ethnicity" in df.columns else None,
                        ethnicity_table=opts.get("ethnicity_table", "generic_ethnicity"),
                        exclude_hispanic_rows=bool(opts.get("exclude_hispanic", True)))
    dup = df["image_id"].duplicated(keep="first")
    if dup.any():
        manifest.warn(f"{int(dup.sum())} rows repeat an image already listed; the first row of each image is kept")
    df = manifest.step("one row per image", df, df[~dup], detail=f"{int(dup.sum())} repeated image rows collapsed")

    image_root = resolve(opts["image_root"], root) if opts.get("image_root") else csv_path.parent
    df = df.assign(path=[str(resolve(p, image_root)) for p in df["path"]])
    if opts.get("check_files", True):
        df = check_files(df, manifest, where=csv_path.name)
    if "sex" in df.columns:
        df["sex"] = normalise_sex(df["sex"], manifest)
    if "age" in df.columns:
        df["age"] = parse_age(df["age"], manifest, max_age=float(opts.get("max_age", 120)))
    if "bmi" in df.columns:
        df["bmi"] = pd.to_numeric(df["bmi"], errors="coerce")
    return conform(df, dataset=opts.get("dataset", "export"))

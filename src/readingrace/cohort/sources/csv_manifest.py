"""A generic CSV manifest over image files: one row per image with ``path``, ``patient_id`` and attributes.

Options: ``csv`` (the file, relative to the data root), ``columns`` (our name -> the CSV's name, e.g.
``{patient_id: MRN, race: Race}``), ``race_table`` (race mapping table, default ``generic``),
``image_root`` (folder the paths are relative to; default the CSV's folder). Paths that do not exist,
or that escape the image root (``../``, judged on the path as written, so symlinked folders inside the
root are followed), are recorded as skips; a CSV with no image left is a :class:`CohortError` giving the
counts by reason.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from readingrace.cohort.manifest import Manifest
from readingrace.cohort.schema import REQUIRED_COLUMNS, conform
from readingrace.errors import CohortError, ConfigError

OPTIONS = {"csv", "columns", "race_table", "image_root", "dataset"}
ESCAPES = "path escapes the image root"
MISSING = "missing file"


def load(options: dict[str, Any], data_root: Path, manifest: Manifest) -> pd.DataFrame:
    unknown = set(options) - OPTIONS
    if unknown:
        raise ConfigError(f"cohort.options: unknown key {sorted(unknown)[0]!r} for source 'csv'; allowed: {sorted(OPTIONS)}")
    if "csv" not in options:
        raise ConfigError("cohort.options.csv: name the CSV manifest (path, patient_id, attribute columns)")
    root = Path(data_root)
    csv_path = Path(options["csv"])
    csv_path = csv_path if csv_path.is_absolute() else root / csv_path
    if not csv_path.is_file():
        raise CohortError(f"CSV manifest not found: {csv_path}")
    manifest.add_input(csv_path)
    try:
        raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False, na_values=[""])
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise CohortError(f"{csv_path}: cannot parse as CSV: {exc}") from None
    mapping = dict(options.get("columns") or {})
    bad_keys = set(mapping) - set(REQUIRED_COLUMNS) - {"image_id"}
    if bad_keys:
        raise ConfigError(f"cohort.options.columns: {sorted(bad_keys)[0]!r} is not a cohort column; "
                          f"map any of {list(REQUIRED_COLUMNS)}")
    rename = {src: dst for dst, src in mapping.items()}
    missing_src = [src for src in rename if src not in raw.columns]
    if missing_src:
        raise CohortError(f"{csv_path.name}: column {missing_src[0]!r} named in cohort.options.columns is not in the file; "
                          f"columns are {list(raw.columns)}")
    df = raw.rename(columns=rename)
    df["source_row"] = np.arange(len(df)) + 2   # the CSV's line number (header is line 1)
    for col in ("path", "patient_id"):
        if col not in df.columns:
            raise CohortError(f"{csv_path.name}: required column {col!r} is missing (columns: {list(raw.columns)}); "
                              "add it or map it with cohort.options.columns")
    empty = df["path"].isna() | df["patient_id"].isna()
    if empty.any():
        row = int(empty.idxmax()) + 2
        raise CohortError(f"{csv_path.name} row {row}: empty path or patient_id ({int(empty.sum())} rows); fill or remove them")
    if "image_id" not in df.columns:
        df["image_id"] = df["path"]
    repeat = df["image_id"].duplicated(keep="first")
    if repeat.any():
        row = int(repeat.idxmax())
        image_id = df.loc[row, "image_id"]
        raise CohortError(f"{csv_path.name} row {row + 2}: image id {image_id!r} appears "
                          f"{int((df['image_id'] == image_id).sum())} times; each image must be listed once")
    if "race" in df.columns:
        from readingrace.cohort.race import apply_race

        df = apply_race(df.rename(columns={"race": "race_raw"}), manifest, raw_col="race_raw",
                        table=options.get("race_table", "generic"))
    if "sex" in df.columns:  # Female / male / F / M (any case) -> F / M, as every other source gives it
        from readingrace.cohort.sources.export import normalise_sex

        df["sex"] = normalise_sex(df["sex"], manifest, what=f"{csv_path.name} column 'sex'")
    for col, max_value in (("age", 120.0), ("bmi", 150.0)):
        if col in df.columns:
            df[col] = _numeric_column(df, col, max_value, manifest, csv_path.name)
    image_root = Path(options["image_root"]) if options.get("image_root") else csv_path.parent
    image_root = Path(os.path.abspath(image_root if image_root.is_absolute() else root / image_root))
    resolved = []
    skipped: Counter[str] = Counter()
    for row, p in zip(df["source_row"], df["path"]):
        full = Path(os.path.abspath(image_root / p))  # lexical: `../` is refused, symlinks inside are followed
        if not full.is_relative_to(image_root):
            reason = ESCAPES
        elif not full.is_file():
            reason = MISSING
        else:
            resolved.append(str(full))
            continue
        manifest.skip(p, f"{reason}: row {row} of {csv_path.name}")
        skipped[reason] += 1
        resolved.append(None)
    before = df
    df = df.assign(path=resolved)
    df = df[df["path"].notna()]
    by_reason = ", ".join(f"{reason} ({n})" for reason, n in skipped.most_common())
    manifest.step("image file present", before, df,
                  detail=f"{len(before) - len(df)} rows skipped" + (f": {by_reason}" if by_reason else ""))
    if before.empty:
        raise CohortError(f"{csv_path.name}: no image left: the file lists no row")
    if df.empty:
        raise CohortError(f"{csv_path.name}: no image left: {len(before)} rows skipped: {by_reason}; paths are "
                          f"read relative to the image root {image_root}")
    return conform(df, dataset=options.get("dataset", csv_path.stem))


def _numeric_column(df: pd.DataFrame, col: str, max_value: float, manifest: Manifest, csv_name: str) -> pd.Series:
    """``col`` as float; DICOM age strings ("090Y") read as years; unreadable or out-of-range values
    become missing, with a warning naming the CSV rows (a blank cell is simply not recorded)."""
    from readingrace.cohort.sources.export import parse_dicom_age

    raw = df[col]
    num = pd.to_numeric(raw, errors="coerce").astype(float)
    if col == "age":
        text = raw.notna() & num.isna()
        num[text] = raw[text].map(parse_dicom_age).astype(float)
    bad = raw.notna() & (num.isna() | (num < 0) | (num > max_value))
    if bad.any():
        rows = df.loc[bad, "source_row"].tolist()
        values = raw[bad].tolist()
        shown = ", ".join(f"row {r}: {v!r}" for r, v in zip(rows[:10], values[:10]))
        more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
        example = "52 or 052Y" if col == "age" else "27.5"
        manifest.warn(f"{csv_name} column {col!r}: {len(rows)} value(s) unreadable or outside [0, {max_value:g}] "
                      f"set to missing ({shown}{more}); write numbers such as {example}")
    return num.where(~bad)

"""NIH ChestX-ray14 (ChestX-ray8) in its native layout.

Files: ``Data_Entry_2017*.csv(.gz)`` (Image Index, Finding Labels, Follow-up #, Patient ID, Patient Age,
Patient Gender, View Position, OriginalImage[Width,Height], OriginalImagePixelSpacing[x,y]) and the PNG
images anywhere under the data root (``images_001/images/...`` in the full download). The header names 9
columns but rows carry 11 values (width/height and spacing x/y are two values each), so the file is read by
position, never with pandas' header inference (which would silently shift columns into the index).
NIH has no study id: each image is its own study. No race is recorded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from readingrace.cohort.manifest import Manifest
from readingrace.cohort.schema import NIH_LABELS, conform
from readingrace.errors import CohortError, ConfigError

EXPECTED_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                   "Patient Gender", "View Position"]
OPTIONS = {"metadata", "images", "max_age"}
MAX_SKIP_RECORDS = 1000


def find_metadata(root: Path) -> Path:
    hits = sorted(root.rglob("Data_Entry_2017*.csv*"))
    if not hits:
        raise CohortError(
            f"no Data_Entry_2017*.csv(.gz) found under {root}; download it with the images from the NIH "
            "Clinical Center or set cohort.options.metadata"
        )
    return hits[0]


def index_images(root: Path, suffixes: tuple[str, ...] = (".png",)) -> dict[str, Path]:
    """File name -> path for every image under ``root`` (any depth)."""
    index: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.lower().endswith(suffixes) and name not in index:
                index[name] = Path(dirpath) / name
    return index


def read_metadata(path: Path) -> pd.DataFrame:
    """Read the Data_Entry file by column position and check its header."""
    try:
        header = pd.read_csv(path, nrows=0).columns.tolist()
    except (OSError, ValueError, EOFError) as exc:
        raise CohortError(f"{path}: cannot read NIH metadata: {exc}") from None
    if [h.strip() for h in header[:7]] != EXPECTED_HEADER:
        raise CohortError(
            f"{path}: unexpected header {header[:7]}; expected the NIH columns {EXPECTED_HEADER}"
        )
    df = pd.read_csv(path, header=None, skiprows=1, usecols=range(7), names=EXPECTED_HEADER,
                     dtype={"Image Index": str, "Finding Labels": str, "Patient ID": str,
                            "Patient Gender": str, "View Position": str},
                     keep_default_na=False, na_values=[""])
    return df


def load(options: dict[str, Any], data_root: Path, manifest: Manifest) -> pd.DataFrame:
    unknown = set(options) - OPTIONS
    if unknown:
        raise ConfigError(f"cohort.options: unknown key {sorted(unknown)[0]!r} for source 'nih'; allowed: {sorted(OPTIONS)}")
    root = Path(data_root)
    meta_path = root / options["metadata"] if options.get("metadata") else find_metadata(root)
    if not meta_path.is_file():
        raise CohortError(f"NIH metadata file not found: {meta_path}")
    manifest.add_input(meta_path)
    raw = read_metadata(meta_path)

    df = pd.DataFrame({
        "image_id": raw["Image Index"].str.strip(),
        "patient_id": raw["Patient ID"].str.strip(),
        "sex": raw["Patient Gender"].str.strip().str.upper().where(lambda s: s.isin(["M", "F"])),
        "view": raw["View Position"].str.strip().str.upper(),
        "follow_up": pd.to_numeric(raw["Follow-up #"], errors="coerce"),
        "finding_labels": raw["Finding Labels"].fillna(""),
    })
    df["study_id"] = df["image_id"]
    age = pd.to_numeric(raw["Patient Age"], errors="coerce")
    max_age = float(options.get("max_age", 120))
    bad_age = age.notna() & ((age < 0) | (age > max_age))
    if bad_age.any():
        manifest.warn(f"{int(bad_age.sum())} rows with Patient Age outside [0, {max_age:g}] set to missing")
    df["age"] = age.where(~bad_age)
    findings = df["finding_labels"].str.split("|")
    for label in (*NIH_LABELS, "No Finding"):
        df[label] = findings.map(lambda xs, lab=label: float(lab in xs))
    manifest.mappings["nih_findings"] = {lab: lab for lab in (*NIH_LABELS, "No Finding")}

    n_rows = len(df)
    dup = df["image_id"].duplicated(keep=False)
    if dup.any():
        raise CohortError(f"{meta_path.name}: {int(dup.sum())} rows repeat an Image Index (e.g. {df.loc[dup, 'image_id'].iloc[0]!r})")
    manifest.step("metadata rows", df.iloc[0:0], df, detail=f"{n_rows} rows in {meta_path.name}")

    images_root = root / options["images"] if options.get("images") else root
    index = index_images(images_root)
    paths = df["image_id"].map(index)
    present = paths.notna().to_numpy()
    missing = df.loc[~present, "image_id"]
    manifest.skip_many(missing.tolist(), "missing file: listed in metadata, no image under the data root",
                       limit=MAX_SKIP_RECORDS)
    kept = df.loc[present].assign(path=paths[present].map(str))
    manifest.step("image file present", df, kept, detail=f"{len(missing)} rows without an image file skipped")
    manifest.counts["missing_files"] = int(len(missing))
    manifest.counts["extra_files_not_in_metadata"] = int(len(set(index) - set(df["image_id"])))
    kept = kept.assign(race=np.nan)
    return conform(kept, dataset="nih")

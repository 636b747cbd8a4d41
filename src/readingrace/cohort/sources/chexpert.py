"""CheXpert (v1.0 or v1.0-small) with the CheXpert demographics file, in their native layout.

Files:

- ``train.csv`` and/or ``valid.csv`` (required, at least one): Path, Sex, Age, Frontal/Lateral, AP/PA and the
  14 finding labels (kept as float columns: 1 / 0 / -1 / NaN for blank).
- ``CHEXPERT DEMO.xlsx`` or a CSV export of it: PATIENT, GENDER, AGE_AT_CXR, PRIMARY_RACE, ETHNICITY.
- optional ``split_file``: the paper group's split (columns ``,index,split``; ``index`` = 0-based row of
  ``train.csv``; values train / validate / test) kept as ``official_split`` (train / val / test).

``Path`` is parsed whatever its root (``CheXpert-v1.0/``, ``CheXpert-v1.0-small/``, none), split folder
(``train/``, ``valid/``, ``test/``) or slash style: patient id ``patient\\d{5}``, study id
``patientNNNNN/studyN``, image id ``<split>/<patient>/<study>/<file>``; the image is looked up at
``<image_root>/<split>/<patient>/<study>/<file>`` (``image_root`` defaults to the folder of the CSVs).
Race: PRIMARY_RACE through the ``chexpert`` table; ETHNICITY "Hispanic/Latino" makes the patient Hispanic;
conflicting records of a patient excluded before de-duplication; Hispanic excluded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from readingrace.cohort.manifest import Manifest
from readingrace.cohort.race import race_from_records
from readingrace.cohort.schema import CHEXPERT_LABELS, conform
from readingrace.cohort.sources.export import (
    MAX_SKIP_RECORDS, check_age_range, check_files, check_options, normalise_sex, read_table, require_file,
    resolve, start_flow,
)
from readingrace.errors import CohortError

OPTIONS = {"root", "csvs", "demographics", "split_file", "image_root", "frontal_only", "check_files",
           "exclude_hispanic", "race_table", "ethnicity_table", "dataset", "max_age"}
CSV_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]
DEMO_COLUMNS = ["PATIENT", "GENDER", "AGE_AT_CXR", "PRIMARY_RACE", "ETHNICITY"]
DEMO_NAMES = ("CHEXPERT DEMO.xlsx", "CHEXPERT DEMO.csv", "CHEXPERT_DEMO.xlsx", "CHEXPERT_DEMO.csv")
PATH_RE = re.compile(r"(?:^|/)(train|valid|test)/(patient\d{5})/(study\d+)/([^/]+)$", re.IGNORECASE)
SPLIT_NAMES = {"train": "train", "validate": "val", "valid": "val", "val": "val", "test": "test"}


def parse_path(path: pd.Series) -> pd.DataFrame:
    """Split folder, patient, study and file name from CheXpert ``Path`` values (NaN where not parseable)."""
    parts = path.astype(str).str.strip().str.replace("\\", "/", regex=False).str.extract(PATH_RE)
    parts.columns = ["folder", "patient", "study", "file"]
    parts["folder"] = parts["folder"].str.lower()
    parts["patient"] = parts["patient"].str.lower()
    parts["study"] = parts["study"].str.lower()
    return parts


def find_root(options: dict[str, Any], data_root: Path) -> Path:
    """The folder holding train.csv / valid.csv: ``root`` or the data root or its one CheXpert-v1.0* folder."""
    if options.get("root"):
        return resolve(options["root"], data_root)
    root = Path(data_root)
    if (root / "train.csv").is_file() or (root / "valid.csv").is_file():
        return root
    hits = sorted(p for p in root.glob("CheXpert-v1.0*") if (p / "train.csv").is_file() or (p / "valid.csv").is_file())
    if len(hits) == 1:
        return hits[0]
    raise CohortError(f"no train.csv / valid.csv under {root} (or a single CheXpert-v1.0* folder in it); "
                      "set cohort.options.root to the folder that holds them")


def find_demographics(options: dict[str, Any], data_root: Path, root: Path) -> Path | None:
    if options.get("demographics"):
        return require_file(resolve(options["demographics"], data_root), "CheXpert demographics file",
                            "cohort.options.demographics")
    for folder in dict.fromkeys((root, Path(data_root), root.parent)):
        for name in DEMO_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def load(options: dict[str, Any], data_root: Path, manifest: Manifest) -> pd.DataFrame:
    """Build the CheXpert cohort (see the module docstring)."""
    opts = check_options(options, OPTIONS, "chexpert")
    data_root = Path(data_root)
    root = find_root(opts, data_root)
    names = list(opts.get("csvs") or [n for n in ("train.csv", "valid.csv") if (root / n).is_file()])
    if not names:
        raise CohortError(f"no train.csv or valid.csv in {root}; set cohort.options.csvs")
    frames, n_rows = [], {}
    for name in names:
        path = require_file(resolve(name, root), "CheXpert CSV", "cohort.options.csvs")
        manifest.add_input(path)
        t = read_table(path, columns=CSV_COLUMNS)
        frames.append(t.assign(csv=path.name, csv_row=np.arange(len(t))))
        n_rows[path.name] = len(t)
    raw = pd.concat(frames, ignore_index=True)

    parts = parse_path(raw["Path"])
    fl = raw["Frontal/Lateral"].str.strip().str.lower()
    appa = raw["AP/PA"].str.strip().str.upper()
    df = pd.DataFrame({
        "image_id": parts["folder"] + "/" + parts["patient"] + "/" + parts["study"] + "/" + parts["file"],
        "patient_id": parts["patient"],
        "study_id": parts["patient"] + "/" + parts["study"],
        "chexpert_folder": parts["folder"],
        "frontal": fl == "frontal",
        "view": np.where(fl == "lateral", "LATERAL", appa.where(appa.notna() & (appa != ""), "FRONTAL")),
        "Path": raw["Path"], "csv": raw["csv"], "csv_row": raw["csv_row"],
    })
    df.loc[fl.isna() | ~fl.isin(["frontal", "lateral"]), "view"] = None
    df["sex_csv"], df["age_csv"] = raw["Sex"], raw["Age"]
    for label in CHEXPERT_LABELS:
        df[label] = pd.to_numeric(raw[label], errors="coerce").astype(float) if label in raw.columns else np.nan
    df = start_flow(df, manifest, "CSV rows", f"{len(df)} rows in {', '.join(names)}")

    bad = df["image_id"].isna()
    for _, row in df.loc[bad].iloc[:MAX_SKIP_RECORDS].iterrows():
        manifest.skip(row["Path"], f"unparseable Path: {row['csv']} row {row['csv_row'] + 2} has no "
                                   "train|valid|test/patientNNNNN/studyN/<file>")
    df = manifest.step("Path parsed", df, df[~bad], detail=f"{int(bad.sum())} rows with an unparseable Path")
    dup = df["image_id"].duplicated(keep=False)
    if dup.any():
        raise CohortError(f"{df.loc[dup, 'image_id'].iloc[0]!r} is listed {int(dup.sum())} times across "
                          f"{', '.join(names)}; each image must be listed once")

    if opts.get("split_file"):
        df = _official_split(df, resolve(opts["split_file"], data_root), manifest, n_train=n_rows.get("train.csv", 0))
    if opts.get("frontal_only", False):
        df = manifest.step("frontal (Frontal/Lateral = Frontal)", df, df[df["frontal"]],
                           detail=f"{int((~df['frontal']).sum())} lateral or blank rows removed")
    image_root = resolve(opts["image_root"], data_root) if opts.get("image_root") else root
    df["path"] = str(image_root) + "/" + df["image_id"]
    if opts.get("check_files", True):
        df = check_files(df, manifest, where=", ".join(names))

    demo_path = find_demographics(opts, data_root, root)
    demo = None
    if demo_path is None:
        manifest.warn("CheXpert demographics file (CHEXPERT DEMO.xlsx) not found: race is missing for every image; "
                      "download it from Stanford AIMI or set cohort.options.demographics")
        df["race"], df["race_group"] = None, "unknown"
    else:
        manifest.add_input(demo_path)
        demo = read_table(demo_path, columns=DEMO_COLUMNS)
        demo["PATIENT"] = demo["PATIENT"].str.strip().str.lower()
        df = race_from_records(df, demo, manifest, raw_col="PRIMARY_RACE", table=opts.get("race_table", "chexpert"),
                               records_patient_col="PATIENT", ethnicity_col="ETHNICITY",
                               ethnicity_table=opts.get("ethnicity_table", "chexpert_ethnicity"),
                               exclude_hispanic_rows=bool(opts.get("exclude_hispanic", True)),
                               what="demographics records")
        df["ethnicity_raw"] = df["patient_id"].map(
            demo.drop_duplicates("PATIENT").set_index("PATIENT")["ETHNICITY"]).astype(object)

    sex = normalise_sex(df["sex_csv"], manifest, what="Sex")
    age = pd.to_numeric(df["age_csv"], errors="coerce").astype(float)
    if demo is not None:
        first = demo.drop_duplicates("PATIENT").set_index("PATIENT")
        demo_sex = normalise_sex(df["patient_id"].map(first["GENDER"]), manifest, what="GENDER")
        differ = sex.notna() & demo_sex.notna() & (sex != demo_sex)
        if differ.any():
            manifest.warn(f"{int(differ.sum())} images whose Sex differs from the demographics GENDER; Sex is used")
        sex = sex.where(sex.notna(), demo_sex)
        age = age.where(age.notna(), pd.to_numeric(df["patient_id"].map(first["AGE_AT_CXR"]), errors="coerce"))
    df["sex"] = sex.where(sex.notna(), None)
    df["age"] = check_age_range(age, manifest, max_age=float(opts.get("max_age", 120)))
    df = df.drop(columns=["sex_csv", "age_csv", "Path"])
    return conform(df, dataset=opts.get("dataset", "chexpert"))


def _official_split(df: pd.DataFrame, path: Path, manifest: Manifest, *, n_train: int) -> pd.DataFrame:
    """Attach the row-indexed split file (``index`` = 0-based row of train.csv) as ``official_split``."""
    require_file(path, "CheXpert split file", "cohort.options.split_file")
    manifest.add_input(path)
    split = read_table(path, columns=["index", "split"])
    idx = pd.to_numeric(split["index"], errors="coerce")
    if idx.isna().any() or (idx % 1 != 0).any():
        row = int(idx.isna().idxmax()) + 2 if idx.isna().any() else int((idx % 1 != 0).idxmax()) + 2
        raise CohortError(f"{path.name} row {row}: 'index' must be a whole row number of train.csv")
    values = split["split"].str.strip().str.lower()
    unknown = sorted(set(values.dropna()) - set(SPLIT_NAMES))
    if unknown:
        raise CohortError(f"{path.name}: unknown split values {unknown}; expected {sorted(SPLIT_NAMES)}")
    train = df["csv"] == "train.csv"
    if n_train == 0:
        raise CohortError(f"{path.name} indexes rows of train.csv, which is not among the CSVs read; "
                          "add train.csv to cohort.options.csvs")
    if idx.max() >= n_train or idx.min() < 0:
        raise CohortError(f"{path.name}: index values run to {int(idx.max())} but train.csv has "
                          f"{n_train} rows; the split file must index rows of the same train.csv")
    if idx.duplicated().any():
        raise CohortError(f"{path.name}: index {int(idx[idx.duplicated()].iloc[0])} listed twice")
    lookup = pd.Series(values.map(SPLIT_NAMES).to_numpy(), index=idx.astype(int).to_numpy())
    official = pd.Series(None, index=df.index, dtype=object)
    official[train] = df.loc[train, "csv_row"].map(lookup).to_numpy()
    manifest.counts["rows_in_split_file"] = int(official.notna().sum())
    return df.assign(official_split=official)

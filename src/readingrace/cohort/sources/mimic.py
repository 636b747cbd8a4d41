"""MIMIC-CXR-JPG 2.x with MIMIC-IV (v1.0 ``core/`` or v2.x ``hosp/``) in their native layout.

Files (names as PhysioNet ships them; ``.csv`` or ``.csv.gz``):

- ``<cxr_root>/mimic-cxr-2.0.0-metadata.csv.gz`` (required): dicom_id, subject_id, study_id, ViewPosition,
  StudyDate, ... ; images at ``<image_root>/files/p{first 2 digits}/p{subject_id}/s{study_id}/{dicom_id}.jpg``.
- ``<cxr_root>/mimic-cxr-2.0.0-chexpert.csv.gz`` (optional): the 14 finding labels per study, kept as float
  columns (1 / 0 / -1 / NaN for blank).
- ``<cxr_root>/mimic-cxr-2.0.0-split.csv.gz`` (optional): kept as ``official_split`` (train / val / test).
- ``<mimic_iv_root>/hosp/admissions.csv.gz`` (v2.x, column ``race``) or ``core/admissions.csv.gz`` (v1.0,
  column ``ethnicity``) (required), and ``patients.csv.gz`` beside it (required): sex, and age at the study
  = anchor_age + (StudyDate year - anchor_year).
- ``<mimic_iv_root>/hosp/omr.csv.gz`` (optional, v2.x): BMI, see :func:`nearest_bmi`.

Race rules: each admission's string is harmonised with the table of its MIMIC-IV version; a subject whose
harmonised group differs across admissions is excluded (judged on *all* admissions, before anything is
reduced to one row per subject); then Hispanic/Latino subjects are excluded. Subjects with no admission or
only unknown strings keep their images with a missing race (the generic "missing target" step removes them
when race is the target). ``frontal`` is ViewPosition AP or PA; a blank ViewPosition is not frontal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from readingrace.cohort.manifest import Manifest
from readingrace.cohort.race import isin, race_from_records
from readingrace.cohort.schema import CHEXPERT_LABELS, conform
from readingrace.cohort.sources.export import (
    check_age_range, check_files, check_options, require_columns, resolve, start_flow,
)
from readingrace.errors import CohortError

OPTIONS = {"cxr_root", "mimic_iv_root", "image_root", "metadata", "labels", "split_file", "admissions",
           "patients", "omr", "bmi", "bmi_max_days", "frontal_only", "check_files", "exclude_hispanic",
           "race_table", "dataset", "max_age"}
METADATA = "mimic-cxr-2.0.0-metadata.csv"
LABELS = "mimic-cxr-2.0.0-chexpert.csv"
SPLIT = "mimic-cxr-2.0.0-split.csv"
METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate"]
ADMISSIONS_ID = ["subject_id", "hadm_id"]
PATIENTS_COLUMNS = ["subject_id", "gender", "anchor_age", "anchor_year"]
OMR_COLUMNS = ["subject_id", "chartdate", "result_name", "result_value"]
BMI_NAME = "BMI (kg/m2)"
BMI_RANGE = (10.0, 100.0)
FRONTAL = ("AP", "PA")
SPLIT_NAMES = {"train": "train", "validate": "val", "val": "val", "test": "test"}


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _header(path: Path) -> list[str]:
    try:
        return [c.strip() for c in pd.read_csv(path, nrows=0).columns]
    except (OSError, ValueError, EOFError, pd.errors.ParserError) as exc:
        raise CohortError(f"{path}: cannot read as CSV: {exc}") from None


def _read(path: Path, columns: list[str], dtype: dict[str, Any] | type = str) -> pd.DataFrame:
    """Read ``columns`` of a (gzipped) CSV with the multi-threaded Arrow parser; missing columns named."""
    header = _header(path)
    require_columns(pd.DataFrame(columns=header), columns, path)
    try:
        return pd.read_csv(path, usecols=columns, dtype=dtype, keep_default_na=False, na_values=[""],
                           engine="pyarrow")
    except Exception as exc:  # pyarrow raises its own error types for malformed rows
        raise CohortError(f"{path}: cannot read as CSV: {exc}") from None


_INTEGER = r"^\s*\d+\s*$"
_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"


def numbers(s: pd.Series, *, integer: bool = False) -> pd.Series:
    """Strings -> float64 (NaN where not a number), vectorised in Arrow (``pd.to_numeric`` is slow on strings)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pd.api.types.is_numeric_dtype(s):
        return s.astype(float)
    arr = pa.array(s.astype(object).to_numpy() if s.dtype == object else s, type=pa.string(), from_pandas=True)
    ok = pc.fill_null(pc.match_substring_regex(arr, _INTEGER if integer else _NUMBER), False)
    clean = pc.if_else(ok, pc.utf8_trim_whitespace(arr), pa.scalar(None, pa.string()))
    out = pc.cast(clean, pa.int64() if integer else pa.float64()).to_numpy(zero_copy_only=False)
    return pd.Series(np.asarray(out, dtype=float), index=s.index)


def _int_ids(s: pd.Series, path: Path, column: str) -> pd.Series:
    """MIMIC's integer ids as int64 (fast joins); a blank or non-integer id is a :class:`CohortError`."""
    num = numbers(s, integer=True)
    bad = num.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise CohortError(f"{path.name} row {row + 2}: {column} {s.iloc[row]!r} is not an integer id")
    return num.astype(np.int64)


def locate(options: dict[str, Any], data_root: Path) -> dict[str, Path | None]:
    """Paths of every MIMIC file the options name or the native layout implies (None = absent, optional)."""
    root = Path(data_root)
    cxr = resolve(options.get("cxr_root", "."), root)
    iv = resolve(options.get("mimic_iv_root", "."), root)

    def pick(key: str, default: Path | None, what: str, required: bool) -> Path | None:
        if options.get(key):
            p = resolve(options[key], root)
            if not p.is_file():
                raise CohortError(f"{what} not found: {p} (cohort.options.{key})")
            return p
        if default is None and required:
            raise CohortError(f"{what} not found under {cxr if key in ('metadata', 'labels', 'split_file') else iv}; "
                              f"download it from PhysioNet or set cohort.options.{key}")
        return default

    hosp, core = _find(iv / "hosp", "admissions.csv"), _find(iv / "core", "admissions.csv")
    adm = pick("admissions", hosp or core, "MIMIC-IV admissions.csv.gz", True)
    assert adm is not None
    pat_default = _find(adm.parent, "patients.csv")
    paths = {
        "metadata": pick("metadata", _find(cxr, METADATA), f"MIMIC-CXR-JPG {METADATA}.gz", True),
        "labels": pick("labels", _find(cxr, LABELS), f"MIMIC-CXR-JPG {LABELS}.gz", False),
        "split_file": pick("split_file", _find(cxr, SPLIT), f"MIMIC-CXR-JPG {SPLIT}.gz", False),
        "admissions": adm,
        "patients": pick("patients", pat_default, "MIMIC-IV patients.csv.gz", True),
        "omr": None,
        "image_root": resolve(options["image_root"], root) if options.get("image_root") else cxr,
    }
    if options.get("bmi", True):
        paths["omr"] = pick("omr", _find(iv / "hosp", "omr.csv"), "MIMIC-IV omr.csv.gz", False)
    return paths


def image_paths(df: pd.DataFrame, image_root: Path) -> pd.Series:
    """``files/p{first 2 digits}/p{subject}/s{study}/{dicom_id}.jpg`` under ``image_root``."""
    subj, study = df["patient_id"].astype(str), df["study_id"].astype(str)
    rel = "files/p" + subj.str[:2] + "/p" + subj + "/s" + study + "/" + df["image_id"].astype(str) + ".jpg"
    return (str(image_root) + "/" + rel).astype(object)


def nearest_bmi(studies: pd.DataFrame, bmi: pd.DataFrame, *, max_days: float | None) -> pd.Series:
    """BMI nearest in time to each study.

    ``studies``: patient_id, study_date (datetime); ``bmi``: patient_id, chartdate, bmi (one value per
    patient and day). The record with the smallest |chartdate - study date| wins; a tie goes to the earlier
    record; none within ``max_days`` (when given) or no record at all -> NaN. Aligned with ``studies.index``.
    """
    out = pd.Series(np.nan, index=studies.index, dtype=float)
    left = studies.loc[studies["study_date"].notna(), ["patient_id", "study_date"]].copy()
    if left.empty or bmi.empty:
        return out
    left["_row"] = left.index
    left = left.sort_values("study_date", kind="stable")
    right = bmi.sort_values("chartdate", kind="stable").rename(columns={"chartdate": "_date"})
    merged = {}
    for direction in ("backward", "forward"):
        m = pd.merge_asof(left, right, left_on="study_date", right_on="_date", by="patient_id",
                          direction=direction, allow_exact_matches=True)
        merged[direction] = m.set_index("_row")
    back, fwd = merged["backward"], merged["forward"]
    d_back = (back["study_date"] - back["_date"]).dt.days.astype(float)
    d_fwd = (fwd["_date"] - fwd["study_date"]).dt.days.astype(float)
    use_fwd = d_fwd.notna() & (d_back.isna() | (d_fwd < d_back))
    value = back["bmi"].where(~use_fwd, fwd["bmi"])
    dist = d_back.where(~use_fwd, d_fwd)
    if max_days is not None:
        value = value.where(dist <= max_days)
    out.loc[value.index] = value.to_numpy(float)
    return out


def read_bmi(path: Path, manifest: Manifest) -> pd.DataFrame:
    """BMI records of ``omr`` (streamed: only "BMI (kg/m2)" rows are kept in memory).

    Returns one value per (patient, day): the mean of that day's values. Values that are not numbers in
    [10, 100] or have an unreadable chartdate are ignored and counted in a warning.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    require_columns(pd.DataFrame(columns=_header(path)), OMR_COLUMNS, path)
    try:
        reader = pacsv.open_csv(path, convert_options=pacsv.ConvertOptions(
            include_columns=OMR_COLUMNS, column_types=dict.fromkeys(OMR_COLUMNS, pa.string())))
        batches = [b.filter(pc.equal(pc.utf8_trim_whitespace(b.column("result_name")), BMI_NAME)) for b in reader]
    except (OSError, pa.ArrowInvalid) as exc:
        raise CohortError(f"{path}: cannot read as CSV: {exc}") from None
    rec = pa.Table.from_batches(batches, schema=reader.schema).to_pandas(types_mapper=pd.ArrowDtype)
    subject = numbers(rec["subject_id"], integer=True)
    value = numbers(rec["result_value"])
    date = pd.to_datetime(rec["chartdate"], errors="coerce", format="%Y-%m-%d")
    bad = value.isna() | (value < BMI_RANGE[0]) | (value > BMI_RANGE[1]) | date.isna() | subject.isna()
    if bad.any():
        manifest.warn(f"{path.name}: {int(bad.sum())} of {len(rec)} '{BMI_NAME}' records ignored "
                      f"(value not a number in [{BMI_RANGE[0]:g}, {BMI_RANGE[1]:g}] or unreadable chartdate)")
    rec = pd.DataFrame({"patient_id": subject, "chartdate": date, "bmi": value})[~bad]
    rec["patient_id"] = rec["patient_id"].astype(np.int64)
    manifest.counts["omr_bmi_records"] = int(len(rec))
    return rec.groupby(["patient_id", "chartdate"], as_index=False, sort=True)["bmi"].mean()


def load(options: dict[str, Any], data_root: Path, manifest: Manifest) -> pd.DataFrame:
    """Build the MIMIC-CXR cohort (see the module docstring)."""
    opts = check_options(options, OPTIONS, "mimic")
    paths = locate(opts, Path(data_root))
    for key in ("metadata", "labels", "split_file", "admissions", "patients", "omr"):
        if paths[key] is not None:
            manifest.add_input(paths[key])  # type: ignore[arg-type]
    meta_path: Path = paths["metadata"]  # type: ignore[assignment]

    meta = _read(meta_path, METADATA_COLUMNS)
    view = meta["ViewPosition"].str.strip().str.upper()
    df = pd.DataFrame({
        "image_id": meta["dicom_id"].str.strip().astype(object),
        "patient_id": _int_ids(meta["subject_id"], meta_path, "subject_id"),
        "study_id": _int_ids(meta["study_id"], meta_path, "study_id"),
        "view": view.where(view.notna() & (view != ""), None).astype(object),
        "study_date": pd.to_datetime(meta["StudyDate"].str.strip(), format="%Y%m%d", errors="coerce"),
    })
    df["frontal"] = df["view"].isin(FRONTAL)
    del meta
    dup = df["image_id"].duplicated(keep=False)
    if dup.any():
        raise CohortError(f"{meta_path.name}: {int(dup.sum())} rows repeat a dicom_id "
                          f"(e.g. {df.loc[dup, 'image_id'].iloc[0]!r}); the metadata file is damaged, "
                          "download it again")
    df = start_flow(df, manifest, "metadata rows", f"{len(df)} images in {meta_path.name}")
    n_blank_view = int(df["view"].isna().sum())
    manifest.counts["blank_view_position"] = n_blank_view
    if opts.get("frontal_only", False):
        df = manifest.step("frontal (ViewPosition AP or PA)", df, df[df["frontal"]],
                           detail=f"non-frontal removed, including {n_blank_view} with a blank ViewPosition")

    df["path"] = image_paths(df, Path(paths["image_root"]))  # type: ignore[arg-type]
    if opts.get("check_files", True):
        df = check_files(df, manifest, where=meta_path.name)

    # -- race: every admission counts, before any reduction to one row per subject ------------------
    adm_path: Path = paths["admissions"]  # type: ignore[assignment]
    header = _header(adm_path)
    race_col = "race" if "race" in header else "ethnicity" if "ethnicity" in header else None
    if race_col is None:
        raise CohortError(f"{adm_path}: missing column 'race' (MIMIC-IV v2.x) or 'ethnicity' (v1.0); "
                          f"the file has {header}")
    adm = _read(adm_path, ["subject_id", race_col])
    adm["subject_id"] = _int_ids(adm["subject_id"], adm_path, "subject_id")
    table = opts.get("race_table") or ("mimic_iv_v2" if race_col == "race" else "mimic_iv_v1")
    manifest.counts["admissions_race_column"] = race_col
    df = race_from_records(df, adm, manifest, raw_col=race_col, table=table, records_patient_col="subject_id",
                           exclude_hispanic_rows=bool(opts.get("exclude_hispanic", True)), what="admissions")

    # -- sex and age at the study -------------------------------------------------------------------
    pat = _read(paths["patients"], PATIENTS_COLUMNS)  # type: ignore[arg-type]
    pat["subject_id"] = _int_ids(pat["subject_id"], paths["patients"], "subject_id")  # type: ignore[arg-type]
    if pat["subject_id"].duplicated().any():
        raise CohortError(f"{paths['patients']}: subject_id repeated; patients.csv.gz has one row per subject")
    pat = pat.set_index("subject_id")
    sex = pat["gender"].str.strip().str.upper()
    df["sex"] = df["patient_id"].map(sex.where(sex.isin(["M", "F"]))).astype(object)
    anchor_age = pd.to_numeric(df["patient_id"].map(pat["anchor_age"]), errors="coerce")
    anchor_year = pd.to_numeric(df["patient_id"].map(pat["anchor_year"]), errors="coerce")
    age = anchor_age + (df["study_date"].dt.year - anchor_year)
    df["age"] = check_age_range(age.astype(float), manifest, max_age=float(opts.get("max_age", 120)))
    manifest.counts["images_without_patients_row"] = int((~isin(df["patient_id"], pat.index)).sum())

    # -- labels, official split, BMI ----------------------------------------------------------------
    if paths["labels"] is not None:
        df = _join_labels(df, paths["labels"], manifest)  # type: ignore[arg-type]
    else:
        manifest.warn(f"{LABELS}.gz not found: no finding labels in the cohort")
    if paths["split_file"] is not None:
        split = _read(paths["split_file"], ["dicom_id", "split"])  # type: ignore[arg-type]
        s = pd.Series(split["split"].str.strip().str.lower().astype(object).to_numpy(),
                      index=split["dicom_id"].str.strip().astype(object).to_numpy())
        unknown = sorted(set(s.dropna()) - set(SPLIT_NAMES))
        if unknown:
            raise CohortError(f"{paths['split_file']}: unknown split values {unknown}; expected {sorted(SPLIT_NAMES)}")
        df["official_split"] = df["image_id"].map(s.map(SPLIT_NAMES)).astype(object)
    if paths["omr"] is not None:
        bmi = read_bmi(paths["omr"], manifest)  # type: ignore[arg-type]
        max_days = opts.get("bmi_max_days", 365)
        df["bmi"] = nearest_bmi(df, bmi, max_days=None if max_days is None else float(max_days))
        manifest.counts["images_with_bmi"] = int(df["bmi"].notna().sum())
    else:
        df["bmi"] = np.nan
    df["study_date"] = df["study_date"].dt.strftime("%Y-%m-%d").astype(object)
    return conform(df, dataset=opts.get("dataset", "mimic"))


def _join_labels(df: pd.DataFrame, path: Path, manifest: Manifest) -> pd.DataFrame:
    header = _header(path)
    labels = [c for c in CHEXPERT_LABELS if c in header]
    require_columns(pd.DataFrame(columns=header), ["subject_id", "study_id", *CHEXPERT_LABELS], path)
    lab = _read(path, ["subject_id", "study_id", *labels], dtype={"subject_id": str, "study_id": str,
                                                                   **{c: float for c in labels}})
    lab["subject_id"] = _int_ids(lab["subject_id"], path, "subject_id")
    lab["study_id"] = _int_ids(lab["study_id"], path, "study_id")
    bad = sorted(set(np.unique(lab[labels].to_numpy()[~np.isnan(lab[labels].to_numpy())])) - {-1.0, 0.0, 1.0})
    if bad:
        raise CohortError(f"{path.name}: label values {bad} found; expected 1, 0, -1 or blank")
    if lab.duplicated(["subject_id", "study_id"]).any():
        raise CohortError(f"{path.name}: (subject_id, study_id) repeated; one row per study is expected")
    lab = lab.rename(columns={"subject_id": "patient_id"})
    out = df.merge(lab, on=["patient_id", "study_id"], how="left", validate="many_to_one")
    out.index = df.index
    manifest.counts["images_without_label_row"] = int((~df.set_index(["patient_id", "study_id"]).index.isin(
        lab.set_index(["patient_id", "study_id"]).index)).sum())
    return out


"""A folder of DICOM files: the headers give patient, study, series, sex, age, view, laterality, modality.

Every file under ``folder`` (any depth, sorted, hidden files ignored) is read once, headers only: pixel
bytes are skipped, not loaded (``defer_size``), which is as fast as ``stop_before_pixels`` and still
tells whether PixelData is there. A file becomes an image row, or a recorded skip with its reason:

- ``not DICOM`` (no DICM preamble; set ``force: true`` for preamble-less files) or ``unreadable header``;
- ``no pixel data`` (e.g. a structured report, a DICOMDIR, a presentation state);
- ``no transfer syntax`` (file meta lacks (0002,0010): nothing can decode the pixels);
- ``unsupported transfer syntax`` (no installed decoder; the reason names the plugins that would help);
- ``no PatientID``.

Decoding failures of the pixels themselves are recorded later, by the image cache.

Age: PatientAge ("052Y", "006M", "010D", "002W") or else completed years between PatientBirthDate and
StudyDate (then SeriesDate, AcquisitionDate, ContentDate); outside [0, ``max_age``] -> missing (warned).
Race: the header's EthnicGroup through the ``dicom`` table, or a ``demographics`` table (see
:func:`join_demographics`), which wins when given.

Options: ``folder`` (default: the data root), ``modalities`` (keep only these, e.g. ``[CR, DX]``),
``demographics``, ``race_table``, ``exclude_hispanic`` (default true), ``force``, ``max_age``, ``dataset``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from readingrace.cohort.manifest import Manifest
from readingrace.cohort.race import apply_race, race_from_records
from readingrace.cohort.schema import conform
from readingrace.cohort.sources.export import (
    check_age_range, check_options, normalise_sex, parse_dicom_age, read_table, require_file, resolve,
)
from readingrace.errors import CohortError, ConfigError

#: Cohort-side column -> DICOM keyword, read from every file.
HEADER_TAGS: dict[str, str] = {
    "patient_id": "PatientID", "study_id": "StudyInstanceUID", "series_id": "SeriesInstanceUID",
    "sop_uid": "SOPInstanceUID", "sex_raw": "PatientSex", "age_raw": "PatientAge",
    "birth_date": "PatientBirthDate", "study_date": "StudyDate", "series_date": "SeriesDate",
    "acquisition_date": "AcquisitionDate", "content_date": "ContentDate", "view": "ViewPosition",
    "image_laterality": "ImageLaterality", "series_laterality": "Laterality", "modality": "Modality",
    "photometric": "PhotometricInterpretation", "body_part": "BodyPartExamined", "ethnic_group": "EthnicGroup",
    "height": "Rows", "width": "Columns", "number_of_frames": "NumberOfFrames", "accession": "AccessionNumber",
}
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
OPTIONS = {"folder", "modalities", "demographics", "race_table", "exclude_hispanic", "force", "max_age",
           "dataset"}
DEMOGRAPHICS_KEYS = {"csv", "columns", "race_table", "ethnicity_table"}
DEMOGRAPHICS_COLUMNS = ("patient_id", "race", "ethnicity", "sex", "age")


class Skipped(Exception):
    """A file that is not an image we can use; ``str(exc)`` is the recorded reason."""


def _value(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, MultiValue | list | tuple):
        return tuple(_value(x) for x in v)
    if isinstance(v, float | int):
        return v
    if isinstance(v, bytes):
        return None
    s = str(v).strip()
    return s or None


def transfer_syntax_problem(uid: str | None) -> str | None:
    """Why pixels with this transfer syntax cannot be decoded here, or None when they can."""
    if not uid:
        return "no transfer syntax: the file meta lacks (0002,0010) TransferSyntaxUID"
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"unsupported transfer syntax: {uid} has no pixel decoder"
    if not decoder.is_available:
        missing = "; ".join(f"{k}: {v}" for k, v in decoder.missing_dependencies.items()) \
            if isinstance(decoder.missing_dependencies, dict) else ", ".join(decoder.missing_dependencies)
        return f"unsupported transfer syntax: {pydicom.uid.UID(uid).name} needs a decoder plugin ({missing})"
    return None


def read_header(path: str | os.PathLike[str], *, tags: Mapping[str, str] = HEADER_TAGS,
                force: bool = False) -> dict[str, Any]:
    """Header values of one file (``tags``: column -> keyword) plus ``transfer_syntax``; raises :class:`Skipped`."""
    try:
        ds = pydicom.dcmread(path, defer_size=1024, force=force)
    except InvalidDicomError as exc:
        raise Skipped(f"not DICOM: {exc}") from None
    except Exception as exc:  # pydicom raises many types on damaged headers
        raise Skipped(f"unreadable header: {type(exc).__name__}: {exc}") from None
    if not any(t in ds for t in PIXEL_TAGS):
        raise Skipped("no pixel data")
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    problem = transfer_syntax_problem(str(ts) if ts else None)
    if problem:
        raise Skipped(problem)
    out = {col: _value(ds.get(kw)) for col, kw in tags.items()}
    if not out.get("patient_id"):
        raise Skipped("no PatientID")
    out["transfer_syntax"] = str(ts)
    return out


def list_files(folder: Path) -> list[Path]:
    """Every non-hidden file under ``folder``, sorted (a stable order gives a stable cohort)."""
    files = []
    for dirpath, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(dirpath) / n for n in names if not n.startswith("."))
    return sorted(files)


def scan(folder: Path, manifest: Manifest, *, tags: Mapping[str, str] = HEADER_TAGS,
         force: bool = False) -> pd.DataFrame:
    """One row per file: the header columns, ``path``, and ``skip_reason`` (None for a usable image).

    Skipped files are recorded in ``manifest`` with their reason.
    """
    if not folder.is_dir():
        raise CohortError(f"DICOM folder not found: {folder}; set cohort.options.folder")
    rows = []
    files = list_files(folder)
    listing = hashlib.sha256()
    total = 0
    for path in files:
        try:
            row = read_header(path, tags=tags, force=force)
            row["skip_reason"] = None
        except Skipped as exc:
            row = {"skip_reason": str(exc)}
            manifest.skip(path.relative_to(folder).as_posix(), str(exc), stage="dicom header")
        row["path"] = str(path)
        row["relpath"] = path.relative_to(folder).as_posix()
        rows.append(row)
        size = path.stat().st_size
        total += size
        listing.update(f"{row['relpath']}\t{size}\n".encode())
    # Hashing every pixel byte of a CT archive is too slow; the listing (names and sizes) identifies it.
    manifest.inputs.append({"path": folder.name or str(folder), "files": len(files), "size": total,
                            "sha256_listing": listing.hexdigest()})
    df = pd.DataFrame(rows, columns=[*tags, "transfer_syntax", "skip_reason", "path", "relpath"])
    manifest.counts["files_found"] = len(df)
    if df.empty:
        raise CohortError(f"no files under {folder}")
    return df


def age_from_dates(birth: object, *dates: object) -> float | None:
    """Completed years between a DICOM birth date (YYYYMMDD) and the first readable later date, else None."""
    b = _date(birth)
    if b is None:
        return None
    for d in dates:
        when = _date(d)
        if when is not None:
            return float(when.year - b.year - ((when.month, when.day) < (b.month, b.day)))
    return None


def _date(v: object) -> dt.date | None:
    if v is None or (isinstance(v, float) and v != v):
        return None
    try:
        return dt.datetime.strptime(str(v).strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def header_age(df: pd.DataFrame, manifest: Manifest, *, max_age: float = 120.0) -> pd.Series:
    """Age in years: PatientAge, else birth date vs study (series, acquisition, content) date."""
    age_as = df["age_raw"].map(parse_dicom_age)
    bad_as = df["age_raw"].notna() & age_as.isna()
    if bad_as.any():
        manifest.warn(f"PatientAge: {int(bad_as.sum())} values not of the form nnnD/W/M/Y "
                      f"(e.g. {df.loc[bad_as, 'age_raw'].iloc[0]!r}); birth date used where present")
    from_dates = [age_from_dates(r.birth_date, r.study_date, r.series_date, r.acquisition_date, r.content_date)
                  for r in df[["birth_date", "study_date", "series_date", "acquisition_date",
                               "content_date"]].itertuples(index=False)]
    age = age_as.astype(float).where(age_as.notna(), pd.Series(from_dates, index=df.index, dtype=float))
    return check_age_range(age, manifest, what="age", max_age=max_age)


def usable(df: pd.DataFrame, manifest: Manifest) -> pd.DataFrame:
    """The flow's first two entries: files found, then readable images with pixel data."""
    df = manifest.step("files found", df.iloc[0:0], df, detail=f"{len(df)} files")
    ok = df["skip_reason"].isna()
    reasons = df.loc[~ok, "skip_reason"].str.split(":").str[0].value_counts().to_dict()
    return manifest.step("readable DICOM image", df, df[ok], detail=f"skipped: {reasons}")


def finish_ids(df: pd.DataFrame, manifest: Manifest) -> pd.DataFrame:
    """image_id = SOPInstanceUID (relative path where absent); repeated SOPInstanceUIDs collapsed (step)."""
    df = df.assign(image_id=df["sop_uid"].where(df["sop_uid"].notna(), df["relpath"]))
    no_study = df["study_id"].isna()
    if no_study.any():
        manifest.warn(f"{int(no_study.sum())} images without StudyInstanceUID: each is its own study")
        df.loc[no_study, "study_id"] = df.loc[no_study, "image_id"]
    dup = df["image_id"].duplicated(keep="first")
    for rel in df.loc[dup, "relpath"]:
        manifest.skip(rel, "duplicate SOPInstanceUID: the same image is stored in an earlier file")
    return manifest.step("one file per SOPInstanceUID", df, df[~dup], detail=f"{int(dup.sum())} repeated images")


def join_demographics(df: pd.DataFrame, spec: Mapping[str, Any], data_root: Path, manifest: Manifest, *,
                      exclude_hispanic: bool = True) -> pd.DataFrame:
    """Race (and sex/age where the headers lack them) from a patient table.

    ``spec``: ``{csv: participants.csv, columns: {patient_id: pid, race: race, ethnicity: ethnic},
    race_table: nlst, ethnicity_table: nlst_ethnicity}``. Conflicting rows of a patient are excluded before
    de-duplication; the patient id is matched to the header's PatientID as a string.
    """
    if not isinstance(spec, Mapping):
        raise ConfigError("cohort.options.demographics must be a mapping {csv: ..., columns: {...}}")
    bad = sorted(set(spec) - DEMOGRAPHICS_KEYS)
    if bad:
        raise ConfigError(f"cohort.options.demographics: unknown key {bad[0]!r}; allowed: {sorted(DEMOGRAPHICS_KEYS)}")
    if not spec.get("csv"):
        raise ConfigError("cohort.options.demographics.csv: name the patient table")
    columns = dict(spec.get("columns") or {})
    bad = sorted(set(columns) - set(DEMOGRAPHICS_COLUMNS))
    if bad:
        raise ConfigError(f"cohort.options.demographics.columns: unknown key {bad[0]!r}; "
                          f"map any of {list(DEMOGRAPHICS_COLUMNS)}")
    columns.setdefault("patient_id", "patient_id")
    columns.setdefault("race", "race")
    path = require_file(resolve(spec["csv"], data_root), "demographics table", "cohort.options.demographics.csv")
    manifest.add_input(path)
    raw = read_table(path, columns=list(columns.values()))
    demo = pd.DataFrame({k: raw[v] for k, v in columns.items()})
    demo["patient_id"] = demo["patient_id"].str.strip().str.replace(r"\.0$", "", regex=True)
    out = race_from_records(df, demo, manifest, raw_col="race", table=spec.get("race_table", "generic"),
                            records_patient_col="patient_id",
                            ethnicity_col="ethnicity" if "ethnicity" in demo.columns else None,
                            ethnicity_table=spec.get("ethnicity_table", "generic_ethnicity"),
                            exclude_hispanic_rows=exclude_hispanic, what="demographics records")
    first = demo.drop_duplicates("patient_id").set_index("patient_id")
    if "sex" in first.columns:
        sex = normalise_sex(out["patient_id"].map(first["sex"]), manifest, what="demographics sex")
        out["sex"] = out["sex"].where(out["sex"].notna(), sex)
    if "age" in first.columns:
        age = pd.to_numeric(out["patient_id"].map(first["age"]), errors="coerce")
        out["age"] = out["age"].where(out["age"].notna(), age)
    return out


def build(df: pd.DataFrame, opts: Mapping[str, Any], data_root: Path, manifest: Manifest) -> pd.DataFrame:
    """Shared tail of the DICOM sources: sex, age, race (header or demographics)."""
    df = df.assign(sex=normalise_sex(df["sex_raw"], manifest, what="PatientSex"),
                   age=header_age(df, manifest, max_age=float(opts.get("max_age", 120))))
    exclude = bool(opts.get("exclude_hispanic", True))
    if opts.get("demographics"):
        df = join_demographics(df, opts["demographics"], data_root, manifest, exclude_hispanic=exclude)
    else:
        df = apply_race(df.assign(race_raw=df["ethnic_group"]), manifest, raw_col="race_raw",
                        table=opts.get("race_table", "dicom"), exclude_hispanic_rows=exclude, label="EthnicGroup")
    return df


def filter_modalities(df: pd.DataFrame, modalities: Iterable[str] | None, manifest: Manifest) -> pd.DataFrame:
    if not modalities:
        return df
    keep = {str(m).upper() for m in modalities}
    mod = df["modality"].fillna("").str.upper()
    removed = df.loc[~mod.isin(keep), "modality"].fillna("blank").value_counts().to_dict()
    return manifest.step(f"modality in {sorted(keep)}", df, df[mod.isin(keep)], detail=f"removed: {removed}")


def load(options: dict[str, Any], data_root: Path, manifest: Manifest) -> pd.DataFrame:
    """Build a cohort from a DICOM folder (see the module docstring)."""
    opts = check_options(options, OPTIONS, "dicom_dir")
    root = Path(data_root)
    folder = resolve(opts.get("folder", "."), root)
    df = usable(scan(folder, manifest, force=bool(opts.get("force", False))), manifest)
    df = filter_modalities(df, opts.get("modalities"), manifest)
    df = build(df, opts, root, manifest)
    df = finish_ids(df, manifest)
    df["laterality"] = df["image_laterality"].where(df["image_laterality"].notna(), df["series_laterality"])
    drop = ["sop_uid", "sex_raw", "age_raw", "birth_date", "series_date", "acquisition_date", "content_date",
            "image_laterality", "series_laterality", "ethnic_group", "skip_reason"]
    return conform(df.drop(columns=drop), dataset=opts.get("dataset", "dicom"))

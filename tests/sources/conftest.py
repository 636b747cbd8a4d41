"""Fixtures that reproduce the real sources' file names, columns and value formats (pixels generated).

Builders are returned by fixtures (``mimic_files``, ``chexpert_files``, ``dicom_writer``) so test files
need no imports from here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

# -- MIMIC-CXR-JPG 2.0.0 + MIMIC-IV ------------------------------------------------------------------

META_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
# The real mimic-cxr-2.0.0-chexpert.csv.gz lists the labels alphabetically.
MIMIC_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
                "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
                "Pneumothorax", "Support Devices"]
ADM_V1 = ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type", "admission_location",
          "discharge_location", "insurance", "language", "marital_status", "ethnicity", "edregtime", "edouttime",
          "hospital_expire_flag"]
ADM_V2 = ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type", "admit_provider_id",
          "admission_location", "discharge_location", "insurance", "language", "marital_status", "race",
          "edregtime", "edouttime", "hospital_expire_flag"]
PATIENT_COLUMNS = ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"]
OMR_COLUMNS = ["subject_id", "chartdate", "seq_num", "result_name", "result_value"]

#: subject -> race strings of its admissions (MIMIC-IV v1.0 vocabulary, valid in v2.x too).
MIMIC_SUBJECTS: dict[int, list[str]] = {
    10000032: ["WHITE", "WHITE"],
    10000764: ["BLACK/AFRICAN AMERICAN"],
    10001217: ["ASIAN", "UNKNOWN"],           # unknown in one admission: not a conflict
    10002428: ["WHITE", "BLACK/AFRICAN AMERICAN"],  # conflict: excluded
    10003400: ["HISPANIC/LATINO"],            # excluded
    10004235: ["UNABLE TO OBTAIN"],           # race missing, images kept
    10005348: [],                             # no admission at all
}


def dicom_id(*parts: object) -> str:
    h = hashlib.sha1("-".join(map(str, parts)).encode()).hexdigest()
    return "-".join(h[i:i + 8] for i in range(0, 40, 8))


def write_jpeg(path: Path, seed: int = 0, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="JPEG")


def make_mimic(root: Path, *, version: str = "v2", subjects: dict[int, list[str]] | None = None,
               omr: list[tuple[int, str, int, str, str]] | None = None, split: bool = True,
               labels: bool = True, images: bool = True) -> dict[str, Any]:
    """Write a MIMIC-CXR-JPG + MIMIC-IV tree under ``root``; returns what was written.

    Each subject has study 1 (2150-03-01: PA + LATERAL) and study 2 (2152-07-15: AP); subject 10000032
    also has an image with a blank ViewPosition in study 1. anchor_age = 50 + (subject % 7), anchor_year 2150.
    """
    subjects = MIMIC_SUBJECTS if subjects is None else subjects
    cxr = root / "mimic-cxr-jpg" / "2.0.0"
    iv = root / "mimic-iv" / ("1.0" if version == "v1" else "2.2")
    cxr.mkdir(parents=True)
    meta, lab, spl = [], [], []
    for k, subject in enumerate(sorted(subjects)):
        for s, (date, views) in enumerate([(21500301, ["PA", "LATERAL"]), (21520715, ["AP"])], start=1):
            study = 50000000 + 100 * k + s
            if subject == 10000032 and s == 1:
                views = [*views, ""]
            for v_i, view in enumerate(views):
                did = dicom_id(subject, study, v_i)
                meta.append([did, subject, study, "CHEST (PA AND LAT)", view, 3056, 2544, date,
                             133000.123 + v_i, "CHEST (PA AND LAT)", "postero-anterior" if view == "PA" else "",
                             "Erect"])
                spl.append([did, study, subject, ["train", "validate", "test"][k % 3]])
                if images:
                    write_jpeg(cxr / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{did}.jpg",
                               seed=k * 10 + s)
            row = [subject, study] + [np.nan] * len(MIMIC_LABELS)
            row[2 + MIMIC_LABELS.index("Cardiomegaly")] = [1.0, 0.0, -1.0][k % 3]
            row[2 + MIMIC_LABELS.index("No Finding")] = 1.0 if k % 3 == 1 else np.nan
            lab.append(row)
    pd.DataFrame(meta, columns=META_COLUMNS).to_csv(cxr / "mimic-cxr-2.0.0-metadata.csv.gz", index=False)
    if labels:
        pd.DataFrame(lab, columns=["subject_id", "study_id", *MIMIC_LABELS]).to_csv(
            cxr / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False)
    if split:
        pd.DataFrame(spl, columns=["dicom_id", "study_id", "subject_id", "split"]).to_csv(
            cxr / "mimic-cxr-2.0.0-split.csv.gz", index=False)

    folder = iv / ("core" if version == "v1" else "hosp")
    folder.mkdir(parents=True)
    cols = ADM_V1 if version == "v1" else ADM_V2
    race_col = "ethnicity" if version == "v1" else "race"
    adm = []
    for subject, races in subjects.items():
        for j, race in enumerate(races):
            row = dict.fromkeys(cols, "")
            row.update(subject_id=subject, hadm_id=20000000 + subject % 100000 * 10 + j,
                       admittime=f"2150-0{j + 1}-01 10:00:00", admission_type="EW EMER.", insurance="Other",
                       language="ENGLISH", marital_status="MARRIED", hospital_expire_flag=0)
            row[race_col] = race
            adm.append(row)
    pd.DataFrame(adm, columns=cols).to_csv(folder / "admissions.csv.gz", index=False)
    pats = [[s, "F" if s % 2 else "M", 50 + s % 7, 2150, "2014 - 2016", ""] for s in subjects]
    pd.DataFrame(pats, columns=PATIENT_COLUMNS).to_csv(folder / "patients.csv.gz", index=False)
    if omr is not None:
        pd.DataFrame(omr, columns=OMR_COLUMNS).to_csv(folder / "omr.csv.gz", index=False)
    return {"cxr_root": cxr, "iv_root": iv, "metadata": pd.DataFrame(meta, columns=META_COLUMNS),
            "options": {"cxr_root": str(cxr.relative_to(root)), "mimic_iv_root": str(iv.relative_to(root))}}


@pytest.fixture
def mimic_files() -> Callable[..., dict[str, Any]]:
    return make_mimic


# -- CheXpert ---------------------------------------------------------------------------------------

CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
                    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
                    "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
                    "Support Devices"]
DEMO_COLUMNS = ["PATIENT", "GENDER", "AGE_AT_CXR", "PRIMARY_RACE", "ETHNICITY"]


def make_chexpert(root: Path, *, prefix: str = "CheXpert-v1.0", backslash: bool = False,
                  demo: Sequence[tuple[str, str, int, str, str]] | None = None, demo_format: str = "xlsx",
                  images: bool = True) -> dict[str, Any]:
    """Write train.csv / valid.csv, images and ``CHEXPERT DEMO`` under ``root / prefix``."""
    base = root / prefix
    base.mkdir(parents=True)
    sep = "\\" if backslash else "/"
    train_rows = [
        ("train", 1, 1, 1, "frontal", "Female", 68, "Frontal", "AP"),
        ("train", 1, 1, 2, "lateral", "Female", 68, "Lateral", ""),
        ("train", 2, 1, 1, "frontal", "Male", 87, "Frontal", "PA"),
        ("train", 3, 1, 1, "frontal", "Female", 41, "Frontal", "AP"),
        ("train", 3, 2, 1, "frontal", "Female", 42, "Frontal", "AP"),
        ("train", 4, 1, 1, "frontal", "Male", 55, "Frontal", "PA"),
        ("train", 5, 1, 1, "frontal", "Male", 33, "Frontal", "AP"),
        ("train", 6, 1, 1, "frontal", "Unknown", 0, "Frontal", "AP"),
        ("train", 7, 1, 1, "frontal", "Female", 71, "Frontal", "AP"),
    ]
    valid_rows = [("valid", 64541, 1, 1, "frontal", "Male", 73, "Frontal", "AP"),
                  ("valid", 64542, 1, 1, "frontal", "Female", 70, "Frontal", "PA")]
    for name, rows in (("train.csv", train_rows), ("valid.csv", valid_rows)):
        recs = []
        for i, (folder, pat, study, view_n, kind, sex, age, fl, appa) in enumerate(rows):
            rel = [folder, f"patient{pat:05d}", f"study{study}", f"view{view_n}_{kind}.jpg"]
            recs.append([sep.join([prefix, *rel]), sex, age, fl, appa,
                         *([1.0 if i % 2 else np.nan] + [np.nan] * 12 + [-1.0 if i % 3 == 0 else 0.0])])
            if images:
                write_jpeg(base.joinpath(*rel), seed=i)
        pd.DataFrame(recs, columns=CHEXPERT_COLUMNS).to_csv(base / name, index=False)
    if demo is None:
        demo = [("patient00001", "Female", 68, "White, non-Hispanic", "Non-Hispanic/Non-Latino"),
                ("patient00002", "Male", 87, "Black or African American", "Non-Hispanic/Non-Latino"),
                ("patient00003", "Female", 41, "Asian", "Not Hispanic"),
                ("patient00004", "Male", 55, "White", "Hispanic/Latino"),          # Hispanic via ETHNICITY
                ("patient00005", "Male", 33, "Other, Hispanic", "Unknown"),         # Hispanic via race string
                ("patient00006", "Female", 19, "Race and Ethnicity Unknown", "Unknown"),
                ("patient00007", "Female", 71, "White", "Non-Hispanic/Non-Latino"),
                ("patient00007", "Female", 71, "Black, non-Hispanic", "Non-Hispanic/Non-Latino"),  # conflict
                ("patient64541", "Male", 73, "White or Caucasian", "Non-Hispanic/Non-Latino"),
                ("patient64542", "Female", 70, "Pacific Islander, non-Hispanic", "Patient Refused")]
    frame = pd.DataFrame(list(demo), columns=DEMO_COLUMNS)
    demo_path = base / f"CHEXPERT DEMO.{demo_format}"
    if demo_format == "xlsx":
        frame.to_excel(demo_path, index=False)
    else:
        frame.to_csv(demo_path, index=False)
    return {"root": base, "train": train_rows, "valid": valid_rows, "demo": demo_path}


@pytest.fixture
def chexpert_files() -> Callable[..., dict[str, Any]]:
    return make_chexpert


# -- DICOM -------------------------------------------------------------------------------------------

SOP_CLASS = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1",
             "CT": "1.2.840.10008.5.1.4.1.1.2", "MG": "1.2.840.10008.5.1.4.1.1.1.2"}


def write_dicom(path: Path, *, patient_id: str | None = "PAT001", study_uid: str | None = None,
                series_uid: str | None = None, sop_uid: str | None = None, modality: str = "CR",
                pixels: np.ndarray | None = None, photometric: str = "MONOCHROME2", sex: str | None = "F",
                age: str | None = "052Y", birth_date: str | None = None, study_date: str | None = "20200102",
                view: str | None = "PA", laterality: str | None = None, ethnic_group: str | None = None,
                transfer_syntax: str | None = ExplicitVRLittleEndian, with_pixels: bool = True,
                rescale: tuple[float, float] | None = None, **extra: Any) -> Path:
    """Write one DICOM file with the header fields real exports carry (``extra``: more keywords)."""
    ds = Dataset()
    ds.SOPClassUID = SOP_CLASS.get(modality, SOP_CLASS["CR"])
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    for kw, value in (("PatientID", patient_id), ("PatientSex", sex), ("PatientAge", age),
                      ("PatientBirthDate", birth_date), ("StudyDate", study_date), ("ViewPosition", view),
                      ("ImageLaterality", laterality), ("EthnicGroup", ethnic_group)):
        if value is not None:
            setattr(ds, kw, value)
    for kw, value in extra.items():
        setattr(ds, kw, value)
    if with_pixels:
        arr = np.arange(64, dtype=np.uint16).reshape(8, 8) * 50 if pixels is None else pixels
        signed = arr.dtype.kind == "i"
        ds.Rows, ds.Columns = arr.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16
        ds.BitsStored = 16 if signed else 12
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(signed)
        data = arr.astype(np.int16 if signed else np.uint16).tobytes()
        if transfer_syntax is not None and UID(transfer_syntax).is_compressed:
            # a single (undecodable) fragment: enough for header-level checks
            ds.PixelData = encapsulate([data])
            ds["PixelData"].VR = "OB"
        else:
            ds.PixelData = data
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if transfer_syntax is not None:
        meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, implicit_vr=False, little_endian=True)
    return path


@pytest.fixture
def dicom_writer() -> Callable[..., Path]:
    return write_dicom


@pytest.fixture
def read_back() -> Callable[[Path], pydicom.Dataset]:
    return pydicom.dcmread

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from readingrace.cohort.manifest import Manifest
from readingrace.cohort.schema import validate_cohort
from readingrace.cohort.sources.export import load, normalise_sex, parse_age
from readingrace.errors import CohortError, ConfigError

OPTIONS = {"csv": "export/cxr.csv", "image_root": "export/images",
           "columns": {"path": "png_path", "patient_id": "empi_anon", "study_id": "acc_anon", "race": "RACE",
                       "sex": "GENDER", "age": "AGE"}}


def make_export(root, dicom_writer):
    img = root / "export" / "images"
    img.mkdir(parents=True)
    for name in ("a1.png", "a2.png", "b1.png", "c1.png", "d1.png", "e1.png"):
        Image.fromarray(np.full((8, 8), 100, np.uint16)).save(img / name)
    dicom_writer(img / "f1.dcm", patient_id="F")
    rows = [
        ("a1.png", "A", "ACC1", "Caucasian or White", "Female", "052Y"),
        ("a1.png", "A", "ACC1", "Caucasian or White", "Female", "052Y"),   # same image, second encounter
        ("a2.png", "A", "ACC2", "White", "F", "53"),
        ("b1.png", "B", "ACC3", "African American  or Black", "MALE", "61"),
        ("c1.png", "C", "ACC4", "White", "M", "40"),
        ("c1.png", "C", "ACC4", "Black", "M", "40"),                       # conflict: C excluded
        ("d1.png", "D", "ACC5", "Hispanic", "F", "30"),                    # excluded
        ("e1.png", "E", "ACC6", "Elvish", "Z", "abc"),                     # unknown race, sex, age
        ("f1.dcm", "F", "ACC7", "Asian", "F", "130"),                      # DICOM, age out of range
        ("missing.png", "G", "ACC8", "Asian", "F", "44"),                  # file missing
        ("", "H", "ACC9", "Asian", "F", "44"),                             # blank path
    ]
    pd.DataFrame(rows, columns=["png_path", "empi_anon", "acc_anon", "RACE", "GENDER", "AGE"]).to_csv(
        root / "export" / "cxr.csv", index=False)


def test_export_cohort(tmp_path, dicom_writer):
    make_export(tmp_path, dicom_writer)
    m = Manifest(source="export")
    df = load(OPTIONS, tmp_path, m)
    validate_cohort(df)
    assert df["image_id"].tolist() == ["a1.png", "a2.png", "b1.png", "e1.png", "f1.dcm"]
    assert df["race"].tolist() == ["White", "White", "Black", None, "Asian"]
    assert df["sex"].tolist() == ["F", "F", "M", None, "F"]
    assert df["age"].iloc[:3].tolist() == [52.0, 53.0, 61.0] and df["age"].iloc[3:].isna().all()
    assert df["study_id"].tolist()[:2] == ["ACC1", "ACC2"]
    assert df["path"].map(lambda p: p.startswith(str(tmp_path / "export" / "images"))).all()
    names = [s.step for s in m.flow]
    assert names == ["export rows", "row has path and patient id", "race conflicting across records",
                     "Hispanic/Latino excluded", "one row per image", "image file present"]
    counts = {s.step: s.images_before - s.images_after for s in m.flow}
    assert counts == {"export rows": -11, "row has path and patient id": 1, "race conflicting across records": 2,
                      "Hispanic/Latino excluded": 1, "one row per image": 1, "image file present": 1}
    assert m.counts["race_unlisted_strings"] == {"Elvish": 1} and m.counts["missing_files"] == 1
    assert any("'Z'" in w for w in m.warnings) and any("unreadable as an age" in w for w in m.warnings)
    assert any(s.reason == "no path or patient id" and s.item == "cxr.csv row 12" for s in m.skipped)


def test_export_rejects_unknown_keys_and_missing_columns(tmp_path, dicom_writer):
    make_export(tmp_path, dicom_writer)
    with pytest.raises(ConfigError, match="unknown key 'mrn'"):
        load({**OPTIONS, "columns": {**OPTIONS["columns"], "mrn": "x"}}, tmp_path, Manifest())
    with pytest.raises(ConfigError, match="unknown key 'root'"):
        load({**OPTIONS, "root": "x"}, tmp_path, Manifest())
    with pytest.raises(CohortError, match=r"cxr.csv: missing column\(s\) \['Race', 'Sex'\]"):
        load({**OPTIONS, "columns": {**OPTIONS["columns"], "race": "Race", "sex": "Sex"}}, tmp_path, Manifest())
    with pytest.raises(CohortError, match="export CSV not found"):
        load({**OPTIONS, "csv": "nope.csv"}, tmp_path, Manifest())


def test_sex_and_age_parsers():
    m = Manifest()
    assert normalise_sex(pd.Series(["m", "Female", "U", None, "3"]), m).tolist() == ["M", "F", None, None, None]
    assert len(m.warnings) == 1 and "'3'" in m.warnings[0]
    ages = parse_age(pd.Series(["45", "006M", 70.5, "-1", None]), m)
    assert ages.iloc[:3].tolist() == [45.0, 0.5, 70.5] and ages.iloc[3:].isna().all()

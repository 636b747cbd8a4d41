from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from readingrace.cohort.manifest import Manifest
from readingrace.cohort.schema import REQUIRED_COLUMNS, validate_cohort
from readingrace.cohort.sources import get_loader
from readingrace.cohort.sources.mimic import load, nearest_bmi
from readingrace.errors import CohortError, ConfigError


def build(tmp_path, files, **options):
    m = Manifest(source="mimic")
    df = load({**files["options"], **options}, tmp_path, m)
    return df, m


def step(m: Manifest, name: str):
    hits = [s for s in m.flow if s.step == name]
    assert hits, [s.step for s in m.flow]
    return hits[0]


def test_cohort_columns_race_sex_age(tmp_path, mimic_files):
    files = mimic_files(tmp_path)
    df, m = build(tmp_path, files)
    validate_cohort(df)
    assert list(df.columns[: len(REQUIRED_COLUMNS)]) == list(REQUIRED_COLUMNS)
    assert get_loader("mimic") is load
    race = df.groupby("patient_id")["race"].first().to_dict()
    # 10002428 (conflict) and 10003400 (Hispanic) are gone; unknown race kept as missing.
    assert set(race) == {"10000032", "10000764", "10001217", "10004235", "10005348"}
    assert race["10000032"] == "White" and race["10000764"] == "Black" and race["10001217"] == "Asian"
    assert race["10004235"] is None and race["10005348"] is None
    assert m.counts["images_without_admissions"] == 3
    # age = anchor_age + (study year - anchor_year): 10000764 -> anchor 50 + 10000764 % 7 = 54 in 2150;
    # its studies are in 2150 and 2152
    sub = df[df["patient_id"] == "10000764"].set_index("study_id")["age"]
    assert sorted(sub.unique()) == [54.0, 56.0]
    assert set(df.loc[df["patient_id"] == "10000764", "sex"]) == {"M"}
    assert set(df.loc[df["patient_id"] == "10000032", "sex"]) == {"M"}
    assert df["path"].str.endswith(".jpg").all()
    first = df.iloc[0]
    assert first["path"].endswith(f"files/p10/p{first['patient_id']}/s{first['study_id']}/{first['image_id']}.jpg")
    assert "race:mimic_iv_v2@1" in m.mappings


def test_conflicting_race_excluded_before_deduplication(tmp_path, mimic_files):
    # 10002428 has a WHITE admission first, then BLACK/AFRICAN AMERICAN; de-duplicating admissions first
    # (the original notebooks) would have kept the patient as White.
    files = mimic_files(tmp_path)
    df, m = build(tmp_path, files)
    assert "10002428" not in set(df["patient_id"])
    s = step(m, "race conflicting across admissions")
    assert s.images_before - s.images_after == 3 and s.patients_before - s.patients_after == 1
    assert m.counts["race conflicting across admissions: patients"] == 1
    # The flow is ordered: conflict step precedes the Hispanic step.
    names = [x.step for x in m.flow]
    assert names.index("race conflicting across admissions") < names.index("Hispanic/Latino excluded")
    assert step(m, "Hispanic/Latino excluded").images_before - step(m, "Hispanic/Latino excluded").images_after == 3


def test_v1_ethnicity_and_v2_race_give_the_same_cohort(tmp_path, mimic_files):
    a, b = tmp_path / "a", tmp_path / "b"
    fa, fb = mimic_files(a, version="v1"), mimic_files(b, version="v2")
    assert (fa["iv_root"] / "core" / "admissions.csv.gz").is_file()
    assert (fb["iv_root"] / "hosp" / "admissions.csv.gz").is_file()
    da, ma = build(a, fa)
    db, mb = build(b, fb)
    pd.testing.assert_frame_equal(da.drop(columns="path"), db.drop(columns="path"))
    assert ma.counts["admissions_race_column"] == "ethnicity" and mb.counts["admissions_race_column"] == "race"
    assert [s.images_after for s in ma.flow] == [s.images_after for s in mb.flow]


def test_v2_fine_values_and_unknown_strings_reported(tmp_path, mimic_files):
    subjects = {
        11000001: ["WHITE - OTHER EUROPEAN", "WHITE"],      # same group: kept, White
        11000002: ["ASIAN - CHINESE"],
        11000003: ["HISPANIC/LATINO - PUERTO RICAN"],       # Hispanic: excluded
        11000004: ["BLACK/CAPE VERDEAN", "PORTUGUESE"],     # Black vs White: conflict
        11000005: ["MARTIAN"],                               # not in the table: reported, missing
        11000006: ["PATIENT DECLINED TO ANSWER", "BLACK/AFRICAN"],
    }
    files = mimic_files(tmp_path, subjects=subjects)
    df, m = build(tmp_path, files)
    race = df.groupby("patient_id")["race"].first().to_dict()
    assert race == {"11000001": "White", "11000002": "Asian", "11000005": None, "11000006": "Black"}
    assert m.counts["race_unlisted_strings"] == {"MARTIAN": 1}
    assert any("MARTIAN" in w for w in m.warnings)
    raw = df.groupby("patient_id")["race_raw"].first()
    assert raw["11000001"] == "WHITE | WHITE - OTHER EUROPEAN"


def test_labels_official_split_and_missing_files(tmp_path, mimic_files):
    files = mimic_files(tmp_path)
    gone = files["metadata"].iloc[3]
    (files["cxr_root"] / "files" / f"p{str(gone.subject_id)[:2]}" / f"p{gone.subject_id}" / f"s{gone.study_id}"
     / f"{gone.dicom_id}.jpg").unlink()
    df, m = build(tmp_path, files)
    assert m.counts["missing_files"] == 1
    s = step(m, "image file present")
    assert s.images_before - s.images_after == 1
    assert gone.dicom_id not in set(df["image_id"])
    assert any(x.item == gone.dicom_id and x.reason.startswith("missing file") for x in m.skipped)
    assert df["Cardiomegaly"].dtype == float
    assert set(df["Cardiomegaly"].dropna()) <= {1.0, 0.0, -1.0} and -1.0 in set(df["Cardiomegaly"])
    assert df["No Finding"].isna().any() and (df["No Finding"] == 1.0).any()
    assert set(df["official_split"]) == {"train", "val", "test"}


def test_frontal_only_and_blank_view(tmp_path, mimic_files):
    files = mimic_files(tmp_path)
    df_all, m_all = build(tmp_path, files)
    assert df_all["view"].isna().sum() == 1 and m_all.counts["blank_view_position"] == 1
    assert not df_all.loc[df_all["view"].isna(), "frontal"].any()
    df, m = build(tmp_path, files, frontal_only=True)
    assert set(df["view"]) == {"AP", "PA"}
    s = step(m, "frontal (ViewPosition AP or PA)")
    assert s.images_before - s.images_after == 7 + 1  # 7 laterals + 1 blank
    assert "1 with a blank ViewPosition" in s.detail


def test_bmi_nearest_record(tmp_path, mimic_files):
    omr = [
        (10000032, "2150-02-20", 1, "BMI (kg/m2)", "22.5"),   # 10 days before study 1
        (10000032, "2150-03-11", 1, "BMI (kg/m2)", "30.1"),   # 10 days after: tie -> earlier wins
        (10000032, "2150-03-01", 1, "Weight (Lbs)", "180"),   # not BMI
        (10000032, "2152-06-01", 1, "BMI (kg/m2)", "27.0"),   # 44 days before study 2
        (10000032, "2152-06-01", 2, "BMI (kg/m2)", "29.0"),   # same day: mean 28.0
        (10000764, "2140-01-01", 1, "BMI (kg/m2)", "25.0"),   # > 365 days away from both studies
        (10001217, "2150-03-01", 1, "BMI (kg/m2)", "abc"),    # unreadable: ignored, warned
    ]
    files = mimic_files(tmp_path, omr=omr)
    df, m = build(tmp_path, files)
    bmi = df.groupby(["patient_id", "study_id"])["bmi"].first()
    studies = sorted(df.loc[df["patient_id"] == "10000032", "study_id"].unique())
    assert bmi[("10000032", studies[0])] == pytest.approx(22.5)
    assert bmi[("10000032", studies[1])] == pytest.approx(28.0)
    assert df.loc[df["patient_id"] == "10000764", "bmi"].isna().all()
    assert df.loc[df["patient_id"] == "10001217", "bmi"].isna().all()
    assert any("omr" in w and "ignored" in w for w in m.warnings)
    df2, _ = build(tmp_path, files, bmi_max_days=None)
    assert (df2.loc[df2["patient_id"] == "10000764", "bmi"] == 25.0).all()


def test_nearest_bmi_without_records_is_nan():
    studies = pd.DataFrame({"patient_id": ["1", "2"], "study_date": pd.to_datetime(["2150-01-01", None])})
    empty = pd.DataFrame({"patient_id": pd.Series(dtype=str), "chartdate": pd.Series(dtype="datetime64[ns]"),
                          "bmi": pd.Series(dtype=float)})
    assert nearest_bmi(studies, empty, max_days=365).isna().all()


def test_missing_column_names_file_and_column(tmp_path, mimic_files):
    files = mimic_files(tmp_path)
    p = files["cxr_root"] / "mimic-cxr-2.0.0-metadata.csv.gz"
    pd.read_csv(p).drop(columns=["ViewPosition"]).to_csv(p, index=False)
    with pytest.raises(CohortError, match=r"mimic-cxr-2.0.0-metadata.csv.gz: missing column\(s\) \['ViewPosition'\]"):
        build(tmp_path, files)


def test_admissions_without_race_column(tmp_path, mimic_files):
    files = mimic_files(tmp_path)
    p = files["iv_root"] / "hosp" / "admissions.csv.gz"
    pd.read_csv(p).drop(columns=["race"]).to_csv(p, index=False)
    with pytest.raises(CohortError, match="'race'.*'ethnicity'"):
        build(tmp_path, files)


def test_missing_files_and_options_errors(tmp_path, mimic_files):
    files = mimic_files(tmp_path)
    with pytest.raises(ConfigError, match="unknown key 'frontal'"):
        build(tmp_path, files, frontal=True)
    (files["iv_root"] / "hosp" / "patients.csv.gz").unlink()
    with pytest.raises(CohortError, match="patients.csv.gz not found"):
        build(tmp_path, files)


def test_same_inputs_identical_cohort_and_manifest(tmp_path, mimic_files):
    files = mimic_files(tmp_path, omr=[(10000032, "2150-02-20", 1, "BMI (kg/m2)", "22.5")])
    d1, m1 = build(tmp_path, files)
    d2, m2 = build(tmp_path, files)
    pd.testing.assert_frame_equal(d1, d2)
    assert json.dumps(m1.to_dict(), default=str) == json.dumps(m2.to_dict(), default=str)
    assert {i["path"] for i in m1.inputs} >= {"mimic-cxr-2.0.0-metadata.csv.gz", "admissions.csv.gz",
                                              "patients.csv.gz", "omr.csv.gz"}
    assert all(len(i["sha256"]) == 64 and i["size"] > 0 for i in m1.inputs)
    assert np.isfinite(d1["age"]).all()


def test_generic_build_on_top_of_the_source(tmp_path, mimic_files):
    from readingrace.cohort.build import build_cohort
    from readingrace.config import CohortConfig

    files = mimic_files(tmp_path)
    cfg = CohortConfig(source="mimic", options=files["options"], target="race", min_prevalence=0.0)
    df, m = build_cohort(cfg, data_root=tmp_path)
    assert sorted(df["race"].unique()) == ["Asian", "Black", "White"]
    assert m.flow[0].step == "metadata rows" and m.flow[0].images_after == 22
    assert m.counts["images"] == len(df) == 10

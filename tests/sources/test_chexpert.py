from __future__ import annotations

import pandas as pd
import pytest

from readingrace.cohort.manifest import Manifest
from readingrace.cohort.schema import validate_cohort
from readingrace.cohort.sources.chexpert import load, parse_path
from readingrace.errors import CohortError, ConfigError


def build(data_root, **options):
    m = Manifest(source="chexpert")
    return load(options, data_root, m), m


def flow(m):
    return {s.step: s for s in m.flow}


def test_parse_path_any_root_split_and_slash_style():
    paths = pd.Series([
        "CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg",
        "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg",
        "CheXpert-v1.0-small\\train\\patient00003\\study2\\view2_lateral.jpg",
        "train/patient00004/study1/view1_frontal.jpg",
        "/data/chexpert/CheXpert-v1.0/test/patient64741/study1/view1_frontal.jpg",
        "CheXpert-v1.0/train/patient1/study1/view1_frontal.jpg",  # not 5 digits
    ])
    p = parse_path(paths)
    assert p["patient"].tolist()[:5] == ["patient00001", "patient64541", "patient00003", "patient00004",
                                         "patient64741"]
    assert p["folder"].tolist()[:5] == ["train", "valid", "train", "train", "test"]
    assert p.loc[2, "study"] == "study2" and p.loc[2, "file"] == "view2_lateral.jpg"
    assert p.loc[5].isna().all()


def test_cohort_race_rules_and_views(tmp_path, chexpert_files):
    files = chexpert_files(tmp_path)
    df, m = build(tmp_path)  # finds CheXpert-v1.0/ and its CSVs and CHEXPERT DEMO.xlsx
    validate_cohort(df)
    race = df.groupby("patient_id")["race"].first().to_dict()
    # patient00004 (ETHNICITY Hispanic/Latino) and 00005 ("Other, Hispanic") excluded as Hispanic;
    # patient00007 has two demographics rows that disagree: excluded; 00006 unknown -> missing.
    assert race == {"patient00001": "White", "patient00002": "Black", "patient00003": "Asian",
                    "patient00006": None, "patient64541": "White", "patient64542": "Other"}
    steps = flow(m)
    c = steps["race conflicting across demographics records"]
    assert (c.images_before - c.images_after, c.patients_before - c.patients_after) == (1, 1)
    h = steps["Hispanic/Latino excluded"]
    assert (h.images_before - h.images_after, h.patients_before - h.patients_after) == (2, 2)
    assert "race:chexpert@1" in m.mappings and "race:chexpert_ethnicity@1" in m.mappings
    # valid/ rows parse and keep their folder; study id is patient + study folder
    v = df[df["patient_id"] == "patient64541"].iloc[0]
    assert v["image_id"] == "valid/patient64541/study1/view1_frontal.jpg"
    assert v["chexpert_folder"] == "valid" and v["study_id"] == "patient64541/study1"
    assert v["path"] == str(files["root"] / "valid/patient64541/study1/view1_frontal.jpg")
    p1 = df[df["patient_id"] == "patient00001"].set_index("image_id")
    assert p1.loc["train/patient00001/study1/view1_frontal.jpg", "view"] == "AP"
    assert p1.loc["train/patient00001/study1/view2_lateral.jpg", "view"] == "LATERAL"
    assert not p1.loc["train/patient00001/study1/view2_lateral.jpg", "frontal"]
    assert set(df["sex"].dropna()) == {"F", "M"}
    # Sex "Unknown" in train.csv falls back to the demographics GENDER ("Female")
    assert df.loc[df["patient_id"] == "patient00006", "sex"].tolist() == ["F"]
    assert df["Support Devices"].isin([-1.0, 0.0]).all()
    df_f, m_f = build(tmp_path, frontal_only=True)
    assert df_f["frontal"].all() and len(df_f) == len(df) - 1


def test_backslash_paths_small_root_and_csv_demographics(tmp_path, chexpert_files):
    files = chexpert_files(tmp_path, prefix="CheXpert-v1.0-small", backslash=True, demo_format="csv")
    df, m = build(tmp_path, root="CheXpert-v1.0-small")
    assert "train/patient00003/study2/view1_frontal.jpg" in set(df["image_id"])
    assert df["path"].map(lambda p: (files["root"] / p).is_file()).all()
    assert m.counts["missing_files"] == 0
    assert {i["path"] for i in m.inputs} == {"train.csv", "valid.csv", "CHEXPERT DEMO.csv"}


def test_white_non_hispanic_is_white_and_unknown_strings_reported(tmp_path, chexpert_files):
    demo = [("patient00001", "Female", 68, "White, non-Hispanic", "Non-Hispanic/Non-Latino"),
            ("patient00002", "Male", 87, "Black, non-Hispanic", "Not Hispanic"),
            ("patient00003", "Female", 41, "Asian, non-Hispanic", "Non-Hispanic/Non-Latino"),
            ("patient00004", "Male", 55, "Klingon", "Non-Hispanic/Non-Latino"),
            ("patient00005", "Male", 33, "White", "Hispanic/Latino")]
    chexpert_files(tmp_path, demo=demo)
    df, m = build(tmp_path, check_files=False)
    race = df.groupby("patient_id")["race"].first()
    assert race["patient00001"] == "White" and race["patient00002"] == "Black" and race["patient00003"] == "Asian"
    assert race["patient00004"] is None and "patient00005" not in race.index
    assert m.counts["race_unlisted_strings"] == {"Klingon": 1}
    # patients 6, 7 and the valid ones have no demographics row: race missing, counted
    assert m.counts["images_without_demographics_records"] == 4


def test_official_split_by_row_index(tmp_path, chexpert_files):
    files = chexpert_files(tmp_path)
    split = pd.DataFrame({"index": [0, 2, 3, 4], "split": ["train", "validate", "test", "test"]})
    split.to_csv(tmp_path / "chexpert_split_2021_08_20.csv")  # the ",index,split" layout
    assert (tmp_path / "chexpert_split_2021_08_20.csv").read_text().splitlines()[0] == ",index,split"
    df, _ = build(tmp_path, split_file="chexpert_split_2021_08_20.csv")
    s = df.set_index("image_id")["official_split"]
    assert s["train/patient00001/study1/view1_frontal.jpg"] == "train"
    assert s["train/patient00002/study1/view1_frontal.jpg"] == "val"
    assert s["train/patient00003/study1/view1_frontal.jpg"] == "test"
    assert pd.isna(s["train/patient00001/study1/view2_lateral.jpg"])
    assert pd.isna(s["valid/patient64541/study1/view1_frontal.jpg"])
    pd.DataFrame({"index": [0, 99], "split": ["train", "test"]}).to_csv(tmp_path / "bad.csv")
    with pytest.raises(CohortError, match="bad.csv: index values run to 99 but train.csv has 9 rows"):
        build(tmp_path, split_file="bad.csv")
    assert len(files["train"]) == 9


def test_missing_images_counted_and_columns_checked(tmp_path, chexpert_files):
    files = chexpert_files(tmp_path)
    (files["root"] / "train/patient00002/study1/view1_frontal.jpg").unlink()
    df, m = build(tmp_path)
    assert "patient00002" not in set(df["patient_id"])
    assert m.counts["missing_files"] == 1
    s = flow(m)["image file present"]
    assert s.images_before - s.images_after == 1
    t = pd.read_csv(files["root"] / "train.csv").drop(columns=["Frontal/Lateral"])
    t.to_csv(files["root"] / "train.csv", index=False)
    with pytest.raises(CohortError, match=r"train.csv: missing column\(s\) \['Frontal/Lateral'\]"):
        build(tmp_path)
    with pytest.raises(ConfigError, match="unknown key 'csv'"):
        build(tmp_path, csv="train.csv")


def test_unparseable_paths_are_recorded(tmp_path, chexpert_files):
    files = chexpert_files(tmp_path)
    t = pd.read_csv(files["root"] / "train.csv")
    t.loc[0, "Path"] = "somewhere/else/image.jpg"
    t.to_csv(files["root"] / "train.csv", index=False)
    df, m = build(tmp_path)
    s = flow(m)["Path parsed"]
    assert s.images_before - s.images_after == 1
    assert any(x.item == "somewhere/else/image.jpg" and "row 2" in x.reason for x in m.skipped)

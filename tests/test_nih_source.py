"""NIH ChestX-ray14 source on a schema-exact fixture (real header, 11 values per row)."""

import gzip
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from readingrace.cohort.build import build_cohort
from readingrace.config import CohortConfig
from readingrace.errors import CohortError

HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")


def write_nih(root: Path, rows: list[tuple], present: set[str], gz: bool = True) -> Path:
    text = HEADER + "".join(
        f"{img},{labels},{fu},{pid},{age},{sex},{view},2500,2048,0.143,0.143\n"
        for img, labels, fu, pid, age, sex, view in rows)
    meta = root / ("Data_Entry_2017_v2020.csv.gz" if gz else "Data_Entry_2017.csv")
    if gz:
        with gzip.open(meta, "wt") as f:
            f.write(text)
    else:
        meta.write_text(text)
    rng = np.random.default_rng(0)
    for i, name in enumerate(sorted(present)):
        folder = root / f"images_{i % 2 + 1:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(folder / name)
    return meta


ROWS = [
    ("00000001_000.png", "Cardiomegaly", 0, 1, 57, "M", "PA"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", 1, 1, 58, "M", "PA"),
    ("00000002_000.png", "No Finding", 0, 2, 81, "F", "AP"),
    ("00000003_000.png", "Hernia", 0, 3, 412, "F", "PA"),   # a real kind of NIH age error
    ("00000004_000.png", "Mass|Nodule", 0, 4, 30, "M", "AP"),
    ("00000005_000.png", "No Finding", 0, 5, 19, "F", "PA"),
]


def test_columns_read_by_position_and_missing_files_counted(tmp_path):
    present = {r[0] for r in ROWS} - {"00000004_000.png"}
    write_nih(tmp_path, ROWS, present)
    df, manifest = build_cohort(CohortConfig(source="nih", target="sex"), data_root=tmp_path)
    assert len(df) == 5 and df["patient_id"].nunique() == 4
    row = df.set_index("image_id").loc["00000001_001.png"]
    assert (row["sex"], row["view"], row["age"], row["patient_id"]) == ("M", "PA", 58.0, "1")
    assert row["Cardiomegaly"] == 1 and row["Emphysema"] == 1 and row["Mass"] == 0 and row["No Finding"] == 0
    assert row["study_id"] == "00000001_001.png"
    assert np.isnan(df.set_index("image_id").loc["00000003_000.png", "age"])   # 412 years -> missing
    assert manifest.counts["missing_files"] == 1
    step = {s.step: s for s in manifest.flow}["image file present"]
    assert (step.images_before, step.images_after) == (6, 5)
    assert any("Patient Age outside" in w for w in manifest.warnings)
    assert manifest.inputs[0]["sha256"]


def test_age_group_half_open(tmp_path):
    write_nih(tmp_path, ROWS, {r[0] for r in ROWS})
    df, _ = build_cohort(CohortConfig(source="nih", target="age_group", min_prevalence=0), data_root=tmp_path)
    groups = df.set_index("image_id")["age_group"]
    assert groups["00000005_000.png"] == "0-20" and groups["00000002_000.png"] == "80+"
    assert "00000003_000.png" not in groups.index   # age missing -> no target


def test_conflicting_sex_excludes_the_patient(tmp_path):
    rows = ROWS + [("00000002_001.png", "No Finding", 1, 2, 82, "M", "AP")]
    write_nih(tmp_path, rows, {r[0] for r in rows})
    df, manifest = build_cohort(CohortConfig(source="nih", target="sex"), data_root=tmp_path)
    assert "2" not in set(df["patient_id"])
    assert "1 patient(s) whose sex differs" in {s.step: s for s in manifest.flow}["patients with one sex"].detail
    assert [(k.item, k.reason) for k in manifest.skipped if k.item.startswith("patient ")] == [
        ("patient 2", "sex differs between the patient's images")]  # traceable in manifest.json, never in reports


def test_wrong_header_is_a_clear_error(tmp_path):
    (tmp_path / "Data_Entry_2017.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(CohortError, match="unexpected header"):
        build_cohort(CohortConfig(source="nih", target="sex"), data_root=tmp_path)


def test_one_class_left_is_a_clear_error(tmp_path):
    rows = [r for r in ROWS if r[5] == "M"]
    write_nih(tmp_path, rows, {r[0] for r in rows})
    with pytest.raises(CohortError, match="at least two"):
        build_cohort(CohortConfig(source="nih", target="sex"), data_root=tmp_path)


@pytest.mark.shared_data
def test_real_nih_metadata(shared_data):
    t0 = time.perf_counter()
    df, manifest = build_cohort(CohortConfig(source="nih", target="sex"), data_root=shared_data / "nih-cxr14-sample")
    assert time.perf_counter() - t0 < 60
    assert len(df) == 909 and df["patient_id"].nunique() == 617
    assert manifest.counts["missing_files"] == 112_120 - 909
    assert df["sex"].value_counts().to_dict() == {"M": 486, "F": 423}


def test_where_selects_a_stratum(tmp_path):
    write_nih(tmp_path, ROWS, {r[0] for r in ROWS})
    df, manifest = build_cohort(CohortConfig(source="nih", target="sex", where={"view": "PA"}), data_root=tmp_path)
    assert set(df["view"]) == {"PA"} and len(df) == 4
    assert any(s.step == "view in ['PA']" for s in manifest.flow)
    with pytest.raises(CohortError, match="cohort.where: 'bogus'"):
        build_cohort(CohortConfig(source="nih", target="sex", where={"bogus": 1}), data_root=tmp_path)

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydicom.uid import JPEGLSLossless

from readingrace.cohort.manifest import Manifest
from readingrace.cohort.schema import validate_cohort
from readingrace.cohort.sources.dicom_dir import age_from_dates, load, read_header, Skipped
from readingrace.cohort.sources.export import parse_dicom_age
from readingrace.errors import CohortError, ConfigError


def build(root, **options):
    m = Manifest(source="dicom_dir")
    return load(options, root, m), m


@pytest.mark.parametrize("value, years", [
    ("052Y", 52.0), ("006M", 0.5), ("010D", 10 / 365.25), ("002W", 14 / 365.25), ("52Y", 52.0), ("052y", 52.0),
    ("052", None), ("Y052", None), ("", None), (None, None), ("abc", None),
])
def test_patient_age_strings(value, years):
    got = parse_dicom_age(value)
    assert got == (None if years is None else pytest.approx(years))


def test_age_from_birth_and_study_dates():
    assert age_from_dates("19680315", "20200314") == 51.0   # day before the birthday
    assert age_from_dates("19680315", "20200315") == 52.0
    assert age_from_dates("19680315", None, "20200401") == 52.0  # falls back to the next date
    assert age_from_dates(None, "20200101") is None and age_from_dates("1968", "20200101") is None


def test_folder_cohort_with_skips(tmp_path, dicom_writer):
    d = tmp_path / "export"
    study = "1.2.3.4.100"
    dicom_writer(d / "a" / "img1.dcm", patient_id="P1", study_uid=study, age="052Y", sex="M", ethnic_group="WHITE")
    dicom_writer(d / "a" / "img2.dcm", patient_id="P1", study_uid=study, age=None, birth_date="19700601",
                 study_date="20200531", sex="M", ethnic_group="WHITE", view="LL")
    dicom_writer(d / "b" / "cr_mono1.dcm", patient_id="P2", modality="CR", photometric="MONOCHROME1", age="006M",
                 sex="F", ethnic_group="BLACK")
    dicom_writer(d / "b" / "old.dcm", patient_id="P3", age="130Y", sex="O", ethnic_group="Martian")
    dicom_writer(d / "c" / "nopix.dcm", patient_id="P4", with_pixels=False)
    dicom_writer(d / "c" / "nots.dcm", patient_id="P5", transfer_syntax=None)
    dicom_writer(d / "c" / "noid.dcm", patient_id=None)
    (d / "c" / "notes.txt").write_text("not an image")
    (d / ".hidden").write_text("ignored")
    df, m = build(tmp_path, folder="export")
    validate_cohort(df)
    assert sorted(df["patient_id"]) == ["P1", "P1", "P2", "P3"]
    by = df.set_index(df["path"].str.rsplit("/", n=1).str[-1])
    assert by.loc["img1.dcm", "age"] == 52.0 and by.loc["img2.dcm", "age"] == 49.0
    assert by.loc["cr_mono1.dcm", "age"] == 0.5 and np.isnan(by.loc["old.dcm", "age"])
    assert any("outside [0, 120]" in w for w in m.warnings)
    assert by.loc["cr_mono1.dcm", "photometric"] == "MONOCHROME1" and by.loc["cr_mono1.dcm", "modality"] == "CR"
    assert by.loc["img1.dcm", "race"] == "White" and by.loc["cr_mono1.dcm", "race"] == "Black"
    assert by.loc["old.dcm", "race"] is None and m.counts["race_unlisted_strings"] == {"Martian": 1}
    assert by.loc["img1.dcm", "sex"] == "M" and by.loc["old.dcm", "sex"] is None
    assert by.loc["img1.dcm", "study_id"] == study and by.loc["img2.dcm", "view"] == "LL"
    assert by.loc["img1.dcm", "image_id"] != by.loc["img2.dcm", "image_id"]
    reasons = {s.item: s.reason for s in m.skipped}
    assert reasons["c/nopix.dcm"] == "no pixel data"
    assert reasons["c/nots.dcm"].startswith("no transfer syntax")
    assert reasons["c/noid.dcm"] == "no PatientID"
    assert reasons["c/notes.txt"].startswith("not DICOM")
    assert ".hidden" not in reasons
    steps = {s.step: s for s in m.flow}
    assert steps["files found"].images_after == 8
    assert steps["readable DICOM image"].images_after == 4
    listing = [i for i in m.inputs if i["path"] == "export"][0]
    assert listing["files"] == 8 and len(listing["sha256_listing"]) == 64


def test_unsupported_transfer_syntax_names_the_plugins(tmp_path, dicom_writer):
    p = dicom_writer(tmp_path / "jls.dcm", transfer_syntax=JPEGLSLossless)
    try:
        read_header(p)
    except Skipped as exc:
        assert str(exc).startswith("unsupported transfer syntax: JPEG-LS Lossless") and "pylibjpeg" in str(exc)
    else:  # a JPEG-LS decoder is installed here: the file is accepted
        from pydicom.pixels import get_decoder

        assert get_decoder(JPEGLSLossless).is_available


def test_monochrome1_cr_decodes_inverted(tmp_path, dicom_writer):
    io = pytest.importorskip("readingrace.imaging.io")
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 60
    p1 = dicom_writer(tmp_path / "m1.dcm", photometric="MONOCHROME1", pixels=pixels)
    p2 = dicom_writer(tmp_path / "m2.dcm", photometric="MONOCHROME2", pixels=pixels)
    a, b = io.load_image(p1), io.load_image(p2)
    assert a.shape == (8, 8) and a[0, 0] > a[-1, -1]   # raw minimum is brightest in MONOCHROME1
    assert b[0, 0] < b[-1, -1]
    np.testing.assert_allclose(a, 1.0 - b, atol=1e-6)


def test_duplicates_conflicts_modalities_and_demographics(tmp_path, dicom_writer):
    d = tmp_path / "dcm"
    sop = "1.2.3.9.1"
    dicom_writer(d / "x1.dcm", patient_id="A", sop_uid=sop, ethnic_group="WHITE")
    dicom_writer(d / "x2_copy.dcm", patient_id="A", sop_uid=sop, ethnic_group="WHITE")
    dicom_writer(d / "y1.dcm", patient_id="B", ethnic_group="WHITE")
    dicom_writer(d / "y2.dcm", patient_id="B", ethnic_group="BLACK")   # conflict across images: excluded
    dicom_writer(d / "z1.dcm", patient_id="C", modality="CT", ethnic_group="ASIAN")
    df, m = build(tmp_path, folder="dcm", modalities=["cr"])
    assert df["patient_id"].tolist() == ["A"]
    steps = [s.step for s in m.flow]
    assert steps.index("EthnicGroup: race conflicting across records") < steps.index("one file per SOPInstanceUID")
    assert any(s.reason.startswith("duplicate SOPInstanceUID") for s in m.skipped)
    # race from a patient table instead of the header (NLST-style codes)
    pd.DataFrame({"pid": ["A", "B", "B", "C"], "race": [2, 1, 1, 3], "ethnic": [2, 2, 2, 1]}).to_csv(
        tmp_path / "participants.csv", index=False)
    demo = {"csv": "participants.csv", "columns": {"patient_id": "pid", "race": "race", "ethnicity": "ethnic"},
            "race_table": "nlst", "ethnicity_table": "nlst_ethnicity"}
    df2, m2 = build(tmp_path, folder="dcm", demographics=demo)
    assert df2.groupby("patient_id")["race"].first().to_dict() == {"A": "Black", "B": "White"}
    assert "race:nlst@1" in m2.mappings
    with pytest.raises(ConfigError, match="unknown key 'table'"):
        build(tmp_path, folder="dcm", demographics={**demo, "table": "x"})
    with pytest.raises(CohortError, match=r"participants.csv: missing column\(s\) \['PID'\]"):
        build(tmp_path, folder="dcm", demographics={**demo, "columns": {"patient_id": "PID", "race": "race"}})


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CohortError, match="DICOM folder not found"):
        build(tmp_path, folder="nowhere")

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from readingrace.cohort.manifest import Manifest
from readingrace.cohort.schema import validate_cohort
from readingrace.cohort.sources.mammo import load, parse_density
from readingrace.errors import CohortError, ConfigError


def write_exam(writer, folder, *, patient, study, accession, race="WHITE", with_raw=False):
    for lat in ("L", "R"):
        for view in ("CC", "MLO"):
            writer(folder / f"{patient}_{lat}_{view}.dcm", patient_id=patient, study_uid=study, modality="MG",
                   view=view, laterality=lat, sex="F", age="055Y", ethnic_group=race, AccessionNumber=accession,
                   PresentationIntentType="FOR PRESENTATION")
    if with_raw:
        writer(folder / f"{patient}_raw.dcm", patient_id=patient, study_uid=study, modality="MG", view="CC",
               laterality="L", AccessionNumber=accession, PresentationIntentType="FOR PROCESSING",
               ethnic_group=race)


def test_parse_density():
    m = Manifest()
    got = parse_density(pd.Series(["1", "2.0", 3, "d", "B", "5", "x", None]), m)
    assert got.tolist()[:5] == [1.0, 2.0, 3.0, 4.0, 2.0] and got.iloc[5:].isna().all()
    assert any("outside 1-4" in w and "'5'" in w for w in m.warnings)


def test_laterality_view_density_flip(tmp_path, dicom_writer):
    d = tmp_path / "mammo"
    write_exam(dicom_writer, d, patient="E1", study="5.1", accession="ACC1", with_raw=True)
    write_exam(dicom_writer, d, patient="E2", study="5.2", accession="ACC2", race="BLACK")
    dicom_writer(d / "ml.dcm", patient_id="E2", study_uid="5.2", modality="MG", view="ML", laterality=None,
                 ethnic_group="BLACK", AccessionNumber="ACC2")
    dicom_writer(d / "cr.dcm", patient_id="E3", modality="CR")
    pd.DataFrame({"acc_anon": ["ACC1", "ACC1", "ACC2", "ACC2"], "tissueden": [3, 3, 2, 4]}).to_csv(
        tmp_path / "clinical.csv", index=False)
    m = Manifest(source="mammo")
    opts = {"folder": "mammo", "flip_to": "left", "views": ["CC", "MLO"],
            "density": {"csv": "clinical.csv", "on": "accession",
                        "columns": {"accession": "acc_anon", "density": "tissueden"}}}
    df = load(opts, tmp_path, m)
    validate_cohort(df)
    assert len(df) == 8 and set(df["view"]) == {"CC", "MLO"} and set(df["laterality"]) == {"L", "R"}
    assert (df["flipped"] == (df["laterality"] == "R")).all() and m.counts["flipped"] == 4
    assert m.mappings["mammo_flip"]["R"].startswith("mirrored")
    dens = df.groupby("patient_id")["density"].first()
    assert dens["E1"] == 3.0 and np.isnan(dens["E2"])   # ACC2 rows disagree (2 vs 4): missing, warned
    assert any("different densities" in w for w in m.warnings)
    assert df.groupby("patient_id")["race"].first().to_dict() == {"E1": "White", "E2": "Black"}
    assert (df.groupby("patient_id")["study_id"].nunique() == 1).all()
    steps = {s.step: s for s in m.flow}
    assert steps["modality in ['MG']"].images_before - steps["modality in ['MG']"].images_after == 1
    raw = steps["for presentation (not FOR PROCESSING)"]
    assert raw.images_before - raw.images_after == 1
    v = steps["view in ['CC', 'MLO']"]
    assert v.images_before - v.images_after == 1 and "ML" in v.detail
    assert m.counts["images_without_laterality"] == 1


def test_no_flip_header_density_and_errors(tmp_path, dicom_writer):
    d = tmp_path / "mammo"
    dicom_writer(d / "a.dcm", patient_id="E1", modality="MG", view="CC", laterality="R", ImageComments="2")
    dicom_writer(d / "b.dcm", patient_id="E1", modality="MG", view="MLO", laterality="R", ImageComments="e")
    m = Manifest()
    df = load({"folder": "mammo", "density_tag": "ImageComments"}, tmp_path, m)
    assert not df["flipped"].any() and "mammo_flip" not in m.mappings
    assert df["density"].tolist()[0] == 2.0 and np.isnan(df["density"].tolist()[1])
    with pytest.raises(ConfigError, match="flip_to must be"):
        load({"folder": "mammo", "flip_to": "up"}, tmp_path, Manifest())
    with pytest.raises(CohortError, match="density table not found"):
        load({"folder": "mammo", "density": {"csv": "nope.csv"}}, tmp_path, Manifest())
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(CohortError, match=r"d.csv: missing column\(s\) \['study_id', 'density'\]"):
        load({"folder": "mammo", "density": {"csv": "d.csv"}}, tmp_path, Manifest())

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from readingrace.cohort.manifest import Manifest
from readingrace.cohort.schema import validate_cohort
from readingrace.cohort.sources.ct import (
    air_value,
    load,
    preprocess_ct_slice,
    read_hu,
    slice_deciles,
)
from readingrace.errors import ConfigError

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
CORONAL = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # normal = row x col = (0, 1, 0)


def ct_pixels(corner_raw: int = 24, size: int = 32) -> np.ndarray:
    """Raw values for RescaleIntercept -1024: raw 24 = HU -1000 (air); body 1064 = HU 40."""
    arr = np.full((size, size), corner_raw, dtype=np.int16)
    arr[8:-8, 8:-8] = 1064
    return arr


def write_series(writer, folder, *, series, study, patient, orientation, positions, bad=(), names=None, **kw):
    paths = []
    for i, pos in enumerate(positions):
        name = (names or [f"{series}_{i}.dcm" for i in range(len(positions))])[i]
        paths.append(writer(folder / name, patient_id=patient, study_uid=study, series_uid=series,
                            sop_uid=f"{series}.{i + 1}", modality="CT", view=None, rescale=(1.0, -1024.0),
                            pixels=ct_pixels(-1000 if i in bad else 24),
                            ImageOrientationPatient=orientation, ImagePositionPatient=list(pos),
                            InstanceNumber=len(positions) - i, ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], **kw))
    return paths


def test_preprocess_ct_slice_paper_rule():
    hu = np.full((32, 32), -1000.0, dtype=np.float32)   # air: HU + 1024 = 24
    hu[10:20, 10:20] = 40.0
    out = preprocess_ct_slice(hu)
    assert out is not None and out.dtype == np.float32 and out.shape == (32, 32)
    assert out[0, 0] == pytest.approx(24 / 3000) and out[15, 15] == pytest.approx(1064 / 3000)
    assert air_value(hu) == pytest.approx(24.0)
    for corner_hu, kept in ((-1054.0, True), (-994.0, True), (-1055.0, False), (-993.0, False), (-2048.0, False)):
        h = hu.copy()
        h[:16, :16] = np.maximum(h[:16, :16], corner_hu)   # the whole 16x16 top-left patch at or above it
        h[3, 3] = corner_hu                                # and one pixel at it: the patch minimum
        assert (preprocess_ct_slice(h) is not None) is kept, corner_hu
    h = hu.copy()
    h[-1, -1] = -2048.0       # outside the top-left patch: ignored by default, caught at bottom_right
    assert preprocess_ct_slice(h) is not None and preprocess_ct_slice(h, corner="bottom_right") is None
    assert preprocess_ct_slice(np.full((4, 4), 3000.0)) is None
    metal = hu.copy()
    metal[15, 15] = 4000.0
    assert preprocess_ct_slice(metal)[15, 15] == 1.0 and preprocess_ct_slice(metal, clip=False)[15, 15] > 1.0


def test_series_ordered_along_the_normal_and_air_check(tmp_path, dicom_writer):
    d = tmp_path / "nlst"
    # Axial series written in shuffled file order; slice at z=-60 has padding in its corner (dropped).
    zs = [-20.0, -100.0, -60.0, -140.0, 20.0]
    write_series(dicom_writer, d / "100004" / "s1", series="1.2.840.1", study="1.2.840.9", patient="100004",
                 orientation=AXIAL, positions=[(-150.0, -150.0, z) for z in zs], bad=(2,), age="062Y", sex="M")
    # Coronal series: z is constant, order must follow y (the slice normal)
    ys = [30.0, -10.0, 10.0]
    write_series(dicom_writer, d / "100005" / "s1", series="1.2.840.2", study="1.2.840.8", patient="100005",
                 orientation=CORONAL, positions=[(0.0, y, 50.0) for y in ys], age="058Y", sex="F")
    # A localizer in the first study: removed
    dicom_writer(d / "100004" / "scout.dcm", patient_id="100004", study_uid="1.2.840.9", series_uid="1.2.840.3",
                 modality="CT", view=None, pixels=ct_pixels(), rescale=(1.0, -1024.0),
                 ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    m = Manifest(source="ct")
    df = load({"folder": "nlst"}, tmp_path, m)
    validate_cohort(df)
    ax = df[df["series_id"] == "1.2.840.1"]
    assert ax["slice_position"].tolist() == [-140.0, -100.0, -20.0, 20.0]       # -60 dropped
    assert ax["slice_index"].tolist() == [0, 1, 3, 4] and (ax["n_slices"] == 5).all()
    assert (ax["study_id"] == "1.2.840.9").all() and (ax["slice_id"] == ax["image_id"]).all()
    assert ax["image_id"].tolist() == ["1.2.840.1.4", "1.2.840.1.2", "1.2.840.1.1", "1.2.840.1.5"]
    co = df[df["series_id"] == "1.2.840.2"]
    assert co["slice_position"].tolist() == [-10.0, 10.0, 30.0] and co["slice_index"].tolist() == [0, 1, 2]
    steps = {s.step: s for s in m.flow}
    assert steps["not a localizer (scout)"].images_before - steps["not a localizer (scout)"].images_after == 1
    air = next(s for s in m.flow if s.step.startswith("air check"))
    assert air.images_before - air.images_after == 1 and "16x16 top_left" in air.step
    assert m.counts["ct_slices_dropped_air_check"] == 1
    assert any(s.reason.startswith("air check: corner minimum -1000") for s in m.skipped)
    assert df["age"].tolist() == [62.0] * 4 + [58.0] * 3
    kept = df.iloc[0]
    assert preprocess_ct_slice(read_hu(kept["path"])) is not None and kept["air_value"] == pytest.approx(24.0)


def test_fallback_order_and_options(tmp_path, dicom_writer):
    d = tmp_path / "ct"
    for i, loc in enumerate([5.0, -5.0, 0.0]):
        dicom_writer(d / f"s{i}.dcm", patient_id="P", study_uid="9.1", series_uid="9.1.1", sop_uid=f"9.1.1.{i}",
                     modality="CT", view=None, pixels=ct_pixels(), rescale=(1.0, -1024.0), SliceLocation=loc)
    m = Manifest()
    df = load({"folder": "ct", "air_check": False}, tmp_path, m)
    assert df["slice_position"].tolist() == [-5.0, 0.0, 5.0]
    assert any("SliceLocation" in w for w in m.warnings) and any("air_check is off" in w for w in m.warnings)
    with pytest.raises(ConfigError, match="corner must be one of"):
        load({"folder": "ct", "corner": "middle"}, tmp_path, Manifest())
    with pytest.raises(ConfigError, match="unknown key 'windowing'"):
        load({"folder": "ct", "windowing": 1}, tmp_path, Manifest())


def test_one_series_per_study(tmp_path, dicom_writer):
    d = tmp_path / "ct"
    write_series(dicom_writer, d / "a", series="7.1", study="7.0", patient="P", orientation=AXIAL,
                 positions=[(0, 0, z) for z in (0.0, 1.0)])
    write_series(dicom_writer, d / "b", series="7.2", study="7.0", patient="P", orientation=AXIAL,
                 positions=[(0, 0, z) for z in (0.0, 1.0, 2.0)])
    m = Manifest()
    df = load({"folder": "ct", "series": "most_slices"}, tmp_path, m)
    assert set(df["series_id"]) == {"7.2"} and len(df) == 3
    assert pd.Series([s.step for s in m.flow]).str.contains("one series per study").any()


def test_slice_deciles_short_series_and_ties():
    assert slice_deciles(np.arange(20.0)).tolist() == [i // 2 for i in range(20)]
    assert slice_deciles(np.arange(12.0)).tolist() == [0, 0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9]
    assert slice_deciles(np.array([4.0, 5.0, 6.0])).tolist() == [0, 3, 6]
    assert slice_deciles(np.array([7.0])).tolist() == [0]
    assert slice_deciles(np.array([0.0, 1.0, 1.0, 2.0, 3.0])).tolist() == [0, 2, 2, 6, 8]   # tie: one decile
    assert slice_deciles(np.array([0.0, 1.0, 1.0, np.nan])).tolist() == [0, 2, 5, 7]        # no position: index


def test_slice_decile_column(tmp_path, dicom_writer):
    d = tmp_path / "ct"
    series = {  # series -> z positions (file order shuffled), slices failing the air check
        "5.1": (list(np.random.default_rng(0).permutation(20).astype(float)), ()),
        "5.2": ([30.0, 10.0, 20.0], ()),
        "5.3": ([0.0], ()),
        "5.4": ([3.0, 1.0, 0.0, 1.0, 2.0], ()),                 # two slices at z = 1
        "5.5": ([float(z) for z in range(10)], (4,)),           # slice at z = 4 dropped by the air check
    }
    for k, (uid, (zs, bad)) in enumerate(series.items()):
        write_series(dicom_writer, d / uid, series=uid, study=f"{uid}.0", patient=f"P{k}", orientation=AXIAL,
                     positions=[(0.0, 0.0, z) for z in zs], bad=bad)
    m = Manifest()
    df = load({"folder": "ct"}, tmp_path, m)
    validate_cohort(df)
    by = {uid: g.sort_values("slice_position") for uid, g in df.groupby("series_id")}
    assert by["5.1"]["slice_decile"].tolist() == [z // 2 for z in range(20)]
    assert by["5.1"]["slice_decile"].value_counts().to_dict() == {k: 2 for k in range(10)}
    assert by["5.2"]["slice_decile"].tolist() == [0, 3, 6]
    assert by["5.3"]["slice_decile"].tolist() == [0]
    assert by["5.4"]["slice_decile"].tolist() == [0, 2, 2, 6, 8]
    assert by["5.4"]["slice_index"].tolist() == [0, 1, 2, 3, 4]
    assert by["5.5"]["slice_position"].tolist() == [0.0, 1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    assert by["5.5"]["slice_decile"].tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9]   # deciles of the whole series
    assert df["slice_decile"].dtype.kind == "i"
    assert any("slices share a position" in w for w in m.warnings)

"""The synthetic cohort generator: files, determinism, anatomy, and that each planted signal is
exactly what it claims (found by the features that should find it, invisible to those that should not)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import ndimage, stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from readingrace.cohort import schema
from readingrace.cohort.manifest import Manifest
from readingrace.cohort.sources import get_loader
from readingrace.cohort.sources import synthetic as syn
from readingrace.errors import CohortError, ConfigError
from readingrace.split import split_patients

GROUPS = ("Asian", "Black", "White")
N_PATIENTS = 300
SIZE = 64


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cohorts() -> dict[str, tuple[pd.DataFrame, np.ndarray]]:
    """One cohort per signal, same seed (so they share anatomy, noise and groups), 64 px."""
    return {sig: syn.render_cohort(n_patients=N_PATIENTS, size=SIZE, signal=sig, marker_cell=(0, 0))
            for sig in syn.SIGNALS}


def to_float(im: np.ndarray) -> np.ndarray:
    return im.astype(np.float32) / 255


def thumbnails(x: np.ndarray, size: int = 32) -> np.ndarray:
    t = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], size=(size, size), mode="bilinear",
                                        antialias=True)
    return t[:, 0].numpy()


def heldout_auc(features: np.ndarray, table: pd.DataFrame) -> float:
    """Macro one-vs-rest AUC of a logistic regression on a held-out 40% of patients."""
    split = split_patients(table, target="race", ratios=(0.6, 0.4), seed=2021).to_numpy()
    train, test = split == "train", split == "val"
    y = table["race"].to_numpy()
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    with threadpool_limits(1):  # BLAS threads on busy shared cores slow this down ten-fold
        model.fit(features[train], y[train])
        p = model.predict_proba(features[test])
    return float(np.mean([roc_auc_score(y[test] == c, p[:, i]) for i, c in enumerate(model.classes_)]))


def power_spectrum(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred power spectra (N, n, n) and, per frequency, radius (cycles/width) and angle (deg, mod 180)."""
    n = x.shape[-1]
    x = x - x.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fftshift(np.fft.fft2(x), axes=(1, 2))) ** 2
    f = np.arange(n) - n // 2
    fy, fx = np.meshgrid(f, f, indexing="ij")
    return power, np.hypot(fx, fy), np.degrees(np.arctan2(fy, fx)) % 180


def sector_log_energy(x: np.ndarray, lo: float, hi: float, n_sectors: int = 12) -> np.ndarray:
    power, r, ang = power_spectrum(x)
    band = (r >= lo) & (r < hi)
    return np.log(np.stack([power[:, band & (ang // (180 / n_sectors) == k)].sum(1)
                            for k in range(n_sectors)], 1))


def oriented_fraction(x: np.ndarray, angle: float, lo: float = 22, hi: float = 32) -> np.ndarray:
    """Share of the band's power within 12 degrees of ``angle`` (or its mirror image)."""
    power, r, ang = power_spectrum(x)
    band = (r >= lo) & (r < hi)
    near = np.zeros_like(band)
    for a in (angle, 180 - angle):
        d = np.abs(ang - a)
        near |= np.minimum(d, 180 - d) < 12
    return power[:, band & near].sum(1) / power[:, band].sum(1)


# ---------------------------------------------------------------------------------------------
# files, table, determinism
# ---------------------------------------------------------------------------------------------
def test_generate_cohort_writes_pngs_table_and_sidecar(tmp_path: Path) -> None:
    out = tmp_path / "c"
    table = syn.generate_cohort(out, n_patients=12, size=SIZE, signal="marker", seed=5)
    assert list(table.columns) == ["image_id", "path", "patient_id", "study_id", "dataset", "race", "sex",
                                   "age", "view", "signal", "strength", "marker_y", "marker_x"]
    counts = table.groupby("patient_id").size()
    assert table["patient_id"].nunique() == 12 and counts.between(1, 3).all() and (counts > 1).any()
    assert table["image_id"].is_unique and table["study_id"].is_unique  # one study per image
    assert set(table["race"]) <= set(GROUPS) and set(table["sex"]) <= {"F", "M"}
    assert set(table["view"]) <= {"AP", "PA"} and table["age"].between(18, 110).all()
    assert (table["dataset"] == "synthetic").all() and (table["signal"] == "marker").all()
    assert table.groupby("patient_id")["race"].nunique().eq(1).all()
    _, arrays = syn.render_cohort(n_patients=12, size=SIZE, signal="marker", seed=5)
    for i, rel in enumerate(table["path"]):
        assert not Path(rel).is_absolute() and rel == f"images/{table['image_id'][i]}.png"
        with Image.open(out / rel) as img:
            assert img.mode == "L" and img.size == (SIZE, SIZE)
            np.testing.assert_array_equal(np.asarray(img), arrays[i])
    back = syn.read_table(out)
    pd.testing.assert_frame_equal(back, table, check_dtype=False)
    meta = json.loads((out / "generator.json").read_text())
    assert meta["options"]["signal"] == "marker" and meta["options"]["seed"] == 5
    assert meta["n_images"] == len(table) and meta["hash"] == syn.options_hash(
        {"n_patients": 12, "size": SIZE, "signal": "marker", "seed": 5})
    assert meta["truth"]["contrast"]["Asian"] == 0.0 and meta["truth"]["contrast"]["White"] == pytest.approx(0.9)
    with pytest.raises(ConfigError, match="already holds a cohort"):
        syn.generate_cohort(out, n_patients=2, size=SIZE)


def test_same_seed_gives_byte_identical_pngs(tmp_path: Path) -> None:
    kw = dict(n_patients=6, size=SIZE, signal="texture", appearance={"blur": 0.7})
    a = syn.generate_cohort(tmp_path / "a", seed=3, **kw)
    syn.generate_cohort(tmp_path / "b", seed=3, **kw)
    syn.generate_cohort(tmp_path / "c", seed=4, **kw)
    for rel in a["path"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    differ = [(tmp_path / "a" / r).read_bytes() != (tmp_path / "c" / r).read_bytes()
              for r in a["path"] if (tmp_path / "c" / r).exists()]
    assert differ and all(differ)
    _, many_threads = syn.render_cohort(n_patients=6, size=SIZE, signal="texture", seed=3)
    with threadpool_limits(1):
        _, one_thread = syn.render_cohort(n_patients=6, size=SIZE, signal="texture", seed=3)
    np.testing.assert_array_equal(many_threads, one_thread)


def test_value_range_and_anatomy(cohorts) -> None:
    table, im = cohorts["none"]
    assert im.dtype == np.uint8 and im.shape == (len(table), SIZE, SIZE)
    assert im.min() > 0 and im.max() < 255  # no saturation
    x = to_float(im)
    med = np.median(x, axis=0)
    row = int(SIZE * 0.4)  # upper chest, y = -0.2
    lung_l, lung_r, spine = med[row, int(SIZE * 0.35)], med[row, int(SIZE * 0.65)], med[row, SIZE // 2]
    corner, abdomen = med[2, 2], med[-3, SIZE // 2 - 8]
    assert lung_l < spine - 0.15 and lung_r < spine - 0.15  # dark lungs, bright spine
    assert corner < lung_l and corner < abdomen - 0.25  # background darkest, soft tissue bright
    heart = med[int(SIZE * 0.62), int(SIZE * 0.56)]
    assert heart > lung_r + 0.1


def test_images_of_one_patient_share_their_anatomy(cohorts) -> None:
    table, im = cohorts["none"]
    x = to_float(im).reshape(len(im), -1)
    x = x - x.mean(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    corr = x @ x.T
    pid = table["patient_id"].to_numpy()
    same = (pid[:, None] == pid[None, :]) & ~np.eye(len(pid), dtype=bool)
    other = pid[:, None] != pid[None, :]
    assert corr[same].mean() > 0.45 and abs(corr[other].mean()) < 0.05
    assert np.median(corr[same]) > np.quantile(corr[other], 0.9)
    assert corr[same].max() < 0.995  # follow-ups are not copies


def test_groups_are_balanced_and_independent_of_metadata() -> None:
    table, _ = syn.render_cohort(n_patients=N_PATIENTS, size=32, signal="none")
    patients = table.drop_duplicates("patient_id")
    assert patients["race"].value_counts().to_dict() == {g: 100 for g in GROUPS}
    weighted, _ = syn.render_cohort(n_patients=200, size=32, signal="none", group_weights=[5, 3, 2])
    assert weighted.drop_duplicates("patient_id")["race"].value_counts().to_dict() == \
        {"Asian": 100, "Black": 60, "White": 40}
    assert stats.chi2_contingency(pd.crosstab(patients["race"], patients["sex"]))[1] > 0.01
    assert stats.chi2_contingency(pd.crosstab(table["race"], table["view"]))[1] > 0.01  # view is per image
    assert stats.kruskal(*[g["age"] for _, g in patients.groupby("race")]).pvalue > 0.01


def test_attribute_can_be_sex_or_a_new_column() -> None:
    t_sex, _ = syn.render_cohort(n_patients=20, size=32, signal="none", attribute="sex", groups=["F", "M"])
    assert t_sex.drop_duplicates("patient_id")["sex"].value_counts().to_dict() == {"F": 10, "M": 10}
    assert set(t_sex["race"]) <= set(GROUPS)
    t_new, _ = syn.render_cohort(n_patients=20, size=32, signal="none", attribute="scanner", groups=["a", "b"])
    assert set(t_new["scanner"]) == {"a", "b"} and set(t_new["sex"]) == {"F", "M"}


# ---------------------------------------------------------------------------------------------
# the planted signals
# ---------------------------------------------------------------------------------------------
def test_signals_differ_from_the_null_only_by_the_planted_component(cohorts) -> None:
    table, null = cohorts["none"]
    group = table["race"].map({g: i for i, g in enumerate(GROUPS)}).to_numpy()
    for sig in ("texture", "lowfreq", "marker"):
        t, _ = cohorts[sig]
        pd.testing.assert_frame_equal(t[["image_id", "race", "sex", "age", "view"]],
                                      table[["image_id", "race", "sex", "age", "view"]])
    # marker: changes only inside its cell, never for the first group
    diff = cohorts["marker"][1].astype(int) - null.astype(int)
    r0, r1, c0, c1 = syn.cell_bounds(SIZE, (0, 0))
    outside = diff.copy()
    outside[:, r0:r1, c0:c1] = 0
    assert not outside.any()
    inside = np.abs(diff[:, r0:r1, c0:c1]).max(axis=(1, 2))
    assert (inside[group == 0] == 0).all() and (inside[group == 1] >= 30).all()
    assert np.median(inside[group == 2]) > np.median(inside[group == 1])
    t = cohorts["marker"][0]
    assert t["marker_y"].between(r0 / SIZE, r1 / SIZE).all() and t["marker_x"].between(c0 / SIZE, c1 / SIZE).all()
    # texture: zero mean, all its power in 25-31 cycles per width
    d = to_float(cohorts["texture"][1]) - to_float(null)
    assert np.abs(d.mean(axis=(1, 2))).max() < 0.002
    power, r, _ = power_spectrum(d)
    assert power[:, (r >= 22) & (r < 33)].sum() / power.sum() > 0.85
    band = power[:, (r >= 22) & (r < 33)].sum(1)
    per_group = [band[group == k].mean() for k in range(3)]
    assert max(per_group) / min(per_group) < 1.15  # equal power across groups
    # lowfreq: all its power at 1 cycle per width
    d = to_float(cohorts["lowfreq"][1]) - to_float(null)
    power, r, _ = power_spectrum(d)
    assert power[:, r <= 1].sum() / power.sum() > 0.9
    # strength 0 is the null cohort
    _, zero = syn.render_cohort(n_patients=20, size=SIZE, signal="texture", strength=0.0)
    _, none = syn.render_cohort(n_patients=20, size=SIZE, signal="none")
    np.testing.assert_array_equal(zero, none)


def test_null_cohort_carries_no_group_information(cohorts) -> None:
    table, im = cohorts["none"]
    x = to_float(im)
    thumb_auc = heldout_auc(thumbnails(x).reshape(len(x), -1), table)
    hf_auc = heldout_auc(sector_log_energy(x, 20, 32), table)
    assert abs(thumb_auc - 0.5) < 0.1, thumb_auc
    assert abs(hf_auc - 0.5) < 0.1, hf_auc


def test_texture_is_real_but_invisible_in_thumbnails(cohorts) -> None:
    table, im = cohorts["texture"]
    x = to_float(im)
    assert heldout_auc(thumbnails(x).reshape(len(x), -1), table) < 0.65
    for g, angle in zip(GROUPS, syn.texture_angles(3)):
        assert roc_auc_score(table["race"] == g, oriented_fraction(x, angle)) > 0.9, g
    # survives an anti-aliased resize to 64 px (from 128), destroyed by one to 32 px
    _, t128 = syn.render_cohort(n_patients=8, size=128, signal="texture")
    _, n128 = syn.render_cohort(n_patients=8, size=128, signal="none")
    d = to_float(t128) - to_float(n128)
    rms = lambda a: float(np.sqrt(np.mean(a ** 2)))  # noqa: E731
    assert rms(thumbnails(d, 64)) > 0.4 * rms(d)
    assert rms(thumbnails(d, 32)) < 0.1 * rms(d)


def test_lowfreq_is_seen_in_thumbnails_and_removed_by_high_pass(cohorts) -> None:
    table, im = cohorts["lowfreq"]
    x = to_float(im)
    assert heldout_auc(thumbnails(x).reshape(len(x), -1), table) > 0.8
    f = np.fft.fftfreq(SIZE) * SIZE
    keep = np.hypot(*np.meshgrid(f, f, indexing="ij")) >= 3
    high = np.real(np.fft.ifft2(np.fft.fft2(x) * keep)).astype(np.float32)
    assert heldout_auc(thumbnails(high).reshape(len(x), -1), table) < 0.65


def test_marker_is_found_in_its_cell_and_nowhere_else(cohorts) -> None:
    table, im = cohorts["marker"]
    x = to_float(im)
    tophat = ndimage.white_tophat(x, size=(1, 5, 5))  # local peak above its background
    pair = table["race"].isin(["Asian", "White"]).to_numpy()
    for r in range(3):
        for c in range(3):
            r0, r1, c0, c1 = syn.cell_bounds(SIZE, (r, c))
            feat = tophat[:, r0:r1, c0:c1].max(axis=(1, 2))
            auc = roc_auc_score(table["race"][pair] == "White", feat[pair])
            if (r, c) == (0, 0):
                assert auc > 0.95
            else:
                assert abs(auc - 0.5) < 0.12, (r, c, auc)


def test_appearance_changes_the_scanner_look() -> None:
    kw = dict(n_patients=20, size=SIZE, signal="none")
    _, base = syn.render_cohort(**kw)
    _, blurred = syn.render_cohort(**kw, appearance={"blur": 1.0})
    _, bright = syn.render_cohort(**kw, appearance={"gamma": 0.7})
    _, noisy = syn.render_cohort(**kw, appearance={"noise": 0.03})
    _, flat = syn.render_cohort(**kw, appearance={"contrast": 0.7})
    hf = lambda im: np.log(np.exp(sector_log_energy(to_float(im), 20, 32)).sum(1)).mean()  # noqa: E731
    assert hf(blurred) < hf(base) - 0.3 and hf(noisy) > hf(base) + 0.5
    assert to_float(bright).mean() > to_float(base).mean() + 0.05
    assert to_float(flat).std() < 0.8 * to_float(base).std()


@pytest.mark.parametrize("options, key", [
    ({"signal": "stripes"}, "signal"),
    ({"groups": ["A"]}, "groups"),
    ({"group_weights": [1, 2]}, "group_weights"),
    ({"marker_cell": [3, 0]}, "marker_cell"),
    ({"images_per_patient": [3, 1]}, "images_per_patient"),
    ({"size": 48, "signal": "texture"}, "size"),
    ({"appearance": {"sharpness": 1}}, "appearance"),
    ({"strength": -1}, "strength"),
    ({"attribute": "age"}, "attribute"),
    ({"attribute": "sex", "groups": ["Asian", "White"]}, "sex"),
    ({"n_patient": 3}, "n_patient"),
])
def test_bad_options_raise_config_error_naming_the_key(options: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        syn.render_cohort(**options)


# ---------------------------------------------------------------------------------------------
# the source entry point
# ---------------------------------------------------------------------------------------------
def test_load_generates_once_into_a_content_addressed_folder(tmp_path: Path) -> None:
    options = {"n_patients": 8, "size": 32, "signal": "marker", "images_per_patient": [2, 2]}
    assert get_loader("synthetic") is syn.load
    m1 = Manifest()
    t1 = syn.load(options, tmp_path, m1)
    folder = tmp_path / f"synthetic-{syn.options_hash(options)}"
    assert folder.is_dir() and [p.name for p in tmp_path.iterdir()] == [folder.name]
    assert list(t1.columns[:len(schema.REQUIRED_COLUMNS)]) == list(schema.REQUIRED_COLUMNS)
    schema.validate_cohort(t1, require=["race", "sex", "age", "view"])
    assert len(t1) == 16 and all(Path(p).is_absolute() and Path(p).is_file() for p in t1["path"])
    assert m1.counts["generator"]["reused"] is False and m1.counts["generator"]["signal"] == "marker"
    assert {i["path"] for i in m1.inputs} == {"generator.json", "cohort.csv"}
    assert m1.flow[-1].images_after == 16 and m1.flow[-1].patients_after == 8
    stamp = os.stat(t1["path"][0]).st_mtime_ns
    m2 = Manifest()
    t2 = syn.load({**options, "seed": 2021, "strength": 1.0}, tmp_path, m2)  # defaults spelled out
    pd.testing.assert_frame_equal(t1, t2)
    assert m2.counts["generator"]["reused"] is True and os.stat(t2["path"][0]).st_mtime_ns == stamp
    syn.load({**options, "seed": 1}, tmp_path, Manifest())
    assert len(list(tmp_path.glob("synthetic-*"))) == 2


def test_interrupted_generation_never_looks_complete(tmp_path: Path, monkeypatch) -> None:
    options = {"n_patients": 40, "size": 32, "signal": "none"}
    real = syn._iter_images

    def dies_midway(opts, d):
        for i, chunk in enumerate(real(opts, d)):
            if i == 2:
                raise KeyboardInterrupt
            yield chunk

    monkeypatch.setattr(syn, "_iter_images", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        syn.load(options, tmp_path, Manifest())
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(syn, "_iter_images", real)
    assert len(syn.load(options, tmp_path, Manifest())) > 40


def test_load_refuses_an_incomplete_folder(tmp_path: Path) -> None:
    options = {"n_patients": 4, "size": 32, "signal": "none"}
    table = syn.load(options, tmp_path, Manifest())
    Path(table["path"][0]).unlink()
    with pytest.raises(CohortError, match="1 image files missing.*delete the folder"):
        syn.load(options, tmp_path, Manifest())
    with pytest.raises(ConfigError, match="unknown option"):
        syn.load({"source": "synthetic"}, tmp_path, Manifest())

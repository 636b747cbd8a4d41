"""The generic CSV manifest source."""

import numpy as np
import pytest
from PIL import Image

from readingrace.cohort.build import build_cohort
from readingrace.config import CohortConfig
from readingrace.errors import CohortError, ConfigError


def make(tmp_path, rows, header="path,patient_id,race,sex"):
    (tmp_path / "img").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for r in rows:
        p = tmp_path / "img" / r.split(",")[0].split("/")[-1]
        if not p.name.startswith("missing"):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(p)
    (tmp_path / "cohort.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return CohortConfig(source="csv", options={"csv": "cohort.csv"}, target="race", min_prevalence=0)


def test_race_rules_and_skips(tmp_path):
    rows = ["img/a.png,1,White,F", "img/b.png,2,Black or African American,M",
            "img/c.png,3,\"White, non-Hispanic\",F", "img/d.png,4,Hispanic or Latino,M",
            "img/e.png,5,White,F", "img/f.png,5,Black,F",          # conflicting race: patient 5 excluded
            "img/missing.png,6,White,F", "../outside.png,7,White,M", "img/g.png,8,Asian,F"]
    df, manifest = build_cohort(make(tmp_path, rows), data_root=tmp_path)
    assert dict(zip(df["patient_id"], df["race"])) == {"1": "White", "2": "Black", "3": "White", "8": "Asian"}
    reasons = " ".join(s.reason for s in manifest.skipped)
    assert "missing file: row 8" in reasons and "escapes the image root: row 9" in reasons
    steps = {s.step for s in manifest.flow}
    assert any("conflicting" in s for s in steps) and any("Hispanic" in s for s in steps)


def test_missing_column_and_duplicates(tmp_path):
    with pytest.raises(CohortError, match="'patient_id' is missing"):
        build_cohort(make(tmp_path, ["img/a.png,White"], header="path,race"), data_root=tmp_path)
    with pytest.raises(CohortError, match="row 3: image id 'img/a.png' appears 2 times"):
        build_cohort(make(tmp_path, ["img/a.png,1,White,F", "img/a.png,1,White,F"]), data_root=tmp_path)


def test_column_mapping(tmp_path):
    cfg = make(tmp_path, ["img/a.png,1,White,F", "img/b.png,2,Black,M"], header="File,MRN,Race,Sex")
    cfg.options["columns"] = {"path": "File", "patient_id": "MRN", "race": "Race", "sex": "Sex"}
    df, _ = build_cohort(cfg, data_root=tmp_path)
    assert sorted(df["race"]) == ["Black", "White"]
    cfg.options["columns"] = {"path": "File", "mrn": "MRN"}
    with pytest.raises(ConfigError, match="'mrn' is not a cohort column"):
        build_cohort(cfg, data_root=tmp_path)


def test_sex_spellings_become_f_and_m_and_odd_values_are_reported(tmp_path):
    rows = ["img/a.png,1,White,female", "img/b.png,2,Black,Male", "img/c.png,3,White,f", "img/d.png,4,Asian,M ",
            "img/e.png,5,White,unknown", "img/g.png,6,White,woman"]
    cfg = make(tmp_path, rows)
    cfg.target = "sex"
    df, manifest = build_cohort(cfg, data_root=tmp_path)
    assert dict(zip(df["patient_id"], df["sex"])) == {"1": "F", "2": "M", "3": "F", "4": "M"}
    assert any("'woman'" in w or "woman" in w for w in manifest.warnings)


def test_a_target_column_the_csv_lacks_is_named(tmp_path):
    cfg = make(tmp_path, ["img/a.png,1,White", "img/b.png,2,Black"], header="path,patient_id,race")
    cfg.target = "sex"
    with pytest.raises(CohortError, match="no image has a 'sex' value: the source has no 'sex' column"):
        build_cohort(cfg, data_root=tmp_path)


def test_a_symlinked_image_folder_inside_the_root_is_followed_and_dotdot_refused(tmp_path):
    """Paths are checked as written (normalised), not after resolving symlinks: images/ may link elsewhere."""
    elsewhere = tmp_path / "store"
    elsewhere.mkdir()
    cfg = make(elsewhere, ["img/a.png,1,White,F", "img/b.png,2,Black,M"])  # the real files
    root = tmp_path / "root"
    root.mkdir()
    (root / "images").symlink_to(elsewhere / "img", target_is_directory=True)
    (root / "cohort.csv").write_text("path,patient_id,race,sex\nimages/a.png,1,White,F\nimages/b.png,2,Black,M\n"
                                     "images/../../store/img/a.png,3,White,F\n")
    df, manifest = build_cohort(cfg, data_root=root)
    assert sorted(df["patient_id"]) == ["1", "2"]
    assert sorted(df["path"]) == [str(root / "images" / "a.png"), str(root / "images" / "b.png")]
    assert [s.reason for s in manifest.skipped] == ["path escapes the image root: row 4 of cohort.csv"]
    step = next(s for s in manifest.flow if s.step == "image file present")
    assert step.detail == "1 rows skipped: path escapes the image root (1)"


def test_a_csv_with_no_image_left_says_why_by_reason(tmp_path):
    cfg = make(tmp_path, ["../x/a.png,1,White,F", "../x/b.png,2,Black,M", "img/missing.png,3,White,F"])
    cfg.target = "sex"
    with pytest.raises(CohortError, match=r"cohort.csv: no image left: 3 rows skipped: path escapes the image root "
                                          r"\(2\), missing file \(1\); paths are read relative to the image root"):
        build_cohort(cfg, data_root=tmp_path)

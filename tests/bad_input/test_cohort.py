"""Bad cohort inputs through ``readingrace cohort`` (in-process): CSV manifests and source options.

Each case either fails with exit status 2 and one line naming the file / row / key and the fix, or
succeeds with the problem recorded in ``manifest.json`` (a skip, a flow step or a warning).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from .conftest import assert_user_error, cohort_rows, csv_config, make_dataset


def cohort(cli: Any, tmp_path: Path, rows: list[dict[str, Any]] | None = None, *, config: dict | None = None,
           images: bool = True, extra: tuple[str, ...] = ()) -> tuple[Any, Path]:
    ds = make_dataset(tmp_path, rows, config=config, images=images)
    out = tmp_path / "out"
    return cli("cohort", ds.config, "--data-root", ds.root, "--out", out, *extra), out


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text())


def test_good_cohort_baseline(cli, tmp_path: Path) -> None:
    res, out = cohort(cli, tmp_path)
    assert res.code == 0, res.err
    assert len(pd.read_csv(out / "cohort.csv")) == 12
    assert manifest(out)["skipped"] == [] and manifest(out)["warnings"] == []


def test_missing_required_column(cli, tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "patient_id"} for r in cohort_rows()]
    res, _ = cohort(cli, tmp_path, rows)
    assert_user_error(res, "cohort.csv", "required column 'patient_id' is missing", "cohort.options.columns")


def test_column_mapping_names_absent_column(cli, tmp_path: Path) -> None:
    cfg = csv_config()
    cfg["cohort"]["options"]["columns"] = {"patient_id": "MRN"}
    res, _ = cohort(cli, tmp_path, config=cfg)
    assert_user_error(res, "cohort.csv", "column 'MRN'", "cohort.options.columns")


def test_column_mapping_to_unknown_cohort_column(cli, tmp_path: Path) -> None:
    cfg = csv_config()
    cfg["cohort"]["options"]["columns"] = {"ethnicity_code": "race"}
    res, _ = cohort(cli, tmp_path, config=cfg)
    assert_user_error(res, "cohort.options.columns", "'ethnicity_code' is not a cohort column")


def test_empty_patient_id_cell(cli, tmp_path: Path) -> None:
    rows = cohort_rows()
    rows[4]["patient_id"] = ""
    res, _ = cohort(cli, tmp_path, rows)
    assert_user_error(res, "cohort.csv row 6", "empty path or patient_id")


def test_duplicate_image_ids(cli, tmp_path: Path) -> None:
    rows = cohort_rows()
    rows[3]["path"] = rows[2]["path"]
    res, _ = cohort(cli, tmp_path, rows)
    assert_user_error(res, "cohort.csv row 5", "appears 2 times", "listed once")


def test_path_escaping_the_data_root_is_skipped(cli, tmp_path: Path) -> None:
    rows = cohort_rows()
    rows[3]["path"] = "../secret.png"
    (tmp_path / "secret.png").write_bytes(b"outside")  # exists, but outside the root: never read
    res, out = cohort(cli, tmp_path, rows)
    assert res.code == 0, res.err
    assert manifest(out)["skipped"] == [
        {"item": "../secret.png", "reason": "path escapes the image root: row 5 of cohort.csv", "stage": "cohort"}]
    assert len(pd.read_csv(out / "cohort.csv")) == 11


def test_absolute_path_outside_the_root_is_skipped(cli, tmp_path: Path) -> None:
    rows = cohort_rows()
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(b"x")
    rows[0]["path"] = str(outside)
    res, out = cohort(cli, tmp_path, rows)
    assert res.code == 0, res.err
    assert manifest(out)["skipped"][0]["reason"] == "path escapes the image root: row 2 of cohort.csv"


def test_path_that_does_not_exist_is_skipped(cli, tmp_path: Path) -> None:
    rows = cohort_rows()
    ds = make_dataset(tmp_path, rows)
    (ds.root / rows[6]["path"]).unlink()
    res = cli("cohort", ds.config, "--data-root", ds.root, "--out", tmp_path / "out")
    assert res.code == 0, res.err
    m = manifest(tmp_path / "out")
    assert m["skipped"] == [{"item": rows[6]["path"], "reason": "missing file: row 8 of cohort.csv", "stage": "cohort"}]
    step = next(s for s in m["flow"] if s["step"] == "image file present")
    assert (step["images_before"], step["images_after"]) == (12, 11)


def test_csv_manifest_not_found(cli, tmp_path: Path) -> None:
    cfg = csv_config()
    cfg["cohort"]["options"]["csv"] = "nope.csv"
    res, _ = cohort(cli, tmp_path, config=cfg)
    assert_user_error(res, "CSV manifest not found", "nope.csv")


def test_csv_that_is_not_a_csv(cli, tmp_path: Path) -> None:
    ds = make_dataset(tmp_path)
    ds.csv.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 20)
    res = cli("cohort", ds.config, "--data-root", ds.root, "--out", tmp_path / "out")
    assert_user_error(res, "cohort.csv")


def test_patient_with_conflicting_race_is_excluded(cli, tmp_path: Path) -> None:
    rows = cohort_rows() + [{**cohort_rows()[0], "path": "img/extra.png", "race": "Black"}]
    res, out = cohort(cli, tmp_path, rows)
    assert res.code == 0, res.err
    step = next(s for s in manifest(out)["flow"] if s["step"] == "race conflicting across records")
    assert (step["patients_before"], step["patients_after"]) == (12, 11)
    assert "P000" not in set(pd.read_csv(out / "cohort.csv")["patient_id"])


def test_patient_with_conflicting_sex_is_warned(cli, tmp_path: Path) -> None:
    rows = cohort_rows() + [{**cohort_rows()[0], "path": "img/extra.png", "sex": "M"}]
    res, out = cohort(cli, tmp_path, rows)
    assert res.code == 0, res.err
    warnings = manifest(out)["warnings"]
    assert len(warnings) == 1
    assert "1 patient(s) have more than one sex" in warnings[0] and "source rows [2, 14]" in warnings[0]
    assert "P000" not in warnings[0]  # rows, not patient identifiers


def test_conflicting_sex_excluded_when_sex_is_the_target(cli, tmp_path: Path) -> None:
    rows = cohort_rows() + [{**cohort_rows()[0], "path": "img/extra.png", "sex": "M"}]
    res, out = cohort(cli, tmp_path, rows, config=csv_config(target="sex"))
    assert res.code == 0, res.err
    step = next(s for s in manifest(out)["flow"] if s["step"] == "patients with one sex")
    assert (step["patients_before"], step["patients_after"]) == (12, 11)


@pytest.mark.parametrize(("raw", "expected", "warned"), [
    ("090Y", 90.0, False), ("006M", 0.5, False), ("", None, False),
    ("-1", None, True), ("200", None, True), ("fifty", None, True),
])
def test_age_values(cli, tmp_path: Path, raw: str, expected: float | None, warned: bool) -> None:
    rows = cohort_rows()
    rows[2]["age"] = raw
    res, out = cohort(cli, tmp_path, rows)
    assert res.code == 0, res.err
    table = pd.read_csv(out / "cohort.csv")
    got = table.loc[table["patient_id"] == "P002", "age"].iloc[0]
    assert (pd.isna(got) if expected is None else got == expected)
    warnings = manifest(out)["warnings"]
    if warned:
        assert warnings == [f"cohort.csv column 'age': 1 value(s) unreadable or outside [0, 120] set to missing "
                            f"(row 4: {raw!r}); write numbers such as 52 or 052Y"]
    else:
        assert warnings == []


def test_wrong_type_in_bmi_column(cli, tmp_path: Path) -> None:
    rows = [{**r, "bmi": "24.5"} for r in cohort_rows()]
    rows[1]["bmi"] = "heavy"
    res, out = cohort(cli, tmp_path, rows)
    assert res.code == 0, res.err
    assert "cohort.csv column 'bmi'" in manifest(out)["warnings"][0] and "row 3: 'heavy'" in manifest(out)["warnings"][0]
    assert pd.read_csv(out / "cohort.csv")["bmi"].isna().sum() == 1


def test_target_with_one_class(cli, tmp_path: Path) -> None:
    rows = [{**r, "race": "White"} for r in cohort_rows()]
    res, _ = cohort(cli, tmp_path, rows)
    assert_user_error(res, "target 'race' has 1 class(es)", "['White']", "at least two")


def test_target_not_a_column(cli, tmp_path: Path) -> None:
    res, _ = cohort(cli, tmp_path, config=csv_config(target="density"))
    assert_user_error(res, "target 'density' is not a cohort column")


def test_unknown_source(cli, tmp_path: Path) -> None:
    cfg = csv_config()
    cfg["cohort"]["source"] = "pacs"
    res, _ = cohort(cli, tmp_path, config=cfg)
    assert_user_error(res, "unknown cohort source 'pacs'", "known sources")


def test_unknown_source_option(cli, tmp_path: Path) -> None:
    cfg = csv_config()
    cfg["cohort"]["options"]["csv_file"] = "cohort.csv"
    res, _ = cohort(cli, tmp_path, config=cfg)
    assert_user_error(res, "cohort.options: unknown key 'csv_file'", "allowed")


def test_unknown_race_table(cli, tmp_path: Path) -> None:
    cfg = csv_config()
    cfg["cohort"]["options"]["race_table"] = "nonexistent"
    res, _ = cohort(cli, tmp_path, config=cfg)
    assert_user_error(res, "nonexistent")


def test_unknown_race_strings_are_reported(cli, tmp_path: Path) -> None:
    rows = cohort_rows()
    rows[0]["race"] = "Martian"
    res, out = cohort(cli, tmp_path, rows)
    assert res.code == 0, res.err
    text = json.dumps(manifest(out))
    assert "Martian" in text
    assert "P000" not in set(pd.read_csv(out / "cohort.csv").dropna(subset=["race"])["patient_id"])

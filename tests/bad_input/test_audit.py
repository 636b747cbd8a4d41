"""Bad input to the audit commands (subgroups, external, disease, lungs, suite): exit 2, one clear line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .conftest import assert_user_error, csv_config, make_dataset, write_config


def predictions_file(tmp_path: Path) -> Path:
    """A disease-model predictions CSV with one finding (Effusion) and one group column (sex)."""
    rng = np.random.default_rng(0)
    n = 40
    df = pd.DataFrame({"image_id": [f"i{k}" for k in range(n)], "patient_id": [f"P{k}" for k in range(n)],
                       "study_id": [f"S{k}" for k in range(n)],
                       "split": "test", "sex": np.where(np.arange(n) % 2, "F", "M"),
                       "label_Effusion": rng.integers(0, 2, n), "prob_Effusion": rng.random(n)})
    path = tmp_path / "pred.csv"
    df.to_csv(path, index=False)
    return path


def test_subgroups_unknown_finding(cli, tmp_path: Path) -> None:
    pred = predictions_file(tmp_path)
    assert_user_error(cli("subgroups", pred, "--finding", "Mass", "--group", "sex", "--threshold", "0.5"),
                      "pred.csv", "finding 'Mass' needs columns 'label_Mass'", "'prob_Mass'",
                      "Findings with both columns", "Effusion")


def test_subgroups_unknown_group(cli, tmp_path: Path) -> None:
    pred = predictions_file(tmp_path)
    assert_user_error(cli("subgroups", pred, "--group", "race", "--threshold", "0.5"),
                      "pred.csv", "group column 'race' not found", "['sex']")


def test_subgroups_threshold_out_of_range(cli, tmp_path: Path) -> None:
    pred = predictions_file(tmp_path)
    assert_user_error(cli("subgroups", pred, "--group", "sex", "--threshold", "1.5"),
                      "threshold must be a probability in [0, 1], got 1.5")


def test_subgroups_needs_exactly_one_threshold_source(cli, tmp_path: Path) -> None:
    pred = predictions_file(tmp_path)
    assert_user_error(cli("subgroups", pred, "--group", "sex"), "--threshold", "--val-predictions",
                      "not both and not neither")
    assert_user_error(cli("subgroups", pred, "--group", "sex", "--threshold", "0.5", "--val-predictions", pred),
                      "not both and not neither")


def test_external_run_that_is_not_a_run_folder(cli, tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    assert_user_error(cli("external", "--run", f"a={missing}", "-o", tmp_path / "out"),
                      "nonexistent does not exist", "readingrace run")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    (tmp_path / "notes").mkdir()
    assert_user_error(cli("external", "--run", f"a={tmp_path / 'notes'}", "-o", tmp_path / "out"),
                      "is not a run folder (no config.yaml)", "readingrace run")


def test_external_unknown_mode(cli, tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    assert_user_error(cli("external", "--run", f"a={missing}", "--mode", "squash", "-o", tmp_path / "out"),
                      "input mode 'squash'", "stretch", "pad")


def test_disease_unknown_label_set(cli, tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "d")
    cfg = write_config(tmp_path / "d.yaml", csv_config(disease={"labels": "foo"}))
    assert_user_error(cli("disease", cfg, "--data-root", ds.root, "-o", tmp_path / "out"),
                      "d.yaml", "disease.labels must be 'nih', 'chexpert' or a list of finding columns", "'foo'")


def test_lungs_unknown_missing_policy(cli, tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "d")
    cfg = write_config(tmp_path / "l.yaml", csv_config(evaluate={"n_bootstrap": 20, "reference": False,
                                                                 "lungs": {"missing": "maybe"}}))
    assert_user_error(cli("run", cfg, "--data-root", ds.root, "-o", tmp_path / "out"),
                      "l.yaml", "evaluate.lungs.missing must be 'unet' or 'exclude'", "'maybe'")


def test_suite_unknown_dataset_name(cli, tmp_path: Path) -> None:
    msg = assert_user_error(cli("suite", "paper", "--data", f"lungz={tmp_path}", "--dry-run", "-o", tmp_path / "s"),
                            "--data 'lungz=", "unknown dataset 'lungz'", "known:")
    assert "lungs" in msg and "nih" in msg

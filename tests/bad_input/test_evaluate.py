"""Bad predictions files through ``readingrace evaluate``: exit status 2, the file and line named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .conftest import assert_user_error


def predictions(n: int = 30) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1, 1], size=n)
    return pd.DataFrame({"image_id": [f"i{k}" for k in range(n)], "patient_id": [f"p{k // 2}" for k in range(n)],
                         "label": [("Asian", "Black", "White")[k % 3] for k in range(n)],
                         "prob_Asian": p[:, 0], "prob_Black": p[:, 1], "prob_White": p[:, 2]})


def evaluate(cli, tmp_path: Path, df: pd.DataFrame | None, *extra: object, text: str | None = None):
    path = tmp_path / "pred.csv"
    if text is not None:
        path.write_text(text)
    elif df is not None:
        df.to_csv(path, index=False)
    return cli("evaluate", path, "--out", tmp_path / "ev", "--n-bootstrap", 20, *extra), path


def test_good_predictions_baseline(cli, tmp_path: Path) -> None:
    res, _ = evaluate(cli, tmp_path, predictions())
    assert res.code == 0, res.err
    assert (tmp_path / "ev" / "metrics.json").exists()


def test_predictions_file_missing(cli, tmp_path: Path) -> None:
    res, path = evaluate(cli, tmp_path, None)
    assert_user_error(res, str(path), "no such predictions file")


def test_predictions_file_empty(cli, tmp_path: Path) -> None:
    res, path = evaluate(cli, tmp_path, None, text="")
    assert_user_error(res, str(path), "empty")


def test_predictions_missing_column(cli, tmp_path: Path) -> None:
    res, path = evaluate(cli, tmp_path, predictions().drop(columns="patient_id"))
    assert_user_error(res, str(path), "patient_id")


def test_probability_not_a_number(cli, tmp_path: Path) -> None:
    df = predictions().astype({"prob_Black": object})
    df.loc[4, "prob_Black"] = "high"
    res, path = evaluate(cli, tmp_path, df)
    assert_user_error(res, str(path), "line 6", "prob_Black")


def test_metrics_already_exist(cli, tmp_path: Path) -> None:
    assert evaluate(cli, tmp_path, predictions())[0].code == 0
    res, _ = evaluate(cli, tmp_path, predictions())
    assert_user_error(res, "metrics.json already exists", "--overwrite")

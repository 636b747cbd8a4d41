"""Evaluating predictions files: readingrace.evaluate.evaluate_file."""

from __future__ import annotations

import gzip
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from readingrace.errors import CohortError, RunError
from readingrace.evaluate import evaluate_file, read_predictions
from readingrace.stats.metrics import evaluate_predictions, read_metrics


def _table(rng: np.random.Generator, n_pat: int = 60) -> pd.DataFrame:
    k = rng.integers(1, 4, n_pat)
    patient = np.repeat(np.arange(n_pat), k)
    y = rng.integers(0, 2, n_pat)[patient]
    p_m = 1 / (1 + np.exp(-(rng.normal(size=patient.size) + 1.5 * (2 * y - 1))))
    return pd.DataFrame({
        "image_id": [f"{i:08d}_000.png" for i in range(patient.size)],
        "patient_id": [f"{j:05d}" for j in patient],  # leading zeros must survive
        "study_id": [f"{j:05d}-s" for j in patient],
        "label": np.where(y == 1, "M", "F"),
        "prob_F": 1 - p_m,
        "prob_M": p_m,
        "view": rng.choice(["AP", "PA"], patient.size),
    })


def _strict_json(path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_evaluate_file_writes_metrics_equal_to_in_memory(tmp_path):
    df = _table(np.random.default_rng(0))
    csv = tmp_path / "predictions.csv"
    df.to_csv(csv, index=False)
    out = tmp_path / "eval"
    m = evaluate_file(csv, out_dir=out, n_bootstrap=100, strata=["view"], study_level=True)
    on_disk = _strict_json(out / "metrics.json")
    assert on_disk["per_class"]["M"]["auc"] == pytest.approx(roc_auc_score(df["label"] == "M", df["prob_M"]))
    assert on_disk["n_patients"] == df["patient_id"].nunique() == m["n_patients"]
    assert set(on_disk["strata"]["view"]) == {"AP", "PA"} and on_disk["study"]["level"] == "study"
    assert on_disk["inputs"]["predictions"]["file"] == "predictions.csv"
    assert len(on_disk["inputs"]["predictions"]["sha256"]) == 64
    in_memory = evaluate_predictions(df, n_bootstrap=100)
    assert on_disk["per_class"]["F"]["auc_ci"] == pytest.approx(in_memory["per_class"]["F"]["auc_ci"])
    assert read_metrics(out / "metrics.json")["schema"] == "readingrace.metrics/1"


def test_run_folder_gzip_and_leading_zero_ids(tmp_path):
    df = _table(np.random.default_rng(1))
    run = tmp_path / "run"
    run.mkdir()
    df.to_csv(run / "predictions.csv", index=False)
    prep = read_predictions(run)
    assert prep.frame["patient_id"].iloc[0] == "00000" and prep.classes == ("F", "M")
    gz = tmp_path / "p.csv.gz"
    with gzip.open(gz, "wt") as fh:
        df.to_csv(fh, index=False)
    a = evaluate_file(run, out_dir=tmp_path / "a", n_bootstrap=50)
    b = evaluate_file(gz, out_dir=tmp_path / "b", n_bootstrap=50)
    assert a["per_class"]["M"]["auc_ci"] == b["per_class"]["M"]["auc_ci"]
    with pytest.raises(CohortError, match="must contain predictions.csv"):
        evaluate_file(tmp_path / "b", out_dir=tmp_path / "c")
    with pytest.raises(CohortError, match="no such predictions file"):
        evaluate_file(tmp_path / "absent.csv", out_dir=tmp_path / "c")


def test_refuses_to_overwrite_unless_asked(tmp_path):
    df = _table(np.random.default_rng(2))
    csv = tmp_path / "p.csv"
    df.to_csv(csv, index=False)
    evaluate_file(csv, out_dir=tmp_path / "o", n_bootstrap=20)
    before = (tmp_path / "o" / "metrics.json").read_text()
    with pytest.raises(RunError, match="metrics.json already exists"):
        evaluate_file(csv, out_dir=tmp_path / "o", n_bootstrap=30)
    assert (tmp_path / "o" / "metrics.json").read_text() == before
    m = evaluate_file(csv, out_dir=tmp_path / "o", n_bootstrap=30, overwrite=True)
    assert _strict_json(tmp_path / "o" / "metrics.json")["ci"]["n_bootstrap"] == 30 == m["ci"]["n_bootstrap"]


@pytest.mark.parametrize(
    ("cell", "value", "pattern"),
    [
        ("prob_M", "1.7", r"bad\.csv, line 4 \(image_id '00000002_000.png'\), column 'prob_M'.*outside"),
        ("prob_F", "", r"bad\.csv, line 4 .*'prob_F'.*missing \(NaN\)"),
        ("prob_F", "high", r"line 4 .*'prob_F'.*'high' is not a number"),
        ("label", "X", r"line 4 .*column 'label'.*'X' is not among the classes \['F', 'M'\]"),
        ("image_id", "00000000_000.png", r"duplicate image_id '00000000_000.png' at line 2 and line 4"),
    ],
)
def test_bad_file_errors_name_file_line_and_column(tmp_path, cell, value, pattern):
    df = _table(np.random.default_rng(3)).astype(object)
    df.loc[2, cell] = value
    csv = tmp_path / "bad.csv"
    df.to_csv(csv, index=False)
    with pytest.raises(CohortError, match=pattern):
        evaluate_file(csv, out_dir=tmp_path / "o")
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_missing_columns_and_empty_file(tmp_path):
    csv = tmp_path / "p.csv"
    _table(np.random.default_rng(4)).drop(columns=["label"]).to_csv(csv, index=False)
    with pytest.raises(CohortError, match=r"p\.csv: missing column\(s\) label"):
        evaluate_file(csv, out_dir=tmp_path / "o")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(CohortError, match="empty"):
        evaluate_file(empty, out_dir=tmp_path / "o")


def test_paper_form_file_with_codes(tmp_path):
    rng = np.random.default_rng(5)
    n = 150
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 1.5
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    df = pd.DataFrame({"index": np.arange(n), "asian_pred": p[:, 0], "black_pred": p[:, 1],
                       "white_pred": p[:, 2], "race_ground_truth": y})
    csv = tmp_path / "paper.csv"
    df.to_csv(csv, index=False)
    with pytest.warns(UserWarning, match="ignores patient clustering"):
        m = evaluate_file(csv, out_dir=tmp_path / "o", n_bootstrap=50)
    assert m["classes"] == ["Asian", "Black", "White"] and m["n_patients"] == n
    assert m["per_class"]["White"]["auc"] == pytest.approx(roc_auc_score(y == 2, p[:, 2]))
    assert any("ignores patient clustering" in w for w in m["warnings"])


def test_compare_and_validation_files(tmp_path):
    rng = np.random.default_rng(6)
    base = _table(rng, n_pat=120)
    worse = base.copy()
    worse["prob_M"] = np.clip(base["prob_M"] + rng.normal(scale=0.4, size=len(base)), 0, 1)
    worse["prob_F"] = 1 - worse["prob_M"]
    val = _table(rng, n_pat=40)
    val["patient_id"] = "v" + val["patient_id"]
    for name, d in (("base.csv", base), ("worse.csv", worse), ("val.csv", val)):
        d.to_csv(tmp_path / name, index=False)
    out = tmp_path / "o"
    m = evaluate_file(tmp_path / "worse.csv", out_dir=out, n_bootstrap=100,
                      compare=tmp_path / "base.csv", val_predictions=tmp_path / "val.csv")
    cmp = _strict_json(out / "comparison.json")
    assert cmp["schema"] == "readingrace.comparison/1" and cmp["difference"] == "a - b"
    d = cmp["per_class"]["M"]
    assert d["difference"] == pytest.approx(
        roc_auc_score(worse["label"] == "M", worse["prob_M"]) - roc_auc_score(base["label"] == "M", base["prob_M"]))
    assert d["difference"] < 0 and d["difference_ci"][1] < 0  # the noise lowered the AUC
    assert 0 <= d["p_delong"] <= 1
    vt = m["validation_threshold"]["per_class"]["M"]
    assert 0 < vt["threshold"] < 1 and math.isfinite(vt["sensitivity"])
    assert set(m["inputs"]) == {"predictions", "validation_predictions", "compare"}
    with pytest.raises(RunError, match="already exists"):
        evaluate_file(tmp_path / "worse.csv", out_dir=out, compare=tmp_path / "base.csv")


def test_cli_prints_the_paired_difference_and_warnings_in_one_line(tmp_path, capsys):
    from readingrace.cli import _one_line_warning, main

    rng = np.random.default_rng(6)
    base = _table(rng, n_pat=80)
    worse = base.assign(prob_M=np.clip(base["prob_M"] + rng.normal(scale=0.4, size=len(base)), 0, 1))
    worse["prob_F"] = 1 - worse["prob_M"]
    base.to_csv(tmp_path / "base.csv", index=False)
    worse.to_csv(tmp_path / "worse.csv", index=False)
    assert main(["evaluate", str(tmp_path / "worse.csv"), "--compare", str(tmp_path / "base.csv"),
                 "-o", str(tmp_path / "o"), "--n-bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    cmp = json.loads((tmp_path / "o" / "comparison.json").read_text())
    assert f"paired difference, worse.csv - base.csv: macro AUC {cmp['macro_difference']:.3f} [" in out
    text = _one_line_warning(UserWarning("class 'M': only 4 positives\n  in the test set"), UserWarning, "x.py", 3)
    assert text == "WARNING: class 'M': only 4 positives in the test set\n"
    import warnings
    assert warnings.formatwarning is not _one_line_warning  # restored after main()


def test_real_nih_sample_metadata(shared_data):
    """Real ids and clustering: the NIH sample's 909 images of 617 patients, scored by view only."""
    root = shared_data / "nih-cxr14-sample"
    images = {p.name for p in (root / "images").rglob("*.png")}
    if not images:
        pytest.skip("no NIH sample images")
    meta = pd.read_csv(root / "Data_Entry_2017_v2020.csv.gz", dtype=str)
    meta = meta[meta["Image Index"].isin(images)]
    pa = (meta["View Position"] == "PA").to_numpy(float)
    df = pd.DataFrame({
        "image_id": meta["Image Index"].to_numpy(), "patient_id": meta["Patient ID"].to_numpy(),
        "label": meta["Patient Gender"].to_numpy(), "prob_M": 0.4 + 0.2 * pa, "prob_F": 0.6 - 0.2 * pa,
        "view": meta["View Position"].to_numpy(),
    })
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = evaluate_predictions(df, n_bootstrap=200, strata=["view"])
    assert m["n_images"] == len(images) == 909 and m["n_patients"] == 617
    assert m["per_class"]["M"]["auc"] == pytest.approx(roc_auc_score(df["label"] == "M", df["prob_M"]))
    lo, hi = m["per_class"]["M"]["auc_ci"]
    assert lo < m["per_class"]["M"]["auc"] < hi and hi - lo < 0.2
    # within one view every score is tied: AUC exactly 1/2
    assert m["strata"]["view"]["AP"]["per_class"]["M"]["auc"] == 0.5
    assert m["strata"]["view"]["PA"]["n_images"] == int(pa.sum())

"""Metrics of a predictions table and the metrics.json schema (readingrace.stats.metrics)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from readingrace.errors import CohortError, ConfigError, RunError
from readingrace.stats.metrics import (
    SCHEMA,
    aggregate_studies,
    compare_predictions,
    evaluate_predictions,
    one_vs_rest_auc,
    prepare_predictions,
    read_metrics,
    to_json_dict,
    write_metrics,
    youden_threshold,
)

RACES = ["Asian", "Black", "White"]


def _hand_table() -> pd.DataFrame:
    """Four images, two patients per class; columns deliberately out of order, prob_M first."""
    p_f = np.array([0.9, 0.4, 0.6, 0.2])
    return pd.DataFrame({
        "prob_M": 1 - p_f,
        "label": ["F", "F", "M", "M"],
        "prob_F": p_f,
        "patient_id": ["p1", "p2", "p3", "p4"],
        "image_id": ["a", "b", "c", "d"],
    })


def _random_table(rng: np.random.Generator, n_pat: int = 300, strength: float = 1.2) -> pd.DataFrame:
    """Three classes, 1-4 images per patient, softmax probabilities, a view column."""
    k = rng.integers(1, 5, n_pat)
    patient = np.repeat(np.arange(n_pat), k)
    lab_pat = rng.integers(0, 3, n_pat)
    y = lab_pat[patient]
    logits = rng.normal(size=(patient.size, 3))
    logits[np.arange(patient.size), y] += strength
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    df = pd.DataFrame({
        "image_id": [f"img{i:05d}" for i in range(patient.size)],
        "patient_id": [f"pat{j}" for j in patient],
        "study_id": [f"st{j}" for j in patient],
        "label": np.array(RACES)[y],
        "view": rng.choice(["AP", "PA"], patient.size),
    })
    for j, c in enumerate(RACES):
        df[f"prob_{c}"] = p[:, j]
    return df


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------- point values
def test_hand_computed_auc_sensitivity_specificity_with_reordered_columns():
    m = evaluate_predictions(_hand_table(), classes=["F", "M"], n_bootstrap=50)
    # F scores 0.9, 0.4 vs M's prob_F 0.6, 0.2: 0.9>0.6, 0.9>0.2, 0.4<0.6, 0.4>0.2 -> 3/4
    assert m["per_class"]["F"]["auc"] == pytest.approx(0.75)
    assert m["per_class"]["M"]["auc"] == pytest.approx(0.75)
    assert m["macro_auc"] == pytest.approx(0.75)
    # prob_F >= 0.5: images a (F) and c (M) called F
    assert m["per_class"]["F"]["sensitivity"] == 0.5 and m["per_class"]["F"]["specificity"] == 0.5
    assert m["per_class"]["F"]["n_positive"] == 2 and m["per_class"]["F"]["n_negative"] == 2
    assert m["classes"] == ["F", "M"] and m["n_images"] == 4 and m["n_patients"] == 4
    assert m["schema"] == SCHEMA and m["level"] == "image" and m["threshold"] == 0.5


def test_ties_count_half_and_threshold_is_inclusive():
    df = pd.DataFrame({
        "image_id": list("abcd"), "patient_id": list("abcd"), "label": ["F", "F", "M", "M"],
        "prob_F": [0.7, 0.5, 0.5, 0.1], "prob_M": [0.3, 0.5, 0.5, 0.9],
    })
    m = evaluate_predictions(df, n_bootstrap=20)
    # 0.7>0.5, 0.7>0.1, 0.5=0.5 (1/2), 0.5>0.1 -> 3.5/4
    assert m["per_class"]["F"]["auc"] == pytest.approx(0.875)
    # prob >= 0.5 is positive: both F images called F, one of two M images called F
    assert m["per_class"]["F"]["sensitivity"] == 1.0 and m["per_class"]["F"]["specificity"] == 0.5
    assert m["per_class"]["M"]["sensitivity"] == 1.0 and m["per_class"]["M"]["specificity"] == 0.5


def test_equal_to_sklearn_on_random_three_class_data():
    df = _random_table(np.random.default_rng(0))
    shuffled = df[["prob_White", "label", "prob_Asian", "image_id", "patient_id", "prob_Black"]]
    m = evaluate_predictions(shuffled, classes=RACES, n_bootstrap=100)
    expected = {c: roc_auc_score(df["label"] == c, df[f"prob_{c}"]) for c in RACES}
    for c in RACES:
        assert m["per_class"][c]["auc"] == pytest.approx(expected[c], abs=1e-12)
        lo, hi = m["per_class"][c]["auc_ci"]
        assert lo < expected[c] < hi
        lo, hi = m["per_class"][c]["auc_ci_delong"]
        assert lo < expected[c] < hi and m["per_class"][c]["auc_se_delong"] > 0
    assert m["macro_auc"] == pytest.approx(np.mean(list(expected.values())))
    assert m["macro_auc"] == pytest.approx(
        roc_auc_score(df["label"], df[[f"prob_{c}" for c in RACES]], multi_class="ovr", labels=RACES))
    assert m["n_patients"] == 300 and m["n_images"] == len(df)
    auc = one_vs_rest_auc(df["label"].to_numpy(), df[[f"prob_{c}" for c in RACES]].to_numpy(), RACES)
    assert auc == pytest.approx(expected)


def test_absent_class_gives_nan_and_warning_not_crash():
    df = _random_table(np.random.default_rng(1), n_pat=80)
    df = df[df["label"] != "Black"]
    with pytest.warns(UserWarning, match="'Black' has no images of this class"):
        m = evaluate_predictions(df, n_bootstrap=50)
    black = m["per_class"]["Black"]
    assert math.isnan(black["auc"]) and black["n_positive"] == 0
    assert math.isnan(black["sensitivity"]) and not math.isnan(black["specificity"])
    assert all(math.isnan(v) for v in black["auc_ci"] + black["auc_ci_delong"])
    assert any("Black" in w for w in m["warnings"])
    others = [m["per_class"][c]["auc"] for c in ("Asian", "White")]
    assert m["macro_auc"] == pytest.approx(np.mean(others))
    assert m["ci"]["degenerate"]["auc:Black"] == 50  # every replicate lacks the class
    assert math.isfinite(m["macro_auc_ci"][0])


def test_seed_makes_results_reproducible():
    df = _random_table(np.random.default_rng(2), n_pat=60)
    a = evaluate_predictions(df, n_bootstrap=100, seed=5)
    b = evaluate_predictions(df, n_bootstrap=100, seed=5)
    c = evaluate_predictions(df, n_bootstrap=100, seed=6)
    assert a["per_class"]["Asian"]["auc_ci"] == b["per_class"]["Asian"]["auc_ci"]
    assert a["per_class"]["Asian"]["auc_ci"] != c["per_class"]["Asian"]["auc_ci"]
    assert a["ci"]["seed"] == 5 and a["ci"]["n_bootstrap"] == 100


def test_perfect_separation_ci_is_one_one():
    df = pd.DataFrame({
        "image_id": [f"i{i}" for i in range(40)], "patient_id": [f"p{i // 2}" for i in range(40)],
        "label": ["F"] * 20 + ["M"] * 20,
        "prob_F": np.r_[np.linspace(0.6, 1, 20), np.linspace(0, 0.4, 20)],
    })
    df["prob_M"] = 1 - df["prob_F"]
    m = evaluate_predictions(df, n_bootstrap=200)
    for c in ("F", "M"):
        assert m["per_class"][c]["auc"] == 1.0 and m["per_class"][c]["auc_ci"] == [1.0, 1.0]
        assert m["per_class"][c]["auc_ci_delong"] == [1.0, 1.0]
        assert m["per_class"][c]["sensitivity_ci"] == [1.0, 1.0]
    assert m["macro_auc_ci"] == [1.0, 1.0]


# ---------------------------------------------------------------------------------------- input forms
def test_paper_form_with_integer_codes_and_strings():
    df = _random_table(np.random.default_rng(3), n_pat=60)
    standard = df.assign(patient_id=df["image_id"])
    codes = df["label"].map({"Asian": 0, "Black": 1, "White": 2})
    paper = pd.DataFrame({
        "index": df["image_id"], "asian_pred": df["prob_Asian"], "black_pred": df["prob_Black"],
        "white_pred": df["prob_White"], "race_ground_truth": codes,
    })
    with pytest.warns(UserWarning, match="ignores patient clustering"):
        m_paper = evaluate_predictions(paper, n_bootstrap=100)
    m_std = evaluate_predictions(standard, n_bootstrap=100)
    assert m_paper["classes"] == RACES
    for c in RACES:
        assert m_paper["per_class"][c]["auc"] == m_std["per_class"][c]["auc"]
        assert m_paper["per_class"][c]["auc_ci"] == m_std["per_class"][c]["auc_ci"]
    as_strings = paper.assign(race_ground_truth=df["label"].str.upper())
    m_str = _quiet(evaluate_predictions, as_strings, n_bootstrap=100)
    assert m_str["per_class"]["Black"]["auc"] == m_std["per_class"]["Black"]["auc"]
    bad = paper.assign(race_ground_truth=paper["race_ground_truth"].replace({2: 7}))
    with pytest.raises(CohortError, match="race_ground_truth.*'7'"):
        prepare_predictions(bad)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (lambda d: d.drop(columns="patient_id"), r"missing column\(s\) patient_id"),
        (lambda d: d.drop(columns="prob_M"), r"at least two classes"),
        (lambda d: d.assign(prob_F=[0.9, 1.4, 0.6, 0.2]), r"row 2 \(image_id 'b'\), column 'prob_F'.*outside \[0, 1\]"),
        (lambda d: d.assign(prob_F=[0.9, np.nan, 0.6, 0.2]), r"row 2 .*'prob_F'.*missing \(NaN\)"),
        (lambda d: d.assign(prob_M=["0.1", "x", "0.4", "0.8"]), r"row 2 .*'prob_M'.*'x' is not a number"),
        (lambda d: d.assign(label=["F", "F", "U", "M"]), r"row 3 \(image_id 'c'\), column 'label'.*'U' is not among"),
        (lambda d: d.assign(image_id=["a", "b", "a", "d"]), r"duplicate image_id 'a' at row 1 and row 3"),
        (lambda d: d.assign(patient_id=["p1", None, "p3", "p4"]), r"row 2 .*'patient_id'.*missing"),
        (lambda d: d.iloc[:0], r"no rows"),
    ],
)
def test_bad_tables_raise_cohort_error_naming_row_and_column(change, pattern):
    with pytest.raises(CohortError, match=pattern):
        prepare_predictions(change(_hand_table()), source="preds.csv")


def test_requested_classes_must_have_columns_and_bad_options():
    with pytest.raises(CohortError, match="prob_U"):
        prepare_predictions(_hand_table(), classes=["F", "M", "U"])
    with pytest.raises(ConfigError, match="threshold"):
        evaluate_predictions(_hand_table(), threshold=1.5)
    with pytest.raises(ConfigError, match="confidence level"):
        evaluate_predictions(_hand_table(), level=0)
    with pytest.raises(CohortError, match="stratum column 'site' not found"):
        evaluate_predictions(_hand_table(), strata=["site"])
    with pytest.warns(UserWarning, match="do not sum to 1"):
        evaluate_predictions(_hand_table().assign(prob_M=0.9), n_bootstrap=10)


# ---------------------------------------------------------------------------------------- study level
def test_study_level_means_and_label_conflict():
    df = pd.DataFrame({
        "image_id": list("abcdef"), "patient_id": ["p1", "p1", "p2", "p3", "p3", "p4"],
        "study_id": ["s1", "s1", "s2", "s3", "s3", "s4"], "label": ["F", "F", "F", "M", "M", "M"],
        "prob_F": [0.2, 0.8, 0.3, 0.6, 0.2, 0.1],
    })
    df["prob_M"] = 1 - df["prob_F"]
    studies = aggregate_studies(df).frame.set_index("study_id")
    assert studies.loc["s1", "prob_F"] == pytest.approx(0.5) and studies.loc["s1", "n_images"] == 2
    assert studies.loc["s3", "prob_F"] == pytest.approx(0.4)
    m = evaluate_predictions(df, study_level=True, n_bootstrap=50)
    st = m["study"]
    assert st["level"] == "study" and st["n_studies"] == 4 and st["n_images"] == 6
    # study F scores 0.5, 0.3 vs M 0.4, 0.1 -> 0.5>0.4, 0.5>0.1, 0.3<0.4, 0.3>0.1 = 3/4
    assert st["per_class"]["F"]["auc"] == pytest.approx(0.75)
    assert m["n_studies"] == 4
    conflict = df.assign(label=["F", "M", "F", "M", "M", "M"])
    with pytest.raises(CohortError, match="study 's1' has images with different labels"):
        evaluate_predictions(conflict, study_level=True, n_bootstrap=10)


# ---------------------------------------------------------------------------------------- strata, validation
def test_strata_blocks_and_single_class_stratum():
    df = _random_table(np.random.default_rng(4), n_pat=150)
    df.loc[df["label"] == "White", "view"] = "LAT"  # the LAT stratum has a single class
    df.loc[df.index[:3], "view"] = None
    with pytest.warns(UserWarning):
        m = evaluate_predictions(df, strata=["view"], n_bootstrap=50)
    views = m["strata"]["view"]
    assert set(views) == {"AP", "PA", "LAT"}
    ap = df[df["view"] == "AP"]
    assert views["AP"]["n_images"] == len(ap)
    assert views["AP"]["per_class"]["Asian"]["auc"] == pytest.approx(
        roc_auc_score(ap["label"] == "Asian", ap["prob_Asian"]))
    assert math.isnan(views["LAT"]["per_class"]["White"]["auc"])
    assert math.isnan(views["LAT"]["macro_auc"])
    assert any("view=LAT" in w for w in m["warnings"])
    assert any("3 image(s) without a value" in w for w in m["warnings"])


def test_youden_threshold_chosen_on_validation_never_test():
    assert youden_threshold(np.array([1, 1, 0, 0], bool), np.array([0.3, 0.35, 0.1, 0.2])) == 0.3
    val = pd.DataFrame({
        "image_id": list("abcd"), "patient_id": list("abcd"), "label": ["F", "F", "M", "M"],
        "prob_F": [0.3, 0.35, 0.1, 0.2], "prob_M": [0.7, 0.65, 0.9, 0.8],
    })
    test = pd.DataFrame({
        "image_id": list("efgh"), "patient_id": list("efgh"), "label": ["F", "F", "M", "M"],
        "prob_F": [0.32, 0.25, 0.31, 0.05], "prob_M": [0.68, 0.75, 0.69, 0.95],
    })
    m = evaluate_predictions(test, val_pred=val, n_bootstrap=50)
    vt = m["validation_threshold"]["per_class"]["F"]
    assert vt["threshold"] == 0.3
    assert vt["sensitivity"] == 0.5 and vt["specificity"] == 0.5  # 0.32 >= 0.3 yes, 0.25 no; 0.31 FP
    assert m["per_class"]["F"]["sensitivity"] == 0.0  # at 0.5 nothing is called F
    assert m["validation_threshold"]["per_class"]["M"]["threshold"] == 0.8


# ---------------------------------------------------------------------------------------- comparison
def test_compare_predictions_paired():
    rng = np.random.default_rng(5)
    a = _random_table(rng, n_pat=200, strength=2.0)
    b = a.copy()
    noise = rng.normal(scale=1.5, size=(len(a), 3))
    logits = np.log(a[[f"prob_{c}" for c in RACES]].to_numpy()) + noise
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    for j, c in enumerate(RACES):
        b[f"prob_{c}"] = p[:, j]
    b = b.sample(frac=1.0, random_state=1)  # row order must not matter
    cmp = compare_predictions(a, b, n_bootstrap=200)
    for c in RACES:
        pc = cmp["per_class"][c]
        expected = roc_auc_score(a["label"] == c, a[f"prob_{c}"]) - roc_auc_score(b["label"] == c, b[f"prob_{c}"])
        assert pc["difference"] == pytest.approx(expected)
        assert pc["difference"] > 0 and pc["difference_ci"][0] > 0 and pc["difference_ci_delong"][0] > 0
        assert 0.0 <= pc["p_delong"] < 0.05
    assert cmp["macro_difference"] == pytest.approx(cmp["macro_auc_a"] - cmp["macro_auc_b"])
    assert cmp["macro_difference_ci"][0] > 0
    same = compare_predictions(a, a, n_bootstrap=50)
    assert same["per_class"]["Asian"]["difference_ci"] == [0.0, 0.0]
    assert same["per_class"]["Asian"]["p_delong"] == 1.0
    with pytest.raises(CohortError, match="same images"):
        compare_predictions(a, b.iloc[1:], n_bootstrap=10)
    relabelled = b.copy()
    other = next(c for c in RACES if c != a["label"].iloc[0])
    relabelled.loc[relabelled["image_id"] == a["image_id"].iloc[0], "label"] = other
    with pytest.raises(CohortError, match="has label"):
        compare_predictions(a, relabelled, n_bootstrap=10)


# ---------------------------------------------------------------------------------------- JSON
def test_json_nan_to_null_and_numpy_types(tmp_path):
    df = _random_table(np.random.default_rng(6), n_pat=40)
    m = _quiet(evaluate_predictions, df[df["label"] != "Asian"], n_bootstrap=20)
    m["extra"] = {"n": np.int64(3), "x": np.float32(0.5), "arr": np.array([1.0, np.nan]), "t": (1, 2)}
    j = to_json_dict(m)
    assert j["per_class"]["Asian"]["auc"] is None and j["extra"] == {"n": 3, "x": 0.5, "arr": [1.0, None], "t": [1, 2]}
    path = write_metrics(tmp_path / "metrics.json", m)
    text = path.read_text()
    loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert loaded["per_class"]["Asian"]["auc_ci"] == [None, None]
    assert loaded["per_class"]["Black"]["auc"] == pytest.approx(m["per_class"]["Black"]["auc"])
    with pytest.raises(RunError, match="already exists"):
        write_metrics(path, m)
    write_metrics(path, {**m, "run": {"id": "x"}}, overwrite=True)
    back = read_metrics(path)
    assert back["run"] == {"id": "x"} and back["schema"] == SCHEMA  # extra keys are kept
    (tmp_path / "other.json").write_text(json.dumps({"schema": "something/1"}))
    with pytest.raises(RunError, match="not a readingrace metrics file"):
        read_metrics(tmp_path / "other.json")

"""Subgroup performance of a disease model (readingrace.stats.subgroups), on generated predictions with known truth."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from readingrace.cli import main
from readingrace.errors import CohortError, ConfigError
from readingrace.stats.metrics import youden_threshold
from readingrace.stats.subgroups import (
    ALL,
    f1_threshold,
    read_predictions_table,
    subgroup_performance,
    write_subgroups,
)

NF = "No Finding"


def _table(seed: int, *, n_pat: int = 600, images: tuple[int, int] = (1, 3), nf_shift_b: float = 0.0,
           prefix: str = "") -> pd.DataFrame:
    """Two sexes, three age groups (per image), one finding and No Finding.

    Effusion is present with probability 0.3 per image; its probability is a logistic score of
    the truth. For images *with* a finding, P(No Finding) ~ Uniform(0, 0.6), plus ``nf_shift_b``
    for sex B: at threshold 0.5 the underdiagnosis rate is analytically
    (0.6 + shift - 0.5) / 0.6 in B and 0.1 / 0.6 = 1/6 in A. Images without a finding get
    P(No Finding) ~ Uniform(0.4, 1).
    """
    rng = np.random.default_rng(seed)
    k = rng.integers(images[0], images[1] + 1, n_pat)
    patient = np.repeat(np.arange(n_pat), k)
    n = patient.size
    sex = np.where(rng.random(n_pat) < 0.5, "A", "B")[patient]
    y = (rng.random(n) < 0.3).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(size=n) + 2.0 * y - 1.0)))
    p_nf = np.where(y == 1, rng.uniform(0, 0.6, n) + np.where(sex == "B", nf_shift_b, 0.0), rng.uniform(0.4, 1.0, n))
    return pd.DataFrame({
        "image_id": [f"{prefix}img{i:05d}" for i in range(n)],
        "patient_id": [f"{prefix}{j:05d}" for j in patient],
        "sex": sex,
        "age_group": rng.choice(["20-40", "40-60", "60-80"], n),
        "label_Effusion": y, "prob_Effusion": p,
        f"label_{NF}": 1 - y, f"prob_{NF}": np.clip(p_nf, 0, 1),
    })


def _row(result, attribute, group, finding, metric):
    df = result.by_group
    r = df[(df["attribute"] == attribute) & (df["group"] == group) & (df["finding"] == finding)
           & (df["metric"] == metric)]
    assert len(r) == 1, (attribute, group, finding, metric)
    return r.iloc[0]


def _diff(result, attribute, finding, metric, group):
    d = result.differences
    r = d[(d["attribute"] == attribute) & (d["finding"] == finding) & (d["metric"] == metric) & (d["group"] == group)]
    assert len(r) == 1
    return r.iloc[0]


def test_identical_groups_give_differences_near_zero_with_ci_covering_zero():
    df = _table(1, n_pat=1500)
    res = subgroup_performance(df, findings=["Effusion"], groups=["sex"], threshold=0.5, n_bootstrap=400)
    assert res.references["sex"] in ("A", "B")
    for finding, metric in (("Effusion", "auc"), ("Effusion", "tpr"), ("Effusion", "fpr"), (NF, "underdiagnosis_rate")):
        d = res.differences[(res.differences["finding"] == finding) & (res.differences["metric"] == metric)].iloc[0]
        assert abs(d["difference"]) < 0.06, (metric, d["difference"])
        assert d["ci_low"] < 0 < d["ci_high"], metric
        assert d["ci_high"] - d["ci_low"] < 0.15
    # known truth: AUC of a binormal score with separation 2 is Phi(2 / sqrt(2)) = 0.921
    assert _row(res, "sex", ALL, "Effusion", "auc")["estimate"] == pytest.approx(0.921, abs=0.02)
    assert _row(res, "sex", "A", NF, "underdiagnosis_rate")["estimate"] == pytest.approx(1 / 6, abs=0.03)


def test_planted_underdiagnosis_matches_the_analytic_rate_and_its_difference_excludes_zero():
    df = _table(2, n_pat=1500, nf_shift_b=0.2)
    res = subgroup_performance(df, findings=["Effusion"], groups=["sex"], threshold=0.5, reference="A",
                               n_bootstrap=400)
    a = _row(res, "sex", "A", NF, "underdiagnosis_rate")
    b = _row(res, "sex", "B", NF, "underdiagnosis_rate")
    assert a["estimate"] == pytest.approx(1 / 6, abs=0.035)
    assert b["estimate"] == pytest.approx(0.3 / 0.6, abs=0.04)
    d = _diff(res, "sex", NF, "underdiagnosis_rate", "B")
    assert d["reference"] == "A"
    assert d["difference"] == pytest.approx(0.5 - 1 / 6, abs=0.05)
    assert d["ci_low"] > 0.2 and d["ci_low"] < d["difference"] < d["ci_high"]
    assert d["ci_low"] < 1 / 3 < d["ci_high"]
    assert "label is 0" in res.underdiagnosis and "0.5" in res.underdiagnosis
    # the disease finding itself is unaffected by the planted No-Finding shift
    tpr = _diff(res, "sex", "Effusion", "tpr", "B")
    assert tpr["ci_low"] < 0 < tpr["ci_high"]


def test_point_values_match_a_direct_sklearn_and_numpy_computation():
    df = _table(3, n_pat=300)
    t = 0.42
    res = subgroup_performance(df, findings=["Effusion"], groups=["sex", "age_group"], threshold=t, n_bootstrap=50)
    for attribute in ("sex", "age_group"):
        for g, part in df.groupby(attribute):
            y, p = part["label_Effusion"].to_numpy(), part["prob_Effusion"].to_numpy()
            assert _row(res, attribute, g, "Effusion", "auc")["estimate"] == pytest.approx(roc_auc_score(y, p))
            assert _row(res, attribute, g, "Effusion", "tpr")["estimate"] == pytest.approx((p[y == 1] >= t).mean())
            assert _row(res, attribute, g, "Effusion", "fpr")["estimate"] == pytest.approx((p[y == 0] >= t).mean())
            assert _row(res, attribute, g, "Effusion", "prevalence")["estimate"] == pytest.approx(y.mean())
            r = _row(res, attribute, g, "Effusion", "tpr")
            assert (r["n_images"], r["n_patients"], r["n_positive"], r["n_negative"], r["n_denominator"]) == (
                len(part), part["patient_id"].nunique(), (y == 1).sum(), (y == 0).sum(), (y == 1).sum())
            sick = part[part[f"label_{NF}"] == 0]
            assert _row(res, attribute, g, NF, "underdiagnosis_rate")["estimate"] == pytest.approx(
                (sick[f"prob_{NF}"] >= t).mean())
            assert r["threshold"] == t and math.isnan(_row(res, attribute, g, "Effusion", "auc")["threshold"])
    # every estimate lies inside its interval
    ok = res.by_group.dropna(subset=["estimate", "ci_low"])
    assert ((ok["ci_low"] <= ok["estimate"] + 1e-12) & (ok["estimate"] <= ok["ci_high"] + 1e-12)).all()


def test_threshold_is_chosen_on_validation_over_all_patients_and_used_unchanged_on_test():
    val, test = _table(4, n_pat=300, prefix="v"), _table(5, n_pat=300)
    res = subgroup_performance(test, findings=["Effusion"], groups=["sex"], val_predictions=val, n_bootstrap=50)
    t = youden_threshold(val["label_Effusion"].to_numpy() == 1, val["prob_Effusion"].to_numpy())
    t_nf = youden_threshold(val[f"label_{NF}"].to_numpy() == 1, val[f"prob_{NF}"].to_numpy())
    assert res.thresholds == {"Effusion": pytest.approx(t), NF: pytest.approx(t_nf)}
    assert "Youden" in res.threshold_source and "validation" in res.threshold_source
    for g, part in test.groupby("sex"):
        y, p = part["label_Effusion"].to_numpy(), part["prob_Effusion"].to_numpy()
        assert _row(res, "sex", g, "Effusion", "tpr")["estimate"] == pytest.approx((p[y == 1] >= t).mean())
        assert _row(res, "sex", g, "Effusion", "tpr")["threshold"] == pytest.approx(t)
    # a threshold chosen on the test set itself would generally differ
    on_test = youden_threshold(test["label_Effusion"].to_numpy() == 1, test["prob_Effusion"].to_numpy())
    assert t != pytest.approx(on_test)
    f1 = subgroup_performance(test, findings=["Effusion"], groups=["sex"], val_predictions=val, threshold_rule="f1",
                              n_bootstrap=0)
    y, p = val["label_Effusion"].to_numpy() == 1, val["prob_Effusion"].to_numpy()
    cands = np.unique(p)
    f1s = [2 * (y & (p >= c)).sum() / ((p >= c).sum() + y.sum()) for c in cands]
    assert f1.thresholds["Effusion"] == pytest.approx(cands[int(np.argmax(f1s))])
    assert math.isnan(f1_threshold(np.array([True, True]), np.array([0.1, 0.2])))   # no negatives: no threshold


def test_clustered_images_are_resampled_by_patient():
    one = _table(6, n_pat=400, images=(1, 1))
    rep = one.loc[one.index.repeat(4)].reset_index(drop=True)
    rep["image_id"] = [f"{i}-{k}" for i, k in zip(rep["image_id"], np.tile(range(4), len(one)))]
    kw = {"findings": ["Effusion"], "groups": ["sex"], "threshold": 0.5, "n_bootstrap": 300, "seed": 7}
    r1 = subgroup_performance(one, **kw)
    r4 = subgroup_performance(rep, **kw)
    # four identical images per patient carry no more information: the patient bootstrap gives the same intervals
    pd.testing.assert_frame_equal(
        r1.by_group.drop(columns=["n_images", "n_denominator", "n_positive", "n_negative"]),
        r4.by_group.drop(columns=["n_images", "n_denominator", "n_positive", "n_negative"]))
    # ... while treating every image as its own patient makes them about half as wide (and says so)
    naive = subgroup_performance(rep.drop(columns="patient_id"), **kw)
    assert any("no patient_id column" in n for n in naive.notes)
    w4 = _row(r4, "sex", "A", "Effusion", "tpr")
    wn = _row(naive, "sex", "A", "Effusion", "tpr")
    ratio = (wn["ci_high"] - wn["ci_low"]) / (w4["ci_high"] - w4["ci_low"])
    assert 0.35 < ratio < 0.7
    assert r4.n_patients == 400 and naive.n_patients == len(rep)


def test_per_image_attribute_may_put_a_patient_in_two_groups_but_sex_may_not():
    df = _table(8, n_pat=200, images=(2, 3))
    assert df.groupby("patient_id")["age_group"].nunique().max() > 1
    res = subgroup_performance(df, findings=["Effusion"], groups=["age_group"], threshold=0.5, n_bootstrap=50)
    counts = res.metric("auc", attribute="age_group").set_index("group")["n_patients"]
    assert counts.drop(ALL).sum() > counts[ALL] == df["patient_id"].nunique()
    bad = df.copy()
    bad.loc[bad.index[:2], "patient_id"] = bad.loc[bad.index[0], "patient_id"]
    bad.loc[bad.index[:2], "sex"] = ["A", "B"]
    with pytest.raises(CohortError, match=r"more than one 'sex' group.*per-patient attribute"):
        subgroup_performance(bad, findings=["Effusion"], groups=["sex"], threshold=0.5, n_bootstrap=0)
    ok = subgroup_performance(bad, findings=["Effusion"], groups=["sex"], threshold=0.5, n_bootstrap=0,
                              per_image=["sex"])
    assert set(ok.metric("auc")["group"]) == {"A", "B", ALL}


def test_group_without_positives_gives_nan_with_a_reason_not_a_crash():
    df = _table(9, n_pat=200)
    df.loc[df["sex"] == "B", "label_Effusion"] = 0
    res = subgroup_performance(df, findings=["Effusion"], groups=["sex"], threshold=0.5, reference="A", n_bootstrap=50)
    for metric in ("auc", "tpr"):
        r = _row(res, "sex", "B", "Effusion", metric)
        assert math.isnan(r["estimate"]) and "no positive images of Effusion" in r["reason"]
        d = _diff(res, "sex", "Effusion", metric, "B")
        assert math.isnan(d["difference"]) and "B: no positive images" in d["reason"]
    assert _row(res, "sex", "B", "Effusion", "fpr")["reason"] == ""
    assert not math.isnan(_row(res, "sex", "A", "Effusion", "auc")["estimate"])
    # NaN, never a made-up number, in the JSON too
    assert json.loads(json.dumps(res.to_dict(), allow_nan=False))["by_group"]


def test_without_a_no_finding_column_every_finding_below_its_threshold_counts_as_no_finding():
    rng = np.random.default_rng(10)
    df = _table(10, n_pat=300).drop(columns=[f"label_{NF}", f"prob_{NF}"])
    df["label_Mass"] = (rng.random(len(df)) < 0.2).astype(int)
    df["prob_Mass"] = rng.random(len(df))
    res = subgroup_performance(df, findings=["Effusion", "Mass"], groups=["sex"],
                               threshold={"Effusion": 0.5, "Mass": 0.7}, n_bootstrap=50)
    assert "no 'No Finding' column" in res.underdiagnosis and any("underdiagnosis" in n for n in res.notes)
    for g, part in df.groupby("sex"):
        sick = part[(part["label_Effusion"] == 1) | (part["label_Mass"] == 1)]
        expected = ((sick["prob_Effusion"] < 0.5) & (sick["prob_Mass"] < 0.7)).mean()
        assert _row(res, "sex", g, "any finding", "underdiagnosis_rate")["estimate"] == pytest.approx(expected)


def test_single_label_predictions_of_readingrace_run_work_one_vs_rest():
    df = _table(11, n_pat=200)
    run_form = pd.DataFrame({"image_id": df["image_id"], "patient_id": df["patient_id"], "sex": df["sex"],
                             "label": np.where(df["label_Effusion"] == 1, "present", "absent"),
                             "prob_present": df["prob_Effusion"], "prob_absent": 1 - df["prob_Effusion"]})
    res = subgroup_performance(run_form, findings=["present"], groups=["sex"], threshold=0.5, n_bootstrap=0,
                               underdiagnosis=False)
    part = df[df["sex"] == "A"]
    assert _row(res, "sex", "A", "present", "auc")["estimate"] == pytest.approx(
        roc_auc_score(part["label_Effusion"], part["prob_Effusion"]))
    assert any("one-vs-rest" in n for n in res.notes)


def test_intersections_all_pairs_and_uncertain_labels():
    df = _table(12, n_pat=400)
    df.loc[df.index[:30], "label_Effusion"] = -1
    res = subgroup_performance(df, findings="Effusion", groups=[("sex", "age_group"), "sex+age_group"],
                               threshold=0.5, all_pairs=True, n_bootstrap=0)
    assert res.attributes == ("sex+age_group",)
    groups = set(res.metric("auc")["group"]) - {ALL}
    assert groups == {f"{s} & {a}" for s in "AB" for a in ("20-40", "40-60", "60-80")}
    assert len(res.differences[(res.differences["metric"] == "auc")]) == 6 * 5 // 2
    r = _row(res, "sex+age_group", ALL, "Effusion", "auc")
    assert r["n_positive"] + r["n_negative"] == len(df) - 30       # uncertain labels are left out


@pytest.mark.parametrize(("change", "kwargs", "error", "match"), [
    (None, {"findings": ["Edema"]}, CohortError, r"finding 'Edema' needs columns 'label_Edema'.*Findings with both"),
    (None, {"groups": ["race"]}, CohortError, r"group column 'race' not found; group columns available: .*sex"),
    (None, {"threshold": 1.5}, ConfigError, r"threshold must be a probability in \[0, 1\], got 1.5"),
    (None, {"threshold": -0.1}, ConfigError, r"threshold must be a probability"),
    (None, {"threshold": None}, ConfigError, r"exactly one of threshold .* and val_predictions"),
    (None, {"threshold_rule": "max"}, ConfigError, r"threshold rule 'max'"),
    (None, {"reference": "C"}, ConfigError, r"reference group 'C' is not a group of 'sex'"),
    ("label", {}, CohortError, r"column 'label_Effusion': value 2 is not 1, 0, -1"),
    ("prob", {}, CohortError, r"column 'prob_Effusion': value 1.2 is outside \[0, 1\]"),
    ("dup", {}, CohortError, r"image_id 'img00000' appears 2 times"),
    ("empty_group", {}, CohortError, r"group column 'sex' has no values"),
])
def test_bad_input_is_named(change, kwargs, error, match):
    df = _table(13, n_pat=30)
    if change == "label":
        df["label_Effusion"] = df["label_Effusion"].astype(object)
        df.loc[3, "label_Effusion"] = 2
    elif change == "prob":
        df.loc[3, "prob_Effusion"] = 1.2
    elif change == "dup":
        df.loc[1, "image_id"] = df.loc[0, "image_id"]
    elif change == "empty_group":
        df["sex"] = None
    args = {"findings": ["Effusion"], "groups": ["sex"], "threshold": 0.5, "n_bootstrap": 0, **kwargs}
    with pytest.raises(error, match=match):
        subgroup_performance(df, **args)


def test_files_and_the_cli_on_a_csv(tmp_path):
    df = _table(14, n_pat=200)
    val = _table(15, n_pat=100, prefix="v")
    df.to_csv(tmp_path / "predictions.csv", index=False)
    val.to_csv(tmp_path / "val.csv", index=False)
    res = subgroup_performance(read_predictions_table(tmp_path / "predictions.csv"), findings=["Effusion"],
                               groups=["sex"], threshold=0.5, n_bootstrap=20)
    paths = write_subgroups(res, tmp_path / "api")
    assert {p.name for p in paths.values()} >= {"subgroups.csv", "subgroup_differences.csv", "subgroups.md",
                                                "subgroups.json", "subgroups_sex.png"}
    assert (tmp_path / "api" / "subgroups_sex.png").stat().st_size > 5000
    out = tmp_path / "cli"
    rc = main(["subgroups", str(tmp_path / "predictions.csv"), "--finding", "Effusion", "--group", "sex",
               "--group", "age_group", "--val-predictions", str(tmp_path / "val.csv"), "--n-bootstrap", "50",
               "--reference", "sex=B", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "subgroups.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert data["references"]["sex"] == "B" and data["same_threshold_for_every_group"] is True
    assert "validation" in data["threshold_source"]
    md = (out / "subgroups.md").read_text()
    assert "Underdiagnosis rate" in md and "| Effusion |" in md
    assert not any(pid in md for pid in df["patient_id"].head(20))
    table = pd.read_csv(out / "subgroups.csv")
    assert set(table["attribute"]) == {"sex", "age_group"}
    # a second run into the same folder needs --overwrite; errors are one line, exit status 2
    assert main(["subgroups", str(tmp_path / "predictions.csv"), "--finding", "Effusion", "--group", "sex",
                 "--threshold", "0.5", "--out", str(out)]) == 2
    assert main(["subgroups", str(tmp_path / "predictions.csv"), "--finding", "Effusion", "--group", "sex",
                 "--threshold", "7", "--out", str(tmp_path / "x")]) == 2
    assert main(["subgroups", str(tmp_path / "predictions.csv"), "--group", "sex", "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "y").exists()
    # every finding by default; the underdiagnosis rate can be left out
    assert main(["subgroups", str(tmp_path / "predictions.csv"), "--group", "sex", "--threshold", "0.5",
                 "--no-underdiagnosis", "--n-bootstrap", "0", "--out", str(tmp_path / "z")]) == 0
    z = pd.read_csv(tmp_path / "z" / "subgroups.csv")
    assert set(z["finding"]) == {"Effusion", NF} and "underdiagnosis_rate" not in set(z["metric"])

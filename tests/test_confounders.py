"""Tests of the tabular confounder experiments (B1-B3) and the chi-square tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
from scipy.stats import chi2_contingency
from sklearn.metrics import roc_auc_score

from readingrace.errors import CohortError, ConfigError, ReadingRaceError
from readingrace.split import split_patients
from readingrace.stats import confounders as cf

LABELS = ["Cardiomegaly", "Edema", "Effusion", "No Finding"]
RACES = ["Asian", "Black", "White"]
NB = 100  # bootstrap replicates in tests (the default is 1000)


def cohort(n_patients: int = 600, rows: int = 2, *, planted: bool = False, seed: int = 0) -> pd.DataFrame:
    """Synthetic cohort: ``rows`` images per patient, race fixed per patient, BMI depends on race."""
    rng = np.random.default_rng(seed)
    race = rng.choice(RACES, size=n_patients, p=[0.2, 0.3, 0.5])
    sex = rng.choice(["F", "M"], size=n_patients)
    bmi = rng.normal(26, 4, n_patients) + 2.5 * (race == "Black") - 2.0 * (race == "Asian")
    bmi[rng.random(n_patients) < 0.3] = np.nan
    density = rng.integers(1, 5, n_patients)
    age = rng.uniform(30, 80, n_patients) + 6 * (race == "White")
    recs = []
    for p in range(n_patients):
        for r in range(rows):
            labels = {c: rng.choice([1.0, 0.0, -1.0, np.nan], p=[0.2, 0.3, 0.1, 0.4]) for c in LABELS}
            if planted:  # Cardiomegaly almost decides Black vs not
                labels["Cardiomegaly"] = 1.0 if (race[p] == "Black") == (rng.random() < 0.95) else 0.0
            recs.append({"image_id": f"i{p}_{r}", "patient_id": f"p{p:04d}", "study_id": f"s{p}_{r}",
                         "race": race[p], "sex": sex[p], "bmi": bmi[p], "density": density[p],
                         "age": age[p], **labels})
    return pd.DataFrame(recs)


def train_rows(df: pd.DataFrame, target: str = "race") -> pd.Series:
    split = split_patients(df, target=target, ratios=(0.7, 0.3), seed=2021, names=("train", "test"))
    return split


# ---------------------------------------------------------------------------------------- errors


def test_missing_columns_raise_cohort_error():
    df = cohort(50, 1)
    with pytest.raises(CohortError, match="bmi_kg"):
        cf.bmi_glm(df, bmi_col="bmi_kg")
    with pytest.raises(CohortError, match="breast_density"):
        cf.density_logit(df, density_col="breast_density")
    with pytest.raises(CohortError, match="Hernia"):
        cf.labels_models(df, label_cols=["Edema", "Hernia"])
    with pytest.raises(CohortError, match="ethnicity"):
        cf.chi_square(df, attribute="ethnicity", stratum="sex")
    with pytest.raises(CohortError, match="patient_id"):
        cf.bmi_glm(df.drop(columns="patient_id"))


def test_bad_values_raise_clear_errors():
    df = cohort(60, 1)
    bad = df.copy()
    bad.loc[3, "Edema"] = 2
    with pytest.raises(CohortError, match=r"'Edema'.*row 3"):
        cf.labels_models(bad, label_cols=LABELS)
    bad = df.copy().astype({"density": object})
    bad.loc[5, "density"] = "dense"
    with pytest.raises(CohortError, match=r"'density'.*row 5"):
        cf.density_logit(bad)
    with pytest.raises(ConfigError, match="label policy"):
        cf.encode_labels(df, LABELS, policy="u-ones")
    with pytest.raises(ConfigError, match="unknown"):
        cf.labels_models(df, label_cols=LABELS, models=("svm",))
    with pytest.raises(CohortError, match="two classes"):
        cf.bmi_glm(df.assign(race="White"))
    with pytest.raises(CohortError, match="Other"):
        cf.bmi_glm(df, classes=["Black", "Other", "White"])


def test_xgboost_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "xgboost", None)
    with pytest.raises(ReadingRaceError, match="pip install xgboost-cpu"):
        cf.labels_models(cohort(80, 1), label_cols=LABELS, models=("xgboost",))


# ---------------------------------------------------------------------------------------- B1 / B2


def test_bmi_glm_matches_direct_statsmodels_fit():
    df = cohort(500, 2)
    res = cf.bmi_glm(df, n_bootstrap=NB)
    split = train_rows(df)
    coef = res["coefficients"].set_index(["model", "class", "term"])
    rec = df.assign(y=0.0, recorded=df["bmi"].notna().astype(float))
    for race in RACES:
        d = rec.assign(y=(rec["race"] == race).astype(float))
        direct = smf.glm("y ~ bmi", data=d[(split == "train") & d["bmi"].notna()],
                         family=sm.families.Binomial()).fit()
        assert coef.loc[("bmi_continuous", race, "bmi"), "coef"] == pytest.approx(direct.params["bmi"], rel=1e-6)
        assert coef.loc[("bmi_continuous", race, "const"), "coef"] == pytest.approx(
            direct.params["Intercept"], rel=1e-6)
        assert coef.loc[("bmi_continuous", race, "bmi"), "se"] == pytest.approx(direct.bse["bmi"], rel=1e-6)
        assert coef.loc[("bmi_continuous", race, "bmi"), "p"] == pytest.approx(direct.pvalues["bmi"], rel=1e-5)
        ind = smf.glm("y ~ recorded", data=d[split == "train"], family=sm.families.Binomial()).fit()
        assert coef.loc[("bmi_recorded", race, "bmi_recorded"), "coef"] == pytest.approx(
            ind.params["recorded"], rel=1e-6)
        # test AUC = sklearn's AUC of the same model's probabilities on the test rows with BMI
        test = d[(split == "test") & d["bmi"].notna()]
        auc = roc_auc_score(test["y"], direct.predict(test))
        row = res["auc_table"].set_index(["model", "class"]).loc[("bmi_continuous", race)]
        assert row["auc"] == pytest.approx(auc, abs=1e-9)
        assert row["auc_ci_low"] <= row["auc"] <= row["auc_ci_high"]
    # BMI planted: Black patients heavier -> BMI predicts Black above chance; recorded-indicator does not
    assert coef.loc[("bmi_continuous", "Black", "bmi"), "coef"] > 0
    assert coef.loc[("bmi_continuous", "Black", "bmi"), "p"] < 0.01
    assert res["split"]["test"]["patients"] == pytest.approx(150, abs=2)
    assert res["models"]["bmi_continuous"]["rows_dropped_missing"] == int(df["bmi"].isna().sum())


def test_binary_target_fits_one_glm_and_complements():
    df = cohort(300, 1)
    res = cf.bmi_glm(df, target="sex", n_bootstrap=NB)
    coef = res["coefficients"]
    assert set(coef["class"]) == {"M vs F"}
    pred = res["predictions"]
    np.testing.assert_allclose(pred["prob_F"] + pred["prob_M"], 1.0)
    assert set(res["auc_table"]["class"]) == {"F", "M"}  # no macro row for a binary target
    t = res["auc_table"].set_index(["model", "class"])
    assert t.loc[("bmi_continuous", "F"), "auc"] == pytest.approx(t.loc[("bmi_continuous", "M"), "auc"])


def test_bmi_recorded_everywhere_is_skipped_with_reason():
    df = cohort(200, 1)
    df["bmi"] = df["bmi"].fillna(24.0)
    res = cf.bmi_glm(df, n_bootstrap=NB)
    assert "single value" in res["models"]["bmi_recorded"]["skipped"]
    assert set(res["auc_table"]["model"]) == {"bmi_continuous"}


def test_density_logit_matches_statsmodels_categorical_and_ordinal():
    df = cohort(400, 1)
    res = cf.density_logit(df, n_bootstrap=NB)
    split = train_rows(df)
    coef = res["coefficients"].set_index(["model", "class", "term"])
    d = df.assign(y=(df["race"] == "White").astype(float))
    direct = smf.glm("y ~ C(density) + age", data=d[split == "train"], family=sm.families.Binomial()).fit()
    for lv in (2, 3, 4):
        assert coef.loc[("density_age", "White", f"density_{lv}"), "coef"] == pytest.approx(
            direct.params[f"C(density)[T.{lv}]"], rel=1e-6)
    assert coef.loc[("density_age", "White", "age"), "coef"] == pytest.approx(direct.params["age"], rel=1e-6)
    assert coef.loc[("density_age", "White", "age"), "p"] < 0.01  # planted: White patients older
    ordinal = cf.density_logit(df.assign(density=df["density"].map({1: "A", 2: "B", 3: "C", 4: "D"})),
                               coding="ordinal", n_bootstrap=NB)
    oc = ordinal["coefficients"].set_index(["model", "class", "term"])
    direct_o = smf.glm("y ~ density", data=d[split == "train"], family=sm.families.Binomial()).fit()
    assert oc.loc[("density", "White", "density"), "coef"] == pytest.approx(direct_o.params["density"], rel=1e-6)


# ---------------------------------------------------------------------------------------- B3


def test_encode_label_policies():
    df = pd.DataFrame({"A": [1, 0, -1, np.nan], "B": [np.nan, -1.0, 1.0, 0.0]})
    assert cf.encode_labels(df, ["A"], policy="ones")["A"].tolist() == [1, 0, 1, 0]
    assert cf.encode_labels(df, ["A"], policy="zeros")["A"].tolist() == [1, 0, 0, 0]
    assert cf.encode_labels(df, ["A"], policy="raw")["A"].tolist() == [1, 0, -1, 0]
    sep = cf.encode_labels(df, ["A", "B"], policy="separate")
    assert list(sep.columns) == ["A=1", "A=-1", "B=1", "B=-1"]
    assert sep["A=-1"].tolist() == [0, 0, 1, 0] and sep["B=1"].tolist() == [0, 0, 1, 0]


SMALL = {"xgboost": {"max_depth": [1, 3]}, "random_forest": {"max_depth": [2, 4]},
         "logistic_l1": {"C": [1e-5, 1e-2, 1.0]}}


def test_b3_null_labels_give_chance_auc_and_patient_disjoint_split():
    df = cohort(500, 2)
    res = cf.labels_models(df, label_cols=LABELS, grids={**SMALL, "random_forest": {"max_depth": [3]}},
                           n_folds=3, n_bootstrap=NB, level=0.99)  # 3 models: 99% CIs keep the test robust
    macro = res["auc_table"][res["auc_table"]["class"] == "macro"].set_index("model")
    assert set(macro.index) == set(cf.B3_MODELS)
    for model, row in macro.iterrows():
        assert row["auc_ci_low"] <= 0.5 <= row["auc_ci_high"], model
        assert abs(row["auc"] - 0.5) < 0.07, model
    a = res["assignment"]
    train_p = set(a.loc[a["split"] == "train", "patient_id"])
    test_p = set(a.loc[a["split"] == "test", "patient_id"])
    assert train_p and test_p and not train_p & test_p
    assert len(train_p) + len(test_p) == df["patient_id"].nunique()
    assert set(res["predictions"]["patient_id"]) == test_p
    assert len(res["predictions"]) == 3 * (a["split"] == "test").sum()  # every test row, per model


def test_b3_planted_dependence_gives_high_auc_and_grid_choice():
    df = cohort(400, 1, planted=True)
    res = cf.labels_models(df, label_cols=LABELS, models=("random_forest", "logistic_l1"),
                           grids=SMALL, n_folds=3, n_bootstrap=NB)
    t = res["auc_table"].set_index(["model", "class"])
    for model in ("random_forest", "logistic_l1"):
        assert t.loc[(model, "Black"), "auc"] > 0.85
        assert t.loc[(model, "Black"), "auc_ci_low"] > 0.75
        m = res["models"][model]
        (param, values), = SMALL[model].items()
        assert m["best_params"][param] in values
        assert [r[param] for r in m["cv"]] == values  # one CV score per grid point
        best = max(m["cv"], key=lambda r: r["mean_auc"])
        assert m["best_params"][param] == best[param]
        assert m["cv_best_auc"] == pytest.approx(best["mean_auc"])
    # strong L1 penalty (C = 1e-5) zeroes every weight: its CV AUC is exactly chance
    cv_l1 = {r["C"]: r["mean_auc"] for r in res["models"]["logistic_l1"]["cv"]}
    assert cv_l1[1e-5] == pytest.approx(0.5)
    assert res["models"]["logistic_l1"]["best_params"]["C"] > 1e-5
    coefs = res["models"]["logistic_l1"]["coefficients"]["Black"]
    assert max(coefs, key=lambda k: abs(coefs[k])) == "Cardiomegaly"


def test_b3_default_grids_are_the_papers_and_binary_target():
    assert cf.DEFAULT_GRIDS["random_forest"]["max_depth"] == [1, 2, 3, 4, 5, 6]
    assert cf.DEFAULT_GRIDS["xgboost"]["max_depth"] == [1, 2, 3, 4, 5, 6]
    cs = cf.DEFAULT_GRIDS["logistic_l1"]["C"]
    assert cs[0] == pytest.approx(1e-5) and cs[-1] == pytest.approx(10.0) and len(cs) == 13
    df = cohort(300, 1, planted=True)
    df["sex"] = np.where(df["Cardiomegaly"] == 1, "M", "F")  # sex decided by one label
    res = cf.labels_models(df, target="sex", label_cols=LABELS, models=("xgboost", "logistic_l1"),
                           n_folds=3, n_bootstrap=NB)
    for model in ("xgboost", "logistic_l1"):
        m = res["models"][model]
        (param, values), = cf.DEFAULT_GRIDS[model].items()
        assert m["grid"] == {param: values} and len(m["cv"]) == len(values)
        assert m["best_params"][param] in values
    t = res["auc_table"].set_index(["model", "class"])
    assert t.loc[("xgboost", "M"), "auc"] == pytest.approx(1.0)
    assert set(t.index.get_level_values("class")) == {"F", "M"}
    # a binary target's two one-vs-rest AUCs are one number: the report gives one row per model
    md = cf.confounders_markdown({"target": "sex", "analyses": {"b3": res}})
    rows = [line for line in md.splitlines() if line.startswith("| xgboost") or line.startswith("| logistic_l1")]
    assert len(rows) == 2 and all("| F vs M |" in r for r in rows)
    assert t.loc[("xgboost", "F"), "auc"] == pytest.approx(t.loc[("xgboost", "M"), "auc"])


def test_b3_uses_given_split_column():
    df = cohort(300, 1)
    split = train_rows(df)
    df["split"] = split.replace({"train": "val"}).where(df.index % 2 == 0, split)  # val rows train
    res = cf.labels_models(df, label_cols=LABELS, models=("logistic_l1",), grids=SMALL, n_folds=3,
                           split_col="split", n_bootstrap=NB)
    assert res["split"]["by"] == "split"
    assert res["split"]["test"]["rows"] == int((split == "test").sum())
    leaky = df.copy()
    leaky.loc[0, "split"] = "test"
    leaky.loc[1, ["patient_id", "split"]] = [leaky.loc[0, "patient_id"], "train"]
    with pytest.raises(ReadingRaceError, match="more than one split"):
        cf.labels_models(leaky, label_cols=LABELS, models=("logistic_l1",), split_col="split", n_bootstrap=NB)


# ---------------------------------------------------------------------------------------- chi-square


def test_chi_square_matches_scipy_on_hand_table():
    table = {("White", "<18.5"): 10, ("White", "18.5-25"): 50, ("White", ">=30"): 40,
             ("Black", "<18.5"): 5, ("Black", "18.5-25"): 15, ("Black", ">=30"): 45}
    rows = [{"race": r, "bmi_group": b} for (r, b), n in table.items() for _ in range(n)]
    df = pd.DataFrame(rows)
    df.loc[len(df)] = {"race": None, "bmi_group": "<18.5"}  # left out, counted
    res = cf.chi_square(df, attribute="race", stratum="bmi_group")
    ref = chi2_contingency(np.array([[5, 15, 45], [10, 50, 40]]))  # rows Black, White
    assert res["statistic"] == pytest.approx(ref.statistic)
    assert res["p"] == pytest.approx(ref.pvalue)
    assert res["dof"] == 2 and res["n"] == 165 and res["rows_missing"] == 1
    assert res["table"]["Black"] == {"<18.5": 5, "18.5-25": 15, ">=30": 45}  # BMI groups in order
    assert 0 < res["cramers_v"] < 1 and "warning" not in res


def test_chi_square_patients_unit_and_yates():
    df = pd.DataFrame({"patient_id": ["a", "a", "a", "b", "c", "d", "e", "f"],
                       "sex": ["F", "F", "F", "M", "M", "F", "M", "F"],
                       "view": ["AP", "PA", "AP", "PA", "AP", "PA", "PA", "AP"]})
    img = cf.chi_square(df, attribute="sex", stratum="view")
    pat = cf.chi_square(df, attribute="sex", stratum="view", unit="patients")
    assert img["n"] == 8 and pat["n"] == 6 and pat["patients_with_varying_stratum"] == 1
    assert pat["table"] == {"F": {"AP": 2, "PA": 1}, "M": {"AP": 1, "PA": 2}}
    ref = chi2_contingency(np.array([[2, 1], [1, 2]]), correction=True)
    assert pat["statistic"] == pytest.approx(ref.statistic) and pat["yates_correction"]
    assert "expected counts are below 5" in pat["warning"]
    with pytest.raises(ConfigError):
        cf.chi_square(df, attribute="sex", stratum="view", unit="studies")


# ---------------------------------------------------------------------------------------- dispatch


def test_run_and_write_confounders(tmp_path: Path):
    df = cohort(300, 1)
    spec = {"analyses": ["b1", "b3", "chi_square"], "target": "race", "label_cols": LABELS,
            "strata": ["bmi_group", "sex"], "models": ["logistic_l1"], "grids": SMALL, "n_folds": 3,
            "n_bootstrap": 50}
    res = cf.run_confounders(df, spec)
    assert set(res["analyses"]) == {"b1", "b3", "chi_square"}
    chi = res["analyses"]["chi_square"]
    assert [c["stratum"] for c in chi] == ["bmi_group", "sex"]
    assert chi[0]["n"] == int(df["bmi"].notna().sum())  # bmi_group derived from bmi
    paths = cf.write_confounders(res, tmp_path)
    text = paths["json"].read_text()
    assert "NaN" not in text
    data = json.loads(text)
    assert data["analyses"]["b3"]["models"]["logistic_l1"]["best_params"]["C"] in SMALL["logistic_l1"]["C"]
    assert len(data["analyses"]["b1"]["auc_table"]) == 2 * 4  # 2 models x (3 classes + macro)
    md = paths["markdown"].read_text()
    assert "## B1" in md and "## B3" in md and "## Chi-square: race by bmi_group (images)" in md
    assert (tmp_path / "b3_predictions.csv").exists() and (tmp_path / "b3_split.csv").exists()
    assert cf.to_jsonable({"x": float("nan"), "y": np.float32(1.5), "z": [np.inf]}) == {
        "x": None, "y": 1.5, "z": [None]}
    with pytest.raises(ConfigError, match="unknown confounder option"):
        cf.run_confounders(df, {"analyses": ["b1"], "bootstraps": 10})
    with pytest.raises(ConfigError, match="label_cols"):
        cf.run_confounders(df, {"analyses": ["b3"]})
    with pytest.raises(ConfigError, match="unknown analyses"):
        cf.run_confounders(df, {"analyses": ["b9"]})


# ---------------------------------------------------------------------------------------- real data

NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih-cxr14-sample" / "Data_Entry_2017_v2020.csv.gz"


@pytest.mark.shared_data
def test_real_nih_sex_from_findings_near_chance():
    if not NIH.exists():
        pytest.skip("shared NIH metadata not present")
    raw = pd.read_csv(NIH, usecols=["Image Index", "Finding Labels", "Patient ID", "Patient Gender"])
    raw = raw[raw["Patient ID"] < 2500]  # a few thousand images keep the test fast
    found = raw["Finding Labels"].str.get_dummies(sep="|")
    df = pd.DataFrame({"image_id": raw["Image Index"], "patient_id": raw["Patient ID"].astype(str),
                       "sex": raw["Patient Gender"]}).join(found.astype(float))
    labels = [c for c in found.columns]
    res = cf.labels_models(df, target="sex", label_cols=labels, models=("logistic_l1",),
                           grids={"logistic_l1": {"C": [1e-3, 1e-1, 10.0]}}, n_folds=3, n_bootstrap=NB)
    row = res["auc_table"].set_index("class").loc["M"]
    assert 0.4 < row["auc"] < 0.7  # findings say little about sex
    assert row["auc_ci_low"] < row["auc"] < row["auc_ci_high"]


def test_chi_square_skips_the_target_as_its_own_stratum():
    import numpy as np
    import pandas as pd

    from readingrace.stats.confounders import run_confounders

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"patient_id": [f"p{i}" for i in range(60)], "sex": rng.choice(["F", "M"], 60),
                       "view": rng.choice(["AP", "PA"], 60)})
    out = run_confounders(df, {"analyses": ["chi_square"], "target": "sex", "strata": ["view", "sex"]})
    assert [r["stratum"] for r in out["analyses"]["chi_square"]] == ["view"]

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from readingrace.errors import LeakageError, SplitError
from readingrace.split import check_no_leakage, split_patients


def cohort(n_patients=200, seed=0, classes=("A", "B", "C")):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        cls = classes[p % len(classes)]
        for k in range(rng.integers(1, 5)):
            rows.append({"image_id": f"{p}_{k}", "patient_id": f"p{p}", "race": cls})
    return pd.DataFrame(rows)


def test_patients_never_cross_splits_and_ratios_hold():
    df = cohort()
    s = split_patients(df, target="race", ratios=(0.6, 0.1, 0.3), seed=2021)
    per_patient = df.assign(split=s).groupby("patient_id")["split"].nunique()
    assert per_patient.max() == 1
    patients = df.assign(split=s).drop_duplicates("patient_id")["split"].value_counts()
    assert patients["train"] == 120 and patients["val"] == 20 and patients["test"] == 60


def test_stratified_on_the_target():
    df = cohort(300)
    s = split_patients(df, target="race", seed=1)
    first = df.assign(split=s).drop_duplicates("patient_id")
    tab = pd.crosstab(first["split"], first["race"])
    assert (tab.loc["test"] == 30).all() and (tab.loc["train"] == 60).all()


def test_reproducible_and_seed_dependent():
    df = cohort()
    a = split_patients(df, target="race", seed=2021)
    b = split_patients(df, target="race", seed=2021)
    c = split_patients(df, target="race", seed=7)
    assert a.equals(b) and not a.equals(c)


def test_stratifies_on_first_image_when_target_varies_within_patient():
    df = pd.DataFrame({"image_id": ["a", "b", "c", "d", "e", "f", "g", "h"],
                       "patient_id": ["1", "1", "2", "3", "4", "5", "6", "6"],
                       "age_group": ["20-40", "40-60", "20-40", "40-60", "20-40", "40-60", "20-40", "40-60"]})
    s = split_patients(df, target="age_group", ratios=(0.5, 0.5), seed=0, names=("train", "test"))
    assert s.groupby(df["patient_id"]).nunique().max() == 1


def test_leakage_check_fails_on_a_crafted_leaky_split():
    df = pd.DataFrame({"patient_id": ["p1", "p1", "p2"], "split": ["train", "test", "test"]})
    with pytest.raises(LeakageError, match="p1"):
        check_no_leakage(df)


def test_class_with_one_patient_is_a_clear_error():
    df = cohort(30)
    df.loc[df["patient_id"] == "p0", "race"] = "Rare"
    with pytest.raises(SplitError, match="'Rare'.*1 patient"):
        split_patients(df, target="race")


def test_bad_ratios():
    with pytest.raises(SplitError, match="summing to 1"):
        split_patients(cohort(), target="race", ratios=(0.5, 0.1, 0.1))


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(n_patients=st.integers(6, 60), n_classes=st.integers(2, 3), seed=st.integers(0, 10_000),
       max_images=st.integers(1, 6), shuffle=st.booleans())
def test_property_no_patient_in_two_splits(n_patients, n_classes, seed, max_images, shuffle):
    rng = np.random.default_rng(seed)
    pats = rng.integers(0, n_patients, size=n_patients * max_images)
    labels = {p: f"c{p % n_classes}" for p in range(n_patients)}
    df = pd.DataFrame({"patient_id": [f"p{p}" for p in pats], "race": [labels[p] for p in pats]})
    if shuffle:
        df = df.sample(frac=1, random_state=seed)
    try:
        s = split_patients(df, target="race", seed=seed)
    except SplitError:
        return  # too few patients per class for a stratified 3-way split: refused, never leaky
    assert df.assign(split=s).groupby("patient_id")["split"].nunique().max() == 1
    assert s.notna().all()

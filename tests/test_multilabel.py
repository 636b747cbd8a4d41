"""The pathology (multi-label) and re-identification models of A3 (readingrace.multilabel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from readingrace.config import AugmentConfig, TrainConfig
from readingrace.errors import CohortError, ConfigError, LeakageError
from readingrace.features import extract_features, load_user_model
from readingrace.multilabel import (
    REID_SPLIT_POLICY,
    MultiLabelClassifier,
    encode_targets,
    evaluate_multilabel,
    label_matrix,
    load_multilabel,
    masked_bce,
    pathology_split,
    predict_multilabel,
    reid_cohort,
    reid_split,
    train_multilabel,
    train_reid,
)
from readingrace.probe import run_probe
from readingrace.split import check_no_leakage

RAW = np.array([[1.0, 0.0, -1.0, np.nan]], dtype=np.float32)
FAST = TrainConfig(batch_size=16, max_epochs=2, early_stopping_patience=5, precision="32",
                   augment=AugmentConfig(flip=False, rotate=0, zoom=0))


@pytest.mark.parametrize(("policy", "targets", "mask"), [
    ("zeros", [1, 0, 0, 0], [1, 1, 1, 1]),
    ("ones", [1, 0, 1, 0], [1, 1, 1, 1]),
    ("ignore", [1, 0, 0, 0], [1, 1, 0, 0]),
])
def test_uncertain_label_policies(policy, targets, mask):
    t, m = encode_targets(RAW, policy)
    np.testing.assert_array_equal(t[0], targets)
    np.testing.assert_array_equal(m[0], mask)
    assert np.isfinite(t).all()


def test_unknown_policy():
    with pytest.raises(ConfigError, match="ignore"):
        encode_targets(RAW, "drop")


def test_masked_loss_ignores_uncertain_labels():
    raw = np.array([[1, 0, -1, np.nan], [-1, 1, 0, 1]], dtype=np.float32)
    t, m = encode_targets(raw, "ignore")
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.7], [1.5, 0.1, -0.4, -2.0]], requires_grad=True)
    loss = masked_bce(logits, torch.from_numpy(t), torch.from_numpy(m))
    loss.backward()
    grad = logits.grad.numpy()
    assert (grad[m == 0] == 0).all()                  # masked entries: no gradient at all
    assert (grad[m == 1] != 0).all()
    keep = m == 1
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.detach()[torch.from_numpy(keep)], torch.from_numpy(t[keep]))
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    # changing the logits of masked entries does not change the loss
    moved = logits.detach().clone()
    moved[torch.from_numpy(m == 0)] += 5.0
    assert float(masked_bce(moved, torch.from_numpy(t), torch.from_numpy(m))) == pytest.approx(float(loss.detach()), rel=1e-6)


def test_label_matrix_rejects_other_values():
    df = pd.DataFrame({"image_id": ["a", "b"], "Edema": [1.0, 2.0], "Mass": [0, None]})
    with pytest.raises(CohortError, match=r"'Edema', image 'b': value 2.0"):
        label_matrix(df, ["Edema", "Mass"])
    ok = label_matrix(df.assign(Edema=[1.0, -1.0]), ["Edema", "Mass"])
    np.testing.assert_array_equal(ok[:, 0], [1, -1])
    assert np.isnan(ok[1, 1])


def _multilabel_data(n: int = 96, size: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.random((n, size, size), dtype=np.float32) * 0.3
    values = rng.integers(0, 2, (n, 3)).astype(np.float32)
    images[values[:, 0] == 1, :8, :8] += 0.6          # label 0 is visible
    values[rng.random((n, 3)) < 0.1] = -1.0           # some uncertain entries
    cohort = pd.DataFrame({"image_id": [f"i{i}" for i in range(n)], "patient_id": [f"p{i // 2}" for i in range(n)]})
    return images, values, cohort


def test_train_multilabel_checkpoint_predict_and_features(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                       # a relative output folder must work too
    out = Path("pathology")
    images, values, cohort = _multilabel_data()
    split = pathology_split(cohort, seed=1)
    check_no_leakage(cohort.assign(split=split))
    assert (split.value_counts(normalize=True).round(1).to_dict() == {"train": 0.8, "val": 0.1, "test": 0.1})
    tr, va, te = (np.flatnonzero(split.to_numpy() == s) for s in ("train", "val", "test"))
    names = ["Edema", "Mass", "Nodule"]
    result = train_multilabel(images=images, values=values, train_index=tr, val_index=va, label_names=names,
                              arch="resnet-tiny", cfg=FAST, seed=3, out_dir=out, policy="ignore")
    assert result.epochs == 2 and np.isfinite(result.best_val_loss)
    model = load_multilabel(out / result.best_checkpoint)
    assert isinstance(model, MultiLabelClassifier) and model.hparams.policy == "ignore"
    probs = predict_multilabel(model, images, te)
    assert probs.shape == (len(te), 3) and ((probs > 0) & (probs < 1)).all()
    table = evaluate_multilabel(cohort.iloc[te], probs, values[te], names, n_bootstrap=50)
    assert table["label"].tolist() == names
    assert (table["n_positive"] + table["n_negative"] + table["n_uncertain_or_blank"] == len(te)).all()
    # the checkpoint is a model to probe: penultimate features through load_user_model
    loaded = load_user_model(out / result.best_checkpoint)
    assert isinstance(loaded, MultiLabelClassifier)
    assert extract_features(loaded, images, te).shape == (len(te), 128)
    # resume: a finished run is reported, not retrained
    again = train_multilabel(images=images, values=values, train_index=tr, val_index=va, label_names=names,
                             arch="resnet-tiny", cfg=FAST, seed=3, out_dir=out, policy="ignore")
    assert again.best_checkpoint == result.best_checkpoint


def test_label_without_certain_training_values_is_refused(tmp_path):
    images, values, _ = _multilabel_data(32)
    values[:, 1] = -1.0
    with pytest.raises(CohortError, match=r"\['Mass'\] have no usable"):
        train_multilabel(images=images, values=values, train_index=np.arange(24), val_index=np.arange(24, 32),
                         label_names=["Edema", "Mass", "Nodule"], arch="resnet-tiny", cfg=FAST, seed=0,
                         out_dir=tmp_path, policy="ignore")


# ---------------------------------------------------------------------------------------------
# re-identification
# ---------------------------------------------------------------------------------------------
def _reid_table() -> pd.DataFrame:
    rows = []
    for p, (n_frontal, n_lateral) in enumerate([(22, 3), (20, 0), (19, 5), (3, 0), (25, 1)]):
        for i in range(n_frontal + n_lateral):
            rows.append({"image_id": f"p{p}_{i}", "patient_id": f"p{p}", "view": "PA" if i < n_frontal else "LL",
                         "race": "Black" if p % 2 else "White"})
    return pd.DataFrame(rows)


def test_reid_cohort_counts_frontal_images_only():
    df = reid_cohort(_reid_table(), min_images=20)
    assert sorted(df["patient_id"].unique()) == ["p0", "p1", "p4"]      # p2 has 19 frontal + 5 lateral
    assert set(df["view"]) == {"PA"}
    with pytest.raises(CohortError, match="needs >= 2 patients"):
        reid_cohort(_reid_table(), min_images=23)


def test_reid_split_is_within_patient_and_marked():
    df = reid_cohort(_reid_table(), min_images=20)
    split = reid_split(df, seed=0)
    per_patient = df.assign(split=split).groupby("patient_id")["split"].nunique()
    assert (per_patient == 3).all()                                      # every identity in every part
    shares = split.value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.8, abs=0.03)
    with pytest.raises(LeakageError):                                    # it *is* a leak by the ordinary rule
        check_no_leakage(df.assign(split=split))


def test_train_reid_then_probe_excludes_its_patients(tmp_path):
    table = _reid_table()
    rng = np.random.default_rng(0)
    images = rng.random((len(table), 32, 32), dtype=np.float32)
    cfg = TrainConfig(batch_size=16, max_epochs=1, precision="32", augment=AugmentConfig(flip=False, rotate=0, zoom=0))
    res = train_reid(images=images, cohort=table, arch="resnet-tiny", cfg=cfg, seed=0, out_dir=tmp_path,
                     min_images=20)
    assert res.patients == ["p0", "p1", "p4"] and res.chance == pytest.approx(1 / 3)
    assert 0 <= res.test_top1_ci[0] <= res.test_top1 <= res.test_top1_ci[1] <= 1
    written = pd.read_csv(tmp_path / "reid_cohort.csv")
    assert set(written["split_policy"]) == {REID_SPLIT_POLICY}
    assert res.summary()["split_policy"] == REID_SPLIT_POLICY
    # the probe on its features: by default only patients it never saw
    feats = extract_features(load_user_model(res.checkpoint), images, np.arange(len(table)))
    cohort = pd.concat([table.assign(patient_id=table["patient_id"])] +
                       [pd.DataFrame({"image_id": [f"n{k}_{i}" for i in range(2)], "patient_id": f"n{k}",
                                      "view": "PA", "race": ["Black", "White"][k % 2]}) for k in range(30)],
                       ignore_index=True)
    extra = np.random.default_rng(1).normal(size=(60, feats.shape[1])).astype(np.float32)
    probe = run_probe(np.vstack([feats, extra]), cohort, target="race", reid_patients=res.patients,
                      n_bootstrap=0, probes=["softmax"])
    assert not set(probe.cohort["patient_id"]) & set(res.patients)
    assert probe.cohort["patient_id"].nunique() == 32                    # p2, p3 and the 30 new patients

"""Frozen features, user models, saved features and the probes (readingrace.features, readingrace.probe)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from readingrace.errors import CohortError, ConfigError, LeakageError, RunError
from readingrace.features import (
    extract_features,
    find_head,
    load_saved_features,
    load_user_model,
    save_features,
)
from readingrace.models import build_model
from readingrace.probe import compare_with_direct, linear_probe, logistic_probe, run_audit, run_probe
from readingrace.train import ImageClassifier

TESTS = Path(__file__).resolve().parent


def _images(n: int = 24, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size), dtype=np.float32)


def _trained_bn_model() -> torch.nn.Module:
    """resnet-tiny whose BatchNorm running statistics moved away from their defaults, in train mode."""
    torch.manual_seed(1)
    model = build_model("resnet-tiny", 2)
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 1, 32, 32) * 3 + 1)
    return model


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _cohort(n_patients: int, per_patient: int = 2, seed: int = 0, target: str = "sex") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    group = rng.choice(["F", "M"], n_patients)
    rows = [{"image_id": f"p{p:04d}_{i}", "patient_id": f"p{p:04d}", "study_id": f"p{p:04d}_{i}", target: group[p]}
            for p in range(n_patients) for i in range(per_patient)]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# frozen features
# ---------------------------------------------------------------------------------------------
def test_features_identical_twice_and_model_untouched():
    model = _trained_bn_model()
    model.layer1.eval()                       # a mixed state must be restored exactly
    before = _state(model)
    x = _images()
    a = extract_features(model, x, np.arange(24), batch_size=5)
    b = extract_features(model, x, np.arange(24), batch_size=7)
    assert a.shape == (24, 128) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():                # weights, BN running mean/var and batch counters
        assert torch.equal(v, after[k]), k
    assert model.training and not model.layer1.training and model.layer2.training
    # in eval mode: the same as the network's own pooled output (running statistics, not batch ones)
    model.eval()
    with torch.no_grad():
        manual = []
        model.fc.register_forward_hook(lambda m, i, o: manual.append(i[0]))
        model(torch.from_numpy(x[:3]).unsqueeze(1))
    np.testing.assert_allclose(a[:3], manual[0].numpy(), rtol=1e-5, atol=1e-6)


def test_named_layer_pooled_and_penultimate_agree():
    model = _trained_bn_model()
    x = _images(6)
    pen = extract_features(model, x, np.arange(6))
    np.testing.assert_allclose(extract_features(model, x, np.arange(6), layer="avgpool"), pen, atol=1e-6)
    np.testing.assert_allclose(extract_features(model, x, np.arange(6), layer="layer4"), pen, atol=1e-5)
    early = extract_features(model, x, np.arange(6), layer="layer1")
    assert early.shape == (6, 16)


def test_unknown_layer_is_a_clear_error():
    model = build_model("resnet-tiny", 2)
    with pytest.raises(ConfigError, match=r"layer 'layer5' is not a submodule.*layer4"):
        extract_features(model, _images(2), [0, 1], layer="layer5")


def test_head_found_inside_lightning_module():
    model = ImageClassifier("resnet-tiny", 3)
    assert find_head(model)[0] == "net.fc"
    assert extract_features(model, _images(4), np.arange(4)).shape == (4, 128)


def test_user_module_and_user_function(tmp_path):
    model = load_user_model("probe_helpers:make_model", app_dir=TESTS)
    assert isinstance(model, torch.nn.Module)
    assert find_head(model)[0] == "head"          # last nn.Linear
    x = _images(5)
    pen = extract_features(model, x, np.arange(5))
    assert pen.shape == (5, 6)
    np.testing.assert_allclose(extract_features(model, x, np.arange(5), layer="pool"), pen, atol=1e-6)
    assert extract_features(model, x, np.arange(5), layer="body.0").shape == (5, 6)
    fn = load_user_model("probe_helpers:make_feature_fn", app_dir=TESTS)
    feats = extract_features(fn, x, [4, 0], batch_size=1)
    np.testing.assert_allclose(feats[:, 0], [x[4].mean(), x[0].mean()], rtol=1e-5)
    with pytest.raises(ConfigError, match="needs a PyTorch module"):
        extract_features(fn, x, [0], layer="pool")
    with pytest.raises(ConfigError, match="returned int"):
        load_user_model("probe_helpers:make_nothing", app_dir=TESTS)
    with pytest.raises(ConfigError, match="has no attribute"):
        load_user_model("probe_helpers:missing", app_dir=TESTS)
    with pytest.raises(ConfigError, match="cannot import"):
        load_user_model("no_such_pkg_xyz.mod:make", app_dir=TESTS)
    with pytest.raises(ConfigError, match="neither a checkpoint"):
        load_user_model("just-a-name")


def test_checkpoints_weights_only(tmp_path):
    src = build_model("resnet-tiny", 3).eval()
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "w.pt")
    with pytest.raises(ConfigError, match="--arch"):
        load_user_model(tmp_path / "w.pt")
    loaded = load_user_model(tmp_path / "w.pt", arch="resnet-tiny")
    x = _images(3)
    np.testing.assert_array_equal(extract_features(loaded, x, np.arange(3)), extract_features(src, x, np.arange(3)))
    with pytest.raises(ConfigError, match="do not fit"):
        load_user_model(tmp_path / "w.pt", arch="resnet18")
    torch.save(src, tmp_path / "pickled.pt")     # a whole pickled module: never unpickled
    with pytest.raises(ConfigError, match="weights only"):
        load_user_model(tmp_path / "pickled.pt", arch="resnet-tiny")
    clf = ImageClassifier("resnet-tiny", 2)
    torch.save({"hyper_parameters": dict(clf.hparams), "state_dict": clf.state_dict()}, tmp_path / "m.ckpt")
    back = load_user_model(tmp_path / "m.ckpt")
    assert isinstance(back, ImageClassifier)
    np.testing.assert_array_equal(extract_features(back, x, [0, 1]), extract_features(clf, x, [0, 1]))
    with pytest.raises(ConfigError, match="not found"):
        load_user_model(tmp_path / "absent.ckpt")


# ---------------------------------------------------------------------------------------------
# saved features
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".npy", ".npz", ".parquet", ".csv"])
def test_saved_features_aligned_by_image_id(tmp_path, suffix):
    ids = [f"img{i}" for i in range(6)]
    feats = np.arange(18, dtype=np.float32).reshape(6, 3)
    order = [3, 0, 5, 1, 4, 2]
    path = save_features(tmp_path / f"f{suffix}", feats[order], [ids[i] for i in order])
    wanted = ["img2", "img0", "img5"]
    got = load_saved_features(path, wanted)
    np.testing.assert_array_equal(got, feats[[2, 0, 5]])
    with pytest.raises(CohortError, match=r"2 of 3 cohort images have no features \(e.g. 'x1'\)"):
        load_saved_features(path, ["img1", "x1", "x2"])


def test_saved_features_errors(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(CohortError, match=r"a.ids.txt"):
        load_saved_features(tmp_path / "a.npy", ["x"])
    (tmp_path / "a.ids.txt").write_text("x\ny\nx\n")
    with pytest.raises(CohortError, match="'x' appears more than once"):
        load_saved_features(tmp_path / "a.npy", ["x"])
    (tmp_path / "a.ids.txt").write_text("x\ny\n")
    with pytest.raises(CohortError, match="3 feature rows but 2 image ids"):
        load_saved_features(tmp_path / "a.npy", ["x"])
    pd.DataFrame({"image_id": ["a", "b"], "f0": [1.0, np.nan]}).to_parquet(tmp_path / "n.parquet")
    with pytest.raises(CohortError, match="NaN or infinite.*'b'"):
        load_saved_features(tmp_path / "n.parquet", ["a", "b"])
    pd.DataFrame({"image_id": ["a"], "f0": [1.0], "note": ["x"]}).to_parquet(tmp_path / "s.parquet")
    with pytest.raises(CohortError, match="'note' is not numeric"):
        load_saved_features(tmp_path / "s.parquet", ["a"])


# ---------------------------------------------------------------------------------------------
# probes
# ---------------------------------------------------------------------------------------------
def _features(cohort: pd.DataFrame, *, signal: float, dim: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(cohort), dim)).astype(np.float32)
    x[:, :2] += signal * (cohort["sex"].to_numpy() == "M")[:, None]
    return x


def test_probe_on_noise_stays_at_chance():
    cohort = _cohort(300)
    res = run_probe(_features(cohort, signal=0.0), cohort, target="sex", n_bootstrap=300)
    for name in ("softmax", "logistic"):
        lo, hi = res.metrics[name]["macro_auc_ci"]
        assert lo < 0.5 < hi, (name, res.metrics[name]["macro_auc"], lo, hi)
        assert hi - lo < 0.3
    assert res.info["split_policy"] == "patient-disjoint"
    assert res.metrics["logistic"]["probe"]["splitter"].startswith("StratifiedGroupKFold")


def test_probe_finds_planted_signal():
    cohort = _cohort(200)
    res = run_probe(_features(cohort, signal=2.0), cohort, target="sex", n_bootstrap=200)
    for name in ("softmax", "logistic"):
        assert res.metrics[name]["macro_auc"] > 0.9, name
        assert res.metrics[name]["macro_auc_ci"][0] > 0.8
    table = res.auc_table()
    assert set(table["model"]) == {"softmax", "logistic"} and len(table) == 6
    pred = res.predictions["softmax"]
    np.testing.assert_allclose(pred[["prob_F", "prob_M"]].sum(axis=1), 1.0, atol=1e-6)
    test_patients = set(pred["patient_id"])
    train_patients = set(res.cohort.loc[res.cohort["split"] == "train", "patient_id"])
    assert test_patients and not (test_patients & train_patients)


def test_linear_probe_is_deterministic_and_leaves_global_rng_alone():
    cohort = _cohort(60)
    x = _features(cohort, signal=1.0)
    y = (cohort["sex"] == "M").to_numpy().astype(int)
    idx = dict(train_index=np.arange(0, 80), val_index=np.arange(80, 100), test_index=np.arange(100, 120))
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    p1, d1 = linear_probe(x, y, classes=["F", "M"], **idx)
    assert torch.equal(torch.rand(1), expected_next)
    p2, _ = linear_probe(x, y, classes=["F", "M"], **idx)
    np.testing.assert_array_equal(p1, p2)
    assert p1.shape == (20, 2) and 1 <= d1["best_epoch"] <= d1["epochs_run"]


def test_logistic_probe_folds_never_split_a_patient():
    cohort = _cohort(40, per_patient=3)
    x = _features(cohort, signal=1.5)
    y = (cohort["sex"] == "M").to_numpy().astype(int)
    probs, d = logistic_probe(x, y, cohort["patient_id"].to_numpy(), train_index=np.arange(90),
                              test_index=np.arange(90, 120), Cs=[0.01, 1.0], n_folds=3)
    assert probs.shape == (30, 2) and d["n_folds"] == 3 and d["C"] in (0.01, 1.0)
    assert len(d["cv"]) == 2


def test_leaky_split_is_refused():
    cohort = _cohort(50)
    split = pd.Series(np.where(np.arange(100) % 2 == 0, "train", "test"))   # both images of a patient split apart
    split.iloc[:10] = "val"
    with pytest.raises(LeakageError):
        run_probe(_features(cohort, signal=0.0), cohort, target="sex", split=split, n_bootstrap=0)


def test_reid_patients_excluded_by_default_and_paper_variant_flagged():
    cohort = _cohort(120)
    x = _features(cohort, signal=1.0)
    reid = {f"p{p:04d}" for p in range(40)}
    res = run_probe(x, cohort, target="sex", reid_patients=reid, n_bootstrap=0, probes=["softmax"])
    assert not set(res.cohort["patient_id"]) & reid
    assert res.cohort["patient_id"].nunique() == 80 and res.info["reid_patients_excluded"] == 40
    assert res.info["flags"] == []
    paper = run_probe(x, cohort, target="sex", reid_patients=reid, reid_variant="paper", n_bootstrap=0,
                      probes=["softmax"])
    assert set(paper.cohort["patient_id"]) == reid
    assert any("PAPER VARIANT" in f for f in paper.info["flags"])


def test_state_dict_unchanged_after_probing_and_audit_report(tmp_path):
    torch.manual_seed(0)
    clf = ImageClassifier("resnet-tiny", 2)
    clf.train()
    with torch.no_grad():
        clf(torch.rand(4, 1, 32, 32))          # move the BN statistics off their defaults
    torch.save({"hyper_parameters": dict(clf.hparams), "state_dict": clf.state_dict()}, tmp_path / "m.ckpt")
    cohort = _cohort(60)
    images = _images(len(cohort), size=32, seed=3)
    model = load_user_model(tmp_path / "m.ckpt")
    before = _state(model)
    feats = extract_features(model, images, np.arange(len(cohort)))
    run_probe(feats, cohort, target="sex", n_bootstrap=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the audit: saved features and a direct model's predictions for the comparison
    save_features(tmp_path / "feats.parquet", feats, cohort["image_id"])
    direct = run_probe(_features(cohort, signal=1.0), cohort, target="sex", n_bootstrap=0, probes=["logistic"])
    direct.predictions["logistic"].to_csv(tmp_path / "direct.csv", index=False)
    report = run_audit(images=images, cohort=cohort, out_dir=tmp_path / "audit", targets=["sex"],
                       features=tmp_path / "feats.parquet", direct_predictions={"sex": tmp_path / "direct.csv"},
                       n_bootstrap=100, say=lambda m: None)
    comp = report["targets"]["sex"]["comparison"]["softmax"]
    assert comp["n_shared"] == len(direct.predictions["logistic"])      # same split, same test images
    assert comp["macro_difference"] == pytest.approx(comp["macro_auc_a"] - comp["macro_auc_b"])
    md = (tmp_path / "audit" / "probe.md").read_text()
    assert "probe: softmax" in md and "trained directly" in md
    # two classes: one AUC column (both one-vs-rest AUCs and their mean are the same number)
    soft = report["targets"]["sex"]["probes"]["softmax"]
    assert "| model | AUC (F vs M) | test images (patients) |" in md and "macro AUC |" not in md
    lo, hi = soft["macro_auc_ci"]
    assert f"| probe: softmax | {soft['macro_auc']:.3f} [{lo:.3f}, {hi:.3f}] | " in md
    assert json.loads((tmp_path / "audit" / "probe.json").read_text())["n_features"] == 128
    with pytest.raises(ConfigError, match="exactly one"):
        run_audit(images=images, cohort=cohort, out_dir=tmp_path / "x", targets=["sex"], say=lambda m: None)
    # a layer that does not exist: a clear error and no output folder left behind
    with pytest.raises(ConfigError, match="layer 'layer9' is not a submodule"):
        run_audit(images=images, cohort=cohort, out_dir=tmp_path / "bad", targets=["sex"], model=str(tmp_path / "m.ckpt"),
                  layer="layer9", n_bootstrap=0, say=lambda m: None)
    assert not (tmp_path / "bad").exists()
    # the same audit again into its own folder is fine; a folder of other files is refused untouched
    run_audit(images=images, cohort=cohort, out_dir=tmp_path / "audit", targets=["sex"],
              features=tmp_path / "feats.parquet", n_bootstrap=0, say=lambda m: None)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("mine")
    with pytest.raises(RunError, match="not from a readingrace run"):
        run_audit(images=images, cohort=cohort, out_dir=tmp_path / "mine", targets=["sex"],
                  features=tmp_path / "feats.parquet", n_bootstrap=0, say=lambda m: None)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.md"]


def test_continuous_target_is_refused():
    cohort = _cohort(40).assign(age=np.arange(80) / 2)
    with pytest.raises(ConfigError, match="age_group"):
        run_probe(_features(cohort, signal=0.0), cohort, target="age", n_bootstrap=0)


def test_compare_without_shared_images_says_so():
    cohort = _cohort(80)
    res = run_probe(_features(cohort, signal=1.0), cohort, target="sex", n_bootstrap=0, probes=["softmax"])
    other = res.predictions["softmax"].assign(image_id=lambda d: "other-" + d["image_id"])
    out = compare_with_direct(res, other, n_bootstrap=0)
    assert out["softmax"]["n_shared"] == 0 and "no shared test images" in out["softmax"]["note"]


# ---------------------------------------------------------------------------------------------
# which patients the audit tests on
# ---------------------------------------------------------------------------------------------
def _save_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    clf = ImageClassifier("resnet-tiny", 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": dict(clf.hparams), "state_dict": clf.state_dict()}, path)
    return path


def _two_target_cohort(n_patients: int) -> pd.DataFrame:
    cohort = _cohort(n_patients)
    ages = np.random.default_rng(5).choice(["20-40", "60-80"], n_patients)
    return cohort.assign(age_group=[ages[int(p[1:])] for p in cohort["patient_id"]])


def test_audit_of_a_run_checkpoint_tests_only_on_the_runs_test_patients(tmp_path):
    from readingrace.split import split_patients

    cohort = _two_target_cohort(90)
    run_cohort = cohort[cohort["patient_id"] < "p0080"].copy()          # p0080..p0089: outside the run
    run_cohort["split"] = split_patients(run_cohort, target="sex", ratios=(0.6, 0.1, 0.3), seed=7)
    (tmp_path / "run").mkdir()
    run_cohort.to_csv(tmp_path / "run" / "cohort.csv", index=False)
    (tmp_path / "run" / "config.yaml").write_text("fingerprint: 0123456789abcdef\n")  # a readingrace run folder
    ckpt = _save_checkpoint(tmp_path / "run" / "seed-2021" / "checkpoints" / "best.ckpt")
    report = run_audit(images=_images(len(cohort), size=32), cohort=cohort, out_dir=tmp_path / "audit",
                       targets=["age_group"], model=str(ckpt), probes=("softmax",), n_bootstrap=0,
                       say=lambda m: None)
    assert report["feature_model_patients"] == "run-split"
    assert report["feature_model_run"] == str((tmp_path / "run").resolve()) and report["rows_outside_run"] == 20
    seen = set(run_cohort.loc[run_cohort["split"] != "test", "patient_id"])
    run_test = set(run_cohort.loc[run_cohort["split"] == "test", "patient_id"])
    tested = set(pd.read_csv(tmp_path / "audit" / "probe-age_group" / "predictions_softmax.csv",
                             dtype={"patient_id": str})["patient_id"])
    assert tested == run_test and not tested & seen                       # a target other than the run's
    entry = report["targets"]["age_group"]
    assert entry["split_counts"]["test"] == {"images": 2 * len(run_test), "patients": len(run_test)}
    test_ages = run_cohort.loc[run_cohort["split"] == "test", "age_group"]
    assert entry["class_counts"]["test"] == {c: int((test_ages == c).sum()) for c in ("20-40", "60-80")}
    assert "the feature model's run split" in entry["split_source"] and entry["flags"] == []
    md = (tmp_path / "audit" / "probe.md").read_text()
    assert "`run-split`" in md and "images per class: train 20-40" in md
    other = cohort.assign(patient_id="x" + cohort["patient_id"])  # another site: the model saw none of them
    report = run_audit(images=_images(len(cohort), size=32), cohort=other, out_dir=tmp_path / "other",
                       targets=["sex"], model=str(ckpt), probes=("softmax",), n_bootstrap=0, say=lambda m: None)
    assert report["feature_model_patients"] == "none-in-run" and report["rows_outside_run"] == 0
    entry = report["targets"]["sex"]
    assert "the model saw none of them" in entry["feature_model_patients_note"] and entry["flags"] == []
    assert sum(v["patients"] for v in entry["split_counts"].values()) == 90   # every patient used, once


def test_a_run_split_without_validation_images_of_the_cohort_says_so(tmp_path):
    """A cohort none of whose images is in the run's validation split: the error gives the counts per split
    and what to do, not "ratios with 3 parts"."""
    from readingrace.errors import SplitError

    cohort = _two_target_cohort(40)
    run_cohort = cohort.assign(split=np.where(cohort["patient_id"] < "p0030", "train", "test"))
    run_cohort.loc[run_cohort["patient_id"] >= "p0036", "split"] = "val"
    (tmp_path / "run").mkdir()
    run_cohort.to_csv(tmp_path / "run" / "cohort.csv", index=False)
    (tmp_path / "run" / "config.yaml").write_text("fingerprint: 0123456789abcdef\n")  # a readingrace run folder
    ckpt = _save_checkpoint(tmp_path / "run" / "seed-2021" / "checkpoints" / "best.ckpt")
    site = pd.concat([cohort[cohort["patient_id"] < "p0036"],
                      cohort.head(4).assign(patient_id="x", image_id=lambda d: "x" + d["image_id"])])
    with pytest.raises(SplitError, match=r"run \(.*run\) has no val image of this cohort: of its images, 60 in the "
                                         r"run's train, 0 in the run's val, 12 in the run's test, 4 outside the run\. "
                                         r".*copy the checkpoint out of the run folder"):
        run_audit(images=_images(len(site), size=32), cohort=site, out_dir=tmp_path / "audit", targets=["sex"],
                  model=str(ckpt), n_bootstrap=0, say=lambda m: None)
    report = run_audit(images=_images(len(site), size=32), cohort=site, out_dir=tmp_path / "logistic",
                       targets=["sex"], model=str(ckpt), probes=("logistic",), n_bootstrap=0, say=lambda m: None)
    assert report["targets"]["sex"]["split_counts"]["val"]["images"] == 0   # the logistic probe needs no val split
    with pytest.raises(SplitError, match=r"validation split is empty \(images per split: train 60, val 0, test 12"):
        run_probe(_features(cohort.head(72), signal=0.0), cohort.head(72), target="sex",
                  split=run_cohort["split"].head(72), n_bootstrap=0)


def test_audit_of_a_users_model_says_its_patients_are_unknown_or_excludes_them(tmp_path):
    from readingrace.probe import read_patient_list

    cohort = _two_target_cohort(60)
    images = _images(len(cohort), size=32)
    ckpt = _save_checkpoint(tmp_path / "mine.ckpt")                      # no run folder around it
    report = run_audit(images=images, cohort=cohort, out_dir=tmp_path / "a", targets=["age_group"], model=str(ckpt),
                       probes=("softmax",), n_bootstrap=0, say=lambda m: None)
    assert report["feature_model_patients"] == "unknown" and report["feature_model_run"] is None
    assert any("cannot know which patients" in f for f in report["targets"]["age_group"]["flags"])
    assert "**flag**: the probe cannot know which patients" in (tmp_path / "a" / "probe.md").read_text()
    pd.DataFrame({"patient_id": [f"p{p:04d}" for p in range(20)] + ["elsewhere"]}).to_csv(tmp_path / "seen.csv",
                                                                                          index=False)
    excluded = read_patient_list(tmp_path / "seen.csv")
    said: list[str] = []
    report = run_audit(images=images, cohort=cohort, out_dir=tmp_path / "b", targets=["age_group"], model=str(ckpt),
                       exclude_patients=excluded, probes=("softmax",), n_bootstrap=0, say=said.append)
    entry = report["targets"]["age_group"]
    assert report["feature_model_patients"] == "excluded-by-user"
    assert entry["excluded_patients"] == {"listed": 21, "in_cohort": 20, "images": 40, "not_in_cohort": 1,
                                          "not_in_cohort_examples": ["elsewhere"]}
    assert sum(c["patients"] for c in entry["split_counts"].values()) == 40
    md = (tmp_path / "b" / "probe.md").read_text()
    assert "left out: 20 patient(s), 40 image(s), of the 21 patient(s) listed as excluded; 1 listed id(s) match no " \
           "patient of the cohort (e.g. 'elsewhere')" in md
    # only some listed ids match: flagged in the report and said on the console
    assert entry["flags"] == [md.split("**flag**: ")[1].splitlines()[0]]
    assert entry["flags"][0].startswith("1 of the 21 patient id(s) listed as excluded match no patient")
    assert "excluded patients: 20 of the 21 listed are in the cohort (40 image(s) left out); 1 match no cohort " \
           "patient (e.g. 'elsewhere'; cohort ids such as 'p0000')" in said[0]
    # none matches (the ids written zero-padded, say): an error naming an id from each side, before any work
    with pytest.raises(CohortError, match=r"none of the 3 patient id\(s\) listed as excluded matches one of the "
                                          r"cohort's 60 patients \(listed e.g. '00p0000', cohort e.g. 'p0000'\)"):
        run_audit(images=images, cohort=cohort, out_dir=tmp_path / "c", targets=["age_group"], model=str(ckpt),
                  exclude_patients={"00p0000", "00p0001", "00p0002"}, n_bootstrap=0, say=lambda m: None)
    assert not (tmp_path / "c").exists()
    with pytest.raises(CohortError, match="none of the 1 patient id"):
        run_probe(_features(cohort, signal=0.0), cohort, target="sex", exclude_patients=["61"], n_bootstrap=0)
    pd.DataFrame({"id": ["p1"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(CohortError, match="needs a patient_id column"):
        read_patient_list(tmp_path / "bad.csv")


def test_probe_cli_prepares_images_as_the_checkpoints_run_did(tmp_path, capsys):
    from readingrace.cli import _use_run_preprocessing
    from readingrace.config import config_from_dict

    run = tmp_path / "run"
    (run / "seed-2021" / "checkpoints").mkdir(parents=True)
    pd.DataFrame({"patient_id": ["p1", "p2", "p3"], "split": ["train", "val", "test"]}).to_csv(run / "cohort.csv")
    (run / "config.yaml").write_text("fingerprint: 0123456789abcdef\nimage: {size: 96, mode: pad}\n")
    ckpt = run / "seed-2021" / "checkpoints" / "best.ckpt"
    ckpt.write_bytes(b"x")
    cfg = config_from_dict({"image": {"size": 64}})
    _use_run_preprocessing(cfg, str(ckpt))
    assert (cfg.image.size, cfg.image.mode) == (96, "pad")
    assert "size 96 (the --cohort config: 64), mode pad (the --cohort config: stretch)" in capsys.readouterr().err
    other = config_from_dict({"image": {"size": 64}})
    _use_run_preprocessing(other, str(tmp_path / "elsewhere.ckpt"))  # not a run's checkpoint: unchanged
    assert other.image.size == 64


def test_only_a_readingrace_run_folder_vouches_for_the_models_patients(tmp_path):
    from readingrace.probe import run_folder_of

    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"x")
    (tmp_path / "cohort.csv").write_text("")                         # empty: not a run, no traceback
    (tmp_path / "config.yaml").write_text("fingerprint: abc\n")
    assert run_folder_of(ckpt) is None
    (tmp_path / "cohort.csv").write_text("patient_id,split\np1,train\n")
    (tmp_path / "config.yaml").write_text("my: notes\n")             # a user's split file and notes
    assert run_folder_of(ckpt) is None
    (tmp_path / "config.yaml").write_text("fingerprint: abc\n")
    assert run_folder_of(ckpt) == tmp_path.resolve()


def test_run_split_matches_patients_within_their_dataset(tmp_path):
    from readingrace.probe import run_patient_split

    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame({"patient_id": ["1", "2"], "dataset": "nih", "split": ["train", "test"]}).to_csv(
        run / "cohort.csv", index=False)
    same_site = pd.DataFrame({"patient_id": ["1", "2", "3"], "dataset": "nih"})
    assert run_patient_split(run, same_site).tolist()[:2] == ["train", "test"]
    other_site = pd.DataFrame({"patient_id": ["1", "2", "3"], "dataset": "siteB"})  # patient "1" elsewhere
    assert run_patient_split(run, other_site).isna().all()
    # the run's own dataset with ids written differently: refused, not taken for unseen patients
    cohort = _two_target_cohort(30).assign(dataset="nih")
    (run / "config.yaml").write_text("fingerprint: 0123456789abcdef\n")
    ckpt = _save_checkpoint(run / "seed-2021" / "checkpoints" / "best.ckpt")
    with pytest.raises(CohortError, match="although both hold dataset 'nih': the ids are written differently"):
        run_audit(images=_images(len(cohort), size=32), cohort=cohort, out_dir=tmp_path / "a", targets=["sex"],
                  model=str(ckpt), probes=("logistic",), n_bootstrap=0, say=lambda m: None)

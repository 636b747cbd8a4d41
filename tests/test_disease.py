"""`readingrace disease`: a disease model and its subgroup performance, end to end on a tiny generated cohort."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from sklearn.metrics import roc_auc_score

from readingrace.cli import main
from readingrace.config import ExperimentConfig, _non_default, config_from_dict
from readingrace.errors import CohortError, ConfigError, RunError
from readingrace.experiments.disease import DISEASE_OUTPUTS, disease_labels, run_disease
from readingrace.stats.metrics import youden_threshold

NF = "No Finding"


def _cohort(root, *, n_patients: int = 90, size: int = 32, seed: int = 0) -> None:
    """PNG images with planted findings: Effusion a bright disc, Mass a dark square; No Finding = neither."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    rows = []
    for p in range(n_patients):
        sex = "F" if p % 2 else "M"
        for k in range(int(rng.integers(1, 3))):
            img = rng.normal(0.45, 0.08, (size, size))
            effusion, mass = int(rng.random() < 0.4), int(rng.random() < 0.3)
            if effusion:
                img[(yy - size * 0.7) ** 2 + (xx - size * 0.3) ** 2 < (size / 6) ** 2] += 0.4
            if mass:
                img[size // 5: size // 5 + size // 5, size // 2: size // 2 + size // 5] -= 0.35
            name = f"img/pid-{p:04d}-{k}.png"
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / name)
            rows.append({"path": name, "patient_id": f"pid-{p:04d}", "sex": sex,
                         "age": int(rng.integers(25, 79)), "Effusion": effusion, "Mass": mass,
                         NF: int(not (effusion or mass))})
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)


def _config(**disease) -> dict:
    return {
        "name": "disease-test",
        "cohort": {"source": "csv", "target": "sex", "min_prevalence": 0, "options": {"csv": "cohort.csv"}},
        "split": {"ratios": [0.5, 0.2, 0.3], "seed": 3},
        "image": {"size": 32},
        "model": {"name": "resnet-tiny"},
        "train": {"batch_size": 16, "max_epochs": 3, "early_stopping_patience": 5, "precision": "32",
                  "num_threads": 1, "augment": {"flip": False, "rotate": 0, "zoom": 0}},
        "evaluate": {"n_bootstrap": 100},
        "disease": {"labels": ["Effusion", "Mass", NF], "groups": ["sex", "age_group", "race"], **disease},
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    _cohort(data)
    run_dir = tmp_path_factory.mktemp("run")
    messages: list[str] = []
    metrics = run_disease(config_from_dict(_config()), out=run_dir, data_root=data, say=messages.append)
    return data, run_dir, metrics, messages


def test_run_writes_every_file_and_consistent_numbers(finished):
    _data, run_dir, m, messages = finished
    for name in DISEASE_OUTPUTS:
        assert (run_dir / name).is_file(), name
    for attr in ("sex", "age_group"):
        assert (run_dir / f"subgroups_{attr}.png").stat().st_size > 5000
    assert (run_dir / "model" / "train_result.json").is_file()
    on_disk = json.loads((run_dir / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert on_disk["schema"] == m["schema"] == "readingrace.disease/1"
    assert on_disk["groups"] == ["sex", "age_group"]
    assert on_disk["groups_skipped"] == [
        {"group": "race", "reason": "column(s) ['race'] not recorded for any test image"}]
    test = pd.read_csv(run_dir / "predictions.csv", dtype={"patient_id": str})
    val = pd.read_csv(run_dir / "val_predictions.csv", dtype={"patient_id": str})
    assert not set(test["patient_id"]) & set(val["patient_id"])
    assert set(test["split"]) == {"test"} and set(val["split"]) == {"val"}
    assert len(test) == m["split"]["images"]["test"]
    # per-finding AUC is the plain AUC of the written predictions
    for rec in m["per_finding"]:
        f = rec["label"]
        assert rec["auc"] == pytest.approx(roc_auc_score(test[f"label_{f}"], test[f"prob_{f}"]))
    # thresholds were chosen on the validation predictions, by Youden's J, and used on test
    for f in ("Effusion", "Mass", NF):
        assert m["thresholds"][f] == pytest.approx(youden_threshold(val[f"label_{f}"] == 1, val[f"prob_{f}"]))
    rows = pd.read_csv(run_dir / "subgroups.csv")
    t_nf = m["thresholds"][NF]
    for sex, part in test.groupby("sex"):
        sick = part[part[f"label_{NF}"] == 0]
        r = rows[(rows["attribute"] == "sex") & (rows["group"] == sex) & (rows["metric"] == "underdiagnosis_rate")]
        assert r["estimate"].iloc[0] == pytest.approx((sick[f"prob_{NF}"] >= t_nf).mean())
        tpr = rows[(rows["attribute"] == "sex") & (rows["group"] == sex) & (rows["metric"] == "tpr")
                   & (rows["finding"] == "Effusion")]
        y, p = part["label_Effusion"], part["prob_Effusion"]
        assert tpr["estimate"].iloc[0] == pytest.approx((p[y == 1] >= m["thresholds"]["Effusion"]).mean())
    report = (run_dir / "report.md").read_text()
    for needle in ("Per-finding test AUC", "Underdiagnosis rate", "By sex", "By age_group", "subgroups_sex.png",
                   "Groups not reported: race"):
        assert needle in report, needle
    assert "pid-" not in report and "pid-" not in (run_dir / "subgroups.md").read_text()
    assert any("underdiagnosis sex=F" in s for s in messages)


def test_rerun_reuses_results_and_foreign_folders_are_refused(finished, tmp_path):
    data, run_dir, _m, _ = finished
    messages: list[str] = []
    again = run_disease(config_from_dict(_config()), out=run_dir, data_root=data, say=messages.append)
    assert again == json.loads((run_dir / "metrics.json").read_text())
    assert messages[0] == f"results already in {run_dir} (use --force to redo)"
    rates = [r for r in again["subgroups"]["by_group"] if r["metric"] == "underdiagnosis_rate"]
    assert len(messages) == 1 + len(rates) and all(m.startswith("underdiagnosis ") for m in messages[1:])
    with pytest.raises(RunError, match="different config"):
        run_disease(config_from_dict(_config(policy="zeros")), out=run_dir, data_root=data, say=lambda s: None)
    other = tmp_path / "a-run"
    other.mkdir()
    (other / "config.yaml").write_text(yaml.safe_dump({"fingerprint": "x", "name": "n"}))
    with pytest.raises(RunError, match="holds a `readingrace run` run, not a disease run"):
        run_disease(config_from_dict(_config()), out=other, data_root=data, say=lambda s: None)
    # the command line: the same config reports the finished run again
    cfg_file = tmp_path / "disease.yaml"
    cfg_file.write_text(yaml.safe_dump(_config()))
    assert main(["disease", str(cfg_file), "--data-root", str(data), "--out", str(run_dir)]) == 0


def test_a_finished_run_is_not_reused_for_changed_data(finished, tmp_path):
    data, run_dir, _m, _ = finished
    changed = tmp_path / "data"
    shutil.copytree(data, changed)
    table = pd.read_csv(changed / "cohort.csv")
    table.iloc[2:].to_csv(changed / "cohort.csv", index=False)  # two images fewer
    with pytest.raises(RunError, match=r"the cohort differs from the one this run was trained on: \d+ images then"):
        run_disease(config_from_dict(_config()), out=run_dir, data_root=changed, say=lambda s: None)


def test_bad_inputs_fail_before_training(tmp_path):
    _cohort(tmp_path, n_patients=20)
    with pytest.raises(CohortError, match=r"lacks label column\(s\) \['Edema'\]"):
        run_disease(config_from_dict(_config(labels=["Effusion", "Edema"])), out=tmp_path / "r1", data_root=tmp_path,
                    say=lambda s: None)
    assert not (tmp_path / "r1" / "model").exists()
    with pytest.raises(CohortError, match=r"none of disease.groups \['race', 'bmi_group'\] can be reported"):
        run_disease(config_from_dict(_config(groups=["race", "bmi_group"])), out=tmp_path / "r2", data_root=tmp_path,
                    say=lambda s: None)
    for bad, match in (({"operating_point": 1.5}, r"disease.operating_point: a fixed threshold must be in \[0, 1\]"),
                       ({"operating_point": "best"}, r"'youden', 'f1' or a probability"),
                       ({"policy": "drop"}, r"disease.policy must be one of"),
                       ({"labels": "mimic"}, r"disease.labels must be 'nih', 'chexpert'")):
        with pytest.raises(ConfigError, match=match):
            config_from_dict(_config(**bad))
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(yaml.safe_dump(_config(labels=["Effusion", "Edema"])))
    assert main(["disease", str(cfg_file), "--data-root", str(tmp_path), "--out", str(tmp_path / "r3")]) == 2


def test_defaults_leave_fingerprints_alone_and_label_sets_include_no_finding():
    cfg = ExperimentConfig()
    assert "disease" not in _non_default(cfg.to_dict(), ExperimentConfig().to_dict())
    assert config_from_dict({"name": "a"}).fingerprint() == config_from_dict(
        {"name": "a", "disease": {"labels": "nih", "groups": ["sex", "age_group", "race"]}}).fingerprint()
    assert config_from_dict({"disease": {"operating_point": "f1"}}).fingerprint() != cfg.fingerprint()
    nih = disease_labels(cfg.disease)
    assert len(nih) == 15 and nih[-1] == NF and "Pleural_Thickening" in nih
    assert NF in disease_labels(config_from_dict({"disease": {"labels": "chexpert"}}).disease)
    from readingrace.multilabel import POLICIES

    assert set(POLICIES) == {"zeros", "ones", "ignore"}     # the config checks these names

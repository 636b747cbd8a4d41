"""A3 as one run: a disease model's frozen features probed for the target, beside a direct model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from readingrace.config import config_from_dict
from readingrace.errors import RunError
from readingrace.experiments.a3 import run_a3

NF = "No Finding"


def _cohort(root, *, tie_to_sex: bool, n_patients: int = 120, size: int = 32, seed: int = 0) -> None:
    """Effusion is a bright disc, Mass a dark square. With ``tie_to_sex`` every F patient has Effusion
    (the disease model then encodes sex through the finding); otherwise sex is random and invisible."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    rows = []
    for p in range(n_patients):
        sex = "F" if rng.random() < 0.5 else "M"
        effusion = int(sex == "F") if tie_to_sex else int(rng.random() < 0.4)
        mass = int(rng.random() < 0.3)
        img = rng.normal(0.45, 0.08, (size, size))
        if effusion:
            img[(yy - size * 0.7) ** 2 + (xx - size * 0.3) ** 2 < (size / 5) ** 2] += 0.4
        if mass:
            img[size // 5: 2 * size // 5, size // 2: size // 2 + size // 5] -= 0.35
        name = f"img/p{p:04d}.png"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / name)
        rows.append({"path": name, "patient_id": f"p{p:04d}", "sex": sex, "age": int(rng.integers(25, 79)),
                     "Effusion": effusion, "Mass": mass, NF: int(not (effusion or mass))})
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)


def _config() -> dict:
    return {
        "name": "a3-test",
        "cohort": {"source": "csv", "target": "sex", "min_prevalence": 0, "options": {"csv": "cohort.csv"}},
        "split": {"ratios": [0.6, 0.1, 0.3], "seed": 1},
        "image": {"size": 32},
        "model": {"name": "resnet-tiny"},
        "train": {"batch_size": 16, "max_epochs": 6, "early_stopping_patience": 6, "precision": "32",
                  "num_threads": 1, "augment": {"flip": False, "rotate": 0, "zoom": 0}},
        "evaluate": {"n_bootstrap": 200, "reference": False},
        "disease": {"labels": ["Effusion", "Mass", NF], "groups": ["sex"]},
    }


@pytest.mark.slow
@pytest.mark.parametrize("tie_to_sex", [True, False])
def test_a3_probe_finds_the_attribute_only_when_the_disease_model_carries_it(tmp_path, tie_to_sex):
    data = tmp_path / "data"
    _cohort(data, tie_to_sex=tie_to_sex)
    out = tmp_path / "a3"
    m = run_a3(config_from_dict(_config()), out=out, data_root=data, say=lambda s: None)
    probe = m["probes"]["logistic"]["macro_auc"]
    if tie_to_sex:  # sex is visible only through the finding the disease model learnt
        assert probe > 0.85 and m["direct"]["macro_auc"] > 0.85
    else:           # null: neither the probe nor the direct model can read an invisible attribute
        lo, hi = m["probes"]["logistic"]["macro_auc_ci"]
        assert lo < 0.5 < hi
        assert abs(m["macro_auc"] - 0.5) < 0.2
    # one split for all three models: the comparison is paired on every test image
    cmp = m["comparison"]["logistic"]
    assert cmp["n_shared"] == cmp["n_probe_test"] == cmp["n_direct_test"]
    assert (out / "pathology" / "subgroups.csv").is_file() and (out / "direct" / "metrics.json").is_file()
    assert "does a disease model encode sex" in (out / "a3.md").read_text()
    # a rerun reports the finished run without recomputing
    again = run_a3(config_from_dict(_config()), out=out, data_root=data, say=lambda s: None)
    assert again == json.loads((out / "metrics.json").read_text())
    # ... but not for other data: a cohort table with two images fewer is refused, not answered from the old run
    if tie_to_sex:
        table = pd.read_csv(data / "cohort.csv")
        table.iloc[2:].to_csv(data / "cohort.csv", index=False)
        with pytest.raises(RunError, match="the cohort differs from the one this run was trained on"):
            run_a3(config_from_dict(_config()), out=out, data_root=data, say=lambda s: None)

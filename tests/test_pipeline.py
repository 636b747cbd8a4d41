"""End to end on generated cohorts where the truth is known: null and planted texture."""

from __future__ import annotations

import pandas as pd
import pytest

from readingrace.config import config_from_dict
from readingrace.experiments.run import run_experiment


def synthetic_config(signal: str, **train) -> dict:
    return {
        "name": f"test-{signal}",
        "cohort": {"source": "synthetic", "target": "race",
                   "options": {"n_patients": 700, "images_per_patient": [1, 1], "groups": ["Black", "White"],
                               "signal": signal, "size": 64, "seed": 11}},
        "image": {"size": 64},
        "model": {"name": "resnet-tiny"},
        # flip only: rotation and zoom resample the image, which low-passes (and, zooming out, aliases)
        # the planted texture that lies near the 64 px Nyquist limit (docs/synthetic.md)
        "train": {"batch_size": 32, "max_epochs": 15, "early_stopping_patience": 5, "precision": "32",
                  "augment": {"flip": True, "rotate": 0, "zoom": 0}, **train},
        "evaluate": {"n_bootstrap": 500, "strata": ["view"], "occlusion": True, "gradcam_gallery": True},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for signal in ("none", "texture"):
        run_dir = tmp_path_factory.mktemp(signal)
        metrics = run_experiment(config_from_dict(synthetic_config(signal)), out=run_dir, say=lambda m: None)
        out[signal] = (metrics, run_dir)
    return out


@pytest.mark.slow
def test_null_cohort_is_at_chance(runs):
    m, _ = runs["none"]
    lo, hi = m["macro_auc_ci"]
    assert lo < 0.5 < hi, m["macro_auc_ci"]
    assert hi - lo < 0.25
    for cls in ("Black", "White"):
        assert m["per_class"][cls]["n_positive"] >= 100


@pytest.mark.slow
def test_null_predictions_are_not_constant(runs):
    _, run_dir = runs["none"]
    pred = pd.read_csv(run_dir / "predictions.csv")
    assert len(pred) >= 200 and pred["prob_White"].nunique() > len(pred) // 2
    assert pred["prob_White"].std() > 1e-3


@pytest.mark.slow
def test_planted_texture_found_by_cnn_not_by_thumbnails(runs):
    m, _ = runs["texture"]
    assert m["macro_auc"] > 0.9, m["macro_auc"]
    assert m["reference"]["macro_auc"] < 0.65, m["reference"]["macro_auc"]
    assert set(m["strata"]["view"]) == {"AP", "PA"}


@pytest.mark.slow
def test_localisation_outputs(runs):
    m, run_dir = runs["texture"]
    loc = m["localisation"]
    assert loc["galleries"] and all((run_dir / f).is_file() for f in loc["galleries"])
    occ = loc["occlusion"]
    assert occ["threshold"] == 0.65 and 0 < occ["mean_box_fraction"] <= 1
    assert occ["comparison"]["macro_auc_b"] == pytest.approx(m["macro_auc"])   # paired against the originals
    boxes = pd.read_csv(run_dir / "occlusion_boxes.csv")
    assert len(boxes) == m["n_images"]

"""External validation: a model trained at one generated site applied to another."""

import pandas as pd
import pytest

from readingrace.config import config_from_dict
from readingrace.errors import RunError
from readingrace.experiments.external import external_matrix, predict_run
from readingrace.experiments.run import run_experiment


def site(name: str, *, seed: int, signal: str = "texture", appearance: dict | None = None, n: int = 500) -> dict:
    return {
        "name": name,
        "cohort": {"source": "synthetic", "target": "race",
                   "options": {"n_patients": n, "images_per_patient": [1, 1], "groups": ["Black", "White"],
                               "signal": signal, "size": 64, "seed": seed, "site": name,
                               **({"appearance": appearance} if appearance else {})}},
        "image": {"size": 64},
        "model": {"name": "resnet-tiny"},
        "train": {"batch_size": 32, "max_epochs": 10, "early_stopping_patience": 4, "precision": "32",
                  "augment": {"flip": True, "rotate": 0, "zoom": 0}},
        "evaluate": {"n_bootstrap": 200, "reference": False},
    }


@pytest.mark.slow
def test_train_at_one_site_test_at_another(tmp_path):
    run_dir = tmp_path / "site-a"
    internal = run_experiment(config_from_dict(site("site-a", seed=1, n=800)), out=run_dir, say=lambda m: None)
    other = config_from_dict(site("site-b", seed=2, n=300, appearance={"gamma": 1.3, "contrast": 0.85, "noise": 0.03}))
    ext = predict_run(run_dir, other, out=tmp_path / "a-on-b", say=lambda m: None)
    null = predict_run(run_dir, config_from_dict(site("site-null", seed=3, n=300, signal="none")),
                       out=tmp_path / "a-on-null", say=lambda m: None)
    assert internal["macro_auc"] > 0.9
    assert ext["macro_auc"] > 0.75, ext["macro_auc"]           # the texture transfers across scanner looks
    lo, hi = null["macro_auc_ci"]
    assert lo < 0.5 < hi                                       # nothing to find at a site without the signal
    assert ext["n_images"] == 300 and ext["trained_on"] == "site-a"
    table = external_matrix({("site-a", "site-a"): internal, ("site-a", "site-b"): ext})
    assert list(table.columns) == ["site-a", "site-b"] and table.loc["site-a", "site-b"].startswith(f"{ext['macro_auc']:.3f}")
    pred = pd.read_csv(tmp_path / "a-on-b" / "predictions.csv")
    assert {"prob_Black", "prob_White", "label"} <= set(pred.columns)


def test_not_a_run_folder(tmp_path):
    with pytest.raises(RunError, match="not a run folder"):
        predict_run(tmp_path, config_from_dict(site("x", seed=1)), out=tmp_path / "o")

"""External validation (A1-ext): a run applied to other generated sites, and the every-ordered-pair matrix.

Two generated sites carry the same planted signal (a bright marker whose contrast depends on the
group) under different scanner looks (gamma, contrast, noise, blur); a third site has no signal.
Models are tiny (resnet-tiny, 64 px, 6 epochs); training both takes about 15 s on one core.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from readingrace.config import ExperimentConfig, config_from_dict
from readingrace.errors import ConfigError, RunError
from readingrace.experiments.external import (
    check_mode,
    external_matrix,
    external_validation,
    input_images,
    parse_named,
    predict_run,
)
from readingrace.experiments.run import run_experiment

SITE_B_LOOK = {"gamma": 1.4, "contrast": 0.8, "noise": 0.03, "blur": 0.5}


def site(name: str, *, seed: int, root: Path, signal: str = "marker", appearance: dict | None = None,
         n: int = 300) -> dict:
    return {
        "name": name,
        "cohort": {"source": "synthetic", "target": "race", "data_root": str(root / "generated"),
                   "options": {"n_patients": n, "images_per_patient": [1, 1], "groups": ["Black", "White"],
                               "signal": signal, "size": 64, "seed": seed, "site": name,
                               **({"appearance": appearance} if appearance else {})}},
        "image": {"size": 64, "cache_dir": str(root / "cache")},
        "model": {"name": "resnet-tiny"},
        # no flip: the marker sits in one cell of the 3x3 grid
        "train": {"batch_size": 32, "max_epochs": 6, "early_stopping_patience": 3, "precision": "32",
                  "augment": {"flip": False, "rotate": 0, "zoom": 0}},
        "evaluate": {"n_bootstrap": 200, "reference": False},
    }


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> dict:
    """Runs trained at site A and site B (other scanner look), and a null site's config (no signal)."""
    root = tmp_path_factory.mktemp("sites")
    quiet = lambda m: None
    run_experiment(config_from_dict(site("site-a", seed=1, root=root)), out=root / "run-a", say=quiet)
    run_experiment(config_from_dict(site("site-b", seed=2, root=root, appearance=SITE_B_LOOK)), out=root / "run-b",
                   say=quiet)
    return {"root": root, "runs": {"a": root / "run-a", "b": root / "run-b"},
            "null": config_from_dict(site("site-null", seed=3, root=root, signal="none", n=400))}


def _cells(result: dict) -> dict[tuple[str, str], dict]:
    return {(c["trained_on"], c["tested_on"]): c for c in result["cells"]}


@pytest.mark.slow
def test_matrix_of_every_ordered_pair(sites, tmp_path):
    out = tmp_path / "matrix"
    result = external_validation(sites["runs"], {"null": sites["null"]}, out=out, say=lambda m: None)
    cells = _cells(result)
    assert set(cells) == {(x, y) for x in ("a", "b") for y in ("a", "b", "null")}  # every ordered pair
    # the diagonal is each run's own internal test, read from its metrics.json
    for x in ("a", "b"):
        own = json.loads((sites["runs"][x] / "metrics.json").read_text())
        assert cells[(x, x)]["internal"] and cells[(x, x)]["macro_auc"] == own["macro_auc"]
        assert cells[(x, x)]["macro_auc_ci"] == own["macro_auc_ci"] and cells[(x, x)]["n_images"] == own["n_images"]
    # the planted marker transfers across scanner looks, both ways
    assert cells[("a", "b")]["macro_auc"] > 0.8, cells[("a", "b")]
    assert cells[("b", "a")]["macro_auc"] > 0.8, cells[("b", "a")]
    # a site without the signal: chance
    for x in ("a", "b"):
        null = cells[(x, "null")]
        lo, hi = null["macro_auc_ci"]
        assert abs(null["macro_auc"] - 0.5) < 0.1 and lo < 0.5 < hi, null
        assert null["n_images"] == 400  # a --data cohort: all its images
    # a run's cohort is tested through its own test split: the same images as its diagonal
    assert cells[("a", "b")]["n_images"] == cells[("b", "b")]["n_images"] == 90
    tidy = pd.read_csv(out / "matrix.csv")
    assert len(tidy) == 6 and {"auc_Black", "auc_White", "n_patients", "input_mode", "ci_lo", "ci_hi"} <= set(tidy)
    row = tidy[(tidy["trained_on"] == "a") & (tidy["tested_on"] == "b")].iloc[0]
    assert row["macro_auc"] == pytest.approx(cells[("a", "b")]["macro_auc"]) and row["input_mode"] == "stretch"
    md = (out / "matrix.md").read_text()
    assert f"{cells[('a', 'b')]['macro_auc']:.3f} [" in md and "(internal)" in md
    assert (out / "matrix.png").stat().st_size > 5000
    index = json.loads((out / "external.json").read_text())
    assert index["kind"] == "external" and len(index["cells"]) == 6
    assert (out / "a__on__b" / "predictions.csv").is_file() and (out / "b__on__null" / "manifest.json").is_file()
    # the older two-level table agrees
    table = external_matrix({("a", "b"): cells[("a", "b")]})
    assert table.loc["a", "b"].startswith(f"{cells[('a', 'b')]['macro_auc']:.3f}")

    # the same command again reuses every cell; another input mode recomputes them
    before = (out / "a__on__b" / "metrics.json").stat().st_mtime_ns
    again = _cells(external_validation(sites["runs"], {"null": sites["null"]}, out=out, say=lambda m: None))
    assert all(c["reused"] for k, c in again.items() if not c["internal"])
    assert (out / "a__on__b" / "metrics.json").stat().st_mtime_ns == before
    assert again[("a", "b")]["macro_auc"] == cells[("a", "b")]["macro_auc"]
    padded = _cells(external_validation(sites["runs"], {}, out=out, mode="pad", say=lambda m: None))
    assert not padded[("a", "b")]["reused"] and padded[("a", "b")]["input_mode"] == "pad"
    assert set(padded) == {("a", "a"), ("a", "b"), ("b", "a"), ("b", "b")}


@pytest.mark.slow
def test_cli_external_and_report(sites, tmp_path, capsys):
    from readingrace.cli import main
    from readingrace.report.html import write_report

    null_yaml = tmp_path / "null.yaml"
    null_yaml.write_text(yaml.safe_dump(sites["null"].to_dict()))
    out = tmp_path / "ext"
    rc = main(["external", "--run", f"a={sites['runs']['a']}", "--run", f"b={sites['runs']['b']}",
               "--data", f"null={null_yaml}", "-o", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| trained on \\ tested on | a | b | null |" in printed
    paths = write_report([out, sites["runs"]["a"]], out=tmp_path / "report")
    text, md = paths["html"].read_text(), paths["markdown"].read_text()
    assert "id='external-validation'" in text and "id='family-A'" in text
    index = json.loads((out / "external.json").read_text())
    ab = next(c for c in index["cells"] if (c["trained_on"], c["tested_on"]) == ("a", "b"))
    assert f"{ab['macro_auc']:.3f} [" in text and f"{ab['macro_auc']:.3f} [" in md
    assert 'href="../ext/a__on__b"' in text  # each cell links to its folder
    # a usage error is one line, not a traceback
    assert main(["external", "--run", "a", "-o", str(out)]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err


def _fake_run(root: Path, classes: list[str], *, target: str = "group", size: int = 32) -> Path:
    """A finished-looking run folder with an untrained resnet-tiny (for bookkeeping checks, no training)."""
    from readingrace.train import ImageClassifier

    run = root / "fake-run"
    cfg = ExperimentConfig()
    cfg.name, cfg.cohort.target, cfg.image.size, cfg.model.name = "fake", target, size, "resnet-tiny"
    cfg.image.cache_dir = str(root / "cache")
    cfg.evaluate.n_bootstrap = 50
    (run / "seed-2021" / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"fingerprint": cfg.fingerprint(), **cfg.to_dict()}))
    (run / "metrics.json").write_text(json.dumps({"classes": classes, "macro_auc": 0.5, "macro_auc_ci": [0.4, 0.6]}))
    pd.DataFrame({"image_id": ["i1", "i2"], "path": ["i1.png", "i2.png"], "patient_id": ["p1", "p2"],
                  "study_id": ["i1", "i2"], target: classes[:2], "split": "test"}).to_csv(run / "cohort.csv", index=False)
    torch.manual_seed(0)
    model = ImageClassifier("resnet-tiny", len(classes))
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()},
               run / "seed-2021" / "checkpoints" / "best.ckpt")
    return run


def test_class_absent_from_the_test_site_is_nan_with_a_note(tmp_path):
    run = _fake_run(tmp_path, ["A", "B", "C"])
    other = config_from_dict({"name": "site-x", "cohort": {
        "source": "synthetic", "target": "group", "data_root": str(tmp_path / "generated"),
        "options": {"n_patients": 60, "images_per_patient": [1, 1], "attribute": "group", "groups": ["A", "B", "D"],
                    "signal": "none", "size": 32, "seed": 5}}})
    with pytest.warns(UserWarning, match="class 'C' has no images"):
        m = predict_run(run, other, out=tmp_path / "x", say=lambda s: None)
    n_d = m["excluded_classes"]["D"]
    assert n_d > 0 and m["n_images"] == 60 - n_d  # images of a class the model never learnt: counted out
    assert m["per_class"]["C"]["auc"] is None  # a model class the site lacks: NaN (null in JSON), not dropped
    assert m["absent_classes"] == ["C"] and set(m["per_class"]) == {"A", "B", "C"}
    assert any("'C'" in n and "NaN" in n for n in m["notes"]) and any("D (" in n for n in m["notes"])
    flow = json.loads((tmp_path / "x" / "manifest.json").read_text())["flow"]
    step = next(s for s in flow if s["step"].startswith("group among the model's classes"))
    assert step["images_before"] - step["images_after"] == n_d
    pred = pd.read_csv(tmp_path / "x" / "predictions.csv")
    assert set(pred["label"]) == {"A", "B"} and {"prob_A", "prob_B", "prob_C"} <= set(pred.columns)


def test_pad_and_stretch_bring_a_wide_image_to_the_input_differently(tmp_path):
    """A 2:1 image: pad keeps its proportions (bands of zeros above and below the centred image);
    stretch fills the square (no zero rows) and squeezes it horizontally."""
    wide = np.tile(np.linspace(80, 255, 64, dtype=np.float32), (32, 1)).astype(np.uint8)  # 32 x 64, left dark
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    trained = ExperimentConfig()
    trained.image.size, trained.image.cache_dir = 32, str(tmp_path / "cache")
    pad = input_images([str(path)], trained=trained, mode="pad").images[0]
    stretch = input_images([str(path)], trained=trained, mode="stretch").images[0]
    assert pad.shape == stretch.shape == (32, 32)
    rows_pad = pad.max(axis=1)
    assert np.all(rows_pad[:7] == 0) and np.all(rows_pad[25:] == 0)  # 8 of 32 rows above and below: zeros
    assert np.all(pad[9:23].min(axis=1) > 0.25)  # the image, centred, 16 rows high
    assert stretch.min() > 0.25  # no padding anywhere
    assert np.allclose(stretch[0], stretch[-1]) and np.all(np.diff(stretch[16]) >= 0)  # the gradient, squeezed
    assert np.allclose(pad[16], stretch[16], atol=0.02)  # same columns: only the vertical geometry differs
    # the run's own mode is the default
    trained.image.mode = "pad"
    assert np.array_equal(input_images([str(path)], trained=trained).images[0], pad)


def test_bad_inputs(tmp_path):
    cfg = config_from_dict(site("x", seed=1, root=tmp_path))
    with pytest.raises(RunError, match="not a run folder"):
        predict_run(tmp_path, cfg, out=tmp_path / "o")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    with pytest.raises(RunError, match="has not finished"):
        external_validation({"u": unfinished}, {}, out=tmp_path / "m")
    with pytest.raises(ConfigError, match="stretch .* pad"):
        check_mode("crop")
    with pytest.raises(ConfigError, match="given twice"):
        parse_named(["a=x", "a=y"], "--run")
    with pytest.raises(ConfigError, match="no '__'"):
        parse_named(["a__b=x"], "--run")
    run = _fake_run(tmp_path, ["A", "B"])
    with pytest.raises(ConfigError, match="both as --run and --data"):
        external_validation({"a": run}, {"a": cfg}, out=tmp_path / "m")
    with pytest.raises(ConfigError, match="--data-root"):
        external_validation({"a": run}, {}, data_roots={"zz": "/x"}, out=tmp_path / "m")


def test_a_failing_cell_is_marked_and_reported(tmp_path):
    run = _fake_run(tmp_path, ["A", "B"])  # learnt 'group'; the other cohort records race only
    other = config_from_dict({"name": "no-group", "cohort": {
        "source": "synthetic", "target": "race", "data_root": str(tmp_path / "generated"),
        "options": {"n_patients": 20, "images_per_patient": [1, 1], "signal": "none", "size": 32}}})
    with pytest.raises(RunError, match=r"1 of 2 cell\(s\) failed .*no 'group' column"):
        external_validation({"fake": run}, {"other": other}, out=tmp_path / "m", say=lambda m: None)
    assert "n/a (failed)" in (tmp_path / "m" / "matrix.md").read_text()
    cells = json.loads((tmp_path / "m" / "external.json").read_text())["cells"]
    failed = next(c for c in cells if c["tested_on"] == "other")
    assert failed["status"] == "failed" and "no 'group' column" in failed["reason"] and failed["macro_auc"] is None

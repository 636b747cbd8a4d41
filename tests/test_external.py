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
from readingrace.errors import ConfigError, LeakageError, RunError
from readingrace.experiments.external import (
    check_mode,
    cohort_from_config,
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
def test_the_cohort_a_model_trained_on_is_not_an_external_test(sites, tmp_path):
    """Site A's model tested on site A's whole generated cohort: its 210 train/val images are left out;
    the 90 left are its internal test images (noted), scored as the diagonal scores them."""
    own = config_from_dict(site("site-a", seed=1, root=sites["root"]))
    result = external_validation({"a": sites["runs"]["a"]}, {"site": own}, out=tmp_path / "m", say=lambda m: None)
    cell = _cells(result)[("a", "site")]
    internal = json.loads((sites["runs"]["a"] / "metrics.json").read_text())
    assert cell["status"] == "done" and cell["n_images"] == internal["n_images"] == 90
    assert cell["macro_auc"] == pytest.approx(internal["macro_auc"], abs=1e-6)
    assert any("210 image(s) the model trained or validated on were left out" in n for n in cell["notes"])
    assert any("90 image(s) overlap the model's internal test set" in n for n in cell["notes"])
    assert "210 image(s) the model trained or validated on" in (tmp_path / "m" / "matrix.md").read_text()


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


def _fake_run(root: Path, classes: list[str], *, target: str = "group", size: int = 32,
              cohort: pd.DataFrame | None = None) -> Path:
    """A finished-looking run folder with an untrained resnet-tiny (for bookkeeping checks, no training);
    ``cohort``: its cohort.csv (with ``split``), by default two test images of other patients."""
    from readingrace.train import ImageClassifier

    run = root / "fake-run"
    cfg = ExperimentConfig()
    cfg.name, cfg.cohort.target, cfg.image.size, cfg.model.name = "fake", target, size, "resnet-tiny"
    cfg.image.cache_dir = str(root / "cache")
    cfg.evaluate.n_bootstrap = 50
    (run / "seed-2021" / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"fingerprint": cfg.fingerprint(), **cfg.to_dict()}))
    (run / "metrics.json").write_text(json.dumps({"classes": classes, "macro_auc": 0.5, "macro_auc_ci": [0.4, 0.6]}))
    if cohort is None:
        cohort = pd.DataFrame({"image_id": ["i1", "i2"], "path": ["i1.png", "i2.png"], "patient_id": ["p1", "p2"],
                               "study_id": ["i1", "i2"], target: classes[:2], "split": "test"})
    cohort.to_csv(run / "cohort.csv", index=False)
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
    run = _fake_run(tmp_path, ["A", "B"])  # learnt 'group'; the other cohort is built for race
    other = config_from_dict({"name": "no-group", "cohort": {
        "source": "synthetic", "target": "race", "data_root": str(tmp_path / "generated"),
        "options": {"n_patients": 20, "images_per_patient": [1, 1], "signal": "none", "size": 32}}})
    with pytest.raises(RunError, match=r"1 of 2 cell\(s\) failed .*built for target 'race'.*predicts 'group'"):
        external_validation({"fake": run}, {"other": other}, out=tmp_path / "m", say=lambda m: None)
    assert "n/a (failed)" in (tmp_path / "m" / "matrix.md").read_text()
    cells = json.loads((tmp_path / "m" / "external.json").read_text())["cells"]
    failed = next(c for c in cells if c["tested_on"] == "other")
    assert failed["status"] == "failed" and "drop cohort.target" in failed["reason"] and failed["macro_auc"] is None
    # built for the model's target instead, it lacks the column: failed with that reason
    with pytest.raises(RunError, match=r"1 of 2 cell\(s\) failed .*target 'group' is not a cohort column"):
        external_validation({"fake": run}, {"other": other}, out=tmp_path / "m", follow_model_target=["other"],
                            say=lambda m: None)


def _site_x(root: Path, *, n: int = 40, per_patient: int = 2, groups: tuple = ("A", "B"), target: bool = True) -> dict:
    """A generated cohort labelled by 'group' (no signal), as an experiment config dict."""
    return {"name": "site-x", "cohort": {
        "source": "synthetic", **({"target": "group"} if target else {}), "data_root": str(root / "generated"),
        "options": {"n_patients": n, "images_per_patient": [per_patient, per_patient], "attribute": "group",
                    "groups": list(groups), "signal": "none", "size": 32, "seed": 5, "site": "x"}}}


def test_images_and_patients_the_model_trained_on_are_left_out(tmp_path):
    """The run's cohort.csv says what the model saw: those images (same file, or same patient_id and
    image_id), then those patients' other images, are left out and counted; its test images stay, noted."""
    other = config_from_dict(_site_x(tmp_path))
    table, _ = cohort_from_config(other).load("group")  # 40 patients x 2 images
    first = table.groupby("patient_id", sort=True).head(1)  # image i0 of each patient
    pids = sorted(table["patient_id"].unique())
    part = lambda i, j: set(pids[i:j])
    seen = pd.concat([
        table[table["patient_id"].isin(part(0, 10))].assign(split="train"),  # both images: same file (20)
        first[first["patient_id"].isin(part(10, 15))].assign(split="val"),  # i0 same file (5); i1 same patient (5)
        first[first["patient_id"].isin(part(15, 20))].assign(split="train",  # a copy elsewhere: same ids (5) ...
                                                             path=lambda d: "/elsewhere/" + d["image_id"] + ".png"),
        table[table["patient_id"].isin(part(20, 25))].assign(split="test"),  # the run's test split: kept (10)
    ])
    run = _fake_run(tmp_path, ["A", "B"], cohort=seen)
    said: list[str] = []
    m = predict_run(run, other, out=tmp_path / "x", say=said.append)
    assert m["seen_by_model"] == {"same_image": 30, "same_file": 25, "same_ids_other_file": 5, "same_patient": 10,
                                  "patients": 20, "internal_test_overlap": 10, "same_id_other_dataset": 0}
    assert m["n_images"] == 40 and m["n_patients"] == 20  # 80 - 30 - 10; the 10 internal test images kept
    from readingrace.experiments.external import cell_record
    assert cell_record(m, trained_on="fake", tested_on="x", cell_dir=None, input_mode="stretch")["seen_left_out"] == 40
    pred = pd.read_csv(tmp_path / "x" / "predictions.csv", dtype={"patient_id": str})
    assert not set(pred["patient_id"]) & part(0, 20)
    assert set(pred["patient_id"]) == set(pids[20:])
    notes = " | ".join(m["notes"])
    assert "30 image(s) the model trained or validated on were left out (25 the same file, 5 the same" in notes
    assert "10 other image(s) of 10 patient(s) of the model's training or validation split" in notes
    assert "10 image(s) overlap the model's internal test set" in notes
    assert sum("note: " in s for s in said) == 3 and any("overlap the model's internal test set" in s for s in said)
    flow = json.loads((tmp_path / "x" / "manifest.json").read_text())["flow"]
    step = next(s for s in flow if s["step"].startswith("not seen by the model"))
    assert (step["images_before"], step["images_after"]) == (80, 40)
    # the same patient and image ids at another hospital (another dataset, other files) are other people
    elsewhere = seen.assign(dataset="hospital-b", path=lambda d: "/elsewhere/" + d["image_id"] + ".png")
    m = predict_run(_fake_run(tmp_path / "b", ["A", "B"], cohort=elsewhere), other, out=tmp_path / "y",
                    say=lambda s: None)
    assert m["seen_by_model"]["same_image"] == 0 and m["seen_by_model"]["same_patient"] == 0
    assert m["n_images"] == 80
    # ... kept, but said: the same hospital under two names would otherwise pass unnoticed
    assert m["seen_by_model"]["same_id_other_dataset"] == 40  # the 20 seen patients' 2 images each
    assert any("in another dataset (hospital-b); they were kept as other people" in n for n in m["notes"])


def test_a_cohort_the_model_trained_on_entirely_is_refused(tmp_path):
    other = config_from_dict(_site_x(tmp_path, n=20, per_patient=1))
    table, _ = cohort_from_config(other).load("group")
    run = _fake_run(tmp_path, ["A", "B"], cohort=table.assign(split=["train", "val"] * 10))
    with pytest.raises(LeakageError, match=r"all 20 image\(s\) of cohort 'site-x' are the model's own training"):
        predict_run(run, other, out=tmp_path / "x", say=lambda s: None)
    assert not (tmp_path / "x" / "metrics.json").exists()
    # in the matrix: marked refused with its reason, never scored; the rest of the matrix stands (no error)
    result = external_validation({"fake": run}, {"same": other}, out=tmp_path / "m", say=lambda s: None)
    cell = next(c for c in result["cells"] if c["tested_on"] == "same")
    assert cell["status"] == "refused" and cell["macro_auc"] is None and "training or validation" in cell["reason"]
    md = (tmp_path / "m" / "matrix.md").read_text()
    assert "n/a (refused)" in md and "- fake -> same: all 20 image(s)" in md


def test_predict_cli_checks_the_target_and_says_what_it_left_out(tmp_path, capsys):
    from readingrace.cli import main

    run = _fake_run(tmp_path, ["A", "B", "C"])  # predicts 'group'
    race = tmp_path / "race.yaml"
    race.write_text(yaml.safe_dump({**_site_x(tmp_path), "cohort": {**_site_x(tmp_path)["cohort"], "target": "race"}}))
    assert main(["predict", str(run), "--data", str(race), "-o", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "built for target 'race'" in err and "predicts 'group'" in err and "drop cohort.target" in err
    assert "Traceback" not in err and not (tmp_path / "p").exists()
    # no target in the config: the model's is used (the cohort is built for 'group')
    free = tmp_path / "free.yaml"
    free.write_text(yaml.safe_dump(_site_x(tmp_path, n=30, per_patient=1, groups=("A", "B", "D"), target=False)))
    with pytest.warns(UserWarning, match="image level: class 'C' has no images"):
        assert main(["predict", str(run), "--data", str(free), "-o", str(tmp_path / "q")]) == 0
    m = json.loads((tmp_path / "q" / "metrics.json").read_text())
    flow = json.loads((tmp_path / "q" / "manifest.json").read_text())["flow"]
    assert m["target"] == "group" and any(s["step"] == "group recorded" for s in flow)
    n_d = m["excluded_classes"]["D"]
    err = capsys.readouterr().err
    assert f"{30 - n_d} images of" in err  # what is tested ...
    assert f"note: {n_d} image(s) of class(es) the model never learnt were left out: D ({n_d})" in err  # ... and not
    assert "note: class 'C' of the model is absent" in err
    # an explicit target equal to the model's is accepted as well
    same = tmp_path / "same.yaml"
    same.write_text(yaml.safe_dump(_site_x(tmp_path, n=30, per_patient=1, groups=("A", "B", "D"))))
    with pytest.warns(UserWarning, match="image level: class 'C' has no images"):
        assert main(["predict", str(run), "--data", str(same), "-o", str(tmp_path / "r")]) == 0


def test_a_cell_holding_only_the_models_internal_test_images_is_marked(tmp_path):
    """The model's own cohort as --data: its train images are left out, and the rest are all its internal test
    images: flagged ``internal_only`` with a note, and matrix.md says so and gives n in every cell."""
    other = config_from_dict(_site_x(tmp_path, n=20, per_patient=1))
    table, _ = cohort_from_config(other).load("group")
    run = _fake_run(tmp_path, ["A", "B"], cohort=table.assign(split=["train", "test"] * 10))
    said: list[str] = []
    m = predict_run(run, other, out=tmp_path / "x", trained_on="fake", say=said.append)
    assert m["internal_only"] is True and m["n_images"] == m["internal_test_images"] == 10
    assert said[0] == ("site-x: 10 images of 10 patients tested (all images of cohort synthetic: 20 images before "
                       "leaving out the model's own training and validation images and patients (10))")
    assert "all 10 remaining test images are fake's own internal test images" in " | ".join(m["notes"])
    fresh = _site_x(tmp_path, n=15, per_patient=1)
    fresh["cohort"]["options"]["site"] = "y"
    result = external_validation({"fake": run}, {"same": other, "fresh": config_from_dict(fresh)},
                                 out=tmp_path / "m", say=lambda s: None)
    cells = _cells(result)
    assert cells[("fake", "same")]["internal_only"] is True and cells[("fake", "same")]["n_images"] == 10
    assert cells[("fake", "fresh")]["internal_only"] is False and cells[("fake", "fresh")]["n_images"] == 15
    assert cells[("fake", "fake")]["internal_only"] is False  # the diagonal is internal by definition
    md = (tmp_path / "m" / "matrix.md").read_text()
    same, fresh_text = cells[("fake", "same")], cells[("fake", "fresh")]
    assert f"{same['macro_auc']:.3f} [{same['macro_auc_ci'][0]:.3f}, {same['macro_auc_ci'][1]:.3f}] " \
           "(internal test of fake), n = 10 |" in md
    assert f"{fresh_text['macro_auc']:.3f} [" in md and "(internal test of fake), n = 15" not in md
    assert ", n = 15 |" in md and "- fake -> same: " in md and "all 10 remaining test images are fake's own" in md
    tidy = pd.read_csv(tmp_path / "m" / "matrix.csv")
    assert dict(zip(tidy["tested_on"], tidy["internal_only"])) == {"fake": False, "same": True, "fresh": False}
    index = json.loads((tmp_path / "m" / "external.json").read_text())
    assert {c["tested_on"]: c["internal_only"] for c in index["cells"]} == {"fake": False, "same": True, "fresh": False}

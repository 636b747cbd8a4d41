"""The paper suite: expansion of the shipped paper suite, content addresses, shards, collect, and the controls.

The controls train tiny models on generated cohorts with a planted signal and check that the grids
find it where it is (and only there); they take about a minute each on 2 quiet cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from readingrace.errors import ConfigError
from readingrace.experiments.suite import (
    expand_suite,
    parse_data,
    parse_shard,
    run_suite,
    shard,
)

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "src" / "readingrace" / "configs" / "paper"
NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih-cxr14-sample"


def _ids(plan, id_):
    return [r for r in plan.runs if r.id == id_]


def test_full_grid_matches_the_paper():
    plan = expand_suite(PAPER, data={"mimic": "/data/mimic"})
    assert [r.point["d"] for r in _ids(plan, "C1-lowpass")] == [1, 5, 10, 25, 50, 75, 100, 125, 150, 200]
    # high-pass d = 200 keeps nothing even at 224 px (the spectrum's corners lie at radius ~158): skipped
    assert [r.point["d"] for r in _ids(plan, "C1-highpass")] == [1, 5, 10, 25, 50, 75, 100, 125, 150]
    band = _ids(plan, "C1-bandpass")
    assert len(band) == 21 and len(_ids(plan, "C1-notch")) == 21
    assert all(r.point["d1"] < r.point["d2"] for r in band)
    assert sorted(r.point["resolution"] for r in _ids(plan, "C2-resolution")) == [4, 8, 16, 24, 32, 40, 60, 80,
                                                                                   160, 240, 320, 512]
    assert len(_ids(plan, "C4-drop")) == 9 and len(_ids(plan, "C4-keep")) == 9
    assert [r.point["model"] for r in _ids(plan, "A1")] == ["resnet34", "densenet121", "efficientnet-b0"]
    # content addresses: one folder per distinct config, none shared
    fps = [r.fingerprint for r in plan.runs]
    assert len(set(fps)) == len(fps)
    assert all(r.run_dir == f"{r.id}/mimic/{r.fingerprint}" for r in plan.runs)
    # a resolution above the 224 px input trains at that size; below it, down and back up
    by_res = {r.point["resolution"]: r.config for r in _ids(plan, "C2-resolution")}
    assert by_res[512]["image"]["size"] == 512 and not by_res[512].get("perturb", {}).get("train")
    assert by_res[32]["perturb"]["train"] == [{"name": "resize", "size": 32, "back_to": 224}]
    # what mimic alone cannot run is skipped with a reason
    reasons = {(s.id, s.dataset): s.reason for s in plan.skipped}
    assert "hand" in reasons[("A2-hand", None)]
    # A3 is one run per dataset: pathology model, probes, direct model on one 80/10/10 split
    (a3,) = _ids(plan, "A3")
    assert a3.kind == "probe" and a3.config["split"]["ratios"] == [0.8, 0.1, 0.1]
    assert a3.config["disease"]["labels"] == "chexpert" and a3.config["model"]["name"] == "densenet121"


def test_a2_keeps_black_and_white_only_when_the_target_is_race():
    race = expand_suite(PAPER, data={"ct": "/ct"}, only=["A2-ct"])
    assert race.runs[0].config["cohort"]["where"] == {"race": ["Black", "White"]}
    sex = expand_suite(PAPER, data={"ct": "/ct"}, only=["A2-ct"], attribute="sex")
    assert "where" not in sex.runs[0].config["cohort"]


def test_a_filter_that_keeps_nothing_at_the_run_size_is_skipped_not_trained():
    small = expand_suite(PAPER, data={"nih": "/nih"}, budget="small", attribute="sex", only=["C1-highpass"])
    assert [r.point["d"] for r in small.runs] == [1, 5, 10, 25, 50, 75, 100, 125, 150]
    (skip,) = small.skipped
    assert skip.id == "C1-highpass" and "highpass d=200" in skip.reason and "keeps no frequency" in skip.reason
    low = expand_suite(PAPER, data={"nih": "/nih"}, budget="small", attribute="sex", only=["C1-lowpass"])
    assert len(low.runs) == 10 and not low.skipped


def test_small_budget_and_attribute():
    plan = expand_suite(PAPER, data={"nih": "/data/nih"}, budget="small", attribute="sex")
    assert len(_ids(plan, "C1-bandpass")) == 6
    assert max(r.point["resolution"] for r in _ids(plan, "C2-resolution")) == 60
    cfg = _ids(plan, "C1-lowpass")[0].config
    assert (cfg["image"]["size"], cfg["model"]["name"], cfg["train"]["seeds"]) == (64, "resnet-tiny", [2021])
    assert {r.attribute for r in plan.runs} == {"sex"}
    assert all(r.config["cohort"]["target"] == "sex" for r in plan.runs)
    # NIH records no race: asked for race, every image experiment is skipped with that reason
    race = expand_suite(PAPER, data={"nih": "/data/nih"}, budget="small")
    assert race.runs == []
    assert any("records no 'race'" in s.reason for s in race.skipped)


def test_same_config_same_address_and_shards_partition():
    a = expand_suite(PAPER, data={"mimic": "/x", "chexpert": "/y"}, budget="small")
    b = expand_suite(PAPER, data={"chexpert": "/other/y", "mimic": "/other/x"}, budget="small")
    assert {r.run_dir for r in a.runs} == {r.run_dir for r in b.runs}  # data paths do not change addresses
    parts = [shard(a.runs, i, 3) for i in (1, 2, 3)]
    dirs = [{r.run_dir for r in p} for p in parts]
    assert sum(len(d) for d in dirs) == len(a.runs)
    assert set().union(*dirs) == {r.run_dir for r in a.runs}
    assert all(abs(len(p) - len(a.runs) / 3) <= 1 for p in parts)
    assert {r.run_dir for r in shard(b.runs, 2, 3)} == dirs[1]  # same shard whatever the order given


def test_bad_input_messages():
    with pytest.raises(ConfigError, match="unknown dataset 'mimc'"):
        parse_data(["mimc=/x"], {"mimic": {}})
    with pytest.raises(ConfigError, match="NAME=PATH"):
        parse_data(["mimic"], {"mimic": {}})
    with pytest.raises(ConfigError, match="1 <= I <= N"):
        parse_shard("4/3")
    assert parse_shard("2/4") == (2, 4)
    with pytest.raises(ConfigError, match="budget 'huge'"):
        expand_suite(PAPER, data={"nih": "/x"}, budget="huge")
    with pytest.raises(ConfigError, match="--only"):
        expand_suite(PAPER, data={"nih": "/x"}, only=["Z9"])
    with pytest.raises(ConfigError, match=r"--data nih is given twice \(nih=/a and nih=/b\); give each dataset once"):
        parse_data(["nih=/a", "nih=/b"], {"nih": {}})


@pytest.mark.parametrize(("attribute", "hint"), [("Race", "; did you mean 'race'?"), ("bmi", "")])
def test_unknown_attribute_is_an_error_naming_the_allowed_ones(tmp_path, attribute, hint):
    for dry_run in (True, False):
        with pytest.raises(ConfigError) as err:
            run_suite(PAPER, data={"nih": str(tmp_path)}, out=tmp_path / "out", budget="small", attribute=attribute,
                      only=("A1",), dry_run=dry_run, say=lambda m: None)
        assert str(err.value) == (f"--attribute {attribute!r}: not an attribute of the suite's datasets; choose one "
                                  f"of age_group | race | sex{hint}")
    assert not (tmp_path / "out").exists()


def test_an_attribute_none_of_the_given_datasets_records_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^--attribute race: none of the given datasets records it "
                                          r"\(nih records sex, age_group\)"):
        run_suite(PAPER, data={"nih": str(tmp_path)}, out=tmp_path / "out", budget="small", attribute="race",
                  dry_run=True, say=lambda m: None)
    assert not (tmp_path / "out").exists()
    # with a dataset that records it, the plan goes ahead (nih's race experiments are skipped with reasons)
    index = run_suite(PAPER, data={"nih": str(tmp_path), "chexpert": str(tmp_path)}, out=tmp_path / "ok",
                      budget="small", attribute="race", only=("A1",), dry_run=True, say=lambda m: None)
    assert any(e["dataset"] == "chexpert" for e in index["entries"])


# -- controls: planted signals on generated cohorts ---------------------------------------------------
def _control_suite(tmp_path: Path, signal: str, grid: list[dict], *, marker_cell=(0, 0), n_patients=700) -> Path:
    """A one-experiment suite folder over a synthetic cohort with a planted signal."""
    folder = tmp_path / f"suite-{signal}"
    folder.mkdir()
    (folder / "_datasets.yaml").write_text("synthetic: {kind: cxr, source: synthetic, attributes: [race]}\n")
    cfg = {
        "suite": {"id": f"ctl-{signal}", "family": "C1", "needs": ["cxr"], "grid": grid},
        "cohort": {"source": "synthetic", "target": "race",
                   "options": {"n_patients": n_patients, "images_per_patient": [1, 1], "groups": ["Black", "White"],
                               "signal": signal, "size": 64, "seed": 7, "marker_cell": list(marker_cell)}},
        "image": {"size": 64, "cache_dir": str(tmp_path / "cache")},
        "model": {"name": "resnet-tiny"},
        # fp32, 15 epochs, flip-only augmentation, no early stop: with Adam at 1e-3 the validation loss of a
        # model that is about to learn the near-Nyquist texture can spike for 4-5 epochs first (seen with
        # training seed 2021 under high-pass d=5: patience 5 stopped it at chance); the best epoch is kept
        "train": {"batch_size": 32, "max_epochs": 15, "early_stopping_patience": 15, "seeds": [2021],
                  "precision": "32",
                  "augment": {"flip": True, "rotate": 0, "zoom": 0}},
        "evaluate": {"n_bootstrap": 100, "reference": False},
    }
    (folder / "ctl.yaml").write_text(json.dumps(cfg))
    return folder


def _aucs(folder: Path, tmp_path: Path) -> dict[str, float]:
    out = tmp_path / f"out-{folder.name}"
    index = run_suite(folder, data={"synthetic": str(tmp_path / "synthetic")}, out=out, say=lambda m: None)
    assert index["counts"] == {"done": len(index["entries"])}, index
    return {e["label"]: e["macro_auc"] for e in index["entries"]}


def _fourier(kind, d):
    return {"perturb": {"train": [{"name": "fourier", "kind": kind, "radius": d}]}}


def test_a_stratum_too_small_to_split_is_skipped_not_failed(tmp_path):
    within = lambda v: {"cohort": {"where": {"sex": v}}}
    folder = _control_suite(tmp_path, "none", [within("F")], n_patients=12)
    index = run_suite(folder, data={"synthetic": str(tmp_path / "synthetic")}, out=tmp_path / "out", say=lambda m: None)
    (entry,) = index["entries"]
    assert index["counts"] == {"skipped": 1}
    assert entry["reason"].startswith("stratum sex=F: split.ratios") and "'val' split would get 1 of" in entry["reason"]


@pytest.mark.slow
def test_control_texture_high_frequency(tmp_path):
    folder = _control_suite(tmp_path, "texture", [_fourier("lowpass", 5), _fourier("highpass", 5)])
    auc = _aucs(folder, tmp_path)
    assert auc["point-1"] > 0.9  # high-pass keeps the near-Nyquist texture
    assert abs(auc["point-0"] - 0.5) < 0.15  # low-pass at a small radius removes it


@pytest.mark.slow
def test_control_lowfreq(tmp_path):
    folder = _control_suite(tmp_path, "lowfreq", [_fourier("lowpass", 5), _fourier("highpass", 25)])
    auc = _aucs(folder, tmp_path)
    assert auc["point-0"] > 0.8
    assert abs(auc["point-1"] - 0.5) < 0.15


@pytest.mark.slow
def test_control_marker_cell(tmp_path):
    cell = lambda op, r, c: {"perturb": {"train": [{"name": op, "row": r, "col": c}]}}
    folder = _control_suite(tmp_path, "marker", [cell("drop_cell", 0, 0), cell("keep_cell", 0, 0),
                                                 cell("drop_cell", 2, 2), cell("keep_cell", 2, 2)])
    auc = _aucs(folder, tmp_path)
    assert abs(auc["point-0"] - 0.5) < 0.15  # marker cell zeroed: chance
    assert auc["point-1"] > 0.9  # only the marker cell kept: found
    assert auc["point-2"] > 0.9  # another cell zeroed: still found
    assert abs(auc["point-3"] - 0.5) < 0.15  # only another cell kept: chance


@pytest.mark.slow
def test_control_null_stays_at_chance(tmp_path):
    folder = _control_suite(tmp_path, "none", [_fourier("highpass", 5), {"perturb": {"train": [
        {"name": "keep_cell", "row": 1, "col": 1}]}}])
    auc = _aucs(folder, tmp_path)
    assert all(abs(v - 0.5) < 0.15 for v in auc.values()), auc


def test_suite_on_nih_plan_when_present():
    if not NIH.is_dir():
        pytest.skip("shared NIH sample not present")
    plan = expand_suite(PAPER, data={"nih": str(NIH)}, budget="small", attribute="sex")
    assert len(plan.runs) == 68  # C1 32, C2 8, C4 18, A1, B3, B4, B5, C3, B5 within 5 age groups
    within = [r for r in plan.runs if r.id == "B5-within-age"]
    assert [r.config["cohort"]["where"] for r in within] == [{"age_group": g} for g in
                                                            ("0-20", "20-40", "40-60", "60-80", "80+")]
    assert not [r for r in plan.runs if r.id == "B5-within-sex"]   # sex is the target: no within-sex runs


def test_cli_suite_dry_run_writes_the_plan(tmp_path, capsys):
    from readingrace.cli import main

    (tmp_path / "nih").mkdir()  # a dry run checks that every --data path exists
    rc = main(["suite", str(PAPER), "--data", f"nih={tmp_path / 'nih'}", "--budget", "small", "--attribute", "sex",
               "--only", "C4", "--shard", "1/2", "--dry-run", "-o", str(tmp_path)])
    assert rc == 0
    index = json.loads((tmp_path / "plan-1-of-2.json").read_text())
    assert index["counts"] == {"planned": 9} and index["shard"] == [1, 2]
    assert not list(tmp_path.glob("suite*.json"))  # a dry run never writes (or replaces) the suite's index
    assert {e["id"] for e in index["entries"]} <= {"C4-drop", "C4-keep"}
    assert main(["suite", str(PAPER), "--data", "nih", "--dry-run", "-o", str(tmp_path)]) == 2
    assert "NAME=PATH" in capsys.readouterr().err


def test_dry_run_keeps_the_suite_index_and_marks_finished_runs(tmp_path):
    index = tmp_path / "suite.json"
    index.write_text('{"entries": [{"id": "C4-drop", "status": "done"}]}')
    kw = dict(data={"nih": str(tmp_path)}, out=tmp_path, budget="small", attribute="sex", only=("C4-drop",),
              say=lambda m: None)
    first = run_suite(PAPER, dry_run=True, **kw)
    done_dir = tmp_path / first["entries"][0]["run_dir"]
    done_dir.mkdir(parents=True)
    (done_dir / "metrics.json").write_text("{}")
    again = run_suite(PAPER, dry_run=True, **kw)
    assert again["counts"] == {"done": 1, "planned": 8}
    assert index.read_text() == '{"entries": [{"id": "C4-drop", "status": "done"}]}'  # untouched
    full = run_suite(PAPER, dry_run=True, **{**kw, "budget": "full"})  # another plan: nothing is done yet
    assert full["counts"] == {"planned": 9} and json.loads((tmp_path / "plan.json").read_text())["budget"] == "full"


def test_dry_run_names_a_data_path_that_does_not_exist(tmp_path):
    from readingrace.experiments.suite import check_data_paths

    with pytest.raises(ConfigError, match=r"--data nih=/nonexist: no such file or folder"):
        run_suite(PAPER, data={"nih": "/nonexist"}, out=tmp_path, budget="small", attribute="sex", only=("A1",),
                  dry_run=True, say=lambda m: None)
    assert not list(tmp_path.iterdir())
    datasets = {"synthetic": {"source": "synthetic"}, "nih": {"source": "nih"}}
    check_data_paths({"synthetic": str(tmp_path / "to-generate"), "nih": str(tmp_path)}, datasets)  # no error
    with pytest.raises(ConfigError, match="synthetic=.*site.yaml: no such file"):
        check_data_paths({"synthetic": str(tmp_path / "site.yaml")}, datasets)


def test_cli_suite_exits_1_when_a_run_failed(tmp_path):
    """The exit status a SLURM array sees: 1 after the suite finished with a failed run; the final line
    says how many failed and where the reasons are."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    args = ["suite", "paper", "--data", "nih=/nonexist", "--budget", "small", "--attribute", "sex", "--only", "A1",
            "-o", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, "-m", "readingrace.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("1 failed;") and last.endswith(
        f"the reasons of the 1 failed run(s) are in {tmp_path / 'out' / 'suite.json'}"), last
    (entry,) = json.loads((tmp_path / "out" / "suite.json").read_text())["entries"]
    assert entry["status"] == "failed" and entry["reason"] == "data folder not found: /nonexist"
    dry = subprocess.run([sys.executable, "-m", "readingrace.cli", *args, "--dry-run"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert dry.returncode == 2 and dry.stderr.strip() == ("error: --data nih=/nonexist: no such file or folder; give "
                                                          "the nih data folder")


def test_ctrl_c_in_training_is_recorded_as_interrupted(tmp_path, monkeypatch):
    import sys

    import readingrace.experiments.run as run_module

    def lightning_on_ctrl_c(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)  # what Lightning's trainer does after its graceful shutdown

    monkeypatch.setattr(run_module, "run_experiment", lightning_on_ctrl_c)
    (tmp_path / "nih").mkdir()
    with pytest.raises(SystemExit):
        run_suite(PAPER, data={"nih": str(tmp_path / "nih")}, out=tmp_path / "out", budget="small", attribute="sex",
                  only=("A1",), say=lambda m: None)
    (entry,) = json.loads((tmp_path / "out" / "suite.json").read_text())["entries"]
    assert entry["status"] == "interrupted" and "rerun the same command" in entry["reason"]


# -- reuse only for the same data ---------------------------------------------------------------------------
def _csv_suite(tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    """A one-experiment suite over a CSV cohort of 12 patients (tiny images; trains in seconds)."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    rows = [{"path": f"img/p{p:03d}.png", "patient_id": f"P{p:03d}", "race": ("Asian", "Black", "White")[p % 3]}
            for p in range(12)]
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(data / "cohort.csv", index=False)
    for i, row in enumerate(rows):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16), dtype=np.uint8)).save(data / row["path"])
    folder = tmp_path / "suite-csv"
    folder.mkdir()
    (folder / "_datasets.yaml").write_text("site: {kind: cxr, source: csv, attributes: [race, sex]}\n")
    cfg = {"suite": {"id": "T1", "needs": ["cxr"]},
           "cohort": {"target": "race", "options": {"csv": "cohort.csv"}},
           "split": {"ratios": [0.5, 0.25, 0.25]}, "image": {"size": 16}, "model": {"name": "resnet-tiny"},
           "train": {"batch_size": 8, "max_epochs": 1, "seeds": [2021], "num_threads": 1,
                     "augment": {"flip": False, "rotate": 0, "zoom": 0}},
           "evaluate": {"n_bootstrap": 20, "reference": False}}
    (folder / "t1.yaml").write_text(json.dumps(cfg))
    return folder, data, rows


def test_finished_run_is_not_reused_for_changed_data(tmp_path):
    folder, data, rows = _csv_suite(tmp_path)
    kw = dict(data={"site": str(data)}, out=tmp_path / "out", say=lambda m: None)
    first = run_suite(folder, **kw)
    assert first["counts"] == {"done": 1} and first["entries"][0]["reused"] is False
    again = run_suite(folder, **kw)
    assert again["counts"] == {"done": 1} and again["entries"][0]["reused"] is True
    for row in rows[:3]:
        (data / row["path"]).unlink()
    changed = run_suite(folder, **kw)
    (entry,) = changed["entries"]
    assert changed["counts"] == {"failed": 1}
    assert entry["reason"].startswith(f"{tmp_path / 'out' / entry['run_dir']}: the cohort differs from the one this "
                                      "run was trained on: 12 images then, 9 now (3 gone, 0 new; e.g. gone: ")
    assert entry["reason"].endswith("); use another --out, or --force to redo")


# -- A1-ext: external validation cells ----------------------------------------------------------------
def test_external_plan_two_datasets_every_ordered_pair():
    plan = expand_suite(PAPER, data={"mimic": "/x", "chexpert": "/y"}, budget="small", only=["A1-ext"])
    train = [r for r in plan.runs if r.kind == "train"]
    cells = [r for r in plan.runs if r.kind == "external"]
    assert sorted(r.dataset for r in train) == ["chexpert", "mimic"] and {r.id for r in train} == {"A1-ext"}
    assert sorted((r.trained_on, r.tested_on) for r in cells) == [("chexpert", "mimic"), ("mimic", "chexpert")]
    assert plan.runs[-2:] == cells  # cells after every training run of the plan
    by_ds = {r.dataset: r for r in train}
    for c in cells:
        assert c.trained_run_dir == by_ds[c.trained_on].run_dir
        assert c.config == by_ds[c.tested_on].config  # the test split is the tested dataset's own run's
        assert c.run_dir == f"A1-ext/{c.trained_on}__on__{c.tested_on}/{c.fingerprint}"
        e = c.entry()
        assert (e["kind"], e["trained_on"], e["tested_on"], e["run_dir"]) == ("external", c.trained_on, c.tested_on,
                                                                            c.run_dir)
        assert "config" not in e and "data_root" not in e
    assert "trained_on" not in train[0].entry()
    # A1-ext trains what A1's first architecture trains (same budget): with A1 planned too, it is reused
    both = expand_suite(PAPER, data={"mimic": "/x", "chexpert": "/y"}, budget="small", only=["A1", "A1-ext"])
    a1 = {r.dataset: r for r in both.runs if r.id == "A1"}
    assert {r.fingerprint for r in a1.values()} == {r.fingerprint for r in train}
    assert [r for r in both.runs if r.id == "A1-ext" and r.kind == "train"] == []
    assert {r.trained_run_dir for r in both.runs if r.kind == "external"} == {r.run_dir for r in a1.values()}
    full = expand_suite(PAPER, data={"mimic": "/x", "chexpert": "/y"})
    fps = [r.fingerprint for r in full.runs]
    assert len(fps) == len(set(fps)) and len([r for r in full.runs if r.kind == "external"]) == 2
    # one dataset: skipped, with the reason
    one = expand_suite(PAPER, data={"mimic": "/x"}, only=["A1-ext"])
    assert one.runs == [] and "two or more datasets" in one.skipped[0].reason


def test_synthetic_data_path_may_be_a_yaml_of_site_options(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("cohort:\n  options: {n_patients: 50, attribute: sex, groups: [F, M], signal: none, seed: 9}\n")
    plan = expand_suite(PAPER, data={"nih": "/nih", "synthetic": str(site)}, budget="small", attribute="sex",
                        only=["A1-ext"])
    gen = next(r for r in plan.runs if r.kind == "train" and r.dataset == "synthetic")
    assert gen.config["cohort"]["options"]["n_patients"] == 50 and gen.data_root is None  # generated into the cache
    assert sorted((r.trained_on, r.tested_on) for r in plan.runs if r.kind == "external") == [
        ("nih", "synthetic"), ("synthetic", "nih")]
    folder = expand_suite(PAPER, data={"synthetic": str(tmp_path / "gen")}, budget="small", only=["A1"])
    assert folder.runs[0].data_root == str(tmp_path / "gen")  # a folder: where the images are generated
    with pytest.raises(ConfigError, match="no such file"):
        expand_suite(PAPER, data={"synthetic": str(tmp_path / "missing.yaml")}, only=["A1"])


def _external_suite(tmp_path: Path) -> Path:
    """Two generated sites (same planted marker, different scanner look) and an A1-ext-like experiment."""
    folder = tmp_path / "suite-ext"
    folder.mkdir()
    opts = {"n_patients": 300, "images_per_patient": [1, 1], "groups": ["Black", "White"], "signal": "marker",
            "size": 64}
    datasets = {
        "site-a": {"kind": "cxr", "source": "synthetic", "attributes": ["race"],
                   "config": {"cohort": {"options": {**opts, "seed": 1, "site": "site-a"}}}},
        "site-b": {"kind": "cxr", "source": "synthetic", "attributes": ["race"],
                   "config": {"cohort": {"options": {**opts, "seed": 2, "site": "site-b", "appearance": {
                       "gamma": 1.4, "contrast": 0.8, "noise": 0.03, "blur": 0.5}}}}},
    }
    (folder / "_datasets.yaml").write_text(json.dumps(datasets))
    cfg = {"suite": {"id": "ext", "family": "A", "needs": ["cxr"], "kind": "external", "grid": "none"},
           "cohort": {"target": "race"},
           "image": {"size": 64, "cache_dir": str(tmp_path / "cache")}, "model": {"name": "resnet-tiny"},
           "train": {"batch_size": 32, "max_epochs": 6, "early_stopping_patience": 3, "seeds": [2021],
                     "precision": "32", "augment": {"flip": False, "rotate": 0, "zoom": 0}},
           "evaluate": {"n_bootstrap": 200, "reference": False}}
    (folder / "ext.yaml").write_text(json.dumps(cfg))
    return folder


@pytest.mark.slow
def test_suite_runs_external_cells_across_shards(tmp_path):
    from readingrace.report.collect import collect

    folder = _external_suite(tmp_path)
    data = {"site-a": str(tmp_path / "gen"), "site-b": str(tmp_path / "gen")}
    out = tmp_path / "out"
    plan = expand_suite(folder, data=data)
    assert [r.kind for r in plan.runs] == ["train", "train", "external", "external"]
    shard_of = {r.run_dir: i for i in (1, 2, 3, 4) for r in shard(plan.runs, i, 4)}  # one run per shard
    assert sorted(shard_of.values()) == [1, 2, 3, 4]
    cells = [r for r in plan.runs if r.kind == "external"]
    quiet = lambda m: None
    # a cell's shard first: its trained run lives in another shard and is not finished
    first = run_suite(folder, data=data, out=out, shard_=(shard_of[cells[0].run_dir], 4), say=quiet)
    (entry,) = first["entries"]
    assert entry["status"] == "waiting" and entry["kind"] == "external"
    assert entry["reason"] == (f"trained run on {cells[0].trained_on} not finished: run its shard first, then rerun "
                               "this command")
    for r in plan.runs:  # the training shards
        if r.kind == "train":
            idx = run_suite(folder, data=data, out=out, shard_=(shard_of[r.run_dir], 4), say=quiet)
            assert idx["counts"] == {"done": 1}
    for c in cells:  # rerun the cell shards: now they run
        idx = run_suite(folder, data=data, out=out, shard_=(shard_of[c.run_dir], 4), say=quiet)
        (e,) = idx["entries"]
        assert e["status"] == "done" and not e["reused"], e
        assert (e["trained_on"], e["tested_on"], e["run_dir"]) == (c.trained_on, c.tested_on, c.run_dir)
        assert e["macro_auc"] > 0.8, e  # the marker transfers across scanner looks
    # collect merges the shards: the matrix has the two cells and the diagonal from the trained runs
    col = collect([out], out=tmp_path / "tables")
    (title, matrix), = col.external.items()
    assert title == "ext (race)"
    got = {(c["trained_on"], c["tested_on"]): c for c in matrix}
    assert set(got) == {(x, y) for x in ("site-a", "site-b") for y in ("site-a", "site-b")}
    for r in plan.runs[:2]:
        own = json.loads((out / r.run_dir / "metrics.json").read_text())
        assert got[(r.dataset, r.dataset)]["internal"] and got[(r.dataset, r.dataset)]["macro_auc"] == own["macro_auc"]
    assert {r.id for r in col.runs} == {"ext"} and len(col.runs) == 2  # cells are not counted as trained runs
    assert (tmp_path / "tables" / "external-ext_race.png").is_file()
    # the whole suite again: everything reused, the cells too
    again = run_suite(folder, data=data, out=out, say=quiet)
    assert again["counts"] == {"done": 4}
    assert all(e["reused"] for e in again["entries"])


def test_external_cell_blocked_by_a_failed_training_run(tmp_path):
    folder = _external_suite(tmp_path)
    data = {"site-a": str(tmp_path / "gen"), "site-b": str(tmp_path / "gen")}
    # a cohort that cannot be built: both training runs fail, and so the cells say why they cannot run
    index = run_suite(folder, data=data, out=tmp_path / "out", overrides={"cohort": {"target": "sex", "where": {
        "sex": "nobody"}}}, say=lambda m: None)
    status = {e["kind"]: set() for e in index["entries"]}
    for e in index["entries"]:
        status[e["kind"]].add(e["status"])
    assert status == {"train": {"failed"}, "external": {"blocked"}}
    reasons = [e["reason"] for e in index["entries"] if e["kind"] == "external"]
    assert all(r.startswith("trained run on site-") and "failed" in r for r in reasons)


def test_c3_uses_lung_mask_pairs_when_given_and_says_so_when_not(tmp_path):
    (tmp_path / "pairs.csv").write_text("image,mask\n")
    with_masks = expand_suite(PAPER, data={"nih": "/nih", "lungs": str(tmp_path)}, budget="small", attribute="sex",
                              only=["C3"])
    (c3,) = with_masks.runs
    assert c3.config["evaluate"]["lungs"]["unet_pairs"] == str((tmp_path / "pairs.csv").resolve())
    assert not with_masks.skipped
    # the lung pairs are not a cohort: no experiment runs on them
    assert {r.dataset for r in expand_suite(PAPER, data={"nih": "/nih", "lungs": str(tmp_path)}, budget="small",
                                            attribute="sex").runs} == {"nih"}
    without = expand_suite(PAPER, data={"nih": "/nih"}, budget="small", attribute="sex", only=["C3"])
    (c3_plain,) = without.runs
    assert "lungs" not in c3_plain.config["evaluate"]
    (note,) = without.skipped
    assert note.id == "C3 (lung-only, non-lung)" and "--data lungs=" in note.reason


def test_a_finished_tabular_analysis_is_not_reused_for_changed_data(tmp_path):
    import pandas as pd

    from readingrace.config import config_from_dict
    from readingrace.errors import RunError
    from readingrace.experiments.suite import _run_confounders

    folder, data, rows = _csv_suite(tmp_path)
    table = pd.read_csv(data / "cohort.csv")
    table["Effusion"] = [i % 2 for i in range(len(table))]  # a finding label for the B3 models
    table.to_csv(data / "cohort.csv", index=False)
    cfg = config_from_dict({"cohort": {"source": "csv", "target": "race", "options": {"csv": "cohort.csv"},
                                       "min_prevalence": 0},
                            "confounders": {"analyses": ["chi_square"], "strata": ["Effusion"]}})
    run_dir = tmp_path / "b3"
    assert _run_confounders(cfg, run_dir, data_root=str(data)) == {"reused": False}
    assert _run_confounders(cfg, run_dir, data_root=str(data)) == {"reused": True}
    (data / rows[0]["path"]).unlink()
    with pytest.raises(RunError, match=r"the cohort differs .*: 12 images then, 11 now \(1 gone, 0 new"):
        _run_confounders(cfg, run_dir, data_root=str(data))

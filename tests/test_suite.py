"""The paper suite: expansion of configs/paper, content addresses, shards, collect, and the controls.

The controls train tiny models on generated cohorts with a planted signal and check that the grids
find it where it is (and only there); they take about a minute each on 2 quiet cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from readingrace.errors import ConfigError
from readingrace.experiments.suite import expand_suite, parse_data, parse_shard, run_suite, shard

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper"
NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih-cxr14-sample"


def _ids(plan, id_):
    return [r for r in plan.runs if r.id == id_]


def test_full_grid_matches_the_paper():
    plan = expand_suite(PAPER, data={"mimic": "/data/mimic"})
    assert [r.point["d"] for r in _ids(plan, "C1-lowpass")] == [1, 5, 10, 25, 50, 75, 100, 125, 150, 200]
    assert len(_ids(plan, "C1-highpass")) == 10
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
    assert "probe" in reasons[("A3", "mimic")]


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
        # as the pipeline test that learns the texture: fp32, up to 15 epochs, flip-only augmentation
        "train": {"batch_size": 32, "max_epochs": 15, "early_stopping_patience": 5, "seeds": [2021], "precision": "32",
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
    cell = lambda op, r, c: {"perturb": {"train": [{"name": op, "row": r, "col": c}]}}  # noqa: E731
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


def test_cli_suite_dry_run_writes_the_index(tmp_path, capsys):
    from readingrace.cli import main

    rc = main(["suite", str(PAPER), "--data", "nih=/data/nih", "--budget", "small", "--attribute", "sex",
               "--only", "C4", "--shard", "1/2", "--dry-run", "-o", str(tmp_path)])
    assert rc == 0
    index = json.loads((tmp_path / "suite-1-of-2.json").read_text())
    assert index["counts"] == {"planned": 9} and index["shard"] == [1, 2]
    assert {e["id"] for e in index["entries"]} <= {"C4-drop", "C4-keep"}
    assert main(["suite", str(PAPER), "--data", "nih", "--dry-run", "-o", str(tmp_path)]) == 2
    assert "NAME=PATH" in capsys.readouterr().err

"""Run folders a user can trust: locks that leave no file behind, folders of failed starts taken over,
readingrace's own subfolders, and Ctrl-C (exit status 130, resumed from the last completed epoch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from readingrace.config import config_from_dict
from readingrace.errors import RunError
from readingrace.experiments.run import has_results, run_experiment, training_time
from readingrace.experiments.rundir import LOCK, MARKER, RunLock, refuse_foreign_folder


def tiny_config(**evaluate) -> dict:
    """A generated two-class cohort small enough to train in a second or two."""
    return {
        "name": "tiny",
        "cohort": {"source": "synthetic", "target": "race",
                   "options": {"n_patients": 60, "images_per_patient": [1, 1], "groups": ["Black", "White"],
                               "signal": "marker", "size": 32, "seed": 3}},
        "image": {"size": 16},
        "model": {"name": "resnet-tiny"},
        "train": {"batch_size": 16, "max_epochs": 3, "early_stopping_patience": 5, "precision": "32",
                  "seeds": [2021], "num_threads": 1, "augment": {"flip": False, "rotate": 0, "zoom": 0}},
        "evaluate": {"n_bootstrap": 20, "reference": False, **evaluate},
    }


# -- the lock ---------------------------------------------------------------------------------------------
def test_lock_is_exclusive_and_leaves_no_lock_file(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with RunLock(folder):
        assert (folder / LOCK).read_text() == f"readingrace pid {os.getpid()}"
        with pytest.raises(RunError, match=f"in use by readingrace pid {os.getpid()}"):
            RunLock(folder).__enter__()
        (folder / "result.txt").write_text("x")
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, "result.txt"]  # no stale .lock
    with RunLock(folder):  # and the folder can be taken again
        pass
    assert not (folder / LOCK).exists()


def test_a_folder_left_empty_keeps_no_marker(tmp_path: Path) -> None:
    with pytest.raises(ValueError), RunLock(tmp_path / "new"):
        raise ValueError("failed before writing anything")
    assert (tmp_path / "new").is_dir() and list((tmp_path / "new").iterdir()) == []


def test_lock_of_a_file_removed_meanwhile_is_retaken(tmp_path: Path, monkeypatch) -> None:
    """The previous holder removes .lock between our open and our flock: we must not hold a removed file."""
    import fcntl

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK).write_text("readingrace pid 1")
    real_flock, calls = fcntl.flock, []

    def flock_after_release(fh, op):
        if not calls:  # the first attempt: its file is removed before our lock takes hold
            (folder / LOCK).unlink()
        calls.append(op)
        return real_flock(fh, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_release)
    with RunLock(folder) as lock:
        assert os.fstat(lock._fh.fileno()).st_ino == os.stat(folder / LOCK).st_ino
        assert len([c for c in calls if c & fcntl.LOCK_EX]) == 2


# -- whose folder is it --------------------------------------------------------------------------------------
def test_subfolders_of_other_commands_are_readingraces(tmp_path: Path) -> None:
    folder = tmp_path / "nih-sex"
    for sub in ("probe", "cohort", "external/other", "evaluation", "subgroups", "confounders"):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "x.csv").write_text("a\n")
    refuse_foreign_folder(folder)  # no error
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match=r"holds files that are not from a readingrace run \(notes.txt\)"):
        refuse_foreign_folder(folder)
    (folder / "notes.txt").unlink()
    (folder / "probe.csv").write_text("mine")  # a file, not one of our folders
    with pytest.raises(RunError, match=r"\(probe.csv\)"):
        refuse_foreign_folder(folder)


def test_run_after_probe_into_its_default_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "tiny"
    with RunLock(run_dir / "probe"):  # what `readingrace probe` does by default
        (run_dir / "probe" / "audit.json").write_text("{}")
    metrics = run_experiment(config_from_dict(tiny_config()), out=run_dir, say=lambda m: None)
    assert metrics["macro_auc"] is not None and (run_dir / "probe" / "audit.json").read_text() == "{}"


# -- failed starts ----------------------------------------------------------------------------------------------
def test_unfinished_attempt_of_another_config_is_taken_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    said: list[str] = []
    # fails after config.yaml, cohort.csv and manifest.json are written, before any training
    with pytest.raises(Exception, match="not cohort columns"):
        run_experiment(config_from_dict(tiny_config(strata=["scanner"])), out=run_dir, say=said.append)
    assert (run_dir / "config.yaml").exists() and not has_results(run_dir) and not (run_dir / LOCK).exists()
    fixed = config_from_dict(tiny_config())
    metrics = run_experiment(fixed, out=run_dir, say=said.append)
    notice = [m for m in said if "unfinished attempt" in m]
    assert len(notice) == 1 and "replacing the files" in notice[0]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["fingerprint"] == fixed.fingerprint()
    assert metrics["run"]["fingerprint"] == fixed.fingerprint() and has_results(run_dir)
    # a folder with results of another config is still refused, its results kept
    other = config_from_dict({**tiny_config(), "split": {"ratios": [0.5, 0.2, 0.3], "seed": 1}})
    with pytest.raises(RunError, match="holds a run of a different config"):
        run_experiment(other, out=run_dir, say=said.append)
    assert json.loads((run_dir / "metrics.json").read_text())["run"]["fingerprint"] == fixed.fingerprint()


@pytest.mark.parametrize("kind, result", [("disease", "model/checkpoints/last.ckpt"),
                                          ("a3", "pathology/config.yaml"), ("confounders", "confounders.json")])
def test_another_commands_folder_is_never_taken_over(tmp_path: Path, kind: str, result: str) -> None:
    """An interrupted disease or A3 run, or a tabular analysis, is not "an unfinished attempt": kept, refused."""
    from readingrace.experiments.run import _check_run_dir

    (tmp_path / "config.yaml").write_text(f"kind: {kind}\nfingerprint: abc\n")
    (tmp_path / result).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / result).write_bytes(b"x")
    (tmp_path / "cohort.csv").write_text("image_id\n")
    assert has_results(tmp_path)
    with pytest.raises(RunError, match=f"holds a `readingrace {kind}` run, not a `readingrace run` run"):
        _check_run_dir(tmp_path, config_from_dict(tiny_config()), False, lambda m: None)
    assert (tmp_path / "cohort.csv").is_file() and (tmp_path / result).is_file()


def test_has_results_counts_checkpoints_predictions_and_metrics(tmp_path: Path) -> None:
    (tmp_path / "seed-1" / "logs").mkdir(parents=True)
    (tmp_path / "config.yaml").write_text("fingerprint: x\n")
    (tmp_path / "cohort.csv").write_text("a\n")
    assert not has_results(tmp_path)
    (tmp_path / "seed-1" / "checkpoints").mkdir()
    (tmp_path / "seed-1" / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert has_results(tmp_path)


def test_training_time_of_all_attempts_or_this_one(tmp_path: Path) -> None:
    assert training_time(tmp_path, 12.4) == "12 s"
    (tmp_path / "attempts.json").write_text(json.dumps([{"seconds": 5.0, "outcome": "interrupted"},
                                                        {"seconds": 12.4, "outcome": "finished"}]))
    assert training_time(tmp_path, 12.4) == "17 s in 2 attempts"
    (tmp_path / "attempts.json").write_text(json.dumps([{"seconds": None, "outcome": "running"},  # killed
                                                        {"seconds": 12.4, "outcome": "finished"}]))
    assert training_time(tmp_path, 12.4) == "12 s (this attempt)"


# -- Ctrl-C ---------------------------------------------------------------------------------------------------
#: The CLI in a real process, with a real SIGINT at the start of the second epoch (as if Ctrl-C was pressed).
CTRL_C_IN_EPOCH_2 = """
import os, signal, sys
from readingrace.train import ImageClassifier
def on_train_epoch_start(self):
    if self.current_epoch == 1:
        os.kill(os.getpid(), signal.SIGINT)
ImageClassifier.on_train_epoch_start = on_train_epoch_start
from readingrace.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_during_training_exits_130_and_the_rerun_resumes(tmp_path: Path) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config()))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    args = ["run", str(cfg), "--out", str(out)]
    first = subprocess.run([sys.executable, "-c", CTRL_C_IN_EPOCH_2, *args], env=env, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 130, first.stderr
    assert first.stderr.strip().splitlines()[-1] == ("interrupted; run the same command again to resume from the "
                                                     "last completed epoch")
    assert "Traceback" not in first.stderr and not (out / LOCK).exists()
    assert json.loads((out / "seed-2021" / "attempts.json").read_text())[0]["outcome"] == "interrupted"
    second = subprocess.run([sys.executable, "-m", "readingrace.cli", *args], env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "resuming seed 2021 from epoch 1" in second.stderr
    summary = next(line for line in second.stderr.splitlines() if line.startswith("seed 2021: test macro AUC"))
    assert summary.endswith("in 2 attempts)"), summary
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["resumed_from_epoch"] == 1 and metrics["training"]["epochs"] == 3


def test_ctrl_c_outside_training_prints_the_line_and_exits_130(monkeypatch, capsys) -> None:
    import readingrace.config
    from readingrace.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(readingrace.config, "load_config", interrupted)
    assert main(["run", "whatever.yaml"]) == 130
    assert "interrupted; run the same command again" in capsys.readouterr().err


# -- reuse needs the same data: the cohort is rebuilt (memoised within the process) ---------------------------
def test_build_cohort_is_memoised_returns_copies_and_notices_changed_files(tmp_path: Path, monkeypatch) -> None:
    import numpy as np
    import pandas as pd
    from PIL import Image

    import readingrace.cohort.build as build
    from readingrace.config import CohortConfig

    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    rows = [{"path": f"img/{p}.png", "patient_id": f"P{p}", "sex": "FM"[p % 2]} for p in range(8)]
    pd.DataFrame(rows).to_csv(data / "cohort.csv", index=False)
    for p in range(8):
        Image.fromarray(np.full((8, 8), 20 * p + 10, dtype=np.uint8)).save(data / f"img/{p}.png")
    loads = []
    real = build.get_loader
    monkeypatch.setattr(build, "get_loader", lambda source: loads.append(source) or real(source))
    cfg = CohortConfig(source="csv", target="sex", options={"csv": "cohort.csv"})

    first, manifest = build.build_cohort(cfg, data_root=data)
    first.loc[0, "sex"] = "X"  # a caller's change must not reach the memo
    manifest.warn("mine")
    second, manifest2 = build.build_cohort(cfg, data_root=str(data / "img" / ".."))  # the same folder
    assert len(loads) == 1 and second.loc[0, "sex"] == "F" and "mine" not in manifest2.warnings
    fewer, _ = build.build_cohort(CohortConfig(source="csv", target="sex", options={"csv": "cohort.csv"},
                                               max_images=6), data_root=data)
    assert len(fewer) == 6 and len(loads) == 1  # another cohort of the same source: built, the source read once
    (data / "img" / "7.png").unlink()  # an image gone: read and built again
    third, _ = build.build_cohort(cfg, data_root=data)
    assert len(loads) == 2 and len(third) == 7
    pd.DataFrame([{**r, "sex": "M"} if r["patient_id"] == "P0" else r for r in rows]).to_csv(data / "cohort.csv",
                                                                                          index=False)
    fourth, _ = build.build_cohort(cfg, data_root=data)  # the metadata edited: read and built again
    assert len(loads) == 3 and fourth.loc[fourth["patient_id"] == "P0", "sex"].item() == "M"
    # a metadata file in a subfolder (as CheXpert's train.csv), edited in place with the same size
    import os

    (data / "meta").mkdir()
    (data / "cohort.csv").rename(data / "meta" / "cohort.csv")
    sub = CohortConfig(source="csv", target="sex", options={"csv": "meta/cohort.csv", "image_root": "."})
    before, _ = build.build_cohort(sub, data_root=data)
    text = (data / "meta" / "cohort.csv").read_text()
    (data / "meta" / "cohort.csv").write_text(text.replace("P1,M", "P1,F", 1))  # same size
    st = os.stat(data / "meta" / "cohort.csv")
    os.utime(data / "meta" / "cohort.csv", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after, _ = build.build_cohort(sub, data_root=data)
    assert before.loc[before["patient_id"] == "P1", "sex"].item() == "M"
    assert after.loc[after["patient_id"] == "P1", "sex"].item() == "F"
    # sources that find their metadata themselves (NIH's Data_Entry*.csv, CheXpert's train.csv): the files the
    # source read are part of the stamp even when no option names them
    _, read = build.build_cohort(sub, data_root=data)
    files = read.input_files
    assert files == [str((data / "meta" / "cohort.csv").resolve())]
    unnamed = CohortConfig(source="nih", target="sex")
    stamp = build.data_stamp(unnamed, data, after["path"], files)
    os.utime(data / "meta" / "cohort.csv", ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert build.data_stamp(unnamed, data, after["path"], files) != stamp
    assert build.data_stamp(unnamed, data, after["path"]) == build.data_stamp(unnamed, data, after["path"])


def test_resume_is_refused_when_the_images_that_decode_now_split_differently(tmp_path: Path) -> None:
    import pandas as pd

    from readingrace.experiments.run import check_same_split

    recorded = pd.DataFrame({"image_id": ["a", "b", "c", "d"], "split": ["train", "train", "val", "test"]})
    recorded.to_csv(tmp_path / "cohort.csv", index=False)
    check_same_split(tmp_path, recorded.copy())  # the same split: resumed
    moved = recorded.assign(split=["train", "val", "train", "test"])  # a repaired image reshuffled patients
    with pytest.raises(RunError, match=r"split the patients differently .* \(2 image\(s\) added, dropped or in "
                                       r"another split, e\.g\. b\)"):
        check_same_split(tmp_path, moved)
    with pytest.raises(RunError, match=r"1 image\(s\) added, dropped"):
        check_same_split(tmp_path, recorded.iloc[:3])  # an image that decoded then fails now

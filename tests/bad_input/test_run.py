"""Bad inputs of ``readingrace run``: impossible splits, one class, run-folder problems, a full disk.

All but one case fail before training starts; the one training run (resnet-tiny, 16 px, 1 epoch)
shows an unreadable image recorded as a skip with stage "image" while the other images are used.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from readingrace.errors import LeakageError, SplitError
from readingrace.split import check_no_leakage, split_patients

from .conftest import (
    assert_user_error,
    cohort_rows,
    csv_config,
    make_dataset,
    tree_hashes,
    write_config,
    write_csv,
    write_images,
)


def run_cmd(cli, ds, out: Path, *extra: object):
    return cli("run", ds.config, "--data-root", ds.root, "--out", out, *extra)


# -- splits ---------------------------------------------------------------------------------------------
def test_class_with_one_patient(cli, tmp_path: Path) -> None:
    rows = cohort_rows(24) + [{**cohort_rows(1)[0], "patient_id": "P999", "path": "img/x.png", "race": "Other"}]
    ds = make_dataset(tmp_path, rows, config=csv_config(min_prevalence=0.0))
    assert_user_error(run_cmd(cli, ds, tmp_path / "out"), "class 'Other' of 'race' has 1 patient(s)",
                      "min_prevalence")


def test_empty_test_split(cli, tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, cohort_rows(24), config=csv_config(ratios=[0.9, 0.05, 0.05]))
    assert_user_error(run_cmd(cli, ds, tmp_path / "out"), "split.ratios [0.9, 0.05, 0.05]",
                      "split would get", "raise its ratio")


def test_two_way_split_has_no_test_part(cli, tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, cohort_rows(12), config=csv_config(ratios=[0.5, 0.5]))
    assert_user_error(run_cmd(cli, ds, tmp_path / "out"), "split.ratios [0.5, 0.5]: a run needs three parts")


def test_attribute_with_one_class(cli, tmp_path: Path) -> None:
    rows = [{**r, "sex": "F"} for r in cohort_rows(12)]
    ds = make_dataset(tmp_path, rows, config=csv_config(target="sex"))
    assert_user_error(run_cmd(cli, ds, tmp_path / "out"), "target 'sex' has 1 class(es)", "['F']")


def test_split_part_smaller_than_classes_direct() -> None:
    df = pd.DataFrame({"patient_id": [f"p{i}" for i in range(9)], "race": ["A", "B", "C"] * 3})
    with pytest.raises(SplitError, match=r"the 'val' split would get 0 of 9 patients, fewer than the 3 classes"):
        split_patients(df, target="race", ratios=[0.9, 0.05, 0.05], seed=1)


def test_leakage_is_refused() -> None:
    df = pd.DataFrame({"patient_id": ["a", "a", "b"], "split": ["train", "test", "val"]})
    with pytest.raises(LeakageError, match=r"patient 'a' in \['test', 'train'\]"):
        check_no_leakage(df)


def test_missing_data_root(cli, tmp_path: Path) -> None:
    ds = make_dataset(tmp_path)
    res = cli("run", ds.config, "--data-root", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert_user_error(res, "data folder not found", "nowhere")


# -- input files named by the config: checked before anything is trained or written -------------------------
@pytest.mark.parametrize(("setting", "key", "relative"), [
    ({"model": {"name": "resnet-tiny", "weights": "pretrained/tiny.pt"}}, "model.weights", "pretrained/tiny.pt"),
    ({"evaluate": {"lungs": {"unet_pairs": "masks/pairs.csv"}}}, "evaluate.lungs.unet_pairs", "masks/pairs.csv"),
    ({"evaluate": {"lungs": {"masks_csv": "masks/masks.csv"}}}, "evaluate.lungs.masks_csv", "masks/masks.csv"),
])
def test_missing_input_file_is_named_before_training(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     setting: dict, key: str, relative: str) -> None:
    ds = make_dataset(tmp_path, config=csv_config(**setting))
    monkeypatch.chdir(tmp_path)  # relative config paths are relative to the current folder
    assert_user_error(run_cmd(cli, ds, tmp_path / "out"), f"{key}: file not found: {tmp_path / relative}",
                      f"relative to the current folder {tmp_path}")
    assert not (tmp_path / "out").exists()  # nothing trained or written


def test_unparsable_lung_pairs_file_is_refused_before_training(cli, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("picture,outline\na.png,a_mask.png\n")
    ds = make_dataset(tmp_path, config=csv_config(evaluate={"lungs": {"unet_pairs": str(pairs)}}))
    assert_user_error(run_cmd(cli, ds, tmp_path / "out"), str(pairs), "needs columns image_path, mask_path")
    assert not (tmp_path / "out").exists()
    # the columns are right, but the files it lists are not there: said before training, nothing written
    pairs.write_text("image,mask\nnope/a.png,nope/a_mask.png\n")
    assert_user_error(run_cmd(cli, ds, tmp_path / "out"), "evaluate.lungs.unet_pairs: 2 of the 2 files",
                      str(tmp_path / "nope" / "a.png"))
    assert not (tmp_path / "out").exists()


# -- run folders ------------------------------------------------------------------------------------------
def test_folder_of_a_different_config(cli, tmp_path: Path) -> None:
    ds = make_dataset(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("fingerprint: 0123456789abcdef\nname: other\n")
    (out / "metrics.json").write_text("{}")  # with a result (a folder without one is taken over)
    assert_user_error(run_cmd(cli, ds, out), str(out), "different config", "--force")


@pytest.mark.parametrize("theirs", [["report.md", "cohort.csv"], ["suite.json"]])
def test_folder_of_the_users_own_files_is_refused_untouched(cli, tmp_path: Path, theirs: list[str]) -> None:
    """A non-empty folder that was never a run folder (the user's notes, a suite folder) is not written into."""
    ds = make_dataset(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for name in theirs:
        (out / name).write_text("my own notes\n")
    assert_user_error(run_cmd(cli, ds, out), str(out), "holds files that are not from a readingrace run",
                      theirs[0], "--out")
    assert sorted(p.name for p in out.iterdir()) == sorted(theirs)
    assert all((out / name).read_text() == "my own notes\n" for name in theirs)


def test_failed_start_leaves_nothing_and_a_failed_attempt_is_taken_over(cli, tmp_path: Path) -> None:
    ds = make_dataset(tmp_path)
    out = tmp_path / "out"
    assert_user_error(cli("run", ds.config, "--data-root", tmp_path / "nowhere", "--out", out), "data folder not found")
    assert not out.exists()
    # an attempt that failed after writing its config.yaml (no checkpoint, predictions or metrics)
    bad = write_config(tmp_path / "bad.yaml", csv_config(evaluate={"strata": ["scanner"]}))
    assert_user_error(cli("run", bad, "--data-root", ds.root, "--out", out), "['scanner'] are not cohort columns")
    assert (out / "config.yaml").exists() and not (out / ".lock").exists()
    res = run_cmd(cli, ds, out)
    assert res.code == 0, res.err
    notices = [line for line in res.err.splitlines() if "unfinished attempt" in line]
    assert len(notices) == 1 and notices[0].startswith(f"{out}: replacing the files of an unfinished attempt")
    assert (out / "metrics.json").exists() and not (out / ".lock").exists()


def test_folder_in_use_by_another_process(cli, tmp_path: Path) -> None:
    ds = make_dataset(tmp_path)
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from readingrace.experiments.rundir import RunLock\n"
         "with RunLock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_user_error(run_cmd(cli, ds, out), f"{out} is in use by readingrace pid {holder.pid}", "--out")
        assert_user_error(cli("cohort", ds.config, "--data-root", ds.root, "--out", out), "is in use")
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "cohort.csv").exists()


def test_output_folder_not_writable(cli, tmp_path: Path) -> None:
    ds = make_dataset(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    before = tree_hashes(ds.root)
    assert_user_error(run_cmd(cli, ds, blocker / "out"), "cannot write to the output folder", "--out")
    assert tree_hashes(ds.root) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_output_folder(cli, tmp_path: Path) -> None:
    ds = make_dataset(tmp_path)
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        before = tree_hashes(ds.root)
        assert_user_error(run_cmd(cli, ds, out), "cannot write", str(out))
        assert tree_hashes(ds.root) == before
    finally:
        out.chmod(0o700)


def test_read_only_file_system(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only output folder, simulated (tests may run as root, who ignores permissions)."""
    import readingrace.experiments.rundir as rundir

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    ds = make_dataset(tmp_path)
    out = tmp_path / "ro"
    out.mkdir()
    monkeypatch.setattr(rundir, "open", read_only, raising=False)
    before = tree_hashes(ds.root)
    assert_user_error(run_cmd(cli, ds, out), f"cannot write to the output folder {out}",
                      os.strerror(errno.EROFS), "--out")
    assert tree_hashes(ds.root) == before
    assert list(out.iterdir()) == []


def test_disk_full(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import readingrace.experiments.rundir as rundir

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rundir.os, "replace", full)
    ds = make_dataset(tmp_path)
    before = tree_hashes(ds.root)
    out = tmp_path / "out"
    assert_user_error(run_cmd(cli, ds, out), "cannot write", "config.yaml", "the disk is full")
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []  # no half-written files
    assert tree_hashes(ds.root) == before


def test_failed_run_leaves_inputs_untouched(cli, tmp_path: Path) -> None:
    rows = cohort_rows(24) + [{**cohort_rows(1)[0], "patient_id": "P999", "path": "img/x.png", "race": "Other"}]
    ds = make_dataset(tmp_path, rows, config=csv_config(min_prevalence=0.0))
    before = {**tree_hashes(ds.root), "config": tree_hashes(ds.config.parent)[ds.config.name]}
    assert run_cmd(cli, ds, tmp_path / "out").code == 2
    assert {**tree_hashes(ds.root), "config": tree_hashes(ds.config.parent)[ds.config.name]} == before


# -- one real (tiny) training run -------------------------------------------------------------------------
@pytest.mark.slow
def test_unreadable_image_is_recorded_and_run_completes(cli, tmp_path: Path) -> None:
    rows = cohort_rows(24)
    ds = make_dataset(tmp_path, rows)
    bad = ds.root / rows[5]["path"]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    before = tree_hashes(ds.root)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    res = run_cmd(cli, ds, out)
    assert res.code == 0, res.err
    assert time.perf_counter() - t0 < 120
    m = json.loads((out / "manifest.json").read_text())
    image_skips = [s for s in m["skipped"] if s["stage"] == "image"]
    assert len(image_skips) == 1
    assert image_skips[0]["item"].endswith(rows[5]["path"]) and image_skips[0]["reason"].startswith("truncated file")
    step = next(s for s in m["flow"] if s["step"] == "image decodes")
    assert (step["images_before"], step["images_after"]) == (24, 23)
    assert len(pd.read_csv(out / "cohort.csv")) == 23
    assert tree_hashes(ds.root) == before
    # reports carry no patient identifiers (predictions.csv needs them for the clustered bootstrap)
    for name in ("report.md", "metrics.json"):
        text = (out / name).read_text()
        assert not any(r["patient_id"] in text for r in rows), name
    # a second run with another config in the same folder is refused, the results kept
    other = write_config(tmp_path / "other.yaml", csv_config(ratios=[0.6, 0.2, 0.2]))
    res2 = cli("run", other, "--data-root", ds.root, "--out", out)
    assert_user_error(res2, "holds a run of a different config")
    assert (out / "metrics.json").exists()


@pytest.mark.slow
def test_finished_or_interrupted_run_on_changed_data_is_refused(cli, tmp_path: Path) -> None:
    """Results are reused, and an interrupted run resumed, only for the cohort it was trained on."""
    rows = cohort_rows(12)
    ds = make_dataset(tmp_path, rows)
    out = tmp_path / "out"
    assert run_cmd(cli, ds, out).code == 0
    again = run_cmd(cli, ds, out)
    assert again.code == 0 and f"results already in {out}" in again.err + again.out  # same data: reused
    metrics = (out / "metrics.json").read_text()
    for row in rows[:3]:  # three images gone from the data folder (the metadata CSV unchanged)
        (ds.root / row["path"]).unlink()
    msg = assert_user_error(run_cmd(cli, ds, out), f"{out}: the cohort differs from the one this run was trained on",
                            "12 images then, 9 now (3 gone, 0 new", "another --out, or --force to redo")
    assert "e.g. gone: img/p000_0.png" in msg and (out / "metrics.json").read_text() == metrics
    (out / "metrics.json").unlink()  # as if interrupted: checkpoints but no metrics
    assert_user_error(run_cmd(cli, ds, out), "12 images then, 9 now (3 gone, 0 new")
    # the same images, but two patients' labels swapped in the CSV
    write_images(ds.root, rows)
    swap = {"P001": "White", "P002": "Black"}
    write_csv(ds.csv, [{**r, "race": swap.get(r["patient_id"], r["race"])} for r in rows])
    assert_user_error(run_cmd(cli, ds, out), "12 images then, 12 now (0 gone, 0 new, 2 with another patient_id or race")
    forced = run_cmd(cli, ds, out, "--force")
    assert forced.code == 0, forced.err
    assert pd.read_csv(out / "cohort.csv").set_index("patient_id").loc["P001", "race"] == "White"

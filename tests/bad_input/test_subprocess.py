"""A handful of cases through the real command line in a separate process: exit status 2, one
``error:`` line naming the file / row / key, and no traceback on stderr."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


from .conftest import assert_user_error, cohort_rows, csv_config, make_dataset, run_cli_subprocess



def test_cohort_missing_column(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "patient_id"} for r in cohort_rows()]
    ds = make_dataset(tmp_path, rows)
    res = run_cli_subprocess("cohort", ds.config, "--data-root", ds.root, "--out", tmp_path / "out", cwd=tmp_path)
    assert_user_error(res, "cohort.csv", "required column 'patient_id' is missing")


def test_run_unknown_config_key(tmp_path: Path) -> None:
    data = csv_config()
    data["image"]["sise"] = 32
    ds = make_dataset(tmp_path, config=data)
    res = run_cli_subprocess("run", ds.config, "--data-root", ds.root, "--out", tmp_path / "out", cwd=tmp_path)
    assert_user_error(res, "config.yaml", "unknown config key 'image.sise'")
    assert not (tmp_path / "out").exists()


def test_evaluate_missing_file(tmp_path: Path) -> None:
    res = run_cli_subprocess("evaluate", tmp_path / "nope.csv", "--out", tmp_path / "ev", cwd=tmp_path)
    assert_user_error(res, "nope.csv", "no such predictions file")


def test_second_command_on_a_folder_in_use(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path)
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from readingrace.experiments.rundir import RunLock\n"
         "with RunLock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = run_cli_subprocess("cohort", ds.config, "--data-root", ds.root, "--out", out, cwd=tmp_path)
        assert_user_error(res, f"{out} is in use by readingrace pid {holder.pid}", "--out")
    finally:
        holder.kill()
        holder.wait()


def test_usage_error_is_not_a_traceback(tmp_path: Path) -> None:
    res = run_cli_subprocess("cohort", cwd=tmp_path)
    assert res.code == 2 and "Traceback" not in res.err and "Missing argument" in res.err

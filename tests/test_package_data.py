"""The paper suite ships inside the package: `readingrace suite paper` works from any directory."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import pytest

from readingrace.errors import ConfigError
from readingrace.experiments.suite import (
    expand_suite,
    resolve_suite_dir,
    shipped_suites,
)


def test_paper_suite_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here, and not the checkout
    folder = resolve_suite_dir("paper")
    assert folder == Path(str(resources.files("readingrace") / "configs" / "paper"))
    assert folder.is_absolute() and (folder / "_defaults.yaml").is_file() and (folder / "A2-ct.yaml").is_file()
    assert shipped_suites() == ["paper"]
    plan = expand_suite("paper", data={"nih": "/data/nih", "ct": "/data/nlst"}, budget="small", attribute="sex")
    assert {r.id for r in plan.runs} >= {"A1", "C1-lowpass", "C4-drop"}
    ct = [r for r in plan.runs if r.id == "A2-ct"]
    assert len(ct) == 1 and ct[0].config["evaluate"]["strata"] == ["slice_decile"]  # AUC by slice position


def test_a_folder_path_still_works_and_wins(tmp_path, monkeypatch):
    mine = tmp_path / "paper"  # a local copy named like the shipped suite
    shutil.copytree(resolve_suite_dir("paper"), mine)
    monkeypatch.chdir(tmp_path)
    assert resolve_suite_dir("paper") == Path("paper") and resolve_suite_dir(mine) == mine
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no experiment YAML"):
        resolve_suite_dir(tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"suite 'papers' not found: .*shipped suite \(paper\)"):
        resolve_suite_dir("papers")
    with pytest.raises(ConfigError, match="not found"):
        resolve_suite_dir("no/such/folder")

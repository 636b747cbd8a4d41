"""Trust: checkpoints load weights only, user code is imported only when named explicitly."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest

from readingrace.errors import ConfigError


class _Payload:
    """Unpickling this would create a marker file (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def evil_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(pickle.dumps({"state_dict": _Payload(marker), "hyper_parameters": {}}, protocol=2))
    return ckpt, marker


def test_weights_file_with_pickled_code_is_refused(tmp_path: Path) -> None:
    from readingrace.models import build_model, load_weights

    ckpt, marker = evil_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match=r"model.weights: .*model.ckpt is not a readable PyTorch weights file"):
        load_weights(build_model("resnet-tiny", 2), ckpt)
    assert not marker.exists()


def test_probe_checkpoint_with_pickled_code_is_refused(tmp_path: Path) -> None:
    from readingrace.features import load_user_model

    ckpt, marker = evil_checkpoint(tmp_path)
    with pytest.raises(ConfigError):
        load_user_model(ckpt)
    assert not marker.exists()


def test_classifier_checkpoint_loads_weights_only(tmp_path: Path) -> None:
    from readingrace.train import load_classifier

    ckpt, marker = evil_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="not a readable readingrace checkpoint .loaded weights-only.*UnpicklingError"):
        load_classifier(ckpt)
    assert not marker.exists()


def test_user_code_imported_only_when_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from readingrace.features import load_user_model

    module = tmp_path / "user_probe_mod.py"
    module.write_text("import pathlib\npathlib.Path(__file__).with_name('imported').touch()\n"
                      "def make():\n    return lambda x: x.flatten(1)\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="neither a checkpoint file"):
        load_user_model("user_probe_mod")  # a bare name is not an import request
    assert not (tmp_path / "imported").exists() and "user_probe_mod" not in sys.modules
    fn = load_user_model("user_probe_mod:make", app_dir=tmp_path)
    assert (tmp_path / "imported").exists() and callable(fn)
    sys.modules.pop("user_probe_mod", None)


def test_named_callable_that_does_not_exist(tmp_path: Path) -> None:
    from readingrace.features import load_user_model

    with pytest.raises(ConfigError, match=r"cannot import 'no_such_pkg_xyz'"):
        load_user_model("no_such_pkg_xyz:model", app_dir=tmp_path)


def test_results_are_written_with_the_users_umask(tmp_path):
    """Atomic writes must not leave results 0600 (mkstemp's mode): reports are meant to be shared."""
    import os

    from readingrace.experiments.rundir import write_atomic

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "metrics.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left

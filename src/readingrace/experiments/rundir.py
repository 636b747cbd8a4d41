"""Run folders: one per experiment config, locked while in use, never silently overwritten."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
from pathlib import Path
from typing import Any

import yaml

from readingrace.errors import RunError


def refuse_foreign_folder(run_dir: Path) -> None:
    """Refuse a folder that holds files but was never a readingrace run folder.

    Every run folder gets its ``.lock`` before anything else is written, so an interrupted run of ours
    still has one; a run folder copied without its hidden files still has the ``config.yaml`` with the
    run's fingerprint. A folder of the user's own files (or a suite folder) has neither, and nothing in
    it may be overwritten.
    """
    if not run_dir.is_dir() or (run_dir / ".lock").exists() or _is_run_config(run_dir / "config.yaml"):
        return
    names = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise RunError(f"{run_dir} holds files that are not from a readingrace run ({shown}); readingrace writes "
                       "only into a new or empty folder or one of its own run folders: choose another with --out")


def _is_run_config(path: Path) -> bool:
    """``path`` is a config.yaml that a readingrace run wrote (it carries the run's fingerprint)."""
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "fingerprint" in data


class RunLock:
    """An exclusive, non-blocking lock on a run folder (released when the process dies)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._fh = None

    def __enter__(self) -> RunLock:
        refuse_foreign_folder(self.run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.run_dir / ".lock", "a+")  # noqa: SIM115 - held for the run
        except OSError as exc:
            raise RunError(f"cannot write to the output folder {self.run_dir}: {exc.strerror}; "
                           "choose another folder with --out") from None
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "another process"
            self._fh.close()
            raise RunError(f"{self.run_dir} is in use by {holder}; wait for it to finish or choose "
                           "another folder with --out") from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"readingrace pid {os.getpid()}")
        self._fh.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename; clear errors on a full disk."""
    path = Path(path)
    try:
        # os.open with mode 0o666 honours the umask (mkstemp would make every result file 0600: a report
        # or metrics.json that a web server or a colleague in the group cannot read)
        tmp = os.fspath(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if "tmp" in locals() and os.path.exists(tmp):
            os.unlink(tmp)
        hint = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror
        raise RunError(f"cannot write {path}: {hint}") from None


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=_json_default, allow_nan=False))


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if np.isnan(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")


def clean_nan(obj: Any) -> Any:
    """NaN -> None recursively (JSON has no NaN)."""
    import math

    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean_nan(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean_nan(v) for v in obj]
    return obj

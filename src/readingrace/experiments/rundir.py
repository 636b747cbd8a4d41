"""Run folders: one per experiment config, locked while in use, never silently overwritten."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
from pathlib import Path
from typing import Any

import yaml

from readingrace.errors import RunError


#: Hidden file that marks a folder readingrace wrote into (kept while the folder holds our files).
MARKER = ".readingrace"
#: Hidden lock file, present only while a command holds the folder (or after a killed one).
LOCK = ".lock"
#: Subfolders other readingrace commands write into a run folder by default (``probe``, ``cohort``,
#: ``confounders``, ``predict`` -> ``external/<name>``, ``evaluate`` -> ``evaluation``, ``subgroups``).
COMMAND_SUBFOLDERS = ("probe", "cohort", "confounders", "external", "evaluation", "subgroups")


def refuse_foreign_folder(run_dir: Path) -> None:
    """Refuse a folder that holds files but was never a readingrace output folder.

    A folder readingrace wrote into carries the hidden ``.readingrace`` marker (older versions and a killed
    command leave a ``.lock``); a run folder copied without its hidden files still has the ``config.yaml``
    with the run's fingerprint. Subfolders that other readingrace commands write into a run folder by
    default (:data:`COMMAND_SUBFOLDERS`) count as ours. A folder of the user's own files (or a suite folder)
    has none of these, and nothing in it may be overwritten.
    """
    if (not run_dir.is_dir() or (run_dir / MARKER).exists() or (run_dir / LOCK).exists()
            or _is_run_config(run_dir / "config.yaml")):
        return
    names = sorted(p.name for p in run_dir.iterdir()
                   if not p.name.startswith(".") and not (p.name in COMMAND_SUBFOLDERS and p.is_dir()))
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
    """An exclusive, non-blocking lock on a run folder (released when the process dies).

    The lock is an ``fcntl.flock`` on ``<folder>/.lock``. On release the lock file is removed while still
    locked, and a new holder checks after locking that the path still names the file it locked (else it
    locked a removed file and tries again), so two processes never both hold a folder. The hidden marker
    (:data:`MARKER`) is written on entry and removed on release when the folder is still empty.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._fh = None

    def __enter__(self) -> RunLock:
        refuse_foreign_folder(self.run_dir)
        try:
            for _ in range(10):
                self.run_dir.mkdir(parents=True, exist_ok=True)
                fh = self._lock_file()
                if fh is not None:
                    break
            else:
                raise RunError(f"{self.run_dir}: could not lock the folder (its lock file keeps changing); "
                               "try again") from None
            self._fh = fh
            self._fh.seek(0)
            self._fh.truncate()
            self._fh.write(f"readingrace pid {os.getpid()}")
            self._fh.flush()
            marker = self.run_dir / MARKER
            if not marker.exists():
                marker.write_text("written by readingrace: lets readingrace write into this folder again\n")
        except OSError as exc:
            self._release()
            raise RunError(f"cannot write to the output folder {self.run_dir}: {exc.strerror}; "
                           "choose another folder with --out") from None
        return self

    def _lock_file(self):
        """The open, locked lock file; None when it was removed or replaced meanwhile (try again)."""
        path = self.run_dir / LOCK
        try:
            fh = open(path, "a+")  # noqa: SIM115 - held for the run
        except FileNotFoundError:  # the folder was removed meanwhile
            return None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RunError(f"{self.run_dir} is in use by {holder}; wait for it to finish or choose "
                           "another folder with --out") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file between our open and our lock
            fh.close()
            return None
        return fh

    def __exit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        """Remove the marker of a folder left empty and the lock file (while still holding it), then unlock."""
        if not self._fh:
            return
        with contextlib.suppress(OSError):
            if not [p for p in self.run_dir.iterdir() if p.name not in (MARKER, LOCK)]:
                (self.run_dir / MARKER).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (self.run_dir / LOCK).unlink(missing_ok=True)
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None


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

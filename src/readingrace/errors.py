"""The project's own error types.

Every error a user can cause by their input derives from :class:`ReadingRaceError`; the CLI prints
its message (which names the file, row or key and says what to do) without a traceback.
"""

from __future__ import annotations


class ReadingRaceError(Exception):
    """Base class: a problem with the user's input or environment, explained in the message."""


class ConfigError(ReadingRaceError):
    """A config file or option is invalid (unknown key, wrong type, impossible value)."""


class CohortError(ReadingRaceError):
    """A cohort source or table is unusable (missing columns, duplicate ids, conflicting labels)."""


class ImageReadError(ReadingRaceError):
    """An image file cannot be turned into a float (H, W) array; ``reason`` is recorded as a skip."""

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class SplitError(ReadingRaceError):
    """A split cannot be made as asked (ratios, too few patients in a class, empty split)."""


class LeakageError(SplitError):
    """A patient appears in more than one split."""


class RunError(ReadingRaceError):
    """A run folder is locked, read-only, full, or holds results of a different config."""


class CacheError(ReadingRaceError):
    """A cache folder is corrupt or incomplete (delete it; it is rebuilt from the source files)."""


def is_interruption(exc: BaseException | None) -> bool:
    """Ctrl-C: a KeyboardInterrupt, or the ``sys.exit(1)`` Lightning raises while handling one during training."""
    return isinstance(exc, KeyboardInterrupt) or (
        isinstance(exc, SystemExit) and isinstance(exc.__context__, KeyboardInterrupt))

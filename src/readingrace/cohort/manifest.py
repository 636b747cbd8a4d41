"""The manifest of a cohort: inputs with hashes, the exclusion flow, skipped files, warnings.

Each filter step records images and patients before and after (a CONSORT-style flow). The
manifest is plain data and is written as JSON next to the cohort table.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd


@dataclass
class FlowStep:
    """One exclusion step: what it did and the counts before and after."""

    step: str
    images_before: int
    patients_before: int
    images_after: int
    patients_after: int
    detail: str = ""

    @property
    def images_removed(self) -> int:
        return self.images_before - self.images_after


@dataclass
class Skip:
    """A file or row left out, with the reason."""

    item: str
    reason: str
    stage: str = "cohort"


@dataclass
class Manifest:
    """Everything needed to trace a cohort back to its inputs."""

    source: str = ""
    inputs: list[dict[str, Any]] = field(default_factory=list)
    flow: list[FlowStep] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    mappings: dict[str, dict[str, str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    #: Skips counted but not listed one by one (reason -> count), beyond ``skip_many``'s limit.
    unlisted_skips: dict[str, int] = field(default_factory=dict)
    #: The full paths of the inputs, in memory only: manifest.json and reports name the file, not the machine's
    #: folders (the cohort memo watches these files).
    input_files: list[str] = field(default_factory=list, repr=False)

    # -- recording -----------------------------------------------------------------------------
    def add_input(self, path: str | os.PathLike[str], *, hash_contents: bool = True) -> None:
        """Record an input file with its size and (by default) its SHA-256."""
        p = Path(path)
        entry: dict[str, Any] = {"path": p.name, "size": p.stat().st_size}
        if hash_contents:
            entry["sha256"] = sha256_file(p)
        self.inputs.append(entry)
        self.input_files.append(str(p.resolve()))

    def step(self, name: str, before: pd.DataFrame, after: pd.DataFrame, detail: str = "",
             patient_col: str = "patient_id") -> pd.DataFrame:
        """Record a filter step from the tables before and after it; returns ``after``."""
        self.flow.append(FlowStep(
            step=name,
            images_before=len(before), patients_before=_n_patients(before, patient_col),
            images_after=len(after), patients_after=_n_patients(after, patient_col),
            detail=detail,
        ))
        return after

    def skip(self, item: object, reason: str, stage: str = "cohort") -> None:
        self.skipped.append(Skip(str(item), reason, stage))

    def skip_many(self, items: list[object], reason: str, stage: str = "cohort", limit: int = 1000) -> None:
        """Record many skips with one reason: the first ``limit`` listed, the rest counted."""
        for item in items[:limit]:
            self.skip(item, reason, stage)
        if len(items) > limit:
            key = reason.split(":")[0]
            self.unlisted_skips[key] = self.unlisted_skips.get(key, 0) + len(items) - limit
            self.warn(f"{len(items)} items skipped ({key}); the first {limit} are listed in 'skipped'")

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    # -- output --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["input_files"]
        d["skipped_by_reason"] = self.skip_counts()
        return d

    def skip_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.skipped:
            key = s.reason.split(":")[0]
            out[key] = out.get(key, 0) + 1
        for key, n in self.unlisted_skips.items():
            out[key] = out.get(key, 0) + n
        return out

    def write(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=str))

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Manifest:
        d = json.loads(Path(path).read_text())
        d.pop("skipped_by_reason", None)
        m = cls(**{k: v for k, v in d.items() if k not in ("flow", "skipped")})
        m.flow = [FlowStep(**s) for s in d.get("flow", [])]
        m.skipped = [Skip(**s) for s in d.get("skipped", [])]
        return m

    def flow_table(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(s) for s in self.flow])


def _n_patients(df: pd.DataFrame, col: str) -> int:
    return int(df[col].nunique()) if col in df.columns else 0


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

"""Cohort sources: one module per kind of input, all with the same entry point.

Every source module exposes ``load(options: dict, data_root: Path, manifest: Manifest) ->
pd.DataFrame``: it reads the source's native files under ``data_root`` (paths in ``options`` are
relative to it unless absolute), records inputs, exclusion steps and skipped rows in ``manifest``,
and returns a table passed through :func:`readingrace.cohort.schema.conform` (one row per image).
Source-specific rules (race harmonisation, conflicting race excluded before de-duplication,
Hispanic exclusion, frontal views) happen inside the source; generic rules (target, prevalence,
split) happen in :mod:`readingrace.cohort.build`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from readingrace.cohort.manifest import Manifest
from readingrace.errors import ConfigError

Loader = Callable[[dict[str, Any], Path, Manifest], pd.DataFrame]

#: Source name -> module under readingrace.cohort.sources.
SOURCES: dict[str, str] = {
    "nih": "nih",
    "csv": "csv_manifest",
    "synthetic": "synthetic",
    "mimic": "mimic",
    "chexpert": "chexpert",
    "export": "export",
    "dicom_dir": "dicom_dir",
    "ct": "ct",
    "mammo": "mammo",
}


def get_loader(name: str) -> Loader:
    """The ``load`` function of source ``name`` (imported on first use)."""
    if name not in SOURCES:
        raise ConfigError(f"unknown cohort source {name!r}; known sources: {sorted(SOURCES)}")
    module = importlib.import_module(f"readingrace.cohort.sources.{SOURCES[name]}")
    return module.load

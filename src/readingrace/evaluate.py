"""Evaluate a predictions file: metrics.json (and comparison.json) in an output folder.

The file is a CSV (optionally gzipped) or Parquet table in either accepted form (see
:mod:`readingrace.stats.metrics`), or a run folder holding ``predictions.csv``. It is validated up
front; errors name the file, the CSV line and the column. The CLI command ``readingrace evaluate``
calls :func:`evaluate_file`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from readingrace.errors import CohortError, RunError
from readingrace.stats.metrics import (
    DEFAULT_LEVEL,
    DEFAULT_N_BOOTSTRAP,
    DEFAULT_SEED,
    DEFAULT_THRESHOLD,
    PreparedPredictions,
    compare_predictions,
    evaluate_predictions,
    prepare_predictions,
    write_json,
    write_metrics,
)

PREDICTIONS_FILE = "predictions.csv"
METRICS_FILE = "metrics.json"
COMPARISON_FILE = "comparison.json"

__all__ = ["COMPARISON_FILE", "METRICS_FILE", "evaluate_file", "read_predictions", "resolve_predictions"]


def resolve_predictions(path: str | Path) -> Path:
    """A predictions file, or ``<run folder>/predictions.csv``; :class:`CohortError` if absent."""
    p = Path(path)
    if p.is_dir():
        candidate = p / PREDICTIONS_FILE
        if not candidate.is_file():
            raise CohortError(f"{p}: a run folder must contain {PREDICTIONS_FILE}; none found")
        return candidate
    if not p.is_file():
        raise CohortError(f"{p}: no such predictions file or run folder")
    return p


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_predictions(path: str | Path, *, classes: Sequence[str] | None = None) -> PreparedPredictions:
    """Read and validate a predictions CSV/Parquet file (or run folder).

    Every cell is read as text first, so ids keep leading zeros and a non-numeric probability is
    reported with its line rather than silently coerced.
    """
    p = resolve_predictions(path)
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(p)
            file_rows = False
        else:
            df = pd.read_csv(p, dtype=str, keep_default_na=False, na_values=[""])
            file_rows = True
    except pd.errors.EmptyDataError as e:
        raise CohortError(f"{p}: the file is empty; expected a header row and one row per image") from e
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as e:
        raise CohortError(f"{p}: cannot be read as a predictions table ({e})") from e
    return prepare_predictions(df, classes=classes, source=str(p), file_rows=file_rows)


def evaluate_file(
    predictions: str | Path,
    *,
    out_dir: str | Path,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = DEFAULT_SEED,
    strata: Sequence[str] = (),
    study_level: bool = False,
    val_predictions: str | Path | None = None,
    compare: str | Path | None = None,
    classes: Sequence[str] | None = None,
    level: float = DEFAULT_LEVEL,
    threshold: float = DEFAULT_THRESHOLD,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate ``predictions`` and write ``out_dir/metrics.json``; return the metrics dictionary.

    ``val_predictions`` adds sensitivity/specificity at per-class Youden thresholds chosen on those
    validation predictions. ``compare`` (another predictions file on the same images) also writes
    ``out_dir/comparison.json`` with AUC(predictions) - AUC(compare), paired bootstrap and DeLong.
    Existing output files are an error (:class:`RunError`) unless ``overwrite``; this is checked
    before any computation. The metrics gain an ``"inputs"`` entry (file names and SHA-256).
    """
    out = Path(out_dir)
    targets = [out / METRICS_FILE] + ([out / COMPARISON_FILE] if compare is not None else [])
    if not overwrite:
        for t in targets:
            if t.exists():
                raise RunError(f"{t} already exists; replace it with --overwrite (overwrite=True in Python) or choose another folder with --out")
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} exists and is not a folder; choose another output folder")

    pred_path = resolve_predictions(predictions)
    prep = read_predictions(pred_path, classes=classes)
    val = read_predictions(val_predictions, classes=prep.classes) if val_predictions is not None else None
    other = read_predictions(compare, classes=prep.classes) if compare is not None else None

    metrics = evaluate_predictions(
        prep, n_bootstrap=n_bootstrap, seed=seed, level=level, threshold=threshold,
        strata=tuple(strata), study_level=study_level, val_pred=val,
    )
    inputs: dict[str, Any] = {"predictions": {"file": pred_path.name, "sha256": _sha256(pred_path)}}
    if val_predictions is not None:
        vp = resolve_predictions(val_predictions)
        inputs["validation_predictions"] = {"file": vp.name, "sha256": _sha256(vp)}
    if other is not None:
        cp = resolve_predictions(compare)  # type: ignore[arg-type]
        inputs["compare"] = {"file": cp.name, "sha256": _sha256(cp)}
    metrics["inputs"] = inputs
    comparison = None
    if other is not None:  # computed before anything is written, so a failure leaves no half output
        comparison = compare_predictions(
            prep, other, n_bootstrap=n_bootstrap, seed=seed, level=level, study_level=study_level
        )
        comparison["inputs"] = inputs
    write_metrics(out / METRICS_FILE, metrics, overwrite=overwrite)
    if comparison is not None:
        write_json(out / COMPARISON_FILE, comparison, overwrite=overwrite)
    return metrics

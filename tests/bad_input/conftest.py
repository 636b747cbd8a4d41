"""Builders for the bad-input corpus: images, DICOM files, CSV cohorts, configs, and CLI runners.

Everything is generated in ``tmp_path``; nothing here reads ``../shared/data``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


# -- images --------------------------------------------------------------------------------------
def write_png(path: Path, arr: np.ndarray) -> Path:
    """Write ``arr`` (uint8 or uint16; (H, W) or (H, W, 3|4)) as a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")
    return path


def noise_png(path: Path, seed: int = 0, size: int = 16) -> Path:
    """A readable 8-bit grey PNG of random pixels."""
    arr = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    return write_png(path, arr)


def make_dicom(path: Path, arr: np.ndarray, *, photometric: str = "MONOCHROME2", meta: bool = True,
               **elements: Any) -> Path:
    """A CR DICOM with the given stored values (uint8 / uint16; (H, W), (F, H, W) or RGB (H, W, 3))."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.PatientID = "P0"
    if photometric == "RGB":
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.Rows, ds.Columns = arr.shape[:2]
    else:
        ds.SamplesPerPixel = 1
        ds.Rows, ds.Columns = arr.shape[-2:]
        if arr.ndim == 3:
            ds.NumberOfFrames = arr.shape[0]
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = arr.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if meta:
        fm = FileMetaDataset()
        fm.TransferSyntaxUID = ExplicitVRLittleEndian
        fm.MediaStorageSOPClassUID = ds.SOPClassUID
        fm.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta = fm
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, implicit_vr=True, little_endian=True)
    return path


# -- cohorts and configs --------------------------------------------------------------------------
GROUPS = ("Asian", "Black", "White")


def cohort_rows(n_patients: int = 12, *, images_per_patient: int = 1) -> list[dict[str, Any]]:
    """Rows of a small CSV cohort: patients cycle through the three race groups and both sexes."""
    rows = []
    for p in range(n_patients):
        for k in range(images_per_patient):
            rows.append({"path": f"img/p{p:03d}_{k}.png", "patient_id": f"P{p:03d}",
                         "race": GROUPS[p % 3], "sex": "FM"[p % 2], "age": str(30 + p)})
    return rows


def write_csv(path: Path, rows: Iterable[dict[str, Any]], columns: list[str] | None = None) -> Path:
    import pandas as pd

    rows = list(rows)
    df = pd.DataFrame(rows, columns=columns or (list(rows[0]) if rows else None))
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


def write_images(root: Path, rows: Iterable[dict[str, Any]]) -> None:
    """A distinct readable PNG for every row's path (relative to ``root``)."""
    for i, row in enumerate(rows):
        p = root / row["path"]
        if ".." not in Path(row["path"]).parts:
            noise_png(p, seed=i)


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def csv_config(*, target: str = "race", min_prevalence: float = 0.01, ratios: list[float] | None = None,
               **extra: Any) -> dict[str, Any]:
    """An experiment config over ``cohort.csv`` in the data root, with the tiniest training settings."""
    cfg: dict[str, Any] = {
        "name": "bad-input",
        "cohort": {"source": "csv", "target": target, "min_prevalence": min_prevalence,
                   "options": {"csv": "cohort.csv"}},
        "split": {"ratios": ratios or [0.5, 0.25, 0.25], "seed": 2021},
        "image": {"size": 16},
        "model": {"name": "resnet-tiny"},
        "train": {"batch_size": 8, "max_epochs": 1, "early_stopping_patience": 1,
                  "augment": {"flip": False, "rotate": 0, "zoom": 0}, "num_threads": 1},
        "evaluate": {"n_bootstrap": 20, "reference": False},
    }
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


@dataclass
class Dataset:
    """A CSV cohort on disk: its data root, CSV and config paths."""

    root: Path
    csv: Path
    config: Path


def make_dataset(tmp_path: Path, rows: list[dict[str, Any]] | None = None, *, config: dict[str, Any] | None = None,
                 images: bool = True) -> Dataset:
    root = tmp_path / "data"
    rows = cohort_rows() if rows is None else rows
    csv = write_csv(root / "cohort.csv", rows)
    if images:
        write_images(root, rows)
    cfg = write_config(tmp_path / "config.yaml", config or csv_config())
    return Dataset(root=root, csv=csv, config=cfg)


# -- hashing inputs ---------------------------------------------------------------------------------
def tree_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (relative path -> digest)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# -- running the CLI --------------------------------------------------------------------------------
@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Call ``readingrace.cli.main`` in-process; returns the exit code and the captured output."""
    from readingrace.cli import main

    def call(*args: object) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        got = capsys.readouterr()
        return CliResult(code, got.out, got.err)

    return call


def run_cli_subprocess(*args: object, cwd: Path, timeout: float = 120) -> CliResult:
    """Run ``python -m readingrace.cli ARGS`` as a real process (stderr as the user sees it)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "readingrace.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def assert_user_error(result: CliResult, *needles: str) -> str:
    """Exit status 2, no traceback, and the one-line message naming every ``needle``; returns it."""
    assert result.code == 2, (result.code, result.err)
    assert "Traceback" not in result.err
    lines = [line for line in result.err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]

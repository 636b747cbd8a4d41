"""Chest CT series (NLST, RSPECT, EM-CT): one cohort row per slice, series ordered along the slice normal.

Slices are grouped by SeriesInstanceUID and ordered by their position along the slice normal: the cross
product of ImageOrientationPatient's row and column directions, dotted with ImagePositionPatient. A series
without these falls back to SliceLocation, then InstanceNumber (warned). Rows keep ``slice_index`` (0 = the
lowest position, i.e. the most inferior slice of a standard axial series), ``slice_position`` (mm),
``n_slices``, ``slice_decile``, ``slice_id`` (SOPInstanceUID), ``series_id`` and ``study_id``
(StudyInstanceUID), so results can be analysed slice by slice and aggregated per study.

``slice_decile`` (0-9) is the slice's position within its series in tenths: ``floor(10 * r / n_slices)``,
where ``r`` is the number of the series' slices strictly below it (its ``slice_index``, except that slices
sharing a position share the lowest index, so ties get one decile). 0 is the most inferior tenth of a
standard axial series, 9 the most superior. ``n_slices`` and ``r`` count the whole series as read, before
the air check drops slices, so a slice keeps its anatomical decile. A series of fewer than 10 slices uses
only some deciles (3 slices: 0, 3, 6). Evaluating by it (``evaluate.strata: [slice_decile]``, as the paper
suite's A2-ct does) gives the paper's "slice-wise results": AUC by slice position.

The paper's preprocessing (:func:`preprocess_ct_slice`): HU + 1024 (the paper's "rescale intercept
standardised to 1024"), a slice whose empty-corner patch minimum lies outside [-30, 30] on that scale (air
is about 24) is dropped, then / 3000. By default (``air_check: true``) the cohort build reads every slice's
pixels once to apply the check, so the manifest counts dropped slices exactly; the image cache applies the
same function when it writes the slices.

Options: those of ``dicom_dir`` plus ``air_check`` (default true), ``patch`` (corner patch side in pixels,
default 16), ``corner`` (top_left, top_right, bottom_left, bottom_right; default top_left),
``include_localizers`` (default false), ``series`` (``all`` or ``most_slices``: keep one series per study).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
from pydicom.pixels import apply_rescale

from readingrace.cohort.manifest import Manifest
from readingrace.cohort.schema import conform
from readingrace.cohort.sources import dicom_dir
from readingrace.cohort.sources.export import MAX_SKIP_RECORDS, check_options, resolve
from readingrace.errors import ConfigError, ImageReadError

HU_OFFSET = 1024.0
SCALE = 3000.0
AIR_RANGE = (-30.0, 30.0)
PATCH = 16
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
CT_TAGS = {**dicom_dir.HEADER_TAGS, "orientation": "ImageOrientationPatient", "position": "ImagePositionPatient",
           "slice_location": "SliceLocation", "instance_number": "InstanceNumber", "image_type": "ImageType"}
OPTIONS = dicom_dir.OPTIONS | {"air_check", "patch", "corner", "include_localizers", "series"}


def corner_patch(img: np.ndarray, *, patch: int = PATCH, corner: str = "top_left") -> np.ndarray:
    """The ``patch`` x ``patch`` block at ``corner`` of a 2-D image."""
    if corner not in CORNERS:
        raise ConfigError(f"corner must be one of {list(CORNERS)}, got {corner!r}")
    rows = slice(0, patch) if corner.startswith("top") else slice(img.shape[0] - patch, img.shape[0])
    cols = slice(0, patch) if corner.endswith("left") else slice(img.shape[1] - patch, img.shape[1])
    return img[rows, cols]


def air_value(hu: np.ndarray, *, patch: int = PATCH, corner: str = "top_left") -> float:
    """Minimum of HU + 1024 in the corner patch (about 24 for air)."""
    return float(corner_patch(np.asarray(hu), patch=patch, corner=corner).min()) + HU_OFFSET


def preprocess_ct_slice(hu: np.ndarray, *, patch: int = PATCH, corner: str = "top_left",
                        air_range: tuple[float, float] = AIR_RANGE, clip: bool = True) -> np.ndarray | None:
    """The paper's CT preprocessing: (HU + 1024) / 3000 as float32 (H, W), or None for a dropped slice.

    A slice is dropped when the minimum of HU + 1024 in the ``patch`` x ``patch`` corner patch lies outside
    ``air_range`` (default [-30, 30]; air is about 24). With ``clip`` the result is clipped to [0, 1]
    (HU above 1976, i.e. metal, saturates).
    """
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {hu.shape}")
    lo, hi = air_range
    if not lo <= air_value(hu, patch=patch, corner=corner) <= hi:
        return None
    out = (hu + np.float32(HU_OFFSET)) / np.float32(SCALE)
    return np.clip(out, 0.0, 1.0) if clip else out


def read_hu(path: str | Path) -> np.ndarray:
    """Hounsfield units of a single-frame CT slice (modality LUT: slope and intercept, in float)."""
    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged or undecodable pixel data
        raise ImageReadError(path, f"pixel decode failed: {type(exc).__name__}: {exc}") from None
    if arr.ndim != 2:
        raise ImageReadError(path, f"expected a single-frame slice, got pixel array of shape {arr.shape}")
    return np.asarray(apply_rescale(arr.astype(np.float64), ds), dtype=np.float32)


def slice_deciles(sorted_positions: np.ndarray) -> np.ndarray:
    """Decile (0-9) of each slice of one series, given the series' positions in ascending order.

    ``floor(10 * r / n)`` with ``r`` the index of the first slice at the same position (ties share a
    decile); with a missing position anywhere in the series, ``r`` is the slice's own index.
    """
    pos = np.asarray(sorted_positions, dtype=float)
    n = len(pos)
    r = np.arange(n) if np.isnan(pos).any() else np.searchsorted(pos, pos, side="left")
    return (10 * r) // max(n, 1)


def order_slices(df: pd.DataFrame, manifest: Manifest) -> pd.DataFrame:
    """Add ``slice_position``, ``slice_index``, ``n_slices`` and ``slice_decile`` per series (module docstring)."""
    parts = []
    fallbacks: dict[str, int] = {}
    mixed = 0
    for series_id, g in df.groupby("series_id", sort=True, dropna=False):
        g = g.copy()
        orient = [o for o in g["orientation"] if isinstance(o, tuple) and len(o) == 6]
        pos_ok = g["position"].map(lambda p: isinstance(p, tuple) and len(p) == 3)
        if orient and pos_ok.all():
            o = np.asarray(orient, dtype=float)
            if np.abs(o - o[0]).max() > 1e-3:
                mixed += 1
            normal = np.cross(o[0, :3], o[0, 3:])
            pos = np.asarray(g["position"].tolist(), dtype=float) @ normal
            method = "ImagePositionPatient"
        elif g["slice_location"].notna().all():
            pos, method = g["slice_location"].astype(float).to_numpy(), "SliceLocation"
        else:
            pos, method = np.full(len(g), np.nan), "InstanceNumber"
        if method != "ImagePositionPatient":
            fallbacks[method] = fallbacks.get(method, 0) + 1
        g["slice_position"] = pos
        inst = pd.to_numeric(g["instance_number"], errors="coerce")
        key = pos if method != "InstanceNumber" else inst.to_numpy(float)
        order = np.lexsort((g["relpath"].to_numpy(), inst.fillna(np.inf).to_numpy(), key))
        g = g.iloc[order]
        g["slice_index"] = np.arange(len(g))
        g["n_slices"] = len(g)
        g["slice_decile"] = slice_deciles(key[order])
        if method != "InstanceNumber" and pd.Series(pos).duplicated().any():
            manifest.warn(f"series {series_id}: {int(pd.Series(pos).duplicated().sum())} slices share a position")
        parts.append(g)
    if fallbacks:
        manifest.warn(f"series ordered without ImagePositionPatient/ImageOrientationPatient: {fallbacks}")
    if mixed:
        manifest.warn(f"{mixed} series mix slice orientations; the first slice's orientation was used")
    return pd.concat(parts) if parts else df.assign(slice_position=[], slice_index=[], n_slices=[],
                                                     slice_decile=[])


def _is_localizer(image_type: object) -> bool:
    values = image_type if isinstance(image_type, tuple) else (image_type,)
    return any(str(v).upper() == "LOCALIZER" for v in values if v is not None)


def air_check(df: pd.DataFrame, manifest: Manifest, *, patch: int, corner: str) -> pd.DataFrame:
    """Read each slice once; drop (and record) slices failing the corner check or failing to decode."""
    values = np.full(len(df), np.nan)
    reasons: list[str | None] = []
    for i, (path, rel) in enumerate(zip(df["path"], df["relpath"], strict=True)):
        try:
            hu = read_hu(path)
            if min(hu.shape) < patch:
                raise ImageReadError(path, f"slice {hu.shape} smaller than the {patch}-pixel corner patch")
            values[i] = air_value(hu, patch=patch, corner=corner)
            ok = AIR_RANGE[0] <= values[i] <= AIR_RANGE[1]
            reasons.append(None if ok else f"air check: corner minimum {values[i]:g} (HU + 1024) outside "
                                           f"[{AIR_RANGE[0]:g}, {AIR_RANGE[1]:g}]")
        except ImageReadError as exc:
            reasons.append(exc.reason)
    r = pd.Series(reasons, index=df.index, dtype=object)
    for rel, reason in zip(df.loc[r.notna(), "relpath"].iloc[:MAX_SKIP_RECORDS], r.dropna().iloc[:MAX_SKIP_RECORDS],
                           strict=True):
        manifest.skip(rel, reason, stage="ct air check")
    df = df.assign(air_value=values)
    decode = r.notna() & r.str.startswith("air check").eq(False)
    df2 = manifest.step("slice pixels decode", df, df[~decode], detail=f"{int(decode.sum())} slices failed to decode")
    air_bad = r[df2.index].notna()
    manifest.counts["ct_slices_dropped_air_check"] = int(air_bad.sum())
    return manifest.step(f"air check (corner {patch}x{patch} {corner}, HU + 1024 in [-30, 30])", df2,
                         df2[~air_bad], detail=f"{int(air_bad.sum())} slices dropped")


def load(options: dict[str, Any], data_root: Path, manifest: Manifest) -> pd.DataFrame:
    """Build a CT slice cohort (see the module docstring)."""
    opts = check_options(options, OPTIONS, "ct")
    root = Path(data_root)
    patch, corner = int(opts.get("patch", PATCH)), str(opts.get("corner", "top_left"))
    corner_patch(np.zeros((patch, patch)), patch=patch, corner=corner)  # validates the corner name
    if opts.get("series", "all") not in ("all", "most_slices"):
        raise ConfigError(f"cohort.options.series must be 'all' or 'most_slices', got {opts['series']!r}")
    folder = resolve(opts.get("folder", "."), root)
    df = dicom_dir.usable(dicom_dir.scan(folder, manifest, tags=CT_TAGS, force=bool(opts.get("force", False))),
                          manifest)
    df = dicom_dir.filter_modalities(df, opts.get("modalities", ["CT"]), manifest)
    multi = pd.to_numeric(df["number_of_frames"], errors="coerce").fillna(1) > 1
    for rel in df.loc[multi, "relpath"]:
        manifest.skip(rel, "multi-frame CT: enhanced multi-frame objects are not split into slices")
    df = manifest.step("single-frame slice", df, df[~multi], detail=f"{int(multi.sum())} multi-frame files")
    if not opts.get("include_localizers", False):
        loc = df["image_type"].map(_is_localizer)
        df = manifest.step("not a localizer (scout)", df, df[~loc], detail=f"{int(loc.sum())} localizer images")
    df = dicom_dir.build(df, opts, root, manifest)
    df = dicom_dir.finish_ids(df, manifest)
    if opts.get("series", "all") == "most_slices":
        size = df.groupby("series_id")["series_id"].transform("size")
        best = (df.assign(_n=size).sort_values(["study_id", "_n", "series_id"], ascending=[True, False, True])
                .drop_duplicates("study_id")["series_id"])
        df = manifest.step("one series per study (most slices)", df, df[df["series_id"].isin(best)])
    df = order_slices(df, manifest)
    if opts.get("air_check", True):
        df = air_check(df, manifest, patch=patch, corner=corner)
    else:
        manifest.warn("air_check is off: the image cache must drop slices failing preprocess_ct_slice and record them")
    df = df.assign(slice_id=df["image_id"], view=None)
    drop = ["sop_uid", "sex_raw", "age_raw", "birth_date", "series_date", "acquisition_date", "content_date",
            "image_laterality", "series_laterality", "ethnic_group", "skip_reason", "orientation", "position",
            "image_type"]
    return conform(df.drop(columns=drop), dataset=opts.get("dataset", "ct"))

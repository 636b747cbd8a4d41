"""Screening mammography (EM-Mammo, EMBED-style exports): DICOM images with laterality, view, density, study.

Headers: ImageLaterality (else the series' Laterality) -> ``laterality`` (L / R / B), ViewPosition ->
``view`` (CC, MLO, ...), StudyInstanceUID -> ``study_id`` (image and study-level results: a study's
prediction is the mean of its images'). Breast density 1-4 (BI-RADS a-d accepted as 1-4) comes from a table
(``density: {csv: ..., on: study_id, columns: {study_id: acc_anon, density: tissueden}}``) or from a header
keyword (``density_tag``); other values become missing (warned). A study whose table rows disagree on
density gets a missing density (warned).

``flip_to: left`` (or ``right``) marks images of the other breast with ``flipped = True``; the image cache
mirrors them horizontally so every breast faces the same side. The flip is recorded in the manifest
(counts and a mapping entry). Images without laterality are never flipped (counted).

Options: those of ``dicom_dir`` (``modalities`` defaults to ``[MG]``) plus ``views`` (keep only these,
e.g. ``[CC, MLO]``), ``presentation_only`` (drop "FOR PROCESSING" raw images; default true), ``density``,
``density_tag``, ``flip_to``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from readingrace.cohort.manifest import Manifest
from readingrace.cohort.schema import conform
from readingrace.cohort.sources import dicom_dir
from readingrace.cohort.sources.export import check_options, read_table, require_file, resolve
from readingrace.errors import ConfigError

OPTIONS = dicom_dir.OPTIONS | {"views", "presentation_only", "density", "density_tag", "flip_to"}
MAMMO_TAGS = {**dicom_dir.HEADER_TAGS, "presentation_intent": "PresentationIntentType"}
DENSITY_KEYS = {"csv", "on", "columns"}
DENSITY_ON = ("study_id", "image_id", "patient_id", "accession")
_LETTERS = {"a": 1, "b": 2, "c": 3, "d": 4}
FLIP = {"left": ("R", "L"), "right": ("L", "R")}


def parse_density(values: pd.Series, manifest: Manifest, *, what: str = "density") -> pd.Series:
    """1-4 (also "1.0", BI-RADS letters a-d) -> float 1-4; anything else -> NaN, reported."""
    def one(v: object) -> float:
        if v is None or (isinstance(v, float) and v != v):
            return np.nan
        s = str(v).strip().casefold()
        if s in _LETTERS:
            return float(_LETTERS[s])
        try:
            f = float(s)
        except ValueError:
            return np.nan
        return f if f in (1.0, 2.0, 3.0, 4.0) else np.nan

    out = values.map(one).astype(float)
    odd = values.notna() & out.isna() & values.astype(str).str.strip().ne("")
    if odd.any():
        manifest.warn(f"{what}: values outside 1-4 / a-d set to missing: "
                      f"{values[odd].astype(str).value_counts().to_dict()}")
    return out


def density_from_table(df: pd.DataFrame, spec: Mapping[str, Any], data_root: Path, manifest: Manifest) -> pd.Series:
    """Density per image from a table joined on ``spec['on']`` (one value per key; disagreements -> NaN)."""
    if not isinstance(spec, Mapping):
        raise ConfigError("cohort.options.density must be a mapping {csv: ..., on: study_id, columns: {...}}")
    bad = sorted(set(spec) - DENSITY_KEYS)
    if bad:
        raise ConfigError(f"cohort.options.density: unknown key {bad[0]!r}; allowed: {sorted(DENSITY_KEYS)}")
    on = spec.get("on", "study_id")
    if on not in DENSITY_ON:
        raise ConfigError(f"cohort.options.density.on must be one of {list(DENSITY_ON)}, got {on!r}")
    columns = {on: on, "density": "density", **dict(spec.get("columns") or {})}
    bad = sorted(set(columns) - {on, "density"})
    if bad:
        raise ConfigError(f"cohort.options.density.columns: unknown key {bad[0]!r}; map {on!r} and 'density'")
    path = require_file(resolve(spec.get("csv", ""), data_root), "density table", "cohort.options.density.csv")
    manifest.add_input(path)
    raw = read_table(path, columns=[columns[on], columns["density"]])
    tab = pd.DataFrame({"key": raw[columns[on]].str.strip(),
                        "density": parse_density(raw[columns["density"]], manifest, what=f"{path.name} density")})
    tab = tab.dropna()
    n = tab.groupby("key")["density"].nunique()
    conflicted = n.index[n > 1]
    if len(conflicted):
        manifest.warn(f"{path.name}: {len(conflicted)} {on} values have rows with different densities; "
                      "their density is set to missing")
    value = tab[~tab["key"].isin(conflicted)].drop_duplicates("key").set_index("key")["density"]
    return df[on].astype(str).map(value).astype(float)


def load(options: dict[str, Any], data_root: Path, manifest: Manifest) -> pd.DataFrame:
    """Build a mammography cohort (see the module docstring)."""
    opts = check_options(options, OPTIONS, "mammo")
    root = Path(data_root)
    flip_to = opts.get("flip_to")
    if flip_to is not None and str(flip_to).lower() not in FLIP:
        raise ConfigError(f"cohort.options.flip_to must be 'left', 'right' or null, got {flip_to!r}")
    tags = dict(MAMMO_TAGS)
    if opts.get("density_tag"):
        tags["density_header"] = str(opts["density_tag"])
    folder = resolve(opts.get("folder", "."), root)
    df = dicom_dir.usable(dicom_dir.scan(folder, manifest, tags=tags, force=bool(opts.get("force", False))),
                          manifest)
    df = dicom_dir.filter_modalities(df, opts.get("modalities", ["MG"]), manifest)
    if opts.get("presentation_only", True):
        raw = df["presentation_intent"].fillna("").str.upper() == "FOR PROCESSING"
        df = manifest.step("for presentation (not FOR PROCESSING)", df, df[~raw],
                           detail=f"{int(raw.sum())} raw detector images")
    lat = df["image_laterality"].where(df["image_laterality"].notna(), df["series_laterality"])
    df = df.assign(laterality=lat.str.upper().where(lat.str.upper().isin(["L", "R", "B"]), None),
                   view=df["view"].str.upper())
    manifest.counts["images_without_laterality"] = int(df["laterality"].isna().sum())
    if opts.get("views"):
        keep = {str(v).upper() for v in opts["views"]}
        removed = df.loc[~df["view"].isin(keep), "view"].fillna("blank").value_counts().to_dict()
        df = manifest.step(f"view in {sorted(keep)}", df, df[df["view"].isin(keep)], detail=f"removed: {removed}")
    df = dicom_dir.build(df, opts, root, manifest)
    df = dicom_dir.finish_ids(df, manifest)

    if opts.get("density"):
        df["density"] = density_from_table(df, opts["density"], root, manifest)
    elif opts.get("density_tag"):
        df["density"] = parse_density(df["density_header"], manifest, what=f"header {opts['density_tag']}")
        df = df.drop(columns=["density_header"])
    else:
        df["density"] = np.nan
    manifest.counts["images_with_density"] = int(df["density"].notna().sum())

    if flip_to is not None:
        src, dst = FLIP[str(flip_to).lower()]
        df["flipped"] = df["laterality"].eq(src)
        manifest.counts["flipped"] = int(df["flipped"].sum())
        manifest.mappings["mammo_flip"] = {src: f"mirrored horizontally to face {dst}", dst: "unchanged",
                                           "B": "unchanged", "missing": "unchanged"}
    else:
        df["flipped"] = False
    drop = ["sop_uid", "sex_raw", "age_raw", "birth_date", "series_date", "acquisition_date", "content_date",
            "image_laterality", "series_laterality", "ethnic_group", "skip_reason"]
    return conform(df.drop(columns=drop), dataset=opts.get("dataset", "mammo"))

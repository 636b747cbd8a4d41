"""Build a cohort: run the source, then the generic steps (target, conflicts, prevalence, views).

Source-specific rules live in the source modules; the steps here are the same for every source and
each is recorded in the manifest with images and patients before and after.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from readingrace.cohort.manifest import Manifest
from readingrace.cohort.schema import age_group, bmi_group, conform, validate_cohort
from readingrace.cohort.sources import get_loader
from readingrace.config import CohortConfig, cache_home
from readingrace.errors import CohortError

#: Targets that may legitimately differ between images of one patient (kept per image).
PER_IMAGE_TARGETS = {"age_group", "age", "bmi_group", "bmi", "view", "density"}


def add_derived_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``age_group`` and ``bmi_group`` (half-open bins) from ``age`` and ``bmi``."""
    return df.assign(age_group=age_group(df["age"]), bmi_group=bmi_group(df["bmi"]))


def exclude_conflicting(df: pd.DataFrame, column: str, manifest: Manifest, *, step: str | None = None) -> pd.DataFrame:
    """Drop every image of patients whose non-missing ``column`` takes more than one value."""
    n_values = df.groupby("patient_id", sort=False)[column].nunique(dropna=True)
    bad = n_values.index[n_values > 1]
    out = df[~df["patient_id"].isin(bad)]
    manifest.skip_many([f"patient {p}" for p in bad], f"{column} differs between the patient's images", stage="cohort")
    manifest.step(step or f"patients with one {column}", df, out,
                  detail=f"{len(bad)} patient(s) whose {column} differs between images excluded" if len(bad)
                  else f"no patient's {column} differs between images")
    return out


def warn_conflicting(df: pd.DataFrame, columns: tuple[str, ...], target: str, manifest: Manifest) -> None:
    """Warn (not exclude) about patients whose non-target ``columns`` differ between their images."""
    for col in columns:
        if col == target or col not in df.columns:
            continue
        n_values = df.groupby("patient_id", sort=False)[col].nunique(dropna=True)
        bad = df["patient_id"].isin(n_values.index[n_values > 1])
        if not bad.any():
            continue
        where = ""
        if "source_row" in df.columns:
            rows = df.loc[bad, "source_row"].tolist()
            where = f" (source rows {rows[:10]}{' ...' if len(rows) > 10 else ''})"
        manifest.warn(f"{int((n_values > 1).sum())} patient(s) have more than one {col} across their images{where}; "
                      f"kept because {col} is not the target: correct the source, or set cohort.target to {col!r} "
                      "to exclude them")


def prevalence_filter(df: pd.DataFrame, target: str, min_prevalence: float, manifest: Manifest) -> pd.DataFrame:
    """Keep classes whose prevalence among patients (first image) is above ``min_prevalence``."""
    first = df.drop_duplicates("patient_id")[target]
    share = first.value_counts(normalize=True)
    dropped = share[share <= min_prevalence]
    out = df[~df[target].isin(dropped.index)]
    detail = (f"classes at or below {min_prevalence:.1%} of patients dropped: "
              + (", ".join(f"{k} ({v:.2%})" for k, v in dropped.items()) if len(dropped) else "none"))
    manifest.step(f"{target} prevalence > {min_prevalence:.0%}", df, out, detail=detail)
    return out


def default_data_root(cfg: CohortConfig) -> Path:
    """Generated cohorts live in the shared cache; every other source needs an explicit folder."""
    if cfg.source == "synthetic":
        return cache_home() / "synthetic"
    raise CohortError(f"cohort source {cfg.source!r} needs a data folder: pass --data-root or set cohort.data_root")


#: Memos of this process, each key -> (stamp of the data, table, manifest, metadata files read): sources read,
#: keyed by (source, options, data root), and cohorts built, keyed by (cohort config, data root).
_READ: OrderedDict[tuple[str, ...], tuple[tuple, pd.DataFrame, Manifest, tuple[str, ...]]] = OrderedDict()
_BUILT: OrderedDict[tuple[str, ...], tuple[tuple, pd.DataFrame, Manifest, tuple[str, ...]]] = OrderedDict()
_MEMO_MAX = 32


def build_cohort(cfg: CohortConfig, *, data_root: str | Path | None = None) -> tuple[pd.DataFrame, Manifest]:
    """Cohort table (one row per image, no split yet) and its manifest.

    Memoised within the process by (cohort config, resolved data root), and the source's table by (source,
    options, data root), while the data's files look unchanged (:func:`data_stamp`): a suite reads each
    dataset and builds each distinct cohort once. Callers get copies they may change.
    """
    root = Path(data_root or cfg.data_root or default_data_root(cfg)).resolve()
    key = (json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str), str(root))
    built = _recall(_BUILT, key, cfg, root)
    if built is None:
        built = _remember(_BUILT, key, cfg, root, *_build_cohort(cfg, root))
    return built


def _recall(memo: OrderedDict, key: tuple[str, ...], cfg: CohortConfig, root: Path
            ) -> tuple[pd.DataFrame, Manifest] | None:
    """Copies of a memoised table and manifest, or None when absent or the data changed since."""
    hit = memo.get(key)
    if hit is None or hit[0] != data_stamp(cfg, root, hit[1]["path"], hit[3]):
        return None
    memo.move_to_end(key)
    return hit[1].copy(), _copy_manifest(hit[2])


def _remember(memo: OrderedDict, key: tuple[str, ...], cfg: CohortConfig, root: Path, df: pd.DataFrame,
              manifest: Manifest) -> tuple[pd.DataFrame, Manifest]:
    files = tuple(manifest.input_files)  # the metadata files read, wherever below the root
    memo[key] = (data_stamp(cfg, root, df["path"], files), df.copy(), _copy_manifest(manifest), files)
    while len(memo) > _MEMO_MAX:
        memo.popitem(last=False)
    return df, manifest


def _copy_manifest(m: Manifest) -> Manifest:
    """A copy whose lists, mappings and records are new objects (far faster than deepcopy for 1000s of skips)."""
    return dataclasses.replace(
        m, inputs=[dict(d) for d in m.inputs], flow=[copy.copy(s) for s in m.flow],
        skipped=[copy.copy(s) for s in m.skipped], mappings={k: dict(v) for k, v in m.mappings.items()},
        warnings=list(m.warnings), counts=copy.deepcopy(m.counts), unlisted_skips=dict(m.unlisted_skips),
        input_files=list(m.input_files))


def _read_source(cfg: CohortConfig, root: Path) -> tuple[pd.DataFrame, Manifest]:
    """The source's table (conformed) and the manifest of reading it; memoised like the cohort."""
    key = (cfg.source, json.dumps(cfg.options, sort_keys=True, default=str), str(root))
    read = _recall(_READ, key, cfg, root)
    if read is None:
        manifest = Manifest(source=cfg.source)
        df = conform(get_loader(cfg.source)(dict(cfg.options), root, manifest))
        read = _remember(_READ, key, cfg, root, df, manifest)
    return read


def data_stamp(cfg: CohortConfig, root: Path, paths: pd.Series, files: Sequence[str] = ()) -> tuple:
    """(path, mtime, size) of what a cohort is read from: the data root and the files directly in it, the
    folders holding the cohort's images (and their parents), files or folders named by cohort.options, and
    the metadata ``files`` the source read (wherever below the root they lie).

    An image added or removed changes its folder's time, an edited metadata file its own; cheap (no
    recursive walk), so a memoised cohort is checked on every use.
    """
    seen: set[str] = set()
    for folder in {os.path.dirname(str(p)) for p in paths}:
        while folder and folder not in seen:
            seen.add(folder)
            parent = os.path.dirname(folder)
            folder = parent if parent != folder else ""
    named = [v for v in cfg.options.values() if isinstance(v, str) and v]
    candidates = [root, *seen, *(p if Path(p).is_absolute() else root / p for p in named), *files]
    try:
        candidates += [e.path for e in os.scandir(root) if not e.is_dir()]
    except OSError:
        pass
    stamp = []
    for p in sorted({str(c) for c in candidates}):
        try:
            st = os.stat(p)
        except OSError:
            stamp.append((p, None, None))
            continue
        stamp.append((p, st.st_mtime_ns, st.st_size))
    return tuple(stamp)


def _build_cohort(cfg: CohortConfig, root: Path) -> tuple[pd.DataFrame, Manifest]:
    t0 = time.perf_counter()
    df, manifest = _read_source(cfg, root)
    df = add_derived_columns(df)
    if cfg.views:
        views = [v.upper() for v in cfg.views]
        df = manifest.step(f"view in {views}", df, df[df["view"].astype(str).str.upper().isin(views)])
    for column, wanted in cfg.where.items():
        if column not in df.columns:
            raise CohortError(f"cohort.where: {column!r} is not a cohort column; available: {sorted(df.columns)}")
        values = [str(v) for v in (wanted if isinstance(wanted, list) else [wanted])]
        df = manifest.step(f"{column} in {values}", df, df[df[column].astype(str).isin(values)],
                           detail="stratum selected by cohort.where")
    target = cfg.target
    if target not in df.columns:
        raise CohortError(f"target {target!r} is not a cohort column; available: {sorted(df.columns)}")
    if len(df) and not df[target].notna().any():
        raise CohortError(f"no image has a {target!r} value: the source has no {target!r} column, or it is empty "
                          f"(for a CSV, add the column or map yours with cohort.options.columns)")
    df = manifest.step(f"{target} recorded", df, df[df[target].notna() & (df[target].astype(str) != "unknown")],
                       detail=f"images without a {target} value dropped")
    if target not in PER_IMAGE_TARGETS:
        df = exclude_conflicting(df, target, manifest)
    warn_conflicting(df, ("sex", "race"), target, manifest)
    df = prevalence_filter(df, target, cfg.min_prevalence, manifest)
    if cfg.max_images is not None and len(df) > cfg.max_images:
        patients = df["patient_id"].drop_duplicates().to_numpy()
        rng = np.random.default_rng(2021)
        rng.shuffle(patients)
        n_images = df.groupby("patient_id").size().loc[patients].cumsum()
        keep = set(n_images.index[n_images <= cfg.max_images])
        df = manifest.step(f"at most {cfg.max_images} images (random patients)", df, df[df["patient_id"].isin(keep)])
    classes = sorted(df[target].astype(str).unique())
    if len(classes) < 2:
        raise CohortError(
            f"target {target!r} has {len(classes)} class(es) left after the filters ({classes}); "
            "a classifier needs at least two: check the source and the filters in the manifest"
        )
    df = df.assign(**{target: df[target].astype(str)}).reset_index(drop=True)
    validate_cohort(df)
    manifest.counts.update({
        "images": len(df), "patients": int(df["patient_id"].nunique()),
        "classes": {c: int(n) for c, n in df[target].value_counts().sort_index().items()},
        "seconds": round(time.perf_counter() - t0, 2),
    })
    return df, manifest

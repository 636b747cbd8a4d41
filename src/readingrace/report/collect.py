"""Merge suite shards and run folders into tidy tables (one row per run x class) and figures.

Reads ``suite*.json`` indexes and each run's ``metrics.json`` / ``config.yaml``; never trains. The
tidy table has one row per (run, class) with ``auc, ci_lo, ci_hi`` (class ``macro`` for the macro
average), the experiment id, family, dataset, attribute, grid point and the run folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from readingrace.errors import ConfigError
from readingrace.experiments.rundir import write_atomic
from readingrace.report.markdown import fmt_ci, md_table

POINT_COLS = ("model", "kind", "d", "d1", "d2", "resolution", "threshold", "op", "row", "col")


@dataclass
class RunRecord:
    """One finished run: where it is, what it was, its metrics."""

    run_dir: Path
    id: str
    family: str
    title: str
    paper: str
    dataset: str
    attribute: str
    label: str
    point: dict[str, Any]
    metrics: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Collected:
    runs: list[RunRecord]
    index: list[dict[str, Any]]  # every suite entry (done, failed, skipped ...)
    skipped: list[dict[str, Any]]
    tidy: pd.DataFrame
    out: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)


def _read_run(run_dir: Path, meta: dict[str, Any] | None = None) -> RunRecord | None:
    mpath = run_dir / "metrics.json"
    if not mpath.is_file():
        return None
    metrics = json.loads(mpath.read_text())
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    meta = meta or {}
    name = meta.get("id") or (cfg or {}).get("name") or run_dir.name
    return RunRecord(run_dir=run_dir, id=str(name), family=str(meta.get("family", _family_of(str(name)))),
                     title=str(meta.get("title", (cfg or {}).get("description", "") or "")),
                     paper=str(meta.get("paper", "")),
                     dataset=str(meta.get("dataset", (cfg or {}).get("cohort", {}).get("source", ""))),
                     attribute=str(meta.get("attribute", metrics.get("target", ""))),
                     label=str(meta.get("label", "baseline")), point=dict(meta.get("point") or {}),
                     metrics=metrics, config=cfg or {})


def _family_of(name: str) -> str:
    head = name.split()[0].split("-")[0]
    return head if head in ("C1", "C2", "C3", "C4") else (head[:1] if head[:1] in "ABC" and len(head) <= 3 else "runs")


def gather(paths: list[str | Path]) -> tuple[list[RunRecord], list[dict[str, Any]], list[dict[str, Any]]]:
    """Runs from suite folders (via their indexes) and plain run folders; shards merged, deduplicated."""
    from readingrace.experiments.suite import read_indexes

    runs: dict[Path, RunRecord] = {}
    entries: dict[str, dict[str, Any]] = {}
    skipped: dict[tuple, dict[str, Any]] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise ConfigError(f"{p}: no such run or suite folder")
        if (p / "metrics.json").is_file():
            rec = _read_run(p)
            if rec:
                runs[p.resolve()] = rec
            continue
        indexes = read_indexes([p])
        if not indexes:
            raise ConfigError(f"{p}: neither a run folder (metrics.json) nor a suite folder (suite*.json)")
        for root, index in indexes:
            for s in index.get("skipped", []):
                skipped[(s.get("id"), s.get("dataset"))] = s
            for e in index.get("entries", []):
                key = e["run_dir"]
                if key in entries and entries[key].get("status") == "done" and e.get("status") != "done":
                    continue  # another shard (or a later rerun) finished it
                entries[key] = e
                rec = _read_run(root / e["run_dir"], e) if e.get("status") in ("done", "planned") else None
                if rec:
                    runs[(root / e["run_dir"]).resolve()] = rec
    return list(runs.values()), list(entries.values()), list(skipped.values())


def tidy_table(runs: list[RunRecord]) -> pd.DataFrame:
    """One row per run and class (+ ``macro``), AUC with its CI, plus test-time perturbations."""
    rows = []
    for r in runs:
        m = r.metrics
        base = {"id": r.id, "family": r.family, "dataset": r.dataset, "attribute": r.attribute, "label": r.label,
                **{k: r.point.get(k) for k in POINT_COLS}, "test_perturbation": "",
                "n_test_images": m.get("n_images"), "run_dir": str(r.run_dir)}
        for cls, pc in (m.get("per_class") or {}).items():
            ci = pc.get("auc_ci") or [None, None]
            rows.append({**base, "class": cls, "auc": pc.get("auc"), "ci_lo": ci[0], "ci_hi": ci[1]})
        ci = m.get("macro_auc_ci") or [None, None]
        rows.append({**base, "class": "macro", "auc": m.get("macro_auc"), "ci_lo": ci[0], "ci_hi": ci[1]})
        tests = dict(m.get("test_perturbations") or {})
        occ = (m.get("localisation") or {}).get("occlusion")
        if occ:  # C3: the hottest Grad-CAM box occluded at test time
            tests[f"hot-box occlusion (heat >= {occ.get('threshold')})"] = occ
        for label, tp in tests.items():
            tm = tp.get("metrics") or {}
            for cls, pc in (tm.get("per_class") or {}).items():
                ci = pc.get("auc_ci") or [None, None]
                rows.append({**base, "test_perturbation": label, "class": cls, "auc": pc.get("auc"),
                             "ci_lo": ci[0], "ci_hi": ci[1]})
            ci = tm.get("macro_auc_ci") or [None, None]
            rows.append({**base, "test_perturbation": label, "class": "macro", "auc": tm.get("macro_auc"),
                         "ci_lo": ci[0], "ci_hi": ci[1]})
    cols = ["id", "family", "dataset", "attribute", "label", *POINT_COLS, "test_perturbation", "class", "auc",
            "ci_lo", "ci_hi", "n_test_images", "run_dir"]
    return pd.DataFrame(rows, columns=cols)


def auc_text(row: pd.Series) -> str:
    return fmt_ci(row["auc"], [row["ci_lo"], row["ci_hi"]])


def wide_table(tidy: pd.DataFrame, id_: str, by: list[str]) -> pd.DataFrame:
    """Rows = grid points (``by``), columns = classes, cells "AUC [lo, hi]"."""
    part = tidy[(tidy["id"] == id_) & (tidy["test_perturbation"] == "")].copy()
    if part.empty:
        return pd.DataFrame()
    part["AUC [95% CI]"] = part.apply(auc_text, axis=1)
    keys = ["dataset", *by]
    wide = part.pivot_table(index=keys, columns="class", values="AUC [95% CI]", aggfunc="first")
    classes = [c for c in wide.columns if c != "macro"] + (["macro"] if "macro" in wide.columns else [])
    return wide[classes].reset_index()


#: Per experiment id: the grid columns its table is laid out by.
TABLE_LAYOUT = {"C1-lowpass": ["d"], "C1-highpass": ["d"], "C1-bandpass": ["d1", "d2"], "C1-notch": ["d1", "d2"],
                "C2-resolution": ["resolution"], "C4-drop": ["row", "col"], "C4-keep": ["row", "col"],
                "A1": ["model"], "B4": ["threshold"]}


def experiment_tables(tidy: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One wide table per experiment id (the paper's table layout), test-time perturbations apart."""
    out: dict[str, pd.DataFrame] = {}
    for id_ in sorted(tidy["id"].unique()):
        by = [c for c in TABLE_LAYOUT.get(id_, ["label"]) if tidy.loc[tidy["id"] == id_, c].notna().any()] or ["label"]
        t = wide_table(tidy, id_, by)
        if not t.empty:
            for c in by:
                if c in t and c != "label" and c != "model":
                    t[c] = t[c].map(lambda v: int(v) if isinstance(v, float) and v == int(v) else v)
            out[id_] = t
        tp = tidy[(tidy["id"] == id_) & (tidy["test_perturbation"] != "")].copy()
        if not tp.empty:
            tp["AUC [95% CI]"] = tp.apply(auc_text, axis=1)
            w = tp.pivot_table(index=["dataset", "test_perturbation"], columns="class", values="AUC [95% CI]",
                               aggfunc="first").reset_index()
            out[f"{id_} (test-time)"] = w
    return out


def collect(paths: list[str | Path], *, out: str | Path | None = None, figures: bool = True) -> Collected:
    """Merge suites/runs; with ``out``, write ``results.csv``, ``index.csv``, per-experiment CSV/MD and figures."""
    runs, index, skipped = gather(paths)
    tidy = tidy_table(runs)
    result = Collected(runs=runs, index=index, skipped=skipped, tidy=tidy)
    if out is None:
        return result
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.csv", tidy.to_csv(index=False))
    result.files["results"] = out / "results.csv"
    write_atomic(out / "index.csv", pd.DataFrame(index + [{**s, "status": "skipped"} for s in skipped])
                 .drop(columns=["traceback"], errors="ignore").to_csv(index=False))
    for id_, table in experiment_tables(tidy).items():
        stem = id_.replace(" ", "_").replace("(", "").replace(")", "")
        write_atomic(out / f"{stem}.csv", table.to_csv(index=False))
        write_atomic(out / f"{stem}.md", md_table(table) + "\n")
        result.files[id_] = out / f"{stem}.csv"
    if figures:
        from readingrace.report.figures import family_figures

        result.files.update(family_figures(tidy, out))
    result.out = out
    return result

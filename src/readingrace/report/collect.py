"""Merge suite shards and run folders into tidy tables (one row per run x class) and figures.

Reads ``suite*.json`` indexes and each run's ``metrics.json`` / ``config.yaml``; never trains. The
tidy table has one row per (run, class) with ``auc, ci_lo, ci_hi`` (class ``macro`` for the macro
average), the experiment id, family, dataset, attribute, grid point and the run folder, and, where the run
fitted the thumbnail reference, its AUC (``ref_auc, ref_ci_lo, ref_ci_hi``) and the paired CNN - reference
difference (``ref_diff, ref_diff_lo, ref_diff_hi``). Disease runs (``readingrace disease``) get per-finding
tables instead; planned suite runs without results are listed (:func:`pending_runs`). Output folders are
written through :func:`staging` and :func:`install`, which never replace a file readingrace did not write.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from readingrace.cohort.manifest import sha256_file
from readingrace.errors import ConfigError, RunError
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
    #: "train" (an attribute model: per-class AUCs) or "disease" (``readingrace disease``: per-finding AUCs
    #: and subgroup tables; never in the tidy attribute table).
    kind: str = "train"


@dataclass
class Collected:
    runs: list[RunRecord]
    index: list[dict[str, Any]]  # every suite entry (done, failed, skipped ...)
    skipped: list[dict[str, Any]]
    tidy: pd.DataFrame
    out: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    #: External validation (A1-ext): matrix title -> cells (``experiments.external.cell_record``), cell
    #: folders absolute.
    external: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: Planned runs of the suites with no results yet (another shard, an interrupted suite): rows for the
    #: not-run table (status "not run yet"); ``n_pending`` of ``n_planned`` planned runs.
    pending: list[dict[str, Any]] = field(default_factory=list)
    n_pending: int = 0
    n_planned: int = 0

    def pending_note(self) -> str:
        """"k of n planned runs have no results yet (e.g. other shards): ..." or "" when none are missing."""
        if not self.n_pending:
            return ""
        named = [f"{p['id']} {p['label']} on {p['dataset']}" if p.get("dataset") else str(p["id"])
                 for p in self.pending]
        more = f" and {len(named) - 5} more" if len(named) > 5 else ""
        return (f"{self.n_pending} of {self.n_planned} planned runs have no results yet (e.g. other shards): "
                f"{'; '.join(named[:5])}{more}.")

    def grid_note(self, id_: str) -> str:
        """"incomplete: k of n points, m not run yet" (or "..., m skipped or failed") when planned runs of
        experiment ``id_`` have no results; "possibly incomplete: ..." when a shard that has not run may hold some
        (without a dry-run plan its runs are not named); "" when complete or not a suite experiment."""
        planned = {str(e["run_dir"]) for e in self.index if e.get("id") == id_ and e.get("kind") != "external"}
        if not planned:
            return ""
        waiting = {str(p["run_dir"]) for p in self.pending if p.get("id") == id_ and p.get("run_dir")}
        planned |= waiting
        done = len({r.run_dir for r in self.runs if r.id == id_})
        unnamed = self.n_pending - sum(1 for p in self.pending if p.get("run_dir"))
        other = len(planned) - done - len(waiting)
        if done < len(planned):
            why = [f"{len(waiting)} not run yet"] if waiting else []
            why += [f"{other} skipped or failed"] if other > 0 else []
            at_least = "at least " if unnamed > 0 else ""
            return f"incomplete: {done} of {at_least}{len(planned)} points, {', '.join(why)}"
        if unnamed > 0:
            return f"possibly incomplete: {done} points; {unnamed} planned run(s) of shard(s) not run yet are not named"
        return ""


def _read_run(run_dir: Path, meta: dict[str, Any] | None = None) -> RunRecord | None:
    mpath = run_dir / "metrics.json"
    if not mpath.is_file():
        return None
    metrics = json.loads(mpath.read_text())
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    cfg, meta = cfg or {}, meta or {}
    name = meta.get("id") or cfg.get("name") or run_dir.name
    label = str(meta.get("label", "baseline"))
    if label == "baseline" and metrics.get("probe_reported"):  # A3: the headline AUC is a probe's, say which
        label = f"{metrics['probe_reported']} probe on frozen features"
    kind = "disease" if is_disease_run(cfg, metrics) else "train"
    target = metrics.get("target") or (cfg.get("cohort") or {}).get("target", "")  # disease: the split's stratifier
    return RunRecord(run_dir=run_dir, id=str(name), family=str(meta.get("family", _family_of(str(name)))),
                     title=str(meta.get("title", cfg.get("description", "") or "")),
                     paper=str(meta.get("paper", "")),
                     dataset=str(meta.get("dataset", (cfg.get("cohort") or {}).get("source", ""))),
                     attribute=str(meta.get("attribute", target)),
                     label=label, point=dict(meta.get("point") or {}),
                     metrics=metrics, config=cfg, kind=kind)


def is_disease_run(cfg: dict[str, Any], metrics: dict[str, Any]) -> bool:
    """A `readingrace disease` run folder (``experiments/disease.py``: ``kind: disease`` in its config.yaml)."""
    return cfg.get("kind") == "disease" or str(metrics.get("schema", "")).startswith("readingrace.disease")


def findings_text(r: RunRecord) -> str:
    """What a disease run was trained for: "the 14 findings and No Finding"."""
    labels = [str(x) for x in r.metrics.get("labels") or []]
    nf = r.metrics.get("no_finding")
    findings = [x for x in labels if x != nf]
    return f"the {len(findings)} finding{'' if len(findings) == 1 else 's'}" + (f" and {nf}" if nf in labels else "")


def per_finding_table(r: RunRecord) -> pd.DataFrame:
    """A disease run's test AUC per finding with its CI, positives / negatives and operating threshold."""
    thresholds = r.metrics.get("thresholds") or {}
    rows = []
    for f in r.metrics.get("per_finding") or []:
        t = thresholds.get(f.get("label"))
        rows.append({"finding": f.get("label"),
                     "AUC [95% CI]": fmt_ci(f.get("auc"), [f.get("auc_ci_low"), f.get("auc_ci_high")]),
                     "positives / negatives": f"{f.get('n_positive')} / {f.get('n_negative')}",
                     "threshold": "n/a" if t is None else f"{t:.3f}"})
    return pd.DataFrame(rows, columns=["finding", "AUC [95% CI]", "positives / negatives", "threshold"])


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
        if _external_index(p) is not None:
            continue  # a `readingrace external` folder: read by gather_external
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
                if e.get("kind") == "external":
                    continue  # a cell of the external matrix (gather_external), not a trained run
                rec = _read_run(root / e["run_dir"], e) if e.get("status") in ("done", "planned") else None
                if rec:
                    runs[(root / e["run_dir"]).resolve()] = rec
    return list(runs.values()), list(entries.values()), list(skipped.values())


NOT_RUN_YET = "not run yet"


def pending_runs(paths: list[str | Path]) -> tuple[list[dict[str, Any]], int, int]:
    """Planned runs of each suite folder that no index records (another shard not run, an interrupted suite):
    (rows for the not-run table, how many have no results, how many are planned in all).

    A shard's index knows the plan's size (``planned``) and its shard (``shard: [i, n]``), not the other
    shards' runs: those are named when a dry-run plan (``plan*.json``) lists them, else counted per missing
    shard. An entry still ``planned`` (its run never finished) without a ``metrics.json`` counts too.
    """
    from readingrace.experiments.suite import read_indexes

    rows: list[dict[str, Any]] = []
    n_pending = n_planned = 0
    for p in map(Path, paths):
        if not p.is_dir() or (p / "metrics.json").is_file() or _external_index(p) is not None:
            continue
        indexes = [ix for _, ix in read_indexes([p])]
        if not indexes:
            continue
        entries = [e for ix in indexes for e in ix.get("entries", [])]
        recorded = {e["run_dir"] for e in entries if e.get("status") != "planned"
                    or (p / e["run_dir"] / "metrics.json").is_file()}
        missing: dict[str, dict[str, Any]] = {}
        for plan_file in sorted(p.glob("plan*.json")):  # dry-run plans name every planned run
            for e in (_read_json(plan_file) or {}).get("entries", []):
                if e.get("run_dir") and e["run_dir"] not in recorded:
                    missing[e["run_dir"]] = e
        for e in entries:
            if e["run_dir"] not in recorded:
                missing[e["run_dir"]] = e
        planned = max([int(ix.get("planned") or 0) for ix in indexes] + [len(recorded | set(missing))])
        for e in missing.values():
            rows.append({"id": e.get("id"), "dataset": e.get("dataset", ""), "label": e.get("label", ""),
                         "run_dir": e["run_dir"], "status": NOT_RUN_YET,
                         "reason": "planned, no results yet: its shard has not run or has not reached it"})
        unknown = max(0, planned - len(recorded | set(missing)))
        if unknown:
            shards = {tuple(ix["shard"]) for ix in indexes if ix.get("shard")}
            n_shards = max((n for _, n in shards), default=0)
            absent = [i for i in range(1, n_shards + 1) if (i, n_shards) not in shards]
            for i in absent:
                rows.append({"id": f"shard {i}/{n_shards}", "dataset": "", "label": "", "run_dir": "",
                             "status": NOT_RUN_YET,
                             "reason": (f"no suite-{i}-of-{n_shards}.json in {p}: that shard has not run yet "
                                        f"({unknown} run(s) of the plan in the missing shard(s); `readingrace suite "
                                        "... --dry-run` writes plan.json, which names them)")})
            if not absent:
                rows.append({"id": "(suite)", "dataset": "", "label": "", "run_dir": "", "status": NOT_RUN_YET,
                             "reason": (f"{unknown} planned run(s) in no index of {p}: the suite stopped before "
                                        "them; rerun the same command to resume")})
        n_pending += len(missing) + unknown
        n_planned += planned
    return rows, n_pending, n_planned


EXTERNAL_INDEX = "external.json"


def _external_index(p: Path) -> Path | None:
    """The ``external.json`` of a `readingrace external` folder (or the file itself), else None."""
    if p.is_file() and p.name == EXTERNAL_INDEX:
        return p
    if p.is_dir() and (p / EXTERNAL_INDEX).is_file() and not (p / "metrics.json").is_file():
        return p / EXTERNAL_INDEX
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _put_cell(cells: dict[tuple[str, str], dict[str, Any]], cell: dict[str, Any]) -> None:
    key = (cell["trained_on"], cell["tested_on"])
    if key not in cells or cells[key].get("status") != "done" or cell.get("status") == "done":
        cells[key] = cell


def gather_external(paths: list[str | Path]) -> dict[str, list[dict[str, Any]]]:
    """External-validation matrices (title -> cells) from `readingrace external` folders (their
    ``external.json``) and from the external cells of suite indexes, shards merged; a suite matrix's
    diagonal is read from each trained run's own metrics.json."""
    from readingrace.experiments.external import cell_record, only_internal_test
    from readingrace.experiments.suite import read_indexes

    groups: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for p in map(Path, paths):
        idx = _external_index(p)
        if idx is not None:
            data = _read_json(idx)
            if data is None or not isinstance(data.get("cells"), list):
                raise ConfigError(f"{idx}: not a valid external.json; rerun `readingrace external`")
            cells = groups.setdefault(f"{idx.parent.resolve().name}", {})
            for c in data["cells"]:
                c = dict(c)
                c["internal_only"] = only_internal_test(c)  # an earlier external.json lacks the field
                if c.get("cell_dir"):
                    c["cell_dir"] = str((idx.parent / c["cell_dir"]).resolve())
                _put_cell(cells, c)
            continue
        if not p.is_dir() or (p / "metrics.json").is_file():
            continue
        for root, index in read_indexes([p]):
            for e in index.get("entries", []):
                if e.get("kind") != "external":
                    continue
                cells = groups.setdefault(f"{e['id']} ({e.get('attribute')})", {})
                cell_dir = (root / e["run_dir"]).resolve()
                status, reason = e.get("status", "planned"), e.get("reason", "")
                m = _read_json(cell_dir / "metrics.json") if status == "done" else None
                if status == "done" and m is None:
                    status, reason = "missing", f"no metrics.json in {cell_dir.name}; rerun the suite"
                _put_cell(cells, cell_record(m, trained_on=e["trained_on"], tested_on=e["tested_on"],
                                             cell_dir=cell_dir, input_mode=(m or {}).get("input_mode"),
                                             status=status, reason=reason, reused=bool(e.get("reused"))))
                trained = root / str(e.get("trained_run_dir"))
                tm = _read_json(trained / "metrics.json")
                if tm is not None:
                    cfg = yaml.safe_load((trained / "config.yaml").read_text()) if (trained / "config.yaml").is_file() else {}
                    _put_cell(cells, cell_record(tm, trained_on=e["trained_on"], tested_on=e["trained_on"],
                                                 internal=True, cell_dir=trained.resolve(),
                                                 input_mode=((cfg or {}).get("image") or {}).get("mode", "stretch")))
    return {title: list(cells.values()) for title, cells in groups.items()}


def external_stem(title: str) -> str:
    """File stem of an external matrix in the collected tables: ``A1-ext (sex)`` -> ``external-A1-ext_sex``."""
    return "external-" + "_".join("".join(ch if ch.isalnum() or ch in "-." else " " for ch in title).split())


#: C3 lung evaluations (metrics["localisation"]["lungs"]) and their row labels in the test-time table.
LUNG_TESTS = (("original", "original, images with a usable lung mask"), ("lung_only", "lung-only images"),
              ("non_lung", "non-lung images"))


def tidy_table(runs: list[RunRecord]) -> pd.DataFrame:
    """One row per run and class (+ ``macro``), AUC with its CI, plus test-time perturbations."""
    rows = []
    for r in (r for r in runs if r.kind != "disease"):  # a disease run's AUCs are per finding: per_finding_table
        m = r.metrics
        base = {"id": r.id, "family": r.family, "dataset": r.dataset, "attribute": r.attribute, "label": r.label,
                **{k: r.point.get(k) for k in POINT_COLS}, "test_perturbation": "",
                "n_test_images": m.get("n_images"), "run_dir": str(r.run_dir)}
        for cls, pc in (m.get("per_class") or {}).items():
            ci = pc.get("auc_ci") or [None, None]
            rows.append({**base, "class": cls, "auc": pc.get("auc"), "ci_lo": ci[0], "ci_hi": ci[1],
                         **_reference_cells(m, cls)})
        ci = m.get("macro_auc_ci") or [None, None]
        rows.append({**base, "class": "macro", "auc": m.get("macro_auc"), "ci_lo": ci[0], "ci_hi": ci[1],
                     **_reference_cells(m, "macro")})
        tests = dict(m.get("test_perturbations") or {})
        occ = (m.get("localisation") or {}).get("occlusion")
        if occ:  # C3: the hottest Grad-CAM box occluded at test time
            tests[f"hot-box occlusion (heat >= {occ.get('threshold')})"] = occ
        lungs = (m.get("localisation") or {}).get("lungs") or {}
        for key, label in LUNG_TESTS:  # C3: the same model on the test images with a usable lung mask
            if lungs.get(key):
                tests[label] = lungs[key]
        for label, tp in tests.items():
            tm = tp.get("metrics") or {}
            n_test = tm.get("n_images", base["n_test_images"])
            for cls, pc in (tm.get("per_class") or {}).items():
                ci = pc.get("auc_ci") or [None, None]
                rows.append({**base, "test_perturbation": label, "class": cls, "auc": pc.get("auc"),
                             "ci_lo": ci[0], "ci_hi": ci[1], "n_test_images": n_test})
            ci = tm.get("macro_auc_ci") or [None, None]
            cmp = tp.get("comparison") or {}  # paired: perturbed minus untouched test images, same model
            dci = cmp.get("macro_difference_ci") or [None, None]
            rows.append({**base, "test_perturbation": label, "class": "macro", "auc": tm.get("macro_auc"),
                         "ci_lo": ci[0], "ci_hi": ci[1], "n_test_images": n_test,
                         "test_diff": cmp.get("macro_difference"), "test_diff_lo": dci[0], "test_diff_hi": dci[1]})
    cols = ["id", "family", "dataset", "attribute", "label", *POINT_COLS, "test_perturbation", "class", "auc",
            "ci_lo", "ci_hi", "n_test_images", "run_dir", *REFERENCE_COLS, *TEST_DIFF_COLS]
    return pd.DataFrame(rows, columns=cols)


#: A test-time evaluation minus the same model on the untouched test images (paired bootstrap), macro rows.
TEST_DIFF_COLS = ("test_diff", "test_diff_lo", "test_diff_hi")
TEST_DIFF_HEADER = "minus untouched test images, macro [95% CI]"

#: The reference model (logistic regression on 32x32 thumbnails) and the paired CNN - reference difference.
REFERENCE_COLS = ("ref_auc", "ref_ci_lo", "ref_ci_hi", "ref_diff", "ref_diff_lo", "ref_diff_hi")
REFERENCE_AUC = "reference macro AUC [95% CI]"
REFERENCE_DIFF = "CNN - reference, macro [95% CI]"


def _reference_cells(m: dict[str, Any], cls: str) -> dict[str, Any]:
    """A run's reference AUC and the paired difference for one class (``macro``: the macro values)."""
    ref, cmp_ = m.get("reference") or {}, m.get("cnn_vs_reference") or {}
    if cls == "macro":
        auc, ci = ref.get("macro_auc"), ref.get("macro_auc_ci")
        diff, dci = cmp_.get("macro_difference"), cmp_.get("macro_difference_ci")
    else:
        pr, pc = (ref.get("per_class") or {}).get(cls) or {}, (cmp_.get("per_class") or {}).get(cls) or {}
        auc, ci, diff, dci = pr.get("auc"), pr.get("auc_ci"), pc.get("difference"), pc.get("difference_ci")
    ci, dci = ci or [None, None], dci or [None, None]
    return dict(zip(REFERENCE_COLS, (auc, ci[0], ci[1], diff, dci[0], dci[1])))


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
    wide = _one_column_if_binary(wide[classes])
    macro = part[part["class"] == "macro"]
    if "ref_auc" in macro and macro["ref_auc"].notna().any():  # beside the CNN: the thumbnail reference
        cells = macro.assign(**{
            REFERENCE_AUC: [fmt_ci(a, [lo, hi]) if pd.notna(a) else "" for a, lo, hi in
                            zip(macro["ref_auc"], macro["ref_ci_lo"], macro["ref_ci_hi"])],
            REFERENCE_DIFF: [fmt_ci(d, [lo, hi]) if pd.notna(d) else "" for d, lo, hi in
                             zip(macro["ref_diff"], macro["ref_diff_lo"], macro["ref_diff_hi"])]})
        wide = wide.join(cells.pivot_table(index=keys, values=[REFERENCE_AUC, REFERENCE_DIFF], aggfunc="first")
                         [[REFERENCE_AUC, REFERENCE_DIFF]])
    return wide.reset_index()


def _one_column_if_binary(wide: pd.DataFrame) -> pd.DataFrame:
    """Two classes: one-vs-rest AUCs of both classes and their mean are the same number; show it once."""
    classes = [c for c in wide.columns if c != "macro"]
    if len(classes) != 2 or "macro" not in wide.columns:
        return wide
    return wide[["macro"]].rename(columns={"macro": f"AUC ({classes[0]} vs {classes[1]})"})


#: Per experiment id: the grid columns its table is laid out by.
TABLE_LAYOUT = {"C1-lowpass": ["d"], "C1-highpass": ["d"], "C1-bandpass": ["d1", "d2"], "C1-notch": ["d1", "d2"],
                "C2-resolution": ["resolution"], "C4-drop": ["row", "col"], "C4-keep": ["row", "col"],
                "A1": ["model"], "B4": ["threshold"]}


STRATA_SUFFIX = " (within strata)"


def strata_table(runs: list[RunRecord], id_: str) -> pd.DataFrame:
    """The runs of ``id_`` evaluated within each stratum (``evaluate.strata``: B1 BMI group, B2 density, B5
    age group and sex, a view): one row per (run, stratum, group), AUC [95% CI] per class (one column for
    two classes). A stratum that is the target itself is left out (one class per group: no AUC)."""
    rows = []
    for r in (r for r in runs if r.id == id_):
        target = r.metrics.get("target") or r.attribute
        for column, groups in (r.metrics.get("strata") or {}).items():
            if column == target:
                continue
            for group, m in groups.items():
                row = {"dataset": r.dataset, "label": r.label, "stratum": column, "group": group,
                       "test images (patients)": f"{m.get('n_images')} ({m.get('n_patients')})"}
                for cls, pc in (m.get("per_class") or {}).items():
                    row[cls] = fmt_ci(pc.get("auc"), pc.get("auc_ci"))
                row["macro"] = fmt_ci(m.get("macro_auc"), m.get("macro_auc_ci"))
                rows.append(row)
    if not rows:
        return pd.DataFrame()
    t = pd.DataFrame(rows)
    keys = ["dataset", "label", "stratum", "group", "test images (patients)"]
    classes = [c for c in t.columns if c not in keys]
    wide = _one_column_if_binary(t.set_index(keys)[classes]).reset_index()
    if (wide["label"] == "baseline").all():
        wide = wide.drop(columns="label")
    return wide


TEST_TIME_SUFFIX = " (test-time)"


def experiment_of(key: str) -> str:
    """The experiment id of a key of :func:`experiment_tables`: ``C3 (test-time)`` -> ``C3``."""
    for suffix in (TEST_TIME_SUFFIX, STRATA_SUFFIX):
        if key.endswith(suffix):
            return key[:-len(suffix)]
    return key


def experiment_tables(tidy: pd.DataFrame, runs: list[RunRecord] | None = None) -> dict[str, pd.DataFrame]:
    """One wide table per experiment id (the paper's table layout), test-time perturbations apart; with
    ``runs``, also each experiment's AUCs within strata (``"<id> (within strata)"``)."""
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
            w = _one_column_if_binary(tp.pivot_table(index=["dataset", "test_perturbation"], columns="class",
                                                     values="AUC [95% CI]", aggfunc="first")).reset_index()
            macro = tp[(tp["class"] == "macro") & tp["test_diff"].notna()]
            if not macro.empty:
                diff = macro.assign(**{TEST_DIFF_HEADER: [fmt_ci(r.test_diff, [r.test_diff_lo, r.test_diff_hi])
                                                          for r in macro.itertuples()]})
                w = w.merge(diff[["dataset", "test_perturbation", TEST_DIFF_HEADER]],
                            on=["dataset", "test_perturbation"], how="left").fillna({TEST_DIFF_HEADER: ""})
            out[id_ + TEST_TIME_SUFFIX] = w
        strata = strata_table(runs or [], id_)
        if not strata.empty:
            out[id_ + STRATA_SUFFIX] = strata
    return out


def collect(paths: list[str | Path], *, out: str | Path | None = None, figures: bool = True) -> Collected:
    """Merge suites/runs; with ``out``, write ``results.csv``, ``index.csv``, per-experiment CSV/MD and figures
    (never replacing a file there that readingrace did not write: :func:`install`)."""
    runs, index, skipped = gather(paths)
    tidy = tidy_table(runs)
    pending, n_pending, n_planned = pending_runs(paths)
    result = Collected(runs=runs, index=index, skipped=skipped, tidy=tidy, external=gather_external(paths),
                       pending=pending, n_pending=n_pending, n_planned=n_planned)
    if out is None:
        return result
    out = Path(out)
    with staging(out) as stage:
        write_collected(result, stage, figures=figures)
        install(stage, out, what="readingrace collect")
    result.files = {k: out / p.relative_to(stage) for k, p in result.files.items()}
    result.out = out
    return result


def write_collected(result: Collected, out: Path, *, figures: bool = True) -> None:
    """Write the collected tables and figures into ``out`` (a fresh folder: :func:`collect` stages them)."""
    out.mkdir(parents=True, exist_ok=True)
    tidy, index, skipped = result.tidy, result.index, result.skipped
    write_atomic(out / "results.csv", tidy.to_csv(index=False))
    result.files["results"] = out / "results.csv"
    listed = pd.DataFrame(index + [{**s, "status": "skipped"} for s in skipped] + result.pending,
                          columns=None if index or skipped or result.pending
                          else ["id", "dataset", "label", "run_dir", "status", "reason"])
    write_atomic(out / "index.csv", listed.drop(columns=["traceback"], errors="ignore").to_csv(index=False))
    for r in (r for r in result.runs if r.kind == "disease"):  # per finding, beside the attribute tables
        stem = "disease-" + "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in f"{r.id}-{r.dataset}")
        table = per_finding_table(r)
        write_atomic(out / f"{stem}.csv", table.to_csv(index=False))
        write_atomic(out / f"{stem}.md", md_table(table) + "\n")
        result.files[f"disease {r.id} ({r.dataset})"] = out / f"{stem}.csv"
    notes = {id_: result.grid_note(id_) for id_ in tidy["id"].unique()}
    for key, table in experiment_tables(tidy, result.runs).items():
        stem = key.replace(" ", "_").replace("(", "").replace(")", "")
        note = notes.get(experiment_of(key), "")
        write_atomic(out / f"{stem}.csv", table.to_csv(index=False))
        write_atomic(out / f"{stem}.md", (f"{key}: {note}\n\n" if note else "") + md_table(table) + "\n")
        result.files[key] = out / f"{stem}.csv"
    if figures:
        from readingrace.report.figures import family_figures

        result.files.update(family_figures(tidy, out, notes={k: v for k, v in notes.items() if v}))
    for title, cells in result.external.items():  # A1-ext: the trained-on x tested-on matrix
        from readingrace.experiments.external import matrix_table, tidy_cells
        from readingrace.report.figures import plot_external_matrix

        stem = external_stem(title)
        write_atomic(out / f"{stem}.csv", tidy_cells(cells).to_csv(index=False))
        write_atomic(out / f"{stem}.md", md_table(matrix_table(cells).reset_index()) + "\n")
        result.files[f"external {title}"] = out / f"{stem}.csv"
        if figures and plot_external_matrix(cells, out / f"{stem}.png"):
            result.files[f"external {title} figure"] = out / f"{stem}.png"


#: In a folder readingrace writes (report, collected tables): the files it wrote there, with their SHA-256.
WRITTEN = ".readingrace-written.json"
#: First line of report.md / a meta tag of report.html: marks a report readingrace wrote (see :func:`install`).
REPORT_MARK = "generated by readingrace report"
#: The study report's own files (their generator mark, or an earlier version's title, identifies them).
REPORT_FILES = ("report.html", "report.md")
#: Name prefixes of the figures a report writes beside report.html (the exclusion flow, AUC by slice position).
REPORT_FIGURES = ("flow-", "slice-position-")
#: The first line of report.md and the meta tag of report.html that :mod:`readingrace.report.html` writes.
REPORT_MD_MARK = f"<!-- {REPORT_MARK} -->\n"
REPORT_HTML_MARK = f"<meta name='generator' content='{REPORT_MARK}'>"


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A fresh hidden folder inside ``out`` (same file system, so files move in by rename); removed after."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} exists and is not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".readingrace-staging-", dir=out))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _ours(path: Path, rel: str, recorded: set[str]) -> bool:
    """Did readingrace write ``path`` (as it is now)? A file a record lists (``recorded``: its SHA-256s there):
    only if its content is unchanged; a report no record lists: only if it carries the generator mark."""
    if recorded:
        return sha256_file(path) in recorded
    return rel in REPORT_FILES and _report_mark(path, old_title=False)


def _recorded_hashes(out: Path, rel: str, records: dict[Path, dict[str, str]]) -> set[str]:
    """The SHA-256s readingrace's records list for ``out/rel``: the record of ``out``, of its parent (``collect
    -o REPORT/tables``) and of each folder between ``out`` and the file (a report over such a folder).
    ``records`` caches each folder's record."""
    out, parts = out.resolve(), rel.split("/")
    places = [(out.parent, [out.name, *parts])] + [(out.joinpath(*parts[:k]), parts[k:]) for k in range(len(parts))]
    hashes = set()
    for folder, key in places:
        if folder not in records:
            files = (_read_json(folder / WRITTEN) or {}).get("files")
            records[folder] = files if isinstance(files, dict) else {}
        if "/".join(key) in records[folder]:
            hashes.add(records[folder]["/".join(key)])
    return hashes


def _report_mark(path: Path, *, old_title: bool) -> bool:
    """``path`` is a study report of readingrace: it carries the generator mark where the report puts it, or
    (``old_title``) it is an earlier version's report, known by its title. A run folder's report.md (`readingrace
    run`) is neither."""
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(4000)
    if path.name == "report.md":
        return head.startswith(REPORT_MD_MARK) or (old_title and head.startswith("# readingrace report\n"))
    return REPORT_HTML_MARK in head or (old_title and "<title>readingrace report</title>" in head)


def _legacy_files(stage: Path, out: Path, rels: list[str]) -> set[str]:
    """Of ``rels``, the files in ``out`` that an earlier version (before the record) wrote there, exactly:
    ``report.html`` / ``report.md`` of a readingrace report, the figures (``flow-*.png``,
    ``slice-position-*.png``) and ``tables/`` beside such a report, and what `readingrace collect` writes into
    its default folder (``SUITE/collected``) when the ``index.csv`` there has the header collect writes now.
    Never because of anything outside ``out``."""
    reports = {rel for rel in REPORT_FILES if (out / rel).is_file() and _report_mark(out / rel, old_title=True)}
    ours = {rel for rel in rels if rel in reports}
    if reports:  # that report's figures and tables folder
        ours |= {rel for rel in rels if (rel.startswith("tables/") and rel.count("/") == 1)
                 or (rel.startswith(REPORT_FIGURES) and rel.endswith(".png") and "/" not in rel)}
    index, staged = out / "index.csv", stage / "index.csv"
    if out.name == "collected" and any(out.parent.glob("suite*.json")) and index.is_file() and staged.is_file():
        if _first_line(index) == _first_line(staged):
            ours |= {rel for rel in rels if "/" not in rel}
    return ours


def _first_line(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.readline()


def install(stage: Path, out: Path, *, what: str) -> list[Path]:
    """Move every file under ``stage`` to the same place under ``out``; refuse (RunError, nothing moved) when
    one would replace a file readingrace did not write there (a user's file, or one changed since)."""
    record = _read_json(out / WRITTEN) or {}
    written = record.get("files") if isinstance(record.get("files"), dict) else {}
    files = sorted(p for p in stage.rglob("*") if p.is_file())
    rels = [p.relative_to(stage).as_posix() for p in files]
    legacy = set() if record else _legacy_files(stage, out, rels)
    records: dict[Path, dict[str, str]] = {}
    foreign = [rel for rel in rels if (out / rel).exists() and not ((out / rel).is_file() and (
        rel in legacy or _ours(out / rel, rel, _recorded_hashes(out, rel, records))))]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunError(f"{out}: {what} would replace {shown}, not written by `readingrace report`/`collect` "
                       "(or changed since); move it away or choose another --out")
    moved = []
    for p, rel in zip(files, rels):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        written[rel] = sha256_file(p)
        os.replace(p, out / rel)
        moved.append(out / rel)
    owners = record.get("by_file") if isinstance(record.get("by_file"), dict) else {}
    owners.update({rel: what for rel in rels})
    # this command's earlier output that this one lacks (another command's files, e.g. collect's, are left)
    stale = {rel for rel in set(written) - set(rels) if owners.get(rel, record.get("by")) == what}
    for rel in sorted(stale):
        old = out / rel
        if old.is_file() and sha256_file(old) == written[rel]:  # exactly as readingrace wrote it: stale, removed
            old.unlink()
        del written[rel]  # changed since (or gone): no longer ours, left as it is
        owners.pop(rel, None)
    write_atomic(out / WRITTEN, json.dumps({"by": what, "files": written, "by_file": owners}, indent=1,
                                           sort_keys=True))
    return moved

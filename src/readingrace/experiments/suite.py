"""The paper's grid from one command: expand ``configs/paper`` into content-addressed runs.

A suite folder holds one YAML per experiment of the paper's Table 2 (``extends: _defaults.yaml``)
with a top-level ``suite:`` mapping the suite reads and removes before the config is validated::

    suite: {id: C1-lowpass, family: C1, title: ..., paper: "Figure 6", needs: [cxr], kind: train,
            grid: c1_lowpass}

plus ``_datasets.yaml`` (what ``--data NAME=PATH`` may name: source, kind, recorded attributes) and
``_budgets.yaml`` (``--budget`` profiles). :func:`expand_suite` turns specs x datasets x grid points
into :class:`PlannedRun` items, each with the fingerprint of its resolved config; a run lives in
``<out>/<id>/<dataset>/<fingerprint>/``, so a finished one is reported, not redone, and an
interrupted one resumes. :func:`shard` partitions the plan deterministically (``--shard i/n``);
every shard writes its own ``suite[-i-of-n].json`` index, merged later by ``readingrace collect``.
"""

from __future__ import annotations

import copy
import json
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from readingrace.config import ExperimentConfig, config_from_dict, deep_merge, read_yaml
from readingrace.errors import ConfigError, ReadingRaceError

KINDS = ("train", "confounders", "external", "probe", "explain")
PAPER_ARCHITECTURES = ("resnet34", "densenet121", "efficientnet-b0")
DEFAULT_BLUR_SIGMAS = (1.0, 2.0, 4.0)

#: Why a kind is not run by the suite (other commands do it).
NOT_RUN_BY_SUITE = {
    "external": "training on one dataset and testing on another: run the A1 suite on both, then "
                "`readingrace predict RUN_DIR` with the other dataset for each ordered pair (not automated yet)",
    "probe": "frozen-feature probes (A3) are run by `readingrace probe`, not by the suite",
    "explain": "Grad-CAM galleries and occlusion (C3) are run by the explain commands on a finished A1 run; "
               "the report shows their galleries when present",
}


@dataclass
class SuiteSpec:
    """One experiment file: suite metadata and the config mapping (``extends`` resolved)."""

    id: str
    family: str
    title: str
    paper: str
    needs: list[str]
    kind: str
    grid: str | list[dict[str, Any]]
    config: dict[str, Any]
    path: str


@dataclass
class PlannedRun:
    """One grid point of one experiment on one dataset."""

    id: str
    family: str
    title: str
    paper: str
    kind: str
    dataset: str
    attribute: str
    label: str
    point: dict[str, Any]
    fingerprint: str
    run_dir: str  # relative to the suite output folder
    config: dict[str, Any] = field(repr=False)
    data_root: str | None = field(default=None, repr=False)

    def entry(self) -> dict[str, Any]:
        """The index row (no config, no machine path)."""
        d = asdict(self)
        d.pop("config")
        d.pop("data_root")
        return d


@dataclass
class Skipped:
    """An experiment (or grid point) the given datasets or options do not allow, and why."""

    id: str
    dataset: str | None
    reason: str


@dataclass
class Plan:
    runs: list[PlannedRun]
    skipped: list[Skipped]


# -- reading the suite folder ------------------------------------------------------------------
def resolve_suite_dir(name_or_path: str | Path) -> Path:
    """``paper`` -> ``configs/paper`` (here, or in the source checkout); a folder path as given."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    for base in (Path.cwd() / "configs", Path(__file__).resolve().parents[3] / "configs"):
        if (base / str(name_or_path)).is_dir():
            return base / str(name_or_path)
    raise ConfigError(f"suite {name_or_path!r} not found: give a folder of experiment YAMLs or a name under configs/ "
                      "(e.g. 'paper')")


def _read_side(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    return read_yaml(path) if path.is_file() else {}


def load_specs(folder: str | Path) -> list[SuiteSpec]:
    """Every ``*.yaml`` not starting with ``_`` in ``folder``, sorted by id."""
    folder = Path(folder)
    specs = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name.startswith("_"):
            continue
        data = read_yaml(path)
        meta = data.pop("suite", None)
        if not isinstance(meta, dict) or "id" not in meta:
            raise ConfigError(f"{path}: an experiment of a suite needs a 'suite:' mapping with at least 'id'")
        kind = meta.get("kind", "train")
        if kind not in KINDS:
            raise ConfigError(f"{path}: suite.kind must be one of {list(KINDS)}, got {kind!r}")
        needs = meta.get("needs", ["cxr"])
        specs.append(SuiteSpec(id=str(meta["id"]), family=str(meta.get("family", meta["id"])),
                               title=str(meta.get("title", "")), paper=str(meta.get("paper", "")),
                               needs=[needs] if isinstance(needs, str) else list(needs), kind=kind,
                               grid=meta.get("grid", "none") or "none", config=data, path=path.name))
    ids = [s.id for s in specs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"{folder}: experiment id(s) {dup} appear in more than one file")
    return sorted(specs, key=lambda s: s.id)


def parse_data(items: Iterable[str], datasets: dict[str, Any]) -> dict[str, str]:
    """``["nih=/data/nih"]`` -> ``{"nih": "/data/nih"}``, checking each name is a known dataset."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--data {item!r}: write NAME=PATH, e.g. --data mimic=/data/mimic-cxr-jpg")
        name, path = (s.strip() for s in item.split("=", 1))
        if name not in datasets:
            raise ConfigError(f"--data {item!r}: unknown dataset {name!r}; known: {sorted(datasets)} "
                              "(add one to _datasets.yaml of the suite)")
        out[name] = path
    return out


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"2/4"`` -> (2, 4); shards are numbered 1..n."""
    if not text:
        return None
    try:
        i, n = (int(s) for s in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: write I/N with 1 <= I <= N, e.g. --shard 1/4") from None
    if not 1 <= i <= n:
        raise ConfigError(f"--shard {text!r}: need 1 <= I <= N")
    return i, n


# -- grid generators -----------------------------------------------------------------------------
def _perturb(spec: dict[str, Any]) -> dict[str, Any]:
    return {"perturb": {"train": [spec]}}


def grid_points(name: str | list[dict[str, Any]], *, params: dict[str, Any], base: dict[str, Any]
                ) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Named grid -> [(label, point parameters, config overrides)]; a list is taken as override sets."""
    from readingrace.imaging.perturb import (PAPER_BAND_EDGES, PAPER_CLIP_THRESHOLD, PAPER_NOISE_VARIANCE,
                                              PAPER_RADII, PAPER_RESOLUTIONS, paper_cells)

    if isinstance(name, list):
        return [(f"point-{k}", {"point": k}, o) for k, o in enumerate(name)]
    size = int(base.get("image", {}).get("size", 224))
    if name == "none":
        return [("baseline", {}, {})]
    if name == "architectures":
        archs = params.get("architectures", PAPER_ARCHITECTURES)
        return [(a, {"model": a}, {"model": {"name": a}}) for a in archs]
    if name in ("c1_lowpass", "c1_highpass"):
        kind = name.split("_")[1]
        radii = params.get("radii", PAPER_RADII)
        return [(f"{kind} d={d}", {"kind": kind, "d": d},
                 _perturb({"name": "fourier", "kind": kind, "radius": d})) for d in radii]
    if name in ("c1_bandpass", "c1_notch"):
        kind = name.split("_")[1]
        edges = sorted(params.get("band_edges", PAPER_BAND_EDGES))
        pairs = [(a, b) for i, a in enumerate(edges) for b in edges[i + 1:]]
        return [(f"{kind} {a}-{b}", {"kind": kind, "d1": a, "d2": b},
                 _perturb({"name": "fourier", "kind": kind, "radius": [a, b]})) for a, b in pairs]
    if name == "c2_resolution":
        top = int(params.get("max_resolution", max(PAPER_RESOLUTIONS)))
        out = []
        for s in params.get("resolutions", PAPER_RESOLUTIONS):
            if s > top:
                continue
            if s > size:  # train at that size
                out.append((f"{s} px", {"resolution": s}, {"image": {"size": s}}))
            else:  # down to s, back up to the network's input size
                out.append((f"{s} px", {"resolution": s},
                            _perturb({"name": "resize", "size": s, "back_to": size})))
        return out
    if name == "c2_noise_blur":
        tests = [{"name": "noise", "variance": PAPER_NOISE_VARIANCE, "mean": 0.0, "seed": 2021}]
        tests += [{"name": "blur", "sigma": float(s)} for s in params.get("blur_sigmas", DEFAULT_BLUR_SIGMAS)]
        return [("baseline + test-time noise/blur", {}, {"perturb": {"test": tests}})]
    if name == "b4_clip":
        t = params.get("clip_threshold", PAPER_CLIP_THRESHOLD)
        return [(f"clip {t:g}", {"threshold": t}, _perturb({"name": "clip", "threshold": t}))]
    if name in ("c4_drop", "c4_keep"):
        op = "drop_cell" if name == "c4_drop" else "keep_cell"
        return [(f"{op.split('_')[0]} ({r},{c})", {"op": op.split("_")[0], "row": r, "col": c},
                 _perturb({"name": op, "row": r, "col": c})) for r, c in paper_cells()]
    if name.startswith("within_"):
        # B1/B5: a model trained and tested within each stratum (cohort.where); none when the
        # stratum is the target itself (one class)
        column = name[len("within_"):]
        if column not in STRATUM_LEVELS:
            raise ConfigError(f"suite grid {name!r}: stratify by one of {sorted(STRATUM_LEVELS)}")
        if base.get("cohort", {}).get("target") == column:
            return []
        levels = params.get(f"{column}_levels", STRATUM_LEVELS[column])
        return [(f"within {column}={v}", {column: v}, {"cohort": {"where": {column: v}}}) for v in levels]
    raise ConfigError(f"unknown suite grid {name!r}; known: none, architectures, c1_lowpass, c1_highpass, "
                      "c1_bandpass, c1_notch, c2_resolution, c2_noise_blur, b4_clip, c4_drop, c4_keep, "
                      "within_age_group, within_sex, within_bmi_group, or a list")


#: Strata for training within groups (B1 BMI, B5 age and sex); half-open bins as in SPEC.
STRATUM_LEVELS: dict[str, list[str]] = {
    "age_group": ["0-20", "20-40", "40-60", "60-80", "80+"],
    "sex": ["F", "M"],
    "bmi_group": ["<18.5", "18.5-25", "25-30", ">=30"],
}


def _label_cols(source: str) -> list[str]:
    from readingrace.cohort.schema import CHEXPERT_LABELS, NIH_LABELS

    return list(NIH_LABELS if source == "nih" else CHEXPERT_LABELS)


# -- expansion ---------------------------------------------------------------------------------------
def expand_suite(folder: str | Path, *, data: dict[str, str], budget: str = "full", attribute: str | None = None,
                 only: Sequence[str] = (), overrides: dict[str, Any] | None = None) -> Plan:
    """All runs the given datasets allow (and what was skipped, with the reason)."""
    folder = resolve_suite_dir(folder)
    datasets = _read_side(folder, "_datasets.yaml")
    budgets = _read_side(folder, "_budgets.yaml") or {"full": {}}
    if budget not in budgets:
        raise ConfigError(f"--budget {budget!r} unknown; known: {sorted(budgets)} (see {folder / '_budgets.yaml'})")
    prof = budgets[budget] or {}
    specs = load_specs(folder)
    unknown = sorted(set(only) - {s.id for s in specs} - {s.family for s in specs})
    if unknown:
        raise ConfigError(f"--only {unknown}: not an experiment id or family of {folder}; "
                          f"ids: {[s.id for s in specs]}")
    runs: list[PlannedRun] = []
    skipped: list[Skipped] = []
    for spec in specs:
        if only and spec.id not in only and spec.family not in only:
            continue
        matches = [n for n in data if datasets[n].get("kind") in spec.needs or n in spec.needs]
        if not matches:
            skipped.append(Skipped(spec.id, None, f"needs a dataset of kind {spec.needs}; given: "
                                                  f"{sorted(data) or 'none'}"))
            continue
        if spec.kind in NOT_RUN_BY_SUITE:
            skipped += [Skipped(spec.id, n, NOT_RUN_BY_SUITE[spec.kind]) for n in matches]
            continue
        for name in matches:
            ds = datasets[name]
            target = attribute or spec.config.get("cohort", {}).get("target", "race")
            if target not in ds.get("attributes", [target]):
                skipped.append(Skipped(spec.id, name, f"{name} records no {target!r} (it has "
                                                      f"{ds.get('attributes')}); try --attribute "
                                                      f"{ds.get('attributes', ['sex'])[0]}"))
                continue
            base = deep_merge(spec.config, ds.get("config") or {})
            base = deep_merge(base, {"cohort": {"source": ds["source"], "target": target}})
            base = deep_merge(base, prof.get("config") or {})
            if overrides:
                base = deep_merge(base, overrides)
            if spec.kind == "confounders":
                conf = dict(base.get("confounders") or {})
                conf.setdefault("label_cols", _label_cols(ds["source"]))
                base["confounders"] = conf
            for label, point, over in grid_points(spec.grid, params=prof.get("grids") or {}, base=base):
                cfg_dict = deep_merge(base, over)
                cfg_dict["name"] = f"{spec.id} {label}" if label != "baseline" else spec.id
                try:
                    cfg = config_from_dict(copy.deepcopy(cfg_dict))
                except ConfigError as exc:
                    raise ConfigError(f"{folder / spec.path} ({name}, {label}): {exc}") from None
                fp = cfg.fingerprint()
                runs.append(PlannedRun(id=spec.id, family=spec.family, title=spec.title, paper=spec.paper,
                                       kind=spec.kind, dataset=name, attribute=target, label=label, point=point,
                                       fingerprint=fp, run_dir=f"{spec.id}/{name}/{fp}", config=cfg_dict,
                                       data_root=data[name]))
    return Plan(runs=runs, skipped=skipped)


def shard(runs: Sequence[PlannedRun], i: int, n: int) -> list[PlannedRun]:
    """Shard ``i`` of ``n`` (1-based): every n-th run over a stable sort by (fingerprint, run_dir).

    Deterministic and independent of the order of the files, so the shards of one plan are
    disjoint and together cover it; within a shard runs keep the plan's order.
    """
    order = sorted(range(len(runs)), key=lambda k: (runs[k].fingerprint, runs[k].run_dir))
    mine = {k for pos, k in enumerate(order) if pos % n == i - 1}
    return [r for k, r in enumerate(runs) if k in mine]


def index_name(shard_: tuple[int, int] | None) -> str:
    return "suite.json" if shard_ is None else f"suite-{shard_[0]}-of-{shard_[1]}.json"


def _metrics_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {"macro_auc": metrics.get("macro_auc"), "macro_auc_ci": metrics.get("macro_auc_ci")}


def run_suite(folder: str | Path, *, data: dict[str, str], out: str | Path, budget: str = "full",
              attribute: str | None = None, only: Sequence[str] = (), shard_: tuple[int, int] | None = None,
              overrides: dict[str, Any] | None = None, dry_run: bool = False,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    """Expand, shard and run the suite; write and return the index (``suite*.json`` in ``out``)."""
    from readingrace.experiments.rundir import write_json

    out = Path(out)
    plan = expand_suite(folder, data=data, budget=budget, attribute=attribute, only=only, overrides=overrides)
    runs = shard(plan.runs, *shard_) if shard_ else plan.runs
    index: dict[str, Any] = {"suite": str(Path(folder).name), "budget": budget, "attribute": attribute,
                             "datasets": sorted(data), "shard": list(shard_) if shard_ else None,
                             "planned": len(plan.runs), "entries": [],
                             "skipped": [asdict(s) for s in plan.skipped]}
    for s in plan.skipped:
        say(f"skip {s.id}" + (f" on {s.dataset}" if s.dataset else "") + f": {s.reason}")
    say(f"{len(runs)} run(s) in this {'shard' if shard_ else 'suite'} ({len(plan.runs)} planned, "
        f"{len(plan.skipped)} skipped)")
    path = out / index_name(shard_)
    if path.is_file() and not dry_run:  # keep what an earlier call (e.g. with other --only) recorded
        planned = {r.run_dir for r in runs}
        try:
            old = json.loads(path.read_text()).get("entries", [])
        except json.JSONDecodeError:
            old = []
        index["entries"] = [e for e in old if e.get("run_dir") not in planned and e.get("status") == "done"]
    t_suite = time.perf_counter()
    for k, r in enumerate(runs, 1):
        entry = {**r.entry(), "status": "planned", "reason": "", "seconds": 0.0}
        index["entries"].append(entry)
        if dry_run:
            say(f"[{k}/{len(runs)}] {r.id} {r.label} on {r.dataset} -> {r.run_dir}")
            continue
        t0 = time.perf_counter()
        say(f"[{k}/{len(runs)}] {r.id} {r.label} on {r.dataset} -> {r.run_dir}")
        try:
            entry.update(_run_one(r, out / r.run_dir, say=say))
            entry["status"] = "done"
        except KeyboardInterrupt:
            entry.update(status="interrupted", reason="interrupted; rerun the same command to resume")
            write_json(path, _finish(index, t_suite))
            raise
        except ReadingRaceError as exc:
            entry.update(status="failed", reason=str(exc))
            say(f"  failed: {exc}")
        except Exception as exc:  # a bug in one run must not lose the rest of the grid
            entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}",
                         traceback=traceback.format_exc(limit=5))
            say(f"  failed: {type(exc).__name__}: {exc}")
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, _finish(index, t_suite))  # after every run: a killed suite keeps its index
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, _finish(index, t_suite))
    say(f"wrote {path}")
    return index


def _finish(index: dict[str, Any], t0: float) -> dict[str, Any]:
    index["seconds"] = round(time.perf_counter() - t0, 1)
    counts: dict[str, int] = {}
    for e in index["entries"]:
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    index["counts"] = counts
    return index


def _run_one(r: PlannedRun, run_dir: Path, *, say: Callable[[str], None]) -> dict[str, Any]:
    cfg: ExperimentConfig = config_from_dict(copy.deepcopy(r.config))
    if r.kind == "confounders":
        return _run_confounders(cfg, run_dir, data_root=r.data_root)
    from readingrace.experiments.run import run_experiment

    reused = (run_dir / "metrics.json").exists()
    metrics = run_experiment(cfg, out=run_dir, data_root=r.data_root, say=lambda m: say(f"  {m}"))
    return {**_metrics_summary(metrics), "reused": reused}


def _run_confounders(cfg: ExperimentConfig, run_dir: Path, *, data_root: str | None) -> dict[str, Any]:
    """B3-style tabular analyses into the run folder (content-addressed like a training run)."""
    import yaml

    from readingrace.cohort.build import build_cohort
    from readingrace.experiments.rundir import RunLock, write_atomic
    from readingrace.stats.confounders import run_confounders, write_confounders

    with RunLock(run_dir):
        if (run_dir / "confounders.json").exists() or (run_dir / "DONE").exists():
            return {"reused": True}
        write_atomic(run_dir / "config.yaml", yaml.safe_dump({"fingerprint": cfg.fingerprint(), **cfg.to_dict()},
                                                             sort_keys=False))
        table, manifest = build_cohort(cfg.cohort, data_root=data_root)
        manifest.write(run_dir / "manifest.json")
        spec = {"target": cfg.cohort.target, "seed": cfg.split.seed, **cfg.confounders}
        spec["label_cols"] = [c for c in spec.get("label_cols", []) if c in table.columns]
        result = run_confounders(table, spec)
        write_confounders(result, run_dir)
        write_atomic(run_dir / "DONE", "")
    return {"reused": False}


def read_indexes(paths: Iterable[str | Path]) -> list[tuple[Path, dict[str, Any]]]:
    """``suite*.json`` files (or folders holding them) -> [(suite folder, index)]."""
    found: list[tuple[Path, dict[str, Any]]] = []
    for p in map(Path, paths):
        files = sorted(p.glob("suite*.json")) if p.is_dir() else [p]
        for f in files:
            if not f.is_file():
                continue
            try:
                found.append((f.parent, json.loads(f.read_text())))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{f}: not a valid suite index ({exc}); rerun that shard") from None
    return found

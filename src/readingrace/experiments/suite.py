"""The paper's grid from one command: expand the shipped ``paper`` suite into content-addressed runs.

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

An experiment of ``kind: external`` (A1-ext) with two or more usable datasets plans one training run
per dataset (or reuses an identical one planned elsewhere, e.g. A1's first architecture) and one
cell per ordered pair X != Y in ``<out>/<id>/<X>__on__<Y>/<fingerprint>/``: X's model on Y's test
split. Cells run after every training run of the call; a cell whose training run is not finished
(another shard) is recorded as ``waiting`` with the reason, and a rerun computes it.
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
from readingrace.errors import ConfigError, LeakageError, ReadingRaceError, SplitError, is_interruption

KINDS = ("train", "confounders", "external", "probe", "explain")
PAPER_ARCHITECTURES = ("resnet34", "densenet121", "efficientnet-b0")
DEFAULT_BLUR_SIGMAS = (1.0, 2.0, 4.0)

#: Why a kind is not run by the suite (other commands do it).
NOT_RUN_BY_SUITE = {
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
    #: With target race, keep only these classes (A2: the paper's Black vs White); other targets ignore it.
    race_classes: list[str] = field(default_factory=list)
    #: C3: a ``--data NAME=PATH`` of kind ``lung_masks`` (image/mask pairs) trains the lung U-Net.
    lung_masks: bool = False


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
    #: External cells (kind "external"): the model trained on ``trained_on`` (its run folder, relative to
    #: the suite output folder) tested on ``tested_on`` (``config`` is that cohort's config).
    trained_on: str | None = None
    tested_on: str | None = None
    trained_run_dir: str | None = None

    def entry(self) -> dict[str, Any]:
        """The index row (no config, no machine path)."""
        d = asdict(self)
        d.pop("config")
        d.pop("data_root")
        if self.kind != "external":
            for k in ("trained_on", "tested_on", "trained_run_dir"):
                d.pop(k)
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
def _holds_yaml(folder: Any) -> bool:
    """Whether a folder (a Path or an importlib.resources Traversable) holds any ``*.yaml`` file."""
    return folder.is_dir() and any(c.name.endswith(".yaml") and c.is_file() for c in folder.iterdir())


def shipped_suites() -> list[str]:
    """Names of the suites shipped with the package (folders of YAMLs under ``readingrace/configs/``)."""
    from importlib import resources

    return sorted(c.name for c in (resources.files("readingrace") / "configs").iterdir() if _holds_yaml(c))


def resolve_suite_dir(name_or_path: str | Path) -> Path:
    """A folder of experiment YAMLs as given, or the name of a suite shipped with the package.

    ``paper`` -> the package's ``readingrace/configs/paper`` (found through :mod:`importlib.resources`,
    so it works from an installed package and from any working directory). A folder holding ``*.yaml``
    files wins over a shipped name; an existing folder without any is refused.
    """
    from importlib import resources

    p = Path(name_or_path)
    if _holds_yaml(p):
        return p
    if p.name == str(name_or_path) and p.name not in ("", ".", ".."):  # a bare name: a shipped suite?
        shipped = resources.files("readingrace") / "configs" / p.name
        if _holds_yaml(shipped):
            if not isinstance(shipped, Path):
                raise ConfigError(f"suite {p.name!r} is shipped inside a zipped package ({shipped}); install "
                                  "readingrace unzipped (pip install) or pass the folder of experiment YAMLs")
            return shipped
    where = f"give a folder of experiment YAMLs or the name of a shipped suite ({', '.join(shipped_suites())})"
    if p.is_dir():
        raise ConfigError(f"{p}: no experiment YAML (*.yaml) in this folder; {where}")
    raise ConfigError(f"suite {str(name_or_path)!r} not found: {where}")


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
                               grid=meta.get("grid", "none") or "none", config=data, path=path.name,
                               race_classes=[str(c) for c in meta.get("race_classes", [])],
                               lung_masks=bool(meta.get("lung_masks", False))))
    ids = [s.id for s in specs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"{folder}: experiment id(s) {dup} appear in more than one file")
    return sorted(specs, key=lambda s: s.id)


def parse_data(items: Iterable[str], datasets: dict[str, Any]) -> dict[str, str]:
    """``["nih=/data/nih"]`` -> ``{"nih": "/data/nih"}``, checking each name is a known dataset, given once."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--data {item!r}: write NAME=PATH, e.g. --data mimic=/data/mimic-cxr-jpg")
        name, path = (s.strip() for s in item.split("=", 1))
        if name not in datasets:
            raise ConfigError(f"--data {item!r}: unknown dataset {name!r}; known: {sorted(datasets)} "
                              "(add one to _datasets.yaml of the suite)")
        if name in out:
            raise ConfigError(f"--data {name} is given twice ({name}={out[name]} and {name}={path}); give each "
                              "dataset once")
        out[name] = path
    return out


def check_attribute(attribute: str | None, datasets: dict[str, Any]) -> None:
    """``--attribute`` must be one the suite's datasets record (``attributes`` in ``_datasets.yaml``)."""
    if attribute is None or not datasets or any("attributes" not in (d or {}) for d in datasets.values()):
        return  # a dataset without a list of attributes accepts any target
    allowed = sorted({a for d in datasets.values() for a in d["attributes"]})
    if attribute not in allowed:
        hint = next((f"; did you mean {a!r}?" for a in allowed if a.lower() == attribute.lower()), "")
        raise ConfigError(f"--attribute {attribute!r}: not an attribute of the suite's datasets; choose one of "
                          f"{' | '.join(allowed)}{hint}")


def check_given_attribute(attribute: str | None, data: dict[str, str], datasets: dict[str, Any]) -> None:
    """``--attribute`` must be recorded by at least one of the datasets given with ``--data`` (else the
    whole plan would be skipped, silently successful)."""
    given = {n: datasets[n] for n in data if n in datasets and (datasets[n] or {}).get("attributes")}
    if attribute is None or not given or any("attributes" not in (datasets.get(n) or {}) for n in data):
        return
    if not any(attribute in d["attributes"] for d in given.values()):
        records = "; ".join(f"{n} records {', '.join(d['attributes'])}" for n, d in sorted(given.items()))
        raise ConfigError(f"--attribute {attribute}: none of the given datasets records it ({records}); "
                          "choose one of those, or add a dataset that records it")


def check_data_paths(data: dict[str, str], datasets: dict[str, Any]) -> None:
    """Every ``--data NAME=PATH`` names an existing file or folder (a generated source may name a folder
    still to be written)."""
    for name, path in data.items():
        generated_into = Path(path).suffix.lower() not in (".yaml", ".yml")
        if (datasets.get(name) or {}).get("source") == "synthetic" and generated_into:
            continue
        if not Path(path).expanduser().exists():
            raise ConfigError(f"--data {name}={path}: no such file or folder; give the {name} data folder")


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
    from readingrace.imaging.perturb import (
        PAPER_BAND_EDGES,
        PAPER_CLIP_THRESHOLD,
        PAPER_NOISE_VARIANCE,
        PAPER_RADII,
        PAPER_RESOLUTIONS,
        paper_cells,
    )

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
    externals: list[tuple[SuiteSpec, list[PlannedRun]]] = []
    for spec in specs:
        if only and spec.id not in only and spec.family not in only:
            continue
        matches = [n for n in data if datasets[n].get("kind") in spec.needs or n in spec.needs]
        if not matches:
            kinds = {d.get("kind") for d in datasets.values()}
            need = (f"a dataset of kind {spec.needs}" if all(n in kinds for n in spec.needs)
                    else f"the dataset {spec.needs} (--data NAME=PATH)")
            skipped.append(Skipped(spec.id, None, f"needs {need}; given: {sorted(data) or 'none'}"))
            continue
        if spec.kind in NOT_RUN_BY_SUITE:
            skipped += [Skipped(spec.id, n, NOT_RUN_BY_SUITE[spec.kind]) for n in matches]
            continue
        trained: list[PlannedRun] = []  # kind external: one training run per dataset, cells after
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
            base, data_root = dataset_input(name, ds, data[name], base)
            if spec.race_classes and target == "race":
                base = deep_merge(base, {"cohort": {"where": {"race": list(spec.race_classes)}}})
            if spec.lung_masks:
                base, note = _with_lung_masks(base, data, datasets)
                if note:
                    skipped.append(Skipped(f"{spec.id} (lung-only, non-lung)", name, note))
            if spec.kind == "probe":  # A3: the dataset's own finding labels for the disease model
                base = deep_merge({"disease": {"labels": "nih" if ds["source"] == "nih" else "chexpert"}}, base)
            if spec.kind == "confounders":
                conf = dict(base.get("confounders") or {})
                conf.setdefault("label_cols", _label_cols(ds["source"]))
                base["confounders"] = conf
            for label, point, over in grid_points(spec.grid, params=prof.get("grids") or {}, base=base):
                cfg_dict = deep_merge(base, over)
                empty = _empty_filter(cfg_dict)
                if empty:
                    skipped.append(Skipped(spec.id, name, f"{label}: {empty}"))
                    continue
                cfg_dict["name"] = f"{spec.id} {label}" if label != "baseline" else spec.id
                if "description" in cfg_dict:
                    cfg_dict["description"] = with_attribute(str(cfg_dict["description"]), target)
                try:
                    cfg = config_from_dict(copy.deepcopy(cfg_dict))
                except ConfigError as exc:
                    raise ConfigError(f"{folder / spec.path} ({name}, {label}): {exc}") from None
                fp = cfg.fingerprint()
                run = PlannedRun(id=spec.id, family=spec.family, title=with_attribute(spec.title, target), paper=spec.paper,
                                 kind="train" if spec.kind == "external" else spec.kind, dataset=name,
                                 attribute=target, label=label, point=point, fingerprint=fp,
                                 run_dir=f"{spec.id}/{name}/{fp}", config=cfg_dict, data_root=data_root)
                (trained if spec.kind == "external" else runs).append(run)
        if spec.kind == "external":
            if len({r.dataset for r in trained}) != len(trained):
                raise ConfigError(f"{folder / spec.path}: an external experiment trains one model per dataset; "
                                  "use 'grid: none'")
            if len(trained) < 2:
                given = [r.dataset for r in trained] or sorted(data)
                skipped.append(Skipped(spec.id, trained[0].dataset if trained else None,
                                       f"trains on one dataset and tests on another: needs two or more datasets of "
                                       f"kind {spec.needs} that record the target; usable here: {given}. For one "
                                       "dataset against a generated site, add --data synthetic=SITE.yaml, or use "
                                       "`readingrace external` on finished runs"))
            else:
                externals.append((spec, trained))
    for spec, trained in externals:  # after every spec: reuse an identical training run planned elsewhere
        runs += external_cells(spec, trained, runs)
    return Plan(runs=runs, skipped=skipped)


def dataset_input(name: str, ds: dict[str, Any], path: str, base: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """What ``--data NAME=PATH`` means: the data folder, except for a generated (synthetic) source given a
    YAML file, whose generator options (``cohort.options`` of an experiment YAML, or a bare mapping of
    options) define the site; its images are then generated into the cache ($READINGRACE_CACHE)."""
    if ds.get("source") != "synthetic" or Path(path).suffix.lower() not in (".yaml", ".yml"):
        return base, path
    if not Path(path).is_file():
        raise ConfigError(f"--data {name}={path}: no such file; give a YAML of synthetic options (or an experiment "
                          "YAML with cohort.options), or a folder to write the generated images into")
    spec = read_yaml(path)
    options = (spec.get("cohort") or {}).get("options", {}) if "cohort" in spec else spec
    if not isinstance(options, dict):
        raise ConfigError(f"--data {name}={path}: cohort.options must be a mapping of synthetic generator options")
    return deep_merge(base, {"cohort": {"options": options}}), None


def external_cells(spec: SuiteSpec, trained: list[PlannedRun], runs: list[PlannedRun]) -> list[PlannedRun]:
    """The training runs an external spec still needs plus one cell per ordered pair (X != Y).

    A training run identical to one already planned (same dataset and fingerprint: A1's first
    architecture, with the same budget) is not planned twice; the cells read that run's folder.
    A cell tests X's model on Y's test split (Y's config, split as Y's own run splits it).
    """
    import hashlib

    source: dict[str, PlannedRun] = {}
    new: list[PlannedRun] = []
    for t in trained:
        same = next((r for r in runs if r.kind == "train" and r.dataset == t.dataset and r.fingerprint == t.fingerprint),
                    None)
        if same is None:
            new.append(t)
        source[t.dataset] = same or t
    for x, tx in source.items():
        for y, ty in source.items():
            if x == y:
                continue
            key = {"trained": [x, tx.fingerprint], "tested": [y, ty.fingerprint], "split": "test"}
            fp = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
            new.append(PlannedRun(id=spec.id, family=spec.family, title=with_attribute(spec.title, ty.attribute),
                                  paper=spec.paper, kind="external",
                                  dataset=y, attribute=ty.attribute, label=f"{x} -> {y}",
                                  point={"trained_on": x, "tested_on": y}, fingerprint=fp,
                                  run_dir=f"{spec.id}/{x}__on__{y}/{fp}", config=ty.config, data_root=ty.data_root,
                                  trained_on=x, tested_on=y, trained_run_dir=tx.run_dir))
    return new


def _with_lung_masks(base: dict[str, Any], data: dict[str, str], datasets: dict[str, Any]
                     ) -> tuple[dict[str, Any], str | None]:
    """C3: point ``evaluate.lungs.unet_pairs`` at the given lung-mask pairs, or say why lungs are not run."""
    given = [n for n in data if datasets[n].get("kind") == "lung_masks"]
    if not given:
        return base, ("lung-only and non-lung test images need lung masks: add --data lungs=FOLDER (image/mask "
                      "pairs listed in FOLDER/pairs.csv) to train the lung U-Net; Grad-CAM and occlusion still run")
    path = Path(data[given[0]]).expanduser().resolve()
    pairs = path / "pairs.csv" if path.is_dir() else path
    return deep_merge(base, {"evaluate": {"lungs": {"unet_pairs": str(pairs)}}}), None


def _empty_filter(cfg_dict: dict[str, Any]) -> str | None:
    """Why a grid point's Fourier filter keeps no frequency at the run's image size (else None).

    E.g. high-pass d = 200 (pixels at 224) at 64 px: the spectrum ends at radius ~45 there, so the
    images would be blank; such a point is skipped with this reason rather than trained.
    """
    from readingrace.imaging.perturb import frequency_mask

    size = int((cfg_dict.get("image") or {}).get("size", 64))
    for spec in (cfg_dict.get("perturb") or {}).get("train", []):
        if spec.get("name") != "fourier":
            continue
        opts = {k: v for k, v in spec.items() if k in ("unit", "reference_size")}
        radius = tuple(spec["radius"]) if isinstance(spec["radius"], list) else spec["radius"]
        if not bool(frequency_mask(size, size, kind=spec["kind"], radius=radius, **opts).any()):
            return (f"at {size} px this {spec['kind']} filter keeps no frequency (the images would be blank); "
                    "not trained")
    return None


def shard(runs: Sequence[PlannedRun], i: int, n: int) -> list[PlannedRun]:
    """Shard ``i`` of ``n`` (1-based): every n-th run over a stable sort by (fingerprint, run_dir).

    Deterministic and independent of the order of the files, so the shards of one plan are
    disjoint and together cover it; within a shard runs keep the plan's order.
    """
    order = sorted(range(len(runs)), key=lambda k: (runs[k].fingerprint, runs[k].run_dir))
    mine = {k for pos, k in enumerate(order) if pos % n == i - 1}
    return [r for k, r in enumerate(runs) if k in mine]


def index_name(shard_: tuple[int, int] | None, *, dry_run: bool = False) -> str:
    """``suite[-i-of-n].json``; a dry run writes ``plan[-i-of-n].json`` and never touches the index."""
    stem = "plan" if dry_run else "suite"
    return f"{stem}.json" if shard_ is None else f"{stem}-{shard_[0]}-of-{shard_[1]}.json"


def _metrics_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {"macro_auc": metrics.get("macro_auc"), "macro_auc_ci": metrics.get("macro_auc_ci")}


def run_suite(folder: str | Path, *, data: dict[str, str], out: str | Path, budget: str = "full",
              attribute: str | None = None, only: Sequence[str] = (), shard_: tuple[int, int] | None = None,
              overrides: dict[str, Any] | None = None, dry_run: bool = False,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    """Expand, shard and run the suite; write and return the index (``suite*.json`` in ``out``)."""
    from readingrace.experiments.rundir import write_json

    out = Path(out)
    datasets = _read_side(resolve_suite_dir(folder), "_datasets.yaml")
    check_attribute(attribute, datasets)
    check_given_attribute(attribute, data, datasets)
    if dry_run:  # a real run reports a missing data folder per run (failed, with the reason)
        check_data_paths(data, datasets)
    plan = expand_suite(folder, data=data, budget=budget, attribute=attribute, only=only, overrides=overrides)
    runs = shard(plan.runs, *shard_) if shard_ else plan.runs
    # external cells read trained runs: after every training run of this call
    runs = [r for r in runs if r.kind != "external"] + [r for r in runs if r.kind == "external"]
    index: dict[str, Any] = {"suite": str(Path(folder).name), "budget": budget, "attribute": attribute,
                             "datasets": sorted(data), "shard": list(shard_) if shard_ else None,
                             "planned": len(plan.runs), "entries": [],
                             "skipped": [asdict(s) for s in plan.skipped]}
    for s in plan.skipped:
        say(f"skip {s.id}" + (f" on {s.dataset}" if s.dataset else "") + f": {s.reason}")
    say(f"{len(runs)} run(s) in this {'shard' if shard_ else 'suite'} ({len(plan.runs)} planned, "
        f"{len(plan.skipped)} skipped)")
    path = out / index_name(shard_, dry_run=dry_run)
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
        if dry_run:  # a finished run of this exact config (same content address) is reused, not redone
            if (out / r.run_dir / "metrics.json").is_file():
                entry.update(status="done", reason="finished earlier: reused")
            say(f"[{k}/{len(runs)}] {r.id} {r.label} on {r.dataset} -> {r.run_dir}"
                + (" (done)" if entry["status"] == "done" else ""))
            continue
        t0 = time.perf_counter()
        say(f"[{k}/{len(runs)}] {r.id} {r.label} on {r.dataset} -> {r.run_dir}")
        try:
            blocked = _cell_blocked(r, out, index["entries"])
            if blocked:
                entry.update(status=blocked[0], reason=blocked[1])
                say(f"  {blocked[0]}: {blocked[1]}")
            else:
                entry.update(_run_one(r, out, say=say))
                entry["status"] = "done"
        except (KeyboardInterrupt, SystemExit) as exc:
            if not is_interruption(exc):
                raise  # Lightning answers Ctrl-C during training with sys.exit(1): that one is recorded
            entry.update(status="interrupted", reason="interrupted; rerun the same command to resume")
            out.mkdir(parents=True, exist_ok=True)
            write_json(path, _finish(index, t_suite))
            raise
        except SplitError as exc:
            where = (r.config.get("cohort") or {}).get("where")
            if where and not isinstance(exc, LeakageError):
                # a stratum (B1/B5 within-group runs) too small for the split is data, not a fault
                entry.update(status="skipped", reason=f"stratum {_where_text(where)}: {exc}")
                say(f"  skipped: {entry['reason']}")
            else:
                entry.update(status="failed", reason=str(exc))
                say(f"  failed: {exc}")
        except ReadingRaceError as exc:
            entry.update(status="failed", reason=str(exc))
            say(f"  failed: {exc}")
        except Exception as exc:  # noqa: BLE001 - a bug in one run must not lose the rest of the grid
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


def with_attribute(text: str, attribute: str) -> str:
    """A title or description with ``{attribute}`` filled: "the {attribute} model" -> "the sex model"."""
    return text.replace("{attribute}", attribute)


def _where_text(where: dict[str, Any]) -> str:
    return ", ".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in where.items())


def _finish(index: dict[str, Any], t0: float) -> dict[str, Any]:
    index["seconds"] = round(time.perf_counter() - t0, 1)
    counts: dict[str, int] = {}
    for e in index["entries"]:
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    index["counts"] = counts
    return index


def _cell_blocked(r: PlannedRun, out: Path, entries: list[dict[str, Any]]) -> tuple[str, str] | None:
    """Why an external cell cannot run yet (status, reason), or None when its trained run is finished."""
    if r.kind != "external" or (out / str(r.trained_run_dir) / "metrics.json").is_file():
        return None
    failed = next((e for e in entries if e.get("run_dir") == r.trained_run_dir and e.get("status") == "failed"), None)
    if failed:
        return "blocked", (f"trained run on {r.trained_on} failed ({str(failed.get('reason', ''))[:200]}): fix it, "
                           "then rerun this command")
    return "waiting", f"trained run on {r.trained_on} not finished: run its shard first, then rerun this command"


def _run_external(r: PlannedRun, out: Path, *, say: Callable[[str], None]) -> dict[str, Any]:
    """One external cell: the model of ``r.trained_run_dir`` on the test split of ``r.tested_on``."""
    from readingrace.experiments.external import cohort_from_config, predict_run

    cfg = config_from_dict(copy.deepcopy(r.config))
    other = cohort_from_config(cfg, name=r.tested_on, data_root=r.data_root, split="test")
    metrics = predict_run(out / str(r.trained_run_dir), other, out=out / r.run_dir, trained_on=r.trained_on,
                          say=lambda m: say(f"  {m}"))
    return {**_metrics_summary(metrics), "input_mode": metrics.get("input_mode"), "reused": metrics["reused"]}


def _run_one(r: PlannedRun, out: Path, *, say: Callable[[str], None]) -> dict[str, Any]:
    if r.kind == "external":
        return _run_external(r, out, say=say)
    run_dir = out / r.run_dir
    cfg: ExperimentConfig = config_from_dict(copy.deepcopy(r.config))
    if r.kind == "confounders":
        return _run_confounders(cfg, run_dir, data_root=r.data_root)
    if r.kind == "probe":
        from readingrace.experiments.a3 import run_a3

        reused = (run_dir / "metrics.json").exists()
        metrics = run_a3(cfg, out=run_dir, data_root=r.data_root, say=lambda m: say(f"  {m}"))
        return {**_metrics_summary(metrics), "reused": reused}
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

    from readingrace.experiments.run import check_same_cohort

    table, manifest = build_cohort(cfg.cohort, data_root=data_root)  # memoised: once per distinct cohort
    target = cfg.cohort.target
    with RunLock(run_dir):
        if (run_dir / "confounders.json").exists() or (run_dir / "DONE").exists():
            check_same_cohort(run_dir, table, target=target)  # the same data as then (folders since cohort.csv)
            return {"reused": True}
        write_atomic(run_dir / "config.yaml", yaml.safe_dump({"kind": "confounders", "fingerprint": cfg.fingerprint(),
                                                              **cfg.to_dict()}, sort_keys=False))
        manifest.write(run_dir / "manifest.json")
        write_atomic(run_dir / "cohort.csv", table[["image_id", "patient_id", target]].to_csv(index=False))
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

"""External validation (paper Table 4, A1-ext): a trained run applied to another cohort, and the
matrix of every ordered pair (trained on X, tested on Y).

The model keeps its own preprocessing (image size, perturbations, intensity normalisation). Other
sites' images are brought to the model's square input by an *input mode*: ``stretch`` resizes each
image to the square (a non-square image changes its aspect ratio); ``pad`` first zero-pads the
shorter side, centred, to a square (the anatomy keeps its proportions, with bands of zeros), then
resizes. The default is the trained run's own ``image.mode``, i.e. what the model saw in training.

Classes are harmonised by name: test images of a class the model never learnt are counted out (a
step of the manifest, and a note), and a model class absent from the other cohort gets NaN with a
note, never a silent drop. The test cohort must be built for the model's target. Images the model
trained or validated on (and other images of those patients), found in the run's own ``cohort.csv``,
are excluded and noted; a cohort with nothing else is refused, and one left with only the model's internal
test images is flagged ``internal_only``. Byte-identical copies of training images under other paths and
ids are not recognised (contents are not hashed). A cell folder records its inputs
(``inputs.json``); the same inputs again reuse it.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from readingrace.cohort.build import build_cohort
from readingrace.cohort.manifest import Manifest, sha256_file
from readingrace.cohort.schema import patient_key
from readingrace.config import ExperimentConfig, config_from_dict
from readingrace.errors import CohortError, ConfigError, LeakageError, ReadingRaceError, RunError
from readingrace.experiments.rundir import RunLock, clean_nan, write_atomic, write_json

SCHEMA = "readingrace.external/1"
INPUT_MODES = ("stretch", "pad")
INPUTS_FILE = "inputs.json"
INDEX_FILE = "external.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# -- runs and cohorts ------------------------------------------------------------------------------
def load_run_config(run_dir: Path) -> ExperimentConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        what = "does not exist" if not Path(run_dir).exists() else "is not a run folder (no config.yaml)"
        raise RunError(f"{run_dir} {what}: give the folder `readingrace run` wrote")
    data = yaml.safe_load(path.read_text()) or {}
    data.pop("fingerprint", None)
    data.pop("readingrace", None)
    return config_from_dict(data)


def finished_run(run_dir: str | Path) -> tuple[ExperimentConfig, dict[str, Any]]:
    """The config and internal test metrics of a finished run (:class:`RunError` when unfinished)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise RunError(f"{run_dir} has no metrics.json: the run has not finished; rerun `readingrace run` first")
    return cfg, json.loads(path.read_text())


def check_mode(mode: str | None) -> str | None:
    if mode is not None and mode not in INPUT_MODES:
        raise ConfigError(f"input mode {mode!r}: choose stretch (resize to a square) or pad (zero-pad the shorter "
                          "side to a square first, keeping the aspect ratio)")
    return mode


@dataclass
class ExternalCohort:
    """The images a model is tested on; built only when a cell has to be computed (``load``)."""

    name: str
    description: str
    key: dict[str, Any]  # what identifies the images: a cell is reused only while this is unchanged
    # load(model_target): the cohort table and its manifest
    load: Callable[[str], tuple[pd.DataFrame, Manifest]] = field(repr=False)
    bit_depth: int | None = None
    target: str | None = None  # the target its images were selected for; None: built for the model's target
    target_fix: str = "test the model on a cohort built for its target"  # what to do when the targets differ

    def check_target(self, model_target: str) -> None:
        """:class:`ConfigError` when the cohort was built for another target than the model predicts."""
        if self.target is not None and self.target != model_target:
            raise ConfigError(f"cohort {self.name!r} is built for target {self.target!r} (its exclusions and classes), "
                              f"but the model predicts {model_target!r}: {self.target_fix}")


def read_test_config(path: str | Path, *, overrides: dict[str, Any] | None = None) -> tuple[ExperimentConfig, bool]:
    """A test cohort's config, and whether it names its target (``cohort.target`` in the file, a file it
    extends, or ``overrides``); one that does not is built for the target of the model tested on it."""
    from readingrace.config import deep_merge, load_config, read_yaml

    raw = deep_merge(read_yaml(path), overrides or {})
    cohort = raw.get("cohort")
    return load_config(path, overrides=overrides), isinstance(cohort, dict) and "target" in cohort


def cohort_from_config(cfg: ExperimentConfig, *, name: str | None = None, data_root: str | Path | None = None,
                       split: str | None = None, follow_model_target: bool = False) -> ExternalCohort:
    """Cohort ``cfg.cohort`` from its source: all its images, or (``split="test"``) only the test split
    as a run of ``cfg`` would split it (same cohort, images, split ratios and seed).

    ``follow_model_target``: the config names no target, so the cohort is built for the target of the
    model tested on it; otherwise it must be the model's (:meth:`ExternalCohort.check_target`)."""
    root = data_root or cfg.cohort.data_root
    d = cfg.to_dict()
    key: dict[str, Any] = {"cohort": {k: v for k, v in d["cohort"].items() if k != "data_root"},
                           "data_root": str(Path(root).resolve()) if root else None, "split": split}
    if follow_model_target:
        key["cohort"]["target"] = "the model's"  # the trained run's fingerprint in the cell's inputs has it
    if split:
        key.update(split_config=d["split"], image={k: d["image"][k] for k in ("size", "mode", "bit_depth")})

    def load(model_target: str) -> tuple[pd.DataFrame, Manifest]:
        own = cfg
        if follow_model_target and model_target != cfg.cohort.target:
            own = config_from_dict({**d, "cohort": {**d["cohort"], "target": model_target}})
        if split is None:
            if root is not None and not Path(root).exists() and cfg.cohort.source != "synthetic":
                raise CohortError(f"data folder not found: {root}")
            return build_cohort(own.cohort, data_root=root)
        from readingrace.experiments.run import prepare

        prep = prepare(own, data_root=root, say=lambda m: None)
        table = prep.cohort.drop(columns=["cache_index"])
        part = prep.manifest.step(f"{split} split (split by patient as its own run splits it, seed {cfg.split.seed})",
                                  table, table[table["split"] == split])
        return part, prep.manifest

    what = "all images" if split is None else f"the {split} split"
    return ExternalCohort(name=name or cfg.name, description=f"{what} of cohort {cfg.cohort.source}", key=key,
                          load=load, bit_depth=cfg.image.bit_depth,
                          target=None if follow_model_target else cfg.cohort.target,
                          target_fix="drop cohort.target from its config (the model's target is then used) or "
                                     "set it to the model's")


def cohort_from_run(run_dir: str | Path, *, name: str | None = None) -> ExternalCohort:
    """The images a finished run was tested on (the test split of its ``cohort.csv``, paths as recorded),
    so a column of the matrix holds the same patients as that run's internal test."""
    run_dir = Path(run_dir)
    cfg, _ = finished_run(run_dir)
    path = run_dir / "cohort.csv"
    if not path.is_file():
        raise RunError(f"{run_dir} has no cohort.csv: rerun `readingrace run` for that folder")
    key = {"run": cfg.fingerprint(), "cohort_sha256": sha256_file(path)}

    def load(model_target: str) -> tuple[pd.DataFrame, Manifest]:
        table = pd.read_csv(path, low_memory=False, dtype={"image_id": str, "patient_id": str, "study_id": str})
        if "split" not in table.columns:
            raise RunError(f"{path} has no 'split' column: rerun `readingrace run` for that folder")
        man_path = run_dir / "manifest.json"
        manifest = Manifest.read(man_path) if man_path.is_file() else Manifest(source=cfg.cohort.source)
        table = table.drop(columns=["cache_index"], errors="ignore")
        part = manifest.step(f"test split of the run in {run_dir.name}", table, table[table["split"] == "test"])
        return part, manifest

    return ExternalCohort(name=name or cfg.name, description=f"the test split of the run {cfg.name!r}", key=key,
                          load=load, bit_depth=cfg.image.bit_depth, target=cfg.cohort.target,
                          target_fix=f"the run in {run_dir} was trained for {cfg.cohort.target!r}; put runs of "
                                     "one target in a matrix")


def input_images(paths: list[str], *, trained: ExperimentConfig, mode: str | None = None,
                 bit_depth: int | None = None):
    """Decode other-site images to the trained model's input (its size; ``mode`` or its own mode)."""
    from readingrace.experiments.run import cache_root
    from readingrace.imaging.cache import build_cache

    return build_cache(paths, size=trained.image.size, cache_root=cache_root(trained) / "images",
                       mode=check_mode(mode) or trained.image.mode, dtype=trained.image.cache_dtype,
                       bit_depth=bit_depth)


# -- images the model has seen ---------------------------------------------------------------------
def run_cohort(run_dir: Path) -> pd.DataFrame:
    """The run's own ``cohort.csv`` (with its ``split``): which images the model trained, validated and tested on."""
    path = run_dir / "cohort.csv"
    if not path.is_file():
        raise RunError(f"{run_dir} has no cohort.csv, so the images its model trained on are unknown and an "
                       "external test could include them: rerun `readingrace run` for that folder")
    table = pd.read_csv(path, low_memory=False, dtype={"image_id": str, "patient_id": str, "path": str})
    missing = [c for c in ("image_id", "patient_id", "path", "split") if c not in table.columns]
    if missing:
        raise RunError(f"{path} lacks column(s) {missing}: rerun `readingrace run` for that folder")
    return table


def _real_paths(paths: pd.Series) -> pd.Series:
    return paths.astype(str).map(os.path.realpath)


def _same_images(cohort: pd.DataFrame, part: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per ``cohort`` row: the same file as a row of ``part`` (resolved path); the same (dataset, patient_id,
    image_id). Byte-identical copies under other names and ids match neither."""
    pairs = pd.MultiIndex.from_arrays([patient_key(cohort), cohort["image_id"].astype(str)])
    part_pairs = pd.MultiIndex.from_arrays([patient_key(part), part["image_id"].astype(str)])
    same_file = _real_paths(cohort["path"]).isin(set(_real_paths(part["path"]))).to_numpy()
    return same_file, pairs.isin(part_pairs)


def exclude_seen(cohort: pd.DataFrame, trained: pd.DataFrame, manifest: Manifest, *, name: str
                 ) -> tuple[pd.DataFrame, list[str], dict[str, int]]:
    """Drop from test ``cohort`` the images the model trained or validated on (``trained``: the run's
    cohort.csv): the same file (resolved path) or the same (dataset, patient_id, image_id); then the
    other images of those train/validation patients (same dataset and patient_id). Images of the run's own test split
    stay (unseen) with a note. Returns the rest, notes and counts; :class:`LeakageError` if nothing is left.
    """
    seen = trained[trained["split"].isin(["train", "val"])]
    own_test = trained[trained["split"] == "test"]
    same_file, same_ids = _same_images(cohort, seen)
    same_image = same_file | same_ids
    same_patient = ~same_image & patient_key(cohort).isin(set(patient_key(seen))).to_numpy()
    test_file, test_ids = _same_images(cohort, own_test)
    in_own_test = ~same_image & ~same_patient & (test_file | test_ids)
    counts = {"same_image": int(same_image.sum()), "same_file": int(same_file.sum()),
              "same_ids_other_file": int((same_ids & ~same_file).sum()), "same_patient": int(same_patient.sum()),
              "patients": int(cohort.loc[same_image | same_patient, "patient_id"].nunique()),
              "internal_test_overlap": int(in_own_test.sum())}
    notes = []
    if counts["same_image"]:
        notes.append(f"{counts['same_image']} image(s) the model trained or validated on were left out "
                     f"({counts['same_file']} the same file, {counts['same_ids_other_file']} the same patient_id and "
                     "image_id in another file)")
    if counts["same_patient"]:
        n_pat = cohort.loc[same_patient, "patient_id"].nunique()
        notes.append(f"{counts['same_patient']} other image(s) of {n_pat} patient(s) of the model's training or "
                     "validation split were left out (same patient_id)")
    # the same patient ids under another dataset name: other people, or the same hospital under two names
    # (a CSV cohort is named after its file); not left out, but said
    other_name = ~same_image & ~same_patient & cohort["patient_id"].astype(str).isin(
        set(seen["patient_id"].astype(str))).to_numpy()
    counts["same_id_other_dataset"] = int(other_name.sum())
    if counts["same_id_other_dataset"]:
        names = sorted(set(seen["dataset"].astype(str))) if "dataset" in seen.columns else []
        notes.append(f"{counts['same_id_other_dataset']} image(s) have the patient_id of a patient the model "
                     f"trained on in another dataset ({', '.join(names)}); they were kept as other people: if "
                     "they are the same patients, give both cohorts the same dataset name")
    keep = ~(same_image | same_patient)
    rest = manifest.step("not seen by the model (its training and validation images and patients left out)",
                         cohort, cohort[keep], detail="; ".join(notes))
    if counts["internal_test_overlap"]:
        notes.append(f"{counts['internal_test_overlap']} image(s) overlap the model's internal test set (unseen in "
                     "training; kept)")
    if rest.empty:
        raise LeakageError(f"all {len(cohort)} image(s) of cohort {name!r} are the model's own training or validation "
                           f"images ({counts['same_image']}) or other images of those patients "
                           f"({counts['same_patient']}): not an external test; test on images it has not seen")
    return rest, notes, counts


# -- one cell ------------------------------------------------------------------------------------------
def predict_run(run_dir: str | Path, other: ExperimentConfig | ExternalCohort, *, out: str | Path,
                data_root: str | Path | None = None, mode: str | None = None, trained_on: str | None = None,
                reuse: bool = True, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Predict cohort ``other`` with the trained model(s) of ``run_dir``; write predictions and metrics.

    ``other``: a config (all images of its cohort, built with ``data_root``; its target must be the
    model's) or an :class:`ExternalCohort`. Images the model trained or validated on, and their patients,
    are left out (:func:`exclude_seen`). Writes ``predictions.csv`` (first seed), ``predictions_seed-<s>.csv``,
    ``metrics.json`` (the standard schema plus ``trained_on``, ``tested_on``, ``input_mode``, ``notes``,
    ``excluded_classes``, ``seen_by_model``, ``internal_test_images`` and ``internal_only``: every image
    tested is one of the model's own internal test images), ``manifest.json`` and ``inputs.json``; a
    folder whose ``inputs.json`` matches is reused (``"reused": True`` in the result). Notes are also said.
    """
    from readingrace.predict import predict_proba, predictions_table
    from readingrace.stats.metrics import evaluate_predictions
    from readingrace.train import load_classifier

    run_dir = Path(run_dir)
    trained, internal = finished_run(run_dir)
    if isinstance(other, ExperimentConfig):
        other = cohort_from_config(other, data_root=data_root)
    input_mode = check_mode(mode) or trained.image.mode
    classes = [str(c) for c in internal["classes"]]
    target = trained.cohort.target
    other.check_target(target)
    seen = run_cohort(run_dir)
    inputs = {"schema": SCHEMA, "input_mode": input_mode, "tested": other.key,
              "trained": {"fingerprint": trained.fingerprint(), "metrics_sha256": sha256_file(run_dir / "metrics.json"),
                          "cohort_sha256": sha256_file(run_dir / "cohort.csv"), "seeds": list(trained.train.seeds)}}
    out = Path(out)
    with RunLock(out):
        if reuse and _same_inputs(out, inputs):
            say(f"reusing {out} (same model, cohort and input mode)")
            metrics = json.loads((out / "metrics.json").read_text())
            for note in metrics.get("notes") or []:
                say(f"note: {note}")
            return {**metrics, "reused": True}
        (out / INPUTS_FILE).unlink(missing_ok=True)  # incomplete until written again, last
        cohort, manifest = other.load(target)
        if target not in cohort.columns:
            raise CohortError(f"cohort {other.name!r} has no {target!r} column to compare with the model's classes "
                              f"{classes}; available: {sorted(map(str, cohort.columns))}")
        n_loaded = len(cohort)
        cohort, notes, seen_counts = exclude_seen(cohort, seen, manifest, name=other.name)
        labels = cohort[target].astype(str)
        unknown = labels[~labels.isin(classes)].value_counts().sort_index()
        class_note = ""
        if len(unknown):
            class_note = (f"{int(unknown.sum())} image(s) of class(es) the model never learnt were left out: "
                          + ", ".join(f"{c} ({n})" for c, n in unknown.items()))
            notes.append(class_note)
        cohort = manifest.step(f"{target} among the model's classes {classes}", cohort, cohort[labels.isin(classes)],
                               detail=class_note)
        if cohort.empty:
            raise CohortError(f"no image of cohort {other.name!r} has a {target} the model knows ({classes})")
        absent = [c for c in classes if c not in set(cohort[target].astype(str))]
        notes += [f"class {c!r} of the model is absent from {other.name}: its AUC is undefined (NaN)" for c in absent]
        cache = input_images(cohort["path"].astype(str).tolist(), trained=trained, mode=input_mode,
                             bit_depth=other.bit_depth)
        for i, reason in sorted(cache.reasons.items()):
            manifest.skip(cohort["image_id"].iloc[i], reason, stage="image")
        ok = np.asarray(cache.ok, bool)
        index = np.flatnonzero(ok)
        cohort = manifest.step("image decodes", cohort, cohort[ok])
        if cohort.empty:
            raise CohortError(f"no image of cohort {other.name!r} could be decoded; see {out / 'manifest.json'}")
        own_file, own_ids = _same_images(cohort, seen[seen["split"] == "test"])
        n_own_test = int((own_file | own_ids).sum())
        internal_only = n_own_test == len(cohort)
        if internal_only:
            notes.append(f"all {len(cohort)} remaining test images are {trained_on or trained.name}'s own internal "
                         "test images: this repeats its internal test, it is not an external one")
        left = [(seen_counts["same_image"] + seen_counts["same_patient"],
                 "the model's own training and validation images and patients"),
                (int(unknown.sum()), "classes it never learnt"), (int((~ok).sum()), "images that do not decode")]
        left_text = ", ".join(f"{what} ({n})" for n, what in left if n)
        say(f"{other.name}: {len(cohort)} images of {cohort['patient_id'].nunique()} patients tested ("
            + (f"{other.description}: {n_loaded} images before leaving out {left_text})" if left_text
               else f"{other.description})"))
        for note in notes:
            say(f"note: {note}")
        per_seed = {}
        for seed in trained.train.seeds:
            model = load_classifier(run_dir / f"seed-{seed}" / "checkpoints" / "best.ckpt")
            probs = predict_proba(model, cache.images, index, batch_size=64)
            pred = predictions_table(cohort, probs, classes, target=target, extra=trained.evaluate.strata)
            write_atomic(out / f"predictions_seed-{seed}.csv", pred.to_csv(index=False))
            per_seed[seed] = evaluate_predictions(pred, classes=classes, n_bootstrap=trained.evaluate.n_bootstrap,
                                                  seed=trained.split.seed, level=trained.evaluate.level,
                                                  threshold=trained.evaluate.threshold,
                                                  strata=[s for s in trained.evaluate.strata if s in pred],
                                                  study_level=trained.evaluate.study_level)
        first = trained.train.seeds[0]
        write_atomic(out / "predictions.csv", (out / f"predictions_seed-{first}.csv").read_text())
        metrics = dict(per_seed[first])
        metrics.update({
            "target": target, "model": trained.model.name, "trained_run": str(run_dir),
            "trained_on": trained_on or trained.name, "tested_on": other.name, "test_cohort": other.description,
            "input_mode": input_mode, "image_size": trained.image.size, "notes": notes,
            "excluded_classes": {str(c): int(n) for c, n in unknown.items()}, "absent_classes": absent,
            "seen_by_model": seen_counts, "internal_test_images": n_own_test, "internal_only": internal_only,
            "seeds": {str(s): {"macro_auc": m["macro_auc"], "macro_auc_ci": m["macro_auc_ci"]} for s, m in per_seed.items()},
        })
        manifest.write(out / "manifest.json")
        metrics = clean_nan(metrics)
        write_json(out / "metrics.json", metrics)
        write_json(out / INPUTS_FILE, inputs)
        return {**metrics, "reused": False}


def _same_inputs(out: Path, inputs: dict[str, Any]) -> bool:
    try:
        old = json.loads((out / INPUTS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return old == json.loads(json.dumps(inputs, default=str)) and (out / "metrics.json").is_file()


# -- the matrix ----------------------------------------------------------------------------------------
def cell_record(metrics: Mapping[str, Any] | None, *, trained_on: str, tested_on: str, cell_dir: str | Path | None,
                input_mode: str | None, internal: bool = False, status: str = "done", reason: str = "",
                reused: bool = False) -> dict[str, Any]:
    """One cell of the matrix (the row of ``external.json`` and ``matrix.csv``). ``n_images``: test images;
    ``internal_only``: an off-diagonal cell whose images are all the row model's own internal test images."""
    m = dict(metrics or {})
    per = m.get("per_class") or {}
    seen = m.get("seen_by_model") or {}
    notes = list(m.get("notes") or [])
    if internal:
        notes.insert(0, "internal: the run's own test split (its metrics.json)")
    return {"trained_on": trained_on, "tested_on": tested_on, "internal": internal, "status": status,
            "reason": reason, "macro_auc": m.get("macro_auc"), "macro_auc_ci": list(m.get("macro_auc_ci") or [None, None]),
            "per_class_auc": {c: p.get("auc") for c, p in per.items()},
            "per_class_auc_ci": {c: list(p.get("auc_ci") or [None, None]) for c, p in per.items()},
            "n_images": m.get("n_images"), "n_patients": m.get("n_patients"), "input_mode": input_mode,
            "notes": notes, "cell_dir": None if cell_dir is None else str(cell_dir), "reused": reused,
            "seen_left_out": sum(int(seen.get(k) or 0) for k in ("same_image", "same_patient")),
            "internal_test_overlap": seen.get("internal_test_overlap"),
            "internal_only": not internal and status == "done" and only_internal_test(m)}


_OVERLAP_NOTE = re.compile(r"^(\d+) image\(s\) overlap the model's internal test set")


def only_internal_test(record: Mapping[str, Any]) -> bool:
    """Whether a cell's (or a cell folder's metrics.json's) remaining test images are all the row model's own
    internal test images: not an external test, whatever its column says. ``internal_only`` when recorded;
    for one written before that field, its internal test overlap (``internal_test_overlap``, in
    ``seen_by_model``, or its note) equals its image count."""
    if "internal_only" in record:
        return bool(record["internal_only"])
    n = record.get("n_images")
    if record.get("internal") or record.get("status", "done") != "done" or not n:
        return False
    overlap = record.get("internal_test_overlap", (record.get("seen_by_model") or {}).get("internal_test_overlap"))
    for note in [] if overlap is not None else record.get("notes") or []:
        m = _OVERLAP_NOTE.match(str(note))
        overlap = int(m.group(1)) if m else overlap
    return overlap is not None and int(overlap) == int(n)


def matrix_order(cells: Iterable[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """Rows (trained on) and columns (tested on) in first-seen order, trained-on names first."""
    cells = list(cells)
    rows = list(dict.fromkeys(c["trained_on"] for c in cells))
    cols = [r for r in rows if any(c["tested_on"] == r for c in cells)]
    cols += [t for t in dict.fromkeys(c["tested_on"] for c in cells) if t not in cols]
    return rows, cols


def cell_text(cell: Mapping[str, Any]) -> str:
    from readingrace.report.markdown import fmt_ci

    if cell.get("status") != "done":
        return f"n/a ({cell.get('status')})"
    text = fmt_ci(cell.get("macro_auc"), cell.get("macro_auc_ci"))
    return f"{text} (internal)" if cell.get("internal") else text


def matrix_cell_text(cell: Mapping[str, Any]) -> str:
    """:func:`cell_text`, "(internal test of ROW)" for an ``internal_only`` cell, and the test images: ", n = 90"."""
    text = cell_text(cell)
    if cell.get("status") != "done":
        return text
    if cell.get("internal_only"):
        text += f" (internal test of {cell['trained_on']})"
    return text + (f", n = {cell['n_images']}" if cell.get("n_images") is not None else "")


def matrix_table(cells: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows: trained on; columns: tested on; cells "AUC [lo, hi], n = N" (paper Table 4, with the test images);
    diagonal "(internal)", a cell holding only the row model's internal test images "(internal test of ROW)"."""
    cells = list(cells)
    rows, cols = matrix_order(cells)
    table = pd.DataFrame("", index=pd.Index(rows, name="trained on \\ tested on"), columns=cols, dtype=object)
    for c in cells:
        table.loc[c["trained_on"], c["tested_on"]] = matrix_cell_text(c)
    return table


def tidy_cells(cells: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per cell: macro AUC with its CI, per-class AUCs with CIs, images, patients, input mode."""
    rows = []
    for c in cells:
        lo, hi = (list(c.get("macro_auc_ci") or [None, None]) + [None, None])[:2]
        row = {"trained_on": c["trained_on"], "tested_on": c["tested_on"], "internal": c["internal"],
               "internal_only": bool(c.get("internal_only")), "status": c["status"], "macro_auc": c.get("macro_auc"),
               "ci_lo": lo, "ci_hi": hi}
        for cls, auc in (c.get("per_class_auc") or {}).items():
            clo, chi = (list((c.get("per_class_auc_ci") or {}).get(cls) or [None, None]) + [None, None])[:2]
            row.update({f"auc_{cls}": auc, f"auc_{cls}_ci_lo": clo, f"auc_{cls}_ci_hi": chi})
        row.update({"n_images": c.get("n_images"), "n_patients": c.get("n_patients"),
                    "input_mode": c.get("input_mode"), "notes": " | ".join(c.get("notes") or []),
                    "reason": c.get("reason", ""), "cell_dir": c.get("cell_dir")})
        rows.append(row)
    df = pd.DataFrame(rows)
    front = ["trained_on", "tested_on", "internal", "internal_only", "status", "macro_auc", "ci_lo", "ci_hi"]
    back = ["n_images", "n_patients", "input_mode", "notes", "reason", "cell_dir"]
    if df.empty:
        return pd.DataFrame(columns=front + back)
    return df[front + [c for c in df.columns if c not in front + back] + back]  # per-class columns as met


def write_matrix(cells: list[dict[str, Any]], out: str | Path, *, extra: Mapping[str, Any] | None = None
                 ) -> dict[str, Path]:
    """``matrix.csv`` (tidy), ``matrix.md``, ``matrix.png`` (heatmap) and ``external.json`` into ``out``."""
    from readingrace.report.figures import plot_external_matrix
    from readingrace.report.markdown import md_table

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "matrix.csv", "markdown": out / "matrix.md", "png": out / "matrix.png",
             "index": out / INDEX_FILE}
    write_atomic(files["csv"], tidy_cells(cells).to_csv(index=False))
    table = matrix_table(cells).reset_index()
    notes = [f"- {c['trained_on']} -> {c['tested_on']}: " + "; ".join(c["notes"] + ([c["reason"]] if c["reason"] else []))
             for c in cells if not c["internal"] and (c["notes"] or c["reason"])]
    text = ["# External validation: macro AUC [95% CI]", "",
            "Rows: trained on; columns: tested on; n: test images. The diagonal (internal) is each run's own test "
            "split; \"internal test of ROW\" marks a cell whose images are all that row model's internal test "
            "images.", "",
            md_table(table), ""] + (["Notes:", "", *notes, ""] if notes else [])
    write_atomic(files["markdown"], "\n".join(text))
    if not plot_external_matrix(cells, files["png"]):
        files.pop("png")
    index = {"schema": SCHEMA, "kind": "external", **(extra or {}), "cells": cells,
             "files": {k: p.name for k, p in files.items()}}
    write_json(files["index"], clean_nan(index))
    return files


def _check_name(name: str, option: str) -> str:
    if not _NAME.fullmatch(name) or "__" in name:
        raise ConfigError(f"{option} {name!r}: a name is letters, digits, '.', '_' or '-' (no '__'), e.g. nih")
    return name


def parse_named(items: Iterable[str], option: str) -> dict[str, str]:
    """``["nih=runs/nih"]`` -> ``{"nih": "runs/nih"}``; names checked, duplicates refused."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{option} {item!r}: write NAME=VALUE, e.g. {option} nih=runs/nih-sex")
        name, value = (s.strip() for s in item.split("=", 1))
        _check_name(name, option)
        if name in out:
            raise ConfigError(f"{option}: {name!r} is given twice")
        out[name] = value
    return out


def external_validation(runs: Mapping[str, str | Path], data: Mapping[str, ExperimentConfig] | None = None, *,
                        out: str | Path, mode: str | None = None,
                        data_roots: Mapping[str, str | Path] | None = None,
                        follow_model_target: Iterable[str] = (),
                        say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every ordered pair (trained on X in ``runs``, tested on Y in ``runs`` or ``data``).

    X == Y is the run's own internal test (read from its metrics.json, not recomputed). Otherwise the
    model of X predicts Y into ``out/<X>__on__<Y>/``: for a run, Y's images are that run's test split;
    for ``data``, all images of the config's cohort (``data_roots[Y]`` or its ``cohort.data_root``),
    built for each model's target when Y is in ``follow_model_target`` (its config names no target).
    X's own training and validation images and patients are left out of Y (:func:`exclude_seen`); a
    cell with nothing else is ``refused``. A cell that cannot be computed is recorded with its reason
    (``failed``); then :class:`RunError` is raised after the matrix files (``matrix.csv``,
    ``matrix.md``, ``matrix.png``, ``external.json``) are written.
    """
    data = dict(data or {})
    data_roots = dict(data_roots or {})
    follow_model_target = set(follow_model_target)
    check_mode(mode)
    if not runs:
        raise ConfigError("give at least one trained run (--run NAME=RUN_DIR)")
    for name in [*runs, *data]:
        _check_name(name, "--run" if name in runs else "--data")
    both = sorted(set(runs) & set(data))
    if both:
        raise ConfigError(f"{both}: given both as --run and --data; a run's own test split is its test cohort, "
                          "so name the --data cohort differently or drop it")
    stray = sorted(set(data_roots) - set(data))
    if stray:
        raise ConfigError(f"--data-root {stray}: no --data cohort of that name (runs carry their own image paths)")
    unknown = sorted(follow_model_target - set(data))
    if unknown:
        raise ConfigError(f"follow_model_target {unknown}: no --data cohort of that name")
    out = Path(out)
    trained = {name: finished_run(path) for name, path in runs.items()}  # fail early on an unfinished run
    cohorts: dict[str, ExternalCohort] = {name: cohort_from_run(path, name=name) for name, path in runs.items()}
    cohorts.update({name: cohort_from_config(cfg, name=name, data_root=data_roots.get(name),
                                             follow_model_target=name in follow_model_target)
                    for name, cfg in data.items()})
    cells: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for x, run_dir in runs.items():
        cfg_x, internal = trained[x]
        for y, cohort in cohorts.items():
            if x == y:
                cells.append(cell_record(internal, trained_on=x, tested_on=y, internal=True, input_mode=cfg_x.image.mode,
                                         cell_dir=os.path.relpath(Path(run_dir).resolve(), out.resolve())))
                continue
            folder = f"{x}__on__{y}"
            say(f"{x} -> {y}")
            try:
                m = predict_run(run_dir, cohort, out=out / folder, mode=mode, trained_on=x, say=lambda s: say(f"  {s}"))
                cells.append(cell_record(m, trained_on=x, tested_on=y, cell_dir=folder, input_mode=m["input_mode"],
                                         reused=m["reused"]))
            except LeakageError as exc:  # nothing unseen to test on: refused, not a failure
                say(f"  refused: {exc}")
                cells.append(cell_record(None, trained_on=x, tested_on=y, cell_dir=folder, status="refused",
                                         reason=str(exc), input_mode=mode or cfg_x.image.mode))
            except ReadingRaceError as exc:
                say(f"  failed: {exc}")
                cells.append(cell_record(None, trained_on=x, tested_on=y, cell_dir=folder, status="failed",
                                         reason=str(exc), input_mode=mode or cfg_x.image.mode))
    extra = {"input_mode": mode or "each run's own image.mode", "seconds": round(time.perf_counter() - t0, 1),
             "runs": {n: os.path.relpath(Path(p).resolve(), out.resolve()) for n, p in runs.items()},
             "cohorts": {n: c.description for n, c in cohorts.items()}}
    files = write_matrix(cells, out, extra=extra)
    failed = [c for c in cells if c["status"] not in ("done", "refused")]
    if failed:
        raise RunError(f"{len(failed)} of {len(cells)} cell(s) failed ("
                       + "; ".join(f"{c['trained_on']} -> {c['tested_on']}: {c['reason']}" for c in failed)
                       + f"); the matrix in {out} marks them n/a")
    return {**extra, "cells": cells, "files": files}


def external_matrix(results: dict[tuple[str, str], dict[str, Any]]) -> pd.DataFrame:
    """Rows: trained on; columns: tested on; cells: macro AUC [CI] (paper Table 4)."""
    from readingrace.report.markdown import fmt_ci

    rows = sorted({a for a, _ in results})
    cols = sorted({b for _, b in results})
    table = pd.DataFrame(index=rows, columns=cols, dtype=object)
    for (a, b), m in results.items():
        table.loc[a, b] = fmt_ci(m.get("macro_auc"), m.get("macro_auc_ci"))
    return table.fillna("")

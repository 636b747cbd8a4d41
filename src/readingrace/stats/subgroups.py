"""Subgroup performance of a disease model: AUC, TPR, FPR and underdiagnosis per group, with CIs.

The harm the paper warns about: a disease classifier that encodes race may underdiagnose some
groups (Seyyed-Kalantari et al. 2021). For any multi-label disease model's predictions this module
reports, per group of one or more attributes (sex, age_group, race, any cohort column, or an
intersection such as ``sex+age_group``), in the spirit of fairlearn's ``MetricFrame``:

* ``prevalence``: positives / certain labels of the finding;
* ``auc``: ROC-AUC of the finding's probability (certain labels only: 1 vs 0);
* ``tpr`` / ``fpr``: true / false positive rate with ``prob >= threshold`` called positive;
* ``underdiagnosis_rate``: among images with at least one finding, the fraction predicted
  "no finding". With a ``No Finding`` column: images whose No Finding label is 0, predicted no
  finding when P(No Finding) >= the No Finding threshold (= that label's FPR). Without one: images
  with any finding label 1, predicted no finding when every finding's probability is below its own
  threshold. :attr:`SubgroupResult.underdiagnosis` says which definition was used.

**Predictions table** (one row per image): ``image_id``, ``patient_id`` (without it every image is
its own patient, with a note), the group columns, and per finding ``F`` a true label column
``label_F`` (1 present, 0 absent, -1 uncertain, blank unknown; uncertain and blank images are left
out of that finding's metrics) and a probability column ``prob_F`` in [0, 1]. A single-target
predictions file (``label`` holding the class name, ``prob_<class>``, as ``readingrace run``
writes) works too: the truth of finding ``F`` is then ``label == F`` (one-vs-rest).

**Threshold**: one operating point per finding, the *same for every group* (a group-specific
threshold would hide the very differences this measures): a number (or a mapping finding ->
number), or chosen on a validation predictions table over all its patients by Youden's J
(default) or the best F1. Test data never chooses a threshold.

**Intervals**: patient-clustered stratified percentile bootstrap (the engine of
:mod:`readingrace.stats.intervals`): patients are drawn with replacement within strata (the
patient's group crossed with the label of their first image), and every metric of every group and
every between-group difference is computed on the same replicate, so a difference's interval
accounts for the correlation between groups. An attribute that may change between a patient's
images (age_group, view, ...: :data:`PER_IMAGE_ATTRIBUTES`) may put one patient in two groups:
each image counts in its own group, and a resampled patient brings all of their images, into
whichever groups they fall. Any other attribute must be constant within a patient
(:class:`CohortError` otherwise).

A metric that cannot be computed (no positives or no negatives in a group, no threshold) is NaN
with its reason in the ``reason`` column, never a crash or a silent number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from sklearn.metrics import precision_recall_curve

from readingrace.cohort.build import PER_IMAGE_TARGETS
from readingrace.errors import CohortError, ConfigError
from readingrace.stats.intervals import (
    DEFAULT_LEVEL,
    DEFAULT_N_BOOTSTRAP,
    DEFAULT_SEED,
    WeightedAUC,
    bootstrap_replicates,
    check_options,
    cluster_codes,
    percentile_ci,
)
from readingrace.stats.metrics import CI_METHOD, _as_str, _missing, youden_threshold

SCHEMA = "readingrace.subgroups/1"
LABEL_PREFIX = "label_"
PROB_PREFIX = "prob_"
NO_FINDING = "No Finding"
THRESHOLD_RULES: tuple[str, ...] = ("youden", "f1")
#: Attributes that may differ between the images of one patient (a patient may be in two groups).
PER_IMAGE_ATTRIBUTES: frozenset[str] = frozenset(PER_IMAGE_TARGETS | {"study_id"})
#: The group of every image with a value for the attribute (a row in ``by_group``, never a reference).
ALL = "(all)"
#: Metrics reported per finding (the underdiagnosis rate is reported once per group).
METRICS: tuple[str, ...] = ("prevalence", "auc", "tpr", "fpr")
UNDERDIAGNOSIS = "underdiagnosis_rate"
#: Metrics whose between-group differences are reported.
DIFFERENCE_METRICS: tuple[str, ...] = ("auc", "tpr", "fpr", UNDERDIAGNOSIS)
#: Below this many images in a metric's denominator a note says the interval is unreliable.
SMALL_DENOMINATOR = 10
UNDERDIAGNOSIS_NO_FINDING = (
    "among images whose '{nf}' label is 0 (at least one finding), the fraction with predicted "
    "P({nf}) >= its threshold {t}"
)
UNDERDIAGNOSIS_ALL_BELOW = (
    "no '{nf}' column: among images with at least one positive finding label ({findings}), the "
    "fraction whose every finding probability is below that finding's threshold"
)

__all__ = [
    "ALL", "LABEL_PREFIX", "NO_FINDING", "PER_IMAGE_ATTRIBUTES", "PROB_PREFIX", "SCHEMA", "THRESHOLD_RULES",
    "SubgroupResult", "choose_threshold", "plot_subgroups", "read_predictions_table", "subgroup_performance",
    "subgroups_markdown", "write_subgroups",
]


# --------------------------------------------------------------------------------------------
# the result
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SubgroupResult:
    """Subgroup metrics as tidy tables.

    ``by_group``: one row per (attribute, group, finding, metric): ``estimate``, ``ci_low``,
    ``ci_high``, the group's ``n_images`` and ``n_patients``, ``n_denominator`` (the images the
    metric is computed over), the finding's ``n_positive`` / ``n_negative`` in the group, the
    ``threshold``, ``n_degenerate`` (replicates that could not compute it) and ``reason`` (why it
    is NaN; empty when computed). Group :data:`ALL` is every image with a value for the attribute.

    ``differences``: one row per (attribute, finding, metric, group, reference): ``estimate_group``,
    ``estimate_reference``, ``difference`` (group - reference) with ``ci_low`` / ``ci_high``, and
    ``n_informative_group`` / ``n_informative_reference``: the images that carry each value (positives
    for TPR, negatives for FPR, images with a finding for underdiagnosis, the smaller class for AUC).
    """

    by_group: pd.DataFrame
    differences: pd.DataFrame
    thresholds: dict[str, float]
    threshold_source: str
    underdiagnosis: str
    references: dict[str, str]
    findings: tuple[str, ...]
    attributes: tuple[str, ...]
    n_images: int
    n_patients: int
    ci: dict[str, Any]
    notes: tuple[str, ...] = ()
    validation: dict[str, Any] = field(default_factory=dict)

    def metric(self, metric: str, *, finding: str | None = None, attribute: str | None = None) -> pd.DataFrame:
        """Rows of ``by_group`` for one metric (optionally one finding / attribute)."""
        df = self.by_group[self.by_group["metric"] == metric]
        if finding is not None:
            df = df[df["finding"] == finding]
        if attribute is not None:
            df = df[df["attribute"] == attribute]
        return df.reset_index(drop=True)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (NaN -> None): settings, thresholds, both tables as records."""
        from readingrace.stats.metrics import to_json_dict

        return to_json_dict({
            "schema": SCHEMA, "findings": list(self.findings), "attributes": list(self.attributes),
            "n_images": self.n_images, "n_patients": self.n_patients,
            "thresholds": self.thresholds, "threshold_source": self.threshold_source,
            "same_threshold_for_every_group": True, "underdiagnosis": self.underdiagnosis,
            "references": self.references, "ci": self.ci, "validation": self.validation,
            "by_group": self.by_group.to_dict("records"), "differences": self.differences.to_dict("records"),
            "notes": list(self.notes),
        })


# --------------------------------------------------------------------------------------------
# input
# --------------------------------------------------------------------------------------------
@dataclass
class _Table:
    frame: pd.DataFrame                 # the input with image_id / patient_id as strings
    truth: dict[str, NDArray[np.float64]]  # finding -> 1 / 0 / NaN (uncertain or blank)
    prob: dict[str, NDArray[np.float64]]
    clustered: bool
    notes: list[str]
    source: str


def read_predictions_table(path: str | Path) -> pd.DataFrame:
    """A predictions CSV (optionally gzipped) or Parquet file, or a run folder's predictions.csv.

    Cells are read as text (ids keep leading zeros; a bad value is reported with its line).
    """
    from readingrace.evaluate import resolve_predictions

    p = resolve_predictions(path)
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(p)
        return pd.read_csv(p, dtype=str, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        raise CohortError(f"{p}: the file is empty; expected a header row and one row per image") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as e:
        raise CohortError(f"{p}: cannot be read as a predictions table ({e})") from None


def _available_findings(df: pd.DataFrame) -> list[str]:
    probs = {c[len(PROB_PREFIX):] for c in df.columns if c.startswith(PROB_PREFIX)}
    labels = {c[len(LABEL_PREFIX):] for c in df.columns if c.startswith(LABEL_PREFIX)}
    if "label" in df.columns and not labels:
        return sorted(probs)
    return sorted(probs & labels)


def _shown(value: Any) -> str:
    return repr(value.item() if isinstance(value, np.generic) else value)


def _where(source: str, i: int, image_id: Any) -> str:
    return f"{source}, row {i + 1} (image_id {image_id!r})"


def _label_values(raw: pd.Series, column: str, ids: pd.Series, source: str) -> NDArray[np.float64]:
    """1 / 0 from the column; -1 (uncertain) and blank -> NaN; anything else raises CohortError."""
    obj = raw.astype(object)
    text = obj.map(lambda v: str(v).strip().lower() if isinstance(v, str) else v)
    text = text.map(lambda v: {"true": 1.0, "false": 0.0}.get(v, v) if isinstance(v, str) else v)
    text = text.map(lambda v: float(v) if isinstance(v, (bool, np.bool_)) else v)
    num = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    blank = _missing(raw)
    bad = (~blank & np.isnan(num)) | (~np.isnan(num) & ~np.isin(num, [1.0, 0.0, -1.0]))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CohortError(f"{_where(source, i, ids.iloc[i])}, column {column!r}: value {_shown(raw.iloc[i])} is not "
                          f"1, 0, -1 (uncertain) or blank ({int(bad.sum())} such row(s))")
    return np.where(num == -1.0, np.nan, num)


def _prob_values(raw: pd.Series, column: str, ids: pd.Series, source: str) -> NDArray[np.float64]:
    num = pd.to_numeric(raw.astype(object), errors="coerce").to_numpy(dtype=np.float64)
    blank = _missing(raw)
    checks = ((~blank & np.isnan(num), "is not a number"),
              (blank, "is missing; predictions must be complete"),
              ((num < 0) | (num > 1), "is outside [0, 1]; give probabilities (sigmoid outputs), not logits"))
    for bad, what in checks:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise CohortError(f"{_where(source, i, ids.iloc[i])}, column {column!r}: value {_shown(raw.iloc[i])} "
                              f"{what} ({int(bad.sum())} such row(s))")
    return num


def _prepare(df: pd.DataFrame, findings: Sequence[str], source: str) -> _Table:
    if not isinstance(df, pd.DataFrame):
        raise CohortError(f"{source}: expected a pandas DataFrame of predictions, got {type(df).__name__}")
    if len(df) == 0:
        raise CohortError(f"{source}: the predictions table has no rows")
    df = df.reset_index(drop=True).copy()
    df.columns = [str(c).strip() for c in df.columns]
    notes: list[str] = []
    if "image_id" not in df.columns:
        raise CohortError(f"{source}: missing column 'image_id' (columns: {list(df.columns)[:12]}); a predictions "
                          "table needs image_id, patient_id, the group columns and label_<finding> / prob_<finding>")
    ids = _as_str(df["image_id"])
    if ids.isna().any():
        i = int(np.flatnonzero(ids.isna().to_numpy())[0])
        raise CohortError(f"{source}, row {i + 1}: image_id is missing ({int(ids.isna().sum())} row(s))")
    dup = ids.duplicated(keep=False)
    if dup.any():
        raise CohortError(f"{source}: image_id {ids[dup].iloc[0]!r} appears {int((ids == ids[dup].iloc[0]).sum())} "
                          f"times ({int(dup.sum())} rows share an id); each image must appear once")
    df["image_id"] = ids
    clustered = "patient_id" in df.columns
    if clustered:
        pid = _as_str(df["patient_id"])
        if pid.isna().any():
            i = int(np.flatnonzero(pid.isna().to_numpy())[0])
            raise CohortError(f"{_where(source, i, ids.iloc[i])}, column 'patient_id': value is missing "
                              f"({int(pid.isna().sum())} row(s)); every image needs its patient's id (the "
                              "bootstrap resamples patients)")
        df["patient_id"] = pid
    else:
        df["patient_id"] = "image:" + ids
        notes.append(f"{source}: no patient_id column: every image is treated as its own patient, so the CIs "
                     "ignore patient clustering (too narrow when patients have several images)")
    available = _available_findings(df)
    truth: dict[str, NDArray[np.float64]] = {}
    prob: dict[str, NDArray[np.float64]] = {}
    for f in findings:
        pc, lc = PROB_PREFIX + f, LABEL_PREFIX + f
        if pc not in df.columns or (lc not in df.columns and "label" not in df.columns):
            lacking = [c for c in (lc, pc) if c not in df.columns]
            raise CohortError(f"{source}: finding {f!r} needs columns {lc!r} (true label 1/0/-1/blank) and {pc!r} "
                              f"(probability); missing {lacking}. Findings with both columns: {available or 'none'}")
        if lc in df.columns:
            truth[f] = _label_values(df[lc], lc, ids, source)
        else:
            lab = _as_str(df["label"])
            truth[f] = np.where(lab.isna(), np.nan, (lab == f).astype(np.float64))
            notes.append(f"{source}: finding {f!r}: no {lc!r} column; truth is 'label == {f}' (one-vs-rest on the "
                         "single 'label' column)")
        prob[f] = _prob_values(df[pc], pc, ids, source)
    return _Table(df, truth, prob, clustered, notes, source)


def _attribute_values(t: _Table, spec: str | Sequence[str], per_image: frozenset[str]) -> tuple[str, pd.Series]:
    """(attribute name, value per image as str or None) for a column or an intersection of columns."""
    if isinstance(spec, str):
        cols = [spec] if spec in t.frame.columns or "+" not in spec else [c.strip() for c in spec.split("+")]
    else:
        cols = [str(c) for c in spec]
    if not cols or any(not c for c in cols):
        raise ConfigError(f"group {spec!r}: name a column, or columns joined by '+' for an intersection")
    name = "+".join(cols)
    reserved = ("image_id", "patient_id")
    for c in cols:
        if c not in t.frame.columns or c in reserved or c.startswith((PROB_PREFIX, LABEL_PREFIX)):
            not_groups = {*reserved, "study_id", "label", "split", "path", "cache_index"}
            avail = [x for x in t.frame.columns if x not in not_groups and not x.startswith((PROB_PREFIX, LABEL_PREFIX))]
            raise CohortError(f"{t.source}: group column {c!r} not found; group columns available: {avail}")
    parts = [_as_str(t.frame[c]) for c in cols]
    values = parts[0].copy()
    for p in parts[1:]:
        values = pd.Series([None if a is None or b is None else f"{a} & {b}" for a, b in zip(values, p)],
                           dtype=object)
    if values.isna().all():
        raise CohortError(f"{t.source}: group column {name!r} has no values (every image is blank); it cannot "
                          "be reported: drop it from the groups")
    if not any(c in per_image for c in cols):
        n_values = pd.Series(values.to_numpy(), index=t.frame["patient_id"].to_numpy()).groupby(level=0).nunique()
        bad = n_values[n_values > 1]
        if len(bad):
            rows = t.frame.index[t.frame["patient_id"] == bad.index[0]][:2]
            shown = [t.frame["image_id"].iloc[r] for r in rows]
            raise CohortError(
                f"{t.source}: {len(bad)} patient(s) have images in more than one {name!r} group (e.g. images "
                f"{shown} of one patient); {name} is a per-patient attribute: correct the data, or pass it as a "
                f"per-image attribute (per_image=[..., {name!r}]) if it may change between images")
    return name, values


# --------------------------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------------------------
def f1_threshold(positive: NDArray[np.bool_], score: NDArray[np.float64]) -> float:
    """Threshold maximising F1 (``score >= t`` positive); ties: the highest threshold. NaN if a class is empty."""
    pos = np.asarray(positive, dtype=bool)
    if pos.all() or not pos.any():
        return math.nan
    precision, recall, thr = precision_recall_curve(pos, np.asarray(score, dtype=np.float64))
    p, r = precision[:-1], recall[:-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    best = np.flatnonzero(f1 == f1.max())
    return float(thr[best].max())


def choose_threshold(positive: NDArray[np.bool_], score: NDArray[np.float64], *, rule: str = "youden") -> float:
    """The operating threshold by ``rule``: ``youden`` (max sensitivity + specificity - 1) or ``f1``."""
    if rule == "youden":
        return youden_threshold(positive, score)
    if rule == "f1":
        return f1_threshold(positive, score)
    raise ConfigError(f"threshold rule {rule!r} is not one of {list(THRESHOLD_RULES)}")


def _check_threshold(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{what} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _thresholds(
    needed: Sequence[str], threshold: float | Mapping[str, float] | None, val: _Table | None, rule: str,
    test: _Table,
) -> tuple[dict[str, float], str, dict[str, Any], list[str]]:
    notes: list[str] = []
    info: dict[str, Any] = {}
    if (threshold is None) == (val is None):
        raise ConfigError("give exactly one of threshold (a number in [0, 1], or finding -> number) and "
                          "val_predictions (a validation predictions table to choose it on)")
    if val is None:
        if isinstance(threshold, Mapping):
            lacking = [f for f in needed if f not in threshold]
            if lacking:
                raise ConfigError(f"threshold mapping lacks finding(s) {lacking}; give a number for each of "
                                  f"{list(needed)}")
            out = {f: _check_threshold(threshold[f], f"threshold for {f!r}") for f in needed}
            return out, "fixed per finding (given)", info, notes
        t = _check_threshold(threshold, "threshold")
        return {f: t for f in needed}, f"fixed at {t:g} for every finding (given)", info, notes
    if rule not in THRESHOLD_RULES:
        raise ConfigError(f"threshold rule {rule!r} is not one of {list(THRESHOLD_RULES)}")
    out = {}
    for f in needed:
        y = val.truth[f]
        ok = ~np.isnan(y)
        out[f] = choose_threshold(y[ok] == 1, val.prob[f][ok], rule=rule)
        if not math.isfinite(out[f]):
            notes.append(f"validation predictions: finding {f!r} lacks positives or negatives, so no threshold was "
                         "chosen for it; its TPR, FPR (and an underdiagnosis rate that needs it) are NaN")
    overlap = set(val.frame["patient_id"]) & set(test.frame["patient_id"])
    if overlap and val.clustered and test.clustered:
        notes.append(f"{len(overlap)} patient(s) appear in both the validation and the test predictions: the "
                     "threshold was chosen partly on test patients")
    info = {"n_images": len(val.frame), "n_patients": int(val.frame["patient_id"].nunique()), "rule": rule}
    label = "Youden's J" if rule == "youden" else "best F1"
    return out, (f"{label} per finding on the validation predictions ({info['n_images']} images, "
                 f"{info['n_patients']} patients, all groups together)"), info, notes


# --------------------------------------------------------------------------------------------
# the bootstrap block of one (attribute, finding)
# --------------------------------------------------------------------------------------------
@dataclass
class _Ratio:
    numerator: NDArray[np.bool_]
    denominator: NDArray[np.bool_]


def _block(
    *, aucs: list[WeightedAUC | None], ratios: list[_Ratio], codes: NDArray[np.intp], n_pat: int,
    strata: NDArray[Any], n_bootstrap: int, seed: int,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Point values and bootstrap replicates (B, len(aucs) + len(ratios)) on the same patient draws."""
    if ratios:
        counts = np.column_stack(
            [np.bincount(codes, weights=r.numerator.astype(float), minlength=n_pat) for r in ratios]
            + [np.bincount(codes, weights=r.denominator.astype(float), minlength=n_pat) for r in ratios])
    else:
        counts = np.zeros((n_pat, 0))
    k = len(ratios)

    def statistic(m: NDArray[np.float64]) -> NDArray[np.float64]:
        cols = [s(m) if s is not None else np.full(m.shape[0], np.nan) for s in aucs]
        c = m @ counts
        with np.errstate(invalid="ignore", divide="ignore"):
            rates = np.where(c[:, k:] > 0, c[:, :k] / c[:, k:], np.nan)
        return np.column_stack(cols + [rates]) if cols else rates

    point = statistic(np.ones((1, n_pat)))[0]
    reps = (bootstrap_replicates(statistic, strata, n_bootstrap=n_bootstrap, seed=seed)
            if n_bootstrap > 0 else np.empty((0, point.size)))
    return point, reps


def _strata(first: NDArray[np.intp], group: NDArray[np.intp], status: NDArray[np.float64]) -> NDArray[Any]:
    """Per patient: their first image's group and label (or disease status) as one stratum key."""
    g = group[first]
    s = status[first]
    return np.array([f"{a}|{'nan' if np.isnan(b) else int(b)}" for a, b in zip(g, s)], dtype=object)


# --------------------------------------------------------------------------------------------
# per attribute: groups, metric blocks and their differences
# --------------------------------------------------------------------------------------------
@dataclass
class _Attribute:
    """One attribute's groups: ``members`` pairs each group (then :data:`ALL`) with its image mask."""

    name: str
    levels: list[str]
    members: list[tuple[str, NDArray[np.bool_]]]
    gcode: NDArray[np.intp]
    reference: str
    sizes: dict[str, tuple[int, int]]


def _attribute(t: _Table, spec: str | Sequence[str], per_image: frozenset[str], codes: NDArray[np.intp],
               reference: str | Mapping[str, str] | None, notes: list[str]) -> _Attribute:
    name, values = _attribute_values(t, spec, per_image)
    has = values.notna().to_numpy()
    if not has.all():
        notes.append(f"attribute {name}: {int((~has).sum())} image(s) without a value are left out of its groups")
    levels = sorted(values[has].unique().tolist())
    gcode = np.full(len(values), -1, dtype=np.intp)
    gcode[has] = pd.Categorical(values[has], categories=levels).codes
    members = [(g, gcode == k) for k, g in enumerate(levels)] + [(ALL, has)]
    sizes = {g: (int(mask.sum()), len(np.unique(codes[mask]))) for g, mask in members}
    if len(levels) < 2:
        notes.append(f"attribute {name}: only one group ({levels[0]!r}); no differences to report")
    return _Attribute(name, levels, members, gcode, _reference(name, levels, sizes, reference), sizes)


@dataclass
class _Collector:
    """Collects ``by_group`` rows and ``differences`` rows from blocks of bootstrap replicates."""

    level: float
    all_pairs: bool
    rows: list[dict[str, Any]] = field(default_factory=list)
    diffs: list[dict[str, Any]] = field(default_factory=list)

    def add(self, att: _Attribute, finding: str, metric: str, point: NDArray[np.float64],
            reps: NDArray[np.float64], offset: int, denominators: list[int], counts: list[dict[str, int]],
            reasons: list[str], threshold: float) -> None:
        """Rows for columns ``offset ..`` (one per member of ``att``), and differences for DIFFERENCE_METRICS."""
        col = {g: offset + j for j, (g, _m) in enumerate(att.members)}
        why = {g: reasons[j] for j, (g, _m) in enumerate(att.members)}
        # images that carry the value: the smaller class for AUC, the denominator otherwise
        carried = {g: (min(counts[j]["n_positive"], counts[j]["n_negative"]) if metric == "auc" else denominators[j])
                   for j, (g, _m) in enumerate(att.members)}
        for j, (g, _mask) in enumerate(att.members):
            est = float(point[col[g]])
            ci, n_bad = percentile_ci(reps[:, col[g]], level=self.level) if reps.size else ((math.nan, math.nan), 0)
            self.rows.append({
                "attribute": att.name, "group": g, "finding": finding, "metric": metric, "estimate": est,
                "ci_low": ci[0], "ci_high": ci[1], "n_images": att.sizes[g][0], "n_patients": att.sizes[g][1],
                "n_denominator": denominators[j], **counts[j], "threshold": threshold,
                "n_degenerate": n_bad if math.isfinite(est) else 0, "reason": "" if math.isfinite(est) else why[g]})
        if metric not in DIFFERENCE_METRICS:
            return
        lv = att.levels
        pairs = ([(a, b) for i, a in enumerate(lv) for b in lv[i + 1:]] if self.all_pairs
                 else [(g, att.reference) for g in lv if g != att.reference])
        for a, b in pairs:
            pa, pb = float(point[col[a]]), float(point[col[b]])
            d = pa - pb
            ci, n_bad = (percentile_ci(reps[:, col[a]] - reps[:, col[b]], level=self.level) if reps.size
                         else ((math.nan, math.nan), 0))
            reason = "" if math.isfinite(d) else "; ".join(
                f"{g}: {why[g]}" for g, v in ((a, pa), (b, pb)) if not math.isfinite(v))
            self.diffs.append({
                "attribute": att.name, "finding": finding, "metric": metric, "group": a, "reference": b,
                "estimate_group": pa, "estimate_reference": pb, "difference": d, "ci_low": ci[0], "ci_high": ci[1],
                "n_informative_group": carried[a], "n_informative_reference": carried[b],
                "n_degenerate": n_bad if math.isfinite(d) else 0, "reason": reason})


def _finding_block(out: _Collector, att: _Attribute, finding: str, truth: NDArray[np.float64],
                   prob: NDArray[np.float64], thr: float, *, codes: NDArray[np.intp], n_pat: int,
                   first: NDArray[np.intp], n_bootstrap: int, seed: int) -> None:
    """AUC, prevalence, TPR and FPR of one finding for every group of ``att``, one set of replicates."""
    certain = ~np.isnan(truth)
    pos, neg = certain & (truth == 1), certain & (truth == 0)
    has_thr = math.isfinite(thr)
    called = prob >= thr if has_thr else np.zeros(len(prob), dtype=bool)
    masks = [m for _g, m in att.members]
    npos = [int((pos & m).sum()) for m in masks]
    nneg = [int((neg & m).sum()) for m in masks]
    aucs = [WeightedAUC(truth[certain & m] == 1, prob[certain & m], codes[certain & m], n_pat) if p and q else None
            for m, p, q in zip(masks, npos, nneg)]
    ratios = ([_Ratio(pos & m, certain & m) for m in masks] + [_Ratio(pos & called & m, pos & m) for m in masks]
              + [_Ratio(neg & called & m, neg & m) for m in masks])
    point, reps = _block(aucs=aucs, ratios=ratios, codes=codes, n_pat=n_pat,
                         strata=_strata(first, att.gcode, truth), n_bootstrap=n_bootstrap, seed=seed)
    k = len(masks)
    if not has_thr:  # TPR and FPR need a threshold
        point[2 * k:] = np.nan
        reps[:, 2 * k:] = np.nan
    no_thr = f"no threshold for {finding} (the validation predictions lack positives or negatives of it)"
    no_pos = f"no positive images of {finding} in this group"
    no_neg = f"no negative images of {finding} in this group"
    counts = [{"n_positive": p, "n_negative": q} for p, q in zip(npos, nneg)]
    certain_n = [p + q for p, q in zip(npos, nneg)]
    out.add(att, finding, "auc", point, reps, 0, certain_n, counts,
            [no_pos if not p else no_neg for p in npos], math.nan)
    out.add(att, finding, "prevalence", point, reps, k, certain_n, counts,
            [f"no image with a certain {finding} label in this group"] * k, math.nan)
    out.add(att, finding, "tpr", point, reps, 2 * k, npos, counts, [no_pos if has_thr else no_thr] * k, thr)
    out.add(att, finding, "fpr", point, reps, 3 * k, nneg, counts, [no_neg if has_thr else no_thr] * k, thr)


def _underdiagnosis_block(out: _Collector, att: _Attribute, finding: str, diseased: NDArray[np.float64],
                          called_nf: NDArray[np.bool_], thr: float, ok: bool, *, codes: NDArray[np.intp],
                          n_pat: int, first: NDArray[np.intp], n_bootstrap: int, seed: int) -> None:
    """Underdiagnosis rate per group: predicted 'no finding' among images with at least one finding."""
    known = ~np.isnan(diseased)
    sick = known & (diseased == 1)
    masks = [m for _g, m in att.members]
    point, reps = _block(aucs=[], ratios=[_Ratio(sick & called_nf & m, sick & m) for m in masks], codes=codes,
                         n_pat=n_pat, strata=_strata(first, att.gcode, diseased), n_bootstrap=n_bootstrap, seed=seed)
    if not ok:
        point[:] = np.nan
        reps[:] = np.nan
    why = ("no image with at least one finding in this group" if ok else
           "no threshold for the no-finding decision (the validation predictions lack positives or negatives of a "
           "label it needs)")
    counts = [{"n_positive": int((sick & m).sum()), "n_negative": int((known & ~sick & m).sum())} for m in masks]
    out.add(att, finding, UNDERDIAGNOSIS, point, reps, 0, [c["n_positive"] for c in counts], counts,
            [why] * len(masks), thr)


# --------------------------------------------------------------------------------------------
# main entry
# --------------------------------------------------------------------------------------------
def subgroup_performance(
    predictions: pd.DataFrame,
    *,
    findings: str | Sequence[str] | None,
    groups: str | Sequence[str | Sequence[str]],
    threshold: float | Mapping[str, float] | None = None,
    val_predictions: pd.DataFrame | None = None,
    threshold_rule: str = "youden",
    no_finding: str | None = NO_FINDING,
    underdiagnosis: bool = True,
    reference: str | Mapping[str, str] | None = None,
    all_pairs: bool = False,
    per_image: Iterable[str] = PER_IMAGE_ATTRIBUTES,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = DEFAULT_SEED,
    level: float = DEFAULT_LEVEL,
    source: str = "predictions",
    val_source: str = "validation predictions",
) -> SubgroupResult:
    """Per-group prevalence, AUC, TPR, FPR and underdiagnosis rate with patient-bootstrap CIs, and differences.

    ``findings``: finding name(s) (``None``: every finding with both ``label_F`` and ``prob_F``).
    ``groups``: column name(s); a tuple of columns or ``"a+b"`` is their intersection.
    ``threshold`` (number in [0, 1], or finding -> number) or ``val_predictions`` (same column
    convention; the threshold of each finding chosen there by ``threshold_rule``, ``youden`` or
    ``f1``): exactly one. The same threshold applies to every group. ``no_finding``: the name of the
    "no finding" label used for the underdiagnosis rate (its columns need not be among
    ``findings``); when its columns are absent (or ``None``), predicted "no finding" means every
    finding below its threshold. ``reference``: the reference group (one value for every attribute,
    or attribute -> value; default the group with most images). ``all_pairs``: also every pair of
    groups. ``per_image``: attributes that may differ between a patient's images.
    """
    check_options(level=level, n_bootstrap=n_bootstrap)
    if not isinstance(predictions, pd.DataFrame):
        raise CohortError(f"{source}: expected a pandas DataFrame of predictions, got {type(predictions).__name__} "
                          "(read a file with read_predictions_table)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if threshold_rule not in THRESHOLD_RULES:
        raise ConfigError(f"threshold rule {threshold_rule!r} is not one of {list(THRESHOLD_RULES)}")
    if len(predictions):
        cols = [str(c).strip() for c in predictions.columns]
        if findings is None:
            findings = _available_findings(pd.DataFrame(columns=cols))
            if not findings:
                raise CohortError(f"{source}: no finding has both a label_<finding> and a prob_<finding> column "
                                  f"(columns: {cols[:12]})")
    if isinstance(findings, str):
        findings = [findings]
    findings = list(dict.fromkeys(str(f) for f in (findings or [])))
    if not findings:
        raise ConfigError("name at least one finding (e.g. findings=['Effusion'])")
    if isinstance(groups, str):
        groups = [groups]
    groups = list(groups)
    if not groups:
        raise ConfigError("name at least one group column (e.g. groups=['sex'])")

    # which columns the underdiagnosis rate needs
    probe_cols = {str(c).strip() for c in predictions.columns}
    nf_mode = bool(underdiagnosis and no_finding and PROB_PREFIX + no_finding in probe_cols
                   and LABEL_PREFIX + no_finding in probe_cols)
    needed = findings + ([no_finding] if nf_mode and no_finding not in findings else [])
    test = _prepare(predictions, needed, source)
    val = _prepare(val_predictions, needed, val_source) if val_predictions is not None else None
    notes = list(test.notes) + (list(val.notes) if val else [])
    thresholds, threshold_source, val_info, n1 = _thresholds(needed, threshold, val, threshold_rule, test)
    notes += n1

    per_image = frozenset(per_image)
    n = len(test.frame)
    codes, n_pat, first = cluster_codes(test.frame["patient_id"].to_numpy(dtype=object), n)

    # underdiagnosis indicators (per image): diseased (1 / 0, NaN when unknown) and predicted no finding
    ud_def, ud_finding, ud_ok, thr_ud = "not computed", "", False, math.nan
    diseased = np.full(n, np.nan)
    called_nf = np.zeros(n, dtype=bool)
    if underdiagnosis and nf_mode:
        y = test.truth[no_finding]
        diseased = np.where(np.isnan(y), np.nan, (y == 0).astype(float))
        thr_ud = thresholds[no_finding]
        ud_ok = math.isfinite(thr_ud)
        called_nf = test.prob[no_finding] >= thr_ud if ud_ok else called_nf
        ud_def = UNDERDIAGNOSIS_NO_FINDING.format(nf=no_finding, t=f"{thr_ud:.4g}" if ud_ok else "NaN")
        ud_finding = no_finding
    elif underdiagnosis:
        fs = [f for f in findings if f != no_finding]
        if not fs:
            underdiagnosis = False
            notes.append(f"underdiagnosis rate not computed: no '{no_finding}' columns and no other finding to "
                         "define 'at least one finding'")
        else:
            lab = np.column_stack([test.truth[f] for f in fs])
            diseased = np.where((lab == 1).any(axis=1), 1.0, np.where((lab == 0).all(axis=1), 0.0, np.nan))
            ud_ok = all(math.isfinite(thresholds[f]) for f in fs)
            called_nf = np.column_stack([test.prob[f] < thresholds[f] for f in fs]).all(axis=1)
            ud_def = UNDERDIAGNOSIS_ALL_BELOW.format(nf=no_finding or NO_FINDING, findings=", ".join(fs))
            ud_finding = "any finding"
            notes.append(f"underdiagnosis rate: {ud_def}")

    out = _Collector(level=level, all_pairs=all_pairs)
    boot = {"codes": codes, "n_pat": n_pat, "first": first, "n_bootstrap": n_bootstrap, "seed": seed}
    attributes: list[_Attribute] = []
    for spec in groups:
        att = _attribute(test, spec, per_image, codes, reference, notes)
        if any(a.name == att.name for a in attributes):
            continue
        attributes.append(att)
        for f in findings:
            _finding_block(out, att, f, test.truth[f], test.prob[f], thresholds[f], **boot)
        if underdiagnosis:
            _underdiagnosis_block(out, att, ud_finding, diseased, called_nf, thr_ud, ud_ok, **boot)
    rows, diffs = out.rows, out.diffs
    references = {a.name: a.reference for a in attributes}

    by_group = pd.DataFrame(rows, columns=[
        "attribute", "group", "finding", "metric", "estimate", "ci_low", "ci_high", "n_images", "n_patients",
        "n_denominator", "n_positive", "n_negative", "threshold", "n_degenerate", "reason"])
    differences = pd.DataFrame(diffs, columns=[
        "attribute", "finding", "metric", "group", "reference", "estimate_group", "estimate_reference",
        "difference", "ci_low", "ci_high", "n_informative_group", "n_informative_reference", "n_degenerate",
        "reason"])
    for attr in references:
        part = by_group[(by_group["attribute"] == attr) & by_group["estimate"].notna()]
        part = part[part["metric"] != "prevalence"]
        smaller_class = np.minimum(part["n_positive"].fillna(0), part["n_negative"].fillna(0))
        carried = np.where(part["metric"] == "auc", smaller_class, part["n_denominator"])
        small = int((carried < SMALL_DENOMINATOR).sum())
        if small:
            notes.append(f"attribute {attr}: {small} of {len(part)} computed AUC/TPR/FPR/underdiagnosis values rest on "
                         f"fewer than {SMALL_DENOMINATOR} images (for AUC: the smaller class; † in the Markdown); "
                         "their intervals are unreliable")
        degenerate = part[part["n_degenerate"] > 0]
        if len(degenerate):
            worst = degenerate.sort_values("n_degenerate").iloc[-1]
            notes.append(f"attribute {attr}: {len(degenerate)} metric(s) had bootstrap replicates that could not "
                         f"compute them (column n_degenerate; at most {int(worst['n_degenerate'])} of {n_bootstrap}, "
                         f"{worst['group']} / {worst['finding']} / {worst['metric']}); those replicates are excluded "
                         "from the percentiles")
    result = SubgroupResult(
        by_group=by_group, differences=differences, thresholds=thresholds, threshold_source=threshold_source,
        underdiagnosis=ud_def, references=references,
        findings=tuple(findings), attributes=tuple(references), n_images=n, n_patients=n_pat,
        ci={"method": CI_METHOD + " (strata: the patient's group x the label of their first image); differences "
                      "from the same replicates", "level": float(level), "n_bootstrap": int(n_bootstrap),
            "seed": int(seed)},
        notes=tuple(dict.fromkeys(notes)), validation=val_info)
    return result


def _reference(name: str, levels: list[str], sizes: Mapping[str, tuple[int, int]],
               reference: str | Mapping[str, str] | None) -> str:
    """The given reference group, or the group with most images (ties: the first by name)."""
    wanted = reference.get(name) if isinstance(reference, Mapping) else reference
    if wanted is None:
        return min(levels, key=lambda g: (-sizes[g][0], g))
    wanted = str(wanted)
    if wanted not in levels:
        raise ConfigError(f"reference group {wanted!r} is not a group of {name!r}; its groups: {levels}")
    return wanted


# --------------------------------------------------------------------------------------------
# output: Markdown, figure, files
# --------------------------------------------------------------------------------------------
def _fmt(est: float, lo: float, hi: float, digits: int = 3) -> str:
    if est is None or not math.isfinite(est):
        return "n/a"
    if lo is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{est:.{digits}f}"
    return f"{est:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _cell(est: float, lo: float, hi: float, n: int) -> str:
    """'est [lo, hi]', with a dagger when fewer than SMALL_DENOMINATOR images carry it; 'n/a' for NaN."""
    if est is None or not math.isfinite(est):
        return "n/a"
    return _fmt(est, lo, hi) + (" †" if n < SMALL_DENOMINATOR else "")


def subgroups_markdown(result: SubgroupResult, *, heading: str = "##") -> str:
    """The subgroup tables as Markdown: underdiagnosis, then per finding AUC / TPR / FPR, then differences."""
    lines: list[str] = []
    pct = round(result.ci["level"] * 100)
    lines += [f"Operating threshold: {result.threshold_source}; the same threshold for every group.", "",
              (f"Intervals: {pct}% {result.ci['method']}, {result.ci['n_bootstrap']} replicates. "
              f"† marks a value computed from fewer than {SMALL_DENOMINATOR} images (a group's positives for TPR, "
              "negatives for FPR, images with a finding for underdiagnosis): its percentile interval is unreliable "
              "and collapses to a point when a group has one or two such images."), ""]
    bg = result.by_group
    for attr in result.attributes:
        a = bg[bg["attribute"] == attr]
        lines += [f"{heading} By {attr} (reference group: {result.references.get(attr)})", ""]
        ud = a[a["metric"] == UNDERDIAGNOSIS]
        if len(ud):
            lines += [f"Underdiagnosis rate: {result.underdiagnosis}.", "",
                      "| group | images | patients | images with a finding | underdiagnosis rate [CI] |",
                      "|---|---|---|---|---|"]
            for r in ud.itertuples():
                val = (_cell(r.estimate, r.ci_low, r.ci_high, r.n_denominator) if math.isfinite(r.estimate)
                       else f"n/a ({r.reason})")
                lines.append(f"| {r.group} | {r.n_images} | {r.n_patients} | {r.n_denominator} | {val} |")
            lines.append("")
        lines += ["| finding | group | positives / negatives | AUC [CI] | TPR [CI] | FPR [CI] |",
                  "|---|---|---|---|---|---|"]
        for f in result.findings:
            part = a[a["finding"] == f].set_index(["group", "metric"])
            for g in a.loc[a["finding"] == f, "group"].drop_duplicates():
                cells = {m: part.loc[(g, m)] for m in ("auc", "tpr", "fpr")}
                c = {m: _cell(r["estimate"], r["ci_low"], r["ci_high"],
                              r["n_denominator"] if m != "auc" else min(r["n_positive"], r["n_negative"]))
                     for m, r in cells.items()}
                lines.append(f"| {f} | {g} | {cells['auc']['n_positive']} / {cells['auc']['n_negative']} | "
                             f"{c['auc']} | {c['tpr']} | {c['fpr']} |")
        lines.append("")
        d = result.differences[result.differences["attribute"] == attr]
        ok = d[d["difference"].notna()]
        if len(d):
            lines += [f"Differences (group - reference) with {pct}% CIs:", "",
                      "| finding | metric | group | reference | difference [CI] |", "|---|---|---|---|---|"]
            for r in ok.itertuples():
                n = min(r.n_informative_group, r.n_informative_reference)
                lines.append(f"| {r.finding} | {r.metric} | {r.group} | {r.reference} | "
                             f"{_cell(r.difference, r.ci_low, r.ci_high, n)} |")
            if len(ok) < len(d):
                lines += ["", (f"{len(d) - len(ok)} difference(s) could not be computed (a group without positives or "
                              "negatives of the finding, or no validation threshold); subgroup_differences.csv lists "
                              "each with its reason.")]
            lines.append("")
    if result.notes:
        lines += [f"{heading} Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    return "\n".join(lines)


def plot_subgroups(result: SubgroupResult, path: str | Path, *, attribute: str) -> Path | None:
    """Forest plot for one attribute: underdiagnosis per group, and TPR / FPR per finding and group (point + CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bg = result.by_group[(result.by_group["attribute"] == attribute) & (result.by_group["group"] != ALL)]
    if bg.empty:
        return None
    groups = sorted(bg["group"].unique().tolist())
    findings = [f for f in result.findings
                if bg[(bg["finding"] == f) & bg["metric"].isin(["tpr", "fpr"])]["estimate"].notna().any()]
    ud = bg[bg["metric"] == UNDERDIAGNOSIS]
    panels = ([("underdiagnosis rate", None)] if len(ud) else []) + [("TPR", "tpr"), ("FPR", "fpr")]
    height = max(2.5, 0.35 * max(len(findings), 1) * max(1, len(groups) / 2) + 1.2)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), height), squeeze=False)
    colours = plt.get_cmap("tab10")
    offsets = np.linspace(-0.3, 0.3, len(groups)) if len(groups) > 1 else np.zeros(1)
    def point(ax: Any, r: pd.Series, y: float, colour: Any, size: float) -> None:
        e, lo, hi = float(r["estimate"]), float(r["ci_low"]), float(r["ci_high"])
        lo, hi = (e, e) if not (math.isfinite(lo) and math.isfinite(hi)) else (lo, hi)
        small = r["n_denominator"] < SMALL_DENOMINATOR       # hollow: too few images for a reliable interval
        ax.errorbar(e, y, xerr=[[max(e - lo, 0)], [max(hi - e, 0)]], fmt="o", ms=size, color=colours_of(colour),
                    mfc="white" if small else colours_of(colour), capsize=2)

    def colours_of(j: int) -> Any:
        return colours(j % 10)

    for ax, (title, metric) in zip(axes[0], panels):
        if metric is None:
            for j, g in enumerate(groups):
                r = ud[ud["group"] == g]
                if len(r) and math.isfinite(r["estimate"].iloc[0]):
                    point(ax, r.iloc[0], j, j, 6)
            ax.set_yticks(range(len(groups)), groups)
            ax.set_ylim(-0.7, len(groups) - 0.3)
            ax.invert_yaxis()
        else:
            part = bg[bg["metric"] == metric]
            for j, g in enumerate(groups):
                for i, f in enumerate(findings):
                    r = part[(part["group"] == g) & (part["finding"] == f)]
                    if len(r) and math.isfinite(r["estimate"].iloc[0]):
                        point(ax, r.iloc[0], i + offsets[j], j, 4)
            ax.set_yticks(range(len(findings)), findings)
            ax.set_ylim(-0.7, max(len(findings), 1) - 0.3)
            ax.invert_yaxis()
        ax.set_xlim(-0.02, 1.02)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colours(j % 10)) for j in range(len(groups))]
    fig.legend(handles, groups, title=attribute, loc="upper right", fontsize=8)
    pct = round(result.ci["level"] * 100)
    fig.suptitle(f"Performance by {attribute}: points with {pct}% patient-bootstrap CIs, one threshold for all groups; "
                 f"hollow: fewer than {SMALL_DENOMINATOR} images", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.92, 0.95))
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def write_subgroups(result: SubgroupResult, out_dir: str | Path, *, figures: bool = True) -> dict[str, Path]:
    """Write subgroups.csv, subgroup_differences.csv, subgroups.md, subgroups.json and one figure per attribute."""
    import json

    from readingrace.experiments.rundir import write_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"by_group": out / "subgroups.csv", "differences": out / "subgroup_differences.csv",
             "markdown": out / "subgroups.md", "json": out / "subgroups.json"}
    write_atomic(paths["by_group"], result.by_group.to_csv(index=False))
    write_atomic(paths["differences"], result.differences.to_csv(index=False))
    write_atomic(paths["markdown"], "# Subgroup performance\n\n" + subgroups_markdown(result))
    write_atomic(paths["json"], json.dumps(result.to_dict(), indent=2, allow_nan=False))
    if figures:
        for attr in result.attributes:
            p = plot_subgroups(result, out / f"subgroups_{_safe(attr)}.png", attribute=attr)
            if p is not None:
                paths[f"figure:{attr}"] = p
    return paths

"""Patient-level, stratified, seeded splits, and the leakage check.

A patient's stratification label is the target on their *first* image (in cohort order), so a
target that varies within a patient (age group over follow-ups) still gives one label per patient.
Splits are made on the list of patients with scikit-learn's ``train_test_split`` (twice for three
parts), so the same seed and cohort always give the same split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
from sklearn.model_selection import train_test_split

from readingrace.errors import LeakageError, SplitError

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
DEFAULT_RATIOS: tuple[float, float, float] = (0.6, 0.1, 0.3)
DEFAULT_SEED = 2021


def check_ratios(ratios: Sequence[float]) -> tuple[float, ...]:
    """Validate split ratios: 2 or 3 positive numbers summing to 1."""
    r = tuple(float(x) for x in ratios)
    if len(r) not in (2, 3) or any(x <= 0 for x in r) or abs(sum(r) - 1) > 1e-6:
        raise SplitError(
            f"split ratios {list(ratios)} must be 2 or 3 positive numbers summing to 1 "
            "(e.g. [0.6, 0.1, 0.3])"
        )
    return r


def patient_labels(df: pd.DataFrame, target: str, patient_col: str = "patient_id") -> pd.Series:
    """One label per patient: the target on the patient's first image (cohort order)."""
    first = df.drop_duplicates(patient_col, keep="first")
    return pd.Series(first[target].to_numpy(), index=first[patient_col].to_numpy(), name=target)


def split_patients(
    df: pd.DataFrame,
    *,
    target: str | None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = DEFAULT_SEED,
    patient_col: str = "patient_id",
    names: Sequence[str] = SPLIT_NAMES,
) -> pd.Series:
    """Assign every image a split by patient; stratified on ``target`` when given.

    Returns a Series aligned with ``df.index`` holding ``names[i]``. Raises :class:`SplitError`
    when a split would be empty or a class has too few patients to stratify.
    """
    r = check_ratios(ratios)
    names = tuple(names)[: len(r)]
    labels = patient_labels(df, target, patient_col) if target else None
    patients = (labels.index if labels is not None else pd.Index(df[patient_col].unique())).to_numpy()
    if labels is not None:
        counts = labels.value_counts()
        small = counts[counts < len(r)]
        if len(small):
            raise SplitError(
                f"class {small.index[0]!r} of {target!r} has {int(small.iloc[0])} patient(s): "
                f"a stratified {len(r)}-way split needs at least {len(r)} per class; "
                "drop the class (min_prevalence) or collect more patients"
            )
    _check_part_sizes(len(patients), r, names, labels.nunique() if labels is not None else 1, target)
    strat = labels.to_numpy() if labels is not None else None
    try:
        first, rest = train_test_split(
            patients, train_size=r[0], random_state=seed, stratify=strat, shuffle=True
        )
        parts = [first]
        if len(r) == 3:
            rest_strat = labels.loc[rest].to_numpy() if labels is not None else None
            second, third = train_test_split(
                rest, train_size=r[1] / (r[1] + r[2]), random_state=seed,
                stratify=rest_strat, shuffle=True,
            )
            parts += [second, third]
        else:
            parts.append(rest)
    except ValueError as exc:
        raise SplitError(f"cannot split {len(patients)} patients with ratios {list(r)}: {exc}") from None
    assignment: dict[object, str] = {}
    for name, part in zip(names, parts):
        if len(part) == 0:
            raise SplitError(f"split {name!r} would be empty with ratios {list(r)}")
        assignment.update(dict.fromkeys(part.tolist(), name))
    out = df[patient_col].map(assignment)
    check_no_leakage(df.assign(split=out), patient_col=patient_col)
    return out.rename("split")


def _check_part_sizes(n: int, r: tuple[float, ...], names: tuple[str, ...], n_classes: int, target: str | None) -> None:
    """Patients each part gets (as scikit-learn rounds them); a part smaller than the number of classes
    cannot be stratified (or is empty), so say which part, how many patients, and what to change."""
    first = int(r[0] * n)  # train_test_split floors train_size * n
    sizes = [first, n - first]
    if len(r) == 3:
        second = int(r[1] / (r[1] + r[2]) * sizes[1])
        sizes = [first, second, sizes[1] - second]
    need = max(n_classes, 1)
    for name, size, ratio in zip(names, sizes, r):
        if size < need:
            what = f"the {n_classes} classes of {target!r}" if target else "one patient"
            raise SplitError(
                f"split.ratios {list(r)}: the {name!r} split would get {size} of {n} patients, fewer than "
                f"{what}; raise its ratio (now {ratio:g}) or add patients"
            )


def check_no_leakage(
    df: pd.DataFrame,
    *,
    split_col: str = "split",
    patient_col: str = "patient_id",
    allowed: Mapping[str, str] | None = None,
) -> None:
    """Raise :class:`LeakageError` if any patient appears in more than one split.

    ``allowed`` documents a sanctioned exception (only A3's re-identification training); it is
    never used by default.
    """
    if allowed:
        return
    n_splits = df.groupby(patient_col, sort=False)[split_col].nunique(dropna=True)
    leaky = n_splits[n_splits > 1]
    if len(leaky):
        ex = leaky.index[0]
        where = sorted(df.loc[df[patient_col] == ex, split_col].dropna().unique().tolist())
        raise LeakageError(
            f"{len(leaky)} patient(s) appear in more than one split, e.g. patient {ex!r} in {where}; "
            "splits must be by patient"
        )


def split_sizes(df: pd.DataFrame, *, split_col: str = "split", patient_col: str = "patient_id",
                target: str | None = None) -> pd.DataFrame:
    """Images and patients per split (and per class when ``target`` is given)."""
    keys = [split_col] + ([target] if target else [])
    g = df.groupby(keys, dropna=False, observed=True)
    return pd.DataFrame({"images": g.size(), "patients": g[patient_col].nunique()}).reset_index()


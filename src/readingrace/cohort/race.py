"""Race harmonisation: one explicit, versioned table per source (raw string -> group).

Raw strings are matched exactly after case folding and whitespace normalisation; there is no substring
guessing ("White, non-Hispanic" is White because the table says so, not because it contains "White").
Strings that a table does not list become ``"unknown"`` and are reported (never guessed). Known strings
that mean "not recorded" (UNKNOWN, UNABLE TO OBTAIN, Patient Refused, ...) also map to ``"unknown"``
without a report. In a cohort table both become a missing race (``None``).

Order of the race rules inside a source (see :func:`apply_race`): harmonise -> exclude patients whose
group differs across records (*before* any de-duplication) -> exclude Hispanic/Latino. The prevalence
filter (classes at or below 1% of patients dropped) is generic and lives in ``cohort.build``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from readingrace.cohort.manifest import Manifest
from readingrace.errors import ConfigError

ASIAN, BLACK, WHITE, HISPANIC, OTHER, UNKNOWN = "Asian", "Black", "White", "Hispanic", "Other", "unknown"
#: Every value a race table may map to.
GROUPS: tuple[str, ...] = (ASIAN, BLACK, WHITE, HISPANIC, OTHER, UNKNOWN)
#: Ethnicity tables map to these.
NOT_HISPANIC = "not Hispanic"
ETHNICITY_GROUPS: tuple[str, ...] = (HISPANIC, NOT_HISPANIC, UNKNOWN)

_SPACE = re.compile(r"\s+")


def normalise(value: object) -> str:
    """Case-fold, strip and collapse internal whitespace (the only normalisation before lookup)."""
    return _SPACE.sub(" ", str(value)).strip().casefold()


@dataclass(frozen=True)
class RaceTable:
    """An explicit mapping raw string -> group, with a version recorded in every manifest."""

    name: str
    version: str
    source: str
    mapping: Mapping[str, str]
    groups: tuple[str, ...] = GROUPS
    _lookup: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lookup: dict[str, str] = {}
        for raw, group in self.mapping.items():
            if group not in self.groups:
                raise ValueError(f"race table {self.name}: {raw!r} maps to {group!r}, not one of {self.groups}")
            key = normalise(raw)
            if key in lookup and lookup[key] != group:
                raise ValueError(f"race table {self.name}: {raw!r} listed twice with different groups")
            lookup[key] = group
        object.__setattr__(self, "_lookup", lookup)

    @property
    def key(self) -> str:
        """The name under which the table is recorded in ``manifest.mappings``."""
        return f"race:{self.name}@{self.version}"

    def lookup(self, raw: str) -> str | None:
        """The group of ``raw`` (after normalisation), or ``None`` when the table does not list it."""
        return self._lookup.get(normalise(raw))


def _table(name: str, version: str, source: str, groups: dict[str, Iterable[str]],
           allowed: tuple[str, ...] = GROUPS) -> RaceTable:
    mapping = {raw: group for group, raws in groups.items() for raw in raws}
    return RaceTable(name, version, source, mapping, allowed)


_MIMIC_V1 = {
    WHITE: ["WHITE"],
    BLACK: ["BLACK/AFRICAN AMERICAN"],
    ASIAN: ["ASIAN"],
    HISPANIC: ["HISPANIC/LATINO"],
    OTHER: ["AMERICAN INDIAN/ALASKA NATIVE", "OTHER"],
    UNKNOWN: ["UNKNOWN", "UNABLE TO OBTAIN"],
}

_MIMIC_V2 = {
    WHITE: ["WHITE", "WHITE - OTHER EUROPEAN", "WHITE - RUSSIAN", "WHITE - EASTERN EUROPEAN",
            "WHITE - BRAZILIAN", "PORTUGUESE"],
    BLACK: ["BLACK/AFRICAN AMERICAN", "BLACK/CAPE VERDEAN", "BLACK/CARIBBEAN ISLAND", "BLACK/AFRICAN"],
    ASIAN: ["ASIAN", "ASIAN - CHINESE", "ASIAN - SOUTH EAST ASIAN", "ASIAN - ASIAN INDIAN", "ASIAN - KOREAN"],
    HISPANIC: ["HISPANIC/LATINO", "HISPANIC OR LATINO", "SOUTH AMERICAN",
               "HISPANIC/LATINO - PUERTO RICAN", "HISPANIC/LATINO - DOMINICAN",
               "HISPANIC/LATINO - GUATEMALAN", "HISPANIC/LATINO - SALVADORAN", "HISPANIC/LATINO - MEXICAN",
               "HISPANIC/LATINO - CUBAN", "HISPANIC/LATINO - COLUMBIAN", "HISPANIC/LATINO - HONDURAN",
               "HISPANIC/LATINO - CENTRAL AMERICAN"],
    OTHER: ["AMERICAN INDIAN/ALASKA NATIVE", "NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER",
            "MULTIPLE RACE/ETHNICITY", "OTHER"],
    UNKNOWN: ["UNKNOWN", "UNABLE TO OBTAIN", "PATIENT DECLINED TO ANSWER"],
}

# CheXpert's PRIMARY_RACE mixes race and ethnicity; "<race>, Hispanic" is Hispanic (excluded),
# "<race>, non-Hispanic" is <race>.
_CHEXPERT = {
    WHITE: ["White", "White, non-Hispanic", "White or Caucasian"],
    BLACK: ["Black or African American", "Black, non-Hispanic"],
    ASIAN: ["Asian", "Asian, non-Hispanic", "Asian - Historical Conv"],
    HISPANIC: ["White, Hispanic", "Black, Hispanic", "Asian, Hispanic", "Other, Hispanic",
               "Native Hawaiian or Other Pacific Islander, Hispanic", "Pacific Islander, Hispanic",
               "Native American, Hispanic"],
    OTHER: ["Native Hawaiian or Other Pacific Islander",
            "Native Hawaiian or Other Pacific Islander, non-Hispanic", "Pacific Islander, non-Hispanic",
            "American Indian or Alaska Native", "Native American, non-Hispanic", "Other", "Other, non-Hispanic"],
    UNKNOWN: ["Unknown", "Patient Refused", "Race and Ethnicity Unknown"],
}

_CHEXPERT_ETHNICITY = {
    HISPANIC: ["Hispanic/Latino", "Hispanic"],
    NOT_HISPANIC: ["Non-Hispanic/Non-Latino", "Not Hispanic"],
    UNKNOWN: ["Unknown", "Patient Refused"],
}

# Hospital exports (Emory-style "Caucasian or White", EMBED-style "African American  or Black") and the
# common OMB category names.
_GENERIC = {
    WHITE: ["White", "Caucasian", "White or Caucasian", "Caucasian or White", "White, non-Hispanic"],
    BLACK: ["Black", "African American", "Black or African American", "African American or Black",
            "Black, non-Hispanic", "Black/African American"],
    ASIAN: ["Asian", "Asian, non-Hispanic"],
    HISPANIC: ["Hispanic", "Latino", "Hispanic or Latino", "Hispanic/Latino", "Latino/Hispanic"],
    OTHER: ["Other", "Multiple", "Multiracial", "More than one race", "American Indian or Alaska Native",
            "American Indian or Alaskan Native", "Native American", "Native Hawaiian or Other Pacific Islander",
            "Pacific Islander"],
    UNKNOWN: ["Unknown", "Declined", "Patient Declined", "Patient Refused", "Not Recorded",
              "Unknown, Unavailable or Unreported", "Unavailable", "Unreported"],
}

_GENERIC_ETHNICITY = {
    HISPANIC: ["Hispanic", "Latino", "Hispanic or Latino", "Hispanic/Latino"],
    NOT_HISPANIC: ["Not Hispanic", "Non-Hispanic", "Not Hispanic or Latino", "Non-Hispanic/Non-Latino",
                   "Neither Hispanic nor Latino"],
    UNKNOWN: ["Unknown", "Declined", "Patient Refused", "Unavailable"],
}

# DICOM EthnicGroup (0010,2160) is free text (SH, 16 chars); these are the spellings seen in exports.
_DICOM = {
    WHITE: ["WHITE", "CAUCASIAN"],
    BLACK: ["BLACK", "AFRICAN AMERICAN", "BLACK/AFRICAN AMERICAN"],
    ASIAN: ["ASIAN"],
    HISPANIC: ["HISPANIC", "LATINO", "HISPANIC/LATINO"],
    OTHER: ["OTHER", "MULTIPLE", "NATIVE AMERICAN", "PACIFIC ISLANDER"],
    UNKNOWN: ["UNKNOWN", "DECLINED", "UNAVAILABLE"],
}

# NLST participant file (column ``race``): numeric codes of the NLST data dictionary.
_NLST = {
    WHITE: ["1"], BLACK: ["2"], ASIAN: ["3"], OTHER: ["4", "5", "6"],
    UNKNOWN: ["7", "95", "96", "98", "99"],
}
_NLST_ETHNICITY = {HISPANIC: ["1"], NOT_HISPANIC: ["2"], UNKNOWN: ["7", "95", "96", "98", "99"]}

#: All tables by name. Change a table only together with its version string.
TABLES: dict[str, RaceTable] = {t.name: t for t in (
    _table("mimic_iv_v1", "1", "MIMIC-IV v1.0 core/admissions.csv.gz, column ethnicity", _MIMIC_V1),
    _table("mimic_iv_v2", "1", "MIMIC-IV v2.x hosp/admissions.csv.gz, column race", _MIMIC_V2),
    _table("chexpert", "1", "CHEXPERT DEMO.xlsx, column PRIMARY_RACE", _CHEXPERT),
    _table("chexpert_ethnicity", "1", "CHEXPERT DEMO.xlsx, column ETHNICITY", _CHEXPERT_ETHNICITY,
           ETHNICITY_GROUPS),
    _table("generic", "1", "hospital exports: OMB-style race names", _GENERIC),
    _table("generic_ethnicity", "1", "hospital exports: ethnicity names", _GENERIC_ETHNICITY, ETHNICITY_GROUPS),
    _table("dicom", "1", "DICOM EthnicGroup (0010,2160)", _DICOM),
    _table("nlst", "1", "NLST participant file, column race (numeric codes)", _NLST),
    _table("nlst_ethnicity", "1", "NLST participant file, column ethnic (numeric codes)", _NLST_ETHNICITY,
           ETHNICITY_GROUPS),
)}
TABLES["export"] = TABLES["generic"]


def get_table(name: str | RaceTable) -> RaceTable:
    """The table called ``name``; :class:`ConfigError` naming the known tables otherwise."""
    if isinstance(name, RaceTable):
        return name
    if name not in TABLES:
        raise ConfigError(f"unknown race table {name!r}; known tables: {sorted(TABLES)}")
    return TABLES[name]


def _is_blank(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and value != value) or not str(value).strip()


def _raw_key(value: object) -> str:
    # Numeric codes read as floats ("1.0") are the same code as "1".
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def harmonise(raw: pd.Series, table: str | RaceTable) -> tuple[pd.Series, dict[str, int]]:
    """Map raw strings to groups with ``table``.

    Returns the groups (same index as ``raw``; blanks and unlisted strings are ``"unknown"``) and the
    unlisted raw strings with their row counts, for the manifest. Nothing is guessed.
    """
    t = get_table(table)
    codes, uniques = pd.factorize(raw, use_na_sentinel=True)
    mapped: list[str] = []
    unknown: dict[str, int] = {}
    counts = pd.Series(codes).value_counts()
    for i, value in enumerate(uniques):
        if _is_blank(value):
            mapped.append(UNKNOWN)
            continue
        key = _raw_key(value).strip()
        group = t.lookup(key)
        if group is None:
            unknown[key] = unknown.get(key, 0) + int(counts.get(i, 0))
            group = UNKNOWN
        mapped.append(group)
    lut = pd.array(mapped + [UNKNOWN], dtype=object)
    out = pd.Series(lut[codes], index=raw.index, dtype=object, name=raw.name)
    return out, dict(sorted(unknown.items()))


def record_table(manifest: Manifest, table: str | RaceTable) -> RaceTable:
    """Record ``table`` (name, version, full mapping) in ``manifest.mappings``."""
    t = get_table(table)
    manifest.mappings[t.key] = dict(t.mapping)
    return t


def harmonise_recorded(raw: pd.Series, table: str | RaceTable, manifest: Manifest, *,
                       what: str = "race") -> pd.Series:
    """:func:`harmonise`, recording the table and reporting unlisted strings in ``manifest``."""
    t = record_table(manifest, table)
    groups, unknown = harmonise(raw, t)
    if unknown:
        manifest.warn(f"{what} strings not in table {t.name!r} (version {t.version}), set to unknown: {unknown}")
        manifest.counts.setdefault(f"{what}_unlisted_strings", {}).update(unknown)
    return groups


def to_cohort_race(groups: pd.Series) -> pd.Series:
    """Groups -> the cohort's ``race`` column: ``"unknown"`` becomes missing (``None``)."""
    return groups.astype(object).where(groups.notna() & (groups != UNKNOWN), None)


def isin(values: pd.Series, candidates: Iterable[object] | pd.Series | pd.Index) -> pd.Series:
    """``values.isin(candidates)`` through a hash index (pandas' Arrow-string ``isin`` is slow for large sets)."""
    if isinstance(candidates, pd.Series | pd.Index):
        arr = candidates.to_numpy(dtype=object)
    else:
        arr = np.asarray(list(candidates), dtype=object)
    index = pd.Index(pd.unique(arr))
    hit = index.get_indexer(values.to_numpy(dtype=object)) >= 0 if len(index) else np.zeros(len(values), bool)
    return pd.Series(hit, index=values.index)


def conflicting_patients(records: pd.DataFrame, column: str, *, patient_col: str = "patient_id",
                         missing: Iterable[str] = (UNKNOWN,)) -> pd.Index:
    """Patients with more than one distinct non-missing value of ``column`` in ``records``."""
    values = records[column]
    known = values.notna() & ~values.isin(list(missing))
    n = records.loc[known].groupby(patient_col, sort=True)[column].nunique()
    return pd.Index(n.index[n > 1])


def exclude_conflicting(df: pd.DataFrame, column: str, manifest: Manifest, step: str, *,
                        patient_col: str = "patient_id", records: pd.DataFrame | None = None,
                        records_patient_col: str | None = None, what: str | None = None) -> pd.DataFrame:
    """Drop every row of patients whose ``column`` takes more than one known value.

    The conflict is judged on ``records`` when given (e.g. all admissions of a patient) and otherwise on
    ``df`` itself; in both cases call this *before* any de-duplication, so that no record is lost first.
    The excluded patients are listed in the manifest's skips (``patient <id>``), so that each can be
    traced; reports show only their count. ``what`` names the column in the messages.
    """
    src = df if records is None else records
    rpc = records_patient_col or patient_col
    bad = conflicting_patients(src, column, patient_col=rpc)
    out = df[~isin(df[patient_col], bad)]
    n_records = int(isin(src[rpc], bad).sum())
    manifest.counts[f"{step}: patients"] = int(len(bad))
    what = what or column
    manifest.skip_many([f"patient {p}" for p in bad], f"{what} differs across the patient's records", stage="cohort")
    detail = (f"{len(bad)} patient(s) whose {what} differs across their {n_records} records; all their images removed"
              if len(bad) else f"no patient's {what} differs across records")
    return manifest.step(step, df, out, detail=detail)


def exclude_hispanic(df: pd.DataFrame, manifest: Manifest, *, column: str = "race_group",
                     step: str = "Hispanic/Latino excluded", patient_col: str = "patient_id") -> pd.DataFrame:
    """Drop rows whose harmonised group is Hispanic (coded inconsistently across sources)."""
    hisp = df[column] == HISPANIC
    n_pat = int(df.loc[hisp, patient_col].nunique())
    return manifest.step(step, df, df[~hisp], detail=f"{int(hisp.sum())} images of {n_pat} Hispanic/Latino patients")


def race_from_records(df: pd.DataFrame, records: pd.DataFrame, manifest: Manifest, *, raw_col: str,
                      table: str | RaceTable, records_patient_col: str, patient_col: str = "patient_id",
                      ethnicity_col: str | None = None, ethnicity_table: str | RaceTable | None = None,
                      exclude_hispanic_rows: bool = True, what: str = "records") -> pd.DataFrame:
    """Race for an image table from a separate table of patient records (admissions, demographics).

    Every record is harmonised; a patient whose group differs across records is excluded, judged on all
    records before they are reduced to one per patient; then Hispanic patients (when
    ``exclude_hispanic_rows``). Adds ``race_group``, ``race_raw`` (the patient's distinct raw strings joined
    by " | ") and ``race`` (unknown -> missing). Patients without a record get a missing race.
    """
    rec = records[[records_patient_col, raw_col] + ([ethnicity_col] if ethnicity_col else [])]
    groups = harmonise_recorded(rec[raw_col], table, manifest)
    if ethnicity_col:
        eth = harmonise_recorded(rec[ethnicity_col], ethnicity_table or "generic_ethnicity", manifest,
                                 what="ethnicity")
        groups = groups.where(eth != HISPANIC, HISPANIC)
    rec = rec.assign(race_group=groups)
    out = exclude_conflicting(df, "race_group", manifest, f"race conflicting across {what}",
                              patient_col=patient_col, records=rec, records_patient_col=records_patient_col)
    known = rec[rec["race_group"] != UNKNOWN].drop_duplicates(records_patient_col)
    group = pd.Series(known["race_group"].to_numpy(), index=known[records_patient_col].to_numpy())
    raw = _distinct_joined(rec[records_patient_col], rec[raw_col])
    out = out.assign(race_group=out[patient_col].map(group).fillna(UNKNOWN).astype(object),
                     race_raw=out[patient_col].map(raw).astype(object))
    no_record = ~isin(out[patient_col], rec[records_patient_col])
    manifest.counts[f"images_without_{what.replace(' ', '_')}"] = int(no_record.sum())
    manifest.counts["images_race_unknown"] = int((out["race_group"] == UNKNOWN).sum())
    if exclude_hispanic_rows:
        out = exclude_hispanic(out, manifest, patient_col=patient_col)
    else:
        manifest.counts["hispanic_images_kept"] = int((out["race_group"] == HISPANIC).sum())
    return out.assign(race=to_cohort_race(out["race_group"]))


def _distinct_joined(keys: pd.Series, values: pd.Series) -> pd.Series:
    """Per key, its distinct non-missing values sorted and joined by " | " (a plain loop: fast for many keys)."""
    pairs = pd.DataFrame({"k": keys.to_numpy(), "v": values.astype(object).to_numpy()}).dropna()
    pairs = pairs.assign(v=pairs["v"].map(str)).drop_duplicates().sort_values(["k", "v"], kind="stable")
    joined: dict[object, str] = {}
    for k, v in zip(pairs["k"].tolist(), pairs["v"].tolist(), strict=True):
        joined[k] = f"{joined[k]} | {v}" if k in joined else v
    return pd.Series(joined, dtype=object)


def apply_race(df: pd.DataFrame, manifest: Manifest, *, raw_col: str, table: str | RaceTable,
               patient_col: str = "patient_id", ethnicity_col: str | None = None,
               ethnicity_table: str | RaceTable | None = None, exclude_hispanic_rows: bool = True,
               label: str = "") -> pd.DataFrame:
    """The race rules in order, for a table with one row per image (or record) and a raw race column.

    Adds ``race_group`` (the harmonised group, ``"Hispanic"`` where the ethnicity says so) and ``race``
    (the cohort column: unknown -> missing); excludes patients with conflicting groups, then Hispanic
    patients (when ``exclude_hispanic_rows``). Every step is recorded in ``manifest``.
    """
    prefix = f"{label}: " if label else ""
    groups = harmonise_recorded(df[raw_col], table, manifest)
    if ethnicity_col is not None:
        eth = harmonise_recorded(df[ethnicity_col], ethnicity_table or "generic_ethnicity", manifest,
                                 what="ethnicity")
        groups = groups.where(eth != HISPANIC, HISPANIC)
    out = df.assign(race_group=groups)
    out = exclude_conflicting(out, "race_group", manifest, f"{prefix}race conflicting across records",
                              patient_col=patient_col, what="race (harmonised)")
    if exclude_hispanic_rows:
        out = exclude_hispanic(out, manifest, step=f"{prefix}Hispanic/Latino excluded", patient_col=patient_col)
    return out.assign(race=to_cohort_race(out["race_group"]))

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from readingrace.cohort.manifest import Manifest
from readingrace.cohort.race import (
    GROUPS, TABLES, apply_race, conflicting_patients, exclude_conflicting, get_table, harmonise, to_cohort_race,
)
from readingrace.errors import ConfigError


def test_white_non_hispanic_is_white_and_no_non_hispanic_string_is_hispanic():
    assert harmonise(pd.Series(["White, non-Hispanic"]), "chexpert")[0].tolist() == ["White"]
    assert harmonise(pd.Series(["White, non-Hispanic"]), "generic")[0].tolist() == ["White"]
    negated = re.compile(r"non-?hispanic|not hispanic|non-latino|neither hispanic", re.IGNORECASE)
    checked = 0
    for table in TABLES.values():
        for raw, group in table.mapping.items():
            if negated.search(raw):
                checked += 1
                assert group != "Hispanic", (table.name, raw)
    assert checked >= 10


def test_every_table_is_versioned_and_maps_to_known_groups():
    for name in ("mimic_iv_v1", "mimic_iv_v2", "chexpert", "generic", "export", "dicom", "nlst"):
        t = get_table(name)
        assert t.version and t.source
        assert set(t.mapping.values()) <= set(GROUPS)
    with pytest.raises(ConfigError, match="unknown race table 'mimic'"):
        get_table("mimic")


def test_mimic_v2_values_cover_the_documented_vocabulary():
    raw = pd.Series(["WHITE - EASTERN EUROPEAN", "BLACK/CARIBBEAN ISLAND", "ASIAN - SOUTH EAST ASIAN",
                     "ASIAN - ASIAN INDIAN", "ASIAN - KOREAN", "HISPANIC/LATINO - DOMINICAN", "SOUTH AMERICAN",
                     "NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER", "MULTIPLE RACE/ETHNICITY", "UNABLE TO OBTAIN",
                     "WHITE - BRAZILIAN", "PORTUGUESE"])
    groups, unknown = harmonise(raw, "mimic_iv_v2")
    assert groups.tolist() == ["White", "Black", "Asian", "Asian", "Asian", "Hispanic", "Hispanic", "Other",
                               "Other", "unknown", "White", "White"]
    assert unknown == {}
    # v1.0 does not list the v2 finer strings: reported, not guessed
    g1, u1 = harmonise(pd.Series(["WHITE - RUSSIAN", "WHITE", "HISPANIC/LATINO"]), "mimic_iv_v1")
    assert g1.tolist() == ["unknown", "White", "Hispanic"] and u1 == {"WHITE - RUSSIAN": 1}


def test_exact_match_after_case_and_space_normalisation_only():
    groups, unknown = harmonise(pd.Series(["  white ", "BLACK  OR african american", "Whitish", "Asian American",
                                           None, "", np.nan, "Whitish"]), "generic")
    assert groups.tolist() == ["White", "Black", "unknown", "unknown", "unknown", "unknown", "unknown", "unknown"]
    assert unknown == {"Asian American": 1, "Whitish": 2}
    assert to_cohort_race(groups).tolist() == ["White", "Black", None, None, None, None, None, None]


def test_numeric_codes_read_as_float():
    groups, unknown = harmonise(pd.Series([1.0, 2, "3", 99.0, 42.0]), "nlst")
    assert groups.tolist() == ["White", "Black", "Asian", "unknown", "unknown"]
    assert unknown == {"42": 1}


def test_conflict_exclusion_happens_before_deduplication():
    # Patient B: two records, White then Black. De-duplicating first (keep first) would keep B as White.
    rec = pd.DataFrame({"patient_id": ["A", "A", "B", "B", "C", "C"],
                        "group": ["White", "unknown", "White", "Black", "Asian", "Asian"]})
    assert conflicting_patients(rec, "group").tolist() == ["B"]
    legacy = rec.drop_duplicates("patient_id")
    assert conflicting_patients(legacy, "group").empty  # the original notebooks' order found nobody
    m = Manifest()
    out = exclude_conflicting(rec, "group", m, "conflict")
    assert sorted(out["patient_id"].unique()) == ["A", "C"]
    assert (m.flow[0].images_before, m.flow[0].images_after, m.flow[0].patients_after) == (6, 4, 2)


def test_apply_race_order_and_manifest():
    df = pd.DataFrame({"patient_id": ["1", "1", "2", "3", "3", "4", "5"],
                       "raw": ["White", "Caucasian", "Hispanic", "Black", "Asian", "Martian", "Unknown"]})
    m = Manifest()
    out = apply_race(df, m, raw_col="raw", table="generic")
    assert out.set_index("patient_id")["race"].groupby(level=0).first().to_dict() == {
        "1": "White", "4": None, "5": None}
    assert [s.step for s in m.flow] == ["race conflicting across records", "Hispanic/Latino excluded"]
    assert [(s.images_before, s.images_after) for s in m.flow] == [(7, 5), (5, 4)]
    assert m.counts["race_unlisted_strings"] == {"Martian": 1}
    assert "race:generic@1" in m.mappings and m.mappings["race:generic@1"]["Caucasian"] == "White"


def test_ethnicity_column_makes_hispanic():
    df = pd.DataFrame({"patient_id": ["1", "2", "3"], "raw": ["White", "Black", "White"],
                       "eth": ["Hispanic or Latino", "Not Hispanic", None]})
    m = Manifest()
    out = apply_race(df, m, raw_col="raw", table="generic", ethnicity_col="eth")
    assert out["patient_id"].tolist() == ["2", "3"] and out["race"].tolist() == ["Black", "White"]

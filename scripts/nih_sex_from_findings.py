#!/usr/bin/env python
"""Real-data analogue of B3: predict sex (M/F) from the NIH ChestX-ray14 finding labels.

No public chest X-ray set ships race, so sex stands in for it: if the finding labels alone predicted
sex well, an image model's sex (or race) AUC could be a disease-label shortcut. The label table is
built directly from ``Data_Entry_2017*.csv(.gz)`` (112,120 rows): the 14 NIH findings plus
"No Finding" (a deterministic function of the 14; include it with --no-finding, the default, to
mirror the paper's 14 CheXpert labels, which contain "No Finding"). Patients whose recorded sex
differs across images are excluded and counted. XGBoost, random forest and L1 logistic
regression with the paper's grids, 5-fold CV grouped by patient on a 70% patient split, test AUCs
with patient-clustered bootstrap CIs. Prints a Markdown report and the wall time of each model.

    python scripts/nih_sex_from_findings.py [--csv PATH] [--out DIR] [--n-bootstrap 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from readingrace.cohort.schema import NIH_LABELS
from readingrace.errors import CohortError, ReadingRaceError
from readingrace.stats import confounders as cf
from readingrace.stats.metrics import evaluate_predictions

DEFAULT_CSV = (Path(__file__).resolve().parents[2] / "shared" / "data" / "nih-cxr14-sample"
               / "Data_Entry_2017_v2020.csv.gz")
NEEDED = ["Image Index", "Finding Labels", "Patient ID", "Patient Gender"]


def nih_label_table(csv: Path, *, no_finding: bool = True) -> tuple[pd.DataFrame, list[str], dict[str, int]]:
    """One row per image: image_id, patient_id, sex and 0/1 finding columns; plus the exclusion counts."""
    raw = pd.read_csv(csv)
    missing = [c for c in NEEDED if c not in raw.columns]
    if missing:
        raise CohortError(f"{csv.name} lacks column(s) {missing}; is it the NIH Data_Entry_2017 file?")
    counts = {"images_read": len(raw), "patients_read": int(raw["Patient ID"].nunique())}
    found = raw["Finding Labels"].fillna("").str.get_dummies(sep="|")
    known = set(NIH_LABELS) | {"No Finding"}
    unknown = sorted(set(found.columns) - known)
    if unknown:
        raise CohortError(f"{csv.name}: unknown finding(s) {unknown} in 'Finding Labels'; expected {sorted(known)}")
    labels = list(NIH_LABELS) + (["No Finding"] if no_finding else [])
    found = found.reindex(columns=labels, fill_value=0).astype(float)
    df = pd.DataFrame({"image_id": raw["Image Index"].astype(str), "patient_id": raw["Patient ID"].astype(str),
                       "study_id": raw["Image Index"].astype(str), "sex": raw["Patient Gender"].str.upper()})
    df = df.join(found)
    bad_sex = ~df["sex"].isin(["M", "F"])
    counts["images_sex_not_mf"] = int(bad_sex.sum())
    df = df.loc[~bad_sex]
    n_sex = df.groupby("patient_id")["sex"].nunique()
    conflict = n_sex.index[n_sex > 1]
    in_conflict = df["patient_id"].isin(conflict)
    counts["patients_conflicting_sex"] = int(len(conflict))
    counts["images_conflicting_sex"] = int(in_conflict.sum())
    df = df.loc[~in_conflict].reset_index(drop=True)
    counts["images_used"] = len(df)
    counts["patients_used"] = int(df["patient_id"].nunique())
    return df, labels, counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="NIH Data_Entry_2017*.csv(.gz)")
    ap.add_argument("--out", type=Path, help="folder for confounders.json / confounders.md")
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=2021)
    ap.add_argument("--models", nargs="+", default=list(cf.B3_MODELS), choices=cf.B3_MODELS)
    ap.add_argument("--n-jobs", type=int, default=1, help="parallel CV fits")
    ap.add_argument("--no-finding", action=argparse.BooleanOptionalAction, default=True,
                    help="include 'No Finding' as a 15th feature (default yes)")
    args = ap.parse_args(argv)
    if not args.csv.exists():
        print(f"error: {args.csv} not found; pass --csv", file=sys.stderr)
        return 2
    try:
        t0 = time.perf_counter()
        df, labels, counts = nih_label_table(args.csv, no_finding=args.no_finding)
        print(f"label table: {counts} ({time.perf_counter() - t0:.1f} s)")
        parts, times = [], {}
        for model in args.models:
            t = time.perf_counter()
            parts.append(cf.labels_models(df, target="sex", label_cols=labels, seed=args.seed,
                                          models=(model,), n_bootstrap=args.n_bootstrap, n_jobs=args.n_jobs))
            times[model] = round(time.perf_counter() - t, 1)
            print(f"{model}: {times[model]} s", flush=True)
        # the bootstrap alone, on the last model's predictions
        last = parts[-1]
        t = time.perf_counter()
        evaluate_predictions(last["predictions"].drop(columns="model"), classes=last["classes"],
                             n_bootstrap=args.n_bootstrap, seed=args.seed)
        t_boot = round(time.perf_counter() - t, 1)
    except ReadingRaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    res = dict(parts[0])
    res["models"] = {k: v for p in parts for k, v in p["models"].items()}
    res["auc_table"] = pd.concat([p["auc_table"] for p in parts], ignore_index=True)
    res["predictions"] = pd.concat([p["predictions"] for p in parts], ignore_index=True)
    res["exclusions"] = counts
    res["wall_time_s"] = {**times, f"evaluate_predictions ({args.n_bootstrap} bootstrap replicates)": t_boot,
                          "total": round(time.perf_counter() - t0, 1)}
    print(cf.confounders_markdown(res))
    print(f"wall time (s): {res['wall_time_s']}")
    if args.out:
        paths = cf.write_confounders(res, args.out)
        print(f"wrote {paths['json']} and {paths['markdown']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

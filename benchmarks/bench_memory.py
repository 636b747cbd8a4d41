"""Benchmark: peak memory building and loading a cohort table 1x vs 10x larger.

Each measurement runs in a fresh subprocess and reads the peak resident set size (VmHWM in
/proc/self/status, else ru_maxrss). "baseline" imports the code (python, numpy, pandas,
readingrace.cohort) and stops; "build" additionally reads the NIH ``Data_Entry`` metadata with the
``nih`` source's reader, turns every row into a cohort row (image_id, path, patient_id, study_id,
dataset, race, sex, age, view, split, 15 finding labels) and writes ``cohort.csv``; "load" reads
that ``cohort.csv`` back with the dtypes the pipeline uses. 1x = the real metadata file (112,120
rows) when ``../shared/data`` is present, else a generated one of the same shape; 10x = the same
rows repeated ten times with new image and patient ids. Reported: the peak above the baseline for
each step and size; its ratio 10x / 1x (linear scaling gives ~10); that ratio divided by 10, i.e.
peak memory per row at 10x relative to 1x (the goal "<= 1.2x": no more than 20% worse than linear);
and the peak increment per byte of the final table (``DataFrame.memory_usage(deep=True)``), the
transient overhead of building or reading it.
Run: ``python benchmarks/bench_memory.py`` (options: --factor 10).
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, emit  # noqa: E402

CHILD = r'''
import json, resource, sys
def peak():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
import numpy as np, pandas as pd
from readingrace.cohort.sources.nih import read_metadata
from readingrace.cohort.schema import NIH_LABELS
step, meta, out = sys.argv[1], sys.argv[2], sys.argv[3]
rows = table = 0
if step == "build":
    raw = read_metadata(meta)
    df = pd.DataFrame({
        "image_id": raw["Image Index"].str.strip(), "path": "images/" + raw["Image Index"].str.strip(),
        "patient_id": raw["Patient ID"].str.strip(), "dataset": "nih", "race": np.nan,
        "sex": raw["Patient Gender"].str.strip().str.upper(), "age": pd.to_numeric(raw["Patient Age"], errors="coerce"),
        "bmi": np.nan, "view": raw["View Position"].str.strip().str.upper(), "split": "train"})
    df["study_id"] = df["image_id"]
    findings = raw["Finding Labels"].fillna("").str.split("|")
    for label in (*NIH_LABELS, "No Finding"):
        df[label] = findings.map(lambda xs, lab=label: float(lab in xs))
    del raw, findings
    df.to_csv(out, index=False)
    rows, table = len(df), int(df.memory_usage(deep=True).sum())
elif step == "load":
    df = pd.read_csv(out, dtype={"image_id": str, "path": str, "patient_id": str, "study_id": str,
                                 "dataset": "category", "sex": "category", "view": "category", "split": "category"})
    rows, table = len(df), int(df.memory_usage(deep=True).sum())
print(json.dumps({"peak": peak(), "rows": rows, "table": table}))
'''


def metadata(tmp: Path, factor: int) -> Path:
    """The NIH metadata (real when present, else generated), repeated ``factor`` times."""
    real = SHARED_DATA / "nih-cxr14-sample" / "Data_Entry_2017_v2020.csv.gz"
    if real.is_file():
        with gzip.open(real, "rt") as f:
            header, *lines = f.read().splitlines()
    else:
        header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                  "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
        lines = [f"{i // 4 + 1:08d}_{i % 4:03d}.png,No Finding|Effusion,{i % 4},{i // 4 + 1},{20 + i % 60},"
                 f"{'MF'[i % 2]},{'PA' if i % 3 else 'AP'},2500,2048,0.143,0.143" for i in range(112_120)]
    out = tmp / f"Data_Entry_2017_x{factor}.csv"
    with open(out, "w") as f:
        f.write(header + "\n")
        for k in range(factor):
            for line in lines:
                name, rest = line.split(",", 1)
                fields = rest.split(",")
                if k:
                    name = f"r{k}_{name}"
                    fields[2] = f"{k}{int(fields[2]):08d}"   # Patient ID: new patients per copy
                f.write(name + "," + ",".join(fields) + "\n")
    return out


def measure(step: str, meta: Path, cohort: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, step, str(meta), str(cohort)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factor", type=int, default=10)
    args = ap.parse_args(argv)
    mib = 2**20
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        res = {}
        for factor in (1, args.factor):
            meta = metadata(tmp, factor)
            cohort = tmp / f"cohort_x{factor}.csv"
            base = measure("baseline", meta, cohort)["peak"]
            build = measure("build", meta, cohort)
            load = measure("load", meta, cohort)
            res[factor] = {"baseline": base, "build": build, "load": load}
    print("peak RSS above the interpreter + imports baseline (fresh process per step)")
    out: dict = {}
    for factor, r in res.items():
        for step in ("build", "load"):
            inc = r[step]["peak"] - r["baseline"]
            out[f"{step}_x{factor}_mib"] = inc / mib
            out[f"{step}_x{factor}_table_mib"] = r[step]["table"] / mib
            print(f"  {step:<5} x{factor:<3} {r[step]['rows']:>9,} rows: peak +{inc / mib:8.1f} MiB "
                  f"(table {r[step]['table'] / mib:7.1f} MiB, peak/table {inc / r[step]['table']:.2f}; "
                  f"baseline {r['baseline'] / mib:.0f} MiB)")
    f = args.factor
    for step in ("build", "load"):
        ratio = out[f"{step}_x{f}_mib"] / out[f"{step}_x1_mib"]
        over = out[f"{step}_x{f}_mib"] / out[f"{step}_x{f}_table_mib"]
        out[f"{step}_ratio"] = ratio
        out[f"{step}_peak_over_table_x{f}"] = over
        print(f"  {step}: peak increment x{f} / x1 = {ratio:.2f} (linear = {f}); per row x{f} vs x1 = "
              f"{ratio / f:.2f}x; peak / final table at x{f} = {over:.2f}x")
    emit("memory", {**out, "factor": f, "rows_x1": res[1]["build"]["rows"],
                    "ratio": out["load_ratio"] / f, "goal": "<= 1.2x per row (10x cohort vs 1x)"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

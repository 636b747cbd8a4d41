"""Benchmark: the small-budget paper suite on the NIH sample (total wall time, data vs compute).

Runs ``readingrace suite paper --budget small --attribute sex --data nih=<NIH sample>`` in a fresh
output folder and reports the total wall time and its split: compute = the sum of the training
times recorded by every run (``seed-*/train_result.json`` "seconds"); the rest (cohort building,
image cache, prediction, statistics, reports) is counted as data and evaluation. Skips with a
message (exit 0) when the ``readingrace suite`` command or the NIH sample is missing.
Run: ``python benchmarks/bench_suite.py`` (options: --timeout 3600 --shard 1/1 --only C1).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, emit  # noqa: E402


def cli() -> list[str]:
    exe = Path(sys.executable).with_name("readingrace")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "readingrace.cli"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--shard", default=None)
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("--keep", type=Path, default=None, help="keep the suite output in this folder")
    args = ap.parse_args(argv)
    nih = SHARED_DATA / "nih-cxr14-sample"
    probe = subprocess.run([*cli(), "suite", "--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        print("SKIPPED: the `readingrace suite` command does not exist in this version")
        emit("suite", {"skipped": "no `readingrace suite` command"})
        return 0
    if not nih.is_dir():
        print(f"SKIPPED: the NIH sample is not present ({nih})")
        emit("suite", {"skipped": "NIH sample absent"})
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="bench-suite-"))
    out = args.keep or tmp / "suite"
    cmd = [*cli(), "suite", "paper", "--budget", "small", "--attribute", "sex", "--data", f"nih={nih}",
           "--out", str(out)]
    if args.shard:
        cmd += ["--shard", args.shard]
    for o in args.only:
        cmd += ["--only", o]
    print("running:", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"TIMEOUT after {args.timeout} s")
        emit("suite", {"skipped": f"timeout after {args.timeout} s"})
        return 1
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n")
        emit("suite", {"failed": proc.returncode, "wall_s": wall})
        return 1
    results = [json.loads(p.read_text()) for p in out.rglob("train_result.json")]
    train_s = sum(float(r.get("seconds", 0.0)) for r in results)
    share = train_s / wall if wall else float("nan")
    print(f"small suite on the NIH sample: {wall:.0f} s wall, {len(results)} trained models")
    print(f"  training (compute)              : {train_s:8.0f} s ({share:.0%})")
    print(f"  data, evaluation, reports (rest): {wall - train_s:8.0f} s ({1 - share:.0%})")
    emit("suite", {"wall_s": wall, "models": len(results), "train_s": train_s, "compute_share": share,
                   "ratio": share})
    if args.keep is None:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

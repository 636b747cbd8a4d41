"""Run every benchmark (each in a fresh process, one after another) and write the results.

Writes ``benchmarks/results.json`` (machine info + each benchmark's numbers and ratio) and
``benchmarks/results.md`` (a short table). Each benchmark compares its variants side by side in one
run, so the ratios hold on a busy machine even when absolute speeds do not.
Run: ``make bench`` or ``python benchmarks/run_all.py`` (options: --quick, --skip NAME ...).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine  # noqa: E402

#: name -> (script, full arguments, --quick arguments)
BENCHMARKS = {
    "data_path": ("bench_data.py", [], ["--n", "256", "--epochs", "2"]),
    "filters": ("bench_filters.py", [], ["--n", "128", "--repeats", "2"]),
    "training_step": ("bench_train.py", [], ["--steps", "6", "--warmup", "2", "--rounds", "1", "--variant-steps", "2"]),
    "memory": ("bench_memory.py", [], ["--factor", "10"]),
    "evaluate": ("bench_evaluate.py", [], ["--bootstrap", "200", "--naive", "10"]),
    "suite": ("bench_suite.py", [], ["--only", "A1"]),
}


def parse(name: str, text: str) -> dict:
    """The RESULT line of our scripts, or the ratio lines of the older ones."""
    for line in reversed(text.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    if name == "filters":
        ips = dict(re.findall(r"^(numpy per-image loop|torch batched rfft2)\s*:\s*([\d.]+)", text, re.M))
        m = re.search(r"ratio torch / numpy\s*:\s*([\d.]+)x", text)
        d = re.search(r"max abs diff\s*:\s*([\d.e+-]+)", text)
        return {"numpy_ips": float(ips.get("numpy per-image loop", "nan")),
                "torch_ips": float(ips.get("torch batched rfft2", "nan")),
                "ratio": float(m.group(1)) if m else None, "max_abs_diff": float(d.group(1)) if d else None}
    if name == "evaluate":
        m = re.search(r"ratio naive / readingrace:\s*([\d.]+)x", text)
        t = re.search(r"evaluate_file \(end to end\):\s*([\d.]+) s", text)
        return {"ratio": float(m.group(1)) if m else None, "seconds": float(t.group(1)) if t else None}
    return {}


def headline(name: str, r: dict) -> str:
    if r.get("skipped"):
        return f"skipped: {r['skipped']}"
    if name == "data_path":
        return f"{r['cached_ips']:.0f} vs {r['decode_ips']:.0f} img/s -> {r['ratio']:.1f}x (goal >= 10x)"
    if name == "filters":
        return f"{r['torch_ips']:.0f} vs {r['numpy_ips']:.0f} img/s -> {r['ratio']:.2f}x (max diff {r['max_abs_diff']:.1e})"
    if name == "training_step":
        i = r["images_per_s"]
        return (f"overhead {r['overhead']:+.1%} (goal <= 20%); fp32 {i['bare']:.1f}, bf16 {i['bf16']:.1f} "
                f"({r['bf16_vs_fp32']:.2f}x), channels_last {i['channels_last']:.1f} ({r['channels_last_vs_fp32']:.2f}x) "
                f"img/s, {r['threads']} thread(s)")
    if name == "memory":
        return (f"peak above baseline x10/x1: build {r['build_ratio']:.2f}, load {r['load_ratio']:.2f} "
                f"(per row {r['build_ratio'] / r['factor']:.2f}x / {r['ratio']:.2f}x, goal <= 1.2x)")
    if name == "evaluate":
        return f"{r['seconds']:.1f} s end to end; {r['ratio']:.1f}x faster than a naive loop"
    if name == "suite":
        return f"{r['wall_s']:.0f} s wall, {r['models']} models, compute share {r['compute_share']:.0%}"
    return json.dumps(r)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (minutes, not tens of minutes)")
    ap.add_argument("--skip", action="append", default=[], choices=sorted(BENCHMARKS))
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    args = ap.parse_args(argv)
    results: dict = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                     "machine": machine(), "quick": args.quick, "benchmarks": {}}
    failed = []
    for name, (script, full, quick) in BENCHMARKS.items():
        if name in args.skip:
            results["benchmarks"][name] = {"skipped": "--skip"}
            continue
        cmd = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        print(proc.stdout, end="", flush=True)
        r = {**parse(name, proc.stdout), "seconds_total": round(time.perf_counter() - t0, 1),
             "args": cmd[2:]}
        if proc.returncode != 0:
            r["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            failed.append(name)
            print(proc.stderr[-2000:], file=sys.stderr)
        results["benchmarks"][name] = r
    results["machine"]["load_average_end"] = machine().get("load_average")
    args.out.write_text(json.dumps(results, indent=2, default=float))
    m = results["machine"]
    lines = [f"# Benchmark results ({results['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m.get('torch')}, Python {m['python']}, "
             f"AVX512-BF16 {m.get('avx512_bf16')}, AMX {m.get('amx_bf16')}; load average at start "
             f"{m.get('load_average')}, at end {m.get('load_average_end')}.", "",
             "| benchmark | result |", "|---|---|"]
    for name, r in results["benchmarks"].items():
        try:
            text = "FAILED: " + r["error"] if "error" in r else headline(name, r)
        except (KeyError, TypeError) as exc:
            text = f"incomplete result ({exc})"
        lines.append(f"| {name} | {text} |")
    md = args.out.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out} and {md}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

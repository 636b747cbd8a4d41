"""Coverage of readingrace's AUC confidence intervals on simulated data with a known true AUC.

Binormal model with patients: a patient is positive or negative; each of their images has score
``mu * y + b_patient + e_image`` with ``b ~ N(0, icc)`` and ``e ~ N(0, 1 - icc)``, so every image's
score is N(mu * y, 1) and the true image-level AUC is Phi(mu / sqrt(2)) whatever the clustering.
For each setting, many datasets are drawn with a fixed seed; for each we compute

* the patient-clustered stratified percentile bootstrap (readingrace's main CI),
* the same bootstrap resampling images (ignoring patients), on clustered settings only,
* DeLong with the logit-scale Wald interval (readingrace's default) and with the plain one,

and print the share of intervals that contain the true AUC (target: the nominal 95%), with its
Monte-Carlo standard error and the mean interval width. DeLong ignores clustering, so on clustered
data its coverage is expected to fall short.

Usage: python scripts/coverage_simulation.py [--datasets 1000] [--bootstrap 1000] [--seed 2021]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import stats

from readingrace.stats.intervals import cluster_bootstrap_auc, delong_auc


@dataclass(frozen=True)
class Setting:
    name: str
    n_pos: int          # positive patients
    n_neg: int          # negative patients
    mean_images: float  # mean images per patient (1 = unclustered)
    icc: float          # share of score variance shared by a patient's images
    true_auc: float

    @property
    def mu(self) -> float:
        return math.sqrt(2.0) * float(stats.norm.ppf(self.true_auc))


SETTINGS = (
    Setting("unclustered, AUC 0.80, 150+/250- images", 150, 250, 1.0, 0.0, 0.80),
    Setting("unclustered, AUC 0.95, 150+/250- images", 150, 250, 1.0, 0.0, 0.95),
    Setting("clustered (mean 4 img/patient, ICC 0.6), AUC 0.80, 100+/150- patients", 100, 150, 4.0, 0.6, 0.80),
    Setting("clustered (mean 4 img/patient, ICC 0.6), AUC 0.95, 100+/150- patients", 100, 150, 4.0, 0.6, 0.95),
    Setting("clustered (mean 4 img/patient, ICC 0.6), AUC 0.95, 300+/450- patients", 300, 450, 4.0, 0.6, 0.95),
)


def simulate(s: Setting, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, scores and patient ids of one dataset."""
    y_pat = np.r_[np.ones(s.n_pos, bool), np.zeros(s.n_neg, bool)]
    n_pat = y_pat.size
    k = np.ones(n_pat, int) if s.mean_images <= 1 else 1 + rng.poisson(s.mean_images - 1.0, n_pat)
    patient = np.repeat(np.arange(n_pat), k)
    b = rng.normal(0.0, math.sqrt(s.icc), n_pat) if s.icc > 0 else np.zeros(n_pat)
    e = rng.normal(0.0, math.sqrt(1.0 - s.icc), patient.size)
    y = y_pat[patient]
    score = s.mu * y + b[patient] + e
    return y, score, patient


def run(n_datasets: int, n_bootstrap: int, seed: int, level: float = 0.95) -> Iterator[dict[str, object]]:
    """Yield one row per (setting, method), a setting at a time."""
    for idx, s in enumerate(SETTINGS):
        rng = np.random.default_rng([seed, idx])
        clustered = s.mean_images > 1
        methods = ["bootstrap (patients)", "DeLong logit", "DeLong plain"]
        if clustered:
            methods.insert(1, "bootstrap (images, ignores patients)")
        hits = {m: 0 for m in methods}
        widths = {m: 0.0 for m in methods}
        t0 = time.perf_counter()
        for d in range(n_datasets):
            y, score, patient = simulate(s, rng)
            cis = {
                "bootstrap (patients)": cluster_bootstrap_auc(
                    y, score, patient, n_bootstrap=n_bootstrap, seed=seed + d, level=level).ci,
                "DeLong logit": delong_auc(y, score, level=level, transform="logit").ci,
                "DeLong plain": delong_auc(y, score, level=level, transform="none").ci,
            }
            if clustered:
                cis["bootstrap (images, ignores patients)"] = cluster_bootstrap_auc(
                    y, score, None, n_bootstrap=n_bootstrap, seed=seed + d, level=level).ci
            for m, (lo, hi) in cis.items():
                hits[m] += int(lo <= s.true_auc <= hi)
                widths[m] += hi - lo
        elapsed = time.perf_counter() - t0
        for m in methods:
            cov = hits[m] / n_datasets
            yield {"setting": s.name, "method": m, "coverage": cov,
                   "mc_se": math.sqrt(cov * (1 - cov) / n_datasets),
                   "mean_width": widths[m] / n_datasets, "seconds": elapsed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", type=int, default=1000, help="datasets per setting (default 1000)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (default 1000)")
    ap.add_argument("--seed", type=int, default=2021)
    args = ap.parse_args(argv)
    print(f"coverage of nominal 95% intervals: {args.datasets} datasets per setting, "
          f"{args.bootstrap} bootstrap replicates, seed {args.seed}")
    current = None
    for r in run(args.datasets, args.bootstrap, args.seed):
        if r["setting"] != current:
            current = r["setting"]
            print(f"\n{current}  ({r['seconds']:.0f} s)", flush=True)
        print(f"  {r['method']:<40} coverage {100 * r['coverage']:5.1f}% "
              f"(MC SE {100 * r['mc_se']:.1f})  mean width {r['mean_width']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

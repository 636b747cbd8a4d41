"""Benchmark: evaluating a 38,240-image, 3-class predictions file with 1,000 bootstrap replicates.

Times ``readingrace.evaluate.evaluate_file`` end to end (read, validate, point metrics, DeLong,
patient-clustered stratified bootstrap of AUC/sensitivity/specificity/macro AUC, write JSON), then
a naive loop (per replicate: draw patients, gather their images, call scikit-learn's
``roc_auc_score`` and ``recall_score`` per class) on a few replicates, extrapolated to the same
count, and prints the ratio. Run: ``python benchmarks/bench_evaluate.py`` (options: --rows 38240
--bootstrap 1000 --naive 25 --seed 2021). Target: < 30 s for the vectorised path on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import recall_score, roc_auc_score

from readingrace.evaluate import evaluate_file

CLASSES = ("Asian", "Black", "White")


def make_predictions(n_rows: int, seed: int) -> pd.DataFrame:
    """A synthetic test set: patients with 1 + Poisson(2) images, softmax probabilities (AUC ~0.9)."""
    rng = np.random.default_rng(seed)
    sizes = 1 + rng.poisson(2.0, n_rows)
    sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), n_rows)) + 1]
    patient = np.repeat(np.arange(sizes.size), sizes)[:n_rows]
    lab_pat = rng.choice(3, size=sizes.size, p=[0.1, 0.2, 0.7])
    y = lab_pat[patient]
    logits = rng.normal(size=(n_rows, 3)) + rng.normal(scale=0.8, size=(sizes.size, 3))[patient]
    logits[np.arange(n_rows), y] += 2.0
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    df = pd.DataFrame({
        "image_id": [f"img{i:06d}" for i in range(n_rows)],
        "patient_id": [f"pat{j:06d}" for j in patient],
        "label": np.asarray(CLASSES)[y],
    })
    for k, c in enumerate(CLASSES):
        df[f"prob_{c}"] = p[:, k]
    return df


def naive_replicates(df: pd.DataFrame, n_rep: int, seed: int) -> float:
    """Seconds per replicate of a per-replicate scikit-learn loop (stratified patient resampling)."""
    rng = np.random.default_rng(seed)
    groups = df.groupby("patient_id", sort=False).indices
    patients = list(groups)
    first_label = df.groupby("patient_id", sort=False)["label"].first().to_numpy()
    strata = {c: np.flatnonzero(first_label == c) for c in CLASSES}
    labels = df["label"].to_numpy()
    probs = df[[f"prob_{c}" for c in CLASSES]].to_numpy()
    t0 = time.perf_counter()
    for _ in range(n_rep):
        chosen = np.concatenate([rng.choice(ix, size=ix.size, replace=True) for ix in strata.values()])
        rows = np.concatenate([groups[patients[j]] for j in chosen])
        aucs = []
        for k, c in enumerate(CLASSES):
            pos = labels[rows] == c
            aucs.append(roc_auc_score(pos, probs[rows, k]))
            recall_score(pos, probs[rows, k] >= 0.5)       # sensitivity
            recall_score(~pos, probs[rows, k] < 0.5)       # specificity
        float(np.mean(aucs))
    return (time.perf_counter() - t0) / n_rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=38_240)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--naive", type=int, default=25, help="naive replicates actually timed")
    ap.add_argument("--seed", type=int, default=2021)
    args = ap.parse_args(argv)

    df = make_predictions(args.rows, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "predictions.csv"
        df.to_csv(csv, index=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            m = evaluate_file(csv, out_dir=Path(tmp) / "out", n_bootstrap=args.bootstrap, seed=args.seed)
            ours = time.perf_counter() - t0
    per_rep = naive_replicates(df, args.naive, args.seed)
    naive_total = per_rep * args.bootstrap
    print(f"{args.rows} images, {m['n_patients']} patients, {len(CLASSES)} classes, {args.bootstrap} replicates")
    print(f"  readingrace evaluate_file (end to end): {ours:8.2f} s")
    print(f"  naive sklearn loop: {per_rep * 1000:.1f} ms/replicate over {args.naive} replicates "
          f"-> {naive_total:8.1f} s extrapolated to {args.bootstrap}")
    print(f"  ratio naive / readingrace: {naive_total / ours:.1f}x")
    for c in CLASSES:
        pc = m["per_class"][c]
        direct = roc_auc_score(df["label"] == c, df[f"prob_{c}"])
        assert abs(pc["auc"] - direct) < 1e-12, (c, pc["auc"], direct)
        print(f"  {c:<6} AUC {pc['auc']:.4f} [{pc['auc_ci'][0]:.4f}, {pc['auc_ci'][1]:.4f}] "
              f"(DeLong [{pc['auc_ci_delong'][0]:.4f}, {pc['auc_ci_delong'][1]:.4f}])")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""A3 on real data: a pathology model's frozen features probed for sex, beside a model trained for sex.

NIH ChestX-ray14 has no race, so sex stands in for it (the same pipeline and statistics). Steps:

1. Count NIH patients with >= 20 frontal images in the *full* metadata (all 112,120 rows): the
   paper's re-identification criterion. The 909-image sample has too few such patients, so the
   re-identification model runs on a generated cohort (step 5).
2. Cohort: ``examples/nih_sex.yaml`` (64 px), with one patient split 80/10/10 stratified by sex,
   seed 2021, shared by every model below so that all are tested on the same images, which the
   pathology model never trained on.
3. Pathology model: multi-label (14 NIH findings, masked BCE, policy ``ignore``: NIH has no
   uncertain labels, so no entry is masked), DenseNet121 by default, per-label test AUC.
4. Sex probes on its frozen penultimate features (new softmax layer; logistic regression with C by
   patient-grouped CV), beside a sex model trained directly (``run_experiment`` with the
   nih_sex.yaml recipe, one seed, same split; or ``--direct-run`` to reuse a run folder), with
   bootstrap CIs and the paired difference.
5. Re-identification on a generated cohort: 40 patients with 20-25 images each (identity
   classifier, image split within patients: the sanctioned exception), then the group (race) probe
   on features of 400 other patients it never saw (default) and, flagged, on its own patients
   (the paper's variant); the same probe on a randomly initialised network as the control.

    python scripts/nih_pathology_probe.py --data-root ../shared/data/nih-cxr14-sample --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from readingrace.cohort.schema import NIH_LABELS
from readingrace.cohort.sources.nih import find_metadata, read_metadata
from readingrace.cohort.sources.synthetic import render_cohort
from readingrace.config import AugmentConfig, TrainConfig, load_config
from readingrace.errors import ReadingRaceError, SplitError
from readingrace.experiments.run import prepare, run_experiment
from readingrace.features import extract_features
from readingrace.models import build_model
from readingrace.multilabel import (
    evaluate_multilabel,
    label_matrix,
    load_multilabel,
    predict_multilabel,
    train_multilabel,
    train_reid,
)
from readingrace.probe import compare_with_direct, probe_markdown, run_probe
from readingrace.report.markdown import fmt_ci
from readingrace.stats.metrics import evaluate_predictions, to_json_dict

REPO = Path(__file__).resolve().parents[1]
SPLIT = [0.8, 0.1, 0.1]


def count_reid_patients(root: Path, *, min_images: int = 20) -> dict[str, int]:
    """Patients with >= ``min_images`` images (all views, and frontal AP/PA only) in the full metadata."""
    meta = read_metadata(find_metadata(root))
    per = meta.groupby("Patient ID").size()
    frontal = meta[meta["View Position"].astype(str).str.strip().str.upper().isin(["AP", "PA"])]
    per_f = frontal.groupby("Patient ID").size()
    return {"metadata_rows": int(len(meta)), "patients": int(per.size),
            f"patients_with_>={min_images}_images": int((per >= min_images).sum()),
            f"patients_with_>={min_images}_frontal_images": int((per_f >= min_images).sum()),
            "images_of_those_patients_frontal": int(per_f[per_f >= min_images].sum())}


def pathology(prep, out: Path, args, say) -> tuple[np.ndarray, pd.DataFrame, dict]:
    cohort = prep.cohort
    cache = cohort["cache_index"].to_numpy()
    values = np.full((len(prep.images), len(NIH_LABELS)), np.nan, dtype=np.float32)
    values[cache] = label_matrix(cohort, NIH_LABELS)
    tr, va, te = (cache[prep.index(s)] for s in ("train", "val", "test"))
    cfg = TrainConfig(batch_size=32, max_epochs=args.epochs, early_stopping_patience=3, lr_patience=2,
                      precision="auto", num_threads=args.threads)
    say(f"pathology model: {args.arch} at {prep.images.shape[-1]} px on {len(NIH_LABELS)} findings "
        f"({len(tr)} train / {len(va)} val / {len(te)} test images), at most {args.epochs} epochs")
    res = train_multilabel(images=prep.images, values=values, train_index=tr, val_index=va,
                           label_names=list(NIH_LABELS), arch=args.arch, cfg=cfg, seed=2021,
                           out_dir=out / "pathology", policy="ignore")
    model = load_multilabel(out / "pathology" / res.best_checkpoint)
    probs = predict_multilabel(model, prep.images, te)
    table = evaluate_multilabel(cohort.iloc[prep.index("test")], probs, values[te], list(NIH_LABELS),
                                n_bootstrap=args.n_bootstrap)
    say(f"pathology: {res.epochs} epochs in {res.seconds:.0f} s; mean per-label test AUC "
        f"{np.nanmean(table['auc']):.3f} over {int(table['auc'].notna().sum())} labels with positives")
    t0 = time.perf_counter()
    feats = extract_features(model, prep.images, cache)
    say(f"features: {feats.shape} in {time.perf_counter() - t0:.1f} s")
    info = {"arch": args.arch, "policy": "ignore", "epochs": res.epochs, "best_val_loss": res.best_val_loss,
            "seconds": res.seconds, "mean_label_auc": float(np.nanmean(table["auc"]))}
    return feats, table, info


def direct_model(args, out: Path, say) -> tuple[pd.DataFrame, str]:
    if args.direct_run:
        path = Path(args.direct_run) / "predictions.csv"
        return pd.read_csv(path, dtype={"image_id": str, "patient_id": str}), f"reused {args.direct_run}"
    cfg = direct_config(args)
    run_experiment(cfg, out=out / "direct-sex", data_root=args.data_root, say=say)
    pred = pd.read_csv(out / "direct-sex" / "predictions.csv", dtype={"image_id": str, "patient_id": str})
    return pred, f"{cfg.model.name}, nih_sex.yaml recipe, seed 2021, split {SPLIT}"


def direct_config(args):
    cfg = load_config(REPO / "examples" / "nih_sex.yaml",
                      overrides={"split": {"ratios": SPLIT}, "train": {"seeds": [2021]},
                                 "evaluate": {"n_bootstrap": args.n_bootstrap, "strata": [], "reference": False}})
    train = replace(cfg.train, num_threads=args.threads, max_epochs=args.direct_epochs or cfg.train.max_epochs)
    return replace(cfg, name="nih-sex-direct", train=train)


def reidentification(args, out: Path, say) -> tuple[dict, list[str]]:
    common = dict(size=64, groups=["Black", "White"], signal="texture", strength=1.0)
    t_a, im_a = render_cohort(n_patients=args.reid_patients, images_per_patient=(20, 25), seed=2021, site="reid",
                              **common)
    t_b, im_b = render_cohort(n_patients=args.other_patients, images_per_patient=(1, 3), seed=2022, site="other",
                              **common)
    cohort = pd.concat([t_a, t_b], ignore_index=True)
    images = np.concatenate([im_a, im_b]).astype(np.float32) / 255.0
    say(f"re-identification cohort (generated, texture signal): {len(t_a)} images of {args.reid_patients} patients "
        f"with 20-25 images; {len(t_b)} images of {args.other_patients} other patients")
    cfg = TrainConfig(batch_size=32, max_epochs=args.reid_epochs, early_stopping_patience=4, lr_patience=2,
                      precision="auto", num_threads=args.threads, augment=AugmentConfig(flip=True, rotate=0, zoom=0))
    res = train_reid(images=images, cohort=cohort, arch="resnet18", cfg=cfg, seed=2021, out_dir=out / "reid",
                     min_images=20)
    s = res.summary()
    lo, hi = s["test_top1_ci_wilson"]
    say(f"re-id: top-1 test accuracy {s['test_top1_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] (chance "
        f"{s['chance_top1']:.3f}), top-5 {s['test_top5_accuracy']:.3f}; {res.train.epochs} epochs, {res.train.seconds:.0f} s")
    from readingrace.train import load_classifier
    feats = extract_features(load_classifier(res.checkpoint), images, np.arange(len(images)))
    torch.manual_seed(2021)
    random_feats = extract_features(build_model("resnet18", 2), images, np.arange(len(images)))
    md = ["## Re-identification (generated cohort)", "",
          f"The NIH sample has too few patients with >= 20 images, so the re-identification model is trained on a "
          f"generated cohort: {args.reid_patients} patients with 20-25 images each (texture signal tied to the "
          "group), ResNet18 at 64 px, flip-only augmentation, image split 80/10/10 within patients "
          f"(`{res.split_policy}`).", "",
          f"- identity: top-1 test accuracy {s['test_top1_accuracy']:.3f} [{s['test_top1_ci_wilson'][0]:.3f}, "
          f"{s['test_top1_ci_wilson'][1]:.3f}] (Wilson), top-5 {s['test_top5_accuracy']:.3f}, chance "
          f"{s['chance_top1']:.3f}; {res.train.epochs} epochs", ""]
    results = {"reid": s}
    for name, f, variant in (("re-id features, unseen patients", feats, "unseen"),
                             ("re-id features, paper variant", feats, "paper"),
                             ("random-init ResNet18 features (control), unseen patients", random_feats, "unseen")):
        try:
            pr = run_probe(f, cohort, target="race", reid_patients=res.patients, reid_variant=variant,
                           n_bootstrap=args.n_bootstrap, seed=2021)
        except SplitError as exc:
            md.append(f"- {name}: not run ({exc})")
            say(f"{name}: not run ({exc})")
            continue
        results[name] = pr.to_dict()
        md.append(probe_markdown(pr, feature_model=name))
        for p, m in pr.metrics.items():
            say(f"{name}: {p} probe macro AUC {fmt_ci(m['macro_auc'], m['macro_auc_ci'])}")
    return results, md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "nih-cxr14-sample")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", default="densenet121", help="pathology network (paper: densenet121)")
    ap.add_argument("--epochs", type=int, default=10, help="pathology model: at most this many epochs")
    ap.add_argument("--direct-run", help="reuse this run folder's predictions.csv as the directly trained sex model")
    ap.add_argument("--direct-epochs", type=int, help="override the recipe's max_epochs (quick checks only)")
    ap.add_argument("--reid-patients", type=int, default=40)
    ap.add_argument("--reid-epochs", type=int, default=15)
    ap.add_argument("--other-patients", type=int, default=400, help="generated patients the re-id model never sees")
    ap.add_argument("--skip-reid", action="store_true")
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    t0 = time.perf_counter()
    try:
        counts = count_reid_patients(args.data_root)
        say(f"NIH full metadata: {counts}")
        prep = prepare(direct_config(args), data_root=args.data_root, say=say)
        feats, labels_table, path_info = pathology(prep, out, args, say)
        probe = run_probe(feats, prep.cohort, target="sex", split=prep.cohort["split"], n_bootstrap=args.n_bootstrap,
                          split_note="the pathology model's own patient split 80/10/10 (stratified by sex, seed "
                                     "2021): the probe trains on its training images and tests on images it never saw")
        for p, m in probe.metrics.items():
            say(f"sex from pathology features: {p} probe macro AUC {fmt_ci(m['macro_auc'], m['macro_auc_ci'])}")
        direct_pred, direct_desc = direct_model(args, out, say)
        direct_m = evaluate_predictions(direct_pred, classes=probe.classes, n_bootstrap=args.n_bootstrap, seed=2021)
        say(f"sex model trained directly: macro AUC {fmt_ci(direct_m['macro_auc'], direct_m['macro_auc_ci'])}")
        comparison = compare_with_direct(probe, direct_pred, n_bootstrap=args.n_bootstrap)
        for name, p in probe.predictions.items():
            p.to_csv(out / f"probe_sex_{name}.csv", index=False)
        md = ["# A3 on the NIH ChestX-ray14 sample: does a pathology model encode sex?", "",
              f"Full NIH metadata: {counts['metadata_rows']} images of {counts['patients']} patients; "
              f"**{counts['patients_with_>=20_frontal_images']} patients have >= 20 frontal images** "
              f"({counts['images_of_those_patients_frontal']} images), the paper's re-identification criterion.", "",
              "## Pathology model", "",
              f"{path_info['arch']} at {prep.images.shape[-1]} px, 14 NIH findings, masked BCE (policy `ignore`; "
              f"NIH has no uncertain labels), {path_info['epochs']} epochs ({path_info['seconds']:.0f} s), patient "
              f"split {SPLIT} stratified by sex. Per-label test AUC (certain labels only):", "",
              "| finding | AUC [95% CI] | positives / negatives in test |", "|---|---|---|"]
        for r in labels_table.itertuples():
            auc = fmt_ci(r.auc, [r.auc_ci_low, r.auc_ci_high]) if np.isfinite(r.auc) else "n/a (no positives in test)"
            md.append(f"| {r.label} | {auc} | {r.n_positive} / {r.n_negative} |")
        md += ["", "## Sex from the pathology model's frozen features", "",
               probe_markdown(probe, feature_model=f"{path_info['arch']} pathology model", direct=direct_m,
                              direct_name=f"sex model trained directly ({direct_desc})", comparison=comparison)]
        results = {"nih_counts": counts, "pathology": {**path_info, "per_label": labels_table.to_dict("records")},
                   "sex_probe": probe.to_dict(), "direct": to_json_dict(direct_m),
                   "comparison": to_json_dict(comparison)}
        if not args.skip_reid:
            reid_results, reid_md = reidentification(args, out, say)
            results["reidentification"] = to_json_dict(reid_results)
            md += reid_md
        md.append(f"\nThis invocation: wall time {time.perf_counter() - t0:.0f} s, CPU time {time.process_time():.0f} s "
                  f"({args.threads} torch thread(s)); models already trained in --out are reused, not retrained.")
    except ReadingRaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    (out / "a3_results.json").write_text(json.dumps(to_json_dict(results), indent=2))
    (out / "a3_report.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    say(f"wrote {out / 'a3_report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

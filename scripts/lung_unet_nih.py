#!/usr/bin/env python
"""Train the lung U-Net on the pediatric image/mask pairs, then look at its masks on adult NIH CXRs.

The lung-only / non-lung experiment (C3) needs lung masks for cohorts that have none. This script
trains :func:`readingrace.explain.lungs.train_lung_unet` on the real pediatric pairs (children aged
1-5, 256x256, masks 0/255), reports the Dice on held-out pairs, then predicts masks on a few adult
NIH ChestX-ray14 images (a child-to-adult domain gap: no NIH masks exist, so it is judged by eye
and by the predicted lung fraction) and writes a PNG panel with the masks overlaid.

    python scripts/lung_unet_nih.py OUT_DIR [--size 128] [--epochs 10] [--n-nih 12] [--threads 1]

Writes OUT_DIR/lung_unet.pt (weights: never commit them), lung_unet_report.json, nih_masks.png
(cleaned masks: two largest regions, holes filled), nih_masks_raw.png (thresholded network output)
and nih_masks.json (per image: lung fraction, number of raw connected regions).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from readingrace.errors import ReadingRaceError
from readingrace.explain.lungs import clean_masks, predict_lung_masks, read_pairs_csv, train_lung_unet
from readingrace.imaging.io import load_image, resize

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def panel(images: np.ndarray, masks: np.ndarray, titles: list[str], path: Path, *, ncols: int = 6) -> None:
    """A grid of images with the mask outline (red) and a translucent fill."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(images)
    cols = min(ncols, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(2.4 * cols, 2.6 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for k in range(n):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.set_axis_off()
        ax.imshow(images[k], cmap="gray", vmin=0, vmax=1)
        ax.imshow(np.ma.masked_where(~masks[k], masks[k]), cmap="autumn", alpha=0.35, vmin=0, vmax=1)
        ax.contour(masks[k].astype(float), levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(titles[k], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")


def components(mask: np.ndarray) -> int:
    from scipy import ndimage

    return int(ndimage.label(mask)[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output folder")
    ap.add_argument("--pairs", type=Path, default=DATA / "lung-masks-pediatric" / "pairs.csv")
    ap.add_argument("--nih", type=Path, default=DATA / "nih-cxr14-sample" / "images")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=2021)
    ap.add_argument("--n-nih", type=int, default=12, help="NIH images to segment (the first N by file name)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        pairs = read_pairs_csv(args.pairs)
        t0 = time.perf_counter()
        model, report = train_lung_unet(pairs, size=args.size, epochs=args.epochs, seed=args.seed,
                                        batch_size=args.batch_size, out_dir=args.out)
        print(f"trained on {report['n_train']} pairs in {time.perf_counter() - t0:.0f} s; held-out Dice "
              f"(n={report['n_heldout']}): mean {report['heldout_dice_mean']:.3f}, median "
              f"{report['heldout_dice_median']:.3f}, 10th percentile {report['heldout_dice_p10']:.3f}, "
              f"min {report['heldout_dice_min']:.3f}; lung fraction true {report['heldout_lung_fraction_true']:.3f}, "
              f"predicted {report['heldout_lung_fraction_pred']:.3f}")
        files = sorted(args.nih.glob("*.png"))[: args.n_nih]
        if not files:
            print(f"no NIH images in {args.nih}: skipped the adult panel", file=sys.stderr)
            return 0
        images = np.stack([resize(load_image(f), 256) for f in files])
        raw = predict_lung_masks(model, images, clean=False)
        masks = clean_masks(raw)
        fractions, raw_fractions = masks.mean(axis=(1, 2)), raw.mean(axis=(1, 2))
        regions = [components(m) for m in raw]
        titles = [f"NIH #{i}: lung {f:.2f} ({r} raw regions)" for i, (f, r) in enumerate(zip(fractions, regions))]
        panel(images, raw, [t.replace("NIH", "raw NIH") for t in titles], args.out / "nih_masks_raw.png")
        panel(images, masks, titles, args.out / "nih_masks.png")
        summary = {"n_images": len(files), "mean_lung_fraction": float(fractions.mean()),
                   "mean_lung_fraction_raw": float(raw_fractions.mean()),
                   "pediatric_heldout_lung_fraction": report["heldout_lung_fraction_true"],
                   "per_image": [{"panel_index": i, "lung_fraction": float(f), "raw_regions": r}
                                 for i, (f, r) in enumerate(zip(fractions, regions))]}
        (args.out / "nih_masks.json").write_text(json.dumps(summary, indent=2))
        print(f"held-out Dice without mask cleaning: {report['heldout_dice_mean_unclean']:.3f}")
        print(f"NIH ({len(files)} adult images): mean predicted lung fraction {fractions.mean():.3f} cleaned, "
              f"{raw_fractions.mean():.3f} raw (pediatric held-out truth {report['heldout_lung_fraction_true']:.3f}); "
              f"raw regions per mask {regions}; panels {args.out / 'nih_masks.png'}, nih_masks_raw.png")
    except ReadingRaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

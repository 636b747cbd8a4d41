"""Benchmark: the cached data path vs decoding and resizing every image every epoch.

Both loaders read the same PNG files and yield the same (1, S, S) tensors through a DataLoader
(batch 32, no workers, the training default). Cached = ``imaging.cache.build_cache`` (decode and
resize once, memory-mapped) + ``train.ArrayImages`` + ``train.make_loader``; baseline = a Dataset
that calls ``imaging.io.load_image`` + ``imaging.io.resize`` in ``__getitem__``. Uses the real NIH
sample PNGs (256x256) when ``../shared/data`` is present, else generated 8-bit PNGs of that size.
Prints images/s per epoch for each, the one-time cache build, and the ratio (goal >= 10x).
Run: ``python benchmarks/bench_data.py`` (options: --n 512 --size 64 --epochs 3).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, emit  # noqa: E402

from readingrace.imaging.cache import build_cache  # noqa: E402
from readingrace.imaging.io import load_image, resize  # noqa: E402
from readingrace.train import ArrayImages, make_loader  # noqa: E402


class DecodeEveryTime(Dataset):
    """The baseline: decode and resize in ``__getitem__``, every epoch."""

    def __init__(self, paths: list[str], labels: np.ndarray, size: int):
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = resize(load_image(self.paths[i]), self.size)
        return torch.from_numpy(img).unsqueeze(0), torch.tensor(self.labels[i]), torch.tensor(i)


def image_files(n: int, tmp: Path) -> tuple[list[str], str]:
    folder = SHARED_DATA / "nih-cxr14-sample" / "images"
    if folder.is_dir():
        files = sorted(str(p) for p in folder.glob("*.png"))[:n]
        if files:
            return files, f"NIH sample PNGs (256x256, {len(files)} files)"
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        p = tmp / f"img{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)).save(p)
        files.append(str(p))
    return files, f"generated 8-bit PNGs (256x256, {n} files)"


def epoch(loader: DataLoader) -> float:
    """Seconds to iterate one epoch (touching every batch)."""
    t0 = time.perf_counter()
    total = 0.0
    for x, _y, _i in loader:
        total += float(x[:, 0, 0, 0].sum())
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        files, what = image_files(args.n, tmp)
        n = len(files)
        labels = np.arange(n) % 2
        t0 = time.perf_counter()
        cache = build_cache(files, size=args.size, cache_root=tmp / "cache", workers=1)
        t_build = time.perf_counter() - t0
        cached = make_loader(ArrayImages(cache.images, labels), batch_size=args.batch, shuffle=True, seed=0)
        baseline = DataLoader(DecodeEveryTime(files, labels, args.size), batch_size=args.batch, shuffle=True,
                              num_workers=0)
        # same images? (decode + resize is what the cache stores)
        a = resize(load_image(files[0]), args.size)
        assert np.allclose(np.asarray(cache.images[0]), a, atol=1e-6), "cache and decoder disagree"
        t_cached, t_base = [], []
        for _ in range(args.epochs):   # interleaved, so load changes hit both alike
            t_base.append(epoch(baseline))
            t_cached.append(epoch(cached))
    ips_base, ips_cached = n / min(t_base), n / min(t_cached)
    print(f"{what}, {args.size} px, batch {args.batch}, best of {args.epochs} epochs, torch threads 1")
    print(f"  decode + resize every epoch : {ips_base:10.0f} images/s")
    print(f"  cached (memmap) loader      : {ips_cached:10.0f} images/s")
    print(f"  one-time cache build        : {t_build:10.2f} s ({n / t_build:.0f} images/s, 1 worker)")
    print(f"  ratio cached / decode       : {ips_cached / ips_base:10.1f}x  (goal >= 10x)")
    emit("data_path", {"images": n, "source": what, "size": args.size, "decode_ips": ips_base,
                       "cached_ips": ips_cached, "build_s": t_build, "ratio": ips_cached / ips_base,
                       "goal": ">= 10x"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

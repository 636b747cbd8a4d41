"""Benchmark: batched torch Fourier filter (rfft2) vs a per-image numpy loop.

Both paths filter the same images; the script checks they agree (max abs diff < 1e-4) and prints
images per second for each and the ratio. Run: ``python benchmarks/bench_filters.py``
(options: --n 256 --size 224 --kind lowpass --radius 25 --repeats 3 --device cpu).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from readingrace.imaging.perturb import fourier_filter


def numpy_mask(size: int, kind: str, radius: float) -> np.ndarray:
    """Kept-frequency mask on the centred spectrum, by numpy meshgrid distance (square image)."""
    yy, xx = np.meshgrid(np.arange(size) - size // 2, np.arange(size) - size // 2, indexing="ij")
    r = np.sqrt(yy**2 + xx**2)
    return r < radius if kind == "lowpass" else r >= radius


def numpy_loop(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The notebooks' way: one image at a time, fft2 + fftshift + mask + ifft2, real part."""
    out = np.empty_like(images)
    for i, img in enumerate(images):
        spec = np.fft.fftshift(np.fft.fft2(img)) * mask
        out[i] = np.fft.ifft2(np.fft.ifftshift(spec)).real
    return out


def best_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """Fastest of ``repeats`` timed calls, after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--kind", choices=["lowpass", "highpass"], default="lowpass")
    ap.add_argument("--radius", type=float, default=25.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(2021)
    images = rng.random((args.n, args.size, args.size), dtype=np.float32)
    device = torch.device(args.device)
    batch = torch.from_numpy(images).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    mask = numpy_mask(args.size, args.kind, args.radius)

    def torch_path() -> torch.Tensor:
        return fourier_filter(batch, kind=args.kind, radius=args.radius, reference_size=args.size)

    ref = numpy_loop(images, mask)
    got = torch_path().cpu().numpy()
    diff = float(np.abs(ref - got).max())

    t_np = best_time(lambda: numpy_loop(images, mask), args.repeats, lambda: None)
    t_torch = best_time(torch_path, args.repeats, sync)
    ips_np, ips_torch = args.n / t_np, args.n / t_torch
    print(
        f"{args.kind} d={args.radius:g}, {args.n} images at {args.size} px, torch threads "
        f"{torch.get_num_threads()}, device {device}"
    )
    print(f"numpy per-image loop : {ips_np:10.0f} images/s")
    print(f"torch batched rfft2  : {ips_torch:10.0f} images/s")
    print(f"ratio torch / numpy  : {ips_torch / ips_np:10.2f}x")
    print(f"max abs diff         : {diff:.2e}")
    if diff >= 1e-4:
        print("FAIL: the two paths disagree (max abs diff >= 1e-4)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

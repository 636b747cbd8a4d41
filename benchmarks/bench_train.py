"""Benchmark: readingrace's training loop vs a bare PyTorch loop; fp32 vs bf16 vs channels_last.

Same network (``models.build_model``), same batch size and images, Adam, cross-entropy, in one
process with the same torch thread count. readingrace = ``train.ImageClassifier`` fitted by a
Lightning Trainer over ``train.make_loader(ArrayImages)`` (augmentation off, so both do the same
arithmetic; the augmentation's own cost is reported separately), step time measured by a callback
between consecutive batch ends; bare = ``zero_grad / forward / loss / backward / step`` on one
preloaded batch. Medians of per-step times after warm-up; rounds are interleaved to share noise.
Overhead = readingrace step / bare step - 1 (goal <= 20%). Run: ``python benchmarks/bench_train.py``
(options: --arch resnet18 --size 64 --batch 32 --steps 10 --warmup 3 --threads 1 --rounds 2
--variant-steps 3).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

from readingrace.config import AugmentConfig  # noqa: E402
from readingrace.train import INPUT_MEAN, INPUT_STD, ArrayImages, ImageClassifier, augment_batch, make_loader, quiet_lightning  # noqa: E402


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, *args, **kwargs) -> None:  # noqa: D102
        self.stamps.append(time.perf_counter())


def lightning_steps(arch: str, images: np.ndarray, labels: np.ndarray, *, batch: int, steps: int, warmup: int,
                    augment: bool) -> list[float]:
    """Per-step seconds of readingrace's module + Lightning Trainer (after warm-up)."""
    torch.manual_seed(0)
    aug = AugmentConfig() if augment else AugmentConfig(flip=False, rotate=0.0, zoom=0.0)
    model = ImageClassifier(arch, 2, augment=vars(aug), seed=0)
    timer = StepTimer()
    trainer = L.Trainer(max_steps=warmup + steps, accelerator="cpu", devices=1, precision="32-true",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[timer])
    loader = make_loader(ArrayImages(images, labels), batch_size=batch, shuffle=True, seed=0)
    trainer.fit(model, loader)
    return list(np.diff(timer.stamps[warmup - 1:]))


def bare_steps(arch: str, x: torch.Tensor, y: torch.Tensor, *, steps: int, warmup: int, dtype: str = "fp32",
               channels_last: bool = False) -> list[float]:
    """Per-step seconds of a bare PyTorch loop on one batch."""
    from readingrace.models import build_model

    torch.manual_seed(0)
    net = build_model(arch, 2)
    net.train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = F.cross_entropy(net((x - INPUT_MEAN) / INPUT_STD).float(), y)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variant-steps", type=int, default=3,
                    help="timed steps for bf16 / channels_last (bf16 is emulated, slow, on CPUs without AVX512-BF16/AMX)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    import logging
    import warnings

    logging.getLogger("readingrace.models").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*validation_step.*")

    rng = np.random.default_rng(0)
    n = args.batch * (args.warmup + args.steps + 1)
    images = rng.random((n, args.size, args.size), dtype=np.float32)
    labels = rng.integers(0, 2, n)
    x = torch.from_numpy(images[: args.batch]).unsqueeze(1)
    y = torch.from_numpy(labels[: args.batch]).long()
    g = torch.Generator().manual_seed(0)
    kw = dict(steps=args.steps, warmup=args.warmup)
    res: dict[str, list[float]] = {k: [] for k in ("bare", "readingrace", "readingrace_augment", "bf16", "channels_last")}
    aug_times = []
    for _ in range(args.rounds):
        res["bare"] += bare_steps(args.arch, x, y, **kw)
        res["readingrace"] += lightning_steps(args.arch, images, labels, batch=args.batch, augment=False, **kw)
        res["readingrace_augment"] += lightning_steps(args.arch, images, labels, batch=args.batch, augment=True, **kw)
        vkw = dict(steps=args.variant_steps, warmup=1)
        res["bf16"] += bare_steps(args.arch, x, y, dtype="bf16", **vkw)
        res["channels_last"] += bare_steps(args.arch, x, y, channels_last=True, **vkw)
        for _ in range(10):
            t0 = time.perf_counter()
            augment_batch(x, AugmentConfig(), g)
            aug_times.append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in res.items()}
    ips = {k: args.batch / v for k, v in med.items()}
    overhead = med["readingrace"] / med["bare"] - 1
    print(f"{args.arch}, {args.size} px, batch {args.batch}, torch threads {torch.get_num_threads()}, "
          f"median of {args.rounds} x {args.steps} steps after {args.warmup} warm-up")
    for k, label in (("bare", "bare PyTorch loop, fp32"), ("readingrace", "readingrace + Lightning, fp32"),
                     ("readingrace_augment", "readingrace + Lightning + augmentation"),
                     ("bf16", "bare loop, bf16 autocast"), ("channels_last", "bare loop, channels_last fp32")):
        print(f"  {label:<40}: {ips[k]:8.1f} images/s ({med[k] * 1000:7.1f} ms/step)")
    print(f"  augmentation alone (augment_batch)      : {statistics.median(aug_times) * 1000:7.1f} ms/batch")
    print(f"  readingrace overhead vs bare loop       : {overhead * 100:+6.1f}%  (goal <= 20%)")
    print(f"  bf16 / fp32 speed                       : {ips['bf16'] / ips['bare']:6.2f}x")
    print(f"  channels_last / fp32 speed              : {ips['channels_last'] / ips['bare']:6.2f}x")
    emit("training_step", {"arch": args.arch, "size": args.size, "batch": args.batch,
                           "threads": torch.get_num_threads(), "images_per_s": ips,
                           "augment_ms_per_batch": statistics.median(aug_times) * 1000,
                           "overhead": overhead, "ratio": 1 + overhead, "goal": "overhead <= 20%",
                           "bf16_vs_fp32": ips["bf16"] / ips["bare"],
                           "channels_last_vs_fp32": ips["channels_last"] / ips["bare"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

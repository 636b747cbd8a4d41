#!/usr/bin/env bash
# GPU check: DenseNet121 (MONAI, 1 channel) training at 224 px, batch 64, bf16 autocast (images/s
# after warm-up), and the batched Fourier filter path on CUDA (images/s). Without a CUDA GPU it says
# so and exits 0. Written for torch >= 2.11 (no newer APIs); untested on a GPU by its author.
# Usage: bash benchmarks/gpu.sh [python]   (default: .venv/bin/python if present, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "no NVIDIA GPU found (nvidia-smi missing): nothing to measure"
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'PY'
import time
import torch
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} sees no CUDA device: nothing to measure")
    raise SystemExit(0)
from monai.networks.nets import DenseNet121
from readingrace.imaging.perturb import fourier_filter

dev = torch.device("cuda")
torch.backends.cudnn.benchmark = True
print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
      f"bf16 supported {torch.cuda.is_bf16_supported()}")

def timed(fn, n):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n

batch, size = 64, 224
net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=3).to(dev).to(memory_format=torch.channels_last)
opt = torch.optim.Adam(net.parameters(), lr=1e-3)
x = torch.rand(batch, 1, size, size, device=dev).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 3, (batch,), device=dev)

def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(net(x).float(), y)
    loss.backward()
    opt.step()

s = timed(step, 20)
print(f"DenseNet121 training, {size} px, batch {batch}, bf16 autocast: {batch / s:8.0f} images/s "
      f"({s * 1000:.1f} ms/step, peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)")

imgs = torch.rand(256, size, size, device=dev)
f = timed(lambda: fourier_filter(imgs, kind="lowpass", radius=25, reference_size=size), 20)
print(f"Fourier low-pass d=25, 256 images at {size} px: {256 / f:10.0f} images/s")
PY

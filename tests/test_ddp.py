"""Multi-process training through Lightning DDP on CPU (2 processes, gloo backend).

The DDP run is a subprocess running a small script: Lightning's "ddp" strategy starts the other
rank by re-running that script. Each rank records the global image indices of every training batch,
so the test can check that every training image is seen exactly once per epoch across the ranks,
that the per-epoch shuffle (EpochSampler.set_epoch) still reaches the sampler, and that only rank 0
writes results. The test AUC of the 2-process run must be within 0.02 of the 1-process run on the
same cohort and split, with the same effective batch (2 x 16 vs 1 x 32) and a fixed epoch schedule.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score
from torch.utils.data import DistributedSampler

SCRIPT = r'''
import json, os, sys
from pathlib import Path
import numpy as np
import torch

from readingrace import train as T
from readingrace.config import AugmentConfig, TrainConfig

out, devices, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
strategy = "ddp" if devices > 1 else "auto"

rng = np.random.default_rng(7)                  # same cohort in every process
n_train, n_val, n_test, size = 192, 64, 128, 24
n = n_train + n_val + n_test
y = np.arange(n) % 2
rng.shuffle(y)
x = rng.random((n, size, size), dtype=np.float32) * 0.6
x[y == 1, 6:14, 6:14] += 0.25                   # a planted, clearly learnable signal
idx = np.arange(n)
tr, va, te = idx[:n_train], idx[n_train:n_train + n_val], idx[n_train + n_val:]

seen = {}
original_step = T.ImageClassifier.training_step

def recording_step(self, batch_, batch_idx):
    seen.setdefault(int(self.current_epoch), []).extend(batch_[2].tolist())
    return original_step(self, batch_, batch_idx)

T.ImageClassifier.training_step = recording_step

torch.manual_seed(0)
cfg = TrainConfig(max_epochs=4, batch_size=batch, precision="32", early_stopping_patience=50,
                  augment=AugmentConfig(flip=False, rotate=0.0, zoom=0.0),
                  accelerator="cpu", devices=devices, strategy=strategy, num_threads=1)
res = T.train_model(images=x, labels=y, train_index=tr, val_index=va, n_classes=2, arch="resnet-tiny",
                    cfg=cfg, seed=11, out_dir=out / "run")
rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
world = int(torch.distributed.get_world_size()) if torch.distributed.is_initialized() else 1
backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
(out / f"seen-{rank}.json").write_text(json.dumps({"world": world, "backend": backend, "seen": seen}))
if rank == 0:
    model = T.load_classifier(out / "run" / res.best_checkpoint)
    with torch.no_grad():
        prob = torch.softmax(model(torch.from_numpy(x[te]).unsqueeze(1)), 1)[:, 1].numpy()
    (out / "test.json").write_text(json.dumps({"prob": prob.tolist(), "y": y[te].tolist(),
                                               "epochs": res.epochs}))
'''


def _run(tmp: Path, devices: int, batch: int) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    script = tmp / "train_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp), str(devices), str(batch)],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    test = json.loads((tmp / "test.json").read_text())
    ranks = [json.loads((tmp / f"seen-{r}.json").read_text()) for r in range(devices)]
    return {"test": test, "ranks": ranks, "auc": roc_auc_score(test["y"], test["prob"])}


def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    from readingrace.train import EpochSampler

    one = _run(tmp_path / "one", devices=1, batch=32)
    two = _run(tmp_path / "two", devices=2, batch=16)

    # the process group really had 2 ranks on gloo
    assert [r["world"] for r in two["ranks"]] == [2, 2]
    assert {r["backend"] for r in two["ranks"]} == {"gloo"}

    train = list(range(192))
    for epoch in range(4):
        shards = [r["seen"][str(epoch)] for r in two["ranks"]]
        assert len(shards[0]) == len(shards[1]) == 96
        # every training image exactly once per epoch across the ranks, none twice, no val/test image
        assert sorted(shards[0] + shards[1]) == train
        # the order is the seeded EpochSampler permutation for this epoch, sharded rank::2,
        # i.e. set_epoch reached the sampler through Lightning's DistributedSamplerWrapper
        s = EpochSampler(192, seed=11)
        s.set_epoch(epoch)
        perm = list(s)
        for rank in (0, 1):
            # Lightning's DistributedSamplerWrapper shards (and reshuffles, seeded by the global
            # seed and the epoch) the EpochSampler's list: equal only if set_epoch reached both
            dist = DistributedSampler(range(192), num_replicas=2, rank=rank, shuffle=True, seed=11)
            dist.set_epoch(epoch)
            assert shards[rank] == [perm[j] for j in dist]
        assert sorted(one["ranks"][0]["seen"][str(epoch)]) == train
        assert one["ranks"][0]["seen"][str(epoch)] == perm
    assert two["ranks"][0]["seen"]["0"] != two["ranks"][0]["seen"]["1"]
    print(f"test AUC 1 process {one['auc']:.4f}, 2 processes {two['auc']:.4f}")

    # only rank 0 writes train_result.json and the checkpoints; one folder, one result
    result = json.loads((tmp_path / "two" / "run" / "train_result.json").read_text())
    assert result["epochs"] == two["test"]["epochs"] == one["test"]["epochs"] == 4
    assert (tmp_path / "two" / "run" / "checkpoints" / "best.ckpt").is_file()

    assert one["auc"] > 0.85 and two["auc"] > 0.85, (one["auc"], two["auc"])
    assert abs(one["auc"] - two["auc"]) <= 0.02, (one["auc"], two["auc"])
    assert np.isfinite(result["best_val_loss"])

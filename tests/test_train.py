"""Training: augmentation, models, checkpoints, and resume after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from readingrace.config import AugmentConfig
from readingrace.errors import ConfigError
from readingrace.models import ARCHITECTURES, build_model, head_module, load_weights
from readingrace.train import EpochSampler, augment_batch

TRAIN_SCRIPT = r"""
import sys, numpy as np
from pathlib import Path
from readingrace.config import TrainConfig
from readingrace.train import train_model
rng = np.random.default_rng(0)
n = 480
y = rng.integers(0, 2, n)
x = rng.random((n, 32, 32), dtype=np.float32) * 0.5
x[y == 1, 8:16, 8:16] += 0.3
cfg = TrainConfig(max_epochs=int(sys.argv[2]), batch_size=16, precision="32", early_stopping_patience=50)
r = train_model(images=x, labels=y, train_index=np.arange(400), val_index=np.arange(400, 480), n_classes=2,
                arch="resnet-tiny", cfg=cfg, seed=3, out_dir=Path(sys.argv[1]))
print(r.resumed_from_epoch, r.best_val_loss)
"""


def test_augment_identity_when_disabled_and_flip_when_forced():
    x = torch.rand(4, 1, 16, 16)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(x, AugmentConfig(flip=False, rotate=0, zoom=0), g), x)
    # flip only: each image is either itself or its mirror
    out = augment_batch(x, AugmentConfig(flip=True, rotate=0, zoom=0), torch.Generator().manual_seed(1))
    for a, b in zip(out, x):
        assert torch.allclose(a, b, atol=1e-5) or torch.allclose(a, b.flip(-1), atol=1e-5)


def test_augment_is_per_image_and_seeded():
    x = torch.rand(8, 1, 32, 32)
    cfg = AugmentConfig()
    a = augment_batch(x, cfg, torch.Generator().manual_seed(5))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    same = augment_batch(x[:1].repeat(8, 1, 1, 1), cfg, torch.Generator().manual_seed(5))
    assert not torch.allclose(same[0], same[1])   # different parameters per image


def test_epoch_sampler_depends_only_on_seed_and_epoch():
    s = EpochSampler(50, seed=3)
    s.set_epoch(2)
    first = list(s)
    s.set_epoch(0)
    assert list(s) != first
    s.set_epoch(2)
    assert list(s) == first and sorted(first) == list(range(50))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_takes_one_channel(name):
    model = build_model(name, 3).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 64, 64)).shape == (2, 3)
    head_module(model)


def test_unknown_architecture():
    with pytest.raises(ConfigError, match="resnet34"):
        build_model("resnet-35", 2)


def test_random_init_notice_once_per_architecture(caplog, monkeypatch):
    from readingrace import models

    monkeypatch.setattr(models, "_RANDOM_INIT_NOTICED", set())
    with caplog.at_level("WARNING", logger=models.log.name):
        build_model("resnet-tiny", 2)
        build_model("resnet-tiny", 3)       # a checkpoint load rebuilds the network: no second notice
        build_model("resnet18", 2)
    notices = [r.getMessage() for r in caplog.records if "no pretrained weights" in r.getMessage()]
    assert len(notices) == 2 and "resnet-tiny" in notices[0] and "resnet18" in notices[1]


def test_no_random_init_notice_when_a_checkpoint_is_loaded(caplog, monkeypatch, tmp_path):
    """Loading a trained checkpoint (probe, predict, external) must not claim random initialisation."""
    import lightning as L

    from readingrace import models
    from readingrace.train import ImageClassifier, load_classifier

    monkeypatch.setattr(models, "_RANDOM_INIT_NOTICED", set())
    trainer = L.Trainer(max_epochs=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    model = ImageClassifier("resnet-tiny", 2)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    monkeypatch.setattr(models, "_RANDOM_INIT_NOTICED", set())
    caplog.clear()  # the notice of the model built above (really randomly initialised)
    with caplog.at_level("WARNING", logger=models.log.name):
        load_classifier(tmp_path / "m.ckpt")
        models.build_model("resnet-tiny", 2, checkpoint=True)
    assert not [r for r in caplog.records if "no pretrained weights" in r.getMessage()]


def test_local_weights_three_to_one_channel_and_head_skipped(tmp_path):
    src = build_model("resnet-tiny", 5)
    state = src.state_dict()
    state["conv1.weight"] = state["conv1.weight"].repeat(1, 3, 1, 1) / 3
    torch.save(state, tmp_path / "w.pt")
    dst = build_model("resnet-tiny", 2)
    info = load_weights(dst, tmp_path / "w.pt")
    assert torch.allclose(dst.conv1.weight, src.conv1.weight, atol=1e-6)
    assert "fc.weight" in info["skipped"]
    (tmp_path / "bad.pt").write_text("not weights")
    with pytest.raises(ConfigError, match="not a readable"):
        load_weights(dst, tmp_path / "bad.pt")


def test_last_checkpoint_is_the_last_epoch_not_the_best(tmp_path):
    from readingrace.config import TrainConfig
    from readingrace.train import train_model

    rng = np.random.default_rng(1)
    x = rng.random((96, 16, 16), dtype=np.float32)
    y = rng.integers(0, 2, 96)                      # random labels: validation loss does not keep improving
    cfg = TrainConfig(max_epochs=5, batch_size=16, precision="32", early_stopping_patience=50, lr=0.01)
    train_model(images=x, labels=y, train_index=np.arange(64), val_index=np.arange(64, 96), n_classes=2,
                arch="resnet-tiny", cfg=cfg, seed=0, out_dir=tmp_path)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["epoch"]
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)["epoch"]
    assert last == 4
    assert best < 4                                 # the case where a best-tracking "last" would be wrong


def test_relative_output_folder(tmp_path, monkeypatch):
    from readingrace.config import TrainConfig
    from readingrace.train import train_model

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(3)
    x, y = rng.random((40, 16, 16), dtype=np.float32), rng.integers(0, 2, 40)
    r = train_model(images=x, labels=y, train_index=np.arange(30), val_index=np.arange(30, 40), n_classes=2,
                    arch="resnet-tiny", cfg=TrainConfig(max_epochs=1, batch_size=16, precision="32"), seed=0,
                    out_dir=Path("runs") / "rel")
    assert r.best_checkpoint == "checkpoints/best.ckpt"
    assert (tmp_path / "runs" / "rel" / "train_result.json").is_file()


def test_same_seed_same_predictions(tmp_path):
    from readingrace.config import TrainConfig
    from readingrace.predict import predict_proba
    from readingrace.train import load_classifier, train_model

    rng = np.random.default_rng(2)
    x = rng.random((120, 24, 24), dtype=np.float32)
    y = rng.integers(0, 3, 120)
    cfg = TrainConfig(max_epochs=2, batch_size=16, precision="32")
    probs = []
    for k in range(2):
        r = train_model(images=x, labels=y, train_index=np.arange(80), val_index=np.arange(80, 100), n_classes=3,
                        arch="resnet-tiny", cfg=cfg, seed=7, out_dir=tmp_path / f"run{k}")
        probs.append(predict_proba(load_classifier(tmp_path / f"run{k}" / r.best_checkpoint), x, np.arange(100, 120)))
    assert np.array_equal(probs[0], probs[1])


def _run(out: Path, epochs: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, str(out), str(epochs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill_during_training_then_resume_matches_uninterrupted(tmp_path):
    epochs = 4
    full = _run(tmp_path / "full", epochs)
    out_full, err = full.communicate(timeout=600)
    assert full.returncode == 0, err
    # interrupted: kill -9 while a later epoch runs (after the first epoch's checkpoint exists)
    part_dir = tmp_path / "part"
    proc = _run(part_dir, epochs)
    last = part_dir / "checkpoints" / "last.ckpt"
    t0 = time.time()
    while not last.exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (part_dir / "train_result.json").exists()
    again = _run(part_dir, epochs)
    out_again, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    resumed, loss = out_again.split()
    assert int(resumed) >= 1                      # started from the last completed epoch, not from scratch
    full_resumed, full_loss = out_full.split()
    assert full_resumed == "None"
    assert float(loss) == pytest.approx(float(full_loss), rel=1e-5)
    a = torch.load(tmp_path / "full" / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    b = torch.load(part_dir / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert json.loads((part_dir / "train_result.json").read_text())["epochs"] == epochs
    from readingrace.train import history

    curves = history(part_dir)                      # both attempts' logs: every epoch present once
    assert curves["epoch"].tolist() == list(range(epochs))
    assert curves["val_loss"].notna().all()

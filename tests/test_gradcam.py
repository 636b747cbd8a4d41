"""Grad-CAM, the hot-box occlusion test and the galleries (experiment C3)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from readingrace.errors import ConfigError, ReadingRaceError
from readingrace.explain.gallery import gallery, gradcam_galleries, select_cases
from readingrace.explain.gradcam import default_layer, gradcam, occlusion_test
from readingrace.models import ARCHITECTURES
from readingrace.stats.metrics import prepare_predictions
from readingrace.train import ImageClassifier


@pytest.fixture(autouse=True)
def _quiet_one_thread():
    """Quiet model notices; one torch thread (several times faster than two on a busy 2-core machine)."""
    logging.getLogger("readingrace.models").setLevel(logging.ERROR)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Crafted(nn.Module):
    """Features (x, 1 - x) at full resolution; logit k = mean of feature k.

    Grad-CAM of class 0 is the min-max normalised image, of class 1 its complement.
    """

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(1, 2, 1)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            conv.bias.copy_(torch.tensor([0.0, 1.0]))
        fc = nn.Linear(2, 2)
        with torch.no_grad():
            fc.weight.copy_(torch.eye(2))
            fc.bias.zero_()
        self.features = nn.Sequential(conv)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))

    def prepare_input(self, x: torch.Tensor, index=None) -> torch.Tensor:
        return x


def minmax(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    lo, hi = flat.min(1).values.view(-1, 1, 1), flat.max(1).values.view(-1, 1, 1)
    return (x - lo) / (hi - lo)


def test_crafted_heat_is_the_image_and_batches_match_single_images():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 20, 24)
    model = Crafted()
    assert default_layer(model) == "features.0"  # fallback: the last Conv2d
    h0 = gradcam(model, x, target_class=0)
    h1 = gradcam(model, x, target_class=1)
    assert h0.shape == (3, 20, 24)
    torch.testing.assert_close(h0, minmax(x[:, 0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(h1, 1 - minmax(x[:, 0]), atol=1e-5, rtol=0)
    # one target per image: the class score must not mix the images of a batch
    target = torch.tensor([0, 1, 0])
    batched = gradcam(model, x, target_class=target)
    single = torch.cat([gradcam(model, x[i:i + 1], target_class=int(target[i])) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)
    torch.testing.assert_close(batched[1], h1[1], atol=1e-6, rtol=0)


def test_classifier_gradcam_batched_equals_single_and_leaves_model_unchanged():
    torch.manual_seed(1)
    model = ImageClassifier("resnet-tiny", 3)
    model.train()  # the caller's mode must survive
    x = torch.rand(4, 1, 64, 64)
    x[:, :, 8:30, 10:40] += 0.8
    x[2:, :, 36:60, 20:60] += 1.5
    x = x / x.amax()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inplace_before = [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)]
    heat_by_class = []
    for target in (None, 0, 1, 2):
        batched = gradcam(model, x, target_class=target)
        single = torch.cat([gradcam(model, x[i:i + 1], target_class=target) for i in range(4)])
        assert batched.shape == (4, 64, 64) and batched.dtype == torch.float32
        assert batched.min() >= 0 and batched.max() <= 1
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
        heat_by_class.append(batched)
    # the test is not vacuous: some maps are non-constant (their maximum is 1)
    assert sum(int((h.flatten(1).amax(1) == 1).sum()) for h in heat_by_class) >= 4
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats
    assert all(p.grad is None for p in model.parameters())
    assert [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)] == inplace_before
    # non-square input: heat at the input size
    assert gradcam(model.eval(), torch.rand(2, 1, 64, 96)).shape == (2, 64, 96)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_default_layer_for_every_architecture(arch):
    torch.manual_seed(0)
    model = ImageClassifier(arch, 2).eval()
    layer = default_layer(model)
    assert layer.startswith("net.") and layer in dict(model.named_modules())
    heat = gradcam(model, torch.rand(2, 1, 64, 64), target_class=torch.tensor([0, 1]))
    assert heat.shape == (2, 64, 64)
    assert torch.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1


def test_layer_names_and_bad_targets():
    model = ImageClassifier("resnet-tiny", 2).eval()
    x = torch.rand(2, 1, 32, 32)
    a = gradcam(model, x, target_class=1, layer="layer3")
    b = gradcam(model, x, target_class=1, layer="net.layer3")
    torch.testing.assert_close(a, b)
    with pytest.raises(ConfigError, match="not a module"):
        gradcam(model, x, layer="layer9")
    with pytest.raises(ConfigError, match="3 entries for 2 images"):
        gradcam(model, x, target_class=torch.tensor([0, 1, 1]))
    with pytest.raises(ReadingRaceError, match=r"\(N, 1, H, W\)"):
        gradcam(model, torch.rand(2, 3, 32, 32))


def test_occlusion_box_at_input_size_filled_with_zero():
    s = 40
    images = np.full((3, s, s), 0.6, np.float32)
    images[0, 6:18, 20:33] = 1.0          # bright box, mean > 0.5: class 0, heat = image
    images[1] = 0.4
    images[1, 25:35, 2:12] = 0.1          # dark box, mean < 0.5: class 1, heat = 1 - image
    images[2, 0:5, 0:40] = 0.9            # a band along the top
    model = Crafted()
    ids = pd.DataFrame({"image_id": ["a", "b", "c"], "patient_id": ["p1", "p1", "p2"], "study_id": ["s1", "s2", "s3"]})
    out = occlusion_test(model, images, np.array([0, 1, 2]), ["x", "y", "x"], ["x", "y"], batch_size=2, ids=ids)
    boxes = out["boxes"]
    assert boxes[["y0", "y1", "x0", "x1"]].to_numpy().tolist() == [[6, 18, 20, 33], [25, 35, 2, 12], [0, 5, 0, 40]]
    assert boxes["explained_class"].tolist() == ["x", "y", "x"]
    np.testing.assert_allclose(boxes["box_fraction"], [12 * 13 / s**2, 100 / s**2, 200 / s**2])
    assert out["threshold"] == 0.65 and out["image_size"] == [s, s] and out["n_empty_boxes"] == 0
    # the predictions are the same model's on the occluded images (box set to 0)
    occluded = images.copy()
    occluded[0, 6:18, 20:33] = 0
    occluded[1, 25:35, 2:12] = 0
    occluded[2, 0:5, :] = 0
    m = occluded.mean(axis=(1, 2))
    expected = torch.softmax(torch.tensor(np.stack([m, 1 - m], 1)), 1).numpy()
    pred = out["predictions"]
    np.testing.assert_allclose(pred[["prob_x", "prob_y"]].to_numpy(), expected, atol=1e-6)
    assert pred["image_id"].tolist() == ["a", "b", "c"] and pred["label"].tolist() == ["x", "y", "x"]
    prepare_predictions(pred, classes=["x", "y"])  # the standard predictions-table form
    # the threshold is configurable: 0 keeps every pixel, so the whole image is occluded
    whole = occlusion_test(model, images, np.array([0]), ["x"], ["x", "y"], threshold=0.0)
    assert whole["boxes"]["box_fraction"].tolist() == [1.0]
    with pytest.raises(ReadingRaceError, match="not among the classes"):
        occlusion_test(model, images, np.array([0]), ["z"], ["x", "y"])


def test_gallery_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.random((5, 32, 32)).astype(np.float32)
    path = gallery(imgs, imgs[::-1].copy(), [f"#{i}" for i in range(5)], tmp_path / "g" / "grid.png", ncols=3)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100
    with pytest.raises(ReadingRaceError, match="titles"):
        gallery(imgs, None, ["a"], tmp_path / "x.png")


def test_gradcam_galleries_per_class_and_outcome(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier("resnet-tiny", 2).eval()
    images = np.random.default_rng(1).random((6, 32, 32)).astype(np.float32)
    table = pd.DataFrame({
        "image_id": list("abcdef"), "patient_id": list("pqrstu"),
        "label": ["A", "A", "A", "B", "B", "A"],
        "prob_A": [0.9, 0.6, 0.2, 0.3, 0.1, 0.95],
        "prob_B": [0.1, 0.4, 0.8, 0.7, 0.9, 0.05],
        "cache_index": [5, 4, 3, 2, 1, 0],
    })
    groups = select_cases(table, ["A", "B"], per_group=2)
    assert groups[("A", "correct")]["image_id"].tolist() == ["f", "a"]  # most confident first, capped
    assert groups[("A", "wrong")]["image_id"].tolist() == ["c"]
    assert groups[("B", "correct")]["image_id"].tolist() == ["e", "d"] and groups[("B", "wrong")].empty
    files = gradcam_galleries(model, images, table, ["A", "B"], tmp_path, per_group=2)
    assert sorted(p.name for p in files) == ["gradcam_A_correct.png", "gradcam_A_wrong.png", "gradcam_B_correct.png"]
    assert all(p.stat().st_size > 1000 for p in files)
    with pytest.raises(ReadingRaceError, match="cache_index"):
        gradcam_galleries(model, images, table.drop(columns="cache_index"), ["A", "B"], tmp_path)

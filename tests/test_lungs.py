"""Lung U-Net, masks and lung-only / non-lung images (experiment C3)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from readingrace.errors import CohortError, ConfigError
from readingrace.explain.lungs import (
    LungUNet,
    clean_masks,
    dice_scores,
    load_lung_unet,
    lung_only,
    non_lung,
    predict_lung_masks,
    read_pairs,
    read_pairs_csv,
    train_lung_unet,
)


@pytest.fixture
def one_thread():
    """Train on one thread: on a busy 2-core machine it is several times faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def disc_problem(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images with one bright disc each; the mask is the disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.empty((n, size, size), np.float32)
    masks = np.empty((n, size, size), bool)
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        r = rng.uniform(0.15, 0.3) * size
        m = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        base = rng.uniform(0.1, 0.3)
        img = base + 0.4 * m + rng.normal(0, 0.08, (size, size))
        images[i], masks[i] = np.clip(img, 0, 1), m
    return images, masks


def test_lung_only_and_non_lung_are_complementary():
    rng = np.random.default_rng(0)
    img = rng.random((3, 16, 16)).astype(np.float32)
    mask = rng.random((3, 16, 16)) > 0.5
    inside, outside = lung_only(img, mask), non_lung(img, mask)
    np.testing.assert_array_equal(inside + outside, img)
    assert np.all(inside[~mask] == 0) and np.all(outside[mask] == 0)
    np.testing.assert_array_equal(inside[mask], img[mask])
    assert inside.dtype == np.float32
    t_in, t_out = lung_only(torch.from_numpy(img), torch.from_numpy(mask)), non_lung(torch.from_numpy(img), mask)
    assert torch.equal(t_in + t_out, torch.from_numpy(img))
    with pytest.raises(ConfigError, match="same shape"):
        lung_only(img, mask[:, :8])


def test_clean_masks_keeps_two_largest_regions_and_fills_holes():
    m = np.zeros((2, 20, 20), bool)
    m[0, 2:18, 2:8] = True                     # left lung (96 px) with a hole
    m[0, 8, 4] = False
    m[0, 2:16, 11:17] = True                   # right lung (84 px)
    m[0, 18, 18] = True                        # stray pixel
    m[0, 0:2, 8:10] = True                     # stray blob (4 px): third largest
    m[1, 5:10, 5:10] = True                    # one region
    m[1, 15, 15] = True                        # under 10% of the largest: dropped
    out = clean_masks(m)
    expected0 = np.zeros((20, 20), bool)
    expected0[2:18, 2:8] = True
    expected0[2:16, 11:17] = True
    np.testing.assert_array_equal(out[0], expected0)
    assert out[1].sum() == 25 and not out[1, 15, 15]
    assert clean_masks(np.zeros((1, 4, 4), bool)).sum() == 0


def test_dice_scores_known_values():
    a = np.zeros((3, 4, 4), bool)
    b = np.zeros((3, 4, 4), bool)
    a[0, :2], b[0, :2] = True, True            # identical: 1
    a[1, :2], b[1, 1:3] = True, True           # 4 of 8 + 8 overlap: 2*4/16 = 0.5
    a[2, 0, 0] = True                          # disjoint: 0
    np.testing.assert_allclose(dice_scores(a, b), [1.0, 0.5, 0.0])


def test_unet_learns_disc_masks_and_round_trips(tmp_path, one_thread):
    data = disc_problem(60, 32, seed=1)
    model, report = train_lung_unet(None, data=data, size=32, epochs=12, seed=3, batch_size=8, lr=5e-3,
                                    channels=(8, 16, 32), strides=(2, 2), num_res_units=0, augment=False,
                                    out_dir=tmp_path)
    assert report["n_heldout"] == 12 and report["n_train"] == 48
    assert report["heldout_dice_mean"] > 0.8, report
    assert report["train_loss"][-1] < report["train_loss"][0]
    # new images of the same kind, and at another size (resized to the network and back)
    test_imgs, test_masks = disc_problem(8, 32, seed=99)
    assert dice_scores(predict_lung_masks(model, test_imgs), test_masks).mean() > 0.8
    big = torch.nn.functional.interpolate(torch.from_numpy(test_imgs)[:, None], size=64, mode="bilinear")[:, 0]
    big_masks = predict_lung_masks(model, big.numpy())
    assert big_masks.shape == (8, 64, 64) and big_masks.dtype == bool
    # saved weights load back to the same predictions
    loaded = load_lung_unet(tmp_path / "lung_unet.pt")
    np.testing.assert_array_equal(predict_lung_masks(loaded, test_imgs), predict_lung_masks(model, test_imgs))
    assert (tmp_path / "lung_unet_report.json").exists()


def test_pairs_files_are_read_and_checked(tmp_path):
    img = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:40, 5:30] = 255
    (tmp_path / "i").mkdir()
    Image.fromarray(img).save(tmp_path / "i" / "a.png")
    Image.fromarray(mask).save(tmp_path / "i" / "a_mask.png")
    Image.fromarray(mask[:32]).save(tmp_path / "i" / "small_mask.png")
    pd.DataFrame({"image": ["i/a.png"], "mask": ["i/a_mask.png"]}).to_csv(tmp_path / "pairs.csv", index=False)
    pairs = read_pairs_csv(tmp_path / "pairs.csv")
    assert list(pairs.columns) == ["image_path", "mask_path"]
    images, masks = read_pairs(pairs, size=32)
    assert images.shape == (1, 32, 32) and masks.dtype == bool
    assert abs(masks[0].mean() - (30 * 25) / 64 ** 2) < 0.02
    assert images.min() >= 0 and images.max() <= 1
    bad = pairs.assign(mask_path=str(tmp_path / "i" / "small_mask.png"))
    with pytest.raises(CohortError, match="row 0"):
        read_pairs(bad, size=32)
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "wrong.csv", index=False)
    with pytest.raises(CohortError, match="image_path, mask_path"):
        read_pairs_csv(tmp_path / "wrong.csv")
    with pytest.raises(ConfigError, match="multiple of 8"):
        LungUNet(size=36)


def test_real_pediatric_pairs_brief_training(one_thread, shared_data):
    pairs_csv = shared_data / "lung-masks-pediatric" / "pairs.csv"
    if not pairs_csv.exists():
        pytest.skip("shared pediatric lung-mask data not present")
    pairs = read_pairs_csv(pairs_csv).iloc[:150]
    _, report = train_lung_unet(pairs, size=64, epochs=5, seed=2021, batch_size=8, num_res_units=0)
    assert report["n_heldout"] == 30
    # measured 0.88 (5 epochs, 120 training pairs at 64 px); the full script reaches ~0.95
    assert report["heldout_dice_mean"] > 0.8, report
    assert 0.1 < report["heldout_lung_fraction_pred"] < 0.4

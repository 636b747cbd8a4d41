"""Tests for readingrace.imaging.perturb: filter identities, geometry, noise, blur, patches, boxes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from readingrace.errors import ConfigError, ReadingRaceError
from readingrace.imaging import perturb as P


def _images(n: int = 3, h: int = 32, w: int = 32, *, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, h, w), generator=g, dtype=dtype)


def _full_fft_path(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference: full FFT, fftshift, mask, inverse shift, inverse FFT, real part."""
    spec = torch.fft.fftshift(torch.fft.fft2(images), dim=(-2, -1))
    spec = spec * mask.to(images.dtype)
    return torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1))).real


def _numpy_radius(h: int, w: int) -> np.ndarray:
    """Distance of each bin from the fftshift centre, in bins, via numpy."""
    yy, xx = np.meshgrid(np.arange(h) - h // 2, np.arange(w) - w // 2, indexing="ij")
    return np.sqrt(yy.astype(float) ** 2 + xx.astype(float) ** 2)


# ---------------------------------------------------------------------------------------------
# C1 Fourier


@pytest.mark.parametrize("size", [(32, 32), (33, 33), (30, 35), (224, 224)])
@pytest.mark.parametrize("radius", [1, 5, 10.5, 25])
def test_lowpass_plus_highpass_is_original(size, radius):
    x = _images(2, *size)
    lo = P.fourier_filter(x, kind="lowpass", radius=radius)
    hi = P.fourier_filter(x, kind="highpass", radius=radius)
    assert torch.allclose(lo + hi, x, atol=2e-6)
    assert not torch.allclose(lo, x, atol=1e-3)  # the filter did something


@pytest.mark.parametrize("size", [(32, 32), (31, 31), (28, 41)])
def test_bandpass_plus_notch_is_original(size):
    x = _images(2, *size, dtype=torch.float64)
    band = P.fourier_filter(x, kind="bandpass", radius=(3, 9), reference_size=32)
    notch = P.fourier_filter(x, kind="notch", radius=(3, 9), reference_size=32)
    assert torch.allclose(band + notch, x, atol=1e-12)
    # band-pass = low-pass(d2) - low-pass(d1)
    lo2 = P.fourier_filter(x, kind="lowpass", radius=9, reference_size=32)
    lo1 = P.fourier_filter(x, kind="lowpass", radius=3, reference_size=32)
    assert torch.allclose(band, lo2 - lo1, atol=1e-12)


def test_limits_of_the_radius():
    x = _images(2, 224, 224)
    # the farthest bin of a 224 image is at sqrt(112^2 + 112^2) = 158.4 < 200
    assert torch.allclose(P.fourier_filter(x, kind="lowpass", radius=200), x, atol=2e-6)
    assert P.fourier_filter(x, kind="highpass", radius=200).abs().max() < 1e-6
    assert torch.allclose(P.fourier_filter(x, kind="highpass", radius=0), x, atol=2e-6)
    assert P.fourier_filter(x, kind="lowpass", radius=0).abs().max() == 0
    # low-pass at d = 1 keeps only the DC bin: a constant image equal to the mean
    dc = P.fourier_filter(x, kind="lowpass", radius=1)
    assert torch.allclose(dc, x.mean(dim=(1, 2), keepdim=True).expand_as(x), atol=1e-6)


@pytest.mark.parametrize("radius", [1, 5, 25])
def test_highpass_removes_the_mean_and_is_not_clipped(radius):
    x = _images(3, 64, 64) * 0.5 + 0.3
    hi = P.fourier_filter(x, kind="highpass", radius=radius, reference_size=64)
    assert hi.mean(dim=(1, 2)).abs().max() < 1e-6
    assert hi.min() < -0.05  # negative values are kept


@pytest.mark.parametrize("n", [224, 223, 16, 15])
def test_mask_matches_numpy_distance(n):
    dist = _numpy_radius(n, n)
    for d in (1, 5, 7.5, 10):
        lo = P.frequency_mask(n, n, kind="lowpass", radius=d, reference_size=n).numpy()
        hi = P.frequency_mask(n, n, kind="highpass", radius=d, reference_size=n).numpy()
        np.testing.assert_array_equal(lo, dist < d)
        np.testing.assert_array_equal(hi, dist >= d)
    band = P.frequency_mask(n, n, kind="bandpass", radius=(2, 6), reference_size=n).numpy()
    np.testing.assert_array_equal(band, (dist >= 2) & (dist < 6))
    notch = P.frequency_mask(n, n, kind="notch", radius=[2, 6], reference_size=n).numpy()
    np.testing.assert_array_equal(notch, ~((dist >= 2) & (dist < 6)))


def test_mask_boundary_is_strict_and_centred():
    m = P.frequency_mask(224, 224, kind="lowpass", radius=5)
    c = 112
    assert m[c, c] and m[c + 3, c + 3]  # r = 4.24
    assert not m[c + 3, c + 4] and not m[c - 4, c + 3] and not m[c, c + 5]  # r == 5 exactly
    assert m.sum() == int((_numpy_radius(224, 224) < 5).sum()) == 69


def test_mask_non_square_is_an_ellipse_in_bins():
    h, w = 48, 80
    yy, xx = np.meshgrid(np.arange(h) - h // 2, np.arange(w) - w // 2, indexing="ij")
    cycles = np.sqrt((yy / h) ** 2 + (xx / w) ** 2)
    m = P.frequency_mask(h, w, kind="lowpass", radius=0.2, unit="cycles").numpy()
    np.testing.assert_array_equal(m, cycles < 0.2)
    assert m[h // 2, w // 2 + 15] and not m[h // 2, w // 2 + 16]  # 16/80 = 0.2: excluded
    assert m[h // 2 + 9, w // 2] and not m[h // 2 + 10, w // 2]  # 9.6 bins along 48


def test_unit_conversion_pixels_at_224_equals_cycles_at_112():
    for d in (10, 25, 50, 75):
        m224 = P.frequency_mask(224, 224, kind="lowpass", radius=d)
        m112_cyc = P.frequency_mask(112, 112, kind="lowpass", radius=d / 224, unit="cycles")
        m112_px = P.frequency_mask(112, 112, kind="lowpass", radius=d)  # reference 224: same cut-off
        assert torch.equal(m112_cyc, m112_px)
        # the 224 mask sampled at even offsets from its centre is the 112 mask, ties included
        assert torch.equal(m224[0::2, 0::2], m112_cyc)
        assert torch.equal(
            m112_cyc, P.frequency_mask(112, 112, kind="lowpass", radius=d / 2, reference_size=112)
        )


@pytest.mark.parametrize("size", [(16, 16), (15, 15), (16, 15), (15, 18), (224, 224)])
@pytest.mark.parametrize(
    "kind,radius", [("lowpass", 4), ("highpass", 2.5), ("bandpass", (2, 6)), ("notch", (1, 5))]
)
def test_rfft_path_equals_full_fft_path(size, kind, radius):
    h, w = size
    x = _images(3, h, w, dtype=torch.float64)
    mask = P.frequency_mask(h, w, kind=kind, radius=radius, reference_size=16)
    got = P.fourier_filter(x, kind=kind, radius=radius, reference_size=16)
    assert torch.allclose(got, _full_fft_path(x, mask), atol=1e-12)
    x32 = x.float()
    got32 = P.fourier_filter(x32, kind=kind, radius=radius, reference_size=16)
    assert got32.dtype == torch.float32
    assert torch.allclose(got32, _full_fft_path(x32, mask), atol=2e-6)


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(2, 24),
    w=st.integers(2, 24),
    d=st.floats(0, 20, allow_nan=False),
    unit=st.sampled_from(["pixels", "cycles"]),
)
def test_identity_property(h, w, d, unit):
    radius = d / 40 if unit == "cycles" else d
    x = _images(1, h, w, dtype=torch.float64)
    lo = P.fourier_filter(x, kind="lowpass", radius=radius, unit=unit, reference_size=20)
    hi = P.fourier_filter(x, kind="highpass", radius=radius, unit=unit, reference_size=20)
    assert torch.allclose(lo + hi, x, atol=1e-12)
    mask = P.frequency_mask(h, w, kind="lowpass", radius=radius, unit=unit, reference_size=20)
    assert torch.allclose(lo, _full_fft_path(x, mask), atol=1e-12)


def test_fourier_accepts_both_layouts_and_half():
    x = _images(2, 20, 20)
    a = P.fourier_filter(x, kind="lowpass", radius=5, reference_size=20)
    b = P.fourier_filter(x[:, None], kind="lowpass", radius=5, reference_size=20)
    assert a.shape == (2, 20, 20) and b.shape == (2, 1, 20, 20)
    assert torch.equal(a, b[:, 0])
    c = P.fourier_filter(x.half(), kind="lowpass", radius=5, reference_size=20)
    assert c.dtype == torch.float16 and torch.allclose(c.float(), a, atol=2e-3)


@pytest.mark.parametrize(
    "kwargs,word",
    [
        ({"kind": "band", "radius": 5}, "kind"),
        ({"kind": "lowpass", "radius": -1}, "radius"),
        ({"kind": "lowpass", "radius": (1, 2)}, "radius"),
        ({"kind": "bandpass", "radius": 5}, "radius"),
        ({"kind": "notch", "radius": (9, 3)}, "d1 < d2"),
        ({"kind": "lowpass", "radius": 5, "unit": "mm"}, "unit"),
    ],
)
def test_fourier_bad_options(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        P.fourier_filter(_images(1, 8, 8), **kwargs)


# ---------------------------------------------------------------------------------------------
# B4 clip


def test_clip_intensity():
    x = torch.tensor([[[0.0, 0.3, 0.6, 0.61, 1.0]]])
    assert torch.equal(P.clip_intensity(x), torch.tensor([[[0.0, 0.3, 0.6, 0.6, 0.6]]]))
    assert P.clip_intensity(x, threshold=0.2).max() == pytest.approx(0.2)


def test_legacy_clip_reproduces_clip_after_normalisation():
    x = torch.linspace(0, 1, 101).view(1, 1, 101)
    out = P.legacy_clip_normalised(x)
    cap = 0.485 + 0.6 * 0.229
    assert out.max().item() == pytest.approx(cap, abs=1e-6)
    # same as normalising, clipping at 0.6, de-normalising
    z = ((x - 0.485) / 0.229).clamp(max=0.6)
    assert torch.allclose(out, z * 0.229 + 0.485, atol=1e-7)
    below = x < cap - 1e-6
    assert torch.allclose(out[below], x[below], atol=1e-6)  # unchanged below the cap
    assert (out[x > cap + 1e-6] - cap).abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------
# C2 resize, noise, blur


def test_resize_shapes_and_back_to():
    x = _images(2, 64, 48)
    assert P.resize_images(x, 16).shape == (2, 16, 16)
    assert P.resize_images(x[:, None], 8, back_to=64).shape == (2, 1, 64, 64)
    assert P.resize_images(x, (10, 12)).shape == (2, 10, 12)
    const = torch.full((1, 40, 40), 0.3)
    assert torch.allclose(P.resize_images(const, 7, back_to=40), const, atol=1e-6)


def test_resize_is_antialiased():
    # stripes: columns 3 and 4 of every 8 are bright. Downsampling by 8 without anti-aliasing
    # samples exactly those columns (all 1); with it, each output averages a period (about 0.25).
    cols = torch.zeros(64)
    cols[3::8] = 1.0
    cols[4::8] = 1.0
    stripes = cols.expand(1, 64, 64).clone()
    small = P.resize_images(stripes, 8)
    assert (small[..., 1:-1] - 0.25).abs().max() < 1e-5
    assert small.max() < 0.4
    aliased = torch.nn.functional.interpolate(stripes[None], size=(8, 8), mode="bilinear", antialias=False)
    assert aliased.min() > 0.99  # what the option prevents


def test_noise_is_per_image_and_batch_independent():
    x = torch.zeros(5, 24, 24)
    batch = P.gaussian_noise(x, seed=2021)
    alone = P.gaussian_noise(x[3:4], seed=2021, indices=[3])
    assert torch.equal(batch[3:4], alone)
    # second half of a dataset processed as its own batch with global indices
    part = P.gaussian_noise(x[2:], seed=2021, indices=torch.arange(2, 5))
    assert torch.equal(part, batch[2:])
    # different images get different noise; the same seed gives the same output
    assert not torch.allclose(batch[0], batch[1])
    assert torch.equal(batch, P.gaussian_noise(x, seed=2021))
    assert not torch.allclose(batch, P.gaussian_noise(x, seed=2022))
    assert torch.corrcoef(batch.view(5, -1))[0, 1].abs() < 0.15


def test_noise_variance_and_legacy_std():
    x = torch.zeros(4, 128, 128, dtype=torch.float64)
    n = P.gaussian_noise(x, seed=7)
    assert n.dtype == torch.float64
    assert n.var().item() == pytest.approx(0.1, rel=0.02)
    assert n.mean().item() == pytest.approx(0.0, abs=0.005)
    legacy = P.gaussian_noise(x, seed=7, legacy_std=True)
    assert legacy.std().item() == pytest.approx(0.1, rel=0.02)
    shifted = P.gaussian_noise(x, seed=7, variance=0.04, mean=0.5)
    assert shifted.mean().item() == pytest.approx(0.5, abs=0.005)
    assert shifted.std().item() == pytest.approx(0.2, rel=0.02)
    clipped = P.gaussian_noise(x + 0.5, seed=7, clip=True)
    assert clipped.min() >= 0 and clipped.max() <= 1 and (clipped == 1).any()
    assert n.min() < 0  # not clipped by default


def test_noise_bad_indices():
    with pytest.raises(ConfigError, match="indices"):
        P.gaussian_noise(torch.zeros(3, 4, 4), seed=1, indices=[0, 1])
    with pytest.raises(ConfigError, match="seed"):
        P.gaussian_noise(torch.zeros(3, 4, 4), seed=-1)


@pytest.mark.parametrize("sigma", [1.5, 3.0])
def test_blur_is_per_image_with_the_right_sigma(sigma):
    x = torch.zeros(2, 1, 41, 41)
    x[0, 0, 20, 20] = 1.0
    out = P.gaussian_blur(x, sigma=sigma)
    assert out.shape == x.shape
    assert torch.equal(out[1], torch.zeros(1, 41, 41))  # nothing leaks across the batch axis
    psf = out[0, 0].double()
    assert psf.sum().item() == pytest.approx(1.0, abs=1e-5)
    grid = torch.arange(41, dtype=torch.float64) - 20
    var_y = (psf.sum(dim=1) * grid**2).sum().item()
    var_x = (psf.sum(dim=0) * grid**2).sum().item()
    assert math.sqrt(var_y) == pytest.approx(sigma, rel=0.01)
    assert math.sqrt(var_x) == pytest.approx(sigma, rel=0.01)
    assert psf.argmax().item() == 20 * 41 + 20


def test_blur_reflect_padding_and_options():
    const = torch.full((2, 30, 30), 0.7)
    assert torch.allclose(P.gaussian_blur(const, sigma=2), const, atol=1e-6)  # no dark border
    x = _images(2, 30, 30)
    assert torch.equal(P.gaussian_blur(x, sigma=0), x)
    small = P.gaussian_blur(x, sigma=2, kernel_size=5)
    assert not torch.allclose(small, P.gaussian_blur(x, sigma=2), atol=1e-4)
    assert small.std() < x.std()
    with pytest.raises(ConfigError, match="odd"):
        P.gaussian_blur(x, sigma=2, kernel_size=4)
    with pytest.raises(ConfigError, match="smaller"):
        P.gaussian_blur(torch.zeros(1, 6, 6), sigma=2)


# ---------------------------------------------------------------------------------------------
# C4 patches


@pytest.mark.parametrize("h,w", [(100, 131), (224, 224), (7, 5)])
def test_cells_tile_exactly(h, w):
    count = np.zeros((h, w), dtype=int)
    heights, widths = set(), set()
    for r, c in P.paper_cells():
        y0, y1, x0, x1 = P.cell_bounds(h, w, r, c)
        count[y0:y1, x0:x1] += 1
        heights.add(y1 - y0)
        widths.add(x1 - x0)
    assert (count == 1).all()
    assert max(heights) - min(heights) <= 1 and max(widths) - min(widths) <= 1


def test_cell_bounds_values():
    assert P.cell_bounds(100, 131, 0, 0) == (0, 33, 0, 44)
    assert P.cell_bounds(100, 131, 1, 1) == (33, 67, 44, 87)
    assert P.cell_bounds(100, 131, 2, 2) == (67, 100, 87, 131)
    with pytest.raises(ConfigError, match="outside"):
        P.cell_bounds(100, 131, 3, 0)


def test_drop_and_keep_cell():
    x = _images(2, 100, 131) + 0.1
    out = P.drop_cell(x, row=0, col=2)
    y0, y1, x0, x1 = P.cell_bounds(100, 131, 0, 2)
    assert (out[:, y0:y1, x0:x1] == 0).all()
    rest = torch.ones(100, 131, dtype=torch.bool)
    rest[y0:y1, x0:x1] = False
    assert torch.equal(out[:, rest], x[:, rest])
    kept = P.keep_cell(x[:, None], row=1, col=1)
    assert kept.shape == (2, 1, 100, 131)
    assert P.keep_cell(x, row=2, col=0, size=64).shape == (2, 64, 64)
    # a cell of constant value stays that value after the resize
    y = torch.zeros(1, 90, 90)
    y[:, 30:60, 60:90] = 0.8
    assert torch.allclose(P.keep_cell(y, row=1, col=2), torch.full((1, 90, 90), 0.8), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# C3 boxes


def test_hot_box_on_crafted_heatmap():
    hm = torch.zeros(3, 20, 30)
    hm[0] += 0.2
    hm[0, 3:7, 10:15] = 1.0
    hm[0, 8, 2] = 0.75  # normalised (0.75 - 0.2) / 0.8 = 0.6875 >= 0.65
    hm[1, 5, 5] = -1.0  # min elsewhere: 0 normalises to 1 -> everything but (5, 5) is hot
    # image 2 is constant: no hot region
    boxes = P.hot_box(hm)
    assert boxes.dtype == torch.int64
    assert boxes[0].tolist() == [3, 9, 2, 15]
    assert boxes[1].tolist() == [0, 20, 0, 30]
    assert boxes[2].tolist() == [0, 0, 0, 0]
    assert P.hot_box(hm[:1], threshold=0.8)[0].tolist() == [3, 7, 10, 15]


def test_hot_box_scales_to_the_image():
    hm = torch.zeros(1, 8, 7)
    hm[0, 2:4, 2:4] = 1
    assert P.hot_box(hm, image_size=(16, 14))[0].tolist() == [4, 8, 4, 8]
    # 7 -> 10: x0 = floor(2 * 10 / 7) = 2, x1 = ceil(4 * 10 / 7) = 6
    assert P.hot_box(hm, image_size=(8, 10))[0].tolist() == [2, 4, 2, 6]


def test_occlude_boxes():
    x = torch.ones(2, 10, 12)
    boxes = torch.tensor([[1, 4, 2, 5], [0, 0, 0, 0]])
    out = P.occlude_boxes(x, boxes)
    assert out[0].sum() == 120 - 9 and (out[0, 1:4, 2:5] == 0).all()
    assert torch.equal(out[1], x[1])
    with pytest.raises(ReadingRaceError, match="does not fit"):
        P.occlude_boxes(x, torch.tensor([[0, 11, 0, 5], [0, 1, 0, 1]]))


# ---------------------------------------------------------------------------------------------
# registry, purity, grid

SPECS = [
    {"name": "none"},
    {"name": "fourier", "kind": "highpass", "radius": 25},
    {"name": "fourier", "kind": "bandpass", "radius": [10, 25]},
    {"name": "clip", "threshold": 0.6},
    {"name": "legacy_clip"},
    {"name": "noise", "variance": 0.1, "seed": 2021},
    {"name": "blur", "sigma": 2},
    {"name": "drop_cell", "row": 0, "col": 2},
    {"name": "keep_cell", "row": 1, "col": 0},
    {"name": "resize", "size": 16, "back_to": 64},
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["name"])
def test_perturbations_are_pure(spec):
    x = _images(2, 64, 64)[:, None]
    before = x.clone()
    out = P.apply_perturbation(x, spec)
    assert torch.equal(x, before)
    assert out.data_ptr() != x.data_ptr()
    assert out.shape == x.shape
    assert isinstance(P.describe_perturbation(spec), str)
    if spec["name"] != "none":
        assert not torch.equal(out, x)


def test_occlusion_and_hot_box_are_pure():
    x = _images(2, 16, 16)
    before = x.clone()
    P.occlude_boxes(x, torch.tensor([[0, 4, 0, 4], [2, 3, 2, 3]]))
    P.hot_box(x)
    assert torch.equal(x, before)


def test_apply_perturbation_matches_direct_calls():
    x = _images(4, 32, 32)
    spec = {"name": "fourier", "kind": "lowpass", "radius": 5, "reference_size": 32}
    assert torch.equal(P.apply_perturbation(x, spec), P.fourier_filter(x, kind="lowpass", radius=5, reference_size=32))
    noisy = P.apply_perturbation(x[2:], {"name": "noise", "seed": 3}, indices=[2, 3])
    assert torch.equal(noisy, P.gaussian_noise(x, seed=3)[2:])


@pytest.mark.parametrize(
    "spec,word",
    [
        ({"name": "sharpen"}, "sharpen"),
        ({"kind": "lowpass"}, "name"),
        ({"name": "fourier", "kind": "lowpass", "radius": 5, "diameter": 5}, "diameter"),
        ({"name": "fourier", "kind": "lowpass"}, "radius"),
        ({"name": "noise", "variance": 0.1}, "seed"),
        ({"name": "noise", "seed": 1, "indices": [0]}, "indices"),
        ({"name": "clip", "threshold": "high"}, "threshold"),
        ({"name": "drop_cell", "row": 0, "col": 3}, "outside"),
    ],
)
def test_bad_specs(spec, word):
    with pytest.raises(ConfigError, match=word):
        P.apply_perturbation(_images(1, 12, 12), spec)


def test_describe_perturbation():
    assert "keeps r >= 25 px of a 224x224 image" in P.describe_perturbation(SPECS[1])
    assert "keeps 10 <= r < 25" in P.describe_perturbation(SPECS[2])
    assert "removes 10 <= r < 25" in P.describe_perturbation(
        {"name": "fourier", "kind": "notch", "radius": [10, 25]}
    )
    assert "0.6224" in P.describe_perturbation({"name": "legacy_clip"})
    assert "variance 0.1" in P.describe_perturbation(SPECS[5])
    assert "sd 0.1 " in P.describe_perturbation({"name": "noise", "seed": 1, "legacy_std": True})
    assert "quadrant (1, 3)" in P.describe_perturbation(SPECS[7])
    assert "16x16" in P.describe_perturbation(SPECS[9]) and "64x64" in P.describe_perturbation(SPECS[9])
    with pytest.raises(ConfigError, match="kind"):
        P.describe_perturbation({"name": "fourier", "kind": "high", "radius": 1})


def test_paper_grid():
    grid = P.paper_grid()
    assert [s["radius"] for s in grid["C1-lowpass"]] == [1, 5, 10, 25, 50, 75, 100, 125, 150, 200]
    pairs = P.paper_band_pairs()
    assert len(pairs) == 21 == len(set(pairs)) and all(a < b for a, b in pairs)
    assert set(itertools.chain(*pairs)) == {10, 25, 50, 75, 100, 125, 150}
    assert len(grid["C1-notch"]) == 21
    assert [s["size"] for s in grid["C2-resolution"]] == [512, 320, 240, 160, 80, 60, 40, 32, 24, 16, 8, 4]
    assert len(grid["C4-drop"]) == len(grid["C4-keep"]) == 9
    assert grid["C2-noise"][0]["variance"] == 0.1 and grid["C2-noise"][0]["seed"] == 2021
    for specs in grid.values():
        for spec in specs:
            P.describe_perturbation(spec)  # every spec validates


def test_bad_image_inputs():
    with pytest.raises(ReadingRaceError, match="float"):
        P.clip_intensity(torch.zeros(1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ReadingRaceError, match="shape"):
        P.clip_intensity(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ReadingRaceError, match="Tensor"):
        P.clip_intensity(np.zeros((1, 4, 4)))


# ---------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    x = _images(3, 64, 64)
    xc = x.cuda()
    for spec in SPECS:
        cpu = P.apply_perturbation(x, spec)
        gpu = P.apply_perturbation(xc, spec)
        assert gpu.device.type == "cuda"
        assert torch.allclose(gpu.cpu(), cpu, atol=1e-4), spec
    boxes = P.hot_box(xc)
    assert boxes.device.type == "cuda" and torch.equal(boxes.cpu(), P.hot_box(x))
    assert torch.equal(P.occlude_boxes(xc, boxes).cpu(), P.occlude_boxes(x, boxes.cpu()))

"""The mechanism experiments' image perturbations (paper sections B4, C1-C4).

Every function takes a float image batch in **[0, 1] intensity space**, shaped ``(N, H, W)`` or
``(N, 1, H, W)``, and returns a *new* tensor of the same layout on the same device; the input is
never modified. Perturbations act before any network normalisation (the original notebooks
clipped and zeroed after ImageNet normalisation; :func:`legacy_clip_normalised` reproduces that
for comparison). Outputs are not clipped to [0, 1] unless an option says so: a high-pass image has
negative values and added noise leaves the range.

Conventions
-----------
* Fourier masks (C1) live on the *centred* spectrum (``fftshift``): the zero frequency sits at
  index ``(H // 2, W // 2)`` and a bin's radius is its distance from there. A radius ``d`` in
  ``unit="pixels"`` is measured on a ``reference_size`` x ``reference_size`` image (the paper's
  ``d`` at 224 px; the paper calls it a diameter but uses it as a radius) and is converted to
  ``d / reference_size`` cycles per pixel, so an image of another size (or a non-square one) is
  cut at the same fraction of its spectrum: on an ``H`` x ``W`` image the boundary is the ellipse
  ``(ky / H)**2 + (kx / W)**2 = (d / reference_size)**2`` in bin offsets ``ky, kx``. At
  ``H = W = reference_size`` this is exactly the circle of radius ``d`` bins. ``unit="cycles"``
  gives the radius in cycles per pixel directly. Low-pass keeps ``r < d``, high-pass ``r >= d``,
  band-pass ``d1 <= r < d2``, notch the rest. Hence low-pass(d) + high-pass(d) is the original,
  high-pass(0) is the original, low-pass(0) is all zeros, and high-pass(d >= 1 px) removes the
  mean.
* Grid cells (C4): cell boundaries along an axis of length ``L`` are ``round(k * L / grid)`` with
  halves rounded up (``floor(k * L / grid + 0.5)``), ``k = 0 .. grid``; so the cells tile the image
  exactly for any ``L`` and differ in size by at most one pixel. Rows and columns are 0-based from
  the top-left (the paper's quadrant ``(1, 1)`` is ``row=0, col=0``).
* Boxes (C3) are ``(y0, y1, x0, x1)`` with ``y0, x0`` inclusive and ``y1, x1`` exclusive.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from readingrace.errors import ConfigError, ReadingRaceError

__all__ = [
    "FOURIER_KINDS",
    "PAPER_BAND_EDGES",
    "PAPER_RADII",
    "PAPER_RESOLUTIONS",
    "PERTURBATIONS",
    "apply_perturbation",
    "cell_bounds",
    "clip_intensity",
    "describe_perturbation",
    "drop_cell",
    "fourier_filter",
    "frequency_mask",
    "gaussian_blur",
    "gaussian_noise",
    "hot_box",
    "identity",
    "keep_cell",
    "legacy_clip_normalised",
    "occlude_boxes",
    "paper_band_pairs",
    "paper_cells",
    "paper_grid",
    "resize_images",
]

FOURIER_KINDS: tuple[str, ...] = ("lowpass", "highpass", "bandpass", "notch")
FOURIER_UNITS: tuple[str, ...] = ("pixels", "cycles")
#: C1 radii d (pixels at 224 px) used for low-pass and high-pass.
PAPER_RADII: tuple[int, ...] = (1, 5, 10, 25, 50, 75, 100, 125, 150, 200)
#: C1 band edges: band-pass / notch pairs are every d1 < d2 from these (21 pairs).
PAPER_BAND_EDGES: tuple[int, ...] = (10, 25, 50, 75, 100, 125, 150)
#: C2 resolutions (square side in pixels).
PAPER_RESOLUTIONS: tuple[int, ...] = (512, 320, 240, 160, 80, 60, 40, 32, 24, 16, 8, 4)
PAPER_NOISE_VARIANCE = 0.1
PAPER_CLIP_THRESHOLD = 0.6
PAPER_HOT_THRESHOLD = 0.65
DEFAULT_SEED = 2021


# --------------------------------------------------------------------------------------------
# input handling


def _as_nchw(images: torch.Tensor, where: str) -> tuple[torch.Tensor, bool]:
    """Check a float (N, H, W) / (N, 1, H, W) batch; return it as (N, 1, H, W) and a 3-D flag."""
    if not isinstance(images, torch.Tensor):
        raise ReadingRaceError(f"{where}: images must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise ReadingRaceError(
            f"{where}: images must be a float tensor in [0, 1], got dtype {images.dtype}; "
            "convert with images.float() / 255 (8-bit) first"
        )
    if images.ndim == 3:
        return images.unsqueeze(1), True
    if images.ndim == 4 and images.shape[1] == 1:
        return images, False
    raise ReadingRaceError(
        f"{where}: images must have shape (N, H, W) or (N, 1, H, W), got {tuple(images.shape)}"
    )


def _restore(x: torch.Tensor, three_d: bool) -> torch.Tensor:
    return x.squeeze(1) if three_d else x


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """FFT / interpolation dtype: half types are computed in float32 and cast back."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _number(value: Any, key: str, *, minimum: float | None = None, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"perturbation option '{key}' must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"perturbation option '{key}' must be finite, got {value!r}")
    if minimum is not None and (v <= minimum if strict else v < minimum):
        rel = ">" if strict else ">="
        raise ConfigError(f"perturbation option '{key}' must be {rel} {minimum}, got {value!r}")
    return v


def _int(value: Any, key: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"perturbation option '{key}' must be an integer, got {value!r}")
    v = int(value)
    if minimum is not None and v < minimum:
        raise ConfigError(f"perturbation option '{key}' must be >= {minimum}, got {value!r}")
    return v


def _size_pair(value: Any, key: str) -> tuple[int, int]:
    """An int side or an (h, w) pair of positive ints."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ConfigError(f"perturbation option '{key}' must be an int or [h, w], got {value!r}")
        return _int(value[0], key, minimum=1), _int(value[1], key, minimum=1)
    side = _int(value, key, minimum=1)
    return side, side


# --------------------------------------------------------------------------------------------
# C1: Fourier filters


def _fourier_params(
    kind: Any, radius: Any, unit: Any, reference_size: Any
) -> tuple[str, tuple[float, ...], str, int]:
    """Validate Fourier options; radius comes back as a 1- or 2-tuple of floats."""
    if kind not in FOURIER_KINDS:
        raise ConfigError(f"perturbation option 'kind' must be one of {list(FOURIER_KINDS)}, got {kind!r}")
    if unit not in FOURIER_UNITS:
        raise ConfigError(f"perturbation option 'unit' must be one of {list(FOURIER_UNITS)}, got {unit!r}")
    ref = _int(reference_size, "reference_size", minimum=1)
    if kind in ("lowpass", "highpass"):
        if isinstance(radius, (list, tuple)):
            raise ConfigError(
                f"perturbation option 'radius' for {kind} must be one number, got {radius!r} "
                "(a [d1, d2] pair is for bandpass/notch)"
            )
        return kind, (_number(radius, "radius", minimum=0.0),), unit, ref
    if not isinstance(radius, (list, tuple)) or len(radius) != 2:
        raise ConfigError(f"perturbation option 'radius' for {kind} must be a pair [d1, d2], got {radius!r}")
    d1 = _number(radius[0], "radius", minimum=0.0)
    d2 = _number(radius[1], "radius", minimum=0.0)
    if not d1 < d2:
        raise ConfigError(f"perturbation option 'radius' for {kind} needs d1 < d2, got {radius!r}")
    return kind, (d1, d2), unit, ref


def _inside(h: int, w: int, cycles: float) -> torch.Tensor:
    """Centred bool mask of bins with radius < ``cycles`` (cycles per pixel), computed exactly.

    With bin offsets ky, kx from the centre, r < c  <=>  ky^2 w^2 + kx^2 h^2 < (c h w)^2. The left
    side is an integer (exact in float64 for any realistic size); the threshold is snapped to the
    nearest integer when within float noise of it, so a bin exactly on the circle is never flipped
    by rounding (e.g. d = 25 px at 224 given as 25 / 224 cycles at 112).
    """
    ky = (torch.arange(h, dtype=torch.int64) - h // 2).to(torch.float64)
    kx = (torch.arange(w, dtype=torch.int64) - w // 2).to(torch.float64)
    lhs = (ky[:, None] * w) ** 2 + (kx[None, :] * h) ** 2
    rhs = (cycles * h * w) ** 2
    nearest = round(rhs)
    if abs(rhs - nearest) <= 1e-9 * max(1.0, rhs):
        rhs = float(nearest)
    return lhs < rhs


@lru_cache(maxsize=64)
def _mask_cpu(h: int, w: int, kind: str, radius: tuple[float, ...], unit: str, ref: int) -> torch.Tensor:
    cyc = [r / ref if unit == "pixels" else r for r in radius]
    if kind == "lowpass":
        return _inside(h, w, cyc[0])
    if kind == "highpass":
        return ~_inside(h, w, cyc[0])
    band = _inside(h, w, cyc[1]) & ~_inside(h, w, cyc[0])
    return band if kind == "bandpass" else ~band


def frequency_mask(
    h: int,
    w: int,
    *,
    kind: str,
    radius: float | tuple[float, float],
    unit: str = "pixels",
    reference_size: int = 224,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool (h, w) mask of the *kept* frequencies on the centred (fft-shifted) spectrum.

    See the module notes for the radius convention (pixels at ``reference_size`` or cycles/pixel).
    """
    h = _int(h, "h", minimum=1)
    w = _int(w, "w", minimum=1)
    key = _fourier_params(kind, radius, unit, reference_size)
    return _mask_cpu(h, w, *key).clone().to(device)


@lru_cache(maxsize=64)
def _half_mask_cpu(h: int, w: int, kind: str, radius: tuple[float, ...], unit: str, ref: int) -> torch.Tensor:
    """The rfft2 multiplier equivalent to 'full FFT, centred mask, inverse FFT, real part'.

    Re(ifft2(M * X)) for a real image equals ifft2(Ms * X) with Ms(k) = (M(k) + M(-k)) / 2, which is
    Hermitian-symmetric, so irfft2 of its half spectrum is exact, including even sizes and the
    Nyquist row/column. (For these circular masks Ms == M; the symmetrisation makes it a guarantee.)
    """
    m = torch.fft.ifftshift(_mask_cpu(h, w, kind, radius, unit, ref).to(torch.float64))
    m_neg = torch.roll(torch.flip(m, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
    return (0.5 * (m + m_neg))[:, : w // 2 + 1].contiguous()


def fourier_filter(
    images: torch.Tensor,
    *,
    kind: str,
    radius: float | tuple[float, float],
    unit: str = "pixels",
    reference_size: int = 224,
) -> torch.Tensor:
    """C1: keep the frequencies selected by :func:`frequency_mask` (2-D FFT per image).

    ``kind`` is ``lowpass`` (r < d), ``highpass`` (r >= d), ``bandpass`` (d1 <= r < d2) or
    ``notch`` (removes d1 <= r < d2); ``radius`` is ``d`` or ``(d1, d2)``. Computed with the
    real-input FFT; the result equals the full FFT + inverse + real part to float precision.
    The output is **not clipped**: high-pass images are centred near 0 with negative values.
    """
    x, three_d = _as_nchw(images, "fourier_filter")
    key = _fourier_params(kind, tuple(radius) if isinstance(radius, list) else radius, unit, reference_size)
    h, w = x.shape[-2:]
    work = _work_dtype(x.dtype)
    mult = _half_mask_cpu(h, w, *key).to(device=x.device, dtype=work)
    spectrum = torch.fft.rfft2(x.to(work))
    spectrum.mul_(mult)  # in place on our own spectrum buffer (saves one batch-sized allocation)
    out = torch.fft.irfft2(spectrum, s=(h, w))
    return _restore(out.to(x.dtype), three_d)


# --------------------------------------------------------------------------------------------
# B4: bone-density removal by intensity clipping


def clip_intensity(images: torch.Tensor, *, threshold: float = PAPER_CLIP_THRESHOLD) -> torch.Tensor:
    """B4: set every value above ``threshold`` (default 0.6, i.e. 60% of the [0, 1] range) to it."""
    x, three_d = _as_nchw(images, "clip_intensity")
    t = _number(threshold, "threshold")
    return _restore(torch.clamp(x, max=t), three_d)


def legacy_clip_normalised(
    images: torch.Tensor,
    *,
    threshold: float = PAPER_CLIP_THRESHOLD,
    mean: float = 0.485,
    std: float = 0.229,
) -> torch.Tensor:
    """The original notebooks' B4: clip at ``threshold`` *after* ImageNet normalisation.

    The original normalised ``z = (x - mean) / std`` and then set ``z > threshold`` to
    ``threshold``. In [0, 1] terms that caps intensities at ``mean + threshold * std``
    (0.485 + 0.6 * 0.229 = 0.6224 by default), not at 0.6. This returns the [0, 1]-space image
    (normalise, clip, de-normalise), so the usual normalisation can follow unchanged.
    """
    x, three_d = _as_nchw(images, "legacy_clip_normalised")
    t = _number(threshold, "threshold")
    m = _number(mean, "mean")
    s = _number(std, "std", minimum=0.0, strict=True)
    z = torch.clamp((x - m) / s, max=t)
    return _restore(z * s + m, three_d)


# --------------------------------------------------------------------------------------------
# C2: resolution, noise, blur


def _resize4(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    work = _work_dtype(x.dtype)
    out = F.interpolate(x.to(work), size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.to(x.dtype)


def resize_images(
    images: torch.Tensor, size: int | tuple[int, int], *, back_to: int | tuple[int, int] | None = None
) -> torch.Tensor:
    """C2: anti-aliased bilinear resize to ``size`` (side or (h, w)); optionally back to ``back_to``.

    Downsampling uses ``antialias=True`` (area-weighted, no aliasing); ``back_to`` upsamples the
    low-resolution image to the size the model was trained on.
    """
    x, three_d = _as_nchw(images, "resize_images")
    out = _resize4(x, _size_pair(size, "size"))
    if back_to is not None:
        out = _resize4(out, _size_pair(back_to, "back_to"))
    return _restore(out, three_d)


def _image_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed derived from (seed, image index) by numpy's SeedSequence."""
    a, b = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return ((int(a) << 32) | int(b)) & 0x7FFF_FFFF_FFFF_FFFF


def gaussian_noise(
    images: torch.Tensor,
    *,
    variance: float = PAPER_NOISE_VARIANCE,
    mean: float = 0.0,
    seed: int,
    indices: torch.Tensor | Sequence[int] | None = None,
    legacy_std: bool = False,
    clip: bool = False,
) -> torch.Tensor:
    """C2: add independent Gaussian noise to each image (paper: mean 0, variance 0.1).

    Image ``i`` gets noise from a generator seeded by ``(seed, indices[i])``; ``indices`` are the
    images' global indices in the dataset (default ``0 .. N-1``: pass them when the data come in
    several batches, or every batch repeats the same noise sequence). So an image's noise does not
    depend on its batch, and it is generated on the CPU in float32, so it is the same on CPU and
    CUDA. ``legacy_std=True`` reads ``variance`` as a standard deviation, like the original code
    (0.1 -> sd 0.1, variance 0.01). Not clipped unless ``clip=True`` (then clamped to [0, 1]).
    """
    x, three_d = _as_nchw(images, "gaussian_noise")
    var = _number(variance, "variance", minimum=0.0)
    mu = _number(mean, "mean")
    s = _int(seed, "seed", minimum=0)
    sd = var if legacy_std else math.sqrt(var)
    n = x.shape[0]
    if indices is None:
        idx = list(range(n))
    else:
        idx_t = torch.as_tensor(indices)
        if idx_t.ndim != 1 or idx_t.numel() != n or idx_t.is_floating_point():
            raise ConfigError(
                f"gaussian_noise: 'indices' must be {n} integers (one per image), got shape "
                f"{tuple(idx_t.shape)} dtype {idx_t.dtype}"
            )
        idx = [int(i) for i in idx_t.tolist()]
        if min(idx, default=0) < 0:
            raise ConfigError("gaussian_noise: 'indices' must be non-negative image indices")
    shape = tuple(x.shape[1:])
    noise = torch.empty((n, *shape), dtype=torch.float32)
    for row, i in enumerate(idx):
        gen = torch.Generator().manual_seed(_image_seed(s, i))
        noise[row] = torch.randn(shape, generator=gen, dtype=torch.float32)
    out = x + (noise.to(device=x.device, dtype=x.dtype) * sd + mu)
    if clip:
        out = out.clamp(0.0, 1.0)
    return _restore(out, three_d)


def gaussian_blur(images: torch.Tensor, *, sigma: float, kernel_size: int | None = None) -> torch.Tensor:
    """C2: 2-D Gaussian blur of each image separately (never across the batch axis).

    Separable sampled-Gaussian kernel (MONAI ``gaussian_1d``, normalised to sum 1) with reflect
    padding (MONAI ``separable_filtering``; MONAI's ``GaussianFilter`` pads with zeros, which darkens
    the borders, so it is not used). The kernel spans ``4 * sigma`` each side (``round`` half up)
    unless ``kernel_size`` (odd) is given. ``sigma=0`` or ``kernel_size=1`` returns a copy.
    Reflect padding needs the kernel half-width to be smaller than the image side.
    """
    from monai.networks.layers.convutils import gaussian_1d
    from monai.networks.layers.simplelayers import separable_filtering

    x, three_d = _as_nchw(images, "gaussian_blur")
    sig = _number(sigma, "sigma", minimum=0.0)
    if kernel_size is not None:
        ks = _int(kernel_size, "kernel_size", minimum=1)
        if ks % 2 == 0:
            raise ConfigError(f"perturbation option 'kernel_size' must be odd, got {kernel_size!r}")
        half = ks // 2
    else:
        half = int(max(sig * 4.0, 0.5) + 0.5)
    if sig == 0.0 or half == 0:
        return _restore(x.clone(), three_d)
    h, w = x.shape[-2:]
    if half >= min(h, w):
        raise ConfigError(
            f"gaussian_blur: kernel half-width {half} (sigma {sig}) must be smaller than the image "
            f"side ({h}x{w}) for reflect padding; pass a smaller 'kernel_size' or 'sigma'"
        )
    work = _work_dtype(x.dtype)
    kernel = gaussian_1d(torch.tensor(sig), truncated=half / sig, approx="sampled", normalize=True)
    if kernel.numel() != 2 * half + 1:  # float rounding in MONAI's tail length: rebuild directly
        grid = torch.arange(-half, half + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (grid / sig) ** 2)
        kernel = kernel / kernel.sum()
    kernel = kernel.to(device=x.device, dtype=work)
    out = separable_filtering(x.to(work), [kernel, kernel], mode="reflect")
    return _restore(out.to(x.dtype), three_d)


# --------------------------------------------------------------------------------------------
# C4: 3x3 grid cells


def cell_bounds(h: int, w: int, row: int, col: int, grid: int = 3) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of cell (row, col) of a ``grid`` x ``grid`` tiling (see module notes)."""
    h = _int(h, "h", minimum=1)
    w = _int(w, "w", minimum=1)
    g = _int(grid, "grid", minimum=1)
    r = _int(row, "row", minimum=0)
    c = _int(col, "col", minimum=0)
    if r >= g or c >= g:
        raise ConfigError(f"cell (row {r}, col {c}) is outside a {g}x{g} grid (rows and cols are 0..{g - 1})")
    if g > min(h, w):
        raise ConfigError(f"a {g}x{g} grid needs an image of at least {g}x{g} pixels, got {h}x{w}")

    def edge(k: int, n: int) -> int:  # round(k * n / g), halves up, in exact integer arithmetic
        return (2 * k * n + g) // (2 * g)

    return edge(r, h), edge(r + 1, h), edge(c, w), edge(c + 1, w)


def drop_cell(
    images: torch.Tensor, *, row: int, col: int, grid: int = 3, fill: float = 0.0
) -> torch.Tensor:
    """C4 (1): set cell (row, col) to ``fill`` (0 = black in [0, 1] space)."""
    x, three_d = _as_nchw(images, "drop_cell")
    y0, y1, x0, x1 = cell_bounds(x.shape[-2], x.shape[-1], row, col, grid)
    out = x.clone()
    out[..., y0:y1, x0:x1] = _number(fill, "fill")
    return _restore(out, three_d)


def keep_cell(
    images: torch.Tensor, *, row: int, col: int, grid: int = 3, size: int | tuple[int, int] | None = None
) -> torch.Tensor:
    """C4 (2): crop cell (row, col) and resize it (bilinear, anti-aliased) to full size or ``size``."""
    x, three_d = _as_nchw(images, "keep_cell")
    h, w = x.shape[-2:]
    y0, y1, x0, x1 = cell_bounds(h, w, row, col, grid)
    target = (h, w) if size is None else _size_pair(size, "size")
    return _restore(_resize4(x[..., y0:y1, x0:x1], target), three_d)


# --------------------------------------------------------------------------------------------
# C3: Grad-CAM box occlusion


def hot_box(
    heatmap: torch.Tensor,
    *,
    threshold: float = PAPER_HOT_THRESHOLD,
    image_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """C3: per image, the bounding rectangle of pixels whose min-max-normalised heat >= threshold.

    ``heatmap`` is (N, H, W) or (N, 1, H, W). Returns int64 (N, 4) boxes ``(y0, y1, x0, x1)``.
    A constant heatmap has no hot region and gives the empty box (0, 0, 0, 0) (occludes nothing;
    check ``box area == 0`` to count these). With ``image_size=(H_img, W_img)`` the box is scaled
    outward (floor of starts, ceil of ends) to the image the heatmap was computed for, so a map
    made at another size is never drawn at the wrong scale.
    """
    hm, _ = _as_nchw(heatmap, "hot_box")
    hm = hm[:, 0]
    if torch.isnan(hm).any():
        raise ReadingRaceError("hot_box: heatmap contains NaN; check the Grad-CAM output")
    t = _number(threshold, "threshold")
    if not 0.0 <= t <= 1.0:
        raise ConfigError(f"perturbation option 'threshold' for hot_box must be in [0, 1], got {threshold!r}")
    n, h, w = hm.shape
    lo = hm.amin(dim=(1, 2), keepdim=True)
    span = hm.amax(dim=(1, 2), keepdim=True) - lo
    valid = span > 0
    norm = (hm - lo) / torch.where(valid, span, torch.ones_like(span))
    hot = (norm >= t) & valid
    rows, cols = hot.any(dim=2), hot.any(dim=1)
    ys = torch.arange(h, device=hm.device)
    xs = torch.arange(w, device=hm.device)
    y0 = torch.where(rows, ys, h).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1) + 1
    x0 = torch.where(cols, xs, w).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1) + 1
    boxes = torch.stack([y0, y1, x0, x1], dim=1).to(torch.int64)
    boxes[~valid.view(n)] = 0
    if image_size is not None:
        hi, wi = _size_pair(image_size, "image_size")
        boxes[:, 0] = torch.div(boxes[:, 0] * hi, h, rounding_mode="floor")
        boxes[:, 1] = -torch.div(-boxes[:, 1] * hi, h, rounding_mode="floor")
        boxes[:, 2] = torch.div(boxes[:, 2] * wi, w, rounding_mode="floor")
        boxes[:, 3] = -torch.div(-boxes[:, 3] * wi, w, rounding_mode="floor")
    return boxes


def occlude_boxes(images: torch.Tensor, boxes: torch.Tensor, *, fill: float = 0.0) -> torch.Tensor:
    """C3: set each image's box ``(y0, y1, x0, x1)`` (from :func:`hot_box`) to ``fill``."""
    x, three_d = _as_nchw(images, "occlude_boxes")
    n, _, h, w = x.shape
    b = torch.as_tensor(boxes, device=x.device)
    if b.shape != (n, 4) or b.is_floating_point():
        raise ReadingRaceError(f"occlude_boxes: boxes must be integer ({n}, 4), got {tuple(b.shape)} {b.dtype}")
    bad = (b[:, 0] < 0) | (b[:, 0] > b[:, 1]) | (b[:, 1] > h) | (b[:, 2] < 0) | (b[:, 2] > b[:, 3]) | (b[:, 3] > w)
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        raise ReadingRaceError(
            f"occlude_boxes: box {b[i].tolist()} of image {i} does not fit a {h}x{w} image; "
            "compute boxes at the image size (hot_box(..., image_size=(H, W)))"
        )
    ys = torch.arange(h, device=x.device)
    xs = torch.arange(w, device=x.device)
    in_y = (ys >= b[:, 0:1]) & (ys < b[:, 1:2])
    in_x = (xs >= b[:, 2:3]) & (xs < b[:, 3:4])
    mask = (in_y[:, :, None] & in_x[:, None, :])[:, None]
    return _restore(x.masked_fill(mask, _number(fill, "fill")), three_d)


# --------------------------------------------------------------------------------------------
# registry


def identity(images: torch.Tensor) -> torch.Tensor:
    """No perturbation (a copy), for the baseline arm of a grid."""
    x, three_d = _as_nchw(images, "identity")
    return _restore(x.clone(), three_d)


PERTURBATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "none": identity,
    "fourier": fourier_filter,
    "clip": clip_intensity,
    "legacy_clip": legacy_clip_normalised,
    "noise": gaussian_noise,
    "blur": gaussian_blur,
    "resize": resize_images,
    "drop_cell": drop_cell,
    "keep_cell": keep_cell,
}

_RUNTIME_ONLY = {"indices"}  # passed by the caller, not by a config


def _resolve(spec: Mapping[str, Any]) -> tuple[str, Callable[..., torch.Tensor], dict[str, Any]]:
    """Check a spec's name and keys; return the name, function and full keyword options."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"a perturbation must be a mapping with a 'name' key, got {spec!r}")
    if "name" not in spec:
        raise ConfigError(f"perturbation {dict(spec)!r} has no 'name' (one of {sorted(PERTURBATIONS)})")
    name = spec["name"]
    if name not in PERTURBATIONS:
        raise ConfigError(f"unknown perturbation name {name!r}; known: {sorted(PERTURBATIONS)}")
    fn = PERTURBATIONS[name]
    params = list(inspect.signature(fn).parameters.values())[1:]
    allowed = {p.name: p for p in params if p.name not in _RUNTIME_ONLY}
    options = {k: v for k, v in spec.items() if k != "name"}
    for key in options:
        if key not in allowed:
            raise ConfigError(
                f"unknown key {key!r} for perturbation {name!r}; allowed: {sorted(allowed)}"
            )
    full: dict[str, Any] = {}
    for key, p in allowed.items():
        if key in options:
            full[key] = options[key]
        elif p.default is inspect.Parameter.empty:
            raise ConfigError(f"perturbation {name!r} needs the key {key!r}")
        else:
            full[key] = p.default
    if name == "fourier":
        r = full["radius"]
        full["radius"] = tuple(r) if isinstance(r, list) else r
        _fourier_params(full["kind"], full["radius"], full["unit"], full["reference_size"])
    return name, fn, full


def apply_perturbation(
    images: torch.Tensor,
    spec: Mapping[str, Any],
    *,
    indices: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Apply a named perturbation, e.g. ``{"name": "fourier", "kind": "highpass", "radius": 25}``.

    Unknown names or keys raise :class:`ConfigError` naming them. ``indices`` (global image
    indices) is passed to perturbations that take it (noise), so batches get independent noise.
    """
    name, fn, options = _resolve(spec)
    if "indices" in inspect.signature(fn).parameters:
        options["indices"] = indices
    return fn(images, **options)


def _fmt(v: float) -> str:
    return f"{v:g}"


def describe_perturbation(spec: Mapping[str, Any]) -> str:
    """A one-line human description of a perturbation spec (for reports)."""
    name, _, o = _resolve(spec)
    if name == "none":
        return "no perturbation"
    if name == "fourier":
        kind, radius, unit, ref = _fourier_params(o["kind"], o["radius"], o["unit"], o["reference_size"])
        where = f"px of a {ref}x{ref} image" if unit == "pixels" else "cycles/pixel"
        label = {"lowpass": "low-pass", "highpass": "high-pass", "bandpass": "band-pass", "notch": "notch"}[kind]
        if kind == "lowpass":
            rule = f"keeps r < {_fmt(radius[0])}"
        elif kind == "highpass":
            rule = f"keeps r >= {_fmt(radius[0])}"
        else:
            verb = "keeps" if kind == "bandpass" else "removes"
            rule = f"{verb} {_fmt(radius[0])} <= r < {_fmt(radius[1])}"
        return f"Fourier {label} filter: {rule} {where} (centred 2-D FFT, real part, not clipped)"
    if name == "clip":
        t = _number(o["threshold"], "threshold")
        return f"intensity clip: values above {_fmt(t)} set to {_fmt(t)} ([0, 1] scale)"
    if name == "legacy_clip":
        t, m, s = (_number(o[k], k) for k in ("threshold", "mean", "std"))
        return (
            f"legacy clip after ImageNet normalisation at {_fmt(t)} (mean {_fmt(m)}, std {_fmt(s)}): "
            f"caps [0, 1] intensities at {m + t * s:.4f}"
        )
    if name == "noise":
        v = _number(o["variance"], "variance", minimum=0.0)
        sd = v if o["legacy_std"] else math.sqrt(v)
        tag = " (legacy: the value read as a standard deviation)" if o["legacy_std"] else ""
        clip = ", clipped to [0, 1]" if o["clip"] else ""
        return (
            f"Gaussian noise per image: mean {_fmt(_number(o['mean'], 'mean'))}, variance {sd * sd:.4g}, "
            f"sd {sd:.4g}{tag}, seed {o['seed']}{clip}"
        )
    if name == "blur":
        ks = "" if o["kernel_size"] is None else f", kernel {o['kernel_size']}"
        return f"Gaussian blur per image: sigma {_fmt(_number(o['sigma'], 'sigma'))} px{ks}, reflect padding"
    if name == "resize":
        h, w = _size_pair(o["size"], "size")
        text = f"resized to {h}x{w} (bilinear, anti-aliased)"
        if o["back_to"] is not None:
            bh, bw = _size_pair(o["back_to"], "back_to")
            text += f", then back to {bh}x{bw}"
        return text
    g = o["grid"]
    r, c = o["row"], o["col"]
    where = f"cell (row {r}, col {c}) of a {g}x{g} grid (paper quadrant ({r + 1}, {c + 1}))"
    if name == "drop_cell":
        return f"{where} set to {_fmt(_number(o['fill'], 'fill'))}"
    size = "full size" if o["size"] is None else "{}x{}".format(*_size_pair(o["size"], "size"))
    return f"only {where} kept, resized to {size} (anti-aliased)"


# --------------------------------------------------------------------------------------------
# the paper's grids


def paper_band_pairs() -> list[tuple[int, int]]:
    """The 21 band-pass / notch pairs d1 < d2 from :data:`PAPER_BAND_EDGES`."""
    return list(itertools.combinations(PAPER_BAND_EDGES, 2))


def paper_cells(grid: int = 3) -> list[tuple[int, int]]:
    """The grid cells as 0-based (row, col), row-major (9 for 3x3)."""
    return [(r, c) for r in range(grid) for c in range(grid)]


def paper_grid(*, seed: int = DEFAULT_SEED) -> dict[str, list[dict[str, Any]]]:
    """Perturbation specs of the paper's mechanism experiments, keyed by experiment arm.

    The paper does not state the C2 blur sigma, so blur is not in the grid (choose it in config).
    """
    return {
        "B4-clip": [{"name": "clip", "threshold": PAPER_CLIP_THRESHOLD}],
        "C1-lowpass": [{"name": "fourier", "kind": "lowpass", "radius": d} for d in PAPER_RADII],
        "C1-highpass": [{"name": "fourier", "kind": "highpass", "radius": d} for d in PAPER_RADII],
        "C1-bandpass": [{"name": "fourier", "kind": "bandpass", "radius": p} for p in paper_band_pairs()],
        "C1-notch": [{"name": "fourier", "kind": "notch", "radius": p} for p in paper_band_pairs()],
        "C2-resolution": [{"name": "resize", "size": s} for s in PAPER_RESOLUTIONS],
        "C2-noise": [{"name": "noise", "variance": PAPER_NOISE_VARIANCE, "mean": 0.0, "seed": seed}],
        "C4-drop": [{"name": "drop_cell", "row": r, "col": c} for r, c in paper_cells()],
        "C4-keep": [{"name": "keep_cell", "row": r, "col": c} for r, c in paper_cells()],
    }

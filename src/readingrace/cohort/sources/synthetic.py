"""Synthetic chest-radiograph-like cohorts with a planted, known signal (the demo and the test bed).

Each patient has a base anatomy (body, two lungs, heart, ribs, spine, clavicles, lung markings,
exposure) shared by all of their images; each image moves it slightly (position, rotation,
inspiration, exposure) and adds its own noise, so images of one patient are correlated like real
follow-ups. Every image is its own study. The group label (column ``attribute``) is assigned to
patients independently of everything else; it reaches the pixels only through the planted signal:

- ``none``: nothing (the null control).
- ``texture``: a zero-mean grating of random phase, 24-30 cycles per image width, whose
  orientation depends on the group (0 to 90 degrees, flip-invariant); confined to the body. Kept by
  a resize to 64 px, removed by an anti-aliased resize to 32 px and by thumbnails.
- ``lowfreq``: an additive field of exactly 1 cycle per image width/height
  (``cos(pi u)``, ``cos(pi v)``) whose mix depends on the group: kept by low-pass filters and
  thumbnails, removed by any high-pass filter of radius >= 2.
- ``marker``: a small bright disc (1/20 of the width) inside one cell of the 3x3 grid, contrast by
  group (first group none). Nothing outside that cell depends on the group.

Sex, age and view are drawn independently of the group and do not change the image. Images are
deterministic for a given seed and options; anatomy, noise and metadata do not depend on the
signal, so cohorts that differ only in ``signal``/``strength`` differ only by the planted signal.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from readingrace.cohort.manifest import Manifest
from readingrace.cohort.schema import RACE_GROUPS, SEX_VALUES, conform
from readingrace.errors import CohortError, ConfigError

#: Bumped whenever the images for given options change; part of the content address.
GENERATOR_VERSION = 1
SIGNALS: tuple[str, ...] = ("none", "texture", "lowfreq", "marker")
#: Texture frequencies, cycles per image width (drawn uniformly per image).
TEXTURE_BAND: tuple[float, float] = (25.0, 31.0)
#: Texture amplitude at strength 1 (on the [0, 1] scale; the grating spans +-amplitude).
TEXTURE_AMPLITUDE = 0.02
#: Low-frequency field amplitude at strength 1.
LOWFREQ_AMPLITUDE = 0.035
#: Marker contrast of the last group at strength 1 (fraction of the way to white, capped at 1).
MARKER_CONTRAST = 0.9
#: Marker diameter as a fraction of the image width.
MARKER_DIAMETER = 1 / 20
#: Scanner look; ``noise`` is the std of additive Gaussian noise, ``blur`` a Gaussian sigma in pixels
#: of the generated image, ``contrast`` a gain around 0.5, ``gamma`` an exponent on [0, 1].
APPEARANCE_DEFAULTS: dict[str, float] = {"gamma": 1.0, "contrast": 1.0, "noise": 0.01, "blur": 0.0}
#: Columns reserved by the cohort table; ``attribute`` may be ``race``, ``sex`` or a new name.
_RESERVED = ("image_id", "path", "patient_id", "study_id", "dataset", "age", "bmi", "view", "split",
             "signal", "strength", "marker_x", "marker_y")
_CHUNK = 8  # images rendered at once; fixed so that the noise stream is the same on every run
_N_MARKINGS = 8


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticOptions:
    """Validated generator options (the keywords of :func:`generate_cohort`)."""

    n_patients: int = 300
    images_per_patient: tuple[int, int] = (1, 3)
    attribute: str = "race"
    groups: tuple[str, ...] = ("Asian", "Black", "White")
    group_weights: tuple[float, ...] | None = None
    signal: str = "texture"
    strength: float = 1.0
    marker_cell: tuple[int, int] = (0, 0)
    size: int = 128
    seed: int = 2021
    site: str = "synthetic"
    appearance: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> SyntheticOptions:
        """Check and normalise options; raise :class:`ConfigError` naming the bad key."""
        options = dict(options or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"synthetic cohort: unknown option(s) {unknown}; known options: {known}")
        o = {**{f.name: getattr(cls, f.name, None) for f in fields(cls) if f.name != "appearance"},
             "appearance": {}, **options}
        n_patients = _int(o["n_patients"], "n_patients", lo=1)
        ipp = o["images_per_patient"]
        if not isinstance(ipp, (list, tuple)) or len(ipp) != 2:
            raise ConfigError(f"synthetic cohort: images_per_patient must be [min, max], got {ipp!r}")
        lo, hi = (_int(x, "images_per_patient", lo=1) for x in ipp)
        if lo > hi:
            raise ConfigError(f"synthetic cohort: images_per_patient {list(ipp)}: min exceeds max")
        attribute = o["attribute"]
        if not isinstance(attribute, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", attribute) \
                or attribute in _RESERVED:
            raise ConfigError(
                f"synthetic cohort: attribute {attribute!r} must be 'race', 'sex' or a new column name "
                f"(letters, digits, underscore), not one of {list(_RESERVED)}")
        groups = o["groups"]
        if isinstance(groups, str) or not isinstance(groups, Sequence):
            raise ConfigError(f"synthetic cohort: groups must be a list of names, got {groups!r}")
        groups = tuple(groups)
        if len(groups) < 2 or any(not isinstance(g, str) or not g.strip() for g in groups) \
                or len(set(groups)) != len(groups):
            raise ConfigError(f"synthetic cohort: groups {list(groups)} must be >= 2 distinct non-empty names")
        if attribute == "sex" and not set(groups) <= set(SEX_VALUES):
            raise ConfigError(
                f"synthetic cohort: attribute 'sex' needs groups from {list(SEX_VALUES)}, got {list(groups)}")
        weights = o["group_weights"]
        if weights is not None:
            try:
                w = np.asarray([float(x) for x in weights])
            except (TypeError, ValueError):
                raise ConfigError(f"synthetic cohort: group_weights must be numbers, got {weights!r}") from None
            if len(w) != len(groups) or not np.all(np.isfinite(w)) or np.any(w <= 0):
                raise ConfigError(
                    f"synthetic cohort: group_weights {list(weights)} must be {len(groups)} positive numbers "
                    f"(one per group {list(groups)})")
            weights = tuple(float(x) for x in w / w.sum())
        signal = o["signal"]
        if signal not in SIGNALS:
            raise ConfigError(f"synthetic cohort: signal {signal!r} unknown; choose one of {list(SIGNALS)}")
        strength = _float(o["strength"], "strength", lo=0.0)
        cell = o["marker_cell"]
        if not isinstance(cell, (list, tuple)) or len(cell) != 2 \
                or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c <= 2 for c in cell):
            raise ConfigError(f"synthetic cohort: marker_cell must be [row, col] with values 0-2, got {cell!r}")
        size = _int(o["size"], "size", lo=32)
        if signal == "texture" and size < 64:
            raise ConfigError(
                f"synthetic cohort: size {size} cannot hold the texture signal ({TEXTURE_BAND[1]:g} cycles "
                "per width needs >= 64 px); use size >= 64")
        seed = _int(o["seed"], "seed", lo=0)
        site = o["site"]
        if not isinstance(site, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", site):
            raise ConfigError(f"synthetic cohort: site {site!r} must be letters, digits, '.', '_' or '-'")
        appearance = o["appearance"] or {}
        if not isinstance(appearance, Mapping):
            raise ConfigError(f"synthetic cohort: appearance must be a mapping, got {appearance!r}")
        bad = sorted(set(appearance) - set(APPEARANCE_DEFAULTS))
        if bad:
            raise ConfigError(
                f"synthetic cohort: unknown appearance key(s) {bad}; known: {sorted(APPEARANCE_DEFAULTS)}")
        app = {k: _float(appearance.get(k, v), f"appearance.{k}", lo=0.0) for k, v in APPEARANCE_DEFAULTS.items()}
        for k in ("gamma", "contrast"):
            if app[k] <= 0:
                raise ConfigError(f"synthetic cohort: appearance.{k} must be > 0, got {app[k]}")
        return cls(n_patients, (lo, hi), attribute, groups, weights, signal, strength,
                   (int(cell[0]), int(cell[1])), size, seed, site, app)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready options (lists for tuples)."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def digest(self) -> str:
        """Content address: 12 hex digits of the SHA-256 of the options and the generator version."""
        blob = json.dumps({"version": GENERATOR_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _int(v: Any, key: str, *, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ConfigError(f"synthetic cohort: {key} must be an integer >= {lo}, got {v!r}")
    return int(v)


def _float(v: Any, key: str, *, lo: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
            or not math.isfinite(v) or v < lo:
        raise ConfigError(f"synthetic cohort: {key} must be a finite number >= {lo}, got {v!r}")
    return float(v)


def options_hash(options: Mapping[str, Any] | None) -> str:
    """The content address of ``options`` (defaults filled in): same options -> same folder."""
    return SyntheticOptions.from_mapping(options).digest()


# --------------------------------------------------------------------------------------------
# ground truth of the planted signals
# --------------------------------------------------------------------------------------------
def texture_angles(n_groups: int) -> np.ndarray:
    """Texture wave-vector angle per group, degrees from the x axis: evenly 0..90.

    Angle 0 means the intensity varies along x (vertical stripes). Angles in [0, 90] stay distinct
    under horizontal flips (theta -> 180 - theta), so flip augmentation does not merge groups.
    """
    return np.linspace(0.0, 90.0, n_groups)


def lowfreq_weights(n_groups: int) -> np.ndarray:
    """Per group, the weights (a, b) of ``cos(pi u)`` and ``cos(pi v)`` in the low-frequency field."""
    phi = 2 * np.pi * np.arange(n_groups) / n_groups
    return np.stack([np.cos(phi), np.sin(phi)], axis=1)


def marker_contrasts(n_groups: int, strength: float = 1.0) -> np.ndarray:
    """Marker contrast per group: 0 for the first group, rising linearly, capped at 1."""
    return np.minimum(1.0, strength * MARKER_CONTRAST * np.arange(n_groups) / (n_groups - 1))


def cell_bounds(size: int, cell: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel bounds (row0, row1, col0, col1), half-open, of a cell of the 3x3 grid (edges i*size//3)."""
    r, c = cell
    return (r * size) // 3, ((r + 1) * size) // 3, (c * size) // 3, ((c + 1) * size) // 3


def signal_truth(opts: SyntheticOptions) -> dict[str, Any]:
    """What was planted, per group, as recorded in ``generator.json``."""
    g = list(opts.groups)
    truth: dict[str, Any] = {"signal": opts.signal, "strength": opts.strength}
    if opts.signal == "texture":
        truth.update(band_cycles_per_width=list(TEXTURE_BAND), amplitude=TEXTURE_AMPLITUDE * opts.strength,
                     angle_deg=dict(zip(g, texture_angles(len(g)).tolist())), region="body")
    elif opts.signal == "lowfreq":
        w = lowfreq_weights(len(g)) * LOWFREQ_AMPLITUDE * opts.strength
        truth.update(cycles_per_width=1, field="a*cos(pi*u) + b*cos(pi*v), u, v in [-1, 1]",
                     weights={k: [round(float(x), 6) for x in row] for k, row in zip(g, w)})
    elif opts.signal == "marker":
        truth.update(cell=list(opts.marker_cell), cell_bounds_px=list(cell_bounds(opts.size, opts.marker_cell)),
                     diameter_px=MARKER_DIAMETER * opts.size,
                     contrast=dict(zip(g, marker_contrasts(len(g), opts.strength).tolist())))
    return truth


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------
@dataclass
class _Draws:
    table: pd.DataFrame
    patient_index: np.ndarray  # (N,) patient of each image
    group_index: np.ndarray  # (N,) group of each image
    anatomy: dict[str, np.ndarray]  # per patient
    image: dict[str, np.ndarray]  # per image
    signal: dict[str, np.ndarray]  # per image


def _allocate(n: int, weights: np.ndarray) -> np.ndarray:
    """Largest-remainder counts summing to n."""
    raw = n * weights
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts


def _draw(opts: SyntheticOptions) -> _Draws:
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(opts.seed).spawn(5)]
    r_group, r_meta, r_anat, r_img, r_sig = streams
    P, K = opts.n_patients, len(opts.groups)
    weights = np.asarray(opts.group_weights or [1.0 / K] * K)
    pgroup = r_group.permutation(np.repeat(np.arange(K), _allocate(P, weights)))

    lo, hi = opts.images_per_patient
    n_img = r_meta.integers(lo, hi + 1, size=P)
    N = int(n_img.sum())
    pidx = np.repeat(np.arange(P), n_img)
    first = np.concatenate([[0], np.cumsum(n_img)[:-1]])
    j = np.arange(N) - first[pidx]  # image number within the patient
    sex = r_meta.choice(np.asarray(SEX_VALUES), size=P)
    race = r_meta.choice(np.asarray(RACE_GROUPS), size=P)
    base_age = np.clip(r_meta.normal(58, 17, size=P), 18, 95)
    gaps = np.where(j == 0, 0.0, r_meta.exponential(1.0, size=N))
    age = np.floor(base_age[pidx] + _cumsum_by(gaps, pidx)).astype(int)
    view = np.where(r_meta.random(N) < 0.45, "AP", "PA")

    u = lambda a, b: r_anat.uniform(a, b, size=P)  # noqa: E731
    anatomy = {
        "bg": u(0.15, 0.19), "tissue": u(0.50, 0.58), "body_w": u(0.72, 0.88),
        "lung_cx": u(0.27, 0.32), "lung_cy": u(-0.12, -0.04), "lung_a": u(0.21, 0.27),
        "lung_b": u(0.48, 0.58), "lung_depth": u(0.26, 0.33),
        "heart_cx": u(0.09, 0.15), "heart_cy": u(0.20, 0.27), "heart_a": u(0.25, 0.31),
        "heart_b": u(0.19, 0.24), "heart_rot": u(-0.55, -0.30), "heart_add": u(0.06, 0.10),
        "spine_w": u(0.055, 0.075), "bone": u(0.12, 0.17),
        "rib_period": u(0.19, 0.23), "rib_phase": u(0.0, 1.0), "rib_curv": u(0.6, 0.9),
        "clav_y": u(-0.70, -0.60), "clav_slope": u(0.15, 0.35),
        "exp_gx": r_anat.normal(0, 0.03, P), "exp_gy": r_anat.normal(0, 0.03, P), "exp_c": u(-0.06, 0.0),
        "gain": r_anat.normal(1.0, 0.05, P), "lf_u": r_anat.normal(0, 0.015, P), "lf_v": r_anat.normal(0, 0.015, P),
        "mk_f": r_anat.uniform(2.0, 10.0, (P, _N_MARKINGS)), "mk_ang": r_anat.uniform(0, np.pi, (P, _N_MARKINGS)),
        "mk_phase": r_anat.uniform(0, 2 * np.pi, (P, _N_MARKINGS)),
    }
    image = {
        "dx": r_img.normal(0, 0.02, N), "dy": r_img.normal(0, 0.02, N), "rot": r_img.normal(0, 0.025, N),
        "gain": r_img.normal(1.0, 0.02, N), "offset": r_img.normal(0, 0.006, N), "insp": r_img.normal(1.0, 0.02, N),
        # smooth exposure field on the 1-cycle basis of the lowfreq signal (its nuisance): patient + image
        "lf_u": r_img.normal(0, 0.013, N), "lf_v": r_img.normal(0, 0.013, N),
    }
    signal = {
        "tex_f": r_sig.uniform(*TEXTURE_BAND, N), "tex_jitter": r_sig.normal(0, np.deg2rad(3.0), N),
        "tex_phase": r_sig.uniform(0, 2 * np.pi, N),
        "mark_r": r_sig.random(N), "mark_c": r_sig.random(N),
    }

    width = max(5, len(str(P - 1)))
    pid = np.array([f"{opts.site}-p{i:0{width}d}" for i in range(P)])[pidx]
    image_id = np.char.add(np.char.add(pid.astype(str), "-i"), j.astype(str))
    gidx = pgroup[pidx]
    table = pd.DataFrame({
        "image_id": image_id, "path": np.char.add(np.char.add("images/", image_id), ".png"),
        "patient_id": pid, "study_id": np.char.add(np.char.add(pid.astype(str), "-s"), j.astype(str)),
        "dataset": opts.site, "race": race[pidx], "sex": sex[pidx], "age": age, "view": view,
    })
    table[opts.attribute] = np.asarray(opts.groups, dtype=object)[gidx]
    table["signal"] = opts.signal
    table["strength"] = opts.strength
    if opts.signal == "marker":
        mr, mc = _marker_centres(opts, signal)
        table["marker_y"] = (mr + 0.5) / opts.size
        table["marker_x"] = (mc + 0.5) / opts.size
    return _Draws(table, pidx, gidx, anatomy, image, signal)


def _cumsum_by(x: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Cumulative sum of x restarting at each new value of the (sorted) key."""
    c = np.cumsum(x)
    starts = np.r_[0, np.flatnonzero(np.diff(key)) + 1]
    base = np.repeat(c[starts] - x[starts], np.diff(np.r_[starts, len(x)]))
    return c - base


def _marker_centres(opts: SyntheticOptions, sig: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Marker centre (row, col) in pixels: jittered inside the cell, disc and a margin never crossing it."""
    r0, r1, c0, c1 = cell_bounds(opts.size, opts.marker_cell)
    margin = MARKER_DIAMETER * opts.size / 2 + 1.5 + max(1.0, opts.size / 64)
    rows = r0 + margin + sig["mark_r"] * (r1 - r0 - 1 - 2 * margin)
    cols = c0 + margin + sig["mark_c"] * (c1 - c0 - 1 - 2 * margin)
    return rows, cols


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------
def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * z)


def _smoothstep(z: np.ndarray) -> np.ndarray:
    t = np.clip(z, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _waves(us: np.ndarray, vs: np.ndarray, fx: np.ndarray, fy: np.ndarray, ph: np.ndarray) -> np.ndarray:
    """Sum over k of cos(fx_k us + fy_k vs + ph_k), separably (a batched matrix product).

    ``us`` (B, 1, W) and ``vs`` (B, H, 1) are coordinates; ``fx``, ``fy``, ``ph`` are (B, K).
    """
    au = us * fx[:, :, None]  # (B, K, W)
    bv = vs * fy[:, None, :] + ph[:, None, :]  # (B, H, K)
    left = np.concatenate([np.cos(bv), -np.sin(bv)], axis=2)  # (B, H, 2K)
    right = np.concatenate([np.cos(au), np.sin(au)], axis=1)  # (B, 2K, W)
    return np.matmul(left, right)


def _render_chunk(opts: SyntheticOptions, d: _Draws, idx: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Images ``idx`` as float32 (B, H, W) in [0, 1] before quantisation."""
    n = opts.size
    f32 = np.float32
    c = (np.arange(n, dtype=f32) + f32(0.5)) * f32(2.0 / n) - f32(1.0)
    U, V = c[None, None, :], c[:, None][None]  # image coordinates in [-1, 1], v downwards
    p = d.patient_index[idx]
    A = {k: v[p].astype(f32)[:, None, None] for k, v in d.anatomy.items() if v.ndim == 1}
    im = {k: v[idx].astype(f32)[:, None, None] for k, v in d.image.items()}

    cu, cv = U - im["dx"], V - im["dy"]
    cr, sr = np.cos(im["rot"]), np.sin(im["rot"])
    x, y = cr * cu + sr * cv, cr * cv - sr * cu  # anatomical coordinates
    ax = np.abs(x)

    # body: a superellipse torso with rounded shoulders, plus the neck; soft edges (tissue tapers)
    q = np.square(np.square(x / A["body_w"])) + np.square(np.square((y - f32(0.45)) / f32(1.35)))
    body = _smoothstep((1 - np.sqrt(np.sqrt(q))) * f32(10.0))
    neck = _smoothstep((f32(0.16) - ax) * f32(20.0)) * _smoothstep((f32(-0.55) - y) * f32(6.0))
    body = np.maximum(body, neck)

    # lungs (two ellipses tapering to the apex; height varies with inspiration) occluded by the heart
    lb = A["lung_b"] * im["insp"]
    dy2 = np.square((y - A["lung_cy"]) / lb)
    taper = 1 + f32(0.6) * np.maximum(A["lung_cy"] - y, 0) / lb
    lungs = np.zeros_like(x)
    for s in (-1.0, 1.0):
        e = np.square((x - f32(s) * A["lung_cx"]) / A["lung_a"]) * taper + dy2
        lungs = np.maximum(lungs, _sigmoid((1 - np.sqrt(e)) * f32(30.0)))
    hc, hs = np.cos(A["heart_rot"]), np.sin(A["heart_rot"])
    hx, hy = x - A["heart_cx"], y - A["heart_cy"]
    e = np.square((hc * hx + hs * hy) / A["heart_a"]) + np.square((hc * hy - hs * hx) / A["heart_b"])
    heart = _sigmoid((1 - np.sqrt(e)) * f32(20.0))
    lungs = lungs * (1 - f32(0.9) * heart)

    # lung markings: a few smooth random waves (2-10 cycles per width), per patient
    f = d.anatomy["mk_f"][p].astype(f32) * f32(np.pi / 2)
    a = d.anatomy["mk_ang"][p].astype(f32)
    mk = _waves(cu, cv, f * np.cos(a), f * np.sin(a), d.anatomy["mk_phase"][p].astype(f32))
    mk *= f32(0.03 / math.sqrt(_N_MARKINGS))

    # bones: ribs (curved bands inside the thorax), spine with vertebrae, clavicles
    t = (y - A["rib_curv"] * x * x) / A["rib_period"] - A["rib_phase"]
    t -= np.round(t)
    thorax = _sigmoid((1 - np.sqrt(np.square(x / (A["lung_cx"] + A["lung_a"] + f32(0.04)))
                                   + np.square((y - A["lung_cy"]) / (lb + f32(0.04))))) * f32(20.0))
    ribs = np.exp(np.square(t) * f32(-0.5 / 0.18**2)) * thorax * (1 - f32(0.7) * heart)
    vertebrae = f32(0.8) + f32(0.2) * np.square(np.cos(y * f32(np.pi / 0.09)))
    spine = _smoothstep((A["spine_w"] - ax) * f32(40.0)) * vertebrae * (1 - f32(0.6) * heart)
    dist = (y - A["clav_y"] + A["clav_slope"] * (ax - f32(0.08))) * f32(1 / 0.035)
    clav = np.exp(-np.square(dist)) * _smoothstep((ax - f32(0.07)) * f32(25.0)) \
        * _smoothstep((f32(0.6) - ax) * f32(16.0))

    img = A["bg"] + (A["tissue"] - A["bg"]) * body
    img += (mk - A["lung_depth"]) * lungs + A["heart_add"] * heart
    img += A["bone"] * (f32(0.6) * ribs + (spine + f32(0.7) * clav) * body)
    exposure = 1 + A["exp_gx"] * U + A["exp_gy"] * V + A["exp_c"] * (U * U + V * V)
    img = img * (A["gain"] * im["gain"] * exposure) + im["offset"]
    img += (A["lf_u"] + im["lf_u"]) * np.cos(f32(np.pi) * U) + (A["lf_v"] + im["lf_v"]) * np.cos(f32(np.pi) * V)

    k = d.group_index[idx]
    amp = opts.strength
    if opts.signal == "texture" and amp > 0:
        s = {kk: v[idx].astype(f32)[:, None] for kk, v in d.signal.items()}
        theta = np.deg2rad(texture_angles(len(opts.groups))).astype(f32)[k][:, None] + s["tex_jitter"]
        w = s["tex_f"] * f32(np.pi)
        img += f32(TEXTURE_AMPLITUDE * amp) * _waves(U, V, w * np.cos(theta), w * np.sin(theta), s["tex_phase"]) * body
    elif opts.signal == "lowfreq" and amp > 0:
        w = (lowfreq_weights(len(opts.groups)) * LOWFREQ_AMPLITUDE * amp).astype(f32)[k]
        img += w[:, 0, None, None] * np.cos(f32(np.pi) * U) + w[:, 1, None, None] * np.cos(f32(np.pi) * V)

    app = opts.appearance
    if app["blur"] > 0:
        img = ndimage.gaussian_filter(img, sigma=(0, app["blur"], app["blur"]), mode="reflect")

    if opts.signal == "marker" and amp > 0:
        _add_marker(img, opts, d, idx, k)

    if app["contrast"] != 1.0:
        img = f32(0.5) + f32(app["contrast"]) * (img - f32(0.5))
    if app["gamma"] != 1.0:
        img = np.power(np.clip(img, 0, 1), f32(app["gamma"]))
    img += f32(app["noise"]) * noise
    return np.clip(img, 0.0, 1.0)


def _add_marker(img: np.ndarray, opts: SyntheticOptions, d: _Draws, idx: np.ndarray, k: np.ndarray) -> None:
    """Blend a soft disc towards white inside the marker cell only (in place)."""
    r0, r1, c0, c1 = cell_bounds(opts.size, opts.marker_cell)
    rows, cols = _marker_centres(opts, {kk: v[idx] for kk, v in d.signal.items()})
    radius = MARKER_DIAMETER * opts.size / 2
    rr = np.arange(r0, r1, dtype=np.float32)[None, :, None]
    cc = np.arange(c0, c1, dtype=np.float32)[None, None, :]
    dist = np.sqrt(np.square(rr - rows.astype(np.float32)[:, None, None])
                   + np.square(cc - cols.astype(np.float32)[:, None, None]))
    disc = np.clip(np.float32(radius + 0.5) - dist, 0.0, 1.0)
    contrast = marker_contrasts(len(opts.groups), opts.strength).astype(np.float32)[k][:, None, None]
    cell = img[:, r0:r1, c0:c1]
    img[:, r0:r1, c0:c1] = cell + contrast * disc * (np.float32(0.95) - cell)


def _iter_images(opts: SyntheticOptions, d: _Draws) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first index, uint8 images (B, H, W)) chunk by chunk."""
    r_noise = np.random.default_rng(np.random.SeedSequence([opts.seed, 7919]))
    N = len(d.table)
    for start in range(0, N, _CHUNK):
        idx = np.arange(start, min(N, start + _CHUNK))
        noise = r_noise.standard_normal((len(idx), opts.size, opts.size), dtype=np.float32)
        img = _render_chunk(opts, d, idx, noise)
        yield start, np.rint(img * np.float32(255)).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------
def render_cohort(**options: Any) -> tuple[pd.DataFrame, np.ndarray]:
    """The cohort table and its images in memory: uint8 (N, size, size), exactly the PNG contents.

    Takes the keywords of :func:`generate_cohort` (without ``out_dir``); paths are relative.
    """
    opts = SyntheticOptions.from_mapping(options)
    d = _draw(opts)
    images = np.empty((len(d.table), opts.size, opts.size), dtype=np.uint8)
    for start, chunk in _iter_images(opts, d):
        images[start:start + len(chunk)] = chunk
    return d.table, images


def generate_cohort(
    out_dir: Path,
    *,
    n_patients: int = 300,
    images_per_patient: tuple[int, int] = (1, 3),
    attribute: str = "race",
    groups: Sequence[str] = ("Asian", "Black", "White"),
    group_weights: Sequence[float] | None = None,
    signal: str = "texture",
    strength: float = 1.0,
    marker_cell: tuple[int, int] = (0, 0),
    size: int = 128,
    seed: int = 2021,
    site: str = "synthetic",
    appearance: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Write ``out_dir/images/<image_id>.png`` (8-bit grayscale), ``cohort.csv`` and ``generator.json``.

    Returns the cohort table (paths relative to ``out_dir``). ``images_per_patient`` is an inclusive
    range; each image is its own study. ``out_dir`` must not already hold a cohort.
    """
    opts = SyntheticOptions.from_mapping(dict(
        n_patients=n_patients, images_per_patient=images_per_patient, attribute=attribute, groups=groups,
        group_weights=group_weights, signal=signal, strength=strength, marker_cell=marker_cell, size=size,
        seed=seed, site=site, appearance=appearance))
    return _write(Path(out_dir), opts)


def _write(out: Path, opts: SyntheticOptions) -> pd.DataFrame:
    img_dir = out / "images"
    if (out / "cohort.csv").exists() or (img_dir.is_dir() and any(img_dir.iterdir())):
        raise ConfigError(f"{out} already holds a cohort; choose an empty or new folder")
    img_dir.mkdir(parents=True, exist_ok=True)
    d = _draw(opts)
    paths = d.table["path"].to_numpy()
    for start, chunk in _iter_images(opts, d):
        for i, a in enumerate(chunk):
            Image.fromarray(a).save(out / paths[start + i], format="PNG", compress_level=6)
    d.table.to_csv(out / "cohort.csv", index=False)
    meta = {
        "generator": "readingrace.cohort.sources.synthetic", "version": GENERATOR_VERSION,
        "hash": opts.digest(), "options": opts.to_dict(), "truth": signal_truth(opts),
        "n_images": len(d.table), "n_patients": opts.n_patients,
        "studies": "one study per image",
    }
    (out / "generator.json").write_text(json.dumps(meta, indent=2))
    return d.table


def read_table(folder: Path) -> pd.DataFrame:
    """Read a generated ``cohort.csv`` back with the types it was written with (paths relative)."""
    meta = json.loads((folder / "generator.json").read_text())
    attribute = meta["options"]["attribute"]
    text = {c: str for c in ("image_id", "path", "patient_id", "study_id", "dataset", "race", "sex", "view",
                             "signal", attribute)}
    return pd.read_csv(folder / "cohort.csv", dtype=text, keep_default_na=False, na_values=[""])


def _check_complete(folder: Path, opts: SyntheticOptions) -> None:
    """Raise :class:`CohortError` unless ``folder`` holds the whole cohort for ``opts``."""
    why = ""
    try:
        meta = json.loads((folder / "generator.json").read_text())
        table = read_table(folder)
    except (OSError, ValueError, KeyError) as exc:
        why = f"cannot read generator.json/cohort.csv ({exc})"
    else:
        if meta.get("hash") != opts.digest() or meta.get("version") != GENERATOR_VERSION:
            why = "generator.json records other options or another generator version"
        elif len(table) != meta.get("n_images"):
            why = f"cohort.csv has {len(table)} rows, generator.json says {meta.get('n_images')}"
        else:
            missing = [p for p in table["path"] if not (folder / p).is_file()]
            if missing:
                why = f"{len(missing)} image files missing (e.g. {missing[0]})"
    if why:
        raise CohortError(f"{folder} is not a complete synthetic cohort for these options: {why}; "
                          "delete the folder and run again")


def load(options: dict[str, Any], data_root: Path, manifest: Manifest) -> pd.DataFrame:
    """Source entry: generate (or reuse) ``data_root/synthetic-<hash>`` and return the conformed table.

    Generation writes to a temporary folder renamed into place when complete, so an interrupted run
    never leaves a folder that looks complete. Paths in the returned table are absolute.
    """
    opts = SyntheticOptions.from_mapping(options)
    root = Path(data_root)
    folder = root / f"synthetic-{opts.digest()}"
    reused = folder.exists()
    if reused:
        _check_complete(folder, opts)
    else:
        tmp = root / f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            root.mkdir(parents=True, exist_ok=True)
            _write(tmp, opts)
            try:
                os.rename(tmp, folder)
            except OSError:
                if not folder.exists():
                    raise
                reused = True  # another process finished the same cohort first
                _check_complete(folder, opts)
        except OSError as exc:
            raise CohortError(f"cannot write the synthetic cohort under {root}: {exc}; "
                              "choose a writable data root") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    table = read_table(folder)
    manifest.source = manifest.source or "synthetic"
    manifest.add_input(folder / "generator.json")
    manifest.add_input(folder / "cohort.csv")
    manifest.counts["generator"] = {**opts.to_dict(), "version": GENERATOR_VERSION, "hash": opts.digest(),
                                    "folder": folder.name, "reused": reused, "truth": signal_truth(opts)}
    manifest.step("generated", table.iloc[0:0], table,
                  detail=f"synthetic cohort {folder.name} ({'reused' if reused else 'generated'})")
    table["path"] = [str((folder / p).resolve()) for p in table["path"]]
    return conform(table)

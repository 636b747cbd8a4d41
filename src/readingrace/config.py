"""Typed, validated experiment configs: YAML in, dataclasses out, clear errors for bad keys.

A config may ``extends:`` another YAML file (path relative to itself); mappings merge recursively,
the child winning. Unknown keys and wrong types raise :class:`ConfigError` naming the key path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from readingrace.errors import ConfigError


@dataclass
class CohortConfig:
    """Who is in the study and what is predicted."""

    source: str = "synthetic"
    options: dict[str, Any] = field(default_factory=dict)
    data_root: str | None = None
    target: str = "race"
    min_prevalence: float = 0.01
    views: list[str] | None = None
    #: Keep only images whose column takes one of the values, e.g. ``{age_group: "40-60"}`` or
    #: ``{sex: [F]}``: training and testing within a stratum (B1 BMI groups, B5 age and sex).
    where: dict[str, Any] = field(default_factory=dict)
    max_images: int | None = None


@dataclass
class SplitConfig:
    ratios: list[float] = field(default_factory=lambda: [0.6, 0.1, 0.3])
    seed: int = 2021


@dataclass
class ImageConfig:
    size: int = 64
    mode: str = "stretch"
    bit_depth: int | None = None
    cache_dtype: str = "float32"
    cache_dir: str | None = None


@dataclass
class ModelConfig:
    name: str = "resnet18"
    weights: str | None = None


@dataclass
class AugmentConfig:
    flip: bool = True
    rotate: float = 15.0
    zoom: float = 0.1


@dataclass
class TrainConfig:
    batch_size: int = 32
    max_epochs: int = 40
    lr: float = 1e-3
    lr_factor: float = 0.1
    lr_patience: int = 2
    early_stopping_patience: int = 5
    seeds: list[int] = field(default_factory=lambda: [2021])
    precision: str = "auto"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    num_threads: int | None = None
    #: Lightning placement: accelerator "auto" | "cpu" | "gpu"; devices per node; strategy "auto" |
    #: "ddp" (multi-GPU / multi-node, or CPU processes with the gloo backend); num_nodes.
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    num_nodes: int = 1


@dataclass
class EvaluateConfig:
    n_bootstrap: int = 1000
    level: float = 0.95
    threshold: float = 0.5
    strata: list[str] = field(default_factory=list)
    study_level: bool = False
    reference: bool = True
    #: C3: Grad-CAM galleries (correct and wrong per class) and the hot-box occlusion test, first seed.
    gradcam_gallery: bool = False
    occlusion: bool = False
    occlusion_threshold: float = 0.65
    lungs: LungsConfig = field(default_factory=lambda: LungsConfig())


@dataclass
class LungsConfig:
    """C3 lung-only / non-lung test images (explain/lungs.py); on when any mask source is given.

    Masks come from ``masks_csv`` (``image_id, mask_path``, paths relative to the CSV's folder),
    from a U-Net trained at run time on ``unet_pairs`` (a pairs CSV: ``image, mask``) and/or on the
    user's masks, or from ``unet_weights`` (saved by ``save_lung_unet``). Relative config paths are
    relative to the current directory. Test images without a user mask get a predicted one
    (``missing: unet``) or are excluded (``missing: exclude``). A mask is usable when its lung
    fraction lies in [min_lung_fraction, max_lung_fraction] and, with ``two_lungs``, it has two
    regions side by side, one on each side of the vertical midline; the others are excluded and counted.
    """

    masks_csv: str | None = None
    unet_pairs: str | None = None
    unet_weights: str | None = None
    missing: str = "unet"
    unet_size: int | None = None
    unet_epochs: int = 20
    unet_seed: int = 2021
    unet_batch_size: int = 8
    unet_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    min_lung_fraction: float = 0.1
    max_lung_fraction: float = 0.5
    two_lungs: bool = True
    gallery_images: int = 12

    @property
    def enabled(self) -> bool:
        return any((self.masks_csv, self.unet_pairs, self.unet_weights))

    def __post_init__(self) -> None:
        where = "evaluate.lungs"
        if self.missing not in ("unet", "exclude"):
            raise ConfigError(f"{where}.missing must be 'unet' or 'exclude', got {self.missing!r}")
        if self.unet_pairs and self.unet_weights:
            raise ConfigError(f"{where}: give unet_pairs (train a U-Net here) or unet_weights (a saved one), not both")
        if not 0.0 <= self.min_lung_fraction < self.max_lung_fraction <= 1.0:
            raise ConfigError(f"{where}: need 0 <= min_lung_fraction < max_lung_fraction <= 1, got "
                              f"{self.min_lung_fraction} and {self.max_lung_fraction}")
        for key in ("unet_epochs", "unet_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key} must be >= 1, got {getattr(self, key)}")
        if len(self.unet_channels) < 2 or any(c < 1 for c in self.unet_channels):
            raise ConfigError(f"{where}.unet_channels: at least two positive channel counts, got {self.unet_channels}")
        factor = 2 ** (len(self.unet_channels) - 1)
        if self.unet_size is not None and (self.unet_size < factor or self.unet_size % factor):
            raise ConfigError(f"{where}.unet_size must be a positive multiple of {factor} (2 ** (len(unet_channels) "
                              f"- 1)), got {self.unet_size}")
        if self.gallery_images < 0:
            raise ConfigError(f"{where}.gallery_images must be >= 0, got {self.gallery_images}")


@dataclass
class PerturbConfig:
    """Image changes in [0, 1] space, before the network's normalisation (imaging/perturb.py).

    ``train``: applied to every image (train, validation and test), i.e. the model is trained and
    tested on perturbed images (C1 filters, C2 resolution, C4 cells, B4 clipping). ``test``: each
    spec is a separate test-time evaluation of the model trained as configured (C2 noise and blur),
    reported with a paired comparison against the unperturbed test images.
    """

    train: list[dict[str, Any]] = field(default_factory=list)
    test: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class DiseaseConfig:
    """The disease (pathology) model and its subgroup performance: ``readingrace disease`` (docs/subgroups.md).

    ``labels``: finding columns, or ``nih`` / ``chexpert`` for the standard sets (each with
    "No Finding"). ``policy``: uncertain labels (-1) in training, ``zeros`` / ``ones`` / ``ignore``
    (multilabel.POLICIES). ``no_finding``: the label behind the underdiagnosis rate.
    ``operating_point``: ``youden`` / ``f1`` (chosen on the validation split) or a fixed probability.
    ``groups``: attributes to report (``a+b`` for an intersection); ``reference``: attribute ->
    reference group (default: the largest group).
    """

    labels: list[str] | str = "nih"
    policy: str = "ignore"
    no_finding: str = "No Finding"
    operating_point: float | str = "youden"
    groups: list[str] = field(default_factory=lambda: ["sex", "age_group", "race"])
    reference: dict[str, str] = field(default_factory=dict)
    all_pairs: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.labels, str) and self.labels not in ("nih", "chexpert"):
            raise ConfigError(f"disease.labels must be 'nih', 'chexpert' or a list of finding columns, got {self.labels!r}")
        if isinstance(self.labels, list) and len(set(self.labels)) < 2:
            raise ConfigError(f"disease.labels: a multi-label model needs at least 2 distinct labels, got {self.labels}")
        if self.policy not in ("zeros", "ones", "ignore"):
            raise ConfigError(f"disease.policy must be one of ['ignore', 'ones', 'zeros'], got {self.policy!r}")
        op = self.operating_point
        if isinstance(op, str) and op not in ("youden", "f1"):
            raise ConfigError(f"disease.operating_point must be 'youden', 'f1' or a probability in [0, 1], got {op!r}")
        if not isinstance(op, str) and not 0.0 <= op <= 1.0:
            raise ConfigError(f"disease.operating_point: a fixed threshold must be in [0, 1], got {op!r}")
        if not self.groups:
            raise ConfigError("disease.groups: name at least one attribute to report, e.g. [sex, age_group]")


@dataclass
class ExperimentConfig:
    """One experiment: cohort -> split -> images -> model -> train -> evaluate -> report."""

    name: str = "experiment"
    description: str = ""
    cohort: CohortConfig = field(default_factory=CohortConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    confounders: dict[str, Any] = field(default_factory=dict)
    disease: DiseaseConfig = field(default_factory=DiseaseConfig)
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, *, exclude: tuple[str, ...] = ("name", "description", "out")) -> str:
        """Hash of everything that changes results (not the name or output folder).

        Only values that differ from the defaults enter the hash, so adding a new option with a
        default does not re-address (and redo) every finished run.
        """
        d = _non_default(self.to_dict(), ExperimentConfig().to_dict())
        d = {k: v for k, v in d.items() if k not in exclude}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _non_default(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        default = defaults.get(key, object())
        if isinstance(value, dict) and isinstance(default, dict) and value and default:
            sub = _non_default(value, default)
            if sub:
                out[key] = sub
        elif value != default:
            out[key] = value
    return out


def cache_home() -> Path:
    """The shared cache of preprocessed images and generated cohorts ($READINGRACE_CACHE)."""
    import os

    return Path(os.environ.get("READINGRACE_CACHE", Path.home() / ".cache" / "readingrace"))


SIZES_OK = ("stretch", "pad")
PRECISIONS = ("auto", "32", "bf16")
#: ``model.name`` values: the networks of :data:`readingrace.models.ARCHITECTURES` (listed here so that a
#: config is checked without importing torch; a test keeps the two in step).
MODEL_NAMES = ("densenet121", "efficientnet-b0", "efficientnet-b2", "resnet-tiny", "resnet18", "resnet34", "resnet50")


def _check(cfg: ExperimentConfig) -> ExperimentConfig:
    from readingrace.split import check_ratios

    from readingrace.errors import SplitError

    try:
        check_ratios(cfg.split.ratios)
    except SplitError as exc:
        raise ConfigError(f"split.ratios: {exc}") from None
    if cfg.model.name not in MODEL_NAMES:
        raise ConfigError(f"model.name {cfg.model.name!r} is not known; choose one of {list(MODEL_NAMES)}")
    if cfg.image.mode not in SIZES_OK:
        raise ConfigError(f"image.mode must be one of {list(SIZES_OK)}, got {cfg.image.mode!r}")
    if cfg.image.size < 4:
        raise ConfigError(f"image.size must be >= 4, got {cfg.image.size}")
    if cfg.image.cache_dtype not in ("float32", "float16"):
        raise ConfigError(f"image.cache_dtype must be float32 or float16, got {cfg.image.cache_dtype!r}")
    if cfg.train.precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {list(PRECISIONS)}, got {cfg.train.precision!r}")
    if not cfg.train.seeds:
        raise ConfigError("train.seeds must list at least one seed")
    for key, value in (("train.batch_size", cfg.train.batch_size), ("train.max_epochs", cfg.train.max_epochs)):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if not 0 <= cfg.cohort.min_prevalence < 0.5:
        raise ConfigError(f"cohort.min_prevalence must be in [0, 0.5), got {cfg.cohort.min_prevalence}")
    if not 0 < cfg.evaluate.level < 1:
        raise ConfigError(f"evaluate.level must be in (0, 1), got {cfg.evaluate.level}")
    _check_perturbations(cfg)
    return cfg


def _check_perturbations(cfg: ExperimentConfig) -> None:
    """Validate every perturbation spec now, on a blank image, so a typo fails before training."""
    specs = [("perturb.train", s) for s in cfg.perturb.train] + [("perturb.test", s) for s in cfg.perturb.test]
    if not specs:
        return
    import torch

    from readingrace.imaging.perturb import apply_perturbation

    blank = torch.zeros(1, 1, cfg.image.size, cfg.image.size)
    for where, spec in specs:
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: each perturbation is a mapping like {{name: fourier, kind: highpass, radius: 25}}")
        try:
            apply_perturbation(blank, spec)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


# -- generic dict -> dataclass with strict checking ---------------------------------------------
def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown config key '{where}{unknown[0]}'; allowed keys here: {sorted(names)}"
        )
    kwargs = {k: _coerce(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Safe-load a YAML config, resolving ``extends`` (relative to the file) recursively."""
    p = Path(path).resolve()
    if p in _seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    parent = data.pop("extends", None)
    if parent:
        data = deep_merge(read_yaml(p.parent / parent, _seen + (p,)), data)
    return data


#: Keys a run adds to the ``config.yaml`` it writes (see :func:`load_config`).
RUN_RECORD_KEYS = ("fingerprint", "readingrace", "kind")


def load_config(path: str | Path | None = None, *, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read, merge and validate an experiment config.

    A run folder's ``config.yaml`` is accepted as it is: its ``fingerprint``, ``readingrace`` (version) and
    ``kind`` (``disease``) keys describe the run that wrote it and are dropped (the fingerprint is
    recomputed from the rest).
    """
    data = read_yaml(path) if path else {}
    for key in RUN_RECORD_KEYS:
        data.pop(key, None)
    if overrides:
        data = deep_merge(data, overrides)
    try:
        cfg = from_dict(ExperimentConfig, data)
    except ConfigError as exc:
        given = [k for k in _dotted_keys(overrides or {}) if f"'{k}'" in str(exc) or str(exc).startswith(f"{k}:")]
        where = f"--set {given[0]}" if given else (str(path) if path else "")
        raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None
    return _check(cfg)


def _dotted_keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    """``{"train": {"max_epochs": 3}}`` -> ``["train.max_epochs"]``."""
    keys = []
    for k, v in d.items():
        keys += _dotted_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return keys


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    return _check(from_dict(ExperimentConfig, data))


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """``set_dotted(d, "train.max_epochs", 3)`` on a nested dict (returns d)."""
    node = d
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return d

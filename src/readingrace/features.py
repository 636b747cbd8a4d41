"""Frozen features of any model: penultimate layer or a named layer, a user's model, saved features.

:func:`extract_features` runs a model in eval mode under ``torch.no_grad`` and captures, with a
forward hook, either the *input* of the classification head (the penultimate features, the paper's
A3 "hidden state from the penultimate model layer") or the *output* of any named submodule
(globally average-pooled when it is spatial). It never updates BatchNorm statistics or weights, and
restores every submodule's training flag afterwards.

:func:`load_user_model` turns what a user brings into something :func:`extract_features` accepts:
a checkpoint file (read weights-only, never unpickling code) or an explicitly named
``package.module:function`` factory. :func:`load_saved_features` reads features computed elsewhere
(``.npy`` with an ids sidecar, ``.npz``, ``.parquet`` or ``.csv``) aligned to a cohort by image id.
"""

from __future__ import annotations

import difflib
import importlib
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd
import torch
from torch import nn

from readingrace.errors import CohortError, ConfigError
from readingrace.models import HEAD_NAMES, build_model, head_module

#: A user's feature function: images (N, 1, H, W) float32 in [0, 1] -> features (N, D).
FeatureFn = Callable[[torch.Tensor], Any]
Extractor = Union[nn.Module, FeatureFn]

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
FEATURE_SUFFIXES = (".npy", ".npz", ".parquet", ".csv")
_CALLABLE_SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
_ID_SIDECARS = (".ids.txt", ".ids.csv")


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the wanted layer has run."""


# --------------------------------------------------------------------------------------------
# which layer
# --------------------------------------------------------------------------------------------
def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The classification head's qualified name and module.

    Tries :func:`readingrace.models.head_module` (``fc``, ``class_layers.out``, ``_fc``), then the same
    names one level down (``net.fc`` in a Lightning module), then the last ``nn.Linear`` registered.
    """
    try:
        return head_module(model)
    except ConfigError:
        pass
    modules = dict(model.named_modules())
    for suffix in HEAD_NAMES.values():
        hits = [n for n in modules if n.endswith("." + suffix)]
        if hits:
            name = min(hits, key=lambda n: n.count("."))
            return name, modules[name]
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1], modules[linears[-1]]
    raise ConfigError(
        f"cannot find the classification head of {type(model).__name__} (no fc, class_layers.out, _fc or "
        "nn.Linear): name the layer whose output is the feature vector with --layer")


def layer_names(model: nn.Module) -> list[str]:
    """Every named submodule (the values ``layer`` accepts), in registration order."""
    return [n for n, _ in model.named_modules() if n]


def _get_layer(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if layer in modules and layer:
        return modules[layer]
    names = layer_names(model)
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
    top = [n for n in names if "." not in n][:8]
    hint = f"closest: {close}; " if close else ""
    raise ConfigError(
        f"layer {layer!r} is not a submodule of {type(model).__name__}; {hint}top-level layers: {top} "
        f"({len(names)} named layers in all; list them with readingrace.features.layer_names(model))")


def _pool(t: Any) -> torch.Tensor:
    """A layer's output as (N, D): the first tensor of a tuple/dict, spatial dims averaged away."""
    if isinstance(t, (tuple, list)):
        t = next((x for x in t if isinstance(x, torch.Tensor)), None)
    elif isinstance(t, dict):
        t = next((x for x in t.values() if isinstance(x, torch.Tensor)), None)
    if not isinstance(t, torch.Tensor):
        raise ConfigError("the chosen layer returns no tensor; choose another layer")
    t = t.detach().float()
    if t.ndim == 1:
        return t[:, None]
    if t.ndim > 2:
        return t.mean(dim=tuple(range(2, t.ndim)))   # global average pooling
    return t


def _as_batch(images: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.array(images[idx], dtype=np.float32))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4:
        raise ConfigError(f"images must be (N, H, W) or (N, 1, H, W); got a batch of shape {tuple(x.shape)}")
    return x


# --------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------
def extract_features(
    model: Extractor, images: np.ndarray, index: Sequence[int] | np.ndarray, *, layer: str | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Frozen features (len(index), D) float32 of ``images[index]`` ((N, H, W) in [0, 1]).

    ``model`` is an ``nn.Module`` (e.g. :class:`readingrace.train.ImageClassifier`, which normalises
    its input itself) or a plain callable images (B, 1, H, W) -> (B, D). For a module, the default is
    the penultimate features: the input of the classification head (:func:`find_head`); ``layer``
    names any submodule instead (its output, globally average-pooled if spatial). The module runs
    in eval mode without gradients (BatchNorm statistics and weights are never updated); each
    submodule's training flag is restored afterwards. An unknown ``layer`` raises
    :class:`ConfigError` listing valid names.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    index = np.asarray(index, dtype=np.int64)
    if not isinstance(model, nn.Module):
        if layer is not None:
            raise ConfigError(f"layer {layer!r} needs a PyTorch module; the model given is a plain function")
        if not callable(model):
            raise ConfigError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
        return _run_callable(model, images, index, batch_size)
    target = _get_layer(model, layer) if layer is not None else find_head(model)[1]
    use_input = layer is None
    captured: list[torch.Tensor] = []

    def hook(_mod: nn.Module, inputs: tuple, output: Any) -> None:
        captured.append(_pool(inputs[0] if use_input else output))
        raise _Captured

    flags = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    handle = target.register_forward_hook(hook)
    out: list[np.ndarray] = []
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, len(index), batch_size):
                x = _as_batch(images, index[start:start + batch_size]).to(device)
                captured.clear()
                try:
                    model(x)
                except _Captured:
                    pass
                if not captured:
                    what = f"layer {layer!r}" if layer else "the classification head"
                    raise ConfigError(f"{what} of {type(model).__name__} did not run in the forward pass; "
                                      "choose a layer that the forward pass uses")
                out.append(captured[0].cpu().numpy())
    finally:
        handle.remove()
        for m, flag in flags.items():
            m.training = flag   # per module, not m.train(): children keep their own flags
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def _run_callable(fn: FeatureFn, images: np.ndarray, index: np.ndarray, batch_size: int) -> np.ndarray:
    out = []
    with torch.no_grad():
        for start in range(0, len(index), batch_size):
            x = _as_batch(images, index[start:start + batch_size])
            y = fn(x)
            y = y.detach().cpu().float().numpy() if isinstance(y, torch.Tensor) else np.asarray(y, dtype=np.float32)
            if y.ndim > 2:
                y = y.reshape(y.shape[0], y.shape[1], -1).mean(axis=2)
            if y.ndim == 1:
                y = y[:, None]
            if y.shape[0] != x.shape[0]:
                raise ConfigError(f"the feature function returned {y.shape[0]} rows for a batch of {x.shape[0]} images; "
                                  "it must return one feature vector per image")
            out.append(y.astype(np.float32, copy=False))
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# user models
# --------------------------------------------------------------------------------------------
def load_user_model(spec: str | Path, *, arch: str | None = None, app_dir: str | Path | None = ".") -> Extractor:
    """A model to probe, from a checkpoint file or an explicitly named ``package.module:function``.

    - ``*.ckpt`` / ``*.pt`` / ``*.pth``: read with ``torch.load(weights_only=True)`` (no pickled code
      runs). A checkpoint written by readingrace (``hyper_parameters`` + ``state_dict``) rebuilds its
      model (:func:`readingrace.train.load_classifier` or :func:`readingrace.multilabel.load_multilabel`);
      a bare state dict needs ``arch`` (a :data:`readingrace.models.ARCHITECTURES` name) and is
      loaded strictly (the head's size is read from the weights).
    - ``package.module:function``: the module is imported (``app_dir``, default the working folder,
      is put first on ``sys.path`` for the import, as uvicorn does) and ``function()`` is called with
      no arguments; it returns an ``nn.Module`` or a callable images (N, 1, H, W) in [0, 1] ->
      features (N, D). An ``nn.Module`` object named directly is used as is. Nothing is imported
      unless a spec of this form is given.
    """
    text = str(spec)
    path = Path(text)
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        return _load_checkpoint(path, arch)
    if _CALLABLE_SPEC.fullmatch(text):
        return _load_callable(text, app_dir)
    raise ConfigError(
        f"--model {text!r} is neither a checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}) nor "
        "'package.module:function' (a function returning an nn.Module or a features function)")


def _load_checkpoint(path: Path, arch: str | None) -> nn.Module:
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise ConfigError(
            f"{path}: cannot be read as weights only ({type(exc).__name__}: {str(exc)[:200]}); pickled "
            "models are not loaded (they run code): save model.state_dict() and pass --arch, or expose "
            "the model through 'package.module:function'") from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{path}: expected a state dict or a Lightning checkpoint, got {type(ckpt).__name__}")
    hp = ckpt.get("hyper_parameters")
    if isinstance(hp, dict) and "state_dict" in ckpt:
        if "label_names" in hp:
            from readingrace.multilabel import load_multilabel
            return load_multilabel(path)
        if "n_classes" in hp:
            from readingrace.train import load_classifier
            return load_classifier(path)
    state = ckpt.get("state_dict", ckpt)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: not a state dict of tensors (keys {list(state)[:5]})")
    if arch is None:
        raise ConfigError(f"{path} is a bare state dict: name its architecture with --arch "
                          "(e.g. resnet34, densenet121, efficientnet-b0)")
    state = {_strip(k): v for k, v in state.items()}
    head_w = [v for k, v in state.items() if any(k == f"{h}.weight" for h in HEAD_NAMES.values())]
    n_out = int(head_w[0].shape[0]) if head_w else 2
    model = build_model(arch, max(n_out, 2), checkpoint=True)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:   # tensor shapes differ
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc)[:200])
        raise ConfigError(f"{path}: weights do not fit architecture {arch!r} ({first}); check --arch") from None
    if missing or unexpected:
        raise ConfigError(
            f"{path}: weights do not fit architecture {arch!r}: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); check --arch")
    return model.eval()


def _strip(key: str) -> str:
    for prefix in ("model.", "module.", "net."):
        key = key.removeprefix(prefix)
    return key


def _load_callable(spec: str, app_dir: str | Path | None) -> Extractor:
    module_name, attr = spec.split(":")
    added = None
    if app_dir is not None:
        added = str(Path(app_dir).resolve())
        sys.path.insert(0, added)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--model {spec!r}: cannot import {module_name!r} ({exc}); run from the folder "
                          "that holds the package or install it") from None
    finally:
        if added is not None and added in sys.path:
            sys.path.remove(added)
    if not hasattr(module, attr):
        raise ConfigError(f"--model {spec!r}: module {module_name!r} has no attribute {attr!r}")
    obj = getattr(module, attr)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ConfigError(f"--model {spec!r}: {attr!r} is not callable")
    try:
        made = obj()
    except TypeError as exc:
        raise ConfigError(f"--model {spec!r}: {attr}() must take no arguments and return an nn.Module or "
                          f"a features function ({exc})") from None
    if isinstance(made, nn.Module) or callable(made):
        return made
    raise ConfigError(f"--model {spec!r}: {attr}() returned {type(made).__name__}, not an nn.Module or a callable")


# --------------------------------------------------------------------------------------------
# saved features
# --------------------------------------------------------------------------------------------
def save_features(path: str | Path, features: np.ndarray, image_ids: Sequence[str]) -> Path:
    """Write features in a layout :func:`load_saved_features` reads (by suffix: .npy + ids sidecar,
    .npz, .parquet or .csv)."""
    p = Path(path)
    features = np.asarray(features, dtype=np.float32)
    ids = [str(i) for i in image_ids]
    if features.ndim != 2 or features.shape[0] != len(ids):
        raise ConfigError(f"features {features.shape} must be 2-D with one row per image id ({len(ids)})")
    p.parent.mkdir(parents=True, exist_ok=True)
    suffix = p.suffix.lower()
    if suffix == ".npy":
        np.save(p, features)
        p.with_suffix(".ids.txt").write_text("\n".join(ids) + "\n")
    elif suffix == ".npz":
        np.savez(p, features=features, image_id=np.asarray(ids))
    elif suffix in (".parquet", ".csv"):
        df = pd.DataFrame(features, columns=[f"f{j}" for j in range(features.shape[1])])
        df.insert(0, "image_id", ids)
        df.to_parquet(p, index=False) if suffix == ".parquet" else df.to_csv(p, index=False)
    else:
        raise ConfigError(f"{p}: features file must end in one of {FEATURE_SUFFIXES}")
    return p


def _read_features(p: Path) -> tuple[np.ndarray, list[str]]:
    suffix = p.suffix.lower()
    if suffix == ".npy":
        sidecar = next((p.with_suffix(s) for s in _ID_SIDECARS if p.with_suffix(s).is_file()), None)
        if sidecar is None:
            raise CohortError(
                f"{p}: a .npy features file needs its image ids beside it: {p.with_suffix('.ids.txt').name} "
                f"(one id per line, in row order) or {p.with_suffix('.ids.csv').name} (column image_id); "
                "or save a .npz with arrays 'features' and 'image_id', or a .parquet with an image_id column")
        if sidecar.name.endswith(".txt"):
            ids = [ln.strip() for ln in sidecar.read_text().splitlines() if ln.strip()]
        else:
            table = pd.read_csv(sidecar, dtype=str)
            if "image_id" not in table.columns:
                raise CohortError(f"{sidecar}: needs an image_id column (found {list(table.columns)[:8]})")
            ids = table["image_id"].str.strip().tolist()
        return np.load(p, allow_pickle=False), ids
    if suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            lacking = [k for k in ("features", "image_id") if k not in z.files]
            if lacking:
                raise CohortError(f"{p}: a .npz needs arrays 'features' and 'image_id'; missing {lacking} (found {z.files})")
            return z["features"], [str(i) for i in z["image_id"]]
    if suffix in (".parquet", ".csv"):
        df = pd.read_parquet(p) if suffix == ".parquet" else pd.read_csv(p, dtype={"image_id": str})
        if "image_id" not in df.columns:
            raise CohortError(f"{p}: needs an image_id column and one column per feature (found {list(df.columns)[:8]})")
        feats = df.drop(columns="image_id")
        bad = [c for c in feats.columns if not pd.api.types.is_numeric_dtype(feats[c])]
        if bad:
            raise CohortError(f"{p}: feature column {bad[0]!r} is not numeric ({len(bad)} such column(s)); "
                              "keep only image_id and numeric feature columns")
        return feats.to_numpy(dtype=np.float32), df["image_id"].astype(str).str.strip().tolist()
    raise ConfigError(f"{p}: features file must end in one of {FEATURE_SUFFIXES}")


def load_saved_features(path: str | Path, image_ids: Sequence[str]) -> np.ndarray:
    """Features saved elsewhere, as (len(image_ids), D) float32 rows in the order of ``image_ids``.

    Layouts: ``X.npy`` (N, D) with ``X.ids.txt`` (one image id per line, row order) or ``X.ids.csv``
    (column ``image_id``); ``X.npz`` with arrays ``features`` and ``image_id``; ``X.parquet`` /
    ``X.csv`` with an ``image_id`` column and numeric feature columns. Ids in the file that the
    cohort lacks are ignored. Raises :class:`CohortError` for cohort images without features
    (naming how many and one), duplicate ids, a row-count mismatch or non-finite values.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"features file not found: {p}")
    feats, ids = _read_features(p)
    feats = np.asarray(feats, dtype=np.float32)
    if feats.ndim != 2:
        raise CohortError(f"{p}: features must be a 2-D array (images x features), got shape {feats.shape}")
    if feats.shape[0] != len(ids):
        raise CohortError(f"{p}: {feats.shape[0]} feature rows but {len(ids)} image ids; they must match one to one")
    index = pd.Index(ids)
    if index.has_duplicates:
        dup = index[index.duplicated()][0]
        raise CohortError(f"{p}: image id {dup!r} appears more than once ({int(index.duplicated().sum())} repeats)")
    wanted = [str(i) for i in image_ids]
    pos = index.get_indexer(wanted)
    missing = np.flatnonzero(pos < 0)
    if missing.size:
        raise CohortError(
            f"{p}: {missing.size} of {len(wanted)} cohort images have no features (e.g. {wanted[missing[0]]!r}); "
            "extract features for every cohort image or restrict the cohort to those with features")
    out = feats[pos]
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        raise CohortError(f"{p}: {int(bad.sum())} row(s) hold NaN or infinite features (e.g. image "
                          f"{wanted[int(np.flatnonzero(bad)[0])]!r})")
    return out

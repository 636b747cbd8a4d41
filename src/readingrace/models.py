"""Networks by name (MONAI), optional local pretrained weights, and feature extraction.

All networks take single-channel 2-D images. ResNets use the standard stride-2 stem (MONAI's
default stem is stride 1 and 4-6x slower). No weights are ever downloaded: ``weights`` is a local
file; without one the network starts from random initialisation and a notice says so.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from readingrace.errors import ConfigError

log = logging.getLogger(__name__)


def _resnet(depth: int) -> Callable[[int], nn.Module]:
    def make(n_classes: int) -> nn.Module:
        from monai.networks.nets import resnet

        return getattr(resnet, f"resnet{depth}")(
            spatial_dims=2, n_input_channels=1, conv1_t_stride=2, num_classes=n_classes
        )
    return make


def _resnet_tiny(n_classes: int) -> nn.Module:
    """A small ResNet (one basic block per stage, widths 16-128) for CPU demos and tests."""
    from monai.networks.nets import ResNet

    return ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[16, 32, 64, 128], spatial_dims=2,
                  n_input_channels=1, conv1_t_stride=2, num_classes=n_classes)


def _densenet121(n_classes: int) -> nn.Module:
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=2, in_channels=1, out_channels=n_classes)


def _efficientnet(variant: str) -> Callable[[int], nn.Module]:
    def make(n_classes: int) -> nn.Module:
        from monai.networks.nets import EfficientNetBN

        return EfficientNetBN(variant, pretrained=False, spatial_dims=2, in_channels=1, num_classes=n_classes)
    return make


ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "resnet-tiny": _resnet_tiny,
    "resnet18": _resnet(18),
    "resnet34": _resnet(34),
    "resnet50": _resnet(50),
    "densenet121": _densenet121,
    "efficientnet-b0": _efficientnet("efficientnet-b0"),
    "efficientnet-b2": _efficientnet("efficientnet-b2"),
}

#: The final layer that maps features to classes, per family (for probes and weight loading).
HEAD_NAMES = {"resnet": "fc", "densenet": "class_layers.out", "efficientnet": "_fc"}


def build_model(name: str, n_classes: int, *, weights: str | Path | None = None, checkpoint: bool = False
                ) -> nn.Module:
    """Network ``name`` with ``n_classes`` outputs; load a local ``weights`` file when given.

    ``checkpoint=True`` (or inside :func:`loading_checkpoint`): the caller loads trained weights into it
    next, so the random-initialisation notice would be wrong and is not given.
    """
    if name not in ARCHITECTURES:
        raise ConfigError(f"model.name {name!r} is not known; choose one of {sorted(ARCHITECTURES)}")
    if n_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {n_classes}")
    model = ARCHITECTURES[name](n_classes)
    if weights:
        load_weights(model, weights)
    elif not (checkpoint or _LOADING_CHECKPOINT) and name not in _RANDOM_INIT_NOTICED:  # once per architecture
        _RANDOM_INIT_NOTICED.add(name)
        log.warning("model %s: no pretrained weights given (model.weights): random initialisation", name)
    return model


_RANDOM_INIT_NOTICED: set[str] = set()
_LOADING_CHECKPOINT = False


@contextlib.contextmanager
def loading_checkpoint() -> Iterator[None]:
    """Networks built inside receive a checkpoint's weights (e.g. a Lightning module rebuilt from its
    hyper-parameters): no random-initialisation notice."""
    global _LOADING_CHECKPOINT
    before, _LOADING_CHECKPOINT = _LOADING_CHECKPOINT, True
    try:
        yield
    finally:
        _LOADING_CHECKPOINT = before


def load_weights(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load a local state dict (weights only, never pickled code) into ``model``.

    3-channel first-layer weights are summed to one channel; layers whose shapes differ (the
    classification head) are left at their initialisation. Returns the keys skipped.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.weights: file not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise ConfigError(f"model.weights: {p} is not a readable PyTorch weights file: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.state_dict()
    loaded, skipped = {}, []
    for key, value in state.items():
        k = key.removeprefix("model.").removeprefix("module.")
        if k not in own:
            skipped.append(key)
            continue
        if value.ndim == 4 and own[k].ndim == 4 and value.shape[1] == 3 and own[k].shape[1] == 1:
            value = value.sum(dim=1, keepdim=True)
        if value.shape != own[k].shape:
            skipped.append(key)
            continue
        loaded[k] = value
    if not loaded:
        raise ConfigError(f"model.weights: no tensor in {p} matches the network's layers")
    model.load_state_dict(loaded, strict=False)
    missing = [k for k in own if k not in loaded]
    log.info("loaded %d tensors from %s (%d skipped, %d left at init)", len(loaded), p.name, len(skipped), len(missing))
    return {"skipped": skipped, "missing": missing}


def head_module(model: nn.Module) -> tuple[str, nn.Module]:
    """The final classification layer's name and module."""
    for family, name in HEAD_NAMES.items():
        try:
            return name, model.get_submodule(name)
        except AttributeError:
            continue
    raise ConfigError(f"cannot find the classification head of {type(model).__name__}")

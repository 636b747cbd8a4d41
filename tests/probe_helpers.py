"""User-model factories for the probe tests, imported through 'probe_helpers:NAME' specs."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """A small CNN with BatchNorm: conv -> bn -> relu -> pool -> head."""

    def __init__(self, n_out: int = 2):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(6, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.body(x)).flatten(1))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet()


def intensity_features(x: torch.Tensor) -> torch.Tensor:
    """Mean and standard deviation of each image: (N, 1, H, W) -> (N, 2)."""
    flat = x.flatten(1)
    return torch.stack([flat.mean(1), flat.std(1)], dim=1)


def make_feature_fn():
    return intensity_features


def make_nothing():
    return 42

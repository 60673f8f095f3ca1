"""A tiny per-step autoencoder and its adapter, registered as ``dummy`` by the benchmark tests.

Real enough to train (reconstruction loss, per-point squared error as the score) and small enough
that a whole grid runs in seconds.
"""
from __future__ import annotations

import time
from typing import Any, ClassVar

from torch import Tensor, nn

import adapters
from adapters.base import Adapter

#: seconds to sleep in every training step (the kill-and-resume test needs runs that take a while)
STEP_SLEEP = {"value": 0.0}


class TinyAE(nn.Module):
    def __init__(self, n_channels: int, window: int = 100, hidden: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(n_channels, hidden), nn.Tanh())
        self.decoder = nn.Linear(hidden, n_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))

    def loss(self, x: Tensor, out: Tensor, epoch: int) -> dict[str, Tensor]:
        return {"recon": ((out - x) ** 2).mean()}

    def score(self, x: Tensor, out: Tensor) -> Tensor:
        return ((out - x) ** 2).mean(dim=-1)


class DummyAdapter(Adapter):
    name: ClassVar[str] = "dummy"
    hidden: ClassVar[str] = "encoder"
    layout: ClassVar[str] = "BTD"

    def build(self, n_channels: int, window: int = 100, **overrides: Any) -> TinyAE:
        return TinyAE(n_channels, window, **overrides)

    def train_step(self, model: nn.Module, x: Tensor, optimizers: dict, epoch: int) -> dict[str, float]:
        if STEP_SLEEP["value"]:
            time.sleep(STEP_SLEEP["value"])
        return super().train_step(model, x, optimizers, epoch)


def register() -> None:
    """Add ``dummy`` to the adapter registry (idempotent)."""
    adapters._REGISTRY.setdefault("dummy", "tests.benchmarks.dummy_adapter:DummyAdapter")


def unregister() -> None:
    adapters._REGISTRY.pop("dummy", None)



"""Adapter: DeepSVDD meets the MADCluster head at its per-step encoder output.

The head attaches to ``encoder.proj`` (the bias-free 128 -> 64 linear map), whose output is the
embedding ``H = phi(x)`` of shape ``[B, T, D]`` that DeepSVDD's own objective pulls towards its
centre (BASELINES.md section 9, attachment table). Single optimiser phase; the head's loss joins it.
Weight decay 1e-6 as Ruff et al.
"""
from __future__ import annotations

from typing import Any, ClassVar

from baselines.deepsvdd import DeepSVDD

from .base import Adapter


class DeepSVDDAdapter(Adapter):
    """Single-phase adapter for :class:`baselines.deepsvdd.DeepSVDD`."""

    name: ClassVar[str] = "deepsvdd"
    hidden: ClassVar[str] = "encoder.proj"
    layout: ClassVar[str] = "BTD"
    select: ClassVar[Any] = None
    capture: ClassVar[str] = "first"
    phases: ClassVar[tuple[str, ...]] = ("main",)
    head_phase: ClassVar[str] = "main"
    weight_decay: ClassVar[float] = 1e-6

    def build(self, n_channels: int, window: int = 100, **overrides: Any) -> DeepSVDD:
        """DeepSVDD with the recommended configuration (3-layer bias-free GRU-128, D = 64);
        keyword ``overrides`` go to :class:`~baselines.deepsvdd.DeepSVDD`."""
        return DeepSVDD(n_channels, window, **overrides)

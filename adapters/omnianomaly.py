"""Adapter: OmniAnomaly meets the MADCluster head at its q-net GRU output.

The head attaches to ``qnet.rnn`` (an ``nn.GRU``; ``select=0`` picks its output sequence
``[B, T, H]`` from the ``(output, h_n)`` tuple). This is the deterministic feature sequence that
drives the posterior chain; the two linear layers after it add nothing a linear map of it would
not, and ``z_t`` (3-d, stochastic) is too small to cluster (BASELINES.md section 4, "Hidden
state"). Single optimiser phase; the head's loss joins it. Training follows the reference: L2
1e-4 (Adam's coupled ``weight_decay``) and gradient-norm clipping at 10 over all trained
parameters, head included.
"""
from __future__ import annotations

from typing import Any, ClassVar

from baselines.omnianomaly import OmniAnomaly

from .base import Adapter


class OmniAnomalyAdapter(Adapter):
    """Single-phase adapter for :class:`baselines.omnianomaly.OmniAnomaly` with gradient clipping."""

    name: ClassVar[str] = "omnianomaly"
    hidden: ClassVar[str] = "qnet.rnn"
    layout: ClassVar[str] = "BTD"
    select: ClassVar[Any] = 0
    capture: ClassVar[str] = "first"
    phases: ClassVar[tuple[str, ...]] = ("main",)
    head_phase: ClassVar[str] = "main"
    weight_decay: ClassVar[float] = 1e-4
    grad_clip_norm: ClassVar[float] = 10.0

    def build(self, n_channels: int, window: int = 100, **overrides: Any) -> OmniAnomaly:
        """OmniAnomaly with the reference defaults (z 3, GRU 500, dense 500, 20 planar layers);
        keyword ``overrides`` go to :class:`~baselines.omnianomaly.OmniAnomaly`."""
        return OmniAnomaly(n_channels, window, **overrides)

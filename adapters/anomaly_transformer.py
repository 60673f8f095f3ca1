"""AnomalyTransformer adapter: the head attaches to the encoder output after its final LayerNorm.

Attachment: module ``encoder`` returns ``(h, series, prior, sigma)``; ``select=0`` picks ``h``
``[B, T, d_model]``, the representation the projection reconstructs from.

Training: the baseline's ``loss`` returns the two minimax terms keyed by phase, ``"max"`` (series
association maximises the discrepancy, prior detached) and ``"min"`` (prior minimises it, series
detached). Both phases update the same parameters through one optimiser, and because each side
is stop-gradiented their gradients add linearly: one backward of ``max + min`` gives exactly the
reference's two accumulated backward calls before one Adam step. The encoder output is trained
by both terms, so the MADCluster head's loss joins that same single backward.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from adapters.base import Adapter, backbone_of, check_build_overrides
from baselines.anomaly_transformer import AnomalyTransformer
from madcluster_plugin import MADClusterModel


class AnomalyTransformerAdapter(Adapter):
    """AnomalyTransformer with an optional MADCluster head on ``encoder`` (select 0, layout BTD)."""

    name = "anomaly_transformer"
    hidden = "encoder"
    layout = "BTD"
    select = 0
    capture = "first"
    phases = ("main",)
    head_phase = "main"
    weight_decay = 0.0

    def build(self, n_channels: int, window: int = 100, **overrides: Any) -> nn.Module:
        """The official configuration (d_model 512, 8 heads, 3 layers, d_ff 512) unless overridden."""
        check_build_overrides(AnomalyTransformer, overrides, ("n_channels", "window"))
        return AnomalyTransformer(n_channels, window=window, **overrides)

    def wrap(self, model: nn.Module, **madcluster_overrides: Any) -> MADClusterModel:
        """Attach at ``encoder`` with D = d_model (the Encoder is a custom module: D is not inferable)."""
        if "hidden" not in madcluster_overrides:
            madcluster_overrides.setdefault("dim", backbone_of(model).d_model)
        return super().wrap(model, **madcluster_overrides)

    def train_step(self, model: nn.Module, x: Tensor, optimizers: dict[str, torch.optim.Optimizer],
                   epoch: int) -> dict[str, float]:
        """One backward of ``max + min`` (+ the head loss when wrapped), then one step.

        Logs the phase terms, ``recon`` (the reconstruction MSE) and ``assdis`` (the layer-averaged
        association discrepancy); both sides of the minimax have equal values, so
        ``recon = (max + min) / 2`` and ``assdis = (min - max) / (2 k)``.
        """
        logs = super().train_step(model, x, optimizers, epoch)
        k = backbone_of(model).k
        logs["recon"] = 0.5 * (logs["max"] + logs["min"])
        if k:
            logs["assdis"] = (logs["min"] - logs["max"]) / (2.0 * k)
        return logs

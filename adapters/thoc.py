"""THOC adapter: the head attaches to the last dilated-RNN layer, ``f^L`` of shape ``[B, T, hidden]``.

THOC trains with one loss and one backward; its reference (TimeSeAD) keeps two Adam optimisers,
one for everything and one for the fuse ("join") layers, both with lr 1e-3 and weight decay 1e-6.
We keep both phases; they are stepped together after the single backward (the default
:meth:`Adapter.train_step`). The MADCluster head joins ``main``, which holds the dilated RNN.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from adapters.base import Adapter, backbone_of, check_build_overrides
from baselines.thoc import THOC
from madcluster_plugin import MADClusterModel


class THOCAdapter(Adapter):
    """THOC with an optional MADCluster head on ``drnn.layers.<last>`` (layout BTD)."""

    name = "thoc"
    hidden = "drnn.layers.2"  # the last of the three reference layers; wrap() follows other depths
    layout = "BTD"
    select = None
    capture = "first"
    phases = ("main", "join")
    head_phase = "main"
    weight_decay = 1e-6

    def build(self, n_channels: int, window: int = 100, **overrides: Any) -> nn.Module:
        """A THOC for ``n_channels`` channels (``window`` only has to exceed the largest dilation)."""
        check_build_overrides(THOC, overrides, ("n_channels",))
        dilations = tuple(overrides.get("dilations", (1, 2, 4)))
        if window <= max(dilations):
            raise ValueError(f"window={window} must exceed the largest dilation {max(dilations)}")
        return THOC(n_channels, **overrides)

    def wrap(self, model: nn.Module, **madcluster_overrides: Any) -> MADClusterModel:
        """Attach at the last dilated-RNN layer of ``model`` (whatever its depth) unless told otherwise.

        D is THOC's RNN width (a custom layer module, so ``wrap()`` cannot infer it from the module).
        """
        backbone = backbone_of(model)
        if "hidden" not in madcluster_overrides:
            madcluster_overrides["hidden"] = f"drnn.layers.{len(backbone.drnn.layers) - 1}"
            madcluster_overrides.setdefault("dim", backbone.hidden)
        return super().wrap(model, **madcluster_overrides)

    def phase_parameters(self, backbone: nn.Module) -> dict[str, list[nn.Parameter]]:
        """``join``: the fuse layers (eq. 8); ``main``: everything else (TimeSeAD's two optimisers).

        A one-layer THOC has no fuse layers, and then no ``join`` phase.
        """
        join = [p for p in backbone.join.parameters() if p.requires_grad]
        ids = {id(p) for p in join}
        phases = {"main": [p for p in backbone.parameters() if p.requires_grad and id(p) not in ids]}
        if join:
            phases["join"] = join
        return phases

"""USAD adapter: attach MADCluster to USAD's encoder latent; two-phase adversarial training.

Attachment (BASELINES.md section 2, "Hidden state"): the shared encoder ``E`` runs twice per
forward, on the real window ``W`` and on ``W1 = AE1(W)``; the head must see the call on ``W``,
so ``capture="first"``. Two layouts (``attach=`` of :meth:`USADAdapter.wrap`):

* ``"per_step"`` (default, option A): module ``encoder``, whose output is the latent reshaped to
  ``[B, T, h]`` (a pseudo-temporal slicing of the dense latent; ``D = h``);
* ``"window"`` (option B): module ``encoder.layers``, the flat latent ``[B, T*h]`` as one token
  ``[B, 1, T*h]`` (``D = T*h``).

Training (paper Algorithm 1, manigalati/usad): phase ``ae1`` steps ``{E, D1}`` on ``L_AE1``,
then phase ``ae2`` steps ``{E, D2}`` on ``L_AE2`` after a fresh forward. Unlike the reference,
ALL gradients of the model are zeroed before each phase (the reference leaks gradients between
the phases; see ``baselines.usad``). The head's loss joins ``ae1``: it is the phase that trains
the encoder to reconstruct the real data, and the captured latent is ``E(W)``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from baselines.usad import USAD

from .base import Adapter, AttachPoint, backbone_of, is_wrapped

ATTACH = {
    "per_step": AttachPoint("encoder", "BTD", "[B, T, h]", lambda usad: usad.hidden_size),
    "window": AttachPoint("encoder.layers", "BD", "[B, 1, T*h]", lambda usad: usad.window * usad.hidden_size),
}


class USADAdapter(Adapter):
    """Adapter for :class:`baselines.usad.USAD` (phases ``ae1``/``ae2``, head in ``ae1``)."""

    name = "usad"
    hidden = "encoder"
    layout = "BTD"
    select = None
    capture = "first"
    phases = ("ae1", "ae2")
    head_phase = "ae1"
    attach_points = ATTACH  # wrap(model, attach="per_step" | "window")
    default_attach = "per_step"

    def build(self, n_channels: int, window: int = 100, **overrides: Any) -> USAD:
        """A USAD with reference defaults (``hidden_size=100``); ``overrides`` go to :class:`USAD`."""
        return USAD(n_channels, window=window, **overrides)

    def phase_parameters(self, backbone: nn.Module) -> dict[str, list[nn.Parameter]]:
        """``ae1``: encoder + decoder1; ``ae2``: encoder + decoder2 (the encoder is in both, as the reference)."""
        enc = list(backbone.encoder.parameters())
        return {"ae1": enc + list(backbone.decoder1.parameters()),
                "ae2": enc + list(backbone.decoder2.parameters())}

    def train_step(self, model: nn.Module, x: Tensor, optimizers: dict[str, torch.optim.Optimizer],
                   epoch: int) -> dict[str, float]:
        """One batch: phase ``ae1`` (+ head loss when wrapped), then phase ``ae2`` on a fresh forward."""
        model.train()
        backbone = backbone_of(model)
        logs: dict[str, float] = {}

        model.zero_grad(set_to_none=True)
        out = model(x)
        loss1 = backbone.loss(x, out, epoch)["ae1"]
        logs["ae1"] = float(loss1.detach())
        if is_wrapped(model):
            head_loss = model.madcluster_loss()
            logs["madcluster"] = float(head_loss.detach())
            loss1 = loss1 + head_loss
        loss1.backward()
        optimizers["ae1"].step()
        if is_wrapped(model):
            model.after_optimizer_step()

        model.zero_grad(set_to_none=True)
        out = model(x)
        loss2 = backbone.loss(x, out, epoch)["ae2"]
        logs["ae2"] = float(loss2.detach())
        loss2.backward()
        optimizers["ae2"].step()
        model.zero_grad(set_to_none=True)
        logs["total"] = logs["ae1"] + logs["ae2"] + logs.get("madcluster", 0.0)
        return logs

    @torch.no_grad()
    def validation_loss(self, model: nn.Module, x: Tensor, epoch: int = 0) -> float:
        """Mean score on (normal) validation windows, plus the head loss when wrapped.

        The phase losses are a poor selection criterion: their sum is ``(MSE1 + MSE2)/n`` and
        shrinks with the epoch by construction, so the epoch-independent reconstruction error
        that the score uses is minimised instead.
        """
        out = model(x)
        total = float(backbone_of(model).reconstruction_error(x, out))
        if is_wrapped(model):
            total += float(model.madcluster_loss())
        return total

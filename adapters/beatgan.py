"""BeatGAN adapter: attach MADCluster to the generator latent; alternating D / G training.

Attachment (BASELINES.md section 3, "Hidden state"; ``attach=`` of :meth:`BeatGANAdapter.wrap`):

* ``"latent"`` (default): module ``generator.encoder``, the latent ``z = E(x)`` ``[B, nz, 1]``
  read as ``[B, 1, nz]`` (layout ``BDT``): one token per window, ``D = nz``;
* ``"per_step"``: module ``generator.encoder.step_view``, the first encoder block upsampled to
  the window, ``[B, ndf, T]`` read as ``[B, T, ndf]`` (layout ``BDT``): local per-step features.

The discriminator's features are never used: D is trained adversarially.

Training (hi-bingo/BeatGAN ``optimize``): phase ``D`` steps the discriminator on ``L_D``, then
phase ``G`` steps the generator on ``L_G`` computed with the updated D; ALL gradients are
zeroed before each phase. D is re-initialised when ``L_D < 5e-6``. The head's loss joins ``G``,
the phase that trains the encoder producing the latent. Adam betas are the reference's
(0.5, 0.999); the reference learning rate is 1e-4 (passed by the caller).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from baselines.beatgan import D_REINIT_THRESHOLD, BeatGAN

from madcluster_plugin.train import all_reduce_mean, broadcast_module_, is_distributed

from .base import Adapter, AttachPoint, backbone_of, is_wrapped

ATTACH = {
    "latent": AttachPoint("generator.encoder", "BDT", "[B, 1, nz]", lambda gan: gan.nz),
    "per_step": AttachPoint("generator.encoder.step_view", "BDT", "[B, T, ndf]", lambda gan: gan.ndf),
}
BETAS = (0.5, 0.999)


class BeatGANAdapter(Adapter):
    """Adapter for :class:`baselines.beatgan.BeatGAN` (phases ``D``/``G``, head in ``G``)."""

    name = "beatgan"
    hidden = "generator.encoder"
    layout = "BDT"
    select = None
    capture = "first"
    phases = ("D", "G")
    head_phase = "G"
    attach_points = ATTACH  # wrap(model, attach="latent" | "per_step")
    default_attach = "latent"

    def build(self, n_channels: int, window: int = 100, **overrides: Any) -> BeatGAN:
        """A BeatGAN with reference defaults (nz 50, ndf = ngf = 32, sigmoid output)."""
        return BeatGAN(n_channels, window=window, **overrides)

    def check_attach(self, model: nn.Module, attach: str) -> None:
        if attach == "per_step" and not backbone_of(model).generator.encoder.with_step_view:
            raise ValueError("attach='per_step' needs the model built with step_view=True")

    def phase_parameters(self, backbone: nn.Module) -> dict[str, list[nn.Parameter]]:
        return {"D": list(backbone.discriminator.parameters()),
                "G": list(backbone.generator.parameters())}

    def optimizers(self, model: nn.Module, lr: float) -> dict[str, torch.optim.Optimizer]:
        """One Adam per phase with the reference betas (0.5, 0.999); the head joins ``G``."""
        opts = super().optimizers(model, lr)
        for opt in opts.values():
            for group in opt.param_groups:
                group["betas"] = BETAS
        return opts

    def train_step(self, model: nn.Module, x: Tensor, optimizers: dict[str, torch.optim.Optimizer],
                   epoch: int) -> dict[str, float]:
        """D step, then G step (+ head loss when wrapped) on the same generator pass; D re-init rule."""
        model.train()
        backbone = backbone_of(model)
        logs: dict[str, float] = {}

        model.zero_grad(set_to_none=True)
        out = model(x)  # G has not changed until the G step, so this pass serves both phases
        loss_d = backbone.d_loss(x, out)
        logs["D"] = float(loss_d.detach())
        loss_d.backward()
        optimizers["D"].step()

        model.zero_grad(set_to_none=True)
        loss_g = backbone.g_loss(x, out)
        logs["G"] = float(loss_g.detach())
        if is_wrapped(model):
            head_loss = model.madcluster_loss()
            logs["madcluster"] = float(head_loss.detach())
            loss_g = loss_g + head_loss
        loss_g.backward()
        optimizers["G"].step()
        if is_wrapped(model):
            model.after_optimizer_step()
        model.zero_grad(set_to_none=True)

        # Under torch.distributed every rank decides on the all-reduced D loss and takes rank 0's
        # fresh weights, so the discriminators cannot drift apart.
        loss_d_all = all_reduce_mean(logs["D"], x.device)
        logs["d_reinit"] = float(loss_d_all < D_REINIT_THRESHOLD)
        if loss_d_all < D_REINIT_THRESHOLD:
            backbone.reinitialize_discriminator()
            if is_distributed():
                broadcast_module_(backbone.discriminator)
        logs["total"] = logs["D"] + logs["G"] + logs.get("madcluster", 0.0)
        return logs

    @torch.no_grad()
    def validation_loss(self, model: nn.Module, x: Tensor, epoch: int = 0) -> float:
        """Mean reconstruction error (what the score measures) plus the head loss when wrapped."""
        out = model(x)
        total = float(backbone_of(model).reconstruction_error(x, out))
        if is_wrapped(model):
            total += float(model.madcluster_loss())
        return total

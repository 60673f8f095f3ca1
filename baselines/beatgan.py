"""BeatGAN: a convolutional auto-encoder generator trained adversarially, scored by reconstruction.

Paper: B. Zhou, S. Liu, B. Hooi, X. Cheng, J. Ye, "BeatGAN: Anomalous Rhythm Detection using
Adversarially Generated Time Series", IJCAI 2019.
Reference followed: hi-bingo/BeatGAN (``experiments/ecg/network.py`` for the encoder/decoder,
``experiments/ecg/model.py`` for Generator, Discriminator, the training step and the
discriminator re-initialisation; ``options.py`` for defaults: nz 50, ndf = ngf = 32), with the
window handling of TimeSeAD (``timesead/models/generative/beatgan.py``). Digest: BASELINES.md
section 3.

Architecture (input ``[B, T, C]`` is transposed to ``[B, C, T]``: time on the conv axis):

* encoder: 5 bias-free conv1d blocks (kernel 4, stride 2, padding 1), channels
  ``C -> n -> 2n -> 4n -> 8n -> 16n`` (n = ``ndf``), LeakyReLU(0.2) after each, BatchNorm on
  blocks 2-5; then conv1d(16n -> nz, kernel ``T // 32``) to length 1.
  For T = 100 the lengths are 100 -> 50 -> 25 -> 12 -> 6 -> 3 -> 1.
* decoder (mirror): ConvTranspose1d(nz -> 16n, kernel ``T // 32``) + BN + ReLU, four transposed
  convs (kernel 4, stride 2, padding 1) halving the channels, each + BN + ReLU, and a last
  transposed conv ``n -> C`` with the output activation.
* generator ``G = decoder o encoder`` (latent ``[B, nz, 1]``); discriminator = the same encoder
  with one output: features ``f_D`` (the 16n-channel map before its last conv) and the logit.

Objective (alternating): D step ``L_D = BCE(D(x), 1) + BCE(D(G(x)), 0)``; G step
``L_G = MSE(x, G(x)) + w_adv * MSE(f_D(x), f_D(G(x)))`` (feature matching, ``w_adv = 1``).
When ``L_D < 5e-6`` the discriminator is re-initialised (Xavier-normal conv weights, BN weights
N(1, 0.02), BN biases 0: the reference ``weights_init``). Reference optimiser: Adam, lr 1e-4,
betas (0.5, 0.999). Score: squared reconstruction error.

What we changed, and why:

* **Any window T >= 32.** The reference is tied to T = 320 (last kernel 10). We use the last
  kernel ``T // 32`` (TimeSeAD's rule) and give each transposed conv the output padding that
  restores the encoder's lengths exactly (12 -> 25 for T = 100), fixed at construction.
* **Sigmoid output** (``output="sigmoid"``, default) for min-max [0, 1] data, as TimeSeAD;
  the reference ``tanh`` (for [-1, 1] data) stays available.
* **Numerically stable D loss:** the discriminator returns logits and the loss uses
  ``binary_cross_entropy_with_logits`` (the same value as sigmoid + BCE, without saturation).
* **Per-point score:** the squared error averaged over channels only, ``[B, T]`` (the reference
  averages over the whole window).
* **One generator pass per step:** the reference runs ``G(x)`` again in its G step although
  ``G`` has not changed since the D step; we reuse the D step's ``G(x)`` (detached there).
* **Per-step features:** ``generator.encoder.step_view`` linearly upsamples the first encoder
  block ``[B, n, T/2]`` to ``[B, n, T]``; it is a parameter-free view, unused by the losses,
  that exposes local per-step features to a forward hook.
* The reference's time-warping augmentation (``n_aug``, 0 by default there) is not included.

Sizes (``ndf = ngf = 32``, ``nz = 50``, T = 100): 2,271,040 parameters for C = 55 and
2,259,520 for C = 25 (G + D). The MADCluster appendix's 186M-parameter BeatGAN is a different,
dense network we do not chase (BASELINES.md section 0.2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OUTPUTS = ("sigmoid", "tanh", "linear")
D_REINIT_THRESHOLD = 5e-6
N_BLOCKS = 5


def _check_window(x: Tensor, window: int, n_channels: int) -> None:
    if x.dim() != 3 or tuple(x.shape[1:]) != (window, n_channels):
        raise ValueError(
            f"BeatGAN expects x of shape [B, {window}, {n_channels}] ([batch, window, channels]); "
            f"got {tuple(x.shape)}. Build the model with the window and channel count of your data "
            f"(adapters.get('beatgan').build(n_channels, window=...)).")


def _block_lengths(window: int) -> list[int]:
    """Lengths after each stride-2 block (kernel 4, padding 1 halves with floor): T, T/2, ..., T/32."""
    lengths = [window]
    for _ in range(N_BLOCKS):
        lengths.append(lengths[-1] // 2)
    return lengths


def init_weights(module: nn.Module) -> None:
    """The reference ``weights_init``: Xavier-normal conv weights, BN weight N(1, 0.02), bias 0."""
    if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
        nn.init.xavier_normal_(module.weight)
    elif isinstance(module, nn.BatchNorm1d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class BeatGANEncoder(nn.Module):
    """Conv encoder ``[B, C, T] -> [B, out, 1]``; ``features`` is everything but the last conv.

    ``features[0:2]`` is the first block (conv + LeakyReLU); ``step_view`` upsamples its output
    back to T (a forward hook on it sees ``[B, n, T]``). It runs only when ``with_step_view``.
    """

    def __init__(self, n_channels: int, window: int, ndf: int, out_channels: int,
                 with_step_view: bool) -> None:
        super().__init__()
        widths = [n_channels] + [ndf * 2 ** i for i in range(N_BLOCKS)]
        layers: list[nn.Module] = []
        for i in range(N_BLOCKS):
            layers.append(nn.Conv1d(widths[i], widths[i + 1], 4, 2, 1, bias=False))
            if i > 0:
                layers.append(nn.BatchNorm1d(widths[i + 1]))
            layers.append(nn.LeakyReLU(0.2))
        self.features = nn.Sequential(*layers)
        self.last = nn.Conv1d(widths[-1], out_channels, window // 32, 1, 0, bias=False)
        self.with_step_view = with_step_view
        self.step_view = nn.Upsample(size=window, mode="linear", align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.feature_map(x))

    def feature_map(self, x: Tensor) -> Tensor:
        """The 16n-channel map before the last conv (``f_D`` for the discriminator)."""
        first = self.features[:2](x)
        if self.with_step_view:
            self.step_view(first)
        return self.features[2:](first)


class BeatGANDecoder(nn.Module):
    """Mirror of the encoder: ``[B, nz, 1] -> [B, C, T]`` with exact output lengths."""

    def __init__(self, n_channels: int, window: int, ngf: int, nz: int, output: str) -> None:
        super().__init__()
        lengths = _block_lengths(window)  # [T, T/2, T/4, T/8, T/16, T/32]
        widths = [ngf * 2 ** i for i in range(N_BLOCKS)][::-1]  # 16n, 8n, 4n, 2n, n
        layers: list[nn.Module] = [nn.ConvTranspose1d(nz, widths[0], window // 32, 1, 0, bias=False),
                                   nn.BatchNorm1d(widths[0]), nn.ReLU()]
        outs = widths[1:] + [n_channels]
        for i in range(N_BLOCKS):
            src, dst = lengths[N_BLOCKS - i], lengths[N_BLOCKS - i - 1]
            pad = dst - 2 * src  # 0 or 1: restores the floor of the matching encoder block
            layers.append(nn.ConvTranspose1d(widths[i], outs[i], 4, 2, 1, output_padding=pad, bias=False))
            if i < N_BLOCKS - 1:
                layers += [nn.BatchNorm1d(outs[i]), nn.ReLU()]
        if output == "sigmoid":
            layers.append(nn.Sigmoid())
        elif output == "tanh":
            layers.append(nn.Tanh())
        self.layers = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.layers(z)


class BeatGANGenerator(nn.Module):
    """``G(x) = decoder(encoder(x))`` on ``[B, C, T]``; returns ``(reconstruction, latent [B, nz, 1])``."""

    def __init__(self, n_channels: int, window: int, ndf: int, ngf: int, nz: int, output: str,
                 with_step_view: bool) -> None:
        super().__init__()
        self.encoder = BeatGANEncoder(n_channels, window, ndf, nz, with_step_view)
        self.decoder = BeatGANDecoder(n_channels, window, ngf, nz, output)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        latent = self.encoder(x)
        return self.decoder(latent), latent


class BeatGANDiscriminator(nn.Module):
    """The encoder with one output channel: ``(logit [B], features f_D [B, 16n, T/32])``."""

    def __init__(self, n_channels: int, window: int, ndf: int) -> None:
        super().__init__()
        self.encoder = BeatGANEncoder(n_channels, window, ndf, 1, with_step_view=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.encoder.feature_map(x)
        return self.encoder.last(features).flatten(), features


@dataclass
class BeatGANOutput:
    """recon: ``G(x)`` as ``[B, T, C]``; latent: the generator latent ``[B, nz, 1]``."""

    recon: Tensor
    latent: Tensor


class BeatGAN(nn.Module):
    """BeatGAN (Zhou et al., IJCAI 2019) following hi-bingo/BeatGAN; see the module docstring.

    Args:
        n_channels: C. window: T (>= 32; reference-faithful defaults are for T = 100).
        nz: latent size (reference 50). ndf, ngf: base widths of encoder/discriminator and
            decoder (reference 32). w_adv: weight of the feature-matching term (reference 1).
        output: ``"sigmoid"`` (min-max [0, 1] data, default), ``"tanh"`` (reference, [-1, 1]
            data) or ``"linear"``.
        step_view: compute ``generator.encoder.step_view`` (the per-step attachment point);
            parameter-free, so the parameter count does not change.
    """

    def __init__(self, n_channels: int, window: int = 100, nz: int = 50, ndf: int = 32,
                 ngf: int = 32, w_adv: float = 1.0, output: str = "sigmoid",
                 step_view: bool = True) -> None:
        super().__init__()
        for label, value in (("n_channels", n_channels), ("nz", nz), ("ndf", ndf), ("ngf", ngf),
                             ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BeatGAN {label} must be an integer >= 1; got {value!r}")
        if window < 32:
            raise ValueError(
                f"BeatGAN needs window >= 32 (five stride-2 blocks, then a kernel of window // 32); "
                f"got window={window}. Use a window of at least 32 steps (100 is the default).")
        if output not in OUTPUTS:
            raise ValueError(f"BeatGAN output={output!r}; choose one of {OUTPUTS} "
                             f"('sigmoid' for min-max scaled [0, 1] data)")
        if not w_adv >= 0:
            raise ValueError(f"BeatGAN w_adv must be >= 0; got {w_adv!r}")
        self.n_channels, self.window, self.nz, self.ndf = n_channels, window, nz, ndf
        self.w_adv = float(w_adv)
        self.generator = BeatGANGenerator(n_channels, window, ndf, ngf, nz, output, step_view)
        self.discriminator = BeatGANDiscriminator(n_channels, window, ndf)
        self.apply(init_weights)

    def forward(self, x: Tensor) -> BeatGANOutput:
        """``x [B, T, C]`` -> :class:`BeatGANOutput` (the generator pass only)."""
        _check_window(x, self.window, self.n_channels)
        recon, latent = self.generator(x.transpose(1, 2))
        return BeatGANOutput(recon=recon.transpose(1, 2), latent=latent)

    def d_loss(self, x: Tensor, out: BeatGANOutput) -> Tensor:
        """``BCE(D(x), 1) + BCE(D(G(x)), 0)``; ``G(x)`` is detached (only D learns from it).

        Real and fake batches go through D separately, as the reference (BatchNorm statistics).
        """
        real_logit, _ = self.discriminator(x.transpose(1, 2))
        fake_logit, _ = self.discriminator(out.recon.detach().transpose(1, 2))
        return (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
                + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)))

    def g_loss(self, x: Tensor, out: BeatGANOutput) -> Tensor:
        """``MSE(x, G(x)) + w_adv * MSE(f_D(x), f_D(G(x)))`` (feature matching)."""
        _, fake_features = self.discriminator(out.recon.transpose(1, 2))
        with torch.no_grad():
            _, real_features = self.discriminator(x.transpose(1, 2))
        return F.mse_loss(out.recon, x) + self.w_adv * F.mse_loss(fake_features, real_features)

    def loss(self, x: Tensor, out: BeatGANOutput, epoch: int = 0) -> dict[str, Tensor]:
        """Both phase losses on the current discriminator: ``{"D": L_D, "G": L_G}``.

        Training steps them alternately (``adapters.beatgan.BeatGANAdapter.train_step``), with
        ``L_G`` computed after the D update; ``epoch`` is unused (kept for the common contract).
        """
        return {"D": self.d_loss(x, out), "G": self.g_loss(x, out)}

    def score(self, x: Tensor, out: BeatGANOutput) -> Tensor:
        """Per-point squared reconstruction error, averaged over channels -> ``[B, T]``."""
        return ((x - out.recon) ** 2).mean(dim=-1)

    def reconstruction_error(self, x: Tensor, out: BeatGANOutput) -> Tensor:
        """Scalar for model selection: the mean of :meth:`score` (D's loss is adversarial, not a target)."""
        return self.score(x, out).mean()

    @torch.no_grad()
    def reinitialize_discriminator(self) -> None:
        """Re-draw D's weights in place (reference ``reinitialize_netd``); optimiser state is kept."""
        self.discriminator.apply(init_weights)

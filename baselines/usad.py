"""USAD: UnSupervised Anomaly Detection on multivariate time series (two adversarial auto-encoders).

Paper: J. Audibert, P. Michiardi, F. Guyard, S. Marti, M. A. Zuluaga, "USAD: UnSupervised Anomaly
Detection on Multivariate Time Series", KDD 2020.
Reference followed: manigalati/usad (``usad.py`` for the model, training step and score;
``USAD.ipynb`` for the defaults), cross-checked against TimeSeAD
(``timesead/models/reconstruction/usad.py``). Digest: docs/BASELINES.md section 2.

Architecture (reference shape). The window is flattened, ``w = T*C``; the latent has
``z = T*h`` units (``h`` = ``hidden_size``, the notebook's 100):

* encoder ``E``:  Linear(w, w/2) -> ReLU -> Linear(w/2, w/4) -> ReLU -> Linear(w/4, z) -> ReLU
* decoders ``D1``, ``D2``: Linear(z, w/4) -> ReLU -> Linear(w/4, w/2) -> ReLU -> Linear(w/2, w)
  -> Sigmoid (inputs are min-max scaled to [0, 1])
* ``AE1 = D1 o E`` and ``AE2 = D2 o E`` share ``E``.

Objective with the 1-based epoch ``n``: ``W1 = AE1(W)``, ``W2 = AE2(W)``, ``W3 = AE2(W1)``,
``L_AE1 = MSE(W, W1)/n + (1 - 1/n) MSE(W, W3)`` and ``L_AE2 = MSE(W, W2)/n - (1 - 1/n) MSE(W, W3)``
(paper eqs. 7-8), trained in two phases per batch with two optimisers (``{E, D1}``, ``{E, D2}``).

What we changed, and why:

* **Gradient leak fixed.** The reference zeroes only the stepped optimiser's gradients, so
  ``D2`` enters the AE2 step still holding the AE1 phase's gradients of the ``W3`` term (which
  then roughly cancels AE2's adversarial gradient), and ``D1`` carries the AE2 phase's
  gradients into the next AE1 step. Our training step (``adapters.usad.USADAdapter``) zeroes
  the gradients of the whole model before each phase.

  Consequence, measured on the synthetic generator (seed 1, 8 channels, T = 100, h = 4,
  stride-2 windows, batch 32, lr 3e-3): once AE1 reconstructs well, ``E(W1) ~ E(W)`` and
  ``L_AE2 ~ (2/n - 1) MSE(W, AE2(W))``, so from ``n = 3`` on AE2 maximises its own error and
  its sigmoid saturates (train MSE of ``W2`` and ``W3`` about 0.29, against 0.03 for ``W1``);
  the ``W3`` error then carries little information and the default score
  (``alpha = beta = 0.5``) falls from AUROC 0.74 after the first epoch to 0.49 after four.
  With the reference's leak, the leaked ``+(1 - 1/n) MSE3`` gradient on ``D2`` cancels the
  adversarial one, ``D2`` stays a plain auto-encoder (MSE 0.034) and the score stays at 0.64.
  The published USAD numbers were obtained with the leaky code.
* **Per-point score.** The reference averages the squared errors over the whole flattened
  window (one score per window). We keep the per-time-step structure: the errors are reshaped
  to ``[B, T, C]`` and averaged over channels only, giving ``[B, T]``.
* **Latent exposed per step.** ``E`` is dense over the whole window, so it has no true per-step
  state; its output is reshaped to ``[B, T, h]`` (legal because ``z = T*h``). The flat latent
  ``[B, T*h]`` is still the output of ``encoder.layers``.
* **Sizes.** The reference default ``hidden_size = 100`` is kept (``z = 10,000`` for ``T = 100``):
  98,002,125 parameters at 100 x 55 (MSL) and 30,489,375 at 100 x 25. The MADCluster appendix's
  256M-parameter USAD is an implementation artefact we do not chase (BASELINES.md section 0.2).
* The forward always computes ``W1, W2, W3`` (the training forward, ``2E + 3D``) so that one
  output serves ``loss`` and ``score`` alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


def _check_window(x: Tensor, window: int, n_channels: int, name: str) -> None:
    """Fail early, naming the expected ``[B, T, C]`` shape and the fix."""
    if x.dim() != 3 or tuple(x.shape[1:]) != (window, n_channels):
        raise ValueError(
            f"{name} expects x of shape [B, {window}, {n_channels}] ([batch, window, channels]); "
            f"got {tuple(x.shape)}. Build the model with the window and channel count of your data "
            f"(adapters.get('{name.lower()}').build(n_channels, window=...)).")


class USADEncoder(nn.Module):
    """Dense encoder over the flattened window; returns the latent as ``[B, T, h]``.

    ``layers`` maps ``[B, T*C] -> [B, T*h]`` (the reference encoder); the forward then views the
    latent per pseudo time step, so a forward hook on ``encoder`` sees ``[B, T, h]`` and one on
    ``encoder.layers`` sees the flat ``[B, T*h]``.
    """

    def __init__(self, window: int, n_channels: int, hidden_size: int) -> None:
        super().__init__()
        w = window * n_channels
        self.window, self.hidden_size = window, hidden_size
        self.layers = nn.Sequential(
            nn.Linear(w, w // 2), nn.ReLU(),
            nn.Linear(w // 2, w // 4), nn.ReLU(),
            nn.Linear(w // 4, window * hidden_size), nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.flatten(1)).unflatten(1, (self.window, self.hidden_size))


class USADDecoder(nn.Module):
    """Dense decoder ``[B, T, h] -> [B, T, C]`` with a sigmoid output (min-max scaled data)."""

    def __init__(self, window: int, n_channels: int, hidden_size: int) -> None:
        super().__init__()
        w = window * n_channels
        self.window, self.n_channels = window, n_channels
        self.layers = nn.Sequential(
            nn.Linear(window * hidden_size, w // 4), nn.ReLU(),
            nn.Linear(w // 4, w // 2), nn.ReLU(),
            nn.Linear(w // 2, w), nn.Sigmoid(),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.layers(z.flatten(1)).unflatten(1, (self.window, self.n_channels))


@dataclass
class USADOutput:
    """Everything one forward produces: the latent of the real input and the three reconstructions.

    z:  ``E(W)``, ``[B, T, h]``;  w1: ``D1(E(W))``;  w2: ``D2(E(W))``;  w3: ``D2(E(W1))``
    (reconstructions ``[B, T, C]``).
    """

    z: Tensor
    w1: Tensor
    w2: Tensor
    w3: Tensor


class USAD(nn.Module):
    """USAD (Audibert et al., KDD 2020) following manigalati/usad; see the module docstring.

    Args:
        n_channels: C, the number of input channels.
        window: T, the window length (reference-faithful defaults are for T = 100).
        hidden_size: h, latent units per time step; the latent has ``T*h`` units (reference 100).
        alpha, beta: weights of the two reconstruction errors in the score (reference 0.5 / 0.5;
            the paper requires ``alpha + beta = 1``, larger ``beta`` = more sensitive).
    """

    def __init__(self, n_channels: int, window: int = 100, hidden_size: int = 100,
                 alpha: float = 0.5, beta: float = 0.5) -> None:
        super().__init__()
        for label, value, low in (("n_channels", n_channels, 1), ("window", window, 1),
                                  ("hidden_size", hidden_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"USAD {label} must be an integer >= {low}; got {value!r}")
        if window * n_channels < 4:
            raise ValueError(
                f"USAD needs window * n_channels >= 4 (its layers have w/2 and w/4 units); got "
                f"window={window}, n_channels={n_channels}. Use a longer window.")
        if alpha < 0 or beta < 0 or abs(alpha + beta - 1.0) > 1e-6:
            raise ValueError(
                f"USAD score weights must be >= 0 and sum to 1 (paper section 3.3); got "
                f"alpha={alpha}, beta={beta}. For example alpha=0.5, beta=0.5.")
        self.n_channels, self.window, self.hidden_size = n_channels, window, hidden_size
        self.alpha, self.beta = float(alpha), float(beta)
        self.encoder = USADEncoder(window, n_channels, hidden_size)
        self.decoder1 = USADDecoder(window, n_channels, hidden_size)
        self.decoder2 = USADDecoder(window, n_channels, hidden_size)

    def forward(self, x: Tensor) -> USADOutput:
        """``x [B, T, C]`` in [0, 1] -> :class:`USADOutput`. ``E`` runs on ``x`` first, then on ``W1``."""
        _check_window(x, self.window, self.n_channels, "USAD")
        z = self.encoder(x)
        w1 = self.decoder1(z)
        w2 = self.decoder2(z)
        w3 = self.decoder2(self.encoder(w1))
        return USADOutput(z=z, w1=w1, w2=w2, w3=w3)

    def loss(self, x: Tensor, out: USADOutput, epoch: int) -> dict[str, Tensor]:
        """The two phase losses (paper eqs. 7-8) at 0-based ``epoch`` (weights use ``n = epoch + 1``).

        ``"ae1"`` trains ``{E, D1}``, ``"ae2"`` trains ``{E, D2}``; each is minimised in its own
        phase (``adapters.usad.USADAdapter.train_step``), never their sum.
        """
        if epoch < 0:
            raise ValueError(f"epoch is 0-based and must be >= 0; got {epoch}")
        n = epoch + 1
        mse1 = torch.mean((x - out.w1) ** 2)
        mse2 = torch.mean((x - out.w2) ** 2)
        mse3 = torch.mean((x - out.w3) ** 2)
        return {"ae1": mse1 / n + (1 - 1 / n) * mse3,
                "ae2": mse2 / n - (1 - 1 / n) * mse3}

    def score(self, x: Tensor, out: USADOutput) -> Tensor:
        """Per-point score ``alpha*||x - AE1(x)||^2 + beta*||x - AE2(AE1(x))||^2`` / C -> ``[B, T]``."""
        err1 = ((x - out.w1) ** 2).mean(dim=-1)
        err3 = ((x - out.w3) ** 2).mean(dim=-1)
        return self.alpha * err1 + self.beta * err3

    def reconstruction_error(self, x: Tensor, out: USADOutput) -> Tensor:
        """Epoch-independent scalar for model selection: the mean of :meth:`score` over the batch."""
        return self.score(x, out).mean()

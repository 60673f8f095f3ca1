"""Deep SVDD for multivariate time series, one embedding per time step.

Paper: Ruff, Vandermeulen, Görnitz, Deecke, Siddiqui, Binder, Müller, Kloft, "Deep One-Class
Classification", ICML 2018.

Reference followed: lukasruff/Deep-SVDD-PyTorch (``src/optim/deepSVDD_trainer.py``: one-class and
soft-boundary objectives, centre initialisation with the eps push-out, the radius as the
(1 - nu)-quantile of the mini-batch distances after a warm-up) and xuhongzuo/DeepOD
(``deepod/models/time_series/dsvdd.py``: a bias-free recurrent encoder for windows of a series).
See docs/BASELINES.md section 1.

What we changed, and why:

* **Per time step.** Both references give one vector per window. We keep the encoder's output at
  every step, ``H = phi(x)`` of shape ``[B, T, D]``, and score every point, so the per-point protocol
  of the library needs no window averaging (BASELINES.md section 8.4).
* **Encoder.** A 3-layer GRU with 128 units and a 128 -> 64 linear map, all without biases (the
  configuration recommended in BASELINES.md section 1). Ruff's trivial-solution argument needs
  bias-free layers and an unbounded output; the GRU's internal sigmoid/tanh gates are not output
  activations, and the final linear map is unbounded.
* **Centre push-out tie-break (reference bug fixed).** Ruff sets ``c_i = -eps`` where
  ``-eps < c_i < 0`` and ``c_i = eps`` where ``0 < c_i < eps``; a coordinate that is exactly 0 stays 0.
  We push every ``|c_i| < eps`` out to ``sign(c_i) * eps`` with ``sign(0) = +1``.
* **Centre over all (b, t).** The centre is the mean of ``phi`` over every sample *and* every time
  step of the training windows, computed in eval mode without gradients (``on_fit_start``). It is
  a buffer, so it is saved in the ``state_dict`` and is never trained.
* **Radius only from training batches.** The soft-boundary radius is updated only from training
  mini-batches (``self.training`` and gradients enabled), never during validation or scoring.

Score: ``s_t = ||h_t - c||^2`` (``- R^2`` for the soft-boundary objective), shape ``[B, T]``.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

OBJECTIVES = ("one-class", "soft-boundary")


class DeepSVDDEncoder(nn.Module):
    """Bias-free stacked GRU followed by a bias-free per-step linear map: ``[B,T,C] -> [B,T,D]``."""

    def __init__(self, n_channels: int, hidden: int = 128, n_layers: int = 3, rep_dim: int = 64) -> None:
        super().__init__()
        self.rnn = nn.GRU(n_channels, hidden, num_layers=n_layers, bias=False, batch_first=True)
        self.proj = nn.Linear(hidden, rep_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(x)
        return self.proj(h)


class DeepSVDD(nn.Module):
    """Deep SVDD with a per-step bias-free GRU encoder (see the module docstring).

    Args:
        n_channels: input channels C.
        window: window length T (the model accepts any T; kept for the common constructor).
        hidden: GRU width (128).
        n_layers: GRU depth (3).
        rep_dim: output dimension D (64).
        objective: ``"one-class"`` or ``"soft-boundary"``.
        nu: soft-boundary trade-off in (0, 1]: the fraction of training distances allowed outside R.
        eps: centre push-out threshold (Ruff: 0.1).
        warm_up_epochs: epochs before the soft-boundary radius starts to be updated (Ruff: 10).
    """

    def __init__(self, n_channels: int, window: int = 100, *, hidden: int = 128, n_layers: int = 3,
                 rep_dim: int = 64, objective: str = "one-class", nu: float = 0.1, eps: float = 0.1,
                 warm_up_epochs: int = 10) -> None:
        super().__init__()
        if n_channels < 1 or window < 1:
            raise ValueError(f"n_channels and window must be >= 1; got {n_channels}, {window}")
        if hidden < 1 or n_layers < 1 or rep_dim < 1:
            raise ValueError(f"hidden, n_layers and rep_dim must be >= 1; got {hidden}, {n_layers}, "
                             f"{rep_dim}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r}; expected one of {OBJECTIVES}")
        if not 0.0 < nu <= 1.0:
            raise ValueError(f"nu must be in (0, 1]; got {nu}")
        if eps <= 0.0:
            raise ValueError(f"eps must be > 0; got {eps}")
        if warm_up_epochs < 0:
            raise ValueError(f"warm_up_epochs must be >= 0; got {warm_up_epochs}")
        self.n_channels = n_channels
        self.window = window
        self.rep_dim = rep_dim
        self.objective = objective
        self.nu = nu
        self.eps = eps
        self.warm_up_epochs = warm_up_epochs
        self.encoder = DeepSVDDEncoder(n_channels, hidden, n_layers, rep_dim)
        self.register_buffer("center", torch.zeros(rep_dim))
        self.register_buffer("radius", torch.zeros(()))
        self.register_buffer("center_initialized", torch.zeros((), dtype=torch.bool))

    # ---- forward ------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.n_channels:
            raise ValueError(f"expected x of shape [B, T, {self.n_channels}]; got {tuple(x.shape)}. "
                             f"Pass windows as [batch, time, channels].")

    def forward(self, x: Tensor) -> Tensor:
        """Per-step embeddings ``H = phi(x)`` of shape ``[B, T, D]``."""
        self._check_input(x)
        return self.encoder(x)

    def distances(self, out: Tensor) -> Tensor:
        """Squared distance of every step's embedding to the centre, ``[B, T]``."""
        if not bool(self.center_initialized):
            raise ValueError("DeepSVDD centre is not initialised: call on_fit_start(train_batches) "
                             "before training or scoring (or load a state_dict that has it).")
        return (out - self.center).pow(2).sum(dim=-1)

    # ---- training -----------------------------------------------------------------------
    @torch.no_grad()
    def on_fit_start(self, batches: Iterable[Tensor]) -> None:
        """Set the centre c to the mean embedding of the training windows (eval mode), then push
        every coordinate with ``|c_i| < eps`` out to ``sign(c_i) * eps`` (``sign(0) = +1``)."""
        was_training = self.training
        self.eval()
        total = torch.zeros(self.rep_dim, dtype=torch.float64, device=self.center.device)
        count = 0
        for x in batches:
            h = self(x.to(self.center.device))
            total += h.reshape(-1, self.rep_dim).sum(dim=0, dtype=torch.float64)
            count += h.shape[0] * h.shape[1]
        self.train(was_training)
        if count == 0:
            raise ValueError("on_fit_start got no training windows; pass a non-empty iterable of "
                             "[B, T, C] tensors.")
        c = (total / count).to(self.center.dtype)
        sign = torch.where(c >= 0, torch.ones_like(c), -torch.ones_like(c))
        c = torch.where(c.abs() < self.eps, sign * self.eps, c)
        self.center.copy_(c)
        self.radius.zero_()
        self.center_initialized.fill_(True)

    def loss(self, x: Tensor, out: Tensor, epoch: int) -> dict[str, Tensor]:
        """``{"svdd": L}``: mean squared distance (one-class) or Ruff's soft-boundary objective.

        For ``soft-boundary``, after ``warm_up_epochs`` the radius R is reset on every training
        mini-batch to the (1 - nu)-quantile of the batch's distances ``||h - c||`` (after the loss
        has used the previous R, as in the reference trainer).
        """
        dist = self.distances(out)
        if self.objective == "one-class":
            return {"svdd": dist.mean()}
        r2 = self.radius.detach().clone().pow(2)
        loss = r2 + torch.relu(dist - r2).mean() / self.nu
        if self.training and torch.is_grad_enabled() and epoch >= self.warm_up_epochs:
            q = torch.quantile(dist.detach().sqrt().flatten().double(), 1.0 - self.nu)
            self.radius.copy_(q.to(self.radius.dtype))
        return {"svdd": loss}

    def score(self, x: Tensor, out: Tensor) -> Tensor:
        """Per-point anomaly score ``[B, T]``: ``||h_t - c||^2`` (minus ``R^2`` for soft-boundary)."""
        dist = self.distances(out)
        if self.objective == "soft-boundary":
            dist = dist - self.radius.pow(2)
        return dist

    def extra_repr(self) -> str:
        return (f"objective={self.objective!r}, rep_dim={self.rep_dim}, nu={self.nu}, eps={self.eps}, "
                f"warm_up_epochs={self.warm_up_epochs}")


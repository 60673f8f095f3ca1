"""OmniAnomaly: a stochastic recurrent VAE with connected latents, a planar flow and an LGSSM prior.

Paper: Su, Zhao, Niu, Liu, Sun, Pei, "Robust Anomaly Detection for Multivariate Time Series through
Stochastic Recurrent Neural Network", KDD 2019.

Reference followed: NetManAIOps/OmniAnomaly (TensorFlow 1; ``main.py`` defaults,
``omni_anomaly/model.py``, ``wrapper.py``, ``recurrent_distribution.py``), read alongside the PyTorch
port in wagner-d/TimeSeAD (``timesead/models/generative/omni_anomaly.py``). See docs/BASELINES.md
section 4. Model, per window ``x`` of shape ``[B, T, C]``:

* q-net: ``e_t = Dense(Dense(GRU(x)_t))`` with two linear layers without activation (the reference
  ``rnn`` helper uses ``tf.layers.dense`` with its default linear activation);
* connected latents: ``mu_t, sigma_t = heads([e_t, z_{t-1}])``, ``sigma = softplus(.) + 1e-4``,
  ``z_t = mu_t + sigma_t * eps_t`` with ``z_0 = 0``;
* posterior flow: 20 planar transforms applied to every ``z_t``;
* p-net: ``d_t = Dense(Dense(GRU(z')_t))``, ``x_t ~ N(mu_x(d_t), softplus(.) + 1e-4)``;
* prior: the linear-Gaussian state-space model of the reference (identity transition and
  observation, unit noises, unit initial state; fixed, not learned);
* loss: the negative SGVB ELBO, ``E_q[-log p(x|z') - log p(z') + log q(z')]``.

Defaults are the reference's (z 3, GRU 500, dense 500, 20 flow layers, std epsilon 1e-4).

What we changed, and why:

* **log q(z|x) evaluated at the right conditioning (reference bug fixed).** The reference's
  ``log_prob_step`` feeds ``[z_t, e_t]`` (the *current* z, in swapped order) to the mean and std
  layers that were trained on ``[e_t, z_{t-1}]``, so its density does not belong to the sampler.
  We compute ``log q`` from the very ``mu_t, sigma_t`` that drew ``z_t``.
* **Reparameterised chain.** The reference samples the z chain with back-propagation switched off
  (``tf.scan(back_prop=False)``) and plain-normal densities on truncated-normal noise. We draw
  plain standard-normal noise and back-propagate through the chain (the usual SGVB estimator, as
  TimeSeAD).
* **Exact, vectorised LGSSM prior.** With the reference's fixed parameters, ``z[:, d]`` is Gaussian
  with covariance ``Sigma_ij = min(i, j) + delta_ij`` (i, j = 1..T). We whiten with the inverse
  Cholesky factor of ``Sigma`` (computed once per T in float64). This is the Kalman filter's
  prediction-error decomposition in one matrix product, with no per-step linear solves.
* **Invertible planar flow.** ``u_hat = u + (softplus(w.u) - 1 - w.u) w / |w|^2`` is applied
  functionally on every forward (TimeSeAD rewrites ``u.data`` in place and then uses the old ``u``
  in the log-determinant).
* **Per-point score over the whole window.** ``s_t = -sum_c log N(x_{t,c}; mu, sigma^2)`` for every
  step (the reference scores only the last point of each window).
* **Deterministic scoring.** In eval mode the chain runs without noise (every ``z_t`` at its
  conditional mean) when ``score_samples = 0`` (default), or averages the log-likelihood over
  ``score_samples`` draws from a generator seeded with ``score_seed`` on every call.
* **Loss scale.** Terms are per time step (the reference's per-window sum divided by T), so the
  loss does not grow with the window length.
* The z chain is inherently sequential (``sigma_t`` is a non-linear function of ``z_{t-1}``); only
  the small ``z_{t-1}`` part of the heads runs inside the time loop, the ``e_t`` part is one matmul.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class OmniAnomalyOutput:
    """Forward output. ``S`` is the number of z samples (1 in training)."""

    x_mean: Tensor   # [S, B, T, C] mean of p(x_t | z'_{1:t})
    x_std: Tensor    # [S, B, T, C] std of p(x_t | z'_{1:t})
    z: Tensor        # [S, B, T, Z] flowed latent z'
    log_q: Tensor    # [S, B, T] log q(z'_t | ...) = log q(z_t | e_t, z_{t-1}) - log|det J_flow|
    log_prior: Tensor  # [S, B, T] per-step term of log p_LGSSM(z'_{1:T}) (sums to the joint)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Element-wise ``log N(x; mean, std^2)``."""
    return -0.5 * ((x - mean) / std).pow(2) - std.log() - 0.5 * _LOG_2PI


@lru_cache(maxsize=16)
def _lgssm_whitening(length: int) -> tuple[Tensor, Tensor]:
    """Inverse Cholesky factor ``W = L^-1`` of ``Sigma_ij = min(i, j) + delta_ij`` and ``log diag L``.

    ``Sigma`` is the covariance over time of one latent coordinate under the reference LGSSM
    (``s_1 ~ N(0, 1)``, ``s_t = s_{t-1} + N(0, 1)``, ``z_t = s_t + N(0, 1)``). Float64, CPU.
    """
    idx = torch.arange(1, length + 1, dtype=torch.float64)
    sigma = torch.minimum(idx[:, None], idx[None, :]) + torch.eye(length, dtype=torch.float64)
    chol = torch.linalg.cholesky(sigma)
    inv = torch.linalg.solve_triangular(chol, torch.eye(length, dtype=torch.float64), upper=False)
    return inv, chol.diagonal().log()


def lgssm_log_prob(z: Tensor) -> Tensor:
    """Per-step terms of ``log p(z_{1:T})`` under the reference LGSSM prior; ``z`` is ``[..., T, Z]``.

    Returns ``[..., T]``; the sum over T is the exact joint log-density (the Kalman filter's
    prediction-error decomposition: step t holds the log-density of the t-th innovation).
    """
    inv, log_diag = _lgssm_whitening(z.shape[-2])
    inv = inv.to(device=z.device, dtype=z.dtype)
    log_diag = log_diag.to(device=z.device, dtype=z.dtype)
    white = torch.einsum("ts,...sz->...tz", inv, z)
    return (-0.5 * white.pow(2) - log_diag[:, None] - 0.5 * _LOG_2PI).sum(dim=-1)


class PlanarFlow(nn.Module):
    """A stack of planar transforms ``f(z) = z + u_hat tanh(w.z + b)`` (Rezende & Mohamed 2015).

    ``u_hat`` keeps ``w.u_hat >= -1`` so every transform is invertible and ``1 + (1 - tanh^2) w.u_hat``
    stays positive.
    """

    def __init__(self, dim: int, n_layers: int) -> None:
        super().__init__()
        self.dim = dim
        self.n_layers = n_layers
        self.w = nn.Parameter(torch.randn(n_layers, dim) * 0.1)
        self.u = nn.Parameter(torch.randn(n_layers, dim) * 0.1)
        self.b = nn.Parameter(torch.zeros(n_layers))

    def u_hat(self) -> Tensor:
        wu = (self.w * self.u).sum(dim=-1, keepdim=True)
        w_sq = self.w.pow(2).sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.u + (F.softplus(wu) - 1.0 - wu) * self.w / w_sq

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``z [..., dim] -> (f(z) [..., dim], log|det J| [...])``."""
        u_hat = self.u_hat()
        wu_hat = (self.w * u_hat).sum(dim=-1)
        log_det = z.new_zeros(z.shape[:-1])
        for k in range(self.n_layers):  # a composition: each layer needs the previous output
            t = torch.tanh(z @ self.w[k] + self.b[k])
            z = z + t.unsqueeze(-1) * u_hat[k]
            log_det = log_det + torch.log1p(((1.0 - t * t) * wu_hat[k]).clamp_min(-1.0 + 1e-6))
        return z, log_det


class RecurrentDense(nn.Module):
    """The reference ``rnn`` helper: a GRU, then linear layers without activation."""

    def __init__(self, n_in: int, hidden: int, dense: int, n_dense: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(n_in, hidden, batch_first=True)
        dims = [hidden] + [dense] * n_dense
        self.dense = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])
        self.out_dim = dims[-1]

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(x)
        return self.dense(h)


class OmniAnomaly(nn.Module):
    """OmniAnomaly (see the module docstring).

    Args:
        n_channels: input channels C.
        window: window length T (the model accepts any T; kept for the common constructor).
        z_dim: latent size (3).
        rnn_hidden: GRU width of the q- and p-nets (500).
        dense_dim: width of their linear layers (500).
        n_dense: number of linear layers after each GRU (2).
        nf_layers: planar-flow depth (20; 0 disables the flow).
        std_epsilon: added to every softplus standard deviation (1e-4).
        score_samples: 0 scores the noise-free chain in eval mode; S > 0 averages the
            log-likelihood over S seeded draws.
        score_seed: seed of the eval-mode sampler.
    """

    def __init__(self, n_channels: int, window: int = 100, *, z_dim: int = 3, rnn_hidden: int = 500,
                 dense_dim: int = 500, n_dense: int = 2, nf_layers: int = 20,
                 std_epsilon: float = 1e-4, score_samples: int = 0, score_seed: int = 0) -> None:
        super().__init__()
        if n_channels < 1 or window < 1:
            raise ValueError(f"n_channels and window must be >= 1; got {n_channels}, {window}")
        if z_dim < 1 or rnn_hidden < 1 or dense_dim < 1:
            raise ValueError(f"z_dim, rnn_hidden and dense_dim must be >= 1; got {z_dim}, "
                             f"{rnn_hidden}, {dense_dim}")
        if n_dense < 0 or nf_layers < 0 or score_samples < 0:
            raise ValueError(f"n_dense, nf_layers and score_samples must be >= 0; got {n_dense}, "
                             f"{nf_layers}, {score_samples}")
        if std_epsilon <= 0:
            raise ValueError(f"std_epsilon must be > 0; got {std_epsilon}")
        self.n_channels = n_channels
        self.window = window
        self.z_dim = z_dim
        self.std_epsilon = std_epsilon
        self.score_samples = score_samples
        self.score_seed = score_seed
        self.qnet = RecurrentDense(n_channels, rnn_hidden, dense_dim, n_dense)
        e_dim = self.qnet.out_dim
        self.z_mean = nn.Linear(e_dim + z_dim, z_dim)
        self.z_std = nn.Linear(e_dim + z_dim, z_dim)
        self.flow = PlanarFlow(z_dim, nf_layers)
        self.pnet = RecurrentDense(z_dim, rnn_hidden, dense_dim, n_dense)
        self.x_mean = nn.Linear(self.pnet.out_dim, n_channels)
        self.x_std = nn.Linear(self.pnet.out_dim, n_channels)

    # ---- forward ------------------------------------------------------------------------
    def _noise(self, shape: tuple[int, ...], like: Tensor) -> tuple[Tensor, int]:
        """Standard-normal noise ``[S*B, T, Z]`` and S: random in training, fixed in eval mode."""
        if self.training:
            return torch.randn(shape, dtype=like.dtype, device=like.device), 1
        if self.score_samples == 0:
            return like.new_zeros(shape), 1
        gen = torch.Generator(device=like.device).manual_seed(self.score_seed)
        s = self.score_samples
        full = torch.randn((s * shape[0],) + shape[1:], generator=gen, dtype=like.dtype,
                           device=like.device)
        return full, s

    def _posterior_chain(self, e: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """Sample ``z_t = mu([e_t, z_{t-1}]) + sigma([e_t, z_{t-1}]) * eps_t``; returns z and log q(z)."""
        n_e = e.shape[-1]
        # e_t's share of both heads for every step at once; only the z_{t-1} share is sequential.
        mean_e = F.linear(e, self.z_mean.weight[:, :n_e], self.z_mean.bias)
        std_e = F.linear(e, self.z_std.weight[:, :n_e], self.z_std.bias)
        w_mean_z = self.z_mean.weight[:, n_e:].t()
        w_std_z = self.z_std.weight[:, n_e:].t()
        z_prev = e.new_zeros(e.shape[0], self.z_dim)
        zs, stds = [], []
        for t in range(e.shape[1]):
            mean = mean_e[:, t] + z_prev @ w_mean_z
            std = F.softplus(std_e[:, t] + z_prev @ w_std_z) + self.std_epsilon
            z_prev = mean + std * noise[:, t]
            zs.append(z_prev)
            stds.append(std)
        z = torch.stack(zs, dim=1)
        std = torch.stack(stds, dim=1)
        # z - mean = std * noise exactly, so log N(z; mean, std) needs no division.
        log_q = (-0.5 * noise.pow(2) - std.log() - 0.5 * _LOG_2PI).sum(dim=-1)
        return z, log_q

    def forward(self, x: Tensor) -> OmniAnomalyOutput:
        if x.dim() != 3 or x.shape[-1] != self.n_channels:
            raise ValueError(f"expected x of shape [B, T, {self.n_channels}]; got {tuple(x.shape)}. "
                             f"Pass windows as [batch, time, channels].")
        b, t, _ = x.shape
        e = self.qnet(x)                                              # [B, T, E]
        noise, s = self._noise((b, t, self.z_dim), e)
        if s > 1:
            e = e.repeat(s, 1, 1)                                     # [S*B, T, E], sample-major
        z, log_q = self._posterior_chain(e, noise)
        z_flow, log_det = self.flow(z)
        d = self.pnet(z_flow)
        x_mean = self.x_mean(d)
        x_std = F.softplus(self.x_std(d)) + self.std_epsilon
        log_prior = lgssm_log_prob(z_flow)

        def split(v: Tensor) -> Tensor:
            return v.reshape((s, b) + v.shape[1:])

        return OmniAnomalyOutput(split(x_mean), split(x_std), split(z_flow), split(log_q - log_det),
                                 split(log_prior))

    # ---- objective and score --------------------------------------------------------------
    def log_likelihood(self, x: Tensor, out: OmniAnomalyOutput) -> Tensor:
        """``log p(x_t | z')`` summed over channels, ``[S, B, T]``."""
        return gaussian_log_prob(x.unsqueeze(0), out.x_mean, out.x_std).sum(dim=-1)

    def loss(self, x: Tensor, out: OmniAnomalyOutput, epoch: int) -> dict[str, Tensor]:
        """Negative ELBO per time step: ``{"nll": -E log p(x|z'), "kl": E[log q(z') - log p(z')]}``."""
        return {"nll": -self.log_likelihood(x, out).mean(),
                "kl": (out.log_q - out.log_prior).mean()}

    def score(self, x: Tensor, out: OmniAnomalyOutput) -> Tensor:
        """Negative reconstruction log-probability per point, averaged over z samples, ``[B, T]``."""
        return -self.log_likelihood(x, out).mean(dim=0)

    def extra_repr(self) -> str:
        return (f"z_dim={self.z_dim}, std_epsilon={self.std_epsilon}, "
                f"score_samples={self.score_samples}, score_seed={self.score_seed}")

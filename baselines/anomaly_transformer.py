"""Anomaly Transformer (a plain baseline; knows nothing about MADCluster).

Paper: Jiehui Xu, Haixu Wu, Jianmin Wang, Mingsheng Long, "Anomaly Transformer: Time Series Anomaly
Detection with Association Discrepancy", ICLR 2022.

Reference followed: the official code, thuml/Anomaly-Transformer (``model/AnomalyTransformer.py``,
``model/attn.py``, ``model/embed.py``, ``solver.py``); BASELINES.md section 6. Official
configuration: window 100, d_model 512, 8 heads, 3 post-LN encoder layers, d_ff 512, GELU, dropout 0,
k = 3, score temperature 50. With 55 channels this is exactly 4,863,055 parameters.

What we changed (and why):

* No hard-coded CUDA: the ``|i - j|`` distance matrix and the positional encoding are
  non-persistent buffers that follow the module's device (the reference calls ``.cuda()`` and
  cannot be built on a CPU). Windows shorter than the built one are accepted (both are sliced).
* Memory: the prior is built by broadcasting ``sigma [B, H, T, 1]`` against the ``[T, T]``
  distances (no ``repeat`` copies), and is returned already row-normalised. We normalise with a
  softmax over ``-|i-j|^2 / (2 sigma_i^2)``: mathematically the reference's
  ``N(|i-j|; 0, sigma_i) / sum_j N(...)`` (the ``1/(sqrt(2 pi) sigma)`` factor cancels), but it
  cannot overflow when sigma is near its 1e-5 floor.
* Minimax in one backward pass: ``loss`` returns ``{"max": L_rec - k AssDis(S, P_sg),
  "min": L_rec + k AssDis(P, S_sg)}`` where ``_sg`` is a stop-gradient. The reference calls
  ``backward`` on both (the first with ``retain_graph``) before one optimiser step; gradients add
  linearly, so one backward of their sum gives the identical update (including the reference's
  doubled reconstruction gradient) without retaining the graph.
* The two 1x1 convolutions of the feed-forward block are ``nn.Linear`` layers (the same map and
  the same parameter count, without the transposes).
* The reference's attention wrapper defines a LayerNorm that its forward never uses; we keep it
  (``keep_unused_norm=True``, 3 x 1,024 parameters) so the official parameter count, which the
  MADCluster appendix reproduces, still holds. It receives no gradient.
* The reference's lr halving per epoch and its test-set validation / threshold are training and
  evaluation protocol, not model; they live outside this module (see BASELINES.md section 8).

Score per point (the reference's ``test``): ``AssDis_t = temperature * sum_l [KL(S_l || P_l) +
KL(P_l || S_l)]_t`` (row-wise KL averaged over heads), then ``softmax_t(-AssDis) * mean_c (x - x_hat)^2``
over the T positions of each window. With the reference temperature the softmax is nearly one-hot
within a window (the discrepancy varies by hundreds after scaling), so the score is relative within a
window and concentrates on one point of it; ``temperature`` is a constructor argument.

Attachment point for a MADCluster head: ``encoder`` (select 0 of its tuple output), the encoder
output after the final LayerNorm and before the projection, ``[B, T, d_model]``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from baselines.embedding import DataEmbedding

KL_EPS = 1e-4  # the reference's smoothing inside the logs


class ATOutput(NamedTuple):
    """What :meth:`AnomalyTransformer.forward` returns.

    recon:  reconstruction ``[B, T, C]``.
    series: per layer, the series association S ``[B, H, T, T]`` (rows sum to 1).
    prior:  per layer, the row-normalised Gaussian prior association ``[B, H, T, T]``.
    sigma:  per layer, the prior widths ``[B, H, T]``.
    """

    recon: Tensor
    series: list[Tensor]
    prior: list[Tensor]
    sigma: list[Tensor]


def row_kl(p: Tensor, q: Tensor) -> Tensor:
    """The reference's smoothed KL(p || q) per row, averaged over heads: ``[B, H, T, T] -> [B, T]``."""
    return _kl_from_logs(p, torch.log(p + KL_EPS), torch.log(q + KL_EPS))


def _kl_from_logs(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """``row_kl`` from precomputed smoothed logs (each log is taken once per layer, not per term)."""
    return (p * (log_p - log_q)).sum(-1).mean(1)


class AnomalyAttention(nn.Module):
    """Anomaly attention: series association S = softmax(QK^T / sqrt(E)) and a learnable Gaussian prior.

    sigma_i = 3^(sigmoid(5 s_i) + 1e-5) - 1 per position and head (the reference's bounded transform);
    prior P_{ij} proportional to exp(-|i - j|^2 / (2 sigma_i^2)), normalised per row.
    """

    def __init__(self, d_model: int, n_heads: int, window: int, dropout: float = 0.0,
                 keep_unused_norm: bool = True) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        if keep_unused_norm:
            # Defined but never used in the reference's AttentionLayer; kept for the parameter count.
            self.unused_norm = nn.LayerNorm(d_model)
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.sigma_projection = nn.Linear(d_model, n_heads)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        idx = torch.arange(window, dtype=torch.float32)
        self.register_buffer("distances", (idx[:, None] - idx[None, :]).abs(), persistent=False)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b, t, d = h.shape
        H = self.n_heads
        q = self.query(h).view(b, t, H, -1).transpose(1, 2)        # [B, H, T, E]
        k = self.key(h).view(b, t, H, -1).transpose(1, 2)
        v = self.value(h).view(b, t, H, -1).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, H, T, T]
        series = self.dropout(torch.softmax(scores, dim=-1))
        sigma = self.sigma_projection(h).transpose(1, 2)               # [B, H, T]
        sigma = torch.pow(3.0, torch.sigmoid(5.0 * sigma) + 1e-5) - 1.0
        dist = self.distances[:t, :t]
        prior = torch.softmax(-(dist ** 2) / (2.0 * sigma.unsqueeze(-1) ** 2), dim=-1)
        o = (series @ v).transpose(1, 2).reshape(b, t, d)
        return self.out(o), series, prior, sigma


class EncoderLayer(nn.Module):
    """Post-LN block: h = LN(h + Attn(h)); h = LN(h + FFN(h)), FFN = Linear-GELU-Linear (1x1 convs)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, window: int, dropout: float = 0.0,
                 activation: str = "gelu", keep_unused_norm: bool = True) -> None:
        super().__init__()
        if activation not in ("gelu", "relu"):
            raise ValueError(f"activation={activation!r}; choose 'gelu' (reference) or 'relu'")
        self.attention = AnomalyAttention(d_model, n_heads, window, dropout, keep_unused_norm)
        self.ff1 = nn.Linear(d_model, d_ff)
        self.ff2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = F.gelu if activation == "gelu" else F.relu

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        a, series, prior, sigma = self.attention(h)
        h = self.norm1(h + self.dropout(a))
        y = self.dropout(self.ff2(self.dropout(self.activation(self.ff1(h)))))
        return self.norm2(h + y), series, prior, sigma


class Encoder(nn.Module):
    """Encoder layers then a final LayerNorm; returns ``(h [B, T, d], series, prior, sigma)`` lists."""

    def __init__(self, layers: list[EncoderLayer], d_model: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, h: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
        series, prior, sigma = [], [], []
        for layer in self.layers:
            h, s, p, sg = layer(h)
            series.append(s)
            prior.append(p)
            sigma.append(sg)
        return self.norm(h), series, prior, sigma


class AnomalyTransformer(nn.Module):
    """Anomaly Transformer on windows ``[B, T, C]``; see the module docstring for paper, reference, changes.

    Args:
        n_channels: C (input and reconstructed channels).
        window: the longest window T the model accepts (distance and position buffers).
        d_model, n_heads, n_layers, d_ff, dropout, activation: the encoder (reference 512/8/3/512/0/gelu).
        k: weight of the association discrepancy in the minimax losses (reference 3).
        temperature: multiplies the discrepancy inside the score's softmax (reference 50).
        keep_unused_norm: keep the reference's unused LayerNorm per layer (parameter-count parity).
    """

    def __init__(self, n_channels: int, window: int = 100, d_model: int = 512, n_heads: int = 8,
                 n_layers: int = 3, d_ff: int = 512, dropout: float = 0.0, activation: str = "gelu",
                 k: float = 3.0, temperature: float = 50.0, keep_unused_norm: bool = True) -> None:
        super().__init__()
        if n_channels < 1 or window < 2 or n_layers < 1 or d_model < 2 or d_ff < 1:
            raise ValueError(f"need n_channels >= 1, window >= 2, n_layers >= 1, d_model >= 2, d_ff >= 1; "
                             f"got {n_channels}, {window}, {n_layers}, {d_model}, {d_ff}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        self.n_channels, self.window, self.d_model = int(n_channels), int(window), int(d_model)
        self.k, self.temperature = float(k), float(temperature)
        self.embedding = DataEmbedding(n_channels, d_model, window, dropout)
        self.encoder = Encoder([EncoderLayer(d_model, n_heads, d_ff, window, dropout, activation,
                                             keep_unused_norm) for _ in range(n_layers)], d_model)
        self.projection = nn.Linear(d_model, n_channels)

    def forward(self, x: Tensor) -> ATOutput:
        if x.ndim != 3 or x.shape[-1] != self.n_channels:
            raise ValueError(f"AnomalyTransformer expects x of shape [B, T, {self.n_channels}]; "
                             f"got {tuple(x.shape)}")
        if not 2 <= x.shape[1] <= self.window:
            raise ValueError(f"window length {x.shape[1]} must be in [2, {self.window}]; build the model "
                             f"with window={x.shape[1]} for longer windows")
        h, series, prior, sigma = self.encoder(self.embedding(x))
        return ATOutput(self.projection(h), series, prior, sigma)

    # ---- objective ------------------------------------------------------------------------
    def discrepancy(self, out: ATOutput) -> tuple[Tensor, Tensor]:
        """Layer-averaged AssDis with the stop-gradient on one side: ``(for S, for P)``, scalars.

        The first trains the series association (prior detached), the second the prior (series
        detached). Their values are equal; their gradients are not.
        """
        to_series = to_prior = out.recon.new_zeros(())
        for s, p in zip(out.series, out.prior):
            log_s, log_p = torch.log(s + KL_EPS), torch.log(p + KL_EPS)
            s_sg, p_sg, log_s_sg, log_p_sg = s.detach(), p.detach(), log_s.detach(), log_p.detach()
            to_series = (to_series + _kl_from_logs(s, log_s, log_p_sg).mean()
                         + _kl_from_logs(p_sg, log_p_sg, log_s).mean())
            to_prior = (to_prior + _kl_from_logs(p, log_p, log_s_sg).mean()
                        + _kl_from_logs(s_sg, log_s_sg, log_p).mean())
        n = len(out.series)
        return to_series / n, to_prior / n

    def loss(self, x: Tensor, out: ATOutput, epoch: int = 0) -> dict[str, Tensor]:
        """Minimax terms keyed by phase: ``max`` (series maximises AssDis), ``min`` (prior minimises it).

        Their sum is what one backward pass needs (see the module docstring).
        """
        rec = F.mse_loss(out.recon, x)
        to_series, to_prior = self.discrepancy(out)
        return {"max": rec - self.k * to_series, "min": rec + self.k * to_prior}

    def association_discrepancy(self, out: ATOutput) -> Tensor:
        """Per-point ``temperature * sum_l [KL(S_l || P_l) + KL(P_l || S_l)]`` ``[B, T]``."""
        total = torch.zeros_like(out.recon[..., 0])
        for s, p in zip(out.series, out.prior):
            log_s, log_p = torch.log(s + KL_EPS), torch.log(p + KL_EPS)
            total = total + _kl_from_logs(s, log_s, log_p) + _kl_from_logs(p, log_p, log_s)
        return self.temperature * total

    def score(self, x: Tensor, out: ATOutput) -> Tensor:
        """Per-point score ``[B, T]``: softmax over the window of -AssDis times the per-point MSE."""
        err = ((x - out.recon) ** 2).mean(-1)
        return torch.softmax(-self.association_discrepancy(out), dim=-1) * err


__all__ = ["AnomalyTransformer", "ATOutput", "AnomalyAttention", "row_kl"]

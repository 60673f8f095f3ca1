"""Embedding layers shared by the Transformer-style baselines (AnomalyTransformer, DCdetector).

Both references embed tokens with a circular Conv1d (kernel 3, no bias, Kaiming-normal) plus the
fixed sinusoidal position code of Vaswani et al.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_encoding(length: int, d_model: int) -> Tensor:
    """The Transformer's fixed positional encoding ``[length, d_model]``."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)[:, : d_model // 2]
    return pe


class DataEmbedding(nn.Module):
    """Token embedding: circular Conv1d (``f -> d``, kernel 3, no bias) + fixed position code + dropout.

    Input ``[N, m, f]`` (``m`` tokens of length ``f``), output ``[N, m, d]``. Conv weights are
    Kaiming-normal (fan_in, leaky_relu) as the reference.
    """

    def __init__(self, c_in: int, d_model: int, max_len: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, d_model, kernel_size=3, padding=1, padding_mode="circular", bias=False)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_in", nonlinearity="leaky_relu")
        self.register_buffer("pe", sinusoidal_encoding(max_len, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)

    def undropped(self, u: Tensor) -> Tensor:
        """Conv + position code, before dropout: ``[N, m, f] -> [N, m, d]``."""
        return self.conv(u.transpose(1, 2)).transpose(1, 2) + self.pe[: u.shape[1]]

    def forward(self, u: Tensor) -> Tensor:
        return self.dropout(self.undropped(u))

    def kernel_matrix(self) -> Tensor:
        """The conv weight as a ``[3f, d]`` matrix acting on :func:`circular_unfold` rows."""
        w = self.conv.weight  # [d, f, 3]
        return w.permute(2, 1, 0).reshape(-1, w.shape[0])

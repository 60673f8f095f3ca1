"""Shared test routine: train a baseline (plain or wrapped) on the synthetic generator briefly.

Used by the per-baseline acceptance tests: finite losses, and per-point scores that separate the
injected anomalies (AUROC) on held-out synthetic test data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

import adapters
from benchmarks.synthetic import make_synthetic


def n_params(model: torch.nn.Module) -> int:
    """Number of parameter elements (what "wrapping adds K*D + 1" counts)."""
    return sum(p.numel() for p in model.parameters())


def windows(series: np.ndarray, window: int, stride: int) -> torch.Tensor:
    """``[N, C]`` -> ``[n, window, C]`` windows starting every ``stride`` points (last one flush)."""
    starts = list(range(0, len(series) - window + 1, stride))
    if starts[-1] != len(series) - window:
        starts.append(len(series) - window)
    return torch.from_numpy(np.stack([series[s:s + window] for s in starts])).float()


def point_scores(score_windows: torch.Tensor, length: int, window: int, stride: int) -> np.ndarray:
    """Mean of the per-point scores of every window covering each time index."""
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    total = np.zeros(length)
    count = np.zeros(length)
    s = score_windows.detach().cpu().double().numpy()
    for i, st in enumerate(starts):
        total[st:st + window] += s[i]
        count[st:st + window] += 1
    return total / count


@dataclass
class TrainResult:
    auroc: float
    losses: list[dict[str, float]]
    scores: np.ndarray
    model: torch.nn.Module


def train_on_synthetic(name: str, wrapped: bool, *, build: dict[str, Any] | None = None,
                       head: dict[str, Any] | None = None, n_channels: int = 8,
                       window: int = 100, stride: int = 10, epochs: int = 3, batch: int = 32,
                       lr: float = 1e-3, seed: int = 0, combine: str | None = None,
                       n_train: int = 3000, n_test: int = 2000) -> TrainResult:
    """Train ``name`` for a few epochs on synthetic data; return the test AUROC of its scores."""
    torch.manual_seed(seed)
    data = make_synthetic(n_channels=n_channels, n_train=n_train, n_test=n_test, seed=seed)
    adapter = adapters.get(name)
    model = adapter.build(n_channels, window=window, **(build or {}))
    if wrapped:
        model = adapter.wrap(model, **(head or {}))
    train_x = windows(data.train, window, stride)
    gen = torch.Generator().manual_seed(seed)
    backbone = model.backbone if wrapped else model
    batches = [train_x[i:i + batch] for i in range(0, len(train_x), batch)]
    if hasattr(backbone, "on_fit_start"):
        backbone.on_fit_start(batches)
    opts = adapter.optimizers(model, lr)
    losses: list[dict[str, float]] = []
    for epoch in range(epochs):
        order = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(order), batch):
            logs = adapter.train_step(model, train_x[order[i:i + batch]], opts, epoch)
            assert all(math.isfinite(v) for v in logs.values()), logs
            losses.append(logs)
        if hasattr(backbone, "on_epoch_end"):
            backbone.on_epoch_end(epoch)
    model.eval()
    if combine is None:
        combine = "sum" if wrapped else "base"
    if wrapped:
        adapter.fit_score_normalizer(model, batches)
    test_x = windows(data.test, window, window // 2)
    with torch.no_grad():
        s = torch.cat([adapter.score(model, test_x[i:i + batch], combine=combine)
                       for i in range(0, len(test_x), batch)])
    assert torch.isfinite(s).all()
    pts = point_scores(s, len(data.test), window, window // 2)
    return TrainResult(float(roc_auc_score(data.test_labels, pts)), losses, pts, model)

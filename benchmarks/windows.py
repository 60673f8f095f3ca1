"""Sliding windows over a series and the way window outputs go back to time indices.

All vectorised: windows are strided views (no copy until a batch is materialised), per-point
scores are averaged over covering windows with one ``bincount``, window labels come from a
cumulative sum.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


def window_starts(length: int, window: int, stride: int) -> np.ndarray:
    """Start indices every ``stride`` points; the last window is flush with the end of the series
    so every time index is covered."""
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1; got window={window}, stride={stride}")
    if length < window:
        raise ValueError(f"series of length {length} is shorter than one window ({window})")
    starts = np.arange(0, length - window + 1, stride)
    if starts[-1] != length - window:
        starts = np.append(starts, length - window)
    return starts


def thin_starts(starts: np.ndarray, cap: int | None) -> np.ndarray:
    """At most ``cap`` starts, evenly spread over the series (deterministic); all when ``cap`` is None."""
    if cap is None or len(starts) <= cap:
        return starts
    if cap < 1:
        raise ValueError(f"cap must be >= 1; got {cap}")
    return starts[np.unique(np.linspace(0, len(starts) - 1, cap).round().astype(np.int64))]


def window_view(series: np.ndarray, window: int) -> np.ndarray:
    """``[N, C]`` -> read-only view ``[N - window + 1, window, C]`` of every stride-1 window."""
    return np.lib.stride_tricks.sliding_window_view(series, window, axis=0).transpose(0, 2, 1)


def iter_batches(series: np.ndarray, starts: np.ndarray, window: int, batch: int,
                 device: torch.device | str = "cpu", order: np.ndarray | None = None
                 ) -> Iterator[torch.Tensor]:
    """Yield ``[B, window, C]`` float32 tensors of the windows at ``starts`` (in ``order`` if given)."""
    view = window_view(series, window)
    idx = starts if order is None else starts[order]
    for i in range(0, len(idx), batch):
        chunk = np.ascontiguousarray(view[idx[i:i + batch]], dtype=np.float32)
        yield torch.from_numpy(chunk).to(device)


def overlap_mean(window_scores: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Per-point scores ``[length]``: the mean over all windows covering each time index.

    ``window_scores`` is ``[n_windows, window]`` (per-point scores of each window).
    """
    n, window = window_scores.shape
    if n != len(starts):
        raise ValueError(f"{n} window score rows for {len(starts)} window starts")
    idx = (starts[:, None] + np.arange(window)[None, :]).ravel()
    total = np.bincount(idx, weights=window_scores.astype(np.float64).ravel(), minlength=length)
    count = np.bincount(idx, minlength=length)
    if (count == 0).any():
        raise ValueError("some time indices are covered by no window; use window_starts()")
    return total / count


def window_labels(labels: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """The released code's window labels ``1[any point of the window is anomalous]``
    (METHOD.md section 3.2)."""
    csum = np.concatenate([[0], np.cumsum(np.asarray(labels, dtype=np.int64))])
    return (csum[starts + window] - csum[starts] > 0).astype(np.int64)

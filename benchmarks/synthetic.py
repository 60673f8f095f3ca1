"""Deterministic synthetic multivariate series with labelled anomalies: the built-in default data.

Normal behaviour: a few latent periodic/AR factors mixed into the channels with random loadings,
plus per-channel harmonics and noise, so channels are correlated and temporally structured.
Anomalies are injected into the test part only, one kind per segment:

- ``spike``: a few points far outside the normal range on some channels;
- ``level_shift``: a constant offset over a segment;
- ``frequency``: the channel's own harmonic changes period over a segment;
- ``trend``: a linear drift that builds up over a segment;
- ``correlation_break``: a channel stops following its latent factor (gets its sign flipped).

The same arguments always give the same arrays (a private ``numpy.random.Generator``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ANOMALY_KINDS = ("spike", "level_shift", "frequency", "trend", "correlation_break")


@dataclass
class SyntheticSeries:
    """Train/test arrays ``[N, C]`` (float32, min-max scaled on train) and point labels ``[M]``."""

    train: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    segments: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end_exclusive, kind)

    @property
    def n_channels(self) -> int:
        return int(self.train.shape[1])


def _normal_signal(rng: np.random.Generator, n: int, n_channels: int, t0: int,
                   params: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normal series for time indices t0..t0+n; returns (series, factor part, harmonic part)."""
    t = np.arange(t0, t0 + n, dtype=np.float64)[:, None]
    factors = np.sin(2 * np.pi * t / params["factor_periods"] + params["factor_phases"])  # [n, L]
    factor_part = factors @ params["loadings"]  # [n, C]
    harmonic = params["harm_amp"] * np.sin(2 * np.pi * t / params["harm_periods"] + params["harm_phases"])
    noise = params["noise"] * rng.standard_normal((n, n_channels))
    return factor_part + harmonic + noise, factor_part, harmonic


def make_synthetic(n_channels: int = 8, n_train: int = 4000, n_test: int = 4000, *,
                   anomaly_ratio: float = 0.08, n_factors: int = 3, noise: float = 0.05,
                   kinds: tuple[str, ...] = ANOMALY_KINDS, seed: int = 0) -> SyntheticSeries:
    """Generate a train split (anomaly-free) and a test split with labelled anomaly segments.

    ``anomaly_ratio`` is the target fraction of anomalous test points (segments of 10-60 points,
    spikes of 1-3 points). Scaling: min-max fitted on train, applied to both (test may leave
    [0, 1], as on real data).
    """
    if n_channels < 1 or n_train < 10 or n_test < 10:
        raise ValueError(f"need n_channels >= 1 and n_train, n_test >= 10; got "
                         f"{n_channels}, {n_train}, {n_test}")
    if not 0 < anomaly_ratio < 0.5:
        raise ValueError(f"anomaly_ratio must be in (0, 0.5); got {anomaly_ratio}")
    unknown = set(kinds) - set(ANOMALY_KINDS)
    if unknown or not kinds:
        raise ValueError(f"unknown anomaly kinds {sorted(unknown)}; choose from {ANOMALY_KINDS}")
    rng = np.random.default_rng(seed)
    params = {
        "factor_periods": rng.uniform(25, 120, size=n_factors),
        "factor_phases": rng.uniform(0, 2 * np.pi, size=n_factors),
        "loadings": rng.normal(0, 1, size=(n_factors, n_channels)) / np.sqrt(n_factors),
        "harm_periods": rng.uniform(8, 40, size=n_channels),
        "harm_phases": rng.uniform(0, 2 * np.pi, size=n_channels),
        "harm_amp": rng.uniform(0.2, 0.6, size=n_channels),
        "noise": noise,
    }
    train, _, _ = _normal_signal(rng, n_train, n_channels, 0, params)
    test, factor_part, harmonic = _normal_signal(rng, n_test, n_channels, n_train, params)
    labels = np.zeros(n_test, dtype=np.int64)
    scale = train.std(axis=0)
    segments: list[tuple[int, int, str]] = []
    target = int(anomaly_ratio * n_test)
    attempts = 0
    while labels.sum() < target and attempts < 10_000:
        attempts += 1
        kind = kinds[int(rng.integers(len(kinds)))]
        length = int(rng.integers(1, 4)) if kind == "spike" else int(rng.integers(10, 61))
        start = int(rng.integers(50, max(51, n_test - length - 50)))
        lo, hi = max(0, start - 20), min(n_test, start + length + 20)
        if labels[lo:hi].any():  # keep segments apart so each is its own event
            continue
        lo_c, hi_c = max(1, n_channels // 3), max(1, n_channels // 2)
        chans = rng.choice(n_channels, size=int(rng.integers(lo_c, hi_c + 1)), replace=False)
        seg = slice(start, start + length)
        sign = rng.choice([-1.0, 1.0])
        if kind == "spike":
            test[seg, chans] += sign * rng.uniform(4, 8) * scale[chans]
        elif kind == "level_shift":
            test[seg, chans] += sign * rng.uniform(2.0, 4.0) * scale[chans]
        elif kind == "frequency":
            t = np.arange(start, start + length, dtype=np.float64)[:, None] + n_train
            fast = 2.0 * params["harm_amp"][chans] * np.sin(
                2 * np.pi * t / (params["harm_periods"][chans] / 3.0) + params["harm_phases"][chans])
            test[seg, chans] += fast - harmonic[seg][:, chans]
        elif kind == "trend":
            ramp = np.linspace(0, 1, length)[:, None]
            test[seg, chans] += sign * rng.uniform(3.0, 6.0) * ramp * scale[chans]
        elif kind == "correlation_break":
            test[seg, chans] -= 2 * factor_part[seg][:, chans]
        labels[seg] = 1
        segments.append((start, start + length, kind))
    segments.sort()
    lo, hi = train.min(axis=0), train.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    return SyntheticSeries(((train - lo) / span).astype(np.float32),
                           ((test - lo) / span).astype(np.float32), labels, segments)

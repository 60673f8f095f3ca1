"""Windows, score aggregation and the two evaluation protocols, against hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.protocols import evaluate_run
from benchmarks.windows import (iter_batches, overlap_mean, thin_starts, window_labels,
                                window_starts)


def test_window_starts_cover_the_series() -> None:
    np.testing.assert_array_equal(window_starts(10, 4, 3), [0, 3, 6])
    np.testing.assert_array_equal(window_starts(11, 4, 3), [0, 3, 6, 7])  # last flush with the end
    np.testing.assert_array_equal(window_starts(4, 4, 2), [0])
    with pytest.raises(ValueError, match="shorter than one window"):
        window_starts(3, 4, 1)
    with pytest.raises(ValueError, match=">= 1"):
        window_starts(10, 4, 0)


def test_thin_starts_even_and_deterministic() -> None:
    starts = np.arange(0, 1000, 10)
    thin = thin_starts(starts, 5)
    np.testing.assert_array_equal(thin, [0, 250, 500, 740, 990])
    assert thin_starts(starts, None) is starts and thin_starts(starts, 500) is starts


def test_overlap_mean_matches_a_loop() -> None:
    rng = np.random.default_rng(0)
    length, window = 23, 5
    starts = window_starts(length, window, 2)
    scores = rng.random((len(starts), window))
    total, count = np.zeros(length), np.zeros(length)
    for s, row in zip(starts, scores):
        total[s:s + window] += row
        count[s:s + window] += 1
    np.testing.assert_allclose(overlap_mean(scores, starts, length), total / count)


def test_window_labels_any_point() -> None:
    labels = np.zeros(12, dtype=int)
    labels[7] = 1
    starts = window_starts(12, 4, 1)  # 0..8
    np.testing.assert_array_equal(window_labels(labels, starts, 4), [0, 0, 0, 0, 1, 1, 1, 1, 0])


def test_iter_batches_copies_the_right_windows() -> None:
    series = np.arange(30, dtype=np.float64).reshape(15, 2)
    starts = np.array([0, 5, 11])
    (b1, b2) = list(iter_batches(series, starts, 4, 2, order=np.array([2, 0, 1])))
    assert b1.shape == (2, 4, 2) and b1.dtype.is_floating_point
    np.testing.assert_array_equal(b1[0].numpy(), series[11:15])
    np.testing.assert_array_equal(b1[1].numpy(), series[0:4])
    np.testing.assert_array_equal(b2[0].numpy(), series[5:9])


def _case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """40 points, one anomaly segment [20, 24]; per-point scores 1 inside it, 0.1 elsewhere."""
    labels = np.zeros(40, dtype=np.int64)
    labels[20:25] = 1
    point = np.where(labels == 1, 1.0, 0.1)
    window = 10
    starts = window_starts(40, window, 5)
    win = np.stack([point[s:s + window] for s in starts])
    val_starts = window_starts(20, window, 5)
    val = np.full((len(val_starts), window), 0.1)
    val[0, 0] = 0.5  # one high validation point sets the 100th-percentile threshold
    return labels, win, starts, val, val_starts


def test_pointwise_protocol_perfect_score() -> None:
    labels, win, starts, val, val_starts = _case()
    m = evaluate_run("pointwise", labels, win, starts, val, val_starts, window=10, val_percentile=100)
    assert m["f1"] == pytest.approx(1.0) and m["auc_roc"] == pytest.approx(1.0)
    assert m["f1_floor"] == pytest.approx(2 * 5 / (40 + 5))
    assert m["threshold_val"] == pytest.approx(0.5)
    assert m["f1_val"] == pytest.approx(1.0)  # 1.0 > 0.5 only on the segment
    assert 0.0 < m["vus_pr"] <= 1.0 and 0.0 < m["aff_p"] <= 1.0


def test_paper_protocol_uses_window_labels_and_means() -> None:
    labels, win, starts, val, val_starts = _case()  # starts 0, 5, ..., 30
    m = evaluate_run("paper", labels, win, starts, val, val_starts, window=10, val_percentile=100)
    wl = window_labels(labels, starts, 10)
    np.testing.assert_array_equal(wl, [0, 0, 0, 1, 1, 0, 0])  # starts 15 and 20 hit [20, 24]
    # window means (0.55 on the two anomalous windows, 0.1 elsewhere) separate them perfectly
    assert m["f1"] == pytest.approx(1.0)
    assert m["f1_floor"] == pytest.approx(2 * 2 / (7 + 2))
    # validation window means: max = (0.5 + 9 * 0.1) / 10 = 0.14 < 0.55
    assert m["threshold_val"] == pytest.approx(0.14)
    assert m["f1_val"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="protocol"):
        evaluate_run("oracle", labels, win, starts, val, val_starts, window=10)

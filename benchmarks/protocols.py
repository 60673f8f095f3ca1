"""Evaluation protocols: how window outputs become labelled scores and metrics.

* ``pointwise`` (default; METHOD.md section 6, item 7): point labels; each time index gets the
  mean of the per-point scores of every test window covering it; :func:`madcluster_plugin.metrics.evaluate`
  on the continuous point scores (VUS and range-AUC on continuous scores, affiliation on the
  best-F1 predictions).
* ``paper`` (the released code; METHOD.md sections 3.2-3.4): one label per window,
  ``1[any point anomalous]``, and one score per window, the mean over its T per-point scores;
  best-F1 threshold on those, and VUS / range-AUC / affiliation fed the binarised predictions
  ``score > threshold`` (``evaluate(..., binarised=True)``).

Both report the oracle best F1 (test labels pick the threshold, as the paper) *and* ``f1_val``,
the F1 at a threshold chosen without test labels: the ``val_percentile``-th percentile of the
same kind of scores on the validation tail of train (anomaly-free by assumption); positive means
``score > threshold``. Both report the all-positive F1 floor of their labels.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .windows import overlap_mean, window_labels

PROTOCOLS = ("pointwise", "paper")


def label_free_f1(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """F1, precision and recall of ``scores > threshold`` (a threshold set without test labels)."""
    from madcluster_plugin.metrics import f1_at

    f1, p, r = f1_at(labels, (scores > threshold).astype(np.int8))
    return {"f1_val": f1, "precision_val": p, "recall_val": r, "threshold_val": float(threshold)}


def evaluate_run(protocol: str, test_labels: np.ndarray, test_windows: np.ndarray,
                 test_starts: np.ndarray, val_windows: np.ndarray, val_starts: np.ndarray, *,
                 window: int, val_percentile: float = 99.0) -> dict[str, Any]:
    """All metrics of one run under ``protocol``.

    ``*_windows`` are per-window per-point scores ``[n, T]`` at ``*_starts``; ``test_labels`` are
    point labels of the test series; the validation series length is implied by its windows.
    """
    from madcluster_plugin.metrics import evaluate

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    if not 0.0 < val_percentile <= 100.0:
        raise ValueError(f"val_percentile must be in (0, 100]; got {val_percentile}")
    if protocol == "pointwise":
        labels = np.asarray(test_labels)
        scores = overlap_mean(test_windows, test_starts, len(labels))
        val_len = int(val_starts[-1]) + val_windows.shape[1]
        val_scores = overlap_mean(val_windows, val_starts, val_len)
        out = evaluate(labels, scores, window=window)
    else:
        labels = window_labels(test_labels, test_starts, test_windows.shape[1])
        scores = test_windows.mean(axis=1)
        val_scores = val_windows.mean(axis=1)
        out = evaluate(labels, scores, window=window, binarised=True)
    out.update(label_free_f1(labels, scores, float(np.percentile(val_scores, val_percentile))))
    return out

"""Evaluation metrics for time-series anomaly detection (numpy + scikit-learn only).

What is here and where each definition comes from (docs: ECOSYSTEM.md §1, METHOD.md §3 and §6.7):

* :func:`best_f1` - oracle best F1 over the ``precision_recall_curve`` thresholds (score >= threshold
  is positive), as the official MADCluster code reports it (METHOD.md §3.3). Exact F1 with a zero
  guard (no ``+1e-5`` in the denominator as DeepOD/TSB-AD use).
* :func:`f1_at`, :func:`point_adjust`, :func:`point_adjusted_f1` - F1 of fixed predictions and the
  point-adjusted (PA) variant: segment max on scores, then best F1 (DeepOD convention, which at a
  fixed threshold equals the TSLib/AnomalyTransformer adjustment of binary predictions).
* :func:`affiliation` / :func:`affiliation_events` - affiliation precision/recall of Huet, Navarro,
  Rossi, "Local Evaluation of Time Series Anomaly Detection Algorithms", KDD 2022, with the
  semantics of the reference implementation (``affiliation-metrics-py``, as vendored by ``vus``):
  half-open events, zones cut at midpoints between ground-truth events, ``Trange = (0, N)``, closed-form
  integrals of the survival functions, precision = mean over zones with a prediction (NaN when there
  is none), recall = mean over all zones.
* :func:`range_auc` and :func:`vus` - Range-AUC (Paparrizos et al., VLDB 2022) and the volume under
  the surface, with the definitions of the PyPI ``vus`` 0.0.6 package (``RangeAUC`` and
  ``RangeAUC_volume_opt``), quirks included, in O((W + thresholds) * (N_buffer + segments)) numpy
  work instead of the package's Python loops (ECOSYSTEM.md §1.4).
* :func:`evaluate` - everything in one dict, in the point-wise protocol recommended by METHOD.md §6.7
  (VUS/R-AUC on continuous scores, affiliation on best-F1 predictions) or, with ``binarised=True``,
  the released MADCluster protocol (VUS/R-AUC/affiliation fed the 0/1 vector ``score > threshold``).

All functions take 1-D ``labels`` in {0, 1} (at least one 1 and one 0) and finite ``scores`` of the
same length (higher = more anomalous), and raise ``ValueError`` otherwise.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

__all__ = [
    "best_f1",
    "f1_at",
    "point_adjust",
    "point_adjusted_f1",
    "affiliation",
    "affiliation_events",
    "range_auc",
    "vus",
    "f1_floor",
    "evaluate",
]

# Cap on the number of float64 cells in the (windows x buffer points) matrix of :func:`vus`; the
# window axis is processed in chunks so that memory stays bounded (~16 MB) for any N and window.
_CHUNK_CELLS = 1 << 21


# --------------------------------------------------------------------------------------------------
# input validation and small helpers
# --------------------------------------------------------------------------------------------------
def _binary(x: np.ndarray | Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}; flatten it first.")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; pass one value per time step.")
    if arr.dtype == bool:
        return arr.astype(np.int8)
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be numeric 0/1 values, got dtype {arr.dtype}.")
    ok = (arr == 0) | (arr == 1)
    if not np.all(ok):
        bad = arr[~ok][:3]
        raise ValueError(
            f"{name} must contain only 0 and 1, found {bad.tolist()}; binarise it first "
            "(e.g. labels > 0 or scores > threshold)."
        )
    return arr.astype(np.int8)


def _labels(labels: np.ndarray | Sequence[float]) -> np.ndarray:
    y = _binary(labels, "labels")
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("labels contain no anomaly (no 1); these metrics are undefined without one.")
    if n_pos == y.size:
        raise ValueError("labels contain no normal point (all 1); these metrics are undefined then.")
    return y


def _scores(scores: np.ndarray | Sequence[float], n: int, name: str = "scores") -> np.ndarray:
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {s.shape}; flatten it first.")
    if s.dtype == bool:
        s = s.astype(np.int8)
    if not np.issubdtype(s.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {s.dtype}.")
    if s.size != n:
        raise ValueError(f"{name} has length {s.size} but labels has length {n}; they must align.")
    s = s.astype(np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} contain NaN or inf; replace them (e.g. np.nan_to_num) first.")
    return s


def _check_window(window: int, name: str = "window") -> int:
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {window!r}.")
    return int(window)


def _segments(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximal runs of ones as inclusive ``(start, end)`` index arrays."""
    d = np.diff(np.concatenate(([0], y.astype(np.int8), [0])))
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1) - 1


def _run_max(s: np.ndarray, starts: np.ndarray, ends_incl: np.ndarray) -> np.ndarray:
    """Max of ``s`` over each disjoint, increasing inclusive range ``[start, end]``."""
    if starts.size == 0:
        return np.empty(0)
    ext = np.append(s, -np.inf)
    idx = np.empty(2 * starts.size, dtype=np.int64)
    idx[0::2] = starts
    idx[1::2] = ends_incl + 1
    return np.maximum.reduceat(ext, idx)[0::2]


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2.0 * p * r / (p + r)


# --------------------------------------------------------------------------------------------------
# F1 family
# --------------------------------------------------------------------------------------------------
def best_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float, float, float]:
    """Oracle best F1 over all thresholds: ``(f1, precision, recall, threshold)``.

    ``precision_recall_curve`` gives one (P, R) point per distinct score; F1 = 2PR/(P+R) (0 where
    P+R = 0) is maximised and the first argmax is kept, i.e. the lowest threshold among ties,
    exactly as the official MADCluster code does (METHOD.md §3.3). Positive means
    ``score >= threshold``.
    """
    y = _labels(labels)
    s = _scores(scores, y.size)
    p, r, t = precision_recall_curve(y, s)
    denom = p + r
    f = np.divide(2.0 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    i = int(np.argmax(f))
    return float(f[i]), float(p[i]), float(r[i]), float(t[min(i, t.size - 1)])


def f1_at(labels: np.ndarray, predictions: np.ndarray) -> tuple[float, float, float]:
    """F1 of fixed 0/1 predictions: ``(f1, precision, recall)``.

    Precision is 0 when nothing is predicted (scikit-learn's ``zero_division=0``); F1 is then 0.
    """
    y = _labels(labels)
    pred = _binary(predictions, "predictions")
    if pred.size != y.size:
        raise ValueError(f"predictions has length {pred.size} but labels has length {y.size}.")
    tp = float(np.sum(pred & y))
    n_pred = float(pred.sum())
    precision = tp / n_pred if n_pred > 0 else 0.0
    recall = tp / float(y.sum())
    return _f1(precision, recall), precision, recall


def point_adjust(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Score-level point adjustment: every score inside a ground-truth segment becomes the segment max.

    DeepOD's ``point_adjustment`` convention; best F1 on the result equals, threshold by threshold,
    the TSLib/AnomalyTransformer "if one point of a segment is detected, the whole segment is"
    adjustment of ``score >= threshold`` (ECOSYSTEM.md §1.4). Also valid on 0/1 predictions.
    """
    y = _labels(labels)
    s = _scores(scores, y.size)
    a, b = _segments(y)
    out = s.copy()
    seg_max = _run_max(s, a, b)
    out[y == 1] = np.repeat(seg_max, b - a + 1)
    return out


def point_adjusted_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float, float, float]:
    """PA-F1: :func:`best_f1` of :func:`point_adjust`-ed scores, ``(f1, precision, recall, threshold)``.

    Inflates results heavily (a single hit anywhere in a long segment counts the whole segment);
    report it only as a clearly labelled extra column - the MADCluster paper does not use it.
    """
    return best_f1(labels, point_adjust(labels, scores))


def f1_floor(labels: np.ndarray) -> float:
    """F1 of the all-positive predictor, 2P/(N+P): the sanity floor of any best-F1 (METHOD.md §3.4)."""
    y = _labels(labels)
    p = float(y.sum())
    return 2.0 * p / (y.size + p)


# --------------------------------------------------------------------------------------------------
# affiliation (Huet et al., KDD 2022)
# --------------------------------------------------------------------------------------------------
def _events(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0/1 vector -> half-open events ``[i, j + 1)`` for each run of ones ``i..j`` (float arrays)."""
    a, b = _segments(v)
    return a.astype(np.float64), (b + 1).astype(np.float64)


def _seg_int(u: np.ndarray, v: np.ndarray, anchor: np.ndarray, sign: float) -> np.ndarray:
    """Integral over ``[u, v]`` of ``sign * (y - anchor)``; 0 where ``v <= u``."""
    v = np.maximum(v, u)
    return sign * (v - u) * ((u + v) / 2.0 - anchor)


def _int_min(d_lo: np.ndarray, d_hi: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Integral of ``min(d, m)`` for ``d`` in ``[d_lo, d_hi]`` (``d_lo <= d_hi``)."""

    def g(d: np.ndarray) -> np.ndarray:
        return np.where(d <= m, d * d / 2.0, m * d - m * m / 2.0)

    return g(d_hi) - g(d_lo)


def _affiliation_zones(
    pred_s: np.ndarray, pred_e: np.ndarray, gt_s: np.ndarray, gt_e: np.ndarray, t0: float, t1: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-zone affiliation precision (NaN for a zone without prediction) and recall (0 then).

    Events are half-open, sorted, disjoint, of positive length, inside ``[t0, t1]``. Zone j of
    ground-truth event J_j = [a_j, b_j) is E_j = [(b_{j-1} + a_j)/2, (b_j + a_{j+1})/2] with t0/t1 at
    the borders. Predictions are cut into their parts inside each zone.

    Precision of zone j: mean over x in the predictions of the zone of Fbar_j(dist(x, J_j)), where
    Fbar_j(d) = |{u in E_j : dist(u, J_j) >= d}| / |E_j| = 1 - (|J_j| + d + min(d, other side))/|E_j|
    for x on one side of J_j (1 inside J_j).
    Recall of zone j: mean over y in J_j of |{u in E_j : |u - y| >= dist(y, preds of zone j)}|/|E_j|
    = 1 - (d + min(d, distance from y to the far zone border))/|E_j|; each y is measured against the
    zone's prediction nearest to it (cells cut at midpoints between predictions, as the reference).
    All integrals are in closed form (piecewise linear/quadratic), vectorised over pieces.
    """
    n = gt_s.size
    zb = np.empty(n + 1)
    zb[0], zb[-1] = t0, t1
    zb[1:-1] = (gt_e[:-1] + gt_s[1:]) / 2.0
    el, er = zb[:-1], zb[1:]
    width = er - el

    # cut predicted events into their parts inside each zone
    k1 = np.searchsorted(zb[1:], pred_s, side="right")
    k2 = np.searchsorted(zb[:-1], pred_e, side="left") - 1
    k1 = np.clip(k1, 0, n - 1)
    k2 = np.clip(k2, 0, n - 1)
    cnt = np.maximum(k2 - k1 + 1, 0)
    ev = np.repeat(np.arange(pred_s.size), cnt)
    offs = np.repeat(np.cumsum(cnt) - cnt, cnt)
    z = k1[ev] + (np.arange(ev.size) - offs)
    x1 = np.maximum(pred_s[ev], el[z])
    x2 = np.minimum(pred_e[ev], er[z])
    keep = x2 > x1
    z, x1, x2 = z[keep], x1[keep], x2[keep]

    a, b, lo, hi, w = gt_s[z], gt_e[z], el[z], er[z], width[z]
    len_j = b - a

    # ---- precision: integral over each piece of Fbar(dist(x, J)) ----
    inside = np.maximum(np.minimum(x2, b) - np.maximum(x1, a), 0.0)
    # left of J: distances in [a - min(x2, a), a - x1], far side length R = hi - b
    lh = np.maximum(np.minimum(x2, a), x1)
    dlo, dhi = a - lh, a - x1
    left = (dhi - dlo) - (len_j * (dhi - dlo) + (dhi**2 - dlo**2) / 2.0 + _int_min(dlo, dhi, hi - b)) / w
    # right of J: distances in [max(x1, b) - b, x2 - b], far side length L = a - lo
    rl = np.minimum(np.maximum(x1, b), x2)
    dlo, dhi = rl - b, x2 - b
    right = (dhi - dlo) - (len_j * (dhi - dlo) + (dhi**2 - dlo**2) / 2.0 + _int_min(dlo, dhi, a - lo)) / w
    num_p = np.bincount(z, weights=inside + left + right, minlength=n)
    den_p = np.bincount(z, weights=x2 - x1, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(den_p > 0, num_p / np.where(den_p > 0, den_p, 1.0), np.nan)

    # ---- recall: integral over J of Fbar_y(dist(y, nearest prediction piece of the zone)) ----
    first = np.ones(z.size, dtype=bool)
    first[1:] = z[1:] != z[:-1]
    last = np.ones(z.size, dtype=bool)
    last[:-1] = z[:-1] != z[1:]
    c_lo = lo.copy()
    c_lo[~first] = ((x2[:-1] + x1[1:]) / 2.0)[~first[1:]]
    c_hi = hi.copy()
    c_hi[~last] = ((x2[:-1] + x1[1:]) / 2.0)[~last[:-1]]
    j_lo, j_hi = np.maximum(a, c_lo), np.minimum(b, c_hi)  # part of J in this piece's cell
    overlap = np.maximum(np.minimum(j_hi, x2) - np.maximum(j_lo, x1), 0.0)
    # part of J before the piece: y in [u, v], pivot p = x1, d = p - y, min(d, y - lo) switches at c
    u, v = j_lo, np.minimum(j_hi, x1)
    v = np.maximum(v, u)
    c = (x1 + lo) / 2.0
    before = (v - u) - (
        _seg_int(u, v, x1, -1.0)
        + _seg_int(u, np.minimum(v, c), lo, 1.0)
        + _seg_int(np.maximum(u, c), v, x1, -1.0)
    ) / w
    # part of J after the piece: y in [u, v], pivot q = x2, d = y - q, min(d, hi - y) switches at c
    u, v = np.maximum(j_lo, x2), j_hi
    v = np.maximum(v, u)
    c = (x2 + hi) / 2.0
    after = (v - u) - (
        _seg_int(u, v, x2, 1.0)
        + _seg_int(u, np.minimum(v, c), x2, 1.0)
        + _seg_int(np.maximum(u, c), v, hi, -1.0)
    ) / w
    num_r = np.bincount(z, weights=overlap + before + after, minlength=n)
    recall = num_r / (gt_e - gt_s)
    return precision, recall


def _affiliation_summary(precision: np.ndarray, recall: np.ndarray) -> tuple[float, float]:
    has = ~np.isnan(precision)
    p = float(np.mean(precision[has])) if has.any() else math.nan
    return p, float(np.mean(recall))


def affiliation(labels: np.ndarray, predictions: np.ndarray) -> tuple[float, float]:
    """Affiliation ``(precision, recall)`` of 0/1 ``predictions`` (Huet et al., KDD 2022).

    A run of ones from i to j (inclusive) is the event [i, j+1); ``Trange = (0, len(labels))``, as
    ``vus.get_metrics`` calls the reference ``pr_from_events``. Edge cases, as the reference:

    * a zone with no predicted event has undefined precision (skipped in the mean) and recall 0;
    * no predicted event at all gives precision NaN and recall 0 (TSB-AD/tsadmetrics would turn
      this into F = 0; we keep NaN so the caller sees it);
    * predictions far from every anomaly still belong to the zone of the nearest ground-truth
      event (zones tile the whole series), so they lower that zone's precision.

    ``vus.get_metrics`` (all-metrics branch) builds the predicted events from ``score > 0.5``; pass
    ``(scores > 0.5)`` to reproduce it on the same input.
    """
    y = _labels(labels)
    pred = _binary(predictions, "predictions")
    if pred.size != y.size:
        raise ValueError(f"predictions has length {pred.size} but labels has length {y.size}.")
    ps, pe = _events(pred)
    gs, ge = _events(y)
    return _affiliation_summary(*_affiliation_zones(ps, pe, gs, ge, 0.0, float(y.size)))


def _event_arrays(events: Sequence[tuple[float, float]], name: str) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(list(events), dtype=np.float64).reshape(-1, 2)
    s, e = arr[:, 0], arr[:, 1]
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must have finite (start, stop) couples.")
    if np.any(e <= s):
        raise ValueError(f"{name} must be half-open (start, stop) couples with start < stop.")
    if np.any(e[:-1] >= s[1:]):
        raise ValueError(f"{name} must be sorted and disjoint (stop of one < start of the next).")
    return s, e


def affiliation_events(
    pred_events: Sequence[tuple[float, float]],
    gt_events: Sequence[tuple[float, float]],
    trange: tuple[float, float],
) -> tuple[float, float]:
    """Affiliation ``(precision, recall)`` from event lists, as ``pr_from_events`` of the reference.

    Events are half-open ``(start, stop)`` couples, sorted and disjoint, all inside ``trange``;
    ``gt_events`` must not be empty. Same edge cases as :func:`affiliation`.
    """
    gs, ge = _event_arrays(gt_events, "gt_events")
    if gs.size == 0:
        raise ValueError("gt_events is empty; affiliation needs at least one ground-truth event.")
    ps, pe = _event_arrays(pred_events, "pred_events")
    t0, t1 = float(trange[0]), float(trange[1])
    lo = min(gs.min(), ps.min() if ps.size else np.inf)
    hi = max(ge.max(), pe.max() if pe.size else -np.inf)
    if lo < t0 or hi > t1:
        raise ValueError(f"trange {trange} must include all events (they span [{lo}, {hi}]).")
    return _affiliation_summary(*_affiliation_zones(ps, pe, gs, ge, t0, t1))


# --------------------------------------------------------------------------------------------------
# Range-AUC and VUS (definitions of the PyPI `vus` 0.0.6 package, version "opt")
# --------------------------------------------------------------------------------------------------
def _thresholds(scores: np.ndarray, n_thresholds: int) -> tuple[np.ndarray, np.ndarray]:
    """The thresholds ``thr_k`` and the number of predicted points ``Npred_k = #(score >= thr_k)``.

    Quirk (vus): thresholds are the order statistics ``sorted_desc[int(linspace(0, N-1, n))]`` -
    not the distinct scores; with 0/1 input they collapse to {1, 0}. ``pred_k = score >= thr_k``.
    """
    n = scores.size
    asc = np.sort(scores)
    thr = asc[::-1][np.linspace(0, n - 1, n_thresholds).astype(int)]
    return thr, n - np.searchsorted(asc, thr, side="left")


def _first_k(thr: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Number of thresholds strictly above each value: the value is predicted at every k >= it."""
    return np.searchsorted(-thr, -values, side="left")


def _cum_counts(k0: np.ndarray, n_thresholds: int, weights: np.ndarray | None = None) -> np.ndarray:
    """``out[k] = sum of weights of points with k0 <= k`` for k < n_thresholds."""
    return np.cumsum(np.bincount(k0, weights=weights, minlength=n_thresholds + 1))[:n_thresholds]


def _buffer_points(
    y: np.ndarray, a: np.ndarray, b: np.ndarray, half: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normal points within ``half`` of an anomaly segment, with the smallest and second smallest
    of their distances to the two nearest segment ends on the left (``x - b``) and the two nearest
    segment starts on the right (``a - x``). O(N + segments) time and memory."""
    n = y.size
    if half == 0:
        empty = np.empty(0)
        return np.empty(0, dtype=np.int64), empty, empty
    lo = np.concatenate([np.maximum(a - half, 0), b + 1])
    hi = np.concatenate([a, np.minimum(b + half, n - 1) + 1])
    cover = np.cumsum(np.bincount(lo, minlength=n + 1) - np.bincount(hi, minlength=n + 1))[:n] > 0
    pts = np.flatnonzero(cover & (y == 0))
    nseg = a.size
    il = np.searchsorted(b, pts)  # segments ending before x
    ir = np.searchsorted(a, pts)  # index of the first segment starting after x
    d = np.empty((4, pts.size))
    d[0] = np.where(il >= 1, pts - b[np.maximum(il - 1, 0)], np.inf)
    d[1] = np.where(il >= 2, pts - b[np.maximum(il - 2, 0)], np.inf)
    d[2] = np.where(ir < nseg, a[np.minimum(ir, nseg - 1)] - pts, np.inf)
    d[3] = np.where(ir + 1 < nseg, a[np.minimum(ir + 1, nseg - 1)] - pts, np.inf)
    d.sort(axis=0)
    return pts, d[0], d[1]


def _soft_labels(d1: np.ndarray, d2: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Soft label e_w of buffer points for each window w: ``[len(windows), n_points]``.

    vus ``sequencing``: each segment (a, b) adds sqrt(1 - dist/w) to the points within w // 2 after b
    and before a (even across other segments), then min(., 1). Any one contribution is at least
    sqrt(1 - (w//2)/w) >= sqrt(1/2), so two or more saturate at 1: with ``d1 <= d2`` the two smallest
    border distances, e_w = 1 if d2 <= w//2, sqrt(1 - d1/w) if only d1 <= w//2, else 0 - the same
    floating-point value the package produces. No extension for w in {0, 1}.
    """
    w = windows.astype(np.float64)[:, None]
    h = (windows // 2)[:, None]
    one = d1[None, :] <= h
    e = np.where(one, np.sqrt(np.maximum(1.0 - d1[None, :] / np.maximum(w, 1.0), 0.0)), 0.0)
    e[np.broadcast_to(d2[None, :] <= h, e.shape)] = 1.0
    return e


def _trapezoid_roc(fpr: np.ndarray, tpr: np.ndarray) -> np.ndarray:
    """Trapezoid area over (0,0), (fpr_k, tpr_k)..., (1,1) along the last axis."""
    shape = fpr.shape[:-1] + (1,)
    x = np.concatenate([np.zeros(shape), fpr, np.ones(shape)], axis=-1)
    yv = np.concatenate([np.zeros(shape), tpr, np.ones(shape)], axis=-1)
    return np.sum((x[..., 1:] - x[..., :-1]) * (yv[..., 1:] + yv[..., :-1]) / 2.0, axis=-1)


def _check_thresholds(n_thresholds: int) -> int:
    if isinstance(n_thresholds, bool) or not isinstance(n_thresholds, (int, np.integer)) or n_thresholds < 1:
        raise ValueError(f"n_thresholds must be a positive integer, got {n_thresholds!r}.")
    return int(n_thresholds)


def range_auc(
    labels: np.ndarray, scores: np.ndarray, window: int, n_thresholds: int = 250
) -> tuple[float, float]:
    """Range-AUC ``(R_AUC_ROC, R_AUC_PR)`` as ``vus`` 0.0.6 ``metricor().RangeAUC(window=W)``.

    Definition (ECOSYSTEM.md §1.4) and the quirks it keeps from the package:

    * soft labels e = e_W (see :func:`_soft_labels`); P_new = (P + sum(e)) / 2 uses the *whole*
      buffer and is constant over thresholds (VUS instead counts only the predicted buffer);
    * TP_k = sum(e * pred_k); TPR_k = min(TP_k / P_new, 1) * (existence ratio over the maximal runs
      of e != 0 - adjacent buffers that merely touch merge here, unlike VUS's merged segments);
    * FPR_k = (Npred_k - TP_k) / (N - P_new); Prec_k = TP_k / Npred_k;
    * ROC by trapezoids over (0,0), the points, (1,1); PR by trapezoids starting at precision 1
      (VUS uses right-endpoint steps), so R_AUC at window W is not the W-slice of VUS;
    * the package hard-codes 250 thresholds here; ``n_thresholds`` is kept for symmetry with
      :func:`vus` and defaults to that value.
    """
    y = _labels(labels)
    s = _scores(scores, y.size)
    window = _check_window(window)
    nt = _check_thresholds(n_thresholds)
    n = y.size
    a, b = _segments(y)
    thr, n_pred = _thresholds(s, nt)
    tp_anom = _cum_counts(_first_k(thr, s[y == 1]), nt)
    P = float(y.sum())

    pts, d1, d2 = _buffer_points(y, a, b, window // 2)
    e = _soft_labels(d1, d2, np.array([window]))[0]
    tp = tp_anom + _cum_counts(_first_k(thr, s[pts]), nt, weights=e)
    p_new = (P + (P + e.sum())) / 2.0

    # maximal runs of e != 0 (anomalies plus the buffer points, all of which have e > 0)
    mask = y.astype(bool)
    mask[pts] = True
    rs, re = _segments(mask.astype(np.int8))
    run_k0 = _first_k(thr, _run_max(s, rs, re))
    existence = _cum_counts(run_k0, nt)

    tpr = np.minimum(tp / p_new, 1.0) * existence / rs.size
    fpr = (n_pred - tp) / (n - p_new)
    prec = tp / n_pred
    roc = float(_trapezoid_roc(fpr, tpr))
    tpr_prev = np.concatenate(([0.0], tpr[:-1]))
    prec_prev = np.concatenate(([1.0], prec[:-1]))
    pr = float(np.sum((tpr - tpr_prev) * (prec + prec_prev) / 2.0))
    return roc, pr


def vus(
    labels: np.ndarray, scores: np.ndarray, max_window: int, n_thresholds: int = 250
) -> tuple[float, float]:
    """Volume under the surface ``(VUS_ROC, VUS_PR)`` as ``vus`` 0.0.6 ``RangeAUC_volume_opt``.

    For every window w = 0..max_window (W+1 terms, averaged) and threshold k (ECOSYSTEM.md §1.4):

    * quirk: thresholds are 250 order statistics, not all distinct scores (:func:`_thresholds`);
    * B_k = sum of e_w over *predicted* normal points, A_k = predicted anomalies, TP_k = A_k + B_k;
    * quirk: P_new_k = (P + (P + B_k)) / 2 - only the predicted part of the buffer counts
      (Range-AUC counts the whole buffer);
    * TPR_k = min(TP_k / P_new_k, 1) * existence_k / |L_w|, where L_w are the buffered segments
      [a - w//2, b + w//2] merged when they overlap (``new_sequence``) - quirk: the number of events
      depends on w, and buffers that only touch stay separate;
    * FPR_k = (Npred_k - TP_k) / (N - P_new_k); Prec_k = TP_k / Npred_k;
    * ROC area by trapezoids over (0,0), points, (1,1); quirk: PR area by right-endpoint steps
      sum_k (TPR_k - TPR_{k-1}) * Prec_k with TPR_{-1} = 0 (Range-AUC uses trapezoids);
    * the package sums TP and the labelled mass over the buffered segments of the *largest* window
      (its ``l``); they cover every point with e_w > 0, so these are plain sums here;
    * the package's leftover all-zero ``tp`` array adds nothing and is omitted; the all-zero-label
      division by zero of the package is a ValueError here.

    Vectorised: one sort, per-point first-threshold indices, weighted bincounts over (w, k) and a
    segmented max per (w, merged segment); memory is chunked over w.
    """
    y = _labels(labels)
    s = _scores(scores, y.size)
    W = _check_window(max_window, "max_window")
    nt = _check_thresholds(n_thresholds)
    n = y.size
    a, b = _segments(y)
    nseg = a.size
    thr, n_pred = _thresholds(s, nt)
    tp_anom = _cum_counts(_first_k(thr, s[y == 1]), nt)
    P = float(y.sum())
    H = W // 2
    windows = np.arange(W + 1)

    # B[w, k]: predicted soft-label mass of normal points, chunked over w
    pts, d1, d2 = _buffer_points(y, a, b, H)
    k0_pts = _first_k(thr, s[pts])
    B = np.zeros((W + 1, nt))
    if pts.size:
        step = max(1, _CHUNK_CELLS // pts.size)
        for lo in range(0, W + 1, step):  # loop over window chunks; each chunk is one numpy pass
            ws = windows[lo : lo + step]
            e = _soft_labels(d1, d2, ws)
            flat = (np.arange(ws.size)[:, None] * (nt + 1) + k0_pts[None, :]).ravel()
            counts = np.bincount(flat, weights=e.ravel(), minlength=ws.size * (nt + 1))
            B[lo : lo + ws.size] = np.cumsum(counts.reshape(ws.size, nt + 1), axis=1)[:, :nt]

    # existence[h, k] over the merged buffered segments for each half-width h = 0..H
    core = _run_max(s, a, b)
    t = np.arange(1, H + 1)
    left = s[np.clip(a[:, None] - t[None, :], 0, n - 1)] if H else np.empty((nseg, 0))
    right = s[np.clip(b[:, None] + t[None, :], 0, n - 1)] if H else np.empty((nseg, 0))
    buf = np.concatenate([core[:, None], np.maximum(left, right)], axis=1)
    buf = np.maximum.accumulate(buf, axis=1).T  # [H+1, nseg]: max over [a-h, b+h] (clipped)
    gaps = (a[1:] - b[:-1])[None, :]  # merge when b_i + h >= a_{i+1} - h
    new_group = np.ones((H + 1, nseg), dtype=bool)
    new_group[:, 1:] = gaps > 2 * np.arange(H + 1)[:, None]
    starts = np.flatnonzero(new_group.ravel())
    gmax = np.maximum.reduceat(buf.ravel(), starts)
    grow = starts // nseg
    gk0 = _first_k(thr, gmax)
    ex_counts = np.bincount(grow * (nt + 1) + gk0, minlength=(H + 1) * (nt + 1))
    existence_h = np.cumsum(ex_counts.reshape(H + 1, nt + 1), axis=1)[:, :nt]
    n_groups_h = new_group.sum(axis=1)
    hw = windows // 2
    existence = existence_h[hw]
    n_groups = n_groups_h[hw][:, None]

    tp = tp_anom[None, :] + B
    p_new = (P + (P + B)) / 2.0
    tpr = np.minimum(tp / p_new, 1.0) * existence / n_groups
    fpr = (n_pred[None, :] - tp) / (n - p_new)
    prec = tp / n_pred[None, :]
    auc = _trapezoid_roc(fpr, tpr)
    tpr_prev = np.concatenate([np.zeros((W + 1, 1)), tpr[:, :-1]], axis=1)
    ap = np.sum((tpr - tpr_prev) * prec, axis=1)
    return float(np.mean(auc)), float(np.mean(ap))


# --------------------------------------------------------------------------------------------------
# everything at once
# --------------------------------------------------------------------------------------------------
def evaluate(
    labels: np.ndarray,
    scores: np.ndarray,
    window: int = 100,
    binarised: bool = False,
    n_thresholds: int = 250,
) -> dict[str, float]:
    """All metrics in one dict; keys name what each is computed on.

    Always on the continuous scores: ``f1, precision, recall, threshold`` (:func:`best_f1`, positive
    = score >= threshold), ``pa_f1`` (:func:`point_adjusted_f1`), ``auc_roc`` (``roc_auc_score``),
    ``auc_pr`` (``average_precision_score``: the official code's AU-PR and ``vus.get_metrics``'s
    ``AUC_PR`` in its all-metrics branch), ``f1_floor`` (all-positive F1).

    ``binarised=False`` (point-wise protocol, METHOD.md §6.7): ``vus_roc, vus_pr, r_auc_roc,
    r_auc_pr`` on the continuous scores; ``aff_p, aff_r`` on the best-F1 predictions
    ``score >= threshold``.

    ``binarised=True`` (released MADCluster protocol, ECOSYSTEM.md §1.2): ``vus_*``, ``r_auc_*`` and
    ``aff_*`` are all fed the 0/1 vector ``score > threshold`` (strict ``>``, one tie fewer than the
    F1 operating point); ``aff_p`` is NaN when that vector is empty. ``n_pred`` is the number of
    positive points of the vector used for affiliation in either mode.
    """
    y = _labels(labels)
    s = _scores(scores, y.size)
    window = _check_window(window)
    f1, precision, recall, threshold = best_f1(y, s)
    pred = (s > threshold) if binarised else (s >= threshold)
    pred = pred.astype(np.int8)
    curve_input = pred.astype(np.float64) if binarised else s
    vus_roc, vus_pr = vus(y, curve_input, window, n_thresholds)
    r_roc, r_pr = range_auc(y, curve_input, window, n_thresholds)
    aff_p, aff_r = affiliation(y, pred)
    return {
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "threshold": threshold,
        "pa_f1": point_adjusted_f1(y, s)[0],
        "aff_p": aff_p,
        "aff_r": aff_r,
        "vus_roc": vus_roc,
        "vus_pr": vus_pr,
        "r_auc_roc": r_roc,
        "r_auc_pr": r_pr,
        "auc_roc": float(roc_auc_score(y, s)),
        "auc_pr": float(average_precision_score(y, s)),
        "f1_floor": f1_floor(y),
        "n_pred": float(pred.sum()),
    }

"""Tests of madcluster_plugin.metrics.

Reference values: ECOSYSTEM.md §1.5 (computed with ``vus==0.0.6`` + scikit-learn; rounded to 12
decimals, so compared to 1e-9) and the examples of the affiliation reference implementation
(Huet et al., KDD 2022). Small cases are computed by hand in the comments.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from madcluster_plugin import metrics as M
from madcluster_plugin.metrics import (
    _affiliation_zones,
    affiliation,
    affiliation_events,
    best_f1,
    evaluate,
    f1_at,
    f1_floor,
    point_adjust,
    point_adjusted_f1,
    range_auc,
    vus,
)

TOL = 1e-9

# ---- ECOSYSTEM.md §1.5 inputs ----
C1_SCORE = [0.0, 0.1933, 0.2956, 0.259, 0.1005, 0.1052, 0.2615, 0.2947, 0.3394, 0.455, 1.2471, 1.6465,
            1.6064, 1.1457, 0.5599, 0.4139, 0.2938, 0.1854, 0.0101, 0.2009, 0.2972, 0.2537, 0.0909,
            0.1146, 0.2663, 0.2927, 0.3314, 0.4651, 1.2546, 1.4978, 1.301, 0.5361, 0.2693, 0.2686,
            0.2915, 0.1774, 0.0202, 0.2082, 0.2984, 0.2482]
C1_LABEL = [0] * 10 + [1] * 4 + [0] * 14 + [1] * 3 + [0] * 9
C2_SCORE = [0] * 12 + [1] * 4 + [0] * 4 + [1] + [0] * 8 + [1] * 4 + [0] * 7
C3_SCORE = [1.1, 1.0368, 0.9239, 0.3493, 0.3657, 0.4422, 0.4926, 0.4547, 0.3475, 0.2537, 0.2437,
            0.3108, 0.3775, 0.3666, 0.2723, 0.1654, 0.1284, 0.1794, 0.2557, 0.2713, 0.196, 0.0832,
            0.0207, 0.0502, 0.1286, 0.1681, 0.6164, 0.5053, 0.421, 0.4252]
C3_LABEL = [1] * 3 + [0] * 23 + [1] * 4

# name: (score, label, W, expected)
REFERENCE = {
    "c1": (C1_SCORE, C1_LABEL, 4, dict(
        R_AUC_ROC=0.997427679745, R_AUC_PR=0.991912271932, VUS_ROC=1.0, VUS_PR=1.0,
        Affiliation_Precision=0.949874686717, Affiliation_Recall=1.0, AUC_ROC=1.0, AUC_PR=1.0,
        best_F1=(1.0, 1.0, 1.0, 1.1457), best_F1_PA=1.0)),
    "c2": (C2_SCORE, C1_LABEL, 4, dict(
        R_AUC_ROC=0.836695883627, R_AUC_PR=0.798305434657, VUS_ROC=0.786730227417,
        VUS_PR=0.478714055969, Affiliation_Precision=0.796115288221,
        Affiliation_Recall=0.967418546366, AUC_ROC=0.709956709957, AUC_PR=0.328968253968,
        best_F1=(0.5, 0.444444444444, 0.571428571429, 1.0), best_F1_PA=0.736842105263)),
    "c3": (C3_SCORE, C3_LABEL, 6, dict(
        R_AUC_ROC=0.928833070292, R_AUC_PR=0.861427321509, VUS_ROC=0.963987342535,
        VUS_PR=0.912089092336, Affiliation_Precision=1.0, Affiliation_Recall=0.975806451613,
        AUC_ROC=0.962732919255, AUC_PR=0.909523809524,
        best_F1=(0.833333333333, 1.0, 0.714285714286, 0.5053), best_F1_PA=1.0)),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_values_vus_0_0_6(name: str) -> None:
    score, label, w, exp = REFERENCE[name]
    s, y = np.array(score, dtype=float), np.array(label)
    assert range_auc(y, s, w) == pytest.approx((exp["R_AUC_ROC"], exp["R_AUC_PR"]), abs=TOL)
    assert vus(y, s, w) == pytest.approx((exp["VUS_ROC"], exp["VUS_PR"]), abs=TOL)
    # vus.get_metrics(metric='all') takes affiliation events from score > 0.5
    aff = affiliation(y, (s > 0.5).astype(int))
    assert aff == pytest.approx((exp["Affiliation_Precision"], exp["Affiliation_Recall"]), abs=TOL)
    assert best_f1(y, s) == pytest.approx(exp["best_F1"], abs=TOL)
    assert point_adjusted_f1(y, s)[0] == pytest.approx(exp["best_F1_PA"], abs=TOL)
    out = evaluate(y, s, window=w)
    assert out["auc_roc"] == pytest.approx(exp["AUC_ROC"], abs=TOL)
    assert out["auc_pr"] == pytest.approx(exp["AUC_PR"], abs=TOL)
    assert (out["vus_roc"], out["vus_pr"]) == pytest.approx((exp["VUS_ROC"], exp["VUS_PR"]), abs=TOL)
    assert (out["r_auc_roc"], out["r_auc_pr"]) == pytest.approx((exp["R_AUC_ROC"], exp["R_AUC_PR"]), abs=TOL)
    assert (out["f1"], out["precision"], out["recall"], out["threshold"]) == pytest.approx(exp["best_F1"], abs=TOL)
    assert out["pa_f1"] == pytest.approx(exp["best_F1_PA"], abs=TOL)


def test_range_auc_is_not_the_w_slice_of_vus() -> None:
    # documented quirk: different P_new and PR integration, so R_AUC(W) != VUS restricted to W
    y, s = np.array(C1_LABEL), np.array(C1_SCORE)
    assert range_auc(y, s, 4)[0] < 0.998 and vus(y, s, 4)[0] == 1.0


# ---- affiliation ----
def test_affiliation_reference_readme_vector_example() -> None:
    gt = np.array([0, 0, 0, 1, 0, 0, 0, 1, 1, 1])
    pred = np.array([0, 0, 0, 0, 1, 0, 0, 0, 1, 0])
    assert affiliation(gt, pred) == pytest.approx((0.8181818181818181, 0.8442760942760943), abs=1e-12)
    prec, rec = _affiliation_zones(np.array([4.0, 8.0]), np.array([5.0, 9.0]), np.array([3.0, 7.0]),
                                   np.array([4.0, 10.0]), 0.0, 10.0)
    np.testing.assert_allclose(prec, [0.6363636363636364, 1.0], atol=1e-12)
    np.testing.assert_allclose(rec, [0.8181818181818181, 0.8703703703703703], atol=1e-12)


def test_affiliation_reference_events_example_with_empty_zone() -> None:
    # the 4th zone has no prediction: precision skips it (NaN), recall counts it as 0
    p, r = affiliation_events([(1, 3), (6, 18), (25, 26)], [(1, 8), (16, 17), (25, 28), (29, 31)], (1, 31))
    assert (p, r) == pytest.approx((0.7278338945005611, 0.697195165945166), abs=1e-12)


def test_affiliation_empty_prediction_is_nan_precision_zero_recall() -> None:
    p, r = affiliation_events([], [(1, 10)], (1, 10))
    assert math.isnan(p) and r == 0.0
    p, r = affiliation(np.array([0, 1, 1, 0]), np.zeros(4, dtype=int))
    assert math.isnan(p) and r == 0.0


def test_affiliation_hand_computed_far_prediction() -> None:
    # gt J = [4, 6), zone E = [0, 10], prediction [0, 1).
    # precision: x in [0,1), d = 4 - x in (3, 4], Fbar = 1 - (|J| + d + min(d, 10 - 6))/10
    #   = 1 - (2 + 2d)/10, mean over d in [3, 4] = 1 - 9/10 = 0.1
    # recall: y in [4, 6], d = y - 1; min(d, 10 - y) = d for y <= 5.5, = 10 - y after:
    #   int_4^5.5 (1 - 2(y-1)/10) dy = 0.375, int_5.5^6 (1 - 9/10) dy = 0.05 -> 0.425 / 2 = 0.2125
    y = np.zeros(10, dtype=int)
    y[4:6] = 1
    pred = np.zeros(10, dtype=int)
    pred[0] = 1
    assert affiliation(y, pred) == pytest.approx((0.1, 0.2125), abs=1e-12)


def test_affiliation_hand_computed_prediction_across_zones() -> None:
    # gt [1,2) and [7,8), zones [0, 4.5] and [4.5, 10]; prediction [3, 6) is cut at 4.5.
    # zone 0 precision: d = x - 2 in [1, 2.5], Fbar = 1 - (1 + d + 1)/4.5, mean d 1.75 -> 1/6
    # zone 1 precision: d = 7 - x in [1, 2.5], Fbar = 1 - (1 + d + min(d, 2))/5.5 -> 13/66
    # zone 0 recall: y in [1,2], d = 3 - y, min(d, y) switches at 1.5 -> 1 - 2.75/4.5 = 7/18
    # zone 1 recall: y in [7,8], d = y - 6 <= 10 - y -> 1 - 2 * 1.5 / 5.5 = 5/11
    y = np.zeros(10, dtype=int)
    y[[1, 7]] = 1
    pred = np.zeros(10, dtype=int)
    pred[3:6] = 1
    p, r = affiliation(y, pred)
    assert p == pytest.approx((1 / 6 + 13 / 66) / 2, abs=1e-12)  # = 2/11
    assert r == pytest.approx((7 / 18 + 5 / 11) / 2, abs=1e-12)  # = 167/396


def test_affiliation_zone_without_prediction() -> None:
    y = np.zeros(10, dtype=int)
    y[[1, 7]] = 1
    pred = np.zeros(10, dtype=int)
    pred[1] = 1
    assert affiliation(y, pred) == pytest.approx((1.0, 0.5), abs=1e-12)


def test_affiliation_events_validation() -> None:
    with pytest.raises(ValueError, match="gt_events is empty"):
        affiliation_events([(1, 2)], [], (0, 5))
    with pytest.raises(ValueError, match="start < stop"):
        affiliation_events([(2, 2)], [(1, 3)], (0, 5))
    with pytest.raises(ValueError, match="sorted and disjoint"):
        affiliation_events([(3, 4), (1, 2)], [(1, 3)], (0, 5))
    with pytest.raises(ValueError, match="must include all events"):
        affiliation_events([(1, 9)], [(1, 3)], (0, 5))


# ---- F1 family ----
PA_LABEL = np.array([0, 1, 1, 1, 0, 0, 1, 1, 0, 0])
PA_SCORE = np.array([0.1, 0.2, 0.9, 0.3, 0.5, 0.4, 0.1, 0.6, 0.0, 0.2])


def test_best_f1_hand_computed() -> None:
    # descending scores with P = 5: the best is at threshold 0.1 (9 predicted, 5 true): P 5/9, R 1
    f1, p, r, t = best_f1(PA_LABEL, PA_SCORE)
    assert (f1, p, r, t) == pytest.approx((5 / 7, 5 / 9, 1.0, 0.1), abs=1e-12)
    # score >= threshold is the operating point
    assert f1_at(PA_LABEL, (PA_SCORE >= t).astype(int)) == pytest.approx((f1, p, r), abs=1e-12)


def test_point_adjust_hand_computed() -> None:
    adj = point_adjust(PA_LABEL, PA_SCORE)
    np.testing.assert_array_equal(adj, [0.1, 0.9, 0.9, 0.9, 0.5, 0.4, 0.6, 0.6, 0.0, 0.2])
    assert point_adjusted_f1(PA_LABEL, PA_SCORE) == pytest.approx((1.0, 1.0, 1.0, 0.6), abs=1e-12)


def test_point_adjust_on_binary_predictions_is_segment_fill() -> None:
    pred = np.array([0, 0, 1, 0, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(point_adjust(PA_LABEL, pred), [0, 1, 1, 1, 1, 0, 0, 0, 0, 0])


def test_f1_at_hand_computed_and_empty() -> None:
    pred = np.array([0, 1, 0, 0, 1, 0, 0, 1, 0, 0])  # tp 2 of 3 predicted, P = 5
    assert f1_at(PA_LABEL, pred) == pytest.approx((0.5, 2 / 3, 0.4), abs=1e-12)
    assert f1_at(PA_LABEL, np.zeros(10, dtype=int)) == (0.0, 0.0, 0.0)


def test_f1_floor() -> None:
    assert f1_floor(PA_LABEL) == pytest.approx(2 * 5 / 15)
    assert f1_at(PA_LABEL, np.ones(10, dtype=int))[0] == pytest.approx(f1_floor(PA_LABEL))


# ---- evaluate: the two protocols ----
def test_evaluate_binarised_feeds_strict_predictions() -> None:
    y = np.array(C3_LABEL)
    s = np.array(C3_SCORE)
    cont = evaluate(y, s, window=6)
    binr = evaluate(y, s, window=6, binarised=True)
    thr = cont["threshold"]
    pred_ge, pred_gt = (s >= thr).astype(int), (s > thr).astype(int)
    assert cont["n_pred"] == pred_ge.sum() == 5 and binr["n_pred"] == pred_gt.sum() == 4
    assert (binr["vus_roc"], binr["vus_pr"]) == vus(y, pred_gt.astype(float), 6)
    assert (binr["r_auc_roc"], binr["r_auc_pr"]) == range_auc(y, pred_gt.astype(float), 6)
    assert (binr["aff_p"], binr["aff_r"]) == affiliation(y, pred_gt)
    assert (cont["aff_p"], cont["aff_r"]) == affiliation(y, pred_ge)
    for key in ("f1", "precision", "recall", "threshold", "pa_f1", "auc_roc", "auc_pr", "f1_floor"):
        assert cont[key] == binr[key]
    assert binr["vus_roc"] < cont["vus_roc"]


def test_evaluate_keys() -> None:
    out = evaluate(np.array(C1_LABEL), np.array(C1_SCORE), window=4)
    assert set(out) == {"f1", "precision", "recall", "threshold", "pa_f1", "aff_p", "aff_r", "vus_roc",
                        "vus_pr", "r_auc_roc", "r_auc_pr", "auc_roc", "auc_pr", "f1_floor", "n_pred"}
    assert out["f1_floor"] == pytest.approx(2 * 7 / 47)
    assert (out["aff_p"], out["aff_r"]) == (1.0, 1.0)  # best-F1 predictions are exactly the anomalies


# ---- VUS internals ----
VUS_DENSE = (0.9415016417880248, 0.9127603756741891)
RAUC_DENSE = (0.9794893816598487, 0.9847586741554358)


def test_vus_window_chunking_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(400) < 0.15).astype(int)
    s = rng.normal(size=400) + y
    full = vus(y, s, 30)
    monkeypatch.setattr(M, "_CHUNK_CELLS", 50)
    assert vus(y, s, 30) == pytest.approx(full, abs=1e-14)


def test_vus_dense_segments_extension_across_segments() -> None:
    # buffers crossing neighbouring segments saturate at 1 (two contributions >= sqrt(1/2) each);
    # value computed with vus==0.0.6 generate_curve(..., 8, 'opt', 250)
    y = np.array([0, 1, 0, 1, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0])
    s = np.array([0.3, 0.9, 0.1, 0.4, 0.8, 0.2, 0.7, 0.5, 0.6, 0.0, 0.35, 0.95, 0.15, 0.45, 0.05, 0.25,
                  0.55, 0.65, 0.85, 0.75])
    assert vus(y, s, 8) == pytest.approx(VUS_DENSE, abs=TOL)
    assert range_auc(y, s, 8) == pytest.approx(RAUC_DENSE, abs=TOL)


# ---- properties ----
@st.composite
def _series(draw, min_size: int = 6, max_size: int = 50):
    n = draw(st.integers(min_size, max_size))
    y = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
    y[i] = 1
    if j == i:
        j = (i + 1) % n
    y[j] = 0
    s = draw(st.lists(st.integers(0, 12), min_size=n, max_size=n))  # small integers: many ties
    w = draw(st.integers(0, 12))
    return np.array(y), np.array(s, dtype=float), w


_FAST = settings(max_examples=25, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])
_UNIT = ("f1", "precision", "recall", "pa_f1", "aff_p", "aff_r", "vus_roc", "vus_pr", "r_auc_roc",
         "r_auc_pr", "auc_roc", "auc_pr", "f1_floor")


@_FAST
@given(_series(), st.booleans())
def test_all_metrics_in_unit_interval(data, binarised: bool) -> None:
    y, s, w = data
    out = evaluate(y, s, window=w, binarised=binarised)
    for key in _UNIT:
        if key == "aff_p" and out["n_pred"] == 0:
            assert math.isnan(out[key])  # documented: no predicted event -> undefined precision
            continue
        assert -1e-12 <= out[key] <= 1 + 1e-12, (key, out[key])
    assert out["f1"] >= out["f1_floor"] - 1e-12
    assert out["pa_f1"] >= out["f1"] - 1e-12


@_FAST
@given(_series())
def test_perfect_scores(data) -> None:
    y, _, w = data
    s = y + 0.01 * np.arange(y.size) / y.size  # every anomaly above every normal point
    out = evaluate(y, s, window=w)
    for key in ("f1", "precision", "recall", "pa_f1", "aff_p", "aff_r", "vus_roc", "vus_pr", "auc_roc",
                "auc_pr"):
        assert out[key] == pytest.approx(1.0, abs=1e-12), key
    assert affiliation(y, y) == (1.0, 1.0)
    # Range-AUC is 1 only without a buffer: with one, P_new > P and TPR < 1 at FPR = 0
    assert range_auc(y, s, min(w, 1)) == pytest.approx((1.0, 1.0), abs=1e-12)


@_FAST
@given(_series())
def test_ranking_metrics_invariant_under_increasing_transform(data) -> None:
    y, s, w = data
    t = np.exp(s / 3.0) * 5.0 - 2.0  # strictly increasing, keeps ties and order
    a, b = evaluate(y, s, window=w), evaluate(y, t, window=w)
    for key in _UNIT + ("n_pred",):
        assert a[key] == pytest.approx(b[key], abs=1e-12, nan_ok=True), key
    assert b["threshold"] == pytest.approx(np.exp(a["threshold"] / 3.0) * 5.0 - 2.0)


# ---- validation ----
@pytest.mark.parametrize(
    "labels, scores, match",
    [
        ([0, 1, 2], [0.1, 0.2, 0.3], "only 0 and 1"),
        ([0, 1, 1], [0.1, 0.2], "length"),
        ([0, 1, 1], [0.1, np.nan, 0.3], "NaN or inf"),
        ([0, 1, 1], [0.1, np.inf, 0.3], "NaN or inf"),
        ([0, 0, 0], [0.1, 0.2, 0.3], "no anomaly"),
        ([1, 1, 1], [0.1, 0.2, 0.3], "no normal"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
        ([], [], "empty"),
        (["a", "b"], [0.1, 0.2], "numeric"),
    ],
)
def test_invalid_inputs_raise(labels, scores, match) -> None:
    for fn in (best_f1, point_adjust, lambda y, s: vus(y, s, 2), lambda y, s: range_auc(y, s, 2), evaluate):
        with pytest.raises(ValueError, match=match):
            fn(labels, scores)


def test_invalid_parameters_raise() -> None:
    y, s = np.array([0, 1, 0]), np.array([0.1, 0.9, 0.2])
    with pytest.raises(ValueError, match="max_window"):
        vus(y, s, -1)
    with pytest.raises(ValueError, match="window"):
        range_auc(y, s, 2.5)
    with pytest.raises(ValueError, match="n_thresholds"):
        vus(y, s, 2, n_thresholds=0)
    with pytest.raises(ValueError, match="predictions"):
        affiliation(y, np.array([0, 0.5, 1]))
    with pytest.raises(ValueError, match="predictions has length"):
        f1_at(y, np.array([0, 1]))


# ---- optional cross-check against the reference package (skipped when it is not installed) ----
def test_cross_check_against_vus_package() -> None:
    vus_metrics = pytest.importorskip("vus.utils.metrics")
    robustness = pytest.importorskip("vus.analysis.robustness_eval")
    rng = np.random.default_rng(11)
    for n, w in ((300, 10), (500, 25)):
        y = (rng.random(n) < 0.1).astype(int)
        s = rng.normal(size=n) + y
        *_, v_roc, v_pr = robustness.generate_curve(y, s, w, "opt", 250)
        r_roc, r_pr, *_ = vus_metrics.metricor().RangeAUC(labels=y, score=s, window=w, plot_ROC=True)
        assert vus(y, s, w) == pytest.approx((v_roc, v_pr), abs=1e-12)
        assert range_auc(y, s, w) == pytest.approx((r_roc, r_pr), abs=1e-12)

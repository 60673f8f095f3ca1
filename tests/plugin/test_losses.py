"""The loss functions against the appendix's closed forms (eqs. 9-26), in float64."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from madcluster_plugin import losses as L

GRID = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)


@pytest.fixture(autouse=True)
def _float64():
    """float64 for the closed-form comparisons, restored afterwards for the other modules."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    q, nu = torch.meshgrid(GRID, GRID, indexing="ij")
    return q.reshape(-1).clone(), nu.reshape(-1).clone()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


def test_df1_dq_and_df2_dq_match_eqs_11_12() -> None:
    q, nu = _grid()
    q.requires_grad_(True)
    f1, f2 = L.one_directed_branches(q, nu)
    g1, = torch.autograd.grad(f1.sum(), q)
    g2, = torch.autograd.grad(f2.sum(), q)
    eq11 = (1 - nu ** (1 - nu)) / (1 - nu)
    eq12 = (1 - nu) * q.detach() ** (-nu)
    assert _rel_err(g1, eq11) <= 1e-6
    assert _rel_err(g2, eq12) <= 1e-6
    assert (eq11 > 0).all() and (eq12 > 0).all()


def test_df1_dnu_and_df2_dnu_match_eqs_15_23() -> None:
    q, nu = _grid()
    nu.requires_grad_(True)
    f1, f2 = L.one_directed_branches(q, nu)
    g1, = torch.autograd.grad(f1.sum(), nu)
    g2, = torch.autograd.grad(f2.sum(), nu)
    n = nu.detach()
    brace = n ** n + n - n ** 2 - 1 + n * (1 - n) * torch.log(n)
    eq15 = (q - 1) / ((1 - n) ** 2 * n ** n) * brace
    eq23 = -q ** (1 - n) * torch.log(q)
    assert _rel_err(g1, eq15) <= 1e-6
    assert _rel_err(g2, eq23) <= 1e-6


def test_g1_minus_g2_plus_g3_negative_eq_22() -> None:
    nu = torch.linspace(1e-4, 1 - 1e-4, 10_001)
    g = nu ** nu + nu - (nu ** 2 + 1) + nu * (1 - nu) * torch.log(nu)
    assert (g < 0).all()
    # appendix Fig. 4: minimum of about -0.36 near nu = 0.2
    i = int(g.argmin())
    assert abs(float(g[i]) + 0.36) < 0.02 and abs(float(nu[i]) - 0.2) < 0.05


def test_loss_gradient_signs_eqs_13_24_and_eq_10() -> None:
    q, nu = _grid()
    q.requires_grad_(True)
    nu.requires_grad_(True)
    loss = L.one_directed_adaptive_loss(q, nu)  # p from eq. 4
    dq, dnu = torch.autograd.grad(loss.sum(), (q, nu))
    assert (dq < 0).all(), "eq. 13: dL/dq < 0 everywhere"
    assert (dnu < 0).all(), "eq. 24: dL/dnu < 0 everywhere"
    # eq. 10 with the closed forms of eqs. 11, 12
    qd, n = q.detach(), nu.detach()
    p = (qd >= n).double()
    f1, f2 = L.one_directed_branches(qd, n)
    eq10 = -p * ((1 - n ** (1 - n)) / (1 - n)) / f1 - (1 - p) * ((1 - n) * qd ** (-n)) / f2
    assert _rel_err(dq, eq10) <= 1e-6


def test_loss_is_minus_log_y_of_eq_7_and_continuous_at_threshold() -> None:
    nu = torch.tensor(0.3)
    q = torch.tensor([0.1, 0.2999999, 0.3, 0.6, 1.0])
    y = torch.where(q < nu, q ** (1 - nu), (1 - nu ** (1 - nu)) / (1 - nu) * (q - 1) + 1)
    assert torch.allclose(L.one_directed_adaptive_loss(q, nu), -torch.log(y), atol=1e-12)
    assert float(L.one_directed_adaptive_loss(torch.tensor(1.0), nu)) == pytest.approx(0.0, abs=1e-12)
    left = L.one_directed_adaptive_loss(nu - 1e-9, nu)
    right = L.one_directed_adaptive_loss(nu, nu)
    assert float(left) == pytest.approx(float(right), abs=1e-7)


def test_explicit_p_overrides_eq_4() -> None:
    q = torch.tensor([0.2, 0.8])
    nu = torch.tensor(0.5)
    f1, f2 = L.one_directed_branches(q, nu)
    assert torch.allclose(L.one_directed_adaptive_loss(q, nu, p=torch.ones(2)), -torch.log(f1))
    assert torch.allclose(L.one_directed_adaptive_loss(q, nu, p=torch.zeros(2)), -torch.log(f2))


def test_code_loss_reduces_to_method_formula_for_p_one() -> None:
    q, nu = _grid()
    ell = L.code_cluster_loss(q, nu, torch.ones_like(q), smoothing=0.01)
    f1, _ = L.one_directed_branches(q, nu)
    expected = -torch.log(q) - 0.99 * torch.log(f1) - 0.01 * (1 - nu) * torch.log(q)
    assert torch.allclose(ell, expected, atol=1e-12)


def test_cosine_assignment_range_and_values() -> None:
    c = torch.tensor([[1.0, 0.0]])
    h = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-2.0, 0.0], [0.0, 0.0]])
    q = L.cosine_assignment(h, c)
    assert torch.allclose(q[:, 0], torch.tensor([1.0, 0.5, 0.0, 0.5]), atol=1e-12)


def test_student_t_dec_and_kl_hand_computed() -> None:
    # one window of two points, two centres; squared distances chosen by hand
    d = torch.tensor([[[0.0, 3.0], [1.0, 1.0]]])  # [B=1, T=2, K=2]
    q = L.student_t_assignment(d)
    k = 1 / (1 + d)
    q_hand = k / k.sum(-1, keepdim=True)
    assert torch.allclose(q, q_hand)
    assert torch.allclose(q.sum(-1), torch.ones(1, 2))
    # q = [[0.8, 0.2], [0.5, 0.5]]; f = [1.3, 0.7]; w = q^2/f; p = w / sum_j w
    assert torch.allclose(q, torch.tensor([[[0.8, 0.2], [0.5, 0.5]]]))
    w = torch.tensor([[0.64 / 1.3, 0.04 / 0.7], [0.25 / 1.3, 0.25 / 0.7]])
    p_hand = w / w.sum(-1, keepdim=True)
    p = L.dec_target(q, time_dim=1)
    assert torch.allclose(p[0], p_hand, atol=1e-12)
    kl = L.kl_cluster_loss(p, q).sum()
    assert float(kl) == pytest.approx(float((p_hand * torch.log(p_hand / q[0])).sum()), rel=1e-12)


def test_dec_target_is_one_for_single_cluster() -> None:
    q = torch.rand(3, 7, 1)
    assert torch.equal(L.dec_target(q, time_dim=1), torch.ones(3, 7, 1))


def test_distance_mapping_and_reductions() -> None:
    h = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
    c = torch.tensor([[1.0, 0.0]])
    sq = L.squared_distances(h, c)
    assert torch.allclose(sq[..., 0], torch.tensor([[4.0, 1.0]]))
    r = torch.tensor([1.5])
    sb = L.distance_mapping_loss(sq, "soft-boundary", r, sb_nu=0.1)
    assert torch.allclose(sb[..., 0], torch.tensor([[2.25 + (4 - 2.25) / 0.1, 2.25]]))
    assert float(L.reduce_elements(sq, "log-sum")) == pytest.approx(math.log(5 + 1e-8))
    assert float(L.reduce_elements(sq, "mean")) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="radius"):
        L.distance_mapping_loss(sq, "soft-boundary", None)


def test_radius_matches_numpy_quantile() -> None:
    d = torch.rand(1000, 2) * 5
    r = L.radius_from_distances(d, 0.05)
    expected = np.quantile(np.sqrt(d.numpy()), 0.95, axis=0)
    assert np.allclose(r.numpy(), expected, rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(q=st.sampled_from([0.0, 1e-12, 0.5, 1.0 - 1e-12, 1.0]),
       nu=st.sampled_from([1e-4, 1e-3, 0.5, 1 - 1e-3, 1 - 1e-4]),
       target=st.sampled_from(["paper", "code"]))
def test_losses_finite_at_extremes(q: float, nu: float, target: str) -> None:
    qt = torch.tensor([q], dtype=torch.float32, requires_grad=True)
    nut = torch.tensor(nu, dtype=torch.float32, requires_grad=True)
    if target == "paper":
        loss = L.one_directed_adaptive_loss(qt, nut)
    else:
        loss = L.code_cluster_loss(qt, nut, torch.ones(1))
    gq, gnu = torch.autograd.grad(loss.sum(), (qt, nut))
    assert torch.isfinite(loss).all() and torch.isfinite(gq).all() and torch.isfinite(gnu).all()

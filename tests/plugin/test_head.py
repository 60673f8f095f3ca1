"""MADClusterHead: shapes, numerics at the edges, K > 1, soft boundary, config validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from madcluster_plugin import MADClusterConfig, MADClusterHead
from madcluster_plugin import losses as L


def _finite_everything(head: MADClusterHead, h: torch.Tensor) -> None:
    h = h.clone().requires_grad_(True)
    out = head(h)
    loss = head.loss(out)
    score = head.score(out)
    grads = torch.autograd.grad(loss, [h, head.centers, head.threshold_raw], allow_unused=True)
    assert torch.isfinite(loss), loss
    assert torch.isfinite(score).all()
    for g in grads:
        if g is not None:
            assert torch.isfinite(g).all()


def test_shapes_and_parameter_count() -> None:
    head = MADClusterHead(16, n_clusters=3)
    assert sum(p.numel() for p in head.parameters()) == 3 * 16 + 1
    out = head(torch.randn(2, 5, 16))
    for t in (out.q, out.p, out.sq_distances, out.cluster, out.mapping):
        assert t.shape == (2, 5, 3)
    assert head.score(out).shape == (2, 5)
    assert head.loss(out).dim() == 0


def test_he_init_std() -> None:
    torch.manual_seed(0)
    head = MADClusterHead(256, n_clusters=64)
    assert float(head.centers.detach().std()) == pytest.approx((2 / 256) ** 0.5, rel=0.05)


def test_k1_paper_target_and_score() -> None:
    head = MADClusterHead(2)
    with torch.no_grad():
        head.centers.copy_(torch.tensor([[1.0, 0.0]]))
        head.threshold_raw.fill_(0.6)
    h = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    out = head(h)
    assert torch.allclose(out.q[0, :, 0], torch.tensor([1.0, 0.5, 0.0]))
    assert torch.equal(out.p[0, :, 0], torch.tensor([1.0, 0.0, 0.0]))
    expected_cluster = L.one_directed_adaptive_loss(out.q, torch.tensor(0.6))
    assert torch.allclose(out.cluster, expected_cluster)
    nearest = torch.tensor([1.0, 2.0, 4.0])
    assert torch.allclose(head.score(out)[0], expected_cluster[0, :, 0] + nearest)
    # the point aligned with the centre scores lowest, the opposite one highest
    s = head.score(out)[0]
    assert s[0] < s[1] < s[2]


def test_k_gt_1_rows_sum_to_one_and_kl() -> None:
    torch.manual_seed(1)
    head = MADClusterHead(4, n_clusters=3)
    out = head(torch.randn(2, 6, 4))
    assert torch.allclose(out.q.sum(-1), torch.ones(2, 6), atol=1e-6)
    assert torch.allclose(out.p.sum(-1), torch.ones(2, 6), atol=1e-6)
    kl = (out.p * torch.log(out.p / out.q)).sum()
    assert float(out.cluster.detach().sum()) == pytest.approx(float(kl.detach()), rel=1e-5)
    assert not head.uses_threshold


def test_code_target_matches_released_formula() -> None:
    torch.manual_seed(2)
    head = MADClusterHead(8, target="code")
    out = head(torch.randn(2, 4, 8))
    assert torch.equal(out.p, torch.ones_like(out.p))
    nu = head.threshold.detach()
    f1, _ = L.one_directed_branches(out.q, nu)
    expected = -torch.log(out.q) - 0.99 * torch.log(f1) - 0.01 * (1 - nu) * torch.log(out.q)
    assert torch.allclose(out.cluster, expected, atol=1e-5)


def test_threshold_clamped_and_finite_near_one() -> None:
    head = MADClusterHead(4, threshold_eps=1e-4)
    with torch.no_grad():
        head.threshold_raw.fill_(1.7)
    assert float(head.threshold.detach()) == pytest.approx(1 - 1e-4)
    head.clamp_threshold_()
    assert float(head.threshold_raw.detach()) == pytest.approx(1 - 1e-4)
    _finite_everything(head, torch.randn(2, 3, 4))


def test_soft_boundary_radius_from_training_distances() -> None:
    torch.manual_seed(3)
    head = MADClusterHead(4, objective="soft-boundary", sb_nu=0.1)
    out = head(torch.randn(8, 10, 4))
    r = head.update_radius(out.sq_distances)
    expected = np.quantile(np.sqrt(out.sq_distances.detach().numpy().reshape(-1)), 0.9)
    assert float(r[0]) == pytest.approx(expected, rel=1e-5)
    out2 = head(torch.randn(8, 10, 4))
    r2 = float(head.radius[0]) ** 2
    manual = r2 + torch.relu(out2.sq_distances - r2) / 0.1
    assert torch.allclose(out2.mapping, manual)


def test_components_ablation() -> None:
    torch.manual_seed(4)
    h = torch.randn(2, 3, 4)
    both = MADClusterHead(4)
    state = both.state_dict()
    mapping = MADClusterHead(4, components="mapping")
    cluster = MADClusterHead(4, components="cluster")
    mapping.load_state_dict(state)
    cluster.load_state_dict(state)
    ob = both(h)
    assert torch.allclose(mapping.score(mapping(h)), ob.sq_distances.min(-1).values)
    assert torch.allclose(cluster.score(cluster(h)), ob.cluster.sum(-1))
    assert torch.allclose(both.loss(ob), torch.log((ob.mapping + ob.cluster).sum((1, 2)).mean() + 1e-8))


def test_data_init_k1_and_kmeans() -> None:
    torch.manual_seed(5)
    head = MADClusterHead(3, center_init="data")
    assert not bool(head.centers_initialized)
    h = torch.tensor([[0.5, 0.01, -2.0]]) + 0.01 * torch.randn(500, 3)
    head.initialize_centers(h)
    c = head.centers.detach()[0]
    assert float(c[0]) == pytest.approx(0.5, abs=0.01) and float(c[1]) == pytest.approx(0.1)
    assert bool(head.centers_initialized)
    km = MADClusterHead(2, n_clusters=2, center_init="data")
    blobs = torch.cat([torch.randn(200, 2) * 0.1 + 5, torch.randn(200, 2) * 0.1 - 5])
    km.initialize_centers(blobs)
    got = sorted(km.centers.detach()[:, 0].tolist())
    assert got[0] == pytest.approx(-5, abs=0.1) and got[1] == pytest.approx(5, abs=0.1)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_clusters": 0}, "n_clusters"),
    ({"init_threshold": 1.0}, "init_threshold"),
    ({"init_threshold": 0.0}, "init_threshold"),
    ({"smoothing": 0.5}, "smoothing"),
    ({"smoothing": -0.1}, "smoothing"),
    ({"target": "dec"}, "target"),
    ({"objective": "svdd"}, "objective"),
])
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MADClusterConfig(**kwargs)


def test_unknown_override_names_valid_ones() -> None:
    with pytest.raises(TypeError, match="n_clusters"):
        MADClusterHead(4, n_cluster=2)


def test_bad_hidden_inputs() -> None:
    head = MADClusterHead(4)
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        head(torch.randn(2, 4))
    with pytest.raises(ValueError, match="differs from the head's D = 4"):
        head(torch.randn(2, 3, 5))
    bad = torch.randn(2, 3, 4)
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        head.loss(head(bad))
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        head.score(head(bad))
    bad[0, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        head.loss(head(bad))
    with pytest.raises(FloatingPointError, match="overflow"):
        head.loss(head(torch.full((1, 2, 4), 1e30)))


@settings(max_examples=40, deadline=None)
@given(scale=st.sampled_from([0.0, 1e-30, 1e-12, 1e-3, 1.0, 1e3, 1e12]),
       nu=st.sampled_from([1e-4, 0.01, 0.5, 0.99, 1 - 1e-4]),
       k=st.sampled_from([1, 3]), target=st.sampled_from(["paper", "code"]),
       objective=st.sampled_from(["one-class", "soft-boundary"]), seed=st.integers(0, 3))
def test_no_nan_or_inf_property(scale: float, nu: float, k: int, target: str, objective: str,
                                seed: int) -> None:
    torch.manual_seed(seed)
    head = MADClusterHead(6, n_clusters=k, target=target, objective=objective, init_threshold=0.5)
    with torch.no_grad():
        head.threshold_raw.fill_(nu)
    h = torch.randn(2, 5, 6) * scale
    if objective == "soft-boundary":
        head.update_radius(head(h).sq_distances)
    _finite_everything(head, h)
    # q exactly 0 and 1: hidden states opposite to and aligned with the centre
    c = head.centers.detach()[0]
    _finite_everything(head, torch.stack([c, -c, torch.zeros_like(c)]).unsqueeze(0) * max(scale, 1e-3))


@pytest.mark.parametrize("norm", [0.0, 1e-30, 5e-20, 1e-9, 1e-6, 1.0])
def test_tiny_hidden_vectors_give_finite_gradients_and_the_codes_cosine(norm: float) -> None:
    """K = 1 on hidden vectors of tiny norm, in float32 (a bias-free DeepSVDD gave ||h|| = 5e-20
    on an all-zero MSL window and, without a norm floor, an infinite gradient): every gradient is
    finite and q equals the released code's ``(1 + F.cosine_similarity(h, c)) / 2`` (eps 1e-8)."""
    torch.manual_seed(0)
    head = MADClusterHead(6, init_threshold=0.5)
    direction = torch.randn(2, 5, 6)
    h = direction / direction.norm(dim=-1, keepdim=True) * norm
    h[0, 0] = 1.0  # one ordinary vector in the batch
    _finite_everything(head, h)
    q = head(h).q[..., 0]
    expected = (1 + torch.nn.functional.cosine_similarity(h, head.centers.detach()[0].expand_as(h), dim=-1)) / 2
    assert torch.allclose(q, expected, atol=1e-6)

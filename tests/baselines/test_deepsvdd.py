"""DeepSVDD baseline and adapter: shapes, parameter counts, centre init, objectives, training."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import adapters
from baselines.deepsvdd import DeepSVDD
from tests.helpers import n_params, train_on_synthetic

# Small, fast training configuration for the synthetic acceptance runs (about 75 Adam steps).
TRAIN = dict(build=dict(hidden=32, n_layers=2, rep_dim=16), epochs=2, batch=16, lr=3e-3,
             window=50, stride=5)
# Measured with TRAIN (seed 0): plain 0.824, wrapped 0.817; the same model untrained (lr = 0)
# gives 0.683 and a sign-flipped score 0.18, so this bound separates a model that learned.
AUROC_BOUND = 0.75


@pytest.mark.parametrize("channels, expected", [(55, 275_072), (25, 263_552)])
def test_shapes_and_parameter_count(channels: int, expected: int) -> None:
    # Recommended config: 3-layer bias-free GRU-128, then a bias-free 128 -> 64 linear map.
    # Bias-free GRU layer with input n and width H: 3 gates x (n*H + H*H).
    #   C = 55: 3(55*128 + 128^2) + 2 * 3(128^2 + 128^2) + 128*64
    #         = 70,272 + 2 * 98,304 + 8,192 = 275,072   (BASELINES.md: 275.07K)
    #   C = 25: 3(25*128 + 128^2) + 196,608 + 8,192 = 58,752 + 204,800 = 263,552
    torch.manual_seed(0)
    adapter = adapters.get("deepsvdd")
    model = adapter.build(channels)
    assert n_params(model) == expected
    assert not [n for n, _ in model.named_parameters() if "bias" in n]
    x = torch.rand(4, 100, channels)
    model.on_fit_start([x])
    h = model(x)
    assert h.shape == (4, 100, 64)
    assert model.score(x, h).shape == (4, 100)
    wrapped = adapter.wrap(model)
    assert n_params(wrapped) == expected + 64 + 1  # centre c in R^D plus the threshold nu
    out = wrapped(x)
    assert torch.equal(out, h)  # the wrapper returns exactly the backbone output
    assert torch.equal(wrapped.hidden, h)  # attached at encoder.proj, the per-step embedding
    assert wrapped.head_score().shape == (4, 100)
    assert torch.isfinite(wrapped.madcluster_loss())


def test_bias_free_encoder_maps_zero_to_zero() -> None:
    # Ruff's trivial-solution argument: with no bias anywhere, phi(0) = 0 exactly.
    torch.manual_seed(0)
    model = DeepSVDD(7, hidden=16, n_layers=3, rep_dim=8)
    assert torch.equal(model(torch.zeros(2, 30, 7)), torch.zeros(2, 30, 8))


def test_center_init_pushes_every_coordinate_out_of_eps() -> None:
    torch.manual_seed(0)
    model = DeepSVDD(5, hidden=8, n_layers=1, rep_dim=6, eps=0.1)
    batches = [torch.rand(4, 20, 5), torch.rand(3, 20, 5)]
    with torch.no_grad():
        g = torch.cat([model.encoder.rnn(b)[0].reshape(-1, 8) for b in batches]).mean(0)
        w = model.encoder.proj.weight
        w[0] = 0.0                       # coordinate 0 has mean exactly 0: tie-break to +eps
        w[1] = 1e-3 * torch.sign(g)      # coordinate 1: small positive mean, below eps
        w[2] = -1e-3 * torch.sign(g)     # coordinate 2: small negative mean
        w[3] = 10.0 * torch.sign(g)      # coordinate 3: large mean, kept as it is
    model.train()
    model.on_fit_start(batches)
    assert model.training  # restored after the eval-mode pass
    with torch.no_grad():
        mean = torch.cat([model(b).reshape(-1, 6) for b in batches]).mean(0)
    c = model.center
    assert (c.abs() >= 0.1).all()
    assert c[0] == 0.1 and c[1] == 0.1 and c[2] == -0.1
    big = mean.abs() >= 0.1
    assert big[3]
    torch.testing.assert_close(c[big], mean[big])
    assert bool(model.center_initialized)
    # the centre is a buffer: saved with the model, never trained
    assert "center" in model.state_dict() and all(p is not c for p in model.parameters())


def test_one_class_loss_and_score_are_squared_distances() -> None:
    torch.manual_seed(0)
    model = DeepSVDD(4, hidden=8, n_layers=1, rep_dim=3)
    x = torch.rand(2, 10, 4)
    model.on_fit_start([x])
    h = model(x)
    d = ((h - model.center) ** 2).sum(-1)
    torch.testing.assert_close(model.score(x, h), d)
    torch.testing.assert_close(model.loss(x, h, epoch=0)["svdd"], d.mean())


def test_soft_boundary_radius_from_training_batches_only() -> None:
    torch.manual_seed(0)
    model = DeepSVDD(4, hidden=8, n_layers=1, rep_dim=3, objective="soft-boundary", nu=0.2,
                     warm_up_epochs=2)
    x = torch.rand(8, 10, 4)
    model.on_fit_start([x])
    model.train()
    h = model(x)
    dist = ((h - model.center) ** 2).sum(-1).detach()
    # during the warm-up R stays 0 and the loss is (1/nu) * mean(dist)
    loss = model.loss(x, h, epoch=1)["svdd"]
    torch.testing.assert_close(loss, dist.mean() / 0.2)
    assert float(model.radius) == 0.0
    # after the warm-up: the loss uses the old R, then R becomes the (1 - nu)-quantile of ||h - c||
    model.loss(x, h, epoch=2)
    r = float(np.quantile(dist.sqrt().flatten().double().numpy(), 0.8))
    assert math.isclose(float(model.radius), r, rel_tol=1e-6)
    loss = model.loss(x, h, epoch=3)["svdd"]
    torch.testing.assert_close(loss, r ** 2 + torch.relu(dist - r ** 2).mean() / 0.2)
    torch.testing.assert_close(model.score(x, h), dist - model.radius ** 2)
    # validation / scoring never moves R
    model.radius.fill_(0.5)
    with torch.no_grad():
        model.loss(x, model(x), epoch=5)
    model.eval()
    model.loss(x, model(x), epoch=5)
    assert float(model.radius) == 0.5


def test_bad_inputs_raise_clear_errors() -> None:
    model = DeepSVDD(4, hidden=8, n_layers=1, rep_dim=3)
    x = torch.rand(2, 10, 4)
    with pytest.raises(ValueError, match="on_fit_start"):
        model.score(x, model(x))
    with pytest.raises(ValueError, match=r"\[B, T, 4\]"):
        model(torch.rand(2, 10, 5))
    with pytest.raises(ValueError, match="objective"):
        DeepSVDD(4, objective="hard-boundary")
    with pytest.raises(ValueError, match="nu"):
        DeepSVDD(4, nu=0.0)
    with pytest.raises(ValueError, match="no training windows"):
        model.on_fit_start([])


@pytest.mark.parametrize("wrapped", [False, True])
def test_short_training_separates_synthetic_anomalies(wrapped: bool) -> None:
    res = train_on_synthetic("deepsvdd", wrapped, **TRAIN)
    assert all(math.isfinite(v) for log in res.losses for v in log.values())
    # the summed objective falls; wrapped, the head's pull to its own centre can raise the svdd term
    assert res.losses[-1]["total"] < res.losses[0]["total"]
    assert res.auroc > AUROC_BOUND, res.auroc


@pytest.mark.parametrize("wrapped", [False, True])
def test_seeded_runs_give_identical_scores(wrapped: bool) -> None:
    kw = dict(TRAIN, epochs=1, n_train=600, n_test=500, seed=3)
    a = train_on_synthetic("deepsvdd", wrapped, **kw)
    b = train_on_synthetic("deepsvdd", wrapped, **kw)
    assert np.array_equal(a.scores, b.scores)
    assert a.losses == b.losses

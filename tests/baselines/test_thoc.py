"""THOC baseline and adapter: size, dilated RNN, clustering, losses, k-means, annealing, training."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

import adapters
from baselines.thoc import THOC, DilatedRNNLayer
from benchmarks.synthetic import make_synthetic
from tests.helpers import point_scores, train_on_synthetic, windows

SMALL = dict(hidden=16, n_clusters=3)


def small_model(n_channels: int = 5, seed: int = 0, **kw) -> THOC:
    torch.manual_seed(seed)
    return THOC(n_channels, **{**SMALL, **kw})


@pytest.mark.parametrize("n_channels, n_params", [(55, 497_664), (25, 470_784)])
def test_reference_config_shapes_and_parameter_count(n_channels: int, n_params: int) -> None:
    torch.manual_seed(0)
    model = adapters.get("thoc").build(n_channels)
    assert sum(p.numel() for p in model.parameters()) == n_params
    # LSTM 3x128 (first layer sees C), centres 3x6x128, transforms, bias-free TSS heads, 2 join layers
    H, C = 128, n_channels
    assert n_params == (4 * (H * (C + H) + 2 * H) + 2 * 4 * (2 * H * H + 2 * H) + 3 * 6 * H
                        + 3 * (H * H + H) + 3 * H * C + 2 * (2 * H * H + H))
    x = torch.rand(4, 100, n_channels)
    with torch.no_grad():
        out = model(x)
        score = model.score(x, out)
        terms = model.loss(x, out)
    assert out.f_hat.shape == (4, 100, 6, 128) and out.R.shape == (4, 100, 6)
    assert [f.shape for f in out.layers] == [(4, 100, 128)] * 3
    assert [g.shape[2] for g in out.fused] == [1, 6, 6]
    assert torch.allclose(out.R.sum(-1), torch.ones(4, 100), atol=1e-5)
    assert score.shape == (4, 100) and (score >= 0).all() and (score <= 1).all()
    assert set(terms) == {"thoc", "orth", "tss"} and all(torch.isfinite(v) for v in terms.values())


def test_wrapping_adds_d_plus_one_at_the_last_dilated_layer() -> None:
    adapter = adapters.get("thoc")
    torch.manual_seed(0)
    model = adapter.build(55)
    n_plain = sum(p.numel() for p in model.parameters())
    x = torch.rand(2, 100, 55)
    with torch.no_grad():
        plain = model(x)
    wrapped = adapter.wrap(model)
    assert sum(p.numel() for p in wrapped.parameters()) - n_plain == 128 + 1
    with torch.no_grad():
        out = wrapped(x)
    assert torch.equal(out.f_hat, plain.f_hat)  # the wrapper is a drop-in
    assert torch.equal(wrapped.hidden, out.layers[-1])  # f^L, [B, T, 128]
    assert torch.isfinite(wrapped.madcluster_loss()) and wrapped.head_score().shape == (2, 100)
    # another depth: the adapter follows the last layer
    two = adapter.wrap(adapter.build(8, hidden=16, dilations=(1, 2)))
    assert two.wrap_options()["hidden"] == "drnn.layers.1"


def test_dilated_layer_runs_interleaved_subsequences_causally() -> None:
    torch.manual_seed(0)
    layer = DilatedRNNLayer(3, 4, dilation=3)
    x = torch.randn(2, 11, 3)  # 11 is not a multiple of 3: padded at the end, then unpadded
    with torch.no_grad():
        y = layer(x)
        for j in range(3):  # sub-sequence j, j+3, j+6, ... is an ordinary LSTM run
            ref, _ = layer.rnn(x[:, j::3])
            assert torch.allclose(y[:, j::3], ref, atol=1e-6)
        x2 = x.clone()
        x2[:, 7:] += 5.0
        assert torch.equal(layer(x2)[:, :7], y[:, :7])  # no step sees the future
    assert y.shape == (2, 11, 4)


def test_hierarchical_clustering_follows_the_equations() -> None:
    model = small_model(tau=0.5)
    x = torch.rand(2, 12, 5)
    with torch.no_grad():
        out = model(x)
        # layer 1: assignment of f^1 to the centres, R^1 = P^1
        g0 = out.layers[0]
        cos0 = F.normalize(g0, dim=-1) @ F.normalize(model.centers[0], dim=-1).T
        P0 = torch.softmax(0.5 * (cos0 - 1) / 0.5, dim=-1)
        fhat0 = P0.unsqueeze(-1) * torch.relu(model.transforms[0](g0)).unsqueeze(2)
        # layer 2: fuse with f^2, assign every previous cluster, propagate R
        g1 = model.join[0](torch.cat([fhat0, out.layers[1].unsqueeze(2).expand_as(fhat0)], -1))
        assert torch.allclose(out.fused[1], g1, atol=1e-6)
        # R sums to one at the last layer and the score is sum_j R_j * 0.5 (1 - cos(f_hat_j, c_j))
        d = 0.5 * (1 - F.cosine_similarity(out.f_hat, model.centers[-1].expand_as(out.f_hat), dim=-1))
        assert torch.allclose(model.score(x, out), (out.R * d).sum(-1), atol=1e-6)
        assert torch.allclose(out.R.sum(-1), torch.ones(2, 12), atol=1e-6)


def test_loss_terms_match_their_definitions() -> None:
    model = small_model(lambda_orth=2.0, lambda_tss=10.0)
    x = torch.rand(3, 16, 5)
    out = model(x)
    terms = model.loss(x, out)
    assert torch.allclose(terms["thoc"], (out.R * model.distances(out)).mean())
    tss = sum(F.mse_loss(proj(f[:, :-s]), x[:, s:]) for f, proj, s in
              zip(out.layers, model.out_project, model.dilations)) / 3
    assert torch.allclose(terms["tss"], 10.0 * tss)
    with torch.no_grad():  # orthonormal centres: zero orthogonality loss
        for c in model.centers:
            c.copy_(torch.eye(16)[:3] * 2.5)
    assert model.loss(x, model(x))["orth"].abs() < 1e-7
    with torch.no_grad():  # identical rows: mean((11^T - I)^2) = (9 - 3) / 9 per layer
        for c in model.centers:
            c.copy_(torch.ones(3, 16))
    assert torch.allclose(model.loss(x, model(x))["orth"], torch.tensor(2.0 * 6 / 9))


def test_kmeans_init_places_centres_at_cluster_means() -> None:
    model = small_model(init_batches=2, kmeans_max_points=10_000)
    batches = [torch.rand(4, 20, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    before = [c.detach().clone() for c in model.centers]
    model.on_fit_start(batches)
    assert bool(model.centers_initialised)
    with torch.no_grad():
        feats = torch.cat([model(b).fused[0].reshape(-1, 16) for b in batches[:2]])
    c = model.centers[0].detach()
    nearest = torch.cdist(feats, c).argmin(1)
    for j in range(c.shape[0]):  # k-means fixed point: every centre is the mean of its points
        assert torch.allclose(c[j], feats[nearest == j].mean(0), atol=1e-4)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.centers))
    after = [c.detach().clone() for c in model.centers]
    model.on_fit_start(batches)  # a second call leaves initialised centres alone
    assert all(torch.equal(a, b) for a, b in zip(after, model.centers))
    with pytest.raises(ValueError, match="no training batches"):
        small_model().on_fit_start([])


def test_tau_annealing_schedule_and_checkpoint() -> None:
    model = small_model()
    for epoch in range(15):
        model.on_epoch_end(epoch)
    assert float(model.tau) == pytest.approx(100.0 * (2 / 3) ** 3, rel=1e-6)
    for epoch in range(15, 1000):
        model.on_epoch_end(epoch)
    assert float(model.tau) == pytest.approx(1 / 300, rel=1e-6)  # the floor
    fresh = small_model(seed=1)
    fresh.load_state_dict(model.state_dict())
    assert float(fresh.tau) == pytest.approx(1 / 300, rel=1e-6)


def test_adapter_phases_split_the_join_layers() -> None:
    adapter = adapters.get("thoc")
    model = adapter.build(5, **SMALL)
    phases = adapter.phase_parameters(model)
    assert set(phases) == {"main", "join"}
    assert sum(p.numel() for p in phases["join"]) == 2 * (32 * 16 + 16)
    assert sum(p.numel() for ps in phases.values() for p in ps) == sum(p.numel() for p in model.parameters())
    wrapped = adapter.wrap(model)
    opts = adapter.optimizers(wrapped, 1e-3)
    head_ids = {id(p) for p in wrapped.head.parameters()}
    assert head_ids <= {id(p) for g in opts["main"].param_groups for p in g["params"]}
    logs = adapter.train_step(wrapped, torch.rand(4, 20, 5), opts, epoch=0)
    assert {"thoc", "orth", "tss", "madcluster", "total"} <= set(logs)
    assert set(adapter.phase_parameters(adapter.build(5, hidden=8, dilations=(1,), n_clusters=2))) == {"main"}


def test_training_plain_separates_anomalies() -> None:
    """THOC's own score is weak after a short run: its last-layer features collapse onto the
    centres (score spread across windows ~1e-4), the failure MADCluster targets. The bound still
    fails a broken or untrained model (0.51 untrained, 0.41 sign-flipped); the dilated RNN itself
    must have learned its multi-resolution prediction task (one-step TSS error separates anomalies).
    """
    res = train_on_synthetic("thoc", wrapped=False, build=dict(hidden=32), epochs=3)
    assert all(math.isfinite(v) for log in res.losses for v in log.values())
    assert res.losses[-1]["tss"] < 0.5 * res.losses[0]["tss"]
    assert res.auroc > 0.56, res.auroc
    data = make_synthetic(n_channels=8, n_train=3000, n_test=2000, seed=0)  # the helper's test split
    x = windows(data.test, 100, 50)
    model = res.model
    with torch.no_grad():
        f1 = model(x).layers[0]
        err = ((model.out_project[0](f1[:, :-1]) - x[:, 1:]) ** 2).mean(-1)
    err = torch.cat([err[:, :1], err], dim=1)  # step 0 has no prediction: repeat step 1's error
    assert roc_auc_score(data.test_labels, point_scores(err, len(data.test), 100, 50)) > 0.65


def test_training_wrapped_separates_anomalies() -> None:
    res = train_on_synthetic("thoc", wrapped=True, build=dict(hidden=32), epochs=3)
    assert all(math.isfinite(v) for log in res.losses for v in log.values())
    assert "madcluster" in res.losses[-1]
    assert res.auroc > 0.56, res.auroc


def test_seeded_runs_give_identical_scores() -> None:
    adapter = adapters.get("thoc")
    x = torch.rand(6, 20, 5, generator=torch.Generator().manual_seed(1))
    scores = []
    for _ in range(2):
        torch.manual_seed(3)
        model = adapter.wrap(adapter.build(5, **SMALL))
        model.backbone.on_fit_start([x])
        opts = adapter.optimizers(model, 1e-3)
        for _ in range(2):
            adapter.train_step(model, x, opts, epoch=0)
        model.eval()
        scores.append(adapter.score(model, x, combine="product"))
    assert torch.equal(scores[0], scores[1])


def test_bad_inputs_fail_with_clear_errors() -> None:
    model = small_model()
    with pytest.raises(ValueError, match=r"\[B, T, 5\]"):
        model(torch.rand(2, 20, 4))
    with pytest.raises(ValueError, match="largest dilation"):
        model(torch.rand(2, 4, 5))
    with pytest.raises(ValueError, match="n_clusters"):
        THOC(5, n_clusters=(2, 3))
    with pytest.raises(ValueError, match="unknown THOC build overrides"):
        adapters.get("thoc").build(5, hiden=16)

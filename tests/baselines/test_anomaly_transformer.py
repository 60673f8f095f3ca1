"""AnomalyTransformer baseline and adapter: official size, anomaly attention, minimax, score, training."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import adapters
from baselines.anomaly_transformer import AnomalyTransformer, row_kl
from tests.helpers import train_on_synthetic

SMALL = dict(d_model=32, n_heads=4, n_layers=2, d_ff=32)
# The reference temperature (50) makes the window softmax nearly one-hot after a short training
# (max weight ~0.97 per window), so a 3-epoch run can only be judged with a softer one.
TRAIN = dict(d_model=64, n_heads=4, d_ff=64, temperature=0.05)


def small_model(n_channels: int = 5, window: int = 20, seed: int = 0, **kw) -> AnomalyTransformer:
    torch.manual_seed(seed)
    return AnomalyTransformer(n_channels, window=window, **{**SMALL, **kw})


@pytest.mark.parametrize("n_channels, n_params", [(55, 4_863_055), (25, 4_801_585)])
def test_official_config_shapes_and_parameter_count(n_channels: int, n_params: int) -> None:
    torch.manual_seed(0)
    model = adapters.get("anomaly_transformer").build(n_channels)
    assert sum(p.numel() for p in model.parameters()) == n_params
    x = torch.rand(4, 100, n_channels)
    with torch.no_grad():
        out = model(x)
        score = model.score(x, out)
    assert out.recon.shape == (4, 100, n_channels)
    assert len(out.series) == len(out.prior) == len(out.sigma) == 3
    assert out.series[0].shape == out.prior[0].shape == (4, 8, 100, 100)
    assert out.sigma[0].shape == (4, 8, 100)
    assert score.shape == (4, 100) and torch.isfinite(score).all() and (score >= 0).all()
    # parameter formula of BASELINES.md section 10 (three LayerNorms per layer, one unused)
    d, h, ff, L, C = 512, 8, 512, 3, n_channels
    per_layer = 4 * (d * d + d) + d * h + h + 2 * d * ff + ff + d + 6 * d
    assert n_params == 3 * d * C + L * per_layer + 2 * d + d * C + C


def test_wrapping_adds_d_plus_one_and_captures_final_layernorm_output() -> None:
    adapter = adapters.get("anomaly_transformer")
    torch.manual_seed(0)
    model = adapter.build(55)
    n_plain = sum(p.numel() for p in model.parameters())
    x = torch.rand(2, 100, 55)
    with torch.no_grad():
        plain = model(x)
    wrapped = adapter.wrap(model)
    assert sum(p.numel() for p in wrapped.parameters()) - n_plain == 512 + 1
    seen = {}
    handle = model.encoder.norm.register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
    with torch.no_grad():
        out = wrapped(x)
    handle.remove()
    assert torch.equal(out.recon, plain.recon)  # the wrapper is a drop-in
    assert wrapped.hidden.shape == (2, 100, 512)
    assert torch.equal(wrapped.hidden, seen["h"])  # after the final LayerNorm ...
    assert torch.allclose(model.projection(wrapped.hidden), out.recon)  # ... before the projection
    assert torch.isfinite(wrapped.madcluster_loss())
    assert wrapped.head_score().shape == (2, 100)


def test_prior_is_the_row_normalised_gaussian_of_the_reference() -> None:
    model = small_model(window=30)
    x = torch.rand(3, 24, 5)  # a window shorter than the built one is allowed
    with torch.no_grad():
        out = model(x)
    for p, s, sigma in zip(out.prior, out.series, out.sigma):
        assert torch.allclose(p.sum(-1), torch.ones(3, 4, 24), atol=1e-5)
        assert torch.allclose(s.sum(-1), torch.ones(3, 4, 24), atol=1e-5)
        assert (sigma > 0).all() and (sigma <= 2.0 + 1e-4).all()  # 3^(sigmoid + 1e-5) - 1 in (0, 2]
        i = torch.arange(24.0)
        dist = (i[:, None] - i[None, :]).abs()
        sg = sigma.unsqueeze(-1)
        dens = torch.exp(-dist ** 2 / (2 * sg ** 2)) / (math.sqrt(2 * math.pi) * sg)  # N(|i-j|; 0, sigma_i)
        assert torch.allclose(p, dens / dens.sum(-1, keepdim=True), atol=1e-5)


def test_minimax_stop_gradients_and_single_backward() -> None:
    model = small_model()
    x = torch.rand(4, 20, 5)
    out = model(x)
    terms = model.loss(x, out)
    assert set(terms) == {"max", "min"}
    rec = F.mse_loss(out.recon, x)
    sig = model.encoder.layers[0].attention.sigma_projection.weight
    q = model.encoder.layers[-1].attention.query.weight  # feeds no later prior
    g_max_sigma, g_max_q = torch.autograd.grad(terms["max"], [sig, q], retain_graph=True, allow_unused=True)
    g_min_sigma, g_min_q = torch.autograd.grad(terms["min"], [sig, q], retain_graph=True, allow_unused=True)
    g_rec_q, = torch.autograd.grad(rec, [q], retain_graph=True)
    # the prior (sigma) learns only in the minimise phase; the last layer's series (Q, K) sees only
    # the reconstruction there, and the discrepancy only in the maximise phase
    assert g_max_sigma is None and g_min_sigma.abs().sum() > 0
    assert torch.allclose(g_min_q, g_rec_q, atol=1e-7)
    assert not torch.allclose(g_max_q, g_rec_q, atol=1e-5)
    # the values agree on both sides: max = rec - k AssDis, min = rec + k AssDis
    assdis = (terms["min"] - terms["max"]) / (2 * model.k)
    assert torch.allclose((terms["min"] + terms["max"]) / 2, rec, atol=1e-6)
    assert assdis > 0
    # one backward of the sum == the reference's two accumulated backward calls
    params = [p for p in model.parameters() if p.requires_grad]
    summed = torch.autograd.grad(terms["max"] + terms["min"], params, retain_graph=True, allow_unused=True)
    first = torch.autograd.grad(terms["max"], params, retain_graph=True, allow_unused=True)
    second = torch.autograd.grad(terms["min"], params, allow_unused=True)
    for s, a, b in zip(summed, first, second):
        if s is None:
            assert a is None and b is None
            continue
        ref = (a if a is not None else 0) + (b if b is not None else 0)
        assert torch.allclose(s, ref, atol=1e-6)


def test_score_matches_the_reference_formula() -> None:
    model = small_model(temperature=50.0)
    x = torch.rand(3, 20, 5)
    with torch.no_grad():
        out = model(x)
        score = model.score(x, out)
    # reference test(): per layer, temperature * (KL(S||P) + KL(P||S)), eps 1e-4 inside the logs
    def kl(p, q):
        return (p * (torch.log(p + 1e-4) - torch.log(q + 1e-4))).sum(-1).mean(1)
    dis = sum(50.0 * kl(s, p) + 50.0 * kl(p, s) for s, p in zip(out.series, out.prior))
    ref = torch.softmax(-dis, dim=-1) * ((x - out.recon) ** 2).mean(-1)
    assert torch.allclose(score, ref, atol=1e-7)
    assert torch.allclose(row_kl(out.prior[0], out.prior[0]), torch.zeros(3, 20), atol=1e-6)
    # softmax over time: the weights of one window sum to 1, so the score is at most the window's max error
    err = ((x - out.recon) ** 2).mean(-1)
    assert (score.sum(-1) <= err.max(-1).values + 1e-7).all()


def test_adapter_train_step_logs_and_updates() -> None:
    adapter = adapters.get("anomaly_transformer")
    torch.manual_seed(0)
    model = adapter.build(5, window=20, **SMALL)
    opts = adapter.optimizers(model, 1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    logs = adapter.train_step(model, torch.rand(4, 20, 5), opts, epoch=0)
    assert {"max", "min", "total", "recon", "assdis"} <= set(logs)
    assert logs["total"] == pytest.approx(logs["max"] + logs["min"], rel=1e-6)
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert sum(changed) == len(changed) - 4  # all but the unused LayerNorm (weight, bias) of 2 layers


def test_training_plain_separates_anomalies() -> None:
    res = train_on_synthetic("anomaly_transformer", wrapped=False, build=TRAIN, epochs=3)
    assert all(math.isfinite(v) for log in res.losses for v in log.values())
    assert res.losses[-1]["recon"] < 0.5 * res.losses[0]["recon"]
    assert res.auroc > 0.68, res.auroc


def test_training_wrapped_separates_anomalies() -> None:
    res = train_on_synthetic("anomaly_transformer", wrapped=True, build=TRAIN, epochs=3)
    assert all(math.isfinite(v) for log in res.losses for v in log.values())
    assert "madcluster" in res.losses[-1]
    assert res.auroc > 0.68, res.auroc


def test_seeded_runs_give_identical_scores() -> None:
    adapter = adapters.get("anomaly_transformer")
    x = torch.rand(6, 20, 5, generator=torch.Generator().manual_seed(1))
    scores = []
    for _ in range(2):
        torch.manual_seed(3)
        model = adapter.wrap(adapter.build(5, window=20, **SMALL))
        opts = adapter.optimizers(model, 1e-3)
        for _ in range(2):
            adapter.train_step(model, x, opts, epoch=0)
        model.eval()
        scores.append(adapter.score(model, x, combine="product"))
    assert torch.equal(scores[0], scores[1])


def test_device_and_dtype_follow_the_module() -> None:
    model = small_model().double()
    out = model(torch.rand(2, 20, 5, dtype=torch.float64))
    assert out.recon.dtype == torch.float64 and out.prior[0].dtype == torch.float64


def test_bad_inputs_fail_with_clear_errors() -> None:
    model = small_model()
    with pytest.raises(ValueError, match=r"\[B, T, 5\]"):
        model(torch.rand(2, 20, 4))
    with pytest.raises(ValueError, match="window=30"):
        model(torch.rand(2, 30, 5))
    with pytest.raises(ValueError, match="divisible"):
        AnomalyTransformer(5, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown AnomalyTransformer build overrides"):
        adapters.get("anomaly_transformer").build(5, d_modle=64)

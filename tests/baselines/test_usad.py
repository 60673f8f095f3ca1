"""USAD baseline and adapter: shapes, parameter counts, losses, clean two-phase gradients, training."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import adapters
from adapters.usad import USADAdapter
from baselines.usad import USAD
from tests.helpers import n_params, train_on_synthetic

# Short synthetic runs. Seed 1's data is the discriminating one: there a constant
# reconstruction (0, 0.5 or 1) scores AUROC <= 0.535 and the per-position train mean 0.512,
# so only a model that learned the signal passes. One epoch (n = 1: both auto-encoders learn
# to reconstruct) because from n = 3 on the leak-free AE2 saturates (baselines/usad.py).
TRAIN = dict(build=dict(hidden_size=4), epochs=1, stride=5, lr=3e-3, seed=1)
# Measured with TRAIN: plain 0.767, wrapped 0.682 (combine="sum"); the same model untrained
# (epochs=0) gives 0.510 and a sign-flipped score 0.233.
PLAIN_BOUND = 0.70
WRAPPED_BOUND = 0.62


def usad_param_count(window: int, channels: int, hidden: int) -> int:
    """BASELINES.md section 10: E + 2D with w = T*C and z = T*h (weights plus biases)."""
    w, z = window * channels, window * hidden
    enc = w * (w // 2) + w // 2 + (w // 2) * (w // 4) + w // 4 + (w // 4) * z + z
    dec = z * (w // 4) + w // 4 + (w // 4) * (w // 2) + w // 2 + (w // 2) * w + w
    return enc + 2 * dec


@pytest.mark.parametrize("channels, expected", [(55, 98_002_125), (25, 30_489_375)])
def test_parameter_count_reference_config(channels: int, expected: int) -> None:
    # Reference sizes (hidden_size 100, z = 100 * 100): 98.0M at 100 x 55 (BASELINES.md 98.0M),
    # 30.5M at 100 x 25. Counted on the meta device: no memory is allocated.
    assert usad_param_count(100, channels, 100) == expected
    with torch.device("meta"):
        model = adapters.get("usad").build(channels)
    assert n_params(model) == expected


@pytest.mark.parametrize("channels", [55, 25])
def test_shapes_reference_config(channels: int) -> None:
    torch.manual_seed(0)
    model = adapters.get("usad").build(channels)
    x = torch.rand(4, 100, channels)
    with torch.no_grad():
        out = model(x)
    assert out.z.shape == (4, 100, 100)
    assert bool((out.z >= 0).all())  # ReLU latent
    for w in (out.w1, out.w2, out.w3):
        assert w.shape == (4, 100, channels)
        assert bool(((w > 0) & (w < 1)).all())  # sigmoid output for min-max data
    assert model.score(x, out).shape == (4, 100)
    assert set(model.loss(x, out, 0)) == {"ae1", "ae2"}


def test_small_odd_sizes_and_flat_latent() -> None:
    # w = 7 * 3 = 21: layers 21 -> 10 -> 5 -> 7*2 (floor, as the reference's int(w/2)).
    model = USAD(3, window=7, hidden_size=2)
    assert [m.out_features for m in model.encoder.layers if isinstance(m, torch.nn.Linear)] == [10, 5, 14]
    x = torch.rand(5, 7, 3)
    seen = []
    handle = model.encoder.layers.register_forward_hook(lambda m, a, o: seen.append(o))
    out = model(x)
    handle.remove()
    assert len(seen) == 2  # E runs on W and on W1
    assert torch.equal(seen[0], out.z.flatten(1))


def test_loss_terms_follow_the_epoch_weights() -> None:
    torch.manual_seed(0)
    model = USAD(4, window=10, hidden_size=3)
    x = torch.rand(6, 10, 4)
    out = model(x)
    mse = [torch.mean((x - w) ** 2) for w in (out.w1, out.w2, out.w3)]
    first = model.loss(x, out, 0)  # n = 1: plain reconstruction
    assert torch.allclose(first["ae1"], mse[0]) and torch.allclose(first["ae2"], mse[1])
    later = model.loss(x, out, 3)  # n = 4
    assert torch.allclose(later["ae1"], mse[0] / 4 + 0.75 * mse[2])
    assert torch.allclose(later["ae2"], mse[1] / 4 - 0.75 * mse[2])


def test_score_is_per_point_weighted_errors() -> None:
    torch.manual_seed(0)
    model = USAD(4, window=10, hidden_size=3, alpha=0.2, beta=0.8)
    x = torch.rand(2, 10, 4)
    out = model(x)
    err1 = ((x - out.w1) ** 2).mean(-1)
    err3 = ((x - out.w3) ** 2).mean(-1)
    assert torch.allclose(model.score(x, out), 0.2 * err1 + 0.8 * err3)
    # A per-point error stays at its time step (no window averaging).
    x2 = x.clone()
    x2[0, 4] += 5.0
    delta = model.score(x2, out) - model.score(x, out)
    assert delta[0, 4] > 1.0 and torch.count_nonzero(delta) == 1


def test_wrapping_adds_exactly_d_plus_one_and_sees_the_real_input() -> None:
    torch.manual_seed(0)
    adapter = USADAdapter()
    model = adapter.build(8, hidden_size=6)
    base = n_params(model)
    x = torch.rand(3, 100, 8)
    per_step = adapter.wrap(model)
    assert n_params(per_step) == base + 6 + 1
    out = per_step(x)
    assert torch.equal(per_step.hidden, out.z)  # the call on W (capture="first"), not on W1
    assert per_step.head_score().shape == (3, 100)
    assert torch.isfinite(per_step.madcluster_loss())
    per_step.unwrap()
    window = adapter.wrap(model, attach="window")
    assert n_params(window) == base + 100 * 6 + 1
    out = window(x)
    assert torch.equal(window.hidden, out.z.reshape(3, 1, 600))
    assert window.head_score().shape == (3, 1)


def test_second_phase_gradients_hold_no_first_phase_leftovers() -> None:
    """At each optimiser step the gradients equal a fresh backward of that phase's loss alone."""
    torch.manual_seed(0)
    adapter = USADAdapter()
    model = adapter.build(4, window=10, hidden_size=3)
    opts = adapter.optimizers(model, 1e-3)
    x = torch.rand(6, 10, 4)
    epoch = 2  # n = 3: the adversarial W3 terms are active in both phases
    seen: dict[str, tuple[dict[str, torch.Tensor], torch.nn.Module]] = {}

    def recorder(phase: str):
        def hook(optimizer, args, kwargs):
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            seen[phase] = (grads, copy.deepcopy(model))  # parameters as they were for this phase
        return hook

    for phase, opt in opts.items():
        opt.register_step_pre_hook(recorder(phase))
    for _ in range(2):  # the second step would also see leftovers of the first step's ae2
        adapter.train_step(model, x, opts, epoch)
        for phase, (grads, snapshot) in seen.items():
            snapshot.zero_grad(set_to_none=True)
            snapshot.loss(x, snapshot(x), epoch)[phase].backward()
            fresh = {n: p.grad for n, p in snapshot.named_parameters() if p.grad is not None}
            assert grads.keys() == fresh.keys()
            for name in fresh:
                assert torch.allclose(grads[name], fresh[name], rtol=1e-5, atol=1e-8), (phase, name)
    # The leftovers the fix removes are real: the ae1 loss does send gradients into decoder2
    # (through W3), and the ae2 loss into decoder1 (through W1).
    ae1_grads, _ = seen["ae1"]
    ae2_grads, _ = seen["ae2"]
    assert ae1_grads["decoder2.layers.0.weight"].abs().sum() > 0
    assert ae2_grads["decoder1.layers.0.weight"].abs().sum() > 0


def test_phase_parameters() -> None:
    adapter = USADAdapter()
    model = adapter.build(4, window=10, hidden_size=3)
    groups = {k: {id(p) for p in v} for k, v in adapter.phase_parameters(model).items()}
    enc = {id(p) for p in model.encoder.parameters()}
    assert groups["ae1"] == enc | {id(p) for p in model.decoder1.parameters()}
    assert groups["ae2"] == enc | {id(p) for p in model.decoder2.parameters()}
    wrapped = adapter.wrap(model)
    opts = adapter.optimizers(wrapped, 1e-3)
    head = {id(p) for p in wrapped.head.parameters()}
    in_ae1 = {id(p) for g in opts["ae1"].param_groups for p in g["params"]}
    in_ae2 = {id(p) for g in opts["ae2"].param_groups for p in g["params"]}
    assert head <= in_ae1 and not head & in_ae2  # the head joins the phase training E on W


def test_bad_inputs_fail_clearly() -> None:
    model = USAD(4, window=10, hidden_size=3)
    with pytest.raises(ValueError, match=r"\[B, 10, 4\]"):
        model(torch.rand(2, 10, 5))
    with pytest.raises(ValueError, match="sum to 1"):
        USAD(4, alpha=0.7, beta=0.7)
    with pytest.raises(ValueError, match="hidden_size"):
        USAD(4, hidden_size=0)
    with pytest.raises(ValueError, match="window \\* n_channels"):
        USAD(1, window=2)
    with pytest.raises(ValueError, match="attach"):
        USADAdapter().wrap(model, attach="latent")
    with pytest.raises(ValueError, match="0-based"):
        model.loss(torch.rand(1, 10, 4), model(torch.rand(1, 10, 4)), -1)


def test_training_plain_separates_anomalies() -> None:
    result = train_on_synthetic("usad", wrapped=False, **TRAIN)
    assert result.auroc > PLAIN_BOUND, result.auroc


def test_training_wrapped_separates_anomalies() -> None:
    result = train_on_synthetic("usad", wrapped=True, **TRAIN)
    assert all(np.isfinite(v) for logs in result.losses for v in logs.values())
    assert result.auroc > WRAPPED_BOUND, result.auroc
    x = torch.rand(4, 100, 8)
    assert np.isfinite(USADAdapter().validation_loss(result.model, x))


def test_seeded_runs_are_identical() -> None:
    # Three epochs (n = 1, 2, 3: the adversarial phases run) at a coarse stride; finite losses.
    kw = dict(build=dict(hidden_size=4), epochs=3, stride=20, lr=3e-3, seed=0)
    a = train_on_synthetic("usad", wrapped=True, **kw)
    b = train_on_synthetic("usad", wrapped=True, **kw)
    assert np.array_equal(a.scores, b.scores)
    assert [l["ae2"] for l in a.losses] == [l["ae2"] for l in b.losses]

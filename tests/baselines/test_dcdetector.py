"""DCdetector baseline and adapter: sizes, exactness against the straightforward computation, the
in-patch time mapping, the per-point score, training (plain and wrapped), determinism."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import adapters
from adapters.dcdetector import ATTACH_POINTS
from baselines.dcdetector import (DCdetector, DroppedBilinearLogits, SoftmaxDropout, inpatch_tokens, keep_mask,
                                  normalize_window, patch_tokens)
from benchmarks.dcdetector_speed import reference_loss, reference_maps, reference_score
from benchmarks.synthetic import make_synthetic
from tests.helpers import n_params, train_on_synthetic, windows


def formula_params(c: int, window: int = 100, patches=(2, 5, 10), d: int = 256, layers: int = 3) -> int:
    """BASELINES.md section 10: 3d(C + sum p + sum T/p) + L(4d^2 + 6d) + 2d + dC + C."""
    return (3 * d * (c + sum(patches) + sum(window // p for p in patches)) + layers * (4 * d * d + 6 * d)
            + 2 * d + d * c + c)


# ---- sizes and shapes -----------------------------------------------------------------------
def test_parameter_counts_match_the_released_configuration():
    adapter = adapters.get("dcdetector")
    model = adapter.build(55)
    assert n_params(model) == 922_423 == formula_params(55)
    for attach in ATTACH_POINTS:
        wrapped = adapter.wrap(adapter.build(55), attach=attach)
        assert n_params(wrapped) == 922_680  # + D + 1 = 257 (centre and nu)
    assert n_params(adapter.build(25)) == formula_params(25)


@pytest.mark.parametrize("channels", [55, 25])
def test_shapes_plain_and_wrapped(channels):
    torch.manual_seed(0)
    adapter = adapters.get("dcdetector")
    x = torch.randn(4, 100, channels)
    model = adapter.build(channels)
    out = model(x)
    for p, s, n in zip((2, 5, 10), out.series, out.prior):
        assert s.shape == (4, 3, 1, 100 // p, 100 // p) and n.shape == (4, 3, 1, p, p)
    terms = model.loss(x, out, 0)
    assert set(terms) == {"prior", "series"} and all(t.dim() == 0 and torch.isfinite(t) for t in terms.values())
    score = model.score(x, out)
    assert score.shape == (4, 100) and torch.isfinite(score).all()
    for attach in ATTACH_POINTS:
        wrapped = adapter.wrap(adapter.build(channels), attach=attach)
        assert n_params(wrapped) - n_params(wrapped.backbone) == 256 + 1
        wrapped(x)
        assert wrapped.hidden.shape == (4, 100, 256)
        assert wrapped.head_score().shape == (4, 100)
        assert torch.isfinite(wrapped.madcluster_loss())


# ---- exactness against the straightforward (released-order) computation -------------------
@pytest.mark.parametrize("d_model,n_heads,inpatch,training", [
    (64, 1, "strided", True),      # every token set through the input-space path
    (16, 1, "strided", False),     # mixed: small d sends the in-patch tokens through the dense path
    (16, 2, "contiguous", True),   # multi-head dense path, the other consistent layout
    (64, 1, "contiguous", False),
])
def test_maps_losses_gradients_scores_equal_the_straightforward_computation(d_model, n_heads, inpatch, training):
    torch.manual_seed(1)
    model = DCdetector(3, window=20, patch_sizes=(2, 5), d_model=d_model, n_heads=n_heads, e_layers=2,
                       inpatch=inpatch)
    model.train(training)
    x = torch.randn(4, 20, 3) * 2 + 1
    out = model(x)
    series, prior = model.upsampled_maps(out)
    ref_series, ref_prior, _ = reference_maps(model, x)
    for i in range(2):
        for layer in range(2):
            torch.testing.assert_close(series[i][:, layer], ref_series[2 * i + layer], rtol=0, atol=1e-6)
            torch.testing.assert_close(prior[i][:, layer], ref_prior[2 * i + layer], rtol=0, atol=1e-6)
    terms = model.loss(x, out, 0)
    ref_prior_loss, ref_series_loss = reference_loss(ref_series, ref_prior)
    torch.testing.assert_close(terms["prior"], ref_prior_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["series"], -ref_series_loss, rtol=1e-5, atol=1e-6)
    assert abs(float((terms["prior"] + terms["series"]).detach())) < 1e-5  # the reference's loss value is 0
    params = [p for p in model.parameters()]
    ours = torch.autograd.grad(sum(terms.values()), params, allow_unused=True, retain_graph=True)
    ref = torch.autograd.grad(ref_prior_loss - ref_series_loss, params, allow_unused=True)
    for (name, p), g, r in zip(model.named_parameters(), ours, ref):
        g = torch.zeros_like(p) if g is None else g
        r = torch.zeros_like(p) if r is None else r
        torch.testing.assert_close(g, r, rtol=1e-4, atol=2e-7, msg=name)
    ref_score = reference_score(ref_series, ref_prior, model.temperature)
    torch.testing.assert_close(model.score(x, out), ref_score, rtol=2e-3, atol=1e-6)


def test_in_patch_attention_lands_on_the_right_time_pairs():
    """x_t = t makes every time's token readable; each up-sampled weight must be the token-level
    weight of the two times' own tokens. The released layout (contiguous tokens, tiled map) is not."""
    torch.manual_seed(0)
    p, window = 3, 12
    x = torch.arange(window, dtype=torch.float32).view(1, window, 1)
    for layout in ("strided", "contiguous"):
        model = DCdetector(1, window=window, patch_sizes=(p,), d_model=16, e_layers=1, normalize=False,
                           inpatch=layout).eval()
        with torch.no_grad():  # hand-set weights: q = k = 2 e, so each token attends most to itself
            for proj in (model.layers[0].query_projection, model.layers[0].key_projection):
                proj.weight.copy_(2.0 * torch.eye(16))
                proj.bias.zero_()
            model.inpatch_embeddings[0].conv.weight.zero_()  # position code only: rows differ by token
            out = model(x)
        tokens = inpatch_tokens(x, p, layout)[0]  # [p, n] time values
        token_of = {int(v): r for r in range(p) for v in tokens[r]}
        expected = {"strided": [t % p for t in range(window)],
                    "contiguous": [t // (window // p) for t in range(window)]}
        assert [token_of[t] for t in range(window)] == expected[layout]
        n_bar = out.prior[0][0, 0, 0]  # [p, p]
        assert torch.equal(n_bar.argmax(-1), torch.arange(p))  # distinct rows: diagonal maxima
        _, prior_up = model.upsampled_maps(out)
        mapped = n_bar[[token_of[a] for a in range(window)]][:, [token_of[b] for b in range(window)]]
        torch.testing.assert_close(prior_up[0][0, 0, 0], mapped, rtol=0, atol=0)
        patches = patch_tokens(x, p)[0]  # patch-wise: time a in patch a // p
        assert all(int(patches[a // p, a % p]) == a for a in range(window))
    released = reference_maps(model, x, inpatch="released")[1][0][0, 0]  # contiguous tokens, tiled
    assert not torch.allclose(released, mapped, atol=1e-3)


def test_score_is_per_point_and_not_constant():
    torch.manual_seed(0)
    model = DCdetector(4, window=20, patch_sizes=(2, 5), d_model=32, e_layers=2).eval()
    x = torch.randn(6, 20, 4)
    x[:, 7, 1] += 6.0  # a spike
    with torch.no_grad():
        score = model.score(x, model(x))
    # softmax over time: each window sums to 1, so a window mean would be the constant 1/T ...
    torch.testing.assert_close(score.sum(-1), torch.ones(6))
    # ... but the points differ, in every window
    assert (score.amax(-1) / score.amin(-1)).min() > 1.05
    assert (score.std(-1) / score.mean(-1)).min() > 0.01


def test_strided_discrepancy_is_a_patch_term_plus_an_in_patch_position_term():
    """Why the plain score says little: with consistent maps, per scale, the discrepancy of time
    a = i p + r is f(i) + g(r) exactly (the in-patch part is periodic in the window)."""
    torch.manual_seed(0)
    model = DCdetector(3, window=20, patch_sizes=(5,), d_model=32, e_layers=2).eval()
    with torch.no_grad():
        grid = model.discrepancy(model(torch.randn(4, 20, 3))).view(4, 4, 5)  # [B, n, p]
    residual = grid - grid.mean(1, keepdim=True) - grid.mean(2, keepdim=True) + grid.mean((1, 2), keepdim=True)
    assert residual.abs().max() < 1e-4 * grid.abs().max()
    assert grid.std() > 1e-3


def test_patch_representation_is_the_query_projected_patch_embeddings():
    torch.manual_seed(0)
    adapter = adapters.get("dcdetector")
    model = adapter.build(3, window=20, patch_sizes=(2, 5), d_model=16, e_layers=2)
    wrapped = adapter.wrap(model)  # default attachment: the trained representation
    x = torch.randn(2, 20, 3)
    wrapped(x)
    xn = normalize_window(x)
    expected = 0.0
    for i, p in enumerate(model.patch_sizes):
        e = model.patch_embeddings[i](patch_tokens(xn, p))  # [B*C, n, d]
        for layer in model.layers:
            q = layer.query_projection(e).view(2, 3, 20 // p, 16).mean(1)  # channel mean
            expected = expected + q.repeat_interleave(p, dim=1)
    torch.testing.assert_close(wrapped.hidden, expected / 4, rtol=1e-5, atol=1e-6)


def test_gradients_reach_what_each_attachment_point_says():
    torch.manual_seed(0)
    adapter = adapters.get("dcdetector")
    x = torch.randn(2, 20, 3)
    build = dict(window=20, patch_sizes=(2, 5), d_model=16, e_layers=2)
    for attach in ATTACH_POINTS:
        wrapped = adapter.wrap(adapter.build(3, **build), attach=attach)
        bb = wrapped.backbone
        out = wrapped(x)
        base = sum(bb.loss(x, out, 0).values())
        g_base = torch.autograd.grad(base, [bb.window_embedding.conv.weight], allow_unused=True)[0]
        assert g_base is None  # DCdetector's own loss never trains x_ori
        watched = [bb.window_embedding.conv.weight, bb.patch_embeddings[0].conv.weight,
                   bb.layers[0].query_projection.weight, bb.layers[0].key_projection.weight]
        grads = torch.autograd.grad(wrapped.madcluster_loss(), watched, allow_unused=True)
        reached = [g is not None and float(g.abs().max()) > 0 for g in grads]
        assert reached == ([True, False, False, False] if attach == "x_ori" else [False, True, True, False])


def test_embedding_dropout_path_trains_and_evaluation_is_exact():
    torch.manual_seed(0)
    kwargs = dict(window=20, patch_sizes=(2, 5), d_model=64, e_layers=2)
    model = DCdetector(3, dropout=0.1, **kwargs)
    x = torch.randn(4, 20, 3)
    out = model(x)  # training with embedding dropout: the dense bilinear path
    total = sum(model.loss(x, out, 0).values())
    total.backward()
    assert torch.isfinite(total) and model.patch_embeddings[0].conv.weight.grad.abs().max() > 0
    model.eval()
    twin = DCdetector(3, dropout=0.0, **kwargs).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.score(x, model(x)), twin.score(x, twin(x)), rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors():
    adapter = adapters.get("dcdetector")
    model = adapter.build(3, window=20, patch_sizes=(2, 5), d_model=16)
    with pytest.raises(ValueError, match=r"\[B, 20, 3\]"):
        model(torch.randn(2, 20, 4))
    with pytest.raises(ValueError, match=r"\[B, T, C\]"):
        model(torch.randn(20, 3))
    with pytest.raises(ValueError, match="divide the window"):
        DCdetector(3, window=20, patch_sizes=(3,))
    with pytest.raises(ValueError, match="distinct"):
        DCdetector(3, window=20, patch_sizes=(2, 2))
    with pytest.raises(ValueError, match="patch_sizes="):
        adapter.build(3, window=96)
    with pytest.raises(ValueError, match="unknown DCdetector build overrides"):
        adapter.build(3, patch_size=(2,))
    with pytest.raises(ValueError, match="attach="):
        adapter.wrap(model, attach="encoder")
    with pytest.raises(ValueError, match="inpatch="):
        DCdetector(3, window=20, patch_sizes=(2,), inpatch="interleaved")


# ---- training on the synthetic generator -----------------------------------------------------
BUILD = dict(d_model=64)


def _row_entropy(maps: list[torch.Tensor]) -> float:
    """Mean row entropy over scales, as a fraction of the uniform row's."""
    fractions = []
    for m in maps:
        m = m / m.sum(-1, keepdim=True)
        fractions.append(float(-(m * torch.log(m + 1e-12)).sum(-1).mean() / math.log(m.shape[-1])))
    return float(np.mean(fractions))


def test_plain_training_is_finite_but_does_not_separate_and_shows_why():
    """Plain DCdetector: finite (and identically zero) loss values, but a score at chance.

    The contrastive objective has no notion of normality: the patch-wise maps S are pushed away
    from the in-patch maps N, which follow; N stays uniform (in-patch position tokens of a smooth
    series look alike) and S sharpens for every patch, normal or not. The score, a softmax over the
    window of minus the discrepancy, then ranks points by how peaked their patch's attention is.
    """
    res = train_on_synthetic("dcdetector", False, build=BUILD, epochs=3, seed=0)
    assert all(abs(step["total"]) < 1e-4 for step in res.losses)  # prior = -series, as the reference
    assert np.std([step["prior"] for step in res.losses]) > 0.1  # but the terms do move
    assert 0.35 < res.auroc < 0.6  # documented failure: no separation (0.478 when written)
    torch.manual_seed(0)  # the same initial weights as the trained model
    initial = adapters.get("dcdetector").build(8, **BUILD).eval()
    data = make_synthetic(n_channels=8, n_train=3000, n_test=2000, seed=0)
    test_x = windows(data.test, 100, 50)
    with torch.no_grad():
        before, after = initial(test_x), res.model.eval()(test_x)
    assert _row_entropy(before.prior) > 0.98 and _row_entropy(after.prior) > 0.98  # N: uniform rows
    assert _row_entropy(before.series) > 0.95
    assert _row_entropy(after.series) < _row_entropy(before.series) - 0.05  # S: sharpened


@pytest.mark.parametrize("attach,bound", [("query", 0.66), ("x_ori", 0.65)])
def test_wrapped_training_separates_anomalies(attach, bound):
    res = train_on_synthetic("dcdetector", True, build=BUILD, head={"attach": attach}, epochs=6, seed=0)
    assert all(math.isfinite(v) for step in res.losses for v in step.values())
    assert res.losses[-1]["madcluster"] < res.losses[0]["madcluster"]
    # 0.734 (query) and 0.699 (x_ori) when written; the plain model scores 0.478 on the same data
    assert res.auroc > bound


def test_seeded_runs_give_identical_scores():
    kwargs = dict(build=dict(d_model=32, e_layers=2), head={"attach": "query"}, epochs=1,
                  n_train=800, n_test=600, seed=3)
    first = train_on_synthetic("dcdetector", True, **kwargs)
    second = train_on_synthetic("dcdetector", True, **kwargs)
    assert np.array_equal(first.scores, second.scores)
    assert first.losses == second.losses


def _dropped_reference(z, g, pos, a, w, keep, scale, batch):
    """The autograd composition DroppedBilinearLogits replaces (embedding, dropout, e A + w, keys)."""
    e = z @ g + pos
    e = e if keep is None else e * keep * scale
    fa = torch.einsum("nmd,kdf->nmkf", e, a) + w
    logits = torch.einsum("nikf,njf->nikj", fa, e)
    return logits, e.unflatten(0, (batch, -1)).mean(1)


@pytest.mark.parametrize("dropout", [True, False])
def test_dropped_bilinear_logits_match_autograd_and_pass_gradcheck(dropout):
    """The single-head dense path keeps only a bool mask (or none) and ``e A``; its maps equal the
    composition's (logits differ only by terms constant along the softmax axis) and so do all
    gradients."""
    torch.manual_seed(0)
    n, m, y, d, k, batch = 8, 7, 6, 16, 3, 2
    dt = torch.float64
    inputs = [torch.randn(*s, dtype=dt, requires_grad=True) for s in ((n, m, y), (y, d), (m, d), (k, d, d), (k, d))]
    keep = keep_mask((n, m, d), 0.3) if dropout else None
    ours = lambda *t: DroppedBilinearLogits.apply(*t, keep, 1 / 0.7, batch)  # noqa: E731
    assert torch.autograd.gradcheck(ours, tuple(inputs))
    logits, mean = ours(*inputs)
    ref_logits, ref_mean = _dropped_reference(*inputs, keep, 1 / 0.7, batch)
    maps, ref_maps = torch.softmax(logits, -1), torch.softmax(ref_logits, -1)
    torch.testing.assert_close(maps, ref_maps, rtol=0, atol=1e-12)
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-12)
    probe = torch.randn_like(maps)
    grads = torch.autograd.grad((maps * probe).sum() + mean.square().sum(), inputs)
    ref_grads = torch.autograd.grad((ref_maps * probe).sum() + ref_mean.square().sum(), inputs)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_softmax_dropout_and_keep_mask():
    torch.manual_seed(0)
    x = torch.randn(5, 4, 6, dtype=torch.float64, requires_grad=True)
    keep = keep_mask(x.shape, 0.25)
    assert keep.dtype == torch.bool
    out = SoftmaxDropout.apply(x, keep, 1 / 0.75)
    torch.testing.assert_close(out, torch.softmax(x, -1) * keep / 0.75, rtol=0, atol=1e-15)
    assert torch.autograd.gradcheck(lambda t: SoftmaxDropout.apply(t, keep, 1 / 0.75), (x,))
    big = keep_mask((1000, 1000), 0.1)
    assert abs(float(big.float().mean()) - 0.9) < 5 * math.sqrt(0.09 / 1e6)  # 5 binomial sd


def test_dropout_training_path_is_wired_to_the_same_model(monkeypatch):
    """With every dropout mask forced to "keep" and p tiny (scale 1 + 1e-7), the training path with
    embedding dropout gives the maps, losses and gradients of the dropout-free model."""
    import baselines.dcdetector as dc

    monkeypatch.setattr(dc, "keep_mask", lambda shape, p, device="cpu": torch.ones(shape, dtype=torch.bool))
    torch.manual_seed(0)
    kwargs = dict(window=20, patch_sizes=(2, 5), d_model=64, e_layers=2)
    model, twin = DCdetector(3, dropout=1e-7, **kwargs), DCdetector(3, dropout=0.0, **kwargs)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(4, 20, 3)
    outs = [net(x) for net in (model, twin)]
    for a, b in zip(outs[0].series + outs[0].prior, outs[1].series + outs[1].prior):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    losses = [sum(net.loss(x, out, 0).values()) for net, out in zip((model, twin), outs)]
    for loss, net in zip(losses, (model, twin)):
        loss.backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-6, msg=name)

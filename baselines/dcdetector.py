"""DCdetector (a plain baseline; knows nothing about MADCluster).

Paper: Yiyuan Yang, Chaoli Zhang, Tian Zhou, Qingsong Wen, Liang Sun, "DCdetector: Dual Attention
Contrastive Representation Learning for Time Series Anomaly Detection", KDD 2023.

Reference followed: the official code, DAMO-DI-ML/KDD2023-DCdetector (``model/DCdetector.py``,
``model/attn.py``, ``model/embed.py``, ``solver.py``), in the configuration of MADCluster's variant
(SYLee1996/MADCluster, ``MADCluster/MADCluster_MODEL.py`` and its run script: window 100, patch
sizes 2/5/10, d_model 256, 1 head, 3 layers); BASELINES.md section 7. With 55 channels this is
exactly 922,423 parameters (BASELINES.md section 10).

Model. Channel independence: every channel of the (per-window normalised) window is split, for
each patch size ``p`` (``n = T / p``), into

* patch-wise tokens: ``n`` patches of ``p`` consecutive points, embedded by a circular Conv1d
  (``p -> d``, kernel 3, no bias) plus a fixed sinusoidal position code;
* in-patch tokens: ``p`` tokens, token ``r`` holding the points at in-patch position ``r`` of all
  ``n`` patches (times ``r, r + p, r + 2p, ...``), embedded by a Conv1d ``n -> d``.

Each of the ``L`` layers has its own query/key projections, shared by both token sets, and gives
the attention maps ``S = softmax(Q K^T / sqrt(E))`` (``[n x n]``) and ``N`` (``[p x p]``). The
layers do not feed into each other (there is no residual stream): each recomputes attention from
the same embeddings. The maps are averaged over channels and up-sampled to ``[T x T]``: ``S`` by
repeating every entry as a ``p x p`` block (time ``a`` belongs to patch ``a // p``), ``N`` by
tiling it ``n x n`` times (time ``a`` has in-patch position ``a mod p``).

Objective (contrastive, no negatives; stop-gradient ``sg``; ``N^`` = ``N`` with rows normalised;
row-wise smoothed KL averaged over heads, mean over windows, times and the ``|P| L`` map pairs)::

    series = KL(S || sg N^) + KL(sg N^ || S)      prior = KL(N^ || sg S) + KL(sg S || N^)
    loss   = prior - series                        (value identically 0; only the gradients differ)

``S`` keeps the reference's row sums (``p`` after up-sampling; only ``N`` is renormalised).

Score per point (the reference's ``test``): ``softmax_t(-temperature * sum_u [KL(S_u || N^_u) +
KL(N^_u || S_u)]_t)`` over the ``T`` points of each window, NOT averaged over the window (the
window mean of a softmax is the constant ``1/T``, which is what the released MADCluster code
ended up scoring: METHOD.md section 1.7).

What the score measures. The rows of a channel-averaged softmax sum to 1, so with the strided
layout the discrepancy of time ``a = i p + r`` is exactly ``f(i) + g(r)`` per scale and layer:
``f`` depends only on patch ``i``'s attention row (how peaked it is), ``g`` only on the in-patch
position ``r`` (the same in every patch). The objective has no notion of normality: it pushes
every ``S`` row away from ``N^``, which follows; in-patch tokens of a smooth series look alike, so
``N^`` stays uniform and ``S`` sharpens for normal and abnormal patches alike. On the synthetic
generator the plain score is at chance (tests/baselines/test_dcdetector.py); this is the
"collapse" reported on the reference (issues #5 and #29 of DAMO-DI-ML/KDD2023-DCdetector).

What we changed (and why):

* In-patch mapping bug fixed. The reference builds in-patch tokens from contiguous chunks
  (``'(p n) -> p n'``: time ``a`` sits in token ``a // n``) but up-samples their map by tiling,
  which reads row ``a mod p``: every in-patch attention weight lands on the wrong time pairs
  (BASELINES.md section 7, pitfalls). By default (``inpatch="strided"``) we keep the tiling,
  which is the paper's in-patch semantics (dependencies between positions inside a patch,
  repeated for every patch), and build the tokens to match it (``'(n p) -> p n'``, token
  ``a mod p``). ``inpatch="contiguous"`` keeps the reference's tokens and up-samples their map by
  ``n x n`` blocks instead (token ``a // n``); it makes the in-patch branch a coarse patch-wise
  branch (patch length ``n``).
* Plain per-window normalisation ``(x - mean_t) / sqrt(var_t + 1e-5)`` per channel instead of the
  reference's RevIN, which builds a new module in every forward and hard-codes the device
  (MADCluster's variant has no normalisation: ``normalize=False``).
* ``dropout`` defaults to 0.0, the DCdetector reference's value (MADCluster's variant hard-codes
  0.1; ``dropout=0.1`` reproduces it). It acts on the embeddings and the attention maps.
* Memory and speed, with the same numbers (tested against the straightforward computation of
  ``benchmarks/dcdetector_speed.py``):

  - channels are averaged before up-sampling (up-sampling is linear), and no ``[T x T]`` map is
    built, per channel or at all: a row-wise KL of two up-sampled maps is a within-row term
    (``p sum_k S_ik log(S_ik + eps)``, resp. ``n sum_j N^_rj log(N^_rj + eps)``) minus a cross term,
    a ``[n, T] x [T, p]`` product of the channel-averaged maps expanded along the key axis only.
    :meth:`DCdetector.upsampled_maps` builds the ``[T x T]`` maps on request;
  - the attention logits are a bilinear form of the embeddings, ``Q K^T = E (Wq^T Wk) E^T +
    1 (E Wk^T bq)^T`` (plus terms constant along the softmax axis, dropped), and without embedding
    dropout (the default, and always at evaluation) the embeddings are ``E = Z G + P`` (``Z`` the
    ``3f`` values under the conv kernel, ``G`` the conv weight, ``P`` the position code). The
    logits are then computed in the ``3f``-dimensional input space (``f`` the token length)
    instead of at ``d = 256``, so the per-token ``d x d`` query/key projections disappear (96% of
    the reference's multiply-adds at the released configuration; the discarded value projections
    below are another 3%). With embedding dropout active, the bilinear form still
    needs one ``d x d`` product per token instead of two (single head), and
    :class:`DroppedBilinearLogits` keeps only that product, the unfolded inputs and a bool mask
    for the backward pass (dropout masks are bool throughout: :func:`keep_mask`).
* Kept for the parameter count though no loss uses them (BASELINES.md section 7): the window
  embedding ``x_ori`` (``window_embedding``, the MADCluster code's attachment point, computed in
  every forward but never trained by the DCdetector loss), each layer's value and output
  projections and LayerNorm, the encoder LayerNorm and the final ``Linear(d -> C)``. The value
  projection of ``x_ori``, which the reference computes and discards, is not computed.
* The reference's lr halving per epoch and its test-set validation / threshold are protocol, not
  model; they live outside this module (BASELINES.md section 8).

Trained representation (an attachment point the DCdetector loss does shape): module
``patch_representation`` outputs, per point, the query-projected patch-wise embeddings averaged
over channels, up-sampled to ``T`` (each patch repeated ``p`` times), averaged over patch sizes and
layers, ``[B, T, d_model]``. All of these are linear, so it is computed as ``mean_p up(mean_c E_p)
@ mean_l(Wq_l)^T + mean_l(bq_l)`` at ``[B, T, d]`` cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from baselines.embedding import DataEmbedding

KL_EPS = 1e-4  # the reference's smoothing inside the logs
INPATCH_LAYOUTS = ("strided", "contiguous")
NORM_EPS = 1e-5  # the reference RevIN's variance floor


def normalize_window(x: Tensor, eps: float = NORM_EPS) -> Tensor:
    """Per-window, per-channel standardisation ``[B, T, C]`` (RevIN without the affine part)."""
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps)


def patch_tokens(x: Tensor, p: int) -> Tensor:
    """Patch-wise tokens: ``[B, T, C] -> [B*C, n, p]``; token ``i`` = times ``i p .. i p + p - 1``."""
    return rearrange(x, "b (n p) c -> (b c) n p", p=p)


def inpatch_tokens(x: Tensor, p: int, layout: str = "strided") -> Tensor:
    """In-patch tokens ``[B, T, C] -> [B*C, p, n]``.

    ``"strided"``: token ``r`` = times ``r, r + p, r + 2p, ...`` (in-patch position ``r`` of every
    patch); ``"contiguous"``: token ``r`` = times ``r n .. r n + n - 1`` (the reference's layout).
    """
    if layout == "strided":
        return rearrange(x, "b (n p) c -> (b c) p n", p=p)
    if layout == "contiguous":
        return rearrange(x, "b (p n) c -> (b c) p n", p=p)
    raise ValueError(f"in-patch layout {layout!r}; expected 'strided' or 'contiguous'")


def circular_unfold(u: Tensor) -> Tensor:
    """``[N, m, f] -> [N, m, 3f]``: the values under a circular kernel-3 conv, ``[u_{l-1}, u_l, u_{l+1}]``."""
    return torch.cat([u.roll(1, dims=1), u, u.roll(-1, dims=1)], dim=-1)


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device | str = "cpu") -> Tensor:
    """A dropout keep-mask: independent ``True`` with probability ``1 - p`` (bool, 1 byte/element)."""
    return torch.rand(shape, device=device) < (1.0 - p)


class DroppedBilinearLogits(torch.autograd.Function):
    """Attention logits of (dropped-out) token embeddings, keeping a bool mask instead of embeddings.

    ``apply(z [N, m, y], g [y, d], pos [m, d], a [K, d, d], w [K, d], keep [N, m, d] | None, scale,
    batch)`` with ``e = (z g + pos) * keep * scale`` (the conv embedding as a product on the
    unfolded values, then dropout; ``keep=None``: no dropout) returns ``logits [N, m, K, m]`` with ``logits[n, i, k, j] = e_i A_k e_j +
    w_k e_j`` (= ``Q K^T / sqrt(E)`` up to terms constant along the softmax axis) and the channel
    mean of ``e`` ``[batch, m, d]``. The same numbers as the autograd composition (tested), with
    the same three ``d x d`` products per token and map (``e A`` forward, ``e^T dG`` and ``dG A^T``
    backward), but it keeps only ``e A``, the inputs and the bool mask: ``e`` (cheap to recompute
    from the ``y``-dimensional unfolded values), the dropout noise as floats and per-map gradients
    of size ``[N, m, K, d]`` are never stored. With embedding dropout this takes a training step
    to 0.41x of the released computation's peak RSS, 0.33x of its step increment
    (docs/results/dcdetector-speed.md).
    """

    @staticmethod
    def _embed(z: Tensor, g: Tensor, pos: Tensor, keep: Tensor | None, scale: float) -> Tensor:
        n, m, y = z.shape
        e = (z.reshape(n * m, y) @ g).view(n, m, -1).add_(pos)
        return e if keep is None else e.mul_(keep).mul_(scale)

    @staticmethod
    def forward(ctx, z: Tensor, g: Tensor, pos: Tensor, a: Tensor, w: Tensor, keep: Tensor,
                scale: float, batch: int) -> tuple[Tensor, Tensor]:
        n, m, _ = z.shape
        k, d, _ = a.shape
        e = DroppedBilinearLogits._embed(z, g, pos, keep, scale)
        fa = (e.view(n * m, d) @ a.permute(1, 0, 2).reshape(d, k * d)).view(n, m * k, d)  # rows (i, k)
        logits = torch.bmm(fa, e.transpose(1, 2)).view(n, m, k, m)
        logits.add_((e @ w.T).transpose(1, 2).unsqueeze(1))  # the key-side term w_k e_j
        ctx.save_for_backward(z, g, pos, a, w, keep, fa)
        ctx.scale, ctx.batch = scale, batch
        return logits, e.view(batch, n // batch, m, d).mean(1)

    @staticmethod
    def backward(ctx, d_logits: Tensor, d_mean: Tensor) -> tuple[Tensor | None, ...]:
        z, g, pos, a, w, keep, fa = ctx.saved_tensors
        n, m, y = z.shape
        k, d, _ = a.shape
        e = DroppedBilinearLogits._embed(z, g, pos, keep, ctx.scale)
        e2 = e.view(n * m, d)
        dl = d_logits.contiguous()  # [n, m (i), k, m (j)]
        dc = dl.sum(1).transpose(1, 2).reshape(n * m, k)  # d/d(w_k e_j), rows (n, j)
        dw = dc.T @ e2
        de = (dc @ w).view(n, m, d)
        de.baddbmm_(dl.view(n, m * k, m).transpose(1, 2), fa)  # through the keys: sum_(i,k) dl fa_(i,k)
        da = torch.empty_like(a)
        de2 = de.view(n * m, d)
        for map_k in range(k):  # one map at a time: no [N, m, K, d] gradient is ever held
            dfa = torch.bmm(dl[:, :, map_k], e).view(n * m, d)  # d(e A_k), [n*m, d]
            torch.mm(e2.T, dfa, out=da[map_k])
            de2.addmm_(dfa, a[map_k].T)
        if d_mean is not None:
            de.view(ctx.batch, n // ctx.batch, m, d).add_(d_mean.unsqueeze(1), alpha=ctx.batch / n)
        if keep is not None:
            de.mul_(keep).mul_(ctx.scale)
        dz = (de2 @ g.T).view(n, m, y) if ctx.needs_input_grad[0] else None
        dg = z.reshape(n * m, y).T @ de2 if ctx.needs_input_grad[1] else None
        dpos = de.sum(0) if ctx.needs_input_grad[2] else None
        return dz, dg, dpos, da, dw, None, None, None


class SoftmaxDropout(torch.autograd.Function):
    """``softmax(x, -1) * keep * scale`` keeping the softmax output and a bool mask (not float noise)."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        y = torch.softmax(x, dim=-1)
        ctx.save_for_backward(y, keep)
        ctx.scale = scale
        return y * keep * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        y, keep = ctx.saved_tensors
        dy = grad * keep * ctx.scale
        return y * (dy - (dy * y).sum(-1, keepdim=True)), None, None


class DualAttentionLayer(nn.Module):
    """One layer's query/key projections, shared by the patch-wise and in-patch token sets.

    ``value_projection``, ``out_projection`` and ``norm`` exist in the reference but no loss uses
    them; they are kept (untrained) so the parameter count matches.
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.query_projection = nn.Linear(d_model, d_model)
        self.key_projection = nn.Linear(d_model, d_model)
        self.value_projection = nn.Linear(d_model, d_model)
        self.out_projection = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)


class PatchRepresentation(nn.Module):
    """Per-point representation the DCdetector loss trains (an attachment point for a head).

    ``forward(e_bar [B, T, d], wq [L, d, d], bq [L, d]) -> [B, T, d]``: the channel-averaged,
    up-sampled, patch-size-averaged patch-wise embeddings through the layer-averaged query
    projection (equal to averaging the per-layer query projections, by linearity).
    """

    def forward(self, e_bar: Tensor, wq: Tensor, bq: Tensor) -> Tensor:
        return F.linear(e_bar, wq.mean(0), bq.mean(0))


@dataclass
class DCdetectorOutput:
    """What :meth:`DCdetector.forward` returns.

    series: per patch size, channel-averaged patch-wise attention ``[B, L, H, n, n]``.
    prior:  per patch size, channel-averaged in-patch attention ``[B, L, H, p, p]``.
    (Up-sampled ``[B, L, H, T, T]`` maps: :meth:`DCdetector.upsampled_maps`.)
    """

    series: list[Tensor]
    prior: list[Tensor]


class DCdetector(nn.Module):
    """DCdetector with the fixes and the exact fast computation described in the module docstring.

    Args:
        n_channels:  C, input channels.
        window:      T, window length; every patch size must divide it.
        patch_sizes: the multi-scale patch sizes (MADCluster run config: 2, 5, 10).
        d_model:     embedding width d (256).
        n_heads:     attention heads H (1); must divide d_model.
        e_layers:    layers L (3).
        dropout:     dropout on embeddings and attention maps (0.0; MADCluster's variant 0.1).
        temperature: score temperature (50).
        normalize:   per-window standardisation of the input (True; False = MADCluster's variant).
        inpatch:     in-patch token layout, both with a consistent up-sampling (module docstring):
                     "strided" (the paper's in-patch positions, tiled) or "contiguous" (the
                     reference's tokens, block up-sampled).
    """

    def __init__(self, n_channels: int, window: int = 100, patch_sizes: tuple[int, ...] = (2, 5, 10),
                 d_model: int = 256, n_heads: int = 1, e_layers: int = 3, dropout: float = 0.0,
                 temperature: float = 50.0, normalize: bool = True, inpatch: str = "strided") -> None:
        super().__init__()
        patch_sizes = tuple(int(p) for p in patch_sizes)
        if n_channels < 1 or window < 1:
            raise ValueError(f"n_channels and window must be >= 1; got {n_channels}, {window}")
        distinct = len(set(patch_sizes)) == len(patch_sizes)
        if not patch_sizes or not distinct or any(p < 1 or window % p for p in patch_sizes):
            raise ValueError(
                f"the patch sizes must be distinct, >= 1 and divide the window {window}; got patch_sizes="
                f"{patch_sizes}. Pass patch_sizes=... made of distinct divisors of {window}")
        if d_model < 1 or n_heads < 1 or d_model % n_heads:
            raise ValueError(f"n_heads must divide d_model; got d_model={d_model}, n_heads={n_heads}")
        if e_layers < 1:
            raise ValueError(f"e_layers must be >= 1; got {e_layers}")
        if inpatch not in INPATCH_LAYOUTS:
            raise ValueError(f"inpatch={inpatch!r}; expected one of {INPATCH_LAYOUTS}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        self.n_channels, self.window, self.patch_sizes = n_channels, window, patch_sizes
        self.d_model, self.n_heads, self.e_layers = d_model, n_heads, e_layers
        self.dropout_p, self.temperature, self.normalize = float(dropout), float(temperature), normalize
        self.inpatch = inpatch
        for p in patch_sizes:  # time a -> flat index of (patch a // p, in-patch token) on an [n, p] grid
            t = torch.arange(window)
            token = t % p if inpatch == "strided" else t // (window // p)
            self.register_buffer(f"grid_index_{p}", (t // p) * p + token, persistent=False)
        self.patch_embeddings = nn.ModuleList(DataEmbedding(p, d_model, window // p, dropout) for p in patch_sizes)
        self.inpatch_embeddings = nn.ModuleList(
            DataEmbedding(window // p, d_model, p, dropout) for p in patch_sizes)
        self.window_embedding = DataEmbedding(n_channels, d_model, window, dropout)  # x_ori
        self.layers = nn.ModuleList(DualAttentionLayer(d_model, n_heads) for _ in range(e_layers))
        self.attn_dropout = nn.Dropout(dropout)
        self.encoder_norm = nn.LayerNorm(d_model)  # unused by any loss (reference parity)
        self.projection = nn.Linear(d_model, n_channels)  # unused by any loss (reference parity)
        self.patch_representation = PatchRepresentation()

    # ---- attention ----------------------------------------------------------------------
    def _bilinear(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Stacked projections: ``A [L*H, d, d]`` with ``Q K^T / sqrt(E) = E A E^T + 1 (E w)^T + c``,
        ``w [L*H, d]``, and the raw query weights ``[L, d, d]`` and biases ``[L, d]``."""
        L, H, d = self.e_layers, self.n_heads, self.d_model
        e = d // H
        wq = torch.stack([layer.query_projection.weight for layer in self.layers])
        bq = torch.stack([layer.query_projection.bias for layer in self.layers])
        wk = torch.stack([layer.key_projection.weight for layer in self.layers])
        scale = 1.0 / math.sqrt(e)
        a = torch.einsum("lhed,lhef->lhdf", wq.view(L, H, e, d), wk.view(L, H, e, d)) * scale
        w = torch.einsum("lhed,lhe->lhd", wk.view(L, H, e, d), bq.view(L, H, e)) * scale
        return a.reshape(L * H, d, d), w.reshape(L * H, d), wq, bq

    def _scores(self, emb: DataEmbedding, u: Tensor, a: Tensor, w: Tensor,
                batch: int) -> tuple[Tensor, Tensor]:
        """Attention logits of tokens ``u [N, m, f]`` (``N = B*C``), laid out ``[N, m, L*H, m]``
        (query token, layer x head, key token), and the channel mean of the embeddings ``[B, m, d]``."""
        n_seq, m, f = u.shape
        k_maps = a.shape[0]
        embed_dropout = self.training and emb.dropout.p > 0
        if not embed_dropout and 3 * f < self.d_model:
            # E = Z G + P: every per-token product in the 3f-dimensional input space (exact).
            y = 3 * f
            z = circular_unfold(u)  # [N, m, 3f]
            g = emb.kernel_matrix()  # [3f, d]
            pos = emb.pe[:m]  # [m, d]
            ga = torch.einsum("zd,kdf->kzf", g, a)  # G A per map, [K, 3f, d]
            pa = torch.einsum("md,kdf->kmf", pos, a)  # P A per map, [K, m, d]
            zz = (ga @ g.T).transpose(0, 1).reshape(y, k_maps * y)  # G A G^T
            zp = (ga @ pos.T).transpose(0, 1).reshape(y, k_maps * m)  # G A P^T
            # P A G^T + 1 (G w)^T and P A P^T + 1 (P w)^T, rows (query token, map)
            pz = (pa @ g.T + (g @ w.T).T[:, None, :]).transpose(0, 1).reshape(m * k_maps, y)
            pp = (pa @ pos.T + (pos @ w.T).T[:, None, :]).transpose(0, 1).reshape(m * k_maps, m)
            z2 = z.reshape(n_seq * m, y)
            r = (z2 @ zz).view(n_seq, m * k_maps, y) + pz  # rows (query token, map)
            base = (z2 @ zp).view(n_seq, m * k_maps, m).add_(pp)
            logits = torch.baddbmm(base, r, z.transpose(1, 2))
            e_mean = z.unflatten(0, (batch, self.n_channels)).mean(1) @ g + pos
            return logits.view(n_seq, m, k_maps, m), e_mean
        if self.n_heads == 1:  # one d x d product per token instead of two (Q and K)
            p = emb.dropout.p if embed_dropout else 0.0
            keep = keep_mask((n_seq, m, self.d_model), p, u.device) if embed_dropout else None
            return DroppedBilinearLogits.apply(circular_unfold(u), emb.kernel_matrix(), emb.pe[:m], a, w,
                                               keep, 1.0 / (1.0 - p), batch)
        e = emb(u)  # [N, m, d]; several heads: per-head query and key projections
        H, dh = self.n_heads, self.d_model // self.n_heads
        wq = torch.stack([layer.query_projection.weight for layer in self.layers])
        bq = torch.stack([layer.query_projection.bias for layer in self.layers])
        wk = torch.stack([layer.key_projection.weight for layer in self.layers])
        bk = torch.stack([layer.key_projection.bias for layer in self.layers])
        q = (torch.einsum("nmd,led->nmle", e, wq) + bq).unflatten(-1, (H, dh))
        k = (torch.einsum("nmd,led->nmle", e, wk) + bk).unflatten(-1, (H, dh))
        logits = torch.einsum("nmlhe,nslhe->nmlhs", q, k).flatten(2, 3) / math.sqrt(dh)
        return logits, e.unflatten(0, (batch, self.n_channels)).mean(1)

    def _channel_mean_maps(self, logits: Tensor, batch: int) -> Tensor:
        """Softmax (+ attention dropout) per channel, then the channel mean: ``[B, L, H, m, m]``."""
        p = self.attn_dropout.p
        if self.training and p > 0:  # the same as nn.Dropout, keeping a bool mask
            maps = SoftmaxDropout.apply(logits, keep_mask(logits.shape, p, logits.device), 1.0 / (1.0 - p))
        else:
            maps = torch.softmax(logits, dim=-1)  # [N, m, L*H, m]
        maps = maps.unflatten(0, (batch, self.n_channels)).mean(1).transpose(1, 2)
        return maps.unflatten(1, (self.e_layers, self.n_heads))

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"DCdetector expects x of shape [B, T, C]; got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if x.shape[1] != self.window or x.shape[2] != self.n_channels:
            raise ValueError(
                f"DCdetector was built for windows [B, {self.window}, {self.n_channels}]; got "
                f"{tuple(x.shape)}. Build it with window={x.shape[1]}, n_channels={x.shape[2]} "
                f"(the patch sizes must divide the window)")

    def forward(self, x: Tensor) -> DCdetectorOutput:
        """``x [B, T, C]`` -> channel-averaged attention maps per patch size (see the output class)."""
        self._check_input(x)
        batch = x.shape[0]
        if self.normalize:
            x = normalize_window(x)
        self.window_embedding(x)  # x_ori: computed for parity and as an attachment point only
        a, w, wq, bq = self._bilinear()
        series, prior, e_bar = [], [], 0.0
        for i, p in enumerate(self.patch_sizes):
            logits, e_mean = self._scores(self.patch_embeddings[i], patch_tokens(x, p), a, w, batch)
            series.append(self._channel_mean_maps(logits, batch))
            e_bar = e_bar + e_mean.repeat_interleave(p, dim=1)  # patch i covers times i p .. i p + p - 1
            logits, _ = self._scores(self.inpatch_embeddings[i], inpatch_tokens(x, p, self.inpatch), a, w, batch)
            prior.append(self._channel_mean_maps(logits, batch))
        self.patch_representation(e_bar / len(self.patch_sizes), wq, bq)
        return DCdetectorOutput(series, prior)

    # ---- loss and score -----------------------------------------------------------------
    def _expand_prior_keys(self, t: Tensor, p: int) -> Tensor:
        """``[..., p, p] -> [..., p, T]``: an in-patch map's key axis up-sampled to the window."""
        n = self.window // p
        return t.repeat(*([1] * (t.dim() - 1)), n) if self.inpatch == "strided" else t.repeat_interleave(n, dim=-1)

    def _row_kl(self, s_bar: Tensor, n_bar: Tensor, p: int) -> tuple[Tensor, Tensor]:
        """Row-wise ``KL(S || N^)`` and ``KL(N^ || S)`` of the up-sampled maps, ``[B, L, H, T]`` each,
        without building them: for query time ``a`` in patch ``i`` and in-patch token ``r``, both are
        a within-row term (``p sum_k S_ik log(S_ik + eps)``, ``n sum_j N^_rj log(N^_rj + eps)``) minus a
        cross term ``sum_b S_up[a, b] log(N^_up[a, b] + eps)`` (and vice versa), a ``[n, T] x [T, p]``
        product of the maps expanded along the key axis only."""
        n = self.window // p
        n_hat = n_bar / (n * n_bar.sum(-1, keepdim=True))  # the up-sampled rows sum to 1
        log_s, log_n = torch.log(s_bar + KL_EPS), torch.log(n_hat + KL_EPS)
        s_self = p * (s_bar * log_s).sum(-1)  # [..., n]
        n_self = n * (n_hat * log_n).sum(-1)  # [..., p]
        cross_sn = s_bar.repeat_interleave(p, dim=-1) @ self._expand_prior_keys(log_n, p).transpose(-1, -2)
        cross_ns = self._expand_prior_keys(n_hat, p) @ log_s.repeat_interleave(p, dim=-1).transpose(-1, -2)
        kl_sn = s_self[..., :, None] - cross_sn  # [..., n (patch i), p (token r)]
        kl_ns = n_self[..., None, :] - cross_ns.transpose(-1, -2)
        index = getattr(self, f"grid_index_{p}")  # time a -> flat (i, r)
        return kl_sn.flatten(-2)[..., index], kl_ns.flatten(-2)[..., index]

    def discrepancy(self, out: DCdetectorOutput) -> Tensor:
        """``sum_u [KL(S_u || N^_u) + KL(N^_u || S_u)]_t`` (heads averaged): ``[B, T]``."""
        total = 0.0
        for p, s_bar, n_bar in zip(self.patch_sizes, out.series, out.prior):
            kl_sn, kl_ns = self._row_kl(s_bar, n_bar, p)
            total = total + (kl_sn + kl_ns).mean(2).sum(1)
        return total

    def loss(self, x: Tensor, out: DCdetectorOutput, epoch: int = 0) -> dict[str, Tensor]:
        """``{"prior": prior, "series": -series}`` (their sum is the reference's ``prior - series``;
        both equal in value, so the sum is 0, but the stop-gradients make its gradient useful)."""
        series_loss, prior_loss = 0.0, 0.0
        for p, s_bar, n_bar in zip(self.patch_sizes, out.series, out.prior):
            kl_sn, kl_ns = self._row_kl(s_bar, n_bar.detach(), p)  # KL(S || sg N^), KL(sg N^ || S)
            series_loss = series_loss + (kl_sn + kl_ns).mean()
            kl_sn, kl_ns = self._row_kl(s_bar.detach(), n_bar, p)  # KL(sg S || N^), KL(N^ || sg S)
            prior_loss = prior_loss + (kl_sn + kl_ns).mean()
        k = len(self.patch_sizes)
        return {"prior": prior_loss / k, "series": -series_loss / k}

    def score(self, x: Tensor, out: DCdetectorOutput) -> Tensor:
        """Per-point score ``softmax_t(-temperature * discrepancy)`` ``[B, T]`` (higher = more anomalous)."""
        return torch.softmax(-self.temperature * self.discrepancy(out), dim=-1)

    # ---- inspection ---------------------------------------------------------------------
    def upsampled_maps(self, out: DCdetectorOutput) -> tuple[list[Tensor], list[Tensor]]:
        """The ``[B, L, H, T, T]`` maps of the reference: ``S`` block-upsampled, ``N`` tiled.

        For inspection and tests only; training and scoring never build them.
        """
        series, prior = [], []
        for p, s_bar, n_bar in zip(self.patch_sizes, out.series, out.prior):
            n = self.window // p
            series.append(s_bar.repeat_interleave(p, dim=-1).repeat_interleave(p, dim=-2))
            if self.inpatch == "strided":  # time a has in-patch token a mod p: tile
                prior.append(n_bar.repeat(1, 1, 1, n, n))
            else:  # time a has in-patch token a // n: blocks
                prior.append(n_bar.repeat_interleave(n, dim=-1).repeat_interleave(n, dim=-2))
        return series, prior

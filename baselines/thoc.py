"""THOC: Temporal Hierarchical One-Class network (a plain baseline; knows nothing about MADCluster).

Paper: Lifeng Shen, Zhuocong Li, James T. Kwok, "Timeseries Anomaly Detection using Temporal
Hierarchical One-Class Network", NeurIPS 2020. There is no official code release.

Reference followed: TimeSeAD (wagner-d/TimeSeAD, ``timesead/models/other/thoc.py`` with the
hyper-parameters of ``timesead_experiments/other/train_thoc.py``), the port closest to the
authors' code; see BASELINES.md section 5. Defaults: a 3-layer dilated LSTM (128 units, dilations
1/2/4), K = 6 centres per layer initialised by k-means on features of the first 20 training batches,
tau = 100 annealed by 2/3 every 5 epochs down to 1/300, lambda_orth = 1, lambda_TSS = 10.
With 55 channels this is 497,664 parameters.

What we changed (and why):

* The dilated RNN runs batch-first on ``[B, T, C]`` with the dilation done by one reshape: the
  sequence is zero-padded at its end to a multiple of the skip ``s`` and split into ``s`` interleaved
  sub-sequences stacked on the batch axis, then interleaved back and unpadded (causal order kept).
  TimeSeAD's generic RNN is built with ``batch_first=False`` while ``THOC.forward`` documents
  ``[batch, seq, features]`` input; we make the layout explicit.
* Cluster weights follow the paper, ``R^l_j = sum_i P^l_{i->j} R^{l-1}_i``. The assignment is a
  softmax over the centres, so these weights already sum to 1; TimeSeAD's extra softmax on R (which
  flattens values in [0, 1] towards uniform) is dropped. The update step uses P as it is (the
  paper, as TimeSeAD does; the authors' code applied a second softmax to P).
* The per-point score is the paper's weighted distance ``s_t = sum_j R_{t,j} d(f_hat_{t,j}, c_j)``
  for every step of the window (TimeSeAD averages over the clusters and keeps the last step only).
* Temperature annealing happens once every ``tau_every`` epochs in :meth:`on_epoch_end` and is
  clamped at ``tau_min``. TimeSeAD's trainer applies the decay inside ``train_batch``, i.e. once per
  *batch* of every fifth epoch, which drives tau to its floor within one epoch.
* k-means uses a seeded, bounded random subsample of the features (``kmeans_max_points``) so the
  initialisation stays fast and memory-bounded: the deeper layers carry a cluster axis, 6x the points.
* ``tau`` and the "centres initialised" flag are buffers, so a checkpoint restores them.

Behaviour worth knowing: nothing in the objective stops ``ReLU(W f + b)`` of the last layer from
becoming constant, so the cluster features collapse onto their centres quickly (on the built-in
synthetic data, after 3 short epochs the score varies by ~1e-4 across windows against ~6e-3 across
positions within a window). The per-point score is then weak, while the dilated RNN itself (trained
by the TSS loss) stays informative: the hypersphere collapse that the MADCluster head targets.

Attachment point for a MADCluster head: the last dilated-RNN layer ``drnn.layers.<L-1>``, whose
output is ``f^L`` of shape ``[B, T, hidden]`` (the paper names the dilated RNN as its Base Embedder).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import Tensor, nn

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class DilatedRNNLayer(nn.Module):
    """One recurrent layer whose recurrence skips ``dilation`` steps: h_t depends on h_{t-s}.

    Input ``[B, T, in]``, output ``[B, T, hidden]``. The ``s`` interleaved sub-sequences
    (t = j, j + s, j + 2s, ...) run as one batch of ``s * B`` ordinary sequences.
    """

    def __init__(self, input_size: int, hidden_size: int, dilation: int, cell: str = "lstm") -> None:
        super().__init__()
        if dilation < 1:
            raise ValueError(f"dilation must be >= 1; got {dilation}")
        if cell not in CELLS:
            raise ValueError(f"cell={cell!r} is not supported; choose one of {tuple(CELLS)}")
        self.dilation = int(dilation)
        self.hidden_size = int(hidden_size)
        self.rnn = CELLS[cell](input_size, hidden_size, num_layers=1, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        s = self.dilation
        pad = (-t) % s
        if pad:
            x = F.pad(x, (0, 0, 0, pad))  # zeros at the end of time: earlier outputs are unaffected
        n = (t + pad) // s
        # x[b, k*s + j] -> sub-sequence (b, j), step k
        xs = x.reshape(b, n, s, c).transpose(1, 2).reshape(b * s, n, c)
        out, _ = self.rnn(xs)
        out = out.reshape(b, s, n, self.hidden_size).transpose(1, 2).reshape(b, n * s, self.hidden_size)
        return out[:, :t]


class DilatedRNN(nn.Module):
    """A stack of :class:`DilatedRNNLayer`; returns every layer's output ``f^l`` ``[B, T, H]``."""

    def __init__(self, input_size: int, hidden_size: int, dilations: Sequence[int],
                 cell: str = "lstm") -> None:
        super().__init__()
        sizes = [input_size] + [hidden_size] * len(dilations)
        self.layers = nn.ModuleList(
            DilatedRNNLayer(i, hidden_size, d, cell) for i, d in zip(sizes[:-1], dilations))

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        return outs


@dataclass
class THOCOutput:
    """What :meth:`THOC.forward` returns.

    f_hat:  last-layer cluster features ``[B, T, K_L, H]`` (eq. 7 of the paper).
    R:      last-layer cluster weights ``[B, T, K_L]`` (they sum to 1 over the clusters).
    layers: dilated-RNN outputs ``f^l``, one ``[B, T, H]`` per layer (used by the TSS loss).
    fused:  features fed to each layer's assignment, ``[B, T, K_{l-1}, H]`` (used by k-means init).
    """

    f_hat: Tensor
    R: Tensor
    layers: list[Tensor]
    fused: list[Tensor]


def cosine_similarity_scaled(f: Tensor, centers: Tensor) -> Tensor:
    """0.5 (cos(f, c) - 1) in [-1, 0], the authors' scaling; ``[..., P, H] x [K, H] -> [..., P, K]``."""
    return 0.5 * (F.normalize(f, dim=-1) @ F.normalize(centers, dim=-1).T - 1.0)


class THOC(nn.Module):
    """THOC on windows ``[B, T, C]``; see the module docstring for paper, reference and changes.

    Args:
        n_channels: C.
        hidden: width of every dilated-RNN layer (D of the attachment point).
        dilations: skip length per layer (its length is the number of layers).
        n_clusters: K per layer (int for all layers, or one per layer).
        cell: "lstm" (reference), "gru" or "rnn".
        tau, tau_decay, tau_every, tau_min: temperature of the assignment softmax and its schedule.
        lambda_orth, lambda_tss: weights of the orthogonality and self-supervised TSS losses.
        init_batches: how many training batches k-means sees in :meth:`on_fit_start`.
        kmeans_max_points: at most this many feature vectors per layer go into k-means (an equal
            share drawn at random from each batch).
        seed: seeds the k-means subsample and k-means itself.
    """

    def __init__(self, n_channels: int, hidden: int = 128, dilations: Sequence[int] = (1, 2, 4),
                 n_clusters: int | Sequence[int] = 6, cell: str = "lstm", tau: float = 100.0,
                 tau_decay: float = 2.0 / 3.0, tau_every: int = 5, tau_min: float = 1.0 / 300.0,
                 lambda_orth: float = 1.0, lambda_tss: float = 10.0, init_batches: int = 20,
                 kmeans_max_points: int = 20_000, seed: int = 0) -> None:
        super().__init__()
        if n_channels < 1 or hidden < 1:
            raise ValueError(f"n_channels and hidden must be >= 1; got {n_channels}, {hidden}")
        dilations = tuple(int(d) for d in dilations)
        if not dilations or min(dilations) < 1:
            raise ValueError(f"dilations must be a non-empty sequence of ints >= 1; got {dilations}")
        if isinstance(n_clusters, int):
            n_clusters = (n_clusters,) * len(dilations)
        n_clusters = tuple(int(k) for k in n_clusters)
        if len(n_clusters) != len(dilations) or min(n_clusters) < 1:
            raise ValueError(f"n_clusters must be an int >= 1 or one int >= 1 per layer "
                             f"({len(dilations)} layers); got {n_clusters}")
        if not (tau > 0 and 0 < tau_decay <= 1 and tau_every >= 1 and 0 < tau_min <= tau):
            raise ValueError(f"need tau > 0, 0 < tau_decay <= 1, tau_every >= 1, 0 < tau_min <= tau; "
                             f"got {tau}, {tau_decay}, {tau_every}, {tau_min}")
        self.n_channels = int(n_channels)
        self.hidden = int(hidden)
        self.dilations = dilations
        self.n_clusters = n_clusters
        self.tau_decay, self.tau_every, self.tau_min = float(tau_decay), int(tau_every), float(tau_min)
        self.lambda_orth, self.lambda_tss = float(lambda_orth), float(lambda_tss)
        self.init_batches, self.kmeans_max_points = int(init_batches), int(kmeans_max_points)
        self.seed = int(seed)

        self.drnn = DilatedRNN(n_channels, hidden, dilations, cell)
        # Uniform[-1, 1] as the reference; replaced by k-means in on_fit_start.
        self.centers = nn.ParameterList(nn.Parameter(torch.rand(k, hidden) * 2 - 1) for k in n_clusters)
        self.transforms = nn.ModuleList(nn.Linear(hidden, hidden) for _ in dilations)           # eq. 7
        self.out_project = nn.ModuleList(                                                        # eq. 12
            nn.Linear(hidden, n_channels, bias=False) for _ in dilations)
        self.join = nn.ModuleList(nn.Linear(2 * hidden, hidden) for _ in dilations[1:])          # eq. 8
        self.register_buffer("tau", torch.tensor(float(tau)))
        self.register_buffer("centers_initialised", torch.tensor(False))

    # ---- forward --------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 3 or x.shape[-1] != self.n_channels:
            raise ValueError(f"THOC expects x of shape [B, T, {self.n_channels}]; got {tuple(x.shape)}")
        if x.shape[1] <= max(self.dilations):
            raise ValueError(f"window length {x.shape[1]} must exceed the largest dilation "
                             f"{max(self.dilations)} (the TSS loss predicts that far ahead)")

    def forward(self, x: Tensor) -> THOCOutput:
        """Dilated RNN, then hierarchical soft clustering layer by layer (paper eqs. 4-8)."""
        self._check_input(x)
        layers = self.drnn(x)
        fused: list[Tensor] = []
        f_hat: Tensor | None = None
        R: Tensor | None = None
        for l, f in enumerate(layers):
            g = f.unsqueeze(2)                                              # [B, T, 1, H]
            if f_hat is not None:                                           # eq. 8: fuse with f^l
                g = self.join[l - 1](torch.cat([f_hat, g.expand_as(f_hat)], dim=-1))
            fused.append(g)
            P = torch.softmax(cosine_similarity_scaled(g, self.centers[l]) / self.tau, dim=-1)  # [B,T,Kp,K]
            R = P[:, :, 0] if R is None else torch.einsum("btpk,btp->btk", P, R)
            f_hat = torch.einsum("btpk,btph->btkh", P, torch.relu(self.transforms[l](g)))
        assert f_hat is not None and R is not None
        return THOCOutput(f_hat=f_hat, R=R, layers=layers, fused=fused)

    # ---- objective ------------------------------------------------------------------------
    def distances(self, out: THOCOutput) -> Tensor:
        """Cosine distance 0.5 (1 - cos) of each last-layer cluster feature to its centre ``[B, T, K]``."""
        f = F.normalize(out.f_hat, dim=-1)
        c = F.normalize(self.centers[-1], dim=-1)
        return 0.5 * (1.0 - (f * c).sum(-1))

    def orthogonality_loss(self) -> Tensor:
        """Mean over layers of mean((C~ C~^T - I)^2) on row-normalised centres (TimeSeAD scaling)."""
        total = self.centers[0].new_zeros(())
        for c in self.centers:
            if c.shape[0] > 1:
                cn = F.normalize(c, dim=-1)
                eye = torch.eye(c.shape[0], device=c.device, dtype=c.dtype)
                total = total + ((cn @ cn.T - eye) ** 2).mean()
        return total / len(self.centers)

    def tss_loss(self, x: Tensor, out: THOCOutput) -> Tensor:
        """Mean over layers of MSE(Lin_l(f^l_t), x_{t+s_l}): multi-resolution prediction (eq. 12)."""
        total = x.new_zeros(())
        for f, proj, s in zip(out.layers, self.out_project, self.dilations):
            total = total + F.mse_loss(proj(f[:, :-s]), x[:, s:])
        return total / len(out.layers)

    def loss(self, x: Tensor, out: THOCOutput, epoch: int = 0) -> dict[str, Tensor]:
        """Named, weighted terms: ``thoc`` (L_MVDD), ``orth`` (lambda_orth * L_orth), ``tss``
        (lambda_TSS * L_TSS); one phase, summed by the trainer."""
        return {
            "thoc": (out.R * self.distances(out)).mean(),
            "orth": self.lambda_orth * self.orthogonality_loss(),
            "tss": self.lambda_tss * self.tss_loss(x, out),
        }

    def score(self, x: Tensor, out: THOCOutput) -> Tensor:
        """Per-point score ``[B, T]``: sum_j R_{t,j} d(f_hat_{t,j}, c_j); higher = more anomalous."""
        return (out.R * self.distances(out)).sum(-1)

    # ---- training hooks -------------------------------------------------------------------
    @torch.no_grad()
    def on_fit_start(self, batches: Iterable[Tensor]) -> None:
        """k-means initialisation of every layer's centres on features of the first training batches.

        Runs once (a checkpoint that already has initialised centres is left alone). Layer by layer,
        because the features a layer clusters depend on the centres of the layer below.
        """
        if bool(self.centers_initialised):
            return
        xs = []
        for i, xb in enumerate(batches):
            if i >= self.init_batches:
                break
            xs.append(xb)
        if not xs:
            raise ValueError("on_fit_start got no training batches; THOC needs some for its k-means init")
        device = self.centers[0].device
        was_training = self.training
        self.eval()
        gen = torch.Generator().manual_seed(self.seed)
        per_batch = -(-self.kmeans_max_points // len(xs))  # subsample batch by batch: bounded memory
        for l, k in enumerate(self.n_clusters):
            parts = []
            for xb in xs:
                f = self.forward(xb.to(device)).fused[l].reshape(-1, self.hidden).cpu()
                if len(f) > per_batch:
                    f = f[torch.randperm(len(f), generator=gen)[:per_batch]]
                parts.append(f)
            feats = torch.cat(parts)
            if len(feats) < k:
                raise ValueError(f"k-means of layer {l} needs at least {k} feature vectors; got {len(feats)}")
            km = KMeans(n_clusters=k, n_init=3, random_state=self.seed + l).fit(feats.double().numpy())
            centers = torch.from_numpy(np.asarray(km.cluster_centers_))
            self.centers[l].copy_(centers.to(device=device, dtype=self.centers[l].dtype))
        self.centers_initialised.fill_(True)
        self.train(was_training)

    def on_epoch_end(self, epoch: int) -> None:
        """Anneal tau: multiply by ``tau_decay`` after every ``tau_every`` epochs, floor ``tau_min``."""
        if (epoch + 1) % self.tau_every == 0:
            self.tau.fill_(max(float(self.tau) * self.tau_decay, self.tau_min))


__all__ = ["THOC", "THOCOutput", "DilatedRNN", "DilatedRNNLayer"]

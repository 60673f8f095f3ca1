"""MADClusterHead: learnable centres and threshold nu on hidden states ``[B, T, D]``.

assign (q) -> target (p) -> cluster and mapping terms -> scalar loss, and the per-point score.
K = 1 follows the paper (cosine q, eq. 4 target, one-directed loss eqs. 7-9); K > 1 follows
appendix B (Student-t q, DEC target, KL, eqs. 25-28); ``target="code"`` the released code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import losses as L
from .config import MADClusterConfig


@dataclass
class HeadOutput:
    """Per-element quantities of one head forward, all ``[B, T, K]``."""

    q: Tensor            # soft assignment
    p: Tensor            # target (detached)
    sq_distances: Tensor  # ||h_t - c_j||^2
    cluster: Tensor      # sequence-wise clustering term (one-directed loss, KL or the code's loss)
    mapping: Tensor      # cluster distance mapping term (eq. 27)
    hidden: Tensor | None = None  # the hidden state itself (for error messages)


class MADClusterHead(nn.Module):
    """The MADCluster head: ``centers`` ``[K, D]`` and a learnable threshold (K*D + 1 parameters).

    ``threshold`` gives nu inside ``(eps, 1 - eps)``; the raw parameter is clamped there by
    :meth:`clamp_threshold_` after each optimiser step, so nu cannot drift past 1 where the
    slope of f1 is 0/0 (METHOD.md section 2 item 6).
    """

    def __init__(self, dim: int, config: MADClusterConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim (the hidden feature size D) must be an integer >= 1; got {dim!r}")
        self.config = (config or MADClusterConfig()).replace(**overrides)
        self.dim = dim
        k = self.config.n_clusters
        self.centers = nn.Parameter(torch.empty(k, dim))
        # He/Kaiming normal, fan_in = D, as the released ClusteringLayer (std = sqrt(2 / D)).
        nn.init.kaiming_normal_(self.centers, mode="fan_in", nonlinearity="relu")
        self.threshold_raw = nn.Parameter(torch.tensor([float(self.config.init_threshold)]))
        self.register_buffer("radius", torch.zeros(k))
        self.register_buffer("centers_initialized", torch.tensor(self.config.center_init == "he"))

    # ---- parameters ---------------------------------------------------------------------
    @property
    def threshold(self) -> Tensor:
        """nu, a scalar tensor in ``(eps, 1 - eps)`` (differentiable inside that interval)."""
        eps = self.config.threshold_eps
        return self.threshold_raw.clamp(eps, 1.0 - eps)[0]

    @torch.no_grad()
    def clamp_threshold_(self) -> None:
        """Project the raw threshold back into ``[eps, 1 - eps]`` (call after optimiser steps)."""
        eps = self.config.threshold_eps
        self.threshold_raw.clamp_(eps, 1.0 - eps)

    @property
    def uses_threshold(self) -> bool:
        """nu enters the loss for K = 1 and for the code target; appendix B's K > 1 ignores it."""
        return self.config.n_clusters == 1 or self.config.target == "code"

    def parameter_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer groups: centres with ``weight_decay`` (lambda Omega of eq. 27), nu without."""
        return [
            {"params": [self.centers], "lr": lr, "weight_decay": weight_decay},
            {"params": [self.threshold_raw], "lr": lr, "weight_decay": 0.0},
        ]

    # ---- forward ------------------------------------------------------------------------
    def _check(self, h: Tensor) -> None:
        if h.dim() != 3:
            raise ValueError(f"MADClusterHead expects hidden states [B, T, D]; got shape {tuple(h.shape)}")
        if h.shape[-1] != self.dim:
            raise ValueError(
                f"hidden feature size {h.shape[-1]} differs from the head's D = {self.dim}; "
                f"pass dim={h.shape[-1]} (or the right layout) when wrapping")

    def _raise_if_not_finite(self, value: Tensor, out: HeadOutput, what: str) -> None:
        """Fail loudly instead of returning NaN: checked on the (small) result, and only when it
        is not finite is the hidden state inspected to say why (no full-tensor pass per step)."""
        if not self.config.check_finite or bool(torch.isfinite(value).all()):
            return
        h = out.hidden
        n_bad = int((~torch.isfinite(h)).sum()) if h is not None else 0
        if n_bad:
            raise ValueError(
                f"hidden state holds {n_bad} NaN/Inf value(s) of {h.numel()}: the backbone diverged "
                f"or was fed non-finite input; check the input data and lower the learning rate")
        raise FloatingPointError(
            f"the head's {what} is not finite although the hidden state is (squared distances "
            f"overflow float32 past |h| ~ 1e19); rescale the hidden state or use float64")

    def forward(self, h: Tensor) -> HeadOutput:
        """Assignments, targets and both loss terms for hidden states ``h [B, T, D]``."""
        self._check(h)
        h = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
        centers = self.centers.to(h.dtype)
        cfg = self.config
        sq = L.squared_distances(h, centers)
        nu = self.threshold.to(h.dtype)
        if cfg.target == "code":
            q = L.cosine_assignment(h, centers)
            p = L.dec_target(q, time_dim=1)
            cluster = L.code_cluster_loss(q, nu, p, cfg.smoothing)
        elif cfg.n_clusters == 1:
            q = L.cosine_assignment(h, centers)
            p = L.threshold_target(q, nu)
            cluster = L.one_directed_adaptive_loss(q, nu, p)
        else:
            q = L.student_t_assignment(sq)
            p = L.dec_target(q, time_dim=1)
            cluster = L.kl_cluster_loss(p, q)
        mapping = L.distance_mapping_loss(sq, cfg.objective, self.radius, cfg.sb_nu)
        return HeadOutput(q=q, p=p, sq_distances=sq, cluster=cluster, mapping=mapping, hidden=h)

    def loss_elements(self, out: HeadOutput) -> Tensor:
        """``[B, T, K]`` per-element loss: mapping + cluster, or one of them (``components``)."""
        comp = self.config.components
        if comp == "mapping":
            return out.mapping
        if comp == "cluster":
            return out.cluster
        return out.mapping + out.cluster

    def loss(self, out: HeadOutput) -> Tensor:
        """Scalar head loss (``reduction`` of :meth:`loss_elements`, times ``weight``)."""
        loss = self.config.weight * L.reduce_elements(self.loss_elements(out), self.config.reduction)
        self._raise_if_not_finite(loss.detach(), out, "loss")
        return loss

    def score(self, out: HeadOutput) -> Tensor:
        """Per-point anomaly score ``[B, T]``: cluster term at the learned nu + squared distance
        to the nearest centre (eq. 28 for K > 1, with its KL summed over clusters)."""
        comp = self.config.components
        cluster = out.cluster.sum(dim=-1)
        nearest = out.sq_distances.min(dim=-1).values
        score = nearest if comp == "mapping" else cluster if comp == "cluster" else cluster + nearest
        self._raise_if_not_finite(score.detach(), out, "score")
        return score

    # ---- data-dependent state -----------------------------------------------------------
    @torch.no_grad()
    def update_radius(self, sq_distances: Tensor) -> Tensor:
        """Set the soft-boundary radius from squared distances of *training* data ``[..., K]``.

        Under ``torch.distributed`` the distances of all ranks are gathered first, so every rank
        gets the same radius.
        """
        if sq_distances.shape[-1] != self.config.n_clusters:
            raise ValueError(f"expected squared distances [..., K={self.config.n_clusters}]; "
                             f"got shape {tuple(sq_distances.shape)}")
        d = sq_distances.detach().reshape(-1, self.config.n_clusters)
        d = _gather_rows(d)
        self.radius.copy_(L.radius_from_distances(d, self.config.sb_nu).to(self.radius))
        return self.radius.clone()

    @torch.no_grad()
    def initialize_centers(self, h: Tensor, n_iter: int = 25, seed: int = 0) -> None:
        """Data initialisation (``center_init="data"``): mean of ``h`` for K = 1, k-means for K > 1.

        ``h`` is any ``[..., D]`` sample of training hidden states. Coordinates with
        ``|c_i| < 0.1`` are pushed out to +-0.1 for K = 1 (Deep SVDD's rule), so the cosine
        assignment is not dominated by a near-zero centre.
        """
        x = h.detach().reshape(-1, self.dim).to(self.centers)
        if x.shape[0] < self.config.n_clusters:
            raise ValueError(f"need at least K={self.config.n_clusters} hidden vectors to initialise "
                             f"the centres; got {x.shape[0]}")
        if self.config.n_clusters == 1:
            c = x.mean(dim=0, keepdim=True)
            eps = 0.1
            c = torch.where(c.abs() < eps, torch.where(c < 0, -eps, eps) * torch.ones_like(c), c)
        else:
            c = kmeans(x, self.config.n_clusters, n_iter=n_iter, seed=seed)
        self.centers.copy_(c)
        self.centers_initialized.fill_(True)

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"dim={self.dim}, n_clusters={cfg.n_clusters}, target={cfg.target!r}, "
                f"objective={cfg.objective!r}, reduction={cfg.reduction!r}")


def _gather_rows(x: Tensor) -> Tensor:
    """Concatenate ``x [N_r, K]`` over all ranks when torch.distributed is initialised."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    world = torch.distributed.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros(longest, x.shape[1], dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([part[: int(s)] for part, s in zip(parts, sizes)])


def kmeans(x: Tensor, k: int, n_iter: int = 25, seed: int = 0) -> Tensor:
    """Lloyd's k-means with k-means++ seeding on ``x [N, D]`` (vectorised over points)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = x.shape[0]
    centers = x[torch.randint(n, (1,), generator=gen)].clone()
    for _ in range(1, k):  # k-means++: k is small, the loop is over seeds, not data
        d2 = torch.cdist(x, centers).pow(2).min(dim=1).values
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / n)
        idx = torch.multinomial(probs.cpu(), 1, generator=gen).to(x.device)
        centers = torch.cat([centers, x[idx]])
    for _ in range(n_iter):
        assign = torch.cdist(x, centers).argmin(dim=1)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype).unsqueeze(1)
        centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
    return centers


def head_macs(batch: int, steps: int, dim: int, n_clusters: int = 1) -> int:
    """Multiply-accumulates of one head forward with the cosine assignment (ECOSYSTEM.md 2.3).

    Per point and centre: squared distance (D) and dot product (D); per point the norm of h and
    its scaling to unit length (2D); once per forward the centre norms and their scaling (2*K*D). Element-wise
    terms (logs, thresholds) are not MACs. ``benchmarks.macs.head_macs_analytic`` also covers
    the Student-t path of K > 1.
    """
    return int(batch * steps * (2 * n_clusters * dim + 2 * dim) + 2 * n_clusters * dim)


__all__ = ["HeadOutput", "MADClusterHead", "head_macs", "kmeans"]

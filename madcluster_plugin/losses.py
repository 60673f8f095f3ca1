"""The mathematics of MADCluster as pure tensor functions, one per equation.

Equation numbers refer to ``METHOD.md`` (which keeps the appendix's numbering A1-A28; eq. 4 is
the main text's threshold target as restated in the appendix). Shapes: hidden states
``h [..., D]``, centres ``[K, D]``, per-element quantities ``[..., K]``. Every function is
finite for finite inputs, including q in {0, 1}, nu near 0 or 1 and a zero hidden vector.
"""
from __future__ import annotations

import torch
from torch import Tensor

Q_FLOOR = 1e-6   # the released code clamps q and p at 1e-6 (SOLVER L22-23)
LOG_CAP = 1e6    # ...and the arguments of both logs at 1e6 (SOLVER L29-30)
COSINE_EPS = 1e-8  # F.cosine_similarity's norm floor, as the released ClusteringLayer


def _inverse_norm(x: Tensor) -> Tensor:
    """``1 / max(||x||, 1e-8)`` along the last axis: the released code's ``F.cosine_similarity``.

    The floor matters for the gradient, not the value: ``d(x / ||x||)/dx`` grows like ``1/||x||``,
    and a hidden vector of norm 5e-20 (a bias-free DeepSVDD on an all-zero MSL window, D-14) gave
    an infinite gradient in float32 and NaN weights after one step. With the floor, a vector
    shorter than 1e-8 has its cosine shrunk towards 0 (q towards 1/2), exactly as in the code,
    and every gradient stays finite; a zero vector gets q = 1/2.
    """
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return norm.clamp_min(COSINE_EPS).reciprocal()


def cosine_assignment(h: Tensor, centers: Tensor) -> Tensor:
    """Soft assignment for K = 1 (METHOD.md 1.3): ``q = (1 + cos(h, c)) / 2`` in [0, 1].

    Returns ``[..., K]``: one matrix product with the unit centres, scaled by ``1/||h||``.
    """
    unit_centers = centers * _inverse_norm(centers)
    cos = (h * _inverse_norm(h)) @ unit_centers.transpose(0, 1)
    return ((1.0 + cos) / 2.0).clamp(0.0, 1.0)


def threshold_target(q: Tensor, nu: Tensor | float) -> Tensor:
    """Hard self-label of eq. (4): ``p = 1[q >= nu]`` (no gradient flows through it)."""
    return (q.detach() >= nu).to(q.dtype)


def slope_f1(nu: Tensor) -> Tensor:
    """``(1 - nu^(1-nu)) / (1 - nu)``, the slope of the linear branch f1 (eq. 9), computed stably.

    Uses ``1 - nu^(1-nu) = -expm1((1-nu) log nu)`` so it stays accurate as nu -> 1 (limit 0 is
    approached smoothly instead of as 0/0).
    """
    one_minus = 1.0 - nu
    return -torch.expm1(one_minus * torch.log(nu)) / one_minus


def one_directed_branches(q: Tensor, nu: Tensor) -> tuple[Tensor, Tensor]:
    """The two branches of eq. (9): ``f1 = slope(nu) (q - 1) + 1`` and ``f2 = q^(1-nu)``."""
    f1 = slope_f1(nu) * (q - 1.0) + 1.0
    f2 = q.clamp_min(0.0) ** (1.0 - nu)
    return f1, f2


def one_directed_adaptive_loss(q: Tensor, nu: Tensor | float, p: Tensor | None = None) -> Tensor:
    """Element-wise one-directed adaptive loss, eqs. (7)-(9).

    ``-[p log f1(q, nu) + (1 - p) log f2(q, nu)]``; with ``p`` None the target is eq. (4),
    ``p = 1[q >= nu]``, so the loss is ``-log y(q)`` of eq. (7). Its derivatives are eqs. (10)-(24):
    negative in q and in nu, so q is pushed towards 1 and nu rises during training.
    ``log f2 = (1 - nu) log q`` is evaluated in log form with q floored at 1e-6 (as the code).
    """
    nu_t = torch.as_tensor(nu, dtype=q.dtype, device=q.device)
    if p is None:
        p = threshold_target(q, nu_t)
    f1 = slope_f1(nu_t) * (q - 1.0) + 1.0
    log_f1 = torch.log(f1.clamp_min(Q_FLOOR))
    log_f2 = (1.0 - nu_t) * torch.log(q.clamp_min(Q_FLOOR))
    return -(p * log_f1 + (1.0 - p) * log_f2)


def code_cluster_loss(q: Tensor, nu: Tensor | float, p: Tensor, smoothing: float = 0.01) -> Tensor:
    """The released code's cluster loss (METHOD.md 1.5, ``custom_loss_function``), element-wise.

    ``KL term p log(p/q)`` + label-smoothed both-branch loss with ``p~ = p(1-e) + (1-p)e``:
    ``p log(p/q) - [p~ log min(f1, 1e6) + (1-p~) log min(q^(1-nu), 1e6)]``; p, q floored at 1e-6.
    With K = 1 the code's target is p = 1 and this is ``-log q - 0.99 log f1 - 0.01 (1-nu) log q``.
    """
    nu_t = torch.as_tensor(nu, dtype=q.dtype, device=q.device)
    q_c = q.clamp_min(Q_FLOOR)
    p_c = p.clamp_min(Q_FLOOR)
    kl = p_c * torch.log(p_c / q_c)
    p_s = p_c * (1.0 - smoothing) + (1.0 - p_c) * smoothing
    f1 = slope_f1(nu_t) * (q_c - 1.0) + 1.0
    log_f1 = torch.log(f1.clamp(Q_FLOOR, LOG_CAP))
    log_f2 = ((1.0 - nu_t) * torch.log(q_c)).clamp_max(torch.log(torch.tensor(LOG_CAP)).item())
    return kl - (p_s * log_f1 + (1.0 - p_s) * log_f2)


def squared_distances(h: Tensor, centers: Tensor) -> Tensor:
    """``||h - c_j||^2`` for every centre: ``[..., D] x [K, D] -> [..., K]`` (eq. 27 summand).

    Computed as the sum of squared differences (not the ``|h|^2 - 2hc + |c|^2`` expansion,
    which cancels catastrophically when h is close to a centre).
    """
    diff = h.unsqueeze(-2) - centers
    return (diff * diff).sum(dim=-1)


def student_t_assignment(sq_distances: Tensor, alpha: float = 1.0) -> Tensor:
    """Student-t soft assignment of eq. (25) for K > 1, from squared distances ``[..., K]``.

    ``q_tj ∝ (1 + ||h_t - c_j||^2 / alpha)^(-(alpha+1)/2)``, normalised over j; evaluated as a
    softmax of log-kernels so huge distances cannot underflow every kernel to 0.
    """
    log_kernel = -(alpha + 1.0) / 2.0 * torch.log1p(sq_distances / alpha)
    return torch.softmax(log_kernel, dim=-1)


def dec_target(q: Tensor, time_dim: int = -2) -> Tensor:
    """DEC auxiliary target of eq. (25): ``p_tj = (q_tj^2 / f_j) / sum_j (q_tj^2 / f_j)``.

    ``f_j = sum_t q_tj`` runs over the time axis of each window (``time_dim``), so a window's
    target does not depend on the other windows in the batch. For K = 1 it is identically 1
    (why the paper uses the threshold target instead). Returned detached: a fixed target.
    """
    q = q.detach()
    tiny = torch.finfo(q.dtype).tiny
    log_w = 2.0 * torch.log(q.clamp_min(tiny)) - torch.log(q.sum(dim=time_dim, keepdim=True).clamp_min(tiny))
    return torch.softmax(log_w, dim=-1)


def kl_cluster_loss(p: Tensor, q: Tensor) -> Tensor:
    """Element-wise ``p log(p / q)`` of eq. (26); summing over t and j gives KL(P || Q)."""
    tiny = torch.finfo(q.dtype).tiny
    return torch.where(p > 0, p * (torch.log(p.clamp_min(tiny)) - torch.log(q.clamp_min(tiny))),
                       torch.zeros_like(p))


def distance_mapping_loss(sq_distances: Tensor, objective: str = "one-class",
                          radius: Tensor | None = None, sb_nu: float = 0.01) -> Tensor:
    """Cluster distance mapping, eq. (27), element-wise ``[..., K]``.

    ``one-class``: ``||h - c||^2``. ``soft-boundary`` (released code, Deep SVDD):
    ``R^2 + max(0, ||h - c||^2 - R^2) / sb_nu`` with R from training distances only.
    """
    if objective == "one-class":
        return sq_distances
    if objective == "soft-boundary":
        if radius is None:
            raise ValueError("objective='soft-boundary' needs a radius (see MADClusterHead.update_radius)")
        r2 = radius.to(sq_distances.dtype) ** 2
        return r2 + torch.relu(sq_distances - r2) / sb_nu
    raise ValueError(f"objective={objective!r}; expected 'one-class' or 'soft-boundary'")


def reduce_elements(elements: Tensor, reduction: str = "log-sum") -> Tensor:
    """Reduce per-element losses ``[B, T, K]`` to a scalar (METHOD.md 1.6).

    ``log-sum``: ``log(mean_b sum_{t,k} elements + 1e-8)`` as the released code;
    ``mean``: the mean over all elements.
    """
    if reduction == "log-sum":
        return torch.log(elements.sum(dim=(1, 2)).mean() + 1e-8)
    if reduction == "mean":
        return elements.mean()
    raise ValueError(f"reduction={reduction!r}; expected 'log-sum' or 'mean'")


def radius_from_distances(sq_distances: Tensor, sb_nu: float) -> Tensor:
    """Soft-boundary radius per centre: the ``(1 - sb_nu)`` quantile of ``||h - c||`` (code ``get_radius``)."""
    d = sq_distances.detach().reshape(-1, sq_distances.shape[-1]).float().clamp_min(0).sqrt()
    # torch.quantile refuses inputs above 2**24 elements; a sort has no such limit.
    d_sorted, _ = torch.sort(d, dim=0)
    pos = (1.0 - sb_nu) * (d_sorted.shape[0] - 1)
    lo, frac = int(pos), pos - int(pos)
    hi = min(lo + 1, d_sorted.shape[0] - 1)
    return d_sorted[lo] + frac * (d_sorted[hi] - d_sorted[lo])  # numpy's 'linear' interpolation

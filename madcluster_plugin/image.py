"""Image extension (paper appendix D): anomaly maps and image scores from a head on conv features.

The paper attaches MADCluster to image detectors (RD4AD, PyramidFlow, RealNet on MVTec AD) by
flattening a feature map ``[B, C, H, W]``. ``wrap()`` offers the two flattenings:

* ``layout="BCHW"`` -> ``[B, h*w, C]``: every spatial position is a point with a C-dimensional
  feature, so the head score is one number per position, ``[B, h*w]``. :func:`head_anomaly_map`
  reshapes it to the feature grid and upsamples it bilinearly to the image: a pixel-level map.
* ``layout="BCHW_seq"`` -> ``[B, C, h*w]`` (the appendix's wording, "[batch, channels,
  height x width]"): every *feature channel* is a point whose feature is its whole spatial
  response, so the head score is one number per channel, ``[B, C]``: how far each channel's
  response pattern lies from the normal ones. It has no spatial axis, hence no pixel map; the
  image-level score is the mean over channels (:func:`channel_image_score`), which a defect
  raises by disturbing the response maps of many channels at once.

Maps combine with the detector's own pixel map (e.g. reconstruction error) through the training
statistics stored by :meth:`MADClusterModel.fit_score_normalizer` (:func:`combine_maps`).
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from .wrapper import COMBINES, MADClusterModel

IMAGE_REDUCTIONS = ("max", "mean", "topk")


def feature_grid(n_positions: int, image_size: tuple[int, int]) -> tuple[int, int]:
    """``(h, w)`` of a feature map with ``h * w = n_positions`` and the image's aspect ratio.

    The flattened hidden state no longer carries ``h`` and ``w``; strided convolutions keep the
    aspect ratio, so ``h = sqrt(n * H / W)``. Raises when no integer grid fits (then pass
    ``feature_size=`` explicitly).
    """
    height, width = image_size
    if n_positions < 1 or height < 1 or width < 1:
        raise ValueError(f"need n_positions >= 1 and a positive image size; got {n_positions}, {image_size}")
    h = int(round(math.sqrt(n_positions * height / width)))
    if h < 1 or n_positions % h:
        raise ValueError(
            f"{n_positions} feature positions do not form a grid with the aspect ratio of a "
            f"{height}x{width} image; pass feature_size=(h, w)")
    return h, n_positions // h


def head_anomaly_map(model: MADClusterModel, image_size: tuple[int, int],
                     feature_size: tuple[int, int] | None = None) -> Tensor:
    """Pixel-level anomaly map ``[B, H, W]`` of the last forward from the head score (layout BCHW).

    The head scores each position of the ``h x w`` feature map; the ``[B, h, w]`` grid is
    upsampled bilinearly (``align_corners=False``, the usual choice for anomaly maps, e.g.
    anomalib) to ``image_size``.
    """
    if not isinstance(model, MADClusterModel):
        raise TypeError("head_anomaly_map needs a MADClusterModel: "
                        "wrap(detector, hidden=..., layout='BCHW')")
    if model.layout != "BCHW":
        hint = ("; BCHW_seq scores feature channels, use channel_image_score()"
                if model.layout == "BCHW_seq" else "")
        raise ValueError(f"a pixel map needs one head score per spatial position: wrap with "
                         f"layout='BCHW' (this model has layout={model.layout!r}{hint})")
    score = model.head_score()
    batch, n = score.shape
    h, w = feature_size if feature_size is not None else feature_grid(n, image_size)
    if h * w != n:
        raise ValueError(f"feature_size={feature_size} has {h * w} positions; the head scored {n}")
    grid = score.reshape(batch, 1, h, w)
    if (h, w) != tuple(image_size):
        grid = F.interpolate(grid, size=tuple(image_size), mode="bilinear", align_corners=False)
    return grid[:, 0]


def channel_image_score(model: MADClusterModel) -> Tensor:
    """Image-level score ``[B]`` of the last forward for layout BCHW_seq: the mean of the head's
    per-channel scores ``[B, C]`` (each channel's spatial response is one point)."""
    if not isinstance(model, MADClusterModel) or model.layout != "BCHW_seq":
        raise ValueError("channel_image_score() reads per-channel head scores: wrap with layout='BCHW_seq'")
    return model.head_score().mean(dim=1)


def image_score(maps: Tensor, reduction: str = "max", topk: float = 0.01) -> Tensor:
    """Image-level score ``[B]`` from pixel maps ``[B, H, W]``.

    ``max`` (the usual image score of pixel-map detectors), ``mean``, or ``topk``: the mean of
    the highest ``topk`` fraction of pixels (less sensitive to one noisy pixel than the max).
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be [B, H, W]; got shape {tuple(maps.shape)}")
    if reduction not in IMAGE_REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; expected one of {IMAGE_REDUCTIONS}")
    flat = maps.flatten(1)
    if reduction == "max":
        return flat.max(dim=1).values
    if reduction == "mean":
        return flat.mean(dim=1)
    if not 0.0 < topk <= 1.0:
        raise ValueError(f"topk must be a fraction in (0, 1]; got {topk}")
    k = max(1, int(round(topk * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(dim=1)


def combine_maps(model: MADClusterModel, head_map: Tensor, base_map: Tensor,
                 combine: str = "sum") -> Tensor:
    """Combine a head map and the detector's own map, both ``[B, H, W]`` (same rules as
    :meth:`MADClusterModel.anomaly_score`).

    ``sum`` standardises both with the statistics of :meth:`MADClusterModel.fit_score_normalizer`
    (call it on *training* maps first), ``product`` multiplies, ``head`` / ``base`` pick one.
    """
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r}; expected one of {COMBINES}")
    if head_map.shape != base_map.shape:
        raise ValueError(f"head_map {tuple(head_map.shape)} and base_map {tuple(base_map.shape)} "
                         f"differ in shape")
    if combine == "head":
        return head_map
    if combine == "base":
        return base_map
    if combine == "product":
        return head_map * base_map
    if not bool(model.score_stats_fitted):
        raise RuntimeError("combine='sum' needs statistics of training maps: call "
                           "model.fit_score_normalizer(train_head_maps, train_base_maps) first")
    mu_h, sd_h, mu_b, sd_b = model.score_stats.tolist()
    return (head_map - mu_h) / sd_h + (base_map - mu_b) / sd_b


__all__ = ["IMAGE_REDUCTIONS", "channel_image_score", "combine_maps", "feature_grid",
           "head_anomaly_map", "image_score"]

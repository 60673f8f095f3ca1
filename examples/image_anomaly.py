"""MADCluster on images (paper appendix D): a convolutional autoencoder on synthetic defect textures.

    python examples/image_anomaly.py [--texture periodic|stochastic] [--epochs 30]

Generates textures with injected defects and pixel masks (no download), trains a small conv
autoencoder plain and wrapped with MADCluster on its bottleneck feature map, with
``layout="BCHW"`` (one head score per spatial position -> a pixel map) and ``layout="BCHW_seq"``
(one head score per feature channel -> an image score), and prints image- and pixel-level AUROC
of the reconstruction-error map, the head map and their standardised sum.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from madcluster_plugin import MADClusterModel, wrap
from madcluster_plugin.image import (channel_image_score, combine_maps, head_anomaly_map,
                                     image_score)
from madcluster_plugin.train import fit

DEFECT_KINDS = ("scratch", "blob", "colour")
TEXTURES = ("periodic", "stochastic")


# ---- data ---------------------------------------------------------------------------------
@dataclass
class TextureDefects:
    """Images ``[N, 3, S, S]`` in [0, 1] (float32), test pixel masks ``[M, S, S]`` and image labels."""

    train: np.ndarray
    test: np.ndarray
    test_masks: np.ndarray
    test_labels: np.ndarray
    test_kinds: list[str] = field(default_factory=list)  # "none" or the defect kind per test image


def _band_noise(rng: np.random.Generator, n: int, size: int, low: float, high: float) -> np.ndarray:
    """Band-pass filtered white noise ``[n, size, size]`` with unit standard deviation per image."""
    f = np.fft.fftfreq(size)
    radius = np.hypot(f[:, None], f[None, :])
    band = ((radius >= low) & (radius <= high)).astype(np.float64)
    noise = np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, size, size))) * band).real
    return noise / noise.std(axis=(1, 2), keepdims=True)


def _textures(rng: np.random.Generator, n: int, size: int, texture: str,
              params: dict[str, Any]) -> np.ndarray:
    """Normal images ``[n, 3, size, size]``: one texture family, random phase/jitter per image."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    if texture == "periodic":  # two oriented gratings: a woven fabric
        pattern = np.zeros((n, size, size))
        for angle, freq, amp in zip(params["angles"], params["freqs"], params["amps"]):
            theta = angle + rng.normal(0, 0.03, size=(n, 1, 1))
            fr = freq * (1 + rng.normal(0, 0.02, size=(n, 1, 1)))
            phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
            pattern += amp * np.sin(2 * np.pi * fr * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
        pattern += 0.05 * _band_noise(rng, n, size, 0.15, 0.5)
    elif texture == "stochastic":  # band-limited noise: a grainy, non-repeating surface
        pattern = 0.3 * _band_noise(rng, n, size, 0.08, 0.25)
    else:
        raise ValueError(f"texture={texture!r}; choose one of {TEXTURES}")
    base = params["base"][None, :, None, None]
    colour = params["colour"][None, :, None, None]
    img = base + colour * pattern[:, None] + 0.02 * rng.standard_normal((n, 3, size, size))
    return img


def _inject(rng: np.random.Generator, img: np.ndarray, kinds: list[str]) -> np.ndarray:
    """Add one defect per image, in place (vectorised over the images of each kind); returns masks."""
    n, _, size, _ = img.shape
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    masks = np.zeros((n, size, size), dtype=bool)
    kinds_arr = np.array(kinds)
    margin = size // 6

    idx = np.flatnonzero(kinds_arr == "scratch")  # a thin straight line, bright or dark
    if len(idx):
        m = len(idx)
        cy, cx = rng.uniform(margin, size - margin, (2, m, 1, 1))
        theta = rng.uniform(0, np.pi, (m, 1, 1))
        half = rng.uniform(0.2, 0.35, (m, 1, 1)) * size
        along = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
        across = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
        mask = (np.abs(along) <= half) & (np.abs(across) <= 0.75)
        value = np.where(rng.random((m, 1, 1, 1)) < 0.5, 0.05, 0.95)
        img[idx] = np.where(mask[:, None], value, img[idx])
        masks[idx] = mask

    idx = np.flatnonzero(kinds_arr == "blob")  # an elliptical stain with a soft edge
    if len(idx):
        m = len(idx)
        cy, cx = rng.uniform(margin, size - margin, (2, m, 1, 1))
        ry, rx = rng.uniform(0.08, 0.16, (2, m, 1, 1)) * size
        r2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        profile = np.exp(-r2)
        shift = np.where(rng.random((m, 1, 1, 1)) < 0.5, -0.35, 0.35)
        img[idx] += shift * profile[:, None]
        masks[idx] = profile > 0.5

    idx = np.flatnonzero(kinds_arr == "colour")  # a patch with its colour channels rotated
    if len(idx):
        m = len(idx)
        h, w = rng.integers(size // 6, size // 3 + 1, (2, m, 1, 1))
        top = rng.integers(0, size - h + 1)
        left = rng.integers(0, size - w + 1)
        mask = (yy >= top) & (yy < top + h) & (xx >= left) & (xx < left + w)
        rotated = np.roll(img[idx], 1, axis=1)
        img[idx] = np.where(mask[:, None], rotated, img[idx])
        masks[idx] = mask
    return masks


def make_texture_defects(n_train: int = 256, n_test: int = 128, size: int = 32, *,
                         texture: str = "periodic", defect_ratio: float = 0.5,
                         kinds: tuple[str, ...] = DEFECT_KINDS, seed: int = 0) -> TextureDefects:
    """Defect-free training textures and test textures of which ``defect_ratio`` carry one defect.

    Defects: ``scratch`` (a 1.5 px line, bright or dark), ``blob`` (a soft elliptical stain, +-0.35
    intensity), ``colour`` (a rectangular patch with its RGB channels rotated). The mask marks the
    changed pixels. The same arguments always give the same arrays.
    """
    if size < 16 or n_train < 1 or n_test < 2:
        raise ValueError(f"need size >= 16, n_train >= 1, n_test >= 2; got {size}, {n_train}, {n_test}")
    if not 0.0 < defect_ratio < 1.0:
        raise ValueError(f"defect_ratio must be in (0, 1); got {defect_ratio}")
    unknown = sorted(set(kinds) - set(DEFECT_KINDS))
    if unknown or not kinds:
        raise ValueError(f"unknown defect kinds {unknown}; choose from {DEFECT_KINDS}")
    rng = np.random.default_rng(seed)
    params = {"angles": rng.uniform(0, np.pi, 2), "freqs": rng.uniform(0.12, 0.22, 2),
              "amps": np.array([0.22, 0.12]), "colour": rng.uniform(0.6, 1.0, 3),
              "base": rng.permutation(np.array([0.65, 0.45, 0.3]))}  # a tinted, not grey, surface
    train = _textures(rng, n_train, size, texture, params)
    test = _textures(rng, n_test, size, texture, params)
    n_bad = int(round(defect_ratio * n_test))
    test_kinds = ["none"] * (n_test - n_bad) + [kinds[i % len(kinds)] for i in range(n_bad)]
    test_kinds = [test_kinds[i] for i in rng.permutation(n_test)]
    masks = _inject(rng, test, test_kinds)
    return TextureDefects(np.clip(train, 0, 1).astype(np.float32), np.clip(test, 0, 1).astype(np.float32),
                          masks, masks.any(axis=(1, 2)).astype(np.int64), test_kinds)


# ---- model --------------------------------------------------------------------------------
class ConvAutoencoder(nn.Module):
    """Three-stage conv autoencoder; ``encoder`` ends in the bottleneck map ``[B, width, S/4, S/4]``."""

    def __init__(self, channels: int = 3, width: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width // 2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width // 2, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 4, stride=2, padding=1))
        self.decoder = nn.Sequential(
            nn.ReLU(), nn.ConvTranspose2d(width, width, 4, stride=2, padding=1),
            nn.ReLU(), nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1),
            nn.ReLU(), nn.Conv2d(width // 2, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


def reconstruction_map(x: Tensor, recon: Tensor) -> Tensor:
    """Per-pixel squared reconstruction error, averaged over colour channels, ``[B, H, W]``."""
    return (recon - x).pow(2).mean(dim=1)


def _mse(out: Tensor, batch: Any) -> Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return F.mse_loss(out, x)


class ShuffledBatches:
    """Re-iterable shuffled mini-batches of images (a new seeded order on every pass)."""

    def __init__(self, images: Tensor, batch_size: int, gen: torch.Generator) -> None:
        self.images, self.batch_size, self.gen = images, batch_size, gen

    def __iter__(self) -> Iterator[Tensor]:
        order = torch.randperm(len(self.images), generator=self.gen)
        for i in range(0, len(order), self.batch_size):
            yield self.images[order[i:i + self.batch_size]]


def train_autoencoder(data: TextureDefects, layout: str | None, *, epochs: int = 30,
                      batch_size: int = 32, lr: float = 2e-3, width: int = 32, seed: int = 0,
                      **head: Any) -> nn.Module:
    """Train the autoencoder plain (``layout=None``) or wrapped on ``encoder`` with ``layout``.

    Plain: Adam on the MSE. Wrapped: ``madcluster_plugin.train.fit`` (MSE + head loss, nu kept
    in range); ``head`` goes to ``wrap`` as MADClusterConfig overrides. ``center_init="data"``
    (the mean bottleneck feature, Deep SVDD's rule) starts the centre where the features are; a
    random He-initialised centre on 32-d conv features is far from all of them.
    """
    torch.manual_seed(seed)
    model: nn.Module = ConvAutoencoder(width=width)
    images = torch.from_numpy(data.train)
    loader = ShuffledBatches(images, batch_size, torch.Generator().manual_seed(seed))
    if layout is None:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(epochs):
            for x in loader:
                opt.zero_grad(set_to_none=True)
                _mse(model(x), x).backward()
                opt.step()
    else:
        model = wrap(model, hidden="encoder", layout=layout, example_input=images[:2], **head)
        fit(model, loader, _mse, epochs, lr=lr, progress=False, distributed=False, seed=seed)
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, data: TextureDefects, combine: str = "sum") -> dict[str, float]:
    """Image- and pixel-level AUROC of the reconstruction map and, when wrapped, the head.

    BCHW: pixel maps ``recon``, ``head`` and ``combined`` (standardised sum with training
    statistics); image score = max of each map. BCHW_seq: the head gives per-channel scores,
    image score = their mean (``head``), and ``combined`` = standardised sum of that and the
    reconstruction image score; pixel AUROC only for the reconstruction map.
    """
    train = torch.from_numpy(data.train)
    test = torch.from_numpy(data.test)
    size = tuple(test.shape[-2:])
    labels, masks = data.test_labels, data.test_masks.reshape(-1)
    recon = reconstruction_map(test, model(test))
    out = {"image_auroc_recon": roc_auc_score(labels, image_score(recon).numpy()),
           "pixel_auroc_recon": roc_auc_score(masks, recon.reshape(-1).numpy())}
    if not isinstance(model, MADClusterModel):
        return out
    if model.layout == "BCHW":
        train_recon = reconstruction_map(train, model(train))
        model.fit_score_normalizer(head_anomaly_map(model, size), train_recon)
        model(test)
        head = head_anomaly_map(model, size)
        combined = combine_maps(model, head, recon, combine)
        for name, m in (("head", head), ("combined", combined)):
            out[f"image_auroc_{name}"] = roc_auc_score(labels, image_score(m).numpy())
            out[f"pixel_auroc_{name}"] = roc_auc_score(masks, m.reshape(-1).numpy())
    else:
        train_recon = image_score(reconstruction_map(train, model(train)))
        train_head = channel_image_score(model)
        model.fit_score_normalizer(train_head, train_recon)
        model(test)
        head = channel_image_score(model)
        mu_h, sd_h, mu_b, sd_b = model.score_stats.tolist()
        combined = (head - mu_h) / sd_h + (image_score(recon) - mu_b) / sd_b
        out["image_auroc_head"] = roc_auc_score(labels, head.numpy())
        out["image_auroc_combined"] = roc_auc_score(labels, combined.numpy())
    return {k: float(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texture", choices=TEXTURES, default="periodic")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = make_texture_defects(n_train=args.n_train, texture=args.texture, seed=args.seed)
    print(f"{args.texture} textures: {len(data.train)} train, {len(data.test)} test "
          f"({int(data.test_labels.sum())} with defects, {data.test_masks.mean():.3%} defect pixels)")
    print(f"{'model':28s} {'map':9s} {'image AUROC':>11s} {'pixel AUROC':>11s}")
    for title, layout in (("autoencoder", None), ("+MADCluster BCHW", "BCHW"),
                          ("+MADCluster BCHW_seq", "BCHW_seq")):
        head = {} if layout is None else {"center_init": "data"}
        res = evaluate(train_autoencoder(data, layout, epochs=args.epochs, seed=args.seed, **head), data)
        for name in ("recon", "head", "combined"):
            if f"image_auroc_{name}" in res:
                pixel = res.get(f"pixel_auroc_{name}")
                print(f"{title:28s} {name:9s} {res[f'image_auroc_{name}']:11.3f} "
                      f"{'-' if pixel is None else f'{pixel:.3f}':>11s}")


if __name__ == "__main__":
    main()

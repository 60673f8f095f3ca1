"""Two-line wrapping of a small detector on the built-in synthetic data.

    python examples/quickstart.py

Trains a GRU autoencoder with MADCluster attached to its encoder, prints the loss and nu per
epoch (nu rises), and the AUROC of the head score and of the combined score on test data.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.synthetic import make_synthetic
from madcluster_plugin import wrap
from madcluster_plugin.train import fit


class GRUAutoencoder(nn.Module):
    def __init__(self, channels: int, hidden: int = 32) -> None:
        super().__init__()
        self.encoder = nn.GRU(channels, hidden, batch_first=True)
        self.decoder = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)[0])


def sliding(series: np.ndarray, window: int, stride: int) -> torch.Tensor:
    starts = range(0, len(series) - window + 1, stride)
    return torch.from_numpy(np.stack([series[s:s + window] for s in starts])).float()


def main() -> None:
    torch.manual_seed(0)
    data = make_synthetic(n_channels=6, n_train=3000, n_test=2000, seed=0)
    window = 50
    loader = DataLoader(TensorDataset(sliding(data.train, window, 5)), batch_size=64, shuffle=True)

    model = wrap(GRUAutoencoder(6), hidden="encoder")                       # line 1
    recon = lambda out, batch: (out - batch[0]).pow(2).mean()                 # noqa: E731
    history = fit(model, loader, recon, epochs=5, lr=3e-3, progress=False)  # line 2: loss + head
    for epoch, (loss, nu) in enumerate(zip(history.loss, history.nu), 1):
        print(f"epoch {epoch}: loss {loss:.4f}  nu {nu:.4f}")

    model.eval()
    with torch.no_grad():
        train_x = sliding(data.train, window, window)
        base_train = (model(train_x) - train_x).pow(2).mean(-1)
        model.fit_score_normalizer(model.head_score(), base_train)
        test_x = sliding(data.test, window, window)
        base = (model(test_x) - test_x).pow(2).mean(-1)
        head = model.head_score()
        combined = model.anomaly_score(base, combine="sum")
    labels = data.test_labels[: test_x.shape[0] * window]
    for name, s in (("reconstruction", base), ("MADCluster head", head), ("sum", combined)):
        print(f"AUROC {name:16s} {roc_auc_score(labels, s.reshape(-1).numpy()):.3f}")


if __name__ == "__main__":
    main()

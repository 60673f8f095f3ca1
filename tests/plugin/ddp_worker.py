"""Worker for the two-process DDP test (launched by torchrun from test_ddp.py).

Trains a wrapped GRU detector with madcluster_plugin.train.fit under DDP (gloo), then every rank
writes its head parameters; rank 0 also writes the full state dict.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from madcluster_plugin import wrap
from madcluster_plugin.train import fit, rank


class Det(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.GRU(3, 8, batch_first=True)
        self.decoder = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)[0])


def main(out_dir: str, objective: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 12, 3)
    loader = DataLoader(TensorDataset(x), batch_size=16, shuffle=True)
    model = wrap(Det(), hidden="encoder", objective=objective)
    fit(model, loader, lambda out, b: (out - b[0]).pow(2).mean(), 3, lr=1e-2, progress=False)
    out = Path(out_dir)
    torch.save({"centers": model.head.centers.detach().clone(),
                "nu": model.head.threshold_raw.detach().clone(),
                "radius": model.head.radius.clone(),
                "decoder": model.backbone.decoder.weight.detach().clone()}, out / f"rank{rank()}.pt")
    if rank() == 0:
        torch.save(model.state_dict(), out / "model.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""Worker of the two-process DDP tests (launched by torchrun from tests/plugin/test_ddp.py).

Trains wrapped models with :func:`madcluster_plugin.train.fit` under DDP (gloo, CPU) and also,
run without torchrun, the single-process reference with the same global batch and sample
order (``python ddp_worker.py OUT single``). Every case writes ``<case>_rank<r>.pt`` (the
model's state_dict and history) on every rank; ``fit(checkpoint=...)`` writes
``ckpt/<case>.pt`` on rank 0 only.

Cases (``CASES``):

* ``deepsvdd``: the DeepSVDD baseline built by its adapter, head on ``encoder.proj``, one-class
  head objective, ``reduction="mean"`` (the DDP mean of per-rank means is the global mean; the
  default ``log-sum`` takes the log per rank, which is not the log of the global mean);
* ``soft_boundary``: the same with the soft-boundary objective (radius from all ranks' distances);
* ``k2_mapping``: K = 2 and ``components="mapping"``: nu gets no gradient at all, which DDP's
  reducer would wait for if the head were inside it;
* ``unused``: a GRU detector with a parameter its loss never uses (DDP cannot reduce it: fit
  falls back to averaging gradients before each step).

The training loader has a per-rank batch of 8 with a ``DistributedSampler`` built by ``fit``;
the reference uses batch 16 and ``DistributedSampler(num_replicas=1, shuffle=True, seed=0)``,
whose epoch permutation is the same, so each global step sees the same 16 windows.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import adapters
from madcluster_plugin import MADClusterModel, train, wrap
from madcluster_plugin.train import fit, rank

CASES = ("deepsvdd", "soft_boundary", "k2_mapping", "unused")
N_WINDOWS, WINDOW, CHANNELS, PER_RANK_BATCH, EPOCHS, LR = 48, 12, 3, 8, 3, 1e-2


class WithUnused(nn.Module):
    """A GRU auto-encoder with one parameter its loss never touches."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.GRU(CHANNELS, 8, batch_first=True)
        self.decoder = nn.Linear(8, CHANNELS)
        self.spare = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)[0])


def data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    t = torch.arange(WINDOW, dtype=torch.float32)
    phase = torch.rand(N_WINDOWS, 1, CHANNELS, generator=gen) * 6.28
    return torch.sin(t[None, :, None] * 0.5 + phase) + 0.1 * torch.randn(N_WINDOWS, WINDOW, CHANNELS,
                                                                          generator=gen)


def build(case: str, x: torch.Tensor) -> tuple[MADClusterModel, object]:
    """The wrapped model of ``case`` (same seed, so the same initial weights) and its loss."""
    torch.manual_seed(0)
    if case == "unused":
        model = wrap(WithUnused(), hidden="encoder", reduction="mean")
        return model, lambda out, b: (out - b[0]).pow(2).mean()
    adapter = adapters.get("deepsvdd")
    plain = adapter.build(CHANNELS, window=WINDOW, hidden=8, n_layers=1, rep_dim=4)
    plain.on_fit_start([x])  # DeepSVDD's centre: the mean embedding of all training windows
    head = {"deepsvdd": {}, "soft_boundary": {"objective": "soft-boundary"},
            "k2_mapping": {"n_clusters": 2, "components": "mapping", "center_init": "data"}}[case]
    model = adapter.wrap(plain, reduction="mean", **head)
    return model, lambda out, b: plain.loss(b[0], out, 0)["svdd"]


def loader(x: torch.Tensor, distributed: bool) -> DataLoader:
    ds = TensorDataset(x)
    if distributed:  # fit() re-builds it on a DistributedSampler (shuffle kept, seed 0)
        return DataLoader(ds, batch_size=PER_RANK_BATCH, shuffle=True)
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
    return DataLoader(ds, batch_size=2 * PER_RANK_BATCH, sampler=sampler)


def main(out_dir: str, mode: str) -> None:
    out = Path(out_dir)
    distributed = mode == "ddp"
    x = data()
    writes: list[str] = []  # checkpoint files this process wrote
    real_write = train.write_checkpoint

    def counting_write(model: nn.Module, path: Path, **extra: object) -> Path:
        writes.append(Path(path).name)
        return real_write(model, path, **extra)

    train.write_checkpoint = counting_write
    for case in CASES:
        writes.clear()
        model, loss_fn = build(case, x)
        val = DataLoader(TensorDataset(x[:20]), batch_size=6)  # 4 batches: 2 per rank
        ckpt = out / "ckpt" / f"{case}.pt" if distributed else None
        history = fit(model, loader(x, distributed), loss_fn, EPOCHS, lr=LR, val_loader=val,
                      progress=False, distributed=distributed, checkpoint=ckpt)
        tag = f"rank{rank()}" if distributed else "single"
        torch.save({"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                    "val_loss": history.val_loss, "loss": history.loss, "nu": history.nu,
                    "best_epoch": history.best_epoch, "writes": list(writes)},
                   out / f"{case}_{tag}.pt")
    train.write_checkpoint = real_write
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])

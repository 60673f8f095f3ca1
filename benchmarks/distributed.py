"""The benchmark runner under ``torchrun``: who trains on what, who evaluates, who writes.

One run is trained by all ranks together (docs/distributed.md):

* **Batches.** ``profile.batch`` is the *global* batch, so a run's optimisation does not depend
  on the number of processes. Every rank draws the same epoch permutation (same seed) and takes
  the rows ``r, r + W, r + 2W, ...`` of each global batch (a ``DistributedSampler`` over that
  batch): the union over ranks is exactly the single-process batch. A last batch shorter than
  ``W`` is padded by repeating its rows (as ``DistributedSampler`` pads).
* **Gradients.** Adapters with the default single-backward ``train_step`` train through a DDP
  container (:func:`madcluster_plugin.train.ddp_wrap`; the MADCluster head is averaged by
  :func:`~madcluster_plugin.train.sync_gradients`). Adapters with their own multi-phase
  ``train_step`` (USAD, BeatGAN) take a backward per phase, or two backward passes on one
  forward, which DDP's reducer cannot follow; they get the plain model and every phase's
  optimiser averages its gradients right before stepping (``gradient_sync = "manual"``). A
  checksum after each such step re-synchronises from rank 0 when the step took a rank-local
  decision (BeatGAN re-initialises D when *its* D loss is tiny).
* **Evaluation.** Validation loss, the score normaliser and test/validation scores are
  computed on whole batches dealt round-robin to the ranks (each batch as in one process),
  with the unwrapped model. Loss sums are all-reduced; scores are gathered to rank 0 in batch
  order; metrics, rows, artefacts, tables and plots are rank 0's while the other ranks wait.
"""
from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from madcluster_plugin import train as dist_train

log = logging.getLogger(__name__)

#: how long ranks wait in a collective; rank 0 alone computes the metrics (VUS on long test
#: series), writes rows, tables and plots, while the others wait for the next run
TIMEOUT = datetime.timedelta(hours=2)
#: offset between the per-rank torch seeds of the training loop (dropout, sampling noise)
RANK_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class Context:
    """This process's place in the run: ``rank`` of ``world`` (0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def context() -> Context:
    """The current :class:`Context`; an error when torchrun launched us but nobody set up the group."""
    if dist_train.is_distributed():
        return Context(dist_train.rank(), dist_train.world_size())
    if dist_train.launched_by_torchrun():
        raise RuntimeError("launched by torchrun but the process group is not initialised: call "
                           "benchmarks.distributed.setup(device) before building a ResultStore or "
                           "running the grid")
    return Context()


def setup(device: str) -> tuple[Context, str]:
    """Initialise the process group when launched by torchrun (nccl for ``cuda``, gloo for
    ``cpu``); return the context and this rank's device (``cuda`` -> ``cuda:<LOCAL_RANK>``)."""
    if not dist_train.init_distributed(torch.device(device), timeout=TIMEOUT):
        return Context(), device
    ctx = context()
    if device.startswith("cuda"):
        local = f"cuda:{dist_train.local_rank()}"
        if device not in ("cuda", local) and ctx.main:
            log.warning("--device %s under torchrun: each rank uses its LOCAL_RANK's GPU instead", device)
        device = local
    return ctx, device


def teardown(wait: bool = True) -> None:
    """Destroy the process group (end of a torchrun job), after a barrier when ``wait``."""
    if dist_train.is_distributed():
        if wait:
            dist_train.barrier()
        torch.distributed.destroy_process_group()


def local_device(device: str, ctx: Context) -> str:
    """This rank's device for a configured ``device`` (``cuda`` -> ``cuda:<LOCAL_RANK>``)."""
    if ctx.active and device.startswith("cuda"):
        return f"cuda:{dist_train.local_rank()}"
    return device


def device_label(device: str, ctx: Context) -> str:
    """The ``device`` column: ``cpu`` / ``cuda:0`` alone, ``cpu x2`` / ``cuda x4`` under DDP."""
    return f"{device.split(':')[0]} x{ctx.world}" if ctx.active else device


# ---- data ---------------------------------------------------------------------------------
def global_batches(order: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    """Consecutive global batches of ``order`` (the last one may be shorter)."""
    for i in range(0, len(order), batch):
        yield order[i:i + batch]


def shard_rows(rows: np.ndarray, ctx: Context) -> np.ndarray:
    """This rank's rows of one global batch: ``rows[rank::world]``; a batch shorter than the
    world is padded by repeating its rows, so every rank trains on every step."""
    if not ctx.active:
        return rows
    if len(rows) == 0:
        raise ValueError("cannot shard an empty batch")
    if len(rows) < ctx.world:
        return rows[[ctx.rank % len(rows)]]
    return rows[ctx.rank::ctx.world]


def is_mine(index: int, ctx: Context) -> bool:
    """Whether this rank evaluates batch ``index`` (round-robin over ranks)."""
    return index % ctx.world == ctx.rank


def gather_in_order(local: Sequence[tuple[int, np.ndarray]], ctx: Context) -> list[np.ndarray] | None:
    """Rank 0: every rank's ``(batch index, array)`` pairs as one list in batch order; others: None."""
    if not ctx.active:
        return [a for _, a in sorted(local, key=lambda t: t[0])]
    parts: list[Any] | None = [None] * ctx.world if ctx.main else None
    torch.distributed.gather_object(list(local), parts, dst=0)
    if parts is None:
        return None
    pairs = [pair for part in parts for pair in part]
    return [a for _, a in sorted(pairs, key=lambda t: t[0])]


# ---- training -----------------------------------------------------------------------------
@dataclass
class Prepared:
    """What the training loop uses: ``model`` goes to ``train_step``; ``mode`` is ``ddp``,
    ``manual`` or ``single``; ``inner`` is the plain (wrapped or not) model."""

    model: nn.Module
    inner: nn.Module
    mode: str
    resyncs: int = 0

    def after_step(self) -> None:
        """In ``manual`` mode: re-synchronise from rank 0 if a rank-local decision diverged."""
        if self.mode == "manual" and dist_train.resync_if_diverged(self.inner):
            self.resyncs += 1

    def after_epoch(self) -> None:
        """Rank 0's buffers everywhere (BatchNorm statistics and other batch-updated buffers)."""
        if self.mode != "single":
            dist_train.broadcast_module_(self.inner, buffers_only=True)

    def check_in_sync(self) -> None:
        if self.mode != "single" and not dist_train.parameters_in_sync(self.inner):
            raise RuntimeError("the ranks' parameters differ after training; a train_step took a "
                               "rank-local decision that gradient averaging cannot see (set the "
                               "adapter's grad_sync = 'manual' to re-synchronise after each step)")


def unused_backbone_parameters(adapter: Any, model: nn.Module, x: torch.Tensor) -> list[str]:
    """Trainable non-head parameters without gradient in one default ``train_step`` loss on ``x``
    (a dry run: :func:`madcluster_plugin.train.unused_parameters`)."""
    from adapters.base import is_wrapped
    from madcluster_plugin import unwrap_model

    def loss() -> torch.Tensor:
        model.train()
        _, terms = adapter.base_loss(model, x, 0)
        total = sum(terms.values())
        if is_wrapped(model):
            total = total + unwrap_model(model).madcluster_loss()
        return total

    head = set(dist_train.head_parameter_names(model))
    return [n for n in dist_train.unused_parameters(model, loss) if n not in head]


def prepare(model: nn.Module, adapter: Any, optimizers: dict[str, torch.optim.Optimizer],
            device: str, seed: int, ctx: Context, probe: torch.Tensor | None = None) -> Prepared:
    """Set up gradient averaging for one run (no-op in one process).

    ``adapter.gradient_sync`` decides between a DDP container and per-step averaging; a DDP
    adapter whose loss leaves backbone parameters without gradient on the ``probe`` batch
    (DCdetector) is averaged per step too, since DDP's reducer would wait for them. Rank 0's
    initial state is broadcast (it covers any rank-dependent initialisation), then each rank
    re-seeds torch with its own stream so dropout masks and sampling noise differ between
    ranks, as they differ between the rows of one single-process batch.
    """
    if not ctx.active:
        return Prepared(model, model, "single")
    mode = adapter.gradient_sync
    if mode == "ddp" and probe is not None:
        unused = unused_backbone_parameters(adapter, model, probe)
        if dist_train.any_rank(bool(unused)):
            mode = "manual"
            if ctx.main:
                log.info("%s: %d parameter(s) get no gradient (%s...): gradients are averaged "
                         "before each optimiser step instead of by DDP", adapter.name,
                         len(unused), ", ".join(unused[:3]))
    if mode == "ddp":
        ddp = dist_train.ddp_wrap(model, torch.device(device))
        head = dist_train.unmanaged_parameters(ddp)
        for opt in optimizers.values():
            dist_train.sync_gradients(opt, head)
        prepared = Prepared(ddp, model, mode)
    else:
        dist_train.broadcast_module_(model)
        for opt in optimizers.values():
            dist_train.sync_gradients(opt)
        prepared = Prepared(model, model, mode)
    torch.manual_seed(seed + RANK_SEED_STRIDE * (ctx.rank + 1))
    return prepared

"""A small, optional training loop for users who have none: ``fit(model, loader, loss_fn, epochs)``.

It adds the head loss to the user's loss, keeps nu without weight decay and inside (eps, 1-eps),
updates the soft-boundary radius from training distances, records nu per epoch, and keeps the
best checkpoint on a validation loader. Launched under ``torchrun`` it runs the same loop with
DistributedDataParallel (process group from the environment, ``DistributedSampler``, progress
and logging on rank 0, validation loss and radius statistics reduced over ranks).
"""
from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from .wrapper import MADClusterModel

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], Tensor]


@dataclass
class FitHistory:
    """Per-epoch records of :func:`fit`."""

    loss: list[float] = field(default_factory=list)
    madcluster: list[float] = field(default_factory=list)
    nu: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int | None = None


# ---- distributed helpers ------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    """True when the environment carries a multi-process torchrun launch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def init_distributed(device: torch.device | None = None) -> bool:
    """Initialise the process group from torchrun's environment (nccl on GPUs, gloo on CPU).

    Returns True when running distributed. Safe to call more than once.
    """
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    use_cuda = (device is not None and device.type == "cuda") or (device is None and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend)
    log.info("initialised %s process group: rank %d of %d", backend, rank(), world_size())
    return True


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Mean of a float over ranks (identity when not distributed)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t) / world_size()


def distributed_loader(loader: Any, shuffle: bool, seed: int) -> Any:
    """The same DataLoader with a ``DistributedSampler`` (each rank gets its shard)."""
    from torch.utils.data import DataLoader, DistributedSampler

    if not isinstance(loader, DataLoader) or isinstance(loader.sampler, DistributedSampler):
        return loader
    sampler = DistributedSampler(loader.dataset, shuffle=shuffle, seed=seed, drop_last=loader.drop_last)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last)


def _inputs(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _progress(iterable: Iterable[Any], enabled: bool, **kwargs: Any) -> Iterable[Any]:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)


def fit(model: MADClusterModel, loader: Iterable[Any], loss_fn: LossFn, epochs: int, *,
        lr: float = 1e-3, weight_decay: float = 0.0, val_loader: Iterable[Any] | None = None,
        device: str | torch.device | None = None, progress: bool = True,
        distributed: bool | str = "auto", restore_best: bool = True, seed: int = 0) -> FitHistory:
    """Train ``model`` (a :class:`MADClusterModel`) for ``epochs`` epochs; return the history.

    ``loss_fn(output, batch)`` is the detector's own loss; the head loss is added to it. A batch
    is a tensor or a tuple whose first item is the model input. With ``val_loader`` the best
    epoch (lowest validation total loss) is restored at the end when ``restore_best``.
    ``distributed="auto"`` uses DDP when launched by torchrun.
    """
    if not isinstance(model, MADClusterModel):
        raise TypeError("fit() trains a MADClusterModel; wrap your detector first: wrap(detector, hidden=...)")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1; got {epochs}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    use_ddp = init_distributed(dev) if distributed in ("auto", True) else False
    if distributed is True and not use_ddp:
        raise RuntimeError("distributed=True but no torchrun launch found (WORLD_SIZE/RANK unset)")
    if use_ddp and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    model.to(dev)
    if use_ddp:
        loader = distributed_loader(loader, shuffle=True, seed=seed)
        if val_loader is not None:
            val_loader = distributed_loader(val_loader, shuffle=False, seed=seed)
    if not bool(model.head.centers_initialized):
        model.initialize_centers(_to(_inputs(b), dev) for b in loader)
        if use_ddp:  # every rank starts from rank 0's centres
            torch.distributed.broadcast(model.head.centers.data, src=0)
    runner: nn.Module = model
    if use_ddp:
        runner = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameter_groups(lr, weight_decay), lr=lr)
    soft_boundary = model.head.config.objective == "soft-boundary"
    history = FitHistory()
    best_state: dict[str, Tensor] | None = None
    best_val = math.inf
    main = rank() == 0
    for epoch in range(epochs):
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        model.train()
        sums = {"loss": 0.0, "madcluster": 0.0}
        n_batches = 0
        distances: list[Tensor] = []
        bar = _progress(loader, progress and main, desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        for batch in bar:
            batch = _to(batch, dev)
            optimizer.zero_grad(set_to_none=True)
            out = runner(_inputs(batch))
            head_loss = model.madcluster_loss()
            total = loss_fn(out, batch) + head_loss
            if not torch.isfinite(total):
                raise FloatingPointError(f"non-finite loss {float(total)} at epoch {epoch}; lower lr")
            total.backward()
            optimizer.step()
            model.after_optimizer_step()
            if soft_boundary:
                distances.append(model.head_output().sq_distances.detach().reshape(-1, model.head.config.n_clusters))
            sums["loss"] += float(total.detach())
            sums["madcluster"] += float(head_loss.detach())
            n_batches += 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{float(total):.4f}", nu=f"{model.threshold:.4f}")
        if n_batches == 0:
            raise ValueError("the training loader yielded no batches")
        if soft_boundary:
            model.head.update_radius(torch.cat(distances))
        history.loss.append(all_reduce_mean(sums["loss"] / n_batches, dev))
        history.madcluster.append(all_reduce_mean(sums["madcluster"] / n_batches, dev))
        history.nu.append(model.threshold)
        if val_loader is not None:
            val = all_reduce_mean(evaluate_loss(model, val_loader, loss_fn, dev), dev)
            history.val_loss.append(val)
            if val < best_val:
                best_val, history.best_epoch = val, epoch
                best_state = copy.deepcopy(model.state_dict())
        if main:
            log.info("epoch %d: loss %.5f madcluster %.5f nu %.5f%s", epoch + 1, history.loss[-1],
                     history.madcluster[-1], history.nu[-1],
                     f" val {history.val_loss[-1]:.5f}" if history.val_loss else "")
    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
    return history


@torch.no_grad()
def evaluate_loss(model: MADClusterModel, loader: Iterable[Any], loss_fn: LossFn,
                  device: torch.device) -> float:
    """Mean total loss (detector + head) over ``loader`` in eval mode."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for batch in loader:
        batch = _to(batch, device)
        out = model(_inputs(batch))
        total += float(loss_fn(out, batch) + model.madcluster_loss())
        n += 1
    model.train(was_training)
    if n == 0:
        raise ValueError("the validation loader yielded no batches")
    return total / n

"""A small, optional training loop for users who have none: ``fit(model, loader, loss_fn, epochs)``.

It adds the head loss to the user's loss, keeps nu without weight decay and inside (eps, 1-eps),
updates the soft-boundary radius from training distances, records nu per epoch, keeps the best
checkpoint on a validation loader and can write it to disk.

Launched under ``torchrun`` the same loop runs with DistributedDataParallel (docs/distributed.md):

* the process group comes from torchrun's environment (nccl on GPUs, gloo on CPU);
* the training loader is re-built on a ``DistributedSampler`` (its ``batch_size`` is per rank, as
  in plain PyTorch DDP: the global batch is ``world_size * batch_size``);
* the backbone's gradients are averaged by DDP during ``backward``; the head's parameters
  (centres, nu) are left out of DDP's reducer and averaged by :func:`sync_gradients` right before
  the optimiser steps. The hook-then-``madcluster_loss()`` pattern computes the head loss
  *after* DDP's forward, which DDP accepts only with ``find_unused_parameters=False`` and only
  when every parameter it manages gets a gradient in every backward (ECOSYSTEM.md section 4).
  nu gets none for ``n_clusters > 1`` or ``components="mapping"``, and none in the phases of
  multi-phase detectors that do not train the head: keeping the head outside the reducer makes
  all of these work, and centres and nu stay bit-identical on every rank;
* the soft-boundary radius is computed from the distances of all ranks (``update_radius``
  gathers them), the validation loss is computed on whole batches dealt round-robin to the
  ranks and summed over them (the same number as one process on the full loader);
* progress bars, logging and checkpoint files are rank 0's; :func:`save_checkpoint` writes the
  unwrapped model's ``state_dict`` (no ``module.`` prefix), so it loads into a single-process
  model with :func:`load_checkpoint` or plain ``load_state_dict``.
"""
from __future__ import annotations

import copy
import datetime
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .capture import strip_prefixes, unwrap_container
from .files import atomic_write
from .head import MADClusterHead
from .wrapper import MADClusterModel

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], Tensor]
CHECKPOINT_FORMAT = "madcluster-plugin/checkpoint-1"


@dataclass
class FitHistory:
    """Per-epoch records of :func:`fit` (losses are means over all ranks under DDP)."""

    loss: list[float] = field(default_factory=list)
    madcluster: list[float] = field(default_factory=list)
    nu: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int | None = None


# ---- process group ------------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    """True when the environment carries a multi-process torchrun launch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its node (torchrun's ``LOCAL_RANK``; 0 when not launched by it)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: torch.device | str | None = None,
                     timeout: datetime.timedelta | None = None) -> bool:
    """Initialise the process group from torchrun's environment (nccl on GPUs, gloo on CPU).

    ``device`` picks the backend: a CUDA device (or ``None`` with CUDA available) -> nccl and
    ``torch.cuda.set_device(LOCAL_RANK)``; otherwise gloo. ``timeout`` bounds how long a rank
    waits in a collective (torch's default when ``None``). Returns True when running
    distributed. Safe to call more than once.
    """
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    dev = torch.device(device) if isinstance(device, str) else device
    use_cuda = (dev is not None and dev.type == "cuda") or (dev is None and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank())
    kwargs: dict[str, Any] = {"backend": backend}
    if timeout is not None:
        kwargs["timeout"] = timeout
    torch.distributed.init_process_group(**kwargs)
    log.info("initialised %s process group: rank %d of %d", backend, rank(), world_size())
    return True


def _comm_device() -> torch.device:
    """Where collective buffers must live: the current GPU for nccl, else the CPU."""
    if is_distributed() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        torch.distributed.barrier()


def all_reduce_mean(value: float, device: torch.device | None = None) -> float:
    """Mean of a float over ranks (identity when not distributed)."""
    if not is_distributed():
        return value
    return all_reduce_sum([value])[0] / world_size()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of a list of floats over ranks, in float64 (identity when not distributed)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled; keep it small)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled)."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_rows(x: Tensor | None) -> Tensor | None:
    """Concatenate ``x [N_r, ...]`` over ranks in rank order; a rank may pass ``None`` (no rows).

    Returns ``None`` only when every rank passed ``None``. Shapes after the first dimension
    must agree. Used for statistics that need every rank's rows (score normalisers).
    """
    if not is_distributed():
        return x
    parts = all_gather_objects(None if x is None else x.detach().cpu())
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    device = x.device if x is not None else torch.device("cpu")
    return torch.cat(parts).to(device)


# ---- keeping replicas identical -----------------------------------------------------------
@torch.no_grad()
def broadcast_module_(module: nn.Module, src: int = 0, buffers_only: bool = False) -> None:
    """Copy rank ``src``'s parameters (unless ``buffers_only``) and buffers into every rank.

    Used after data-dependent initialisation (centres, ``on_fit_start``) and at epoch ends for
    buffers updated from local batches (BatchNorm statistics, a batch-quantile radius), which
    gradient averaging does not keep equal (ECOSYSTEM.md section 4, "Buffers").
    """
    if not is_distributed():
        return
    tensors = [] if buffers_only else [p.data for p in module.parameters()]
    tensors += [b for b in module.buffers()]
    for t in tensors:
        torch.distributed.broadcast(t, src=src)


@torch.no_grad()
def _checksums(module: nn.Module) -> Tensor:
    params = [p.detach() for p in module.parameters()]
    if not params:
        return torch.zeros(2, dtype=torch.float64, device=_comm_device())
    total = torch.stack([p.sum(dtype=torch.float64) for p in params]).sum()
    squares = torch.stack([p.double().pow(2).sum() for p in params]).sum()
    return torch.stack([total, squares]).to(_comm_device())


def parameters_in_sync(module: nn.Module) -> bool:
    """True when every rank holds bit-identical parameter sums and sums of squares (one collective)."""
    if not is_distributed():
        return True
    sums = _checksums(module)
    both = torch.cat([sums, -sums])
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
    return bool(torch.equal(both[:2], -both[2:]))


def resync_if_diverged(module: nn.Module, src: int = 0) -> bool:
    """Broadcast rank ``src``'s state when the ranks' parameters differ; True if it had to.

    A guard for training steps that take rank-local decisions after a step (for example a
    re-initialisation triggered by this rank's loss): rank ``src`` decides for everyone.
    """
    if parameters_in_sync(module):
        return False
    broadcast_module_(module, src=src)
    return True


def _all_reduce_mean_(tensors: list[Tensor]) -> None:
    """Average ``tensors`` over ranks in place, one flat all-reduce per (device, dtype)."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        if t.is_sparse:
            raise ValueError("sync_gradients handles dense gradients only; use dense embeddings "
                             "(sparse=False) under DDP")
        groups.setdefault((t.device, t.dtype), []).append(t)
    world = world_size()
    comm = _comm_device()
    for ts in groups.values():
        flat = torch.cat([t.reshape(-1) for t in ts]).to(comm)
        torch.distributed.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for t in ts:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


def sync_gradients(optimizer: torch.optim.Optimizer,
                   params: Iterable[nn.Parameter] | None = None) -> Any:
    """Average the gradients of ``params`` (all of the optimiser's when ``None``) over ranks
    right before ``optimizer.step()``; returns the hook handle (``.remove()`` detaches it).

    For parameters DDP does not reduce: the MADCluster head (see the module docstring) and,
    for detectors trained in several phases with their own ``train_step``, every parameter of
    each phase's optimiser. Parameters whose ``.grad`` is ``None`` are skipped (every rank must
    produce gradients for the same parameters, which holds when all ranks run the same code).
    Code between ``backward()`` and ``step()`` that reads gradients (clipping) sees the local
    gradients of these parameters.
    """
    chosen = None if params is None else {id(p) for p in params}

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not is_distributed() or world_size() == 1:
            return
        grads = [p.grad for group in opt.param_groups for p in group["params"]
                 if p.grad is not None and (chosen is None or id(p) in chosen)]
        if grads:
            _all_reduce_mean_(grads)

    return optimizer.register_step_pre_hook(hook)


class DistributedModel(nn.parallel.DistributedDataParallel):
    """``DistributedDataParallel`` that forwards unknown attributes to the wrapped module.

    ``ddp.madcluster_loss()``, ``ddp.head``, ``ddp.after_optimizer_step()`` and
    ``ddp.threshold`` reach the :class:`MADClusterModel` inside, so adapter code written for a
    plain model runs unchanged. ``forward`` is DDP's (gradients are all-reduced); evaluate
    with :func:`madcluster_plugin.unwrap_model` (a DDP forward is a collective).
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("module")
            if inner is None or name == "module":
                raise
            return getattr(inner, name)


def head_parameter_names(module: nn.Module) -> list[str]:
    """Fully qualified names of every :class:`MADClusterHead` parameter inside ``module``."""
    names = []
    for prefix, sub in module.named_modules():
        if isinstance(sub, MADClusterHead):
            names += [f"{prefix}.{n}" if prefix else n for n, _ in sub.named_parameters()]
    return names


def ddp_wrap(model: nn.Module, device: torch.device | str | None = None,
             **ddp_kwargs: Any) -> DistributedModel:
    """Wrap ``model`` in :class:`DistributedModel` with the MADCluster head outside the reducer.

    Rank 0's parameters and buffers are broadcast first (the head's too, which DDP's own
    initial sync skips). Pair it with :func:`sync_gradients` on the optimiser for the head's
    parameters (:func:`unmanaged_parameters`). ``ddp_kwargs`` go to DDP
    (``find_unused_parameters`` must stay False when the head loss is computed after forward).
    """
    inner = unwrap_container(model)
    dev = torch.device(device) if device is not None else _first_device(inner)
    ignore = head_parameter_names(inner)
    if ignore:
        # DDP's documented workaround for parameters it must not reduce (pytorch/pytorch#43690)
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(inner, ignore)
    managed = [n for n, p in inner.named_parameters() if p.requires_grad and n not in set(ignore)]
    if not managed:
        raise ValueError("the model has no trainable parameters outside the MADCluster head for DDP "
                         "to reduce; train it without DDP and call sync_gradients(optimizer)")
    broadcast_module_(inner)
    device_ids = [dev.index if dev.index is not None else torch.cuda.current_device()] \
        if dev.type == "cuda" else None
    return DistributedModel(inner, device_ids=device_ids, **ddp_kwargs)


def unused_parameters(model: nn.Module, loss_fn: Callable[[], Tensor]) -> list[str]:
    """Names of trainable parameters that get no gradient from one ``loss_fn().backward()``.

    DDP with ``find_unused_parameters=False`` needs every parameter it reduces to get a
    gradient in every backward; detectors whose loss skips some (DCdetector's reference keeps
    projections its loss never uses) are trained with :func:`sync_gradients` instead. A dry
    run: parameters, buffers, gradients, train/eval mode and the RNG state are restored.
    """
    inner = unwrap_container(model)
    state = copy.deepcopy(inner.state_dict())
    grads = {n: p.grad for n, p in inner.named_parameters()}
    was_training = inner.training
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        for p in inner.parameters():
            p.grad = None
        loss_fn().backward()
        return [n for n, p in inner.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        for n, p in inner.named_parameters():
            p.grad = grads[n]
        inner.load_state_dict(state)
        inner.train(was_training)
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def unmanaged_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters that DDP's reducer skips (those named by :func:`ddp_wrap`'s ignore list)."""
    inner = unwrap_container(model)
    ignored = set(getattr(inner, "_ddp_params_and_buffers_to_ignore", ()))
    return [p for n, p in inner.named_parameters() if n in ignored and p.requires_grad]


def _first_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


# ---- data ---------------------------------------------------------------------------------
def _is_map_style_loader(loader: Any) -> bool:
    from torch.utils.data import DataLoader, IterableDataset

    return isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset)


def _loader_kwargs(loader: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                  pin_memory=loader.pin_memory, timeout=loader.timeout,
                                  worker_init_fn=loader.worker_init_fn,
                                  multiprocessing_context=loader.multiprocessing_context)
    if loader.num_workers > 0:
        kwargs.update(persistent_workers=loader.persistent_workers,
                      prefetch_factor=loader.prefetch_factor)
    return kwargs


def distributed_loader(loader: Any, shuffle: bool | None = None, seed: int = 0) -> Any:
    """The same DataLoader on a ``DistributedSampler``: each rank gets its shard of every epoch.

    ``shuffle=None`` keeps the loader's own choice (a ``RandomSampler`` shuffles, a sequential
    one does not). ``batch_size`` stays per rank. A loader that already has a
    ``DistributedSampler``, an ``IterableDataset`` loader or a plain iterable is returned as is
    and taken to be this rank's shard already (every rank must then yield the same number of
    batches). A DataLoader with another sampler or a custom batch sampler gives a ValueError.
    """
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

    if not _is_map_style_loader(loader) or isinstance(loader.sampler, DistributedSampler):
        if rank() == 0 and not isinstance(getattr(loader, "sampler", None), DistributedSampler):
            log.warning("the training iterable is not a map-style DataLoader: each rank trains "
                        "on what it yields, so it must already be this rank's shard")
        return loader
    if loader.batch_size is None:
        raise ValueError("cannot shard a DataLoader built with a custom batch_sampler under DDP; "
                         "build it with batch_size= and a DistributedSampler yourself")
    if shuffle is None:
        if isinstance(loader.sampler, RandomSampler):
            shuffle = True
        elif isinstance(loader.sampler, SequentialSampler):
            shuffle = False
        else:
            raise ValueError(f"cannot shard a DataLoader with a {type(loader.sampler).__name__} "
                             f"under DDP; pass a loader with shuffle=True/False or with a "
                             f"DistributedSampler of your own")
    sampler = DistributedSampler(loader.dataset, shuffle=shuffle, seed=seed, drop_last=loader.drop_last)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      drop_last=loader.drop_last, **_loader_kwargs(loader))


class RoundRobinBatches:
    """Batch sampler dealing whole batches of ``batch_sampler`` to ranks: batch ``i`` goes to
    rank ``i % world``. Evaluation on whole batches gives each batch the same composition as
    in one process, so sums over ranks reproduce the single-process numbers."""

    def __init__(self, batch_sampler: Iterable[list[int]], rank_: int, world: int) -> None:
        self.batch_sampler, self.rank, self.world = batch_sampler, rank_, world

    def __iter__(self) -> Iterator[list[int]]:
        for i, batch in enumerate(self.batch_sampler):
            if i % self.world == self.rank:
                yield batch

    def __len__(self) -> int:
        n = len(self.batch_sampler)  # type: ignore[arg-type]
        return max(0, (n - self.rank + self.world - 1) // self.world)


def evaluation_shard(loader: Any) -> tuple[Any, bool]:
    """``(this rank's part of loader, sharded)``: whole batches round-robin for a map-style
    DataLoader (in dataset order); the loader itself (``sharded=False``) for anything else."""
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    if not is_distributed() or not _is_map_style_loader(loader) or loader.batch_size is None:
        return loader, False
    batches = BatchSampler(SequentialSampler(loader.dataset), loader.batch_size, loader.drop_last)
    part = RoundRobinBatches(batches, rank(), world_size())
    return DataLoader(loader.dataset, batch_sampler=part, **_loader_kwargs(loader)), True


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


# ---- checkpoints --------------------------------------------------------------------------
def write_checkpoint(model: nn.Module, path: str | os.PathLike, **extra: Any) -> Path:
    """Write the unwrapped model's ``state_dict`` (plus ``extra``) atomically from this process.

    The keys carry no ``module.``/``_orig_mod.`` prefix, so the file loads into a
    single-process model (:func:`load_checkpoint`, or ``load_state_dict(ckpt["state_dict"])``).
    Under DDP call it on rank 0 only, or use :func:`save_checkpoint`.
    """
    out = Path(path)
    state = {k: v.detach().cpu() for k, v in unwrap_container(model).state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "state_dict": state, "world_size": world_size(), **extra}
    return atomic_write(out, lambda fh: torch.save(payload, fh))


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **extra: Any) -> Path | None:
    """Rank 0 writes the checkpoint (:func:`write_checkpoint`); every rank then waits at a
    barrier, so the file exists when any rank returns. The path on rank 0, ``None`` elsewhere."""
    written = write_checkpoint(model, path, **extra) if rank() == 0 else None
    barrier()
    return written


def load_checkpoint(model: nn.Module, path: str | os.PathLike, map_location: Any = "cpu",
                    strict: bool = True) -> dict[str, Any]:
    """Load a checkpoint of :func:`save_checkpoint` (or any ``state_dict`` file, DDP-prefixed
    or not) into ``model``; returns the checkpoint's other entries (epoch, val_loss, ...)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a state_dict or a checkpoint dict")
    state = ckpt["state_dict"] if ckpt.get("format") == CHECKPOINT_FORMAT else ckpt
    state = {strip_prefixes(k): v for k, v in state.items()}
    unwrap_container(model).load_state_dict(state, strict=strict)
    return {k: v for k, v in ckpt.items() if k != "state_dict"} if "state_dict" in ckpt else {}


# ---- the loop -----------------------------------------------------------------------------
def fit(model: MADClusterModel, loader: Iterable[Any], loss_fn: LossFn, epochs: int, *,
        lr: float = 1e-3, weight_decay: float = 0.0, val_loader: Iterable[Any] | None = None,
        device: str | torch.device | None = None, progress: bool = True,
        distributed: bool | str = "auto", restore_best: bool = True, seed: int = 0,
        checkpoint: str | os.PathLike | None = None) -> FitHistory:
    """Train ``model`` (a :class:`MADClusterModel`) for ``epochs`` epochs; return the history.

    ``loss_fn(output, batch)`` is the detector's own loss; the head loss is added to it. A batch
    is a tensor or a tuple whose first item is the model input. With ``val_loader`` the best
    epoch (lowest validation total loss) is restored at the end when ``restore_best``.
    ``checkpoint``: a file that rank 0 rewrites with the best (with ``val_loader``) or the last
    epoch's state. ``distributed="auto"`` uses DDP when launched by torchrun (``True``
    requires it, ``False`` never); ``seed`` seeds the ``DistributedSampler``'s shuffling.
    Under DDP the returned model is identical on every rank.
    """
    if not isinstance(model, MADClusterModel):
        raise TypeError("fit() trains a MADClusterModel; wrap your detector first: wrap(detector, hidden=...)")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1; got {epochs}")
    if distributed not in ("auto", True, False):
        raise ValueError(f"distributed={distributed!r}; expected 'auto', True or False")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    use_ddp = init_distributed(dev) if distributed in ("auto", True) else False
    if distributed is True and not use_ddp:
        raise RuntimeError("distributed=True but no torchrun launch found (WORLD_SIZE/RANK unset)")
    if use_ddp and dev.type == "cuda":
        dev = torch.device("cuda", local_rank())
    model.to(dev)
    if not bool(model.head.centers_initialized):
        # the full loader on every rank (the same centres as one process); rank 0's are broadcast
        model.initialize_centers(_to(_inputs(b), dev) for b in loader)
    optimizer = torch.optim.AdamW(model.parameter_groups(lr, weight_decay), lr=lr)
    runner: nn.Module = model
    val_part, val_sharded = val_loader, False
    if use_ddp:
        unused = _unused_in_first_batch(model, loader, loss_fn, dev)
        loader = distributed_loader(loader, seed=seed)
        if val_loader is not None:
            val_part, val_sharded = evaluation_shard(val_loader)
        if any_rank(bool(unused)):
            # DDP would wait forever for these gradients: average every gradient at step time
            broadcast_module_(model)
            sync_gradients(optimizer)
            if rank() == 0:
                log.info("parameters without gradient (%s): averaging gradients before each "
                         "optimizer step instead of DDP's reducer", ", ".join(unused[:5]))
        else:
            runner = ddp_wrap(model, dev)
            sync_gradients(optimizer, unmanaged_parameters(runner))
    soft_boundary = model.head.config.objective == "soft-boundary"
    history = FitHistory()
    best_state: dict[str, Tensor] | None = None
    best_val = math.inf
    main = rank() == 0
    for epoch in range(epochs):
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        runner.train()
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
            model.head.update_radius(torch.cat(distances))  # gathers every rank's distances
        if use_ddp:
            broadcast_module_(model, buffers_only=True)
        history.loss.append(all_reduce_mean(sums["loss"] / n_batches))
        history.madcluster.append(all_reduce_mean(sums["madcluster"] / n_batches))
        history.nu.append(model.threshold)
        improved = False
        if val_part is not None:
            total_loss, count = _loss_sums(model, val_part, loss_fn, dev)
            if val_sharded:
                total_loss, count = all_reduce_sum([total_loss, count])
            if count == 0:
                raise ValueError("the validation loader yielded no batches")
            val = total_loss / count
            history.val_loss.append(val)
            if val < best_val:
                best_val, history.best_epoch, improved = val, epoch, True
                best_state = copy.deepcopy(model.state_dict())
        if checkpoint is not None and (val_part is None or improved):
            save_checkpoint(model, checkpoint, epoch=epoch,
                            val_loss=history.val_loss[-1] if history.val_loss else None,
                            history=asdict(history))
        if main:
            log.info("epoch %d: loss %.5f madcluster %.5f nu %.5f%s", epoch + 1, history.loss[-1],
                     history.madcluster[-1], history.nu[-1],
                     f" val {history.val_loss[-1]:.5f}" if history.val_loss else "")
    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
    return history


def _unused_in_first_batch(model: MADClusterModel, loader: Iterable[Any], loss_fn: LossFn,
                           device: torch.device) -> list[str]:
    """Backbone parameters without gradient on the loader's first batch (re-iterable DataLoaders
    only; a one-shot iterable is not consumed and taken to use every parameter)."""
    from torch.utils.data import DataLoader

    if not isinstance(loader, DataLoader):
        return []
    rng = torch.random.get_rng_state()  # drawing a shuffled batch must not shift the RNG stream
    try:
        batch = _to(next(iter(loader)), device)
    finally:
        torch.random.set_rng_state(rng)
    head = set(head_parameter_names(model))

    def loss() -> Tensor:
        model.train()
        return loss_fn(model(_inputs(batch)), batch) + model.madcluster_loss()

    return [n for n in unused_parameters(model, loss) if n not in head]


@torch.no_grad()
def _loss_sums(model: MADClusterModel, loader: Iterable[Any], loss_fn: LossFn,
               device: torch.device) -> tuple[float, int]:
    """(sum of batch mean total losses, number of batches) in eval mode on the unwrapped model."""
    inner = unwrap_container(model)
    was_training = inner.training
    inner.eval()
    total, n = 0.0, 0
    try:
        for batch in loader:
            batch = _to(batch, device)
            out = inner(_inputs(batch))
            total += float(loss_fn(out, batch) + inner.madcluster_loss())
            n += 1
    finally:
        inner.train(was_training)
    return total, n


def evaluate_loss(model: MADClusterModel, loader: Iterable[Any], loss_fn: LossFn,
                  device: torch.device) -> float:
    """Mean total loss (detector + head) over the batches of ``loader`` in eval mode (this
    process only; :func:`fit` sums it over ranks itself)."""
    total, n = _loss_sums(model, loader, loss_fn, device)
    if n == 0:
        raise ValueError("the validation loader yielded no batches")
    return total / n

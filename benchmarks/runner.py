"""One benchmark run, and a resumable grid of them.

A run is one (dataset, entity, model, variant, seed[, k]): build the baseline through its adapter,
wrap it unless the variant is ``base``, train on windows of the fit part of train, keep the
checkpoint with the best validation loss (validation = the tail of train), score the test split,
evaluate with a protocol (:mod:`benchmarks.protocols`) and return one CSV row.

:class:`ResultStore` appends each finished row to ``rows.csv`` as one complete line written with
a single ``write`` followed by ``flush`` and ``fsync``; a restarted grid skips every key already
in the file, and a torn last line (a kill mid-write) is cut off on load, so no row is lost or
duplicated. Per-run artefacts (point scores, nu and loss history, and with ``checkpoints=True``
the best model's ``state_dict``) are written atomically *before* the row, so a row always has
its artefacts.

Under ``torchrun`` every run is trained by all ranks together and only rank 0 writes
(:mod:`benchmarks.distributed`, docs/distributed.md); the rows have the same columns.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

import adapters
from adapters.base import Adapter, backbone_of, is_wrapped

from madcluster_plugin.files import atomic_write, atomic_write_text
from madcluster_plugin.train import (all_gather_objects, all_reduce_sum, barrier, broadcast_object,
                                     write_checkpoint)

from . import distributed
from .data import Entity, load_entity
from .profiles import Profile
from .protocols import PROTOCOLS, evaluate_run
from .windows import iter_batches, overlap_mean, thin_starts, window_starts, window_view

log = logging.getLogger(__name__)

#: variant -> the head's ``components`` option (``None``: the plain baseline)
VARIANTS: dict[str, str | None] = {
    "base": None,
    "madcluster": "both",
    "both": "both",
    "mapping": "mapping",
    "cluster": "cluster",
}

KEY_COLUMNS = ("dataset", "entity", "model", "variant", "seed", "n_clusters")
METRIC_COLUMNS = ("f1", "precision", "recall", "threshold", "f1_val", "precision_val", "recall_val",
                  "threshold_val", "pa_f1", "aff_p", "aff_r", "vus_roc", "vus_pr", "r_auc_roc",
                  "r_auc_pr", "auc_roc", "auc_pr", "f1_floor")
FAILURES_FILE = "failures.jsonl"
KEEP_GOING_UNDER_TORCHRUN = ("--keep-going is not supported under torchrun (a rank failing alone would "
                             "leave the others waiting); run without it and resume after a failure")
COLUMNS = (*KEY_COLUMNS, *METRIC_COLUMNS, "nu_final", "hidden_std", "best_epoch", "epochs_run",
           "best_val_loss", "n_params", "train_seconds", "score_seconds", "eval_seconds",
           "protocol", "profile", "combine", "device")


# ---------------------------------------------------------------------------------------------
# specification
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """What one run trains: ``variant`` is ``base``, ``madcluster``, or an ablation component
    (``mapping``, ``cluster``, ``both``); ``n_clusters`` is the head's K (ignored for base)."""

    dataset: str
    entity: str
    model: str
    variant: str
    seed: int
    n_clusters: int = 1

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r}; choose from {', '.join(VARIANTS)}")
        if self.n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1; got {self.n_clusters}")

    @property
    def wrapped(self) -> bool:
        return VARIANTS[self.variant] is not None

    def key(self) -> tuple[str, ...]:
        return (self.dataset, self.entity, self.model, self.variant, str(self.seed),
                str(self.n_clusters) if self.wrapped else "")

    def head_overrides(self) -> dict[str, Any]:
        return {"n_clusters": self.n_clusters, "components": VARIANTS[self.variant]}

    def slug(self) -> str:
        k = f"_k{self.n_clusters}" if self.wrapped else ""
        return f"{self.model}_{self.variant}{k}_seed{self.seed}"


@dataclass
class RunConfig:
    """Settings shared by every run of a grid."""

    profile: Profile
    protocol: str = "pointwise"
    combine: str = "sum"
    device: str = "cpu"
    #: extra MADClusterConfig options for wrapped models (on top of ``profile.head``)
    head: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r}; choose from {', '.join(PROTOCOLS)}")

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile.to_dict(), "protocol": self.protocol,
                "combine": self.combine, "head": dict(self.head)}


@dataclass
class RunResult:
    """One run's row and artefacts. Under torchrun ``point_scores`` is empty except on rank 0;
    ``model`` is the trained plain (wrapped or not) model with the best validation state."""

    row: dict[str, Any]
    point_scores: np.ndarray
    labels: np.ndarray
    history: dict[str, list[float]]
    model: nn.Module | None = field(default=None, repr=False)


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device {name!r}; expected auto, cpu or cuda[:i]")
    return name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# hidden-state probe (collapse indicator)
# ---------------------------------------------------------------------------------------------
class HiddenProbe:
    """Mean per-dimension standard deviation of the hidden states at the attachment point.

    Hooks the same module on the plain and the wrapped model (the wrapper's own hidden spec when
    wrapped, the adapter's otherwise), so both variants are measured identically. A collapsed
    representation (the hypersphere collapse the paper targets) has a value near 0.
    """

    def __init__(self, model: nn.Module, adapter: Adapter) -> None:
        from madcluster_plugin.capture import resolve_module, select_output, to_btd

        if is_wrapped(model) and isinstance(model.hidden_spec, str):
            name, self.select, self.layout, self.capture = (
                model.hidden_spec, model.select, model.layout, model.capture)
        else:
            name, self.select, self.layout, self.capture = (
                adapter.hidden, adapter.select, adapter.layout, adapter.capture)
        self._select_output, self._to_btd = select_output, to_btd
        module = resolve_module(backbone_of(model), name)
        self._handle = module.register_forward_hook(self._hook)
        self._current: Tensor | None = None
        self.count = 0
        self.total: Tensor | None = None
        self.total_sq: Tensor | None = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._current is not None and self.capture == "first":
            return
        self._current = self._to_btd(self._select_output(output, self.select), self.layout).detach()

    def reset(self) -> None:
        self._current = None

    def commit(self) -> None:
        """Fold the hidden state of the last forward into the running sums."""
        if self._current is None:
            return
        h = self._current.reshape(-1, self._current.shape[-1]).double()
        if self.total is None:
            self.total, self.total_sq = h.sum(0), (h * h).sum(0)
        else:
            self.total += h.sum(0)
            self.total_sq += (h * h).sum(0)
        self.count += h.shape[0]
        self._current = None

    def value(self) -> float:
        if self.total is None or self.count < 2:
            return float("nan")
        mean = self.total / self.count
        var = (self.total_sq / self.count - mean * mean).clamp_min(0.0) * self.count / (self.count - 1)
        return float(var.sqrt().mean())

    def all_reduce(self) -> None:
        """Sum the running sums over ranks (each rank probed its own share of the batches)."""
        parts = all_gather_objects((self.count,
                                    None if self.total is None else self.total.cpu(),
                                    None if self.total_sq is None else self.total_sq.cpu()))
        if len(parts) == 1:
            return
        self.count = sum(p[0] for p in parts)
        sums = [p for p in parts if p[1] is not None]
        self.total = sum(p[1] for p in sums) if sums else None
        self.total_sq = sum(p[2] for p in sums) if sums else None

    def close(self) -> None:
        self._handle.remove()


# ---------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------
class _Batches:
    """A re-iterable view of windows as ``[B, T, C]`` tensors (for ``on_fit_start`` hooks that
    iterate more than once, without materialising every window).

    With a distributed ``ctx`` only this rank's batches (round-robin, :func:`distributed.is_mine`)
    are materialised; each keeps the composition it has in one process.
    """

    def __init__(self, series: np.ndarray, starts: np.ndarray, window: int, batch: int,
                 device: str, ctx: distributed.Context | None = None) -> None:
        self.series, self.starts, self.window, self.batch, self.device = (
            series, starts, window, batch, device)
        self.ctx = ctx or distributed.Context()

    def shard(self, ctx: distributed.Context) -> "_Batches":
        return _Batches(self.series, self.starts, self.window, self.batch, self.device, ctx)

    def indexed(self) -> Iterator[tuple[int, Tensor]]:
        """``(batch index, batch)`` for this rank's batches."""
        if not self.ctx.active:
            yield from enumerate(iter_batches(self.series, self.starts, self.window, self.batch,
                                              self.device))
            return
        view = window_view(self.series, self.window)
        for k, i in enumerate(range(0, len(self.starts), self.batch)):
            if distributed.is_mine(k, self.ctx):
                chunk = np.ascontiguousarray(view[self.starts[i:i + self.batch]], dtype=np.float32)
                yield k, torch.from_numpy(chunk).to(self.device)

    def __iter__(self) -> Iterator[Tensor]:
        return (xb for _, xb in self.indexed())

    def __len__(self) -> int:
        n = (len(self.starts) + self.batch - 1) // self.batch
        return len(range(self.ctx.rank, n, self.ctx.world))


def _train_batches(series: np.ndarray, starts: np.ndarray, window: int, batch: int, device: str,
                   order: np.ndarray, ctx: distributed.Context) -> Iterator[Tensor]:
    """This rank's part of every global training batch of ``starts[order]`` (all of it in one
    process, the same tensors as :func:`iter_batches`)."""
    if not ctx.active:
        yield from iter_batches(series, starts, window, batch, device, order)
        return
    view = window_view(series, window)
    for rows in distributed.global_batches(order, batch):
        mine = distributed.shard_rows(rows, ctx)
        chunk = np.ascontiguousarray(view[starts[mine]], dtype=np.float32)
        yield torch.from_numpy(chunk).to(device)


def _mean_val_loss(adapter: Adapter, model: nn.Module, batches: _Batches, epoch: int) -> float:
    """Window-weighted mean validation loss; under torchrun summed over the ranks' shares."""
    model.eval()
    total, n = 0.0, 0
    for xb in batches:
        total += adapter.validation_loss(model, xb, epoch) * len(xb)
        n += len(xb)
    if batches.ctx.active:
        total, n = all_reduce_sum([total, n])
    return total / max(n, 1)


@torch.no_grad()
def _score_series(adapter: Adapter, model: nn.Module, series: np.ndarray, profile: Profile,
                  window: int, combine: str, device: str, probe: HiddenProbe | None = None,
                  ctx: distributed.Context | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-window per-point scores ``[n, T]`` and the window starts for ``series``.

    Under torchrun each rank scores its round-robin share of the batches and rank 0 receives
    them in order; the other ranks get an empty ``[0, T]`` array.
    """
    ctx = ctx or distributed.Context()
    model.eval()
    starts = window_starts(len(series), window, profile.test_stride)
    local = []
    for k, xb in _Batches(series, starts, window, profile.batch, device, ctx).indexed():
        if probe is not None:
            probe.reset()
        s = adapter.score(model, xb, combine=combine)
        if probe is not None:
            probe.commit()
        if s.dim() != 2 or s.shape != xb.shape[:2]:
            raise ValueError(f"{adapter.name}.score returned shape {tuple(s.shape)}; expected "
                             f"[B, T] = {tuple(xb.shape[:2])}")
        local.append((k, s.detach().double().cpu().numpy()))
    chunks = distributed.gather_in_order(local, ctx)
    if chunks is None:
        return np.empty((0, window)), starts
    scores = np.concatenate(chunks)
    if not np.isfinite(scores).all():
        log.warning("%s: %d non-finite scores replaced by the largest finite score",
                    adapter.name, int((~np.isfinite(scores)).sum()))
        finite = scores[np.isfinite(scores)]
        fill = float(finite.max()) if finite.size else 0.0
        scores = np.nan_to_num(scores, nan=fill, posinf=fill, neginf=float(finite.min()) if finite.size else 0.0)
    return scores, starts


def _nu(model: nn.Module) -> float:
    if is_wrapped(model) and model.head.uses_threshold:
        return model.threshold
    return float("nan")


def train_and_evaluate(spec: RunSpec, entity: Entity, cfg: RunConfig,
                       epoch_bar: Callable[[int], Any] | None = None) -> RunResult:
    """Train, select the best-validation checkpoint, score and evaluate one run.

    ``epoch_bar(total)`` may return a tqdm-like object (``update``, ``set_postfix``, ``close``)
    for a per-run progress bar; library code itself never prints. Under torchrun every rank
    calls it for the same spec (see :mod:`benchmarks.distributed`); all get the same row.
    """
    ctx = distributed.context()
    profile, device = cfg.profile, distributed.local_device(cfg.device, ctx)
    seed_everything(spec.seed)
    adapter = adapters.get(spec.model)
    window = profile.window_for(spec.model)
    fit, val = entity.split(window)
    fit_starts = thin_starts(window_starts(len(fit), window, profile.train_stride),
                             profile.max_train_windows)
    model = adapter.build(entity.n_channels, window=window,
                          **profile.build_overrides(spec.model)).to(device)
    if spec.wrapped:
        # example_input lets wrap() find D by one forward where the module alone does not say it
        example = next(iter_batches(fit, fit_starts[:2], window, 2, device))
        model = adapter.wrap(model, example_input=example, **{
            **profile.wrap_options_for(spec.model), **profile.head, **cfg.head, **spec.head_overrides()})
    model = model.to(device)
    backbone = backbone_of(model)
    n_params = sum(p.numel() for p in model.parameters())

    val_starts = thin_starts(window_starts(len(val), window, profile.train_stride),
                             profile.max_val_windows)
    fit_batches = _Batches(fit, fit_starts, window, profile.batch, device)
    val_batches = _Batches(val, val_starts, window, profile.batch, device).shard(ctx)

    t0 = time.perf_counter()
    # data-dependent initialisation sees all training windows on every rank (as one process)
    if hasattr(backbone, "on_fit_start"):
        backbone.on_fit_start(fit_batches)
    if spec.wrapped and model.head.config.center_init == "data":
        model.initialize_centers(fit_batches)
    optimizers = adapter.optimizers(model, profile.lr)
    prepared = distributed.prepare(model, adapter, optimizers, device, spec.seed, ctx,
                                   probe=next(iter(fit_batches)) if ctx.active else None)
    gen = torch.Generator().manual_seed(spec.seed)
    history: dict[str, list[float]] = {"nu": [_nu(model)], "train_loss": [], "val_loss": []}
    best_loss, best_state, best_epoch, bad = math.inf, None, -1, 0
    bar = epoch_bar(profile.epochs) if epoch_bar else None
    epochs_run = 0
    for epoch in range(profile.epochs):
        order = torch.randperm(len(fit_starts), generator=gen).numpy()
        model.train()  # validation left it in eval mode
        step_losses = []
        for xb in _train_batches(fit, fit_starts, window, profile.batch, device, order, ctx):
            logs = adapter.train_step(prepared.model, xb, optimizers, epoch)
            prepared.after_step()
            step_losses.append(logs.get("total", sum(logs.values())))
        if hasattr(backbone, "on_epoch_end"):
            backbone.on_epoch_end(epoch)
        prepared.after_epoch()
        val_loss = _mean_val_loss(adapter, model, val_batches, epoch)
        train_loss = float(np.mean(step_losses))
        if ctx.active:
            train_loss = all_reduce_sum([train_loss])[0] / ctx.world
        history["train_loss"].append(train_loss)
        history["val_loss"].append(val_loss)
        history["nu"].append(_nu(model))
        epochs_run = epoch + 1
        if math.isfinite(val_loss) and val_loss < best_loss - profile.min_delta:
            best_loss, best_epoch, bad = val_loss, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(train=f"{history['train_loss'][-1]:.4g}", val=f"{val_loss:.4g}")
        if bad >= profile.patience:
            if ctx.main:
                log.info("%s: early stop after epoch %d (best %d)", spec.slug(), epoch, best_epoch)
            break
    if bar is not None:
        bar.close()
    prepared.check_in_sync()
    if prepared.resyncs and ctx.main:
        log.warning("%s: a rank-local decision in %s.train_step made the ranks differ %d time(s); "
                    "rank 0's state was broadcast each time", spec.slug(), adapter.name,
                    prepared.resyncs)
    del prepared  # drop the DDP container: evaluation runs on the plain model
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        log.warning("%s: no finite validation loss; evaluating the last epoch", spec.slug())
    train_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    combine = cfg.combine if spec.wrapped else "base"
    if spec.wrapped and combine == "sum":
        norm_starts = thin_starts(window_starts(len(fit), window, profile.train_stride),
                                  profile.max_normalizer_windows)
        adapter.fit_score_normalizer(model, _Batches(fit, norm_starts, window,
                                                     profile.batch, device, ctx))
    probe = HiddenProbe(model, adapter)
    try:
        test_win, test_starts = _score_series(adapter, model, entity.test, profile, window,
                                              combine, device, probe, ctx)
    finally:
        probe.close()
    probe.all_reduce()
    val_win, val_starts_s = _score_series(adapter, model, val, profile, window, combine, device,
                                          ctx=ctx)
    score_seconds = time.perf_counter() - t1

    if not ctx.main:  # rank 0 evaluates and builds the row; the others receive it
        row = broadcast_object(None)
        return RunResult(row, np.empty(0, dtype=np.float32), entity.test_labels, history, model)
    t2 = time.perf_counter()
    metrics = evaluate_run(cfg.protocol, entity.test_labels, test_win, test_starts, val_win,
                           val_starts_s, window=profile.window, val_percentile=profile.val_percentile)
    eval_seconds = time.perf_counter() - t2
    point = overlap_mean(test_win, test_starts, len(entity.test))

    row: dict[str, Any] = {
        "dataset": spec.dataset, "entity": spec.entity, "model": spec.model,
        "variant": spec.variant, "seed": spec.seed,
        "n_clusters": spec.n_clusters if spec.wrapped else "",
        **{k: metrics.get(k, float("nan")) for k in METRIC_COLUMNS},
        "nu_final": _nu(model), "hidden_std": probe.value(), "best_epoch": best_epoch + 1,
        "epochs_run": epochs_run, "best_val_loss": best_loss, "n_params": n_params,
        "train_seconds": train_seconds, "score_seconds": score_seconds,
        "eval_seconds": eval_seconds, "protocol": cfg.protocol, "profile": profile.name,
        "combine": combine, "device": distributed.device_label(device, ctx),
    }
    if ctx.active:
        broadcast_object(row)
    return RunResult(row, point.astype(np.float32), entity.test_labels, history, model)


# ---------------------------------------------------------------------------------------------
# storage
# ---------------------------------------------------------------------------------------------
def _format(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(round(value, 6))
    return str(value)


class ResultStore:
    """``rows.csv`` + per-run artefacts under ``out``; resumable (see the module docstring).

    ``checkpoints=True`` also writes each run's best model (``<slug>.pt``, a
    :func:`madcluster_plugin.train.load_checkpoint` file). Under torchrun only rank 0 touches
    the disk; the other ranks receive its rows (so every rank skips the same finished runs)
    and its errors.
    """

    def __init__(self, out: str | os.PathLike, config: dict[str, Any], checkpoints: bool = False) -> None:
        self.out = Path(out)
        self.rows_path = self.out / "rows.csv"
        self.checkpoints = checkpoints
        self.writer = distributed.context().main
        rows: list[dict[str, str]] | None = None
        error: str | None = None
        if self.writer:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                self._check_config(config)
                rows = self._load()
            except ValueError as exc:
                error = str(exc)
        if distributed.context().active:
            error, rows = broadcast_object((error, rows))
        if error is not None:
            raise ValueError(error)
        assert rows is not None
        self.rows: list[dict[str, str]] = rows
        self.done = {tuple(r[c] for c in KEY_COLUMNS) for r in self.rows}

    def _check_config(self, config: dict[str, Any]) -> None:
        path = self.out / "config.json"
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        if path.exists():
            old = json.loads(path.read_text())
            new = json.loads(text)
            if old != new:
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise ValueError(
                    f"{self.out} holds results of a different configuration (differs in {diff}); "
                    f"resume with the same options or pass a new --out")
        else:
            atomic_write_text(path, text)

    def _load(self) -> list[dict[str, str]]:
        if not self.rows_path.exists():
            return []
        raw = self.rows_path.read_bytes()
        if raw and not raw.endswith(b"\n"):  # a torn last line from a killed writer
            cut = raw.rfind(b"\n") + 1
            log.warning("%s: dropping an incomplete last line (%d bytes)", self.rows_path, len(raw) - cut)
            with open(self.rows_path, "r+b") as fh:
                fh.truncate(cut)
            raw = raw[:cut]
        reader = csv.DictReader(io.StringIO(raw.decode()))
        if reader.fieldnames and tuple(reader.fieldnames) != COLUMNS:
            raise ValueError(f"{self.rows_path} has columns {reader.fieldnames}, not this version's "
                             f"{list(COLUMNS)}; pass a new --out")
        return list(reader)

    def is_done(self, spec: RunSpec) -> bool:
        return spec.key() in self.done

    def artefact_path(self, spec: RunSpec) -> Path:
        return self.out / "runs" / spec.dataset / spec.entity / f"{spec.slug()}.npz"

    def checkpoint_path(self, spec: RunSpec) -> Path:
        return self.artefact_path(spec).with_suffix(".pt")

    def add(self, spec: RunSpec, result: RunResult) -> None:
        """Write the artefacts atomically, then append the row as one fsynced line (rank 0;
        the other ranks only record the key)."""
        if not self.writer:
            self.rows.append({c: _format(result.row[c]) for c in COLUMNS})
            self.done.add(spec.key())
            return
        if self.checkpoints:
            if result.model is None:
                raise ValueError(f"{spec.slug()}: checkpoints=True needs RunResult.model")
            write_checkpoint(result.model, self.checkpoint_path(spec), spec=spec_dict(spec),
                             best_epoch=result.row["best_epoch"])
        arrays = {"scores": result.point_scores, "labels": result.labels.astype(np.int8),
                  **{k: np.asarray(v, dtype=np.float64) for k, v in result.history.items()}}
        atomic_write(self.artefact_path(spec), lambda fh: np.savez_compressed(fh, **arrays))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        new_file = not self.rows_path.exists() or self.rows_path.stat().st_size == 0
        if new_file:
            writer.writerow(COLUMNS)
        writer.writerow([_format(result.row[c]) for c in COLUMNS])
        _append_fsynced(self.rows_path, buf.getvalue().encode())
        self.rows.append({c: _format(result.row[c]) for c in COLUMNS})
        self.done.add(spec.key())


    @property
    def failures_path(self) -> Path:
        return self.out / FAILURES_FILE

    def add_failure(self, spec: RunSpec, exc: BaseException) -> None:
        """Append one JSON line (key, error type, message, time) to ``failures.jsonl``, fsynced.

        A failed run has no row, so a resumed grid tries it again."""
        if not self.writer:
            return
        record = {**spec_dict(spec), "error": type(exc).__name__, "message": str(exc),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _append_fsynced(self.failures_path, (json.dumps(record, default=str) + "\n").encode())


def unresolved_failures(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The runs in ``out/failures.jsonl`` that have no row in ``rows.csv`` (a later success wins)."""
    out = Path(out)
    path = out / FAILURES_FILE
    if not path.exists():
        return []
    done: set[tuple[str, ...]] = set()
    if (out / "rows.csv").exists():
        with open(out / "rows.csv", newline="") as fh:
            done = {tuple(r[c] for c in KEY_COLUMNS) for r in csv.DictReader(fh)}
    latest: dict[tuple[str, ...], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a torn last line from a killed writer
            continue
        key = tuple(_format(record.get(c, "")) for c in KEY_COLUMNS)
        if key not in done:
            latest[key] = record
    return list(latest.values())


def _append_fsynced(path: Path, data: bytes) -> None:
    """Append ``data`` with one ``write`` on an ``O_APPEND`` descriptor, then fsync: lines from
    several processes never interleave, and a line is on disk before the next run starts."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# grid
# ---------------------------------------------------------------------------------------------
def run_grid(specs: Sequence[RunSpec], cfg: RunConfig, store: ResultStore,
             data_dir: str | os.PathLike | None = None, progress: bool = False,
             after_row: Callable[[ResultStore], None] | None = None, keep_going: bool = False) -> int:
    """Run every spec not yet in ``store``; returns the number of runs done now.

    Entities are loaded one at a time (runs are ordered by dataset and entity). A run that raises
    stops the grid (its finished rows are kept), unless ``keep_going``: then the error is logged
    and recorded in ``failures.jsonl`` (:meth:`ResultStore.add_failure`) and the grid goes on;
    the failed run has no row and is tried again when the grid is resumed. ``keep_going`` is
    refused under torchrun, where one rank failing alone would leave the others waiting.
    ``progress=True`` shows tqdm bars (overall and per run); ``after_row(store)`` is called after
    each stored row (the CLI regenerates ``table.md`` there, so a killed grid has a current table).
    """
    ctx = distributed.context()
    if keep_going and ctx.active:
        raise ValueError(KEEP_GOING_UNDER_TORCHRUN)
    todo = [s for s in specs if not store.is_done(s)]
    if ctx.main:
        log.info("%d runs requested, %d already in %s, %d to do", len(specs), len(specs) - len(todo),
                 store.rows_path, len(todo))
    overall, epoch_bar = None, None
    if progress and ctx.main:
        tqdm = _tqdm()
        overall = tqdm(total=len(specs), initial=len(specs) - len(todo), desc="runs", position=0)
        epoch_bar = lambda total: tqdm(total=total, desc="  epochs", position=1, leave=False)  # noqa: E731
    cache: tuple[tuple[str, str], Entity] | None = None
    done_now = 0
    try:
        for spec in todo:
            ek = (spec.dataset, spec.entity)
            if cache is None or cache[0] != ek:
                cache = (ek, load_entity(spec.dataset, spec.entity, data_dir))
            if overall is not None:
                overall.set_postfix_str(f"{spec.dataset}/{spec.entity} {spec.slug()}")
            try:
                result = train_and_evaluate(spec, cache[1], cfg, epoch_bar)
            except Exception as exc:
                if not keep_going:
                    raise
                log.error("%s/%s %s failed (%s: %s); recorded in %s, going on", spec.dataset,
                          spec.entity, spec.slug(), type(exc).__name__, exc, store.failures_path)
                store.add_failure(spec, exc)
                if overall is not None:
                    overall.update(1)
                continue
            store.add(spec, result)
            done_now += 1
            if ctx.main:
                log.info("%s/%s %s: f1=%.3f vus_pr=%.3f (%.1fs)", spec.dataset, spec.entity,
                         spec.slug(), result.row["f1"], result.row["vus_pr"],
                         result.row["train_seconds"])
            if overall is not None:
                overall.update(1)
            if after_row is not None and ctx.main:
                after_row(store)
            if ctx.active:
                barrier()  # the other ranks wait while rank 0 writes
    finally:
        if overall is not None:
            overall.close()
    return done_now


def _tqdm() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:  # pragma: no cover - tqdm is a declared extra
        raise ImportError("progress bars need tqdm: pip install 'madcluster-plugin[bench]' "
                          "(or pass --no-progress)") from exc
    return tqdm


def spec_dict(spec: RunSpec) -> dict[str, Any]:
    return asdict(spec)

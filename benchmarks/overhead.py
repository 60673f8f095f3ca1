"""Overhead of the MADCluster head on every backbone: parameters, MACs, latency, peak memory.

``python -m benchmarks overhead`` (or ``python -m benchmarks.overhead``) measures, for each
backbone plain and wrapped (``adapters.get(name).build(...)`` / ``.wrap(...)``):

* parameters (``numel``; buffers excluded) and their delta, checked to be exactly ``K*D + 1``
  (the centres and nu);
* MACs of one forward at batch 1 (:mod:`benchmarks.macs`): FlopCounterMode on the ``meta``
  device (MACs = FLOPs / 2; CPU fallback with a note), the head's MACs derived analytically, and
  a module-hook count in the convention of the paper's appendix Table 2;
* latency of an inference pass (``adapter.score``) and of a full training step
  (``adapter.train_step``: forward, losses, backward, optimiser steps) at ``--batch``, median
  and IQR over ``--repeats`` after warm-up, plain and wrapped interleaved so both see the same
  machine load; the ratios are medians of adjacent wrapped/plain pairs;
* peak memory of a training step: ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the
  peak resident set size of a fresh subprocess per (model, variant) (see :func:`memory_probe`);
* the paper's published MACs and #Params (METHOD.md section 4.2) beside ours.

Writes ``overhead.csv`` (one row per backbone and batch) and ``overhead.md`` atomically into
``--out`` and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

import adapters
from adapters.base import backbone_of
from benchmarks.macs import count_macs, head_macs_analytic
from madcluster_plugin.files import atomic_write_text

log = logging.getLogger("benchmarks.overhead")

REPO_ROOT = Path(__file__).resolve().parents[1]
MAC_TARGET_PCT = 0.5     # the head may add at most 0.5% MACs ...
TIME_TARGET_RATIO = 1.05  # ... and 5% wall time to a training step (issue #7, acceptance 2)
CLOCKS = ("wall", "process")
LR = 1e-4                # the released code's learning rate (METHOD.md section 4.7)

#: MADCluster appendix Table 2 (MSL), as printed (METHOD.md section 4.2):
#: name -> (MACs plain, #Params plain, MACs +MADCluster, #Params +MADCluster)
PAPER_TABLE2: dict[str, tuple[str, str, str, str]] = {
    "deepsvdd": ("31.81M", "311.55K", "31.81M", "311.62K"),
    "usad": ("427.36M", "256.26M", "427.36M", "256.26M"),
    "beatgan": ("10.22G", "185.85M", "10.22G", "185.85M"),
    "omnianomaly": ("35.44M", "350.72K", "35.44M", "350.83K"),
    "thoc": ("69.42M", "390.78K", "69.42M", "390.91K"),
    "anomaly_transformer": ("485.23M", "4.86M", "485.23M", "4.86M"),
    "dcdetector": ("1.189G", "912.18K", "1.189G", "912.30K"),
}
_UNITS = {"K": 1e3, "M": 1e6, "G": 1e9}

CSV_COLUMNS = [
    "model", "batch", "window", "channels", "K", "D",
    "params_plain", "params_wrapped", "params_delta", "params_delta_expected", "params_delta_ok",
    "macs_plain", "macs_wrapped", "macs_delta_pct", "head_macs_analytic", "head_macs_pct",
    "macs_hook_plain", "macs_hook_wrapped", "macs_device", "macs_target_ok",
    "train_ms_plain", "train_iqr_plain", "train_ms_wrapped", "train_iqr_wrapped", "train_ratio",
    "train_ratio_iqr", "train_ratio_min", "train_target_ok",
    "infer_ms_plain", "infer_iqr_plain", "infer_ms_wrapped", "infer_iqr_wrapped", "infer_ratio",
    "infer_ratio_iqr", "head_train_ms", "head_infer_ms", "head_train_pct",
    "peak_mem_plain_mb", "peak_mem_wrapped_mb", "peak_mem_method",
    "paper_macs", "paper_params", "paper_macs_wrapped", "paper_params_wrapped",
    "repeats", "infer_repeats", "clock", "device", "note",
]


def parse_paper(value: str) -> float:
    """``"31.81M"`` -> ``31810000.0`` (the table's K/M/G suffixes)."""
    value = value.strip()
    if value and value[-1] in _UNITS:
        return float(value[:-1]) * _UNITS[value[-1]]
    return float(value)


def human(n: float | int | None, digits: int = 2) -> str:
    """``31810000`` -> ``"31.81M"`` (the table's style); ``None``/NaN -> ``"-"``."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f}{suffix}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------
def build_pair(name: str, channels: int, window: int, n_clusters: int, *, seed: int = 0,
               device: torch.device | str = "cpu", **head: Any) -> tuple[nn.Module, nn.Module]:
    """A plain and a wrapped instance of ``name`` with identical backbone weights.

    Both backbones are built from the same seed, so plain and wrapped differ only by the head.
    """
    adapter = adapters.get(name)
    torch.manual_seed(seed)
    plain = adapter.build(channels, window=window)
    torch.manual_seed(seed)
    wrapped = adapter.wrap(adapter.build(channels, window=window), n_clusters=n_clusters, **head)
    return plain.to(device), wrapped.to(device)


def n_params(model: nn.Module) -> int:
    """Number of parameters (``numel``; shared parameters once; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def _run_plain(model: nn.Module, x: Tensor) -> Any:
    return model(x)


def _run_wrapped(model: nn.Module, x: Tensor) -> Any:
    out = model(x)
    return out, model.head_score()


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
class Timer:
    """Milliseconds of one call.

    On a GPU: CUDA events around the call, with synchronisation before and after. On a CPU:
    ``clock="wall"`` (``time.perf_counter``, the latency a user sees on an idle machine) or
    ``clock="process"`` (``time.process_time``: CPU seconds of all threads of this process).
    The process clock is immune to preemption by other processes, which dominates wall time on
    an oversubscribed machine; use it with ``--threads 1``, where CPU time equals the latency on
    one idle core (with more threads it also counts OpenMP workers spinning while they wait).
    """

    def __init__(self, device: torch.device, clock: str = "wall") -> None:
        if clock not in CLOCKS:
            raise ValueError(f"clock={clock!r}; expected one of {CLOCKS}")
        self.cuda = device.type == "cuda"
        self.now = time.process_time if clock == "process" else time.perf_counter

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return float(start.elapsed_time(end))
        t0 = self.now()
        fn()
        return (self.now() - t0) * 1e3


@dataclass
class Timing:
    """Median and interquartile range (ms) of plain and wrapped; median and IQR of the paired ratio."""

    plain_ms: float
    plain_iqr: float
    wrapped_ms: float
    wrapped_iqr: float
    ratio: float
    ratio_iqr: float
    ratio_min: float  # fastest wrapped / fastest plain: interference only ever adds time
    n: int  # number of pairs


def summarize(plain: Sequence[float], wrapped: Sequence[float]) -> Timing:
    """Medians, IQRs, and the median of the per-repeat ratios wrapped / plain.

    Each repeat's plain and wrapped measurements are adjacent in time, so their ratio cancels
    slow drifts of machine load that a ratio of overall medians would not.
    """
    if len(plain) != len(wrapped) or not plain:
        raise ValueError(f"need the same non-zero number of plain and wrapped repeats; got "
                         f"{len(plain)} and {len(wrapped)}")

    def iqr(v: Sequence[float]) -> float:
        if len(v) < 2:
            return 0.0
        q = statistics.quantiles(v, n=4, method="inclusive")
        return q[2] - q[0]

    ratios = [w / p for p, w in zip(plain, wrapped)]
    return Timing(statistics.median(plain), iqr(plain), statistics.median(wrapped), iqr(wrapped),
                  statistics.median(ratios), iqr(ratios), min(wrapped) / min(plain), len(ratios))


def _prepare(name: str, model: nn.Module, x: Tensor) -> dict[str, torch.optim.Optimizer]:
    """Optimisers, fit-time state (``on_fit_start``) and score statistics, as a real run has."""
    adapter = adapters.get(name)
    backbone = backbone_of(model)
    if hasattr(backbone, "on_fit_start"):
        backbone.on_fit_start([x])
    opts = adapter.optimizers(model, LR)
    adapter.fit_score_normalizer(model, [x])
    return opts


def time_pair(name: str, plain: nn.Module, wrapped: nn.Module, x: Tensor, *, repeats: int,
              warmup: int, device: torch.device, clock: str = "wall", min_time: float = 0.0,
              max_repeats: int = 200) -> tuple[Timing, Timing]:
    """(training step, inference) timings of ``plain`` vs ``wrapped`` on the batch ``x``.

    At least ``repeats`` pairs; more, up to ``max_repeats``, while less than ``min_time`` seconds
    have passed in the phase (cheap models get many pairs, expensive ones the minimum).
    Repeats alternate the order (plain first on even repeats, wrapped first on odd ones).
    Inference is ``adapter.score`` in eval mode: the forward, the backbone's own score and, when
    wrapped, the head's score combined by ``"sum"`` (the library default).
    """
    adapter = adapters.get(name)
    timer = Timer(device, clock)
    models = {"plain": plain, "wrapped": wrapped}
    opts = {k: _prepare(name, m, x) for k, m in models.items()}
    combine = {"plain": "base", "wrapped": "sum"}

    def train(k: str) -> Callable[[], Any]:
        return lambda: adapter.train_step(models[k], x, opts[k], 0)

    def infer(k: str) -> Callable[[], Any]:
        return lambda: adapter.score(models[k], x, combine=combine[k])

    results = []
    for make, mode in ((train, "train"), (infer, "eval")):
        for m in models.values():
            m.train(mode == "train")
        for _ in range(warmup):
            for k in models:
                make(k)()
        times: dict[str, list[float]] = {"plain": [], "wrapped": []}
        r, t0 = 0, time.perf_counter()
        while r < repeats or (time.perf_counter() - t0 < min_time and r < max_repeats):
            for k in (("plain", "wrapped") if r % 2 == 0 else ("wrapped", "plain")):
                if mode == "eval":
                    models[k].eval()
                times[k].append(timer(make(k)))
            r += 1
        results.append(summarize(times["plain"], times["wrapped"]))
    return results[0], results[1]


def time_head(head: nn.Module, batch: int, steps: int, *, repeats: int, warmup: int,
              device: torch.device, clock: str = "wall", seed: int = 0) -> tuple[float, float]:
    """Median ms of the head alone on hidden states ``[batch, steps, D]``: (loss forward +
    backward, including the gradient into the hidden state; score forward without grad).

    Isolated from the backbone, this is the head's own share of a step, free of the run-to-run
    noise that dominates a wrapped/plain ratio on a busy machine. A copy of ``head`` is timed, so
    the benchmarked model is not touched.
    """
    head = copy.deepcopy(head).to(device)
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, steps, head.dim, generator=gen).to(device).requires_grad_(True)
    timer = Timer(device, clock)

    def train() -> None:
        head.zero_grad(set_to_none=True)
        h.grad = None
        head.loss(head(h)).backward()

    def infer() -> None:
        with torch.no_grad():
            head.score(head(h))

    out = []
    for fn in (train, infer):
        for _ in range(warmup):
            fn()
        out.append(statistics.median(timer(fn) for _ in range(repeats)))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_probe(name: str, variant: str, channels: int, window: int, batch: int,
                 n_clusters: int, seed: int = 0, steps: int = 2) -> dict[str, Any]:
    """Peak memory (MB) of training steps of one (model, variant) in *this* process, on the CPU.

    Meant to run in a fresh subprocess (:func:`cpu_peak_memory`). The kernel's peak-RSS mark is
    reset after the imports, then the model is built and trained for ``steps`` steps (the first
    creates the optimiser state, the second runs with it); the result is the peak RSS minus the
    RSS before the build: weights, gradients, optimiser state, activations and allocator slack.
    PyTorch's CPU allocator keeps no statistics and ``tracemalloc`` does not see its
    allocations, so the RSS is the only honest number on a CPU; a subprocess keeps other
    models' freed-but-cached pages out of it.
    """
    if variant not in ("plain", "wrapped"):
        raise ValueError(f"variant={variant!r}; expected 'plain' or 'wrapped'")
    adapter = adapters.get(name)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, window, channels, generator=gen)
    method = "peak RSS (VmHWM reset via /proc/self/clear_refs) - RSS before build"
    if not _reset_peak_rss():
        method = "ru_maxrss - RSS before build (VmHWM reset unavailable: may include import peak)"
    before_kb = _proc_status_kb("VmRSS") or 0
    torch.manual_seed(seed)
    model = adapter.build(channels, window=window)
    if variant == "wrapped":
        model = adapter.wrap(model, n_clusters=n_clusters)
    opts = _prepare(name, model, x)
    for _ in range(steps):
        adapter.train_step(model, x, opts, 0)
    peak_kb = _proc_status_kb("VmHWM")
    if peak_kb is None or method.startswith("ru_maxrss"):
        import resource
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": (peak_kb - before_kb) / 1024.0, "method": method}


def cpu_peak_memory(name: str, variant: str, channels: int, window: int, batch: int,
                    n_clusters: int, seed: int = 0, threads: int | None = None,
                    timeout: float = 900.0) -> tuple[float, str]:
    """Run :func:`memory_probe` in a fresh Python process; returns (MB, method)."""
    cmd = [sys.executable, "-m", "benchmarks.overhead", "--memory-probe", name, variant,
           "--channels", str(channels), "--window", str(window), "--batch", str(batch),
           "--clusters", str(n_clusters), "--seed", str(seed)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *paths])
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {name}/{variant} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr.strip()[-2000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return float(res["peak_mb"]), str(res["method"])


def cuda_peak_memory(name: str, variant: str, channels: int, window: int, batch: int,
                     n_clusters: int, device: torch.device, seed: int = 0) -> tuple[float, str]:
    """Peak ``max_memory_allocated`` (MB) of one training step, over what was allocated before
    the model was built (weights, gradients, optimiser state and activations)."""
    adapter = adapters.get(name)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, window, channels, generator=gen).to(device)
    base = torch.cuda.memory_allocated(device)
    torch.manual_seed(seed)
    model = adapter.build(channels, window=window)
    if variant == "wrapped":
        model = adapter.wrap(model, n_clusters=n_clusters)
    model = model.to(device)
    opts = _prepare(name, model, x)
    adapter.train_step(model, x, opts, 0)  # creates the optimiser state
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    adapter.train_step(model, x, opts, 0)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del model, opts
    torch.cuda.empty_cache()
    return peak / 2**20, "torch.cuda.max_memory_allocated during step 2 - allocated before build"


# ---------------------------------------------------------------------------------------------
# one backbone
# ---------------------------------------------------------------------------------------------
def measure_model(name: str, *, channels: int, window: int, batches: Sequence[int], n_clusters: int,
                  device: torch.device, repeats: int, warmup: int, memory: bool,
                  clock: str = "wall", min_time: float = 0.0, seed: int = 0) -> list[dict[str, Any]]:
    """All measurements of one backbone: one row per batch size."""
    adapter = adapters.get(name)
    notes: list[str] = []
    # ---- MACs at batch 1 (meta; no allocation, no init cost) ----------------------------
    t0 = time.perf_counter()
    shape = (1, window, channels)
    mac_plain = count_macs(lambda: adapter.build(channels, window=window), shape, run=_run_plain)
    # check_finite=False: the head's NaN guard reads a value (impossible on meta); no MACs.
    mac_wrapped = count_macs(
        lambda: adapter.wrap(adapter.build(channels, window=window), n_clusters=n_clusters,
                             check_finite=False), shape, run=_run_wrapped)
    for which, mc in (("plain", mac_plain), ("wrapped", mac_wrapped)):
        if mc.note:
            notes.append(f"MACs {which}: {mc.note}")
    log.info("%s: MACs counted in %.1fs", name, time.perf_counter() - t0)
    # ---- parameters ---------------------------------------------------------------------
    plain, wrapped = build_pair(name, channels, window, n_clusters, seed=seed, device=device)
    dim = int(wrapped.head.dim)
    k = int(wrapped.head.config.n_clusters)
    p_plain, p_wrapped = n_params(plain), n_params(wrapped)
    head_steps = _head_steps(wrapped, shape)  # T' of the captured hidden state (1 for layout BD)
    head_analytic = head_macs_analytic(1, head_steps, dim, k,
                                       target=wrapped.head.config.target)
    paper = PAPER_TABLE2.get(name)
    rows = []
    for batch in batches:
        gen = torch.Generator().manual_seed(seed + batch)
        x = torch.rand(batch, window, channels, generator=gen).to(device)
        t0 = time.perf_counter()
        train, infer = time_pair(name, plain, wrapped, x, repeats=repeats, warmup=warmup, device=device,
                                 clock=clock, min_time=min_time)
        head_train_ms, head_infer_ms = time_head(
            wrapped.head, batch, head_steps, repeats=max(repeats, 5), warmup=max(warmup, 1),
            device=device, clock=clock, seed=seed)
        log.info("%s batch %d: timed in %.1fs (train %.1f/%.1f ms, head alone %.2f ms)", name, batch,
                 time.perf_counter() - t0, train.plain_ms, train.wrapped_ms, head_train_ms)
        mem_plain = mem_wrapped = float("nan")
        mem_method = "skipped (--skip-memory)"
        if memory:
            t0 = time.perf_counter()
            if device.type == "cuda":
                mem_plain, mem_method = cuda_peak_memory(name, "plain", channels, window, batch,
                                                         n_clusters, device, seed)
                mem_wrapped, _ = cuda_peak_memory(name, "wrapped", channels, window, batch,
                                                  n_clusters, device, seed)
            else:
                threads = torch.get_num_threads()
                mem_plain, mem_method = cpu_peak_memory(name, "plain", channels, window, batch, n_clusters,
                                                        seed, threads)
                mem_wrapped, _ = cpu_peak_memory(name, "wrapped", channels, window, batch, n_clusters,
                                                 seed, threads)
            log.info("%s batch %d: memory in %.1fs", name, batch, time.perf_counter() - t0)
        base_macs = mac_plain.macs or float("nan")
        macs_delta_pct = 100.0 * (mac_wrapped.macs - mac_plain.macs) / base_macs
        head_pct = 100.0 * head_analytic / base_macs
        rows.append({
            "model": name, "batch": batch, "window": window, "channels": channels, "K": k, "D": dim,
            "params_plain": p_plain, "params_wrapped": p_wrapped, "params_delta": p_wrapped - p_plain,
            "params_delta_expected": k * dim + 1, "params_delta_ok": p_wrapped - p_plain == k * dim + 1,
            "macs_plain": mac_plain.macs, "macs_wrapped": mac_wrapped.macs,
            "macs_delta_pct": macs_delta_pct, "head_macs_analytic": head_analytic,
            "head_macs_pct": head_pct,
            "macs_hook_plain": mac_plain.hook_macs, "macs_hook_wrapped": mac_wrapped.hook_macs,
            "macs_device": mac_plain.device if mac_plain.device == mac_wrapped.device
            else f"{mac_plain.device}/{mac_wrapped.device}",
            "macs_target_ok": max(macs_delta_pct, head_pct) <= MAC_TARGET_PCT,
            "train_ms_plain": train.plain_ms, "train_iqr_plain": train.plain_iqr,
            "train_ms_wrapped": train.wrapped_ms, "train_iqr_wrapped": train.wrapped_iqr,
            "train_ratio": train.ratio, "train_ratio_iqr": train.ratio_iqr,
            "train_ratio_min": train.ratio_min, "train_target_ok": train.ratio <= TIME_TARGET_RATIO,
            "infer_ms_plain": infer.plain_ms, "infer_iqr_plain": infer.plain_iqr,
            "infer_ms_wrapped": infer.wrapped_ms, "infer_iqr_wrapped": infer.wrapped_iqr,
            "infer_ratio": infer.ratio, "infer_ratio_iqr": infer.ratio_iqr,
            "head_train_ms": head_train_ms, "head_infer_ms": head_infer_ms,
            "head_train_pct": 100.0 * head_train_ms / train.plain_ms,
            "peak_mem_plain_mb": mem_plain, "peak_mem_wrapped_mb": mem_wrapped,
            "peak_mem_method": mem_method,
            "paper_macs": parse_paper(paper[0]) if paper else float("nan"),
            "paper_params": parse_paper(paper[1]) if paper else float("nan"),
            "paper_macs_wrapped": parse_paper(paper[2]) if paper else float("nan"),
            "paper_params_wrapped": parse_paper(paper[3]) if paper else float("nan"),
            "repeats": train.n, "infer_repeats": infer.n,
            "clock": "cuda events" if device.type == "cuda" else clock,
            "device": _device_label(device), "note": "; ".join(notes),
        })
    del plain, wrapped
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _head_steps(wrapped: nn.Module, shape: tuple[int, ...]) -> int:
    """T' of the captured hidden state ``[B, T', D]`` for an input of ``shape`` (e.g. 1 for BD)."""
    dev = next(wrapped.parameters()).device
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(dev)
    was = wrapped.training
    wrapped.eval()
    try:
        with torch.no_grad():
            wrapped(x)
            steps = int(wrapped.hidden.shape[1])
    finally:
        wrapped.train(was)
    return steps


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------
def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k, "")) for k in CSV_COLUMNS})
    return buf.getvalue()


def _ms(v: float, iqr: float) -> str:
    return "-" if math.isnan(v) else f"{v:.1f} ± {iqr / 2:.1f}"


def _mb(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.0f}"


def time_verdict(row: dict[str, Any]) -> str:
    """``met`` / ``**missed**``: the median paired ratio against the training-step time target."""
    return "met" if row["train_ratio"] <= TIME_TARGET_RATIO else "**missed**"


def _first_row_per_model(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model (the first batch size's): parameters and MACs do not depend on the batch."""
    firsts: dict[str, dict[str, Any]] = {}
    for r in rows:
        firsts.setdefault(r["model"], r)
    return list(firsts.values())


def to_markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The report: environment, three tables (size, MACs, time and memory) and notes."""
    out = ["# MADCluster head overhead", ""]
    out.append(f"Command: `{meta['command']}`  ")
    out.append(f"Device: {meta['device']}; torch {meta['torch']}; Python {meta['python']}; "
               f"window {meta['window']}, channels {meta['channels']}, K = {meta['K']}; "
               f"timing: {meta['warmup']} warm-up, then at least {meta['repeats']} plain/wrapped pairs and more "
               f"until {meta['min_time']:g} s per phase (at most 200), {meta['clock']}; "
               f"load average (1 min) at start -> end {meta['load']}; wall time {meta['wall_s']:.0f} s.")
    out += ["", "## Parameters", "",
            "| model | D | params plain | params +head | delta | K*D+1 | paper plain | paper +head |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in _first_row_per_model(rows):
        paper = PAPER_TABLE2.get(r["model"], ("-",) * 4)
        ok = "ok" if r["params_delta_ok"] else "**MISMATCH**"
        out.append(f"| {r['model']} | {r['D']} | {r['params_plain']:,} | {r['params_wrapped']:,} | "
                   f"{r['params_delta']:,} | {r['params_delta_expected']:,} ({ok}) | {paper[1]} | {paper[3]} |")
    out += ["", "## MACs of one forward at batch 1", "",
            "FlopCounterMode counts matrix-class ops (MACs = FLOPs / 2); the wrapped forward includes "
            "the head's score. Head (analytic): cosine + squared distance per point "
            "(`benchmarks.macs.head_macs_analytic`); % of the plain forward. Hook: module-hook "
            "count in the paper's convention (no functional matmul/einsum).", "",
            "| model | MACs plain | MACs +head | delta % | head (analytic) | head % | hook plain | hook +head | paper | counted on | <= 0.5% |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in _first_row_per_model(rows):
        paper = PAPER_TABLE2.get(r["model"], ("-",) * 4)
        out.append(f"| {r['model']} | {human(r['macs_plain'])} | {human(r['macs_wrapped'])} | "
                   f"{r['macs_delta_pct']:.4f} | {human(r['head_macs_analytic'])} | {r['head_macs_pct']:.4f} | "
                   f"{human(r['macs_hook_plain'])} | {human(r['macs_hook_wrapped'])} | {paper[0]} | "
                   f"{r['macs_device']} | {'yes' if r['macs_target_ok'] else '**no**'} |")
    out += ["", "## Latency and peak memory", "",
            "Median ± half the IQR (ms). Ratio: median of adjacent wrapped/plain pairs. Training step: "
            "`adapter.train_step` (forward, losses, backward, all optimiser steps). Inference: "
            "`adapter.score` in eval mode (plain: base score; wrapped: `combine=\"sum\"`). Head alone: "
            "the head's loss forward + backward on a hidden state of the same shape, timed in "
            "isolation (median ms, % of the plain training step).", "",
            "| model | batch | pairs | train plain | train +head | train ratio | <= 1.05 | head alone | infer plain | infer +head | infer ratio | peak MB plain | peak MB +head |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['batch']} | {r['repeats']}/{r['infer_repeats']} | "
                   f"{_ms(r['train_ms_plain'], r['train_iqr_plain'])} | "
                   f"{_ms(r['train_ms_wrapped'], r['train_iqr_wrapped'])} | {r['train_ratio']:.3f} | "
                   f"{'yes' if r['train_target_ok'] else '**no**'} | "
                   f"{r['head_train_ms']:.2f} ({r['head_train_pct']:.2f}%) | "
                   f"{_ms(r['infer_ms_plain'], r['infer_iqr_plain'])} | "
                   f"{_ms(r['infer_ms_wrapped'], r['infer_iqr_wrapped'])} | {r['infer_ratio']:.3f} | "
                   f"{_mb(r['peak_mem_plain_mb'])} | {_mb(r['peak_mem_wrapped_mb'])} |")
    out += ["", f"## Targets: the head adds <= {MAC_TARGET_PCT}% MACs and <= "
            f"{100 * (TIME_TARGET_RATIO - 1):.0f}% training-step time", "",
            "MACs added: the larger of the counted delta and the analytic head cost. Step time: the "
            "median paired ratio (± half its IQR), which decides the verdict; for reading it, the "
            "ratio of the fastest steps (interference only ever adds time) and the head timed alone "
            "as a share of the plain step (what the head itself costs; the rest of a gap is the "
            "backbone's extra backward through the attachment point, or noise).", "",
            "| model | batch | MACs added % | step ratio (median) | step ratio (fastest) | head alone % | MACs | time |",
            "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        added = max(r["macs_delta_pct"], r["head_macs_pct"])
        out.append(f"| {r['model']} | {r['batch']} | {added:.4f} | {r['train_ratio']:.3f} ± "
                   f"{r['train_ratio_iqr'] / 2:.3f} | {r['train_ratio_min']:.3f} | {r['head_train_pct']:.2f} | "
                   f"{'met' if r['macs_target_ok'] else '**missed**'} | {time_verdict(r)} |")
    methods = sorted({r["peak_mem_method"] for r in rows})
    out += ["", f"Peak memory: {'; '.join(methods)}."]
    notes = [f"- {r['model']}: {r['note']}" for r in rows if r["note"]]
    if notes:
        out += ["", "## Notes", ""] + sorted(set(notes))
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(choice)


def _models(spec: Sequence[str]) -> list[str]:
    names = []
    for item in spec:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            if part == "all":
                names += adapters.names()
            else:
                adapters.get(part)  # fails with the known names and the closest match
                names.append(part.lower().replace("-", "_"))
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="madcluster-bench overhead",
        description="Parameters, MACs, latency and peak memory of each backbone with and without "
                    "the MADCluster head (MADCluster appendix Table 2, left half).")
    p.add_argument("--models", nargs="+", default=["all"],
                   help="backbones (names or comma lists) or 'all' (default)")
    p.add_argument("--channels", type=int, default=55, help="input channels C (MSL: 55)")
    p.add_argument("--window", type=int, default=100, help="window length T (paper: 100)")
    p.add_argument("--batch", type=int, nargs="+", default=[128],
                   help="batch size(s) for latency and memory (paper: 128); one CSV row per model and batch")
    p.add_argument("--clusters", type=int, default=1, help="K, the number of centres (paper: 1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", type=Path, default=Path("results/overhead"), help="output folder")
    p.add_argument("--repeats", type=int, default=None,
                   help="minimum timed repeats per variant (default: 5 on a CPU, 30 on a GPU)")
    p.add_argument("--min-time", type=float, default=None,
                   help="keep repeating (up to 200 pairs) until this many seconds per model and "
                        "phase have passed (default: 10 on a CPU, 2 on a GPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed warm-up repeats per variant (default: 2 on a CPU, 5 on a GPU)")
    p.add_argument("--clock", choices=CLOCKS, default="wall",
                   help="CPU timing clock: wall (default) or process (CPU time; with --threads 1 on "
                        "a shared machine). CUDA always uses CUDA events")
    p.add_argument("--skip-memory", action="store_true", help="do not measure peak memory")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-probe", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    return p


def _validate(args: argparse.Namespace) -> None:
    for name in ("channels", "window", "clusters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1; got {getattr(args, name)}")
    if any(b < 1 for b in args.batch):
        raise ValueError(f"--batch sizes must be >= 1; got {args.batch}")
    if args.min_time is not None and args.min_time < 0:
        raise ValueError(f"--min-time must be >= 0; got {args.min_time}")
    for name in ("repeats", "warmup"):
        v = getattr(args, name)
        if v is not None and v < (1 if name == "repeats" else 0):
            raise ValueError(f"--{name} must be >= {1 if name == 'repeats' else 0}; got {v}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks overhead`` (and ``python -m benchmarks.overhead``)."""
    args = build_parser().parse_args(argv)
    try:
        _validate(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        name, variant = args.memory_probe
        res = memory_probe(name, variant, args.channels, args.window, args.batch[0], args.clusters, args.seed)
        print(json.dumps(res))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        device = _resolve_device(args.device)
        names = _models(args.models)
    except (ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    repeats = args.repeats if args.repeats is not None else (30 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    min_time = args.min_time if args.min_time is not None else (2.0 if cuda else 10.0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in names:
        log.info("%s ...", name)
        rows += measure_model(name, channels=args.channels, window=args.window, batches=args.batch,
                              n_clusters=args.clusters, device=device, repeats=repeats,
                              warmup=warmup, memory=not args.skip_memory, clock=args.clock,
                              min_time=min_time, seed=args.seed)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    meta = {"command": "python -m benchmarks overhead " + " ".join(argv_list),
            "device": _device_label(device), "torch": torch.__version__,
            "python": platform.python_version(), "window": args.window, "channels": args.channels,
            "K": args.clusters, "repeats": repeats, "min_time": min_time, "warmup": warmup,
            "clock": "CUDA events" if cuda else f"{args.clock} clock",
            "load": f"{load:.2f} -> {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a",
            "wall_s": time.perf_counter() - t_start}
    md = to_markdown(rows, meta)
    atomic_write_text(args.out / "overhead.csv", to_csv(rows))
    atomic_write_text(args.out / "overhead.md", md)
    print(md)
    log.info("wrote %s and %s", args.out / "overhead.csv", args.out / "overhead.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

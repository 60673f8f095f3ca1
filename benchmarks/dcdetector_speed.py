"""Speed and peak memory of one DCdetector + MADCluster training step: ours vs the released order.

``python -m benchmarks.dcdetector_speed`` times one training step (forward, DCdetector loss +
MADCluster head loss, backward, Adam step) in the released MADCluster configuration (T = 100,
patch sizes 2/5/10, d_model 256, 1 head, 3 layers, 55 channels, batch 32) for two computations
of the same model (same parameters, same head):

* ``ours``: :class:`baselines.dcdetector.DCdetector` trained through ``adapters.get("dcdetector")``
  (channel means before up-sampling, no ``[T x T]`` map, scores in the conv's input space);
* ``released``: :func:`reference_maps` / :func:`reference_loss` below, a straightforward
  re-implementation of the released code's computation order: per-layer query/key projections of
  every channel's tokens, per-channel maps up-sampled to ``[B*C, H, T, T]`` and only then averaged
  over channels, dense KL over the ``[T x T]`` maps, and the discarded value projection of
  ``x_ori`` per layer and patch size. The MADCluster head is the same module on ``x_ori``.

Each (computation, dropout) arm runs in a fresh subprocess, so its peak resident set size
(``ru_maxrss``) is its own; we report the peak and the peak minus the RSS just before the first
step. Times (wall clock, and the process's CPU time, which a shared machine disturbs less) are the
median of ``--repeats`` steps after one warm-up step. Dropout 0.0 is the
DCdetector reference's default (and ours); 0.1 is what MADCluster's variant hard-codes.

:func:`reference_maps`, :func:`reference_loss` and :func:`reference_score` double as the
straightforward computation the tests compare our maps, losses, gradients and scores against.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from einops import reduce, repeat
from torch import Tensor

from baselines.dcdetector import KL_EPS, DCdetector, inpatch_tokens, normalize_window, patch_tokens

RELEASED = dict(window=100, patch_sizes=(2, 5, 10), d_model=256, n_heads=1, e_layers=3)
N_CHANNELS, BATCH = 55, 32


# ---- the straightforward computation (released order) -------------------------------------
def reference_maps(model: DCdetector, x: Tensor, inpatch: str | None = None,
                   compute_values: bool = True) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Dense maps in the released order: lists (patch-size major, layer minor) of ``[B, H, T, T]``.

    ``inpatch``: ``"strided"`` (strided tokens, tiled maps) or ``"contiguous"`` (contiguous tokens,
    block maps), the two consistent layouts of our model (default: the model's own); or
    ``"released"``: the released code's contiguous tokens with tiled maps, which puts the in-patch
    weights on the wrong time pairs. Returns ``(series, prior, x_ori)``.
    """
    inpatch = inpatch or model.inpatch
    if inpatch not in ("strided", "contiguous", "released"):
        raise ValueError(f"inpatch={inpatch!r}; expected 'strided', 'contiguous' or 'released'")
    batch, window, channels = x.shape
    heads, dh = model.n_heads, model.d_model // model.n_heads
    if model.normalize:
        x = normalize_window(x)
    x_ori = model.window_embedding(x)
    series, prior = [], []
    for i, p in enumerate(model.patch_sizes):
        n = window // p
        e_patch = model.patch_embeddings[i](patch_tokens(x, p))
        u_in = inpatch_tokens(x, p, "strided" if inpatch == "strided" else "contiguous")
        e_in = model.inpatch_embeddings[i](u_in)
        for layer in model.layers:
            maps = []
            for e in (e_patch, e_in):
                q = layer.query_projection(e).unflatten(-1, (heads, dh))
                k = layer.key_projection(e).unflatten(-1, (heads, dh))
                logits = torch.einsum("blhe,bshe->bhls", q, k) / math.sqrt(dh)
                maps.append(model.attn_dropout(torch.softmax(logits, dim=-1)))
            if compute_values:  # the released code projects x_ori here and never uses it
                layer.value_projection(x_ori)
            s_up = repeat(maps[0], "b h l s -> b h (l r1) (s r2)", r1=p, r2=p)  # per channel [T x T]
            n_up = (repeat(maps[1], "b h l s -> b h (l r1) (s r2)", r1=n, r2=n) if inpatch == "contiguous"
                    else maps[1].repeat(1, 1, n, n))
            series.append(reduce(s_up, "(b c) h l s -> b h l s", "mean", c=channels))
            prior.append(reduce(n_up, "(b c) h l s -> b h l s", "mean", c=channels))
    return series, prior, x_ori


def _row_kl(p: Tensor, q: Tensor) -> Tensor:
    """The reference's smoothed row-wise KL, averaged over heads: ``[B, H, T, T] -> [B, T]``."""
    return (p * (torch.log(p + KL_EPS) - torch.log(q + KL_EPS))).sum(-1).mean(1)


def reference_loss(series: list[Tensor], prior: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(prior_loss, series_loss)`` of the released solver on dense maps (loss = prior - series)."""
    series_loss, prior_loss = 0.0, 0.0
    for s, n in zip(series, prior):
        n_hat = n / n.sum(-1, keepdim=True)
        series_loss = series_loss + _row_kl(s, n_hat.detach()).mean() + _row_kl(n_hat.detach(), s).mean()
        prior_loss = prior_loss + _row_kl(n_hat, s.detach()).mean() + _row_kl(s.detach(), n_hat).mean()
    return prior_loss / len(prior), series_loss / len(prior)


def reference_score(series: list[Tensor], prior: list[Tensor], temperature: float = 50.0) -> Tensor:
    """The released test-time metric ``softmax_t(-temperature * sum_u KL terms)``: ``[B, T]``."""
    disc = 0.0
    for s, n in zip(series, prior):
        n_hat = n / n.sum(-1, keepdim=True)
        disc = disc + _row_kl(s, n_hat) + _row_kl(n_hat, s)
    return torch.softmax(-temperature * disc, dim=-1)


# ---- one arm, in its own process ----------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_arm(arm: str, dropout: float, repeats: int, batch: int, threads: int | None = None,
            seed: int = 0) -> dict[str, Any]:
    """Build the released configuration, run ``1 + repeats`` training steps, measure them."""
    if threads:
        torch.set_num_threads(threads)
    import adapters
    from madcluster_plugin import MADClusterHead

    torch.manual_seed(seed)
    x = torch.randn(batch, RELEASED["window"], N_CHANNELS)
    adapter = adapters.get("dcdetector")
    if arm == "ours":
        model = adapter.wrap(adapter.build(N_CHANNELS, dropout=dropout, normalize=False,
                                           window=RELEASED["window"],
                                           **{k: v for k, v in RELEASED.items() if k != "window"}),
                             attach="x_ori")
        opts = adapter.optimizers(model, 1e-4)

        def step() -> None:
            adapter.train_step(model, x, opts, 0)
        n_params = sum(p.numel() for p in model.parameters())
    elif arm == "released":
        net = adapter.build(N_CHANNELS, dropout=dropout, normalize=False, window=RELEASED["window"],
                            **{k: v for k, v in RELEASED.items() if k != "window"})
        head = MADClusterHead(net.d_model)
        net.train()
        head.train()
        opt = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=1e-4)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            series, prior, x_ori = reference_maps(net, x)
            prior_loss, series_loss = reference_loss(series, prior)
            loss = prior_loss - series_loss + head.loss(head(x_ori))
            loss.backward()
            opt.step()
        n_params = sum(p.numel() for p in net.parameters()) + sum(p.numel() for p in head.parameters())
    else:
        raise ValueError(f"arm={arm!r}; expected 'ours' or 'released'")
    rss_before = _rss_bytes()
    times, cpu_times = [], []
    for _ in range(1 + repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return {"arm": arm, "dropout": dropout, "batch": batch, "params": n_params,
            "step_s": statistics.median(times[1:]), "first_step_s": times[0],
            "cpu_s": statistics.median(cpu_times[1:]),
            "all_steps_s": [round(t, 4) for t in times],
            "rss_before_mb": rss_before / 2**20, "peak_rss_mb": _peak_rss_bytes() / 2**20,
            "threads": torch.get_num_threads()}


def _spawn(arm: str, dropout: float, repeats: int, batch: int, threads: int | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.dcdetector_speed", "--arm", arm, "--dropout", str(dropout),
           "--repeats", str(repeats), "--batch", str(batch)] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per arm (after 1 warm-up)")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--threads", type=int, default=None, help="torch threads per arm (default: torch's)")
    parser.add_argument("--arm", choices=("ours", "released"), help=argparse.SUPPRESS)
    parser.add_argument("--dropout", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.arm:  # child process: one arm, one JSON line
        print(json.dumps(run_arm(args.arm, args.dropout, args.repeats, args.batch, args.threads)))
        return 0
    print(f"DCdetector + MADCluster, one training step: T={RELEASED['window']}, patches "
          f"{RELEASED['patch_sizes']}, d_model {RELEASED['d_model']}, {RELEASED['n_heads']} head, "
          f"{RELEASED['e_layers']} layers, {N_CHANNELS} channels, batch {args.batch}")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {args.threads or torch.get_num_threads()} threads; median of {args.repeats} "
          f"steps after 1 warm-up; each arm in a fresh process\n")
    rows = []
    for dropout in args.dropouts:
        for arm in ("released", "ours"):
            rows.append(_spawn(arm, dropout, args.repeats, args.batch, args.threads))
    print("| dropout | computation | params | step, wall (s) | step, CPU (s) | peak RSS (MB) | "
          "peak - RSS before step (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dropout']:.1f} | {r['arm']} | {r['params']:,} | {r['step_s']:.3f} | {r['cpu_s']:.3f} | "
              f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['rss_before_mb']:.0f} |")
    print()
    for dropout in args.dropouts:
        ref = next(r for r in rows if r["arm"] == "released" and r["dropout"] == dropout)
        ours = next(r for r in rows if r["arm"] == "ours" and r["dropout"] == dropout)
        increment = ((ours["peak_rss_mb"] - ours["rss_before_mb"])
                     / (ref["peak_rss_mb"] - ref["rss_before_mb"]))
        print(f"dropout {dropout:.1f}: ours is {ref['step_s'] / ours['step_s']:.1f}x faster in wall time "
              f"({ref['cpu_s'] / ours['cpu_s']:.1f}x in CPU time); peak RSS "
              f"{ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x of the released order's "
              f"(step increment {increment:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

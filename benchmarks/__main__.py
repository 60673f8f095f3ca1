"""Command line: ``python -m benchmarks compare|clusters|ablation|overhead|report`` (also the
console script ``madcluster-bench``).

With no arguments it runs ``compare`` in the quick profile on the built-in synthetic data (a
few minutes on two CPU cores) and writes ``rows.csv``, ``table.md`` and ``plots/`` under
``runs/compare-<timestamp>``. Re-running with the same ``--out`` resumes: finished rows are
skipped, missing ones are computed.

Examples::

    madcluster-bench                                          # quick compare on synthetic data
    madcluster-bench compare --datasets MSL --seeds 0 1 2 --out runs/msl-quick
    madcluster-bench clusters --datasets MSL --models deepsvdd --ks 1 2 3
    madcluster-bench ablation --datasets MSL --profile paper --device cuda
    madcluster-bench overhead ...                             # see benchmarks.overhead
    madcluster-bench report --out runs/msl-quick              # rebuild table.md and plots
    torchrun --nproc_per_node 4 -m benchmarks compare --datasets SMD --profile paper --device cuda

Under ``torchrun`` each run is trained by all processes together (DistributedDataParallel;
``profile.batch`` stays the global batch) and only rank 0 writes; see docs/distributed.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

COMMANDS = ("compare", "clusters", "ablation", "overhead", "report")
_DEFAULT_VARIANTS = {"compare": ["base", "madcluster"], "ablation": ["mapping", "cluster", "both"],
                     "clusters": ["madcluster"]}
_ALLOWED_VARIANTS = {"compare": ("base", "madcluster"), "ablation": ("base", "mapping", "cluster", "both"),
                     "clusters": ("madcluster",)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="madcluster-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (("compare", "each backbone with and without MADCluster"),
                           ("clusters", "sweep the number of clusters k (appendix Table 1)"),
                           ("ablation", "distance mapping only / clustering only / both (appendix Table 3)")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--datasets", nargs="+", default=["synthetic"],
                       help="synthetic (built in), MSL, SMAP, SMD, PSM (default: synthetic)")
        s.add_argument("--models", nargs="+", default=None,
                       help="adapter names or 'all' (default: all for compare, deepsvdd otherwise)")
        s.add_argument("--variants", nargs="+", default=None,
                       help=f"allowed: {', '.join(_ALLOWED_VARIANTS[name])} "
                            f"(default: {' '.join(_DEFAULT_VARIANTS[name])})")
        s.add_argument("--profile", default="quick", choices=("quick", "paper"))
        s.add_argument("--protocol", default="pointwise", choices=("pointwise", "paper"))
        s.add_argument("--seeds", nargs="+", type=int, default=[0])
        s.add_argument("--entities", nargs="+", default=None,
                       help="entity names (channels / machines / syn-<seed>); default: all")
        s.add_argument("--max-entities", type=int, default=None,
                       help="only the first N entities of each dataset (natural order)")
        s.add_argument("--data-dir", default=None,
                       help="folder holding MSL/, SMAP/, SMD/, PSM/ (default: $MADCLUSTER_DATA, "
                            "else <repo>/../shared/data)")
        s.add_argument("--out", default=None, help="output folder (default: runs/<command>-<time>); "
                                                   "an existing one is resumed")
        s.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
        s.add_argument("--combine", default="sum", choices=("sum", "product", "head", "base"),
                       help="score of wrapped models (default: sum of train-standardised scores)")
        s.add_argument("--epochs", type=int, default=None, help="override the profile's epochs")
        s.add_argument("--wrap", nargs="+", default=None, metavar="MODEL:KEY=VALUE",
                       help="options of a model's adapter.wrap() on top of the profile's, e.g. "
                            "thoc:hidden=drnn.layers.0 or dcdetector:attach=query (values are read "
                            "as JSON when they parse, else as text)")
        s.add_argument("--threads", type=int, default=None,
                       help="torch threads (default 1 on CPU: on a small or shared machine more "
                            "threads are often many times slower; to use several cores run several "
                            "processes with disjoint --entities and the same --out)")
        s.add_argument("--keep-going", action="store_true",
                       help="when a run fails (e.g. a diverged model), record it in failures.jsonl "
                            "and go on instead of stopping; the exit status is then 1, and a resumed "
                            "grid tries the failed runs again")
        s.add_argument("--no-plots", action="store_true")
        s.add_argument("--no-progress", action="store_true")
        s.add_argument("--save-checkpoints", action="store_true",
                       help="also write each run's best model as runs/<dataset>/<entity>/<run>.pt "
                            "(loads with madcluster_plugin.train.load_checkpoint)")
        s.add_argument("--log-level", default="WARNING")
        if name == "clusters":
            s.add_argument("--ks", nargs="+", type=int, default=list(range(1, 11)),
                           help="values of k (default 1..10)")
    sub.add_parser("overhead", add_help=False,
                   help="MACs, parameters, latency, memory with and without the head "
                        "(benchmarks.overhead; its own options)")
    r = sub.add_parser("report", help="rebuild table.md and plots of an existing --out")
    r.add_argument("--out", required=True)
    r.add_argument("--no-plots", action="store_true")
    return p


def parse_wrap_options(items: Sequence[str] | None,
                       base: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """``["thoc:hidden=drnn.layers.0", ...]`` merged over ``base`` (a profile's wrap options)."""
    import adapters

    out = {model: dict(opts) for model, opts in (base or {}).items()}
    for item in items or ():
        model, sep, assignment = item.partition(":")
        key, eq, raw = assignment.partition("=")
        if not sep or not eq or not key:
            raise ValueError(f"--wrap {item!r}: expected MODEL:KEY=VALUE, e.g. thoc:hidden=drnn.layers.0")
        model = model.lower().replace("-", "_")
        if model not in adapters.names():
            raise ValueError(f"--wrap {item!r}: unknown model {model!r}; choose from {', '.join(adapters.names())}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(model, {})[key] = value
    return out


def _models(arg: Sequence[str] | None, command: str) -> list[str]:
    import adapters

    if arg is None:
        return adapters.names() if command == "compare" else ["deepsvdd"]
    if list(arg) == ["all"]:
        return adapters.names()
    out = []
    for name in arg:
        key = name.lower().replace("-", "_")
        if key not in adapters.names():
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(adapters.names())} or 'all'")
        out.append(key)
    return out


def _variants(arg: Sequence[str] | None, command: str) -> list[str]:
    variants = list(arg) if arg else _DEFAULT_VARIANTS[command]
    bad = [v for v in variants if v not in _ALLOWED_VARIANTS[command]]
    if bad:
        raise SystemExit(f"{command}: unknown variants {bad}; allowed: {', '.join(_ALLOWED_VARIANTS[command])}")
    return variants


def _build_specs(args: argparse.Namespace) -> list:
    from .data import canonical_name, list_entities
    from .runner import RunSpec

    models = _models(args.models, args.command)
    variants = _variants(args.variants, args.command)
    ks = args.ks if args.command == "clusters" else [1]
    specs = []
    for ds_arg in args.datasets:
        ds = canonical_name(ds_arg)
        entities = list_entities(ds, args.data_dir)
        if args.entities:
            missing = [e for e in args.entities if e not in entities and ds != "synthetic"]
            if missing:
                raise SystemExit(f"{ds}: unknown entities {missing}; available: {', '.join(entities)}")
            entities = list(args.entities)
        if args.max_entities is not None:
            entities = entities[:args.max_entities]
        for ent in entities:
            for seed in args.seeds:
                for model in models:
                    for variant in variants:
                        for k in (ks if variant != "base" else [1]):
                            specs.append(RunSpec(ds, ent, model, variant, seed, k))
    return specs


def _run_command(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run a grid command; under torchrun set up the process group first and tear it down after."""
    from . import distributed
    from .runner import resolve_device

    device = resolve_device(args.device)
    ctx, device = distributed.setup(device)  # a no-op unless launched by torchrun
    try:
        code = _run_grid_command(args, argv, ctx, device)
    except BaseException:
        distributed.teardown(wait=False)  # no barrier: the other ranks may be elsewhere
        raise
    distributed.teardown()
    return code


def _run_grid_command(args: argparse.Namespace, argv: Sequence[str], ctx: Any, device: str) -> int:
    """The body of :func:`_run_command` once the (optional) process group is up."""
    import torch

    from . import distributed
    from .profiles import get_profile
    from .reports import render_table, write_plots, write_table
    from .runner import KEEP_GOING_UNDER_TORCHRUN, ResultStore, RunConfig, run_grid, unresolved_failures

    threads = args.threads or (1 if device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    profile = get_profile(args.profile).with_overrides(epochs=args.epochs)
    try:
        profile = profile.with_overrides(wrap_options=parse_wrap_options(args.wrap, profile.wrap_options))
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    cfg = RunConfig(profile=profile, protocol=args.protocol, combine=args.combine, device=device)
    out = Path(args.out or f"runs/{args.command}-{time.strftime('%Y%m%d-%H%M%S')}")
    if ctx.active:  # the default folder name has a timestamp: take rank 0's
        from madcluster_plugin.train import broadcast_object

        out = Path(broadcast_object(str(out)))
    command_line = "madcluster-bench " + " ".join(shlex.quote(a) for a in argv)
    if ctx.active:
        command_line = f"torchrun ... -m benchmarks {command_line.split(' ', 1)[1]}  # {ctx.world} processes"
    config = {"command": args.command, **cfg.to_dict()}
    try:
        specs = _build_specs(args)
        store = ResultStore(out, config, checkpoints=args.save_checkpoints)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None
    label = distributed.device_label(cfg.device, ctx)
    if ctx.main:
        print(f"{args.command}: {len(specs)} runs ({len(specs) - sum(store.is_done(s) for s in specs)} "
              f"to do), profile {profile.name}, protocol {args.protocol}, device {label} -> {out}")
    t0 = time.perf_counter()
    if args.keep_going and ctx.active:
        raise SystemExit(f"error: {KEEP_GOING_UNDER_TORCHRUN}")
    run_grid(specs, cfg, store, args.data_dir, progress=not args.no_progress,
             after_row=lambda st: write_table(st.out, args.command, config, command_line),
             keep_going=args.keep_going)
    wall = time.perf_counter() - t0
    if not ctx.main:
        return 0
    table = write_table(out, args.command, config, command_line)
    plots = [] if args.no_plots else write_plots(out, args.command)
    print(f"done in {wall:.1f} s: {out / 'rows.csv'}, {table}, {len(plots)} plot(s) in {out / 'plots'}")
    if table is not None:
        print()
        print(render_table(args.command, _reload(out), config, command_line))
    failed = unresolved_failures(out)
    if failed:
        print(f"\n{len(failed)} run(s) failed and have no row (see {store.failures_path}):", file=sys.stderr)
        for f in failed:
            print(f"  {f['dataset']}/{f['entity']} {f['model']} {f['variant']} seed {f['seed']}: "
                  f"{f['error']}: {f['message']}", file=sys.stderr)
        return 1
    return 0


def _reload(out: Path) -> list:
    from .reports import load_rows

    return load_rows(out / "rows.csv")


def _report(args: argparse.Namespace) -> int:
    from .reports import write_plots, write_table

    out = Path(args.out)
    cfg_path = out / "config.json"
    if not cfg_path.exists():
        raise SystemExit(f"error: {cfg_path} not found; --out must be a folder written by a run")
    config = json.loads(cfg_path.read_text())
    table = write_table(out, config["command"], config)
    plots = [] if args.no_plots else write_plots(out, config["command"])
    print(f"{table}, {len(plots)} plot(s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``madcluster-bench`` / ``python -m benchmarks``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["compare", *argv]
    if argv[0] == "overhead":
        from . import overhead  # written separately; imported only when asked for

        return overhead.main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "report":
        return _report(args)
    from madcluster_plugin.train import launched_by_torchrun

    where = f" [rank {os.environ.get('RANK', '0')}]" if launched_by_torchrun() else ""
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format=f"%(asctime)s{where} %(name)s %(levelname)s: %(message)s")
    return _run_command(args, argv)


if __name__ == "__main__":
    sys.exit(main())

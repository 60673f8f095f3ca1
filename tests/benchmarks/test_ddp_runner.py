"""The benchmark runner under ``torchrun --nproc_per_node 2`` (gloo, CPU) against one process.

This file is also the torchrun worker (``python tests/benchmarks/test_ddp_runner.py OUT``). One
launch, two parts:

* a grid of two wrapped baselines through :func:`benchmarks.runner.run_grid` with checkpoints:
  DeepSVDD (trained through a DDP container) and USAD (two phases: gradients averaged before each
  optimiser step). Each rank saves its final ``state_dict`` next to (not inside) the grid folder;
* the CLI, ``python -m benchmarks compare`` on the tiny ``dummy`` auto-encoder for one epoch.

The tests run the same grid and CLI command in this process and compare: identical parameters
on both ranks, the DDP models equal to the single-process ones within float tolerance, the same
rows.csv columns and keys, only rank 0's files, and the DDP checkpoints re-loaded into plain
single-process models score the test series exactly as the DDP run did.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # torchrun runs this file as a script
    sys.path.insert(0, str(ROOT))

import adapters  # noqa: E402
from benchmarks import distributed, runner  # noqa: E402
from benchmarks.__main__ import main as cli_main  # noqa: E402
from benchmarks.profiles import Profile  # noqa: E402
from benchmarks.runner import COLUMNS, ResultStore, RunConfig, RunSpec, run_grid  # noqa: E402
from benchmarks.windows import overlap_mean, window_starts  # noqa: E402
from madcluster_plugin.train import load_checkpoint  # noqa: E402
from tests.benchmarks import dummy_adapter  # noqa: E402

WIDTHS = {"deepsvdd": {"hidden": 8, "n_layers": 1, "rep_dim": 4}, "usad": {"hidden_size": 4}}
#: global batch 16 = 8 per rank; 48 training windows = 3 even steps per epoch
TINY = Profile("tiny-ddp", window=20, train_stride=5, test_stride=20, batch=16, lr=1e-2, epochs=2,
               patience=2, max_train_windows=48, max_val_windows=32, max_normalizer_windows=32,
               widths=WIDTHS)
#: "mean": the DDP average of per-rank means is the global mean (log-sum is per rank)
HEAD = {"reduction": "mean"}
SPECS = [RunSpec("synthetic", "syn-0", m, "madcluster", 0) for m in ("deepsvdd", "usad")]
CLI = ["compare", "--datasets", "synthetic", "--entities", "syn-0", "--models", "dummy",
       "--epochs", "1", "--no-plots", "--no-progress", "--device", "cpu"]


def _config() -> RunConfig:
    return RunConfig(TINY, head=dict(HEAD))


def run_everything(out: Path, tag: str) -> None:
    """The grid (``out/grid``, final states in ``out/states_<tag>.pt``) and the CLI (``out/cli``)."""
    captured: dict[str, dict[str, torch.Tensor]] = {}
    real = runner.train_and_evaluate

    def capture(spec: RunSpec, *args: Any, **kwargs: Any) -> runner.RunResult:
        result = real(spec, *args, **kwargs)
        captured[spec.slug()] = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
        return result

    cfg = _config()
    runner.train_and_evaluate = capture
    try:
        store = ResultStore(out / "grid", {"command": "compare", **cfg.to_dict()}, checkpoints=True)
        run_grid(SPECS, cfg, store)
    finally:
        runner.train_and_evaluate = real
    torch.save(captured, out / f"states_{tag}.pt")
    dummy_adapter.register()
    try:
        assert cli_main([*CLI, "--out", str(out / "cli")]) == 0
    finally:
        dummy_adapter.unregister()


def worker(out: Path) -> None:
    torch.set_num_threads(1)
    ctx, _ = distributed.setup("cpu")
    assert ctx.world == 2
    run_everything(out, f"rank{ctx.rank}")  # the CLI tears the process group down


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not built")
    ddp = tmp_path_factory.mktemp("ddp_runner")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), str(ddp)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    single = tmp_path_factory.mktemp("single_runner")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_everything(single, "single")
    finally:
        torch.set_num_threads(threads)
    return ddp, single


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def test_models_identical_on_ranks_and_equal_to_single_process(runs: tuple[Path, Path]) -> None:
    ddp, single = runs
    r0, r1 = torch.load(ddp / "states_rank0.pt"), torch.load(ddp / "states_rank1.pt")
    ref = torch.load(single / "states_single.pt")
    assert set(r0) == set(ref) == {s.slug() for s in SPECS}
    for slug, state in r0.items():
        for key, value in state.items():
            assert torch.equal(value, r1[slug][key]), f"{slug}: {key} differs between ranks"
        assert torch.equal(state["head.centers"], r1[slug]["head.centers"])
        for key, value in state.items():
            if value.is_floating_point():
                torch.testing.assert_close(value, ref[slug][key], rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"{slug}: {key} DDP vs one process: {m}")
        assert float(state["head.threshold_raw"]) > 0.5  # nu rose: the head trained


def test_rows_same_columns_and_only_rank0_wrote(runs: tuple[Path, Path]) -> None:
    ddp, single = runs
    for part, n_rows in (("grid", len(SPECS)), ("cli", 2)):
        header, rows = _rows(ddp / part / "rows.csv")
        ref_header, ref_rows = _rows(single / part / "rows.csv")
        assert header == ref_header == list(COLUMNS)
        assert len(rows) == len(ref_rows) == n_rows  # a second writer would have doubled them
        key = lambda r: tuple(r[c] for c in runner.KEY_COLUMNS)  # noqa: E731
        assert [key(r) for r in rows] == [key(r) for r in ref_rows]
        assert {r["device"] for r in rows} == {"cpu x2"} and {r["device"] for r in ref_rows} == {"cpu"}
        for r, s in zip(rows, ref_rows):
            assert r["best_epoch"] == s["best_epoch"] and r["epochs_run"] == s["epochs_run"]
            for metric in ("auc_roc", "vus_pr", "nu_final", "hidden_std", "best_val_loss"):
                if s[metric]:
                    assert float(r[metric]) == pytest.approx(float(s[metric]), rel=2e-3, abs=2e-4), metric
    grid = sorted(str(p.relative_to(ddp / "grid")) for p in (ddp / "grid").rglob("*") if p.is_file())
    expected = ["config.json", "rows.csv"] + [f"runs/synthetic/syn-0/{s.slug()}.{ext}"
                                              for s in SPECS for ext in ("npz", "pt")]
    assert grid == sorted(expected)  # no per-rank or temporary files
    assert (ddp / "cli" / "table.md").exists() and not (ddp / "cli" / "plots").exists()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.model)
def test_ddp_checkpoint_loads_into_single_process_model_and_scores_identically(
        runs: tuple[Path, Path], spec: RunSpec) -> None:
    ddp, _ = runs
    entity = runner.load_entity(spec.dataset, spec.entity)
    adapter = adapters.get(spec.model)
    torch.manual_seed(1)  # a different initialisation: everything must come from the file
    plain = adapter.build(entity.n_channels, window=TINY.window, **WIDTHS[spec.model])
    example = torch.zeros(2, TINY.window, entity.n_channels)
    model = adapter.wrap(plain, example_input=example, **{**HEAD, **spec.head_overrides()})
    meta = load_checkpoint(model, ddp / "grid" / "runs" / spec.dataset / spec.entity / f"{spec.slug()}.pt")
    assert meta["world_size"] == 2 and meta["spec"]["model"] == spec.model
    win, starts = runner._score_series(adapter, model, entity.test, TINY, TINY.window, "sum", "cpu")
    points = overlap_mean(win, starts, len(entity.test)).astype(np.float32)
    with np.load(ddp / "grid" / "runs" / spec.dataset / spec.entity / f"{spec.slug()}.npz") as z:
        stored = z["scores"]
    assert len(starts) == len(window_starts(len(entity.test), TINY.window, TINY.test_stride))
    assert stored.shape == points.shape == (len(entity.test),)
    np.testing.assert_array_equal(points, stored)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))

"""Acceptance of fit() under torchrun (2 processes, gloo, CPU) on the wrapped DeepSVDD baseline.

One torchrun launch trains the four cases of tests/plugin/ddp_worker.py; the single-process
references (same global batch, same sample order, same seed) are trained in this process.
Checks: every parameter and buffer is bit-identical on both ranks; the DDP model equals the
single-process one within float tolerance; only rank 0 wrote checkpoints, which load into a
single-process wrapped model and score exactly as the DDP model.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from madcluster_plugin.train import load_checkpoint
from tests.plugin import ddp_worker

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def torchrun(script: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 script args`` with one thread per process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp_fit")
    res = torchrun(ROOT / "tests/plugin/ddp_worker.py", str(out), "ddp")
    assert res.returncode == 0, res.stderr[-4000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ddp_worker.main(str(out), "single")
    finally:
        torch.set_num_threads(threads)
    return out


def _load(out: Path, case: str, tag: str) -> dict:
    return torch.load(out / f"{case}_{tag}.pt", weights_only=False)


@pytest.mark.parametrize("case", ddp_worker.CASES)
def test_ranks_identical_and_equal_to_single_process(runs: Path, case: str) -> None:
    r0, r1, single = (_load(runs, case, t) for t in ("rank0", "rank1", "single"))
    assert r0["state"].keys() == single["state"].keys()
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), f"{case}: {key} differs between ranks"
    for key, value in r0["state"].items():
        if value.is_floating_point():
            torch.testing.assert_close(value, single["state"][key], rtol=1e-4, atol=2e-5,
                                       msg=lambda m: f"{case}: {key} DDP vs one process: {m}")
        else:
            assert torch.equal(value, single["state"][key]), key
    # the training really moved the model: the head and the backbone changed over 3 epochs
    start, _ = ddp_worker.build(case, ddp_worker.data())
    init = start.state_dict()
    assert not torch.allclose(r0["state"]["head.centers"], init["head.centers"])
    moved = [k for k, v in r0["state"].items() if k.startswith("backbone.") and v.is_floating_point()
             and not torch.allclose(v, init[k])]
    assert moved, f"{case}: no backbone parameter changed"
    # losses and validation losses are the global ones
    assert r0["loss"] == pytest.approx(single["loss"], rel=1e-4)
    assert r0["val_loss"] == r1["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)
    assert r0["best_epoch"] == single["best_epoch"]


def test_head_specifics(runs: Path) -> None:
    r0 = _load(runs, "deepsvdd", "rank0")
    assert float(r0["state"]["head.threshold_raw"]) > 0.5  # nu rose (it starts at 0.5)
    sb = _load(runs, "soft_boundary", "rank0")
    assert float(sb["state"]["head.radius"][0]) > 0  # computed from both ranks' distances
    k2 = _load(runs, "k2_mapping", "rank0")
    assert float(k2["state"]["head.threshold_raw"]) == 0.5  # nu has no gradient for K = 2


def test_only_rank0_wrote_checkpoints_that_load_and_score_identically(runs: Path) -> None:
    files = sorted(p.name for p in (runs / "ckpt").iterdir())
    assert files == sorted(f"{c}.pt" for c in ddp_worker.CASES)  # no temporary leftovers
    x = ddp_worker.data()
    for case in ddp_worker.CASES:
        r0, r1 = _load(runs, case, "rank0"), _load(runs, case, "rank1")
        # rank 0 rewrote it at every improving epoch, rank 1 never wrote
        assert r1["writes"] == [] and r0["writes"] and set(r0["writes"]) == {f"{case}.pt"}
        ckpt = torch.load(runs / "ckpt" / f"{case}.pt", weights_only=True)
        assert not any(k.startswith("module.") for k in ckpt["state_dict"])
        assert ckpt["world_size"] == 2 and ckpt["epoch"] == r0["best_epoch"]
        # a fresh single-process wrapped model: the DDP checkpoint vs the rank-0 state
        loaded, _ = ddp_worker.build(case, x)
        meta = load_checkpoint(loaded, runs / "ckpt" / f"{case}.pt")
        assert meta["epoch"] == r0["best_epoch"]
        reference, _ = ddp_worker.build(case, x)
        reference.load_state_dict(r0["state"])
        loaded.eval()
        reference.eval()
        with torch.no_grad():
            loaded(x)
            a = loaded.head_score()
            reference(x)
            b = reference.head_score()
        assert a.shape[0] == x.shape[0] and torch.equal(a, b)

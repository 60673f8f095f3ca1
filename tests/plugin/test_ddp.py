"""Acceptance: under torchrun (2 processes, gloo, CPU) head parameters stay identical on all ranks."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("objective", ["one-class", "soft-boundary"])
def test_head_identical_on_both_ranks(tmp_path: Path, objective: str) -> None:
    res = _torchrun([str(ROOT / "tests/plugin/ddp_worker.py"), str(tmp_path), objective])
    assert res.returncode == 0, res.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for key in ("centers", "nu", "radius", "decoder"):
        assert torch.equal(r0[key], r1[key]), key
    assert float(r0["nu"]) > 0.5  # nu moved (3 epochs x 2 steps per rank)
    assert (tmp_path / "model.pt").exists() and not (tmp_path / "model1.pt").exists()

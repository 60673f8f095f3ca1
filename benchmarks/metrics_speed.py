"""Speed of :func:`madcluster_plugin.metrics.vus` against the PyPI ``vus`` 0.0.6 package.

    python -m benchmarks.metrics_speed                       # ours; vus package if importable here
    python -m benchmarks.metrics_speed --vus-python /tmp/vusenv/bin/python

The reference package is heavy (ECOSYSTEM.md §1.1) and is not a dependency of this project, so it
is timed either in this interpreter when it happens to be importable, or in another interpreter
given by ``--vus-python`` (or ``$MADCLUSTER_VUS_PYTHON``; e.g. a throw-away venv), which receives the
same arrays through a temporary ``.npz`` file and also returns its VUS values for a cross-check.
Without either, the speed-up is computed against the 6.45 s quoted in ECOSYSTEM.md §1.3 (measured
on this machine for N = 100k, W = 100) and the output says so.

Data: N points with ~40 anomaly segments per 100k points (lengths 20-300), scores = Gaussian noise
plus a random lift inside segments (a realistic, imperfect detector). Seeded.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from madcluster_plugin.metrics import vus

QUOTED_VUS_SECONDS = 6.45  # ECOSYSTEM.md §1.3: vus==0.0.6 at N=100k, W=100 on this machine

_CHILD = r"""
import json, sys, time, warnings
import numpy as np
warnings.filterwarnings("ignore")
from vus.analysis.robustness_eval import generate_curve
d = np.load(sys.argv[1])
y, s, w, nt = d["labels"], d["scores"], int(d["window"]), int(d["n_thresholds"])
t0, c0 = time.perf_counter(), time.process_time()
out = generate_curve(y, s, w, "opt", nt)
dt, dc = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"seconds": dt, "cpu": dc, "vus_roc": float(out[6]), "vus_pr": float(out[7])}))
"""


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels with ~40 segments per 100k points and noisy scores lifted inside them."""
    rng = np.random.default_rng(seed)
    y = np.zeros(n, dtype=np.int64)
    n_seg = max(1, round(40 * n / 100_000))
    starts = rng.integers(0, max(1, n - 300), size=n_seg)
    lengths = rng.integers(20, 301, size=n_seg)
    for a, ln in zip(starts, lengths):  # setup only, a few dozen segments
        y[a : a + ln] = 1
    y[-1] = 0
    s = rng.normal(size=n) + y * rng.uniform(0.5, 3.0)
    return y, s


def time_ours(y: np.ndarray, s: np.ndarray, window: int, n_thresholds: int, repeats: int):
    """(best wall s, median wall s, best CPU s, (roc, pr)) over ``repeats`` runs."""
    walls, cpus, res = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        res = vus(y, s, window, n_thresholds)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), float(np.median(walls)), min(cpus), res


def time_package(y: np.ndarray, s: np.ndarray, window: int, n_thresholds: int, python: str | None):
    """(wall s, CPU s, (roc, pr), where) of one vus==0.0.6 run, or None when it cannot be run."""
    try:
        import warnings

        from vus.analysis.robustness_eval import generate_curve  # type: ignore[import-not-found]

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0, c0 = time.perf_counter(), time.process_time()
            out = generate_curve(y, s, window, "opt", n_thresholds)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
        return dt, dc, (float(out[6]), float(out[7])), "this interpreter"
    except ImportError:
        pass
    if not python:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.npz"
        np.savez(path, labels=y, scores=s, window=window, n_thresholds=n_thresholds)
        proc = subprocess.run([python, "-c", _CHILD, str(path)], capture_output=True, text=True,
                              cwd=tmp, check=False)
    if proc.returncode != 0:
        print(f"could not run vus with {python}:\n{proc.stderr.strip()[-2000:]}", file=sys.stderr)
        return None
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return r["seconds"], r["cpu"], (r["vus_roc"], r["vus_pr"]), python


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="series length (default 100000)")
    p.add_argument("--window", type=int, default=100, help="VUS max window (default 100)")
    p.add_argument("--thresholds", type=int, default=250, help="number of thresholds (default 250)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of ours (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vus-python", default=os.environ.get("MADCLUSTER_VUS_PYTHON"),
                   help="python interpreter where vus==0.0.6 is importable (optional)")
    a = p.parse_args(argv)

    y, s = make_data(a.n, a.seed)
    n_seg = int(np.sum(np.diff(np.concatenate(([0], y))) == 1))
    print(f"VUS speed: N={a.n}, max_window={a.window}, thresholds={a.thresholds}, "
          f"{n_seg} anomaly segments, {int(y.sum())} anomalous points (seed {a.seed})")
    best, med, cpu, (roc, pr) = time_ours(y, s, a.window, a.thresholds, a.repeats)
    print(f"ours   madcluster_plugin.metrics.vus: {best:.3f} s wall (best of {a.repeats}; median "
          f"{med:.3f} s), {cpu:.3f} s CPU  VUS_ROC={roc:.15f}  VUS_PR={pr:.15f}")
    ref = time_package(y, s, a.window, a.thresholds, a.vus_python)
    if ref is None:
        print(f"vus==0.0.6 not available here (pass --vus-python); using the {QUOTED_VUS_SECONDS} s "
              "quoted in ECOSYSTEM.md §1.3 for N=100k, W=100 (not measured in this run)")
        print(f"speed-up vs quoted figure: {QUOTED_VUS_SECONDS / best:.0f}x wall time")
        return 0
    secs, rcpu, (rroc, rpr), where = ref
    print(f"vus==0.0.6 generate_curve(..., 'opt'): {secs:.3f} s wall, {rcpu:.3f} s CPU (1 run, {where})"
          f"  VUS_ROC={rroc:.15f}  VUS_PR={rpr:.15f}")
    print(f"max |difference| of the values: {max(abs(roc - rroc), abs(pr - rpr)):.2e}")
    print(f"speed-up (measured, same data, same machine): {rcpu / cpu:.0f}x CPU time, "
          f"{secs / best:.0f}x wall time (wall is inflated by other load on a shared machine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The runner end to end on a tiny config: rows, table, plots, determinism, and resuming after an
interruption (in-process and a real SIGKILL) without recomputing or losing rows."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import runner
from benchmarks.__main__ import main
from benchmarks.profiles import Profile
from benchmarks.reports import load_rows, write_plots, write_table
from benchmarks.runner import COLUMNS, ResultStore, RunConfig, RunSpec, run_grid
from benchmarks.windows import window_labels

from . import dummy_adapter

REPO = Path(__file__).resolve().parents[2]
TINY = Profile("tiny", window=20, train_stride=5, test_stride=10, batch=32, lr=1e-2, epochs=2,
               patience=2, max_train_windows=64, max_val_windows=16, max_normalizer_windows=64)


@pytest.fixture(autouse=True)
def _setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dummy_adapter.register()
    dummy_adapter.STEP_SLEEP["value"] = 0.0
    yield
    dummy_adapter.unregister()
    torch.set_num_threads(threads)


def _specs(seeds=(0, 1)) -> list[RunSpec]:
    return [RunSpec("synthetic", "syn-0", "dummy", v, s) for s in seeds for v in ("base", "madcluster")]


def _keys(path: Path) -> list[tuple[str, ...]]:
    with open(path, newline="") as fh:
        return [tuple(r[c] for c in runner.KEY_COLUMNS) for r in csv.DictReader(fh)]


def test_grid_rows_table_plots(tmp_path: Path) -> None:
    cfg = RunConfig(TINY)
    store = ResultStore(tmp_path, {"command": "compare", **cfg.to_dict()})
    assert run_grid(_specs(), cfg, store) == 4
    rows = load_rows(tmp_path / "rows.csv")
    assert len(rows) == 4 and list(rows[0]) == list(COLUMNS)
    for r in rows:
        assert r["f1"] >= r["f1_floor"] - 1e-9  # best F1 can always flag everything
        assert 0.0 <= r["vus_pr"] <= 1.0 and 0.0 <= r["auc_roc"] <= 1.0 and 0 <= r["f1_val"] <= 1
        assert r["hidden_std"] > 1e-4 and r["train_seconds"] > 0 and 1 <= r["best_epoch"] <= 2
        if r["variant"] == "base":
            assert math.isnan(r["nu_final"]) and r["combine"] == "base" and r["n_clusters"] == ""
        else:
            assert 0.0 < r["nu_final"] < 1.0 and r["combine"] == "sum" and r["n_clusters"] == "1"
    base = [r for r in rows if r["variant"] == "base"]
    wrapped = [r for r in rows if r["variant"] == "madcluster"]
    assert base[0]["n_params"] + 8 + 1 == wrapped[0]["n_params"]  # K*D + 1 with D = 8
    # the dummy autoencoder separates the synthetic anomalies better than chance
    assert np.mean([r["auc_roc"] for r in base]) > 0.6
    # artefacts: per-point scores over the whole test series and the nu trajectory
    with np.load(store.artefact_path(_specs()[1])) as z:
        assert z["scores"].shape == (3000,) and z["labels"].sum() > 0 and z["nu"].shape == (3,)
    # same seed, same numbers
    again = runner.train_and_evaluate(_specs()[1], runner.load_entity("synthetic", "syn-0"), cfg)
    assert again.row["f1"] == pytest.approx(wrapped[0]["f1"], abs=1e-6)
    assert again.row["vus_pr"] == pytest.approx(wrapped[0]["vus_pr"], abs=1e-6)

    table = write_table(tmp_path, "compare").read_text()
    assert "| dummy | base | 2 |" in table and "| dummy | madcluster | 2 |" in table
    assert "VUS-PR higher for" in table and "1 entities x 2 seed(s)" in table
    plots = write_plots(tmp_path, "compare")
    assert {p.name for p in plots} == {"scores_synthetic_syn-0.png", "nu_synthetic.png"}
    assert all(p.stat().st_size > 5000 for p in plots)


def test_resume_skips_finished_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = RunConfig(TINY)
    config = {"command": "compare", **cfg.to_dict()}
    specs = _specs(seeds=(0, 1, 2))

    class Killed(Exception):
        pass

    def stop_after_two(store: ResultStore) -> None:
        if len(store.rows) == 2:
            raise Killed

    with pytest.raises(Killed):
        run_grid(specs, cfg, ResultStore(tmp_path, config), after_row=stop_after_two)
    first = _keys(tmp_path / "rows.csv")
    assert len(first) == 2
    # a writer killed mid-line leaves a torn line: it is cut off and that run redone
    with open(tmp_path / "rows.csv", "ab") as fh:
        fh.write(b"synthetic,syn-0,dummy,base,1,,0.51")
    calls: list[RunSpec] = []
    real = runner.train_and_evaluate
    monkeypatch.setattr(runner, "train_and_evaluate",
                        lambda spec, *a, **k: calls.append(spec) or real(spec, *a, **k))
    store = ResultStore(tmp_path, config)
    assert len(store.rows) == 2
    assert run_grid(specs, cfg, store) == 4
    assert [c.key() for c in calls] == [s.key() for s in specs[2:]]
    keys = _keys(tmp_path / "rows.csv")
    assert keys[:2] == first and sorted(keys) == sorted(s.key() for s in specs)
    assert run_grid(specs, cfg, ResultStore(tmp_path, config)) == 0  # nothing left to do
    with pytest.raises(ValueError, match="different configuration"):
        ResultStore(tmp_path, {**config, "protocol": "paper"})


def test_sigkill_midway_then_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    argv = ["compare", "--models", "dummy", "--entities", "syn-0", "--seeds", "0", "1", "2",
            "--epochs", "2", "--out", str(out), "--no-plots", "--no-progress"]
    script = ("import sys; from tests.benchmarks import dummy_adapter as d; d.register(); "
              "d.STEP_SLEEP['value'] = 0.15; from benchmarks.__main__ import main; "
              f"sys.exit(main({argv!r}))")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
    rows_path = out / "rows.csv"
    deadline = time.time() + 90
    try:
        while time.time() < deadline and proc.poll() is None:
            if rows_path.exists() and len(_keys(rows_path)) >= 1:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = _keys(rows_path)
    assert 1 <= len(done_before) < 6, "the run finished or wrote nothing before the kill"
    calls: list[RunSpec] = []
    real = runner.train_and_evaluate
    monkeypatch.setattr(runner, "train_and_evaluate",
                        lambda spec, *a, **k: calls.append(spec) or real(spec, *a, **k))
    assert main(argv) == 0
    keys = _keys(rows_path)
    assert len(calls) == 6 - len(done_before)
    assert not {c.key() for c in calls} & set(done_before)
    assert len(keys) == len(set(keys)) == 6 and keys[:len(done_before)] == done_before
    table = (out / "table.md").read_text()
    assert "| dummy | base | 3 |" in table and "| dummy | madcluster | 3 |" in table


def test_cli_clusters_and_ablation(tmp_path: Path) -> None:
    common = ["--models", "dummy", "--entities", "syn-1", "--epochs", "1", "--no-progress"]
    assert main(["clusters", "--ks", "1", "3", "--out", str(tmp_path / "k"), *common]) == 0
    rows = load_rows(tmp_path / "k" / "rows.csv")
    assert sorted(r["n_clusters"] for r in rows) == ["1", "3"]
    k3 = next(r for r in rows if r["n_clusters"] == "3")
    assert math.isnan(k3["nu_final"])  # appendix B: nu is not used for K > 1
    table = (tmp_path / "k" / "table.md").read_text()
    assert "| 1 | 1 |" in table and "| 3 | 1 |" in table
    assert (tmp_path / "k" / "plots" / "k_sweep_synthetic_dummy.png").exists()
    config = json.loads((tmp_path / "k" / "config.json").read_text())
    assert config["command"] == "clusters" and config["profile"]["epochs"] == 1

    assert main(["ablation", "--out", str(tmp_path / "a"), "--no-plots", *common]) == 0
    rows = load_rows(tmp_path / "a" / "rows.csv")
    assert [r["variant"] for r in rows] == ["mapping", "cluster", "both"]
    assert len({r["f1"] for r in rows}) > 1  # the head options really differ
    with pytest.raises(SystemExit, match="unknown variants"):
        main(["compare", "--variants", "mapping", "--out", str(tmp_path / "x"), *common])
    with pytest.raises(SystemExit, match="unknown model"):
        main(["compare", "--models", "nope", "--out", str(tmp_path / "x")])


def test_real_adapter_deepsvdd(tmp_path: Path) -> None:
    """One real backbone through the whole path, both variants, one epoch."""
    cfg = RunConfig(TINY.with_overrides(epochs=1))
    store = ResultStore(tmp_path, {"command": "compare", **cfg.to_dict()})
    specs = [RunSpec("synthetic", "syn-2", "deepsvdd", v, 0) for v in ("base", "madcluster")]
    run_grid(specs, cfg, store)
    rows = load_rows(tmp_path / "rows.csv")
    assert len(rows) == 2 and all(np.isfinite(r["vus_pr"]) and r["hidden_std"] > 0 for r in rows)


def test_paper_protocol_rows(tmp_path: Path) -> None:
    cfg = RunConfig(TINY.with_overrides(epochs=1), protocol="paper")
    store = ResultStore(tmp_path, {"command": "compare", **cfg.to_dict()})
    run_grid([RunSpec("synthetic", "syn-0", "dummy", "base", 0)], cfg, store)
    (row,) = load_rows(tmp_path / "rows.csv")
    entity = runner.load_entity("synthetic", "syn-0")
    starts = runner.window_starts(len(entity.test), TINY.window, TINY.test_stride)
    wl = window_labels(entity.test_labels, starts, TINY.window)
    assert row["protocol"] == "paper"
    assert row["f1_floor"] == pytest.approx(2 * wl.sum() / (len(wl) + wl.sum()), abs=1e-6)


def test_overhead_subcommand_is_dispatched(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    import benchmarks

    seen: list[list[str]] = []
    fake = types.ModuleType("benchmarks.overhead")
    fake.main = lambda argv: seen.append(list(argv)) or 7
    monkeypatch.setitem(sys.modules, "benchmarks.overhead", fake)
    monkeypatch.setattr(benchmarks, "overhead", fake, raising=False)
    assert main(["overhead", "--models", "deepsvdd"]) == 7
    assert seen == [["--models", "deepsvdd"]]


def test_profile_wrap_options_reach_the_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both built-in profiles attach DCdetector's head at ``x_ori``, and the runner passes a
    profile's per-model wrap options to ``adapter.wrap``."""
    from adapters.dcdetector import DCdetectorAdapter
    from benchmarks.profiles import PROFILES

    assert all(p.wrap_options_for("dcdetector") == {"attach": "x_ori"} for p in PROFILES.values())
    assert all(p.wrap_options_for("deepsvdd") == {} for p in PROFILES.values())
    hidden: list[str] = []
    original = DCdetectorAdapter.wrap

    def recording_wrap(self, model, **kwargs):
        wrapped = original(self, model, **kwargs)
        hidden.append(wrapped.hidden_spec)
        return wrapped

    monkeypatch.setattr(DCdetectorAdapter, "wrap", recording_wrap)
    profile = TINY.with_overrides(
        epochs=1, widths={"dcdetector": {"d_model": 16, "e_layers": 1, "patch_sizes": (5, 10)}},
        wrap_options=PROFILES["quick"].wrap_options)
    cfg = RunConfig(profile)
    store = ResultStore(tmp_path, {"command": "compare", **cfg.to_dict()})
    run_grid([RunSpec("synthetic", "syn-0", "dcdetector", "madcluster", 0)], cfg, store)
    assert hidden == ["window_embedding"]


def test_keep_going_records_a_failed_run_and_a_resume_retries_it(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --keep-going a failing run stops the grid; with it the failure is recorded in
    failures.jsonl, named in table.md and on stderr (exit 1), the other runs finish, and a
    resumed grid tries the failed run again (then the failure no longer counts)."""
    out = tmp_path / "run"
    argv = ["compare", "--models", "dummy", "--entities", "syn-0", "--seeds", "0", "1",
            "--epochs", "1", "--out", str(out), "--no-plots", "--no-progress"]
    real = runner.train_and_evaluate

    def diverge_on_seed1_madcluster(spec, *a, **k):
        if spec.seed == 1 and spec.variant == "madcluster":
            raise ValueError("hidden state holds 3 NaN/Inf value(s)")
        return real(spec, *a, **k)

    monkeypatch.setattr(runner, "train_and_evaluate", diverge_on_seed1_madcluster)
    with pytest.raises(ValueError, match="NaN/Inf"):
        main(argv)
    assert len(_keys(out / "rows.csv")) == 3  # seed 0 both variants, seed 1 base: kept
    assert not (out / "failures.jsonl").exists()
    assert main([*argv, "--keep-going"]) == 1
    (record,) = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert (record["seed"], record["variant"], record["error"]) == (1, "madcluster", "ValueError")
    assert "1 run(s) failed and are missing from this table" in (out / "table.md").read_text()
    assert len(runner.unresolved_failures(out)) == 1
    monkeypatch.setattr(runner, "train_and_evaluate", real)
    assert main(argv) == 0  # the resumed grid retries and completes it
    assert len(_keys(out / "rows.csv")) == 4
    assert runner.unresolved_failures(out) == []
    assert "failed" not in (out / "table.md").read_text()


def test_wrap_option_flag_parses_and_merges_over_the_profile() -> None:
    from benchmarks.__main__ import parse_wrap_options
    from benchmarks.profiles import PROFILES

    merged = parse_wrap_options(["thoc:hidden=drnn.layers.0", "DCdetector:attach=query", "usad:n_clusters=2"],
                                PROFILES["quick"].wrap_options)
    assert merged == {"thoc": {"hidden": "drnn.layers.0"}, "dcdetector": {"attach": "query"},
                      "usad": {"n_clusters": 2}}
    assert PROFILES["quick"].wrap_options == {"dcdetector": {"attach": "x_ori"}}  # not mutated
    for bad, match in (("thoc", "MODEL:KEY=VALUE"), ("thoc:hidden", "MODEL:KEY=VALUE"),
                       ("nomodel:hidden=x", "unknown model")):
        with pytest.raises(ValueError, match=match):
            parse_wrap_options([bad])
    with pytest.raises(SystemExit, match="MODEL:KEY=VALUE"):
        main(["compare", "--models", "dummy", "--wrap", "thoc=1", "--no-plots", "--no-progress"])

"""The comparison table's paired MADCluster-minus-base summary, on hand-built rows."""
from __future__ import annotations

import math

from benchmarks.reports import compare_table
from benchmarks.runner import METRIC_COLUMNS


def _row(model: str, variant: str, entity: str, seed: int, vus_pr: float) -> dict:
    row = {m: 0.5 for m in METRIC_COLUMNS}
    row.update(dataset="MSL", entity=entity, model=model, variant=variant, seed=str(seed),
               vus_pr=vus_pr, hidden_std=1.0, nu_final=0.5 if variant == "madcluster" else math.nan,
               train_seconds=1.0)
    return row


def test_delta_table_has_per_seed_means_and_pair_counts() -> None:
    base = {("a", 0): 0.30, ("b", 0): 0.20, ("a", 1): 0.40, ("b", 1): 0.10}
    mad = {("a", 0): 0.35, ("b", 0): 0.19, ("a", 1): 0.40, ("b", 1): 0.16}
    rows = [_row("deepsvdd", "base", e, s, v) for (e, s), v in base.items()]
    rows += [_row("deepsvdd", "madcluster", e, s, v) for (e, s), v in mad.items()]
    rows += [_row("thoc", "base", "a", 0, 0.3), _row("thoc", "madcluster", "a", 0, 0.2)]
    table = compare_table(rows)
    assert "VUS-PR higher for 1 of 2 backbones" in table
    line = next(l for l in table.splitlines() if l.startswith("| deepsvdd | 4 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # seed 0: (+0.05 - 0.01) / 2 = +0.020; seed 1: (0 + 0.06) / 2 = +0.030; overall +0.025
    assert cells[5] == "+0.025"
    assert cells[8] == "+0.020 / +0.030"
    assert cells[9] == "2/4"  # a tie is not "higher"
    assert cells[-1] == "yes"
    thoc = [c.strip() for c in next(l for l in table.splitlines() if l.startswith("| thoc | 1 |")).strip("|").split("|")]
    assert thoc[5] == "-0.100" and thoc[9] == "0/1" and thoc[-1] == "no"


def test_two_processes_writing_table_md_do_not_collide(tmp_path, monkeypatch) -> None:
    """Processes sharing --out rewrite table.md after each row. Interleave two of them: B writes
    and renames its table while A is between writing its temporary file and renaming it (the
    race that stopped half of a two-process MSL grid when both used one temporary name)."""
    import os

    from benchmarks import reports
    from benchmarks.runner import COLUMNS

    rows = [_row("deepsvdd", v, "a", 0, 0.3) for v in ("base", "madcluster")]
    with open(tmp_path / "rows.csv", "w") as fh:
        fh.write(",".join(COLUMNS) + "\n")
        for r in rows:
            fh.write(",".join(str(r.get(c, "")) for c in COLUMNS) + "\n")
    real_replace = os.replace
    state = {"nested": False}

    def interleaved_replace(src, dst):
        if not state["nested"]:
            state["nested"] = True
            reports.write_table(tmp_path, "compare")  # "process B", in the middle of A's write
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interleaved_replace)
    assert reports.write_table(tmp_path, "compare") == tmp_path / "table.md"
    assert state["nested"]
    assert "deepsvdd" in (tmp_path / "table.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv", "table.md"]  # no temporaries left

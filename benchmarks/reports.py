"""Reports from ``rows.csv``: the aggregated Markdown table and the PNG plots.

Aggregation: each cell is the mean over all (entity, seed) rows of a group, i.e. the
macro-average over entities that the released code reports (METHOD.md section 3.4), averaged
over seeds. The spread after ``±`` is the standard deviation over seeds of the per-seed
entity averages when there are two or more seeds, otherwise the standard deviation over
entities (the table header says which). Paper numbers (appendix Tables 1-3) sit in the
adjacent ``paper`` columns; they come from the released window-level protocol with oracle
thresholds, so they are comparable like-for-like only with ``--protocol paper``.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from madcluster_plugin.files import atomic_write_text

from .paper_numbers import ablation_reference, clusters_reference, compare_reference

log = logging.getLogger(__name__)

NUMERIC = ("seed", "f1", "precision", "recall", "threshold", "f1_val", "precision_val", "recall_val",
           "threshold_val", "pa_f1", "aff_p", "aff_r", "vus_roc", "vus_pr", "r_auc_roc", "r_auc_pr",
           "auc_roc", "auc_pr", "f1_floor", "nu_final", "hidden_std", "best_epoch", "epochs_run",
           "best_val_loss", "n_params", "train_seconds", "score_seconds", "eval_seconds")

LABELS = {"f1": "F1", "f1_val": "F1@val", "pa_f1": "PA-F1", "aff_p": "Aff-P", "aff_r": "Aff-R",
          "vus_roc": "VUS-ROC", "vus_pr": "VUS-PR", "r_auc_roc": "R-AUC-ROC",
          "r_auc_pr": "R-AUC-PR", "auc_roc": "AUC-ROC", "auc_pr": "AUC-PR",
          "f1_floor": "F1 floor", "nu_final": "nu", "hidden_std": "hidden std",
          "train_seconds": "train s", "precision": "P", "recall": "R"}

COMPARE_METRICS = ("f1", "f1_val", "pa_f1", "aff_p", "aff_r", "vus_roc", "vus_pr", "r_auc_roc",
                   "r_auc_pr", "auc_roc", "auc_pr", "f1_floor", "nu_final", "hidden_std",
                   "train_seconds")
SWEEP_METRICS = ("f1", "f1_val", "aff_p", "aff_r", "vus_roc", "vus_pr", "r_auc_pr", "f1_floor",
                 "nu_final", "hidden_std", "train_seconds")
_PAPER_COMPARE = ("f1", "vus_roc", "vus_pr")
_PAPER_SWEEP = ("f1", "aff_p", "aff_r")
_MODEL_ORDER = ("deepsvdd", "usad", "beatgan", "omnianomaly", "thoc", "anomaly_transformer",
                "dcdetector")
_VARIANT_ORDER = ("base", "madcluster", "mapping", "cluster", "both")


# ---------------------------------------------------------------------------------------------
# rows and aggregation
# ---------------------------------------------------------------------------------------------
def load_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """``rows.csv`` with numeric columns as floats (empty cells -> NaN)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for c in NUMERIC:
            if c in r:
                r[c] = float(r[c]) if r[c] not in ("", None) else float("nan")
    return rows


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(name))]


def _order(value: str, order: Sequence[str]) -> tuple:
    return (order.index(value), "") if value in order else (len(order), value)


def aggregate(rows: Sequence[dict[str, Any]], metric: str) -> tuple[float, float, str]:
    """(mean over rows, spread, spread kind): see the module docstring."""
    vals = np.array([r[metric] for r in rows], dtype=np.float64)
    ok = np.isfinite(vals)
    if not ok.any():
        return float("nan"), float("nan"), ""
    mean = float(vals[ok].mean())
    per_seed: dict[float, list[float]] = defaultdict(list)
    for r, v, good in zip(rows, vals, ok):
        if good:
            per_seed[r["seed"]].append(v)
    if len(per_seed) >= 2:
        return mean, float(np.std([np.mean(v) for v in per_seed.values()], ddof=1)), "seeds"
    if ok.sum() >= 2:
        return mean, float(vals[ok].std(ddof=1)), "entities"
    return mean, float("nan"), ""


def _cell(mean: float, spread: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "-"
    if math.isnan(spread):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def _paper_cell(value: float | None) -> str:
    return "-" if value is None else f"*{value:.2f}*"


def _group(rows: Iterable[dict[str, Any]], keys: Sequence[str]) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def _spread_note(rows: Sequence[dict[str, Any]]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    entities = sorted({r["entity"] for r in rows}, key=_natural)
    kind = "over seeds" if len(seeds) >= 2 else "over entities (one seed)"
    return (f"{len(entities)} entities x {len(seeds)} seed(s) ({', '.join(str(int(s)) for s in seeds)}); "
            f"cells: mean ± std {kind}")


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------
def _metric_columns(metrics: Sequence[str], paper: Sequence[str]) -> list[tuple[str, str]]:
    cols: list[tuple[str, str]] = []
    for m in metrics:
        cols.append(("ours", m))
        if m in paper:
            cols.append(("paper", m))
    return cols


def _header(cols: Sequence[tuple[str, str]]) -> list[str]:
    return [LABELS.get(m, m) + (" (paper)" if kind == "paper" else "") for kind, m in cols]


def _cells(group_rows: Sequence[dict[str, Any]], cols: Sequence[tuple[str, str]],
           paper: dict[str, float]) -> list[str]:
    out = []
    for kind, m in cols:
        if kind == "paper":
            out.append(_paper_cell(paper.get(m)))
        else:
            digits = 1 if m == "train_seconds" else 3
            out.append(_cell(*aggregate(group_rows, m)[:2], digits=digits))
    return out


def compare_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison table: per dataset, every (model, variant) with the paper's Table 2 beside
    it, then the MADCluster-minus-base deltas per model."""
    lines: list[str] = []
    cols = _metric_columns(COMPARE_METRICS, _PAPER_COMPARE)
    for dataset, drows in sorted(_group(rows, ["dataset"]).items()):
        ds = dataset[0]
        lines += [f"## {ds}", "", _spread_note(drows) + ".", ""]
        body = []
        groups = _group(drows, ["model", "variant"])
        for (model, variant) in sorted(groups, key=lambda k: (_order(k[0], _MODEL_ORDER),
                                                              _order(k[1], _VARIANT_ORDER))):
            g = groups[(model, variant)]
            body.append([model, variant, str(len(g)),
                         *_cells(g, cols, compare_reference(ds, model, variant))])
        lines += _md_table(["model", "variant", "runs", *_header(cols)], body)
        lines += ["", *_delta_lines(drows, ds), ""]
    return "\n".join(lines)


def _delta_lines(rows: Sequence[dict[str, Any]], dataset: str) -> list[str]:
    """MADCluster minus base per model, on rows present for both variants (same entity, seed)."""
    by_key = {(r["model"], r["variant"], r["entity"], r["seed"]): r for r in rows}
    models = sorted({r["model"] for r in rows}, key=lambda m: _order(m, _MODEL_ORDER))
    body, helped, total = [], 0, 0
    for model in models:
        pairs = [(by_key[(model, "base", e, s)], r) for (m, v, e, s), r in by_key.items()
                 if m == model and v == "madcluster" and (model, "base", e, s) in by_key]
        if not pairs:
            continue
        deltas = {m: float(np.nanmean([b2[m] - b1[m] for b1, b2 in pairs]))
                  for m in ("f1", "f1_val", "vus_roc", "vus_pr", "r_auc_pr", "hidden_std")}
        ref_b, ref_m = compare_reference(dataset, model, "base"), compare_reference(dataset, model, "madcluster")
        paper_d = (f"{ref_m['vus_pr'] - ref_b['vus_pr']:+.2f}" if "vus_pr" in ref_b and "vus_pr" in ref_m
                   else "-")
        by_seed = _group([{"seed": b1["seed"], "d": b2["vus_pr"] - b1["vus_pr"]} for b1, b2 in pairs], ["seed"])
        per_seed = " / ".join(f"{np.nanmean([x['d'] for x in by_seed[k]]):+.3f}"
                              for k in sorted(by_seed, key=lambda k: _natural(str(k[0]))))
        higher = sum(b2["vus_pr"] > b1["vus_pr"] for b1, b2 in pairs)
        up = deltas["vus_pr"] > 0
        helped += int(up)
        total += 1
        body.append([model, str(len(pairs)), *(f"{deltas[m]:+.3f}" for m in deltas), per_seed,
                     f"{higher}/{len(pairs)}", paper_d, "yes" if up else "no"])
    if not body:
        return []
    return [f"MADCluster minus base ({dataset}, paired by entity and seed): VUS-PR higher for "
            f"{helped} of {total} backbones.", "",
            *_md_table(["model", "pairs", "Δ F1", "Δ F1@val", "Δ VUS-ROC", "Δ VUS-PR", "Δ R-AUC-PR",
                        "Δ hidden std", "Δ VUS-PR per seed", "pairs with higher VUS-PR",
                        "Δ VUS-PR (paper)", "VUS-PR up"], body)]


def sweep_table(rows: Sequence[dict[str, Any]], by: str) -> str:
    """``by="n_clusters"`` (clusters: appendix Table 1 beside it) or ``"variant"`` (ablation:
    appendix Table 3 beside it, for DeepSVDD, the backbone the appendix used)."""
    lines: list[str] = []
    cols = _metric_columns(SWEEP_METRICS, _PAPER_SWEEP)
    for (ds, model), grows in sorted(_group(rows, ["dataset", "model"]).items(),
                                     key=lambda kv: (kv[0][0], _order(kv[0][1], _MODEL_ORDER))):
        lines += [f"## {ds} / {model}", "", _spread_note(grows) + ".", ""]
        body = []
        groups = _group(grows, [by])
        keys = sorted(groups, key=lambda k: (_order(k[0], _VARIANT_ORDER) if by == "variant"
                                             else (0, int(float(k[0])) if k[0] != "" else 0)))
        for (value,) in keys:
            if by == "n_clusters":
                ref = clusters_reference(ds, int(float(value))) if value != "" else {}
                label = str(value) if value != "" else "base"
            else:
                ref = ablation_reference(ds, value) if model == "deepsvdd" else {}
                label = value
            body.append([label, str(len(groups[(value,)])), *_cells(groups[(value,)], cols, ref)])
        lines += _md_table([("k" if by == "n_clusters" else "variant"), "runs", *_header(cols)], body)
        lines.append("")
    return "\n".join(lines)


_TITLES = {
    "compare": "Comparison: each backbone with and without MADCluster",
    "clusters": "Number of clusters k (appendix Table 1)",
    "ablation": "Ablation: distance mapping only / clustering only / both (appendix Table 3)",
}


def render_table(command: str, rows: Sequence[dict[str, Any]], config: dict[str, Any] | None = None,
                 command_line: str | None = None) -> str:
    """The whole ``table.md`` for ``command`` from ``rows``."""
    protocol = rows[0]["protocol"] if rows else (config or {}).get("protocol", "?")
    profile = rows[0]["profile"] if rows else "?"
    head = [f"# {_TITLES.get(command, command)}", ""]
    if command_line:
        head += ["```", command_line, "```", ""]
    head += [f"Profile `{profile}`, protocol `{protocol}`, {len(rows)} runs. F1 is the best F1 over "
             "thresholds (oracle, as the paper); F1@val uses a threshold from validation scores "
             "only (a percentile of scores on the train tail). F1 floor: F1 of flagging "
             "everything. nu: the learned threshold at the end (MADCluster, K = 1). hidden std: "
             "mean per-dimension std of the hidden states at the attachment point on test data "
             "(near 0 = collapse). *Italic* numbers are the paper's (appendix, MSL, window-level "
             "protocol with oracle thresholds and VUS on binarised predictions).", ""]
    if command == "compare":
        body = compare_table(rows)
    elif command == "clusters":
        body = sweep_table(rows, "n_clusters")
        body += ("\nThe appendix does not name the backbone of Table 1; its k = 1 row equals "
                 "DeepSVDD + MADCluster of Table 2.\n")
    elif command == "ablation":
        body = sweep_table(rows, "variant")
        body += ("\nAppendix Table 3 used DeepSVDD; its rows are DeepSVDD = distance mapping only "
                 "(`mapping`), Clustering = `cluster`, MADCluster = `both`.\n")
    else:
        raise ValueError(f"unknown command {command!r}")
    return "\n".join(head) + "\n" + body


def write_table(out: str | os.PathLike, command: str, config: dict[str, Any] | None = None,
                command_line: str | None = None) -> Path | None:
    """(Re)write ``table.md`` from ``rows.csv``; atomic (temp file + rename)."""
    out = Path(out)
    if not (out / "rows.csv").exists():
        return None
    from .runner import unresolved_failures

    text = render_table(command, load_rows(out / "rows.csv"), config, command_line)
    failed = unresolved_failures(out)
    if failed:
        listed = "; ".join(f"{f['dataset']}/{f['entity']} {f['model']} {f['variant']} seed {f['seed']} "
                           f"({f['error']})" for f in failed)
        text += (f"\n**{len(failed)} run(s) failed and are missing from this table** "
                 f"(failures.jsonl): {listed}. Means and paired deltas use the runs present.\n")
    return atomic_write_text(out / "table.md", text)  # several processes may share --out


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def _pyplot() -> Any:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - matplotlib is a declared extra
        raise ImportError("plots need matplotlib: pip install 'madcluster-plugin[bench]' "
                          "(or pass --no-plots)") from exc
    return plt


def _save_figure(plt: Any, fig: Any, path: Path) -> Path:
    """Lay out, write (PNG, 90 dpi) and close ``fig``; returns ``path``."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _slug(row: dict[str, Any]) -> str:
    k = f"_k{int(float(row['n_clusters']))}" if row.get("n_clusters", "") not in ("", None) else ""
    return f"{row['model']}_{row['variant']}{k}_seed{int(row['seed'])}"


def _artefact(out: Path, row: dict[str, Any]) -> Path:
    return out / "runs" / row["dataset"] / row["entity"] / f"{_slug(row)}.npz"


def _shade(ax: Any, labels: np.ndarray) -> None:
    edges = np.diff(np.concatenate([[0], labels.astype(np.int8), [0]]))
    for s, e in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
        ax.axvspan(s, e, color="tab:red", alpha=0.15, lw=0)


def plot_scores(out: Path, rows: Sequence[dict[str, Any]], max_entities: int = 2) -> list[Path]:
    """Per dataset, the first ``max_entities`` entities (first seed): one panel per model with
    every variant's per-point score (min-max scaled for display) and the labelled anomalies."""
    plt = _pyplot()
    paths = []
    for (ds,), drows in sorted(_group(rows, ["dataset"]).items()):
        seed = min(r["seed"] for r in drows)
        entities = sorted({r["entity"] for r in drows}, key=_natural)[:max_entities]
        for ent in entities:
            erows = [r for r in drows if r["entity"] == ent and r["seed"] == seed]
            models = sorted({r["model"] for r in erows}, key=lambda m: _order(m, _MODEL_ORDER))
            fig, axes = plt.subplots(len(models), 1, figsize=(12, 1.8 * len(models) + 0.6),
                                     sharex=True, squeeze=False)
            for ax, model in zip(axes[:, 0], models):
                labels = None
                for r in sorted((r for r in erows if r["model"] == model),
                                key=lambda r: (_order(r["variant"], _VARIANT_ORDER), str(r["n_clusters"]))):
                    path = _artefact(out, r)
                    if not path.exists():
                        continue
                    with np.load(path) as z:
                        s, labels = z["scores"].astype(np.float64), z["labels"]
                    span = s.max() - s.min()
                    name = r["variant"] + (f" k={int(float(r['n_clusters']))}"
                                           if r["n_clusters"] not in ("", None) and r["variant"] != "madcluster"
                                           else "")
                    ax.plot((s - s.min()) / (span if span > 0 else 1.0), lw=0.7,
                            label=f"{name} (VUS-PR {r['vus_pr']:.2f})")
                if labels is not None:
                    _shade(ax, labels)
                ax.set_ylabel(model, fontsize=8)
                ax.legend(loc="upper right", fontsize=7)
            axes[-1, 0].set_xlabel("test time index")
            fig.suptitle(f"{ds} / {ent} (seed {int(seed)}): per-point scores, labelled anomalies shaded")
            paths.append(_save_figure(plt, fig, out / "plots" / f"scores_{ds}_{ent}.png"))
    return paths


def plot_nu(out: Path, rows: Sequence[dict[str, Any]]) -> list[Path]:
    """Per dataset, the nu trajectory (per epoch, index 0 = initial value) of every wrapped
    K = 1 run: thin lines per run, thick the mean, one colour per model."""
    plt = _pyplot()
    paths = []
    wrapped = [r for r in rows if r["variant"] != "base" and math.isfinite(r["nu_final"])]
    for (ds,), drows in sorted(_group(wrapped, ["dataset"]).items()):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        cmap = plt.get_cmap("tab10")
        groups = _group(drows, ["model", "variant"])
        for i, key in enumerate(sorted(groups, key=lambda k: (_order(k[0], _MODEL_ORDER),
                                                              _order(k[1], _VARIANT_ORDER)))):
            trajs = []
            for r in groups[key]:
                path = _artefact(out, r)
                if path.exists():
                    with np.load(path) as z:
                        trajs.append(z["nu"])
            if not trajs:
                continue
            n = max(len(t) for t in trajs)
            mat = np.full((len(trajs), n), np.nan)
            for j, t in enumerate(trajs):
                mat[j, :len(t)] = t
                ax.plot(t, color=cmap(i % 10), lw=0.5, alpha=0.3)
            label = key[0] if key[1] == "madcluster" else f"{key[0]} ({key[1]})"
            ax.plot(np.nanmean(mat, axis=0), color=cmap(i % 10), lw=2, label=label)
        ax.set_xlabel("epoch (0 = initialisation)")
        ax.set_ylabel("nu")
        ax.set_title(f"{ds}: learned threshold nu")
        ax.legend(fontsize=8)
        paths.append(_save_figure(plt, fig, out / "plots" / f"nu_{ds}.png"))
    return paths


def plot_k_sweep(out: Path, rows: Sequence[dict[str, Any]]) -> list[Path]:
    """Per dataset and model: metrics against k (mean ± spread) with appendix Table 1 dashed."""
    plt = _pyplot()
    paths = []
    wrapped = [r for r in rows if r["n_clusters"] not in ("", None)]
    for (ds, model), grows in sorted(_group(wrapped, ["dataset", "model"]).items()):
        by_k: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for r in grows:
            by_k[int(float(r["n_clusters"]))].append(r)
        ks = sorted(by_k)
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for i, m in enumerate(("f1", "vus_pr", "aff_p", "aff_r")):
            stats = [aggregate(by_k[k], m) for k in ks]
            mean = np.array([s[0] for s in stats])
            spread = np.nan_to_num(np.array([s[1] for s in stats]))
            color = f"C{i}"
            ax.plot(ks, mean, marker="o", color=color, label=LABELS[m])
            ax.fill_between(ks, mean - spread, mean + spread, color=color, alpha=0.15)
            ref = [clusters_reference(ds, k).get(m, np.nan) for k in ks]
            if np.isfinite(ref).any():
                ax.plot(ks, ref, ls="--", color=color, alpha=0.7, label=f"{LABELS[m]} (paper)")
        ax.set_xlabel("number of clusters k")
        ax.set_xticks(ks)
        ax.set_title(f"{ds} / {model}: k sweep")
        ax.legend(fontsize=7, ncol=2)
        paths.append(_save_figure(plt, fig, out / "plots" / f"k_sweep_{ds}_{model}.png"))
    return paths


def plot_ablation(out: Path, rows: Sequence[dict[str, Any]]) -> list[Path]:
    """Per dataset and model: grouped bars of F1, Aff-P, Aff-R, VUS-PR per ablation variant."""
    plt = _pyplot()
    paths = []
    metrics = ("f1", "aff_p", "aff_r", "vus_pr")
    for (ds, model), grows in sorted(_group(rows, ["dataset", "model"]).items()):
        groups = _group(grows, ["variant"])
        variants = sorted((k[0] for k in groups), key=lambda v: _order(v, _VARIANT_ORDER))
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(len(variants), 1)
        x = np.arange(len(metrics))
        for i, v in enumerate(variants):
            stats = [aggregate(groups[(v,)], m) for m in metrics]
            ax.bar(x + i * width, [s[0] for s in stats], width,
                   yerr=np.nan_to_num([s[1] for s in stats]), label=v, capsize=2)
        ax.set_xticks(x + width * (len(variants) - 1) / 2, [LABELS[m] for m in metrics])
        ax.set_ylim(0, 1)
        ax.set_title(f"{ds} / {model}: ablation")
        ax.legend(fontsize=8)
        paths.append(_save_figure(plt, fig, out / "plots" / f"ablation_{ds}_{model}.png"))
    return paths


def write_plots(out: str | os.PathLike, command: str) -> list[Path]:
    """All plots of ``command`` from ``rows.csv`` and the run artefacts."""
    out = Path(out)
    if not (out / "rows.csv").exists():
        return []
    rows = load_rows(out / "rows.csv")
    makers: dict[str, list[Callable[[Path, Sequence[dict[str, Any]]], list[Path]]]] = {
        "compare": [plot_scores, plot_nu],
        "clusters": [plot_scores, plot_nu, plot_k_sweep],
        "ablation": [plot_scores, plot_nu, plot_ablation],
    }
    paths: list[Path] = []
    for make in makers[command]:
        paths += make(out, rows)
    return paths

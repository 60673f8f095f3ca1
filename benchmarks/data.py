"""Benchmark data: loaders for MSL, SMAP, SMD, PSM in their public layouts, plus the synthetic default.

Every loader returns :class:`Entity` objects, one per model the paper trains (METHOD.md section 3.1):
one per channel for MSL/SMAP, one per machine for SMD, a single one for PSM. Arrays are
min-max scaled with statistics fitted on the entity's official train split (never on test),
so test values may leave [0, 1] exactly as in the released code. The validation part is the
tail of train (:meth:`Entity.split`), never test data (METHOD.md section 6, item 7).

Expected layouts under the data directory (``--data-dir``, else ``$MADCLUSTER_DATA``, else
``<repo>/../shared/data``):

* ``MSL/`` and ``SMAP/`` (NASA telemanom): ``train/<chan>.npy``, ``test/<chan>.npy`` and
  ``labeled_anomalies.csv`` (columns ``chan_id, spacecraft, anomaly_sequences, class,
  num_values``; ``anomaly_sequences`` holds 0-based ``[start, end]`` pairs, end inclusive).
  Only rows whose ``spacecraft`` matches the dataset are used, so telemanom's combined csv works
  too. A channel listed in several rows (SMAP ``P-2``) gets the union of all rows' intervals;
  the released code concatenated them instead and effectively kept only the first row.
* ``SMD/`` (OmniAnomaly ServerMachineDataset): ``train/``, ``test/``, ``test_label/`` holding
  ``machine-<x>-<y>.txt``, comma-separated, no header. Unlike the released code (pandas without
  ``header=None``) the first row is kept.
* ``PSM/`` (eBay RANSynCoders): ``train.csv``, ``test.csv``, ``test_label.csv``, each with a
  header row and a leading timestamp column that is dropped. NaN becomes 0 before scaling
  (``nan_to_num``, as the released code).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .synthetic import make_synthetic

log = logging.getLogger(__name__)

DATASETS = ("synthetic", "MSL", "SMAP", "SMD", "PSM")
VALIDATION_FRACTION = 0.2

#: default synthetic entities: each is one seed of :func:`benchmarks.synthetic.make_synthetic`
SYNTHETIC_ENTITIES = ("syn-0", "syn-1")
SYNTHETIC_SHAPE = {"n_channels": 8, "n_train": 3000, "n_test": 3000}

_LAYOUTS = {
    "MSL": "MSL/train/<chan>.npy, MSL/test/<chan>.npy, MSL/labeled_anomalies.csv "
           "(NASA telemanom layout)",
    "SMAP": "SMAP/train/<chan>.npy, SMAP/test/<chan>.npy, SMAP/labeled_anomalies.csv "
            "(NASA telemanom layout)",
    "SMD": "SMD/train/machine-x-y.txt, SMD/test/machine-x-y.txt, SMD/test_label/machine-x-y.txt "
           "(OmniAnomaly ServerMachineDataset layout, comma-separated, no header)",
    "PSM": "PSM/train.csv, PSM/test.csv, PSM/test_label.csv (eBay RANSynCoders layout, header "
           "row, first column a timestamp)",
}


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder is missing or incomplete; the message names the file and the layout."""


@dataclass
class Entity:
    """One independently trained series: ``train [N, C]``, ``test [M, C]`` (float32, min-max scaled
    on train) and point labels ``test_labels [M]`` (int64, 1 = anomalous)."""

    dataset: str
    name: str
    train: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def n_channels(self) -> int:
        return int(self.train.shape[1])

    def split(self, window: int, fraction: float = VALIDATION_FRACTION) -> tuple[np.ndarray, np.ndarray]:
        """``(fit, validation)``: validation is the last ``fraction`` of train, never test.

        The tail holds at least one window (``max(ceil(fraction * N), window)`` points), so short
        channels such as MSL T-9 (439 train rows) still get a validation window; the fit part
        must still hold one window, otherwise a ValueError says so.
        """
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"validation fraction must be in (0, 1); got {fraction}")
        n = len(self.train)
        n_val = max(int(np.ceil(fraction * n)), window)
        if n - n_val < window:
            raise ValueError(
                f"{self.dataset}/{self.name}: train has {n} rows, too short for a fit part and a "
                f"validation tail of one window ({window}) each; use a smaller --window")
        return self.train[: n - n_val], self.train[n - n_val:]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir``, else ``$MADCLUSTER_DATA``, else ``<repo root>/../shared/data``."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get("MADCLUSTER_DATA")
    if env:
        return Path(env)
    return repo_root().parent / "shared" / "data"


def minmax_fit_transform(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Min-max scaling fitted on ``train`` and applied to all arrays (float32).

    A column constant on train is shifted by its minimum only (span 1), as sklearn's
    MinMaxScaler does, so it stays finite.
    """
    lo = train.min(axis=0)
    span = train.max(axis=0) - lo
    span = np.where(span > 0, span, 1.0)
    return [((a - lo) / span).astype(np.float32) for a in (train, *others)]


def _natural_key(name: str) -> list:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def _require(path: Path, dataset: str) -> Path:
    if not path.exists():
        raise DatasetLayoutError(
            f"{dataset}: missing {path}. Expected layout under the data directory: "
            f"{_LAYOUTS[dataset]}. Set --data-dir or $MADCLUSTER_DATA to the folder that holds "
            f"{dataset}/.")
    return path


def _check_shapes(dataset: str, name: str, train: np.ndarray, test: np.ndarray,
                  labels: np.ndarray) -> None:
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f"{dataset}/{name}: train {train.shape} and test {test.shape} must be 2-D "
                         f"with the same number of channels")
    if len(labels) != len(test):
        raise ValueError(f"{dataset}/{name}: {len(labels)} labels for {len(test)} test rows")


def _select(available: Sequence[str], wanted: Sequence[str] | None, dataset: str) -> list[str]:
    if not wanted:
        return list(available)
    missing = [w for w in wanted if w not in available]
    if missing:
        raise ValueError(f"{dataset}: unknown entities {missing}; available: {', '.join(available)}")
    return list(wanted)


# ---------------------------------------------------------------------------------------------
# telemanom (MSL, SMAP)
# ---------------------------------------------------------------------------------------------
def read_telemanom_labels(csv_path: Path, spacecraft: str) -> dict[str, dict]:
    """``{chan_id: {"intervals": [(s, e), ...], "num_values": n}}`` for ``spacecraft``'s rows.

    Rows sharing a ``chan_id`` (SMAP P-2) are merged: the union of their intervals.
    """
    out: dict[str, dict] = {}
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"chan_id", "spacecraft", "anomaly_sequences", "num_values"}
        if not need <= set(reader.fieldnames or ()):
            raise DatasetLayoutError(
                f"{csv_path}: header {reader.fieldnames} lacks columns {sorted(need)}; expected "
                f"telemanom's labeled_anomalies.csv")
        for row in reader:
            if row["spacecraft"].strip() != spacecraft:
                continue
            chan = row["chan_id"].strip()
            intervals = [tuple(int(v) for v in pair) for pair in json.loads(row["anomaly_sequences"])]
            entry = out.setdefault(chan, {"intervals": [], "num_values": int(row["num_values"])})
            if entry["num_values"] != int(row["num_values"]):
                raise ValueError(f"{csv_path}: rows for {chan} disagree on num_values")
            entry["intervals"].extend(intervals)
    return out


def intervals_to_labels(intervals: Sequence[tuple[int, int]], length: int) -> np.ndarray:
    """Point labels of ``length`` with 1 on every inclusive ``[start, end]`` interval."""
    delta = np.zeros(length + 1, dtype=np.int64)
    for s, e in intervals:
        if not 0 <= s <= e < length:
            raise ValueError(f"anomaly interval [{s}, {e}] outside a test series of length {length}")
        delta[s] += 1
        delta[e + 1] -= 1
    return (np.cumsum(delta[:-1]) > 0).astype(np.int64)


def telemanom_entities(root: Path, dataset: str) -> list[str]:
    folder = _require(root / dataset, dataset)
    labels = read_telemanom_labels(_require(folder / "labeled_anomalies.csv", dataset), dataset)
    if not labels:
        raise DatasetLayoutError(f"{folder / 'labeled_anomalies.csv'} has no rows with spacecraft "
                                 f"{dataset!r}")
    return sorted(labels, key=_natural_key)


def load_telemanom(root: Path, dataset: str, entities: Sequence[str] | None = None) -> list[Entity]:
    """MSL or SMAP channels, one :class:`Entity` each (see module docstring)."""
    folder = _require(root / dataset, dataset)
    table = read_telemanom_labels(_require(folder / "labeled_anomalies.csv", dataset), dataset)
    names = _select(sorted(table, key=_natural_key), entities, dataset)
    out = []
    for chan in names:
        train = np.load(_require(folder / "train" / f"{chan}.npy", dataset)).astype(np.float64)
        test = np.load(_require(folder / "test" / f"{chan}.npy", dataset)).astype(np.float64)
        if table[chan]["num_values"] != len(test):
            raise ValueError(f"{dataset}/{chan}: labeled_anomalies.csv says num_values="
                             f"{table[chan]['num_values']} but test/{chan}.npy has {len(test)} rows")
        labels = intervals_to_labels(table[chan]["intervals"], len(test))
        _check_shapes(dataset, chan, train, test, labels)
        tr, te = minmax_fit_transform(train, test)
        out.append(Entity(dataset, chan, tr, te, labels,
                          {"segments": len(table[chan]["intervals"])}))
    return out


# ---------------------------------------------------------------------------------------------
# SMD, PSM
# ---------------------------------------------------------------------------------------------
def smd_entities(root: Path) -> list[str]:
    folder = _require(root / "SMD", "SMD")
    names = sorted((p.stem for p in _require(folder / "test_label", "SMD").glob("machine-*.txt")),
                   key=_natural_key)
    if not names:
        raise DatasetLayoutError(f"SMD: no machine-*.txt in {folder / 'test_label'}. Expected "
                                 f"layout: {_LAYOUTS['SMD']}")
    return names


def load_smd(root: Path, entities: Sequence[str] | None = None) -> list[Entity]:
    """SMD machines, one :class:`Entity` each; all three files are read with no header."""
    folder = root / "SMD"
    names = _select(smd_entities(root), entities, "SMD")
    out = []
    for m in names:
        train = np.loadtxt(_require(folder / "train" / f"{m}.txt", "SMD"), delimiter=",", ndmin=2)
        test = np.loadtxt(_require(folder / "test" / f"{m}.txt", "SMD"), delimiter=",", ndmin=2)
        labels = np.loadtxt(_require(folder / "test_label" / f"{m}.txt", "SMD"),
                            delimiter=",", ndmin=1).astype(np.int64)
        _check_shapes("SMD", m, train, test, labels)
        tr, te = minmax_fit_transform(train, test)
        out.append(Entity("SMD", m, tr, te, labels))
    return out


def _read_csv_numeric(path: Path) -> np.ndarray:
    """A csv with one header row as float64 ``[N, cols]``; empty fields and 'nan' become NaN."""
    try:
        return np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    except ValueError:  # empty fields: the slower parser maps them to NaN
        return np.genfromtxt(path, delimiter=",", skip_header=1, ndmin=2)


def load_psm(root: Path, entities: Sequence[str] | None = None) -> list[Entity]:
    """PSM as one :class:`Entity` named ``PSM``; the timestamp column is dropped, NaN -> 0."""
    folder = _require(root / "PSM", "PSM")
    _select(["PSM"], entities, "PSM")
    train = _read_csv_numeric(_require(folder / "train.csv", "PSM"))[:, 1:]
    test = _read_csv_numeric(_require(folder / "test.csv", "PSM"))[:, 1:]
    label_table = _read_csv_numeric(_require(folder / "test_label.csv", "PSM"))
    if label_table.shape[1] < 2:
        raise DatasetLayoutError(f"{folder / 'test_label.csv'}: expected columns timestamp,label")
    labels = label_table[:, -1].astype(np.int64)
    train, test = np.nan_to_num(train), np.nan_to_num(test)
    _check_shapes("PSM", "PSM", train, test, labels)
    tr, te = minmax_fit_transform(train, test)
    return [Entity("PSM", "PSM", tr, te, labels)]


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------
def load_synthetic(entities: Sequence[str] | None = None) -> list[Entity]:
    """Synthetic entities ``syn-<seed>`` (default :data:`SYNTHETIC_ENTITIES`); any seed is valid."""
    out = []
    for name in entities or SYNTHETIC_ENTITIES:
        match = re.fullmatch(r"syn-(\d+)", name)
        if not match:
            raise ValueError(f"synthetic entity names are 'syn-<seed>' (e.g. syn-0); got {name!r}")
        data = make_synthetic(seed=int(match.group(1)), **SYNTHETIC_SHAPE)
        out.append(Entity("synthetic", name, data.train, data.test, data.test_labels.astype(np.int64),
                          {"segments": len(data.segments)}))
    return out


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------
def canonical_name(dataset: str) -> str:
    """Case-insensitive dataset name -> its canonical spelling (``msl`` -> ``MSL``)."""
    for d in DATASETS:
        if d.lower() == dataset.lower():
            return d
    raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")


def list_entities(dataset: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Entity names of ``dataset`` without loading the series."""
    dataset = canonical_name(dataset)
    root = resolve_data_dir(data_dir)
    if dataset == "synthetic":
        return list(SYNTHETIC_ENTITIES)
    if dataset in ("MSL", "SMAP"):
        return telemanom_entities(root, dataset)
    if dataset == "SMD":
        return smd_entities(root)
    _require(root / "PSM", "PSM")
    return ["PSM"]


def load_entity(dataset: str, entity: str, data_dir: str | os.PathLike | None = None) -> Entity:
    """One entity (the runner loads entities one at a time to keep memory flat)."""
    return load_dataset(dataset, data_dir, [entity])[0]


def load_dataset(dataset: str, data_dir: str | os.PathLike | None = None,
                 entities: Sequence[str] | None = None) -> list[Entity]:
    """All (or the named) entities of ``dataset``; a clear error names any missing file."""
    dataset = canonical_name(dataset)
    root = resolve_data_dir(data_dir)
    loaders: dict[str, Callable[[], list[Entity]]] = {
        "synthetic": lambda: load_synthetic(entities),
        "MSL": lambda: load_telemanom(root, "MSL", entities),
        "SMAP": lambda: load_telemanom(root, "SMAP", entities),
        "SMD": lambda: load_smd(root, entities),
        "PSM": lambda: load_psm(root, entities),
    }
    out = loaders[dataset]()
    log.info("loaded %s: %d entities from %s", dataset, len(out), root)
    return out

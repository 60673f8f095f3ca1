"""Loaders: MSL from the shared folder (README numbers) and small SMAP/SMD/PSM folders written here
in the exact public layouts; incomplete folders give an error naming the missing file."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from benchmarks import data as bdata
from benchmarks.data import DatasetLayoutError, load_dataset, list_entities

SHARED = bdata.resolve_data_dir(None)
HAS_MSL = (SHARED / "MSL" / "labeled_anomalies.csv").exists()

# (train rows, test rows, segments, anomalous test points) from shared/data/README.md
MSL_README = {
    "C-1": (2158, 2264, 2, 312), "C-2": (764, 2051, 2, 137), "D-14": (3675, 2625, 2, 222),
    "D-15": (2074, 2158, 1, 641), "D-16": (1451, 2191, 1, 651), "F-4": (2244, 3422, 1, 71),
    "F-5": (2598, 3922, 1, 151), "F-7": (2511, 5054, 3, 423), "F-8": (3342, 2487, 1, 537),
    "M-1": (2209, 2277, 1, 1141), "M-2": (2208, 2277, 1, 1141), "M-3": (2037, 2127, 1, 251),
    "M-4": (2076, 2038, 1, 251), "M-5": (2032, 2303, 1, 301), "M-6": (1565, 2049, 1, 181),
    "M-7": (1587, 2156, 1, 101), "P-10": (4308, 6100, 1, 131), "P-11": (3969, 3535, 2, 228),
    "P-14": (2880, 6100, 1, 181), "P-15": (3682, 2856, 1, 21), "S-2": (926, 1827, 1, 11),
    "T-4": (2272, 2217, 1, 69), "T-5": (2272, 2218, 1, 26), "T-8": (748, 1519, 2, 102),
    "T-9": (439, 1096, 2, 112), "T-12": (1145, 2430, 1, 121), "T-13": (1145, 2430, 2, 252),
}


@pytest.mark.skipif(not HAS_MSL, reason=f"MSL not found under {SHARED} (set MADCLUSTER_DATA)")
def test_msl_matches_readme() -> None:
    ents = load_dataset("msl", SHARED)
    assert [e.name for e in ents] == list(MSL_README)  # natural order, all 27 channels
    for e in ents:
        n_train, n_test, n_seg, n_anom = MSL_README[e.name]
        assert e.train.shape == (n_train, 55) and e.test.shape == (n_test, 55), e.name
        assert e.meta["segments"] == n_seg and int(e.test_labels.sum()) == n_anom, e.name
        assert e.train.dtype == np.float32 and e.test_labels.dtype == np.int64
        # min-max fitted on train: every column starts at 0 and non-constant ones end at 1
        assert np.allclose(e.train.min(0), 0.0)
        varying = np.ptp(e.train, axis=0) > 0
        assert np.allclose(e.train.max(0)[varying], 1.0)
    assert sum(len(e.train) for e in ents) == 58_317
    assert sum(len(e.test) for e in ents) == 73_729
    assert sum(int(e.test_labels.sum()) for e in ents) == 7_766
    # the shortest channel still gets a fit part and a one-window validation tail
    t9 = next(e for e in ents if e.name == "T-9")
    fit, val = t9.split(100)
    assert (len(fit), len(val)) == (339, 100)
    c1 = next(e for e in ents if e.name == "C-1")
    fit, val = c1.split(100)
    assert (len(fit), len(val)) == (1726, 432) and np.array_equal(val, c1.train[-432:])


@pytest.mark.skipif(not HAS_MSL, reason=f"MSL not found under {SHARED}")
def test_msl_entity_subset_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MADCLUSTER_DATA", str(SHARED))
    (e,) = load_dataset("MSL", None, ["M-6"])
    assert e.test.shape == (2049, 55)
    # interval [1850, 2030] inclusive
    assert e.test_labels[1849] == 0 and e.test_labels[1850] == 1 and e.test_labels[2030] == 1
    assert e.test_labels[2031] == 0
    assert e.test[:, 0].max() > 1.5  # test/M-6 reaches 258.1: scaled with train statistics only
    with pytest.raises(ValueError, match="unknown entities"):
        load_dataset("MSL", None, ["X-99"])


# ---------------------------------------------------------------------------------------------
# small folders in the public layouts
# ---------------------------------------------------------------------------------------------
def _write_smap(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    folder = root / "SMAP"
    (folder / "train").mkdir(parents=True)
    (folder / "test").mkdir()
    arrays = {}
    for chan, n_test in (("P-1", 300), ("P-2", 320)):
        train = rng.normal(size=(250, 25))
        test = rng.normal(size=(n_test, 25))
        np.save(folder / "train" / f"{chan}.npy", train)
        np.save(folder / "test" / f"{chan}.npy", test)
        arrays[chan] = train
    with open(folder / "labeled_anomalies.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["chan_id", "spacecraft", "anomaly_sequences", "class", "num_values"])
        w.writerow(["P-1", "SMAP", "[[10, 19], [200, 209]]", "[point, point]", 300])
        w.writerow(["P-2", "SMAP", "[[50, 59]]", "[contextual]", 320])
        w.writerow(["C-1", "MSL", "[[5, 6]]", "[point]", 100])  # another spacecraft: ignored
        w.writerow(["P-2", "SMAP", "[[55, 69], [300, 304]]", "[point, point]", 320])
    return arrays


def test_smap_layout_merges_p2(tmp_path: Path) -> None:
    arrays = _write_smap(tmp_path)
    assert list_entities("SMAP", tmp_path) == ["P-1", "P-2"]
    p1, p2 = load_dataset("SMAP", tmp_path)
    assert p1.test.shape == (300, 25) and int(p1.test_labels.sum()) == 20
    # union of [50, 59], [55, 69], [300, 304] -> 20 + 5 points (the released code kept 10)
    assert int(p2.test_labels.sum()) == 25
    assert p2.test_labels[50] == 1 and p2.test_labels[69] == 1 and p2.test_labels[70] == 0
    assert p2.test_labels[304] == 1 and p2.test_labels[305] == 0
    lo, hi = arrays["P-2"].min(0), arrays["P-2"].max(0)
    np.testing.assert_allclose(p2.train, (arrays["P-2"] - lo) / (hi - lo), atol=1e-6)


def test_smap_incomplete_names_missing_file(tmp_path: Path) -> None:
    _write_smap(tmp_path)
    (tmp_path / "SMAP" / "test" / "P-2.npy").unlink()
    with pytest.raises(DatasetLayoutError, match=r"missing .*test/P-2\.npy.*telemanom"):
        load_dataset("SMAP", tmp_path)
    (tmp_path / "SMAP" / "labeled_anomalies.csv").unlink()
    with pytest.raises(DatasetLayoutError, match="labeled_anomalies.csv"):
        list_entities("SMAP", tmp_path)
    with pytest.raises(DatasetLayoutError, match=r"missing .*SMD.*OmniAnomaly"):
        load_dataset("SMD", tmp_path)


def _write_smd(root: Path) -> None:
    rng = np.random.default_rng(1)
    for sub in ("train", "test", "test_label"):
        (root / "SMD" / sub).mkdir(parents=True)
    for m in ("machine-1-1", "machine-1-10", "machine-1-2"):
        np.savetxt(root / "SMD" / "train" / f"{m}.txt", rng.random((120, 38)), delimiter=",", fmt="%.4f")
        np.savetxt(root / "SMD" / "test" / f"{m}.txt", rng.random((130, 38)), delimiter=",", fmt="%.4f")
        labels = np.zeros(130, dtype=int)
        labels[40:52] = 1
        np.savetxt(root / "SMD" / "test_label" / f"{m}.txt", labels, fmt="%d")


def test_smd_layout(tmp_path: Path) -> None:
    _write_smd(tmp_path)
    assert list_entities("smd", tmp_path) == ["machine-1-1", "machine-1-2", "machine-1-10"]
    ents = load_dataset("SMD", tmp_path, ["machine-1-2"])
    (e,) = ents
    assert e.train.shape == (120, 38) and e.test.shape == (130, 38)  # no header row dropped
    assert int(e.test_labels.sum()) == 12
    (tmp_path / "SMD" / "test" / "machine-1-1.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"test/machine-1-1\.txt"):
        load_dataset("SMD", tmp_path)


def _write_psm(root: Path) -> None:
    folder = root / "PSM"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name, n in (("train.csv", 150), ("test.csv", 140)):
        vals = rng.random((n, 25)) * 10
        with open(folder / name, "w") as fh:
            fh.write("timestamp_(min)," + ",".join(f"feature_{i}" for i in range(25)) + "\n")
            for t, row in enumerate(vals):
                cells = [f"{v:.3f}" for v in row]
                if t == 3:
                    cells[4] = ""  # pandas writes NaN as an empty field
                fh.write(f"{float(t)}," + ",".join(cells) + "\n")
    with open(folder / "test_label.csv", "w") as fh:
        fh.write("timestamp_(min),label\n")
        for t in range(140):
            fh.write(f"{float(t)},{int(60 <= t < 90)}\n")


def test_psm_layout(tmp_path: Path) -> None:
    _write_psm(tmp_path)
    (e,) = load_dataset("PSM", tmp_path)
    assert e.name == "PSM" and e.train.shape == (150, 25) and e.test.shape == (140, 25)
    assert int(e.test_labels.sum()) == 30
    assert np.isfinite(e.train).all() and np.isfinite(e.test).all()
    assert e.train[3, 4] == pytest.approx(0.0)  # NaN -> 0, which is the column minimum here
    assert e.train.min() == pytest.approx(0.0) and e.train.max() == pytest.approx(1.0)
    (tmp_path / "PSM" / "test_label.csv").unlink()
    with pytest.raises(DatasetLayoutError, match=r"test_label\.csv.*RANSynCoders"):
        load_dataset("PSM", tmp_path)


def test_synthetic_entities_are_seeds() -> None:
    a, b = load_dataset("synthetic")
    assert (a.name, b.name) == ("syn-0", "syn-1")
    assert not np.array_equal(a.train, b.train)
    (again,) = load_dataset("synthetic", None, ["syn-0"])
    np.testing.assert_array_equal(a.test, again.test)
    with pytest.raises(ValueError, match="syn-<seed>"):
        load_dataset("synthetic", None, ["seven"])


def test_unknown_dataset_and_short_train() -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("SWaT")
    (e,) = load_dataset("synthetic", None, ["syn-3"])
    short = bdata.Entity("x", "y", e.train[:150], e.test, e.test_labels)
    with pytest.raises(ValueError, match="too short"):
        short.split(100)

"""The paper's published numbers (MADCluster appendix Tables 1-3; METHOD.md sections 4.2-4.4).

They were produced with the released code's window-level protocol and oracle thresholds
(METHOD.md section 3), so they compare like-for-like only with ``--protocol paper``; the
tables print them beside ours for reference. The main-text comparison table was not recovered
(METHOD.md section 4.1), so only MSL has per-backbone numbers (appendix Table 2).
"""
from __future__ import annotations

#: appendix Table 2 (MSL): {(model, variant): {metric: value}}; metrics F1, VUS-ROC, VUS-PR
TABLE2_MSL: dict[tuple[str, str], dict[str, float]] = {
    ("deepsvdd", "base"): {"f1": 0.37, "vus_roc": 0.63, "vus_pr": 0.28},
    ("deepsvdd", "madcluster"): {"f1": 0.52, "vus_roc": 0.72, "vus_pr": 0.42},
    ("usad", "base"): {"f1": 0.53, "vus_roc": 0.71, "vus_pr": 0.43},
    ("usad", "madcluster"): {"f1": 0.53, "vus_roc": 0.72, "vus_pr": 0.43},
    ("beatgan", "base"): {"f1": 0.49, "vus_roc": 0.70, "vus_pr": 0.39},
    ("beatgan", "madcluster"): {"f1": 0.50, "vus_roc": 0.71, "vus_pr": 0.43},
    ("omnianomaly", "base"): {"f1": 0.42, "vus_roc": 0.64, "vus_pr": 0.31},
    ("omnianomaly", "madcluster"): {"f1": 0.45, "vus_roc": 0.67, "vus_pr": 0.34},
    ("thoc", "base"): {"f1": 0.50, "vus_roc": 0.71, "vus_pr": 0.41},
    ("thoc", "madcluster"): {"f1": 0.55, "vus_roc": 0.72, "vus_pr": 0.46},
    ("anomaly_transformer", "base"): {"f1": 0.50, "vus_roc": 0.70, "vus_pr": 0.40},
    ("anomaly_transformer", "madcluster"): {"f1": 0.51, "vus_roc": 0.71, "vus_pr": 0.40},
    ("dcdetector", "base"): {"f1": 0.28, "vus_roc": 0.52, "vus_pr": 0.19},
    ("dcdetector", "madcluster"): {"f1": 0.41, "vus_roc": 0.64, "vus_pr": 0.32},
}

_T1_DATASETS = ("MSL", "SMAP", "SMD", "PSM")
# appendix Table 1: k -> F1, Aff-P, Aff-R for MSL, SMAP, SMD, PSM (in that order)
_TABLE1_RAW = {
    1: (0.52, 0.74, 0.99, 0.49, 0.71, 0.96, 0.48, 0.83, 0.90, 0.67, 0.68, 1.00),
    2: (0.47, 0.66, 0.98, 0.36, 0.64, 0.99, 0.17, 0.57, 0.59, 0.50, 0.55, 1.00),
    3: (0.48, 0.71, 0.98, 0.33, 0.61, 0.99, 0.24, 0.58, 0.95, 0.51, 0.55, 1.00),
    4: (0.47, 0.69, 0.98, 0.35, 0.60, 0.99, 0.24, 0.61, 0.92, 0.50, 0.55, 1.00),
    5: (0.47, 0.68, 0.99, 0.34, 0.62, 0.98, 0.22, 0.59, 0.85, 0.51, 0.56, 1.00),
    6: (0.49, 0.68, 0.98, 0.34, 0.58, 0.99, 0.23, 0.57, 0.92, 0.54, 0.57, 0.99),
    7: (0.49, 0.68, 0.99, 0.39, 0.65, 0.99, 0.28, 0.61, 0.88, 0.50, 0.55, 1.00),
    8: (0.47, 0.69, 0.97, 0.37, 0.66, 0.98, 0.30, 0.62, 0.84, 0.50, 0.55, 1.00),
    9: (0.48, 0.72, 0.97, 0.38, 0.64, 0.98, 0.25, 0.59, 0.92, 0.50, 0.55, 1.00),
    10: (0.51, 0.71, 0.98, 0.37, 0.65, 0.99, 0.27, 0.63, 0.81, 0.62, 0.60, 0.69),
}
# appendix Table 3 (ablation): variant -> the same 12 numbers
_TABLE3_RAW = {
    "mapping": (0.37, 0.63, 0.99, 0.40, 0.70, 0.99, 0.19, 0.56, 0.61, 0.50, 0.55, 1.00),
    "cluster": (0.30, 0.70, 0.66, 0.39, 0.70, 0.95, 0.20, 0.58, 0.61, 0.19, 0.56, 0.23),
    "both": (0.52, 0.74, 0.99, 0.49, 0.71, 0.96, 0.48, 0.83, 0.90, 0.65, 0.66, 0.62),
}


def _unpack(raw: tuple[float, ...]) -> dict[str, dict[str, float]]:
    return {ds: dict(zip(("f1", "aff_p", "aff_r"), raw[3 * i:3 * i + 3]))
            for i, ds in enumerate(_T1_DATASETS)}


#: appendix Table 1: {k: {dataset: {"f1", "aff_p", "aff_r"}}}
TABLE1_CLUSTERS: dict[int, dict[str, dict[str, float]]] = {k: _unpack(v) for k, v in _TABLE1_RAW.items()}
#: appendix Table 3: {"mapping"|"cluster"|"both": {dataset: {"f1", "aff_p", "aff_r"}}}
TABLE3_ABLATION: dict[str, dict[str, dict[str, float]]] = {k: _unpack(v) for k, v in _TABLE3_RAW.items()}


def compare_reference(dataset: str, model: str, variant: str) -> dict[str, float]:
    """Paper numbers for one compare row (empty where the paper has none)."""
    if dataset != "MSL":
        return {}
    return dict(TABLE2_MSL.get((model, variant), {}))


def clusters_reference(dataset: str, k: int) -> dict[str, float]:
    return dict(TABLE1_CLUSTERS.get(k, {}).get(dataset, {}))


def ablation_reference(dataset: str, variant: str) -> dict[str, float]:
    return dict(TABLE3_ABLATION.get(variant, {}).get(dataset, {}))

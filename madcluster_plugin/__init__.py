"""madcluster-plugin: MADCluster (Lee, Hwang, Kim, arXiv 2505.16223) as a drop-in head.

    from madcluster_plugin import wrap
    model = wrap(detector, hidden="encoder")
    loss = detector_loss(model(x), x) + model.madcluster_loss()
"""
from .config import MADClusterConfig
from .metrics import (affiliation, affiliation_events, best_f1, evaluate, f1_at, f1_floor,
                      point_adjust, point_adjusted_f1, range_auc, vus)
from .estimator import MADClusterDetector
from .head import HeadOutput, MADClusterHead, head_macs
from .wrapper import MADClusterModel, madcluster, unwrap_model, wrap

__version__ = "0.1.0"

__all__ = [
    "affiliation",
    "affiliation_events",
    "best_f1",
    "evaluate",
    "f1_at",
    "f1_floor",
    "point_adjust",
    "point_adjusted_f1",
    "range_auc",
    "vus",
    "HeadOutput",
    "MADClusterConfig",
    "MADClusterDetector",
    "MADClusterHead",
    "MADClusterModel",
    "head_macs",
    "madcluster",
    "unwrap_model",
    "wrap",
]

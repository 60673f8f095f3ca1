"""MADClusterConfig: every setting of the head, validated on construction.

Labels "paper" / "code" follow METHOD.md section 6: the paper's method (appendix eqs. 4-9 for
K = 1, eqs. 25-28 for K > 1) is the default; ``target="code"`` reproduces the released code.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

TARGETS = ("paper", "code")
OBJECTIVES = ("one-class", "soft-boundary")
REDUCTIONS = ("log-sum", "mean")
CENTER_INITS = ("he", "data")
COMPONENTS = ("both", "mapping", "cluster")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {choices}")


@dataclass
class MADClusterConfig:
    """Settings of :class:`~madcluster_plugin.head.MADClusterHead`.

    n_clusters:      K. K = 1 is the paper's method (cosine q, learnable threshold nu);
                     K > 1 the appendix B variant (Student-t q, DEC target, KL; nu unused).
    init_threshold:  nu at initialisation, in (0, 1) (code default 0.5).
    target:          "paper": hard target p = 1[q >= nu] (eq. 4) and the one-directed loss (eq. 8);
                     "code": the released code (DEC target, label smoothing, extra KL, both branches).
    smoothing:       label smoothing of the "code" target, in [0, 0.5) (code default 0.01).
    objective:       distance mapping, "one-class" (squared distance, eq. 27) or "soft-boundary"
                     (Deep SVDD soft boundary with radius R from training distances, code only).
    sb_nu:           the soft-boundary quantile parameter (not the threshold nu), in (0, 1].
    reduction:       "log-sum": log(mean_b sum_{t,k}(mapping + cluster) + 1e-8) as the released code;
                     "mean": the plain mean over all elements.
    center_init:     "he" (Kaiming normal, fan_in, as the code) or "data" (initialise from hidden
                     states: the mean for K = 1, k-means for K > 1).
    threshold_eps:   nu is kept inside (eps, 1 - eps) so the loss stays finite as nu -> 1.
    components:      "both" (MADCluster), "mapping" (distance mapping only) or "cluster"
                     (sequence-wise clustering only): the ablation of appendix Table 3.
    weight:          multiplies the head loss before it is added to the backbone's loss.
    check_finite:    raise on NaN/Inf hidden states instead of training on them.
    """

    n_clusters: int = 1
    init_threshold: float = 0.5
    target: str = "paper"
    smoothing: float = 0.01
    objective: str = "one-class"
    sb_nu: float = 0.01
    reduction: str = "log-sum"
    center_init: str = "he"
    threshold_eps: float = 1e-4
    components: str = "both"
    weight: float = 1.0
    check_finite: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.n_clusters, bool) or not isinstance(self.n_clusters, int) or self.n_clusters < 1:
            raise ValueError(f"n_clusters must be an integer >= 1; got {self.n_clusters!r}")
        if not 0.0 < float(self.threshold_eps) < 0.5:
            raise ValueError(f"threshold_eps must be in (0, 0.5); got {self.threshold_eps!r}")
        if not 0.0 < float(self.init_threshold) < 1.0:
            raise ValueError(
                f"init_threshold must be in (0, 1) (the paper's threshold nu); got {self.init_threshold!r}")
        if not 0.0 <= float(self.smoothing) < 0.5:
            raise ValueError(f"smoothing must be in [0, 0.5); got {self.smoothing!r}")
        if not 0.0 < float(self.sb_nu) <= 1.0:
            raise ValueError(f"sb_nu must be in (0, 1]; got {self.sb_nu!r}")
        if not float(self.weight) >= 0.0:
            raise ValueError(f"weight must be >= 0; got {self.weight!r}")
        _check_choice("target", self.target, TARGETS)
        _check_choice("objective", self.objective, OBJECTIVES)
        _check_choice("reduction", self.reduction, REDUCTIONS)
        _check_choice("center_init", self.center_init, CENTER_INITS)
        _check_choice("components", self.components, COMPONENTS)

    def replace(self, **overrides: Any) -> "MADClusterConfig":
        """A copy with ``overrides`` applied (validated); unknown names fail with the valid ones."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown MADClusterConfig option(s) {sorted(unknown)}; valid: {sorted(known)}")
        return MADClusterConfig(**{**asdict(self), **overrides})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MADClusterConfig":
        return cls().replace(**data)

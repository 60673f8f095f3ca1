"""Run profiles: how much compute one (entity, model, variant, seed) run gets.

* ``paper``: the released hyper-parameters (METHOD.md section 4.7, ``run_all_datasets.py``):
  window 100, stride 1 for train and test, batch 128, lr 1e-4, 30 epochs, patience 5, every
  baseline at its reference widths (the adapters' defaults). Meant for a GPU.
* ``quick``: the whole 7 x 2 grid on MSL (27 channels) on two CPU cores in about an hour per
  seed: narrower models (:data:`QUICK_WIDTHS`, one table), USAD on windows of 20
  (:data:`QUICK_WINDOWS`), 4 epochs at lr 1e-3 and batch 32, training windows every 10 steps
  capped at 192 per entity (evenly spread), validation capped at 48 windows, and test windows
  every 10 steps (per-point scores are still the mean over all covering windows). All 27 MSL
  channels are used; ``--entities`` / ``--max-entities`` narrow the set. Measured on one
  contended core: about 2 minutes per MSL channel for all 14 (model, variant) runs.

Both keep window 100 (except :data:`QUICK_WINDOWS`), the validation tail of 20% of train and
best-checkpoint selection on the validation loss, and attach DCdetector's head where the released
code does (:data:`BENCH_WRAP_OPTIONS`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

#: Per-model constructor overrides of the quick profile (the paper profile uses none: the
#: adapters' defaults are the reference widths of BASELINES.md).
QUICK_WIDTHS: dict[str, dict[str, Any]] = {
    "deepsvdd": {"hidden": 64, "n_layers": 2, "rep_dim": 32},
    "usad": {"hidden_size": 10},
    "beatgan": {"ndf": 16, "ngf": 16, "nz": 32},
    "omnianomaly": {"rnn_hidden": 64, "dense_dim": 64, "nf_layers": 5},
    "thoc": {"hidden": 64},
    "anomaly_transformer": {"d_model": 64, "n_heads": 4, "n_layers": 2, "d_ff": 64},
    "dcdetector": {"d_model": 64, "n_heads": 1, "e_layers": 2, "patch_sizes": (5, 10)},
}


#: Per-model window overrides of the quick profile. USAD is a dense auto-encoder on the flattened
#: window (w = T * C -> w/2 -> w/4 -> T * h): at T = 100 on MSL (C = 55) that is about 61M
#: parameters and about 2 minutes per run on one core, more than the whole grid's budget allows.
#: Its own paper and code use short windows (5-12 steps), so the quick profile gives it 20.
QUICK_WINDOWS: dict[str, int] = {"usad": 20}


#: Per-model options of ``adapter.wrap()`` in both profiles. DCdetector's head sits on ``x_ori``
#: (the window embedding), the released MADCluster code's attachment point, instead of the
#: adapter's default ``query`` (the patch representation DCdetector's loss trains). Chosen on MSL:
#: on the quick grid (27 channels x 3 seeds) ``query`` left VUS-PR unchanged (0.145 -> 0.145,
#: 40 of 81 pairs up) while ``x_ori`` raised it (0.145 -> 0.161, 61 of 81 pairs up); it is also
#: what the paper profile needs for parity with the released code. docs/results/msl-quick.md.
BENCH_WRAP_OPTIONS: dict[str, dict[str, Any]] = {"dcdetector": {"attach": "x_ori"}}


@dataclass(frozen=True)
class Profile:
    """Training and scoring budget of one run (see the module docstring)."""

    name: str
    window: int = 100
    train_stride: int = 1
    test_stride: int = 1
    batch: int = 128
    lr: float = 1e-4
    epochs: int = 30
    patience: int = 5
    min_delta: float = 1e-5
    max_train_windows: int | None = None
    max_val_windows: int | None = None
    #: training windows used to fit the ``combine="sum"`` score normaliser
    max_normalizer_windows: int | None = 2048
    widths: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: per-model window length overrides (the metrics' VUS/range window stays ``window``)
    windows: dict[str, int] = field(default_factory=dict)
    #: MADClusterConfig overrides applied to every wrapped model
    head: dict[str, Any] = field(default_factory=dict)
    #: per-model options of ``adapter.wrap()`` (e.g. DCdetector's ``attach``)
    wrap_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: percentile of validation scores used as the label-free threshold
    val_percentile: float = 99.0

    def window_for(self, model: str) -> int:
        return int(self.windows.get(model, self.window))

    def build_overrides(self, model: str) -> dict[str, Any]:
        return dict(self.widths.get(model, {}))

    def wrap_options_for(self, model: str) -> dict[str, Any]:
        return dict(self.wrap_options.get(model, {}))

    def with_overrides(self, **changes: Any) -> "Profile":
        """A copy with the given fields changed (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


PROFILES: dict[str, Profile] = {
    "paper": Profile("paper", wrap_options=BENCH_WRAP_OPTIONS),
    "quick": Profile("quick", train_stride=10, test_stride=10, batch=32, lr=1e-3, epochs=4,
                     patience=2, max_train_windows=192, max_val_windows=48,
                     max_normalizer_windows=192, widths=QUICK_WIDTHS, windows=QUICK_WINDOWS,
                     wrap_options=BENCH_WRAP_OPTIONS),
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose from {', '.join(PROFILES)}")
    return PROFILES[name]

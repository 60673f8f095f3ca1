"""MADClusterDetector: a PyOD/DeepOD-style estimator around a MADCluster-wrapped detector.

numpy in, numpy out (ECOSYSTEM.md section 3.1-3.2, 3.6)::

    det = MADClusterDetector("thoc", window=100, stride=1, epochs=10, contamination=0.05)
    det.fit(X_train)                       # X: [n_timestamps, n_channels]
    scores = det.decision_function(X_test) # [n_timestamps], higher = more anomalous
    labels = det.predict(X_test)           # 0/1: scores > det.threshold_

``fit`` cuts the series into windows of ``window`` steps every ``stride`` steps (plus one window
flush with the end, so every point is covered), trains the wrapped backbone on them and scores the
training series: ``decision_scores_``, ``threshold_`` (the ``1 - contamination`` quantile of the
training scores, as PyOD) and ``labels_``.

Two ways to name the backbone:

* a registered baseline name (``"thoc"``, ``"deepsvdd"``, ...): it is built, wrapped and trained
  through its adapter (``adapters.get(name)``; build / wrap / optimizers / train_step /
  fit_score_normalizer / score, with the baseline's ``on_fit_start`` / ``on_epoch_end`` hooks).
  The top-level ``adapters`` package is imported lazily, so ``madcluster_plugin`` itself never
  depends on it;
* any ``nn.Module`` plus ``hidden=`` (its attachment point) and ``loss_fn(output, x)``: a deep
  copy is wrapped with :func:`madcluster_plugin.wrap` and trained with
  :func:`madcluster_plugin.train.fit`. ``loss_fn`` must return the *unreduced* loss, ``[B, T]``
  or ``[B, T, ...]`` (trailing dimensions are averaged): its mean is the training loss and its
  per-point value is the base anomaly score (e.g. the squared reconstruction error of each step).

Per-point scores: every window gives a score to each of its ``window`` steps; a point covered by
several windows gets the **mean** of its scores. The mean keeps every point on the same scale
whatever the number of windows covering it (points near the ends are covered by fewer windows;
the maximum would rise with the count, and DeepOD's "score of the last point" leaves the first
``window - 1`` points at 0), and averages out the position effect of a point seen early in one
window (little context) and late in another.
"""
from __future__ import annotations

import copy
import logging
import math
import numbers
from dataclasses import fields
from typing import Any, Callable, Iterator

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted, validate_data
from torch import Tensor, nn

from .config import MADClusterConfig
from .wrapper import MADClusterModel, wrap

log = logging.getLogger(__name__)

COMBINES = ("sum", "product", "head", "base")
#: MADClusterConfig fields with their own estimator parameter (name in the estimator -> field).
_FLAT_HEAD_PARAMS = {"n_clusters": "n_clusters", "target": "target", "objective": "objective",
                     "init_threshold": "init_threshold", "center_init": "center_init",
                     "head_weight": "weight"}

LossFn = Callable[[Any, Tensor], Tensor]
History = list[dict[str, float]]


# ---- windows ------------------------------------------------------------------------------
def window_starts(n_timestamps: int, window: int, stride: int) -> np.ndarray:
    """Start indices ``0, stride, 2*stride, ...`` plus one window flush with the series end.

    The extra last window makes every time step covered by at least one window whatever ``stride``.
    """
    if n_timestamps < window:
        raise ValueError(f"a series of {n_timestamps} steps is shorter than window={window}")
    starts = np.arange(0, n_timestamps - window + 1, stride, dtype=np.int64)
    if starts[-1] != n_timestamps - window:
        starts = np.append(starts, n_timestamps - window)
    return starts


def window_coverage(n_timestamps: int, window: int, starts: np.ndarray) -> np.ndarray:
    """How many windows (starting at ``starts``) cover each time step, ``[n_timestamps]``."""
    diff = np.zeros(n_timestamps + 1, dtype=np.int64)
    np.add.at(diff, starts, 1)
    np.add.at(diff, starts + window, -1)
    return np.cumsum(diff[:-1])


def _cuda_indices(device: torch.device) -> list[int]:
    """CUDA device index whose RNG ``fork_rng`` saves and restores (none on CPU)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


class WindowBatches:
    """Re-iterable mini-batches of windows ``[b, window, C]`` cut from one series tensor.

    Windows are gathered per batch (``series[start + arange(window)]``), so the ``n_windows x
    window`` copy of the data is never materialised. With ``shuffle`` each pass draws a new order
    from ``generator`` (seeded: the same sequence of orders on every run).
    """

    def __init__(self, series: Tensor, starts: np.ndarray, window: int, batch_size: int, *,
                 shuffle: bool = False, generator: torch.Generator | None = None) -> None:
        self.series = series
        self.starts = torch.as_tensor(starts, dtype=torch.long)
        self.offsets = torch.arange(window, dtype=torch.long)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.generator = generator

    def __len__(self) -> int:
        return math.ceil(len(self.starts) / self.batch_size)

    def index_batches(self) -> Iterator[Tensor]:
        """Point indices ``[b, window]`` of each batch (on CPU)."""
        order = (torch.randperm(len(self.starts), generator=self.generator) if self.shuffle
                 else torch.arange(len(self.starts)))
        for i in range(0, len(order), self.batch_size):
            yield self.starts[order[i:i + self.batch_size]].unsqueeze(1) + self.offsets

    def __iter__(self) -> Iterator[Tensor]:
        for idx in self.index_batches():
            yield self.series[idx.to(self.series.device)]


# ---- the estimator ------------------------------------------------------------------------
class MADClusterDetector(BaseEstimator):
    """Time-series anomaly detector with a MADCluster head, scikit-learn / PyOD conventions.

    Parameters
    ----------
    backbone:      a registered baseline name (``"thoc"``, ``"deepsvdd"``, ``"anomaly_transformer"``,
                   ...; needs the ``adapters`` package) or an ``nn.Module`` taking ``[B, T, C]``
                   windows (then ``hidden`` and ``loss_fn`` are required). A module is deep-copied
                   at ``fit``; the one passed in stays untouched.
    hidden:        attachment point (dotted module name or callable on the output); for a name,
                   ``None`` keeps the adapter's attachment point.
    window:        window length T (steps per window).
    stride:        step between training windows.
    score_stride:  step between scoring windows (``None``: ``stride``); 1 gives every point
                   ``window`` scores to average.
    epochs, batch_size, lr: training loop settings (Adam; adapters add their weight decay).
    contamination: expected fraction of anomalies in the training series, in (0, 0.5]:
                   ``threshold_`` is the ``1 - contamination`` quantile of the training scores.
    combine:       how head and base score are combined (``MADClusterModel.anomaly_score``):
                   ``"sum"`` of the scores standardised on training windows, ``"product"``,
                   ``"head"`` alone or ``"base"`` alone.
    device:        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
    random_state:  seed of initialisation, batch order and dropout (torch's global RNG is
                   restored afterwards); ``None`` draws one per fit. Runs on CPU repeat bit for bit.
    loss_fn:       for a module backbone: ``loss_fn(output, x) -> [B, T]`` or ``[B, T, ...]``
                   unreduced loss; its mean trains, its per-point value is the base score.
    layout, select, capture: how the captured output becomes ``[B, T, D]`` (see ``wrap``);
                   ``None`` keeps the adapter's (name) or ``wrap``'s defaults (module).
    build_kwargs:  keyword overrides of the baseline's constructor (name backbones only).
    n_clusters, target, objective, init_threshold, center_init, head_weight: the head options
                   most worth tuning (:class:`MADClusterConfig` fields; ``head_weight`` is
                   ``weight``).
    head_options:  any other :class:`MADClusterConfig` fields (``reduction``, ``smoothing``, ...).
    verbose:       log one line per epoch at INFO level (and a progress bar for module backbones).

    Attributes (after ``fit``)
    --------------------------
    decision_scores_ ``[n_timestamps]`` training scores; threshold_; labels_ (0/1);
    model_ (the trained :class:`MADClusterModel`); n_features_in_; history_ (per-epoch mean
    losses); device_; seed_ (the seed used, also for scoring).
    """

    def __init__(self, backbone: str | nn.Module = "thoc", hidden: Any = None, window: int = 100,
                 stride: int = 1, epochs: int = 10, batch_size: int = 64, lr: float = 1e-3,
                 contamination: float = 0.1, combine: str = "sum", device: str = "auto",
                 random_state: int | None = 0, loss_fn: LossFn | None = None,
                 score_stride: int | None = None, layout: str | None = None, select: Any = None,
                 capture: str | None = None, build_kwargs: dict[str, Any] | None = None,
                 n_clusters: int = 1, target: str = "paper", objective: str = "one-class",
                 init_threshold: float = 0.5, center_init: str = "he", head_weight: float = 1.0,
                 head_options: dict[str, Any] | None = None, verbose: bool = False) -> None:
        self.backbone = backbone
        self.hidden = hidden
        self.window = window
        self.stride = stride
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.contamination = contamination
        self.combine = combine
        self.device = device
        self.random_state = random_state
        self.loss_fn = loss_fn
        self.score_stride = score_stride
        self.layout = layout
        self.select = select
        self.capture = capture
        self.build_kwargs = build_kwargs
        self.n_clusters = n_clusters
        self.target = target
        self.objective = objective
        self.init_threshold = init_threshold
        self.center_init = center_init
        self.head_weight = head_weight
        self.head_options = head_options
        self.verbose = verbose

    # ---- public API -----------------------------------------------------------------------
    def fit(self, X: Any, y: Any = None) -> "MADClusterDetector":
        """Train on the series ``X [n_timestamps, n_channels]`` (``y`` is ignored); returns self."""
        self._check_params()
        series = self._validate_X(X, fitting=True)
        device = self._resolve_device()
        config = self._head_config()
        seed = self._seed()
        with torch.random.fork_rng(devices=_cuda_indices(device)):
            torch.manual_seed(seed)
            x = torch.from_numpy(series).to(device)
            starts = window_starts(len(series), self.window, self.stride)
            gen = torch.Generator().manual_seed(seed)
            train = WindowBatches(x, starts, self.window, self.batch_size, shuffle=True, generator=gen)
            ordered = WindowBatches(x, starts, self.window, self.batch_size)
            if isinstance(self.backbone, str):
                model, adapter, history = self._fit_adapter(series.shape[1], train, ordered, config, device)
            else:
                model, adapter, history = self._fit_module(train, ordered, config, device, seed)
        model.eval()
        self.model_ = model
        self.adapter_ = adapter
        self.history_ = history
        self.device_ = device
        self.seed_ = seed
        self.decision_scores_ = self._point_scores(series)
        self.threshold_ = float(np.percentile(self.decision_scores_, 100.0 * (1.0 - self.contamination)))
        self.labels_ = (self.decision_scores_ > self.threshold_).astype(np.int64)
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """Anomaly score of every time step of ``X [n_timestamps, n_channels]`` (higher = more
        anomalous): the mean over the windows covering the step."""
        check_is_fitted(self, ["model_", "threshold_"])
        return self._point_scores(self._validate_X(X, fitting=False))

    def predict(self, X: Any) -> np.ndarray:
        """0/1 label of every time step: 1 where the score exceeds ``threshold_``."""
        return (self.decision_function(X) > self.threshold_).astype(np.int64)

    def fit_predict(self, X: Any, y: Any = None) -> np.ndarray:
        """Fit on ``X`` and return the training labels ``labels_``."""
        return self.fit(X, y).labels_

    # ---- validation -----------------------------------------------------------------------
    def _check_params(self) -> None:
        for name in ("window", "stride", "epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        if self.score_stride is not None and (isinstance(self.score_stride, bool) or not isinstance(
                self.score_stride, (int, np.integer)) or self.score_stride < 1):
            raise ValueError(f"score_stride must be None or an integer >= 1; got {self.score_stride!r}")
        if not (isinstance(self.lr, numbers.Real) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number; got {self.lr!r}")
        if not (isinstance(self.contamination, numbers.Real) and 0.0 < self.contamination <= 0.5):
            raise ValueError(f"contamination must be in (0, 0.5] (the expected fraction of anomalous "
                             f"training points); got {self.contamination!r}")
        if self.combine not in COMBINES:
            raise ValueError(f"combine={self.combine!r}; expected one of {COMBINES}")
        if isinstance(self.backbone, str):
            if self.loss_fn is not None:
                raise ValueError(f"loss_fn is for module backbones; the {self.backbone!r} baseline "
                                 f"trains with its own loss. Drop loss_fn or pass an nn.Module.")
        elif isinstance(self.backbone, nn.Module):
            if isinstance(self.backbone, MADClusterModel):
                raise ValueError("backbone is already wrapped with MADCluster; pass the plain module "
                                 "(model.unwrap()) and its hidden= attachment point")
            if self.hidden is None:
                raise ValueError("an nn.Module backbone needs hidden=<dotted name of the submodule "
                                 "whose output the head sees> (or a callable on the module output)")
            if self.loss_fn is None:
                raise ValueError("an nn.Module backbone needs loss_fn(output, x) returning its "
                                 "unreduced per-point loss [B, T] (or [B, T, ...])")
            if self.build_kwargs:
                raise ValueError("build_kwargs configures a named baseline; an nn.Module backbone "
                                 "is used as given")
        else:
            raise ValueError(f"backbone must be a baseline name (e.g. 'thoc') or an nn.Module; "
                             f"got {type(self.backbone).__name__}")

    def _validate_X(self, X: Any, *, fitting: bool) -> np.ndarray:
        """``X`` as a C-contiguous float32 ``[n_timestamps, n_channels]`` array, or a clear error.

        Records ``n_features_in_`` (and ``feature_names_in_`` for DataFrames) at fit, and checks
        them afterwards, as scikit-learn's ``validate_data``.
        """
        original = X
        if isinstance(X, Tensor):
            X = original = X.detach().cpu().numpy()
        if sp.issparse(X):
            raise TypeError("sparse input is not supported: a time series is dense; pass X.toarray()")
        arr = check_array(X, accept_sparse=False, dtype=np.float32, ensure_all_finite=False,
                          ensure_2d=False, allow_nd=True, ensure_min_samples=0,
                          ensure_min_features=0, input_name="X")
        if arr.ndim != 2:
            hint = (" Reshape your data with X.reshape(-1, 1) for a univariate series."
                    if arr.ndim == 1 else "")
            raise ValueError(f"X must be 2-D [n_timestamps, n_channels]; got shape {arr.shape}.{hint}")
        if arr.shape[1] == 0:
            raise ValueError(f"X has 0 feature(s) (shape={arr.shape}) while a minimum of 1 is "
                             f"required: pass at least one channel")
        if fitting:  # a fit that fails on the values leaves n_features_in_ untouched
            self._check_values(arr)
        try:  # n_features_in_ / feature_names_in_: set at fit, checked afterwards
            validate_data(self, original, reset=fitting, skip_check_array=True)
        except ValueError as err:
            raise ValueError(f"{err} Pass the channels (columns) the detector was fitted on, in "
                             f"the same order.") from err
        if not fitting:  # after the column check: renamed DataFrame columns would read as NaN
            self._check_values(arr)
        return np.ascontiguousarray(arr)

    def _check_values(self, arr: np.ndarray) -> None:
        bad = ~np.isfinite(arr)
        if bad.any():
            rows = np.flatnonzero(bad.any(axis=1))
            raise ValueError(f"X holds {int(bad.sum())} NaN or inf value(s) (first at time step "
                             f"{int(rows[0])}); impute or drop them before fit/decision_function")
        if arr.shape[0] < self.window:
            raise ValueError(f"X has n_samples={arr.shape[0]} time steps, fewer than window="
                             f"{self.window}; pass a longer series or a smaller window")

    def _resolve_device(self) -> torch.device:
        if isinstance(self.device, str) and self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device={self.device!r} is not a torch device; use 'auto', 'cpu' or "
                             f"'cuda[:i]'") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but CUDA is not available; use 'auto' or 'cpu'")
        return device

    def _head_config(self) -> MADClusterConfig:
        extra = dict(self.head_options or {})
        known = {f.name for f in fields(MADClusterConfig)}
        flat = set(_FLAT_HEAD_PARAMS.values())
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"head_options has unknown field(s) {unknown}; valid: "
                             f"{sorted(known - flat)}")
        clash = sorted(set(extra) & flat)
        if clash:
            names = [k for k, v in _FLAT_HEAD_PARAMS.items() if v in clash]
            raise ValueError(f"set {clash} through the estimator parameter(s) {names}, not head_options")
        values = {field: getattr(self, param) for param, field in _FLAT_HEAD_PARAMS.items()}
        return MADClusterConfig().replace(**values, **extra)

    def _seed(self) -> int:
        if isinstance(self.random_state, (int, np.integer)) and not isinstance(self.random_state, bool):
            return int(self.random_state)
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    def _wrap_options(self) -> dict[str, Any]:
        opts = {"hidden": self.hidden, "layout": self.layout, "select": self.select,
                "capture": self.capture}
        return {k: v for k, v in opts.items() if v is not None}

    # ---- training -------------------------------------------------------------------------
    def _fit_adapter(self, n_channels: int, train: WindowBatches, ordered: WindowBatches,
                     config: MADClusterConfig, device: torch.device) -> tuple[MADClusterModel, Any, History]:
        """Build, wrap and train a registered baseline through its adapter."""
        try:
            import adapters  # lazy: madcluster_plugin never imports the baselines at import time
        except ImportError as err:
            raise ImportError(
                f"backbone={self.backbone!r} needs the 'adapters' and 'baselines' packages of "
                f"madcluster-plugin (installed with the full distribution, or run from the repository "
                f"root); alternatively pass your own nn.Module with hidden= and loss_fn=") from err
        try:
            adapter = adapters.get(self.backbone)
        except KeyError as err:
            raise ValueError(err.args[0]) from err
        plain = adapter.build(n_channels, window=self.window, **(self.build_kwargs or {}))
        model = adapter.wrap(plain, config=config, **self._wrap_options()).to(device)
        backbone = model.backbone
        if hasattr(backbone, "on_fit_start"):
            backbone.on_fit_start(ordered)
        if not bool(model.head.centers_initialized):
            model.initialize_centers(ordered)
        self._check_head_steps(model, ordered)
        optimizers = adapter.optimizers(model, self.lr)
        soft_boundary = config.objective == "soft-boundary"
        history: History = []
        for epoch in range(self.epochs):
            sums: dict[str, float] = {}
            distances: list[Tensor] = []
            for xb in train:
                logs = adapter.train_step(model, xb, optimizers, epoch)
                if not all(math.isfinite(v) for v in logs.values()):
                    raise FloatingPointError(f"non-finite loss {logs} at epoch {epoch}; lower lr "
                                             f"(now {self.lr}) or scale X")
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                if soft_boundary:
                    distances.append(model.head_output().sq_distances.detach()
                                     .reshape(-1, config.n_clusters))
            if soft_boundary:
                model.head.update_radius(torch.cat(distances))
            if hasattr(backbone, "on_epoch_end"):
                backbone.on_epoch_end(epoch)
            history.append({k: v / len(train) for k, v in sums.items()})
            if self.verbose:
                log.info("epoch %d/%d: %s", epoch + 1, self.epochs,
                         " ".join(f"{k} {v:.5f}" for k, v in history[-1].items()))
        model.eval()
        if self.combine == "sum":
            adapter.fit_score_normalizer(model, ordered)
        return model, adapter, history

    def _fit_module(self, train: WindowBatches, ordered: WindowBatches, config: MADClusterConfig,
                    device: torch.device, seed: int) -> tuple[MADClusterModel, None, History]:
        """Wrap a deep copy of the user's module and train it with ``madcluster_plugin.train.fit``."""
        from .train import fit

        backbone = copy.deepcopy(self.backbone).to(device)
        example = next(iter(ordered))
        opts = self._wrap_options()
        model = wrap(backbone, opts.pop("hidden"), example_input=example, config=config, **opts)
        model.to(device)
        self._check_head_steps(model, ordered)
        loss_fn = self.loss_fn
        assert loss_fn is not None

        def training_loss(out: Any, x: Tensor) -> Tensor:
            return self._per_point_loss(loss_fn(out, x), x).mean()

        fit_history = fit(model, train, training_loss, self.epochs, lr=self.lr, device=device,
                          progress=self.verbose, distributed=False, restore_best=False, seed=seed)
        history = [{"loss": loss, "madcluster": head, "nu": nu} for loss, head, nu in
                   zip(fit_history.loss, fit_history.madcluster, fit_history.nu)]
        model.eval()
        if self.combine == "sum":
            with torch.no_grad():
                heads, bases = [], []
                for xb in ordered:
                    bases.append(self._module_base_score(model, xb))
                    heads.append(model.head_score())
            model.fit_score_normalizer(torch.cat(heads), torch.cat(bases))
        return model, None, history

    def _per_point_loss(self, loss: Any, x: Tensor) -> Tensor:
        """``loss_fn``'s output as ``[B, T]`` (trailing dimensions averaged), or a clear ValueError."""
        if not isinstance(loss, Tensor):
            raise ValueError(f"loss_fn must return a tensor; got {type(loss).__name__}")
        if loss.dim() < 2 or tuple(loss.shape[:2]) != tuple(x.shape[:2]):
            raise ValueError(
                f"loss_fn returned shape {tuple(loss.shape)}; the estimator needs the unreduced "
                f"per-point loss [B, T] or [B, T, ...] = {tuple(x.shape[:2])} + ... to score every "
                f"time step: return e.g. (out - x).pow(2), not its .mean()")
        return loss.flatten(2).mean(-1) if loss.dim() > 2 else loss

    def _module_base_score(self, model: MADClusterModel, x: Tensor) -> Tensor:
        assert self.loss_fn is not None
        out = model(x)
        return self._per_point_loss(self.loss_fn(out, x), x)

    @torch.no_grad()
    def _check_head_steps(self, model: MADClusterModel, batches: WindowBatches) -> None:
        """The head must give one score per window step (or one per window) to score every point."""
        if self.combine == "base":
            return
        was_training = model.training
        model.eval()
        model(next(iter(batches)))
        steps = int(model.head_score().shape[1])
        model.train(was_training)
        if steps not in (1, self.window):
            raise ValueError(
                f"the hidden state at {model.hidden_spec!r} has {steps} steps per window of "
                f"{self.window}: the head cannot score every time step. Attach the head where the "
                f"sequence keeps its length (or use combine='base')")

    # ---- scoring --------------------------------------------------------------------------
    def _window_scores(self, x: Tensor) -> Tensor:
        """Per-point scores ``[b, window]`` of one batch of windows."""
        model = self.model_
        if self.adapter_ is not None:
            return self.adapter_.score(model, x, combine=self.combine)
        if self.combine == "head":
            model(x)
            return model.head_score().expand(x.shape[0], x.shape[1])
        base = self._module_base_score(model, x)
        return model.anomaly_score(base, combine=self.combine)

    def _point_scores(self, series: np.ndarray) -> np.ndarray:
        """Mean of the per-point window scores over the windows covering each step, ``[N]``."""
        stride = self.score_stride if self.score_stride is not None else self.stride
        n = len(series)
        starts = window_starts(n, self.window, stride)
        x = torch.from_numpy(series).to(self.device_)
        batches = WindowBatches(x, starts, self.window, self.batch_size)
        total = torch.zeros(n, dtype=torch.float64)
        was_training = self.model_.training
        self.model_.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=_cuda_indices(self.device_)):
            torch.manual_seed(self.seed_)  # detectors that sample at test time score reproducibly
            for idx in batches.index_batches():
                s = self._window_scores(x[idx.to(x.device)])
                if not bool(torch.isfinite(s).all()):
                    raise FloatingPointError("the model produced non-finite scores; the training "
                                             "diverged or X is far outside the training range")
                total.index_add_(0, idx.reshape(-1), s.detach().double().cpu().reshape(-1))
        self.model_.train(was_training)
        return (total.numpy() / window_coverage(n, self.window, starts)).astype(np.float64)


__all__ = ["MADClusterDetector", "WindowBatches", "window_coverage", "window_starts"]

"""MADClusterModel and wrap(): attach the head to any detector's hidden states in two lines.

``model = wrap(detector, hidden="encoder")`` registers a forward hook on the named submodule;
``model(x)`` returns exactly what the detector returns, and ``model.madcluster_loss()`` is the
head loss on the hidden state captured in that forward (PEFT-style: config + head weights
saved beside the user's backbone with :meth:`MADClusterModel.save_pretrained`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from .capture import LAYOUTS, infer_dim, resolve_module, select_output, to_btd, unwrap_container
from .config import MADClusterConfig
from .files import atomic_write
from .head import HeadOutput, MADClusterHead

COMBINES = ("sum", "product", "head", "base")
CAPTURES = ("first", "last")
HEAD_WEIGHTS = "madcluster_head.pt"
HEAD_CONFIG = "madcluster_config.json"
_SCORE_STD_FLOOR = 1e-8

HiddenSpec = str | Callable[[Any], Tensor]


class MADClusterModel(nn.Module):
    """A detector with a MADCluster head attached to one of its hidden states.

    Holds ``backbone`` (the user's module, unchanged) and ``head``; ``state_dict()`` has keys
    ``backbone.*`` and ``head.*``. The captured hidden state lives only until the next forward.
    """

    def __init__(self, backbone: nn.Module, hidden: HiddenSpec, *, dim: int | None = None,
                 example_input: Any = None, layout: str = "BTD", select: Any = None,
                 capture: str = "first", config: MADClusterConfig | None = None,
                 **overrides: Any) -> None:
        super().__init__()
        if isinstance(backbone, MADClusterModel):
            raise TypeError("this model is already wrapped with MADCluster; call .unwrap() first")
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"wrap() needs an nn.Module; got {type(backbone).__name__}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r}; expected one of {LAYOUTS}")
        if capture not in CAPTURES:
            raise ValueError(f"capture={capture!r}; expected one of {CAPTURES}")
        self.backbone = backbone
        self.layout, self.select, self.capture = layout, select, capture
        self.hidden_spec: HiddenSpec = hidden
        self._hidden: Tensor | None = None
        self._head_out: HeadOutput | None = None
        self._handles: list[Any] = []
        target: nn.Module | None = None
        if isinstance(hidden, str):
            target = resolve_module(backbone, hidden)  # fails early with the closest names
            self._handles.append(target.register_forward_hook(self._on_hidden_output))
        elif not callable(hidden):
            raise TypeError(f"hidden must be a dotted module name or a callable on the model "
                            f"output; got {type(hidden).__name__}")
        try:
            if dim is None and target is not None:
                dim = infer_dim(target, layout)
            if dim is None:
                if example_input is None:
                    raise ValueError(
                        f"cannot tell the hidden size D of {hidden!r} from the module alone; pass "
                        f"dim=<D> or example_input=<a batch> to wrap()")
                dim = self._dim_from_example(example_input)
        except BaseException:
            self.unwrap()  # leave the user's module without our hook
            raise
        cfg = (config or MADClusterConfig()).replace(**overrides)
        self.head = MADClusterHead(int(dim), cfg)
        self.register_buffer("score_stats", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        self.register_buffer("score_stats_fitted", torch.tensor(False))

    # ---- capture ------------------------------------------------------------------------
    def _store(self, h: Tensor) -> None:
        if self._hidden is not None and self.capture == "first":
            return
        self._hidden = h
        self._head_out = None

    def _on_hidden_output(self, module: nn.Module, args: Any, output: Any) -> None:
        self._store(to_btd(select_output(output, self.select), self.layout))

    def _reset_capture(self) -> None:
        self._hidden = None
        self._head_out = None

    @torch.no_grad()
    def _dim_from_example(self, example_input: Any) -> int:
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            self._run_backbone(example_input)
        finally:
            self.backbone.train(was_training)
        if self._hidden is None:
            raise RuntimeError(f"the module {self.hidden_spec!r} did not run in the example forward")
        dim = int(self._hidden.shape[-1])
        self._reset_capture()
        return dim

    def _run_backbone(self, *args: Any, **kwargs: Any) -> Any:
        self._reset_capture()
        out = self.backbone(*args, **kwargs)
        if not isinstance(self.hidden_spec, str):
            self._hidden = None
            self._store(to_btd(select_output(self.hidden_spec(out), self.select), self.layout))
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the backbone and capture its hidden state; returns exactly the backbone's output."""
        return self._run_backbone(*args, **kwargs)

    # ---- head ---------------------------------------------------------------------------
    @property
    def hidden(self) -> Tensor:
        """The hidden state ``[B, T, D]`` captured in the last forward."""
        if self._hidden is None:
            raise RuntimeError(
                "no hidden state captured yet: call model(x) before madcluster_loss()/head_score() "
                f"(and check that {self.hidden_spec!r} runs in the backbone's forward)")
        return self._hidden

    def head_output(self) -> HeadOutput:
        """The head's per-element quantities for the last forward (computed once per forward)."""
        if self._head_out is None:
            self._head_out = self.head(self.hidden)
        return self._head_out

    def madcluster_loss(self) -> Tensor:
        """Scalar MADCluster loss (mapping + clustering, reduced) of the last forward."""
        return self.head.loss(self.head_output())

    def head_score(self) -> Tensor:
        """Per-point head score ``[B, T']`` of the last forward (``T' = 1`` for layout BD)."""
        return self.head.score(self.head_output())

    @property
    def threshold(self) -> float:
        """The current nu as a float."""
        return float(self.head.threshold.detach())

    @torch.no_grad()
    def fit_score_normalizer(self, head_scores: Tensor, base_scores: Tensor | None = None) -> None:
        """Fit mean and standard deviation of the head (and base) scores on *training* data;
        ``anomaly_score(combine="sum")`` adds the scores standardised with them."""
        stats = [*_mean_std(head_scores)]
        stats += [*_mean_std(base_scores)] if base_scores is not None else [0.0, 1.0]
        self.score_stats.copy_(torch.tensor(stats, dtype=self.score_stats.dtype))
        self.score_stats_fitted.fill_(True)

    def anomaly_score(self, base_score: Tensor | None = None, combine: str = "sum") -> Tensor:
        """Per-point anomaly score ``[B, T]`` of the last forward.

        ``sum``: standardised head + standardised base score (statistics from
        :meth:`fit_score_normalizer`); ``product``: base x head, as the released code;
        ``head`` / ``base``: one of them alone. Without ``base_score`` the head score is returned.
        """
        if combine not in COMBINES:
            raise ValueError(f"combine={combine!r}; expected one of {COMBINES}")
        if combine == "base":
            if base_score is None:
                raise ValueError("combine='base' needs base_score=<the backbone's own score>")
            return base_score
        head = self.head_score()
        if base_score is None or combine == "head":
            if base_score is not None:
                return head.expand_as(base_score) if head.shape != base_score.shape else head
            return head
        if base_score.dim() != 2 or base_score.shape[0] != head.shape[0] or head.shape[1] not in (1, base_score.shape[1]):
            raise ValueError(f"base_score must be [B, T] matching the head score {tuple(head.shape)} "
                             f"(or [B, T] with the head's T' = 1); got {tuple(base_score.shape)}")
        head = head.expand_as(base_score).to(base_score.dtype)
        if combine == "product":
            return base_score * head
        if not bool(self.score_stats_fitted):
            raise RuntimeError("combine='sum' needs score statistics from training data: call "
                               "fit_score_normalizer(head_scores, base_scores) after training "
                               "(adapters do it with Adapter.fit_score_normalizer)")
        mu_h, sd_h, mu_b, sd_b = self.score_stats.tolist()
        return (head - mu_h) / sd_h + (base_score - mu_b) / sd_b

    # ---- optimisation -------------------------------------------------------------------
    def head_parameter_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer groups for the head alone (nu without weight decay)."""
        return self.head.parameter_groups(lr, weight_decay)

    def parameter_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer groups for the whole model: backbone and centres with ``weight_decay``,
        nu without (any torch optimizer accepts them)."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        groups = self.head_parameter_groups(lr, weight_decay)
        groups[0] = {**groups[0], "params": backbone + list(groups[0]["params"])}
        return groups

    def after_optimizer_step(self) -> None:
        """Keep nu inside ``(eps, 1 - eps)``; call after each optimizer step."""
        self.head.clamp_threshold_()

    @torch.no_grad()
    def initialize_centers(self, batches: Iterable[Any], max_points: int = 100_000) -> None:
        """Initialise the centres from hidden states of training batches (``center_init="data"``)."""
        was_training = self.training
        self.eval()
        hs, n = [], 0
        for batch in batches:
            self(batch)
            h = self.hidden.reshape(-1, self.head.dim)
            hs.append(h)
            n += h.shape[0]
            if n >= max_points:
                break
        self.train(was_training)
        if not hs:
            raise ValueError("initialize_centers() got no batches")
        self.head.initialize_centers(torch.cat(hs)[:max_points])

    # ---- lifecycle ----------------------------------------------------------------------
    def unwrap(self) -> nn.Module:
        """Remove the hook and return the backbone, unchanged."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._reset_capture()
        return self.backbone

    def wrap_options(self) -> dict[str, Any]:
        if not isinstance(self.hidden_spec, str):
            hidden = None
        else:
            hidden = self.hidden_spec
        return {"hidden": hidden, "layout": self.layout, "select": self.select,
                "capture": self.capture, "dim": self.head.dim}

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the head's weights and a JSON config (PEFT style) into ``directory``.

        The backbone is not saved: re-attach with :meth:`from_pretrained`. Files are written
        to temporary names first and renamed, so an interrupted save leaves no half files.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"format": "madcluster-plugin/1", "wrap": self.wrap_options(),
                "config": json.loads(self.head.config.to_json())}
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}
        atomic_write(out / HEAD_WEIGHTS, lambda f: torch.save(state, f))
        atomic_write(out / HEAD_CONFIG, lambda f: f.write(json.dumps(meta, indent=2).encode()))
        return out

    @classmethod
    def from_pretrained(cls, backbone: nn.Module, directory: str | os.PathLike,
                        hidden: HiddenSpec | None = None, map_location: Any = "cpu") -> "MADClusterModel":
        """Re-attach a head saved with :meth:`save_pretrained` to ``backbone``."""
        path = Path(directory)
        for name in (HEAD_CONFIG, HEAD_WEIGHTS):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} not found; expected the files written by "
                                        f"save_pretrained(): {HEAD_CONFIG}, {HEAD_WEIGHTS}")
        meta = json.loads((path / HEAD_CONFIG).read_text())
        opts = dict(meta["wrap"])
        if hidden is not None:
            opts["hidden"] = hidden
        if opts["hidden"] is None:
            raise ValueError("this head was attached through a callable; pass hidden=<the same callable>")
        model = cls(backbone, opts.pop("hidden"), config=MADClusterConfig.from_dict(meta["config"]), **opts)
        state = torch.load(path / HEAD_WEIGHTS, map_location=map_location, weights_only=True)
        missing = set(model.state_dict()) - set(state)
        missing = {k for k in missing if not k.startswith("backbone.")}
        if missing:
            raise KeyError(f"{path / HEAD_WEIGHTS} lacks {sorted(missing)}")
        model.load_state_dict(state, strict=False)
        return model

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_hidden"] = None
        state["_head_out"] = None
        return state


def _mean_std(x: Tensor) -> tuple[float, float]:
    x = x.detach().double().flatten()
    if x.numel() == 0 or not bool(torch.isfinite(x).all()):
        raise ValueError("score statistics need a non-empty, finite set of training scores")
    std = float(x.std(unbiased=False)) if x.numel() > 1 else 0.0
    return float(x.mean()), max(std, _SCORE_STD_FLOOR)


def wrap(model: nn.Module, hidden: HiddenSpec, *, dim: int | None = None, example_input: Any = None,
         layout: str = "BTD", select: Any = None, capture: str = "first",
         config: MADClusterConfig | None = None, **overrides: Any) -> MADClusterModel:
    """Attach a MADCluster head to ``model``'s hidden state.

    hidden:  dotted submodule name (``"encoder.rnn"``; DDP ``module.`` and torch.compile
             ``_orig_mod.`` prefixes are ignored) or a callable mapping the model output to the
             hidden tensor.
    dim:     the hidden size D; inferred from Linear/RNN/conv/norm modules, else give it or an
             ``example_input`` (one forward is run to read it).
    layout:  BTD | BDT | BD (-> [B,1,D]) | BCHW (-> [B,H*W,C]) | BCHW_seq (-> [B,C,H*W]).
    select:  index or key picking the hidden tensor out of a tuple/list/dict output.
    capture: "first" or "last" call of the module within one forward.
    config / overrides: :class:`MADClusterConfig` fields.
    """
    return MADClusterModel(model, hidden, dim=dim, example_input=example_input, layout=layout,
                           select=select, capture=capture, config=config, **overrides)


def madcluster(hidden: HiddenSpec, **wrap_kwargs: Any) -> Callable[[type], type]:
    """Class decorator: instances of the decorated detector class come wrapped.

    ``@madcluster(hidden="encoder")`` on ``class Det(nn.Module)`` makes ``Det(...)`` build the
    plain detector and return it wrapped (``isinstance(obj, Det)`` holds; ``Det.plain`` is the
    undecorated class).
    """
    def decorate(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError("@madcluster decorates nn.Module subclasses")

        def __init__(self: MADClusterModel, *args: Any, **kwargs: Any) -> None:
            MADClusterModel.__init__(self, cls(*args, **kwargs), hidden, **wrap_kwargs)

        return type(cls.__name__, (MADClusterModel,),
                    {"__init__": __init__, "plain": cls, "__doc__": cls.__doc__,
                     "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return decorate


def unwrap_model(model: nn.Module) -> nn.Module:
    """The MADClusterModel inside DDP/compile containers (or the model itself)."""
    return unwrap_container(model)

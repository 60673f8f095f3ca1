"""The adapter contract: how one baseline meets the MADCluster head.

An adapter knows three things about its baseline and nothing else: where the hidden state is
(a module name plus a layout, attached through the public :func:`madcluster_plugin.wrap`),
which optimiser phases the baseline trains with, and which phase trains the hidden state (the
head's loss joins that phase). Everything model-specific lives in the baseline itself
(``forward``, ``loss``, ``score``, ``on_fit_start``, ``on_epoch_end``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from madcluster_plugin import MADClusterModel, unwrap_model, wrap

COMBINES = ("product", "sum", "head", "base")
GRAD_SYNCS = ("ddp", "manual")


def check_build_overrides(cls: type, overrides: dict[str, Any], fixed: tuple[str, ...] = ()) -> None:
    """Raise a ValueError naming unknown ``build()`` overrides of ``cls`` and the accepted ones."""
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self",) + fixed]
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} build overrides {unknown}; accepted: {accepted}")


def backbone_of(model: nn.Module) -> nn.Module:
    """The plain baseline inside ``model`` (itself when ``model`` is not wrapped); sees through
    DDP / DataParallel / ``torch.compile`` containers."""
    inner = unwrap_model(model)
    return inner.backbone if isinstance(inner, MADClusterModel) else inner


def is_wrapped(model: nn.Module) -> bool:
    """True when ``model`` (or the module inside its DDP / compile container) carries the head."""
    return isinstance(unwrap_model(model), MADClusterModel)


@dataclass(frozen=True)
class AttachPoint:
    """A named attachment point: the module, its layout, the shape it gives (for messages) and, when
    the module alone does not say it, how to read ``D`` from the backbone."""

    hidden: str
    layout: str
    shape: str
    dim: Callable[[nn.Module], int] | None = None


class Adapter:
    """Default single-phase adapter; multi-phase baselines override :meth:`train_step`.

    Subclasses set ``name``, ``hidden`` (dotted module name of the attachment point),
    ``layout``/``select``/``capture`` (how the captured output maps to ``[B, T, D]``), and
    implement :meth:`build`. ``phases`` names the optimisers (one per training phase) and
    ``head_phase`` the phase whose loss trains the hidden state.

    Under DDP (docs/distributed.md) ``train_step`` receives either a DDP container (its forward
    all-reduces the backbone's gradients; :func:`backbone_of` / :func:`is_wrapped` see through
    it and the head's own methods are reached through it) or, for :attr:`gradient_sync`
    ``"manual"``, the plain model whose optimisers average every gradient right before they
    step. Scoring and validation always run on the module inside the container.
    """

    name: ClassVar[str] = ""
    hidden: ClassVar[str] = ""
    layout: ClassVar[str] = "BTD"
    select: ClassVar[Any] = None
    capture: ClassVar[str] = "first"
    phases: ClassVar[tuple[str, ...]] = ("main",)
    head_phase: ClassVar[str] = "main"
    weight_decay: ClassVar[float] = 0.0
    #: clip the global gradient norm of all optimised parameters (head included) before stepping
    grad_clip_norm: ClassVar[float | None] = None
    #: how gradients are averaged over ranks under DDP: ``"ddp"`` (the model is wrapped in
    #: DistributedDataParallel; needs one backward per forward and a gradient for every
    #: backbone parameter in it), ``"manual"`` (no DDP container; each phase's optimiser averages
    #: its gradients before stepping) or ``None``: ``"manual"`` when a subclass overrides
    #: :meth:`train_step` (several phases, several backward passes), else ``"ddp"``.
    grad_sync: ClassVar[str | None] = None
    #: named alternatives to ``hidden`` (``wrap(model, attach=name)``); empty: one attachment point
    attach_points: ClassVar[dict[str, AttachPoint]] = {}
    #: the name in :attr:`attach_points` used when ``wrap()`` gets neither ``attach`` nor ``hidden``
    default_attach: str | None = None

    # ---- construction -------------------------------------------------------------------
    def build(self, n_channels: int, window: int = 100, **overrides: Any) -> nn.Module:
        raise NotImplementedError

    def check_attach(self, model: nn.Module, attach: str) -> None:
        """Raise a ValueError when ``model`` cannot give the attachment point ``attach``."""

    def wrap(self, model: nn.Module, attach: str | None = None, **madcluster_overrides: Any) -> MADClusterModel:
        """Attach the head through the public ``wrap()``: at ``hidden`` if given, else at the named
        point ``attach`` (:attr:`attach_points`; default :attr:`default_attach`), else at
        :attr:`hidden`. A named point (also one given by its module name) supplies its layout and D."""
        point = None
        if self.attach_points:
            if attach is not None and "hidden" in madcluster_overrides:
                raise ValueError("pass either attach= or hidden= to wrap(), not both")
            if "hidden" in madcluster_overrides:
                point = next((p for p in self.attach_points.values()
                              if p.hidden == madcluster_overrides["hidden"]), None)
            else:
                attach = attach if attach is not None else self.default_attach
                if attach not in self.attach_points:
                    choices = ", ".join(f"{k!r} ({p.shape})" for k, p in self.attach_points.items())
                    raise ValueError(f"attach={attach!r} is not a {self.name} attachment point; choose "
                                     f"one of {choices}, or pass hidden=<module name>")
                self.check_attach(model, attach)
                point = self.attach_points[attach]
                madcluster_overrides["hidden"] = point.hidden
        elif attach is not None:
            raise ValueError(f"{self.name} has one attachment point ({self.hidden!r}); pass hidden="
                             f"<module name> to attach elsewhere")
        if point is not None:
            madcluster_overrides.setdefault("layout", point.layout)
            if point.dim is not None:
                madcluster_overrides.setdefault("dim", point.dim(backbone_of(model)))
        opts: dict[str, Any] = dict(hidden=self.hidden, layout=self.layout, select=self.select,
                                    capture=self.capture)
        for key in ("hidden", "layout", "select", "capture"):
            if key in madcluster_overrides:
                opts[key] = madcluster_overrides.pop(key)
        return wrap(model, **opts, **madcluster_overrides)

    # ---- optimisation -------------------------------------------------------------------
    @property
    def gradient_sync(self) -> str:
        """``"ddp"`` or ``"manual"``: how the benchmark runner averages gradients over ranks."""
        if self.grad_sync is not None:
            if self.grad_sync not in GRAD_SYNCS:
                raise ValueError(f"{type(self).__name__}.grad_sync={self.grad_sync!r}; expected one "
                                 f"of {GRAD_SYNCS} or None")
            return self.grad_sync
        return "manual" if type(self).train_step is not Adapter.train_step else "ddp"

    def phase_parameters(self, backbone: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Backbone parameters per phase; default: one phase holding all of them."""
        return {self.phases[0]: [p for p in backbone.parameters() if p.requires_grad]}

    def optimizers(self, model: nn.Module, lr: float) -> dict[str, torch.optim.Optimizer]:
        """One Adam per phase; the head joins ``head_phase`` with nu free of weight decay."""
        inner = unwrap_model(model)
        per_phase = self.phase_parameters(backbone_of(inner))
        opts: dict[str, torch.optim.Optimizer] = {}
        for phase, params in per_phase.items():
            groups: list[dict[str, Any]] = [
                {"params": params, "weight_decay": self.weight_decay}
            ]
            if is_wrapped(inner) and phase == self.head_phase:
                groups += inner.head_parameter_groups(lr, self.weight_decay)
            opts[phase] = torch.optim.Adam(groups, lr=lr)
        return opts

    def base_loss(self, model: nn.Module, x: Tensor, epoch: int) -> tuple[Any, dict[str, Tensor]]:
        out = model(x)
        return out, backbone_of(model).loss(x, out, epoch)

    def train_step(self, model: nn.Module, x: Tensor, optimizers: dict[str, torch.optim.Optimizer],
                   epoch: int) -> dict[str, float]:
        """One single-phase step: sum of the baseline's terms (+ the head's loss when wrapped).

        ``model`` may be a DDP container: the forward goes through it (so the backward
        all-reduces the backbone's gradients), the head's loss is read from the module inside.
        """
        model.train()
        inner = unwrap_model(model)
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        _, terms = self.base_loss(model, x, epoch)
        total = sum(terms.values())
        logs = {k: float(v.detach()) for k, v in terms.items()}
        if is_wrapped(inner):
            head_loss = inner.madcluster_loss()
            total = total + head_loss
            logs["madcluster"] = float(head_loss.detach())
        total.backward()
        if self.grad_clip_norm is not None:
            params = [p for opt in optimizers.values() for g in opt.param_groups for p in g["params"]]
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm))
        for opt in optimizers.values():
            opt.step()
        if is_wrapped(inner):
            inner.after_optimizer_step()
        logs["total"] = float(total.detach())
        return logs

    @torch.no_grad()
    def validation_loss(self, model: nn.Module, x: Tensor, epoch: int = 0) -> float:
        """The quantity model selection minimises: all baseline terms plus the head loss.

        Runs on the module inside a DDP container (an evaluation forward is not a collective).
        """
        model = unwrap_model(model)
        _, terms = self.base_loss(model, x, epoch)
        total = sum(float(v) for v in terms.values())
        if is_wrapped(model):
            total += float(model.madcluster_loss())
        return total

    # ---- scoring ------------------------------------------------------------------------
    @torch.no_grad()
    def fit_score_normalizer(self, model: nn.Module, batches: Any) -> None:
        """Fit the statistics of ``combine="sum"`` on training windows (never on test data).

        ``batches`` is an iterable of ``[B, T, C]`` tensors. No-op for a plain model. Under
        ``torch.distributed`` every rank must call it: ``batches`` is this rank's share (it may
        be empty) and the statistics are those of all ranks' scores together (ranks passing the
        same windows leave them unchanged: duplicates do not move a mean or a standard deviation).
        """
        if not is_wrapped(model):
            return
        from madcluster_plugin.train import all_gather_rows

        model = unwrap_model(model)
        was_training = model.training
        model.eval()
        base_scores, head_scores = [], []
        for x in batches:
            out = model(x)
            base_scores.append(backbone_of(model).score(x, out).flatten())
            head_scores.append(model.head_score().flatten())
        model.train(was_training)
        head = all_gather_rows(torch.cat(head_scores) if head_scores else None)
        base = all_gather_rows(torch.cat(base_scores) if base_scores else None)
        if head is None or base is None:
            raise ValueError("fit_score_normalizer got no training windows; pass a non-empty "
                             "iterable of [B, T, C] tensors")
        model.fit_score_normalizer(head, base)

    @torch.no_grad()
    def score(self, model: nn.Module, x: Tensor, combine: str = "sum") -> Tensor:
        """Per-point anomaly score ``[B, T]`` (higher = more anomalous)."""
        if combine not in COMBINES:
            raise ValueError(f"combine={combine!r}; expected one of {COMBINES}")
        model = unwrap_model(model)
        out = model(x)
        base = backbone_of(model).score(x, out)
        if not is_wrapped(model):
            if combine != "base":
                raise ValueError(
                    f"combine={combine!r} needs a MADCluster-wrapped model; a plain "
                    f"{self.name} model only has combine='base'")
            return base
        return model.anomaly_score(base_score=base, combine=combine)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, hidden={self.hidden!r}, layout={self.layout!r})"

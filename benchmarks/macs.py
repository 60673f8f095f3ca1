"""MAC counters for the overhead benchmark (ECOSYSTEM.md section 2, BASELINES.md section 0.1).

Three counts, because no single counter tells the whole story:

* :func:`count_macs` runs one forward under :class:`torch.utils.flop_counter.FlopCounterMode`,
  on the ``meta`` device by default (ECOSYSTEM.md section 2.4: exact on einsum attention,
  ``nn.TransformerEncoder``, GRU, LSTM and MLPs there, because composite ops decompose into
  mm/bmm/conv). It counts matrix-class ops only (mm, addmm, bmm, baddbmm, convolution, SDPA), so
  ``MACs = FLOPs / 2`` exactly. Models that cannot run on ``meta`` (``.item()``, numpy in
  ``forward``) fall back to the CPU with oneDNN off and the math SDPA kernel, the two settings
  under which the CPU count was measured exact (ECOSYSTEM.md section 2.2).
* The same forward also feeds :class:`ModuleHookCounter`, a module-hook counter in the style
  of thop/ptflops (our own code and conventions, listed on the class). It sees only registered
  module types and no functional matmul (einsum attention is invisible to it), which is how the
  MADCluster appendix Table 2 was counted (BASELINES.md section 0.1: AnomalyTransformer
  reproduces within 0.12% this way).
* :func:`head_macs_analytic` derives the head's own MACs from its equations, because a
  cosine similarity and a squared distance written elementwise count 0 under both counters
  (ECOSYSTEM.md section 2.3).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "MacCount", "ModuleHookCounter", "count_macs", "head_macs_analytic", "flop_counter_macs",
    "hook_macs",
]

Runner = Callable[[nn.Module, Tensor], Any]


def _forward(model: nn.Module, x: Tensor) -> Any:
    return model(x)


# ---------------------------------------------------------------------------------------------
# module-hook counter
# ---------------------------------------------------------------------------------------------
_NORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TCONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_RNN_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}
# elementwise products inside one cell step, per hidden unit: GRU r*(W_hn h), (1-z)*n, z*h;
# LSTM f*c, i*g, o*tanh(c); plain RNN none.
_RNN_HADAMARD = {"RNN_TANH": 0, "RNN_RELU": 0, "LSTM": 3, "GRU": 3}
_CELL_MODE = {nn.RNNCell: "RNN_TANH", nn.LSTMCell: "LSTM", nn.GRUCell: "GRU"}


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any], names: Sequence[str] = ()) -> Tensor | None:
    for a in args:
        if isinstance(a, Tensor):
            return a
        if isinstance(a, nn.utils.rnn.PackedSequence):
            return a.data
    for n in names:
        v = kwargs.get(n)
        if isinstance(v, Tensor):
            return v
        if isinstance(v, nn.utils.rnn.PackedSequence):
            return v.data
    return None


def _first_output(out: Any) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


def _rnn_macs(mode: str, tokens: int, input_size: int, hidden: int, layers: int,
              directions: int, proj: int = 0) -> int:
    """MACs of a multi-layer RNN/GRU/LSTM over ``tokens`` = steps x batch input vectors."""
    gates = _RNN_GATES[mode]
    out_h = proj if proj else hidden
    total = 0
    for layer in range(layers):
        in_l = input_size if layer == 0 else out_h * directions
        per_step = gates * hidden * (in_l + out_h) + _RNN_HADAMARD[mode] * hidden
        if proj:
            per_step += hidden * proj
        total += directions * tokens * per_step
    return total


class ModuleHookCounter:
    """Module-hook MAC counter in the style of thop/ptflops (our own conventions).

    Counted, per call of a module (bias additions and activations are never counted):

    * ``Linear``: ``in_features`` MACs per output element;
    * ``Conv{1,2,3}d``: ``in_channels / groups * prod(kernel)`` MACs per output element;
    * ``ConvTranspose{1,2,3}d``: ``out_channels / groups * prod(kernel)`` MACs per input element;
    * ``RNN``/``GRU``/``LSTM`` (and their ``*Cell``): per step, layer and direction,
      ``gates * H * (input + H)`` for the gate matmuls plus one MAC per elementwise gate
      product (3 H for GRU and LSTM), plus ``H * proj`` for an LSTM projection;
    * norm layers (BatchNorm, LayerNorm, GroupNorm, InstanceNorm): one MAC per element to
      normalise, one more per element when the layer is affine;
    * ``MultiheadAttention``: its four projections only (it calls them functionally).

    Functional ``matmul``/``einsum``/``bmm`` are invisible by design: that is the convention of the
    paper's table, where attention products were not counted (BASELINES.md section 0.1).
    """

    def __init__(self) -> None:
        self.by_type: dict[str, int] = {}
        self._handles: list[Any] = []

    @property
    def total(self) -> int:
        return int(sum(self.by_type.values()))

    def _add(self, module: nn.Module, macs: int) -> None:
        key = type(module).__name__
        self.by_type[key] = self.by_type.get(key, 0) + int(macs)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        x = _first_tensor(args, kwargs, ("input", "query", "x"))
        y = _first_output(out)
        if x is None:
            return
        if isinstance(module, nn.Linear) and y is not None:
            self._add(module, module.in_features * y.numel())
        elif isinstance(module, _CONVS) and y is not None:
            k = math.prod(module.kernel_size)
            self._add(module, y.numel() * (module.in_channels // module.groups) * k)
        elif isinstance(module, _TCONVS):
            k = math.prod(module.kernel_size)
            self._add(module, x.numel() * (module.out_channels // module.groups) * k)
        elif isinstance(module, nn.RNNBase):
            tokens = x.numel() // module.input_size
            proj = getattr(module, "proj_size", 0) or 0
            self._add(module, _rnn_macs(module.mode, tokens, module.input_size, module.hidden_size,
                                        module.num_layers, 2 if module.bidirectional else 1, proj))
        elif isinstance(module, nn.RNNCellBase):
            tokens = x.numel() // module.input_size
            mode = next(m for cls, m in _CELL_MODE.items() if isinstance(module, cls))
            self._add(module, _rnn_macs(mode, tokens, module.input_size, module.hidden_size, 1, 1))
        elif isinstance(module, _NORMS):
            affine = bool(getattr(module, "affine", False) or getattr(module, "elementwise_affine", False))
            self._add(module, x.numel() * (2 if affine else 1))
        elif isinstance(module, nn.MultiheadAttention):
            query = x
            key = args[1] if len(args) > 1 else kwargs.get("key", query)
            value = args[2] if len(args) > 2 else kwargs.get("value", key)
            e = module.embed_dim
            n_q = query.numel() // e
            macs = n_q * e * e * 2  # q projection and output projection
            macs += (key.numel() // module.kdim) * module.kdim * e
            macs += (value.numel() // module.vdim) * module.vdim * e
            self._add(module, macs)

    @contextlib.contextmanager
    def attach(self, model: nn.Module) -> Iterator[ModuleHookCounter]:
        """Hook every counted module of ``model`` for the duration of the ``with`` block."""
        counted = (nn.Linear, nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention) + _CONVS + _TCONVS + _NORMS
        try:
            for m in model.modules():
                if isinstance(m, counted):
                    self._handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()


# ---------------------------------------------------------------------------------------------
# FlopCounterMode on meta (with CPU fallback)
# ---------------------------------------------------------------------------------------------
@dataclass
class MacCount:
    """MACs of one forward: FlopCounterMode total, module-hook total, where it ran and why."""

    macs: int                      # FlopCounterMode FLOPs / 2 (matrix-class ops only)
    hook_macs: int                 # ModuleHookCounter total (paper-style convention)
    device: str                    # "meta" or "cpu"
    note: str = ""                 # why a fallback happened, if it did
    by_module: dict[str, int] = field(default_factory=dict)   # FlopCounterMode, depth-1 children
    hook_by_type: dict[str, int] = field(default_factory=dict)


def _cpu_exact_context() -> contextlib.ExitStack:
    """oneDNN off (LSTM decomposes) and the math SDPA kernel (attention decomposes to bmm)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", message=".*oneDNN.*")  # torch's TF32-on-Intel-GPU notice
    stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
    stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def _depth1(counts: dict[str, dict[Any, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, ops in counts.items():
        if name.count(".") == 1:  # "Root.child"
            out[name.split(".", 1)[1]] = int(sum(ops.values())) // 2
    return out


def _count_on(model: nn.Module, x: Tensor, run: Runner) -> tuple[int, int, dict[str, int], dict[str, int]]:
    hooks = ModuleHookCounter()
    fc = FlopCounterMode(display=False, depth=2)
    with torch.no_grad(), hooks.attach(model), fc:
        run(model, x)
    return fc.get_total_flops() // 2, hooks.total, _depth1(fc.get_flop_counts()), dict(hooks.by_type)


def _count_meta(model: nn.Module | Callable[[], nn.Module], shape: tuple[int, ...], run: Runner,
                dtype: torch.dtype, scoped: bool) -> tuple[int, int, dict[str, int], dict[str, int]]:
    """One meta count; ``scoped``: also run the forward under ``torch.device("meta")``."""
    ctx = torch.device("meta") if scoped else contextlib.nullcontext()
    if isinstance(model, nn.Module):
        with ctx:
            return _count_module_meta(model, shape, run, dtype)
    with torch.device("meta"):
        m = model()
    m.eval()
    with ctx:
        return _count_on(m, torch.empty(shape, dtype=dtype, device="meta"), run)


def count_macs(model: nn.Module | Callable[[], nn.Module], input_shape: Sequence[int], *,
               run: Runner | None = None, device: str = "meta",
               dtype: torch.dtype = torch.float32) -> MacCount:
    """MACs of one forward of ``model`` on an input of ``input_shape`` (e.g. ``(1, 100, 55)``).

    ``model`` is either a module or a zero-argument factory. A factory is built under
    ``torch.device("meta")`` (no memory, no init cost) and run on a meta input, first outside
    and, if that fails, inside the meta device context; a module is run with its parameters and
    buffers temporarily swapped for meta tensors (put back afterwards), so the module, and any
    forward hooks on it, are left as they were. ``run(model, x)`` performs what is counted
    (default ``model(x)``; e.g. also ``model.head_score()`` for a wrapped model). The model is
    put in eval mode for the count and its previous mode restored. If the meta run fails,
    the count is repeated on the CPU (see the module docstring) and ``note`` says why.
    """
    if device not in ("meta", "cpu"):
        raise ValueError(f"device={device!r}; MACs are counted on 'meta' (default) or 'cpu'")
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"input_shape={input_shape!r} must be a non-empty shape of positive sizes, "
                         "e.g. (1, 100, 55) for [batch, window, channels]")
    run = run or _forward
    note = ""
    if device == "meta":
        # First the forward outside any device context (tensors made in forward follow their
        # inputs, and process-wide caches filled there stay on the CPU); then, for forwards
        # that create tensors without a device, the whole run under torch.device("meta").
        errors = []
        for scoped in (False, True):
            try:
                res = _count_meta(model, shape, run, dtype, scoped)
                return MacCount(res[0], res[1], "meta", "", res[2], res[3])
            except Exception as err:  # noqa: BLE001 - any failure on meta means: try the next way
                errors.append(f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}")
        note = f"meta forward failed ({errors[-1]}); counted on CPU"
    m = model if isinstance(model, nn.Module) else model()
    was_training = m.training
    m.eval()
    try:
        params = next(m.parameters(), None)
        if params is not None and params.device.type != "cpu":
            raise ValueError(f"count_macs on the CPU needs a CPU model; got parameters on {params.device}")
        gen = torch.Generator().manual_seed(0)
        with _cpu_exact_context():
            res = _count_on(m, torch.rand(shape, dtype=dtype, generator=gen), run)
    finally:
        m.train(was_training)
    return MacCount(res[0], res[1], "cpu", note, res[2], res[3])


def _count_module_meta(model: nn.Module, shape: tuple[int, ...], run: Runner,
                       dtype: torch.dtype) -> tuple[int, int, dict[str, int], dict[str, int]]:
    """Count ``model`` with its parameters/buffers swapped for meta tensors (model unchanged)."""
    was_training = model.training
    model.eval()
    try:
        with _meta_state(model):
            return _count_on(model, torch.empty(shape, dtype=dtype, device="meta"), run)
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _meta_state(model: nn.Module) -> Iterator[None]:
    """Temporarily replace every parameter and buffer of ``model`` by a meta tensor.

    Unlike ``torch.func.functional_call``, which swaps for one ``forward`` call only, the swap
    spans the whole runner (``model(x)`` then ``model.head_score()``, say). Shared parameters
    stay shared; the originals are put back on exit, even on error.
    """
    replacement: dict[int, Tensor] = {}
    saved: list[tuple[dict[str, Any], str, Any]] = []

    def meta_of(t: Tensor) -> Tensor:
        if id(t) not in replacement:
            m = torch.empty_like(t, device="meta")
            if isinstance(t, nn.Parameter):
                m = nn.Parameter(m, requires_grad=t.requires_grad)
            replacement[id(t)] = m
        return replacement[id(t)]

    try:
        for mod in model.modules():
            for store in (mod._parameters, mod._buffers):
                for name, t in list(store.items()):
                    if t is not None:
                        saved.append((store, name, t))
                        store[name] = meta_of(t)
        yield
    finally:
        for store, name, t in reversed(saved):
            store[name] = t


def flop_counter_macs(model: nn.Module | Callable[[], nn.Module], input_shape: Sequence[int], *,
                      run: Runner | None = None, device: str = "meta") -> int:
    """FlopCounterMode MACs (FLOPs / 2) of one forward; see :func:`count_macs`."""
    return count_macs(model, input_shape, run=run, device=device).macs


def hook_macs(model: nn.Module | Callable[[], nn.Module], input_shape: Sequence[int], *,
              run: Runner | None = None, device: str = "meta") -> int:
    """Module-hook MACs (paper-style, :class:`ModuleHookCounter`) of one forward."""
    return count_macs(model, input_shape, run=run, device=device).hook_macs


# ---------------------------------------------------------------------------------------------
# the head, analytically
# ---------------------------------------------------------------------------------------------
def head_macs_analytic(batch: int, steps: int, dim: int, n_clusters: int = 1,
                       target: str = "paper") -> int:
    """MACs of the MADCluster head's forward on ``h`` of shape ``[batch, steps, dim]``.

    Cosine assignment (K = 1, METHOD.md 1.3, and the released code's target for any K): per
    point and centre the dot product <h_t/||h_t||, c_j/||c_j||> (D MACs) and the squared distance
    ||h_t - c_j||^2 of the mapping term (eq. A27; D: one multiply-accumulate per squared
    difference, the subtraction is not a MAC); per point the norm ||h_t|| and the scaling of h_t
    to unit length (2D); per forward the centre norms and their scaling (2*K*D). Total
    ``B*T*(2KD + 2D) + 2KD`` (``B*T*4D + 2D`` for K = 1).

    Student-t assignment (K > 1 with the paper's target, appendix eqs. A25-A28): only the K
    squared distances per point, ``B*T*K*D``; q, p, the KL and the score reuse them.

    The one-directed loss and score (eqs. 5-9) act on the scalar q per point and centre: O(1)
    each, no multiply-accumulate over D, so they are not counted.
    """
    for name, v in (("batch", batch), ("steps", steps), ("dim", dim), ("n_clusters", n_clusters)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    if target not in ("paper", "code"):
        raise ValueError(f"target={target!r}; expected 'paper' or 'code' (MADClusterConfig.target)")
    k = n_clusters
    if k == 1 or target == "code":
        return batch * steps * (2 * k * dim + 2 * dim) + 2 * k * dim
    return batch * steps * k * dim

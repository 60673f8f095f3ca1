"""Finding the attachment point and turning what it outputs into hidden states ``[B, T, D]``."""
from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import Tensor, nn

LAYOUTS = ("BTD", "BDT", "BD", "BCHW", "BCHW_seq")
_RANK = {"BTD": 3, "BDT": 3, "BD": 2, "BCHW": 4, "BCHW_seq": 4}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_container(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def strip_prefixes(name: str) -> str:
    """``module.encoder`` / ``_orig_mod.encoder`` -> ``encoder``."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (dotted), or a ``KeyError`` naming the closest names."""
    root = unwrap_container(model)
    modules = dict(root.named_modules())
    clean = strip_prefixes(name)
    if clean in modules:
        return modules[clean]
    suffix_hits = [n for n in modules if n and n.endswith("." + clean)]
    if len(suffix_hits) == 1:
        return modules[suffix_hits[0]]
    candidates = [n for n in modules if n]
    close = difflib.get_close_matches(clean, candidates, n=5, cutoff=0.4)
    if len(suffix_hits) > 1:
        raise KeyError(f"hidden={name!r} is ambiguous; it ends {len(suffix_hits)} module names: "
                       f"{suffix_hits[:5]}. Pass the full dotted name.")
    hint = f" Closest names: {', '.join(close)}." if close else ""
    raise KeyError(f"no submodule named {name!r} in {type(root).__name__}.{hint} "
                   f"(all names: model.named_modules())")


def select_output(output: Any, select: Any) -> Tensor:
    """Pick the hidden tensor from a module output: tuples/lists by index, dicts by key,
    dataclass-like objects by attribute; a bare tensor passes through."""
    picked = output
    if select is not None:
        if isinstance(picked, dict):
            if select not in picked:
                raise KeyError(f"select={select!r} not in the output dict; keys: {list(picked)}")
            picked = picked[select]
        elif isinstance(picked, (tuple, list)):
            if not isinstance(select, int) or not -len(picked) <= select < len(picked):
                raise IndexError(f"select={select!r} does not index an output of length {len(picked)}")
            picked = picked[select]
        elif isinstance(select, str) and hasattr(picked, select):
            picked = getattr(picked, select)
        else:
            raise TypeError(f"select={select!r} cannot pick from an output of type {type(picked).__name__}")
    elif isinstance(picked, (tuple, list)):
        # nn.GRU/LSTM return (output, h_n): the sequence output comes first.
        picked = picked[0]
    if not isinstance(picked, Tensor):
        raise TypeError(f"the captured output is a {type(picked).__name__}, not a tensor; "
                        f"pass select= to pick the hidden tensor from it")
    return picked


def to_btd(z: Tensor, layout: str) -> Tensor:
    """Reshape a captured tensor to ``[B, T, D]`` according to ``layout``.

    BTD as is; BDT transposed; BD -> ``[B, 1, D]``; BCHW -> ``[B, H*W, C]`` (each spatial
    position is a point); BCHW_seq -> ``[B, C, H*W]`` (each channel is a point, appendix D).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {LAYOUTS}")
    if z.dim() != _RANK[layout]:
        raise ValueError(
            f"layout={layout!r} expects a {_RANK[layout]}-D tensor; the hidden module gave shape "
            f"{tuple(z.shape)}. Pick the layout that matches it ({_suggest(z)}) or a different select=")
    if layout == "BTD":
        return z
    if layout == "BDT":
        return z.transpose(1, 2)
    if layout == "BD":
        return z.unsqueeze(1)
    if layout == "BCHW":
        return z.flatten(2).transpose(1, 2)
    return z.flatten(2)


def _suggest(z: Tensor) -> str:
    return {2: "BD", 3: "BTD or BDT", 4: "BCHW or BCHW_seq"}.get(z.dim(), "none fits this rank")


def infer_dim(module: nn.Module, layout: str) -> int | None:
    """D from the module's own shape when it is unambiguous (Linear, RNNs, convs, norms)."""
    if layout == "BCHW_seq":
        return None
    if isinstance(module, nn.Linear):
        return module.out_features if layout in ("BTD", "BD") else None
    if isinstance(module, (nn.GRU, nn.LSTM, nn.RNN)):
        if not module.batch_first or layout != "BTD":
            return None
        size = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
        return size * (2 if module.bidirectional else 1)
    if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
        return module.out_channels if layout == "BDT" else None
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        return module.out_channels if layout == "BCHW" else None
    if isinstance(module, nn.LayerNorm) and layout in ("BTD", "BD"):
        return int(module.normalized_shape[-1])
    if isinstance(module, nn.Embedding) and layout == "BTD":
        return module.embedding_dim
    return None


@torch.no_grad()
def example_dim(run_forward: Any) -> int:
    """D from one forward on an example input (``run_forward`` returns the captured [B,T,D])."""
    h = run_forward()
    return int(h.shape[-1])

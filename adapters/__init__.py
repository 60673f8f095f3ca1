"""Registry of baseline adapters, by name: ``adapters.get("thoc")``, ``adapters.names()``.

Modules are imported on first use, so importing the registry costs nothing.
"""
from __future__ import annotations

import difflib
import importlib

from .base import Adapter

_REGISTRY: dict[str, str] = {
    "deepsvdd": "adapters.deepsvdd:DeepSVDDAdapter",
    "usad": "adapters.usad:USADAdapter",
    "beatgan": "adapters.beatgan:BeatGANAdapter",
    "omnianomaly": "adapters.omnianomaly:OmniAnomalyAdapter",
    "thoc": "adapters.thoc:THOCAdapter",
    "anomaly_transformer": "adapters.anomaly_transformer:AnomalyTransformerAdapter",
    "dcdetector": "adapters.dcdetector:DCdetectorAdapter",
}


def names() -> list[str]:
    """All adapter names, in the paper's table order."""
    return list(_REGISTRY)


def get(name: str) -> Adapter:
    """A fresh adapter instance for ``name`` (case-insensitive; '-' and '_' equivalent)."""
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown adapter {name!r}; known: {', '.join(_REGISTRY)}.{hint}")
    module_name, cls_name = _REGISTRY[key].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls()


__all__ = ["Adapter", "get", "names"]

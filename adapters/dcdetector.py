"""DCdetector adapter: two attachment points for the MADCluster head, chosen by ``attach``.

* ``attach="query"`` (default, recommended): module ``patch_representation``, ``[B, T, d_model]``:
  per point, the query-projected patch-wise embeddings averaged over channels, up-sampled to the
  window (each patch repeated ``p`` times), averaged over patch sizes and layers (BASELINES.md
  section 7, "faithful alternative"). Why this one: it is the only per-point tensor of DCdetector
  that the DCdetector loss itself trains (the patch embeddings and the query projections are what
  its attention maps are made of), so the head shapes a representation the detector also uses,
  and the head's loss flows into the detector's own parameters. It is per point and covers every
  scale and layer; the patch-wise branch (not the in-patch one) is chosen because it is the one
  with a time axis (in-patch tokens are in-patch positions, shared by all patches).
* ``attach="x_ori"``: module ``window_embedding``, the DataEmbedding of the whole window
  ``[B, T, d_model]``: parity with the released MADCluster code, which attaches there. DCdetector's
  loss never uses that embedding (the reference only feeds it to a value projection whose output
  it discards), so with this attachment the head trains the embedding alone, and the detector's
  score and the head's score come from disjoint parameters (METHOD.md section 1.1).

Both give ``D = d_model`` (256), so wrapping adds ``D + 1`` = 257 parameters, 922,680 in all at the
released configuration (55 channels). ``adapter.wrap(model, attach="x_ori")`` or
``adapter.wrap(model, hidden="window_embedding")`` selects the parity point.

Training: one loss (``prior - series``, the stop-gradient contrastive objective) and one
optimiser, as the reference; the head's loss joins the same backward (the default
:meth:`Adapter.train_step`). The reference's lr halving per epoch is the runner's business.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from adapters.base import Adapter, AttachPoint, check_build_overrides
from baselines.dcdetector import DCdetector

ATTACH_POINTS = {
    "query": AttachPoint("patch_representation", "BTD", "[B, T, d_model], trained patch representation",
                         lambda net: net.d_model),
    "x_ori": AttachPoint("window_embedding", "BTD", "[B, T, d_model], the released code's point",
                         lambda net: net.d_model),
}


class DCdetectorAdapter(Adapter):
    """DCdetector with an optional MADCluster head on ``patch_representation`` or ``window_embedding``.

    ``DCdetectorAdapter(attach="x_ori")`` makes the parity point this adapter's default; a single
    ``wrap(..., attach=...)`` call can also choose.
    """

    name = "dcdetector"
    hidden = ATTACH_POINTS["query"].hidden
    layout = "BTD"
    select = None
    capture = "first"
    phases = ("main",)
    head_phase = "main"
    weight_decay = 0.0
    attach_points = ATTACH_POINTS

    def __init__(self, attach: str = "query") -> None:
        if attach not in ATTACH_POINTS:
            raise ValueError(f"attach={attach!r}; expected one of {sorted(ATTACH_POINTS)} "
                             f"(query: trained patch representation, x_ori: MADCluster parity)")
        self.default_attach = attach
        self.hidden = ATTACH_POINTS[attach].hidden  # instance attributes shadow the class defaults

    def build(self, n_channels: int, window: int = 100, **overrides: Any) -> nn.Module:
        """The released MADCluster configuration (patches 2/5/10, d_model 256, 1 head, 3 layers)
        unless overridden; every patch size must divide ``window``."""
        check_build_overrides(DCdetector, overrides, ("n_channels", "window"))
        if "patch_sizes" not in overrides:
            bad = [p for p in (2, 5, 10) if window % p]
            if bad:
                raise ValueError(f"the default patch sizes (2, 5, 10) must divide window={window} "
                                 f"({bad} do not); pass patch_sizes=... made of divisors of {window}")
        return DCdetector(n_channels, window=window, **overrides)

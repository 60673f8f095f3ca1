"""Named attachment points of the adapter contract (``wrap(model, attach=...)``), one rule for all."""
from __future__ import annotations

import pytest

import adapters


@pytest.mark.parametrize("name,attach,hidden,dim", [
    ("usad", "window", "encoder.layers", 20 * 10),
    ("usad", "per_step", "encoder", 10),
    ("beatgan", "latent", "generator.encoder", 16),
    ("dcdetector", "x_ori", "window_embedding", 32),
    ("dcdetector", "query", "patch_representation", 32),
])
def test_named_point_and_its_module_name_give_the_same_head(name, attach, hidden, dim):
    adapter = adapters.get(name)
    build = {"usad": dict(window=20, hidden_size=10), "beatgan": dict(nz=16, ndf=8, ngf=8),
             "dcdetector": dict(d_model=32, e_layers=1, patch_sizes=(5, 10))}[name]
    by_name = adapter.wrap(adapter.build(3, **build), attach=attach)
    by_module = adapter.wrap(adapter.build(3, **build), hidden=hidden)  # the point's layout and D follow
    for wrapped in (by_name, by_module):
        assert wrapped.hidden_spec == hidden and wrapped.head.dim == dim
    assert by_name.layout == by_module.layout == adapter.attach_points[attach].layout


def test_attach_errors_name_the_choices():
    usad = adapters.get("usad")
    model = usad.build(3, window=20, hidden_size=10)
    with pytest.raises(ValueError, match=r"'per_step' \(\[B, T, h\]\), 'window'"):
        usad.wrap(model, attach="latent")
    with pytest.raises(ValueError, match="either attach= or hidden="):
        usad.wrap(model, attach="window", hidden="encoder")
    deepsvdd = adapters.get("deepsvdd")
    with pytest.raises(ValueError, match="one attachment point.*hidden="):
        deepsvdd.wrap(deepsvdd.build(3), attach="latent")
    with pytest.raises(ValueError, match="attach="):
        adapters.get("dcdetector").__class__(attach="values")

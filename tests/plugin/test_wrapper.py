"""wrap(): drop-in behaviour, capture options, layouts, persistence and error messages."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from madcluster_plugin import MADClusterModel, madcluster, wrap
from tests.helpers import n_params


class GRUDetector(nn.Module):
    """A small reconstruction detector: GRU encoder -> linear decoder."""

    def __init__(self, c: int = 4, d: int = 12) -> None:
        super().__init__()
        self.encoder = nn.GRU(c, d, batch_first=True)
        self.proj = nn.Linear(d, d)
        self.decoder = nn.Linear(d, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.encoder(x)
        return self.decoder(torch.tanh(self.proj(h)))


class TupleDetector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> dict:
        h, aux = self.block(x)
        return {"recon": self.out(h), "aux": aux}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 8)

    def forward(self, x: torch.Tensor) -> tuple:
        h = self.lin(x)
        return h, {"energy": h.pow(2).mean(-1), "feat": h}


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 6, 3, padding=1)
        self.conv2d = nn.Conv2d(2, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)


def test_forward_bit_identical_and_parameter_delta() -> None:
    torch.manual_seed(0)
    det = GRUDetector()
    x = torch.randn(3, 10, 4)
    ref = det(x)
    for k in (1, 3):
        model = wrap(copy.deepcopy(det), hidden="proj", n_clusters=k)
        assert torch.equal(model(x), ref)
        assert n_params(model) - n_params(det) == k * 12 + 1


def test_gru_tuple_output_and_dim_inference() -> None:
    model = wrap(GRUDetector(d=7), hidden="encoder")
    assert model.head.dim == 7
    model(torch.randn(2, 5, 4))
    assert model.hidden.shape == (2, 5, 7)
    assert model.head_score().shape == (2, 5)


def test_select_from_tuple_and_dict_outputs() -> None:
    x = torch.randn(2, 6, 3)
    m1 = wrap(TupleDetector(), hidden="block", select=0, dim=8)
    m1(x)
    assert m1.hidden.shape == (2, 6, 8)
    m2 = wrap(TupleDetector(), hidden=lambda out: out["aux"]["feat"], dim=8)
    out = m2(x)
    assert set(out) == {"recon", "aux"}
    assert m2.hidden.shape == (2, 6, 8)
    with pytest.raises(ValueError, match="cannot tell the hidden size"):
        wrap(TupleDetector(), hidden="block", select=0, dim=None)
    m3 = wrap(TupleDetector(), hidden="block", select=0, example_input=x)
    assert m3.head.dim == 8


def test_layouts() -> None:
    net = ConvNet()
    m = wrap(net, hidden="conv1", layout="BDT")
    assert m.head.dim == 6
    m(torch.randn(2, 4, 9))
    assert m.hidden.shape == (2, 9, 6)
    m.unwrap()

    m = wrap(ConvNet(), hidden=lambda y: y.mean(-1), layout="BD", dim=6)
    m(torch.randn(2, 4, 9))
    assert m.hidden.shape == (2, 1, 6)
    assert m.anomaly_score(torch.zeros(2, 9), combine="product").shape == (2, 9)

    img = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU())
    m = wrap(img, hidden="0", layout="BCHW")
    assert m.head.dim == 5
    m(torch.randn(2, 2, 4, 3))
    assert m.hidden.shape == (2, 12, 5)

    img2 = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU())
    m = wrap(img2, hidden="0", layout="BCHW_seq", example_input=torch.randn(1, 2, 4, 3))
    assert m.head.dim == 12
    m(torch.randn(2, 2, 4, 3))
    assert m.hidden.shape == (2, 5, 12)
    assert m.head_score().shape == (2, 5)


def test_wrong_rank_for_layout_is_a_clear_error() -> None:
    m = wrap(GRUDetector(), hidden="proj", layout="BCHW", dim=12)
    with pytest.raises(ValueError, match="expects a 4-D tensor.*shape \\(2, 5, 12\\)"):
        m(torch.randn(2, 5, 4))


def test_unknown_module_name_suggests_closest() -> None:
    with pytest.raises(KeyError, match="Closest names: encoder"):
        wrap(GRUDetector(), hidden="encodr")


def test_loss_before_forward_is_a_clear_error() -> None:
    m = wrap(GRUDetector(), hidden="proj")
    with pytest.raises(RuntimeError, match="call model\\(x\\) before"):
        m.madcluster_loss()


def test_nan_hidden_is_a_clear_error() -> None:
    m = wrap(GRUDetector(), hidden="proj")
    x = torch.randn(2, 5, 4)
    x[0, 0, 0] = float("nan")
    m(x)
    with pytest.raises(ValueError, match="NaN/Inf"):
        m.madcluster_loss()


def test_dimension_mismatch_is_a_clear_error() -> None:
    m = wrap(GRUDetector(), hidden="proj", dim=5)
    m(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="differs from the head's D = 5"):
        m.madcluster_loss()


def test_capture_first_and_last() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.enc(self.enc(x) * 0 + 1)

    x = torch.randn(2, 4, 3)
    first = wrap(Twice(), hidden="enc", capture="first")
    last = wrap(copy.deepcopy(first.backbone), hidden="enc", capture="last")
    first(x)
    last(x)
    assert torch.allclose(first.hidden, first.backbone.enc(x))
    assert torch.allclose(last.hidden, last.backbone.enc(torch.ones_like(x)))


def test_prefixes_of_ddp_and_compile_are_ignored() -> None:
    m = wrap(GRUDetector(), hidden="module._orig_mod.proj")
    assert m.head.dim == 12


def test_decorator() -> None:
    @madcluster(hidden="proj")
    class Det(GRUDetector):
        pass

    d = Det(c=4, d=6)
    assert isinstance(d, MADClusterModel) and isinstance(d, Det)
    assert isinstance(d.backbone, Det.plain)
    d(torch.randn(1, 3, 4))
    assert d.madcluster_loss().dim() == 0


def test_anomaly_score_combinations() -> None:
    torch.manual_seed(1)
    m = wrap(GRUDetector(), hidden="proj")
    x = torch.randn(4, 6, 4)
    m(x)
    base = torch.rand(4, 6)
    head = m.head_score().detach()
    assert torch.equal(m.anomaly_score(base, "product"), base * head)
    assert torch.equal(m.anomaly_score(base, "base"), base)
    assert torch.equal(m.anomaly_score(base, "head"), head)
    with pytest.raises(RuntimeError, match="fit_score_normalizer"):
        m.anomaly_score(base, "sum")
    m.fit_score_normalizer(head, base)
    z = m.anomaly_score(base, "sum")
    expected = (head - head.mean()) / head.std(unbiased=False) + (base - base.mean()) / base.std(unbiased=False)
    assert torch.allclose(z, expected, atol=1e-5)
    with pytest.raises(ValueError, match="combine"):
        m.anomaly_score(base, "max")


def test_parameter_groups_nu_without_weight_decay() -> None:
    m = wrap(GRUDetector(), hidden="proj")
    groups = m.parameter_groups(1e-3, weight_decay=1e-5)
    nu_group = [g for g in groups if any(p is m.head.threshold_raw for p in g["params"])]
    assert len(nu_group) == 1 and nu_group[0]["weight_decay"] == 0.0
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == n_params(m)


def test_save_pretrained_and_state_dict_round_trip(tmp_path) -> None:
    torch.manual_seed(2)
    det = GRUDetector()
    m = wrap(det, hidden="proj", n_clusters=1)
    x = torch.randn(3, 7, 4)
    with torch.no_grad():
        m.head.centers.add_(0.3)
        m.head.threshold_raw.fill_(0.73)
    m.fit_score_normalizer(torch.rand(10, 7) * 3, torch.rand(10, 7))
    m.eval()
    m(x)
    base = torch.rand(3, 7)
    ref = m.anomaly_score(base, "sum").detach()
    m.save_pretrained(tmp_path)
    back = MADClusterModel.from_pretrained(copy.deepcopy(det), tmp_path).eval()
    back(x)
    assert torch.equal(back.anomaly_score(base, "sum"), ref)
    other = wrap(GRUDetector(), hidden="proj")
    other.load_state_dict(m.state_dict())
    other.eval()
    other(x)
    assert torch.equal(other.anomaly_score(base, "sum"), ref)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        MADClusterModel.from_pretrained(GRUDetector(), tmp_path / "missing")


def test_unwrap_removes_hook() -> None:
    det = GRUDetector()
    m = wrap(det, hidden="proj")
    assert m.unwrap() is det
    m(torch.randn(1, 2, 4))
    with pytest.raises(RuntimeError):
        m.madcluster_loss()
    wrap(det, hidden="proj")  # can be wrapped again


def test_torch_compile_keeps_gradients() -> None:
    torch.manual_seed(3)
    m = wrap(GRUDetector(), hidden="proj")
    compiled = torch.compile(m, backend="eager")
    x = torch.randn(2, 5, 4)
    out = compiled(x)
    assert torch.equal(out, m.backbone(x))
    loss = compiled.madcluster_loss() + out.pow(2).mean()
    loss.backward()
    assert m.backbone.proj.weight.grad is not None and m.head.threshold_raw.grad is not None
    # a compiled backbone wraps by its plain names
    m2 = wrap(torch.compile(GRUDetector(), backend="eager"), hidden="proj")
    m2(x)
    assert m2.hidden.shape == (2, 5, 12)

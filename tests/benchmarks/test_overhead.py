"""Tests of the overhead benchmark: MAC counters against hand counts, the K*D + 1 parameter
delta of every backbone, the timing statistics, the CLI on CPU, and the CUDA path (when present)."""
from __future__ import annotations

import csv
import functools
import math

import pytest
import torch
from torch import nn

import adapters
from benchmarks import overhead
from benchmarks.macs import ModuleHookCounter, count_macs, head_macs_analytic
from madcluster_plugin import MADClusterHead, head_macs

B, T, C, E, H = 2, 10, 3, 8, 6  # batch, steps, channels, embedding, GRU hidden


class TinyDetector(nn.Module):
    """Linear embedding -> GRU -> LayerNorm -> single-head einsum attention -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(C, E)
        self.gru = nn.GRU(E, H, batch_first=True)
        self.norm = nn.LayerNorm(H)
        self.q, self.k, self.v = nn.Linear(H, H), nn.Linear(H, H), nn.Linear(H, H)
        self.out = nn.Linear(H, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(self.emb(x))
        h = self.norm(h)
        att = torch.einsum("ble,bse->bls", self.q(h), self.k(h)).softmax(-1)
        return self.out(torch.einsum("bls,bse->ble", att, self.v(h)))


# Hand counts (bias additions never count):
EMB = B * T * C * E                    # 480
GRU = B * T * 3 * (E * H + H * H)      # 5040: three gates, input and recurrent matmuls
QKV = 3 * B * T * H * H                # 2160
ATT = 2 * B * T * T * H                # 2400: scores and weighted sum (einsum)
OUT = B * T * H * 4                    # 480
FLOP_EXPECTED = EMB + GRU + QKV + ATT + OUT                      # 10560
HOOK_EXPECTED = EMB + (GRU + B * T * 3 * H) + 2 * B * T * H + QKV + OUT  # no einsum; GRU + 3H
# products per step; LayerNorm normalise + affine = 2 per element -> 8760


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_counter_reproduces_hand_count_linear_gru_attention(device: str) -> None:
    torch.manual_seed(0)
    res = count_macs(TinyDetector, (B, T, C), device=device)
    assert res.macs == FLOP_EXPECTED == 10560
    assert res.hook_macs == HOOK_EXPECTED == 8760
    assert res.hook_by_type == {"Linear": EMB + QKV + OUT, "GRU": GRU + B * T * 3 * H,
                                "LayerNorm": 2 * B * T * H}
    assert res.by_module["gru"] == GRU and res.by_module["emb"] == EMB
    assert res.device == device and res.note == ""


def test_counting_a_module_leaves_it_untouched() -> None:
    torch.manual_seed(0)
    model = TinyDetector().train()
    x = torch.rand(B, T, C)
    before = model(x).detach().clone()
    seen: list[int] = []
    model.gru.register_forward_hook(lambda m, a, o: seen.append(1))
    res = count_macs(model, (B, T, C))  # meta swap of a real module
    assert res.macs == FLOP_EXPECTED and res.device == "meta"
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.training
    assert torch.equal(model(x), before)
    assert len(seen) == 2  # the user's hook ran in the counted forward and in ours


def test_lstm_counts_exactly_on_cpu_and_meta() -> None:
    lstm = nn.LSTM(5, 7, num_layers=2, batch_first=True)
    expected = 3 * 11 * 4 * (7 * (5 + 7) + 7 * (7 + 7))  # B=3, T=11, 4 gates, two layers
    for device in ("meta", "cpu"):
        res = count_macs(lstm, (3, 11, 5), run=lambda m, x: m(x)[0], device=device)
        assert res.macs == expected
        assert res.hook_macs == expected + 2 * 3 * 11 * 3 * 7  # + 3H elementwise products per layer


def test_hook_conventions_conv_transpose_mha() -> None:
    counter = ModuleHookCounter()
    conv = nn.Conv1d(4, 6, kernel_size=3, padding=1, groups=2)
    tconv = nn.ConvTranspose1d(6, 4, kernel_size=4, stride=2)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    bn = nn.BatchNorm1d(6, affine=False)
    with counter.attach(nn.ModuleList([conv, tconv, mha, bn])):
        y = conv(torch.rand(2, 4, 9))          # out [2, 6, 9]
        bn(y)
        tconv(y)                               # in [2, 6, 9]
        q = torch.rand(2, 5, 8)
        mha(q, torch.rand(2, 7, 8), torch.rand(2, 7, 8))
    assert counter.by_type["Conv1d"] == 2 * 6 * 9 * (4 // 2) * 3
    assert counter.by_type["BatchNorm1d"] == 2 * 6 * 9
    assert counter.by_type["ConvTranspose1d"] == 2 * 6 * 9 * 4 * 4
    assert counter.by_type["MultiheadAttention"] == 2 * 5 * 8 * 8 * 2 + 2 * 2 * 7 * 8 * 8
    n_hooks = sum(len(m._forward_hooks) for m in (conv, tconv, mha, bn))
    assert n_hooks == 0  # detached after the block


class ItemDetector(nn.Module):
    """Reads a value in forward (impossible on meta): the count must fall back to the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(C, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y * float(y.abs().max().item() > 0)


def test_meta_failure_falls_back_to_cpu_with_a_note() -> None:
    res = count_macs(ItemDetector, (B, T, C))
    assert res.device == "cpu"
    assert "meta forward failed" in res.note
    assert res.macs == B * T * C * E


@functools.lru_cache(maxsize=4)
def _time_constant(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32)  # a process-wide cache, assumed to live on the CPU


class CachedDetector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(C, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y + _time_constant(x.shape[-2]).to(y.device)[:, None]


def test_meta_count_does_not_leave_meta_tensors_in_caches() -> None:
    _time_constant.cache_clear()
    assert count_macs(CachedDetector, (B, T, C)).macs == B * T * C * E
    assert CachedDetector()(torch.rand(B, T, C)).shape == (B, T, E)  # the cache holds CPU tensors


def test_bad_counter_input() -> None:
    with pytest.raises(ValueError, match="device"):
        count_macs(TinyDetector, (B, T, C), device="cuda")
    with pytest.raises(ValueError, match="input_shape"):
        count_macs(TinyDetector, (B, 0, C))
    with pytest.raises(ValueError, match="dim"):
        head_macs_analytic(1, 100, 0)
    with pytest.raises(ValueError, match="target"):
        head_macs_analytic(1, 100, 64, 3, target="dec")


def _instrumented_head_macs(head: MADClusterHead, h: torch.Tensor) -> int:
    """MACs of the head's real forward + score: matmuls (FlopCounterMode) plus every product whose
    last axis is the feature axis D (squared differences, norms), one MAC per element."""
    from torch.utils.flop_counter import FlopCounterMode

    d = h.shape[-1]

    def mul(a_shape, b_shape, out_shape=None, **_):  # noqa: ANN001 - FlopCounterMode's signature
        return 2 * math.prod(out_shape) if out_shape and out_shape[-1] == d else 0

    def norm(x_shape, *args, out_shape=None, **_):  # noqa: ANN001 - ||x||: one MAC per element
        return 2 * math.prod(x_shape) if x_shape and x_shape[-1] == d else 0

    fc = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.mul: mul,
                                                         torch.ops.aten.linalg_vector_norm: norm})
    with torch.no_grad(), fc:
        head.score(head(h))
    return fc.get_total_flops() // 2


@pytest.mark.parametrize("k,target", [(1, "paper"), (3, "paper"), (3, "code"), (1, "code")])
def test_head_macs_analytic_matches_the_real_head(k: int, target: str) -> None:
    torch.manual_seed(0)
    b, t, d = 2, 5, 7  # distinct sizes so a wrong axis cannot pass
    # check_finite=False: the NaN guard's isfinite is a boolean product, not a MAC
    head = MADClusterHead(d, n_clusters=k, target=target, check_finite=False)
    assert _instrumented_head_macs(head, torch.randn(b, t, d)) == head_macs_analytic(b, t, d, k, target)
    if k == 1:
        assert head_macs_analytic(b, t, d) == head_macs(b, t, d) == b * t * 4 * d + 2 * d


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", adapters.names())
def test_parameter_delta_is_k_times_d_plus_one(name: str, k: int) -> None:
    with torch.device("meta"):  # shapes only: USAD alone has ~10^8 parameters at 100 x 55
        plain, wrapped = overhead.build_pair(name, 55, 100, k, device="meta")
    dim = wrapped.head.dim
    assert tuple(wrapped.head.centers.shape) == (k, dim)
    assert overhead.n_params(wrapped) - overhead.n_params(plain) == k * dim + 1
    assert overhead.n_params(wrapped.backbone) == overhead.n_params(plain)


def test_summarize_median_iqr_and_paired_ratio() -> None:
    plain = [10.0, 12.0, 11.0, 30.0, 10.0]
    wrapped = [10.5, 12.6, 11.0, 33.0, 10.0]
    s = overhead.summarize(plain, wrapped)
    assert s.plain_ms == 11.0 and s.wrapped_ms == 11.0
    assert s.plain_iqr == pytest.approx(12.0 - 10.0)
    assert s.ratio == pytest.approx(1.05)  # ratios 1.05, 1.05, 1.0, 1.1, 1.0
    assert s.ratio_iqr == pytest.approx(0.05) and s.ratio_min == pytest.approx(1.0) and s.n == 5
    row = {"train_ratio": 1.08, "train_ratio_min": 1.01, "head_train_pct": 1.2}
    assert overhead.time_verdict(row) == "**missed**"
    assert overhead.time_verdict({**row, "train_ratio": 1.04}) == "met"
    with pytest.raises(ValueError, match="same non-zero number"):
        overhead.summarize([1.0], [])


def test_paper_numbers_parse() -> None:
    assert overhead.parse_paper("31.81M") == pytest.approx(31.81e6)
    assert overhead.parse_paper("1.189G") == pytest.approx(1.189e9)
    assert overhead.human(311_620) == "311.62K"
    assert set(overhead.PAPER_TABLE2) == set(adapters.names())


def _run_cli(tmp_path, device: str, extra: list[str]) -> list[dict[str, str]]:
    out = tmp_path / device
    rc = overhead.main(["--models", "deepsvdd", "--channels", "4", "--window", "16", "--batch", "3",
                        "--repeats", "2", "--warmup", "1", "--min-time", "0", "--device", device, "--out", str(out),
                        *extra])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["overhead.csv", "overhead.md"]  # no temp files
    with open(out / "overhead.csv") as f:
        rows = list(csv.DictReader(f))
    required = ("model, D, params_plain, params_wrapped, params_delta, macs_plain, macs_wrapped, "
                "macs_delta_pct, head_macs_analytic, macs_hook_plain, train_ms_plain, train_ms_wrapped, "
                "train_ratio, infer_ms_plain, infer_ms_wrapped, infer_ratio, peak_mem_plain_mb, "
                "peak_mem_wrapped_mb, paper_macs, paper_params, device").split(", ")
    assert set(required) <= set(rows[0])
    assert "| deepsvdd | 64 |" in (out / "overhead.md").read_text()
    return rows


def test_cli_on_cpu(tmp_path) -> None:
    (row,) = _run_cli(tmp_path, "cpu", ["--skip-memory", "--threads", "1", "--clock", "process"])
    assert row["clock"] == "process"
    assert row["model"] == "deepsvdd" and row["D"] == "64" and row["device"].startswith("cpu")
    assert int(row["params_delta"]) == 65 and row["params_delta_ok"] == "True"
    # 3-layer bias-free GRU-128 + 128->64 projection on [1, 16, 4], counted by hand
    gru = 16 * 3 * 128 * ((4 + 128) + 2 * (128 + 128))
    assert int(row["macs_plain"]) == gru + 16 * 128 * 64
    assert int(row["macs_wrapped"]) - int(row["macs_plain"]) == 16 * 64  # the head's cosine matmul
    assert int(row["head_macs_analytic"]) == 16 * 4 * 64 + 2 * 64
    assert float(row["train_ms_plain"]) > 0 and float(row["infer_ratio"]) > 0
    assert 0 < float(row["head_train_ms"]) < float(row["train_ms_wrapped"])
    assert float(row["paper_macs"]) == pytest.approx(31.81e6)
    assert row["peak_mem_plain_mb"] == ""


def test_cli_rejects_bad_arguments(tmp_path, capsys) -> None:
    assert overhead.main(["--batch", "0", "--out", str(tmp_path)]) == 2
    assert "--batch" in capsys.readouterr().err
    assert overhead.main(["--models", "deepsvd", "--out", str(tmp_path)]) == 2
    assert "deepsvdd" in capsys.readouterr().err


def test_cpu_peak_memory_in_a_subprocess() -> None:
    mb, method = overhead.cpu_peak_memory("deepsvdd", "wrapped", 4, 16, 3, 1)
    assert 0 < mb < 500 and "RSS" in method


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cli_on_cuda(tmp_path) -> None:
    (row,) = _run_cli(tmp_path, "cuda", [])
    assert row["device"].startswith("cuda") and row["clock"] == "cuda events"
    assert int(row["params_delta"]) == 65
    assert 0 < float(row["peak_mem_plain_mb"]) < float(row["peak_mem_wrapped_mb"]) + 1.0
    assert float(row["train_ms_plain"]) > 0 and float(row["train_ms_wrapped"]) > 0
    timer = overhead.Timer(torch.device("cuda"))
    a = torch.rand(2048, 2048, device="cuda")
    assert timer(lambda: a @ a) > 0

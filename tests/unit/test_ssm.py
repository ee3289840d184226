"""AR-SSM: the chunked scan equals the recurrence; the module is causal, gated and trainable."""

import pytest
import torch

from phase7fw.components.phase7 import ssm
from phase7fw.kernels import ar_ssm_scan as scan
from phase7fw.errors import Phase7Error
from phase7fw.registry import Registry

# fp32 chunked scan vs fp64 recurrence: errors are relative to the largest |y| of the case.
FP32_RTOL = 1e-5
BF16_RTOL = 2e-2


def _inputs(T, b=2, h=3, r=5, dv=4, dtype=torch.float64, seed=0, strong=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, T, dv, generator=g, dtype=dtype)
    B = torch.randn(b, h, T, r, generator=g, dtype=dtype)
    C = torch.randn(b, h, T, r, generator=g, dtype=dtype)
    # log lambda from ~-0.001 (long memory) to ~-20 (state wiped) when strong
    scale = 3.0 if strong else 1.0
    log_decay = -torch.nn.functional.softplus(scale * torch.randn(b, h, T, generator=g, dtype=dtype) - 2) * 4
    return x, B, C, log_decay


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("T", [1, 7, 16, 37, 64, 100])
@pytest.mark.parametrize("chunk", [1, 16, "T"])
def test_chunked_equals_sequential_fp64(T, chunk):
    chunk = T if chunk == "T" else chunk
    args = _inputs(T, strong=T == 37)
    ref = scan.ar_ssm_scan_sequential(*args)
    out = scan.ar_ssm_scan_reference(*args, chunk_size=chunk)
    assert out.shape == ref.shape == (2, 3, T, 4) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_chunked_gradients_equal_sequential_fp64():
    args = [a.requires_grad_() for a in _inputs(37)]
    w = torch.randn(2, 3, 37, 4, dtype=torch.float64)
    g_ref = torch.autograd.grad((scan.ar_ssm_scan_sequential(*args) * w).sum(), args)
    g_chk = torch.autograd.grad((scan.ar_ssm_scan_reference(*args, chunk_size=16) * w).sum(), args)
    for a, b in zip(g_chk, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T, chunk", [(100, 16), (256, 64), (37, 1)])
def test_chunked_fp32_within_tolerance(T, chunk):
    args = _inputs(T, seed=1)
    ref = scan.ar_ssm_scan_sequential(*args)
    out = scan.ar_ssm_scan_reference(*(a.float() for a in args), chunk_size=chunk)
    assert out.dtype == torch.float32
    assert _rel_err(out, ref) < FP32_RTOL


def test_bf16_inputs_keep_fp32_state():
    args = _inputs(128, seed=2)
    ref = scan.ar_ssm_scan_sequential(*(a.bfloat16().double() for a in args))  # same rounded inputs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scan.ar_ssm_scan_reference(*(a.bfloat16() for a in args), chunk_size=32)
    assert out.dtype == torch.bfloat16
    # only the final cast to bf16 rounds: errors are output rounding, not accumulated
    assert _rel_err(out, ref) < BF16_RTOL / 2


# ----------------------------------------------------------------------------- module
SMALL = dict(max_rank=8, min_rank=2, n_heads=4, expand=2, conv_size=4, chunk_size=8)


def _module(seed=0, d_model=32, **over):
    cfg = ssm.ArSsmConfig(**{**SMALL, **over})
    reg = Registry()
    ssm.register_components(reg.register)
    with torch.device("meta"):
        m = reg.build("ssm", "ar_ssm", cfg, d_model=d_model, seq_len=64, layer_idx=0, n_layers=4)
    m.to_empty(device="cpu")
    torch.manual_seed(seed)
    m.init_weights()
    return m


def test_module_shapes_and_attributes():
    m = _module()
    y, gate_mean = m(torch.randn(2, 29, 32))
    assert y.shape == (2, 29, 32) and gate_mean.dim() == 0
    assert 2 / 8 < gate_mean.item() < 1
    assert m.max_rank == 8 and m.rank_penalty == pytest.approx(1e-3)
    assert 2 <= (gate_mean * m.max_rank).item() <= 8  # effective rank


def test_discretize_scales_the_state_input_by_the_step():
    """S_t = lambda_t S_{t-1} + Delta_t B_t x_t^T: the scan's x input is Delta x, while the D skip
    keeps x; without ``discretize`` the scan sees x itself."""
    u = torch.randn(2, 9, 32)
    on, off = _module(discretize=True), _module(discretize=False)
    up = on.causal_conv(u)
    x, x_in, B, C, log_decay, g = on.project(up)
    step = -log_decay / on.A_log.float().exp().view(1, -1, 1)  # Delta = -log lambda / a
    torch.testing.assert_close(x_in, (x.transpose(1, 2) * step.unsqueeze(-1)))
    x2, x_in2, *_ = off.project(up)
    torch.testing.assert_close(x_in2, x2.transpose(1, 2))
    y = scan.ar_ssm_scan_sequential(x_in, B, C, log_decay)
    torch.testing.assert_close(on(u)[0], on.output(u, x, y), rtol=1e-5, atol=1e-6)


def test_out_norm_and_unit_init_balance_the_path():
    """The first design (std 0.02 everywhere, no norm) gave an output ~100x smaller than an
    attention path's; with unit-variance init and the output norm it is O(1/sqrt(2 L))."""
    u = torch.randn(2, 64, 32)
    old = _module(discretize=False, out_norm=False, init_std=0.02)
    new = _module()
    rms = lambda m: m(u)[0].pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(old) < 0.02
    assert 0.1 < rms(new) < 1.0  # out_proj std (1/sqrt(d_inner)) / sqrt(2 n_layers), n_layers 4
    assert new.norm_weight is not None and old.norm_weight is None


def test_checkpoint_recipes_without_new_options_keep_the_first_design():
    """A checkpoint of phase7fw 0.1 stores [model.ssm] without discretize/out_norm: loading its
    recipe gives the first design (legacy values), a new recipe the new defaults."""
    from phase7fw import load_recipe

    raw = {"model": {"name": "phase7", "ssm": {"name": "ar_ssm", "max_rank": 16}}}
    stored = load_recipe(raw, checkpoint=True).model.config.ssm.config
    fresh = load_recipe(raw).model.config.ssm.config
    assert (stored.discretize, stored.out_norm) == (False, False)
    assert (fresh.discretize, fresh.out_norm) == (True, True)


def test_init_is_deterministic():
    a, b = _module(seed=5), _module(seed=5)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


@pytest.mark.parametrize("t", [0, 5, 8, 15, 28])
def test_module_is_causal(t):
    m = _module()
    x = torch.randn(2, 29, 32)
    x2 = x.clone()
    x2[:, t] += torch.randn(2, 32)
    with torch.no_grad():
        y, _ = m(x)
        y2, _ = m(x2)
    assert torch.equal(y[:, :t], y2[:, :t])  # bit-identical before t
    assert not torch.allclose(y[:, t], y2[:, t])  # and t itself does see its input


def test_conv_is_left_padded_only():
    m = _module(conv_size=3)
    u = torch.zeros(1, 10, 32)
    u[0, 4] = 1.0
    with torch.no_grad():
        out = m.causal_conv(u) - m.conv_bias
    nonzero = (out[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert nonzero == [4, 5, 6]  # an impulse at t=4 reaches t=4..4+K-1, never earlier


def test_min_rank_channels_always_open():
    m = _module()
    logits = torch.randn(3, 7, m.n_heads * m.n_gated) * 50  # saturate both ways
    g = m.rank_gate(logits, (3, 7, m.n_heads))
    assert g.shape == (3, 7, 4, 8)
    assert torch.equal(g[..., :2], torch.ones_like(g[..., :2]))
    # a gate shut as far as it goes leaves exactly min_rank channels: effective rank = min_rank
    with torch.no_grad():
        m.gate_bias.fill_(-1e4)
    _, gate_mean = m(torch.randn(2, 9, 32))
    assert gate_mean.item() == pytest.approx(2 / 8)


def test_min_rank_equal_max_rank_has_no_gate():
    m = _module(min_rank=8)
    assert m.gate_bias is None
    _, gate_mean = m(torch.randn(1, 5, 32))
    assert gate_mean.item() == 1.0


def test_every_parameter_gets_finite_nonzero_gradient():
    m = _module()
    y, gate_mean = m(torch.randn(2, 29, 32))
    (y.square().mean() + m.rank_penalty * gate_mean).backward()
    names = {n for n, _ in m.named_parameters()}
    assert {"A_log", "dt_bias", "D", "gate_bias", "conv_weight", "conv_bias"} <= names
    for n, p in m.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


def test_bf16_autocast_forward_backward_finite():
    m = _module(chunk_size=16)
    x = torch.randn(2, 50, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, gate_mean = m(x)
        loss = y.float().square().mean() + m.rank_penalty * gate_mean
    loss.backward()
    assert torch.isfinite(y.float()).all() and torch.isfinite(gate_mean)
    assert torch.isfinite(x.grad).all()
    for n, p in m.named_parameters():
        assert torch.isfinite(p.grad).all(), n
    # and it tracks the fp32 forward
    with torch.no_grad():
        y32, _ = m(x)
    assert _rel_err(y.float(), y32) < 5e-2


def test_module_chunk_size_does_not_change_output():
    x = torch.randn(2, 29, 32, dtype=torch.float64)
    outs = []
    for chunk in (1, 8, 64):
        m = _module(chunk_size=chunk).double()
        with torch.no_grad():
            outs.append(m(x)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-10, atol=1e-12)


def test_config_errors():
    with pytest.raises(Phase7Error, match="min_rank .* must be <= max_rank"):
        ssm.ArSsmConfig(max_rank=4, min_rank=8)
    with pytest.raises(Phase7Error, match="n_heads"):
        ssm.build_ar_ssm(ssm.ArSsmConfig(n_heads=5), d_model=32, seq_len=16, layer_idx=0)


def test_none_builds_nothing():
    reg = Registry()
    ssm.register_components(reg.register)
    assert reg.build("ssm", "none", ssm.NoSsmConfig(), d_model=32, seq_len=16, layer_idx=0) is None

"""Hyperbolic and SDPA attention: references, causality, gradients, bf16, init, registration."""

import math

import attrs
import pytest
import torch
import torch.nn.functional as F

from phase7fw.components.phase7 import attention as A
from phase7fw.errors import Phase7Error
from phase7fw.kernels import hyperbolic_attention as op
from phase7fw.kernels.hyperbolic_attention import geometry
from phase7fw.registry import Registry

D_MODEL, N_HEADS, SEQ = 32, 4, 16


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def qkv(B, H, T, D, dtype, seed, scale=0.7):
    g = _gen(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    # Vary the tangent norms per row so some points sit near (or beyond) the 0.999 clamp.
    radial = torch.rand(B, H, T, 1, generator=g, dtype=torch.float64) * 2.5 + 0.1
    return (q * scale * radial).to(dtype), (k * scale * radial.flip(2)).to(dtype), v.to(dtype)


def head_params(H, dtype):
    c = torch.linspace(0.3, 3.0, H, dtype=dtype)
    tau = torch.linspace(0.5, 2.0, H, dtype=dtype)
    return c, tau


def build(kind="hyperbolic", **cfg):
    if kind == "hyperbolic":
        config = A.HyperbolicAttentionConfig(**{"window": 5, **cfg})
        return A.build_hyperbolic_attention(config, d_model=D_MODEL, n_heads=N_HEADS, seq_len=SEQ, layer_idx=0)
    config = A.SdpaAttentionConfig(**cfg)
    return A.build_sdpa_attention(config, d_model=D_MODEL, n_heads=N_HEADS, seq_len=SEQ, layer_idx=0)


def seeded(kind="hyperbolic", seed=0, **cfg):
    torch.manual_seed(seed)
    m = build(kind, **cfg)
    m.init_weights()
    return m


# Windowed (tangent shortcut, blockwise) vs dense (ball points, pairwise_dist, T x T mask).
# fp64: rtol/atol 1e-10. fp32: the dense path forms 1 - c|x|^2 by subtraction at radius
# 0.999 (many inputs here sit at the clamp) and is the less accurate one (max abs error
# vs fp64 ~6e-5, against ~2e-6 for the windowed path), so fp32 asserts windowed vs fp32 dense
# within atol 2e-4 and windowed vs fp64 dense (same inputs) within atol 1e-5.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=0, atol=2e-4)}
CASES = [(8, 4), (13, 5), (16, 3), (7, 1), (9, 9), (6, 10), (12, 12), (1, 3), (20, 19)]


@pytest.mark.parametrize("score", ["distance", "squared_distance", "dot_distance"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,W", CASES)
def test_windowed_equals_dense(T, W, dtype, score):
    q, k, v = qkv(2, 3, T, 8, dtype, seed=T * 100 + W)
    c, tau = head_params(3, dtype)
    out = op.hyperbolic_attention_reference(q, k, v, c, tau, W, score=score)
    dense = op.dense_masked_hyperbolic_attention(q, k, v, c, tau, W, score=score)
    # squared scores double the relative error of the fp32 dense path's distances
    squared = score == "squared_distance"
    tol = dict(rtol=0, atol=1e-3) if squared and dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(out, dense, **tol)
    assert out.dtype == dtype and out.shape == v.shape
    if dtype == torch.float32:
        ref64 = op.dense_masked_hyperbolic_attention(*(t.double() for t in (q, k, v, c, tau)), W, score=score)
        torch.testing.assert_close(out.double(), ref64, rtol=0, atol=3e-5 if squared else 1e-5)
    # scalar curvature (float and 0-dim tensor) broadcasts over heads
    ref = op.dense_masked_hyperbolic_attention(q, k, v, 1.7, tau, W, score=score)
    torch.testing.assert_close(op.hyperbolic_attention_reference(q, k, v, 1.7, tau, W, score=score), ref, **tol)
    torch.testing.assert_close(
        op.hyperbolic_attention_reference(q, k, v, torch.tensor(1.7, dtype=dtype), tau, W, score=score), ref, **tol
    )


def test_window_one_is_identity_on_values():
    q, k, v = qkv(1, 2, 7, 4, torch.float64, seed=3)
    c, tau = head_params(2, torch.float64)
    torch.testing.assert_close(op.hyperbolic_attention_reference(q, k, v, c, tau, 1), v, rtol=0, atol=0)


@pytest.mark.parametrize("score", ["distance", "squared_distance", "dot_distance"])
def test_windowed_gradients_equal_dense_gradients(score):
    leaves = [*qkv(2, 3, 11, 6, torch.float64, seed=7), *head_params(3, torch.float64)]

    def grads(fn):
        ins = [t.detach().clone().requires_grad_(True) for t in leaves]
        out = fn(*ins, 4, score=score)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return [t.grad for t in ins]

    for gw, gd in zip(grads(op.hyperbolic_attention_reference), grads(op.dense_masked_hyperbolic_attention)):
        torch.testing.assert_close(gw, gd, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("W", [1, 3, 64])
def test_reference_is_causal(W):
    T, t = 12, 7
    q, k, v = qkv(2, 3, T, 8, torch.float32, seed=11)
    c, tau = head_params(3, torch.float32)
    base = op.hyperbolic_attention_reference(q, k, v, c, tau, W)
    k2, v2, q2 = k.clone(), v.clone(), q.clone()
    k2[:, :, t:] += 3.0
    v2[:, :, t:] -= 5.0
    q2[:, :, t:] *= 2.0
    out = op.hyperbolic_attention_reference(q2, k2, v2, c, tau, W)
    assert torch.equal(out[:, :, :t], base[:, :, :t])
    assert not torch.equal(out[:, :, t:], base[:, :, t:])


@pytest.mark.parametrize("kind", ["hyperbolic", "sdpa"])
def test_module_is_causal(kind):
    m = seeded(kind, window=4) if kind == "hyperbolic" else seeded(kind, window=0)
    x = torch.randn(2, SEQ, D_MODEL, generator=_gen(1))
    t = 9
    x2 = x.clone()
    x2[:, t] += 1.0
    with torch.no_grad():
        a, b = m(x), m(x2)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.equal(a[:, t], b[:, t])


@pytest.mark.parametrize("qk_norm", [True, False])
def test_gradients_reach_every_parameter_and_input(qk_norm):
    m = seeded("hyperbolic", window=5, qk_norm=qk_norm)
    x = torch.randn(2, 13, D_MODEL, generator=_gen(2), requires_grad=True)
    out = m(x)
    assert out.shape == x.shape
    (out * torch.randn(out.shape, generator=_gen(3))).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    names = {n for n, _ in m.named_parameters()}
    gains = {"q_norm", "k_norm"} if qk_norm else set()
    assert {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "log_c", "beta"} | gains == names
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # and directly into q, k, v, c and tau of the reference
    leaves = [t.requires_grad_(True) for t in (*qkv(1, 2, 9, 4, torch.float32, seed=4), *head_params(2, torch.float32))]
    op.hyperbolic_attention_reference(*leaves, 3).pow(2).sum().backward()
    for t in leaves:
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


@pytest.mark.parametrize("scale", [0.05, 1.0, 3.7, 50.0])
def test_bf16_autocast_near_boundary_is_finite(scale):
    """Tangent norms around/over the 0.999 clamp (sqrt(c)|q| = artanh(0.999) ~ 3.8) in bf16."""
    # Reference, bf16 inputs, sqrt(c)|q| ~ scale (c up to c_max-like 10).
    q, k, v = (t.bfloat16() for t in qkv(2, 3, 17, 8, torch.float64, seed=5, scale=1.0))
    q = (q / q.float().norm(dim=-1, keepdim=True) * scale).bfloat16().requires_grad_(True)
    k = (k / k.float().norm(dim=-1, keepdim=True) * scale).bfloat16().requires_grad_(True)
    v.requires_grad_(True)
    c = torch.tensor([1.0, 4.0, 10.0], requires_grad=True)
    tau = torch.tensor([0.5, 1.0, 4.0], requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op.hyperbolic_attention_reference(q, k, v, c, tau, 6)
        assert out.dtype == torch.bfloat16
        out.float().pow(2).sum().backward()
    for t in (q, k, v, c, tau):
        assert torch.isfinite(t.grad).all()
    # the same (bf16-rounded) inputs in fp64: the output is within bf16 rounding
    ref = op.hyperbolic_attention_reference(*(t.detach().double() for t in (q, k, v, c, tau)), 6)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2

    # Module under autocast, curvature pushed to c_max, inputs scaled up.
    m = seeded("hyperbolic", window=5)
    m.set_curvature(10.0)
    x = (torch.randn(2, SEQ, D_MODEL, generator=_gen(6)) * scale).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        y.float().pow(2).mean().backward()
    assert torch.isfinite(y).all()
    assert torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        y32 = m(x)  # fp32: bf16 projections and outputs stay within a few bf16 steps of it
    assert ((y.float() - y32).norm() / y32.norm()).item() < 5e-2


def test_set_curvature_changes_output_in_place():
    m = seeded("hyperbolic", window=5, qk_norm=False)  # curvature() is the layer's own c
    x = torch.randn(1, SEQ, D_MODEL, generator=_gen(7))
    buf = m.kappa
    with torch.no_grad():
        a = m(x)
        m.set_curvature(3.0)
        b = m(x)
    assert m.kappa is buf and buf.dim() == 0 and buf.dtype == torch.float32 and buf.item() == 3.0
    assert "kappa" not in m.state_dict()  # owned by the curvature scheduler, not checkpointed
    assert not torch.allclose(a, b)
    assert m.curvature().item() == pytest.approx(3.0)
    m.set_curvature(1e6)
    assert m.curvature().item() == pytest.approx(10.0)  # clamped to c_max
    with torch.no_grad():
        m.log_c.fill_(math.log(0.5))
    m.set_curvature(2.0)
    assert m.curvature().item() == pytest.approx(1.0)  # kappa * exp(rho)
    m.init_weights()  # re-init keeps the scheduler's kappa
    assert m.kappa.item() == 2.0 and m.log_c.item() == 0.0


def test_temperature_init():
    m = seeded("hyperbolic", init_temperature=0.3, qk_norm=False)
    torch.testing.assert_close(m.temperature(), torch.full((N_HEADS,), 0.3))
    # with qk_norm the op sees tau / sqrt(D) and c / D (tangent vectors scaled by 1/sqrt(D))
    m = seeded("hyperbolic", init_temperature=0.3, qk_norm=True)
    D = D_MODEL // N_HEADS
    torch.testing.assert_close(m.temperature(), torch.full((N_HEADS,), 0.3 / math.sqrt(D)))
    torch.testing.assert_close(m.curvature(), torch.tensor(1.0 / D))


def naive_attention(q, k, v, window):
    T, D = q.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    i = torch.arange(T).view(-1, 1)
    j = torch.arange(T).view(1, -1)
    allowed = (j <= i) & ((i - j < window) if window else True)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


def naive_rope(x, theta=10000.0):
    T, D = x.shape[-2], x.shape[-1]
    half = D // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) / half)
    ang = torch.arange(T, dtype=torch.float64).view(-1, 1) * freqs
    rot = torch.empty_like(x)
    # pair (d, d + half) is rotated by angle pos * freq_d
    rot[..., :half] = x[..., :half] * ang.cos() - x[..., half:] * ang.sin()
    rot[..., half:] = x[..., half:] * ang.cos() + x[..., :half] * ang.sin()
    return rot


@pytest.mark.parametrize("window", [0, 3, 16, 40])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_sdpa_matches_naive(window, qk_norm):
    m = seeded("sdpa", window=window, qk_norm=qk_norm).double()
    x = torch.randn(2, SEQ, D_MODEL, generator=_gen(8), dtype=torch.float64)
    H, Dh = N_HEADS, D_MODEL // N_HEADS
    if qk_norm:
        with torch.no_grad():
            m.q_norm.uniform_(0.5, 2.0)
            m.k_norm.uniform_(0.5, 2.0)

    def heads(w, gain=None):
        t = (x @ w.T).view(2, SEQ, H, Dh).transpose(1, 2)
        if gain is None:
            return t
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + torch.finfo(t.dtype).eps) * gain

    q = naive_rope(heads(m.q_proj.weight, m.q_norm if qk_norm else None))
    k = naive_rope(heads(m.k_proj.weight, m.k_norm if qk_norm else None))
    o = naive_attention(q, k, heads(m.v_proj.weight), window)
    expected = o.transpose(1, 2).reshape(2, SEQ, D_MODEL) @ m.o_proj.weight.T
    # RoPE tables are fp32 by design, hence ~1e-6 agreement in fp64
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-6)


def test_rope_matches_naive_and_extends_past_seq_len():
    rope = A.RotaryEmbedding(8, seq_len=6, theta=500.0)
    x = torch.randn(2, 3, 10, 8, generator=_gen(9), dtype=torch.float64)
    out = rope(x)  # 10 > seq_len: tables computed on the fly
    torch.testing.assert_close(out, naive_rope(x, 500.0).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rope(x[:, :, :6]), out[:, :, :6])
    torch.testing.assert_close(out.norm(dim=-1), x.float().norm(dim=-1))  # rotation: norms kept


@pytest.mark.parametrize("kind", ["hyperbolic", "sdpa"])
def test_meta_build_then_init_is_deterministic(kind):
    with torch.device("meta"):
        m = build(kind)
    assert all(t.is_meta for t in [*m.parameters(), *m.buffers()])
    m.to_empty(device="cpu")
    torch.manual_seed(123)
    m.init_weights()
    ref = build(kind)  # built on CPU (its default Linear init draws from the RNG first)
    torch.manual_seed(123)
    ref.init_weights()  # init_weights alone decides the values, from the RNG state
    sd, sd_ref = m.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys()
    for key in sd:
        assert torch.equal(sd[key], sd_ref[key]), key
    for (name, b), (_, b_ref) in zip(m.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, b_ref), name  # RoPE tables (and kappa) recomputed
    x = torch.randn(1, SEQ, D_MODEL, generator=_gen(10))
    with torch.no_grad():
        y = m(x)
    assert torch.isfinite(y).all() and torch.equal(y, ref(x).detach())
    torch.manual_seed(124)
    ref.init_weights()
    assert not torch.equal(ref.q_proj.weight, m.q_proj.weight)


def test_hyperbolic_init_keeps_points_inside_the_ball():
    m = seeded("hyperbolic")
    x = torch.randn(4, SEQ, D_MODEL, generator=_gen(11))
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()  # unit RMS, as after RMSNorm
    with torch.no_grad():
        q, _, _ = m._qkv(x)
    a = q.norm(dim=-1) * m.curvature().sqrt()
    assert 0.3 < a.median().item() < 2.0  # well inside artanh(0.999) ~ 3.8


def test_registration_and_config():
    reg = Registry()
    A.register_components(register=reg.register)
    assert reg.names("attention") == ["hyperbolic", "sdpa"]
    hyp = reg.get("attention", "hyperbolic")
    assert hyp.config_cls is A.HyperbolicAttentionConfig and hyp.description
    cfg = A.HyperbolicAttentionConfig()
    assert (cfg.window, cfg.rope_theta, cfg.init_temperature, cfg.c_min, cfg.c_max) == (256, 10000.0, 1.0, 1e-3, 10.0)
    assert A.SdpaAttentionConfig().window == 0
    checks = {f.name: f.metadata.get("check") for f in attrs.fields(A.HyperbolicAttentionConfig)}
    assert checks["window"](0) and checks["window"](1) is None
    m = reg.build("attention", "hyperbolic", cfg, d_model=D_MODEL, n_heads=N_HEADS, seq_len=SEQ, layer_idx=2, n_layers=4)
    assert isinstance(m, A.HyperbolicAttention) and m.window == 256
    s = reg.build("attention", "sdpa", A.SdpaAttentionConfig(window=8), d_model=D_MODEL, n_heads=N_HEADS, seq_len=SEQ, layer_idx=0)
    assert isinstance(s, A.SdpaAttention) and s.window == 8
    with pytest.raises(Phase7Error, match="divisible"):
        reg.build("attention", "sdpa", A.SdpaAttentionConfig(), d_model=30, n_heads=4, seq_len=SEQ, layer_idx=0)
    with pytest.raises(Phase7Error, match="c_min"):
        reg.build(
            "attention",
            "hyperbolic",
            A.HyperbolicAttentionConfig(c_min=2.0, c_max=1.0),
            d_model=D_MODEL,
            n_heads=N_HEADS,
            seq_len=SEQ,
            layer_idx=0,
        )


@pytest.mark.parametrize("power", [1, 2])
def test_full_window_equals_plain_causal_attention_over_distances(power):
    """W >= T is full causal: compare with an inline T x T computation from the same helper,
    scores -tau d (power 1) and -tau d^2 (power 2, ``squared``)."""
    q, k, v = qkv(1, 2, 10, 4, torch.float64, seed=12)
    c, tau = head_params(2, torch.float64)
    d = geometry.pairwise_poincare_dist_from_tangent(q, k, c.view(2, 1, 1))
    scores = (-tau.view(2, 1, 1) * d**power).masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf"))
    expected = F.softmax(scores, -1) @ v
    got = op.hyperbolic_attention_reference(q, k, v, c, tau, 10**6, score="squared_distance" if power == 2 else "distance")
    torch.testing.assert_close(got, expected)


def test_dot_distance_with_zero_temperature_is_dot_product_attention():
    """tau = 0 leaves the dot term alone: ordinary causal softmax(q k^T / sqrt(D)) v."""
    q, k, v = qkv(1, 2, 9, 4, torch.float64, seed=6)
    c = torch.tensor([0.5, 1.5], dtype=torch.float64)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = op.hyperbolic_attention_reference(q, k, v, c, torch.zeros(2, dtype=torch.float64), 10**6, score="dot_distance")
    torch.testing.assert_close(got, expected)


def test_unknown_score_is_an_error():
    q, k, v = qkv(1, 1, 4, 4, torch.float64, seed=1)
    with pytest.raises(ValueError, match="score must be one of distance, squared_distance, dot_distance"):
        op.hyperbolic_attention_reference(q, k, v, 1.0, torch.ones(1, dtype=torch.float64), 2, score="cosine")


def test_squared_score_flat_limit_is_dot_product_attention():
    """As c -> 0 the ball is flat and d ~ 2|q - k|: -tau d^2 = 8 tau <q,k> - 4 tau (|q|^2 + |k|^2),
    whose row term cancels in the softmax: dot-product attention with a key-norm bias."""
    q, k, v = qkv(1, 2, 9, 4, torch.float64, seed=5)
    tau = torch.tensor([0.3, 0.7], dtype=torch.float64)
    logits = 8 * tau.view(2, 1, 1) * (q @ k.transpose(-1, -2)) - 4 * tau.view(2, 1, 1) * k.pow(2).sum(-1).unsqueeze(-2)
    expected = F.softmax(logits.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf")), -1) @ v
    got = op.hyperbolic_attention_reference(q, k, v, 1e-9, tau, 10**6, score="squared_distance")
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("score", ["distance", "squared_distance", "dot_distance"])
def test_qk_norm_maps_scaled_normalized_vectors_to_the_ball(score):
    """qk_norm: q, k RMS-normalized per head (gains), the dot term on them, the distance between
    expmap0(q / sqrt(D)) and expmap0(k / sqrt(D)) on the ball of the layer's curvature c, built
    here from geometry.expmap0 / pairwise_dist in fp64 (the module hands the op c/D and tau/sqrt(D))."""
    m = seeded("hyperbolic", seed=3, qk_norm=True, score=score, window=SEQ).double()
    with torch.no_grad():
        m.q_norm.uniform_(0.5, 2.0)  # gains away from 1, radii spread around the clamp
        m.k_norm.uniform_(0.5, 2.0)
        m.log_c.fill_(0.4)
        m.beta.uniform_(-1.0, 1.0)
    x = torch.randn(2, SEQ, D_MODEL, generator=_gen(5), dtype=torch.float64)
    D = D_MODEL // N_HEADS
    with torch.no_grad():
        got = m(x)
        def heads(t):
            return t.view(2, SEQ, N_HEADS, D).transpose(1, 2)

        def normalized(t, gain):  # RMS over the head dimension (eps as F.rms_norm's default)
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + torch.finfo(t.dtype).eps) * gain

        q = m.rope(normalized(heads(m.q_proj(x)), m.q_norm))
        k = m.rope(normalized(heads(m.k_proj(x)), m.k_norm))
        v = heads(m.v_proj(x))
        c = (m.kappa * m.log_c.exp()).reshape(())  # the layer's curvature, inside [c_min, c_max]
        tau = F.softplus(m.beta)
        edge = 1.0 - math.tanh(geometry.MAX_TANGENT_ATANH)
        pq = geometry.project(geometry.expmap0(q / math.sqrt(D), c), c, eps=edge)
        pk = geometry.project(geometry.expmap0(k / math.sqrt(D), c), c, eps=edge)
        d = geometry.pairwise_dist(pq, pk, c)
        scores = -tau.view(-1, 1, 1) * (d * d if score == "squared_distance" else d)
        if score == "dot_distance":
            scores = scores + q @ k.transpose(-1, -2) / math.sqrt(D)
        causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
        o = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v
        expected = m._out(o)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)  # RoPE tables are fp32


def test_qk_norm_off_is_the_plain_module():
    """qk_norm = False keeps the parameters and the curvature/temperature the op sees."""
    m = seeded("hyperbolic", qk_norm=False)
    assert m.q_norm is None and "q_norm" not in dict(m.named_parameters())
    torch.testing.assert_close(m.curvature(), (m.kappa * m.log_c.exp()).reshape(()))


def test_checkpoint_recipes_without_the_new_options_keep_the_first_attention():
    """A checkpoint written before QK-norm stores [model.attention] without qk_norm (and, before
    the score option, without score): its recipe loads as the design it trained."""
    from phase7fw import load_recipe

    raw = {"model": {"name": "phase7", "attention": {"name": "hyperbolic", "window": 64}}}
    stored = load_recipe(raw, checkpoint=True).model.config.attention.config
    fresh = load_recipe(raw).model.config.attention.config
    assert (stored.score, stored.qk_norm) == ("distance", False)
    assert (fresh.score, fresh.qk_norm) == ("dot_distance", True)

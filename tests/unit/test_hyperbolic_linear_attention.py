"""The hyperbolic linear attention op (Phase 8): its three forms agree, the feature map is the
Lorentz lift of the Poincare ball point, the normalizer never reaches zero, gradients are
exact, and the chunked and recurrent forms never build a T x T tensor."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from phase7fw.kernels.hyperbolic_attention import geometry
from phase7fw.kernels.hyperbolic_linear_attention import (
    MAX_ATANH,
    MAX_KLEIN_RADIUS,
    empty_state,
    feature_map,
    hyperbolic_linear_attention_chunked,
    hyperbolic_linear_attention_quadratic,
    hyperbolic_linear_attention_step,
)


def _inputs(B=2, H=3, T=37, D=8, Dv=6, radius=2.0, seed=0, c=None, decay=True):
    """Tangent vectors with sqrt(c)|u| uniform in [0, radius] (past 3.8 the clamp acts:
    points at Euclidean radius 0.999/sqrt(c)), fp64."""
    g = torch.Generator().manual_seed(seed)
    c = (0.3 + 2 * torch.rand(H, generator=g, dtype=torch.float64)) if c is None else torch.full((H,), c, dtype=torch.float64)

    def tangent():
        u = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
        r = radius * torch.rand(B, H, T, 1, generator=g, dtype=torch.float64)
        return u / u.norm(dim=-1, keepdim=True) * r / c.sqrt().view(1, H, 1, 1)

    q, k = tangent(), tangent()
    v = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)
    ld = -0.3 * torch.rand(B, H, T, generator=g, dtype=torch.float64) if decay else None
    return q, k, v, c, ld


def _fp32(*ts):
    return [None if t is None else t.float() for t in ts]


@pytest.mark.parametrize("T,chunk", [(1, 64), (16, 16), (37, 16), (37, 5), (64, 64), (100, 32), (129, 64)])
@pytest.mark.parametrize("c,radius", [(0.1, 1.0), (1.0, 2.5), (4.0, 4.5)])
def test_chunked_recurrent_and_quadratic_agree_in_fp32(T, chunk, c, radius):
    q, k, v, cc, ld = _inputs(T=T, c=c, radius=radius)
    ref = hyperbolic_linear_attention_quadratic(q, k, v, cc, ld)  # fp64
    q32, k32, v32, c32, ld32 = _fp32(q, k, v, cc, ld)
    chunked = hyperbolic_linear_attention_chunked(q32, k32, v32, c32, ld32, chunk_size=chunk)
    state = empty_state(2, 3, 8, 6)
    recurrent = hyperbolic_linear_attention_step(q32, k32, v32, c32, ld32, state)
    quad32 = hyperbolic_linear_attention_quadratic(q32, k32, v32, c32, ld32)
    for got in (chunked, recurrent, quad32):
        assert got.dtype == torch.float32
        assert (got.double() - ref).abs().max().item() < 1e-5
    assert (chunked - recurrent).abs().max().item() < 1e-5


def test_without_decay_and_with_focusing():
    q, k, v, c, _ = _inputs(T=50, decay=False)
    for p in (1.0, 3.0):
        ref = hyperbolic_linear_attention_quadratic(q, k, v, c, None, focus_power=p)
        got = hyperbolic_linear_attention_chunked(*_fp32(q, k, v, c), None, focus_power=p, chunk_size=16)
        rec = hyperbolic_linear_attention_step(*_fp32(q, k, v, c), None, empty_state(2, 3, 8, 6), focus_power=p)
        assert (got.double() - ref).abs().max().item() < 1e-5
        assert (rec.double() - ref).abs().max().item() < 1e-5
    # the focusing changes the weights
    plain = hyperbolic_linear_attention_quadratic(q, k, v, c, None)
    focused = hyperbolic_linear_attention_quadratic(q, k, v, c, None, focus_power=3.0)
    assert (plain - focused).abs().max().item() > 1e-3


def test_a_sequence_continues_from_a_state():
    """Prompt in pieces (chunked with a carried state, then recurrent steps) == one pass."""
    q, k, v, c, ld = _fp32(*_inputs(T=60))
    whole = hyperbolic_linear_attention_chunked(q, k, v, c, ld, chunk_size=16)
    a, state = hyperbolic_linear_attention_chunked(q[:, :, :23], k[:, :, :23], v[:, :, :23], c, ld[:, :, :23],
                                                   chunk_size=16, return_state=True)
    b, state = hyperbolic_linear_attention_chunked(q[:, :, 23:50], k[:, :, 23:50], v[:, :, 23:50], c,
                                                   ld[:, :, 23:50], chunk_size=8, state=state, return_state=True)
    address = state.data_ptr()
    rest = hyperbolic_linear_attention_step(q[:, :, 50:], k[:, :, 50:], v[:, :, 50:], c, ld[:, :, 50:], state)
    assert state.data_ptr() == address  # updated in place (what a CUDA graph replays)
    assert (torch.cat([a, b, rest], dim=2) - whole).abs().max().item() < 1e-5


def test_feature_maps_are_the_lorentz_and_klein_points_of_the_ball_point():
    """Keys: the Lorentz lift of x = expmap0(k) (projected to the clamp radius); queries: the
    same point divided by its time coordinate (the Beltrami-Klein point)."""
    q, _, _, c, _ = _inputs(T=20, radius=3.5)
    edge = 1.0 - math.tanh(MAX_ATANH)  # the clamp, as a projection of the ball point
    cv = c.view(1, 3, 1)
    x = geometry.project(geometry.expmap0(q, cv), cv, eps=edge)  # Poincare ball points, fp64
    cx2 = cv * (x * x).sum(-1)
    lift0 = (1 + cx2) / (1 - cx2)
    lift = 2 * c.sqrt().view(1, 3, 1, 1) * x / (1 - cx2).unsqueeze(-1)
    key = feature_map(q, c)
    assert torch.allclose(key[..., 0], lift0, rtol=1e-9)
    assert torch.allclose(key[..., 1:], lift, rtol=1e-9, atol=1e-9)
    # on the upper sheet of the hyperboloid: phi_0^2 - |phi_1:|^2 = 1
    assert torch.allclose(key[..., 0] ** 2 - (key[..., 1:] ** 2).sum(-1), torch.ones(()).double(), atol=1e-9)
    query = feature_map(q, c, query=True)
    assert torch.allclose(query, key / key[..., :1], rtol=1e-12)
    assert (query[..., 1:].norm(dim=-1) <= MAX_KLEIN_RADIUS + 1e-12).all()


def test_every_pair_weight_is_positive_even_at_the_boundary():
    """The normalizer is a decayed sum of pair weights phi_q(q_t) . phi_k(k_s) that includes
    s = t with decay 1: each weight is >= 1 - 0.995^2, also for antipodal points at the clamp,
    in fp32 and with the dot products rounded to bf16, so nothing divides by (almost) zero."""
    q, k, v, c, _ = _inputs(T=64, radius=6.0, seed=3)
    k = torch.cat([k[:, :, :32], -q[:, :, 32:]], dim=2)  # half of the keys antipodal to their query
    fq = feature_map(q.float(), c.float(), query=True)
    fk = feature_map(k.float(), c.float())
    floor = 1 - MAX_KLEIN_RADIUS**2
    assert (fq @ fk.transpose(-1, -2)).min().item() >= floor * (1 - 1e-3)
    bf16 = (fq.bfloat16() @ fk.bfloat16().transpose(-1, -2)).float()
    assert bf16.min().item() > 0.5 * floor
    assert fk.abs().max().item() <= math.cosh(2 * MAX_ATANH) * (1 + 1e-6) < 10.02
    # values all equal to 3: the output is exactly 3 (a convex combination)
    out = hyperbolic_linear_attention_chunked(q.float(), k.float(), torch.full_like(v, 3.0).float(), c.float(), None)
    assert torch.isfinite(out).all() and (out - 3).abs().max().item() < 1e-5


def test_gradients_are_exact_in_fp64():
    q, k, v, c, ld = _inputs(B=1, H=2, T=11, D=4, Dv=3, radius=2.0)
    ins = tuple(t.clone().requires_grad_() for t in (q, k, v, c, ld))
    assert torch.autograd.gradcheck(
        lambda *a: hyperbolic_linear_attention_chunked(*a, focus_power=2.0, chunk_size=4), ins)
    grads = torch.autograd.grad(hyperbolic_linear_attention_chunked(*ins, chunk_size=4).square().sum(), ins)
    for name, g in zip(("q", "k", "v", "c", "decay"), grads):
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_recurrent_state_does_not_grow_and_no_form_builds_a_t_by_t_tensor():
    T, chunk = 256, 16

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    q, k, v, c, ld = _fp32(*_inputs(B=1, H=1, T=T, D=8, Dv=8))
    sizes = {}
    for name, fn in (("quadratic", lambda: hyperbolic_linear_attention_quadratic(q, k, v, c, ld)),
                     ("chunked", lambda: hyperbolic_linear_attention_chunked(q, k, v, c, ld, chunk_size=chunk)),
                     ("recurrent", lambda: hyperbolic_linear_attention_step(q, k, v, c, ld, empty_state(1, 1, 8, 8)))):
        with Sizes() as mode:
            fn()
        sizes[name] = mode.largest
    assert sizes["quadratic"] >= T * T  # the detector sees a T x T tensor when there is one
    linear = T * (8 + 1) * 3  # e.g. the features of every token, several times over
    assert sizes["chunked"] <= linear and sizes["recurrent"] <= linear, sizes


def test_bad_shapes_are_named():
    q, k, v, c, ld = _fp32(*_inputs(T=10))
    with pytest.raises(ValueError, match="log_decay"):
        hyperbolic_linear_attention_chunked(q, k, v, c, ld[:, :, :5])
    with pytest.raises(ValueError, match="curvature"):
        hyperbolic_linear_attention_chunked(q, k, v, torch.ones(5), ld)

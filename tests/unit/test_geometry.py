"""phase7fw.kernels.hyperbolic_attention.geometry against geoopt's PoincareBall (curvature -c), plus fp32 stability."""

import math

import pytest
import torch

from phase7fw.kernels.hyperbolic_attention import geometry as g

geoopt = pytest.importorskip("geoopt")

CS = (0.1, 1.0, 4.0)
D = 16
EDGE = 0.999  # Euclidean radius 0.999/sqrt(c): the documented fp32 limit


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def unit_dirs(n, seed, dtype=torch.float64):
    d = torch.randn(n, D, generator=_gen(seed), dtype=torch.float64)
    return (d / d.norm(dim=-1, keepdim=True)).to(dtype)


def ball_points(n, c, seed, where, dtype=torch.float64):
    """Points inside the ball: radius uniform in [0, 0.999)/sqrt(c) ("random") or exactly
    0.999/sqrt(c) ("edge")."""
    if where == "edge":
        r = torch.full((n, 1), EDGE, dtype=torch.float64)
    else:
        r = torch.rand(n, 1, generator=_gen(seed + 1), dtype=torch.float64) * EDGE
    return (unit_dirs(n, seed) * r / math.sqrt(c)).to(dtype)


def tangents(n, c, seed, where, dtype=torch.float64):
    """Tangent vectors whose images lie at the same radii as ``ball_points``."""
    a_max = math.atanh(EDGE)
    if where == "edge":
        a = torch.full((n, 1), a_max, dtype=torch.float64)
    else:
        a = torch.rand(n, 1, generator=_gen(seed + 1), dtype=torch.float64) * a_max
    return (unit_dirs(n, seed) * a / math.sqrt(c)).to(dtype)


def ball(c):
    # Build the geoopt ball from an fp64 tensor so its stored curvature is exact in fp64.
    return geoopt.PoincareBall(c=torch.tensor(c, dtype=torch.float64))


def as_c(c, kind):
    return torch.tensor(c, dtype=torch.float64) if kind == "tensor" else c


def close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# fp64 vs geoopt: rtol 1e-9 / atol 1e-9 (geoopt's artanh form loses ~1e-10 near the edge).
R64, A64 = 1e-9, 1e-9


@pytest.mark.parametrize("c", CS)
@pytest.mark.parametrize("ckind", ["float", "tensor"])
@pytest.mark.parametrize("where", ["random", "edge"])
def test_ops_match_geoopt_fp64(c, ckind, where):
    m, cc = ball(c), as_c(c, ckind)
    x, y = ball_points(64, c, 1, where), ball_points(64, c, 2, where)
    u = tangents(64, c, 3, where)

    close(g.expmap0(u, cc), m.expmap0(u, project=False), R64, A64)
    close(g.logmap0(x, cc), m.logmap0(x), R64, A64)
    close(g.mobius_add(x, y, cc), m.mobius_add(x, y, project=False), R64, A64)
    close(g.dist(x, y, cc), m.dist(x, y), R64, A64)
    close(g.pairwise_dist(x[:8], y[:10], cc), m.dist(x[:8, None], y[None, :10]), R64, A64)
    outside = x * torch.linspace(0.5, 2.0, 64, dtype=torch.float64).unsqueeze(-1)
    close(g.project(outside, cc), m.projx(outside), R64, 0.0)  # both: eps 1e-5 in fp64


def test_per_row_curvature_broadcasts():
    c = torch.tensor(CS, dtype=torch.float64)  # one curvature per row of (3, D)
    x = torch.stack([ball_points(1, ci, 5, "random")[0] for ci in CS])
    y = torch.stack([ball_points(1, ci, 6, "edge")[0] for ci in CS])
    for i, ci in enumerate(CS):
        m = ball(ci)
        close(g.dist(x, y, c)[i], m.dist(x[i], y[i]), R64, A64)
        close(g.mobius_add(x, y, c)[i], m.mobius_add(x[i], y[i], project=False), R64, A64)
        close(g.logmap0(x, c)[i], m.logmap0(x[i]), R64, A64)
        close(g.expmap0(x, c)[i], m.expmap0(x[i], project=False), R64, A64)
    # Pairwise ops take c of shape (..., 1, 1): one ball per leading index.
    xs = torch.stack([ball_points(4, ci, 7, "random") for ci in CS])
    ys = torch.stack([ball_points(5, ci, 8, "edge") for ci in CS])
    pd = g.pairwise_dist(xs, ys, c.view(3, 1, 1))
    for i, ci in enumerate(CS):
        close(pd[i], ball(ci).dist(xs[i][:, None], ys[i][None]), R64, A64)
    with pytest.raises(ValueError):
        g.pairwise_dist(xs, ys, c)


@pytest.mark.parametrize("c", CS)
def test_fp32_stable_at_edge(c):
    """fp32 at radius 0.999/sqrt(c) vs fp64 on the *same* (fp32-representable) inputs.

    Asserted relative errors (measured max in brackets): dist 2e-4 [~5e-5], logmap0 1e-4
    [~2e-5] (both amplified by 1/(1 - c|x|^2) ~ 500), expmap0 / mobius_add / project 1e-6
    [~2e-7], tangent-space distance for random directions 1e-5 [~1e-7].
    """
    x32, y32 = ball_points(512, c, 11, "edge", torch.float32), ball_points(512, c, 12, "edge", torch.float32)
    # a quarter of the pairs nearly coincide: the hard case for distances
    near = g.project(x32[:128] + 1e-3 / math.sqrt(c) * unit_dirs(128, 13, torch.float32), c)
    y32 = torch.cat([near, y32[128:]])
    u32 = tangents(512, c, 14, "edge", torch.float32)
    w32 = tangents(512, c, 15, "edge", torch.float32)
    x64, y64, u64, w64 = (t.double() for t in (x32, y32, u32, w32))

    def rel(a32, a64, bound):
        assert a32.dtype == torch.float32 and torch.isfinite(a32).all()
        if a64.dim() == 2:
            err = (a32.double() - a64).norm(dim=-1) / a64.norm(dim=-1)
        else:
            err = (a32.double() - a64).abs() / a64.abs()
        assert err.max().item() < bound

    rel(g.dist(x32, y32, c), g.dist(x64, y64, c), 2e-4)
    rel(g.logmap0(x32, c), g.logmap0(x64, c), 1e-4)
    rel(g.expmap0(u32, c), g.expmap0(u64, c), 1e-6)
    rel(g.mobius_add(x32, y32, c), g.mobius_add(x64, y64, c), 1e-6)
    rel(g.project(x32 * 1.01, c), g.project(x64 * 1.01, c, eps=1e-3), 1e-6)
    rel(g.poincare_dist_from_tangent(u32, w32, c), g.poincare_dist_from_tangent(u64, w64, c), 1e-5)


@pytest.mark.parametrize("c", CS)
def test_tangent_distance_near_parallel_fp32(c):
    """Known limit of the <q,k>-only form: |q||k| - <q,k> is known to ~1 ulp of |q||k|
    (relative error eps ~ 1.2e-7), and Z = sinh(a-b)^2 + sinh(2a) sinh(2b) gap / 2 amplifies
    it by sinh(2a)^2 / 2 ~ 5e5 at a = artanh(0.999). Near-parallel tangents at the edge
    therefore get an absolute distance error up to ~2 asinh(sqrt(0.5e6 * 4 eps)) / sqrt(c)
    ~ 1/sqrt(c) (measured max ~0.77/sqrt(c); bf16 inputs are quantised far more coarsely).
    Asserted: finite, and |error| < 1.0/sqrt(c); far from parallel see test_fp32_stable_at_edge."""
    u = tangents(1024, c, 21, "edge")
    for scale in (1e-5, 1e-4, 1e-3):
        w = u + scale / math.sqrt(c) * unit_dirs(1024, 22)
        d32 = g.poincare_dist_from_tangent(u.float(), w.float(), c)
        d64 = g.poincare_dist_from_tangent(u.float().double(), w.float().double(), c)
        assert torch.isfinite(d32).all()
        assert (d32.double() - d64).abs().max().item() < 1.0 / math.sqrt(c)


@pytest.mark.parametrize("c", CS)
def test_round_trip(c):
    u = tangents(128, c, 31, "random")
    close(g.logmap0(g.expmap0(u, c), c), u, 1e-10, 1e-12)
    x = ball_points(128, c, 32, "edge")
    close(g.expmap0(g.logmap0(x, c), c), x, 1e-12, 1e-14)
    # fp32, excluding the last 1% of radius where artanh amplifies rounding by ~500
    u32 = (u * 0.99).float()
    close(g.logmap0(g.expmap0(u32, c), c), u32, 1e-4, 1e-6)


def _finite_grads(fn, *inputs, value=None, grad=None):
    """Finite output and gradients; ``value``/``grad``: the output and the first input's
    gradient where they are known in closed form."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for t in leaves:
        assert t.grad is not None and torch.isfinite(t.grad).all()
    tol = dict(rtol=1e-5, atol=1e-5) if out.dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    if value is not None:
        torch.testing.assert_close(out.detach(), torch.as_tensor(value, dtype=out.dtype).expand_as(out), **tol)
    if grad is not None:
        torch.testing.assert_close(leaves[0].grad, torch.as_tensor(grad, dtype=out.dtype).expand_as(leaves[0]), **tol)
    return leaves


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_finite_at_origin_and_edge(dtype):
    c = 1.0
    zero = torch.zeros(4, D, dtype=dtype)
    x = ball_points(4, c, 41, "edge", dtype)
    y = ball_points(4, c, 42, "edge", dtype)
    ct = torch.tensor(c, dtype=dtype)
    _finite_grads(lambda v: g.expmap0(v, c), zero, value=0.0, grad=1.0)  # the identity to first order
    _finite_grads(lambda v: g.logmap0(v, c), zero, value=0.0, grad=1.0)
    # from the origin: d(0, y) = 2 artanh(sqrt(c) |y|) / sqrt(c)
    _finite_grads(lambda a, b: g.dist(a, b, c), zero, y, value=2 * torch.atanh(y.norm(dim=-1)))
    # distance 0: the arcosh floor keeps it finite and ~0 (fp32: its floor is sqrt(2 eps32^2))
    d_self = g.dist(x, x, c)
    assert d_self.abs().max().item() < (1e-3 if dtype == torch.float32 else 1e-6)
    _finite_grads(lambda a: g.dist(a, a, c), x)
    _finite_grads(lambda a, b: g.mobius_add(a, b, c), zero, y, value=y)  # 0 (+) y = y
    _finite_grads(lambda a, b: g.poincare_dist_from_tangent(a, b, c), zero, zero, value=0.0)
    u = tangents(4, c, 43, "edge", dtype)
    _finite_grads(lambda a: g.poincare_dist_from_tangent(a, a, c), u)
    # near the edge, including the curvature
    _finite_grads(lambda a, b, cc: g.dist(a, b, cc), x, y, ct)
    _finite_grads(lambda a, cc: g.logmap0(a, cc), x, ct)
    _finite_grads(lambda a, b, cc: g.mobius_add(a, b, cc), x, y, ct)
    _finite_grads(lambda a, cc: g.project(a * 1.5, cc), x, ct)
    w = tangents(4, c, 44, "edge", dtype)
    _finite_grads(lambda a, b, cc: g.poincare_dist_from_tangent(a, b, cc), u * 2, w, ct)
    _, _, cg = _finite_grads(lambda a, b, cc: g.pairwise_poincare_dist_from_tangent(a, b, cc), u, w, ct)
    assert cg.grad.abs() > 0


@pytest.mark.parametrize("c", CS)
@pytest.mark.parametrize("where", ["random", "edge"])
def test_dist_from_tangent_matches_dist_of_expmap0(c, where):
    # Random tangents stay below the clamp; "edge" sits exactly at it.
    q, k = tangents(64, c, 51, where), tangents(64, c, 52, where)
    expected = g.dist(g.expmap0(q, c), g.expmap0(k, c), c)
    close(g.poincare_dist_from_tangent(q, k, c), expected, 1e-10, 1e-10)
    close(g.poincare_dist_from_tangent(q, k, torch.tensor(c, dtype=torch.float64)), expected, 1e-10, 1e-10)
    pair = g.pairwise_poincare_dist_from_tangent(q[:8], k[:9], c)
    close(pair, g.pairwise_dist(g.expmap0(q[:8], c), g.expmap0(k[:9], c), c), 1e-10, 1e-10)
    close(pair, ball(c).dist(ball(c).expmap0(q[:8, None], project=False), ball(c).expmap0(k[None, :9], project=False)), R64, A64)


def test_dist_from_tangent_clamps_to_edge():
    """Tangents beyond artanh(0.999)/sqrt(c) act like points projected to radius 0.999/sqrt(c)."""
    c = 2.0
    q, k = tangents(32, c, 61, "edge") * 3.0, tangents(32, c, 62, "random")
    proj = g.project(g.expmap0(q, c), c, eps=1e-3)
    close(g.poincare_dist_from_tangent(q, k, c), g.dist(proj, g.expmap0(k, c), c), 1e-9, 1e-9)


def test_low_precision_inputs_compute_in_fp32():
    x = ball_points(8, 1.0, 71, "random")
    for fn in (lambda t: g.expmap0(t, 1.0), lambda t: g.logmap0(t, 1.0), lambda t: g.dist(t, t.flip(0), 1.0)):
        for dt in (torch.bfloat16, torch.float16):
            out = fn(x.to(dt))
            assert out.dtype == torch.float32
            close(out, fn(x.to(dt).float()), 0.0, 0.0)
    assert g.poincare_dist_from_tangent(x.bfloat16(), x.flip(0).bfloat16(), 1.0).dtype == torch.float32

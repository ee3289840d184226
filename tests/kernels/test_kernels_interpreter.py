"""Triton kernels vs their torch references in the Triton CPU interpreter (small fp32 shapes,
float64 references): forward and every gradient, windowed and full causal, odd lengths,
padded head dims, the AR-SSM scan under both schedules; torch.library.opcheck; selection
plumbing; doctor on a CPU machine."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import importlib

import pytest
import torch

triton = pytest.importorskip("triton")

from phase7fw.kernels import select, triton_usable  # noqa: E402
from phase7fw.kernels.ar_ssm_scan import ar_ssm_scan_sequential  # noqa: E402
from phase7fw.kernels.hyperbolic_attention import hyperbolic_attention_reference  # noqa: E402

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("TRITON_INTERPRET=0: these tests run the kernels in Triton's CPU interpreter (on a GPU: tests/gpu)",
                allow_module_level=True)


def _rel(a, b):
    """Relative error, with an absolute floor of 1e-3 on the reference norm (a gradient that is
    exactly zero, e.g. dq for window 1, is then compared absolutely)."""
    return ((a.double() - b.double()).norm() / (b.double().norm() + 1e-3)).item()


def _attention_case(B, H, T, D, W, scale=0.5, seed=0, dtype=torch.float32, score="distance"):
    from phase7fw.kernels.hyperbolic_attention.kernel import hyperbolic_attention_triton

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64) * scale
    k = torch.randn(B, H, T, D, generator=g, dtype=torch.float64) * scale
    v = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    c = 0.5 + torch.rand(H, generator=g, dtype=torch.float64)
    tau = 0.5 + torch.rand(H, generator=g, dtype=torch.float64)
    # the kernel sees the inputs rounded to `dtype`; the reference sees the same values in fp64
    q, k, v = (t.to(dtype).double() for t in (q, k, v))
    ref_in = [t.clone().requires_grad_() for t in (q, k, v, c, tau)]
    ref = hyperbolic_attention_reference(*ref_in, W, score=score)
    gout = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(dtype).double()
    ref_g = torch.autograd.grad(ref, ref_in, gout)
    ins = [t.to(dtype).clone().requires_grad_() if i < 3 else t.float().clone().requires_grad_()
           for i, t in enumerate((q, k, v, c, tau))]
    out = hyperbolic_attention_triton(*ins, W, score=score)
    got_g = torch.autograd.grad(out, ins, gout.to(out.dtype))
    return out, ref, got_g, ref_g


@pytest.mark.parametrize("score", ["distance", "squared_distance", "dot_distance"])
@pytest.mark.parametrize(
    "B,H,T,D,W",
    [
        (1, 2, 37, 16, 5),  # odd length, narrow window (key blocks skipped)
        (2, 2, 40, 16, 100),  # W >= T: full causal
        (1, 1, 33, 12, 16),  # head dim padded to 16, window == block
        (1, 2, 50, 16, 1),  # window 1: only j = i
        (1, 2, 100, 16, 40),  # window with unmasked interior blocks in both passes
    ],
)
def test_attention_matches_reference(B, H, T, D, W, score):
    out, ref, got, want = _attention_case(B, H, T, D, W, score=score)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-5
    for name, a, b in zip(("q", "k", "v", "c", "tau"), got, want):
        assert a.shape == b.shape, name
        if W == 1 and name != "v":
            # o_i = v_i: dq, dk, dc, dtau are exactly 0 in the reference, rounding noise here
            assert (a.double() - b).norm() < 1e-3, (name, (a.double() - b).norm())
        else:
            # d(tau), d(c) sum dS * arcosh^m over all pairs; Delta = dO . O comes from the
            # forward's fp32 O, whose ~1e-6 error is weighted by arcosh^2 (up to ~20 here)
            # with squared scores: fp32 conditioning (1.6e-4 seen; the torch fp32 reference
            # itself is off by 2e-5), still 60x inside the bf16 gate.
            tol = 5e-4 if score == "squared_distance" and name in ("c", "tau") else 1e-4
            assert _rel(a, b) < tol, (name, _rel(a, b))


@pytest.mark.parametrize("score", ["distance", "squared_distance", "dot_distance"])
def test_attention_near_boundary_finite_and_accurate(score):
    # sqrt(c)|q| up to ~6: many rows are beyond the tangent clamp (radius 0.999/sqrt(c))
    out, ref, got, want = _attention_case(1, 2, 40, 16, 20, scale=1.5, seed=3, score=score)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in got)
    assert _rel(out, ref) < 1e-4
    for name, a, b in zip(("q", "k", "v", "c", "tau"), got, want):
        # squared scores reach -tau arcosh^2 / c ~ -100 here: see test_attention_matches_reference
        tol = 3e-3 if score == "squared_distance" and name in ("c", "tau") else 1e-3
        assert _rel(a, b) < tol, (name, _rel(a, b))


def test_attention_half_precision_path():
    # fp16 is the 16-bit type the interpreter handles (bf16 is checked on the GPU): exercises
    # the split-P forward and the tf32 gradient matmuls of the half-precision path.
    out, ref, got, want = _attention_case(1, 2, 40, 16, 24, dtype=torch.float16)
    assert out.dtype == torch.float16
    assert _rel(out, ref) < 2e-3
    for name, a, b in zip(("q", "k", "v", "c", "tau"), got, want):
        assert _rel(a, b) < 5e-3, (name, _rel(a, b))


SCHEDULES = ("rows", "chunks")  # [kernels.ar_ssm_scan] schedule: every scan case runs under both


def _ssm_inputs(b, h, T, dv, r, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, T, dv, generator=g, dtype=torch.float64)
    B = torch.randn(b, h, T, r, generator=g, dtype=torch.float64) * 0.5
    C = torch.randn(b, h, T, r, generator=g, dtype=torch.float64) * 0.5
    ld = -torch.rand(b, h, T, generator=g, dtype=torch.float64) * 0.5
    gy = torch.randn(b, h, T, dv, generator=g, dtype=torch.float64)
    return [x, B, C, ld], gy


def _ssm_vs_sequential(base, gy, schedule):
    """The kernel (fp32) under ``schedule`` and the fp64 recurrence: rel. errors of y and of
    the gradients to x, B, C, log_decay (each asserted to be exercised: non-zero)."""
    from phase7fw.kernels.ar_ssm_scan import TritonConfig as SsmConfig
    from phase7fw.kernels.ar_ssm_scan.kernel import ar_ssm_scan_triton

    ref_in = [t.clone().requires_grad_() for t in base]
    ref = ar_ssm_scan_sequential(*ref_in)
    want = torch.autograd.grad(ref, ref_in, gy)
    ins = [t.float().clone().requires_grad_() for t in base]
    y = ar_ssm_scan_triton(*ins, tuning=SsmConfig(schedule=schedule))
    got = torch.autograd.grad(y, ins, gy.float())
    assert all(w.abs().sum() > 0 for w in want)
    return _rel(y, ref), {name: _rel(a, bb) for name, a, bb in zip(("x", "B", "C", "log_decay"), got, want)}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("b,h,T,dv,r", [
    (1, 2, 37, 8, 4),  # odd T: two full chunks of 16 and a partial one
    (2, 1, 50, 40, 20),  # two dv tiles (of 32), rank padded to 32
    (1, 1, 16, 16, 16),  # one chunk, exactly full
    (1, 1, 5, 8, 4),  # one partial chunk
    (1, 1, 16 * 33 + 5, 40, 4),  # 34 chunks: the inter-chunk scan takes three steps of 16; two dv tiles
])
def test_ssm_scan_matches_sequential(b, h, T, dv, r, schedule):
    base, gy = _ssm_inputs(b, h, T, dv, r)
    err_y, err_g = _ssm_vs_sequential(base, gy, schedule)
    assert err_y < 1e-5
    assert all(e < 1e-4 for e in err_g.values()), err_g


def test_ssm_chunks_schedule_with_vanishing_and_no_decay():
    """The inter-chunk scan with chunks whose decay vanishes (a token at log-decay -1000: a
    difference of running sums would lose the others) and chunks without decay (0)."""
    base, gy = _ssm_inputs(1, 2, 16 * 20 + 3, 8, 4, seed=4)
    ld = base[3]
    ld[0, 0, 16 * 3 + 7], ld[0, 1, 16 * 11] = -1000.0, -1000.0
    ld[0, 0, 16 * 5: 16 * 9] = 0.0
    err_y, err_g = _ssm_vs_sequential(base, gy, "chunks")
    assert err_y < 1e-5
    assert all(e < 1e-4 for e in err_g.values()), err_g


def test_ssm_schedules_agree_and_share_the_saved_states(monkeypatch):
    """Both schedules give the same y and the same states entering each chunk (the layout the
    backward reads), so the backward of either schedule accepts the states of either forward;
    "chunks" selected through the recipe override reaches the kernel."""
    import phase7fw.kernels.ar_ssm_scan.kernel as K
    from phase7fw.kernels import KernelImpl
    from phase7fw.plugins import load_plugins
    from phase7fw.recipe import load_recipe

    (x, B, C, ld), gy = _ssm_inputs(1, 1, 16 * 17 + 9, 40, 12, seed=2)
    x, B, C, ld, gy = (t.float() for t in (x, B, C, ld, gy))
    fwd, bwd = torch.ops.phase7fw.ar_ssm_scan_fwd, torch.ops.phase7fw.ar_ssm_scan_bwd
    y_r, s_r = fwd(x, B, C, ld, [32, 64, 4, 1], "ieee", "rows")
    y_c, s_c = fwd(x, B, C, ld, [32, 64, 4, 1], "ieee", "chunks")
    assert s_r.shape == s_c.shape == (1, 1, 18, 12, 40)
    assert _rel(y_c, y_r) < 1e-6 and _rel(s_c, s_r) < 1e-6
    g_r = bwd(x, B, C, ld, s_r, gy, [32, 64, 4, 1], "ieee", "rows")
    for states in (s_r, s_c):
        g_c = bwd(x, B, C, ld, states, gy, [32, 64, 4, 1], "ieee", "chunks")
        for name, a, bb in zip(("x", "B", "C", "log_decay"), g_c, g_r):
            assert _rel(a, bb) < 1e-6, (name, _rel(a, bb))

    plugins = load_plugins()
    recipe = load_recipe("recipes/phase7_tiny.toml", ['kernels.ar_ssm_scan={impl="triton", schedule="chunks"}'],
                         plugins=plugins)
    choice = recipe.kernels["ar_ssm_scan"]
    impl = select({"registry": plugins.registry, "kernels": {"ar_ssm_scan": KernelImpl(choice.impl, choice.config)}},
                  "ar_ssm_scan", None)
    launched, real = [], K._fwd_impl
    monkeypatch.setattr(K, "_fwd_impl", lambda *a: launched.append(a[-1]) or real(*a))
    y = impl(x[:, :, :20], B[:, :, :20], C[:, :, :20], ld[:, :, :20])
    assert launched == ["chunks"] and _rel(y, y_r[:, :, :20]) < 1e-6


def test_ssm_smoke_rows_check_both_schedules():
    """The doctor's rows (phase7fw/kernels/ar_ssm_scan/verify.py): one per schedule, both gated."""
    from phase7fw.kernels.ar_ssm_scan.verify import smoke_rows

    rows = smoke_rows(torch.device("cpu"))
    assert [r.case for r in rows] == ["tiny", "tiny [chunks]"]
    assert all(r.ok for r in rows), [(r.case, r.detail, r.errors) for r in rows]
    assert all(set(r.errors) == {"out", "dx", "dB", "dC", "dlog_decay"} for r in rows)


def test_ssm_unknown_schedule_is_refused_naming_the_key():
    import phase7fw.kernels.ar_ssm_scan.kernel as K
    from phase7fw.kernels.ar_ssm_scan import TritonConfig as SsmConfig

    (x, B, C, ld), _ = _ssm_inputs(1, 1, 20, 8, 4)
    x, B, C, ld = (t.float() for t in (x, B, C, ld))
    message = r"\[kernels.ar_ssm_scan\] schedule: expected one of 'auto', 'rows', 'chunks', got 'diagonal'"
    with pytest.raises(ValueError, match=message):
        K.ar_ssm_scan_triton(x, B, C, ld, tuning=SsmConfig(schedule="diagonal"))
    with pytest.raises(ValueError, match=message):
        torch.ops.phase7fw.ar_ssm_scan_fwd(x, B, C, ld, [32, 64, 4, 1], "ieee", "diagonal")


def test_ssm_auto_schedule_takes_chunks_only_where_rows_leaves_sms_idle():
    from phase7fw.kernels.ar_ssm_scan.kernel import pick_schedule

    # dv tiles x batch x heads programs against a 132-SM GPU (an H100)
    assert pick_schedule("auto", 4 * 8 * 8, 132) == "rows"      # (8, 8, 1024, dv 256): measured faster
    assert pick_schedule("auto", 4 * 1 * 8, 132) == "chunks"    # (1, 8, 16384, dv 256): measured faster
    assert pick_schedule("auto", 132, 132) == "rows"
    assert pick_schedule("auto", 4, None) == "rows"             # the interpreter
    assert pick_schedule("chunks", 10_000, 132) == "chunks"     # an explicit choice is kept
    assert pick_schedule("rows", 1, 132) == "rows"


def test_ssm_auto_schedule_matches_sequential_in_the_interpreter():
    base, gy = _ssm_inputs(2, 2, 37, 24, 8)
    err_y, err_g = _ssm_vs_sequential(base, gy, "auto")
    assert err_y < 1e-5
    assert all(e < 1e-4 for e in err_g.values()), err_g


@pytest.mark.parametrize("score", ["distance", "squared_distance", "dot_distance"])
def test_opcheck_attention(score):
    importlib.import_module("phase7fw.kernels.hyperbolic_attention.kernel")  # registers the op

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g) * 0.5 for _ in range(3))
    args = [t.requires_grad_() for t in (q, k, v, torch.tensor([0.81, 1.21]), torch.tensor([1.0, 0.7]))]
    tiles = [64, 64, 4, 2, 32, 32, 4, 1, 64, 4, 1]  # the GPU launch configuration travels with the op
    torch.library.opcheck(torch.ops.phase7fw.hyperbolic_attention_fwd.default, (*args, 7, score, tiles, False),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("schedule", [(), ("rows",), ("chunks",), ("auto",)])  # (): the signature before schedules existed
def test_opcheck_ssm(schedule):
    importlib.import_module("phase7fw.kernels.ar_ssm_scan.kernel")  # registers the op

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 20, 8, generator=g)
    B, C = torch.randn(1, 2, 20, 4, generator=g), torch.randn(1, 2, 20, 4, generator=g)
    ld = -torch.rand(1, 2, 20, generator=g)
    args = [t.requires_grad_() for t in (x, B, C, ld)]
    torch.library.opcheck(torch.ops.phase7fw.ar_ssm_scan_fwd.default, (*args, [32, 64, 4, 1], "ieee", *schedule),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_triton_usable_reports_the_reason(monkeypatch):
    assert triton_usable("cpu")[0]  # interpreter on
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = triton_usable("cpu")
    assert not ok and "CUDA" in why


def test_select_returns_registered_kernel():
    from phase7fw.kernels.ar_ssm_scan import TritonConfig as SsmConfig
    from phase7fw.kernels.ar_ssm_scan.kernel import ar_ssm_scan_triton
    from phase7fw.kernels.hyperbolic_attention import TritonConfig as AttnConfig
    from phase7fw.kernels.hyperbolic_attention.kernel import hyperbolic_attention_triton
    from phase7fw.plugins import load_plugins

    reg = load_plugins().registry
    assert ("kernel", "hyperbolic_attention:triton") in reg and ("kernel", "ar_ssm_scan:triton") in reg
    ctx = {"registry": reg, "kernels": {"hyperbolic_attention": "triton", "ar_ssm_scan": "reference"}}
    picked = select(ctx, "hyperbolic_attention", hyperbolic_attention_reference)
    assert picked.__wrapped__ is hyperbolic_attention_triton  # with the default tuning ([kernels.<op>])
    assert picked.keywords == {"tuning": AttnConfig()}
    assert select(ctx, "ar_ssm_scan", ar_ssm_scan_sequential) is ar_ssm_scan_sequential
    picked = select({"registry": reg, "kernels": {"ar_ssm_scan": "triton"}}, "ar_ssm_scan", None)
    assert picked.__wrapped__ is ar_ssm_scan_triton and picked.keywords == {"tuning": SsmConfig()}


def test_tiny_model_same_output_and_checkpoint_layout():
    from phase7fw.core.build import build_model
    from phase7fw.kernels.verify import OPS as KERNEL_OPS

    recipe = "recipes/phase7_tiny.toml"
    torch.manual_seed(0)
    ref_model = build_model(recipe, "cpu", vocab_size=300)
    chosen = {op: "reference" for op in KERNEL_OPS} | {"hyperbolic_attention": "triton", "ar_ssm_scan": "triton"}
    torch.manual_seed(0)
    tri_model = build_model(recipe, "cpu", vocab_size=300, kernels=chosen)
    assert tri_model.blocks[0].attn.attention_fn is not ref_model.blocks[0].attn.attention_fn
    ref_sd, tri_sd = ref_model.state_dict(), tri_model.state_dict()
    assert list(ref_sd) == list(tri_sd)  # checkpoint layout does not depend on the kernels
    assert all(torch.equal(ref_sd[k], tri_sd[k]) for k in ref_sd)
    ids = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        a, b = ref_model(ids), tri_model(ids)
    assert torch.allclose(a, b, atol=2e-4, rtol=1e-4), (a - b).abs().max()


def test_doctor_on_cpu(capsys, monkeypatch):
    from phase7fw.cli.doctor import run_doctor

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert run_doctor() == 0
    out = capsys.readouterr().out
    # registered but not usable: the kernels line says which code runs, and lists no kernel as if usable
    [line] = [l for l in out.splitlines() if l.startswith("kernels ")]
    assert "not usable here" in line and "reference torch code is used" in line
    assert ":triton" not in out
    assert run_doctor(require_gpu=True) == 1

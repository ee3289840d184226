"""The hyperbolic linear attention Triton kernel in Triton's CPU interpreter (small fp32
shapes) against the fp64 quadratic reference: output and every gradient (q, k, v, c, decay),
odd lengths, several value tiles, padded head dims, no decay, focusing, one chunk and many;
the inter-chunk scan against the sequential recurrence; torch.library
registration (opcheck); selection through the registry; bad input named."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest
import torch

triton = pytest.importorskip("triton")

from phase7fw.kernels.hyperbolic_linear_attention import (  # noqa: E402
    hyperbolic_linear_attention_chunked,
    hyperbolic_linear_attention_quadratic,
)
from tests.conftest import load_benchmark  # noqa: E402
from tests.kernels.model_check import assert_same_loss_and_grads  # noqa: E402

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("TRITON_INTERPRET=0: these tests run the kernels in Triton's CPU interpreter (on a GPU: tests/gpu)",
                allow_module_level=True)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / (b.double().norm() + 1e-3)).item()


def _case(B, H, T, D, Dv, chunk, decay=True, focus=1.0, seed=0):
    from phase7fw.kernels.hyperbolic_linear_attention.kernel import hyperbolic_linear_attention_triton

    g = torch.Generator().manual_seed(seed)
    c = 0.5 + torch.rand(H, generator=g, dtype=torch.float64)
    # tangent norms sqrt(c)|u| around 1.2: most inside the clamp (1.5), some beyond it
    u = lambda: torch.randn(B, H, T, D, generator=g, dtype=torch.float64) * (1.2 / D**0.5)  # noqa: E731
    q, k = u() / c.sqrt().view(1, H, 1, 1), u() / c.sqrt().view(1, H, 1, 1)
    v = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)
    ld = -0.3 * torch.rand(B, H, T, generator=g, dtype=torch.float64) if decay else None
    base = [t for t in (q, k, v, c, ld) if t is not None]
    ref_in = [t.clone().requires_grad_() for t in base]
    ref = hyperbolic_linear_attention_quadratic(*ref_in[:4], ref_in[4] if decay else None, focus)
    gout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_g = torch.autograd.grad(ref, ref_in, gout)
    ins = [t.float().clone().requires_grad_() for t in base]
    out = hyperbolic_linear_attention_triton(*ins[:4], ins[4] if decay else None, focus, chunk)
    got_g = torch.autograd.grad(out, ins, gout.float())
    return out, ref, got_g, ref_g


@pytest.mark.parametrize(
    "B,H,T,D,Dv,chunk,decay,focus",
    [
        (1, 2, 37, 8, 6, 16, True, 1.0),  # odd length, head dims padded to 16
        (2, 2, 50, 16, 40, 16, True, 1.0),  # two value tiles (the normalizer column in tile 0 only)
        (1, 1, 33, 12, 16, 32, False, 1.0),  # no decay, one partial chunk after a full one
        (1, 2, 20, 16, 16, 16, True, 3.0),  # focused directions
        (1, 1, 16, 16, 16, 64, True, 1.0),  # one chunk longer than the sequence
        (1, 1, 16, 16, 16, 16, True, 1.0),  # one chunk, exactly full
        (1, 2, 64, 8, 6, 16, True, 1.0),  # T an exact multiple of the chunk
        (1, 1, 16 * 33 + 5, 8, 40, 16, True, 1.0),  # 34 chunks: three scan steps of 16, two value tiles
    ],
)
def test_kernel_matches_fp64_reference(B, H, T, D, Dv, chunk, decay, focus):
    out, ref, got_g, ref_g = _case(B, H, T, D, Dv, chunk, decay, focus)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert _rel(out, ref) < 1e-5
    names = ["q", "k", "v", "c", "decay"][: len(ref_g)]
    for name, a, b in zip(names, got_g, ref_g):
        assert torch.isfinite(a).all(), name
        assert b.abs().sum() > 0, name  # the case exercises this gradient
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))


def _sequential_scan(x, totals, reverse):
    """fp64: the running sum entering each chunk in walking order, R <- exp(total_c) R + x_c."""
    x, g = x.double().flatten(3), totals.double().view(*x.shape[:2], -1, 1)
    out, run = torch.empty_like(x), torch.zeros_like(x[:, :, 0])
    for c in reversed(range(x.shape[2])) if reverse else range(x.shape[2]):
        out[:, :, c] = run
        run = g[:, :, c].exp() * run + x[:, :, c]
    return out


@pytest.mark.parametrize("n,block,reverse", [(1, 16, False), (16, 16, True), (17, 64, False), (40, 256, True),
                                             (40, 16, False)])
def test_inter_chunk_scan_matches_the_sequential_recurrence(n, block, reverse):
    """Phase 2 alone: one scan step of 16 chunks, a partial one, several; state and
    normalizer columns split over several programs (D + 1 = 9 rows, Dv = 6 at 16 elements);
    decays that vanish (-1000: a difference of running sums would lose the small ones) and
    none (0)."""
    from phase7fw.kernels._chunked import chunk_scan

    g = torch.Generator().manual_seed(n)
    states, zstates = torch.randn(2, 1, n, 9, 6, generator=g), torch.rand(2, 1, n, 9, generator=g)
    totals = -3 * torch.rand(2, n, generator=g)
    totals[0, ::5], totals[1, 1::3] = -1000.0, 0.0
    want_s, want_z = (_sequential_scan(t, totals, reverse) for t in (states, zstates))
    chunk_scan(totals, (states, zstates), (block, 1, 1), reverse)
    for got, want in ((states, want_s), (zstates, want_z)):
        assert (got.flatten(3).double() - want).abs().max() <= 1e-6 * want.abs().max()


def test_kernel_equals_the_torch_chunked_form_bitwise_close():
    from phase7fw.kernels.hyperbolic_linear_attention.kernel import hyperbolic_linear_attention_triton

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 45, 16, generator=g) * 0.3 for _ in range(3))
    c, ld = torch.tensor([0.7, 1.3]), -0.1 * torch.rand(1, 2, 45, generator=g)
    a = hyperbolic_linear_attention_triton(q, k, v, c, ld, 1.0, 16)
    b = hyperbolic_linear_attention_chunked(q, k, v, c, ld, chunk_size=16)
    assert (a - b).abs().max().item() < 1e-6


def test_registered_ops_pass_opcheck():
    from phase7fw.kernels.hyperbolic_linear_attention.kernel import hla_fwd
    from phase7fw.kernels.hyperbolic_linear_attention.reference import feature_parts

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g) * 0.3 for _ in range(3))
    c = torch.tensor([0.5, 1.0])
    fq0, fq = (x.detach().requires_grad_() for x in feature_parts(q, c, query=True))
    fk0, fk = (x.detach().requires_grad_() for x in feature_parts(k, c))
    ld = (-0.1 * torch.rand(1, 2, 20, generator=g)).requires_grad_()
    torch.library.opcheck(hla_fwd, (fq, fq0, fk, fk0, v.requires_grad_(), ld, 16, [64, 8, 1], "tf32"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_selected_through_the_registry_and_rejects_bad_input():
    from phase7fw.kernels import select
    from phase7fw.kernels.hyperbolic_linear_attention.kernel import hyperbolic_linear_attention_triton
    from phase7fw.plugins import load_plugins

    reg = load_plugins().registry
    ctx = {"registry": reg, "kernels": {"hyperbolic_linear_attention": "triton"}}
    fn = select(ctx, "hyperbolic_linear_attention", hyperbolic_linear_attention_chunked)
    assert fn.__module__ == "phase7fw.kernels.hyperbolic_linear_attention.kernel"
    assert select({"registry": reg, "kernels": {}}, "hyperbolic_linear_attention",
                  hyperbolic_linear_attention_chunked) is hyperbolic_linear_attention_chunked
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="power of two"):
        hyperbolic_linear_attention_triton(q, q, q, 1.0, None, 1.0, 24)
    with pytest.raises(ValueError, match="not fp64"):
        hyperbolic_linear_attention_triton(q.double(), q.double(), q.double(), 1.0, None, 1.0, 16)


def test_phase8_model_with_the_kernel_compiles_fullgraph_and_matches_the_reference_model():
    """The kernel inside the Phase 8 model: same loss and gradients as the torch chunked form,
    and a block compiles with fullgraph=True (the custom ops are opaque, no graph break)."""
    from phase7fw import build_model, load_recipe

    over = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.seq_len": 40,
            "model.attention.chunk_size": 16, "model.ssm.n_heads": 2, "model.ssm.chunk_size": 8}
    rec = load_recipe("recipes/phase8_tiny.toml", over)
    torch.manual_seed(0)
    ref = build_model(rec, "cpu", vocab_size=300)
    fast = build_model(rec, "cpu", vocab_size=300, kernels={"hyperbolic_linear_attention": "triton"})
    fast.load_state_dict(ref.state_dict())
    assert fast.blocks[0].attn.attention_fn.__module__.endswith("hyperbolic_linear_attention.kernel")
    for block in fast.blocks:
        block.compile(backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    assert_same_loss_and_grads(ref, fast, ids, prepare=lambda model: model.set_curvature(0.6))


def test_launch_sweep_runs_each_candidate_and_picks_the_fastest(monkeypatch):
    """benchmarks/kernels.py --hla-sweep (what a GPU measures): on the CPU each launch
    candidate runs the kernel in the interpreter (fwd + bwd), the pick is the fastest, and
    SDPA's time sits beside it (the math path here)."""
    import phase7fw.kernels.checks as checks

    bench = load_benchmark("kernels")  # by path: a package named "kernels" may be installed too

    fake = iter([3.0, 2.0, 5.0])  # the two candidates, then SDPA

    def gpu_time_ms(fn, reps=20):
        fn()  # runs for real: a kernel failure surfaces here
        return next(fake)

    monkeypatch.setattr(checks, "gpu_time_ms", gpu_time_ms)
    monkeypatch.setattr(bench, "HLA_SWEEP", [(32, 4, 1), (16, 4, 1)])
    log = bench.hla_sweep(torch.device("cpu"), shape=(1, 2, 40, 32), dtype=torch.float32)
    assert log["hla_gpu_ms"] == {"(32, 4, 1)": 3.0, "(16, 4, 1)": 2.0}
    assert log["pick"] == [16, 4, 1] and log["sdpa_math_causal_gpu_ms"] == 5.0 and log["pick_vs_sdpa"] == 0.4


def test_the_op_profile_times_it_eager_and_compiled_next_to_sdpa_and_names_the_kernels(monkeypatch, capsys):
    """benchmarks/kernels.py --hla-profile on the CPU: both forms of the op run for real (the
    kernels in the interpreter), the times land in the log, and the profiler table names the
    op's Triton kernels."""
    import phase7fw.kernels.checks as checks

    bench = load_benchmark("kernels")
    fake = iter([4.0, 6.0, 5.0])  # SDPA, eager, compiled

    def gpu_time_ms(fn, reps=20):
        fn()
        return next(fake)

    monkeypatch.setattr(checks, "gpu_time_ms", gpu_time_ms)
    log = bench.hla_profile(torch.device("cpu"), shape=(1, 2, 40, 32), dtype=torch.float32, compile_backend="aot_eager")
    torch._dynamo.reset()
    assert log == {"shape": [1, 2, 40, 32], "sdpa_cudnn_gpu_ms": 4.0, "eager_gpu_ms": 6.0, "compiled_gpu_ms": 5.0}
    out = capsys.readouterr().out
    assert "eager: 6.000 ms per call (SDPA 4.000)" in out and "compiled: 5.000 ms per call" in out
    assert "hyperbolic_linear_attention_bwd" in out


"""The AR-SSM's causal depthwise convolution in Triton (CPU interpreter, fp32, float64
references) against its torch reference: forward and the gradients of u, weight and bias for
odd sizes, kernels 1-4, sequences shorter than the kernel and strided inputs; the dtype
contract (autocast as F.conv1d); torch.library registration (opcheck); bad input named; the
kernel selected inside a phase7 model."""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest
import torch

triton = pytest.importorskip("triton")

from phase7fw.kernels.causal_conv import causal_conv_reference  # noqa: E402

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("TRITON_INTERPRET=0: these tests run the kernels in Triton's CPU interpreter (on a GPU: tests/gpu)",
                allow_module_level=True)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / (b.double().norm() + 1e-12)).item()


def _inputs(b, t, d, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, t, d, generator=g), torch.randn(d, 1, K, generator=g), torch.randn(d, generator=g),
            torch.randn(b, t, d, generator=g))


def _grads(fn, u, w, bias, gy):
    ins = [x.clone().requires_grad_() for x in (u, w, bias)]
    y = fn(*ins)
    return y, torch.autograd.grad(y, ins, gy)


@pytest.mark.parametrize("b,t,d,K", [
    (2, 37, 130, 4),  # odd length, two channel tiles (the second partial), two time tiles
    (1, 3, 7, 4),     # sequence shorter than the kernel: every output reads left zeros
    (3, 70, 64, 3),
    (1, 1, 9, 1),     # K = 1: a per-channel scale and shift
])
def test_matches_reference_forward_and_every_gradient(b, t, d, K):
    from phase7fw.kernels.causal_conv.kernel import causal_conv_triton

    u, w, bias, gy = _inputs(b, t, d, K)
    y, got = _grads(causal_conv_triton, u, w, bias, gy)
    ref, want = _grads(causal_conv_reference, u.double(), w.double(), bias.double(), gy.double())
    assert y.shape == (b, t, d) and y.dtype == torch.float32
    assert _rel(y, ref) < 1e-6
    for name, a, r in zip(("u", "weight", "bias"), got, want):
        assert a.shape == r.shape and a.dtype == torch.float32, name
        assert _rel(a, r) < 1e-6, (name, _rel(a, r))


def test_causal_output_t_reads_only_inputs_up_to_t():
    from phase7fw.kernels.causal_conv.kernel import causal_conv_triton

    u, w, bias, _ = _inputs(1, 20, 5, 4, seed=1)
    changed = u.clone()
    changed[:, 12] += 1.0
    y0, y1 = causal_conv_triton(u, w, bias), causal_conv_triton(changed, w, bias)
    assert torch.equal(y0[:, :12], y1[:, :12]) and not torch.equal(y0[:, 12:16], y1[:, 12:16])
    assert torch.equal(y0[:, 16:], y1[:, 16:])  # K = 4: t = 12 reaches outputs 12..15 only


def test_strided_input_of_a_wider_projection():
    """u as a slice of a wider (b, t, 2d) tensor (channel stride 1, row stride 2d): no copy needed."""
    from phase7fw.kernels.causal_conv.kernel import causal_conv_triton

    g = torch.Generator().manual_seed(2)
    wide = torch.randn(2, 11, 2 * 33, generator=g, requires_grad=True)
    _, w, bias, gy = _inputs(2, 11, 33, 4, seed=3)
    y = causal_conv_triton(wide[..., 33:], w, bias)
    (dwide,) = torch.autograd.grad(y, wide, gy)
    ref_wide = wide.detach().double().requires_grad_()
    ref = causal_conv_reference(ref_wide[..., 33:], w.double(), bias.double())
    (dref,) = torch.autograd.grad(ref, ref_wide, gy.double())
    assert _rel(y, ref) < 1e-6 and _rel(dwide, dref) < 1e-6 and dwide[..., :33].abs().max() == 0


def test_autocast_casts_like_conv1d():
    """Under autocast F.conv1d runs in the autocast dtype; the kernel casts its inputs the same
    way, so output and gradients keep the reference's dtypes (values: bf16 is not faithful
    in the interpreter, so only a loose check)."""
    from phase7fw.kernels.causal_conv.kernel import causal_conv_triton

    u, w, bias, gy = _inputs(2, 9, 16, 4, seed=4)
    outs = []
    for fn in (causal_conv_triton, causal_conv_reference):
        ins = [x.clone().requires_grad_() for x in (u, w, bias)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(*ins)
        grads = torch.autograd.grad(y, ins, gy.to(y.dtype))
        outs.append((y, grads))
    (y, grads), (ref, ref_grads) = outs
    assert y.dtype == ref.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [g.dtype for g in ref_grads] == [torch.float32] * 3
    assert _rel(y, ref) < 2e-2


def test_compiles_fullgraph_under_autocast():
    """Training compiles each block under autocast: the wrapper's autocast query traces."""
    from phase7fw.kernels.causal_conv.kernel import causal_conv_triton

    u, w, bias, _ = _inputs(2, 9, 16, 4, seed=6)
    ins = [x.clone().requires_grad_() for x in (u, w, bias)]
    fn = torch.compile(lambda *a: causal_conv_triton(*a).float().square().sum(), backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fn(*ins)
    torch._dynamo.reset()
    assert torch.autograd.grad(loss, ins)[1].shape == (16, 1, 4)


def test_bad_input_is_named():
    from phase7fw.kernels.causal_conv.kernel import causal_conv_triton

    u, w, bias, _ = _inputs(1, 5, 8, 4)
    with pytest.raises(ValueError, match=r"expected u \(b, t, d\), weight \(d, 1, K\), bias \(d\), got u \(1, 5, 8\), weight \(7, 1, 4\)"):
        causal_conv_triton(u, w[:7], bias)
    with pytest.raises(ValueError, match="not fp64"):
        causal_conv_triton(u.double(), w.double(), bias.double())


def test_opcheck():
    importlib.import_module("phase7fw.kernels.causal_conv.kernel")  # registers the ops

    u, w, bias, gy = _inputs(2, 13, 9, 4, seed=5)
    w2 = w.reshape(9, 4).contiguous()
    torch.library.opcheck(torch.ops.phase7fw.causal_conv_fwd.default,
                          (u.requires_grad_(), w2.requires_grad_(), bias.requires_grad_()),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.phase7fw.causal_conv_bwd.default, (u.detach(), w2.detach(), gy),
                          test_utils=("test_schema", "test_faketensor"))


def test_smoke_row_passes():
    from phase7fw.kernels.causal_conv import verify

    rows = verify.smoke_rows(torch.device("cpu"))
    assert [r.op for r in rows] == ["causal_conv"] and all(r.ok for r in rows), rows


def test_selected_in_a_phase7_model_same_loss_and_gradients():
    from phase7fw import build_model, load_recipe
    from phase7fw.kernels.causal_conv.kernel import causal_conv_triton
    from tests.kernels.model_check import assert_same_loss_and_grads

    rec = load_recipe("recipes/phase7_tiny.toml", {"model.n_layers": 2, "model.seq_len": 40})
    torch.manual_seed(0)
    ref = build_model(rec, "cpu", vocab_size=300)
    fast = build_model(rec, "cpu", vocab_size=300, kernels={"causal_conv": "triton"})
    fast.load_state_dict(ref.state_dict())
    assert fast.blocks[0].ssm.conv_impl is causal_conv_triton
    assert ref.blocks[0].ssm.conv_impl is causal_conv_reference
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    assert_same_loss_and_grads(ref, fast, ids, prepare=lambda model: model.train())


def test_benchmark_script_runs_every_row_on_the_cpu(tmp_path):
    """benchmarks/ssm_conv.py (what the GPU measures): on the CPU a tiny shape, with the Triton row
    in the interpreter, every row within float rounding of the reference."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "conv.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "ssm_conv.py"), "--reps", "1", "--json", str(out)],
                          capture_output=True, text=True, cwd=root, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tiny CPU shape" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["reference (F.conv1d, cuDNN on CUDA)", "shifted adds, eager",
                                         "shifted adds, torch.compile", "triton (phase7fw causal_conv)"]
    assert all(max(r["rel_diff_out_du_dw_db"]) < 1e-5 for r in rows)

"""The fla backend of the AR-SSM scan (``[kernels] ar_ssm_scan = "fla"``) on a CPU, where
flash-linear-attention's kernels cannot run: its mapping of the scan onto fla's GLA (query C,
key B, value x, the log-decays, scale 1, fla's layout) with fla's GLA replaced by a torch GLA
of the same calling convention, against the plain recurrence, forward and every gradient, and
inside the SSM module; the selection error without fla (exit code 2 through the CLI, no
traceback); the refusal of a machine without CUDA, CPU and fp64 tensors; the verification
rows. fla itself, on a GPU: tests/gpu/test_ar_ssm_scan_fla_gpu.py."""

from __future__ import annotations

import pytest
import torch

from phase7fw.kernels import _fla
from phase7fw.kernels.ar_ssm_scan import ar_ssm_scan_reference, ar_ssm_scan_sequential
from phase7fw.kernels.ar_ssm_scan import fla_backend
from tests.conftest import RECIPES, TorchGLA, without_fla

OP = "ar_ssm_scan"


def _inputs(b=2, h=3, T=70, dv=12, r=5, dtype=torch.float64, seed=0):
    """As the SSM hands them: x (b, h, T, dv) and B, C (b, h, T, r) heads-first views of
    (b, T, h, *) tensors, log-decays from ~-0.01 to ~-8."""
    g = torch.Generator().manual_seed(seed)

    def heads(n):
        return torch.randn(b, T, h, n, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)

    x, B, C = heads(dv), heads(r), heads(r)
    ld = -torch.nn.functional.softplus(2 * torch.randn(b, h, T, generator=g, dtype=torch.float64) - 2) * 4
    return x, B, C, ld.to(dtype)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("T,r", [(70, 5), (64, 16), (1, 3), (129, 16)])
def test_the_scan_through_a_gla_equals_the_recurrence_with_every_gradient(T, r):
    ins = [t.detach().requires_grad_() for t in _inputs(T=T, r=r)]
    gla = TorchGLA()
    y = fla_backend.scan_gla_form(gla, *ins)
    ref_ins = [t.detach().requires_grad_() for t in ins]
    ref = ar_ssm_scan_sequential(*ref_ins)
    assert y.shape == ref.shape and y.dtype == torch.float64
    assert _rel(y, ref) < 1e-10
    gy = torch.randn_like(ref)
    for name, a, b in zip(("dx", "dB", "dC", "dlog_decay"), torch.autograd.grad(y, ins, gy),
                          torch.autograd.grad(ref, ref_ins, gy)):
        assert b.abs().sum() > 0 or (name == "dlog_decay" and T == 1), name  # exercised
        assert _rel(a, b) < 1e-10 if b.abs().sum() > 0 else a.abs().sum() == 0, name
    # one call in fla's (b, t, h, *) layout: query C and key B (r wide), value x, the decays, scale 1,
    # fla's own chunk length whatever the model's
    [call] = gla.calls
    assert call["q"] == call["k"] == (2, T, 3, r) and call["v"] == (2, T, 3, 12) and call["g"] == (2, T, 3)
    assert call["scale"] == 1.0 and call["chunk_size"] == fla_backend.FLA_CHUNK


def test_a_bf16_caller_gets_bf16_from_a_gla_run_in_fp32():
    x, B, C, ld = _inputs(dtype=torch.float32)
    gla = TorchGLA()
    y = fla_backend.scan_gla_form(gla, x.bfloat16(), B, C, ld)  # the SSM's dtypes under bf16 autocast
    assert y.dtype == torch.bfloat16 and gla.calls[0]["dtype"] == torch.float32
    ref = ar_ssm_scan_reference(x.bfloat16().double(), B.double(), C.double(), ld.double())
    assert _rel(y, ref) < 1e-2


def test_the_ssm_module_with_the_scan_through_a_gla_matches_its_reference():
    """The component's own call (x_in, B, C, log_decay, chunk_size) reaches the backend in that
    order: the module's output and every parameter's gradient equal the reference module's."""
    from tests.unit.test_ssm import _module

    ref, through = _module().double(), _module().double()
    through.scan_impl = lambda x, B, C, ld, chunk_size: fla_backend.scan_gla_form(TorchGLA(), x, B, C, ld)
    u = torch.randn(2, 45, 32, dtype=torch.float64)
    outs = []
    for m in (ref, through):
        y, gate = m(u)
        (y.square().mean() + gate).backward()
        outs.append(y)
    assert _rel(outs[1], outs[0]) < 1e-10
    for (name, a), (_, b) in zip(through.named_parameters(), ref.named_parameters()):
        assert _rel(a.grad, b.grad) < 1e-6, name  # (the stand-in differences long decay sums)


def test_selecting_fla_for_the_scan_without_fla_is_one_error_with_the_install_hint(no_fla):
    from phase7fw.kernels import select
    from phase7fw.plugins import load_plugins

    with pytest.raises(_fla.FlaUnavailable) as err:
        select({"registry": load_plugins().registry, "kernels": {OP: "fla"}}, OP, ar_ssm_scan_reference)
    msg = str(err.value)
    assert msg.startswith('kernels.ar_ssm_scan = "fla" needs flash-linear-attention')
    assert "pip install fla-core einops" in msg and "ModuleNotFoundError" in msg and err.value.exit_code == 2


def test_the_cli_stops_with_exit_code_2_without_fla_or_without_cuda(no_fla, monkeypatch, tmp_path, capsys):
    from phase7fw.cli import main

    args = ["run", str(RECIPES / "phase7_tiny.toml"), "--dummy-data", "--set", f'kernels.{OP}="fla"',
            "--set", "train.max_steps=1", "--set", f'run.output_dir="{tmp_path}"']
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: kernels.ar_ssm_scan = "fla" needs flash-linear-attention')
    assert "Traceback" not in err
    monkeypatch.setattr(_fla, "import_gla", lambda: TorchGLA())  # as if fla were installed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert 'kernels.ar_ssm_scan = "fla" runs flash-linear-attention' in err
    assert "need a CUDA GPU (this machine has none;" in err and "Traceback" not in err


def test_the_fla_scan_refuses_cpu_and_fp64_tensors(monkeypatch):
    monkeypatch.setattr(_fla, "import_gla", lambda: TorchGLA())
    x, B, C, ld = _inputs(dtype=torch.float32, T=8)
    with pytest.raises(_fla.FlaUnavailable, match=r"need a CUDA GPU \(got a cpu tensor"):
        fla_backend.ar_ssm_scan_fla(x, B, C, ld)
    with pytest.raises(ValueError, match="the fla ar ssm scan takes fp32/bf16/fp16 inputs, not fp64"):
        fla_backend.ar_ssm_scan_fla(x.double(), B, C, ld)


def test_fla_is_a_choice_of_the_scan_without_tuning_options():
    from phase7fw import load_recipe
    from phase7fw.errors import RecipeError
    from phase7fw.plugins import load_plugins

    assert load_plugins().registry.kernel_ops()[OP] == ["triton", "fla"]
    tiny = RECIPES / "phase7_tiny.toml"
    assert load_recipe(tiny, {f"kernels.{OP}": "fla"}).kernels[OP].impl == "fla"
    with pytest.raises(RecipeError, match=rf"kernels\.{OP}\.schedule: unknown key"):
        load_recipe(tiny, {f"kernels.{OP}": {"impl": "fla", "schedule": "rows"}})


def test_verification_rows_add_fla_where_it_imports_and_say_why_not_elsewhere(monkeypatch):
    from phase7fw.kernels.ar_ssm_scan import verify

    impls, note = verify._implementations(torch.device("cpu"))
    assert list(impls) == ["rows", "chunks"] and note is None  # fla never runs on the CPU
    without_fla(monkeypatch)
    impls, note = verify._implementations(torch.device("cuda"))  # (nothing touches the device)
    assert list(impls) == ["rows", "chunks"]
    assert note.startswith("rows left out: fla cannot be imported (ModuleNotFoundError") and "pip install fla-core" in note
    monkeypatch.undo()
    _fla.import_gla.cache_clear()
    monkeypatch.setattr(_fla, "import_gla", lambda: TorchGLA())
    impls, note = verify._implementations(torch.device("cuda"))
    assert list(impls) == ["rows", "chunks", "fla"] and note is None


def test_each_verification_row_meets_the_same_reference_and_a_failure_hides_nothing():
    from phase7fw.kernels.ar_ssm_scan import verify

    standin = lambda x, B, C, ld: fla_backend.scan_gla_form(TorchGLA(), x, B, C, ld)  # noqa: E731
    rows = verify._check_ssm(1, 2, 37, 8, 4, torch.device("cpu"), torch.float32, "tiny",
                             impls={"rows": standin, "broken": lambda *a: 1 / 0, "fla": standin})
    assert [r.case for r in rows] == ["tiny", "tiny [broken]", "tiny [fla]"]
    assert rows[0].ok and rows[2].ok and max(rows[2].errors.values()) < 1e-5
    assert not rows[1].ok and "ZeroDivisionError" in rows[1].detail
    assert "triton_fwd_bwd" in rows[0].ms and "reference_fwd_bwd" in rows[0].ms
    assert rows[2].ms["fla_fwd_bwd"] > 0 and rows[2].ms["ratio_vs_rows"] > 0


@pytest.mark.filterwarnings("ignore:Triton is not supported on current platform")  # fla's import on a CPU
def test_the_scan_through_fla_s_own_torch_reference_of_chunk_simple_gla():
    """fla's naive chunked GLA (plain torch, runs on a CPU) as the GLA: the convention of ``g``,
    ``scale`` and the layout that :func:`scan_gla_form` assumes is fla's."""
    naive = pytest.importorskip("fla.ops.simple_gla.naive",
                                reason="fla-core not installed (pip install fla-core einops)")
    x, B, C, ld = _inputs(dtype=torch.float32, T=128, r=16)
    y = fla_backend.scan_gla_form(naive.naive_chunk_simple_gla, x, B, C, ld)
    ref = ar_ssm_scan_sequential(x.double(), B.double(), C.double(), ld.double())
    assert _rel(y, ref) < 1e-5


@pytest.mark.parametrize("hopper,above_3_4,above_3_7_1,tilelang,refused", [
    (True, True, False, False, True),    # fla's guard: Hopper, 3.4 <= Triton < 3.7.1, no tilelang
    (True, True, True, False, False),    # Triton 3.7.1: fixed
    (False, True, False, False, False),  # not Hopper
    (True, False, False, False, False),  # Triton < 3.4
    (True, True, False, True, False),    # tilelang installed: fla takes its kernel
])
def test_the_decayed_backward_refusal_follows_fla_s_own_flags(monkeypatch, hopper, above_3_4, above_3_7_1,
                                                              tilelang, refused):
    import importlib.util
    import sys
    import types

    flags = types.ModuleType("fla.utils")
    flags.IS_NVIDIA_HOPPER, flags.TRITON_ABOVE_3_4_0, flags.TRITON_ABOVE_3_7_1 = hopper, above_3_4, above_3_7_1
    monkeypatch.setitem(sys.modules, "fla", types.ModuleType("fla"))
    monkeypatch.setitem(sys.modules, "fla.utils", flags)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if tilelang else None) if name == "tilelang" else real_find_spec(name, *a))
    reason = _fla.gated_backward_refusal()
    assert (reason is not None) == refused
    if refused:
        assert "Hopper" in reason and "3.7.1" in reason and "#640" in reason


def test_the_decayed_backward_is_refused_before_fla_runs_and_only_when_gradients_are_wanted(monkeypatch):
    monkeypatch.setattr(_fla, "gated_backward_refusal", lambda: "fla-core refuses it here")
    x, B, C = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 3), torch.randn(1, 2, 8, 3)
    ld = -torch.rand(1, 2, 8)
    with pytest.raises(_fla.FlaUnavailable, match=r'kernels\.ar_ssm_scan = "fla" cannot train here: fla-core refuses it'
                                                  r' here; upgrade Triton to >= 3\.7\.1 or install tilelang'):
        fla_backend.ar_ssm_scan_fla(x.requires_grad_(), B, C, ld)
    # without gradients (decoding, evaluation) fla's forward may run: the next check is the device's
    with torch.no_grad(), pytest.raises(_fla.FlaUnavailable, match="need a CUDA GPU"):
        fla_backend.ar_ssm_scan_fla(x, B, C, ld)

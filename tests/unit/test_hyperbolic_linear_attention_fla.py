"""The fla backend of the hyperbolic linear attention (``[kernels] hyperbolic_linear_attention =
"fla"``) on a CPU, where flash-linear-attention's kernels cannot run (not even in Triton's
interpreter): the wrapper's maths with fla's GLA replaced by a small torch GLA of the same
calling convention, against the chunked reference, forward and every gradient; the selection
error without fla (one message with the install hint, exit code 2 through the CLI); the
refusal of CPU tensors; the verification rows' note; doctor's line. fla itself, on a GPU:
tests/gpu/test_hyperbolic_linear_attention_fla_gpu.py."""

from __future__ import annotations

import pytest
import torch

from phase7fw.kernels.hyperbolic_linear_attention import hyperbolic_linear_attention_chunked
from phase7fw.kernels.hyperbolic_linear_attention import fla_backend
from phase7fw.kernels import _fla
from tests.conftest import RECIPES, TorchGLA, without_fla

OP = "hyperbolic_linear_attention"


def _inputs(B=2, H=3, T=70, D=16, Dv=12, dtype=torch.float64, decay=True, seed=0, radius=2.0):
    """Tangent vectors with sqrt(c)|u| up to ``radius`` (past 1.5 the feature map clamps),
    per-head c, log-decays in [-0.3, 0]; q, k, v as the component makes them: (B, H, T, D)
    views of (B, T, H, D) tensors."""
    g = torch.Generator().manual_seed(seed)
    c = 0.3 + 2 * torch.rand(H, generator=g, dtype=torch.float64)

    def heads(n, scale):
        x = torch.randn(B, T, H, n, generator=g, dtype=torch.float64)
        if scale:
            x = x / x.norm(dim=-1, keepdim=True) * radius * torch.rand(B, T, H, 1, generator=g, dtype=torch.float64)
            x = x / c.sqrt().view(1, 1, H, 1)
        return x.to(dtype).transpose(1, 2)

    q, k, v = heads(D, True), heads(D, True), heads(Dv, False)
    ld = -0.3 * torch.rand(B, H, T, generator=g, dtype=torch.float64) if decay else None
    return q, k, v, c.to(dtype), None if ld is None else ld.to(dtype)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("decay,focus,chunk", [(True, 1.0, 16), (False, 1.0, 64), (True, 3.0, 32)])
def test_gla_form_matches_the_chunked_reference_with_every_gradient(dtype, tol, decay, focus, chunk):
    """T = 70 is not a multiple of the chunk; the last value column is the normalizer."""
    base = _inputs(dtype=dtype, decay=decay)
    ins = [t.clone().requires_grad_() if t is not None else None for t in base]
    gla = TorchGLA()
    out = fla_backend.gla_form(gla, *ins, focus, chunk)
    ref_ins = [t.detach().double().requires_grad_() if t is not None else None for t in base]
    ref = hyperbolic_linear_attention_chunked(*ref_ins, focus, chunk)
    assert out.dtype == dtype and out.shape == ref.shape == (2, 3, 70, 12)
    assert _rel(out, ref) < tol
    gout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    live = [i for i, t in enumerate(ins) if t is not None]
    got = torch.autograd.grad(out, [ins[i] for i in live], gout.to(dtype))
    want = torch.autograd.grad(ref, [ref_ins[i] for i in live], gout)
    for i, a, b in zip(live, got, want):
        name = ("q", "k", "v", "c", "decay")[i]
        assert b.abs().sum() > 0, name  # the case exercises this gradient
        assert _rel(a, b) < tol, (name, _rel(a, b))
    # what fla is handed, (B, T, H, *) layout: the pair term with D features and Dv values, then the
    # running sums with a one-hot query and key, Dv + 1 + D values; the same decay, scale 1, the chunk
    pair, sums = gla.calls
    assert pair["q"] == pair["k"] == (2, 70, 3, 16) and pair["v"] == (2, 70, 3, 12)
    assert sums["q"] == sums["k"] == (2, 70, 3, fla_backend.SUMS_WIDTH) and sums["v"] == (2, 70, 3, 12 + 1 + 16)
    for call in (pair, sums):
        assert call["g"] == ((2, 70, 3) if decay else None)
        assert call["scale"] == 1.0 and call["chunk_size"] == chunk and call["dtype"] == dtype


def test_gla_form_keeps_a_bf16_caller_in_bf16_and_computes_the_features_in_fp32():
    q, k, v, c, ld = _inputs(dtype=torch.bfloat16)
    gla = TorchGLA()
    out = fla_backend.gla_form(gla, q, k, v, c.float(), ld.float())
    ref = hyperbolic_linear_attention_chunked(q.double(), k.double(), v.double(), c.double(), ld.double())
    assert out.dtype == torch.bfloat16 and gla.calls[0]["dtype"] == torch.float32
    assert _rel(out, ref) < 1e-2


def test_selecting_fla_without_fla_is_one_error_with_the_install_hint(no_fla):
    from phase7fw.kernels import select
    from phase7fw.plugins import load_plugins

    reg = load_plugins().registry
    with pytest.raises(fla_backend.FlaUnavailable) as err:
        select({"registry": reg, "kernels": {OP: "fla"}}, OP, hyperbolic_linear_attention_chunked)
    msg = str(err.value)
    assert msg.startswith('kernels.hyperbolic_linear_attention = "fla" needs flash-linear-attention')
    assert "pip install fla-core einops" in msg and "ModuleNotFoundError" in msg
    assert err.value.exit_code == 2
    ok, why = fla_backend.fla_status()
    assert not ok and why.startswith("ModuleNotFoundError")


def test_the_cli_stops_with_exit_code_2_and_no_traceback_without_fla(no_fla, tmp_path, capsys):
    from phase7fw.cli import main

    code = main(["run", str(RECIPES / "phase8_tiny.toml"), "--dummy-data", "--set",
                 f'kernels.{OP}="fla"', "--set", "train.max_steps=1", "--set", f'run.output_dir="{tmp_path}"'])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith('error: kernels.hyperbolic_linear_attention = "fla" needs flash-linear-attention')
    assert "pip install fla-core einops" in err and "Traceback" not in err


def test_fla_is_a_choice_of_the_recipe_without_tuning_options_and_auto_keeps_the_triton_kernel():
    from phase7fw import load_recipe
    from phase7fw.errors import RecipeError
    from phase7fw.kernels.hyperbolic_linear_attention import TritonConfig
    from phase7fw.plugins import load_plugins

    assert load_plugins().registry.kernel_ops()[OP] == ["triton", "fla"]
    tiny = RECIPES / "phase8_tiny.toml"
    assert load_recipe(tiny, {f"kernels.{OP}": "fla"}).kernels[OP].impl == "fla"
    auto = load_recipe(tiny, {f"kernels.{OP}": "auto"}).kernels[OP]
    assert auto.impl == "auto" and auto.config == TritonConfig()  # auto: the Triton kernel's tuning
    with pytest.raises(RecipeError, match=rf"kernels\.{OP}\.gpu: unknown key"):
        load_recipe(tiny, {f"kernels.{OP}": {"impl": "fla", "gpu": [64, 8, 1]}})


def test_the_fla_backend_refuses_a_machine_without_cuda_and_cpu_and_fp64_tensors(monkeypatch, tmp_path, capsys):
    from phase7fw.cli import main

    monkeypatch.setattr(_fla, "import_gla", lambda: TorchGLA())  # as if fla were installed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["run", str(RECIPES / "phase8_tiny.toml"), "--dummy-data", "--set",
                 f'kernels.{OP}="fla"', "--set", "train.max_steps=1", "--set", f'run.output_dir="{tmp_path}"'])
    err = capsys.readouterr().err
    assert code == 2 and "need a CUDA GPU (this machine has none;" in err and "Traceback" not in err
    q, k, v, c, ld = _inputs(dtype=torch.float32, T=8)
    with pytest.raises(fla_backend.FlaUnavailable, match=r"need a CUDA GPU \(got a cpu tensor"):
        fla_backend.hyperbolic_linear_attention_fla(q, k, v, c, ld)
    with pytest.raises(ValueError, match="not fp64"):
        fla_backend.hyperbolic_linear_attention_fla(q.double(), k.double(), v.double(), c, ld)


def test_verification_rows_leave_fla_out_with_a_note_and_check_it_where_it_imports(monkeypatch):
    from phase7fw.kernels.hyperbolic_linear_attention import verify

    impls, note = verify._backends(torch.device("cpu"))
    assert list(impls) == ["triton"] and note is None  # fla never runs on the CPU
    without_fla(monkeypatch)
    impls, note = verify._backends(torch.device("cuda"))  # (nothing touches the device)
    assert list(impls) == ["triton"]
    assert note.startswith("rows left out: fla cannot be imported (ModuleNotFoundError")
    assert "pip install fla-core" in note
    monkeypatch.undo()
    _fla.import_gla.cache_clear()
    monkeypatch.setattr(_fla, "import_gla", lambda: TorchGLA())
    impls, note = verify._backends(torch.device("cuda"))
    assert list(impls) == ["triton", "fla"] and note is None


def test_verification_compares_each_backend_with_the_same_reference_and_one_failure_hides_nothing():
    from phase7fw.kernels.hyperbolic_linear_attention import verify

    standin = lambda *a: fla_backend.gla_form(TorchGLA(), *a)  # noqa: E731
    rows = verify.compare(1, 2, 37, 16, torch.device("cpu"), torch.float32, "tiny", timed=True, chunk_size=16,
                          backends={"gla": standin, "broken": lambda *a: 1 / 0})
    assert [r.case for r in rows] == ["tiny", "tiny [broken]"]
    assert rows[0].ok and max(rows[0].errors.values()) < 1e-5 and "gla_fwd_bwd" in rows[0].ms
    assert not rows[1].ok and "ZeroDivisionError" in rows[1].detail


def test_the_fla_row_times_the_gla_alone_at_the_backends_two_shapes(monkeypatch):
    from phase7fw.kernels.hyperbolic_linear_attention import verify

    gla = TorchGLA()
    monkeypatch.setattr(_fla, "import_gla", lambda: gla)
    ms = verify._gla_alone(1, 2, 20, 8, torch.device("cpu"))
    assert set(ms) == {"fla_gla_alone_pair_K8_V8_fwd_bwd", "fla_gla_alone_sums_K16_V17_fwd_bwd"}
    assert all(t > 0 for t in ms.values())
    assert [(c["q"], c["v"]) for c in gla.calls] == [((1, 20, 2, 8), (1, 20, 2, 8)), ((1, 20, 2, 16), (1, 20, 2, 17))]
    assert gla.calls[0]["scale"] == 1.0


def test_doctor_names_the_optional_fla_core(monkeypatch, capsys):
    import importlib.metadata as md

    from phase7fw.cli import doctor

    real = md.version

    def version(dist):
        if dist == "fla-core":
            raise md.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(md, "version", version)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert doctor.run_doctor() == 0
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("fla-core")]
    assert "not installed" in line and 'hyperbolic_linear_attention = "fla"' in line
    assert "pip install fla-core einops" in line


def test_doctor_warns_where_fla_refuses_to_train_with_decay(monkeypatch, capsys):
    import importlib.metadata as md

    from phase7fw.cli import doctor
    from phase7fw.kernels import _fla

    real = md.version
    monkeypatch.setattr(md, "version", lambda dist: "0.6.0" if dist == "fla-core" else real(dist))
    monkeypatch.setattr(_fla, "gated_backward_refusal", lambda: "fla-core refuses it on this GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    doctor.run_doctor()
    out = capsys.readouterr().out
    assert 'warning: fla-core refuses it on this GPU: "fla" cannot train either op with decay here' in out
    monkeypatch.setattr(_fla, "gated_backward_refusal", lambda: None)
    doctor.run_doctor()
    assert "cannot train either op" not in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:Triton is not supported on current platform")  # fla's import on a CPU
def test_gla_form_through_fla_s_own_torch_reference_of_chunk_simple_gla():
    """fla's naive chunked GLA (plain torch, runs on a CPU) as the GLA: the convention of ``g``,
    ``scale`` and the layout that :func:`gla_form` assumes is fla's."""
    naive = pytest.importorskip("fla.ops.simple_gla.naive",
                                reason="fla-core not installed (pip install fla-core einops)")
    q, k, v, c, ld = _inputs(dtype=torch.float32)
    out = fla_backend.gla_form(naive.naive_chunk_simple_gla, q, k, v, c, ld, 1.0, 16)
    ref = hyperbolic_linear_attention_chunked(q.double(), k.double(), v.double(), c.double(), ld.double())
    assert _rel(out, ref) < 1e-5

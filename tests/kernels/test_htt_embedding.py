"""The fused HTT embedding kernel in the Triton CPU interpreter against the torch reference
(float64): rows, every core's gradient and dscale, 2 and 3 cores, padded factors, repeated
ids; output dtypes under autocast and with half-precision cores; opcheck; the phase7_tiny
model with kernels.htt_embedding = "triton" (same checkpoint keys, same loss and gradients)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest
import torch

triton = pytest.importorskip("triton")

from phase7fw.components.phase7.embedding import HTTEmbedding  # noqa: E402
from phase7fw.kernels.htt_embedding import htt_embedding_reference  # noqa: E402

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("TRITON_INTERPRET=0: these tests run the kernels in Triton's CPU interpreter (on a GPU: tests/gpu)",
                allow_module_level=True)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _module(vocab, d_model, n_cores, rank, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = HTTEmbedding(vocab, d_model, n_cores, rank)
    m.init_weights()
    with torch.no_grad():
        m.scale.fill_(0.7)  # not 1 and not tiny: dscale and the scaled core grads are checked
    return m.to(dtype)


def _ids(vocab, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=g)
    flat = ids.view(-1)
    flat[: flat.numel() // 3] = 7  # many tokens share every digit of one id
    flat[-1] = vocab - 1  # the highest row: digits at their upper edge
    return ids


def _grads(fn, m, ids, gout, dtype=None):
    params = [*m.cores, m.scale]
    if dtype is not None:
        params = [p.detach().to(dtype).requires_grad_() for p in params]
    out = fn(ids, params[:-1], params[-1], m.d_model)
    return out, torch.autograd.grad(out, params, gout.to(out.dtype))


@pytest.mark.parametrize(
    "n_cores,vocab,d_model,rank,shape",
    [
        (2, 101, 29, 5, (3, 17)),  # vocab 101 -> [11, 10], d 29 -> [6, 5]: both overshoot
        (3, 101, 29, 5, (2, 13)),  # [5, 5, 5], [4, 3, 3]
        (2, 300, 300, 20, (40,)),  # d factors [18, 17] and rank 20: padded to 32
        (3, 500, 50, 3, (1, 1, 9)),  # 3-D ids
    ],
)
def test_matches_reference(n_cores, vocab, d_model, rank, shape):
    from phase7fw.kernels.htt_embedding.kernel import htt_embedding_triton

    m = _module(vocab, d_model, n_cores, rank)
    ids = _ids(vocab, shape)
    gout = torch.randn(*shape, d_model, generator=torch.Generator().manual_seed(1))
    out, got = _grads(htt_embedding_triton, m, ids, gout)
    ref, want = _grads(htt_embedding_reference, m, ids, gout, dtype=torch.float64)
    assert out.shape == (*shape, d_model) and out.dtype == torch.float32
    assert _rel(out, ref) < 1e-5
    names = [f"G{k + 1}" for k in range(n_cores)] + ["scale"]
    for name, a, b, p in zip(names, got, want, [*m.cores, m.scale]):
        assert a.shape == p.shape and a.dtype == p.dtype, name
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))


def test_int32_ids_and_empty_batch():
    from phase7fw.kernels.htt_embedding.kernel import htt_embedding_triton

    m = _module(101, 29, 2, 5)
    ids = _ids(101, (2, 5))
    a = htt_embedding_triton(ids.int(), list(m.cores), m.scale, 29)
    b = htt_embedding_reference(ids, list(m.cores), m.scale, 29)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    empty = htt_embedding_triton(ids[:, :0], list(m.cores), m.scale, 29)
    assert empty.shape == (2, 0, 29)
    empty.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in [*m.cores, m.scale])


def test_autocast_output_dtype_matches_reference():
    # the reference's einsum runs in bf16 under autocast, then the fp32 scale promotes the rows
    # to fp32; the kernel returns the same dtype (computed in fp32, so closer to exact)
    from phase7fw.kernels.htt_embedding.kernel import htt_embedding_triton

    m = _module(101, 29, 3, 5)
    ids = _ids(101, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = htt_embedding_triton(ids, list(m.cores), m.scale, 29)
        b = htt_embedding_reference(ids, list(m.cores), m.scale, 29)
    exact = htt_embedding_reference(ids, [c.double() for c in m.cores], m.scale.double(), 29)
    assert a.dtype == b.dtype == torch.float32
    assert _rel(a, exact) < 1e-6 and _rel(b, exact) < 2e-2
    # TF32 dots (on the GPU) exactly where the reference itself is no finer than that
    from phase7fw.kernels.htt_embedding.kernel import _out_dtype_and_tf32

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _out_dtype_and_tf32(list(m.cores), m.scale) == (torch.float32, True)
    assert _out_dtype_and_tf32(list(m.cores), m.scale) == (torch.float32, False)
    assert _out_dtype_and_tf32([c.bfloat16() for c in m.cores], m.scale.bfloat16()) == (torch.bfloat16, True)


def test_half_precision_cores():
    from phase7fw.kernels.htt_embedding.kernel import htt_embedding_triton

    m = _module(101, 29, 2, 5, dtype=torch.float16)
    ids = _ids(101, (3, 7))
    gout = torch.randn(3, 7, 29, generator=torch.Generator().manual_seed(2))
    out, got = _grads(htt_embedding_triton, m, ids, gout)
    ref, want = _grads(htt_embedding_reference, m, ids, gout.half().double(), dtype=torch.float64)
    assert out.dtype == torch.float16 and all(g.dtype == torch.float16 for g in got)
    assert _rel(out, ref) < 2e-3
    assert all(_rel(a, b) < 2e-3 for a, b in zip(got, want))


def test_rejects_float64():
    from phase7fw.kernels.htt_embedding.kernel import htt_embedding_triton

    m = _module(101, 29, 2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="fp64"):
        htt_embedding_triton(_ids(101, (4,)), list(m.cores), m.scale, 29)


@pytest.mark.parametrize("n_cores", [2, 3])
def test_opcheck(n_cores):
    import importlib

    importlib.import_module("phase7fw.kernels.htt_embedding.kernel")  # registers the ops

    m = _module(101, 29, n_cores, 5)
    ids = _ids(101, (11,))
    cores = [c.detach().clone().requires_grad_() for c in m.cores]
    scale = m.scale.detach().clone().requires_grad_()
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.phase7fw.htt_embedding_fwd.default, (ids, cores, scale, 29, torch.float32, False),
                          test_utils=utils)
    dout = torch.randn(11, 29)
    torch.library.opcheck(torch.ops.phase7fw.htt_embedding_bwd.default,
                          (dout, ids, [c.detach() for c in cores], scale.detach(), 29, False), test_utils=utils)


def test_smoke_rows_pass():
    from phase7fw.kernels.htt_embedding.verify import smoke_rows

    rows = smoke_rows(torch.device("cpu"))
    assert len(rows) == 2 and all(r.ok for r in rows), rows


def _plugins_with_kernel():
    """The loaded plugins; registers "htt_embedding:triton" here if the kernels plugin does not
    (yet) do it, with the factory the plugin uses for the other kernels."""
    from phase7fw.plugins import load_plugins

    plugins = load_plugins()
    if ("kernel", "htt_embedding:triton") not in plugins.registry:
        def factory(config, **context):
            from phase7fw.kernels.htt_embedding.kernel import htt_embedding_triton

            return htt_embedding_triton

        plugins.registry.register("kernel", "htt_embedding:triton", factory)
    return plugins


def test_select_swaps_the_gather_path_only():
    from phase7fw.components.phase7.embedding import HttConfig, build_htt
    from phase7fw.kernels.htt_embedding.kernel import htt_embedding_triton

    reg = _plugins_with_kernel().registry
    ctx = {"registry": reg, "kernels": {"htt_embedding": "triton"}}
    m = build_htt(HttConfig(rank=4), vocab_size=101, d_model=29, **ctx)
    assert m.gather_fn is htt_embedding_triton
    assert build_htt(HttConfig(rank=4), vocab_size=101, d_model=29).gather_fn is htt_embedding_reference


def test_tiny_model_same_loss_grads_and_checkpoint_layout():
    from phase7fw.core.build import build_model
    from phase7fw.kernels.htt_embedding.kernel import htt_embedding_triton
    from phase7fw.kernels.verify import OPS as KERNEL_OPS

    plugins = _plugins_with_kernel()
    recipe = "recipes/phase7_tiny.toml"
    torch.manual_seed(0)
    ref_model = build_model(recipe, "cpu", plugins=plugins, vocab_size=300)
    chosen = {op: "reference" for op in KERNEL_OPS} | {"htt_embedding": "triton"}
    torch.manual_seed(0)
    tri_model = build_model(recipe, "cpu", plugins=plugins, vocab_size=300, kernels=chosen)
    assert tri_model.embedding.gather_fn is htt_embedding_triton
    assert ref_model.embedding.gather_fn is htt_embedding_reference
    ref_sd, tri_sd = ref_model.state_dict(), tri_model.state_dict()
    assert list(ref_sd) == list(tri_sd)  # checkpoint layout does not depend on the kernel
    assert all(torch.equal(ref_sd[k], tri_sd[k]) for k in ref_sd)

    ids = torch.randint(0, 300, (2, 21), generator=torch.Generator().manual_seed(3))
    ids[0, :5] = 42  # repeated tokens
    losses = []
    for model in (ref_model, tri_model):
        loss, _ = model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    ref_params, tri_params = dict(ref_model.named_parameters()), dict(tri_model.named_parameters())
    for name, p in ref_params.items():
        q = tri_params[name]
        assert q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)

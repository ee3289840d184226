"""Fused chunked linear cross-entropy (phase7fw/kernels/cross_entropy/) in the Triton
CPU interpreter: loss and gradients against F.cross_entropy on the full logits (fp32 / fp64),
ignored targets, chunks that do not divide N, the no-grad and frozen-weight paths, opcheck,
torch.compile tracing, and the phase7_tiny / llama_tiny losses with kernels.cross_entropy =
"triton" against the reference."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("TRITON_INTERPRET=0: these tests run the kernels in Triton's CPU interpreter (on a GPU: tests/gpu)",
                allow_module_level=True)

N, D, V = 37, 24, 131  # no powers of two; V spans three interpreter blocks of 64


def _rel(a, b):
    return ((a.double() - b.double()).norm() / (b.double().norm() + 1e-12)).item()


def _case(n=N, d=D, v=V, ignore_every=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * 0.4
    y = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return h, w, y


def _reference(h, w, y, gout=1.0):
    h64, w64 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = F.cross_entropy(h64 @ w64.t(), y)
    dh, dw = torch.autograd.grad(loss * gout, (h64, w64))
    return loss.detach(), dh, dw


def _fused(h, w, y, chunk, gout=1.0):
    from phase7fw.kernels.cross_entropy.kernel import linear_cross_entropy_triton

    hi, wi = h.float().requires_grad_(), w.float().requires_grad_()
    loss = linear_cross_entropy_triton(hi, wi, y, chunk)
    dh, dw = torch.autograd.grad(loss * gout, (hi, wi))
    return loss, dh, dw


@pytest.mark.parametrize("chunk,ignore_every", [(16, 0), (16, 4), (10, 3), (0, 5), (100, 2), (1, 0)])
def test_matches_full_cross_entropy(chunk, ignore_every):
    h, w, y = _case(ignore_every=ignore_every)
    loss, dh, dw = _fused(h, w, y, chunk, gout=0.7)
    ref, rdh, rdw = _reference(h, w, y, gout=0.7)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert dh.dtype == torch.float32 and dw.dtype == torch.float32
    assert _rel(loss, ref) < 1e-6
    assert _rel(dh, rdh) < 1e-5 and _rel(dw, rdw) < 1e-5, (_rel(dh, rdh), _rel(dw, rdw))


def test_matches_the_torch_chunked_reference_on_3d_input():
    from phase7fw.kernels.cross_entropy.kernel import linear_cross_entropy_triton
    from phase7fw.kernels.cross_entropy import chunked_cross_entropy

    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 19, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.4
    y = torch.randint(0, V, (2, 19), generator=g)
    y[1, :5] = -100
    outs = []
    for fn in (linear_cross_entropy_triton, chunked_cross_entropy):
        hi, wi = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(hi, wi, y, 7)
        outs.append((loss, *torch.autograd.grad(loss, (hi, wi))))
    for a, b in zip(*outs):
        assert a.shape == b.shape and _rel(a, b) < 1e-5


def test_all_ignored_chunk_and_all_ignored_batch():
    h, w, y = _case()
    y[:16] = -100  # the whole first chunk
    loss, dh, dw = _fused(h, w, y, 16)
    ref, rdh, rdw = _reference(h, w, y)
    assert _rel(loss, ref) < 1e-6 and _rel(dh, rdh) < 1e-5 and _rel(dw, rdw) < 1e-5
    assert torch.all(dh[:16] == 0)

    y[:] = -100  # nothing to predict: loss 0, zero gradients (the reference's clamp(min=1))
    loss, dh, dw = _fused(h, w, y, 16)
    assert loss.item() == 0.0 and torch.all(dh == 0) and torch.all(dw == 0)


def test_frozen_weight_and_no_grad():
    from phase7fw.kernels.cross_entropy.kernel import linear_cross_entropy_triton

    h, w, y = _case(ignore_every=6)
    ref, rdh, _ = _reference(h, w, y)
    # weight without requires_grad (the tied table outside a step): gradient to hidden only
    hi, wf = h.float().requires_grad_(), w.float()
    loss = linear_cross_entropy_triton(hi, wf, y, 16)
    loss.backward()
    assert wf.grad is None and _rel(hi.grad, rdh) < 1e-5
    # hidden without requires_grad: gradient to the weight only
    hf, wi = h.float(), w.float().requires_grad_()
    linear_cross_entropy_triton(hf, wi, y, 16).backward()
    assert hf.grad is None and wi.grad is not None
    # no_grad: the loss alone, no graph
    with torch.no_grad():
        loss = linear_cross_entropy_triton(h.float().requires_grad_(), w.float().requires_grad_(), y, 16)
    assert not loss.requires_grad and _rel(loss, ref) < 1e-6


def test_half_precision_autocast_matches_reference_autocast():
    # fp16 is the 16-bit type the interpreter handles (bf16 is checked on the GPU): fp32 inputs
    # under autocast give fp16 matmuls and fp32 statistics, like F.linear + .float() CE.
    from phase7fw.kernels.cross_entropy.kernel import linear_cross_entropy_triton

    h, w, y = _case(ignore_every=7)
    res = []
    for fn in (linear_cross_entropy_triton,
               lambda a, b, t, c: F.cross_entropy(F.linear(a, b).float(), t)):
        hi, wi = h.float().requires_grad_(), w.float().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = fn(hi, wi, y, 16)
        res.append((loss, *torch.autograd.grad(loss, (hi, wi))))
    (loss, dh, dw), (rl, rdh, rdw) = res
    assert dh.dtype == torch.float32 and dw.dtype == torch.float32
    assert _rel(loss, rl) < 1e-3 and _rel(dh, rdh) < 3e-3 and _rel(dw, rdw) < 3e-3


def test_rejects_bad_shapes():
    from phase7fw.kernels.cross_entropy.kernel import linear_cross_entropy_triton

    h, w, y = _case()
    with pytest.raises(ValueError):
        linear_cross_entropy_triton(h.float(), w.float()[:, :-1], y, 8)
    with pytest.raises(ValueError):
        linear_cross_entropy_triton(h.float(), w.float(), y[:-1], 8)
    with pytest.raises(ValueError):
        linear_cross_entropy_triton(h, w, y, 8)  # fp64


def test_default_chunk():
    from phase7fw.kernels.cross_entropy.kernel import default_chunk_tokens

    assert default_chunk_tokens(32000, 2) == 4096
    assert default_chunk_tokens(128256, 2) == 1024
    assert default_chunk_tokens(10**7, 4) == 256


def test_opcheck():
    from phase7fw.kernels.cross_entropy.kernel import IGNORE_INDEX  # the import registers the op

    h, w, y = _case(n=20, ignore_every=4)
    assert (y == IGNORE_INDEX).any()
    for need in ((True, True), (True, False), (False, True)):
        args = (h.float().requires_grad_(need[0]), w.float().requires_grad_(need[1]), y, 7, torch.float32, *need)
        torch.library.opcheck(torch.ops.phase7fw.linear_cross_entropy_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_traces_the_op():
    from phase7fw.kernels.cross_entropy.kernel import linear_cross_entropy_triton

    h, w, y = _case(ignore_every=5)
    ref, rdh, rdw = _reference(h, w, y, gout=2.0)
    fn = torch.compile(lambda a, b, t: linear_cross_entropy_triton(a, b, t, 16) * 2.0, backend="aot_eager",
                       fullgraph=True)
    hi, wi = h.float().requires_grad_(), w.float().requires_grad_()
    loss = fn(hi, wi, y)
    dh, dw = torch.autograd.grad(loss, (hi, wi))
    assert _rel(loss, 2 * ref) < 1e-6 and _rel(dh, rdh) < 1e-5 and _rel(dw, rdw) < 1e-5


# ------------------------------------------------------------------------- in the models


def _plugins():
    from phase7fw.kernels.cross_entropy.kernel import linear_cross_entropy_triton
    from phase7fw.plugins import load_plugins

    plugins = load_plugins()
    if ("kernel", "cross_entropy:triton") not in plugins.registry:  # until the kernel plugin lists it
        plugins.registry.register("kernel", "cross_entropy:triton", lambda config, **ctx: linear_cross_entropy_triton)
    return plugins


def _loss_and_grads(model, ids, targets):
    model.zero_grad(set_to_none=True)
    model.begin_step()
    loss, _ = model.loss(ids, targets)
    loss.backward()
    model.finish_backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recipe,chunk", [("recipes/phase7_tiny.toml", 0), ("recipes/phase7_tiny.toml", 23),
                                          ("recipes/llama_tiny.toml", 0)])
def test_model_loss_with_triton_cross_entropy(recipe, chunk):
    from phase7fw.core.build import build_model
    from phase7fw.kernels.cross_entropy.kernel import linear_cross_entropy_triton
    from phase7fw.kernels.verify import OPS as KERNEL_OPS

    plugins = _plugins()
    ref_kernels = {op: "reference" for op in KERNEL_OPS}
    torch.manual_seed(0)
    ref_model = build_model(recipe, "cpu", plugins=plugins, vocab_size=300, kernels=ref_kernels)
    torch.manual_seed(0)
    tri_model = build_model(recipe, "cpu", plugins=plugins, vocab_size=300,
                            kernels=ref_kernels | {"cross_entropy": "triton"})
    assert tri_model.cross_entropy_fn.__wrapped__ is linear_cross_entropy_triton  # bound to its tuning
    assert ref_model.cross_entropy_fn is None  # the torch paths of LanguageModel.cross_entropy
    for m in (ref_model, tri_model):
        m.ce_chunk_tokens = chunk
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (2, 24), generator=g)
    targets = torch.randint(0, 300, (2, 24), generator=g)
    targets[0, :3] = -100
    ref_loss, ref_grads = _loss_and_grads(ref_model, ids, targets)
    tri_loss, tri_grads = _loss_and_grads(tri_model, ids, targets)
    assert abs(ref_loss.item() - tri_loss.item()) < 1e-5 * max(1.0, abs(ref_loss.item()))
    assert ref_grads.keys() == tri_grads.keys() and len(ref_grads) > 0
    for name in ref_grads:
        assert _rel(tri_grads[name], ref_grads[name]) < 1e-4, name
    with torch.no_grad():  # evaluation path: loss only
        assert abs(tri_model.loss(ids, targets)[0].item() - ref_model.loss(ids, targets)[0].item()) < 1e-4


def test_tied_phase7_head_gradient_reaches_the_embedding():
    from phase7fw.core.build import build_model
    from phase7fw.recipe import load_recipe
    from phase7fw.kernels.verify import OPS as KERNEL_OPS

    plugins = _plugins()
    recipe = load_recipe("recipes/phase7_tiny.toml", {"model.tie_embeddings": True}, plugins=plugins)
    ref_kernels = {op: "reference" for op in KERNEL_OPS}
    models = []
    for kernels in (ref_kernels, ref_kernels | {"cross_entropy": "triton"}):
        torch.manual_seed(0)
        models.append(build_model(recipe, "cpu", plugins=plugins, vocab_size=300, kernels=kernels))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (1, 20), generator=g)
    targets = torch.randint(0, 300, (1, 20), generator=g)
    (rl, rg), (tl_, tg) = (_loss_and_grads(m, ids, targets) for m in models)
    assert abs(rl.item() - tl_.item()) < 1e-5
    assert rg.keys() == tg.keys() and any("embedding" in n for n in rg)
    for name in rg:
        assert _rel(tg[name], rg[name]) < 1e-4, name


def test_doctor_rows_on_cpu():
    from phase7fw.kernels.cross_entropy.verify import smoke_rows

    rows = smoke_rows(torch.device("cpu"))
    assert rows and all(r.ok for r in rows), rows

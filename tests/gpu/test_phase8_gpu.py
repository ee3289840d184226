"""Phase 8 on a CUDA GPU (marker ``gpu``; ``python -m pytest -m gpu tests/gpu``): the Triton
kernel (and the fla backend, when fla-core is installed) inside the model against the torch chunked form, the static decode step captured in a
CUDA graph, and the long-context 1.5B recipe under a 10 GiB cap. The kernel's own bf16 vs
fp64 rows are case 10 of test_kernels_gpu.py."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SMALL = {"model.d_model": 128, "model.n_layers": 2, "model.n_heads": 2, "model.seq_len": 256,
         "model.attention.chunk_size": 64}


def _model(kernels=None, **extra):
    from phase7fw import build_model, load_recipe

    torch.manual_seed(0)
    rec = load_recipe("recipes/phase8_tiny.toml", {**SMALL, **extra})
    return build_model(rec, "cuda", vocab_size=257, kernels=kernels or {})


@pytest.mark.parametrize("backend", ["triton", "fla"])
def test_model_with_the_kernel_matches_the_reference_model(backend):
    if backend == "fla":
        pytest.importorskip("fla.ops.simple_gla", reason="fla-core not installed (pip install fla-core einops)")
        from phase7fw.kernels._fla import gated_backward_refusal

        if reason := gated_backward_refusal():  # our refusal of it: tests/unit/test_ar_ssm_scan_fla.py
            pytest.skip(f"fla refuses the decayed backward on this GPU: {reason}")
    ref = _model()
    fast = _model({"hyperbolic_linear_attention": backend})
    if backend == "fla":
        assert fast.blocks[0].attn.attention_fn.__name__ == "hyperbolic_linear_attention_fla"
    fast.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 257, (4, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    losses = []
    for m in (ref, fast):
        m.set_curvature(0.6)
        m.begin_step()
        loss, _ = m.loss(ids, torch.roll(ids, -1, 1))
        loss.backward()
        m.finish_backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-3 * abs(losses[0])
    ref_grads = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        g = ref_grads[name].grad
        assert (p.grad - g).norm() <= 1e-2 * g.norm().clamp_min(1e-12), name


def test_static_step_is_captured_in_a_cuda_graph_and_gives_the_recomputed_tokens():
    from phase7fw.inference.decoding import Decoder, GraphedDecoder

    model = _model().eval()
    prompt = torch.randint(0, 257, (40,), generator=torch.Generator().manual_seed(2)).tolist()

    def greedy(dec, n=300):  # past seq_len: no context limit
        dec.reset(prompt)
        out = []
        for _ in range(n):
            out.append(int(dec.logits().argmax()))
            dec.extend(out[-1:])
        return out, dec

    graphed, dec = greedy(GraphedDecoder(model, capture=True, strict=True))
    assert dec.graph is not None and dec.path == "cuda-graph" and dec.static_steps >= 299
    reference, _ = greedy(Decoder(model, use_cache=False))
    assert graphed == reference


@pytest.mark.slow
def test_long_context_1_5b_recipe_trains_under_a_10_gib_cap():
    from phase7fw.cli.benchmark import bench_recipe, set_memory_cap

    device = torch.device("cuda")
    set_memory_cap(10, device)
    try:
        r = bench_recipe("recipes/phase8_1.5b_long.toml", {"train.compile": False}, steps=2, warmup=1, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
    assert not r["oom"], r.get("error")
    assert r["peak_memory_gib"] < 10.0, r["peak_memory_gib"]

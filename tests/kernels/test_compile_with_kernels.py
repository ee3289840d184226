"""torch.compile traces through every Triton kernel (custom ops with fake implementations and
registered autograd): the embedding and each block of a phase7 model with all its seven kernels
compile with fullgraph=True (no graph break) and give the eager reference model's loss and
gradients; the static decode step with every kernel compiles whole (what ``--compile-step``
hands to a CUDA graph) and decodes the eager model's tokens.
The aot_eager backend keeps the test fast; it runs the same Dynamo + AOTAutograd tracing that
inductor starts from (the kernels stay opaque nodes either way)."""

import torch

from phase7fw.core.build import build_model
from phase7fw.kernels.verify import OPS as KERNEL_OPS
from tests.kernels.model_check import assert_same_loss_and_grads


def test_phase7_blocks_compile_fullgraph_through_all_kernels():
    recipe = "recipes/phase7_tiny.toml"
    over = {"model.n_layers": 2, "model.seq_len": 64}
    from phase7fw.recipe import load_recipe

    rec = load_recipe(recipe, over)
    torch.manual_seed(0)
    ref = build_model(rec, "cpu", vocab_size=300)
    torch.manual_seed(0)
    fast = build_model(rec, "cpu", vocab_size=300, kernels={op: "triton" for op in KERNEL_OPS})
    fast.load_state_dict(ref.state_dict())
    picked = [fast.blocks[0].attn.attention_fn, fast.blocks[0].ssm.scan_impl, fast.blocks[0].ssm.conv_impl,
              fast.embedding.gather_fn, fast.blocks[0].norm1.norm_impl, fast.blocks[0].ffn.glu_impl,
              fast.cross_entropy_fn]
    assert all(f.__module__.startswith("phase7fw.kernels.") for f in picked), [f.__module__ for f in picked]
    for module in (fast.embedding, *fast.blocks):
        module.compile(backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    ids = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(1))
    assert_same_loss_and_grads(ref, fast, ids, prepare=lambda model: model.train())


def test_static_decode_step_compiles_fullgraph_through_all_kernels():
    # On the H100 (torch 2.11) `p9_generate.py --compile-step` broke here: the HTT kernel's
    # wrapper called math.prod on a generator and torch.get_float32_matmul_precision()
    from phase7fw.inference.decoding import Decoder, GraphedDecoder
    from tests.unit.test_decoding import greedy_with

    torch.manual_seed(0)
    model = build_model("recipes/phase7_tiny.toml", "cpu", vocab_size=300,
                        kernels={op: "triton" for op in KERNEL_OPS}).eval()
    assert model.embedding.gather_fn.__module__.startswith("phase7fw.kernels.")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    prompt = [5, 17, 2, 250, 9]
    compiled = GraphedDecoder(model, capture=False, compile_step=True)
    tokens, _ = greedy_with(compiled, prompt, 8)
    assert tokens == greedy_with(Decoder(model, use_cache=False), prompt, 8)[0]
    assert compiled.static_steps >= 7 and compiled.path == "static-eager+compile"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_selective_checkpointing_keeps_the_mixer_kernels_outputs():
    # train.checkpoint_policy = "save_matmuls": backward reruns neither the attention nor the
    # scan kernel ("full" reruns both), and the gradients are those of "full"
    from tests.unit.test_checkpointing import CountOps

    mixers = ("phase7fw::hyperbolic_attention_fwd", "phase7fw::ar_ssm_scan_fwd")  # the kernels' forward ops

    from phase7fw.recipe import load_recipe

    rec = load_recipe("recipes/phase7_tiny.toml", {"model.n_layers": 2, "model.seq_len": 32})
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    runs = {}
    for policy in ("full", "save_matmuls"):
        torch.manual_seed(0)
        model = build_model(rec, "cpu", vocab_size=300,
                            kernels={"hyperbolic_attention": "triton", "ar_ssm_scan": "triton"}).train()
        model.enable_activation_checkpointing(policy)
        loss, _ = model.loss(ids, torch.roll(ids, -1, dims=1))
        counter = CountOps(lambda op: op.name() in mixers)
        with counter:
            loss.backward()
        runs[policy] = counter.n, [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert runs["full"][0] == 4 and runs["save_matmuls"][0] == 0, {k: v[0] for k, v in runs.items()}
    for a, b in zip(runs["full"][1], runs["save_matmuls"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_static_decode_step_with_fused_projections_compiles_fullgraph():
    """prepare_for_inference fuses each block's input projections: the compiled step (what
    --compile-step captures) still compiles whole and decodes the unfused eager model's tokens."""
    from phase7fw.inference.decoding import Decoder, GraphedDecoder
    from tests.unit.test_decoding import greedy_with

    torch.manual_seed(0)
    model = build_model("recipes/phase7_tiny.toml", "cpu", vocab_size=300).eval()
    prompt = [5, 17, 2, 250, 9]
    want = greedy_with(Decoder(model, use_cache=False), prompt, 8)[0]
    assert all(block.fuse_input_projections() for block in model.blocks)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = GraphedDecoder(model, capture=False, compile_step=True)
    assert greedy_with(compiled, prompt, 8)[0] == want
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1

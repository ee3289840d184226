"""The static-shape decode step (what a CUDA graph captures), run eagerly on the CPU: equal to
the dynamic cached path and to full recomputation; fixed shapes and addresses; the decoder
options and their errors."""

import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from phase7fw.inference.decoding import Decoder, GraphedDecoder, make_decoder
from phase7fw.errors import Phase7Error
from phase7fw.inference.decoding import supports_static_decode
from tests.unit.test_decoding import KINDS, SEQ, WINDOW, make
from tests.unit.test_decoding import greedy_with as greedy

STATIC_KINDS = [k for k in KINDS if k != "phase7_sdpa_full"]


@pytest.mark.parametrize("kind", STATIC_KINDS)
def test_static_step_equals_the_dynamic_cache_and_recomputation(kind):
    model = make(kind)
    assert supports_static_decode(model)
    prompt = torch.randint(0, 257, (13,), generator=torch.Generator().manual_seed(1)).tolist()  # > window
    n = 2 * SEQ  # past the window and past seq_len (llama slides and rebuilds its cache)
    static = GraphedDecoder(model, capture=False)
    assert static.path == "static-eager"
    tokens, logits = greedy(static, prompt, n)
    ref_tokens, ref_logits = greedy(Decoder(model, use_cache=True), prompt, n)
    full_tokens, full_logits = greedy(Decoder(model, use_cache=False), prompt, n)
    assert tokens == ref_tokens == full_tokens
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, full_logits, rtol=1e-4, atol=1e-4)
    assert static.static_steps > n // 2  # most tokens ran the static step (llama's slides prefill)


@pytest.mark.parametrize("kind", ["phase7_hybrid", "llama"])
def test_compiled_static_step_gives_the_same_tokens(kind):
    # compile_step: inductor's fusion of the step (what a CUDA graph would then capture);
    # one compile serves every position (pos is a tensor), no recompiles along the way
    import torch._dynamo

    model = make(kind)
    prompt = torch.randint(0, 257, (13,), generator=torch.Generator().manual_seed(2)).tolist()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = GraphedDecoder(model, capture=False, compile_step=True)
    assert compiled.path == "static-eager+compile"
    tokens, logits = greedy(compiled, prompt, 12)
    ref_tokens, ref_logits = greedy(Decoder(model, use_cache=True), prompt, 12)
    assert tokens == ref_tokens and compiled.static_steps >= 10
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    stats = torch._dynamo.utils.counters["stats"]
    assert stats["unique_graphs"] == 1, dict(stats)


@pytest.mark.parametrize("kind", ["phase7_hybrid", "llama", "phase8_hybrid"])
def test_multi_token_continuation_goes_back_through_the_dynamic_path(kind):
    """A chat turn appends several tokens after static steps: the state is stored back, the
    chunk prefilled in parallel, and the static buffers reloaded."""
    model = make(kind)
    ids = torch.randint(0, 257, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    static, ref = GraphedDecoder(model, capture=False), Decoder(model, use_cache=True)
    for dec in (static, ref):
        dec.reset(ids[:6])
    outs = {id(static): [], id(ref): []}
    for chunk in ([], [ids[6]], [ids[7]], ids[8:12], [ids[12]], ids[13:15], [ids[15]], [ids[16]]):
        for dec in (static, ref):
            dec.extend(chunk)
            outs[id(dec)].append(dec.logits())
    torch.testing.assert_close(torch.cat(outs[id(static)]), torch.cat(outs[id(ref)]), rtol=1e-5, atol=1e-5)
    assert static.static is not None and static.in_static


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = tuple(tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])
                       if isinstance(t, torch.Tensor))
        self.ops.append((str(func), shapes))
        return out


@pytest.mark.parametrize("kind", ["phase7_hybrid", "phase7_sdpa_window", "llama", "phase8_hybrid"])
def test_the_step_is_static(kind):
    """The same ops on the same shapes before and after the ring wraps, no host reads of
    device values, and the buffers keep their addresses: what CUDA graph capture needs."""
    model = make(kind)
    dec = GraphedDecoder(model, capture=False)
    dec.reset(list(range(3)))
    dec.logits()
    static = dec.static
    addresses = [t.data_ptr() for t in static.buffers()]
    traces = []
    for step in range(WINDOW + 4):
        dec.extend([7 + step])
        if step in (0, WINDOW + 3):  # positions 3 (ring not full) and WINDOW + 6 (wrapped)
            with _Record() as rec:
                dec.logits()
            traces.append(rec.ops)
        else:
            dec.logits()
    assert traces[0] == traces[1]
    forbidden = ("_local_scalar_dense", "nonzero", "item")
    assert not [op for op, _ in traces[0] if any(f in op for f in forbidden)]
    assert [t.data_ptr() for t in static.buffers()] == addresses
    assert int(static.pos) == 3 + WINDOW + 4


def test_decoder_options_and_errors():
    model = make("phase7_hybrid")
    assert type(make_decoder(model, cuda_graph="auto")) is Decoder  # CPU: auto = the dynamic path
    assert type(make_decoder(model, cuda_graph="off")) is Decoder
    with pytest.raises(Phase7Error, match="needs a CUDA device"):
        make_decoder(model, cuda_graph="on")
    with pytest.raises(Phase7Error, match="must be one of"):
        make_decoder(model, cuda_graph="yes")
    with pytest.raises(Phase7Error, match="--no-cache"):
        make_decoder(model, use_cache=False, cuda_graph="on")
    # --compile-step compiles the captured step: where no graph is captured it says why, never ignored
    for kw, why in ((dict(cuda_graph="off"), "with --cuda-graph off"), (dict(use_cache=False), "with --no-cache"),
                    (dict(), "with a cpu device (it needs CUDA)")):
        with pytest.raises(Phase7Error, match=r"--compile-step compiles the decode step that a CUDA graph captures;"
                                              r" it cannot run " + re.escape(why)):
            make_decoder(model, compile_step=True, **kw)
    unbounded = make("phase7_sdpa_full")  # sdpa without a window keeps every key: no ring
    with pytest.raises(Phase7Error, match="which has no static decode step"):
        make_decoder(unbounded, compile_step=True, device="cuda")
    assert not supports_static_decode(unbounded)
    with pytest.raises(Phase7Error, match="no static decode step"):
        GraphedDecoder(unbounded, capture=False)
    assert GraphedDecoder(model, capture=True).path == "static-eager"  # no CUDA: nothing to capture


def test_a_failed_capture_is_said_or_raised(monkeypatch):
    """On CUDA a capture can fail: under auto one line says so and the dynamic path runs
    (same tokens); under on it is an error. Simulated here by a capture that raises."""
    model = make("phase7_hybrid")
    prompt = [5, 9, 2, 7]
    lines = []
    dec = GraphedDecoder(model, capture=False, say=lines.append)
    dec.capture = True
    monkeypatch.setattr(dec, "_capture", lambda: (_ for _ in ()).throw(RuntimeError("operation not permitted")))
    tokens, _ = greedy(dec, prompt, 8)
    assert tokens == greedy(Decoder(model), prompt, 8)[0]
    assert dec.path == "dynamic-cache" and dec.static_steps == 0
    assert lines == ["cuda graph: capture failed (RuntimeError: operation not permitted);"
                     " decoding runs the dynamic cached path (eager)"]
    strict = GraphedDecoder(model, capture=False, strict=True)
    strict.capture = True
    monkeypatch.setattr(strict, "_capture", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    strict.reset(prompt)
    with pytest.raises(Phase7Error, match="CUDA graph capture of the decode step failed"):
        strict.logits()


def test_sampling_is_unchanged_on_the_static_path():
    from phase7fw.inference.generation import SamplingParams, generate_text

    class Tok:
        vocab_size, eos_id = 257, -1

        @staticmethod
        def decode(ids):
            return "".join(chr(65 + i % 26) for i in ids)

    model = make("phase7_hybrid")
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.3, seed=3)
    texts = []
    for dec in (Decoder(model), GraphedDecoder(model, capture=False)):
        dec.reset([1, 2, 3])
        texts.append(generate_text(dec, Tok, params))
    assert texts[0] == texts[1] and len(texts[0]) == 20


@pytest.mark.parametrize("length", [SEQ, SEQ + 7])
def test_llama_prompt_at_or_past_the_context(length):
    """A prompt that fills seq_len: the next token slides the context (a prefill), never a
    static step past the RoPE table."""
    model = make("llama")
    prompt = torch.randint(0, 257, (length,), generator=torch.Generator().manual_seed(2)).tolist()
    static = GraphedDecoder(model, capture=False)
    tokens, logits = greedy(static, prompt, 10)
    ref_tokens, ref_logits = greedy(Decoder(model), prompt, 10)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert 0 < static.static_steps < 10


# ----------------------------------------------------------------------------- fused input projections
@pytest.mark.parametrize("kind, fuses", [("phase7_hybrid", ["attn"] * 3 + ["ssm", "gate"]),
                                         ("phase7_attention_only", ["attn"] * 3),
                                         ("phase7_sdpa_window", ["attn"] * 3 + ["ssm", "gate"]),
                                         ("phase7_mix_sum", ["attn"] * 3 + ["ssm"]),
                                         ("phase8_hybrid", ["attn"] * 4 + ["ssm", "gate"]),  # q, k, v, decay
                                         ("phase8_attention_only", ["attn"] * 4),
                                         ("phase7_ssm_only", None)])  # one projection: nothing to fuse
def test_fused_input_projections_decode_the_same_tokens(kind, fuses):
    """fuse_input_projections (what prepare_for_inference does for decoding): one matmul for
    the projections of each block's normed input, the same logits and greedy tokens."""
    model, fused = make(kind), make(kind)
    done = [block.fuse_input_projections() for block in fused.blocks]
    if fuses is None:
        assert not any(done) and all(block.fused_input is None for block in fused.blocks)
        return
    assert all(done) and [name for name, _ in fused.blocks[0].fused_input[2]] == fuses
    prompt = [3, 1, 4, 1, 5, 9, 2]
    want, want_logits = greedy(GraphedDecoder(model, capture=False), prompt, SEQ)
    got, got_logits = greedy(GraphedDecoder(fused, capture=False), prompt, SEQ)
    assert got == want
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)


def test_fused_weights_follow_loaded_weights_and_a_move_undoes_the_fusion():
    model, other = make("phase7_hybrid"), make("phase7_hybrid", seed=1)
    keys = list(model.state_dict())
    assert all(block.fuse_input_projections() for block in model.blocks)
    block = model.blocks[0]
    assert list(model.state_dict()) == keys  # the checkpoint layout is unchanged
    assert block.attn.q_proj.weight.data_ptr() == block.fused_input[0].data_ptr()  # a view, not a copy
    model.load_state_dict(other.state_dict())  # in place: the fused weight follows
    prompt = [2, 7, 1, 8]
    assert greedy(GraphedDecoder(model, capture=False), prompt, 8)[0] == \
        greedy(GraphedDecoder(other, capture=False), prompt, 8)[0]
    torch.testing.assert_close(block.fused_input[0][: block.attn.q_proj.out_features],
                               other.blocks[0].attn.q_proj.weight)
    model.float()  # .to() / .float() may give every parameter new storage: the fusion is dropped
    assert all(b.fused_input is None for b in model.blocks)
    assert greedy(GraphedDecoder(model, capture=False), prompt, 8)[0] == \
        greedy(GraphedDecoder(other, capture=False), prompt, 8)[0]


def test_prepare_for_inference_casts_then_fuses():
    from phase7fw.inference.decoding import prepare_for_inference

    model = make("phase7_hybrid")
    prepare_for_inference(model, torch.bfloat16)
    block = model.blocks[0]
    assert block.fused_input is not None and block.fused_input[0].dtype == torch.bfloat16
    gate_at = 4 * block.attn.q_proj.out_features  # q, k, v, the SSM's z, then the gate
    assert block.gate.weight.dtype == torch.bfloat16
    assert block.gate.bias.data_ptr() == block.fused_input[1][gate_at:].data_ptr()
    prepare_for_inference(model, torch.float16)  # again, another dtype: fused anew, not stale views
    assert block.fused_input[0].dtype == torch.float16
    assert block.attn.v_proj.weight.data_ptr() == block.fused_input[0][2 * block.attn.q_proj.out_features:].data_ptr()

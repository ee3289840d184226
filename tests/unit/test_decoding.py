"""Cached decoding: ring buffers, prefill == stepping, cached == uncached greedy tokens."""

import pytest
import torch

from phase7fw import build_model, load_recipe
from phase7fw.components.phase7.cached import SsmCache
from phase7fw.components.phase8.attention import LinearAttentionCache
from phase7fw.components.caches import KVWindow
from phase7fw.inference.decoding import Decoder, supports_cache
from tests.conftest import RECIPES

SEQ, WINDOW = 24, 5
SMALL = {"model.seq_len": SEQ, "model.d_model": 32, "model.n_heads": 2, "model.n_layers": 2}
P7 = {**SMALL, "model.attention.window": WINDOW, "model.ssm.n_heads": 2, "model.ssm.chunk_size": 4,
      "model.ssm.conv_size": 3}
P8 = {**SMALL, "model.attention.chunk_size": 16, "model.ssm.n_heads": 2, "model.ssm.chunk_size": 4,
      "model.ssm.conv_size": 3}
KINDS = {
    "llama": ("llama_tiny", {**SMALL, "model.ffn_hidden": 64}),
    "llama_gqa": ("llama_tiny", {**SMALL, "model.n_heads": 4, "model.n_kv_heads": 2, "model.ffn_hidden": 64}),
    "phase7_hybrid": ("phase7_tiny", P7),
    "phase7_attention_only": ("phase7_tiny", {**P7, "model.mixer": "attention"}),
    "phase7_ssm_only": ("phase7_tiny", {**P7, "model.mixer": "ssm"}),
    "phase7_sdpa_full": ("phase7_tiny", {**P7, "model.attention": {"name": "sdpa"}}),
    "phase7_sdpa_window": ("phase7_tiny", {**P7, "model.attention": {"name": "sdpa", "window": 6}}),
    "phase7_sdpa_qk_norm": ("phase7_tiny", {**P7, "model.attention": {"name": "sdpa", "window": 6, "qk_norm": True}}),
    "phase7_tied_dense": ("phase7_tiny", {**P7, "model.tie_embeddings": True, "model.embedding": {"name": "dense"}}),
    "phase7_dot_distance": ("phase7_tiny", {**P7, "model.attention.score": "dot_distance"}),
    "phase7_squared_distance": ("phase7_tiny", {**P7, "model.attention.score": "squared_distance"}),
    "phase7_distance": ("phase7_tiny", {**P7, "model.attention.score": "distance", "model.attention.qk_norm": False}),
    "phase7_qk_norm_distance": ("phase7_tiny", {**P7, "model.attention.score": "distance", "model.attention.qk_norm": True}),
    "phase7_mix_sum": ("phase7_tiny", {**P7, "model.block": {"name": "hybrid", "mix": "sum"}}),
    "phase7_mix_alternate": ("phase7_tiny", {**P7, "model.n_layers": 3, "model.block": {"name": "hybrid", "mix": "alternate"}}),
    "phase7_ssm_every2": ("phase7_tiny", {**P7, "model.n_layers": 3, "model.block": {"name": "hybrid", "ssm_every": 2}}),
    "phase7_first_design_ssm": ("phase7_tiny", {**P7, "model.ssm.discretize": False, "model.ssm.out_norm": False,
                                                "model.ssm.init_std": 0.02}),
    # Phase 8: the linear attention (chunk 16 < SEQ, not a divisor), with and without the SSM
    "phase8_hybrid": ("phase8_tiny", P8),
    "phase8_attention_only": ("phase8_tiny", {**P8, "model.mixer": "attention"}),
}


def make(kind: str, seed: int = 0):
    recipe, over = KINDS[kind]
    torch.manual_seed(seed)
    return build_model(load_recipe(RECIPES / f"{recipe}.toml", over), "cpu").eval()


def greedy(model, prompt, n, use_cache):
    return greedy_with(Decoder(model, use_cache=use_cache), prompt, n)


def greedy_with(dec, prompt, n):
    """Greedy tokens and the logits of each step, decoded by ``dec``."""
    dec.reset(prompt)
    tokens, logits = [], []
    for _ in range(n):
        out = dec.logits()
        logits.append(out)
        tokens.append(int(out.argmax()))
        dec.extend(tokens[-1:])
    return tokens, torch.cat(logits)


# ----------------------------------------------------------------------------- ring buffer
def test_kv_window_keeps_the_last_w_positions_in_order():
    kv = KVWindow(4)
    assert kv.view() is None
    seq = torch.arange(11.0).view(1, 1, 11, 1)
    for chunk in (seq[:, :, :3], seq[:, :, 3:4], seq[:, :, 4:10], seq[:, :, 10:]):  # incl. a chunk > capacity
        kv.append(chunk, -chunk)
        k, v = kv.view()
        end = kv.total
        assert k.flatten().tolist() == list(range(max(0, end - 4), end)) and torch.equal(v, -k)
    assert kv.k.shape[2] == 4 and len(kv) == 4  # never grows: a ring


def test_kv_window_unbounded_grows_and_keeps_everything():
    kv = KVWindow(None)
    for i in range(100):
        kv.append(torch.full((1, 2, 1, 3), float(i)), torch.full((1, 2, 1, 3), float(i)))
    k, _ = kv.view()
    assert k[0, 0, :, 0].tolist() == [float(i) for i in range(100)]


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", list(KINDS))
def test_cached_greedy_equals_full_recomputation(kind):
    model = make(kind)
    assert supports_cache(model)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 257, (13,), generator=g).tolist()  # longer than the window
    n = 2 * SEQ  # past seq_len: phase7 keeps going (windowed), llama slides
    ref_tokens, ref_logits = greedy(model, prompt, n, use_cache=False)
    tokens, logits = greedy(model, prompt, n, use_cache=True)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert len(set(ref_tokens)) > 3  # a real sequence, not one token repeated


def test_prompt_longer_than_the_context():
    for kind in ("llama", "phase7_hybrid"):
        model = make(kind)
        prompt = torch.randint(0, 257, (SEQ + 7,), generator=torch.Generator().manual_seed(2)).tolist()
        assert greedy(model, prompt, 10, True)[0] == greedy(model, prompt, 10, False)[0]


def _layer_state(layer_cache):
    """Every tensor a phase7 block's cache holds, attention window in chronological order."""
    out = []
    for part in (layer_cache["attn"], layer_cache["ssm"]):
        if isinstance(part, KVWindow):
            out += list(part.view())
        elif isinstance(part, SsmCache):
            out += [part.conv, part.state]
        elif isinstance(part, LinearAttentionCache):
            out += [part.state]
    return out


@pytest.mark.parametrize("kind", ["phase7_hybrid", "phase7_sdpa_full", "llama", "phase8_hybrid"])
def test_prefill_leaves_the_cache_as_stepping_does(kind):
    model = make(kind)
    ids = torch.randint(0, 257, (1, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        one = model.init_cache(1)
        prefill_logits = model.forward_cached(ids, one)  # parallel path
        steps = model.init_cache(1)
        step_logits = torch.cat([model.forward_cached(ids[:, t : t + 1], steps) for t in range(19)], dim=1)
        split = model.init_cache(1)  # a prompt continued in a chunk (chat turns)
        split_logits = torch.cat([model.forward_cached(ids[:, :7], split), model.forward_cached(ids[:, 7:], split)], 1)
    for logits in (prefill_logits, step_logits, split_logits):
        torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-5)
    assert one.pos == steps.pos == split.pos == 19
    for a, b, c in zip(one.layers, steps.layers, split.layers):
        if kind == "llama":
            states = [list(x.view()) for x in (a, b, c)]
        else:
            states = [_layer_state(x) for x in (a, b, c)]
        for x, y, z in zip(*states):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(z, x, rtol=1e-5, atol=1e-5)


def test_ssm_state_is_fp32_and_ring_keeps_post_rope_keys():
    from phase7fw.components.phase7.cached import rope_at

    model = make("phase7_hybrid")
    cache = model.init_cache(1)
    ids = torch.randint(0, 257, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model.forward_cached(ids, cache)
        block = model.blocks[0]  # its input is the (position-free) embedding
        u = block.norm1(model.embedding(ids[:, 8:9]))
        k8 = rope_at(block.attn.rope, block.attn.projected(u)[1], 8)
    attn, ssm = cache.layers[0]["attn"], cache.layers[0]["ssm"]
    assert ssm.state.dtype == torch.float32 and ssm.state.shape == (1, 2, 16, 16)
    assert ssm.conv.shape == (1, 32, 2)  # conv_size - 1 inputs
    assert attn.k.shape[2] == WINDOW and attn.total == 9 and attn.k.dtype == torch.float32
    torch.testing.assert_close(attn.view()[0][:, :, -1:], k8, rtol=1e-5, atol=1e-6)


def test_decoder_falls_back_without_the_protocol():
    class Plain(torch.nn.Module):
        seq_len = 8

        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 5)

        def forward(self, ids):
            return self.emb(ids)

    dec = Decoder(Plain(), use_cache=True)
    assert not dec.use_cache
    dec.reset(list(range(5)) * 3)  # 15 tokens > seq_len 8: the last 8 are seen
    assert dec.visible() == (list(range(5)) * 3)[-8:]
    assert dec.logits().shape == (1, 5)


def test_llama_context_slides_in_chunks():
    dec = Decoder(make("llama"), use_cache=True)
    dec.reset(list(range(SEQ)))
    dec.logits()
    assert dec.start == 0 and dec.cache.pos == SEQ
    dec.extend([1])
    dec.logits()  # 25 tokens: the oldest dropped so that SEQ // 2 remain, cache rebuilt from them
    assert dec.start == SEQ + 1 - SEQ // 2 and dec.cache.pos == SEQ // 2

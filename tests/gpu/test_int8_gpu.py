"""Int8 weight-only decoding on a CUDA GPU (marker ``gpu``): the Triton GEMV in bf16 against
its torch reference at the 1.5B model's projection shapes, and a model decoding with int8
weights through a captured CUDA graph giving the tokens of its eager int8 path."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("N,K", [(2048 * 5 + 16, 2048), (8192, 2048), (2048, 4096), (257, 100)])
def test_the_gemv_matches_the_reference_in_bf16(N, K):
    from phase7fw.inference.int8 import int8_linear, int8_linear_reference, quantize_rows

    g = torch.Generator(device="cuda").manual_seed(0)
    q, scale = quantize_rows(torch.randn(N, K, device="cuda", generator=g) * 0.02)
    bias = torch.randn(N, device="cuda", generator=g, dtype=torch.bfloat16)
    for rows in (1, 4):
        x = torch.randn(rows, K, device="cuda", generator=g, dtype=torch.bfloat16)
        got = int8_linear(x, q, scale, bias, kernel=True)
        # the reference in fp32 (the kernel accumulates in fp32, then rounds once to bf16)
        ref = int8_linear_reference(x.float(), q, scale, bias.float())
        assert got.dtype == torch.bfloat16
        assert ((got.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_a_graphed_int8_decoder_gives_the_eager_int8_tokens():
    from phase7fw import build_model, load_recipe
    from phase7fw.inference.decoding import Decoder, GraphedDecoder, prepare_for_inference

    torch.manual_seed(0)
    rec = load_recipe("recipes/phase7_tiny.toml", {"model.seq_len": 64})
    model = build_model(rec, "cuda", vocab_size=257)
    prepare_for_inference(model, torch.bfloat16, int8=True)
    prompt = list(range(5, 17))

    def greedy(dec, n=24):
        dec.reset(prompt)
        out = []
        for _ in range(n):
            out.append(int(dec.logits().argmax()))
            dec.extend(out[-1:])
        return out

    auto = dict(device=torch.device("cuda"), autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    graphed = GraphedDecoder(model, capture=True, strict=True, **auto)
    assert greedy(graphed) == greedy(Decoder(model, use_cache=True, **auto))
    assert graphed.path == "cuda-graph"

"""Int8 weight-only decoding (phase7fw.inference.int8) with its torch reference, on the CPU:
the per-row quantization's error bound, the layer against the float layer, whole models
decoding with int8 weights (static == dynamic path, close to the float model), and the
errors. The Triton kernel against the reference: tests/kernels/test_int8_gemv.py."""

import pytest
import torch
from torch import nn

from phase7fw.errors import Phase7Error
from phase7fw.inference.decoding import Decoder, GraphedDecoder, prepare_for_inference
from phase7fw.inference.int8 import Int8Linear, int8_linear_reference, quantize_linears, quantize_rows
from tests.unit.test_decoding import greedy_with as greedy
from tests.unit.test_decoding import make


def assert_same_decoding(dec, ref_dec, prompt, n, tol=1e-5):
    """Both decoders give the same greedy tokens and logits within ``tol``; returns the logits."""
    with torch.no_grad():
        tokens, logits = greedy(dec, prompt, n)
        ref_tokens, ref_logits = greedy(ref_dec, prompt, n)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, rtol=tol, atol=tol)
    return logits


def test_every_weight_is_within_half_a_step_of_its_row_scale():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 50, generator=g) * torch.logspace(-3, 1, 37).unsqueeze(1)  # rows of very different sizes
    w[5] = 0.0  # an all-zero row: no division by zero
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (37,) and int(q.abs().max()) == 127
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7 * w.abs()).all())
    assert torch.equal(q[5], torch.zeros(50, dtype=torch.int8))


def test_the_int8_layer_stays_within_its_error_bound_of_the_float_layer():
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(64, 24, bias=True)
    x = torch.randn(3, 5, 64, generator=g)
    layer = Int8Linear.from_linear(lin, kernel=False)
    with torch.no_grad():
        y, ref = layer(x), lin(x)
    # |x (Q s - W)^T| <= sum_c |x_c| s_r / 2
    bound = x.abs().sum(-1, keepdim=True) * layer.scale / 2
    assert y.shape == ref.shape and bool(((y - ref).abs() <= bound + 1e-6).all())
    assert (y - ref).abs().max() > 0  # it is quantized
    dequant = layer.qweight.float() * layer.scale[:, None]
    torch.testing.assert_close(int8_linear_reference(x, layer.qweight, layer.scale, layer.bias),
                               torch.nn.functional.linear(x, dequant, lin.bias.detach()))
    assert set(layer.state_dict()) == {"qweight", "scale", "bias"}


@pytest.mark.parametrize("kind", ["phase7_hybrid", "phase8_hybrid", "llama"])
def test_a_model_decodes_with_int8_weights_close_to_its_float_logits(kind):
    model, ref = make(kind), make(kind)
    n = quantize_linears(model)
    assert n > 0 and not any(isinstance(m, nn.Linear) for m in model.blocks.modules())
    prompt = [3, 1, 4, 1, 5, 9, 2]
    logits = assert_same_decoding(GraphedDecoder(model, capture=False), Decoder(model, use_cache=True), prompt, 8)
    with torch.no_grad():
        _, ref_logits = greedy(Decoder(ref, use_cache=True), prompt, 8)
    # 8-bit weights: the logits move by a fraction of their spread, not more
    assert (logits[:1] - ref_logits[:1]).abs().max() < 0.05 * ref_logits[:1].std()


def test_the_fused_input_projection_is_quantized_row_for_row_like_its_parts():
    """A phase7 block's fused projection (prepare_for_inference on a GPU) is quantized per row,
    so its rows equal those of the separately quantized projections: the static step (fused)
    and the dynamic path (separate layers) give the same logits."""
    model = make("phase7_hybrid")
    assert all(block.fuse_input_projections() for block in model.blocks)
    quantize_linears(model)
    fused = model.blocks[0].fused_input[0]
    q_proj = model.blocks[0].attn.q_proj
    assert isinstance(fused, Int8Linear) and torch.equal(fused.qweight[: q_proj.out_features], q_proj.qweight)
    assert_same_decoding(GraphedDecoder(model, capture=False), Decoder(model, use_cache=True), [2, 7, 1, 8, 2, 8], 8)


def test_int8_weights_refuse_training_and_a_second_preparation():
    model = make("phase7_hybrid")
    prepare_for_inference(model, None, int8=True)
    layer = model.blocks[0].ffn.w2
    with pytest.raises(RuntimeError, match="Int8Linear is for decoding: its int8 weights cannot be trained"):
        layer(torch.randn(2, layer.in_features, requires_grad=True))
    with pytest.raises(Phase7Error, match="int8 already"):
        prepare_for_inference(model, torch.bfloat16, int8=True)
    with pytest.raises(ValueError, match="has no blocks to quantize"):
        quantize_linears(nn.Linear(2, 2))

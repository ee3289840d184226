"""The int8 weight-only GEMV kernel (phase7fw.inference.int8) in Triton's CPU interpreter
against its torch reference (fp32: bf16 is not faithful in the interpreter), inside a decoding
model, and its op registration."""

import pytest
import torch

from phase7fw.inference.int8 import GEMV_MAX_ROWS, Int8Linear, int8_linear, int8_linear_reference, quantize_rows


@pytest.mark.parametrize("rows,N,K,bias", [(1, 37, 70, True), (3, 64, 128, False), (GEMV_MAX_ROWS, 20, 33, True)])
def test_the_kernel_equals_the_reference(rows, N, K, bias):
    g = torch.Generator().manual_seed(rows)
    q, scale = quantize_rows(torch.randn(N, K, generator=g))
    b = torch.randn(N, generator=g) if bias else None
    x = torch.randn(rows, K, generator=g)
    got = int8_linear(x, q, scale, b, kernel=True)
    torch.testing.assert_close(got, int8_linear_reference(x, q, scale, b), rtol=1e-5, atol=1e-5)
    # leading dimensions of a decoding step (batch, 1 token) are kept
    x3 = x.reshape(rows, 1, K)
    assert int8_linear(x3, q, scale, b, kernel=True).shape == (rows, 1, N)


def test_more_rows_than_a_decoding_step_take_the_reference():
    q, scale = quantize_rows(torch.randn(16, 32))
    x = torch.randn(GEMV_MAX_ROWS + 1, 32)
    calls = []
    op = torch.ops.phase7fw.int8_gemv
    try:
        torch.ops.phase7fw.int8_gemv = lambda *a: calls.append(a)  # noqa: E731 - would be called by the kernel path
        out = int8_linear(x, q, scale, None, kernel=True)
    finally:
        torch.ops.phase7fw.int8_gemv = op
    assert not calls
    torch.testing.assert_close(out, int8_linear_reference(x, q, scale))


def test_a_model_decodes_the_same_with_the_kernel_and_with_the_reference():
    from phase7fw.inference.decoding import Decoder
    from phase7fw.inference.int8 import quantize_linears
    from tests.unit.test_decoding import make
    from tests.unit.test_int8_decoding import assert_same_decoding

    fast, ref = make("phase7_hybrid"), make("phase7_hybrid")
    quantize_linears(fast)  # under TRITON_INTERPRET=1 the layers run the kernel
    quantize_linears(ref)
    for m in ref.modules():
        if isinstance(m, Int8Linear):
            m.kernel = False
    assert all(m.kernel for m in fast.modules() if isinstance(m, Int8Linear))
    assert_same_decoding(Decoder(fast, use_cache=True), Decoder(ref, use_cache=True), [5, 3, 5, 8, 9], 6, tol=1e-4)


def test_the_op_passes_opcheck():
    from phase7fw.inference.int8 import _int8_gemv

    q, scale = quantize_rows(torch.randn(24, 40))
    torch.library.opcheck(_int8_gemv, (torch.randn(2, 40), q, scale, torch.randn(24)),
                          test_utils=("test_schema", "test_faketensor"))

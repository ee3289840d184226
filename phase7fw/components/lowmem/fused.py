"""The fused update of ``adamw_lowmem`` (``[optimizer] fused = true``): one Triton kernel per
update chunk instead of ~45 small torch ops (dequantize both moments, AdamW, round the weight,
quantize both moments). Why: the 1.5B model's offloaded 8-bit step was 1.3 s on an H200
(benchmarks/RESULTS.md, "Small-GPU mode"), ~750 chunks of torch ops launched from Python.

Same arithmetic as the torch update in :mod:`phase7fw.components.lowmem` (fp32 throughout, IEEE
division and square root, the same code books read from the same tables); the random bits
differ (Philox in the kernel, ``torch.Generator`` there), so with stochastic rounding the two
agree in distribution, not bit for bit. With nearest rounding they agree to fp32 rounding
(tests/kernels/test_lowmem_fused.py). One program updates one quantization block (one
program per ``BLOCK`` elements of a 32-bit state), so a block's absmax never crosses programs.
"""

from __future__ import annotations

import torch

from phase7fw.components.lowmem import states
from phase7fw.kernels._triton import require, tl, triton

ROUNDING = {"nearest": 0, "stochastic": 1, "compensated": 2}
BLOCK_32 = 1024  # elements per program for 32-bit states (no quantization blocks)


@triton.jit
def _quantize(x, mask, table_ptr, u, TOP: tl.constexpr, PER_OCTAVE: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Codes and absmax of one block x (fp32), as ``states.quantize_blockwise``: signed codes
    (TOP 127) or unsigned ones (TOP 255, never rounded down to 0)."""
    SIGNED: tl.constexpr = TOP < 255
    LOWEST: tl.constexpr = 0 if TOP < 255 else 1
    mag = tl.where(mask, tl.abs(x), 0.0)
    absmax = tl.max(mag, axis=0)
    r = tl.div_rn(mag, tl.where(absmax > 0, absmax, 1.0))
    level = tl.log2(r) * PER_OCTAVE + TOP  # -inf for r = 0
    lo = tl.minimum(tl.maximum(tl.floor(level), LOWEST), TOP)
    hi = tl.minimum(lo + 1, TOP)
    v_lo = tl.load(table_ptr + lo.to(tl.int32))
    v_hi = tl.load(table_ptr + hi.to(tl.int32))
    frac = tl.where(hi > lo, tl.div_rn(r - v_lo, tl.where(hi > lo, v_hi - v_lo, 1.0)), 0.0)
    if STOCHASTIC:
        up = u < frac
    else:
        up = frac >= 0.5
    k = tl.where(up, hi, lo)
    if SIGNED:
        code = tl.where(x > 0, k, tl.where(x < 0, -k, 0.0))
    else:
        code = tl.where(r > 0, k, 0.0)
    return code, absmax


@triton.jit
def _to_bf16(x, random_bits, STOCHASTIC: tl.constexpr):
    """fp32 x rounded to a bf16 value (still fp32, so the cast after it is exact: Triton's
    interpreter casts by truncation): 16 random bits added below the bf16 mantissa, then
    truncated (stochastic, unbiased), or round to nearest even. NaN stays NaN."""
    bits = x.to(tl.int32, bitcast=True)
    if STOCHASTIC:
        bits = bits + (random_bits & 0xFFFF).to(tl.int32)
    else:
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return tl.where(x == x, (bits & -65536).to(tl.float32, bitcast=True), x)


@triton.jit
def _adamw_kernel(w_ptr, comp_ptr, g_ptr, scale_ptr, m_ptr, m_absmax_ptr, v_ptr, v_absmax_ptr,
                  table_s_ptr, table_u_ptr, n, offset0, seed,
                  decay_keep, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
                  BLOCK: tl.constexpr, EIGHT: tl.constexpr, LOW: tl.constexpr, ROUND: tl.constexpr,
                  HAS_SCALE: tl.constexpr, STOCHASTIC_CODES: tl.constexpr, M_TOP: tl.constexpr,
                  M_OCTAVE: tl.constexpr, V_TOP: tl.constexpr, V_OCTAVE: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ROUND == 2:
        w = w + tl.load(comp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if EIGHT:
        km = tl.load(m_ptr + offs, mask=mask, other=0).to(tl.int32)
        m_abs = tl.load(table_s_ptr + tl.abs(km))
        m = tl.where(km > 0, m_abs, tl.where(km < 0, -m_abs, 0.0)) * tl.load(m_absmax_ptr + pid)
        kv = tl.load(v_ptr + offs, mask=mask, other=0).to(tl.int32)
        s = tl.load(table_u_ptr + kv) * tl.load(v_absmax_ptr + pid)
        v = s * s
    else:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    w = w * decay_keep
    m = m + lerp_weight * (g - m)  # torch's lerp for a weight below 0.5
    v = v * beta2 + one_minus_beta2 * g * g
    root = tl.sqrt_rn(v)
    w = w - step_size * tl.div_rn(m, tl.div_rn(root, bc2_sqrt) + eps)
    # Four independent Philox streams per element: weight rounding, m's code, sqrt(v)'s code.
    r_w, r_m, r_v, _ = tl.randint4x(seed, offset0 + offs)
    if LOW:
        new = _to_bf16(w, r_w, ROUND == 1)
        tl.store(w_ptr + offs, new.to(tl.bfloat16), mask=mask)
        if ROUND == 2:
            tl.store(comp_ptr + offs, _to_bf16(w - new, r_w, False).to(tl.bfloat16), mask=mask)
    else:
        tl.store(w_ptr + offs, w, mask=mask)
    if EIGHT:
        u_m = (r_m & 0xFFFFFF).to(tl.float32) * (1.0 / 16777216.0)  # 24 random bits -> [0, 1)
        u_v = (r_v & 0xFFFFFF).to(tl.float32) * (1.0 / 16777216.0)
        code_m, absmax_m = _quantize(m, mask, table_s_ptr, u_m, M_TOP, M_OCTAVE, STOCHASTIC_CODES)
        code_v, absmax_v = _quantize(root, mask, table_u_ptr, u_v, V_TOP, V_OCTAVE, STOCHASTIC_CODES)
        tl.store(m_ptr + offs, code_m.to(tl.int8), mask=mask)
        tl.store(v_ptr + offs, code_v.to(tl.uint8), mask=mask)
        tl.store(m_absmax_ptr + pid, absmax_m)
        tl.store(v_absmax_ptr + pid, absmax_v)
    else:
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)


def fused_chunk_update(w: torch.Tensor, g: torch.Tensor, moments: tuple, *, comp: torch.Tensor | None,
                       scale: torch.Tensor | None, lr: float, weight_decay: float, betas: tuple[float, float],
                       eps: float, step: float, block: int, rounding: str | None, seed: int, offset: int,
                       stochastic_codes: bool = True) -> None:
    """Update one chunk in place: weights ``w`` (flat, fp32 or bf16), the moments
    ``moments`` on w's device (8-bit: ``(m_codes, m_absmax, v_codes, v_absmax)``; 32-bit:
    ``(m, v)``), ``comp`` (the compensation buffer) when rounding is "compensated".
    ``offset`` is the chunk's first element in its parameter (the random streams are per
    element of the parameter, so a chunking change does not change them)."""
    require(w)
    if scale is not None:
        scale = scale.to(device=w.device, dtype=torch.float32)
    eight = len(moments) == 4
    beta1, beta2 = betas
    bc1 = 1 - beta1**step
    args = dict(
        decay_keep=1 - lr * weight_decay, lerp_weight=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2,
        step_size=lr / bc1, bc2_sqrt=(1 - beta2**step) ** 0.5, eps=eps,
    )
    if eight:
        m, m_absmax, v, v_absmax = moments
        size = block
    else:
        (m, v), m_absmax, v_absmax = moments, w, w  # absmax pointers unused
        size = BLOCK_32
    table_s, table_u = states._table(True, w.device), states._table(False, w.device)
    n = w.numel()
    grid = (triton.cdiv(n, size),)
    _adamw_kernel[grid](
        w, comp if comp is not None else w, g, scale if scale is not None else w, m, m_absmax, v, v_absmax,
        table_s, table_u, n, offset, seed, **args,
        BLOCK=size, EIGHT=eight, LOW=w.dtype == torch.bfloat16, ROUND=ROUNDING[rounding or "nearest"],
        HAS_SCALE=scale is not None, STOCHASTIC_CODES=stochastic_codes,
        M_TOP=states._SIGNED[0], M_OCTAVE=states._SIGNED[1], V_TOP=states._UNSIGNED[0], V_OCTAVE=states._UNSIGNED[1],
        num_warps=max(1, min(8, size // 256)),
    )

"""The state layouts of ``adamw_lowmem``: bf16 stochastic rounding, block-wise 8-bit
moments, and the conversion of a state it wrote into torch's Adam layout for another
optimizer (the ``adapt_optimizer_state`` hook of this plugin calls :func:`adapt_optimizer_state`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------- bf16 rounding


def round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16. With a ``generator``: stochastic rounding, unbiased (E[result] = x):
    16 random bits are added below the bf16 mantissa and the low 16 bits are cut off, so x
    rounds up with probability equal to its distance from the lower neighbour. Values that
    bf16 represents exactly are unchanged. Without a generator: round to nearest even."""
    if generator is None:
        return x.to(torch.bfloat16)
    x = x.float().contiguous()
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = (x.view(torch.int32) + noise) & -65536  # -65536 == 0xFFFF0000 as int32
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


# ---------------------------------------------------------------------------- 8-bit states
#
# Block-wise quantization with a logarithmic code book: each block of ``block`` consecutive
# elements stores its absolute maximum in fp32 and every element as an 8-bit code k with
# value absmax * 2^((k - top) / per_octave) (k = 0 means 0). Relative precision is the same
# at every magnitude (a code step is 9% for signed codes, 4.4% for unsigned ones) over ~16
# octaves below the block's maximum; a linear code book would flush every element 100x
# smaller than its block's maximum to zero.
#
# Rounding between the two neighbouring codes is stochastic (seeded) and unbiased in value:
# Adam's moments change by less than one code step per step (beta2 = 0.95 moves sqrt(v) by
# 2.5%), and nearest rounding would freeze or overshoot such slow changes.

_SIGNED = (127, 8)  # top code, codes per octave: int8, sign + 7 bits, 15.9 octaves
_UNSIGNED = (255, 16)  # uint8, 15.9 octaves
_TABLES: dict = {}


def _table(signed: bool, device) -> torch.Tensor:
    key = (signed, str(device))
    if key not in _TABLES:
        top, per_octave = _SIGNED if signed else _UNSIGNED
        k = torch.arange(top + 1, dtype=torch.float64)
        values = torch.exp2((k - top) / per_octave)
        values[0] = 0.0
        _TABLES[key] = values.to(torch.float32).to(device)
    return _TABLES[key]


def quantize_blockwise(x: torch.Tensor, *, signed: bool, block: int = 256,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat fp32 ``x`` -> (codes: int8 if ``signed`` else uint8, same length; absmax: fp32,
    one per block). With a ``generator`` the rounding is stochastic and unbiased, otherwise
    to the nearer code. Unsigned codes never round a positive value to 0 (the smallest code
    is used instead: quantized second moments never vanish and blow up an update)."""
    top, per_octave = _SIGNED if signed else _UNSIGNED
    n = x.numel()
    n_blocks = -(-n // block)
    xb = F.pad(x.float().reshape(-1), (0, n_blocks * block - n)).view(n_blocks, block)
    mag = xb.abs()
    absmax = mag.amax(dim=1)
    r = mag / torch.where(absmax > 0, absmax, 1.0)[:, None]  # in [0, 1]
    level = torch.log2(r).mul_(per_octave).add_(top)  # -inf for 0
    lo = level.floor_().clamp_(min=0 if signed else 1, max=top)
    hi = (lo + 1).clamp_(max=top)
    table = _table(signed, x.device)
    v_lo, v_hi = table[lo.long()], table[hi.long()]
    frac = ((r - v_lo) / (v_hi - v_lo)).nan_to_num_(0.0)  # top code: 0 / 0
    if generator is not None:
        up = torch.rand(frac.shape, device=x.device, generator=generator) < frac
    else:
        up = frac >= 0.5
    k = torch.where(up, hi, lo)
    if signed:
        codes = (k * torch.sign(xb)).to(torch.int8)
    else:
        codes = torch.where(r > 0, k, 0.0).to(torch.uint8)
    return codes.view(-1)[:n], absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, *, block: int = 256) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise` (the sign of the codes' dtype says which book)."""
    signed = codes.dtype == torch.int8
    k = codes.reshape(-1).long()
    values = _table(signed, codes.device)[k.abs()]
    if signed:
        values = values * torch.sign(k)
    scale = absmax.to(values.device).repeat_interleave(block)[: values.numel()]
    return values * scale


def quantize_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, block: int = 256,
                     generator: torch.Generator | None = None, chunk: int = 1 << 21) -> dict:
    """Dense Adam moments -> the 8-bit state layout (``exp_avg_codes``/``exp_avg_absmax``,
    ``exp_avg_sq_codes``/``exp_avg_sq_absmax``: sqrt(v) is quantized, codes keep the shape)."""
    m, s = exp_avg.float().reshape(-1), exp_avg_sq.float().reshape(-1).sqrt()
    parts: dict = {"exp_avg_codes": [], "exp_avg_absmax": [], "exp_avg_sq_codes": [], "exp_avg_sq_absmax": []}
    for start in range(0, max(m.numel(), 1), chunk):
        for name, x, signed in (("exp_avg", m, True), ("exp_avg_sq", s, False)):
            codes, absmax = quantize_blockwise(x[start:start + chunk], signed=signed, block=block, generator=generator)
            parts[f"{name}_codes"].append(codes)
            parts[f"{name}_absmax"].append(absmax)
    out = {k: torch.cat(v) for k, v in parts.items()}
    out["exp_avg_codes"] = out["exp_avg_codes"].view(exp_avg.shape)
    out["exp_avg_sq_codes"] = out["exp_avg_sq_codes"].view(exp_avg.shape)
    return out


def dense_moments(state: dict, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp_avg, exp_avg_sq) in fp32 from an 8-bit state (shape of the codes)."""
    codes = state["exp_avg_codes"]
    block = block or block_of(state)
    m = dequantize_blockwise(codes, state["exp_avg_absmax"], block=block).view(codes.shape)
    s = dequantize_blockwise(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], block=block)
    return m, (s * s).view(codes.shape)


def block_of(state: dict) -> int:
    """The block size an 8-bit state was written with (a power of two)."""
    n, n_blocks = state["exp_avg_codes"].numel(), max(state["exp_avg_absmax"].numel(), 1)
    block = 1
    while -(-n // block) > n_blocks:
        block *= 2
    return block


# ---------------------------------------------------------------------------- another optimizer's layout

#: param_group keys only adamw_lowmem has; a standard optimizer drops them on load.
LOWMEM_GROUP_KEYS = ("state_bits", "block_size", "weight_rounding", "offload_states", "seed")
_HYPER = ("params", "lr", "betas", "eps", "weight_decay", "initial_lr")


def adapt_optimizer_state(optim_state: dict, optimizer) -> dict:
    """Make a checkpoint's optimizer state loadable by ``optimizer``.

    ``adamw_lowmem`` reads every Adam layout itself (fp32, bf16 or 8-bit moments). Any other
    optimizer gets 8-bit states as dense fp32 ``exp_avg``/``exp_avg_sq`` (the layout of
    torch's Adam/AdamW), the bf16 compensation buffer dropped (less than one bf16 step of
    each weight), and its own values for the param_group keys the checkpoint does not have.
    A state not written by ``adamw_lowmem`` is returned as it is.
    """
    if getattr(optimizer, "reads_any_adam_layout", False) or not optim_state:
        return optim_state
    states = optim_state.get("state", {})
    if not any(k in g for g in optim_state.get("param_groups", []) for k in LOWMEM_GROUP_KEYS):
        return optim_state  # not written by adamw_lowmem
    new_states = {}
    for key, s in states.items():
        s = dict(s)
        s.pop("weight_comp", None)
        if "exp_avg_codes" in s:
            m, v = dense_moments(s, block_of(s))
            for k in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"):
                s.pop(k)
            s["exp_avg"], s["exp_avg_sq"] = m, v
        new_states[key] = s
    groups = []
    for i, g in enumerate(optim_state.get("param_groups", [])):
        mine = optimizer.param_groups[i] if i < len(optimizer.param_groups) else {}
        merged = {k: v for k, v in mine.items() if k != "params"}
        # hyperparameters (and anything the optimizer lacks) from the checkpoint; the
        # optimizer's own implementation flags (fused, foreach, ...) stay
        merged.update({k: v for k, v in g.items() if k not in LOWMEM_GROUP_KEYS and (k not in mine or k in _HYPER)})
        groups.append(merged)
    return {**optim_state, "state": new_states, "param_groups": groups}

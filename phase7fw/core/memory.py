"""Small-GPU mode: the memory switches of a run and the pieces they need.

The switches (docs/performance.md, "Memory / small-GPU mode", has the arithmetic):

- ``train.param_dtype = "bf16"``: weights live in bf16 (2 bytes/param, no fp32 master).
  The optimizer must write updates into bf16 without losing them: ``adamw_lowmem`` rounds
  stochastically (:func:`round_to_bf16`) or keeps a compensation buffer.
- ``optimizer.name = "adamw_lowmem"``, ``state_bits = 8``: both Adam moments in 8 bits,
  block-wise (:func:`quantize_blockwise`), ~2.03 bytes/param instead of 8.
  ``offload_states = true`` keeps them in CPU memory (0 bytes/param on the GPU).
- ``train.optimizer_in_backward = true``: each parameter is updated inside backward as soon
  as its gradient is ready (:class:`OptimizerInBackward`), so no gradient buffer exists.
- ``train.activation_checkpointing = true``: every block is recomputed in backward.
- ``train.ce_chunk_tokens = N``: the cross-entropy is computed over chunks of N tokens
  (:func:`chunked_cross_entropy`); the full (tokens x vocab) logits never exist.

The engine calls :func:`setup_model` after building the model on the meta device,
:func:`setup_optimizer` after building the optimizer, :func:`adapt_optimizer_state` before
loading a checkpoint's optimizer state and :func:`plan_lines` for the run header.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from phase7fw.core.console import human
from phase7fw.errors import Phase7Error

GIB = 2**30

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


# ---------------------------------------------------------------------------- checkpoints

#: param_group keys only adamw_lowmem has; a standard optimizer drops them on load.
LOWMEM_GROUP_KEYS = ("state_bits", "block_size", "weight_rounding", "offload_states", "seed")
_HYPER = ("params", "lr", "betas", "eps", "weight_decay", "initial_lr")


def adapt_optimizer_state(optim_state: dict, optimizer) -> dict:
    """Make a checkpoint's optimizer state loadable by ``optimizer``.

    ``adamw_lowmem`` reads every Adam layout itself (fp32, bf16 or 8-bit moments). Any other
    optimizer gets 8-bit states as dense fp32 ``exp_avg``/``exp_avg_sq`` (the layout of
    torch's Adam/AdamW), the bf16 compensation buffer dropped (less than one bf16 step of
    each weight), and its own values for the param_group keys the checkpoint does not have.
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


# ---------------------------------------------------------------------------- cross-entropy


def _ce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_tokens: int) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` (ignore index -100),
    ``chunk_tokens`` tokens at a time. Each chunk is checkpointed, so neither forward nor
    backward ever holds more than one chunk's logits; backward recomputes them (one extra
    (chunk x d_model x vocab) matmul per chunk)."""
    h, y = hidden.flatten(0, -2), targets.flatten()
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled():
            total = total + checkpoint(_ce_sum, h[sl], weight, y[sl], use_reentrant=False)
        else:
            total = total + _ce_sum(h[sl], weight, y[sl])
    return total / (y != -100).sum().clamp(min=1)


# ---------------------------------------------------------------------------- optimizer in backward


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class OptimizerInBackward:
    """Runs the optimizer update of each parameter inside backward.

    A ``register_post_accumulate_grad_hook`` on every trained parameter calls
    ``optimizer.step_param(p, scale)`` as soon as the parameter's gradient is complete and
    frees it, so at most one parameter's gradient exists at a time.

    Clipping (``train.grad_clip > 0``) is exact: the global norm must be known before the
    first update, so :meth:`step` runs forward and backward twice on the same batch. The
    first backward only measures each gradient's norm and frees it; then, if the loss and
    the norm are finite, the second backward updates with the gradients multiplied by
    ``min(1, grad_clip / (norm + 1e-6))`` (the coefficient of ``clip_grad_norm_``). The RNG
    is restored between the passes, so both see the same computation. Cost: one extra
    forward + backward per step. A non-finite loss or norm skips the step before any update.

    Without clipping (``train.grad_clip = 0``) there is one pass. A non-finite loss skips
    backward entirely (nothing updated). A non-finite gradient is never applied: the hook
    that sees it stops every later update of the step and the step counts as skipped; the
    parameters updated earlier in that backward keep their (finite) update.
    """

    def __init__(self, model: torch.nn.Module, optimizer):
        if not callable(getattr(optimizer, "step_param", None)):
            raise Phase7Error(
                f"train.optimizer_in_backward = true needs an optimizer that can update one parameter at a"
                f" time (a step_param method); {type(optimizer).__name__} has none: use"
                " optimizer.name = \"adamw_lowmem\""
            )
        self.optimizer = optimizer
        in_optimizer = {p for g in optimizer.param_groups for p in g["params"]}
        # model.parameters() order: the global norm is stacked like clip_grad_norm_'s
        self.params = [p for p in model.parameters() if p.requires_grad and p in in_optimizer]
        self.index = {p: i for i, p in enumerate(self.params)}
        self.mode: str | None = None  # None: hooks do nothing (evaluation, other backward calls)
        self.scale: torch.Tensor | None = None
        self.norms: dict[int, torch.Tensor] = {}
        self.nonfinite = False
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    def remove(self) -> None:
        """Detach the hooks (the model and optimizer can then be freed)."""
        for h in self.handles:
            h.remove()
        self.handles = []

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        if self.mode is None or p.grad is None:
            return
        norm = torch.linalg.vector_norm(p.grad, 2, dtype=torch.float32)
        self.norms[self.index[p]] = norm
        if self.mode == "update":
            if self.scale is None and not self.nonfinite and not bool(torch.isfinite(norm)):
                self.nonfinite = True  # one pass: stop applying updates from here on
            if not self.nonfinite:
                self.optimizer.step_param(p, scale=self.scale)
        p.grad = None

    @contextlib.contextmanager
    def _pass(self, mode: str, scale=None):
        self.mode, self.scale, self.norms, self.nonfinite = mode, scale, {}, False
        try:
            yield
        finally:
            self.mode = None

    def total_norm(self) -> float:
        if not self.norms:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack([self.norms[i] for i in sorted(self.norms)]), 2))

    def step(self, forward, backward, max_norm: float, device: torch.device):
        """One optimizer step on one batch. ``forward() -> (loss, metrics)``;
        ``backward(loss)`` runs backward (and the model's ``finish_backward``).
        Returns (loss value, metrics, global grad norm before clipping, finite)."""
        if max_norm > 0:
            rng = _rng_state(device)
            with self._pass("norm"):
                loss, metrics = forward()
                backward(loss)
            loss_value, norm = float(loss.detach()), self.total_norm()
            finite = math.isfinite(loss_value) and math.isfinite(norm)
            if finite:
                _set_rng_state(rng, device)
                scale = torch.clamp(torch.tensor(max_norm, dtype=torch.float32) / (norm + 1e-6), max=1.0)
                with self._pass("update", scale.to(device)):
                    loss, metrics = forward()
                    backward(loss)
            self._finish()
            return loss_value, metrics, norm, finite
        with self._pass("update"):
            loss, metrics = forward()
            loss_value = float(loss.detach())
            backward(loss if math.isfinite(loss_value) else None)  # non-finite loss: no backward at all
        norm = self.total_norm() if math.isfinite(loss_value) else math.nan  # non-finite if any gradient was
        self._finish()
        return loss_value, metrics, norm, math.isfinite(loss_value) and math.isfinite(norm)

    def _finish(self) -> None:
        finish = getattr(self.optimizer, "finish_updates", None)  # e.g. asynchronous offload copies
        if finish is not None:
            finish()


# ---------------------------------------------------------------------------- engine setup


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating-point parameter (not the buffers) in place, keeping the
    Parameter objects (tied parameters stay tied). On the meta device this costs nothing,
    so the weights are allocated in ``dtype`` directly."""
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)


def setup_model(engine) -> None:
    """Memory switches that act on the model (called right after it is built on meta)."""
    train = engine.recipe.train
    if train.param_dtype == "bf16":
        cast_parameters(engine.model, torch.bfloat16)
    if train.ce_chunk_tokens:
        engine.model.enable_chunked_cross_entropy(train.ce_chunk_tokens)


def setup_optimizer(engine):
    """Checks the optimizer against the memory switches; returns the
    :class:`OptimizerInBackward` when ``train.optimizer_in_backward``, else None."""
    train, opt = engine.recipe.train, engine.optimizer
    if train.param_dtype == "bf16" and not getattr(opt, "supports_bf16_weights", False):
        raise Phase7Error(
            f"train.param_dtype = \"bf16\" needs an optimizer that keeps small updates of bf16 weights;"
            f" optimizer {engine.recipe.optimizer.name!r} would round every update to the nearest bf16 value"
            " (most of them to no change): use optimizer.name = \"adamw_lowmem\" (stochastic rounding)"
        )
    if train.optimizer_in_backward:
        return OptimizerInBackward(engine.model, opt)
    return None


# ---------------------------------------------------------------------------- memory plan


def optimizer_bytes_per_param(optimizer) -> tuple[float, float, str] | None:
    """(bytes/param on the device, bytes/param in CPU memory, description) of the
    optimizer's state, or None when unknown."""
    own = getattr(optimizer, "memory_per_param", None)
    if callable(own):
        return own()
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        n = sum(p.numel() for p in params) or 1
        per = sum(2 * p.numel() * p.element_size() for p in params) / n
        return per, 0.0, f"{type(optimizer).__name__} moments in the weights' dtype"
    return None


def _ffn_width(cfg, d_model: int) -> int:
    width = getattr(cfg, "ffn_hidden", 0) or 0
    if width:
        return width
    multiple = getattr(cfg, "ffn_multiple_of", 256) or 256
    return multiple * math.ceil(8 * d_model / 3 / multiple)


def activation_estimate(recipe, vocab_size: int, fused_ce: bool = False) -> tuple[float, str]:
    """A rough estimate of the activation bytes of one training micro-batch (documented in
    docs/performance.md; the measured number comes from ``phase7fw bench``). Per token and
    block a hybrid block keeps ~30 d_model + 8 ffn bytes plus 12 bytes per attention score
    (heads x window, or x chunk for a linear attention); checkpointing keeps each block's fp32 input instead and recomputes one
    block at a time (x2 for its gradients); the logits cost 14 bytes per token x vocab. A fused
    cross-entropy kernel (``fused_ce``) holds one chunk of logits (at most 256 MiB: the
    Triton kernel's default chunk), an fp32 head gradient (vocab x d_model) and the hidden
    states' gradient (fp32) from forward to backward."""
    cfg, t = recipe.model.config, recipe.train
    d = getattr(cfg, "d_model", 0) or 0
    layers = getattr(cfg, "n_layers", 0) or 0
    heads = getattr(cfg, "n_heads", 0) or 0
    seq = getattr(cfg, "seq_len", 0) or 0
    attention = getattr(cfg, "attention", None)
    acfg = getattr(attention, "config", None)
    # keys scored per query: a window, a linear attention's chunk, or every earlier token
    window = getattr(acfg, "window", 0) or getattr(acfg, "chunk_size", 0) or seq
    tokens = t.batch_size * seq
    per_block = tokens * (30 * d + 8 * _ffn_width(cfg, d) + 12 * heads * min(window, seq))
    if t.activation_checkpointing:
        blocks = layers * tokens * d * 4 + 2 * per_block
        how = "checkpointed blocks"
    else:
        blocks = layers * per_block
        how = "no checkpointing"
    logit_tokens = min(t.ce_chunk_tokens, tokens) if t.ce_chunk_tokens else tokens
    if fused_ce:
        chunk = logit_tokens * vocab_size * 2 if t.ce_chunk_tokens else min(tokens * vocab_size * 2, 256 * 2**20)
        logits = chunk + vocab_size * d * 4 + tokens * d * 4
        ce = "fused CE kernel" + (f" in {t.ce_chunk_tokens}-token chunks" if t.ce_chunk_tokens else "")
    else:
        logits = logit_tokens * vocab_size * 14
        ce = f"CE in {t.ce_chunk_tokens}-token chunks" if t.ce_chunk_tokens else "full logits"
    return blocks + logits, f"{how}, micro-batch {t.batch_size} x {seq}, {ce}"


def memory_plan(model: torch.nn.Module, optimizer, recipe, vocab_size: int) -> dict:
    """Bytes per parameter of each part of the training state, the activation estimate and
    the expected peak (bytes); printed in the run header by :func:`plan_lines`."""
    t = recipe.train
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params) or 1
    weight_b = sum(p.numel() * p.element_size() for p in params) / n
    trained = [p for p in params if p.requires_grad]
    largest = max((p.numel() * p.element_size() for p in trained), default=0)
    if t.optimizer_in_backward:
        grad_b, grad_note = 0.0, "none: each update runs in backward"
    else:
        grad_b = sum(p.numel() * p.element_size() for p in trained) / n
        grad_note = f"{'bf16' if t.param_dtype == 'bf16' else 'fp32'}, summed over {t.grad_accum_steps} micro-batch(es)"
    opt = optimizer_bytes_per_param(optimizer) if optimizer is not None else None
    opt_dev, opt_host, opt_note = opt if opt is not None else (0.0, 0.0, "unknown (not counted)")
    # autocast keeps a bf16 copy of fp32 weights while a forward runs
    cast_b = 2.0 if t.precision != "fp32" and t.param_dtype == "fp32" else 0.0
    transient = getattr(optimizer, "update_transient_bytes", lambda: 0)() if optimizer is not None else 0
    if t.optimizer_in_backward:
        transient += largest  # one parameter's gradient at a time
    fused = getattr(model, "cross_entropy_fn", None) is not None
    act, act_note = activation_estimate(recipe, vocab_size, fused_ce=fused)
    state = (weight_b + grad_b + opt_dev + cast_b) * n
    return {
        "params": n, "weights": weight_b, "grads": grad_b, "grad_note": grad_note, "optimizer": opt_dev,
        "optimizer_host": opt_host, "optimizer_note": opt_note, "autocast_copies": cast_b,
        "state_bytes": state, "activations": act, "activation_note": act_note, "transient": transient,
        "peak": state + act + transient,
    }


def plan_lines(engine) -> list[str]:
    """The run header's memory plan: bytes/param per part and the expected peak."""
    p = memory_plan(engine.model, getattr(engine, "optimizer", None), engine.recipe, engine.vocab_size)
    n = p["params"]

    def row(name, b, note):
        return f"  {name:<11} {b:5.2f} B/param {b * n / GIB:6.2f} GiB  {note}"

    wdt = engine.recipe.train.param_dtype
    lines = [f"memory plan ({human(n)} parameters; estimates, measure with phase7fw bench --memory-cap-gib N):",
             row("weights", p["weights"], wdt + (" (stochastic-rounding updates)" if wdt == "bf16" else "")),
             row("grads", p["grads"], p["grad_note"]),
             row("optimizer", p["optimizer"], p["optimizer_note"])]
    if p["autocast_copies"]:
        lines.append(row("autocast", p["autocast_copies"], "bf16 copies of the fp32 weights during forward"))
    total = p["weights"] + p["grads"] + p["optimizer"] + p["autocast_copies"]
    lines.append(row("total", total, "on the device"))
    if p["optimizer_host"]:
        lines.append(row("CPU memory", p["optimizer_host"], "optimizer state offloaded"))
    lines.append(f"  activations {p['activations'] / GIB:.2f} GiB ({p['activation_note']})"
                 f" + transient {p['transient'] / GIB:.2f} GiB | expected peak {p['peak'] / GIB:.2f} GiB")
    return lines

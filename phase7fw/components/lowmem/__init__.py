"""``adamw_lowmem``: AdamW for small GPUs (docs/performance.md, "Memory / small-GPU mode").

The same update as torch's AdamW (decoupled weight decay, bias correction, eps outside the
square root; with fp32 weights and ``state_bits = 32`` the result is bit-identical to
``torch.optim.AdamW(foreach=False)``), plus:

- ``state_bits = 8``: both moments stored block-wise in 8 bits (m signed, sqrt(v) unsigned,
  log code book, stochastic rounding: :mod:`.states`); 2 + 8/block_size bytes/param.
- bf16 weights (``train.param_dtype = "bf16"``): the update is computed in fp32 and written
  back with ``weight_rounding`` = "stochastic" (unbiased; no master copy), "compensated"
  (a bf16 buffer keeps each weight's rounding error: +2 bytes/param, deterministic) or
  "nearest" (plain bf16 AdamW: updates smaller than half a bf16 step are lost).
- ``offload_states = true``: the moments live in (pinned) CPU memory and visit the GPU one
  chunk at a time during the update.
- ``step_param(p)``: the update of one parameter (``train.optimizer_in_backward``).
- ``fused = true``: each chunk's update as one Triton kernel (:mod:`.fused`).

Updates run over chunks of 2M elements, so the fp32 temporaries of even the largest matrix
stay small. Random bits come from a generator seeded by (seed, step, parameter index): the
result does not depend on the order parameters are updated in (backward hooks vs ``step``)
and a resumed run draws the same bits.

The state of each parameter is plain tensors (``weights_only`` checkpoints): ``step`` and
``exp_avg``/``exp_avg_sq`` (32-bit) or ``exp_avg_codes``/``exp_avg_absmax``/
``exp_avg_sq_codes``/``exp_avg_sq_absmax`` (8-bit), plus ``weight_comp`` when compensated.
``load_state_dict`` reads all of these and torch's AdamW state; for any other optimizer this
plugin's ``adapt_optimizer_state`` hook converts the other way (:mod:`.states`).
"""

# No ``from __future__ import annotations``: the recipe converter reads the real field types.

from itertools import chain
from typing import Literal

import attrs
import torch

from phase7fw.components.lowmem import states
from phase7fw.components.optimizers import AdamHyperparameters
from phase7fw.errors import Phase7Error
from phase7fw.hookspecs import hookimpl
from phase7fw.recipe.options import option

CHUNK = 1 << 21  # elements per update chunk (a multiple of every allowed block size)


def _bits(v):
    return None if v in (8, 32) else f"must be 8 or 32, got {v!r}"


def _block(v):
    return None if v in (64, 128, 256, 512, 1024, 2048) else f"must be a power of two in [64, 2048], got {v!r}"


@attrs.frozen
class AdamWLowMemConfig(AdamHyperparameters):
    state_bits: int = option(
        8, check=_bits, help="bits per Adam moment: 32 (fp32) or 8 (block-wise, ~2 bytes/param for both)"
    )
    block_size: int = option(256, check=_block, help="elements per quantization block (8-bit states)")
    weight_rounding: Literal["stochastic", "compensated", "nearest"] = option(
        "stochastic", help="how updates are written into bf16 weights (fp32 weights are updated exactly)"
    )
    offload_states: bool = option(False, help="keep the optimizer state in CPU memory (0 bytes/param on the GPU)")
    fused: bool = option(False, help="one Triton kernel per update chunk (CUDA, or the CPU under TRITON_INTERPRET=1)"
                                     " instead of ~45 torch ops; the same arithmetic, other random bits")


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (deterministic across processes, unlike hash of str)."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


class AdamWLowMem(torch.optim.Optimizer):
    supports_bf16_weights = True  # train.param_dtype = "bf16" (engine check)
    reads_any_adam_layout = True  # load_state_dict converts torch AdamW / 8-bit / 32-bit states

    def __init__(self, params, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, *, state_bits=8,
                 block_size=256, weight_rounding="stochastic", offload_states=False, fused=False, seed=None):
        if seed is None:
            seed = torch.initial_seed() & 0x7FFFFFFFFFFFFFFF
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, state_bits=state_bits,
                        block_size=block_size, weight_rounding=weight_rounding, offload_states=offload_states,
                        fused=fused, seed=seed)
        super().__init__(params, defaults)
        self._host_copies = None  # the CUDA stream with moment copies to CPU in flight
        self._index: dict = {}
        self._group: dict = {}
        for group in self.param_groups:
            for p in group["params"]:
                self._check_param(p)
                self._index[p] = len(self._index)
                self._group[p] = group
                # Eager state: the memory is there from the start (no surprise at step 1) and
                # torch.distributed.checkpoint never runs its zero-gradient "init step".
                self.state[p] = self._fresh_state(p, group)

    # ------------------------------------------------------------------ state
    @staticmethod
    def _check_param(p: torch.Tensor) -> None:
        if type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor":
            raise Phase7Error("optimizer adamw_lowmem does not support FSDP (sharded DTensor parameters) yet;"
                              " use parallel.strategy = \"none\" or \"ddp\", or optimizer.name = \"adamw\"")
        if p.dtype not in (torch.float32, torch.bfloat16):
            raise Phase7Error(f"optimizer adamw_lowmem updates fp32 or bf16 parameters, got {p.dtype}")

    def _state_device(self, p: torch.Tensor, group: dict) -> tuple[torch.device, bool]:
        if group["offload_states"] and p.device.type not in ("cpu", "meta"):
            return torch.device("cpu"), p.device.type == "cuda"
        return p.device, False

    def _empty(self, shape, dtype, p, group) -> torch.Tensor:
        device, pin = self._state_device(p, group)
        return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)

    def _fresh_state(self, p: torch.Tensor, group: dict) -> dict:
        state = {"step": torch.zeros((), dtype=torch.float32)}
        if group["state_bits"] == 8:
            n_blocks = -(-p.numel() // group["block_size"])
            state["exp_avg_codes"] = self._empty(p.shape, torch.int8, p, group)
            state["exp_avg_absmax"] = self._empty((n_blocks,), torch.float32, p, group)
            state["exp_avg_sq_codes"] = self._empty(p.shape, torch.uint8, p, group)
            state["exp_avg_sq_absmax"] = self._empty((n_blocks,), torch.float32, p, group)
        else:
            state["exp_avg"] = self._empty(p.shape, torch.float32, p, group)
            state["exp_avg_sq"] = self._empty(p.shape, torch.float32, p, group)
        if p.dtype == torch.bfloat16 and group["weight_rounding"] == "compensated":
            state["weight_comp"] = torch.zeros_like(p)
        return state

    def _import_state(self, p: torch.Tensor, saved: dict, group: dict) -> dict:
        """A checkpoint's state of ``p`` in any Adam layout -> this optimizer's layout."""
        state = self._fresh_state(p, group)
        state["step"] = torch.as_tensor(saved.get("step", 0.0), dtype=torch.float32).detach().clone().cpu()
        eight = group["state_bits"] == 8
        if "exp_avg_codes" in saved:
            if eight and states.block_of(saved) == group["block_size"]:
                for k in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"):
                    state[k].copy_(saved[k].reshape(state[k].shape))
                moments = None
            else:
                moments = states.dense_moments(saved, states.block_of(saved))
        elif "exp_avg" in saved:
            moments = saved["exp_avg"], saved["exp_avg_sq"]
        else:
            moments = None  # no moments saved (the parameter never had a gradient)
        if moments is not None:
            m, v = (t.detach().float().reshape(p.shape) for t in moments)
            if eight:
                for k, t in states.quantize_moments(m, v, group["block_size"], chunk=CHUNK).items():
                    state[k].copy_(t.reshape(state[k].shape))
            else:
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
        if "weight_comp" in state and "weight_comp" in saved:
            state["weight_comp"].copy_(saved["weight_comp"])
        return state

    def load_state_dict(self, state_dict: dict) -> None:  # noqa: D401 - torch's signature
        """Load a state saved by this optimizer (8- or 32-bit, any block size) or by torch's
        Adam/AdamW. The layout follows this optimizer's options, not the checkpoint's; the
        seed, learning rates and betas come from the checkpoint."""
        self.finish_updates()  # no copy to the old state may land after the new one
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            raise ValueError("loaded optimizer state has parameter groups that do not match this model's")
        ids = chain.from_iterable(g["params"] for g in saved_groups)
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        by_id = dict(zip(ids, params))
        for key, saved in state_dict["state"].items():
            p = by_id[key]
            self.state[p] = self._import_state(p, saved, self._group[p])
        for group, saved in zip(self.param_groups, saved_groups):
            for k, v in saved.items():
                if k != "params" and k not in ("state_bits", "block_size", "weight_rounding", "offload_states", "fused"):
                    group[k] = tuple(v) if k == "betas" else v

    # ------------------------------------------------------------------ memory plan
    def memory_per_param(self) -> tuple[float, float, str]:
        """(bytes/param on the device, bytes/param in CPU memory, description)."""
        dev = host = 0.0
        n = 0
        notes = set()
        for group in self.param_groups:
            per = 2 + 8 / group["block_size"] if group["state_bits"] == 8 else 8.0
            for p in group["params"]:
                n += p.numel()
                if group["offload_states"]:
                    host += per * p.numel()
                else:
                    dev += per * p.numel()
                if p.dtype == torch.bfloat16 and group["weight_rounding"] == "compensated":
                    dev += 2 * p.numel()
            bits = f"{group['state_bits']}-bit moments" + (f" (blocks of {group['block_size']})"
                                                           if group["state_bits"] == 8 else "")
            notes.add(bits + (" in CPU memory" if group["offload_states"] else ""))
        n = max(n, 1)
        return dev / n, host / n, "adamw_lowmem " + ", ".join(sorted(notes))

    def update_transient_bytes(self) -> int:
        """fp32 temporaries of one update chunk (~30 tensors' worth of 4-8 bytes)."""
        largest = max((p.numel() for g in self.param_groups for p in g["params"]), default=0)
        return min(largest, CHUNK) * 120

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, group)
        self.finish_updates()
        return loss

    def finish_updates(self) -> None:
        """Wait for the offloaded moments' copies back to CPU memory. They are issued
        asynchronously (so the GPU never stalls on PCIe inside the update); the host may read
        that memory (a checkpoint) only after this. The device-to-host copies and the next
        step's host-to-device copies are ordered on the same CUDA stream, so nothing else
        needs to wait."""
        if self._host_copies is not None:
            self._host_copies.synchronize()
            self._host_copies = None

    def state_dict(self):
        self.finish_updates()
        return super().state_dict()

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Update one parameter from its ``.grad`` (times ``scale``, the clip coefficient)."""
        self._update(p, p.grad, self._group[p], scale)

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, scale=None) -> None:
        state = self.state[p]
        state["step"] += 1
        step = state["step"].item()
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        eight = group["state_bits"] == 8
        low = p.dtype == torch.bfloat16
        rounding = group["weight_rounding"] if low else None
        block = group["block_size"]
        flat_p, flat_g = p.view(-1), grad.reshape(-1)
        comp = state["weight_comp"].view(-1) if rounding == "compensated" else None
        seed = _mix(group["seed"], int(step), self._index[p])
        if group["fused"]:
            from phase7fw.components.lowmem.fused import fused_chunk_update

            for start in range(0, flat_p.numel(), CHUNK):
                sl = slice(start, start + CHUNK)
                stored, moments = self._raw_moments(state, sl, start, block, eight, p.device)
                fused_chunk_update(flat_p[sl], flat_g[sl], moments, comp=None if comp is None else comp[sl],
                                   scale=scale, lr=lr, weight_decay=wd, betas=(beta1, beta2), eps=eps, step=step,
                                   block=block, rounding=rounding, seed=seed, offset=start)
                self._write_back(stored, moments)
            return
        generator = None
        if eight or rounding == "stochastic":
            generator = torch.Generator(device=p.device)
            generator.manual_seed(seed)
        for start in range(0, flat_p.numel(), CHUNK):
            sl = slice(start, start + CHUNK)
            g = flat_g[sl].float()
            if scale is not None:
                g = g * scale
            if low:
                w = flat_p[sl].float()
                if comp is not None:
                    w += comp[sl].float()
            else:
                w = flat_p[sl]
            m, v = self._load_moments(state, sl, start, block, eight, p.device)
            if wd != 0:
                w.mul_(1 - lr * wd)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            root = v.sqrt()
            w.addcdiv_(m, (root / bias_correction2_sqrt).add_(eps), value=-step_size)
            if low:
                if rounding == "compensated":
                    new = w.to(torch.bfloat16)
                    comp[sl].copy_(w - new.float())
                else:
                    new = states.round_to_bf16(w, generator if rounding == "stochastic" else None)
                flat_p[sl].copy_(new)
            self._store_moments(state, sl, start, block, eight, m, v, root, generator)

    @staticmethod
    def _raw_moments(state, sl, start, block, eight, device):
        """(the state's slices of chunk ``sl``, the same on ``device``: views when the state is
        there, copies when offloaded) for the fused kernel, which updates them in place."""
        if eight:
            b = slice(start // block, -(-(start + CHUNK) // block))
            stored = (state["exp_avg_codes"].view(-1)[sl], state["exp_avg_absmax"][b],
                      state["exp_avg_sq_codes"].view(-1)[sl], state["exp_avg_sq_absmax"][b])
        else:
            stored = (state["exp_avg"].view(-1)[sl], state["exp_avg_sq"].view(-1)[sl])
        return stored, tuple(t.to(device, non_blocking=True) for t in stored)

    def _write_back(self, stored, updated) -> None:
        for dst, src in zip(stored, updated):
            if dst.data_ptr() != src.data_ptr():  # offloaded: the updated copy goes back
                self._write(dst, src)

    def _load_moments(self, state, sl, start, block, eight, device):
        if not eight:
            m = state["exp_avg"].view(-1)[sl].to(device, non_blocking=True)
            v = state["exp_avg_sq"].view(-1)[sl].to(device, non_blocking=True)
            return m, v  # views of the state when it is on the device: updated in place
        b = slice(start // block, -(-(start + CHUNK) // block))
        m = states.dequantize_blockwise(state["exp_avg_codes"].view(-1)[sl].to(device, non_blocking=True),
                                        state["exp_avg_absmax"][b].to(device, non_blocking=True), block=block)
        s = states.dequantize_blockwise(state["exp_avg_sq_codes"].view(-1)[sl].to(device, non_blocking=True),
                                        state["exp_avg_sq_absmax"][b].to(device, non_blocking=True), block=block)
        return m, s * s

    def _store_moments(self, state, sl, start, block, eight, m, v, root, generator) -> None:
        if not eight:
            self._write_back((state["exp_avg"].view(-1)[sl], state["exp_avg_sq"].view(-1)[sl]), (m, v))
            return
        b = slice(start // block, -(-(start + CHUNK) // block))
        for name, x, signed in (("exp_avg", m, True), ("exp_avg_sq", root, False)):
            codes, absmax = states.quantize_blockwise(x, signed=signed, block=block, generator=generator)
            self._write(state[f"{name}_codes"].view(-1)[sl], codes)
            self._write(state[f"{name}_absmax"][b], absmax)

    def _write(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst.copy_(src); a CUDA -> pinned-CPU copy is asynchronous (see finish_updates)."""
        if src.device.type == "cuda" and dst.device.type == "cpu" and dst.is_pinned():
            dst.copy_(src, non_blocking=True)
            self._host_copies = torch.cuda.current_stream(src.device)
        else:
            dst.copy_(src)


def build_adamw_lowmem(config: AdamWLowMemConfig, *, params, **context) -> AdamWLowMem:
    params = list(params)
    tensors = [t for g in params for t in (g["params"] if isinstance(g, dict) else [g])]
    if not tensors:
        raise Phase7Error("optimizer adamw_lowmem got no parameters to train")
    if config.fused:
        from phase7fw.kernels import triton_usable

        for device_type in sorted({t.device.type for t in tensors} - {"meta"}):  # meta: recipe validation
            usable, why = triton_usable(device_type)
            if not usable:
                raise Phase7Error(f"optimizer.fused = true runs a Triton kernel, which cannot run here: {why};"
                                  " set optimizer.fused = false for the torch update")
    return AdamWLowMem(params, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                       weight_decay=config.weight_decay, state_bits=config.state_bits, block_size=config.block_size,
                       weight_rounding=config.weight_rounding, offload_states=config.offload_states,
                       fused=config.fused)


@hookimpl
def register_components(register):
    register(
        "optimizer",
        "adamw_lowmem",
        build_adamw_lowmem,
        AdamWLowMemConfig,
        description="AdamW for small GPUs: 8-bit states, bf16 weights with stochastic rounding, CPU offload,"
        " per-parameter steps (train.optimizer_in_backward); context: params (groups)",
    )


@hookimpl
def adapt_optimizer_state(state, optimizer):
    """A checkpoint's optimizer state written by ``adamw_lowmem``, in torch's Adam layout for
    another optimizer; None (the state as it is) when it was not written by ``adamw_lowmem``
    or ``optimizer`` reads it itself."""
    adapted = states.adapt_optimizer_state(state, optimizer)
    return None if adapted is state else adapted

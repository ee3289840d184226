"""Small-GPU mode: the memory switches of a run and the pieces they need.

The switches (docs/performance.md, "Memory / small-GPU mode", has the arithmetic):

- ``train.param_dtype = "bf16"``: weights live in bf16 (2 bytes/param, no fp32 master).
  The optimizer must write updates into bf16 without losing them (it declares
  ``supports_bf16_weights``; the built-in ``adamw_lowmem`` rounds stochastically or keeps a
  compensation buffer).
- The optimizer's own state layout (8-bit moments, offloading: ``adamw_lowmem``) is the
  optimizer component's business; it reports its bytes per parameter (``memory_per_param``)
  and converts a checkpoint it wrote for another optimizer (the ``adapt_optimizer_state``
  hook).
- ``train.optimizer_in_backward = true``: each parameter is updated inside backward as soon
  as its gradient is ready (:class:`OptimizerInBackward`), so no gradient buffer exists.
- ``train.activation_checkpointing = true``: every block is recomputed in backward.
- ``train.ce_chunk_tokens = N``: the cross-entropy is computed over chunks of N tokens
  (the ``cross_entropy`` op's chunked reference, phase7fw/kernels/cross_entropy/); the full
  (tokens x vocab) logits never exist.

The engine calls :func:`setup_model` after building the model on the meta device,
:func:`setup_optimizer` after building the optimizer and :func:`plan_lines` for the run header.
"""

from __future__ import annotations

import contextlib
import math

import torch

from phase7fw.core.console import human
from phase7fw.errors import Phase7Error

GIB = 2**30

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


def setup_checkpointing(engine) -> None:
    """``train.activation_checkpointing`` with its policy and period. The defaults call the
    model's method without arguments, as models written before the two keys expect."""
    train = engine.recipe.train
    if not train.activation_checkpointing:
        return
    if (train.checkpoint_policy, train.checkpoint_every) == ("full", 1):
        engine.model.enable_activation_checkpointing()
        return
    try:
        engine.model.enable_activation_checkpointing(policy=train.checkpoint_policy, every=train.checkpoint_every)
    except TypeError as exc:
        raise Phase7Error(f"model {type(engine.model).__name__} takes no train.checkpoint_policy /"
                          f" train.checkpoint_every ({exc}); leave them at \"full\" / 1") from exc


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


def activation_estimate(model, recipe, vocab_size: int, fused_ce: bool = False) -> tuple[float, str]:
    """A rough estimate of the activation bytes of one training micro-batch (documented in
    docs/performance.md; the measured number comes from ``phase7fw bench``). Per token, each
    block keeps what the model reports (``block_activation_bytes_per_token``: ~30 d_model + 8
    ffn bytes plus 12 bytes per attention score for the built-in blocks); checkpointing keeps
    each block's fp32 input instead and recomputes one block at a time (x2 for its
    gradients); the logits cost 14 bytes per token x vocab. A fused cross-entropy kernel
    (``fused_ce``) holds one chunk of logits (at most 256 MiB: the Triton kernel's default
    chunk), an fp32 head gradient (vocab x d_model) and the hidden states' gradient (fp32)
    from forward to backward."""
    t = recipe.train
    seq = getattr(model, "seq_len", 0) or 0
    d = getattr(model, "d_model", 0) or 0
    layers = len(getattr(model, "blocks", None) or ())
    report = getattr(model, "block_activation_bytes_per_token", None)
    per_token = report(seq) if callable(report) else None
    tokens = t.batch_size * seq
    if per_token is None:
        blocks, how = 0, "blocks not counted (the model does not report its activation bytes)"
    elif t.activation_checkpointing:
        # every N-th block is checkpointed; a save_matmuls block is counted as one that keeps
        # everything (an upper bound: it drops only the elementwise intermediates)
        ckpt = -(-layers // t.checkpoint_every)
        kept = layers - ckpt if t.checkpoint_policy == "full" else layers
        blocks = ckpt * tokens * d * 4 + kept * tokens * per_token
        if t.checkpoint_policy == "full":
            blocks += 2 * tokens * per_token  # one block recomputed at a time, and its gradients
        how = "checkpointed blocks" if (t.checkpoint_policy, t.checkpoint_every) == ("full", 1) else (
            f"checkpointed blocks ({t.checkpoint_policy}, every {t.checkpoint_every})")
    else:
        blocks = layers * tokens * per_token
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
    act, act_note = activation_estimate(model, recipe, vocab_size, fused_ce=fused)
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

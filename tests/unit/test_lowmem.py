"""Small-GPU mode pieces: stochastic rounding, 8-bit states, ``adamw_lowmem``, the update
inside backward, the chunked cross-entropy and the memory plan (phase7fw/core/memory.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from phase7fw import build_model, load_recipe
from phase7fw.core import memory
from phase7fw.components.lowmem import AdamWLowMem, states
from phase7fw.errors import Phase7Error, RecipeError
from phase7fw.core.optim_groups import param_groups
from phase7fw.kernels.cross_entropy import chunked_cross_entropy
from tests.conftest import RECIPES


def gen(seed=0):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def bf16_neighbours(x):
    """(round down, round up) of fp32 x to bf16, as fp32 (x > 0)."""
    down = (x.view(torch.int32) & -65536).view(torch.float32)
    up = ((x.view(torch.int32) & -65536) + 65536).view(torch.float32)
    return down, up


# ---------------------------------------------------------------------------- stochastic rounding


def test_stochastic_rounding_is_exact_for_bf16_values():
    x = torch.randn(4096).to(torch.bfloat16)
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1.0, -3.5, 1e-30, 3e38, float("inf")], dtype=torch.bfloat16)])
    out = states.round_to_bf16(x.float(), gen())
    assert torch.equal(out.view(torch.int16), x.view(torch.int16))


def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased():
    torch.manual_seed(0)
    x = (torch.rand(64) + 0.5) * 10.0 ** torch.randint(-3, 4, (64,)).float()
    x = torch.cat([x, -x])
    down, up = bf16_neighbours(x.abs())
    n = 4000
    samples = torch.stack([states.round_to_bf16(x, g).float() for g in [gen(1)] for _ in range(n)])
    assert ((samples.abs() == down) | (samples.abs() == up)).all()
    ulp = up - down
    # each sample is off by at most one ulp: the mean of n has std <= ulp / (2 sqrt n)
    assert ((samples.mean(0) - x).abs() <= 6 * ulp / (2 * math.sqrt(n))).all()
    nearest = x.to(torch.bfloat16).float()
    assert ((nearest - x).abs().mean() / ulp.mean()) > 0.1  # the test values are not bf16 values


def test_stochastic_rounding_is_deterministic_per_seed():
    x = torch.randn(1000)
    assert torch.equal(states.round_to_bf16(x, gen(3)), states.round_to_bf16(x, gen(3)))
    assert not torch.equal(states.round_to_bf16(x, gen(3)), states.round_to_bf16(x, gen(4)))


# ---------------------------------------------------------------------------- 8-bit states


def wide_range(n, signed=True, seed=0):
    """Values spread over 5 decades (Adam moments look like this)."""
    g = gen(seed)
    mag = 10.0 ** (-5 * torch.rand(n, generator=g))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if signed else 1.0
    return mag * sign


@pytest.mark.parametrize("signed", [True, False])
def test_quantization_error_bounds(signed):
    block = 256
    x = wide_range(10 * block + 37, signed)  # a partial last block
    step = 2 ** (1 / 8) - 1 if signed else 2 ** (1 / 16) - 1  # relative gap between codes
    codes, absmax = states.quantize_blockwise(x, signed=signed, block=block)
    assert codes.dtype == (torch.int8 if signed else torch.uint8) and codes.shape == x.shape
    assert absmax.shape == (11,)
    back = states.dequantize_blockwise(codes, absmax, block=block)
    smallest = states._table(signed, "cpu")[1] * absmax.repeat_interleave(block)[: x.numel()]
    err = (back - x).abs()
    # nearest: within half a code gap of the value, or (below the smallest code) of it
    covered = x.abs() >= smallest
    assert (err[covered] <= 0.5 * step * x.abs()[covered] * 1.0001).all()
    if signed:
        assert (err[~covered] <= smallest[~covered]).all()
    else:
        assert (back > 0).all()  # second moments never round to 0
    # each block's largest element is exact
    blocks = F.pad(x, (0, 11 * block - x.numel())).view(11, block)
    idx = blocks.abs().argmax(1) + torch.arange(11) * block
    assert torch.equal(back[idx], x[idx])
    # stochastic rounding: within one gap, and unbiased
    g = gen(5)
    rounds = torch.stack([states.dequantize_blockwise(*states.quantize_blockwise(x[:512], signed=signed, block=block,
                                                                                generator=g), block=block)
                          for _ in range(2000)])
    xs = x[:512]
    ok = xs.abs() >= smallest[:512]
    assert ((rounds - xs).abs()[:, ok] <= step * xs.abs()[ok] * 1.0001).all()
    rel_bias = ((rounds.mean(0) - xs) / xs)[ok].abs()
    assert rel_bias.max() < 6 * step / (2 * math.sqrt(2000)) + 1e-6


def test_moments_roundtrip_and_block_detection():
    m, v = wide_range(3000), wide_range(3000, signed=False).square()
    state = states.quantize_moments(m.view(30, 100), v.view(30, 100), block=128)
    assert state["exp_avg_codes"].shape == (30, 100) and states.block_of(state) == 128
    dm, dv = states.dense_moments(state)
    assert dm.shape == (30, 100)
    assert ((dm.flatten() - m).abs() <= 0.05 * m.abs() + 1e-4 * m.abs().max()).all()
    # sqrt(v) below the smallest code of its block is rounded up (never down to 0)
    smallest_v = (states._table(False, "cpu")[1] * state["exp_avg_sq_absmax"].repeat_interleave(128)[:3000]) ** 2
    covered = v >= smallest_v
    assert ((dv.flatten() - v) / v)[covered].abs().max() < 0.05
    assert (dv.flatten()[~covered] >= v[~covered]).all()


# ---------------------------------------------------------------------------- adamw_lowmem


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(F.gelu(self.norm(self.fc1(x))))


def problem(seed=0):
    g = gen(seed)
    x = torch.randn(256, 16, generator=g)
    y = torch.tanh(x @ torch.randn(16, 4, generator=g)) + 0.05 * torch.randn(256, 4, generator=g)
    return x, y


def make_net(dtype=torch.float32):
    torch.manual_seed(1)
    return Net().to(dtype)


def train(net, opt, steps, x, y, start=0):
    losses = []
    for i in range(start, start + steps):
        xb, yb = x[(i * 32) % 256:][:32], y[(i * 32) % 256:][:32]
        loss = (net(xb.to(net.fc1.weight.dtype)).float() - yb).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def full_loss(net, x, y):
    with torch.no_grad():
        return (net(x.to(net.fc1.weight.dtype)).float() - y).square().mean().item()


HP = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def test_fp32_32bit_is_torch_adamw_bit_for_bit():
    x, y = problem()
    ref, mine = make_net(), make_net()
    a = torch.optim.AdamW(param_groups(ref), foreach=False, **HP)
    b = AdamWLowMem(param_groups(mine), state_bits=32, **HP)
    assert train(ref, a, 25, x, y) == train(mine, b, 25, x, y)
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), mine.parameters()))


@pytest.mark.parametrize("bits,dtype,rounding,tol", [
    (8, torch.float32, "stochastic", 0.02),
    (32, torch.bfloat16, "stochastic", 0.02),
    (8, torch.bfloat16, "stochastic", 0.02),
    (8, torch.bfloat16, "compensated", 0.02),
])
def test_low_memory_variants_train_like_torch_adamw(bits, dtype, rounding, tol):
    """200 steps on a small regression: final loss within 2% of torch's fp32 AdamW."""
    x, y = problem()
    ref = make_net()
    train(ref, torch.optim.AdamW(ref.parameters(), **HP), 200, x, y)
    net = make_net(dtype)
    train(net, AdamWLowMem(net.parameters(), state_bits=bits, weight_rounding=rounding, **HP), 200, x, y)
    assert abs(full_loss(net, x, y) / full_loss(ref, x, y) - 1) < tol


def test_stochastic_rounding_keeps_updates_smaller_than_a_bf16_step():
    """A bf16 weight at 1.0 (step 2^-7) pushed by updates of ~2^-11: round-to-nearest never
    moves, stochastic rounding moves by the right amount on average."""
    moved = {}
    for rounding in ("nearest", "stochastic"):
        w = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = AdamWLowMem([w], lr=2**-11, weight_decay=0.0, state_bits=32, weight_rounding=rounding, seed=0)
        for _ in range(64):
            w.grad = torch.ones_like(w)  # Adam's normalized step: lr per step
            opt.step()
        moved[rounding] = (1.0 - w.float()).mean().item()
    assert moved["nearest"] == 0.0
    assert abs(moved["stochastic"] / (64 * 2**-11) - 1) < 0.05


def test_state_dict_is_plain_tensors_and_resume_is_exact(tmp_path):
    x, y = problem()
    net = make_net(torch.bfloat16)
    opt = AdamWLowMem(param_groups(net), state_bits=8, **HP)
    train(net, opt, 5, x, y)
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, tmp_path / "c.pt")
    reference = train(net, opt, 5, x, y, start=5)
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    net2 = make_net(torch.bfloat16)
    net2.load_state_dict(saved["model"])
    opt2 = AdamWLowMem(param_groups(net2), state_bits=8, **{**HP, "lr": 1.0})  # lr comes from the state
    opt2.load_state_dict(saved["opt"])
    assert train(net2, opt2, 5, x, y, start=5) == reference
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), net2.parameters()))


def test_optimizer_state_converts_both_ways():
    x, y = problem()
    # torch AdamW -> adamw_lowmem 32-bit: continues exactly like torch
    ref, mine = make_net(), make_net()
    a = torch.optim.AdamW(param_groups(ref), foreach=False, **HP)
    train(ref, a, 5, x, y)
    mine.load_state_dict(ref.state_dict())
    b = AdamWLowMem(param_groups(mine), state_bits=32, **HP)
    b.load_state_dict(a.state_dict())
    assert train(ref, a, 5, x, y, 5) == train(mine, b, 5, x, y, 5)
    # torch AdamW -> 8-bit: moments requantized
    c = AdamWLowMem(param_groups(make_net()), state_bits=8, **HP)
    c.load_state_dict(a.state_dict())
    p0 = next(iter(c.state))
    m, v = states.dense_moments(c.state[p0])
    ref_state = a.state[ref.fc1.weight]
    assert torch.allclose(m, ref_state["exp_avg"], rtol=0.05, atol=1e-4 * ref_state["exp_avg"].abs().max())
    assert c.state[p0]["step"].item() == 10
    # 8-bit -> torch AdamW through the plugin's converter (the adapt_optimizer_state hook)
    converted = states.adapt_optimizer_state(c.state_dict(), a)
    s0 = converted["state"][0]
    assert set(s0) == {"step", "exp_avg", "exp_avg_sq"} and s0["exp_avg"].shape == (32, 16)
    assert not set(states.LOWMEM_GROUP_KEYS) & set(converted["param_groups"][0])
    assert converted["param_groups"][0]["decoupled_weight_decay"] is True
    fresh = torch.optim.AdamW(param_groups(make_net()), **HP)
    fresh.load_state_dict(converted)
    assert torch.equal(fresh.state[fresh.param_groups[0]["params"][0]]["exp_avg"], m)
    # a lowmem optimizer reads any layout itself: nothing to convert
    assert states.adapt_optimizer_state(c.state_dict(), c)["state"][0]["exp_avg_codes"].dtype == torch.int8


def test_offload_keeps_states_off_the_parameter_device_and_matches():
    x, y = problem()
    a_net, b_net = make_net(), make_net()
    a = AdamWLowMem(a_net.parameters(), state_bits=8, **HP)
    b = AdamWLowMem(b_net.parameters(), state_bits=8, offload_states=True, **HP)
    assert train(a_net, a, 5, x, y) == train(b_net, b, 5, x, y)  # same maths, states only move
    dev, host, what = b.memory_per_param()
    assert dev == 0 and host == pytest.approx(2 + 8 / 256) and "CPU memory" in what


class _Stream:
    def __init__(self):
        self.synced = 0

    def synchronize(self):
        self.synced += 1


def test_async_offload_copies_are_awaited_before_the_host_reads_them():
    """Moment copies back to pinned CPU memory are asynchronous on a GPU; step(), state_dict()
    and load_state_dict() wait for them (faked here: no CUDA on CI)."""
    x, y = problem()
    net = make_net()
    opt = AdamWLowMem(net.parameters(), state_bits=8, offload_states=True, **HP)
    for call in (lambda: opt.state_dict(), lambda: opt.load_state_dict(opt.state_dict())):
        opt._host_copies = stream = _Stream()
        call()
        assert stream.synced == 1 and opt._host_copies is None
    opt._host_copies = stream = _Stream()
    train(net, opt, 1, x, y)  # step() ends by waiting
    assert stream.synced == 1 and opt._host_copies is None


# ---------------------------------------------------------------------------- optimizer in backward


def in_backward_step(net, hooks, x, y, grad_clip):
    def forward():
        return (net(x) - y).square().mean(), {}

    def backward(loss):
        if loss is not None:
            loss.backward()

    return hooks.step(forward, backward, grad_clip, torch.device("cpu"))


@pytest.mark.parametrize("bits", [32, 8])
def test_update_in_backward_equals_the_standard_step(bits):
    x, y = problem()
    ref, net = make_net(), make_net()
    a = AdamWLowMem(param_groups(ref), state_bits=bits, **HP)
    b = AdamWLowMem(param_groups(net), state_bits=bits, **HP)
    hooks = memory.OptimizerInBackward(net, b)
    for i in range(5):
        xb, yb = x[i * 32:][:32], y[i * 32:][:32]
        loss = (ref(xb) - yb).square().mean()
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(list(ref.parameters()), math.inf))
        a.step()
        a.zero_grad()
        value, _, norm_b, finite = in_backward_step(net, hooks, xb, yb, grad_clip=0.0)
        assert finite and value == loss.item() and norm_b == pytest.approx(norm, rel=1e-6)
        assert all(p.grad is None for p in net.parameters())  # no gradient buffer is left
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), net.parameters()))


def test_in_backward_clipping_is_the_global_norm_clip():
    """grad_clip > 0: two passes, the update uses clip_grad_norm_'s coefficient."""
    x, y = problem()
    ref, net = make_net(), make_net()
    a = AdamWLowMem(param_groups(ref), state_bits=32, **HP)
    b = AdamWLowMem(param_groups(net), state_bits=32, **HP)
    hooks = memory.OptimizerInBackward(net, b)
    clip = 0.05  # well below the gradient norm: every step is clipped
    for i in range(5):
        xb, yb = x[i * 32:][:32], y[i * 32:][:32]
        (ref(xb) - yb).square().mean().backward()
        norm = float(torch.nn.utils.clip_grad_norm_(list(ref.parameters()), clip))
        a.step()
        a.zero_grad()
        _, _, norm_b, finite = in_backward_step(net, hooks, xb, yb, grad_clip=clip)
        assert finite and norm > clip and norm_b == pytest.approx(norm, rel=1e-6)
    for p, q in zip(ref.parameters(), net.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_in_backward_step_waits_for_offload_copies(grad_clip):
    x, y = problem()
    net = make_net()
    opt = AdamWLowMem(param_groups(net), state_bits=8, offload_states=True, **HP)
    hooks = memory.OptimizerInBackward(net, opt)
    opt._host_copies = stream = _Stream()
    assert in_backward_step(net, hooks, x[:32], y[:32], grad_clip)[3]
    assert stream.synced == 1 and opt._host_copies is None


def inf_grad(param):
    return param.register_hook(lambda g: g * float("inf"))


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_in_backward_skips_a_nonfinite_step_before_any_update(grad_clip):
    x, y = problem()
    net = make_net()
    opt = AdamWLowMem(param_groups(net), state_bits=8, **HP)
    hooks = memory.OptimizerInBackward(net, opt)
    before = [p.detach().clone() for p in net.parameters()]
    # a non-finite loss: backward never runs
    value, _, _, finite = in_backward_step(net, hooks, x[:32] * float("nan"), y[:32], grad_clip)
    assert not finite and math.isnan(value)
    assert all(torch.equal(p, q) for p, q in zip(before, net.parameters()))
    # a finite loss with non-finite gradients from the first ones backward makes (fc2)
    handles = [inf_grad(net.fc2.weight), inf_grad(net.fc2.bias)]
    _, _, norm, finite = in_backward_step(net, hooks, x[:32], y[:32], grad_clip)
    for h in handles:
        h.remove()
    assert not finite and not math.isfinite(norm)
    assert all(torch.equal(p, q) for p, q in zip(before, net.parameters()))
    assert all(p.grad is None for p in net.parameters())
    # the next finite step updates normally
    assert in_backward_step(net, hooks, x[:32], y[:32], grad_clip)[3]
    assert not torch.equal(before[0], net.fc1.weight)


def test_in_backward_without_clipping_stops_updates_at_a_nonfinite_gradient():
    """One pass (grad_clip = 0): parameters whose gradient came before the non-finite one
    keep their update (documented); the non-finite gradient and all later ones are dropped."""
    x, y = problem()
    net = make_net()
    hooks = memory.OptimizerInBackward(net, AdamWLowMem(param_groups(net), state_bits=8, **HP))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    handle = inf_grad(net.fc1.weight)  # fc1 is reached last in backward
    _, _, norm, finite = in_backward_step(net, hooks, x[:32], y[:32], 0.0)
    handle.remove()
    assert not finite and not math.isfinite(norm)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert torch.equal(before["fc1.weight"], net.fc1.weight)
    assert not torch.equal(before["fc2.weight"], net.fc2.weight)


def test_hooks_are_idle_outside_a_step():
    net = make_net()
    opt = AdamWLowMem(net.parameters(), state_bits=8, **HP)
    memory.OptimizerInBackward(net, opt)
    before = net.fc1.weight.detach().clone()
    net(torch.randn(4, 16)).sum().backward()
    assert net.fc1.weight.grad is not None and torch.equal(net.fc1.weight, before)


def test_removed_hooks_release_the_model_and_optimizer():
    # bench's --max-params builds model after model in one process: the hooks must not keep
    # the previous one (and its optimizer state) alive
    import gc
    import weakref

    net = make_net()
    opt = AdamWLowMem(net.parameters(), state_bits=8, **HP)
    hooks = memory.OptimizerInBackward(net, opt)
    x, y = problem()
    in_backward_step(net, hooks, x[:32], y[:32], grad_clip=0.0)
    hooks.remove()
    net(x[:4]).sum().backward()  # a plain backward after remove(): the gradient stays, no update
    assert net.fc1.weight.grad is not None
    refs = [weakref.ref(net), weakref.ref(opt)]
    del net, opt, hooks
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_in_backward_needs_a_per_parameter_optimizer():
    net = make_net()
    with pytest.raises(Phase7Error, match="adamw_lowmem"):
        memory.OptimizerInBackward(net, torch.optim.AdamW(net.parameters()))


# ---------------------------------------------------------------------------- recipe checks


def test_in_backward_refuses_gradient_accumulation():
    with pytest.raises(RecipeError) as info:
        load_recipe(RECIPES / "phase7_tiny.toml", {"train.optimizer_in_backward": True, "train.grad_accum_steps": 4})
    msg = str(info.value)
    assert "train.optimizer_in_backward" in msg and "train.grad_accum_steps = 4" in msg and "batch_size" in msg


def test_bf16_weights_need_bf16_autocast():
    with pytest.raises(RecipeError, match=r"train.param_dtype = \"bf16\" with train.precision = 'fp32'"):
        load_recipe(RECIPES / "phase7_tiny.toml", {"train.param_dtype": "bf16"})


def test_fused_update_refused_where_triton_cannot_run(monkeypatch):
    """optimizer.fused = true on CPU parameters without the interpreter: one message naming
    the option, the reason and the way out, at build; recipe validation (meta parameters)
    accepts it, the device is not known there."""
    from phase7fw.components.lowmem import AdamWLowMemConfig, build_adamw_lowmem

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    net = make_net()
    with pytest.raises(Phase7Error, match=r"optimizer.fused = true runs a Triton kernel, which cannot run here: "
                                          r"device is cpu.*set optimizer.fused = false"):
        build_adamw_lowmem(AdamWLowMemConfig(fused=True), params=param_groups(net))
    meta = make_net().to("meta")
    assert build_adamw_lowmem(AdamWLowMemConfig(fused=True), params=param_groups(meta)).param_groups[0]["fused"]


# ---------------------------------------------------------------------------- chunked cross-entropy


def test_chunked_cross_entropy_equals_the_full_one():
    torch.manual_seed(0)
    h = torch.randn(2, 10, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    y = torch.randint(0, 50, (2, 10))
    y[0, 3] = -100  # ignored, as in F.cross_entropy
    full = F.cross_entropy(F.linear(h, w).flatten(0, 1), y.flatten())
    gh, gw = torch.autograd.grad(full, (h, w))
    chunked = chunked_cross_entropy(h, w, y, chunk_tokens=3)
    ch, cw = torch.autograd.grad(chunked, (h, w))
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(ch, gh)
    torch.testing.assert_close(cw, gw)


def test_chunked_cross_entropy_holds_one_chunk_of_logits():
    """Only (chunk x vocab) logits are saved for backward, never (tokens x vocab)."""
    h = torch.randn(1, 64, 8, requires_grad=True)
    w = torch.randn(1000, 8, requires_grad=True)
    y = torch.randint(0, 1000, (1, 64))
    biggest = []

    def pack(t):
        biggest.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_cross_entropy(h, w, y, chunk_tokens=16)
    loss.backward()
    assert max(biggest) <= 16 * 1000 and max(biggest) < 64 * 1000


# ---------------------------------------------------------------------------- memory plan


def meta_plan(recipe_path, overrides=None):
    from phase7fw.plugins import load_plugins

    plugins = load_plugins()
    recipe = load_recipe(recipe_path, overrides, plugins=plugins)
    model = build_model(recipe, "meta", plugins=plugins)
    if recipe.train.param_dtype == "bf16":
        memory.cast_parameters(model, torch.bfloat16)
    opt = plugins.registry.build("optimizer", recipe.optimizer.name, recipe.optimizer.config,
                                 params=param_groups(model))
    return memory.memory_plan(model, opt, recipe, model.vocab_size)


def test_memory_plan_of_the_shipped_small_gpu_recipes():
    ten = meta_plan(RECIPES / "phase7_1.5b.toml")
    eight = meta_plan(RECIPES / "phase7_1.5b_8gb.toml")
    for plan in (ten, eight):
        assert 1.4e9 <= plan["params"] <= 1.6e9  # the true 1.5B model
        assert plan["weights"] == 2.0
    assert ten["peak"] <= 9.0 * memory.GIB and eight["peak"] <= 7.0 * memory.GIB
    assert ten["weights"] + ten["grads"] + ten["optimizer"] <= 4.1
    assert eight["grads"] == 0 and eight["weights"] + eight["grads"] + eight["optimizer"] <= 2.1
    # the standard mixed-precision AdamW of the same model: 16 bytes/param (+ bf16 weight copies)
    standard = meta_plan(RECIPES / "phase7_1.5b.toml", {"optimizer": {"name": "adamw"}, "train.param_dtype": "fp32"})
    assert standard["weights"] + standard["grads"] + standard["optimizer"] == 16.0
    assert standard["peak"] > 20 * memory.GIB


def test_the_plugin_converts_its_state_for_another_optimizer_through_the_hook():
    """The core reaches the 8-bit layout only through the adapt_optimizer_state hook."""
    from phase7fw.plugins import load_plugins

    x, y = problem()
    net = make_net()
    low = AdamWLowMem(param_groups(net), state_bits=8, **HP)
    train(net, low, 2, x, y)
    plugins = load_plugins()
    other = torch.optim.AdamW(param_groups(make_net()), **HP)
    converted = plugins.call("adapt_optimizer_state", state=low.state_dict(), optimizer=other)
    assert set(converted["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    m, _ = states.dense_moments(low.state[low.param_groups[0]["params"][0]])
    torch.testing.assert_close(converted["state"][0]["exp_avg"], m)
    assert plugins.call("adapt_optimizer_state", state=low.state_dict(), optimizer=low) is None  # reads it itself
    assert plugins.call("adapt_optimizer_state", state=other.state_dict(), optimizer=other) is None  # not its layout

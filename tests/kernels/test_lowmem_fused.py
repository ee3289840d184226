"""The fused ``adamw_lowmem`` update (``optimizer.fused = true``) in Triton's CPU interpreter:
with nearest rounding it computes the torch update's numbers (codes, block maxima, weights);
with stochastic rounding it picks a neighbour, unbiased; the optimizer built on it trains like
the torch update and resumes exactly."""

import pytest
import torch

from phase7fw.components.lowmem import AdamWLowMem, states
from phase7fw.components.lowmem.fused import fused_chunk_update
from phase7fw.core.optim_groups import param_groups
from tests.unit.test_lowmem import HP, full_loss, make_net, problem, train

LR, WD, BETAS, EPS, STEP = 1e-3, 0.1, (0.9, 0.95), 1e-8, 3.0


def moments(n, block, seed=0, zero_block=False):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, generator=g) * 1e-3
    v = torch.rand(n, generator=g) * 1e-4
    if zero_block:  # a block with absmax 0 (a parameter that never had a gradient there)
        m[:block] = 0.0
        v[:block] = 0.0
    return m, v


def torch_update(w, g, m, v, scale, low, rounding):
    """The torch update of AdamWLowMem on dense moments, nearest rounding everywhere."""
    g = g.float() * scale if scale is not None else g.float()
    w32 = w.float().clone()
    m, v = m.clone(), v.clone()
    w32.mul_(1 - LR * WD)
    m.lerp_(g, 1 - BETAS[0])
    v.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
    root = v.sqrt()
    w32.addcdiv_(m, (root / (1 - BETAS[1] ** STEP) ** 0.5).add_(EPS), value=-LR / (1 - BETAS[0] ** STEP))
    return (w32.to(torch.bfloat16) if low else w32), m, v, root


@pytest.mark.parametrize("n,block", [(1000, 256), (300, 64), (64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
def test_eight_bit_nearest_equals_the_torch_update(n, block, dtype, scaled):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, generator=g).to(dtype)
    grad = (torch.randn(n, generator=g) * 1e-2).to(dtype)
    scale = torch.tensor(0.37) if scaled else None
    m0, v0 = moments(n, block, zero_block=n > block)
    mc, ma = states.quantize_blockwise(m0, signed=True, block=block)
    vc, va = states.quantize_blockwise(v0.sqrt(), signed=False, block=block)
    m = states.dequantize_blockwise(mc, ma, block=block)
    v = states.dequantize_blockwise(vc, va, block=block).square()
    want_w, want_m, _, want_root = torch_update(w, grad, m, v, scale, dtype == torch.bfloat16, "nearest")
    want_mc, want_ma = states.quantize_blockwise(want_m, signed=True, block=block)
    want_vc, want_va = states.quantize_blockwise(want_root, signed=False, block=block)

    got = [w.clone(), mc.clone(), ma.clone(), vc.clone(), va.clone()]
    fused_chunk_update(got[0], grad, tuple(got[1:]), comp=None, scale=scale, lr=LR, weight_decay=WD, betas=BETAS,
                       eps=EPS, step=STEP, block=block, rounding="nearest", seed=7, offset=0, stochastic_codes=False)
    # fp32 arithmetic in another order (lerp, addcmul): the last bit may differ, nothing more
    torch.testing.assert_close(got[0].float(), want_w.float(), rtol=2e-7 if dtype == torch.float32 else 0, atol=0)
    torch.testing.assert_close(got[2], want_ma, rtol=1e-6, atol=0)
    torch.testing.assert_close(got[4], want_va, rtol=1e-6, atol=0)
    for codes, want in ((got[1], want_mc), (got[3], want_vc)):
        diff = (codes.int() - want.int()).abs()
        assert (diff > 0).float().mean() <= 0.01 and diff.max() <= 1


def test_thirty_two_bit_and_compensated_weights_equal_the_torch_update():
    n = 777
    g = torch.Generator().manual_seed(2)
    w = torch.randn(n, generator=g).to(torch.bfloat16)
    comp = (torch.randn(n, generator=g) * 1e-3).to(torch.bfloat16)
    grad = torch.randn(n, generator=g) * 1e-2
    m, v = moments(n, 256)
    w_full = w.float() + comp.float()
    want_w32, want_m, want_v, _ = torch_update(w_full, grad, m, v, None, False, None)
    want_w = want_w32.to(torch.bfloat16)
    want_comp = (want_w32 - want_w.float()).to(torch.bfloat16)
    got_w, got_comp, got_m, got_v = w.clone(), comp.clone(), m.clone(), v.clone()
    fused_chunk_update(got_w, grad, (got_m, got_v), comp=got_comp, scale=None, lr=LR, weight_decay=WD, betas=BETAS,
                       eps=EPS, step=STEP, block=256, rounding="compensated", seed=7, offset=0)
    # m = m + (1 - beta1)(g - m) may cancel: its last bit is relative to its inputs' size
    torch.testing.assert_close(got_m, want_m, rtol=2e-7, atol=2e-7 * want_m.abs().max().item())
    torch.testing.assert_close(got_v, want_v, rtol=2e-7, atol=0)
    # one fp32 ulp in the update can move a bf16 tie; the weight + compensation is what counts
    torch.testing.assert_close(got_w.float() + got_comp.float(), want_w.float() + want_comp.float(),
                               rtol=1e-6, atol=1e-9)
    assert (got_w != want_w).float().mean() < 0.01


def test_stochastic_codes_and_weights_pick_a_neighbour_and_are_unbiased():
    """Over many seeds the mean of the dequantized moment and of the bf16 weight is the exact
    fp32 value: the kernel's Philox bits round up with probability equal to the remainder."""
    n, block, draws = 256, 256, 400
    g = torch.Generator().manual_seed(3)
    w = torch.randn(n, generator=g) * 3
    grad = torch.randn(n, generator=g) * 1e-2
    m, v = moments(n, block, seed=4)
    zero = (torch.zeros(n, dtype=torch.int8), torch.zeros(1), torch.zeros(n, dtype=torch.uint8), torch.zeros(1))
    # from zero moments: the exact new moments are (1 - beta1) g and sqrt((1 - beta2) g^2)
    exact_w, exact_m, _, exact_root = torch_update(w, grad, torch.zeros(n), torch.zeros(n), None, False, None)
    sum_w, sum_m, sum_root = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), 0.0
    lo_w = (exact_w.view(torch.int32) & -65536).view(torch.float32)
    for seed in range(draws):
        wb = w.to(torch.bfloat16)
        exact_seed_w = torch_update(wb, grad, torch.zeros(n), torch.zeros(n), None, False, None)[0]
        state = tuple(t.clone() for t in zero)
        fused_chunk_update(wb, grad, state, comp=None, scale=None, lr=LR, weight_decay=WD, betas=BETAS, eps=EPS,
                           step=STEP, block=block, rounding="stochastic", seed=seed, offset=0)
        down = (exact_seed_w.view(torch.int32) & -65536).view(torch.float32)
        up = ((exact_seed_w.view(torch.int32) & -65536) + 65536).view(torch.float32)
        wf = wb.float()
        assert ((wf == down) | (wf == up) | (wf == exact_seed_w)).all()
        sum_w += wf.double() - exact_seed_w.double()
        sum_m += states.dequantize_blockwise(state[0], state[1], block=block).double()
        sum_root += states.dequantize_blockwise(state[2], state[3], block=block).double()
    ulp = (lo_w.abs() * 2**-7).double()
    assert ((sum_w / draws).abs() <= 6 * ulp / (2 * draws**0.5)).all()
    step_m = exact_m.abs().double() * 0.09  # one signed code step: 2^(1/8) - 1
    assert ((sum_m / draws - exact_m.double()).abs() <= 6 * step_m / (2 * draws**0.5) + 1e-12).all()
    step_v = exact_root.double() * 0.044
    assert ((sum_root / draws - exact_root.double()).abs() <= 6 * step_v / (2 * draws**0.5) + 1e-12).all()


def test_the_fused_optimizer_trains_like_the_torch_update():
    """200 steps of the small regression in the small-GPU setting (8-bit moments, bf16 weights,
    stochastic rounding) end within 2% of torch's fp32 AdamW, as the torch update does
    (tests/unit/test_lowmem.py); the other settings' arithmetic is checked above."""
    bits, dtype, rounding = 8, torch.bfloat16, "stochastic"
    x, y = problem()
    ref = make_net()
    train(ref, torch.optim.AdamW(ref.parameters(), **HP), 200, x, y)
    net = make_net(dtype)
    opt = AdamWLowMem(param_groups(net), state_bits=bits, weight_rounding=rounding, fused=True, **HP)
    train(net, opt, 200, x, y)
    assert abs(full_loss(net, x, y) / full_loss(ref, x, y) - 1) < 0.02


def test_fused_resume_is_exact_and_a_torch_state_loads(tmp_path):
    x, y = problem()
    net = make_net(torch.bfloat16)
    opt = AdamWLowMem(param_groups(net), state_bits=8, fused=True, **HP)
    train(net, opt, 5, x, y)
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, tmp_path / "c.pt")
    reference = train(net, opt, 5, x, y, start=5)
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    for fused in (True, False):  # the choice is the recipe's, not the checkpoint's
        net2 = make_net(torch.bfloat16)
        net2.load_state_dict(saved["model"])
        opt2 = AdamWLowMem(param_groups(net2), state_bits=8, fused=fused, **HP)
        opt2.load_state_dict(saved["opt"])
        assert opt2.param_groups[0]["fused"] is fused
        losses = train(net2, opt2, 5, x, y, start=5)
        if fused:
            assert losses == reference
            assert all(torch.equal(p, q) for p, q in zip(net.parameters(), net2.parameters()))
        else:  # other random bits from the first update on: close, not equal
            assert losses[0] == reference[0] and losses[1:] != reference[1:]
            assert max(abs(a / b - 1) for a, b in zip(losses, reference)) < 0.01

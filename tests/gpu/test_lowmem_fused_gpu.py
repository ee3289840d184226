"""The fused ``adamw_lowmem`` update on a CUDA GPU (marker ``gpu``): with nearest rounding it
computes the torch update's numbers at a real chunk size, and the optimizer with offloaded
8-bit moments trains like the torch update."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_nearest_update_equals_the_torch_update_at_a_full_chunk():
    from phase7fw.components.lowmem import CHUNK, states
    from phase7fw.components.lowmem.fused import fused_chunk_update

    dev, n, block = torch.device("cuda"), CHUNK - 1000, 256
    g = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(n, device=dev, generator=g).to(torch.bfloat16)
    grad = (torch.randn(n, device=dev, generator=g) * 1e-2).to(torch.bfloat16)
    m0 = torch.randn(n, device=dev, generator=g) * 1e-3
    s0 = torch.rand(n, device=dev, generator=g) * 1e-2
    mc, ma = states.quantize_blockwise(m0, signed=True, block=block)
    vc, va = states.quantize_blockwise(s0, signed=False, block=block)
    m = states.dequantize_blockwise(mc, ma, block=block)
    v = states.dequantize_blockwise(vc, va, block=block).square()
    lr, wd, (b1, b2), eps, step = 1e-3, 0.1, (0.9, 0.95), 1e-8, 7.0
    w32, gf = w.float(), grad.float()
    w32.mul_(1 - lr * wd)
    m.lerp_(gf, 1 - b1)
    v.mul_(b2).addcmul_(gf, gf, value=1 - b2)
    root = v.sqrt()
    w32.addcdiv_(m, (root / (1 - b2**step) ** 0.5).add_(eps), value=-lr / (1 - b1**step))
    want_mc, want_ma = states.quantize_blockwise(m, signed=True, block=block)
    want_vc, want_va = states.quantize_blockwise(root, signed=False, block=block)

    got_w = w.clone()
    got = (mc.clone(), ma.clone(), vc.clone(), va.clone())
    fused_chunk_update(got_w, grad, got, comp=None, scale=None, lr=lr, weight_decay=wd, betas=(b1, b2), eps=eps,
                       step=step, block=block, rounding="nearest", seed=1, offset=0, stochastic_codes=False)
    assert (got_w != w32.to(torch.bfloat16)).float().mean() < 1e-3  # ties moved by an fp32 ulp only
    torch.testing.assert_close(got[1], want_ma, rtol=1e-6, atol=0)
    torch.testing.assert_close(got[3], want_va, rtol=1e-6, atol=0)
    for codes, want in ((got[0], want_mc), (got[2], want_vc)):
        diff = (codes.int() - want.int()).abs()
        assert (diff > 0).float().mean() < 1e-3 and diff.max() <= 1


def test_offloaded_fused_optimizer_trains_like_the_torch_update():
    from torch import nn

    from phase7fw.components.lowmem import AdamWLowMem

    def run(fused):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 64)).cuda().bfloat16()
        opt = AdamWLowMem(net.parameters(), lr=2e-3, state_bits=8, offload_states=True, fused=fused)
        g = torch.Generator(device="cuda").manual_seed(1)
        w = torch.randn(256, 64, device="cuda", generator=g) / 16
        losses = []
        for _ in range(150):  # fresh samples every step: nothing to memorize, the loss ends at the noise floor
            x = torch.randn(512, 256, device="cuda", generator=g)
            y = torch.tanh(x @ w) + 0.1 * torch.randn(512, 64, device="cuda", generator=g)
            loss = (net(x.bfloat16()).float() - y).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert opt.state[net[0].weight]["exp_avg_codes"].device.type == "cpu"
        return sum(losses[-30:]) / 30

    torch_loss, fused_loss = run(False), run(True)
    assert abs(fused_loss / torch_loss - 1) < 0.03, (fused_loss, torch_loss)

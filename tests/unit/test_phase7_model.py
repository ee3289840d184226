"""The phase7 model as a whole: MODEL.md's checks on the assembled network."""

import attrs
import pytest
import torch

from phase7fw import build_model, hookimpl, load_recipe
from phase7fw.errors import Phase7Error
from phase7fw.plugins import load_plugins
from tests.conftest import RECIPES

SMALL = {"name": "phase7", "d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 24,
         "attention": {"window": 8}, "ssm": {"n_heads": 2, "max_rank": 8, "min_rank": 2, "chunk_size": 8},
         "embedding": {"rank": 4}}


def small_model(seed=0, plugins=None, **model):
    recipe = load_recipe({"model": {**SMALL, **model}}, plugins=plugins)
    torch.manual_seed(seed)
    m = build_model(recipe, "cpu", plugins=plugins)
    m.set_curvature(0.7)
    return m


@pytest.mark.parametrize("mixer", ["hybrid", "attention", "ssm", "sum", "alternate"])
def test_changing_a_token_leaves_earlier_logits_bit_identical(mixer):
    if mixer in ("sum", "alternate"):  # hybrid blocks joined without the gate
        m = small_model(block={"name": "hybrid", "mix": mixer}).eval()
    else:
        m = small_model(mixer=mixer).eval()
    x = torch.randint(0, 257, (2, 24))
    t = 13
    y = x.clone()
    y[:, t] = (y[:, t] + 1) % 257
    with torch.no_grad():
        a, b = m(x), m(y)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.equal(a[:, t:], b[:, t:])


def test_every_parameter_gets_a_finite_nonzero_gradient():
    m = small_model()
    x = torch.randint(0, 257, (2, 24))
    loss, metrics = m.loss(x, torch.roll(x, -1, 1))
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert 2 <= float(metrics["effective_rank"]) <= 8


def test_tiny_model_overfits_one_batch():
    m = small_model(seed=1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x = torch.randint(0, 257, (4, 24))
    y = torch.roll(x, -1, 1)
    first = None
    for _ in range(200):
        loss, _ = m.loss(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_bf16_near_the_ball_boundary_has_no_nan():
    m = small_model()
    with torch.no_grad():  # tangent norms far past artanh(0.999)/sqrt(c): points at the boundary
        for block in m.blocks:
            block.attn.q_proj.weight.mul_(200)
            block.attn.k_proj.weight.mul_(200)
    m.set_curvature(10.0)
    x = torch.randint(0, 257, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = m.loss(x, torch.roll(x, -1, 1))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    with torch.no_grad():
        fp32, _ = m.loss(x, torch.roll(x, -1, 1))
    assert loss.item() == pytest.approx(fp32.item(), rel=2e-2)  # bf16 autocast tracks the fp32 loss


def test_tied_head_gradient_pushed_once_per_step_equals_direct_gradient():
    m = small_model(tie_embeddings=True)
    assert m.parameter_breakdown()["head"] == 0
    x = torch.randint(0, 257, (4, 24))
    y = torch.roll(x, -1, 1)
    # Direct: the table rebuilt inside every forward.
    (m.loss(x[:2], y[:2])[0] / 2 + m.loss(x[2:], y[2:])[0] / 2).backward()
    direct = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    # Trainer protocol: the table is built once, micro-batches accumulate into it.
    m.begin_step()
    for sl in (slice(0, 2), slice(2, 4)):
        (m.loss(x[sl], y[sl])[0] / 2).backward()
    m.finish_backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, direct[n], rtol=1e-5, atol=1e-7, msg=n)


def test_block_mix_sum_and_alternate_drop_the_gate():
    summed = small_model(block={"name": "hybrid", "mix": "sum"})
    assert all(b.gate is None and b.attn is not None and b.ssm is not None for b in summed.blocks)
    alternate = small_model(n_layers=3, block={"name": "hybrid", "mix": "alternate"})
    layout = [(b.attn is not None, b.ssm is not None, b.gate is None) for b in alternate.blocks]
    assert layout == [(False, True, True), (True, False, True), (False, True, True)]
    # sum: h = x + Attn(u) + SSM(u), checked against the paths run by hand
    block = summed.blocks[0]
    x = torch.randn(2, 24, 32)
    u = block.norm1(x)
    h = x + block.attn(u) + block.ssm(u)[0]
    torch.testing.assert_close(block(x)[0], h + block.ffn(block.norm2(h)))


@pytest.mark.parametrize("bias,share", [(None, 0.8808), (0.0, 0.5)])  # None: the default, 2
def test_mixer_gate_starts_at_sigmoid_of_its_bias_on_the_attention_path(bias, share):
    block_cfg = {"name": "hybrid"} if bias is None else {"name": "hybrid", "gate_init_bias": bias}
    m = small_model(block=block_cfg)
    _, stats = m.blocks[0].diagnostics(torch.randn(2, 24, 32))
    # W_g ~ N(0, 0.02): the per-token gate stays within ~0.01 of sigmoid(b_g) at init
    assert stats["gate_mean"] == pytest.approx(share, abs=0.01)


def test_block_ssm_every_keeps_the_ssm_in_every_kth_block():
    m = small_model(n_layers=5, block={"name": "hybrid", "ssm_every": 2})
    layout = [(b.attn is not None, b.ssm is not None, b.gate is not None) for b in m.blocks]
    assert layout == [(True, True, True), (True, False, False)] * 2 + [(True, True, True)]
    assert m.parameter_breakdown()["ssm"] == 3 * sum(p.numel() for p in m.blocks[0].ssm.parameters())
    summed = small_model(n_layers=3, block={"name": "hybrid", "mix": "sum", "ssm_every": 3})
    assert [(b.ssm is not None, b.gate is None) for b in summed.blocks] == [(True, True), (False, True), (False, True)]
    # causal, and the attention-only blocks follow the paths run by hand
    x = torch.randint(0, 257, (2, 24))
    y = x.clone()
    y[:, 13] = (y[:, 13] + 1) % 257
    with torch.no_grad():
        assert torch.equal(m.eval()(x)[:, :13], m(y)[:, :13])
        block, h = m.blocks[1], torch.randn(2, 24, 32)
        mid = h + block.attn(block.norm1(h))
        torch.testing.assert_close(block(h)[0], mid + block.ffn(block.norm2(mid)))


@pytest.mark.parametrize("over", [{"mixer": "attention"}, {"block": {"name": "hybrid", "mix": "alternate"}}])
def test_block_ssm_every_refused_without_gated_or_summed_hybrid_blocks(over):
    block = {"name": "hybrid", "ssm_every": 2, **over.get("block", {})}
    with pytest.raises(Phase7Error, match=r"model.block.ssm_every = 2 needs model.mixer = \"hybrid\""):
        small_model(**{**over, "block": block})


def test_ssm_none_builds_attention_only_blocks():
    m = small_model(ssm={"name": "none"})
    assert all(b.ssm is None and b.gate is None for b in m.blocks)
    assert m.parameter_breakdown()["ssm"] == 0
    x = torch.randint(0, 257, (1, 24))
    assert m(x).shape == (1, 24, 257)


def test_a_plugin_replaces_the_attention():
    @attrs.frozen
    class Cfg:
        pass

    class ZeroAttention(torch.nn.Module):
        def __init__(self, d_model):
            super().__init__()
            self.proj = torch.nn.Linear(d_model, d_model, bias=False)

        def init_weights(self):
            torch.nn.init.zeros_(self.proj.weight)

        def forward(self, x):
            return self.proj(x)

    class Plugin:
        @hookimpl
        def register_components(self, register):
            register("attention", "zero", lambda c, *, d_model, **ctx: ZeroAttention(d_model), Cfg)

    plugins = load_plugins(extra=[Plugin()])
    m = small_model(plugins=plugins, attention={"name": "zero"})
    assert all(isinstance(b.attn, ZeroAttention) for b in m.blocks)
    assert m(torch.randint(0, 257, (1, 24))).shape == (1, 24, 257)


def test_shipped_sizes_and_breakdown():
    m = build_model(load_recipe(RECIPES / "phase7_1.5b.toml"), device="meta")
    parts = m.parameter_breakdown()
    assert 1.4e9 <= parts["total"] <= 1.6e9
    assert sum(v for k, v in parts.items() if k != "total") == parts["total"]
    assert all(parts[k] > 0 for k in ("embedding", "attention", "ssm", "ffn", "mixer_gate", "norms", "head"))
    assert m.embedding.compression_ratio() >= 20
    assert any("compression" in line for line in m.describe_extra())
    one_b = build_model(load_recipe(RECIPES / "phase7_1b.toml"), device="meta")
    assert 0.9e9 <= one_b.parameter_breakdown()["total"] <= 1.1e9

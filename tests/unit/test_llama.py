"""The ``llama`` baseline model: shapes, causality, a naive reference, meta build, init,
activation checkpointing, accounting, and that it can learn."""

import math

import pytest
import torch

from phase7fw.components.llama import (
    LlamaConfig,
    LlamaModel,
    apply_rope,
    build_llama,
    resolve_ffn_hidden,
    rope_tables,
)
from phase7fw.components.optimizers import AdamWConfig, build_adamw
from phase7fw.errors import Phase7Error
from phase7fw.core.optim_groups import param_groups

V = 61


def tiny(**kw) -> LlamaConfig:
    base = dict(d_model=32, n_layers=2, n_heads=4, seq_len=16, ffn_hidden=48)
    return LlamaConfig(**{**base, **kw})


def make(seed=0, vocab=V, **kw) -> LlamaModel:
    torch.manual_seed(seed)
    return build_llama(tiny(**kw), vocab_size=vocab, registry=None, kernels=None)


def ids(b=2, t=16, vocab=V, seed=1):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


# -- naive reference, written independently of the model's code paths ----------------------
def naive_logits(model: LlamaModel, x: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    H = cfg.n_heads
    Hkv = cfg.n_kv_heads or H
    D = cfg.d_model // H
    B, T = x.shape

    def rmsnorm(h, w):
        return h / torch.sqrt((h * h).mean(-1, keepdim=True) + cfg.norm_eps) * w

    # RoPE as complex multiplication on (first half + i * second half) of each head.
    freqs = torch.tensor([cfg.rope_theta ** (-2 * j / D) for j in range(D // 2)], dtype=torch.float64)
    rot = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), torch.arange(T)[:, None] * freqs)

    def rope(u):  # (B, T, heads, D)
        z = torch.complex(u[..., : D // 2].double(), u[..., D // 2 :].double()) * rot[None, :, None, :]
        return torch.cat([z.real, z.imag], dim=-1).float()

    h = model.tok_embeddings.weight[x]
    mask = torch.ones(T, T).tril().bool()
    for blk in model.blocks:
        u = rmsnorm(h, blk.attn_norm.weight)
        w = blk.attn.wqkv.weight
        q = (u @ w[: H * D].T).view(B, T, H, D)
        k = (u @ w[H * D : (H + Hkv) * D].T).view(B, T, Hkv, D)
        v = (u @ w[(H + Hkv) * D :].T).view(B, T, Hkv, D)
        q, k = rope(q), rope(k)
        rep = H // Hkv
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
        att = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        o = torch.einsum("bhts,bshd->bthd", att, v).reshape(B, T, H * D)
        h = h + o @ blk.attn.wo.weight.T
        u = rmsnorm(h, blk.ffn_norm.weight)
        gate_up = u @ blk.ffn.w13.weight.T
        gate, up = gate_up[..., : blk.ffn.hidden], gate_up[..., blk.ffn.hidden :]
        h = h + (gate * torch.sigmoid(gate) * up) @ blk.ffn.w2.weight.T
    h = rmsnorm(h, model.norm.weight)
    return h @ model.lm_head_weight().T


def test_logits_shape():
    model = make()
    assert model.vocab_size == V and model.seq_len == 16
    out = model(ids(3, 10))
    assert out.shape == (3, 10, V) and out.dtype == torch.float32


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2}, {"n_kv_heads": 1, "tie_embeddings": True}])
def test_matches_naive_reference(kw):
    model = make(**kw)
    # Non-trivial norm gains so a wrong norm formula cannot hide.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    x = ids()
    torch.testing.assert_close(model(x), naive_logits(model, x), rtol=1e-4, atol=1e-5)


def test_causal():
    model = make(n_kv_heads=2).eval()
    x = ids(2, 16)
    base = model(x)
    for t in (0, 5, 15):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % V
        out = model(y)
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.equal(out[:, t], base[:, t])


def test_rope_scores_depend_only_on_offset():
    T, D = 12, 8
    cos, sin = rope_tables(T, D, 10000.0)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(D, generator=g).expand(1, 1, T, D)
    k = torch.randn(D, generator=g).expand(1, 1, T, D)
    qr, kr = apply_rope(q, cos, sin)[0, 0], apply_rope(k, cos, sin)[0, 0]
    dots = qr @ kr.T  # dots[m, n] = <R_m q, R_n k>
    for shift in (1, 4, 7):
        torch.testing.assert_close(dots[shift:, shift:], dots[:-shift, :-shift], rtol=0, atol=1e-5)
    # A rotation keeps norms, and position 0 is the identity.
    torch.testing.assert_close(qr.norm(dim=-1), q[0, 0].norm(dim=-1))
    torch.testing.assert_close(qr[0], q[0, 0, 0])


def test_forward_hidden_and_head_give_logits():
    for tied in (False, True):
        model = make(tie_embeddings=tied)
        x = ids()
        logits = model.forward_hidden(x) @ model.lm_head_weight().T
        torch.testing.assert_close(logits, model(x))
        assert model.lm_head_weight().shape == (V, 32)


def test_ffn_hidden_auto():
    # 8/3 d rounded up to a multiple of 256: the classic LLaMA widths.
    assert resolve_ffn_hidden(LlamaConfig(d_model=4096)) == 11008
    assert resolve_ffn_hidden(LlamaConfig(d_model=2048)) == 5632
    assert resolve_ffn_hidden(LlamaConfig(d_model=2048, ffn_hidden=6144)) == 6144


def test_vocab_size_resolution():
    assert build_llama(tiny(vocab_size=0), vocab_size=40).vocab_size == 40
    assert build_llama(tiny(vocab_size=50), vocab_size=40).vocab_size == 50
    with pytest.raises(Phase7Error, match="smaller than the tokenizer"):
        build_llama(tiny(vocab_size=30), vocab_size=40)
    with pytest.raises(Phase7Error, match="vocab_size"):
        build_llama(tiny(), vocab_size=0)


def test_bad_shapes_are_user_errors():
    with pytest.raises(Phase7Error, match="divisible"):
        build_llama(tiny(d_model=30), vocab_size=V)
    with pytest.raises(Phase7Error, match="n_kv_heads"):
        build_llama(tiny(n_kv_heads=3), vocab_size=V)
    with pytest.raises(ValueError, match="seq_len"):
        make()(ids(1, 17))


def expected_counts(d, L, H, Hkv, ffn, vocab, tied):
    hd = d // H
    attention = L * (d * (H + 2 * Hkv) * hd + H * hd * d)
    ffn_p = L * 3 * d * ffn
    norms = (2 * L + 1) * d
    embedding = vocab * d
    head = 0 if tied else vocab * d
    return {
        "embedding": embedding,
        "attention": attention,
        "ffn": ffn_p,
        "norms": norms,
        "head": head,
        "total": embedding + attention + ffn_p + norms + head,
    }


def test_meta_build_1_5b_parameter_count():
    cfg = LlamaConfig(d_model=2048, n_layers=24, n_heads=16, ffn_hidden=6144, seq_len=1024)
    with torch.device("meta"):
        model = build_llama(cfg, vocab_size=32000, registry=None, kernels=None)
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.is_meta for t in tensors)  # nothing allocated
    # By hand: 24 * (4 d^2 + 3 d * 6144 + 2 d) + 2 * 32000 d + d
    by_hand = 24 * (4 * 2048**2 + 3 * 2048 * 6144 + 2 * 2048) + 2 * 32000 * 2048 + 2048
    breakdown = model.parameter_breakdown()
    assert breakdown == expected_counts(2048, 24, 16, 16, 6144, 32000, tied=False)
    assert breakdown["total"] == by_hand == sum(p.numel() for p in model.parameters())
    assert 1.4e9 < by_hand < 1.6e9
    assert model.matmul_params() == by_hand - 32000 * 2048 - (2 * 24 + 1) * 2048


def test_breakdown_tied_and_gqa():
    model = make(n_kv_heads=2, tie_embeddings=True)
    breakdown = model.parameter_breakdown()
    assert breakdown == expected_counts(32, 2, 4, 2, 48, V, tied=True)
    assert breakdown["total"] == sum(p.numel() for p in model.parameters())
    # The tied table is the head matmul, counted once.
    assert model.matmul_params() == breakdown["attention"] + breakdown["ffn"] + V * 32


def test_meta_then_materialize_equals_direct_build():
    with torch.device("meta"):
        lazy = build_llama(tiny(), vocab_size=V)
    lazy.to_empty(device="cpu")
    torch.manual_seed(123)
    lazy.init_weights()
    direct = make(seed=7)
    torch.manual_seed(123)
    direct.init_weights()
    for (name, a), b in zip(lazy.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(lazy.rope_cos, direct.rope_cos, rtol=0, atol=0)
    x = ids()
    assert torch.equal(lazy(x), direct(x))


def test_init_deterministic_and_scaled():
    a, b, c = make(seed=5, d_model=128), make(seed=5, d_model=128), make(seed=6, d_model=128)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.blocks[0].attn.wqkv.weight, c.blocks[0].attn.wqkv.weight)
    std = 0.02
    wqkv = torch.cat([blk.attn.wqkv.weight.flatten() for blk in a.blocks])
    wo = torch.cat([blk.attn.wo.weight.flatten() for blk in a.blocks] + [blk.ffn.w2.weight.flatten() for blk in a.blocks])
    assert wqkv.std().item() == pytest.approx(std, rel=0.05)
    assert wo.std().item() == pytest.approx(std / math.sqrt(2 * 2), rel=0.05)
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in a.named_parameters() if "norm" in n)


def test_activation_checkpointing_same_loss_and_grads():
    plain, ckpt = make(seed=3), make(seed=3)
    ckpt.enable_activation_checkpointing()
    calls = {"plain": 0, "ckpt": 0}
    # (the block checkpoints inside its own forward: its attention runs again in backward)
    plain.blocks[0].attn.register_forward_pre_hook(lambda *a: calls.__setitem__("plain", calls["plain"] + 1))
    ckpt.blocks[0].attn.register_forward_pre_hook(lambda *a: calls.__setitem__("ckpt", calls["ckpt"] + 1))
    x, y = ids(seed=4), ids(seed=5)
    losses = []
    for model in (plain, ckpt):
        loss, _ = model.loss(x, y)
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
        assert p.grad.abs().sum() > 0, name
    # The checkpointed block ran again during backward.
    assert calls == {"plain": 1, "ckpt": 2}


def test_tiny_llama_overfits_one_batch():
    model = make(seed=0, d_model=64, n_layers=2, n_heads=4, ffn_hidden=128, vocab=64)
    opt = build_adamw(AdamWConfig(lr=3e-3, weight_decay=0.0), params=param_groups(model))
    batch = ids(4, 16, vocab=64, seed=9)
    x, y = batch[:, :-1], batch[:, 1:]
    first = None
    for _ in range(300):
        loss, _ = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
        if loss.item() < 0.1 * first:
            break
    assert loss.item() < 0.1 * first, (first, loss.item())


def test_registered_through_plugins():
    from phase7fw.plugins import load_plugins

    reg = load_plugins().registry
    entry = reg.get("model", "llama")
    assert entry.config_cls is LlamaConfig and entry.factory is build_llama
    model = reg.build("model", "llama", tiny(), vocab_size=V, registry=reg, kernels=None)
    assert model(ids()).shape == (2, 16, V)
    assert reg.get("optimizer", "adamw").factory is build_adamw
    assert {"warmup_cosine", "constant"} <= set(reg.names("lr_scheduler"))


def test_recipe_table_structures_strictly():
    from phase7fw.plugins import load_plugins
    from phase7fw.recipe.convert import structure_component

    reg = load_plugins().registry
    errors = []
    comp = structure_component(
        {"name": "llama", "d_model": 64, "tie_embeddings": True, "rope_theta": 500000}, "model", reg, "model", errors
    )
    assert errors == []
    assert comp.config == LlamaConfig(d_model=64, tie_embeddings=True, rope_theta=500000.0)
    errors = []
    structure_component({"name": "llama", "n_layers": 0, "d_model": "64"}, "model", reg, "model", errors)
    assert any(e.startswith("model.n_layers:") for e in errors)
    assert any(e.startswith("model.d_model:") for e in errors)


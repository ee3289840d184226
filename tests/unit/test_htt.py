"""HTT embedding: the table is a true tensor-train matrix, the gather path matches it, and it compresses."""

import math

import pytest
import torch

from phase7fw.components.phase7 import embedding as emb
from phase7fw.registry import Registry


def _registry():
    reg = Registry()
    emb.register_components(reg.register)
    return reg


def _build(n_cores, vocab, d, rank=5, seed=0, dtype=torch.float64, init_std=0.02):
    reg = _registry()
    cfg = emb.HttConfig(n_cores=n_cores, rank=rank, init_std=init_std)
    with torch.device("meta"):
        m = reg.build("embedding", "htt", cfg, vocab_size=vocab, d_model=d)
    m.to_empty(device="cpu")
    torch.manual_seed(seed)
    m.init_weights()
    return m.to(dtype)


@pytest.mark.parametrize("n, k", [(32000, 2), (32000, 3), (2048, 2), (2048, 3), (257, 3), (1, 2), (97, 2), (50257, 3)])
def test_balanced_factors(n, k):
    f = emb.balanced_factors(n, k)
    assert len(f) == k and math.prod(f) >= n
    # near-balanced: no factor more than one above the k-th root, and little padding
    root = n ** (1 / k)
    assert max(f) <= math.ceil(root) + 1 and min(f) >= math.floor(root) - 1
    # no slack: lowering any one factor would no longer cover n
    assert all(math.prod(f) // fi * (fi - 1) < n for fi in f)


# (vocab, d_model) pairs with padding in both factorizations
CASES = [(2, 1000, 96), (2, 257, 33), (3, 500, 50), (3, 1000, 64)]


@pytest.mark.parametrize("n_cores, vocab, d", CASES)
def test_table_equals_tensorly_tt_matrix(n_cores, vocab, d):
    tl = pytest.importorskip("tensorly")
    from tensorly.tt_matrix import tt_matrix_to_matrix

    tl.set_backend("numpy")
    m = _build(n_cores, vocab, d)
    cores = [c.detach().numpy() for c in m.cores]
    ref = torch.from_numpy(tt_matrix_to_matrix(cores))[:vocab, :d] * m.scale.item()
    table = m.weight_matrix().detach()
    assert table.shape == (vocab, d)
    torch.testing.assert_close(table, ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("n_cores, vocab, d", CASES[:1] + CASES[2:3])
def test_table_equals_torchtt(n_cores, vocab, d):
    torchtt = pytest.importorskip("torchtt")
    m = _build(n_cores, vocab, d)
    tt = torchtt.TT([c.detach().clone() for c in m.cores])  # 4-D cores: a TT matrix
    full = tt.full().reshape(math.prod(m.vocab_factors), math.prod(m.dim_factors))
    torch.testing.assert_close(m.weight_matrix().detach(), full[:vocab, :d] * m.scale.item(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("n_cores, vocab, d", CASES)
def test_forward_gathers_rows_of_table(n_cores, vocab, d):
    m = _build(n_cores, vocab, d)
    table = m.weight_matrix().detach()
    all_ids = torch.arange(vocab).view(1, vocab)
    torch.testing.assert_close(m(all_ids)[0].detach(), table, rtol=1e-12, atol=1e-15)
    ids = torch.randint(0, vocab, (3, 11))
    out = m(ids)
    assert out.shape == (3, 11, d)
    torch.testing.assert_close(out.detach(), table[ids], rtol=1e-12, atol=1e-15)
    # fp32 path agrees with the fp64 one to fp32 rounding
    m32 = _build(n_cores, vocab, d, dtype=torch.float32)
    torch.testing.assert_close(m32(ids).double(), out.detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n_cores, expected_min", [(2, 20.0), (3, 20.0)])
def test_compression_ratio_32k_2048(n_cores, expected_min):
    with torch.device("meta"):
        m = emb.build_htt(emb.HttConfig(n_cores=n_cores, rank=32), vocab_size=32000, d_model=2048)
    ratio = m.compression_ratio()
    stored = sum(p.numel() for p in m.parameters())
    print(f"HTT {n_cores} cores, V=32000 D=2048 rank 32: {stored} params, compression {ratio:.1f}x"
          f" (vocab {m.vocab_factors}, dim {m.dim_factors})")
    assert ratio == pytest.approx(32000 * 2048 / stored)
    assert ratio >= expected_min


def test_gradients_reach_every_core_and_scale():
    for n_cores in (2, 3):
        m = _build(n_cores, 300, 40, dtype=torch.float32)
        ids = torch.randint(0, 300, (2, 16))
        target = torch.randn(2, 16, 40)
        (m(ids) - target).square().mean().backward()
        for name, p in m.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        # the tied-head path (full table) also reaches every parameter
        m.zero_grad()
        m.weight_matrix().square().sum().backward()
        assert all(p.grad.abs().sum() > 0 for p in m.parameters())


def test_init_is_deterministic_and_row_rms_matches_init_std():
    a = _build(2, 4000, 256, seed=3, dtype=torch.float32)
    b = _build(2, 4000, 256, seed=3, dtype=torch.float32)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    rms = a.weight_matrix().detach().square().mean(-1).sqrt()
    assert rms.mean().item() == pytest.approx(0.02, rel=0.25)
    d = emb.build_dense(emb.DenseConfig(), vocab_size=4000, d_model=256)
    torch.manual_seed(0)
    d.init_weights()
    assert d.weight.square().mean(-1).sqrt().mean().item() == pytest.approx(0.02, rel=0.05)


def test_bf16_autocast_forward_backward():
    m = _build(3, 500, 50, dtype=torch.float32)
    ids = torch.randint(0, 500, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(ids)
    out.float().sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    ref = m(ids)  # fp32: the bf16 contraction stays within bf16 rounding of it
    ref.sum().backward()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2
    for a, p in zip(grads, m.parameters()):
        assert ((a - p.grad).norm() / p.grad.norm()).item() < 5e-2


def test_dense_embedding():
    reg = _registry()
    with torch.device("meta"):
        d = reg.build("embedding", "dense", emb.DenseConfig(), vocab_size=100, d_model=8)
    d.to_empty(device="cpu")
    d.init_weights()
    ids = torch.randint(0, 100, (2, 5))
    assert torch.equal(d(ids), d.weight_matrix()[ids])
    assert d.compression_ratio() == 1.0


def test_n_cores_outside_2_3_is_a_recipe_error():
    from phase7fw.recipe.convert import structure

    errors = []
    structure({"n_cores": 4}, emb.HttConfig, _registry(), "model.embedding", errors)
    assert errors and "model.embedding.n_cores" in errors[0]

"""``adamw`` optimizer and the weight-decay parameter split."""

import pytest
import torch
from torch import nn

from phase7fw.components.llama import LlamaConfig, build_llama
from phase7fw.components.optimizers import AdamWConfig, build_adamw
from phase7fw.errors import Phase7Error
from phase7fw.core.optim_groups import param_groups


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)  # weight decays, bias does not
        self.emb_scale = nn.Parameter(torch.ones(1, 3))  # 2-D but a scale: no decay
        self.layer_norm = nn.LayerNorm(3)
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)
        self.conv = nn.Conv1d(3, 3, 2, bias=False)  # 3-D weight decays


def ids_of(group):
    return {id(p) for p in group["params"]}


def test_param_groups_split():
    m = Toy()
    decay, no_decay = param_groups(m)
    assert set(decay) == {"params"} and no_decay["weight_decay"] == 0.0
    assert ids_of(decay) == {id(m.proj.weight), id(m.conv.weight)}
    assert ids_of(no_decay) == {id(m.proj.bias), id(m.emb_scale), id(m.layer_norm.weight), id(m.layer_norm.bias)}


def test_param_groups_llama_tied_once():
    torch.manual_seed(0)
    model = build_llama(LlamaConfig(d_model=32, n_layers=2, n_heads=4, seq_len=8, tie_embeddings=True), vocab_size=50)
    decay, no_decay = param_groups(model)
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert len(no_decay["params"]) == 2 * 2 + 1  # two norms per block + final norm
    seen = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))


def test_build_adamw_groups_and_defaults():
    m = Toy()
    opt = build_adamw(AdamWConfig(), params=param_groups(m), registry=None)
    assert isinstance(opt, torch.optim.AdamW)
    g0, g1 = opt.param_groups
    assert (g0["weight_decay"], g1["weight_decay"]) == (0.1, 0.0)
    assert g0["lr"] == g1["lr"] == 3e-4
    assert g0["betas"] == (0.9, 0.95) and g0["eps"] == 1e-8
    assert g0["foreach"] is True and not g0["fused"]  # CPU: foreach


def test_build_adamw_plain_iterable_of_tensors():
    m = Toy()
    params = (p for p in m.parameters() if p.requires_grad)  # a generator, read once
    opt = build_adamw(AdamWConfig(lr=1e-3, weight_decay=0.05), params=params)
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0]["weight_decay"] == 0.05
    assert len(opt.param_groups[0]["params"]) == 6


def test_fused_true_on_cpu_is_a_clear_error():
    with pytest.raises(Phase7Error, match="fused.*CUDA.*cpu"):
        build_adamw(AdamWConfig(fused=True), params=param_groups(Toy()))
    opt = build_adamw(AdamWConfig(fused=False), params=param_groups(Toy()))
    assert not opt.param_groups[0]["fused"]


def test_no_params_is_an_error():
    with pytest.raises(Phase7Error, match="no parameters"):
        build_adamw(AdamWConfig(), params=[])


def test_first_step_matches_closed_form():
    # Step 1 of AdamW: m_hat = g, v_hat = g^2, so p <- p (1 - lr wd) - lr g / (|g| + eps).
    lr, wd, eps = 0.1, 0.2, 1e-8
    w = nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    b = nn.Parameter(torch.tensor([1.0, -1.0]))
    groups = [{"params": [w]}, {"params": [b], "weight_decay": 0.0}]
    opt = build_adamw(AdamWConfig(lr=lr, weight_decay=wd, eps=eps), params=groups)
    gw, gb = torch.tensor([[0.3, -0.1], [2.0, -4.0]]), torch.tensor([0.5, 0.25])
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), w0 * (1 - lr * wd) - lr * gw / (gw.abs() + eps))
    torch.testing.assert_close(b.detach(), b0 - lr * gb / (gb.abs() + eps))


def test_recipe_table_structures_strictly():
    from phase7fw.plugins import load_plugins
    from phase7fw.recipe.convert import structure_component

    reg = load_plugins().registry
    errors = []
    comp = structure_component({"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.99]}, "optimizer", reg, "optimizer", errors)
    assert errors == []
    assert comp.config == AdamWConfig(lr=1e-3, betas=(0.9, 0.99))
    errors = []
    structure_component({"name": "adamw", "betas": [0.9, 1.0], "lr": 0}, "optimizer", reg, "optimizer", errors)
    assert any(e.startswith("optimizer.betas:") for e in errors)
    assert any(e.startswith("optimizer.lr:") for e in errors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_fused_on_cuda():
    p = nn.Parameter(torch.zeros(4, 4, device="cuda"))
    opt = build_adamw(AdamWConfig(), params=[p])
    assert opt.param_groups[0]["fused"] is True

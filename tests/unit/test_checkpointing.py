"""Activation checkpointing of the blocks (phase7fw/components/checkpointing.py): every policy and
period gives the loss and gradients of the model without it; "full" reruns the blocks' matmuls
in backward and "save_matmuls" does not; the recipe keys are validated and reach the model."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from phase7fw.core import memory
from phase7fw.core.build import build_model
from phase7fw.errors import Phase7Error, RecipeError
from phase7fw.interfaces import LanguageModel
from phase7fw.recipe import load_recipe
from tests.conftest import RECIPES

MODELS = {
    "llama": ("llama_tiny", {"model.n_layers": 3, "model.seq_len": 32}),
    "phase7": ("phase7_tiny", {"model.n_layers": 3, "model.seq_len": 32}),
    "phase8": ("phase8_tiny", {"model.n_layers": 3, "model.seq_len": 32}),
}
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default}


class CountOps(TorchDispatchMode):
    """Counts the dispatched ops for which ``counted(op)`` is true."""

    def __init__(self, counted):
        super().__init__()
        self.counted, self.n = counted, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += bool(self.counted(func))
        return func(*args, **(kwargs or {}))


def _run(kind, setting):
    """Loss, gradients and the matmuls run during backward, with ``setting`` = (policy, every)
    or None for no checkpointing."""
    name, over = MODELS[kind]
    torch.manual_seed(0)
    model = build_model(load_recipe(RECIPES / f"{name}.toml", over), "cpu", vocab_size=300).train()
    if setting is not None:
        model.enable_activation_checkpointing(*setting)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    loss, _ = model.loss(ids, torch.roll(ids, -1, dims=1))
    counter = CountOps(MATMULS.__contains__)
    with counter:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, counter.n


@pytest.mark.parametrize("kind", MODELS)
def test_every_setting_gives_the_loss_and_gradients_without_checkpointing(kind):
    ref_loss, ref_grads, plain_matmuls = _run(kind, None)
    counts = {}
    for setting in [("full", 1), ("save_matmuls", 1), ("full", 2), ("save_matmuls", 2)]:
        loss, grads, counts[setting] = _run(kind, setting)
        assert torch.equal(loss, ref_loss), (setting, loss, ref_loss)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=f"{setting} {name}")
    # full reruns every block's forward matmuls in backward; every 2nd block of 3: two of them
    per_block = (counts[("full", 1)] - plain_matmuls) / 3
    assert per_block >= 3 and per_block == int(per_block), counts  # projections in and out, the FFN
    assert counts[("full", 2)] - plain_matmuls == 2 * per_block, counts
    # save_matmuls keeps the matmul outputs: backward runs no more matmuls than without checkpointing
    assert counts[("save_matmuls", 1)] == counts[("save_matmuls", 2)] == plain_matmuls, counts


def test_the_recipe_keys_are_validated():
    with pytest.raises(RecipeError, match=r"train.checkpoint_policy: .*'save_everything'"):
        load_recipe(RECIPES / "phase7_tiny.toml", {"train.activation_checkpointing": True,
                                                   "train.checkpoint_policy": "save_everything"})
    with pytest.raises(RecipeError, match=r"train.checkpoint_every"):
        load_recipe(RECIPES / "phase7_tiny.toml", {"train.activation_checkpointing": True, "train.checkpoint_every": 0})
    with pytest.raises(RecipeError, match=r"without train.activation_checkpointing = true"):
        load_recipe(RECIPES / "phase7_tiny.toml", {"train.checkpoint_policy": "save_matmuls"})


def test_the_engine_hands_the_keys_to_the_model_and_names_a_model_that_takes_none():
    recipe = load_recipe(RECIPES / "phase7_tiny.toml", {"train.activation_checkpointing": True,
                                                        "train.checkpoint_policy": "save_matmuls",
                                                        "train.checkpoint_every": 2})
    model = build_model(recipe, "meta", vocab_size=300)
    memory.setup_checkpointing(SimpleNamespace(recipe=recipe, model=model))
    assert (model.checkpointing.policy, model.checkpointing.every) == ("save_matmuls", 2)

    class OldModel(LanguageModel):  # written before the two keys existed
        def enable_activation_checkpointing(self):
            self.on = True

    old = OldModel()
    plain = load_recipe(RECIPES / "phase7_tiny.toml", {"train.activation_checkpointing": True})
    memory.setup_checkpointing(SimpleNamespace(recipe=plain, model=old))
    assert old.on
    with pytest.raises(Phase7Error, match=r"OldModel takes no train.checkpoint_policy"):
        memory.setup_checkpointing(SimpleNamespace(recipe=recipe, model=old))


def test_the_compiled_backward_keeps_what_the_policy_saves():
    """Each block compiled as the engine compiles them (``block.compile()``): the checkpoint is
    traced into the block's graph, so the compiled backward itself recomputes ("full": more
    matmuls than without checkpointing) or keeps the matmul outputs ("save_matmuls": as many),
    with the gradients of the eager model."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    def backward_matmuls(setting):
        name, over = MODELS["llama"]
        torch.manual_seed(0)
        model = build_model(load_recipe(RECIPES / f"{name}.toml", {**over, "model.n_layers": 2}), "cpu",
                            vocab_size=300).train()
        if setting is not None:
            model.enable_activation_checkpointing(*setting)
        counted, graphs = [], []

        def backend(gm, example_inputs):
            graphs.append(gm)

            def bw_compiler(graph, _):
                counted.append(sum(n.op == "call_function" and n.target in MATMULS for n in graph.graph.nodes))
                return make_boxed_func(graph.forward)

            return aot_module_simplified(gm, example_inputs, fw_compiler=lambda g, _: make_boxed_func(g.forward),
                                         bw_compiler=bw_compiler, partition_fn=min_cut_rematerialization_partition)

        torch._dynamo.reset()
        for block in model.blocks:
            block.compile(backend=backend)
        ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
        model.loss(ids, torch.roll(ids, -1, dims=1))[0].backward()
        grads = [p.grad for p in model.parameters()]
        assert len(graphs) == 1, "both blocks must share one compiled graph (no recompile per block)"
        return sum(counted), grads

    (plain, ref), (full, g_full), (selective, g_sel) = (backward_matmuls(s) for s in
                                                        (None, ("full", 1), ("save_matmuls", 1)))
    assert full > plain > 0 and selective == plain, (plain, full, selective)
    for a, b, c in zip(ref, g_full, g_sel):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-7)

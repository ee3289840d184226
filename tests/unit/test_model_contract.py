"""Every model is checked against the model contract (phase7fw/interfaces.py) when it is built:
a plugin model that lacks a method gets one error naming each missing method."""

import attrs
import pytest
import torch
from torch import nn

from phase7fw import build_model, hookimpl
from phase7fw.errors import Phase7Error
from phase7fw.interfaces import LanguageModel, ModelContract
from phase7fw.plugins import load_plugins


@attrs.frozen
class Cfg:
    seq_len: int = 8


class Bare(nn.Module):
    """A model that only maps ids to logits."""

    def __init__(self, vocab_size, seq_len):
        super().__init__()
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.head = nn.Embedding(vocab_size, vocab_size)

    def forward(self, input_ids):
        return self.head(input_ids)


class HalfCached(LanguageModel, Bare):
    """A complete model (the LanguageModel defaults) with half of the cached-decoding protocol."""

    def init_cache(self, batch_size=1):
        return None


def _plugin(cls):
    class Plugin:
        @hookimpl
        def register_components(self, register):
            register("model", "custom", lambda config, vocab_size, **context: cls(vocab_size, config.seq_len), Cfg)

    return Plugin()


def _build(cls):
    plugins = load_plugins(extra=[_plugin(cls)])
    return build_model({"model": {"name": "custom"}}, "meta", plugins=plugins, vocab_size=16)


def test_a_model_without_the_contract_is_refused_naming_what_it_lacks():
    with pytest.raises(Phase7Error) as err:
        _build(Bare)
    msg = str(err.value)
    assert msg.startswith("model 'custom' (Bare) does not fulfil the model contract")
    for name in ("loss", "init_weights", "begin_step", "finish_backward", "set_curvature", "flops_per_token"):
        assert name in msg
    assert "vocab_size" not in msg and "forward," not in msg  # what it has is not listed


def test_half_a_decoding_protocol_is_named():
    with pytest.raises(Phase7Error, match=r"implements CachedDecoding only in part: forward_cached missing"):
        _build(HalfCached)


@pytest.mark.parametrize("recipe", ["llama_tiny.toml", "phase7_tiny.toml", "phase8_tiny.toml"])
def test_built_in_models_fulfil_the_contract(recipe):
    from tests.conftest import RECIPES

    model = build_model(str(RECIPES / recipe), "meta")
    assert isinstance(model, ModelContract)
    flops = model.flops_per_token(model.seq_len)
    assert flops["total"] == flops["matmul"] + flops["attention"] + flops["ssm"] > 0
    assert model.block_activation_bytes_per_token(model.seq_len) > 30 * model.d_model
    assert torch.device("meta") == next(model.parameters()).device

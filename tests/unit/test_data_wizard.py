"""`phase7fw recipe new` pieces: the component spec syntax, token budgets, presets."""

from __future__ import annotations

import pytest

from phase7fw.errors import Phase7Error
from phase7fw.plugins import load_plugins
from phase7fw.cli.wizard import find_presets, parse_spec, parse_tokens, preset_path

REGISTRY = load_plugins().registry


@pytest.mark.parametrize("spec, table", [
    ("python_stdlib", {"name": "python_stdlib"}),
    ("python_stdlib:1.0", {"name": "python_stdlib", "weight": 1.0}),
    ("python_stdlib:max_files=40:include_tests=false:2",
     {"name": "python_stdlib", "max_files": 40, "include_tests": False, "weight": 2.0}),
    ("text_files:paths=data/*.txt,more/**/*.md:0.5",
     {"name": "text_files", "paths": ["data/*.txt", "more/**/*.md"], "weight": 0.5}),
    ("hf_dataset:path=user/corpus:config=en:split=train[:10%]:text_field=content",
     {"name": "hf_dataset", "path": "user/corpus", "config": "en", "split": "train[:10%]", "text_field": "content"}),
    ("hf_dataset:path=json:data_files=a.jsonl:config=123:3e-1",  # str options stay text
     {"name": "hf_dataset", "path": "json", "data_files": ["a.jsonl"], "config": "123", "weight": 0.3}),
])
def test_source_specs(spec, table):
    assert parse_spec(spec, "data_source", REGISTRY, with_weight=True) == table


def test_tokenizer_spec_and_errors():
    assert parse_spec("bpe:vocab_size=4096", "tokenizer", REGISTRY, with_weight=False) == {"name": "bpe", "vocab_size": 4096}
    with pytest.raises(Phase7Error, match="unknown data_source 'pyhton_stdlib'; registered: hf_dataset"):
        parse_spec("pyhton_stdlib:1", "data_source", REGISTRY, with_weight=True)
    with pytest.raises(Phase7Error, match=r"text_files has no option 'path' \(options: paths\)"):
        parse_spec("text_files:path=x", "data_source", REGISTRY, with_weight=True)
    with pytest.raises(Phase7Error, match="expected NAME"):
        parse_spec(":1", "data_source", REGISTRY, with_weight=True)


@pytest.mark.parametrize("text, n", [("50M", 50_000_000), ("1.5B", 1_500_000_000), ("200k", 200_000),
                                     ("1e6", 1_000_000), ("1_000", 1000), ("2T", 2 * 10**12)])
def test_token_budgets(text, n):
    assert parse_tokens(text) == n


@pytest.mark.parametrize("text", ["", "fifty", "5X", "-3M", "0"])
def test_bad_token_budgets(text):
    with pytest.raises(Phase7Error, match="--tokens"):
        parse_tokens(text)


def test_presets_are_the_shipped_recipes():
    presets = find_presets()
    assert {"phase7_tiny", "phase7_small", "phase7_1b", "phase7_1.5b", "llama_tiny"} <= set(presets)
    assert preset_path("phase7_small") == presets["phase7_small"]
    with pytest.raises(Phase7Error, match="no such preset or recipe file; presets: "):
        preset_path("phase9_huge")

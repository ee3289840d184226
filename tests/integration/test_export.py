"""phase7fw export / import-hf: Hugging Face folders that transformers loads with phase7fw's logits.

The models are the shipped tiny recipes' (so a change to the model maths that the exported
modeling file does not follow fails here), trained a few steps so no weight sits at its init.
"""

import json
import os
import subprocess
import sys
from importlib.util import find_spec

import pytest
import torch

from phase7fw import Engine
from phase7fw.core.checkpoint import load_checkpoint
from phase7fw.export.hf import export_checkpoint, import_folder
from tests.conftest import RECIPES, run_cli

pytestmark = pytest.mark.skipif(find_spec("transformers") is None or find_spec("safetensors") is None,
                                reason="needs the export extra: pip install 'phase7fw[export]'")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _offline(tmp_path_factory):
    """No network, and transformers' copies of remote code in a temporary folder (not ~/.cache):
    set before transformers is first imported, which reads HF_MODULES_CACHE then."""
    env = {**OFFLINE, "HF_MODULES_CACHE": str(tmp_path_factory.mktemp("hf-modules"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _train(tmp_path, recipe, **extra):
    over = {"run.output_dir": str(tmp_path), "train.max_steps": 3, "train.batch_size": 2, "train.log_every": 1,
            "train.eval_every": 0, "train.save_every": 0, "train.eval_batches": 1,
            "data.sources": [{"name": "python_stdlib", "max_files": 20}], **extra}
    engine = Engine.from_recipe(RECIPES / recipe, over, quiet=True)
    engine.fit()
    return engine, tmp_path / f"{engine.model_name}_final.pt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The shipped tiny llama and phase7 (curvature mid warm-up, so kappa is neither 0.1 nor 1)."""
    base = tmp_path_factory.mktemp("trained")
    return {"llama": _train(base / "llama", "llama_tiny.toml"),
            "phase7": _train(base / "phase7", "phase7_tiny.toml", **{"curvature_scheduler.warmup_steps": 6})}


def _tokens(engine, n=2):
    text = (RECIPES.parent / "phase7fw" / "core" / "engine.py").read_text()[: 4 * engine.seq_len]
    ids = engine.tokenizer.encode(text)
    T = engine.seq_len
    return torch.tensor([ids[i * T:(i + 1) * T] for i in range(n)])


def _hf_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model, model(ids).logits


def _max_diff(engine, folder):
    ids = _tokens(engine)
    with torch.no_grad():
        ours = engine.model(ids)
    model, theirs = _hf_logits(folder, ids)
    return model, float((ours - theirs).abs().max()), ids


@pytest.mark.parametrize("kind", ["llama", "phase7"])
def test_export_round_trip_logits_generate_tokenizer_card(trained, tmp_path, kind):
    engine, ckpt = trained[kind]
    engine = Engine.from_checkpoint(ckpt)
    out = export_checkpoint(ckpt, tmp_path / "hf", log=lambda _: None)
    names = sorted(p.name for p in out.iterdir())
    expected = ["README.md", "config.json", "generation_config.json", "model.safetensors", "phase7fw.json",
                "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert names == sorted(expected + (["modeling_phase7fw.py"] if kind == "phase7" else []))
    config = json.loads((out / "config.json").read_text())
    if kind == "llama":
        assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config  # native
    else:
        assert config["curvature"] == pytest.approx(engine.curvature_scheduler.value(engine.step))
        assert 0.1 < config["curvature"] < 1.0

    model, diff, ids = _max_diff(engine, out)
    assert type(model).__name__ == ("LlamaForCausalLM" if kind == "llama" else "Phase7fwForCausalLM")
    assert diff < TOL

    # generate works and picks the tokens phase7fw picks (greedy, after the document-start EOS)
    prompt = "def main("
    ours = engine.generate(prompt, max_new_tokens=8, temperature=0.0)
    start = torch.tensor([[engine.tokenizer.eos_id] + engine.tokenizer.encode(prompt)])
    new = model.generate(start, max_new_tokens=8, do_sample=False)[0, start.shape[1]:]
    assert engine.tokenizer.decode(new.tolist()) == ours

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    text = "héllo ✓ wörld\n\tdef f(x): return x"
    assert tok(text, add_special_tokens=False).input_ids == engine.tokenizer.encode(text)
    assert tok.eos_token_id == engine.tokenizer.eos_id and tok.decode(engine.tokenizer.encode(text)) == text

    card = (out / "README.md").read_text()
    total = engine.model.parameter_breakdown()["total"]
    assert f"| total | {total:,} |" in card and f"training tokens (this run): {engine.tokens_seen:,}" in card
    assert "[model]" in card and f"{engine.last_val['loss']:.4f} nats/token" in card
    assert "bits per byte" in card


def test_phase7_variants_and_bf16(tmp_path):
    """The other components of the modeling file: dense tied embedding, sdpa window, 3-core HTT, SSM-only."""
    variants = [
        {"model.embedding": {"name": "dense"}, "model.tie_embeddings": True,
         "model.attention": {"name": "sdpa", "window": 16}},
        {"model.embedding": {"name": "htt", "n_cores": 3, "rank": 8}, "model.tie_embeddings": True,
         "model.mixer": "ssm", "model.ssm.output_gate": False, "model.ssm.expand": 2},
        {"model.mixer": "attention", "model.ssm": {"name": "none"}},
    ]
    # Options the model may have gained (the modeling file implements them; a recipe can only
    # set them where the component declares them).
    import attrs

    from phase7fw.components.phase7.attention import HyperbolicAttentionConfig
    from phase7fw.components.phase7.ssm import ArSsmConfig

    if "score" in attrs.fields_dict(HyperbolicAttentionConfig):
        variants += [{"model.attention.score": "squared_distance"}, {"model.attention.score": "dot_distance"}]
    if "qk_norm" in attrs.fields_dict(HyperbolicAttentionConfig):
        variants += [{"model.attention.qk_norm": flag, "model.attention.score": score}
                     for flag, score in ((True, "distance"), (False, "dot_distance"), (True, "dot_distance"))]
        variants += [{"model.attention": {"name": "sdpa", "window": 16, "qk_norm": True}}]
    variants += [{"model.block": {"name": "hybrid", "mix": mix}} for mix in ("sum", "alternate")]
    variants += [{"model.block": {"name": "hybrid", "ssm_every": 2}}]
    if {"discretize", "out_norm"} <= set(attrs.fields_dict(ArSsmConfig)):
        variants += [{"model.ssm.discretize": flag, "model.ssm.out_norm": not flag} for flag in (True, False)]
    for i, over in enumerate(variants):
        engine, ckpt = _train(tmp_path / f"v{i}", "phase7_tiny.toml", **{"train.max_steps": 1, **over})
        out = export_checkpoint(ckpt, tmp_path / f"hf{i}", log=lambda _: None)
        _, diff, _ = _max_diff(engine, out)
        assert diff < TOL, (over, diff)
    # bf16: the weights are the fp32 ones rounded once
    out = export_checkpoint(ckpt, tmp_path / "bf16", dtype="bf16", log=lambda _: None)
    from safetensors.torch import load_file

    tensors = load_file(str(out / "model.safetensors"))
    state = engine.model.state_dict()
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert all(torch.equal(tensors[k], state[k].to(torch.bfloat16)) for k in tensors)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_unknown_option_is_refused_not_ignored(trained, tmp_path):
    _, ckpt = trained["phase7"]
    out = export_checkpoint(ckpt, tmp_path / "hf", log=lambda _: None)
    config = json.loads((out / "config.json").read_text())
    config["phase7"]["attention"]["future_option"] = "something new"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not implement the option\(s\) \[.future_option.\]"):
        _hf_logits(out, torch.zeros(1, 4, dtype=torch.long))


def test_exported_folder_works_without_phase7fw(trained, tmp_path):
    engine, ckpt = trained["phase7"]
    out = export_checkpoint(ckpt, tmp_path / "hf", log=lambda _: None)
    ids = _tokens(engine, 1)
    with torch.no_grad():
        expected = Engine.from_checkpoint(ckpt).model(ids)
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = f"""
import sys, torch
sys.modules["phase7fw"] = None  # any import of phase7fw fails
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32)
e = torch.load({str(tmp_path / "expected.pt")!r})
with torch.no_grad():
    print("MAXDIFF", float((m(e["ids"]).logits - e["logits"]).abs().max()))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, **OFFLINE})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split("MAXDIFF")[1]) < TOL


def test_import_round_trip_resumes_and_finetunes(trained, tmp_path):
    engine, ckpt = trained["phase7"]
    out = export_checkpoint(ckpt, tmp_path / "hf", dtype="fp32", log=lambda _: None)
    proc = run_cli("import-hf", out, "--output", tmp_path / "back.pt", env=OFFLINE)
    assert proc.returncode == 0, proc.stderr
    back, original = load_checkpoint(tmp_path / "back.pt"), load_checkpoint(ckpt)
    assert back["step"] == original["step"] and back["tokenizer_fingerprint"] == original["tokenizer_fingerprint"]
    assert back["curvature_offset"] == original["curvature_offset"]
    assert back["metrics"]["tokens_seen"] == original["metrics"]["tokens_seen"]
    assert back["model"].keys() == original["model"].keys()
    assert all(torch.equal(back["model"][k], original["model"][k]) for k in original["model"])
    # it resumes (step, LR schedule position) ...
    run = tmp_path / "resumed"
    over = {"run.output_dir": str(run), "train.max_steps": original["step"] + 1, "train.batch_size": 2,
            "train.eval_every": 0, "train.save_every": 0, "train.eval_batches": 1,
            "curvature_scheduler.warmup_steps": 6, "data.sources": [{"name": "python_stdlib", "max_files": 20}]}
    resumed = Engine.from_recipe(RECIPES / "phase7_tiny.toml", over, resume=str(tmp_path / "back.pt"), quiet=True)
    assert resumed.step == original["step"]
    assert resumed.lr_scheduler.get_last_lr() == pytest.approx(engine.lr_scheduler.get_last_lr())
    assert resumed.fit()["steps"] == original["step"] + 1
    # ... and fine-tunes: init_from of the folder loads the same weights
    ft = Engine.from_recipe(RECIPES / "phase7_tiny.toml", {**over, "run.output_dir": str(tmp_path / "ft"),
                                                          "train.init_from": str(out)}, quiet=True)
    assert ft.step == 0 and ft.init_record["path"] == str(out)
    assert all(torch.equal(ft.model.state_dict()[k], original["model"][k]) for k in original["model"])


def test_llama_import_restores_the_fused_weights(trained, tmp_path):
    _, ckpt = trained["llama"]
    out = export_checkpoint(ckpt, tmp_path / "hf", log=lambda _: None)
    import_folder(out, tmp_path / "back.pt", log=lambda _: None)
    back, original = load_checkpoint(tmp_path / "back.pt")["model"], load_checkpoint(ckpt)["model"]
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)


def test_export_cli_errors_exit_2(trained, tmp_path):
    _, ckpt = trained["llama"]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    proc = run_cli("export", ckpt, "--output", tmp_path / "busy", env=OFFLINE)
    assert proc.returncode == 2 and "is not empty" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
    proc = run_cli("export", tmp_path / "missing.pt", "--output", tmp_path / "o", env=OFFLINE)
    assert proc.returncode == 2 and "checkpoint not found" in proc.stderr
    proc = run_cli("import-hf", tmp_path / "busy", "--output", tmp_path / "b.pt", env=OFFLINE)
    assert proc.returncode == 2 and "no phase7fw.json" in proc.stderr
    proc = run_cli("export", ckpt, "--output", tmp_path / "ok", "--check", env=OFFLINE)
    assert proc.returncode == 0 and "check: transformers' logits differ from phase7fw's by at most" in proc.stdout

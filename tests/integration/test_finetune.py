"""Fine-tuning: train.init_from (weights only, step 0, fresh optimizer) and train.freeze."""

import json
import shutil

import pytest
import torch

from phase7fw import Engine
from phase7fw.core.checkpoint import load_checkpoint
from phase7fw.errors import CheckpointError
from phase7fw.core.finetune import check_weights
from phase7fw.core.trainer import Trainer
from tests.conftest import RECIPES, run_cli, tiny_overrides

# A small phase7 whose curvature warm-up (4 steps) is over when the source stops (6 steps):
# fine-tuning must continue at the source's curvature, not restart the warm-up.
PHASE7 = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.seq_len": 32,
          "model.embedding.rank": 4, "model.attention.window": 16, "model.ssm.n_heads": 2,
          "model.ssm.max_rank": 4, "model.ssm.min_rank": 1, "model.ssm.chunk_size": 8,
          "curvature_scheduler.warmup_steps": 4, "model.ffn_hidden": 64}


def _source(tmp_path, recipe="phase7_tiny.toml", **extra):
    over = tiny_overrides(tmp_path / "src", **{**(PHASE7 if recipe.startswith("phase7") else {}), **extra})
    engine = Engine.from_recipe(RECIPES / recipe, over, quiet=True)
    engine.fit()
    return engine, tmp_path / "src" / "run" / f"{engine.model_name}_final.pt"


def _text_files(tmp_path):
    docs = tmp_path / "mydata"
    docs.mkdir(exist_ok=True)
    for i in range(4):
        (docs / f"{i}.txt").write_text(f"# my own text {i}\n" + "def f(x):\n    return x * 2\n" * 60)
    return [{"name": "text_files", "paths": [str(docs / "*.txt")]}]


def _finetune_overrides(tmp_path, ckpt, recipe="phase7_tiny.toml", **extra):
    over = tiny_overrides(tmp_path / "ft", **{**(PHASE7 if recipe.startswith("phase7") else {}),
                                              "train.init_from": str(ckpt), "data.sources": _text_files(tmp_path),
                                              "data.val_fraction": 0.1, **extra})
    return over


def test_finetune_starts_at_step_0_from_the_weights(tmp_path):
    source, ckpt = _source(tmp_path)
    assert source.curvature_scheduler.value(source.step) != source.curvature_scheduler.value(0)
    ft = Engine.from_recipe(RECIPES / "phase7_tiny.toml", _finetune_overrides(tmp_path, ckpt), quiet=True)
    assert ft.step == 0 and ft.tokens_seen == 0 and ft.train_sampler.position == 0
    assert not ft.optimizer.state  # fresh: no moments
    assert ft.optimizer.param_groups[0]["lr"] == ft.lr_scheduler.get_last_lr()[0]
    src_weights = load_checkpoint(ckpt)["model"]
    for name, tensor in ft.model.state_dict().items():
        assert torch.equal(tensor, src_weights[name]), name
    # The curvature continues from the source's last step.
    assert ft.curvature_scheduler.value(0) == source.curvature_scheduler.value(source.step)

    # First loss = the source model's loss on that batch (the weights are really loaded).
    x, y = ft.train_sampler.batch(0)
    reference = Engine.from_checkpoint(ckpt)
    with torch.no_grad():
        expected, _ = reference.model.loss(x, y)
    result = Trainer(ft).train_step()
    assert result["loss"] == pytest.approx(float(expected), rel=1e-6)
    assert ft.step == 1

    summary = ft.fit()
    final = load_checkpoint(summary["final_checkpoint"])
    assert final["init_from"]["path"] == str(ckpt) and final["init_from"]["step"] == source.step
    assert final["curvature_offset"] == source.step
    assert final["metrics"]["tokens_seen"] == ft.tokens_seen  # this run's tokens only


def test_resuming_a_finetune_run_is_bit_identical_and_needs_no_source(tmp_path):
    _, ckpt = _source(tmp_path, "llama_tiny.toml")
    recipe = RECIPES / "llama_tiny.toml"
    full = Engine.from_recipe(recipe, _finetune_overrides(tmp_path, ckpt, "llama_tiny.toml",
                                                          **{"run.output_dir": str(tmp_path / "a")}), quiet=True)
    full.fit()
    b = tmp_path / "b"
    b.mkdir()
    shutil.copy(tmp_path / "a" / "llama_step_3.pt", b)
    ckpt.unlink()  # the source is gone: a resumed run does not read it again
    resumed = Engine.from_recipe(recipe, _finetune_overrides(tmp_path, ckpt, "llama_tiny.toml",
                                                             **{"run.output_dir": str(b)}), quiet=True)
    assert resumed.step == 3 and resumed.init_record["path"] == str(ckpt)
    resumed.fit()

    def train_rows(folder):
        rows = [json.loads(r) for r in (folder / "training_log.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if r["split"] == "train" and r["step"] > 3]

    assert train_rows(b) == train_rows(tmp_path / "a")


def test_freeze_keeps_matching_parameters_fixed(tmp_path):
    _, ckpt = _source(tmp_path, "llama_tiny.toml")
    over = _finetune_overrides(tmp_path, ckpt, "llama_tiny.toml", **{"train.freeze": ["tok_embeddings.*", "*norm*"],
                                                                     "train.max_steps": 2})
    ft = Engine.from_recipe(RECIPES / "llama_tiny.toml", over, quiet=True)
    before = {k: v.clone() for k, v in ft.model.state_dict().items()}
    ft.fit()
    after = ft.model.state_dict()
    for name in before:
        frozen = name.startswith("tok_embeddings.") or "norm" in name
        assert torch.equal(before[name], after[name]) == frozen, name
    assert ft.frozen[0] == sum(p.numel() for n, p in ft.model.named_parameters() if not p.requires_grad)


def test_check_weights_names_the_first_differing_keys(tmp_path):
    source, ckpt = _source(tmp_path, "llama_tiny.toml", **{"train.max_steps": 1})
    weights = dict(load_checkpoint(ckpt)["model"])
    weights["norm.weight"] = torch.zeros(7)
    del weights["output.weight"]
    with pytest.raises(CheckpointError, match=r"norm\.weight: source \(7,\), model \(32,\); output\.weight: missing"):
        check_weights(source.model, weights, "here")


def _error(proc):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_mismatches_exit_2_with_the_differing_keys(tmp_path):
    from phase7fw.errors import Phase7Error

    _, ckpt = _source(tmp_path, "llama_tiny.toml", **{"train.max_steps": 1})
    base = tiny_overrides(tmp_path / "x", **{"train.init_from": str(ckpt)})

    def error(recipe="llama_tiny.toml", **over):
        with pytest.raises(Phase7Error) as info:
            Engine.from_recipe(RECIPES / recipe, {**base, **over}, quiet=True)
        return str(info.value)

    assert "model.ffn_hidden: source 64, recipe 48" in error(**{"model.ffn_hidden": 48})
    assert ("model.vocab_size: source 0, recipe 300; model.tie_embeddings: source False, recipe True"
            in error(**{"model.vocab_size": 300, "model.tie_embeddings": True}))
    assert "data.tokenizer.name: source 'bytes', recipe 'bpe'" in error(**{"data.tokenizer": {"name": "bpe"}})
    assert "holds a 'llama' model, the recipe builds 'phase7'" in error("phase7_tiny.toml")
    assert "train.freeze: 'nothing.*' matches no parameter" in error(**{"train.freeze": ["nothing.*"]})
    assert "train.init_from: no such file or folder 'no/such.pt'" in error(**{"train.init_from": "no/such.pt"})
    # the command line: exit code 2, the message, no traceback
    proc = run_cli("run", RECIPES / "llama_tiny.toml", "--set", f"train.init_from={json.dumps(str(ckpt))}",
                   "--set", f"run.output_dir={json.dumps(str(tmp_path / 'y'))}")
    err = _error(proc)
    assert "does not match the recipe: model.d_model: source 32, recipe 128" in err


def test_eval_of_a_checkpoint_uses_the_curvature_of_its_step(tmp_path):
    source, ckpt = _source(tmp_path)
    summary_val = source.last_val["loss"]
    again = Engine.from_checkpoint(ckpt, with_data=True)
    assert again.model.blocks[0].attn.kappa.item() == pytest.approx(source.curvature_scheduler.value(source.step))
    assert again.evaluate()["loss"] == pytest.approx(summary_val, rel=1e-6)


def test_the_shipped_example_finetunes_the_quickstart_model(tmp_path):
    """recipes/finetune_example.toml as README and docs/finetune.md run it (make finetune-phase7),
    from a folder holding runs/phase7_quickstart and data/finetune/*.txt (relative paths)."""
    quick = {"run.output_dir": str(tmp_path / "runs" / "phase7_quickstart"), "train.max_steps": 1,
             "train.batch_size": 2, "train.eval_every": 0, "train.save_every": 0, "train.eval_batches": 1,
             "data.sources": [{"name": "python_stdlib", "max_files": 20}]}
    Engine.from_recipe(RECIPES / "phase7_quickstart.toml", quick, quiet=True).fit()
    (tmp_path / "data").mkdir()
    _text_files(tmp_path / "data")
    (tmp_path / "data" / "mydata").rename(tmp_path / "data" / "finetune")
    proc = run_cli("run", RECIPES / "finetune_example.toml", "--set", "train.max_steps=2", "--set",
                   "train.batch_size=2", "--set", "train.eval_batches=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Fine-tuning from runs/phase7_quickstart/phase7_best.pt (its step 1)" in proc.stdout, proc.stdout
    assert (tmp_path / "runs" / "phase7_finetune" / "phase7_final.pt").is_file()
    assert " | BPB: " in proc.stdout

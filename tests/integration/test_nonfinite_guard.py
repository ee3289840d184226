"""No non-finite weights on disk: non-finite floats are invalid recipes, a checkpoint is never
written with NaN/Inf weights, and the non-finite stop exits 2 naming the last good checkpoint."""

import pytest
import torch

from phase7fw.core.checkpoint import load_checkpoint
from phase7fw.cli import main
from phase7fw.errors import RecipeError
from phase7fw.recipe import load_recipe
from tests.conftest import RECIPES, run_cli

TINY = RECIPES / "llama_tiny.toml"
SMALL = ["--dummy-data", "--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
         "--set", "model.seq_len=32", "--set", "model.ffn_hidden=64", "--set", "train.batch_size=2",
         "--set", "train.log_every=1", "--set", "train.eval_every=0"]


def test_an_infinite_learning_rate_is_an_invalid_recipe(tmp_path):
    proc = run_cli("run", TINY, *SMALL, "--set", "optimizer.lr=inf", "--set", f"run.output_dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "optimizer.lr: must be a finite number, got inf" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written
    for key, value in [("optimizer.lr", float("nan")), ("lr_scheduler.min_lr", float("-inf")),
                       ("train.grad_clip", float("inf")), ("data.sources", [{"name": "synthetic", "weight": float("nan")}])]:
        with pytest.raises(RecipeError, match="must be a finite number, got"):
            load_recipe(TINY, {key: value})


POISON = """
import attrs, torch
from phase7fw import hookimpl
from phase7fw.interfaces import Callback

class Poison(Callback):
    def on_step_end(self, engine, row):
        if row["step"] == 3:  # the weights go bad after the update of step 3
            with torch.no_grad():
                next(engine.model.parameters()).fill_(float("nan"))

@hookimpl
def register_components(register):
    register("callback", "poison", lambda c: Poison(), attrs.make_class("C", {}, frozen=True))
"""


def test_nan_weights_are_never_saved_and_the_stop_names_the_last_good_checkpoint(tmp_path, fake_dist, capsys):
    fake_dist("poison-plugin", POISON)
    out = tmp_path / "run"
    code = main(["run", str(TINY), *SMALL, "--set", f"run.output_dir={out}", "--set", "train.max_steps=20",
                 "--set", "train.save_every=2", "--set", "train.max_nonfinite_steps=2",
                 "--set", 'callbacks=[{name = "poison"}]'])
    captured = capsys.readouterr()
    assert code == 2
    last_good = out / "llama_step_2.pt"
    assert f"the last good checkpoint is {last_good}" in captured.err
    assert "stopping: 2 non-finite steps in a row" in captured.err
    assert "Not saving llama_step_4.pt: the weights hold NaN or Inf." in captured.out
    assert sorted(p.name for p in out.glob("*.pt")) == ["llama_step_2.pt"]
    state = load_checkpoint(last_good)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["model"].values())

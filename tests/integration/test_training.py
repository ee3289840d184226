"""End-to-end runs of the tiny llama recipe on the CPU: outputs, resume, NaN, Ctrl-C."""

import json
import math
import os
import re
import shutil
import signal

import pytest
import torch

from phase7fw import Engine, build_model, load_recipe
from phase7fw.core.checkpoint import load_checkpoint
from phase7fw.core.engine import BUILD_ORDER
from phase7fw.errors import CheckpointError, Phase7Error, TrainingAborted
from tests.conftest import RECIPES, tiny_overrides

TINY = RECIPES / "llama_tiny.toml"
LINE = re.compile(r"^Step +\d+ \| Loss: \d+\.\d{4} \| PPL: [\d.]+ \| LR: \d\.\d\de[-+]\d\d \| Grad: \d+\.\d{3} \| Time: \d+\.\d\ds")


def rows(run_dir, split="train"):
    lines = (run_dir / "training_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_tiny_run_trains_and_writes_pinned_outputs(tmp_path, capsys):
    engine = Engine.from_recipe(TINY, tiny_overrides(tmp_path, **{"train.max_steps": 30, "train.eval_every": 10,
                                                                  "train.save_every": 10}))
    summary = engine.fit()
    run = tmp_path / "run"
    out = capsys.readouterr().out
    step_lines = [l for l in out.splitlines() if l.startswith("Step")]
    assert len(step_lines) == 30 and all(LINE.match(l) for l in step_lines)
    assert step_lines[0].startswith("Step      1 | Loss: ")
    train = rows(run)
    assert [r["step"] for r in train] == list(range(1, 31))
    assert sum(r["loss"] for r in train[-5:]) / 5 < 0.75 * train[0]["loss"]  # single steps are noisy
    assert {"step", "split", "loss", "ppl", "lr", "grad_norm", "tokens_per_s"} <= set(train[0])
    val = rows(run, "val")
    assert [r["step"] for r in val] == [10, 20, 30]
    assert math.isclose(val[0]["ppl"], math.exp(val[0]["loss"]), rel_tol=1e-9)
    names = sorted(p.name for p in run.iterdir())
    assert names == ["llama_best.pt", "llama_final.pt", "llama_step_10.pt", "llama_step_20.pt", "llama_step_30.pt",
                     "resolved_recipe.toml", "training_log.jsonl"]
    assert load_recipe(run / "resolved_recipe.toml") == engine.recipe
    assert summary["steps"] == 30 and summary["best_val_loss"] == min(r["loss"] for r in val)
    assert engine.build_steps == list(BUILD_ORDER)
    best = load_checkpoint(run / "llama_best.pt")
    assert best["metrics"]["best_val_loss"] == summary["best_val_loss"]


def test_resume_is_bit_identical(tmp_path):
    full = Engine.from_recipe(TINY, tiny_overrides(tmp_path / "a", **{"train.grad_accum_steps": 2}))
    full.fit()
    reference = rows(tmp_path / "a" / "run")
    # A second run that only has the step-3 checkpoint, as if the first had died there.
    resumed_dir = tmp_path / "b" / "run"
    resumed_dir.mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "run" / "llama_step_3.pt", resumed_dir)
    engine = Engine.from_recipe(TINY, tiny_overrides(tmp_path / "b", **{"train.grad_accum_steps": 2}), resume="auto")
    assert engine.step == 3
    engine.fit()
    again = rows(resumed_dir)
    assert [r["step"] for r in again] == [4, 5, 6]
    for a, b in zip(reference[3:], again):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a["lr"] == b["lr"]
    final_a = load_checkpoint(tmp_path / "a" / "run" / "llama_final.pt")["model"]
    final_b = load_checkpoint(resumed_dir / "llama_final.pt")["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_resume_never_refuses_to_overwrite(tmp_path):
    Engine.from_recipe(TINY, tiny_overrides(tmp_path, **{"train.max_steps": 3})).fit()
    with pytest.raises(Phase7Error, match="already holds checkpoints.*--resume auto"):
        Engine.from_recipe(TINY, tiny_overrides(tmp_path), resume="never")


def test_resume_auto_log_has_no_duplicate_steps(tmp_path):
    Engine.from_recipe(TINY, tiny_overrides(tmp_path, **{"train.max_steps": 4, "train.save_every": 2})).fit()
    os.remove(tmp_path / "run" / "llama_final.pt")  # as if it died after step 4 was logged
    engine = Engine.from_recipe(TINY, tiny_overrides(tmp_path, **{"train.max_steps": 6}))
    assert engine.step == 4
    engine.fit()
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]


def test_build_order_is_the_order_the_steps_happen(tmp_path, monkeypatch):
    """BUILD_ORDER is checked against what actually runs: spies record each step's real work
    (plugins and recipe loaded, torch seeded, components built, kernels resolved, weights
    allocated, the first training forward) next to the labels the engine records, and each
    label must follow its own step's work and come before the next step's."""
    import phase7fw.core.engine as engine_module
    from phase7fw.registry import Registry

    log = []

    def spy(owner, name, step):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            log.append(("ran", step))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    kinds = {"tokenizer": "tokenizer", "data_source": "data", "model": "model", "optimizer": "optimizer",
             "lr_scheduler": "schedulers", "tracker": "trackers"}
    real_build = Registry.build

    def build(self, kind, name, config, **context):
        if kind in kinds:
            log.append(("ran", kinds[kind]))
        return real_build(self, kind, name, config, **context)

    monkeypatch.setattr(Registry, "build", build)
    spy(engine_module, "load_plugins", "plugins")
    spy(engine_module, "load_recipe", "recipe")
    spy(engine_module.torch, "manual_seed", "seed")
    spy(engine_module.Engine, "_select_kernels", "kernels")
    spy(engine_module, "materialize", "materialize")
    real_preflight = engine_module.Engine._preflight

    def preflight(self, *args, **kwargs):  # builds a meta model and an optimizer to check the machine
        start = len(log)
        real_preflight(self, *args, **kwargs)
        del log[start:]

    monkeypatch.setattr(engine_module.Engine, "_preflight", preflight)
    monkeypatch.setattr(engine_module.Engine, "_done",
                        lambda self, step: (self.build_steps.append(step), log.append(("label", step))))
    engine = Engine.from_recipe(TINY, tiny_overrides(tmp_path, **{"train.max_steps": 2}))
    loss_fn = engine._loss_fn

    def first_forward(*args, **kwargs):
        log.append(("ran", "loop"))
        return loss_fn(*args, **kwargs)

    engine._loss_fn = first_forward
    engine.fit()

    assert engine.build_steps == list(BUILD_ORDER)
    first = {}
    for i, (what, step) in enumerate(log):
        if what == "ran":
            first.setdefault(step, i)
    label_at = {step: i for i, (what, step) in enumerate(log) if what == "label"}
    ran = sorted(first, key=first.get)
    assert ran == [s for s in BUILD_ORDER if s in first]  # the work happens in the documented order
    for step in ran:  # and each label is recorded after its work, before the next step's work
        later = [first[s] for s in BUILD_ORDER[BUILD_ORDER.index(step) + 1:] if s in first]
        if step == "loop":  # the last label says the loop starts: after the trackers, before its first step
            assert first["trackers"] < label_at["loop"] < first["loop"], log
        elif step in ("plugins", "recipe"):  # inputs of the engine: recorded when it starts, before the seed
            assert first[step] < label_at[step] < first["seed"], log
        else:
            assert first[step] < label_at[step] < min(later, default=len(log)), (step, log)
    assert {"plugins", "recipe", "seed", "tokenizer", "kernels", "data", "model", "materialize", "optimizer",
            "schedulers", "trackers", "loop"} <= set(first)


def test_incompatible_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    Engine.from_recipe(TINY, tiny_overrides(tmp_path, **{"train.max_steps": 3})).fit()
    import phase7fw.core.engine

    def not_now(*args, **kwargs):
        raise AssertionError("data was read or weights allocated before the checkpoint was checked")

    monkeypatch.setattr(phase7fw.core.engine, "load_mix", not_now)
    monkeypatch.setattr(phase7fw.core.engine, "materialize", not_now)
    with pytest.raises(CheckpointError) as info:
        Engine.from_recipe(TINY, tiny_overrides(tmp_path, **{"model.d_model": 48}))
    msg = str(info.value)
    # in the recipe's terms (from the recipe stored in the checkpoint), not torch's
    assert "does not fit this recipe's model: model.d_model: 32 in the checkpoint, 48 in the recipe" in msg
    assert "resolved_recipe.toml --resume" in msg and "StateDictOptions" not in msg


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    engine = Engine.from_recipe(TINY, tiny_overrides(tmp_path))
    real = engine._loss_fn
    calls = {"n": 0}

    def flaky(x, y):
        calls["n"] += 1
        loss, metrics = real(x, y)
        return (loss * float("nan"), metrics) if calls["n"] in (2, 3) else (loss, metrics)

    engine._loss_fn = flaky
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    summary = engine.fit()
    assert summary["skipped_steps"] == 2 and summary["steps"] == 6
    log = rows(tmp_path / "run")
    skipped = [r["step"] for r in log if r.get("skipped")]
    assert skipped == [2, 3]
    assert all(math.isfinite(p.float().sum()) for p in engine.model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in engine.model.state_dict().items())


def test_too_many_nonfinite_steps_stop_the_run(tmp_path):
    engine = Engine.from_recipe(TINY, tiny_overrides(tmp_path, **{"train.max_nonfinite_steps": 2}))
    real = engine._loss_fn
    engine._loss_fn = lambda x, y: (real(x, y)[0] * float("inf"), {})
    with pytest.raises(TrainingAborted, match="2 non-finite steps in a row") as info:
        engine.fit()
    assert "llama_step_2.pt" in str(info.value)
    assert load_checkpoint(tmp_path / "run" / "llama_step_2.pt")["step"] == 2


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tmp_path):
    engine = Engine.from_recipe(TINY, tiny_overrides(tmp_path))
    real = engine._loss_fn
    calls = {"n": 0}

    def interrupt_on_second_step(x, y):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
        return real(x, y)

    engine._loss_fn = interrupt_on_second_step
    with pytest.raises(KeyboardInterrupt):
        engine.fit()
    state = load_checkpoint(tmp_path / "run" / "llama_step_2.pt")
    assert state["step"] == 2
    resumed = Engine.from_recipe(TINY, tiny_overrides(tmp_path))
    assert resumed.step == 2
    assert resumed.fit()["steps"] == 6


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    def one_step(batch, accum):
        e = Engine.from_recipe(TINY, tiny_overrides(tmp_path / f"{batch}x{accum}", **{
            "train.batch_size": batch, "train.grad_accum_steps": accum, "train.max_steps": 1,
            "train.grad_clip": 0.0}), quiet=True)
        x, y = e.train_sampler.batch(0)
        e.train_sampler.batch = lambda i, x=x, y=y, b=batch: (x[(i % accum) * b:(i % accum + 1) * b],
                                                              y[(i % accum) * b:(i % accum + 1) * b])
        return e

    big = Engine.from_recipe(TINY, tiny_overrides(tmp_path / "big", **{"train.batch_size": 4, "train.max_steps": 1,
                                                                       "train.grad_clip": 0.0}), quiet=True)
    x, y = big.train_sampler.batch(0)
    big.fit()
    small = one_step(2, 2)
    small.train_sampler.batch = lambda i: (x[(i % 2) * 2:(i % 2 + 1) * 2], y[(i % 2) * 2:(i % 2 + 1) * 2])
    small.fit()
    for (name, a), b in zip(big.model.named_parameters(), small.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_and_fp16_precision_run_on_cpu(tmp_path):
    first = {}
    for precision in ("fp32", "bf16", "fp16"):
        e = Engine.from_recipe(TINY, tiny_overrides(tmp_path / precision, **{"train.precision": precision,
                                                                              "train.max_steps": 3}), quiet=True)
        s = e.fit()
        assert math.isfinite(s["final_loss"])
        assert (e.scaler is not None) == (precision == "fp16")
        first[precision] = rows(tmp_path / precision / "run")[0]["loss"]
    # the same first batch and weights: 16-bit autocast gives the fp32 loss within its rounding
    assert first["bf16"] == pytest.approx(first["fp32"], rel=2e-2)
    assert first["fp16"] == pytest.approx(first["fp32"], rel=5e-3)


def test_dummy_data_and_activation_checkpointing(tmp_path):
    losses = {}
    for ckpt in (True, False):
        e = Engine.from_recipe(TINY, tiny_overrides(tmp_path / str(ckpt), **{"train.activation_checkpointing": ckpt,
                                                                             "train.max_steps": 3}),
                               dummy_data=True, quiet=True)
        assert [s.label.split()[1] for s in e.sources] == ["(synthetic)"]
        losses[ckpt] = e.fit()["final_loss"]
        assert math.isfinite(losses[ckpt])
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)  # recomputation changes no value


def test_engine_api_evaluate_save_load_generate(tmp_path):
    e = Engine.from_recipe(TINY, tiny_overrides(tmp_path, **{"train.max_steps": 4}), quiet=True)
    e.fit()
    m = e.evaluate()
    assert set(m) >= {"loss", "ppl"} and math.isclose(m["ppl"], math.exp(m["loss"]))
    path = e.save(tmp_path / "out" / "ckpt.pt")
    loaded = Engine.from_checkpoint(path)
    ids = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), e.model(ids), rtol=0, atol=0)
        assert loaded.model(ids).shape == (2, 16, 257)
    text = loaded.generate("def main", max_new_tokens=8, temperature=0.0)
    assert isinstance(text, str) and text == e.generate("def main", max_new_tokens=8, temperature=0.0)
    with_data = Engine.from_checkpoint(path, with_data=True)
    assert with_data.evaluate() == m


def test_build_model_on_meta_uses_no_memory():
    model = build_model(load_recipe(RECIPES / "llama_1.5b.toml"), device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert 1.4e9 <= n <= 1.6e9
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_training_matches_eager(tmp_path, checkpointing):
    # with checkpointing each compiled block traces its own checkpoint (components/checkpointing.py)
    over = {"train.max_steps": 2, "train.activation_checkpointing": checkpointing}
    eager = Engine.from_recipe(TINY, tiny_overrides(tmp_path / "e", **over), quiet=True)
    compiled = Engine.from_recipe(TINY, tiny_overrides(tmp_path / "c", **over, **{"train.compile": True}), quiet=True)
    eager.fit()
    compiled.fit()
    a, b = rows(tmp_path / "e" / "run"), rows(tmp_path / "c" / "run")
    for ra, rb in zip(a, b):
        assert math.isclose(ra["loss"], rb["loss"], rel_tol=1e-4)


def test_compile_mode_reaches_torch_compile_and_graph_modes_mark_each_forward(tmp_path, monkeypatch):
    modes, marks = [], []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.append(kw.get("mode")))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    over = {"train.max_steps": 2, "train.grad_accum_steps": 3, "train.eval_every": 2, "train.save_every": 0,
            "train.compile": True, "train.compile_mode": "reduce-overhead"}
    engine = Engine.from_recipe(TINY, tiny_overrides(tmp_path, **over), quiet=True)
    assert modes == ["reduce-overhead"] * 2  # one per block (regional compilation)
    assert engine._cudagraphs is False  # no CUDA graphs on the CPU: nothing to mark
    engine._cudagraphs = True  # as on a GPU: every training micro-batch and validation batch marks a step
    engine.fit()
    assert len(marks) == 2 * 3 + 2  # 2 steps x 3 micro-batches + 2 validation batches at step 2


def test_resume_with_a_longer_max_steps_replans_the_lr_schedule(tmp_path, capsys):
    """Extending a run: after the resume the LR follows a schedule planned for the new length
    (the LRs of a run planned for 12 steps from the start), and the console says so."""
    over = {"train.save_every": 3, "train.eval_every": 0, "lr_scheduler.min_lr": 1e-5}
    Engine.from_recipe(TINY, tiny_overrides(tmp_path / "short", **over, **{"train.max_steps": 6}), quiet=True).fit()
    Engine.from_recipe(TINY, tiny_overrides(tmp_path / "long", **over, **{"train.max_steps": 12}), quiet=True).fit()
    target = tmp_path / "extended" / "run"
    target.mkdir(parents=True)
    shutil.copy(tmp_path / "short" / "run" / "llama_step_3.pt", target)
    capsys.readouterr()
    resumed = Engine.from_recipe(TINY, tiny_overrides(tmp_path / "extended", **over, **{"train.max_steps": 12}))
    out = capsys.readouterr().out
    short, planned = rows(tmp_path / "short" / "run"), rows(tmp_path / "long" / "run")
    assert (f"train.max_steps changed from 6 to 12: the LR schedule is re-planned for 12 steps (lr at step 3:"
            f" {short[3]['lr']:.3g} -> {planned[3]['lr']:.3g})") in out
    summary = resumed.fit()
    assert summary["steps"] == 12
    extended = rows(target)
    assert [r["step"] for r in extended] == list(range(4, 13))
    assert [r["lr"] for r in extended] == pytest.approx([r["lr"] for r in planned[3:]], rel=1e-12)
    assert extended[0]["lr"] != pytest.approx(short[3]["lr"])  # not the old plan's lr at that step
    assert load_checkpoint(target / "llama_final.pt")["max_steps"] == 12


def test_resume_with_a_scheduler_that_cannot_replan_is_refused(tmp_path):
    import attrs

    from phase7fw import hookimpl
    from phase7fw.plugins import load_plugins

    class Plugin:
        @hookimpl
        def register_components(self, register):
            register("lr_scheduler", "fixed", lambda c, *, optimizer, max_steps, **k: torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: max(0.0, 1 - s / max_steps)), attrs.make_class("C", {}, frozen=True))

    plugins = load_plugins(extra=[Plugin()])
    over = {"train.save_every": 3, "lr_scheduler": {"name": "fixed"}}
    Engine.from_recipe(TINY, tiny_overrides(tmp_path, **over), plugins=plugins, quiet=True).fit()
    with pytest.raises(CheckpointError, match="was planned for train.max_steps = 6, the recipe says 9, and"
                                              " lr_scheduler 'fixed' cannot re-plan its schedule"):
        Engine.from_recipe(TINY, tiny_overrides(tmp_path, **over, **{"train.max_steps": 9}), plugins=plugins,
                           quiet=True)

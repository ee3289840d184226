"""torchrun on the CPU (gloo, 2 processes): DDP and FSDP2 against one process, resume,
consolidation, a failing rank."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import RECIPES, ROOT, run_cli

TINY = RECIPES / "llama_tiny.toml"
SETS = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32", "model.ffn_hidden=64",
        "train.log_every=1", "train.eval_every=2", "train.save_every=2", "train.max_steps=4",
        "train.eval_batches=2", 'data.sources=[{name = "python_stdlib", max_files = 5}]', "data.val_fraction=0.1"]

pytestmark = pytest.mark.slow


def args(out, *extra):
    flat = []
    for s in [*SETS, f"run.output_dir={out}", *extra]:
        flat += ["--set", s]
    return flat


def torchrun(*cli_args, env=None, nproc=2, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "phase7fw", *map(str, cli_args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def train_rows(run_dir, split="train"):
    rows = [json.loads(l) for l in (run_dir / "training_log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, batch 4: what 2 ranks x batch 2 must reproduce."""
    out = tmp_path_factory.mktemp("single") / "run"
    proc = run_cli("run", TINY, *args(out, "train.batch_size=4"))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp+checkpointing"])
def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, single, strategy):
    # fsdp+checkpointing: each block checkpoints inside its own forward, under FSDP's hooks
    # (the recompute in backward finds the parameters gathered by FSDP's pre-backward)
    out = tmp_path / "run"
    strategy, _, ckpt = strategy.partition("+")
    extra = ["train.activation_checkpointing=true"] if ckpt else []
    proc = torchrun("run", TINY, *args(out, "train.batch_size=2", f'parallel.strategy="{strategy}"', *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Done:") == 1  # one console: rank 0's
    one, two = train_rows(single), train_rows(out)
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["tokens"] == a["tokens"]  # the log counts the whole job's tokens, not rank 0's
    for a, b in zip(train_rows(single, "val"), train_rows(out, "val")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    final = out / "llama_final.pt"
    assert final.is_dir() == (strategy == "fsdp")  # FSDP: sharded directory of the same name


def test_fsdp_resume_continues_identically_and_consolidates(tmp_path, single):
    full = tmp_path / "full" / "run"
    proc = torchrun("run", TINY, *args(full, "train.batch_size=2", 'parallel.strategy="fsdp"'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = tmp_path / "resumed" / "run"
    resumed.mkdir(parents=True)
    shutil.copytree(full / "llama_step_2.pt", resumed / "llama_step_2.pt")
    proc = torchrun("run", TINY, *args(resumed, "train.batch_size=2", 'parallel.strategy="fsdp"'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resumed from" in proc.stdout
    a, b = train_rows(full)[2:], train_rows(resumed)
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in a] == [(r["step"], r["loss"], r["grad_norm"]) for r in b]

    # one file for single-process use
    single_file = tmp_path / "consolidated.pt"
    assert run_cli("checkpoint", "consolidate", full / "llama_final.pt", single_file).returncode == 0
    proc = run_cli("eval", single_file, "--batches", "2")
    assert proc.returncode == 0 and "val loss" in proc.stdout, proc.stderr
    import torch

    merged = torch.load(single_file, weights_only=True)["model"]
    reference = torch.load(single / "llama_final.pt", weights_only=True)["model"]  # 1 process, batch 4
    assert merged.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(merged[k], reference[k], rtol=1e-4, atol=1e-6, msg=k)

    # export reads a sharded checkpoint directly (consolidated on the way)
    proc = run_cli("export", full / "llama_final.pt", "--output", tmp_path / "hf", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0 and "consolidating" in proc.stdout, proc.stderr
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert torch.equal(exported["model.embed_tokens.weight"], merged["tok_embeddings.weight"])
    assert torch.equal(exported["lm_head.weight"], merged["output.weight"])

    # a sharded checkpoint is refused where it cannot be used, with the way out
    proc = run_cli("eval", full / "llama_final.pt")
    assert proc.returncode == 2 and "consolidate" in proc.stderr
    proc = run_cli("run", TINY, *args(resumed, "train.batch_size=4", 'parallel.strategy="fsdp"',
                                      "train.max_steps=6"))
    assert proc.returncode == 2 and "2 process" in proc.stderr and "Traceback" not in proc.stderr


def test_a_failing_rank_stops_the_job_and_is_named(tmp_path, fake_dist):
    fake_dist("failing-callback", """
import attrs
from phase7fw import hookimpl
from phase7fw.interfaces import Callback

class Fail(Callback):
    def on_step_end(self, engine, row):
        if engine.dist.rank == 1 and row["step"] == 2:
            raise RuntimeError("disk full on rank 1")

@hookimpl
def register_components(register):
    register("callback", "fail_on_rank_1", lambda c: Fail(), attrs.make_class("C", {}, frozen=True))
""")
    site = next(p for p in sys.path if p.endswith("site"))
    out = tmp_path / "run"
    proc = torchrun("run", TINY, *args(out, "train.batch_size=2", 'parallel.strategy="ddp"', "train.max_steps=50",
                                       'callbacks=[{name = "fail_on_rank_1"}]'),
                    env={"PYTHONPATH": site}, timeout=240)
    assert proc.returncode != 0
    assert "[rank 1/2] failed" in proc.stderr and "disk full on rank 1" in proc.stderr

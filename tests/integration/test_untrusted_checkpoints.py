"""Sharded (torch.distributed.checkpoint) folders are untrusted input: a planted pickle payload
never runs, through every command that reads such a folder."""

import builtins
import pickle

import pytest
import torch

from phase7fw.core.checkpoint import save_checkpoint
from phase7fw.errors import CheckpointError
from tests.conftest import RECIPES, run_cli

TINY = RECIPES / "llama_tiny.toml"
SMALL = ["--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
         "--set", "model.seq_len=32", "--set", "model.ffn_hidden=64", "--set", "train.batch_size=2",
         "--set", "train.max_steps=2", "--dummy-data"]


class Payload:
    """Pickles as ``exec(code)``: unpickling it writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def sharded_folder(path, marker, *, where="metadata"):
    """A folder that looks like phase7fw's FSDP checkpoint (extra.pt is honest plain data) with
    the payload in ``.metadata`` or in a non-tensor item of the data file."""
    import torch.distributed.checkpoint as dcp

    if where == "metadata":
        path.mkdir(parents=True)
        (path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    else:
        state = {"model": {"w": torch.zeros(2)}, "optimizer": {"param_groups": Payload(marker)}}
        with pytest.warns(UserWarning):  # "assuming the intent is to save in a single process"
            dcp.save(state, checkpoint_id=str(path), no_dist=True)
    save_checkpoint(path / "extra.pt", {"step": 1, "model_name": "llama", "world_size": 1, "strategy": "fsdp",
                                        "recipe": TINY.read_text(), "sharded": True})
    return path


def assert_refused(proc, marker, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
    for f in fragments:
        assert f in proc.stderr, proc.stderr
    assert not marker.exists(), "the planted payload ran"


@pytest.mark.parametrize("where", ["metadata", "data"])
def test_consolidate_never_runs_a_planted_payload(tmp_path, where):
    marker = tmp_path / "marker"
    src = sharded_folder(tmp_path / "evil.pt", marker, where=where)
    out = tmp_path / "out.pt"
    proc = run_cli("checkpoint", "consolidate", src, out)
    what = "builtins.exec" if where == "metadata" else "non-tensor item"
    assert_refused(proc, marker, f"refusing to load {src}", what, "never unpickles arbitrary objects")
    assert not out.exists()


def test_fsdp_resume_never_runs_a_planted_payload(tmp_path):
    marker = tmp_path / "marker"
    src = sharded_folder(tmp_path / "evil.pt", marker)
    proc = run_cli("run", TINY, *SMALL, "--set", 'parallel.strategy="fsdp"', "--set",
                   f"run.output_dir={tmp_path / 'run'}", "--resume", src)
    assert_refused(proc, marker, "refusing to load", ".metadata", "builtins.exec")


def test_plain_resume_of_a_sharded_folder_points_to_consolidate_without_reading_it(tmp_path):
    marker = tmp_path / "marker"
    src = sharded_folder(tmp_path / "evil.pt", marker)
    proc = run_cli("run", TINY, *SMALL, "--set", f"run.output_dir={tmp_path / 'run'}", "--resume", src)
    assert_refused(proc, marker, "is a sharded (FSDP) checkpoint", "consolidate")


def test_metadata_reader_accepts_real_dcp_metadata_and_rejects_escaping_paths(tmp_path):
    import torch.distributed.checkpoint as dcp

    from phase7fw.core.dcp_safe import load_full, read_metadata

    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "optimizer": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.95)}]}}
    with pytest.warns(UserWarning):
        dcp.save(state, checkpoint_id=str(tmp_path / "ok"), no_dist=True)
    assert "model.w" in read_metadata(tmp_path / "ok").state_dict_metadata
    loaded = load_full(tmp_path / "ok")
    torch.testing.assert_close(loaded["model"]["w"], state["model"]["w"])
    assert loaded["optimizer"]["param_groups"] == [{"lr": 0.1, "betas": (0.9, 0.95)}]

    # a metadata whose data file is outside the folder
    md = read_metadata(tmp_path / "ok")
    for info in md.storage_data.values():
        info.relative_path = "../../etc/passwd"
    (tmp_path / "ok" / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match="points outside its folder"):
        read_metadata(tmp_path / "ok")
    (tmp_path / "ok" / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_metadata(tmp_path / "ok")


def test_every_other_command_that_reads_a_folder_never_runs_it(tmp_path, capsys):
    """eval / generate / chat on the folder or on its run folder, and --resume auto finding it."""
    from phase7fw.cli import main

    marker = tmp_path / "marker"
    run_dir = tmp_path / "run"
    src = sharded_folder(run_dir / "llama_final.pt", marker)
    for args in (["eval", src], ["eval", run_dir], ["generate", src, "--prompt", "x"], ["chat", run_dir]):
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 2 and "is a sharded (FSDP) checkpoint" in err and "consolidate" in err, (args, err)
        assert not marker.exists()
    proc = run_cli("run", TINY, *SMALL, "--set", 'parallel.strategy="fsdp"', "--set", f"run.output_dir={run_dir}")
    assert_refused(proc, marker, f"refusing to load {src / '.metadata'}", "builtins.exec")

"""The ``phase7fw`` command line: the parser and ``main``. Argument parsing only: each
command module (:mod:`.train`, :mod:`.listing`, :mod:`.doctor`, :mod:`.export`,
:mod:`.infer`, :mod:`.bench`) adds its subcommands and calls the Engine/API.

Bad input of any kind ends in one ``error: ...`` message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from phase7fw import __version__
from phase7fw.cli import bench, common, doctor, export, infer, listing, train
from phase7fw.errors import Phase7Error

#: Subcommands in the order ``phase7fw --help`` lists them.
COMMANDS = (train.add_run, train.add_recipe, train.add_data, listing.add_plugins, listing.add_components,
            doctor.add_doctor, export.add_checkpoint, infer.add_eval, export.add_export, export.add_import_hf,
            infer.add_generate, infer.add_chat, bench.add_bench)


def build_parser(plugins_hook=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phase7fw", description="Train hybrid hyperbolic-attention language models.")
    p.add_argument("--version", action="version", version=f"phase7fw {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    if plugins_hook is not None:
        plugins_hook(subparsers=sub)
    return p


def _torch_missing() -> str | None:
    """Every command needs torch (the built-in components are torch modules): without it, one
    message instead of a warning per plugin and a traceback."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return (f"torch is not installed for {sys.executable} ({exc}); install it: pip install torch==2.13.0"
                " (the CPU build), or the torch build for your CUDA from pytorch.org")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    common.reset()
    from phase7fw.core.threads import prepare_environment

    prepare_environment()  # before torch is imported (by plugins or the command)
    # Under torchrun every message names its rank; torchrun stops the other ranks when one exits.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    who = f"[rank {os.environ.get('RANK', '0')}/{world}] " if world > 1 else ""
    if not {"-h", "--help", "--version"} & set(argv) and (missing := _torch_missing()):
        print(f"error: {who}{missing}", file=sys.stderr)
        return 2
    clean = False  # the command returned (every rank got there): leave the process group together
    try:
        args = build_parser(common.plugin_commands(common.plugins())).parse_args(argv)
        code = int(args.func(args) or 0)
        clean = True
        return code
    except Phase7Error as exc:
        print(f"error: {who}{exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{who}interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (phase7fw components | head): not an error of ours. Point
        # stdout at /dev/null so the interpreter's final flush does not fail again.
        from phase7fw.core.console import silence_stdout

        silence_stdout()
        return 0
    except Exception:
        if not who:
            raise
        import traceback

        traceback.print_exc()
        print(f"error: {who}failed (traceback above); the job stops", file=sys.stderr)
        return 1
    finally:
        if who:
            from phase7fw.core.distributed import shutdown

            shutdown(wait_for_peers=clean)


"""``phase7fw export``, ``phase7fw import-hf`` and ``phase7fw checkpoint consolidate``."""

from __future__ import annotations

from phase7fw.cli.common import plugins


def cmd_checkpoint(args) -> int:
    from phase7fw.core.checkpoint import consolidate

    out = consolidate(args.src, args.out)
    print(f"wrote {out} (one file: eval, generate, chat and single-process runs load it)")
    return 0


def cmd_export(args) -> int:
    from phase7fw.export.hf import export_checkpoint

    export_checkpoint(args.checkpoint, args.output, dtype=args.dtype, force=args.force, check=args.check,
                      plugins=plugins())
    return 0


def cmd_import_hf(args) -> int:
    from phase7fw.export.hf import import_folder

    import_folder(args.folder, args.output, plugins=plugins())
    return 0


def add_checkpoint(sub) -> None:
    ck = sub.add_parser("checkpoint", help="checkpoint tools")
    ck_sub = ck.add_subparsers(dest="action", required=True, metavar="ACTION")
    cons = ck_sub.add_parser("consolidate", help="sharded (FSDP) checkpoint directory -> one file")
    cons.add_argument("src")
    cons.add_argument("out")
    cons.set_defaults(func=cmd_checkpoint)


def add_export(sub) -> None:
    exp = sub.add_parser("export", help="write a Hugging Face model folder (config.json, model.safetensors, tokenizer)")
    exp.add_argument("checkpoint", metavar="CHECKPOINT|RUN_DIR",
                     help="a checkpoint file, a run folder (best > final > latest step) or a sharded FSDP checkpoint")
    exp.add_argument("--output", "-o", required=True, metavar="DIR", help="the folder to write")
    exp.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights in model.safetensors")
    exp.add_argument("--force", action="store_true", help="replace DIR if it exists")
    exp.add_argument("--check", action="store_true",
                     help="load the folder with transformers and compare its logits with phase7fw's (fp32)")
    exp.set_defaults(func=cmd_export)


def add_import_hf(sub) -> None:
    imp = sub.add_parser("import-hf", help="a folder written by phase7fw export -> a checkpoint that resumes and"
                                           " fine-tunes")
    imp.add_argument("folder", metavar="DIR")
    imp.add_argument("--output", "-o", required=True, metavar="CHECKPOINT.pt")
    imp.set_defaults(func=cmd_import_hf)

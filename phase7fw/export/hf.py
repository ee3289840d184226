"""``phase7fw export`` and ``phase7fw import-hf``: checkpoints <-> Hugging Face model folders.

A folder holds ``config.json``, ``model.safetensors`` (fp32 or bf16), ``tokenizer.json`` with
``tokenizer_config.json`` and ``special_tokens_map.json``, ``generation_config.json``, a
``README.md`` model card, ``phase7fw.json`` (what it takes to come back: the resolved recipe,
the tokenizer's state, step, metrics) and whatever files the model's export adds (a
self-contained modeling file for models transformers does not have).

What a model looks like in that layout is the model component's business
(``LanguageModel.hf_export`` / ``hf_import``, :class:`phase7fw.interfaces.HFModel`); this
module never names a concrete component.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from phase7fw import __version__
from phase7fw.core.finetune import FORMAT, FORMAT_VERSION, read_exported, safetensors_module
from phase7fw.errors import Phase7Error

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CHECK_TOLERANCE = 1e-4  # fp32 logits, any model size (the tests hold tiny models to 1e-5)


# ----------------------------------------------------------------------------- export
def export_checkpoint(checkpoint, output, *, dtype: str = "fp32", force: bool = False, check: bool = False,
                      plugins=None, log=print) -> Path:
    """Write the Hugging Face folder of ``checkpoint`` (a file, a run folder or a sharded FSDP
    checkpoint folder) to ``output``, atomically (a temporary folder renamed into place).
    ``check``: load it with transformers and compare its logits with phase7fw's (fp32 only)."""
    from phase7fw.core.checkpoint import find_checkpoint
    from phase7fw.core.checkpoint import consolidate, load_checkpoint
    from phase7fw.core.engine import Engine

    if dtype not in DTYPES:
        raise Phase7Error(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if check and dtype != "fp32":
        raise Phase7Error("--check compares fp32 logits; export with --dtype fp32 to check")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise Phase7Error(f"{out} exists and is not empty; choose another --output or add --force to replace it")
    path = find_checkpoint(str(checkpoint))
    with tempfile.TemporaryDirectory(prefix="phase7fw-export-") as scratch:
        if load_checkpoint(path, mmap=True).get("sharded"):
            log(f"{path} is sharded (FSDP): consolidating it into one file first")
            path_to_load = consolidate(path, Path(scratch) / "consolidated.pt")
        else:
            path_to_load = path
        engine = Engine.from_checkpoint(path_to_load, device="cpu", plugins=plugins)
        engine.checkpoint_file = str(path)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            write_folder(engine, tmp, dtype)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"wrote {out} ({engine.model_name}, step {engine.step}, {dtype})")
    if check:
        diff = compare_with_transformers(out, engine)
        log(f"check: transformers' logits differ from phase7fw's by at most {diff:.2e}")
        if diff > CHECK_TOLERANCE:
            raise Phase7Error(f"the exported model does not reproduce phase7fw's logits (max difference {diff:.2e} >"
                              f" {CHECK_TOLERANCE}); please report it with the recipe")
    return out


def write_folder(engine, folder: Path, dtype: str = "fp32") -> None:
    """Every file of the export of ``engine``'s model and tokenizer into ``folder``."""
    model, tokenizer = engine.model, engine.tokenizer
    hf = model.hf_export()
    tok_json, eos_text = tokenizer.hf_tokenizer()
    eos = tokenizer.eos_id
    torch_dtype = DTYPES[dtype]
    tensors = {k: v.detach().to("cpu", torch_dtype if v.is_floating_point() else v.dtype).contiguous().clone()
               for k, v in hf.tensors.items()}
    safetensors_module().save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    name = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    provenance = {"version": __version__, "model_name": engine.model_name, "step": engine.step,
                  "tokens_seen": engine.tokens_seen}
    config = {**hf.config, "bos_token_id": eos, "eos_token_id": eos, "dtype": name, "torch_dtype": name,
              "phase7fw": provenance}
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json",
                {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos, **hf.generation})
    (folder / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    limit = getattr(model, "context_limit", None)
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_text, "bos_token": eos_text,
        "pad_token": eos_text, "model_max_length": limit or 1_000_000_000, "clean_up_tokenization_spaces": False,
    })
    _write_json(folder / "special_tokens_map.json", {"eos_token": eos_text, "bos_token": eos_text,
                                                      "pad_token": eos_text})
    for fname, text in hf.files.items():
        (folder / fname).write_text(text, encoding="utf-8")
    from phase7fw.recipe import recipe_to_toml

    _write_json(folder / "phase7fw.json", {
        "format": FORMAT, "format_version": FORMAT_VERSION, **provenance, "dtype": dtype,
        "recipe": recipe_to_toml(engine.recipe), "tokenizer": tokenizer.state(),
        "tokenizer_fingerprint": tokenizer.fingerprint(), "curvature_offset": engine.curvature_offset,
        "init_from": engine.init_record, "checkpoint": str(getattr(engine, "checkpoint_file", "")),
        "metrics": {"best_val_loss": _finite(engine.best_val_loss), "best_val_bpb": engine.best_val_bpb,
                    "last_val": engine.last_val},
    })
    (folder / "README.md").write_text(model_card(engine, hf, dtype), encoding="utf-8")


def _finite(x):
    return x if x is not None and math.isfinite(x) else None


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def model_card(engine, hf, dtype: str) -> str:
    """README.md: how to load it, the recipe, the parameter breakdown, tokens and losses."""
    remote = "auto_map" in hf.config
    breakdown = engine.model.parameter_breakdown()
    rows = "\n".join(f"| {k} | {v:,} |" for k, v in breakdown.items())
    val = engine.last_val or {}
    losses = []
    if math.isfinite(engine.best_val_loss):
        bpb = f", {engine.best_val_bpb:.4f} bits per byte" if engine.best_val_bpb is not None else ""
        losses.append(f"- best validation loss: {engine.best_val_loss:.4f} nats/token{bpb}")
    if val.get("loss") is not None:
        bpb = f", {val['bpb']:.4f} bits per byte" if val.get("bpb") is not None else ""
        losses.append(f"- last validation loss (step {val.get('step')}): {val['loss']:.4f} nats/token,"
                      f" perplexity {val.get('ppl', math.exp(min(val['loss'], 700))):.2f}{bpb}")
    losses = "\n".join(losses) or "- no validation loss was recorded"
    origin = engine.init_record
    finetuned = (f"Fine-tuned from `{origin['path']}` (its step {origin['step']}, {origin['tokens_seen']:,} tokens)."
                 if origin else "Trained from scratch.")
    trust = ", trust_remote_code=True" if remote else ""
    code = ("The folder ships its own modeling file (`modeling_phase7fw.py`, torch only), hence"
            " `trust_remote_code=True`." if remote else "A native transformers architecture: no custom code.")
    from phase7fw.recipe import recipe_to_toml

    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- phase7fw
- {engine.model_name}
---

# {engine.recipe.run.name} ({engine.model_name}, phase7fw {__version__})

Exported by `phase7fw export` from `{Path(getattr(engine, 'checkpoint_file', '') or '').name}` at step
{engine.step:,}; weights in {dtype}. {code}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")
model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER"{trust})
ids = tokenizer("def main(", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=32, do_sample=False)[0]))
```

phase7fw trains on documents separated by the end-of-document token (`{engine.tokenizer.eos_id}`): starting a
prompt with it (`[tokenizer.eos_token_id] + ids`) gives the model the context it saw in training.

## Training

- {finetuned}
- training tokens (this run): {engine.tokens_seen:,}
{losses}

## Parameters

| part | parameters |
|---|---|
{rows}

## Recipe

```toml
{recipe_to_toml(engine.recipe).rstrip()}
```
"""


# ----------------------------------------------------------------------------- import
def import_folder(folder, output, *, plugins=None, log=print) -> Path:
    """An exported folder -> a phase7fw checkpoint (weights, tokenizer, step, curvature position,
    metrics; the optimizer's moments and the data position start fresh) that resumes and
    fine-tunes like any other."""
    import warnings

    from phase7fw.core.console import Console
    from phase7fw.core.engine import Engine
    from phase7fw.core.build import build_model, model_vocab_size
    from phase7fw.core.finetune import check_weights
    from phase7fw.plugins import load_plugins
    from phase7fw.recipe import load_recipe, recipe_to_dict

    plugins = plugins or load_plugins()
    out = Path(output)
    if out.exists():
        raise Phase7Error(f"{out} exists; choose another output file")
    source = read_exported(folder, plugins)
    # A new single-process run of the same recipe; its own init_from is history, not to be read again.
    recipe = load_recipe(recipe_to_dict(source.recipe), {"parallel.strategy": "none", "train.init_from": ""},
                         plugins=plugins)
    from phase7fw.core.build import build_tokenizer

    tokenizer = build_tokenizer(recipe, plugins, state=source.tokenizer_state)
    meta_model = build_model(recipe, "meta", plugins=plugins, vocab_size=model_vocab_size(recipe, tokenizer))
    state_dict = source.model_state(meta_model)
    check_weights(meta_model, state_dict, str(folder))
    checkpoint = {"model": state_dict, "tokenizer": source.tokenizer_state, "model_name": recipe.model.name,
                  "tokenizer_fingerprint": source.tokenizer_fingerprint, "step": source.step,
                  "metrics": {**source.metrics, "tokens_seen": source.tokens_seen},
                  "curvature_offset": source.curvature_offset, "init_from": source.init_from, "path": str(folder)}
    engine = Engine(recipe, plugins=plugins, resume="never", device="cpu", with_data=False, checkpoint=checkpoint,
                    console=Console(False))
    with warnings.catch_warnings():  # torch warns that the optimizer never stepped
        warnings.simplefilter("ignore")
        for _ in range(engine.step):  # the LR schedule at the imported step
            engine.lr_scheduler.step()
    engine.save(out)
    log(f"wrote {out} ({engine.model_name}, step {engine.step}; optimizer moments and data position start fresh)")
    return out


# ----------------------------------------------------------------------------- check
def compare_with_transformers(folder, engine, n_tokens: int = 48, seed: int = 0) -> float:
    """Load ``folder`` with transformers (trust_remote_code) and return the largest absolute
    difference between its logits and ``engine.model``'s on the same random tokens (fp32)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise Phase7Error("checking an export needs transformers: pip install 'phase7fw[export]'") from None
    hf = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32)
    hf.eval()
    n = min(n_tokens, engine.seq_len)
    ids = torch.randint(0, engine.tokenizer.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))
    was = engine.model.training
    engine.model.eval()
    try:
        with torch.no_grad():
            ours = engine.model(ids.to(engine.device)).float().cpu()
            theirs = hf(ids).logits.float()
    finally:
        engine.model.train(was)
    return float((ours - theirs).abs().max())

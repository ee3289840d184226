"""P9 (design/PERFORMANCE.md): batch-1 cached generation of phase7fw models against Hugging
Face transformers ``generate`` on a Llama of the same size, in one process.

    python benchmarks/p9_generate.py [--recipe recipes/phase7_1.5b_standard.toml]
        [--baseline recipes/llama_1.5b.toml] [--prompt-tokens 128] [--new-tokens 128]
        [--hf-modes static-compile,static,dynamic] [--cuda-graph off|on|auto] [--compile-step] [--json PATH]

The transformers model is a ``LlamaForCausalLM`` built from the baseline recipe's shape
(d_model, layers, heads, kv heads, SwiGLU width, vocab, RoPE theta; untied head), randomly
initialized, in bf16 on a GPU (fp32 on a CPU). Its modes: ``static-compile`` (static cache
and the torch.compile that ``generate`` itself applies to the forward when the cache is
static, transformers' recommended fast path and the one P9 names), ``static`` (static cache,
``generation_config.disable_compile = True``: eager), ``dynamic``. On transformers 5.17 /
torch 2.11 (H200, 2026-11-29) that compile skips CUDA graphs ("mutated inputs": the cache's
``cumulative_length``), and wrapping the forward in ``torch.compile(mode="reduce-overhead")``
on top of it failed ("accessing tensor output of CUDAGraphs that has been overwritten"). Each is warmed up twice, then timed with a streamer that
notes when each new token reaches the host: (N - 1) tokens over the time from the first new
token to the last (decoding without the prefill). Greedy, no EOS.

phase7fw's side is ``phase7fw.cli.benchmark.bench_generate`` (what ``phase7fw bench --generate``
runs) for the recipe and for the baseline recipe. Needs ``transformers`` (not a phase7fw
dependency). Prints a table and P9 = phase7 tokens/s / HF static-compile tokens/s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_llama(recipe: str, vocab_size: int, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from phase7fw.components.llama import resolve_ffn_hidden
    from phase7fw.recipe import load_recipe

    cfg = load_recipe(recipe).model.config
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=resolve_ffn_hidden(cfg),
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=getattr(cfg, "n_kv_heads", 0) or cfg.n_heads, max_position_embeddings=cfg.seq_len,
        rope_theta=getattr(cfg, "rope_theta", 10000.0), rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    return model, sum(p.numel() for p in model.parameters())


class _TokenClock:
    """A transformers streamer that notes when each new token reaches the host (``put`` gets
    the prompt first, then one token per decoding step)."""

    def __init__(self):
        self.times = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        """The streamer protocol's end of generation: the clock has nothing to flush."""


def time_hf(model, mode: str, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> dict:
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id = None, 0
    kwargs = dict(do_sample=False)
    if mode.startswith("static"):
        kwargs["cache_implementation"] = "static"
    gen.disable_compile = mode != "static-compile"  # generate compiles a static-cache forward itself

    def run() -> list:
        clock = _TokenClock()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock,
                                 **kwargs)
        sync(device)
        assert out.shape[1] == prompt.shape[1] + new_tokens, out.shape
        return clock.times

    for _ in range(2):  # compile / allocate
        run()
    times = run()
    # times[0]: the prompt; times[1]: the first new token (after the prefill); the rest: decoding
    decode = max(times[-1] - times[1], 1e-9)
    steps = len(times) - 2
    return {"mode": mode, "tokens_per_s": steps / decode, "ms_per_token": 1e3 * decode / steps,
            "first_token_s": times[1] - times[0]}


def phase7fw_generate(recipe: str, device: torch.device, prompt_tokens: int, new_tokens: int, cuda_graph: str,
                      compile_step: bool = False, int8: bool = False) -> dict:
    from phase7fw import Engine
    from phase7fw.cli.benchmark import bench_generate

    engine = Engine.from_recipe(recipe, {"train.compile": False, "train.batch_size": 1, "train.grad_accum_steps": 1},
                                dummy_data=True, resume="never", device=str(device), quiet=True)
    try:
        params = sum(p.numel() for p in engine.model.parameters())  # before int8 makes weights buffers
        res = bench_generate(engine, new_tokens, prompt_tokens, cuda_graph=cuda_graph, compile_step=compile_step,
                             int8=int8)
        res["params"] = params
        res["model"] = engine.model_name
        res["vocab_size"] = engine.model.vocab_size
        return res
    finally:
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/phase7_1.5b_standard.toml")
    ap.add_argument("--baseline", default="recipes/llama_1.5b.toml")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--hf-modes", default="static-compile,static,dynamic")
    ap.add_argument("--cuda-graph", default="off", choices=["off", "on", "auto"], help="phase7fw's decoding path")
    ap.add_argument("--compile-step", action="store_true",
                    help="phase7fw: compile the static step before the CUDA-graph capture (experimental)")
    ap.add_argument("--int8", action="store_true",
                    help="also decode the first recipe with int8 weights (phase7fw generate --int8): P9 (int8)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.new_tokens < 2 or args.prompt_tokens < 1:
        ap.error("--new-tokens must be >= 2 and --prompt-tokens >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rows": []}
    try:
        import transformers
        result["transformers"] = transformers.__version__
    except ImportError:
        print("error: benchmarks/p9_generate.py needs transformers (pip install transformers)", file=sys.stderr)
        return 2

    ours_rows = []
    for recipe in (args.recipe, args.baseline):  # phase7fw first: the baseline's vocabulary sizes the HF model
        row = phase7fw_generate(recipe, device, args.prompt_tokens, args.new_tokens, args.cuda_graph,
                                args.compile_step)
        row["what"] = f"phase7fw {row['model']} ({Path(recipe).stem}, {row['path']})"
        ours_rows.append(row)
        print(json.dumps(row), flush=True)
    if args.int8:
        row = phase7fw_generate(args.recipe, device, args.prompt_tokens, args.new_tokens, args.cuda_graph,
                                args.compile_step, int8=True)
        row["what"] = f"phase7fw {row['model']} ({Path(args.recipe).stem}, {row['path']}, int8 weights)"
        ours_rows.append(row)
        print(json.dumps(row), flush=True)

    model, n_params = hf_llama(args.baseline, ours_rows[-1]["vocab_size"], device, dtype)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens), generator=g).to(device)
    for mode in [m for m in args.hf_modes.split(",") if m]:
        try:
            row = time_hf(model, mode, prompt, args.new_tokens, device)
        except Exception as exc:  # noqa: BLE001 - a mode this transformers/torch cannot run is a result
            row = {"mode": mode, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        row.update(what=f"transformers LlamaForCausalLM ({mode})", params=n_params)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    result["rows"] += ours_rows

    hf_best = next((r for r in result["rows"] if r.get("mode") == "static-compile" and "tokens_per_s" in r), None)
    ours = ours_rows[0]
    if hf_best:
        result["P9"] = ours["tokens_per_s"] / hf_best["tokens_per_s"]
        if args.int8:
            result["P9_int8"] = ours_rows[-1]["tokens_per_s"] / hf_best["tokens_per_s"]
    print(f"\n{result['device']}, torch {result['torch']}, transformers {result['transformers']}, {result['date']},"
          f" batch 1, prompt {args.prompt_tokens}, {args.new_tokens} new tokens\n")
    print("| what | params | tokens/s | ms/token |\n|---|---|---|---|")
    for r in result["rows"]:
        if "tokens_per_s" in r:
            print(f"| {r['what']} | {r['params'] / 1e9:.3f}B | {r['tokens_per_s']:,.1f} | {r['ms_per_token']:.2f} |")
        else:
            print(f"| {r['what']} | {r['params'] / 1e9:.3f}B | failed: {r['error']} | |")
    if "P9" in result:
        print(f"\nP9 = {ours['what']} / HF static cache + compile = {result['P9']:.2f}x (target >= 2)")
    if "P9_int8" in result:
        print(f"P9 (int8) = {ours_rows[-1]['what']} / HF static cache + compile = {result['P9_int8']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

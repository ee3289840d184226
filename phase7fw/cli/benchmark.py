"""``phase7fw bench``: training throughput, step-time split, MFU, peak memory, SDPA backend,
cached decoding speed, and the largest model that trains under a memory cap.

Every number comes from the real training step (:meth:`Trainer.train_step`) of an engine built
from the recipe on random tokens (``--dummy-data``) in a temporary output folder, so what is
measured is what ``phase7fw run`` executes. Method (design/PERFORMANCE.md):

- warm-up steps first (``torch.compile`` compiles there), then ``steps`` timed steps, wall
  clock around them with a device synchronize at the end; ``repeat`` > 1 times that many
  windows of ``steps`` back to back and reports their mean and spread (one compilation);
- the split: "data" is host time (the sampler and the copy launch: a data stall shows up on
  the host), "forward" / "backward" / "optimizer" are CUDA-event times on a GPU;
- flops_per_token = 6 * N_matmul + 12 * L * T_eff * d_model (+ the SSM scans' declared FLOPs),
  T_eff = the attention window or T; MFU against 989.4 TFLOP/s (H200 bf16 dense) and against a
  bf16 8192^3 GEMM measured in the same process;
- peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps;
- ``memory_cap_gib`` emulates a smaller GPU with ``torch.cuda.set_per_process_memory_fraction``.

On a CPU everything runs (use tiny recipes) and the report says the numbers are CPU numbers.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import math
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from phase7fw.core.console import human
from phase7fw.interfaces import AttentionLayer
from phase7fw.errors import Phase7Error
from phase7fw.fileio import write_text_atomic, writing

PEAK_TFLOPS = 989.4  # H200 SXM bf16 dense (datasheet), the MFU denominator of PERFORMANCE.md
PHASES = ("data", "forward", "backward", "optimizer")


# ----------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SectionTimer:
    """``section(name)`` context managers, summed per name. On a GPU, device phases are timed
    with CUDA events (read after :meth:`collect` synchronizes); "data" is always host time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._events: list = []

    @contextlib.contextmanager
    def section(self, name: str):
        if self.cuda and name != "data":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.seconds[name] += time.perf_counter() - t0

    def collect(self) -> dict[str, float]:
        synchronize(self.device)
        for name, start, end in self._events:
            self.seconds[name] += start.elapsed_time(end) / 1e3
        self._events.clear()
        return dict(self.seconds)


def measure_gemm_tflops(device: torch.device, reps: int = 10) -> dict:
    """Median TFLOP/s of a square GEMM: bf16 8192^3 on a GPU, fp32 1024^3 on a CPU."""
    cuda = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "tflops": 2 * n**3 / statistics.median(times) / 1e12}


# ----------------------------------------------------------------------------- model facts
def attention_modules(model) -> list:
    """The model's attention layers (:class:`phase7fw.interfaces.AttentionLayer`)."""
    return [m for m in model.modules() if isinstance(m, AttentionLayer)]


def sdpa_info(model, device: torch.device, batch: int, seq_len: int, dtype: torch.dtype) -> dict:
    """Which attention the model uses and the SDPA backend PyTorch picks for its shape."""
    mods = attention_modules(model)
    kinds = [m.attention_kind for m in mods]
    kind = "sdpa" if "sdpa" in kinds else (kinds[0] if kinds else "none")
    backend = None
    if mods:
        m = mods[0]
        try:
            from torch.nn.attention import SDPBackend

            q = torch.empty(batch, m.n_heads, seq_len, m.head_dim, device=device, dtype=dtype)
            backend = SDPBackend(torch._fused_sdp_choice(q, q, q, None, 0.0, True)).name
        except Exception as exc:  # private API: report, never fail a benchmark on it
            backend = f"unknown ({type(exc).__name__})"
    return {"attention": kind, "sdpa_backend": backend}


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "cpu": not cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ----------------------------------------------------------------------------- one recipe
def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    from phase7fw.core.preflight import ResourceError

    if isinstance(exc, ResourceError):
        return exc.kind == "memory"
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def bench_recipe(recipe, overrides: dict, *, steps: int, warmup: int, repeat: int = 1, device: str | None = None,
                 generate: bool = False, gen_tokens: int = 64, prompt_tokens: int = 0, gemm: dict | None = None,
                 cuda_graph: str = "auto", compile_step: bool = False, profile_dir=None, plugins=None, progress=None,
                 allow_cpu: bool = False, int8: bool = False) -> dict:
    """Train ``warmup + steps`` steps of ``recipe`` on random tokens and measure them (then,
    with ``profile_dir``, two more under torch.profiler: :func:`profile_steps`); with
    ``generate`` also time cached greedy decoding at batch 1 (``int8``: with int8 weights). A
    CUDA out-of-memory error, or a memory plan larger than the device
    (phase7fw/core/preflight.py), is a result (``{"oom": true}``), not a crash. ``allow_cpu``:
    measure a GPU-sized recipe on a CPU anyway."""
    from phase7fw.core.engine import Engine
    from phase7fw.core.trainer import Trainer

    if steps < 1 or warmup < 0 or repeat < 1:
        raise Phase7Error(f"bench: --steps and --repeat must be >= 1 and --warmup >= 0, got {steps}, {repeat} and {warmup}")
    result: dict = {"recipe": str(recipe), "overrides": {k: v for k, v in overrides.items()}}
    engine = trainer = model = None
    with tempfile.TemporaryDirectory(prefix="phase7fw-bench-") as tmp:
        say = progress or (lambda text: None)
        t_build = time.perf_counter()
        try:
            engine = Engine.from_recipe(recipe, {**overrides, "run.output_dir": tmp}, dummy_data=True,
                                        resume="never", device=device, plugins=plugins, quiet=True,
                                        allow_cpu=allow_cpu)
            dev = engine.device
            t = engine.recipe.train
            model = engine.model
            n_params = sum(p.numel() for p in model.parameters())
            fpt = model.flops_per_token(engine.seq_len)
            result.update({
                "model": engine.model_name, "params": n_params, "matmul_params": model.matmul_params(),
                "batch_size": t.batch_size, "grad_accum_steps": t.grad_accum_steps, "seq_len": engine.seq_len,
                "precision": t.precision, "compile": t.compile, "activation_checkpointing": t.activation_checkpointing,
                "checkpoint_policy": t.checkpoint_policy, "checkpoint_every": t.checkpoint_every,
                "kernels": dict(engine.kernels), "steps": steps, "warmup": warmup, "repeat": repeat,
                "flops_per_token": fpt["total"], "flops_split": {k: v for k, v in fpt.items() if k != "total"},
            })
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision, torch.float32)
            result.update(sdpa_info(model, dev, t.batch_size, engine.seq_len, dtype))

            result["build_s"] = time.perf_counter() - t_build
            say(f"{recipe}: built in {result['build_s']:.1f} s")
            trainer = Trainer(engine)
            model.train()
            result["warmup_step_s"] = []
            for i in range(warmup):  # the first step compiles when train.compile is on
                t_w = time.perf_counter()
                trainer.train_step()
                synchronize(dev)
                result["warmup_step_s"].append(time.perf_counter() - t_w)
                say(f"{recipe}: warm-up step {i + 1}: {result['warmup_step_s'][-1]:.1f} s")
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            timer = SectionTimer(dev)
            losses, windows = [], []
            for _ in range(repeat):
                t0 = time.perf_counter()
                for _ in range(steps):
                    losses.append(trainer.train_step(timer)["loss"])
                synchronize(dev)
                windows.append(time.perf_counter() - t0)
            split = timer.collect()
            wall = sum(windows)
            tokens = steps * t.batch_size * t.grad_accum_steps * engine.seq_len  # per window
            tok_s = tokens * repeat / wall
            rates = [tokens / w for w in windows]
            result.update({
                "tokens_per_s": tok_s,
                "tokens_per_s_windows": rates,
                "tokens_per_s_spread": (max(rates) - min(rates)) / tok_s,
                "step_time_s": wall / (steps * repeat),
                "split_s": {k: split.get(k, 0.0) / (steps * repeat) for k in PHASES},
                "loss_first": losses[0], "loss_last": losses[-1],
                "mfu": fpt["total"] * tok_s / (PEAK_TFLOPS * 1e12),
                "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
            })
            if gemm:
                result["mfu_vs_gemm"] = fpt["total"] * tok_s / (gemm["tflops"] * 1e12)
            if profile_dir is not None:
                label = f"{engine.model_name}_{Path(str(recipe)).stem}"
                result["profile"] = profile_steps(trainer, dev, profile_dir, label)
                say(f"{recipe}: profile written to {result['profile']['table']}")
            if generate:
                engine.optimizer.state.clear()  # decoding needs the weights only
                free_memory()
                result["generate"] = bench_generate(engine, gen_tokens, prompt_tokens, cuda_graph=cuda_graph,
                                                    compile_step=compile_step, int8=int8)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            result.update({"oom": True, "error": str(exc).splitlines()[0][:300]})
        finally:
            if engine is not None and engine.in_backward is not None:
                # the hooks keep the model and optimizer alive past this run (seen on CUDA:
                # the next --max-params trial started with the last one's weights allocated)
                engine.in_backward.remove()
            engine = trainer = model = None  # drop every reference before emptying the cache
            free_memory()
    result.setdefault("oom", False)
    return result


def profile_steps(trainer, device: torch.device, out_dir, label: str, steps: int = 2) -> dict:
    """Run ``steps`` more training steps under ``torch.profiler`` (host ops, and CUDA kernels on
    a GPU); write a Chrome trace and a table of the ops by self device time (host time on a
    CPU) to ``out_dir``; return the per-step op count (launch-bound code shows up there) and the
    top ops."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.train_step()
        synchronize(device)
    out = Path(out_dir)
    trace = out / f"{label}.trace.json"
    with writing(trace):
        out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))

    def device_us(e):  # the attribute was renamed (cuda -> device) across torch versions
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

    events = list(prof.key_averages())
    key = device_us if gpu else (lambda e: e.self_cpu_time_total)
    events.sort(key=key, reverse=True)
    rows = [{"op": e.key, "calls_per_step": e.count / steps, "self_ms_per_step": key(e) / 1e3 / steps,
             "self_host_ms_per_step": e.self_cpu_time_total / 1e3 / steps} for e in events]
    width = max([len(r["op"][:60]) for r in rows[:40]] + [2])
    lines = [f"{'op':<{width}}  calls/step  self {'GPU' if gpu else 'CPU'} ms/step  self host ms/step"]
    lines += [f"{r['op'][:60]:<{width}}  {r['calls_per_step']:10.1f}  {r['self_ms_per_step']:17.3f}"
              f"  {r['self_host_ms_per_step']:17.3f}" for r in rows[:40]]
    table = out / f"{label}.ops.txt"
    write_text_atomic(table, "\n".join(lines) + "\n")
    aten = sum(e.count for e in events if e.key.startswith("aten::")) / steps
    return {"steps": steps, "trace": str(trace), "table": str(table), "aten_ops_per_step": aten, "top": rows[:10]}


def bench_generate(engine, new_tokens: int, prompt_tokens: int = 0, warmup_tokens: int = 8,
                   cuda_graph: str = "auto", compile_step: bool = False, int8: bool = False) -> dict:
    """Cached greedy decoding at batch 1: prefill a random prompt, then time ``new_tokens``
    tokens (each one read back to the host, as a sampler would). On a GPU the linear weights
    are stored in the training precision first (as ``phase7fw generate`` does); ``int8``: the
    blocks' linear weights in int8 (``phase7fw generate --int8``). ``cuda_graph``
    as ``Engine.decoder``; the result's ``path`` says which path decoded (the warm-up runs the
    first prefill, so a CUDA-graph capture is not timed)."""
    from phase7fw.inference.decoding import context_limit, prepare_engine_for_decoding

    dev = engine.device
    prepare_engine_for_decoding(engine, int8=int8)
    limit = engine.seq_len
    prompt_tokens = prompt_tokens or max(1, min(128, limit // 4))
    if context_limit(engine.model) is not None:  # stay inside the context: no slide in the timed part
        new_tokens = max(1, min(new_tokens, limit - prompt_tokens - warmup_tokens))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, engine.tokenizer.vocab_size, (prompt_tokens,), generator=g).tolist()
    decoder = engine.decoder(use_cache=True, cuda_graph=cuda_graph, compile_step=compile_step)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            decoder.extend([int(decoder.logits().argmax(-1))])
        synchronize(dev)
        return time.perf_counter() - t0

    decoder.reset(prompt)
    run(warmup_tokens)
    decoder.reset(prompt)
    synchronize(dev)
    t0 = time.perf_counter()
    decoder.logits()
    synchronize(dev)
    prefill = time.perf_counter() - t0
    decode = run(new_tokens)
    return {"batch_size": 1, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "prefill_s": prefill,
            "tokens_per_s": new_tokens / decode, "ms_per_token": 1e3 * decode / new_tokens,
            "cache": decoder.use_cache, "cuda_graph": cuda_graph, "path": decoder.path, "int8": int8}


# ----------------------------------------------------------------------------- max params
def search_max(fits, start: int, upper: int = 4096) -> tuple[int, list]:
    """Largest n in [1, upper] with ``fits(n)`` (monotone: fits(n) implies fits(m) for m < n):
    doubling from ``start`` until a failure, then bisection. Returns (n or 0, [(n, fits)...])."""
    trials: list[tuple[int, bool]] = []

    def check(n: int) -> bool:
        ok = bool(fits(n))
        trials.append((n, ok))
        return ok

    n = max(1, min(start, upper))
    if check(n):
        lo, hi = n, None
        while hi is None:
            if lo >= upper:
                return lo, trials
            n = min(2 * lo, upper)
            if check(n):
                lo = n
            else:
                hi = n
    else:
        lo, hi = 0, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if check(mid):
            lo = mid
        else:
            hi = mid
    return lo, trials


def max_params(recipe, overrides: dict, *, dimension: str, device: str | None, plugins=None, progress=None) -> dict:
    """The largest model of the recipe's family (more layers, or a wider d_model) whose
    training step fits the current memory limit: each candidate trains 2 steps (the optimizer
    state exists from the first), ``torch.compile`` off so the search takes minutes."""
    from phase7fw.core.build import build_model
    from phase7fw.recipe import load_recipe

    base = load_recipe(recipe, overrides or None, plugins=plugins).model.config
    unit = 128  # widths in multiples of 128: divisible by the head counts, even head sizes

    def candidate(n: int) -> dict:
        if dimension == "layers":
            return {**overrides, "model.n_layers": n}
        extra = {"model.d_model": n * unit}
        if getattr(base, "ffn_hidden", 0):
            extra["model.ffn_hidden"] = max(256, round(base.ffn_hidden * n * unit / base.d_model / 256) * 256)
        return {**overrides, **extra}

    records = []

    def fits(n: int) -> bool:
        over = candidate(n)
        params = sum(p.numel() for p in build_model(load_recipe(recipe, over, plugins=plugins), "meta",
                                                    plugins=plugins).parameters())
        r = bench_recipe(recipe, {**over, "train.compile": False}, steps=1, warmup=1, device=device, plugins=plugins)
        records.append({"value": n * (unit if dimension == "width" else 1), "params": params, "fits": not r["oom"],
                        "peak_memory_gib": r.get("peak_memory_gib")})
        if progress:
            progress(f"max-params: {dimension} {records[-1]['value']} ({human(params)} params):"
                     + (f" fits, peak {r['peak_memory_gib']:.2f} GiB" if not r["oom"] else " out of memory"))
        return not r["oom"]

    start = base.n_layers if dimension == "layers" else max(1, base.d_model // unit)
    best, _ = search_max(fits, start, upper=512 if dimension == "layers" else 256)
    found = [r for r in records if r["fits"]]
    top = max(found, key=lambda r: r["value"]) if found else None
    return {"dimension": dimension, "best_value": top["value"] if top else None,
            "best_params": top["params"] if top else None, "trials": records}


# ----------------------------------------------------------------------------- report
def _fmt_split(r: dict) -> str:
    s = r["split_s"]
    return " + ".join(f"{k} {s[k] * 1e3:.1f}" for k in PHASES) + " ms"


def _rate(tflops: float) -> str:
    """FLOP/s in a unit that shows the number (a CPU GEMM is a few GFLOP/s, not "0.0 TFLOP/s")."""
    return f"{tflops:.1f} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.1f} GFLOP/s"


def _mfu(r: dict, cpu: bool) -> str:
    """MFU against the H200 peak and the measured GEMM; on a CPU only against the measured
    GEMM (a GPU's peak says nothing about a CPU run)."""
    vs_gemm = f"{100 * r['mfu_vs_gemm']:.2f}% of the measured GEMM" if "mfu_vs_gemm" in r else ""
    if cpu:
        return vs_gemm or "n/a on CPU (no GEMM measured)"
    return f"{100 * r['mfu']:.2f}% of {PEAK_TFLOPS} TFLOP/s" + (f" | {vs_gemm}" if vs_gemm else "")


def _windows(r: dict) -> str:
    n = r.get("repeat", 1)
    return f"{r['steps']} steps" if n == 1 else f"{n} x {r['steps']} steps"


def _spread(r: dict) -> str:
    """The windows of --repeat: their range and (max - min) / mean."""
    rates = r.get("tokens_per_s_windows") or []
    if len(rates) < 2:
        return ""
    return f" (windows {min(rates):,.0f} - {max(rates):,.0f}, spread {100 * r['tokens_per_s_spread']:.1f}%)"


def _summary(r: dict, cpu: bool = False) -> str:
    if "tokens_per_s" not in r:
        return f"{r['recipe']}: out of memory"
    gen = f", decoding {r['generate']['tokens_per_s']:.1f} tokens/s" if "generate" in r else ""
    return f"{r['recipe']}: {r['tokens_per_s']:,.0f} tokens/s, MFU {_mfu(r, cpu)}{gen}"


def report_lines(result: dict) -> list[str]:
    env = result["environment"]
    lines = [f"phase7fw bench on {env['device']} | torch {env['torch']} | triton {env['triton'] or '-'} | {env['date']}"]
    if env["cpu"]:
        lines.append("CPU numbers (no CUDA GPU): the MFU and memory targets are GPU targets; these are not comparable")
    gemm = result.get("gemm")
    if gemm:
        lines.append(f"measured GEMM {gemm['dtype']} {gemm['n']}^3: {_rate(gemm['tflops'])}"
                     + (" (the MFU denominator)" if env["cpu"] else f" (MFU denominators: {PEAK_TFLOPS} peak and this)"))
    if result.get("memory_cap_gib"):
        lines.append(f"memory cap: {result['memory_cap_gib']} GiB (set_per_process_memory_fraction)")
    for r in result["runs"]:
        lines.append("")
        if r.get("oom") and "tokens_per_s" not in r:
            lines.append(f"{r['recipe']}: OUT OF MEMORY ({r.get('error', '')})")
            continue
        lines += [
            f"{r['recipe']}: {r['model']} {human(r['params'])} params ({human(r['matmul_params'])} in matmuls)"
            f" | batch {r['batch_size']} x accum {r['grad_accum_steps']} x {r['seq_len']} | {r['precision']}"
            f" | compile {r['compile']} | {_windows(r)} after {r['warmup']} warm-up",
            f"  tokens/s     {r['tokens_per_s']:,.0f}{_spread(r)}",
            f"  step time    {r['step_time_s'] * 1e3:.1f} ms = {_fmt_split(r)}",
            f"  MFU          {_mfu(r, env['cpu'])} ({r['flops_per_token'] / 1e9:.4g} GFLOP/token)",
            "  peak memory  " + (f"{r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] is not None else "n/a on CPU"),
            f"  attention    {r['attention']} "
            + (f"(SDPA backend: {r['sdpa_backend']})" if r["attention"] == "sdpa"
               else f"(no SDPA; at this shape SDPA would use {r['sdpa_backend']})"),
        ]
        prof = r.get("profile")
        if prof:
            top = ", ".join(f"{t['op']} {t['self_ms_per_step']:.1f} ms" for t in prof["top"][:3])
            lines.append(f"  profile      {prof['aten_ops_per_step']:,.0f} aten ops/step; top: {top} ({prof['table']})")
        gen = r.get("generate")
        if gen:
            lines.append(f"  generation   {gen['tokens_per_s']:,.1f} tokens/s cached, batch 1"
                         f" ({gen['ms_per_token']:.2f} ms/token; prefill {gen['prompt_tokens']} tokens"
                         f" {gen['prefill_s'] * 1e3:.1f} ms) [{gen.get('path', 'dynamic-cache')}"
                         f"{', int8 weights' if gen.get('int8') else ''}]")
    cmp_ = result.get("compare")
    if cmp_:
        known = [f"{k} {v:.3f}" for k, v in cmp_.items() if v is not None]
        lines += ["", ("ratio " + " | ".join(known) + "  (first recipe / baseline)") if known else
                  "ratio: none (a recipe did not run: see its line above)"]
    mp = result.get("max_params")
    if mp:
        lines.append("")
        if mp["best_value"] is None:
            lines.append(f"max params: nothing fits under the cap ({mp['dimension']} search)")
        else:
            lines.append(f"max params under the cap: {human(mp['best_params'])} ({mp['best_params']:,})"
                         f" ({mp['dimension']} = {mp['best_value']}; {len(mp['trials'])} trials)")
    return lines


def compare(main: dict, base: dict) -> dict:
    def ratio(a, b):
        return a / b if a is not None and b not in (None, 0) else None

    out = {"tokens_per_s": ratio(main.get("tokens_per_s"), base.get("tokens_per_s")),
           "mfu": ratio(main.get("mfu"), base.get("mfu")),
           "peak_memory": ratio(main.get("peak_memory_gib"), base.get("peak_memory_gib"))}
    if "generate" in main and "generate" in base:
        out["generate_tokens_per_s"] = ratio(main["generate"]["tokens_per_s"], base["generate"]["tokens_per_s"])
    return out


def set_memory_cap(gib: float, device: torch.device) -> None:
    if device.type != "cuda":
        raise Phase7Error("--memory-cap-gib emulates a smaller GPU and needs a CUDA device")
    total = torch.cuda.get_device_properties(device).total_memory
    if not 0 < gib * 2**30 <= total:
        raise Phase7Error(f"--memory-cap-gib must be in (0, {total / 2**30:.1f}] on this GPU, got {gib}")
    # The caching allocator refuses to grow past this fraction: an OOM there is what a card of
    # `gib` would raise. The call needs an explicit index ("cuda" alone is rejected).
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, index)


def run_bench(recipe, overrides: dict, *, steps: int = 10, warmup: int = 3, repeat: int = 1, device: str | None = None,
              compare_recipe=None, compare_overrides: dict | None = None, memory_cap_gib: float | None = None,
              find_max_params: bool = False, search: str = "layers", generate: bool = False, gen_tokens: int = 64,
              cuda_graph: str = "auto", compile_step: bool = False, profile_dir=None, plugins=None, progress=None,
              partial=None, allow_cpu: bool = False, int8: bool = False) -> dict:
    """Everything ``phase7fw bench`` does; returns the JSON-able result. ``progress(str)``
    hears about each finished measurement and ``partial(result)`` gets the result so far
    after each recipe (long GPU runs keep what they measured)."""
    say = progress or (lambda text: None)
    keep = partial or (lambda res: None)
    from phase7fw.core.build import resolve_device

    dev = resolve_device(device or "auto")
    if generate and cuda_graph == "on" and dev.type != "cuda":
        raise Phase7Error(f"--cuda-graph on needs a CUDA device; this runs on {dev.type} (use auto or off)")
    if compile_step and not generate:
        raise Phase7Error("--compile-step compiles the decode step: it needs --generate")
    if int8 and not generate:
        raise Phase7Error("--int8 quantizes the weights for decoding: it needs --generate")
    if generate and compile_step:  # before anything is measured (bench_generate decodes with the cache)
        from phase7fw.inference.decoding import check_compile_step

        check_compile_step(cuda_graph, True, dev)
    if find_max_params and memory_cap_gib is None:
        raise Phase7Error("--max-params needs --memory-cap-gib N (the memory to fit in)")
    if memory_cap_gib is not None:
        set_memory_cap(memory_cap_gib, dev)
    result: dict = {"environment": environment(dev), "memory_cap_gib": memory_cap_gib, "peak_tflops": PEAK_TFLOPS}
    result["gemm"] = measure_gemm_tflops(dev)
    free_memory()
    kw = dict(steps=steps, warmup=warmup, repeat=repeat, device=str(dev), generate=generate, gen_tokens=gen_tokens,
              cuda_graph=cuda_graph, compile_step=compile_step, gemm=result["gemm"], profile_dir=profile_dir,
              plugins=plugins, progress=progress,
              allow_cpu=allow_cpu, int8=int8)
    say(f"GEMM: {_rate(result['gemm']['tflops'])}")
    result["runs"] = runs = [bench_recipe(recipe, overrides, **kw)]
    cpu = dev.type != "cuda"
    say(_summary(runs[-1], cpu))
    keep(result)
    if compare_recipe is not None:
        runs.append(bench_recipe(compare_recipe, compare_overrides or {}, **kw))
        say(_summary(runs[-1], cpu))
        result["compare"] = compare(runs[0], runs[1])
        keep(result)
    if find_max_params:
        result["max_params"] = max_params(recipe, overrides, dimension=search, device=str(dev), plugins=plugins,
                                          progress=progress)
    if math.isfinite(result["gemm"]["tflops"]):
        result["gemm"]["tflops"] = float(f"{result['gemm']['tflops']:.4g}")  # a CPU's 0.05 stays 0.05
    return result

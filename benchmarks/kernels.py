"""Kernel benchmarks P3, P4, P5 (design/PERFORMANCE.md), each a ratio measured in one run.

    python benchmarks/kernels.py [--out DIR] [--quick] [--skip-verify] [--step-json BENCH.json]
                                 [--sweep] [--attention-only] [--ssm-only] [--hla-sweep] [--hla-profile]

On a CUDA GPU (bf16):
  P3  hyperbolic attention fwd+bwd at (8,16,1024,128), full causal, vs SDPA cuDNN (and FA2)
  P4  the same vs Poincare attention through FlexAttention's score_mod (compiled), and the
      peak extra memory at T = 1024 / 2048 / 4096 (O(T) vs O(T^2))
  P5  AR-SSM scan fwd+bwd at (B=8, T=1024, d_model=2048: 8 heads x 256, rank 16) vs SDPA
      FlashAttention-2 fwd+bwd at the same (B, T, d_model) = (8, 16 heads, 1024, 128); the
      scan is timed under both ``[kernels.ar_ssm_scan] schedule``s ("rows", "chunks"), there
      and at batch 1 with T = 16k (8 x 256) and 32k (8 x 32), with the ratios chunks / rows;
      with fla-core installed, also ``[kernels] ar_ssm_scan = "fla"`` (fla's GLA), fla / rows
  P6  HTT embedding (vocab 32000, d 2048, rank 32) per optimizer step: the micro-batches'
      gathers + one tied-table rebuild, minus a dense lookup, over the step time of --step-json
plus the correctness table of ``phase7fw doctor --verify`` (every speed number is gated on it).
``--quick --only-verify 10`` runs only Phase 8's linear attention rows: our Triton kernel,
flash-linear-attention's GLA (rows ``[fla]``, when fla-core is installed) and SDPA cuDNN side
by side at (2,16,1024,128), (1,16,4096,128), (1,16,16384,128) and an odd length.
``--ssm-only`` is the AR-SSM schedule A/B alone: the scan's verify cases (a row per schedule,
and ``[fla]``'s with fla-core, all gated) and the timings of P5's block, then stops. ``--hla-sweep`` times Phase 8's kernel
under each ``[kernels.hyperbolic_linear_attention] gpu`` launch candidate at (8,16,1024,128) as
GPU time, next to SDPA cuDNN's, prints the pick's recipe table and stops; ``--hla-profile``
prints where that op's time goes (GPU time eager and compiled, a profiler table of each).
Writes kernels.json and kernels.md to --out. Imports only torch, triton and phase7fw's
kernel/geometry/component modules (no pluggy needed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200))


def flex_poincare(B, H, T, D, device):
    """Poincare attention via FlexAttention: score = <q,k> (scale 1), score_mod adds the
    per-row terms (captured tensors with gradients), causal block mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from phase7fw.kernels.hyperbolic_attention.geometry import tangent_stats
    from phase7fw.kernels.hyperbolic_attention.verify import attention_inputs

    q, k, v, c, tau = attention_inputs(B, H, T, D, device)
    ins = [t.clone().requires_grad_() for t in (q, k, v, c, tau)]
    bm = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, T, T, device=device)
    flex = torch.compile(flex_attention)
    gout = torch.randn_like(v)
    tiny = float(torch.finfo(torch.float32).eps) ** 2

    def fwd_bwd():
        q_, k_, v_, c_, tau_ = ins
        sc = c_.sqrt()
        nq, aq, fq = tangent_stats(q_.float(), c_.view(1, H, 1))
        nk, ak, fk = tangent_stats(k_.float(), c_.view(1, H, 1))

        def score_mod(score, b, h, qi, ki):
            gap = torch.clamp(nq[b, h, qi] * nk[b, h, ki] - score, min=0.0)
            sh = torch.sinh(aq[b, h, qi] - ak[b, h, ki])
            z = torch.clamp(2.0 * sh * sh + fq[b, h, qi] * fk[b, h, ki] * gap, min=tiny)
            return -tau_[h] * torch.log1p(z + torch.sqrt(z * (z + 2.0))) / sc[h]

        o = flex(q_, k_, v_, score_mod=score_mod, block_mask=bm, scale=1.0)
        torch.autograd.grad(o, ins, gout)

    return fwd_bwd


#: block-size candidates (BM, BN, num_warps, num_stages): fwd query x key block; bwd: query x
#: key block of the one-pass backward (dk, dv accumulators BN x D fp32, dq by atomics);
#: bwd_pre: rows per program of the row pass (BN unused).
ATTN_SWEEP = {
    "fwd": [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 3), (64, 64, 8, 2),
            (128, 128, 8, 2), (64, 128, 8, 2), (64, 64, 4, 3)],
    "bwd": [(32, 64, 4, 1), (32, 64, 4, 2), (64, 64, 8, 1), (64, 64, 4, 1), (32, 32, 4, 1), (16, 64, 4, 1),
            (32, 128, 8, 1), (64, 128, 8, 1), (64, 32, 4, 1), (32, 64, 8, 2), (64, 64, 8, 2)],
    "bwd_pre": [(64, 0, 4, 1), (32, 0, 4, 1), (128, 0, 8, 1), (16, 0, 2, 1)],
}
SSM_SWEEP = [(64, 64, 8, 1), (64, 64, 4, 1), (64, 32, 4, 1), (32, 64, 4, 1), (64, 128, 8, 1), (32, 32, 4, 1),
             (128, 64, 8, 1)]

#: AR-SSM scan shapes (b, h, T, dv, r) timed under each [kernels.ar_ssm_scan] schedule: P5's
#: (the 1.5B model at B=8 x 1024; its keys carry no prefix), and batch 1 at long sequences,
#: where the "rows" schedule has few programs: the 1.5B model's heads at 16k, phase7_small's at 32k
SSM_SHAPES = {"": (8, 8, 1024, 256, 16), "b1_T16384_dv256_": (1, 8, 16384, 256, 16),
              "b1_T32768_dv32_": (1, 8, 32768, 32, 16)}


def ssm_fwd_and_bwd(dev, shapes=((8, 16, 1024, 128, 16), (8, 8, 1024, 256, 16))) -> dict:
    """The scan's forward and backward apart (the kernel cores, default tiles and precision),
    per schedule, at the 1.5B model's shape (16 heads of 128) and P5's: keys
    ``ssm_<b>x<h>x<T>x<dv>_<schedule>_fwd`` / ``..._bwd`` (median ms)."""
    from phase7fw.kernels.ar_ssm_scan import SCHEDULES, TritonConfig
    from phase7fw.kernels.ar_ssm_scan.kernel import _bwd_impl, _fwd_impl
    from phase7fw.kernels.ar_ssm_scan.verify import ssm_inputs

    cfg, out = TritonConfig(), {}
    launch = [*cfg.gpu, *cfg.scan]
    for shape in shapes:
        x, B, C, ld = ssm_inputs(*shape, dev)
        dy = torch.randn_like(x)
        name = "x".join(map(str, shape[:4]))
        for schedule in SCHEDULES:
            _, states = _fwd_impl(x, B, C, ld, launch, cfg.precision, schedule)
            out[f"ssm_{name}_{schedule}_fwd"] = bench(lambda: _fwd_impl(x, B, C, ld, launch, cfg.precision, schedule))
            out[f"ssm_{name}_{schedule}_bwd"] = bench(
                lambda: _bwd_impl(x, B, C, ld, states, dy, launch, cfg.precision, schedule))
    return out


def ssm_timings(dev) -> tuple[dict, dict]:
    """fwd+bwd median ms of the AR-SSM scan at :data:`SSM_SHAPES` under each schedule and dot
    precision (keys ``ssm_<shape>triton_<precision>_fwd_bwd`` for "rows", the measured default,
    and ``ssm_<shape>triton_chunks_<precision>_fwd_bwd``), fla's GLA where it imports
    (``ssm_<shape>fla_fwd_bwd``, ``[kernels] ar_ssm_scan = "fla"``), the torch reference at P5's
    shape; and the ratios chunks / rows and fla / rows. A configuration that fails is NaN and printed."""
    from phase7fw.kernels.ar_ssm_scan import SCHEDULES, TritonConfig, ar_ssm_scan_reference
    from phase7fw.kernels.ar_ssm_scan.kernel import ar_ssm_scan_triton
    from phase7fw.kernels.ar_ssm_scan.verify import ssm_inputs
    from phase7fw.kernels._fla import fla_status

    fla_ok, why = fla_status()
    if fla_ok:
        from phase7fw.kernels.ar_ssm_scan.fla_backend import ar_ssm_scan_fla
    else:
        print(f"ssm: the fla backend is left out ({why})", flush=True)
    s, ratios = {}, {}
    for prefix, shape in SSM_SHAPES.items():
        sins = [a.clone().requires_grad_() for a in ssm_inputs(*shape, dev)]
        gy = torch.randn_like(sins[0])

        def fwd_bwd(scan=ar_ssm_scan_triton, **tuning):
            y = scan(*sins, **tuning)
            torch.autograd.grad(y, sins, gy)

        if not prefix:
            s["ssm_reference_fwd_bwd"] = bench(lambda: fwd_bwd(ar_ssm_scan_reference))
        for schedule in SCHEDULES:
            for prec in ("ieee", "tf32"):  # tf32x3 miscomputed dx (Triton 3.6, H200): not offered
                key = f"ssm_{prefix}triton_{'' if schedule == 'rows' else schedule + '_'}{prec}_fwd_bwd"
                cfg = TritonConfig(precision=prec, schedule=schedule)
                try:
                    s[key] = bench(lambda: fwd_bwd(tuning=cfg))
                except Exception as exc:  # noqa: BLE001
                    print("ssm", shape, schedule, prec, "failed:", repr(exc)[:300], flush=True)
                    s[key] = float("nan")
        for prec in ("ieee", "tf32"):
            ratios[f"ssm {shape} {prec}: chunks / rows"] = (
                s[f"ssm_{prefix}triton_chunks_{prec}_fwd_bwd"] / s[f"ssm_{prefix}triton_{prec}_fwd_bwd"])
        if fla_ok:  # [kernels] ar_ssm_scan = "fla": flash-linear-attention's GLA on the same inputs
            try:
                s[f"ssm_{prefix}fla_fwd_bwd"] = bench(lambda: fwd_bwd(ar_ssm_scan_fla))
            except Exception as exc:  # noqa: BLE001
                print("ssm", shape, "fla failed:", repr(exc)[:300], flush=True)
                s[f"ssm_{prefix}fla_fwd_bwd"] = float("nan")
            ratios[f"ssm {shape}: fla / rows ieee (the default)"] = (
                s[f"ssm_{prefix}fla_fwd_bwd"] / s[f"ssm_{prefix}triton_ieee_fwd_bwd"])
    s["ssm_triton_fwd_bwd"] = s["ssm_triton_ieee_fwd_bwd"]  # P5: the default tuning
    s.update(ssm_fwd_and_bwd(dev))
    print(s, flush=True)
    return s, ratios


def sweep(dev) -> dict:
    """Pick block sizes per pass on this GPU (coordinate search; each pass timed on its own).
    The picks are printed as the recipe tables that select them ([kernels.<op>] tuning)."""
    import attrs

    from phase7fw.kernels.ar_ssm_scan import TritonConfig as SsmConfig
    from phase7fw.kernels.ar_ssm_scan import kernel as S
    from phase7fw.kernels.ar_ssm_scan.verify import ssm_inputs
    from phase7fw.kernels.hyperbolic_attention import TritonConfig as AttnConfig
    from phase7fw.kernels.hyperbolic_attention import kernel as A
    from phase7fw.kernels.hyperbolic_attention.verify import attention_inputs

    B, H, T, D = 8, 16, 1024, 128
    q, k, v, c, tau = attention_inputs(B, H, T, D, dev)
    do = torch.randn_like(v)
    log = {}
    attn = AttnConfig()

    def fwd(cfg):
        return A._fwd_impl(q, k, v, c, tau, T, "distance", A.gpu_tiles(cfg))

    def bwd(cfg):
        return A._bwd_impl(q, k, v, o, o32, lse, do, c, tau, T, "distance", A.gpu_tiles(cfg),
                           cfg.grad_matmul_low_precision)

    def best(pass_name, fn, cands):
        nonlocal attn
        times = {}
        for cand in cands:
            cfg = attrs.evolve(attn, **{pass_name: cand if pass_name != "bwd_pre" else (cand[0], *cand[2:])})
            try:
                times[cand] = bench(lambda: fn(cfg))
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                times[cand] = float("inf")
                print(pass_name, cand, "failed:", str(exc).splitlines()[0][:120], flush=True)
        pick = min(times, key=times.get)
        attn = attrs.evolve(attn, **{pass_name: pick if pass_name != "bwd_pre" else (pick[0], *pick[2:])})
        log[pass_name] = {str(k_): round(v_, 4) for k_, v_ in times.items()}
        print(pass_name, "->", pick, log[pass_name], flush=True)

    o, o32, lse = fwd(attn)
    best("fwd", fwd, ATTN_SWEEP["fwd"])
    best("bwd", bwd, ATTN_SWEEP["bwd"])
    best("bwd_pre", bwd, ATTN_SWEEP["bwd_pre"])
    log["bwd_bf16_grad_matmuls_ms"] = bench(lambda: bwd(attrs.evolve(attn, grad_matmul_low_precision=True)))
    log["bwd_tf32_grad_matmuls_ms"] = bench(lambda: bwd(attn))

    x, Bm, Cm, ld = ssm_inputs(8, 8, 1024, 256, 16, dev)
    sins = [a_.clone().requires_grad_() for a_ in (x, Bm, Cm, ld)]
    gy = torch.randn_like(x)

    def ssm_fb(cfg):
        y = S.ar_ssm_scan_triton(*sins, tuning=cfg)
        torch.autograd.grad(y, sins, gy)

    times = {}  # schedule "rows" (what these tiles were swept for); ssm_timings() times "chunks" at them
    for cand in SSM_SWEEP:
        try:
            times[cand] = bench(lambda: ssm_fb(SsmConfig(gpu=cand, schedule="rows")))
        except Exception as exc:  # noqa: BLE001
            times[cand] = float("inf")
            print("ssm", cand, "failed:", str(exc).splitlines()[0][:120], flush=True)
    ssm = SsmConfig(gpu=min(times, key=times.get), schedule="rows")
    log["ssm"] = {str(k_): round(v_, 4) for k_, v_ in times.items()}
    print("ssm ->", ssm.gpu, log["ssm"], flush=True)
    log["chosen"] = {"hyperbolic_attention": attrs.asdict(attn), "ar_ssm_scan": attrs.asdict(ssm)}
    print("recipe tables that select them:\n[kernels.hyperbolic_attention]\nimpl = \"triton\"\n"
          + "".join(f"{k_} = {list(v_) if isinstance(v_, tuple) else str(v_).lower()}\n"
                    for k_, v_ in attrs.asdict(attn).items())
          + f"[kernels.ar_ssm_scan]\nimpl = \"triton\"\ngpu = {list(ssm.gpu)}\n", flush=True)
    return log


#: Phase 8 linear-attention launch candidates (value tile, num_warps, num_stages)
HLA_SWEEP = [(64, 8, 1), (32, 4, 1), (32, 8, 1), (64, 4, 1), (64, 8, 2), (128, 8, 1), (32, 4, 2)]


def hla_sweep(dev, shape=(8, 16, 1024, 128), dtype=torch.bfloat16) -> dict:
    """GPU time (no host work: :func:`gpu_time_ms`) of the Phase 8 kernel's fwd + bwd at the
    issue's shape under each ``[kernels.hyperbolic_linear_attention] gpu`` candidate, and SDPA
    cuDNN causal at the same shape; prints the pick as the recipe table that selects it."""
    import attrs
    from torch.nn.attention import SDPBackend

    from phase7fw.kernels.checks import gpu_time_ms
    from phase7fw.kernels.hyperbolic_linear_attention import TritonConfig
    from phase7fw.kernels.hyperbolic_linear_attention.kernel import hyperbolic_linear_attention_triton
    from phase7fw.kernels.hyperbolic_linear_attention.verify import inputs, sdpa_causal_fwd_bwd

    base = inputs(*shape, dev, dtype)
    ins = [t.clone().requires_grad_() for t in base]
    gout = torch.randn_like(base[2])
    times = {}
    for cand in HLA_SWEEP:
        cfg = attrs.evolve(TritonConfig(), gpu=cand)

        def fwd_bwd(cfg=cfg):
            o = hyperbolic_linear_attention_triton(*ins, 1.0, 64, tuning=cfg)
            torch.autograd.grad(o, ins, gout)

        try:
            times[cand] = gpu_time_ms(fwd_bwd)
        except Exception as exc:  # noqa: BLE001 - e.g. out of registers / shared memory
            times[cand] = float("inf")
            print("hla", cand, "failed:", str(exc).splitlines()[0][:120], flush=True)
    backend = SDPBackend.CUDNN_ATTENTION if dev.type == "cuda" else SDPBackend.MATH  # the CPU: a smoke run
    pick = min(times, key=times.get)
    sdpa_key = f"sdpa_{backend.name.lower()}_causal_gpu_ms"
    log = {"hla_gpu_ms": {str(k_): round(v_, 4) for k_, v_ in times.items()}, "pick": list(pick),
           sdpa_key: gpu_time_ms(sdpa_causal_fwd_bwd(base, gout, backend))}
    log["pick_vs_sdpa"] = times[pick] / log[sdpa_key]
    print("hla ->", log, f"\n[kernels.hyperbolic_linear_attention]\nimpl = \"triton\"\ngpu = {list(pick)}", flush=True)
    return log


def hla_profile(dev, shape=(8, 16, 1024, 128), dtype=torch.bfloat16, top: int = 20, compile_backend="inductor") -> dict:
    """Where the Phase 8 op's fwd + bwd time goes at the issue's shape: its GPU time called
    eagerly and with the wrapper compiled (the feature map fused; the custom op's own torch
    work stays as it is), SDPA cuDNN's, and the torch.profiler table of five calls of each
    (time per kernel), printed. (On the CPU, for tests: SDPA's math path, CPU times.)"""
    from torch.nn.attention import SDPBackend
    from torch.profiler import ProfilerActivity, profile

    from phase7fw.kernels.checks import gpu_time_ms
    from phase7fw.kernels.hyperbolic_linear_attention.kernel import hyperbolic_linear_attention_triton as hla
    from phase7fw.kernels.hyperbolic_linear_attention.verify import inputs, sdpa_causal_fwd_bwd

    base = inputs(*shape, dev, dtype)
    ins = [t.clone().requires_grad_() for t in base]
    gout = torch.randn_like(base[2])
    cuda = dev.type == "cuda"
    backend = SDPBackend.CUDNN_ATTENTION if cuda else SDPBackend.MATH
    log = {"shape": list(shape), "sdpa_cudnn_gpu_ms": gpu_time_ms(sdpa_causal_fwd_bwd(base, gout, backend))}
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    for name, fn in (("eager", hla), ("compiled", torch.compile(hla, backend=compile_backend))):
        def fwd_bwd(fn=fn):
            torch.autograd.grad(fn(*ins, 1.0, 64), ins, gout)

        log[f"{name}_gpu_ms"] = gpu_time_ms(fwd_bwd)
        with profile(activities=[activity]) as prof:
            for _ in range(5):
                fwd_bwd()
            if cuda:
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by=f"{'cuda' if cuda else 'cpu'}_time_total", row_limit=top,
                                          max_name_column_width=60)
        print(f"{name}: {log[f'{name}_gpu_ms']:.3f} ms per call (SDPA {log['sdpa_cudnn_gpu_ms']:.3f}); 5 calls:\n"
              + table, flush=True)
    print("hla profile ->", {k: round(v, 4) if isinstance(v, float) else v for k, v in log.items()}, flush=True)
    return log


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-verify", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="pick block sizes on this GPU first")
    ap.add_argument("--step-json", default=None,
                    help="a `phase7fw bench --json` file of the 1.5B recipe: P6 relates the HTT cost to its step time")
    ap.add_argument("--attention-only", action="store_true",
                    help="time the P3 attention rows against SDPA and stop (no FlexAttention, SSM or HTT)")
    ap.add_argument("--only-verify", type=int, nargs="*", default=None,
                    help="run only these verify cases (indices) and stop")
    ap.add_argument("--hla-sweep", action="store_true",
                    help="time the Phase 8 kernel's launch candidates at (8, 16, 1024, 128) against SDPA (GPU time)"
                    " and stop")
    ap.add_argument("--hla-profile", action="store_true",
                    help="where the Phase 8 op's time goes at (8, 16, 1024, 128): GPU time eager and compiled, and a"
                    " torch.profiler table of each; then stop")
    ap.add_argument("--ssm-only", action="store_true",
                    help="the AR-SSM scan A/B and stop: its verify cases (a row per schedule; unless --skip-verify"
                    " or --only-verify) and its timings under both [kernels.ar_ssm_scan] schedules")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    import triton

    from phase7fw.kernels.checks import peak_extra_mib
    from phase7fw.kernels.hyperbolic_attention.kernel import hyperbolic_attention_triton
    from phase7fw.kernels.hyperbolic_attention.verify import attention_inputs
    from phase7fw.kernels.verify import ORDER, format_table, verify

    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__, "date": datetime.date.today().isoformat(),
    }
    print(meta, flush=True)
    res: dict = {"meta": meta}
    md = [f"GPU {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}", ""]

    if args.hla_sweep or args.hla_profile:
        if args.hla_sweep:
            res["hla_sweep"] = hla_sweep(dev)
        if args.hla_profile:
            res["hla_profile"] = hla_profile(dev)
        save_json(out, res)
        return 0
    if args.sweep:
        res["sweep"] = sweep(dev)
        save_json(out, res)
        md += ["### Block-size sweep (ms)", "", "```", json.dumps(res["sweep"], indent=1, default=str), "```", ""]

    only = args.only_verify
    if args.ssm_only and only is None:
        only = [i for i, (op, _) in enumerate(ORDER) if op == "ar_ssm_scan"]
    if not args.skip_verify:
        rows = verify(dev, quick=args.quick, only=only)
        table = format_table(rows)
        print(table, flush=True)
        md += ["### Correctness (fp64 reference, gate 1e-2)", "", table, ""]
        res["verify"] = [r.__dict__ for r in rows]
        save_json(out, res)
        if args.only_verify is not None and not args.ssm_only:
            return 0 if all(r.ok for r in rows) else 1
        verified = all(r.ok for r in rows)
    else:
        verified = True

    if args.ssm_only:
        s, ratios = ssm_timings(dev)
        res.update(ssm_ms=s, ratios=ratios)
        report(out, res, md, s, ratios)
        return 0 if verified else 1

    # ---- P3 / P4: attention at (8, 16, 1024, 128), full causal -------------------------------
    B, H, T, D = 8, 16, 1024, 128
    q, k, v, c, tau = attention_inputs(B, H, T, D, dev)
    ins = [t.clone().requires_grad_() for t in (q, k, v, c, tau)]
    gout = torch.randn_like(v)

    def hyp_fb(window=T):
        o = hyperbolic_attention_triton(*ins, window)
        torch.autograd.grad(o, ins, gout)

    def hyp_f(window=T):
        with torch.no_grad():
            hyperbolic_attention_triton(*ins, window)

    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def fb():
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
                torch.autograd.grad(o, (qs, ks, vs), gout)
        return fb

    t = {}
    t["hyp_fwd"] = bench(hyp_f)
    t["hyp_fwd_bwd"] = bench(hyp_fb)
    t["hyp_fwd_bwd_w256"] = bench(lambda: hyp_fb(256))
    t["hyp_fwd_bwd_w128"] = bench(lambda: hyp_fb(128))
    for name, be in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_fa2", SDPBackend.FLASH_ATTENTION)):
        try:
            t[name + "_fwd_bwd"] = bench(sdpa(be))
        except Exception as exc:  # noqa: BLE001
            t[name + "_fwd_bwd"] = float("nan")
            print(name, "failed:", exc, flush=True)
    try:
        if not args.attention_only:
            t["flex_poincare_fwd_bwd"] = bench(flex_poincare(B, H, T, D, dev))
    except Exception as exc:  # noqa: BLE001
        t["flex_poincare_fwd_bwd"] = float("nan")
        print("flex failed:", repr(exc)[:500], flush=True)
    # the same tokens at T = 4096 (B = 2): full causal and window 256 vs SDPA cuDNN causal
    q4, k4, v4, c4, tau4 = attention_inputs(2, H, 4096, D, dev)
    i4 = [x.clone().requires_grad_() for x in (q4, k4, v4, c4, tau4)]
    g4 = torch.randn_like(v4)

    def hyp4(window):
        def fb():
            o = hyperbolic_attention_triton(*i4, window)
            torch.autograd.grad(o, i4, g4)
        return fb

    def sdpa4():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(i4[0], i4[1], i4[2], is_causal=True)
            torch.autograd.grad(o, i4[:3], g4)

    t["T4096_hyp_fwd_bwd"] = bench(hyp4(4096))
    t["T4096_hyp_fwd_bwd_w256"] = bench(hyp4(256))
    try:
        t["T4096_sdpa_cudnn_fwd_bwd"] = bench(sdpa4)
    except Exception as exc:  # noqa: BLE001
        t["T4096_sdpa_cudnn_fwd_bwd"] = float("nan")
        print("sdpa T4096 failed:", exc, flush=True)
    res["attention_ms"] = t
    print(t, flush=True)
    if args.attention_only:
        save_json(out, res)
        return 0

    mem = {}
    for TT in (1024, 2048, 4096):
        q2, k2, v2, c2, tau2 = attention_inputs(1, H, TT, D, dev)
        i2 = [x.clone().requires_grad_() for x in (q2, k2, v2, c2, tau2)]
        g2 = torch.randn_like(v2)

        def f2():
            o = hyperbolic_attention_triton(*i2, TT)
            torch.autograd.grad(o, i2, g2)

        f2()
        mem[TT] = peak_extra_mib(f2)
    res["attention_peak_extra_mib_B1_H16"] = mem

    # ---- P5: AR-SSM scan at (B=8, T=1024, d_model=2048), both schedules, and long sequences ---
    s, ssm_ratios = ssm_timings(dev)
    res["ssm_ms"] = s

    # ---- P6: HTT embedding cost per optimizer step of the 1.5B recipe -------------------------
    # vocab 32000, d_model 2048, 2 cores, rank 32; a step of `micro` micro-batches of `tokens`
    # tokens: `micro` gathers (fwd + bwd) plus one rebuild of the tied table (fwd + bwd). The
    # overhead is what a dense table's lookup would not cost, as a share of the step time that
    # `phase7fw bench` measured (--step-json).
    from phase7fw.components.phase7.embedding import HTTEmbedding
    from phase7fw.kernels.htt_embedding.kernel import htt_embedding_triton

    emb = HTTEmbedding(32000, 2048, 2, 32).to(dev)
    emb.init_weights()
    emb.gather_fn = htt_embedding_triton
    dense = torch.nn.Embedding(32000, 2048, device=dev)
    step = json.loads(Path(args.step_json).read_text())["runs"][0] if args.step_json else None
    micro = step["grad_accum_steps"] if step else 16
    tokens = step["batch_size"] * step["seq_len"] if step else 1024
    ids = torch.randint(0, 32000, (1, tokens), device=dev)
    g_rows = torch.randn(1, tokens, 2048, device=dev)
    g_table = torch.randn(32000, 2048, device=dev)
    h = {
        "htt_gather_fwd_bwd": bench(lambda: emb(ids).backward(g_rows)),
        "htt_table_rebuild_fwd_bwd": bench(lambda: emb.weight_matrix().backward(g_table)),
        "dense_lookup_fwd_bwd": bench(lambda: dense(ids).backward(g_rows)),
    }
    h["htt_per_step"] = micro * h["htt_gather_fwd_bwd"] + h["htt_table_rebuild_fwd_bwd"]
    h["dense_per_step"] = micro * h["dense_lookup_fwd_bwd"]
    res["htt_ms"] = h
    print(h, flush=True)

    ratios = {
        "P3 hyp / sdpa_cudnn (target <= 2.0, stretch 1.3)": t["hyp_fwd_bwd"] / t["sdpa_cudnn_fwd_bwd"],
        "P3' hyp / sdpa_fa2": t["hyp_fwd_bwd"] / t["sdpa_fa2_fwd_bwd"],
        "P3 window 256 / sdpa_cudnn full causal": t["hyp_fwd_bwd_w256"] / t["sdpa_cudnn_fwd_bwd"],
        "P3 window 128 / sdpa_cudnn full causal": t["hyp_fwd_bwd_w128"] / t["sdpa_cudnn_fwd_bwd"],
        "P3 T=4096 full causal / sdpa_cudnn": t["T4096_hyp_fwd_bwd"] / t["T4096_sdpa_cudnn_fwd_bwd"],
        "P3 T=4096 window 256 / sdpa_cudnn full causal": t["T4096_hyp_fwd_bwd_w256"] / t["T4096_sdpa_cudnn_fwd_bwd"],
        "P4 flex_poincare / hyp (target >= 5, stretch 8)": t["flex_poincare_fwd_bwd"] / t["hyp_fwd_bwd"],
        "P5 ssm / sdpa_fa2 (target <= 1.5, stretch 1.0)": s["ssm_triton_fwd_bwd"] / t["sdpa_fa2_fwd_bwd"],
        "P5 ssm schedule chunks / sdpa_fa2": s["ssm_triton_chunks_ieee_fwd_bwd"] / t["sdpa_fa2_fwd_bwd"],
        **({"P5 ssm fla backend / sdpa_fa2": s["ssm_fla_fwd_bwd"] / t["sdpa_fa2_fwd_bwd"]} if "ssm_fla_fwd_bwd" in s else {}),
        **ssm_ratios,
    }
    if step:
        step_ms = step["step_time_s"] * 1e3
        ratios[f"P6 HTT overhead / step ({micro} x {tokens} tokens, step {step_ms:.0f} ms) (target <= 0.02)"] = (
            (h["htt_per_step"] - h["dense_per_step"]) / step_ms)
    res["ratios"] = ratios
    md += ["| peak extra memory, attention fwd+bwd, B=1 H=16 D=128 | MiB |", "|---|---|"]
    md += [f"| T={k} | {v:.1f} |" for k, v in mem.items()] + [""]
    report(out, res, md, {**t, **s, **h}, ratios)
    return 0


def save_json(out: Path, res: dict) -> None:
    """kernels.json: everything measured so far (written after each part, so a run cut short keeps it)."""
    (out / "kernels.json").write_text(json.dumps(res, indent=1, default=str))


def report(out: Path, res: dict, md: list, timings: dict, ratios: dict) -> None:
    """Print the Markdown (``md`` then the timings and ratios tables) and write kernels.md and kernels.json."""
    md += ["### Timings (median ms, do_bench)", "", "| what | ms |", "|---|---|"]
    md += [f"| {k} | {v:.3f} |" for k, v in timings.items()]
    md += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    text = "\n".join(md)
    print(text, flush=True)
    (out / "kernels.md").write_text(text + "\n")
    save_json(out, res)


if __name__ == "__main__":
    sys.exit(main())

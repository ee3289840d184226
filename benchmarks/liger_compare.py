"""Our RMSNorm, SwiGLU and linear cross-entropy kernels against liger-kernel's, at the 1.5B
step's shapes (issue 16: "well-kept kernels where they are faster than ours ... measure them
behind the existing [kernels] switch and keep the faster").

    python benchmarks/liger_compare.py [--rows 8192] [--out runs/liger_compare]

For each op, bf16 inputs at (rows = B*T tokens, d_model 2048, ffn 4096, vocab 32000), the
forward + backward of: the torch reference, our Triton kernel and liger's, each with its
relative error against the float64 reference (output and every gradient; the numerics gate
is 1e-2), its wall-clock time (``triton.testing.do_bench`` median of an eager forward +
backward, ms: includes the host's dispatch, ~0.3 ms per custom-op call on the GPU machine),
its GPU time (the same forward + backward captured in a CUDA graph and replayed: what a
compiled, graphed step pays) and peak extra memory. Prints a Markdown table, writes OUT.json
and OUT.md. Needs a CUDA GPU and ``pip install liger-kernel`` (its kernels run on CUDA only);
it says so and exits 2 otherwise.
The answer decides whether a ``liger`` entry behind ``[kernels]`` is worth having.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _liger():
    """liger's three functions, or an error message with the install hint."""
    try:
        from liger_kernel.transformers.functional import (
            liger_fused_linear_cross_entropy,
            liger_rms_norm,
            liger_swiglu,
        )
    except Exception as exc:  # noqa: BLE001 - missing or broken against this torch / Triton
        return None, f"liger-kernel cannot be imported ({type(exc).__name__}: {exc}); pip install liger-kernel"
    # in_place=False: liger's default writes the RMSNorm backward into dy, which the timing loop reuses
    rms = lambda x, w, eps: liger_rms_norm(x, w, eps, in_place=False)  # noqa: E731
    ce = lambda h, w, y: liger_fused_linear_cross_entropy(h, w, y)  # noqa: E731
    return {"rmsnorm": rms, "swiglu": liger_swiglu, "cross_entropy": ce}, None


def _inputs(op: str, rows: int, g: torch.Generator):
    """(differentiable bf16 inputs, other arguments, output gradient or None for a loss)."""
    d, ffn, vocab = 2048, 4096, 32000
    if op == "rmsnorm":
        x, w = torch.randn(rows, d, generator=g), 1 + 0.1 * torch.randn(d, generator=g)
        return [x, w], (1e-5,), torch.randn(rows, d, generator=g)
    if op == "swiglu":
        return [torch.randn(rows, ffn, generator=g), torch.randn(rows, ffn, generator=g)], (), \
            torch.randn(rows, ffn, generator=g)
    h, w = torch.randn(rows, d, generator=g), torch.randn(vocab, d, generator=g) * d**-0.5
    return [h, w], (torch.randint(0, vocab, (rows,), generator=g),), None


def _ours_and_reference(op: str):
    from phase7fw.kernels.cross_entropy.kernel import linear_cross_entropy_triton
    from phase7fw.kernels.cross_entropy.reference import linear_cross_entropy
    from phase7fw.kernels.rmsnorm.kernel import rmsnorm_triton
    from phase7fw.kernels.rmsnorm.reference import rmsnorm_reference
    from phase7fw.kernels.swiglu.kernel import swiglu_triton
    from phase7fw.kernels.swiglu.reference import swiglu_reference

    return {
        "rmsnorm": (rmsnorm_triton, rmsnorm_reference),
        "swiglu": (swiglu_triton, swiglu_reference),
        "cross_entropy": (lambda h, w, y: linear_cross_entropy_triton(h, w, y, 0), linear_cross_entropy),
    }[op]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _graph_ms(fwd_bwd) -> float:
    """Median ms of ``fwd_bwd`` replayed as a CUDA graph (no host work between kernels)."""
    import triton.testing

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as capture requires
        for _ in range(3):
            fwd_bwd()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fwd_bwd()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=50)


def _why(exc: Exception, limit: int) -> str:
    text = str(exc).splitlines()[0][:limit] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def measure(op: str, impls: dict, rows: int, device) -> dict:
    """Errors against float64 and GPU time of each implementation of ``op`` (``impls["reference"]``,
    the torch reference, also gives the float64 result)."""
    import triton.testing

    g = torch.Generator().manual_seed(0)
    diff, other, gout = _inputs(op, rows, g)
    other = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in other)
    ref_in = [t.to(device, torch.float64).requires_grad_() for t in diff]
    ref_out = impls["reference"](*ref_in, *other)
    gout64 = None if gout is None else gout.to(device, torch.float64)
    ref_grads = torch.autograd.grad(ref_out, ref_in, gout64)
    result = {}
    for name, fn in impls.items():
        ins = [t.to(device, torch.bfloat16).requires_grad_() for t in diff]
        go = None if gout is None else gout.to(device, torch.bfloat16)
        try:
            out = fn(*ins, *other)
            grads = torch.autograd.grad(out, ins, go)
            errors = {"out": _rel(out, ref_out), **{f"d{i}": _rel(a, b) for i, (a, b) in
                                                     enumerate(zip(grads, ref_grads))}}

            def fwd_bwd(fn=fn, ins=ins, go=go):
                torch.autograd.grad(fn(*ins, *other), ins, go)

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fwd_bwd()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            ms = triton.testing.do_bench(fwd_bwd, warmup=10, rep=50)
            result[name] = {"errors": errors, "gate_ok": max(errors.values()) <= 1e-2, "fwd_bwd_ms": ms,
                            "peak_extra_mib": peak}
            try:
                result[name]["graph_ms"] = _graph_ms(fwd_bwd)
            except Exception as exc:  # noqa: BLE001 - an op that cannot be captured still has its eager time
                result[name]["graph_error"] = _why(exc, 120)
        except Exception as exc:  # noqa: BLE001 - one failing implementation never hides the others
            result[name] = {"error": _why(exc, 200)}
    return result


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = [f"liger-kernel {env['liger']} vs ours, {env['gpu']}, torch {env['torch']}, triton {env['triton']},"
             f" {env['date']}; bf16, rows = {res['rows']} tokens; fwd+bwd ms (do_bench median: eager wall clock,"
             " then GPU time as a replayed CUDA graph), max relative error of output and gradients against"
             " float64, peak extra memory", "",
             "| op | torch reference | ours (Triton) | liger | ours / liger (eager, graph) |", "|---|---|---|---|---|"]

    def cell(r):
        if "error" in r:
            return f"failed: {r['error']}"
        graph = f"{r['graph_ms']:.3f} ms" if "graph_ms" in r else "capture failed"
        return (f"{r['fwd_bwd_ms']:.3f} ms, graph {graph}, err {max(r['errors'].values()):.1e},"
                f" {r['peak_extra_mib']:.0f} MiB")

    def speedup(a, b, key):
        return f"{a[key] / b[key]:.2f}" if key in a and key in b else "-"

    for op, r in res["ops"].items():
        ours, lig = r.get("ours", {}), r.get("liger", {})
        ratio = f"{speedup(ours, lig, 'fwd_bwd_ms')}, {speedup(ours, lig, 'graph_ms')}"
        lines.append(f"| {op} | {cell(r['reference'])} | {cell(ours)} | {cell(lig)} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192, help="tokens per call (B x T of the step; default 8 x 1024)")
    ap.add_argument("--out", default="runs/liger_compare", help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: liger_compare needs a CUDA GPU (liger-kernel's kernels run on CUDA only)", file=sys.stderr)
        return 2
    if args.rows < 1:
        print(f"error: --rows must be >= 1, got {args.rows}", file=sys.stderr)
        return 2
    liger, why = _liger()
    if liger is None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    import datetime
    from importlib.metadata import version

    import triton

    device = torch.device("cuda")
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "liger": version("liger-kernel"), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(" ", "minutes")}
    res = {"environment": env, "rows": args.rows, "ops": {}}
    for op in ("rmsnorm", "swiglu", "cross_entropy"):
        ours, reference = _ours_and_reference(op)
        res["ops"][op] = measure(op, {"reference": reference, "ours": ours, "liger": liger[op]}, args.rows, device)
        print(op, json.dumps(res["ops"][op], default=str), flush=True)
    from benchmarks._report import write_report

    write_report(args.out, res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``phase7fw doctor``: what this machine can run, in one screen."""

from __future__ import annotations

import platform
import sys


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as exc:  # noqa: BLE001 - any import failure is a finding, not a crash
        return f"not usable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})".rstrip(": )") + ")"
    return getattr(mod, "__version__", "installed")


def _dist_version(dist: str) -> str:
    """The installed version of a distribution, without importing it (fla's import warns on a
    machine without a GPU)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def run_doctor(require_gpu: bool = False, verify: bool = False) -> int:
    import torch

    from phase7fw import __version__
    from phase7fw.cli.common import plugins

    warnings: list[str] = []
    print(f"phase7fw  {__version__}")
    print(f"python    {sys.version.split()[0]} ({platform.platform()})")
    print(f"torch     {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"triton    {_version('triton')}")
    has_gpu = torch.cuda.is_available()
    if has_gpu:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"gpu {i}     {props.name}, {props.total_memory / 2**30:.1f} GiB, capability {props.major}.{props.minor}")
        print(f"bf16      {'supported' if torch.cuda.is_bf16_supported() else 'NOT supported'}")
    else:
        warnings.append("no CUDA GPU: training runs on the CPU (fine for tiny recipes); Triton kernels are off")
    for name in ("datasets", "tokenizers", "wandb"):
        print(f"{name:<9} {_version(name)}")
    fla = _dist_version("fla-core")
    print(f"fla-core  {fla} (optional, CUDA only: [kernels] hyperbolic_linear_attention = \"fla\","
          " ar_ssm_scan = \"fla\""
          + ("; pip install fla-core einops)" if fla == "not installed" else ")"))
    if fla != "not installed":
        from phase7fw.kernels._fla import gated_backward_refusal

        if reason := gated_backward_refusal():
            warnings.append(f"{reason}: \"fla\" cannot train either op with decay here (upgrade Triton to"
                            " >= 3.7.1 or pip install tilelang; our Triton kernels are not affected)")

    from phase7fw.plugins import PluginError

    try:
        plugins = plugins()
    except PluginError as exc:  # a broken built-in: say so and check the rest
        print(f"plugins   FAILED: {exc}")
        for w in warnings:
            print(f"warning: {w}")
        print("error: phase7fw's own plugins do not load; reinstall phase7fw", file=sys.stderr)
        return 1
    print(f"plugins   {len(plugins.describe())} loaded, {len(plugins.load_errors)} failed")
    for err in plugins.load_errors:
        warnings.append(f"plugin {err.name} failed and is disabled: {err}")
    from phase7fw.kernels import triton_usable

    kernels = plugins.registry.entries("kernel")
    usable, why = triton_usable("cuda" if has_gpu else "cpu")
    if not kernels:
        print("kernels   none registered (the reference torch code is used)")
    elif usable:
        print(f"kernels   {', '.join(e.name for e in kernels)} ({why})")
    else:  # registered is not the same as usable: say which code runs
        print(f"kernels   {len(kernels)} Triton kernels registered, not usable here ({why});"
              " the reference torch code is used")
    failed = False
    if kernels and usable:
        failed |= _kernel_smoke(has_gpu, warnings)
    if verify:
        if not has_gpu:
            print("verify: kernel verification needs a CUDA GPU", file=sys.stderr)
            return 1
        if not kernels:
            print("verify: no Triton kernels are registered; nothing to verify")
        else:
            failed |= _kernel_verify()
    for w in warnings:
        print(f"warning: {w}")
    if require_gpu and not has_gpu:
        print("error: --require-gpu given and no CUDA GPU is usable", file=sys.stderr)
        return 1
    if failed:
        print("error: a kernel failed its check (table above)", file=sys.stderr)
        return 1
    return 0


def _kernel_smoke(has_gpu: bool, warnings: list[str]) -> bool:
    """Compile and run every kernel on a tiny input (GPU, or the Triton interpreter when
    TRITON_INTERPRET=1 on a CPU machine). Returns True if one failed."""
    import torch

    from phase7fw.kernels import triton_usable

    device = "cuda" if has_gpu else "cpu"
    _, why = triton_usable(device)
    from phase7fw.kernels.verify import smoke

    where = "GPU" if has_gpu else "Triton interpreter (TRITON_INTERPRET=1)"
    print(f"kernel check on a tiny input, {where}, {why}:")
    rows = smoke(torch.device(device))
    for r in rows:
        status = "ok  " if r.ok else "FAIL"
        errs = ", ".join(f"{k} {v:.1e}" for k, v in r.errors.items())
        name = r.op if r.case == "tiny" else f"{r.op} ({r.case.removeprefix('tiny, ')})"
        print(f"  {status} {name:<26} {r.ms.get('first_call_incl_compile', 0):8.0f} ms  {r.detail} {errs}".rstrip())
    return not all(r.ok for r in rows)


def _kernel_verify() -> bool:
    import torch

    from phase7fw.kernels.verify import format_table, verify

    print("verify: every kernel vs its fp64 reference (bf16 inputs, fresh random, gate rel. err <= 1e-2)")
    rows = verify(torch.device("cuda"))
    print(format_table(rows))
    return not all(r.ok for r in rows)


def cmd_doctor(args) -> int:
    return run_doctor(require_gpu=args.require_gpu, verify=args.verify)


def add_doctor(sub) -> None:
    doc = sub.add_parser("doctor", help="check the environment (versions, GPU, kernels)")
    doc.add_argument("--verify", action="store_true", help="check every kernel against its reference on the GPU")
    doc.add_argument("--require-gpu", action="store_true", help="exit 1 when no CUDA GPU is usable")
    doc.set_defaults(func=cmd_doctor)

"""Parity rows of the HTT embedding kernel for ``phase7fw doctor`` and ``doctor --verify``: rows and
every core's gradient against the float64 reference, with timings of the kernel, the torch
reference, one full-table rebuild (tied head) and a dense lookup."""

from __future__ import annotations

import math

import torch

from phase7fw.kernels.htt_embedding.reference import balanced_factors, htt_embedding_reference, htt_full_table
from phase7fw.kernels.checks import _bench, _rel, gated_row, gpu_time_ms, guarded


def htt_embedding_triton(*args, **kwargs):
    from phase7fw.kernels.htt_embedding.kernel import htt_embedding_triton as impl

    return impl(*args, **kwargs)


class _Table:
    """Cores and scale in the model's HTT layout and init (unit-variance contraction, scale 0.02)."""

    def __init__(self, vocab, d_model, n_cores, rank, device, seed=0):
        g = torch.Generator().manual_seed(seed)
        ranks = [1] + [rank] * (n_cores - 1) + [1]
        std = math.prod(ranks) ** (-1.0 / (2 * n_cores))
        factors = zip(balanced_factors(vocab, n_cores), balanced_factors(d_model, n_cores))
        self.cores = [(torch.randn(ranks[k], v, d, ranks[k + 1], generator=g) * std).to(device).requires_grad_()
                      for k, (v, d) in enumerate(factors)]
        self.scale = torch.full((1,), 0.02, device=device, requires_grad=True)
        self.vocab_size, self.d_model = vocab, d_model

    def weight_matrix(self) -> torch.Tensor:
        return htt_full_table(self.cores, self.scale, self.vocab_size, self.d_model)


def _module(vocab, d_model, n_cores, rank, device, seed=0):
    return _Table(vocab, d_model, n_cores, rank, device, seed)


def _ids(vocab, n, device, seed=0):
    """Uniform ids plus a Zipf-like head: a few ids repeated many times (the atomics' worst case)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n,), generator=g)
    head = n // 4
    ids[:head] = torch.randint(0, min(vocab, 8), (head,), generator=g)
    ids[-1] = vocab - 1  # the last row: the digits' upper edge
    return ids[torch.randperm(n, generator=g)].to(device)


def _check(vocab, d_model, n_cores, rank, n_tokens, device, case, timings, autocast=False):
    m = _module(vocab, d_model, n_cores, rank, device)
    ids = _ids(vocab, n_tokens, device)
    params = [*m.cores, m.scale]
    # under bf16 autocast (as in bf16 training) the kernel's dots are TF32
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = htt_embedding_triton(ids, list(m.cores), m.scale, d_model)
    gout = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, gout)
    ref_params = [p.detach().double().requires_grad_() for p in params]
    ref = htt_embedding_reference(ids, ref_params[:-1], ref_params[-1], d_model)
    ref_grads = torch.autograd.grad(ref, ref_params, gout.double())
    errors = {"out": _rel(out, ref)}
    for k in range(n_cores):
        errors[f"dG{k + 1}"] = _rel(grads[k], ref_grads[k])
    errors["dscale"] = _rel(grads[-1], ref_grads[-1])
    row = gated_row("htt_embedding", case, errors, (out, *grads), ok=out.dtype == torch.float32)
    del ref, ref_grads, ref_params
    if timings:
        row.ms.update(_timings(m, ids, gout, device, autocast))
    return row


def _timings(m, ids, gout, device, autocast) -> dict:
    params = [*m.cores, m.scale]
    cores, d_model = list(m.cores), m.d_model

    def tri():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = htt_embedding_triton(ids, cores, m.scale, d_model)
        torch.autograd.grad(out, params, gout)

    def ref():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = htt_embedding_reference(ids, cores, m.scale, d_model)
        torch.autograd.grad(out, params, gout)

    table_grad = torch.randn(m.vocab_size, d_model, device=device)

    def table():  # the tied head's once-per-step rebuild
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            full = m.weight_matrix()
        torch.autograd.grad(full, params, table_grad)

    dense = torch.nn.Parameter(torch.randn(m.vocab_size, d_model, device=device) * 0.02)

    def dense_fb():  # P6's yardstick: a dense table's lookup, fwd + bwd
        torch.autograd.grad(torch.nn.functional.embedding(ids, dense), dense, gout)

    fns = {"triton": tri, "reference": ref, "weight_matrix": table, "dense": dense_fb}
    ms = {f"{k}_fwd_bwd": _bench(fn, device) for k, fn in fns.items()}
    if device.type == "cuda":
        ms.update({f"{k}_fwd_bwd_gpu": gpu_time_ms(fn) for k, fn in fns.items()})
    return ms


def smoke_rows(device: torch.device) -> list:
    """Compile and run the kernel on tiny fp32 inputs (2 and 3 cores), forward and backward."""
    return [guarded("htt_embedding", f"tiny, {n} cores",
                    lambda n=n: _check(101, 30, n, 5, 24, device, f"tiny, {n} cores", timings=False), first_call=True)
            for n in (2, 3)]


def verify_rows(device: torch.device, quick: bool = False) -> list:
    """Real shape (vocab 32000, d_model 2048, rank 32, 8 x 1024 ids with repeats), fp32 cores as
    in training, against the fp64 reference; with timings of the kernel, the torch reference,
    one weight_matrix() rebuild (tied head, once per step) and a dense lookup (P6)."""
    cases = [("fp32 V=32000 D=2048 2 cores r=32, 8x1024 ids", 2, False)]
    if not quick:
        cases += [("same, under bf16 autocast (TF32 dots)", 2, True), ("fp32 V=32000 D=2048 3 cores r=32, 8x1024 ids", 3, False)]
    rows = []
    for case, n_cores, autocast in cases:
        rows.append(guarded("htt_embedding", case,
                            lambda: _check(32000, 2048, n_cores, 32, 8 * 1024, device, case, True, autocast)))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def verify_cases(device: torch.device, quick: bool = False) -> list:
    """One case (several rows): see :func:`verify_rows`."""
    return [lambda: verify_rows(device, quick)]

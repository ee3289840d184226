"""The AR-SSM's causal depthwise convolution, shared by training (:mod:`.ssm`) and decoding
(:mod:`.cached`, :mod:`.static`), so prefill, one-token steps and training compute the same numbers."""

from __future__ import annotations

import torch


def depthwise_conv(seq: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.conv1d(seq, weight, bias, groups=d)`` for seq (b, d, L), weight (d, 1, K): (b, d, L-K+1),
    as K shifted multiply-adds. Why not conv1d: on CUDA a depthwise conv1d runs cuDNN's conv2d
    path (19 ms of a 310 ms 1.5B step, forward + backward, benchmarks/RESULTS.md), while these
    few elementwise ops fuse into one kernel under torch.compile (and into its neighbours).
    Accumulates in fp32 (fp64 stays fp64) and rounds once, like cuDNN; under autocast inputs and
    result have the autocast dtype, like conv1d's."""
    out_dtype = torch.promote_types(seq.dtype, weight.dtype)
    if torch.is_autocast_enabled(seq.device.type):  # conv1d's inputs are cast: so are ours
        out_dtype = torch.get_autocast_dtype(seq.device.type)
        seq, weight, bias = seq.to(out_dtype), weight.to(out_dtype), bias.to(out_dtype)
    acc = torch.float64 if torch.float64 in (seq.dtype, weight.dtype) else torch.float32
    K, n = weight.shape[-1], seq.shape[-1] - weight.shape[-1] + 1
    w = weight.reshape(-1, K).to(acc)
    out = bias.to(acc).unsqueeze(-1) + w[:, :1] * seq[..., :n].to(acc)
    for k in range(1, K):
        out = out + w[:, k : k + 1] * seq[..., k : k + n].to(acc)
    return out.to(out_dtype)

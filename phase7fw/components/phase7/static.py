"""The static one-token decode step of the Phase 7 mixers (see :mod:`phase7fw.inference.decoding`).

Each function mirrors its dynamic counterpart in :mod:`.cached` for one token whose position is
a device tensor ``pos``:

- attention: RoPE angles are computed from ``pos`` (the same fp64 products position * inv_freq
  as the tables and :func:`.cached.rope_at`, so phase7 has no position limit), the new key and
  value go to slot pos % W of a :class:`StaticRing`, the query scores every slot with the
  same score function as the dynamic path, unfilled slots masked;
- AR-SSM: :func:`.cached.ssm_step` (shared with the dynamic path), conv tail and state copied
  back into their buffers in place.
"""

from __future__ import annotations

import torch

from phase7fw.components.phase7.cached import SsmCache, hyperbolic_scores, ssm_step
from phase7fw.components.phase7.rotary import RotaryEmbedding
from phase7fw.components.caches import StaticRing, dot_product_scores, ring_attention


# ----------------------------------------------------------------------------- attention
class StaticAttention:
    """A window attention's ring and its RoPE inverse frequencies (fp64)."""

    def __init__(self, attn, kv):
        self.ring = StaticRing(kv)
        self.inv_freq = attn.rope.inv_freq(self.ring.k.device)

    def load(self, kv) -> None:
        self.ring.load(kv)

    def store(self, kv, pos: int) -> None:
        self.ring.store(kv, pos)


def rope_at_pos(x: torch.Tensor, inv_freq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """:func:`.cached.rope_at` for one position held in a device tensor (x: (B, H, 1, D))."""
    cos, sin = RotaryEmbedding.angles(pos.view(1), inv_freq)
    return RotaryEmbedding.rotate(x, cos, sin)


def attention_step(attn, u: torch.Tensor, st: StaticAttention, pos: torch.Tensor, hyperbolic: bool,
                   projected=None) -> torch.Tensor:
    q, k, v = attn.projected(u, projected)
    q, k = rope_at_pos(q, st.inv_freq, pos), rope_at_pos(k, st.inv_freq, pos)
    if hyperbolic:
        c, tau = attn.curvature(), attn.temperature()
        o = ring_attention(q, k, v, st.ring, pos, lambda qb, keys: hyperbolic_scores(qb, keys, c, tau, attn.score))
    else:  # sdpa with a window, as sdpa_forward_cached
        o = ring_attention(q.to(v.dtype), k.to(v.dtype), v, st.ring, pos, dot_product_scores)
    return attn._out(o)


# ----------------------------------------------------------------------------- AR-SSM
class StaticSsm:
    """The conv tail and the state of an :class:`SsmCache` in fixed buffers."""

    def __init__(self, cache: SsmCache):
        self.conv, self.state = cache.conv.clone(), cache.state.clone()

    def load(self, cache: SsmCache) -> None:
        self.conv.copy_(cache.conv)
        self.state.copy_(cache.state)

    def store(self, cache: SsmCache, pos: int) -> None:
        cache.conv, cache.state, cache.pos = self.conv.clone(), self.state.clone(), pos


def ssm_static_step(ssm, u: torch.Tensor, st: StaticSsm, projected=None) -> torch.Tensor:
    out, conv, state = ssm_step(ssm, u, st.conv, st.state, projected)
    st.conv.copy_(conv)
    st.state.copy_(state)
    return out

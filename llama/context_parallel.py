"""Context parallelism (CP): causal self-attention with the sequence split over the mesh's `context` axis.

The design of Llama 3 (paper section 3.3.2): each device keeps its own queries and all-gathers the keys and
values over `context`, then computes attention for its local query chunk against the whole row, document mask
included, with the blockwise attention of llama/attention.py. Under GQA the K and V of a row are N/K times
smaller than its queries (8 KV heads against 128 query heads at 405B), so gathering them is cheap next to the
attention itself, and one collective per layer (its transpose, a reduce-scatter of dK and dV, in the backward)
replaces ring attention's CP-1 send/receive steps. docs/sharding.md compares the two.

Rows arrive in the causal load-balanced order of input_pipeline/context.py (2 x CP chunks; device i holds
chunks i and 2CP-1-i), so every device has the same amount of causal work. Attention masks need each token's
true slot in the row: the local queries' slots come from that order and the device's index on `context`; the
gathered keys are put back in slot order (a static reshape), so they sit at slots 0..T-1 as in one-device
attention and the causal and document masks are exactly those of the unsplit row.

Everything else in the model is position-wise (norms, projections, MLP, RoPE with the positions that travel
with their tokens), so GSPMD shards it over `context` from the rules table (`sequence` -> `context`) alone;
only attention needs this explicit `shard_map`. Differentiating through it gives dK, dV for the gathered keys,
and the all-gather's transpose (a reduce-scatter) returns each device its own share.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


AXIS = "context"


def context_size() -> int:
    """The `context` axis size of the mesh being traced under (`jax.set_mesh` / `use_abstract_mesh`); 1 without."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AXIS not in mesh.axis_names:
        return 1
    return mesh.shape[AXIS]


def default_positions(B: int, T: int) -> jax.Array:
    """[B, T] positions of an unpacked row as the model receives it: 0..T-1, in the load-balanced order
    (input_pipeline/context.py) when tracing under a mesh with context > 1."""
    from input_pipeline.context import load_balanced_order  # here, not at import: the package pulls in grain

    cp = context_size()
    slots = jnp.arange(T, dtype=jnp.int32) if cp == 1 else jnp.asarray(load_balanced_order(T, cp))
    return jnp.broadcast_to(slots, (B, T))


def local_slots(T: int, cp: int) -> jax.Array:
    """Inside the shard_map: [T/CP] the true slots of this device's queries (chunks i and 2CP-1-i, increasing)."""
    c = T // (2 * cp)
    i = jax.lax.axis_index(AXIS)
    first = jnp.arange(c, dtype=jnp.int32)
    return jnp.concatenate([i * c + first, (2 * cp - 1 - i) * c + first])


def to_slot_order(x: jax.Array, cp: int) -> jax.Array:
    """A gathered [B, T, ...] in the load-balanced order -> slot order. Gathered position d*2c + h*c + r is chunk
    d (h=0) or 2CP-1-d (h=1): the first halves in device order, then the second halves reversed."""
    B, T = x.shape[:2]
    x = x.reshape(B, cp, 2, T // (2 * cp), *x.shape[2:])
    return jnp.concatenate([x[:, :, 0], jnp.flip(x[:, :, 1], axis=1)], axis=1).reshape(B, T, *x.shape[4:])


def _fitted(axes: tuple[str, ...], size: int, mesh) -> tuple[str, ...] | None:
    """The mesh axes (in order) whose product still divides `size`, as sharding.rules.fitted_spec keeps them."""
    kept, n = [], 1
    for a in axes:
        if size % (n * mesh.shape[a]) == 0:
            kept.append(a)
            n *= mesh.shape[a]
    return tuple(kept) or None


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *, impl: str,
              block_q: int, block_k: int) -> jax.Array:
    """Causal self-attention of a load-balanced row under a mesh with `context` > 1.
    q: [B, T, N, H], k, v: [B, T, K, H], segment_ids: [B, T] or None -> [B, T, N, H] (same order as q).

    Rows split over (data, fsdp) and the sequence over `context`, as the rules table shards activations; heads
    over `tensor` when both N and K divide it (else each tensor shard computes all heads: same result). The
    fused kernels ("cudnn", "splash") have no slot-offset masks, so they run as "flash" here; "xla" stays the
    dense reference (for tests)."""
    from llama import attention as attn  # the kernels; attention.attention dispatches here (no import cycle)
    from input_pipeline.context import load_balanced_order
    from sharding.rules import RULES

    mesh = jax.sharding.get_abstract_mesh()
    cp = mesh.shape[AXIS]
    B, T, N, H = q.shape
    K = k.shape[2]
    load_balanced_order(T, cp)  # the clear error when T is not a multiple of 2 x context
    batch = _fitted(tuple(a for a in RULES["batch"] if a in mesh.axis_names), B, mesh)
    tensor = "tensor" if "tensor" in mesh.axis_names and N % mesh.shape["tensor"] == 0 and \
        K % mesh.shape["tensor"] == 0 else None
    heads, rows = P(batch, AXIS, tensor, None), P(batch, AXIS)
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    Tl = T // cp
    bq, bk = min(block_q, Tl), min(block_k, T)

    def local(q, k, v, seg):
        gather = lambda x: to_slot_order(jax.lax.all_gather(x, AXIS, axis=1, tiled=True), cp)  # noqa: E731
        kg, vg, k_seg = gather(k), gather(v), gather(seg)
        slots = jnp.broadcast_to(local_slots(T, cp), seg.shape)
        if impl == "xla":
            return attn._reference(q, kg, vg, slots, seg, k_seg)
        return attn._flash(q, kg, vg, seg, k_seg, slots, bq, bk)

    return jax.shard_map(local, in_specs=(heads, heads, heads, rows), out_specs=heads, check_vma=False)(q, k, v, seg)


# ------------------------------------------------------------------------------- decoding from a sharded cache
def cache_spec(cache: dict) -> P:
    """The PartitionSpec the rules table gives the [L, B, K, S, H] cache on the current mesh (sharding/rules.py's
    fitted `cache_sequence` -> `context`, batch over data x fsdp, KV heads over tensor where each divides)."""
    from llama.model import CACHE_AXES
    from sharding.rules import fitted_spec

    mesh = jax.sharding.get_abstract_mesh()
    return fitted_spec(CACHE_AXES, cache["k"].shape, dict(mesh.shape))


def splits_cache(cache: dict) -> bool:
    """Whether the cache's slots are split over `context` (context > 1 and S divisible by it). Otherwise the fitted
    rules replicate S on `context` (every device holds every slot), and one device's cached attention is exact,
    with nothing to combine, so the model takes its ordinary path."""
    if context_size() == 1:
        return False
    spec = cache_spec(cache)
    return len(spec) > 3 and spec[3] is not None and AXIS in (spec[3] if isinstance(spec[3], tuple) else (spec[3],))


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, cache: dict, layer: jax.Array,
                     *, block_q: int, block_k: int) -> tuple[jax.Array, dict]:
    """Write this step's K, V into layer `layer` of a cache whose S slots are split over `context`, and attend to
    it: flash-decoding across devices. q: [B, T, N, H], k, v: [B, T, K, H] (after RoPE), positions: [B, T] (each
    token's cache slot) -> (o [B, T, N, H], the cache).

    Device i owns slots i*S/CP .. (i+1)*S/CP - 1. Inside one shard_map it writes the new tokens whose slots it owns
    (a token elsewhere gets an out-of-range slot, and the scatter drops it), then runs the project's cached flash
    attention (llama/attention.py) over its local slots only, reading tiles up to the query's local slot, and
    returns its partial output o_i (normalised over its slots) and log-sum-exp lse_i. The exact softmax over all
    slots is then sum_i exp(lse_i - M) o_i / sum_i exp(lse_i - M) with M = max_i lse_i (Dao et al., "Flash-Decoding
    for long-context inference", 2023; the rescaling of FlashAttention-2's online softmax, Dao 2023): one pmax
    and two psums over `context` of [B, T, N] statistics and the [B, T, N, H] output. The cache never moves, so
    each device holds and reads 1/CP of it. A device none of whose slots a query sees (they all lie after its
    position) contributes weight 0. int8 caches work unchanged: the write and read are the model's own
    (_write_cache, _cached_kv), applied to the local shard.

    Prefill runs the same function with T > 1: each device writes the prompt slots it owns, and the queries'
    outputs combine the same way. Every implementation reads the cache with the flash kernel here ("xla", the
    dense reference, too; the fused kernels already do for cached inference)."""
    from llama import attention as attn
    from llama import model

    spec = cache_spec(cache)
    cp = context_size()
    batch, tensor = spec[1], spec[2]  # the cache's own: q, k, v and positions follow it, so nothing reshards
    S = cache["k"].shape[3]
    Sl = S // cp
    heads, rows = P(batch, None, tensor, None), P(batch, None)
    cache_specs = {name: P(None, batch, tensor, AXIS, None) for name in cache}

    def local(q, k, v, positions, cache, layer):
        lo = jax.lax.axis_index(AXIS) * Sl
        mine = (positions >= lo) & (positions < lo + Sl)
        cache = model._write_cache(cache, layer, k, v, jnp.where(mine, positions - lo, Sl))  # Sl: dropped
        out, lse = attn.cached_attention_lse(q, model._cached_kv(cache, layer, k.dtype), positions - lo,
                                             block_q, block_k)
        lse = jnp.where((positions >= lo)[:, :, None], lse, -jnp.inf)  # slot lo is seen iff any slot here is
        m = jax.lax.pmax(lse, AXIS)  # finite: the device holding slot 0 sees every query's (positions >= 0)
        w = jnp.exp(lse - jnp.where(jnp.isfinite(m), m, 0.0))
        num = jax.lax.psum(w[..., None] * out.astype(jnp.float32), AXIS)
        den = jax.lax.psum(w, AXIS)
        return (num / jnp.where(den > 0, den, 1.0)[..., None]).astype(q.dtype), cache

    return jax.shard_map(local, in_specs=(heads, heads, heads, rows, cache_specs, P()),
                         out_specs=(heads, cache_specs), check_vma=False)(q, k, v, positions, cache, layer)

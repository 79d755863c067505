"""Attention: one `attention(...)` for the model, with several implementations (`ModelConfig.attention_impl`).

Causal GQA attention, softmax(q k^T / sqrt(H) + mask) v, where query heads are viewed as [K, G] against the K
KV heads (K/V are never repeated). The mask is causal over sequence *slots* (a query at slot t sees keys at
slots <= t) and, for packed rows, a document mask (same segment id). No implementation but the reference
builds a [T, S] array.

- "xla": the plain reference (the tests' yardstick at short T): float32 scores [B, K, G, T, S], a dense mask.
- "flash": blockwise attention in pure JAX with an online softmax (Rabe & Staats 2021, "Self-attention does not
  need O(n^2) memory"; Dao et al. 2022, FlashAttention). Masks are built per [block_q, block_k] tile from slot
  indices and segment ids, only where needed (a tile that every query of a block sees whole, one before the
  diagonal and, with segment ids, inside the block's document, skips it); a query block loops only over the key
  blocks at or before its last slot, so causal attention costs about half the FLOPs and a decode step at position
  p reads ceil((p+1)/block_k) blocks of the cache, whatever its allocated size; with segment ids it also starts
  at its documents' first tile (and the backward stops at the tile's documents' last query block), so a packed row
  of short documents computes little more than its documents' own triangles.
  Softmax statistics in float32. Its custom VJP recomputes the scores blockwise (FlashAttention-2's backward, Dao
  2023), so training memory is O(T). Runs on CPU, GPU and TPU.
  Levanter's `levanter.models.flash_attention` (custom VJP, per-block causal and segment masks) was the model.
- "cudnn" (GPU): `jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)`, no mask array. A
  boolean mask would become a dense [B, N, T, S] bias there (~32 GiB per sequence at 128K) and its document-mask
  (packed layout) path is private and Hopper-only, so rows with segment ids and cached inference use "flash".
- "splash" (TPU): `jax.experimental.pallas.ops.tpu.splash_attention` (Mosaic), a causal `MultiHeadMask` and
  `SegmentIds` (an O(T) document mask), one MQA kernel per KV head; cached inference uses "flash".
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from llama.config import ATTENTION_IMPLS

# The backends each fused kernel exists on; "xla" and "flash" are plain JAX and run everywhere.
KERNEL_BACKENDS = {"cudnn": ("gpu", "cuda"), "splash": ("tpu",)}
# Tile sizes when the config says 0. On the CPU, with heads-major tiles, 256 x 256 (8 heads x 256 KiB of float32
# scores, in the core's L2) ran flash's forward and gradient at T = 8192-16384 faster than 128 x 128 (loop
# overhead) and 512 x 512 (out of cache) (docs/benchmarks.md); accelerators want fewer, larger tiles (each loop
# step is a kernel launch).
DEFAULT_BLOCKS = {"cpu": (256, 256)}
# A prefill against a KV cache (a block's worth of queries or more) takes 512-key tiles on the CPU: as fast on one
# device (16K prefill 2.49-3.03 s against 2.61-3.18 at 256) and on one device per core (2.19-2.28 against
# 2.22-2.37), with half the tile steps. The steps matter on several CPU devices: XLA:CPU's YNNPACK dots, run by two
# devices at once, hold ~20 KB per tile step until the call ends (not so on one device), so the 128K prefill's
# peak RSS was 5.7 GB with 256-key tiles and 3.2 GB with 512 (docs/benchmarks.md, "One device per core"). Decode
# keeps the default: its 8x tile (DECODE_TILE_FACTOR) of 4096 slots ran position 1K at 1.2-1.5K tokens/s against
# 2.1-2.2K with 2048.
CACHED_BLOCKS = {"cpu": (256, 512)}
# Self-attention over a row of T tokens takes tiles of T / 8 on the CPU (from 64 up to the default): the tile loop
# skips a tile wholly past the causal edge or between two documents, so packed rows of short documents compute far
# fewer scores (a 256-token row of 4 DPO segments: 4 of 16 tiles at 64, against the whole 256 x 256 tile). The
# post-training bench's step (T = 256, docs/benchmarks.md "Session 16"): DPO 226-243 ms against 254-268, SFT 3%
# less; DPO at T = 512 and 1024 no slower. From T = 2048 the default holds (chosen at T = 8192-16384, above).
ROW_TILE_DIVISOR = {"cpu": 8}
ACCELERATOR_BLOCKS = (512, 512)
# The backward's tiles on the CPU where they divide the forward's: its tile step holds five [bq, bk] products and
# float32 temporaries (the forward's two), and 128 x 128 ran the gradient at T = 8192 with ~15% less process CPU
# than 256 x 256 (128 x 256 no better, 64 x 64 less CPU but ~2x the wall time in loop steps; docs/benchmarks.md).
BACKWARD_BLOCKS = {"cpu": (128, 128)}
DECODE_TILE_FACTOR = 8  # a decode step (one query per row) reads key tiles 8x longer: fewer loop steps, same bytes


class AttentionError(ValueError):
    """An attention implementation that does not exist, or whose kernel this backend lacks."""


@dataclass(frozen=True)
class CachedKV:
    """One layer of a KV cache as attention reads it. read(start, size) -> (k, v): [B, size, K, H] for the slots
    start..start+size-1 (a traced start, clamped like `lax.dynamic_slice`; size static); `length`: S slots."""

    read: Callable[[jax.Array, int], tuple[jax.Array, jax.Array]]
    length: int
    kv_heads: int


_TARGET = contextvars.ContextVar("attention_target_backend", default=None)


@contextlib.contextmanager
def target_backend(platform: str | None):
    """Trace for another platform than this process's: ahead-of-time compilation for compile-only TPU devices
    (sharding/compile.py) checks and sizes the kernels for the target, not for the CPU it runs on."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def _backend() -> str:
    return _TARGET.get() or jax.default_backend()


def available(backend: str | None = None) -> tuple[str, ...]:
    backend = backend or _backend()
    return tuple(i for i in ATTENTION_IMPLS if backend in KERNEL_BACKENDS.get(i, (backend,)))


def check_impl(impl: str, backend: str | None = None) -> None:
    """An error naming the option and what is available, instead of a deep traceback from inside a kernel."""
    backend = backend or _backend()
    if impl not in ATTENTION_IMPLS:
        raise AttentionError(f"attention_impl={impl!r} is unknown; expected one of {ATTENTION_IMPLS}")
    if impl not in available(backend):
        raise AttentionError(f"attention_impl={impl!r} needs a {'/'.join(KERNEL_BACKENDS[impl])} backend; this "
                             f"process runs on {backend!r}, where the available ones are {available(backend)}")


def block_sizes(block_q: int = 0, block_k: int = 0, backend: str | None = None,
                cached_queries: int = 0, length: int = 0) -> tuple[int, int]:
    """The configured tile sizes, 0 replaced by the backend's default; `CACHED_BLOCKS` for a prefill against a KV
    cache (`cached_queries`: queries per row there, 0 for self-attention) of at least a default query block;
    `ROW_TILE_DIVISOR` for self-attention over rows of `length` tokens."""
    backend = backend or _backend()
    default = DEFAULT_BLOCKS.get(backend, ACCELERATOR_BLOCKS)
    if cached_queries >= default[0]:
        default = CACHED_BLOCKS.get(backend, default)
    elif length and backend in ROW_TILE_DIVISOR:
        default = tuple(min(d, max(64, length // ROW_TILE_DIVISOR[backend])) for d in default)
    return block_q or default[0], block_k or default[1]


def attention(q: jax.Array, kv, *, segment_ids: jax.Array | None = None, q_slots: jax.Array | None = None,
              impl: str = "flash", block_q: int = 0, block_k: int = 0,
              parent_ids: jax.Array | None = None) -> jax.Array:
    """q: [B, T, N, H] -> [B, T, N, H]. block_q, block_k: tile sizes (0: `block_sizes`' default).

    kv is either (k, v), [B, T, K, H] each, for causal self-attention over one (possibly packed) sequence
    (query and key slots 0..T-1; `segment_ids` [B, T] or None), which is differentiable; or a `CachedKV` for
    attention against a KV cache, where `q_slots` [B, T] are the queries' slots (= positions) and each query
    sees the cache slots <= its own.

    parent_ids [B, T] (self-attention, impl "xla" only): a query also sees the earlier keys of segment
    `parent_ids`, which makes a row a set of request trees (a shared context, then continuations that each see
    it and themselves: llama/eval.py's choice scoring)."""
    check_impl(impl)
    if parent_ids is not None and (impl != "xla" or isinstance(kv, CachedKV)):
        raise ValueError(f"attention: parent_ids (request trees) need impl='xla' self-attention, not {impl!r}")
    B, T, N, H = q.shape
    cached = isinstance(kv, CachedKV)
    block_q, block_k = block_sizes(block_q, block_k, cached_queries=T if cached else 0, length=0 if cached else T)
    if cached:
        if impl == "xla":
            k, v = kv.read(jnp.zeros((), jnp.int32), kv.length)
            return _reference(q, k, v, q_slots, None, None)
        return _flash_cached(q, kv, q_slots, block_q, block_k)
    k, v = kv
    # Context parallelism: under a mesh with a `context` axis > 1 the rows arrive in the load-balanced order
    # (input_pipeline/context.py) and the wrapper all-gathers K, V over `context` (llama/context_parallel.py).
    from llama import context_parallel

    if context_parallel.context_size() > 1:
        if parent_ids is not None:
            raise ValueError("attention: parent_ids (request trees) are not supported under context parallelism")
        return context_parallel.attention(q, k, v, segment_ids, impl=impl, block_q=block_q, block_k=block_k)
    if impl == "xla":
        slots = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        return _reference(q, k, v, slots, segment_ids, segment_ids, parent_ids)
    if impl == "cudnn" and segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if impl == "splash":
        return _splash(q, k, v, segment_ids, block_q, block_k)
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    slots = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return _flash(q, k, v, seg, seg, slots, min(block_q, T), min(block_k, T))


def _backward_blocks(bq: int, bk: int) -> tuple[int, int]:
    """The backward's tiles for forward tiles bq x bk: the backend's `BACKWARD_BLOCKS` where each divides the
    forward's (the padded residuals are then whole tiles of either), else the forward's own."""
    b = BACKWARD_BLOCKS.get(_backend())
    return b if b and bq % b[0] == 0 and bk % b[1] == 0 else (bq, bk)


# ---------------------------------------------------------------------------------------------- reference
def _reference(q, k, v, q_slots, q_segment, k_segment, q_parent=None) -> jax.Array:
    """The dense reference: float32 scores [B, K, G, T, S] and a [B, T, S] mask (key slot <= query slot, same
    segment, or the query's parent segment where given). Softmax in float32, as Meta and HF."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    mask = jnp.arange(S, dtype=jnp.int32)[None, None, :] <= q_slots[:, :, None]
    if q_segment is not None:
        same = q_segment[:, :, None] == k_segment[:, None, :]
        mask &= same if q_parent is None else same | (q_parent[:, :, None] == k_segment[:, None, :])
    qg = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) / np.float32(np.sqrt(H))
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(B, T, N, H)


# -------------------------------------------------------------------------------------------------- flash
def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _online_softmax_step(carry, qb, kb, vb, mask, scale):
    """One key tile of the online softmax (FlashAttention's forward; float32 statistics), heads-major:
    carry: o [B, K, G, bq, H] float32, m, l [B, K, G, bq]; qb: [B, K, G, bq, H]; scale: 1/sqrt(H), or None
    where qb is already scaled; kb, vb: [B, K, bk, H]; mask: [B, bq, bk], or None for a tile every query of the
    block sees whole (no select, and no guard for a row that has seen no key: this tile gives every row a finite
    maximum)."""
    o, m, l = carry
    s = jnp.einsum("BKGTH,BKSH->BKGTS", qb, kb, preferred_element_type=jnp.float32)
    if scale is not None:
        s = s * scale
    if mask is not None:
        s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(-1))
    # A row that has seen no key yet (only under a mask): exp(-inf) = 0, no NaN
    m_safe = m_new if mask is None else jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe[..., None])
    corr = jnp.exp(m - m_safe)
    pv = jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
    return o * corr[..., None] + pv, m_new, l * corr + p.sum(-1)


def _tile_mask(q_slot, j, start, bk, n_valid, q_seg, k_seg):
    """[B, bq, bk]: which keys of tile j (slots start..start+bk-1) each query sees. Key slot <= query slot, a
    real key (< n_valid), not one of an earlier tile (a clamped last tile overlaps the one before it: slot >=
    j*bk), and the same segment."""
    k_slot = start + jnp.arange(bk, dtype=jnp.int32)
    valid = (k_slot >= j * bk) & (k_slot < n_valid)
    mask = (k_slot[None, None, :] <= q_slot[:, :, None]) & valid[None, None, :]
    if q_seg is not None:
        mask &= q_seg[:, :, None] == k_seg[:, None, :]
    return mask


def _runs(seg):
    """seg [B, S] -> (run_start, run_end) [B, S] int32: the first and last slot of the run of equal segment ids that
    holds each slot. Slots r..e of one run share a segment, so a tile whose keys and queries all lie in one run
    needs no document mask (a packed document is one run; an id that recurs later starts a new run)."""
    S = seg.shape[1]
    idx = jnp.arange(S, dtype=jnp.int32)
    new = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(new, idx, 0), axis=1)
    last = jnp.concatenate([seg[:, 1:] != seg[:, :-1], jnp.ones_like(seg[:, :1], bool)], axis=1)
    end = jax.lax.cummin(jnp.where(last, idx, S - 1), axis=1, reverse=True)
    return start, end


def _doc_extent(seg):
    """seg [B, S] -> (first, last) [B, S] int32: the first and last slot holding each slot's segment id. A key
    outside [first, last] of a query's slot shares no segment with it, so whole tiles outside that range are
    skipped, not masked: in a packed row of short documents most off-diagonal tiles. Unlike `_runs`, an id that
    recurs later (a second run of the same id, which the document mask lets see the first) spans both runs. One
    stable sort per row groups each id's slots in order, its head and tail are the id's first and last slot."""
    B, S = seg.shape
    order = jnp.argsort(seg, axis=1, stable=True).astype(jnp.int32)
    ids = jnp.take_along_axis(seg, order, axis=1)
    idx = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    change = ids[:, 1:] != ids[:, :-1]
    head = jnp.concatenate([jnp.ones((B, 1), bool), change], axis=1)
    tail = jnp.concatenate([change, jnp.ones((B, 1), bool)], axis=1)
    first = jnp.take_along_axis(order, jax.lax.cummax(jnp.where(head, idx, 0), axis=1), axis=1)
    last = jnp.take_along_axis(order, jax.lax.cummin(jnp.where(tail, idx, S - 1), axis=1, reverse=True), axis=1)
    rows = jnp.arange(B)[:, None]
    return (jnp.zeros((B, S), jnp.int32).at[rows, order].set(first),
            jnp.zeros((B, S), jnp.int32).at[rows, order].set(last))


def _whole_k_tiles(slot, run_start, n_valid: int, n_seen, bk: int):
    """Key tiles [lo, hi) that every query of a block (slots `slot` [B, bq], nondecreasing, -1 padding) sees whole:
    each key slot <= the block's smallest query slot, a real key (< n_valid), and, where `run_start` [B, S] is given
    (segment ids), in the run of equal segment ids that holds every query (it starts at or before the tile and
    reaches the block's largest slot). Tiles outside [lo, hi) keep the mask."""
    hi = jnp.clip(jnp.minimum((jnp.min(slot) + 1) // bk, n_valid // bk), 0, n_seen)
    if run_start is None:
        return jnp.zeros_like(hi), hi
    last = jnp.clip(jnp.max(slot, axis=1), 0, run_start.shape[1] - 1)  # [B] each row's largest query slot
    r = jnp.max(jnp.take_along_axis(run_start, last[:, None], axis=1))  # the latest row's run start
    return jnp.minimum(-(-r // bk), hi), hi


def _whole_q_blocks(block_first, block_last, tile_last, run_end_at, nq: int):
    """Query blocks [lo, hi) that see key tile j whole (the backward's mirror of `_whole_k_tiles`): every query slot
    >= the tile's last key slot `tile_last` and <= `run_end_at`, the end of the run holding the whole tile (-1 where
    the tile spans runs or holds padded keys). block_first, block_last [nq]: each block's smallest and largest slot
    (-1 where it holds padding, which is never whole). Slots are nondecreasing, so the blocks that qualify are
    contiguous."""
    whole = (block_first >= tile_last) & (block_last <= run_end_at) & (block_first >= 0)
    n = jnp.sum(whole).astype(jnp.int32)
    lo = jnp.where(n > 0, jnp.argmax(whole).astype(jnp.int32), nq)
    return lo, lo + n


def _first_k_tile(slot, doc_first, bk: int):
    """The first key tile that a query block (slots `slot` [B, bq], -1 padding) can see under the document mask:
    the tile of the earliest first slot (`_doc_extent`) of its queries' documents. Earlier tiles are all masked."""
    at = jnp.take_along_axis(doc_first, jnp.clip(slot, 0, doc_first.shape[1] - 1), axis=1)
    return jnp.min(jnp.where(slot >= 0, at, doc_first.shape[1])) // bk


def _end_q_block(block_start, tile_doc_last):
    """The backward's mirror: one past the last query block that can see a key of a tile, whose keys' documents
    end at slots `tile_doc_last` [B, bk] (-1 for padded keys). block_start [nq]: each block's earliest real slot
    (past every slot for a block of padding), nondecreasing. Later blocks see none of the tile."""
    return jnp.sum(block_start <= jnp.max(tile_doc_last)).astype(jnp.int32)


def _flash_forward(qh, q_slots, q_seg, read_kv, n_valid: int, nk: int, bq: int, bk: int, run_start=None,
                   doc_first=None):
    """Blockwise forward, heads-major. qh: [B, K, G, Tq, H] with Tq a multiple of bq; q_slots: [B, Tq] (-1: a
    padded query, which sees nothing); q_seg: [B, Tq] or None; read_kv(j) -> (start, k, v [B, K, bk, H], k_seg
    [B, bk] or None) for key tile j; run_start, doc_first: [B, S] (`_runs`, `_doc_extent`) where q_seg is given.
    Query block i visits key tiles first..max(its slots) // bk only (a dynamic trip count; `first`: the tile of
    the earliest slot any of its queries' documents holds, 0 without segment ids), and builds a mask only on the
    tiles it does not see whole (`_whole_k_tiles`: the diagonal, and with segment ids the tiles before its
    document's run). Returns out
    [B, K, G, Tq, H] in q's dtype and lse [B, K, G, Tq] float32 (0 for a row that saw nothing).

    Heads-major tiles ([B, K, G, bq, H] against [B, K, bk, H]) make both of a tile's products plain batched
    matmuls over contiguous rows; with [B, T, K, G, H] slices each product paid for a layout change, and flash at
    T = 8192 on the CPU ran 2.8x slower (docs/benchmarks.md)."""
    B, K, G, Tq, H = qh.shape
    # 1/sqrt(H) folded into the queries: bq*H multiplies per query block instead of bq*bk per key tile
    qs = qh * np.float32(1 / np.sqrt(H)).astype(qh.dtype) if qh.dtype == jnp.float32 else qh
    scale = None if qh.dtype == jnp.float32 else np.float32(1 / np.sqrt(H))

    def q_block(i):
        qb = jax.lax.dynamic_slice_in_dim(qs, i * bq, bq, 3)
        slot = jax.lax.dynamic_slice_in_dim(q_slots, i * bq, bq, 1)
        seg = None if q_seg is None else jax.lax.dynamic_slice_in_dim(q_seg, i * bq, bq, 1)

        def step(masked, j, carry):
            start, kb, vb, k_seg = read_kv(j)
            mask = _tile_mask(slot, j, start, bk, n_valid, seg, k_seg) if masked else None
            return _online_softmax_step(carry, qb, kb, vb, mask, scale)

        init = (jnp.zeros((B, K, G, bq, H), jnp.float32), jnp.full((B, K, G, bq), -jnp.inf, jnp.float32),
                jnp.zeros((B, K, G, bq), jnp.float32))
        n_seen = jnp.minimum(nk, jnp.max(slot) // bk + 1)
        # Tiles seen whole skip the mask's build, select and -inf guard: masked [0, lo), whole [lo, hi), masked
        # [hi, n_seen). A row still unseen at lo is safe there: a whole tile gives it a finite maximum.
        lo, hi = _whole_k_tiles(slot, run_start, n_valid, n_seen, bk)
        # Tiles before every query's document are skipped outright: [first, lo) masked
        first = 0 if doc_first is None else jnp.minimum(_first_k_tile(slot, doc_first, bk), lo)
        carry = jax.lax.fori_loop(first, lo, functools.partial(step, True), init)
        carry = jax.lax.fori_loop(lo, hi, functools.partial(step, False), carry)
        o, m, l = jax.lax.fori_loop(hi, n_seen, functools.partial(step, True), carry)
        seen = l > 0
        out = o / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return out.astype(qh.dtype), lse

    # One sequential map. Coarser dispatch was tried for the 2-core CPU prefill (issue 13):
    # two maps over causally balanced halves do not run concurrently (XLA's buffer assignment gives both loops'
    # temporaries the same offsets, so its thunk executor orders one after the other; the profiler trace shows
    # it), and `lax.map(batch_size=2)` (a gather of each pair's key tiles) or 512-query blocks ran the 32K prefill
    # in the same process CPU seconds (17.6-19.5 s each, load 1-4).
    out, lse = jax.lax.map(q_block, jnp.arange(Tq // bq, dtype=jnp.int32))  # [nq, B, K, G, bq, H], [nq, B, K, G, bq]
    return (out.transpose(1, 2, 3, 0, 4, 5).reshape(B, K, G, Tq, H),
            lse.transpose(1, 2, 3, 0, 4).reshape(B, K, G, Tq))


def _self_kv_reader(kh, vh, seg, bk):
    """Key tile j of heads-major kh, vh [B, K, S, H] and seg [B, S]."""
    def read(j):
        start = j * bk
        return (start, jax.lax.dynamic_slice_in_dim(kh, start, bk, 2), jax.lax.dynamic_slice_in_dim(vh, start, bk, 2),
                jax.lax.dynamic_slice_in_dim(seg, start, bk, 1))
    return read


def _heads_major(q, k, v, q_seg, k_seg, q_slots, bq, bk):
    """q [B, T, N, H] -> [B, K, G, Tp, H] padded to a multiple of bq (padded queries get slot -1 and see nothing);
    k, v [B, S, K, H] -> [B, K, Sp, H] padded to a multiple of bk (padded keys lie past n_valid = S)."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    Tp, Sp = _round_up(T, bq), _round_up(S, bk)
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    slots = jnp.pad(q_slots, [(0, 0), (0, Tp - T)], constant_values=-1)
    qh = pad(q, Tp).reshape(B, Tp, K, N // K, H).transpose(0, 2, 3, 1, 4)
    kh, vh = (pad(x, Sp).transpose(0, 2, 1, 3) for x in (k, v))
    return qh, kh, vh, pad(q_seg, Tp), pad(k_seg, Sp), slots


def _tokens_major(xh, T):
    """[B, K, G, Tp, H] -> [B, T, N, H]: the inverse of `_heads_major` for queries."""
    B, K, G, _, H = xh.shape
    return xh[:, :, :, :T].transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, H)


def _flash(q, k, v, q_seg, k_seg, q_slots, bq: int, bk: int, backward_blocks: tuple[int, int] | None = None):
    """Causal attention, blockwise, of T queries at slots q_slots [B, T] int32 against S keys at slots 0..S-1.
    q: [B, T, N, H], k, v: [B, S, K, H], q_seg: [B, T], k_seg: [B, S] int32. Self-attention: S = T and q_slots
    = 0..T-1; context parallelism (llama/context_parallel.py): a device's local queries in the load-balanced
    order against all keys. q_slots must be nondecreasing along T (the backward's query-block skip relies on it).
    backward_blocks: the backward's tiles, each dividing the forward's (default `_backward_blocks`)."""
    bqb, bkb = backward_blocks or _backward_blocks(bq, bk)
    if bq % bqb or bk % bkb:
        raise ValueError(f"flash: backward tiles {bqb} x {bkb} must divide the forward's {bq} x {bk}")
    return _flash_vjp(q, k, v, q_seg, k_seg, q_slots, bq, bk, bqb, bkb)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash_vjp(q, k, v, q_seg, k_seg, q_slots, bq: int, bk: int, bqb: int, bkb: int):
    return _flash_fwd(q, k, v, q_seg, k_seg, q_slots, bq, bk, bqb, bkb)[0]


def _flash_fwd(q, k, v, q_seg, k_seg, q_slots, bq, bk, bqb, bkb):
    T, S = q.shape[1], k.shape[1]
    qh, kh, vh, q_segp, k_segp, slots = _heads_major(q, k, v, q_seg, k_seg, q_slots, bq, bk)
    out, lse = _flash_forward(qh, slots, q_segp, _self_kv_reader(kh, vh, k_segp, bk), S, kh.shape[2] // bk, bq, bk,
                              run_start=_runs(k_seg)[0], doc_first=_doc_extent(k_seg)[0])
    # Residuals in the padded heads-major layout the backward reads (the same bytes as q, k, v and the output);
    # k_seg unpadded, as its shape carries S.
    return _tokens_major(out, T), (qh, kh, vh, q_segp, k_seg, slots, out, lse)


def _flash_bwd(_bq, _bk, bq, bk, res, d_out):
    """FlashAttention-2's backward (Dao 2023, algorithm 2) in one pass over key tiles j: each visits the query
    blocks whose last slot reaches it (from the first block whose largest slot is >= j*bk; slots are
    nondecreasing), recomputes the tile's probabilities from the saved log-sum-exp, and accumulates dK_j, dV_j in
    its carry and dQ in a float32 [B, K, G, Tp, H] carry, up to the last block holding a query of one of the
    tile's documents (`_doc_extent`); blocks that see the tile whole (`_whole_q_blocks`) skip the mask. O(T)
    memory; heads-major like the forward."""
    qh, kh, vh, q_segp, k_seg, slots, out, lse = res
    B, K, G, Tp, H = qh.shape
    T, S, Sp = d_out.shape[1], k_seg.shape[1], kh.shape[2]
    k_segp = jnp.pad(k_seg, [(0, 0), (0, Sp - S)])
    dog = jnp.pad(d_out, [(0, 0), (0, Tp - T), (0, 0), (0, 0)]).reshape(B, Tp, K, G, H).transpose(0, 2, 3, 1, 4)
    # D_i = rowsum(dO * O), FlashAttention-2 eq. for dS = P * (dP - D)
    delta = jnp.einsum("BKGTH,BKGTH->BKGT", dog.astype(jnp.float32), out.astype(jnp.float32))
    scale = np.float32(1 / np.sqrt(H))
    nq, nk = Tp // bq, Sp // bk
    blocks = slots.reshape(B, nq, bq)
    block_first, block_last = blocks.min(axis=(0, 2)), blocks.max(axis=(0, 2))  # [nq] each query block's slots
    run_start, run_end = _runs(k_seg)
    # The latest slot sharing a segment with each key (-1 for padded keys, which no query sees), and each query
    # block's earliest real slot (Sp for a block of padding only)
    doc_last = jnp.pad(_doc_extent(k_seg)[1], [(0, 0), (0, Sp - S)], constant_values=-1)
    block_start = jnp.where(blocks >= 0, blocks, Sp).min(axis=(0, 2))

    def k_tile(dq, j):
        start = j * bk
        kb = jax.lax.dynamic_slice_in_dim(kh, start, bk, 2)
        vb = jax.lax.dynamic_slice_in_dim(vh, start, bk, 2)
        k_seg_b = jax.lax.dynamic_slice_in_dim(k_segp, start, bk, 1)

        def step(masked, i, carry):
            dq, dk, dv = carry
            sl = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis)  # noqa: E731
            qb, dob, slot, q_seg_b = sl(qh, 3), sl(dog, 3), sl(slots, 1), sl(q_segp, 1)
            s = jnp.einsum("BKGTH,BKSH->BKGTS", qb, kb, preferred_element_type=jnp.float32) * scale
            p = jnp.exp(s - sl(lse, 3)[..., None])
            if masked:
                p = jnp.where(_tile_mask(slot, j, start, bk, S, q_seg_b, k_seg_b)[:, None, None], p, 0.0)
            dp = jnp.einsum("BKGTH,BKSH->BKGTS", dob, vb, preferred_element_type=jnp.float32)
            ds = p * (dp - sl(delta, 3)[..., None]) * scale
            dv += jnp.einsum("BKGTS,BKGTH->BKSH", p.astype(dob.dtype), dob, preferred_element_type=jnp.float32)
            dk += jnp.einsum("BKGTS,BKGTH->BKSH", ds.astype(qb.dtype), qb, preferred_element_type=jnp.float32)
            dq_b = jnp.einsum("BKGTS,BKSH->BKGTH", ds.astype(kb.dtype), kb, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, sl(dq, 3) + dq_b, i * bq, 3)
            return dq, dk, dv

        zeros = jnp.zeros((B, K, bk, H), jnp.float32)
        # Self-attention (slots 0..T-1): start // bq. Blocks of padding only (-1; backward tiles smaller than the
        # forward's leave some at the end) are not counted, so the real blocks before the tile stay a prefix.
        first = jnp.sum((block_last >= 0) & (block_last < start)).astype(jnp.int32)
        # Query blocks that see the tile whole skip the mask: masked [first, lo), whole [lo, hi), masked [hi, end).
        tile_last = start + bk - 1
        at = jnp.minimum(tile_last, S - 1)
        one_run = (tile_last < S) & jnp.all(run_start[:, at] <= start)  # real keys, one run in every row
        lo, hi = _whole_q_blocks(block_first, block_last, tile_last, jnp.where(one_run, jnp.min(run_end[:, at]), -1),
                                 nq)
        carry = jax.lax.fori_loop(first, lo, functools.partial(step, True), (dq, zeros, zeros))
        carry = jax.lax.fori_loop(lo, hi, functools.partial(step, False), carry)
        # ... and no block past the tile's documents: [hi, end) masked (blocks are in slot order)
        end = jnp.maximum(_end_q_block(block_start, jax.lax.dynamic_slice_in_dim(doc_last, start, bk, 1)), hi)
        dq, dk, dv = jax.lax.fori_loop(hi, end, functools.partial(step, True), carry)
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(k_tile, jnp.zeros((B, K, G, Tp, H), jnp.float32), jnp.arange(nk, dtype=jnp.int32))
    unblock = lambda x: x.transpose(1, 0, 3, 2, 4).reshape(B, Sp, K, H)[:, :S]  # [nk, B, K, bk, H] -> [B, S, K, H]  # noqa: E731
    return (_tokens_major(dq, T).astype(qh.dtype), unblock(dk).astype(kh.dtype), unblock(dv).astype(vh.dtype),
            None, None, None)


_flash_vjp.defvjp(_flash_fwd, _flash_bwd)


def _flash_cached(q, kv: CachedKV, q_slots, block_q: int, block_k: int):
    """Blockwise attention of T queries at slots q_slots [B, T] against a cache of S slots: each query block reads
    the cache tiles up to its largest slot only (a decode step at position p: ceil((p+1)/bk) tiles). Fewer
    queries than a block take longer key tiles (up to DECODE_TILE_FACTOR x), keeping the tile's area."""
    return cached_attention_lse(q, kv, q_slots, block_q, block_k)[0]


def cached_attention_lse(q, kv: CachedKV, q_slots, block_q: int, block_k: int) -> tuple[jax.Array, jax.Array]:
    """`_flash_cached` with its softmax statistics: (out [B, T, N, H], normalised over the slots this query sees
    in `kv`; lse [B, T, N] float32, the log-sum-exp of its scores there, 0 where it sees none). Partial results
    over disjoint slot ranges combine exactly from these (flash-decoding across devices,
    llama/context_parallel.py `cached_attention`). A query whose slot is negative reads no tile."""
    B, T, N, H = q.shape
    S = kv.length
    bq = min(block_q, T)
    bk = min(block_k * max(1, min(block_q // bq, DECODE_TILE_FACTOR)), S)
    Tq = _round_up(T, bq)
    K = kv.kv_heads

    def read(j):
        start = jnp.minimum(j * bk, S - bk)  # the last tile is clamped inside the cache; _tile_mask drops the overlap
        kb, vb = kv.read(start, bk)  # [B, bk, K, H]; the cache is [.., K, S, H], so XLA cancels the two transposes
        return start, kb.transpose(0, 2, 1, 3), vb.transpose(0, 2, 1, 3), None

    qh = jnp.pad(q, [(0, 0), (0, Tq - T), (0, 0), (0, 0)]).reshape(B, Tq, K, N // K, H).transpose(0, 2, 3, 1, 4)
    slots = jnp.pad(q_slots.astype(jnp.int32), [(0, 0), (0, Tq - T)], constant_values=-1)
    out, lse = _flash_forward(qh, slots, None, read, S, -(-S // bk), bq, bk)
    return _tokens_major(out, T), lse[:, :, :, :T].transpose(0, 3, 1, 2).reshape(B, T, N)


# ------------------------------------------------------------------------------------------ splash (TPU)
def _splash(q, k, v, segment_ids, block_q: int, block_k: int, interpret: bool = False):
    """Splash attention (`_splash_local`) for q [B, T, N, H], k, v [B, T, K, H], segment_ids [B, T] or None.

    A Pallas kernel is a custom call that GSPMD cannot partition: traced under a mesh (`jax.set_mesh`, as the
    trainer's step and sharding.compile are) it would gather every row and head onto each device, or fail to
    lower. So under a mesh the kernel runs inside a `shard_map` on each device's own rows and heads, split the way
    the rules table shards the activations around it (sharding/rules.py: "batch" over data x fsdp, heads over
    tensor; fitted, so an axis that does not divide B or K is left out and that dimension is whole on every
    device). Attention is independent per row and per KV head group, so no collective is needed; the sequence is
    whole here (context > 1 dispatches to llama/context_parallel.py before this, with the same pattern)."""
    mesh = jax.sharding.get_abstract_mesh()
    local = functools.partial(_splash_local, block_q=block_q, block_k=block_k, interpret=interpret)
    B, T = q.shape[:2]
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    if mesh.empty:
        return local(q, k, v, seg)
    from sharding import rules

    sizes = dict(mesh.shape)
    # Heads fitted on K: with N = K * G and q's heads grouped [K, G], a split of K is the same split of N.
    heads = rules.fitted_spec(("batch", None, "kv_heads", None), k.shape, sizes)
    rows = rules.fitted_spec(("batch", None), seg.shape, sizes)
    return jax.shard_map(local, in_specs=(heads, heads, heads, rows), out_specs=heads,
                         check_vma=False)(q, k, v, seg)  # Pallas calls carry no varying-axes types


def _splash_local(q, k, v, seg, block_q: int, block_k: int, interpret: bool = False):
    """TPU splash attention (Pallas/Mosaic): a causal MultiHeadMask over the G query heads of each KV head (the
    MQA kernel, vmapped over batch and KV heads, so K/V are not repeated) and SegmentIds for packed rows. T is
    padded to a multiple of the blocks (at least 128, the Mosaic tile); padded slots are their own segment."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    bq, bk = min(block_q, _round_up(T, 128)), min(block_k, _round_up(T, 128))
    Tp = _round_up(T, np.lcm.reduce([bq, bk, 128]))
    pad = lambda x: jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    seg = jnp.pad(seg, [(0, 0), (0, Tp - T)], constant_values=-1)
    blocks = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                           block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([sm.CausalMask((Tp, Tp))] * G), block_sizes=blocks,
                                              interpret=interpret)  # interpret: Pallas on the CPU, for tests
    qs = (pad(q) * np.float32(1 / np.sqrt(H)).astype(q.dtype)).reshape(B, Tp, K, G, H).transpose(0, 2, 3, 1, 4)
    ks, vs = pad(k).transpose(0, 2, 1, 3), pad(v).transpose(0, 2, 1, 3)  # [B, K, Tp, H]
    one = lambda qh, kh, vh, s: kernel(qh, kh, vh, segment_ids=sk.SegmentIds(q=s, kv=s))  # noqa: E731
    out = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)))(qs, ks, vs, seg)  # [B, K, G, Tp, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, Tp, N, H)[:, :T]

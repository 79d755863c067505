"""Llama 3.1 / 3.2 as pure functions over a pytree of parameters.

Read top to bottom: parameter declarations, RMSNorm, RoPE (with llama3 frequency scaling), the SwiGLU MLP, one
decoder layer, and `forward`, which scans the stacked layers. Attention (GQA without repeating K/V; the dense
reference, blockwise flash, fused kernels) is `llama/attention.py`'s `attention(...)`.

Einsum letters (the scaling book's): B batch, T query length, S key length, D model dim, N query heads,
K kv heads, G query heads per kv head (N = K*G), H head dim, F ffn dim, V vocab, L layers.

RoPE uses the Hugging Face "rotate-half" convention, so HF weights load untouched; Meta and llama2.c
checkpoints (interleaved pairs) are permuted once at conversion time (facts sheet 4.1-4.2).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from llama import attention as attn
from llama import context_parallel
from llama.config import ModelConfig
from sharding.rules import ACTIVATION_AXES, constrain

Params = dict[str, Any]


# ------------------------------------------------------------------------------------ parameter declarations
@dataclass(frozen=True)
class ParamSpec:
    """One parameter, declared once. init, abstract shapes, shardings and checkpoint layouts derive from it."""

    shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]
    init: str  # "normal" (std 0.02, HF `initializer_range`), "ones" (norm gains), "scaled" (std 0.02/sqrt(2L))

    def __post_init__(self):
        assert len(self.shape) == len(self.logical_axes), (self.shape, self.logical_axes)


def param_specs(cfg: ModelConfig) -> dict[str, Any]:
    """The parameter pytree's declaration. Layer parameters carry a leading L axis and are scanned."""
    L, D, N, K, H, F, V = cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), "normal"),
        "layers": {
            "attn_norm": ParamSpec((L, D), ("layers", "norm"), "ones"),
            "wq": ParamSpec((L, D, N, H), ("layers", "embed", "q_heads", "head_dim"), "normal"),
            "wk": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
            "wv": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
            "wo": ParamSpec((L, N, H, D), ("layers", "q_heads", "head_dim", "embed"), "scaled"),
            "mlp_norm": ParamSpec((L, D), ("layers", "norm"), "ones"),
            "w_gate": ParamSpec((L, D, F), ("layers", "embed", "ffn"), "normal"),
            "w_up": ParamSpec((L, D, F), ("layers", "embed", "ffn"), "normal"),
            "w_down": ParamSpec((L, F, D), ("layers", "ffn", "embed"), "scaled"),
        },
        "final_norm": ParamSpec((D,), ("norm",), "ones"),
    }
    if not cfg.tie_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"), "normal")
    return specs


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random init from the declarations (jit it with out_shardings to create parameters already sharded)."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))
    dtype = jnp.dtype(cfg.param_dtype)

    def one(spec: ParamSpec, k):
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        std = 0.02 if spec.init == "normal" else 0.02 / np.sqrt(2 * cfg.n_layers)
        return (std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [one(s, k) for s, k in zip(leaves, keys)])


def abstract_params(cfg: ModelConfig) -> Params:
    """Shapes and dtypes only (no memory): `jax.eval_shape` of the real init."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ------------------------------------------------------------------------------------------- int8 weights
@jax.tree_util.register_dataclass
@dataclass
class QuantizedWeight:
    """Weight-only int8 (symmetric, per output channel). `scale` has the weight's shape with its
    contracted (input) axes reduced to size 1, so `q * scale` is the dequantised weight."""

    q: jax.Array  # int8
    scale: jax.Array  # float32


def int8_symmetric(x: jax.Array, axes: tuple[int, ...]) -> QuantizedWeight:
    """The one int8 rounding rule (weights, llama/quant.py, and the int8 KV cache): scale = absmax over `axes`
    / 127 in float32 (1 where the absmax is 0, so q = 0), q = round(x / scale) clipped to [-127, 127]."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return QuantizedWeight(q=jnp.clip(jnp.round(x32 / scale), -127, 127).astype(jnp.int8), scale=scale)


@jax.tree_util.register_dataclass
@dataclass
class LoraWeight:
    """A frozen weight plus a low-rank update (llama/lora.py): W + scale * A @ B, never materialised. `base` is a
    weight or a QuantizedWeight; a: [in..., r], b: [r, out...] (each with the leading L axis while stacked)."""

    base: Any
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True))
    # Adapter dropout (training only): raw PRNG key data (one key per layer while stacked) and the rate. None /
    # 0 = no dropout, the eval and generation path.
    key: Any = None
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))


def linear(eqn: str, x: jax.Array, w) -> jax.Array:
    """Every projection goes through here, so int8 weights and LoRA adapters need no second code path. For int8
    the matmul reads the int8 tensor and converts it inside the fused dot; the per-channel scale is applied to
    the (much smaller) output. For LoRA the adapter path is (x A) B, rank-r wide (R: the rank axis)."""
    if isinstance(w, LoraWeight):
        ins, out = eqn.split("->")
        xs, ws = ins.split(",")
        w_in, w_out = "".join(a for a in ws if a in xs), "".join(a for a in ws if a not in xs)
        rest = "".join(a for a in xs if a not in ws)  # B, T
        xd = x
        if w.key is not None and w.dropout > 0:  # PEFT: lora_B(lora_A(dropout(x))) * scaling, inverted dropout
            keep = jax.random.bernoulli(jax.random.wrap_key_data(w.key), 1.0 - w.dropout, x.shape)
            xd = jnp.where(keep, x / jnp.asarray(1.0 - w.dropout, x.dtype), jnp.zeros((), x.dtype))
        xa = jnp.einsum(f"{xs},{w_in}R->{rest}R", xd, w.a.astype(x.dtype))
        delta = jnp.einsum(f"{rest}R,R{w_out}->{out}", xa, w.b.astype(x.dtype))
        return linear(eqn, x, w.base) + (w.scale * delta).astype(x.dtype)
    if isinstance(w, QuantizedWeight):
        out = jnp.einsum(eqn, x, w.q.astype(x.dtype))
        out_axes = eqn.split("->")[1]
        w_axes = eqn.split("->")[0].split(",")[1]
        scale = w.scale.reshape([w.scale.shape[i] for i, a in enumerate(w_axes) if a in out_axes])
        return (out * scale.astype(out.dtype)).astype(x.dtype)
    return _dense(eqn, x, w.astype(x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dense(eqn: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(eqn, x, w) for a plain weight, with the weight gradient written by hand (`_dense_bwd`)."""
    return jnp.einsum(eqn, x, w)


def _dense_fwd(eqn, x, w):
    return jnp.einsum(eqn, x, w), (x, w)


def _dense_bwd(eqn, res, g):
    """dx = g w^T as autodiff has it. The weight gradient x^T g contracts the batch and sequence axes; autodiff
    hands XLA that dot as it is, and the CPU backend runs it by writing a transposed copy of the larger [B*T, out]
    operand (fused with the elementwise backward before it: SwiGLU's, for w_gate and w_up) and, for some shapes, a
    plain dot outside YNNPACK. Both were among the largest ops of the CPU train step (docs/benchmarks.md, the
    post-training section). Here the smaller operand is transposed, behind an optimization barrier so XLA does not
    fold it back, and the dot is a plain [in, N] x [N, out] matmul (YNNPACK); as llama/loss.py's output layer."""
    x, w = res
    ins, out = eqn.split("->")
    xs, ws = ins.split(",")
    dx = jnp.einsum(f"{out},{ws}->{xs}", g, w)
    w_in = [a for a in ws if a in xs]  # contracted with x, in w's order
    w_out = [a for a in ws if a not in xs]
    rows = [a for a in xs if a not in ws]  # B, T: contracted in the weight gradient
    x2 = x.transpose([xs.index(a) for a in rows + w_in]).reshape(-1, int(np.prod([w.shape[ws.index(a)] for a in w_in])))
    g2 = g.transpose([out.index(a) for a in rows + w_out]).reshape(x2.shape[0], -1)
    barrier = jax.lax.optimization_barrier
    # [in, out]; the barrier on the product keeps XLA from folding its transpose into the dot (which turns it into
    # a dot with a transposed operand, run outside YNNPACK: w_down's weight gradient, docs/benchmarks.md)
    dw = barrier(x2.T) @ g2 if x2.shape[1] <= g2.shape[1] else barrier(barrier(g2.T) @ x2).T
    dw = dw.reshape([w.shape[ws.index(a)] for a in w_in + w_out])
    return dx, dw.transpose([(w_in + w_out).index(a) for a in ws])


_dense.defvjp(_dense_fwd, _dense_bwd)


# ------------------------------------------------------------------------------------------------ RMSNorm
def rms_norm(x: jax.Array, gain: jax.Array, eps: float) -> jax.Array:
    """Normalise in float32, cast back to the activation dtype, then multiply by the gain (as Meta and HF)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * gain.astype(x.dtype)


# --------------------------------------------------------------------------------------------------- RoPE
def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """The H/2 inverse frequencies in float32, with Llama 3.1 "llama3" scaling applied when configured
    (Meta `apply_scaling`, HF `_compute_llama3_parameters`; facts sheet 3.2). [H/2]"""
    H = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.float32) / np.float32(H)))
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * jnp.pi / inv_freq
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x: [B, T, n, H], positions: [B, T] (absolute, 0-based).
    Angles, cos and sin in float32 (as HF); the rotation in float32 too, cast back (as Meta), so bf16 runs
    lose no precision in the angle."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# --------------------------------------------------------------------------------------------- the layer
def mlp(x: jax.Array, p: Params) -> jax.Array:
    """SwiGLU: (silu(x W1) * (x W3)) W2. [B, T, D] -> [B, T, D]"""
    gate = linear("BTD,DF->BTF", x, p["w_gate"])
    up = linear("BTD,DF->BTF", x, p["w_up"])
    return linear("BTF,FD->BTD", jax.nn.silu(gate) * up, p["w_down"])


def decoder_layer(x: jax.Array, p: Params, cfg: ModelConfig, positions: jax.Array, segment_ids: jax.Array | None,
                  inv_freq: jax.Array, cache: dict | None = None, layer: jax.Array | None = None,
                  parent_ids: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
    """One pre-norm block. x: [B, T, D]; p: this layer's slice of params["layers"].
    Without a cache, causal self-attention over the row (documents kept apart by segment_ids). With a cache (the
    whole stack, `init_cache`) and this layer's index, the new keys (after RoPE) and values are written at their
    positions, and each query attends to this layer's cache slots <= its position."""
    h = rms_norm(x, p["attn_norm"], cfg.norm_eps)
    q = apply_rope(linear("BTD,DNH->BTNH", h, p["wq"]), positions, inv_freq)
    k = apply_rope(linear("BTD,DKH->BTKH", h, p["wk"]), positions, inv_freq)
    v = linear("BTD,DKH->BTKH", h, p["wv"])
    blocks = dict(impl=cfg.attention_impl, block_q=cfg.attention_block_q, block_k=cfg.attention_block_k)
    if cache is None:
        o = attn.attention(q, (k, v), segment_ids=segment_ids, parent_ids=parent_ids, **blocks)
    elif context_parallel.splits_cache(cache):  # slots split over `context`: flash-decoding across devices
        bq, bk = attn.block_sizes(cfg.attention_block_q, cfg.attention_block_k, cached_queries=q.shape[1])
        o, cache = context_parallel.cached_attention(q, k, v, positions, cache, layer, block_q=bq, block_k=bk)
    else:
        cache = _write_cache(cache, layer, k, v, positions)
        o = attn.attention(q, _cached_kv(cache, layer, k.dtype), q_slots=positions, **blocks)
    x = x + linear("BTNH,NHD->BTD", o, p["wo"])
    x = x + mlp(rms_norm(x, p["mlp_norm"], cfg.norm_eps), p)
    return x, cache


def _write_cache(cache: dict, layer: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array) -> dict:
    """Scatter this step's K/V [B, T, K, H] into layer `layer` of the cache, in place, at each row's positions
    [B, T]. An int8 cache (`init_cache(dtype="int8")`) stores each token's head vector as int8 with one float32
    scale (its absmax / 127) and is read back dequantised: a quarter of the float32 bytes (half of bf16) plus 4
    bytes per H-vector for the scale."""
    rows = jnp.arange(k.shape[0])[:, None]
    new = dict(cache)
    for name, x in (("k", k), ("v", v)):
        # [layer, rows, :, positions] selects [B, T, K, H] slots of the [L, B, K, S, H] cache
        if name + "_scale" in cache:
            x8 = int8_symmetric(x, (-1,))
            new[name] = cache[name].at[layer, rows, :, positions].set(x8.q, mode="drop")
            new[name + "_scale"] = cache[name + "_scale"].at[layer, rows, :, positions].set(x8.scale, mode="drop")
        else:
            new[name] = cache[name].at[layer, rows, :, positions].set(x.astype(cache[name].dtype), mode="drop")
    return new


def _cached_kv(cache: dict, layer: jax.Array, dtype) -> attn.CachedKV:
    """Layer `layer` of the cache as attention reads it: slots start..start+size-1 sliced straight out of the
    [L, B, K, S, H] stack (no copy of the whole layer, so a decode step's cost follows its position, not S),
    dequantised where int8, as [B, size, K, H] (XLA folds the transpose into the dots)."""
    _, B, K, S, H = cache["k"].shape

    def read(start, size):
        tile = {name: jax.lax.dynamic_slice(a, (layer, 0, 0, start, 0), (1, B, K, size, a.shape[-1]))[0]
                for name, a in cache.items()}
        return tuple(_read_cache(tile, name, dtype).transpose(0, 2, 1, 3) for name in ("k", "v"))

    return attn.CachedKV(read, S, K)


def _read_cache(cache: dict, name: str, dtype) -> jax.Array:
    """cache[name] ("k" or "v", any leading slice of it) in `dtype`, dequantised where the cache is int8."""
    if name + "_scale" in cache:
        return (cache[name].astype(jnp.float32) * cache[name + "_scale"]).astype(dtype)
    return cache[name].astype(dtype)


_REMAT: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# ---------------------------------------------------------------------------------------------- forward
def embed(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    # Gather from a table whose D is whole (FSDP all-gathers it, as it does every weight), so the rows land
    # batch-sharded instead of the partitioner replicating the [B, T, D] result (sharding/rules.py).
    # An id outside [0, V) (a tokenizer larger than the model's vocabulary) gathers a row of NaN instead of being
    # clamped to row V-1 (jnp indexing's default) or wrapped (a negative id): a jitted function cannot raise on
    # data, so the NaN carries the error to the logits and the loss, where the trainer's finite-loss check stops
    # the run. The CLIs refuse such a tokenizer at load (llama.tokenizer.check_vocab), before any of this runs.
    def rows(x, fill):
        return jnp.asarray(x).at[tokens].get(mode="fill", fill_value=fill, wrap_negative_indices=False)

    table = params["embed"]
    if isinstance(table, QuantizedWeight):  # int8 tied table (llama/quant.py): gather int8 rows, then scale
        q = constrain(table.q, ("vocab", "act_embed"))
        return (rows(q, 0).astype(jnp.float32) * rows(table.scale, jnp.nan)).astype(cfg.compute_dtype)
    return rows(constrain(table.astype(cfg.compute_dtype), ("vocab", "act_embed")), jnp.nan)


def unembed(params: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Final norm and the output projection (the embedding, transposed, when tied). -> float32 logits [B, T, V]"""
    x = rms_norm(x, params["final_norm"], cfg.norm_eps)
    if cfg.tie_embeddings:
        return linear("BTD,VD->BTV", x, params["embed"]).astype(jnp.float32)
    return linear("BTD,DV->BTV", x, params["lm_head"]).astype(jnp.float32)


def _layers(params: Params, x, cfg: ModelConfig, positions, segment_ids, cache, parent_ids=None):
    """Scan the stacked layers. A KV cache rides in the carry and each layer writes its own slots in place: as a
    scanned input and output it would be sliced out and stacked back, two copies of the whole cache per decode
    step (with them, and the old [L, B, S, K, H] layout, CPU decode at 4080 slots ran at half today's speed;
    docs/benchmarks.md)."""
    inv_freq = rope_frequencies(cfg)

    def body(carry, layer):
        x, cache = carry
        p, i = layer
        x, cache = decoder_layer(x, p, cfg, positions, segment_ids, inv_freq, cache, i, parent_ids)
        return (constrain(x, ACTIVATION_AXES), cache), None  # layer boundary: sharding/rules.py (no-op without a mesh)

    if _REMAT[cfg.remat] is not None:
        body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=False)
    layers = (params["layers"], jnp.arange(cfg.n_layers, dtype=jnp.int32))
    (x, cache), _ = jax.lax.scan(body, (constrain(x, ACTIVATION_AXES), cache), layers)
    return x, cache


def hidden_states(params: Params, tokens: jax.Array, positions: jax.Array | None = None,
                  segment_ids: jax.Array | None = None, *, cfg: ModelConfig,
                  parent_ids: jax.Array | None = None) -> jax.Array:
    """The last layer's output, before the final norm: [B, T, D] in the compute dtype. `forward` is
    `unembed(hidden_states(...))`; a loss that never materialises the whole [B, T, V] logits starts here.
    parent_ids: request trees (`attention.attention`; attention_impl "xla")."""
    B, T = tokens.shape
    if positions is None:  # 0..T-1 in the row's own order; under context parallelism, the load-balanced one
        from llama.context_parallel import default_positions

        positions = default_positions(B, T)
    x, _ = _layers(params, embed(params, tokens, cfg), cfg, positions, segment_ids, None, parent_ids)
    return x


def forward(params: Params, tokens: jax.Array, positions: jax.Array | None = None,
            segment_ids: jax.Array | None = None, *, cfg: ModelConfig) -> jax.Array:
    """Logits for a batch of (possibly packed) rows.

    tokens: [B, T] int; positions: [B, T] RoPE positions (default 0..T-1; restart them per document for
    packed rows); segment_ids: [B, T] document ids (no attention across documents), or None for one
    document per row. Returns float32 logits [B, T, V].
    """
    return unembed(params, hidden_states(params, tokens, positions, segment_ids, cfg=cfg), cfg)


# ---------------------------------------------------------------------------------------------- KV cache
def cache_shape(cfg: ModelConfig, batch: int, max_len: int) -> tuple[int, ...]:
    """[L, B, K, S, H] (`CACHE_AXES`): each KV head's S x H slots are contiguous, so attention's two dots read a
    layer's cache as it lies, with no per-step transpose."""
    return (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)


CACHE_AXES = ("layers", "batch", "kv_heads", "cache_sequence", "head_dim")


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """Preallocated cache, one row per sequence: K (after RoPE) and V for the K KV heads only.
    {"k", "v"}: `cache_shape`. The slot of a token is its position. dtype: default the compute dtype; "int8"
    adds {"k_scale", "v_scale"}: [L, B, K, S, 1] float32, one scale per token and KV head (_write_cache)."""
    shape = cache_shape(cfg, batch, max_len)
    dtype = jnp.dtype(dtype or cfg.compute_dtype)
    cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    if dtype == jnp.int8:
        cache.update(k_scale=jnp.ones(shape[:-1] + (1,), jnp.float32), v_scale=jnp.ones(shape[:-1] + (1,), jnp.float32))
    elif not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"KV cache dtype {dtype}: expected a float dtype or int8")
    return cache


def hidden_states_cached(params: Params, tokens: jax.Array, positions: jax.Array, cache: dict, *,
                         cfg: ModelConfig) -> tuple[jax.Array, dict]:
    """`hidden_states` against a KV cache (`forward_cached` without the output layer; a chunked prefill keeps
    only each row's last prompt token of it): ([B, T, D] in the compute dtype, the cache)."""
    return _layers(params, embed(params, tokens, cfg), cfg, positions, None, cache)


def forward_cached(params: Params, tokens: jax.Array, positions: jax.Array, cache: dict, *,
                   cfg: ModelConfig, logits_at: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Prefill (T > 1) or decode (T = 1) against a KV cache. tokens, positions: [B, T]; each token is
    written to cache slot `positions` and attends to every slot <= its own. Rows are independent, so
    prompts of different lengths just carry different positions. Returns (float32 logits [B, T, V], cache).
    logits_at: optional [B] index into T; then only that token's logits are computed ([B, 1, V]): a prefill
    needs just each prompt's last token, and the vocab projection would otherwise dominate its cost."""
    x, cache = hidden_states_cached(params, tokens, positions, cache, cfg=cfg)
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at.astype(jnp.int32)[:, None, None], axis=1)  # [B, 1, D]
    return unembed(params, x, cfg), cache

"""Training objectives: pure loss functions over the model's hidden states. `llama/train.py` keeps one loop
and picks the function.

Pre-training is next-token cross-entropy with PaLM's z-loss (Chowdhery et al. 2022, section 5: weight x
logsumexp^2, which keeps the softmax normaliser near 1). `next_token_loss` computes the final norm, the output
projection, log-softmax, the target log-probability and the z-loss over chunks of tokens: the float32
[B, T, V] logits and their gradient never exist whole. At Llama 3's 128,256-token vocabulary, 4 x 4096 tokens
make 8.4 GB of float32 logits, more than all the layers' activations of the 1B model (docs/benchmarks.md).

Each chunk is fused in the way Liger-Kernel's fused linear cross-entropy is (Hsu et al. 2024): under
differentiation the forward pass already computes the chunk's logit gradient, pulls it back through the
output layer (`jax.vjp` of `model.unembed`, so tied and untied heads, the final norm and the compute dtype are
differentiated by JAX exactly as in the plain path) and keeps only the [B, T, D] hidden-state gradient and the
head's parameter gradient. The backward pass scales them by the incoming cotangent. Rematerialising the chunk
(jax.checkpoint) would do the output projection a third time; this does it once forward and twice backward, as
the plain path does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llama import model as llama_model
from llama.config import ModelConfig

# Tokens per chunk of the fused output layer + cross-entropy (TrainConfig.loss_chunk's default; the planner's too):
# one chunk's float32 logits stay at 2.1 GB at Llama 3's vocabulary whatever the batch (docs/benchmarks.md).
LOSS_CHUNK = 4096


def head_params(params: dict, cfg: ModelConfig) -> dict:
    """The parameters `model.unembed` reads: the final norm and the output projection (the embedding when tied)."""
    return {k: params[k] for k in ("final_norm", "embed" if cfg.tie_embeddings else "lm_head")}


def _token_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array):
    """(logsumexp [..., T], summed negative log-likelihood, summed logsumexp^2) of float32 logits [..., T, V]
    over the float32 loss mask."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return logz, jnp.sum((logz - target_logit) * mask), jnp.sum(jnp.square(logz) * mask)


def next_token_loss(params: dict, h: jax.Array, targets: jax.Array, loss_mask: jax.Array, *, cfg: ModelConfig,
                    z_loss: float = 0.0, chunk: int = 0) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Summed cross-entropy of `targets` under the output layer applied to `h` (= model.hidden_states: [B, T, D],
    before the final norm), plus z_loss x summed logsumexp^2, over `loss_mask` [B, T].

    Returns (loss_sum, (nll_sum, z_sum)); only loss_sum = nll_sum + z_loss * z_sum carries a gradient. All
    float32. chunk = 0: the plain path (the whole float32 [B, T, V] logits, `model.unembed`); chunk > 0: about
    `chunk` tokens at a time (every row's next ~chunk // B positions, T split evenly, at most T), the same sums
    within float32 rounding."""
    mask = loss_mask.astype(jnp.float32)
    if chunk <= 0:
        _, nll_sum, z_sum = _token_sums(llama_model.unembed(params, h, cfg), targets, mask)
        loss_sum = nll_sum + z_loss * z_sum
    else:
        c = _chunk_len(*targets.shape, chunk)
        loss_sum, nll_sum, z_sum = _chunked(head_params(params, cfg), h, targets, mask, cfg, float(z_loss), c)
    return loss_sum, (jax.lax.stop_gradient(nll_sum), jax.lax.stop_gradient(z_sum))


# -------------------------------------------------------------------------------------- the chunked path
def _chunk_len(B: int, T: int, chunk: int) -> int:
    """Positions per chunk for about `chunk` tokens of a [B, T] batch: every row's next ~chunk // B positions, T
    split as evenly as the chunk count allows (least padding), at most T."""
    n = -(-T // max(1, chunk // B))  # chunks per row
    return -(-T // n)


def _to_chunks(x: jax.Array, c: int) -> jax.Array:
    """[B, T, ...] -> [T'/c, B, c, ...], T zero-padded up to T' (a multiple of c). Chunks cut the sequence, not
    the batch, so each keeps the batch's sharding over devices."""
    B, T = x.shape[:2]
    pad = -T % c
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(B, (T + pad) // c, c, *x.shape[2:]), 1, 0)


def _from_chunks(x: jax.Array, T: int) -> jax.Array:
    """Inverse of _to_chunks: [n, B, c, ...] -> [B, T, ...]."""
    n, B, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(B, n * c, *x.shape[3:])[:, :T]


def _unembed_vjp(head, h, cfg: ModelConfig):
    """(logits, pullback) of `model.unembed` on one chunk, the output layer's weight gradient written by hand.

    `jax.vjp(model.unembed)` gives the same values, but XLA's CPU backend runs its weight gradient x^T dlogits
    ([D, V], contracting the chunk's tokens) as a plain dot on a transposed copy of the [tokens, V] logit
    gradient, outside YNNPACK: 21% of the CPU train step in the profile of docs/benchmarks.md. Handing XLA the
    small operand already transposed (behind an optimization barrier, so it is not folded back) puts the dot on
    YNNPACK (675 vs 1,010 ms in that A/B). The final norm is still differentiated by JAX. Weights that are not
    plain arrays (int8, LoRA) take `jax.vjp` as before."""
    key = "embed" if cfg.tie_embeddings else "lm_head"
    w = head[key]
    if not isinstance(w, jax.Array):  # QuantizedWeight, LoraWeight (tracers are jax.Arrays)
        return jax.vjp(lambda hd, x: llama_model.unembed(hd, x, cfg), head, h)
    x, norm_pullback = jax.vjp(lambda g, x: llama_model.rms_norm(x, g, cfg.norm_eps), head["final_norm"], h)
    eqn = "BTD,VD->BTV" if cfg.tie_embeddings else "BTD,DV->BTV"
    logits = llama_model.linear(eqn, x, w).astype(jnp.float32)

    def pullback(dlogits):
        g = dlogits.astype(x.dtype)  # as autodiff of .astype(float32) does
        B, T, D = x.shape
        xt = jax.lax.optimization_barrier(x.reshape(B * T, D).T)  # [D, BT]
        dw = jnp.einsum("DN,NV->DV", xt, g.reshape(B * T, -1))  # [D, V]
        dw = (dw.T if cfg.tie_embeddings else dw).astype(w.dtype)
        dx = jnp.einsum("BTV,VD->BTD" if cfg.tie_embeddings else "BTV,DV->BTD", g, w.astype(x.dtype))
        d_gain, d_h = norm_pullback(dx)
        return {"final_norm": d_gain, key: dw}, d_h

    return logits, pullback


def _add_float(acc, d):
    """Accumulates a head gradient; an int8 head's (a frozen LoRA base, lora.base_int8) has none (float0)."""
    return acc + d if jnp.issubdtype(acc.dtype, jnp.floating) else acc


def _scan_chunks(head, h, targets, mask, cfg: ModelConfig, z_loss: float, c: int, with_grads: bool):
    """Scans the chunks. Returns (loss_sum, nll_sum, z_sum) and, with_grads, the gradient of loss_sum with
    respect to `head` (float32, the params' dtype) and to `h` ([B, T, D], h's dtype)."""
    unembed = lambda hd, x: llama_model.unembed(hd, x, cfg)  # noqa: E731  [B, c, D] -> float32 [B, c, V]
    xs = (_to_chunks(h, c), _to_chunks(targets, c), _to_chunks(mask, c))  # padding is masked: it adds nothing

    def body(carry, chunk):
        h_i, t_i, m_i = chunk
        if not with_grads:
            _, nll, z = _token_sums(unembed(head, h_i), t_i, m_i)
            return (carry[0] + nll, carry[1] + z), None
        logits, pullback = _unembed_vjp(head, h_i, cfg)
        # logsumexp written out, so that one exp per logit serves the sum and the softmax (exp(logits - top) /
        # sum); the logits are finite, as in training (jax.nn.logsumexp also guards infinite maxima)
        top = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - top)
        total = jnp.sum(e, axis=-1)
        logz = jnp.log(total) + top[..., 0]
        target_logit = jnp.take_along_axis(logits, t_i[..., None].astype(jnp.int32), axis=-1)[..., 0]
        nll, z = jnp.sum((logz - target_logit) * m_i), jnp.sum(jnp.square(logz) * m_i)
        # d(nll + z_loss * z) / dlogits = mask * (softmax * (1 + 2 z_loss logz) - onehot(target))
        onehot = jax.nn.one_hot(t_i, logits.shape[-1], dtype=jnp.float32)
        dlogits = (e * (m_i * (1 + 2 * z_loss * logz) / total)[..., None] - onehot * m_i[..., None])
        d_head, d_h = pullback(dlogits)
        nll_sum, z_sum, g_head = carry
        return (nll_sum + nll, z_sum + z, jax.tree.map(_add_float, g_head, d_head)), d_h

    zero = jnp.float32(0)
    if not with_grads:
        (nll_sum, z_sum), _ = jax.lax.scan(body, (zero, zero), xs)
        return nll_sum + z_loss * z_sum, nll_sum, z_sum
    g_head = jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), head)
    (nll_sum, z_sum, g_head), g_h = jax.lax.scan(body, (zero, zero, g_head), xs)
    return (nll_sum + z_loss * z_sum, nll_sum, z_sum), (g_head, _from_chunks(g_h, h.shape[1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked(head, h, targets, mask, cfg, z_loss, c):
    return _scan_chunks(head, h, targets, mask, cfg, z_loss, c, with_grads=False)


def _chunked_fwd(head, h, targets, mask, cfg, z_loss, c):
    return _scan_chunks(head, h, targets, mask, cfg, z_loss, c, with_grads=True)  # (sums, residuals: gradients)


def _chunked_bwd(cfg, z_loss, c, grads, cotangents):
    # nll_sum and z_sum leave next_token_loss through stop_gradient, so only loss_sum's cotangent is non-zero.
    g = cotangents[0]
    g_head, g_h = grads
    scale = lambda d: (d.astype(jnp.float32) * g).astype(d.dtype)  # noqa: E731  (g in float32: bf16 h stays exact)
    # an integer (int8) head leaf has no gradient: its cotangent is float0 zeros
    no_grad = lambda d: np.zeros(d.shape, jax.dtypes.float0)  # noqa: E731
    return (jax.tree.map(lambda d: scale(d) if jnp.issubdtype(d.dtype, jnp.floating) else no_grad(d), g_head),
            scale(g_h), None, None)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


# ------------------------------------------------------------------------------ SFT and DPO (post-training)
# SFT is `next_token_loss` itself: its data (input_pipeline/chat.py) carries a loss mask on the assistant
# content and the <|eot_id|> ending each assistant turn, and the trainer divides the summed NLL by the batch's
# count of masked tokens, as in pre-training. DPO needs per-token log-probabilities, summed per sequence.


def token_logps(params: dict, h: jax.Array, targets: jax.Array, *, cfg: ModelConfig, chunk: int = 0) -> jax.Array:
    """log p(targets) [B, T], float32, under the output layer applied to h [B, T, D] (model.hidden_states).
    chunk > 0: about `chunk` tokens at a time, each chunk rematerialised (jax.checkpoint) in the backward pass, so
    the float32 [B, T, V] logits never exist whole (the same values; gradients by plain JAX autodiff)."""
    def one(head, h_i, t_i):  # [B, c, D], [B, c] -> [B, c]
        logits = llama_model.unembed(head, h_i, cfg)
        return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), t_i[..., None].astype(jnp.int32),
                                   axis=-1)[..., 0]

    head = head_params(params, cfg)
    if chunk <= 0:
        return one(head, h, targets)
    T = targets.shape[1]
    c = _chunk_len(*targets.shape, chunk)
    out = jax.lax.map(lambda x: jax.checkpoint(one)(head, *x), (_to_chunks(h, c), _to_chunks(targets, c)))
    return _from_chunks(out, T)


def pair_sums(x: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B, T] -> [B, T // 2, 2]: sums of x over each row's segment pairs (2k+1, 2k+2) = (chosen, rejected) of pair
    k (input_pipeline/chat.py's preference layout). Padding (segment 0) adds to no pair."""
    B, T = x.shape
    P = T // 2
    k = segment_ids - 1  # -1 = padding
    idx = jnp.where(k >= 0, jnp.arange(B)[:, None] * (2 * P) + k, B * 2 * P)  # padding -> an extra bin, dropped
    sums = jax.ops.segment_sum(x.reshape(-1), idx.reshape(-1), num_segments=B * 2 * P + 1)
    return sums[:-1].reshape(B, P, 2)


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float,
             label_smoothing: float = 0.0):
    """Per-pair sigmoid DPO loss (Rafailov et al. 2023, eq. 7) on summed completion log-probs, with conservative
    DPO's label smoothing eps (Mitchell 2023; TRL's "robust"-free form): -(1-eps) logsigmoid(beta d) - eps
    logsigmoid(-beta d), d = (chosen - ref chosen) - (rejected - ref rejected). eps = 0 is TRL's "sigmoid".
    Returns (loss, chosen_rewards, rejected_rewards), rewards = beta x log-ratio (TRL's rewards/chosen)."""
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    logits = chosen_rewards - rejected_rewards
    loss = -(1 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(-logits)
    return loss, chosen_rewards, rejected_rewards

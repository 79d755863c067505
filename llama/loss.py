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
# A chunk covers every row's next c loss positions. Rows are first reordered so that each row's loss-masked
# positions come first (`_Chunks`), and only the chunks that hold some row's masked positions are computed: SFT's
# prompts and DPO's prompts and headers, masked out, cost no output layer (TRL's fused head does the same on GPU:
# `hidden_states[mask]`, trl/trainer/utils.py `add_fused_lm_head`). For that to skip anything at small batches a
# row is cut into at least MIN_CHUNKS_PER_ROW chunks: a row half of whose positions are masked computes about half.
MIN_CHUNKS_PER_ROW = 4


def _chunk_len(B: int, T: int, chunk: int) -> int:
    """Positions per chunk for about `chunk` tokens of a [B, T] batch: every row's next ~chunk // B positions, T
    split as evenly as the chunk count allows (least padding), at most T, and at least MIN_CHUNKS_PER_ROW chunks
    per row (positions permitting)."""
    n = max(-(-T // max(1, chunk // B)), min(MIN_CHUNKS_PER_ROW, T))  # chunks per row
    return -(-T // n)


class _Chunks:
    """The chunks of a [B, T] batch, c positions each, in the order the loss visits them.

    Without context parallelism each row's positions with a non-zero mask come first (a stable sort: in order),
    padded to n*c with index T, and `n_active` (traced) counts the chunks that hold them: loops run to n_active
    only. Under context parallelism the sequence axis is split over devices and a reordering would gather it: the
    chunks are then the positions in order (contiguous slices), all n of them."""

    def __init__(self, mask: jax.Array, c: int):
        from llama import context_parallel

        B, T = mask.shape
        self.B, self.T, self.c, self.n = B, T, c, -(-T // c)
        self.sorted = context_parallel.context_size() == 1
        pad = self.n * c - T
        if self.sorted:
            order = jnp.argsort(mask == 0, axis=1, stable=True).astype(jnp.int32)
            self.idx = jnp.pad(order, [(0, 0), (0, pad)], constant_values=T)  # [B, n*c]; T: padding
            count = jnp.max(jnp.sum(mask != 0, axis=1))
            self.n_active = ((count + c - 1) // c).astype(jnp.int32)
        else:
            self.n_active = self.n
        self.mask = jnp.pad(mask.astype(jnp.float32), [(0, 0), (0, pad)])  # padding is masked: it adds nothing

    def positions(self, i):
        """[B, c]: the positions of chunk i (padding: T)."""
        return jax.lax.dynamic_slice_in_dim(self.idx, i * self.c, self.c, 1)

    def read(self, x: jax.Array, i) -> jax.Array:
        """Chunk i of x [B, T, ...] -> [B, c, ...] (padding reads position T-1; its mask is 0)."""
        if not self.sorted:
            x = jnp.pad(x, [(0, 0), (0, self.n * self.c - self.T)] + [(0, 0)] * (x.ndim - 2))
            return jax.lax.dynamic_slice_in_dim(x, i * self.c, self.c, 1)
        pos = jnp.minimum(self.positions(i), self.T - 1)
        return jnp.take_along_axis(x, pos.reshape(pos.shape + (1,) * (x.ndim - 2)), axis=1)

    def read_mask(self, i) -> jax.Array:
        if not self.sorted:
            return jax.lax.dynamic_slice_in_dim(self.mask, i * self.c, self.c, 1)
        return jnp.take_along_axis(self.mask, self.positions(i), axis=1)

    def add(self, acc: jax.Array, i, x: jax.Array) -> jax.Array:
        """acc [B, T', ...] (T' = n*c unsorted, T sorted) with chunk i's x [B, c, ...] added at its positions;
        padding adds nothing (sorted: dropped as out of bounds)."""
        if not self.sorted:
            return jax.lax.dynamic_update_slice_in_dim(acc, jax.lax.dynamic_slice_in_dim(acc, i * self.c, self.c, 1) + x,
                                                       i * self.c, 1)
        rows = jnp.arange(self.B, dtype=jnp.int32)[:, None]
        return acc.at[rows, self.positions(i)].add(x, mode="drop")

    def zeros(self, shape_tail: tuple, dtype) -> jax.Array:
        """An accumulator for `add`: [B, T', *shape_tail]."""
        return jnp.zeros((self.B, self.T if self.sorted else self.n * self.c, *shape_tail), dtype)

    def result(self, acc: jax.Array) -> jax.Array:
        return acc[:, :self.T]


def _add_float(acc, d):
    """Accumulates a head gradient; an int8 head's (a frozen LoRA base, lora.base_int8) has none (float0)."""
    return acc + d if jnp.issubdtype(acc.dtype, jnp.floating) else acc


def _head_cotangent(g_head, f=lambda d: d):
    """The head's cotangent from its accumulated gradient (`_add_float`): f applied to each float leaf; an integer
    (int8) leaf has no gradient, so its cotangent is float0 zeros."""
    return jax.tree.map(lambda d: f(d) if jnp.issubdtype(d.dtype, jnp.floating)
                        else np.zeros(d.shape, jax.dtypes.float0), g_head)


def _softmax_parts(logits, t_i):
    """(e = exp(logits - max), sum of e, logsumexp, target logit) of float32 logits [B, c, V]. The logsumexp is
    written out so that one exp per logit serves the sum and the softmax (e / sum); the logits are finite, as in
    training (jax.nn.logsumexp also guards infinite maxima)."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - top)
    total = jnp.sum(e, axis=-1)
    target_logit = jnp.take_along_axis(logits, t_i[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return e, total, jnp.log(total) + top[..., 0], target_logit


def _head_vjp(head, h_i, cfg: ModelConfig):
    """(float32 logits [B, c, V], pullback) of `model.unembed` on one chunk. Its dots go through `model.linear`,
    whose weight gradient is written for the CPU backend (model._dense_bwd); int8 and LoRA heads take theirs."""
    return jax.vjp(lambda hd, x: llama_model.unembed(hd, x, cfg), head, h_i)


def _scan_chunks(head, h, targets, mask, cfg: ModelConfig, z_loss: float, c: int, with_grads: bool):
    """Loops over the active chunks. Returns (loss_sum, nll_sum, z_sum) and, with_grads, the gradient of loss_sum
    with respect to `head` (float32, the params' dtype) and to `h` ([B, T, D], h's dtype)."""
    ch = _Chunks(mask, c)

    def body(i, carry):
        h_i, t_i, m_i = ch.read(h, i), ch.read(targets, i), ch.read_mask(i)
        if not with_grads:
            _, nll, z = _token_sums(llama_model.unembed(head, h_i, cfg), t_i, m_i)
            return carry[0] + nll, carry[1] + z
        logits, pullback = _head_vjp(head, h_i, cfg)
        e, total, logz, target_logit = _softmax_parts(logits, t_i)
        nll, z = jnp.sum((logz - target_logit) * m_i), jnp.sum(jnp.square(logz) * m_i)
        # d(nll + z_loss * z) / dlogits = mask * (softmax * (1 + 2 z_loss logz) - onehot(target))
        onehot = jax.nn.one_hot(t_i, logits.shape[-1], dtype=jnp.float32)
        dlogits = (e * (m_i * (1 + 2 * z_loss * logz) / total)[..., None] - onehot * m_i[..., None])
        d_head, d_h = pullback(dlogits)
        nll_sum, z_sum, g_head, g_h = carry
        return nll_sum + nll, z_sum + z, jax.tree.map(_add_float, g_head, d_head), ch.add(g_h, i, d_h)

    zero = jnp.float32(0)
    if not with_grads:
        nll_sum, z_sum = jax.lax.fori_loop(0, ch.n_active, body, (zero, zero))
        return nll_sum + z_loss * z_sum, nll_sum, z_sum
    g_head = jax.tree.map(jnp.zeros_like, head)
    nll_sum, z_sum, g_head, g_h = jax.lax.fori_loop(0, ch.n_active, body,
                                                    (zero, zero, g_head, ch.zeros(h.shape[2:], h.dtype)))
    return (nll_sum + z_loss * z_sum, nll_sum, z_sum), (g_head, ch.result(g_h))


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
    return _head_cotangent(g_head, scale), scale(g_h), None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


# ------------------------------------------------------------------------------ SFT and DPO (post-training)
# SFT is `next_token_loss` itself: its data (input_pipeline/chat.py) carries a loss mask on the assistant
# content and the <|eot_id|> ending each assistant turn, and the trainer divides the summed NLL by the batch's
# count of masked tokens, as in pre-training. DPO needs per-token log-probabilities, summed per sequence.


def token_logps(params: dict, h: jax.Array, targets: jax.Array, *, cfg: ModelConfig, chunk: int = 0,
                mask: jax.Array | None = None) -> jax.Array:
    """log p(targets) [B, T], float32, under the output layer applied to h [B, T, D] (model.hidden_states); 0
    where `mask` [B, T] (optional) is 0. chunk > 0: about `chunk` tokens at a time, the float32 [B, T, V] logits
    never whole, and only the chunks holding masked positions computed (`_Chunks`); the backward pass recomputes
    each chunk's logits (the same values and gradients as the plain path, within float32 rounding)."""
    head = head_params(params, cfg)
    if chunk <= 0:
        out = _target_logps(llama_model.unembed(head, h, cfg), targets)
        return out if mask is None else jnp.where(mask != 0, out, 0.0)
    m = jnp.ones(targets.shape, jnp.float32) if mask is None else (mask != 0).astype(jnp.float32)
    return _chunked_logps(head, h, targets, m, cfg, _chunk_len(*targets.shape, chunk))


def _target_logps(logits, targets):
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None].astype(jnp.int32),
                               axis=-1)[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_logps(head, h, targets, m, cfg, c):
    ch = _Chunks(m, c)

    def body(i, out):
        logits = llama_model.unembed(head, ch.read(h, i), cfg)
        return ch.add(out, i, _target_logps(logits, ch.read(targets, i)) * ch.read_mask(i))

    return ch.result(jax.lax.fori_loop(0, ch.n_active, body, ch.zeros((), jnp.float32)))


def _chunked_logps_fwd(head, h, targets, m, cfg, c):
    return _chunked_logps(head, h, targets, m, cfg, c), (head, h, targets, m)


def _chunked_logps_bwd(cfg, c, res, d_logps):
    """d log p_t / d logits_t = onehot(target) - softmax, scaled by the incoming cotangent d_logps [B, T]; each
    active chunk's logits recomputed (one more output-layer dot than the plain path, as jax.checkpoint would)."""
    head, h, targets, m = res
    ch = _Chunks(m, c)

    def body(i, carry):
        g_head, g_h = carry
        t_i = ch.read(targets, i)
        w = ch.read(d_logps, i) * ch.read_mask(i)  # [B, c]
        logits, pullback = _head_vjp(head, ch.read(h, i), cfg)
        e, total, _, _ = _softmax_parts(logits, t_i)
        dlogits = jax.nn.one_hot(t_i, logits.shape[-1], dtype=jnp.float32) * w[..., None] - e * (w / total)[..., None]
        d_head, d_h = pullback(dlogits)
        return jax.tree.map(_add_float, g_head, d_head), ch.add(g_h, i, d_h)

    g_head, g_h = jax.lax.fori_loop(0, ch.n_active, body,
                                    (jax.tree.map(jnp.zeros_like, head), ch.zeros(h.shape[2:], h.dtype)))
    return _head_cotangent(g_head), ch.result(g_h), None, None


_chunked_logps.defvjp(_chunked_logps_fwd, _chunked_logps_bwd)


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

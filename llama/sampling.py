"""Next-token selection: greedy, temperature, top-k and Meta's top-p, as one pure function of the logits.

Meta's rule (`llama-models` `sample_top_p`; facts sheet section 6): p = softmax(logits / T) in float32, sort
descending, zero every token whose *exclusive* prefix mass (cumsum - p) exceeds top_p, renormalise, draw. The
top token always survives (its exclusive mass is 0). Meta has no top-k; when both are set we apply top-k
first and top-p to the renormalised survivors, the order Hugging Face's logits processors use.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class SamplingConfig:
    """Static (hashable) so that each setting compiles its own, branch-free decode loop.
    temperature 0 means greedy argmax (Meta's convention); top_p 1.0 and top_k 0 switch those filters off.
    Defaults are Meta's `generate` / `chat_completion` defaults (T 0.6, p 0.9)."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0

    def __post_init__(self):
        if not 0 <= self.temperature < float("inf"):  # written so that NaN fails too
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingConfig(temperature=0.0, top_p=1.0, top_k=0)


def candidates(logits: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """The allowed tokens in descending probability order. logits: [B, V] ->
    (ids [B, C], tempered logits [B, C] with -inf on the tokens top-p removes). C = top_k, or V without top-k."""
    scaled = logits.astype(jnp.float32) / jnp.float32(cfg.temperature)
    V = logits.shape[-1]
    k = min(cfg.top_k, V) if cfg.top_k else V
    if k == V and cfg.top_p >= 1.0:
        return jnp.broadcast_to(jnp.arange(V, dtype=jnp.int32), scaled.shape), scaled  # nothing to filter
    top, ids = jax.lax.top_k(scaled, k)  # sorted descending
    if cfg.top_p < 1.0:
        probs = jax.nn.softmax(top, axis=-1)
        exclusive = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
        top = jnp.where(exclusive > cfg.top_p, -jnp.inf, top)
    return ids.astype(jnp.int32), top


def argmax(logits: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, -1)` (the first maximum; the first NaN if any) as two plain reductions, a max and a
    min over the indices that reach it. XLA's CPU backend runs argmax's (value, index) reduce as a scalar
    loop: in a batch-1 decode step over a 32000-token vocab it took 147 us, these two take 15 (jax profiler;
    docs/benchmarks.md "Decoding"). [..., V] -> [...] int32"""
    V = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where((logits == top) | jnp.isnan(logits), index, V), axis=-1)


def sample(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """One token per row. logits: [B, V] float -> [B] int32. Reproducible: the same key gives the same draw."""
    if cfg.greedy:
        return argmax(logits)
    ids, filtered = candidates(logits, cfg)
    choice = jax.random.categorical(key, filtered, axis=-1)  # [B] index into the candidates
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]


__all__ = ["SamplingConfig", "GREEDY", "argmax", "candidates", "sample"]

"""llama.loss: the chunked (fused) output layer + cross-entropy equals the plain full-logits path, in value and
gradient, and its compiled train step needs less temporary memory than the logits it never materialises."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama import loss, model
from llama.config import ModelConfig
from llama.train import BATCH_KEYS, TrainConfig, compute_grads

# float32: the chunked path adds the same terms in another order and writes the softmax gradient out; each
# differs from the plain path by a few float32 ulp (1.2e-7 relative), so 1e-6 relative to each tensor's
# largest entry holds with room and would catch any missing or doubled term (an error of one token's share
# is ~1e-2 here).
TOL = 1e-6


def small_cfg(tie: bool, vocab: int = 97) -> ModelConfig:
    return ModelConfig(name="loss", vocab_size=vocab, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64,
                       rope_theta=1e4, max_seq_len=64, bos_id=1, eos_ids=(2,), tie_embeddings=tie)


def head_inputs(tie: bool, B: int, T: int, seed: int):
    """(cfg, params, h [B, T, D], targets [B, T], rng): a small model's output layer and random inputs to it."""
    cfg = small_cfg(tie)
    params = model.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(B, T, cfg.dim)), jnp.float32)
    return cfg, params, h, jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32), rng


def assert_close(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        scale = max(float(np.abs(w).max()), 1e-30)
        assert float(np.abs(g - w).max()) <= TOL * scale, (float(np.abs(g - w).max()), scale)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_chunked_equals_plain(tie):
    """Loss, its parts and the gradients with respect to the head's parameters and the hidden states, with
    z-loss (no z-loss: the trainer test below), for chunks of one position, chunks that do not divide T
    (padding) and one chunk larger than T."""
    z_loss = 1e-2
    B, T = 4, 13
    cfg, params, h, targets, rng = head_inputs(tie, B, T, seed=0)
    mask = jnp.asarray(rng.random((B, T)) > 0.25, jnp.float32)  # masked tokens inside rows, as packing leaves
    n = mask.sum()

    def run(chunk):
        def f(head, h):
            loss_sum, sums = loss.next_token_loss({**params, **head}, h, targets, mask, cfg=cfg, z_loss=z_loss,
                                                  chunk=chunk)
            return loss_sum / n, sums

        head = loss.head_params(params, cfg)
        (value, sums), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(head, h)
        return value, sums, grads, jax.jit(f)(head, h)  # the last: the forward alone (no gradient work)

    want = run(0)
    for chunk in (B, 4 * B, 100 * B):  # 1, 4 (13 = 3 x 4 + 1, padded) and 100 (> T) positions per chunk
        got = run(chunk)
        assert_close(got, want)
    assert float(want[0]) > float(want[1][0] / n) > 0  # the z-loss term is there


def test_chunks_skip_unmasked_positions():
    """Each row's loss positions come first, in order, and only the chunks holding them are active: here every
    row's loss covers at most 7 of its 16 positions (like SFT's responses after masked prompts), so with 4
    positions per chunk 2 of the 4 chunks are computed; a row with no loss position reads only padding-masked
    slots; an all-masked batch computes no chunk."""
    mask = np.zeros((3, 16), np.float32)
    mask[0, 9:16] = 1  # 7 positions at the end
    mask[1, [1, 4, 12]] = 1
    ch = loss._Chunks(jnp.asarray(mask), 4)
    assert int(ch.n_active) == 2 and ch.n == 4
    np.testing.assert_array_equal(np.asarray(ch.idx[0, :7]), np.arange(9, 16))
    np.testing.assert_array_equal(np.asarray(ch.idx[1, :3]), [1, 4, 12])
    got = np.concatenate([np.asarray(ch.read_mask(i)) for i in range(2)], axis=1)
    np.testing.assert_array_equal(got.sum(1), [7, 3, 0])  # every loss position is in the active chunks
    assert int(loss._Chunks(jnp.zeros((3, 16)), 4).n_active) == 0


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_token_logps_chunked_equals_plain(tie):
    """token_logps (DPO's per-token log-probabilities): the chunked path with a loss mask (masked-out chunks not
    computed, its own backward) equals the plain path masked afterwards, in value and in the gradients with
    respect to the head and the hidden states under a random cotangent (DPO's per-sequence weights)."""
    B, T = 3, 13
    cfg, params, h, targets, rng = head_inputs(tie, B, T, seed=2)
    mask = np.zeros((B, T), np.float32)
    mask[0, 7:12] = 1  # a completion after its prompt
    mask[1, rng.random(T) > 0.5] = 1
    w = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)

    def run(chunk):
        def f(head, h):
            lp = loss.token_logps({**params, **head}, h, targets, cfg=cfg, chunk=chunk, mask=jnp.asarray(mask))
            return jnp.sum(lp * w), lp

        head = loss.head_params(params, cfg)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(head, h)

    want = run(0)
    assert float(np.abs(np.asarray(want[0][1]) * (1 - mask)).max()) == 0.0  # 0 where the mask is 0
    for chunk in (B, 4 * B, 100 * B):  # 1 position per chunk, 4 (padded), one chunk > T
        assert_close(run(chunk), want)


def micro_cfg(**changes) -> TrainConfig:
    m = ModelConfig(name="micro", vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64,
                    rope_theta=10000.0, max_seq_len=64, bos_id=1, eos_ids=(2,))
    return TrainConfig(model=m, batch_size=4, seq_len=16, **changes)


def test_train_grads_chunked_equal_plain():
    """Through the whole model and a 2-micro-batch scan, without z-loss: every parameter's gradient and both
    sums."""
    cfg = micro_cfg(micro_batches=2)
    params = model.init_params(cfg.model, jax.random.key(1))
    rng = np.random.default_rng(1)
    toks = rng.integers(0, cfg.model.vocab_size, (4, 17)).astype(np.int32)
    mask = np.ones((4, 16), np.float32)
    mask[1, 5:] = 0
    batch = {"tokens": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.ones((4, 16), np.int32),
             "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1)), "loss_mask": mask}
    grads = lambda c: jax.jit(functools.partial(compute_grads, cfg=cfg.replace(loss_chunk=c)))(params, batch)  # noqa: E731
    want = grads(0)
    assert_close(grads(6), want)  # 6 tokens = 3 of each micro-batch row's 16 positions per chunk (padded)


def test_chunked_head_needs_less_temp_memory():
    """XLA's compiled memory figures (compile only, nothing allocated): the gradient computation's temporary
    memory drops by more than the float32 logits [B, T, V] it no longer holds (the 1B-shape figures are in
    docs/benchmarks.md, from `python -m experiments.bench_train --memory`)."""
    cfg = TrainConfig(model=small_cfg(False, vocab=16384).replace(max_seq_len=512), batch_size=2, seq_len=512)
    params = model.abstract_params(cfg.model)
    batch = {k: jax.ShapeDtypeStruct((2, 512), jnp.float32 if k == "loss_mask" else jnp.int32) for k in BATCH_KEYS}

    def temp_bytes(chunk):
        fn = jax.jit(functools.partial(compute_grads, cfg=cfg.replace(loss_chunk=chunk)))
        return fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = 2 * 512 * 16384 * 4
    assert temp_bytes(0) - temp_bytes(256) >= logits_bytes

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
    cfg = small_cfg(tie)
    params = model.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    B, T = 4, 13
    h = jnp.asarray(rng.normal(size=(B, T, cfg.dim)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
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

"""int8: weight-only (the scale convention model.linear reads, parameter bytes, next-token agreement of the real
stories260K model with its unquantised self over TinyStories) and the int8 KV cache (the same checks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama import generate as G
from llama import model as M
from llama import quant
from llama.config import TINY
from sharding.rules import MeshConfig, make_mesh, param_shardings
from tests.conftest import require_shared


pytestmark = pytest.mark.usefixtures("highest_precision")


def _weight(tree, name):
    return tree[name] if name in ("lm_head", "embed") else tree["layers"][name]


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_within_half_a_step_and_scale_shapes(tied):
    params = M.init_params(TINY.replace(tie_embeddings=tied), jax.random.key(0))
    q = jax.jit(quant.quantize_params)(params)
    head = "embed" if tied else "lm_head"
    for name, axes in quant.CONTRACTED.items():
        if name in ("lm_head", "embed") and name != head:
            continue
        w, qw = _weight(params, name), _weight(q, name)
        assert qw.q.dtype == jnp.int8 and qw.scale.dtype == jnp.float32
        assert qw.scale.shape == tuple(1 if i in axes else s for i, s in enumerate(w.shape)), name
        err = jnp.abs(quant.dequantize(qw) - w)
        assert bool(jnp.all(err <= qw.scale / 2 * (1 + 1e-6))), name
    assert q["layers"]["attn_norm"].dtype == jnp.float32
    if not tied:  # an untied embedding is only gathered from: it keeps its dtype
        assert q["embed"].dtype == params["embed"].dtype


@pytest.mark.parametrize("tied", [False, True])
def test_int8_forward_equals_the_forward_of_the_dequantised_weights(tied):
    """The int8 model computes exactly the dequantised model (scales applied after the matmul, the tied table
    gathered as int8 rows and scaled), so the only error of int8 is the rounding of the weights."""
    cfg = TINY.replace(tie_embeddings=tied)
    q = quant.quantize_params(M.init_params(cfg, jax.random.key(5)))
    deq = jax.tree.map(lambda w: quant.dequantize(w) if isinstance(w, M.QuantizedWeight) else w, q,
                       is_leaf=lambda w: isinstance(w, M.QuantizedWeight))
    tokens = jax.random.randint(jax.random.key(6), (2, 12), 0, cfg.vocab_size)
    np.testing.assert_allclose(M.forward(q, tokens, cfg=cfg), M.forward(deq, tokens, cfg=cfg), rtol=1e-5, atol=1e-5)
    if tied:
        assert isinstance(q["embed"], M.QuantizedWeight) and "lm_head" not in q


@pytest.mark.parametrize("eqn,name", [("BTD,DNH->BTNH", "wq"), ("BTNH,NHD->BTD", "wo"), ("BTF,FD->BTD", "w_down")])
def test_linear_on_int8_equals_the_dequantised_matmul(eqn, name):
    params = M.init_params(TINY, jax.random.key(1))
    qw = jax.tree.map(lambda a: a[0], quant.quantize_params(params)["layers"][name])  # one layer's slice
    x = jax.random.normal(jax.random.key(2), (2, 3) + qw.q.shape[:len(eqn.split(",")[0]) - 2])
    np.testing.assert_allclose(M.linear(eqn, x, qw), jnp.einsum(eqn, x, quant.dequantize(qw)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,low,high", [("llama3.1-8b", 0.5, 0.54), ("llama3.2-1b", 0.5, 0.51)])
def test_parameter_bytes_about_half_of_bfloat16(name, low, high):
    """Shapes only (eval_shape). 8B: the token embedding (a gather) stays bf16, everything else int8. Llama 3.2
    1B ties its 128256 x 2048 embedding (a fifth of the model) to the output projection: that table is int8
    too, so the whole model is about half of bfloat16 (it would be 0.6 with the table left in bf16)."""
    from llama.config import preset

    bf16 = M.abstract_params(preset(name))
    int8 = jax.eval_shape(quant.quantize_params, bf16)
    ratio = quant.param_bytes(int8) / quant.param_bytes(bf16)
    print(f"{name} int8 / bf16 parameter bytes: {ratio:.4f}")
    assert low < ratio < high


def test_quantized_specs_shard_and_generate_like_one_device():
    cfg = TINY.replace(n_heads=8, n_kv_heads=4)
    q = quant.quantize_params(M.init_params(cfg, jax.random.key(4)))
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
    sh = param_shardings(quant.quantized_specs(cfg), mesh)
    assert sh["layers"]["wq"].q.spec[2] == "tensor" and tuple(sh["layers"]["wo"].scale.spec)[1:3] == (None, None)
    prompts = [[1, 5, 6, 7], [1, 9]]
    one = G.generate(q, prompts, cfg=cfg, max_new_tokens=10, stop_ids=[]).tokens
    many = G.generate(G.shard_params(q, cfg, mesh), prompts, cfg=cfg, max_new_tokens=10, stop_ids=[], mesh=mesh)
    assert many.tokens == one


@pytest.fixture(scope="module")
def stories():
    """The real stories260K model and 4 x 512 tokens of real TinyStories text."""
    from llama.convert import load_llama2c
    from llama.tokenizer import load_tokenizer

    cfg, params = load_llama2c(str(require_shared("assets", "llama2c_stories260K", "stories260K.bin")))
    tok = load_tokenizer(require_shared("assets", "llama2c_stories260K", "tok512.model"))
    text = require_shared("assets", "text", "tinystories", "tinystories_v1_valid_head.txt").read_text()
    ids = tok.encode(text[:20000], bos=True)
    T = cfg.max_seq_len
    return cfg, params, np.asarray([ids[i * T:(i + 1) * T] for i in range(4)], np.int32)


def _agreement_and_kl(ref, out) -> tuple[float, float]:
    """Top-1 agreement and mean KL(ref || out) in nats of two float32 logit arrays [..., V]."""
    agree = float(jnp.mean(jnp.argmax(ref, -1) == jnp.argmax(out, -1)))
    logp, logq = jax.nn.log_softmax(ref), jax.nn.log_softmax(out)
    return agree, float(jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), -1)))


def test_stories260k_int8_top1_agreement_and_kl(stories):
    cfg, params, rows = stories
    fwd = jax.jit(M.forward, static_argnames="cfg")
    ref = fwd(params, rows, cfg=cfg)
    q = quant.quantize_params(params)
    agree, kl = _agreement_and_kl(ref, fwd(q, rows, cfg=cfg))
    bf16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    ratio = quant.param_bytes(jax.tree.map(jnp.asarray, quant.quantize_params(bf16))) / quant.param_bytes(bf16)
    print(f"stories260K int8: top-1 agreement {agree:.4f}, mean KL {kl:.2e} nats over {rows.size} tokens; "
          f"bytes int8/bf16 {ratio:.3f} (the tied embedding int8 too)")
    assert agree >= 0.97
    assert ratio < 0.55  # int8 + one float32 scale per output channel + bf16 norms (0.528 for these shapes)


# ------------------------------------------------------------------------------------------- int8 KV cache
def test_int8_cache_reads_back_within_half_a_step_and_its_bytes():
    """Each written K/V head vector comes back within half a quantisation step (its absmax / 254); the cache
    holds a quarter of float32's bytes plus one float32 scale per H-vector."""
    cfg = TINY
    params = M.init_params(cfg, jax.random.key(7))
    B, T, S = 2, 9, 16
    tokens = jax.random.randint(jax.random.key(8), (B, T), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    _, c32 = M.forward_cached(params, tokens, pos, M.init_cache(cfg, B, S, "float32"), cfg=cfg)
    _, c8 = M.forward_cached(params, tokens, pos, M.init_cache(cfg, B, S, "int8"), cfg=cfg)
    assert c8["k"].dtype == jnp.int8 and c8["k_scale"].shape == c8["k"].shape[:-1] + (1,)
    for name in ("k", "v"):
        back = M._read_cache(c8, name, jnp.float32)
        # The layers after the first see slightly different inputs (attention read an int8 cache), so the exact
        # bound holds for layer 0; every layer stays within a few steps.
        err = jnp.abs(back - c32[name])
        assert bool(jnp.all(err[0] <= c8[name + "_scale"][0] / 2 * (1 + 1e-5))), name
        assert bool(jnp.all(err <= 4 * c8[name + "_scale"])), name
        assert bool(jnp.all(back[:, :, :, T:] == 0)), name  # unwritten slots (cache [L, B, K, S, H]) stay empty
    ratio = quant.param_bytes(c8) / quant.param_bytes(c32)
    assert ratio == pytest.approx((1 + 4 / cfg.head_dim) / 4)


def test_stories260k_int8_cache_top1_agreement_and_kl(stories):
    """Teacher-forced over 4 x 512 tokens of real TinyStories: one forward_cached pass writes every token into
    an int8 cache and every attention reads it back, against the float32 model (same 97% bar as the weights)."""
    cfg, params, rows = stories
    T = rows.shape[1]
    pos = jnp.broadcast_to(jnp.arange(T), rows.shape)
    ref = jax.jit(M.forward, static_argnames="cfg")(params, rows, cfg=cfg)
    run = jax.jit(M.forward_cached, static_argnames="cfg")
    out, cache = run(params, rows, pos, M.init_cache(cfg, 4, T, "int8"), cfg=cfg)
    same, _ = run(params, rows, pos, M.init_cache(cfg, 4, T, "float32"), cfg=cfg)
    np.testing.assert_allclose(same, ref, atol=1e-4, rtol=0)  # the float cache is the model itself
    agree, kl = _agreement_and_kl(ref, out)
    print(f"stories260K int8 KV cache: top-1 agreement {agree:.4f}, mean KL {kl:.2e} nats over {rows.size} tokens")
    assert agree >= 0.97


def test_int8_cache_generates_the_same_on_one_and_eight_devices():
    """The scales are sharded like the cache (batch over data, KV heads over tensor)."""
    cfg = TINY.replace(n_heads=8, n_kv_heads=4)
    params = M.init_params(cfg, jax.random.key(9))
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 17, 9, 30)]
    one = G.generate(params, prompts, cfg=cfg, max_new_tokens=16, stop_ids=[], cache_dtype="int8").tokens
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
    many = G.generate(G.shard_params(params, cfg, mesh), prompts, cfg=cfg, max_new_tokens=16, stop_ids=[],
                      mesh=mesh, cache_dtype="int8").tokens
    assert many == one


def test_cache_dtype_error_names_what_was_expected():
    with pytest.raises(ValueError, match="KV cache dtype int32: expected a float dtype or int8"):
        M.init_cache(TINY, 1, 8, "int32")

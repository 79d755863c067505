"""Weight-only int8: the scale convention model.linear reads, parameter bytes, and next-token agreement of the
real stories260K model with its unquantised self over a TinyStories passage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama import generate as G
from llama import model as M
from llama import quant
from llama.config import LLAMA31_8B, TINY
from sharding.rules import MeshConfig, make_mesh, param_shardings
from tests.conftest import require_shared


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def test_round_trip_within_half_a_step_and_scale_shapes():
    params = M.init_params(TINY, jax.random.key(0))
    q = jax.jit(quant.quantize_params)(params)
    for name, axes in quant.CONTRACTED.items():
        w = params["lm_head"] if name == "lm_head" else params["layers"][name]
        qw = q["lm_head"] if name == "lm_head" else q["layers"][name]
        assert qw.q.dtype == jnp.int8 and qw.scale.dtype == jnp.float32
        assert qw.scale.shape == tuple(1 if i in axes else s for i, s in enumerate(w.shape)), name
        err = jnp.abs(quant.dequantize(qw) - w)
        assert bool(jnp.all(err <= qw.scale / 2 * (1 + 1e-6))), name
    assert q["embed"].dtype == params["embed"].dtype and q["layers"]["attn_norm"].dtype == jnp.float32


@pytest.mark.parametrize("eqn,name", [("BTD,DNH->BTNH", "wq"), ("BTNH,NHD->BTD", "wo"), ("BTF,FD->BTD", "w_down")])
def test_linear_on_int8_equals_the_dequantised_matmul(eqn, name):
    params = M.init_params(TINY, jax.random.key(1))
    qw = jax.tree.map(lambda a: a[0], quant.quantize_params(params)["layers"][name])  # one layer's slice
    x = jax.random.normal(jax.random.key(2), (2, 3) + qw.q.shape[:len(eqn.split(",")[0]) - 2])
    np.testing.assert_allclose(M.linear(eqn, x, qw), jnp.einsum(eqn, x, quant.dequantize(qw)), rtol=1e-5, atol=1e-6)


def test_parameter_bytes_about_half_of_bfloat16():
    """8B shapes (no memory, eval_shape): the token embedding (a gather) stays bf16, everything else int8."""
    bf16 = M.abstract_params(LLAMA31_8B)
    int8 = jax.eval_shape(quant.quantize_params, bf16)
    ratio = quant.param_bytes(int8) / quant.param_bytes(bf16)
    print(f"8B int8 / bf16 parameter bytes: {ratio:.4f}")
    assert 0.5 < ratio < 0.54


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


def test_stories260k_int8_top1_agreement_and_kl():
    from llama.convert import load_llama2c
    from llama.tokenizer import load_tokenizer

    cfg, params = load_llama2c(str(require_shared("assets", "llama2c_stories260K", "stories260K.bin")))
    tok = load_tokenizer(require_shared("assets", "llama2c_stories260K", "tok512.model"))
    text = require_shared("assets", "text", "tinystories", "tinystories_v1_valid_head.txt").read_text()
    ids = tok.encode(text[:20000], bos=True)
    T = cfg.max_seq_len
    rows = np.asarray([ids[i * T:(i + 1) * T] for i in range(4)], np.int32)  # 4 x 512 tokens of real stories
    fwd = jax.jit(M.forward, static_argnames="cfg")
    ref = fwd(params, rows, cfg=cfg)
    q = quant.quantize_params(params)
    out = fwd(q, rows, cfg=cfg)
    agree = float(jnp.mean(jnp.argmax(ref, -1) == jnp.argmax(out, -1)))
    logp, logq = jax.nn.log_softmax(ref), jax.nn.log_softmax(out)
    kl = float(jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), -1)))
    bf16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    ratio = quant.param_bytes(jax.tree.map(jnp.asarray, quant.quantize_params(bf16))) / quant.param_bytes(bf16)
    print(f"stories260K int8: top-1 agreement {agree:.4f}, mean KL {kl:.2e} nats over {rows.size} tokens; "
          f"bytes int8/bf16 {ratio:.3f} (tied embedding kept bf16)")
    assert agree >= 0.97
    assert ratio < 0.6

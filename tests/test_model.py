"""The model against Hugging Face transformers (float32, eager attention) and its own invariants.

Tolerance: 1e-5 max absolute logit error in float32. Both sides compute the same float32 ops in a
different order (XLA vs ATen matmuls, fused vs unfused softmax); over 2-3 layers with logits of order 1
that reorder costs ~1e-6, so 1e-5 leaves a 10x margin while any real mistake (a wrong RoPE band, a
wrong GQA grouping, a missing norm) moves logits by >1e-2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama import model as M
from llama.config import TINY, ModelConfig, RopeScaling, to_hf_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("highest_precision")


def hf_model(cfg: ModelConfig, seed: int = 0):
    hf_cfg = transformers.LlamaConfig(**{**to_hf_config(cfg), "initializer_range": 0.1})
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():  # norms start at exactly 1; perturb them so the test sees a wrong gain
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def to_params(model, cfg):
    """HF weights into this project's layout through the project's own conversion table."""
    from llama.convert import hf_to_params

    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return hf_to_params(state, cfg)


def hf_logits(model, tokens, **kw):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens)), **kw).logits.numpy()


def _tiny(**kw) -> ModelConfig:
    return TINY.replace(**kw)


# GQA groups 1/2/4, tied and untied, llama3 scaling on/off/factor 32, head_dim != dim/n_heads, odd vocab.
PARITY_CONFIGS = {
    "mha-untied-scaled": _tiny(n_heads=4, n_kv_heads=4),
    "gqa2-tied-scaled": _tiny(n_heads=4, n_kv_heads=2, tie_embeddings=True),
    "gqa4-untied-unscaled": _tiny(n_heads=8, n_kv_heads=2, rope_scaling=None),
    "gqa4-tied-oddvocab-f32": _tiny(n_heads=8, n_kv_heads=2, vocab_size=1009, tie_embeddings=True,
                                    rope_scaling=RopeScaling(32.0, 1.0, 4.0, 64)),
    "headdim10-gqa3": _tiny(dim=48, n_heads=6, n_kv_heads=2, head_dim=10, ffn_dim=100, vocab_size=263),
    "3layers-headdim24": _tiny(dim=96, n_layers=3, n_heads=4, n_kv_heads=1, head_dim=24, vocab_size=301),
}


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_logits_match_transformers(name):
    cfg = PARITY_CONFIGS[name]
    model = hf_model(cfg)
    params = to_params(model, cfg)
    # 160 tokens: with original_max_position_embeddings=64 this spans the smoothed and the divided RoPE bands.
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 160))
    ref = hf_logits(model, tokens)
    out = np.asarray(jax.jit(lambda p, t: M.forward(p, t, cfg=cfg))(params, tokens))
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert np.abs(ref).max() > 0.5  # logits of order 1: the tolerance is meaningful
    err = np.abs(out - ref).max()
    assert err < ATOL, f"{name}: max |logit diff| {err:.2e}"


def test_rope_scaling_band_is_reached():
    """The parity sequences must exercise the scaling: turning it off changes the logits a lot."""
    cfg = PARITY_CONFIGS["mha-untied-scaled"]
    params = to_params(hf_model(cfg), cfg)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 160))
    a = M.forward(params, tokens, cfg=cfg)
    b = M.forward(params, tokens, cfg=cfg.replace(rope_scaling=None))
    assert float(jnp.abs(a - b).max()) > 1e-2


def test_rope_frequencies_match_facts_and_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # Test vectors from the facts sheet 3.2 (Meta apply_scaling == HF, float32, theta 5e5).
    vectors = [(128, 8.0, 29, 2.166571e-3), (128, 8.0, 32, 5.248460e-4), (128, 8.0, 35, 9.556213e-5),
               (128, 8.0, 63, 3.068926e-7), (128, 32.0, 29, 2.118407e-3), (64, 32.0, 15, 1.290548e-3),
               (64, 32.0, 31, 9.41831e-8), (128, 8.0, 28, 3.211446e-3)]
    for hd, factor, i, expect in vectors:
        cfg = ModelConfig(vocab_size=8, dim=hd * 2, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=8,
                          rope_scaling=RopeScaling(factor=factor))
        freqs = np.asarray(M.rope_frequencies(cfg))
        np.testing.assert_allclose(freqs[i], expect, rtol=2e-6)
        hf_cfg = transformers.LlamaConfig(**to_hf_config(cfg))
        hf_freqs = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")[0].numpy()
        np.testing.assert_allclose(freqs, hf_freqs, rtol=1e-6, atol=0)


def test_packed_rows_equal_documents_alone():
    """Several documents in one row (segment ids, positions restarting per document) give each
    document exactly the logits it gets alone: no attention crosses a document boundary."""
    cfg = PARITY_CONFIGS["gqa2-tied-scaled"]
    params = to_params(hf_model(cfg), cfg)
    rng = np.random.default_rng(2)
    lengths = [37, 80, 11, 32]
    docs = [rng.integers(0, cfg.vocab_size, n) for n in lengths]
    tokens = np.concatenate(docs)[None]
    segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths])[None]
    packed = np.asarray(M.forward(params, tokens, positions, segment_ids, cfg=cfg))[0]
    start = 0
    for doc in docs:
        alone = np.asarray(M.forward(params, doc[None], cfg=cfg))[0]
        np.testing.assert_allclose(packed[start:start + len(doc)], alone, atol=ATOL, rtol=0)
        start += len(doc)
    # and the mask matters: without segment ids the later documents see the earlier ones
    unmasked = np.asarray(M.forward(params, tokens, positions, cfg=cfg))[0]
    assert np.abs(unmasked[lengths[0]:] - packed[lengths[0]:]).max() > 1e-3


def test_bfloat16_compute_within_bound_of_float32():
    """bf16 compute (f32 params) vs f32: bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per
    op); through 2 layers the logit error stays within 5% of the logits' scale (max |logit|), and the
    top-1 prediction agrees wherever float32's margin is larger than that error. A wrong cast (e.g. softmax or RMSNorm in bf16 across a
    long row) would still be inside this bound, so the test also reads the program: every exp and rsqrt
    runs in float32."""
    cfg = PARITY_CONFIGS["gqa4-untied-unscaled"]
    params = to_params(hf_model(cfg), cfg)
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 128))
    f32 = np.asarray(M.forward(params, tokens, cfg=cfg))
    bf16 = np.asarray(M.forward(params, tokens, cfg=cfg.replace(compute_dtype="bfloat16")))
    assert bf16.dtype == np.float32
    # The dtype contract the bound alone cannot see: softmax (exp) and RMSNorm (rsqrt) run in float32.
    import re

    text = str(jax.make_jaxpr(lambda p, t: M.forward(p, t, cfg=cfg.replace(compute_dtype="bfloat16")))(params, tokens))
    ops = re.findall(r":(\w+)\[[^\]]*\] = (exp|rsqrt) ", text)
    assert {op for _, op in ops} == {"exp", "rsqrt"} and all(dt == "f32" for dt, _ in ops), ops
    assert "bf16[" in text  # and the matmuls really are bf16
    scale = np.abs(f32).max()
    err = np.abs(bf16 - f32).max() / scale
    assert 0 < err < 0.05, err
    # Wherever float32's top-2 gap exceeds twice the measured error, bf16 must pick the same token.
    top2 = np.sort(f32, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 2 * np.abs(bf16 - f32).max()
    assert clear.mean() > 0.3 and (bf16.argmax(-1) == f32.argmax(-1))[clear].all()


@pytest.mark.parametrize("remat", ["full", "save_matmuls"])
def test_remat_policies_same_loss_and_grads(remat):
    cfg = TINY
    params = M.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size)

    def loss(p, c):
        logits = M.forward(p, tokens, cfg=c)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))

    l0, g0 = jax.value_and_grad(loss)(params, cfg)
    l1, g1 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, cfg.replace(remat=remat))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g0, g1)


@pytest.mark.parametrize("eqn,x_shape,w_shape", [
    ("BTD,DF->BTF", (2, 5, 8), (8, 12)), ("BTF,FD->BTD", (2, 5, 12), (12, 8)),
    ("BTD,DNH->BTNH", (2, 5, 8), (8, 4, 3)), ("BTNH,NHD->BTD", (2, 5, 4, 3), (4, 3, 8)),
    ("BTD,DV->BTV", (2, 5, 8), (8, 20)), ("BTD,VD->BTV", (2, 5, 8), (20, 8))])
def test_dense_weight_gradient_equals_autodiff(eqn, x_shape, w_shape):
    """model.linear's hand-written weight gradient (_dense_bwd: the smaller operand transposed) equals autodiff of
    the plain einsum, float32, for every projection shape the model uses (the tied head's [V, D] too). Both sum
    the same products in a different order: 1e-6 relative (1e-5 absolute near zero) is float32 rounding over
    these short sums."""
    x = jax.random.normal(jax.random.key(0), x_shape)
    w = jax.random.normal(jax.random.key(1), w_shape)
    ct = jax.random.normal(jax.random.key(2), jnp.einsum(eqn, x, w).shape)
    ours = jax.vjp(lambda a, b: M.linear(eqn, a, b), x, w)
    plain = jax.vjp(lambda a, b: jnp.einsum(eqn, a, b), x, w)
    np.testing.assert_allclose(ours[0], plain[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.jit(ours[1])(ct), plain[1](ct)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)


def test_gqa_never_materialises_repeated_kv():
    """Decode against a 48-slot cache: no intermediate of the attention has the repeated-KV shape
    [B, S, N, H] (K/V expanded to the query heads)."""
    cfg = _tiny(n_heads=8, n_kv_heads=2, n_layers=1)
    params = M.init_params(cfg, jax.random.key(0))
    cache = M.init_cache(cfg, 1, 48)
    jaxpr = jax.make_jaxpr(lambda p, c: M.forward_cached(p, jnp.zeros((1, 1), jnp.int32),
                                                         jnp.zeros((1, 1), jnp.int32), c, cfg=cfg))(params, cache)
    text = str(jaxpr)  # includes the scanned layer body and every nested jaxpr
    H = cfg.head_dim
    assert f"f32[1,48,2,{H}]" in text  # the cache's own K/V heads are there ...
    assert f"f32[1,48,8,{H}]" not in text and f"f32[1,48,2,4,{H}]" not in text  # ... never repeated to 8 heads


def test_kv_cache_decode_matches_full_forward():
    cfg = PARITY_CONFIGS["gqa2-tied-scaled"]
    params = to_params(hf_model(cfg), cfg)
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 100))
    full = np.asarray(M.forward(params, tokens, cfg=cfg))
    cache = M.init_cache(cfg, 2, 128)
    pos = np.broadcast_to(np.arange(90), (2, 90))
    logits, cache = M.forward_cached(params, tokens[:, :90], pos, cache, cfg=cfg)
    np.testing.assert_allclose(np.asarray(logits), full[:, :90], atol=ATOL, rtol=0)
    for t in range(90, 100):
        logits, cache = M.forward_cached(params, tokens[:, t:t + 1], np.full((2, 1), t), cache, cfg=cfg)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=ATOL, rtol=0)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN fused attention needs a GPU (run by experiments/gpu_bench.sh)")
def test_cudnn_attention_matches_xla_reference_bf16():
    """The fused kernel replaces the reference path: same logits within bf16 rounding (8 mantissa bits;
    through 2 layers, 2% of the logits' scale), with packed rows (segment ids) and GQA."""
    cfg = _tiny(n_heads=8, n_kv_heads=2, head_dim=64, dim=256, compute_dtype="bfloat16", param_dtype="bfloat16")
    params = M.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 128), 0, cfg.vocab_size)
    segment_ids = jnp.concatenate([jnp.ones((2, 50), jnp.int32), jnp.full((2, 78), 2, jnp.int32)], axis=1)
    positions = jnp.concatenate([jnp.arange(50), jnp.arange(78)])[None].repeat(2, 0)
    ref = M.forward(params, tokens, positions, segment_ids, cfg=cfg)
    fused = M.forward(params, tokens, positions, segment_ids, cfg=cfg.replace(attention_impl="cudnn"))
    err = float(jnp.abs(fused - ref).max() / jnp.abs(ref).max())
    assert err < 0.02, err

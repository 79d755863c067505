"""Conversion is proven by logits, not by shapes: a wrong q/k permutation converts without error.

References: Hugging Face transformers `LlamaForCausalLM` in float32 with eager attention (the frozen
reference), the real llama2.c stories260K model and its tokenizer, and a real TinyStories passage.

Tolerance: 1e-5 max abs on logits of magnitude ~1. Both sides compute in float32 (matmul precision
"highest" here, plain float32 matmuls in torch on CPU); the only difference is summation order inside the
dots and softmax, ~1e-7 relative per op (measured ~1e-6 max abs on these models). stories260K has
logits up to ~20, so its tolerance is 1e-4 (the same relative error).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import require_shared
from llama import model
from llama.checkpoint import load_model, save_model
from llama.config import TINY, TINY_TIED, ModelConfig, RopeScaling, from_meta_params, to_hf_config
from llama.convert import (TABLE, ConvertError, HFCheckpoint, convert, hf_names, hf_to_meta_rows, load_llama2c,
                           main, meta_to_hf_rows, params_to_hf, hf_to_params)

jax.config.update("jax_default_matmul_precision", "highest")
transformers.logging.set_verbosity_error()

TOL = 1e-5
SHAPES = {
    "gqa": TINY,  # GQA 4:2 with llama3 RoPE scaling
    "tied": TINY_TIED,
    "mha-no-scaling": TINY.replace(n_kv_heads=4, rope_scaling=None, vocab_size=320, ffn_dim=96),
    "mqa-wide-heads": TINY.replace(n_layers=3, n_heads=2, n_kv_heads=1, head_dim=48, dim=80),
}


def hf_model(cfg: ModelConfig, seed: int = 0, dtype=torch.float32) -> transformers.LlamaForCausalLM:
    """A random HF model; weights at std 0.1 and norm gains around 1 so that every tensor matters."""
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(cfg)))
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return m.to(dtype).eval()


def random_params(cfg: ModelConfig, seed: int = 3):
    """This project's random params at the same scale as hf_model's."""
    leaves, treedef = jax.tree.flatten(model.param_specs(cfg), is_leaf=model.is_spec)
    rng = np.random.default_rng(seed)
    made = [((s.init == "ones") + 0.1 * rng.standard_normal(s.shape)).astype(np.float32) for s in leaves]
    return jax.tree.unflatten(treedef, made)


def hf_logits(m, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m.float()(torch.tensor(tokens)).logits.numpy()


def our_logits(cfg, params, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(model.forward(params, jnp.asarray(tokens), cfg=cfg.replace(compute_dtype="float32")))


def tokens_for(cfg, T=24, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, T))


def load_hf(path, **kw):
    m, info = transformers.LlamaForCausalLM.from_pretrained(path, output_loading_info=True,
                                                            attn_implementation="eager", **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return m.eval()


# ------------------------------------------------------------------------------------------ HF <-> Orbax
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_hf_to_orbax_logits_match_transformers(tmp_path, shape):
    cfg = SHAPES[shape]
    m = hf_model(cfg)
    m.save_pretrained(tmp_path / "hf", max_shard_size="100KB")  # several shards + index
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    convert("hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "orbax"), progress=False)
    cfg2, params = load_model(str(tmp_path / "orbax"))
    assert (cfg2.n_kv_heads, cfg2.tie_embeddings, cfg2.head_dim) == (cfg.n_kv_heads, cfg.tie_embeddings, cfg.head_dim)
    tokens = tokens_for(cfg)
    np.testing.assert_allclose(our_logits(cfg2, params, tokens), hf_logits(m, tokens), atol=TOL, rtol=0)


@pytest.mark.parametrize("shape", ["gqa", "tied"])
def test_orbax_to_hf_logits_match_transformers(tmp_path, shape):
    cfg = SHAPES[shape]
    params = random_params(cfg)
    save_model(str(tmp_path / "orbax"), cfg, params)
    summary = convert("orbax-to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf"), shard_bytes=60_000,
                      progress=False)
    files = sorted(os.listdir(tmp_path / "hf"))
    assert "model.safetensors.index.json" in files and "generation_config.json" in files, files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1, files
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert ("lm_head.weight" in index["weight_map"]) == (not cfg.tie_embeddings)
    assert summary["params"] == cfg.param_count()
    m = load_hf(tmp_path / "hf", dtype=torch.float32)
    tokens = tokens_for(cfg)
    np.testing.assert_allclose(hf_logits(m, tokens), our_logits(cfg, params, tokens), atol=TOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "f16", "f32"])
def test_round_trip_hf_orbax_hf_is_bit_exact(tmp_path, dtype):
    from safetensors.numpy import load_file

    m = hf_model(TINY, seed=5, dtype=dtype)
    m.save_pretrained(tmp_path / "a", max_shard_size="200KB")
    convert("hf-to-orbax", str(tmp_path / "a"), str(tmp_path / "o"), progress=False)
    convert("orbax-to-hf", str(tmp_path / "o"), str(tmp_path / "b"), shard_bytes=100_000, progress=False)

    def tensors(d):  # read with the safetensors library, independently of this project's reader
        out = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                out.update(load_file(os.path.join(d, f)))
        return out

    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name
    cfg_a = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg_b = json.loads((tmp_path / "b" / "config.json").read_text())
    for k in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert cfg_a[k] == cfg_b[k], k


def test_dtype_flag_converts(tmp_path):
    hf_model(TINY, dtype=torch.bfloat16).save_pretrained(tmp_path / "a")
    convert("hf-to-orbax", str(tmp_path / "a"), str(tmp_path / "o"), dtype="float32", progress=False)
    cfg, params = load_model(str(tmp_path / "o"))
    assert cfg.param_dtype == "float32" and params["layers"]["wq"].dtype == jnp.float32
    state = HFCheckpoint(str(tmp_path / "a"))
    np.testing.assert_array_equal(np.asarray(params["embed"]), state["model.embed_tokens.weight"].astype(np.float32))


def test_name_table_round_trip_in_memory():
    params = random_params(TINY)
    back = hf_to_params(params_to_hf(params, TINY), TINY)
    jax.tree.map(np.testing.assert_array_equal, params, back)


# ---------------------------------------------------------------------------------------- Meta layout
def test_meta_permutation_is_the_inverse_and_matches_the_facts_sheet():
    n, hd, d = 3, 8, 5
    w = np.arange(n * hd * d, dtype=np.float32).reshape(n * hd, d)
    hf = meta_to_hf_rows(w, n)
    for h in range(n):
        for i in range(hd // 2):
            for c in range(2):  # facts sheet 4.2: HF_row(h*hd + c*hd/2 + i) = Meta_row(h*hd + 2i + c)
                np.testing.assert_array_equal(hf[h * hd + c * hd // 2 + i], w[h * hd + 2 * i + c])
    np.testing.assert_array_equal(hf_to_meta_rows(hf, n), w)


# Concatenation axes of fairscale's layers (facts sheet 4.4), used here to *split* into MP shards.
_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w_gate": 0, "w_up": 0, "lm_head": 0, "embed": 0, "wo": 1, "w_down": 1}


def write_meta_checkpoint(directory, m, cfg: ModelConfig, params_json: dict, n_shards: int = 2):
    """An HF model in Meta's consolidated format: Meta names, the inverse q/k permutation, split into
    model-parallel shards, saved with torch.save (as Meta's checkpoints are)."""
    sd = {k: v.detach().float() for k, v in m.state_dict().items()}
    shards = [{} for _ in range(n_shards)]
    for t in TABLE:
        for i, name in enumerate(hf_names(t, cfg)):
            x = sd.get(name, sd["model.embed_tokens.weight"] if name == "lm_head.weight" else None)
            if t.param[-1] in ("wq", "wk"):
                x = torch.from_numpy(hf_to_meta_rows(x.numpy(), cfg.n_heads if t.param[-1] == "wq" else cfg.n_kv_heads))
            axis = _SPLIT.get(t.param[-1])
            for s in range(n_shards):
                shards[s][t.meta.format(i)] = x.clone() if axis is None else x.chunk(n_shards, axis)[s].clone()
    os.makedirs(directory)
    for s, shard in enumerate(shards):
        torch.save(shard, os.path.join(directory, f"consolidated.{s:02d}.pth"))
    with open(os.path.join(directory, "params.json"), "w") as f:
        json.dump(params_json, f)


def test_meta_two_shards_import_to_the_same_logits(tmp_path):
    cfg = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, rope_theta=500000.0,
                      rope_scaling=RopeScaling(), max_seq_len=256, bos_id=1, eos_ids=(2,))
    params_json = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256, "multiple_of": 32,
                   "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
    assert from_meta_params(params_json).ffn_dim == cfg.ffn_dim
    m = hf_model(cfg, seed=7)
    write_meta_checkpoint(str(tmp_path / "meta"), m, cfg, params_json)
    convert("meta-to-orbax", str(tmp_path / "meta"), str(tmp_path / "o"), progress=False)
    cfg2, params = load_model(str(tmp_path / "o"))
    tokens = tokens_for(cfg, T=40)
    np.testing.assert_allclose(our_logits(cfg2, params, tokens), hf_logits(m, tokens), atol=TOL, rtol=0)
    # and on to HF: transformers reads it back to the same logits
    convert("meta-to-hf", str(tmp_path / "meta"), str(tmp_path / "hf"), progress=False)
    np.testing.assert_allclose(hf_logits(load_hf(tmp_path / "hf"), tokens), hf_logits(m, tokens), atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------ llama2.c stories260K
def tinystories_passage() -> str:
    text = require_shared("assets", "text", "tinystories", "tinystories_v1_valid_head.txt").read_text()
    return text[:1500]


def test_stories260k_to_orbax_to_hf_same_logits_and_low_loss(tmp_path):
    import sentencepiece as spm

    src = require_shared("assets", "llama2c_stories260K", "stories260K.bin")
    sp = spm.SentencePieceProcessor(model_file=str(src.parent / "tok512.model"))
    tokens = np.array([[sp.bos_id()] + sp.encode(tinystories_passage())][0][:256])[None]
    convert("llama2c-to-orbax", str(src), str(tmp_path / "o"), progress=False)
    convert("orbax-to-hf", str(tmp_path / "o"), str(tmp_path / "hf"), progress=False)
    cfg, params = load_model(str(tmp_path / "o"))
    # the checkpoint carries its manifest: where the weights came from, fingerprinted
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["extra"]["converted_from"] == "llama2c-to-orbax" and m["config"]["dim"] == 64
    assert [d["path"] for d in m["data"]] == [str(src)] and m["data"][0]["size"] == 1_056_540
    ours = our_logits(cfg, params, tokens)
    theirs = hf_logits(load_hf(tmp_path / "hf"), tokens)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    logp = jax.nn.log_softmax(ours[0, :-1], axis=-1)
    loss = float(-np.take_along_axis(np.asarray(logp), tokens[0, 1:, None], axis=1).mean())
    print(f"stories260K next-token loss on {tokens.shape[1]} TinyStories tokens: {loss:.3f} nats/token")
    assert loss < 2.0, loss  # measured 1.396; a wrong q/k permutation gives far more
    # load_llama2c (the in-memory path the inference code uses) gives the same parameters
    cfg2, params2 = load_llama2c(str(src))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), params2)


def test_wrong_permutation_would_be_caught():
    """The loss threshold above has teeth: skipping the q/k permutation puts the loss far above it."""
    import sentencepiece as spm

    import llama.convert as conv

    src = require_shared("assets", "llama2c_stories260K", "stories260K.bin")
    sp = spm.SentencePieceProcessor(model_file=str(src.parent / "tok512.model"))
    tokens = np.array([sp.bos_id()] + sp.encode(tinystories_passage()))[:256][None]

    def loss(params, cfg):
        logp = jax.nn.log_softmax(our_logits(cfg, params, tokens)[0, :-1], axis=-1)
        return float(-np.take_along_axis(np.asarray(logp), tokens[0, 1:, None], axis=1).mean())

    cfg, good = load_llama2c(str(src))
    original = conv.meta_to_hf_rows
    try:
        conv.meta_to_hf_rows = lambda w, n: w
        _, bad = load_llama2c(str(src))
    finally:
        conv.meta_to_hf_rows = original
    assert loss(bad, cfg) > 2.0 > loss(good, cfg), (loss(bad, cfg), loss(good, cfg))  # measured 4.45 vs 1.40


# -------------------------------------------------------------------------------------------- bad input
def _write_state(directory, state: dict, cfg: ModelConfig, config_changes=None):
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    hf = to_hf_config(cfg)
    hf.update(config_changes or {})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f)


@pytest.fixture
def tiny_state():
    return params_to_hf(random_params(TINY), TINY)


def _assert_fails(tmp_path, src, match, direction="hf-to-orbax"):
    dst = tmp_path / "dst"
    with pytest.raises(ValueError, match=match):
        convert(direction, str(src), str(dst), progress=False)
    assert not dst.exists(), "a failed conversion must leave the destination untouched"
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p], "staging directory left behind"


def test_missing_tensor(tmp_path, tiny_state):
    del tiny_state["model.layers.1.mlp.up_proj.weight"]
    _write_state(tmp_path / "src", tiny_state, TINY)
    _assert_fails(tmp_path, tmp_path / "src", r"missing.*model\.layers\.1\.mlp\.up_proj\.weight")


def test_wrong_shape(tmp_path, tiny_state):
    tiny_state["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    _write_state(tmp_path / "src", tiny_state, TINY)
    _assert_fails(tmp_path, tmp_path / "src", r"model\.safetensors.*k_proj\.weight.*shape \(64, 64\).*\(32, 64\)")


def test_wrong_dtype(tmp_path, tiny_state):
    tiny_state["model.norm.weight"] = np.ones(64, np.int32)
    _write_state(tmp_path / "src", tiny_state, TINY)
    _assert_fails(tmp_path, tmp_path / "src", r"model\.safetensors.*'model\.norm\.weight'.*int32")


def test_config_contradicting_weights(tmp_path, tiny_state):
    _write_state(tmp_path / "src", tiny_state, TINY, {"intermediate_size": 128})
    _assert_fails(tmp_path, tmp_path / "src", r"gate_proj\.weight.*shape \(192, 64\).*\(128, 64\)")
    _write_state(tmp_path / "src2", tiny_state, TINY, {"num_hidden_layers": 3})
    _assert_fails(tmp_path, tmp_path / "src2", r"missing.*model\.layers\.2\.")
    _write_state(tmp_path / "src3", tiny_state, TINY, {"tie_word_embeddings": True})
    _assert_fails(tmp_path, tmp_path / "src3", r"lm_head\.weight.*differs")


def test_truncated_and_corrupt_safetensors(tmp_path, tiny_state):
    _write_state(tmp_path / "src", tiny_state, TINY)
    f = tmp_path / "src" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    _assert_fails(tmp_path, tmp_path / "src", r"model\.safetensors: tensor '.*' ends at byte .* truncated")
    f.write_bytes(data[:5])
    _assert_fails(tmp_path, tmp_path / "src", r"model\.safetensors: 5 bytes is too short")
    f.write_bytes(data[:8] + b"{not json" + data[17:])
    _assert_fails(tmp_path, tmp_path / "src", r"model\.safetensors: corrupt safetensors header")


def test_unknown_format_and_missing_source(tmp_path):
    with pytest.raises(ConvertError, match="unknown conversion 'gguf-to-orbax'"):
        convert("gguf-to-orbax", str(tmp_path), str(tmp_path / "dst"))
    (tmp_path / "empty").mkdir()
    _assert_fails(tmp_path, tmp_path / "empty", "no config.json|config.json: file not found")
    (tmp_path / "bin").write_bytes(b"\x00" * 100)
    _assert_fails(tmp_path, tmp_path / "bin", "not a llama2.c legacy .bin", direction="llama2c-to-orbax")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 256}))
    (tmp_path / "meta" / "consolidated.00.pth").write_bytes(b"not a zip")
    _assert_fails(tmp_path, tmp_path / "meta", r"consolidated\.00\.pth: not a torch zip", direction="meta-to-orbax")


def test_existing_destination_is_kept(tmp_path, tiny_state):
    _write_state(tmp_path / "src", tiny_state, TINY)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        convert("hf-to-orbax", str(tmp_path / "src"), str(tmp_path / "dst"), progress=False)
    assert (tmp_path / "dst" / "keep.txt").read_text() == "mine"
    del tiny_state["model.norm.weight"]
    _write_state(tmp_path / "bad", tiny_state, TINY)
    with pytest.raises(ConvertError):
        convert("hf-to-orbax", str(tmp_path / "bad"), str(tmp_path / "dst"), overwrite=True, progress=False)
    assert sorted(os.listdir(tmp_path / "dst")) == ["keep.txt"]


def test_cli_summary_and_error(tmp_path, capsys, tiny_state):
    _write_state(tmp_path / "src", tiny_state, TINY)
    assert main(["hf-to-orbax", str(tmp_path / "src"), str(tmp_path / "o"), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "hf-to-orbax, bfloat16" in out and f"{TINY.param_count():,} parameters" in out
    assert main(["orbax-to-hf", str(tmp_path / "o"), str(tmp_path / "hf"), "--shard-size", "50KB"]) == 0
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert main(["hf-to-orbax", str(tmp_path / "nowhere"), str(tmp_path / "o2")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_stories260k_to_int8_orbax_equals_load_time_quantization(tmp_path, capsys):
    """`--quantize int8` writes the int8 checkpoint that load-time quantization would make, bit for bit (same
    formula, one layer at a time on the host), smaller on disk; it serves as it is; HF output is refused."""
    from llama import generate as G
    from llama import quant

    src = require_shared("assets", "llama2c_stories260K", "stories260K.bin")
    assert main(["llama2c-to-orbax", str(src), str(tmp_path / "q"), "--quantize", "int8"]) == 0
    assert "int8 linear weights" in capsys.readouterr().out
    convert("llama2c-to-orbax", str(src), str(tmp_path / "f"), progress=False)
    cfg, q = load_model(str(tmp_path / "q"))
    _, f = load_model(str(tmp_path / "f"))
    want = quant.quantize_params(f)
    assert jax.tree.structure(q) == jax.tree.structure(want) and isinstance(q["embed"], model.QuantizedWeight)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), q, want)
    size = lambda d: sum(p.stat().st_size for p in (tmp_path / d / "params").rglob("*") if p.is_file())  # noqa: E731
    print(f"stories260K on disk: float32 {size('f')} bytes, int8 {size('q')} bytes")
    assert size("q") < 0.4 * size("f")
    cfg_l, served, _ = G.load_for_inference(str(tmp_path / "q"), quantize="int8")
    assert G.generate(served, [[1, 403, 407]], cfg=cfg_l, max_new_tokens=20).tokens == \
        G.generate(want, [[1, 403, 407]], cfg=cfg, max_new_tokens=20).tokens
    with pytest.raises(ConvertError, match="int8 checkpoints are Orbax checkpoints"):
        convert("llama2c-to-hf", str(src), str(tmp_path / "h"), quantize="int8", progress=False)
    with pytest.raises(ConvertError, match="an int8 checkpoint; convert from the float checkpoint"):
        convert("orbax-to-hf", str(tmp_path / "q"), str(tmp_path / "h"), progress=False)

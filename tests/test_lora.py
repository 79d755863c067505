"""LoRA (llama/lora.py) against references this project did not write: Hugging Face PEFT + transformers in float32
load our orbax-to-hf base and orbax-to-peft adapters and must give our LoRA forward's logits.

Tolerance 1e-5 max abs on logits of magnitude ~1, as tests/test_convert.py: both sides float32 (matmul precision
"highest"); the LoRA path only adds two rank-r float32 dots per projection, so differences stay summation order.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft  # requirements-test.txt: the reference this export is checked against
import pytest
import torch

from llama import lora, model, quant
from llama.checkpoint import save_model
from llama.config import TINY, ConfigError
from llama.convert import convert, main
from test_convert import hf_logits, load_hf, our_logits, random_params, tokens_for

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-5
CFG = TINY.replace(param_dtype="float32", compute_dtype="float32")  # GQA 4:2, llama3 RoPE scaling, untied
LCFG = lora.LoraConfig(rank=4, alpha=8.0, targets=lora.TARGETS)


def random_adapters(cfg=CFG, lcfg=LCFG, seed=5):
    """PEFT-initialised A, and a random non-zero B (a fresh B is zero, which would make every comparison vacuous)."""
    ad = lora.init_adapters(cfg, lcfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return {t: {"a": ab["a"], "b": jnp.asarray(0.1 * rng.standard_normal(ab["b"].shape), jnp.float32)}
            for t, ab in ad.items()}


def test_init_declaration_and_forward_equals_merged():
    params, ad = random_params(CFG), random_adapters()
    fresh = lora.init_adapters(CFG, LCFG, jax.random.key(0))
    for t, ab in fresh.items():  # PEFT's init: B zero, A ~ U(+-1/sqrt(fan_in)) over the base's input axes
        base = params["layers"][t]
        n_in = lora.N_IN[t]
        assert ab["a"].shape == base.shape[:1 + n_in] + (4,) and ab["b"].shape == (base.shape[0], 4) + base.shape[1 + n_in:]
        assert not np.any(ab["b"]) and 0 < np.abs(ab["a"]).max() <= 1 / np.sqrt(np.prod(base.shape[1:1 + n_in]))
    tokens = tokens_for(CFG)
    adapted = our_logits(CFG, lora.apply(params, ad, LCFG), tokens)
    np.testing.assert_allclose(adapted, our_logits(CFG, lora.merge(params, ad, LCFG), tokens), atol=TOL, rtol=0)
    assert np.abs(adapted - our_logits(CFG, params, tokens)).max() > 100 * TOL  # the adapters matter
    # The KV-cache path goes through the same model.linear.
    cached, _ = model.forward_cached(lora.apply(params, ad, LCFG), jnp.asarray(tokens),
                                     jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape),
                                     model.init_cache(CFG, tokens.shape[0], tokens.shape[1]), cfg=CFG)
    np.testing.assert_allclose(np.asarray(cached), adapted, atol=TOL, rtol=0)
    # A fresh adapter (B = 0) leaves the model as it was.
    np.testing.assert_array_equal(our_logits(CFG, lora.apply(params, fresh, LCFG), tokens), our_logits(CFG, params, tokens))


def test_peft_export_matches_peft_and_transformers(tmp_path, capsys):
    params, ad = random_params(CFG), random_adapters()
    save_model(str(tmp_path / "base"), CFG, params)
    convert("orbax-to-hf", str(tmp_path / "base"), str(tmp_path / "hf"), progress=False)
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("wq", "wk", "wo", "w_down"))  # wo: two input axes
    ad = {t: ad[t] for t in lcfg.targets}
    lora.save_adapters(str(tmp_path / "adapters"), CFG, lcfg, ad, base=str(tmp_path / "hf"))
    assert main(["orbax-to-peft", str(tmp_path / "adapters"), str(tmp_path / "peft")]) == 0
    assert "LoRA rank 4 on down_proj, k_proj, o_proj, q_proj" in capsys.readouterr().out
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    assert config["base_model_name_or_path"] == str(tmp_path / "hf")
    m = peft.PeftModel.from_pretrained(load_hf(tmp_path / "hf", dtype=torch.float32), str(tmp_path / "peft")).eval()
    tokens = tokens_for(CFG)
    ours = our_logits(CFG, lora.apply(params, ad, lcfg), tokens)
    np.testing.assert_allclose(hf_logits(m, tokens), ours, atol=TOL, rtol=0)
    assert np.abs(ours - our_logits(CFG, params, tokens)).max() > 100 * TOL  # a missing B would show
    # Round trip of the adapter checkpoint itself.
    cfg2, lcfg2, ad2, base = lora.load_adapters(str(tmp_path / "adapters"))
    assert (cfg2, lcfg2, base) == (CFG, lcfg, str(tmp_path / "hf"))
    jax.tree.map(np.testing.assert_array_equal, ad2, jax.tree.map(np.asarray, ad))


def test_gradients_and_optimizer_hold_only_adapters():
    params, ad = random_params(CFG), random_adapters()
    tokens = jnp.asarray(tokens_for(CFG))

    def loss(adapters):
        logits = model.forward(lora.apply(params, adapters, LCFG), tokens[:, :-1], cfg=CFG)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    opt = optax.adamw(1e-2)
    state = opt.init(ad)
    value, grads = jax.jit(jax.value_and_grad(loss))(ad)
    shapes = {tuple(s.shape) for s in jax.tree.leaves(lora.adapter_specs(CFG, LCFG), is_leaf=model.is_spec)}
    assert {x.shape for x in jax.tree.leaves(state) if x.ndim} == shapes  # moments of the adapters, nothing else
    assert sum(x.size for x in jax.tree.leaves(state) if x.ndim) == 2 * sum(x.size for x in jax.tree.leaves(ad))
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
    updates, state = opt.update(grads, state, ad)
    assert jax.jit(loss)(optax.apply_updates(ad, updates)) < value


def test_int8_base_with_lora_matches_dequantized_base():
    params, ad = random_params(CFG), random_adapters()
    q = quant.quantize_params(params)
    deq = {**q, "layers": {k: quant.dequantize(v) if isinstance(v, model.QuantizedWeight) else v
                           for k, v in q["layers"].items()}}
    deq = {k: quant.dequantize(v) if isinstance(v, model.QuantizedWeight) else v for k, v in deq.items()}
    tokens = tokens_for(CFG)
    int8 = our_logits(CFG, lora.apply(q, ad, LCFG), tokens)
    # Same weights either way ((x q) s = x (q s) per output channel): float32 summation order only, so TOL.
    np.testing.assert_allclose(int8, our_logits(CFG, lora.apply(deq, ad, LCFG), tokens), atol=TOL, rtol=0)
    np.testing.assert_allclose(our_logits(CFG, lora.merge(q, ad, LCFG), tokens), int8, atol=TOL, rtol=0)


def test_bad_configs_and_inputs_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"LoraConfig.targets.*unknown \['q_proj'\].*expected names from"):
        lora.LoraConfig(targets=("wq", "q_proj"))
    with pytest.raises(ConfigError, match=r"LoraConfig.rank: 0; expected a positive integer"):
        lora.LoraConfig(rank=0)
    with pytest.raises(ConfigError, match=r"LoraConfig.rank=2.5 .*expected an integer"):
        lora.LoraConfig(rank=2.5)
    with pytest.raises(ConfigError, match=r"LoraConfig.dropout: 1.0; expected a rate in \[0, 1\)"):
        lora.LoraConfig(dropout=1.0)
    with pytest.raises(ConfigError, match=r"adapters: adapter shapes"):
        lora.save_adapters(str(tmp_path / "x"), CFG, lora.LoraConfig(rank=2, targets=lora.TARGETS), random_adapters())
    assert not (tmp_path / "x").exists()
    (tmp_path / "empty").mkdir()
    assert main(["orbax-to-peft", str(tmp_path / "empty"), str(tmp_path / "peft")]) == 2
    assert "not a LoRA adapter checkpoint" in capsys.readouterr().err


def test_adapters_shard_like_their_base_weight():
    from jax.sharding import PartitionSpec as P

    from sharding.mesh import MeshConfig, make_mesh
    from sharding.rules import param_shardings

    mesh = make_mesh(MeshConfig.parse("data=2,fsdp=2,tensor=2"))
    sh = param_shardings(lora.adapter_specs(CFG, LCFG), mesh)
    # A keeps the base's input axes (D over fsdp; wo's heads over tensor), B its output axes; the rank is whole.
    assert sh["wq"]["a"].spec == P(None, "fsdp", None) and sh["wq"]["b"].spec == P(None, None, "tensor", None)
    assert sh["wo"]["a"].spec == P(None, "tensor", None, None) and sh["wo"]["b"].spec == P(None, None, "fsdp")
    assert sh["w_down"]["a"].spec == P(None, "tensor", None) and sh["w_down"]["b"].spec == P(None, None, "fsdp")


def test_peft_export_is_atomic_and_overwrites_only_a_peft_adapter(tmp_path, capsys):
    lora.save_adapters(str(tmp_path / "ad"), CFG, LCFG, random_adapters())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["orbax-to-peft", str(tmp_path / "ad"), str(tmp_path / "mine"), "--overwrite"]) == 2
    assert "not a PEFT adapter directory" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    assert main(["orbax-to-peft", str(tmp_path / "ad"), str(tmp_path / "peft")]) == 0
    assert main(["orbax-to-peft", str(tmp_path / "ad"), str(tmp_path / "peft")]) == 2  # exists, no --overwrite
    assert main(["orbax-to-peft", str(tmp_path / "ad"), str(tmp_path / "peft"), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "mine", "peft"]  # no staging directory left
    from llama.tensor_files import read_safetensors_header

    header = read_safetensors_header(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert len(header) == 2 * len(lora.TARGETS) * CFG.n_layers
    assert header["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].shape == (4, CFG.n_heads * CFG.head_dim)
    assert header["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (CFG.dim, 4)


@pytest.mark.slow
def test_generate_and_chat_on_a_lora_run_merged_and_at_runtime(tmp_path, capsys):
    """`llama.generate --checkpoint RUN` on a LoRA run (RUN/adapters, as llama/train.py writes it, recording its
    base): --lora merge and --lora runtime give the same greedy ids as generation from the merged export saved as a
    plain model checkpoint, and differ from the base's (the adapters matter). `llama.chat` runs on it both ways."""
    import io

    from llama import chat
    from llama import generate as G
    from llama.convert import load_llama2c
    from llama.tokenizer import load_tokenizer
    from tests.conftest import require_shared

    cfg, params = load_llama2c(str(require_shared("assets", "llama2c_stories260K", "stories260K.bin")))
    tok = str(require_shared("assets", "llama2c_stories260K", "tok512.model"))
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w_down"))
    ad = random_adapters(cfg, lcfg)
    base = save_model(str(tmp_path / "base"), cfg, params)
    lora.save_adapters(str(tmp_path / "run" / "adapters"), cfg, lcfg, jax.device_get(ad), base=base)
    merged = save_model(str(tmp_path / "merged"), cfg, lora.merge(params, ad, lcfg))

    def ids(ckpt, *extra):
        G.main(["--checkpoint", ckpt, "--tokenizer", tok, "--prompt", "Once upon a time", "--temperature", "0",
                "--max-new-tokens", "30", "--json-ids", *extra])
        return json.loads(capsys.readouterr().out.strip().splitlines()[0])["ids"]

    want = ids(merged)
    assert ids(str(tmp_path / "run")) == want
    assert ids(str(tmp_path / "run"), "--lora", "runtime") == want
    assert ids(str(tmp_path / "run" / "adapters"), "--lora", "runtime") == want
    assert ids(base) != want
    prompt = load_tokenizer(tok).encode("Once upon a time", bos=True)
    _, p_rt, _ = G.load_for_inference(str(tmp_path / "run"), lora_mode="runtime")
    assert isinstance(p_rt["layers"]["wq"], model.LoraWeight)
    assert G.generate(p_rt, [prompt], cfg=cfg, max_new_tokens=30).tokens[0] == want

    # chat needs the Llama 3 tokenizer: a tiny random model with its vocabulary, adapters on top
    tok3 = str(require_shared("assets", "llama3_tokenizer", "tokenizer.model"))
    cfg3 = TINY.replace(vocab_size=128256, dim=32, tie_embeddings=True, bos_id=128000, eos_ids=(128001, 128008, 128009))
    p3 = model.init_params(cfg3, jax.random.key(9))
    base3 = save_model(str(tmp_path / "base3"), cfg3, p3)
    lora.save_adapters(str(tmp_path / "run3" / "adapters"), cfg3, lcfg, jax.device_get(random_adapters(cfg3, lcfg)),
                       base=base3)
    for mode in G.LORA_MODES:
        stdout = io.StringIO()
        chat.main(["--checkpoint", str(tmp_path / "run3"), "--tokenizer", tok3, "--max-new-tokens", "5",
                   "--temperature", "0", "--lora", mode], stdin=io.StringIO("Hi there\n/exit\n"), stdout=stdout)
        assert stdout.getvalue().count(">>> ") == 2
    # an adapter checkpoint without a recorded base is a clear error
    lora.save_adapters(str(tmp_path / "nobase"), cfg, lcfg, jax.device_get(ad), base=None)
    from llama.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="records no base checkpoint"):
        G.load_for_inference(str(tmp_path / "nobase"))

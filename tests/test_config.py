"""Config presets, FFN rule, exact parameter counts, and the HF / Meta config readers."""

import json

import jax
import pytest

from llama import config as C
from llama import model as M

# Facts sheet 2.1 (llama-models sku_list, recomputed): exact totals and FFN sizes.
EXPECTED = {
    "llama3.1-8b": (8_030_261_248, 14336),
    "llama3.1-70b": (70_553_706_496, 28672),
    "llama3.1-405b": (405_853_388_800, 53248),
    "llama3.2-1b": (1_235_814_400, 8192),
    "llama3.2-3b": (3_212_749_824, 8192),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_full_size_presets_eval_shape_exact_param_count(name):
    cfg = C.preset(name)
    total, ffn = EXPECTED[name]
    assert cfg.ffn_dim == ffn
    abstract = M.abstract_params(cfg)  # jax.eval_shape: nothing is allocated
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    assert M.count_params(abstract) == total
    assert cfg.param_count() == total


def test_preset_rope_factors_and_tying():
    assert C.LLAMA31_8B.rope_scaling.factor == 8.0 and not C.LLAMA31_8B.tie_embeddings
    assert C.LLAMA32_1B.rope_scaling.factor == 32.0 and C.LLAMA32_1B.tie_embeddings
    assert C.LLAMA32_1B.head_dim == 64 and C.LLAMA31_405B.head_dim == 128
    assert "lm_head" not in M.param_specs(C.LLAMA32_3B)


def test_ffn_rule_llama2_sizes():
    # Llama 2 FFN sizes (facts sheet 2.2): 7B 11008 (no multiplier, multiple_of 256); 70B 28672.
    assert C.ffn_hidden_dim(4096, 256, None) == 11008
    assert C.ffn_hidden_dim(8192, 4096, 1.3) == 28672


def _hf_llama31_8b_v4():
    # The published Llama-3.1-8B config.json fields (facts sheet 4.5), transformers 4.x schema.
    return {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
        "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
    }


def _arch(cfg):
    return cfg.replace(name="x", eos_ids=(0,), bos_id=0)


def test_hf_v4_schema_reads_the_8b_preset():
    cfg = C.from_hf_config(_hf_llama31_8b_v4())
    assert _arch(cfg) == _arch(C.LLAMA31_8B)


def test_hf_v5_schema_and_legacy_type_key():
    v4 = _hf_llama31_8b_v4()
    v5 = {k: v for k, v in v4.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")}
    v5["rope_parameters"] = {**v4["rope_scaling"], "rope_theta": 500000.0}
    v5["dtype"] = "bfloat16"
    v5["head_dim"] = 128
    assert C.from_hf_config(v5) == C.from_hf_config(v4)
    legacy = dict(v4, rope_scaling={k if k != "rope_type" else "type": v for k, v in v4["rope_scaling"].items()})
    assert C.from_hf_config(legacy) == C.from_hf_config(v4)


def test_hf_config_written_by_transformers_is_read_back():
    """Real reference: the dicts transformers itself writes for a Llama 3.2-style config."""
    transformers = pytest.importorskip("transformers")
    cfg = C.LLAMA32_1B
    hf = transformers.LlamaConfig(**C.to_hf_config(cfg))
    d = hf.to_dict()
    back = C.from_hf_config(d)
    assert _arch(back) == _arch(cfg)
    # and what we write, transformers reads with the same rope parameters
    rp = getattr(hf, "rope_parameters", None) or hf.rope_scaling
    assert rp["factor"] == 32.0 and rp["rope_type"] == "llama3"


def test_hf_config_round_trip_both_schemas(tmp_path):
    for schema in (4, 5):
        p = tmp_path / f"config{schema}.json"
        p.write_text(json.dumps(C.to_hf_config(C.LLAMA31_70B, schema=schema)))
        assert _arch(C.from_hf_config(str(p))) == _arch(C.LLAMA31_70B)
    none_rope = C.TINY.replace(rope_scaling=None)
    assert C.from_hf_config(C.to_hf_config(none_rope)).rope_scaling is None


@pytest.mark.parametrize("change, needle", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_scaling": {"rope_type": "llama3", "type": "linear", "factor": 8.0}}, "contradicts"),
    ({"torch_dtype": "bfloat16", "dtype": "float32"}, "contradicts"),
    ({"model_type": "mistral"}, "model_type"),
    ({"num_attention_heads": 30}, "n_kv_heads"),
    ({"torch_dtype": "int4"}, "dtype"),
])
def test_hf_config_errors_name_the_field(change, needle):
    hf = dict(_hf_llama31_8b_v4(), **change)
    with pytest.raises(C.ConfigError, match=needle):
        C.from_hf_config(hf)


def test_hf_config_missing_field_and_bad_file(tmp_path):
    hf = _hf_llama31_8b_v4()
    del hf["intermediate_size"]
    with pytest.raises(C.ConfigError, match="intermediate_size"):
        C.from_hf_config(hf)
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(C.ConfigError, match="config.json"):
        C.from_hf_config(str(bad))
    with pytest.raises(C.ConfigError, match="not found"):
        C.from_hf_config(str(tmp_path / "nope.json"))


def test_hf_config_ignores_harmless_extras():
    hf = dict(_hf_llama31_8b_v4(), some_future_field=3, output_attentions=False)
    assert C.from_hf_config(hf) == C.from_hf_config(_hf_llama31_8b_v4())


def test_meta_params_json():
    # Meta's params.json for 3.1 8B and 3.2 1B (facts sheet 4.3): no rope factor key.
    p8 = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
          "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-05, "rope_theta": 500000.0,
          "use_scaled_rope": True}
    assert _arch(C.from_meta_params(p8)) == _arch(C.LLAMA31_8B)
    p1 = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
          "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
          "use_scaled_rope": True}
    cfg1 = C.from_meta_params(p1)
    assert _arch(cfg1) == _arch(C.LLAMA32_1B) and cfg1.rope_scaling.factor == 32.0
    assert C.to_meta_params(C.LLAMA31_8B, 1024, 1.3) == p8
    with pytest.raises(C.ConfigError, match="ffn_dim"):
        C.to_meta_params(C.LLAMA31_8B, 256, None)


def test_model_config_validation():
    with pytest.raises(C.ConfigError, match="remat"):
        C.TINY.replace(remat="sometimes")
    with pytest.raises(C.ConfigError, match="compute_dtype"):
        C.TINY.replace(compute_dtype="int8")
    with pytest.raises(C.ConfigError, match="preset"):
        C.preset("llama9")
    assert C.ModelConfig.from_dict(C.LLAMA31_8B.to_dict()) == C.LLAMA31_8B


def test_replace_rederives_a_derived_head_dim_but_keeps_an_explicit_one():
    assert C.TINY.replace(n_heads=8).head_dim == 8  # 64 / 8
    assert C.TINY.replace(dim=128).head_dim == 32
    explicit = C.TINY.replace(head_dim=24)
    assert explicit.replace(dim=128).head_dim == 24

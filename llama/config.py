"""Model configuration: one typed, frozen dataclass, the Llama 3.1 / 3.2 presets, and the readers and writer
for Hugging Face `config.json` and Meta `params.json`.

Every number in the presets comes from `llama_models/sku_list.py` (llama-models 0.3.0) and the HF configs;
see `../shared/reference/llama31_facts.md` sections 2 and 4.5.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

REMAT_POLICIES = ("none", "full", "save_matmuls")
ATTENTION_IMPLS = ("xla", "flash", "cudnn", "splash")  # llama/attention.py
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config file or field that this project cannot represent exactly."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    """A finite int or float (not a bool): NaN and inf fail."""
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and -math.inf < x < math.inf


def check_fields(obj, ints=(), reals=(), bools=(), strs=()) -> None:
    """Type-check a config dataclass's fields when it is built, so a wrong type (a string "false" for a
    bool, an int for a list) fails here, naming the field, rather than inside the first jitted step."""
    kind = type(obj).__name__
    for names, ok, what in ((ints, _is_int, "an integer"), (reals, _is_real, "a finite number"),
                            (bools, lambda x: isinstance(x, bool), "true or false (a JSON/Python bool)"),
                            (strs, lambda x: isinstance(x, str), "a string")):
        for name in names:
            value = getattr(obj, name)
            if not ok(value):
                raise ConfigError(f"{kind}.{name}={value!r} ({type(value).__name__}): expected {what}")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 "llama3" RoPE frequency scaling (facts sheet 3.2). factor 8 for 3.1, 32 for 3.2 1B/3B."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        check_fields(self, ints=("original_max_position_embeddings",),
                     reals=("factor", "low_freq_factor", "high_freq_factor"))
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"RopeScaling.{name}={getattr(self, name)} must be positive")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture plus the numerics choices that do not change the parameter pytree's structure."""

    vocab_size: int
    dim: int  # D
    n_layers: int  # L
    n_heads: int  # N
    n_kv_heads: int  # K
    ffn_dim: int  # F
    head_dim: int = 0  # H; 0 means dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    max_seq_len: int = 131072
    tie_embeddings: bool = False
    bos_id: int = 128000
    eos_ids: tuple[int, ...] = (128001, 128008, 128009)
    # Numerics, chosen separately: parameters are stored in param_dtype, matmuls run in compute_dtype.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"  # one of REMAT_POLICIES
    attention_impl: str = "flash"  # one of ATTENTION_IMPLS (llama/attention.py); "xla" is the dense reference
    # flash tile: queries per block; 0 = per backend (llama/attention.py DEFAULT_BLOCKS, CACHED_BLOCKS)
    attention_block_q: int = 0
    attention_block_k: int = 0  # keys per tile; any T works (padded inside)
    name: str = "custom"

    def __post_init__(self):
        check_fields(self, ints=("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim",
                                 "max_seq_len", "bos_id"), reals=("norm_eps", "rope_theta"),
                     bools=("tie_embeddings",), strs=("param_dtype", "compute_dtype", "remat", "attention_impl", "name"))
        if not (isinstance(self.eos_ids, (tuple, list)) and self.eos_ids and all(map(_is_int, self.eos_ids))):
            raise ConfigError(f"ModelConfig.eos_ids={self.eos_ids!r}: expected a non-empty list of token ids, "
                              "e.g. [128001, 128008, 128009]")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"ModelConfig.rope_scaling={self.rope_scaling!r}: expected None or RopeScaling(...)")
        if not (self.norm_eps > 0 and self.rope_theta > 0):
            raise ConfigError(f"ModelConfig: norm_eps={self.norm_eps} and rope_theta={self.rope_theta} must be positive")
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; give head_dim")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim", "max_seq_len"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ModelConfig.{name} must be positive (or 0: per backend), got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} (GQA)")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"ModelConfig.remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"ModelConfig.attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        for name in ("attention_block_q", "attention_block_k"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ModelConfig.{name} must be positive (or 0: per backend), got {getattr(self, name)}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r}; expected one of {DTYPES}")
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))

    def replace(self, **changes) -> "ModelConfig":
        """dataclasses.replace, except that a head_dim derived from dim // n_heads is derived again when dim or
        n_heads changes (otherwise `--set model.dim=512` would silently keep the old head width)."""
        if ({"dim", "n_heads"} & set(changes) and "head_dim" not in changes
                and self.head_dim == self.dim // self.n_heads):
            changes["head_dim"] = 0
        return dataclasses.replace(self, **changes)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (G)."""
        return self.n_heads // self.n_kv_heads

    def param_count(self) -> int:
        """Exact parameter count by the facts-sheet formula (section 2.3); the model test checks it
        against `jax.eval_shape` of the real init."""
        d, hd = self.dim, self.head_dim
        per_layer = d * self.n_heads * hd + 2 * d * self.n_kv_heads * hd + self.n_heads * hd * d + 3 * d * self.ffn_dim + 2 * d
        return self.vocab_size * d * (1 if self.tie_embeddings else 2) + self.n_layers * per_layer + d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields {sorted(unknown)}")
        rope = d.get("rope_scaling")
        if rope is not None:
            if not isinstance(rope, dict) or set(rope) - {f.name for f in dataclasses.fields(RopeScaling)}:
                raise ConfigError(f"ModelConfig.rope_scaling={rope!r}: expected null or an object with "
                                  f"{[f.name for f in dataclasses.fields(RopeScaling)]}")
            d["rope_scaling"] = RopeScaling(**rope)
        if isinstance(d.get("eos_ids"), list):
            d["eos_ids"] = tuple(d["eos_ids"])
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in d and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"ModelConfig: missing required fields {missing}")
        return cls(**d)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FFN size rule (llama `model.py` FeedForward; facts sheet 2.2)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# ----------------------------------------------------------------------------------------------- presets
def _llama3(name, dim, n_layers, n_heads, multiple_of, mult, factor, tied, n_kv_heads=8) -> ModelConfig:
    return ModelConfig(
        name=name, vocab_size=128256, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        ffn_dim=ffn_hidden_dim(dim, multiple_of, mult), rope_scaling=RopeScaling(factor=factor),
        tie_embeddings=tied, param_dtype="bfloat16", compute_dtype="bfloat16",
    )


LLAMA31_8B = _llama3("llama3.1-8b", 4096, 32, 32, 1024, 1.3, 8.0, False)
LLAMA31_70B = _llama3("llama3.1-70b", 8192, 80, 64, 4096, 1.3, 8.0, False)
LLAMA31_405B = _llama3("llama3.1-405b", 16384, 126, 128, 4096, 1.2, 8.0, False)
LLAMA32_1B = _llama3("llama3.2-1b", 2048, 16, 32, 256, 1.5, 32.0, True)
LLAMA32_3B = _llama3("llama3.2-3b", 3072, 28, 24, 256, 1.0, 32.0, True)

# Tiny presets for tests: the same architecture (GQA, llama3 RoPE scaling) at a size a CPU runs in ms.
# original_max_position_embeddings is shrunk so that short test sequences reach the smoothed RoPE band.
TINY = ModelConfig(
    name="tiny", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192,
    rope_theta=10000.0, rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=64),
    max_seq_len=256, bos_id=1, eos_ids=(2,),
)
TINY_TIED = TINY.replace(name="tiny-tied", tie_embeddings=True)

PRESETS: dict[str, ModelConfig] = {
    c.name: c for c in (LLAMA31_8B, LLAMA31_70B, LLAMA31_405B, LLAMA32_1B, LLAMA32_3B, TINY, TINY_TIED)
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}") from None


# ------------------------------------------------------------------------------- Hugging Face config.json
_HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "fp32": "float32",
              "bf16": "bfloat16", "fp16": "float16", "torch.float32": "float32", "torch.bfloat16": "bfloat16",
              "torch.float16": "float16"}


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


def _int(value, key: str, where: str) -> int:
    """A JSON integer (2048, or 2048.0); a string, bool or fraction is an error naming the field."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise ConfigError(f"{where}: {key}={value!r}: expected an integer")
    return value


def _float(value, key: str, where: str) -> float:
    if not _is_real(value):
        raise ConfigError(f"{where}: {key}={value!r}: expected a finite number")
    return float(value)


def _bool(value, key: str, where: str) -> bool:
    """JSON true/false only: the string "false" is truthy in Python and must not be read as true."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key}={value!r}: expected true or false (a JSON bool, not a string)")
    return value


def _built(where: str, **kwargs) -> ModelConfig:
    try:
        return ModelConfig(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _rope_from_hf(rope: dict | None, where: str) -> RopeScaling | None:
    if rope is None:
        return None
    if not isinstance(rope, dict):
        raise ConfigError(f"{where}: rope scaling {rope!r}: expected a JSON object or null")
    rope_type = rope.get("rope_type", rope.get("type"))
    if "rope_type" in rope and "type" in rope and rope["rope_type"] != rope["type"]:
        raise ConfigError(f"{where}: rope 'rope_type'={rope['rope_type']!r} contradicts 'type'={rope['type']!r}")
    if rope_type in (None, "default"):
        return None
    if rope_type != "llama3":
        raise ConfigError(f"{where}: rope type {rope_type!r} is not supported; this project implements "
                          "'llama3' frequency scaling or none ('default')")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
               if k not in rope]
    if missing:
        raise ConfigError(f"{where}: llama3 rope scaling lacks {missing}")
    return RopeScaling(*(_float(rope[k], k, where) for k in ("factor", "low_freq_factor", "high_freq_factor")),
                       _int(rope["original_max_position_embeddings"], "original_max_position_embeddings", where))


def from_hf_config(hf: dict | str, **overrides) -> ModelConfig:
    """Reads a transformers `LlamaConfig` dict or `config.json` path, 4.x or 5.x schema.

    Fields that would change the architecture (biases, another activation, another rope type) or that
    contradict each other raise ConfigError naming the field; unrelated extra fields are ignored.
    """
    where = hf if isinstance(hf, str) else "config.json"
    if isinstance(hf, str):
        where = os.path.join(hf, "config.json") if os.path.isdir(hf) else hf
        hf = _read_json(where)
    if hf.get("model_type", "llama") != "llama":
        raise ConfigError(f"{where}: model_type={hf['model_type']!r}; expected 'llama'")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConfigError(f"{where}: {key}=true; Llama 3 has no biases and this project does not model them")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: hidden_act={act!r}; Llama uses SwiGLU with 'silu'")
    if hf.get("pretraining_tp", 1) not in (1, None):
        raise ConfigError(f"{where}: pretraining_tp={hf['pretraining_tp']}; only 1 is exact")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in hf]
    if missing:
        raise ConfigError(f"{where}: missing required fields {missing}")

    # rope: 5.x puts everything in rope_parameters; 4.x has rope_scaling + top-level rope_theta.
    rope_params = hf.get("rope_parameters")
    theta = hf.get("rope_theta")
    if rope_params is not None:
        if not isinstance(rope_params, dict):
            raise ConfigError(f"{where}: rope_parameters={rope_params!r}: expected a JSON object")
        if theta is not None and "rope_theta" in rope_params and \
                _float(theta, "rope_theta", where) != _float(rope_params["rope_theta"], "rope_parameters.rope_theta", where):
            raise ConfigError(f"{where}: rope_theta={theta} contradicts rope_parameters.rope_theta="
                              f"{rope_params['rope_theta']}")
        theta = rope_params.get("rope_theta", theta)
        if hf.get("rope_scaling") is not None and _rope_from_hf(hf["rope_scaling"], where) != _rope_from_hf(rope_params, where):
            raise ConfigError(f"{where}: rope_scaling contradicts rope_parameters")
        scaling = _rope_from_hf(rope_params, where)
    else:
        scaling = _rope_from_hf(hf.get("rope_scaling"), where)
    theta = 10000.0 if theta is None else _float(theta, "rope_theta", where)

    n_heads = _int(hf["num_attention_heads"], "num_attention_heads", where)
    dim = _int(hf["hidden_size"], "hidden_size", where)
    if n_heads <= 0:
        raise ConfigError(f"{where}: num_attention_heads={n_heads} must be positive")
    head_dim = hf.get("head_dim") or dim // n_heads
    dtype = hf.get("dtype", hf.get("torch_dtype")) or "float32"
    if "dtype" in hf and "torch_dtype" in hf and hf["dtype"] and hf["torch_dtype"] and \
            _HF_DTYPES.get(str(hf["dtype"])) != _HF_DTYPES.get(str(hf["torch_dtype"])):
        raise ConfigError(f"{where}: dtype={hf['dtype']!r} contradicts torch_dtype={hf['torch_dtype']!r}")
    if str(dtype) not in _HF_DTYPES:
        raise ConfigError(f"{where}: dtype {dtype!r} is not one of {sorted(set(_HF_DTYPES.values()))}")
    eos = hf.get("eos_token_id", 128001)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    kwargs = dict(
        vocab_size=_int(hf["vocab_size"], "vocab_size", where), dim=dim,
        n_layers=_int(hf["num_hidden_layers"], "num_hidden_layers", where), n_heads=n_heads,
        n_kv_heads=_int(hf.get("num_key_value_heads") or n_heads, "num_key_value_heads", where),
        ffn_dim=_int(hf["intermediate_size"], "intermediate_size", where), head_dim=_int(head_dim, "head_dim", where),
        norm_eps=_float(hf.get("rms_norm_eps", 1e-5), "rms_norm_eps", where), rope_theta=theta,
        rope_scaling=scaling, max_seq_len=_int(hf.get("max_position_embeddings", 131072), "max_position_embeddings", where),
        tie_embeddings=_bool(hf.get("tie_word_embeddings", False), "tie_word_embeddings", where),
        bos_id=_int(hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 128000, "bos_token_id", where),
        eos_ids=tuple(_int(e, "eos_token_id", where) for e in eos_ids if e is not None),
        param_dtype=_HF_DTYPES[str(dtype)], compute_dtype=_HF_DTYPES[str(dtype)], name=str(hf.get("_name_or_path") or "hf"),
    )
    kwargs.update(overrides)
    return _built(where, **kwargs)


def to_hf_config(cfg: ModelConfig, *, schema: int = 4) -> dict:
    """A transformers `LlamaConfig` dict. schema=4 writes `rope_scaling`+`rope_theta`+`torch_dtype` (which
    transformers 5.x also reads); schema=5 writes `rope_parameters`+`dtype`."""
    rope = None
    if cfg.rope_scaling is not None:
        rope = {"rope_type": "llama3", "factor": cfg.rope_scaling.factor,
                "low_freq_factor": cfg.rope_scaling.low_freq_factor,
                "high_freq_factor": cfg.rope_scaling.high_freq_factor,
                "original_max_position_embeddings": cfg.rope_scaling.original_max_position_embeddings}
    out = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1,
        "initializer_range": 0.02, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True, "bos_token_id": cfg.bos_id,
        "eos_token_id": list(cfg.eos_ids) if len(cfg.eos_ids) > 1 else cfg.eos_ids[0],
    }
    if schema == 5:
        out["rope_parameters"] = {"rope_theta": cfg.rope_theta, **(rope or {"rope_type": "default"})}
        out["dtype"] = cfg.param_dtype
    else:
        out["rope_theta"] = cfg.rope_theta
        out["rope_scaling"] = rope
        out["torch_dtype"] = cfg.param_dtype
    return out


# ----------------------------------------------------------------------------------- Meta params.json
def from_meta_params(params: dict | str, *, version: str | None = None, **overrides) -> ModelConfig:
    """Reads Meta's `params.json`. It has no RoPE factor key (facts sheet 3.3): `use_scaled_rope` picks
    llama3 scaling, with factor 32 for Llama 3.2 1B/3B (dim 2048/3072 with tied embeddings) and 8
    otherwise, unless `version` ("3.1"/"3.2") or an explicit `rope_scaling` override says otherwise."""
    where = params if isinstance(params, str) else "params.json"
    if isinstance(params, str):
        where = os.path.join(params, "params.json") if os.path.isdir(params) else params
        params = _read_json(where)
    missing = [k for k in ("dim", "n_layers", "n_heads", "vocab_size") if k not in params]
    if missing:
        raise ConfigError(f"{where}: missing required fields {missing}")
    dim, n_heads = _int(params["dim"], "dim", where), _int(params["n_heads"], "n_heads", where)
    n_layers, vocab = _int(params["n_layers"], "n_layers", where), _int(params["vocab_size"], "vocab_size", where)
    if vocab <= 0:
        raise ConfigError(f"{where}: vocab_size={params['vocab_size']} must be positive")
    multiplier = params.get("ffn_dim_multiplier")
    multiplier = None if multiplier is None else _float(multiplier, "ffn_dim_multiplier", where)
    is_32_small = dim in (2048, 3072) and n_layers in (16, 28)
    if version is None:
        version = "3.2" if is_32_small else "3.1"
    factor = 32.0 if version == "3.2" else 8.0
    scaling = RopeScaling(factor=factor) if _bool(params.get("use_scaled_rope", False), "use_scaled_rope", where) else None
    kwargs = dict(
        vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=_int(params.get("n_kv_heads") or n_heads, "n_kv_heads", where),
        ffn_dim=ffn_hidden_dim(dim, _int(params.get("multiple_of", 256), "multiple_of", where), multiplier),
        norm_eps=_float(params.get("norm_eps", 1e-5), "norm_eps", where),
        rope_theta=_float(params.get("rope_theta", 10000.0), "rope_theta", where),
        rope_scaling=scaling, tie_embeddings=is_32_small, param_dtype="bfloat16", compute_dtype="bfloat16",
        name="meta",
    )
    kwargs.update(overrides)
    return _built(where, **kwargs)


def to_meta_params(cfg: ModelConfig, multiple_of: int, ffn_dim_multiplier: float | None) -> dict:
    """Meta `params.json`; the caller supplies the FFN rule inputs, and they must reproduce ffn_dim."""
    if ffn_hidden_dim(cfg.dim, multiple_of, ffn_dim_multiplier) != cfg.ffn_dim:
        raise ConfigError(f"multiple_of={multiple_of}, ffn_dim_multiplier={ffn_dim_multiplier} give FFN "
                          f"{ffn_hidden_dim(cfg.dim, multiple_of, ffn_dim_multiplier)}, not ffn_dim={cfg.ffn_dim}")
    return {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
            "vocab_size": cfg.vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": ffn_dim_multiplier,
            "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "use_scaled_rope": cfg.rope_scaling is not None}


__all__ = ["ModelConfig", "RopeScaling", "ConfigError", "ffn_hidden_dim", "preset", "PRESETS", "from_hf_config",
           "to_hf_config", "from_meta_params", "to_meta_params", "LLAMA31_8B", "LLAMA31_70B", "LLAMA31_405B",
           "LLAMA32_1B", "LLAMA32_3B", "TINY", "TINY_TIED"]

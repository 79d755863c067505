"""LoRA (Hu et al. 2021, arXiv:2106.09685): frozen base weights W plus trainable low-rank updates, W + (alpha/r) A B.

The adapters are their own pytree, {target: {"a": [L, in..., r], "b": [L, r, out...]}}, declared once
(`adapter_specs`) from the base weight's declaration in llama/model.py: A keeps the base weight's input axes and
their logical names, B its output axes, so they shard like the weight they adapt; the rank axis is replicated
(logical axis None). `apply` wraps each targeted base weight in a `model.LoraWeight`, which `model.linear`
computes as base matmul + scale * ((x A) B): the same forward, no merged copy of W, and an int8 base
(`QuantizedWeight`, llama/quant.py) works unchanged (QLoRA-like). `merge` folds the adapters into plain weights.

Initialisation as PEFT's default (`LoraLayer.reset_lora_parameters`, init_lora_weights=True): A is
kaiming-uniform with a=sqrt(5) over its fan-in (= U(-1/sqrt(fan_in), 1/sqrt(fan_in))), B is zero, so a fresh
adapter leaves the model unchanged.

Adapter dropout as PEFT's `Linear.forward`: lora_B(lora_A(dropout(x))) * scaling, i.e. inverted dropout (kept
inputs scaled by 1/(1-p)) on the adapter's input only, the base matmul sees x unchanged. Only in training:
`apply(..., key=k)` gives each wrapped weight one key per layer (`LoraWeight.key`, sliced by the layer scan);
without a key (evaluation, generation, merge) there is no dropout. The trainer derives k from its seed, the step
and the micro-batch (llama/train.py), so a run is deterministic and resumes exactly.

`base_int8`: the trainer keeps the frozen base as int8 weights (llama/quant.py: per-channel symmetric, the
scheme llama.generate --int8 serves), a QLoRA-like saving (QLoRA, Dettmers et al. 2023, uses 4-bit NF4; this is
the project's int8). The adapters stay float32 and are trained against the int8 base's outputs.

Adapter checkpoints (`save_adapters` / `load_adapters`): a directory D with D/config.json (the base model's
ModelConfig), D/lora.json (the LoraConfig and the base it was trained on) and D/adapters/ (an Orbax PyTree of the
adapter pytree), written atomically. The base weights are not copied. `python -m llama.convert orbax-to-peft D
DST` exports it for Hugging Face PEFT.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama import model
from llama.config import ConfigError, ModelConfig, check_fields
from llama.model import LoraWeight, ParamSpec, QuantizedWeight

# The linear weights of a layer LoRA may adapt, and how many leading (per-layer) axes of each are its input
# (llama/convert.py's TABLE says the same for the torch layout: wo [N, H, D] has two).
N_IN = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}
TARGETS = tuple(N_IN)

LORA_FILE = "lora.json"
ADAPTERS_DIR = "adapters"


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("wq", "wv")  # PEFT's default target_modules for Llama: q_proj, v_proj
    base_int8: bool = False  # train against an int8 copy of the frozen base (module docstring)

    def __post_init__(self):
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        check_fields(self, ints=("rank",), reals=("alpha", "dropout"))
        if self.rank <= 0:
            raise ConfigError(f"LoraConfig.rank: {self.rank}; expected a positive integer")
        if not self.alpha > 0:
            raise ConfigError(f"LoraConfig.alpha: {self.alpha}; expected a positive number")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoraConfig.dropout: {self.dropout}; expected a rate in [0, 1)")
        if not isinstance(self.base_int8, bool):
            raise ConfigError(f"LoraConfig.base_int8: {self.base_int8!r}; expected true or false")
        if not isinstance(self.targets, tuple) or not self.targets:
            raise ConfigError(f"LoraConfig.targets: {self.targets!r}; expected a non-empty tuple of {TARGETS}")
        bad = [t for t in self.targets if t not in N_IN]
        if bad or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"LoraConfig.targets: {list(self.targets)}: "
                              f"{'unknown ' + repr(bad) if bad else 'a target named twice'}; "
                              f"expected names from {list(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank  # PEFT's `scaling` without rsLoRA

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets)}


# ------------------------------------------------------------------------------------------ declaration
def adapter_specs(cfg: ModelConfig, lcfg: LoraConfig) -> dict[str, dict[str, ParamSpec]]:
    """{target: {"a": [L, in..., r], "b": [L, r, out...]}} with the base weight's logical axes."""
    base = model.param_specs(cfg)["layers"]
    specs = {}
    for t in lcfg.targets:
        s, n = base[t], 1 + N_IN[t]  # the L axis, then the input axes
        specs[t] = {"a": ParamSpec(s.shape[:n] + (lcfg.rank,), s.logical_axes[:n] + (None,), "kaiming_uniform"),
                    "b": ParamSpec(s.shape[:1] + (lcfg.rank,) + s.shape[n:], s.logical_axes[:1] + (None,) + s.logical_axes[n:],
                                   "zeros")}
    return specs


def init_adapters(cfg: ModelConfig, lcfg: LoraConfig, key: jax.Array) -> dict:
    """PEFT's default init (module docstring), in float32: adapters are trained in float32 whatever the base."""
    leaves, treedef = jax.tree.flatten(adapter_specs(cfg, lcfg), is_leaf=model.is_spec)
    keys = jax.random.split(key, len(leaves))

    def one(spec: ParamSpec, k):
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, jnp.float32)
        bound = 1 / math.sqrt(math.prod(spec.shape[1:-1]))  # kaiming_uniform(a=sqrt(5)): gain*sqrt(3/fan_in)
        return jax.random.uniform(k, spec.shape, jnp.float32, -bound, bound)

    return jax.tree.unflatten(treedef, [one(s, k) for s, k in zip(leaves, keys)])


def check_adapters(adapters, cfg: ModelConfig, lcfg: LoraConfig, where: str = "adapters") -> None:
    want = {t: {k: s.shape for k, s in ab.items()} for t, ab in adapter_specs(cfg, lcfg).items()}
    have = {t: {k: tuple(np.shape(x)) for k, x in ab.items()} for t, ab in adapters.items()} \
        if isinstance(adapters, dict) else None
    if have != want:
        raise ConfigError(f"{where}: adapter shapes {have} do not match LoraConfig(rank={lcfg.rank}, "
                          f"targets={list(lcfg.targets)}) on this model: expected {want}")


# ----------------------------------------------------------------------------------------- apply, merge
def apply(params: model.Params, adapters: dict, lcfg: LoraConfig, key: jax.Array | None = None) -> model.Params:
    """params with each targeted layer weight wrapped as a LoraWeight; `model.forward` runs it as it is.
    Differentiate a loss of `apply(params, adapters, lcfg)` w.r.t. `adapters` to train only the adapters.
    `key` (a typed PRNG key, training only) turns on lcfg.dropout: one key per target and layer."""
    layers = dict(params["layers"])
    for i, (t, ab) in enumerate(sorted(adapters.items())):
        k = None
        if key is not None and lcfg.dropout > 0:
            k = jax.random.key_data(jax.random.split(jax.random.fold_in(key, i), ab["a"].shape[0]))  # [L, 2]
        layers[t] = LoraWeight(layers[t], ab["a"], ab["b"], lcfg.scale, key=k, dropout=lcfg.dropout)
    return {**params, "layers": layers}


def merge(params: model.Params, adapters: dict, lcfg: LoraConfig) -> model.Params:
    """Plain params: W + (alpha/r) A B, computed in float32 and cast to W's dtype. An int8 base is dequantised
    first and comes back as a float32 weight (the merged weight is no longer the int8 grid)."""
    from llama import quant

    layers = dict(params["layers"])
    for t, ab in adapters.items():
        w = layers[t]
        w32, dtype = (quant.dequantize(w), jnp.float32) if isinstance(w, QuantizedWeight) else (w.astype(jnp.float32), w.dtype)
        a, b = ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32)
        L, r = a.shape[0], a.shape[-1]
        delta = jnp.matmul(a.reshape(L, -1, r), b.reshape(L, r, -1), precision="highest").reshape(w32.shape)
        layers[t] = (w32 + lcfg.scale * delta).astype(dtype)
    return {**params, "layers": layers}


# ------------------------------------------------------------------------------------ adapter checkpoints
def save_adapters(directory: str, cfg: ModelConfig, lcfg: LoraConfig, adapters: dict, *, base: str | None = None,
                  overwrite: bool = False) -> str:
    """D/config.json (the base's ModelConfig), D/lora.json ({"lora": LoraConfig, "base": where the base weights
    are}), D/adapters/ (Orbax), staged beside D and renamed. Returns D."""
    import orbax.checkpoint as ocp

    from llama.checkpoint import _write_config_and_manifest, commit_dir, naming, staging_dir

    check_adapters(adapters, cfg, lcfg)
    tmp = staging_dir(directory, overwrite)
    try:
        _write_config_and_manifest(tmp, cfg, {"lora": lcfg.to_dict(), "base": base})
        with open(os.path.join(tmp, LORA_FILE), "w") as f:
            json.dump({"lora": lcfg.to_dict(), "base": base}, f, indent=2)
        with ocp.PyTreeCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, ADAPTERS_DIR), jax.tree.map(np.asarray, adapters))
        commit_dir(tmp, directory)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise naming(e, directory)
    return os.path.abspath(directory)


def is_adapter_checkpoint(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, LORA_FILE)) and os.path.isdir(os.path.join(directory, ADAPTERS_DIR))


def load_adapters(directory: str) -> tuple[ModelConfig, LoraConfig, dict, str | None]:
    """(base ModelConfig, LoraConfig, adapters as host numpy arrays, base path or None)."""
    import orbax.checkpoint as ocp

    from llama.checkpoint import CONFIG_FILE, CheckpointError, _read_json

    if not is_adapter_checkpoint(directory):
        raise CheckpointError(f"{directory}: not a LoRA adapter checkpoint ({LORA_FILE} + {ADAPTERS_DIR}/, as "
                              "llama.lora.save_adapters writes)")
    for name in (CONFIG_FILE, LORA_FILE):
        path = os.path.join(directory, name)
        try:
            d = _read_json(path)
            cfg, meta = (ModelConfig.from_dict(d), None) if name == CONFIG_FILE else (cfg, d)
            lcfg = LoraConfig(**meta["lora"]) if meta else None
        except (ConfigError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: {e}") from None
    with ocp.PyTreeCheckpointer() as ckptr:
        adapters = ckptr.restore(os.path.join(directory, ADAPTERS_DIR))
    adapters = jax.tree.map(np.asarray, adapters)
    check_adapters(adapters, cfg, lcfg, where=os.path.join(directory, ADAPTERS_DIR))
    return cfg, lcfg, adapters, meta.get("base")

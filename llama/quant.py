"""Weight-only int8: symmetric, one scale per output channel, for every linear layer.

q = round(w / s) clipped to [-127, 127], s = max|w| over the contracted (input) axes / 127, so `q * s` is the
dequantised weight (the LLM.int8 / "W8A16" scheme without outliers; Dettmers et al. 2022, sec. 3.1). The
result is a `model.QuantizedWeight(q, scale)` whose scale keeps the weight's shape with the contracted axes
reduced to 1 (the convention `model.linear` reads): the model's matmuls then read the int8 tensor and
scale the much smaller output, so no full-precision copy of the model is ever made.

The token embedding is a gather, not a matmul, and stays in its dtype, unless the output projection is tied to
it (Llama 3.2 1B/3B, stories260K): then the table is the vocab matmul's weight (a fifth of Llama 3.2 1B) and is
quantized like the others, one scale per vocab row, which is also the row that `model.embed` gathers and scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llama import model
from llama.config import ModelConfig
from llama.model import ParamSpec, QuantizedWeight

# The contracted (input) axes of each linear weight, in the stacked layout of `model.param_specs`.
CONTRACTED: dict[str, tuple[int, ...]] = {
    "wq": (1,), "wk": (1,), "wv": (1,),  # [L, D, n, H]: contract D
    "wo": (1, 2),  # [L, N, H, D]: contract N and H
    "w_gate": (1,), "w_up": (1,),  # [L, D, F]
    "w_down": (1,),  # [L, F, D]
    "lm_head": (0,),  # [D, V]
    "embed": (1,),  # [V, D], quantized only when tied (no lm_head): it is then the output projection
}


def quantize(w: jax.Array, contracted: tuple[int, ...]) -> QuantizedWeight:
    """Symmetric int8 with one float32 scale per output channel (`model.int8_symmetric` over the contracted
    axes). An all-zero channel gets scale 1 (q = 0)."""
    return model.int8_symmetric(w, contracted)


def dequantize(w: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    return (w.q.astype(jnp.float32) * w.scale).astype(dtype)


def is_linear(path: tuple[str, ...], head: str) -> bool:
    """Whether the parameter at `path` (e.g. ("layers", "wq")) is quantized: a layer projection, or the output
    projection `head` (`head_name`: lm_head, or the embedding of a tied model)."""
    return path[-1] in CONTRACTED and (path[0] == "layers" or path[-1] == head)


def _map_linear(tree: dict, fn) -> dict:
    """Applies fn(name, leaf) to the linear weights, leaving everything else as is."""
    head = head_name(tree)
    out = {k: fn(k, v) if is_linear((k,), head) else v for k, v in tree.items() if k != "layers"}
    out["layers"] = {k: fn(k, v) if is_linear(("layers", k), head) else v for k, v in tree["layers"].items()}
    return out


def quantize_params(params: model.Params) -> model.Params:
    """The param pytree with every linear weight an int8 QuantizedWeight. Jit it with `out_shardings=
    llama.generate.param_shardings(cfg, mesh, quantized=True)` to quantize already-sharded parameters in place on the devices."""
    return _map_linear(params, lambda name, w: quantize(w, CONTRACTED[name]))


def quantized_specs(cfg: ModelConfig) -> dict:
    """`model.param_specs` with each linear weight declared as QuantizedWeight(q spec, scale spec); the scale's
    contracted axes have size 1 and are never sharded. Feed to `sharding.rules.param_shardings`."""

    def one(name, spec: ParamSpec):
        axes = tuple(None if i in CONTRACTED[name] else a for i, a in enumerate(spec.logical_axes))
        shape = tuple(1 if i in CONTRACTED[name] else s for i, s in enumerate(spec.shape))
        return QuantizedWeight(q=spec, scale=ParamSpec(shape, axes, "ones"))

    return _map_linear(model.param_specs(cfg), one)


def quantize_host(w: np.ndarray, contracted: tuple[int, ...], stacked: bool) -> tuple[np.ndarray, np.ndarray]:
    """`quantize` for a host array, one layer at a time when `stacked` ([L, ...]: the converter holds one
    stacked parameter, and this adds only its int8 copy, not a float32 one). -> (q, scale) numpy arrays."""
    if not stacked:
        out = quantize(jnp.asarray(w), contracted)
        return np.asarray(out.q), np.asarray(out.scale)
    q = np.empty(w.shape, np.int8)
    scale = np.empty(tuple(1 if i in contracted else n for i, n in enumerate(w.shape)), np.float32)
    for i in range(w.shape[0]):
        out = quantize(jnp.asarray(w[i]), tuple(a - 1 for a in contracted))
        q[i], scale[i] = np.asarray(out.q), np.asarray(out.scale)
    return q, scale


def quantize_arrays(arrays, head: str):
    """(path, host array) pairs, one parameter at a time, with each linear weight (`is_linear`) replaced by
    its (path + ("q",), int8) and (path + ("scale",), float32) pairs: an int8 checkpoint's stream."""
    for path, x in arrays:
        if is_linear(path, head):
            q, scale = quantize_host(x, CONTRACTED[path[-1]], stacked=path[0] == "layers")
            del x
            yield path + ("q",), q
            yield path + ("scale",), scale
        else:
            yield path, x


def head_name(tree) -> str:
    """The output projection's name: lm_head, or the embedding when tied (no lm_head)."""
    return "lm_head" if "lm_head" in tree else "embed"


def is_quantized(tree) -> bool:
    """Whether a param pytree (QuantizedWeight leaves, or their saved {"q", "scale"} form) is int8."""
    wq = tree["layers"]["wq"]
    return isinstance(wq, QuantizedWeight) or (isinstance(wq, dict) and set(wq) == {"q", "scale"})


def to_dicts(tree):
    """QuantizedWeight -> {"q", "scale"}: the form checkpoints store (plain nested dicts for Orbax)."""
    return jax.tree.map(lambda w: {"q": w.q, "scale": w.scale} if isinstance(w, QuantizedWeight) else w, tree,
                        is_leaf=lambda w: isinstance(w, QuantizedWeight))


def from_dicts(tree):
    """The inverse of `to_dicts`."""
    if isinstance(tree, dict) and set(tree) == {"q", "scale"}:
        return QuantizedWeight(q=tree["q"], scale=tree["scale"])
    if isinstance(tree, dict):
        return {k: from_dicts(v) for k, v in tree.items()}
    return tree


def param_bytes(params) -> int:
    """Bytes of every array in a param pytree (int8 weights and their scales included)."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


__all__ = ["CONTRACTED", "quantize", "dequantize", "quantize_params", "quantized_specs", "quantize_host",
           "quantize_arrays", "is_linear", "head_name", "is_quantized", "to_dicts", "from_dicts", "param_bytes"]

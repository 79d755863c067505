"""One table of logical-axis rules: the only place shardings come from.

Every array with a sharding names its dimensions with logical axes: parameters (`llama.model.ParamSpec`),
optimizer state (the same names as the parameter it mirrors), activations at layer boundaries
(`ACTIVATION_AXES`), the KV cache (`llama.model.CACHE_AXES`) and input batches (`BATCH_AXES`). `RULES` maps each
logical axis to mesh axes.

Two strictness levels, on purpose:
- parameters and optimizer state are strict: a dimension that the mesh does not divide is a ShardingError
  naming the parameter and sizes (silently replicating a 405B weight would be a surprise out-of-memory later);
- the KV cache, activations and batches are "fitted": a mesh axis that does not divide the dimension is
  dropped for that array only (8 KV heads on tensor=16 are replicated; a decode batch of 1 is not split).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sharding.mesh import MESH_AXES, MeshConfig, ShardingError, make_mesh  # noqa: F401  (public re-exports)

# Logical axis -> mesh axes (a tuple shards over their product; None replicates). The whole table.
RULES: Mapping[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # activations and input batches: data parallel over both
    # Context parallelism: the sequence of activations at layer boundaries and of input batches is split over
    # `context` (in the load-balanced order of input_pipeline/context.py); attention all-gathers K and V
    # (llama/context_parallel.py). Without a context axis (size 1) this shards nothing.
    "sequence": ("context",),
    "act_embed": None,  # the residual stream's D at layer boundaries: whole on every device (Megatron)
    "embed": ("fsdp",),  # parameters: ZeRO-3 style sharding of the model dimension
    "vocab": ("tensor",),
    "q_heads": ("tensor",),  # Megatron-style tensor parallelism over heads ...
    "kv_heads": ("tensor",),
    "ffn": ("tensor",),  # ... and over the FFN hidden dimension
    "head_dim": None,
    "layers": None,  # the scanned axis is never sharded
    "norm": None,
    # Long-prompt serving: the KV cache's S slots split over `context` (1/CP of the cache per device); XLA
    # partitions the cached attention's tile reads (no explicit cross-device flash-decoding combine yet).
    "cache_sequence": ("context",),
}

# Mesh axes left out of every spec where their size is 1, so a mesh without context parallelism gives exactly
# the specs (and HLO) it gave before the axis existed.
OPTIONAL_AXES = ("context",)

ACTIVATION_AXES = ("batch", "sequence", "act_embed")  # the residual stream [B, T, D] between layers
LOGITS_AXES = ("batch", "sequence", "vocab")  # [B, T, V]
BATCH_AXES = ("batch", "sequence")  # input batches [B, T]


def _mesh_axes(name: str | None, rules: Mapping[str, Any]) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in rules:
        raise ShardingError(f"logical axis {name!r} has no rule; add it to sharding.rules.RULES")
    axes = rules[name]
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def _spec(per_dim: Sequence[tuple[str, ...]]) -> P:
    return P(*[None if not a else a if len(a) > 1 else a[0] for a in per_dim])


def logical_to_spec(logical_axes: Sequence[str | None], rules: Mapping[str, Any] = RULES) -> P:
    """PartitionSpec for an array whose dimensions carry these logical names. A mesh axis used twice in
    one spec is an error (it would silently shard two dimensions over the same devices)."""
    out, used = [], set()
    for name in logical_axes:
        axes = _mesh_axes(name, rules)
        for a in axes:
            if a in used:
                raise ShardingError(f"mesh axis {a!r} appears twice in the spec for {tuple(logical_axes)}")
            used.add(a)
        out.append(axes)
    return _spec(out)


def check_divisible(name: str, shape: Sequence[int], spec: P, mesh: Mesh) -> None:
    for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        if axes is None:
            continue
        axes = axes if isinstance(axes, tuple) else (axes,)
        n = math.prod(mesh.shape[a] for a in axes)
        if size % n:
            raise ShardingError(f"{name}: dimension {dim} of shape {tuple(shape)} has size {size}, not divisible "
                                f"by mesh axes {axes} of total size {n} (mesh {dict(mesh.shape)}); change the "
                                f"mesh or the rule for this axis")


def _drop_unused(spec: P, mesh_shape: Mapping[str, int]) -> P:
    """`spec` without the OPTIONAL_AXES of size 1 (or absent from the mesh)."""
    unused = {a for a in OPTIONAL_AXES if mesh_shape.get(a, 1) == 1}
    per_dim = [() if d is None else (d,) if isinstance(d, str) else tuple(d) for d in spec]
    return _spec([tuple(a for a in d if a not in unused) for d in per_dim])


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                   name: str = "array", rules: Mapping[str, Any] = RULES) -> NamedSharding:
    """Strict: the spec from the rules, checked against `shape` when given."""
    spec = _drop_unused(logical_to_spec(logical_axes, rules), dict(mesh.shape))
    if shape is not None:
        check_divisible(name, shape, spec, mesh)
    return NamedSharding(mesh, spec)


def fitted_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int],
                rules: Mapping[str, Any] = RULES) -> P:
    """Lenient: the rules' spec with, per dimension, each mesh axis kept only while the product of the kept
    axes still divides the dimension (in rule order). For the KV cache, activations and batches."""
    logical_to_spec(logical_axes, rules)  # the no-axis-twice check still applies
    out = []
    for name, size in zip(logical_axes, shape):
        kept, n = [], 1
        for a in _mesh_axes(name, rules):
            if a in OPTIONAL_AXES and mesh_shape.get(a, 1) == 1:
                continue
            if size % (n * mesh_shape[a]) == 0:
                kept.append(a)
                n *= mesh_shape[a]
        out.append(tuple(kept))
    return _spec(out)


def fitted_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int],
                    rules: Mapping[str, Any] = RULES) -> NamedSharding:
    return NamedSharding(mesh, fitted_spec(logical_axes, shape, dict(mesh.shape), rules))


def param_shardings(specs, mesh: Mesh, rules: Mapping[str, Any] = RULES):
    """Shardings for a pytree of `llama.model.ParamSpec` (or anything with .shape and .logical_axes),
    validated against the mesh; errors name the parameter's path."""

    def one(path, spec):
        return named_sharding(mesh, spec.logical_axes, spec.shape, jax.tree_util.keystr(path), rules)

    return jax.tree_util.tree_map_with_path(one, specs, is_leaf=lambda x: hasattr(x, "logical_axes"))


def cache_shardings(mesh: Mesh, cache, rules: Mapping[str, Any] = RULES):
    """KV cache {"k", "v"}: [L, B, K, S, H] (arrays or shape structs) -> fitted shardings from
    `llama.model.CACHE_AXES`: batch over (data, fsdp) and KV heads over tensor where they divide, else
    replicated on that axis (GQA models have only 8 KV heads; tensor=16 still works)."""
    from llama.model import CACHE_AXES

    return jax.tree.map(lambda x: fitted_sharding(mesh, CACHE_AXES, x.shape, rules), cache)


def batch_sharding(mesh: Mesh, ndim: int = 2, shape: Sequence[int] | None = None) -> NamedSharding:
    """Input batches [B, T, ...]: batch over (data, fsdp), the rest replicated. With `shape`, strict: the
    global batch must divide over data*fsdp (a clear error, not a silently replicated batch)."""
    axes = BATCH_AXES + (None,) * (ndim - 2) if ndim >= 2 else BATCH_AXES[:ndim]
    return named_sharding(mesh, axes, shape, "input batch")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Mapping[str, Any] = RULES) -> jax.Array:
    """`with_sharding_constraint` from the rules (fitted) when a mesh is set (`with jax.set_mesh(mesh):`);
    a no-op otherwise, so the model runs unchanged on one device. The model calls this at layer boundaries."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, fitted_spec(logical_axes, x.shape, dict(mesh.shape), rules))

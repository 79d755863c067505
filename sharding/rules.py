"""One mesh and one table of logical-axis rules.

Every array with a sharding (parameters, optimizer state, activations at layer boundaries, the KV cache,
input batches) names its dimensions with logical axes; `RULES` maps each logical axis to mesh axes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes (a tuple shards over their product; None replicates). The whole table.
RULES: Mapping[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # activations and input batches: data parallel over both
    "sequence": None,
    "embed": ("fsdp",),  # parameters: ZeRO-3 style sharding of the model dimension
    "vocab": ("tensor",),
    "q_heads": ("tensor",),  # Megatron-style tensor parallelism over heads ...
    "kv_heads": ("tensor",),
    "ffn": ("tensor",),  # ... and over the FFN hidden dimension
    "head_dim": None,
    "layers": None,  # the scanned axis is never sharded
    "norm": None,
    "cache_sequence": None,
}


class ShardingError(ValueError):
    pass


@dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 to take the remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def shape(self, n_devices: int) -> dict[str, int]:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        fill = [a for a, s in sizes.items() if s == -1]
        if len(fill) > 1:
            raise ShardingError(f"mesh {sizes}: at most one axis may be -1")
        if any(s == 0 or s < -1 for s in sizes.values()):
            raise ShardingError(f"mesh {sizes}: sizes must be positive or -1")
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if fill:
            if n_devices % fixed:
                raise ShardingError(f"mesh {sizes}: {n_devices} devices are not divisible by the fixed axes' "
                                    f"product {fixed}; use axis sizes whose product divides {n_devices}")
            sizes[fill[0]] = n_devices // fixed
        if math.prod(sizes.values()) != n_devices:
            raise ShardingError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but {n_devices} are "
                                f"available; sizes whose product is {n_devices} would fit, e.g. "
                                f"data=1, fsdp=-1, tensor=1")
        return sizes


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices with axes MESH_AXES, laid out by
    `jax.experimental.mesh_utils` so that the fastest-varying axis (tensor) sits on the closest devices."""
    from jax.experimental import mesh_utils

    cfg = cfg or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    sizes = cfg.shape(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        arr = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Mapping[str, Any] = RULES) -> P:
    """PartitionSpec for an array whose dimensions carry these logical names. A mesh axis used twice in
    one spec is an error (it would silently shard two dimensions over the same devices)."""
    out, used = [], set()
    for name in logical_axes:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ShardingError(f"logical axis {name!r} has no rule; add it to sharding.rules.RULES")
        mesh_axes = rules[name]
        if mesh_axes is None:
            out.append(None)
            continue
        mesh_axes = tuple(mesh_axes) if isinstance(mesh_axes, (tuple, list)) else (mesh_axes,)
        for a in mesh_axes:
            if a in used:
                raise ShardingError(f"mesh axis {a!r} appears twice in the spec for {tuple(logical_axes)}")
            used.add(a)
        out.append(mesh_axes if len(mesh_axes) > 1 else mesh_axes[0])
    return P(*out)


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


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                   name: str = "array", rules: Mapping[str, Any] = RULES) -> NamedSharding:
    spec = logical_to_spec(logical_axes, rules)
    if shape is not None:
        check_divisible(name, shape, spec, mesh)
    return NamedSharding(mesh, spec)


def param_shardings(specs, mesh: Mesh, rules: Mapping[str, Any] = RULES):
    """Shardings for a pytree of `llama.model.ParamSpec` (or anything with .shape and .logical_axes),
    validated against the mesh; errors name the parameter's path."""

    def one(path, spec):
        return named_sharding(mesh, spec.logical_axes, spec.shape, jax.tree_util.keystr(path), rules)

    return jax.tree_util.tree_map_with_path(one, specs, is_leaf=lambda x: hasattr(x, "logical_axes"))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Input batches [B, T, ...]: batch over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())

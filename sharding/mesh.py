"""The device mesh: four named axes, sizes from config, laid out for the machine's interconnect.

Axes (MESH_AXES, slowest-varying first): `data` (pure data parallelism: parameters replicated), `fsdp` (data
parallelism with parameters, gradients and optimizer state sharded ZeRO-3 style), `context` (context
parallelism: the sequence of every activation split over devices, K/V all-gathered in attention;
llama/context_parallel.py) and `tensor` (Megatron-style tensor parallelism over heads and the FFN hidden
dimension). The fastest-varying axes sit on the closest devices, so tensor and context parallelism, which
communicate every layer, stay inside a node (Llama 3's order, paper section 3.3.2: [TP, CP, PP, DP]).

Multi-node / multi-slice ("hybrid") meshes: `MeshConfig.dcn_*` say how many nodes (GPU processes or TPU slices,
JAX's "granules") each axis spans; the rest of the axis lies inside a node. The mesh is then built by
`jax.experimental.mesh_utils.create_hybrid_device_mesh`, which keeps the slow data-centre network (DCN) on the
axes you name (normally `data` or `fsdp`, whose collectives are once per step or overlap with compute).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "context", "tensor")


class ShardingError(ValueError):
    """A mesh, rule or array whose sizes do not fit together. The message names what and by how much."""


def _text(sizes: dict[str, int]) -> str:
    """'data=2,fsdp=4,tensor=1' (context only when it is used, so meshes without CP read as before)."""
    return ",".join(f"{a}={s}" for a, s in sizes.items() if a != "context" or s != 1)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (totals over all devices); at most one may be -1 to take the remaining devices.

    dcn_data / dcn_fsdp / dcn_context / dcn_tensor: how many nodes (processes on GPU/CPU, slices on multi-slice
    TPU) the axis spans; each must divide the axis size and their product must equal the number of nodes. All 1
    (default): one node, or a multi-node job whose slowest axis simply follows the process order.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    context: int = 1  # last, so positional MeshConfig(data, fsdp, tensor) calls keep their meaning
    dcn_context: int = 1

    @classmethod
    def parse(cls, text: str, dcn: str = "") -> "MeshConfig":
        """'data=2,fsdp=-1,context=2,tensor=2' (axes left out are 1) and optionally dcn='data=2'."""

        def sizes(s: str, what: str) -> dict[str, int]:
            out = {}
            for item in filter(None, (x.strip() for x in s.split(","))):
                name, sep, value = item.partition("=")
                if not sep or name.strip() not in MESH_AXES:
                    raise ShardingError(f"{what} {s!r}: expected comma-separated AXIS=SIZE with AXIS in {MESH_AXES}, "
                                        f"got {item!r}")
                try:
                    out[name.strip()] = int(value)
                except ValueError:
                    raise ShardingError(f"{what} {s!r}: size of {name.strip()!r} is not an integer: {value!r}") from None
            return out

        main = sizes(text, "mesh")
        main = {a: main.get(a, 1) for a in MESH_AXES}
        return cls(**main, **{f"dcn_{a}": v for a, v in sizes(dcn, "dcn mesh").items()})

    @property
    def dcn(self) -> dict[str, int]:
        return {a: getattr(self, f"dcn_{a}") for a in MESH_AXES}

    @property
    def sizes(self) -> dict[str, int]:
        """The requested sizes (-1 unresolved), in MESH_AXES order."""
        return {a: getattr(self, a) for a in MESH_AXES}

    def shape(self, n_devices: int) -> dict[str, int]:
        """Resolved axis sizes for `n_devices` devices, or a ShardingError saying what would fit."""
        sizes = self.sizes
        text = _text(sizes)
        fill = [a for a, s in sizes.items() if s == -1]
        if len(fill) > 1:
            raise ShardingError(f"mesh {text}: at most one axis may be -1 (fill the remaining devices)")
        if any(s == 0 or s < -1 for s in sizes.values()):
            raise ShardingError(f"mesh {text}: sizes must be positive or -1")
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if fill and n_devices % fixed == 0:
            sizes[fill[0]] = n_devices // fixed
        if -1 in sizes.values() or math.prod(sizes.values()) != n_devices:
            raise ShardingError(f"mesh {text} does not fit {n_devices} devices: the sizes' product must be "
                                f"{n_devices}. {self._suggest(n_devices)}")
        for a, d in self.dcn.items():
            if d < 1 or sizes[a] % d:
                raise ShardingError(f"mesh {text}: dcn_{a}={d} must be a positive divisor of {a}={sizes[a]} "
                                    f"(it is the number of nodes the axis spans)")
        return sizes

    def _suggest(self, n: int) -> str:
        """Concrete meshes that fit n devices, keeping as many of the requested sizes as possible."""
        sizes = self.sizes
        options = []
        for free in MESH_AXES:  # keep the other axes as asked (if they divide n), fill this one
            kept = {a: s for a, s in sizes.items() if a != free and s != -1}
            prod = math.prod(kept.values())
            if n % prod == 0:
                options.append({**{a: 1 for a in MESH_AXES}, **kept, free: n // prod})
        if not options:
            t = max(d for d in _divisors(n) if d <= max(self.tensor, 1))
            options.append({**{a: 1 for a in MESH_AXES}, "fsdp": n // t, "tensor": t})
        seen, text = set(), []
        for o in options:
            s = _text({a: o[a] for a in MESH_AXES})
            if s not in seen:
                seen.add(s)
                text.append(s)
        return "These would fit: " + "; ".join(text) + " (or give one axis as -1)."


def granules(devices: Sequence[jax.Device]) -> tuple[str, int]:
    """What a 'node' is for the hybrid mesh: TPU slices when the devices carry distinct `slice_index`es,
    otherwise processes (one per GPU node, or per simulated CPU host). -> (kind, count)"""
    slices = {getattr(d, "slice_index", None) for d in devices}
    if None not in slices and len(slices) > 1:
        return "slice", len(slices)
    return "process", len({d.process_index for d in devices})


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices with axes MESH_AXES.

    One node: `mesh_utils.create_device_mesh` (on TPU it follows the physical torus; elsewhere device order).
    Several nodes with dcn_* sizes: `mesh_utils.create_hybrid_device_mesh`, so the dcn axes cross nodes and the
    rest stay inside one."""
    from jax.experimental import mesh_utils

    cfg = cfg or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    sizes = cfg.shape(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    dcn = tuple(cfg.dcn[a] for a in MESH_AXES)
    n_dcn = math.prod(dcn)
    if n_dcn > 1:
        kind, count = granules(devices)
        if count != n_dcn:
            raise ShardingError(f"dcn sizes {cfg.dcn} span {n_dcn} nodes but the devices are on {count} "
                                f"{kind}(s); make the dcn_* product {count}")
        ici = tuple(s // d for s, d in zip(shape, dcn))
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=kind == "process",
                                                   allow_split_physical_axes=True)
        return Mesh(arr, MESH_AXES)
    try:
        arr = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)

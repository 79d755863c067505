"""The causal load-balancing layout for context parallelism (CP), applied once to each batch before placement.

Under a causal mask the last tokens of a row attend to every key and the first to almost none, so cutting the
row into CP contiguous pieces would leave the last device with most of the attention work. Llama 3 (paper
section 3.3.2) and MaxText instead cut the row into 2 x CP chunks and give device i chunks i and 2CP-1-i: each
device then holds one early and one late chunk, and the same number of query-key pairs. The tokens are
permuted along T once, here, with everything that belongs to them (targets, positions, segment ids, loss mask),
so the model sees rows in this order and sharding the sequence over `context` gives each device its two
chunks; attention recovers each token's true slot from the same order (llama/context_parallel.py). The loss is
a masked sum over tokens, so it does not depend on the order.

Pure numpy: the pipeline still knows nothing about the model.
"""

from __future__ import annotations

import numpy as np

from sharding.mesh import ShardingError


def load_balanced_order(seq_len: int, context: int) -> np.ndarray:
    """[T] int32: the original slot of each position of the load-balanced row (device i's share is positions
    i*T/CP .. (i+1)*T/CP - 1 and holds chunks i and 2CP-1-i). context=1: 0..T-1."""
    if context < 1:
        raise ShardingError(f"context={context}: expected a positive mesh axis size")
    if seq_len % (2 * context):
        raise ShardingError(f"sequence length T={seq_len} is not divisible by 2 x context = {2 * context} chunks "
                            f"(context={context}: each device holds chunks i and {2 * context}-1-i of the "
                            f"row); choose a seq_len that is a multiple of {2 * context} or a smaller context")
    c = seq_len // (2 * context)
    chunks = np.array([[i, 2 * context - 1 - i] for i in range(context)]).reshape(-1)
    return (chunks[:, None] * c + np.arange(c)).reshape(-1).astype(np.int32)


def to_load_balanced(batch: dict[str, np.ndarray], context: int) -> dict[str, np.ndarray]:
    """A batch {name: [B, T, ...]} with every array permuted along T into the load-balanced order (a no-op for
    context=1). Rows are whole in each process, so every process applies it to its own rows."""
    if context == 1:
        return batch
    T = next(iter(batch.values())).shape[1]
    order = load_balanced_order(T, context)
    return {name: np.asarray(x)[:, order] for name, x in batch.items()}


def from_load_balanced(x, context: int, axis: int = 1):
    """The inverse along `axis` (numpy or jax arrays): e.g. logits [B, T, V] of a load-balanced batch back in
    the row's own order."""
    if context == 1:
        return x
    order = load_balanced_order(x.shape[axis], context)
    return x.take(np.argsort(order), axis=axis)


def mesh_context(mesh) -> int:
    """The `context` axis size of a mesh (1 when it has none). A context axis whose devices belong to several
    processes is an error: each process loads whole rows, so every context group must lie in one process (put
    the nodes on `data` or `fsdp` with dcn_*, and CP inside a node, as tensor parallelism)."""
    cp = dict(mesh.shape).get("context", 1)
    if cp > 1 and len({d.process_index for d in mesh.devices.flat}) > 1:
        groups = np.moveaxis(np.vectorize(lambda d: d.process_index)(mesh.devices),
                             list(mesh.axis_names).index("context"), -1).reshape(-1, cp)
        if any(len(set(g)) > 1 for g in groups):
            raise ShardingError(f"mesh {dict(mesh.shape)}: the context axis spans several processes; each process "
                                "loads whole rows, so keep context inside a node (dcn_* on data or fsdp)")
    return cp

"""The NVRAR all-reduce written with JAX collectives: portable, runs on any backend.

It follows `jaxnvrar.schedule` step by step with `lax.ppermute`, accumulates in
float32 (float64 in float64: `_accumulator`) and rounds to the input dtype at the end of each
phase (as the CUDA kernel does),
so every rank ends with bit-identical values. It is the CPU/TPU path of `all_reduce`
and the model the CUDA kernel is tested against; it is not meant to be fast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnvrar.schedule import (
    SLICE_ALIGN_BYTES,
    StepOp,
    Topology,
    inter_node_step,
    num_inter_node_steps,
    slice_bounds,
)


def _accumulator(dtype):
    """float32 for the kernel's dtypes (float16, bfloat16, float32); wider types keep their own."""
    return jnp.promote_types(dtype, jnp.float32)


def _shift_within_node(topology: Topology, shift: int) -> list[tuple[int, int]]:
    """ppermute pairs: every rank sends to the rank ``shift`` locals further in its node."""
    g = topology.gpus_per_node
    return [
        (rank, topology.rank_of(topology.node_of(rank), (topology.local_of(rank) + shift) % g))
        for rank in range(topology.num_ranks)
    ]


def _reduce_scatter_intra_node(slices, axis_name, topology, local):
    """Local l returns the node-sum of slice l, summed over locals 0..G-1 in order."""
    g = topology.gpus_per_node
    # by_shift[s] is slice `local` as held by local (local - s) mod G.
    by_shift = [lax.dynamic_index_in_dim(slices, local, keepdims=False)]
    for shift in range(1, g):
        outgoing = lax.dynamic_index_in_dim(slices, (local + shift) % g, keepdims=False)
        by_shift.append(lax.ppermute(outgoing, axis_name, _shift_within_node(topology, shift)))
    by_shift = jnp.stack(by_shift)
    total = None
    for source in range(g):
        value = lax.dynamic_index_in_dim(by_shift, (local - source) % g, keepdims=False)
        value = value.astype(_accumulator(slices.dtype))
        total = value if total is None else total + value
    return total.astype(slices.dtype)


def _all_reduce_inter_node(mine, axis_name, topology, node):
    """Recursive doubling over nodes on each rank's slice, per the shared schedule."""
    n, g = topology.num_nodes, topology.gpus_per_node
    for step in range(num_inter_node_steps(n)):
        plan = [inter_node_step(i, n, step) for i in range(n)]
        pairs = [
            (topology.rank_of(i, local), topology.rank_of(plan[i].peer, local))
            for i in range(n)
            if plan[i].op & StepOp.SEND
            for local in range(g)
        ]
        received = lax.ppermute(mine, axis_name, pairs)
        op = jnp.asarray(np.array([int(p.op) for p in plan], np.int32))[node]
        peer = jnp.asarray(np.array([p.peer for p in plan], np.int32))[node]
        a, b = mine.astype(_accumulator(mine.dtype)), received.astype(_accumulator(mine.dtype))
        lower_first = jnp.where(node < peer, a + b, b + a).astype(mine.dtype)
        mine = jnp.where(
            (op & StepOp.RECV_ADD) != 0,
            lower_first,
            jnp.where((op & StepOp.RECV_COPY) != 0, received, mine),
        )
    return mine


def _all_gather_intra_node(mine, axis_name, topology, local):
    g = topology.gpus_per_node
    gathered = jnp.zeros((g,) + mine.shape, mine.dtype)
    gathered = lax.dynamic_update_index_in_dim(gathered, mine, local, 0)
    for shift in range(1, g):
        received = lax.ppermute(mine, axis_name, _shift_within_node(topology, shift))
        gathered = lax.dynamic_update_index_in_dim(gathered, received, (local - shift) % g, 0)
    return gathered


def all_reduce_reference(x: jax.Array, axis_name, topology: Topology) -> jax.Array:
    """Sum of ``x`` over ``axis_name`` by the NVRAR schedule; call inside shard_map."""
    if x.size == 0 or topology.num_ranks == 1:
        return x
    g = topology.gpus_per_node
    flat = x.reshape(-1)
    align = max(1, SLICE_ALIGN_BYTES // x.dtype.itemsize)
    bounds = slice_bounds(flat.size, g, align)
    per_slice = bounds[0][1] - bounds[0][0]
    slices = jnp.pad(flat, (0, g * per_slice - flat.size)).reshape(g, per_slice)

    rank = lax.axis_index(axis_name)
    node, local = rank // g, rank % g
    mine = _reduce_scatter_intra_node(slices, axis_name, topology, local)
    if topology.num_nodes > 1:
        mine = _all_reduce_inter_node(mine, axis_name, topology, node)
    gathered = _all_gather_intra_node(mine, axis_name, topology, local)
    return gathered.reshape(-1)[: flat.size].reshape(x.shape)

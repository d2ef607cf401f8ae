"""`all_reduce`: the public entry point, used like `jax.lax.psum` inside `jax.shard_map`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxnvrar import distributed, nvrar_ffi, runtime, tuning
from jaxnvrar.primitive import all_reduce_p
from jaxnvrar.schedule import Topology
from jaxnvrar.tuning import choose_algorithm

ALGORITHMS = ("auto", "psum", "reference", "nvrar")
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _axis_size(axis_name) -> int:
    try:
        return int(lax.axis_size(axis_name))
    except NameError as err:
        raise NameError(
            f"jaxnvrar.all_reduce: axis {axis_name!r} is not bound here ({err}); call it inside "
            f"jax.shard_map over a mesh with an axis named {axis_name!r}"
        ) from None


def _single_axis(axis_name):
    if isinstance(axis_name, (tuple, list)):
        if len(axis_name) != 1:
            raise ValueError(
                f"jaxnvrar.all_reduce reduces over one mesh axis, got {tuple(axis_name)}; "
                "reduce over each axis in turn, or use jax.lax.psum"
            )
        axis_name = axis_name[0]
    return axis_name


def initialize(*, workspace_bytes: int | None = None) -> None:
    """Start NVSHMEM and allocate the symmetric workspace; call after jax.distributed.initialize().

    ``workspace_bytes`` (default: ${JAXNVRAR_WORKSPACE_BYTES} or 512 MiB) bounds the largest
    message `algorithm="nvrar"` takes. The JAXNVRAR_* settings are read once, here, and must be
    alike on every process. Calling it again is a no-op; after `finalize()` it raises (NVSHMEM
    cannot restart within a process).
    """
    if runtime.start(workspace_bytes=workspace_bytes):
        tuning.load_shared()  # process 0's table on every process: they must lower alike


def all_reduce(x, axis_name, *, algorithm: str = "auto", gpus_per_node: int | None = None):
    """Sum ``x`` over the mesh axis ``axis_name``; call inside `jax.shard_map`.

    Returns an array of ``x``'s shape and dtype equal to ``jax.lax.psum(x, axis_name)`` within
    the dtype's rounding, bit-identical on every rank of the axis. A pytree of arrays gives the
    same pytree, as psum does; its leaves of one dtype are reduced together, as one message
    (one kernel launch instead of one per leaf: small messages pay latency, not bandwidth).

    Args:
      x: float32, bfloat16 or float16 array, any shape; or a pytree of them.
      axis_name: one mesh axis (of possibly several).
      algorithm: "psum" (XLA's), "reference" (the NVRAR schedule in JAX collectives, any
        backend), "nvrar" (the CUDA kernel; needs `jaxnvrar.initialize()`), or "auto"
        (see `choose_algorithm`).
      gpus_per_node: consecutive ranks of the axis that form one node. Default: the ranks
        that share a host. Must divide the axis size.
    """
    leaves, treedef = jax.tree.flatten(x)
    if not (treedef.num_leaves == 1 and treedef.num_nodes == 1):  # not a single array
        return _all_reduce_tree(leaves, treedef, axis_name, algorithm, gpus_per_node)
    x = jnp.asarray(x)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"jaxnvrar.all_reduce supports float32, bfloat16 and float16, got {x.dtype}; "
            "cast to one of them or use jax.lax.psum"
        )
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    axis_name = _single_axis(axis_name)
    num_ranks = _axis_size(axis_name)
    topology = (Topology(num_ranks, gpus_per_node) if gpus_per_node is not None
                else distributed.default_topology(num_ranks))
    if algorithm == "auto":
        algorithm = choose_algorithm(x.size, x.dtype, topology)
    if algorithm == "psum":
        return lax.psum(x, axis_name)
    if algorithm == "nvrar":
        nvrar_ffi.check_can_run(x, topology)
    return all_reduce_p.bind(
        x, axis_name=axis_name, num_ranks=num_ranks, gpus_per_node=gpus_per_node, algorithm=algorithm
    )


def _all_reduce_tree(leaves, treedef, axis_name, algorithm, gpus_per_node):
    """The leaves of each dtype flattened into one message, reduced, and cut back."""
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    by_dtype: dict = {}
    for index, leaf in enumerate(leaves):
        by_dtype.setdefault(leaf.dtype, []).append(index)
    out = list(leaves)
    for dtype, indices in by_dtype.items():
        group = [leaves[i] for i in indices]
        message = group[0].ravel() if len(group) == 1 else jnp.concatenate([leaf.ravel() for leaf in group])
        reduced = all_reduce(message, axis_name, algorithm=algorithm, gpus_per_node=gpus_per_node)
        offset = 0
        for i, leaf in zip(indices, group):
            out[i] = reduced[offset:offset + leaf.size].reshape(leaf.shape)
            offset += leaf.size
    return jax.tree.unflatten(treedef, out)

"""`all_reduce`: the public entry point, used like `jax.lax.psum` inside `jax.shard_map`."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax import lax

from jaxnvrar import runtime
from jaxnvrar.primitive import all_reduce_p
from jaxnvrar.schedule import Topology

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


# Measured crossover on 2 x H200 (docs/results/allreduce_2xH200_2026-11-23.txt): the kernel
# wins up to 4 MB (1.10x there) and loses to psum from 8 MB on. Override with
# $JAXNVRAR_AUTO_MAX_BYTES.
AUTO_NVRAR_MAX_BYTES = 4 << 20


def choose_algorithm(num_elements: int, dtype, topology: Topology) -> str:
    """What algorithm="auto" runs. "nvrar" needs the CUDA runtime up and the message to fit the
    workspace; then the tuning table's measured winner for the message's size bucket decides
    (`jaxnvrar-bench tune`), or without one: on one node, "nvrar" up to AUTO_NVRAR_MAX_BYTES
    ($JAXNVRAR_AUTO_MAX_BYTES); across nodes, the cost model's projection. Otherwise "psum"."""
    from jaxnvrar import tuning
    from jaxnvrar.nvrar_ffi import fits_workspace

    dtype = jnp.dtype(dtype)
    nbytes = num_elements * dtype.itemsize
    if not (runtime.is_initialized() and jax.default_backend() == "gpu"
            and fits_workspace(num_elements, dtype.itemsize, topology)):
        return "psum"
    choice = tuning.choice_for(topology, dtype.name, nbytes)
    if choice is not None:
        return choice.algorithm
    if runtime.AUTO_MAX_BYTES_ENV in os.environ or topology.num_nodes == 1:
        limit = runtime._env_number(runtime.AUTO_MAX_BYTES_ENV, int, AUTO_NVRAR_MAX_BYTES, minimum=0)
        return "nvrar" if nbytes <= limit else "psum"
    # Several nodes, not measured: the cost model's projection of the NCCL-like baseline
    # against NVRAR (network preset $JAXNVRAR_NETWORK, default InfiniBand NDR).
    from jaxnvrar import cost_model

    network = os.environ.get(runtime.NETWORK_ENV, "ndr")
    if network not in cost_model.NETWORKS:
        raise ValueError(f"{runtime.NETWORK_ENV}={network!r}: choose one of {sorted(cost_model.NETWORKS)}")
    faster = cost_model.nvrar_predicted_faster(nbytes, topology.num_nodes, topology.gpus_per_node, network)
    return "nvrar" if faster else "psum"


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
    topology = Topology(num_ranks, gpus_per_node) if gpus_per_node is not None else runtime.default_topology(num_ranks)
    if algorithm == "auto":
        algorithm = choose_algorithm(x.size, x.dtype, topology)
    if algorithm == "psum":
        return lax.psum(x, axis_name)
    if algorithm == "nvrar":
        from jaxnvrar.nvrar_ffi import check_can_run

        check_can_run(x, topology)
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

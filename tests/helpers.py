"""Run a per-shard function over a 1-D (or 2-D) mesh and fetch the whole result on every process."""

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def mesh_1d(num_ranks: int, name: str = "x"):
    return jax.make_mesh((num_ranks,), (name,), devices=jax.devices()[:num_ranks])


def global_array(host: np.ndarray, mesh, spec):
    sharding = NamedSharding(mesh, spec)
    if host.size == 0:  # make_array_from_callback passes whole-array indices for empty arrays
        return jax.device_put(host, sharding)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def run_per_rank(fn, host: np.ndarray, mesh, axis: str = "x", *, jit: bool = True):
    """host[r] is rank r's input; returns a stack of every rank's output, as numpy."""
    spec = P(axis)
    mapped = jax.shard_map(lambda a: fn(a[0])[None], mesh=mesh, in_specs=spec, out_specs=spec)
    if jit:
        mapped = jax.jit(mapped)
    with jax.set_mesh(mesh):
        out = mapped(global_array(host, mesh, spec))
    if out.size == 0:  # jax cannot fetch an empty sharded array; there is nothing to compare
        return np.zeros(out.shape, out.dtype)
    return np.asarray(multihost_utils.process_allgather(out, tiled=True))

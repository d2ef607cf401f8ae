"""Run a per-shard function over a 1-D (or 2-D) mesh and fetch the whole result on every process."""

import itertools

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnvrar.distributed import KV_TIMEOUT_MS, kv_client, ranks_share_gpus


def needs_devices_in_one_process(devices: int) -> None:
    """Skip, with the reason, unless this is a single-process run with at least `devices` devices."""
    if jax.process_count() > 1:
        pytest.skip("single-process test")
    if devices > jax.device_count():
        pytest.skip(f"needs {devices} devices")


def mesh_1d(num_ranks: int, name: str = "x"):
    return jax.make_mesh((num_ranks,), (name,), devices=jax.devices()[:num_ranks])


def xla_collectives_mesh(num_ranks: int, name: str = "x"):
    """A mesh on which XLA's own collectives (psum, ppermute) run, for reference results: the
    job's devices, or where ranks share a GPU (NCCL refuses that) this process's CPU devices."""
    if not ranks_share_gpus():
        return mesh_1d(num_ranks, name)
    cpus = jax.local_devices(backend="cpu")
    assert len(cpus) >= num_ranks, f"set JAX_NUM_CPU_DEVICES >= {num_ranks}"
    return jax.make_mesh((num_ranks,), (name,), devices=cpus[:num_ranks])


def global_array(host: np.ndarray, mesh, spec):
    sharding = NamedSharding(mesh, spec)
    if host.size == 0:  # make_array_from_callback passes whole-array indices for empty arrays
        return jax.device_put(host, sharding)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


_gather_calls = itertools.count()
_CHUNK_BYTES = 1 << 20


def _gather_rows_by_key_value(out: jax.Array) -> np.ndarray:
    """process_allgather without a collective (ranks that share a GPU cannot run NCCL): every
    process posts its rows to jax.distributed's key-value store and reads the others'."""
    client, call = kv_client(), next(_gather_calls)
    whole = np.zeros(out.shape, out.dtype)
    for shard in out.addressable_shards:
        data = np.ascontiguousarray(np.asarray(shard.data)).tobytes()
        start = shard.index[0].start or 0
        chunks = range(0, max(len(data), 1), _CHUNK_BYTES)
        client.key_value_set(f"tests/gather/{call}/{start}", str(len(chunks)))
        for i, offset in enumerate(chunks):
            client.key_value_set_bytes(f"tests/gather/{call}/{start}/{i}", data[offset:offset + _CHUNK_BYTES])
    rows_per_shard = out.shape[0] // len(out.sharding.device_set)
    for start in range(0, out.shape[0], rows_per_shard):
        count = int(client.blocking_key_value_get(f"tests/gather/{call}/{start}", KV_TIMEOUT_MS))
        data = b"".join(client.blocking_key_value_get_bytes(f"tests/gather/{call}/{start}/{i}", KV_TIMEOUT_MS)
                        for i in range(count))
        whole[start:start + rows_per_shard] = np.frombuffer(data, out.dtype).reshape(
            (rows_per_shard,) + out.shape[1:])
    # Once every process has read, free the store (it lives in process 0's memory).
    client.wait_at_barrier(f"tests/gather/{call}", KV_TIMEOUT_MS)
    for shard in out.addressable_shards:
        client.key_value_delete(f"tests/gather/{call}/{shard.index[0].start or 0}")
    return whole


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
    if out.is_fully_addressable:
        return np.asarray(out)
    if ranks_share_gpus():
        return _gather_rows_by_key_value(out)
    return np.asarray(multihost_utils.process_allgather(out, tiled=True))

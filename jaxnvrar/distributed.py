"""The job's processes: starting jax.distributed, its key-value store, which host each process
runs on, the topology that follows, and checks that every process agrees.

jaxnvrar-launch (jaxnvrar/launcher.py) gives each rank the JAXNVRAR_* variables named below;
`initialize_distributed()` reads them. Multi-host jobs (Slurm, mpirun) need no launcher: there
jax.distributed's own cluster detection applies.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import socket
import subprocess

import jax

from jaxnvrar.schedule import Topology

# The launcher's contract: set for each rank by jaxnvrar-launch.
ENV_COORDINATOR = "JAXNVRAR_COORDINATOR"
ENV_NUM_PROCESSES = "JAXNVRAR_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXNVRAR_PROCESS_ID"
ENV_LOCAL_RANK = "JAXNVRAR_LOCAL_RANK"
ENV_LOCAL_DEVICE = "JAXNVRAR_LOCAL_DEVICE"  # the GPU of this rank (launch --gpus: ranks may share one)
ENV_GPUS = "JAXNVRAR_GPUS"  # GPUs the launcher spread its ranks over

KV_TIMEOUT_MS = 120_000  # how long a process waits for another's key-value entry

_hosts: dict[int, str] | None = None


def initialize_distributed(**kwargs) -> None:
    """`jax.distributed.initialize` for a rank started by jaxnvrar-launch (one device each),
    or with jax's own cluster detection (Slurm, Open MPI, ...) elsewhere. No-op for one process,
    also where nothing launched this one: the same script runs alone or as one rank of many."""
    if ENV_COORDINATOR not in os.environ:
        try:
            jax.distributed.initialize(**kwargs)
        except ValueError as err:
            # jax found no cluster to join; alone, there is nothing to connect to.
            if kwargs or looks_like_multi_process_job() or "coordinator_address" not in str(err):
                raise
        return
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if num_processes == 1:
        return
    device = os.environ.get(ENV_LOCAL_DEVICE, os.environ[ENV_LOCAL_RANK])
    kwargs.setdefault("local_device_ids", [int(device)])
    jax.distributed.initialize(
        os.environ[ENV_COORDINATOR], num_processes, int(os.environ[ENV_PROCESS_ID]), **kwargs
    )
    publish_hostname()


def local_gpu_count() -> int:
    """GPUs this host offers to a job (CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`), found
    without starting CUDA in this process."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return listing.stdout.count("GPU ") if listing.returncode == 0 else 0


def looks_like_multi_process_job() -> bool:
    """Whether a launcher (ours, Slurm, Open MPI, PMI) started several processes."""
    for var in (ENV_NUM_PROCESSES, "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 1:
            return True
    return False


def ranks_share_gpus() -> bool:
    """True where jaxnvrar-launch put several ranks on one GPU (`--gpus` fewer than ranks): the
    kernels' logic can be tested there, but NCCL (so psum and ppermute) refuses to run, and
    timings mean nothing."""
    gpus, ranks = os.environ.get(ENV_GPUS), os.environ.get(ENV_NUM_PROCESSES)
    return bool(gpus and ranks) and int(gpus) < int(ranks)


def kv_client():
    """jax.distributed's key-value store client (None before jax.distributed.initialize)."""
    from jax._src import distributed

    return distributed.global_state.client


_published = False


def publish_hostname() -> None:
    """Put this process's host name in jax.distributed's key-value store, once (initialize_distributed
    and jaxnvrar.initialize do): `host_of_process` on another process waits for it, and a process
    that never lowers an all-reduce would otherwise never publish it."""
    global _published
    # From jax.distributed's own state, not jax.process_count(): that would start XLA's backends,
    # and a script may still set options that must come before them (jax_platforms, ...).
    from jax._src import distributed as jax_distributed

    state = jax_distributed.global_state
    if not _published and state.client is not None and (state.num_processes or 1) > 1:
        state.client.key_value_set(f"jaxnvrar/hostname/{state.process_id}", socket.gethostname())
        _published = True


def host_of_process(process_index: int) -> str:
    """The host name of a process of this job (exchanged once through jax.distributed)."""
    global _hosts
    if _hosts is None:
        if jax.process_count() == 1:
            _hosts = {0: socket.gethostname()}
        else:
            client = kv_client()
            publish_hostname()
            _hosts = {
                i: client.blocking_key_value_get(f"jaxnvrar/hostname/{i}", KV_TIMEOUT_MS)
                for i in range(jax.process_count())
            }
    return _hosts[process_index]


def devices_per_every_host() -> int:
    """The greatest number of devices that divides every host's count in the job: the same on
    every process (this host's own count would differ where hosts hold different numbers)."""
    counts = collections.Counter(host_of_process(d.process_index) for d in jax.devices())
    return math.gcd(*counts.values())


def default_topology(num_ranks: int) -> Topology:
    """The topology assumed when gpus_per_node is not given and the mesh's devices are not at
    hand (tracing, before "auto" chooses): ranks grouped by the devices that every host holds,
    the same on every process, so that all make the same choice. (Lowering refines it from the
    mesh, and refuses there what no longer fits.)"""
    return Topology(num_ranks, math.gcd(num_ranks, devices_per_every_host()))


_gathers = itertools.count(1)


def gather_from_processes(value):
    """Every process's `value` (JSON: numbers, strings, lists, dicts), by process index, through
    jax.distributed's key-value store, not a collective: it works where NCCL does not (ranks
    sharing a GPU) and does not depend on the all-reduce under test. Every process must make the
    same calls in the same order."""
    if jax.process_count() == 1:
        return [json.loads(json.dumps(value))]
    client = kv_client()
    prefix = f"jaxnvrar/gather/{next(_gathers)}"
    client.key_value_set(f"{prefix}/{jax.process_index()}", json.dumps(value, sort_keys=True))
    return [json.loads(client.blocking_key_value_get(f"{prefix}/{other}", KV_TIMEOUT_MS))
            for other in range(jax.process_count())]


def check_same_across_processes(settings: dict, caller: str, fix: str | None = None) -> None:
    """Raise on every process unless all processes have the same `settings`. Settings that decide
    how the kernel is lowered must agree: processes that lower it differently compile different
    programs, and a job whose processes compile different programs can hang before any kernel runs.
    `settings` are environment variables by name unless `fix` says how to make them agree."""
    if jax.process_count() == 1:
        return
    for other, theirs in enumerate(gather_from_processes(settings)):
        differ = [name for name in sorted(settings) if theirs.get(name) != settings[name]]
        if differ:
            fix = fix or f"set {', '.join('$' + n for n in differ)} alike on every process (None: unset)"
            raise RuntimeError(
                f"{caller}: process {jax.process_index()} has "
                f"{', '.join(f'{n}={settings[n]}' for n in differ)}, process {other} has "
                f"{', '.join(f'{n}={theirs.get(n)}' for n in differ)}; {fix}, or the processes "
                "compile different programs and the job can hang"
            )

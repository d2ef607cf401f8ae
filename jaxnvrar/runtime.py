"""Runtime: the CUDA extension, NVSHMEM's lifecycle, the symmetric workspace and the failure
record of the kernel.

`start()` bootstraps NVSHMEM (one PE per process, one GPU per process) through nvshmem4py with
a unique id shared in jax.distributed's key-value store, then lets the extension fill its own
copy of NVSHMEM's device state, allocate the symmetric workspace and register its XLA targets.
`jaxnvrar.initialize()` calls it.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import os
import re
import sys

import jax

from jaxnvrar import distributed, settings as settings_module, timing
from jaxnvrar.schedule import KernelConfig, Topology, grouping_bytes, workspace_bytes_needed

_BUILD_HINT = (
    "build jaxnvrar on a machine with nvcc and NVSHMEM: "
    "pip install nvidia-nvshmem-cu13 nvshmem4py-cu13 scikit-build-core nanobind && "
    "NVSHMEM_HOME=$(python -c 'import nvidia.nvshmem as m; print(m.__path__[0])') "
    "pip install --no-build-isolation -e ."
)


@dataclasses.dataclass(frozen=True)
class _State:
    settings: settings_module.Settings  # the snapshot checked across processes at start
    num_pes: int
    my_pe: int
    nvshmem4py: object  # the nvshmem.core module, finalised after the extension


_state: _State | None = None
_ever_initialized = False


def cuda_extension():
    """The compiled CUDA module, or an ImportError that says how to build it."""
    try:
        from jaxnvrar import _jaxnvrar_cuda
    except ImportError as err:
        raise ImportError(f"jaxnvrar was built without its CUDA/NVSHMEM part ({err}); {_BUILD_HINT}") from err
    return _jaxnvrar_cuda


def cuda_available() -> bool:
    try:
        cuda_extension()
    except ImportError:
        return False
    return True


def is_initialized() -> bool:
    return _state is not None


def was_finalized() -> bool:
    return _state is None and _ever_initialized


def settings() -> settings_module.Settings | None:
    """The JAXNVRAR_* settings in force: the snapshot taken and checked at start (None before)."""
    return _state.settings if _state else None


def settings_or_environment() -> settings_module.Settings:
    """The snapshot in force, or before start what the environment says now (CPU runs, the
    reference path)."""
    return _state.settings if _state else settings_module.read()


def pe() -> tuple[int, int]:
    """(this process's NVSHMEM PE, number of PEs); (0, 0) before start."""
    return (_state.my_pe, _state.num_pes) if _state else (0, 0)


def workspace_bytes() -> int:
    """Workspace bytes one call can use: its grouping's region of each PE's symmetric workspace
    (JAXNVRAR_GROUPINGS=1: the whole workspace, rounded down to 4 KiB; 0 before start)."""
    return grouping_bytes(_state.settings.workspace_bytes, _state.settings.groupings) if _state else 0


def groupings() -> int:
    """Regions of the workspace, one per grouping of ranks (JAXNVRAR_GROUPINGS; 1 before start)."""
    return _state.settings.groupings if _state else 1


def fits_workspace(num_elements: int, itemsize: int, topology: Topology, config: KernelConfig | None = None) -> bool:
    """Whether the workspace holds this message with the default kernel configuration (or `config`)."""
    return workspace_bytes_needed(num_elements, itemsize, topology, config) <= workspace_bytes()


def check_calls() -> bool:
    """Whether kernels lowered from now on compare call signatures with their peers."""
    return bool(_state and _state.settings.check_calls)


# XLA options under which two kernel calls of one program could run at once: command buffers whose
# commands are ordered only by the buffers they use (not by the workspace the calls share).
_CONCURRENCY_FLAGS = {"xla_gpu_command_buffer_scheduling_mode": {"concurrent"},
                      "xla_gpu_graph_enable_concurrent_region": {"", "true", "1"}}


def concurrent_xla_flag(flags: str) -> str | None:
    """The flag of `flags` (XLA_FLAGS) that lets XLA run kernel calls of one program at once, as
    written; None if none does. As XLA reads them, the last value of a flag counts."""
    last = {}
    for match in re.finditer(r"--(\w+)(?:=(\S*))?", flags):
        if match.group(1) in _CONCURRENCY_FLAGS:
            last[match.group(1)] = match
    for name, match in last.items():
        if (match.group(2) or "").lower() in _CONCURRENCY_FLAGS[name]:
            return match.group(0)
    return None


def installation() -> dict:
    """What of this install decides how programs are lowered: the version and the built-in
    tuning table (a digest); compared across processes at start."""
    from jaxnvrar import tuning
    from jaxnvrar.version import __version__

    digest = hashlib.sha256(tuning.builtin().to_json().encode()).hexdigest()[:16]  # as parsed: not line endings
    return {"jaxnvrar": __version__, "built-in tuning table": digest}


def _check_environment():
    concurrent = concurrent_xla_flag(os.environ.get("XLA_FLAGS", ""))
    if concurrent:
        raise RuntimeError(
            f"jaxnvrar.initialize(): XLA_FLAGS has {concurrent}: XLA may then run two independent "
            "all-reduce kernels of one program at once, on the same workspace, and their data would mix; drop it "
            "(the default scheduling, LHS, runs them in program order), or keep custom calls out of command "
            "buffers (--xla_gpu_enable_command_buffer without CUSTOM_CALL)"
        )
    if distributed.looks_like_multi_process_job() and distributed.kv_client() is None:
        raise RuntimeError(
            "jaxnvrar.initialize() was called before jax.distributed.initialize() in a "
            "multi-process job; call jax.distributed.initialize() first"
        )
    gpus = [d for d in jax.local_devices() if d.platform == "gpu"]
    if not gpus:
        raise RuntimeError(
            "jaxnvrar.initialize() needs a CUDA GPU, but this process sees "
            f"{[d.platform for d in jax.local_devices()]}; algorithm='reference' or 'psum' run anywhere"
        )
    if len(jax.local_devices()) != 1:
        raise RuntimeError(
            f"jaxnvrar.initialize() needs exactly one GPU per process (NVSHMEM has one PE per "
            f"process), but this process sees {len(jax.local_devices())}; start one process per GPU "
            "(jaxnvrar-launch does) or pass local_device_ids=[i] to jax.distributed.initialize"
        )


def _bootstrap_nvshmem4py():
    try:
        import numpy as np
        import nvshmem.core as nvshmem
    except ImportError as err:
        raise ImportError(
            f"nvshmem4py is missing ({err}); install it with: pip install nvshmem4py-cu13"
        ) from err
    try:
        from cuda.core import Device
    except ImportError:
        from cuda.core.experimental import Device

    rank, nranks = jax.process_index(), jax.process_count()
    if nranks == 1:
        uid = nvshmem.get_unique_id()
    else:
        client = distributed.kv_client()
        key = "jaxnvrar/nvshmem_uid"
        if rank == 0:
            uid = nvshmem.get_unique_id()
            client.key_value_set_bytes(key, uid._data.tobytes())
        else:
            uid = nvshmem.get_unique_id(empty=True)
            raw = client.blocking_key_value_get_bytes(key, distributed.KV_TIMEOUT_MS)
            uid._data.view(np.uint8)[:] = np.frombuffer(raw, np.uint8)
    device = Device(jax.local_devices()[0].local_hardware_id)
    device.set_current()
    nvshmem.init(device=device, uid=uid, rank=rank, nranks=nranks, initializer_method="uid")
    return nvshmem


def start(*, workspace_bytes: int | None = None) -> bool:
    """Start NVSHMEM, allocate the symmetric workspace and register the XLA targets; True if it
    started now, False if it was already up. See `jaxnvrar.initialize` for the contract."""
    global _state, _ever_initialized
    if workspace_bytes is not None and workspace_bytes < settings_module.MIN_WORKSPACE_BYTES:
        raise ValueError(f"workspace_bytes={workspace_bytes} is too small; use at least 1 MiB")
    if _state is None and _ever_initialized:
        raise RuntimeError(
            "jaxnvrar.initialize() after jaxnvrar.finalize() in the same process is not supported: "
            "NVSHMEM cannot be started twice in one process; finalize only at the end of the job"
        )
    if _state is not None:  # up already: the settings were read and checked then
        if workspace_bytes is not None and int(workspace_bytes) != _state.settings.workspace_bytes:
            raise RuntimeError(
                f"jaxnvrar is already initialised with a {_state.settings.workspace_bytes}-byte workspace, "
                "fixed for the life of the process; ask for the size you need in the first initialize()"
            )
        return False
    snapshot = settings_module.read()
    if workspace_bytes is not None:
        snapshot = dataclasses.replace(snapshot, workspace_bytes=int(workspace_bytes))
    _check_environment()
    distributed.publish_hostname()  # for peers that place processes on hosts (jax.distributed.initialize called directly)
    # Everything that changes how programs are lowered (and the call counter's start): the same
    # on every process, or they would compile different programs (or wait for different flags).
    distributed.check_same_across_processes(snapshot.agreed(), "jaxnvrar.initialize()")
    # So must the code that lowers them, as far as a version tells, and the built-in table that
    # "auto" and the kernel configurations fall back on (hosts with other installs).
    distributed.check_same_across_processes(installation(), "jaxnvrar.initialize()",
                                            fix="install the same jaxnvrar on every host")
    extension = cuda_extension()
    # The symmetric heap must hold the workspace and the dense kernel's inboxes; leave NVSHMEM
    # room for its own needs.
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(snapshot.workspace_bytes + snapshot.dense_bytes + (256 << 20)))
    nvshmem = _bootstrap_nvshmem4py()
    extension.initialize(snapshot.workspace_bytes, snapshot.timeout_s, bool(snapshot.force_put), snapshot.first_call,
                         snapshot.dense_bytes, snapshot.groupings)
    if snapshot.timing:
        extension.enable_timing()  # before any call site is planned: sites read it then
    _ever_initialized = True  # NVSHMEM is up: it cannot be started again in this process
    # The targets before the state: "initialised" must mean that programs can use the kernel.
    for name, handler in extension.registrations().items():
        jax.ffi.register_ffi_target(name, handler, platform="CUDA")
    _state = _State(snapshot, extension.num_pes(), extension.my_pe(), nvshmem)
    # Programs traced before now chose psum where "auto" would now choose the kernel, and jit
    # keeps them: drop them, or a process that traced early (a warm-up, an eval_shape) would run
    # other programs than its peers, or never the kernel.
    jax.clear_caches()
    return True


def _timing_on() -> bool:
    return bool(_state and _state.settings.timing)


def timing_records():
    """This GPU's per-call kernel stamps (JAXNVRAR_TIMING=1; see `jaxnvrar.timing`), in call
    order, after the queued work is done; None when timing is off."""
    return timing.parse(cuda_extension().timing_records()) if _timing_on() else None


def timing_summary() -> dict | None:
    """The stamps recorded since `reset_timing()`, summarised (`jaxnvrar.timing.summary`); None
    when timing is off or no call was stamped."""
    records = timing_records()
    return timing.summary(records) if records is not None and len(records) else None


def dense_calls() -> int:
    """Dense kernel calls completed on this GPU so far (0 before start), once the queued work is
    done: tests see whether a site ran the dense kernel or fell back to bulk."""
    return int(cuda_extension().dense_calls()) if _state else 0


def reset_timing() -> None:
    """Clear this GPU's stamps once the queued work is done (JAXNVRAR_TIMING=1; else nothing)."""
    if _timing_on():
        cuda_extension().reset_timing()


def last_timeout() -> dict | None:
    """Why an all-reduce failed in this process, else None: "kind" is "timeout" (a wait gave up;
    phase, step and peer say which) or "mismatch" (a peer made a different call: "mine" and
    "peer_call" describe both calls: elements, dtype, nodes, gpus_per_node, one_shot, bulk,
    fused_norm, dense, pull). "region" is the call's workspace region (one per grouping of ranks;
    `describe_timeout` names the axis it was lowered for and the peer's process); "peer_is_node"
    says whether "peer" counts nodes (an inter-node step's) or local GPUs.

    After either the kernel traps, the call raises (CUDA_ERROR_LAUNCH_FAILED) and the CUDA
    context is lost; this record survives in pinned host memory and is also printed at exit.
    """
    if not cuda_available():
        return None
    return cuda_extension().last_timeout()


def describe_call(call: dict) -> str:
    """A kernel call signature from a failure record, in words."""
    kind = ((", one-shot" if call["one_shot"] else "") + (", bulk" if call["bulk"] else "")
            + (", dense" if call.get("dense") else "") + (", pulled reduce-scatter" if call.get("pull") else "")
            + (", fused add + RMSNorm" if call.get("fused_norm") else ""))
    return (f"{call['elements']} x {call['dtype']} over {call['nodes']} node(s) of "
            f"{call['gpus_per_node']} GPU(s){kind}")


def describe_timeout(record: dict) -> str:
    # Which of the job's all-reduces failed: the axis (and process groups) of the call's
    # workspace region, as this process lowered it. Node and local GPU count within that axis;
    # the peer's process is named where this process's group in the region is known.
    from jaxnvrar import nvrar_ffi

    over = nvrar_ffi.describe_region(record["region"]) if record.get("region") is not None else None
    over = f" over {over}" if over else ""
    is_node = record.get("peer_is_node", record["phase"] == "inter-node step")
    process = nvrar_ffi.peer_process(record, is_node)
    peer = f"{'node' if is_node else 'local GPU'} {record['peer']}" + (f" (process {process})" if process is not None else "")
    if record.get("kind") == "mismatch":
        return (
            f"jaxnvrar: all-reduce mismatch{over} on node {record['node']} local GPU {record['local']}: this rank "
            f"called with {describe_call(record['mine'])}, {peer} with "
            f"{describe_call(record['peer_call'])}; every rank must make the same all-reduce calls "
            "in the same order"
        )
    if record["phase"] == "fused-norm grid barrier":  # waits for this GPU's own blocks, not a peer
        return (
            f"jaxnvrar: an all_reduce_rms_norm kernel{over} timed out after $JAXNVRAR_TIMEOUT_S on node "
            f"{record['node']} local GPU {record['local']} (call flag {record['flag']}) at its grid barrier: "
            "not all of its blocks ran at once (other work on the GPU: MPS limits or concurrent kernels?)"
        )
    return (
        f"jaxnvrar: an all-reduce{over} timed out after $JAXNVRAR_TIMEOUT_S on node {record['node']} local GPU "
        f"{record['local']} (call flag {record['flag']}), waiting in the {record['phase']} "
        f"{record['step']} for {peer}; did every rank make the same calls?"
    )


def _report_timeout_at_exit():
    record = last_timeout() if _ever_initialized else None
    if record:
        print(describe_timeout(record), file=sys.stderr, flush=True)


def finalize() -> None:
    """Wait for pending computations, free the workspace and shut NVSHMEM down (also run at
    exit). Safe to call twice; `initialize()` cannot follow it in the same process."""
    global _state
    if _state is None:
        return
    state, _state = _state, None
    if last_timeout() is not None:
        # A kernel trapped: the CUDA context is gone and NVSHMEM cannot shut down cleanly.
        # Leave it; the exit report says what happened.
        return
    # All-reduces still queued (also those jax has not handed to the GPU yet) use the workspace.
    jax.effects_barrier()
    for array in jax.live_arrays():
        array.block_until_ready()
    # The extension waits for the GPU to go idle, frees the workspace and drops its copy of
    # NVSHMEM's state before nvshmem4py shuts down.
    cuda_extension().finalize()
    state.nvshmem4py.finalize()
    # Compiled programs hold kernel launches on the freed workspace: drop jax's caches so a
    # later call recompiles and gets a clear error instead.
    jax.clear_caches()


atexit.register(finalize)
atexit.register(_report_timeout_at_exit)  # runs before finalize (atexit is last-in, first-out)

"""Runtime: the host layout of the job, and NVSHMEM's lifecycle for the CUDA kernel.

`initialize()` bootstraps NVSHMEM (one PE per process, one GPU per process) through
nvshmem4py with a unique id shared in jax.distributed's key-value store, then lets the
extension fill its own copy of NVSHMEM's device state and allocate the symmetric workspace.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import math
import os
import socket
import sys

import jax

WORKSPACE_ENV = "JAXNVRAR_WORKSPACE_BYTES"
DEFAULT_WORKSPACE_BYTES = 512 << 20
TIMEOUT_ENV = "JAXNVRAR_TIMEOUT_S"  # bound on every wait inside the kernel
DEFAULT_TIMEOUT_S = 10.0
FORCE_PUT_ENV = "JAXNVRAR_FORCE_PUT"  # 1: inter-node phase through nvshmem puts even over P2P
MAX_BLOCKS_ENV = "JAXNVRAR_MAX_BLOCKS"  # thread blocks per all-reduce, at most (default 128)
ONE_SHOT_ENV = "JAXNVRAR_ONE_SHOT"  # 1/0: one-shot launches on one node always/never (default: tuned)
BULK_ENV = "JAXNVRAR_BULK"  # 1/0: bulk launches (raw data, a flag per block) always/never (default: tuned)
CHECK_CALLS_ENV = "JAXNVRAR_CHECK_CALLS"  # 0: ranks do not compare call signatures (default 1)
FIRST_CALL_ENV = "JAXNVRAR_FIRST_CALL"  # testing: start the call counter here (flag wrap-around)
AUTO_MAX_BYTES_ENV = "JAXNVRAR_AUTO_MAX_BYTES"  # "auto" without a tuning table: nvrar up to this size
NETWORK_ENV = "JAXNVRAR_NETWORK"  # "auto" across nodes without a table: the cost model's network
_KV_TIMEOUT_MS = 120_000
# Set for each rank by jaxnvrar-launch.
ENV_COORDINATOR = "JAXNVRAR_COORDINATOR"
ENV_NUM_PROCESSES = "JAXNVRAR_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXNVRAR_PROCESS_ID"
ENV_LOCAL_RANK = "JAXNVRAR_LOCAL_RANK"
ENV_LOCAL_DEVICE = "JAXNVRAR_LOCAL_DEVICE"  # the GPU of this rank (launch --gpus: ranks may share one)
ENV_GPUS = "JAXNVRAR_GPUS"  # GPUs the launcher spread its ranks over
_BUILD_HINT = (
    "build jaxnvrar on a machine with nvcc and NVSHMEM: "
    "pip install nvidia-nvshmem-cu13 nvshmem4py-cu13 scikit-build-core nanobind && "
    "NVSHMEM_HOME=$(python -c 'import nvidia.nvshmem as m; print(m.__path__[0])') "
    "pip install --no-build-isolation -e ."
)


@dataclasses.dataclass
class _State:
    workspace_bytes: int
    max_blocks: int | None  # None: the tuning table's choice, else DEFAULT_MAX_BLOCKS
    one_shot: bool | None  # None: the tuning table's choice, else two-shot
    bulk: bool | None  # None: the tuning table's choice, else LL cells
    check_calls: bool
    num_pes: int
    my_pe: int
    nvshmem4py: object  # the nvshmem.core module, finalised after the extension


_state: _State | None = None
_ever_initialized = False
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
            if kwargs or _looks_like_multi_process_job() or "coordinator_address" not in str(err):
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


def ranks_share_gpus() -> bool:
    """True where jaxnvrar-launch put several ranks on one GPU (`--gpus` fewer than ranks): the
    kernels' logic can be tested there, but NCCL (so psum and ppermute) refuses to run, and
    timings mean nothing."""
    gpus, ranks = os.environ.get(ENV_GPUS), os.environ.get(ENV_NUM_PROCESSES)
    return bool(gpus and ranks) and int(gpus) < int(ranks)


def _distributed_client():
    from jax._src import distributed

    return distributed.global_state.client


def host_of_process(process_index: int) -> str:
    """The host name of a process of this job (exchanged once through jax.distributed)."""
    global _hosts
    if _hosts is None:
        if jax.process_count() == 1:
            _hosts = {0: socket.gethostname()}
        else:
            client = _distributed_client()
            client.key_value_set(f"jaxnvrar/hostname/{jax.process_index()}", socket.gethostname())
            _hosts = {
                i: client.blocking_key_value_get(f"jaxnvrar/hostname/{i}", _KV_TIMEOUT_MS)
                for i in range(jax.process_count())
            }
    return _hosts[process_index]


def devices_per_host() -> int:
    """Devices on this process's host, summed over the job's processes that share it."""
    mine = host_of_process(jax.process_index())
    return sum(
        1 for d in jax.devices() if host_of_process(d.process_index) == mine
    )


def default_topology(num_ranks: int):
    """The topology assumed when gpus_per_node is not given and the mesh's devices are not at
    hand: ranks grouped by the devices that share this host. (Lowering refines it from the mesh.)"""
    from jaxnvrar.schedule import Topology

    return Topology(num_ranks, math.gcd(num_ranks, devices_per_host()))


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


DEFAULT_MAX_BLOCKS = 128
MAX_BLOCKS_LIMIT = 1024


def set_max_blocks(blocks: int | None) -> None:
    """Fix the launch width of programs lowered from now on (compiled ones keep theirs);
    None goes back to the tuning table's choice (or the default)."""
    if _state is None:
        raise RuntimeError("jaxnvrar.runtime.set_max_blocks() needs jaxnvrar.initialize() first")
    if blocks is not None and not 1 <= int(blocks) <= MAX_BLOCKS_LIMIT:
        raise ValueError(f"max_blocks must be in [1, {MAX_BLOCKS_LIMIT}], got {blocks}")
    _state.max_blocks = None if blocks is None else int(blocks)


@dataclasses.dataclass(frozen=True)
class Launch:
    """How the kernel runs one call: its width; one-shot (one node: no all-gather) or not; bulk
    (raw data and a flag per block, for large messages) or LL cells."""

    max_blocks: int
    one_shot: bool = False
    bulk: bool = False

    def __post_init__(self):
        blocks = self.max_blocks
        if not isinstance(blocks, int) or isinstance(blocks, bool) or not 1 <= blocks <= MAX_BLOCKS_LIMIT:
            raise ValueError(f"Launch.max_blocks must be an int in [1, {MAX_BLOCKS_LIMIT}], got {blocks!r}")
        if not isinstance(self.one_shot, bool) or not isinstance(self.bulk, bool):
            raise TypeError(f"Launch.one_shot and Launch.bulk must be bools, got {self.one_shot!r}, {self.bulk!r}")

    @property
    def label(self) -> str:
        """"128", "128-1shot", "128-bulk", "128-1shot-bulk": how benchmarks and the tuning table
        name a launch."""
        return str(self.max_blocks) + ("-1shot" if self.one_shot else "") + ("-bulk" if self.bulk else "")

    @classmethod
    def parse(cls, label: str) -> Launch:
        blocks, *variants = label.split("-")
        if (not blocks.isdigit() or not 1 <= int(blocks) <= MAX_BLOCKS_LIMIT
                or variants not in ([], ["1shot"], ["bulk"], ["1shot", "bulk"])):
            raise ValueError(f"bad kernel launch {label!r}: expected BLOCKS[-1shot][-bulk] with BLOCKS in "
                             f"[1, {MAX_BLOCKS_LIMIT}], e.g. 128, 32-1shot or 128-1shot-bulk")
        return cls(int(blocks), "1shot" in variants, "bulk" in variants)


def launch_for(topology, dtype_name: str, num_elements: int, itemsize: int) -> Launch:
    """The launch of a call lowered now. Each choice: the explicit setting ($JAXNVRAR_MAX_BLOCKS,
    $JAXNVRAR_ONE_SHOT, $JAXNVRAR_BULK, `launch_override`, `set_max_blocks`), else the tuning
    table's, else 128 blocks, LL cells and the full schedule. One-shot only where possible (one
    node); both only where the workspace holds them, else the default launch, which computes the
    same bits."""
    from jaxnvrar import schedule, tuning

    explicit = (_state.max_blocks, _state.one_shot, _state.bulk) if _state is not None else (None, None, None)
    choice = None
    if None in explicit:
        choice = tuning.choice_for(topology, dtype_name, num_elements * itemsize)
    measured = choice.launch if choice else Launch(DEFAULT_MAX_BLOCKS)
    measured = (measured.max_blocks, measured.one_shot, measured.bulk)
    blocks, one_shot, bulk = (mine if mine is not None else theirs for mine, theirs in zip(explicit, measured))
    one_shot = one_shot and schedule.one_shot_possible(topology)
    bulk = bulk and blocks <= schedule.BULK_MAX_BLOCKS
    from jaxnvrar.nvrar_ffi import fits_workspace

    launch = Launch(blocks, one_shot, bulk)
    return launch if fits_workspace(num_elements, itemsize, topology, launch) else Launch(blocks)


@contextlib.contextmanager
def launch_override(launch: Launch | str):
    """Within the block, programs lowered launch as `launch` (a Launch or its label, e.g.
    "128-1shot"; benchmarks and the tuner compare launches this way); the settings before it
    come back afterwards. Every process must make the same override."""
    if _state is None:
        raise RuntimeError("jaxnvrar.runtime.launch_override() needs jaxnvrar.initialize() first")
    if isinstance(launch, str):
        launch = Launch.parse(launch)
    if not isinstance(launch, Launch):
        raise TypeError(f"launch_override takes a jaxnvrar.runtime.Launch or its label, got {launch!r}")
    saved = _state.max_blocks, _state.one_shot, _state.bulk
    _state.max_blocks, _state.one_shot, _state.bulk = launch.max_blocks, launch.one_shot, launch.bulk
    try:
        yield
    finally:
        _state.max_blocks, _state.one_shot, _state.bulk = saved


def check_calls() -> bool:
    """Whether kernels lowered from now on compare call signatures with their peers."""
    return bool(_state and _state.check_calls)


def was_finalized() -> bool:
    return _state is None and _ever_initialized


def workspace_bytes() -> int:
    """Size of each PE's symmetric workspace (0 before `initialize`)."""
    return _state.workspace_bytes if _state else 0


_MIN_WORKSPACE_BYTES = 1 << 20


def _requested_workspace_bytes(workspace_bytes: int | None) -> int:
    if workspace_bytes is None:
        return _env_number(WORKSPACE_ENV, int, DEFAULT_WORKSPACE_BYTES, minimum=_MIN_WORKSPACE_BYTES)
    if workspace_bytes < _MIN_WORKSPACE_BYTES:
        raise ValueError(f"workspace_bytes={workspace_bytes} is too small; use at least 1 MiB")
    return int(workspace_bytes)


def _looks_like_multi_process_job() -> bool:
    for var in (ENV_NUM_PROCESSES, "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 1:
            return True
    return False


def _check_environment():
    if _looks_like_multi_process_job() and _distributed_client() is None:
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
        client = _distributed_client()
        key = "jaxnvrar/nvshmem_uid"
        if rank == 0:
            uid = nvshmem.get_unique_id()
            client.key_value_set_bytes(key, uid._data.tobytes())
        else:
            uid = nvshmem.get_unique_id(empty=True)
            raw = client.blocking_key_value_get_bytes(key, _KV_TIMEOUT_MS)
            uid._data.view(np.uint8)[:] = np.frombuffer(raw, np.uint8)
    device = Device(jax.local_devices()[0].local_hardware_id)
    device.set_current()
    nvshmem.init(device=device, uid=uid, rank=rank, nranks=nranks, initializer_method="uid")
    return nvshmem


def initialize(*, workspace_bytes: int | None = None) -> None:
    """Start NVSHMEM and allocate the symmetric workspace; call after jax.distributed.initialize().

    ``workspace_bytes`` (default: ${JAXNVRAR_WORKSPACE_BYTES} or 512 MiB) bounds the largest
    message `algorithm="nvrar"` takes. Calling it again is a no-op; after `finalize()` it raises
    (NVSHMEM cannot restart within a process).
    """
    global _state, _ever_initialized
    requested = _requested_workspace_bytes(workspace_bytes)
    timeout_s = _env_number(TIMEOUT_ENV, float, DEFAULT_TIMEOUT_S, minimum=0.001)
    max_blocks = _env_number(MAX_BLOCKS_ENV, int, None, minimum=1, maximum=MAX_BLOCKS_LIMIT)
    one_shot = _env_number(ONE_SHOT_ENV, int, None, minimum=0, maximum=1)
    bulk = _env_number(BULK_ENV, int, None, minimum=0, maximum=1)
    first_call = _env_number(FIRST_CALL_ENV, int, 0, minimum=0)
    check_calls = bool(_env_number(CHECK_CALLS_ENV, int, 1, minimum=0))
    # Everything that changes how programs are lowered: the same on every process, or they
    # would compile different programs.
    lowering_settings = {MAX_BLOCKS_ENV: max_blocks, ONE_SHOT_ENV: one_shot, BULK_ENV: bulk,
                         CHECK_CALLS_ENV: int(check_calls), WORKSPACE_ENV: requested,
                         AUTO_MAX_BYTES_ENV: _env_number(AUTO_MAX_BYTES_ENV, int, None, minimum=0),
                         NETWORK_ENV: os.environ.get(NETWORK_ENV)}
    if _state is None and _ever_initialized:
        raise RuntimeError(
            "jaxnvrar.initialize() after jaxnvrar.finalize() in the same process is not supported: "
            "NVSHMEM cannot be started twice in one process; finalize only at the end of the job"
        )
    if _state is not None:
        if workspace_bytes is not None and requested != _state.workspace_bytes:
            raise RuntimeError(
                f"jaxnvrar is already initialised with a {_state.workspace_bytes}-byte workspace, "
                "fixed for the life of the process; ask for the size you need in the first initialize()"
            )
        return
    _check_environment()
    check_same_settings(lowering_settings)
    extension = cuda_extension()
    # The symmetric heap must hold the workspace; leave NVSHMEM room for its own needs.
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(requested + (256 << 20)))
    nvshmem = _bootstrap_nvshmem4py()
    extension.initialize(requested, timeout_s, os.environ.get(FORCE_PUT_ENV, "0") == "1", first_call)
    _state = _State(requested, max_blocks, None if one_shot is None else bool(one_shot),
                    None if bulk is None else bool(bulk), check_calls, extension.num_pes(), extension.my_pe(), nvshmem)
    _ever_initialized = True
    from jaxnvrar import nvrar_ffi, tuning

    nvrar_ffi.register()
    tuning.load_shared()


_settings_checks = 0


def check_same_settings(settings: dict) -> None:
    """Raise on every process unless all processes have the same settings. They decide how the
    kernel is lowered: processes that lower it differently compile different programs, and a
    job whose processes compile different programs can hang before any kernel runs."""
    if jax.process_count() == 1:
        return
    global _settings_checks
    _settings_checks += 1
    client = _distributed_client()
    prefix = f"jaxnvrar/settings/{_settings_checks}"
    client.key_value_set(f"{prefix}/{jax.process_index()}", json.dumps(settings, sort_keys=True))
    for other in range(jax.process_count()):
        theirs = json.loads(client.blocking_key_value_get(f"{prefix}/{other}", _KV_TIMEOUT_MS))
        differ = [name for name in sorted(settings) if theirs.get(name) != settings[name]]
        if differ:
            raise RuntimeError(
                f"jaxnvrar.initialize(): process {jax.process_index()} has "
                f"{', '.join(f'{n}={settings[n]}' for n in differ)}, process {other} has "
                f"{', '.join(f'{n}={theirs.get(n)}' for n in differ)}; set "
                f"{', '.join('$' + n for n in differ)} alike on every process (None: unset), or the processes "
                "compile different programs and the job can hang"
            )


def _env_number(name: str, kind, default, *, minimum, maximum=None):
    """The number in environment variable `name` (default when unset); a ValueError naming the
    variable and the accepted range otherwise."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name}={raw!r}: expected a {kind.__name__} {bound}")
    return value


def last_timeout() -> dict | None:
    """Why an all-reduce failed in this process, else None: "kind" is "timeout" (a wait gave up;
    phase, step and peer say which) or "mismatch" (a peer made a different call: "mine" and
    "peer_call" are (element count, dtype/topology code) of both).

    After either the kernel traps, the call raises (CUDA_ERROR_LAUNCH_FAILED) and the CUDA
    context is lost; this record survives in pinned host memory and is also printed at exit.
    """
    if not cuda_available():
        return None
    return cuda_extension().last_timeout()


_DTYPE_CODES = {1: "float32", 2: "bfloat16", 3: "float16"}


def describe_call(signature: tuple[int, int]) -> str:
    """(elements, code) of a kernel call signature, in words (code: csrc/nvrar_kernel.cuh's
    CallSignature, dtype << 28 | launch << 24 | gpus_per_node << 16 | nodes)."""
    elements, code = signature
    dtype = _DTYPE_CODES.get(code >> 28, f"dtype#{code >> 28}")
    launch = (", one-shot" if (code >> 24) & 1 else "") + (", bulk" if (code >> 24) & 2 else "")
    return f"{elements} x {dtype} over {code & 0xFFFF} node(s) of {(code >> 16) & 0xFF} GPU(s){launch}"


def describe_timeout(record: dict) -> str:
    peer_kind = "node" if record["phase"] == "inter-node step" else "local GPU"
    if record.get("kind") == "mismatch":
        return (
            f"jaxnvrar: all-reduce mismatch on node {record['node']} local GPU {record['local']}: this rank "
            f"called with {describe_call(record['mine'])}, {peer_kind} {record['peer']} with "
            f"{describe_call(record['peer_call'])}; every rank must make the same all-reduce calls "
            "in the same order"
        )
    return (
        f"jaxnvrar: an all-reduce timed out after ${TIMEOUT_ENV} on node {record['node']} local GPU "
        f"{record['local']} (call flag {record['flag']}), waiting in the {record['phase']} "
        f"{record['step']} for {peer_kind} {record['peer']}; did every rank make the same calls?"
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

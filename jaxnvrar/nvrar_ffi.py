"""The CUDA path: the checks before a call takes the kernel, and the lowering to the XLA FFI
target that `jaxnvrar.initialize()` registered (csrc/nvrar_ffi.cu)."""

from __future__ import annotations

import threading

import numpy as np
import jax
from jax.interpreters import mlir

from jaxnvrar import distributed, runtime, tuning
from jaxnvrar.schedule import KernelConfig, Topology, workspace_bytes_needed

TARGET = "jaxnvrar_nvrar_all_reduce"
TARGET_RMS_NORM = "jaxnvrar_nvrar_all_reduce_rms_norm"


def check_can_run(x, topology: Topology) -> None:
    """Raise, naming the fix, where algorithm="nvrar" cannot take this call."""
    if runtime.was_finalized():
        raise RuntimeError(
            "jaxnvrar.all_reduce(algorithm='nvrar') after jaxnvrar.finalize(): the NVSHMEM runtime is "
            "shut down for the rest of this process; use algorithm='psum' (or 'auto', which does)"
        )
    if not runtime.is_initialized():
        if jax.default_backend() != "gpu":
            raise RuntimeError(
                f"jaxnvrar.all_reduce(algorithm='nvrar') runs on CUDA GPUs after jaxnvrar.initialize(), but "
                f"this process runs on {jax.default_backend()!r}; use algorithm='reference' or 'psum' here "
                "('auto' picks psum), and see `python -m jaxnvrar` for what this install can do"
            )
        runtime.cuda_extension()  # says how to build, if that is what is missing
        raise RuntimeError(
            "jaxnvrar.all_reduce(algorithm='nvrar') needs jaxnvrar.initialize() first "
            "(after jax.distributed.initialize() in a multi-process job)"
        )
    shortfall = _workspace_shortfall(x, topology)
    if shortfall:
        raise ValueError(f"{shortfall}; raise it with jaxnvrar.initialize(workspace_bytes=...) or "
                         "$JAXNVRAR_WORKSPACE_BYTES, or use algorithm='psum'")


def _workspace_shortfall(aval, topology: Topology) -> str | None:
    """Why a message of `aval`'s size does not fit a call's workspace, in words; None where it fits."""
    if runtime.fits_workspace(aval.size, aval.dtype.itemsize, topology):
        return None
    needed = workspace_bytes_needed(aval.size, aval.dtype.itemsize, topology)
    share = (f" (its share of the workspace, cut into JAXNVRAR_GROUPINGS={runtime.groupings()} regions)"
             if runtime.groupings() > 1 else "")
    return (f"a {aval.size * aval.dtype.itemsize}-byte message needs {needed} bytes of NVSHMEM workspace, "
            f"but a call has {runtime.workspace_bytes()}{share}")


def _pe_groups(groups, num_pes: int) -> np.ndarray:
    """Row p: the NVSHMEM PEs of PE p's axis group, in axis order (one process per GPU)."""
    table = np.full((num_pes, len(groups[0])), -1, np.int32)
    for group in groups:
        pes = [device.process_index for device in group]
        for pe in pes:
            table[pe] = pes
    return table


# The workspace region of each grouping of ranks this process has lowered kernel calls for. The
# first process to lower a grouping claims the lowest free region for it in jax.distributed's
# key-value store (a key per region, set once), and every other process reads the claim: the
# assignment is the same on every process whatever each one lowered before, or in what order.
_grouping_regions: dict[frozenset, int] = {}
_without_region: dict[tuple, str] = {}  # (grouping, regions) found none: why; claims are never released
_regions_lock = threading.Lock()
# For failure reports: the axis names this process lowered over each region, and its own group of
# PEs (in axis order) in each, which turns a report's node and local GPU into a process.
_region_axes: dict[int, list[str]] = {}
_region_rows: dict[int, set[tuple[int, ...]]] = {}


class KernelRefused(ValueError):
    """Found at lowering: this call site cannot take the kernel (`reason`); algorithm="nvrar"
    raises it, "auto" runs psum there (the same on every process: it depends only on what they
    all share). `what` names the call for "auto"'s one warning per kind of refusal."""

    def __init__(self, message: str, what: str, reason: str):
        super().__init__(message)
        self.what, self.reason = what, reason


class NoRegionLeft(KernelRefused):
    """Every workspace region is taken by another grouping of ranks: the grouping (`what`, its
    process groups) cannot take the kernel."""


class MessageTooLarge(KernelRefused):
    """The message does not fit a call's workspace in the topology the lowering resolved from the
    mesh (tracing checked it against the topology assumed before the mesh was at hand, or against
    one example of a vmap)."""


def check_fits_at_lowering(aval, topology: Topology, axis_name) -> None:
    """MessageTooLarge where this call site's message does not fit the workspace. (Without the
    runtime, a lowering for inspection only, nothing to check against: the kernel refuses to run
    before jaxnvrar.initialize() anyway.)"""
    shortfall = _workspace_shortfall(aval, topology) if runtime.is_initialized() else None
    if shortfall is None:
        return
    what = f"{aval.size * aval.dtype.itemsize}-byte messages over {topology.num_nodes} node(s) of {topology.gpus_per_node} GPU(s)"
    reason = f"{shortfall}; raise JAXNVRAR_WORKSPACE_BYTES (or jaxnvrar.initialize(workspace_bytes=...))"
    raise MessageTooLarge(
        f"jaxnvrar.all_reduce(algorithm='nvrar') over axis {axis_name!r} as lowered ({aval.shape} {aval.dtype}, "
        f"{topology.num_nodes} node(s) of {topology.gpus_per_node} GPU(s) by the mesh): {reason}, or use "
        "algorithm='psum' ('auto' does)", what, reason)


def grouping_key(table: np.ndarray) -> frozenset:
    """A grouping of ranks: the set of each PE's peers (axis order does not matter: calls over
    the same peers may share a region whatever order a mesh lists them in)."""
    return frozenset(frozenset(int(pe) for pe in row) for row in table)


def grouping_region(table: np.ndarray, axis_name, available: int) -> int:
    """The workspace region of the grouping in `table` (`_pe_groups`'s), a new one the first time;
    refused, naming the fix, past `available` (JAXNVRAR_GROUPINGS). Calls over two groupings must
    not share a region: a rank between them could run two calls of one ahead of a slower peer
    and overwrite what that peer still reads."""
    key = grouping_key(table)
    name = _describe_grouping(key)
    with _regions_lock:  # programs may be lowered from several threads
        region = _grouping_regions.get(key)
        reason = _without_region.get((key, available))
        if region is None and reason is None:
            region, holders = _claim_region(name, available)
            if region is not None:
                _grouping_regions[key] = region
        if region is not None:
            axes = _region_axes.setdefault(region, [])
            if repr(axis_name) not in axes:
                axes.append(repr(axis_name))
            _region_rows.setdefault(region, set()).add(tuple(int(pe) for pe in table[jax.process_index()]))
            return region
        if reason is None:
            reason = (f"all {available} workspace regions (JAXNVRAR_GROUPINGS={available}) are taken by other "
                      f"groupings ({'; '.join(holders)}); set JAXNVRAR_GROUPINGS to the number of groupings the "
                      f"job's nvrar all-reduces use (at least {available + 1}) on every process before "
                      f"jaxnvrar.initialize() (each then gets that share of the workspace)")
            _without_region[(key, available)] = reason
    raise NoRegionLeft(
        f"jaxnvrar.all_reduce(algorithm='nvrar') over axis {axis_name!r} reduces over a new grouping of ranks "
        f"({name}), but {reason}; calls over different groupings sharing a region could overwrite data a slower "
        f"peer still reads. Or use algorithm='psum' over this axis ('auto' does)", name, reason)


def grouping_regions() -> dict[str, int]:
    """The workspace region of each grouping of ranks this process has lowered kernel calls
    for, by its process groups (`python -m jaxnvrar` lists them)."""
    with _regions_lock:
        return {_describe_grouping(key): region for key, region in sorted(_grouping_regions.items(), key=lambda kv: kv[1])}


def _grouping_in(region: int) -> frozenset | None:
    """The grouping this process knows in `region` (call with _regions_lock held)."""
    return next((key for key, r in _grouping_regions.items() if r == region), None)


def describe_region(region: int) -> str | None:
    """What this process lowered kernel calls over in workspace region `region`, in words (the
    axis names and process groups), for failure reports; None where it lowered none there."""
    with _regions_lock:
        axes = list(_region_axes.get(region, ()))
        key = _grouping_in(region)
    if not axes or key is None:
        return None
    return f"axis {' or '.join(axes)} ({_describe_grouping(key)}; workspace region {region})"


def peer_process(record: dict, is_node: bool) -> int | None:
    """The process a failure record's peer (a node if `is_node`, else a local GPU) runs in (one
    process per GPU): the axis group of this process in the call's region, at the peer's node and
    local GPU; None where this process lowered calls over the region in several axis orders
    (which one failed is not recorded)."""
    with _regions_lock:
        rows = _region_rows.get(record.get("region"), set())
    gpus_per_node = (record.get("mine") or {}).get("gpus_per_node")
    if len(rows) != 1 or not gpus_per_node:
        return None
    (row,) = rows
    rank = (record["peer"] * gpus_per_node + record["local"] if is_node
            else record["node"] * gpus_per_node + record["peer"])
    return row[rank] if 0 <= rank < len(row) and row[rank] >= 0 else None


def _claim_region(name: str, available: int) -> tuple[int | None, list[str]]:
    """The region of the grouping `name`: the one it holds, else the lowest free one, claimed now;
    (None, the holders) when all are taken. Across processes through the key-value store."""
    client = distributed.kv_client() if jax.process_count() > 1 else None
    holders = []
    for region in range(available):
        if client is None:
            key = _grouping_in(region)
            if key is None:
                return region, holders
            holder = _describe_grouping(key)
        else:
            entry = f"jaxnvrar/grouping_region/{region}"
            try:
                client.key_value_set(entry, name)  # set once: the first process to claim it wins
                return region, holders
            except Exception:  # taken (by this grouping, from another process, or by another one)
                holder = client.blocking_key_value_get(entry, distributed.KV_TIMEOUT_MS)
        if holder == name:
            return region, holders
        holders.append(holder)
    return None, holders


def _describe_grouping(key: frozenset) -> str:
    """The grouping's process groups, in a canonical order (its name in the key-value store)."""
    groups = sorted(sorted(group) for group in key if -1 not in group)
    return "process groups " + " ".join("{" + ",".join(map(str, g)) + "}" for g in groups)


def protocol_attribute(config: KernelConfig) -> int:
    """The `bulk` attribute of a call site (csrc/nvrar_ffi.cu's SelectProtocol): 0 LL cells, 1 bulk,
    2 dense (csrc/protocol_dense.cuh), 3 bulk with a pulled reduce-scatter (protocol_bulk.cuh)."""
    return 2 if config.dense else 3 if config.pull else int(config.bulk)


def _kernel_attributes(ctx, topology: Topology, groups, axis_name) -> dict:
    """The attributes every kernel call site is lowered with (csrc/nvrar_ffi.cu's instantiate)."""
    if groups is None:
        raise ValueError(
            "jaxnvrar.all_reduce(algorithm='nvrar') needs jax.shard_map over a concrete "
            "jax.sharding.Mesh (one made from devices), not an AbstractMesh"
        )
    aval = ctx.avals_in[0]
    check_fits_at_lowering(aval, topology, axis_name)  # before a region is claimed for it
    table = _pe_groups(groups, jax.process_count())
    # An axis of one rank is a copy: no peers, no workspace.
    grouping = grouping_region(table, axis_name, runtime.groupings()) if topology.num_ranks > 1 else 0
    config = tuning.kernel_config_for(topology, aval.dtype.name, aval.size, aval.dtype.itemsize)
    return dict(
        num_ranks=np.int32(topology.num_ranks),
        gpus_per_node=np.int32(topology.gpus_per_node),
        max_blocks=np.int32(config.max_blocks),
        one_shot=np.int32(config.one_shot),
        bulk=np.int32(protocol_attribute(config)),
        check_calls=np.int32(runtime.check_calls()),
        grouping=np.int32(grouping),
        pe_groups=table.reshape(-1),
    )


def lower(ctx, x, *, topology: Topology, groups, axis_name):
    rule = jax.ffi.ffi_lowering(TARGET, has_side_effect=True)
    return rule(ctx, x, **_kernel_attributes(ctx, topology, groups, axis_name))


def lower_rms_norm(ctx, x, residual, weight, *, topology: Topology, groups, axis_name, eps: float):
    """all_reduce_rms_norm's kernel: the all-reduce of the same message and launch, ending in the
    residual add and the RMSNorm (csrc/rms_norm_epilogue.cuh). One result holds both outputs,
    [normed, residual_out]: XLA's dynamic-slice fusion copies a side-effecting call that returns
    a tuple without removing the original, and both copies ran."""
    attributes = dict(_kernel_attributes(ctx, topology, groups, axis_name), eps=np.float32(eps))
    aval = ctx.avals_in[0]
    call = jax.ffi.ffi_call(TARGET_RMS_NORM, jax.ShapeDtypeStruct((2,) + aval.shape, aval.dtype),
                            has_side_effect=True)

    def both(x, residual, weight):
        out = call(x, residual, weight, **attributes)
        return [out[0], out[1]]

    return mlir.lower_fun(both, multiple_results=True)(ctx, x, residual, weight)

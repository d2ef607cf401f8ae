"""`all_reduce`: the public entry point, used like `jax.lax.psum` inside `jax.shard_map`."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxnvrar import distributed, nvrar_ffi, runtime, tuning
from jaxnvrar.primitive import all_reduce_p, auto_pcast_enabled, check_vma_enabled, varying_axes
from jaxnvrar.schedule import Topology
from jaxnvrar.tuning import choose_algorithm

ALGORITHMS = ("auto", "psum", "reference", "nvrar")
# What the CUDA kernel takes (algorithm="nvrar"); "auto" hands every other dtype to psum.
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# What algorithm="reference" takes: the kernel's dtypes (summed in float32) and float64 (in float64).
REFERENCE_DTYPES = SUPPORTED_DTYPES + (jnp.dtype(jnp.float64),)


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


def _is_manual_mesh_axis(axis_name) -> bool:
    """True inside jax.shard_map over ``axis_name``; False for a vmap (named batch) axis."""
    return axis_name in jax.sharding.get_abstract_mesh().manual_axes


def _automatic_axes() -> list:
    """Mesh axes of size > 1 that the enclosing shard_map leaves automatic (axis_names=...)."""
    mesh = jax.sharding.get_abstract_mesh()
    manual = set(mesh.manual_axes)
    return [a for a, size in zip(mesh.axis_names, mesh.axis_sizes) if a not in manual and size > 1]


def _reduced_state(aval, axis_name) -> bool:
    """True where ``axis_name`` is an unreduced/reduced axis of the value (psum's own cases)."""
    mat = getattr(aval, "mat", None)
    return mat is not None and (axis_name in getattr(mat, "unreduced", ())
                                or axis_name in getattr(mat, "reduced", ()))


def _check_dtype(dtype, algorithm: str) -> None:
    if algorithm == "reference" and dtype not in REFERENCE_DTYPES:
        raise TypeError(
            f"jaxnvrar.all_reduce(algorithm='reference') takes float32, bfloat16, float16 and float64, "
            f"got {dtype}; use algorithm='psum' (or 'auto', which picks psum for {dtype}), or cast"
        )
    if algorithm == "nvrar" and dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"jaxnvrar.all_reduce(algorithm='nvrar') supports float32, bfloat16 and float16, got {dtype}; "
            f"cast to one of them, or use algorithm='psum' (or 'auto', which picks psum for {dtype})"
        )


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

    A drop-in for ``jax.lax.psum(x, axis_name)``: the same values (within the dtype's rounding,
    bit-identical on every rank of the axis), dtype and type. Like psum, the result is invariant
    over ``axis_name`` (so ``out_specs=P()`` works under check_vma), an invariant ``x`` (a value
    replicated over the axis) sums to the axis size times ``x`` (as psum: made varying, then
    reduced), and derivatives (grad, vjp, jvp, transposes; check_vma on or off) are psum's.
    A pytree of arrays gives the same pytree, as psum does; its leaves of one dtype (and one
    type) are reduced together, as one message (one kernel launch instead of one per leaf:
    small messages pay latency, not bandwidth).

    Handed to ``jax.lax.psum`` itself, whatever ``algorithm`` says (no schedule applies there):
    a ``jax.vmap`` axis (``axis_name=`` of vmap, not a mesh axis), inputs that are no tracers
    (constants, which psum multiplies by the axis size), and values that are unreduced/reduced
    over the axis.

    Args:
      x: an array, any shape; or a pytree of them. algorithm="psum" and "auto" take every
        dtype psum takes; "reference" takes float32, bfloat16, float16 and float64 (summed in
        float32, float64 in float64); "nvrar" float32, bfloat16 and float16 ("auto" picks
        psum for the rest).
      axis_name: one mesh axis (of possibly several), or a 1-tuple of it.
      algorithm: "psum" (XLA's), "reference" (the NVRAR schedule in JAX collectives, any
        backend), "nvrar" (the CUDA kernel; needs `jaxnvrar.initialize()`), or "auto"
        (see `choose_algorithm`). In a shard_map manual over only some mesh axes
        (``axis_names=``) with others of size > 1 left automatic, "auto" picks psum and
        "nvrar" raises.
      gpus_per_node: consecutive ranks of the axis that form one node. Default: the ranks
        that share a host. Must divide the axis size.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    leaves, treedef = jax.tree.flatten(x)
    for leaf in leaves:  # refused by the algorithm asked for, wherever the call would go
        _check_dtype(jnp.asarray(leaf).dtype, algorithm)
    axis_name = _single_axis(axis_name)
    num_ranks = _axis_size(axis_name)
    topology = _topology(num_ranks, gpus_per_node)  # a bad gpus_per_node is refused whatever the route
    if _psum_case(leaves, axis_name, algorithm):
        return lax.psum(x, axis_name)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    vma = check_vma_enabled()
    invariant = [_is_invariant(leaf, axis_name) for leaf in leaves]
    automatic = _automatic_axes()
    if automatic and algorithm == "nvrar":
        raise NotImplementedError(
            f"jaxnvrar.all_reduce(algorithm='nvrar') needs jax.shard_map manual over every mesh axis, "
            f"but mesh axes {automatic} are left automatic here (shard_map(..., axis_names=...)); "
            "make them manual too (drop axis_names, or name them all), or use algorithm='auto' or "
            "'psum' (psum's all-reduce) or 'reference'"
        )
    # An invariant leaf is made varying first (pvary), exactly as psum does: its sum is the axis
    # size times it, and pvary's transpose (a psum) gives psum's derivative.
    leaves = [lax.pcast(leaf, axis_name, to="varying") if inv else leaf
              for leaf, inv in zip(leaves, invariant)]
    out = list(leaves)
    for indices in _groups(leaves, vma).values():
        group = [leaves[i] for i in indices]
        reduced = _all_reduce_message(group, axis_name, algorithm, topology, gpus_per_node, automatic, vma)
        for i, value in zip(indices, reduced):
            out[i] = value
    return jax.tree.unflatten(treedef, out)


def _topology(num_ranks: int, gpus_per_node: int | None) -> Topology:
    return Topology(num_ranks, gpus_per_node) if gpus_per_node is not None else distributed.default_topology(num_ranks)


def _resolved(algorithm: str, size: int, dtype, topology: Topology, automatic) -> str:
    """What ``algorithm`` runs for a message: "auto" chooses (`choose_algorithm`), psum for the
    dtypes the kernel does not take and where shard_map leaves mesh axes automatic."""
    if algorithm != "auto":
        return algorithm
    if dtype not in SUPPORTED_DTYPES or automatic:
        return "psum"
    return choose_algorithm(size, dtype, topology)


def _is_invariant(leaf, axis_name) -> bool:
    return check_vma_enabled() and axis_name not in varying_axes(jax.typeof(leaf))


def _psum_case(leaves, axis_name, algorithm: str) -> bool:
    """Calls that go to lax.psum whatever the algorithm (see `all_reduce`): psum asked for, a vmap
    axis, no tracers, values unreduced/reduced over the axis, or an invariant input where psum
    itself refuses one (jax_auto_pcast off: psum then says so)."""
    if (algorithm == "psum" or not _is_manual_mesh_axis(axis_name)
            or not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves)):
        return True
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    if any(_reduced_state(jax.typeof(leaf), axis_name) for leaf in leaves):
        return True
    return any(_is_invariant(leaf, axis_name) for leaf in leaves) and not auto_pcast_enabled()


class Route(NamedTuple):
    """Where a single-array call goes (`single_message_route`)."""
    algorithm: str       # "reference" or "nvrar"
    topology: Topology
    x: jax.Array         # made varying where it was invariant, as psum does
    axis_name: object    # the one mesh axis, unwrapped from a 1-tuple


def single_message_route(x, axis_name, algorithm: str, gpus_per_node: int | None) -> Route | None:
    """Where `all_reduce` sends the one array ``x`` through its primitive: a `Route` with
    algorithm "reference" or "nvrar" (after "auto" has chosen, and, for "nvrar", the checks that
    name a fix); None where it goes to psum, or where shard_map leaves mesh axes automatic
    (all_reduce's own cases). For calls that want the message whole, such as
    `jaxnvrar.all_reduce_rms_norm`'s kernel."""
    _check_dtype(x.dtype, algorithm)
    axis_name = _single_axis(axis_name)
    num_ranks = _axis_size(axis_name)
    if _psum_case([x], axis_name, algorithm) or _automatic_axes():
        return None
    topology = _topology(num_ranks, gpus_per_node)
    algorithm = _resolved(algorithm, x.size, x.dtype, topology, automatic=[])
    if algorithm == "psum":
        return None
    if algorithm == "nvrar":
        nvrar_ffi.check_can_run(x, topology)
    if _is_invariant(x, axis_name):
        x = lax.pcast(x, axis_name, to="varying")
    return Route(algorithm, topology, x, axis_name)


def _groups(leaves, vma: bool) -> dict:
    """Leaves that travel as one message: one dtype, one type (varying axes, weak type), and
    no sharding over automatic mesh axes (a leaf sharded so travels alone)."""
    groups: dict = {}
    for index, leaf in enumerate(leaves):
        aval = jax.typeof(leaf)
        spec = getattr(getattr(aval, "sharding", None), "spec", None)
        sharded = spec is not None and any(entry is not None for entry in spec)
        key = (leaf.dtype, bool(getattr(aval, "weak_type", False)),
               varying_axes(aval) if vma else frozenset(), index if sharded else None)
        groups.setdefault(key, []).append(index)
    return groups


def _all_reduce_message(group, axis_name, algorithm, topology, gpus_per_node, automatic, vma):
    """The leaves of ``group`` (one dtype, one type) flattened into one message, reduced, and cut
    back."""
    auto = algorithm == "auto"
    algorithm = _resolved(algorithm, sum(leaf.size for leaf in group), group[0].dtype, topology, automatic)
    if algorithm == "psum":
        return lax.psum(list(group), axis_name)
    message = group[0] if len(group) == 1 else jnp.concatenate([leaf.ravel() for leaf in group])
    if algorithm == "nvrar":
        nvrar_ffi.check_can_run(message, topology)
    reduced = all_reduce_p.bind(message, axis_name=axis_name, num_ranks=topology.num_ranks,
                                gpus_per_node=gpus_per_node, algorithm=algorithm, check_vma=vma, auto=auto)
    if len(group) == 1:
        return [reduced]
    out, offset = [], 0
    for leaf in group:
        out.append(reduced[offset:offset + leaf.size].reshape(leaf.shape))
        offset += leaf.size
    return out

"""The `all_reduce` primitive: typed like `lax.psum`, lowered to the reference or the CUDA kernel;
and its fused twin `all_reduce_rms_norm_p` (all-reduce + residual add + RMSNorm, at the end).

A primitive of our own (rather than a plain Python function of ppermutes) gives the result
psum's type inside `jax.shard_map`: a varying input comes out invariant over the reduced axis,
so `out_specs=P()` and `check_vma=True` work exactly as with psum, and its transpose is psum's
(pvary under check_vma=True, the all-reduce again under check_vma=False: the `check_vma`
param). Invariant inputs, vmap axes and constants are `all_reduce`'s to route, as psum does.
The topology is resolved at lowering time, where the concrete mesh is known.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxnvrar import distributed, nvrar_ffi
from jaxnvrar.reference import all_reduce_reference
from jaxnvrar.schedule import Topology

all_reduce_p = Primitive("jaxnvrar_all_reduce")


def varying_axes(aval) -> frozenset:
    """The manual mesh axes over which a value of type ``aval`` varies (its vma)."""
    # jax >= 0.10 keeps the varying manual axes in aval.mat; earlier releases in aval.vma.
    if hasattr(aval, "mat"):
        return frozenset(aval.mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def _with_varying_axes(aval, axes: frozenset):
    if hasattr(aval, "mat"):
        return aval.update(manual_axis_type=aval.mat.update(varying=axes))
    if hasattr(aval, "vma"):
        return aval.update(vma=axes)
    return aval


# Two of jax's own switches that psum reads; internal, so checked once here: a jax without them
# must fail loudly, since guessing would type (and transpose) all-reduces unlike psum.
try:
    from jax._src.config import _check_vma as _CHECK_VMA
    from jax._src.config import auto_pcast as _AUTO_PCAST
except ImportError as err:  # pragma: no cover - a jax this version of jaxnvrar does not know
    raise ImportError(f"jaxnvrar needs jax 0.10 or 0.11 (jax {jax.__version__} lacks {err.name}: "
                      "jax._src.config._check_vma / auto_pcast, which psum's typing reads)") from err


def check_vma_enabled() -> bool:
    """Whether the enclosing shard_map checks varying axes (its ``check_vma``; jax's psum reads
    the same setting to pick between its two primitives)."""
    return bool(_CHECK_VMA.value)


def auto_pcast_enabled() -> bool:
    """Whether psum turns an invariant input varying first (jax_auto_pcast, default on)."""
    return bool(_AUTO_PCAST.value)


def _abstract_eval(x, *, axis_name, num_ranks, gpus_per_node, algorithm, check_vma, auto):
    # psum's type: varying -> invariant over the axis. The caller (`all_reduce`) makes an
    # invariant input varying first, as psum does.
    return _with_varying_axes(x, varying_axes(x) - {axis_name})


all_reduce_p.def_abstract_eval(_abstract_eval)


def _transpose(cotangent, x, **params):
    # psum's rules. check_vma=True (psum_invariant): the cotangent of the invariant result
    # flows back to every rank unchanged, made varying again (pvary; its own transpose is a
    # psum). check_vma=False (psum_p, "psum + pbroadcast"): the cotangent is summed again.
    if params["check_vma"]:
        return [lax.pcast(cotangent, params["axis_name"], to="varying")]
    return [all_reduce_p.bind(cotangent, **params)]


ad.deflinear2(all_reduce_p, _transpose)


def _batch(args, dims, **params):
    # The all-reduce is elementwise, so a batch dimension passes straight through. (A vmap
    # axis is never reduced here: `all_reduce` hands those to lax.psum.)
    return all_reduce_p.bind(args[0], **params), dims[0]


batching.primitive_batchers[all_reduce_p] = _batch


# ---------------------------------------------------------------- topology at lowering time


def _axis_groups(mesh, axis_name) -> list[list]:
    """The devices of ``mesh`` grouped by ``axis_name``: one list per group, in axis order."""
    axis = mesh.axis_names.index(axis_name)
    devices = np.moveaxis(np.asarray(mesh.devices), axis, -1)
    return [list(row) for row in devices.reshape(-1, devices.shape[-1])]


def _mesh_of(ctx):
    mesh = getattr(ctx.module_context.axis_context, "mesh", None)
    if mesh is None or not hasattr(mesh, "devices"):
        return None
    return mesh


def _node_size_of(group: list) -> int:
    """How many consecutive ranks of one axis group share a host."""
    hosts = [distributed.host_of_process(d.process_index) for d in group]
    size = 1
    while size < len(hosts) and hosts[size] == hosts[0]:
        size += 1
    for start in range(0, len(hosts), size):
        block = hosts[start : start + size]
        if len(set(block)) != 1 or len(block) != size or (start and hosts[start - 1] == block[0]):
            raise ValueError(
                "jaxnvrar.all_reduce: the ranks of the reduced axis are not laid out in equal "
                f"blocks of consecutive ranks per host (hosts in axis order: {hosts}); "
                "pass gpus_per_node explicitly"
            )
    return size


def resolve_topology(ctx, axis_name, num_ranks, gpus_per_node) -> tuple[Topology, list[list] | None]:
    """The topology of the reduced axis and, where the mesh is known, its device groups."""
    mesh = _mesh_of(ctx)
    groups = _axis_groups(mesh, axis_name) if mesh is not None else None
    if gpus_per_node is None:
        if groups is None:
            gpus_per_node = distributed.default_topology(num_ranks).gpus_per_node
        else:
            sizes = {_node_size_of(group) for group in groups}
            if len(sizes) != 1:
                raise ValueError(
                    f"jaxnvrar.all_reduce: groups of axis {axis_name!r} span hosts differently "
                    f"(node sizes {sorted(sizes)}); pass gpus_per_node explicitly"
                )
            gpus_per_node = sizes.pop()
    return Topology(num_ranks, gpus_per_node), groups


# ---------------------------------------------------------------- lowerings


def _refuse_nvrar_off_cuda(ctx, algorithm: str, name: str) -> None:
    if algorithm == "nvrar":
        raise NotImplementedError(
            f"{name}(algorithm='nvrar') runs on CUDA GPUs only, not on {ctx.module_context.platforms}; "
            "use algorithm='auto' to fall back to psum elsewhere"
        )


def _lower_reference(ctx, x, *, axis_name, num_ranks, gpus_per_node, algorithm, check_vma, auto):
    _refuse_nvrar_off_cuda(ctx, algorithm, "jaxnvrar.all_reduce")
    topology, _ = resolve_topology(ctx, axis_name, num_ranks, gpus_per_node)
    impl = functools.partial(all_reduce_reference, axis_name=axis_name, topology=topology)
    impl = _on_local_blocks(impl, ctx.avals_in[0])
    return mlir.lower_fun(impl, multiple_results=False)(ctx, x)


def _on_local_blocks(impl, aval):
    """``impl`` on each device's block where ``aval`` is sharded over mesh axes a partly manual
    shard_map (``axis_names=``) leaves automatic, as under explicit sharding: the reference's
    reshapes and slices are not defined on such dims, and the all-reduce is elementwise, so
    every block is reduced on its own, in a shard_map manual over those axes too."""
    sharding = getattr(aval, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return impl
    axes = set()
    for entry in spec:
        if entry is not None:
            axes.update(entry if isinstance(entry, tuple) else (entry,))
    if not axes:
        return impl
    return jax.shard_map(impl, mesh=sharding.mesh, in_specs=spec, out_specs=spec,
                         axis_names=axes, check_vma=False)


def _lower_cuda(ctx, x, *, axis_name, num_ranks, gpus_per_node, algorithm, check_vma, auto):
    if algorithm != "nvrar":
        return _lower_reference(ctx, x, axis_name=axis_name, num_ranks=num_ranks,
                                gpus_per_node=gpus_per_node, algorithm=algorithm, check_vma=check_vma, auto=auto)
    topology, groups = resolve_topology(ctx, axis_name, num_ranks, gpus_per_node)
    try:
        return nvrar_ffi.lower(ctx, x, topology=topology, groups=groups, axis_name=axis_name)
    except nvrar_ffi.KernelRefused as err:
        if not auto:
            raise
        _warn_psum_instead(err, axis_name)
        return mlir.lower_fun(lambda v: lax.psum(v, axis_name), multiple_results=False)(ctx, x)


_warned_refusals: set = set()


def _warn_psum_instead(err, axis_name) -> None:
    """algorithm="auto" chose the kernel, but the lowering found that this call cannot take it
    (`nvrar_ffi.KernelRefused`: its grouping has no workspace region left, or the message does not
    fit the workspace in the mesh's topology): psum runs there, the same on every process, with
    this warning once per kind. (The benchmarks turn it into an error: they must not time psum in
    place of the kernel.)"""
    if err.what not in _warned_refusals:
        _warned_refusals.add(err.what)
        warnings.warn(f"jaxnvrar (algorithm='auto'): psum instead of the kernel over axis {axis_name!r} "
                      f"({err.what}): {err.reason}", stacklevel=2)


mlir.register_lowering(all_reduce_p, _lower_reference)
mlir.register_lowering(all_reduce_p, _lower_cuda, platform="cuda")


# ---------------------------------------------------------------- the fused all-reduce + RMSNorm

# `jaxnvrar.all_reduce_rms_norm`'s call where it takes the kernel (algorithm "nvrar") or its
# portable twin ("reference"): (x, residual, weight) -> (normed, residual_out). `jaxnvrar.fused`
# gives it its derivatives (a custom_jvp: the composition's) and its routing; here are its type,
# vmap rule and lowerings.
all_reduce_rms_norm_p = Primitive("jaxnvrar_all_reduce_rms_norm")
all_reduce_rms_norm_p.multiple_results = True


def _all_reduce_params(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != "eps"}


def rms_norm(h, weight, eps: float):
    """RMSNorm(h) * weight: in float32, cast back to h's dtype, then times weight with dtype
    promotion (as transformers' LlamaRMSNorm). The Llama's `RMSNorm` and the fused call's
    composition both use it."""
    h32 = h.astype(jnp.float32)
    h32 = h32 * lax.rsqrt(jnp.mean(h32 * h32, axis=-1, keepdims=True) + eps)
    return weight * h32.astype(h.dtype)


def add_then_rms_norm(reduced, residual, weight, eps: float):
    """(rms_norm(residual + reduced), residual + reduced): the composition the fused call
    stands for; the add in the inputs' dtype, as the Llama's `x + attended`."""
    residual_out = residual + reduced
    return rms_norm(residual_out, weight, eps).astype(residual_out.dtype), residual_out


def _fused_abstract_eval(x, residual, weight, *, axis_name, eps, num_ranks, gpus_per_node, algorithm, check_vma,
                         auto):
    # As the composition types it: the sum is invariant over the axis (psum), the add joins the
    # residual's varying axes, the norm the weight's.
    residual_out = _with_varying_axes(residual, (varying_axes(x) - {axis_name}) | varying_axes(residual))
    normed = _with_varying_axes(residual, varying_axes(residual_out) | varying_axes(weight))
    return [normed, residual_out]


all_reduce_rms_norm_p.def_abstract_eval(_fused_abstract_eval)


def _fused_batch(args, dims, **params):
    # Rows stay rows under a leading batch axis (None: not batched). An unbatched x is reduced
    # once (not once per example: the message the caller's checks sized); it and a batched
    # weight (rare) take the composition.
    x, residual, weight = args
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)

    def leading(a, d):
        return jnp.broadcast_to(a, (size,) + a.shape) if d is None else jnp.moveaxis(a, d, 0)

    residual = leading(residual, dims[1])
    if dims[0] is not None and dims[2] is None:
        return all_reduce_rms_norm_p.bind(leading(x, dims[0]), residual, weight, **params), (0, 0)
    reduced = all_reduce_p.bind(x, **_all_reduce_params(params))
    reduced = jnp.broadcast_to(reduced, residual.shape) if dims[0] is None else jnp.moveaxis(reduced, dims[0], 0)
    if dims[2] is not None:
        weight = leading(weight, dims[2])
        weight = weight.reshape((size,) + (1,) * (residual.ndim - 2) + weight.shape[-1:])
    return list(add_then_rms_norm(reduced, residual, weight, params["eps"])), (0, 0)


batching.primitive_batchers[all_reduce_rms_norm_p] = _fused_batch


def _lower_fused_reference(ctx, x, residual, weight, **params):
    _refuse_nvrar_off_cuda(ctx, params["algorithm"], "jaxnvrar.all_reduce_rms_norm")
    topology, _ = resolve_topology(ctx, params["axis_name"], params["num_ranks"], params["gpus_per_node"])
    reduce = functools.partial(all_reduce_reference, axis_name=params["axis_name"], topology=topology)

    def impl(x, residual, weight):
        return list(add_then_rms_norm(reduce(x), residual, weight, params["eps"]))

    return mlir.lower_fun(impl, multiple_results=True)(ctx, x, residual, weight)


def _lower_fused_cuda(ctx, x, residual, weight, **params):
    if params["algorithm"] != "nvrar":
        return _lower_fused_reference(ctx, x, residual, weight, **params)
    topology, groups = resolve_topology(ctx, params["axis_name"], params["num_ranks"], params["gpus_per_node"])
    try:
        return nvrar_ffi.lower_rms_norm(ctx, x, residual, weight, topology=topology, groups=groups,
                                        axis_name=params["axis_name"], eps=params["eps"])
    except nvrar_ffi.KernelRefused as err:
        if not params["auto"]:
            raise
        _warn_psum_instead(err, params["axis_name"])

        def composed(x, residual, weight):
            return list(add_then_rms_norm(lax.psum(x, params["axis_name"]), residual, weight, params["eps"]))

        return mlir.lower_fun(composed, multiple_results=True)(ctx, x, residual, weight)


mlir.register_lowering(all_reduce_rms_norm_p, _lower_fused_reference)
mlir.register_lowering(all_reduce_rms_norm_p, _lower_fused_cuda, platform="cuda")

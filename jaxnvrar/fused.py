"""`all_reduce_rms_norm`: the all-reduce that ends a row-parallel layer, the residual add after it
and the RMSNorm of the next layer, as one call (a tensor-parallel transformer's
``norm(residual + psum(partial))``).

Where the all-reduce takes the CUDA kernel ("nvrar", or "auto" choosing it), the add and the norm
run in the kernel's epilogue (csrc/rms_norm_epilogue.cuh): one kernel instead of the all-reduce
and XLA's norm fusions. "reference" takes the same primitive, lowered to the portable schedule,
so CPU tests cover the fused path's types, derivatives and vmap. Everything else (psum, shapes or
dtypes the kernel does not take) runs the composition. The numerics are those of
`jaxnvrar.models.llama`'s RMSNorm (and of Hugging Face's LlamaRMSNorm), so a model switching to
this call keeps its bits; the kernel's mean of squares sums in its own order (residual_out is
bit-identical, normed may differ from XLA's in the last bit).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxnvrar import runtime
from jaxnvrar.api import ALGORITHMS, SUPPORTED_DTYPES, all_reduce, single_message_route
from jaxnvrar.primitive import add_then_rms_norm, all_reduce_rms_norm_p, check_vma_enabled, rms_norm
from jaxnvrar.schedule import SLICE_ALIGN_BYTES

_NAME = "jaxnvrar.all_reduce_rms_norm"


def _checked(x, residual, weight, eps, name: str):
    """The inputs as arrays, refused (naming the argument) where the contract does not hold."""
    x, residual, weight = jnp.asarray(x), jnp.asarray(residual), jnp.asarray(weight)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: x must have a floating-point dtype, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{name}: x must be [..., hidden] (at least 1-D), got a scalar")
    if not jnp.issubdtype(residual.dtype, jnp.floating):
        raise TypeError(f"{name}: residual must have a floating-point dtype, got {residual.dtype}")
    if residual.shape != x.shape:
        raise ValueError(f"{name}: residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}; "
                         "they must be the same")
    if residual.dtype != x.dtype:
        raise TypeError(f"{name}: residual has dtype {residual.dtype} but x has {x.dtype}; they must be "
                        "the same (the residual add runs in that dtype); cast one of them")
    if not jnp.issubdtype(weight.dtype, jnp.floating):
        raise TypeError(f"{name}: weight must have a floating-point dtype, got {weight.dtype}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"{name}: weight must be [hidden] = ({x.shape[-1]},) (x's last axis), "
                         f"got shape {tuple(weight.shape)}")
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: eps must be a number, got {eps!r}") from None
    if not eps >= 0.0:
        raise ValueError(f"{name}: eps must be >= 0, got {eps}")
    return x, residual, weight, eps


def add_rms_norm(x, residual, weight, *, eps: float = 1e-5):
    """`all_reduce_rms_norm` without the all-reduce: ``residual + x`` and its RMSNorm times
    ``weight``, with the same checks and numerics. For a layer whose output needs no reduction
    (one rank, or the Llama's diagnostic all_reduce="none")."""
    x, residual, weight, eps = _checked(x, residual, weight, eps, "jaxnvrar.fused.add_rms_norm")
    return add_then_rms_norm(x, residual, weight, eps)


def all_reduce_rms_norm(x, residual, weight, axis_name, *, eps: float = 1e-5, algorithm: str = "auto",
                        gpus_per_node: int | None = None):
    """``residual_out = residual + all_reduce(x)`` and ``normed = RMSNorm(residual_out) * weight``;
    returns ``(normed, residual_out)``. Call inside `jax.shard_map`, as `jaxnvrar.all_reduce`.

    The end of a tensor-parallel transformer's row-parallel projection (attention out, MLP down):
    ``x`` is this rank's partial sum, ``residual`` the residual stream, ``weight`` the weight of
    the RMSNorm that follows (the post-attention norm, the next layer's input norm, the final
    norm).

    Numerics, those of `jaxnvrar.models.llama.RMSNorm` (and of Hugging Face's LlamaRMSNorm), so
    that the Llama's tokens stay bit-identical: the add runs in x's dtype; the norm
    ``h * rsqrt(mean(h * h, axis=-1) + eps)`` in float32 (also for float64 inputs), cast back to
    x's dtype, then multiplied by ``weight`` (in the dtypes' promotion: with ``weight`` in x's
    dtype, as in the Llama, that is x's dtype). Both results have x's dtype and shape.

    Types and derivatives: as the composition ``all_reduce`` + add + norm. With ``residual``
    and ``weight`` invariant over ``axis_name`` (the residual stream and norm weights of a
    tensor-parallel model are), both results are invariant over it like psum's, so
    ``out_specs=P()`` works under check_vma; a varying ``residual`` gives varying results.
    Works in jit, lax.scan and jax.grad (gradients are the unfused composition's), over one
    axis of a multi-axis mesh.

    Algorithms: "psum" and "reference" run ``jaxnvrar.all_reduce(x, algorithm=...)`` and then the
    add and the norm; "nvrar" (CUDA GPUs, after `jaxnvrar.initialize()`, else it raises naming
    it) runs ONE kernel: the all-reduce, then the add and the norm in its epilogue, for every
    launch kind; "auto" does too where its choice for the message is the kernel (unless the
    axis's grouping of ranks has no workspace region left: JAXNVRAR_GROUPINGS). The kernel
    takes x, residual and weight of one dtype (float32, bfloat16, float16) with rows of whole
    16 bytes (hidden a multiple of 8 in 16-bit dtypes) over 2+ ranks; other calls run the
    composition with the same all-reduce. In the kernel the mean of squares sums in its own
    (fixed) order: residual_out has psum's bits, normed may differ from XLA's by a rounding.

    Args:
      x: this rank's partial sum, [..., hidden], a floating-point dtype (the dtypes
        ``all_reduce(algorithm=...)`` takes).
      residual: the residual stream, x's shape and dtype (a different dtype is refused: the add
        runs in one dtype, and the result's dtype would otherwise depend on promotion).
      weight: the norm's weight, [hidden], floating point.
      axis_name: one mesh axis, as for `jaxnvrar.all_reduce`.
      eps: added to the mean square before the rsqrt (>= 0).
      algorithm, gpus_per_node: as for `jaxnvrar.all_reduce`.

    Raises:
      TypeError / ValueError naming the argument (x, residual, weight, eps, algorithm) whose
      dtype, shape or value is wrong; what `jaxnvrar.all_reduce` raises for the reduction.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{_NAME}: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    x, residual, weight, eps = _checked(x, residual, weight, eps, _NAME)
    route = _kernel_route(x, residual, weight, axis_name, algorithm, gpus_per_node)
    if route is not None:
        static = (("axis_name", route.axis_name), ("num_ranks", route.topology.num_ranks),
                  ("gpus_per_node", gpus_per_node), ("algorithm", route.algorithm),
                  ("check_vma", check_vma_enabled()), ("auto", algorithm == "auto"))
        return _fused(route.x, residual, weight, static, eps)
    reduced = all_reduce(x, axis_name, algorithm=algorithm, gpus_per_node=gpus_per_node)
    return add_then_rms_norm(reduced, residual, weight, eps)


def _kernel_route(x, residual, weight, axis_name, algorithm: str, gpus_per_node):
    """The `api.Route` where the call takes the fused primitive ("nvrar": the kernel,
    "reference": its portable twin); None for the composition."""
    if algorithm == "psum" or x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype:
        return None
    # Opt-in (JAXNVRAR_FUSED_NORM=1): not yet faster in a decode step.
    if not runtime.settings_or_environment().fused_norm:
        return None
    if x.size == 0 or (x.shape[-1] * x.dtype.itemsize) % SLICE_ALIGN_BYTES:
        return None  # the kernel normalizes rows of whole 16-byte vectors
    route = single_message_route(x, axis_name, algorithm, gpus_per_node)
    if route is None or route.topology.num_ranks < 2:
        return None
    return route


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _fused(x, residual, weight, static, eps):
    return tuple(all_reduce_rms_norm_p.bind(x, residual, weight, eps=eps, **dict(static)))


@_fused.defjvp
def _fused_jvp(static, eps, primals, tangents):
    # The composition's derivative, around the fused primal: d(residual_out) = d(residual) +
    # all_reduce(dx) with the same algorithm, and the norm's derivative at residual_out.
    x, residual, weight = primals
    dx, dresidual, dweight = tangents
    normed, residual_out = _fused(x, residual, weight, static, eps)
    params = dict(static)
    reduced = all_reduce(dx, params["axis_name"], algorithm="auto" if params["auto"] else params["algorithm"],
                         gpus_per_node=params["gpus_per_node"])
    dresidual_out = dresidual + reduced
    _, dnormed = jax.jvp(lambda h, w: rms_norm(h, w, eps).astype(h.dtype), (residual_out, weight),
                         (dresidual_out, dweight))
    return (normed, residual_out), (dnormed, dresidual_out)

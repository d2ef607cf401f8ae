"""`all_reduce_rms_norm`: the all-reduce that ends a row-parallel layer, the residual add after it
and the RMSNorm of the next layer, as one call (a tensor-parallel transformer's
``norm(residual + psum(partial))``).

Today every algorithm runs the unfused composition (the all-reduce, then the add and the norm in
XLA); the one place where algorithm="nvrar" will call a fused CUDA kernel instead is marked in
`all_reduce_rms_norm` below. The numerics are those of `jaxnvrar.models.llama`'s RMSNorm (and of
Hugging Face's LlamaRMSNorm), so a model switching to this call keeps its bits.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxnvrar.api import ALGORITHMS, all_reduce

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


def _add_and_norm(reduced, residual, weight, eps: float):
    """residual + reduced, and its RMSNorm times weight: exactly the ops (and their order and
    dtypes) of `jaxnvrar.models.llama.RMSNorm` applied to the Llama's residual add."""
    residual_out = residual + reduced  # in the inputs' dtype, as the Llama's `x + attended`
    h32 = residual_out.astype(jnp.float32)
    h32 = h32 * lax.rsqrt(jnp.mean(h32 * h32, axis=-1, keepdims=True) + eps)
    normed = weight * h32.astype(residual_out.dtype)
    return normed.astype(residual_out.dtype), residual_out


def add_rms_norm(x, residual, weight, *, eps: float = 1e-5):
    """`all_reduce_rms_norm` without the all-reduce: ``residual + x`` and its RMSNorm times
    ``weight``, with the same checks and numerics. For a layer whose output needs no reduction
    (one rank, or the Llama's diagnostic all_reduce="none")."""
    x, residual, weight, eps = _checked(x, residual, weight, eps, "jaxnvrar.fused.add_rms_norm")
    return _add_and_norm(x, residual, weight, eps)


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
    add and the norm; "auto" the same with all_reduce's automatic choice; "nvrar" (CUDA GPUs,
    after `jaxnvrar.initialize()`, else it raises naming it) is NOT FUSED YET: it runs the
    kernel's all-reduce and then the add and the norm in XLA, like the others. A kernel that
    does the add and the norm on the reduced data before writing it back is planned; it will
    take the nvrar path here (see the marked place in the source).

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
    if algorithm == "nvrar":
        # ---- THE FUSED KERNEL GOES HERE (issue 16, item 2) -----------------------------------
        # Not fused yet: the kernel's all-reduce, then the add and the norm in XLA. The fused
        # call will replace the two lines below for the calls it takes (weight in x's dtype, the
        # message within the workspace), with a custom_vjp whose backward is the composition's,
        # so that gradients stay equal. "auto", where it picks the kernel, may take it too.
        reduced = all_reduce(x, axis_name, algorithm="nvrar", gpus_per_node=gpus_per_node)
        return _add_and_norm(reduced, residual, weight, eps)
        # ----------------------------------------------------------------------------------------
    reduced = all_reduce(x, axis_name, algorithm=algorithm, gpus_per_node=gpus_per_node)
    return _add_and_norm(reduced, residual, weight, eps)

"""Which all-reduce the row-parallel layers end in: the `all_reduce` choices a model accepts;
`norm_reducer(algorithm)`, the all-reduce + residual add + RMSNorm over the mesh axis `TP` that
ends each attention and MLP block (`jaxnvrar.all_reduce_rms_norm`); and `reducer(algorithm)`,
the plain all-reduce of a choice (the greedy token's table)."""

from __future__ import annotations

from jax import lax

import jaxnvrar
from jaxnvrar.distributed import default_topology
from jaxnvrar.fused import add_rms_norm
from jaxnvrar.runtime import fits_workspace

from .config import TP

ALL_REDUCE_CHOICES = ("auto", "psum", "reference", "nvrar", "none")


def check_all_reduce_choice(all_reduce: str) -> None:
    if all_reduce not in ALL_REDUCE_CHOICES:
        raise ValueError(f"all_reduce must be one of {ALL_REDUCE_CHOICES}, got {all_reduce!r}")


# Messages that algorithm="nvrar" handed to psum because they outgrow the NVSHMEM workspace
# (prefill of a long prompt), as (shape, dtype) per traced call site; benchmarks report them.
psum_fallbacks: list[tuple[tuple[int, ...], str]] = []


def _nvrar_or_psum(partial) -> str:
    """"nvrar" means the kernel: without the runtime the call raises, naming
    jaxnvrar.initialize(). Only with it up may a prefill message (batch x prompt x hidden) that
    outgrows the workspace go to psum (recorded in `psum_fallbacks`); every decode-step message
    takes the kernel."""
    if jaxnvrar.is_initialized():
        topology = default_topology(lax.axis_size(TP))
        if not fits_workspace(partial.size, partial.dtype.itemsize, topology):
            psum_fallbacks.append((tuple(partial.shape), partial.dtype.name))
            return "psum"
    return "nvrar"


def reducer(algorithm: str):
    """The all-reduce over TP of `algorithm` (one of ALL_REDUCE_CHOICES), for use inside shard_map."""
    if algorithm == "none":  # diagnostic: the communication-free bound; the numbers are WRONG
        return lambda partial: partial
    if algorithm != "nvrar":
        return lambda partial: jaxnvrar.all_reduce(partial, TP, algorithm=algorithm)
    return lambda partial: jaxnvrar.all_reduce(partial, TP, algorithm=_nvrar_or_psum(partial))


def norm_reducer(algorithm: str):
    """`reducer`'s fused counterpart: ``(partial, residual, weight, eps) -> (normed, residual_out)``
    with ``residual_out = residual + all_reduce(partial)`` over TP and ``normed`` its RMSNorm
    times ``weight`` (`jaxnvrar.all_reduce_rms_norm`), for use inside shard_map. "none" skips the
    reduction and only adds and normalizes; "nvrar" falls back to psum as `reducer` does."""
    if algorithm == "none":  # diagnostic: the communication-free bound; the numbers are WRONG
        return lambda partial, residual, weight, eps: add_rms_norm(partial, residual, weight, eps=eps)

    def reduce_norm(partial, residual, weight, eps):
        chosen = _nvrar_or_psum(partial) if algorithm == "nvrar" else algorithm
        return jaxnvrar.all_reduce_rms_norm(partial, residual, weight, TP, eps=eps, algorithm=chosen)

    return reduce_norm

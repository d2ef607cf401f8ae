"""Which all-reduce the row-parallel layers end in: the `all_reduce` choices a model accepts,
and `reducer(algorithm)`, the function over the mesh axis `TP` that a choice stands for."""

from __future__ import annotations

from jax import lax

import jaxnvrar
from jaxnvrar.distributed import default_topology
from jaxnvrar.runtime import fits_workspace

from .config import TP

ALL_REDUCE_CHOICES = ("auto", "psum", "reference", "nvrar", "none")


def check_all_reduce_choice(all_reduce: str) -> None:
    if all_reduce not in ALL_REDUCE_CHOICES:
        raise ValueError(f"all_reduce must be one of {ALL_REDUCE_CHOICES}, got {all_reduce!r}")


# Messages that algorithm="nvrar" handed to psum because they outgrow the NVSHMEM workspace
# (prefill of a long prompt), as (shape, dtype) per traced call site; benchmarks report them.
psum_fallbacks: list[tuple[tuple[int, ...], str]] = []


def reducer(algorithm: str):
    """The all-reduce over TP of `algorithm` (one of ALL_REDUCE_CHOICES), for use inside shard_map."""
    if algorithm == "none":  # diagnostic: the communication-free bound; the numbers are WRONG
        return lambda partial: partial
    if algorithm != "nvrar":
        return lambda partial: jaxnvrar.all_reduce(partial, TP, algorithm=algorithm)

    def reduce(partial):
        # "nvrar" means the kernel: without the runtime this raises, naming jaxnvrar.initialize().
        # Only with it up may a prefill message (batch x prompt x hidden) that outgrows the
        # workspace go to psum; every decode-step message takes the kernel.
        if jaxnvrar.is_initialized():
            topology = default_topology(lax.axis_size(TP))
            if not fits_workspace(partial.size, partial.dtype.itemsize, topology):
                psum_fallbacks.append((tuple(partial.shape), partial.dtype.name))
                return jaxnvrar.all_reduce(partial, TP, algorithm="psum")
        return jaxnvrar.all_reduce(partial, TP, algorithm="nvrar")

    return reduce

"""jaxnvrar: a hierarchical all-reduce (NVRAR) for JAX, used like `jax.lax.psum` in `jax.shard_map`."""

from jaxnvrar.api import ALGORITHMS, all_reduce, choose_algorithm, initialize
from jaxnvrar.distributed import initialize_distributed
from jaxnvrar.fused import all_reduce_rms_norm
from jaxnvrar.info import print_environment_info
from jaxnvrar.replace import replace_psum
from jaxnvrar.runtime import cuda_available, finalize, is_initialized, last_timeout
from jaxnvrar.schedule import KernelConfig, Topology

from jaxnvrar.version import __version__

__all__ = [
    "ALGORITHMS",
    "KernelConfig",
    "Topology",
    "all_reduce",
    "all_reduce_rms_norm",
    "choose_algorithm",
    "cuda_available",
    "finalize",
    "initialize",
    "initialize_distributed",
    "is_initialized",
    "last_timeout",
    "print_environment_info",
    "replace_psum",
]

"""Test setup shared by the single-process run and the runs under jaxnvrar-launch.

Single process: 8 virtual CPU devices. Under jaxnvrar-launch (JAXNVRAR_NUM_PROCESSES set):
jax.distributed is initialised first, and on GPUs the NVSHMEM runtime too.
"""

import os

import jax
import pytest

if "JAXNVRAR_NUM_PROCESSES" not in os.environ:
    jax.config.update("jax_num_cpu_devices", int(os.environ.get("JAX_NUM_CPU_DEVICES", "8")))
else:
    # As many CPU devices as ranks: where ranks share a GPU, reference results come from them.
    ranks = max(2, int(os.environ["JAXNVRAR_NUM_PROCESSES"]))
    jax.config.update("jax_num_cpu_devices", int(os.environ.get("JAX_NUM_CPU_DEVICES", str(ranks))))
    import jaxnvrar

    jaxnvrar.initialize_distributed()


def _gpu_ready() -> tuple[bool, str]:
    import jaxnvrar

    if jax.default_backend() != "gpu":
        return False, f"needs CUDA GPUs; the backend here is {jax.default_backend()}"
    if not jaxnvrar.cuda_available():
        return False, "jaxnvrar was built without its CUDA/NVSHMEM part"
    jaxnvrar.initialize()
    return True, ""


def pytest_collection_modifyitems(config, items):
    if not any("gpu" in item.keywords for item in items):
        return
    ready, reason = _gpu_ready()
    if not ready:
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))

"""Test setup shared by the single-process run and the runs under jaxnvrar-launch.

Single process: 8 virtual CPU devices. Under jaxnvrar-launch (JAXNVRAR_NUM_PROCESSES set):
jax.distributed is initialised first (tests/gpu/conftest.py starts NVSHMEM for the GPU suite).
Slow end-to-end tests (marked `slow`: whole suites again in several processes) run with
`pytest --run-slow`, as CI does; the default loop skips them.
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


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the slow end-to-end tests (CI does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: pytest --run-slow runs it")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)

"""The GPU suite (tests/gpu/run.py runs all of it; docs/gpu-testing.md says how by hand).

Tests marked `gpu` run in every rank of `jaxnvrar-launch -n N -- python -m pytest tests/gpu`;
NVSHMEM starts at the first of them, never while collecting. Tests marked `gpu_jobs` start
2-rank jobs of their own, so they run outside the launcher. Each kind skips, with the reason,
where it cannot run: on a machine without GPUs every test here skips.
"""

import os

import pytest


def _why_not_in_process() -> str | None:
    if "JAXNVRAR_NUM_PROCESSES" not in os.environ:
        # Checked before jax touches a GPU: the outer process leaves them to its jobs.
        return "runs one process per GPU: jaxnvrar-launch -n N -- python -m pytest tests/gpu"
    import jax

    import jaxnvrar

    if jax.default_backend() != "gpu":
        return f"needs CUDA GPUs; the backend here is {jax.default_backend()}"
    if not jaxnvrar.cuda_available():
        return "jaxnvrar was built without its CUDA/NVSHMEM part"
    return None


def pytest_collection_modifyitems(config, items):
    in_process = [item for item in items if item.get_closest_marker("gpu")]
    reason = _why_not_in_process() if in_process else None
    for item in in_process if reason else ():
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def nvshmem_runtime():
    import jaxnvrar

    jaxnvrar.initialize()
    yield

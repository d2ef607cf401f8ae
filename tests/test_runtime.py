"""jaxnvrar.initialize() refuses to start in the wrong setting, with a message naming the fix."""

import os
import subprocess
import sys

import jax
import pytest


def _run_fresh(code, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JAXNVRAR_")}
    clean.update(env, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    return subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=300)


def test_initialize_before_jax_distributed_in_a_multi_process_job():
    result = _run_fresh("import jaxnvrar; jaxnvrar.initialize()", JAXNVRAR_NUM_PROCESSES="2")
    assert result.returncode != 0
    assert "before jax.distributed.initialize()" in result.stderr


def test_bad_workspace_size_is_rejected():
    result = _run_fresh("import jaxnvrar; jaxnvrar.initialize()", JAXNVRAR_WORKSPACE_BYTES="lots")
    assert result.returncode != 0 and "JAXNVRAR_WORKSPACE_BYTES='lots'" in result.stderr


def test_finalize_without_initialize_is_a_no_op():
    import jaxnvrar

    if jaxnvrar.is_initialized():
        pytest.skip("the runtime is up in this process")
    jaxnvrar.finalize()
    jaxnvrar.finalize()


@pytest.mark.gpu
def test_several_gpus_in_one_process_are_refused():
    if jax.process_index() != 0:
        pytest.skip("one rank checks this")
    probe = _run_fresh("import jax; print(len(jax.devices()))")
    if probe.returncode != 0 or int(probe.stdout.split()[-1]) < 2:
        pytest.skip("needs a host with 2 or more GPUs")
    result = _run_fresh("import jaxnvrar; jaxnvrar.initialize()")
    assert result.returncode != 0
    assert "exactly one GPU per process" in result.stderr

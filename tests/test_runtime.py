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


@pytest.mark.parametrize("name,value", [("JAXNVRAR_TIMEOUT_S", "soon"), ("JAXNVRAR_TIMEOUT_S", "0"),
                                        ("JAXNVRAR_MAX_BLOCKS", "0"), ("JAXNVRAR_MAX_BLOCKS", "2000"),
                                        ("JAXNVRAR_FIRST_CALL", "-1"), ("JAXNVRAR_WORKSPACE_BYTES", "1000")])
def test_bad_environment_values_are_rejected_by_name(name, value):
    result = _run_fresh("import jaxnvrar; jaxnvrar.initialize()", **{name: value})
    assert result.returncode != 0 and f"{name}={value!r}" in result.stderr, result.stderr[-500:]


def test_initialize_after_finalize_is_refused(monkeypatch):
    import jaxnvrar
    from jaxnvrar import runtime

    if jaxnvrar.is_initialized():
        pytest.skip("the runtime is up in this process")
    monkeypatch.setattr(runtime, "_ever_initialized", True)  # as after initialize() + finalize()
    with pytest.raises(RuntimeError, match="after jaxnvrar.finalize"):
        jaxnvrar.initialize()
    assert runtime.was_finalized()


def test_nvrar_after_finalize_names_the_cause(monkeypatch):
    import jax.numpy as jnp

    import jaxnvrar
    from jaxnvrar import nvrar_ffi, runtime

    if jaxnvrar.is_initialized():
        pytest.skip("the runtime is up in this process")
    monkeypatch.setattr(runtime, "_ever_initialized", True)
    with pytest.raises(RuntimeError, match=r"after jaxnvrar.finalize\(\).*algorithm='psum'"):
        nvrar_ffi.check_can_run(jnp.zeros(8), jaxnvrar.Topology(2, 2))

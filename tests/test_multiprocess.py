"""The all_reduce suite again, in 2 and 4 local processes under jaxnvrar-launch (CPU collectives)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


@pytest.mark.multiprocess
@pytest.mark.parametrize("num_processes", [2, 4])
def test_all_reduce_suite_across_processes(num_processes):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2")
    env.pop("JAXNVRAR_NUM_PROCESSES", None)
    command = [
        sys.executable, "-m", "jaxnvrar.launch", "-n", str(num_processes), "--timeout", "900", "--",
        sys.executable, "-m", "pytest", str(TESTS / "test_all_reduce.py"), "-q", "-x",
        "-p", "no:cacheprovider", "-m", "not gpu",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1000)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    for rank in range(num_processes):
        assert f"[rank {rank}]" in result.stdout and "passed" in result.stdout

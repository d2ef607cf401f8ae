"""The all_reduce suite again, in 2 and 4 local processes under jaxnvrar-launch (CPU collectives)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("num_processes", [2, 4])
def test_all_reduce_suite_across_processes(num_processes):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2")
    env.pop("JAXNVRAR_NUM_PROCESSES", None)
    command = [
        sys.executable, "-m", "jaxnvrar.launcher", "-n", str(num_processes), "--timeout", "900", "--",
        sys.executable, "-m", "pytest", str(TESTS / "test_all_reduce.py"), "-q", "-x",
        "-p", "no:cacheprovider", "-m", "not gpu",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1000)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    for rank in range(num_processes):
        assert f"[rank {rank}]" in result.stdout and "passed" in result.stdout


_SHARED_GPU_JOB = """
import sys
sys.path.insert(0, {tests!r})
import jax, numpy as np
jax.config.update("jax_num_cpu_devices", 1)
import jaxnvrar
jaxnvrar.initialize_distributed()
from helpers import mesh_1d, run_per_rank
from jaxnvrar.distributed import ranks_share_gpus
assert ranks_share_gpus()
host = np.arange(2 * 3_000_001, dtype=np.float32).reshape(2, -1)  # 12 MB a row: several chunks
out = run_per_rank(lambda a: jaxnvrar.all_reduce(a, "x", algorithm="reference", gpus_per_node=1), host, mesh_1d(2))
np.testing.assert_array_equal(out, np.broadcast_to(host.sum(0), host.shape))
from jax._src import distributed
try:  # the rows were deleted from the key-value store once both processes had them
    distributed.global_state.client.key_value_try_get_bytes("tests/gather/0/0/0")
    raise AssertionError("the gathered rows are still in the key-value store")
except Exception as err:
    assert "NOT_FOUND" in str(err) or "not found" in str(err).lower(), err
print("gathered", out.shape)
"""


@pytest.mark.multiprocess
def test_ranks_sharing_a_gpu_gather_results_without_collectives():
    # Under `jaxnvrar-launch --gpus 1` the test helpers gather through the key-value store,
    # since NCCL would refuse ranks on one GPU (here on CPU, the same code path).
    env = dict(os.environ)
    env.pop("JAXNVRAR_NUM_PROCESSES", None)
    command = [sys.executable, "-m", "jaxnvrar.launcher", "-n", "2", "--gpus", "1", "--timeout", "200", "--",
               sys.executable, "-c", _SHARED_GPU_JOB.format(tests=str(TESTS))]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert "[rank 0] gathered (2, 3000001)" in result.stdout and "[rank 1] gathered" in result.stdout



_SOAK_JOB = """
import jax
from jax import lax
import jaxnvrar
from jaxnvrar import bench
# Process 1's ranks get wrong sums (and through the next inputs, so do process 0's later): each
# process counts its own ranks' errors; the report must give their total (through the key-value
# store, not a collective) and each process's part.
jaxnvrar.all_reduce = lambda x, axis, algorithm: lax.psum(x, axis) - jax.process_index()
raise SystemExit(bench.main(["soak", "--calls", "30", "--chunk", "10", "--bytes", "64", "--dtype", "float32"]))
"""


@pytest.mark.multiprocess
def test_soak_sums_every_process_errors():
    import re

    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    env.pop("JAXNVRAR_NUM_PROCESSES", None)
    command = [sys.executable, "-m", "jaxnvrar.launcher", "-n", "2", "--timeout", "200", "--",
               sys.executable, "-c", _SOAK_JOB]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    by_process = re.search(r"\[rank 0\]   by process: 0: (\d+), 1: (\d+)", out)
    total = re.search(r"\[rank 0\] 30 calls of 64 B float32 with reference: (\d+) wrong elements", out)
    assert by_process and total, out[-3000:]
    assert int(by_process.group(2)) > 0 and int(total.group(1)) == int(by_process.group(1)) + int(by_process.group(2))


_REGIONS_JOB = """
import numpy as np
import jaxnvrar
from jaxnvrar import nvrar_ffi
jaxnvrar.initialize_distributed()
import jax
rank = jax.process_index()
# Two groupings of four PEs (rows: each PE's peers), lowered in opposite orders by the two
# processes, and a third one that only process 1 lowers first: every process must give each
# grouping the same region whatever it lowered before, and refuse one too many alike.
over_a = np.array([[0, 2], [1, 3], [0, 2], [1, 3]], np.int32)
over_b = np.array([[0, 1], [0, 1], [2, 3], [2, 3]], np.int32)
whole = np.array([[0, 1, 2, 3]] * 4, np.int32)
order = [("a", over_a), ("b", over_b)] if rank == 0 else [("whole", whole), ("b", over_b), ("a", over_a)]
regions = {name: nvrar_ffi.grouping_region(table, name, available=3) for name, table in order}
jax.experimental.multihost_utils.sync_global_devices("claimed")
regions.update({name: nvrar_ffi.grouping_region(table, name, available=3)
                for name, table in [("a", over_a), ("b", over_b), ("whole", whole)]})
print("regions", sorted(regions.items()))
try:
    nvrar_ffi.grouping_region(np.array([[0, 3], [1, 2], [1, 2], [0, 3]], np.int32), "c", available=3)
except ValueError as err:
    print("refused:", "all 3 workspace regions (JAXNVRAR_GROUPINGS=3) are taken" in str(err))
"""


@pytest.mark.multiprocess
def test_processes_agree_on_grouping_regions_whatever_they_lowered_before():
    import ast
    import re

    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    env.pop("JAXNVRAR_NUM_PROCESSES", None)
    command = [sys.executable, "-m", "jaxnvrar.launcher", "-n", "2", "--timeout", "200", "--",
               sys.executable, "-c", "import jax.experimental.multihost_utils\n" + _REGIONS_JOB]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    found = re.findall(r"\[rank (\d)\] regions (.*)", out)
    assert len(found) == 2 and found[0][1] == found[1][1], out[-3000:]
    regions = dict(ast.literal_eval(found[0][1]))
    assert sorted(regions) == ["a", "b", "whole"] and sorted(regions.values()) == [0, 1, 2], regions
    assert out.count("refused: True") == 2, out[-3000:]

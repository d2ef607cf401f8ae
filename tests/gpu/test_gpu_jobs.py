"""Failure modes and the runtime's lifecycle, each scenario of tests/gpu/gpu_scenarios.py in a
2-rank job of its own (a kernel that traps ends its process). Run on a GPU machine, NOT under
jaxnvrar-launch (tests/gpu/run.py does):

    python -m pytest tests/gpu/test_gpu_jobs.py

With one GPU both ranks share it (`jaxnvrar-launch --gpus 1`; start CUDA MPS first).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from jaxnvrar.distributed import local_gpu_count

pytestmark = pytest.mark.gpu_jobs
SCENARIOS = pathlib.Path(__file__).with_name("gpu_scenarios.py")
TIMEOUT_S = 2.0


def _skip_reason() -> str | None:
    if "JAXNVRAR_NUM_PROCESSES" in os.environ:
        return "starts jobs of its own: run it outside jaxnvrar-launch"
    if local_gpu_count() < 1:  # not through jax: this process leaves the GPUs to its jobs
        return "needs a machine with a GPU"
    try:
        from jaxnvrar import _jaxnvrar_cuda  # noqa: F401
    except ImportError:
        return "jaxnvrar was built without its CUDA/NVSHMEM part"
    return None


@pytest.fixture(autouse=True)
def _needs_gpus():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)


def test_several_gpus_in_one_process_are_refused():
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JAXNVRAR_")}
    clean["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    probe = subprocess.run([sys.executable, "-c", "import jax; print(len(jax.devices()))"], env=clean,
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0 or int(probe.stdout.split()[-1]) < 2:
        pytest.skip("needs a host with 2 or more GPUs")
    result = subprocess.run([sys.executable, "-c", "import jaxnvrar; jaxnvrar.initialize()"], env=clean,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "exactly one GPU per process" in result.stderr


def run_scenario(name: str, **env) -> dict[int, dict]:
    job_env = dict(os.environ, JAXNVRAR_TIMEOUT_S=str(TIMEOUT_S), **env)
    job = subprocess.run(
        [sys.executable, "-m", "jaxnvrar.launcher", "-n", "2", "--gpus", str(min(2, local_gpu_count())),
         "--timeout", "80", "--",
         sys.executable, str(SCENARIOS), name],
        env=job_env, capture_output=True, text=True, timeout=120,
    )
    reports = {}
    for line in job.stdout.splitlines():
        head, _, payload = line.partition(" SCENARIO ")
        if payload:
            reports[int(head.strip("[]").split()[1])] = json.loads(payload)
    assert reports, f"no report; exit {job.returncode}\n{job.stdout[-3000:]}\n{job.stderr[-3000:]}"
    return reports


@pytest.mark.parametrize("launch", [{}, {"JAXNVRAR_ONE_SHOT": "1"}, {"JAXNVRAR_BULK": "1"},
                                    {"JAXNVRAR_GROUPINGS": "2", "SCENARIO_TAKE_REGION_0": "1"},
                                    {"SCENARIO_GPUS_PER_NODE": "1"}],
                         ids=["default", "one-shot", "bulk", "second-region", "two-nodes"])
def test_a_rank_that_skips_a_call_gets_a_timeout_report_not_a_hang(launch):
    reports = run_scenario("skip", **launch)
    waiting = reports[0]
    assert waiting["raised"], waiting
    assert waiting["seconds"] < TIMEOUT_S + 10, waiting
    record = waiting["record"]
    assert record["kind"] == "timeout" and record["peer"] == 1, record
    assert "did every rank make the same calls" in waiting["message"]
    # The report names the axis of the call, by the workspace region the kernel ran in, and the
    # peer's process: a local GPU of the node, or (two nodes of one GPU) the other node.
    region = 1 if "SCENARIO_TAKE_REGION_0" in launch else 0
    assert record["region"] == region, record
    assert f"over axis 'x' (process groups {{0,1}}; workspace region {region})" in waiting["message"], waiting
    if "SCENARIO_GPUS_PER_NODE" in launch:
        assert record["peer_is_node"] and record["phase"] in ("inter-node step", "signature check"), record
        assert "for node 1 (process 1);" in waiting["message"], waiting
    else:
        assert not record["peer_is_node"] and record["phase"] == "intra-node reduce-scatter", record
        assert "for local GPU 1 (process 1);" in waiting["message"], waiting


@pytest.mark.parametrize("scenario", ["size-mismatch", "dtype-mismatch"])
def test_ranks_in_different_calls_report_a_mismatch(scenario):
    reports = run_scenario(scenario)
    for rank, seen in reports.items():
        assert seen["raised"], (rank, seen)
        # "mismatch", not "timeout": the signatures were compared, the watchdog did not fire.
        assert seen["record"]["kind"] == "mismatch", (rank, seen)
        assert seen["seconds"] < TIMEOUT_S + 10, (rank, seen)
        assert "mismatch over axis 'x'" in seen["message"], (rank, seen)
        assert f"local GPU {1 - rank} (process {1 - rank}) with" in seen["message"], (rank, seen)
    expected = "1000 x float32" if scenario == "size-mismatch" else "4096 x float16"
    assert expected in reports[0]["message"], reports[0]["message"]


def test_a_dense_call_against_a_bulk_call_reports_a_mismatch():
    # Dense and bulk use different inboxes: without the signature check neither would see the other.
    reports = run_scenario("dense-mismatch", JAXNVRAR_DENSE_BYTES=str(64 << 20))
    for rank, seen in reports.items():
        assert seen["raised"] and seen["record"]["kind"] == "mismatch", (rank, seen)
        assert seen["seconds"] < TIMEOUT_S + 10, (rank, seen)
    assert "dense" in reports[0]["message"] and "bulk" in reports[0]["message"], reports[0]["message"]


@pytest.mark.parametrize("launch", [{}, {"SCENARIO_GPUS_PER_NODE": "1"}], ids=["one-node", "two-nodes"])
def test_ranks_that_launch_other_grids_time_out_instead_of_summing_other_ranges(launch):
    # The call signature does not hold the grid (a max_blocks overridden on one process only);
    # bulk block b covers another range of chunks on each rank, so its flag words hold the grid:
    # the ranks wait, then report, instead of summing each other's other blocks' data.
    reports = run_scenario("blocks-mismatch", **launch)
    assert all(seen["raised"] for seen in reports.values()), reports  # no rank returned a sum
    timed_out = {rank: seen for rank, seen in reports.items() if seen["record"]}
    # Both wait; on one GPU shared under MPS the first rank's trap also ends the other's context
    # (MPS contains a fault to the GPU's clients), often before its own timeout records.
    assert len(timed_out) == 2 or (timed_out and local_gpu_count() < 2), reports
    for rank, seen in timed_out.items():
        assert seen["record"]["kind"] == "timeout" and seen["seconds"] < TIMEOUT_S + 10, (rank, seen)
        assert "did every rank make the same calls" in seen["message"], (rank, seen)


def test_a_pulled_call_against_a_pushed_one_reports_a_mismatch():
    # The same flags, other places for the slices: without the pull bit in the signature the
    # ranks would sum whatever their inboxes held.
    reports = run_scenario("pull-mismatch")
    for rank, seen in reports.items():
        assert seen["raised"] and seen["record"]["kind"] == "mismatch", (rank, seen)
        assert seen["seconds"] < TIMEOUT_S + 10, (rank, seen)
        # Rank 0 pulled, rank 1 pushed: each record decodes both calls, the peer's from its bits.
        mine, theirs = seen["record"]["mine"], seen["record"]["peer_call"]
        assert (mine["pull"], theirs["pull"]) == ((True, False) if rank == 0 else (False, True)), (rank, seen)
    assert "pulled reduce-scatter" in reports[0]["message"], reports[0]["message"]


@pytest.mark.parametrize("launch", [{}, {"JAXNVRAR_BULK": "1"}], ids=["default", "bulk"])
@pytest.mark.parametrize("start_before_wrap", [6, 7])  # both parities
def test_flags_wrap_around_without_error(start_before_wrap, launch):
    first_call = 2 * 0xFFFFFFFE - start_before_wrap
    reports = run_scenario("wrap", JAXNVRAR_FIRST_CALL=str(first_call), **launch)
    for rank, seen in reports.items():
        assert seen["max_error"] < 1e-5, (rank, seen)


def test_finalize_with_work_in_flight_then_clear_errors():
    reports = run_scenario("finalize-in-flight")
    for rank, seen in reports.items():
        # Every dispatched call finished before the workspace went: (1 + 2) / 2 each time.
        assert seen["values"] == [1.5], (rank, seen)
        assert "after jaxnvrar.finalize()" in seen["errors"]["call"], (rank, seen)
        assert "not supported" in seen["errors"]["initialize"], (rank, seen)

"""jaxnvrar-launch: rank environment, output prefixes, failure and timeout handling."""

import subprocess
import sys
import time

LAUNCH = [sys.executable, "-m", "jaxnvrar.launcher"]


def _run(args, timeout=60):
    return subprocess.run(LAUNCH + args, capture_output=True, text=True, timeout=timeout)


def test_every_rank_runs_with_its_environment():
    code = "import os; print('id', os.environ['JAXNVRAR_PROCESS_ID'], 'of', os.environ['JAXNVRAR_NUM_PROCESSES'])"
    result = _run(["-n", "3", "--", sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
    for rank in range(3):
        assert f"[rank {rank}] id {rank} of 3" in result.stdout


def test_a_failing_rank_stops_the_others_and_is_named():
    code = (
        "import os, sys, time\n"
        "rank = int(os.environ['JAXNVRAR_PROCESS_ID'])\n"
        "print('last words of', rank, flush=True)\n"
        "sys.exit(7) if rank == 1 else time.sleep(60)\n"
    )
    start = time.monotonic()
    result = _run(["-n", "3", "--", sys.executable, "-c", code])
    assert result.returncode == 7
    assert time.monotonic() - start < 30, "the surviving ranks were not stopped promptly"
    assert "rank 1 failed with exit code 7" in result.stderr
    assert "last words of 1" in result.stderr


def test_timeout_stops_everything():
    result = _run(["-n", "2", "--timeout", "1", "--", sys.executable, "-c", "import time; time.sleep(60)"])
    assert result.returncode == 124
    assert "timed out after 1 s" in result.stderr


def test_needs_a_command():
    result = _run(["-n", "2"])
    assert result.returncode == 2 and "command" in result.stderr


def test_benchmarks_relaunch_themselves_one_process_per_gpu(monkeypatch):
    from jaxnvrar import bench, distributed, runtime

    monkeypatch.delenv("JAXNVRAR_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAXNVRAR_NO_RELAUNCH", raising=False)
    monkeypatch.setattr(distributed, "local_gpu_count", lambda: 2)
    monkeypatch.setattr(runtime, "cuda_available", lambda: True)
    again = bench.relaunch_command("decode", ["decode", "--batch", "16"])
    assert again[1:6] == ["-m", "jaxnvrar.launcher", "-n", "2", "--"] and again[-3:] == ["decode", "--batch", "16"]
    assert bench.relaunch_command("gemm", ["gemm"]) is None  # one GPU's benchmark
    monkeypatch.setenv("JAXNVRAR_NO_RELAUNCH", "1")
    assert bench.relaunch_command("decode", ["decode"]) is None
    monkeypatch.delenv("JAXNVRAR_NO_RELAUNCH")
    monkeypatch.setattr(distributed, "local_gpu_count", lambda: 1)
    assert bench.relaunch_command("decode", ["decode"]) is None


def test_gpu_count_follows_cuda_visible_devices(monkeypatch):
    from jaxnvrar.distributed import local_gpu_count

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,3")
    assert local_gpu_count() == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert local_gpu_count() == 0


def test_gpus_option_spreads_ranks_round_robin():
    code = ("import os; print('rank', os.environ['JAXNVRAR_PROCESS_ID'], 'gpu', os.environ['JAXNVRAR_LOCAL_DEVICE'],"
            " 'of', os.environ['JAXNVRAR_GPUS'])")
    result = _run(["-n", "4", "--gpus", "2", "--", sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
    for rank in range(4):
        assert f"[rank {rank}] rank {rank} gpu {rank % 2} of 2" in result.stdout
    default = _run(["-n", "2", "--", sys.executable, "-c", code])
    assert "[rank 1] rank 1 gpu 1 of 2" in default.stdout


def test_gpus_option_must_lie_between_one_and_the_rank_count():
    for bad in ("0", "3"):
        result = _run(["-n", "2", "--gpus", bad, "--", sys.executable, "-c", "pass"])
        assert result.returncode == 2 and "--gpus must be between 1 and the rank count 2" in result.stderr


_JOIN = "import jaxnvrar, jax; jaxnvrar.initialize_distributed(); print('joined', jax.process_count())"


def test_a_coordinator_port_taken_after_it_was_chosen_is_retried(monkeypatch, capfd):
    # Seen on a GPU machine: the port found free was in use a moment later, and jax's RPC
    # server failed to start. The launcher starts the ranks again on another port.
    import socket

    from jaxnvrar import launcher

    blocker = socket.socket()
    blocker.bind(("0.0.0.0", 0))
    blocker.listen()
    choices = iter([blocker.getsockname()[1]])
    choose = launcher.free_port
    monkeypatch.setattr(launcher, "free_port", lambda: next(choices, None) or choose())
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("JAXNVRAR_NUM_PROCESSES", raising=False)
    try:
        code = launcher.run_ranks(2, [sys.executable, "-c", _JOIN], timeout=120)
    finally:
        blocker.close()
    out, err = capfd.readouterr()
    assert code == 0, out[-3000:] + err[-3000:]
    assert "was taken; starting the ranks again on another" in err
    assert "[rank 0] joined 2" in out and "[rank 1] joined 2" in out


def test_chosen_ports_lie_below_the_ephemeral_range():
    from jaxnvrar import launcher

    low, _ = launcher.ephemeral_port_range()
    assert all(1024 <= launcher.free_port() < low for _ in range(20))

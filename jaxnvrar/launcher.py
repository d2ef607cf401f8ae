"""jaxnvrar-launch: run N local ranks of a jax.distributed job, one process each.

    jaxnvrar-launch -n 2 -- python my_script.py

Each rank gets JAXNVRAR_COORDINATOR, JAXNVRAR_NUM_PROCESSES, JAXNVRAR_PROCESS_ID,
JAXNVRAR_LOCAL_RANK and JAXNVRAR_LOCAL_DEVICE (the GPU it uses), which
`jaxnvrar.initialize_distributed()` reads. Rank r uses GPU r, or with `--gpus G` GPU r % G: fewer
GPUs than ranks put several ranks on one GPU, for testing the kernels' logic on a machine with
fewer GPUs (NCCL, hence psum, refuses ranks that share a GPU; start CUDA MPS so that their
kernels run side by side, or they only alternate). Output lines are
prefixed with the rank. If a rank fails, the others are stopped and the launcher exits with
its code, naming it and repeating its last lines; past --timeout every rank is stopped and
the launcher exits 124. Multi-host jobs (Slurm, mpirun) need no launcher: there
`initialize_distributed()` falls back to jax.distributed's own cluster detection.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

from jaxnvrar.distributed import (ENV_COORDINATOR, ENV_GPUS, ENV_LOCAL_DEVICE, ENV_LOCAL_RANK, ENV_NUM_PROCESSES,
                                  ENV_PROCESS_ID)

_TAIL_LINES = 20
_KILL_GRACE_S = 5.0


def ephemeral_port_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = f.read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::", 0))
        return True
    except OSError:  # no IPv6 on this host: only the IPv4 wildcard matters
        return False


def free_port() -> int:
    """A TCP port that is free on the loopback and the wildcard address, chosen BELOW the
    ephemeral range: the kernel never hands such a port to another process's outgoing
    connection, which is how a port found free by binding to port 0 was taken a moment later."""
    low, _ = ephemeral_port_range()
    start = max(1024, low - 12000)
    wildcards = [(socket.AF_INET, "0.0.0.0")] + ([(socket.AF_INET6, "::")] if _has_ipv6() else [])
    for port in random.Random().sample(range(start, low), min(200, low - start)):
        try:
            for family, address in wildcards:
                with socket.socket(family) as s:
                    s.bind((address, port))
            return port
        except OSError:
            continue
    with socket.socket() as s:  # everything below the range is taken: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What jax's coordinator (gRPC) says when its port was taken after all: then the launcher
# retries. The process may crash right after the first line.
_PORT_TAKEN = ("Failed to add port to server", "Failed to start RPC server")
_PORT_RETRIES = 3
_PORT_FAILS_WITHIN_S = 60.0


class _Rank:
    def __init__(self, rank: int, command: list[str], env: dict, lock: threading.Lock):
        self.rank = rank
        self.tail = collections.deque(maxlen=_TAIL_LINES)
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,  # own group: we stop its children too
        )
        self._reader = threading.Thread(target=self._pump, args=(lock,), daemon=True)
        self._reader.start()

    def _pump(self, lock):
        for raw in iter(self.process.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self.tail.append(line)
            with lock:
                print(f"[rank {self.rank}] {line}", flush=True)

    def stop(self, sig=signal.SIGTERM):
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass

    def finish_output(self):
        self._reader.join(timeout=2.0)


def _stop_all(ranks: list[_Rank]) -> None:
    for r in ranks:
        r.stop(signal.SIGTERM)
    deadline = time.monotonic() + _KILL_GRACE_S
    for r in ranks:
        try:
            r.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.stop(signal.SIGKILL)
            r.process.wait()


def run_ranks(num_processes: int, command: list[str], *, timeout: float, port: int | None = None,
              gpus: int | None = None) -> int:
    """Runs `command` as ranks 0..num_processes-1; rank r on GPU r % gpus (default: GPU r).
    Where no port was given and the chosen one turns out taken, starts them again on another."""
    deadline = time.monotonic() + timeout  # one --timeout for all attempts
    for attempt in range(1, _PORT_RETRIES + 1):
        chosen, started = port or free_port(), time.monotonic()
        code, failed = _run_once(num_processes, command, deadline=deadline, timeout=timeout, port=chosen,
                                 gpus=gpus or num_processes)
        # Only a failure at start-up is retried: a job that ran for a while is not run again.
        port_taken = (failed is not None and time.monotonic() - started < _PORT_FAILS_WITHIN_S
                      and any(m in line for line in failed.tail for m in _PORT_TAKEN))
        if port is not None or not port_taken or attempt == _PORT_RETRIES:
            return code
        print(f"jaxnvrar-launch: the coordinator port {chosen} was taken; starting the ranks again on another",
              file=sys.stderr, flush=True)
    return code


def _run_once(num_processes: int, command: list[str], *, deadline: float, timeout: float, port: int, gpus: int):
    """(exit code, the rank that failed or None)."""
    env = dict(os.environ)
    env[ENV_COORDINATOR] = f"127.0.0.1:{port}"
    env[ENV_NUM_PROCESSES] = str(num_processes)
    env[ENV_GPUS] = str(gpus)
    env["PYTHONUNBUFFERED"] = "1"
    lock = threading.Lock()
    ranks = []
    for rank in range(num_processes):
        rank_env = dict(env, **{ENV_PROCESS_ID: str(rank), ENV_LOCAL_RANK: str(rank),
                                ENV_LOCAL_DEVICE: str(rank % gpus)})
        ranks.append(_Rank(rank, command, rank_env, lock))

    failed = None
    try:
        while True:
            codes = [r.process.poll() for r in ranks]
            failed = next((r for r, c in zip(ranks, codes) if c not in (None, 0)), None)
            if failed is not None or all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                _stop_all(ranks)
                for r in ranks:
                    r.finish_output()
                print(f"jaxnvrar-launch: timed out after {timeout:g} s; stopped all {num_processes} ranks",
                      file=sys.stderr, flush=True)
                return 124, None
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop_all(ranks)
        return 130, None
    if failed is None:
        for r in ranks:
            r.finish_output()
        return 0, None
    code = failed.process.returncode
    _stop_all(ranks)
    for r in ranks:
        r.finish_output()
    tail = "\n".join(f"    {line}" for line in failed.tail)
    print(
        f"jaxnvrar-launch: rank {failed.rank} failed with exit code {code}; stopped the other ranks. "
        f"Its last lines:\n{tail}",
        file=sys.stderr, flush=True,
    )
    return (code if code > 0 else 128 - code), failed  # a signal -s becomes 128 + s, as shells report it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="jaxnvrar-launch", description="Run N local ranks of a jax.distributed job.",
        usage="jaxnvrar-launch -n N [--timeout S] -- command [args...]",
    )
    parser.add_argument("-n", "--num-processes", type=int, required=True, help="ranks to start")
    parser.add_argument("--timeout", type=float, default=1800.0, help="stop every rank after S seconds")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--gpus", type=int, default=None,
                        help="spread the ranks over G GPUs, rank r on GPU r %% G (default: one GPU per rank). "
                             "Fewer GPUs than ranks is for testing only: psum (NCCL) refuses ranks that share "
                             "a GPU, and their kernels run side by side only under CUDA MPS")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="command to run on every rank")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    if args.num_processes < 1:
        parser.error(f"-n must be at least 1, got {args.num_processes}")
    if args.gpus is not None and not 1 <= args.gpus <= args.num_processes:
        parser.error(f"--gpus must be between 1 and the rank count {args.num_processes}, got {args.gpus}")
    return run_ranks(args.num_processes, command, timeout=args.timeout, port=args.port, gpus=args.gpus)


if __name__ == "__main__":
    sys.exit(main())

"""The whole GPU suite in one command, on a machine with 2 or more GPUs:

    python tests/gpu/run.py [--gpus N] [--logs DIR] [--only PART,...] [-- extra pytest arguments]

1. the kernel tests in N ranks (one process per GPU, under jaxnvrar-launch);
2. the same with JAXNVRAR_FORCE_PUT=1 (the inter-node phase through NVSHMEM puts);
3. the failure-mode and lifecycle jobs (outside the launcher: they start jobs of their own);
4. the decode step's fused attention kernel against XLA's ops, in N ranks (no peers needed:
   `--gpus 1 --only attention` on one GPU).

Each part's output goes to DIR/<part>.log (default: printed); exits non-zero if any part failed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def parts(gpus: int, extra: list[str]) -> list[tuple[str, list[str], dict]]:
    def in_ranks_of(test_file: str) -> list[str]:
        return [sys.executable, "-m", "jaxnvrar.launcher", "-n", str(gpus), "--timeout", "1500", "--",
                sys.executable, "-m", "pytest", str(HERE / test_file), "-x", "-q", "-p", "no:cacheprovider", *extra]
    in_ranks = in_ranks_of("test_gpu_nvrar.py")
    # Every program replays as a command buffer (CUDA graph), however small; a workspace that
    # holds the 64 MB cases (unless the caller set one).
    graphs = {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_graph_min_graph_size=1").strip(),
              # 4 groupings of 1 GiB from 4 ranks on: the 64 MB cases need 512 MiB + 2 KiB each
              "JAXNVRAR_WORKSPACE_BYTES": os.environ.get("JAXNVRAR_WORKSPACE_BYTES", str((4 if gpus >= 4 else 2) << 30)),
              # 4+ ranks: 2-D meshes of processes, all-reduces over both axes (each grouping its region)
              "JAXNVRAR_GROUPINGS": os.environ.get("JAXNVRAR_GROUPINGS", "4" if gpus >= 4 else "1"),
              "JAXNVRAR_FUSED_NORM": "1",  # the fused all-reduce + RMSNorm kernel is opt-in, and so is
              "JAXNVRAR_DENSE_BYTES": os.environ.get("JAXNVRAR_DENSE_BYTES", str(64 << 20))}  # the dense one
    return [
        ("kernel", in_ranks, graphs),
        ("kernel_force_put", in_ranks, dict(graphs, JAXNVRAR_FORCE_PUT="1")),
        ("jobs", [sys.executable, "-m", "pytest", str(HERE / "test_gpu_jobs.py"), "-q", "-p", "no:cacheprovider",
                  *extra], {}),
        ("attention", in_ranks_of("test_gpu_attention.py"), graphs),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=2, help="ranks (one GPU each) of the kernel tests (2)")
    parser.add_argument("--logs", type=pathlib.Path, default=None, help="write each part's output here")
    parser.add_argument("--only", default=None, help="comma-separated parts to run (kernel,kernel_force_put,jobs,attention)")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more pytest arguments")
    args = parser.parse_args(argv)
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    chosen = parts(args.gpus, extra)
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {name for name, _, _ in chosen}
        if unknown:
            parser.error(f"--only: unknown part(s) {sorted(unknown)}")
        chosen = [part for part in chosen if part[0] in wanted]
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    failed = []
    for name, command, env in chosen:
        start = time.monotonic()
        log = open(args.logs / f"{name}.log", "w") if args.logs else None
        result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, **env), stdout=log or None,
                                stderr=subprocess.STDOUT if log else None)
        if log:
            log.close()
        status = "passed" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
        print(f"tests/gpu/run.py: {name}: {status} in {time.monotonic() - start:.0f} s", flush=True)
        if result.returncode != 0:
            failed.append(name)
    print(f"tests/gpu/run.py: {len(chosen) - len(failed)} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

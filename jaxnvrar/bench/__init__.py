"""jaxnvrar-bench: the project's benchmarks.

    jaxnvrar-bench allreduce [--min-bytes 8K --max-bytes 8M ...]  latency per algorithm and size
    jaxnvrar-bench decode [--preset llama3.1-8b --batch 1,16 ...] Llama decode step per algorithm
    jaxnvrar-bench model --fit sweep.json [--network ndr]         cost-model projection to 64 nodes
    jaxnvrar-bench gemm [-m 512 -k 8192 -n 28672]                 GEMM speed when M or K is split
    jaxnvrar-bench soak [--calls 100000 --bytes 128K]             consecutive calls, each checked
    jaxnvrar-bench tune [--max-bytes 64M --kernel-configs 32,128] measure and save "auto"'s choices
    jaxnvrar-bench kernels [--preset llama3.1-8b --batch 1,16]    kernels per decode layer (compiled, no GPU needed)
    jaxnvrar-bench attention [--preset llama3.1-8b --batch 1,16]  decode attention alone: XLA's ops vs the fused kernel

On a GPU machine each process drives one GPU: started alone on a host with several GPUs, the
multi-GPU benchmarks start themselves again under jaxnvrar-launch, one process per GPU
(JAXNVRAR_NO_RELAUNCH=1 prevents it).
"""

from __future__ import annotations

import argparse
import sys


_MULTI_GPU = ("allreduce", "decode", "soak", "tune")


def relaunch_command(command: str, argv: list[str]) -> list[str] | None:
    """The same benchmark under jaxnvrar-launch, one process per GPU, when this process was
    started alone on a host with several GPUs; else None."""
    import os

    from jaxnvrar.distributed import ENV_NUM_PROCESSES, local_gpu_count, looks_like_multi_process_job
    from jaxnvrar.runtime import cuda_available

    if (command not in _MULTI_GPU or ENV_NUM_PROCESSES in os.environ or os.environ.get("JAXNVRAR_NO_RELAUNCH") == "1"
            or looks_like_multi_process_job()):
        return None
    gpus = local_gpu_count()
    if gpus < 2 or not cuda_available():
        return None
    return [sys.executable, "-m", "jaxnvrar.launcher", "-n", str(gpus), "--",
            sys.executable, "-m", "jaxnvrar.bench", *argv]


def build_parser() -> argparse.ArgumentParser:
    """The command line of every benchmark (parsing it runs nothing)."""
    from jaxnvrar.bench import allreduce, attention, decode, gemm, kernels, model, soak, tune

    parser = argparse.ArgumentParser(prog="jaxnvrar-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    allreduce.add_arguments(commands.add_parser("allreduce", help="all-reduce latency sweep"))
    decode.add_arguments(commands.add_parser("decode", help="tensor-parallel Llama decode latency"))
    model.add_arguments(commands.add_parser("model", help="alpha-beta projection of ring/tree vs NVRAR"))
    gemm.add_arguments(commands.add_parser("gemm", help="GEMM speed when M (pipeline) or K (tensor) is split"))
    soak.add_arguments(commands.add_parser("soak", help="many consecutive all-reduces, every result checked"))
    tune.add_arguments(commands.add_parser("tune", help="measure the best kernel configuration and algorithm per size"))
    kernels.add_arguments(commands.add_parser("kernels", help="kernels per layer of the compiled decode step"))
    attention.add_arguments(commands.add_parser("attention", help="the decode step's attention alone, XLA's ops vs the kernel"))
    return parser


def main(argv: list[str] | None = None) -> int:
    from jaxnvrar.bench import allreduce, attention, decode, gemm, kernels, model, soak, tune

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    again = relaunch_command(args.command, argv)
    if again is not None:
        import subprocess

        print(f"jaxnvrar-bench: one process per GPU: {' '.join(again)}", file=sys.stderr, flush=True)
        return subprocess.call(again)
    runs = {"allreduce": allreduce.run, "decode": decode.run, "model": model.run, "gemm": gemm.run, "soak": soak.run, "tune": tune.run,
            "kernels": kernels.run, "attention": attention.run}
    return runs[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

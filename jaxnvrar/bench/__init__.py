"""jaxnvrar-bench: the project's benchmarks.

    jaxnvrar-bench allreduce [--min-bytes 8K --max-bytes 8M ...]   latency per algorithm and size
    jaxnvrar-bench decode [--preset llama3.1-8b --batch 1,16 ...]  Llama decode step per algorithm
    jaxnvrar-bench model --fit sweep.json [--network ndr]          cost-model projection to 64 nodes
    jaxnvrar-bench gemm [-m 512 -k 8192 -n 28672]                  GEMM speed when M or K is split
    jaxnvrar-bench soak [--calls 100000 --bytes 128K]              consecutive calls, each checked
    jaxnvrar-bench tune [--max-bytes 64M --blocks 16,32,64,128]    measure and save "auto"'s choices

On a GPU machine run one process per GPU: jaxnvrar-launch -n 2 -- jaxnvrar-bench allreduce.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from jaxnvrar.bench import allreduce, decode, gemm, model, soak, tune

    parser = argparse.ArgumentParser(prog="jaxnvrar-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    allreduce.add_arguments(commands.add_parser("allreduce", help="all-reduce latency sweep"))
    decode.add_arguments(commands.add_parser("decode", help="tensor-parallel Llama decode latency"))
    model.add_arguments(commands.add_parser("model", help="alpha-beta projection of ring/tree vs NVRAR"))
    gemm.add_arguments(commands.add_parser("gemm", help="GEMM speed when M (pipeline) or K (tensor) is split"))
    soak.add_arguments(commands.add_parser("soak", help="many consecutive all-reduces, every result checked"))
    tune.add_arguments(commands.add_parser("tune", help="measure the best launch width and algorithm per size"))
    args = parser.parse_args(argv)
    runs = {"allreduce": allreduce.run, "decode": decode.run, "model": model.run, "gemm": gemm.run, "soak": soak.run, "tune": tune.run}
    return runs[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

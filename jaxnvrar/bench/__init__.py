"""jaxnvrar-bench: the project's benchmarks.

    jaxnvrar-bench allreduce [--min-bytes 8K --max-bytes 8M ...]   latency per algorithm and size

On a GPU machine run one process per GPU: jaxnvrar-launch -n 2 -- jaxnvrar-bench allreduce.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from jaxnvrar.bench import allreduce

    parser = argparse.ArgumentParser(prog="jaxnvrar-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    allreduce.add_arguments(commands.add_parser("allreduce", help="all-reduce latency sweep"))
    args = parser.parse_args(argv)
    return {"allreduce": allreduce.run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

"""jaxnvrar-bench tune: measure psum and the kernel at several launch widths per size bucket,
and write the winners to the tuning table that "auto" and the kernel's launch read (see
jaxnvrar/tuning.py). Run once per machine type, topology and dtype, under jaxnvrar-launch:

    jaxnvrar-launch -n 2 -- jaxnvrar-bench tune --max-bytes 64M
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jaxnvrar
from jaxnvrar import tuning
from jaxnvrar.bench.allreduce import _DTYPES, _sizes, measure, parse_bytes
from jaxnvrar.bench.setup import bring_up, is_printer
from jaxnvrar.nvrar_ffi import fits_workspace
from jaxnvrar.runtime import default_topology
from jaxnvrar.schedule import Topology


def add_arguments(parser) -> None:
    parser.add_argument("--min-bytes", type=parse_bytes, default=8 << 10, help="smallest message (8K)")
    parser.add_argument("--max-bytes", type=parse_bytes, default=64 << 20, help="largest message (64M)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--blocks", default="16,32,64,128", help="launch widths to try (16,32,64,128)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="ranks per node (default: per host)")
    parser.add_argument("--chain", type=int, default=16, help="all-reduces per timed program (16)")
    parser.add_argument("--iters", type=int, default=30, help="executions per timed batch (30)")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches; the median counts (3)")
    parser.add_argument("--output", default=None, help=f"table file (default ${tuning.TUNING_FILE_ENV} or "
                                                       "~/.cache/jaxnvrar/tuning.json); entries are merged")


def run(args) -> int:
    description = bring_up()
    if not jaxnvrar.is_initialized():
        raise SystemExit("jaxnvrar-bench tune measures the CUDA kernel: run it on GPUs, one process per GPU "
                         "(jaxnvrar-launch -n N -- jaxnvrar-bench tune)")
    dtype = _DTYPES[args.dtype]
    itemsize = jnp.dtype(dtype).itemsize
    num_ranks = jax.device_count()
    mesh = jax.make_mesh((num_ranks,), ("x",))
    topology = Topology(num_ranks, args.gpus_per_node) if args.gpus_per_node else default_topology(num_ranks)
    key = tuning.entry_key(jax.devices()[0].device_kind, topology, args.dtype)
    table = tuning.Table.load(args.output)
    blocks = [int(b) for b in args.blocks.split(",")]
    timing = dict(chain=args.chain, iters=args.iters, repeats=args.repeats, gpus_per_node=args.gpus_per_node)
    if is_printer():
        print(f"# jaxnvrar-bench tune: {description}; {key}")
        print(f"{'size(B)':>10} {'psum us':>9} " + " ".join(f"{'nvrar/' + str(b):>10}" for b in blocks)
              + f" {'choice':>12}", flush=True)
    try:
        for nbytes in _sizes(args.min_bytes, args.max_bytes, 2, itemsize):
            count = nbytes // itemsize
            if not fits_workspace(count, itemsize, topology):
                break
            psum_us = measure(mesh, "psum", count, dtype, **timing)[0]
            by_blocks = {}
            for b in blocks:
                jaxnvrar.runtime.set_max_blocks(b)
                by_blocks[b] = measure(mesh, "nvrar", count, dtype, **timing)[0]
            choice = table.record(key, nbytes, psum_us=psum_us, nvrar_us_by_blocks=by_blocks)
            if is_printer():
                print(f"{nbytes:>10} {psum_us:>9.2f} " + " ".join(f"{by_blocks[b]:>10.2f}" for b in blocks)
                      + f" {choice.algorithm + '/' + str(choice.max_blocks):>12}", flush=True)
    finally:
        jaxnvrar.runtime.set_max_blocks(None)
    tuning.use(table)  # this process; the others load the file at their next initialize()
    if is_printer():
        print(f"wrote {table.save(args.output)}")
    return 0

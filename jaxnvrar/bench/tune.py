"""jaxnvrar-bench tune: measure psum and the kernel in several configurations per size bucket
(widths and, as variants, bulk, pull and on one node one-shot, both, and dense), and write the
winners to the tuning table that "auto" and the kernel configuration read (see jaxnvrar/tuning.py). A configuration
whose result disagrees with psum is reported and never chosen. Run once per machine type, topology and dtype, under jaxnvrar-launch:

    jaxnvrar-launch -n 2 -- jaxnvrar-bench tune --max-bytes 64M
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jaxnvrar
from jaxnvrar import runtime, tuning
from jaxnvrar.bench.allreduce import (DTYPES, max_error_against_psum, measure, message_sizes, parse_bytes,
                                      parse_kernel_configs)
from jaxnvrar.bench.setup import bring_up, is_printer
from jaxnvrar.distributed import default_topology, gather_from_processes
from jaxnvrar.runtime import fits_workspace
from jaxnvrar.schedule import KernelConfig, Topology, dense_fits, one_shot_possible


def add_arguments(parser) -> None:
    parser.add_argument("--min-bytes", type=parse_bytes, default=8 << 10, help="smallest message (8K)")
    parser.add_argument("--max-bytes", type=parse_bytes, default=64 << 20, help="largest message (64M)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--kernel-configs", "--launches", dest="kernel_configs", default="32,128",
                        help="kernel configurations to try, each BLOCKS[-1shot][-bulk|-dense|-pull] "
                             "(32,128; each width is also tried bulk, pull where a node has several GPUs, and on "
                             "one node one-shot, both, and, with JAXNVRAR_DENSE_BYTES set, dense, unless "
                             "--no-variants)")
    parser.add_argument("--no-variants", action="store_true", help="try only the configurations given")
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
    dtype = DTYPES[args.dtype]
    itemsize = jnp.dtype(dtype).itemsize
    num_ranks = jax.device_count()
    mesh = jax.make_mesh((num_ranks,), ("x",))
    topology = Topology(num_ranks, args.gpus_per_node) if args.gpus_per_node else default_topology(num_ranks)
    key = tuning.entry_key(jax.devices()[0].device_kind, topology, args.dtype)
    table = tuning.Table.load(args.output)
    configs = parse_kernel_configs(args.kernel_configs, topology, "tune --kernel-configs")
    if not args.no_variants:
        one_shots = (False, True) if one_shot_possible(topology) else (False,)
        variants = [KernelConfig(c.max_blocks, one_shot, bulk) for c in configs for one_shot in one_shots
                    for bulk in (False, True)]
        if topology.gpus_per_node > 1:  # pull: the reduce-scatter reads peers of the node
            variants += [KernelConfig(c.max_blocks, one_shot, True, pull=True) for c in configs
                         for one_shot in one_shots]
        if one_shot_possible(topology) and tuning.dense_inboxes():  # dense: opt-in (JAXNVRAR_DENSE_BYTES)
            variants += [KernelConfig(c.max_blocks, one_shot, True, True) for c in configs for one_shot in one_shots]
        configs = list(dict.fromkeys(configs + variants))
    timing = dict(chain=args.chain, iters=args.iters, repeats=args.repeats, gpus_per_node=args.gpus_per_node)
    if is_printer():
        print(f"# jaxnvrar-bench tune: {description}; {key}")
        print(f"{'size(B)':>10} {'psum us':>9} " + " ".join(f"{'nvrar/' + c.label:>14}" for c in configs)
              + f" {'choice':>18}", flush=True)
    # Bad results show as "wrong" and are left out; a tolerance of a few roundings of the sum.
    tolerance = 8 * float(jnp.finfo(dtype).eps) * num_ranks
    for nbytes in message_sizes(args.min_bytes, args.max_bytes, 2, itemsize):
        count = nbytes // itemsize
        if not fits_workspace(count, itemsize, topology):
            break
        psum_us = measure(mesh, "psum", count, dtype, **timing)[0]
        by_config, cells = {}, []
        for config in configs:
            algorithm = f"nvrar/{config.label}"
            if not fits_workspace(count, itemsize, topology, config) or (  # it would run as the default one
                    config.dense and not dense_fits(count, itemsize, topology.gpus_per_node, config.one_shot,
                                                    runtime.settings().dense_bytes)):  # ... or as bulk
                cells.append(f"{'n/a':>14}")
                continue
            error = max_error_against_psum(mesh, algorithm, count, dtype, gpus_per_node=args.gpus_per_node)
            if error > tolerance:
                cells.append(f"{'wrong':>14}")
                if is_printer():
                    print(f"# nvrar/{config.label} at {nbytes} B: error {error:.3g} against psum; not chosen",
                          flush=True)
                continue
            by_config[config] = measure(mesh, algorithm, count, dtype, **timing)[0]
            cells.append(f"{by_config[config]:>14.2f}")
        if not by_config:
            raise SystemExit(f"jaxnvrar-bench tune: no kernel configuration gave psum's result at {nbytes} B; "
                             "table not written")
        choice = table.record(key, nbytes, psum_us=psum_us, nvrar_us_by_config=by_config)
        if is_printer():
            chosen = "psum" if choice.algorithm == "psum" else "nvrar/" + choice.config.label
            print(f"{nbytes:>10} {psum_us:>9.2f} " + " ".join(cells) + f" {chosen:>18}", flush=True)
    # Process 0's table on every process (each measured its own times): programs lowered after
    # this in the job must choose alike. Other jobs load the file at initialize().
    tuning.use(tuning.Table.from_json(gather_from_processes(table.to_json())[0], "process 0's tuning table"))
    if is_printer():
        print(f"wrote {table.save(args.output)}")
    return 0

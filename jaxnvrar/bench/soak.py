"""Soak: many consecutive all-reduces in one long-running program, every result checked.

Call i gives each rank the value rank + 1 + (i mod 5); it must return the exact sum
P(P+1)/2 + P (i mod 5) (small integers are exact in every dtype). Consecutive calls, and calls
two apart (which share a half of the workspace), expect different sums, so a stale result is
counted as well as a wrong one; the next call's input is derived from the output, so the calls
stay dependent. Reports errors (counted per rank and summed through jax.distributed's key-value
store, so no collective is needed: it runs where ranks share a GPU), calls per second and the
time of each chunk of calls, first against last (drift).

Several sizes (`--bytes 64K,1M`, `--random-sizes N`) take turns chunk by chunk, each its own
program, so that calls of different sizes follow each other through the same workspace;
`--kernel-config` pins the kernel (e.g. 128-1shot-bulk) instead of the tuning table's choice.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnvrar
from jaxnvrar.bench.allreduce import DTYPES, parse_bytes, parse_kernel_configs
from jaxnvrar.bench.setup import bring_up, is_printer, progress
from jaxnvrar.distributed import default_topology, gather_from_processes
from jaxnvrar import runtime
from jaxnvrar.schedule import KernelConfig
from jaxnvrar.tuning import kernel_config_override


def add_arguments(parser) -> None:
    parser.add_argument("--calls", type=int, default=None,
                        help="all-reduces in all (100000 on GPUs; 500 on CPU, where a call takes milliseconds)")
    parser.add_argument("--chunk", type=int, default=None, help="calls per jitted loop execution (1000 GPU, 50 CPU)")
    parser.add_argument("--bytes", type=_parse_sizes, default=[128 << 10],
                        help="message size(s), comma-separated (128K); sizes take turns chunk by chunk")
    parser.add_argument("--random-sizes", type=int, default=0, metavar="N",
                        help="also N random sizes (whole elements, seed 0) up to the largest --bytes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--algorithm", default=None, help="nvrar where available, else reference")
    parser.add_argument("--kernel-config", default=None, metavar="LABEL",
                        help="pin nvrar's kernel configuration, e.g. 128-1shot-bulk (default: the tuning table's)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")


def _parse_sizes(text: str) -> list[int]:
    sizes = [parse_bytes(part) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected sizes in bytes like 128K or 64K,1M, got {text!r}")
    return sizes


def message_sizes(args, itemsize: int) -> list[int]:
    """Element counts: --bytes, then --random-sizes more, drawn up to the largest."""
    counts = [max(1, b // itemsize) for b in args.bytes]
    if args.random_sizes:
        rng = np.random.default_rng(0)
        counts += [int(c) for c in rng.integers(1, max(counts) + 1, size=args.random_sizes)]
    return counts


def soak_program(mesh, algorithm: str, chunk: int):
    num_ranks = mesh.devices.size
    total = num_ranks * (num_ranks + 1) // 2

    def body(x):
        mine = x  # rank + 1 everywhere
        shift = lambda i: (jnp.asarray(i) % 5).astype(x.dtype)  # noqa: E731

        def one_call(i, carry):
            value, errors = carry
            summed = jaxnvrar.all_reduce(value, "x", algorithm=algorithm)
            expected = total + num_ranks * shift(i)
            errors = errors + jnp.sum(summed != expected, dtype=jnp.int32)
            # The next input through the result, so the next call depends on this one.
            return lax.pcast(summed - expected, "x", to="varying") + mine + shift(i + 1), errors

        _, errors = lax.fori_loop(0, chunk, one_call, (x + shift(0), jnp.zeros((), jnp.int32)))
        # Each rank's own count (summed on the host, not by a collective: psum cannot run where
        # ranks share a GPU, and the all-reduce under test should not count its own errors).
        return errors[None]

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))


def local_errors(counts: jax.Array) -> int:
    """This process's ranks' error counts, summed."""
    return sum(int(np.asarray(shard.data).sum()) for shard in counts.addressable_shards)


def run(args) -> int:
    description = bring_up(timed=False)
    algorithm = args.algorithm or ("nvrar" if jaxnvrar.is_initialized() else "reference")
    dtype = DTYPES[args.dtype]
    itemsize = jnp.dtype(dtype).itemsize
    num_ranks = jax.device_count()
    mesh = jax.make_mesh((num_ranks,), ("x",))
    counts = message_sizes(args, itemsize)
    on_gpu = jax.default_backend() == "gpu"
    calls = args.calls or (100_000 if on_gpu else 500)
    chunk = args.chunk or (1000 if on_gpu else 50)
    chunks = max(len(counts), calls // chunk)
    try:
        pinned = KernelConfig.parse(args.kernel_config) if args.kernel_config else None
    except ValueError as err:
        raise SystemExit(f"jaxnvrar-bench soak --kernel-config: {err}") from None
    if pinned and algorithm != "nvrar":
        raise SystemExit(f"jaxnvrar-bench soak --kernel-config: it pins nvrar's kernel, but this run uses "
                         f"{algorithm} (nvrar needs GPUs, the CUDA build and jaxnvrar-launch)")
    if pinned:  # the dense inboxes, and a configuration the topology would run as another
        pinned, = parse_kernel_configs(args.kernel_config, default_topology(num_ranks), "soak --kernel-config")
    with kernel_config_override(pinned) if pinned else contextlib.nullcontext(), jax.set_mesh(mesh):
        programs, inputs, errors_by_size = [], [], []
        for count in counts:  # one program per size, each compiled and warmed up (checked, not timed)
            ranks = np.repeat(np.arange(1, num_ranks + 1), count).astype(jnp.dtype(dtype))
            inputs.append(jax.make_array_from_callback(ranks.shape, NamedSharding(mesh, P("x")),
                                                       lambda i, ranks=ranks: ranks[i]))
            programs.append(soak_program(mesh, algorithm, chunk))
            # The first calls of a size (a fresh region, the first parity) are the likeliest to
            # go wrong: their errors count too.
            errors_by_size.append(local_errors(programs[-1](inputs[-1])))
        times = []
        dense_before = runtime.dense_calls() if algorithm == "nvrar" else 0  # after the warm-ups
        start = time.perf_counter()
        for done in range(1, chunks + 1):
            k = (done - 1) % len(counts)
            t = time.perf_counter()
            errors_by_size[k] += local_errors(programs[k](inputs[k]))  # waits: each chunk is timed on its own
            times.append(time.perf_counter() - t)
            progress(f"{algorithm}, {sum(errors_by_size)} wrong so far on this process's ranks", done, chunks)
        elapsed = time.perf_counter() - start
    by_process = gather_from_processes(errors_by_size)
    errors_by_size = [sum(counts) for counts in zip(*by_process)]
    # Calls of the dense kernel on this GPU (a dense site falls back to bulk where a message
    # outgrows the inboxes): a dense soak that ran none has not tested it.
    dense_calls = runtime.dense_calls() - dense_before if algorithm == "nvrar" else 0
    calls = chunks * chunk
    errors = sum(errors_by_size)
    first, last = np.median(times[: max(1, chunks // 10)]), np.median(times[-max(1, chunks // 10):])
    sizes_bytes = [c * itemsize for c in counts]
    result = {"devices": description, "algorithm": algorithm, "dtype": args.dtype,
              "kernel_config": pinned.label if pinned else None, "bytes": sizes_bytes,
              "errors_by_size": dict(zip(map(str, sizes_bytes), errors_by_size)),
              "errors_by_process": [sum(counts) for counts in by_process], "dense_calls": dense_calls,
              "calls": calls, "warmup_calls": len(counts) * chunk, "errors": errors, "seconds": elapsed,
              "us_per_call": elapsed / calls * 1e6,
              "first_tenth_chunk_ms": first * 1e3, "last_tenth_chunk_ms": last * 1e3}
    if is_printer():
        print(f"# jaxnvrar-bench soak: {description}")
        what = f"{sizes_bytes[0]} B" if len(counts) == 1 else f"{len(counts)} sizes ({min(sizes_bytes)}-{max(sizes_bytes)} B)"
        kernel = f" ({pinned.label})" if pinned else ""
        print(f"{calls} calls of {what} {args.dtype} with {algorithm}{kernel}: {errors} wrong elements "
              f"(with {len(counts) * chunk} untimed warm-up calls, checked too), "
              f"{elapsed:.2f} s ({result['us_per_call']:.2f} us/call); chunk of {chunk}: "
              f"{result['first_tenth_chunk_ms']:.2f} ms in the first tenth, {result['last_tenth_chunk_ms']:.2f} ms "
              "in the last (median)")
        if pinned and pinned.dense:
            print(f"  dense kernel calls on rank {jax.process_index()}'s GPU: {dense_calls} of {calls} (larger "
                  "messages than its inboxes run bulk)")
        for size, wrong in zip(sizes_bytes, errors_by_size):
            if wrong:
                print(f"  {size} B: {wrong} wrong elements")
        if errors and len(by_process) > 1:
            print("  by process: " + ", ".join(f"{i}: {sum(counts)}" for i, counts in enumerate(by_process)))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    if pinned and pinned.dense and dense_calls == 0:
        print("jaxnvrar-bench soak: the dense kernel never ran (every message outgrew its inboxes?)", file=sys.stderr)
        return 1
    return 1 if errors else 0

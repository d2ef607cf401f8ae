"""Soak: many consecutive all-reduces in one long-running program, every result checked.

Call i gives each rank the value rank + 1 + (i mod 5); it must return the exact sum
P(P+1)/2 + P (i mod 5) (small integers are exact in every dtype). Consecutive calls, and calls
two apart (which share a half of the workspace), expect different sums, so a stale result is
counted as well as a wrong one; the next call's input is derived from the output, so the calls
stay dependent. Reports errors, calls
per second and the time of each chunk of calls, first against last (drift).
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnvrar
from jaxnvrar.bench.allreduce import DTYPES, parse_bytes
from jaxnvrar.bench.setup import bring_up, is_printer, progress


def add_arguments(parser) -> None:
    parser.add_argument("--calls", type=int, default=None,
                        help="all-reduces in all (100000 on GPUs; 500 on CPU, where a call takes milliseconds)")
    parser.add_argument("--chunk", type=int, default=None, help="calls per jitted loop execution (1000 GPU, 50 CPU)")
    parser.add_argument("--bytes", type=parse_bytes, default=128 << 10, help="message size (128K)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--algorithm", default=None, help="nvrar where available, else reference")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")


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
        return lax.psum(errors, "x")

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P()))


def run(args) -> int:
    description = bring_up(timed=False)
    algorithm = args.algorithm or ("nvrar" if jaxnvrar.is_initialized() else "reference")
    dtype = DTYPES[args.dtype]
    num_ranks = jax.device_count()
    mesh = jax.make_mesh((num_ranks,), ("x",))
    count = max(1, args.bytes // jnp.dtype(dtype).itemsize)
    on_gpu = jax.default_backend() == "gpu"
    calls = args.calls or (100_000 if on_gpu else 500)
    chunk = args.chunk or (1000 if on_gpu else 50)
    chunks = max(1, calls // chunk)
    program = soak_program(mesh, algorithm, chunk)
    ranks = np.repeat(np.arange(1, num_ranks + 1), count).astype(jnp.dtype(dtype))
    x = jax.make_array_from_callback(ranks.shape, NamedSharding(mesh, P("x")), lambda i: ranks[i])
    with jax.set_mesh(mesh):
        program(x).block_until_ready()  # compile and warm up (not counted)
        errors, times = 0, []
        start = time.perf_counter()
        for done in range(1, chunks + 1):
            t = time.perf_counter()
            errors += int(program(x))  # waits: each chunk is timed on its own
            times.append(time.perf_counter() - t)
            progress(f"{algorithm}, {errors} wrong so far", done, chunks)
        elapsed = time.perf_counter() - start
    calls = chunks * chunk
    first, last = np.median(times[: max(1, chunks // 10)]), np.median(times[-max(1, chunks // 10):])
    result = {"devices": description, "algorithm": algorithm, "dtype": args.dtype, "bytes": count * jnp.dtype(dtype).itemsize,
              "calls": calls, "errors": errors, "seconds": elapsed, "us_per_call": elapsed / calls * 1e6,
              "first_tenth_chunk_ms": first * 1e3, "last_tenth_chunk_ms": last * 1e3}
    if is_printer():
        print(f"# jaxnvrar-bench soak: {description}")
        print(f"{calls} calls of {result['bytes']} B {args.dtype} with {algorithm}: {errors} wrong elements, "
              f"{elapsed:.2f} s ({result['us_per_call']:.2f} us/call); chunk of {chunk}: "
              f"{result['first_tenth_chunk_ms']:.2f} ms in the first tenth, {result['last_tenth_chunk_ms']:.2f} ms "
              "in the last (median)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    return 1 if errors else 0

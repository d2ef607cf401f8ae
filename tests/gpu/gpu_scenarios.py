"""Failure and lifecycle scenarios of the CUDA kernel, one per 2-GPU job:

    jaxnvrar-launch -n 2 -- python tests/gpu/gpu_scenarios.py NAME

Each rank prints one line `SCENARIO {json}` with what it saw; tests/gpu/test_gpu_jobs.py starts
the jobs and checks those lines. A kernel that traps takes the CUDA context with it, so a rank
leaves with os._exit after reporting.
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnvrar
from jaxnvrar import distributed
from jaxnvrar.tuning import kernel_config_override

# Flags are calls % FLAG_PERIOD + 1 (BeginCall in csrc/device_common.cuh); the wrap scenario starts just before
# the counter crosses a multiple of it.
FLAG_PERIOD = 0xFFFFFFFE


def report(**fields):
    print("SCENARIO " + json.dumps(fields, default=str), flush=True)


def sharded(mesh, per_rank: np.ndarray):
    """A global array whose shard on this process is `per_rank` (shapes may differ by rank)."""
    shape = (mesh.size * per_rank.shape[0],)
    return jax.make_array_from_callback(shape, NamedSharding(mesh, P("x")), lambda index: per_rank)


def all_reduce_fn(mesh, calls: int = 1):
    gpus_per_node = int(os.environ.get("SCENARIO_GPUS_PER_NODE", "0")) or None  # 1: two "nodes" of one GPU

    def body(a):
        for _ in range(calls):
            a = lax.pcast(jaxnvrar.all_reduce(a, "x", algorithm="nvrar", gpus_per_node=gpus_per_node) / 2, "x",
                          to="varying")
        return a

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))


def expect_failure(fn, x) -> None:
    """Run fn(x), compiled beforehand so that the time reported is the failing call's alone."""
    compiled = fn.lower(x).compile()
    start = time.monotonic()
    try:
        compiled(x).block_until_ready()
        report(raised=False)
    except Exception as err:  # noqa: BLE001 - XLA raises JaxRuntimeError; report whatever came
        record = jaxnvrar.last_timeout()
        report(raised=True, seconds=time.monotonic() - start, error=str(err)[:300], record=record,
               message=jaxnvrar.runtime.describe_timeout(record) if record else None)
    sys.stdout.flush()
    os._exit(0)


def main(name: str) -> None:
    jaxnvrar.initialize_distributed()
    jaxnvrar.initialize()
    rank = jax.process_index()
    mesh = jax.make_mesh((2,), ("x",))
    timeout_s = float(os.environ.get("JAXNVRAR_TIMEOUT_S", "10"))

    with jax.set_mesh(mesh):
        if name == "skip":  # rank 1 skips the second call
            if os.environ.get("SCENARIO_TAKE_REGION_0"):  # with JAXNVRAR_GROUPINGS=2: axis x's calls get region 1
                client = distributed.kv_client()
                if rank == 0:  # as another grouping of ranks would, had it been lowered first
                    client.key_value_set("jaxnvrar/grouping_region/0", "process groups {7}")
                client.wait_at_barrier("scenario-region-0-taken", 60_000)
            x = sharded(mesh, np.ones(4096, np.float32))
            f = all_reduce_fn(mesh)
            f(x).block_until_ready()
            if rank == 0:
                expect_failure(f, x)
            time.sleep(timeout_s + 5)
            report(skipped=True)
            os._exit(0)

        if name in ("size-mismatch", "dtype-mismatch"):
            # One program on both ranks (as SPMD code is), whose branch depends on the rank:
            # rank 0 reduces 1000 float32 (or 4096 float16), rank 1 2000 float32 (4096 bfloat16).
            if name == "size-mismatch":
                mine = lambda a: jaxnvrar.all_reduce(a[:1000], "x", algorithm="nvrar").sum()  # noqa: E731
                theirs = lambda a: jaxnvrar.all_reduce(a, "x", algorithm="nvrar").sum()  # noqa: E731
            else:  # same bytes: this one would not hang, only be wrong
                mine = lambda a: jaxnvrar.all_reduce(a.astype(jnp.float16), "x", algorithm="nvrar").sum(  # noqa: E731
                    dtype=jnp.float32)
                theirs = lambda a: jaxnvrar.all_reduce(a.astype(jnp.bfloat16), "x", algorithm="nvrar").sum(  # noqa: E731
                    dtype=jnp.float32)
            x = sharded(mesh, np.ones(2000 if name == "size-mismatch" else 4096, np.float32))
            fn = jax.jit(jax.shard_map(
                lambda a: lax.cond(lax.axis_index("x") == 0, mine, theirs, a)[None],
                mesh=mesh, in_specs=P("x"), out_specs=P("x"), check_vma=False))
            expect_failure(fn, x)

        if name == "dense-mismatch":  # run with JAXNVRAR_DENSE_BYTES set: the same call, dense on rank 0 only
            x = sharded(mesh, np.ones(1 << 16, np.float32))
            with kernel_config_override("128-1shot-dense" if rank == 0 else "128-1shot-bulk"):
                expect_failure(all_reduce_fn(mesh), x)  # lowered under the override: each its own kernel

        if name == "blocks-mismatch":  # the same bulk call in 128 blocks on rank 0, 64 on rank 1
            x = sharded(mesh, np.ones(1 << 20, np.float32))  # 2 MiB slices: more chunks than 128 x 512 threads
            with kernel_config_override("128-bulk" if rank == 0 else "64-bulk"):
                expect_failure(all_reduce_fn(mesh), x)

        if name == "pull-mismatch":  # the same call, its reduce-scatter pulled on rank 0 only
            x = sharded(mesh, np.ones(1 << 16, np.float32))
            with kernel_config_override("128-pull" if rank == 0 else "128-bulk"):
                expect_failure(all_reduce_fn(mesh), x)

        if name == "wrap":  # run with JAXNVRAR_FIRST_CALL a few calls before a flag wrap
            inputs = [np.random.default_rng(r).standard_normal(70000).astype(np.float32) for r in range(2)]
            out = all_reduce_fn(mesh, calls=16)(sharded(mesh, inputs[rank]))
            # Each call halves the sum of 2: after the first, every call gives its input back.
            # (Checked on the host, not with psum: NCCL refuses ranks that share a GPU.)
            want = (inputs[0] + inputs[1]) / 2
            got = np.asarray(out.addressable_data(0))
            report(max_error=float(np.max(np.abs(got - want))), first_call=os.environ.get("JAXNVRAR_FIRST_CALL"))

        if name == "finalize-in-flight":
            x = sharded(mesh, np.full(1 << 16, rank + 1.0, np.float32))
            f = all_reduce_fn(mesh, calls=64)
            outs = [f(x) for _ in range(20)]  # dispatched, not waited for
            jaxnvrar.finalize()
            values = sorted({float(v) for o in outs for v in np.unique(np.asarray(o.addressable_data(0)))})
            errors = {}
            for label, call in (("call", lambda: f(x)), ("initialize", jaxnvrar.initialize)):
                try:
                    call()
                    errors[label] = None
                except Exception as err:  # noqa: BLE001
                    errors[label] = f"{type(err).__name__}: {err}"
            report(values=values, errors=errors)


if __name__ == "__main__":
    main(sys.argv[1])

"""The decode step's attention alone: XLA's ops against the fused kernel (csrc/decode_attention.cu).

    jaxnvrar-bench attention --preset llama3.1-8b --tp 1 --batch 1,16 [--clusters 1,2,4] [--json PATH]

One rank's share of a layer's attention (query and KV heads divided by --tp), on a cache of
--cache positions, as the model's decode step calls it (batch 1 as the twin row: two rows,
one computed). --calls calls run in one jitted loop that carries the caches (donated, updated
in place) and feeds each call's output into the next call's input, so nothing is hoisted; the
figure is the loop's wall time per call (median of --repeats loops), which includes the loop's
own small kernels, the same for both. For the kernel it adds its own stamps of the last call
(`attention.kernel_block_times`): span (first block's start to last block's end), start spread
(blocks that waited for an SM) and the median block's phases; --clusters adds kernel rows with
JAXNVRAR_ATTENTION_CLUSTER forced to each value. --device-time traces one more loop with
jax.profiler and adds the device time per call (the union of the loop's kernels, the loop's own
small ones included) and the kernels per call. The kernel runs on CUDA GPUs only; elsewhere
--implementations xla times XLA's ops (for tests).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnvrar.bench import breakdown
from jaxnvrar.bench.setup import is_printer, parse_ints

_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="llama3.1-8b", help="the model whose attention shapes to use")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks: heads per rank = heads / tp (1)")
    parser.add_argument("--batch", type=parse_ints, default=[1, 16], help="batch sizes, comma-separated (1,16)")
    parser.add_argument("--cache", type=int, default=1088, help="cache positions (1088: prompt 1024 + 64 new)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--implementations", default=None,
                        help="comma-separated: xla, kernel (default: both on CUDA GPUs, xla elsewhere)")
    parser.add_argument("--clusters", type=parse_ints, default=[],
                        help="kernel rows with JAXNVRAR_ATTENTION_CLUSTER forced to each of these (1-16)")
    parser.add_argument("--calls", type=int, default=64, help="attention calls per timed loop (64)")
    parser.add_argument("--repeats", type=int, default=7, help="timed loops; the median is reported (7)")
    parser.add_argument("--device-time", action="store_true",
                        help="trace one more loop per row (jax.profiler): device us and kernels per call")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")


def shapes(preset: str, tp: int) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of one rank's share of `preset` over `tp` ranks."""
    from jaxnvrar.models import llama

    if preset not in llama.PRESETS:
        raise SystemExit(f"jaxnvrar-bench attention: unknown --preset {preset!r}; presets: {sorted(llama.PRESETS)}")
    config = llama.PRESETS[preset]
    if tp < 1 or config.num_attention_heads % tp or config.num_key_value_heads % tp:
        raise SystemExit(f"jaxnvrar-bench attention: --tp {tp} does not divide {preset}'s "
                         f"{config.num_attention_heads} query and {config.num_key_value_heads} KV heads")
    return config.num_attention_heads // tp, config.num_key_value_heads // tp, config.head_dim


def _inputs(preset, batch, q_heads, kv_heads, head_dim, cache, dtype):
    from jaxnvrar.models import llama

    twin = batch == 1  # as the model runs batch 1: two rows, the second a copy of the first
    rows = 2 if twin else 1
    rng = np.random.default_rng(0)
    row = rng.standard_normal((batch, 1, (q_heads + 2 * kv_heads) * head_dim))
    qkv = jnp.asarray(np.repeat(row, rows, axis=1), dtype)
    cache_k = jnp.asarray(rng.standard_normal((batch, kv_heads, cache, head_dim)), dtype)
    cache_v = jnp.asarray(rng.standard_normal((batch, kv_heads, cache, head_dim)), dtype)
    return qkv, cache_k, cache_v, llama.rope_frequencies(llama.PRESETS[preset]), twin


def _loop(implementation, q_heads, twin, rows, cache, calls):
    from jaxnvrar.models.llama import attention

    last = cache - 1

    def run(qkv, cache_k, cache_v, inv_freq):
        def body(i, carry):
            cache_k, cache_v, feedback = carry
            at = last - i % min(calls, cache)  # a different cache row each call, inside the cache
            positions = jnp.full((rows,), at, jnp.int32)
            out, cache_k, cache_v = attention.decode_attention(
                qkv + feedback, cache_k, cache_v, inv_freq, positions, at, q_heads=q_heads,
                cache_rows=1 if twin else None, twin=twin, implementation=implementation)
            return cache_k, cache_v, out[:, :, :1] * 0  # zeros that depend on this call
        zeros = jnp.zeros(qkv.shape[:2] + (1,), qkv.dtype)
        return lax.fori_loop(0, calls, body, (cache_k, cache_v, zeros))

    return jax.jit(run, donate_argnums=(1, 2))


def time_attention(implementation, preset, batch, q_heads, kv_heads, head_dim, cache, dtype, calls, repeats,
                   device_time=False) -> dict:
    """Microseconds per call of `calls` calls in one loop (median of `repeats` loops), for the
    kernel its block times of the last call, and with `device_time` the device's busy time and
    kernels per call from a traced loop (None where the trace has no device kernels: off GPUs)."""
    from jaxnvrar.models.llama import attention

    qkv, cache_k, cache_v, inv_freq, twin = _inputs(preset, batch, q_heads, kv_heads, head_dim, cache, dtype)
    jax.clear_caches()  # a forced cluster size is read when the call is compiled and recorded
    loop = _loop(implementation, q_heads, twin, qkv.shape[1], cache, calls)
    cache_k, cache_v, last = loop(qkv, cache_k, cache_v, inv_freq)
    jax.block_until_ready(last)
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        cache_k, cache_v, last = loop(qkv, cache_k, cache_v, inv_freq)
        jax.block_until_ready(last)
        per_call.append((time.perf_counter() - start) / calls * 1e6)
    row = {"implementation": implementation, "batch": batch, "us": float(np.median(per_call))}
    if implementation == "kernel":
        row["blocks"] = attention.kernel_block_times()
    if device_time:
        directory = tempfile.mkdtemp(prefix="jaxnvrar_attention_trace_")
        with breakdown.traced(directory):
            cache_k, cache_v, last = loop(qkv, cache_k, cache_v, inv_freq)
            jax.block_until_ready(last)
        kernels = breakdown.device_kernels(breakdown.read_trace(directory))
        row["device_us"] = breakdown.busy_us(kernels) / calls if kernels else None
        row["kernels_per_call"] = len(kernels) / calls if kernels else None
    return row


def run(args) -> int:
    from jaxnvrar.models.llama import attention

    on_cuda = jax.default_backend() == "gpu" and attention.register_kernel()
    implementations = (args.implementations.split(",") if args.implementations
                       else ["xla", "kernel"] if on_cuda else ["xla"])
    for implementation in implementations:
        attention.check_implementation(implementation)
    if ("kernel" in implementations or args.clusters) and not on_cuda:
        raise SystemExit("jaxnvrar-bench attention: the kernel (and --clusters) runs on CUDA GPUs with jaxnvrar's "
                         "CUDA part (csrc/decode_attention.cu); use --implementations xla here")
    if any(not 1 <= c <= 16 for c in args.clusters):
        raise SystemExit(f"jaxnvrar-bench attention: --clusters takes 1 to 16, not {args.clusters}")
    if args.calls < 1 or args.repeats < 1 or args.cache < 2:
        raise SystemExit("jaxnvrar-bench attention: --calls and --repeats must be >= 1, --cache >= 2")
    q_heads, kv_heads, head_dim = shapes(args.preset, args.tp)
    dtype = _DTYPES[args.dtype]
    measure = dict(preset=args.preset, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, cache=args.cache,
                   dtype=dtype, calls=args.calls, repeats=args.repeats, device_time=args.device_time)
    rows = []
    for batch in args.batch:
        for implementation in implementations:
            rows.append(time_attention(implementation, batch=batch, **measure))
        for parts in args.clusters:
            before = os.environ.get(attention.CLUSTER_VARIABLE)
            os.environ[attention.CLUSTER_VARIABLE] = str(parts)
            try:
                rows.append(time_attention("kernel", batch=batch, **measure) | {"cluster": parts})
            finally:
                if before is None:
                    del os.environ[attention.CLUSTER_VARIABLE]
                else:
                    os.environ[attention.CLUSTER_VARIABLE] = before
    if is_printer():
        print(f"# jaxnvrar-bench attention: {args.preset} / tp {args.tp}: {q_heads} query, {kv_heads} KV heads of "
              f"{head_dim}, cache {args.cache}, {args.dtype}, {jax.devices()[0].device_kind}; us per call in a loop "
              f"of {args.calls} (median of {args.repeats})")
        device = f" {'device us':>9} {'kernels':>7}" if args.device_time else ""
        print(f"{'batch':>5} {'implementation':<16} {'us/call':>8}{device} {'span us':>8} {'spread':>7}  "
              "phases (median block, us)")
        for row in rows:
            name = row["implementation"] + (f" cluster {row['cluster']}" if "cluster" in row else "")
            blocks = row.get("blocks") or {}
            phases = " ".join(f"{k}={v:.1f}" for k, v in {**blocks.get("phases", {}), **blocks.get("waits", {})}.items())
            span = f"{blocks['span']:8.1f} {blocks['start_spread']:7.1f}" if blocks else f"{'':>8} {'':>7}"
            if args.device_time:
                device = (f" {row['device_us']:9.1f} {row['kernels_per_call']:7.1f}" if row["device_us"] is not None
                          else f" {'-':>9} {'-':>7}")
            print(f"{row['batch']:>5} {name:<16} {row['us']:8.1f}{device} {span}  {phases}".rstrip())
        if args.device_time and any(row["device_us"] is None for row in rows):
            print("# device time: the traces held no device kernels (a CPU run has none)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"preset": args.preset, "tp": args.tp, "q_heads": q_heads, "kv_heads": kv_heads,
                           "head_dim": head_dim, "cache": args.cache, "dtype": args.dtype,
                           "device": jax.devices()[0].device_kind, "calls": args.calls, "rows": rows}, f, indent=1)
    return 0

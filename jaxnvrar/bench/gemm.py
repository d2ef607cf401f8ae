"""The tile effect behind the TP-vs-PP trade-off: split one GEMM d ways, either by cutting M
(pipeline micro-batches shrink the tokens per GEMM) or by cutting K (row-parallel tensor
parallelism shrinks the reduction dimension), and see how fast each piece runs.

Each measurement runs --repeats GEMMs in one jitted loop (each iteration's input depends on
the previous result, so nothing is hoisted) and reports TFLOP/s of one piece.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from jax import lax

from jaxnvrar.bench.setup import is_printer, parse_ints


def add_arguments(parser) -> None:
    parser.add_argument("-m", type=int, default=None, help="tokens per GEMM before splitting (GPU 512, CPU 128)")
    parser.add_argument("-k", type=int, default=None, help="reduction size (GPU 8192, CPU 512)")
    parser.add_argument("-n", type=int, default=None, help="output size (GPU 28672, CPU 512)")
    parser.add_argument("--splits", type=parse_ints, default=[1, 2, 4, 8, 16], help="ways to split, comma-separated")
    parser.add_argument("--repeats", type=int, default=20, help="GEMMs per timed loop")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--plot", metavar="PNG")


def gemm_seconds(m: int, k: int, n: int, repeats: int, dtype=jnp.bfloat16) -> float:
    a = jnp.ones((m, k), dtype)
    b = jnp.full((k, n), 1e-3, dtype)

    @jax.jit
    def loop(a, b):
        def body(_, carry):
            out = (a + carry.astype(dtype)) @ b
            return jnp.sum(out, dtype=jnp.float32) * 1e-30  # tiny, but the next GEMM depends on it
        return lax.fori_loop(0, repeats, body, jnp.float32(0))

    loop(a, b).block_until_ready()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        loop(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best / repeats


def run(args) -> int:
    on_gpu = jax.default_backend() == "gpu"
    m = args.m or (512 if on_gpu else 128)
    k = args.k or (8192 if on_gpu else 512)
    n = args.n or (28672 if on_gpu else 512)
    rows = []
    for d in args.splits:
        if m % d or k % d:
            raise SystemExit(f"split {d} does not divide m={m} and k={k}")
        pp = gemm_seconds(m // d, k, n, args.repeats)
        tp = gemm_seconds(m, k // d, n, args.repeats)
        rows.append({"split": d, "pp_m": m // d, "pp_us": pp * 1e6, "pp_tflops": 2 * m // d * k * n / pp / 1e12,
                     "tp_k": k // d, "tp_us": tp * 1e6, "tp_tflops": 2 * m * k // d * n / tp / 1e12})
    if is_printer():
        print(f"# GEMM [{m} x {k}] @ [{k} x {n}] bf16 on {jax.devices()[0].device_kind}, split d ways")
        print(f"{'d':>3} | {'PP: M/d':>8} {'us':>9} {'TFLOP/s':>8} | {'TP: K/d':>8} {'us':>9} {'TFLOP/s':>8}")
        for r in rows:
            print(f"{r['split']:>3} | {r['pp_m']:>8} {r['pp_us']:>9.1f} {r['pp_tflops']:>8.2f} | "
                  f"{r['tp_k']:>8} {r['tp_us']:>9.1f} {r['tp_tflops']:>8.2f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"m": m, "k": k, "n": n, "device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1)
        if args.plot:
            _plot(rows, args.plot, f"GEMM {m}x{k}x{n} bf16, {jax.devices()[0].device_kind}")
    return 0


def _plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    splits = [r["split"] for r in rows]
    ax.plot(splits, [r["pp_tflops"] for r in rows], marker="o", label="cut M (pipeline micro-batches)")
    ax.plot(splits, [r["tp_tflops"] for r in rows], marker="s", label="cut K (tensor parallel, row)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ways split")
    ax.set_ylabel("TFLOP/s of one piece")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)

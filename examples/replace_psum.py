"""A tensor-parallel MLP written with plain lax.psum, run as written and through jaxnvrar.replace_psum.

The model code below does not mention jaxnvrar: `jaxnvrar.replace_psum(step)` swaps its psums
for `jaxnvrar.all_reduce` (algorithm="auto": the NVRAR kernel where it wins, psum elsewhere).
Llama 3.1 8B MLP shapes (SwiGLU, hidden 4096, intermediate 14336, bf16) split over all devices.

Anywhere (8 virtual CPU devices, small shapes; "auto" is psum there):

    python examples/replace_psum.py --time

On one host with 2 GPUs, one process per GPU:

    jaxnvrar-launch -n 2 -- python examples/replace_psum.py --time --batch 16
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnvrar


def tp_mlp_layers(mesh):
    """Column-parallel gate/up, row-parallel down, lax.psum of the partial sums; residual."""

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P(), P(None, None, "tp"), P(None, None, "tp"), P(None, "tp", None)),
                   out_specs=P())
    def step(x, w_gate, w_up, w_down):
        for layer in range(w_gate.shape[0]):
            h = jax.nn.silu(x @ w_gate[layer]) * (x @ w_up[layer])
            x = x + lax.psum(h @ w_down[layer], "tp")
        return x

    return step


def median_step_time(fn, args, steps, repeats):
    """Seconds per step: `steps` calls on the same buffers, blocked once, median of `repeats`."""
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            out = fn(*args)
        out.block_until_ready()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="tokens per step (decode: the batch)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, help="default: 4096 on GPUs, 512 elsewhere")
    parser.add_argument("--intermediate", type=int, help="default: 14336 on GPUs, 1792 elsewhere")
    parser.add_argument("--algorithm", default="auto", choices=jaxnvrar.ALGORITHMS, help="for replace_psum")
    parser.add_argument("--time", action="store_true", help="also time both")
    parser.add_argument("--steps", type=int, default=100, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    if "JAXNVRAR_NUM_PROCESSES" in os.environ:  # started by jaxnvrar-launch
        jaxnvrar.initialize_distributed()
    else:
        jax.config.update("jax_num_cpu_devices", 8)
    gpu = jax.default_backend() == "gpu"
    if gpu and jaxnvrar.cuda_available():
        jaxnvrar.initialize()  # NVSHMEM, after jax.distributed; "auto" needs it to pick the kernel
    hidden = args.hidden or (4096 if gpu else 512)
    width = args.intermediate or (14336 if gpu else 1792)

    tp = jax.device_count()
    mesh = jax.make_mesh((tp,), ("tp",))

    def random(key, shape, spec, scale):  # made on the devices, sharded
        make = jax.jit(lambda k: (jax.random.normal(k, shape, jnp.float32) * scale).astype(jnp.bfloat16),
                       out_shardings=NamedSharding(mesh, spec))
        return make(jax.random.key(key))

    n = args.layers
    inputs = (random(0, (args.batch, hidden), P(), 1.0),
              random(1, (n, hidden, width), P(None, None, "tp"), hidden ** -0.5),
              random(2, (n, hidden, width), P(None, None, "tp"), hidden ** -0.5),
              random(3, (n, width, hidden), P(None, "tp", None), width ** -0.5))

    with jax.set_mesh(mesh):
        as_written = tp_mlp_layers(mesh)
        replaced = jax.jit(jaxnvrar.replace_psum(as_written, algorithm=args.algorithm))
        want = np.asarray(as_written(*inputs).addressable_data(0), np.float32)
        got = np.asarray(replaced(*inputs).addressable_data(0), np.float32)
        topology = jaxnvrar.distributed.default_topology(tp)
        runs = (jaxnvrar.choose_algorithm(args.batch * hidden, jnp.bfloat16, topology)
                if args.algorithm == "auto" else args.algorithm)
        error = float(np.max(np.abs(got - want)))
        equal = bool(np.allclose(got, want, rtol=2e-2, atol=2e-2 * float(np.max(np.abs(want)))))
        lines = [f"{tp} ranks ({jax.default_backend()}), {n} MLP layers {hidden}x{width} bf16, batch {args.batch}: "
                 f"{args.batch * hidden * 2}-byte all-reduces, {args.algorithm!r} runs {runs!r}",
                 f"replace_psum vs psum: max |difference| = {error:.3g}, equal: {equal}"]
        if args.time:
            for name, fn in (("psum (as written)", as_written), (f"replace_psum({args.algorithm})", replaced)):
                seconds = median_step_time(fn, inputs, args.steps, args.repeats)
                lines.append(f"{name:>25}: median step {seconds * 1e6:9.1f} us")
        if jax.process_index() == 0:
            print("\n".join(lines))
        assert equal, error


if __name__ == "__main__":
    main()

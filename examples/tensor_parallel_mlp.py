"""A row-parallel MLP whose partial sums are reduced by jaxnvrar.all_reduce instead of lax.psum.

Anywhere (8 virtual CPU devices; "auto" is psum there):

    python examples/tensor_parallel_mlp.py

On one host with 2 GPUs, one process per GPU ("auto" takes the NVRAR kernel for these sizes):

    jaxnvrar-launch -n 2 -- python examples/tensor_parallel_mlp.py
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnvrar


def main() -> None:
    if "JAXNVRAR_NUM_PROCESSES" in os.environ:  # started by jaxnvrar-launch
        jaxnvrar.initialize_distributed()
    else:
        jax.config.update("jax_num_cpu_devices", 8)
    if jax.default_backend() == "gpu" and jaxnvrar.cuda_available():
        jaxnvrar.initialize()  # NVSHMEM, after jax.distributed; "nvrar" and "auto" need it

    tp = jax.device_count()
    mesh = jax.make_mesh((tp,), ("tp",))
    batch, hidden, width = 16, 1024, 4096
    rng = np.random.default_rng(0)

    def put(array, spec):
        array = np.asarray(array, np.float32)
        return jax.make_array_from_callback(array.shape, NamedSharding(mesh, spec), lambda index: array[index])

    x = put(rng.standard_normal((batch, hidden)), P())
    w_up = put(rng.standard_normal((hidden, width)) / np.sqrt(hidden), P(None, "tp"))   # column-parallel
    w_down = put(rng.standard_normal((width, hidden)) / np.sqrt(width), P("tp", None))  # row-parallel

    def mlp(reduce):
        @jax.jit
        @jax.shard_map(mesh=mesh, in_specs=(P(), P(None, "tp"), P("tp", None)), out_specs=P())
        def run(x, w_up, w_down):
            partial = jax.nn.gelu(x @ w_up) @ w_down  # this rank's share of the sum
            return reduce(partial)                    # invariant over "tp", like psum's result

        return run

    xla = mlp(lambda p: jax.lax.psum(p, "tp"))
    topology = jaxnvrar.distributed.default_topology(tp)
    with jax.set_mesh(mesh):
        want = xla(x, w_up, w_down)
        # "auto" picks per message; "reference" is the NVRAR schedule in plain JAX (any backend).
        for algorithm in ("auto", "reference"):
            got = mlp(lambda p: jaxnvrar.all_reduce(p, "tp", algorithm=algorithm))(x, w_up, w_down)
            error = float(jnp.max(jnp.abs(got - want)))
            runs = jaxnvrar.choose_algorithm(batch * hidden, jnp.float32, topology) if algorithm == "auto" else algorithm
            if jax.process_index() == 0:
                print(f"{tp} ranks ({jax.default_backend()}), {batch * hidden * 4}-byte all-reduce, "
                      f"algorithm={algorithm!r} (runs {runs!r}): max |jaxnvrar - psum| = {error:.2e}")
            assert error < 1e-3, error


if __name__ == "__main__":
    main()

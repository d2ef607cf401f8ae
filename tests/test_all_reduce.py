"""all_reduce against jax.lax.psum: topologies, dtypes, shapes, transformations, errors.

Runs on 8 virtual CPU devices, and again under jaxnvrar-launch in 2 and 4 processes
(tests/test_multiprocess.py), where only topologies that span every device apply.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import jaxnvrar
from helpers import global_array, mesh_1d, run_per_rank

# (ranks, gpus_per_node): one node, one GPU per node, several of each, non-powers of two.
TOPOLOGIES = [
    (8, 8), (8, 4), (8, 2), (8, 1), (6, 3), (6, 2), (6, 1), (5, 1), (7, 7), (3, 1),
    (4, 4), (4, 2), (4, 1), (2, 1),
]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
SHAPES = [(), (1,), (7,), (3, 5), (1000,), (2, 3, 129)]


def _needs_ranks(num_ranks):
    devices = jax.device_count()
    if num_ranks > devices:
        pytest.skip(f"needs {num_ranks} devices, have {devices}")
    if jax.process_count() > 1 and num_ranks != devices:
        pytest.skip("in multi-process runs only meshes over every device apply")


def _inputs(num_ranks, shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((num_ranks,) + shape).astype(jnp.dtype(dtype))


def _tolerance(dtype, num_ranks):
    eps = float(jnp.finfo(dtype).eps)
    return dict(rtol=4 * eps * num_ranks, atol=4 * eps * num_ranks * 4)


def _check_matches_psum(out, expected, dtype, num_ranks):
    out64, exp64 = out.astype(np.float64), expected.astype(np.float64)
    np.testing.assert_allclose(out64, exp64, **_tolerance(dtype, num_ranks))
    for r in range(1, num_ranks):  # replicas must never drift apart
        assert out[r].tobytes() == out[0].tobytes(), f"rank {r} differs from rank 0"


def _reduce(algorithm, gpus_per_node=None):
    return lambda a: jaxnvrar.all_reduce(a, "x", algorithm=algorithm, gpus_per_node=gpus_per_node)


@pytest.mark.parametrize("num_ranks,gpus_per_node", TOPOLOGIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_topology_and_dtype(num_ranks, gpus_per_node, dtype):
    _needs_ranks(num_ranks)
    mesh = mesh_1d(num_ranks)
    host = _inputs(num_ranks, (2, 3, 129), dtype)
    out = run_per_rank(_reduce("reference", gpus_per_node), host, mesh)
    expected = run_per_rank(_reduce("psum"), host, mesh)
    assert out.dtype == host.dtype and out.shape == host.shape
    _check_matches_psum(out, expected, dtype, num_ranks)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("gpus_per_node", [1, 2, 4])
def test_shapes(shape, gpus_per_node):
    num_ranks = 4 if jax.process_count() == 1 else jax.device_count()
    _needs_ranks(num_ranks)
    if num_ranks % gpus_per_node:
        pytest.skip("gpus_per_node does not divide the axis")
    mesh = mesh_1d(num_ranks)
    host = _inputs(num_ranks, shape, jnp.bfloat16, seed=1)
    out = run_per_rank(_reduce("reference", gpus_per_node), host, mesh)
    expected = run_per_rank(_reduce("psum"), host, mesh)
    _check_matches_psum(out, expected, jnp.bfloat16, num_ranks)


def test_exact_on_integers():
    # Small integers are exact in every dtype, so any correct schedule gives psum's values exactly.
    num_ranks = jax.device_count()
    mesh = mesh_1d(num_ranks)
    host = np.arange(num_ranks * 37, dtype=np.float32).reshape(num_ranks, 37) % 11
    out = run_per_rank(_reduce("reference", 1), host, mesh)
    np.testing.assert_array_equal(out, np.broadcast_to(host.sum(0), host.shape))


def test_default_gpus_per_node_and_auto():
    num_ranks = jax.device_count()
    mesh = mesh_1d(num_ranks)
    host = _inputs(num_ranks, (33,), jnp.float32)
    expected = run_per_rank(_reduce("psum"), host, mesh)
    for algorithm in ("reference", "auto"):
        _check_matches_psum(run_per_rank(_reduce(algorithm), host, mesh), expected, jnp.float32, num_ranks)


def test_no_jit():
    num_ranks = min(4, jax.device_count()) if jax.process_count() == 1 else jax.device_count()
    mesh = mesh_1d(num_ranks)
    host = _inputs(num_ranks, (10,), jnp.float32)
    out = run_per_rank(_reduce("reference", 1), host, mesh, jit=False)
    _check_matches_psum(out, run_per_rank(_reduce("psum"), host, mesh), jnp.float32, num_ranks)


def test_inside_scan_over_layers():
    num_ranks = jax.device_count()
    mesh = mesh_1d(num_ranks)
    host = _inputs(num_ranks, (16,), jnp.float32)

    def layers(algorithm):
        def body(carry, scale):
            total = jaxnvrar.all_reduce(carry * scale, "x", algorithm=algorithm,
                                        gpus_per_node=2 if num_ranks % 2 == 0 else 1)
            # The sum is invariant over "x" (as psum's); the carry is per rank.
            return lax.pcast(total / num_ranks, "x", to="varying"), None

        return lambda a: lax.scan(body, a, jnp.linspace(0.5, 1.5, 5))[0]

    out = run_per_rank(layers("reference"), host, mesh)
    _check_matches_psum(out, run_per_rank(layers("psum"), host, mesh), jnp.float32, num_ranks)


def test_multi_axis_mesh():
    if jax.device_count() % 2:
        pytest.skip("needs an even device count")
    dp, tp = 2, jax.device_count() // 2
    mesh = jax.make_mesh((dp, tp), ("dp", "tp"))
    host = _inputs(dp * tp, (24,), jnp.float32).reshape(dp, tp, 24)

    def run(algorithm):
        fn = jax.shard_map(
            lambda a: jaxnvrar.all_reduce(a, "tp", algorithm=algorithm, gpus_per_node=1),
            mesh=mesh, in_specs=P("dp", "tp"), out_specs=P("dp", "tp"),
        )
        from jax.experimental import multihost_utils

        with jax.set_mesh(mesh):
            out = jax.jit(fn)(global_array(host, mesh, P("dp", "tp")))
        return np.asarray(multihost_utils.process_allgather(out, tiled=True))

    out, expected = run("reference"), run("psum")
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # Each dp row reduces on its own: different rows differ.
    assert not np.allclose(out[0], out[1])


def test_replicated_out_specs_like_psum():
    # The result is typed invariant over the axis, exactly as psum's, so out_specs=P() works.
    num_ranks = jax.device_count()
    mesh = mesh_1d(num_ranks)
    host = _inputs(num_ranks, (8,), jnp.float32)
    fn = jax.shard_map(lambda a: jaxnvrar.all_reduce(a[0], "x", algorithm="reference"),
                       mesh=mesh, in_specs=P("x"), out_specs=P())
    with jax.set_mesh(mesh):
        out = jax.jit(fn)(global_array(host, mesh, P("x")))
    np.testing.assert_allclose(np.asarray(out), host.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["reference", "psum", "auto"])
def test_pytrees_like_psum(algorithm):
    # A pytree comes back as the same pytree, as from psum; leaves of one dtype travel as one
    # message. Invariant typing holds for every leaf (out_specs=P()).
    num_ranks = jax.device_count()
    _needs_ranks(num_ranks)
    mesh = mesh_1d(num_ranks)
    tree = {"w": _inputs(num_ranks, (3, 5), jnp.float32), "b": (_inputs(num_ranks, (7,), jnp.bfloat16, seed=1),
                                                                _inputs(num_ranks, (), jnp.float32, seed=2))}
    spec = P("x")
    arrays = jax.tree.map(lambda h: global_array(h, mesh, spec), tree)

    def run(reduce):
        fn = jax.shard_map(lambda t: reduce(jax.tree.map(lambda a: a[0], t)), mesh=mesh, in_specs=spec, out_specs=P())
        with jax.set_mesh(mesh):
            return jax.tree.map(np.asarray, jax.jit(fn)(arrays))

    got = run(lambda t: jaxnvrar.all_reduce(t, "x", algorithm=algorithm))
    want = run(lambda t: lax.psum(t, "x"))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w, dtype in zip(jax.tree.leaves(got), jax.tree.leaves(want), (jnp.bfloat16, jnp.float32, jnp.float32)):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), **_tolerance(dtype, num_ranks))


def test_pytree_leaves_of_one_dtype_share_one_all_reduce():
    num_ranks = jax.device_count()
    mesh = mesh_1d(num_ranks)
    spec = P("x")
    tree = [global_array(np.ones((num_ranks, n), np.float32), mesh, spec) for n in (3, 4, 5)]
    fn = jax.shard_map(lambda t: jaxnvrar.all_reduce(t, "x", algorithm="reference", gpus_per_node=num_ranks),
                       mesh=mesh, in_specs=spec, out_specs=spec)
    with jax.set_mesh(mesh):
        one_message = jax.jit(fn).lower(tree).as_text().count("collective_permute")
        fn_single = jax.shard_map(lambda a: jaxnvrar.all_reduce(a, "x", algorithm="reference",
                                                                gpus_per_node=num_ranks),
                                  mesh=mesh, in_specs=spec, out_specs=spec)
        per_leaf = jax.jit(fn_single).lower(tree[0]).as_text().count("collective_permute")
    assert one_message == per_leaf > 0  # three leaves, the permutes of one all-reduce


@pytest.mark.parametrize("out_spec", ["replicated", "sharded"])
def test_grad_matches_psum(out_spec):
    num_ranks = jax.device_count()
    mesh = mesh_1d(num_ranks)
    host = _inputs(num_ranks, (6,), jnp.float32)
    weights = jnp.arange(1.0, 7.0)

    def loss(algorithm, x):
        if out_spec == "replicated":
            fn = lambda a: jaxnvrar.all_reduce(a[0], "x", algorithm=algorithm) * weights
            spec = P()
        else:
            fn = lambda a: (jaxnvrar.all_reduce(a[0], "x", algorithm=algorithm) * weights)[None]
            spec = P("x")
        out = jax.shard_map(fn, mesh=mesh, in_specs=P("x"), out_specs=spec)(x)
        return jnp.sum(out**2)

    x = global_array(host, mesh, P("x"))
    with jax.set_mesh(mesh):
        got = jax.jit(jax.grad(functools.partial(loss, "reference")))(x)
        want = jax.jit(jax.grad(functools.partial(loss, "psum")))(x)
    from jax.experimental import multihost_utils

    np.testing.assert_allclose(np.asarray(multihost_utils.process_allgather(got, tiled=True)),
                               np.asarray(multihost_utils.process_allgather(want, tiled=True)),
                               rtol=1e-5)


def test_vmap_inside_shard_map():
    num_ranks = jax.device_count()
    mesh = mesh_1d(num_ranks)
    host = _inputs(num_ranks, (3, 5), jnp.float32)
    vmapped = lambda algorithm: (lambda a: jax.vmap(_reduce(algorithm, 1))(a))
    out = run_per_rank(vmapped("reference"), host, mesh)
    _check_matches_psum(out, run_per_rank(vmapped("psum"), host, mesh), jnp.float32, num_ranks)


# ---------------------------------------------------------------- bad input


def _call(fn, num_ranks=None):
    num_ranks = num_ranks or jax.device_count()
    mesh = mesh_1d(num_ranks)
    host = np.ones((num_ranks, 4), np.float32)
    return run_per_rank(fn, host, mesh)


@pytest.mark.parametrize("algorithm", ["nvrar", "reference"])
def test_rejects_integer_dtype(algorithm):
    # The kernel and its model take floats only; "psum" and "auto" (which picks psum) take
    # every dtype psum takes (tests/test_psum_parity.py).
    with pytest.raises(TypeError, match="int32.*psum"):
        _call(lambda a: jaxnvrar.all_reduce(a.astype(jnp.int32), "x", algorithm=algorithm))
    with pytest.raises(TypeError, match="int32.*psum"):  # a leaf of a pytree too
        _call(lambda a: jaxnvrar.all_reduce((a, a.astype(jnp.int32)), "x", algorithm=algorithm)[0])


def test_auto_takes_integers_as_psum_does():
    out = _call(lambda a: jaxnvrar.all_reduce(a.astype(jnp.int32), "x"))
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, np.full(out.shape, jax.device_count(), np.int32))


def test_rejects_gpus_per_node_that_does_not_divide():
    n = jax.device_count()
    bad = n + 1
    with pytest.raises(ValueError, match=f"gpus_per_node={bad}.*{n}"):
        _call(lambda a: jaxnvrar.all_reduce(a, "x", algorithm="reference", gpus_per_node=bad))


def test_rejects_unknown_algorithm():
    with pytest.raises(ValueError, match="algorithm must be one of"):
        _call(lambda a: jaxnvrar.all_reduce(a, "x", algorithm="ring"))


def test_rejects_unbound_axis():
    with pytest.raises(NameError, match="'y'.*shard_map"):
        _call(lambda a: jaxnvrar.all_reduce(a, "y"))


def test_rejects_several_axes():
    with pytest.raises(ValueError, match="one mesh axis"):
        _call(lambda a: jaxnvrar.all_reduce(a, ("x", "y")))


def test_nvrar_without_runtime_says_how_to_get_it():
    if jaxnvrar.is_initialized():
        pytest.skip("the NVSHMEM runtime is up in this process")
    with pytest.raises((RuntimeError, ImportError), match="jaxnvrar.initialize|built without"):
        _call(lambda a: jaxnvrar.all_reduce(a, "x", algorithm="nvrar"))


def test_initialize_without_gpu_says_why():
    if jax.default_backend() == "gpu":
        pytest.skip("this process has a GPU")
    with pytest.raises((RuntimeError, ImportError), match="needs a CUDA GPU|built without"):
        jaxnvrar.initialize()

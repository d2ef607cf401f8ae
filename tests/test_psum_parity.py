"""all_reduce typed, transposed and valued exactly as jax.lax.psum, in every setting psum takes.

Issue 18: invariant (replicated) inputs under grad, vmap axes, partly manual shard_map,
dtypes beyond the kernel's. Each test runs the same function twice, once with `lax.psum` (the
independent reference) and once with `jaxnvrar.all_reduce`, and compares values, dtypes,
gradients and the types (varying axes) of the reduced values as traced.

Single process only (8 virtual CPU devices); tests/test_all_reduce.py is the multi-process suite.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnvrar

pytestmark = pytest.mark.skipif(jax.process_count() > 1, reason="single-process parity checks")

N = 4  # ranks of the reduced axis
# "psum" would compare lax.psum with itself (all_reduce hands it straight over); "auto" is psum on
# CPU but takes all_reduce's own routing and typing first.
ALGORITHMS = ["reference", "auto"]


class Reducer:
    """psum (algorithm None) or all_reduce; records the type of every value it returns."""

    def __init__(self, algorithm):
        self.algorithm = algorithm
        self.types = []

    def __call__(self, value, axis_name):
        if self.algorithm is None:
            out = lax.psum(value, axis_name)
        else:
            out = jaxnvrar.all_reduce(value, axis_name, algorithm=self.algorithm)
        self.types.append(jax.tree.map(lambda leaf: str(jax.typeof(leaf)), out))
        return out


def _both(run, algorithm):
    """run(reducer) with psum and with all_reduce; their results and recorded types."""
    want_reducer, got_reducer = Reducer(None), Reducer(algorithm)
    want = run(want_reducer)
    got = run(got_reducer)
    assert got_reducer.types == want_reducer.types, "typed unlike psum"
    assert want_reducer.types, "the reducer never ran"
    return got, want


def _assert_same(got, want, rtol=1e-5, atol=1e-5):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, g.shape, w.dtype, w.shape)
        if np.issubdtype(w.dtype, np.inexact):
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
        else:
            np.testing.assert_array_equal(g, w)


def _mesh():
    return jax.make_mesh((N,), ("x",), devices=jax.devices()[:N])


def _data(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _put(host, mesh, spec):
    return jax.device_put(host, NamedSharding(mesh, spec))


def _smap(fn, mesh, in_specs, out_specs, **kwargs):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **kwargs)


# ---------------------------------------------------------------- forward values and types


@pytest.mark.parametrize("check_vma", [True, False], ids=["vma", "no_vma"])
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("spec", ["varying", "invariant"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_forward(algorithm, spec, jit, check_vma):
    mesh = _mesh()
    in_spec = P("x") if spec == "varying" else P()
    host = _data((N * 3,) if spec == "varying" else (5,))

    def run(reduce):
        fn = _smap(lambda a: reduce(a * 2.0, "x"), mesh, in_spec, P(), check_vma=check_vma)
        fn = jax.jit(fn) if jit else fn
        with jax.set_mesh(mesh):
            return fn(_put(host, mesh, in_spec))

    got, want = _both(run, algorithm)
    _assert_same(got, want)
    if spec == "invariant":  # psum of a replicated value: the axis size times it
        np.testing.assert_allclose(np.asarray(got), N * 2.0 * host, rtol=1e-6)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_constant_input_like_psum(algorithm):
    # A value that is no tracer (a Python number, a numpy array): psum multiplies by the size.
    mesh = _mesh()

    def run(reduce):
        def body(a):
            return a + reduce(np.float32(1.5), "x"), reduce(2.0, "x")

        with jax.set_mesh(mesh):
            return jax.jit(_smap(body, mesh, P(), P()))(jnp.zeros(()))

    got, want = _both(run, algorithm)
    _assert_same(got, want)


# ---------------------------------------------------------------- transposes


def _loss_fn(reduce, mesh, x_spec, w_spec, check_vma, out_spec=P()):
    weights = jnp.arange(1.0, 4.0)

    def body(x, w):
        out = reduce(x * w, "x") * weights
        return out if out_spec == P() else lax.pcast(out, "x", to="varying")

    fn = _smap(body, mesh, (x_spec, w_spec), out_spec, check_vma=check_vma)
    return lambda x, w: jnp.sum(jnp.sin(fn(x, w)))


_SPECS = {"varying": (P("x"), P()), "invariant": (P(), P()), "both_varying": (P("x"), P("x"))}


@pytest.mark.parametrize("check_vma", [True, False], ids=["vma", "no_vma"])
@pytest.mark.parametrize("inputs", list(_SPECS))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_grad(algorithm, inputs, check_vma):
    mesh = _mesh()
    x_spec, w_spec = _SPECS[inputs]
    x = _data((N * 3,) if x_spec == P("x") else (3,), seed=1)
    w = _data((N * 3,) if w_spec == P("x") else (3,), seed=2)

    def run(reduce):
        loss = _loss_fn(reduce, mesh, x_spec, w_spec, check_vma)
        with jax.set_mesh(mesh):
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(_put(x, mesh, x_spec), _put(w, mesh, w_spec))

    got, want = _both(run, algorithm)
    _assert_same(got, want)


@pytest.mark.parametrize("inputs", ["varying", "invariant"])
@pytest.mark.parametrize("algorithm", ["reference", "auto"])
def test_grad_sharded_out_spec(algorithm, inputs):
    mesh = _mesh()
    x_spec, w_spec = _SPECS[inputs]
    x = _data((N * 3,) if x_spec == P("x") else (3,), seed=1)
    w = _data((3,), seed=2)

    def run(reduce):
        loss = _loss_fn(reduce, mesh, x_spec, w_spec, True, out_spec=P("x"))
        with jax.set_mesh(mesh):
            return jax.jit(jax.grad(loss, argnums=(0, 1)))(_put(x, mesh, x_spec), _put(w, mesh, w_spec))

    got, want = _both(run, algorithm)
    _assert_same(got, want)


@pytest.mark.parametrize("check_vma", [True, False], ids=["vma", "no_vma"])
@pytest.mark.parametrize("spec", ["varying", "invariant"])
@pytest.mark.parametrize("algorithm", ["reference", "auto"])
def test_vjp_and_jvp(algorithm, spec, check_vma):
    mesh = _mesh()
    in_spec = P("x") if spec == "varying" else P()
    shape = (N * 3,) if spec == "varying" else (3,)
    x, tangent, cotangent = _data(shape, 1), _data(shape, 2), _data((3,), 3)

    def run(reduce):
        fn = _smap(lambda a: reduce(a, "x") ** 2, mesh, in_spec, P(), check_vma=check_vma)
        with jax.set_mesh(mesh):
            x_, t_, c_ = _put(x, mesh, in_spec), _put(tangent, mesh, in_spec), _put(cotangent, mesh, P())
            primal, pullback = jax.vjp(fn, x_)
            (ct,) = pullback(c_)
            _, tangent_out = jax.jvp(fn, (x_,), (t_,))
            linear_out = jax.linear_transpose(lambda t: jax.jvp(fn, (x_,), (t,))[1], x_)(c_)
        return primal, ct, tangent_out, linear_out

    got, want = _both(run, algorithm)
    _assert_same(got, want)


@pytest.mark.parametrize("algorithm", ["reference", "auto"])
def test_second_order(algorithm):
    mesh = _mesh()
    x = _data((3,), 4)

    def run(reduce):
        fn = _smap(lambda a: reduce(a, "x") ** 3, mesh, P(), P())
        with jax.set_mesh(mesh):
            return jax.jit(jax.hessian(lambda a: jnp.sum(fn(a))))(x)

    got, want = _both(run, algorithm)
    _assert_same(got, want, rtol=1e-4)


# ---------------------------------------------------------------- scan


@pytest.mark.parametrize("check_vma", [True, False], ids=["vma", "no_vma"])
@pytest.mark.parametrize("carry", ["varying", "invariant"])
@pytest.mark.parametrize("algorithm", ["reference", "auto"])
def test_scan_and_its_grad(algorithm, carry, check_vma):
    mesh = _mesh()
    x = _data((N * 4,), 5)
    h0 = _data((4,), 6)

    def run(reduce):
        def body(local, h, scale):
            # An invariant carry reduced as is (psum: times the axis size), or mixed with the
            # rank's own values first (a varying message).
            message = h * scale if carry == "invariant" else h * scale * local
            return reduce(message, "x") / N, None

        def shard(local, h):
            return lax.scan(functools.partial(body, local), h, jnp.linspace(0.5, 1.5, 3))[0]

        fn = _smap(shard, mesh, (P("x"), P()), P(), check_vma=check_vma)
        loss = lambda a, h: jnp.sum(jnp.cos(fn(a, h)))  # noqa: E731
        with jax.set_mesh(mesh):
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(_put(x, mesh, P("x")), _put(h0, mesh, P()))

    got, want = _both(run, algorithm)
    _assert_same(got, want)


# ---------------------------------------------------------------- pytrees


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_pytree_of_varying_and_invariant_leaves(algorithm):
    mesh = _mesh()
    x, w = _data((N * 3,), 7), _data((5,), 8)

    def run(reduce):
        def body(a, b):
            out = reduce({"a": a, "b": b, "c": (a * 2.0, b[:2])}, "x")
            return jax.tree.map(lambda leaf: jnp.sum(leaf ** 2), out)

        fn = _smap(body, mesh, (P("x"), P()), P())
        with jax.set_mesh(mesh):
            loss = lambda a, b: sum(jax.tree.leaves(fn(a, b)))  # noqa: E731
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(_put(x, mesh, P("x")), _put(w, mesh, P()))

    got, want = _both(run, algorithm)
    _assert_same(got, want, rtol=1e-4)


# ---------------------------------------------------------------- vmap axes


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("algorithm", ALGORITHMS + ["nvrar"])  # a vmap axis is psum's, whatever
def test_vmap_axis(algorithm, batched):
    xs = _data((5, 3), 9)
    c = _data((3,), 10)

    def run(reduce):
        def per_example(a, b):
            return reduce(a * b, "b") if batched else reduce(b, "b") + a

        fn = jax.vmap(per_example, in_axes=(0, None), axis_name="b")
        loss = lambda a, b: jnp.sum(fn(a, b) ** 2)  # noqa: E731
        return fn(xs, c), jax.jit(jax.grad(loss, argnums=(0, 1)))(xs, c)

    got, want = _both(run, algorithm)
    _assert_same(got, want)


def _both_or_same_error(run, algorithm):
    """As `_both`, except that where psum itself raises, all_reduce must raise the same way."""
    try:
        run(Reducer(None))
    except Exception as err:  # noqa: BLE001 - whatever psum raises, all_reduce must too
        with pytest.raises(type(err)):
            run(Reducer(algorithm))
        return None
    return _both(run, algorithm)


@pytest.mark.skipif(not hasattr(jax, "pmap"), reason="no jax.pmap in this jax")
@pytest.mark.parametrize("algorithm", ["reference", "auto"])
def test_pmap_axis(algorithm):
    x = _data((N, 3), 18)

    def run(reduce):
        fn = jax.pmap(lambda a: reduce(a, "i"), axis_name="i", devices=jax.devices()[:N])
        return fn(x), jax.grad(lambda a: jnp.sum(jnp.sin(fn(a))))(x)

    got, want = _both(run, algorithm)
    _assert_same(got, want)


# jax's own psum over a vmap axis inside a shard_map with check_vma=True fails (jax 0.10 and
# 0.11: psum makes the value varying over the vmap axis, which is no mesh axis); there
# all_reduce must fail alike, and equal psum with check_vma=False.
def _assert_vmap_case(run, algorithm, over, check_vma):
    """all_reduce as psum, or failing as psum does (only over the vmap axis with check_vma)."""
    result = _both_or_same_error(run, algorithm)
    if over == "x" or not check_vma:
        assert result is not None, "psum should work here"
    if result is not None:
        _assert_same(*result)


@pytest.mark.parametrize("check_vma", [True, False], ids=["vma", "no_vma"])
@pytest.mark.parametrize("over", ["b", "x"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_vmap_axis_inside_shard_map(algorithm, over, check_vma):
    mesh = _mesh()
    x = _data((N * 2, 3), 11)

    def run(reduce):
        per_row = jax.vmap(lambda row: reduce(row, over), axis_name="b")
        fn = _smap(per_row, mesh, P("x"), P("x") if over == "b" else P(), check_vma=check_vma)
        loss = lambda a: jnp.sum(jnp.sin(fn(a)))  # noqa: E731
        with jax.set_mesh(mesh):
            x_ = _put(x, mesh, P("x"))
            return jax.jit(fn)(x_), jax.jit(jax.grad(loss))(x_)

    _assert_vmap_case(run, algorithm, over, check_vma)


@pytest.mark.parametrize("check_vma", [True, False], ids=["vma", "no_vma"])
@pytest.mark.parametrize("over", ["b", "x"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_shard_map_inside_vmap_axis(algorithm, over, check_vma):
    mesh = _mesh()
    xs = _data((3, N * 2), 12)

    def run(reduce):
        inner = _smap(lambda a: reduce(a, over), mesh, P("x"), P("x") if over == "b" else P(),
                      check_vma=check_vma)
        fn = jax.vmap(inner, axis_name="b")
        loss = lambda a: jnp.sum(jnp.sin(fn(a)))  # noqa: E731
        with jax.set_mesh(mesh):
            xs_ = _put(xs, mesh, P(None, "x"))
            return jax.jit(fn)(xs_), jax.jit(jax.grad(loss))(xs_)

    _assert_vmap_case(run, algorithm, over, check_vma)


# ---------------------------------------------------------------- partly manual shard_map


def _mesh_2d(axis_type):
    return jax.make_mesh((2, N), ("dp", "tp"), devices=jax.devices()[: 2 * N],
                         axis_types=(axis_type,) * 2)


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_partly_manual_shard_map(algorithm, axis_type):
    mesh = _mesh_2d(getattr(jax.sharding.AxisType, axis_type))
    x = _data((2 * 3, N * 5), 13)  # dim 0 over "dp" (automatic), dim 1 over "tp" (manual)
    w = _data((2 * 3, 5), 14)

    def run(reduce):
        # A pytree: a varying leaf, an invariant one (both sharded over "dp"), a replicated one.
        fn = _smap(lambda a, b: reduce((a * b, b, jnp.sum(b)), "tp"), mesh, (P(None, "tp"), P()), P(),
                   axis_names={"tp"})
        loss = lambda a, b: sum(jnp.sum(jnp.sin(leaf)) for leaf in fn(a, b))  # noqa: E731
        with jax.set_mesh(mesh):
            args = (jax.device_put(x, NamedSharding(mesh, P("dp", "tp"))),
                    jax.device_put(w, NamedSharding(mesh, P("dp"))))
            return jax.jit(fn)(*args), jax.jit(jax.grad(loss, argnums=(0, 1)))(*args)

    got, want = _both(run, algorithm)
    _assert_same(got, want)


def test_partly_manual_nvrar_says_what_to_do():
    mesh = _mesh_2d(jax.sharding.AxisType.Explicit)
    fn = _smap(lambda a: jaxnvrar.all_reduce(a, "tp", algorithm="nvrar"), mesh, P(None, "tp"), P(),
               axis_names={"tp"})
    with jax.set_mesh(mesh), pytest.raises(NotImplementedError, match=r"manual.*'dp'.*axis_names"):
        jax.jit(fn)(jnp.ones((2, N)))


# ---------------------------------------------------------------- dtypes


@pytest.fixture
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def _reduce_dtype(reduce, host):
    mesh = _mesh()
    fn = _smap(lambda a: reduce(a, "x"), mesh, P("x"), P())
    with jax.set_mesh(mesh):
        return jax.jit(fn)(_put(host, mesh, P("x")))


_PSUM_DTYPES = [np.int32, np.uint8, np.bool_, np.complex64, np.float32]
_X64_DTYPES = [np.float64, np.int64, np.complex128]


def _host_of(dtype, seed=15):
    values = np.random.default_rng(seed).integers(-3, 4, (N * 3,))
    if np.dtype(dtype).kind == "c":
        return (values + 1j * values[::-1]).astype(dtype)
    if np.dtype(dtype).kind == "u":
        values = abs(values)
    return values.astype(dtype)


@pytest.mark.parametrize("dtype", _PSUM_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("algorithm", ["psum", "auto"])
def test_psum_and_auto_take_every_psum_dtype(algorithm, dtype):
    host = _host_of(dtype)
    got, want = _both(lambda reduce: _reduce_dtype(reduce, host), algorithm)
    _assert_same(got, want)


@pytest.mark.parametrize("dtype", _X64_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("algorithm", ["psum", "auto"])
def test_psum_and_auto_take_x64_dtypes(x64, algorithm, dtype):
    host = _host_of(dtype)
    got, want = _both(lambda reduce: _reduce_dtype(reduce, host), algorithm)
    _assert_same(got, want)
    assert np.asarray(got).dtype == np.dtype(dtype)


def test_reference_sums_float64_in_float64(x64):
    # 1 + 1e-12 per rank: float32 (or any downcast) would lose the 1e-12 entirely.
    host = np.full((N * 3,), 1.0 + 1e-12) + np.repeat(np.arange(N) * 1e-13, 3)
    got, want = _both(lambda reduce: _reduce_dtype(reduce, host), "reference")
    _assert_same(got, want, rtol=1e-15, atol=0)
    assert np.asarray(got).dtype == np.float64
    np.testing.assert_allclose(np.asarray(got) - N, N * 1e-12 + 6e-13, rtol=1e-3)


def test_pytree_with_float64_and_integer_leaves(x64):
    mesh = _mesh()
    tree = {"f64": _data((N * 3,), 16, np.float64), "f32": _data((N * 2,), 17),
            "i64": np.arange(N * 2, dtype=np.int64)}
    for algorithm in ("auto", "psum"):
        def run(reduce):
            fn = _smap(lambda t: reduce(t, "x"), mesh, P("x"), P())
            with jax.set_mesh(mesh):
                return jax.jit(fn)(jax.tree.map(lambda h: _put(h, mesh, P("x")), tree))

        got, want = _both(run, algorithm)
        _assert_same(got, want)


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.complex64], ids=lambda d: np.dtype(d).name)
def test_nvrar_refuses_dtypes_the_kernel_does_not_take(x64, dtype):
    host = _host_of(dtype)
    name = np.dtype(dtype).name
    with pytest.raises(TypeError, match=f"{name}.*psum"):
        _reduce_dtype(lambda a, ax: jaxnvrar.all_reduce(a, ax, algorithm="nvrar"), host)


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, np.bool_], ids=lambda d: np.dtype(d).name)
def test_reference_refuses_non_float_dtypes(dtype):
    host = _host_of(dtype)
    name = np.dtype(dtype).name
    with pytest.raises(TypeError, match=f"{name}.*psum"):
        _reduce_dtype(lambda a, ax: jaxnvrar.all_reduce(a, ax, algorithm="reference"), host)

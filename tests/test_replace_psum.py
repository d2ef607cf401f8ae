"""jaxnvrar.replace_psum: psum-based code, unchanged, runs with jaxnvrar.all_reduce.

algorithm="reference" runs on CPU and lowers differently from psum, so the presence of the
`jaxnvrar_all_reduce` primitive in the rewritten program proves the rewrite happened.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnvrar

pytestmark = pytest.mark.filterwarnings("error:jaxnvrar.replace_psum")  # nothing left silently

OURS = "jaxnvrar_all_reduce"


@pytest.fixture(scope="module")
def mesh():
    mesh = jax.make_mesh((4, 2), ("tp", "dp"), devices=jax.devices()[:8])
    with jax.set_mesh(mesh):
        yield mesh


def put(mesh, array, spec):
    return jax.device_put(jnp.asarray(array), NamedSharding(mesh, spec))


def randn(*shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def jaxpr_text(fn, *args):
    return str(jax.make_jaxpr(fn)(*args))


def close(a, b, tol=2e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=tol, atol=tol)


def fast(fn):
    return jaxnvrar.replace_psum(fn, algorithm="reference")


# ---------------------------------------------------------------- a plain psum-based TP MLP


def tp_mlp(mesh, check_vma=True):
    @jax.shard_map(mesh=mesh, in_specs=(P(), P(None, "tp"), P("tp", None)), out_specs=P(), check_vma=check_vma)
    def mlp(x, w_up, w_down):
        return lax.psum(jax.nn.gelu(x @ w_up) @ w_down, "tp")  # column- then row-parallel

    return mlp


def mlp_args(mesh, batch=8, hidden=16, width=32):
    return (put(mesh, randn(batch, hidden), P()),
            put(mesh, randn(hidden, width, seed=1) / 4, P(None, "tp")),
            put(mesh, randn(width, hidden, seed=2) / 6, P("tp", None)))


def test_unknown_algorithm_raises_at_replace_time():
    with pytest.raises(ValueError, match="'auto'.*'psum'.*'reference'.*'nvrar'"):
        jaxnvrar.replace_psum(lambda x: x, algorithm="nccl")


def test_mlp_forward_equals_psum_and_is_rewritten(mesh):
    mlp, args = tp_mlp(mesh), mlp_args(mesh)
    text = jaxpr_text(fast(mlp), *args)
    assert OURS in text and "psum" not in text
    close(jax.jit(fast(mlp))(*args), mlp(*args))
    close(fast(mlp)(*args), mlp(*args))  # eagerly too
    close(jax.jit(jaxnvrar.replace_psum(mlp))(*args), mlp(*args))  # "auto": psum on CPU


def test_integer_multi_axis_and_invariant_psums_stay_psum(mesh):
    @jax.shard_map(mesh=mesh, in_specs=(P("tp", "dp"), P()), out_specs=P())
    def f(x, y):
        ints = lax.psum(lax.psum(jnp.round(x * 4).astype(jnp.int32), "dp"), "tp")  # integer: psum
        both = lax.psum(x, ("tp", "dp"))                               # two axes at once: psum
        size = lax.psum(y, "tp")                                       # invariant value: pvary + psum
        one = lax.psum(lax.psum(x, "dp"), "tp")                        # one axis at a time: ours
        return ints.astype(jnp.float32) + both + one, size

    args = (put(mesh, randn(8, 4), P("tp", "dp")), put(mesh, randn(3), P()))
    text = jaxpr_text(fast(f), *args)
    assert text.count(OURS) == 2 and text.count("psum_invariant") == 4
    close(jax.jit(fast(f))(*args), f(*args))


def test_a_value_made_varying_over_another_axis_is_still_reduced(mesh):
    # pcast over "dp" leaves a value that varies over "tp" varying over "tp": its psum over "tp"
    # is a real all-reduce (only a psum over an axis the value was made varying over is left
    # as jax wrote it). Before, every pvary output was taken as invariant and that psum stayed.
    @jax.shard_map(mesh=mesh, in_specs=P("tp"), out_specs=P())
    def f(v):
        return lax.psum(lax.psum(lax.pcast(v, "dp", to="varying"), "tp"), "dp")

    x = put(mesh, randn(8, 4), P("tp"))
    text = jaxpr_text(fast(f), x)
    assert text.count(OURS) == 2 and "psum" not in text, text
    close(jax.jit(fast(f))(x), f(x))


def test_unsupported_dtype_stays_psum_and_nvrar_without_runtime_raises(mesh):
    @jax.shard_map(mesh=mesh, in_specs=P("tp"), out_specs=P())
    def f(x):
        return lax.psum(x, "tp"), lax.psum(x.astype(jnp.int8), "tp")

    x = put(mesh, randn(8, 4), P("tp"))
    text = jaxpr_text(fast(f), x)
    assert text.count(OURS) == 1 and text.count("psum") == 1  # the int8 psum stays
    close(jax.jit(fast(f))(x), f(x))
    # "nvrar" means the kernel: without jaxnvrar.initialize() (here: no GPU) it raises, naming
    # what is missing, instead of running psum under the kernel's name.
    if not jaxnvrar.is_initialized():
        with pytest.raises(RuntimeError, match=r"jaxnvrar\.initialize\(\)"):
            jaxnvrar.replace_psum(f, algorithm="nvrar")(x)


def test_partly_manual_and_nested_shard_maps(mesh):
    def outer(v):  # manual over "tp"; inside, a shard_map manual over "dp"
        inner = jax.shard_map(lambda w: lax.psum(w, "dp"), in_specs=P(None, "dp"), out_specs=P(), axis_names={"dp"})
        return lax.psum(inner(v), "tp")

    f = jax.jit(jax.shard_map(outer, mesh=mesh, in_specs=P("tp"), out_specs=P(), axis_names={"tp"}))
    x = put(mesh, randn(8, 8), P("tp", "dp"))
    assert jaxpr_text(fast(f), x).count(OURS) == 2
    close(jax.jit(fast(f))(x), f(x))


def test_pytrees_kwargs_and_static_arguments(mesh):
    @jax.shard_map(mesh=mesh, in_specs=(P("tp"), P("tp")), out_specs=P())
    def body(a, b):
        return {"sum": lax.psum(a["x"] * b, "tp"), "mean": lax.pmean(a["y"], "tp")}

    def fn(a, b, *, scale, name="ignored"):
        assert isinstance(scale, float) and isinstance(name, str)  # not traced
        out = body(a, b)
        return out["sum"] * scale, [out["mean"]]

    a = {"x": put(mesh, randn(8, 3), P("tp")), "y": put(mesh, randn(8, 2, dtype=jnp.bfloat16), P("tp"))}
    b = put(mesh, randn(8, 3, seed=3), P("tp"))
    got = fast(fn)(a, b, scale=2.0, name="x")
    want = fn(a, b, scale=2.0, name="x")
    assert jax.tree.structure(got) == jax.tree.structure(want)
    close(got, want, tol=1e-2)
    assert jaxpr_text(lambda a, b: fast(fn)(a, b, scale=2.0), a, b).count(OURS) == 2


# ---------------------------------------------------------------- gradients


def loss_of(fn):
    return lambda *args: jnp.sum(jnp.sin(fn(*args)))


def test_gradients_of_fn_are_rewritten(mesh):
    mlp, args = tp_mlp(mesh), mlp_args(mesh)
    grad = jax.grad(loss_of(mlp), argnums=(0, 1, 2))
    text = jaxpr_text(fast(grad), *args)
    # the forward psum and the backward one of dx (the transpose of x's pvary)
    assert text.count(OURS) == 2 and "psum" not in text
    close(jax.jit(fast(grad))(*args), grad(*args), tol=1e-4)


def test_gradients_of_the_replaced_function(mesh):
    mlp, args = tp_mlp(mesh), mlp_args(mesh)
    grad = jax.grad(loss_of(fast(mlp)), argnums=(0, 1, 2))
    text = jaxpr_text(grad, *args)
    assert text.count(OURS) == 2 and "psum" not in text  # dx's all-reduce is ours too
    close(jax.jit(grad)(*args), jax.grad(loss_of(mlp), argnums=(0, 1, 2))(*args), tol=1e-4)
    # and of the replaced per-shard body, inside the user's shard_map
    body = lambda x, w_up, w_down: lax.psum(jax.nn.gelu(x @ w_up) @ w_down, "tp")  # noqa: E731
    specs = dict(mesh=mesh, in_specs=(P(), P(None, "tp"), P("tp", None)), out_specs=P())
    inner = jax.grad(loss_of(jax.shard_map(fast(body), **specs)), argnums=(0, 1, 2))
    assert jaxpr_text(inner, *args).count(OURS) == 2
    close(jax.jit(inner)(*args), jax.grad(loss_of(mlp), argnums=(0, 1, 2))(*args), tol=1e-4)


def test_unchecked_shard_map(mesh):
    mlp, args = tp_mlp(mesh, check_vma=False), mlp_args(mesh)
    assert OURS in jaxpr_text(fast(mlp), *args)
    close(jax.jit(fast(mlp))(*args), mlp(*args))
    want = jax.grad(loss_of(mlp), argnums=(0, 1, 2))(*args)
    # all_reduce's transpose there is an all-reduce, as psum's is: ours in the backward pass too
    # (shard_map's own transpose adds psums over the axes the inputs are not split over: those stay)
    assert jaxpr_text(jax.grad(loss_of(fast(mlp)), argnums=(0, 1, 2)), *args).count(OURS) == 2
    close(jax.jit(jax.grad(loss_of(fast(mlp)), argnums=(0, 1, 2)))(*args), want, tol=1e-4)
    close(jax.jit(fast(jax.grad(loss_of(mlp), argnums=(0, 1, 2))))(*args), want, tol=1e-4)


def test_vmap_of_the_replaced_function(mesh):
    @jax.shard_map(mesh=mesh, in_specs=P(None, "tp"), out_specs=P())
    def f(x):
        return lax.psum(jnp.tanh(x), "tp")

    xs = put(mesh, randn(3, 8, 16), P(None, None, "tp"))
    close(jax.jit(jax.vmap(fast(f)))(xs), jax.vmap(f)(xs))


# ---------------------------------------------------------------- psums nested in other jaxprs


def _red(v):
    return lax.psum(v, "tp")


@jax.custom_vjp
def _custom_vjp(v):
    return _red(v) * 2


_custom_vjp.defvjp(lambda v: (_custom_vjp(v), None), lambda _, g: (lax.pcast(2 * g, "tp", to="varying"),))


@jax.custom_jvp
def _custom_jvp(v):
    return _red(v) * 3


_custom_jvp.defjvp(lambda primals, tangents: (_custom_jvp(*primals), 3 * _red(tangents[0])))

NESTED = {
    "scan": lambda v: lax.scan(lambda c, _: (c + 0.5 * _red(v * jnp.cos(c)), None), jnp.zeros(v.shape), None, 3)[0],
    "cond": lambda v: lax.cond(v[0, 0] > 0, _red, lambda v: 2 * _red(v), v),
    "while_loop": lambda v: lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] + _red(v)),
                                           (0, jnp.zeros(v.shape, v.dtype)))[1],
    "remat": jax.checkpoint(lambda v: _red(jnp.sin(v))),
    "custom_vjp": _custom_vjp,
    "custom_jvp": _custom_jvp,
    "nested_jit": jax.jit(lambda v: _red(jnp.cos(v))),
}


@pytest.mark.parametrize("check_vma", [True, False], ids=["check_vma", "unchecked"])
@pytest.mark.parametrize("kind", list(NESTED))
def test_nested_psums_are_rewritten(mesh, kind, check_vma):
    f = jax.jit(jax.shard_map(lambda v: NESTED[kind](v * 1.0), mesh=mesh, in_specs=P(None, "tp"), out_specs=P(),
                              check_vma=check_vma))
    x = put(mesh, randn(8, 16), P(None, "tp"))
    assert OURS in jaxpr_text(fast(f), x)
    close(jax.jit(fast(f))(x), f(x))
    if kind == "while_loop":
        return  # not reverse-differentiable
    want = jax.grad(loss_of(f))(x)
    close(jax.jit(jax.grad(loss_of(fast(f))))(x), want, tol=1e-4)
    grad_text = jaxpr_text(fast(jax.grad(loss_of(f))), x)
    assert OURS in grad_text and "psum" not in grad_text
    close(jax.jit(fast(jax.grad(loss_of(f))))(x), want, tol=1e-4)


# ---------------------------------------------------------------- a psum-based transformer layer


def transformer_layer(mesh, heads=4, head_dim=8):
    """Megatron-style: attention heads and MLP columns split over "tp", psum after each block."""

    def rms(x):
        return x * lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + 1e-6)

    @jax.shard_map(mesh=mesh, in_specs=(P(), P(None, "tp"), P("tp", None), P(None, "tp"), P("tp", None), P()),
                   out_specs=P())
    def layer(x, wqkv, wo, w_up, w_down, w_lm):
        t = x.shape[0]
        qkv = rms(x) @ wqkv                                               # [t, 3 * local heads * hd]
        q, k, v = jnp.split(qkv.reshape(t, 3, -1, head_dim), 3, axis=1)
        scores = jnp.einsum("qhd,khd->hqk", q[:, 0], k[:, 0]) / np.sqrt(head_dim)
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
        attn = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(scores, -1), v[:, 0]).reshape(t, -1)
        x = x + lax.psum(attn @ wo, "tp")
        x = x + lax.psum(jax.nn.silu(rms(x) @ w_up) @ w_down, "tp")
        return rms(x) @ w_lm

    return layer


def test_transformer_layer_tokens_and_values_equal(mesh):
    heads, head_dim, dim, width, vocab, t = 4, 8, 32, 64, 50, 6
    # wqkv columns are laid out per rank: [q, k, v] of that rank's heads, as a loader would shard them.
    args = (put(mesh, randn(t, dim), P()),
            put(mesh, randn(dim, 3 * heads * head_dim, seed=1) / 6, P(None, "tp")),
            put(mesh, randn(heads * head_dim, dim, seed=2) / 6, P("tp", None)),
            put(mesh, randn(dim, width, seed=3) / 6, P(None, "tp")),
            put(mesh, randn(width, dim, seed=4) / 8, P("tp", None)),
            put(mesh, randn(dim, vocab, seed=5), P()))
    layer = transformer_layer(mesh, heads, head_dim)
    want = jax.jit(layer)(*args)
    got = jax.jit(fast(layer))(*args)
    assert jaxpr_text(fast(layer), *args).count(OURS) == 2
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(want, -1))  # tokens
    close(got, want, tol=1e-4)                                               # values


# ---------------------------------------------------------------- the example


def test_example_runs_on_cpu():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAXNVRAR_NUM_PROCESSES", None)
    script = Path(__file__).resolve().parent.parent / "examples" / "replace_psum.py"
    result = subprocess.run([sys.executable, str(script), "--time", "--steps", "3", "--repeats", "2"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "equal: True" in result.stdout and "median step" in result.stdout


def test_the_rewrite_is_traced_once_per_argument_structure(mesh):
    # Eager calls reuse the compiled rewrite (a retrace per call cost 150-290 ms on CPU).
    traces = []

    def f(x, scale):
        traces.append(scale)
        return jax.shard_map(lambda v: lax.psum(v * scale, "tp"), mesh=mesh, in_specs=P("tp"), out_specs=P())(x)

    replaced = fast(f)
    x = put(mesh, randn(8, 4), P("tp"))
    for _ in range(3):
        close(replaced(x, 2.0), f(x, 2.0))
    assert traces.count(2.0) == 1 + 3  # one trace of the rewrite, three of f run as written
    replaced(x, 3.0)
    assert traces.count(3.0) == 1  # another constant: traced again

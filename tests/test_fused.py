"""jaxnvrar.all_reduce_rms_norm against the unfused composition: all-reduce, residual add, and
the Llama's RMSNorm (jaxnvrar.models.llama.RMSNorm). Values, types, transformations, errors,
and the Llama's layers calling it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import jaxnvrar
from helpers import global_array, needs_devices_in_one_process
from jaxnvrar.primitive import varying_axes

pytest.importorskip("flax")

from jaxnvrar.models import llama  # noqa: E402

AXIS = "tp"
EPS = 1e-5
HIDDEN = 48
TP = 4


@pytest.fixture(autouse=True)
def _fused_kernel_path(monkeypatch):
    # The fused kernel's path (opt-in): with it, "reference" takes the very primitive that
    # "nvrar" lowers to the kernel, so every test here covers that path's types, derivatives,
    # vmap and numerics against the composition.
    monkeypatch.setenv("JAXNVRAR_FUSED_NORM", "1")


def _mesh(tp=TP):
    return jax.make_mesh((tp,), (AXIS,), devices=jax.devices()[:tp])


def _inputs(dtype, shape=(2, 3, HIDDEN), ranks=TP, seed=0):
    """Per-rank partial sums [ranks, *shape], a residual and a weight (replicated)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((ranks,) + shape).astype(jnp.dtype(dtype))
    residual = (3 * rng.standard_normal(shape)).astype(jnp.dtype(dtype))
    weight = (1 + 0.1 * rng.standard_normal(shape[-1])).astype(jnp.dtype(dtype))
    return x, residual, weight


def _unfused(x, residual, weight, algorithm="psum", eps=EPS):
    """What the Llama did before: all-reduce, add in the residual's dtype, the Llama's RMSNorm."""
    reduced = lax.psum(x, AXIS) if algorithm == "psum" else jaxnvrar.all_reduce(x, AXIS, algorithm=algorithm)
    residual_out = residual + reduced
    return llama.RMSNorm(weight, eps)(residual_out), residual_out


def _fused(algorithm):
    return lambda x, residual, weight: jaxnvrar.all_reduce_rms_norm(x, residual, weight, AXIS, eps=EPS,
                                                                     algorithm=algorithm)


def _run(fn, x, residual, weight, mesh, check_vma=True):
    """fn per rank over `mesh` (x split over the axis, the rest replicated), jitted; results with
    out_specs P(): accepted only where both are typed invariant over the axis."""
    mapped = jax.jit(jax.shard_map(lambda a, r, w: fn(a[0], r, w), mesh=mesh, in_specs=(P(AXIS), P(), P()),
                                   out_specs=(P(), P()), check_vma=check_vma))
    with jax.set_mesh(mesh):
        out = mapped(global_array(x, mesh, P(AXIS)), global_array(residual, mesh, P()),
                     global_array(weight, mesh, P()))
    return tuple(np.asarray(o) for o in out)


def _assert_bits(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert g.tobytes() == w.tobytes(), f"max difference {np.max(np.abs(g.astype(np.float64) - w))}"


DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("algorithm", ["psum", "auto", "reference"])
def test_equals_the_unfused_composition(algorithm, dtype):
    # Bit for bit against psum + add + the Llama's RMSNorm for "psum" and "auto" (which picks
    # psum on CPU); "reference" sums in another order: bit for bit against its own all-reduce
    # followed by the add and the norm (the same ops), within rounding against psum's.
    needs_devices_in_one_process(TP)
    mesh = _mesh()
    x, residual, weight = _inputs(dtype)
    got = _run(_fused(algorithm), x, residual, weight, mesh)
    assert got[0].dtype == jnp.dtype(dtype) and got[1].dtype == jnp.dtype(dtype)
    if algorithm in ("psum", "auto"):
        _assert_bits(got, _run(_unfused, x, residual, weight, mesh))
    else:
        _assert_bits(got, _run(lambda *a: _unfused(*a, algorithm=algorithm), x, residual, weight, mesh))
        want = _run(_unfused, x, residual, weight, mesh)
        tol = 8 * float(jnp.finfo(dtype).eps)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=tol, atol=tol * 8)
    # And the values themselves, in numpy: residual + sum, then the float32 RMSNorm.
    residual_out = (residual.astype(np.float64) + x.astype(np.float64).sum(0))
    h = residual_out.astype(np.float32)
    normed = weight.astype(np.float64) * h / np.sqrt(np.mean(h.astype(np.float64) ** 2, -1, keepdims=True) + EPS)
    tol = 16 * float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(got[1].astype(np.float64), residual_out, rtol=tol, atol=tol * 8)
    np.testing.assert_allclose(got[0].astype(np.float64), normed, rtol=tol, atol=tol * 8)


def test_float32_weight_with_bfloat16_activations_returns_bfloat16():
    # The product with the weight follows dtype promotion (as the Llama's RMSNorm); the result
    # is returned in x's dtype.
    needs_devices_in_one_process(TP)
    mesh = _mesh()
    x, residual, _ = _inputs(jnp.bfloat16)
    weight = np.linspace(0.5, 1.5, HIDDEN).astype(np.float32)
    normed, residual_out = _run(_fused("psum"), x, residual, weight, mesh)
    assert normed.dtype == residual_out.dtype == jnp.bfloat16
    want_normed, want_residual = _run(_unfused, x, residual, weight, mesh)
    assert want_normed.dtype == np.float32  # the Llama's RMSNorm would promote
    _assert_bits((normed, residual_out), (want_normed.astype(jnp.bfloat16), want_residual))


def test_in_lax_scan_over_layers():
    # The Llama's loop as a scan: per layer a partial sum, the residual carried, one norm weight.
    needs_devices_in_one_process(TP)
    mesh, layers = _mesh(), 3
    rng = np.random.default_rng(2)
    x = rng.standard_normal((TP, layers, 2, HIDDEN)).astype(np.float32)
    residual = rng.standard_normal((2, HIDDEN)).astype(np.float32)
    weights = (1 + 0.1 * rng.standard_normal((layers, HIDDEN))).astype(np.float32)

    def scanned(step):
        def body(carry, xs):
            partial, weight = xs
            normed, residual = step(partial * (1 + carry[0]), carry[1], weight)  # depends on the carry
            return (normed, residual), normed

        def fn(a, r, w):
            (normed, residual), stack = lax.scan(body, (jnp.zeros_like(r), r), (a[0], w))
            return stack, residual

        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(AXIS), P(), P()), out_specs=(P(), P())))

    with jax.set_mesh(mesh):
        args = (global_array(x, mesh, P(AXIS)), global_array(residual, mesh, P()), global_array(weights, mesh, P()))
        got = [np.asarray(o) for o in scanned(_fused("psum"))(*args)]
        want = [np.asarray(o) for o in scanned(_unfused)(*args)]
        traced = jax.make_jaxpr(scanned(_fused("psum")))(*args)
    assert "scan" in str(traced)
    _assert_bits(got, want)
    assert got[0].shape == (layers, 2, HIDDEN)


def test_over_one_axis_of_a_2d_mesh():
    # ("dp", "tp"): reduced over "tp" only; the results vary over "dp" (out_specs P("dp")).
    needs_devices_in_one_process(8)
    mesh = jax.make_mesh((2, 4), ("dp", AXIS))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 5, HIDDEN)).astype(np.float32)  # [dp, tp, rows, hidden]
    residual = rng.standard_normal((2, 5, HIDDEN)).astype(np.float32)  # [dp, rows, hidden]
    weight = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)

    def run(fn):
        mapped = jax.jit(jax.shard_map(lambda a, r, w: tuple(o[None] for o in fn(a[0, 0], r[0], w)), mesh=mesh,
                                       in_specs=(P("dp", AXIS), P("dp"), P()), out_specs=(P("dp"), P("dp"))))
        with jax.set_mesh(mesh):
            out = mapped(global_array(x, mesh, P("dp", AXIS)), global_array(residual, mesh, P("dp")),
                         global_array(weight, mesh, P()))
        return [np.asarray(o) for o in out]

    for algorithm in ("psum", "auto", "reference"):
        got = run(_fused(algorithm))
        _assert_bits(got, run(lambda *a, alg=algorithm: _unfused(*a, algorithm=alg)))
        assert got[1].shape == (2, 5, HIDDEN)
    np.testing.assert_allclose(got[1], residual + x.sum(1), rtol=1e-5, atol=1e-5)  # dp rows apart


@pytest.mark.parametrize("algorithm", ["psum", "reference"])
def test_gradients_equal_the_unfused_composition(algorithm):
    needs_devices_in_one_process(TP)
    mesh = _mesh()
    x, residual, weight = _inputs(jnp.float32, seed=4)
    rng = np.random.default_rng(5)
    c_normed, c_residual = rng.standard_normal((2,) + residual.shape).astype(np.float32)

    def loss(fn):
        def per_rank(a, r, w):
            normed, residual_out = fn(a[0], r, w)
            return normed, residual_out

        mapped = jax.shard_map(per_rank, mesh=mesh, in_specs=(P(AXIS), P(), P()), out_specs=(P(), P()))

        def total(a, r, w):
            normed, residual_out = mapped(a, r, w)
            return jnp.sum(normed * c_normed) + jnp.sum(jnp.sin(residual_out) * c_residual)

        return jax.jit(jax.grad(total, argnums=(0, 1, 2)))

    with jax.set_mesh(mesh):
        args = (global_array(x, mesh, P(AXIS)), global_array(residual, mesh, P()), global_array(weight, mesh, P()))
        got = [np.asarray(g) for g in loss(_fused(algorithm))(*args)]
        want = [np.asarray(g) for g in loss(lambda *a: _unfused(*a, algorithm=algorithm))(*args)]
    _assert_bits(got, want)
    assert all(np.abs(g).max() > 0 for g in got)  # every argument has a gradient


def test_results_are_typed_invariant_like_psum():
    # With check_vma on, both results are invariant over the axis: out_specs=P() is accepted
    # (it refuses a varying value, as a sum that was never reduced would be).
    needs_devices_in_one_process(TP)
    mesh = _mesh()
    x, residual, weight = _inputs(jnp.float32)
    seen = []

    def fn(a, r, w):
        out = jaxnvrar.all_reduce_rms_norm(a, r, w, AXIS, algorithm="reference")
        seen.extend(varying_axes(jax.typeof(o)) for o in out)
        return out

    _run(fn, x, residual, weight, mesh, check_vma=True)
    assert seen == [frozenset(), frozenset()]
    # The unreduced sum is refused by the same out_specs: the check has teeth.
    with pytest.raises(Exception, match="vary|varying|out_specs"):
        _run(lambda a, r, w: llama.reduction.norm_reducer("none")(a, r, w, EPS), x, residual, weight, mesh)
    # A residual that varies over the axis gives varying results.
    seen.clear()
    varying = jax.jit(jax.shard_map(lambda a, r, w: fn(a[0], a[0], w)[1][None], mesh=mesh,
                                    in_specs=(P(AXIS), P(), P()), out_specs=P(AXIS)))
    with jax.set_mesh(mesh):
        varying(global_array(x, mesh, P(AXIS)), global_array(residual, mesh, P()), global_array(weight, mesh, P()))
    assert seen == [frozenset({AXIS})] * 2


def _bad(**changes):
    x, residual, weight = _inputs(jnp.float32)
    args = {"x": x, "residual": residual, "weight": weight}
    for name, change in changes.items():
        args[name] = change(args[name])
    return args


BAD_INPUTS = [
    (dict(x=lambda a: a.astype(np.int32)), TypeError, "x must have a floating-point dtype"),
    (dict(x=lambda a: a.astype(np.int32), residual=lambda a: a.astype(np.int32)), TypeError,
     "x must have a floating-point dtype, got int32"),
    (dict(residual=lambda a: a[:, :2]), ValueError, r"residual has shape \(2, 2, 48\) but x has \(2, 3, 48\)"),
    (dict(residual=lambda a: a.astype(np.float16)), TypeError, "residual has dtype float16 but x has float32"),
    (dict(residual=lambda a: a.astype(np.int32)), TypeError, "residual must have a floating-point dtype"),
    (dict(weight=lambda a: a[:-1]), ValueError, r"weight must be \[hidden\] = \(48,\).*got shape \(47,\)"),
    (dict(weight=lambda a: np.stack([a, a])), ValueError, r"weight must be \[hidden\].*got shape \(2, 48\)"),
    (dict(weight=lambda a: a.astype(np.int32)), TypeError, "weight must have a floating-point dtype"),
]


@pytest.mark.parametrize("changes,error,message", BAD_INPUTS, ids=lambda v: str(v)[:40])
def test_bad_inputs_raise_naming_the_argument(changes, error, message):
    needs_devices_in_one_process(TP)
    mesh = _mesh()
    args = _bad(**changes)
    with pytest.raises(error, match=f"all_reduce_rms_norm: {message}"):
        _run(_fused("psum"), args["x"], args["residual"], args["weight"], mesh)


def test_bad_scalars_eps_and_algorithm_raise_naming_them():
    x, residual, weight = _inputs(jnp.float32)
    fused = jaxnvrar.all_reduce_rms_norm
    with pytest.raises(ValueError, match="x must be .* got a scalar"):
        fused(np.float32(1), np.float32(1), weight[:1], AXIS)
    with pytest.raises(ValueError, match="eps must be >= 0, got -0.1"):
        fused(x[0], residual, weight, AXIS, eps=-0.1)
    with pytest.raises(TypeError, match="eps must be a number"):
        fused(x[0], residual, weight, AXIS, eps="small")
    with pytest.raises(ValueError, match=r"algorithm must be one of .*got 'nccl'"):
        fused(x[0], residual, weight, AXIS, algorithm="nccl")
    with pytest.raises(TypeError, match="add_rms_norm: weight must have a floating-point dtype"):
        jaxnvrar.fused.add_rms_norm(x[0], residual, weight.astype(np.int32))


def test_nvrar_without_the_runtime_raises_naming_initialize():
    needs_devices_in_one_process(2)
    if jaxnvrar.is_initialized():
        pytest.skip("the runtime is up in this process")
    mesh = _mesh(2)
    x, residual, weight = _inputs(jnp.float32, ranks=2)
    with pytest.raises(RuntimeError, match=r"jaxnvrar\.initialize\(\)"):
        _run(_fused("nvrar"), x, residual, weight, mesh)


def test_add_rms_norm_only_adds_and_normalizes():
    x, residual, weight = _inputs(jnp.bfloat16)
    got = [np.asarray(o) for o in jax.jit(jaxnvrar.fused.add_rms_norm)(x[0], residual, weight)]
    want = jax.jit(lambda a, r, w: (llama.RMSNorm(w, EPS)(r + a), r + a))(x[0], residual, weight)
    _assert_bits(got, [np.asarray(o) for o in want])  # both jitted: eager ops may round otherwise


# ---------------------------------------------------------------- the Llama's layers


def test_llama_layers_end_each_block_in_the_fused_op(monkeypatch):
    # Two calls per layer, with the post-attention norm's and the next norm's eps; "none" calls
    # add_rms_norm instead (no reduction), and the logits are those of the composition.
    needs_devices_in_one_process(2)
    calls = []
    real = jaxnvrar.all_reduce_rms_norm

    def spy(x, residual, weight, axis_name, **kwargs):
        calls.append((x.shape, axis_name, kwargs["algorithm"], kwargs["eps"]))
        return real(x, residual, weight, axis_name, **kwargs)

    monkeypatch.setattr(jaxnvrar, "all_reduce_rms_norm", spy)
    model = llama.random_model("tiny", llama.make_mesh(2), all_reduce="reference", num_layers=3,
                               dtype=jnp.float32)
    llama.forward_logits(model, np.zeros((1, 4), np.int32))
    eps = model.config.rms_norm_eps
    assert calls == [((1, 4, model.config.hidden_size), llama.TP, "reference", eps)] * 6


def test_llama_nvrar_falls_back_to_psum_past_the_workspace(monkeypatch):
    # With the runtime up (pretended) a message that outgrows the workspace goes to psum,
    # recorded in psum_fallbacks, through the fused op as through the plain reducer.
    needs_devices_in_one_process(TP)
    from jaxnvrar.models.llama import reduction

    monkeypatch.setattr(jaxnvrar, "is_initialized", lambda: True)
    monkeypatch.setattr(reduction, "fits_workspace", lambda *args: False)
    monkeypatch.setattr(reduction, "psum_fallbacks", [])
    mesh = _mesh()
    x, residual, weight = _inputs(jnp.float32)
    reduce_norm = reduction.norm_reducer("nvrar")
    got = _run(lambda a, r, w: reduce_norm(a, r, w, EPS), x, residual, weight, mesh)
    _assert_bits(got, _run(_unfused, x, residual, weight, mesh))
    assert reduction.psum_fallbacks == [((2, 3, HIDDEN), "float32")]


def _primitives(fn, x, residual, weight, mesh):
    mapped = jax.shard_map(lambda a, r, w: fn(a[0], r, w), mesh=mesh, in_specs=(P(AXIS), P(), P()),
                           out_specs=(P(), P()))
    with jax.set_mesh(mesh):
        args = (global_array(x, mesh, P(AXIS)), global_array(residual, mesh, P()), global_array(weight, mesh, P()))
        return str(jax.make_jaxpr(mapped)(*args))


def test_reference_takes_the_kernels_fused_primitive_exactly_where_the_kernel_would(monkeypatch):
    # With JAXNVRAR_FUSED_NORM=1, "reference" runs the primitive that "nvrar" lowers to the
    # kernel (lowered to the schedule here), so these CPU tests cover the kernel path's types,
    # derivatives and vmap rule; calls the kernel does not take (rows of a partial 16-byte
    # vector, weight in another dtype) run the composition, and so does every call by default.
    needs_devices_in_one_process(TP)
    mesh = _mesh()
    fused = "jaxnvrar_all_reduce_rms_norm"
    assert fused in _primitives(_fused("reference"), *_inputs(jnp.bfloat16), mesh)
    assert fused not in _primitives(_fused("reference"), *_inputs(jnp.bfloat16, shape=(2, 12)), mesh)
    x, residual, weight = _inputs(jnp.bfloat16)
    assert fused not in _primitives(_fused("reference"), x, residual, weight.astype(np.float32), mesh)
    assert fused not in _primitives(_fused("psum"), x, residual, weight, mesh)
    monkeypatch.setenv("JAXNVRAR_FUSED_NORM", "0")  # the default: the composition
    assert fused not in _primitives(_fused("reference"), x, residual, weight, mesh)
    monkeypatch.delenv("JAXNVRAR_FUSED_NORM")
    assert fused not in _primitives(_fused("reference"), x, residual, weight, mesh)


@pytest.mark.parametrize("x_axis,weight_axis", [(0, None), (0, 0), (0, 1), (None, None)])
def test_vmap_inside_shard_map_equals_each_example_alone(x_axis, weight_axis):
    # A batched weight on either axis, and an unbatched x (reduced once, then broadcast).
    needs_devices_in_one_process(TP)
    mesh = _mesh()
    x, residual, weight = _inputs(jnp.float32, shape=(3, 2, HIDDEN), seed=6)
    if x_axis is None:
        x = np.broadcast_to(x[:, :1], x.shape).copy()  # the same partial sum for every example
    batched_weight = weight_axis is not None
    weights = np.stack([weight, 2 * weight, weight - 0.5]) if batched_weight else weight
    if weight_axis == 1:
        weights = weights.T.copy()

    def per_rank(a, r, w):
        a = a[0] if x_axis is not None else a[0][0]
        return jax.vmap(_fused("reference"), in_axes=(x_axis, 0, weight_axis))(a, r, w)

    mapped = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=(P(AXIS), P(), P()), out_specs=(P(), P())))
    with jax.set_mesh(mesh):
        got = [np.asarray(o) for o in mapped(global_array(x, mesh, P(AXIS)), global_array(residual, mesh, P()),
                                             global_array(weights, mesh, P()))]
    for i in range(3):
        w = (weights[i] if weight_axis == 0 else weights[:, i]) if batched_weight else weight
        want = _run(_fused("reference"), x[:, i], residual[i], w, mesh)
        _assert_bits([got[0][i], got[1][i]], want)


def test_forward_mode_derivative_equals_the_unfused_composition():
    needs_devices_in_one_process(TP)
    mesh = _mesh()
    x, residual, weight = _inputs(jnp.float32, seed=7)
    rng = np.random.default_rng(8)
    tangents = (rng.standard_normal(x.shape).astype(np.float32),
                rng.standard_normal(residual.shape).astype(np.float32),
                rng.standard_normal(weight.shape).astype(np.float32))

    def jvp_of(fn):
        def per_rank(a, r, w, da, dr, dw):
            return jax.jvp(lambda *p: fn(p[0][0], p[1], p[2]), (a, r, w), (da, dr, dw))[1]

        spec = (P(AXIS), P(), P())
        return jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=spec + spec, out_specs=(P(), P())))

    with jax.set_mesh(mesh):
        args = [global_array(v, mesh, s) for v, s in zip((x, residual, weight) + tangents, (P(AXIS), P(), P()) * 2)]
        got = [np.asarray(t) for t in jvp_of(_fused("reference"))(*args)]
        want = [np.asarray(t) for t in jvp_of(lambda *a: _unfused(*a, algorithm="reference"))(*args)]
    _assert_bits(got, want)


def test_nvrar_lowers_for_cuda_to_one_fused_custom_call():
    # Lowered for CUDA from this CPU machine (no GPU needed): the primitive becomes one call of
    # the fused FFI target with the kernel's attributes and eps, and nothing of the norm in XLA.
    needs_devices_in_one_process(2)
    from jaxnvrar.primitive import all_reduce_rms_norm_p

    mesh = _mesh(2)

    def per_rank(x, r, w):
        return tuple(all_reduce_rms_norm_p.bind(x[0], r, w, axis_name=AXIS, num_ranks=2, gpus_per_node=2,
                                                algorithm="nvrar", check_vma=True, auto=False, eps=1e-6))

    def spec(shape, p):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=jax.NamedSharding(mesh, p))

    fn = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=(P(AXIS), P(), P()), out_specs=(P(), P())))
    with jax.set_mesh(mesh):
        text = fn.trace(spec((2, 4, 4096), P(AXIS)), spec((4, 4096), P()), spec((4096,), P())).lower(
            lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
    assert len(calls) == 1 and "@jaxnvrar_nvrar_all_reduce_rms_norm(" in calls[0], calls
    assert "eps = 9.99999997E-7 : f32" in calls[0] and "one_shot" in calls[0] and "has_side_effect = true" in calls[0]
    assert "rsqrt" not in text

"""`replace_psum`: run a function written with `lax.psum` with `jaxnvrar.all_reduce` in its place.

    fast = jaxnvrar.replace_psum(model_step, algorithm="auto")

`fn` is traced to a jaxpr (`jax.make_jaxpr`) and evaluated by a small interpreter that binds
every equation again. An all-reduce of a varying float32/bfloat16/float16 value over ONE
manual mesh axis (`psum_invariant`; `psum` where shard_map has check_vma=False) becomes
`jaxnvrar.all_reduce(x, axis, algorithm=algorithm)`. Equations whose params hold jaxprs
(shard_map, jit, scan, cond, while_loop, checkpoint, the primal of custom_jvp/custom_vjp) are
bound with those jaxprs rewritten the same way, traced again with the same input types, so
the program keeps its signature and its vma typing. Everything else is bound as it was, and
what cannot be rewritten stays psum: integer and other dtypes, several axes at once,
axis_index_groups, psums of an invariant value (pvary then psum: a multiplication), psums
outside shard_map (pmap, vmap axes), a psum the kernel refuses, custom_jvp/custom_vjp rules.

Gradients: psums in a traced `jax.grad(...)` are rewritten like any other. When the replaced
function is itself differentiated, the all-reduces of the backward pass come from the
transposes of pvary (the broadcast of an invariant value into varying computation): those
pvarys are bound as `jaxnvrar_pvary`, identical in the forward pass, whose transpose is
`jaxnvrar.all_reduce` (under check_vma=False, all_reduce's own transpose is an all-reduce,
as psum's is there).
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import jax
import numpy as np
from jax import lax
from jax.extend import source_info_util
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, Primitive
from jax.interpreters import ad, batching, mlir

from jaxnvrar.api import ALGORITHMS, SUPPORTED_DTYPES, all_reduce

_PSUMS = ("psum", "psum_invariant")  # psum_invariant: check_vma=True; psum: check_vma=False
_REWRITTEN = (*_PSUMS, "pvary")


def replace_psum(fn, *, algorithm: str = "auto"):
    """``fn`` with its float psums over one mesh axis done by `jaxnvrar.all_reduce`.

    Same signature and pytrees as ``fn``, works under `jax.jit`, `jax.grad` and `jax.vmap`,
    and results equal ``fn``'s within the dtype's rounding. Arguments that are not arrays
    (Python scalars, strings, ...) are passed to ``fn`` as they are, as constants. The rewritten
    program is compiled once per argument structure and types, as `jax.jit` does (fn's Python
    side effects run when it is traced, not at every call).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"replace_psum: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    compiled: dict = {}  # (pytree, which leaves are arrays, the other leaves) -> jitted rewrite

    def rewritten(tree, dynamic, leaves):
        def run(*arrays):
            def flat_fn(*arrays):
                arrays = iter(arrays)
                full = [next(arrays) if dyn else leaf for leaf, dyn in zip(leaves, dynamic)]
                a, k = jax.tree.unflatten(tree, full)
                return fn(*a, **k)

            closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*arrays)
            out = _Interpreter(algorithm).run(closed.jaxpr, closed.consts, arrays)
            return jax.tree.unflatten(jax.tree.structure(out_shape), out)

        return jax.jit(run)

    @functools.wraps(fn)
    def replaced(*args, **kwargs):
        leaves, tree = jax.tree.flatten((args, kwargs))
        dynamic = tuple(isinstance(leaf, (jax.Array, np.ndarray, np.generic)) for leaf in leaves)
        key = (tree, dynamic, tuple(leaf for leaf, dyn in zip(leaves, dynamic) if not dyn))
        constants = [None if dyn else leaf for leaf, dyn in zip(leaves, dynamic)]  # no arrays kept
        try:
            run = compiled.get(key) or compiled.setdefault(key, rewritten(tree, dynamic, constants))
        except TypeError:  # an unhashable constant argument: a rewrite for this call only
            run = rewritten(tree, dynamic, constants)
        try:
            return run(*[leaf for leaf, dyn in zip(leaves, dynamic) if dyn])
        except _Refused as refused:
            raise refused.error from None

    return replaced


# ---------------------------------------------------------------- pvary whose transpose is ours

try:
    from jax._src.core import pvary_p as _jax_pvary_p  # internal: the abstract eval is borrowed
except ImportError:  # pragma: no cover - a jax without pvary: pvarys stay as they are
    _jax_pvary_p = None

vary_p = Primitive("jaxnvrar_pvary")  # lax.pcast(x, axis, to="varying"), transposed to all_reduce
vary_p.def_effectful_abstract_eval(lambda x, *, axes, algorithm: _jax_pvary_p.abstract_eval(x, axes=axes))
mlir.register_lowering(vary_p, lambda ctx, x, **params: [x])
batching.primitive_batchers[vary_p] = lambda args, dims, **params: (vary_p.bind(args[0], **params), dims[0])
ad.deflinear2(vary_p, lambda ct, x, *, axes, algorithm: [_all_reduce_or_psum(ct, axes[0], algorithm)])


class _Refused(RuntimeError):
    """all_reduce's RuntimeError, carried past the interpreter's "leave it psum" fallback."""

    def __init__(self, error: RuntimeError):
        super().__init__(str(error))
        self.error = error


def _all_reduce_or_psum(x, axis, algorithm):
    # A call the kernel cannot take (a message over the workspace, a partly manual shard_map)
    # stays psum. A runtime that is not up is not such a case: "nvrar" without
    # jaxnvrar.initialize() raises (RuntimeError) rather than quietly running psum.
    try:
        return all_reduce(x, axis, algorithm=algorithm)
    except (ValueError, TypeError, NotImplementedError):
        return lax.psum(x, axis)
    except RuntimeError as err:
        raise _Refused(err) from None


# ---------------------------------------------------------------- the interpreter


def _bind(prim, params, invals):
    bind_params = prim.get_bind_params(params)
    if isinstance(bind_params, tuple):  # older jax: (subfuns, params)
        subfuns, bind_params = bind_params
        return prim.bind(*subfuns, *invals, **bind_params)
    return prim.bind(*invals, **bind_params)


class _Interpreter:
    def __init__(self, algorithm: str):
        self.algorithm = algorithm
        self._has_psum: dict = {}  # id(jaxpr) -> whether it holds anything to rewrite

    def has_psum(self, value) -> bool:
        if isinstance(value, (tuple, list)):
            return any(map(self.has_psum, value))
        if isinstance(value, ClosedJaxpr):
            value = value.jaxpr
        if not isinstance(value, Jaxpr):
            return False
        if id(value) not in self._has_psum:
            self._has_psum[id(value)] = any(
                e.primitive.name in _REWRITTEN or any(map(self.has_psum, e.params.values())) for e in value.eqns)
        return self._has_psum[id(value)]

    def run(self, jaxpr, consts, args):
        env = dict(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
        invariant = {}  # outputs of pvary: invariant values typed as varying, and over which axes
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
            ctx = getattr(eqn, "ctx", None)
            with (source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack),
                  ctx.manager if ctx is not None else contextlib.nullcontext()):
                outs = self.eqn(eqn, invals, invariant)
            if eqn.primitive.name == "pvary":  # invariant over its axes, and over those its input was
                axes = set(eqn.params.get("axes", ()))
                invariant.update((out, axes | (set() if isinstance(v, Literal) else invariant.get(v, set())))
                                 for v, out in zip(eqn.invars, eqn.outvars))
            env.update(zip(eqn.outvars, outs if eqn.primitive.multiple_results else [outs]))
        return [read(v) for v in jaxpr.outvars]

    # -- one equation

    def eqn(self, eqn, invals, invariant):
        prim, params = eqn.primitive, eqn.params
        if prim.name in _REWRITTEN and self._reducible(eqn):
            (x,) = invals
            axis = params["axes"][0]
            if prim.name == "pvary":
                return vary_p.bind(x, axes=(axis,), algorithm=self.algorithm)
            if axis in invariant.get(eqn.invars[0], ()):
                return _bind(prim, params, invals)  # psum of a value invariant over its axis: as jax wrote it
            return _all_reduce_or_psum(x, axis, self.algorithm)
        if not self.has_psum(list(params.values())):
            return _bind(prim, params, invals)
        try:
            if prim.name == "shard_map":
                return self._shard_map(params, invals)
            new_params = {k: self._rewrite(v) for k, v in params.items()}
        except _Refused:
            raise
        except Exception as err:  # noqa: BLE001 - anything we cannot retrace stays psum
            warnings.warn(f"jaxnvrar.replace_psum: left the psums in {prim.name} as they were ({err!r})",
                          stacklevel=2)
            return _bind(prim, params, invals)
        return _bind(prim, new_params, invals)

    def _reducible(self, eqn) -> bool:
        axes = eqn.params.get("axes")
        if (len(eqn.invars) != 1 or isinstance(eqn.invars[0], Literal) or not isinstance(axes, tuple)
                or len(axes) != 1 or eqn.params.get("axis_index_groups") is not None
                or (eqn.primitive.name == "pvary" and _jax_pvary_p is None)):
            return False
        aval = eqn.invars[0].aval
        manual = getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ())
        return axes[0] in manual and getattr(aval, "dtype", None) in SUPPORTED_DTYPES

    # -- sub-jaxprs

    def _rewrite(self, value):
        if isinstance(value, (tuple, list)):
            return type(value)(self._rewrite(v) for v in value)
        if not self.has_psum(value):
            return value
        if isinstance(value, ClosedJaxpr):
            return self._retrace(value.jaxpr, value.consts, value.in_avals)
        if isinstance(value, Jaxpr):  # open (checkpoint's): it must come back without consts
            if value.constvars:
                raise NotImplementedError("an open jaxpr with constvars")
            closed = self._retrace(value, (), [v.aval for v in value.invars])
            if closed.consts:
                raise NotImplementedError("the rewritten jaxpr has constants")
            return closed.jaxpr
        return value

    def _retrace(self, jaxpr, consts, in_avals) -> ClosedJaxpr:
        return jax.make_jaxpr(lambda *args: self.run(jaxpr, consts, args))(*in_avals)

    def _shard_map(self, params, invals):
        # The public shard_map binds the mesh axes while it traces the body, as shard_map's own
        # rules do when they retrace it; the types in and out are the original body's.
        body = params["jaxpr"]
        run = jax.shard_map(
            lambda *args: tuple(self.run(body, (), args)),
            mesh=params["mesh"], in_specs=tuple(params["in_specs"]), out_specs=tuple(params["out_specs"]),
            axis_names=frozenset(params.get("newly_manual_axes") or ()), check_vma=params["check_vma"],
        )
        return list(run(*invals))

"""Fuzzed entry points: every input either gives psum's answer or a clear error, never a hang
or a silently wrong result (random shapes, dtypes, axis sizes, topologies, algorithms)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import jaxnvrar  # noqa: E402
from helpers import mesh_1d, run_per_rank  # noqa: E402

DTYPES = ["float32", "bfloat16", "float16", "int32", "int8", "bool", "complex64"]


@st.composite
def calls(draw):
    num_ranks = draw(st.integers(1, jax.device_count()))
    return dict(
        num_ranks=num_ranks,
        shape=tuple(draw(st.lists(st.integers(0, 6), max_size=3))),
        dtype=draw(st.sampled_from(DTYPES)),
        gpus_per_node=draw(st.one_of(st.none(), st.integers(0, num_ranks + 1))),
        algorithm=draw(st.sampled_from(["auto", "psum", "reference", "nvrar", "ring"])),
    )


KERNEL_DTYPES = ("float32", "bfloat16", "float16")


def _expected_error(call):
    """The error class a call must raise, or None where it must succeed. "psum" and "auto" take
    every dtype psum takes; "reference" and "nvrar" the float ones they sum."""
    if call["algorithm"] == "ring":
        return ValueError
    if call["algorithm"] in ("reference", "nvrar") and call["dtype"] not in KERNEL_DTYPES:
        return TypeError
    g = call["gpus_per_node"]
    if g is not None and (g < 1 or call["num_ranks"] % g):
        return ValueError
    if call["algorithm"] == "nvrar" and not jaxnvrar.is_initialized():
        return (RuntimeError, ImportError)
    return None


@pytest.mark.skipif(jax.process_count() > 1, reason="single-process fuzzing")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls())
def test_psum_answer_or_clear_error(call):
    mesh = mesh_1d(call["num_ranks"])
    rng = np.random.default_rng(0)
    host = (rng.standard_normal((call["num_ranks"],) + call["shape"]) * 4).astype(jnp.dtype(call["dtype"]))
    reduce = lambda a: jaxnvrar.all_reduce(a, "x", algorithm=call["algorithm"],
                                           gpus_per_node=call["gpus_per_node"])
    error = _expected_error(call)
    if error is not None:
        with pytest.raises(error) as info:
            run_per_rank(reduce, host, mesh)
        message = str(info.value)
        assert len(message) > 20 and any(word in message for word in (
            "float32", "algorithm", "gpus_per_node", "initialize", "built without", "positive integer")), message
        return
    out = run_per_rank(reduce, host, mesh)
    expected = run_per_rank(lambda a: jax.lax.psum(a, "x"), host, mesh)
    assert out.shape == host.shape and out.dtype == expected.dtype  # psum's (bool sums as int32)
    if call["dtype"] not in KERNEL_DTYPES:  # psum itself: exact
        np.testing.assert_array_equal(out, expected)
        return
    eps = float(jnp.finfo(host.dtype).eps)
    np.testing.assert_allclose(out.astype(np.float64), expected.astype(np.float64),
                               rtol=4 * eps * call["num_ranks"], atol=64 * eps * call["num_ranks"])
    for r in range(1, call["num_ranks"]):
        assert out[r].tobytes() == out[0].tobytes()

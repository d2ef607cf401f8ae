"""The decode step's attention op (jaxnvrar/models/llama/attention.py) without a GPU: the "xla"
implementation against a direct computation, and the fused kernel's refusals and size checks
(the kernel itself: tests/gpu/test_gpu_attention.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")

from jaxnvrar.models import llama  # noqa: E402
from jaxnvrar.models.llama import attention  # noqa: E402


def _inputs(batch=2, rows=1, q_heads=4, kv_heads=2, head_dim=32, cache_len=12, seed=0):
    rng = np.random.default_rng(seed)
    qkv = jnp.asarray(rng.standard_normal((batch, rows, (q_heads + 2 * kv_heads) * head_dim)), jnp.float32)
    cache_k = jnp.asarray(rng.standard_normal((batch, kv_heads, cache_len, head_dim)), jnp.float32)
    cache_v = jnp.asarray(rng.standard_normal((batch, kv_heads, cache_len, head_dim)), jnp.float32)
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    return qkv, cache_k, cache_v, inv_freq


@pytest.fixture(autouse=True)
def on_cpu():
    with jax.default_device(jax.devices("cpu")[0]):  # the "xla" ops on CPU even on a GPU host
        yield


def test_xla_implementation_is_rope_cache_write_and_causal_softmax():
    """Each output row against numpy: rope, write at write_at, softmax over keys <= the position."""
    qkv, cache_k, cache_v, inv_freq = _inputs(rows=2)
    write_at, q_heads, hd = 5, 4, 32
    positions = jnp.arange(2, dtype=jnp.int32) + write_at
    out, new_k, new_v = attention.decode_attention(qkv, cache_k, cache_v, inv_freq, positions, write_at,
                                                   q_heads=q_heads, cache_rows=1)
    q, k, v = attention.split_heads(qkv, q_heads, hd)
    q, k = attention.apply_rope(q, inv_freq, positions), attention.apply_rope(k, inv_freq, positions)
    want_k = np.asarray(cache_k).copy()
    want_k[:, :, write_at] = np.asarray(k)[:, 0]
    want_v = np.asarray(cache_v).copy()
    want_v[:, :, write_at] = np.asarray(v)[:, 0]
    np.testing.assert_array_equal(np.asarray(new_k), want_k)
    np.testing.assert_array_equal(np.asarray(new_v), want_v)
    for b in range(2):
        for row in range(2):
            for head in range(q_heads):
                kv = head // 2
                visible = np.arange(12) <= int(positions[row])  # row 1 sees the stale cache row 6 too
                scores = want_k[b, kv][visible] @ np.asarray(q)[b, row, head] / np.sqrt(hd)
                weights = np.exp(scores - scores.max())
                expected = (weights / weights.sum()) @ want_v[b, kv][visible]
                np.testing.assert_allclose(np.asarray(out)[b, row, head * hd:(head + 1) * hd], expected,
                                           rtol=2e-5, atol=2e-5)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU the kernel runs (tests/gpu)")
def test_kernel_refused_off_cuda_naming_the_fix():
    qkv, cache_k, cache_v, inv_freq = _inputs()
    call = jax.jit(lambda *a: attention.decode_attention(*a, q_heads=4, implementation="kernel"))
    with pytest.raises(NotImplementedError, match="CUDA GPUs only.*implementation='xla'"):
        call(qkv, cache_k, cache_v, inv_freq, jnp.zeros(1, jnp.int32), jnp.int32(0))


@pytest.mark.parametrize("change, message", [
    (dict(head_dim=48), "head_dim 48"),
    (dict(rows=16, q_heads=8), "query rows"),
    (dict(cache_len=200_000), "shared memory"),
    (dict(q_heads=0), "for 0 query heads"),
])
def test_kernel_refuses_shapes_it_does_not_take(change, message):
    shape = dict(rows=1, q_heads=4, kv_heads=2, head_dim=64, cache_len=16)
    shape.update(change)
    width = (shape["q_heads"] + 2 * shape["kv_heads"]) * shape["head_dim"]
    qkv = jax.ShapeDtypeStruct((1, shape["rows"], width), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((1, shape["kv_heads"], shape["cache_len"], shape["head_dim"]), jnp.bfloat16)
    reason = attention.kernel_supports(qkv, cache, cache, shape["q_heads"], 1)
    assert reason is not None and message in reason


def test_kernel_accepts_llama_decode_shapes():
    for q_heads, kv_heads, rows in ((32, 8, 2), (16, 4, 1), (16, 4, 2)):  # 8B TP 1 / TP 2, twin row
        qkv = jax.ShapeDtypeStruct((16, rows, (q_heads + 2 * kv_heads) * 128), jnp.bfloat16)
        cache = jax.ShapeDtypeStruct((16, kv_heads, 1088, 128), jnp.bfloat16)
        assert attention.kernel_supports(qkv, cache, cache, q_heads, 1) is None


def test_tile_variables_count_in_the_shared_memory_check(monkeypatch):
    """kernel_supports counts the shared memory of the tiles the kernel will take: a 4096-position
    cache fits the default (two 32 KB tiles) but not four 96 KB tiles (the kernel would refuse it
    at launch; here the model falls back to XLA's ops or names the reason)."""
    qkv = jax.ShapeDtypeStruct((1, 1, (8 + 2 * 2) * 128), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((1, 2, 4096, 128), jnp.bfloat16)
    assert attention.kernel_supports(qkv, cache, cache, 8, 1) is None
    monkeypatch.setenv(attention.TILE_KB_VARIABLE, "96")
    monkeypatch.setenv(attention.SLOTS_VARIABLE, "4")
    assert attention.tile_settings() == (96 * 1024, 4)
    assert "shared memory" in attention.kernel_supports(qkv, cache, cache, 8, 1)


@pytest.mark.parametrize("name, value", [("JAXNVRAR_ATTENTION_TILE_KB", "0"), ("JAXNVRAR_ATTENTION_TILE_KB", "97"),
                                         ("JAXNVRAR_ATTENTION_SLOTS", "5"), ("JAXNVRAR_ATTENTION_SLOTS", "3x"),
                                         ("JAXNVRAR_ATTENTION_SLOTS", "2.5")])
def test_bad_tile_variables_are_named(name, value, monkeypatch):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name} must be"):
        attention.tile_settings()


def test_shared_memory_count_matches_the_kernels():
    """kernel_shared_bytes (what kernel_supports checks) against the CUDA part's own count (a host
    function of the built extension; no GPU needed) over shapes, dtypes, cluster sizes and tiles:
    a disagreement would let a shape through that the kernel refuses at launch."""
    from jaxnvrar import runtime

    try:
        extension = runtime.cuda_extension()
    except ImportError as err:
        pytest.skip(f"the CUDA part is not built here: {err}")
    checked = 0
    for group, computed_rows, rows in ((4, 1, 2), (4, 1, 1), (8, 3, 3), (32, 1, 2), (6, 2, 2), (1, 1, 1)):
        for cache_len in (5, 20, 100, 1000, 1088, 4096):
            for head_dim, element_bytes in ((128, 2), (64, 2), (32, 2), (128, 4), (64, 4)):
                for parts in (1, 2, 8, 16):
                    for slots, tile_kb in ((2, 24), (3, 8), (4, 1), (2, 96)):
                        want = extension.attention_shared_bytes(group, computed_rows, rows, 1, cache_len, head_dim,
                                                                element_bytes, parts, slots, tile_kb * 1024)
                        got = attention.kernel_shared_bytes(group, computed_rows, rows, 1, cache_len, head_dim,
                                                            element_bytes, parts=parts, slots=slots,
                                                            tile_bytes=tile_kb * 1024)
                        assert got == want, (group, computed_rows, rows, cache_len, head_dim, element_bytes, parts,
                                             slots, tile_kb)
                        checked += 1
    assert checked == 6 * 6 * 5 * 4 * 4
    with pytest.raises(ValueError, match="parts must be >= 1, not 0"):
        extension.attention_shared_bytes(4, 1, 1, 1, 100, 128, 2, 0, 2, 24 * 1024)


def test_bad_arguments_are_named():
    qkv, cache_k, cache_v, inv_freq = _inputs()
    with pytest.raises(ValueError, match="implementation must be one of"):
        attention.decode_attention(qkv, cache_k, cache_v, inv_freq, jnp.zeros(1, jnp.int32), 0, q_heads=4,
                                   implementation="auto")
    with pytest.raises(ValueError, match="cache_rows must be in 1..1"):
        attention.decode_attention(qkv, cache_k, cache_v, inv_freq, jnp.zeros(1, jnp.int32), 0, q_heads=4,
                                   cache_rows=2)
    two_rows = _inputs(rows=2)
    with pytest.raises(ValueError, match="twin rows write one row"):
        attention.decode_attention(*two_rows[:3], inv_freq, jnp.zeros(2, jnp.int32), 0, q_heads=4, twin=True)
    with pytest.raises(ValueError, match=r"positions must be \[1\]"):
        attention.decode_attention(qkv, cache_k, cache_v, inv_freq, jnp.zeros(2, jnp.int32), 0, q_heads=4)
    with pytest.raises(ValueError, match=r"inv_freq must be \[head_dim / 2\] = \[16\]"):
        attention.decode_attention(qkv, cache_k, cache_v, inv_freq[:8], jnp.zeros(1, jnp.int32), 0, q_heads=4)
    with pytest.raises(ValueError, match="must be one of"):
        llama.with_attention(None, "fused")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU the kernel runs (tests/gpu)")
def test_model_kernel_attention_is_for_decode_steps_and_never_falls_back():
    """attention="kernel": a prefill chunk runs XLA's ops; a decode step (one row, or the batch-1
    twin) takes the kernel, so off CUDA it is refused by name, not run as XLA's ops."""
    from helpers import needs_devices_in_one_process

    needs_devices_in_one_process(2)
    model = llama.with_attention(llama.random_model("tiny", llama.make_mesh(2), all_reduce="psum",
                                                    dtype=jnp.float32), "kernel")
    caches = llama.init_cache(model, 2, 16)
    prompt = np.arange(8, dtype=np.int32).reshape(2, 4)
    llama.decode_step(model, prompt, caches, 0)  # a prefill chunk of 4 positions: XLA's ops
    for batch in (1, 2):  # the twin row, and one row per sequence
        caches = llama.init_cache(model, batch, 16)
        with pytest.raises(NotImplementedError, match="CUDA GPUs only"):
            llama.decode_step(model, prompt[:batch, :1], caches, 4)

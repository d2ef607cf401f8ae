"""The decode step's fused attention kernel (csrc/decode_attention.cu) against XLA's ops, on a GPU.

It needs no NVSHMEM and no peers: each rank tests its own GPU. tests/gpu/run.py runs it as the
part "attention" (`python tests/gpu/run.py --gpus 1 --only attention` on one GPU), or by hand:

    jaxnvrar-launch -n 1 -- python -m pytest tests/gpu/test_gpu_attention.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnvrar.models import llama
from jaxnvrar.models.llama import attention

pytestmark = [pytest.mark.gpu]

TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


def _inputs(seed, dtype, batch, rows, q_heads, kv_heads, head_dim, cache_len):
    rng = np.random.default_rng(seed)
    width = (q_heads + 2 * kv_heads) * head_dim
    qkv = jnp.asarray(rng.standard_normal((batch, rows, width)), dtype)
    # The cache holds a history of earlier steps (random here): only the new rows may change.
    cache_k = jnp.asarray(rng.standard_normal((batch, kv_heads, cache_len, head_dim)), dtype)
    cache_v = jnp.asarray(rng.standard_normal((batch, kv_heads, cache_len, head_dim)), dtype)
    config = llama.LlamaConfig(64, q_heads * head_dim, 64, 1, q_heads, kv_heads, head_dim,
                               rope_llama3=(8.0, 1.0, 4.0, 8192))
    return qkv, cache_k, cache_v, llama.rope_frequencies(config)


def _both(qkv, cache_k, cache_v, inv_freq, positions, write_at, q_heads, cache_rows, twin=False):
    def run(implementation):
        f = jax.jit(lambda *a: attention.decode_attention(*a, q_heads=q_heads, cache_rows=cache_rows, twin=twin,
                                                          implementation=implementation))
        # float32 products in full precision (XLA's default on GPUs rounds their inputs to TF32).
        with jax.default_matmul_precision("highest"):
            return jax.device_get(f(qkv, cache_k, cache_v, inv_freq, positions, write_at))
    return run("kernel"), run("xla")


# (dtype, batch, rows, cache_rows, q_heads, kv_heads, head_dim, cache_len, write_at, twin)
CASES = [
    (jnp.bfloat16, 1, 2, 1, 32, 8, 128, 1088, 1024, True),   # Llama 3.1 8B, TP 1, batch 1 (twin row)
    (jnp.bfloat16, 16, 1, 1, 16, 4, 128, 1088, 1030, False),  # 8B TP 2, batch 16
    (jnp.bfloat16, 1, 2, 1, 16, 4, 64, 1088, 0, True),       # Llama 3.2 1B TP 2, first position
    (jnp.float32, 3, 1, 1, 8, 2, 128, 100, 99, False),        # the last position
    (jnp.float16, 2, 4, 4, 4, 4, 64, 37, 5, False),           # 4 new positions, no grouping
    (jnp.float32, 2, 3, 2, 6, 2, 32, 5, 1, False),            # a cache shorter than the cluster
    (jnp.bfloat16, 1, 1, 1, 8, 1, 128, 4096, 4000, False),    # one KV head, a long cache
    (jnp.float32, 1, 2, 2, 4, 2, 64, 20, 19, False),          # write_at clamped, as dynamic_update_slice does
    # 12 (batch row, KV head) pairs: 8-block clusters; 125 positions per block in tiles of 96 (float32
    # rows of 512 B), the two new rows on both sides of a tile boundary (95 | 96); exact enough to
    # catch a missed patch or an off-by-one mask, which bf16's tolerance could hide.
    (jnp.float32, 3, 2, 2, 16, 4, 128, 1000, 95, False),
    (jnp.bfloat16, 2, 1, 1, 8, 2, 32, 300, 150, False),       # head_dim 32: some lanes of a key idle
    (jnp.float16, 2, 1, 1, 8, 2, 128, 500, 250, False),
    (jnp.float32, 1, 2, 1, 32, 1, 64, 64, 40, True),          # a group of 32: the twin computes 32 rows
    # Tensor cores with two 16-row blocks of queries (first run on a GPU 2026-12-02): 8 heads x 3 positions = 24
    # rows (the second block half padding), and a group of 32 (the twin).
    (jnp.bfloat16, 2, 3, 3, 16, 2, 128, 300, 200, False),
    (jnp.float16, 1, 2, 1, 32, 1, 64, 200, 150, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, (jnp.dtype(c[0]).name, *c[1:]))))
def test_kernel_matches_xla_ops(case):
    dtype, batch, rows, cache_rows, q_heads, kv_heads, head_dim, cache_len, write_at, twin = case
    qkv, cache_k, cache_v, inv_freq = _inputs(0, dtype, batch, rows, q_heads, kv_heads, head_dim, cache_len)
    if twin:  # the model's batch 1: two identical rows at one position, the second not written
        qkv = jnp.concatenate([qkv[:, :1]] * rows, axis=1)
        positions = jnp.full((rows,), write_at, jnp.int32)
    else:
        positions = write_at + jnp.arange(rows, dtype=jnp.int32)
    assert attention.kernel_supports(qkv, cache_k, cache_v, q_heads, cache_rows, twin) is None
    (out, new_k, new_v), (want, want_k, want_v) = _both(qkv, cache_k, cache_v, inv_freq, positions,
                                                        jnp.int32(write_at), q_heads, cache_rows, twin)
    tol = TOLERANCE[dtype]
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    np.testing.assert_allclose(f32(out), f32(want), atol=tol, rtol=tol)
    start = min(write_at, cache_len - cache_rows)
    written = np.zeros(cache_len, bool)
    written[start:start + cache_rows] = True
    for got, ref, before in ((new_k, want_k, cache_k), (new_v, want_v, cache_v)):
        # Rows not written are untouched, bit for bit; the written ones are the new keys/values.
        np.testing.assert_array_equal(f32(got)[:, :, ~written], f32(before)[:, :, ~written])
        np.testing.assert_allclose(f32(got)[:, :, written], f32(ref)[:, :, written], atol=tol, rtol=tol)
        assert not np.array_equal(f32(got)[:, :, written], f32(before)[:, :, written])


def test_kept_input_cache_is_not_overwritten():
    """Without donation XLA gives the kernel a copy to update: the caller's cache stays as it was."""
    qkv, cache_k, cache_v, inv_freq = _inputs(1, jnp.bfloat16, 2, 1, 8, 2, 128, 64)
    before = np.asarray(cache_k, np.float32).copy()
    f = jax.jit(lambda *a: attention.decode_attention(*a, q_heads=8, implementation="kernel"))
    _, new_k, _ = f(qkv, cache_k, cache_v, inv_freq, jnp.arange(1, dtype=jnp.int32) + 10, jnp.int32(10))
    np.testing.assert_array_equal(np.asarray(cache_k, np.float32), before)
    assert not np.array_equal(np.asarray(new_k, np.float32), before)


def test_donated_cache_updates_in_a_scan():
    """Steps in a lax.scan with the caches carried (and donated to the jit): each step sees the
    keys the steps before it wrote, as with XLA's ops."""
    qkv, cache_k, cache_v, inv_freq = _inputs(2, jnp.float32, 2, 1, 8, 2, 64, 48)
    steps = jnp.asarray(np.random.default_rng(3).standard_normal((6, *qkv.shape)), jnp.float32)

    def decode(implementation):
        def body(caches, xs):
            step_qkv, position = xs
            out, k, v = attention.decode_attention(step_qkv, *caches, inv_freq, position[None], position,
                                                   q_heads=8, implementation=implementation)
            return (k, v), out
        run = jax.jit(lambda k, v: jax.lax.scan(body, (k, v), (steps, jnp.arange(6, dtype=jnp.int32) + 20)),
                      donate_argnums=(0, 1))
        with jax.default_matmul_precision("highest"):
            return jax.device_get(run(jnp.copy(cache_k), jnp.copy(cache_v)))

    (got_caches, got), (want_caches, want) = decode("kernel"), decode("xla")
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    for a, b in zip(got_caches, want_caches):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def test_llama_decodes_the_same_tokens_with_the_kernel():
    """A random Llama (float32, head_dim 64) generates the same tokens with the fused kernel as
    with XLA's ops, at batch 1 (the twin row) and batch 3, through prefill, decode_step and advance."""
    config = llama.LlamaConfig(512, 256, 512, 2, 8, 2, 64, rope_llama3=(8.0, 1.0, 4.0, 8192))
    mesh = jax.make_mesh((1,), (llama.TP,), devices=jax.local_devices()[:1])
    model = llama.random_model(config, mesh, all_reduce="psum", dtype=jnp.float32)
    for impl in ("kernel", "xla"):  # the decode step holds the kernel's call only with "kernel"
        text = llama.lowered_advance(llama.with_attention(model, impl), 1, 32).as_text()
        assert ("jaxnvrar_decode_attention" in text) == (impl == "kernel")
    with jax.default_matmul_precision("highest"):  # no TF32: the tokens must not tie-break apart
        for batch in (1, 3):
            prompt = np.random.default_rng(batch).integers(0, config.vocab_size, (batch, 9)).astype(np.int32)
            tokens = {impl: np.asarray(llama.generate(llama.with_attention(model, impl), prompt, 12))
                      for impl in ("kernel", "xla")}
            np.testing.assert_array_equal(tokens["kernel"], tokens["xla"])


def test_kernel_refuses_what_it_does_not_take():
    qkv, cache_k, cache_v, inv_freq = _inputs(4, jnp.bfloat16, 1, 16, 8, 2, 128, 64)  # 64 query rows: prefill
    with pytest.raises(ValueError, match="query rows"):
        attention.decode_attention(qkv, cache_k, cache_v, inv_freq, jnp.arange(16, dtype=jnp.int32), 0,
                                   q_heads=8, implementation="kernel")


def test_phase_times_cover_the_call():
    """kernel_phase_times: every phase of the last call, in order (non-negative), summing to less
    than the host's wall time around the call."""
    import time

    qkv, cache_k, cache_v, inv_freq = _inputs(5, jnp.bfloat16, 1, 2, 16, 4, 128, 256)
    f = jax.jit(lambda *a: attention.decode_attention(*a, q_heads=16, cache_rows=1, twin=True,
                                                      implementation="kernel"))
    args = (jnp.concatenate([qkv[:, :1]] * 2, axis=1), cache_k, cache_v, inv_freq, jnp.full((2,), 7, jnp.int32),
            jnp.int32(7))
    jax.block_until_ready(f(*args))
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    wall_us = (time.perf_counter() - start) * 1e6
    phases = attention.kernel_phase_times()
    assert list(phases) == list(attention.PHASES + attention.WAITS)
    assert all(t >= 0 for t in phases.values()), phases
    assert 0 < sum(phases[name] for name in attention.PHASES) < wall_us, phases
    # The waits are parts of the scores and PV phases.
    assert phases["waiting for key tiles"] <= phases["scores"], phases
    assert phases["waiting for value tiles"] <= phases["PV and exchange"], phases


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("parts", [1, 2, 4, 16])
def test_forced_cluster_sizes_agree(parts, dtype, monkeypatch):
    """JAXNVRAR_ATTENTION_CLUSTER (a tuning knob): any blocks per (batch row, KV head) give XLA's
    results; with 1 or 2 a block streams several tiles of keys and values through its two slots."""
    monkeypatch.setenv("JAXNVRAR_ATTENTION_CLUSTER", str(parts))
    qkv, cache_k, cache_v, inv_freq = _inputs(6, dtype, 2, 2, 16, 4, 128, 700)
    positions = 500 + jnp.arange(2, dtype=jnp.int32)
    (out, new_k, _), (want, want_k, _) = _both(qkv, cache_k, cache_v, inv_freq, positions, jnp.int32(500), 16, 2)
    tol = TOLERANCE[dtype]
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    np.testing.assert_allclose(f32(out), f32(want), atol=tol, rtol=tol)
    np.testing.assert_allclose(f32(new_k), f32(want_k), atol=tol, rtol=tol)
    times = attention.kernel_block_times()
    assert times["blocks"] == 2 * 4 * parts, times


def test_forced_cluster_size_out_of_range_is_refused(monkeypatch):
    monkeypatch.setenv("JAXNVRAR_ATTENTION_CLUSTER", "32")
    qkv, cache_k, cache_v, inv_freq = _inputs(7, jnp.bfloat16, 1, 1, 8, 2, 64, 64)
    f = jax.jit(lambda *a: attention.decode_attention(*a, q_heads=8, implementation="kernel"))
    with pytest.raises(Exception, match="JAXNVRAR_ATTENTION_CLUSTER must be 1 to 16"):
        jax.block_until_ready(f(qkv, cache_k, cache_v, inv_freq, jnp.arange(1, dtype=jnp.int32), jnp.int32(0)))


def test_block_times_cover_the_grid(monkeypatch):
    """kernel_block_times: one entry per block of the last call (8 KV heads x batch 2 x 8 blocks),
    each block's phases summing to its lifetime, the span at least the longest lifetime."""
    monkeypatch.setenv("JAXNVRAR_ATTENTION_CLUSTER", "8")
    qkv, cache_k, cache_v, inv_freq = _inputs(8, jnp.bfloat16, 2, 1, 32, 8, 128, 1088)
    f = jax.jit(lambda *a: attention.decode_attention(*a, q_heads=32, implementation="kernel"))
    jax.block_until_ready(f(qkv, cache_k, cache_v, inv_freq, jnp.full((1,), 1000, jnp.int32), jnp.int32(1000)))
    times = attention.kernel_block_times()
    assert times["blocks"] == 2 * 8 * 8, times
    assert times["span"] >= times["lifetime"][1] >= times["lifetime"][0] > 0, times
    assert list(times["phases"]) == list(attention.PHASES) and min(times["phases"].values()) >= 0, times
    assert list(times["waits"]) == list(attention.WAITS) and min(times["waits"].values()) >= 0, times


@pytest.mark.parametrize("knobs", [{"JAXNVRAR_ATTENTION_SLOTS": "3", "JAXNVRAR_ATTENTION_TILE_KB": "8"},
                                   {"JAXNVRAR_ATTENTION_SLOTS": "4", "JAXNVRAR_ATTENTION_TILE_KB": "1"},
                                   {"JAXNVRAR_ATTENTION_SLOTS": "2", "JAXNVRAR_ATTENTION_TILE_KB": "48"}])
def test_tile_knobs_agree(knobs, monkeypatch):
    """JAXNVRAR_ATTENTION_TILE_KB / _SLOTS (tuning knobs): more, smaller or larger tiles in flight
    give XLA's results (1 KB: tiles of 16 keys, the least the kernel takes: 22 tiles per block)."""
    for name, value in knobs.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("JAXNVRAR_ATTENTION_CLUSTER", "2")
    qkv, cache_k, cache_v, inv_freq = _inputs(9, jnp.bfloat16, 2, 2, 16, 4, 128, 700)
    positions = 500 + jnp.arange(2, dtype=jnp.int32)
    (out, new_k, new_v), (want, want_k, want_v) = _both(qkv, cache_k, cache_v, inv_freq, positions, jnp.int32(500),
                                                        16, 2)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    np.testing.assert_allclose(f32(out), f32(want), atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(f32(new_k), f32(want_k), atol=2e-2, rtol=2e-2)
    np.testing.assert_array_equal(f32(new_v), f32(want_v))  # copied, not computed


def test_blocks_with_one_tile_or_none(monkeypatch):
    """16 blocks over a cache of 20 positions with 4 slots (first run on a GPU 2026-12-02): blocks of 2
    positions, one tile each, and blocks past the cache's end with none; the same results."""
    monkeypatch.setenv("JAXNVRAR_ATTENTION_CLUSTER", "16")
    monkeypatch.setenv("JAXNVRAR_ATTENTION_SLOTS", "4")
    qkv, cache_k, cache_v, inv_freq = _inputs(10, jnp.bfloat16, 1, 1, 8, 2, 64, 20)
    (out, new_k, _), (want, want_k, _) = _both(qkv, cache_k, cache_v, inv_freq, jnp.full((1,), 13, jnp.int32),
                                               jnp.int32(13), 8, 1)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    np.testing.assert_allclose(f32(out), f32(want), atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(f32(new_k), f32(want_k), atol=2e-2, rtol=2e-2)
    assert attention.kernel_block_times()["blocks"] == 2 * 16


@pytest.mark.parametrize("name, value", [("JAXNVRAR_ATTENTION_SLOTS", "5"), ("JAXNVRAR_ATTENTION_TILE_KB", "0")])
def test_tile_knobs_out_of_range_are_refused(name, value, monkeypatch):
    monkeypatch.setenv(name, value)
    qkv, cache_k, cache_v, inv_freq = _inputs(7, jnp.bfloat16, 1, 1, 8, 2, 64, 64)
    f = jax.jit(lambda *a: attention.decode_attention(*a, q_heads=8, implementation="kernel"))
    with pytest.raises(Exception, match=f"{name} must be"):
        jax.block_until_ready(f(qkv, cache_k, cache_v, inv_freq, jnp.arange(1, dtype=jnp.int32), jnp.int32(0)))

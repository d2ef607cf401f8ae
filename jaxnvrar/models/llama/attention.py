"""The Llama's attention: rotary embedding, causal attention, and the decode step's fused op.

`decode_attention` is what a layer does between its QKV projection and its o-projection when it
has a KV cache: rope on the new queries and keys, the write of the new keys and values into the
cache, and causal attention of the queries over the cache. With implementation "xla" (the
default) it runs these as jax ops (`decode_attention_reference`; XLA makes ~7 kernels of them
per layer); with "kernel" as one CUDA kernel (csrc/decode_attention.cu, an XLA FFI call that
updates the caches in place; shapes it takes: `kernel_supports`). Both round alike: the kernel
normalizes the softmax before rounding the weights to the cache dtype, as the jax ops do.

The kernel is experimental and opt-in: it cuts the layer's kernels (16 -> 11 per layer, Llama
3.1 8B on one H200), and the decode step is even with XLA's ops, not faster (2026-12-02, one
H200: queued 4.243 vs 4.215 ms at batch 1, 4.939 vs 4.941 at batch 16); see docs/llama.md.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import mlir

from jaxnvrar import runtime
from jaxnvrar.primitive import _with_varying_axes, varying_axes

IMPLEMENTATIONS = ("xla", "kernel")
TARGET = "jaxnvrar_decode_attention"

# The kernel's limits (csrc/decode_attention.cu): its head sizes and dtypes, query rows per KV
# head (query heads per KV head x positions per step) and shared memory of a block.
KERNEL_HEAD_DIMS = (32, 64, 128)
KERNEL_DTYPES = ("bfloat16", "float16", "float32")
KERNEL_MAX_QUERY_ROWS = 32
KERNEL_MAX_SHARED_BYTES = 220 * 1024  # of the H100/H200's 227 KB
_CLUSTER_BLOCKS = 8  # blocks over the cache positions of one (batch row, KV head): the portable cluster
_TILE_BYTES = 32 * 1024  # of keys (or of values) per shared-memory tile, at most
_SLOTS = 2  # tiles in shared memory: one used while the others load
# Tuning variables the kernel's FFI handler reads (csrc/decode_attention.cu); read here too, so that
# kernel_supports counts the shared memory the kernel will ask for.
TILE_KB_VARIABLE, SLOTS_VARIABLE = "JAXNVRAR_ATTENTION_TILE_KB", "JAXNVRAR_ATTENTION_SLOTS"
CLUSTER_VARIABLE = "JAXNVRAR_ATTENTION_CLUSTER"  # blocks per (batch row, KV head), 1-16: read by the kernel only


def _tuning_variable(name: str, low: int, high: int, default: int) -> int:
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ValueError(f"{name} must be {low} to {high}, not {text!r}; unset it for the built-in choice")
    return value


def tile_settings() -> tuple[int, int]:
    """(bytes per tile at most, tiles in shared memory) the kernel uses: the built-in choice or
    JAXNVRAR_ATTENTION_TILE_KB (1-96) and JAXNVRAR_ATTENTION_SLOTS (2-4); a bad value raises."""
    return (1024 * _tuning_variable(TILE_KB_VARIABLE, 1, 96, _TILE_BYTES // 1024),
            _tuning_variable(SLOTS_VARIABLE, 2, 4, _SLOTS))


def check_implementation(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, not {implementation!r}")


# ---------------------------------------------------------------- rotary embedding and attention


def apply_rope(x, inv_freq, positions):
    """Rotary embedding of x [b, L, heads, hd] at positions [L], in float32, rounded to x's dtype."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [L, hd/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[None, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[None, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


# A prefill's float32 scores [batch, kv_heads, group, queries, keys] for all queries at once
# outgrow a GPU (Llama 3.1 8B, batch 64 x 1024 on one H100: ~9 GB per layer, and softmax
# keeps copies); longer prompts go through in blocks of queries holding at most this much.
ATTENTION_SCORES_BYTES = 1 << 30


def causal_attention(q, k, v, positions, key_positions):
    """softmax(q k / sqrt(d), keys at positions <= the query's) v, in blocks of queries where the
    scores of all of them would exceed ATTENTION_SCORES_BYTES (each block sees every key, so the
    result does not depend on the blocking). q [b, kv, g, L, d], k and v [b, kv, S, d],
    positions [L], key_positions [S]; returns [b, kv, g, L, d]."""
    b, kv, g, length, d = q.shape
    bytes_per_query = b * kv * g * k.shape[2] * 4
    block = 1 << max(0, (ATTENTION_SCORES_BYTES // bytes_per_query).bit_length() - 1)  # a power of 2
    if length <= block:
        return _attend(q, k, v, positions, key_positions)
    blocks = -(-length // block)
    pad = blocks * block - length  # padded queries repeat the last position; their rows are dropped
    q = jnp.pad(q, ((0, 0),) * 3 + ((0, pad), (0, 0)))
    positions = jnp.pad(positions, (0, pad), mode="edge")
    q = q.reshape(b, kv, g, blocks, block, d).transpose(3, 0, 1, 2, 4, 5)
    out = lax.map(lambda qp: _attend(qp[0], k, v, qp[1], key_positions), (q, positions.reshape(blocks, block)))
    return out.transpose(1, 2, 3, 0, 4, 5).reshape(b, kv, g, blocks * block, d)[:, :, :, :length]


def _attend(q, k, v, positions, key_positions):
    scores = jnp.einsum("bkgld,bksd->bkgls", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(q.shape[-1])
    visible = key_positions[None, :] <= positions[:, None]
    scores = jnp.where(visible, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgls,bksd->bkgld", weights, v)


def split_heads(qkv, q_heads: int, head_dim: int):
    """q [b, L, q_heads, hd], k and v [b, L, kv_heads, hd] from the projection's [q | k | v] columns."""
    b, length, width = qkv.shape
    q_width = q_heads * head_dim
    kv_width = (width - q_width) // 2
    q = qkv[..., :q_width].reshape(b, length, q_heads, head_dim)
    k = qkv[..., q_width:q_width + kv_width].reshape(b, length, -1, head_dim)
    v = qkv[..., q_width + kv_width:].reshape(b, length, -1, head_dim)
    return q, k, v


# ---------------------------------------------------------------- the decode step's attention


def roped_heads(qkv, q_heads: int, head_dim: int, inv_freq, positions):
    """q [b, L, q_heads, hd] and k, v [b, kv_heads, L, hd] from the projection, q and k roped. Keys
    and values come in the cache's layout, in which both attention products are plain batched
    matmuls (no copy of the cache per step)."""
    q, k, v = split_heads(qkv, q_heads, head_dim)
    q, k = apply_rope(q, inv_freq, positions), apply_rope(k, inv_freq, positions)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def attend_heads(q, k, v, positions, key_positions):
    """`causal_attention` of q [b, L, heads, hd] over k, v [b, kv_heads, S, hd], each KV head's
    query heads grouped; returns [b, L, heads * hd]."""
    b, length, _, head_dim = q.shape
    q = q.reshape(b, length, k.shape[1], -1, head_dim).transpose(0, 2, 3, 1, 4)  # [b, kv, group, L, hd]
    out = causal_attention(q, k, v, positions, key_positions)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, length, -1)


def decode_attention_reference(qkv, cache_k, cache_v, inv_freq, positions, write_at, *, q_heads: int,
                               cache_rows: int):
    """The jax ops `decode_attention` stands for (its "xla" implementation)."""
    q, k, v = roped_heads(qkv, q_heads, cache_k.shape[-1], inv_freq, positions)
    start = (0, 0, write_at, 0)
    cache_k = lax.dynamic_update_slice(cache_k, k[:, :, :cache_rows].astype(cache_k.dtype), start)
    cache_v = lax.dynamic_update_slice(cache_v, v[:, :, :cache_rows].astype(cache_v.dtype), start)
    return attend_heads(q, cache_k, cache_v, positions, jnp.arange(cache_k.shape[2])), cache_k, cache_v


def kernel_supports(qkv, cache_k, cache_v, q_heads: int, cache_rows: int, twin: bool = False) -> str | None:
    """None where the CUDA kernel takes these shapes and dtypes, else why not (`twin`: only the
    first row is computed)."""
    b, length, width = qkv.shape
    kv_heads, cache_len, head_dim = cache_k.shape[1:]
    if head_dim not in KERNEL_HEAD_DIMS:
        return f"head_dim {head_dim} (the kernel takes {KERNEL_HEAD_DIMS})"
    if not (qkv.dtype == cache_k.dtype == cache_v.dtype) or jnp.dtype(qkv.dtype).name not in KERNEL_DTYPES:
        return f"dtypes {qkv.dtype}, {cache_k.dtype}, {cache_v.dtype} (the kernel takes one of {KERNEL_DTYPES} for all)"
    if q_heads < 1 or q_heads % kv_heads or width != (q_heads + 2 * kv_heads) * head_dim:
        return f"qkv width {width} for {q_heads} query heads and {kv_heads} KV heads of {head_dim}"
    computed = 1 if twin else length
    query_rows = q_heads // kv_heads * computed
    if query_rows > KERNEL_MAX_QUERY_ROWS:
        return (f"{computed} positions x {q_heads // kv_heads} query heads per KV head = {query_rows} query rows "
                f"(the kernel takes at most {KERNEL_MAX_QUERY_ROWS}: it is for decoding, not prefill)")
    tile_bytes, slots = tile_settings()
    if kernel_shared_bytes(q_heads // kv_heads, computed, length, cache_rows, cache_len, head_dim,
                           jnp.dtype(qkv.dtype).itemsize, slots=slots, tile_bytes=tile_bytes) > KERNEL_MAX_SHARED_BYTES:
        return f"a cache of {cache_len} positions (a block's shared memory would exceed {KERNEL_MAX_SHARED_BYTES} bytes)"
    return None


def kernel_shared_bytes(group: int, computed_rows: int, rows: int, cache_rows: int, cache_len: int, head_dim: int,
                        element_bytes: int, parts: int = _CLUSTER_BLOCKS, slots: int = _SLOTS,
                        tile_bytes: int = _TILE_BYTES) -> int:
    """A block's shared memory with `parts` blocks per (batch row, KV head), as
    csrc/decode_attention.cu's SharedBytes counts it (8, the portable cluster, is the largest
    size the kernel always gets): `slots` tiles (of keys, then values), the projection's
    columns of all `rows`, the tensor-core operands (queries and weights in the cache dtype),
    and float32 queries (`computed_rows` x `group`), new rows, PV sums per key share, softmax
    statistics, the blocks' PV sums of its slice, and the weights."""
    query_rows = group * computed_rows
    parities = 256 // (head_dim // 2)
    chunk = -(-cache_len // parts)
    most = max(16, tile_bytes // (head_dim * element_bytes) // 16 * 16)
    per_tile = -(-chunk // -(-chunk // most))  # the block's keys in equal tiles of at most `most`
    tile = max(16, -(-per_tile // 16) * 16)  # whole 16-key steps
    mma_rows = -(-query_rows // 16) * 16 if element_bytes == 2 else 0  # tensor-core operands (16-bit caches)
    weight_stride = -(-chunk // 16) * 16 + 8
    slice_ = -(-query_rows * head_dim // parts)
    return (slots * tile * head_dim * element_bytes + rows * (group + 2) * head_dim * element_bytes
            + mma_rows * (head_dim + weight_stride) * element_bytes
            + 4 * (head_dim // 2 + query_rows * head_dim * (1 + parities) + 2 * cache_rows * head_dim
                   + 2 * query_rows * (2 + parts) + parts * slice_ + query_rows * chunk + rows + query_rows))


def decode_attention(qkv, cache_k, cache_v, inv_freq, positions, write_at, *, q_heads: int,
                     cache_rows: int | None = None, twin: bool = False, implementation: str = "xla"):
    """One decode step's attention with the cache, per shard.

    qkv [b, L, (q_heads + 2 kv_heads) * hd]: the projection's [q | k | v] columns before rope;
    cache_k, cache_v [b, kv_heads, S, hd]; inv_freq [hd/2] float32 (`rope_frequencies`);
    positions [L] int32, the queries' positions; write_at: where the first `cache_rows` (default
    all L) new keys and values go. Keys at positions <= a query's are attended to. `twin`: the
    caller promises that every row of qkv and positions is a copy of the first (the model's batch-1
    twin row; cache_rows 1): the kernel computes the first row only and copies its result. Returns
    (out [b, L, q_heads * hd], cache_k, cache_v) with the new rows written."""
    check_implementation(implementation)
    b, length, _ = qkv.shape
    cache_rows = length if cache_rows is None else cache_rows
    if not 1 <= cache_rows <= length:
        raise ValueError(f"cache_rows must be in 1..{length} (the positions of qkv), not {cache_rows}")
    if cache_k.shape != cache_v.shape or cache_k.ndim != 4 or cache_k.shape[0] != b:
        raise ValueError(f"caches must both be [batch={b}, kv_heads, positions, head_dim], "
                         f"not {cache_k.shape} and {cache_v.shape}")
    if twin and cache_rows != 1:
        raise ValueError(f"twin rows write one row of the cache (cache_rows=1), not {cache_rows}")
    if jnp.shape(positions) != (length,):
        raise ValueError(f"positions must be [{length}] (one per row of qkv), not {jnp.shape(positions)}")
    if jnp.shape(inv_freq) != (cache_k.shape[-1] // 2,):
        raise ValueError(f"inv_freq must be [head_dim / 2] = [{cache_k.shape[-1] // 2}], not {jnp.shape(inv_freq)}")
    if jnp.size(write_at) != 1:
        raise ValueError(f"write_at must be a scalar, not of shape {jnp.shape(write_at)}")
    params = dict(q_heads=int(q_heads), cache_rows=int(cache_rows))
    if implementation == "xla":
        return decode_attention_reference(qkv, cache_k, cache_v, inv_freq, positions, write_at, **params)
    reason = kernel_supports(qkv, cache_k, cache_v, **params, twin=twin)
    if reason is not None:
        raise ValueError(f"decode_attention(implementation='kernel') does not take {reason}; "
                         "use implementation='xla'")
    positions = jnp.asarray(positions, jnp.int32)
    write_at = jnp.asarray(write_at, jnp.int32).reshape(())
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    return _bind(qkv, positions, write_at, inv_freq, cache_k, cache_v, twin=bool(twin), **params)


@functools.partial(jax.jit, static_argnames=("q_heads", "cache_rows", "twin"))
def _bind(*args, **params):
    """The primitive, always under jit (inlined where already traced), so that an eager call runs."""
    return tuple(decode_attention_p.bind(*args, **params))


decode_attention_p = Primitive("jaxnvrar_decode_attention")
decode_attention_p.multiple_results = True


def _abstract_eval(qkv, positions, write_at, inv_freq, cache_k, cache_v, *, q_heads, cache_rows, twin):
    axes = frozenset().union(*(varying_axes(a) for a in (qkv, positions, write_at, inv_freq, cache_k, cache_v)))
    b, length, _ = qkv.shape
    out = qkv.update(shape=(b, length, q_heads * cache_k.shape[-1]))
    return [_with_varying_axes(a, axes) for a in (out, cache_k.update(), cache_v.update())]


decode_attention_p.def_abstract_eval(_abstract_eval)


def _refuse_off_cuda(ctx, *args, **params):
    raise NotImplementedError(
        f"decode_attention(implementation='kernel') runs on CUDA GPUs only, not on "
        f"{ctx.module_context.platforms}; use implementation='xla' (the model's attention='xla')")


_registered = False


def register_kernel() -> bool:
    """Registers the kernel's FFI target with XLA once; False where this install lacks it."""
    global _registered
    if not _registered:
        try:
            extension = runtime.cuda_extension()
        except ImportError:
            return False
        for name, handler in extension.attention_registrations().items():
            jax.ffi.register_ffi_target(name, handler, platform="CUDA")
        _registered = True
    return True


def implementation_text(implementation: str) -> str:
    """What `implementation` runs, for reports."""
    return ("xla: XLA's ops" if implementation == "xla"
            else "kernel: the fused decode attention kernel (csrc/decode_attention.cu) in decode steps, "
                 "XLA's ops in prefill")


PHASES = ("stage projection", "rope", "scores", "exchange softmax statistics", "normalize weights",
          "PV and exchange", "write outputs", "write cache")
# Parts of "scores" and "PV and exchange" spent waiting for the cache's tiles to arrive (in the
# first thread: its wait for the copies, then for the block's other warps at the barrier).
WAITS = ("waiting for key tiles", "waiting for value tiles")


def _kernel_stamps() -> np.ndarray | None:
    """[blocks, 11] of the last kernel call's blocks, or None: globaltimer ns at the start and at
    the end of each of PHASES, then nanoseconds of each of WAITS."""
    stamps = runtime.cuda_extension().attention_stamps()
    if not stamps:
        return None
    return np.asarray(stamps, np.int64).reshape(-1, len(PHASES) + 1 + len(WAITS))


def kernel_phase_times() -> dict[str, float] | None:
    """Microseconds each phase (PHASES, then WAITS) took in the first block of the last kernel
    call on this process's current GPU (its device clock; waits for the GPU): where a call's time
    goes, for tuning the kernel. None before any call."""
    stamps = _kernel_stamps()
    if stamps is None:
        return None
    times = stamps[0, :len(PHASES) + 1]
    phases = {name: float(stop - start) / 1e3 for name, start, stop in zip(PHASES, times, times[1:])}
    return phases | {name: float(stamps[0, len(PHASES) + 1 + i]) / 1e3 for i, name in enumerate(WAITS)}


def kernel_block_times() -> dict[str, object] | None:
    """The last kernel call's blocks on this process's current GPU, in microseconds: `span` (first
    block's start to last block's end), `start_spread` (first to last start: blocks that waited
    for a free SM), `lifetime` (median and max of one block's start to end), and the median over
    blocks of each phase (PHASES) and wait (WAITS). Tells a fixed per-block latency from waves of
    blocks, and loads from products. None before any call."""
    stamps = _kernel_stamps()
    if stamps is None:
        return None
    times, waits = stamps[:, :len(PHASES) + 1], stamps[:, len(PHASES) + 1:] / 1e3
    starts, ends = times[:, 0], times[:, -1]
    lifetimes = (ends - starts) / 1e3
    phases = np.diff(times, axis=1) / 1e3
    return {"blocks": int(stamps.shape[0]), "span": float(ends.max() - starts.min()) / 1e3,
            "start_spread": float(starts.max() - starts.min()) / 1e3,
            "lifetime": (float(np.median(lifetimes)), float(lifetimes.max())),
            "phases": {name: float(np.median(phases[:, i])) for i, name in enumerate(PHASES)},
            "waits": {name: float(np.median(waits[:, i])) for i, name in enumerate(WAITS)}}


def _lower_cuda(ctx, qkv, positions, write_at, inv_freq, cache_k, cache_v, *, q_heads, cache_rows, twin):
    if not register_kernel():
        runtime.cuda_extension()  # raises, saying how to build the CUDA part
    rule = jax.ffi.ffi_lowering(TARGET, operand_output_aliases={4: 1, 5: 2})
    return rule(ctx, qkv, positions, write_at, inv_freq, cache_k, cache_v,
                q_heads=np.int32(q_heads), cache_rows=np.int32(cache_rows), twin=np.int32(twin))


mlir.register_lowering(decode_attention_p, _refuse_off_cuda)
mlir.register_lowering(decode_attention_p, _lower_cuda, platform="cuda")

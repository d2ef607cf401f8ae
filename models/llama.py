"""Llama 3.x in Flax NNX with explicit tensor parallelism over a mesh axis named "tp".

q/k/v and gate/up are column-parallel (each rank holds some heads / some of the MLP width),
o and down are row-parallel and end in `jaxnvrar.all_reduce`: two all-reduces per layer, the
ones NVRAR exists for. KV heads fewer than TP ranks are replicated so each rank holds the KV
head its query heads use. The whole forward runs in one `jax.shard_map`; parameters are global
arrays whose own shardings give the in_specs (see `llama_params.py` for loading and init).

API: `load_checkpoint`, `random_model`, `forward_logits`, `generate`; for your own loop
`init_cache`, `prefill`, `decode_step`, `advance`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnvrar
from jaxnvrar.nvrar_ffi import fits_workspace
from jaxnvrar.runtime import default_topology

TP = "tp"
ALL_REDUCE_CHOICES = ("auto", "psum", "reference", "nvrar", "none")


def check_all_reduce_choice(all_reduce: str) -> None:
    if all_reduce not in ALL_REDUCE_CHOICES:
        raise ValueError(f"all_reduce must be one of {ALL_REDUCE_CHOICES}, got {all_reduce!r}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # Llama 3 frequency scaling: (factor, low_freq_factor, high_freq_factor, original context).
    rope_llama3: tuple[float, float, float, int] | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072


# ---------------------------------------------------------------- modules (hold local shards)


# XLA:GPU (jax 0.11) strength-reduces a matrix-vector dot whose operands sum to fewer elements.
_DOT_STRENGTH_REDUCTION_BOUND = 10_000_000


def project(x, w):
    """x @ w, kept a matrix product for a single row. XLA:GPU rewrites a matrix-vector product
    whose operands hold fewer than 10^7 elements into multiply + reduce ("dot strength
    reduction"), which reads the weight at a fraction of the bandwidth of a GEMM and, for some
    shapes, first writes the whole elementwise product (seen at batch 1: Llama 3.2 1B's 2048 x 2048
    o-projection took 13 us for 8 MB of weight, ~3 TB/s would take 3; at TP 2 the 8B o-projection
    is below the bound too).
    A second row of zeros, behind an optimization barrier so that it is not simplified away,
    keeps it a GEMM; the extra row costs nothing next to reading the weight, but the zero row is
    one more small kernel, so only products below the bound get it."""
    rows = math.prod(x.shape[:-1])
    if rows != 1 or x.size + w.size >= _DOT_STRENGTH_REDUCTION_BOUND:
        return x @ w
    flat = x.reshape(1, x.shape[-1])
    padded = lax.optimization_barrier(jnp.concatenate([flat, jnp.zeros_like(flat)]))
    return (padded @ w)[:1].reshape(*x.shape[:-1], w.shape[-1])


class RMSNorm(nnx.Module):
    def __init__(self, weight, eps: float):
        self.weight = nnx.Param(weight)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


class Attention(nnx.Module):
    """q, k and v come from one matmul with `wqkv`, whose shard on each rank is that rank's
    [q | k | v] columns (`fuse_columns`): one weight read and one kernel instead of three."""

    def __init__(self, wqkv, wo, head_dim: int, q_width: int, kv_width: int):
        self.wqkv, self.wo = nnx.Param(wqkv), nnx.Param(wo)
        self.head_dim = head_dim
        self.q_width, self.kv_width = q_width, kv_width  # global columns (KV heads as replicated)

    def kv_heads(self) -> int:
        """KV heads over all ranks, as replicated for tensor parallelism (the cache's width)."""
        return self.kv_width // self.head_dim

    def __call__(self, x, rope, positions, cache, write_at, all_reduce):
        b, length, _ = x.shape
        hd = self.head_dim
        tp = lax.axis_size(TP)
        qkv = project(x, self.wqkv[...])
        q_local, kv_local = self.q_width // tp, self.kv_width // tp
        q = qkv[..., :q_local].reshape(b, length, -1, hd)  # this rank's query heads
        k = qkv[..., q_local:q_local + kv_local].reshape(b, length, -1, hd)  # this rank's KV heads
        v = qkv[..., q_local + kv_local:].reshape(b, length, -1, hd)
        q, k = _apply_rope(q, rope, positions), _apply_rope(k, rope, positions)
        # Keys and values as [batch, kv_heads, positions, head_dim]: the layout of the cache, in
        # which both attention products are plain batched matmuls (no copy of the cache per step).
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if cache is not None:
            cache_k = lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, 0, write_at, 0))
            cache_v = lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, 0, write_at, 0))
            k, v, cache = cache_k, cache_v, (cache_k, cache_v)
            key_positions = jnp.arange(k.shape[2])
        else:
            key_positions = positions
        kv_heads = k.shape[1]
        # Group the query heads of each KV head: [batch, kv_heads, group, length, head_dim].
        q = q.reshape(b, length, kv_heads, -1, hd).transpose(0, 2, 3, 1, 4)
        out = causal_attention(q, k, v, positions, key_positions)
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, length, -1)
        return all_reduce(project(out, self.wo[...])), cache


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


class MLP(nnx.Module):
    """gate and up from one matmul with `w_gate_up` (each rank's [gate | up] columns)."""

    def __init__(self, w_gate_up, w_down):
        self.w_gate_up, self.w_down = nnx.Param(w_gate_up), nnx.Param(w_down)

    def __call__(self, x, all_reduce):
        gate, up = jnp.split(project(x, self.w_gate_up[...]), 2, axis=-1)
        return all_reduce(project(jax.nn.silu(gate) * up, self.w_down[...]))


def fuse_columns(*parts: jax.Array) -> jax.Array:
    """One column-parallel array whose shard on each rank is the concatenation of the parts'
    shards there (global arrays sharded the same way on their last axis)."""
    sharding = parts[0].sharding
    concat = jax.shard_map(lambda *xs: jnp.concatenate(xs, axis=-1), mesh=sharding.mesh,
                           in_specs=(sharding.spec,) * len(parts), out_specs=sharding.spec)
    return jax.jit(concat)(*parts)


class DecoderLayer(nnx.Module):
    """`p`: the layer's arrays, with the projections fused ("wqkv", "w_gate_up": see
    `fuse_layer`); `widths`: (q, kv) global columns of wqkv."""

    def __init__(self, p: dict, config: LlamaConfig, widths: tuple[int, int]):
        self.input_norm = RMSNorm(p["input_norm"], config.rms_norm_eps)
        self.attention = Attention(p["wqkv"], p["wo"], config.head_dim, *widths)
        self.post_attention_norm = RMSNorm(p["post_attention_norm"], config.rms_norm_eps)
        self.mlp = MLP(p["w_gate_up"], p["w_down"])

    def __call__(self, x, rope, positions, cache, write_at, all_reduce):
        attended, cache = self.attention(self.input_norm(x), rope, positions, cache, write_at, all_reduce)
        x = x + attended
        return x + self.mlp(self.post_attention_norm(x), all_reduce), cache


def fuse_layer(p: dict) -> tuple[dict, tuple[int, int]]:
    """A layer's loaded arrays (wq, wk, wv, w_gate, w_up separate) with the projections fused."""
    fused = {k: v for k, v in p.items() if k not in ("wq", "wk", "wv", "w_gate", "w_up")}
    fused["wqkv"] = fuse_columns(p["wq"], p["wk"], p["wv"])
    fused["w_gate_up"] = fuse_columns(p["w_gate"], p["w_up"])
    return fused, (p["wq"].shape[-1], p["wk"].shape[-1])


class Llama(nnx.Module):
    """The model; `params` maps names to (global, sharded) arrays, see llama_params.py."""

    def __init__(self, params: dict, config: LlamaConfig, mesh, all_reduce: str = "auto"):
        check_all_reduce_choice(all_reduce)
        self.config = config
        self.mesh = mesh
        self.all_reduce = all_reduce
        self.embed = nnx.Param(params["embed"])
        self.layers = nnx.List([DecoderLayer(fused, config, widths)
                                for fused, widths in map(fuse_layer, params["layers"])])
        self.norm = RMSNorm(params["norm"], config.rms_norm_eps)
        self.lm_head = nnx.Param(params["lm_head"])

    def __call__(self, tokens, positions, caches, write_at, last_only: bool = False):
        """Per-shard forward: tokens [B, L] -> this rank's vocabulary slice of the logits, of
        every position, or with `last_only` of the last one ([B, 1, V/tp]: all decoding needs)."""
        reduce = _reducer(self.all_reduce)
        rope = rope_frequencies(self.config)
        x = self.embed[...][tokens]
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, rope, positions, None if caches is None else caches[i], write_at, reduce)
            new_caches.append(cache)
        if last_only:
            x = x[:, -1:]
        logits = project(self.norm(x), self.lm_head[...])
        return logits.astype(jnp.float32), (None if caches is None else tuple(new_caches))


def greedy_tokens(logits, reduce) -> jax.Array:
    """Greedy next tokens [B] from this rank's vocabulary slice [B, V/tp] of the last logits,
    inside shard_map: each rank offers its best (value, index) and one all-reduce of a
    [2, tp, B] table, zero but for the rank's own row, gathers them all. Ties go to the
    lowest index, as jnp.argmax does; no rank ever holds the whole vocabulary."""
    ranks, rank = lax.axis_size(TP), lax.axis_index(TP)
    best = jnp.max(logits, axis=-1)
    index = jnp.argmax(logits, axis=-1) + rank * logits.shape[-1]  # < 2^24: exact in float32
    table = jnp.zeros((2, ranks, logits.shape[0]), jnp.float32)
    table = lax.dynamic_update_index_in_dim(table, jnp.stack([best, index.astype(jnp.float32)])[:, None], rank, 1)
    table = reduce(table)
    winner = jnp.argmax(table[0], axis=0)  # the first rank holding the maximum
    return jnp.take_along_axis(table[1], winner[None], axis=0)[0].astype(jnp.int32)


def with_all_reduce(model: Llama, algorithm: str) -> Llama:
    """The same weights (shared, not copied) with another all-reduce algorithm."""
    check_all_reduce_choice(algorithm)
    twin = nnx.merge(*nnx.split(model))
    twin.all_reduce = algorithm
    return twin


# Messages that algorithm="nvrar" handed to psum because they outgrow the NVSHMEM workspace
# (prefill of a long prompt), as (shape, dtype) per traced call site; benchmarks report them.
psum_fallbacks: list[tuple[tuple[int, ...], str]] = []


def _reducer(algorithm: str):
    if algorithm == "none":  # diagnostic: the communication-free bound; the numbers are WRONG
        return lambda partial: partial
    if algorithm != "nvrar":
        return lambda partial: jaxnvrar.all_reduce(partial, TP, algorithm=algorithm)

    def reduce(partial):
        # "nvrar" means the kernel: without the runtime this raises, naming jaxnvrar.initialize().
        # Only with it up may a prefill message (batch x prompt x hidden) that outgrows the
        # workspace go to psum; every decode-step message takes the kernel.
        if jaxnvrar.is_initialized():
            topology = default_topology(lax.axis_size(TP))
            if not fits_workspace(partial.size, partial.dtype.itemsize, topology):
                psum_fallbacks.append((tuple(partial.shape), partial.dtype.name))
                return jaxnvrar.all_reduce(partial, TP, algorithm="psum")
        return jaxnvrar.all_reduce(partial, TP, algorithm="nvrar")

    return reduce


# ---------------------------------------------------------------- rotary embedding


def rope_frequencies(config: LlamaConfig) -> jax.Array:
    """Inverse frequencies, with Llama 3's scaling of the long wavelengths where configured."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    if config.rope_llama3 is None:
        return inv_freq
    factor, low_freq_factor, high_freq_factor, original_context = config.rope_llama3
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = original_context / low_freq_factor
    high_freq_wavelength = original_context / high_freq_factor
    scaled = jnp.where(wavelength > low_freq_wavelength, inv_freq / factor, inv_freq)
    smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return jnp.where(medium, smoothed, scaled)


def _apply_rope(x, inv_freq, positions):
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [L, hd/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[None, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[None, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


# ---------------------------------------------------------------- sharded entry points


def _replicated(mesh, value, dtype=jnp.int32) -> jax.Array:
    """A host value as a global array replicated over the mesh (every process passes the same)."""
    if isinstance(value, jax.Array):
        return value
    host = np.asarray(value, dtype)
    return jax.make_array_from_callback(host.shape, NamedSharding(mesh, P()), lambda index: host[index])


def _specs(tree):
    return jax.tree.map(lambda a: a.sharding.spec, tree)


def _sharded_forward(model: Llama, with_cache: bool):
    """The model as a shard_map over its mesh. Without a cache: logits of every position. With
    a cache (decoding): greedy next tokens [B], last-position logits [B, V] (vocab-sharded) and
    the updated cache."""
    graphdef, state = nnx.split(model)
    vocab_spec = P(None, None, TP)
    if not with_cache:
        def forward(state, tokens, write_at):
            return nnx.merge(graphdef, state)(tokens, write_at + jnp.arange(tokens.shape[1]), None, write_at)[0]

        return state, jax.shard_map(forward, mesh=model.mesh, in_specs=(_specs(state), P(), P()),
                                    out_specs=vocab_spec, check_vma=False)

    def decode(state, tokens, caches, write_at):
        net = nnx.merge(graphdef, state)
        logits, caches = net(tokens, write_at + jnp.arange(tokens.shape[1]), caches, write_at, last_only=True)
        logits = logits[:, 0]
        return greedy_tokens(logits, _reducer(net.all_reduce)), logits, caches

    cache_spec = P(None, TP, None, None)
    cache_specs = ((cache_spec, cache_spec),) * model.config.num_hidden_layers
    mapped = jax.shard_map(
        decode, mesh=model.mesh,
        in_specs=(_specs(state), P(), cache_specs, P()),
        out_specs=(P(), P(None, TP), cache_specs),
        check_vma=False,
    )
    return state, mapped


@functools.lru_cache(maxsize=32)
def _compiled_forward(model: Llama):
    state, mapped = _sharded_forward(model, with_cache=False)
    return state, jax.jit(lambda s, t: mapped(s, t, jnp.int32(0)))


def forward_logits(model: Llama, input_ids) -> jax.Array:
    """Full forward, no cache: float32 logits [batch, length, vocab]."""
    state, forward = _compiled_forward(model)
    with jax.set_mesh(model.mesh):
        return forward(state, _replicated(model.mesh, input_ids))


def init_cache(model: Llama, batch: int, max_length: int):
    """Zeroed KV cache: one (k, v) per layer, [batch, kv_heads, max_length, head_dim], sharded on heads."""
    heads = model.layers[0].attention.kv_heads()
    sharding = NamedSharding(model.mesh, P(None, TP, None, None))
    shape = (batch, heads, max_length, model.config.head_dim)
    dtype = model.embed[...].dtype
    make = jax.jit(lambda: tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                                 for _ in range(model.config.num_hidden_layers)),
                   out_shardings=tuple((sharding, sharding) for _ in range(model.config.num_hidden_layers)))
    return make()


@functools.lru_cache(maxsize=32)  # modules hash by identity: one set of compiled steps per model
def _decoder(model: Llama):
    """The decoding shard_map, and the parameters as a flat tuple: jit's dispatch flattens a
    tuple of arrays in C++, while an nnx.State (a Python pytree) costs host time every step."""
    state, mapped = _sharded_forward(model, with_cache=True)
    leaves, treedef = jax.tree.flatten(state)
    return tuple(leaves), lambda leaves, *args: mapped(jax.tree.unflatten(treedef, leaves), *args)


@functools.lru_cache(maxsize=32)
def _compiled_step(model: Llama):
    leaves, mapped = _decoder(model)

    def step(leaves, tokens, caches, write_at):
        next_tokens, logits, caches = mapped(leaves, tokens, caches, write_at)
        return next_tokens, logits, caches, write_at + tokens.shape[1]

    return leaves, jax.jit(step, donate_argnums=(2,))


@functools.lru_cache(maxsize=32)
def _compiled_advance(model: Llama):
    leaves, mapped = _decoder(model)

    def advance(leaves, history, caches, position):
        tokens = lax.dynamic_slice_in_dim(history, position, 1, axis=1)
        next_tokens, _, caches = mapped(leaves, tokens, caches, position)
        history = lax.dynamic_update_slice_in_dim(history, next_tokens[:, None], position + 1, axis=1)
        return history, caches, position + 1

    # Everything it changes is donated and comes back in the same buffers: the step's buffer
    # addresses never change, so XLA replays its command buffer without re-recording it.
    return leaves, jax.jit(advance, donate_argnums=(1, 2, 3))


def decode_step(model: Llama, tokens, caches, write_at):
    """Runs tokens [B, L] at positions write_at.. through the model, writing the cache (donated).
    Returns (greedy next tokens [B], last-position logits [B, V] (float32, vocab-sharded),
    caches, next write position); pass the returned position (a device scalar) to the next
    step to keep host transfers off the loop."""
    leaves, step = _compiled_step(model)
    with jax.set_mesh(model.mesh):
        return step(leaves, _replicated(model.mesh, tokens), caches, _replicated(model.mesh, write_at))


def advance(model: Llama, history, caches, position):
    """One greedy decode step in place, as `generate` runs them: reads the token at `position` of
    `history` [B, T], writes the cache there and the next token at `position + 1`. history,
    caches and position are donated and returned (same buffers): (history, caches, position + 1)."""
    leaves, step = _compiled_advance(model)
    with jax.set_mesh(model.mesh):
        return step(leaves, history, caches, _replicated(model.mesh, position))


def start_history(prompt: jax.Array, next_tokens: jax.Array, max_new_tokens: int) -> jax.Array:
    """[B, L + max_new_tokens]: the prompt, the first generated token, room for the rest
    (laid out like the prompt: replicated over its mesh, also across processes)."""
    return _start_history(prompt, next_tokens, max_new_tokens, prompt.sharding)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _start_history(prompt, next_tokens, max_new_tokens, sharding):
    pad = jnp.zeros((prompt.shape[0], max_new_tokens - 1), prompt.dtype)
    history = jnp.concatenate([prompt, next_tokens[:, None].astype(prompt.dtype), pad], axis=1)
    return jax.lax.with_sharding_constraint(history, sharding)


# Prompt tokens (batch x positions) per prefill call. One call over the whole prompt holds the
# activations of every token at once (Llama 3.1 8B, batch 64 x 1024: 30 GiB of temporaries);
# chunks of positions, each attending to the cache the chunks before it wrote, hold one chunk's.
PREFILL_TOKENS = 16384


def prefill_in_chunks(step, tokens, caches, max_tokens: int | None = None):
    """Writes the prompt tokens [B, L] into the cache with `step(tokens, caches, write_at)` (a
    decode_step) over chunks of positions of at most `max_tokens` tokens of the batch
    (PREFILL_TOKENS); returns the last chunk's (next tokens, logits, caches, position)."""
    if tokens.ndim != 2:
        raise ValueError(f"the prompt must be token ids [batch, length], got shape {tuple(tokens.shape)}")
    batch, length = tokens.shape
    if length < 1:
        raise ValueError("the prompt is empty: give at least one token per sequence")
    chunk = max(1, (max_tokens or PREFILL_TOKENS) // batch)
    for start in range(0, length, chunk):
        result = step(tokens[:, start:start + chunk], caches, start)
        caches = result[2]
    return result


def prefill(model: Llama, tokens, caches):
    """The prompt tokens [B, L] into an empty cache (`init_cache`), in chunks (`prefill_in_chunks`):
    (greedy next tokens [B], last logits, caches, next position), as `decode_step` returns them."""
    ids = tokens if isinstance(tokens, jax.Array) else np.asarray(tokens)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"the prompt must be integer token ids, got {ids.dtype}")
    if ids.ndim == 2:  # (prefill_in_chunks names other shapes)
        cache_batch, _, cache_length, _ = caches[0][0].shape
        if ids.shape[0] != cache_batch or ids.shape[1] > cache_length:
            raise ValueError(f"a prompt of {ids.shape[0]} x {ids.shape[1]} tokens does not fit a cache of "
                             f"{cache_batch} sequences x {cache_length} positions: make the cache with "
                             "init_cache(model, batch, prompt length + new tokens)")
    return prefill_in_chunks(functools.partial(decode_step, model), _replicated(model.mesh, ids), caches)


def greedy_decode(tokens: jax.Array, max_new_tokens: int, new_cache, run_tokens, step) -> jax.Array:
    """Prefill (in chunks, `prefill_in_chunks`), then one greedy token per step: the loop of both
    `generate`s. `new_cache(batch, length)` makes an empty cache; `run_tokens(tokens, caches,
    write_at)` is a decode_step; `step(history, caches, position)` is an advance."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return tokens
    batch, length = tokens.shape
    next_tokens, _, caches, position = prefill_in_chunks(run_tokens, tokens, new_cache(batch, length + max_new_tokens))
    history = start_history(tokens, next_tokens, max_new_tokens)
    for _ in range(1, max_new_tokens):
        history, caches, position = step(history, caches, position)
        if queue_may_deadlock(history):
            history.block_until_ready()
    return history


def queue_may_deadlock(array: jax.Array) -> bool:
    """True on XLA:CPU, whose collectives block one of its few worker threads each: with several
    multi-device steps queued, every worker can end up waiting in a rendezvous that a queued step
    would complete (seen: generate of 100 tokens at TP 2 on 2 cores stuck in an all-reduce)."""
    return next(iter(array.devices())).platform == "cpu"


def generate(model: Llama, input_ids, max_new_tokens: int) -> jax.Array:
    """Greedy decoding: prefill, then one token per step. Returns [batch, length + max_new_tokens]."""
    return greedy_decode(_replicated(model.mesh, input_ids), max_new_tokens, functools.partial(init_cache, model),
                         functools.partial(decode_step, model), functools.partial(advance, model))


_FROM_PARAMS = ("load_checkpoint", "random_model", "make_mesh", "PRESETS")


def __getattr__(name):
    # The loaders live in llama_params.py (which imports this module); resolved on first use
    # so that either module can be imported first.
    if name in _FROM_PARAMS:
        from . import llama_params

        return getattr(llama_params, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Running the model over its mesh: the forward and the decoding steps as one `jax.shard_map`
each, compiled once per model, and the loops around them.

API: `forward_logits`, `generate`; for your own loop `init_cache`, `prefill`, `decode_step`, `advance`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .config import TP
from .modules import Llama
from .reduction import reducer


def replicated(mesh, value, dtype=jnp.int32) -> jax.Array:
    """A value as a global array replicated over the mesh: a host value (every process passes the
    same) or a jax.Array placed anywhere (moved onto the mesh when it is not there already)."""
    sharding = NamedSharding(mesh, P())
    if isinstance(value, jax.Array):
        return value if value.sharding.is_equivalent_to(sharding, value.ndim) else jax.device_put(value, sharding)
    host = np.asarray(value, dtype)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def prompt_ids(mesh, input_ids, vocab_size: int) -> jax.Array:
    """Token ids [batch, length] as a global int32 array replicated over the mesh, checked: a jax
    array of any placement, a numpy array or nested lists; integers in [0, vocab_size); at least
    one sequence of at least one token. A ValueError/TypeError names what is wrong otherwise."""
    ids = input_ids if isinstance(input_ids, jax.Array) else np.asarray(input_ids)
    if ids.dtype == bool or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"the prompt must be integer token ids, got {ids.dtype}")
    if ids.ndim != 2:
        hint = " (one sequence: prompt[None])" if ids.ndim == 1 else ""
        raise ValueError(f"the prompt must be token ids [batch, length], got shape {tuple(ids.shape)}{hint}")
    if ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"the prompt is empty (shape {tuple(ids.shape)}): give at least one token per sequence")
    # The range is checked in the ids' own dtype, before the cast to int32 could wrap them; a
    # jax array on the mesh first (it may be held by several processes).
    placed = replicated(mesh, ids) if isinstance(ids, jax.Array) else None
    low, high = (int(v) for v in (_id_range(placed) if placed is not None else (ids.min(), ids.max())))
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size}): the prompt was made "
                         "for another tokenizer, or holds padding markers such as -1")
    if placed is None:
        return replicated(mesh, ids.astype(np.int32))
    return placed if placed.dtype == jnp.int32 else placed.astype(jnp.int32)


@jax.jit
def _id_range(ids):
    # On the devices: a prompt held by several processes is checked without gathering it.
    return jnp.min(ids), jnp.max(ids)


def greedy_tokens(logits, reduce) -> jax.Array:
    """Greedy next tokens [B] from this rank's vocabulary slice [B, V/tp] of the last logits,
    inside shard_map: each rank offers its best (value, index) and one all-reduce of a
    [2, tp, B] table, zero but for the rank's own row, gathers them all. Ties go to the
    lowest index, as jnp.argmax does; no rank ever holds the whole vocabulary."""
    ranks, rank = lax.axis_size(TP), lax.axis_index(TP)
    local = jnp.argmax(logits, axis=-1)
    # The best value read at the argmax, not a second reduction over the vocabulary (jnp.max).
    best = jnp.take_along_axis(logits, local[:, None], axis=-1)[:, 0]
    index = local + rank * logits.shape[-1]  # < 2^24: exact in float32
    mine = (jnp.arange(ranks) == rank)[None, :, None]  # one select, not zeros + an update: one kernel
    table = jnp.where(mine, jnp.stack([best, index.astype(jnp.float32)])[:, None], 0.0)
    table = reduce(table)
    winner = jnp.argmax(table[0], axis=0)  # the first rank holding the maximum
    return jnp.take_along_axis(table[1], winner[None], axis=0)[0].astype(jnp.int32)


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
        return greedy_tokens(logits, reducer(net.all_reduce)), logits, caches

    cache_spec = P(None, TP, None, None)
    cache_specs = ((cache_spec, cache_spec),) * model.config.num_hidden_layers
    mapped = jax.shard_map(
        decode, mesh=model.mesh,
        in_specs=(_specs(state), P(), cache_specs, P()),
        out_specs=(P(), P(None, TP), cache_specs),
        check_vma=False,
    )
    return state, mapped


def _jit(model: Llama, fn, **kwargs):
    """jax.jit with the model's XLA options (`with_all_reduce(..., compiler_options=...)`)."""
    return jax.jit(fn, compiler_options=dict(model.compiler_options) or None, **kwargs)


@functools.lru_cache(maxsize=32)
def _compiled_forward(model: Llama):
    state, mapped = _sharded_forward(model, with_cache=False)
    return state, _jit(model, lambda s, t: mapped(s, t, jnp.int32(0)))


def forward_logits(model: Llama, input_ids) -> jax.Array:
    """Full forward, no cache: float32 logits [batch, length, vocab]."""
    state, forward = _compiled_forward(model)
    with jax.set_mesh(model.mesh):
        return forward(state, prompt_ids(model.mesh, input_ids, model.config.vocab_size))


def cache_shapes(model: Llama, batch: int, max_length: int):
    """The KV cache's shapes: one (k, v) per layer, each a jax.ShapeDtypeStruct [batch, kv_heads,
    max_length, head_dim] sharded on heads (what `init_cache` allocates; for compiling only)."""
    shape = (batch, model.layers[0].attention.kv_heads(), max_length, model.config.head_dim)
    sharding = NamedSharding(model.mesh, P(None, TP, None, None))
    one = jax.ShapeDtypeStruct(shape, model.embed.get_value().dtype, sharding=sharding)
    return tuple((one, one) for _ in range(model.config.num_hidden_layers))


def init_cache(model: Llama, batch: int, max_length: int):
    """Zeroed KV cache: one (k, v) per layer, [batch, kv_heads, max_length, head_dim], sharded on heads."""
    shapes = cache_shapes(model, batch, max_length)
    make = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                   out_shardings=jax.tree.map(lambda s: s.sharding, shapes))
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

    return leaves, _jit(model, step, donate_argnums=(2,))


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
    return leaves, _jit(model, advance, donate_argnums=(1, 2, 3))


def lowered_advance(model: Llama, batch: int, max_length: int):
    """`advance` lowered for a batch and cache length from shapes alone (an `abstract_model`
    will do; nothing runs): `.as_text()` is the StableHLO, `.compile()` the program XLA runs every
    decode step (`jaxnvrar-bench kernels` reads it)."""
    if batch < 1 or max_length < 1:
        raise ValueError(f"lowered_advance needs batch >= 1 and max_length >= 1 (the cache's positions), "
                         f"got batch={batch}, max_length={max_length}")
    leaves, step = _compiled_advance(model)
    replicated_sharding = NamedSharding(model.mesh, P())
    history = jax.ShapeDtypeStruct((batch, max_length), jnp.int32, sharding=replicated_sharding)
    position = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated_sharding)
    with jax.set_mesh(model.mesh):
        return step.trace(leaves, history, cache_shapes(model, batch, max_length), position).lower()


def compiled_advance(model: Llama, batch: int, max_length: int):
    """`lowered_advance(...).compile()`."""
    return lowered_advance(model, batch, max_length).compile()


def _check_room(position, length: int, room: int, what: str) -> None:
    """A ValueError where a host-side position leaves no room for `length` more positions of
    `room`: past its end, XLA's dynamic updates clamp (they would overwrite the last positions and
    the step would run, silently wrong). A device scalar is not read back (no host round trip in
    the loop): keeping it in range is the caller's part."""
    if isinstance(position, (int, np.integer)) and not 0 <= position <= room - length:
        raise ValueError(f"{what}: positions {position}..{position + length - 1} do not fit {room} positions; "
                         "allocate a longer cache (init_cache(model, batch, max_length)) and history")


def _check_advance_room(position, cache_positions: int, history, what: str) -> None:
    """`_check_room` for a greedy step in place: it writes the cache at `position`, reads the
    history there and writes the next token after it."""
    _check_room(position, 1, cache_positions, f"{what} (the cache)")
    _check_room(position, 2, history.shape[1], f"{what} (the history: the token read and the one written)")


def decode_step(model: Llama, tokens, caches, write_at):
    """Runs tokens [B, L] at positions write_at.. through the model, writing the cache (donated).
    Returns (greedy next tokens [B], last-position logits [B, V] (float32, vocab-sharded),
    caches, next write position); pass the returned position (a device scalar) to the next
    step to keep host transfers off the loop. A host int position past the cache raises."""
    _check_room(write_at, np.shape(tokens)[1], caches[0][0].shape[2], "decode_step")
    leaves, step = _compiled_step(model)
    with jax.set_mesh(model.mesh):
        return step(leaves, replicated(model.mesh, tokens), caches, replicated(model.mesh, write_at))


def advance(model: Llama, history, caches, position):
    """One greedy decode step in place, as `generate` runs them: reads the token at `position` of
    `history` [B, T], writes the cache there and the next token at `position + 1`. history,
    caches and position are donated and returned (same buffers): (history, caches, position + 1).
    A host int position past the cache or the history raises."""
    _check_advance_room(position, caches[0][0].shape[2], history, "advance")
    leaves, step = _compiled_advance(model)
    with jax.set_mesh(model.mesh):
        return step(leaves, history, caches, replicated(model.mesh, position))


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
    ids = prompt_ids(model.mesh, tokens, model.config.vocab_size)
    cache_batch, _, cache_length, _ = caches[0][0].shape
    if ids.shape[0] != cache_batch or ids.shape[1] > cache_length:
        raise ValueError(f"a prompt of {ids.shape[0]} x {ids.shape[1]} tokens does not fit a cache of "
                         f"{cache_batch} sequences x {cache_length} positions: make the cache with "
                         "init_cache(model, batch, prompt length + new tokens)")
    return prefill_in_chunks(functools.partial(decode_step, model), ids, caches)


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
    return greedy_decode(prompt_ids(model.mesh, input_ids, model.config.vocab_size), max_new_tokens,
                         functools.partial(init_cache, model),
                         functools.partial(decode_step, model), functools.partial(advance, model))

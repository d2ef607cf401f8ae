"""Llama 3.x in Flax NNX with explicit tensor parallelism over a mesh axis named "tp".

q/k/v and gate/up are column-parallel (each rank holds some heads / some of the MLP width),
o and down are row-parallel and end in `jaxnvrar.all_reduce`: two all-reduces per layer, the
ones NVRAR exists for. KV heads fewer than TP ranks are replicated so each rank holds the KV
head its query heads use. The whole forward runs in one `jax.shard_map`; parameters are global
arrays whose own shardings give the in_specs (see `llama_params.py` for loading and init).

API: `load_checkpoint`, `random_model`, `forward_logits`, `generate`, `decode_step`.
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


class RMSNorm(nnx.Module):
    def __init__(self, weight, eps: float):
        self.weight = nnx.Param(weight)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, wq, wk, wv, wo, head_dim: int):
        self.wq, self.wk, self.wv, self.wo = nnx.Param(wq), nnx.Param(wk), nnx.Param(wv), nnx.Param(wo)
        self.head_dim = head_dim

    def __call__(self, x, rope, positions, cache, write_at, all_reduce):
        b, length, _ = x.shape
        hd = self.head_dim
        q = (x @ self.wq[...]).reshape(b, length, -1, hd)  # this rank's query heads
        k = (x @ self.wk[...]).reshape(b, length, -1, hd)  # this rank's KV heads
        v = (x @ self.wv[...]).reshape(b, length, -1, hd)
        q, k = _apply_rope(q, rope, positions), _apply_rope(k, rope, positions)
        if cache is not None:
            cache_k = lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, write_at, 0, 0))
            cache_v = lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, write_at, 0, 0))
            k, v, cache = cache_k, cache_v, (cache_k, cache_v)
            key_positions = jnp.arange(k.shape[1])
        else:
            key_positions = positions
        kv_heads = k.shape[2]
        q = q.reshape(b, length, kv_heads, -1, hd)  # group the query heads of each KV head
        scores = jnp.einsum("blkgd,bskd->bkgls", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(hd)
        visible = key_positions[None, :] <= positions[:, None]
        scores = jnp.where(visible, scores, -jnp.inf)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgls,bskd->blkgd", weights, v).reshape(b, length, -1)
        return all_reduce(out @ self.wo[...]), cache


class MLP(nnx.Module):
    def __init__(self, w_gate, w_up, w_down):
        self.w_gate, self.w_up, self.w_down = nnx.Param(w_gate), nnx.Param(w_up), nnx.Param(w_down)

    def __call__(self, x, all_reduce):
        h = jax.nn.silu(x @ self.w_gate[...]) * (x @ self.w_up[...])
        return all_reduce(h @ self.w_down[...])


class DecoderLayer(nnx.Module):
    def __init__(self, p: dict, config: LlamaConfig):
        self.input_norm = RMSNorm(p["input_norm"], config.rms_norm_eps)
        self.attention = Attention(p["wq"], p["wk"], p["wv"], p["wo"], config.head_dim)
        self.post_attention_norm = RMSNorm(p["post_attention_norm"], config.rms_norm_eps)
        self.mlp = MLP(p["w_gate"], p["w_up"], p["w_down"])

    def __call__(self, x, rope, positions, cache, write_at, all_reduce):
        attended, cache = self.attention(self.input_norm(x), rope, positions, cache, write_at, all_reduce)
        x = x + attended
        return x + self.mlp(self.post_attention_norm(x), all_reduce), cache


class Llama(nnx.Module):
    """The model; `params` maps names to (global, sharded) arrays, see llama_params.py."""

    def __init__(self, params: dict, config: LlamaConfig, mesh, all_reduce: str = "auto"):
        if all_reduce not in ALL_REDUCE_CHOICES:
            raise ValueError(f"all_reduce must be one of {ALL_REDUCE_CHOICES}, got {all_reduce!r}")
        self.config = config
        self.mesh = mesh
        self.all_reduce = all_reduce
        self.embed = nnx.Param(params["embed"])
        self.layers = nnx.List([DecoderLayer(p, config) for p in params["layers"]])
        self.norm = RMSNorm(params["norm"], config.rms_norm_eps)
        self.lm_head = nnx.Param(params["lm_head"])

    def __call__(self, tokens, positions, caches, write_at):
        """Per-shard forward: tokens [B, L] -> this rank's vocabulary slice of the logits."""
        reduce = _reducer(self.all_reduce)
        rope = rope_frequencies(self.config)
        x = self.embed[...][tokens]
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, rope, positions, None if caches is None else caches[i], write_at, reduce)
            new_caches.append(cache)
        logits = self.norm(x) @ self.lm_head[...]
        return logits.astype(jnp.float32), (None if caches is None else tuple(new_caches))


def with_all_reduce(model: Llama, algorithm: str) -> Llama:
    """The same weights (shared, not copied) with another all-reduce algorithm."""
    if algorithm not in ALL_REDUCE_CHOICES:
        raise ValueError(f"all_reduce must be one of {ALL_REDUCE_CHOICES}, got {algorithm!r}")
    twin = nnx.merge(*nnx.split(model))
    twin.all_reduce = algorithm
    return twin


def _reducer(algorithm: str):
    if algorithm == "none":  # diagnostic: the communication-free bound; the numbers are WRONG
        return lambda partial: partial
    if algorithm != "nvrar":
        return lambda partial: jaxnvrar.all_reduce(partial, TP, algorithm=algorithm)

    def reduce(partial):
        # Prefill messages (batch x prompt x hidden) can outgrow the NVSHMEM workspace: those
        # go to psum; every decode-step message takes the kernel.
        topology = default_topology(lax.axis_size(TP))
        fits = fits_workspace(partial.size, partial.dtype.itemsize, topology)
        return jaxnvrar.all_reduce(partial, TP, algorithm="nvrar" if fits else "psum")

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
    graphdef, state = nnx.split(model)

    def body(state, tokens, caches, write_at):
        logits, caches = nnx.merge(graphdef, state)(
            tokens, write_at + jnp.arange(tokens.shape[1]), caches, write_at)
        return logits, caches

    cache_spec = P(None, None, TP, None)
    cache_specs = ((cache_spec, cache_spec),) * model.config.num_hidden_layers if with_cache else None
    mapped = jax.shard_map(
        body, mesh=model.mesh,
        in_specs=(_specs(state), P(), cache_specs, P()),
        out_specs=(P(None, None, TP), cache_specs),
        check_vma=False,
    )
    return state, mapped


@functools.lru_cache(maxsize=32)
def _compiled_forward(model: Llama):
    state, mapped = _sharded_forward(model, with_cache=False)
    return state, jax.jit(lambda s, t: mapped(s, t, None, jnp.int32(0))[0])


def forward_logits(model: Llama, input_ids) -> jax.Array:
    """Full forward, no cache: float32 logits [batch, length, vocab]."""
    state, forward = _compiled_forward(model)
    with jax.set_mesh(model.mesh):
        return forward(state, _replicated(model.mesh, input_ids))


def init_cache(model: Llama, batch: int, max_length: int):
    """Zeroed KV cache: one (k, v) per layer, [batch, max_length, kv_heads, head_dim], sharded on heads."""
    heads = model.layers[0].attention.wk[...].shape[1] // model.config.head_dim  # global (replicated) KV heads
    sharding = NamedSharding(model.mesh, P(None, None, TP, None))
    shape = (batch, max_length, heads, model.config.head_dim)
    dtype = model.embed[...].dtype
    make = jax.jit(lambda: tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                                 for _ in range(model.config.num_hidden_layers)),
                   out_shardings=tuple((sharding, sharding) for _ in range(model.config.num_hidden_layers)))
    return make()


@functools.lru_cache(maxsize=32)  # modules hash by identity: one compiled step per model
def _compiled_step(model: Llama):
    state, mapped = _sharded_forward(model, with_cache=True)

    def step(state, tokens, caches, write_at):
        logits, caches = mapped(state, tokens, caches, write_at)
        next_tokens = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return next_tokens, logits, caches, write_at + tokens.shape[1]

    return state, jax.jit(step, donate_argnums=(2,))


def decode_step(model: Llama, tokens, caches, write_at):
    """Runs tokens [B, L] at positions write_at.. through the model, writing the cache (donated).
    Returns (greedy next tokens [B], logits [B, L, V], caches, next write position); pass the
    returned position (a device scalar) to the next step to keep host transfers off the loop."""
    state, step = _compiled_step(model)
    with jax.set_mesh(model.mesh):
        return step(state, _replicated(model.mesh, tokens), caches, _replicated(model.mesh, write_at))


def greedy_decode(tokens: jax.Array, max_new_tokens: int, new_cache, step) -> jax.Array:
    """Prefill, then one greedy token per step: the loop of both `generate`s. `new_cache(batch,
    length)` makes an empty cache; `step(tokens, caches, position)` is a decode_step."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return tokens
    batch, length = tokens.shape
    next_tokens, _, caches, position = step(tokens, new_cache(batch, length + max_new_tokens), 0)
    out = [tokens, next_tokens[:, None]]
    for _ in range(1, max_new_tokens):
        next_tokens, _, caches, position = step(next_tokens[:, None], caches, position)
        out.append(next_tokens[:, None])
    return jnp.concatenate(out, axis=1)


def generate(model: Llama, input_ids, max_new_tokens: int) -> jax.Array:
    """Greedy decoding: prefill, then one token per step. Returns [batch, length + max_new_tokens]."""
    return greedy_decode(_replicated(model.mesh, input_ids), max_new_tokens,
                         functools.partial(init_cache, model), functools.partial(decode_step, model))


_FROM_PARAMS = ("load_checkpoint", "random_model", "make_mesh", "PRESETS")


def __getattr__(name):
    # The loaders live in llama_params.py (which imports this module); resolved on first use
    # so that either module can be imported first.
    if name in _FROM_PARAMS:
        from . import llama_params

        return getattr(llama_params, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The Llama's modules in Flax NNX, with explicit tensor parallelism over the mesh axis "tp".

q/k/v and gate/up are column-parallel (each rank holds some heads / some of the MLP width),
o and down are row-parallel: Attention and MLP return this rank's partial sums, and the layer
hands each to `jaxnvrar.all_reduce_rms_norm` (via `reduction.norm_reducer`), which all-reduces
it, adds it to the residual stream and applies the RMSNorm that follows (the post-attention
norm; the next layer's input norm, or the final norm after the last layer): two all-reduces per
layer, the ones NVRAR exists for. Only the first layer's input norm is a plain RMSNorm (of the
embeddings). KV heads fewer than TP ranks are replicated so each rank holds the KV
head its query heads use. The modules hold local shards: they run inside one `jax.shard_map`
(see `decoding.py`); parameters are global arrays whose own shardings give the in_specs (see
`weights.py` for loading and init).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxnvrar.primitive import rms_norm

from .attention import attend_heads, check_implementation, decode_attention, roped_heads
from .config import TP, LlamaConfig
from .reduction import check_all_reduce_choice, norm_reducer


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
    one more small kernel, so only products below the bound get it. The Llama itself runs a
    single row as two (`Llama.__call__`), which needs no pad per product; this serves callers of
    the layers with single rows (the pipeline's micro-batches)."""
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
        # The same ops as the fused all-reduce + RMSNorm's composition, so every norm of the
        # model rounds alike whichever path computed it.
        return rms_norm(x, self.weight[...], self.eps)


class Attention(nnx.Module):
    """q, k and v come from one matmul with `wqkv`, whose shard on each rank is that rank's
    [q | k | v] columns (`fuse_columns`): one weight read and one kernel instead of three.
    Returns this rank's partial sum of the o-projection (row-parallel, not reduced) and the cache."""

    def __init__(self, wqkv, wo, head_dim: int, q_width: int, kv_width: int):
        self.wqkv, self.wo = nnx.Param(wqkv), nnx.Param(wo)
        self.head_dim = head_dim
        self.q_width, self.kv_width = q_width, kv_width  # global columns (KV heads as replicated)

    def kv_heads(self) -> int:
        """KV heads over all ranks, as replicated for tensor parallelism (the cache's width)."""
        return self.kv_width // self.head_dim

    def __call__(self, x, rope, positions, cache, write_at, implementation: str = "xla", twin: bool = False):
        """`twin`: the rows are copies of the first (the model's batch 1; the cache keeps one);
        `implementation`: the decode step's attention (`attention.decode_attention`: "xla" or
        "kernel"; "kernel" for decode steps, XLA's ops for prefill chunks)."""
        length = x.shape[1]
        tp = lax.axis_size(TP)
        qkv = project(x, self.wqkv[...])  # this rank's [q | k | v] heads
        q_heads = self.q_width // tp // self.head_dim
        if cache is not None:
            if not (length == 1 or twin):
                implementation = "xla"  # a prefill chunk: the kernel is for decode steps (one row, or the twin)
            out, cache_k, cache_v = decode_attention(qkv, cache[0], cache[1], rope, positions, write_at,
                                                     q_heads=q_heads, cache_rows=1 if twin else None,
                                                     twin=twin, implementation=implementation)
            return project(out, self.wo[...]), (cache_k, cache_v)
        q, k, v = roped_heads(qkv, q_heads, self.head_dim, rope, positions)
        return project(attend_heads(q, k, v, positions, positions), self.wo[...]), cache


class MLP(nnx.Module):
    """gate and up from one matmul with `w_gate_up` (each rank's [gate | up] columns). Returns
    this rank's partial sum of the down-projection (row-parallel, not reduced)."""

    def __init__(self, w_gate_up, w_down):
        self.w_gate_up, self.w_down = nnx.Param(w_gate_up), nnx.Param(w_down)

    def __call__(self, x):
        gate, up = jnp.split(project(x, self.w_gate_up[...]), 2, axis=-1)
        return project(jax.nn.silu(gate) * up, self.w_down[...])


def fuse_columns(*parts: jax.Array) -> jax.Array:
    """One column-parallel array whose shard on each rank is the concatenation of the parts'
    shards there (global arrays sharded the same way on their last axis)."""
    sharding = parts[0].sharding
    if not isinstance(parts[0], jax.Array):  # shapes only (weights.abstract_model): no arrays to join
        columns = sum(part.shape[-1] for part in parts)
        return jax.ShapeDtypeStruct((*parts[0].shape[:-1], columns), parts[0].dtype, sharding=sharding)
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

    def __call__(self, normed, residual, rope, positions, cache, write_at, reduce_norm, next_norm,
                 twin: bool = False, attention: str = "xla"):
        """`normed`: this layer's input norm of `residual` (the layer before computed it, fused
        with its last all-reduce; for the first layer, `input_norm(embeddings)`). `reduce_norm`:
        `reduction.norm_reducer(...)`; `next_norm`: the RMSNorm after this layer (the next
        layer's input norm, or the model's final norm). Returns (next_norm(new residual), the
        new residual, cache). `twin`: the rows are copies of the first (the model's batch 1, whose
        cache keeps one); `attention`: the decode step's attention implementation."""
        attended, cache = self.attention(normed, rope, positions, cache, write_at, attention, twin=twin)
        post = self.post_attention_norm
        normed, residual = reduce_norm(attended, residual, post.weight[...], post.eps)
        normed, residual = reduce_norm(self.mlp(normed), residual, next_norm.weight[...], next_norm.eps)
        return normed, residual, cache


def fuse_layer(p: dict) -> tuple[dict, tuple[int, int]]:
    """A layer's loaded arrays (wq, wk, wv, w_gate, w_up separate) with the projections fused."""
    fused = {k: v for k, v in p.items() if k not in ("wq", "wk", "wv", "w_gate", "w_up")}
    fused["wqkv"] = fuse_columns(p["wq"], p["wk"], p["wv"])
    fused["w_gate_up"] = fuse_columns(p["w_gate"], p["w_up"])
    return fused, (p["wq"].shape[-1], p["wk"].shape[-1])


# The name scope of layer i's ops is f"{LAYER_SCOPE}{i}".
LAYER_SCOPE = "layer"


class Llama(nnx.Module):
    """The model; `params` maps names to (global, sharded) arrays, see weights.py."""

    def __init__(self, params: dict, config: LlamaConfig, mesh, all_reduce: str = "auto",
                 attention: str = "xla"):
        check_all_reduce_choice(all_reduce)
        check_implementation(attention)
        self.config = config
        self.mesh = mesh
        self.all_reduce = all_reduce
        # The decode step's attention with the cache (`attention.decode_attention`): "xla", the jax
        # ops, or "kernel", the fused CUDA kernel (experimental, opt-in: even with "xla" per step as of 2026-12-02).
        self.attention = attention
        # XLA options its compiled programs get, as sorted (name, value) pairs (`with_all_reduce`).
        self.compiler_options: tuple[tuple[str, bool | int | str], ...] = ()
        self.embed = nnx.Param(params["embed"])
        self.layers = nnx.List([DecoderLayer(fused, config, widths)
                                for fused, widths in map(fuse_layer, params["layers"])])
        self.norm = RMSNorm(params["norm"], config.rms_norm_eps)
        self.lm_head = nnx.Param(params["lm_head"])

    def __call__(self, tokens, positions, caches, write_at, last_only: bool = False):
        """Per-shard forward: tokens [B, L] -> this rank's vocabulary slice of the logits, of
        every position, or with `last_only` of the last one ([B, 1, V/tp]: all decoding needs)."""
        reduce_norm = norm_reducer(self.all_reduce)
        rope = rope_frequencies(self.config)
        # One token (decoding at batch 1) runs as two identical rows, the second a twin of the
        # first at the same position that the cache does not keep: with one row XLA:GPU turns
        # every small product into a matrix-vector multiply + reduce at a fraction of the
        # bandwidth (`project`); two rows keep them matrix products with no pad or slice kernel
        # per product, for the same weight reads. (The all-reduces then carry two rows.)
        twin = tokens.shape[0] * tokens.shape[1] == 1
        if twin:
            # A broadcast, not a concatenate: it fuses into the embedding gather.
            tokens, positions = jnp.broadcast_to(tokens, (1, 2)), jnp.broadcast_to(positions, (2,))
        residual = self.embed[...][tokens]
        norms = [layer.input_norm for layer in self.layers] + [self.norm]
        normed = norms[0](residual)  # the one norm with no all-reduce before it
        new_caches = []
        for i, layer in enumerate(self.layers):
            # attention -> all-reduce + add + post-attention norm; MLP -> all-reduce + add + the
            # next layer's input norm (the final norm after the last layer). The scope names
            # the layer in the compiled program's metadata (profiles, `jaxnvrar-bench kernels`).
            with jax.named_scope(f"{LAYER_SCOPE}{i}"):
                normed, residual, cache = layer(normed, residual, rope, positions,
                                                None if caches is None else caches[i], write_at, reduce_norm,
                                                norms[i + 1], twin=twin,
                                                attention=self.attention)
            new_caches.append(cache)
        if last_only and not twin:
            normed = normed[:, -1:]
        logits = project(normed, self.lm_head[...])
        if twin:
            logits = logits[:, :1]
        return logits.astype(jnp.float32), (None if caches is None else tuple(new_caches))


def with_all_reduce(model: Llama, algorithm: str, *, compiler_options: dict | None = None) -> Llama:
    """The same weights (shared, not copied) with another all-reduce algorithm. `compiler_options`
    (XLA debug options, e.g. {"xla_gpu_unsupported_use_all_reduce_one_shot_kernel": True}) replace
    the ones its forward and decoding steps are compiled with (None keeps the model's; {} drops
    them): how XLA runs psum is part of the choice. An unknown name fails at the first compile."""
    check_all_reduce_choice(algorithm)
    copy = nnx.merge(*nnx.split(model))
    copy.all_reduce = algorithm
    if compiler_options is not None:
        copy.compiler_options = tuple(sorted(compiler_options.items()))
    return copy


def with_attention(model: Llama, implementation: str) -> Llama:
    """The same weights (shared, not copied) with another decode attention implementation
    ("xla" or "kernel"; see `attention.decode_attention`)."""
    check_implementation(implementation)
    copy = nnx.merge(*nnx.split(model))
    copy.attention = implementation
    return copy


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

"""Hybrid tensor x pipeline parallelism for jaxnvrar.models.llama: `pp` stages of `tp` ranks each.

Layers are split into equal consecutive blocks, one per stage, and stacked over the mesh axis
"pp"; inside a stage the layers are tensor-parallel over "tp" exactly as in llama (with
jaxnvrar's all-reduce). The batch is cut into micro-batches that flow through the stages with
`lax.ppermute` (GPipe order: at tick t stage s works on micro-batch t - s). Every rank runs
every tick; a stage without a micro-batch (the pipeline bubble) computes on a placeholder whose
results and KV-cache writes are discarded.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .llama import (TP, DecoderLayer, Llama, LlamaConfig, RMSNorm, greedy_decode, greedy_tokens, norm_reducer,
                    prompt_ids, reducer, replicated, rope_frequencies)
from .llama.decoding import _check_advance_room, _check_room

PP = "pp"
_LAYER_PARAMS = ("input_norm", "post_attention_norm", "wqkv", "wo", "w_gate_up", "w_down")


def make_mesh(pp: int, tp: int):
    if pp * tp > jax.device_count():
        raise ValueError(f"pp={pp} x tp={tp} needs {pp * tp} devices; {jax.device_count()} are visible")
    return jax.make_mesh((pp, tp), (PP, TP), devices=jax.devices()[: pp * tp])


@dataclasses.dataclass(eq=False)  # hashed by identity, like the modules: one compiled step each
class PipelinedLlama:
    config: LlamaConfig
    mesh: object
    stages: list  # per layer-in-stage j: {param name: array [pp, ...] sharded on "pp"}
    embed: jax.Array
    norm: jax.Array
    lm_head: jax.Array
    all_reduce: str
    widths: tuple[int, int]  # (q, kv) global columns of each layer's fused wqkv

    @property
    def num_stages(self) -> int:
        return self.mesh.shape[PP]


def _layer_arrays(layer: DecoderLayer) -> dict:
    return {"input_norm": layer.input_norm.weight[...], "post_attention_norm": layer.post_attention_norm.weight[...],
            "wqkv": layer.attention.wqkv[...], "wo": layer.attention.wo[...],
            "w_gate_up": layer.mlp.w_gate_up[...], "w_down": layer.mlp.w_down[...]}


def pipeline(model: Llama) -> PipelinedLlama:
    """Split a model built on a ("pp", "tp") mesh (by load_checkpoint or random_model, which
    replicate it over "pp") into stages: stage s keeps layers [s L/pp, (s+1) L/pp)."""
    mesh = model.mesh
    if PP not in mesh.axis_names:
        raise ValueError("pipeline() needs a model on a mesh with a 'pp' axis: use jaxnvrar.models.pipeline.make_mesh")
    pp, layers = mesh.shape[PP], len(model.layers)
    if layers % pp:
        raise ValueError(f"{layers} layers cannot be split into {pp} equal pipeline stages")
    per_stage = layers // pp
    arrays = [_layer_arrays(layer) for layer in model.layers]
    stages = []
    for j in range(per_stage):
        stacked = {}
        for name in _LAYER_PARAMS:
            parts = [arrays[s * per_stage + j][name] for s in range(pp)]
            spec = P(PP, *parts[0].sharding.spec)
            stacked[name] = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=NamedSharding(mesh, spec))(*parts)
        stages.append(stacked)
    attention = model.layers[0].attention
    return PipelinedLlama(model.config, mesh, stages, model.embed[...], model.norm.weight[...],
                          model.lm_head[...], model.all_reduce, (attention.q_width, attention.kv_width))


def init_cache(pmodel: PipelinedLlama, batch: int, max_length: int):
    """Per layer-in-stage: (k, v) of [pp, batch, kv_heads, max_length, head_dim]."""
    c = pmodel.config
    heads = pmodel.widths[1] // c.head_dim  # KV heads as replicated over the TP ranks
    sharding = NamedSharding(pmodel.mesh, P(PP, None, TP, None, None))
    shape = (pmodel.num_stages, batch, heads, max_length, c.head_dim)
    count = len(pmodel.stages)
    make = jax.jit(lambda: tuple((jnp.zeros(shape, pmodel.embed.dtype),) * 2 for _ in range(count)),
                   out_shardings=tuple((sharding, sharding) for _ in range(count)))
    return make()


def _stage_body(pmodel: PipelinedLlama, num_micro: int):
    config, pp = pmodel.config, pmodel.num_stages
    reduce = reducer(pmodel.all_reduce)
    reduce_norm = norm_reducer(pmodel.all_reduce)
    forward_pairs = [(s, s + 1) for s in range(pp - 1)]

    def body(stages, embed, norm_weight, lm_head, tokens, caches, write_at):
        stage = lax.axis_index(PP)
        layers = [DecoderLayer({k: v[0] for k, v in p.items()}, config, pmodel.widths) for p in stages]
        norm = RMSNorm(norm_weight, config.rms_norm_eps)
        norms = [layer.input_norm for layer in layers] + [norm]
        rope = rope_frequencies(config)
        _, micro, length = tokens.shape
        positions = write_at + jnp.arange(length)
        caches = [(k[0], v[0]) for k, v in caches]
        carried = jnp.zeros((micro, length, config.hidden_size), embed.dtype)
        logits = None
        for tick in range(num_micro + pp - 1):
            x = jnp.where(stage == 0, embed[tokens[min(tick, num_micro - 1)]], carried)
            index = tick - stage
            valid = (index >= 0) & (index < num_micro)
            rows = jnp.clip(index, 0, num_micro - 1) * micro
            # x is the residual stream (what travels between stages); each layer's all-reduces
            # come with the add and the next norm (all_reduce_rms_norm). The stage's last layer
            # ends in the final norm: on the last stage that is the output, elsewhere it is
            # unused and the next stage normalizes the residual it receives.
            normed = norms[0](x)
            for j, layer in enumerate(layers):
                k, v = caches[j]
                mine = (lax.dynamic_slice_in_dim(k, rows, micro), lax.dynamic_slice_in_dim(v, rows, micro))
                normed, x, (new_k, new_v) = layer(normed, x, rope, positions, mine, write_at, reduce_norm,
                                                  norms[j + 1])
                # The bubble's writes are discarded: the cache rows keep what they had.
                caches[j] = (lax.dynamic_update_slice_in_dim(k, jnp.where(valid, new_k, mine[0]), rows, 0),
                             lax.dynamic_update_slice_in_dim(v, jnp.where(valid, new_v, mine[1]), rows, 0))
            out = (normed[:, -1] @ lm_head).astype(jnp.float32)  # decoding needs the last position only
            if logits is None:
                logits = jnp.zeros((num_micro,) + out.shape, jnp.float32)
            keep = valid & (stage == pp - 1)
            logits = jnp.where(keep, lax.dynamic_update_index_in_dim(logits, out, jnp.clip(index, 0, num_micro - 1), 0),
                               logits)
            if pp > 1:
                carried = lax.ppermute(x, PP, forward_pairs)
        # Only the last stage holds logits; the sum over stages hands them to every stage.
        logits = lax.psum(logits, PP).reshape(num_micro * micro, -1)  # [batch, vocab / tp]
        return greedy_tokens(logits, reduce), logits, tuple((k[None], v[None]) for k, v in caches)

    return body


def _check_micro_batches(batch: int, micro_batches: int) -> None:
    if batch % micro_batches:
        raise ValueError(f"batch {batch} is not divisible into {micro_batches} micro-batches")


def decode_step(pmodel: PipelinedLlama, tokens, caches, write_at, *, micro_batches: int = 1):
    """Like llama.decode_step, with the batch cut into `micro_batches` pipeline micro-batches."""
    tokens = replicated(pmodel.mesh, tokens)
    batch, length = tokens.shape
    _check_micro_batches(batch, micro_batches)
    _check_room(write_at, length, caches[0][0].shape[3], "pipeline decode_step")
    step = _compiled(pmodel, micro_batches)
    with jax.set_mesh(pmodel.mesh):
        return step(pmodel.stages, pmodel.embed, pmodel.norm, pmodel.lm_head,
                    tokens.reshape(micro_batches, batch // micro_batches, length), caches,
                    replicated(pmodel.mesh, write_at))


def advance(pmodel: PipelinedLlama, history, caches, position, *, micro_batches: int = 1):
    """Like llama.advance (one greedy step in place), with `micro_batches` micro-batches."""
    _check_micro_batches(history.shape[0], micro_batches)
    _check_advance_room(position, caches[0][0].shape[3], history, "pipeline advance")
    step = _compiled_advance(pmodel, micro_batches)
    with jax.set_mesh(pmodel.mesh):
        return step(pmodel.stages, pmodel.embed, pmodel.norm, pmodel.lm_head, history, caches,
                    replicated(pmodel.mesh, position))


@functools.lru_cache(maxsize=32)
def _mapped(pmodel: PipelinedLlama, micro_batches: int):
    cache_spec = P(PP, None, TP, None, None)
    specs = jax.tree.map(lambda a: a.sharding.spec, pmodel.stages)
    cache_specs = ((cache_spec, cache_spec),) * len(pmodel.stages)
    return jax.shard_map(
        _stage_body(pmodel, micro_batches), mesh=pmodel.mesh,
        in_specs=(specs, P(), P(), P(None, TP), P(), cache_specs, P()),
        out_specs=(P(), P(None, TP), cache_specs), check_vma=False)


@functools.lru_cache(maxsize=32)
def _compiled(pmodel: PipelinedLlama, micro_batches: int):
    mapped = _mapped(pmodel, micro_batches)

    def step(stages, embed, norm, lm_head, tokens, caches, write_at):
        next_tokens, logits, caches = mapped(stages, embed, norm, lm_head, tokens, caches, write_at)
        return next_tokens, logits, caches, write_at + tokens.shape[2]

    return jax.jit(step, donate_argnums=(5,))


@functools.lru_cache(maxsize=32)
def _compiled_advance(pmodel: PipelinedLlama, micro_batches: int):
    mapped = _mapped(pmodel, micro_batches)

    def advance(stages, embed, norm, lm_head, history, caches, position):
        tokens = lax.dynamic_slice_in_dim(history, position, 1, axis=1)
        tokens = tokens.reshape(micro_batches, -1, 1)
        next_tokens, _, caches = mapped(stages, embed, norm, lm_head, tokens, caches, position)
        history = lax.dynamic_update_slice_in_dim(history, next_tokens[:, None], position + 1, axis=1)
        return history, caches, position + 1

    return jax.jit(advance, donate_argnums=(4, 5, 6))


def generate(pmodel: PipelinedLlama, input_ids, max_new_tokens: int, *, micro_batches: int = 1):
    """Greedy decoding through the pipeline; same contract as llama.generate."""
    return greedy_decode(prompt_ids(pmodel.mesh, input_ids, pmodel.config.vocab_size), max_new_tokens,
                         functools.partial(init_cache, pmodel),
                         functools.partial(decode_step, pmodel, micro_batches=micro_batches),
                         functools.partial(advance, pmodel, micro_batches=micro_batches))

"""Llama 3.x in Flax NNX with explicit tensor parallelism over a mesh axis named "tp".

q/k/v and gate/up are column-parallel, o and down are row-parallel and end in
`jaxnvrar.all_reduce_rms_norm` (all-reduce + residual add + the next RMSNorm): two all-reduces
per layer, the ones NVRAR exists for. The whole forward runs in one `jax.shard_map` over the
model's mesh.

API: `load_checkpoint`, `random_model`, `forward_logits`, `generate`; for your own loop
`init_cache`, `prefill`, `decode_step`, `advance`; to compile without weights `abstract_model`,
`cache_shapes`, `lowered_advance`, `compiled_advance`.

Modules: `config` (LlamaConfig, PRESETS, config.json), `reduction` (the all_reduce choices),
`attention` (rope, attention, and the decode step's fused attention kernel), `modules` (the layers), `weights` (checkpoints, random weights, the mesh), `decoding` (the
sharded forward and decoding). Settings are read where they are defined: set or patch
`decoding.PREFILL_TOKENS` and `attention.ATTENTION_SCORES_BYTES` there; the names here only
mirror their defaults.
"""

from .config import PRESETS, TP, LlamaConfig, check_tensor_parallel, config_from_hf, hf_config_dict
from .decoding import (PREFILL_TOKENS, advance, cache_shapes, compiled_advance, decode_step, forward_logits,
                       generate, greedy_decode, greedy_tokens, init_cache, lowered_advance, prefill,
                       prefill_in_chunks, prompt_ids, queue_may_deadlock, replicated, start_history)
from .attention import ATTENTION_SCORES_BYTES, causal_attention, decode_attention, decode_attention_reference
from .modules import (MLP, Attention, DecoderLayer, Llama, RMSNorm, fuse_columns, fuse_layer, project,
                      rope_frequencies, with_all_reduce, with_attention)
from .reduction import ALL_REDUCE_CHOICES, check_all_reduce_choice, norm_reducer, psum_fallbacks, reducer
from .weights import abstract_model, load_checkpoint, make_mesh, random_model

__all__ = [
    "ALL_REDUCE_CHOICES", "ATTENTION_SCORES_BYTES", "MLP", "PREFILL_TOKENS", "PRESETS", "TP", "Attention",
    "DecoderLayer", "Llama", "LlamaConfig", "RMSNorm", "abstract_model", "advance", "cache_shapes", "causal_attention",
    "check_all_reduce_choice", "check_tensor_parallel", "compiled_advance", "config_from_hf", "decode_step",
    "forward_logits", "fuse_columns", "fuse_layer", "generate", "greedy_decode", "greedy_tokens", "hf_config_dict",
    "init_cache", "load_checkpoint", "lowered_advance", "make_mesh", "norm_reducer", "prefill", "prefill_in_chunks",
    "project", "prompt_ids", "psum_fallbacks", "queue_may_deadlock", "random_model", "reducer", "replicated",
    "rope_frequencies", "start_history", "with_all_reduce", "with_attention", "decode_attention",
    "decode_attention_reference",
]

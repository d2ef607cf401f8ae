"""Llama weights: Hugging Face checkpoints and random weights, laid out for tensor parallelism.

Our matrices are [in, out] (torch's transposed). Column-parallel weights are split on `out`,
row-parallel ones on `in`, over the mesh axis "tp". Each process reads from the safetensors
files only the slices its own devices hold (memory-mapped, no full tensor in memory).
"""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .config import PRESETS, TP, LlamaConfig, check_tensor_parallel, config_from_hf
from .modules import Llama
from .reduction import check_all_reduce_choice

COLUMN, ROW, REPLICATED = P(None, TP), P(TP, None), P()


def make_mesh(tp: int):
    if tp < 1 or tp > jax.device_count():
        raise ValueError(f"tp={tp} needs that many devices; {jax.device_count()} are visible")
    return jax.make_mesh((tp,), (TP,), devices=jax.devices()[:tp])


def kv_head_layout(config: LlamaConfig, tp: int) -> list[int]:
    """The original KV head behind each KV head slot, slots split evenly over the ranks:
    heads are replicated when there are fewer KV heads than ranks."""
    kv = config.num_key_value_heads
    if kv >= tp:
        return list(range(kv))
    return [rank // (tp // kv) for rank in range(tp)]


# ---------------------------------------------------------------- layout: name -> (hf name, spec)


def _layout(config: LlamaConfig):
    """Yields (path, hf_name, spec, kind) for every parameter; kind says how to read it."""
    yield ("embed",), "model.embed_tokens.weight", REPLICATED, "embedding"
    for i in range(config.num_hidden_layers):
        pre = f"model.layers.{i}."
        yield ("layers", i, "input_norm"), pre + "input_layernorm.weight", REPLICATED, "vector"
        yield ("layers", i, "post_attention_norm"), pre + "post_attention_layernorm.weight", REPLICATED, "vector"
        yield ("layers", i, "wq"), pre + "self_attn.q_proj.weight", COLUMN, "matrix"
        yield ("layers", i, "wk"), pre + "self_attn.k_proj.weight", COLUMN, "kv"
        yield ("layers", i, "wv"), pre + "self_attn.v_proj.weight", COLUMN, "kv"
        yield ("layers", i, "wo"), pre + "self_attn.o_proj.weight", ROW, "matrix"
        yield ("layers", i, "w_gate"), pre + "mlp.gate_proj.weight", COLUMN, "matrix"
        yield ("layers", i, "w_up"), pre + "mlp.up_proj.weight", COLUMN, "matrix"
        yield ("layers", i, "w_down"), pre + "mlp.down_proj.weight", ROW, "matrix"
    yield ("norm",), "model.norm.weight", REPLICATED, "vector"
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    yield ("lm_head",), head, COLUMN, "matrix"


def _hf_shape(config: LlamaConfig, hf_name: str, kind: str) -> tuple[int, ...]:
    """The torch-layout shape a checkpoint must have for this tensor."""
    h, hd = config.hidden_size, config.head_dim
    if kind == "vector":
        return (h,)
    if kind in ("embedding",) or hf_name.endswith(("lm_head.weight", "embed_tokens.weight")):
        return (config.vocab_size, h)
    if kind == "kv":
        return (config.num_key_value_heads * hd, h)
    if "q_proj" in hf_name:
        return (config.num_attention_heads * hd, h)
    if "o_proj" in hf_name:
        return (h, config.num_attention_heads * hd)
    if "down_proj" in hf_name:
        return (h, config.intermediate_size)
    return (config.intermediate_size, h)  # gate, up


def _global_shape(config, hf_name, kind, tp) -> tuple[int, ...]:
    shape = _hf_shape(config, hf_name, kind)
    if kind in ("vector", "embedding"):
        return shape
    if kind == "kv":
        return (shape[1], len(kv_head_layout(config, tp)) * config.head_dim)
    return (shape[1], shape[0])  # [in, out]


def _assemble(config: LlamaConfig, arrays: dict) -> dict:
    layers = [dict() for _ in range(config.num_hidden_layers)]
    out = {"layers": layers}
    for path, value in arrays.items():
        if path[0] == "layers":
            layers[path[1]][path[2]] = value
        else:
            out[path[0]] = value
    return out


# ---------------------------------------------------------------- safetensors, read by slices


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}


class _SafetensorsDir:
    """Tensor name -> memory-mapped array, over model.safetensors or a sharded index."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (directory / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(
                f"{directory} has no model.safetensors nor model.safetensors.index.json")
        self._where = {}
        for name in files:
            path = directory / name
            if not path.exists():
                raise FileNotFoundError(f"{path} is named in the index but missing")
            with open(path, "rb") as f:
                header_len = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(header_len))
            for tensor, meta in header.items():
                if tensor != "__metadata__":
                    self._where[tensor] = (path, 8 + header_len, meta)

    def __contains__(self, name):
        return name in self._where

    def shape(self, name):
        return tuple(self._where[name][2]["shape"])

    def array(self, name) -> np.ndarray:
        path, base, meta = self._where[name]
        if meta["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {meta['dtype']} is not supported")
        begin, end = meta["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[meta["dtype"]]
        return np.memmap(path, dtype=dtype, mode="r", offset=base + begin,
                         shape=tuple(meta["shape"])) if end > begin else np.zeros(meta["shape"], dtype)


def _reader(tensors: _SafetensorsDir, config, hf_name, kind, tp, dtype):
    """callback(index of our global array) -> that block, read from the torch-layout tensor."""
    source = tensors.array(hf_name)
    kv_heads = kv_head_layout(config, tp)
    hd = config.head_dim

    def read(index):
        if kind in ("vector", "embedding"):
            block = source[index]
        elif kind == "kv":
            rows, cols = index  # ours: [in, slot * hd]
            slots = range(*cols.indices(len(kv_heads) * hd))
            first, last = slots.start // hd, (slots.stop - 1) // hd + 1
            blocks = [source[kv_heads[s] * hd:(kv_heads[s] + 1) * hd, rows] for s in range(first, last)]
            block = np.concatenate(blocks, axis=0).T
        else:
            block = source[index[1], index[0]].T
        return np.asarray(block).astype(dtype)

    return read


def load_checkpoint(path, mesh, *, all_reduce: str = "auto", dtype=jnp.bfloat16) -> Llama:
    """A Hugging Face Llama directory (config.json + safetensors) as a tensor-parallel model on
    `mesh` (axis "tp"); each process reads only the slices its devices hold."""
    check_all_reduce_choice(all_reduce)
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} is missing: not a Hugging Face model directory")
    config = config_from_hf(json.loads(config_file.read_text()))
    tp = mesh.shape[TP]
    check_tensor_parallel(config, tp)
    tensors = _SafetensorsDir(directory)
    layout = list(_layout(config))
    missing = [hf for _, hf, _, _ in layout if hf not in tensors]
    if missing:
        raise KeyError(f"{directory}: the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    np_dtype = np.dtype(jnp.dtype(dtype))
    arrays = {}
    for where, hf_name, spec, kind in layout:
        want = _hf_shape(config, hf_name, kind)
        if tensors.shape(hf_name) != want:
            raise ValueError(f"{hf_name} has shape {tensors.shape(hf_name)}, config.json implies {want}")
        shape = _global_shape(config, hf_name, kind, tp)
        arrays[where] = jax.make_array_from_callback(
            shape, NamedSharding(mesh, spec), _reader(tensors, config, hf_name, kind, tp, np_dtype))
    return Llama(_assemble(config, arrays), config, mesh, all_reduce=all_reduce)


# ---------------------------------------------------------------- random weights


def random_model(config: LlamaConfig | str, mesh, *, all_reduce: str = "auto", dtype=jnp.bfloat16,
                 num_layers: int | None = None, seed: int = 0) -> Llama:
    """Random weights of a config or preset name; `num_layers` overrides the layer count so that
    large shapes fit the GPUs at hand. Weights are made on the devices, already sharded."""
    check_all_reduce_choice(all_reduce)
    config = _resolved(config, num_layers)
    tp = mesh.shape[TP]
    check_tensor_parallel(config, tp)
    layout = list(_layout(config))
    kv_heads = jnp.asarray(kv_head_layout(config, tp))

    def make(key, shape, kind):
        if kind == "vector":
            return jnp.ones(config.hidden_size, dtype)
        w = (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
        if kind == "embedding":
            return w
        if kind == "kv":  # expand to one slot per rank's KV head, as the loader does
            w = w.reshape(config.num_key_value_heads, config.head_dim, -1)[kv_heads].reshape(-1, shape[1])
        return w.T

    arrays = {}
    base = jax.random.key(seed)
    initializers = {}  # one compiled initializer per (kind, shape, spec): layers share them
    for i, (where, hf_name, spec, kind) in enumerate(layout):
        if hf_name == "model.embed_tokens.weight" and where == ("lm_head",):
            # Tied: the head is the embedding, laid out column-parallel.
            arrays[where] = jax.jit(lambda e: e.T, out_shardings=NamedSharding(mesh, spec))(arrays[("embed",)])
            continue
        shape = None if kind == "vector" else _hf_shape(config, hf_name, kind)
        if (kind, shape, spec) not in initializers:
            initializers[kind, shape, spec] = jax.jit(functools.partial(make, shape=shape, kind=kind),
                                                      out_shardings=NamedSharding(mesh, spec))
        arrays[where] = initializers[kind, shape, spec](jax.random.fold_in(base, i))
    return Llama(_assemble(config, arrays), config, mesh, all_reduce=all_reduce)


def abstract_model(config: LlamaConfig | str, mesh, *, all_reduce: str = "auto", dtype=jnp.bfloat16,
                   num_layers: int | None = None) -> Llama:
    """The model with shapes instead of weights (jax.ShapeDtypeStruct, sharded as `random_model`
    places them): its steps can be traced, lowered and compiled (`.trace(...).lower().compile()`)
    for a mesh of devices this process does not hold, or without the memory for the weights, to
    read the program XLA makes (`jaxnvrar-bench kernels`). Nothing runs; nothing is allocated."""
    check_all_reduce_choice(all_reduce)
    config = _resolved(config, num_layers)
    tp = mesh.shape[TP]
    check_tensor_parallel(config, tp)
    arrays = {where: jax.ShapeDtypeStruct(_global_shape(config, hf_name, kind, tp), dtype,
                                          sharding=NamedSharding(mesh, spec))
              for where, hf_name, spec, kind in _layout(config)}
    return Llama(_assemble(config, arrays), config, mesh, all_reduce=all_reduce)


def _resolved(config: LlamaConfig | str, num_layers: int | None) -> LlamaConfig:
    """A config or preset name, with `num_layers` layers when given."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown preset {config!r}; presets: {sorted(PRESETS)}")
        config = PRESETS[config]
    if num_layers is not None:
        config = LlamaConfig(**{**config.__dict__, "num_hidden_layers": num_layers})
    return config

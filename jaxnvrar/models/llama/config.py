"""The Llama's configuration: `LlamaConfig`, the `PRESETS`, Hugging Face config.json both ways,
and which tensor-parallel sizes a configuration can be split over (mesh axis `TP`)."""

from __future__ import annotations

import dataclasses

TP = "tp"


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


_LLAMA3_ROPE = (8.0, 1.0, 4.0, 8192)
PRESETS = {
    "llama3.2-1b": LlamaConfig(128256, 2048, 8192, 16, 32, 8, 64, rope_llama3=(32.0, 1.0, 4.0, 8192),
                               tie_word_embeddings=True),
    "llama3.1-8b": LlamaConfig(128256, 4096, 14336, 32, 32, 8, 128, rope_llama3=_LLAMA3_ROPE),
    "llama3.1-70b": LlamaConfig(128256, 8192, 28672, 80, 64, 8, 128, rope_llama3=_LLAMA3_ROPE),
    "llama3.1-405b": LlamaConfig(128256, 16384, 53248, 126, 128, 8, 128, rope_llama3=_LLAMA3_ROPE),
    # A few-MB model for CPU runs and tests.
    "tiny": LlamaConfig(512, 128, 256, 2, 4, 2, 32, rope_llama3=_LLAMA3_ROPE),
}


def config_from_hf(hf: dict) -> LlamaConfig:
    """A LlamaConfig from a Hugging Face config.json dict; unsupported values are errors."""
    def unsupported(key, value, want):
        raise ValueError(f"config.json: {key}={value!r} is not supported (supported: {want})")

    if hf.get("model_type", "llama") != "llama":
        unsupported("model_type", hf.get("model_type"), "'llama'")
    if hf.get("hidden_act", "silu") != "silu":
        unsupported("hidden_act", hf.get("hidden_act"), "'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag, False):
            unsupported(flag, hf[flag], "false")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters")
    llama3 = None
    if rope and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        if rope.get("rope_type", rope.get("type")) != "llama3":
            unsupported("rope_scaling.rope_type", rope.get("rope_type", rope.get("type")), "'llama3' or none")
        llama3 = (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                  int(rope["original_max_position_embeddings"]))
    theta = hf.get("rope_theta", (rope or {}).get("rope_theta", 10000.0))
    try:
        heads = hf["num_attention_heads"]
        return LlamaConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads", heads),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5), rope_theta=float(theta), rope_llama3=llama3,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 131072),
        )
    except KeyError as err:
        raise ValueError(f"config.json lacks {err.args[0]!r}") from None


def hf_config_dict(config: LlamaConfig) -> dict:
    """The config.json fields of a LlamaConfig (used by tests to build reference models)."""
    out = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta, "hidden_act": "silu",
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
    }
    if config.rope_llama3:
        factor, low, high, original = config.rope_llama3
        out["rope_scaling"] = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                               "high_freq_factor": high, "original_max_position_embeddings": original}
    return out


def check_tensor_parallel(config: LlamaConfig, tp: int) -> None:
    for name, value in (("num_attention_heads", config.num_attention_heads),
                        ("intermediate_size", config.intermediate_size), ("vocab_size", config.vocab_size)):
        if value % tp:
            raise ValueError(f"{name}={value} is not divisible by tp={tp}")
    kv = config.num_key_value_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise ValueError(f"num_key_value_heads={kv} must divide or be a multiple of tp={tp}")

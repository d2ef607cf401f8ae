"""Hybrid pipeline x tensor parallel decode gives the tokens of TP-only and of transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("flax")

from jaxnvrar.models import llama, pipeline  # noqa: E402
from hf_reference import save_reference  # noqa: E402
from jaxnvrar.models.llama import LlamaConfig  # noqa: E402

CONFIG = LlamaConfig(256, 64, 128, 4, 4, 2, 16, rope_theta=10000.0, rope_llama3=(8.0, 1.0, 4.0, 32),
                     max_position_embeddings=256)
PROMPTS = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (4, 5))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    if jax.process_count() > 1 or jax.device_count() < 8:
        pytest.skip("needs 8 devices in one process")
    directory = tmp_path_factory.mktemp("pp")
    _, tokens = save_reference(directory, CONFIG, PROMPTS, 5)
    return directory, tokens


@pytest.mark.parametrize("pp,tp,micro_batches", [(2, 2, 1), (2, 2, 2), (4, 2, 4), (2, 1, 2), (4, 1, 2)])
def test_pipeline_tokens_match_tp_only_and_transformers(checkpoint, pp, tp, micro_batches):
    directory, hf_tokens = checkpoint
    model = llama.load_checkpoint(directory, pipeline.make_mesh(pp, tp), all_reduce="reference", dtype=jnp.float32)
    tokens = np.asarray(pipeline.generate(pipeline.pipeline(model), PROMPTS, 5, micro_batches=micro_batches))
    np.testing.assert_array_equal(tokens, hf_tokens)
    tp_only = llama.load_checkpoint(directory, llama.make_mesh(tp), all_reduce="psum", dtype=jnp.float32)
    np.testing.assert_array_equal(tokens, np.asarray(llama.generate(tp_only, PROMPTS, 5)))


def test_pipeline_prefill_in_chunks_matches_transformers(checkpoint, monkeypatch):
    # 8 tokens per chunk at batch 4: the 5-token prompt goes in as 2 + 2 + 1 positions.
    directory, hf_tokens = checkpoint
    monkeypatch.setattr(llama.decoding, "PREFILL_TOKENS", 8)
    model = llama.load_checkpoint(directory, pipeline.make_mesh(2, 2), all_reduce="psum", dtype=jnp.float32)
    tokens = np.asarray(pipeline.generate(pipeline.pipeline(model), PROMPTS, 5, micro_batches=2))
    np.testing.assert_array_equal(tokens, hf_tokens)


def test_pipeline_errors(checkpoint):
    directory, _ = checkpoint
    with pytest.raises(ValueError, match="'pp' axis"):
        pipeline.pipeline(llama.load_checkpoint(directory, llama.make_mesh(2), dtype=jnp.float32))
    model = pipeline.pipeline(llama.load_checkpoint(directory, pipeline.make_mesh(2, 2), dtype=jnp.float32))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        pipeline.generate(model, PROMPTS, -1)
    with pytest.raises(ValueError, match="not divisible into 3 micro-batches"):
        pipeline.decode_step(model, PROMPTS, pipeline.init_cache(model, 4, 16), 0, micro_batches=3)
    # Past the cache's end XLA would clamp the writes (silently wrong): a host position raises.
    with pytest.raises(ValueError, match=r"pipeline decode_step: positions 12..16 do not fit 16 positions"):
        pipeline.decode_step(model, PROMPTS, pipeline.init_cache(model, 4, 16), 12)
    three_stages = llama.load_checkpoint(directory, pipeline.make_mesh(3, 2), dtype=jnp.float32)
    with pytest.raises(ValueError, match="4 layers cannot be split into 3"):
        pipeline.pipeline(three_stages)

"""The tensor-parallel Llama against Hugging Face transformers' LlamaForCausalLM (torch, CPU)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnvrar

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("flax")

from jaxnvrar.models import llama  # noqa: E402
from hf_reference import save_reference  # noqa: E402
from helpers import needs_devices_in_one_process  # noqa: E402
from jaxnvrar.models.llama import LlamaConfig  # noqa: E402

# GQA (4 query heads, 2 KV heads), Llama 3 RoPE scaling; TP 4 replicates the KV heads.
CONFIG = LlamaConfig(256, 64, 128, 2, 4, 2, 16, rope_theta=10000.0, rope_llama3=(8.0, 1.0, 4.0, 32),
                     max_position_embeddings=256)
PROMPTS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 7))
NEW_TOKENS = 6


def _save_hf(directory, tied: bool, **save_kwargs):
    config = LlamaConfig(**{**CONFIG.__dict__, "tie_word_embeddings": tied})
    return save_reference(directory, config, PROMPTS, NEW_TOKENS, **save_kwargs)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tied" if request.param else "untied")
    logits, tokens = _save_hf(directory, request.param)
    return directory, logits, tokens


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_logits_and_greedy_tokens_match_transformers(checkpoint, tp):
    needs_devices_in_one_process(tp)
    directory, hf_logits, hf_tokens = checkpoint
    model = llama.load_checkpoint(directory, llama.make_mesh(tp), all_reduce="psum", dtype=jnp.float32)
    logits = np.asarray(llama.forward_logits(model, PROMPTS))
    assert logits.shape == hf_logits.shape and logits.dtype == np.float32
    np.testing.assert_allclose(logits, hf_logits, rtol=1e-4, atol=1e-5)
    tokens = np.asarray(llama.generate(model, PROMPTS, NEW_TOKENS))
    np.testing.assert_array_equal(tokens, hf_tokens)


@pytest.mark.parametrize("tp", [1, 2])
def test_one_sequence_decodes_as_transformers(checkpoint, tp):
    # Batch 1 decodes one row per step, which the model runs as two (a twin row the cache does
    # not keep); the tokens are those transformers gives that sequence, and one token alone has
    # the logits of the prompt's first position (causal attention sees nothing else there).
    needs_devices_in_one_process(tp)
    directory, hf_logits, hf_tokens = checkpoint
    model = llama.load_checkpoint(directory, llama.make_mesh(tp), all_reduce="psum", dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(llama.generate(model, PROMPTS[:1], NEW_TOKENS)), hf_tokens[:1])
    logits = np.asarray(llama.forward_logits(model, PROMPTS[:1, :1]))
    assert logits.shape == (1, 1, CONFIG.vocab_size)
    np.testing.assert_allclose(logits, hf_logits[:1, :1], rtol=1e-4, atol=1e-5)


def test_the_twin_row_is_not_written_to_the_cache(checkpoint):
    needs_devices_in_one_process(2)
    directory, _, _ = checkpoint
    model = llama.load_checkpoint(directory, llama.make_mesh(2), all_reduce="psum", dtype=jnp.float32)
    caches = llama.init_cache(model, 1, 8)
    _, _, caches, position = llama.decode_step(model, PROMPTS[:1, :1], caches, 3)
    assert int(position) == 4
    for k, v in caches:
        written = np.abs(np.asarray(k)).sum(axis=(0, 1, 3)) + np.abs(np.asarray(v)).sum(axis=(0, 1, 3))
        assert written[3] > 0 and not written[np.arange(8) != 3].any()


def test_batch_one_decode_step_multiplies_every_weight_by_two_rows():
    # The twin row keeps each weight product a matrix product (no matrix-vector strength
    # reduction, no pad or slice kernels), read off the lowered step.
    import re

    needs_devices_in_one_process(2)
    model = llama.abstract_model("tiny", llama.make_mesh(2), all_reduce="psum")
    text = llama.lowered_advance(model, 1, 32).as_text()
    # dot_generals whose right operand is a weight matrix (rank 2), with their left operand's shape
    weights = re.findall(r"dot_general.*: \(tensor<([\dx]+)x[a-z]+\d+>, tensor<(\d+x\d+)x[a-z]+\d+>\)", text)
    assert len(weights) == 4 * llama.PRESETS["tiny"].num_hidden_layers + 1  # qkv, o, gate/up, down; lm_head
    rows = [int(np.prod([int(d) for d in lhs.split("x")[:-1]])) for lhs, _ in weights]
    assert rows == [2] * len(weights), weights
    assert "optimization_barrier" not in text  # no product was padded one by one (`project`)


@pytest.mark.parametrize("batch, length", [(0, 8), (1, 0)])
def test_lowered_advance_refuses_an_empty_batch_or_cache(batch, length):
    needs_devices_in_one_process(2)
    model = llama.abstract_model("tiny", llama.make_mesh(2), all_reduce="psum")
    with pytest.raises(ValueError, match="batch >= 1 and max_length >= 1"):
        llama.lowered_advance(model, batch, length)


def test_attention_in_blocks_of_queries_matches_transformers(checkpoint, monkeypatch):
    # A budget of ~2 queries' scores: the 7-token forward runs in 4 blocks of 2 (the last one
    # padded), the prefill into a 13-position cache in 7 blocks of 1; decode steps stay whole.
    needs_devices_in_one_process(2)
    directory, hf_logits, hf_tokens = checkpoint
    monkeypatch.setattr(llama.attention, "ATTENTION_SCORES_BYTES", 250)
    model = llama.load_checkpoint(directory, llama.make_mesh(2), all_reduce="psum", dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(llama.forward_logits(model, PROMPTS)), hf_logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(llama.generate(model, PROMPTS, NEW_TOKENS)), hf_tokens)
    traced = jax.make_jaxpr(lambda q, k, v: llama.causal_attention(q, k, v, jnp.arange(7), jnp.arange(7)))(
        jnp.zeros((2, 1, 2, 7, 16)), jnp.zeros((2, 1, 7, 16)), jnp.zeros((2, 1, 7, 16)))
    assert "scan" in str(traced)  # the blocked path really ran (lax.map)


def test_prefill_in_chunks_matches_transformers(checkpoint, monkeypatch):
    # 4 tokens per chunk at batch 2: the 7-token prompt goes in as 2 + 2 + 2 + 1 positions, each
    # chunk attending to what the ones before it wrote into the cache.
    needs_devices_in_one_process(2)
    directory, _, hf_tokens = checkpoint
    monkeypatch.setattr(llama.decoding, "PREFILL_TOKENS", 4)
    model = llama.load_checkpoint(directory, llama.make_mesh(2), all_reduce="psum", dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(llama.generate(model, PROMPTS, NEW_TOKENS)), hf_tokens)
    writes = []
    llama.prefill_in_chunks(lambda t, c, at: writes.append((t.shape[1], at)) or (None, None, c, None),
                            jnp.zeros((2, 7), jnp.int32), None)
    assert writes == [(2, 0), (2, 2), (2, 4), (1, 6)]


def test_prefill_rejects_prompts_that_do_not_fit(checkpoint):
    needs_devices_in_one_process(2)
    directory, _, _ = checkpoint
    model = llama.load_checkpoint(directory, llama.make_mesh(2), all_reduce="psum", dtype=jnp.float32)
    caches = llama.init_cache(model, 2, 8)
    with pytest.raises(ValueError, match="does not fit a cache of 2 sequences x 8 positions"):
        llama.prefill(model, np.zeros((2, 9), np.int32), caches)
    with pytest.raises(ValueError, match="does not fit"):
        llama.prefill(model, np.zeros((3, 4), np.int32), caches)
    with pytest.raises(TypeError, match="integer token ids"):
        llama.prefill(model, np.zeros((2, 4), np.float32), caches)
    with pytest.raises(ValueError, match=r"\[batch, length\], got shape \(4,\)"):
        llama.prefill(model, np.zeros(4, np.int32), caches)
    with pytest.raises(ValueError, match="the prompt is empty"):
        llama.prefill(model, np.zeros((2, 0), np.int32), caches)
    with pytest.raises(ValueError, match=r"token id 256 is outside the vocabulary \[0, 256\)"):
        llama.prefill(model, np.full((2, 4), CONFIG.vocab_size, np.int32), caches)
    next_tokens, _, caches, position = llama.prefill(model, PROMPTS[:, :5], caches)
    assert next_tokens.shape == (2,) and int(position) == 5
    # Steps past the cache's end would run (XLA's dynamic updates clamp) and be silently wrong:
    # a host position that leaves no room raises, naming the fix.
    with pytest.raises(ValueError, match=r"decode_step: positions 6..8 do not fit 8 positions; allocate a longer cache"):
        llama.decode_step(model, np.zeros((2, 3), np.int32), caches, 6)
    prompt = llama.prompt_ids(model.mesh, PROMPTS[:, :5], CONFIG.vocab_size)
    history = llama.start_history(prompt, next_tokens, 3)  # [2, 8]
    with pytest.raises(ValueError, match=r"advance \(the cache\): positions 8..8 do not fit 8 positions"):
        llama.advance(model, history, caches, 8)
    with pytest.raises(ValueError, match=r"advance \(the history.*positions 7..8 do not fit 8 positions"):
        llama.advance(model, history, caches, 7)
    history, caches, position = llama.advance(model, history, caches, 6)  # the last room: reads 6, writes 7
    assert int(position) == 7


def test_psum_and_reference_all_reduce_give_identical_tokens(checkpoint):
    needs_devices_in_one_process(4)
    directory, _, hf_tokens = checkpoint
    mesh = llama.make_mesh(4)
    runs = [np.asarray(llama.generate(llama.load_checkpoint(directory, mesh, all_reduce=a, dtype=jnp.float32),
                                      PROMPTS, NEW_TOKENS)) for a in ("psum", "reference")]
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], hf_tokens)


def test_sharded_checkpoint_with_index(tmp_path):
    needs_devices_in_one_process(2)
    hf_logits, _ = _save_hf(tmp_path, tied=False, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = llama.load_checkpoint(tmp_path, llama.make_mesh(2), dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(llama.forward_logits(model, PROMPTS)), hf_logits, rtol=1e-4, atol=1e-5)


def test_bfloat16_stays_close(checkpoint):
    needs_devices_in_one_process(2)
    directory, hf_logits, _ = checkpoint
    model = llama.load_checkpoint(directory, llama.make_mesh(2))
    assert model.embed[...].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(llama.forward_logits(model, PROMPTS)), hf_logits, atol=0.05)


def test_none_all_reduce_is_really_skipped(checkpoint):
    needs_devices_in_one_process(2)
    directory, hf_logits, _ = checkpoint
    model = llama.load_checkpoint(directory, llama.make_mesh(2), all_reduce="none", dtype=jnp.float32)
    assert not np.allclose(np.asarray(llama.forward_logits(model, PROMPTS)), hf_logits, atol=1e-3)


def test_random_preset_generates():
    needs_devices_in_one_process(2)
    model = llama.random_model("tiny", llama.make_mesh(2), all_reduce="reference", num_layers=1)
    assert len(model.layers) == 1
    out = llama.generate(model, np.zeros((3, 4), np.int32), 5)
    assert out.shape == (3, 9) and int(out.max()) < model.config.vocab_size


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_without_all_reduce_has_no_collective_at_all(batch):
    # The greedy token, the cache update and the history write must not gather anything across
    # ranks: once an argmax over the vocabulary-sharded logits made XLA all-gather the logits on
    # every step. With all_reduce="none" the compiled step must hold no collective whatsoever.
    needs_devices_in_one_process(2)
    model = llama.random_model("tiny", llama.make_mesh(2), all_reduce="none", num_layers=2)
    caches = llama.init_cache(model, batch, 12)
    history = llama.replicated(model.mesh, np.zeros((batch, 12), np.int32))
    leaves, step = llama.decoding._compiled_advance(model)
    with jax.set_mesh(model.mesh):
        hlo = step.lower(leaves, history, caches, llama.replicated(model.mesh, 4)).compile().as_text()
    for collective in ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter"):
        assert collective not in hlo, collective


# ---------------------------------------------------------------- loader errors


@pytest.fixture
def saved(tmp_path):
    _save_hf(tmp_path, tied=False)
    return tmp_path


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        llama.load_checkpoint(tmp_path / "nope", llama.make_mesh(1))


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        llama.load_checkpoint(saved, llama.make_mesh(1))


def test_missing_weights_file(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        llama.load_checkpoint(saved, llama.make_mesh(1))


def test_missing_tensors(saved):
    _edit_config(saved, num_hidden_layers=3)
    with pytest.raises(KeyError, match="lacks .* tensors.*model.layers.2"):
        llama.load_checkpoint(saved, llama.make_mesh(1))


def test_wrong_shape(saved):
    _edit_config(saved, intermediate_size=96)
    with pytest.raises(ValueError, match="gate_proj.weight has shape .*128, 64.*96, 64"):
        llama.load_checkpoint(saved, llama.make_mesh(1))


def test_unsupported_config(saved):
    _edit_config(saved, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        llama.load_checkpoint(saved, llama.make_mesh(1))


def test_heads_not_divisible_by_tp(saved):
    needs_devices_in_one_process(8)
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tp=8"):
        llama.load_checkpoint(saved, llama.make_mesh(8))


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'llama9'"):
        llama.random_model("llama9", llama.make_mesh(1))


@pytest.mark.parametrize("algorithm", ["psum", "reference"])
def test_greedy_tokens_match_argmax_over_the_whole_vocabulary(algorithm):
    import jax
    from jax.sharding import PartitionSpec as P

    mesh = llama.make_mesh(4)
    logits = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    logits[1, [3, 19]] = 9.0  # a tie across shards: the lower index wins, as in jnp.argmax
    logits[2, [9, 10]] = 9.0  # a tie inside a shard
    pick = jax.jit(jax.shard_map(lambda x: llama.greedy_tokens(x, llama.reducer(algorithm)), mesh=mesh,
                                 in_specs=P(None, "tp"), out_specs=P(), check_vma=False))
    with jax.set_mesh(mesh):
        tokens = np.asarray(pick(jax.device_put(logits, jax.NamedSharding(mesh, P(None, "tp")))))
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    assert tokens[1] == 3 and tokens[2] == 9


@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 64), (2, 3, 64)])
def test_project_is_a_matrix_product_and_keeps_a_single_row_a_gemm(shape):
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal(shape).astype(np.float32), rng.standard_normal((64, 48)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(llama.project(x, w)), x @ w, rtol=1e-5, atol=1e-5)
    # A single row goes in as two rows, behind a barrier XLA's simplifier does not look through
    # (a matrix-vector product would be rewritten into multiply + reduce on GPUs).
    hlo = jax.jit(llama.project).lower(x, w).as_text()
    single_row = int(np.prod(shape[:-1])) == 1
    assert ("optimization_barrier" in hlo) == single_row
    assert ("tensor<2x64xf32>" in hlo) == single_row


def test_project_leaves_products_above_the_strength_reduction_bound_alone():
    x = jax.ShapeDtypeStruct((1, 1, 2048), jnp.bfloat16)
    big = jax.ShapeDtypeStruct((2048, 8192), jnp.bfloat16)  # 16.8M elements: XLA keeps it a GEMM itself
    assert "optimization_barrier" not in jax.jit(llama.project).lower(x, big).as_text()


_LONG_GENERATE = """
import jax
jax.config.update("jax_num_cpu_devices", 2)
import numpy as np
from jaxnvrar.models import llama
model = llama.random_model("tiny", llama.make_mesh(2), all_reduce="psum")
print(np.asarray(llama.generate(model, np.ones((2, 8), np.int32), 100)).shape)
"""


def test_long_generate_on_two_cpu_devices_finishes(tmp_path):
    # Queued steps once left every XLA:CPU worker waiting in a rendezvous (XLA aborted after
    # 40 s); it needs a process with exactly 2 CPU devices, hence the subprocess.
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("JAXNVRAR_NUM_PROCESSES", None)
    result = subprocess.run([sys.executable, "-c", _LONG_GENERATE], capture_output=True, text=True,
                            timeout=180, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("(2, 108)")


def test_nvrar_without_the_runtime_raises_instead_of_running_psum(checkpoint):
    # "nvrar" must mean the kernel: before jaxnvrar.initialize() (here: no GPU at all) the
    # model refuses to trace instead of quietly running psum under the kernel's name.
    needs_devices_in_one_process(2)
    if jaxnvrar.is_initialized():
        pytest.skip("the runtime is up in this process")
    directory, _, _ = checkpoint
    model = llama.load_checkpoint(directory, llama.make_mesh(2), all_reduce="nvrar", dtype=jnp.float32)
    with pytest.raises(RuntimeError, match=r"jaxnvrar\.initialize\(\)"):
        llama.forward_logits(model, PROMPTS)
    with pytest.raises(RuntimeError, match=r"jaxnvrar\.initialize\(\)"):
        llama.generate(model, PROMPTS, 2)


def test_unknown_all_reduce_is_refused_before_any_weight_is_made(monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were made before the all_reduce argument was checked")

    monkeypatch.setattr(jax.random, "normal", no_weights)
    with pytest.raises(ValueError, match="all_reduce must be one of"):
        llama.random_model("tiny", llama.make_mesh(1), all_reduce="nccl")


def test_every_entry_point_checks_prompts_and_takes_any_placement(checkpoint):
    # jax arrays on one device (the default placement), numpy arrays and lists all give the same
    # tokens; out-of-range ids, wrong shapes and dtypes raise, naming the problem.
    needs_devices_in_one_process(2)
    directory, hf_logits, hf_tokens = checkpoint
    model = llama.load_checkpoint(directory, llama.make_mesh(2), all_reduce="psum", dtype=jnp.float32)
    on_one_device = jax.device_put(jnp.asarray(PROMPTS, jnp.int32), jax.devices()[0])
    for prompt in (on_one_device, PROMPTS.astype(np.int64), PROMPTS.tolist()):
        np.testing.assert_array_equal(np.asarray(llama.generate(model, prompt, NEW_TOKENS)), hf_tokens)
    np.testing.assert_allclose(np.asarray(llama.forward_logits(model, on_one_device)), hf_logits, rtol=1e-4,
                               atol=1e-5)
    for entry in (lambda p: llama.generate(model, p, 2), lambda p: llama.forward_logits(model, p)):
        with pytest.raises(ValueError, match="token id -1 is outside the vocabulary"):
            entry(np.where(PROMPTS == PROMPTS[0, 0], -1, PROMPTS))
        with pytest.raises(ValueError, match=r"token id 300 is outside"):
            entry(jnp.full((2, 3), 300))
        with pytest.raises(ValueError, match=r"token id 4294967301 is outside"):  # 2**32 + 5: not wrapped to 5
            entry(np.full((2, 3), 2**32 + 5, np.int64))
        with pytest.raises(ValueError, match=r"\[batch, length\], got shape \(7,\) \(one sequence: prompt\[None\]\)"):
            entry(PROMPTS[0])
        with pytest.raises(TypeError, match="integer token ids, got float32"):
            entry(PROMPTS.astype(np.float32))
        with pytest.raises(ValueError, match="the prompt is empty"):
            entry(np.zeros((0, 3), np.int32))

"""Tensor-parallel Llama decode: per-step latency with each all-reduce algorithm, side by side.

For each batch size: prefill the prompt, then greedy-decode --new-tokens tokens one step at a
time, two ways:

- "step": each step waits for its token before the next is dispatched, as a server that looks
  at every token does (median and p90; includes the host's dispatch of every step);
- "queued": steps dispatched back to back, tokens left on the device, as `llama.generate`
  runs them (time per step of the whole run: the device-bound step).

Reports prefill time, both steps, tokens/s, the speed-up over psum of each, and two bounds:
"none" (a diagnostic that skips the all-reduce: wrong numbers, the communication-free step)
and the HBM roofline (weight + KV bytes each GPU reads per step over the bandwidth measured
here by a device copy). "psum-xla" is psum compiled with XLA's options for small all-reduces
within a node (PSUM_XLA_OPTIONS): XLA at its best as well as at its default, and the rows'
speed-ups against it too.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxnvrar
from jaxnvrar import runtime, timing
from jaxnvrar.bench import breakdown
from jaxnvrar.bench.setup import bring_up, is_printer, parse_ints, progress

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}

# The row "psum-xla": psum compiled with XLA's own settings for small all-reduces on one node
# (XLA:CPU accepts these names and ignores them; an unknown name fails the compile).
PSUM_XLA = "psum-xla"
PSUM_XLA_OPTIONS = {
    "xla_gpu_unsupported_use_all_reduce_one_shot_kernel": True,  # XLA's one-shot kernel over peer access
    "xla_gpu_experimental_enable_nccl_symmetric_buffers": True,  # NCCL's symmetric-memory kernels
}


def parse_xla_option(text: str) -> tuple[str, bool | int | str]:
    """'NAME=VALUE' -> (NAME, value): true/false as a bool, an integer as an int, else the string
    (XLA wants a bool for a bool option: the string "true" is refused)."""
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise SystemExit(f"--xla-option {text!r}: write it as NAME=VALUE, e.g. "
                         "xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true")
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    try:
        return name, int(value)
    except ValueError:
        return name, value


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="tiny",
                        help="random weights of a shape preset: tiny, llama3.2-1b, llama3.1-8b, llama3.1-70b, llama3.1-405b")
    parser.add_argument("--checkpoint", help="a Hugging Face Llama directory (instead of --preset)")
    parser.add_argument("--layers", type=int, help="override the layer count (to fit large shapes)")
    parser.add_argument("--tp", type=int, help="tensor-parallel ranks (default: every GPU; 2 on CPU)")
    parser.add_argument("--batch", type=parse_ints, default=[1], help="batch sizes, comma-separated (1)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (1024 GPU, 16 CPU)")
    parser.add_argument("--new-tokens", type=int, default=None, help="decoded tokens (64 GPU, 16 CPU)")
    parser.add_argument("--algorithms", default=None,
                        help="comma-separated from psum,psum-xla,reference,nvrar,none (default: psum, "
                             "psum-xla on GPU, nvrar if available else reference, none)")
    parser.add_argument("--xla-option", action="append", type=parse_xla_option, metavar="NAME=VALUE",
                        help="an XLA option of the psum-xla row (repeat for several); given, they replace "
                             "its defaults: " + ", ".join(f"{k}={v}" for k, v in PSUM_XLA_OPTIONS.items()))
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--attention", default="xla",
                        help="the decode step's attention, comma-separated: XLA's ops (xla) and/or the fused CUDA "
                             "kernel (kernel: experimental, even with xla per step on one H200 as of "
                             "2026-12-02); rows after the first attention are named 'ALGORITHM+kernel-attention'")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--profile", metavar="DIR",
                        help="trace a few decode steps per algorithm with jax.profiler into DIR and print "
                             "where the device time goes (matmul / communication / other / idle)")
    parser.add_argument("--profile-plot", metavar="PNG", help="draw that breakdown as stacked bars")
    parser.add_argument("--layouts", default=None,
                        help="compare parallel layouts instead, e.g. tp4,pp2xtp2,pp4 (pp = pipeline stages, "
                             "micro-batches = stages), on a decode-heavy and a prefill-heavy workload")
    parser.add_argument("--all-reduce", default="auto", help="all-reduce algorithm inside each layout (auto)")
    parser.add_argument("--workloads", default="decode-heavy,prefill-heavy",
                        help="which workloads the layout comparison runs (both)")


def _load_model(args, mesh, dtype):
    try:
        from jaxnvrar.models import llama
    except ImportError as err:
        raise SystemExit(f"jaxnvrar-bench decode needs flax ({err}): pip install 'jaxnvrar[llama]'") from None
    if args.checkpoint:
        return llama, llama.load_checkpoint(args.checkpoint, mesh, all_reduce="psum", dtype=dtype)
    return llama, llama.random_model(args.preset, mesh, all_reduce="psum", dtype=dtype, num_layers=args.layers)


def _copy_bandwidth(dtype, on_gpu: bool) -> float:
    """Bytes per second an elementwise pass moves (read + write) on one device, over several
    passes in one program so dispatch does not count: the roofline's memory speed."""
    x = jnp.ones(((512 if on_gpu else 16) << 20,), dtype)
    passes = 20
    sweep = jax.jit(lambda v: jax.lax.fori_loop(0, passes, lambda i, w: w * 0.5 + 1, v))
    sweep(x).block_until_ready()
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        sweep(x).block_until_ready()
        runs.append(time.perf_counter() - start)
    return 2 * x.nbytes * passes / min(runs)


def _bytes_per_step(model, batch: int, context: int) -> int:
    """Weights one rank reads per step (all but the embedding table, of which only `batch` rows
    are read) plus the KV cache it reads for `context` positions."""
    state = jax.tree.leaves(jax.tree.map(lambda a: a, model))
    weight_bytes = sum(a.addressable_shards[0].data.nbytes for a in state if hasattr(a, "addressable_shards"))
    weight_bytes -= model.embed[...].addressable_shards[0].data.nbytes
    c = model.config
    kv_local = model.layers[0].attention.kv_heads() // model.mesh.shape["tp"]
    kv_bytes = 2 * c.num_hidden_layers * batch * context * kv_local * c.head_dim * model.embed[...].dtype.itemsize
    return weight_bytes + kv_bytes


_PROFILED_STEPS = 5


def run_decode(llama, model, batch: int, prompt_len: int, new_tokens: int, label: str,
               profile_dir: str | None = None) -> tuple[dict, np.ndarray]:
    """The timings (and with `profile_dir` the breakdown), and the tokens it generated [B, T]."""
    host_prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, prompt_len))
    prompt = llama.replicated(model.mesh, host_prompt.astype(np.int32))
    total = prompt_len + new_tokens

    def prefill():
        caches = llama.init_cache(model, batch, total)
        jax.block_until_ready(caches)
        start = time.perf_counter()
        token, _, caches, position = llama.prefill(model, prompt, caches)
        token.block_until_ready()
        return time.perf_counter() - start, llama.start_history(prompt, token, new_tokens), caches, position

    # Compile both shapes once, outside the timings (the steps are `llama.advance`, as generate runs them).
    _, history, caches, position = prefill()
    llama.advance(model, history, caches, position)[2].block_until_ready()

    prefill_s, history, caches, position = prefill()
    steps = []
    for i in range(new_tokens - 1):
        start = time.perf_counter()
        history, caches, position = llama.advance(model, history, caches, position)
        position.block_until_ready()
        steps.append(time.perf_counter() - start)
        progress(label, i + 1, new_tokens - 1)
    steps_ms = np.array(steps) * 1e3
    tokens = np.asarray(history.addressable_data(0))  # replicated: this process's copy is all of it

    def queued_steps(count: int) -> float:
        """Seconds for `count` steps queued back to back over cache positions already written
        (timing only): tokens stay on the device, no host round trip per step."""
        nonlocal history, caches
        position = prompt_len
        start = time.perf_counter()
        for _ in range(count):
            history, caches, position = llama.advance(model, history, caches, position)
            if llama.queue_may_deadlock(history):
                history.block_until_ready()
        position.block_until_ready()
        return time.perf_counter() - start

    runtime.reset_timing()  # JAXNVRAR_TIMING=1: only the queued steps' calls
    queued_ms = queued_steps(new_tokens - 1) / (new_tokens - 1) * 1e3
    stamped = runtime.timing_summary()
    result = {"prefill_ms": prefill_s * 1e3, "step_median_ms": float(np.median(steps_ms)),
              "step_queued_ms": queued_ms,
              "step_p90_ms": float(np.percentile(steps_ms, 90)),
              "tokens_per_s": batch / (statistics.median(steps)), "steps": len(steps)}
    if stamped is not None:
        result["kernel_timing"] = dict(stamped, calls_per_step=stamped["calls"] / (new_tokens - 1))
    if profile_dir is not None:
        directory = os.path.join(profile_dir, label.replace(" ", "_") + f"_rank{jax.process_index()}")
        # Over positions the cache holds: past its end the steps would clamp their writes.
        profiled = min(_PROFILED_STEPS, new_tokens - 1)
        with breakdown.traced(directory):
            queued_steps(profiled)
        try:
            events = breakdown.read_trace(directory)
            kernels = breakdown.device_kernels(events)
            result["breakdown"] = breakdown.breakdown(kernels, profiled)
            result["top_kernels"] = breakdown.top_kernels(kernels, profiled)
            result["launches"] = breakdown.host_launches(events, profiled)
            result["top_host_events"] = breakdown.top_host_events(events, profiled, count=12)
        except (OSError, ValueError, KeyError) as err:  # the timings above still count
            print(f"jaxnvrar-bench decode: no breakdown from {directory}: {err}", file=sys.stderr)
    return result, tokens


def _print_breakdown(rows: dict) -> None:
    print(f"  device time per step (ms), from the profiler:  {'matmul':>7} {'comm':>7} {'other':>7} "
          f"{'idle':>7} {'kernels':>8}   host launches per step: kernels, graphs, host ms")
    for algorithm, r in rows.items():
        b = r.get("breakdown")
        if not b:
            print(f"  {algorithm:<12} no device kernels in the trace (the CPU backend records none)")
            continue
        launches = r.get("launches") or {}
        launched = (f"   {launches['kernel_launches_per_step']:.0f}, {launches['graph_launches_per_step']:.0f}, "
                    f"{launches['launch_host_ms_per_step']:.3f}" if launches else "   (no CUDA API calls in the trace)")
        print(f"  {algorithm:<47} {b['matmul']:>7.3f} {b['communication']:>7.3f} {b['other']:>7.3f} "
              f"{b['idle']:>7.3f} {b['kernels_per_step']:>8.0f}{launched}")
    for algorithm, r in rows.items():
        if r.get("top_kernels"):
            print(f"  {algorithm}: kernels with the most device time (ms per step, launches per step)")
            for k in r["top_kernels"]:
                print(f"    {k['ms_per_step']:>7.3f} {k['per_step']:>5.0f}  {k['class']:<13} {k['name'][:90]}")
        if r.get("top_host_events"):
            print(f"  {algorithm}: host calls with the most time (ms per step, calls per step; nested calls overlap)")
            for k in r["top_host_events"]:
                print(f"    {k['ms_per_step']:>7.3f} {k['per_step']:>5.1f}  {k['name'][:100]}")


# (prompt tokens, new tokens) of the two workloads of the layout comparison.
WORKLOADS = {"gpu": {"decode-heavy": (128, 256), "prefill-heavy": (4096, 8)},
             "cpu": {"decode-heavy": (8, 24), "prefill-heavy": (96, 3)}}


def parse_layout(text: str) -> tuple[int, int]:
    """'tp4' -> (1, 4); 'pp2xtp2' -> (2, 2); 'pp4' -> (4, 1)."""
    pp = tp = 1
    for part in text.lower().split("x"):
        if part.startswith("pp") and part[2:].isdigit():
            pp = int(part[2:])
        elif part.startswith("tp") and part[2:].isdigit():
            tp = int(part[2:])
        else:
            raise SystemExit(f"layout {text!r}: write it as tpT, ppP or ppPxtpT")
    return pp, tp


def _batch_latency(args, pp, tp, batch, prompt_len, new_tokens, dtype) -> dict:
    from jaxnvrar.models import llama, pipeline

    if pp == 1:
        model = llama.random_model(args.preset, llama.make_mesh(tp), all_reduce=args.all_reduce, dtype=dtype,
                                   num_layers=args.layers)
        init = lambda: llama.init_cache(model, batch, prompt_len + new_tokens)  # noqa: E731
        prefill = lambda t, c: llama.prefill(model, t, c)  # noqa: E731
        step = lambda h, c, p: llama.advance(model, h, c, p)  # noqa: E731
    else:
        base = llama.random_model(args.preset, pipeline.make_mesh(pp, tp), all_reduce=args.all_reduce,
                                  dtype=dtype, num_layers=args.layers)
        model = pipeline.pipeline(base)
        micro = pp if batch % pp == 0 else 1
        init = lambda: pipeline.init_cache(model, batch, prompt_len + new_tokens)  # noqa: E731
        prefill = lambda t, c: llama.prefill_in_chunks(  # noqa: E731
            functools.partial(pipeline.decode_step, model, micro_batches=micro), t, c)
        step = lambda h, c, p: pipeline.advance(model, h, c, p, micro_batches=micro)  # noqa: E731
    host_prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, prompt_len))
    prompt = llama.replicated(model.mesh, host_prompt.astype(np.int32))

    def one_batch():
        caches = init()
        jax.block_until_ready(caches)
        start = time.perf_counter()
        token, _, caches, position = prefill(prompt, caches)
        token.block_until_ready()
        prefill_s = time.perf_counter() - start
        history = llama.start_history(prompt, token, new_tokens)
        for _ in range(new_tokens - 1):
            history, caches, position = step(history, caches, position)
        history.block_until_ready()
        return prefill_s, time.perf_counter() - start

    one_batch()  # compile
    prefill_s, total = one_batch()
    return {"prefill_ms": prefill_s * 1e3, "batch_latency_ms": total * 1e3,
            "step_ms": (total - prefill_s) * 1e3 / max(new_tokens - 1, 1)}


def run_layouts(args, description) -> int:
    layouts = [(text, *parse_layout(text)) for text in args.layouts.split(",")]
    workloads = WORKLOADS["gpu" if jax.default_backend() == "gpu" else "cpu"]
    chosen = args.workloads.split(",")
    if unknown := set(chosen) - set(workloads):
        raise SystemExit(f"--workloads: unknown {sorted(unknown)}; choose from {sorted(workloads)}")
    workloads = {name: shape for name, shape in workloads.items() if name in chosen}
    dtype = _DTYPES[args.dtype]
    results = []
    if is_printer():
        print(f"# jaxnvrar-bench decode --layouts: {description}; random {args.preset}"
              f"{f' ({args.layers} layers)' if args.layers else ''}, all-reduce {args.all_reduce}")
        print(f"{'workload':<14} {'prompt':>6} {'new':>5} {'batch':>5} {'layout':>9} {'prefill ms':>10} "
              f"{'step ms':>8} {'batch ms':>9}")
    for name, (prompt_len, new_tokens) in workloads.items():
        for batch in args.batch:
            for text, pp, tp in layouts:
                r = _batch_latency(args, pp, tp, batch, prompt_len, new_tokens, dtype)
                results.append({"workload": name, "prompt_len": prompt_len, "new_tokens": new_tokens,
                                "batch": batch, "layout": text, **r})
                if is_printer():
                    print(f"{name:<14} {prompt_len:>6} {new_tokens:>5} {batch:>5} {text:>9} "
                          f"{r['prefill_ms']:>10.2f} {r['step_ms']:>8.3f} {r['batch_latency_ms']:>9.2f}", flush=True)
    if is_printer() and args.json:
        with open(args.json, "w") as f:
            json.dump({"devices": description, "preset": args.preset, "results": results}, f, indent=1)
    return 0


def layout_groupings(layouts: str) -> int:
    """Workspace regions the layouts comparison needs: each layout with tensor parallelism
    all-reduces over its own grouping of ranks (e.g. tp4 over all four, pp2xtp2 over pairs), and
    groupings must not share a region (JAXNVRAR_GROUPINGS)."""
    return max(1, len({(pp, tp) for pp, tp in map(parse_layout, layouts.split(",")) if tp > 1}))


def run(args) -> int:
    if args.layouts:  # before jaxnvrar.initialize() reads it; the caller's own value wins
        os.environ.setdefault("JAXNVRAR_GROUPINGS", str(layout_groupings(args.layouts)))
    description = bring_up()
    if args.layouts:
        return run_layouts(args, description)
    on_gpu = jax.default_backend() == "gpu"
    tp = args.tp or (jax.device_count() if on_gpu else 2)
    prompt_len = args.prompt_len or (1024 if on_gpu else 16)
    new_tokens = args.new_tokens or (64 if on_gpu else 16)
    if new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (one prefill token, then decode steps)")
    if args.algorithms:
        algorithms = args.algorithms.split(",")
    else:
        algorithms = ["psum", *([PSUM_XLA] if on_gpu else []),
                      "nvrar" if jaxnvrar.is_initialized() else "reference", "none"]
    algorithms = ["psum"] + [a for a in algorithms if a != "psum"]  # speed-ups are against psum
    xla_options = dict(args.xla_option) if args.xla_option else PSUM_XLA_OPTIONS
    if "nvrar" in algorithms and not jaxnvrar.is_initialized():
        raise SystemExit("jaxnvrar-bench decode: nvrar needs the CUDA build on GPUs (run under jaxnvrar-launch)")
    attentions = list(dict.fromkeys(args.attention.split(",")))
    if unknown := [a for a in attentions if a not in ("xla", "kernel")]:
        raise SystemExit(f"--attention: unknown {unknown}; choose from xla,kernel")
    if "kernel" in attentions and not on_gpu:
        raise SystemExit("jaxnvrar-bench decode: --attention kernel runs on CUDA GPUs (csrc/decode_attention.cu); "
                         "use --attention xla here")
    dtype = _DTYPES[args.dtype]

    from jaxnvrar.models.llama import ALL_REDUCE_CHOICES, make_mesh

    choices = (*ALL_REDUCE_CHOICES, PSUM_XLA)
    if unknown := [a for a in algorithms if a not in choices]:
        raise SystemExit(f"--algorithms: unknown {unknown}; choose from {','.join(choices)}")
    mesh = make_mesh(tp)
    loading = time.perf_counter()
    llama, model = _load_model(args, mesh, dtype)
    # The first attention's rows are named by algorithm alone (the speed-ups are against its psum).
    models = {a: llama.with_attention(model, a) for a in attentions}
    model = models[attentions[0]]
    attention = "; ".join(llama.attention.implementation_text(a) for a in attentions)
    load_s = time.perf_counter() - loading
    c = model.config
    bandwidth = _copy_bandwidth(dtype, on_gpu)
    if is_printer():
        source = args.checkpoint or f"random {args.preset}"
        print(f"# jaxnvrar-bench decode: {description}")
        print(f"# model {source}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, heads {c.num_attention_heads}"
              f"/{c.num_key_value_heads} kv, vocab {c.vocab_size}, {args.dtype}; TP {tp}; prompt {prompt_len}, "
              f"{new_tokens} new tokens; all-reduce of {c.hidden_size * jnp.dtype(dtype).itemsize} B x batch "
              "(x 2 at batch 1: the twin row), "
              f"{2 * c.num_hidden_layers} per step; device copy {bandwidth / 1e9:.0f} GB/s; prefill in chunks "
              f"of at most {llama.PREFILL_TOKENS} tokens; attention {attention}; loaded in {load_s:.0f} s")
        if tp == 1:
            print("# TP 1: one rank, so no all-reduce runs: every row times the model alone, and the rows differ "
                  "only by noise (use it to compare attention implementations or model changes)")
        if PSUM_XLA in algorithms:
            gpu_only = not on_gpu and any(name.startswith("xla_gpu_") for name in xla_options)
            cpu_note = " (XLA:CPU accepts the xla_gpu_ options and ignores them)" if gpu_only else ""
            print(f"# {PSUM_XLA}: psum compiled with {', '.join(f'{k}={v}' for k, v in xla_options.items())}"
                  f"{cpu_note}")
    results = []
    for batch in args.batch:
        rows, tokens = {}, {}
        for attention_choice, attention_model in models.items():
            for algorithm in algorithms:
                variant = (llama.with_all_reduce(attention_model, "psum", compiler_options=xla_options)
                           if algorithm == PSUM_XLA else llama.with_all_reduce(attention_model, algorithm))
                name = algorithm if attention_choice == attentions[0] else f"{algorithm}+{attention_choice}-attention"
                llama.psum_fallbacks.clear()
                started = time.perf_counter()
                rows[name], tokens[name] = run_decode(llama, variant, batch, prompt_len, new_tokens,
                                                      f"batch {batch} {name}", args.profile)
                rows[name]["attention"] = attention_choice
                rows[name]["wall_s"] = time.perf_counter() - started  # compiles, prefill, steps: for planning runs
                rows[name]["tokens_equal_psum"] = bool(np.array_equal(tokens[name], tokens["psum"]))
                # Call sites of "nvrar" that went to psum (prefill messages over the workspace).
                rows[name]["psum_fallbacks"] = [f"{list(shape)} {dtype}" for shape, dtype in llama.psum_fallbacks]
        context = prompt_len + new_tokens // 2
        roofline_ms = _bytes_per_step(model, batch, context) / bandwidth * 1e3
        for r in rows.values():
            r["speedup_vs_psum"] = rows["psum"]["step_median_ms"] / r["step_median_ms"]
            r["queued_speedup_vs_psum"] = rows["psum"]["step_queued_ms"] / r["step_queued_ms"]
            r["vs_roofline"] = r["step_median_ms"] / roofline_ms
            r["queued_vs_roofline"] = r["step_queued_ms"] / roofline_ms
            r["queued_tokens_per_s"] = 1e3 * batch / r["step_queued_ms"]
            if PSUM_XLA in rows:  # the fair comparison: XLA with its settings for small all-reduces
                r["speedup_vs_psum_xla"] = rows[PSUM_XLA]["step_median_ms"] / r["step_median_ms"]
                r["queued_speedup_vs_psum_xla"] = rows[PSUM_XLA]["step_queued_ms"] / r["step_queued_ms"]
            if "none" in rows:  # how close to the communication-free bound of the same run
                r["queued_vs_none"] = r["step_queued_ms"] / rows["none"]["step_queued_ms"]
        results.append({"batch": batch, "roofline_ms": roofline_ms, "algorithms": rows})
        if is_printer():
            print(f"\nbatch {batch}: HBM roofline {roofline_ms:.3f} ms/step")
            width = max(12, *(len(name) for name in rows))
            print(f"  {'':<{width}} {'':>10} {'--------- step ---------':>27} {'---------- queued ----------':>29}")
            print(f"  {'all-reduce':<{width}} {'prefill ms':>10} {'ms':>8} {'p90 ms':>8} {'x psum':>7} "
                  f"{'ms':>8} {'x psum':>7} {'x roofline':>10} {'tok/s':>9}")
            for algorithm, r in rows.items():
                note = ""
                if algorithm.startswith("none"):
                    note = ("  (no all-reduce: the same as psum at TP 1)" if tp == 1
                            else "  (diagnostic: no all-reduce, WRONG numbers; the communication-free bound)")
                print(f"  {algorithm:<{width}} {r['prefill_ms']:>10.2f} {r['step_median_ms']:>8.3f} "
                      f"{r['step_p90_ms']:>8.3f} {r['speedup_vs_psum']:>7.2f} {r['step_queued_ms']:>8.3f} "
                      f"{r['queued_speedup_vs_psum']:>7.2f} {r['queued_vs_roofline']:>10.2f} "
                      f"{r['queued_tokens_per_s']:>9.1f}{note}", flush=True)
            if PSUM_XLA in rows:
                for algorithm, r in rows.items():
                    if algorithm not in ("psum", PSUM_XLA, "none"):
                        print(f"  {algorithm} against {PSUM_XLA}: step {r['speedup_vs_psum_xla']:.2f}x, "
                              f"queued {r['queued_speedup_vs_psum_xla']:.2f}x")
            print("  wall time of each row (compiles, prefill, steps): " + ", ".join(
                f"{algorithm} {r['wall_s']:.0f} s" for algorithm, r in rows.items()))
            if "none" in rows:
                print("  queued step over the communication-free bound (none): " + ", ".join(
                    f"{algorithm} {r['queued_vs_none']:.2f}x" for algorithm, r in rows.items() if algorithm != "none"))
            for algorithm, r in rows.items():
                if not r["tokens_equal_psum"] and not algorithm.startswith("none"):
                    print(f"  note: {algorithm}'s greedy tokens differ from psum's (another summation order "
                          "can flip a near tie; else a wrong sum)")
                if r["psum_fallbacks"]:
                    print(f"  note: {algorithm}: {len(r['psum_fallbacks'])} traced all-reduce call(s) over the "
                          f"NVSHMEM workspace ran psum ({', '.join(sorted(set(r['psum_fallbacks'])))}; prefill "
                          f"messages; raise $JAXNVRAR_WORKSPACE_BYTES to keep them on the kernel)")
            for algorithm, r in rows.items():
                if "kernel_timing" in r:
                    print(timing.format_summary(f"{algorithm} kernel stamps (JAXNVRAR_TIMING=1, rank "
                                                f"{jax.process_index()})", r["kernel_timing"]))
            if args.profile:
                _print_breakdown(rows)
    if is_printer() and args.profile_plot:
        bars = {f"b{r['batch']} {a}": v["breakdown"] for r in results for a, v in r["algorithms"].items()
                if v.get("breakdown")}
        if bars:
            breakdown.plot(bars, args.profile_plot, f"decode step on the device: {description}")
        else:
            why = ("it needs --profile DIR" if not args.profile else
                   "the traces held no device kernels (a CPU run has none: the breakdown is of GPU kernels)")
            print(f"jaxnvrar-bench decode: --profile-plot wrote nothing: {why}", file=sys.stderr)
    if is_printer() and args.json:
        with open(args.json, "w") as f:
            json.dump({"devices": description, "model": args.checkpoint or args.preset, "tp": tp,
                       "prompt_len": prompt_len, "new_tokens": new_tokens, "dtype": args.dtype,
                       "attention": attention, "copy_bandwidth_gbs": bandwidth / 1e9,
                       "psum_xla_options": xla_options if PSUM_XLA in algorithms else None,
                       "results": results}, f, indent=1)
    return 0

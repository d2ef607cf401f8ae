"""jaxnvrar-bench runs end to end on virtual CPU devices and writes what it promises."""

import json
import subprocess
import sys

import pytest


def _bench(*args):
    result = subprocess.run([sys.executable, "-m", "jaxnvrar.bench", *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_allreduce_table_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = _bench("allreduce", "--max-bytes", "32K", "--repeats", "2", "--json", str(tmp_path / "r.json"),
                 "--plot", str(tmp_path / "r.png"))
    assert "psum us" in out and "reference us" in out and "x psum" in out
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["bytes"] for r in rows] == [8192, 32768]
    assert all(r["results"]["reference"]["us"] > 0 for r in rows)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_decode_reports_every_algorithm(tmp_path):
    pytest.importorskip("flax")
    out = _bench("decode", "--new-tokens", "4", "--prompt-len", "8", "--batch", "1,2", "--json",
                 str(tmp_path / "d.json"))
    assert "WRONG numbers" in out and "HBM roofline" in out
    report = json.loads((tmp_path / "d.json").read_text())
    assert [r["batch"] for r in report["results"]] == [1, 2]
    for r in report["results"]:
        assert set(r["algorithms"]) == {"psum", "reference", "none"}
        assert r["algorithms"]["psum"]["speedup_vs_psum"] == 1.0
        assert r["algorithms"]["psum"]["queued_speedup_vs_psum"] == 1.0
        assert r["algorithms"]["none"]["queued_vs_roofline"] > 0
        algorithms = r["algorithms"]
        assert algorithms["none"]["queued_vs_none"] == 1.0
        none_ms = algorithms["none"]["step_queued_ms"]
        assert algorithms["psum"]["queued_vs_none"] == algorithms["psum"]["step_queued_ms"] / none_ms
    assert "over the communication-free bound (none): psum " in out


def test_decode_psum_xla_row_is_psum_compiled_with_xlas_options(tmp_path):
    pytest.importorskip("flax")
    from jaxnvrar.bench.decode import PSUM_XLA_OPTIONS

    out = _bench("decode", "--new-tokens", "4", "--prompt-len", "8", "--algorithms", "psum-xla,reference,none",
                 "--json", str(tmp_path / "d.json"))
    assert "# psum-xla: psum compiled with xla_gpu_unsupported_use_all_reduce_one_shot_kernel=True" in out
    assert "XLA:CPU accepts the xla_gpu_ options and ignores them" in out
    assert "reference against psum-xla: step" in out
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["psum_xla_options"] == PSUM_XLA_OPTIONS
    rows = report["results"][0]["algorithms"]
    assert list(rows) == ["psum", "psum-xla", "reference", "none"]  # psum first: "x psum" is against it
    assert rows["psum-xla"]["tokens_equal_psum"] and rows["reference"]["tokens_equal_psum"]
    assert rows["psum-xla"]["queued_speedup_vs_psum_xla"] == 1.0 and rows["psum"]["speedup_vs_psum"] == 1.0
    assert rows["reference"]["queued_speedup_vs_psum_xla"] > 0


def test_compiler_options_reach_the_compile():
    pytest.importorskip("flax")
    import jax
    import numpy as np

    from jaxnvrar.bench.decode import PSUM_XLA_OPTIONS
    from jaxnvrar.models import llama

    model = llama.random_model("tiny", llama.make_mesh(2), all_reduce="psum", num_layers=1)
    prompt = np.arange(8, dtype=np.int32).reshape(2, 4)
    tuned = llama.with_all_reduce(model, "psum", compiler_options=PSUM_XLA_OPTIONS)
    np.testing.assert_array_equal(np.asarray(llama.generate(tuned, prompt, 3)),
                                  np.asarray(llama.generate(model, prompt, 3)))
    # A name XLA does not know fails the compile of the forward and of the decoding steps: the
    # options reach it. Twins keep the options unless given others; {} drops them.
    broken = llama.with_all_reduce(tuned, "psum", compiler_options={"xla_no_such_option": True})
    for run in (lambda m: llama.forward_logits(m, prompt), lambda m: llama.generate(m, prompt, 2)):
        with pytest.raises(jax.errors.JaxRuntimeError, match="No such compile option: 'xla_no_such_option'"):
            run(broken)
    assert llama.with_all_reduce(tuned, "reference").compiler_options == tuple(sorted(PSUM_XLA_OPTIONS.items()))
    assert llama.with_all_reduce(broken, "psum", compiler_options={}).compiler_options == model.compiler_options == ()


def test_xla_option_values_are_typed():
    from jaxnvrar.bench.decode import parse_xla_option

    # XLA refuses the string "true" for a bool option: --xla-option turns it into True.
    assert [parse_xla_option(t) for t in ("a=true", "b=False", "c=4", "d=FUSION,CUBLAS")] == [
        ("a", True), ("b", False), ("c", 4), ("d", "FUSION,CUBLAS")]
    with pytest.raises(SystemExit, match="write it as NAME=VALUE"):
        parse_xla_option("xla_gpu_enable_pdl")


def test_breakdown_accounts_device_time_by_class():
    from jaxnvrar.bench import breakdown

    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}}]
    kernels = [("sm90_xmma_gemm_bf16", 0, 100), ("nvjet_tst_128x64", 90, 150),  # overlapping matmuls
               ("NvrarAllReduceKernel<float>", 200, 230), ("loop_fusion_3", 230, 260),
               ("ncclDevKernel_AllReduce_Sum", 400, 450)]
    events = meta + [{"ph": "X", "pid": 7, "name": n, "ts": s, "dur": e - s} for n, s, e in kernels]
    events.append({"ph": "X", "pid": 1, "name": "PjitFunction(step)", "ts": 0, "dur": 500})  # host: ignored
    b = breakdown.breakdown(breakdown.device_kernels(events), steps=2)
    assert b["matmul"] == pytest.approx(0.150 / 2)  # union of [0,100] and [90,150] us, per step, in ms
    assert b["communication"] == pytest.approx(0.080 / 2)
    assert b["other"] == pytest.approx(0.030 / 2)
    assert b["idle"] == pytest.approx((0.450 - 0.260) / 2)  # window 450 us minus 260 us busy
    assert b["kernels_per_step"] == 2.5
    assert breakdown.device_kernels(meta[:1]) == [] and breakdown.breakdown([], 1) == {}


def test_attention_alone_xla_rows(tmp_path):
    """`attention` times XLA's ops off GPUs: one row per batch, batch 1 as the model's twin row."""
    out = _bench("attention", "--preset", "tiny", "--batch", "1,3", "--cache", "40", "--calls", "4", "--repeats", "2",
                 "--device-time", "--json", str(tmp_path / "a.json"))
    assert "us/call" in out and "4 query, 2 KV heads of 32" in out
    assert "device us" in out and "the traces held no device kernels" in out  # a CPU trace has none
    data = json.loads((tmp_path / "a.json").read_text())
    assert [(r["implementation"], r["batch"]) for r in data["rows"]] == [("xla", 1), ("xla", 3)]
    assert all(r["us"] > 0 and "blocks" not in r and r["device_us"] is None for r in data["rows"])


def test_busy_time_is_the_union_of_kernels():
    from jaxnvrar.bench import breakdown

    assert breakdown.busy_us([("a", 0, 10), ("b", 5, 12), ("c", 20, 21)]) == 13
    assert breakdown.busy_us([]) == 0


@pytest.mark.parametrize("args, message", [
    (("--implementations", "kernel"), "runs on CUDA GPUs"),
    (("--clusters", "2"), "runs on CUDA GPUs"),
    (("--tp", "3"), "does not divide"),
    (("--preset", "llama9"), "unknown --preset"),
])
def test_attention_refuses_by_name(args, message):
    result = subprocess.run([sys.executable, "-m", "jaxnvrar.bench", "attention", "--preset", "tiny", "--calls", "2",
                             "--repeats", "1", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


def test_gemm_sweep(tmp_path):
    out = _bench("gemm", "-m", "32", "-k", "64", "-n", "64", "--splits", "1,2", "--repeats", "2",
                 "--json", str(tmp_path / "g.json"))
    assert "PP: M/d" in out and "TP: K/d" in out
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert [(r["pp_m"], r["tp_k"]) for r in rows] == [(32, 64), (16, 32)]
    assert all(r["pp_tflops"] > 0 and r["tp_tflops"] > 0 for r in rows)


def test_layout_comparison(tmp_path):
    pytest.importorskip("flax")
    from jaxnvrar.bench.decode import layout_groupings, parse_layout

    assert [parse_layout(t) for t in ("tp4", "pp2xtp2", "pp4")] == [(1, 4), (2, 2), (4, 1)]
    # One workspace region per layout that all-reduces (its own grouping of ranks), at least one.
    assert layout_groupings("tp4,pp2xtp2,pp4") == 2 and layout_groupings("pp4") == 1
    assert layout_groupings("tp8,pp2xtp4,pp4xtp2,tp8") == 3
    out = _bench("decode", "--layouts", "tp2,pp2", "--batch", "2", "--all-reduce", "psum", "--json",
                 str(tmp_path / "l.json"))
    rows = json.loads((tmp_path / "l.json").read_text())["results"]
    assert {(r["workload"], r["layout"]) for r in rows} == {
        (w, lay) for w in ("decode-heavy", "prefill-heavy") for lay in ("tp2", "pp2")}
    assert all(r["batch_latency_ms"] > r["prefill_ms"] > 0 for r in rows)
    assert "batch ms" in out


def test_allreduce_replots_a_saved_run_with_one_curve_for_the_kernel_configs(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"bytes": b, "count": b // 2, "dtype": "bfloat16",
             "results": {"psum": {"us": 10.0}, "nvrar/128": {"us": 5.0 + i}, "nvrar/128-bulk": {"us": 7.0 - i}}}
            for i, b in enumerate([8192, 16384, 32768])]
    (tmp_path / "r.json").write_text(json.dumps({"devices": "test", "rows": rows}))
    _bench("allreduce", "--replot", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").stat().st_size > 0
    result = subprocess.run([sys.executable, "-m", "jaxnvrar.bench", "allreduce", "--replot", str(tmp_path / "r.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "needs --plot" in result.stderr


def test_soak_checks_every_call(tmp_path):
    out = _bench("soak", "--calls", "40", "--chunk", "20", "--bytes", "1K", "--json", str(tmp_path / "s.json"))
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["calls"] == 40 and report["errors"] == 0, out


def test_soak_takes_turns_over_several_sizes(tmp_path):
    out = _bench("soak", "--calls", "60", "--chunk", "10", "--bytes", "1K,40", "--random-sizes", "2",
                 "--json", str(tmp_path / "s.json"))
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["calls"] == 60 and report["errors"] == 0, out
    assert report["bytes"][:2] == [1024, 40] and len(report["bytes"]) == 4
    assert all(0 < b <= 1024 for b in report["bytes"][2:]) and report["kernel_config"] is None
    assert set(report["errors_by_size"]) == {str(b) for b in report["bytes"]}
    assert "4 sizes" in out


@pytest.mark.parametrize("label, says", [("7-fast", "7-fast"), ("128-1shot-bulk", "this run uses reference")])
def test_soak_refuses_a_kernel_config_it_cannot_pin(label, says):
    # A bad label, or (here on CPU) an algorithm other than nvrar: one line naming the option.
    result = subprocess.run([sys.executable, "-m", "jaxnvrar.bench", "soak", "--kernel-config", label],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "--kernel-config" in result.stderr and says in result.stderr


def test_soak_counts_wrong_results(monkeypatch):
    import jax

    import jaxnvrar
    from jaxnvrar.bench import soak

    # An "all-reduce" that forgets one rank's contribution must be caught on every call.
    monkeypatch.setattr(jaxnvrar, "all_reduce", lambda x, axis, algorithm: jax.lax.psum(x, axis) - 1)
    mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
    x = jax.device_put(jax.numpy.array([1.0, 1.0, 2.0, 2.0], jax.numpy.float32),
                       jax.NamedSharding(mesh, jax.P("x")))
    with jax.set_mesh(mesh):
        errors = soak.local_errors(soak.soak_program(mesh, "psum", 5)(x))
    assert errors == 5 * 2 * 2  # 5 calls, 2 elements per rank, 2 ranks


def test_host_launches_count_single_kernels_and_graphs():
    from jaxnvrar.bench import breakdown

    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}}]
    host = [("cuLaunchKernelEx", 0, 4), ("cuLaunchKernel", 10, 13), ("cuGraphLaunch", 20, 30),
            ("cudaLaunchKernel", 40, 42), ("cuStreamSynchronize", 50, 90)]
    events = meta + [{"ph": "X", "pid": 1, "name": n, "ts": s, "dur": e - s} for n, s, e in host]
    events.append({"ph": "X", "pid": 7, "name": "cuLaunchKernel_named_kernel", "ts": 0, "dur": 5})  # device: ignored
    assert breakdown.host_launches(events, steps=2) == {
        "kernel_launches_per_step": 1.5, "graph_launches_per_step": 0.5, "launch_host_ms_per_step": 0.019 / 2}
    assert breakdown.host_launches(meta, steps=1) == {}


def test_top_host_events_rank_host_calls_not_python_frames_or_device_kernels():
    from jaxnvrar.bench import breakdown

    meta = [{"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}}]
    calls = [("cuGraphLaunch", 300), ("command_buffer::update", 200), ("cuGraphLaunch", 340),
             ("$llama.py:369 advance", 5000), ("Handle inputs", 20)]
    events = meta + [{"ph": "X", "pid": 1, "name": n, "ts": 0, "dur": d} for n, d in calls]
    events.append({"ph": "X", "pid": 7, "name": "gemm_fusion", "ts": 0, "dur": 9000})  # device: not host
    top = breakdown.top_host_events(events, steps=2, count=2)
    assert top == [{"name": "cuGraphLaunch", "ms_per_step": 0.32, "per_step": 1.0},
                   {"name": "command_buffer::update", "ms_per_step": 0.1, "per_step": 0.5}]


def test_top_kernels_rank_by_device_time():
    from jaxnvrar.bench import breakdown

    kernels = [("gemm_a", 0, 10), ("fusion_b", 10, 40), ("gemm_a", 40, 60), ("fusion_b", 60, 61)]
    top = breakdown.top_kernels(kernels, steps=2, count=1)
    assert top == [{"name": "fusion_b", "class": "other", "ms_per_step": 0.031 / 2, "per_step": 1.0}]


def test_allreduce_in_a_loop():
    out = _bench("allreduce", "--max-bytes", "8K", "--repeats", "1", "--scan")
    assert "in a loop" in out and "reference us" in out


def test_allreduce_of_rms_norm_rows_and_whole_rows_only():
    out = _bench("allreduce", "--rms-norm", "2048", "--min-bytes", "8K", "--max-bytes", "8K", "--repeats", "1",
                 "--algorithms", "psum,reference")
    assert "all_reduce_rms_norm over rows of 2048" in out and "reference us" in out
    result = subprocess.run([sys.executable, "-m", "jaxnvrar.bench", "allreduce", "--rms-norm", "3000"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "whole rows" in result.stderr


def test_allreduce_peers_are_reported_not_fatal_in_one_process():
    # One process: a one-rank NCCL all-reduce launches nothing (an empty CUDA graph on a GPU), so
    # the peers are dropped with the reason instead of timing nothing.
    out = _bench("allreduce", "--max-bytes", "8K", "--repeats", "1", "--algorithms", "psum", "--peers", "torch")
    assert "nccl-graph: not measured" in out and "one process per GPU" in out and "8192" in out


def test_the_tuners_correctness_check_measures_the_error(monkeypatch):
    import jax
    import jax.numpy as jnp

    import jaxnvrar
    from jaxnvrar.bench.allreduce import max_error_against_psum, split_config

    mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
    assert max_error_against_psum(mesh, "reference", 1000, jnp.float32, gpus_per_node=None) < 1e-6
    # A "reference" that only sums half the message: the check must see it.
    real = jaxnvrar.all_reduce

    def broken(x, axis, algorithm, **kwargs):
        out = real(x, axis, algorithm="psum", **kwargs)
        return out if algorithm == "psum" else out.at[: x.shape[0] // 2].set(0)

    monkeypatch.setattr(jaxnvrar, "all_reduce", broken)
    assert max_error_against_psum(mesh, "reference", 1000, jnp.float32, gpus_per_node=None) > 0.1
    assert split_config("nvrar/32-1shot")[1].one_shot and split_config("psum") == ("psum", None)


def test_kernel_config_lists_are_checked_against_the_topology():
    from jaxnvrar.bench.allreduce import parse_kernel_configs
    from jaxnvrar.schedule import KernelConfig
    from jaxnvrar.schedule import Topology

    assert parse_kernel_configs("128, 32-1shot-bulk", Topology(2, 2), "x") == [KernelConfig(128), KernelConfig(32, True, True)]
    assert parse_kernel_configs("64-bulk", Topology(2, 1), "x") == [KernelConfig(64, bulk=True)]  # bulk runs across nodes
    with pytest.raises(SystemExit, match="tune --kernel-configs: bad kernel configuration '12x'"):
        parse_kernel_configs("12x", Topology(2, 2), "tune --kernel-configs")
    with pytest.raises(SystemExit, match="128-1shot needs one node.*2 node"):
        parse_kernel_configs("128-1shot", Topology(2, 1), "allreduce --kernel-configs")


def test_timed_benchmarks_refuse_ranks_that_share_a_gpu(monkeypatch):
    from jaxnvrar.bench import setup

    monkeypatch.setenv("JAXNVRAR_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAXNVRAR_GPUS", "1")
    with pytest.raises(SystemExit, match="2 ranks share 1 GPU.*give each rank its own GPU"):
        setup.bring_up()


def test_cpu_defaults_end_in_seconds_and_say_what_they_do():
    # soak's CPU default is a few hundred calls with a progress bar, not the GPU's 100000; model
    # without --fit fits the shipped sweep; --profile-plot without a breakdown says why.
    result = subprocess.run([sys.executable, "-m", "jaxnvrar.bench", "soak"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "500 calls of 131072 B" in result.stdout and "0 wrong elements" in result.stdout
    assert "10/10" in result.stderr  # the progress bar's last line
    assert "alpha-beta projection" in _bench("model")
    pytest.importorskip("flax")
    result = subprocess.run([sys.executable, "-m", "jaxnvrar.bench", "decode", "--new-tokens", "2", "--prompt-len",
                             "4", "--algorithms", "psum", "--profile-plot", "x.png"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--profile-plot wrote nothing: it needs --profile DIR" in result.stderr


@pytest.mark.parametrize("command, message", [
    (["decode", "--attention", "kernel", "--layers", "1"], "--attention kernel runs on CUDA GPUs"),
    (["decode", "--attention", "xla,kernel", "--layers", "1"], "--attention kernel runs on CUDA GPUs"),
    (["decode", "--attention", "xla,fast", "--layers", "1"], "--attention: unknown ['fast']"),
    (["kernels", "--target", "cpu", "--attention", "kernel", "--preset", "tiny"], "compiles for CUDA GPUs only"),
])
def test_attention_kernel_refused_without_a_gpu(command, message):
    pytest.importorskip("flax")
    result = subprocess.run([sys.executable, "-m", "jaxnvrar.bench", *command], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode != 0 and message in result.stderr + result.stdout


def test_benchmarks_refuse_autos_psum_fallback():
    # "auto" runs psum where a grouping of ranks has no workspace region left, with a warning;
    # a benchmark turns that warning into an error rather than time psum as the kernel.
    import warnings

    from jaxnvrar import nvrar_ffi, primitive
    from jaxnvrar.bench.setup import refuse_psum_fallback

    err = nvrar_ffi.NoRegionLeft("message", "process groups {0,1} {2,3}", "all 1 workspace regions are taken")
    with warnings.catch_warnings():
        refuse_psum_fallback()
        primitive._warned_refusals.discard(err.what)
        with pytest.raises(UserWarning, match=r"psum instead of the kernel over axis 'dp' \(process groups"):
            primitive._warn_psum_instead(err, "dp")
    primitive._warned_refusals.discard(err.what)

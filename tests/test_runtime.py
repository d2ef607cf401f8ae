"""jaxnvrar.initialize() refuses to start in the wrong setting, with a message naming the fix."""

import os
import subprocess
import sys

import jax
import pytest


def _run_fresh(code, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JAXNVRAR_")}
    clean.update(env, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    return subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=300)


def test_initialize_before_jax_distributed_in_a_multi_process_job():
    result = _run_fresh("import jaxnvrar; jaxnvrar.initialize()", JAXNVRAR_NUM_PROCESSES="2")
    assert result.returncode != 0
    assert "before jax.distributed.initialize()" in result.stderr


def test_bad_workspace_size_is_rejected():
    result = _run_fresh("import jaxnvrar; jaxnvrar.initialize()", JAXNVRAR_WORKSPACE_BYTES="lots")
    assert result.returncode != 0 and "JAXNVRAR_WORKSPACE_BYTES='lots'" in result.stderr


def test_finalize_without_initialize_is_a_no_op():
    import jaxnvrar

    if jaxnvrar.is_initialized():
        pytest.skip("the runtime is up in this process")
    jaxnvrar.finalize()
    jaxnvrar.finalize()


@pytest.mark.parametrize("name,value", [("JAXNVRAR_TIMEOUT_S", "soon"), ("JAXNVRAR_TIMEOUT_S", "0"),
                                        ("JAXNVRAR_MAX_BLOCKS", "0"), ("JAXNVRAR_MAX_BLOCKS", "2000"),
                                        ("JAXNVRAR_FIRST_CALL", "-1"), ("JAXNVRAR_WORKSPACE_BYTES", "1000"),
                                        ("JAXNVRAR_ONE_SHOT", "yes"), ("JAXNVRAR_ONE_SHOT", "2"),
                                        ("JAXNVRAR_BULK", "-1"), ("JAXNVRAR_AUTO_MAX_BYTES", "4M")])
def test_bad_environment_values_are_rejected_by_name(name, value):
    result = _run_fresh("import jaxnvrar; jaxnvrar.initialize()", **{name: value})
    assert result.returncode != 0 and f"{name}={value!r}" in result.stderr, result.stderr[-500:]


def test_initialize_after_finalize_is_refused(monkeypatch):
    import jaxnvrar
    from jaxnvrar import runtime

    if jaxnvrar.is_initialized():
        pytest.skip("the runtime is up in this process")
    monkeypatch.setattr(runtime, "_ever_initialized", True)  # as after initialize() + finalize()
    with pytest.raises(RuntimeError, match="after jaxnvrar.finalize"):
        jaxnvrar.initialize()
    assert runtime.was_finalized()


def test_nvrar_after_finalize_names_the_cause(monkeypatch):
    import jax.numpy as jnp

    import jaxnvrar
    from jaxnvrar import nvrar_ffi, runtime

    if jaxnvrar.is_initialized():
        pytest.skip("the runtime is up in this process")
    monkeypatch.setattr(runtime, "_ever_initialized", True)
    with pytest.raises(RuntimeError, match=r"after jaxnvrar.finalize\(\).*algorithm='psum'"):
        nvrar_ffi.check_can_run(jnp.zeros(8), jaxnvrar.Topology(2, 2))


def test_call_signatures_read_in_words():
    from jaxnvrar.runtime import describe_call

    def call(elements, dtype, nodes, gpus, one_shot=False, bulk=False, fused_norm=False):
        # As the extension decodes a CallSignature in a failure record.
        return {"elements": elements, "dtype": dtype, "nodes": nodes, "gpus_per_node": gpus,
                "one_shot": one_shot, "bulk": bulk, "fused_norm": fused_norm}

    assert describe_call(call(1000, "float32", 1, 2)) == "1000 x float32 over 1 node(s) of 2 GPU(s)"
    assert describe_call(call(4096, "bfloat16", 1, 4, one_shot=True)) == \
        "4096 x bfloat16 over 1 node(s) of 4 GPU(s), one-shot"
    assert describe_call(call(8, "float16", 3, 2)) == "8 x float16 over 3 node(s) of 2 GPU(s)"
    assert describe_call(call(8, "float32", 1, 2, True, True)).endswith("of 2 GPU(s), one-shot, bulk")
    assert describe_call(call(8, "float32", 1, 2, True, False, True)).endswith("one-shot, fused add + RMSNorm")


SETTINGS_SCRIPT = """
import jax
import jaxnvrar
from jaxnvrar import distributed
jaxnvrar.initialize_distributed()
distributed.check_same_across_processes({"JAXNVRAR_MAX_BLOCKS": 64, "JAXNVRAR_ONE_SHOT": None}, "test")
print("SAME OK", flush=True)
try:
    distributed.check_same_across_processes(
        {"JAXNVRAR_MAX_BLOCKS": 64, "JAXNVRAR_ONE_SHOT": jax.process_index() or None}, "test")
    print("DIFFERENT PASSED", flush=True)
except RuntimeError as err:
    print("DIFFERENT RAISED", err, flush=True)
install = jaxnvrar.runtime.installation()  # another host's install: another built-in table
try:
    distributed.check_same_across_processes(
        dict(install, **({"built-in tuning table": "0" * 16} if jax.process_index() else {})), "test",
        fix="install the same jaxnvrar on every host")
    print("INSTALL PASSED", flush=True)
except RuntimeError as err:
    print("INSTALL RAISED", err, flush=True)
"""


def _two_cpu_processes(script: str):
    """`script` as a job of two CPU processes under jaxnvrar-launch; its output, after a clean exit."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", JAX_PLATFORMS="cpu")
    env.pop("JAXNVRAR_NUM_PROCESSES", None)
    job = subprocess.run([sys.executable, "-m", "jaxnvrar.launcher", "-n", "2", "--timeout", "150", "--",
                          sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    return job


@pytest.mark.multiprocess
def test_processes_with_different_kernel_settings_are_refused_by_name():
    job = _two_cpu_processes(SETTINGS_SCRIPT)
    for rank in (0, 1):
        assert f"[rank {rank}] SAME OK" in job.stdout, job.stdout[-2000:]
        line = next(l for l in job.stdout.splitlines() if l.startswith(f"[rank {rank}] DIFFERENT"))
        assert "RAISED" in line and "$JAXNVRAR_ONE_SHOT alike on every process" in line, line
        assert "$JAXNVRAR_MAX_BLOCKS" not in line, line
        line = next(l for l in job.stdout.splitlines() if l.startswith(f"[rank {rank}] INSTALL"))
        assert "RAISED" in line and "built-in tuning table=" in line and "install the same jaxnvrar" in line, line
        assert "jaxnvrar=" not in line.split("has ", 1)[1], line  # the same version is not named


def test_initialize_distributed_alone_is_a_no_op_but_a_cluster_without_coordinator_still_raises():
    import subprocess
    import sys

    script = ("import jax, jaxnvrar; jaxnvrar.initialize_distributed(); "
              "print('processes', jax.process_count())")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXNVRAR_", "SLURM_", "OMPI_", "PMI_"))}
    alone = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0 and "processes 1" in alone.stdout, alone.stderr[-2000:]
    # A job that says it has 4 processes but gives no way to reach them is an error, not one process.
    cluster = subprocess.run([sys.executable, "-c", script], env=dict(env, PMI_SIZE="4"), capture_output=True,
                             text=True, timeout=120)
    assert cluster.returncode != 0 and "coordinator_address" in cluster.stderr


def test_timeout_reports_name_the_peer_or_the_fused_kernels_own_grid():
    from jaxnvrar.runtime import describe_timeout

    record = {"kind": "timeout", "node": 0, "local": 1, "flag": 7, "step": 0, "peer": 0}
    waiting = describe_timeout(dict(record, phase="intra-node reduce-scatter"))
    assert "waiting in the intra-node reduce-scatter 0 for local GPU 0" in waiting and "same calls" in waiting
    barrier = describe_timeout(dict(record, phase="fused-norm grid barrier", peer=1))
    assert "grid barrier" in barrier and "not all of its blocks ran at once" in barrier
    assert "for local GPU" not in barrier and "same calls" not in barrier


def test_failure_reports_name_the_axis_of_the_calls_workspace_region(monkeypatch):
    # With all-reduces over several axes, the kernel's record carries its workspace region; the
    # report names the axis (and process groups) this process lowered over that region.
    import numpy as np
    from jaxnvrar import nvrar_ffi
    from jaxnvrar.runtime import describe_timeout

    monkeypatch.setattr(nvrar_ffi, "_grouping_regions", {})
    monkeypatch.setattr(nvrar_ffi, "_without_region", {})
    monkeypatch.setattr(nvrar_ffi, "_region_axes", {})
    monkeypatch.setattr(nvrar_ffi, "_region_rows", {})
    nvrar_ffi.grouping_region(np.array([[0, 2], [1, 3], [0, 2], [1, 3]], np.int32), "a", available=2)
    nvrar_ffi.grouping_region(np.array([[0, 1], [0, 1], [2, 3], [2, 3]], np.int32), "b", available=2)
    call = {"elements": 1000, "dtype": "float32", "nodes": 1, "gpus_per_node": 2, "one_shot": True, "bulk": False}
    mismatch = describe_timeout({"kind": "mismatch", "node": 0, "local": 0, "flag": 3, "step": 0, "peer": 1,
                                 "phase": "signature check", "region": 1, "mine": call,
                                 "peer_call": dict(call, elements=2000)})
    assert mismatch.startswith("jaxnvrar: all-reduce mismatch over axis 'b' (process groups {0,1} {2,3}; "
                               "workspace region 1) on node 0 local GPU 0"), mismatch
    # The peer's process: this process's (0) group over the region's axis, at the peer's rank.
    assert "local GPU 1 (process 1) with 2000 x float32" in mismatch, mismatch
    timeout = describe_timeout({"kind": "timeout", "node": 0, "local": 0, "flag": 7, "step": 0, "peer": 1,
                                "phase": "intra-node all-gather", "region": 0, "mine": call})
    assert "an all-reduce over axis 'a' (process groups {0,2} {1,3}; workspace region 0) timed out" in timeout
    assert timeout.endswith("waiting in the intra-node all-gather 0 for local GPU 1 (process 2); "
                            "did every rank make the same calls?"), timeout
    # Two nodes of one GPU over axis a: the peer counts nodes (also a signature wait's, by its slot).
    between_nodes = describe_timeout({"kind": "timeout", "node": 0, "local": 0, "flag": 7, "step": 0, "peer": 1,
                                      "peer_is_node": True, "phase": "signature check", "region": 0,
                                      "mine": dict(call, nodes=2, gpus_per_node=1)})
    assert "for node 1 (process 2);" in between_nodes, between_nodes
    # Calls over the region in another axis order: which one failed is not recorded, so no process.
    nvrar_ffi.grouping_region(np.array([[2, 0], [3, 1], [2, 0], [3, 1]], np.int32), "c", available=2)
    assert "for local GPU 1;" in describe_timeout({"kind": "timeout", "node": 0, "local": 0, "flag": 7, "step": 0,
                                                   "peer": 1, "phase": "intra-node all-gather", "region": 0,
                                                   "mine": call})
    # A region this process lowered nothing over (or a record without one) is not named.
    unknown = describe_timeout({"kind": "timeout", "node": 0, "local": 1, "flag": 7, "step": 0, "peer": 0,
                                "phase": "intra-node all-gather", "region": 5})
    assert unknown.startswith("jaxnvrar: an all-reduce timed out")


def test_each_grouping_of_ranks_gets_its_own_workspace_region_and_one_too_many_is_refused(monkeypatch):
    # All-reduces over both axes of a 2 x 2 mesh of processes are two groupings of ranks; each
    # needs its own region (csrc/schedule.h, GroupingBytes, says why). Every process lowers the
    # same programs in the same order and sees the same PE table, so gives them the same regions.
    import numpy as np
    from jaxnvrar import nvrar_ffi

    monkeypatch.setattr(nvrar_ffi, "_grouping_regions", {})
    monkeypatch.setattr(nvrar_ffi, "_without_region", {})
    monkeypatch.setattr(nvrar_ffi, "_region_axes", {})
    over_a = np.array([[0, 2], [1, 3], [0, 2], [1, 3]], np.int32)  # row p: PE p's group
    over_b = np.array([[0, 1], [0, 1], [2, 3], [2, 3]], np.int32)
    assert nvrar_ffi.grouping_region(over_a, "a", available=2) == 0
    assert nvrar_ffi.grouping_region(over_b, "b", available=2) == 1
    # The same peers in another axis order, or from another mesh, share the region.
    assert nvrar_ffi.grouping_region(over_a[:, ::-1], "x", available=2) == 0
    whole = np.array([[0, 1, 2, 3]] * 4, np.int32)
    with pytest.raises(ValueError, match=r"over axis 'x' reduces over a new grouping of ranks \(process groups "
                                         r"\{0,1,2,3\}\), but all 2 workspace regions \(JAXNVRAR_GROUPINGS=2\) are "
                                         r"taken by other groupings \(process groups \{0,2\} \{1,3\}; process groups "
                                         r"\{0,1\} \{2,3\}\).*at least 3\) on every process.*Or use algorithm='psum'"):
        nvrar_ffi.grouping_region(whole, "x", available=2)
    assert nvrar_ffi.grouping_region(whole, "x", available=3) == 2
    # A mesh over some processes only: the others' rows are -1 and are not named.
    part = np.array([[0, 1], [0, 1], [-1, -1], [-1, -1]], np.int32)
    assert nvrar_ffi.grouping_region(part, "x", available=4) == 3
    assert nvrar_ffi._describe_grouping(nvrar_ffi.grouping_key(part)) == "process groups {0,1}"
    assert nvrar_ffi.grouping_regions() == {"process groups {0,2} {1,3}": 0, "process groups {0,1} {2,3}": 1,
                                            "process groups {0,1,2,3}": 2, "process groups {0,1}": 3}
    # Failure reports name what each region was lowered for (every axis over its grouping).
    assert nvrar_ffi.describe_region(0) == "axis 'a' or 'x' (process groups {0,2} {1,3}; workspace region 0)"
    assert nvrar_ffi.describe_region(4) is None


def _lower_kernel_calls_without_a_gpu(monkeypatch) -> None:
    """Lowering for CUDA on this CPU machine: fresh region claims and warnings, the kernel's
    availability checks stubbed out, "auto" choosing the kernel, one workspace region."""
    from jaxnvrar import api, nvrar_ffi, primitive, runtime

    if jax.device_count() < 4:
        pytest.skip("needs 4 devices")
    for table in ("_grouping_regions", "_without_region", "_region_axes", "_region_rows"):
        monkeypatch.setattr(nvrar_ffi, table, {})
    monkeypatch.setattr(primitive, "_warned_refusals", set())
    monkeypatch.setattr(nvrar_ffi, "check_can_run", lambda *a, **k: None)
    monkeypatch.setattr(api, "choose_algorithm", lambda *a, **k: "nvrar")
    monkeypatch.setattr(runtime, "groupings", lambda: 1)


@pytest.mark.parametrize("check_vma", [False, True])
def test_auto_takes_psum_where_no_workspace_region_is_left_and_nvrar_refuses(monkeypatch, check_vma):
    # The region of a grouping is known only when the program is lowered (after "auto" chose):
    # past the last region "auto" lowers psum there (the same on every process: regions are only
    # ever claimed) with a warning, and "nvrar" refuses. Lowered for CUDA on this CPU machine,
    # with the kernel's availability checks stubbed out and device ids standing for processes.
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import jaxnvrar
    from jaxnvrar import nvrar_ffi

    _lower_kernel_calls_without_a_gpu(monkeypatch)
    monkeypatch.setenv("JAXNVRAR_FUSED_NORM", "1")

    def by_device(groups, num_pes):
        table = np.full((jax.device_count(), len(groups[0])), -1, np.int32)
        for group in groups:
            ids = [d.id for d in group]
            table[ids] = ids
        return table

    monkeypatch.setattr(nvrar_ffi, "_pe_groups", by_device)
    mesh = jax.make_mesh((2, 2), ("a", "b"), devices=jax.devices()[:4])
    spec = P(("a", "b"))
    x = jax.device_put(np.arange(32.0, dtype=np.float32).reshape(4, 8), jax.NamedSharding(mesh, spec))

    def lowered(body):
        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=check_vma))
        return f.trace(x).lower(lowering_platforms=("cuda",)).as_text()

    first = lowered(lambda v: jaxnvrar.all_reduce(v, "a"))
    assert "jaxnvrar_nvrar_all_reduce" in first and "grouping = 0" in first
    with pytest.raises(nvrar_ffi.NoRegionLeft, match=r"over axis 'b' .*process groups \{0,1\} \{2,3\}.*"
                                                     r"JAXNVRAR_GROUPINGS=1\) are taken"):
        lowered(lambda v: jaxnvrar.all_reduce(v, "b", algorithm="nvrar"))
    with pytest.warns(UserWarning, match=r"psum instead of the kernel over axis 'b' \(process groups \{0,1\} \{2,3\}\)"):
        second = lowered(lambda v: jaxnvrar.all_reduce(v, "b"))
    assert "stablehlo.all_reduce" in second and "jaxnvrar_nvrar" not in second
    fused = lowered(lambda v: jaxnvrar.all_reduce_rms_norm(v, v, jnp.ones(8, v.dtype), "b")[0])
    assert "stablehlo.all_reduce" in fused and "jaxnvrar_nvrar" not in fused
    assert "jaxnvrar_nvrar_all_reduce_rms_norm" in lowered(
        lambda v: jaxnvrar.all_reduce_rms_norm(v, v, jnp.ones(8, v.dtype), "a")[0])


@pytest.mark.parametrize("check_vma", [False, True])
def test_a_message_that_outgrows_the_workspace_after_tracing_takes_psum_under_auto_and_nvrar_refuses(
        monkeypatch, check_vma):
    # Tracing checks the message against the workspace for one example of a vmap (and in the
    # topology assumed before the mesh is at hand); the lowering sees the batched message in the
    # mesh's topology. Where that no longer fits, "auto" lowers psum with a warning and "nvrar"
    # refuses by name, instead of a kernel that fails at run time. Lowered for CUDA on this CPU
    # machine, with a started runtime stubbed in.
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import jaxnvrar
    from jaxnvrar import nvrar_ffi, runtime
    from jaxnvrar.schedule import Topology, workspace_bytes_needed

    _lower_kernel_calls_without_a_gpu(monkeypatch)
    monkeypatch.setattr(runtime, "is_initialized", lambda: True)
    row = 4096  # float32 elements of one example
    monkeypatch.setattr(runtime, "workspace_bytes", lambda: workspace_bytes_needed(row, 4, Topology(2, 2)))
    monkeypatch.setattr(nvrar_ffi, "_pe_groups", lambda groups, num_pes: np.array(
        [[d.id for d in group] for group in groups for _ in group], np.int32))
    mesh = jax.make_mesh((2, 2), ("a", "b"), devices=jax.devices()[:4])
    spec = P(None, ("a", "b"))
    x = jax.device_put(np.ones((16, 4 * row), np.float32), jax.NamedSharding(mesh, spec))

    def lowered(body):
        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=check_vma))
        return f.trace(x).lower(lowering_platforms=("cuda",)).as_text()

    one_row = lowered(lambda v: jaxnvrar.all_reduce(v[:1], "a").repeat(16, axis=0))
    assert "jaxnvrar_nvrar_all_reduce" in one_row
    with pytest.raises(nvrar_ffi.MessageTooLarge, match=r"over axis 'a' as lowered \(\(16, 4096\) float32, 1 node\(s\) "
                                                        r"of 2 GPU\(s\) by the mesh\): a 262144-byte message needs "
                                                        r"\d+ bytes .*JAXNVRAR_WORKSPACE_BYTES"):
        lowered(jax.vmap(lambda r: jaxnvrar.all_reduce(r, "a", algorithm="nvrar")))
    with pytest.warns(UserWarning, match=r"psum instead of the kernel over axis 'a' \(262144-byte messages over "
                                         r"1 node\(s\) of 2 GPU\(s\)\): a 262144-byte message needs"):
        batched = lowered(jax.vmap(lambda r: jaxnvrar.all_reduce(r, "a")))
    assert "stablehlo.all_reduce" in batched and "jaxnvrar_nvrar" not in batched


def test_the_topology_assumed_before_the_mesh_is_the_same_on_every_process(monkeypatch):
    # "auto" chooses at trace time in the topology assumed without the mesh; processes on hosts
    # of different sizes (4, 2 and 2 GPUs) must assume the same one, or some would bind the
    # kernel and others psum for one all-reduce, and the job would hang.
    import types

    from jaxnvrar import distributed
    from jaxnvrar.schedule import Topology

    hosts = ["a"] * 4 + ["b"] * 2 + ["c"] * 2
    monkeypatch.setattr(distributed, "host_of_process", lambda p: hosts[p])
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(process_index=p) for p in range(8)])
    for me in (0, 4):  # a process on host a, one on host b
        monkeypatch.setattr(jax, "process_index", lambda me=me: me)
        assert distributed.default_topology(4) == Topology(4, 2)
        assert distributed.default_topology(8) == Topology(8, 2)
    hosts[:] = ["a"] * 4 + ["b"] * 4
    assert distributed.default_topology(8) == Topology(8, 4)


@pytest.mark.parametrize("flag", ["--xla_gpu_command_buffer_scheduling_mode=CONCURRENT",
                                  "--xla_gpu_graph_enable_concurrent_region=true"])
def test_initialize_refuses_xla_options_that_run_kernel_calls_at_once(monkeypatch, flag):
    # Command buffers ordered only by buffer use could run two independent all-reduces of one
    # program at once, on one workspace region: a silent mix of their data, so refused by name.
    from jaxnvrar import runtime

    monkeypatch.setenv("XLA_FLAGS", f"--xla_gpu_graph_min_graph_size=1 {flag}")
    with pytest.raises(RuntimeError, match=f"XLA_FLAGS has {flag}: .*drop it"):
        runtime._check_environment()
    # As XLA reads them, the last value of a flag counts.
    assert runtime.concurrent_xla_flag(f"{flag} --xla_gpu_command_buffer_scheduling_mode=LHS "
                                       "--xla_gpu_graph_enable_concurrent_region=false") is None
    assert runtime.concurrent_xla_flag(f"--xla_gpu_command_buffer_scheduling_mode=LHS {flag}") == flag
    assert runtime.concurrent_xla_flag("--xla_gpu_graph_enable_concurrent_region") is not None  # a bare bool is true
    for fine in ("--xla_gpu_command_buffer_scheduling_mode=LHS", "--xla_gpu_graph_enable_concurrent_region=false",
                 "--xla_gpu_graph_enable_concurrent_regions_x=true", ""):
        assert runtime.concurrent_xla_flag(fine) is None, fine


HOSTS_SCRIPT = """
import socket, time
import jax
import jaxnvrar
from jaxnvrar import distributed
jaxnvrar.initialize_distributed()
jax.config.update("jax_num_cpu_devices", 1)  # allowed: publishing the host name started no backend
if jax.process_index() == 0:  # process 1 never lowers an all-reduce, so never asks for host names
    start = time.monotonic()
    print("HOST", distributed.host_of_process(1) == socket.gethostname(), round(time.monotonic() - start), flush=True)
distributed.kv_client().wait_at_barrier("hosts-test-done", 60_000)
"""


@pytest.mark.multiprocess
def test_a_process_that_never_lowers_an_all_reduce_still_names_its_host():
    job = _two_cpu_processes(HOSTS_SCRIPT)
    line = next(l for l in job.stdout.splitlines() if "HOST" in l)
    seconds = int(line.split()[-1])
    assert "HOST True" in line and seconds < 30, line  # published at start, not after the store's 120 s

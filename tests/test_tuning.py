"""The tuning table behind "auto" and the kernel configuration (measured by jaxnvrar-bench tune)."""

import jax
import pytest

from jaxnvrar import runtime, tuning
from jaxnvrar.schedule import DEFAULT_MAX_BLOCKS, KernelConfig, Topology

L = KernelConfig


def test_buckets_are_powers_of_two_from_1k():
    assert [tuning.bucket_of(n) for n in (1, 1024, 1025, 3 << 20)] == [1024, 1024, 2048, 4 << 20]


def test_record_keeps_the_faster_algorithm_and_width():
    table = tuning.Table()
    key = tuning.entry_key("H200", Topology(2, 2), "bfloat16")
    assert table.record(key, 8 << 10, psum_us=20.0, nvrar_us_by_config={L(32): 7.5, L(128): 7.1}) == \
        tuning.Choice("nvrar", L(128))
    assert table.record(key, 64 << 20, psum_us=287.0, nvrar_us_by_config={L(32): 700.0, L(128): 467.0}) == \
        tuning.Choice("psum", L(128))
    assert table.lookup(key, 6000) == tuning.Choice("nvrar", L(128))        # the 8 KB bucket
    assert table.lookup(key, 100) == tuning.Choice("nvrar", L(128))         # below the smallest measured
    assert table.lookup(key, 1 << 30).algorithm == "psum"                # past the largest measured
    assert table.lookup(tuning.entry_key("H100", Topology(2, 2), "bfloat16"), 6000) is None


def test_table_file_round_trip_and_bad_files(tmp_path):
    table = tuning.Table()
    key = tuning.entry_key("H200", Topology(4, 2), "float32")
    table.record(key, 1 << 20, psum_us=20.0, nvrar_us_by_config={L(64): 12.0})
    path = table.save(tmp_path / "sub" / "t.json")
    assert tuning.Table.load(path).lookup(key, 1 << 20) == tuning.Choice("nvrar", L(64))
    assert tuning.Table.load(tmp_path / "missing.json").entries == {}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON.*tune again"):
        tuning.Table.load(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text('{"version": 0, "entries": {}}')
    with pytest.raises(ValueError, match="format version 0"):
        tuning.Table.load(tmp_path / "old.json")


def test_the_active_table_sets_the_kernel_width(monkeypatch):
    if runtime.is_initialized():
        pytest.skip("the runtime is up in this process")
    topology = Topology(2, 2)
    table = tuning.Table()
    table.record(tuning.entry_key(jax.devices()[0].device_kind, topology, "bfloat16"), 1 << 20,
                 psum_us=20.0, nvrar_us_by_config={L(16): 30.0, L(64): 11.0})
    monkeypatch.setattr(tuning, "_active", table)
    assert tuning.choice_for(topology, "bfloat16", 1 << 20) == tuning.Choice("nvrar", L(64))
    assert tuning.kernel_config_for(topology, "bfloat16", 1 << 19, 2).max_blocks == 64
    assert tuning.kernel_config_for(topology, "float32", 1 << 18, 4).max_blocks == DEFAULT_MAX_BLOCKS  # not measured


def test_one_shot_configs_are_chosen_where_measured_faster_and_possible(monkeypatch):
    if runtime.is_initialized():
        pytest.skip("the runtime is up in this process")
    kind = jax.devices()[0].device_kind
    table = tuning.Table()
    one_node, two_nodes = Topology(2, 2), Topology(4, 2)
    assert table.record(tuning.entry_key(kind, one_node, "bfloat16"), 128 << 10, psum_us=20.0,
                        nvrar_us_by_config={L(128): 5.6, L(128, True): 3.9, L(32, True): 4.4}) == \
        tuning.Choice("nvrar", L(128, True))
    entry = table.entries[tuning.entry_key(kind, one_node, "bfloat16")][str(128 << 10)]
    assert entry["nvrar_us_by_launch"] == {"128": 5.6, "128-1shot": 3.9, "32-1shot": 4.4}
    monkeypatch.setattr(tuning, "_active", table)
    monkeypatch.setattr(runtime, "workspace_bytes", lambda: 64 << 20)
    assert tuning.kernel_config_for(one_node, "bfloat16", 64 << 10, 2) == L(128, True)
    # Not measured: the default configuration; one-shot needs a workspace that holds it.
    assert tuning.kernel_config_for(one_node, "float32", 64 << 10, 4) == L(DEFAULT_MAX_BLOCKS, False)
    monkeypatch.setattr(runtime, "workspace_bytes", lambda: 1 << 20)
    assert tuning.kernel_config_for(one_node, "bfloat16", 64 << 10, 2) == L(128, False)
    # Across nodes there is no one-shot kernel, whatever a table says.
    monkeypatch.setattr(runtime, "workspace_bytes", lambda: 64 << 20)
    table.record(tuning.entry_key(kind, two_nodes, "bfloat16"), 128 << 10, psum_us=20.0,
                 nvrar_us_by_config={L(128, True): 3.0})
    assert tuning.kernel_config_for(two_nodes, "bfloat16", 64 << 10, 2) == L(128, False)
    # Bulk, as measured; it needs at most 1024 blocks (its flags) and the workspace for its flags.
    table.record(tuning.entry_key(kind, one_node, "bfloat16"), 4 << 20, psum_us=36.0,
                 nvrar_us_by_config={L(128): 33.0, L(128, False, True): 14.0, L(128, True, True): 15.0})
    assert tuning.kernel_config_for(one_node, "bfloat16", 2 << 20, 2) == L(128, False, True)
    monkeypatch.setattr(runtime, "workspace_bytes", lambda: 8 << 20)
    assert tuning.kernel_config_for(one_node, "bfloat16", 2 << 20, 2) == L(128)
    # Dense, as measured, where the process has the dense inboxes (opt-in), else bulk; an explicit
    # "no bulk" ends it (it is bulk), "no one-shot" leaves two-shot dense.
    monkeypatch.setattr(runtime, "workspace_bytes", lambda: 64 << 20)
    table.record(tuning.entry_key(kind, one_node, "bfloat16"), 1 << 20, psum_us=20.0,
                 nvrar_us_by_config={L(128, True, True): 10.0, L.parse("128-1shot-dense"): 8.0})
    monkeypatch.delenv("JAXNVRAR_DENSE_BYTES", raising=False)
    assert tuning.kernel_config_for(one_node, "bfloat16", 1 << 19, 2) == L(128, True, True)
    monkeypatch.setenv("JAXNVRAR_DENSE_BYTES", str(64 << 20))
    assert tuning.kernel_config_for(one_node, "bfloat16", 1 << 19, 2) == L.parse("128-1shot-dense")
    unset = {"max_blocks": None, "one_shot": None, "bulk": None, "dense": None, "pull": None}
    monkeypatch.setattr(tuning, "_explicit", lambda: dict(unset, bulk=False))
    assert tuning.kernel_config_for(one_node, "bfloat16", 1 << 19, 2) == L(128, True, False)
    monkeypatch.setattr(tuning, "_explicit", lambda: dict(unset, one_shot=False))
    assert tuning.kernel_config_for(one_node, "bfloat16", 1 << 19, 2) == L.parse("128-dense")


def test_tables_from_before_one_shot_still_load():
    table = tuning.Table({"H200|1x2|bfloat16": {"8192": {"algorithm": "nvrar", "max_blocks": 32}}})
    assert table.lookup("H200|1x2|bfloat16", 8192) == tuning.Choice("nvrar", L(32))


def test_kernel_config_labels_round_trip_and_bad_ones_are_named():
    for config in (L(128), L(32, True), L(1024, True), L(64, False, True), L(128, True, True), L(8, False, True, True),
                   L(8, True, True, True), L(8, False, True, pull=True), L(8, True, True, pull=True)):
        assert L.parse(config.label) == config
    assert L(128, True, True).label == "128-1shot-bulk"
    for bad in ("0", "x", "128-2shot", "2000", "-1shot", "128-bulk-1shot", "128-1shot-1shot", "128-dense-1shot",
                "128-bulk-pull", "128-dense-pull", "128-pull-1shot"):
        with pytest.raises(ValueError, match=r"BLOCKS\[-1shot\]\[-bulk\|-dense\|-pull\]"):
            L.parse(bad)
    with pytest.raises(ValueError, match=r"max_blocks must be an int in \[1, 1024\]"):
        L(0)
    with pytest.raises(TypeError, match="must be bools"):
        L(128, "yes")
    with pytest.raises(RuntimeError, match="needs jaxnvrar.initialize"):
        with tuning.kernel_config_override("128-bulk"):
            pass


def test_environment_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv(tuning.TUNING_FILE_ENV, str(tmp_path / "x.json"))
    assert tuning.default_path() == tmp_path / "x.json"


SHARE_SCRIPT = """
import os, sys
import jax
import jaxnvrar
from jaxnvrar import tuning
jaxnvrar.initialize_distributed()
if jax.process_index() != 0:  # only process 0's file counts
    os.environ[tuning.TUNING_FILE_ENV] = os.path.join(sys.argv[1], "absent.json")
try:
    table = tuning.load_shared()
except ValueError as err:
    print("LOAD FAILED", err, flush=True)
    sys.exit(0)
print("CHOICE", table.lookup("H200|1x2|bfloat16", 8192))
"""


@pytest.mark.multiprocess
def test_every_process_uses_process_0s_table(tmp_path):
    import os
    import subprocess
    import sys

    table = tuning.Table()
    table.record("H200|1x2|bfloat16", 8192, psum_us=20.0, nvrar_us_by_config={L(32): 7.0})
    path = table.save(tmp_path / "t.json")
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", JAX_PLATFORMS="cpu", **{tuning.TUNING_FILE_ENV: str(path)})
    env.pop("JAXNVRAR_NUM_PROCESSES", None)
    job = subprocess.run([sys.executable, "-m", "jaxnvrar.launcher", "-n", "2", "--timeout", "120", "--",
                          sys.executable, "-c", SHARE_SCRIPT, str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=180)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    for rank in (0, 1):
        assert f"[rank {rank}] CHOICE Choice(algorithm='nvrar', config=KernelConfig(max_blocks=32, one_shot=False, bulk=False, dense=False, pull=False))" in job.stdout, job.stdout[-2000:]
    # Process 0's file broken: every process says why at once (not after the key-value store's
    # two-minute wait for a table that process 0 never publishes).
    path.write_text("{not json")
    job = subprocess.run([sys.executable, "-m", "jaxnvrar.launcher", "-n", "2", "--timeout", "120", "--",
                          sys.executable, "-c", SHARE_SCRIPT, str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=180)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "[rank 0] LOAD FAILED" in job.stdout and "is not valid JSON" in job.stdout, job.stdout[-2000:]
    assert "[rank 1] LOAD FAILED process 0 could not load the tuning table every process uses: " in job.stdout


def test_dense_configurations_need_the_opt_in(monkeypatch):
    from jaxnvrar.bench.allreduce import parse_kernel_configs

    monkeypatch.delenv("JAXNVRAR_DENSE_BYTES", raising=False)
    assert not tuning.dense_inboxes()
    with pytest.raises(SystemExit, match=r"128-dense needs the dense kernel's inboxes \(opt-in\)"):
        parse_kernel_configs("128,128-dense", Topology(2, 2), "tune --kernel-configs")
    monkeypatch.setenv("JAXNVRAR_DENSE_BYTES", str(64 << 20))
    assert tuning.dense_inboxes()
    assert parse_kernel_configs("128,128-dense", Topology(2, 2), "tune --kernel-configs")[1] == L.parse("128-dense")


def test_dense_is_a_kind_of_bulk_on_one_node():
    assert L.parse("64-1shot-dense") == L(64, True, True, True) and L(64, True, True, True).label == "64-1shot-dense"
    assert L.parse("64-dense") == L(64, False, True, True) and L(64, False, True, True).label == "64-dense"
    with pytest.raises(ValueError, match="needs bulk=True"):
        L(64, True, False, True)
    with pytest.raises(ValueError, match="bad kernel configuration"):
        L.parse("64-bulk-dense")
    # Across nodes there is no dense kernel: bulk (and no one-shot) instead.
    assert L.parse("64-1shot-dense").possible_for(Topology(4, 2)) == L(64, False, True, False)
    assert L.parse("64-dense").possible_for(Topology(2, 2)) == L(64, False, True, True)
    # A table entry records it, and reads back.
    table = tuning.Table()
    table.record("k", 1 << 20, psum_us=9.0, nvrar_us_by_config={L.parse("128-1shot-dense"): 5.0, L(128): 6.0})
    assert table.lookup("k", 1 << 20) == tuning.Choice("nvrar", L.parse("128-1shot-dense"))
    # Without the dense inboxes: the fastest other configuration, against psum again.
    assert table.lookup("k", 1 << 20, dense=False) == tuning.Choice("nvrar", L(128))
    table.record("k", 1 << 20, psum_us=9.0, nvrar_us_by_config={L.parse("128-1shot-dense"): 5.0, L(128): 12.0})
    assert table.lookup("k", 1 << 20, dense=False).algorithm == "psum"
    table.record("k", 1 << 20, psum_us=9.0, nvrar_us_by_config={L.parse("128-1shot-dense"): 5.0})
    assert table.lookup("k", 1 << 20, dense=False) == tuning.Choice("nvrar", L(128, True, True))


def test_pull_is_a_kind_of_bulk_with_peers_in_the_node(monkeypatch):
    if runtime.is_initialized():
        pytest.skip("the runtime is up in this process")
    assert L.parse("64-pull") == L(64, False, True, False, True) and L(64, False, True, pull=True).label == "64-pull"
    assert L.parse("64-1shot-pull") == L(64, True, True, pull=True)
    with pytest.raises(ValueError, match="needs bulk=True and dense=False"):
        L(64, False, False, pull=True)
    with pytest.raises(ValueError, match="needs bulk=True and dense=False"):
        L(64, False, True, True, True)
    # Nodes of one GPU have no peer to pull from (bulk); several nodes keep it (the node's part).
    assert L.parse("64-pull").possible_for(Topology(2, 1)) == L(64, False, True)
    assert L.parse("64-1shot-pull").possible_for(Topology(4, 2)) == L(64, False, True, pull=True)
    # The lowering's protocol number (csrc/nvrar_ffi.cu's SelectProtocol): 3; dense 2, bulk 1, LL 0.
    from jaxnvrar.nvrar_ffi import protocol_attribute
    assert [protocol_attribute(L.parse(label)) for label in ("64-pull", "64-1shot-pull", "64-dense", "64-bulk", "64")] \
        == [3, 3, 2, 1, 0]
    from jaxnvrar.bench.allreduce import parse_kernel_configs
    assert parse_kernel_configs("128-pull", Topology(2, 2), "x") == [L(128, False, True, pull=True)]
    with pytest.raises(SystemExit, match="128-pull pulls from the other GPUs of a node"):
        parse_kernel_configs("128-pull", Topology(2, 1), "x")
    # A table entry records it and reads back; an explicit "no bulk" ends it.
    table = tuning.Table()
    key = tuning.entry_key(jax.devices()[0].device_kind, Topology(2, 2), "bfloat16")
    table.record(key, 1 << 20, psum_us=9.0, nvrar_us_by_config={L.parse("128-pull"): 5.0, L(128, False, True): 6.0})
    assert table.lookup(key, 1 << 20) == tuning.Choice("nvrar", L.parse("128-pull"))
    assert table.entries[key][str(tuning.bucket_of(1 << 20))]["pull"] is True
    monkeypatch.setattr(tuning, "_active", table)
    monkeypatch.setattr(runtime, "workspace_bytes", lambda: 64 << 20)
    unset = {"max_blocks": None, "one_shot": None, "bulk": None, "dense": None, "pull": None}
    monkeypatch.setattr(tuning, "_explicit", lambda: dict(unset))
    assert tuning.kernel_config_for(Topology(2, 2), "bfloat16", 1 << 19, 2) == L.parse("128-pull")
    monkeypatch.setattr(tuning, "_explicit", lambda: dict(unset, bulk=False))
    assert tuning.kernel_config_for(Topology(2, 2), "bfloat16", 1 << 19, 2) == L(128)


def test_the_builtin_table_gives_the_measured_configs_without_a_tuning_run(monkeypatch):
    # 2 x H200, 2026-12-01 (docs/results/tune_2xH200_2026-12-01.txt): one-shot LL up to 512 KB,
    # one-shot bulk 1-8 MB, two-shot bulk above; nvrar ahead of psum at every size (8 KB - 32 MB).
    key = tuning.entry_key("NVIDIA H200", Topology(2, 2), "bfloat16")
    expected = {8 << 10: "256-1shot", 128 << 10: "128-1shot", 512 << 10: "128-1shot",
                1 << 20: "256-1shot-bulk", 4 << 20: "256-1shot-bulk", 8 << 20: "256-1shot-bulk",
                32 << 20: "256-bulk"}
    for nbytes, label in expected.items():
        assert tuning.builtin().lookup(key, nbytes) == tuning.Choice("nvrar", L.parse(label)), nbytes
    # choice_for falls back to it for this GPU kind, and a table of the user's wins over it.
    kind = jax.devices()[0].device_kind
    builtin = tuning.Table({tuning.entry_key(kind, Topology(2, 2), "bfloat16"): tuning.builtin().entries[key]})
    monkeypatch.setattr(tuning, "builtin", lambda: builtin)
    monkeypatch.setattr(tuning, "_active", tuning.Table())
    assert tuning.choice_for(Topology(2, 2), "float32", 2 << 20) == tuning.Choice("nvrar", L(128, True, True))
    assert tuning.choice_for(Topology(4, 2), "bfloat16", 2 << 20) is None  # another topology: not measured
    mine = tuning.Table()
    mine.record(tuning.entry_key(kind, Topology(2, 2), "float32"), 2 << 20, psum_us=9.0, nvrar_us_by_config={L(64): 10.0})
    monkeypatch.setattr(tuning, "_active", mine)
    assert tuning.choice_for(Topology(2, 2), "float32", 2 << 20) == tuning.Choice("psum", L(64))


def test_an_explicit_auto_limit_wins_over_the_builtin_table_but_not_over_the_users(monkeypatch):
    from jaxnvrar import settings

    kind, one_node = jax.devices()[0].device_kind, Topology(2, 2)
    shipped = tuning.Table()
    shipped.record(tuning.entry_key(kind, one_node, "bfloat16"), 2 << 20, psum_us=30.0,
                   nvrar_us_by_config={L(128, True, True): 15.0})
    monkeypatch.setattr(tuning, "builtin", lambda: shipped)
    monkeypatch.setattr(tuning, "_active", tuning.Table())
    monkeypatch.setattr(runtime, "is_initialized", lambda: True)
    monkeypatch.setattr(runtime, "fits_workspace", lambda *args: True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    snapshot = settings.Settings()
    monkeypatch.setattr(runtime, "settings", lambda: snapshot)
    assert tuning.choose_algorithm(1 << 20, "bfloat16", one_node) == "nvrar"  # the built-in table
    snapshot = settings.Settings(auto_max_bytes=1 << 20)
    assert tuning.choose_algorithm(1 << 20, "bfloat16", one_node) == "psum"  # 2 MB > the explicit 1 MB
    mine = tuning.Table()
    mine.record(tuning.entry_key(kind, one_node, "bfloat16"), 2 << 20, psum_us=30.0, nvrar_us_by_config={L(64): 9.0})
    monkeypatch.setattr(tuning, "_active", mine)
    assert tuning.choose_algorithm(1 << 20, "bfloat16", one_node) == "nvrar"  # the user's measurement

"""jaxnvrar-bench kernels: the HLO reading (kinds, loops, layers) on a written module, and the
command end to end on CPU devices."""

import json
import subprocess
import sys

import pytest

from jaxnvrar.bench.kernels import Kernel, by_layer, is_all_reduce, kernels_of, step_report

# An optimized module as XLA prints it, cut down: a loop of known trip count around a fusion,
# a GEMM fusion without metadata, an async all-reduce, views that launch nothing.
HLO = """HloModule jit_step, entry_computation_layout={()->f32[4]}

%fused_add (p0: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  ROOT %add.1 = f32[4]{0} add(f32[4]{0} %p0, f32[4]{0} %p0)
}

%body (state: (s32[], f32[4])) -> (s32[], f32[4]) {
  %state = (s32[], f32[4]{0}) parameter(0)
  %x = f32[4]{0} get-tuple-element((s32[], f32[4]{0}) %state), index=1
  %loop_add_fusion = f32[4]{0} fusion(f32[4]{0} %x), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/layer0/while/body/add"}
  ROOT %t = (s32[], f32[4]{0}) tuple(s32[] %i, f32[4]{0} %loop_add_fusion)
}

%cond (state: (s32[], f32[4])) -> pred[] {
  %state = (s32[], f32[4]{0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

ENTRY %main (a: f32[4], w: f32[4,4]) -> f32[4] {
  %a = f32[4]{0} parameter(0), metadata={op_name="a"}
  %w = f32[4,4]{1,0} parameter(1)
  %gemm_fusion_dot = f32[4]{0} fusion(f32[4]{0} %a, f32[4,4]{1,0} %w), kind=kCustom, calls=%fused_add, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %input_reduce_fusion = f32[4]{0} fusion(f32[4]{0} %gemm_fusion_dot), kind=kInput, calls=%fused_add, metadata={op_name="jit(step)/layer0/reduce_sum"}
  %all-reduce-start = f32[4]{0} all-reduce-start(f32[4]{0} %input_reduce_fusion), replica_groups={{0,1}}, to_apply=%fused_add, metadata={op_name="jit(step)/layer1/psum"}
  %all-reduce-done = f32[4]{0} all-reduce-done(f32[4]{0} %all-reduce-start)
  %b = f32[4]{0} bitcast(f32[4]{0} %all-reduce-done)
  %custom-call = f32[4]{0} custom-call(f32[4]{0} %b), custom_call_target="jaxnvrar_nvrar_all_reduce", metadata={op_name="jit(step)/layer1/jaxnvrar_all_reduce"}
  %init = (s32[], f32[4]{0}) tuple(s32[] %zero, f32[4]{0} %custom-call)
  %while = (s32[], f32[4]{0}) while((s32[], f32[4]{0}) %init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %out = f32[4]{0} get-tuple-element((s32[], f32[4]{0}) %while), index=1
}
"""


def test_kernels_are_read_in_order_with_kinds_and_loop_trips():
    kernels = kernels_of(HLO)
    assert [(k.name, k.kind, k.trips) for k in kernels] == [
        ("gemm_fusion_dot", "gemm", 1),
        ("input_reduce_fusion", "fusion:kInput", 1),
        ("all-reduce-start", "all-reduce", 1),
        ("custom-call", "custom-call:jaxnvrar_nvrar_all_reduce", 1),
        ("loop_add_fusion", "fusion:kLoop", 5),
    ]
    assert [is_all_reduce(k) for k in kernels] == [False, False, True, True, False]


def test_a_kernel_without_metadata_goes_with_the_next_named_one():
    kernels = kernels_of(HLO)
    assert by_layer(kernels, "layer") == [0, 0, 1, 1, 0]
    unnamed_last = [Kernel("a", "gemm", "jit(f)/layer2/dot"), Kernel("b", "gemm", "")]
    assert by_layer(unnamed_last, "layer") == [2, 2]
    outside = [Kernel("a", "gemm", ""), Kernel("b", "fusion:kLoop", "jit(f)/argmax")]
    assert by_layer(outside, "layer") == [None, None]
    # "layer1" must be a whole scope name, not the start of "layer10" or part of "mylayer1".
    assert by_layer([Kernel("a", "copy", "jit(f)/layer10/x"), Kernel("b", "copy", "jit(f)/mylayer1/x")],
                    "layer") == [10, None]


def test_step_report_counts_launches_per_layer():
    kernels = kernels_of(HLO)
    report = step_report(kernels, by_layer(kernels, "layer"), num_layers=2)
    assert report["per_layer"] == [1 + 1 + 5, 2]
    assert report["total"] == 9 and report["outside_layers"] == 0
    assert report["all_reduces_per_layer"] == 0  # layer 0 (the middle of 2 is the first)


def test_command_counts_a_compiled_decode_step_on_cpu(tmp_path):
    pytest.importorskip("flax")
    result = subprocess.run([sys.executable, "-m", "jaxnvrar.bench", "kernels", "--preset", "tiny", "--target", "cpu",
                             "--batch", "1", "--context", "32", "--algorithms", "psum,none", "--list",
                             "--json", str(tmp_path / "k.json")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "CPU devices" in result.stdout
    rows = {r["algorithm"]: r for r in json.loads((tmp_path / "k.json").read_text())["rows"]}
    for algorithm, all_reduces in (("psum", 2), ("none", 0)):
        row = rows[algorithm]
        assert row["all_reduces_per_layer"] == all_reduces  # the two that end attention and MLP
        assert row["middle_layers_equal"] and len(row["per_layer"]) == 3
        assert row["middle_layer"] == len(row["middle_layer_kernels"]) > 0
        assert all("layer1/" in k["op_name"] or not k["op_name"] for k in row["middle_layer_kernels"])
    # The same layer, less its collectives, on a step without them.
    assert rows["psum"]["middle_layer"] >= rows["none"]["middle_layer"] + 2


def test_command_refuses_the_kernel_it_cannot_compile():
    result = subprocess.run([sys.executable, "-m", "jaxnvrar.bench", "kernels", "--target", "cpu", "--algorithms", "nvrar"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "runtime" in result.stderr

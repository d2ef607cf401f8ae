"""jaxnvrar-bench kernels: the HLO reading (kinds, loops, layers) on a written module, and the
command end to end on CPU devices."""

import json
import re
import subprocess
import sys

import pytest

from jaxnvrar.bench.kernels import (Kernel, by_layer, h200_target_config, is_all_reduce, kernels_of, launches_of,
                                    step_report)

# An optimized module as XLA prints it, cut down: a loop of known trip count around a fusion,
# a conditional whose branches differ, a call and an async computation, a GEMM fusion without
# metadata, an async all-reduce, views that launch nothing.
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
  ROOT %lt = pred[] fusion((s32[], f32[4]{0}) %state), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/layer0/while/cond/lt"}
}

%small (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  ROOT %one = f32[4]{0} fusion(f32[4]{0} %a), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/layer1/cond/a"}
}

%large (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %two = f32[4]{0} fusion(f32[4]{0} %a), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/layer1/cond/b"}
  ROOT %three = f32[4]{0} fusion(f32[4]{0} %two), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/layer1/cond/c"}
}

%called (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  ROOT %copy.1 = f32[4]{0} copy(f32[4]{0} %a), metadata={op_name="jit(step)/layer1/copy"}
}

ENTRY %main (a: f32[4], w: f32[4,4], p: pred[]) -> f32[4] {
  %a = f32[4]{0} parameter(0), metadata={op_name="a"}
  %w = f32[4,4]{1,0} parameter(1)
  %p = pred[] parameter(2)
  %gemm_fusion_dot = f32[4]{0} fusion(f32[4]{0} %a, f32[4,4]{1,0} %w), kind=kCustom, calls=%fused_add, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %input_reduce_fusion = f32[4]{0} fusion(f32[4]{0} %gemm_fusion_dot), kind=kInput, calls=%fused_add, metadata={op_name="jit(step)/layer0/reduce_sum"}
  %all-reduce-start = f32[4]{0} all-reduce-start(f32[4]{0} %input_reduce_fusion), replica_groups={{0,1}}, to_apply=%fused_add, metadata={op_name="jit(step)/layer1/psum"}
  %all-reduce-done = f32[4]{0} all-reduce-done(f32[4]{0} %all-reduce-start)
  %b = f32[4]{0} bitcast(f32[4]{0} %all-reduce-done)
  %custom-call = f32[4]{0} custom-call(f32[4]{0} %b), custom_call_target="jaxnvrar_nvrar_all_reduce", metadata={op_name="jit(step)/layer1/jaxnvrar_all_reduce"}
  %branch = f32[4]{0} conditional(pred[] %p, f32[4]{0} %custom-call, f32[4]{0} %custom-call), true_computation=%small, false_computation=%large
  %call = f32[4]{0} call(f32[4]{0} %branch), to_apply=%called
  %async-start = ((f32[4]{0}), f32[4]{0}, u32[]) async-start(f32[4]{0} %call), calls=%called
  %async-done = f32[4]{0} async-done(((f32[4]{0}), f32[4]{0}, u32[]) %async-start)
  %init = (s32[], f32[4]{0}) tuple(s32[] %zero, f32[4]{0} %async-done)
  %while = (s32[], f32[4]{0}) while((s32[], f32[4]{0}) %init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %while.1 = (s32[], f32[4]{0}) while((s32[], f32[4]{0}) %while), condition=%cond, body=%body
  ROOT %out = f32[4]{0} get-tuple-element((s32[], f32[4]{0}) %while.1), index=1
}
"""


def test_kernels_are_read_in_order_with_kinds_and_loop_trips():
    kernels = kernels_of(HLO)
    assert [(k.name, k.kind, k.trips, k.trips_known) for k in kernels] == [
        ("gemm_fusion_dot", "gemm", 1, True),
        ("input_reduce_fusion", "fusion:kInput", 1, True),
        ("all-reduce-start", "all-reduce", 1, True),
        ("custom-call", "custom-call:jaxnvrar_nvrar_all_reduce", 1, True),
        ("two", "fusion:kLoop", 1, True),  # the larger branch of the conditional, not both
        ("three", "fusion:kLoop", 1, True),
        ("copy.1", "copy", 1, True),  # the call
        ("copy.1", "copy", 1, True),  # the async computation
        ("lt", "fusion:kLoop", 6, True),  # a condition runs once more than the body
        ("loop_add_fusion", "fusion:kLoop", 5, True),
        ("lt", "fusion:kLoop", 1, False),  # trip count unknown: counted once, and said so
        ("loop_add_fusion", "fusion:kLoop", 1, False),
    ]
    assert [is_all_reduce(k) for k in kernels[:5]] == [False, False, True, True, False]


def test_a_line_that_cannot_be_read_stops_the_count():
    broken = HLO.replace("  %b = f32[4]{0} bitcast(f32[4]{0} %all-reduce-done)", "  b = something new")
    with pytest.raises(ValueError, match="cannot read this line"):
        kernels_of(broken)


def test_a_kernel_without_metadata_goes_with_the_next_named_one():
    kernels = kernels_of(HLO)
    assert by_layer(kernels, "layer")[:4] == [0, 0, 1, 1]
    unnamed_last = [Kernel("a", "gemm", "jit(f)/layer2/dot"), Kernel("b", "gemm", "")]
    assert by_layer(unnamed_last, "layer") == [2, 2]
    outside = [Kernel("a", "gemm", ""), Kernel("b", "fusion:kLoop", "jit(f)/argmax")]
    assert by_layer(outside, "layer") == [None, None]
    # "layer1" must be a whole scope name, not the start of "layer10" or part of "mylayer1".
    assert by_layer([Kernel("a", "copy", "jit(f)/layer10/x"), Kernel("b", "copy", "jit(f)/mylayer1/x")],
                    "layer") == [10, None]


def test_step_report_averages_the_middle_layers():
    # Layers of 3, 5, 4, 3 kernels (one all-reduce in each middle layer), 2 outside.
    counts, layers, kernels = [3, 5, 4, 3], [], []
    for layer, count in enumerate(counts):
        for i in range(count):
            kind = "all-reduce" if i == 0 and layer in (1, 2) else "gemm"
            kernels.append(Kernel(f"k{layer}.{i}", kind, f"jit(f)/layer{layer}/x"))
            layers.append(layer)
    kernels += [Kernel("head", "gemm", "jit(f)/dot"), Kernel("argmax", "fusion:kInput", "jit(f)/argmax")]
    layers += [None, None]
    report = step_report(kernels, layers, num_layers=4)
    assert report["per_layer"] == counts and report["middle_layers"] == [1, 2]
    assert report["per_layer_mean"] == 4.5 and report["per_layer_range"] == [4, 5]
    assert report["all_reduces_per_layer"] == 1 and report["outside_layers"] == 2 and report["total"] == 17


def test_host_launches_are_the_top_level_thunks():
    # As XLA:GPU prints a thunk sequence: a command buffer's own thunks are indented under it.
    sequence = """000: kCommandBuffer [source | next=001 (1)]
    001: kCustomKernel [source | next=002 (1)] loop_add_fusion grid: [1, 1, 1]
    002: kCustomKernel [prev=001 (1) | sink] gemm_fusion_dot grid: [64, 1, 1]
001: kAllReduce [prev=000 (1) | next=002 (1)]
002: kCommandBuffer [prev=001 (1) | next=003 (1)]
    001: kCustomKernel [source | sink] fusion_1 grid: [16, 1, 1]
003: kCustomKernel [prev=002 (1) | sink] loop_slice_fusion grid: [1, 1, 1]
"""
    assert launches_of(sequence) == {"launches": 4, "command_buffers": 2,
                                     "outside_command_buffers": {"kAllReduce": 1, "kCustomKernel": 1}}


def test_h200_description_names_the_compiler_versions():
    text = h200_target_config()
    assert "cuda_compute_capability { major: 9 minor: 0 }" in text and "core_count: 132" in text
    assert re.search(r"runtime_version \{ major: 1[3-9] minor: \d+ patch: 0 \}", text)
    assert re.search(r"dnn_version_info \{ major: \d+ minor: \d+ patch: \d+ \}", text)


def test_command_counts_a_compiled_decode_step_on_cpu(tmp_path):
    pytest.importorskip("flax")
    result = subprocess.run([sys.executable, "-m", "jaxnvrar.bench", "kernels", "--preset", "tiny", "--target", "cpu",
                             "--batch", "1", "--context", "32", "--algorithms", "psum,none", "--list",
                             "--json", str(tmp_path / "k.json")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "CPU devices" in result.stdout and "layer 1:" in result.stdout
    rows = {r["algorithm"]: r for r in json.loads((tmp_path / "k.json").read_text())["rows"]}
    for algorithm, all_reduces in (("psum", 2), ("none", 0)):
        row = rows[algorithm]
        assert row["all_reduces_per_layer"] == all_reduces  # the two that end attention and MLP
        assert len(row["per_layer"]) == 4 and row["middle_layers"] == [1, 2]
        assert len(row["listings"]["1"]) == row["per_layer"][1] > 0
        assert row["host_launches"] is None  # XLA:CPU writes no thunk sequence
    # The same layers, less their collectives, on a step without them.
    assert rows["psum"]["per_layer_mean"] >= rows["none"]["per_layer_mean"] + 2


def test_command_refuses_the_kernel_where_it_cannot_compile():
    for target in ("cpu", "h200"):  # refused before looking for the CUDA plugin
        result = subprocess.run([sys.executable, "-m", "jaxnvrar.bench", "kernels", "--target", target,
                                 "--algorithms", "psum,nvrar"], capture_output=True, text=True, timeout=300)
        assert result.returncode != 0 and "compiles only with its runtime up" in result.stderr
        assert "jaxnvrar-launch -n 2" in result.stderr


@pytest.mark.parametrize("option, value", [("--layers", "0"), ("--tp", "0"), ("--batch", "1,0"), ("--context", "0")])
def test_command_refuses_sizes_below_one(option, value):
    result = subprocess.run([sys.executable, "-m", "jaxnvrar.bench", "kernels", "--target", "cpu", "--preset", "tiny",
                             "--algorithms", "none", option, value], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and f"{option} must be >= 1" in result.stderr

// The CPU extension: exposes csrc/schedule.h to Python so tests can check that the
// kernel's schedule is the one jaxnvrar/schedule.py defines, and csrc/call_signature.h so they
// can check what ranks compare.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>

#include <string>

#include "call_signature.h"
#include "schedule.h"

namespace nb = nanobind;

NB_MODULE(_jaxnvrar_cpu, m) {
  m.doc() = "C++ twin of jaxnvrar.schedule (the schedule the CUDA kernel follows)";
  m.def("slice_of", [](int64_t num_elements, int32_t num_slices, int64_t align, int32_t index) {
    jaxnvrar::SliceBounds b = jaxnvrar::SliceOf(num_elements, num_slices, align, index);
    return std::make_pair(b.begin, b.end);
  });
  m.def("num_inter_node_steps", &jaxnvrar::NumInterNodeSteps);
  m.def("dense_inbox_bytes", &jaxnvrar::DenseInboxBytes);
  m.def("inter_node_step", [](int32_t node, int32_t num_nodes, int32_t step) {
    jaxnvrar::InterNodeStep s = jaxnvrar::InterNodeStepOf(node, num_nodes, step);
    return std::make_pair(s.op, s.peer);
  });
  m.def("slice_capacity_elements", &jaxnvrar::SliceCapacityElements);
  // Every region of one workspace half: (name, offset, bytes), for tests of the layout.
  m.def("layout_regions", [](int64_t num_elements, int64_t itemsize, int32_t num_ranks, int32_t gpus_per_node,
                             bool one_shot, bool bulk) {
    const jaxnvrar::Layout l = jaxnvrar::MakeLayout(num_elements, itemsize, num_ranks, gpus_per_node, one_shot, bulk);
    nb::list regions;
    auto add = [&](const char* name, int32_t index, int64_t offset, int64_t bytes) {
      regions.append(nb::make_tuple(std::string(name) + std::to_string(index), offset, bytes));
    };
    for (int32_t j = 0; j < gpus_per_node; ++j) add("reduce_scatter", j, l.ReduceScatterInbox(j), l.slice_bytes);
    if (!one_shot) {
      for (int32_t s = 0; s < l.num_steps; ++s) add("inter_node", s, l.InterNodeInbox(s), l.slice_bytes);
      for (int32_t s = 0; s < l.num_steps; ++s) add("stage", s, l.Stage(s), l.slice_bytes);
      for (int32_t j = 0; j < gpus_per_node; ++j) add("all_gather", j, l.AllGatherInbox(j), l.slice_bytes);
    }
    if (bulk) {  // the flag rows, in order: reduce-scatter senders, all-gather senders, steps
      const int32_t rows[] = {gpus_per_node, gpus_per_node, one_shot ? 0 : l.num_steps};
      for (int32_t phase = 0; phase < 3; ++phase) {
        for (int32_t index = 0; index < rows[phase]; ++index) {
          add(phase == 0 ? "flags_reduce_scatter" : phase == 1 ? "flags_all_gather" : "flags_step", index,
              l.BulkFlag(phase, index, 0), jaxnvrar::kBulkMaxBlocks * jaxnvrar::kBulkFlagBytes);
        }
      }
    }
    return nb::make_tuple(regions, l.half_bytes, l.slice_units, l.slice_stride);
  });
  // A call signature as the kernel encodes it, and decoded back as failure reports do.
  m.def("encode_call", [](int64_t elements, uint32_t dtype, bool one_shot, bool bulk, int32_t gpus_per_node,
                          int32_t num_nodes, bool fused_norm, bool dense, bool pull) {
    const jaxnvrar::CallSignature s = jaxnvrar::EncodeCall(elements, static_cast<jaxnvrar::DtypeCode>(dtype), one_shot,
                                                           bulk, gpus_per_node, num_nodes, fused_norm, dense,
                                                           pull);
    return std::make_pair(s.elements, s.shape);
  }, nb::arg("elements"), nb::arg("dtype"), nb::arg("one_shot"), nb::arg("bulk"), nb::arg("gpus_per_node"),
        nb::arg("num_nodes"), nb::arg("fused_norm") = false, nb::arg("dense") = false, nb::arg("pull") = false);
  m.def("decode_call", [](uint32_t elements, uint32_t shape) {
    const jaxnvrar::CallDescription call = jaxnvrar::DecodeCall(jaxnvrar::CallSignature{elements, shape});
    return jaxnvrar::CallDict(call, call.dtype);
  });
  m.def("half_stride", &jaxnvrar::HalfStride, nb::arg("workspace_bytes"));
  m.def("cell_check", &jaxnvrar::CellCheck, nb::arg("data"), nb::arg("flag"), nb::arg("half"));
  m.def("grouping_bytes", &jaxnvrar::GroupingBytes, nb::arg("workspace_bytes"), nb::arg("groupings"));
  // The workspace bytes [begin, end) that call number `calls` of a kernel's layout uses.
  m.def("call_half_span", [](int64_t num_elements, int64_t itemsize, int32_t num_ranks, int32_t gpus_per_node,
                             bool one_shot, bool bulk, int64_t workspace_bytes, uint64_t calls) {
    const jaxnvrar::Layout l = jaxnvrar::KernelLayout(num_elements, itemsize, num_ranks, gpus_per_node, one_shot, bulk,
                                                      workspace_bytes);
    return std::make_pair(l.Half(calls), l.Half(calls) + l.half_bytes);
  });
  m.def("workspace_bytes_needed", &jaxnvrar::WorkspaceBytesNeeded, nb::arg("num_elements"),
        nb::arg("itemsize"), nb::arg("num_ranks"), nb::arg("gpus_per_node"), nb::arg("one_shot") = false,
        nb::arg("bulk") = false);
}

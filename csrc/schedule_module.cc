// The CPU extension: exposes csrc/schedule.h to Python so tests can check that the
// kernel's schedule is the one jaxnvrar/schedule.py defines.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>

#include "schedule.h"

namespace nb = nanobind;

NB_MODULE(_jaxnvrar_cpu, m) {
  m.doc() = "C++ twin of jaxnvrar.schedule (the schedule the CUDA kernel follows)";
  m.def("slice_of", [](int64_t num_elements, int32_t num_slices, int64_t align, int32_t index) {
    jaxnvrar::SliceBounds b = jaxnvrar::SliceOf(num_elements, num_slices, align, index);
    return std::make_pair(b.begin, b.end);
  });
  m.def("num_inter_node_steps", &jaxnvrar::NumInterNodeSteps);
  m.def("inter_node_step", [](int32_t node, int32_t num_nodes, int32_t step) {
    jaxnvrar::InterNodeStep s = jaxnvrar::InterNodeStepOf(node, num_nodes, step);
    return std::make_pair(s.op, s.peer);
  });
  m.def("slice_capacity_elements", &jaxnvrar::SliceCapacityElements);
  m.def("workspace_bytes_needed", &jaxnvrar::WorkspaceBytesNeeded, nb::arg("num_elements"),
        nb::arg("itemsize"), nb::arg("num_ranks"), nb::arg("gpus_per_node"), nb::arg("one_shot") = false,
        nb::arg("bulk") = false);
}

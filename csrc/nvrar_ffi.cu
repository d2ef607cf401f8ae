// XLA FFI handler for the NVRAR all-reduce, and the nanobind module `_jaxnvrar_cuda`
// that registers it and drives the NVSHMEM runtime.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <cstdlib>
#include <stdexcept>
#include <string>

#include "nvrar_bulk_kernel.cuh"
#include "nvrar_kernel.cuh"
#include "nvshmem_runtime.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace nb = nanobind;

namespace jaxnvrar {
namespace {

// The dtype's code in a CallSignature.
uint32_t DtypeCode(ffi::DataType dtype) {
  return dtype == ffi::F32 ? 1u : dtype == ffi::BF16 ? 2u : 3u;
}

template <typename T>
void Launch(cudaStream_t stream, const KernelArgs& args, const Layout& layout, int64_t blocks, bool bulk) {
  if (bulk) {
    NvrarBulkKernel<T><<<static_cast<unsigned>(blocks), kThreadsPerBlock, 0, stream>>>(args, layout);
  } else {
    NvrarAllReduceKernel<T><<<static_cast<unsigned>(blocks), kThreadsPerBlock, 0, stream>>>(args, layout);
  }
}

// Decodes the call, maps the axis onto NVSHMEM PEs and launches one kernel. Host work is
// a few lookups; inside a command buffer it runs only when XLA records the graph.
ffi::Error AllReduceImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                         int32_t num_ranks, int32_t gpus_per_node, int32_t max_blocks, int32_t one_shot, int32_t bulk,
                         int32_t check_calls, ffi::Span<const int32_t> pe_groups) {
  const Runtime& rt = GetRuntime();
  if (!rt.initialized) {
    return ffi::Error::Internal("jaxnvrar: the NVSHMEM runtime is not initialised; call jaxnvrar.initialize()");
  }
  const ffi::DataType dtype = x.element_type();
  if (dtype != ffi::F32 && dtype != ffi::BF16 && dtype != ffi::F16) {
    return ffi::Error::InvalidArgument("jaxnvrar: all_reduce supports float32, bfloat16, float16");
  }
  if (y->element_type() != dtype || y->element_count() != x.element_count()) {
    return ffi::Error::InvalidArgument("jaxnvrar: output must match the input's shape and dtype");
  }
  if (num_ranks < 1 || gpus_per_node < 1 || num_ranks % gpus_per_node != 0 ||
      gpus_per_node > kMaxGpusPerNode) {
    return ffi::Error::InvalidArgument("jaxnvrar: bad topology: " + std::to_string(num_ranks) +
                                       " ranks, " + std::to_string(gpus_per_node) + " per node (at most " +
                                       std::to_string(kMaxGpusPerNode) + ")");
  }
  if (max_blocks < 1) return ffi::Error::InvalidArgument("jaxnvrar: max_blocks must be >= 1");
  if (one_shot && (num_ranks != gpus_per_node || num_ranks < 2)) {
    return ffi::Error::InvalidArgument("jaxnvrar: a one-shot launch needs one node of several GPUs");
  }
  if (bulk && max_blocks > kBulkMaxBlocks) {
    return ffi::Error::InvalidArgument("jaxnvrar: a bulk launch takes at most " + std::to_string(kBulkMaxBlocks) +
                                       " blocks");
  }
  if (static_cast<int64_t>(pe_groups.size()) != static_cast<int64_t>(rt.num_pes) * num_ranks) {
    return ffi::Error::InvalidArgument(
        "jaxnvrar: the program was lowered for " + std::to_string(pe_groups.size() / num_ranks) +
        " processes, but NVSHMEM has " + std::to_string(rt.num_pes) + " PEs");
  }
  const int64_t n = static_cast<int64_t>(x.element_count());
  const int64_t itemsize = static_cast<int64_t>(ffi::ByteWidth(dtype));
  if (n == 0) return ffi::Error::Success();
  if (num_ranks == 1) {
    if (cudaMemcpyAsync(y->untyped_data(), x.untyped_data(), n * itemsize, cudaMemcpyDeviceToDevice,
                        stream) != cudaSuccess) {
      return ffi::Error::Internal("jaxnvrar: cudaMemcpyAsync failed");
    }
    return ffi::Error::Success();
  }
  const int64_t needed = WorkspaceBytesNeeded(n, itemsize, num_ranks, gpus_per_node, one_shot != 0, bulk != 0);
  if (needed > rt.workspace_bytes) {
    return ffi::Error::InvalidArgument(
        "jaxnvrar: message needs " + std::to_string(needed) + " bytes of workspace, have " +
        std::to_string(rt.workspace_bytes) + "; raise JAXNVRAR_WORKSPACE_BYTES");
  }

  // My axis group: the PEs of the ranks of my axis, in axis order.
  const int32_t* group = pe_groups.begin() + static_cast<int64_t>(rt.my_pe) * num_ranks;
  int32_t my_rank = -1;
  for (int32_t r = 0; r < num_ranks; ++r) {
    if (group[r] == rt.my_pe) my_rank = r;
  }
  if (my_rank < 0) {
    return ffi::Error::Internal("jaxnvrar: this PE is not in its own axis group (mesh/process mismatch)");
  }
  const int32_t num_nodes = num_ranks / gpus_per_node;
  KernelArgs args = {};
  args.input = x.untyped_data();
  args.output = y->untyped_data();
  args.num_elements = n;
  // One-shot: a single slice, the whole message. Units: LL cells, or (bulk) 16-byte chunks.
  const Layout layout = MakeLayout(n, itemsize, num_ranks, gpus_per_node, one_shot != 0, bulk != 0);
  args.slice_cells = layout.slice_units;
  args.slice_stride = layout.slice_stride;
  args.one_shot = one_shot != 0;
  args.workspace = rt.workspace;
  args.node = my_rank / gpus_per_node;
  args.local = my_rank % gpus_per_node;
  args.gpus_per_node = gpus_per_node;
  args.num_steps = NumInterNodeSteps(num_nodes);
  args.signature.elements = static_cast<uint32_t>(n);
  const uint32_t launch_bits = (one_shot ? kLaunchOneShot : 0u) | (bulk ? kLaunchBulk : 0u);
  args.signature.shape = DtypeCode(dtype) << 28 | launch_bits << 24 | static_cast<uint32_t>(gpus_per_node) << 16 |
                         (static_cast<uint32_t>(num_nodes) & 0xFFFFu);
  args.check_calls = check_calls;
  args.timeout_ns = rt.timeout_ns;
  args.timeout_record = rt.timeout_device;
  if (args.num_steps > kMaxInterNodeSteps) {
    return ffi::Error::InvalidArgument("jaxnvrar: too many nodes");
  }
  for (int32_t l = 0; l < gpus_per_node; ++l) {
    const int32_t pe = group[args.node * gpus_per_node + l];
    args.node_peers[l] = static_cast<char*>(nvshmem_ptr(rt.workspace, pe));
    if (args.node_peers[l] == nullptr) {
      return ffi::Error::InvalidArgument(
          "jaxnvrar: gpus_per_node=" + std::to_string(gpus_per_node) + " puts PE " +
          std::to_string(pe) + " in this GPU's node, but it is not reachable by NVLink/P2P loads "
          "and stores; pass the real number of GPUs per host as gpus_per_node");
    }
  }
  for (int32_t s = 0; s < args.num_steps; ++s) {
    const InterNodeStep step = InterNodeStepOf(args.node, num_nodes, s);
    args.inter_op[s] = step.op;
    args.inter_peer_node[s] = step.peer;
    if (step.op == kIdle) continue;
    const int32_t pe = group[step.peer * gpus_per_node + args.local];
    args.inter_peer_pe[s] = pe;
    args.inter_peer_ptr[s] = rt.force_put ? nullptr : static_cast<char*>(nvshmem_ptr(rt.workspace, pe));
  }
  // One cell per thread up to max_blocks blocks; past that, threads take several cells.
  int64_t blocks = CeilDiv(args.slice_cells, kThreadsPerBlock);
  blocks = blocks < 1 ? 1 : (blocks > max_blocks ? max_blocks : blocks);
  switch (dtype) {
    case ffi::F32: Launch<float>(stream, args, layout, blocks, bulk != 0); break;
    case ffi::BF16: Launch<__nv_bfloat16>(stream, args, layout, blocks, bulk != 0); break;
    default: Launch<__half>(stream, args, layout, blocks, bulk != 0); break;
  }
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    return ffi::Error::Internal(std::string("jaxnvrar: kernel launch failed: ") + cudaGetErrorString(status));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NvrarAllReduce, AllReduceImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("num_ranks")
                                  .Attr<int32_t>("gpus_per_node")
                                  .Attr<int32_t>("max_blocks")
                                  .Attr<int32_t>("one_shot")
                                  .Attr<int32_t>("bulk")
                                  .Attr<int32_t>("check_calls")
                                  .Attr<ffi::Span<const int32_t>>("pe_groups"),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jaxnvrar

NB_MODULE(_jaxnvrar_cuda, m) {
  m.doc() = "jaxnvrar's CUDA/NVSHMEM part: the NVRAR XLA FFI handler and its runtime";
  m.def("registrations", []() {
    nb::dict targets;
    targets["jaxnvrar_nvrar_all_reduce"] =
        nb::capsule(reinterpret_cast<void*>(&jaxnvrar::NvrarAllReduce));
    return targets;
  });
  m.def("initialize", &jaxnvrar::InitializeRuntime, nb::arg("workspace_bytes"),
        nb::arg("timeout_seconds"), nb::arg("force_put"), nb::arg("first_call") = 0);
  m.def("finalize", &jaxnvrar::FinalizeRuntime);
  m.def("last_timeout", []() -> nb::object {
    const jaxnvrar::TimeoutRecord* r = jaxnvrar::GetRuntime().timeout_host;
    if (r == nullptr || !r->set) return nb::none();
    nb::dict d;
    const char* phases[] = {"intra-node reduce-scatter", "inter-node step", "intra-node all-gather",
                            "signature check"};
    d["kind"] = r->kind == jaxnvrar::kFailureMismatch ? "mismatch" : "timeout";
    d["node"] = r->node;
    d["local"] = r->local;
    d["phase"] = phases[r->phase];
    d["step"] = r->step;
    d["peer"] = r->peer;
    d["flag"] = r->flag;
    d["mine"] = nb::make_tuple(r->my_elements, r->my_shape);
    d["peer_call"] = nb::make_tuple(r->peer_elements, r->peer_shape);
    return d;
  });
  m.def("my_pe", []() { return jaxnvrar::GetRuntime().my_pe; });
  m.def("num_pes", []() { return jaxnvrar::GetRuntime().num_pes; });
}

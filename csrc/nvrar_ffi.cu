// XLA FFI handlers of the NVRAR all-reduce and of the fused all-reduce + residual add + RMSNorm
// (all_reduce_rms_norm), and the nanobind module `_jaxnvrar_cuda` that registers them and drives
// the NVSHMEM runtime.
//
// A call does only what changes per call. At XLA's instantiate stage, once per call site, the
// attributes are validated and the site planned: its topology, my place in it, the peers'
// workspaces. The site's first execute completes the plan with what the buffers fix (their dtype
// and size never change for a site): workspace layout, call signature, grid, kernel. Every
// execute then checks its buffers against the plan and launches: the same device work on every
// call and on every replay of a command buffer.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstddef>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "all_reduce_kernel.cuh"
#include "decode_attention.h"
#include "nvshmem_runtime.h"
#include "protocol_bulk.cuh"
#include "protocol_dense.cuh"
#include "protocol_ll.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace nb = nanobind;

namespace jaxnvrar {
namespace {

using KernelFn = void (*)(KernelArgs, Layout);

// A protocol's kernels, one per dtype (plain, and ending in the fused add + RMSNorm), and the
// workspace layout they expect.
struct Protocol {
  bool bulk_layout;
  bool pull;                // the reduce-scatter reads peers' staged slices (call signatures say so)
  int64_t unit_data_bytes;  // data bytes of a unit: a row of the fused norm is whole units
  KernelFn float32, bfloat16, float16;
  KernelFn float32_norm, bfloat16_norm, float16_norm;

  KernelFn Kernel(ffi::DataType dtype, bool fused_norm) const {
    if (dtype == ffi::F32) return fused_norm ? float32_norm : float32;
    if (dtype == ffi::BF16) return fused_norm ? bfloat16_norm : bfloat16;
    return fused_norm ? float16_norm : float16;
  }
};

template <typename P>
Protocol ProtocolOf() {
  return Protocol{P::kBulkLayout,
                  P::kPullReduceScatter,
                  sizeof(typename P::Unit),
                  AllReduceKernel<float, P, false>,
                  AllReduceKernel<__nv_bfloat16, P, false>,
                  AllReduceKernel<__half, P, false>,
                  AllReduceKernel<float, P, true>,
                  AllReduceKernel<__nv_bfloat16, P, true>,
                  AllReduceKernel<__half, P, true>};
}

// The protocol a call site asked for (the lowering's `bulk`: 0 LL; 1 bulk; 2 dense, whose sites
// run the flagged bulk kernel where the dense one cannot; 3 bulk with a pulled reduce-scatter):
// a new protocol is its header and its line here.
Protocol SelectProtocol(int32_t bulk) {
  return bulk == 3 ? ProtocolOf<PullBulkProtocol>() : bulk ? ProtocolOf<BulkProtocol>() : ProtocolOf<LLProtocol>();
}

DtypeCode DtypeCodeOf(ffi::DataType dtype) {
  return dtype == ffi::F32 ? kDtypeFloat32 : dtype == ffi::BF16 ? kDtypeBFloat16 : kDtypeFloat16;
}

std::string DtypeName(uint32_t code) {
  switch (code) {
    case kDtypeFloat32: return "float32";
    case kDtypeBFloat16: return "bfloat16";
    case kDtypeFloat16: return "float16";
    default: return "dtype#" + std::to_string(code);
  }
}

// Everything about a call site that never changes; XLA keeps it as the site's state.
struct CallSitePlan {
  static ffi::TypeId id;

  // At instantiate, from the attributes and the runtime.
  int32_t num_ranks = 0;
  int32_t num_nodes = 0;
  int32_t max_blocks = 0;
  bool one_shot = false;
  bool bulk = false;
  bool fused_norm = false;  // all_reduce_rms_norm's site
  Protocol protocol = {};
  KernelArgs args = {};  // all but the buffers and what their size decides

  // At the first execute, from the buffers.
  std::once_flag sized;
  ffi::Error sized_error;
  ffi::DataType dtype = ffi::DataType::INVALID;
  int64_t elements = 0;
  enum class Work { kNothing, kCopy, kKernel } work = Work::kNothing;
  KernelFn kernel = nullptr;
  Layout layout = {};
  unsigned blocks = 0;
};
ffi::TypeId CallSitePlan::id = {};

ffi::Error NotInitialized() {
  return ffi::Error::Internal("jaxnvrar: the NVSHMEM runtime is not initialised; call jaxnvrar.initialize()");
}

// Validate the attributes, as the lowering passed them.
ffi::Error ValidateAttributes(const Runtime& rt, int32_t num_ranks, int32_t gpus_per_node, int32_t max_blocks,
                              int32_t one_shot, int32_t bulk, int32_t grouping, ffi::Span<const int32_t> pe_groups) {
  if (!rt.initialized) return NotInitialized();
  if (grouping < 0 || grouping >= rt.groupings) {
    return ffi::Error::InvalidArgument("jaxnvrar: the program was lowered for workspace region " +
                                       std::to_string(grouping) + ", but the runtime has " +
                                       std::to_string(rt.groupings) + " (JAXNVRAR_GROUPINGS)");
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
  if (bulk < 0 || bulk > 3 || (bulk == 2 && (num_ranks != gpus_per_node || num_ranks < 2))) {
    return ffi::Error::InvalidArgument(
        "jaxnvrar: bulk must be 0 (LL), 1 (bulk), 2 (dense: one node of 2+ GPUs) or 3 (bulk, pulled reduce-scatter)");
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
  return ffi::Error::Success();
}

// The dense kernel's inboxes alternate by the parity of a dense call counter in a region's header,
// which is sound only if every dense call this process makes has the same peers and counter (a
// call with other peers would let a peer run two calls ahead). The first dense site's axis group
// and workspace region claim them; sites of other groups or regions fall back to the flagged bulk
// kernel. Every rank of a group decides alike where all plan their dense sites in the same order
// (an SPMD program); the call signature's dense bit catches the rest.
bool UsesDenseInboxes(const int32_t* group, int32_t num_ranks, int32_t grouping) {
  Runtime& rt = GetRuntime();
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  const std::vector<int32_t> mine(group, group + num_ranks);
  if (rt.dense_group.empty()) {
    rt.dense_group = mine;
    rt.dense_grouping = grouping;
  }
  return rt.dense_group == mine && rt.dense_grouping == grouping;
}

// Plan a call site from its attributes: maps the axis onto NVSHMEM PEs, finds my node, my
// local index, the workspaces of my node's GPUs and my inter-node steps.
ffi::ErrorOr<std::unique_ptr<CallSitePlan>> PlanCallSite(int32_t num_ranks, int32_t gpus_per_node, int32_t max_blocks,
                                                         int32_t one_shot, int32_t bulk, int32_t check_calls,
                                                         int32_t grouping, ffi::Span<const int32_t> pe_groups,
                                                         bool fused_norm, float eps) {
  const Runtime& rt = GetRuntime();
  if (ffi::Error error =
          ValidateAttributes(rt, num_ranks, gpus_per_node, max_blocks, one_shot, bulk, grouping, pe_groups);
      error.failure()) {
    return ffi::Unexpected(error);
  }
  auto plan = std::make_unique<CallSitePlan>();
  plan->num_ranks = num_ranks;
  plan->num_nodes = num_ranks / gpus_per_node;
  plan->max_blocks = max_blocks;
  plan->one_shot = one_shot != 0;
  plan->bulk = bulk != 0;
  plan->protocol = SelectProtocol(bulk);
  plan->fused_norm = fused_norm;
  plan->args.norm.eps = eps;
  if (num_ranks == 1) {
    if (fused_norm) {  // the Python side never lowers it so: the add and norm have no copy path
      return ffi::Unexpected(ffi::Error::InvalidArgument("jaxnvrar: all_reduce_rms_norm's kernel needs 2+ ranks"));
    }
    return std::move(plan);  // a copy: no peers
  }

  // My axis group: the PEs of the ranks of my axis, in axis order.
  const int32_t* group = pe_groups.begin() + static_cast<int64_t>(rt.my_pe) * num_ranks;
  int32_t my_rank = -1;
  for (int32_t r = 0; r < num_ranks; ++r) {
    if (group[r] == rt.my_pe) my_rank = r;
  }
  if (my_rank < 0) {
    return ffi::Unexpected(
        ffi::Error::Internal("jaxnvrar: this PE is not in its own axis group (mesh/process mismatch)"));
  }
  KernelArgs& args = plan->args;
  args.one_shot = plan->one_shot;
  // The region of this site's grouping (the lowering's `grouping`), at the same offset on every PE.
  const int64_t region = static_cast<int64_t>(grouping) * rt.grouping_bytes;
  args.workspace = rt.workspace + region;
  args.grouping = grouping;
  args.node = my_rank / gpus_per_node;
  args.local = my_rank % gpus_per_node;
  args.gpus_per_node = gpus_per_node;
  args.num_steps = NumInterNodeSteps(plan->num_nodes);
  args.check_calls = check_calls;
  args.timeout_ns = rt.timeout_ns;
  args.timeout_record = rt.timeout_device;
  args.timing = rt.timing;
  if (args.num_steps > kMaxInterNodeSteps) {
    return ffi::Unexpected(ffi::Error::InvalidArgument("jaxnvrar: too many nodes"));
  }
  for (int32_t l = 0; l < gpus_per_node; ++l) {
    const int32_t pe = group[args.node * gpus_per_node + l];
    args.node_peers[l] = static_cast<char*>(nvshmem_ptr(rt.workspace, pe));
    if (args.node_peers[l] != nullptr) args.node_peers[l] += region;
    if (args.node_peers[l] == nullptr) {
      return ffi::Unexpected(ffi::Error::InvalidArgument(
          "jaxnvrar: gpus_per_node=" + std::to_string(gpus_per_node) + " puts PE " + std::to_string(pe) +
          " in this GPU's node, but it is not reachable by NVLink/P2P loads and stores; pass the real number "
          "of GPUs per host as gpus_per_node"));
    }
  }
  // A dense site (bulk == 2, one node; PlanBuffers decides by size) gets the dense inboxes, if its axis
  // group is the one that uses them; else it runs as one-shot bulk.
  if (bulk == 2 && !fused_norm && rt.dense != nullptr && UsesDenseInboxes(group, num_ranks, grouping)) {
    args.dense = rt.dense;
    args.dense_inbox_bytes = DenseInboxBytes(rt.dense_bytes, gpus_per_node, plan->one_shot);
    for (int32_t l = 0; l < gpus_per_node && args.dense != nullptr; ++l) {
      args.dense_peers[l] = static_cast<char*>(nvshmem_ptr(rt.dense, group[args.node * gpus_per_node + l]));
      if (args.dense_peers[l] == nullptr) args.dense = nullptr;
    }
  }
  for (int32_t s = 0; s < args.num_steps; ++s) {
    const InterNodeStep step = InterNodeStepOf(args.node, plan->num_nodes, s);
    args.inter_op[s] = step.op;
    args.inter_peer_node[s] = step.peer;
    if (step.op == kIdle) continue;
    const int32_t pe = group[step.peer * gpus_per_node + args.local];
    args.inter_peer_pe[s] = pe;
    char* direct = rt.force_put ? nullptr : static_cast<char*>(nvshmem_ptr(rt.workspace, pe));
    args.inter_peer_ptr[s] = direct == nullptr ? nullptr : direct + region;
  }
  return std::move(plan);
}

ffi::ErrorOr<std::unique_ptr<CallSitePlan>> Instantiate(int32_t num_ranks, int32_t gpus_per_node, int32_t max_blocks,
                                                        int32_t one_shot, int32_t bulk, int32_t check_calls,
                                                        int32_t grouping, ffi::Span<const int32_t> pe_groups) {
  return PlanCallSite(num_ranks, gpus_per_node, max_blocks, one_shot, bulk, check_calls, grouping, pe_groups,
                      /*fused_norm=*/false, 0.0f);
}

// Validate the first call's buffers and complete the plan with what they fix: the work of
// every call of the site.
ffi::Error PlanBuffers(CallSitePlan& plan, const ffi::AnyBuffer& x, ffi::DataType y_dtype, int64_t y_elements) {
  const ffi::DataType dtype = x.element_type();
  if (dtype != ffi::F32 && dtype != ffi::BF16 && dtype != ffi::F16) {
    return ffi::Error::InvalidArgument("jaxnvrar: all_reduce supports float32, bfloat16, float16");
  }
  if (y_dtype != dtype || y_elements != static_cast<int64_t>(x.element_count())) {
    return ffi::Error::InvalidArgument("jaxnvrar: output must match the input's shape and dtype");
  }
  const int64_t n = static_cast<int64_t>(x.element_count());
  plan.dtype = dtype;
  plan.elements = n;
  if (n == 0) return ffi::Error::Success();
  if (plan.num_ranks == 1) {
    plan.work = CallSitePlan::Work::kCopy;
    return ffi::Error::Success();
  }
  const Runtime& rt = GetRuntime();
  const int64_t itemsize = static_cast<int64_t>(ffi::ByteWidth(dtype));
  KernelArgs& args = plan.args;
  const int32_t g = args.gpus_per_node;
  const bool bulk_layout = plan.protocol.bulk_layout;
  const int64_t needed = WorkspaceBytesNeeded(n, itemsize, plan.num_ranks, g, plan.one_shot, bulk_layout);
  if (needed > rt.grouping_bytes) {
    return ffi::Error::InvalidArgument(
        "jaxnvrar: message needs " + std::to_string(needed) + " bytes of workspace, have " +
        std::to_string(rt.grouping_bytes) + " (the workspace over JAXNVRAR_GROUPINGS=" + std::to_string(rt.groupings) +
        "); raise JAXNVRAR_WORKSPACE_BYTES");
  }
  // One-shot: a single slice, the whole message. Units: LL cells, or (bulk) 16-byte chunks.
  plan.layout = KernelLayout(n, itemsize, plan.num_ranks, g, plan.one_shot, bulk_layout, rt.grouping_bytes);
  args.num_elements = n;
  args.slice_units = plan.layout.slice_units;
  args.slice_stride = plan.layout.slice_stride;
  // One unit per thread up to max_blocks blocks; past that, threads take several units.
  int64_t blocks = CeilDiv(args.slice_units, kThreadsPerBlock);
  blocks = blocks < 1 ? 1 : (blocks > plan.max_blocks ? plan.max_blocks : blocks);
  plan.blocks = static_cast<unsigned>(blocks);
  plan.kernel = plan.protocol.Kernel(dtype, plan.fused_norm);
  // A dense site whose slices fit the dense inboxes: the dense kernel (no flags, no fences; the
  // same sums, so the same bits). Larger messages run the flagged bulk kernel.
  const bool dense = args.dense != nullptr && args.slice_units * kChunkBytes <= args.dense_inbox_bytes;
  if (dense) {
    plan.kernel = dtype == ffi::F32 ? DenseKernel<float> : dtype == ffi::BF16 ? DenseKernel<__nv_bfloat16>
                                                                               : DenseKernel<__half>;
  }
  args.signature =
      EncodeCall(n, DtypeCodeOf(dtype), plan.one_shot, plan.bulk, g, plan.num_nodes, plan.fused_norm, dense,
                 plan.protocol.pull);  // from the kernels chosen, so a signature never claims another protocol
  plan.work = CallSitePlan::Work::kKernel;
  return ffi::Error::Success();
}

// A fused launch other than one-shot meets at a grid barrier: at most this many blocks, on every
// rank alike (two blocks of 512 threads per SM fit on any Hopper GPU: 228+ resident).
constexpr unsigned kFusedNormMaxBlocks = 128;

// The kernel loads and stores whole units (8 bytes LL, 16 bulk; 16 in the fused epilogue):
// XLA's buffers are aligned, unless a fusion hands the call a slice of a larger one.
bool Aligned(const void* p, int64_t bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

ffi::Error Misaligned(int64_t bytes) {
  return ffi::Error::InvalidArgument("jaxnvrar: a buffer of the call is not " + std::to_string(bytes) +
                                     "-byte aligned (a slice of a larger array?); pass a whole array, or use "
                                     "algorithm='psum'");
}

// A fused site (all_reduce_rms_norm), after PlanBuffers: its other buffers, and the grid that
// its epilogue needs.
ffi::Error PlanFusedNorm(CallSitePlan& plan, const ffi::AnyBuffer& residual, const ffi::AnyBuffer& weight) {
  const ffi::DataType dtype = plan.dtype;
  if (residual.element_type() != dtype || weight.element_type() != dtype) {
    return ffi::Error::InvalidArgument("jaxnvrar: all_reduce_rms_norm's kernel takes x, residual and weight of one dtype");
  }
  const int64_t n = plan.elements;
  const int64_t hidden = static_cast<int64_t>(weight.element_count());
  const int64_t itemsize = static_cast<int64_t>(ffi::ByteWidth(dtype));
  if (static_cast<int64_t>(residual.element_count()) != n || hidden < 1 || n % hidden != 0 || (hidden * itemsize) % kChunkBytes != 0) {
    return ffi::Error::InvalidArgument(
        "jaxnvrar: all_reduce_rms_norm's kernel needs x and residual of shape [..., hidden], weight [hidden], "
        "and rows of whole 16-byte vectors");
  }
  if (plan.work != CallSitePlan::Work::kKernel) return ffi::Error::Success();
  KernelArgs& args = plan.args;
  NormArgs& norm = args.norm;
  norm.hidden = hidden;
  norm.rows = n / hidden;
  if (plan.one_shot) {
    // Each block sums whole rows, then normalizes them: no grid barrier.
    norm.rows_per_block = CeilDiv(norm.rows, plan.max_blocks);
    args.block_units = norm.rows_per_block * (hidden * itemsize / plan.protocol.unit_data_bytes);
    // LL rows of at most 16 KB stay in registers from the peers' cells to the stores (SumAndNormRows).
    norm.in_registers = !plan.bulk && hidden * itemsize <= kThreadsPerBlock * kRowBytesPerThread;
    plan.blocks = static_cast<unsigned>(CeilDiv(norm.rows, norm.rows_per_block));
    return ffi::Error::Success();
  }
  // Rows span slices and blocks: every block waits for all others at a grid barrier, so all
  // must be resident at once. The cap is a constant, not this GPU's occupancy: every rank must
  // launch the same grid (the bulk protocol's flags are per block); this GPU must hold it.
  if (plan.blocks > kFusedNormMaxBlocks) plan.blocks = kFusedNormMaxBlocks;
  int device = 0, sms = 0, per_sm = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, reinterpret_cast<const void*>(plan.kernel),
                                                    kThreadsPerBlock, 0) != cudaSuccess) {
    return ffi::Error::Internal("jaxnvrar: cannot size the fused kernel's grid (CUDA occupancy query failed)");
  }
  if (static_cast<int64_t>(sms) * per_sm < plan.blocks) {
    return ffi::Error::InvalidArgument(
        "jaxnvrar: all_reduce_rms_norm's kernel needs " + std::to_string(plan.blocks) +
        " resident blocks for its grid barrier, this GPU holds " + std::to_string(sms * per_sm) +
        "; lower JAXNVRAR_MAX_BLOCKS or leave JAXNVRAR_FUSED_NORM unset");
  }
  return ffi::Error::Success();
}

// A buffer of a call is of the dtype and size its site was planned for (they never change).
bool AsPlanned(const CallSitePlan& plan, const ffi::AnyBuffer& buffer) {
  return buffer.element_type() == plan.dtype && static_cast<int64_t>(buffer.element_count()) == plan.elements;
}

ffi::Error BuffersChanged() {
  return ffi::Error::Internal("jaxnvrar: a call site's buffers changed dtype or size after its first call");
}

// Launch the planned work on this call's buffers (a fused site's `norm` holds its other buffers).
ffi::Error Launch(cudaStream_t stream, const CallSitePlan& plan, const void* input, void* output,
                  const NormArgs* norm = nullptr) {
  switch (plan.work) {
    case CallSitePlan::Work::kNothing:
      return ffi::Error::Success();
    case CallSitePlan::Work::kCopy:
      if (cudaMemcpyAsync(output, input, plan.elements * static_cast<int64_t>(ffi::ByteWidth(plan.dtype)),
                          cudaMemcpyDeviceToDevice, stream) != cudaSuccess) {
        return ffi::Error::Internal("jaxnvrar: cudaMemcpyAsync failed");
      }
      return ffi::Error::Success();
    case CallSitePlan::Work::kKernel:
      break;
  }
  KernelArgs args = plan.args;
  args.input = input;
  args.output = output;
  if (norm != nullptr) args.norm = *norm;
  plan.kernel<<<plan.blocks, kThreadsPerBlock, 0, stream>>>(args, plan.layout);
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    return ffi::Error::Internal(std::string("jaxnvrar: kernel launch failed: ") + cudaGetErrorString(status));
  }
  return ffi::Error::Success();
}

// One call: the runtime must still be up (finalize() ends it), the buffers those the plan was
// made for; then launch. Host work is a few comparisons and a launch; inside a command buffer it
// runs only when XLA records the graph.
ffi::Error Execute(cudaStream_t stream, CallSitePlan* plan, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  if (!GetRuntime().initialized) return NotInitialized();
  std::call_once(plan->sized, [&] {
    plan->sized_error = PlanBuffers(*plan, x, y->element_type(), static_cast<int64_t>(y->element_count()));
  });
  if (plan->sized_error.failure()) return plan->sized_error;
  if (!AsPlanned(*plan, x) || !AsPlanned(*plan, *y)) return BuffersChanged();
  const int64_t unit = plan->protocol.unit_data_bytes;
  const bool aligned = Aligned(x.untyped_data(), unit) && Aligned(y->untyped_data(), unit);
  if (plan->work == CallSitePlan::Work::kKernel && !aligned) return Misaligned(unit);
  return Launch(stream, *plan, x.untyped_data(), y->untyped_data());
}

ffi::ErrorOr<std::unique_ptr<CallSitePlan>> InstantiateFusedNorm(int32_t num_ranks, int32_t gpus_per_node,
                                                                 int32_t max_blocks, int32_t one_shot, int32_t bulk,
                                                                 int32_t check_calls, int32_t grouping,
                                                                 ffi::Span<const int32_t> pe_groups, float eps) {
  return PlanCallSite(num_ranks, gpus_per_node, max_blocks, one_shot, bulk, check_calls, grouping, pe_groups,
                      /*fused_norm=*/true, eps);
}

// One all_reduce_rms_norm call: residual_out = residual + sum(x), normed = RMSNorm(residual_out)
// * weight, both in ONE result [2, ...x's shape] (normed, then residual_out): XLA's dynamic-slice
// fusion copies a side-effecting call with a tuple result without removing it (it ran twice).
// The all-reduce leaves the sum in residual_out; the kernel's epilogue finishes both.
ffi::Error ExecuteFusedNorm(cudaStream_t stream, CallSitePlan* plan, ffi::AnyBuffer x, ffi::AnyBuffer residual,
                            ffi::AnyBuffer weight, ffi::Result<ffi::AnyBuffer> out) {
  if (!GetRuntime().initialized) return NotInitialized();
  std::call_once(plan->sized, [&] {
    const int64_t both = static_cast<int64_t>(out->element_count());
    plan->sized_error = both % 2 ? ffi::Error::InvalidArgument("jaxnvrar: all_reduce_rms_norm's result must be [2, ...]")
                                 : PlanBuffers(*plan, x, out->element_type(), both / 2);
    if (plan->sized_error.success()) plan->sized_error = PlanFusedNorm(*plan, residual, weight);
  });
  if (plan->sized_error.failure()) return plan->sized_error;
  if (plan->work != CallSitePlan::Work::kKernel) {  // before the buffers: an empty plan has no norm sizes
    return ffi::Error::Internal("jaxnvrar: all_reduce_rms_norm's kernel needs a non-empty message over 2+ ranks");
  }
  if (!AsPlanned(*plan, x) || !AsPlanned(*plan, residual) || out->element_type() != plan->dtype ||
      static_cast<int64_t>(out->element_count()) != 2 * plan->elements || weight.element_type() != plan->dtype ||
      static_cast<int64_t>(weight.element_count()) != plan->args.norm.hidden) {
    return BuffersChanged();
  }
  for (const void* p : {x.untyped_data(), residual.untyped_data(), weight.untyped_data(), out->untyped_data()}) {
    if (!Aligned(p, kChunkBytes)) return Misaligned(kChunkBytes);
  }
  char* normed = static_cast<char*>(out->untyped_data());
  char* residual_out = normed + plan->elements * static_cast<int64_t>(ffi::ByteWidth(plan->dtype));  // 16-byte rows
  NormArgs norm = plan->args.norm;
  norm.residual = residual.untyped_data();
  norm.weight = weight.untyped_data();
  norm.normed = normed;
  return Launch(stream, *plan, x.untyped_data(), residual_out, &norm);
}

// A call signature from a failure record, decoded for Python.
nb::dict DescribeCall(uint32_t elements, uint32_t shape) {
  const CallDescription call = DecodeCall(CallSignature{elements, shape});
  return CallDict(call, DtypeName(call.dtype));
}

}  // namespace

// The attributes every call site is lowered with (jaxnvrar/nvrar_ffi.py), in Instantiate's order.
template <typename Binding>
auto WithSiteAttributes(Binding binding) {
  return std::move(binding)  // Attr is for rvalue bindings
      .template Attr<int32_t>("num_ranks")
      .template Attr<int32_t>("gpus_per_node")
      .template Attr<int32_t>("max_blocks")
      .template Attr<int32_t>("one_shot")
      .template Attr<int32_t>("bulk")
      .template Attr<int32_t>("check_calls")
      .template Attr<int32_t>("grouping")
      .template Attr<ffi::Span<const int32_t>>("pe_groups");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(NvrarInstantiate, Instantiate, WithSiteAttributes(ffi::Ffi::BindInstantiate()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NvrarExecute, Execute,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::State<CallSitePlan>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(NvrarFusedNormInstantiate, InstantiateFusedNorm,
                              WithSiteAttributes(ffi::Ffi::BindInstantiate()).Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NvrarFusedNormExecute, ExecuteFusedNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::State<CallSitePlan>>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // residual
                                  .Arg<ffi::AnyBuffer>()  // weight
                                  .Ret<ffi::AnyBuffer>(),  // [normed, residual_out]
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jaxnvrar

NB_MODULE(_jaxnvrar_cuda, m) {
  m.doc() = "jaxnvrar's CUDA/NVSHMEM part: the NVRAR XLA FFI handler and its runtime";
  m.def("registrations", []() {
    // XLA must know the type of the per-call-site state before a handler that makes one.
    static const XLA_FFI_TypeInfo plan_type = ffi::MakeTypeInfo<jaxnvrar::CallSitePlan>();
    nb::dict type;
    type["type_id"] = nb::capsule(&jaxnvrar::CallSitePlan::id);
    type["type_info"] = nb::capsule(&plan_type);
    nb::module_::import_("jax.ffi").attr("register_ffi_type")("jaxnvrar_nvrar_call_site_plan", type,
                                                               nb::arg("platform") = "CUDA");
    nb::dict stages;
    stages["instantiate"] = nb::capsule(reinterpret_cast<void*>(&jaxnvrar::NvrarInstantiate));
    stages["execute"] = nb::capsule(reinterpret_cast<void*>(&jaxnvrar::NvrarExecute));
    nb::dict fused_stages;
    fused_stages["instantiate"] = nb::capsule(reinterpret_cast<void*>(&jaxnvrar::NvrarFusedNormInstantiate));
    fused_stages["execute"] = nb::capsule(reinterpret_cast<void*>(&jaxnvrar::NvrarFusedNormExecute));
    nb::dict targets;
    targets["jaxnvrar_nvrar_all_reduce"] = stages;
    targets["jaxnvrar_nvrar_all_reduce_rms_norm"] = fused_stages;
    return targets;
  });
  m.def("attention_registrations", []() {  // no runtime needed: jaxnvrar/models/llama/attention.py
    nb::dict targets;
    targets["jaxnvrar_decode_attention"] = nb::capsule(reinterpret_cast<void*>(&jaxnvrar::DecodeAttention));
    return targets;
  });
  m.def("attention_stamps", &jaxnvrar::AttentionStamps);
  m.def("attention_shared_bytes", &jaxnvrar::AttentionSharedBytes, nb::arg("group"), nb::arg("computed_rows"),
        nb::arg("rows"), nb::arg("cache_rows"), nb::arg("cache_len"), nb::arg("head_dim"), nb::arg("element_bytes"),
        nb::arg("parts"), nb::arg("slots"), nb::arg("tile_bytes"));
  m.def("initialize", &jaxnvrar::InitializeRuntime, nb::arg("workspace_bytes"),
        nb::arg("timeout_seconds"), nb::arg("force_put"), nb::arg("first_call") = 0, nb::arg("dense_bytes") = 0,
        nb::arg("groupings") = 1);
  m.def("finalize", &jaxnvrar::FinalizeRuntime);
  m.def("enable_timing", &jaxnvrar::EnableTiming);
  m.def("reset_timing", &jaxnvrar::ResetTiming);
  m.def("timing_records", []() {
    // The ring as raw bytes (kTimingRecords x kTimingFields little-endian uint64), or empty.
    if (jaxnvrar::GetRuntime().timing == nullptr) return nb::bytes("", 0);
    std::string words(jaxnvrar::kTimingRecords * jaxnvrar::kTimingFields * sizeof(unsigned long long), '\0');
    jaxnvrar::CopyTiming(reinterpret_cast<unsigned long long*>(words.data()));
    return nb::bytes(words.data(), words.size());
  });
  // Dense kernel calls completed on this GPU (WorkspaceHeader::dense_calls of every grouping's
  // region), once the queued work is done.
  m.def("dense_calls", []() -> uint64_t {
    const jaxnvrar::Runtime& rt = jaxnvrar::GetRuntime();
    if (!rt.initialized) return 0;
    if (cudaDeviceSynchronize() != cudaSuccess) throw std::runtime_error("jaxnvrar: cannot read the dense call counter");
    uint64_t total = 0;
    for (int32_t g = 0; g < rt.groupings; ++g) {
      unsigned long long calls = 0;
      const char* field = rt.workspace + g * rt.grouping_bytes + offsetof(jaxnvrar::WorkspaceHeader, dense_calls);
      if (cudaMemcpy(&calls, field, sizeof(calls), cudaMemcpyDeviceToHost) != cudaSuccess) {
        throw std::runtime_error("jaxnvrar: cannot read the dense call counter");
      }
      total += calls;
    }
    return total;
  });
  m.def("last_timeout", []() -> nb::object {
    const jaxnvrar::TimeoutRecord* r = jaxnvrar::GetRuntime().timeout_host;
    if (r == nullptr || !r->set) return nb::none();
    nb::dict d;
    const char* phases[] = {"intra-node reduce-scatter", "inter-node step", "intra-node all-gather",
                            "signature check", "fused-norm grid barrier"};
    const bool mismatch = r->kind == jaxnvrar::kFailureMismatch;
    d["kind"] = mismatch ? "mismatch" : "timeout";
    d["node"] = r->node;
    d["local"] = r->local;
    d["region"] = r->grouping;
    d["phase"] = phases[r->phase];
    d["step"] = r->step;
    d["peer"] = r->peer;
    d["peer_is_node"] = r->peer_is_node != 0;
    d["flag"] = r->flag;
    d["mine"] = jaxnvrar::DescribeCall(r->my_elements, r->my_shape);
    // Only a mismatch has read the peer's signature.
    d["peer_call"] = mismatch ? nb::object(jaxnvrar::DescribeCall(r->peer_elements, r->peer_shape)) : nb::none();
    return d;
  });
  m.def("my_pe", []() { return jaxnvrar::GetRuntime().my_pe; });
  m.def("num_pes", []() { return jaxnvrar::GetRuntime().num_pes; });
}

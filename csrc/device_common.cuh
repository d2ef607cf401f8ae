// Device code that every protocol of the all-reduce shares (all_reduce_kernel.cuh runs the
// schedule; protocol_*.cuh move the data): the workspace header, what a call is and how peers
// compare it, element codecs and the arithmetic on units (a protocol's vector of elements), the
// 16-byte flagged cells that signatures travel in, the bounded waits and the failure record they
// leave, and the start and end of every call.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "call_signature.h"
#include "nvshmem_runtime.h"
#include "schedule.h"

namespace jaxnvrar {

constexpr int kThreadsPerBlock = 512;  // every protocol launches blocks of this many threads
constexpr int kMaxGpusPerNode = 32;
constexpr int kMaxInterNodeSteps = 16;
// Signature slots: one per sender, local GPUs 0..31, then inter-node steps.
constexpr int kSignatureSlots = kMaxGpusPerNode + kMaxInterNodeSteps;
constexpr int64_t kSignatureOffset = 256;

// Header at the start of each PE's workspace. The counter is only touched by the local GPU;
// peers write their call signatures into the slots (one set per parity half).
struct WorkspaceHeader {
  unsigned long long calls;        // all-reduces completed on this PE
  unsigned int blocks_done;        // blocks of the running call that have finished
  unsigned int timed_out;          // set once a wait gave up (only one thread reports)
  unsigned int norm_arrived;       // blocks at the fused epilogue's grid barrier (rms_norm_epilogue.cuh)
  unsigned int unused;
  unsigned long long dense_calls;  // dense kernel calls completed: the parity of its inboxes (protocol_dense.cuh)
};
static_assert(kSignatureOffset + 2 * kSignatureSlots * kCellBytes <= kWorkspaceHeaderBytes,
              "the signature slots must fit in the workspace header");

// The fused add + RMSNorm of all_reduce_rms_norm (rms_norm_epilogue.cuh); unused otherwise.
struct NormArgs {
  const void* residual;    // x's shape and dtype
  const void* weight;      // [hidden]
  void* normed;            // x's shape and dtype; residual_out is KernelArgs::output
  int64_t hidden;          // elements per row
  int64_t rows;
  int64_t rows_per_block;  // one-shot: each block normalizes the whole rows it summed
  float eps;
  int32_t in_registers;    // one-shot, rows of at most kRowBytesPerThread per thread: SumAndNormRows
};
// A thread keeps this many bytes of a row in registers in SumAndNormRows (rows up to 16 KB).
constexpr int64_t kRowBytesPerThread = 32;

struct KernelArgs {
  const void* input;
  void* output;
  int64_t num_elements;
  int64_t slice_units;                       // units per inbox (Layout::slice_units)
  int64_t slice_stride;                      // elements between slice starts
  char* workspace;                           // my workspace (my grouping's region of it)
  int32_t grouping;                          // that region's index, for failure reports
  char* node_peers[kMaxGpusPerNode];         // workspaces of my node's GPUs, by local index
  char* inter_peer_ptr[kMaxInterNodeSteps];  // peer workspace per step; nullptr: use puts
  int32_t inter_peer_pe[kMaxInterNodeSteps];
  int32_t inter_op[kMaxInterNodeSteps];
  int32_t inter_peer_node[kMaxInterNodeSteps];
  int32_t node;
  int32_t local;
  int32_t gpus_per_node;
  int32_t num_steps;
  int32_t one_shot;  // one node: push the whole message to every local, no all-gather
  CallSignature signature;
  int32_t check_calls;  // exchange and compare call signatures (JAXNVRAR_CHECK_CALLS)
  uint64_t timeout_ns;
  TimeoutRecord* timeout_record;  // pinned host memory
  int64_t block_units;  // units per block; 0: the slice's units spread evenly over the grid
  NormArgs norm;
  unsigned long long* timing;  // JAXNVRAR_TIMING's ring of per-call records; nullptr: off
  // The dense kernel's inboxes (protocol_dense.cuh): mine and my node's, and the bytes of one
  // inbox (DenseInboxBytes).
  char* dense;
  char* dense_peers[kMaxGpusPerNode];
  int64_t dense_inbox_bytes;
};

// Unit `unit` of a workspace region at `offset` from `base`: LL cells and bulk chunks both
// take kUnitBytes of workspace.
__device__ __forceinline__ char* At(const char* base, int64_t offset, int64_t unit) {
  return const_cast<char*>(base) + offset + unit * kUnitBytes;
}

// ---- Element codecs and unit arithmetic.

template <typename T>
struct Codec;

template <>
struct Codec<float> {
  __device__ static float ToFloat(float v) { return v; }
  __device__ static float FromFloat(float v) { return v; }
};
template <>
struct Codec<__nv_bfloat16> {
  __device__ static float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 FromFloat(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Codec<__half> {
  __device__ static float ToFloat(__half v) { return __half2float(v); }
  __device__ static __half FromFloat(float v) { return __float2half_rn(v); }
};

// A unit: a Vector's worth of elements of T (8 bytes for an LL cell, 16 for a bulk chunk).
template <typename T, typename Vector>
union Packed {
  static constexpr int kCount = sizeof(Vector) / sizeof(T);
  Vector vector;
  T values[kCount];
};

// Unit `unit` of slice `slice` of a message, zero past the slice's end.
template <typename T, typename Vector>
__device__ __forceinline__ Vector LoadSliceUnit(const KernelArgs& args, const void* message, int32_t slice,
                                                int64_t unit) {
  using Data = Packed<T, Vector>;
  const T* base = static_cast<const T*>(message);
  const int64_t slice_begin = Min64(slice * args.slice_stride, args.num_elements);
  const int64_t slice_end = Min64(slice_begin + args.slice_stride, args.num_elements);
  const int64_t first = slice_begin + unit * Data::kCount;
  if (first + Data::kCount <= slice_end) {  // slices start 16-byte aligned: one vector load
    return *reinterpret_cast<const Vector*>(base + first);
  }
  Data d;
  d.vector = Vector{};
#pragma unroll
  for (int k = 0; k < Data::kCount; ++k) {
    if (first + k < slice_end) d.values[k] = base[first + k];
  }
  return d.vector;
}

template <typename T, typename Vector>
__device__ __forceinline__ void StoreSliceUnit(const KernelArgs& args, int32_t slice, int64_t unit, Vector data) {
  using Data = Packed<T, Vector>;
  T* output = static_cast<T*>(args.output);
  const int64_t slice_begin = Min64(slice * args.slice_stride, args.num_elements);
  const int64_t slice_end = Min64(slice_begin + args.slice_stride, args.num_elements);
  const int64_t first = slice_begin + unit * Data::kCount;
  if (first + Data::kCount <= slice_end) {
    *reinterpret_cast<Vector*>(output + first) = data;
    return;
  }
  Data d;
  d.vector = data;
#pragma unroll
  for (int k = 0; k < Data::kCount; ++k) {
    if (first + k < slice_end) output[first + k] = d.values[k];
  }
}

// op(first[k], second[k]) for each element k of two units of T.
template <typename T, typename Vector, typename Op>
__device__ __forceinline__ Vector ZipUnits(Vector first, Vector second, Op op) {
  using Data = Packed<T, Vector>;
  Data a, b, out;
  a.vector = first;
  b.vector = second;
#pragma unroll
  for (int k = 0; k < Data::kCount; ++k) out.values[k] = op(a.values[k], b.values[k]);
  return out.vector;
}

// a + b per element in float32, rounded to T; the lower node's value goes first.
template <typename T, typename Vector>
__device__ __forceinline__ Vector AddUnits(Vector first, Vector second) {
  return ZipUnits<T>(first, second,
                     [](T a, T b) { return Codec<T>::FromFloat(Codec<T>::ToFloat(a) + Codec<T>::ToFloat(b)); });
}

// The sum over locals 0..G-1, in that order, in float32, rounded to T once: the schedule's
// reduce-scatter sum. fetch(j) gives local j's unit (a Vector of elements of T).
template <typename T, typename Vector, typename Fetch>
__device__ __forceinline__ Vector SumOverLocals(int32_t gpus_per_node, Fetch fetch) {
  using Data = Packed<T, Vector>;
  float acc[Data::kCount];
  for (int32_t j = 0; j < gpus_per_node; ++j) {
    Data d;
    d.vector = fetch(j);
#pragma unroll
    for (int k = 0; k < Data::kCount; ++k) {
      const float v = Codec<T>::ToFloat(d.values[k]);
      acc[k] = j == 0 ? v : acc[k] + v;
    }
  }
  Data sum;
#pragma unroll
  for (int k = 0; k < Data::kCount; ++k) sum.values[k] = Codec<T>::FromFloat(acc[k]);
  return sum.vector;
}

// ---- Flagged cells: {4 data bytes, check, 4 data bytes, check} in one 16-byte store. Only 8-byte
// halves are seen whole by a reader, so each half carries the call's flag (NCCL's LL layout),
// mixed with its data word (CellCheck in schedule.h says why). Call signatures travel in them
// whatever the protocol; the LL protocol moves its data in them.

// A cell half as one 64-bit word (little-endian: the data word first), for puts.
__device__ __forceinline__ uint64_t CellHalf(uint32_t data, uint32_t flag, int32_t half) {
  return (static_cast<uint64_t>(CellCheck(data, flag, half)) << 32) | data;
}

__device__ __forceinline__ void StoreCell(char* address, uint2 data, uint32_t flag) {
  asm volatile("st.volatile.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(address), "r"(data.x),
               "r"(CellCheck(data.x, flag, 0)), "r"(data.y), "r"(CellCheck(data.y, flag, 1))
               : "memory");
}

// True (and the data) when both halves of the cell carry `flag`.
__device__ __forceinline__ bool PollCell(const char* address, uint32_t flag, uint2* data) {
  uint32_t lo, check_lo, hi, check_hi;
  asm volatile("ld.volatile.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(lo), "=r"(check_lo), "=r"(hi), "=r"(check_hi)
               : "l"(address)
               : "memory");
  data->x = lo;
  data->y = hi;
  return check_lo == CellCheck(lo, flag, 0) && check_hi == CellCheck(hi, flag, 1);
}

// ---- Failures, and the bounded waits that find them.

__device__ __forceinline__ uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// What a wait was for (names in nvrar_ffi.cu's last_timeout), and whose signature slot
// tells whether that peer is in the same call.
struct WaitSite {
  int32_t phase;  // WaitPhase
  int32_t step;
  int32_t peer;
  int32_t slot;
};
enum WaitPhase : int32_t {
  kWaitReduceScatter = 0,
  kWaitInterNode = 1,
  kWaitAllGather = 2,
  kWaitSignature = 3,
  kWaitNormBarrier = 4,  // this GPU's blocks, before a fused epilogue
};
enum FailureKind : int32_t { kFailureTimeout = 1, kFailureMismatch = 2 };

// The first thread of this GPU to find a failure records it in pinned host memory (for
// jaxnvrar.last_timeout()), then traps: XLA reports a failed launch instead of hanging.
// Takes values, not KernelArgs: the address of a kernel parameter would put all of it in
// local memory, for every thread, on every call.
struct FailureContext {
  char* workspace;
  TimeoutRecord* record;
  int32_t node, local, grouping;
  CallSignature signature;
};

__device__ __noinline__ void Fail(FailureContext where, int32_t kind, WaitSite site, uint32_t flag,
                                  CallSignature peer_signature) {
  WorkspaceHeader* header = reinterpret_cast<WorkspaceHeader*>(where.workspace);
  if (atomicExch(&header->timed_out, 1u) == 0u) {
    TimeoutRecord* r = where.record;
    r->kind = kind;
    r->node = where.node;
    r->local = where.local;
    r->grouping = where.grouping;
    r->phase = site.phase;
    r->step = site.step;
    r->peer = site.peer;
    r->peer_is_node = site.phase == kWaitInterNode || site.slot >= kMaxGpusPerNode;  // signature slots past the node's
    r->flag = flag;
    r->my_elements = where.signature.elements;
    r->my_shape = where.signature.shape;
    r->peer_elements = peer_signature.elements;
    r->peer_shape = peer_signature.shape;
    __threadfence_system();
    r->set = 1;
    __threadfence_system();
    __trap();
  }
  // Not elected: a trap from here could abort the grid before the record is written.
  while (true) __nanosleep(1000);
}

__device__ __forceinline__ FailureContext Where(const KernelArgs& args) {
  return FailureContext{args.workspace, args.timeout_record, args.node, args.local, args.grouping, args.signature};
}

// A peer's call-signature slot in the workspace header (one set of slots per parity half).
__device__ __forceinline__ int64_t SignatureSlot(unsigned long long calls, int32_t slot) {
  return kSignatureOffset + (static_cast<int64_t>(calls & 1ull) * kSignatureSlots + slot) * kCellBytes;
}

// The peer's signature for this call, if it has arrived; a different one is a mismatch.
__device__ __forceinline__ bool CheckSignature(const KernelArgs& args, unsigned long long calls, uint32_t flag,
                                               const WaitSite& site) {
  uint2 theirs;
  if (!PollCell(args.workspace + SignatureSlot(calls, site.slot), flag, &theirs)) return false;
  if (theirs.x != args.signature.elements || theirs.y != args.signature.shape) {
    Fail(Where(args), kFailureMismatch, site, flag, CallSignature{theirs.x, theirs.y});
  }
  return true;
}

// Spins until `ready()`; bounded by the timeout, and while spinning, watches the peer's
// signature so that a rank in a different call is reported at once. Every wait on a peer's
// data goes through here (LL cells, and the bulk protocol's flag words).
template <typename Ready>
__device__ __forceinline__ void SpinUntil(Ready ready, uint32_t flag, const KernelArgs& args,
                                          unsigned long long calls, const WaitSite& site) {
  if (ready()) return;
  const uint64_t start = GlobalTimerNs();
  for (uint32_t spin = 1; !ready(); ++spin) {
    if (spin % 64 == 0) {
      if (args.check_calls) CheckSignature(args, calls, flag, site);
      if (GlobalTimerNs() - start > args.timeout_ns) {
        Fail(Where(args), kFailureTimeout, site, flag, CallSignature{0, 0});
      }
    }
  }
}

// Spins until `ready()`; past the timeout, a timeout report at `site` (no signature to watch:
// the signature waits themselves, and this GPU's own blocks).
template <typename Ready>
__device__ __forceinline__ void SpinBounded(Ready ready, const KernelArgs& args, uint32_t flag, const WaitSite& site) {
  const uint64_t start = GlobalTimerNs();
  while (!ready()) {
    if (GlobalTimerNs() - start > args.timeout_ns) Fail(Where(args), kFailureTimeout, site, flag, CallSignature{0, 0});
  }
}

// Thread 0 of block 0 tells every peer that sends to or receives from this GPU what this
// call is; peers compare it with their own (CheckSignature).
__device__ __forceinline__ void SendSignature(const KernelArgs& args, unsigned long long calls, uint32_t flag) {
  const uint2 mine = make_uint2(args.signature.elements, args.signature.shape);
  for (int32_t d = 0; d < args.gpus_per_node; ++d) {
    if (d != args.local) StoreCell(args.node_peers[d] + SignatureSlot(calls, args.local), mine, flag);
  }
  for (int32_t s = 0; s < args.num_steps; ++s) {
    if (!(args.inter_op[s] & kSend)) continue;
    const int64_t slot = SignatureSlot(calls, kMaxGpusPerNode + s);
    if (args.inter_peer_ptr[s] != nullptr) {
      StoreCell(args.inter_peer_ptr[s] + slot, mine, flag);
    } else {  // two 8-byte puts, each half whole with its flag
      auto* remote = reinterpret_cast<uint64_t*>(args.workspace + slot);
      nvshmem_uint64_p(remote, CellHalf(mine.x, flag, 0), args.inter_peer_pe[s]);
      nvshmem_uint64_p(remote + 1, CellHalf(mine.y, flag, 1), args.inter_peer_pe[s]);
    }
  }
}

// Every peer that sent to this GPU must have made the same call (same size, dtype and
// topology): catches mismatches that would not hang, such as float16 against bfloat16.
__device__ __forceinline__ void AwaitSignatures(const KernelArgs& args, unsigned long long calls, uint32_t flag) {
  auto await = [&](const WaitSite& site) {
    SpinBounded([&] { return CheckSignature(args, calls, flag, site); }, args, flag, site);
  };
  for (int32_t j = 0; j < args.gpus_per_node; ++j) {
    if (j != args.local) await(WaitSite{kWaitSignature, 0, j, j});
  }
  for (int32_t s = 0; s < args.num_steps; ++s) {
    if (args.inter_op[s] & (kRecvAdd | kRecvCopy)) {
      await(WaitSite{kWaitSignature, s, args.inter_peer_node[s], kMaxGpusPerNode + s});
    }
  }
}

// ---- JAXNVRAR_TIMING: globaltimer stamps of each call, by block 0 (after a block barrier, so
// that they mark the whole block's progress), and by the call's last block to finish.
enum TimingField : int {
  kTimingCall = 0,      // the call counter + 1, written last (0: no record)
  kTimingEntry = 1,     // block 0 starts
  kTimingSent = 2,      // block 0 has issued its first phase's sends
  kTimingReduced = 3,   // block 0 has its units of the reduce-scatter (one-shot: the whole sum)
  kTimingAllReduced = 4,  // block 0 has its units of the finished all-reduce
  kTimingNormed = 5,    // block 0 has finished the fused epilogue (= kTimingAllReduced without one)
  kTimingLastBlock = 6,  // the last block of the grid is done
  kTimingShape = 7,     // blocks << 32 | low 32 bits of the element count
};

__device__ __forceinline__ unsigned long long* TimingRecord(const KernelArgs& args, unsigned long long calls) {
  return args.timing + static_cast<int64_t>(calls % kTimingRecords) * kTimingFields;
}

// Every thread of every block calls it (a uniform branch): the barrier is only taken when timing.
__device__ __forceinline__ void Stamp(const KernelArgs& args, unsigned long long calls, int field) {
  if (args.timing == nullptr) return;
  __syncthreads();
  if (blockIdx.x == 0 && threadIdx.x == 0) TimingRecord(args, calls)[field] = GlobalTimerNs();
}

// ---- Start and end of a call.

// What every block of a call works out first. Each call alternates workspace halves and carries
// a non-zero flag that differs from the last call's; the block takes a contiguous range of the
// slice's units (args.block_units of them where the plan fixes it), so that it can put its range
// in one call.
struct CallStart {
  unsigned long long calls;
  uint32_t flag;
  int64_t half;
  int64_t block_begin, block_end;
};

__device__ __forceinline__ CallStart BeginCall(const KernelArgs& args, const Layout& layout) {
  const unsigned long long calls = reinterpret_cast<const WorkspaceHeader*>(args.workspace)->calls;
  const int64_t per_block = args.block_units > 0 ? args.block_units : CeilDiv(args.slice_units, gridDim.x);
  const int64_t begin = Min64(blockIdx.x * per_block, args.slice_units);
  return CallStart{calls, static_cast<uint32_t>(calls % 0xFFFFFFFEull) + 1u, layout.Half(calls), begin,
                   Min64(begin + per_block, args.slice_units)};
}

// The last block to finish advances the call counter for the next launch. No fence: the
// counter is read only by the next launch (stream-ordered after this grid), every block read it
// before its barrier and its atomicAdd, and a fence here would wait for this thread's stores to
// the peers (an NVLink round trip) for nothing
// (2 x H200, 2026-12-01: ~0.4 us less per call; docs/results/allreduce_stamps_finishcall_fences_ab_*).
__device__ __forceinline__ void FinishCall(const KernelArgs& args, unsigned long long calls, bool dense = false) {
  WorkspaceHeader* header = reinterpret_cast<WorkspaceHeader*>(args.workspace);
  __syncthreads();
  if (threadIdx.x == 0) {
    if (atomicAdd(&header->blocks_done, 1u) == gridDim.x - 1) {
      if (args.timing != nullptr) {
        unsigned long long* record = TimingRecord(args, calls);
        record[kTimingLastBlock] = GlobalTimerNs();
        record[kTimingShape] = static_cast<unsigned long long>(gridDim.x) << 32 | args.signature.elements;
        __threadfence();
        record[kTimingCall] = calls + 1;
      }
      header->blocks_done = 0;
      header->norm_arrived = 0;  // every block is past the fused epilogue's barrier
      if (dense) header->dense_calls += 1;  // every block read it at its start
      header->calls = calls + 1;
    }
  }
}

// The end of every call: the peers' signatures checked, puts completed, the call counted.
__device__ __forceinline__ void EndCall(const KernelArgs& args, unsigned long long calls, uint32_t flag,
                                        bool issued_puts, bool dense = false) {
  if (args.check_calls && blockIdx.x == 0 && threadIdx.x == 0) AwaitSignatures(args, calls, flag);
  if (issued_puts && threadIdx.x == 0) nvshmem_quiet();  // staging is reused two calls later
  FinishCall(args, calls, dense);
}

}  // namespace jaxnvrar

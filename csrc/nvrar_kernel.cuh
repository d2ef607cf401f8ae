// The NVRAR all-reduce in ONE kernel: intra-node reduce-scatter, inter-node recursive
// doubling, intra-node all-gather, following csrc/schedule.h.
//
// Data moves in 16-byte cells {4 data bytes, flag, 4 data bytes, flag} written with one
// 16-byte store. Only 8-byte halves are seen whole by a reader, so each half carries the
// call's flag (NCCL's LL layout); a receiver spins on its own inbox until both flags match,
// so no separate signal or fence is needed.
//
// One node may launch "one-shot" instead (see jaxnvrar/schedule.py): the whole message is one
// slice that every local pushes to every other; each sums all G copies; no all-gather.
//
// Thread t owns the same cells of the slice in every phase, so threads never wait for each
// other, only for peers. Each phase first issues all of a thread's stores, then waits: the
// latency of a hop is paid once per phase, not once per round of cells.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "nvshmem_runtime.h"
#include "schedule.h"

namespace jaxnvrar {

constexpr int kThreadsPerBlock = 512;  // both kernels launch blocks of this many threads
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
};
static_assert(kSignatureOffset + 2 * kSignatureSlots * kCellBytes <= kWorkspaceHeaderBytes,
              "the signature slots must fit in the workspace header");

// What a call is, as peers compare it: element count and (dtype, launch, G, nodes). Ranks that
// disagree would otherwise deadlock or, worse, exchange cells of another meaning.
struct CallSignature {
  uint32_t elements;  // low 32 bits of the element count
  uint32_t shape;     // dtype << 28 | launch << 24 | gpus_per_node << 16 | num_nodes
};
// Launch bits of a CallSignature: ranks must agree on the workspace layout too.
constexpr uint32_t kLaunchOneShot = 1u;
constexpr uint32_t kLaunchBulk = 2u;

struct KernelArgs {
  const void* input;
  void* output;
  int64_t num_elements;
  int64_t slice_cells;                       // units per inbox (Layout::slice_units)
  int64_t slice_stride;                      // elements between slice starts
  char* workspace;                           // my workspace
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
};

// A peer's call-signature slot in the workspace header (one set of slots per parity half).
__device__ __forceinline__ int64_t SignatureSlot(unsigned long long calls, int32_t slot) {
  return kSignatureOffset + (static_cast<int64_t>(calls & 1ull) * kSignatureSlots + slot) * kCellBytes;
}

// The 8 data bytes of a cell.
struct Cell {
  uint32_t lo, hi;
};

template <typename T>
struct CellCodec;

template <>
struct CellCodec<float> {
  __device__ static float ToFloat(float v) { return v; }
  __device__ static float FromFloat(float v) { return v; }
};
template <>
struct CellCodec<__nv_bfloat16> {
  __device__ static float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 FromFloat(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct CellCodec<__half> {
  __device__ static float ToFloat(__half v) { return __half2float(v); }
  __device__ static __half FromFloat(float v) { return __float2half_rn(v); }
};

__device__ __forceinline__ uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// One 16-byte store: local memory or a peer's, through the generic address space.
__device__ __forceinline__ void StoreCell(char* address, Cell data, uint32_t flag) {
  asm volatile("st.volatile.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(address), "r"(data.lo), "r"(flag),
               "r"(data.hi), "r"(flag)
               : "memory");
}

// True (and the data) when both halves of the cell carry `flag`.
__device__ __forceinline__ bool PollCell(const char* address, uint32_t flag, Cell* data) {
  uint32_t lo, flag_lo, hi, flag_hi;
  asm volatile("ld.volatile.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(lo), "=r"(flag_lo), "=r"(hi), "=r"(flag_hi)
               : "l"(address)
               : "memory");
  data->lo = lo;
  data->hi = hi;
  return flag_lo == flag && flag_hi == flag;
}

// What a wait was for (names in nvrar_ffi.cu's last_timeout), and whose signature slot
// tells whether that peer is in the same call.
struct WaitSite {
  int32_t phase;  // WaitPhase
  int32_t step;
  int32_t peer;
  int32_t slot;
};
enum WaitPhase : int32_t { kWaitReduceScatter = 0, kWaitInterNode = 1, kWaitAllGather = 2, kWaitSignature = 3 };
enum FailureKind : int32_t { kFailureTimeout = 1, kFailureMismatch = 2 };

// The first thread of this GPU to find a failure records it in pinned host memory (for
// jaxnvrar.last_timeout()), then traps: XLA reports a failed launch instead of hanging.
// Takes values, not KernelArgs: the address of a kernel parameter would put all of it in
// local memory, for every thread, on every call.
struct FailureContext {
  char* workspace;
  TimeoutRecord* record;
  int32_t node, local;
  CallSignature signature;
};

__device__ __noinline__ void Fail(FailureContext where, int32_t kind, WaitSite site, uint32_t flag,
                                  Cell peer_signature) {
  WorkspaceHeader* header = reinterpret_cast<WorkspaceHeader*>(where.workspace);
  if (atomicExch(&header->timed_out, 1u) == 0u) {
    TimeoutRecord* r = where.record;
    r->kind = kind;
    r->node = where.node;
    r->local = where.local;
    r->phase = site.phase;
    r->step = site.step;
    r->peer = site.peer;
    r->flag = flag;
    r->my_elements = where.signature.elements;
    r->my_shape = where.signature.shape;
    r->peer_elements = peer_signature.lo;
    r->peer_shape = peer_signature.hi;
    __threadfence_system();
    r->set = 1;
    __threadfence_system();
    __trap();
  }
  // Not elected: a trap from here could abort the grid before the record is written.
  while (true) __nanosleep(1000);
}

__device__ __forceinline__ FailureContext Where(const KernelArgs& args) {
  return FailureContext{args.workspace, args.timeout_record, args.node, args.local, args.signature};
}

// The peer's signature for this call, if it has arrived; a different one is a mismatch.
__device__ __forceinline__ bool CheckSignature(const KernelArgs& args, unsigned long long calls, uint32_t flag,
                                               const WaitSite& site) {
  Cell theirs;
  if (!PollCell(args.workspace + SignatureSlot(calls, site.slot), flag, &theirs)) return false;
  if (theirs.lo != args.signature.elements || theirs.hi != args.signature.shape) {
    Fail(Where(args), kFailureMismatch, site, flag, theirs);
  }
  return true;
}

// Spins until `ready()`; bounded by the timeout, and while spinning, watches the peer's
// signature so that a rank in a different call is reported at once. Every wait on a peer's
// data goes through here (cells, and the bulk kernel's flag words).
template <typename Ready>
__device__ __forceinline__ void SpinUntil(Ready ready, uint32_t flag, const KernelArgs& args,
                                          unsigned long long calls, const WaitSite& site) {
  if (ready()) return;
  const uint64_t start = GlobalTimerNs();
  for (uint32_t spin = 1; !ready(); ++spin) {
    if (spin % 64 == 0) {
      if (args.check_calls) CheckSignature(args, calls, flag, site);
      if (GlobalTimerNs() - start > args.timeout_ns) Fail(Where(args), kFailureTimeout, site, flag, Cell{0, 0});
    }
  }
}

// The cell's data, once both its halves carry `flag`.
__device__ __forceinline__ Cell AwaitCell(const char* address, uint32_t flag, const KernelArgs& args,
                                          unsigned long long calls, const WaitSite& site) {
  Cell data;
  SpinUntil([&] { return PollCell(address, flag, &data); }, flag, args, calls, site);
  return data;
}

// Unit `unit` (a Vector's worth of elements: 8 bytes for a cell, 16 for a bulk chunk) of
// slice `slice` of a message, zero past the slice's end.
template <typename T, typename Vector>
union Packed {
  static constexpr int kCount = sizeof(Vector) / sizeof(T);
  Vector vector;
  T values[kCount];
};

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

template <typename T>
__device__ __forceinline__ Cell LoadSliceCell(const KernelArgs& args, const void* message, int32_t slice,
                                              int64_t cell) {
  const uint2 v = LoadSliceUnit<T, uint2>(args, message, slice, cell);
  return Cell{v.x, v.y};
}

template <typename T>
__device__ __forceinline__ void StoreSliceCell(const KernelArgs& args, int32_t slice, int64_t cell, Cell data) {
  StoreSliceUnit<T, uint2>(args, slice, cell, make_uint2(data.lo, data.hi));
}

// a + b per element in float32, rounded to T; the lower node's value goes first.
template <typename T, typename Vector>
__device__ __forceinline__ Vector AddUnits(Vector first, Vector second) {
  using Data = Packed<T, Vector>;
  using Codec = CellCodec<T>;
  Data a, b, out;
  a.vector = first;
  b.vector = second;
#pragma unroll
  for (int k = 0; k < Data::kCount; ++k) {
    out.values[k] = Codec::FromFloat(Codec::ToFloat(a.values[k]) + Codec::ToFloat(b.values[k]));
  }
  return out.vector;
}

template <typename T>
__device__ __forceinline__ Cell AddCells(Cell first, Cell second) {
  const uint2 sum = AddUnits<T, uint2>(make_uint2(first.lo, first.hi), make_uint2(second.lo, second.hi));
  return Cell{sum.x, sum.y};
}

// Thread 0 of block 0 tells every peer that sends to or receives from this GPU what this
// call is; peers compare it with their own (CheckSignature).
__device__ __forceinline__ void SendSignature(const KernelArgs& args, unsigned long long calls, uint32_t flag) {
  const Cell mine{args.signature.elements, args.signature.shape};
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
      nvshmem_uint64_p(remote, (static_cast<uint64_t>(flag) << 32) | mine.lo, args.inter_peer_pe[s]);
      nvshmem_uint64_p(remote + 1, (static_cast<uint64_t>(flag) << 32) | mine.hi, args.inter_peer_pe[s]);
    }
  }
}

// Every peer that sent to this GPU must have made the same call (same size, dtype and
// topology): catches mismatches that would not hang, such as float16 against bfloat16.
__device__ __forceinline__ void AwaitSignatures(const KernelArgs& args, unsigned long long calls, uint32_t flag) {
  auto await = [&](const WaitSite& site) {
    const uint64_t start = GlobalTimerNs();
    while (!CheckSignature(args, calls, flag, site)) {
      if (GlobalTimerNs() - start > args.timeout_ns) Fail(Where(args), kFailureTimeout, site, flag, Cell{0, 0});
    }
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

// What every block of a call works out first. Each call alternates workspace halves and carries
// a non-zero flag that differs from the last call's; the block takes a contiguous range of the
// slice's units (cells, or bulk chunks), so that it can put its range in one call.
struct CallStart {
  unsigned long long calls;
  uint32_t flag;
  int64_t half;
  int64_t block_begin, block_end;
};

__device__ __forceinline__ CallStart BeginCall(const KernelArgs& args, const Layout& layout) {
  const unsigned long long calls = reinterpret_cast<const WorkspaceHeader*>(args.workspace)->calls;
  const int64_t per_block = CeilDiv(args.slice_cells, gridDim.x);
  const int64_t begin = Min64(blockIdx.x * per_block, args.slice_cells);
  return CallStart{calls, static_cast<uint32_t>(calls % 0xFFFFFFFEull) + 1u, layout.Half(calls), begin,
                   Min64(begin + per_block, args.slice_cells)};
}

// The sum over locals 0..G-1, in that order, in float32, rounded to T once: the schedule's
// reduce-scatter sum. fetch(j) gives local j's unit (a Vector of elements of T).
template <typename T, typename Vector, typename Fetch>
__device__ __forceinline__ Vector SumOverLocals(int32_t gpus_per_node, Fetch fetch) {
  using Data = Packed<T, Vector>;
  using Codec = CellCodec<T>;
  float acc[Data::kCount];
  for (int32_t j = 0; j < gpus_per_node; ++j) {
    Data d;
    d.vector = fetch(j);
#pragma unroll
    for (int k = 0; k < Data::kCount; ++k) {
      const float v = Codec::ToFloat(d.values[k]);
      acc[k] = j == 0 ? v : acc[k] + v;
    }
  }
  Data sum;
#pragma unroll
  for (int k = 0; k < Data::kCount; ++k) sum.values[k] = Codec::FromFloat(acc[k]);
  return sum.vector;
}

// The last block to finish advances the call counter for the next launch.
__device__ __forceinline__ void FinishCall(WorkspaceHeader* header, unsigned long long calls) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&header->blocks_done, 1u) == gridDim.x - 1) {
      header->blocks_done = 0;
      header->calls = calls + 1;
      __threadfence();
    }
  }
}

template <typename T>
__global__ void NvrarAllReduceKernel(KernelArgs args, Layout layout) {
  const CallStart start = BeginCall(args, layout);
  const unsigned long long calls = start.calls;
  const uint32_t flag = start.flag;
  const int64_t half = start.half;
  const int64_t block_begin = start.block_begin, block_end = start.block_end;
  const int32_t g = args.gpus_per_node;
  const bool one_node = args.num_steps == 0;
  const int64_t first_cell = block_begin + threadIdx.x;
  const int64_t stride = blockDim.x;
  auto at = [](const char* base, int64_t offset, int64_t cell) {
    return const_cast<char*>(base) + offset + cell * kCellBytes;
  };

  if (args.check_calls && blockIdx.x == 0 && threadIdx.x == 0) SendSignature(args, calls, flag);

  // Slice `d` goes to local d; one-shot, the whole message (slice 0) goes to every local.
  const int32_t my_slice = args.one_shot ? 0 : args.local;

  // 1. Reduce-scatter within the node: push slice d to local d ...
  for (int64_t cell = first_cell; cell < block_end; cell += stride) {
    for (int32_t d = 0; d < g; ++d) {
      if (d == args.local) continue;
      StoreCell(at(args.node_peers[d], half + layout.ReduceScatterInbox(args.local), cell),
                LoadSliceCell<T>(args, args.input, args.one_shot ? 0 : d, cell), flag);
    }
  }
  // ... then sum my slice over locals 0..G-1 in order, in float32. The partial result waits
  // in my slice of the output; with one node it is final and goes to the all-gather at once.
  for (int64_t cell = first_cell; cell < block_end; cell += stride) {
    const uint2 sum = SumOverLocals<T, uint2>(g, [&](int32_t j) {
      const Cell c = j == args.local
                         ? LoadSliceCell<T>(args, args.input, my_slice, cell)
                         : AwaitCell(at(args.workspace, half + layout.ReduceScatterInbox(j), cell), flag, args,
                                     calls, WaitSite{kWaitReduceScatter, 0, j, j});
      return make_uint2(c.lo, c.hi);
    });
    const Cell mine{sum.x, sum.y};
    if (one_node && !args.one_shot) {
      for (int32_t d = 0; d < g; ++d) {
        if (d != args.local) StoreCell(at(args.node_peers[d], half + layout.AllGatherInbox(args.local), cell),
                                       mine, flag);
      }
    }
    StoreSliceCell<T>(args, my_slice, cell, mine);
  }

  // 2. Between nodes, on my slice: recursive doubling (with fold-in/out for non-powers of 2).
  bool issued_puts = false;
  for (int32_t s = 0; s < args.num_steps; ++s) {
    const int32_t op = args.inter_op[s];
    if (op & kSend) {
      char* direct = args.inter_peer_ptr[s];
      for (int64_t cell = first_cell; cell < block_end; cell += stride) {
        const Cell mine = LoadSliceCell<T>(args, args.output, args.local, cell);
        StoreCell(direct != nullptr ? at(direct, half + layout.InterNodeInbox(s), cell)
                                    : at(args.workspace, half + layout.Stage(s), cell),
                  mine, flag);
      }
      if (direct == nullptr && block_end > block_begin) {
        // No load/store path to the peer (another host): one put of the block's staged range.
        __threadfence();
        __syncthreads();
        nvshmemx_putmem_nbi_block(at(args.workspace, half + layout.InterNodeInbox(s), block_begin),
                                  at(args.workspace, half + layout.Stage(s), block_begin),
                                  (block_end - block_begin) * kCellBytes, args.inter_peer_pe[s]);
        issued_puts = true;
      }
    }
    if (op & (kRecvAdd | kRecvCopy)) {
      const int32_t peer = args.inter_peer_node[s];
      for (int64_t cell = first_cell; cell < block_end; cell += stride) {
        const Cell theirs = AwaitCell(at(args.workspace, half + layout.InterNodeInbox(s), cell), flag, args, calls,
                                      WaitSite{kWaitInterNode, s, peer, kMaxGpusPerNode + s});
        Cell result = theirs;
        if (op & kRecvAdd) {
          const Cell mine = LoadSliceCell<T>(args, args.output, args.local, cell);
          result = args.node < peer ? AddCells<T>(mine, theirs) : AddCells<T>(theirs, mine);
        }
        StoreSliceCell<T>(args, args.local, cell, result);
      }
    }
  }

  // 3. All-gather within the node: push my finished slice to every local, collect theirs.
  if (!one_node) {
    for (int64_t cell = first_cell; cell < block_end; cell += stride) {
      const Cell mine = LoadSliceCell<T>(args, args.output, args.local, cell);
      for (int32_t d = 0; d < g; ++d) {
        if (d != args.local) StoreCell(at(args.node_peers[d], half + layout.AllGatherInbox(args.local), cell),
                                       mine, flag);
      }
    }
  }
  for (int64_t cell = first_cell; cell < block_end && !args.one_shot; cell += stride) {
    for (int32_t j = 0; j < g; ++j) {
      if (j == args.local) continue;
      StoreSliceCell<T>(args, j, cell,
                        AwaitCell(at(args.workspace, half + layout.AllGatherInbox(j), cell), flag, args, calls,
                                  WaitSite{kWaitAllGather, 0, j, j}));
    }
  }

  if (args.check_calls && blockIdx.x == 0 && threadIdx.x == 0) AwaitSignatures(args, calls, flag);
  if (issued_puts && threadIdx.x == 0) nvshmem_quiet();  // staging is reused two calls later
  FinishCall(reinterpret_cast<WorkspaceHeader*>(args.workspace), calls);
}

}  // namespace jaxnvrar

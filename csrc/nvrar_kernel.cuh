// The NVRAR all-reduce in ONE kernel: intra-node reduce-scatter, inter-node recursive
// doubling, intra-node all-gather, following csrc/schedule.h.
//
// Data moves in 8-byte cells {4 data bytes, 4-byte flag} written with one 64-bit store;
// a receiver spins on its own inbox until the flag equals this call's flag, so no separate
// signal or fence is needed (NCCL's LL protocol idea). Thread t owns the same cells of
// the slice in every phase, so threads never wait for each other, only for peers.
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

constexpr int kMaxGpusPerNode = 32;
constexpr int kMaxInterNodeSteps = 16;

// Header at the start of each PE's workspace (not shared: only the local GPU touches it).
struct WorkspaceHeader {
  unsigned long long calls;        // all-reduces completed on this PE
  unsigned int blocks_done;        // blocks of the running call that have finished
  unsigned int timed_out;          // set when a wait gave up (read by the host on error)
};

struct KernelArgs {
  const void* input;
  void* output;
  int64_t num_elements;
  int64_t slice_cells;                       // cells per inbox (the largest slice)
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
  uint64_t timeout_ns;
  TimeoutRecord* timeout_record;  // pinned host memory
};

// Inbox regions of one parity half, in units of slices of cells.
struct Layout {
  int64_t slice_bytes;  // bytes of one inbox
  int64_t half_bytes;
  int32_t gpus_per_node;
  int32_t num_steps;
  __device__ int64_t Half(unsigned long long calls) const {
    return kWorkspaceHeaderBytes + static_cast<int64_t>(calls & 1ull) * half_bytes;
  }
  __device__ int64_t ReduceScatterInbox(int32_t from_local) const { return from_local * slice_bytes; }
  __device__ int64_t InterNodeInbox(int32_t step) const {
    return (gpus_per_node + step) * slice_bytes;
  }
  __device__ int64_t Stage(int32_t step) const {
    return (gpus_per_node + num_steps + step) * slice_bytes;
  }
  __device__ int64_t AllGatherInbox(int32_t from_local) const {
    return (gpus_per_node + 2 * num_steps + from_local) * slice_bytes;
  }
};

template <typename T>
struct CellCodec;

template <>
struct CellCodec<float> {
  static constexpr int kPerCell = 1;
  __device__ static float ToFloat(float v) { return v; }
  __device__ static float FromFloat(float v) { return v; }
};
template <>
struct CellCodec<__nv_bfloat16> {
  static constexpr int kPerCell = 2;
  __device__ static float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 FromFloat(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct CellCodec<__half> {
  static constexpr int kPerCell = 2;
  __device__ static float ToFloat(__half v) { return __half2float(v); }
  __device__ static __half FromFloat(float v) { return __float2half_rn(v); }
};

// 4 data bytes seen as kPerCell elements of T.
template <typename T>
union CellData {
  uint32_t bits;
  T values[CellCodec<T>::kPerCell];
};

__device__ __forceinline__ uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void StoreCell(char* base, int64_t offset, int64_t cell, uint32_t data,
                                          uint32_t flag) {
  uint64_t packed = (static_cast<uint64_t>(flag) << 32) | data;
  *reinterpret_cast<volatile uint64_t*>(base + offset + cell * kCellBytes) = packed;
}

// What a wait was for, recorded when it times out (names in nvrar_ffi.cu's last_timeout).
enum WaitPhase : int32_t { kWaitReduceScatter = 0, kWaitInterNode = 1, kWaitAllGather = 2 };

// Spins until the cell carries `flag`. On timeout the first thread to give up records which
// phase, step and peer it waited on (for jaxnvrar.last_timeout()), then the kernel traps:
// XLA reports a failed launch instead of the job hanging.
__device__ __forceinline__ uint32_t AwaitCell(const char* base, int64_t offset, int64_t cell,
                                              uint32_t flag, const KernelArgs& args,
                                              int32_t phase, int32_t step, int32_t peer) {
  const volatile uint64_t* p =
      reinterpret_cast<const volatile uint64_t*>(base + offset + cell * kCellBytes);
  uint64_t v = *p;
  if (static_cast<uint32_t>(v >> 32) == flag) return static_cast<uint32_t>(v);
  const uint64_t start = GlobalTimerNs();
  while (static_cast<uint32_t>((v = *p) >> 32) != flag) {
    if (GlobalTimerNs() - start > args.timeout_ns) {
      WorkspaceHeader* header = reinterpret_cast<WorkspaceHeader*>(args.workspace);
      if (atomicExch(&header->timed_out, 1u) == 0u) {
        TimeoutRecord* r = args.timeout_record;
        r->node = args.node;
        r->local = args.local;
        r->phase = phase;
        r->step = step;
        r->peer = peer;
        r->flag = flag;
        __threadfence_system();
        r->set = 1;
        __threadfence_system();
        __trap();
      }
      // Not elected: a trap from here could abort the grid before the record is written.
      while (true) __nanosleep(1000);
    }
  }
  return static_cast<uint32_t>(v);
}

// Cell `cell` of slice `slice` of the input, zero past the slice's end.
template <typename T>
__device__ __forceinline__ uint32_t LoadInputCell(const KernelArgs& args, int32_t slice, int64_t cell) {
  using Codec = CellCodec<T>;
  const T* input = static_cast<const T*>(args.input);
  const int64_t slice_begin = Min64(slice * args.slice_stride, args.num_elements);
  const int64_t slice_end = Min64(slice_begin + args.slice_stride, args.num_elements);
  CellData<T> d;
  d.bits = 0;
#pragma unroll
  for (int k = 0; k < Codec::kPerCell; ++k) {
    int64_t i = slice_begin + cell * Codec::kPerCell + k;
    if (i < slice_end) d.values[k] = input[i];
  }
  return d.bits;
}

template <typename T>
__device__ __forceinline__ void StoreOutputCell(const KernelArgs& args, int32_t slice, int64_t cell,
                                                uint32_t bits) {
  using Codec = CellCodec<T>;
  T* output = static_cast<T*>(args.output);
  const int64_t slice_begin = Min64(slice * args.slice_stride, args.num_elements);
  const int64_t slice_end = Min64(slice_begin + args.slice_stride, args.num_elements);
  CellData<T> d;
  d.bits = bits;
#pragma unroll
  for (int k = 0; k < Codec::kPerCell; ++k) {
    int64_t i = slice_begin + cell * Codec::kPerCell + k;
    if (i < slice_end) output[i] = d.values[k];
  }
}

// a + b per element in float32, rounded to T; the lower node's value goes first.
template <typename T>
__device__ __forceinline__ uint32_t AddCells(uint32_t first, uint32_t second) {
  using Codec = CellCodec<T>;
  CellData<T> a, b, out;
  a.bits = first;
  b.bits = second;
#pragma unroll
  for (int k = 0; k < Codec::kPerCell; ++k) {
    out.values[k] = Codec::FromFloat(Codec::ToFloat(a.values[k]) + Codec::ToFloat(b.values[k]));
  }
  return out.bits;
}

template <typename T>
__global__ void NvrarAllReduceKernel(KernelArgs args, Layout layout) {
  using Codec = CellCodec<T>;
  WorkspaceHeader* header = reinterpret_cast<WorkspaceHeader*>(args.workspace);
  // Every call alternates halves and carries a non-zero flag that differs from the last call's.
  const unsigned long long calls = header->calls;
  const uint32_t flag = static_cast<uint32_t>(calls % 0xFFFFFFFEull) + 1u;
  const int64_t half = layout.Half(calls);
  const int32_t g = args.gpus_per_node;

  // Cells are split into contiguous block ranges (so a block can put its range in one call).
  const int64_t per_block = CeilDiv(args.slice_cells, gridDim.x);
  const int64_t block_begin = Min64(blockIdx.x * per_block, args.slice_cells);
  const int64_t block_end = Min64(block_begin + per_block, args.slice_cells);
  bool issued_puts = false;

  // Rounds of blockDim.x cells; every thread runs every round so __syncthreads stays uniform.
  for (int64_t round = block_begin; round < block_end; round += blockDim.x) {
    const int64_t cell = round + threadIdx.x;
    const bool active = cell < block_end;

    // 1. Reduce-scatter within the node: push slice d to local d, then sum my slice over
    //    locals 0..G-1 in order, in float32.
    if (active) {
      for (int32_t d = 0; d < g; ++d) {
        if (d == args.local) continue;
        StoreCell(args.node_peers[d], half + layout.ReduceScatterInbox(args.local), cell,
                  LoadInputCell<T>(args, d, cell), flag);
      }
    }
    uint32_t mine = 0;
    if (active) {
      float acc[Codec::kPerCell];
      for (int32_t j = 0; j < g; ++j) {
        CellData<T> d;
        d.bits = j == args.local ? LoadInputCell<T>(args, args.local, cell)
                                 : AwaitCell(args.workspace, half + layout.ReduceScatterInbox(j),
                                             cell, flag, args, kWaitReduceScatter, 0, j);
#pragma unroll
        for (int k = 0; k < Codec::kPerCell; ++k) {
          float v = Codec::ToFloat(d.values[k]);
          acc[k] = j == 0 ? v : acc[k] + v;
        }
      }
      CellData<T> r;
#pragma unroll
      for (int k = 0; k < Codec::kPerCell; ++k) r.values[k] = Codec::FromFloat(acc[k]);
      mine = r.bits;
    }

    // 2. Between nodes, on my slice: recursive doubling (with fold-in/out for non-powers of 2).
    for (int32_t s = 0; s < args.num_steps; ++s) {
      const int32_t op = args.inter_op[s];
      if (op & kSend) {
        char* direct = args.inter_peer_ptr[s];
        if (direct != nullptr) {
          if (active) StoreCell(direct, half + layout.InterNodeInbox(s), cell, mine, flag);
        } else {
          // No load/store path to the peer (another host): stage cells, one put per block.
          if (active) StoreCell(args.workspace, half + layout.Stage(s), cell, mine, flag);
          __syncthreads();
          const int64_t first = round;
          const int64_t count = Min64(static_cast<int64_t>(blockDim.x), block_end - round);
          nvshmemx_putmem_nbi_block(args.workspace + half + layout.InterNodeInbox(s) + first * kCellBytes,
                                    args.workspace + half + layout.Stage(s) + first * kCellBytes,
                                    count * kCellBytes, args.inter_peer_pe[s]);
          issued_puts = true;
        }
      }
      if (active && (op & (kRecvAdd | kRecvCopy))) {
        const uint32_t theirs =
            AwaitCell(args.workspace, half + layout.InterNodeInbox(s), cell, flag, args, kWaitInterNode, s,
                      args.inter_peer_node[s]);
        if (op & kRecvCopy) {
          mine = theirs;
        } else {
          mine = args.node < args.inter_peer_node[s] ? AddCells<T>(mine, theirs)
                                                     : AddCells<T>(theirs, mine);
        }
      }
    }

    // 3. All-gather within the node: push my finished slice to every local, collect theirs.
    if (active) {
      for (int32_t d = 0; d < g; ++d) {
        if (d == args.local) continue;
        StoreCell(args.node_peers[d], half + layout.AllGatherInbox(args.local), cell, mine, flag);
      }
      StoreOutputCell<T>(args, args.local, cell, mine);
      for (int32_t j = 0; j < g; ++j) {
        if (j == args.local) continue;
        StoreOutputCell<T>(args, j, cell,
                           AwaitCell(args.workspace, half + layout.AllGatherInbox(j), cell, flag, args,
                                     kWaitAllGather, 0, j));
      }
    }
  }

  if (issued_puts && threadIdx.x == 0) nvshmem_quiet();  // staging is reused two calls later
  // The last block to finish advances the call counter for the next launch.
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

}  // namespace jaxnvrar

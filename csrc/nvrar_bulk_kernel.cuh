// The "bulk" launch of the NVRAR all-reduce, for messages where bandwidth counts.
//
// The LL cells of nvrar_kernel.cuh carry 8 data bytes in 16: half of NVLink's bandwidth goes to
// flags. Here data moves as raw 16-byte chunks, and each block, once all its threads have
// stored their chunks to a peer, fences and raises ONE flag for that (phase, peer, block); the
// peer's block waits for that flag, then reads the chunks. A fence per block per phase costs
// about a microsecond: bulk is for large messages, LL for small ones (the tuner decides).
//
// Same schedule and sums as the LL kernel (reduce-scatter, recursive doubling between nodes,
// all-gather; or one-shot on one node), so the results are the same bits. Block b of every rank
// covers the same chunks: all ranks must launch the same grid, which the shared settings and
// tuning table guarantee.
#pragma once

#include "nvrar_kernel.cuh"

namespace jaxnvrar {

// Loads and stores of a slice's chunks, as of its cells.
template <typename T>
__device__ __forceinline__ uint4 LoadSliceChunk(const KernelArgs& args, const void* message, int32_t slice,
                                                int64_t chunk) {
  return LoadSliceUnit<T, uint4>(args, message, slice, chunk);
}

template <typename T>
__device__ __forceinline__ void StoreSliceChunk(const KernelArgs& args, int32_t slice, int64_t chunk, uint4 data) {
  StoreSliceUnit<T, uint4>(args, slice, chunk, data);
}

// A chunk a peer wrote into my workspace: read from L2 (never a stale L1 line).
__device__ __forceinline__ uint4 LoadInboxChunk(const char* address) {
  return __ldcg(reinterpret_cast<const uint4*>(address));
}

__device__ __forceinline__ void StoreChunk(char* address, uint4 data) { *reinterpret_cast<uint4*>(address) = data; }

// Flags are 8-byte words (NVSHMEM signal words, for the puts across hosts) holding the call's flag.
__device__ __forceinline__ void RaiseFlag(char* address, uint32_t flag) {
  asm volatile("st.relaxed.sys.u64 [%0], %1;" ::"l"(address), "l"(static_cast<uint64_t>(flag)) : "memory");
}

__device__ __forceinline__ uint64_t LoadFlagAcquire(const char* address) {
  uint64_t value;
  asm volatile("ld.acquire.sys.u64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
  return value;
}

// One thread waits until the flag word holds `flag` (SpinUntil: bounded, watching signatures).
__device__ __forceinline__ void AwaitFlag(const char* address, uint32_t flag, const KernelArgs& args,
                                          unsigned long long calls, const WaitSite& site) {
  SpinUntil([&] { return LoadFlagAcquire(address) == flag; }, flag, args, calls, site);
}

// Once every thread of the block has issued its chunks for `phase`: make them visible, then
// raise this block's flag at every other local.
__device__ __forceinline__ void PublishBlock(const KernelArgs& args, const Layout& layout, int64_t half,
                                             int32_t phase, uint32_t flag) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();  // orders the whole block's stores (seen through the barrier) before the flags
    for (int32_t d = 0; d < args.gpus_per_node; ++d) {
      if (d != args.local) RaiseFlag(args.node_peers[d] + half + layout.BulkFlag(phase, args.local, blockIdx.x), flag);
    }
  }
}

// Thread 0 waits for this block's flag from every other local; the barrier then lets the
// whole block read what the flags cover.
__device__ __forceinline__ void AwaitBlock(const KernelArgs& args, const Layout& layout, unsigned long long calls,
                                           int64_t half, int32_t phase, uint32_t flag) {
  if (threadIdx.x == 0) {
    for (int32_t j = 0; j < args.gpus_per_node; ++j) {
      if (j == args.local) continue;
      AwaitFlag(args.workspace + half + layout.BulkFlag(phase, j, blockIdx.x), flag, args, calls,
                WaitSite{phase == kBulkReduceScatter ? kWaitReduceScatter : kWaitAllGather, 0, j, j});
    }
  }
  __syncthreads();
}

// The block's staged range to the same place in a peer's workspace, then the flag word, which
// NVSHMEM sets only after the data has landed. Not inlined: the put's registers would otherwise
// count against every thread of the kernel, and it runs only between hosts.
__device__ __noinline__ void PutWithSignal(char* remote, const char* staged, int64_t bytes, char* flag_word,
                                           uint32_t flag, int32_t pe) {
  nvshmemx_putmem_signal_nbi_block(remote, staged, bytes, reinterpret_cast<uint64_t*>(flag_word), flag,
                                   NVSHMEM_SIGNAL_SET, pe);
}

template <typename T>
// Two blocks per SM: at most 64 registers a thread (without it, 80), no spills (ptxas -v).
__global__ void __launch_bounds__(kThreadsPerBlock, 2) NvrarBulkKernel(KernelArgs args, Layout layout) {
  // slice_cells counts 16-byte chunks here.
  const CallStart start = BeginCall(args, layout);
  const int64_t half = start.half;
  const int32_t g = args.gpus_per_node;
  const bool one_node = args.num_steps == 0;
  const int32_t my_slice = args.one_shot ? 0 : args.local;
  const int64_t first_chunk = start.block_begin + threadIdx.x;
  const int64_t stride = blockDim.x;
  const bool block_has_chunks = start.block_end > start.block_begin;  // the same on every rank
  auto at = [](const char* base, int64_t offset, int64_t chunk) {
    return const_cast<char*>(base) + offset + chunk * kUnitBytes;
  };

  if (args.check_calls && blockIdx.x == 0 && threadIdx.x == 0) SendSignature(args, start.calls, start.flag);

  // 1. Push slice d to local d (one-shot: the whole message to every local).
  for (int64_t chunk = first_chunk; chunk < start.block_end; chunk += stride) {
    for (int32_t d = 0; d < g; ++d) {
      if (d != args.local) {
        StoreChunk(at(args.node_peers[d], half + layout.ReduceScatterInbox(args.local), chunk),
                   LoadSliceChunk<T>(args, args.input, args.one_shot ? 0 : d, chunk));
      }
    }
  }
  PublishBlock(args, layout, half, kBulkReduceScatter, start.flag);
  AwaitBlock(args, layout, start.calls, half, kBulkReduceScatter, start.flag);

  // ... and sum my slice over locals 0..G-1 in order, in float32 (the LL kernel's sums). With one
  // node the sum is final and goes straight on to the all-gather.
  for (int64_t chunk = first_chunk; chunk < start.block_end; chunk += stride) {
    const uint4 mine = SumOverLocals<T, uint4>(g, [&](int32_t j) {
      return j == args.local ? LoadSliceChunk<T>(args, args.input, my_slice, chunk)
                             : LoadInboxChunk(at(args.workspace, half + layout.ReduceScatterInbox(j), chunk));
    });
    if (one_node && !args.one_shot) {
      for (int32_t d = 0; d < g; ++d) {
        if (d != args.local) StoreChunk(at(args.node_peers[d], half + layout.AllGatherInbox(args.local), chunk), mine);
      }
    }
    StoreSliceChunk<T>(args, my_slice, chunk, mine);
  }

  // 2. Between nodes, on my slice: recursive doubling, as the LL kernel, a flag per block and
  // step. A peer without load/store access gets the block's range by one put with signal, which
  // NVSHMEM delivers after the data. Blocks without chunks neither send nor wait.
  bool issued_puts = false;
  for (int32_t s = 0; s < args.num_steps && block_has_chunks; ++s) {
    const int32_t op = args.inter_op[s];
    const int64_t flag_at = half + layout.BulkFlag(kBulkInterNode, s, blockIdx.x);
    if (op & kSend) {
      char* direct = args.inter_peer_ptr[s];
      for (int64_t chunk = first_chunk; chunk < start.block_end; chunk += stride) {
        StoreChunk(direct != nullptr ? at(direct, half + layout.InterNodeInbox(s), chunk)
                                     : at(args.workspace, half + layout.Stage(s), chunk),
                   LoadSliceChunk<T>(args, args.output, args.local, chunk));
      }
      __syncthreads();
      if (direct != nullptr) {
        if (threadIdx.x == 0) {
          __threadfence_system();
          RaiseFlag(direct + flag_at, start.flag);
        }
      } else {
        __threadfence();
        __syncthreads();
        PutWithSignal(at(args.workspace, half + layout.InterNodeInbox(s), start.block_begin),
                      at(args.workspace, half + layout.Stage(s), start.block_begin),
                      (start.block_end - start.block_begin) * kUnitBytes, args.workspace + flag_at, start.flag,
                      args.inter_peer_pe[s]);
        issued_puts = true;
      }
    }
    if (op & (kRecvAdd | kRecvCopy)) {
      const int32_t peer = args.inter_peer_node[s];
      if (threadIdx.x == 0) {
        AwaitFlag(args.workspace + flag_at, start.flag, args, start.calls,
                  WaitSite{kWaitInterNode, s, peer, kMaxGpusPerNode + s});
      }
      __syncthreads();
      for (int64_t chunk = first_chunk; chunk < start.block_end; chunk += stride) {
        const uint4 theirs = LoadInboxChunk(at(args.workspace, half + layout.InterNodeInbox(s), chunk));
        uint4 result = theirs;
        if (op & kRecvAdd) {
          const uint4 mine = LoadSliceChunk<T>(args, args.output, args.local, chunk);
          result = args.node < peer ? AddUnits<T, uint4>(mine, theirs) : AddUnits<T, uint4>(theirs, mine);
        }
        StoreSliceChunk<T>(args, args.local, chunk, result);
      }
    }
  }

  // 3. All-gather: push my finished slice to every local (if not done above), collect theirs.
  if (!args.one_shot) {
    if (!one_node) {
      for (int64_t chunk = first_chunk; chunk < start.block_end; chunk += stride) {
        const uint4 mine = LoadSliceChunk<T>(args, args.output, args.local, chunk);
        for (int32_t d = 0; d < g; ++d) {
          if (d != args.local) StoreChunk(at(args.node_peers[d], half + layout.AllGatherInbox(args.local), chunk), mine);
        }
      }
    }
    PublishBlock(args, layout, half, kBulkAllGather, start.flag);
    AwaitBlock(args, layout, start.calls, half, kBulkAllGather, start.flag);
    for (int64_t chunk = first_chunk; chunk < start.block_end; chunk += stride) {
      for (int32_t j = 0; j < g; ++j) {
        if (j != args.local) {
          StoreSliceChunk<T>(args, j, chunk, LoadInboxChunk(at(args.workspace, half + layout.AllGatherInbox(j), chunk)));
        }
      }
    }
  }

  if (args.check_calls && blockIdx.x == 0 && threadIdx.x == 0) AwaitSignatures(args, start.calls, start.flag);
  if (issued_puts && threadIdx.x == 0) nvshmem_quiet();  // staging is reused two calls later
  FinishCall(reinterpret_cast<WorkspaceHeader*>(args.workspace), start.calls);
}

}  // namespace jaxnvrar

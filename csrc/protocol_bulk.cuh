// The bulk protocol, for messages where bandwidth counts.
//
// LL cells carry 8 data bytes in 16: half of NVLink's bandwidth goes to flags. Here data moves as
// raw 16-byte chunks, and each block, once all its threads have stored their chunks to a peer,
// fences and raises ONE flag for that (phase, peer, block); the peer's block waits for that flag,
// then reads the chunks. A fence per block per phase costs about a microsecond: bulk is for large
// messages, LL for small ones (the tuner decides).
//
// Block b of every rank covers the same chunks: all ranks must launch the same grid, which the
// shared settings and tuning table guarantee, and the flag words check (FlagWord).
#pragma once

#include "device_common.cuh"

namespace jaxnvrar {

// Flags are 8-byte words (NVSHMEM signal words, for the puts across hosts): the call's flag below
// a fixed tag. The halves are shared by calls of every size and protocol, so a flag word may sit
// where an earlier call left raw data; untagged, data such as bfloat16 [1.0, 0, 0, 0] would read as
// the flag of call 16255. The tag is, in float32 and in the upper bfloat16/float16 element, a NaN
// with a payload that no arithmetic produces.
constexpr uint64_t kFlagTag = 0x7FC0A5A5ull << 32;

// The tag also holds the grid size (at most kBulkMaxBlocks = 1024: it changes only the payload's
// low bits, never 0xA5A5 as a whole). Block b's flag covers block b's share of the units, which
// depends on the grid, and the call signature does not hold the grid: a peer launched with
// another one (a max_blocks overridden on one process only) then waits for a word that never
// comes, and reports a timeout, instead of reading another block's range as its own.
__device__ __forceinline__ uint64_t FlagWord(uint32_t flag) {
  return (kFlagTag ^ (static_cast<uint64_t>(gridDim.x) << 32)) | flag;
}

__device__ __forceinline__ void RaiseFlag(char* address, uint32_t flag) {
  asm volatile("st.relaxed.sys.u64 [%0], %1;" ::"l"(address), "l"(FlagWord(flag)) : "memory");
}

__device__ __forceinline__ uint64_t LoadFlagAcquire(const char* address) {
  uint64_t value;
  asm volatile("ld.acquire.sys.u64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
  return value;
}

// One thread waits until the flag word holds `flag` (SpinUntil: bounded, watching signatures).
__device__ __forceinline__ void AwaitFlag(const char* address, uint32_t flag, const KernelArgs& args,
                                          unsigned long long calls, const WaitSite& site) {
  SpinUntil([&] { return LoadFlagAcquire(address) == FlagWord(flag); }, flag, args, calls, site);
}

// The block's staged range to the same place in a peer's workspace, then the flag word, which
// NVSHMEM sets only after the data has landed. Not inlined: the put's registers would otherwise
// count against every thread of the kernel, and it runs only between hosts.
__device__ __noinline__ void PutWithSignal(char* remote, const char* staged, int64_t bytes, char* flag_word,
                                           uint32_t flag, int32_t pe) {
  nvshmemx_putmem_signal_nbi_block(remote, staged, bytes, reinterpret_cast<uint64_t*>(flag_word), FlagWord(flag),
                                   NVSHMEM_SIGNAL_SET, pe);
}

struct BulkProtocol {
  using Unit = uint4;                         // a 16-byte chunk
  static constexpr bool kBulkLayout = true;   // MakeLayout's chunks and flag words
  // Two blocks per SM: at most 64 registers a thread (without it, 80), no spills (ptxas -v).
  static constexpr int kMaxThreads = kThreadsPerBlock;
  static constexpr int kMinBlocksPerSm = 2;
  static constexpr bool kPullReduceScatter = false;

  // A chunk into a peer's inbox (or my staging area); the block's flag covers it later.
  static __device__ __forceinline__ void Send(char* address, Unit data, uint32_t) {
    *reinterpret_cast<Unit*>(address) = data;
  }

  // A chunk a peer wrote into my inbox, after AwaitBlock or BeginStepReceive: read from L2
  // (never a stale L1 line).
  static __device__ __forceinline__ Unit Receive(const char* address, uint32_t, const KernelArgs&, unsigned long long,
                                                 const WaitSite&) {
    return __ldcg(reinterpret_cast<const Unit*>(address));
  }

  // Once every thread of the block has sent its chunks for `phase` (a BulkPhase): make them
  // visible, then raise this block's flag at every other local.
  static __device__ __forceinline__ void PublishBlock(const KernelArgs& args, const Layout& layout, int64_t half,
                                                      int32_t phase, uint32_t flag) {
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence_system();  // orders the whole block's stores (seen through the barrier) before the flags
      for (int32_t d = 0; d < args.gpus_per_node; ++d) {
        if (d == args.local) continue;
        RaiseFlag(args.node_peers[d] + half + layout.BulkFlag(phase, args.local, blockIdx.x), flag);
      }
    }
  }

  // Thread 0 waits for this block's flag from every other local; the barrier then lets the
  // whole block read what the flags cover.
  static __device__ __forceinline__ void AwaitBlock(const KernelArgs& args, const Layout& layout,
                                                    unsigned long long calls, int64_t half, int32_t phase,
                                                    uint32_t flag) {
    if (threadIdx.x == 0) {
      for (int32_t j = 0; j < args.gpus_per_node; ++j) {
        if (j == args.local) continue;
        AwaitFlag(args.workspace + half + layout.BulkFlag(phase, j, blockIdx.x), flag, args, calls,
                  WaitSite{phase == kBulkReduceScatter ? kWaitReduceScatter : kWaitAllGather, 0, j, j});
      }
    }
    __syncthreads();
  }

  // After the block has sent its chunks of step `s`: raise the step's flag at the peer, or (a
  // peer without load/store access) put the block's staged range with the flag as signal,
  // which NVSHMEM delivers after the data; true if a put was issued.
  static __device__ __forceinline__ bool EndStepSend(const KernelArgs& args, const Layout& layout,
                                                     const CallStart& start, int32_t s, char* direct) {
    const int64_t flag_at = start.half + layout.BulkFlag(kBulkInterNode, s, blockIdx.x);
    __syncthreads();
    if (direct != nullptr) {
      if (threadIdx.x == 0) {
        __threadfence_system();
        RaiseFlag(direct + flag_at, start.flag);
      }
      return false;
    }
    __threadfence();
    __syncthreads();
    PutWithSignal(At(args.workspace, start.half + layout.InterNodeInbox(s), start.block_begin),
                  At(args.workspace, start.half + layout.Stage(s), start.block_begin),
                  (start.block_end - start.block_begin) * kUnitBytes, args.workspace + flag_at, start.flag,
                  args.inter_peer_pe[s]);
    return true;
  }

  // Before the block reads step `s`'s chunks: thread 0 waits for the peer's flag, the barrier
  // lets the whole block read.
  static __device__ __forceinline__ void BeginStepReceive(const KernelArgs& args, const Layout& layout,
                                                          const CallStart& start, int32_t s, const WaitSite& site) {
    if (threadIdx.x == 0) {
      AwaitFlag(args.workspace + start.half + layout.BulkFlag(kBulkInterNode, s, blockIdx.x), start.flag, args,
                start.calls, site);
    }
    __syncthreads();
  }
};

// Bulk with a pulled reduce-scatter (labels BLOCKS[-1shot]-pull), the other way to move the same
// bytes over NVLink: each rank stages its slices in its own workspace (local stores, so the
// fence before the block's flag waits for no remote acknowledgement) and, once a peer's flag says
// its slices are there, loads its own slice from the peer's workspace. The all-gather and the
// inter-node steps push as in BulkProtocol. A staged slice is not overwritten while a peer may
// still read it: call k+2 reuses call k's half, and my call k+1 cannot end before every peer has
// started call k+1 (its result needs their inputs), which each starts only after its kernel of
// call k has ended (stream order; no programmatic dependent launch). Like every protocol here,
// this assumes each call of the process has the same peers (design.md, Protocols).
// Which way is faster is a measurement (jaxnvrar-bench allreduce), not a rule. Under bulk's
// 64-register bound its 16-bit kernels spill 8 bytes (24 fused) where bulk's spill none (ptxas -v).
struct PullBulkProtocol : BulkProtocol {
  static constexpr bool kPullReduceScatter = true;

  // A chunk of a peer's staged slice, after AwaitBlock: fetched again from the peer's memory
  // (ld.global.cv), never a cached line of an earlier call.
  static __device__ __forceinline__ Unit Pull(const char* peer_address) {
    return __ldcv(reinterpret_cast<const Unit*>(peer_address));
  }
};

}  // namespace jaxnvrar

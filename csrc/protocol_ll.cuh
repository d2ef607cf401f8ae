// The LL protocol, for small messages where latency counts: data moves in 16-byte flagged cells
// (device_common.cuh) of 8 data bytes each. A receiver spins on each cell of its inbox until both
// halves carry the call's flag, so no separate signal or fence is needed, and nothing is done
// per block.
#pragma once

#include "device_common.cuh"

namespace jaxnvrar {

struct LLProtocol {
  using Unit = uint2;                          // the 8 data bytes of a cell
  static constexpr bool kBulkLayout = false;   // MakeLayout's cells of kCellDataBytes
  // No launch bounds: bounding the block size lets ptxas spend more registers (72, not 56).
  static constexpr int kMaxThreads = 0;
  static constexpr int kMinBlocksPerSm = 0;
  static constexpr bool kPullReduceScatter = false;  // a receiver polls its own inbox's cells

  // A unit into a peer's inbox (or my staging area), with the call's flag.
  static __device__ __forceinline__ void Send(char* address, Unit data, uint32_t flag) {
    StoreCell(address, data, flag);
  }

  // A unit a peer sent into my inbox, once its cell carries the call's flag.
  static __device__ __forceinline__ Unit Receive(const char* address, uint32_t flag, const KernelArgs& args,
                                                 unsigned long long calls, const WaitSite& site) {
    Unit data;
    SpinUntil([&] { return PollCell(address, flag, &data); }, flag, args, calls, site);
    return data;
  }

  // Every cell carries its own flag: nothing to publish or wait for per block.
  static __device__ __forceinline__ void PublishBlock(const KernelArgs&, const Layout&, int64_t, int32_t, uint32_t) {}
  static __device__ __forceinline__ void AwaitBlock(const KernelArgs&, const Layout&, unsigned long long, int64_t,
                                                    int32_t, uint32_t) {}

  // After the block has sent its units of step `s`. A peer without load/store access (another
  // host) gets the block's staged range by one put; true if a put was issued.
  static __device__ __forceinline__ bool EndStepSend(const KernelArgs& args, const Layout& layout,
                                                     const CallStart& start, int32_t s, const char* direct) {
    if (direct != nullptr) return false;
    __threadfence();
    __syncthreads();
    nvshmemx_putmem_nbi_block(At(args.workspace, start.half + layout.InterNodeInbox(s), start.block_begin),
                              At(args.workspace, start.half + layout.Stage(s), start.block_begin),
                              (start.block_end - start.block_begin) * kUnitBytes, args.inter_peer_pe[s]);
    return true;
  }

  static __device__ __forceinline__ void BeginStepReceive(const KernelArgs&, const Layout&, const CallStart&, int32_t,
                                                          const WaitSite&) {}
};

}  // namespace jaxnvrar

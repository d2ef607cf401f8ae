// The NVRAR all-reduce in ONE kernel, written once for every protocol: intra-node reduce-scatter,
// inter-node recursive doubling, intra-node all-gather, following csrc/schedule.h. The protocol
// (protocol_ll.cuh, protocol_bulk.cuh) says how a unit reaches a peer and when it may be read;
// the schedule, and so the order of every sum, is the same for all of them: same bits.
//
// One node may launch "one-shot" instead (see jaxnvrar/schedule.py): the whole message is one
// slice that every local pushes to every other; each sums all G copies; no all-gather.
//
// Thread t owns the same units of the slice in every phase, so threads never wait for each
// other's data, only for peers'. Each phase first issues all of a thread's sends, then waits: the
// latency of a hop is paid once per phase, not once per round of units.
#pragma once

#include "device_common.cuh"
#include "rms_norm_epilogue.cuh"

namespace jaxnvrar {

// A protocol gives: Unit (a vector of elements, one per thread per step of a loop); kBulkLayout
// (which of schedule.h's workspace layouts it uses); kMaxThreads and kMinBlocksPerSm (its launch
// bounds; 0, as template arguments, gives none); kPullReduceScatter (whether the reduce-scatter
// reads peers' staged slices with Pull instead of receiving pushed ones); and Send / Receive of a unit, PublishBlock /
// AwaitBlock around the intra-node phases, and EndStepSend / BeginStepReceive around an
// inter-node step. kFusedNorm: all_reduce_rms_norm's kernel, which ends in the residual add and
// the RMSNorm (rms_norm_epilogue.cuh) on the sum it leaves in the output.
template <typename T, typename Proto, bool kFusedNorm>
__global__ void __launch_bounds__(Proto::kMaxThreads, Proto::kMinBlocksPerSm)
    AllReduceKernel(KernelArgs args, Layout layout) {
  using Unit = typename Proto::Unit;
  static_assert(sizeof(Unit) == (Proto::kBulkLayout ? kChunkBytes : kCellDataBytes),
                "a unit holds the data bytes of a workspace unit of the protocol's layout");
  const CallStart start = BeginCall(args, layout);
  const unsigned long long calls = start.calls;
  const uint32_t flag = start.flag;
  const int64_t half = start.half;
  const int32_t g = args.gpus_per_node;
  const bool one_node = args.num_steps == 0;
  const int64_t first_unit = start.block_begin + threadIdx.x;
  const int64_t stride = blockDim.x;

  Stamp(args, calls, kTimingEntry);
  if (args.check_calls && blockIdx.x == 0 && threadIdx.x == 0) SendSignature(args, calls, flag);

  // Slice `d` goes to local d; one-shot, the whole message (slice 0) goes to every local.
  const int32_t my_slice = args.one_shot ? 0 : args.local;

  // 1. Reduce-scatter within the node: push slice d to local d ... or, where the protocol pulls
  // (kPullReduceScatter), stage slice d in my own workspace, in the inbox numbered after the
  // slice, for local d to read there; one-shot stages its one slice once.
  for (int64_t unit = first_unit; unit < start.block_end; unit += stride) {
    for (int32_t d = 0; d < g; ++d) {
      if constexpr (Proto::kPullReduceScatter) {
        if (args.one_shot ? d > 0 : d == args.local) continue;
        Proto::Send(At(args.workspace, half + layout.ReduceScatterInbox(d), unit),
                    LoadSliceUnit<T, Unit>(args, args.input, d, unit), flag);
      } else {
        if (d == args.local) continue;
        Proto::Send(At(args.node_peers[d], half + layout.ReduceScatterInbox(args.local), unit),
                    LoadSliceUnit<T, Unit>(args, args.input, args.one_shot ? 0 : d, unit), flag);
      }
    }
  }
  Stamp(args, calls, kTimingSent);
  Proto::PublishBlock(args, layout, half, kBulkReduceScatter, flag);
  Proto::AwaitBlock(args, layout, calls, half, kBulkReduceScatter, flag);
  if constexpr (kFusedNorm && !Proto::kBulkLayout) {  // bulk: its 64-register bound would spill
    if (args.one_shot && args.norm.in_registers) {  // the block's whole rows, summed and normalized in registers
      SumAndNormRows<T, Proto>(args, layout, start);
      Stamp(args, calls, kTimingNormed);
      EndCall(args, calls, flag, false);
      return;
    }
  }
  // ... then sum my slice over locals 0..G-1 in order, in float32. The partial result waits
  // in my slice of the output; with one node it is final and goes to the all-gather at once.
  for (int64_t unit = first_unit; unit < start.block_end; unit += stride) {
    const Unit mine = SumOverLocals<T, Unit>(g, [&](int32_t j) {
      if (j == args.local) return LoadSliceUnit<T, Unit>(args, args.input, my_slice, unit);
      if constexpr (Proto::kPullReduceScatter) {
        return Proto::Pull(At(args.node_peers[j], half + layout.ReduceScatterInbox(my_slice), unit));
      } else {
        return Proto::Receive(At(args.workspace, half + layout.ReduceScatterInbox(j), unit), flag, args, calls,
                              WaitSite{kWaitReduceScatter, 0, j, j});
      }
    });
    if (one_node && !args.one_shot) {
      for (int32_t d = 0; d < g; ++d) {
        if (d == args.local) continue;
        Proto::Send(At(args.node_peers[d], half + layout.AllGatherInbox(args.local), unit), mine, flag);
      }
    }
    StoreSliceUnit<T, Unit>(args, my_slice, unit, mine);
  }
  Stamp(args, calls, kTimingReduced);

  // 2. Between nodes, on my slice: recursive doubling (with fold-in/out for non-powers of 2).
  // Blocks without units neither send nor wait (the same blocks on every rank).
  bool issued_puts = false;
  const bool block_has_units = start.block_end > start.block_begin;
  for (int32_t s = 0; s < args.num_steps && block_has_units; ++s) {
    const int32_t op = args.inter_op[s];
    if (op & kSend) {
      char* direct = args.inter_peer_ptr[s];
      for (int64_t unit = first_unit; unit < start.block_end; unit += stride) {
        Proto::Send(direct != nullptr ? At(direct, half + layout.InterNodeInbox(s), unit)
                                      : At(args.workspace, half + layout.Stage(s), unit),
                    LoadSliceUnit<T, Unit>(args, args.output, args.local, unit), flag);
      }
      if (Proto::EndStepSend(args, layout, start, s, direct)) issued_puts = true;
    }
    if (op & (kRecvAdd | kRecvCopy)) {
      const int32_t peer = args.inter_peer_node[s];
      const WaitSite site{kWaitInterNode, s, peer, kMaxGpusPerNode + s};
      Proto::BeginStepReceive(args, layout, start, s, site);
      for (int64_t unit = first_unit; unit < start.block_end; unit += stride) {
        const Unit theirs = Proto::Receive(At(args.workspace, half + layout.InterNodeInbox(s), unit), flag, args,
                                           calls, site);
        Unit result = theirs;
        if (op & kRecvAdd) {
          const Unit mine = LoadSliceUnit<T, Unit>(args, args.output, args.local, unit);
          result = args.node < peer ? AddUnits<T, Unit>(mine, theirs) : AddUnits<T, Unit>(theirs, mine);
        }
        StoreSliceUnit<T, Unit>(args, args.local, unit, result);
      }
    }
  }

  // 3. All-gather within the node: push my finished slice to every local (unless the sum
  // already did), collect theirs. One-shot: every local already has the whole sum.
  if (!args.one_shot) {
    if (!one_node) {
      for (int64_t unit = first_unit; unit < start.block_end; unit += stride) {
        const Unit mine = LoadSliceUnit<T, Unit>(args, args.output, args.local, unit);
        for (int32_t d = 0; d < g; ++d) {
          if (d == args.local) continue;
          Proto::Send(At(args.node_peers[d], half + layout.AllGatherInbox(args.local), unit), mine, flag);
        }
      }
    }
    Proto::PublishBlock(args, layout, half, kBulkAllGather, flag);
    Proto::AwaitBlock(args, layout, calls, half, kBulkAllGather, flag);
    for (int64_t unit = first_unit; unit < start.block_end; unit += stride) {
      for (int32_t j = 0; j < g; ++j) {
        if (j == args.local) continue;
        StoreSliceUnit<T, Unit>(args, j, unit,
                                Proto::Receive(At(args.workspace, half + layout.AllGatherInbox(j), unit), flag, args,
                                               calls, WaitSite{kWaitAllGather, 0, j, j}));
      }
    }
  }

  Stamp(args, calls, kTimingAllReduced);
  if constexpr (kFusedNorm) RmsNormEpilogue<T>(args, flag);
  Stamp(args, calls, kTimingNormed);

  EndCall(args, calls, flag, issued_puts);
}

}  // namespace jaxnvrar

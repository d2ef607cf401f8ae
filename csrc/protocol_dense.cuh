// The dense kernel, for one node over NVLink (one-shot or two-shot): data moves as raw 16-byte
// stores with no flag at all, the way TensorRT-LLM's "Lamport" one-shot does. Each inbox slot holds a sentinel
// (every element all ones: a NaN in float32, bfloat16 and float16) until the peer's data lands;
// the receiver polls its slots until no element is the sentinel, reads them, and writes the
// sentinel back. So no fence, no per-block flag, and the reduction of a slot starts as soon as
// that slot has landed: 100% of the link carries data (LL: 50%), and nothing waits for a whole
// block's transfer (bulk).
//
// Why it is safe:
// - A torn store is harmless: every element is checked, and an element (at most 4 bytes,
//   aligned) is written whole.
// - Data equal to the sentinel is sent as another NaN (the lowest bit cleared): a NaN stays a
//   NaN, only its payload may differ from psum's.
// - Two regions alternate by the parity of the dense calls made so far (a counter of their own:
//   calls of other kinds, or over other peers, do not make a peer wait for us). The peer writes
//   dense call k+2's data into the region that dense call k read and reset only after it has our
//   dense call k+1 data (two-shot: its all-gather), which we send after call k's kernel, resets
//   included, has ended (stream order). Within a call the two phases use different inboxes,
//   and both layouts keep a parity's inboxes in the same half of the allocation (DenseInboxBytes).
//   So the inboxes serve one set of peers: the first axis group planned dense (nvrar_ffi.cu's
//   UsesDenseInboxes).
// - The regions are a separate symmetric allocation (Runtime::dense), set to the sentinel at
//   initialize: the workspace halves that LL and bulk calls share hold stale data.
// Between hosts (puts) nothing guarantees the order of a put's bytes against later ones to the
// same slot; this kernel is for one node only, and only where every peer has P2P access.
#pragma once

#include "device_common.cuh"

namespace jaxnvrar {

// The sentinel: all ones in every element.
template <typename T>
struct Sentinel;
template <>
struct Sentinel<float> {
  __device__ static bool In(uint32_t word) { return word == 0xFFFFFFFFu; }
  __device__ static uint32_t Avoid(uint32_t word) { return word == 0xFFFFFFFFu ? 0xFFFFFFFEu : word; }
};
template <typename Half16>  // bfloat16, float16: two elements per 32-bit word
struct Sentinel16 {
  __device__ static bool In(uint32_t word) { return (word & 0xFFFFu) == 0xFFFFu || (word >> 16) == 0xFFFFu; }
  __device__ static uint32_t Avoid(uint32_t word) {
    if ((word & 0xFFFFu) == 0xFFFFu) word ^= 0x1u;
    if ((word >> 16) == 0xFFFFu) word ^= 0x10000u;
    return word;
  }
};
template <>
struct Sentinel<__nv_bfloat16> : Sentinel16<__nv_bfloat16> {};
template <>
struct Sentinel<__half> : Sentinel16<__half> {};

template <typename T>
__device__ __forceinline__ uint4 AvoidSentinel(uint4 v) {
  return make_uint4(Sentinel<T>::Avoid(v.x), Sentinel<T>::Avoid(v.y), Sentinel<T>::Avoid(v.z), Sentinel<T>::Avoid(v.w));
}

// True (and the chunk) once no element of the slot is the sentinel.
template <typename T>
__device__ __forceinline__ bool PollDense(const char* address, uint4* data) {
  uint4 v;
  asm volatile("ld.volatile.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(address)
               : "memory");
  *data = v;
  return !(Sentinel<T>::In(v.x) || Sentinel<T>::In(v.y) || Sentinel<T>::In(v.z) || Sentinel<T>::In(v.w));
}

__device__ __forceinline__ void StoreChunk(char* address, uint4 v) {
  asm volatile("st.volatile.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(address), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w)
               : "memory");
}

// The dense inboxes of a call: 2 parities x (one-shot: G inboxes; two-shot: G reduce-scatter
// inboxes, then G all-gather inboxes), each args.dense_inbox_bytes (DenseInboxBytes).
enum DensePhase : int32_t { kDenseReduceScatter = 0, kDenseAllGather = 1 };

// Slot `unit` of the inbox that local `from` fills in `phase`, in this dense call's parity.
__device__ __forceinline__ char* DenseSlot(char* region_base, const KernelArgs& args, unsigned long long dense_calls,
                                           int32_t phase, int32_t from, int64_t unit) {
  const int64_t phases = args.one_shot ? 1 : 2;
  const int64_t inbox = (static_cast<int64_t>(dense_calls & 1ull) * phases + phase) * args.gpus_per_node + from;
  return region_base + inbox * args.dense_inbox_bytes + unit * kChunkBytes;
}

// My inbox slot from local `from`, once it has landed; then empty again for the dense call after next.
template <typename T>
__device__ __forceinline__ uint4 TakeDense(const KernelArgs& args, unsigned long long calls, uint32_t flag,
                                           unsigned long long dense_calls, int32_t phase, int32_t from, int64_t unit) {
  char* slot = DenseSlot(args.dense, args, dense_calls, phase, from, unit);
  uint4 data;
  SpinUntil([&] { return PollDense<T>(slot, &data); }, flag, args, calls,
            WaitSite{phase == kDenseReduceScatter ? kWaitReduceScatter : kWaitAllGather, 0, from, from});
  StoreChunk(slot, make_uint4(0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu));
  return data;
}

// One node. One-shot: push the whole message to every other local, then sum all G copies in
// local order. Two-shot: push slice d to local d, sum my slice over the locals in order, push
// the sum to every other local, collect theirs. The same sums as every other launch (same bits,
// but for a sum whose bits are the sentinel: every replica gets the flipped NaN). A slot is
// used as soon as it lands.
template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock, 2) DenseKernel(KernelArgs args, Layout layout) {
  using Unit = uint4;
  const CallStart start = BeginCall(args, layout);
  const unsigned long long calls = start.calls;
  const uint32_t flag = start.flag;
  const int32_t g = args.gpus_per_node;
  const int64_t first_unit = start.block_begin + threadIdx.x;
  const int64_t stride = blockDim.x;
  const unsigned long long dense_calls = reinterpret_cast<const WorkspaceHeader*>(args.workspace)->dense_calls;
  const int32_t my_slice = args.one_shot ? 0 : args.local;

  Stamp(args, calls, kTimingEntry);
  if (args.check_calls && blockIdx.x == 0 && threadIdx.x == 0) SendSignature(args, calls, flag);

  for (int64_t unit = first_unit; unit < start.block_end; unit += stride) {
    Unit whole;  // one-shot: the same unit goes to every peer, loaded once
    if (args.one_shot) whole = AvoidSentinel<T>(LoadSliceUnit<T, Unit>(args, args.input, 0, unit));
    for (int32_t d = 0; d < g; ++d) {
      if (d == args.local) continue;
      const Unit mine = args.one_shot ? whole : AvoidSentinel<T>(LoadSliceUnit<T, Unit>(args, args.input, d, unit));
      StoreChunk(DenseSlot(args.dense_peers[d], args, dense_calls, kDenseReduceScatter, args.local, unit), mine);
    }
  }
  Stamp(args, calls, kTimingSent);

  for (int64_t unit = first_unit; unit < start.block_end; unit += stride) {
    Unit sum = SumOverLocals<T, Unit>(g, [&](int32_t j) {
      return j == args.local ? LoadSliceUnit<T, Unit>(args, args.input, my_slice, unit)
                             : TakeDense<T>(args, calls, flag, dense_calls, kDenseReduceScatter, j, unit);
    });
    if (!args.one_shot) {
      sum = AvoidSentinel<T>(sum);  // what the peers get, so every replica holds the same bits
      for (int32_t d = 0; d < g; ++d) {
        if (d != args.local) {
          StoreChunk(DenseSlot(args.dense_peers[d], args, dense_calls, kDenseAllGather, args.local, unit), sum);
        }
      }
    }
    StoreSliceUnit<T, Unit>(args, my_slice, unit, sum);
  }
  Stamp(args, calls, kTimingReduced);

  if (!args.one_shot) {
    for (int64_t unit = first_unit; unit < start.block_end; unit += stride) {
      for (int32_t j = 0; j < g; ++j) {
        if (j != args.local) {
          StoreSliceUnit<T, Unit>(args, j, unit, TakeDense<T>(args, calls, flag, dense_calls, kDenseAllGather, j, unit));
        }
      }
    }
  }
  Stamp(args, calls, kTimingAllReduced);
  Stamp(args, calls, kTimingNormed);
  EndCall(args, calls, flag, false, /*dense=*/true);
}

}  // namespace jaxnvrar

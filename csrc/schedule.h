// The NVRAR schedule, C++ side: the twin of jaxnvrar/schedule.py (read its docstring
// for the algorithm). The kernel calls these functions on the device; the CPU module
// exposes them to Python so tests/test_schedule.py can check both sides agree.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define JAXNVRAR_HD __host__ __device__ __forceinline__
#else
#define JAXNVRAR_HD inline
#endif

namespace jaxnvrar {

constexpr int64_t kSliceAlignBytes = 16;

// Values shared with jaxnvrar.schedule.StepOp.
enum StepOp : int32_t {
  kIdle = 0,
  kSend = 1,      // send my slice to the peer
  kRecvAdd = 2,   // receive the peer's slice and add it to mine
  kRecvCopy = 4,  // receive the peer's slice and replace mine with it
  kExchange = kSend | kRecvAdd,
};

struct InterNodeStep {
  int32_t op;
  int32_t peer;  // peer node, -1 when idle
};

struct SliceBounds {
  int64_t begin;
  int64_t end;
};

JAXNVRAR_HD int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

JAXNVRAR_HD int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Distance between slice starts: ceil(n / slices), rounded up to the alignment.
JAXNVRAR_HD int64_t SliceStride(int64_t num_elements, int32_t num_slices, int64_t align_elements) {
  return CeilDiv(CeilDiv(num_elements, num_slices), align_elements) * align_elements;
}

// [begin, end) of slice `index` of a flat message of `num_elements`, cut into
// `num_slices` slices that start on multiples of `align_elements`.
JAXNVRAR_HD SliceBounds SliceOf(int64_t num_elements, int32_t num_slices,
                                int64_t align_elements, int32_t index) {
  int64_t per_slice = SliceStride(num_elements, num_slices, align_elements);
  int64_t begin = Min64(index * per_slice, num_elements);
  return {begin, Min64(begin + per_slice, num_elements)};
}

JAXNVRAR_HD int32_t LargestPowerOfTwoAtMost(int32_t n) {
  int32_t p = 1;
  while (p * 2 <= n) p *= 2;
  return p;
}

JAXNVRAR_HD int32_t Log2(int32_t power_of_two) {
  int32_t k = 0;
  while ((1 << k) < power_of_two) ++k;
  return k;
}

JAXNVRAR_HD int32_t NumInterNodeSteps(int32_t num_nodes) {
  int32_t pow2 = LargestPowerOfTwoAtMost(num_nodes);
  return Log2(pow2) + (pow2 != num_nodes ? 2 : 0);
}

// The op and peer of `node` at `step` of the inter-node phase (recursive doubling,
// with a fold-in step first and a fold-out step last when num_nodes is not a power of two).
JAXNVRAR_HD InterNodeStep InterNodeStepOf(int32_t node, int32_t num_nodes, int32_t step) {
  const int32_t pow2 = LargestPowerOfTwoAtMost(num_nodes);
  const int32_t extra = num_nodes - pow2;
  const InterNodeStep idle = {kIdle, -1};
  if (extra) {
    const int32_t last = NumInterNodeSteps(num_nodes) - 1;
    if (step == 0) {
      if (node >= pow2) return {kSend, node - pow2};
      if (node < extra) return {kRecvAdd, node + pow2};
      return idle;
    }
    if (step == last) {
      if (node < extra) return {kSend, node + pow2};
      if (node >= pow2) return {kRecvCopy, node - pow2};
      return idle;
    }
    step -= 1;
  }
  if (node >= pow2) return idle;
  return {kExchange, node ^ (1 << step)};
}

}  // namespace jaxnvrar

namespace jaxnvrar {

// The kernel's workspace: see the comment above workspace_bytes_needed in schedule.py.
constexpr int64_t kCellBytes = 16;
constexpr int64_t kCellDataBytes = 8;

// The check word of one half of a flagged cell {data, check, data, check}: the call's flag mixed
// with the half's data word, two different ways for the two halves. Cells share the workspace
// with other calls' raw (bulk) data; with the bare flag as check, stale data whose words at the
// check positions held the flag (bfloat16 [*, *, 2.0, 0, *, *, 2.0, 0] at call 16383) passed for
// a cell. Now a stale 16-byte line {a, b, c, d} passes only at the call whose flag is b ^ Mix(a,
// 0), and only if that equals d ^ Mix(c, 1): never for a line of two equal halves (constants, any
// data of period 8 bytes: the halves' mixes are complements), and for other data a 2^-32
// coincidence of its words. A half read alone (8-byte halves land separately, so a reader can
// see one fresh and one stale) passes at one flag, d ^ Mix(c, h): never for zeros (Mix(0) is 0
// and ~0; flags 0 and 0xFFFFFFFF are never used), for other structured data at a flag spread over
// all 2^32 (the bare flag let small integers pass within the first calls), except a first half
// whose data word is 0, which passes at its check word as before.
JAXNVRAR_HD uint32_t CellMix(uint32_t data, int32_t half) {
  uint32_t h = data;  // MurmurHash3's finalizer: a bijection in which every bit moves every other
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return half ? ~h : h;
}
JAXNVRAR_HD uint32_t CellCheck(uint32_t data, uint32_t flag, int32_t half) { return flag ^ CellMix(data, half); }
constexpr int64_t kWorkspaceHeaderBytes = 2048;
// The dense kernel's inboxes (protocol_dense.cuh): a symmetric allocation of their own next to
// the workspace (JAXNVRAR_DENSE_BYTES), 2 parities x G inboxes (two-shot: 2 x G, one set per
// phase) of this many bytes; a slice (one-shot: the message) must fit one.
// Both from one rounded size, so that each parity's inboxes fill exactly the same half of the
// allocation in either layout (calls of both kinds share it).
JAXNVRAR_HD int64_t DenseInboxBytes(int64_t region_bytes, int32_t gpus_per_node, bool one_shot) {
  const int64_t two_shot = region_bytes / (4 * gpus_per_node) / 16 * 16;
  return one_shot ? 2 * two_shot : two_shot;
}

JAXNVRAR_HD int64_t SliceCapacityElements(int64_t num_elements, int32_t gpus_per_node,
                                          int64_t itemsize) {
  int64_t align = kSliceAlignBytes / itemsize;
  return SliceStride(num_elements, gpus_per_node, align < 1 ? 1 : align);
}

// Bulk launches: raw 16-byte chunks, and after the inboxes one 8-byte flag (an NVSHMEM signal
// word) per block for each of: reduce-scatter senders (G), all-gather senders (G), inter-node
// steps (S).
constexpr int64_t kBulkMaxBlocks = 1024;
constexpr int64_t kBulkFlagBytes = 8;
enum BulkPhase : int32_t { kBulkReduceScatter = 0, kBulkAllGather = 1, kBulkInterNode = 2 };
constexpr int64_t kChunkBytes = 16;  // data bytes a thread moves at once in a bulk launch
constexpr int64_t kUnitBytes = 16;   // workspace bytes of a unit: an LL cell or a bulk chunk

JAXNVRAR_HD int64_t BulkFlagAreaBytes(int32_t gpus_per_node, int32_t num_steps) {
  return (2 * gpus_per_node + num_steps) * kBulkMaxBlocks * kBulkFlagBytes;
}

// One half of a PE's workspace (calls alternate halves), as offsets from the half's start:
// G reduce-scatter inboxes, S inter-node inboxes, S put-staging areas, G all-gather inboxes,
// each one slice of units; a one-shot launch (one node) has only the G inboxes, each the whole
// message; a bulk launch then has its flags.
struct Layout {
  int64_t slice_stride;  // elements between slice starts (a slice's capacity)
  int64_t slice_units;   // units per inbox: 16-byte LL cells of 8 data bytes, or bulk chunks
  int64_t slice_bytes;
  int64_t flags_offset;
  int64_t half_bytes;   // what a half of this layout takes
  int64_t half_stride;  // from half 0 to half 1: the same for every call of a workspace (HalfStride)
  int32_t gpus_per_node;
  int32_t num_steps;

  JAXNVRAR_HD int64_t Half(unsigned long long calls) const {
    return kWorkspaceHeaderBytes + static_cast<int64_t>(calls & 1ull) * half_stride;
  }
  JAXNVRAR_HD int64_t ReduceScatterInbox(int32_t from_local) const { return from_local * slice_bytes; }
  JAXNVRAR_HD int64_t InterNodeInbox(int32_t step) const { return (gpus_per_node + step) * slice_bytes; }
  JAXNVRAR_HD int64_t Stage(int32_t step) const { return (gpus_per_node + num_steps + step) * slice_bytes; }
  JAXNVRAR_HD int64_t AllGatherInbox(int32_t from_local) const {
    return (gpus_per_node + 2 * num_steps + from_local) * slice_bytes;
  }
  // `index`: the sending local for kBulkReduceScatter / kBulkAllGather, the step for kBulkInterNode.
  JAXNVRAR_HD int64_t BulkFlag(int32_t phase, int32_t index, int32_t block) const {
    const int64_t row = static_cast<int64_t>(phase < kBulkInterNode ? phase : kBulkInterNode) * gpus_per_node + index;
    return flags_offset + (row * kBulkMaxBlocks + block) * kBulkFlagBytes;
  }
};

// One-shot launches are for one node only (num_ranks == gpus_per_node).
JAXNVRAR_HD Layout MakeLayout(int64_t num_elements, int64_t itemsize, int32_t num_ranks, int32_t gpus_per_node,
                              bool one_shot = false, bool bulk = false) {
  Layout l = {};
  l.gpus_per_node = gpus_per_node;
  l.num_steps = NumInterNodeSteps(num_ranks / gpus_per_node);
  l.slice_stride = SliceCapacityElements(num_elements, one_shot ? 1 : gpus_per_node, itemsize);
  l.slice_units = l.slice_stride * itemsize / (bulk ? kChunkBytes : kCellDataBytes);
  l.slice_bytes = l.slice_units * kUnitBytes;
  const int64_t inboxes = one_shot ? gpus_per_node : 2 * gpus_per_node + 2 * l.num_steps;
  l.flags_offset = inboxes * l.slice_bytes;
  l.half_bytes = l.flags_offset + (bulk ? BulkFlagAreaBytes(gpus_per_node, one_shot ? 0 : l.num_steps) : 0);
  // Not a kernel's layout yet: only KernelLayout sets where half 1 starts (a layout that skipped
  // it would put half 1 before the workspace and fault, not overlap silently).
  l.half_stride = -(int64_t{1} << 60);
  return l;
}

// Where half 1 starts for every call of a workspace of `workspace_bytes`: its middle (16-byte
// units). Fixed, not the call's own half_bytes: with halves that moved with the message size,
// two consecutive calls of different sizes (either order) overlapped whenever the larger one ran
// in half 0, and one could write where a slower peer still read the other. With fixed halves,
// call k+2 (the half of call k) starts only after this rank's call k+1 ended, which needed every
// peer to have started k+1, so to have ended k. A layout fits where WorkspaceBytesNeeded <=
// workspace_bytes, i.e. half_bytes <= HalfStride.
JAXNVRAR_HD int64_t HalfStride(int64_t workspace_bytes) {
  return (workspace_bytes - kWorkspaceHeaderBytes) / 2 / kUnitBytes * kUnitBytes;
}

// The layout a kernel gets: MakeLayout's, in a workspace of `workspace_bytes`.
JAXNVRAR_HD Layout KernelLayout(int64_t num_elements, int64_t itemsize, int32_t num_ranks, int32_t gpus_per_node,
                                bool one_shot, bool bulk, int64_t workspace_bytes) {
  Layout l = MakeLayout(num_elements, itemsize, num_ranks, gpus_per_node, one_shot, bulk);
  l.half_stride = HalfStride(workspace_bytes);
  return l;
}

// The workspace is cut into one region per grouping of ranks (JAXNVRAR_GROUPINGS): every rank
// group of one mesh axis is a grouping, and all-reduces over two axes of a 2-D mesh are two.
// Each region has its own header (call counter, signature slots) and halves, so that every
// call of a region has the same peers, which the reuse argument above needs (with one shared
// counter and halves, a rank between calls over two axes could run two calls of one region
// ahead of a peer and overwrite what it still reads). Regions start 4 KB aligned.
constexpr int64_t kGroupingAlignBytes = 4096;
JAXNVRAR_HD int64_t GroupingBytes(int64_t workspace_bytes, int32_t groupings) {
  return workspace_bytes / groupings / kGroupingAlignBytes * kGroupingAlignBytes;
}

JAXNVRAR_HD int64_t WorkspaceBytesNeeded(int64_t num_elements, int64_t itemsize, int32_t num_ranks,
                                         int32_t gpus_per_node, bool one_shot = false, bool bulk = false) {
  return kWorkspaceHeaderBytes + 2 * MakeLayout(num_elements, itemsize, num_ranks, gpus_per_node, one_shot, bulk).half_bytes;
}

}  // namespace jaxnvrar

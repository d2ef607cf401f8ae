// The decode step's attention as one kernel (jaxnvrar/models/llama/attention.py is the API and the
// reference): rotary embedding of the new queries and keys, the write of the new keys and values
// into the cache, and causal attention of the queries over the cache. XLA runs the same ops as 7
// kernels per layer (rope, two cache updates, scores, softmax, PV, a transpose); each costs a launch
// gap that is most of its time at decode sizes. Experimental: see docs/llama.md for where it stands
// against those 7; g_attention_stamps shows where its time goes.
//
// One thread-block cluster per (batch row, KV head), of about SMs / pairs blocks (1 to 16; 2 where
// one block would stream a long cache); its blocks split the cache positions and stream them
// through shared-memory slots with cp.async (two unless JAXNVRAR_ATTENTION_SLOTS says more: one
// tile in flight while the other is used).
// bf16/f16 products run on tensor cores (mma.sync, operands staged in the cache dtype and read
// with ldmatrix), float32 ones on FMAs. Registers are bounded so that two blocks can share an SM
// (launch bounds; shared memory allowing): the kernel is bound by instruction latency, and the
// second block's warps hide the first's. The softmax is exact, not online: the blocks exchange each
// row's (max, sum of exponentials) through distributed shared memory once, so the weights are
// rounded to the cache dtype after normalisation, as the reference does, before the PV product;
// each block then stores its PV sums into the block that owns their slice of the outputs, which
// adds them in block order. The new keys and values are taken from the projection (never read back
// from the cache), so no block waits for the write.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "decode_attention.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace cg = cooperative_groups;

namespace jaxnvrar {
namespace {

constexpr int kClusterBlocks = 8;       // the portable maximum cluster size
constexpr int kWideClusterBlocks = 16;  // H100/H200's largest (non-portable): few (batch row, KV head) pairs
constexpr int kThreads = 256;
constexpr int kLanesPerKey = 8;  // a key's dot products are split over this many lanes

// Where each block of the last call was at each phase (globaltimer, ns; decode_attention.h lists
// the columns), for the first kAttentionStampedBlocks blocks (one store per block and column).
// Read with AttentionStamps().
__device__ unsigned long long g_attention_stamps[kAttentionStampedBlocks][kAttentionStampColumns];
__device__ int g_attention_stamped_blocks;  // of the last call

struct AttentionShape {
  int rows;        // query rows (positions) per batch row
  int q_heads;     // this rank's query heads
  int kv_heads;    // this rank's KV heads
  int group;       // query heads per KV head
  int cache_len;   // positions in the cache
  int cache_rows;  // rows written to the cache (the first ones)
  int qkv_width;   // columns of qkv: (q_heads + 2 kv_heads) * head_dim
  int chunk;       // cache positions per block
  int tile;        // cache positions per shared-memory tile (TileKeys)
  int slots;       // tiles in shared memory: slots - 1 loads in flight while one tile is used
  int parts;       // blocks per cluster (the cache positions split over them)
  int computed_rows;  // query rows computed: all, or 1 where every row is a copy of the first (twin)
};

__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ float FromFloat<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half FromFloat<__half>(float x) { return __float2half_rn(x); }
template <typename T>
__device__ __forceinline__ float RoundTo(float x) { return ToFloat(FromFloat<T>(x)); }

// Tiles hold a key's 16-byte vectors in rotated order (vector ^ key % 8): the 8 keys that one
// ldmatrix (or one lane group) reads at a time then sit in different shared-memory banks.
template <typename T, int kHeadDim>
__device__ __forceinline__ int TileOffset(int key, int vector) {
  constexpr int kVectorsPerRow = kHeadDim * static_cast<int>(sizeof(T)) / 16;
  constexpr int kRotation = kVectorsPerRow < 8 ? kVectorsPerRow : 8;
  return key * kHeadDim + (vector ^ (key % kRotation)) * (16 / static_cast<int>(sizeof(T)));
}

// Tensor-core products for 16-bit caches: D[16x8] += A[16x16] B[16x8], float32 sums of exact
// products (as XLA's bf16/f16 dots with float32 accumulation).
template <typename T>
__device__ __forceinline__ void Mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Four 8x8 matrices of 16-bit elements from shared memory, lane i giving the address of row i % 8
// of matrix i / 8; `transposed` hands out columns instead of rows.
template <bool kTransposed>
__device__ __forceinline__ void LoadMatrices(uint32_t (&r)[4], const void* row) {
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if constexpr (kTransposed) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
  }
}

// x * cos + rotate_half(x) * sin for element d of a head at `position`, as the reference computes
// it in float32 (rotate_half(x)[d] = -x[d + half] below half, x[d - half] above).
template <typename T, int kHeadDim>
__device__ __forceinline__ float Rope(const T* head, int d, int position, const float* inv_freq) {
  constexpr int kHalf = kHeadDim / 2;
  const float x = ToFloat(head[d]);
  const float rotated = d < kHalf ? -ToFloat(head[d + kHalf]) : ToFloat(head[d - kHalf]);
  const float angle = __fmul_rn(static_cast<float>(position), inv_freq[d % kHalf]);
  float sine, cosine;
  sincosf(angle, &sine, &cosine);  // one range reduction for both
  return __fadd_rn(__fmul_rn(x, cosine), __fmul_rn(rotated, sine));
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, 2)
    DecodeAttentionKernel(const T* __restrict__ qkv, const int32_t* __restrict__ positions,
                          const int32_t* __restrict__ write_at, const float* __restrict__ inv_freq,
                          T* cache_k, T* cache_v, T* __restrict__ out, AttentionShape s) {
  constexpr int kVectorsPerRow = kHeadDim * static_cast<int>(sizeof(T)) / 16;  // 16-byte vectors of a key
  constexpr int kPerVector = 16 / static_cast<int>(sizeof(T));
  constexpr int kVectorsPerLane = (kVectorsPerRow + kLanesPerKey - 1) / kLanesPerKey;
  constexpr int kPairs = kHeadDim / 2;
  constexpr int kParities = kThreads / kPairs;  // PV: a thread per pair of columns and key parity
  static_assert(kParities >= 1 && kParities <= 16, "head_dim 32, 64 or 128");
  cg::cluster_group cluster = cg::this_cluster();
  // Arrive now, wait before the first store into another block's shared memory (every block of
  // the cluster has started by then, as distributed shared memory needs): free for early blocks.
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  const int part = static_cast<int>(cluster.block_rank());
  const int kv_head = blockIdx.y, batch = blockIdx.z, tid = threadIdx.x;
  const int q_rows = s.group * s.computed_rows;  // r: query head r / computed_rows, position r % computed_rows
  const int first = part * s.chunk;
  const int last = min(s.cache_len, first + s.chunk);
  const int write = min(max(write_at[0], 0), s.cache_len - s.cache_rows);  // as dynamic_update_slice clamps
  const int64_t head_offset = (static_cast<int64_t>(batch) * s.kv_heads + kv_head) * s.cache_len * kHeadDim;
  // Phase times of every block (`attention_stamps()`), for tuning.
  const int block_index = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const bool stamping = tid == 0 && block_index < kAttentionStampedBlocks;
  if (tid == 0 && block_index == 0)
    g_attention_stamped_blocks = min(kAttentionStampedBlocks, static_cast<int>(gridDim.x * gridDim.y * gridDim.z));
  auto Now = [] {
    unsigned long long now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    return now;
  };
  auto Stamp = [&](int column) {
    if (stamping) g_attention_stamps[block_index][column] = Now();
  };
  unsigned long long waited[2] = {0, 0};  // ns spent waiting for key tiles, value tiles (thread 0)
  Stamp(0);

  extern __shared__ __align__(16) unsigned char shared[];
  // 16-bit caches go through tensor cores (mma.sync); float32 ones through FMAs, in full precision.
  constexpr bool kTensorCores = sizeof(T) == 2;
  // [slots][s.tile][kHeadDim]: tiles of keys, then of values (TileOffset order); s.tile is a
  // multiple of 16 (whole steps of the tensor-core products)
  // Load i uses slot i % slots; loads are issued and used in order, so two running pointers
  // stand for that division.
  T* const first_slot = reinterpret_cast<T*>(shared);
  T* const past_slots = first_slot + s.slots * s.tile * kHeadDim;
  auto next_slot = [&](T* slot) {
    slot += s.tile * kHeadDim;
    return slot == past_slots ? first_slot : slot;
  };
  T* issue_slot = first_slot;  // of the next load issued
  T* use_slot = first_slot;    // of the next load used
  const int staged_width = (s.group + 2) * kHeadDim;
  T* staged = past_slots;  // [rows][staged_width]: this KV head's q | k | v columns
  // Tensor-core operands, in T, of 16-row blocks (rows past q_rows are zeros): the roped queries
  // (TileOffset order) and the normalized weights (rows of weight_stride: an odd number of 16-byte
  // vectors, so that 8 rows' vectors sit in different banks).
  const int mma_rows = kTensorCores ? (q_rows + 15) / 16 * 16 : 0;
  const int weight_stride = (s.chunk + 15) / 16 * 16 + 8;
  T* q_mma = staged + s.rows * staged_width;          // [mma_rows][kHeadDim]
  T* weights_mma = q_mma + mma_rows * kHeadDim;       // [mma_rows][weight_stride]
  float* frequencies = reinterpret_cast<float*>(weights_mma + mma_rows * weight_stride);  // [kHeadDim / 2]
  float* q = frequencies + kHeadDim / 2;            // [q_rows][kHeadDim], roped, as T (FMA products)
  float* new_k = q + q_rows * kHeadDim;             // [cache_rows][kHeadDim], roped, rounded to T
  float* new_v = new_k + s.cache_rows * kHeadDim;   // [cache_rows][kHeadDim]
  float* halves = new_v + s.cache_rows * kHeadDim;  // [kParities][q_rows][kHeadDim]: PV sums per key share
  float2* stats = reinterpret_cast<float2*>(halves + kParities * q_rows * kHeadDim);  // [q_rows]: (max, sum exp)
  float2* stats_inbox = stats + q_rows;             // [parts][q_rows]: every block's, stored by them
  float2* totals = stats_inbox + s.parts * q_rows;  // [q_rows]: the cluster's
  const int slice = (q_rows * kHeadDim + s.parts - 1) / s.parts;  // outputs each block sums and writes
  float* pv_inbox = reinterpret_cast<float*>(totals + q_rows);    // [parts][slice]: the blocks' PV sums of them
  float* weights = pv_inbox + s.parts * slice;      // [q_rows][chunk]: scores, then weights
  int* pos = reinterpret_cast<int*>(weights + q_rows * s.chunk);  // [rows]
  int* row_pos = pos + s.rows;                      // [q_rows]: each query row's position

  // Copies keys [from, from + keys) of a cache into a tile, asynchronously: every thread's
  // 16-byte copies are in flight at once (the latency is paid once per tile, not per key). A
  // thread always copies the same vector of every kKeyStep-th key, so its source and destination
  // just advance by kKeyStep rows (the rotation of TileOffset repeats every 8 keys).
  constexpr int kKeyStep = kThreads / kVectorsPerRow;
  static_assert(kThreads % kVectorsPerRow == 0 && kKeyStep % 8 == 0, "a thread's vector and rotation stay fixed");
  const int copy_key = tid / kVectorsPerRow, copy_vector = tid % kVectorsPerRow;
  const int copy_offset = TileOffset<T, kHeadDim>(copy_key, copy_vector);
  auto start_copy = [&](T* tile, const T* cache, int from, int keys) {
    const T* src = cache + head_offset + static_cast<int64_t>(from + copy_key) * kHeadDim + copy_vector * kPerVector;
    T* dst = tile + copy_offset;
    // The new rows are skipped: patch() writes them (keep the two conditions the same). The
    // pointers end one step past the last key, never dereferenced there.
    for (int key = copy_key; key < keys; key += kKeyStep, src += kKeyStep * kHeadDim, dst += kKeyStep * kHeadDim)
      if (static_cast<unsigned>(from + key - write) >= static_cast<unsigned>(s.cache_rows))
        __pipeline_memcpy_async(dst, src, 16);
    __pipeline_commit();
  };
  // The new rows come from the projection, never from the cache (which this kernel writes): the
  // copies skip them, so they are written here while the copies are in flight, each thread the
  // elements of `fresh` that it roped itself (the same i = tid + n kThreads): no barrier needed.
  // Values also get zero rows after the last key, up to the 16-key step (weight 0 x a stale NaN
  // would be NaN); keys need none (a padding key's scores are never stored).
  auto patch = [&](T* tile, const float* fresh, int from, int keys, bool pad) {
    if (write < from + keys && write + s.cache_rows > from) {
      #pragma unroll 1
      for (int i = tid; i < s.cache_rows * kHeadDim; i += kThreads) {  // the rope's loop, element for element
        const int key = write + i / kHeadDim, d = i % kHeadDim;
        if (key >= from && key < from + keys)
          tile[TileOffset<T, kHeadDim>(key - from, d / kPerVector) + d % kPerVector] = FromFloat<T>(fresh[i]);
      }
    }
    if (pad) {
      uint4* padding = reinterpret_cast<uint4*>(tile + keys * kHeadDim);  // whole key rows: 16-byte aligned
      #pragma unroll 1
      for (int i = tid; i < ((keys + 15) / 16 * 16 - keys) * kVectorsPerRow; i += kThreads) padding[i] = make_uint4(0, 0, 0, 0);
    }
  };
  // This KV head's columns of the projection and the frequencies, copied asynchronously first.
  const T* tokens = qkv + static_cast<int64_t>(batch) * s.rows * s.qkv_width;
  {
    constexpr int kVectorsPerHead = kHeadDim * static_cast<int>(sizeof(T)) / 16;
    const int vectors_per_row = (s.group + 2) * kVectorsPerHead;
    #pragma unroll 1
    for (int i = tid; i < s.rows * vectors_per_row; i += kThreads) {
      const int row = i / vectors_per_row, vector = i % vectors_per_row, head = vector / kVectorsPerHead;
      const int column = head < s.group ? (kv_head * s.group + head) * kHeadDim                     // q
                                        : s.q_heads * kHeadDim + (head - s.group) * s.kv_heads * kHeadDim  // k, v
                                              + kv_head * kHeadDim;
      __pipeline_memcpy_async(staged + row * staged_width + head * kHeadDim + (vector % kVectorsPerHead) * kPerVector,
                              tokens + static_cast<int64_t>(row) * s.qkv_width + column + (vector % kVectorsPerHead) * kPerVector,
                              16);
    }
    for (int i = tid; i < kHeadDim / 8; i += kThreads)  // kHeadDim / 2 floats in 16-byte vectors
      __pipeline_memcpy_async(frequencies + 4 * i, inv_freq + 4 * i, 16);
    __pipeline_commit();
  }
  // Then the cache in tiles: loads 0 .. tiles - 1 are the keys', tiles .. 2 tiles - 1 the values';
  // load i goes to slot i % slots, issued as soon as load i - slots is done with, so slots - 1
  // copies are in flight during each tile's products. Each issue commits a group (empty past the
  // last), so that waiting for load i is always "all but the newest slots - 1 groups".
  const int tiles = first < last ? (last - first + s.tile - 1) / s.tile : 0;
  auto issue = [&](int i) {
    if (i < 2 * tiles) {
      const int from = first + (i < tiles ? i : i - tiles) * s.tile;
      start_copy(issue_slot, i < tiles ? cache_k : cache_v, from, min(s.tile, last - from));
      issue_slot = next_slot(issue_slot);
    } else {
      __pipeline_commit();
    }
  };
  // Waits for load i (loads up to i + slots - 2 issued): its group and every thread's copies. Then
  // every thread is done with load i - 1's tile, whose slot load i + slots - 1 refills.
  auto wait_for_load = [&](int kind) {
    const unsigned long long since = tid == 0 ? Now() : 0;
    switch (s.slots) {  // the count must be an immediate
      case 2: __pipeline_wait_prior(0); break;
      case 3: __pipeline_wait_prior(1); break;
      default: __pipeline_wait_prior(2); break;
    }
    __syncthreads();
    if (tid == 0) waited[kind] += Now() - since;
  };
  for (int i = 0; i < s.slots - 1; ++i) issue(i);
  #pragma unroll 1
  for (int i = tid; i < s.rows; i += kThreads) pos[i] = positions[i];
  #pragma unroll 1
  for (int i = tid; i < q_rows; i += kThreads) row_pos[i] = positions[i % s.computed_rows];
  #pragma unroll 1
  for (int i = tid; i < kParities * q_rows * kHeadDim; i += kThreads) halves[i] = 0.0f;
  if constexpr (kTensorCores) {  // the padding rows and columns of the operands stay zeros
    for (int i = tid; i < (mma_rows * kHeadDim + mma_rows * weight_stride) * static_cast<int>(sizeof(T)) / 16; i += kThreads)
      reinterpret_cast<uint4*>(q_mma)[i] = make_uint4(0, 0, 0, 0);
  }
  switch (s.slots) {  // the projection's columns, the oldest group; the tiles may still be in flight
    case 2: __pipeline_wait_prior(1); break;
    case 3: __pipeline_wait_prior(2); break;
    default: __pipeline_wait_prior(3); break;
  }
  __syncthreads();
  Stamp(1);  // projection columns in shared memory
  #pragma unroll 1
  for (int i = tid; i < q_rows * kHeadDim; i += kThreads) {
    const int r = i / kHeadDim, d = i % kHeadDim, row = r % s.computed_rows;
    const float roped = Rope<T, kHeadDim>(staged + row * staged_width + (r / s.computed_rows) * kHeadDim, d, pos[row],
                                          frequencies);
    if constexpr (kTensorCores) {
      q_mma[TileOffset<T, kHeadDim>(r, d / kPerVector) + d % kPerVector] = FromFloat<T>(roped);
    } else {
      q[i] = RoundTo<T>(roped);
    }
  }
  #pragma unroll 1
  for (int i = tid; i < s.cache_rows * kHeadDim; i += kThreads) {  // patch() relies on this thread mapping
    const int row = i / kHeadDim, d = i % kHeadDim;
    new_k[i] = RoundTo<T>(Rope<T, kHeadDim>(staged + row * staged_width + s.group * kHeadDim, d, pos[row], frequencies));
    new_v[i] = ToFloat(staged[row * staged_width + (s.group + 1) * kHeadDim + d]);
  }
  // No barrier here: the first tile's wait (or, without tiles, the one after the scores) is it.
  Stamp(2);  // queries and new rows roped (thread 0)

  // Scores: kLanesPerKey lanes per key, lane l reading the key's 16-byte vectors l, l + 8, ...
  // (a key's lanes read consecutive bytes of shared memory).
  const float root = sqrtf(static_cast<float>(kHeadDim));  // the reference divides by it
  const int lane = tid % kLanesPerKey;
  const int warp = tid / 32, warp_lane = tid % 32;
  for (int t = 0; t < tiles; ++t) {
    const int from = first + t * s.tile, keys = min(s.tile, last - from);
    T* k_tile = use_slot;
    use_slot = next_slot(use_slot);
    patch(k_tile, new_k, from, keys, false);
    wait_for_load(0);  // load t, and the patch
    issue(t + s.slots - 1);
    if constexpr (kTensorCores) {
      // Warp w takes keys [8 n, 8 n + 8) for n = w, w + 8, ...: per 16-row block of queries, 16x8
      // scores from kHeadDim / 16 products (a 16x16 block of queries per ldmatrix).
      for (int m0 = 0; m0 < q_rows; m0 += 16) {
        uint32_t a[kHeadDim / 16][4];
#pragma unroll
        for (int step = 0; step < kHeadDim / 16; ++step)
          LoadMatrices<false>(a[step], q_mma + TileOffset<T, kHeadDim>(m0 + warp_lane % 8 + (warp_lane / 8) % 2 * 8,
                                                                       2 * step + warp_lane / 16));
        // This lane's two rows of scores (fragment rows lane / 4 and lane / 4 + 8), found once per tile.
        const int rows[2] = {m0 + warp_lane / 4, m0 + warp_lane / 4 + 8};
        const bool real[2] = {rows[0] < q_rows, rows[1] < q_rows};  // not padding
        const int row_positions[2] = {real[0] ? row_pos[rows[0]] : 0, real[1] ? row_pos[rows[1]] : 0};
        float* const scores[2] = {weights + rows[0] * s.chunk + from - first, weights + rows[1] * s.chunk + from - first};
        for (int n0 = 8 * warp; n0 < keys; n0 += 8 * (kThreads / 32)) {
          float c[4] = {};
#pragma unroll
          for (int step = 0; step < kHeadDim / 16; step += 2) {  // two steps per ldmatrix: 32 dimensions
            // n0 is a multiple of 8: key n0 + lane % 8 has the rotation of key lane % 8
            uint32_t b[4];
            LoadMatrices<false>(b, k_tile + n0 * kHeadDim + TileOffset<T, kHeadDim>(warp_lane % 8, 2 * step + warp_lane / 8));
            Mma16816<T>(c, a[step], b[0], b[1]);
            Mma16816<T>(c, a[step + 1], b[2], b[3]);
          }
          // Columns j >= keys hold products with stale (padding) key rows, possibly NaN: never use them.
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int j = n0 + (warp_lane % 4) * 2 + i % 2;
            if (real[i / 2] && j < keys) scores[i / 2][j] = from + j <= row_positions[i / 2] ? c[i] / root : -INFINITY;
          }
        }
      }
    } else {
      for (int base = 0; base < keys; base += kThreads / kLanesPerKey) {  // uniform: the shuffles need every lane
        const int j = base + tid / kLanesPerKey;
        float k[kVectorsPerLane * kPerVector] = {};
#pragma unroll
        for (int v = 0; v < kVectorsPerLane; ++v) {
          const int vector = v * kLanesPerKey + lane;
          if (j < keys && vector < kVectorsPerRow) {
            const uint4 raw = *reinterpret_cast<const uint4*>(k_tile + TileOffset<T, kHeadDim>(j, vector));
            const T* elements = reinterpret_cast<const T*>(&raw);
#pragma unroll
            for (int e = 0; e < kPerVector; ++e) k[v * kPerVector + e] = ToFloat(elements[e]);
          }
        }
        for (int r0 = 0; r0 < q_rows; r0 += 4) {  // 4 rows' sums at once: independent chains
          float dot[4] = {};
#pragma unroll
          for (int v = 0; v < kVectorsPerLane; ++v) {
            const int vector = v * kLanesPerKey + lane;
            if (vector < kVectorsPerRow) {
#pragma unroll
              for (int r = 0; r < 4; ++r) {
                const float* qr = q + min(r0 + r, q_rows - 1) * kHeadDim + vector * kPerVector;
#pragma unroll
                for (int e = 0; e < kPerVector; ++e) dot[r] = fmaf(qr[e], k[v * kPerVector + e], dot[r]);
              }
            }
          }
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            for (int offset = kLanesPerKey / 2; offset > 0; offset /= 2) dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], offset);
          }
          const int key = from + j;
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            if (lane == 0 && j < keys && r0 + r < q_rows)
              weights[(r0 + r) * s.chunk + key - first] = key <= row_pos[r0 + r] ? dot[r] / root : -INFINITY;
          }
        }
      }
    }
  }
  __syncthreads();  // every block's scores (of the weights)
  Stamp(3);  // scores done
  // Softmax over the whole cluster's keys, exact (not online): each block's (max, sum of
  // exp(score - max)) per row goes to every block in one exchange; the cluster's sum is then
  // sum_b sum_b * exp(max_b - max), added over the blocks in a fixed (shuffle-tree) order.
  for (int r = warp; r < q_rows; r += kThreads / 32) {
    float m = -INFINITY, sum = 0.0f;
    for (int j = warp_lane; j < last - first; j += 32) m = fmaxf(m, weights[r * s.chunk + j]);
    for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    if (m != -INFINITY)
      for (int j = warp_lane; j < last - first; j += 32) sum += expf(weights[r * s.chunk + j] - m);
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (warp_lane == 0) stats[r] = make_float2(m, sum);
  }
  __syncthreads();
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");  // every block has started
  #pragma unroll 1
  for (int i = tid; i < s.parts * q_rows; i += kThreads)
    cluster.map_shared_rank(stats_inbox, i / q_rows)[part * q_rows + i % q_rows] = stats[i % q_rows];
  cluster.sync();
  Stamp(4);  // statistics exchanged
  // A warp per row, a lane per block (parts <= 32): a shuffle tree, not a chain of parts steps.
  for (int r = warp; r < q_rows; r += kThreads / 32) {
    const float2 block = warp_lane < s.parts ? stats_inbox[warp_lane * q_rows + r] : make_float2(-INFINITY, 0.0f);
    float m = block.x;
    for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    float sum = block.y > 0.0f ? block.y * expf(block.x - m) : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (warp_lane == 0) totals[r] = make_float2(m, sum);
  }
  __syncthreads();
  // Rounded to T, as the reference's weights; a row per warp, or several warps per row where the
  // rows are fewer than the warps.
  const int warps_per_row = max(1, kThreads / 32 / q_rows), rows_at_once = kThreads / 32 / warps_per_row;
  for (int r = warp / warps_per_row; r < q_rows && warp < rows_at_once * warps_per_row; r += rows_at_once) {
    for (int j = warp % warps_per_row * 32 + warp_lane; j < last - first; j += 32 * warps_per_row) {
      const float weight = expf(weights[r * s.chunk + j] - totals[r].x) / totals[r].y;
      if constexpr (kTensorCores) {
        weights_mma[r * weight_stride + j] = FromFloat<T>(weight);
      } else {
        weights[r * s.chunk + j] = RoundTo<T>(weight);
      }
    }
  }
  __syncthreads();
  Stamp(5);  // weights normalized over the cluster

  // PV, into per-parity sums that each thread owns (FMAs), or per-warp fragments (tensor cores).
  const int pair = tid % kPairs, parity = tid / kPairs;
  constexpr int kDimTilesPerWarp = kHeadDim / 8 >= 16 ? 2 : 1;           // 8 dimensions per tile
  constexpr int kWarpSets = kHeadDim / 8 / kDimTilesPerWarp;               // warps over the dimensions
  constexpr int kKeySplit = kThreads / 32 / kWarpSets;                     // and over the keys
  static_assert(kKeySplit >= 1 && kKeySplit <= kParities, "the key split's sums go where the parities' do");
  const int dim0 = warp % kWarpSets * kDimTilesPerWarp * 8, key_part = warp / kWarpSets;
  float acc[2][kDimTilesPerWarp][4] = {};
  for (int t = 0; t < tiles; ++t) {
    const int from = first + t * s.tile, keys = min(s.tile, last - from);
    T* v_tile = use_slot;
    use_slot = next_slot(use_slot);
    patch(v_tile, new_v, from, keys, keys % 16 != 0);
    wait_for_load(1);  // load tiles + t, and the patch
    issue(tiles + t + s.slots - 1);
    if constexpr (kTensorCores) {
      // Warp w sums dimensions [dim0, dim0 + 8 kDimTilesPerWarp) over its share of 16-key steps;
      // the rows of the tile past its last key are zeros (and so are the weights past the block's).
      for (int k0 = 16 * key_part; k0 < keys; k0 += 16 * kKeySplit) {
        uint32_t b[4];
        LoadMatrices<true>(b, v_tile + k0 * kHeadDim +  // k0 is a multiple of 16: the rotation of keys 0 .. 15
                                  TileOffset<T, kHeadDim>(warp_lane % 8 + (warp_lane / 8) % 2 * 8,
                                                          (dim0 / 8 + warp_lane / 16) % kVectorsPerRow));
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          if (16 * m >= q_rows) break;
          uint32_t a[4];  // weights of rows [16 m, 16 m + 16), keys [k0, k0 + 16) of the tile
          LoadMatrices<false>(a, weights_mma + (16 * m + warp_lane % 8 + (warp_lane / 8) % 2 * 8) * weight_stride +
                                     from - first + k0 + warp_lane / 16 * 8);
          Mma16816<T>(acc[m][0], a, b[0], b[1]);
          if constexpr (kDimTilesPerWarp == 2) Mma16816<T>(acc[m][1], a, b[2], b[3]);
        }
      }
    } else {
      for (int r0 = 0; r0 < q_rows; r0 += 8) {  // 8 rows of sums in registers at a time
        float acc[8][2] = {};
        for (int j = parity; j < keys; j += kParities) {
          const T* src = v_tile + TileOffset<T, kHeadDim>(j, 2 * pair / kPerVector) + 2 * pair % kPerVector;
          const float v0 = ToFloat(src[0]), v1 = ToFloat(src[1]);
#pragma unroll
          for (int r = 0; r < 8; ++r) {
            if (r0 + r < q_rows) {
              const float w = weights[(r0 + r) * s.chunk + from + j - first];
              acc[r][0] = fmaf(w, v0, acc[r][0]);
              acc[r][1] = fmaf(w, v1, acc[r][1]);
            }
          }
        }
#pragma unroll
        for (int r = 0; r < 8; ++r) {
          if (r0 + r < q_rows) {
            halves[(parity * q_rows + r0 + r) * kHeadDim + 2 * pair] += acc[r][0];
            halves[(parity * q_rows + r0 + r) * kHeadDim + 2 * pair + 1] += acc[r][1];
          }
        }
      }
    }
  }
  if constexpr (kTensorCores) {
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
      for (int t = 0; t < kDimTilesPerWarp; ++t) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = 16 * m + warp_lane / 4 + i / 2 * 8, d = dim0 + 8 * t + (warp_lane % 4) * 2 + i % 2;
          if (r < q_rows) halves[(key_part * q_rows + r) * kHeadDim + d] = acc[m][t][i];
        }
      }
    }
  }
  __syncthreads();  // every warp's PV sums
  // Each block's PV sums go to the block that owns their slice of the outputs, which adds them
  // in block order after the exchange: no block reads another's shared memory, so none waits
  // for the others before it leaves.
  #pragma unroll 1
  for (int i = tid; i < q_rows * kHeadDim; i += kThreads) {
    float sum = 0.0f;
    for (int p = 0; p < (kTensorCores ? kKeySplit : kParities); ++p) sum += halves[p * q_rows * kHeadDim + i];
    const int owner = i / slice;
    cluster.map_shared_rank(pv_inbox, owner)[part * slice + i - owner * slice] = sum;
  }
  cluster.sync();
  Stamp(6);  // PV sums exchanged
  // A computed row's result goes to the rows that copy it (the twin's second row).
  #pragma unroll 1
  for (int i = part * slice + tid; i < min(q_rows * kHeadDim, (part + 1) * slice); i += kThreads) {
    float sum = 0.0f;
    for (int b = 0; b < s.parts; ++b) sum += pv_inbox[b * slice + i - part * slice];
    const int r = i / kHeadDim, d = i % kHeadDim, head = kv_head * s.group + r / s.computed_rows;
    for (int row = r % s.computed_rows; row < s.rows; row += s.computed_rows)
      out[(static_cast<int64_t>(batch) * s.rows + row) * s.q_heads * kHeadDim + head * kHeadDim + d] = FromFloat<T>(sum);
  }
  Stamp(7);  // outputs written
  // The new rows into the cache, last: no block of this kernel reads them from there.
  if (part == 0) {
    #pragma unroll 1
    for (int i = tid; i < s.cache_rows * kHeadDim; i += kThreads) {
      cache_k[head_offset + static_cast<int64_t>(write) * kHeadDim + i] = FromFloat<T>(new_k[i]);
      cache_v[head_offset + static_cast<int64_t>(write) * kHeadDim + i] = FromFloat<T>(new_v[i]);
    }
  }
  Stamp(8);
  if (stamping) {
    g_attention_stamps[block_index][9] = waited[0];
    g_attention_stamps[block_index][10] = waited[1];
  }
}

// A block's shared memory at most (of the H100/H200's 227 KB; attention.py's KERNEL_MAX_SHARED_BYTES).
constexpr int kMaxSharedBytes = 220 * 1024;
// A tile of keys or values at most (JAXNVRAR_ATTENTION_TILE_KB for tuning), and tiles in shared
// memory (JAXNVRAR_ATTENTION_SLOTS, 2 to 4): small enough for two or three blocks per SM. 32 KB
// (128 positions of 128 bf16) measured best of 16/24/32/48 KB on one H200 (2026-12-02, 8B
// shapes at TP 1 and 2, batch 1-16: fewer tiles per block at batch 16, as fast at batch 1).
constexpr int64_t kTileBytes = 32 * 1024;
constexpr int kSlots = 2;

// Keys per tile: a multiple of 16 (whole steps of the tensor-core products; tiles then start on
// 16-byte vectors of the weights), at most tile_bytes of them where that is 16 keys or more, the
// block's keys split into tiles as equal as that allows.
int TileKeys(int chunk, int head_dim, int element_bytes, int64_t tile_bytes) {
  const int64_t most = std::max<int64_t>(16, tile_bytes / (head_dim * element_bytes) / 16 * 16);
  const int64_t tiles = (chunk + most - 1) / most;
  return static_cast<int>(std::max<int64_t>(16, ((chunk + tiles - 1) / tiles + 15) / 16 * 16));
}

// `parts` blocks per (batch row, KV head): the cache positions each block takes, and its tiles.
void SplitPositions(AttentionShape& s, int parts, int head_dim, int element_bytes, int64_t tile_bytes) {
  s.parts = parts;
  s.chunk = (s.cache_len + parts - 1) / parts;
  s.tile = TileKeys(s.chunk, head_dim, element_bytes, tile_bytes);
}

int64_t SharedBytes(const AttentionShape& s, int head_dim, int element_bytes) {
  const int64_t q_rows = s.group * s.computed_rows;
  const int64_t parities = kThreads / (head_dim / 2);
  const int64_t mma_rows = element_bytes == 2 ? (q_rows + 15) / 16 * 16 : 0;  // tensor-core operands
  const int64_t weight_stride = (s.chunk + 15) / 16 * 16 + 8;
  const int64_t slice = (q_rows * head_dim + s.parts - 1) / s.parts;
  return s.slots * s.tile * head_dim * element_bytes + static_cast<int64_t>(s.rows) * (s.group + 2) * head_dim * element_bytes +
         mma_rows * (head_dim + weight_stride) * element_bytes +
         4 * (head_dim / 2 + q_rows * head_dim * (1 + parities) + 2LL * s.cache_rows * head_dim + 2 * q_rows * (2 + s.parts) +
              s.parts * slice + q_rows * s.chunk + s.rows + q_rows);
}

// A launch of cluster size `parts`: the positions per block and tile it gives, and the shared memory.
struct LaunchPlan {
  cudaLaunchConfig_t config;
  cudaLaunchAttribute attribute[1];
};

template <typename T, int kHeadDim>
cudaError_t Plan(AttentionShape& s, int parts, int64_t tile_bytes, int batch, cudaStream_t stream, LaunchPlan& plan) {
  SplitPositions(s, parts, kHeadDim, sizeof(T), tile_bytes);
  const int64_t shared_bytes = SharedBytes(s, kHeadDim, sizeof(T));
  auto kernel = DecodeAttentionKernel<T, kHeadDim>;
  // The largest the kernel may use (attention.py's KERNEL_MAX_SHARED_BYTES), the same on every
  // call: the attribute is the function's, not the call's.
  if (shared_bytes > kMaxSharedBytes) return cudaErrorInvalidValue;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSharedBytes);
  // All of L1 as shared memory: else the driver may pick a split that fits one block per SM where
  // two would fit (seen: 1024 blocks of 87 KB ran ~110 at a time on 132 SMs).
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  if (err == cudaSuccess && parts > kClusterBlocks)
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  plan.config = {};
  plan.config.gridDim = dim3(parts, s.kv_heads, batch);
  plan.config.blockDim = dim3(kThreads);
  plan.config.dynamicSmemBytes = shared_bytes;
  plan.config.stream = stream;
  plan.attribute[0].id = cudaLaunchAttributeClusterDimension;
  plan.attribute[0].val.clusterDim.x = parts;
  plan.attribute[0].val.clusterDim.y = 1;
  plan.attribute[0].val.clusterDim.z = 1;
  plan.config.attrs = plan.attribute;
  plan.config.numAttrs = 1;
  return err;
}

// A tuning variable's value: a whole number in [low, high] (else false; "3x" and "2.5" too).
bool ParseKnob(const char* text, int low, int high, int* value) {
  char* end = nullptr;
  errno = 0;
  const long parsed = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || errno == ERANGE || parsed < low || parsed > high) return false;
  *value = static_cast<int>(parsed);
  return true;
}

ffi::Error KnobError(const char* name, int low, int high, const char* text) {
  return ffi::Error::InvalidArgument(std::string("jaxnvrar: ") + name + " must be " + std::to_string(low) + " to " +
                                     std::to_string(high) + ", not '" + text + "'; unset it for the built-in choice");
}

template <typename T, int kHeadDim>
ffi::Error LaunchTyped(cudaStream_t stream, const ffi::AnyBuffer& qkv, const int32_t* positions,
                       const int32_t* write_at, const float* inv_freq, void* cache_k, void* cache_v, void* out,
                       AttentionShape s, int batch) {
  auto kernel = DecodeAttentionKernel<T, kHeadDim>;
  // Tuning knobs (unset: the built-in choices): bytes per tile and tiles in shared memory.
  int tile_kb = static_cast<int>(kTileBytes / 1024);
  s.slots = kSlots;
  struct Knob { const char* name; int low, high; int* value; };
  for (const Knob& knob : {Knob{"JAXNVRAR_ATTENTION_TILE_KB", 1, 96, &tile_kb}, Knob{"JAXNVRAR_ATTENTION_SLOTS", 2, 4, &s.slots}}) {
    const char* text = std::getenv(knob.name);
    if (text == nullptr || *text == '\0') continue;
    if (!ParseKnob(text, knob.low, knob.high, knob.value)) return KnobError(knob.name, knob.low, knob.high, text);
  }
  const int64_t tile_bytes = 1024LL * tile_kb;
  // Blocks per (batch row, KV head): about one block per SM in all (a block's keys stream through
  // its tiles; more blocks per pair cost more exchanges); JAXNVRAR_ATTENTION_CLUSTER=1..16 for tuning.
  const char* forced = std::getenv("JAXNVRAR_ATTENTION_CLUSTER");
  if (forced != nullptr && *forced == '\0') forced = nullptr;
  int parts = 1;
  // A size the GPU refuses below is not an error of this call: forget it, unless an error was
  // already pending (someone else's, to be reported by them).
  const bool error_pending = cudaPeekAtLastError() != cudaSuccess;
  auto forget_refusal = [&] {
    if (!error_pending) cudaGetLastError();
  };
  if (forced != nullptr) {
    if (!ParseKnob(forced, 1, kWideClusterBlocks, &parts))
      return KnobError("JAXNVRAR_ATTENTION_CLUSTER", 1, kWideClusterBlocks, forced);
  } else {
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
      return ffi::Error::Internal("jaxnvrar: decode attention: no CUDA device");
    while (parts < kWideClusterBlocks && 2 * batch * s.kv_heads * parts <= sms) parts *= 2;
    // A block's time grows with its tiles more than a second block per SM slows it: where a block
    // would stream over 512 positions, double the blocks while all of them fit on the GPU at once
    // (two per SM at most; seen on H200 at 128 pairs: 2 blocks per pair 41 us, 1 block 62 us).
    while (parts < kClusterBlocks && (s.cache_len + parts - 1) / parts > 512 && batch * s.kv_heads * parts <= sms) {
      LaunchPlan trial;
      int clusters = 0;
      if (Plan<T, kHeadDim>(s, 2 * parts, tile_bytes, batch, stream, trial) != cudaSuccess ||
          cudaOccupancyMaxActiveClusters(&clusters, kernel, &trial.config) != cudaSuccess || clusters < batch * s.kv_heads) {
        forget_refusal();
        break;
      }
      parts *= 2;
    }
  }
  // Then more blocks where a block's shared memory would not fit, and 8 where the GPU cannot place
  // clusters of 16 (beyond the portable 8; asked per call site's shapes, a host query).
  LaunchPlan plan;
  cudaError_t err = cudaErrorUnknown;
  for (const int tried : {parts, 2 * parts, 4 * parts, 8 * parts, 16 * parts, kClusterBlocks}) {
    if (tried > kWideClusterBlocks || (tried < parts && parts <= kClusterBlocks)) continue;
    err = Plan<T, kHeadDim>(s, tried, tile_bytes, batch, stream, plan);
    if (err == cudaSuccess && tried > kClusterBlocks) {
      int clusters = 0;
      err = cudaOccupancyMaxActiveClusters(&clusters, kernel, &plan.config);
      if (err == cudaSuccess && clusters < 1) err = cudaErrorInvalidConfiguration;
    }
    if (err == cudaSuccess || forced != nullptr) break;
    forget_refusal();
  }
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("jaxnvrar: decode attention") +
                                (forced ? std::string(" with JAXNVRAR_ATTENTION_CLUSTER=") + forced : std::string()) +
                                ": " + cudaGetErrorString(err));
  err = cudaLaunchKernelEx(&plan.config, kernel, static_cast<const T*>(qkv.untyped_data()), positions, write_at,
                           inv_freq, static_cast<T*>(cache_k), static_cast<T*>(cache_v), static_cast<T*>(out), s);
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("jaxnvrar: decode attention launch: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

template <typename T>
ffi::Error LaunchForHeadDim(int head_dim, cudaStream_t stream, const ffi::AnyBuffer& qkv, const int32_t* positions,
                            const int32_t* write_at, const float* inv_freq, void* cache_k, void* cache_v, void* out,
                            const AttentionShape& s, int batch) {
  if (head_dim == 128)
    return LaunchTyped<T, 128>(stream, qkv, positions, write_at, inv_freq, cache_k, cache_v, out, s, batch);
  if (head_dim == 64)
    return LaunchTyped<T, 64>(stream, qkv, positions, write_at, inv_freq, cache_k, cache_v, out, s, batch);
  if (head_dim == 32)
    return LaunchTyped<T, 32>(stream, qkv, positions, write_at, inv_freq, cache_k, cache_v, out, s, batch);
  return ffi::Error::InvalidArgument("jaxnvrar: decode attention takes head_dim 32, 64 or 128, not " + std::to_string(head_dim));
}

ffi::Error Execute(cudaStream_t stream, ffi::AnyBuffer qkv, ffi::Buffer<ffi::S32> positions,
                   ffi::Buffer<ffi::S32> write_at, ffi::Buffer<ffi::F32> inv_freq, ffi::AnyBuffer cache_k_in,
                   ffi::AnyBuffer cache_v_in, ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> cache_k,
                   ffi::Result<ffi::AnyBuffer> cache_v, int32_t q_heads, int32_t cache_rows, int32_t twin) {
  const auto q_dims = qkv.dimensions();
  const auto c_dims = cache_k_in.dimensions();
  if (q_dims.size() != 3 || c_dims.size() != 4)
    return ffi::Error::InvalidArgument("jaxnvrar: decode attention takes qkv [batch, rows, width] and caches [batch, kv_heads, positions, head_dim]");
  const int batch = static_cast<int>(q_dims[0]);
  AttentionShape s;
  s.rows = static_cast<int>(q_dims[1]);
  s.qkv_width = static_cast<int>(q_dims[2]);
  s.kv_heads = static_cast<int>(c_dims[1]);
  s.cache_len = static_cast<int>(c_dims[2]);
  const int head_dim = static_cast<int>(c_dims[3]);
  s.q_heads = q_heads;
  s.cache_rows = cache_rows;
  if (batch == 0) return ffi::Error::Success();
  if (s.kv_heads < 1 || q_heads < 1 || q_heads % s.kv_heads != 0 || s.qkv_width != (q_heads + 2 * s.kv_heads) * head_dim ||
      c_dims[0] != batch || cache_rows < 1 || cache_rows > s.rows || cache_rows > s.cache_len ||
      cache_v_in.dimensions().size() != 4 || !std::equal(c_dims.begin(), c_dims.end(), cache_v_in.dimensions().begin()) ||
      positions.element_count() != s.rows || inv_freq.element_count() != head_dim / 2 || write_at.element_count() != 1 ||
      out->element_count() != static_cast<size_t>(batch) * s.rows * q_heads * head_dim ||
      cache_k->element_count() != cache_k_in.element_count() || cache_v->element_count() != cache_v_in.element_count())
    return ffi::Error::InvalidArgument(
        "jaxnvrar: decode attention: shapes of qkv, caches, positions, inv_freq, q_heads and the results disagree");
  s.group = q_heads / s.kv_heads;
  s.computed_rows = twin ? 1 : s.rows;
  if (s.group * s.computed_rows > 32)  // the products take two 16-row blocks of queries
    return ffi::Error::InvalidArgument("jaxnvrar: decode attention takes at most 32 computed query rows per KV head "
                                       "(query heads per KV head x rows), not " + std::to_string(s.group * s.computed_rows));
  if (twin && s.cache_rows != 1)
    return ffi::Error::InvalidArgument("jaxnvrar: decode attention: twin rows write one row of the cache");
  if (qkv.element_type() != cache_k_in.element_type() || qkv.element_type() != cache_v_in.element_type() ||
      out->element_type() != qkv.element_type() || cache_k->element_type() != qkv.element_type() ||
      cache_v->element_type() != qkv.element_type())
    return ffi::Error::InvalidArgument("jaxnvrar: decode attention: qkv, the caches and the results must share a dtype");
  // The kernel copies 16-byte vectors (cp.async): XLA's buffers are aligned, unless a fusion
  // hands the call a slice of a larger one.
  const void* const buffers[] = {qkv.untyped_data(), cache_k_in.untyped_data(), cache_v_in.untyped_data(),
                                 inv_freq.typed_data(), out->untyped_data(), cache_k->untyped_data(),
                                 cache_v->untyped_data()};
  for (const void* buffer : buffers) {
    if (reinterpret_cast<uintptr_t>(buffer) % 16 != 0)
      return ffi::Error::InvalidArgument("jaxnvrar: decode attention: a buffer is not 16-byte aligned (a slice of a "
                                         "larger array?); pass whole arrays");
  }
  // XLA gives aliased results the operands' buffers; copy where it did not.
  for (auto [in, result] : {std::pair{&cache_k_in, &cache_k}, std::pair{&cache_v_in, &cache_v}}) {
    if (in->untyped_data() != (*result)->untyped_data()) {
      const cudaError_t err = cudaMemcpyAsync((*result)->untyped_data(), in->untyped_data(), in->size_bytes(),
                                              cudaMemcpyDeviceToDevice, stream);
      if (err != cudaSuccess) return ffi::Error::Internal(std::string("jaxnvrar: decode attention: ") + cudaGetErrorString(err));
    }
  }
  void* k = cache_k->untyped_data();
  void* v = cache_v->untyped_data();
  const int32_t* p = positions.typed_data();
  const int32_t* w = write_at.typed_data();
  const float* f = inv_freq.typed_data();
  switch (qkv.element_type()) {
    case ffi::DataType::BF16:
      return LaunchForHeadDim<__nv_bfloat16>(head_dim, stream, qkv, p, w, f, k, v, out->untyped_data(), s, batch);
    case ffi::DataType::F16:
      return LaunchForHeadDim<__half>(head_dim, stream, qkv, p, w, f, k, v, out->untyped_data(), s, batch);
    case ffi::DataType::F32:
      return LaunchForHeadDim<float>(head_dim, stream, qkv, p, w, f, k, v, out->untyped_data(), s, batch);
    default:
      return ffi::Error::InvalidArgument("jaxnvrar: decode attention takes bfloat16, float16 or float32");
  }
}

}  // namespace

int64_t AttentionSharedBytes(int group, int computed_rows, int rows, int cache_rows, int cache_len, int head_dim,
                             int element_bytes, int parts, int slots, int64_t tile_bytes) {
  for (auto [name, value] : {std::pair{"group", group}, std::pair{"computed_rows", computed_rows}, std::pair{"rows", rows},
                              std::pair{"cache_rows", cache_rows}, std::pair{"cache_len", cache_len},
                              std::pair{"head_dim", head_dim}, std::pair{"element_bytes", element_bytes},
                              std::pair{"parts", parts}, std::pair{"slots", slots}})
    if (value < 1) throw std::invalid_argument(std::string("attention_shared_bytes: ") + name + " must be >= 1, not " +
                                               std::to_string(value));
  if (tile_bytes < 1) throw std::invalid_argument("attention_shared_bytes: tile_bytes must be >= 1");
  AttentionShape s{};  // the fields SharedBytes reads, the split set as Plan sets it
  s.group = group;
  s.computed_rows = computed_rows;
  s.rows = rows;
  s.cache_rows = cache_rows;
  s.cache_len = cache_len;
  s.slots = slots;
  SplitPositions(s, parts, head_dim, element_bytes, tile_bytes);
  return SharedBytes(s, head_dim, element_bytes);
}

std::vector<uint64_t> AttentionStamps() {
  int blocks = 0;
  cudaDeviceSynchronize();
  if (cudaMemcpyFromSymbol(&blocks, g_attention_stamped_blocks, sizeof(blocks)) != cudaSuccess || blocks < 1) return {};
  std::vector<uint64_t> stamps(static_cast<size_t>(blocks) * kAttentionStampColumns);
  if (cudaMemcpyFromSymbol(stamps.data(), g_attention_stamps, stamps.size() * sizeof(uint64_t)) != cudaSuccess) return {};
  return stamps;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DecodeAttention, Execute,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()           // qkv [batch, rows, width]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // positions [rows]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // write_at []
                                  .Arg<ffi::Buffer<ffi::F32>>()    // inv_freq [head_dim / 2]
                                  .Arg<ffi::AnyBuffer>()           // cache_k
                                  .Arg<ffi::AnyBuffer>()           // cache_v
                                  .Ret<ffi::AnyBuffer>()           // out [batch, rows, q_heads * head_dim]
                                  .Ret<ffi::AnyBuffer>()           // cache_k (aliased)
                                  .Ret<ffi::AnyBuffer>()           // cache_v (aliased)
                                  .Attr<int32_t>("q_heads")
                                  .Attr<int32_t>("cache_rows")
                                  .Attr<int32_t>("twin"),  // 1: rows after the first copy it
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jaxnvrar

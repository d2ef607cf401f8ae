// The fused epilogue of `jaxnvrar.all_reduce_rms_norm`: once the all-reduce has left the sum in
// the output (the residual_out buffer), each row becomes
//     residual_out = residual + sum                      (in T, as XLA's add)
//     normed       = weight * T(h * rsqrt(mean(h*h) + eps)),  h = float(residual_out)
// so the step needs no separate kernel for the add and the norm.
//
// A row is summed by one block, in a fixed order (each thread over its vectors, then a fixed
// shuffle tree and the warps in order): every rank gets the same bits, on every call.
//
// Where the rows' data comes from decides when a block may start: one-shot, a block sums whole
// rows itself (the plan gives it a range of whole rows) and starts after its own barrier; every
// other launch spreads a row over slices and blocks, so all blocks meet at a grid barrier first
// (the plan keeps the grid small enough to be resident at once).
#pragma once

#include "device_common.cuh"

namespace jaxnvrar {

// Sum of `value` over the block, the same on every thread and every run. `scratch` holds one
// float per warp.
__device__ __forceinline__ float BlockSum(float value, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xFFFFFFFFu, value, offset);
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) scratch[warp] = value;
  __syncthreads();
  float total = 0.0f;
  const int warps = (blockDim.x + 31) / 32;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  __syncthreads();  // scratch is reused by the next row
  return total;
}

// Rows row_begin, row_begin + row_step, ... < rows: residual_out (args.output, holding the
// reduced sum on entry) += residual, normed = RMSNorm(residual_out) * weight. Rows are whole
// 16-byte vectors (the plan checks hidden * sizeof(T) % 16 == 0).
template <typename T>
__device__ __forceinline__ void NormRows(const KernelArgs& args, int64_t row_begin, int64_t row_end,
                                         int64_t row_step) {
  using Vec = Packed<T, uint4>;
  __shared__ float scratch[kThreadsPerBlock / 32];
  const NormArgs& norm = args.norm;
  const int64_t vectors = norm.hidden / Vec::kCount;  // per row
  uint4* out = static_cast<uint4*>(args.output);
  const uint4* residual = static_cast<const uint4*>(norm.residual);
  const uint4* weight = static_cast<const uint4*>(norm.weight);
  uint4* normed = static_cast<uint4*>(norm.normed);
  for (int64_t row = row_begin; row < row_end; row += row_step) {
    const int64_t base = row * vectors;
    float squares = 0.0f;
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
      Vec sum, res, h;
      sum.vector = __ldcg(out + base + v);  // the all-reduce wrote it: read from L2
      res.vector = residual[base + v];
#pragma unroll
      for (int k = 0; k < Vec::kCount; ++k) {
        h.values[k] = Codec<T>::FromFloat(Codec<T>::ToFloat(res.values[k]) + Codec<T>::ToFloat(sum.values[k]));
        const float f = Codec<T>::ToFloat(h.values[k]);
        squares += f * f;
      }
      out[base + v] = h.vector;
    }
    const float scale = rsqrtf(BlockSum(squares, scratch) / static_cast<float>(norm.hidden) + norm.eps);
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
      Vec h, w, y;
      h.vector = out[base + v];  // this thread's own store above
      w.vector = weight[v];
#pragma unroll
      for (int k = 0; k < Vec::kCount; ++k) {
        const float scaled = Codec<T>::ToFloat(Codec<T>::FromFloat(Codec<T>::ToFloat(h.values[k]) * scale));
        y.values[k] = Codec<T>::FromFloat(Codec<T>::ToFloat(w.values[k]) * scaled);
      }
      normed[base + v] = y.vector;
    }
  }
}

// Every block of this GPU's grid has written its part of the sum. Bounded like every wait; the
// counter is reset by the call's last block (FinishCall), once every block is past it.
__device__ __forceinline__ void GridBarrier(const KernelArgs& args, uint32_t flag) {
  __syncthreads();
  if (threadIdx.x == 0) {
    WorkspaceHeader* header = reinterpret_cast<WorkspaceHeader*>(args.workspace);
    __threadfence();
    atomicAdd(&header->norm_arrived, 1u);
    const uint64_t start = GlobalTimerNs();
    while (atomicAdd(&header->norm_arrived, 0u) < gridDim.x) {
      if (GlobalTimerNs() - start > args.timeout_ns) {
        Fail(Where(args), kFailureTimeout, WaitSite{kWaitNormBarrier, 0, args.local, 0}, flag, CallSignature{0, 0});
      }
    }
    __threadfence();
  }
  __syncthreads();
}

// The epilogue of a fused call, after the all-reduce's last phase.
template <typename T>
__device__ __forceinline__ void RmsNormEpilogue(const KernelArgs& args, uint32_t flag) {
  if (args.one_shot) {
    __syncthreads();  // this block's sums are in the output
    const int64_t first = blockIdx.x * args.norm.rows_per_block;
    NormRows<T>(args, first, Min64(first + args.norm.rows_per_block, args.norm.rows), 1);
  } else {
    GridBarrier(args, flag);
    NormRows<T>(args, blockIdx.x, args.norm.rows, gridDim.x);
  }
}

}  // namespace jaxnvrar

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

// weight * T(h * scale) per element, in T (the Llama's RMSNorm after its rsqrt).
template <typename T, typename Vector>
__device__ __forceinline__ Vector NormalizedUnit(Vector h, Vector weight, float scale) {
  return ZipUnits<T>(h, weight, [scale](T hv, T wv) {
    const float scaled = Codec<T>::ToFloat(Codec<T>::FromFloat(Codec<T>::ToFloat(hv) * scale));
    return Codec<T>::FromFloat(Codec<T>::ToFloat(wv) * scaled);
  });
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
      normed[base + v] = NormalizedUnit<T, uint4>(out[base + v], weight[v], scale);  // out: my own store above
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
    SpinBounded([&] { return atomicAdd(&header->norm_arrived, 0u) >= gridDim.x; }, args, flag,
                WaitSite{kWaitNormBarrier, 0, args.local, 0});
    __threadfence();
  }
  __syncthreads();
}

// One-shot, rows of at most kRowBytesPerThread per thread: the block sums its whole rows from
// its own input and the peers' inboxes and normalizes them without leaving registers. The
// residual and the weight are loaded first, while the peers' data is on its way; the sum never
// goes through the output. Replaces the one-shot sum loop and RmsNormEpilogue.
template <typename T, typename Proto>
__device__ __forceinline__ void SumAndNormRows(const KernelArgs& args, const Layout& layout, const CallStart& start) {
  using Unit = typename Proto::Unit;
  using Data = Packed<T, Unit>;
  constexpr int kMax = kRowBytesPerThread / sizeof(Unit);  // units of a row per thread
  __shared__ float scratch[kThreadsPerBlock / 32];
  const NormArgs& norm = args.norm;
  const int64_t row_units = norm.hidden / Data::kCount;
  const Unit* residual = static_cast<const Unit*>(norm.residual);
  const Unit* weight = static_cast<const Unit*>(norm.weight);
  Unit* normed = static_cast<Unit*>(norm.normed);
  Unit* residual_out = static_cast<Unit*>(args.output);
  for (int64_t row = start.block_begin / row_units; row < start.block_end / row_units; ++row) {
    Unit res[kMax], w[kMax], h[kMax];
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      const int64_t i = threadIdx.x + k * static_cast<int64_t>(blockDim.x);  // unit of the row
      if (i < row_units) {
        res[k] = residual[row * row_units + i];
        w[k] = weight[i];
      }
    }
    float squares = 0.0f;
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      const int64_t i = threadIdx.x + k * static_cast<int64_t>(blockDim.x);
      if (i >= row_units) continue;
      const int64_t unit = row * row_units + i;
      const Unit sum = SumOverLocals<T, Unit>(args.gpus_per_node, [&](int32_t j) {
        return j == args.local
                   ? LoadSliceUnit<T, Unit>(args, args.input, 0, unit)
                   : Proto::Receive(At(args.workspace, start.half + layout.ReduceScatterInbox(j), unit), start.flag,
                                    args, start.calls, WaitSite{kWaitReduceScatter, 0, j, j});
      });
      h[k] = AddUnits<T, Unit>(res[k], sum);  // residual + sum, in T (as XLA's add)
      Data d;
      d.vector = h[k];
#pragma unroll
      for (int e = 0; e < Data::kCount; ++e) {
        const float f = Codec<T>::ToFloat(d.values[e]);
        squares += f * f;
      }
    }
    if (row == start.block_begin / row_units) {  // the first row's sums are in: the stamps' split
      Stamp(args, start.calls, kTimingReduced);
      Stamp(args, start.calls, kTimingAllReduced);
    }
    const float scale = rsqrtf(BlockSum(squares, scratch) / static_cast<float>(norm.hidden) + norm.eps);
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      const int64_t i = threadIdx.x + k * static_cast<int64_t>(blockDim.x);
      if (i >= row_units) continue;
      residual_out[row * row_units + i] = h[k];
      normed[row * row_units + i] = NormalizedUnit<T, Unit>(h[k], w[k], scale);
    }
  }
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

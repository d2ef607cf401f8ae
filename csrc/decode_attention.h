// The decode step's fused attention (decode_attention.cu): its XLA FFI handler, registered by the
// nanobind module in nvrar_ffi.cu. It needs no NVSHMEM runtime.
#pragma once

#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace jaxnvrar {
XLA_FFI_DECLARE_HANDLER_SYMBOL(DecodeAttention);

// Phase times of each block of the last call on the current device, block-major (blocks x
// kAttentionStampColumns, for the first kAttentionStampedBlocks blocks): globaltimer ns at start,
// projection staged, queries roped, scores, statistics exchanged, weights normalized, PV summed and
// exchanged, outputs written, end; then the ns spent waiting for key tiles and for value tiles.
// Empty before any call. Waits for the device first.
constexpr int kAttentionStampColumns = 11;
constexpr int kAttentionStampedBlocks = 4096;
std::vector<uint64_t> AttentionStamps();

// A block's shared memory for these shapes (bytes), as the kernel's launch counts it with `parts`
// blocks per (batch row, KV head), `slots` tiles of at most `tile_bytes`; a host function, for
// the Python mirror's test (attention.kernel_shared_bytes must agree).
int64_t AttentionSharedBytes(int group, int computed_rows, int rows, int cache_rows, int cache_len, int head_dim,
                             int element_bytes, int parts, int slots, int64_t tile_bytes);
}  // namespace jaxnvrar

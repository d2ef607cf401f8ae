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
}  // namespace jaxnvrar

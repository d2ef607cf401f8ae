// The decode step's fused attention (decode_attention.cu): its XLA FFI handler, registered by the
// nanobind module in nvrar_ffi.cu. It needs no NVSHMEM runtime.
#pragma once

#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace jaxnvrar {
XLA_FFI_DECLARE_HANDLER_SYMBOL(DecodeAttention);

// Phase times (globaltimer ns) of each block of the last call on the current device, block-major
// (blocks x kAttentionPhases: start, projection staged, scores, maxima exchanged, weights
// normalized, PV summed, outputs written, end), for the first kAttentionStampedBlocks blocks;
// empty before any call. Waits for the device first.
constexpr int kAttentionPhases = 8;
constexpr int kAttentionStampedBlocks = 4096;
std::vector<uint64_t> AttentionStamps();
}  // namespace jaxnvrar

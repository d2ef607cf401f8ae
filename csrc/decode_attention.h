// The decode step's fused attention (decode_attention.cu): its XLA FFI handler, registered by the
// nanobind module in nvrar_ffi.cu. It needs no NVSHMEM runtime.
#pragma once

#include "xla/ffi/api/ffi.h"

namespace jaxnvrar {
XLA_FFI_DECLARE_HANDLER_SYMBOL(DecodeAttention);
}  // namespace jaxnvrar

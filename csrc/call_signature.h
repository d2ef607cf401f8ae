// What a call is, as ranks compare it before exchanging data (the kernel's signature check,
// device_common.cuh) and as a failure report describes it. Host-only C++ apart from the plain
// struct, so the CPU extension (schedule_module.cc) can expose it to the tests.
#pragma once

#include <cstdint>

namespace jaxnvrar {

// What a call is, as peers compare it: element count and (dtype, launch, G, nodes). Ranks that
// disagree would otherwise deadlock or, worse, exchange cells of another meaning.
struct CallSignature {
  uint32_t elements;  // low 32 bits of the element count
  uint32_t shape;     // dtype << 29 | launch << 24 (5 bits) | gpus_per_node << 16 | num_nodes
};
enum DtypeCode : uint32_t { kDtypeFloat32 = 1, kDtypeBFloat16 = 2, kDtypeFloat16 = 3 };
// Launch bits of a CallSignature: ranks must agree on the workspace layout too.
constexpr uint32_t kLaunchOneShot = 1u;
constexpr uint32_t kLaunchBulk = 2u;
constexpr uint32_t kLaunchFusedNorm = 4u;  // all_reduce_rms_norm: blocks may cover other ranges
constexpr uint32_t kLaunchDense = 8u;      // the dense kernel (its own inboxes, no flags)
constexpr uint32_t kLaunchPull = 16u;      // bulk with a pulled reduce-scatter (slices staged at the sender)

inline CallSignature EncodeCall(int64_t elements, DtypeCode dtype, bool one_shot, bool bulk, int32_t gpus_per_node,
                                int32_t num_nodes, bool fused_norm = false, bool dense = false,
                                bool pull = false) {
  const uint32_t launch = (one_shot ? kLaunchOneShot : 0u) | (bulk ? kLaunchBulk : 0u) |
                          (fused_norm ? kLaunchFusedNorm : 0u) | (dense ? kLaunchDense : 0u) |
                          (pull ? kLaunchPull : 0u);
  return CallSignature{static_cast<uint32_t>(elements),
                       static_cast<uint32_t>(dtype) << 29 | launch << 24 |
                           static_cast<uint32_t>(gpus_per_node) << 16 | (static_cast<uint32_t>(num_nodes) & 0xFFFFu)};
}

// A signature read back (from a failure record), field by field.
struct CallDescription {
  uint32_t elements;
  uint32_t dtype;  // a DtypeCode, unless the signature is corrupt
  uint32_t nodes;
  uint32_t gpus_per_node;
  bool one_shot;
  bool bulk;
  bool fused_norm;
  bool dense;
  bool pull;
};

inline CallDescription DecodeCall(CallSignature s) {
  const uint32_t launch = (s.shape >> 24) & 0x1Fu;
  return CallDescription{s.elements,
                         s.shape >> 29,
                         s.shape & 0xFFFFu,
                         (s.shape >> 16) & 0xFFu,
                         (launch & kLaunchOneShot) != 0,
                         (launch & kLaunchBulk) != 0,
                         (launch & kLaunchFusedNorm) != 0,
                         (launch & kLaunchDense) != 0,
                         (launch & kLaunchPull) != 0};
}

// A decoded call as a Python dict (for modules that include nanobind first); `dtype` is what
// the dict holds for the dtype (a name, or the code).
#ifdef NB_VERSION_MAJOR
template <typename Dtype>
nanobind::dict CallDict(const CallDescription& call, Dtype dtype) {
  nanobind::dict d;
  d["elements"] = call.elements;
  d["dtype"] = dtype;
  d["nodes"] = call.nodes;
  d["gpus_per_node"] = call.gpus_per_node;
  d["one_shot"] = call.one_shot;
  d["bulk"] = call.bulk;
  d["fused_norm"] = call.fused_norm;
  d["dense"] = call.dense;
  d["pull"] = call.pull;
  return d;
}
#endif

}  // namespace jaxnvrar

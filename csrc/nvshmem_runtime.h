// The process-wide NVSHMEM state of the extension: its own copy of NVSHMEM's device
// state (filled by nvshmem_init after nvshmem4py bootstrapped), and the symmetric workspace.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace jaxnvrar {

// Written by the first kernel thread that finds a failure (a wait that timed out, or a peer in
// a different call), in pinned host memory mapped into the device, so the host can read it
// after the trap has taken the CUDA context down.
struct TimeoutRecord {
  volatile int32_t set;
  volatile int32_t kind;  // FailureKind in device_common.cuh
  volatile int32_t node, local, phase, step, peer;
  volatile uint32_t flag;
  volatile uint32_t my_elements, my_shape, peer_elements, peer_shape;  // CallSignature
  volatile int32_t grouping;  // the call's workspace region: which grouping of ranks (axis) it was over
  volatile int32_t peer_is_node;  // `peer` is a node (an inter-node step's), else a local GPU
};

struct Runtime {
  bool initialized = false;
  char* workspace = nullptr;  // symmetric: the same offset is valid on every PE
  int64_t workspace_bytes = 0;
  int32_t groupings = 1;       // regions of the workspace, one per grouping of ranks (GroupingBytes)
  int64_t grouping_bytes = 0;  // bytes of each region: what one call can use
  int32_t my_pe = -1;
  int32_t num_pes = 0;
  uint64_t timeout_ns = 0;   // bound on every device-side wait
  bool force_put = false;    // inter-node phase through nvshmem puts even where P2P works
  TimeoutRecord* timeout_host = nullptr;    // host view
  TimeoutRecord* timeout_device = nullptr;  // the same memory, as the kernel sees it
  unsigned long long* timing = nullptr;     // JAXNVRAR_TIMING: kTimingRecords records (device memory)
  char* dense = nullptr;  // symmetric: the dense kernel's inboxes, all ones when idle; nullptr: none
  int64_t dense_bytes = 0;
  // The PEs (in axis order) of the first call site planned dense; only that group uses the
  // dense inboxes (protocol_dense.cuh says why), other groups run the flagged bulk kernel.
  std::vector<int32_t> dense_group;
  int32_t dense_grouping = -1;  // and the workspace region whose header counts its dense calls
};

// JAXNVRAR_TIMING: each call's timestamps (globaltimer, ns) in a ring of records indexed by the
// call counter; the fields are TimingField (device_common.cuh).
constexpr int64_t kTimingRecords = 4096;
constexpr int64_t kTimingFields = 8;
void EnableTiming();                     // allocates the ring (kept until the process ends)
void ResetTiming();                      // zeroes it
void CopyTiming(unsigned long long* to);  // kTimingRecords * kTimingFields words, after the device is idle

Runtime& GetRuntime();

// Both throw std::runtime_error with a message naming the failed call.
// first_call: the call counter's start (tests start near the flags' wrap-around).
// dense_bytes: the dense kernel's inboxes (0: none). groupings: regions of the workspace.
void InitializeRuntime(int64_t workspace_bytes, double timeout_seconds, bool force_put, uint64_t first_call,
                       int64_t dense_bytes, int32_t groupings);
void FinalizeRuntime();

}  // namespace jaxnvrar

#include "nvshmem_runtime.h"

#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstring>
#include <stdexcept>

#include "schedule.h"

namespace jaxnvrar {
namespace {

void Check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("jaxnvrar: ") + what + " failed: " + cudaGetErrorString(status));
  }
}

}  // namespace

Runtime& GetRuntime() {
  static Runtime runtime;
  return runtime;
}

void InitializeRuntime(int64_t workspace_bytes, double timeout_seconds, bool force_put, uint64_t first_call,
                       int64_t dense_bytes, int32_t groupings) {
  Runtime& rt = GetRuntime();
  if (rt.initialized) return;
  const int64_t grouping_bytes = groupings >= 1 ? GroupingBytes(workspace_bytes, groupings) : 0;
  if (grouping_bytes < 2 * kWorkspaceHeaderBytes) {
    throw std::runtime_error("jaxnvrar: a " + std::to_string(workspace_bytes) + "-byte workspace cannot hold " +
                             std::to_string(groupings) + " groupings; raise JAXNVRAR_WORKSPACE_BYTES or lower "
                             "JAXNVRAR_GROUPINGS");
  }
  // nvshmem4py has bootstrapped NVSHMEM in this process; this call sees that and only fills
  // the copy of the device state linked into this module (else nvshmem_ptr reads zeros).
  nvshmem_init();
  rt.my_pe = nvshmem_my_pe();
  rt.num_pes = nvshmem_n_pes();
  rt.workspace = static_cast<char*>(nvshmem_malloc(workspace_bytes));
  if (rt.workspace == nullptr) {
    nvshmem_finalize();
    throw std::runtime_error(
        "jaxnvrar: nvshmem_malloc of the " + std::to_string(workspace_bytes) +
        "-byte workspace failed; lower workspace_bytes or raise NVSHMEM_SYMMETRIC_SIZE");
  }
  // Zeroed: no cell check word or bulk flag word of any call matches zeros (CellCheck, FlagWord).
  Check(cudaMemset(rt.workspace, 0, workspace_bytes), "cudaMemset of the workspace");
  // Each region's counter is its header's first word (WorkspaceHeader::calls).
  for (int32_t g = 0; g < groupings; ++g) {
    Check(cudaMemcpy(rt.workspace + g * grouping_bytes, &first_call, sizeof(first_call), cudaMemcpyHostToDevice),
          "cudaMemcpy of the call counter");
  }
  if (dense_bytes > 0) {
    rt.dense = static_cast<char*>(nvshmem_malloc(dense_bytes));
    if (rt.dense == nullptr) {
      nvshmem_free(rt.workspace);
      rt.workspace = nullptr;
      nvshmem_finalize();
      throw std::runtime_error("jaxnvrar: nvshmem_malloc of the dense kernel's " + std::to_string(dense_bytes) +
                               " bytes failed; lower JAXNVRAR_DENSE_BYTES or raise NVSHMEM_SYMMETRIC_SIZE");
    }
    // Every element all ones: the sentinel of an empty slot (protocol_dense.cuh).
    Check(cudaMemset(rt.dense, 0xFF, dense_bytes), "cudaMemset of the dense inboxes");
  }
  rt.dense_bytes = dense_bytes;
  Check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  nvshmem_barrier_all();
  if (rt.timeout_host == nullptr) {  // kept across finalize/initialize: it may hold a report
    void* record = nullptr;
    Check(cudaHostAlloc(&record, sizeof(TimeoutRecord), cudaHostAllocMapped), "cudaHostAlloc");
    std::memset(record, 0, sizeof(TimeoutRecord));
    rt.timeout_host = static_cast<TimeoutRecord*>(record);
    Check(cudaHostGetDevicePointer(reinterpret_cast<void**>(&rt.timeout_device), record, 0),
          "cudaHostGetDevicePointer");
  }
  rt.workspace_bytes = workspace_bytes;
  rt.groupings = groupings;
  rt.grouping_bytes = grouping_bytes;
  rt.timeout_ns = static_cast<uint64_t>(timeout_seconds * 1e9);
  rt.force_put = force_put;
  rt.initialized = true;
}

void EnableTiming() {
  Runtime& rt = GetRuntime();
  if (rt.timing != nullptr) return;
  const size_t bytes = kTimingRecords * kTimingFields * sizeof(unsigned long long);
  Check(cudaMalloc(reinterpret_cast<void**>(&rt.timing), bytes), "cudaMalloc of the timing records");
  ResetTiming();
}

void ResetTiming() {
  Runtime& rt = GetRuntime();
  if (rt.timing == nullptr) return;
  Check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  Check(cudaMemset(rt.timing, 0, kTimingRecords * kTimingFields * sizeof(unsigned long long)),
        "cudaMemset of the timing records");
  Check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

void CopyTiming(unsigned long long* to) {
  Runtime& rt = GetRuntime();
  if (rt.timing == nullptr) return;
  Check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  Check(cudaMemcpy(to, rt.timing, kTimingRecords * kTimingFields * sizeof(unsigned long long), cudaMemcpyDeviceToHost),
        "cudaMemcpy of the timing records");
}

void FinalizeRuntime() {
  Runtime& rt = GetRuntime();
  if (!rt.initialized) return;
  rt.initialized = false;
  // All-reduces still queued read and write the workspace: wait for them.
  cudaDeviceSynchronize();
  if (rt.dense != nullptr) nvshmem_free(rt.dense);
  rt.dense = nullptr;
  rt.dense_bytes = 0;
  rt.dense_group.clear();
  rt.dense_grouping = -1;
  nvshmem_free(rt.workspace);
  rt.workspace = nullptr;
  rt.workspace_bytes = 0;
  rt.groupings = 1;
  rt.grouping_bytes = 0;
  nvshmem_finalize();
}

}  // namespace jaxnvrar

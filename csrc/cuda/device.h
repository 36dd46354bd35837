// ATen side of the CUDA launchers: the device's limits (read once per device) and the one
// workspace of a call (a byte tensor from the caching allocator).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <mutex>
#include <unordered_map>

#include "../host.h"
#include "plan.h"

namespace fused_poolformer {
namespace cuda_kernels {

inline DeviceLimits device_limits(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, DeviceLimits> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  DeviceLimits limits;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.multiprocessors, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.shared_bytes_optin,
                                        cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.shared_bytes_per_sm,
                                        cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  cache.emplace(device, limits);
  return limits;
}

inline void* allocate_workspace(at::Tensor& holder, const at::Tensor& like, size_t bytes) {
  holder = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  return holder.mutable_data_ptr();
}

}  // namespace cuda_kernels
}  // namespace fused_poolformer

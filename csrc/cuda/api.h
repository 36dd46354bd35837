// What the CUDA launchers need from their caller, in plain C++: raw pointers, the shape,
// the device's limits, the stream and a workspace allocator.  operators.cpp (compiled by the
// host compiler, with ATen) fills these from tensors; forward.cu and backward*.cu (nvcc,
// without ATen, so they compile quickly) define the launchers for the four dtypes; the
// CPU emulator (tests/cuda_emulator.cpp) calls the same launchers.
#pragma once

#include <cstddef>

#include "../pool_mixer.h"

namespace fused_poolformer {
namespace cuda_kernels {

struct DeviceLimits {
  int multiprocessors = 132;
  int shared_bytes_optin = 227 * 1024;  // the per-block opt-in maximum
  int shared_bytes_per_sm = 228 * 1024;
};

// The one workspace a call may allocate (the launchers ask at most once).
struct WorkspaceAllocator {
  void* (*allocate)(void* context, size_t bytes);
  void* context;
  void* operator()(size_t bytes) const { return allocate(context, bytes); }
};

template <typename scalar_t, typename acc_t>
struct ForwardCall {
  MixerShape shape;
  MixerParams params;
  double eps;
  const scalar_t* x;
  scalar_t* y;
  acc_t* mean;  // (N, G) outputs
  acc_t* rstd;
};

template <typename scalar_t, typename acc_t>
struct BackwardCall {
  MixerShape shape;
  MixerParams params;
  ParamGrads grads;
  const scalar_t* grad_y;
  const scalar_t* x;
  const acc_t* mean;
  const acc_t* rstd;
  scalar_t* grad_x;  // nullptr when not requested
};

// Forward: 2 launches (statistics, apply) and one workspace.  `stream` is a cudaStream_t.
template <typename scalar_t, typename acc_t>
void run_forward_kernels(const ForwardCall<scalar_t, acc_t>& call, const DeviceLimits& dev, void* stream,
                         const WorkspaceAllocator& allocate);

// Backward: 3 launches (sums, folds, dx) and one workspace; none when nothing is requested.
template <typename scalar_t, typename acc_t>
void run_backward_kernels(const BackwardCall<scalar_t, acc_t>& call, const DeviceLimits& dev, void* stream,
                          const WorkspaceAllocator& allocate);

// The bytes run_forward_kernels / run_backward_kernels ask `allocate` for, known before the
// call so that the caller can place the workspace in y's / grad_x's allocation (one
// allocation fewer per call).
template <typename scalar_t, typename acc_t>
size_t forward_workspace_bytes(const MixerShape& shape, const DeviceLimits& dev);
template <typename scalar_t, typename acc_t>
size_t backward_workspace_bytes(const MixerShape& shape, const DeviceLimits& dev);

}  // namespace cuda_kernels
}  // namespace fused_poolformer

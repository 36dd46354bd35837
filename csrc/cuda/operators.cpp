// The CUDA operators: the shared host prologue (host.cpp) with a launcher that turns the
// tensors into the kernels' plain arguments (api.h), the device's limits, the current stream
// and the call's one workspace.  Compiled by the host compiler: the .cu files stay free of
// ATen, which keeps the CUDA build short.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <mutex>
#include <unordered_map>

#include "../block.h"
#include "../host.h"
#include "api.h"

namespace fused_poolformer {
namespace cuda_kernels {
namespace {

// Read once per device.
DeviceLimits device_limits(int device) {
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

// The workspace: the bytes the host prologue placed after y's or grad_x's elements, or
// (a backward without grad_x) a byte tensor from the caching allocator, alive until the call
// returns (the stream-ordered allocator keeps either valid for the kernels queued on the
// stream).
struct Workspace {
  at::Tensor holder;
  const at::Tensor& like;
  void* preallocated = nullptr;
  size_t preallocated_bytes = 0;

  static void* allocate(void* self, size_t bytes) {
    auto* w = static_cast<Workspace*>(self);
    if (w->preallocated != nullptr) {
      TORCH_INTERNAL_ASSERT(bytes <= w->preallocated_bytes, "pool_mixer: a CUDA launcher asked for ",
                            bytes, " workspace bytes, ", w->preallocated_bytes, " were planned");
      return w->preallocated;
    }
    w->holder = at::empty({static_cast<int64_t>(bytes)}, w->like.options().dtype(at::kByte));
    return w->holder.mutable_data_ptr();
  }
  WorkspaceAllocator allocator() { return WorkspaceAllocator{&Workspace::allocate, this}; }
};

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void launch_forward(const ForwardProblem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "pool_mixer_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ForwardCall<scalar_t, acc_t> call{p.shape, p.params, p.eps, p.x.const_data_ptr<scalar_t>(),
                                            p.y.mutable_data_ptr<scalar_t>(), p.mean.mutable_data_ptr<acc_t>(),
                                            p.rstd.mutable_data_ptr<acc_t>()};
    Workspace workspace{at::Tensor(), p.x, p.workspace, p.workspace_bytes};
    run_forward_kernels(call, device_limits(p.x.device().index()), current_stream(), workspace.allocator());
  });
}

void launch_backward(const BackwardProblem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "pool_mixer_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardCall<scalar_t, acc_t> call{
        p.shape, p.params, p.grads, p.grad_y.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(),
        p.mean.const_data_ptr<acc_t>(), p.rstd.const_data_ptr<acc_t>(),
        p.grad_x.defined() ? p.grad_x.mutable_data_ptr<scalar_t>() : nullptr};
    Workspace workspace{at::Tensor(), p.x, p.workspace, p.workspace_bytes};
    run_backward_kernels(call, device_limits(p.x.device().index()), current_stream(), workspace.allocator());
  });
}

size_t forward_workspace(const MixerShape& shape, const at::Tensor& x) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_mixer_forward_cuda", [&] {
    return forward_workspace_bytes<scalar_t, at::opmath_type<scalar_t>>(shape, device_limits(x.device().index()));
  });
}

size_t backward_workspace(const MixerShape& shape, const at::Tensor& x) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_mixer_backward_cuda", [&] {
    return backward_workspace_bytes<scalar_t, at::opmath_type<scalar_t>>(shape, device_limits(x.device().index()));
  });
}

ForwardResult pool_mixer_forward_cuda(const at::Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias,
                                      const OptionalTensor& layer_scale, const OptionalTensor& res_scale,
                                      const OptionalTensor& sample_scale, int64_t num_groups, int64_t pool_size,
                                      double eps) {
  return run_forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, eps,
                     at::kCUDA, &launch_forward, &forward_workspace);
}

BackwardResult pool_mixer_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                                        const at::Tensor& rstd, const OptionalTensor& weight,
                                        const OptionalTensor& bias, const OptionalTensor& layer_scale,
                                        const OptionalTensor& res_scale, const OptionalTensor& sample_scale,
                                        int64_t num_groups, int64_t pool_size, double eps,
                                        std::array<bool, 5> output_mask) {
  return run_backward(grad_y, x, mean, rstd, weight, bias, layer_scale, res_scale, sample_scale, num_groups,
                      pool_size, eps, output_mask, at::kCUDA, &launch_backward, &backward_workspace);
}

// The block: the mixer above through the dispatcher, the MLP branch on cuBLAS (block_host.cpp).
BlockForwardResult block_forward_cuda(const at::Tensor& x, FPM_BLOCK_PARAMETERS, bool save_hidden) {
  return run_block_forward(x, block_args(FPM_BLOCK_ARGUMENTS), save_hidden, at::kCUDA);
}

BlockBackwardResult block_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                        const at::Tensor& hidden, const at::Tensor& mean1,
                                        const at::Tensor& rstd1, const at::Tensor& mean2,
                                        const at::Tensor& rstd2, FPM_BLOCK_PARAMETERS,
                                        BlockMask output_mask) {
  return run_block_backward(grad_out, x, hidden, mean1, rstd1, mean2, rstd2,
                            block_args(FPM_BLOCK_ARGUMENTS), output_mask, at::kCUDA);
}

}  // namespace
}  // namespace cuda_kernels

TORCH_LIBRARY_IMPL(fused_poolformer, CUDA, m) {
  m.impl("pool_mixer_forward", &cuda_kernels::pool_mixer_forward_cuda);
  m.impl("pool_mixer_backward", &cuda_kernels::pool_mixer_backward_cuda);
  m.impl("block_forward", &cuda_kernels::block_forward_cuda);
  m.impl("block_backward", &cuda_kernels::block_backward_cuda);
}

}  // namespace fused_poolformer

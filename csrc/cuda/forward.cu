// CUDA forward of the fused pool mixer: the statistics pass, then one apply pass that
// merges the statistics in its prologue and writes y (kernels.cuh, launch.h).
// Per call: 2 launches; allocations: y, mean, rstd (host.cpp) and one workspace.
#include <torch/library.h>

#include "device.h"
#include "launch.h"

namespace fused_poolformer {
namespace cuda_kernels {
namespace {

template <typename scalar_t>
void forward_kernels(const ForwardProblem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  ForwardCall<scalar_t, acc_t> call{p.shape,
                                    p.params,
                                    p.eps,
                                    p.x.const_data_ptr<scalar_t>(),
                                    p.y.mutable_data_ptr<scalar_t>(),
                                    p.mean.mutable_data_ptr<acc_t>(),
                                    p.rstd.mutable_data_ptr<acc_t>()};
  at::Tensor workspace;
  run_forward_kernels(call, device_limits(p.x.device().index()), c10::cuda::getCurrentCUDAStream(),
              [&](size_t bytes) { return allocate_workspace(workspace, p.x, bytes); });
}

void launch_forward(const ForwardProblem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(),
                                  "pool_mixer_forward_cuda", [&] { forward_kernels<scalar_t>(p); });
}

ForwardResult pool_mixer_forward_cuda(const at::Tensor& x, const OptionalTensor& weight,
                                      const OptionalTensor& bias,
                                      const OptionalTensor& layer_scale,
                                      const OptionalTensor& res_scale,
                                      const OptionalTensor& sample_scale, int64_t num_groups,
                                      int64_t pool_size, double eps) {
  return run_forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups,
                     pool_size, eps, at::kCUDA, &launch_forward);
}

}  // namespace
}  // namespace cuda_kernels

TORCH_LIBRARY_IMPL(fused_poolformer, CUDA, m) {
  m.impl("pool_mixer_forward", &cuda_kernels::pool_mixer_forward_cuda);
}

}  // namespace fused_poolformer

// CUDA backward of the fused pool mixer: one reduction pass (per-(n, c, tile) sums of
// D * dy and x * dy), one fold launch (S[n, g] and the parameter gradients, fixed order),
// then one pass that writes dx (kernels.cuh, launch.h).
// Per call: 3 launches; allocations: the requested gradients (host.cpp) and one workspace.
#include <torch/library.h>

#include "device.h"
#include "launch.h"

namespace fused_poolformer {
namespace cuda_kernels {
namespace {

template <typename scalar_t>
void backward_kernels(const BackwardProblem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  BackwardCall<scalar_t, acc_t> call{p.shape,
                                     p.params,
                                     p.grads,
                                     p.grad_y.const_data_ptr<scalar_t>(),
                                     p.x.const_data_ptr<scalar_t>(),
                                     p.mean.const_data_ptr<acc_t>(),
                                     p.rstd.const_data_ptr<acc_t>(),
                                     p.grad_x.defined() ? p.grad_x.mutable_data_ptr<scalar_t>() : nullptr};
  at::Tensor workspace;
  run_backward_kernels(call, device_limits(p.x.device().index()), c10::cuda::getCurrentCUDAStream(),
               [&](size_t bytes) { return allocate_workspace(workspace, p.x, bytes); });
}

void launch_backward(const BackwardProblem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(),
                                  "pool_mixer_backward_cuda", [&] { backward_kernels<scalar_t>(p); });
}

BackwardResult pool_mixer_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                        const at::Tensor& mean, const at::Tensor& rstd,
                                        const OptionalTensor& weight, const OptionalTensor& bias,
                                        const OptionalTensor& layer_scale,
                                        const OptionalTensor& res_scale,
                                        const OptionalTensor& sample_scale, int64_t num_groups,
                                        int64_t pool_size, double eps,
                                        std::array<bool, 5> output_mask) {
  return run_backward(grad_y, x, mean, rstd, weight, bias, layer_scale, res_scale, sample_scale,
                      num_groups, pool_size, eps, output_mask, at::kCUDA, &launch_backward);
}

}  // namespace
}  // namespace cuda_kernels

TORCH_LIBRARY_IMPL(fused_poolformer, CUDA, m) {
  m.impl("pool_mixer_backward", &cuda_kernels::pool_mixer_backward_cuda);
}

}  // namespace fused_poolformer

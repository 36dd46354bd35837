// The CPU operators: the shared host prologue (host.cpp) with the CPU launchers (api.h),
// registered for the CPU dispatch key.  csrc/cuda/operators.cpp is the CUDA twin.
#include <torch/library.h>

#include "../block.h"
#include "api.h"

namespace fused_poolformer {
namespace cpu {
namespace {

ForwardResult pool_mixer_forward_cpu(const at::Tensor& x, const OptionalTensor& weight,
                                     const OptionalTensor& bias, const OptionalTensor& layer_scale,
                                     const OptionalTensor& res_scale,
                                     const OptionalTensor& sample_scale, int64_t num_groups,
                                     int64_t pool_size, double eps) {
  return run_forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups,
                     pool_size, eps, at::kCPU, &launch_forward);
}

BackwardResult pool_mixer_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                       const at::Tensor& mean, const at::Tensor& rstd,
                                       const OptionalTensor& weight, const OptionalTensor& bias,
                                       const OptionalTensor& layer_scale,
                                       const OptionalTensor& res_scale,
                                       const OptionalTensor& sample_scale, int64_t num_groups,
                                       int64_t pool_size, double eps,
                                       std::array<bool, 5> output_mask) {
  return run_backward(grad_y, x, mean, rstd, weight, bias, layer_scale, res_scale, sample_scale,
                      num_groups, pool_size, eps, output_mask, at::kCPU, &launch_backward);
}

BlockForwardResult block_forward_cpu(const at::Tensor& x, FPM_BLOCK_PARAMETERS, bool save_hidden) {
  return run_block_forward(x, block_args(FPM_BLOCK_ARGUMENTS), save_hidden, at::kCPU);
}

BlockBackwardResult block_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                       const at::Tensor& hidden, const at::Tensor& mean1,
                                       const at::Tensor& rstd1, const at::Tensor& mean2,
                                       const at::Tensor& rstd2, FPM_BLOCK_PARAMETERS,
                                       BlockMask output_mask) {
  return run_block_backward(grad_out, x, hidden, mean1, rstd1, mean2, rstd2,
                            block_args(FPM_BLOCK_ARGUMENTS), output_mask, at::kCPU);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fused_poolformer, CPU, m) {
  m.impl("pool_mixer_forward", &cpu::pool_mixer_forward_cpu);
  m.impl("pool_mixer_backward", &cpu::pool_mixer_backward_cpu);
  m.impl("block_forward", &cpu::block_forward_cpu);
  m.impl("block_backward", &cpu::block_backward_cpu);
}

}  // namespace fused_poolformer

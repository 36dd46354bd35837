// Operator schemas of the fused pool mixer (docs/contract.md).  The CPU and CUDA kernels
// register against them in csrc/cpu and csrc/cuda, the autograd formula in
// csrc/autograd.cpp; fake kernels come from Python (fused_poolformer/contract.py).
#include <torch/library.h>

TORCH_LIBRARY(fused_poolformer, m) {
  // y = res_scale * x + layer_scale * sample_scale * (Pool(GroupNorm(x)) - GroupNorm(x)).
  // Returns (y, mean, rstd); mean and rstd have shape (N, num_groups) and are float32
  // (float64 for a float64 x).  bias is validated but cancels out of y.
  m.def(
      "pool_mixer_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? layer_scale, "
      "Tensor? res_scale, Tensor? sample_scale, int num_groups, int pool_size, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  // Returns the gradients of (x, weight, bias, layer_scale, res_scale) from one pass; an
  // output whose output_mask entry is false is not computed and comes back undefined
  // (None).  The bias gradient is exact zeros (the bias cancels out); bias and eps are
  // here for the gradient's dtype and for the differentiable (double-backward) formula.
  m.def(
      "pool_mixer_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, "
      "Tensor? bias, Tensor? layer_scale, Tensor? res_scale, Tensor? sample_scale, "
      "int num_groups, int pool_size, float eps, bool[5] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

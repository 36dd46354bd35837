// Operator schemas of the fused pool mixer (DESIGN.md section 3).  The CPU and CUDA
// implementations register against these in csrc/cpu and csrc/cuda; fake kernels and the
// autograd formula are registered from Python in fused_poolformer/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(fused_poolformer, m) {
  // y = res_scale * x + layer_scale * sample_scale * (Pool(GroupNorm(x)) - GroupNorm(x)).
  // Returns (y, mean, rstd); mean and rstd have shape (N, num_groups) and are float32
  // (float64 for float64 x).  bias is validated but cancels out of y.
  m.def(
      "pool_mixer_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? layer_scale, "
      "Tensor? res_scale, Tensor? sample_scale, int num_groups, int pool_size, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_weight, grad_layer_scale, grad_res_scale); an output whose
  // output_mask entry is false comes back as an empty tensor.
  m.def(
      "pool_mixer_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, "
      "Tensor? layer_scale, Tensor? res_scale, Tensor? sample_scale, int num_groups, "
      "int pool_size, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}

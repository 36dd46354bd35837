// Operator schemas of the fused pool mixer (docs/contract.md) and of the whole block
// (docs/block.md).  The CPU and CUDA kernels
// register against them in csrc/cpu and csrc/cuda, the autograd formula in
// csrc/autograd.cpp; fake kernels come from Python (fused_poolformer/contract.py).
#include <torch/library.h>

#include <string>

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
  // The whole block: out = res_scale2 * x1 + layer_scale2 * sample_scale2 *
  // fc2(act(fc1(GroupNorm2(x1)))), x1 the mixer above.  fc weights are 2-D: (hidden, C) and
  // (C, hidden).  Returns (out, hidden, mean1, rstd1, mean2, rstd2): hidden is fc1's output
  // (empty unless save_hidden), mean1/rstd1 the mixer's (N, num_groups1) statistics,
  // mean2/rstd2 x1's (N, 1) ones.  gemm_dtype: the GEMMs' dtype (autocast), x's if None.
  // block_backward returns the gradients of (x, norm1_weight, norm1_bias, layer_scale1,
  // res_scale1, norm2_weight, norm2_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
  // layer_scale2, res_scale2, act_scale, act_bias); hidden may be empty (recomputed).
  // Unrequested or absent: undefined.  Two families with one signature (csrc/block.h): the
  // C++ one over the C++ mixer (block_*), the Triton one over the Triton mixer (triton_block_*).
  const std::string parameters =
      "Tensor? norm1_weight, Tensor? norm1_bias, Tensor? layer_scale1, Tensor? res_scale1, "
      "Tensor? sample_scale1, int num_groups1, int pool_size, float eps1, Tensor? norm2_weight, "
      "Tensor? norm2_bias, float eps2, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, "
      "Tensor? fc2_bias, Tensor? layer_scale2, Tensor? res_scale2, Tensor? sample_scale2, "
      "str activation, Tensor? act_scale, Tensor? act_bias, ScalarType? gemm_dtype";
  for (const std::string prefix : {"", "triton_"}) {
    m.def((prefix + "block_forward(Tensor x, " + parameters +
           ", bool save_hidden) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
              .c_str());
    m.def((prefix + "block_backward(Tensor grad_out, Tensor x, Tensor hidden, Tensor mean1, "
           "Tensor rstd1, Tensor mean2, Tensor rstd2, " + parameters +
           ", bool[15] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
           "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
              .c_str());
  }
}

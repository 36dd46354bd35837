// The whole PoolFormer block as one operator pair (docs/block.md):
//
//   x1  = the fused mixer of x                          (first branch, csrc/host.h)
//   out = res_scale2 * x1 + layer_scale2 * sample_scale2 * fc2(act(fc1(GroupNorm1(x1))))
//
// block_forward returns (out, hidden, mean1, rstd1, mean2, rstd2): hidden is fc1's output
// before the activation (kept for the backward; empty when not asked for), mean1/rstd1 the
// mixer's (N, G) statistics of x, mean2/rstd2 the (N, 1) statistics of x1.  block_backward
// takes them back with the gradient of out and returns the 15 gradients of kGradientNames.
//
// The argument list is long and appears in every operator signature, so it is spelled once,
// in FPM_BLOCK_PARAMETERS (declarations) and FPM_BLOCK_ARGUMENTS (the names, to pass on).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

#include "host.h"

namespace fused_poolformer {

#define FPM_BLOCK_PARAMETERS                                                                   \
  const OptionalTensor &norm1_weight, const OptionalTensor &norm1_bias,                       \
      const OptionalTensor &layer_scale1, const OptionalTensor &res_scale1,                   \
      const OptionalTensor &sample_scale1, int64_t num_groups1, int64_t pool_size,            \
      double eps1, const OptionalTensor &norm2_weight, const OptionalTensor &norm2_bias,      \
      double eps2, const at::Tensor &fc1_weight, const OptionalTensor &fc1_bias,              \
      const at::Tensor &fc2_weight, const OptionalTensor &fc2_bias,                           \
      const OptionalTensor &layer_scale2, const OptionalTensor &res_scale2,                   \
      const OptionalTensor &sample_scale2, c10::string_view activation,                       \
      const OptionalTensor &act_scale, const OptionalTensor &act_bias,                        \
      std::optional<at::ScalarType> gemm_dtype

#define FPM_BLOCK_ARGUMENTS                                                                    \
  norm1_weight, norm1_bias, layer_scale1, res_scale1, sample_scale1, num_groups1, pool_size, \
      eps1, norm2_weight, norm2_bias, eps2, fc1_weight, fc1_bias, fc2_weight, fc2_bias,      \
      layer_scale2, res_scale2, sample_scale2, activation, act_scale, act_bias, gemm_dtype

enum class Activation { kGelu, kGeluTanh, kStarRelu };

// The block's arguments after x, gathered (copies of the handles: cheap).
struct BlockArgs {
  OptionalTensor norm1_weight, norm1_bias, layer_scale1, res_scale1, sample_scale1;
  int64_t num_groups1 = 1, pool_size = 3;
  double eps1 = 1e-5;
  OptionalTensor norm2_weight, norm2_bias;
  double eps2 = 1e-5;
  at::Tensor fc1_weight;
  OptionalTensor fc1_bias;
  at::Tensor fc2_weight;
  OptionalTensor fc2_bias, layer_scale2, res_scale2, sample_scale2;
  Activation activation = Activation::kGelu;
  std::string_view activation_name;
  OptionalTensor act_scale, act_bias;
  std::optional<at::ScalarType> gemm_dtype;
};

// Reads the operator arguments; checks nothing (check_block_args does).
BlockArgs block_args(FPM_BLOCK_PARAMETERS);

// The gradients block_backward returns, in order.
constexpr int kBlockGradients = 15;
enum BlockGradient {
  kGradX, kGradNorm1Weight, kGradNorm1Bias, kGradLayerScale1, kGradResScale1, kGradNorm2Weight,
  kGradNorm2Bias, kGradFc1Weight, kGradFc1Bias, kGradFc2Weight, kGradFc2Bias, kGradLayerScale2,
  kGradResScale2, kGradActScale, kGradActBias
};
using BlockMask = std::array<bool, kBlockGradients>;

using BlockForwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BlockBackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor>;

using BlockForwardSignature = BlockForwardResult(const at::Tensor& x, FPM_BLOCK_PARAMETERS,
                                                 bool save_hidden);
using BlockBackwardSignature = BlockBackwardResult(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& hidden,
    const at::Tensor& mean1, const at::Tensor& rstd1, const at::Tensor& mean2,
    const at::Tensor& rstd2, FPM_BLOCK_PARAMETERS, BlockMask output_mask);
// The two families of block operators, one signature: the C++ one (block_forward /
// block_backward) composes the C++ mixer operators, the Triton one (triton_block_forward /
// triton_block_backward) the Triton mixer operators, which fused_poolformer.triton registers
// from Python (looked up when first called).  The MLP branch is the same ATen composition.
enum class BlockFamily : int { kCpp = 0, kTriton = 1 };
const c10::TypedOperatorHandle<BlockForwardSignature>& block_forward_handle(BlockFamily family);
const c10::TypedOperatorHandle<BlockBackwardSignature>& block_backward_handle(BlockFamily family);

// Argument checks (messages name the argument; fused_poolformer/block_contract.py is the
// Python twin, word for word).
void check_block_args(const at::Tensor& x, const BlockArgs& a);
void check_block_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& hidden, const at::Tensor& mean1,
                               const at::Tensor& rstd1, const at::Tensor& mean2,
                               const at::Tensor& rstd2, const BlockArgs& a);

// The operators' bodies for one device type (the device's kernels run underneath: the
// mixer's through the dispatcher, the GEMMs through ATen).
BlockForwardResult run_block_forward(const at::Tensor& x, const BlockArgs& a, bool save_hidden,
                                     at::DeviceType device_type,
                                     BlockFamily family = BlockFamily::kCpp);
BlockBackwardResult run_block_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                       const at::Tensor& hidden, const at::Tensor& mean1,
                                       const at::Tensor& rstd1, const at::Tensor& mean2,
                                       const at::Tensor& rstd2, const BlockArgs& a,
                                       BlockMask mask, at::DeviceType device_type,
                                       BlockFamily family = BlockFamily::kCpp);

// The backward's formulas (docs/block.md) through differentiable ATen operators: the
// backward under create_graph=True, where second derivatives must be exact.  Recomputes x1,
// its statistics and hidden from x.  The C++ family only (the Triton mixer's backward
// operator is not differentiable itself: its double backward lives in Python).
BlockBackwardResult differentiable_block_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                  const BlockArgs& a, BlockMask mask);

}  // namespace fused_poolformer

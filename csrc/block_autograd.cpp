// Autograd of the whole-block operators, in C++ at the Autograd dispatch key, as the mixer's
// (csrc/autograd.cpp; docs/autograd.md):
//
//   block_forward  -> records BlockBackward, which saves x, hidden and the four (N, .)
//                     statistics -- not x1, not the activation, not the MLP's output, and no
//                     derived weight: the backward recomputes x1 with one mixer forward and
//                     reads the parameters again.  With save_hidden false it saves no hidden
//                     either and the backward recomputes it too (fc1 once more).
//   BlockBackward  -> block_backward through the dispatcher, whose own Autograd kernel
//                     redispatches to the device's kernels (grad mode off, the usual case) or,
//                     under create_graph=True, evaluates the backward with differentiable
//                     operators (differentiable_block_backward), so second derivatives are exact.
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <string>

#include "block.h"

namespace fused_poolformer {

const c10::TypedOperatorHandle<BlockForwardSignature>& block_forward_handle(BlockFamily family) {
  static const std::array<c10::TypedOperatorHandle<BlockForwardSignature>, 2> handles{
      c10::Dispatcher::singleton().findSchemaOrThrow("fused_poolformer::block_forward", "")
          .typed<BlockForwardSignature>(),
      c10::Dispatcher::singleton().findSchemaOrThrow("fused_poolformer::triton_block_forward", "")
          .typed<BlockForwardSignature>()};
  return handles[static_cast<int>(family)];
}

const c10::TypedOperatorHandle<BlockBackwardSignature>& block_backward_handle(BlockFamily family) {
  static const std::array<c10::TypedOperatorHandle<BlockBackwardSignature>, 2> handles{
      c10::Dispatcher::singleton().findSchemaOrThrow("fused_poolformer::block_backward", "")
          .typed<BlockBackwardSignature>(),
      c10::Dispatcher::singleton().findSchemaOrThrow("fused_poolformer::triton_block_backward", "")
          .typed<BlockBackwardSignature>()};
  return handles[static_cast<int>(family)];
}

namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

bool present(const OptionalTensor& t) { return t.has_value() && t->defined(); }
bool requires_grad(const OptionalTensor& t) { return present(t) && t->requires_grad(); }
at::Tensor or_undefined(const OptionalTensor& t) { return present(t) ? *t : at::Tensor(); }
OptionalTensor optional(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : OptionalTensor(); }

// The forward's tensor arguments in schema order (the node's edges follow it one to one).
enum Input {
  kInX, kInNorm1Weight, kInNorm1Bias, kInLayerScale1, kInResScale1, kInSampleScale1,
  kInNorm2Weight, kInNorm2Bias, kInFc1Weight, kInFc1Bias, kInFc2Weight, kInFc2Bias,
  kInLayerScale2, kInResScale2, kInSampleScale2, kInActScale, kInActBias, kNumInputs
};
// The input each of block_backward's gradients belongs to.
constexpr std::array<Input, kBlockGradients> kGradientInput{
    kInX, kInNorm1Weight, kInNorm1Bias, kInLayerScale1, kInResScale1, kInNorm2Weight,
    kInNorm2Bias, kInFc1Weight, kInFc1Bias, kInFc2Weight, kInFc2Bias, kInLayerScale2,
    kInResScale2, kInActScale, kInActBias};

std::array<OptionalTensor, kNumInputs> tensor_inputs(const at::Tensor& x, const BlockArgs& a) {
  return {x, a.norm1_weight, a.norm1_bias, a.layer_scale1, a.res_scale1, a.sample_scale1,
          a.norm2_weight, a.norm2_bias, a.fc1_weight, a.fc1_bias, a.fc2_weight, a.fc2_bias,
          a.layer_scale2, a.res_scale2, a.sample_scale2, a.act_scale, a.act_bias};
}

class BlockBackward : public torch::autograd::TraceableFunction {
 public:
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(kNumInputs);
    BlockMask mask{};
    bool any = false;
    for (int i = 0; i < kBlockGradients; ++i) {
      mask[i] = task_should_compute_output(kGradientInput[i]);
      any = any || mask[i];
    }
    if (!grads[0].defined() || !any) return out;
    const auto self = getptr();
    std::array<at::Tensor, kNumInputs> in;
    for (int i = 0; i < kNumInputs; ++i) in[i] = inputs_[i].unpack(self);
    const BlockArgs a = args(in);
    const auto result = block_backward_handle(family_).call(
        grads[0], in[kInX], hidden_.unpack(self), mean1_.unpack(self), rstd1_.unpack(self),
        mean2_.unpack(self), rstd2_.unpack(self), a.norm1_weight, a.norm1_bias, a.layer_scale1,
        a.res_scale1, a.sample_scale1, num_groups1_, pool_size_, eps1_, a.norm2_weight,
        a.norm2_bias, eps2_, a.fc1_weight, a.fc1_bias, a.fc2_weight, a.fc2_bias, a.layer_scale2,
        a.res_scale2, a.sample_scale2, activation_, a.act_scale, a.act_bias, gemm_dtype_, mask);
    std::apply([&](const auto&... g) {
      int i = 0;
      ((out[kGradientInput[i++]] = g), ...);
    }, result);
    return out;
  }

  std::string name() const override { return "BlockBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto* v : saved()) v->reset_data();
  }

  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    for (auto* v : const_cast<BlockBackward*>(this)->saved()) args.collect(*v, false);
    args.collect(num_groups1_);
    args.collect(pool_size_);
    args.collect(eps1_);
    args.collect(eps2_);
    args.collect(activation_);
    args.collect(gemm_dtype_);
    args.collect(static_cast<int64_t>(family_));
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& swap) override {
    for (auto* v : saved()) swap.before(*v);
    auto out = apply(variable_list(grads));
    for (auto* v : saved()) swap.after(*v);
    return out;
  }

  void save(const at::Tensor& x, const BlockArgs& a, const BlockForwardResult& result,
            BlockFamily family) {
    family_ = family;
    const auto inputs = tensor_inputs(x, a);
    for (int i = 0; i < kNumInputs; ++i) inputs_[i] = SavedVariable(or_undefined(inputs[i]), false);
    const auto& [out, hidden, mean1, rstd1, mean2, rstd2] = result;
    hidden_ = SavedVariable(hidden, false);
    mean1_ = SavedVariable(mean1, false), rstd1_ = SavedVariable(rstd1, false);
    mean2_ = SavedVariable(mean2, false), rstd2_ = SavedVariable(rstd2, false);
    num_groups1_ = a.num_groups1, pool_size_ = a.pool_size, eps1_ = a.eps1, eps2_ = a.eps2;
    activation_ = std::string(a.activation_name);
    gemm_dtype_ = a.gemm_dtype;
  }

 private:
  BlockArgs args(const std::array<at::Tensor, kNumInputs>& in) const {
    return block_args(optional(in[kInNorm1Weight]), optional(in[kInNorm1Bias]),
                      optional(in[kInLayerScale1]), optional(in[kInResScale1]),
                      optional(in[kInSampleScale1]), num_groups1_, pool_size_, eps1_,
                      optional(in[kInNorm2Weight]), optional(in[kInNorm2Bias]), eps2_,
                      in[kInFc1Weight], optional(in[kInFc1Bias]), in[kInFc2Weight],
                      optional(in[kInFc2Bias]), optional(in[kInLayerScale2]),
                      optional(in[kInResScale2]), optional(in[kInSampleScale2]), activation_,
                      optional(in[kInActScale]), optional(in[kInActBias]), gemm_dtype_);
  }

  std::vector<SavedVariable*> saved() {
    std::vector<SavedVariable*> all{&hidden_, &mean1_, &rstd1_, &mean2_, &rstd2_};
    for (auto& v : inputs_) all.push_back(&v);
    return all;
  }

  // x and the parameters (held anyway: no memory of their own), hidden and the statistics.
  std::array<SavedVariable, kNumInputs> inputs_;
  SavedVariable hidden_, mean1_, rstd1_, mean2_, rstd2_;
  int64_t num_groups1_ = 1, pool_size_ = 3;
  double eps1_ = 1e-5, eps2_ = 1e-5;
  std::string activation_;
  std::optional<at::ScalarType> gemm_dtype_;
  BlockFamily family_ = BlockFamily::kCpp;
};

template <BlockFamily kFamily>
BlockForwardResult block_forward_autograd(c10::DispatchKeySet ks, const at::Tensor& x,
                                          FPM_BLOCK_PARAMETERS, bool save_hidden) {
  const BlockArgs a = block_args(FPM_BLOCK_ARGUMENTS);
  const auto inputs = tensor_inputs(x, a);
  bool any_grad = false;
  for (const auto& t : inputs) {
    TORCH_CHECK_NOT_IMPLEMENTED(!torch::autograd::isFwGradDefined(t),
                                "poolformer_block: forward-mode AD (forward_ad, torch.func.jvp) "
                                "is not supported");
    any_grad = any_grad || requires_grad(t);
  }
  c10::intrusive_ptr<BlockBackward> node;
  if (at::GradMode::is_enabled() && any_grad) {
    node = c10::make_intrusive<BlockBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(
        inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], inputs[5], inputs[6], inputs[7],
        inputs[8], inputs[9], inputs[10], inputs[11], inputs[12], inputs[13], inputs[14],
        inputs[15], inputs[16]));
  }
  auto result = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return block_forward_handle(kFamily).redispatch(ks & c10::after_ADInplaceOrView_keyset, x,
                                             FPM_BLOCK_ARGUMENTS, save_hidden);
  }();
  if (node) {
    // Only out is differentiable; hidden and the statistics get no history.
    torch::autograd::set_history(std::get<0>(result), node);
    node->save(x, a, result, kFamily);
    torch::autograd::fire_node_creation_hooks(node);
  }
  return result;
}

template <BlockFamily kFamily>
BlockBackwardResult block_backward_autograd(c10::DispatchKeySet ks, const at::Tensor& grad_out,
                                            const at::Tensor& x, const at::Tensor& hidden,
                                            const at::Tensor& mean1, const at::Tensor& rstd1,
                                            const at::Tensor& mean2, const at::Tensor& rstd2,
                                            FPM_BLOCK_PARAMETERS, BlockMask output_mask) {
  const BlockArgs a = block_args(FPM_BLOCK_ARGUMENTS);
  bool differentiable = grad_out.requires_grad();
  for (const auto& t : tensor_inputs(x, a)) differentiable = differentiable || requires_grad(t);
  if (at::GradMode::is_enabled() && differentiable) {
    TORCH_CHECK_NOT_IMPLEMENTED(kFamily == BlockFamily::kCpp,
                                "poolformer_block: double backward (create_graph=True) is not "
                                "supported on the triton backend; use backend 'cpu' or 'cuda'");
    if (!x.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
      check_block_backward_args(grad_out, x, hidden, mean1, rstd1, mean2, rstd2, a);
    }
    return differentiable_block_backward(grad_out, x, a, output_mask);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return block_backward_handle(kFamily).redispatch(ks & c10::after_ADInplaceOrView_keyset, grad_out, x,
                                            hidden, mean1, rstd1, mean2, rstd2,
                                            FPM_BLOCK_ARGUMENTS, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_poolformer, Autograd, m) {
  m.impl("block_forward", &block_forward_autograd<BlockFamily::kCpp>);
  m.impl("block_backward", &block_backward_autograd<BlockFamily::kCpp>);
  m.impl("triton_block_forward", &block_forward_autograd<BlockFamily::kTriton>);
  m.impl("triton_block_backward", &block_backward_autograd<BlockFamily::kTriton>);
}

}  // namespace fused_poolformer

// Autograd of the fused pool mixer, in C++ at the Autograd dispatch key (as PyTorch's
// generated code does for its own operators): a call that needs gradients goes from the
// dispatcher straight to the device kernel and records one node, with no Python on the
// way and none inside the backward.
//
//   pool_mixer_forward  -> records PoolMixerBackward: saves x, mean, rstd and the vectors
//                          (nothing else of size N*C*H*W); mean and rstd get no history.
//   PoolMixerBackward   -> pool_mixer_backward through the dispatcher, whose own Autograd
//                          kernel either redispatches to the fused kernel (the usual case:
//                          grad mode is off inside a backward) or, under create_graph=True,
//                          evaluates the closed-form backward (docs/math.md) with
//                          differentiable ATen ops, so second derivatives are exact.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <mutex>

#include "host.h"

namespace fused_poolformer {

// The operators' typed handles, looked up once.
const c10::TypedOperatorHandle<ForwardSignature>& forward_handle() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("fused_poolformer::pool_mixer_forward", "")
                                 .typed<ForwardSignature>();
  return handle;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_handle() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("fused_poolformer::pool_mixer_backward", "")
                                 .typed<BackwardSignature>();
  return handle;
}

namespace {

using torch::autograd::collect_next_edges;
using torch::autograd::isFwGradDefined;
using torch::autograd::set_history;
using torch::autograd::variable_list;

bool present(const OptionalTensor& t) { return t.has_value() && t->defined(); }

OptionalTensor optional(const at::Tensor& t) {
  return t.defined() ? OptionalTensor(t) : OptionalTensor();
}

at::Tensor or_undefined(const OptionalTensor& t) { return present(t) ? *t : at::Tensor(); }

bool requires_grad(const OptionalTensor& t) { return present(t) && t->requires_grad(); }

// ---------------------------------------------------------------------------------------
// The closed-form backward through differentiable ATen ops (used only when the backward
// itself is differentiated).  With r = rstd, a = layer_scale * weight * sample_scale,
// D = P x - x, b = a * dy and M = (C / G) * H * W:
//   dx       = res * dy + r * (P^T b - b) - r^3 / M * (x - mean) * S,  S = sum_group a D dy
//   T[c]     = sum_{n,h,w} r * sample_scale * D * dy
//   dweight  = layer_scale * T,  dlayer_scale = weight * T,  dres_scale = sum x * dy
// The statistics are recomputed from x so that their dependence on x is differentiated.

// t * v, where an absent vector stands for ones.
at::Tensor times(const at::Tensor& t, const at::Tensor& v) { return v.defined() ? t * v : t; }

BackwardResult differentiable_backward(const at::Tensor& grad_y, const at::Tensor& x_in,
                                       const OptionalTensor& weight, const OptionalTensor& bias,
                                       const OptionalTensor& layer_scale,
                                       const OptionalTensor& res_scale,
                                       const OptionalTensor& sample_scale, int64_t G, int64_t k,
                                       double eps, std::array<bool, 5> mask) {
  // Sizes stay symbolic (c10::SymInt) so that torch.compile can trace this path too.
  const auto acc = accumulate_type(x_in.scalar_type());
  const c10::SymInt N = x_in.sym_size(0), C = x_in.sym_size(1);
  const at::Tensor x = x_in.to(acc), dy = grad_y.to(acc);
  auto vector = [&](const OptionalTensor& v) { return present(v) ? v->to(acc) : at::Tensor(); };
  auto channel = [&](const at::Tensor& v) {  // (C,) -> (1, C, 1, 1)
    return v.defined() ? v.view_symint({1, C, 1, 1}) : at::Tensor();
  };
  // (N, G) -> (N, C, 1, 1): each channel gets its group's value.
  auto per_channel = [&](const at::Tensor& t) {
    return t.view_symint({N, G, 1}).expand_symint({N, G, C / G}).reshape_symint({N, C, 1, 1});
  };
  auto group_mean = [&](const at::Tensor& t) { return t.reshape_symint({N, G, -1}).mean(-1); };
  const at::Tensor mean = group_mean(x);
  const at::Tensor var = group_mean((x.reshape_symint({N, G, -1}) - mean.unsqueeze(-1)).pow(2));
  const at::Tensor r = per_channel((var + eps).rsqrt());
  const at::Tensor centered = x - per_channel(mean);

  const std::vector<int64_t> window{k, k}, stride{kPoolStride, kPoolStride},
      padding{pool_radius(k), pool_radius(k)};
  const at::Tensor D = at::avg_pool2d(x, window, stride, padding, /*ceil_mode=*/false,
                                          kCountIncludePad) - x;
  const at::Tensor w = vector(weight), ls = vector(layer_scale), rs = vector(res_scale);
  const at::Tensor sample =
      present(sample_scale) ? sample_scale->to(acc).view_symint({N, 1, 1, 1}) : at::Tensor();
  const at::Tensor b = times(times(times(dy, channel(ls)), channel(w)), sample);  // a * dy
  const at::Tensor pool_t_b =
      at::avg_pool2d_backward(b, x, window, stride, padding, /*ceil_mode=*/false,
                              kCountIncludePad, std::nullopt);
  // S / M = the group mean of a * D * dy.
  const at::Tensor s_over_m = per_channel(group_mean(D * b));
  const at::Tensor dx =
      times(dy, channel(rs)) + r * (pool_t_b - b) - r.pow(3) * centered * s_over_m;
  const at::Tensor T = times(r * D * dy, sample).sum({0, 2, 3});

  auto as_param = [&](bool wanted, const at::Tensor& value, const OptionalTensor& param) {
    if (!wanted) return at::Tensor();
    return value.to(present(param) ? param->scalar_type() : x_in.scalar_type());
  };
  return {mask[0] ? dx.to(x_in.scalar_type()) : at::Tensor(),
          as_param(mask[1], times(T, ls), weight),
          as_param(mask[2], at::zeros_like(T), bias),
          as_param(mask[3], times(T, w), layer_scale),
          as_param(mask[4], (x * dy).sum({0, 2, 3}), res_scale)};
}

// ---------------------------------------------------------------------------------------
// The backward operator's Autograd kernel.

BackwardResult backward_autograd(c10::DispatchKeySet ks, const at::Tensor& grad_y,
                                 const at::Tensor& x, const at::Tensor& mean,
                                 const at::Tensor& rstd, const OptionalTensor& weight,
                                 const OptionalTensor& bias, const OptionalTensor& layer_scale,
                                 const OptionalTensor& res_scale,
                                 const OptionalTensor& sample_scale, int64_t num_groups,
                                 int64_t pool_size, double eps, std::array<bool, 5> output_mask) {
  const bool differentiable =
      at::GradMode::is_enabled() &&
      (grad_y.requires_grad() || x.requires_grad() || requires_grad(weight) ||
       requires_grad(layer_scale) || requires_grad(res_scale));
  if (differentiable) {
    // (torch.compile traces this with symbolic sizes, which the C++ checks cannot read;
    // the fake kernel has checked the arguments there.)
    if (!x.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
      check_backward_args(grad_y, x, mean, rstd, weight, bias, layer_scale, res_scale,
                          sample_scale, num_groups, pool_size, eps);
    }
    return differentiable_backward(grad_y, x, weight, bias, layer_scale, res_scale,
                                   sample_scale, num_groups, pool_size, eps, output_mask);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return backward_handle().redispatch(ks & c10::after_ADInplaceOrView_keyset, grad_y, x, mean,
                                      rstd, weight, bias, layer_scale, res_scale, sample_scale,
                                      num_groups, pool_size, eps, output_mask);
}

// ---------------------------------------------------------------------------------------
// The forward operator's autograd node.
//
// A hand-written Node, as PyTorch's generated autograd code builds for its own operators,
// instead of torch::autograd::Function: Function::apply also builds a context with a
// string-keyed map, per-input and per-output VariableInfo vectors, and wraps every output
// a second time -- several microseconds per call that a late-stage 7x7 call notices.
// Edges follow the forward's tensor arguments one to one (an absent optional gets an
// empty edge), so output i of apply() is the gradient of argument i.

class PoolMixerBackward : public torch::autograd::TraceableFunction {
 public:
  enum Input { kX, kWeight, kBias, kLayerScale, kResScale, kSampleScale, kNumInputs };

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(kNumInputs);
    const at::Tensor& grad_y = grads[0];
    // task_should_compute_output: only what this backward pass asked for (e.g. the inputs
    // of torch.autograd.grad), false for an absent optional.
    const std::array<bool, 5> mask{
        task_should_compute_output(kX), task_should_compute_output(kWeight),
        task_should_compute_output(kBias), task_should_compute_output(kLayerScale),
        task_should_compute_output(kResScale)};
    if (!grad_y.defined() || !(mask[0] || mask[1] || mask[2] || mask[3] || mask[4])) return out;
    const auto self = getptr();
    auto unpack = [&](const torch::autograd::SavedVariable& v) { return optional(v.unpack(self)); };
    auto [dx, dweight, dbias, dlayer, dres] = backward_handle().call(
        grad_y, x_.unpack(self), mean_.unpack(self), rstd_.unpack(self), unpack(weight_),
        unpack(bias_), unpack(layer_scale_), unpack(res_scale_), unpack(sample_scale_),
        num_groups_, pool_size_, eps_, mask);
    out[kX] = std::move(dx), out[kWeight] = std::move(dweight), out[kBias] = std::move(dbias);
    out[kLayerScale] = std::move(dlayer), out[kResScale] = std::move(dres);
    return out;
  }

  std::string name() const override { return "PoolMixerBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto* v : saved()) v->reset_data();
  }

  // Compiled autograd: the saved tensors and options are the node's inputs; its apply()
  // calls only dispatcher operators, so it is traced as it stands.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    for (auto* v : const_cast<PoolMixerBackward*>(this)->saved()) args.collect(*v, false);
    args.collect(num_groups_);
    args.collect(pool_size_);
    args.collect(eps_);
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& swap) override {
    for (auto* v : saved()) swap.before(*v);
    auto out = apply(variable_list(grads));
    for (auto* v : saved()) swap.after(*v);
    return out;
  }

  void save(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
            const OptionalTensor& weight, const OptionalTensor& bias,
            const OptionalTensor& layer_scale, const OptionalTensor& res_scale,
            const OptionalTensor& sample_scale, int64_t num_groups, int64_t pool_size,
            double eps) {
    auto keep = [](const OptionalTensor& v) {
      return torch::autograd::SavedVariable(or_undefined(v), false);
    };
    x_ = torch::autograd::SavedVariable(x, false);
    mean_ = torch::autograd::SavedVariable(mean, false);
    rstd_ = torch::autograd::SavedVariable(rstd, false);
    weight_ = keep(weight), bias_ = keep(bias), layer_scale_ = keep(layer_scale);
    res_scale_ = keep(res_scale), sample_scale_ = keep(sample_scale);
    num_groups_ = num_groups, pool_size_ = pool_size, eps_ = eps;
  }

 private:
  std::array<torch::autograd::SavedVariable*, 8> saved() {
    return {&x_, &mean_, &rstd_, &weight_, &bias_, &layer_scale_, &res_scale_, &sample_scale_};
  }

  // x, mean and rstd, and the vectors: nothing else of size N*C*H*W.
  torch::autograd::SavedVariable x_, mean_, rstd_, weight_, bias_, layer_scale_, res_scale_,
      sample_scale_;
  int64_t num_groups_ = 1, pool_size_ = 3;
  double eps_ = 1e-5;
};

ForwardResult forward_autograd(c10::DispatchKeySet ks, const at::Tensor& x,
                               const OptionalTensor& weight, const OptionalTensor& bias,
                               const OptionalTensor& layer_scale, const OptionalTensor& res_scale,
                               const OptionalTensor& sample_scale, int64_t num_groups,
                               int64_t pool_size, double eps) {
  // Forward-mode AD has no formula here: refuse it rather than drop the tangent.
  TORCH_CHECK_NOT_IMPLEMENTED(
      !(isFwGradDefined(x) || isFwGradDefined(weight) || isFwGradDefined(bias) ||
        isFwGradDefined(layer_scale) || isFwGradDefined(res_scale) ||
        isFwGradDefined(sample_scale)),
      "pool_mixer: forward-mode AD (forward_ad, torch.func.jvp) is not supported");
  // A graph is recorded exactly when an input requires grad (sample_scale included: it
  // gets an edge, and no gradient, as an autograd.Function would give it).
  c10::intrusive_ptr<PoolMixerBackward> node;
  if (at::GradMode::is_enabled() &&
      (x.requires_grad() || requires_grad(weight) || requires_grad(bias) ||
       requires_grad(layer_scale) || requires_grad(res_scale) || requires_grad(sample_scale))) {
    node = c10::make_intrusive<PoolMixerBackward>();
    node->set_next_edges(
        collect_next_edges(x, weight, bias, layer_scale, res_scale, sample_scale));
  }
  auto result = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_handle().redispatch(ks & c10::after_ADInplaceOrView_keyset, x, weight, bias,
                                       layer_scale, res_scale, sample_scale, num_groups,
                                       pool_size, eps);
  }();
  if (node) {
    auto& [y, mean, rstd] = result;
    // mean and rstd get no history: they are not differentiable outputs.
    set_history(y, node);
    node->save(x, mean, rstd, weight, bias, layer_scale, res_scale, sample_scale, num_groups,
               pool_size, eps);
    torch::autograd::fire_node_creation_hooks(node);
  }
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_poolformer, Autograd, m) {
  m.impl("pool_mixer_forward", &forward_autograd);
  m.impl("pool_mixer_backward", &backward_autograd);
}

}  // namespace fused_poolformer

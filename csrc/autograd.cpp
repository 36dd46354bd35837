// Autograd of the fused pool mixer, in C++ at the Autograd dispatch key (as torchvision
// does for its operators): a call that needs gradients goes from the dispatcher straight
// into PoolMixerFunction and from there to the device kernel, with no Python on the way
// and none inside the backward.
//
//   pool_mixer_forward  -> PoolMixerFunction: saves x, mean, rstd and the vectors (nothing
//                          else of size N*C*H*W); mean and rstd are non-differentiable.
//   its backward        -> pool_mixer_backward through the dispatcher, whose own Autograd
//                          kernel either redispatches to the fused kernel (the usual case:
//                          grad mode is off inside a backward) or, under create_graph=True,
//                          evaluates the closed-form backward (docs/math.md) with
//                          differentiable ATen ops, so second derivatives are exact.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "host.h"

namespace fused_poolformer {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSignature = ForwardResult(const at::Tensor&, const OptionalTensor&,
                                       const OptionalTensor&, const OptionalTensor&,
                                       const OptionalTensor&, const OptionalTensor&, int64_t,
                                       int64_t, double);
using BackwardSignature = BackwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const OptionalTensor&,
                                         const OptionalTensor&, const OptionalTensor&,
                                         const OptionalTensor&, const OptionalTensor&, int64_t,
                                         int64_t, double, std::array<bool, 5>);

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

  const std::vector<int64_t> window{k, k}, stride{1, 1}, padding{k / 2, k / 2};
  const at::Tensor D = at::avg_pool2d(x, window, stride, padding, false, false) - x;
  const at::Tensor w = vector(weight), ls = vector(layer_scale), rs = vector(res_scale);
  const at::Tensor sample =
      present(sample_scale) ? sample_scale->to(acc).view_symint({N, 1, 1, 1}) : at::Tensor();
  const at::Tensor b = times(times(times(dy, channel(ls)), channel(w)), sample);  // a * dy
  const at::Tensor pool_t_b =
      at::avg_pool2d_backward(b, x, window, stride, padding, false, false, std::nullopt);
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
// The forward operator's autograd Function.

class PoolMixerFunction : public torch::autograd::Function<PoolMixerFunction> {
 public:
  // Lets compiled autograd trace the backward (it calls only dispatcher operators).
  static constexpr bool is_traceable = true;

  static variable_list forward(AutogradContext* ctx, c10::DispatchKeySet ks, const at::Tensor& x,
                               const OptionalTensor& weight, const OptionalTensor& bias,
                               const OptionalTensor& layer_scale, const OptionalTensor& res_scale,
                               const OptionalTensor& sample_scale, int64_t num_groups,
                               int64_t pool_size, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = forward_handle().redispatch(
        ks & c10::after_ADInplaceOrView_keyset, x, weight, bias, layer_scale, res_scale,
        sample_scale, num_groups, pool_size, eps);
    ctx->save_for_backward({x, mean, rstd, or_undefined(weight), or_undefined(bias),
                            or_undefined(layer_scale), or_undefined(res_scale),
                            or_undefined(sample_scale)});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["pool_size"] = pool_size;
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, rstd});
    // The gradients of mean and rstd are never materialised (they would be zeros).
    ctx->set_materialize_grads(false);
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const OptionalTensor weight = optional(saved[3]), bias = optional(saved[4]),
                         layer_scale = optional(saved[5]), res_scale = optional(saved[6]),
                         sample_scale = optional(saved[7]);
    // needs_input_grad counts the tensor inputs actually passed: an absent optional
    // shifts the indices of the ones after it.
    int64_t index = 0;
    auto wanted = [&](bool passed) { return passed && ctx->needs_input_grad(index++); };
    const std::array<bool, 5> mask{wanted(true), wanted(weight.has_value()),
                                   wanted(bias.has_value()), wanted(layer_scale.has_value()),
                                   wanted(res_scale.has_value())};
    // One entry per argument of forward (after ctx): ks, x, the five vectors, three options.
    variable_list out(10);
    const at::Tensor& grad_y = grads[0];
    if (!grad_y.defined() || !(mask[0] || mask[1] || mask[2] || mask[3] || mask[4])) return out;
    auto [dx, dweight, dbias, dlayer, dres] = backward_handle().call(
        grad_y, x, saved[1], saved[2], weight, bias, layer_scale, res_scale, sample_scale,
        ctx->saved_data["num_groups"].toInt(), ctx->saved_data["pool_size"].toInt(),
        ctx->saved_data["eps"].toDouble(), mask);
    out[1] = dx, out[2] = dweight, out[3] = dbias, out[4] = dlayer, out[5] = dres;
    return out;
  }
};

ForwardResult forward_autograd(c10::DispatchKeySet ks, const at::Tensor& x,
                               const OptionalTensor& weight, const OptionalTensor& bias,
                               const OptionalTensor& layer_scale, const OptionalTensor& res_scale,
                               const OptionalTensor& sample_scale, int64_t num_groups,
                               int64_t pool_size, double eps) {
  // Without a graph to record (inference, torch.no_grad, inputs that need no gradient)
  // go straight to the kernel: Function::apply would still build a node, its context and
  // the saved tensors, a few microseconds that a small late-stage call notices.
  const bool record = at::GradMode::is_enabled() &&
                      (x.requires_grad() || requires_grad(weight) || requires_grad(bias) ||
                       requires_grad(layer_scale) || requires_grad(res_scale) ||
                       requires_grad(sample_scale));
  if (!record) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_handle().redispatch(ks & c10::after_ADInplaceOrView_keyset, x, weight, bias,
                                       layer_scale, res_scale, sample_scale, num_groups,
                                       pool_size, eps);
  }
  auto out = PoolMixerFunction::apply(ks, x, weight, bias, layer_scale, res_scale, sample_scale,
                                      num_groups, pool_size, eps);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_poolformer, Autograd, m) {
  m.impl("pool_mixer_forward", &forward_autograd);
  m.impl("pool_mixer_backward", &backward_autograd);
}

}  // namespace fused_poolformer

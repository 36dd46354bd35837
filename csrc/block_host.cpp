// The whole-block operators' bodies (see block.h, docs/block.md): argument checks, then the
// forward and backward as a composition of the fused mixer (through the dispatcher: the
// device's kernels) with the MLP branch, whose GEMMs run in ATen (oneDNN / MKL on the CPU,
// cuBLAS on the GPU) and whose epilogues are ATen element-wise operators.  The same
// formulas, run with autograd recording, are the differentiable backward.
//
// Layouts: x, x1, out, hidden share x's layout.  A 1x1 convolution over channels is, for an
// NCHW tensor, a batch of (M, K) x (K, H*W) products and, for a channels_last one, a single
// (N*H*W, K) x (K, M) product over its rows (channel_product).
#include "block.h"

#include <c10/core/DeviceGuard.h>

#include <cmath>

namespace fused_poolformer {

// ---------------------------------------------------------------------------------------
// Arguments.

namespace {

constexpr const char* kWho = "poolformer_block";

bool present(const OptionalTensor& t) { return t.has_value() && t->defined(); }

std::optional<Activation> parse_activation(std::string_view name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "star_relu") return Activation::kStarRelu;
  return std::nullopt;
}

void check_matrix(const at::Tensor& w, const char* name, std::optional<int64_t> rows, int64_t cols,
                  const at::Tensor& x) {
  TORCH_CHECK_VALUE(w.defined(), kWho, ": ", name, " must be a tensor");
  const std::string rows_text = rows ? std::to_string(*rows) : "hidden";
  TORCH_CHECK_VALUE(w.dim() == 2 && (!rows || w.size(0) == *rows) && w.size(1) == cols, kWho,
                    ": ", name, " must have shape (", rows_text, ", ", cols, "), got ", w.sizes());
  TORCH_CHECK_VALUE(w.device() == x.device(), kWho, ": ", name, " is on ", w.device(),
                    " but x is on ", x.device());
  check_parameter_dtype(w, name, x, kWho);
}

}  // namespace

BlockArgs block_args(FPM_BLOCK_PARAMETERS) {
  BlockArgs a;
  a.norm1_weight = norm1_weight, a.norm1_bias = norm1_bias, a.layer_scale1 = layer_scale1;
  a.res_scale1 = res_scale1, a.sample_scale1 = sample_scale1;
  a.num_groups1 = num_groups1, a.pool_size = pool_size, a.eps1 = eps1;
  a.norm2_weight = norm2_weight, a.norm2_bias = norm2_bias, a.eps2 = eps2;
  a.fc1_weight = fc1_weight, a.fc1_bias = fc1_bias;
  a.fc2_weight = fc2_weight, a.fc2_bias = fc2_bias;
  a.layer_scale2 = layer_scale2, a.res_scale2 = res_scale2, a.sample_scale2 = sample_scale2;
  a.activation_name = std::string_view(activation.data(), activation.size());
  a.activation = parse_activation(a.activation_name).value_or(Activation::kGelu);
  a.act_scale = act_scale, a.act_bias = act_bias;
  a.gemm_dtype = gemm_dtype;
  return a;
}

void check_block_args(const at::Tensor& x, const BlockArgs& a) {
  check_activation_arg(x, "x", kWho);
  const int64_t N = x.size(0), C = x.size(1);
  const std::pair<const char*, const OptionalTensor*> channel_vectors[] = {
      {"norm1_weight", &a.norm1_weight}, {"norm1_bias", &a.norm1_bias},
      {"layer_scale1", &a.layer_scale1}, {"res_scale1", &a.res_scale1},
      {"norm2_weight", &a.norm2_weight}, {"norm2_bias", &a.norm2_bias},
      {"layer_scale2", &a.layer_scale2}, {"res_scale2", &a.res_scale2}};
  for (const auto& [name, v] : channel_vectors) check_vector_arg(*v, name, C, "C", x, kWho);
  check_vector_arg(a.sample_scale1, "sample_scale1", N, "N", x, kWho);
  check_vector_arg(a.sample_scale2, "sample_scale2", N, "N", x, kWho);
  check_group_options(x, a.num_groups1, a.pool_size, a.eps1, kWho, "num_groups1", "eps1");
  TORCH_CHECK_VALUE(a.eps2 > 0.0 && std::isfinite(a.eps2), kWho,
                    ": eps2 must be a finite number > 0, got ", a.eps2);
  check_matrix(a.fc1_weight, "fc1_weight", std::nullopt, C, x);
  const int64_t hidden = a.fc1_weight.size(0);
  check_matrix(a.fc2_weight, "fc2_weight", C, hidden, x);
  check_vector_arg(a.fc1_bias, "fc1_bias", hidden, "hidden", x, kWho);
  check_vector_arg(a.fc2_bias, "fc2_bias", C, "C", x, kWho);
  TORCH_CHECK_VALUE(parse_activation(a.activation_name).has_value(), kWho,
                    ": activation must be one of ('gelu', 'gelu_tanh', 'star_relu'), got '",
                    a.activation_name, "'");
  for (const auto& [name, v] : {std::pair{"act_scale", &a.act_scale}, std::pair{"act_bias", &a.act_bias}}) {
    TORCH_CHECK_VALUE(!present(*v) || a.activation == Activation::kStarRelu, kWho, ": ", name,
                      " is given but activation '", a.activation_name,
                      "' takes none (only 'star_relu' does)");
    check_vector_arg(*v, name, 1, "1", x, kWho);
  }
  if (a.gemm_dtype) {
    TORCH_CHECK_TYPE(is_supported_float(*a.gemm_dtype), kWho,
                     ": gemm_dtype must be a floating dtype or None, got ",
                     dtype_name(*a.gemm_dtype));
    TORCH_CHECK_TYPE((*a.gemm_dtype == at::kDouble) == (x.scalar_type() == at::kDouble), kWho,
                     ": gemm_dtype ", dtype_name(*a.gemm_dtype), " cannot serve an x of dtype ",
                     dtype_name(x.scalar_type()), " (float64 computes in float64 throughout)");
  }
}

void check_block_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& hidden, const at::Tensor& mean1,
                               const at::Tensor& rstd1, const at::Tensor& mean2,
                               const at::Tensor& rstd2, const BlockArgs& a) {
  check_block_args(x, a);
  check_activation_arg(grad_out, "grad_out", kWho);
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type() &&
                        grad_out.device() == x.device(),
                    kWho, ": grad_out must have x's shape, dtype and device, got ", grad_out.sizes(),
                    " ", dtype_name(grad_out.scalar_type()), " on ", grad_out.device(), " for ",
                    x.sizes(), " ", dtype_name(x.scalar_type()), " on ", x.device());
  check_statistics_arg(mean1, "mean1", x, a.num_groups1, kWho, "(N, num_groups1)");
  check_statistics_arg(rstd1, "rstd1", x, a.num_groups1, kWho, "(N, num_groups1)");
  check_statistics_arg(mean2, "mean2", x, 1, kWho, "(N, 1)");
  check_statistics_arg(rstd2, "rstd2", x, 1, kWho, "(N, 1)");
  const std::array<int64_t, 4> want{x.size(0), a.fc1_weight.size(0), x.size(2), x.size(3)};
  TORCH_CHECK_VALUE(hidden.numel() == 0 || hidden.sizes() == at::IntArrayRef(want), kWho,
                    ": hidden must have shape (", want[0], ", ", want[1], ", ", want[2], ", ",
                    want[3], ") (or be empty: recomputed), got ", hidden.sizes());
}

// ---------------------------------------------------------------------------------------
// The composition.

namespace {

// t * v, where an undefined v stands for ones.
at::Tensor times(const at::Tensor& t, const at::Tensor& v) { return v.defined() ? t * v : t; }
at::Tensor plus(const at::Tensor& t, const at::Tensor& v) { return v.defined() ? t + v : t; }

// What the two branches read, in the dtypes they compute in: statistics and epilogues in
// acc (float32, float64 for float64), GEMMs in gemm.
struct Prepared {
  bool channels_last;
  at::ScalarType acc, gemm, out;
  at::Tensor gamma2, beta2, res2, sample2, layer2;  // (1, C, 1, 1) / (N, 1, 1, 1), acc
  at::Tensor w1, b1, w2, b2;                        // gemm; w2 = ls2 * fc2_weight (ls2 folded)
  at::Tensor bias2;                                 // ls2 * fc2_bias, acc (1, C, 1, 1)
  at::Tensor act_scale, act_bias;                   // (1,), gemm
};

at::Tensor channel_view(const OptionalTensor& v, at::ScalarType dtype) {
  return present(v) ? v->to(dtype).view_symint({1, v->sym_size(0), 1, 1}) : at::Tensor();
}

at::Tensor sample_view(const OptionalTensor& v, at::ScalarType dtype) {
  return present(v) ? v->to(dtype).view_symint({v->sym_size(0), 1, 1, 1}) : at::Tensor();
}

Prepared prepare(const at::Tensor& x, const BlockArgs& a) {
  Prepared p;
  p.channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  p.out = x.scalar_type();
  p.acc = accumulate_type(p.out);
  p.gemm = a.gemm_dtype.value_or(p.out);
  p.gamma2 = channel_view(a.norm2_weight, p.acc);
  p.beta2 = channel_view(a.norm2_bias, p.acc);
  p.res2 = channel_view(a.res_scale2, p.acc);
  p.sample2 = sample_view(a.sample_scale2, p.acc);
  p.layer2 = channel_view(a.layer_scale2, p.acc);
  p.w1 = a.fc1_weight.to(p.gemm);
  p.b1 = present(a.fc1_bias) ? a.fc1_bias->to(p.gemm) : at::Tensor();
  const at::Tensor ls2 = present(a.layer_scale2) ? a.layer_scale2->to(p.acc) : at::Tensor();
  p.w2 = (ls2.defined() ? a.fc2_weight.to(p.acc) * ls2.unsqueeze(1) : a.fc2_weight).to(p.gemm);
  if (present(a.fc2_bias)) p.bias2 = times(a.fc2_bias->to(p.acc), ls2).view({1, -1, 1, 1});
  p.act_scale = present(a.act_scale) ? a.act_scale->to(p.gemm) : at::Tensor();
  p.act_bias = present(a.act_bias) ? a.act_bias->to(p.gemm) : at::Tensor();
  return p;
}

// out[n, m, ...] = sum_k w[m, k] t[n, k, ...]: a 1x1 convolution without bias, in t's layout.
at::Tensor channel_product(const at::Tensor& t, const at::Tensor& w, bool channels_last) {
  const auto N = t.sym_size(0), K = t.sym_size(1), H = t.sym_size(2), W = t.sym_size(3);
  const auto M = w.sym_size(0);
  if (channels_last) {
    const at::Tensor rows = t.permute({0, 2, 3, 1}).reshape_symint({-1, K});
    return at::mm(rows, w.t()).view_symint({N, H, W, M}).permute({0, 3, 1, 2});
  }
  return at::matmul(w, t.reshape_symint({N, K, H * W})).view_symint({N, M, H, W});
}

// sum over n and positions of a[n, i, ...] * b[n, j, ...]: the (I, J) weight gradient of a
// 1x1 convolution, a in its output's channels, b in its input's.
at::Tensor channel_outer(const at::Tensor& a, const at::Tensor& b, bool channels_last) {
  const auto I = a.sym_size(1), J = b.sym_size(1);
  if (channels_last) {
    return at::mm(a.permute({0, 2, 3, 1}).reshape_symint({-1, I}).t(),
                  b.permute({0, 2, 3, 1}).reshape_symint({-1, J}));
  }
  const auto N = a.sym_size(0), P = a.sym_size(2) * a.sym_size(3);
  return at::bmm(a.reshape_symint({N, I, P}), b.reshape_symint({N, J, P}).transpose(1, 2)).sum(0);
}

at::Tensor channel_sum(const at::Tensor& t) { return t.sum({0, 2, 3}); }

at::Tensor apply_activation(const at::Tensor& h, const BlockArgs& a, const Prepared& p) {
  switch (a.activation) {
    case Activation::kGelu: return at::gelu(h);
    case Activation::kGeluTanh: return at::gelu(h, "tanh");
    case Activation::kStarRelu: return plus(times(at::relu(h).square(), p.act_scale), p.act_bias);
  }
  return h;
}

// d(activation)/dh times da.
at::Tensor activation_backward(const at::Tensor& da, const at::Tensor& h, const BlockArgs& a,
                               const Prepared& p) {
  switch (a.activation) {
    case Activation::kGelu: return at::gelu_backward(da, h);
    case Activation::kGeluTanh: return at::gelu_backward(da, h, "tanh");
    case Activation::kStarRelu: return times(2 * da * at::relu(h), p.act_scale);
  }
  return da;
}

// x1's per-sample mean and rstd (N, 1) in acc: Norm2's statistics.
std::pair<at::Tensor, at::Tensor> sample_statistics(const at::Tensor& x1, double eps, at::ScalarType acc) {
  const auto [var, mean] = at::var_mean(x1.to(acc).reshape_symint({x1.sym_size(0), -1}), {1},
                                        /*correction=*/0, /*keepdim=*/true);
  return {mean, (var + eps).rsqrt()};
}

// Norm2 without its affine: (x1 - mean) * rstd, in acc.
at::Tensor normalized(const at::Tensor& x1, const at::Tensor& mean2, const at::Tensor& rstd2,
                      at::ScalarType acc) {
  const auto N = x1.sym_size(0);
  return (x1.to(acc) - mean2.view_symint({N, 1, 1, 1})) * rstd2.view_symint({N, 1, 1, 1});
}

at::Tensor fc1(const at::Tensor& xhat, const Prepared& p) {
  const at::Tensor u = plus(times(xhat, p.gamma2), p.beta2).to(p.gemm);
  const at::Tensor h = channel_product(u, p.w1, p.channels_last);
  return p.b1.defined() ? h + p.b1.view({1, -1, 1, 1}) : h;
}

// out = res2 * x1 + sample2 * (w2 . act(hidden) + bias2)  (ls2 folded into w2 and bias2).
at::Tensor mlp_output(const at::Tensor& x1, const at::Tensor& hidden, const BlockArgs& a,
                      const Prepared& p) {
  const at::Tensor act = apply_activation(hidden, a, p);
  const at::Tensor o = plus(channel_product(act, p.w2, p.channels_last).to(p.acc), p.bias2);
  return (times(x1.to(p.acc), p.res2) + times(o, p.sample2)).to(p.out);
}

BlockBackwardResult block_backward(const at::Tensor& g_in, const at::Tensor& x,
                                   const at::Tensor& x1, const at::Tensor& mean1,
                                   const at::Tensor& rstd1, const at::Tensor& mean2,
                                   const at::Tensor& rstd2, const at::Tensor& saved_hidden,
                                   const BlockArgs& a, BlockMask mask) {
  const Prepared p = prepare(x, a);
  const auto N = x.sym_size(0);
  const at::Tensor g = g_in.to(p.acc);
  const at::Tensor xhat = normalized(x1, mean2, rstd2, p.acc);
  const at::Tensor u = plus(times(xhat, p.gamma2), p.beta2).to(p.gemm);
  const at::Tensor hidden = saved_hidden.defined() && saved_hidden.numel() > 0
                                ? saved_hidden
                                : plus(channel_product(u, p.w1, p.channels_last),
                                       p.b1.defined() ? p.b1.view({1, -1, 1, 1}) : at::Tensor());
  // fc2 (w2 = ls2 * fc2_weight): its input is sample2 * act(hidden), its output's gradient g.
  const at::Tensor gs = times(g, p.sample2);  // g * sample2: the gradient of w2 . act + bias2
  const at::Tensor act = apply_activation(hidden, a, p);
  const at::Tensor ls2 = present(a.layer_scale2) ? a.layer_scale2->to(p.acc) : at::Tensor();
  BlockBackwardResult out;
  auto& [dx, dn1w, dn1b, dls1, drs1, dn2w, dn2b, dw1, db1, dw2, db2, dls2, drs2, dscale, dbias] = out;
  // A gradient in its parameter's dtype; none for an absent parameter (asked for or not).
  auto as_param = [&](const at::Tensor& value, const OptionalTensor& param) {
    return present(param) && value.defined() ? value.to(param->scalar_type()) : at::Tensor();
  };
  const bool want_w2 = mask[kGradFc2Weight] || mask[kGradLayerScale2];
  const bool want_b2 = mask[kGradFc2Bias] || mask[kGradLayerScale2];
  at::Tensor dw2_folded, db2_folded;  // gradients of w2 and bias2
  if (want_w2) dw2_folded = channel_outer(gs.to(p.gemm), act, p.channels_last).to(p.acc);
  if (want_b2 && present(a.fc2_bias)) db2_folded = channel_sum(gs);
  if (mask[kGradFc2Weight]) dw2 = as_param(times(dw2_folded, ls2.defined() ? ls2.unsqueeze(1) : at::Tensor()), a.fc2_weight);
  if (mask[kGradFc2Bias]) db2 = as_param(times(db2_folded, ls2), a.fc2_bias);
  if (mask[kGradLayerScale2]) {
    at::Tensor d = (dw2_folded * a.fc2_weight.to(p.acc)).sum(1);
    if (db2_folded.defined()) d = d + db2_folded * a.fc2_bias->to(p.acc);
    dls2 = as_param(d, a.layer_scale2);
  }
  if (mask[kGradResScale2]) drs2 = as_param(channel_sum(g * x1.to(p.acc)), a.res_scale2);
  // The activation and fc1.
  const at::Tensor da = channel_product(gs.to(p.gemm), p.w2.t(), p.channels_last);
  if (mask[kGradActScale]) dscale = as_param(at::sum(da.to(p.acc) * at::relu(hidden).to(p.acc).square()).view({1}), a.act_scale);
  if (mask[kGradActBias]) dbias = as_param(at::sum(da.to(p.acc)).view({1}), a.act_bias);
  const at::Tensor dh = activation_backward(da, hidden, a, p);
  if (mask[kGradFc1Weight]) dw1 = as_param(channel_outer(dh, u, p.channels_last).to(p.acc), a.fc1_weight);
  if (mask[kGradFc1Bias]) db1 = as_param(channel_sum(dh.to(p.acc)), a.fc1_bias);
  // Norm2: du = w1^T dh; dgamma = sum du * xhat, dbeta = sum du; then dx1.
  const at::Tensor du = channel_product(dh, p.w1.t(), p.channels_last).to(p.acc);
  if (mask[kGradNorm2Weight]) dn2w = as_param(channel_sum(du * xhat), a.norm2_weight);
  if (mask[kGradNorm2Bias]) dn2b = as_param(channel_sum(du), a.norm2_bias);
  const bool want_mixer = mask[kGradX] || mask[kGradNorm1Weight] || mask[kGradNorm1Bias] ||
                          mask[kGradLayerScale1] || mask[kGradResScale1];
  if (!want_mixer) return out;
  const at::Tensor dxhat = times(du, p.gamma2);
  auto sample_mean = [&](const at::Tensor& t) {
    return t.reshape_symint({N, -1}).mean(1).view_symint({N, 1, 1, 1});
  };
  const at::Tensor dx1 =
      times(g, p.res2) + rstd2.view_symint({N, 1, 1, 1}) *
                             (dxhat - sample_mean(dxhat) - xhat * sample_mean(dxhat * xhat));
  // The first branch: the mixer's own backward.
  const std::array<bool, 5> mixer_mask{mask[kGradX], mask[kGradNorm1Weight], mask[kGradNorm1Bias],
                                       mask[kGradLayerScale1], mask[kGradResScale1]};
  std::tie(dx, dn1w, dn1b, dls1, drs1) = backward_handle().call(
      dx1.to(p.out).contiguous(x.suggest_memory_format()), x, mean1, rstd1, a.norm1_weight,
      a.norm1_bias, a.layer_scale1, a.res_scale1, a.sample_scale1, a.num_groups1, a.pool_size,
      a.eps1, mixer_mask);
  return out;
}

}  // namespace

BlockForwardResult run_block_forward(const at::Tensor& x_in, const BlockArgs& a, bool save_hidden,
                                     at::DeviceType device_type) {
  check_block_args(x_in, a);
  check_device_type_arg(x_in, device_type, kWho);
  const c10::DeviceGuard device_guard(x_in.device());
  const at::Tensor x = x_in.contiguous(x_in.suggest_memory_format());
  auto [x1, mean1, rstd1] =
      forward_handle().call(x, a.norm1_weight, a.norm1_bias, a.layer_scale1, a.res_scale1,
                            a.sample_scale1, a.num_groups1, a.pool_size, a.eps1);
  const Prepared p = prepare(x1, a);
  auto [mean2, rstd2] = sample_statistics(x1, a.eps2, p.acc);
  const at::Tensor hidden = fc1(normalized(x1, mean2, rstd2, p.acc), p);
  at::Tensor out = mlp_output(x1, hidden, a, p).contiguous(x1.suggest_memory_format());
  return {out, save_hidden ? hidden : at::empty({0}, x.options().dtype(p.gemm)), mean1, rstd1,
          mean2, rstd2};
}

BlockBackwardResult run_block_backward(const at::Tensor& grad_out, const at::Tensor& x_in,
                                       const at::Tensor& hidden, const at::Tensor& mean1,
                                       const at::Tensor& rstd1, const at::Tensor& mean2,
                                       const at::Tensor& rstd2, const BlockArgs& a,
                                       BlockMask mask, at::DeviceType device_type) {
  check_block_backward_args(grad_out, x_in, hidden, mean1, rstd1, mean2, rstd2, a);
  check_device_type_arg(x_in, device_type, kWho);
  const c10::DeviceGuard device_guard(x_in.device());
  const auto format = x_in.suggest_memory_format();
  const at::Tensor x = x_in.contiguous(format);
  // x1 again (the forward saved x, not x1): the mixer's forward.
  const at::Tensor x1 = std::get<0>(
      forward_handle().call(x, a.norm1_weight, a.norm1_bias, a.layer_scale1, a.res_scale1,
                            a.sample_scale1, a.num_groups1, a.pool_size, a.eps1));
  return block_backward(grad_out.contiguous(format), x, x1, mean1, rstd1, mean2, rstd2, hidden, a,
                        mask);
}

BlockBackwardResult differentiable_block_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                  const BlockArgs& a, BlockMask mask) {
  // Everything from x and the parameters, through operators autograd can differentiate: the
  // mixer's forward operator, its backward operator (differentiable under grad mode) and ATen.
  auto [x1, mean1, rstd1] =
      forward_handle().call(x, a.norm1_weight, a.norm1_bias, a.layer_scale1, a.res_scale1,
                            a.sample_scale1, a.num_groups1, a.pool_size, a.eps1);
  const auto acc = accumulate_type(x.scalar_type());
  auto [mean2, rstd2] = sample_statistics(x1, a.eps2, acc);
  return block_backward(grad_out, x, x1, mean1, rstd1, mean2, rstd2, at::Tensor(), a, mask);
}

}  // namespace fused_poolformer

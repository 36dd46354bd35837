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
#include "cpu/api.h"

#include <ATen/Context.h>
#include <ATen/core/stack.h>
#include <c10/core/DeviceGuard.h>

#include <torch/library.h>

#include <cmath>
#include <vector>

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
// The composition.  Every pass over an activation is one ATen kernel that reads and writes
// what it must: Norm2 is ATen's own group-norm kernel (statistics and normalized operand in
// one call; its backward likewise), the GEMMs are 1x1 convolutions (oneDNN / cuDNN, bias
// fused, either layout), and the residual epilogue is one in-place multiply-add.  fc1 runs
// on the normalized operand u, not on raw x1 with Norm2 folded into its weight: the folded
// form loses digits where |mean| / std is large (docs/block.md, "Numerics").

namespace {

// t * v, where an undefined v stands for ones.
at::Tensor times(const at::Tensor& t, const at::Tensor& v) { return v.defined() ? t * v : t; }

// What the two branches read, in the dtypes they compute in: statistics and epilogues in
// acc (float32, float64 for float64), GEMMs in gemm.
struct Prepared {
  at::ScalarType acc, gemm, out;
  at::Tensor res2, sample2;    // (1, C, 1, 1) / (N, 1, 1, 1), acc
  at::Tensor w1, b1, w2, b2;   // 1x1 convolution weights and biases in gemm; ls2 folded into w2, b2
  at::Tensor ls2;              // (C,) acc, or undefined
  at::Tensor act_scale, act_bias;
};

at::Tensor channel_view(const OptionalTensor& v, at::ScalarType dtype) {
  return present(v) ? v->to(dtype).view_symint({1, v->sym_size(0), 1, 1}) : at::Tensor();
}

at::Tensor sample_view(const OptionalTensor& v, at::ScalarType dtype) {
  return present(v) ? v->to(dtype).view_symint({v->sym_size(0), 1, 1, 1}) : at::Tensor();
}

at::Tensor conv_weight(const at::Tensor& w) { return w.view_symint({w.sym_size(0), w.sym_size(1), 1, 1}); }

Prepared prepare(const at::Tensor& x, const BlockArgs& a) {
  Prepared p;
  p.out = x.scalar_type();
  p.acc = accumulate_type(p.out);
  p.gemm = a.gemm_dtype.value_or(p.out);
  p.res2 = channel_view(a.res_scale2, p.acc);
  p.sample2 = sample_view(a.sample_scale2, p.acc);
  p.w1 = conv_weight(a.fc1_weight.to(p.gemm));
  p.b1 = present(a.fc1_bias) ? a.fc1_bias->to(p.gemm) : at::Tensor();
  p.ls2 = present(a.layer_scale2) ? a.layer_scale2->to(p.acc) : at::Tensor();
  // Layer scale 2 folded into fc2's rows (a (C, hidden) product per call, nothing stored).
  p.w2 = conv_weight((p.ls2.defined() ? a.fc2_weight.to(p.acc) * p.ls2.unsqueeze(1) : a.fc2_weight).to(p.gemm));
  if (present(a.fc2_bias)) p.b2 = times(a.fc2_bias->to(p.acc), p.ls2).to(p.gemm);
  p.act_scale = present(a.act_scale) ? a.act_scale->to(p.gemm) : at::Tensor();
  p.act_bias = present(a.act_bias) ? a.act_bias->to(p.gemm) : at::Tensor();
  return p;
}

at::Tensor conv1x1(const at::Tensor& t, const at::Tensor& w, const at::Tensor& bias) {
  return at::conv2d(t, w, bias.defined() ? OptionalTensor(bias) : OptionalTensor());
}

// (input, weight, bias) gradients of conv1x1(input, w, bias) for the output gradient grad, as
// asked for by mask (undefined where not).
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv1x1_backward(const at::Tensor& grad,
                                                                const at::Tensor& input,
                                                                const at::Tensor& w,
                                                                const at::Tensor& bias,
                                                                std::array<bool, 3> mask) {
  mask[2] = mask[2] && bias.defined();
  const std::vector<int64_t> bias_sizes{w.size(0)};
  const std::vector<int64_t> zero{0, 0}, one{1, 1};
  return at::convolution_backward(grad, input, w, mask[2] ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt,
                                  one, zero, one, /*transposed=*/false, zero, /*groups=*/1, mask);
}

at::Tensor channel_sum(const at::Tensor& t) { return t.sum({0, 2, 3}); }

at::Tensor apply_activation(const at::Tensor& h, const BlockArgs& a, const Prepared& p) {
  switch (a.activation) {
    case Activation::kGelu: return at::gelu(h);
    case Activation::kGeluTanh: return at::gelu(h, "tanh");
    case Activation::kStarRelu: {
      at::Tensor r = at::relu(h).square();
      if (p.act_scale.defined()) r = r * p.act_scale;
      return p.act_bias.defined() ? r + p.act_bias : r;
    }
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

// Norm2's affine in the dtype ATen's group norm takes with x1: x1's own, or float32 for a
// half-precision x1 on the CPU (its mixed-type kernel: float32 statistics).  A half x1 on
// another device is normalized in float32.
struct Norm2Operand {
  at::Tensor input;
  OptionalTensor weight, bias;
};

Norm2Operand norm2_operand(const at::Tensor& x1, const BlockArgs& a, at::ScalarType acc) {
  const bool half = x1.scalar_type() != acc;
  const bool mixed = half && x1.is_cpu();
  const auto params = mixed ? acc : acc == at::kDouble ? at::kDouble : at::kFloat;
  Norm2Operand o;
  o.input = half && !mixed ? x1.to(acc) : x1;
  const auto dtype = half && !mixed ? acc : (mixed ? params : x1.scalar_type());
  // A half x1 needs a float32 weight for the mixed kernel even where Norm2 has none.
  if (present(a.norm2_weight)) o.weight = a.norm2_weight->to(dtype);
  else if (mixed) o.weight = at::ones({x1.size(1)}, x1.options().dtype(dtype));
  if (present(a.norm2_bias)) o.bias = a.norm2_bias->to(dtype);
  return o;
}

int64_t positions(const at::Tensor& t) { return t.size(2) * t.size(3); }

// u = GroupNorm(1)(x1) with Norm2's affine, and x1's (N, 1) statistics in acc.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm2(const at::Tensor& x1, const BlockArgs& a,
                                                     const Prepared& p) {
  const Norm2Operand o = norm2_operand(x1, a, p.acc);
  auto [u, mean, rstd] = at::native_group_norm(o.input, o.weight, o.bias, x1.size(0), x1.size(1),
                                               positions(x1), 1, a.eps2);
  const auto N = x1.size(0);
  return {u.to(p.gemm), mean.to(p.acc).view({N, 1}), rstd.to(p.acc).view({N, 1})};
}

// The same Norm2 through elementwise operators autograd differentiates twice (the
// double-backward path: ATen's group-norm backward has no derivative of its own).
struct DifferentiableNorm2 {
  at::Tensor xhat, u, mean, rstd;
};

DifferentiableNorm2 differentiable_norm2(const at::Tensor& x1, const BlockArgs& a, const Prepared& p) {
  const auto N = x1.size(0);
  const auto [var, mean] = at::var_mean(x1.to(p.acc).reshape({N, -1}), {1}, /*correction=*/0,
                                        /*keepdim=*/true);
  const at::Tensor rstd = (var + a.eps2).rsqrt();
  DifferentiableNorm2 d{(x1.to(p.acc) - mean.view({N, 1, 1, 1})) * rstd.view({N, 1, 1, 1}), {}, mean, rstd};
  d.u = d.xhat;
  if (present(a.norm2_weight)) d.u = d.u * channel_view(a.norm2_weight, p.acc);
  if (present(a.norm2_bias)) d.u = d.u + channel_view(a.norm2_bias, p.acc);
  d.u = d.u.to(p.gemm);
  return d;
}

// oneDNN's fused 1x1 convolutions on the CPU (the operators torch.compile's CPU backend
// uses): fc1 with the activation as a post-op, fc2 with the residual add as a binary
// post-op, so neither h nor fc2's output is a separate pass.  Found through the dispatcher;
// absent (a build without oneDNN) means the plain path.
const c10::OperatorHandle* onednn_op(const char* overload) {
  static const auto unary = c10::Dispatcher::singleton().findSchema({"mkldnn::_convolution_pointwise", ""});
  static const auto binary =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_convolution_pointwise", "binary"});
  const auto& op = std::string_view(overload) == "binary" ? binary : unary;
  return op.has_value() ? &*op : nullptr;
}

bool onednn_serves(const at::Tensor& t, at::ScalarType gemm) {
  return t.is_cpu() && (gemm == at::kFloat || gemm == at::kBFloat16) &&
         at::globalContext().userEnabledMkldnn() && onednn_op("") != nullptr &&
         onednn_op("binary") != nullptr;
}

at::Tensor call_boxed(const c10::OperatorHandle& op, torch::jit::Stack stack) {
  op.callBoxed(&stack);
  return stack.at(0).toTensor();
}

c10::IValue optional_tensor(const at::Tensor& t) { return t.defined() ? c10::IValue(t) : c10::IValue(); }

const std::vector<int64_t> kZero2{0, 0}, kOne2{1, 1};

// act(conv1x1(u, w1) + b1) in one oneDNN call (GELU, erf or tanh).
at::Tensor fc1_with_activation(const at::Tensor& u, const BlockArgs& a, const Prepared& p) {
  const char* algorithm = a.activation == Activation::kGeluTanh ? "tanh" : "none";
  return call_boxed(*onednn_op(""),
                    {u, p.w1.contiguous(u.suggest_memory_format()), optional_tensor(p.b1), kZero2,
                     kOne2, kOne2, int64_t{1}, "gelu", c10::List<std::optional<c10::Scalar>>(),
                     algorithm});
}

// conv1x1(act, w2) + b2 + x1 in one oneDNN call.
at::Tensor fc2_with_residual(const at::Tensor& act, const at::Tensor& x1, const Prepared& p) {
  return call_boxed(*onednn_op("binary"),
                    {act, x1, p.w2.contiguous(act.suggest_memory_format()), optional_tensor(p.b2),
                     kZero2, kOne2, kOne2, int64_t{1}, "add", c10::IValue(), c10::IValue(),
                     c10::List<std::optional<c10::Scalar>>(), c10::IValue()});
}

// out = res2 * x1 + sample2 * (w2 . act + b2)  (ls2 folded into w2 and b2), one GEMM and one
// multiply-add pass (two with a drop-path factor; none where oneDNN adds x1 in the GEMM).
at::Tensor mlp_output(const at::Tensor& x1, const at::Tensor& act, const Prepared& p) {
  if (!p.res2.defined() && !p.sample2.defined() && p.gemm == p.out && onednn_serves(x1, p.gemm) &&
      act.suggest_memory_format() == x1.suggest_memory_format()) {
    return fc2_with_residual(act, x1, p);
  }
  at::Tensor o = conv1x1(act, p.w2, p.b2);
  if (o.scalar_type() != p.out) o = o.to(p.out);
  if (p.sample2.defined()) o.mul_(p.sample2);
  return p.res2.defined() ? o.addcmul_(x1, p.res2) : o.add_(x1);
}

// The mixer operators of a family.  The Triton ones are registered by Python (their int
// arguments are SymInts, their mask a bool[]), so they are called boxed.
c10::OperatorHandle triton_mixer_op(const char* name) {
  const auto op = c10::Dispatcher::singleton().findSchema({name, ""});
  TORCH_CHECK(op.has_value(), kWho, ": the Triton operator ", name,
              " is not registered (import fused_poolformer.triton first)");
  return *op;
}

c10::List<bool> bool_list(const std::array<bool, 5>& mask) {
  c10::List<bool> list;
  for (bool b : mask) list.push_back(b);
  return list;
}

c10::IValue optional_arg(const OptionalTensor& t) { return present(t) ? c10::IValue(*t) : c10::IValue(); }

// The C++ mixer on the CPU with x1's per-sample statistics gathered as x1 is written
// (csrc/cpu/forward.cpp), so that Norm2 reads x1 once; nullopt elsewhere (Norm2 then
// computes them: ATen's group-norm kernel).
struct MixerWithStatistics {
  at::Tensor x1, mean1, rstd1, mean2, rstd2;
};

std::optional<MixerWithStatistics> mixer_forward_with_statistics(const at::Tensor& x,
                                                                 const BlockArgs& a,
                                                                 BlockFamily family) {
  if (family != BlockFamily::kCpp || !x.is_cpu()) return std::nullopt;
  OutputStatistics statistics{at::Tensor(), at::Tensor(), a.eps2};
  auto [x1, mean1, rstd1] =
      run_forward(x, a.norm1_weight, a.norm1_bias, a.layer_scale1, a.res_scale1, a.sample_scale1,
                  a.num_groups1, a.pool_size, a.eps1, at::kCPU, &cpu::launch_forward,
                  /*workspace=*/nullptr, &statistics);
  const auto N = x.size(0);
  return MixerWithStatistics{x1, mean1, rstd1, statistics.mean.view({N, 1}),
                             statistics.rstd.view({N, 1})};
}

// Norm2 from given statistics: u = x1 * s + t, s = rstd * gamma2, t = beta2 - mean * s, one
// pass (the form ATen's CPU group-norm kernel evaluates).
at::Tensor normalized_with(const at::Tensor& x1, const at::Tensor& mean2, const at::Tensor& rstd2,
                           const BlockArgs& a, const Prepared& p) {
  const auto N = x1.size(0), C = x1.size(1);
  at::Tensor scale = rstd2.expand({N, C});
  if (present(a.norm2_weight)) scale = scale * a.norm2_weight->to(p.acc);
  at::Tensor shift = -mean2 * scale;
  if (present(a.norm2_bias)) shift = shift + a.norm2_bias->to(p.acc);
  return at::addcmul(shift.view({N, C, 1, 1}), x1, scale.contiguous().view({N, C, 1, 1})).to(p.gemm);
}

ForwardResult mixer_forward(const at::Tensor& x, const BlockArgs& a, BlockFamily family) {
  if (family == BlockFamily::kCpp) {
    return forward_handle().call(x, a.norm1_weight, a.norm1_bias, a.layer_scale1, a.res_scale1,
                                 a.sample_scale1, a.num_groups1, a.pool_size, a.eps1);
  }
  static const c10::OperatorHandle op = triton_mixer_op("fused_poolformer::triton_pool_mixer_forward");
  torch::jit::Stack stack{x, optional_arg(a.norm1_weight), optional_arg(a.norm1_bias),
                          optional_arg(a.layer_scale1), optional_arg(a.res_scale1),
                          optional_arg(a.sample_scale1), a.num_groups1, a.pool_size, a.eps1};
  op.callBoxed(&stack);
  return {stack[0].toTensor(), stack[1].toTensor(), stack[2].toTensor()};
}

BackwardResult mixer_backward(const at::Tensor& dx1, const at::Tensor& x, const at::Tensor& mean1,
                              const at::Tensor& rstd1, const BlockArgs& a,
                              std::array<bool, 5> mask, BlockFamily family) {
  if (family == BlockFamily::kCpp) {
    return backward_handle().call(dx1, x, mean1, rstd1, a.norm1_weight, a.norm1_bias,
                                  a.layer_scale1, a.res_scale1, a.sample_scale1, a.num_groups1,
                                  a.pool_size, a.eps1, mask);
  }
  static const c10::OperatorHandle op = triton_mixer_op("fused_poolformer::triton_pool_mixer_backward");
  torch::jit::Stack stack{dx1, x, mean1, rstd1, optional_arg(a.norm1_weight),
                          optional_arg(a.norm1_bias), optional_arg(a.layer_scale1),
                          optional_arg(a.res_scale1), optional_arg(a.sample_scale1), a.num_groups1,
                          a.pool_size, a.eps1, bool_list(mask)};
  op.callBoxed(&stack);
  // A Python operator returns an empty tensor for a gradient not asked for: make it none.
  auto wanted = [&](int i) { return mask[i] ? stack[i].toTensor() : at::Tensor(); };
  return {wanted(0), wanted(1), wanted(2), wanted(3), wanted(4)};
}


// Norm2's backward by ATen's group-norm backward kernel, from x1 and the saved statistics:
// dx1 (undefined unless want_dx1) in acc, and Norm2's affine gradients where asked for.
template <typename AsParam>
at::Tensor norm2_backward(const at::Tensor& du_gemm, const at::Tensor& x, const at::Tensor& x1,
                          const at::Tensor& mean2, const at::Tensor& rstd2, const BlockArgs& a,
                          const Prepared& p, BlockMask mask, bool want_dx1, at::Tensor& dn2w,
                          at::Tensor& dn2b, const AsParam& as_param) {
  const Norm2Operand o = norm2_operand(x1, a, p.acc);
  const at::Tensor du = du_gemm.to(o.input.scalar_type());
  const auto stat_dtype = o.weight.has_value() ? o.weight->scalar_type() : o.input.scalar_type();
  auto [dx1, dgamma, dbeta] = at::native_group_norm_backward(
      du, o.input, mean2.to(stat_dtype), rstd2.to(stat_dtype), o.weight, x.size(0), x.size(1),
      positions(x), 1, {want_dx1, mask[kGradNorm2Weight], mask[kGradNorm2Bias]});
  if (mask[kGradNorm2Weight]) dn2w = as_param(dgamma, a.norm2_weight);
  if (mask[kGradNorm2Bias]) dn2b = as_param(dbeta, a.norm2_bias);
  return want_dx1 ? dx1.to(p.acc) : at::Tensor();
}

BlockBackwardResult block_backward(const at::Tensor& g_in, const at::Tensor& x,
                                   const at::Tensor& x1, const at::Tensor& mean1,
                                   const at::Tensor& rstd1, const at::Tensor& mean2,
                                   const at::Tensor& rstd2, const at::Tensor& saved_hidden,
                                   const BlockArgs& a, BlockMask mask, bool differentiable,
                                   BlockFamily family) {
  const Prepared p = prepare(x, a);
  const at::Tensor g = g_in.to(p.acc);
  // u and hidden again where not saved (u always: it is fc1's input, of x1's size).
  const DifferentiableNorm2 dnorm = differentiable ? differentiable_norm2(x1, a, p) : DifferentiableNorm2{};
  const at::Tensor u = differentiable ? dnorm.u : std::get<0>(norm2(x1, a, p));
  const at::Tensor hidden = saved_hidden.defined() && saved_hidden.numel() > 0
                                ? saved_hidden
                                : conv1x1(u, p.w1, p.b1);
  BlockBackwardResult out;
  auto& [dx, dn1w, dn1b, dls1, drs1, dn2w, dn2b, dw1, db1, dw2, db2, dls2, drs2, dscale, dbias] = out;
  // A gradient in its parameter's dtype; none for an absent parameter (asked for or not).
  auto as_param = [&](const at::Tensor& value, const OptionalTensor& param) {
    return present(param) && value.defined() ? value.to(param->scalar_type()) : at::Tensor();
  };
  // fc2 (w2 = ls2 * fc2_weight): its output's gradient is gs = sample2 * g.  Each GEMM's
  // input and weight (and bias) gradients come from one convolution_backward call, as in
  // the unfused graph.
  const at::Tensor gs = times(g, p.sample2).to(p.gemm);
  const at::Tensor act = apply_activation(hidden, a, p);
  const bool want_w2 = mask[kGradFc2Weight] || mask[kGradLayerScale2];
  const bool want_b2 = (mask[kGradFc2Bias] || mask[kGradLayerScale2]) && present(a.fc2_bias);
  auto [da, dw2_gemm, db2_gemm] = conv1x1_backward(gs, act, p.w2, p.b2, {true, want_w2, want_b2});
  const at::Tensor dw2_folded = want_w2 ? dw2_gemm.flatten(1).to(p.acc) : at::Tensor();
  const at::Tensor db2_folded = want_b2 ? db2_gemm.to(p.acc) : at::Tensor();
  if (mask[kGradFc2Weight]) dw2 = as_param(p.ls2.defined() ? dw2_folded * p.ls2.unsqueeze(1) : dw2_folded, a.fc2_weight);
  if (mask[kGradFc2Bias] && db2_folded.defined()) db2 = as_param(times(db2_folded, p.ls2), a.fc2_bias);
  if (mask[kGradLayerScale2] && present(a.layer_scale2)) {
    at::Tensor d = (dw2_folded * a.fc2_weight.to(p.acc)).sum(1);
    if (db2_folded.defined()) d = d + db2_folded * a.fc2_bias->to(p.acc);
    dls2 = as_param(d, a.layer_scale2);
  }
  if (mask[kGradResScale2]) drs2 = as_param(channel_sum(g * x1.to(p.acc)), a.res_scale2);
  // The activation and fc1.
  if (mask[kGradActScale] && present(a.act_scale)) {
    dscale = as_param(at::sum(da.to(p.acc) * at::relu(hidden).to(p.acc).square()).view({1}), a.act_scale);
  }
  if (mask[kGradActBias] && present(a.act_bias)) dbias = as_param(at::sum(da.to(p.acc)).view({1}), a.act_bias);
  const at::Tensor dh = activation_backward(da, hidden, a, p);
  const bool want_mixer = mask[kGradX] || mask[kGradNorm1Weight] || mask[kGradNorm1Bias] ||
                          mask[kGradLayerScale1] || mask[kGradResScale1];
  const bool want_norm2 = mask[kGradNorm2Weight] || mask[kGradNorm2Bias];
  const bool want_du = want_mixer || want_norm2;
  auto [du_gemm, dw1_gemm, db1_gemm] = conv1x1_backward(
      dh, u, p.w1, p.b1, {want_du, mask[kGradFc1Weight], mask[kGradFc1Bias] && present(a.fc1_bias)});
  if (mask[kGradFc1Weight]) dw1 = as_param(dw1_gemm.flatten(1), a.fc1_weight);
  if (mask[kGradFc1Bias]) db1 = as_param(db1_gemm, a.fc1_bias);
  if (!want_du) return out;
  at::Tensor dx1;
  if (differentiable) {
    const auto N = x.size(0);
    const at::Tensor du = du_gemm.to(p.acc);
    if (mask[kGradNorm2Weight]) dn2w = as_param(channel_sum(du * dnorm.xhat), a.norm2_weight);
    if (mask[kGradNorm2Bias]) dn2b = as_param(channel_sum(du), a.norm2_bias);
    if (!want_mixer) return out;
    const at::Tensor dxhat = present(a.norm2_weight) ? du * channel_view(a.norm2_weight, p.acc) : du;
    auto sample_mean = [&](const at::Tensor& t) { return t.reshape({N, -1}).mean(1).view({N, 1, 1, 1}); };
    dx1 = dnorm.rstd.view({N, 1, 1, 1}) *
          (dxhat - sample_mean(dxhat) - dnorm.xhat * sample_mean(dxhat * dnorm.xhat));
  } else {
    dx1 = norm2_backward(du_gemm, x, x1, mean2, rstd2, a, p, mask, want_mixer, dn2w, dn2b, as_param);
    if (!want_mixer) return out;
  }
  if (differentiable) {
    dx1 = p.res2.defined() ? dx1 + g * p.res2 : dx1 + g;
  } else {
    p.res2.defined() ? dx1.addcmul_(g, p.res2) : dx1.add_(g);  // dx1 is this call's own tensor
  }
  // The first branch: the mixer's own backward.
  const std::array<bool, 5> mixer_mask{mask[kGradX], mask[kGradNorm1Weight], mask[kGradNorm1Bias],
                                       mask[kGradLayerScale1], mask[kGradResScale1]};
  std::tie(dx, dn1w, dn1b, dls1, drs1) = mixer_backward(
      dx1.to(p.out).contiguous(x.suggest_memory_format()), x, mean1, rstd1, a, mixer_mask, family);
  return out;
}

}  // namespace

BlockForwardResult run_block_forward(const at::Tensor& x_in, const BlockArgs& a, bool save_hidden,
                                     at::DeviceType device_type, BlockFamily family) {
  check_block_args(x_in, a);
  check_device_type_arg(x_in, device_type, kWho);
  const c10::DeviceGuard device_guard(x_in.device());
  const auto format = x_in.suggest_memory_format();
  const at::Tensor x = x_in.contiguous(format);
  at::Tensor x1, mean1, rstd1, u, mean2, rstd2;
  if (auto mixed = mixer_forward_with_statistics(x, a, family)) {
    x1 = mixed->x1, mean1 = mixed->mean1, rstd1 = mixed->rstd1;
    mean2 = mixed->mean2, rstd2 = mixed->rstd2;
  } else {
    std::tie(x1, mean1, rstd1) = mixer_forward(x, a, family);
  }
  const Prepared p = prepare(x1, a);
  if (mean2.defined()) {
    u = normalized_with(x1, mean2, rstd2, a, p);
  } else {
    std::tie(u, mean2, rstd2) = norm2(x1, a, p);
  }
  // Without the backward's need for h, the activation rides in fc1 (oneDNN post-op).
  const bool fused_fc1 = !save_hidden && a.activation != Activation::kStarRelu && onednn_serves(u, p.gemm);
  const at::Tensor hidden = fused_fc1 ? at::Tensor() : conv1x1(u, p.w1, p.b1);
  const at::Tensor act = fused_fc1 ? fc1_with_activation(u, a, p) : apply_activation(hidden, a, p);
  at::Tensor out = mlp_output(x1, act, p).contiguous(format);
  return {out, save_hidden ? hidden.contiguous(format) : at::empty({0}, x.options().dtype(p.gemm)),
          mean1, rstd1, mean2, rstd2};
}

BlockBackwardResult run_block_backward(const at::Tensor& grad_out, const at::Tensor& x_in,
                                       const at::Tensor& hidden, const at::Tensor& mean1,
                                       const at::Tensor& rstd1, const at::Tensor& mean2,
                                       const at::Tensor& rstd2, const BlockArgs& a,
                                       BlockMask mask, at::DeviceType device_type,
                                       BlockFamily family) {
  check_block_backward_args(grad_out, x_in, hidden, mean1, rstd1, mean2, rstd2, a);
  check_device_type_arg(x_in, device_type, kWho);
  const c10::DeviceGuard device_guard(x_in.device());
  const auto format = x_in.suggest_memory_format();
  const at::Tensor x = x_in.contiguous(format);
  // x1 again (the forward saved x, not x1): the mixer's forward.
  const at::Tensor x1 = std::get<0>(mixer_forward(x, a, family));
  return block_backward(grad_out.contiguous(format), x, x1, mean1, rstd1, mean2, rstd2, hidden, a,
                        mask, /*differentiable=*/false, family);
}

BlockBackwardResult differentiable_block_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                  const BlockArgs& a, BlockMask mask) {
  // Everything from x and the parameters, through operators autograd can differentiate: the
  // mixer's forward operator, its backward operator (differentiable under grad mode) and ATen.
  auto [x1, mean1, rstd1] = mixer_forward(x, a, BlockFamily::kCpp);
  return block_backward(grad_out, x, x1, mean1, rstd1, at::Tensor(), at::Tensor(), at::Tensor(), a,
                        mask, /*differentiable=*/true, BlockFamily::kCpp);
}

// The Triton family: the same composition over the Triton mixer, for the tensors Triton
// serves (CUDA, and CPU under its interpreter).
namespace {

BlockForwardResult triton_block_forward(const at::Tensor& x, FPM_BLOCK_PARAMETERS, bool save_hidden) {
  return run_block_forward(x, block_args(FPM_BLOCK_ARGUMENTS), save_hidden, x.device().type(),
                           BlockFamily::kTriton);
}

BlockBackwardResult triton_block_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                          const at::Tensor& hidden, const at::Tensor& mean1,
                                          const at::Tensor& rstd1, const at::Tensor& mean2,
                                          const at::Tensor& rstd2, FPM_BLOCK_PARAMETERS,
                                          BlockMask output_mask) {
  return run_block_backward(grad_out, x, hidden, mean1, rstd1, mean2, rstd2,
                            block_args(FPM_BLOCK_ARGUMENTS), output_mask, x.device().type(),
                            BlockFamily::kTriton);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_poolformer, CPU, m) {
  m.impl("triton_block_forward", &triton_block_forward);
  m.impl("triton_block_backward", &triton_block_backward);
}

TORCH_LIBRARY_IMPL(fused_poolformer, CUDA, m) {
  m.impl("triton_block_forward", &triton_block_forward);
  m.impl("triton_block_backward", &triton_block_backward);
}

}  // namespace fused_poolformer

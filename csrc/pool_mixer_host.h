// Host-side helpers shared by the CPU and CUDA operator implementations: argument
// validation (one place, every message names the argument), memory-format choice, and
// the small per-channel vectors the kernels read.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <array>
#include <optional>
#include <tuple>
#include <string>

namespace fused_poolformer {

enum class Layout { kContiguous, kChannelsLast };

// The kernels read x in one of two dense layouts.  A tensor that is dense in both (C == 1
// or H == W == 1) is treated as NCHW; one that is dense in neither is copied once.
inline Layout choose_layout(const at::Tensor& x) {
  if (x.is_contiguous()) return Layout::kContiguous;
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) return Layout::kChannelsLast;
  return Layout::kContiguous;
}

inline at::MemoryFormat memory_format(Layout layout) {
  return layout == Layout::kChannelsLast ? at::MemoryFormat::ChannelsLast
                                         : at::MemoryFormat::Contiguous;
}

inline at::Tensor in_layout(const at::Tensor& t, Layout layout) {
  return t.contiguous(memory_format(layout));
}

// Statistics and the small vectors are kept in float32, or float64 for float64 inputs.
inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_x(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.defined(), "pool_mixer: ", name, " must be a tensor");
  TORCH_CHECK(x.dim() == 4, "pool_mixer: ", name, " must be 4-D (N, C, H, W), got ", x.dim(),
              "-D with shape ", x.sizes());
  TORCH_CHECK(is_supported_float(x.scalar_type()), "pool_mixer: ", name,
              " must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
}

// A per-channel (or per-sample) vector: right length, x's device, and x's dtype or
// float32 (mixed-precision parameters of a half-precision activation).
inline void check_vector(const std::optional<at::Tensor>& v, const char* name, int64_t length,
                         const char* length_name, const at::Tensor& x) {
  if (!v.has_value() || !v->defined()) return;
  TORCH_CHECK(v->dim() == 1 && v->size(0) == length, "pool_mixer: ", name, " must have shape (",
              length_name, ",) = (", length, ",), got ", v->sizes());
  TORCH_CHECK(v->device() == x.device(), "pool_mixer: ", name, " is on ", v->device(),
              " but x is on ", x.device());
  const auto t = v->scalar_type();
  TORCH_CHECK(t == x.scalar_type() || (t == at::kFloat && x.scalar_type() != at::kDouble),
              "pool_mixer: ", name, " has dtype ", t, " but x has dtype ", x.scalar_type(),
              " (parameters must match x, or be float32 for a half-precision x)");
}

inline void check_options(const at::Tensor& x, int64_t num_groups, int64_t pool_size) {
  const int64_t C = x.size(1);
  TORCH_CHECK(num_groups >= 1, "pool_mixer: num_groups must be >= 1, got ", num_groups);
  TORCH_CHECK(C % num_groups == 0, "pool_mixer: num_groups (", num_groups,
              ") must divide the number of channels C (", C, ")");
  TORCH_CHECK(pool_size >= 1 && pool_size % 2 == 1,
              "pool_mixer: pool_size must be a positive odd integer, got ", pool_size);
}

inline void check_forward_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& layer_scale,
                               const std::optional<at::Tensor>& res_scale,
                               const std::optional<at::Tensor>& sample_scale,
                               int64_t num_groups, int64_t pool_size, double eps) {
  check_x(x, "x");
  const int64_t N = x.size(0), C = x.size(1);
  check_vector(weight, "weight", C, "C", x);
  check_vector(bias, "bias", C, "C", x);
  check_vector(layer_scale, "layer_scale", C, "C", x);
  check_vector(res_scale, "res_scale", C, "C", x);
  check_vector(sample_scale, "sample_scale", N, "N", x);
  check_options(x, num_groups, pool_size);
  TORCH_CHECK(eps > 0.0 && std::isfinite(eps), "pool_mixer: eps must be a finite number > 0, got ",
              eps);
}

inline void check_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                const at::Tensor& mean, const at::Tensor& rstd,
                                const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& layer_scale,
                                const std::optional<at::Tensor>& res_scale,
                                const std::optional<at::Tensor>& sample_scale,
                                int64_t num_groups, int64_t pool_size) {
  check_x(x, "x");
  check_x(grad_y, "grad_y");
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "pool_mixer: grad_y has shape ", grad_y.sizes(),
              " but x has shape ", x.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
              "pool_mixer: grad_y must have x's dtype and device");
  const int64_t N = x.size(0), C = x.size(1);
  check_options(x, num_groups, pool_size);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{mean, "mean"},
                                std::pair<const at::Tensor&, const char*>{rstd, "rstd"}}) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == num_groups, "pool_mixer: ", name,
                " must have shape (N, num_groups) = (", N, ", ", num_groups, "), got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == accumulate_type(x.scalar_type()) && t.device() == x.device(),
                "pool_mixer: ", name, " must be ", accumulate_type(x.scalar_type()), " on ",
                x.device());
  }
  check_vector(weight, "weight", C, "C", x);
  check_vector(layer_scale, "layer_scale", C, "C", x);
  check_vector(res_scale, "res_scale", C, "C", x);
  check_vector(sample_scale, "sample_scale", N, "N", x);
}

// The vector as a contiguous tensor of the accumulation dtype, ones where it is absent.
inline at::Tensor vector_or_ones(const std::optional<at::Tensor>& v, int64_t length,
                                 const at::Tensor& x) {
  const auto opts = x.options().dtype(accumulate_type(x.scalar_type()));
  if (!v.has_value() || !v->defined()) return at::ones({length}, opts);
  return v->to(opts).contiguous();
}

// a[n, c] = layer_scale[c] * weight[c] * sample_scale[n]: the per-(n, c) factor of the
// mixer term (DESIGN.md section 2), shape (N, C) in the accumulation dtype.
inline at::Tensor mixer_coefficients(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& layer_scale,
                                     const std::optional<at::Tensor>& sample_scale) {
  const int64_t N = x.size(0), C = x.size(1);
  const auto w = vector_or_ones(weight, C, x) * vector_or_ones(layer_scale, C, x);
  return (vector_or_ones(sample_scale, N, x).unsqueeze(1) * w.unsqueeze(0)).contiguous();
}

// A gradient the caller did not ask for comes back as an empty tensor (the schema has
// no optional outputs).
inline at::Tensor empty_gradient(const at::Tensor& x) { return at::empty({0}, x.options()); }

inline at::ScalarType vector_dtype(const std::optional<at::Tensor>& v, const at::Tensor& x) {
  return v.has_value() && v->defined() ? v->scalar_type() : x.scalar_type();
}

// The backward's outputs from the per-channel sums T[c] = sum_n rstd * sample_scale *
// sum(D * dy) and sum(x * dy) (DESIGN.md section 2): dweight = layer_scale * T,
// dlayer_scale = weight * T, dres_scale = sum(x * dy), each in its parameter's dtype.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> parameter_gradients(
    const at::Tensor& dx, const at::Tensor& x, const at::Tensor& channel_t,
    const at::Tensor& channel_xdy, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& layer_scale, const std::optional<at::Tensor>& res_scale,
    std::array<bool, 4> output_mask) {
  const int64_t C = x.size(1);
  auto grad = [&](bool wanted, const at::Tensor& value, const std::optional<at::Tensor>& param) {
    return wanted ? value.to(vector_dtype(param, x)) : empty_gradient(x);
  };
  return {dx,
          grad(output_mask[1], vector_or_ones(layer_scale, C, x) * channel_t, weight),
          grad(output_mask[2], vector_or_ones(weight, C, x) * channel_t, layer_scale),
          grad(output_mask[3], channel_xdy, res_scale)};
}

}  // namespace fused_poolformer

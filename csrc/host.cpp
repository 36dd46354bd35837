// The host prologue of the CPU and CUDA operators (see host.h).  Per call it issues only
// the output allocations (and, for a non-dense input, one copy): no coefficient tables, no
// dtype casts of the parameters, no reductions -- the kernels do all of that.
#include "host.h"

#include <c10/core/DeviceGuard.h>

#include <cmath>
#include <string>

namespace fused_poolformer {

// Dtypes by their Python names, so that messages read the same as the fake kernels' ones.
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_activation_arg(const at::Tensor& t, const char* name, const char* who) {
  TORCH_CHECK_VALUE(t.defined(), who, ": ", name, " must be a tensor");
  TORCH_CHECK_VALUE(t.dim() == 4, who, ": ", name, " must be 4-D (N, C, H, W), got ",
                    t.dim(), "-D with shape ", t.sizes());
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), who, ": ", name,
                   " must be float32, float64, float16 or bfloat16, got ", dtype_name(t.scalar_type()));
}

void check_parameter_dtype(const at::Tensor& v, const char* name, const at::Tensor& x,
                           const char* who) {
  const auto t = v.scalar_type();
  TORCH_CHECK_TYPE(t == x.scalar_type() || (t == at::kFloat && x.scalar_type() != at::kDouble),
                   who, ": ", name, " has dtype ", dtype_name(t), " but x has dtype ",
                   dtype_name(x.scalar_type()),
                   " (parameters must match x, or be float32 for a half-precision x)");
}

// A per-channel (or per-sample) vector: right length, x's device, and x's dtype or
// float32 (mixed-precision parameters of a half-precision activation).
void check_vector_arg(const OptionalTensor& v, const char* name, int64_t length,
                      const char* length_name, const at::Tensor& x, const char* who) {
  if (!v.has_value() || !v->defined()) return;
  TORCH_CHECK_VALUE(v->dim() == 1 && v->size(0) == length, who, ": ", name,
                    " must have shape (", length_name, ",) = (", length, ",), got ", v->sizes());
  TORCH_CHECK_VALUE(v->device() == x.device(), who, ": ", name, " is on ", v->device(),
                    " but x is on ", x.device());
  check_parameter_dtype(*v, name, x, who);
}

void check_group_options(const at::Tensor& x, int64_t num_groups, int64_t pool_size, double eps,
                         const char* who, const char* groups_name, const char* eps_name) {
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(num_groups >= 1, who, ": ", groups_name, " must be an integer >= 1, got ",
                    num_groups);
  TORCH_CHECK_VALUE(C % num_groups == 0, who, ": ", groups_name, " (", num_groups,
                    ") must divide the number of channels C (", C, ")");
  TORCH_CHECK_VALUE(valid_pool_size(pool_size), who, ": ", kPoolSizeRule, ", got ", pool_size);
  TORCH_CHECK_VALUE(eps > 0.0 && std::isfinite(eps), who, ": ", eps_name,
                    " must be a finite number > 0, got ", eps);
}

void check_statistics_arg(const at::Tensor& t, const char* name, const at::Tensor& x,
                          int64_t num_groups, const char* who, const char* shape_text) {
  const int64_t N = x.size(0);
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == N && t.size(1) == num_groups, who, ": ",
                    name, " must have shape ", shape_text, " = (", N, ", ", num_groups, "), got ",
                    t.sizes());
  const auto want = dtype_name(accumulate_type(x.scalar_type()));
  const auto got = dtype_name(t.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == accumulate_type(x.scalar_type()), who, ": ", name,
                   " must be ", want, " on ", x.device(), ", got ", got, " on ", t.device());
  TORCH_CHECK_VALUE(t.device() == x.device(), who, ": ", name, " must be ", want, " on ",
                    x.device(), ", got ", got, " on ", t.device());
}

void check_device_type_arg(const at::Tensor& x, at::DeviceType device_type, const char* who) {
  // The dispatcher only sends tensors of this device type here; a mix of devices among the
  // arguments is caught by check_vector_arg with the argument's name.
  TORCH_CHECK_VALUE(x.device().type() == device_type, who, ": x is on ", x.device(),
                    " but this kernel runs on ", device_type);
}

namespace {

constexpr const char* kWho = "pool_mixer";

void check_activation(const at::Tensor& t, const char* name) { check_activation_arg(t, name, kWho); }

void check_vectors(const at::Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias,
                   const OptionalTensor& layer_scale, const OptionalTensor& res_scale,
                   const OptionalTensor& sample_scale) {
  const int64_t N = x.size(0), C = x.size(1);
  check_vector_arg(weight, "weight", C, "C", x, kWho);
  check_vector_arg(bias, "bias", C, "C", x, kWho);
  check_vector_arg(layer_scale, "layer_scale", C, "C", x, kWho);
  check_vector_arg(res_scale, "res_scale", C, "C", x, kWho);
  check_vector_arg(sample_scale, "sample_scale", N, "N", x, kWho);
}

void check_options(const at::Tensor& x, int64_t num_groups, int64_t pool_size, double eps) {
  check_group_options(x, num_groups, pool_size, eps, kWho, "num_groups", "eps");
}

void check_statistics(const at::Tensor& t, const char* name, const at::Tensor& x,
                      int64_t num_groups) {
  check_statistics_arg(t, name, x, num_groups, kWho, "(N, num_groups)");
}

void check_device_type(const at::Tensor& x, at::DeviceType device_type) {
  check_device_type_arg(x, device_type, kWho);
}

// The kernels read x in one of two dense layouts.  A tensor that is dense in both (C == 1 or
// H == W == 1) is treated as NCHW; one that is dense in neither is copied once.
bool use_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::MemoryFormat memory_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

VectorArg vector_arg(const OptionalTensor& v) {
  VectorArg arg;
  if (v.has_value() && v->defined()) {
    arg.data = v->const_data_ptr();
    arg.stride = v->stride(0);
    arg.is_float = v->scalar_type() == at::kFloat;
  }
  return arg;
}

MixerParams mixer_params(const OptionalTensor& weight, const OptionalTensor& layer_scale,
                         const OptionalTensor& res_scale, const OptionalTensor& sample_scale) {
  return {vector_arg(weight), vector_arg(layer_scale), vector_arg(res_scale),
          vector_arg(sample_scale)};
}

MixerShape mixer_shape(const at::Tensor& x, int64_t num_groups, int64_t pool_size,
                       bool channels_last) {
  MixerShape s;
  s.N = x.size(0), s.C = x.size(1), s.H = x.size(2), s.W = x.size(3);
  s.G = num_groups, s.Cg = s.C / num_groups;
  s.radius = pool_radius(pool_size);
  s.channels_last = channels_last;
  return s;
}

// A requested (C,) gradient, in its parameter's dtype (x's when the parameter is absent).
at::Tensor gradient_output(bool wanted, const OptionalTensor& param, const at::Tensor& x) {
  if (!wanted) return at::Tensor();
  const bool present = param.has_value() && param->defined();
  return at::empty({x.size(1)}, x.options().dtype(present ? param->scalar_type() : x.scalar_type()));
}

// An empty tensor shaped and laid out like x whose allocation continues, 256-byte aligned,
// with `tail_bytes` more bytes (at *tail): a call's workspace rides on its output.  The
// tensor is an ordinary one -- storage offset 0, dense strides -- over a longer storage.
at::Tensor empty_with_tail(const at::Tensor& x, at::MemoryFormat format, size_t tail_bytes,
                           void** tail) {
  constexpr size_t kAlign = 256;
  const size_t item = x.element_size();
  const size_t body = (static_cast<size_t>(x.numel()) * item + kAlign - 1) / kAlign * kAlign;
  const auto items = static_cast<int64_t>((body + tail_bytes + item - 1) / item);
  const at::Tensor flat = at::empty({items}, x.options());
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(flat.storage()), flat.key_set(),
                                                   flat.dtype());
  impl->set_sizes_contiguous(x.sizes());
  impl->empty_tensor_restride(format);
  *tail = static_cast<char*>(flat.storage().mutable_data()) + body;
  return at::Tensor(std::move(impl));
}

// A call's main output (y, grad_x) and the launcher's workspace in its allocation.
struct OutputWithWorkspace {
  at::Tensor tensor;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

OutputWithWorkspace empty_output(const at::Tensor& x, at::MemoryFormat format,
                                 const MixerShape& shape, WorkspaceQuery query) {
  OutputWithWorkspace out;
  out.workspace_bytes = query != nullptr && x.numel() > 0 ? query(shape, x) : 0;
  out.tensor = out.workspace_bytes > 0
                   ? empty_with_tail(x, format, out.workspace_bytes, &out.workspace)
                   : at::empty(x.sizes(), x.options(), format);
  return out;
}

GradArg grad_arg(const at::Tensor& g) {
  GradArg arg;
  if (g.defined()) {
    arg.data = g.mutable_data_ptr();
    arg.is_float = g.scalar_type() == at::kFloat;
  }
  return arg;
}

}  // namespace

void check_forward_args(const at::Tensor& x, const OptionalTensor& weight,
                        const OptionalTensor& bias, const OptionalTensor& layer_scale,
                        const OptionalTensor& res_scale, const OptionalTensor& sample_scale,
                        int64_t num_groups, int64_t pool_size, double eps) {
  check_activation(x, "x");
  check_vectors(x, weight, bias, layer_scale, res_scale, sample_scale);
  check_options(x, num_groups, pool_size, eps);
}

void check_backward_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                         const at::Tensor& rstd, const OptionalTensor& weight,
                         const OptionalTensor& bias, const OptionalTensor& layer_scale,
                         const OptionalTensor& res_scale, const OptionalTensor& sample_scale,
                         int64_t num_groups, int64_t pool_size, double eps) {
  check_activation(x, "x");
  check_activation(grad_y, "grad_y");
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), "pool_mixer: grad_y has shape ", grad_y.sizes(),
                    " but x has shape ", x.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(),
                   "pool_mixer: grad_y must have x's dtype and device, got ",
                   dtype_name(grad_y.scalar_type()), " for ", dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(grad_y.device() == x.device(),
                    "pool_mixer: grad_y must have x's dtype and device, got ", grad_y.device(),
                    " for ", x.device());
  check_options(x, num_groups, pool_size, eps);
  check_statistics(mean, "mean", x, num_groups);
  check_statistics(rstd, "rstd", x, num_groups);
  check_vectors(x, weight, bias, layer_scale, res_scale, sample_scale);
}

ForwardResult run_forward(const at::Tensor& x_in, const OptionalTensor& weight,
                          const OptionalTensor& bias, const OptionalTensor& layer_scale,
                          const OptionalTensor& res_scale, const OptionalTensor& sample_scale,
                          int64_t num_groups, int64_t pool_size, double eps,
                          at::DeviceType device_type, ForwardLauncher launch,
                          WorkspaceQuery workspace, OutputStatistics* output_statistics) {
  check_forward_args(x_in, weight, bias, layer_scale, res_scale, sample_scale, num_groups,
                     pool_size, eps);
  check_device_type(x_in, device_type);
  const c10::DeviceGuard device_guard(x_in.device());
  const bool channels_last = use_channels_last(x_in);
  const at::Tensor x = x_in.contiguous(memory_format(channels_last));
  const MixerShape shape = mixer_shape(x, num_groups, pool_size, channels_last);
  auto [y, workspace_ptr, workspace_bytes] =
      empty_output(x, memory_format(channels_last), shape, workspace);
  const auto stat_options = x.options().dtype(accumulate_type(x.scalar_type()));
  at::Tensor mean = at::empty({x.size(0), num_groups}, stat_options);
  at::Tensor rstd = at::empty({x.size(0), num_groups}, stat_options);
  if (output_statistics != nullptr) {
    output_statistics->mean = at::empty({x.size(0)}, stat_options);
    output_statistics->rstd = at::empty({x.size(0)}, stat_options);
  }
  if (x.numel() == 0) {
    // Groups without elements (C == 0 or H * W == 0): mean 0 and rstd = 1 / sqrt(eps).
    if (mean.numel() > 0) {
      mean.zero_();
      rstd.fill_(1.0 / std::sqrt(eps));
    }
    if (output_statistics != nullptr && x.size(0) > 0) {
      output_statistics->mean.zero_();
      output_statistics->rstd.fill_(1.0 / std::sqrt(output_statistics->eps));
    }
    return {y, mean, rstd};
  }
  ForwardProblem problem{shape,
                         mixer_params(weight, layer_scale, res_scale, sample_scale),
                         x, y, mean, rstd, eps, workspace_ptr, workspace_bytes};
  if (output_statistics != nullptr) {
    problem.y_mean = &output_statistics->mean;
    problem.y_rstd = &output_statistics->rstd;
    problem.y_eps = output_statistics->eps;
  }
  launch(problem);
  return {y, mean, rstd};
}

BackwardResult run_backward(const at::Tensor& grad_y_in, const at::Tensor& x_in,
                            const at::Tensor& mean_in, const at::Tensor& rstd_in,
                            const OptionalTensor& weight, const OptionalTensor& bias,
                            const OptionalTensor& layer_scale, const OptionalTensor& res_scale,
                            const OptionalTensor& sample_scale, int64_t num_groups,
                            int64_t pool_size, double eps, std::array<bool, 5> output_mask,
                            at::DeviceType device_type, BackwardLauncher launch,
                            WorkspaceQuery workspace) {
  check_backward_args(grad_y_in, x_in, mean_in, rstd_in, weight, bias, layer_scale, res_scale,
                      sample_scale, num_groups, pool_size, eps);
  check_device_type(x_in, device_type);
  const c10::DeviceGuard device_guard(x_in.device());
  const bool channels_last = use_channels_last(x_in);
  const auto format = memory_format(channels_last);
  const at::Tensor x = x_in.contiguous(format);
  const at::Tensor grad_y = grad_y_in.contiguous(format);
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const MixerShape shape = mixer_shape(x, num_groups, pool_size, channels_last);
  // The launcher's workspace goes into grad_x's allocation; without grad_x the launcher
  // allocates its own.
  auto [grad_x, workspace_ptr, workspace_bytes] =
      output_mask[0] ? empty_output(x, format, shape, workspace) : OutputWithWorkspace{};
  at::Tensor grad_weight = gradient_output(output_mask[1], weight, x);
  at::Tensor grad_bias = gradient_output(output_mask[2], bias, x);
  at::Tensor grad_layer_scale = gradient_output(output_mask[3], layer_scale, x);
  at::Tensor grad_res_scale = gradient_output(output_mask[4], res_scale, x);
  if (x.numel() == 0) {
    // Nothing to sum: every parameter gradient is zero.
    for (at::Tensor* g : {&grad_weight, &grad_bias, &grad_layer_scale, &grad_res_scale}) {
      if (g->defined()) g->zero_();
    }
    return {grad_x, grad_weight, grad_bias, grad_layer_scale, grad_res_scale};
  }
  const BackwardProblem problem{
      shape,
      mixer_params(weight, layer_scale, res_scale, sample_scale),
      grad_y, x, mean, rstd, grad_x,
      ParamGrads{grad_arg(grad_weight), grad_arg(grad_bias), grad_arg(grad_layer_scale),
                 grad_arg(grad_res_scale)},
      workspace_ptr, workspace_bytes};
  launch(problem);
  return {grad_x, grad_weight, grad_bias, grad_layer_scale, grad_res_scale};
}

}  // namespace fused_poolformer

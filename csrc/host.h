// The host prologue shared by the CPU and CUDA operators: argument checks (each message
// names the argument; ValueError / TypeError in Python), the memory layout, the outputs and
// the empty-input case, then one call of the device's kernel launcher with raw pointers.
// The launchers (csrc/cpu, csrc/cuda) allocate nothing but their own workspace and issue
// no ATen arithmetic: every per-channel factor is formed inside the kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "pool_mixer.h"

namespace fused_poolformer {

using OptionalTensor = std::optional<at::Tensor>;

// Statistics are kept in float32, or float64 for a float64 x.
inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// What a forward launcher gets.  x is dense in the layout shape.channels_last names; y has
// the same layout; mean and rstd are contiguous (N, G) in accumulate_type(x).
struct ForwardProblem {
  MixerShape shape;
  MixerParams params;
  const at::Tensor& x;
  at::Tensor& y;
  at::Tensor& mean;
  at::Tensor& rstd;
  double eps;
  // The launcher's scratch memory when it asked for some (WorkspaceQuery): workspace_bytes
  // bytes after y's elements, in y's allocation.
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  // Where set: y's own per-sample statistics over C*H*W, (N,) in accumulate_type(x), with
  // this eps in the rstd -- what a GroupNorm(1) of y (the block's Norm2) needs, gathered as
  // y is written (the CPU launcher; csrc/cpu/forward.cpp).
  at::Tensor* y_mean = nullptr;
  at::Tensor* y_rstd = nullptr;
  double y_eps = 0.0;
};

// Per-sample statistics of the output, asked of run_forward (ForwardProblem::y_mean).
struct OutputStatistics {
  at::Tensor mean, rstd;  // (N,), accumulate_type(x)
  double eps;
};

// What a backward launcher gets.  grad_y and x are dense in the same layout, grad_x (when
// defined) too; mean and rstd are contiguous.  Every requested output must be written.
struct BackwardProblem {
  MixerShape shape;
  MixerParams params;
  const at::Tensor& grad_y;
  const at::Tensor& x;
  const at::Tensor& mean;
  const at::Tensor& rstd;
  at::Tensor& grad_x;  // undefined when not requested
  ParamGrads grads;
  // The launcher's scratch memory when it asked for some (WorkspaceQuery) and grad_x is
  // requested: workspace_bytes bytes after grad_x's elements, in grad_x's allocation.
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

using ForwardLauncher = void (*)(const ForwardProblem&);
using BackwardLauncher = void (*)(const BackwardProblem&);
// The bytes of scratch memory a launcher will need for this problem (the CUDA ones; the CPU
// kernels need none): run_forward / run_backward then allocate them with y / grad_x, so that
// a call makes one allocation fewer.
using WorkspaceQuery = size_t (*)(const MixerShape&, const at::Tensor& x);

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The operators' signatures and typed dispatcher handles (csrc/autograd.cpp), for the
// C++ callers that go through the dispatcher: the autograd kernels and the Python module.
using ForwardSignature = ForwardResult(const at::Tensor&, const OptionalTensor&,
                                       const OptionalTensor&, const OptionalTensor&,
                                       const OptionalTensor&, const OptionalTensor&, int64_t,
                                       int64_t, double);
using BackwardSignature = BackwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const OptionalTensor&,
                                         const OptionalTensor&, const OptionalTensor&,
                                         const OptionalTensor&, const OptionalTensor&, int64_t,
                                         int64_t, double, std::array<bool, 5>);
const c10::TypedOperatorHandle<ForwardSignature>& forward_handle();
const c10::TypedOperatorHandle<BackwardSignature>& backward_handle();

// The operators' bodies for one device type: check, lay out, allocate, launch.
ForwardResult run_forward(const at::Tensor& x, const OptionalTensor& weight,
                          const OptionalTensor& bias, const OptionalTensor& layer_scale,
                          const OptionalTensor& res_scale, const OptionalTensor& sample_scale,
                          int64_t num_groups, int64_t pool_size, double eps,
                          at::DeviceType device_type, ForwardLauncher launch,
                          WorkspaceQuery workspace = nullptr,
                          OutputStatistics* output_statistics = nullptr);

BackwardResult run_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                            const at::Tensor& rstd, const OptionalTensor& weight,
                            const OptionalTensor& bias, const OptionalTensor& layer_scale,
                            const OptionalTensor& res_scale, const OptionalTensor& sample_scale,
                            int64_t num_groups, int64_t pool_size, double eps,
                            std::array<bool, 5> output_mask, at::DeviceType device_type,
                            BackwardLauncher launch, WorkspaceQuery workspace = nullptr);

// Argument checks by piece, for every operator of the package: `who` is the operator's
// public name and starts each message, `name` the argument's.
std::string dtype_name(at::ScalarType t);
bool is_supported_float(at::ScalarType t);
void check_activation_arg(const at::Tensor& t, const char* name, const char* who);
void check_parameter_dtype(const at::Tensor& v, const char* name, const at::Tensor& x,
                           const char* who);
void check_vector_arg(const OptionalTensor& v, const char* name, int64_t length,
                      const char* length_name, const at::Tensor& x, const char* who);
void check_group_options(const at::Tensor& x, int64_t num_groups, int64_t pool_size, double eps,
                         const char* who, const char* groups_name, const char* eps_name);
void check_statistics_arg(const at::Tensor& t, const char* name, const at::Tensor& x,
                          int64_t num_groups, const char* who, const char* shape_text);
void check_device_type_arg(const at::Tensor& x, at::DeviceType device_type, const char* who);

// Argument checks, shared by the operators and the differentiable (double-backward) path.
void check_forward_args(const at::Tensor& x, const OptionalTensor& weight,
                        const OptionalTensor& bias, const OptionalTensor& layer_scale,
                        const OptionalTensor& res_scale, const OptionalTensor& sample_scale,
                        int64_t num_groups, int64_t pool_size, double eps);

void check_backward_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                         const at::Tensor& rstd, const OptionalTensor& weight,
                         const OptionalTensor& bias, const OptionalTensor& layer_scale,
                         const OptionalTensor& res_scale, const OptionalTensor& sample_scale,
                         int64_t num_groups, int64_t pool_size, double eps);

}  // namespace fused_poolformer

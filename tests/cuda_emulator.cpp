// The CUDA kernels (csrc/cuda/kernels.cuh) compiled for the CPU emulator of simt.h, with
// the launch sequences of the real operators (csrc/cuda/launch.h), behind a C interface
// for ctypes (tests/test_cuda_emulated.py).  Test-only: built by the test, never shipped.
//
// Every tensor of the call is registered with the emulator, so each global access the
// kernels make is checked (bounds, alignment of vector accesses, writes to inputs); the
// workspace starts filled with NaN bytes, like shared memory.
//
// FPM_EMU_DTYPE (0..3) selects the one dtype this translation unit instantiates, so the
// test can compile the four in parallel; the library links them together.
#define FPM_SIMT_EMULATE 1

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <exception>
#include <vector>

#include "cuda/launch.h"

namespace fpm = fused_poolformer;
namespace ck = fused_poolformer::cuda_kernels;
namespace emu = fused_poolformer::simt::emu;

extern "C" {

// Mirrored field by field by tests/test_cuda_emulated.py (all 8-byte fields).
struct FpmEmuCall {
  int64_t dtype;  // 0 float32, 1 float64, 2 float16, 3 bfloat16
  int64_t N, C, H, W, G, pool_size, channels_last;
  double eps;
  void* x;
  void* y;       // forward output
  void* mean;
  void* rstd;
  void* grad_y;  // backward
  void* grad_x;  // backward output, or null
  void* param_data[4];  // weight, layer_scale, res_scale, sample_scale (null: absent)
  int64_t param_stride[4];
  int64_t param_is_float[4];
  int64_t param_bytes[4];
  void* grad_data[4];  // weight, bias, layer_scale, res_scale gradients (null: not requested)
  int64_t grad_is_float[4];
  int64_t grad_bytes[4];
  int64_t multiprocessors;
  int64_t shared_bytes_optin;
  int64_t schedule;
  int64_t seed;
  int64_t launches;      // out: kernel launches of the call
  int64_t allocations;   // out: workspaces the call allocated
  int64_t workspace_bytes;  // out
  int64_t wide_loads, narrow_loads, wide_stores, narrow_stores;  // out: global accesses
};
}

namespace {

fpm::MixerShape shape_of(const FpmEmuCall& c) {
  fpm::MixerShape s;
  s.N = c.N, s.C = c.C, s.H = c.H, s.W = c.W, s.G = c.G, s.Cg = c.C / c.G;
  s.radius = fpm::pool_radius(c.pool_size);
  s.channels_last = c.channels_last != 0;
  return s;
}

fpm::MixerParams params_of(const FpmEmuCall& c) {
  fpm::VectorArg v[4];
  for (int i = 0; i < 4; ++i) {
    v[i].data = c.param_data[i];
    v[i].stride = c.param_stride[i];
    v[i].is_float = c.param_is_float[i] != 0;
  }
  return fpm::MixerParams{v[0], v[1], v[2], v[3]};
}

fpm::ParamGrads grads_of(const FpmEmuCall& c) {
  fpm::GradArg g[4];
  for (int i = 0; i < 4; ++i) g[i].data = c.grad_data[i], g[i].is_float = c.grad_is_float[i] != 0;
  return fpm::ParamGrads{g[0], g[1], g[2], g[3]};
}

// The session of one call: options, every buffer, and the workspace the launcher asks for.
struct Call {
  emu::Session session;
  std::vector<std::vector<double>> workspaces;  // statistics in float or double
  ck::DeviceLimits limits;

  explicit Call(const FpmEmuCall& c) {
    session.options.schedule = static_cast<int>(c.schedule);
    session.options.seed = static_cast<uint64_t>(c.seed);
    session.options.max_shared_bytes = static_cast<size_t>(c.shared_bytes_optin);
    limits.multiprocessors = static_cast<int>(c.multiprocessors);
    limits.shared_bytes_optin = static_cast<int>(c.shared_bytes_optin);
    for (int i = 0; i < 4; ++i) {
      session.add(c.param_data[i], c.param_bytes[i], false, "parameter");
      session.add(c.grad_data[i], c.grad_bytes[i], true, "parameter gradient");
    }
  }
  size_t workspace_bytes = 0;

  void report(FpmEmuCall& c) const {
    c.launches = session.launches;
    c.allocations = static_cast<int64_t>(workspaces.size());
    c.workspace_bytes = static_cast<int64_t>(workspace_bytes);
    c.wide_loads = session.wide_loads, c.narrow_loads = session.narrow_loads;
    c.wide_stores = session.wide_stores, c.narrow_stores = session.narrow_stores;
  }
  static void* allocate(void* self, size_t bytes) { return static_cast<Call*>(self)->allocate(bytes); }
  ck::WorkspaceAllocator allocator() { return ck::WorkspaceAllocator{&Call::allocate, this}; }
  void* allocate(size_t bytes) {
    workspace_bytes += bytes;
    workspaces.emplace_back((bytes + sizeof(double) - 1) / sizeof(double) + 2);
    auto& w = workspaces.back();
    std::memset(w.data(), 0xFF, w.size() * sizeof(double));  // NaN until written
    session.add(w.data(), bytes, true, "workspace");
    return w.data();
  }
};

template <typename scalar_t>
void forward(FpmEmuCall& c) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  Call call(c);
  const size_t numel = static_cast<size_t>(c.N * c.C * c.H * c.W);
  call.session.add(c.x, numel * sizeof(scalar_t), false, "x");
  call.session.add(c.y, numel * sizeof(scalar_t), true, "y");
  call.session.add(c.mean, c.N * c.G * sizeof(acc_t), true, "mean");
  call.session.add(c.rstd, c.N * c.G * sizeof(acc_t), true, "rstd");
  emu::SessionScope scope(call.session);
  ck::ForwardCall<scalar_t, acc_t> f{shape_of(c), params_of(c), c.eps,
                                     static_cast<const scalar_t*>(c.x), static_cast<scalar_t*>(c.y),
                                     static_cast<acc_t*>(c.mean), static_cast<acc_t*>(c.rstd)};
  ck::run_forward_kernels(f, call.limits, nullptr, call.allocator());
  call.report(c);
}

template <typename scalar_t>
void backward(FpmEmuCall& c) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  Call call(c);
  const size_t numel = static_cast<size_t>(c.N * c.C * c.H * c.W);
  call.session.add(c.x, numel * sizeof(scalar_t), false, "x");
  call.session.add(c.grad_y, numel * sizeof(scalar_t), false, "grad_y");
  call.session.add(c.grad_x, numel * sizeof(scalar_t), true, "grad_x");
  call.session.add(c.mean, c.N * c.G * sizeof(acc_t), false, "mean");
  call.session.add(c.rstd, c.N * c.G * sizeof(acc_t), false, "rstd");
  emu::SessionScope scope(call.session);
  ck::BackwardCall<scalar_t, acc_t> b{shape_of(c), params_of(c), grads_of(c),
                                      static_cast<const scalar_t*>(c.grad_y),
                                      static_cast<const scalar_t*>(c.x),
                                      static_cast<const acc_t*>(c.mean), static_cast<const acc_t*>(c.rstd),
                                      static_cast<scalar_t*>(c.grad_x)};
  ck::run_backward_kernels(b, call.limits, nullptr, call.allocator());
  call.report(c);
}

#if FPM_EMU_DTYPE == 0
using Scalar = float;
#elif FPM_EMU_DTYPE == 1
using Scalar = double;
#elif FPM_EMU_DTYPE == 2
using Scalar = c10::Half;
#else
using Scalar = c10::BFloat16;
#endif

int report_error(const std::exception& e, char* error, int64_t error_len) {
  if (error != nullptr && error_len > 0) {
    std::strncpy(error, e.what(), static_cast<size_t>(error_len - 1));
    error[error_len - 1] = '\0';
  }
  return 1;
}

}  // namespace

#define FPM_EMU_CAT2(a, b) a##b
#define FPM_EMU_CAT(a, b) FPM_EMU_CAT2(a, b)

extern "C" int FPM_EMU_CAT(fpm_emu_forward_, FPM_EMU_DTYPE)(FpmEmuCall* call, char* error, int64_t error_len) {
  try {
    forward<Scalar>(*call);
    return 0;
  } catch (const std::exception& e) {
    return report_error(e, error, error_len);
  }
}

// The launch geometry the CUDA launcher would choose: for mode 0..2 (apply, sums, dx)
// out = [TC, TH, TW, hh, hw, blocks, smem_bytes, staged_bytes, stage_x vectorized,
//        store_out vectorized, stage kind], for mode 3 (statistics) out = [chunk,
//        blocks_per_group, blocks, vectorized].
extern "C" int FPM_EMU_CAT(fpm_emu_plan_, FPM_EMU_DTYPE)(FpmEmuCall* call, int64_t mode, int64_t* out,
                                                      char* error, int64_t error_len) {
  try {
    using acc_t = std::conditional_t<std::is_same_v<Scalar, double>, double, float>;
    const Call c(*call);
    const fpm::MixerShape s = shape_of(*call);
    if (mode == 3) {
      const ck::StatsPlan p = ck::plan_statistics(s, sizeof(Scalar), c.limits);
      const int64_t v[] = {p.chunk, p.blocks_per_group, p.blocks, p.runs.vector};
      std::copy(std::begin(v), std::end(v), out);
      return 0;
    }
    const ck::TilePlan p = ck::plan_tiles(s, sizeof(Scalar), sizeof(acc_t), static_cast<int>(mode),
                                          ck::kTileBlocksPerSM<Scalar>, c.limits);
    const int64_t v[] = {p.TC, p.TH, p.TW, p.hh, p.hw, p.blocks, p.smem_bytes,
                         ck::staged_bytes(p, sizeof(Scalar)), p.stage_x.vector, p.store_out.vector,
                         p.stage_x.kind};
    std::copy(std::begin(v), std::end(v), out);
    return 0;
  } catch (const std::exception& e) {
    return report_error(e, error, error_len);
  }
}

extern "C" int FPM_EMU_CAT(fpm_emu_backward_, FPM_EMU_DTYPE)(FpmEmuCall* call, char* error, int64_t error_len) {
  try {
    backward<Scalar>(*call);
    return 0;
  } catch (const std::exception& e) {
    return report_error(e, error, error_len);
  }
}

// Shared host/device helpers of the fused pool-mixer kernels (CPU and CUDA).
//
// The mixer is y = res_scale * x + a * rstd * (P x - x) (docs/math.md).  Every backend
// needs the same pieces, kept here so that there is one copy:
//   * the pool rule (the only place C++ and CUDA state it),
//   * the window of the stride-1, padding k//2 average pool along one axis,
//   * its valid-tap count (count_include_pad=False divides by it),
//   * the Chan/Welford merge of partial (count, mean, M2) statistics,
//   * reading the optional parameter vectors and writing their gradients in their own
//     dtype (x's, or float32 for a half-precision x), straight from the kernels.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FPM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FPM_HOST_DEVICE inline
#endif

namespace fused_poolformer {

// ---------------------------------------------------------------------------------------
// The pool rule, PoolFormer's setting (docs/contract.md; fused_poolformer/contract.py states
// it for Python): AvgPool2d(pool_size, stride 1, padding pool_size / 2,
// count_include_pad=False) with an odd pool_size >= 1.  The window centred on a pixel is
// then symmetric (its radius is the padding), which the backward's adjoint pool relies on,
// and a window clipped by the border divides by its valid taps.  A plane smaller than the
// window is fine: the window is clipped to it (effective_radius).

constexpr const char* kPoolSizeRule = "pool_size must be a positive odd integer";
constexpr int64_t kPoolStride = 1;
constexpr bool kCountIncludePad = false;

FPM_HOST_DEVICE bool valid_pool_size(int64_t pool_size) {
  return pool_size >= 1 && pool_size % 2 == 1;
}

// The window's radius, also the pool's padding.
FPM_HOST_DEVICE int64_t pool_radius(int64_t pool_size) { return pool_size / 2; }

FPM_HOST_DEVICE int64_t pool_size_of(int64_t radius) { return 2 * radius + 1; }

// First index of the pool window centred on i along an axis of length n, radius r = k//2.
FPM_HOST_DEVICE int64_t window_begin(int64_t i, int64_t radius) {
  return i - radius > 0 ? i - radius : 0;
}

// Last index (inclusive) of that window.
FPM_HOST_DEVICE int64_t window_end(int64_t i, int64_t radius, int64_t n) {
  return i + radius < n - 1 ? i + radius : n - 1;
}

// Number of valid taps of the window along one axis.  The 2-D count is the product of
// the counts along H and W because the window is a rectangle clipped by the border.
FPM_HOST_DEVICE int64_t window_count(int64_t i, int64_t radius, int64_t n) {
  return window_end(i, radius, n) - window_begin(i, radius) + 1;
}

// A radius larger than n - 1 reaches no further element, so loops can use the clipped one.
FPM_HOST_DEVICE int64_t effective_radius(int64_t radius, int64_t n) {
  return radius < n - 1 ? radius : (n > 0 ? n - 1 : 0);
}

// Partial statistics of a set of values: count, mean and sum of squared deviations.
template <typename acc_t>
struct WelfordData {
  acc_t count;
  acc_t mean;
  acc_t m2;
};

// Chan et al.'s pairwise merge.  Merging partials in a fixed order makes the result
// independent of how the work was scheduled, which is what keeps every backend
// deterministic without float atomics.
template <typename acc_t>
FPM_HOST_DEVICE WelfordData<acc_t> welford_merge(WelfordData<acc_t> a, WelfordData<acc_t> b) {
  if (b.count == acc_t(0)) return a;
  if (a.count == acc_t(0)) return b;
  const acc_t count = a.count + b.count;
  const acc_t delta = b.mean - a.mean;
  const acc_t nb_over_n = b.count / count;
  WelfordData<acc_t> out;
  out.count = count;
  out.mean = a.mean + delta * nb_over_n;
  out.m2 = a.m2 + b.m2 + delta * delta * a.count * nb_over_n;
  return out;
}

// 1 / sqrt(biased variance + eps), the GroupNorm scale.
template <typename acc_t>
FPM_HOST_DEVICE acc_t welford_rstd(WelfordData<acc_t> w, acc_t eps) {
  const acc_t var = w.count > acc_t(0) ? w.m2 / w.count : acc_t(0);
#if defined(__CUDA_ARCH__)
  return rsqrt(var + eps);
#else
  return acc_t(1) / std::sqrt(var + eps);
#endif
}

// An optional (C,) or (N,) parameter vector as a kernel reads it: absent (data == nullptr:
// every entry is 1), or strided values stored in x's dtype or, for a half-precision x, in
// float32.  Passing the pointer lets the kernels form a * rstd and res_scale on the fly
// instead of the host building coefficient tables.
struct VectorArg {
  const void* data = nullptr;
  int64_t stride = 1;
  bool is_float = false;  // stored as float32 (rather than in x's dtype)
};

// A (C,) gradient output: contiguous, in its parameter's dtype; data == nullptr when
// nobody asked for it (the kernels then skip it).
struct GradArg {
  void* data = nullptr;
  bool is_float = false;
};

template <typename scalar_t, typename acc_t>
FPM_HOST_DEVICE acc_t read_vector(const VectorArg& v, int64_t i) {
  if (v.data == nullptr) return acc_t(1);
  if (v.is_float) return static_cast<acc_t>(static_cast<const float*>(v.data)[i * v.stride]);
  return static_cast<acc_t>(static_cast<const scalar_t*>(v.data)[i * v.stride]);
}

template <typename scalar_t, typename acc_t>
FPM_HOST_DEVICE void write_vector(const GradArg& g, int64_t i, acc_t value) {
  if (g.data == nullptr) return;
  if (g.is_float) {
    static_cast<float*>(g.data)[i] = static_cast<float>(value);
  } else {
    static_cast<scalar_t*>(g.data)[i] = static_cast<scalar_t>(value);
  }
}

// The parameter vectors of one call.  a[n, c] = layer_scale[c] * weight[c] *
// sample_scale[n] is the per-(n, c) factor of the mixer term.
struct MixerParams {
  VectorArg weight, layer_scale, res_scale, sample_scale;

  template <typename scalar_t, typename acc_t>
  FPM_HOST_DEVICE acc_t channel_factor(int64_t c) const {  // layer_scale * weight
    return read_vector<scalar_t, acc_t>(layer_scale, c) * read_vector<scalar_t, acc_t>(weight, c);
  }
  template <typename scalar_t, typename acc_t>
  FPM_HOST_DEVICE acc_t sample_factor(int64_t n) const {
    return read_vector<scalar_t, acc_t>(sample_scale, n);
  }
  template <typename scalar_t, typename acc_t>
  FPM_HOST_DEVICE acc_t residual(int64_t c) const {
    return read_vector<scalar_t, acc_t>(res_scale, c);
  }
};

// The (C,) parameter gradients of one backward call (docs/math.md: T[c] = sum_n rstd *
// sample_scale * sum(D * dy), dweight = layer_scale * T, dlayer_scale = weight * T,
// dres_scale = sum(x * dy), dbias = 0).
struct ParamGrads {
  GradArg weight, bias, layer_scale, res_scale;

  // Writes every requested gradient of channel c from its two sums, in the gradients' dtypes.
  template <typename scalar_t, typename acc_t>
  FPM_HOST_DEVICE void write(const MixerParams& p, int64_t c, acc_t t, acc_t xdy) const {
    write_vector<scalar_t, acc_t>(weight, c, read_vector<scalar_t, acc_t>(p.layer_scale, c) * t);
    write_vector<scalar_t, acc_t>(layer_scale, c, read_vector<scalar_t, acc_t>(p.weight, c) * t);
    write_vector<scalar_t, acc_t>(res_scale, c, xdy);
    write_vector<scalar_t, acc_t>(bias, c, acc_t(0));
  }
  FPM_HOST_DEVICE bool any() const {
    return weight.data || bias.data || layer_scale.data || res_scale.data;
  }
};

// Shape of one call.  Group g of sample n holds channels [g * Cg, (g + 1) * Cg).
struct MixerShape {
  int64_t N, C, H, W, G, Cg, radius;
  bool channels_last;

  FPM_HOST_DEVICE int64_t group_numel() const { return Cg * H * W; }
  FPM_HOST_DEVICE int64_t numel() const { return N * C * H * W; }
};

}  // namespace fused_poolformer

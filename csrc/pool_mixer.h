// Shared host/device helpers of the fused pool-mixer kernels (CPU and CUDA).
//
// The mixer is y = res_scale * x + a * rstd * (P x - x) (DESIGN.md section 2).  Every
// backend needs the same three pieces of arithmetic, kept here so that there is one copy:
//   * the window of the stride-1, padding k//2 average pool along one axis,
//   * its valid-tap count (count_include_pad=False divides by it),
//   * the Chan/Welford merge of partial (count, mean, M2) statistics.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FPM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FPM_HOST_DEVICE inline
#endif

namespace fused_poolformer {

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

}  // namespace fused_poolformer

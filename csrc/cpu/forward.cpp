// CPU forward of the fused pool mixer: GroupNorm statistics (fixed blocks, merged in a
// fixed order), then one pass that writes y = res * x + a * rstd * (P x - x).  Helpers
// and the traversal are described in kernels.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "kernels.h"

namespace fused_poolformer {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------
// Forward, pass 1: GroupNorm statistics.  Fixed blocks, two passes over each (cache
// resident) block, Chan merge of the block partials in order.

constexpr int64_t kStatsBlock = 4096;

// Sum of f(chunk) over a run, with four independent accumulators so that the adds do not
// wait on each other (a single chain is latency-bound), folded in a fixed order.
template <typename acc_t, typename F>
inline acc_t unrolled_sum(int64_t count, F f) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = kLanes<acc_t>;
  Vec s0(acc_t(0)), s1(acc_t(0)), s2(acc_t(0)), s3(acc_t(0));
  int64_t i = 0;
  for (; i + 4 * V <= count; i += 4 * V) {
    s0 += f(i, V);
    s1 += f(i + V, V);
    s2 += f(i + 2 * V, V);
    s3 += f(i + 3 * V, V);
  }
  for (; i < count; i += V) s0 += f(i, std::min(V, count - i));
  return lane_sum((s0 + s1) + (s2 + s3));
}

// Lane-wise sum of f(p) for p in [0, count), four independent accumulators.
template <typename acc_t, typename F>
inline Vectorized<acc_t> column_sum(int64_t count, F f) {
  using Vec = Vectorized<acc_t>;
  Vec s0(acc_t(0)), s1(acc_t(0)), s2(acc_t(0)), s3(acc_t(0));
  int64_t p = 0;
  for (; p + 4 <= count; p += 4) {
    s0 += f(p);
    s1 += f(p + 1);
    s2 += f(p + 2);
    s3 += f(p + 3);
  }
  for (; p < count; ++p) s0 += f(p);
  return (s0 + s1) + (s2 + s3);
}

template <typename scalar_t, typename acc_t>
WelfordData<acc_t> contiguous_block_stats(const scalar_t* p, int64_t count) {
  using Vec = Vectorized<acc_t>;
  const acc_t mean =
      unrolled_sum<acc_t>(count, [&](int64_t i, int64_t n) { return load<acc_t>(p + i, n); }) /
      acc_t(count);
  const acc_t m2 = unrolled_sum<acc_t>(count, [&](int64_t i, int64_t n) {
    const Vec d = first_lanes(load<acc_t>(p + i, n) - Vec(mean), n);
    return d * d;
  });
  return {acc_t(count), mean, m2};
}

// NCHW: the elements of group (n, g) are one contiguous run.
template <typename scalar_t, typename acc_t>
void stats_contiguous(const scalar_t* x, int64_t N, int64_t G, int64_t group_numel,
                      std::vector<WelfordData<acc_t>>& out) {
  const int64_t blocks = std::max<int64_t>(1, (group_numel + kStatsBlock - 1) / kStatsBlock);
  std::vector<WelfordData<acc_t>> partial(N * G * blocks);
  at::parallel_for(0, N * G * blocks, grain_size(kStatsBlock), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t group = t / blocks, b = t % blocks;
      const int64_t start = b * kStatsBlock;
      const int64_t count = std::min(kStatsBlock, group_numel - start);
      partial[t] = count > 0 ? contiguous_block_stats<scalar_t, acc_t>(
                                   x + group * group_numel + start, count)
                             : WelfordData<acc_t>{0, 0, 0};
    }
  });
  for (int64_t group = 0; group < N * G; ++group) {
    WelfordData<acc_t> w{0, 0, 0};
    for (int64_t b = 0; b < blocks; ++b) w = welford_merge(w, partial[group * blocks + b]);
    out[group] = w;
  }
}

// channels_last: a block is a run of positions of one sample, all C channels each; the
// per-channel sums are vectors along C, folded into per-group partials.
template <typename scalar_t, typename acc_t>
void stats_channels_last(const scalar_t* x, int64_t N, int64_t C, int64_t G, int64_t positions,
                         std::vector<WelfordData<acc_t>>& out) {
  const int64_t per_block = std::max<int64_t>(1, kStatsBlock / std::max<int64_t>(C, 1));
  const int64_t blocks = std::max<int64_t>(1, (positions + per_block - 1) / per_block);
  const int64_t Cg = C / G;
  std::vector<WelfordData<acc_t>> partial(N * blocks * G, WelfordData<acc_t>{0, 0, 0});
  at::parallel_for(0, N * blocks, grain_size(per_block * C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> channel_sum(C), channel_m2(C), channel_mean(C);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / blocks, b = t % blocks;
      const int64_t p0 = b * per_block, p1 = std::min(positions, p0 + per_block);
      if (p1 <= p0) continue;
      const scalar_t* base = x + n * positions * C;
      // Channel chunks outer, positions inner: the sums stay in registers (a per-position
      // pass over C would chain every add through memory).  The block is L1-resident.
      const int64_t np = p1 - p0;
      for (int64_t c = 0; c < C; c += kLanes<acc_t>) {
        const int64_t lanes = std::min(kLanes<acc_t>, C - c);
        const scalar_t* at = base + p0 * C + c;
        store(channel_sum.data() + c, column_sum<acc_t>(np, [&](int64_t p) {
          return load<acc_t>(at + p * C, lanes);
        }), lanes);
      }
      const acc_t count = acc_t((p1 - p0) * Cg);
      for (int64_t g = 0; g < G; ++g) {
        acc_t s = 0;
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) s += channel_sum[c];
        std::fill(channel_mean.begin() + g * Cg, channel_mean.begin() + (g + 1) * Cg, s / count);
      }
      for (int64_t c = 0; c < C; c += kLanes<acc_t>) {
        const int64_t lanes = std::min(kLanes<acc_t>, C - c);
        const scalar_t* at = base + p0 * C + c;
        const auto mean = load<acc_t>(channel_mean.data() + c, lanes);
        store(channel_m2.data() + c, column_sum<acc_t>(np, [&](int64_t p) {
          const auto d = first_lanes(load<acc_t>(at + p * C, lanes) - mean, lanes);
          return d * d;
        }), lanes);
      }
      for (int64_t g = 0; g < G; ++g) {
        acc_t m2 = 0;
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) m2 += channel_m2[c];
        partial[(n * blocks + b) * G + g] = {count, channel_mean[g * Cg], m2};
      }
    }
  });
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      WelfordData<acc_t> w{0, 0, 0};
      for (int64_t b = 0; b < blocks; ++b) w = welford_merge(w, partial[(n * blocks + b) * G + g]);
      out[n * G + g] = w;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Forward, pass 2: y = res * x + coef * (box / cnt - xc) with xc = x - mean and
// coef = a * rstd.  Pooling x - mean instead of x gives the same D (the pool of a constant
// is that constant) and keeps the box sums small when |mean| >> std.

template <typename scalar_t, typename acc_t, bool kCL>
void forward_apply(const Geometry<acc_t>& g, const scalar_t* x, scalar_t* y, const acc_t* mean_nc,
                   const acc_t* coef_nc, const acc_t* res_c) {
  using Vec = Vectorized<acc_t>;
  for_each_task(g, [&](int64_t plane, int64_t, int64_t h_begin, int64_t h_end,
                       RowScratch<acc_t>& scratch) {
    const scalar_t* xp = x + plane * g.plane_numel();
    scalar_t* yp = y + plane * g.plane_numel();
    const acc_t* shift = mean_nc + plane_factor_offset(g, plane);
    const acc_t* coef = coef_nc + plane_factor_offset(g, plane);
    const acc_t* res = res_c + plane_channel(g, plane);
    auto centered = [&](int64_t h, int64_t o, int64_t lanes, int64_t c, int64_t) {
      return load<acc_t>(xp + h * g.L + o, lanes) - per_channel<kCL>(shift, c, lanes);
    };
    auto emit = [&](int64_t h, const HorizontalSum<acc_t>& box) {
      const Vec inv_h(g.inv_h[h]);
      for_each_chunk<kCL>(g, [&](int64_t o, int64_t lanes, int64_t c, int64_t w) {
        const Vec xv = load<acc_t>(xp + h * g.L + o, lanes);
        const Vec pooled = box(o, lanes) * inv_h * per_position<kCL>(g, w, lanes);
        const Vec xc = xv - per_channel<kCL>(shift, c, lanes);
        store_output(yp + h * g.L + o,
              per_channel<kCL>(res, c, lanes) * xv + per_channel<kCL>(coef, c, lanes) * (pooled - xc),
              lanes, g.stream_outputs);
      });
    };
    box_sum_rows<kCL>(g, h_begin, h_end, scratch, centered, emit);
  });
}


template <typename scalar_t>
void forward_kernel(const ForwardProblem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const MixerShape& s = p.shape;
  const scalar_t* x = p.x.const_data_ptr<scalar_t>();
  std::vector<WelfordData<acc_t>> stats(s.N * s.G);
  if (s.channels_last) {
    stats_channels_last<scalar_t, acc_t>(x, s.N, s.C, s.G, s.H * s.W, stats);
  } else {
    stats_contiguous<scalar_t, acc_t>(x, s.N, s.G, s.group_numel(), stats);
  }
  acc_t* mean = p.mean.mutable_data_ptr<acc_t>();
  acc_t* rstd = p.rstd.mutable_data_ptr<acc_t>();
  for (int64_t i = 0; i < s.N * s.G; ++i) {
    mean[i] = stats[i].mean;
    rstd[i] = welford_rstd(stats[i], static_cast<acc_t>(p.eps));
  }
  const auto f = channel_factors<scalar_t, acc_t>(s, p.params, mean, rstd);
  const auto g = make_geometry<acc_t>(s, std::is_same_v<scalar_t, float>);
  with_layout(s.channels_last, [&](auto channels_last) {
    forward_apply<scalar_t, acc_t, decltype(channels_last)::value>(
        g, x, p.y.mutable_data_ptr<scalar_t>(), f.mean.data(), f.coef.data(), f.res.data());
  });
}

void launch_forward(const ForwardProblem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(),
                                  "pool_mixer_forward_cpu", [&] { forward_kernel<scalar_t>(p); });
}

ForwardResult pool_mixer_forward_cpu(const at::Tensor& x, const OptionalTensor& weight,
                                     const OptionalTensor& bias, const OptionalTensor& layer_scale,
                                     const OptionalTensor& res_scale,
                                     const OptionalTensor& sample_scale, int64_t num_groups,
                                     int64_t pool_size, double eps) {
  return run_forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups,
                     pool_size, eps, at::kCPU, &launch_forward);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fused_poolformer, CPU, m) {
  m.impl("pool_mixer_forward", &cpu::pool_mixer_forward_cpu);
}

}  // namespace fused_poolformer

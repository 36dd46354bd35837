// CPU forward of the fused pool mixer: GroupNorm statistics (fixed blocks, merged in a
// fixed order), then one pass that writes y = res * x + a * rstd * (P x - x).  Helpers
// and the traversals are described in kernels.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "kernels.h"

namespace fused_poolformer {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------
// Pass 1: GroupNorm statistics.  Fixed blocks, two passes over each (cache-resident)
// block, Chan merge of the block partials in order.

constexpr int64_t kStatsBlock = 4096;

// Sum of f(i, n) over chunks of a run, with four independent accumulators so that the adds
// do not wait on each other (a single chain is latency-bound), folded in a fixed order.
template <typename acc_t, typename F>
inline Vectorized<acc_t> unrolled_sum(int64_t count, int64_t step, F f) {
  using Vec = Vectorized<acc_t>;
  Vec s0(acc_t(0)), s1(acc_t(0)), s2(acc_t(0)), s3(acc_t(0));
  int64_t i = 0;
  for (; i + 4 * step <= count; i += 4 * step) {
    s0 += f(i, step);
    s1 += f(i + step, step);
    s2 += f(i + 2 * step, step);
    s3 += f(i + 3 * step, step);
  }
  for (; i < count; i += step) s0 += f(i, std::min(step, count - i));
  return (s0 + s1) + (s2 + s3);
}

template <typename scalar_t, typename acc_t>
WelfordData<acc_t> contiguous_block_stats(const scalar_t* p, int64_t count) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = kLanes<acc_t>;
  const acc_t mean = lane_sum(unrolled_sum<acc_t>(count, V, [&](int64_t i, int64_t n) {
                       return load<acc_t>(p + i, n);
                     })) / acc_t(count);
  const acc_t m2 = lane_sum(unrolled_sum<acc_t>(count, V, [&](int64_t i, int64_t n) {
    const Vec d = first_lanes(load<acc_t>(p + i, n) - Vec(mean), n);
    return d * d;
  }));
  return {acc_t(count), mean, m2};
}

// Merges partials[first + i * stride] for i in [0, count) in order.
template <typename acc_t>
WelfordData<acc_t> merge_in_order(const WelfordData<acc_t>* partials, int64_t count,
                                  int64_t stride = 1) {
  WelfordData<acc_t> w{0, 0, 0};
  for (int64_t i = 0; i < count; ++i) w = welford_merge(w, partials[i * stride]);
  return w;
}

// NCHW: the elements of group (n, g) are one contiguous run, split into blocks.
struct ContiguousStats {
  int64_t groups, group_numel, blocks;

  explicit ContiguousStats(const MixerShape& s)
      : groups(s.N * s.G), group_numel(s.group_numel()),
        blocks(std::max<int64_t>(1, (s.group_numel() + kStatsBlock - 1) / kStatsBlock)) {}
  int64_t partials() const { return groups * blocks; }

  template <typename scalar_t, typename acc_t>
  void run(const scalar_t* x, WelfordData<acc_t>* partial, WelfordData<acc_t>* out) const {
    at::parallel_for(0, groups * blocks, grain_size(kStatsBlock), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t group = t / blocks, start = (t % blocks) * kStatsBlock;
        const int64_t count = std::min(kStatsBlock, group_numel - start);
        partial[t] = count > 0 ? contiguous_block_stats<scalar_t, acc_t>(
                                     x + group * group_numel + start, count)
                               : WelfordData<acc_t>{0, 0, 0};
      }
    });
    for (int64_t group = 0; group < groups; ++group) {
      out[group] = merge_in_order(partial + group * blocks, blocks);
    }
  }
};

// channels_last: a task is a block of positions of one sample, all channels, walked in
// strips of channels whose per-channel sums stay in registers.  Each strip writes one
// partial per group it overlaps (at most strip_width of them).
struct ChannelsLastStats {
  int64_t N, C, G, Cg, positions, strip_width, strips, per_block, blocks;

  template <typename acc_t>
  ChannelsLastStats(const MixerShape& s, const Geometry<acc_t>& g)
      : N(s.N), C(s.C), G(s.G), Cg(s.Cg), positions(s.H * s.W), strip_width(g.strip_width),
        strips(g.strips) {
    per_block = std::max<int64_t>(1, 4 * kStatsBlock / std::max<int64_t>(C, 1));
    blocks = (positions + per_block - 1) / per_block;
  }
  int64_t partials() const { return N * blocks * strips * strip_width; }
  int64_t slot(int64_t n, int64_t b, int64_t strip) const {
    return ((n * blocks + b) * strips + strip) * strip_width;
  }

  // One strip of one block: per-channel sums, then per-group mean, then per-group M2.
  template <int NV, typename scalar_t, typename acc_t>
  void strip_stats(const scalar_t* base, int64_t np, int64_t c0, int64_t tail,
                   WelfordData<acc_t>* out) const {
    using Vec = Vectorized<acc_t>;
    constexpr int64_t V = kLanes<acc_t>;
    auto lanes = [&](int k) { return k == NV - 1 ? tail : V; };
    alignas(64) acc_t sums[NV * V];
    alignas(64) acc_t means[NV * V];
    for (int k = 0; k < NV; ++k) {
      const scalar_t* at = base + k * V;
      unrolled_sum<acc_t>(np, 1, [&](int64_t p, int64_t) {
        return load<acc_t>(at + p * C, lanes(k));
      }).store(sums + k * V);
    }
    const int64_t width = (NV - 1) * V + tail;
    const int64_t g_first = c0 / Cg;
    // Per-group sums over the strip's channels in order; every lane gets its group's mean.
    for (int64_t c = 0; c < width;) {
      const int64_t g = (c0 + c) / Cg, c_end = std::min(width, (g + 1) * Cg - c0);
      acc_t s = 0;
      for (int64_t i = c; i < c_end; ++i) s += sums[i];
      const acc_t count = acc_t(np * (c_end - c));
      const acc_t mean = s / count;
      for (int64_t i = c; i < c_end; ++i) means[i] = mean;
      out[g - g_first] = {count, mean, acc_t(0)};
      c = c_end;
    }
    for (int k = 0; k < NV; ++k) {
      const scalar_t* at = base + k * V;
      const Vec mean = Vec::loadu(means + k * V);
      unrolled_sum<acc_t>(np, 1, [&](int64_t p, int64_t) {
        const Vec d = first_lanes(load<acc_t>(at + p * C, lanes(k)) - mean, lanes(k));
        return d * d;
      }).store(sums + k * V);
    }
    for (int64_t c = 0; c < width;) {
      const int64_t g = (c0 + c) / Cg, c_end = std::min(width, (g + 1) * Cg - c0);
      acc_t m2 = 0;
      for (int64_t i = c; i < c_end; ++i) m2 += sums[i];
      out[g - g_first].m2 = m2;
      c = c_end;
    }
  }

  template <typename scalar_t, typename acc_t>
  void run(const scalar_t* x, WelfordData<acc_t>* partial, WelfordData<acc_t>* out) const {
    constexpr int64_t V = kLanes<acc_t>;
    at::parallel_for(0, N * blocks, grain_size(per_block * C), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / blocks, b = t % blocks;
        const int64_t p0 = b * per_block, np = std::min(positions, p0 + per_block) - p0;
        for (int64_t strip = 0; strip < strips; ++strip) {
          const int64_t c0 = strip * strip_width;
          const int64_t width = std::min(strip_width, C - c0);
          const int64_t nv = (width + V - 1) / V;
          const scalar_t* base = x + (n * positions + p0) * C + c0;
          WelfordData<acc_t>* slot_out = partial + slot(n, b, strip);
          with_strip_vectors(nv, [&](auto nv_const) {
            strip_stats<decltype(nv_const)::value>(base, np, c0, width - (nv - 1) * V, slot_out);
          });
        }
      }
    });
    // Merge in a fixed order: blocks, then the strips overlapping the group.
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t first = g * Cg / strip_width, last = ((g + 1) * Cg - 1) / strip_width;
        WelfordData<acc_t> w{0, 0, 0};
        for (int64_t b = 0; b < blocks; ++b) {
          for (int64_t strip = first; strip <= last; ++strip) {
            w = welford_merge(w, partial[slot(n, b, strip) + g - strip * strip_width / Cg]);
          }
        }
        out[n * G + g] = w;
      }
    }
  }
};

// ---------------------------------------------------------------------------------------
// Pass 2: y = res * x + coef * (box / cnt - xc) with xc = x - mean and coef = a * rstd.
// Pooling x - mean instead of x gives the same D (the pool of a constant is that constant)
// and keeps the box sums small when |mean| >> std.

template <typename acc_t>
inline Vectorized<acc_t> mixer_output(Vectorized<acc_t> res, Vectorized<acc_t> coef,
                                      Vectorized<acc_t> x, Vectorized<acc_t> xc,
                                      Vectorized<acc_t> pooled) {
  return res * x + coef * (pooled - xc);
}

template <typename scalar_t, typename acc_t>
void apply_strips(const Geometry<acc_t>& g, const scalar_t* x, scalar_t* y,
                  const Factors<acc_t>& f, bool streaming) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = kLanes<acc_t>;
  const int64_t C = g.C, W = g.W;
  for_each_task(
      g, [&](Scratch& a) { return a.template take<Vec>(strip_scratch_vectors(g)); },
      [&](int64_t t, Vec* col) {
        const StripTask st = strip_task(g, t);
        with_strip_vectors(st.nv, [&](auto nv_const) {
          constexpr int NV = decltype(nv_const)::value;
          auto lanes = [&](int k) { return k == NV - 1 ? st.tail : V; };
          const int64_t base = st.n * g.H * W * C + st.c0;
          const scalar_t* xp = x + base;
          scalar_t* yp = y + base;
          Vec mean[NV], coef[NV], res[NV];
          for (int k = 0; k < NV; ++k) {
            mean[k] = load<acc_t>(f.mean + st.n * C + st.c0 + k * V, lanes(k));
            coef[k] = load<acc_t>(f.coef + st.n * C + st.c0 + k * V, lanes(k));
            res[k] = load<acc_t>(f.res + st.c0 + k * V, lanes(k));
          }
          auto source = [&](int64_t hh, int64_t w, int k) {
            return load<acc_t>(xp + (hh * W + w) * C + k * V, lanes(k)) - mean[k];
          };
          auto column = [](Vec v, int64_t) { return v; };
          auto emit = [&](int64_t h, int64_t w, const Vec* box) {
            const Vec inv(g.inv_h[h] * g.inv_w[w]);
            for (int k = 0; k < NV; ++k) {
              const int64_t o = (h * W + w) * C + k * V;
              const Vec xv = load<acc_t>(xp + o, lanes(k));
              store_output(yp + o, mixer_output(res[k], coef[k], xv, xv - mean[k], box[k] * inv),
                           lanes(k), streaming);
            }
          };
          strip_box_sums<NV>(g, st.h_begin, st.h_end, col, source, column, emit);
        });
      });
}

template <typename scalar_t, typename acc_t>
void apply_planes(const Geometry<acc_t>& g, const scalar_t* x, scalar_t* y,
                  const Factors<acc_t>& f, bool streaming) {
  using Vec = Vectorized<acc_t>;
  const int64_t HW = g.plane_numel(), planes = g.N * g.C;
  for_each_task(
      g, [&](Scratch& a) { return take_plane_scratch(g, a); },
      [&](int64_t t, const PlaneScratch<acc_t>& s) {
        const int64_t p_end = std::min(planes, (t + 1) * g.planes_per_task);
        for (int64_t plane = t * g.planes_per_task; plane < p_end; ++plane) {
          const scalar_t* xp = x + plane * HW;
          scalar_t* yp = y + plane * HW;
          const Vec mean(f.mean[plane]), coef(f.coef[plane]), res(f.res[plane % g.C]);
          auto source = [&](int64_t i, int64_t n) {
            return first_lanes(load<acc_t>(xp + i, n) - mean, n);
          };
          auto emit = [&](int64_t i, int64_t n, Vec box) {
            const Vec pooled = box * Vec::loadu(g.inv_cnt + i);
            store_output(yp + i,
                         mixer_output(res, coef, load<acc_t>(xp + i, n), Vec::loadu(s.xs + i), pooled),
                         n, streaming);
          };
          plane_box_sums(g, s, source, emit);
        }
      });
}

template <typename scalar_t, typename acc_t>
void apply_rows(const Geometry<acc_t>& g, const scalar_t* x, scalar_t* y,
                const Factors<acc_t>& f, bool streaming) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = kLanes<acc_t>;
  const int64_t HW = g.plane_numel(), W = g.W;
  for_each_task(
      g, [&](Scratch& a) { return take_row_scratch(g, a); },
      [&](int64_t t, acc_t* col) {
        const RowTask r = row_task(g, t);
        const scalar_t* xp = x + r.plane * HW;
        scalar_t* yp = y + r.plane * HW;
        const Vec mean(f.mean[r.plane]), coef(f.coef[r.plane]), res(f.res[r.plane % g.C]);
        auto source = [&](int64_t hh, int64_t w, int64_t n) {
          return load<acc_t>(xp + hh * W + w, n) - mean;
        };
        auto column = [](Vec v, int64_t, int64_t) { return v; };
        auto emit = [&](int64_t h, const HorizontalSum<acc_t>& box) {
          const Vec inv_h(g.inv_h[h]);
          for (int64_t w = 0; w < W; w += V) {
            const int64_t n = std::min(V, W - w);
            const Vec xv = load<acc_t>(xp + h * W + w, n);
            const Vec pooled = box(w) * inv_h * load<acc_t>(g.inv_w + w, n);
            store_output(yp + h * W + w, mixer_output(res, coef, xv, xv - mean, pooled), n,
                         streaming);
          }
        };
        row_box_sums(g, r.h_begin, r.h_end, col, source, column, emit);
      });
}

// ---------------------------------------------------------------------------------------
// The launcher.

template <typename scalar_t>
void forward_kernel(const ForwardProblem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const MixerShape& s = p.shape;
  const scalar_t* x = p.x.const_data_ptr<scalar_t>();
  scalar_t* y = p.y.mutable_data_ptr<scalar_t>();
  Geometry<acc_t> g = make_geometry<acc_t>(s);
  const ContiguousStats contiguous(s);
  const ChannelsLastStats channels_last(s, g);
  const int64_t partials = s.channels_last ? channels_last.partials() : contiguous.partials();

  Workspace ws;
  Factors<acc_t> f;
  WelfordData<acc_t>* partial = nullptr;
  WelfordData<acc_t>* stats = nullptr;
  ws.fit([&](Workspace& a) {
    take_tables(g, a);
    f.take(a, s);
    partial = a.take<WelfordData<acc_t>>(partials);
    stats = a.take<WelfordData<acc_t>>(s.N * s.G);
  });

  if (s.channels_last) {
    channels_last.run(x, partial, stats);
  } else {
    contiguous.run(x, partial, stats);
  }
  acc_t* mean = p.mean.mutable_data_ptr<acc_t>();
  acc_t* rstd = p.rstd.mutable_data_ptr<acc_t>();
  for (int64_t i = 0; i < s.N * s.G; ++i) {
    mean[i] = stats[i].mean;
    rstd[i] = welford_rstd(stats[i], static_cast<acc_t>(p.eps));
  }
  fill_factors<scalar_t>(f, s, p.params, mean, rstd);

  switch (g.traversal) {
    case Traversal::kStrips:
      return apply_strips(g, x, y, f, can_stream<scalar_t, acc_t>(y, s.C));
    case Traversal::kPlanes:
      return apply_planes(g, x, y, f, can_stream<scalar_t, acc_t>(y, s.H * s.W));
    case Traversal::kRows:
      return apply_rows(g, x, y, f, can_stream<scalar_t, acc_t>(y, s.W));
  }
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

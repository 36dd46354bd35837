// CPU forward of the fused pool mixer: GroupNorm statistics (fixed blocks, merged in a
// fixed order), then one pass that writes y = res * x + a * rstd * (P x - x) -- and, when
// asked (ForwardProblem::y_mean, the whole block's Norm2), y's own per-sample statistics.  Helpers
// and the traversals are described in traversal.h; registration in operators.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "api.h"
#include "traversal.h"

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

// The statistics come in tasks (numbered sample by sample) that write partials, and a
// per-sample merge of those partials in a fixed order.

// NCHW: the elements of group (n, g) are one contiguous run, split into blocks.
struct ContiguousStats {
  int64_t G, group_numel, blocks;

  explicit ContiguousStats(const MixerShape& s)
      : G(s.G), group_numel(s.group_numel()),
        blocks(std::max<int64_t>(1, (s.group_numel() + kStatsBlock - 1) / kStatsBlock)) {}
  int64_t tasks_per_sample() const { return G * blocks; }
  int64_t task_elements() const { return kStatsBlock; }
  int64_t scratch_elements() const { return 0; }

  template <typename scalar_t, typename acc_t>
  void task(const scalar_t* x, int64_t t, WelfordData<acc_t>* partial, acc_t*) const {
    const int64_t group = t / blocks, start = (t % blocks) * kStatsBlock;
    const int64_t count = std::min(kStatsBlock, group_numel - start);
    partial[t] = count > 0 ? contiguous_block_stats<scalar_t, acc_t>(
                                 x + group * group_numel + start, count)
                           : WelfordData<acc_t>{0, 0, 0};
  }

  template <typename acc_t>
  void merge(int64_t n, const WelfordData<acc_t>* partial, WelfordData<acc_t>* out) const {
    for (int64_t g = 0; g < G; ++g) {
      out[g] = merge_in_order(partial + (n * G + g) * blocks, blocks);
    }
  }
};

// channels_last: a task is a block of positions of one sample, all channels: a sequential
// run of memory.  Per-channel sums accumulate in scratch, position by position; then per
// group, its mean; then the per-channel sums of squared deviations from it.
struct ChannelsLastStats {
  int64_t C, G, Cg, positions, per_block, blocks;

  explicit ChannelsLastStats(const MixerShape& s)
      : C(s.C), G(s.G), Cg(s.Cg), positions(s.H * s.W),
        per_block(std::max<int64_t>(1, 4 * kStatsBlock / std::max<int64_t>(s.C, 1))),
        blocks((positions + per_block - 1) / per_block) {}
  int64_t tasks_per_sample() const { return blocks; }
  int64_t task_elements() const { return per_block * C; }
  int64_t scratch_elements() const { return 2 * round_up(C, 8); }

  template <typename scalar_t, typename acc_t, typename F>
  void channel_sums(const scalar_t* base, int64_t np, acc_t* sums, F f) const {
    using Vec = Vectorized<acc_t>;
    constexpr int64_t V = kLanes<acc_t>;
    std::fill(sums, sums + round_up(C, V), acc_t(0));
    const int64_t full = C / V * V;
    for (int64_t p = 0; p < np; ++p) {
      const scalar_t* at = base + p * C;
      for (int64_t c = 0; c < full; c += V) {
        (Vec::loadu(sums + c) + f(load<acc_t>(at + c), c, V)).store(sums + c);
      }
      if (full < C) {
        const int64_t n = C - full;
        (Vec::loadu(sums + full) + f(load<acc_t>(at + full, n), full, n)).store(sums + full);
      }
    }
  }

  template <typename scalar_t, typename acc_t>
  void task(const scalar_t* x, int64_t t, WelfordData<acc_t>* partial, acc_t* scratch) const {
    using Vec = Vectorized<acc_t>;
    const int64_t n = t / blocks, b = t % blocks;
    const int64_t p0 = b * per_block, np = std::min(positions, p0 + per_block) - p0;
    const scalar_t* base = x + (n * positions + p0) * C;
    acc_t* sums = scratch;
    acc_t* means = scratch + round_up(C, 8);
    channel_sums(base, np, sums, [](Vec v, int64_t, int64_t) FPM_LAMBDA_INLINE { return v; });
    WelfordData<acc_t>* out = partial + t * G;
    const acc_t count = acc_t(np * Cg);
    for (int64_t g = 0; g < G; ++g) {
      acc_t s = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) s += sums[c];
      const acc_t mean = s / count;
      std::fill(means + g * Cg, means + (g + 1) * Cg, mean);
      out[g] = {count, mean, acc_t(0)};
    }
    channel_sums(base, np, sums, [&](Vec v, int64_t c, int64_t lanes) FPM_LAMBDA_INLINE {
      const Vec d = first_lanes(v - Vec::loadu(means + c), lanes);
      return d * d;
    });
    for (int64_t g = 0; g < G; ++g) {
      acc_t m2 = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) m2 += sums[c];
      out[g].m2 = m2;
    }
  }

  template <typename acc_t>
  void merge(int64_t n, const WelfordData<acc_t>* partial, WelfordData<acc_t>* out) const {
    for (int64_t g = 0; g < G; ++g) out[g] = merge_in_order(partial + n * blocks * G + g, blocks, G);
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

// y's own statistics, for a consumer that normalizes y next (the block's Norm2), gathered
// as y is written: per work item the count and the sums of d = y - shift_n and of d^2, where
// shift_n (sum over c of res_c * mean_nc, over C) is y's mean but for the small mixer term, so
// the sums stay small where |mean| >> std.  Merged per sample in item order (deterministic).
template <typename acc_t>
struct OutputSums {
  acc_t* shift = nullptr;  // (N,)
  acc_t* count = nullptr;  // (items,)
  acc_t* sum = nullptr;    // (items,)
  acc_t* sq = nullptr;     // (items,)

  template <typename WS>
  void take(WS& ws, int64_t N, int64_t items) {
    shift = ws.template take<acc_t>(N);
    count = ws.template take<acc_t>(items);
    sum = ws.template take<acc_t>(items);
    sq = ws.template take<acc_t>(items);
  }
};

// One work item's running sums (in registers), written out at the item's end.
template <typename acc_t, bool kEnabled>
struct ItemSums {
  using Vec = Vectorized<acc_t>;
  Vec sum = Vec(acc_t(0)), sq = Vec(acc_t(0)), shift;
  int64_t count = 0;

  explicit ItemSums(acc_t shift_value) : shift(shift_value) {}

  FPM_INLINE void add(Vec y, int64_t lanes) {
    if constexpr (kEnabled) {
      Vec d = y - shift;
      if (lanes < kLanes<acc_t>) d = Vec::set(Vec(acc_t(0)), d, lanes);
      sum = sum + d;
      sq = at::vec::fmadd(d, d, sq);
      count += lanes;
    }
  }

  void write(const OutputSums<acc_t>& out, int64_t item) const {
    if constexpr (kEnabled) {
      out.count[item] = static_cast<acc_t>(count);
      out.sum[item] = at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, sum);
      out.sq[item] = at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, sq);
    }
  }
};

template <typename scalar_t, typename acc_t, bool kSums>
struct ApplyPass {
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t V = kLanes<acc_t>;
  const WorkSplit<acc_t>& g;
  const scalar_t* x;
  scalar_t* y;
  const Factors<acc_t>& f;
  bool streaming;
  OutputSums<acc_t> sums;

  acc_t shift(int64_t n) const { return kSums ? sums.shift[n] : acc_t(0); }

  template <int R>
  void strip(int64_t item, Vec* col) const {
    const bool stream = streaming;
    const StripTask st = strip_task(g, item);
    const int64_t C = g.C, W = g.W;
    const acc_t* inv_h = g.inv_h;
    const acc_t* inv_w = g.inv_w;
    with_strip_shape<acc_t>(st, [&](auto nv_const, auto lanes) FPM_LAMBDA_INLINE {
      constexpr int NV = decltype(nv_const)::value;
      const scalar_t* xp = x + st.offset;
      scalar_t* yp = y + st.offset;
      ItemSums<acc_t, kSums> item_sums(shift(st.n));
      Vec mean[NV], coef[NV], res[NV];
      unrolled<NV>([&](auto k) FPM_LAMBDA_INLINE {
        mean[k] = load<acc_t>(f.mean + st.n * C + st.c0 + k * V, lanes(k));
        coef[k] = load<acc_t>(f.coef + st.n * C + st.c0 + k * V, lanes(k));
        res[k] = load<acc_t>(f.res + st.c0 + k * V, lanes(k));
      });
      auto source = [&](int64_t hh) FPM_LAMBDA_INLINE {
        return [&, p = xp + hh * W * C](int64_t w, auto k) FPM_LAMBDA_INLINE {
          return load<acc_t>(p + w * C + k * V, lanes(k)) - mean[k];
        };
      };
      auto column = [](Vec v, int64_t) FPM_LAMBDA_INLINE { return v; };
      auto emit = [&](int64_t h, int64_t w, const Vec* box) FPM_LAMBDA_INLINE {
        // The row the next output row adds to its window.
        prefetch_strip_line(g, xp, h + g.rh + 1, w, NV * V);
        const Vec inv(inv_h[h] * inv_w[w]);
        unrolled<NV>([&](auto k) FPM_LAMBDA_INLINE {
          const int64_t o = (h * W + w) * C + k * V;
          const Vec xv = load<acc_t>(xp + o, lanes(k));
          const Vec out = mixer_output(res[k], coef[k], xv, xv - mean[k], box[k] * inv);
          store_output(yp + o, out, lanes(k), stream);
          item_sums.add(out, lanes(k));
        });
      };
      strip_box_sums<R, NV>(g, st.h_begin, st.h_end, col, source, column, emit);
      item_sums.write(sums, item);
    });
  }

  template <int R>
  void plane(int64_t plane, const PlaneScratch<acc_t>& s) const {
    const bool stream = streaming;
    const int64_t HW = g.plane_numel();
    const scalar_t* xp = x + plane * HW;
    scalar_t* yp = y + plane * HW;
    const Vec mean(f.mean[plane]), coef(f.coef[plane]), res(f.res[plane % g.C]);
    ItemSums<acc_t, kSums> item_sums(shift(plane / g.C));
    auto source = [&](int64_t i, int64_t n) FPM_LAMBDA_INLINE {
      return first_lanes(load<acc_t>(xp + i, n) - mean, n);
    };
    auto emit = [&](int64_t i, int64_t n, Vec box) FPM_LAMBDA_INLINE {
      const Vec pooled = box * Vec::loadu(g.inv_cnt + i);
      const Vec out = mixer_output(res, coef, load<acc_t>(xp + i, n), Vec::loadu(s.xs + i), pooled);
      store_output(yp + i, out, n, stream);
      item_sums.add(out, n);
    };
    plane_box_sums<R>(g, s, source, emit);
    item_sums.write(sums, plane);
  }

  template <int R>
  void row(int64_t item, acc_t* col) const {
    const bool stream = streaming;
    const RowTask r = row_task(g, item);
    const acc_t* inv_h = g.inv_h;
    const acc_t* inv_w = g.inv_w;
    const int64_t HW = g.plane_numel(), W = g.W;
    const scalar_t* xp = x + r.plane * HW;
    scalar_t* yp = y + r.plane * HW;
    const Vec mean(f.mean[r.plane]), coef(f.coef[r.plane]), res(f.res[r.plane % g.C]);
    ItemSums<acc_t, kSums> item_sums(shift(r.plane / g.C));
    auto source = [&](int64_t hh) FPM_LAMBDA_INLINE {
      return [&, p = xp + hh * W](int64_t w, int64_t n) FPM_LAMBDA_INLINE {
        return load<acc_t>(p + w, n) - mean;
      };
    };
    auto column = [](Vec v, int64_t, int64_t) FPM_LAMBDA_INLINE { return v; };
    auto emit = [&](int64_t h, const auto& box) FPM_LAMBDA_INLINE {
      const Vec row_scale(inv_h[h]);
      for (int64_t w = 0; w < W; w += V) {
        const int64_t n = std::min(V, W - w);
        const Vec xv = load<acc_t>(xp + h * W + w, n);
        const Vec pooled = box(w) * row_scale * load<acc_t>(inv_w + w, n);
        const Vec out = mixer_output(res, coef, xv, xv - mean, pooled);
        store_output(yp + h * W + w, out, n, stream);
        item_sums.add(out, n);
      }
    };
    row_box_sums<R>(g, r.h_begin, r.h_end, col, source, column, emit);
    item_sums.write(sums, item);
  }
};

// ---------------------------------------------------------------------------------------
// The launcher.

// y's per-sample (mean, rstd) from the item sums of sample n, merged in item order.
template <typename acc_t>
void finish_output_sums(const OutputSums<acc_t>& sums, int64_t n, int64_t items_per_sample,
                        acc_t eps, acc_t* mean, acc_t* rstd) {
  WelfordData<acc_t> merged{0, 0, 0};
  for (int64_t i = n * items_per_sample; i < (n + 1) * items_per_sample; ++i) {
    const acc_t count = sums.count[i];
    if (count == acc_t(0)) continue;
    const acc_t d = sums.sum[i] / count;
    const WelfordData<acc_t> item{count, sums.shift[n] + d, std::max(acc_t(0), sums.sq[i] - sums.sum[i] * d)};
    merged = welford_merge(merged, item);
  }
  mean[n] = merged.mean;
  rstd[n] = welford_rstd(merged, eps);
}

// shift_n = sum over c of res_c * mean_nc / C: y's mean but for the mixer term.
template <typename acc_t>
acc_t output_shift(const Factors<acc_t>& f, const MixerShape& s, int64_t n) {
  acc_t total = 0;
  for (int64_t c = 0; c < s.C; ++c) total += f.res[c] * f.mean[n * s.C + c];
  return s.C > 0 ? total / static_cast<acc_t>(s.C) : acc_t(0);
}

template <typename scalar_t, bool kSums, typename Stats>
void forward_with(const ForwardProblem& p, const Stats& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const MixerShape& s = p.shape;
  const scalar_t* x = p.x.const_data_ptr<scalar_t>();
  scalar_t* y = p.y.mutable_data_ptr<scalar_t>();
  acc_t* mean = p.mean.mutable_data_ptr<acc_t>();
  acc_t* rstd = p.rstd.mutable_data_ptr<acc_t>();
  WorkSplit<acc_t> g = make_work_split<acc_t>(s, s.C * s.H * s.W * int64_t(sizeof(scalar_t)));
  const int64_t stats_tasks = s.N * stats.tasks_per_sample();

  Workspace ws;
  Factors<acc_t> f;
  WelfordData<acc_t>* partial = nullptr;
  WelfordData<acc_t>* merged = nullptr;
  OutputSums<acc_t> sums;
  ws.fit([&](Workspace& a) {
    take_tables(g, a);
    f.take(a, s);
    partial = a.take<WelfordData<acc_t>>(stats_tasks * s.G);
    merged = a.take<WelfordData<acc_t>>(s.G);
    if (kSums) sums.take(a, s.N, g.items());
  });
  fill_channel_factors<scalar_t>(f, s, p.params);

  const int64_t run = s.channels_last ? s.C : (g.traversal == Traversal::kPlanes ? s.H * s.W : s.W);
  const ApplyPass<scalar_t, acc_t, kSums> apply{g, x, y, f, can_stream<scalar_t, acc_t>(y, run), sums};
  acc_t* y_mean = kSums ? p.y_mean->template mutable_data_ptr<acc_t>() : nullptr;
  acc_t* y_rstd = kSums ? p.y_rstd->template mutable_data_ptr<acc_t>() : nullptr;
  const acc_t y_eps = static_cast<acc_t>(p.y_eps);
  // Statistics of sample n from its partials, then its factors.
  auto finish_sample = [&](int64_t n, WelfordData<acc_t>* out) {
    stats.merge(n, partial, out);
    for (int64_t i = 0; i < s.G; ++i) {
      mean[n * s.G + i] = out[i].mean;
      rstd[n * s.G + i] = welford_rstd(out[i], static_cast<acc_t>(p.eps));
    }
    fill_sample_factors(f, s, n, p.params.sample_factor<scalar_t, acc_t>(n), mean, rstd);
    if (kSums) sums.shift[n] = output_shift(f, s, n);
  };

  if (g.fused) {
    at::parallel_for(0, s.N, grain_size(g.sample_numel()), [&](int64_t begin, int64_t end) {
      Scratch scratch;
      acc_t* stats_scratch = nullptr;
      WelfordData<acc_t>* out = nullptr;
      TraversalScratch<acc_t> buffers;
      scratch.fit([&](Scratch& a) {
        stats_scratch = a.take<acc_t>(stats.scratch_elements());
        out = a.take<WelfordData<acc_t>>(s.G);
        buffers = take_traversal_scratch(g, a);
      });
      for (int64_t n = begin; n < end; ++n) {
        const int64_t t0 = n * stats.tasks_per_sample();
        for (int64_t t = t0; t < t0 + stats.tasks_per_sample(); ++t) {
          stats.task(x, t, partial, stats_scratch);
        }
        finish_sample(n, out);
        run_items(apply, g, n * g.items_per_sample, (n + 1) * g.items_per_sample, buffers);
        if (kSums) finish_output_sums(sums, n, g.items_per_sample, y_eps, y_mean, y_rstd);
      }
      output_fence();
    });
    return;
  }
  at::parallel_for(0, stats_tasks, grain_size(stats.task_elements()), [&](int64_t begin, int64_t end) {
    Scratch scratch;
    acc_t* stats_scratch = nullptr;
    scratch.fit([&](Scratch& a) { stats_scratch = a.take<acc_t>(stats.scratch_elements()); });
    for (int64_t t = begin; t < end; ++t) stats.task(x, t, partial, stats_scratch);
  });
  for (int64_t n = 0; n < s.N; ++n) finish_sample(n, merged);
  run_tasks(g, apply);
  if (kSums) {
    for (int64_t n = 0; n < s.N; ++n) finish_output_sums(sums, n, g.items_per_sample, y_eps, y_mean, y_rstd);
  }
}

template <typename scalar_t, bool kSums>
void forward_kernel(const ForwardProblem& p) {
  if (p.shape.channels_last) {
    forward_with<scalar_t, kSums>(p, ChannelsLastStats(p.shape));
  } else {
    forward_with<scalar_t, kSums>(p, ContiguousStats(p.shape));
  }
}

}  // namespace

void launch_forward(const ForwardProblem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(),
                                  "pool_mixer_forward_cpu", [&] {
                                    if (p.y_mean != nullptr) {
                                      forward_kernel<scalar_t, true>(p);
                                    } else {
                                      forward_kernel<scalar_t, false>(p);
                                    }
                                  });
}

}  // namespace cpu
}  // namespace fused_poolformer

// CPU kernels of the fused pool mixer (DESIGN.md section 2).
//
// Both layouts share one traversal.  A "plane" is H rows of L = W * S values, where S is
// the distance between horizontally adjacent elements: S = 1 for NCHW (a plane is one
// (n, c) image), S = C for channels_last (a plane is one sample, channels interleaved).
// Rows are read once, in memory order, into a ring buffer of the k rows a window needs,
// and the k x k box sum is a vertical sum of ring rows followed by a horizontal sum of
// shifted copies -- the separable pool.  Every row loop is an at::vec loop along memory,
// so NCHW vectorizes along W and channels_last along C.
//
// Work is split into (plane, row-chunk) tasks whose partition depends on the shape only,
// and every reduction writes one partial per task that is merged in a fixed order: the
// results are bitwise identical for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../pool_mixer.h"
#include "../pool_mixer_host.h"

namespace fused_poolformer {
namespace {

using at::vec::Vectorized;

// ---------------------------------------------------------------------------------------
// Vector helpers.  `n` is the number of valid lanes (the tail of a row); lanes past it are
// zero on load and not written on store.

template <typename acc_t>
constexpr int64_t kLanes = Vectorized<acc_t>::size();

template <typename acc_t, typename scalar_t>
inline Vectorized<acc_t> load(const scalar_t* p, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return n == kLanes<acc_t> ? Vectorized<acc_t>::loadu(p) : Vectorized<acc_t>::loadu(p, n);
  } else {
    alignas(64) acc_t tmp[kLanes<acc_t>] = {};
    for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<acc_t>(p[i]);
    return Vectorized<acc_t>::loadu(tmp);
  }
}

template <typename scalar_t, typename acc_t>
inline void store(scalar_t* p, Vectorized<acc_t> v, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    // (No masked store: vmaskmov stores are microcoded and slow on some x86 cores.)
    n == kLanes<acc_t> ? v.store(p) : v.store(p, static_cast<int>(n));
  } else {
    alignas(64) acc_t tmp[kLanes<acc_t>];
    v.store(tmp);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(tmp[i]);
  }
}

// Stores a chunk of an output tensor (y, dx).  Outputs are written once and not read
// back, so full aligned float chunks bypass the cache (non-temporal stores): that saves
// the read-for-ownership of every output line, a third of the forward's memory traffic.
// Call output_fence() before the written memory is handed to another thread.
// `streaming` must be decided per tensor (Geometry::stream_outputs): a cache line written
// partly by non-temporal and partly by ordinary stores is far slower than either.
template <typename scalar_t, typename acc_t>
inline void store_output(scalar_t* p, Vectorized<acc_t> v, int64_t n, bool streaming) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    // With whole-vector rows, all chunks of an output share the base's alignment.
    if (streaming && (reinterpret_cast<uintptr_t>(p) & 31) == 0) {
      _mm256_stream_ps(p, __m256(v));
      return;
    }
  }
#endif
  store(p, v, n);
}

inline void output_fence() {
#if defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Keep the first n lanes of v, zero the rest (so a NaN never leaks from padding lanes).
template <typename acc_t>
inline Vectorized<acc_t> first_lanes(Vectorized<acc_t> v, int64_t n) {
  return n == kLanes<acc_t> ? v : Vectorized<acc_t>::set(Vectorized<acc_t>(acc_t(0)), v, n);
}

// Sum of the lanes in a fixed order (deterministic).
template <typename acc_t>
inline acc_t lane_sum(Vectorized<acc_t> v) {
  alignas(64) acc_t tmp[kLanes<acc_t>];
  v.store(tmp);
  acc_t s = 0;
  for (int64_t i = 0; i < kLanes<acc_t>; ++i) s += tmp[i];
  return s;
}

// ---------------------------------------------------------------------------------------
// Problem geometry.

template <typename acc_t>
struct Geometry {
  int64_t N, C, H, W, G, radius;
  bool channels_last;
  int64_t S, L, planes, chunks, rows_per_chunk;
  std::vector<acc_t> inv_h, inv_w;  // 1 / valid-tap count along each axis
  bool stream_outputs;  // every output chunk is a full, 32-byte aligned float vector

  int64_t tasks() const { return planes * chunks; }
  int64_t plane_numel() const { return H * L; }
};

template <typename acc_t>
Geometry<acc_t> make_geometry(const at::Tensor& x, int64_t num_groups, int64_t pool_size,
                              Layout layout) {
  Geometry<acc_t> g;
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.G = num_groups;
  g.radius = pool_size / 2;
  g.channels_last = layout == Layout::kChannelsLast;
  g.S = g.channels_last ? g.C : 1;
  g.L = g.W * g.S;
  g.planes = g.channels_last ? g.N : g.N * g.C;
  // Enough tasks to keep every thread busy at batch 1; the split depends on the shape
  // alone so that reductions do not depend on the thread count.
  constexpr int64_t kTargetTasks = 64;
  const int64_t want = (kTargetTasks + std::max<int64_t>(g.planes, 1) - 1) /
                       std::max<int64_t>(g.planes, 1);
  const int64_t chunks = std::clamp<int64_t>(want, 1, std::max<int64_t>(g.H, 1));
  g.rows_per_chunk = (g.H + chunks - 1) / chunks;
  g.chunks = g.H > 0 ? (g.H + g.rows_per_chunk - 1) / g.rows_per_chunk : 1;
  // Rows of whole vectors: every output store is a full vector, so a float output can
  // bypass the cache (store_output) without mixing store kinds within a line.
  g.stream_outputs = x.scalar_type() == at::kFloat && g.L % kLanes<acc_t> == 0;
  g.inv_h.resize(g.H);
  g.inv_w.resize(g.W);
  for (int64_t h = 0; h < g.H; ++h) g.inv_h[h] = acc_t(1) / acc_t(window_count(h, g.radius, g.H));
  for (int64_t w = 0; w < g.W; ++w) g.inv_w[w] = acc_t(1) / acc_t(window_count(w, g.radius, g.W));
  return g;
}

// Per-element loops over one row.  In NCHW the per-channel factors of a plane are scalars
// and the per-position factor (1/cnt_w) is a vector along W; in channels_last it is the
// other way round.  `f(offset, lanes, c, w)` gets the row offset of a chunk of `lanes`
// elements that share position w (channels_last) or channel c (NCHW).
template <bool kCL, typename acc_t, typename F>
inline void for_each_chunk(const Geometry<acc_t>& g, F f) {
  constexpr int64_t V = kLanes<acc_t>;
  if constexpr (kCL) {
    for (int64_t w = 0; w < g.W; ++w)
      for (int64_t c = 0; c < g.C; c += V) f(w * g.C + c, std::min(V, g.C - c), c, w);
  } else {
    for (int64_t w = 0; w < g.W; w += V) f(w, std::min(V, g.W - w), int64_t(0), w);
  }
}

// A per-channel factor: a vector over C in channels_last, a broadcast scalar in NCHW
// (`p` then points at this plane's value).
template <bool kCL, typename acc_t>
inline Vectorized<acc_t> per_channel(const acc_t* p, int64_t c, int64_t lanes) {
  if constexpr (kCL) return load<acc_t>(p + c, lanes);
  else return Vectorized<acc_t>(*p);
}

// 1 / cnt_w at the chunk's positions.
template <bool kCL, typename acc_t>
inline Vectorized<acc_t> per_position(const Geometry<acc_t>& g, int64_t w, int64_t lanes) {
  if constexpr (kCL) return Vectorized<acc_t>(g.inv_w[w]);
  else return load<acc_t>(g.inv_w.data() + w, lanes);
}

// ---------------------------------------------------------------------------------------
// The separable box sum over a range of rows of one plane.

template <typename acc_t>
struct RowScratch {
  int64_t rw, S;
  std::vector<acc_t> col;  // column sums of one output row, with rw * S zeros on each side

  explicit RowScratch(const Geometry<acc_t>& g)
      : rw(effective_radius(g.radius, g.W)), S(g.S), col(g.L + 2 * rw * g.S, acc_t(0)) {}
  acc_t* row() { return col.data() + rw * S; }
};

// The horizontal half of the box sum: the sum of the column sums at the taps around `o`
// (zeros past the border, which count_include_pad=False leaves out of the count).
template <typename acc_t>
struct HorizontalSum {
  const acc_t* col;
  int64_t rw, S;
  Vectorized<acc_t> operator()(int64_t o, int64_t lanes) const {
    Vectorized<acc_t> s = load<acc_t>(col + o - rw * S, lanes);
    for (int64_t d = -rw + 1; d <= rw; ++d) s += load<acc_t>(col + o + d * S, lanes);
    return s;
  }
};

// No scaling of the column sums.
struct Unscaled {
  template <typename Vec>
  Vec operator()(Vec v, int64_t, int64_t) const {
    return v;
  }
};

// For each row h in [h_begin, h_end): the vertical sums over the window's rows of
// `source(row, offset, lanes, c, w)` -- read straight from memory, where the rows of a
// window are cache-resident -- times `scale(sum, lanes, w)` (a factor shared by a column),
// then `emit(h, box)` with the horizontal sum as `box`.
template <bool kCL, typename acc_t, typename Source, typename Emit, typename Scale = Unscaled>
void box_sum_rows(const Geometry<acc_t>& g, int64_t h_begin, int64_t h_end, RowScratch<acc_t>& s,
                  Source source, Emit emit, Scale scale = {}) {
  const int64_t rh = effective_radius(g.radius, g.H);
  acc_t* col = s.row();
  for (int64_t h = h_begin; h < h_end; ++h) {
    const int64_t hb = window_begin(h, rh), he = window_end(h, rh, g.H);
    for_each_chunk<kCL>(g, [&](int64_t o, int64_t lanes, int64_t c, int64_t w) {
      Vectorized<acc_t> v = source(hb, o, lanes, c, w);
      for (int64_t hh = hb + 1; hh <= he; ++hh) v += source(hh, o, lanes, c, w);
      store(col + o, scale(v, lanes, w), lanes);
    });
    emit(h, HorizontalSum<acc_t>{col, s.rw, s.S});
  }
}

// Runs `body(plane, chunk, h_begin, h_end, scratch)` over every task, in parallel.
template <typename acc_t, typename Body>
void for_each_task(const Geometry<acc_t>& g, Body body) {
  at::parallel_for(0, g.tasks(), 1, [&](int64_t begin, int64_t end) {
    RowScratch<acc_t> scratch(g);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t plane = t / g.chunks, chunk = t % g.chunks;
      const int64_t h_begin = chunk * g.rows_per_chunk;
      const int64_t h_end = std::min(g.H, h_begin + g.rows_per_chunk);
      body(plane, chunk, h_begin, h_end, scratch);
    }
    output_fence();
  });
}

// Offset of a plane's per-(n, c) factors in an (N, C) table: the plane's own entry in
// NCHW, the sample's row in channels_last.
template <typename acc_t>
inline int64_t plane_factor_offset(const Geometry<acc_t>& g, int64_t plane) {
  return g.channels_last ? plane * g.C : plane;
}
template <typename acc_t>
inline int64_t plane_channel(const Geometry<acc_t>& g, int64_t plane) {
  return g.channels_last ? 0 : plane % g.C;
}

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
  at::parallel_for(0, N * G * blocks, 1, [&](int64_t begin, int64_t end) {
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
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
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
void forward_apply(const Geometry<acc_t>& g, const scalar_t* x, scalar_t* y, const acc_t* shift_nc,
                   const acc_t* coef_nc, const acc_t* res_c) {
  using Vec = Vectorized<acc_t>;
  for_each_task(g, [&](int64_t plane, int64_t, int64_t h_begin, int64_t h_end,
                       RowScratch<acc_t>& scratch) {
    const scalar_t* xp = x + plane * g.plane_numel();
    scalar_t* yp = y + plane * g.plane_numel();
    const acc_t* shift = shift_nc + plane_factor_offset(g, plane);
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

// ---------------------------------------------------------------------------------------
// Backward, pass 1: per task, the sums of D * dy and x * dy for every channel it touches.
// NCHW tasks keep one vector of lanes (one channel), channels_last tasks one value per
// channel; `accumulator_width` says which.

template <typename acc_t>
inline int64_t accumulator_width(const Geometry<acc_t>& g) {
  return g.channels_last ? g.C : kLanes<acc_t>;
}

template <typename scalar_t, typename acc_t, bool kCL>
void backward_sums(const Geometry<acc_t>& g, const scalar_t* x, const scalar_t* dy,
                   const acc_t* shift_nc, acc_t* partial_d, acc_t* partial_x) {
  using Vec = Vectorized<acc_t>;
  const int64_t width = accumulator_width(g);
  for_each_task(g, [&](int64_t plane, int64_t chunk, int64_t h_begin, int64_t h_end,
                       RowScratch<acc_t>& scratch) {
    const scalar_t* xp = x + plane * g.plane_numel();
    const scalar_t* dyp = dy + plane * g.plane_numel();
    const acc_t* shift = shift_nc + plane_factor_offset(g, plane);
    acc_t* acc_d = partial_d + (plane * g.chunks + chunk) * width;
    acc_t* acc_x = partial_x + (plane * g.chunks + chunk) * width;
    std::fill(acc_d, acc_d + width, acc_t(0));
    std::fill(acc_x, acc_x + width, acc_t(0));
    auto centered = [&](int64_t h, int64_t o, int64_t lanes, int64_t c, int64_t) {
      return load<acc_t>(xp + h * g.L + o, lanes) - per_channel<kCL>(shift, c, lanes);
    };
    auto emit = [&](int64_t h, const HorizontalSum<acc_t>& box) {
      const Vec inv_h(g.inv_h[h]);
      // NCHW: one channel per plane, so the row's sums stay in registers.
      Vec row_d(acc_t(0)), row_x(acc_t(0));
      for_each_chunk<kCL>(g, [&](int64_t o, int64_t lanes, int64_t c, int64_t w) {
        const Vec xv = load<acc_t>(xp + h * g.L + o, lanes);
        const Vec grad = load<acc_t>(dyp + h * g.L + o, lanes);
        const Vec d = box(o, lanes) * inv_h * per_position<kCL>(g, w, lanes) -
                      (xv - per_channel<kCL>(shift, c, lanes));
        const Vec dd = first_lanes(d * grad, lanes), xd = first_lanes(xv * grad, lanes);
        if constexpr (kCL) {
          store(acc_d + c, load<acc_t>(acc_d + c, lanes) + dd, lanes);
          store(acc_x + c, load<acc_t>(acc_x + c, lanes) + xd, lanes);
        } else {
          row_d += dd;
          row_x += xd;
        }
      });
      if constexpr (!kCL) {
        store(acc_d, load<acc_t>(acc_d, kLanes<acc_t>) + row_d, kLanes<acc_t>);
        store(acc_x, load<acc_t>(acc_x, kLanes<acc_t>) + row_x, kLanes<acc_t>);
      }
    };
    box_sum_rows<kCL>(g, h_begin, h_end, scratch, centered, emit);
  });
}

// Folds the task partials into per-(n, c) sums, in a fixed order.
template <typename acc_t>
std::vector<acc_t> per_channel_sums(const Geometry<acc_t>& g, const std::vector<acc_t>& partial) {
  const int64_t width = accumulator_width(g);
  std::vector<acc_t> out(g.N * g.C, acc_t(0));
  for (int64_t plane = 0; plane < g.planes; ++plane) {
    for (int64_t chunk = 0; chunk < g.chunks; ++chunk) {
      const acc_t* p = partial.data() + (plane * g.chunks + chunk) * width;
      if (g.channels_last) {
        for (int64_t c = 0; c < g.C; ++c) out[plane * g.C + c] += p[c];
      } else {
        acc_t s = 0;
        for (int64_t i = 0; i < width; ++i) s += p[i];
        out[plane] += s;
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Backward, pass 2: dx = res * dy + coef * (P^T dy - dy) - corr * (x - mean), where
// P^T dy is the box sum of dy / cnt (the adjoint of the pool) and corr = rstd^3 / M * S.

template <typename scalar_t, typename acc_t, bool kCL>
void backward_dx(const Geometry<acc_t>& g, const scalar_t* x, const scalar_t* dy, scalar_t* dx,
                 const acc_t* shift_nc, const acc_t* coef_nc, const acc_t* corr_nc,
                 const acc_t* res_c) {
  using Vec = Vectorized<acc_t>;
  for_each_task(g, [&](int64_t plane, int64_t, int64_t h_begin, int64_t h_end,
                       RowScratch<acc_t>& scratch) {
    const int64_t offset = plane * g.plane_numel();
    const int64_t f = plane_factor_offset(g, plane);
    const acc_t* res = res_c + plane_channel(g, plane);
    // The adjoint of the pool spreads dy / cnt over the window: box sums of dy / cnt, with
    // cnt = cnt_h * cnt_w.  1/cnt_h goes in per row; 1/cnt_w is shared by a column, so it
    // scales the column sum once.
    auto spread = [&](int64_t h, int64_t o, int64_t lanes, int64_t, int64_t) {
      return load<acc_t>(dy + offset + h * g.L + o, lanes) * Vec(g.inv_h[h]);
    };
    auto per_column = [&](Vec v, int64_t lanes, int64_t w) {
      return v * per_position<kCL>(g, w, lanes);
    };
    auto emit = [&](int64_t h, const HorizontalSum<acc_t>& box) {
      for_each_chunk<kCL>(g, [&](int64_t o, int64_t lanes, int64_t c, int64_t) {
        const int64_t at = offset + h * g.L + o;
        const Vec grad = load<acc_t>(dy + at, lanes);
        const Vec xc = load<acc_t>(x + at, lanes) - per_channel<kCL>(shift_nc + f, c, lanes);
        const Vec out = per_channel<kCL>(res, c, lanes) * grad +
                        per_channel<kCL>(coef_nc + f, c, lanes) * (box(o, lanes) - grad) -
                        per_channel<kCL>(corr_nc + f, c, lanes) * xc;
        store_output(dx + at, out, lanes, g.stream_outputs);
      });
    };
    box_sum_rows<kCL>(g, h_begin, h_end, scratch, spread, emit, per_column);
  });
}

// ---------------------------------------------------------------------------------------
// Operator entry points.

// (N, G) -> (N, C): each channel gets its group's value.
at::Tensor per_channel_table(const at::Tensor& per_group, int64_t C) {
  return per_group.repeat_interleave(C / per_group.size(1), 1).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_mixer_forward_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& layer_scale,
    const std::optional<at::Tensor>& res_scale, const std::optional<at::Tensor>& sample_scale,
    int64_t num_groups, int64_t pool_size, double eps) {
  check_forward_args(x_in, weight, bias, layer_scale, res_scale, sample_scale, num_groups,
                     pool_size, eps);
  TORCH_CHECK(x_in.device().is_cpu(), "pool_mixer_forward (CPU kernel): x must be on the CPU");
  const Layout layout = choose_layout(x_in);
  const at::Tensor x = in_layout(x_in, layout);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t G = num_groups, Cg = C / G;
  auto y = at::empty_like(x, memory_format(layout));
  const auto stat_opts = x.options().dtype(accumulate_type(x.scalar_type()));
  auto mean = at::zeros({N, G}, stat_opts);
  auto rstd = at::full({N, G}, 1.0 / std::sqrt(eps), stat_opts);
  if (x.numel() == 0) return {y, mean, rstd};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_mixer_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto g = make_geometry<acc_t>(x, G, pool_size, layout);
    std::vector<WelfordData<acc_t>> stats(N * G);
    if (g.channels_last) {
      stats_channels_last<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), N, C, G, H * W, stats);
    } else {
      stats_contiguous<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), N, G, Cg * H * W, stats);
    }
    auto* mean_p = mean.mutable_data_ptr<acc_t>();
    auto* rstd_p = rstd.mutable_data_ptr<acc_t>();
    for (int64_t i = 0; i < N * G; ++i) {
      mean_p[i] = stats[i].mean;
      rstd_p[i] = welford_rstd(stats[i], static_cast<acc_t>(eps));
    }
    const auto shift = per_channel_table(mean, C);
    const auto coef = (mixer_coefficients(x, weight, layer_scale, sample_scale) *
                       per_channel_table(rstd, C)).contiguous();
    const auto res = vector_or_ones(res_scale, C, x);
    auto run = [&](auto channels_last) {
      forward_apply<scalar_t, acc_t, decltype(channels_last)::value>(
          g, x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
          shift.const_data_ptr<acc_t>(), coef.const_data_ptr<acc_t>(), res.const_data_ptr<acc_t>());
    };
    g.channels_last ? run(std::true_type{}) : run(std::false_type{});
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pool_mixer_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& layer_scale, const std::optional<at::Tensor>& res_scale,
    const std::optional<at::Tensor>& sample_scale, int64_t num_groups, int64_t pool_size,
    std::array<bool, 4> output_mask) {
  check_backward_args(grad_y, x_in, mean, rstd, weight, layer_scale, res_scale, sample_scale,
                      num_groups, pool_size);
  TORCH_CHECK(x_in.device().is_cpu(), "pool_mixer_backward (CPU kernel): x must be on the CPU");
  const Layout layout = choose_layout(x_in);
  const at::Tensor x = in_layout(x_in, layout);
  const at::Tensor dy = in_layout(grad_y, layout);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t G = num_groups, Cg = C / G;
  const auto acc_opts = x.options().dtype(accumulate_type(x.scalar_type()));
  at::Tensor dx = output_mask[0] ? at::empty_like(x, memory_format(layout)) : empty_gradient(x);
  // T[c] = sum_n rstd * sample_scale * sum(D * dy) and sum(x * dy) per channel, and
  // S[n, g] of DESIGN.md section 2.
  at::Tensor channel_t = at::zeros({C}, acc_opts), channel_xdy = at::zeros({C}, acc_opts);
  at::Tensor group_s = at::zeros({N, G}, acc_opts);
  const at::Tensor rstd_contig = rstd.contiguous();
  const at::Tensor sample = vector_or_ones(sample_scale, N, x);

  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_mixer_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto g = make_geometry<acc_t>(x, G, pool_size, layout);
      const auto shift = per_channel_table(mean.contiguous(), C);
      const auto a = mixer_coefficients(x, weight, layer_scale, sample_scale);
      std::vector<acc_t> partial_d(g.tasks() * accumulator_width(g));
      std::vector<acc_t> partial_x(partial_d.size());
      auto sums = [&](auto channels_last) {
        backward_sums<scalar_t, acc_t, decltype(channels_last)::value>(
            g, x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
            shift.const_data_ptr<acc_t>(), partial_d.data(), partial_x.data());
      };
      g.channels_last ? sums(std::true_type{}) : sums(std::false_type{});
      const auto d = per_channel_sums(g, partial_d), xs = per_channel_sums(g, partial_x);
      // Sums over channels and samples, in a fixed order.
      const acc_t* a_p = a.const_data_ptr<acc_t>();
      const acc_t* r_p = rstd_contig.const_data_ptr<acc_t>();
      const acc_t* ss_p = sample.const_data_ptr<acc_t>();
      acc_t* s_p = group_s.mutable_data_ptr<acc_t>();
      acc_t* t_p = channel_t.mutable_data_ptr<acc_t>();
      acc_t* xs_p = channel_xdy.mutable_data_ptr<acc_t>();
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t nc = n * C + c, ng = n * G + c / Cg;
          s_p[ng] += a_p[nc] * d[nc];
          t_p[c] += r_p[ng] * ss_p[n] * d[nc];
          xs_p[c] += xs[nc];
        }
      }
      if (output_mask[0]) {
        const auto rstd_nc = per_channel_table(rstd_contig, C);
        const auto coef = (a * rstd_nc).contiguous();
        const auto corr = (rstd_nc.pow(3) * per_channel_table(group_s, C) /
                           static_cast<double>(Cg * H * W)).contiguous();
        const auto res = vector_or_ones(res_scale, C, x);
        auto run = [&](auto channels_last) {
          backward_dx<scalar_t, acc_t, decltype(channels_last)::value>(
              g, x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
              dx.mutable_data_ptr<scalar_t>(), shift.const_data_ptr<acc_t>(),
              coef.const_data_ptr<acc_t>(), corr.const_data_ptr<acc_t>(),
              res.const_data_ptr<acc_t>());
        };
        g.channels_last ? run(std::true_type{}) : run(std::false_type{});
      }
    });
  }
  return parameter_gradients(dx, x, channel_t, channel_xdy, weight, layer_scale, res_scale,
                             output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_poolformer, CPU, m) {
  m.impl("pool_mixer_forward", &pool_mixer_forward_cpu);
  m.impl("pool_mixer_backward", &pool_mixer_backward_cpu);
}

}  // namespace fused_poolformer

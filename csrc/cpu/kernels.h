// CPU kernel helpers shared by csrc/cpu/forward.cpp and backward.cpp.
//
// Both layouts share one traversal.  A "plane" is H rows of L = W * S values, where S is
// the distance between horizontally adjacent elements: S = 1 for NCHW (a plane is one
// (n, c) image), S = C for channels_last (a plane is one sample, channels interleaved).
// The k x k box sum is separable: for each output row, the vertical sums over the
// window's rows (read straight from memory, where a window's rows are cache-resident),
// then the horizontal sum of shifted copies of those column sums.  Every row loop is an
// at::vec loop along memory, so NCHW vectorizes along W and channels_last along C.
//
// Work is split into (plane, row-chunk) tasks whose partition depends on the shape only,
// and every reduction writes one partial per task that is merged in a fixed order: the
// results are bitwise identical for any number of threads.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../host.h"
#include "../pool_mixer.h"

namespace fused_poolformer {
namespace cpu {

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

// Tasks smaller than this many elements run on the calling thread: waking the pool costs
// more than the work of a small plane (the split itself, and so the results, stay the same).
constexpr int64_t kMinParallelElements = 1 << 15;

inline int64_t grain_size(int64_t elements_per_task) {
  return std::max<int64_t>(1, kMinParallelElements / std::max<int64_t>(elements_per_task, 1));
}

template <typename acc_t>
Geometry<acc_t> make_geometry(const MixerShape& s, bool float_output) {
  Geometry<acc_t> g;
  g.N = s.N, g.C = s.C, g.H = s.H, g.W = s.W;
  g.G = s.G;
  g.radius = s.radius;
  g.channels_last = s.channels_last;
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
  g.stream_outputs = float_output && g.L % kLanes<acc_t> == 0;
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
  const int64_t task_elements = g.rows_per_chunk * g.L;
  at::parallel_for(0, g.tasks(), grain_size(task_elements), [&](int64_t begin, int64_t end) {
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


// Per-(n, c) factors of the mixer, formed from the raw parameter vectors: the group mean
// (the kernels pool x - mean), coef = a * rstd, and res_scale per channel.  Plain loops
// over N * C values: no ATen calls, no coefficient tensors.
template <typename acc_t>
struct ChannelFactors {
  std::vector<acc_t> mean, coef, res;
};

template <typename scalar_t, typename acc_t>
ChannelFactors<acc_t> channel_factors(const MixerShape& s, const MixerParams& p,
                                      const acc_t* mean_ng, const acc_t* rstd_ng) {
  ChannelFactors<acc_t> f;
  f.mean.resize(s.N * s.C);
  f.coef.resize(s.N * s.C);
  f.res.resize(s.C);
  for (int64_t c = 0; c < s.C; ++c) f.res[c] = p.residual<scalar_t, acc_t>(c);
  for (int64_t n = 0; n < s.N; ++n) {
    const acc_t sample = p.sample_factor<scalar_t, acc_t>(n);
    for (int64_t c = 0; c < s.C; ++c) {
      const int64_t ng = n * s.G + c / s.Cg;
      f.mean[n * s.C + c] = mean_ng[ng];
      f.coef[n * s.C + c] = p.channel_factor<scalar_t, acc_t>(c) * sample * rstd_ng[ng];
    }
  }
  return f;
}

// Runs body(std::integral_constant<bool, channels_last>) so that the layout is a template
// parameter of the kernels.
template <typename Body>
inline void with_layout(bool channels_last, Body body) {
  channels_last ? body(std::true_type{}) : body(std::false_type{});
}

}  // namespace cpu
}  // namespace fused_poolformer

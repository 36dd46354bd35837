// CPU kernel helpers shared by csrc/cpu/forward.cpp and backward.cpp.
//
// Every pass of the mixer is a k x k box sum of some per-element source (x - mean, or the
// gradient scaled by the pool's 1/count) followed by an element-wise epilogue.  The box
// sum is separable: vertical sums over the window's rows, then a horizontal sum of
// shifted copies of those.  Three traversals do it, each with the vector lanes where the
// data is contiguous:
//
//   * strips (channels_last): a task is a strip of 2 vectors of channels of one sample over
//     a range of rows.  Lanes run along C; the per-channel factors of the strip stay in
//     registers across the whole strip, and a strip's rows are one cache line per pixel,
//     so a window of rows is L1-resident and every input line comes from memory once.
//   * planes (NCHW, short rows): a task is a run of whole (n, c) planes.  A plane's H * W
//     values are one flat vector run: vertical neighbours are +-W away, horizontal ones
//     +-1 with a per-position mask (a row's ends), so a 7 x 7 plane is 7 vectors of work
//     instead of 7 rows of 7 lanes.
//   * rows (NCHW, long rows): a task is a range of rows of one plane; lanes run along W.
//
// The split into tasks depends on the shape only, and every reduction writes one partial
// per task that is merged in a fixed order: results are bitwise identical for any number
// of threads.  Launchers make one workspace allocation (none for small problems) and call
// no ATen operators.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>

#include "../host.h"
#include "../pool_mixer.h"

// The hot helpers and the lambdas of the traversals must inline: GCC otherwise gives up on
// the large pass bodies and calls them (through the PLT for header functions).
#if defined(__GNUC__)
#define FPM_INLINE inline __attribute__((always_inline))
#define FPM_LAMBDA_INLINE __attribute__((always_inline))
#else
#define FPM_INLINE inline
#define FPM_LAMBDA_INLINE
#endif

namespace fused_poolformer {
namespace cpu {

using at::vec::Vectorized;

template <typename acc_t>
constexpr int64_t kLanes = Vectorized<acc_t>::size();

// f(std::integral_constant<int, i>) for i in [0, N), unrolled (so arrays indexed by i stay
// in registers).
template <int N, typename F>
FPM_INLINE void unrolled(F f) {
  [&]<int... I>(std::integer_sequence<int, I...>) FPM_LAMBDA_INLINE {
    (f(std::integral_constant<int, I>{}), ...);
  }(std::make_integer_sequence<int, N>{});
}

template <typename scalar_t>
constexpr bool kReducedFloat =
    std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;

// ---------------------------------------------------------------------------------------
// Loads and stores in the accumulation type.  Half types are converted once, in registers.
// `n` is the number of valid lanes: lanes past it read as zero and are not written.

template <typename acc_t, typename scalar_t>
FPM_INLINE Vectorized<acc_t> load(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vectorized<acc_t>::loadu(p);
  } else {
    static_assert(kReducedFloat<scalar_t> && std::is_same_v<acc_t, float>);
    Vectorized<float> v;
    at::vec::load_to_float<scalar_t>(p, v);
    return v;
  }
}

// The first n < V lanes (the tail of a run); kept out of line, it is rare.
template <typename acc_t, typename scalar_t>
Vectorized<acc_t> load_partial(const scalar_t* p, int64_t n) {
  alignas(64) acc_t tmp[kLanes<acc_t>] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<acc_t>(p[i]);
  return Vectorized<acc_t>::loadu(tmp);
}

template <typename acc_t, typename scalar_t>
FPM_INLINE Vectorized<acc_t> load(const scalar_t* p, int64_t n) {
  if (n == kLanes<acc_t>) return load<acc_t>(p);
  return load_partial<acc_t>(p, n);
}

template <typename scalar_t, typename acc_t>
FPM_INLINE void store(scalar_t* p, Vectorized<acc_t> v) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(p);
  } else {
#if defined(CPU_CAPABILITY_AVX2)
    const __m128i half = std::is_same_v<scalar_t, at::BFloat16> ? at::vec::cvtfp32_bf16(__m256(v))
                                                                : at::vec::cvtfp32_fp16(__m256(v));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), half);
#else
    alignas(64) acc_t tmp[kLanes<acc_t>];
    v.store(tmp);
    for (int64_t i = 0; i < kLanes<acc_t>; ++i) p[i] = static_cast<scalar_t>(tmp[i]);
#endif
  }
}

// The first n < V lanes, out of line.  (No masked store instruction: vmaskmov stores are
// microcoded and slow on some x86 cores.)
template <typename scalar_t, typename acc_t>
void store_partial(scalar_t* p, Vectorized<acc_t> v, int64_t n) {
  alignas(64) acc_t tmp[kLanes<acc_t>];
  v.store(tmp);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(tmp[i]);
}

template <typename scalar_t, typename acc_t>
FPM_INLINE void store(scalar_t* p, Vectorized<acc_t> v, int64_t n) {
  if (n == kLanes<acc_t>) return store(p, v);
  store_partial(p, v, n);
}

// Bit masks of lanes: V all-ones lanes, then V zero lanes.
template <typename acc_t>
struct LaneMasks {
  using bits_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  bits_t bits[2 * kLanes<acc_t>];
  constexpr LaneMasks() : bits{} {
    for (int64_t i = 0; i < kLanes<acc_t>; ++i) bits[i] = ~bits_t(0);
  }
};

// Keep the first n lanes of v, zero the rest (bitwise, so a NaN never leaks from padding).
template <typename acc_t>
FPM_INLINE Vectorized<acc_t> first_lanes(Vectorized<acc_t> v, int64_t n) {
  alignas(64) static constexpr LaneMasks<acc_t> kMasks{};
  if (n == kLanes<acc_t>) return v;
  return v & Vectorized<acc_t>::loadu(kMasks.bits + kLanes<acc_t> - n);
}

// Sum of the lanes in a fixed order (deterministic).
template <typename acc_t>
FPM_INLINE acc_t lane_sum(Vectorized<acc_t> v) {
  alignas(64) acc_t tmp[kLanes<acc_t>];
  v.store(tmp);
  acc_t s = 0;
  for (int64_t i = 0; i < kLanes<acc_t>; ++i) s += tmp[i];
  return s;
}

// Output stores (y, dx).  Outputs are written once and not read back, so when every store
// of a tensor is a full, aligned vector they bypass the cache (non-temporal stores): that
// saves the read-for-ownership of every output line, a third of the forward's memory
// traffic.  `streaming` is decided per tensor (can_stream): a cache line written partly
// by non-temporal and partly by ordinary stores is far slower than either.  Call
// output_fence() before the written memory is handed to another thread.
template <typename scalar_t, typename acc_t>
FPM_INLINE void store_output(scalar_t* p, Vectorized<acc_t> v, int64_t n, bool streaming) {
#if defined(CPU_CAPABILITY_AVX2)
  if (streaming) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      _mm256_stream_ps(p, __m256(v));
      return;
    } else if constexpr (kReducedFloat<scalar_t>) {
      const __m128i half = std::is_same_v<scalar_t, at::BFloat16> ? at::vec::cvtfp32_bf16(__m256(v))
                                                                  : at::vec::cvtfp32_fp16(__m256(v));
      _mm_stream_si128(reinterpret_cast<__m128i*>(p), half);
      return;
    }
  }
#endif
  store(p, v, n);
}

// Whether every output store of a traversal whose contiguous runs are `run` elements long
// (C, H * W or W) is a full vector at a vector-aligned address, given the output's base.
template <typename scalar_t, typename acc_t>
inline bool can_stream(const void* base, int64_t run) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float> || kReducedFloat<scalar_t>) {
    constexpr int64_t bytes = kLanes<acc_t> * sizeof(scalar_t);
    return run % kLanes<acc_t> == 0 && reinterpret_cast<uintptr_t>(base) % bytes == 0;
  }
#endif
  return false;
}

inline void output_fence() {
#if defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// ---------------------------------------------------------------------------------------
// Memory.

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Typed arrays carved out of one buffer: a small inline buffer, or one heap allocation.
// `fit(layout)` runs layout(*this) once to measure (take() returns nullptr), allocates,
// and runs it again to hand out the pointers, so the list of arrays is written once.
template <size_t kInlineBytes>
class Arena {
 public:
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  template <typename T>
  T* take(int64_t count) {
    const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(count, 0) *
                                                      static_cast<int64_t>(sizeof(T)), 64));
    std::byte* p = base_ ? base_ + used_ : nullptr;
    used_ += bytes;
    return reinterpret_cast<T*>(p);
  }

  template <typename Layout>
  void fit(Layout layout) {
    used_ = 0;
    base_ = nullptr;
    layout(*this);
    const size_t bytes = used_;
    if (bytes <= kInlineBytes) {
      base_ = local_;
    } else {
      heap_.reset(new std::byte[bytes + 64]);
      base_ = heap_.get() + (64 - reinterpret_cast<uintptr_t>(heap_.get()) % 64) % 64;
    }
    used_ = 0;
    layout(*this);
  }

 private:
  alignas(64) std::byte local_[kInlineBytes];
  std::unique_ptr<std::byte[]> heap_;
  std::byte* base_ = nullptr;
  size_t used_ = 0;
};

// The launcher's workspace (factor tables, partial sums).
using Workspace = Arena<8192>;
// A task's scratch rows; one per parallel chunk, on that thread's stack when small.
using Scratch = Arena<16384>;

// ---------------------------------------------------------------------------------------
// The work split: traversal, tasks and items, by shape only.

// Tasks smaller than this many elements run on the calling thread: waking the pool costs
// more than the work of a small problem (the split itself, and so the results, stay the same).
constexpr int64_t kMinParallelElements = 1 << 15;

inline int64_t grain_size(int64_t elements_per_task) {
  return std::max<int64_t>(1, kMinParallelElements / std::max<int64_t>(elements_per_task, 1));
}

enum class Traversal { kStrips, kPlanes, kRows };

// Vectors of channels in a channels_last strip: two make one 64-byte line per pixel of
// float32 (and 32 bytes of a half type).
constexpr int64_t kStripVectors = 2;
// NCHW planes with rows shorter than this many lanes are processed whole (flat)...
constexpr int64_t kShortRowVectors = 2;
// ...if a plane has at most this many elements (its scratch and masks stay in L1).
constexpr int64_t kMaxFlatPlane = 1024;
// Elements a task aims at: enough to amortise its setup, small enough to balance threads.
constexpr int64_t kTaskElements = 8192;
// Minimum number of tasks of a traversal, so that every thread gets work even at batch 1.
constexpr int64_t kTargetTasks = 64;
// A sample whose inputs take at most this many bytes is one task: its statistics (sums),
// then the pass that needs them, while its data is still in L2 -- one parallel region and
// one read from memory instead of two.  Larger samples run as two parallel passes.
constexpr int64_t kFusedSampleBytes = 512 << 10;
// ... given at least this many samples to share among the threads.
constexpr int64_t kMinFusedSamples = 4;

template <typename acc_t>
struct WorkSplit {
  int64_t N, C, H, W, G, Cg;
  int64_t rh, rw;  // pool radius along H and W, clipped to the plane
  Traversal traversal;
  bool fused;  // one task per sample (kFusedSampleBytes)
  // Items of work: strip tasks (sample, row chunk, strip), row tasks (plane, row chunk) or
  // planes, numbered sample by sample.
  int64_t strip_width, strips, chunks, rows_per_chunk, items_per_sample;
  // Two-phase passes: tasks of items_per_task consecutive items.
  int64_t items_per_task, tasks;
  const acc_t* inv_h;    // (H,) 1 / valid-tap count along H
  const acc_t* inv_w;    // (W,) ... along W
  const acc_t* inv_cnt;  // planes: (H * W,) 1 / (cnt_h * cnt_w)
  const acc_t* masks;    // planes: (2 rw, H * W) all-ones bits where the neighbour w + d exists

  int64_t plane_numel() const { return H * W; }
  int64_t sample_numel() const { return C * H * W; }
  int64_t padded_plane() const { return round_up(H * W, kLanes<acc_t>); }
  int64_t items() const { return N * items_per_sample; }
  int64_t item_elements() const { return sample_numel() / std::max<int64_t>(items_per_sample, 1); }
  // Partial sums (backward): one per (chunk, n, c).
  int64_t partial_chunks() const { return traversal == Traversal::kPlanes ? 1 : chunks; }
};

inline Traversal choose_traversal(const MixerShape& s, int64_t lanes) {
  if (s.channels_last) return Traversal::kStrips;
  if (s.W < kShortRowVectors * lanes && s.H * s.W <= kMaxFlatPlane) return Traversal::kPlanes;
  return Traversal::kRows;
}

// The shape-only split into work items and tasks.  `sample_bytes` is what one sample's
// inputs take (x in the forward, x and dy in the backward).
template <typename acc_t>
WorkSplit<acc_t> make_work_split(const MixerShape& s, int64_t sample_bytes) {
  constexpr int64_t V = kLanes<acc_t>;
  WorkSplit<acc_t> g{};
  g.N = s.N, g.C = s.C, g.H = s.H, g.W = s.W, g.G = s.G, g.Cg = s.Cg;
  g.rh = effective_radius(s.radius, s.H);
  g.rw = effective_radius(s.radius, s.W);
  g.traversal = choose_traversal(s, V);
  g.fused = sample_bytes <= kFusedSampleBytes && s.N >= kMinFusedSamples;
  g.strip_width = g.traversal == Traversal::kStrips ? kStripVectors * V : 1;
  g.strips = g.traversal == Traversal::kStrips ? (s.C + g.strip_width - 1) / g.strip_width : 1;
  if (g.traversal == Traversal::kPlanes) {
    g.chunks = 1;
    g.rows_per_chunk = s.H;
    g.items_per_sample = s.C;
    const int64_t planes = s.N * s.C;
    g.items_per_task = std::clamp<int64_t>(kTaskElements / std::max<int64_t>(s.H * s.W, 1), 1,
                                           std::max<int64_t>(1, planes / kTargetTasks));
  } else {
    // Row chunks: enough tasks to keep every thread busy at batch 1.
    const int64_t units = s.N * (g.traversal == Traversal::kStrips ? g.strips : s.C);
    const int64_t want = (kTargetTasks + units - 1) / std::max<int64_t>(units, 1);
    const int64_t chunks = std::clamp<int64_t>(want, 1, std::max<int64_t>(s.H, 1));
    g.rows_per_chunk = (s.H + chunks - 1) / chunks;
    g.chunks = (s.H + g.rows_per_chunk - 1) / g.rows_per_chunk;
    g.items_per_sample = g.chunks * (g.traversal == Traversal::kStrips ? g.strips : s.C);
    g.items_per_task = 1;
  }
  g.tasks = (g.items() + g.items_per_task - 1) / g.items_per_task;
  return g;
}

// The 1/count tables (and, for flat planes, the masks) of g, carved from `ws`.
template <typename acc_t, typename WS>
void take_tables(WorkSplit<acc_t>& g, WS& ws) {
  acc_t* inv_h = ws.template take<acc_t>(g.H);
  acc_t* inv_w = ws.template take<acc_t>(g.W);
  acc_t* inv_cnt = nullptr;
  acc_t* masks = nullptr;
  if (g.traversal == Traversal::kPlanes) {
    inv_cnt = ws.template take<acc_t>(g.padded_plane());
    masks = ws.template take<acc_t>(2 * g.rw * g.padded_plane());
  }
  g.inv_h = inv_h, g.inv_w = inv_w, g.inv_cnt = inv_cnt, g.masks = masks;
  if (inv_h == nullptr) return;  // measuring
  for (int64_t h = 0; h < g.H; ++h) inv_h[h] = acc_t(1) / acc_t(window_count(h, g.rh, g.H));
  for (int64_t w = 0; w < g.W; ++w) inv_w[w] = acc_t(1) / acc_t(window_count(w, g.rw, g.W));
  if (g.traversal != Traversal::kPlanes) return;
  using bits_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  const int64_t P = g.padded_plane(), HW = g.plane_numel();
  for (int64_t i = 0; i < P; ++i) {
    const int64_t h = i / g.W, w = i % g.W;
    inv_cnt[i] = i < HW ? inv_h[h] * inv_w[w] : acc_t(0);
    int64_t k = 0;
    for (int64_t d = -g.rw; d <= g.rw; ++d) {
      if (d == 0) continue;
      const bits_t bits = (i < HW && w + d >= 0 && w + d < g.W) ? ~bits_t(0) : bits_t(0);
      std::memcpy(masks + k * P + i, &bits, sizeof(bits));
      ++k;
    }
  }
}

// Scratch of one thread for the traversal of g: column sums (strips, rows) or the padded
// copies of a plane.
template <typename acc_t>
struct PlaneScratch {
  acc_t* xs;  // the source with rh rows of zeros above and below
  acc_t* vs;  // the vertical sums with rw zeros on each side
};

template <typename acc_t>
struct TraversalScratch {
  Vectorized<acc_t>* strip_columns = nullptr;  // (W + 2 rw) * kStripVectors, rw zeros each side
  acc_t* row_columns = nullptr;                // W + V, with rw zeros before
  PlaneScratch<acc_t> plane{};
};

template <typename acc_t, typename A>
TraversalScratch<acc_t> take_traversal_scratch(const WorkSplit<acc_t>& g, A& arena) {
  constexpr int64_t V = kLanes<acc_t>;
  TraversalScratch<acc_t> s;
  switch (g.traversal) {
    case Traversal::kStrips:
      s.strip_columns = arena.template take<Vectorized<acc_t>>((g.W + 2 * g.rw) * kStripVectors);
      break;
    case Traversal::kRows: {
      const int64_t size = g.W + 2 * g.rw + V;
      acc_t* col = arena.template take<acc_t>(size);
      if (col != nullptr) {
        std::fill(col, col + size, acc_t(0));
        s.row_columns = col + g.rw;
      }
      break;
    }
    case Traversal::kPlanes: {
      const int64_t P = g.padded_plane();
      const int64_t xs_size = P + 2 * g.rh * g.W + 2 * V, vs_size = P + 2 * g.rw + 2 * V;
      acc_t* xs = arena.template take<acc_t>(xs_size);
      acc_t* vs = arena.template take<acc_t>(vs_size);
      if (xs != nullptr) {
        std::fill(xs, xs + xs_size, acc_t(0));
        std::fill(vs, vs + vs_size, acc_t(0));
        s.plane = {xs + g.rh * g.W + V, vs + g.rw + V};
      }
      break;
    }
  }
  return s;
}

// ---------------------------------------------------------------------------------------
// Per-(n, c) factors of the mixer, formed from the raw parameter vectors: the group mean
// (the kernels pool x - mean), coef = a * rstd and res_scale.  Plain loops, no ATen.

template <typename acc_t>
struct Factors {
  acc_t* mean;     // (N, C)
  acc_t* coef;     // (N, C) layer_scale * weight * sample_scale * rstd
  acc_t* res;      // (C,)
  acc_t* channel;  // (C,) layer_scale * weight

  template <typename WS>
  void take(WS& ws, const MixerShape& s) {
    mean = ws.template take<acc_t>(s.N * s.C);
    coef = ws.template take<acc_t>(s.N * s.C);
    res = ws.template take<acc_t>(s.C);
    channel = ws.template take<acc_t>(s.C);
  }
};

// Fills a (C,) table with an optional parameter vector (1 where it is absent).
template <typename scalar_t, typename acc_t>
void read_into(acc_t* out, const VectorArg& v, int64_t count) {
  if (v.data == nullptr) {
    std::fill(out, out + count, acc_t(1));
  } else if (v.is_float) {
    const float* p = static_cast<const float*>(v.data);
    for (int64_t i = 0; i < count; ++i) out[i] = static_cast<acc_t>(p[i * v.stride]);
  } else {
    const scalar_t* p = static_cast<const scalar_t*>(v.data);
    for (int64_t i = 0; i < count; ++i) out[i] = static_cast<acc_t>(p[i * v.stride]);
  }
}

// The per-channel tables: res_scale and layer_scale * weight.
template <typename scalar_t, typename acc_t>
void fill_channel_factors(const Factors<acc_t>& f, const MixerShape& s, const MixerParams& p) {
  read_into<scalar_t>(f.res, p.res_scale, s.C);
  read_into<scalar_t>(f.channel, p.weight, s.C);
  acc_t* layer_scale = f.coef;  // row 0 of coef as scratch: the rows are written afterwards
  read_into<scalar_t>(layer_scale, p.layer_scale, s.C);
  for (int64_t c = 0; c < s.C; ++c) f.channel[c] *= layer_scale[c];
}

// Row n of the (N, C) tables, from the sample's statistics (after fill_channel_factors).
template <typename acc_t>
void fill_sample_factors(const Factors<acc_t>& f, const MixerShape& s, int64_t n, acc_t sample,
                         const acc_t* mean_ng, const acc_t* rstd_ng) {
  for (int64_t g = 0; g < s.G; ++g) {
    const acc_t m = mean_ng[n * s.G + g], r = rstd_ng[n * s.G + g] * sample;
    acc_t* mean = f.mean + n * s.C + g * s.Cg;
    acc_t* coef = f.coef + n * s.C + g * s.Cg;
    const acc_t* channel = f.channel + g * s.Cg;
    for (int64_t c = 0; c < s.Cg; ++c) {
      mean[c] = m;
      coef[c] = channel[c] * r;
    }
  }
}

// ---------------------------------------------------------------------------------------
// The pool radius as a compile-time constant R where it is 1 (pool_size 3, the PoolFormer
// default, or a larger pool clipped by a 3-wide plane): the loops over the window unroll
// and a channels_last row keeps its window of column sums in registers.  R = -1: read the
// radii from the geometry.

template <typename acc_t, typename Body>
inline void with_radius(const WorkSplit<acc_t>& g, Body body) {
  if (g.rh == 1 && g.rw == 1) {
    body(std::integral_constant<int, 1>{});
  } else {
    body(std::integral_constant<int, -1>{});
  }
}

template <int R>
constexpr int64_t radius_or(int64_t runtime) {
  return R >= 0 ? R : runtime;
}

// The rows of the pool window of output row h: [hb, he].  A pass gives the traversals a
// row source: source(hh) -> a callable (position, ...) -> the source vector of row hh there.
// With a constant radius the window's rows are a constant number K of row sources (its
// pointers set up once per output row); otherwise (K = 0) they are looked up per element.
template <int R, typename Body>
FPM_INLINE void with_window_rows(int64_t rows, Body body) {
  if constexpr (R < 0) {
    body(std::integral_constant<int, 0>{});
  } else {
    [&]<int... I>(std::integer_sequence<int, I...>) FPM_LAMBDA_INLINE {
      ((rows == I + 1 ? (body(std::integral_constant<int, I + 1>{}), true) : false) || ...);
    }(std::make_integer_sequence<int, 2 * R + 1>{});
  }
}

// The vertical sum at `at...` of the window's rows: K row sources in `rows`, or (K = 0) the
// rows [hb, he] of `source`.
template <int K, typename Vec, typename Rows, typename Source, typename... At>
FPM_INLINE Vec vertical_sum(const Rows& rows, const Source& source, int64_t hb, int64_t he,
                            At... at) {
  if constexpr (K > 0) {
    Vec v = rows[0](at...);
    unrolled<K - 1>([&](auto i) FPM_LAMBDA_INLINE { v += rows[i + 1](at...); });
    return v;
  } else {
    Vec v = source(hb)(at...);
    for (int64_t hh = hb + 1; hh <= he; ++hh) v += source(hh)(at...);
    return v;
  }
}

// The K row sources of rows hb, hb + 1, ... (an empty array for K = 0).
template <int K, typename Source>
FPM_INLINE auto window_rows(const Source& source, int64_t hb) {
  return [&]<int... I>(std::integer_sequence<int, I...>) FPM_LAMBDA_INLINE {
    return std::array<decltype(source(hb)), K>{source(hb + I)...};
  }(std::make_integer_sequence<int, K>{});
}

// ---------------------------------------------------------------------------------------
// Traversal: channels_last strips.  A strip is `nv` vectors of channels starting at c0 of
// sample n (the last one `tail` lanes wide); box sums for rows [h_begin, h_end).
//
// source(hh) -> row source: (w, k) -> vector k of the strip's source at (hh, w);
// column(v, w) -> the vertical sum v scaled by a factor shared by column w;
// emit(h, w, box) with box[k] the box sum of vector k at (h, w).
// `col` is scratch for (W + 2 rw) * kStripVectors vectors (runtime radius only).

template <int R, int NV, typename acc_t, typename Source, typename Column, typename Emit>
FPM_INLINE void strip_box_sums(const WorkSplit<acc_t>& g, int64_t h_begin, int64_t h_end,
                           Vectorized<acc_t>* col, Source source, Column column, Emit emit) {
  using Vec = Vectorized<acc_t>;
  const int64_t W = g.W;
  for (int64_t h = h_begin; h < h_end; ++h) {
    const int64_t hb = window_begin(h, g.rh), he = window_end(h, g.rh, g.H);
    with_window_rows<R>(he - hb + 1, [&](auto rows_const) FPM_LAMBDA_INLINE {
    constexpr int K = decltype(rows_const)::value;
    const auto rows = window_rows<K>(source, hb);
    auto vertical = [&](int64_t w, auto k) FPM_LAMBDA_INLINE {
      return column(vertical_sum<K, Vec>(rows, source, hb, he, w, k), w);
    };
    if constexpr (R >= 0) {
      // The column sums of columns w - R .. w + R, in registers, shifted along the row.
      Vec win[2 * R + 1][NV];
      unrolled<2 * R + 1>([&](auto i) FPM_LAMBDA_INLINE {
        const int64_t w = i - R;
        unrolled<NV>([&](auto k) FPM_LAMBDA_INLINE {
          win[i][k] = w >= 0 && w < W ? vertical(w, k) : Vec(acc_t(0));
        });
      });
      for (int64_t w = 0; w < W; ++w) {
        Vec box[NV];
        unrolled<NV>([&](auto k) FPM_LAMBDA_INLINE {
          box[k] = win[0][k];
          unrolled<2 * R>([&](auto i) FPM_LAMBDA_INLINE { box[k] += win[i + 1][k]; });
        });
        emit(h, w, box);
        unrolled<2 * R>([&](auto i) FPM_LAMBDA_INLINE {
          unrolled<NV>([&](auto k) FPM_LAMBDA_INLINE { win[i][k] = win[i + 1][k]; });
        });
        const bool inside = w + R + 1 < W;
        unrolled<NV>([&](auto k) FPM_LAMBDA_INLINE {
          win[2 * R][k] = inside ? vertical(w + R + 1, k) : Vec(acc_t(0));
        });
      }
    } else {
      const int64_t rw = g.rw;
      Vec* c0 = col + rw * NV;  // rw zero columns on each side
      for (int64_t i = 0; i < rw * NV; ++i) col[i] = c0[W * NV + i] = Vec(acc_t(0));
      for (int64_t w = 0; w < std::min(rw, W); ++w) {
        for (int k = 0; k < NV; ++k) c0[w * NV + k] = vertical(w, k);
      }
      for (int64_t w = 0; w < W; ++w) {
        if (w + rw < W) {
          for (int k = 0; k < NV; ++k) c0[(w + rw) * NV + k] = vertical(w + rw, k);
        }
        Vec box[NV];
        for (int k = 0; k < NV; ++k) {
          Vec s = c0[(w - rw) * NV + k];
          for (int64_t d = -rw + 1; d <= rw; ++d) s += c0[(w + d) * NV + k];
          box[k] = s;
        }
        emit(h, w, box);
      }
    }
    });
  }
}

// Where a strip task is: sample n, channels [c0, c0 + lanes[0] + ...), rows [h_begin, h_end).
struct StripTask {
  int64_t n, c0, nv, tail, h_begin, h_end, chunk;
  int64_t offset;  // of the strip's first element (sample n, row 0, column 0, channel c0)
};

template <typename acc_t>
FPM_INLINE StripTask strip_task(const WorkSplit<acc_t>& g, int64_t t) {
  constexpr int64_t V = kLanes<acc_t>;
  // Strips fastest: consecutive tasks read neighbouring lines of the same rows.
  StripTask s;
  s.c0 = (t % g.strips) * g.strip_width;
  s.chunk = (t / g.strips) % g.chunks;
  s.n = t / g.strips / g.chunks;
  const int64_t width = std::min(g.strip_width, g.C - s.c0);
  s.nv = (width + V - 1) / V;
  s.tail = width - (s.nv - 1) * V;
  s.h_begin = s.chunk * g.rows_per_chunk;
  s.h_end = std::min(g.H, s.h_begin + g.rows_per_chunk);
  s.offset = s.n * g.H * g.W * g.C + s.c0;
  return s;
}

// channels_last strips read one line per pixel at a stride of C elements: the hardware
// prefetchers keep too few of those in flight, so a pass asks for the strip's line of the
// row its next output row will need, a whole row (hundreds of instructions) ahead.
// `strip` is the strip's first element in the sample; nothing is fetched past the last row.
template <typename scalar_t, typename acc_t>
FPM_INLINE void prefetch_strip_line(const WorkSplit<acc_t>& g, const scalar_t* strip, int64_t row,
                                    int64_t w, int64_t width) {
#if defined(__GNUC__)
  if (row >= g.H) return;
  const scalar_t* line = strip + (row * g.W + w) * g.C;
  __builtin_prefetch(line);
  __builtin_prefetch(line + width - 1);  // the same line unless the strip straddles two
#else
  (void)g, (void)strip, (void)row, (void)w, (void)width;
#endif
}

// Runs body(NV, lanes): the strip's vector count as a compile-time constant
// (std::integral_constant) and lanes(k), the valid lanes of its vector k -- a constant too
// where the last vector is full, so the full-strip body has no partial loads.
template <typename acc_t, typename Body>
FPM_INLINE void with_strip_shape(const StripTask& st, Body body) {
  static_assert(kStripVectors == 2);
  constexpr int64_t V = kLanes<acc_t>;
  auto run = [&](auto nv_const, auto full_const) FPM_LAMBDA_INLINE {
    constexpr int NV = decltype(nv_const)::value;
    constexpr bool kFull = decltype(full_const)::value;
    body(nv_const, [&](int k) FPM_LAMBDA_INLINE { return kFull || k < NV - 1 ? V : st.tail; });
  };
  const bool full = st.tail == V;
  if (st.nv == 2) {
    full ? run(std::integral_constant<int, 2>{}, std::true_type{})
         : run(std::integral_constant<int, 2>{}, std::false_type{});
  } else {
    full ? run(std::integral_constant<int, 1>{}, std::true_type{})
         : run(std::integral_constant<int, 1>{}, std::false_type{});
  }
}

// ---------------------------------------------------------------------------------------
// Traversal: flat NCHW planes (short rows).  source(i, n) -> the source at flat positions
// [i, i + n) of the plane (n valid lanes, zeros past them); emit(i, n, box).

template <int R, typename acc_t, typename Source, typename Emit>
FPM_INLINE void plane_box_sums(const WorkSplit<acc_t>& g, const PlaneScratch<acc_t>& s, Source source,
                           Emit emit) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = kLanes<acc_t>;
  const int64_t HW = g.plane_numel(), P = g.padded_plane(), W = g.W;
  const int64_t rh = radius_or<R>(g.rh), rw = radius_or<R>(g.rw);
  acc_t* xs = s.xs;
  acc_t* vs = s.vs;
  for (int64_t i = 0; i < P; i += V) source(i, std::min(V, HW - i)).store(xs + i);
  // Vertical: rows outside the plane are the zero padding of xs.
  for (int64_t i = 0; i < P; i += V) {
    Vec v = Vec::loadu(xs + i - rh * W);
    for (int64_t d = -rh + 1; d <= rh; ++d) v += Vec::loadu(xs + i + d * W);
    v.store(vs + i);
  }
  // Horizontal: neighbours past a row's ends are masked out (bitwise, so nothing leaks).
  for (int64_t i = 0; i < P; i += V) {
    Vec box = Vec::loadu(vs + i);
    const acc_t* mask = g.masks + i;
    for (int64_t d = -rw; d <= rw; ++d) {
      if (d == 0) continue;
      box += Vec::loadu(vs + i + d) & Vec::loadu(mask);
      mask += P;
    }
    emit(i, std::min(V, HW - i), box);
  }
}

// ---------------------------------------------------------------------------------------
// Traversal: NCHW rows.  For each row h in [h_begin, h_end) of one plane: the vertical
// sums of source(hh)(w, n) (read straight from memory: a window's rows are L1-resident)
// scaled by column(sum, w, n), then emit(h, box) with box(w) the horizontal sum.

template <int R, typename acc_t>
struct HorizontalSum {
  const acc_t* col;
  int64_t rw_runtime;
  // (Full loads: col has zeros past the row's end.)
  FPM_INLINE Vectorized<acc_t> operator()(int64_t w) const {
    const int64_t rw = radius_or<R>(rw_runtime);
    Vectorized<acc_t> s = Vectorized<acc_t>::loadu(col + w - rw);
    for (int64_t d = -rw + 1; d <= rw; ++d) s += Vectorized<acc_t>::loadu(col + w + d);
    return s;
  }
};

template <int R, typename acc_t, typename Source, typename Column, typename Emit>
FPM_INLINE void row_box_sums(const WorkSplit<acc_t>& g, int64_t h_begin, int64_t h_end, acc_t* col,
                         Source source, Column column, Emit emit) {
  constexpr int64_t V = kLanes<acc_t>;
  for (int64_t h = h_begin; h < h_end; ++h) {
    const int64_t hb = window_begin(h, g.rh), he = window_end(h, g.rh, g.H);
    with_window_rows<R>(he - hb + 1, [&](auto rows_const) FPM_LAMBDA_INLINE {
      constexpr int K = decltype(rows_const)::value;
      const auto rows = window_rows<K>(source, hb);
      for (int64_t w = 0; w < g.W; w += V) {
        const int64_t n = std::min(V, g.W - w);
        store(col + w, column(vertical_sum<K, Vectorized<acc_t>>(rows, source, hb, he, w, n), w, n), n);
      }
    });
    emit(h, HorizontalSum<R, acc_t>{col, g.rw});
  }
}

// Where a row task is: plane (n * C + c), rows [h_begin, h_end).
struct RowTask {
  int64_t plane, h_begin, h_end, chunk;
};

template <typename acc_t>
FPM_INLINE RowTask row_task(const WorkSplit<acc_t>& g, int64_t t) {
  RowTask r;
  r.plane = t / g.chunks;
  r.chunk = t % g.chunks;
  r.h_begin = r.chunk * g.rows_per_chunk;
  r.h_end = std::min(g.H, r.h_begin + g.rows_per_chunk);
  return r;
}

// ---------------------------------------------------------------------------------------
// Running a pass.  A pass is a struct with member templates strip<R>(item, columns),
// plane<R>(plane, plane_scratch) and row<R>(item, columns): one work item of each traversal.

template <typename acc_t, typename Pass>
inline void run_items(const Pass& pass, const WorkSplit<acc_t>& g, int64_t begin, int64_t end,
                      const TraversalScratch<acc_t>& s) {
  with_radius(g, [&](auto r) {
    constexpr int R = decltype(r)::value;
    switch (g.traversal) {
      case Traversal::kStrips:
        for (int64_t i = begin; i < end; ++i) pass.template strip<R>(i, s.strip_columns);
        break;
      case Traversal::kPlanes:
        for (int64_t i = begin; i < end; ++i) pass.template plane<R>(i, s.plane);
        break;
      case Traversal::kRows:
        for (int64_t i = begin; i < end; ++i) pass.template row<R>(i, s.row_columns);
        break;
    }
  });
}

// Runs the pass over every task, in parallel, with one scratch per parallel chunk.
template <typename acc_t, typename Pass>
void run_tasks(const WorkSplit<acc_t>& g, const Pass& pass) {
  const int64_t task_elements = g.items_per_task * g.item_elements();
  at::parallel_for(0, g.tasks, grain_size(task_elements), [&](int64_t begin, int64_t end) {
    Scratch scratch;
    TraversalScratch<acc_t> buffers;
    scratch.fit([&](Scratch& arena) { buffers = take_traversal_scratch(g, arena); });
    for (int64_t t = begin; t < end; ++t) {
      run_items(pass, g, t * g.items_per_task, std::min(g.items(), (t + 1) * g.items_per_task),
                buffers);
    }
    output_fence();
  });
}

}  // namespace cpu
}  // namespace fused_poolformer

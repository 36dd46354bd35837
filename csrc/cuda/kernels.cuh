// CUDA kernels of the fused pool mixer (docs/math.md §2), written against simt.h so
// that the same source runs on a GPU and, for the tests, in the CPU emulator.
//
//   forward   stats_kernel            per-chunk (count, mean, M2) partials of every (n, g)
//             tile_kernel<kApply>     prologue: merges its groups' partials (fixed order) into
//                                     mean/rstd; y = res * x + a * rstd * (P x - x)
//   backward  tile_kernel<kSums>      per-(n, c, tile) sums of D * dy and x * dy
//             fold_kernel             S[n, g] and the parameter gradients (fixed order)
//             tile_kernel<kDx>        dx = res * dy + a r (P^T dy - dy) - r^3 S / M (x - mean)
//
// A tile block (plan.h) runs four phases separated by barriers:
//   1. copy its input box with halo from global memory into shared memory X: 16-byte
//      vector loads in batches of four per thread (64 bytes per thread in flight), scalar
//      loads only at unaligned ends; plus the output-sized box B (backward) and the tables
//      (1/count of each staged row and column, per-channel factors);
//   2. vertical window sums of X into V, four floats (two doubles) per thread and step,
//      every thread busy: a work item is a (row, 16-byte segment) pair;
//   3. horizontal window sums of V and the per-element epilogue, again by segments; the
//      centre value comes from shared memory, the result is written back in place;
//   4. copy the result to global memory with 16-byte stores (or, for kSums, reduce the
//      products per channel).
// Pool size 3 has its own unrolled instantiation (kR1); other sizes loop over the taps.
// The layout (NCHW or channels_last) is a uniform runtime branch, not a template argument:
// half as many kernels to compile, the same code where the layouts agree.
// Offsets inside a sample are 32-bit over a 64-bit sample base; no per-element division
// (work items are decoded with multiply-shift dividers built on the host).
//
// Determinism: every reduction has a fixed shape (partials written to fixed slots and
// merged in a fixed order); there are no float atomics.
#pragma once

#include "../pool_mixer.h"
#include "plan.h"
#include "simt.h"

namespace fused_poolformer {
namespace cuda_kernels {

using simt::Pack;
using simt::SharedArray;

FPM_HD int imin(int a, int b) { return a < b ? a : b; }
FPM_HD int imax(int a, int b) { return a > b ? a : b; }

template <typename acc_t, typename scalar_t>
FPM_DEVICE acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(v);
}

// Elements moved per global vector access and per shared-memory vector access.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// ---------------------------------------------------------------------------------------
// Copies between global memory and shared memory (see RunGrid in plan.h).

// One block's instance of a RunGrid.
struct RunBlock {
  int glob0 = 0;                  // sample offset of run (0, 0)'s element 0 (may be negative)
  int smem0 = 0;                  // its shared-memory offset
  int alo = 0, ahi = 1, blo = 0, bhi = 1;  // runs inside the sample
  int jlo = 0, jhi = 0;           // elements of a run inside the sample
  int head = 0;                   // elements of slot 0 before element 0
};

FPM_DEVICE RunBlock bind_box(const RunGrid& g, const Dims& d, int O0, int M0, int I0) {
  const int ao = O0 + g.bo, am = M0 + g.bm, ai = I0 + g.bi;
  RunBlock b;
  b.glob0 = ao * d.stride_o() + am * d.DI + ai;
  b.smem0 = g.smem.offset(g.bo, g.bm, g.bi);
  const int olo = imax(0, -ao), ohi = imin(g.eo, d.DO - ao);
  const int mlo = imax(0, -am), mhi = imin(g.em, d.DM - am);
  const int ilo = imax(0, -ai), ihi = imin(g.ei, d.DI - ai);
  if (g.kind == 0) {
    b.jlo = olo * g.em * g.ei, b.jhi = ohi * g.em * g.ei;
  } else if (g.kind == 1) {
    b.alo = olo, b.ahi = ohi, b.jlo = mlo * g.ei, b.jhi = mhi * g.ei;
  } else {
    b.alo = olo, b.ahi = ohi, b.blo = mlo, b.bhi = mhi, b.jlo = ilo, b.jhi = ihi;
  }
  return b;
}

// Slot alignment: element 0 of every run sits `head` elements into a V-aligned slot.
template <int V, typename T>
FPM_DEVICE void align_slots(RunBlock& b, const T* sample) {
  const uint64_t first = reinterpret_cast<uintptr_t>(sample) / sizeof(T) + static_cast<int64_t>(b.glob0);
  b.head = static_cast<int>(first & (V - 1));
}

// A slot: elements j0 + e (lo <= e < hi) of one run.
struct Slot {
  int glob;      // sample offset of element j0
  int j0;
  int lo, hi;
  int smem_run;  // shared-memory offset of the run's element 0
};

template <int V>
FPM_DEVICE bool decode_slot(const RunGrid& g, const RunBlock& b, int sigma, Slot& s) {
  int run, k, ra, rb;
  g.div_slots.divmod(sigma, run, k);
  g.div_rb.divmod(run, ra, rb);
  s.j0 = k * V - b.head;
  s.lo = imax(b.jlo - s.j0, 0);
  s.hi = imin(b.jhi - s.j0, V);
  s.glob = b.glob0 + ra * g.glob_a + rb * g.glob_b + s.j0;
  s.smem_run = b.smem0 + ra * g.smem_a + rb * g.smem_b;
  return ra >= b.alo && ra < b.ahi && rb >= b.blo && rb < b.bhi && s.lo < s.hi;
}

FPM_DEVICE bool full_slot(const Slot& s, int v) { return s.lo == 0 && s.hi == v; }

// Shared-memory offset of element j0 + lo of the slot's run; next_smem steps to the next.
FPM_DEVICE int first_smem(const RunGrid& g, const Slot& s, int& col) {
  const int j = s.j0 + s.lo;
  if (g.dense) {
    col = 0;
    return s.smem_run + j;
  }
  int row;
  g.div_row.divmod(j, row, col);
  return s.smem_run + row * g.row_stride + col;
}

FPM_DEVICE void next_smem(const RunGrid& g, int& idx, int& col) {
  ++idx;
  if (!g.dense && ++col == g.row_len) {
    col = 0;
    idx += g.row_stride - g.row_len;
  }
}

// Visits the slots of the box this thread owns: full(slot, values) for every whole slot,
// whose 16-byte loads are issued in batches of U before any is used (U loads per thread in
// flight), and part(slot) for a slot cut by its run's ends, whose few elements the caller
// moves one by one (a plain loop: it runs at most twice per run).
template <int V, int U, typename T, typename Full, typename Part>
FPM_DEVICE void for_each_slot(const T* sample, const RunGrid& g, const RunBlock& b, Full&& full, Part&& part) {
  const int total = g.RA * g.RB * g.S;
  for (int first = simt::thread_index(); first < total; first += U * simt::kThreads) {
    Slot s[U];
    bool ok[U], whole[U];
    Pack<T, V> v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int sigma = first + u * simt::kThreads;
      ok[u] = sigma < total && decode_slot<V>(g, b, sigma, s[u]);
      whole[u] = ok[u] && full_slot(s[u], V);
      if (whole[u]) v[u] = simt::load_global_vector<V>(sample + s[u].glob);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (whole[u]) {
        full(s[u], v[u]);
      } else if (ok[u]) {
        part(s[u]);
      }
    }
  }
}

template <int V, typename scalar_t, typename acc_t>
FPM_DEVICE void stage_slots(const scalar_t* sample, const RunGrid& g, RunBlock b,
                            const SharedArray<acc_t>& dst, acc_t pivot) {
  align_slots<V>(b, sample);
  constexpr int CW = kVec<acc_t>;
  auto full = [&](const Slot& s, const Pack<scalar_t, V>& v) {
    const int at = s.smem_run + s.j0;
    if constexpr (V % CW == 0) {
      if (g.dense && at % CW == 0) {  // 16-byte shared stores: no bank conflicts
#pragma unroll
        for (int c = 0; c < V; c += CW) {
          Pack<acc_t, CW> out;
#pragma unroll
          for (int e = 0; e < CW; ++e) out.v[e] = to_acc<acc_t>(v.v[c + e]) - pivot;
          dst.template store<CW>(at + c, out);
        }
        return;
      }
    }
    if (g.dense) {
#pragma unroll
      for (int e = 0; e < V; ++e) dst[at + e] = to_acc<acc_t>(v.v[e]) - pivot;
      return;
    }
    int col, idx = first_smem(g, s, col);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      dst[idx] = to_acc<acc_t>(v.v[e]) - pivot;
      next_smem(g, idx, col);
    }
  };
  auto part = [&](const Slot& s) {
    int col, idx = first_smem(g, s, col);
#pragma unroll 1
    for (int e = s.lo; e < s.hi; ++e) {
      dst[idx] = to_acc<acc_t>(simt::load_global(sample + s.glob + e)) - pivot;
      next_smem(g, idx, col);
    }
  };
  for_each_slot<V, 4>(sample, g, b, full, part);
}

// Global box -> shared memory, converted to acc_t, minus `pivot`.
template <typename scalar_t, typename acc_t>
FPM_DEVICE void stage_box(const scalar_t* sample, const RunGrid& g, const RunBlock& b,
                          const SharedArray<acc_t>& dst, acc_t pivot) {
  if (g.vector) {
    stage_slots<kVec<scalar_t>>(sample, g, b, dst, pivot);
  } else {
    stage_slots<1>(sample, g, b, dst, pivot);
  }
}

template <int V, typename scalar_t, typename acc_t>
FPM_DEVICE void store_slots(scalar_t* sample, const RunGrid& g, RunBlock b, const SharedArray<acc_t>& src) {
  align_slots<V>(b, sample);
  const int total = g.RA * g.RB * g.S;
  for (int sigma = simt::thread_index(); sigma < total; sigma += simt::kThreads) {
    Slot s;
    if (!decode_slot<V>(g, b, sigma, s)) continue;
    int col, idx = first_smem(g, s, col);
    if (full_slot(s, V)) {
      Pack<scalar_t, V> p;
      constexpr int CW = kVec<acc_t>;
      if (V % CW == 0 && g.dense && idx % CW == 0) {  // 16-byte shared loads: no bank conflicts
#pragma unroll
        for (int c = 0; c < V; c += CW) {
          const Pack<acc_t, CW> in = src.template load<CW>(idx + c);
#pragma unroll
          for (int e = 0; e < CW && c + e < V; ++e) p.v[c + e] = static_cast<scalar_t>(in.v[e]);
        }
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          p.v[e] = static_cast<scalar_t>(src[idx]);
          next_smem(g, idx, col);
        }
      }
      simt::store_global_vector<V>(sample + s.glob, p);
    } else {
#pragma unroll 1
      for (int e = s.lo; e < s.hi; ++e) {
        simt::store_global(sample + s.glob + e, static_cast<scalar_t>(src[idx]));
        next_smem(g, idx, col);
      }
    }
  }
}

// Shared memory -> global box, converted to scalar_t.
template <typename scalar_t, typename acc_t>
FPM_DEVICE void store_box(scalar_t* sample, const RunGrid& g, const RunBlock& b,
                          const SharedArray<acc_t>& src) {
  if (g.vector) {
    store_slots<kVec<scalar_t>>(sample, g, b, src);
  } else {
    store_slots<1>(sample, g, b, src);
  }
}

// ---------------------------------------------------------------------------------------
// Block reductions in a fixed tree (deterministic).

// Sums a and b over the block; the totals are valid in thread 0.  scratch: 2 * kWarps.
template <typename acc_t>
FPM_DEVICE void block_sum2(acc_t& a, acc_t& b, const SharedArray<acc_t>& scratch) {
#pragma unroll
  for (int offset = simt::kWarpSize / 2; offset > 0; offset /= 2) {
    a += simt::shfl_down(a, offset);
    b += simt::shfl_down(b, offset);
  }
  const int lane = simt::lane_index(), warp = simt::warp_index();
  if (lane == 0) scratch[warp] = a, scratch[simt::kWarps + warp] = b;
  simt::sync_block();
  if (simt::thread_index() == 0) {
    a = scratch[0], b = scratch[simt::kWarps];
    for (int w = 1; w < simt::kWarps; ++w) a += scratch[w], b += scratch[simt::kWarps + w];
  }
}

template <typename acc_t>
FPM_DEVICE WelfordData<acc_t> shfl_down(WelfordData<acc_t> w, int offset) {
  return WelfordData<acc_t>{simt::shfl_down(w.count, offset), simt::shfl_down(w.mean, offset),
                            simt::shfl_down(w.m2, offset)};
}

// ---------------------------------------------------------------------------------------
// Forward, pass 1: statistics.  A block reduces its chunk with sums of x - pivot (the
// chunk's first element: the shift keeps the sums of squares well conditioned) and writes
// one (count, mean, M2) partial.

template <typename acc_t>
inline size_t stats_smem_bytes() {
  return 2 * simt::kWarps * sizeof(acc_t);
}

template <typename scalar_t, typename acc_t>
FPM_KERNEL(4) stats_kernel(const scalar_t* __restrict__ x, const StatsPlan p,
                        WelfordData<acc_t>* __restrict__ partials) {
  constexpr int V = kVec<scalar_t>;
  const unsigned block = simt::block_index();
  const int64_t group = block / p.blocks_per_group;
  const int b = static_cast<int>(block % p.blocks_per_group);
  const int64_t n = group / p.G;
  const int g = static_cast<int>(group % p.G);
  const scalar_t* sample = x + n * p.sample_numel;
  RunBlock rb;
  int count;
  if (p.strided) {
    const int first = b * p.chunk;
    rb.glob0 = first * p.runs.glob_a + g * p.Cg;
    rb.ahi = imin(p.chunk, p.positions - first);
    rb.jhi = p.Cg;
    count = rb.ahi * p.Cg;
  } else {
    rb.glob0 = g * p.M + b * p.chunk;
    rb.jhi = imin(p.chunk, p.M - b * p.chunk);
    count = rb.jhi;
  }
  const acc_t pivot = to_acc<acc_t>(simt::load_global(sample + rb.glob0));
  acc_t sum = 0, squares = 0;
  auto add = [&](scalar_t value) {
    const acc_t d = to_acc<acc_t>(value) - pivot;
    sum += d;
    squares += d * d;
  };
  auto full = [&](const Slot&, const auto& v) {
#pragma unroll
    for (int e = 0; e < static_cast<int>(sizeof(v.v) / sizeof(v.v[0])); ++e) add(v.v[e]);
  };
  auto part = [&](const Slot& s) {
#pragma unroll 1
    for (int e = s.lo; e < s.hi; ++e) add(simt::load_global(sample + s.glob + e));
  };
  if (p.runs.vector) {
    align_slots<V>(rb, sample);
    for_each_slot<V, 4>(sample, p.runs, rb, full, part);
  } else {
    for_each_slot<1, 4>(sample, p.runs, rb, full, part);
  }
  simt::SharedCarver carver{simt::dynamic_shared_memory()};
  const SharedArray<acc_t> scratch = carver.take<acc_t>(2 * simt::kWarps);
  block_sum2(sum, squares, scratch);
  if (simt::thread_index() == 0) {
    const acc_t c = static_cast<acc_t>(count);
    const acc_t m2 = squares - sum * sum / c;
    simt::store_global(partials + block, WelfordData<acc_t>{c, pivot + sum / c, m2 > acc_t(0) ? m2 : acc_t(0)});
  }
}

// ---------------------------------------------------------------------------------------
// The tile kernel.

template <typename scalar_t, typename acc_t>
struct TileArgs {
  const scalar_t* x = nullptr;
  const scalar_t* dy = nullptr;
  scalar_t* out = nullptr;                         // y (kApply) or dx (kDx)
  MixerParams params;
  const WelfordData<acc_t>* partials = nullptr;    // kApply: the statistics pass's partials
  int blocks_per_group = 0;
  acc_t eps = 0;
  acc_t* mean_out = nullptr;                       // kApply: (N, G), written once per group
  acc_t* rstd_out = nullptr;
  const acc_t* mean = nullptr;                     // kDx: (N, G)
  const acc_t* rstd = nullptr;
  const acc_t* s_ng = nullptr;                     // kDx: S[n, g]
  acc_t inv_group_numel = 0;                       // kDx: 1 / M
  acc_t* partial_ddy = nullptr;                    // kSums: (N, C, slots) sums of D * dy
  acc_t* partial_xdy = nullptr;                    //        and of x * dy
};

// The block's tile: origin, valid extents, and its (o, m, i) origin in the sample array.
struct Tile {
  int64_t n;
  int tc_i, th_i, tw_i;
  int c0, h0, w0;
  int tc, th, tw;
  int O0, M0, I0;
};

FPM_DEVICE Tile locate_tile(const TilePlan& p) {
  Tile t;
  int rest;
  p.div_tiles_w.divmod(simt::block_index(), rest, t.tw_i);
  p.div_tiles_h.divmod(rest, rest, t.th_i);
  p.div_tiles_c.divmod(rest, rest, t.tc_i);
  t.n = rest;
  t.c0 = t.tc_i * p.TC, t.h0 = t.th_i * p.TH, t.w0 = t.tw_i * p.TW;
  t.tc = imin(p.TC, p.C - t.c0), t.th = imin(p.TH, p.H - t.h0), t.tw = imin(p.TW, p.W - t.w0);
  const bool cl = p.channels_last;
  t.O0 = cl ? t.h0 : t.c0, t.M0 = cl ? t.w0 : t.h0, t.I0 = cl ? t.c0 : t.w0;
  return t;
}

template <typename acc_t>
struct TileSmem {
  SharedArray<acc_t> X, V, B, P, red;
  SharedArray<acc_t> inv_h, inv_w;            // 1/count of staged rows, of V's columns
  SharedArray<acc_t> coef, res, mean, corr;   // per channel of the tile
  SharedArray<acc_t> group_stats;             // kApply: (mean, rstd) per group of the tile
};

// The same arrays, sizes and order as layout_tiles (plan.h) counts.
template <typename acc_t, int kMode>
FPM_DEVICE TileSmem<acc_t> carve_tile_smem(const TilePlan& p) {
  simt::SharedCarver c{simt::dynamic_shared_memory()};
  TileSmem<acc_t> s;
  s.X = c.take<acc_t>(p.x_size);
  s.V = c.take<acc_t>(p.v_size);
  s.inv_h = c.take<acc_t>(p.rows_table);
  s.inv_w = c.take<acc_t>(p.cols_table);
  if (kMode != kApply) s.B = c.take<acc_t>(p.b_size);
  if (kMode == kSums) s.P = c.take<acc_t>(p.b_size), s.red = c.take<acc_t>(2 * simt::kThreads);
  if (kMode != kSums) s.coef = c.take<acc_t>(p.TCp), s.res = c.take<acc_t>(p.TCp);
  if (kMode == kDx) s.mean = c.take<acc_t>(p.TCp), s.corr = c.take<acc_t>(p.TCp);
  if (kMode == kApply) s.group_stats = c.take<acc_t>(2 * p.TCp);
  return s;
}

// 1/count of the pool window along each staged row and each column of V (0 outside the
// plane).
template <typename acc_t>
FPM_DEVICE void fill_count_tables(const TilePlan& p, const Tile& t, const TileSmem<acc_t>& s) {
  for (int k = simt::thread_index(); k < p.rows_table + p.cols_table; k += simt::kThreads) {
    const bool row = k < p.rows_table;
    const int pos = row ? t.h0 - p.hh + k : t.w0 - p.cols_origin + (k - p.rows_table);
    const int len = row ? p.H : p.W, radius = row ? p.rh : p.rw;
    const acc_t value = pos >= 0 && pos < len ? acc_t(1) / static_cast<acc_t>(window_count(pos, radius, len))
                                              : acc_t(0);
    if (row) {
      s.inv_h[k] = value;
    } else {
      s.inv_w[k - p.rows_table] = value;
    }
  }
}

// kApply prologue: each warp merges the partials of one group of the tile, in block order
// per lane and then in a fixed shuffle tree, into (mean, rstd).  Every block touching the
// group computes the same values; the group's first tile writes them out.
template <typename scalar_t, typename acc_t>
FPM_DEVICE void merge_statistics(const TilePlan& p, const Tile& t, const TileArgs<scalar_t, acc_t>& a,
                                 const TileSmem<acc_t>& s) {
  const int g_first = t.c0 / p.Cg, g_count = (t.c0 + t.tc - 1) / p.Cg - g_first + 1;
  const int lane = simt::lane_index();
  for (int j = simt::warp_index(); j < g_count; j += simt::kWarps) {
    const int64_t group = t.n * p.G + g_first + j;
    const WelfordData<acc_t>* part = a.partials + group * a.blocks_per_group;
    WelfordData<acc_t> w{0, 0, 0};
    for (int b = lane; b < a.blocks_per_group; b += simt::kWarpSize) {
      w = welford_merge(w, simt::load_global(part + b));
    }
#pragma unroll
    for (int offset = simt::kWarpSize / 2; offset > 0; offset /= 2) {
      w = welford_merge(w, shfl_down(w, offset));  // lane 0 ends with the whole tree
    }
    if (lane == 0) {
      const acc_t rstd = welford_rstd(w, a.eps);
      s.group_stats[2 * j] = w.mean;
      s.group_stats[2 * j + 1] = rstd;
      if (t.th_i == 0 && t.tw_i == 0 && (g_first + j) * p.Cg >= t.c0) {
        simt::store_global(a.mean_out + group, w.mean);
        simt::store_global(a.rstd_out + group, rstd);
      }
    }
  }
}

// kApply: coef = layer_scale * weight * sample_scale * rstd and res_scale per channel.
template <typename scalar_t, typename acc_t>
FPM_DEVICE void apply_tables(const TilePlan& p, const Tile& t, const TileArgs<scalar_t, acc_t>& a,
                             const TileSmem<acc_t>& s) {
  const int g_first = t.c0 / p.Cg;
  for (int k = simt::thread_index(); k < p.TCp; k += simt::kThreads) {
    acc_t coef = 0, res = 0;
    if (k < t.tc) {
      const int c = t.c0 + k;
      const acc_t rstd = s.group_stats[2 * (c / p.Cg - g_first) + 1];
      coef = a.params.template channel_factor<scalar_t, acc_t>(c) *
             a.params.template sample_factor<scalar_t, acc_t>(t.n) * rstd;
      res = a.params.template residual<scalar_t, acc_t>(c);
    }
    s.coef[k] = coef, s.res[k] = res;
  }
}

// kDx: coef, res, the group mean and corr = rstd^3 * S / M per channel.
template <typename scalar_t, typename acc_t>
FPM_DEVICE void dx_tables(const TilePlan& p, const Tile& t, const TileArgs<scalar_t, acc_t>& a,
                          const TileSmem<acc_t>& s) {
  for (int k = simt::thread_index(); k < p.TCp; k += simt::kThreads) {
    acc_t coef = 0, res = 0, mean = 0, corr = 0;
    if (k < t.tc) {
      const int c = t.c0 + k;
      const int64_t ng = t.n * p.G + c / p.Cg;
      const acc_t r = simt::load_global(a.rstd + ng);
      coef = a.params.template channel_factor<scalar_t, acc_t>(c) *
             a.params.template sample_factor<scalar_t, acc_t>(t.n) * r;
      res = a.params.template residual<scalar_t, acc_t>(c);
      mean = simt::load_global(a.mean + ng);
      corr = r * r * r * simt::load_global(a.s_ng + ng) * a.inv_group_numel;
    }
    s.coef[k] = coef, s.res[k] = res, s.mean[k] = mean, s.corr[k] = corr;
  }
}

template <typename acc_t, int CW>
FPM_DEVICE void add_scaled(Pack<acc_t, CW>& sum, const Pack<acc_t, CW>& v, acc_t scale) {
#pragma unroll
  for (int e = 0; e < CW; ++e) sum.v[e] += v.v[e] * scale;
}

// The window sum along one axis of the shared array `src`, for the vector of CW elements at
// `at` whose position on that axis is `pos` (of `len`, radius `radius`); neighbours along the
// axis are `tap` apart and taps past the ends of the axis are left out.  kWeighted: each tap
// is multiplied by weights[k + d], the 1/count of its position (k: the entry of `pos`).
template <typename acc_t, bool kR1, bool kWeighted>
FPM_DEVICE Pack<acc_t, kVec<acc_t>> window_sum(const SharedArray<acc_t>& src, int at, int tap, int pos, int len,
                                               int radius, const SharedArray<acc_t>& weights, int k) {
  constexpr int CW = kVec<acc_t>;
  Pack<acc_t, CW> sum = src.template load<CW>(at);
  if (kWeighted) {
    const acc_t w = weights[k];
#pragma unroll
    for (int e = 0; e < CW; ++e) sum.v[e] *= w;
  }
  if (kR1) {
    if (pos > 0) add_scaled(sum, src.template load<CW>(at - tap), kWeighted ? weights[k - 1] : acc_t(1));
    if (pos < len - 1) add_scaled(sum, src.template load<CW>(at + tap), kWeighted ? weights[k + 1] : acc_t(1));
  } else {
    const int lo = imax(-radius, -pos), hi = imin(radius, len - 1 - pos);
    for (int d = lo; d <= hi; ++d) {
      if (d != 0) add_scaled(sum, src.template load<CW>(at + d * tap), kWeighted ? weights[k + d] : acc_t(1));
    }
  }
  return sum;
}

// Phase 2: V = the vertical window sums of X (kWeighted: each tap times 1/count of its
// row, for P^T), for the tile's rows and every staged column.  NCHW columns outside the
// staged input (V's margins, the plane's border) are set to zero.
template <typename acc_t, bool kR1, bool kWeighted>
FPM_DEVICE void vertical_sums(const TilePlan& p, const Tile& t, const TileSmem<acc_t>& s) {
  constexpr int CW = kVec<acc_t>;
  using Vec = Pack<acc_t, CW>;
  const bool cl = p.channels_last;
  const int total = p.v_rows * p.v_segs;
  const int tap = cl ? p.xbox.ext_m * p.xbox.ext_i : p.xbox.ext_i;  // X's row distance
  const int col_lo = p.margin + imax(-p.hw, -t.w0);
  const int col_hi = p.margin + imin(t.tw + p.hw, p.W - t.w0);
  for (int sigma = simt::thread_index(); sigma < total; sigma += simt::kThreads) {
    int row, seg, ro, rm;
    p.div_v_segs.divmod(sigma, row, seg);
    p.div_v_rows_m.divmod(row, ro, rm);
    const int i0 = seg * CW;
    const int hrel = cl ? ro : rm;
    int vi, xi;
    if (cl) {
      const int w = t.w0 - p.hw + rm;
      if (hrel >= t.th || w < 0 || w >= p.W) continue;
      vi = (ro * p.vbox.ext_m + rm) * p.vbox.ext_i + i0;
      xi = ((ro + p.hh) * p.xbox.ext_m + rm) * p.xbox.ext_i + i0;
    } else {
      if (hrel >= t.th || ro >= t.tc) continue;
      vi = (ro * p.TH + rm) * p.vbox.ext_i + i0;
      if (i0 + CW <= col_lo || i0 >= col_hi) {
        s.V.template store<CW>(vi, Vec{});
        continue;
      }
      xi = (ro * p.xbox.ext_m + rm + p.hh) * p.xbox.ext_i + i0 - p.margin + p.xbox.off_i;
    }
    // hrel + hh: the staged row of h, the 1/count table's entry
    Vec sum = window_sum<acc_t, kR1, kWeighted>(s.X, xi, tap, t.h0 + hrel, p.H, p.rh, s.inv_h, hrel + p.hh);
    if (!cl && (i0 < col_lo || i0 + CW > col_hi)) {
#pragma unroll
      for (int e = 0; e < CW; ++e) {
        if (i0 + e < col_lo || i0 + e >= col_hi) sum.v[e] = 0;
      }
    }
    s.V.template store<CW>(vi, sum);
  }
}

// Phase 3, per segment of CW outputs: the mode's epilogue from the box sums.
//   kApply  X[x_at] (x - pivot) becomes y
//   kSums   P[b_at] = D * dy, B[b_at] (dy) becomes x * dy; zero past `valid`
//   kDx     B[b_at] (x) becomes dx; X[x_at] holds dy
template <typename acc_t, int kMode, int CW>
FPM_DEVICE void finish_segment(const TileSmem<acc_t>& s, const acc_t (&box)[CW], const acc_t (&scale)[CW],
                               const acc_t (&coef)[CW], const acc_t (&res)[CW], const acc_t (&mean)[CW],
                               const acc_t (&corr)[CW], int x_at, int b_at, int valid, acc_t pivot) {
  using Vec = Pack<acc_t, CW>;
  const Vec centre = s.X.template load<CW>(x_at);
  Vec out;
  if (kMode == kApply) {
#pragma unroll
    for (int e = 0; e < CW; ++e) {
      const acc_t xc = centre.v[e];
      out.v[e] = res[e] * (xc + pivot) + coef[e] * (box[e] * scale[e] - xc);
    }
    s.X.template store<CW>(x_at, out);
  } else if (kMode == kSums) {
    const Vec grad = s.B.template load<CW>(b_at);
    Vec xdy;
#pragma unroll
    for (int e = 0; e < CW; ++e) {
      const acc_t xc = centre.v[e];
      out.v[e] = e < valid ? (box[e] * scale[e] - xc) * grad.v[e] : acc_t(0);
      xdy.v[e] = e < valid ? (xc + pivot) * grad.v[e] : acc_t(0);
    }
    s.P.template store<CW>(b_at, out);
    s.B.template store<CW>(b_at, xdy);
  } else {
    const Vec xv = s.B.template load<CW>(b_at);
#pragma unroll
    for (int e = 0; e < CW; ++e) {
      const acc_t grad = centre.v[e];
      out.v[e] = res[e] * grad + coef[e] * (box[e] - grad) - corr[e] * (xv.v[e] - mean[e]);
    }
    s.B.template store<CW>(b_at, out);
  }
}

// NCHW phase 3, one work item: CW consecutive outputs (from column q) of row hr of channel
// cr; the horizontal sums slide along the row of V (whose zero margins make border taps
// vanish).
template <typename acc_t, bool kR1, int kMode>
FPM_DEVICE void segment_nchw(const TilePlan& p, const Tile& t, const TileSmem<acc_t>& s, acc_t pivot, int cr,
                             int hr, int q, int b_at) {
  constexpr int CW = kVec<acc_t>;
  constexpr bool kWeighted = kMode == kDx;
  using Vec = Pack<acc_t, CW>;
  const int col = p.margin + q;  // V's column of output q
  const int v_at = (cr * p.TH + hr) * p.vbox.ext_i + col;
  acc_t box[CW];
  if (kR1) {
    acc_t taps[CW + 2];
    const Vec mid = s.V.template load<CW>(v_at);
    taps[0] = s.V[v_at - 1];
    taps[CW + 1] = s.V[v_at + CW];
#pragma unroll
    for (int e = 0; e < CW; ++e) taps[e + 1] = mid.v[e];
    if (kWeighted) {
      const Vec w = s.inv_w.template load<CW>(col);
      taps[0] *= s.inv_w[col - 1];
      taps[CW + 1] *= s.inv_w[col + CW];
#pragma unroll
      for (int e = 0; e < CW; ++e) taps[e + 1] *= w.v[e];
    }
#pragma unroll
    for (int e = 0; e < CW; ++e) box[e] = taps[e] + taps[e + 1] + taps[e + 2];
  } else {
#pragma unroll
    for (int e = 0; e < CW; ++e) {
      acc_t sum = 0;
      for (int d = -p.rw; d <= p.rw; ++d) {
        sum += kWeighted ? s.V[v_at + e + d] * s.inv_w[col + e + d] : s.V[v_at + e + d];
      }
      box[e] = sum;
    }
  }
  const acc_t row_scale = s.inv_h[hr + p.hh];
  const Vec col_scale = s.inv_w.template load<CW>(col);
  acc_t scale[CW], coef[CW], res[CW], mean[CW], corr[CW];
#pragma unroll
  for (int e = 0; e < CW; ++e) {
    scale[e] = row_scale * col_scale.v[e];
    coef[e] = kMode == kSums ? acc_t(0) : s.coef[cr];
    res[e] = kMode == kSums ? acc_t(0) : s.res[cr];
    mean[e] = kMode == kDx ? s.mean[cr] : acc_t(0);
    corr[e] = kMode == kDx ? s.corr[cr] : acc_t(0);
  }
  const int x_at = (cr * p.xbox.ext_m + hr + p.hh) * p.xbox.ext_i + p.xbox.off_i + q;
  finish_segment<acc_t, kMode, CW>(s, box, scale, coef, res, mean, corr, x_at, b_at, t.tw - q, pivot);
}

// channels_last phase 3, one work item: CW consecutive channels (from q) of position (hr,
// wr); the horizontal taps are V's neighbouring positions.
template <typename acc_t, bool kR1, int kMode>
FPM_DEVICE void segment_channels_last(const TilePlan& p, const Tile& t, const TileSmem<acc_t>& s, acc_t pivot,
                                      int hr, int wr, int q, int b_at) {
  constexpr int CW = kVec<acc_t>;
  constexpr bool kWeighted = kMode == kDx;
  using Vec = Pack<acc_t, CW>;
  const int tap = p.vbox.ext_i;  // V's position distance
  const int w = t.w0 + wr, pos = wr + p.hw;  // pos: V's (and X's) column of w
  const int v_at = (hr * p.vbox.ext_m + pos) * p.vbox.ext_i + q;
  const Vec sum = window_sum<acc_t, kR1, kWeighted>(s.V, v_at, tap, w, p.W, p.rw, s.inv_w, pos);
  const acc_t position_scale = s.inv_h[hr + p.hh] * s.inv_w[pos];
  acc_t box[CW], scale[CW], coef[CW], res[CW], mean[CW], corr[CW];
  Vec cv{}, rv{}, mv{}, kv{};
  if (kMode != kSums) cv = s.coef.template load<CW>(q), rv = s.res.template load<CW>(q);
  if (kMode == kDx) mv = s.mean.template load<CW>(q), kv = s.corr.template load<CW>(q);
#pragma unroll
  for (int e = 0; e < CW; ++e) {
    box[e] = sum.v[e], scale[e] = position_scale;
    coef[e] = cv.v[e], res[e] = rv.v[e], mean[e] = mv.v[e], corr[e] = kv.v[e];
  }
  const int x_at = ((hr + p.hh) * p.xbox.ext_m + pos) * p.xbox.ext_i + q;
  finish_segment<acc_t, kMode, CW>(s, box, scale, coef, res, mean, corr, x_at, b_at, t.tc - q, pivot);
}

// Phase 3: a work item is a row (o, m) of the output tile and a CW-wide segment along it.
// Rows outside the plane are skipped (kSums: their products are zero).
template <typename acc_t, bool kR1, int kMode>
FPM_DEVICE void epilogue(const TilePlan& p, const Tile& t, const TileSmem<acc_t>& s, acc_t pivot) {
  constexpr int CW = kVec<acc_t>;
  const bool cl = p.channels_last;
  const int total = p.o_rows * p.o_segs;
  for (int sigma = simt::thread_index(); sigma < total; sigma += simt::kThreads) {
    int row, seg, ro, rm;
    p.div_o_segs.divmod(sigma, row, seg);
    p.div_o_rows_m.divmod(row, ro, rm);  // (channel, row) in NCHW, (row, column) in channels_last
    const int q = seg * CW;
    const int b_at = (ro * p.o_rows_m + rm) * p.bbox.ext_i + q;
    const bool inside = cl ? ro < t.th && rm < t.tw : ro < t.tc && rm < t.th;
    if (!inside) {
      if (kMode == kSums) s.P.template store<CW>(b_at, Pack<acc_t, CW>{}), s.B.template store<CW>(b_at, Pack<acc_t, CW>{});
      continue;
    }
    if (cl) {
      segment_channels_last<acc_t, kR1, kMode>(p, t, s, pivot, ro, rm, q, b_at);
    } else {
      segment_nchw<acc_t, kR1, kMode>(p, t, s, pivot, ro, rm, q, b_at);
    }
  }
}

// kSums phase 4: the sums of P (D * dy) and B (x * dy) per channel of the tile, in a fixed
// order, to this tile's slot of the partials.
template <typename scalar_t, typename acc_t>
FPM_DEVICE void reduce_products(const TilePlan& p, const Tile& t, const TileArgs<scalar_t, acc_t>& a,
                                const TileSmem<acc_t>& s) {
  constexpr int CW = kVec<acc_t>;
  const int lane = simt::lane_index(), warp = simt::warp_index();
  const int slot = t.th_i * p.tiles_w + t.tw_i;
  auto write = [&](int c, acc_t d, acc_t xdy) {
    const int64_t at = (t.n * p.C + t.c0 + c) * p.slots + slot;
    simt::store_global(a.partial_ddy + at, d);
    simt::store_global(a.partial_xdy + at, xdy);
  };
  if (!p.channels_last) {
    // A warp per channel: its TH x TWp products are contiguous.
    const int plane = p.TH * p.bbox.ext_i;
    for (int c = warp; c < p.TC; c += simt::kWarps) {
      acc_t d = 0, xdy = 0;
      for (int k = lane * CW; k < plane; k += simt::kWarpSize * CW) {
        const Pack<acc_t, CW> pd = s.P.template load<CW>(c * plane + k);
        const Pack<acc_t, CW> px = s.B.template load<CW>(c * plane + k);
#pragma unroll
        for (int e = 0; e < CW; ++e) d += pd.v[e], xdy += px.v[e];
      }
#pragma unroll
      for (int offset = simt::kWarpSize / 2; offset > 0; offset /= 2) {
        d += simt::shfl_down(d, offset);
        xdy += simt::shfl_down(xdy, offset);
      }
      if (lane == 0 && c < t.tc) write(c, d, xdy);
    }
  } else {
    // Lanes along channels, warps split the positions, then warp 0 adds the warps in order.
    const int positions = p.TH * p.TW, stride = p.bbox.ext_i;
    for (int c0 = 0; c0 < p.TCp; c0 += simt::kWarpSize) {
      const int c = c0 + lane;
      acc_t d = 0, xdy = 0;
      if (c < p.TCp) {
        for (int k = warp; k < positions; k += simt::kWarps) d += s.P[k * stride + c], xdy += s.B[k * stride + c];
      }
      s.red[warp * simt::kWarpSize + lane] = d;
      s.red[simt::kThreads + warp * simt::kWarpSize + lane] = xdy;
      simt::sync_block();
      if (warp == 0 && c < t.tc) {
        d = 0, xdy = 0;
        for (int w = 0; w < simt::kWarps; ++w) {
          d += s.red[w * simt::kWarpSize + lane];
          xdy += s.red[simt::kThreads + w * simt::kWarpSize + lane];
        }
        write(c, d, xdy);
      }
      simt::sync_block();
    }
  }
}

template <typename scalar_t, typename acc_t, bool kR1, int kMode>
FPM_KERNEL(kTileBlocksPerSM<scalar_t>) tile_kernel(const TilePlan p, const TileArgs<scalar_t, acc_t> a) {
  const Tile t = locate_tile(p);
  const TileSmem<acc_t> s = carve_tile_smem<acc_t, kMode>(p);
  const int64_t base = t.n * p.sample_numel;
  const scalar_t* x = a.x + base;
  const scalar_t* dy = kMode == kApply ? nullptr : a.dy + base;

  // Phase 1: tables, the apply kernel's statistics, staging.
  fill_count_tables(p, t, s);
  if (kMode == kApply) merge_statistics(p, t, a, s);
  if (kMode == kDx) dx_tables(p, t, a, s);
  // x is staged minus its value at the tile origin (the sums are shift-invariant; a value
  // of the data keeps them well conditioned whatever the mean).
  const acc_t pivot =
      kMode == kDx ? acc_t(0)
                   : to_acc<acc_t>(simt::load_global(x + t.O0 * p.dims.stride_o() + t.M0 * p.dims.DI + t.I0));
  stage_box(kMode == kDx ? dy : x, p.stage_x, bind_box(p.stage_x, p.dims, t.O0, t.M0, t.I0), s.X, pivot);
  if (kMode != kApply) {
    stage_box(kMode == kDx ? x : dy, p.stage_b, bind_box(p.stage_b, p.dims, t.O0, t.M0, t.I0), s.B, acc_t(0));
  }
  simt::sync_block();

  // Phase 2: vertical sums (and the apply kernel's per-channel factors).
  if (kMode == kApply) apply_tables(p, t, a, s);
  vertical_sums<acc_t, kR1, kMode == kDx>(p, t, s);
  simt::sync_block();

  // Phase 3: horizontal sums and the epilogue.
  epilogue<acc_t, kR1, kMode>(p, t, s, pivot);
  simt::sync_block();

  // Phase 4: results out.
  if (kMode == kSums) {
    reduce_products<scalar_t, acc_t>(p, t, a, s);
  } else {
    store_box(a.out + base, p.store_out, bind_box(p.store_out, p.dims, t.O0, t.M0, t.I0),
              kMode == kApply ? s.X : s.B);
  }
}

// ---------------------------------------------------------------------------------------
// Backward folds.  The sums pass leaves per-(n, c, slot) partials of D * dy and x * dy.
// One launch finishes every reduction, each in a fixed order:
//   blocks [0, N * G)          S[n, g] = sum over the group's channels and slots of a * D dy
//   blocks [N * G, + C / 256)  per channel c, T[c] = sum_n rstd * sample_scale * sum D dy,
//                              sum x dy, and from them the requested parameter gradients.

struct FoldPlan {
  int64_t N = 0;
  int C = 0, G = 1, Cg = 1, slots = 1;
  unsigned blocks = 0;
};

inline FoldPlan plan_fold(const MixerShape& s, int slots) {
  FoldPlan f;
  f.N = s.N, f.C = static_cast<int>(s.C), f.G = static_cast<int>(s.G), f.Cg = static_cast<int>(s.Cg);
  f.slots = slots;
  const int64_t blocks = s.N * s.G + ceil_div(s.C, kThreads);
  if (blocks > INT32_MAX) plan_error("input too large for one grid (" + std::to_string(blocks) + " blocks)");
  f.blocks = static_cast<unsigned>(blocks);
  return f;
}

template <typename scalar_t, typename acc_t>
FPM_KERNEL(4) fold_kernel(const FoldPlan f, const acc_t* __restrict__ partial_ddy,
                       const acc_t* __restrict__ partial_xdy, const acc_t* __restrict__ rstd,
                       const MixerParams params, const ParamGrads grads, acc_t* __restrict__ s_ng) {
  const int64_t group_blocks = f.N * f.G;
  const int tid = simt::thread_index();
  const int64_t block = simt::block_index();
  if (block < group_blocks) {  // block-uniform branch
    const int64_t ng = block, n = ng / f.G;
    const int c0 = static_cast<int>(ng % f.G) * f.Cg;
    const acc_t sample = params.sample_factor<scalar_t, acc_t>(n);
    acc_t sum = 0, unused = 0;
    for (int i = tid; i < f.Cg * f.slots; i += kThreads) {
      const int c = c0 + i / f.slots;
      sum += params.channel_factor<scalar_t, acc_t>(c) * sample *
             simt::load_global(partial_ddy + (n * f.C + c) * f.slots + i % f.slots);
    }
    simt::SharedCarver carver{simt::dynamic_shared_memory()};
    block_sum2(sum, unused, carver.take<acc_t>(2 * simt::kWarps));
    if (tid == 0) simt::store_global(s_ng + ng, sum);
    return;
  }
  const int c = static_cast<int>(block - group_blocks) * kThreads + tid;
  if (c >= f.C || !grads.any()) return;
  acc_t t = 0, xdy = 0;
  for (int64_t n = 0; n < f.N; ++n) {
    const int64_t at = (n * f.C + c) * f.slots;
    acc_t d = 0;
    for (int slot = 0; slot < f.slots; ++slot) {
      d += simt::load_global(partial_ddy + at + slot);
      xdy += simt::load_global(partial_xdy + at + slot);
    }
    t += simt::load_global(rstd + n * f.G + c / f.Cg) * params.sample_factor<scalar_t, acc_t>(n) * d;
  }
  grads.write<scalar_t, acc_t>(params, c, t, xdy);
}

template <typename acc_t>
inline size_t fold_smem_bytes() {
  return 2 * simt::kWarps * sizeof(acc_t);
}

}  // namespace cuda_kernels
}  // namespace fused_poolformer

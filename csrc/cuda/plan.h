// Launch geometry of the CUDA kernels (kernels.cuh), computed on the host from the shape,
// the dtypes and the device's limits.  Plain C++: the emulator (tests/cuda_emulator.cpp)
// plans its launches with the same code as the CUDA launcher.
//
// Coordinates.  One sample of x is a dense 3-D array [DO][DM][DI] whose innermost axis is
// contiguous: (C, H, W) for NCHW and (H, W, C) for channels_last.  A tile is a box of it; its
// (o, m, i) axes are (channel, row, column) for NCHW and (row, column, channel) for
// channels_last.  Offsets inside a sample are 32-bit (a sample has < 2^31 elements, checked
// here); the sample's base offset n * sample_numel is 64-bit.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../pool_mixer.h"
#include "api.h"
#include "simt.h"

namespace fused_poolformer {
namespace cuda_kernels {

using simt::FastDivmod;
using simt::kThreads;

// Blocks of kThreads per multiprocessor the kernels' register budget allows (their
// __launch_bounds__): 64 registers per thread, 80 for the half types' tile kernels.
template <typename scalar_t>
constexpr int kTileBlocksPerSM = sizeof(scalar_t) == 2 ? 3 : 4;
constexpr int kMaxBlocksPerSM = 2048 / kThreads;

enum TileMode : int { kApply = 0, kSums = 1, kDx = 2 };

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }
inline int round_up(int a, int b) { return (a + b - 1) / b * b; }

// Splits n into equal pieces of at most max_piece (the last one may be shorter).
inline int even_split(int n, int max_piece) {
  max_piece = std::max(1, max_piece);
  const int pieces = ceil_div(n, max_piece);
  return ceil_div(n, pieces);
}

[[noreturn]] inline void plan_error(const std::string& message) {
  throw std::runtime_error("pool_mixer (CUDA): " + message);
}

// The [DO][DM][DI] array of one sample.
struct Dims {
  int DO = 1, DM = 1, DI = 1;
  FPM_HD int stride_o() const { return DM * DI; }
};

// A box of a shared-memory array [.][ext_m][ext_i]: the tile-relative element (o, m, i) is at
// ((o + off_o) * ext_m + m + off_m) * ext_i + i + off_i.
struct SmemBox {
  int off_o = 0, off_m = 0, off_i = 0;
  int ext_m = 1, ext_i = 1;
  FPM_HD int offset(int o, int m, int i) const {
    return ((o + off_o) * ext_m + m + off_m) * ext_i + i + off_i;
  }
};

// How a box of the sample array is copied between global and shared memory.  The box is
// cut into RA x RB runs of L elements that are contiguous in global memory: one run when it
// covers whole (m, i) planes, one run per o when it covers whole rows, else one per (o, m).
// Each run is read or written in slots of V elements aligned to 16 bytes in global memory
// (all runs share their alignment, else V = 1); S slots per run cover any alignment.
// Element j of a run lands in shared-memory row j / row_len (row_stride apart), column
// j % row_len.  Thread t takes slots t, t + kThreads, ...: no per-element division.
struct RunGrid {
  int bo = 0, bm = 0, bi = 0;  // box origin, tile-relative (may be negative: halo)
  int eo = 1, em = 1, ei = 1;  // box extents
  SmemBox smem;
  int kind = 0;                // 0: one run, 1: runs along o, 2: runs along (o, m)
  int RA = 1, RB = 1, L = 0, S = 0;
  int glob_a = 0, glob_b = 0;  // global distance between runs along A and B
  int smem_a = 0, smem_b = 0;  // shared-memory distance
  int row_len = 1, row_stride = 1;
  bool dense = true;           // row_len == row_stride: element j at run offset + j
  bool vector = false;         // 16-byte slots
  FastDivmod div_slots, div_rb, div_row;

  int total_slots() const { return RA * RB * S; }
};

inline RunGrid make_run_grid(int bo, int bm, int bi, int eo, int em, int ei, const Dims& d,
                             const SmemBox& s, int vec) {
  RunGrid g;
  g.bo = bo, g.bm = bm, g.bi = bi, g.eo = eo, g.em = em, g.ei = ei, g.smem = s;
  const bool whole_rows = ei == d.DI && bi == 0;
  const bool whole_planes = whole_rows && em == d.DM && bm == 0 && s.off_m == 0 && s.ext_m == em;
  const int smem_o = s.ext_m * s.ext_i;
  if (whole_planes) {
    g.kind = 0, g.L = eo * em * ei;
  } else if (whole_rows) {
    g.kind = 1, g.L = em * ei, g.RA = eo, g.glob_a = d.stride_o(), g.smem_a = smem_o;
  } else {
    g.kind = 2, g.L = ei, g.RA = eo, g.RB = em;
    g.glob_a = d.stride_o(), g.glob_b = d.DI, g.smem_a = smem_o, g.smem_b = s.ext_i;
  }
  g.row_len = ei, g.row_stride = s.ext_i;
  g.dense = g.kind == 2 || g.row_len == g.row_stride;
  g.vector = vec > 1 && (g.RA == 1 || g.glob_a % vec == 0) && (g.RB == 1 || g.glob_b % vec == 0);
  const int v = g.vector ? vec : 1;
  g.S = (g.L + 2 * v - 2) / v;
  return g;
}

inline void finish_run_grid(RunGrid& g) {
  g.div_slots = FastDivmod(g.S), g.div_rb = FastDivmod(g.RB), g.div_row = FastDivmod(g.row_len);
}

// ---------------------------------------------------------------------------------------
// Forward statistics: block b of group (n, g) reduces a chunk of the group to one
// (count, mean, M2) partial.  A group is contiguous (NCHW, or channels_last with G = 1),
// else (channels_last, G > 1) it is H*W runs of Cg channels, C apart.

struct StatsPlan {
  int G = 1, Cg = 1, M = 0;     // groups per sample, channels per group, elements per group
  int blocks_per_group = 1;
  int64_t groups = 0;           // N * G
  int64_t sample_numel = 0;
  bool strided = false;
  int chunk = 0;                // elements (contiguous) or positions (strided) per block
  int positions = 0;            // H * W
  RunGrid runs;                 // one block's chunk
  unsigned blocks = 0;
};

// Inputs whose samples have 2^31 or more elements are outside the kernels' 32-bit offsets.
inline void check_sample_size(const MixerShape& s) {
  const int64_t sample = s.C * s.H * s.W;
  if (sample >= (int64_t(1) << 31)) {
    plan_error("one sample of x has C*H*W = " + std::to_string(sample) +
               " elements; the CUDA kernels support fewer than 2**31 per sample "
               "(use backend='cpu' or 'reference')");
  }
}

inline StatsPlan plan_statistics(const MixerShape& s, int scalar_size, const DeviceLimits& dev) {
  check_sample_size(s);
  StatsPlan p;
  const int vec = 16 / scalar_size;
  p.G = static_cast<int>(s.G), p.Cg = static_cast<int>(s.Cg);
  p.M = static_cast<int>(s.group_numel());
  p.groups = s.N * s.G;
  p.sample_numel = s.C * s.H * s.W;
  p.positions = static_cast<int>(s.H * s.W);
  p.strided = s.channels_last && s.G > 1;
  // 2 batches of 4 vectors per thread, fewer when that would leave multiprocessors idle.
  int chunk = kThreads * 8 * vec;
  while (chunk > kThreads * vec && p.groups * ceil_div(p.M, chunk) < 4 * dev.multiprocessors) chunk /= 2;
  Dims d;
  if (p.strided) {
    p.chunk = std::max(1, chunk / p.Cg);  // positions
    p.blocks_per_group = ceil_div(p.positions, p.chunk);
    d.DO = p.positions, d.DM = 1, d.DI = static_cast<int>(s.C);
    SmemBox unused;
    p.runs = make_run_grid(0, 0, 0, p.chunk, 1, p.Cg, d, unused, vec);
  } else {
    p.chunk = std::min(chunk, p.M);
    p.blocks_per_group = ceil_div(p.M, p.chunk);
    d.DO = 1, d.DM = 1, d.DI = p.chunk;
    SmemBox unused;
    p.runs = make_run_grid(0, 0, 0, 1, 1, p.chunk, d, unused, vec);
  }
  finish_run_grid(p.runs);
  const int64_t blocks = p.groups * p.blocks_per_group;
  if (blocks > INT32_MAX) plan_error("input too large for one grid (" + std::to_string(blocks) + " blocks)");
  p.blocks = static_cast<unsigned>(blocks);
  return p;
}

// ---------------------------------------------------------------------------------------
// Tile kernels.  A block owns an output tile of TC x TH x TW (channels x rows x columns) of
// one sample:
//   NCHW            whole rows: a band of TH rows of one plane, or (TH = H) TC whole planes;
//                   rows wider than a tile can hold are split into TW-wide pieces.
//   channels_last   TC channels (a 128-byte vector per position) x a TH x TW patch.
// It stages its input with a halo of hh rows and hw columns (the clipped pool radii, where
// the tile does not span the plane) in shared memory X, sums each column's window into V,
// and takes the horizontal window sums of V in the epilogue.  In NCHW, V's rows carry
// `margin` zero columns on both sides so the horizontal sums need no bounds checks.

struct TilePlan {
  int64_t N = 0;
  int64_t sample_numel = 0;
  int C = 0, H = 0, W = 0, G = 1, Cg = 1;
  int rh = 0, rw = 0;           // effective radii (pool_mixer.h effective_radius)
  int hh = 0, hw = 0;           // staged halo rows, columns
  int TC = 1, TH = 1, TW = 1;   // output tile
  int TCp = 1;                  // TC rounded up to the shared-memory vector (per-channel tables)
  int margin = 0;               // NCHW: zero columns left of V's rows
  int tiles_c = 1, tiles_h = 1, tiles_w = 1;
  FastDivmod div_tiles_w, div_tiles_h, div_tiles_c;
  Dims dims;
  SmemBox xbox, vbox, bbox;     // X (input with halo), V (vertical sums), B (output-sized)
  int x_size = 0, v_size = 0, b_size = 0;  // elements
  int rows_table = 0, cols_table = 0;      // 1/count tables: staged rows, V columns
  int cols_origin = 0;          // column w0 - cols_origin is entry 0 of the column table
  int v_rows_m = 1, v_rows = 0, v_segs = 0;  // vertical pass: rows (o, m) x segments along i
  FastDivmod div_v_rows_m, div_v_segs;
  int o_rows_m = 1, o_rows = 0, o_segs = 0;  // epilogue
  FastDivmod div_o_rows_m, div_o_segs;
  RunGrid stage_x, stage_b, store_out;
  int slots = 1;                // spatial tiles per plane (sums partials per (n, c))
  unsigned blocks = 0;
  int smem_bytes = 0;
  int mode = kApply;
  bool channels_last = false;
  bool radius_one = false;      // the kernels unrolled for pool_size 3
};

struct TileShape {
  int TC, TH, TW;
};

// Fills everything of the plan that follows from the tile shape; returns the shared-memory
// bytes the mode needs (tile_smem in kernels.cuh carves the same arrays in the same order).
inline int64_t layout_tiles(TilePlan& p, const TileShape& t, int scalar_size, int acc_size) {
  const int vec = 16 / scalar_size, cw = 16 / acc_size;
  p.TC = t.TC, p.TH = t.TH, p.TW = t.TW;
  p.hh = p.TH < p.H ? p.rh : 0;
  p.hw = p.TW < p.W ? p.rw : 0;
  const int tap_w = p.radius_one ? std::max(p.rw, 1) : p.rw;  // horizontal taps either side
  p.TCp = round_up(p.TC, cw);
  p.tiles_c = ceil_div(p.C, p.TC), p.tiles_h = ceil_div(p.H, p.TH), p.tiles_w = ceil_div(p.W, p.TW);
  const int rows_in = p.TH + 2 * p.hh, cols_in = p.TW + 2 * p.hw;
  if (!p.channels_last) {
    p.dims = Dims{p.C, p.H, p.W};
    const int x_left = round_up(p.hw, cw);
    p.margin = round_up(std::max(tap_w, p.hw), cw);
    const int twp = round_up(p.TW, cw);
    const int wp = round_up(p.margin + twp + std::max(tap_w, p.hw), cw);
    p.xbox = SmemBox{0, p.hh, x_left, rows_in, round_up(x_left + p.TW + p.hw, cw)};
    p.vbox = SmemBox{0, 0, p.margin, p.TH, wp};
    p.bbox = SmemBox{0, 0, 0, p.TH, twp};
    p.x_size = p.TC * rows_in * p.xbox.ext_i;
    p.v_size = p.TC * p.TH * wp;
    p.b_size = p.TC * p.TH * twp;
    p.cols_table = wp, p.cols_origin = p.margin;
    p.v_rows_m = p.TH, p.v_rows = p.TC * p.TH, p.v_segs = wp / cw;
    p.o_rows_m = p.TH, p.o_rows = p.TC * p.TH, p.o_segs = twp / cw;
    p.stage_x = make_run_grid(0, -p.hh, -p.hw, p.TC, rows_in, cols_in, p.dims, p.xbox, vec);
    p.stage_b = make_run_grid(0, 0, 0, p.TC, p.TH, p.TW, p.dims, p.bbox, vec);
  } else {
    p.dims = Dims{p.H, p.W, p.C};
    p.margin = 0;
    p.xbox = SmemBox{p.hh, p.hw, 0, cols_in, p.TCp};
    p.vbox = SmemBox{0, p.hw, 0, cols_in, p.TCp};
    p.bbox = SmemBox{0, 0, 0, p.TW, p.TCp};
    p.x_size = rows_in * cols_in * p.TCp;
    p.v_size = p.TH * cols_in * p.TCp;
    p.b_size = p.TH * p.TW * p.TCp;
    p.cols_table = cols_in, p.cols_origin = p.hw;
    p.v_rows_m = cols_in, p.v_rows = p.TH * cols_in, p.v_segs = p.TCp / cw;
    p.o_rows_m = p.TW, p.o_rows = p.TH * p.TW, p.o_segs = p.TCp / cw;
    p.stage_x = make_run_grid(-p.hh, -p.hw, 0, rows_in, cols_in, p.TC, p.dims, p.xbox, vec);
    p.stage_b = make_run_grid(0, 0, 0, p.TH, p.TW, p.TC, p.dims, p.bbox, vec);
  }
  const int out_o = p.channels_last ? p.TH : p.TC, out_m = p.channels_last ? p.TW : p.TH,
            out_i = p.channels_last ? p.TC : p.TW;
  p.store_out = make_run_grid(0, 0, 0, out_o, out_m, out_i, p.dims,
                              p.mode == kApply ? p.xbox : p.bbox, vec);
  p.rows_table = rows_in;
  p.slots = p.tiles_h * p.tiles_w;
  // Shared memory, in the order tile_smem carves it (each array rounded to 16 bytes).
  auto bytes = [&](int64_t elems) { return (elems * acc_size + 15) / 16 * 16; };
  int64_t total = bytes(p.x_size) + bytes(p.v_size) + bytes(p.rows_table) + bytes(p.cols_table);
  if (p.mode != kApply) total += bytes(p.b_size);
  if (p.mode == kSums) total += bytes(p.b_size) + bytes(2 * kThreads);
  if (p.mode != kSums) total += 2 * bytes(p.TCp);                 // coef, res
  if (p.mode == kDx) total += 2 * bytes(p.TCp);                   // mean, corr
  if (p.mode == kApply) total += bytes(2 * p.TCp);                // group statistics
  return total;
}

inline TileShape choose_tile(const TilePlan& p, int target, int scalar_size, int acc_size,
                             bool split_rows) {
  TileShape t{1, 1, 1};
  if (!p.channels_last) {
    t.TW = split_rows ? even_split(p.W, std::max(32, target)) : p.W;
    t.TH = even_split(p.H, std::clamp(target / t.TW, 1, p.H));
    const bool whole_planes = t.TH == p.H && t.TW == p.W;
    t.TC = whole_planes ? even_split(p.C, std::clamp(target / (p.H * p.W), 1, p.C)) : 1;
  } else {
    const int run = 128 / scalar_size;  // channels per tile: one 128-byte line per position
    t.TC = p.C <= run ? p.C : even_split(p.C, run);
    const int positions = std::max(1, target / t.TC);
    if (positions >= p.H * p.W) {  // whole planes: as many 128-byte channel vectors as fit
      t.TH = p.H, t.TW = p.W;
      const int vectors = std::max(1, target / (p.H * p.W) / run);
      if (t.TC < p.C) t.TC = even_split(p.C, std::min(p.C, vectors * run));
    } else {
      const int side = std::max(1, static_cast<int>(std::sqrt(static_cast<double>(positions))));
      t.TW = even_split(p.W, std::min(side, p.W));
      t.TH = even_split(p.H, std::clamp(positions / t.TW, 1, p.H));
    }
  }
  (void)acc_size;
  return t;
}

// The multiply-shift dividers of a chosen plan.
inline void finish_tile_plan(TilePlan& p) {
  p.div_v_rows_m = FastDivmod(p.v_rows_m), p.div_v_segs = FastDivmod(p.v_segs);
  p.div_o_rows_m = FastDivmod(p.o_rows_m), p.div_o_segs = FastDivmod(p.o_segs);
  p.div_tiles_w = FastDivmod(p.tiles_w), p.div_tiles_h = FastDivmod(p.tiles_h);
  p.div_tiles_c = FastDivmod(p.tiles_c);
  finish_run_grid(p.stage_x), finish_run_grid(p.stage_b), finish_run_grid(p.store_out);
}

// Bytes a block reads from global memory in its staging phase (halo included).
inline int64_t staged_bytes(const TilePlan& p, int scalar_size) {
  int64_t elems = int64_t(p.stage_x.eo) * p.stage_x.em * p.stage_x.ei;
  if (p.mode != kApply) elems += int64_t(p.stage_b.eo) * p.stage_b.em * p.stage_b.ei;
  return elems * scalar_size;
}

// The part of them that is not halo (read again by the neighbouring tiles).
inline int64_t useful_bytes(const TilePlan& p, int scalar_size) {
  return int64_t(p.TC) * p.TH * p.TW * scalar_size * (p.mode == kApply ? 1 : 2);
}

// Picks the tile size.  A block issues its whole input as 16-byte loads (up to 4 per thread
// at once) before it computes, so the bytes in flight on a multiprocessor are about
// (resident blocks) x (a block's input), of which the halo is overhead: the plan maximises
// (resident blocks) x (a block's input without halo), where resident blocks are limited by
// registers (blocks_per_sm), shared memory and the grid itself.  Grids with fewer blocks
// than multiprocessors are avoided while a smaller tile can fill the device.
inline TilePlan plan_tiles(const MixerShape& s, int scalar_size, int acc_size, int mode,
                           int blocks_per_sm, const DeviceLimits& dev) {
  check_sample_size(s);
  TilePlan p;
  p.N = s.N, p.C = static_cast<int>(s.C), p.H = static_cast<int>(s.H), p.W = static_cast<int>(s.W);
  p.G = static_cast<int>(s.G), p.Cg = static_cast<int>(s.Cg);
  p.sample_numel = s.C * s.H * s.W;
  p.rh = static_cast<int>(effective_radius(s.radius, s.H));
  p.rw = static_cast<int>(effective_radius(s.radius, s.W));
  p.radius_one = s.radius == 1;
  p.mode = mode;
  p.channels_last = s.channels_last;
  const int vec = 16 / scalar_size;
  const int largest = kThreads * 4 * vec;  // 16 KB of input: four 16-byte loads per thread
  // Rows that do not fit a tile even alone (or are very wide) are split.
  bool split_rows = !p.channels_last && p.W > 2 * largest;
  if (!split_rows && !p.channels_last) {
    TilePlan probe = p;
    if (layout_tiles(probe, TileShape{1, 1, p.W}, scalar_size, acc_size) > dev.shared_bytes_optin) {
      split_rows = true;
    }
  }
  TilePlan best;
  double best_score = -1;
  bool best_fills = false;
  for (int target = largest; target >= 1; target /= 2) {
    TilePlan q = p;
    const int64_t bytes = layout_tiles(q, choose_tile(q, target, scalar_size, acc_size, split_rows),
                                       scalar_size, acc_size);
    if (bytes > dev.shared_bytes_optin) continue;
    const int64_t blocks = s.N * q.tiles_c * q.tiles_h * q.tiles_w;
    if (blocks > INT32_MAX) plan_error("input too large for one grid (" + std::to_string(blocks) + " tiles)");
    q.smem_bytes = static_cast<int>(bytes);
    q.blocks = static_cast<unsigned>(blocks);
    const int64_t resident = std::min<int64_t>(
        {blocks_per_sm, kMaxBlocksPerSM, dev.shared_bytes_per_sm / (bytes + 1024)});
    const double score = static_cast<double>(std::min<int64_t>(blocks, resident * dev.multiprocessors)) *
                         static_cast<double>(useful_bytes(q, scalar_size));
    const bool fills = blocks >= dev.multiprocessors;
    const bool better = best_score < 0 || (fills && !best_fills) ||
                        (fills == best_fills && (fills ? score > 1.05 * best_score : blocks > best.blocks));
    if (better) best = q, best_score = score, best_fills = fills;
  }
  if (best_score < 0) {
    plan_error("pool_size " + std::to_string(pool_size_of(s.radius)) + " on a " + std::to_string(s.H) +
               "x" + std::to_string(s.W) + " plane needs more shared memory than the device has; "
               "use backend='cpu' or 'reference'");
  }
  finish_tile_plan(best);
  return best;
}


}  // namespace cuda_kernels
}  // namespace fused_poolformer

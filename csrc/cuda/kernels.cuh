// CUDA kernels of the fused pool mixer (docs/math.md), shared by forward.cu and
// backward.cu.  They follow the CPU kernels (csrc/cpu) step by step:
//
//   forward   group_stats_kernel   per-block (count, mean, M2) partials of every (n, g)
//             finalize_stats_kernel  merges them in block order -> mean, rstd
//             tile_kernel<kApply>   y = res * x + coef * (P(x - mean) - (x - mean))
//   backward  tile_kernel<kSums>    per-(n, c, tile) sums of D * dy and x * dy
//             fold_kernel           S[n, g], and the parameter gradients from T[c], dres[c]
//             tile_kernel<kDx>      dx = res * dy + coef * (P^T dy - dy) - corr * (x - mean)
//
// Every per-channel factor (coef = a * rstd, res_scale, corr) is formed in the kernels
// from the raw parameter pointers (MixerParams); the host launches and allocates only.
//
// The tile kernel: a block owns a (TC channels) x (TH rows) x (TW columns) tile of one
// sample's output.  It stages the tile plus a halo of (rh, rw) = clipped k//2 in shared
// memory (zeros outside the plane, so clipped windows sum only valid taps), replaces each
// column by its vertical box sum in place, then every output takes the horizontal box sum
// of its row.  Shared memory is ordered like global memory -- NCHW [c][row][col],
// channels_last [row][col][c] -- so consecutive threads touch consecutive addresses in
// both (threads run along W for NCHW and along C for channels_last).
//
// Determinism: every reduction has a fixed shape (block partials written to fixed slots,
// fixed-order merges); there are no float atomics.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <unordered_map>

#include "../pool_mixer.h"
#include "../host.h"

namespace fused_poolformer {
namespace cuda_kernels {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
using Divider = at::cuda::detail::IntDivider<unsigned int>;

// ---------------------------------------------------------------------------------------
// Device properties, read once per device.

struct DeviceInfo {
  int multiprocessors = 0;
  int max_shared_per_block_optin = 0;
};

inline DeviceInfo device_info(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  DeviceInfo info;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.multiprocessors, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.max_shared_per_block_optin,
                                        cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cache.emplace(device, info);
  return info;
}

// ---------------------------------------------------------------------------------------
// Small device helpers.

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(v);
}

// Sum over the block in a fixed tree (deterministic); every thread gets the result.
// `scratch` holds kWarps values; the call ends with a barrier so it can be reused.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  acc_t total = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// ---------------------------------------------------------------------------------------
// Forward, pass 1: GroupNorm statistics.  Group (n, g) has M = (C/G)*H*W elements; its
// e-th element (e in 0..M) is at offset group*M + e in NCHW (and in channels_last with
// G = 1), else at n*HW*C + (e / Cg)*C + g*Cg + e % Cg.  A block takes a fixed chunk of
// kThreads * kPerThread consecutive e, holds it in registers and computes its mean and
// M2 in two passes over the registers (as the CPU kernel does per block).

struct StatsGeometry {
  int64_t M;            // elements per group
  int64_t chunk;        // elements per block
  int64_t plane;        // H * W
  int64_t C;
  int64_t G, Cg;
  int64_t blocks_per_group;
  bool contiguous_groups;
};

template <typename scalar_t, typename acc_t, int kPerThread>
__global__ void __launch_bounds__(kThreads)
group_stats_kernel(const scalar_t* __restrict__ x, const StatsGeometry sg,
                   WelfordData<acc_t>* __restrict__ partials) {
  __shared__ acc_t scratch[kWarps];
  const int64_t group = blockIdx.x / sg.blocks_per_group;
  const int64_t block = blockIdx.x % sg.blocks_per_group;
  const int64_t start = block * sg.chunk;
  const int64_t count = sg.M - start < sg.chunk ? sg.M - start : sg.chunk;
  const int64_t n = group / sg.G, g = group % sg.G;

  acc_t v[kPerThread];
  acc_t sum = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t local = int64_t(i) * kThreads + threadIdx.x;
    v[i] = 0;
    if (local < count) {
      const int64_t e = start + local;
      const int64_t offset = sg.contiguous_groups
                                 ? group * sg.M + e
                                 : (n * sg.plane + e / sg.Cg) * sg.C + g * sg.Cg + e % sg.Cg;
      v[i] = to_acc<acc_t>(x[offset]);
    }
    sum += v[i];
  }
  const acc_t mean = block_sum(sum, scratch) / static_cast<acc_t>(count);
  acc_t m2 = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t local = int64_t(i) * kThreads + threadIdx.x;
    const acc_t d = local < count ? v[i] - mean : acc_t(0);
    m2 += d * d;
  }
  m2 = block_sum(m2, scratch);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = WelfordData<acc_t>{static_cast<acc_t>(count), mean, m2};
  }
}

// Merges each group's partials in block order (Chan) and writes mean and rstd.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
finalize_stats_kernel(const WelfordData<acc_t>* __restrict__ partials, int64_t groups,
                      int64_t blocks_per_group, acc_t eps, acc_t* __restrict__ mean,
                      acc_t* __restrict__ rstd) {
  const int64_t group = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (group >= groups) return;
  WelfordData<acc_t> w{0, 0, 0};
  for (int64_t b = 0; b < blocks_per_group; ++b) {
    w = welford_merge(w, partials[group * blocks_per_group + b]);
  }
  mean[group] = w.mean;
  rstd[group] = welford_rstd(w, eps);
}

// ---------------------------------------------------------------------------------------
// The tile kernel.

enum TileMode : int { kApply = 0, kSums = 1, kDx = 2 };

struct TileGeometry {
  int64_t N, C, H, W;
  int64_t G, Cg;
  int rh, rw;                       // effective radii (pool_mixer.h effective_radius)
  int TC, TH, TW;                   // output tile
  int rows_in, cols_in;             // TH + 2 rh, TW + 2 rw
  int tiles_c, tiles_h, tiles_w;
  int tile_elems, outputs;          // TC * rows_in * cols_in, TC * TH * TW
  int s_c, s_row, s_col;            // shared-memory strides of the staged tile
  Divider tiles_w_div, tiles_h_div, tiles_c_div;
  Divider in_inner, in_middle;      // staged index -> (c, row, col)
  Divider column_div;               // vertical-pass column -> (c, col)
  Divider out_inner, out_middle;    // output index -> (c, h, w)
  int64_t blocks;
  size_t smem_bytes;
};

// Pointers of the mixer; statistics are (N, G) in the accumulation type.
template <typename scalar_t, typename acc_t>
struct TileArgs {
  const scalar_t* x;
  const scalar_t* dy;
  scalar_t* out;                    // y (kApply) or dx (kDx)
  MixerParams params;               // weight, layer_scale, res_scale, sample_scale
  const acc_t* mean_ng;
  const acc_t* rstd_ng;
  const acc_t* s_ng;                // S[n, g] (kDx)
  acc_t inv_group_numel;            // 1 / M (kDx)
  acc_t* partial_d;                 // (N, C, tiles_h * tiles_w) sums of D * dy (kSums)
  acc_t* partial_x;                 // same shape, sums of x * dy (kSums)
};

template <bool kCL>
__device__ __forceinline__ int64_t element_offset(const TileGeometry& g, int64_t n, int64_t c,
                                                  int64_t h, int64_t w) {
  return kCL ? ((n * g.H + h) * g.W + w) * g.C + c : ((n * g.C + c) * g.H + h) * g.W + w;
}

// Shared memory of the tile kernel, in acc_t units: the staged tile, the per-output
// products of the sums mode, per-channel tables and the per-row/column 1/count tables.
inline int64_t tile_smem_elems(int TC, int TH, int TW, int rh, int rw, int mode) {
  const int64_t rows_in = TH + 2 * rh, cols_in = TW + 2 * rw;
  int64_t elems = int64_t(TC) * rows_in * cols_in + 4 * TC + rows_in + cols_in;
  if (mode == kSums) elems += 2 * int64_t(TC) * TH * TW + 2 * kThreads;
  return elems;
}

template <typename scalar_t, typename acc_t, bool kCL, int kMode>
__global__ void __launch_bounds__(kThreads)
tile_kernel(const TileGeometry g, const TileArgs<scalar_t, acc_t> args) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* t_shift = tile + g.tile_elems;  // mean of the channel's group
  acc_t* t_coef = t_shift + g.TC;        // a * rstd
  acc_t* t_res = t_coef + g.TC;          // res_scale
  acc_t* t_corr = t_res + g.TC;          // rstd^3 / M * S (kDx)
  acc_t* inv_rows = t_corr + g.TC;       // 1 / cnt_h of each staged row (0 outside)
  acc_t* inv_cols = inv_rows + g.rows_in;
  acc_t* prod_d = inv_cols + g.cols_in;  // kSums: per-output D * dy, x * dy
  acc_t* prod_x = prod_d + g.outputs;
  acc_t* red = prod_x + g.outputs;       // kSums: 2 * kThreads cross-warp partials

  const int tid = threadIdx.x;
  auto q = g.tiles_w_div.divmod(blockIdx.x);
  const int tile_w = q.mod;
  q = g.tiles_h_div.divmod(q.div);
  const int tile_h = q.mod;
  q = g.tiles_c_div.divmod(q.div);
  const int tile_c = q.mod;
  const int64_t n = q.div;
  const int64_t c0 = int64_t(tile_c) * g.TC, h0 = int64_t(tile_h) * g.TH,
                w0 = int64_t(tile_w) * g.TW;

  // Prologue: per-channel factors and 1/count tables of this tile.
  for (int i = tid; i < g.TC; i += kThreads) {
    const int64_t c = c0 + i;
    acc_t shift = 0, coef = 0, res = 0, corr = 0;
    if (c < g.C) {
      const int64_t ng = n * g.G + c / g.Cg;
      const acc_t r = args.rstd_ng[ng];
      shift = args.mean_ng[ng];
      coef = args.params.template channel_factor<scalar_t, acc_t>(c) *
             args.params.template sample_factor<scalar_t, acc_t>(n) * r;
      res = args.params.template residual<scalar_t, acc_t>(c);
      if (kMode == kDx) corr = r * r * r * args.s_ng[ng] * args.inv_group_numel;
    }
    t_shift[i] = shift, t_coef[i] = coef, t_res[i] = res, t_corr[i] = corr;
  }
  for (int i = tid; i < g.rows_in + g.cols_in; i += kThreads) {  // inv_cols follows inv_rows
    const bool is_row = i < g.rows_in;
    const int64_t pos = is_row ? h0 - g.rh + i : w0 - g.rw + (i - g.rows_in);
    const int64_t len = is_row ? g.H : g.W;
    const int radius = is_row ? g.rh : g.rw;
    inv_rows[i] = pos >= 0 && pos < len ? acc_t(1) / acc_t(window_count(pos, radius, len)) : acc_t(0);
  }
  __syncthreads();

  // Stage the tile and its halo: x - mean (kApply, kSums) or dy / cnt (kDx), zero outside.
  for (int s = tid; s < g.tile_elems; s += kThreads) {
    int c, row, col;
    if (kCL) {
      auto a = g.in_inner.divmod(s);       // TC
      auto b = g.in_middle.divmod(a.div);  // cols_in
      c = a.mod, col = b.mod, row = b.div;
    } else {
      auto a = g.in_inner.divmod(s);       // cols_in
      auto b = g.in_middle.divmod(a.div);  // rows_in
      col = a.mod, row = b.mod, c = b.div;
    }
    const int64_t h = h0 - g.rh + row, w = w0 - g.rw + col, cc = c0 + c;
    acc_t v = 0;
    if (h >= 0 && h < g.H && w >= 0 && w < g.W && cc < g.C) {
      const int64_t off = element_offset<kCL>(g, n, cc, h, w);
      if (kMode == kDx) {
        v = to_acc<acc_t>(args.dy[off]) * inv_rows[row] * inv_cols[col];
      } else {
        v = to_acc<acc_t>(args.x[off]) - t_shift[c];
      }
    }
    tile[s] = v;
  }
  __syncthreads();

  // Vertical box sums, in place: row r of a column becomes the sum of staged rows
  // r .. r + 2 rh, and is written only after every later row has stopped needing it.
  const int columns = g.TC * g.cols_in;
  const int window_h = 2 * g.rh + 1;
  for (int j = tid; j < columns; j += kThreads) {
    auto a = g.column_div.divmod(j);
    const int c = kCL ? a.mod : a.div, col = kCL ? a.div : a.mod;
    acc_t* column = tile + c * g.s_c + col * g.s_col;
    for (int r = 0; r < g.TH; ++r) {
      acc_t sum = 0;
      for (int d = 0; d < window_h; ++d) sum += column[(r + d) * g.s_row];
      column[r * g.s_row] = sum;
    }
  }
  __syncthreads();

  // Horizontal box sums and the per-output epilogue.
  const int window_w = 2 * g.rw + 1;
  for (int o = tid; o < g.outputs; o += kThreads) {
    int c, h, w;
    if (kCL) {
      auto a = g.out_inner.divmod(o);       // TC
      auto b = g.out_middle.divmod(a.div);  // TW
      c = a.mod, w = b.mod, h = b.div;
    } else {
      auto a = g.out_inner.divmod(o);       // TW
      auto b = g.out_middle.divmod(a.div);  // TH
      w = a.mod, h = b.mod, c = b.div;
    }
    const int64_t hh = h0 + h, ww = w0 + w, cc = c0 + c;
    const bool valid = hh < g.H && ww < g.W && cc < g.C;
    if (!valid) {
      if (kMode == kSums) prod_d[o] = 0, prod_x[o] = 0;
      continue;
    }
    const acc_t* row = tile + c * g.s_c + h * g.s_row + w * g.s_col;
    acc_t box = 0;
    for (int d = 0; d < window_w; ++d) box += row[d * g.s_col];
    const int64_t off = element_offset<kCL>(g, n, cc, hh, ww);
    if (kMode == kApply || kMode == kSums) {
      const acc_t xv = to_acc<acc_t>(args.x[off]);
      const acc_t xc = xv - t_shift[c];
      const acc_t pooled = box * inv_rows[h + g.rh] * inv_cols[w + g.rw];
      if (kMode == kApply) {
        args.out[off] = static_cast<scalar_t>(t_res[c] * xv + t_coef[c] * (pooled - xc));
      } else {
        const acc_t grad = to_acc<acc_t>(args.dy[off]);
        prod_d[o] = (pooled - xc) * grad;
        prod_x[o] = xv * grad;
      }
    } else {
      const acc_t grad = to_acc<acc_t>(args.dy[off]);
      const acc_t xc = to_acc<acc_t>(args.x[off]) - t_shift[c];
      args.out[off] =
          static_cast<scalar_t>(t_res[c] * grad + t_coef[c] * (box - grad) - t_corr[c] * xc);
    }
  }
  if (kMode != kSums) return;

  // kSums: fold the per-output products into one (D * dy, x * dy) pair per channel of
  // the tile, in a fixed order, and write them to this tile's slot.
  __syncthreads();
  const int lane = tid % 32, warp = tid / 32;
  const int spatial = g.TH * g.TW;
  const int64_t slots = int64_t(g.tiles_h) * g.tiles_w;
  const int64_t slot = int64_t(tile_h) * g.tiles_w + tile_w;
  if (kCL) {
    // Lanes along channels (conflict-free), warps split the positions, then warp 0 adds
    // the kWarps partials in order.
    for (int cb = 0; cb < g.TC; cb += 32) {
      const int c = cb + lane;
      acc_t sd = 0, sx = 0;
      if (c < g.TC) {
        for (int p = warp; p < spatial; p += kWarps) {
          sd += prod_d[p * g.TC + c];
          sx += prod_x[p * g.TC + c];
        }
      }
      red[warp * 32 + lane] = sd;
      red[kThreads + warp * 32 + lane] = sx;
      __syncthreads();
      if (warp == 0 && c < g.TC && c0 + c < g.C) {
        acc_t td = 0, tx = 0;
        for (int w = 0; w < kWarps; ++w) td += red[w * 32 + lane], tx += red[kThreads + w * 32 + lane];
        const int64_t at = (n * g.C + c0 + c) * slots + slot;
        args.partial_d[at] = td;
        args.partial_x[at] = tx;
      }
      __syncthreads();
    }
  } else {
    // One warp per channel: lanes along the plane (conflict-free), then a fixed
    // butterfly whose lane-0 result is written.
    for (int c = warp; c < g.TC; c += kWarps) {
      acc_t sd = 0, sx = 0;
      for (int p = lane; p < spatial; p += 32) {
        sd += prod_d[c * spatial + p];
        sx += prod_x[c * spatial + p];
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        sd += __shfl_xor_sync(0xffffffffu, sd, offset);
        sx += __shfl_xor_sync(0xffffffffu, sx, offset);
      }
      if (lane == 0 && c0 + c < g.C) {
        const int64_t at = (n * g.C + c0 + c) * slots + slot;
        args.partial_d[at] = sd;
        args.partial_x[at] = sx;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward folds.  The sums pass leaves per-(n, c, slot) partials of D * dy and x * dy
// (slot = the tile within the plane).  One launch finishes every reduction, each in a
// fixed order:
//   blocks [0, N * G)          S[n, g] = sum over the group's channels and slots of a * D dy
//   blocks [N * G, + C / 256)  per channel c, T[c] = sum_n rstd * sample_scale * sum D dy,
//                              sum x dy, and from them the requested parameter gradients
//                              (the bias gradient is written as zeros).

struct FoldGeometry {
  int64_t N, C, G, Cg, slots;
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
fold_kernel(const FoldGeometry f, const acc_t* __restrict__ partial_d,
            const acc_t* __restrict__ partial_x, const acc_t* __restrict__ rstd_ng,
            const MixerParams params, const ParamGrads grads, acc_t* __restrict__ s_ng) {
  __shared__ acc_t scratch[kWarps];
  const int64_t group_blocks = f.N * f.G;
  if (blockIdx.x < group_blocks) {
    const int64_t ng = blockIdx.x, n = ng / f.G, c0 = (ng % f.G) * f.Cg;
    const acc_t sample = params.sample_factor<scalar_t, acc_t>(n);
    acc_t sum = 0;
    for (int64_t i = threadIdx.x; i < f.Cg * f.slots; i += kThreads) {
      const int64_t c = c0 + i / f.slots;
      sum += params.channel_factor<scalar_t, acc_t>(c) * sample *
             partial_d[(n * f.C + c) * f.slots + i % f.slots];
    }
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) s_ng[ng] = sum;
    return;
  }
  const int64_t c = (blockIdx.x - group_blocks) * kThreads + threadIdx.x;
  if (c >= f.C || !grads.any()) return;
  acc_t t = 0, xdy = 0;
  for (int64_t n = 0; n < f.N; ++n) {
    const acc_t* pd = partial_d + (n * f.C + c) * f.slots;
    const acc_t* px = partial_x + (n * f.C + c) * f.slots;
    acc_t d = 0;
    for (int64_t slot = 0; slot < f.slots; ++slot) d += pd[slot], xdy += px[slot];
    t += rstd_ng[n * f.G + c / f.Cg] * params.sample_factor<scalar_t, acc_t>(n) * d;
  }
  grads.write<scalar_t, acc_t>(params, c, t, xdy);
}

// ---------------------------------------------------------------------------------------
// Host side: geometry choice and launches.

// Splits n into equal pieces of at most max_piece (the last one may be shorter).
inline int even_split(int64_t n, int64_t max_piece) {
  max_piece = std::max<int64_t>(1, max_piece);
  const int64_t pieces = (n + max_piece - 1) / max_piece;
  return static_cast<int>((n + pieces - 1) / pieces);
}

inline int ceil_div_int(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Output tile of about `target` elements.  NCHW: whole rows (up to 128 wide), as many rows
// as fit, then several planes when a whole plane fits.  channels_last: up to 64 channels
// by about 8 x (target / 64 / 8) positions.
inline void choose_tile(bool channels_last, int64_t C, int64_t H, int64_t W, int64_t target,
                        int& TC, int& TH, int& TW) {
  if (channels_last) {
    TC = even_split(C, std::min<int64_t>(64, target));
    const int64_t positions = std::max<int64_t>(1, target / TC);
    TW = even_split(W, std::min<int64_t>(8, positions));
    TH = even_split(H, std::max<int64_t>(1, positions / TW));
  } else {
    TW = even_split(W, std::min<int64_t>(128, target));
    TH = even_split(H, std::max<int64_t>(1, target / TW));
    const bool whole_plane = TH == H && TW == W;
    TC = whole_plane ? even_split(C, std::clamp<int64_t>(target / (H * W), 1, 256)) : 1;
  }
}

inline TileGeometry make_tile_geometry(const at::Tensor& x, const MixerShape& s, int mode,
                                       size_t acc_size) {
  TileGeometry g{};
  const bool channels_last = s.channels_last;
  const int64_t pool_size = 2 * s.radius + 1;
  g.N = s.N, g.C = s.C, g.H = s.H, g.W = s.W;
  g.G = s.G, g.Cg = s.Cg;
  g.rh = static_cast<int>(effective_radius(s.radius, g.H));
  g.rw = static_cast<int>(effective_radius(s.radius, g.W));
  // The largest tile (up to 2048 outputs) whose shared memory fits the default 48 KB, else
  // the largest that fits the device's opt-in limit (only very wide windows need it).
  const int device = x.device().index();
  const int64_t limits[2] = {48 * 1024, device_info(device).max_shared_per_block_optin};
  bool found = false;
  for (int attempt = 0; attempt < 2 && !found; ++attempt) {
    for (int64_t target = 2048; target >= 1 && !found; target /= 2) {
      choose_tile(channels_last, g.C, g.H, g.W, target, g.TC, g.TH, g.TW);
      const int64_t bytes =
          tile_smem_elems(g.TC, g.TH, g.TW, g.rh, g.rw, mode) * static_cast<int64_t>(acc_size);
      if (bytes <= limits[attempt]) {
        found = true;
        g.smem_bytes = static_cast<size_t>(bytes);
      }
    }
  }
  TORCH_CHECK(found, "pool_mixer (CUDA): pool_size ", pool_size, " on a ", g.H, "x", g.W,
              " plane needs more shared memory than the device has; use backend='cpu' or "
              "'reference'");
  g.rows_in = g.TH + 2 * g.rh, g.cols_in = g.TW + 2 * g.rw;
  g.tiles_c = ceil_div_int(g.C, g.TC), g.tiles_h = ceil_div_int(g.H, g.TH),
  g.tiles_w = ceil_div_int(g.W, g.TW);
  g.tile_elems = g.TC * g.rows_in * g.cols_in;
  g.outputs = g.TC * g.TH * g.TW;
  if (channels_last) {
    g.s_c = 1, g.s_col = g.TC, g.s_row = g.cols_in * g.TC;
    g.in_inner = Divider(g.TC), g.in_middle = Divider(g.cols_in);
    g.column_div = Divider(g.TC);
    g.out_inner = Divider(g.TC), g.out_middle = Divider(g.TW);
  } else {
    g.s_col = 1, g.s_row = g.cols_in, g.s_c = g.rows_in * g.cols_in;
    g.in_inner = Divider(g.cols_in), g.in_middle = Divider(g.rows_in);
    g.column_div = Divider(g.cols_in);
    g.out_inner = Divider(g.TW), g.out_middle = Divider(g.TH);
  }
  g.tiles_w_div = Divider(g.tiles_w), g.tiles_h_div = Divider(g.tiles_h);
  g.tiles_c_div = Divider(g.tiles_c);
  g.blocks = g.N * g.tiles_c * g.tiles_h * g.tiles_w;
  TORCH_CHECK(g.blocks <= std::numeric_limits<int32_t>::max(),
              "pool_mixer (CUDA): input too large for one grid (", g.blocks, " tiles)");
  return g;
}

template <typename scalar_t, typename acc_t, int kMode>
void launch_tile_kernel(const TileGeometry& g, bool channels_last,
                        const TileArgs<scalar_t, acc_t>& args, cudaStream_t stream) {
  auto kernel = channels_last ? tile_kernel<scalar_t, acc_t, true, kMode>
                              : tile_kernel<scalar_t, acc_t, false, kMode>;
  if (g.smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(g.smem_bytes)));
  }
  kernel<<<static_cast<unsigned int>(g.blocks), kThreads, g.smem_bytes, stream>>>(g, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_kernels
}  // namespace fused_poolformer

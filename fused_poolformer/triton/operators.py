"""Triton kernels of the fused pool mixer (docs/math.md, docs/performance.md).

Two operators with the schemas of the C++ ones, registered with ``torch.library.triton_op``
and launched through ``wrap_triton`` so that ``torch.compile(fullgraph=True)`` traces into
the kernels (their autograd formula comes from ``fused_poolformer.contract`` and is
registered when this package is imported):

    triton_pool_mixer_forward(x, weight, bias, layer_scale, res_scale, sample_scale,
                              num_groups, pool_size, eps) -> (y, mean, rstd)
    triton_pool_mixer_backward(grad_y, x, mean, rstd, weight, bias, layer_scale, res_scale,
                               sample_scale, num_groups, pool_size, eps, output_mask)
        -> (grad_x, grad_weight, grad_bias, grad_layer_scale, grad_res_scale)

A gradient not asked for comes back as an empty tensor (a Python custom operator cannot
return None); the autograd formula passes None on for it.

Four passes, as in the CPU kernels (csrc/cpu/pool_mixer_cpu.cpp):
  1. statistics: every (n, g) group is cut into fixed tiles, each program writes the
     (count, mean, M2) of its tile, and a tiny kernel merges a group's tiles in order
     (Chan's formula) into mean and rstd;
  2. apply: a tile of the output, the k x k box sum of x - mean over the clipped window,
     one multiply by 1 / (cnt_h * cnt_w), y written once;
  3. backward sums: per tile and channel, the sums of D * dy and x * dy (D = P x - x),
     folded into S[n, g], T[c] and dres[c] by a few small torch reductions;
  4. dx = res * dy + coef * (P^T dy - dy) - corr * (x - mean).

Every kernel sees x as (N, C, H, W) through four strides and works on a 3-D tile
[BLOCK_H, BLOCK_W, BLOCK_C]: NCHW tiles are [rows, columns, 1 or a few channels] (W is the
contiguous axis), channels_last tiles are [1, columns, channels] (C is contiguous).

Determinism: the tiles whose partial sums are merged (passes 1 and 3) have sizes fixed by
the shape alone, and every merge runs in a fixed order, so the results are bitwise
reproducible and independent of the autotuner.  Only passes 2 and 4 are autotuned; each of
their outputs is computed the same way whatever the tile, so the choice cannot change them.
"""

import math
import os
import struct
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..contract import check_backward, check_forward, dense_format, register_autograd, stats_dtype

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Elements per tile of the statistics and backward-sum passes.  The interpreter costs about
# a millisecond per tile operation, so it gets smaller statistics tiles (which still
# exercise the merges on the tiny test shapes) and larger sum tiles (fewer programs).
_STATS_TILE = 64 if _INTERPRET else 4096
_SUM_TILE = 256 if _INTERPRET else 2048
_INT32_LIMIT = 2**31


# ---------------------------------------------------------------------------------------
# Shared device helpers.


@triton.jit
def _tile_coords(C, H, W, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                 WIDE: tl.constexpr):
    """The sample, the tile's index within its channel block, and the tile's 1-D ranges.

    Programs run w-tiles fastest, then h-tiles, so neighbours share their halo in cache.
    """
    pid = tl.program_id(0)
    tiles_w = tl.cdiv(W, BLOCK_W)
    tiles_h = tl.cdiv(H, BLOCK_H)
    tiles_c = tl.cdiv(C, BLOCK_C)
    tile_w = pid % tiles_w
    rest = pid // tiles_w
    tile_h = rest % tiles_h
    rest = rest // tiles_h
    tile_c = rest % tiles_c
    n = rest // tiles_c
    oc = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)
    oh = tile_h * BLOCK_H + tl.arange(0, BLOCK_H)
    ow = tile_w * BLOCK_W + tl.arange(0, BLOCK_W)
    if WIDE:  # a sample of 2**31 elements or more: in-sample offsets need 64 bits
        oc = oc.to(tl.int64)
        oh = oh.to(tl.int64)
        ow = ow.to(tl.int64)
    return n, tile_h * tiles_w + tile_w, oc, oh, ow


@triton.jit
def _vector_or_ones(ptr, index, mask, PRESENT: tl.constexpr, ACC: tl.constexpr):
    if PRESENT:
        return tl.load(ptr + index, mask=mask, other=1.0).to(ACC)
    else:
        return (index * 0 + 1).to(ACC)


@triton.jit
def _mixer_factors(n, oc, cmask, G, CPG, mean_ptr, rstd_ptr, weight_ptr, layer_ptr, res_ptr,
                   sample_ptr, HAS_WEIGHT: tl.constexpr, HAS_LAYER: tl.constexpr,
                   HAS_RES: tl.constexpr, HAS_SAMPLE: tl.constexpr):
    """Per-channel factors of sample n: mean, rstd, coef = a * rstd and res_scale, where
    a = sample_scale * (weight * layer_scale) as in the CPU kernels."""
    ACC: tl.constexpr = rstd_ptr.dtype.element_ty
    group = n * G + oc // CPG
    mean = tl.load(mean_ptr + group, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + group, mask=cmask, other=0.0)
    a = _vector_or_ones(weight_ptr, oc, cmask, HAS_WEIGHT, ACC) * _vector_or_ones(
        layer_ptr, oc, cmask, HAS_LAYER, ACC)
    if HAS_SAMPLE:
        a = tl.load(sample_ptr + n).to(ACC) * a
    res = _vector_or_ones(res_ptr, oc, cmask, HAS_RES, ACC)
    return mean, rstd, a * rstd, res


@triton.jit
def _window_count(o, RADIUS: tl.constexpr, L):
    """Valid taps of the window centred on o (at least 1, so masked lanes stay finite)."""
    return tl.maximum(tl.minimum(o + RADIUS, L - 1) - tl.maximum(o - RADIUS, 0) + 1, 1)


@triton.jit
def _inv_window_count(o, RADIUS: tl.constexpr, L, ACC: tl.constexpr):
    return 1.0 / _window_count(o, RADIUS, L).to(ACC)


@triton.jit
def _tile_cells(oc, oh, ow, cmask, H, W, s_c, s_h, s_w):
    """The (rows, columns, channels) cells of a tile inside the tensor, and their offsets."""
    inside = (oh < H)[:, None, None] & (ow < W)[None, :, None] & cmask[None, None, :]
    at = oh[:, None, None] * s_h + ow[None, :, None] * s_w + oc[None, None, :] * s_c
    return inside, at


@triton.jit
def _tile_inv_count(oh, ow, H, W, RADIUS_H: tl.constexpr, RADIUS_W: tl.constexpr, ACC: tl.constexpr):
    """1 / (cnt_h * cnt_w) over the tile's rows and columns (count_include_pad=False)."""
    return 1.0 / (_window_count(oh, RADIUS_H, H)[:, None, None]
                  * _window_count(ow, RADIUS_W, W)[None, :, None]).to(ACC)


@triton.jit
def _box_sum(ptr, shift, oc, oh, ow, cmask, H, W, s_c, s_h, s_w, RADIUS_H: tl.constexpr,
             RADIUS_W: tl.constexpr, SCALE_TAPS: tl.constexpr, ACC: tl.constexpr,
             BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Sum over the clipped k x k window around every element of the tile.

    SCALE_TAPS=False sums (v - shift), the centred input of the forward pool (centring keeps
    the sums small when |mean| >> std).  SCALE_TAPS=True sums v / cnt(tap), the adjoint of
    the pool applied to dy.  The halo comes in through masked loads that hit the cache.
    """
    acc = tl.zeros([BLOCK_H, BLOCK_W, BLOCK_C], dtype=ACC)
    for i in tl.static_range(2 * RADIUS_H + 1):
        hh = oh + (i - RADIUS_H)
        row_ok = ((hh >= 0) & (hh < H))[:, None, None] & cmask[None, None, :]
        row_ptr = ptr + (hh[:, None, None] * s_h + oc[None, None, :] * s_c)
        if SCALE_TAPS:
            inv_h = _inv_window_count(hh, RADIUS_H, H, ACC)[:, None, None]
        for j in tl.static_range(2 * RADIUS_W + 1):
            ww = ow + (j - RADIUS_W)
            ok = row_ok & ((ww >= 0) & (ww < W))[None, :, None]
            v = tl.load(row_ptr + (ww * s_w)[None, :, None], mask=ok, other=0.0).to(ACC)
            if SCALE_TAPS:
                acc += v * inv_h * _inv_window_count(ww, RADIUS_W, W, ACC)[None, :, None]
            else:
                acc += tl.where(ok, v - shift, 0.0)
    return acc


# ---------------------------------------------------------------------------------------
# Pass 1: GroupNorm statistics.  A group is viewed as a ROWS x COLS matrix with contiguous
# rows: NCHW, one row of C/G * H * W elements; channels_last, H * W rows of C/G channels.


@triton.jit
def _stats_partial_kernel(x_ptr, count_ptr, mean_ptr, m2_ptr, G, ROWS, COLS, row_stride,
                          s_n, group_stride, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
                          WIDE: tl.constexpr):
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    pid = tl.program_id(0)
    tiles_j = tl.cdiv(COLS, BLOCK_J)
    tiles = tl.cdiv(ROWS, BLOCK_R) * tiles_j
    group = pid // tiles
    tile = pid % tiles
    n = group // G
    g = group % G
    rows = (tile // tiles_j) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (tile % tiles_j) * BLOCK_J + tl.arange(0, BLOCK_J)
    if WIDE:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    mask = (rows[:, None] < ROWS) & (cols[None, :] < COLS)
    base = n.to(tl.int64) * s_n + g.to(tl.int64) * group_stride
    v = tl.load(x_ptr + base + rows[:, None] * row_stride + cols[None, :], mask=mask,
                other=0.0).to(ACC)
    # The tile is in registers: an exact two-pass mean and M2 cost no extra traffic.
    count = tl.sum(tl.sum(mask.to(ACC), axis=1), axis=0)
    mean = tl.sum(tl.sum(v, axis=1), axis=0) / count
    dev = tl.where(mask, v - mean, 0.0)
    m2 = tl.sum(tl.sum(dev * dev, axis=1), axis=0)
    tl.store(count_ptr + pid, count)
    tl.store(mean_ptr + pid, mean)
    tl.store(m2_ptr + pid, m2)


@triton.jit
def _stats_merge_kernel(count_ptr, part_mean_ptr, part_m2_ptr, mean_ptr, rstd_ptr, TILES,
                        eps_hi, eps_lo, BLOCK: tl.constexpr):
    """One program per group: Chan's merge of its tiles, all at once and in a fixed order:
    mean = sum(n_i mean_i) / n, M2 = sum(M2_i + n_i (mean_i - mean)^2)."""
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    group = tl.program_id(0)
    base = group.to(tl.int64) * TILES
    count_acc = tl.zeros([BLOCK], dtype=ACC)
    sum_acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, TILES, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        ok = idx < TILES
        cnt = tl.load(count_ptr + base + idx, mask=ok, other=0.0)
        count_acc += cnt
        sum_acc += cnt * tl.load(part_mean_ptr + base + idx, mask=ok, other=0.0)
    count = tl.sum(count_acc, axis=0)
    mean = tl.sum(sum_acc, axis=0) / count
    m2_acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, TILES, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        ok = idx < TILES
        cnt = tl.load(count_ptr + base + idx, mask=ok, other=0.0)
        delta = tl.load(part_mean_ptr + base + idx, mask=ok, other=0.0) - mean
        m2_acc += tl.load(part_m2_ptr + base + idx, mask=ok, other=0.0) + cnt * delta * delta
    var = tl.sum(m2_acc, axis=0) / count
    # Float arguments reach a kernel as float32: eps comes in two parts so that a float64
    # rstd sees eps to ~48 bits.
    eps = (tl.zeros([], dtype=ACC) + eps_hi) + eps_lo
    tl.store(mean_ptr + group, mean)
    tl.store(rstd_ptr + group, 1.0 / tl.sqrt(var + eps))


# ---------------------------------------------------------------------------------------
# Pass 2: the output.


@triton.jit
def _forward_apply_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, weight_ptr, layer_ptr, res_ptr,
                          sample_ptr, C, H, W, G, CPG, s_n, s_c, s_h, s_w,
                          HAS_WEIGHT: tl.constexpr, HAS_LAYER: tl.constexpr,
                          HAS_RES: tl.constexpr, HAS_SAMPLE: tl.constexpr,
                          RADIUS_H: tl.constexpr, RADIUS_W: tl.constexpr, WIDE: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    ACC: tl.constexpr = rstd_ptr.dtype.element_ty
    n, _, oc, oh, ow = _tile_coords(C, H, W, BLOCK_C, BLOCK_H, BLOCK_W, WIDE)
    cmask = oc < C
    mean, _, coef, res = _mixer_factors(n, oc, cmask, G, CPG, mean_ptr, rstd_ptr, weight_ptr,
                                        layer_ptr, res_ptr, sample_ptr, HAS_WEIGHT, HAS_LAYER,
                                        HAS_RES, HAS_SAMPLE)
    mean = mean[None, None, :]
    base = n.to(tl.int64) * s_n
    box = _box_sum(x_ptr + base, mean, oc, oh, ow, cmask, H, W, s_c, s_h, s_w, RADIUS_H,
                   RADIUS_W, False, ACC, BLOCK_C, BLOCK_H, BLOCK_W)
    inv_count = _tile_inv_count(oh, ow, H, W, RADIUS_H, RADIUS_W, ACC)
    inside, at = _tile_cells(oc, oh, ow, cmask, H, W, s_c, s_h, s_w)
    xv = tl.load(x_ptr + base + at, mask=inside, other=0.0).to(ACC)
    out = res[None, None, :] * xv + coef[None, None, :] * (box * inv_count - (xv - mean))
    tl.store(y_ptr + base + at, out.to(y_ptr.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------------------------------
# Pass 3: per (tile, channel) sums of D * dy and x * dy.


@triton.jit
def _backward_sums_kernel(x_ptr, dy_ptr, mean_ptr, part_d_ptr, part_x_ptr, C, H, W, CPG, G,
                          s_n, s_c, s_h, s_w, RADIUS_H: tl.constexpr, RADIUS_W: tl.constexpr,
                          WIDE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_W: tl.constexpr):
    ACC: tl.constexpr = part_d_ptr.dtype.element_ty
    n, tile, oc, oh, ow = _tile_coords(C, H, W, BLOCK_C, BLOCK_H, BLOCK_W, WIDE)
    cmask = oc < C
    mean = tl.load(mean_ptr + n * G + oc // CPG, mask=cmask, other=0.0)[None, None, :]
    base = n.to(tl.int64) * s_n
    box = _box_sum(x_ptr + base, mean, oc, oh, ow, cmask, H, W, s_c, s_h, s_w, RADIUS_H,
                   RADIUS_W, False, ACC, BLOCK_C, BLOCK_H, BLOCK_W)
    inv_count = _tile_inv_count(oh, ow, H, W, RADIUS_H, RADIUS_W, ACC)
    inside, at = _tile_cells(oc, oh, ow, cmask, H, W, s_c, s_h, s_w)
    xv = tl.load(x_ptr + base + at, mask=inside, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + base + at, mask=inside, other=0.0).to(ACC)
    d = box * inv_count - (xv - mean)
    sum_d = tl.sum(tl.sum(tl.where(inside, d * dy, 0.0), axis=0), axis=0)
    sum_x = tl.sum(tl.sum(xv * dy, axis=0), axis=0)
    tiles = tl.cdiv(H, BLOCK_H) * tl.cdiv(W, BLOCK_W)
    out = (n.to(tl.int64) * tiles + tile) * C + oc
    tl.store(part_d_ptr + out, sum_d, mask=cmask)
    tl.store(part_x_ptr + out, sum_x, mask=cmask)


# ---------------------------------------------------------------------------------------
# Pass 4: dx.


@triton.jit
def _backward_dx_kernel(x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, corr_ptr, weight_ptr,
                        layer_ptr, res_ptr, sample_ptr, C, H, W, G, CPG, s_n, s_c, s_h, s_w,
                        HAS_WEIGHT: tl.constexpr, HAS_LAYER: tl.constexpr,
                        HAS_RES: tl.constexpr, HAS_SAMPLE: tl.constexpr,
                        RADIUS_H: tl.constexpr, RADIUS_W: tl.constexpr, WIDE: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    ACC: tl.constexpr = rstd_ptr.dtype.element_ty
    n, _, oc, oh, ow = _tile_coords(C, H, W, BLOCK_C, BLOCK_H, BLOCK_W, WIDE)
    cmask = oc < C
    mean, _, coef, res = _mixer_factors(n, oc, cmask, G, CPG, mean_ptr, rstd_ptr, weight_ptr,
                                        layer_ptr, res_ptr, sample_ptr, HAS_WEIGHT, HAS_LAYER,
                                        HAS_RES, HAS_SAMPLE)
    corr = tl.load(corr_ptr + n * G + oc // CPG, mask=cmask, other=0.0)
    base = n.to(tl.int64) * s_n
    pool_t_dy = _box_sum(dy_ptr + base, 0.0, oc, oh, ow, cmask, H, W, s_c, s_h, s_w, RADIUS_H,
                         RADIUS_W, True, ACC, BLOCK_C, BLOCK_H, BLOCK_W)
    inside, at = _tile_cells(oc, oh, ow, cmask, H, W, s_c, s_h, s_w)
    xv = tl.load(x_ptr + base + at, mask=inside, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + base + at, mask=inside, other=0.0).to(ACC)
    out = (res[None, None, :] * dy + coef[None, None, :] * (pool_t_dy - dy)
           - corr[None, None, :] * (xv - mean[None, None, :]))
    tl.store(dx_ptr + base + at, out.to(dx_ptr.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------------------------------
# Tiles.  NCHW autotunes the rows of a tile (its columns and channels follow the shape),
# channels_last its rows and columns (its channels follow the shape).  The interpreter gets
# one configuration: larger tiles, fewer programs.

_NCHW_CONFIGS = [
    triton.Config({"BLOCK_H": 8}, num_warps=4),
    triton.Config({"BLOCK_H": 16}, num_warps=4),
    triton.Config({"BLOCK_H": 32}, num_warps=8),
]
_CHANNELS_LAST_CONFIGS = [
    triton.Config({"BLOCK_H": 1, "BLOCK_W": 8}, num_warps=4),
    triton.Config({"BLOCK_H": 1, "BLOCK_W": 16}, num_warps=4),
    triton.Config({"BLOCK_H": 2, "BLOCK_W": 16}, num_warps=8),
]
_INTERPRETER_CONFIGS = {
    False: triton.Config({"BLOCK_H": 8}),
    True: triton.Config({"BLOCK_H": 4, "BLOCK_W": 8}),
}


def _autotuned(kernel, channels_last: bool):
    configs = _CHANNELS_LAST_CONFIGS if channels_last else _NCHW_CONFIGS
    if _INTERPRET:
        configs = [_INTERPRETER_CONFIGS[channels_last]]
    return triton.autotune(configs=configs, key=["C", "H", "W"])(kernel)


_forward_apply = {cl: _autotuned(_forward_apply_kernel, cl) for cl in (False, True)}
_backward_dx = {cl: _autotuned(_backward_dx_kernel, cl) for cl in (False, True)}

_MAX_BLOCK_W = 128  # NCHW: one tile row spans up to this many columns
_MAX_BLOCK_C = 64  # channels_last: one tile spans up to this many channels
_NCHW_TILE = 512  # NCHW: small planes stack channels until a tile holds about this many


def _pow2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


class _Geometry:
    """Shape, strides and the fixed (non-autotuned) block sizes of one call."""

    def __init__(self, x: Tensor, num_groups: int, pool_size: int):
        self.N, self.C, self.H, self.W = (int(s) for s in x.shape)
        self.G = num_groups
        self.CPG = self.C // num_groups
        self.channels_last = dense_format(x) == torch.channels_last
        C, H, W = self.C, self.H, self.W
        if self.channels_last:
            self.strides = (H * W * C, 1, W * C, C)
        else:
            self.strides = (C * H * W, H * W, W, 1)
        self.wide = C * H * W >= _INT32_LIMIT
        radius = pool_size // 2
        # A radius past the plane reaches no further element: the clipped one unrolls less.
        self.radius_h = min(radius, max(H - 1, 0))
        self.radius_w = min(radius, max(W - 1, 0))
        # The backward-sum tile is fixed by the shape: its partial sums are merged.
        if self.channels_last:
            self.block_c = min(_pow2(C), _MAX_BLOCK_C)
            sum_w = min(_pow2(W), max(1, _SUM_TILE // self.block_c))
        else:
            self.block_w = min(_pow2(W), _MAX_BLOCK_W)
            self.block_c = max(1, min(_pow2(C), _NCHW_TILE // (8 * self.block_w)))
            sum_w = self.block_w
        sum_h = min(_pow2(H), max(1, _SUM_TILE // (self.block_c * sum_w)))
        self.sum_tile = dict(BLOCK_C=self.block_c, BLOCK_H=sum_h, BLOCK_W=sum_w)

    def launch_args(self):
        """Shape arguments shared by the tiled kernels, by name."""
        s_n, s_c, s_h, s_w = self.strides
        return dict(C=self.C, H=self.H, W=self.W, G=self.G, CPG=self.CPG, s_n=s_n, s_c=s_c,
                    s_h=s_h, s_w=s_w, RADIUS_H=self.radius_h, RADIUS_W=self.radius_w, WIDE=self.wide)

    def fixed_blocks(self):
        """The block sizes not autotuned for passes 2 and 4."""
        if self.channels_last:
            return dict(BLOCK_C=self.block_c)
        return dict(BLOCK_C=self.block_c, BLOCK_W=self.block_w)

    def grid(self):
        N, C, H, W = self.N, self.C, self.H, self.W
        return lambda meta: (
            N * triton.cdiv(C, meta["BLOCK_C"]) * triton.cdiv(H, meta["BLOCK_H"]) * triton.cdiv(W, meta["BLOCK_W"]),
        )

    def sum_tiles_per_sample(self):
        return triton.cdiv(self.H, self.sum_tile["BLOCK_H"]) * triton.cdiv(self.W, self.sum_tile["BLOCK_W"])

    def stats_view(self):
        """(rows, cols, row_stride, group_stride, BLOCK_R, BLOCK_J) of a group's matrix."""
        C, H, W, CPG = self.C, self.H, self.W, self.CPG
        if self.channels_last:
            block_j = min(_pow2(CPG), _STATS_TILE)
            block_r = min(_pow2(H * W), max(1, _STATS_TILE // block_j))
            return H * W, CPG, C, CPG, block_r, block_j
        cols = CPG * H * W
        return 1, cols, cols, cols, 1, min(_pow2(cols), _STATS_TILE)


def _optional(v: Optional[Tensor], placeholder: Tensor) -> Tensor:
    """A kernel pointer for an optional vector; the kernel never reads the placeholder."""
    return placeholder if v is None else v


def _split_eps(eps: float) -> Tuple[float, float]:
    hi = struct.unpack("f", struct.pack("f", eps))[0]
    return hi, eps - hi


# ---------------------------------------------------------------------------------------
# The operators.


def _group_statistics(x: Tensor, geo: _Geometry, eps: float) -> Tuple[Tensor, Tensor]:
    acc = stats_dtype(x.dtype)
    rows, cols, row_stride, group_stride, block_r, block_j = geo.stats_view()
    tiles = triton.cdiv(rows, block_r) * triton.cdiv(cols, block_j)
    groups = geo.N * geo.G
    part_count = torch.empty((groups * tiles,), dtype=acc, device=x.device)
    part_mean = torch.empty_like(part_count)
    part_m2 = torch.empty_like(part_count)
    wrap_triton(_stats_partial_kernel)[(groups * tiles,)](
        x, part_count, part_mean, part_m2, geo.G, rows, cols, row_stride, geo.strides[0],
        group_stride, BLOCK_R=block_r, BLOCK_J=block_j, WIDE=geo.wide, num_warps=8,
    )
    mean = torch.empty((geo.N, geo.G), dtype=acc, device=x.device)
    rstd = torch.empty_like(mean)
    eps_hi, eps_lo = _split_eps(eps)
    wrap_triton(_stats_merge_kernel)[(groups,)](
        part_count, part_mean, part_m2, mean, rstd, tiles, eps_hi, eps_lo,
        BLOCK=min(_pow2(tiles), 1024),
    )
    return mean, rstd


@triton_op("fused_poolformer::triton_pool_mixer_forward", mutates_args=())
def forward_op(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    layer_scale: Optional[Tensor],
    res_scale: Optional[Tensor],
    sample_scale: Optional[Tensor],
    num_groups: int,
    pool_size: int,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    check_forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, eps)
    x = x.contiguous(memory_format=dense_format(x))
    y = torch.empty_like(x, memory_format=dense_format(x))
    N, G = x.shape[0], num_groups
    acc = stats_dtype(x.dtype)
    if x.numel() == 0:  # as the C++ kernels: mean 0 and rstd 1/sqrt(eps) for empty groups
        return y, x.new_zeros((N, G), dtype=acc), x.new_full((N, G), 1.0 / math.sqrt(eps), dtype=acc)
    geo = _Geometry(x, num_groups, pool_size)
    mean, rstd = _group_statistics(x, geo, eps)
    wrap_triton(_forward_apply[geo.channels_last])[geo.grid()](
        x, y, mean, rstd, _optional(weight, rstd), _optional(layer_scale, rstd),
        _optional(res_scale, rstd), _optional(sample_scale, rstd),
        HAS_WEIGHT=weight is not None, HAS_LAYER=layer_scale is not None,
        HAS_RES=res_scale is not None, HAS_SAMPLE=sample_scale is not None,
        **geo.launch_args(), **geo.fixed_blocks(),
    )
    return y, mean, rstd


def _ones_or(v: Optional[Tensor], length: int, acc: torch.dtype, device) -> Tensor:
    return torch.ones((length,), dtype=acc, device=device) if v is None else v.to(acc)


def _parameter_grads(channel_t, channel_xdy, weight, bias, layer_scale, res_scale, x, output_mask):
    """dweight = layer_scale * T, dbias = 0, dlayer_scale = weight * T, dres_scale =
    sum(x * dy), each in its parameter's dtype; a gradient not asked for is an empty tensor."""
    C, acc = x.shape[1], channel_t.dtype

    def grad(wanted, value, param):
        if not wanted:
            return x.new_empty((0,))
        return value.to(x.dtype if param is None else param.dtype)

    return (
        grad(output_mask[1], _ones_or(layer_scale, C, acc, x.device) * channel_t, weight),
        grad(output_mask[2], torch.zeros_like(channel_t), bias),
        grad(output_mask[3], _ones_or(weight, C, acc, x.device) * channel_t, layer_scale),
        grad(output_mask[4], channel_xdy, res_scale),
    )


@triton_op("fused_poolformer::triton_pool_mixer_backward", mutates_args=())
def backward_op(
    grad_y: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    layer_scale: Optional[Tensor],
    res_scale: Optional[Tensor],
    sample_scale: Optional[Tensor],
    num_groups: int,
    pool_size: int,
    eps: float,
    output_mask: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_backward(grad_y, x, mean, rstd, weight, bias, layer_scale, res_scale, sample_scale, num_groups,
                   pool_size, eps, output_mask)
    fmt = dense_format(x)
    x = x.contiguous(memory_format=fmt)
    dy = grad_y.contiguous(memory_format=fmt)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    N, C, H, W = x.shape
    G, CPG, acc = num_groups, C // num_groups, stats_dtype(x.dtype)
    dx = torch.empty_like(x, memory_format=fmt) if output_mask[0] else x.new_empty((0,))
    if x.numel() == 0:
        zeros = x.new_zeros((C,), dtype=acc)
        return (dx, *_parameter_grads(zeros, zeros, weight, bias, layer_scale, res_scale, x, output_mask))

    geo = _Geometry(x, num_groups, pool_size)
    shape_args = geo.launch_args()
    tiles = geo.sum_tiles_per_sample()
    part_d = torch.empty((N, tiles, C), dtype=acc, device=x.device)
    part_x = torch.empty_like(part_d)
    wrap_triton(_backward_sums_kernel)[(N * tiles * triton.cdiv(C, geo.block_c),)](
        x, dy, mean, part_d, part_x, **shape_args, **geo.sum_tile, num_warps=8,
    )
    # The folds, in fixed orders (torch's reductions are deterministic).
    channel_d = part_d.sum(dim=1)  # (N, C): sum over the plane of D * dy
    channel_xdy = part_x.sum(dim=1).sum(dim=0)
    sample = _ones_or(sample_scale, N, acc, x.device)
    a = sample[:, None] * (_ones_or(weight, C, acc, x.device) * _ones_or(layer_scale, C, acc, x.device))[None, :]
    rstd_nc = rstd.repeat_interleave(CPG, dim=1)
    channel_t = (rstd_nc * sample[:, None] * channel_d).sum(dim=0)
    if output_mask[0]:
        group_s = (a * channel_d).view(N, G, CPG).sum(dim=2)
        corr = (rstd * rstd * rstd * group_s / (CPG * H * W)).contiguous()
        wrap_triton(_backward_dx[geo.channels_last])[geo.grid()](
            x, dy, dx, mean, rstd, corr, _optional(weight, rstd), _optional(layer_scale, rstd),
            _optional(res_scale, rstd), _optional(sample_scale, rstd),
            HAS_WEIGHT=weight is not None, HAS_LAYER=layer_scale is not None,
            HAS_RES=res_scale is not None, HAS_SAMPLE=sample_scale is not None,
            **shape_args, **geo.fixed_blocks(),
        )
    return (dx, *_parameter_grads(channel_t, channel_xdy, weight, bias, layer_scale, res_scale, x, output_mask))


register_autograd(forward_op, backward_op)

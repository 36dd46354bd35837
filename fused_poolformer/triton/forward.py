"""Forward Triton kernels: y = res_scale * x + a * rstd * (P x - x) (docs/math.md).

Two launches:
  1. ``_statistics_kernel``: every (n, g) group is cut into a few chunks fixed by the shape;
     each program streams its chunk (vector loads, a Welford update per lane) and writes the
     chunk's (count, mean, M2);
  2. ``_apply_kernel``: each program merges its group's chunk partials (Chan's formula, in a
     fixed pairwise order), the first tile of the group writes mean and rstd, and every
     tile writes y from the separable box sum of x - mean.

The host function allocates y, mean, rstd and one workspace, and launches; it does no
tensor arithmetic.
"""

import struct
from typing import Optional, Tuple

import triton
import triton.language as tl
from torch import Tensor

from .common import (
    INTERPRET,
    TileGeometry,
    autotuned,
    channel_factors,
    cl_tile_setup,
    cl_window_start,
    cl_window_step,
    divide,
    nchw_pooled_tile,
    next_pow2,
    pairwise_dot,
    pairwise_sum,
    sqrt_rn,
    strip_columns,
    tile_channels,
    tile_columns,
    tile_coords,
    tile_rows,
    tiles_along,
)

# Elements per loop step of a statistics program and the number of programs to aim for.
# The interpreter gets tiny steps, so that the merges run on the tests' small shapes.
_STATS_STEP = 32 if INTERPRET else 4096
_STATS_MAX_COLS = 16 if INTERPRET else 1024
_STATS_PROGRAMS = 8 if INTERPRET else 1024
# Every apply program merges its group's partials (each thread loads them all: one 16-byte
# record per partial), so a group has at most this many.
MAX_PARTS = 8
RECORD = 4  # (count, mean, M2, unused): one vector load per partial


# ---------------------------------------------------------------------------------------
# Pass 1: partial statistics.  A group is read as a ROWS x BLOCK_J matrix: NCHW (and
# channels_last with G = 1), its contiguous elements in rows of BLOCK_J; channels_last with
# G > 1, one row per position (row stride C) of its Cg channels, in column blocks.


@triton.jit
def _statistics_kernel(x_ptr, part_ptr, G, CG_V, GROUP_V, HW, ROWS, ROW_CHUNK, COL_BLOCKS, PARTS,
                       VEC: tl.constexpr, CONTIGUOUS: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_J: tl.constexpr, WIDE: tl.constexpr):
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    pid = tl.program_id(0)
    ng = pid // PARTS
    part = pid % PARTS
    r = tl.arange(0, BLOCK_R)[:, None]
    j = (part % COL_BLOCKS) * BLOCK_J + tl.arange(0, BLOCK_J)[None, :]
    if WIDE:
        r = r.to(tl.int64)
    Cg = CG_V * VEC  # (channels_last with G > 1)
    if CONTIGUOUS:
        size = GROUP_V * VEC
        base = x_ptr + ng.to(tl.int64) * size
        row_stride = BLOCK_J
    else:
        C = G * Cg
        base = x_ptr + (ng // G).to(tl.int64) * HW * C + (ng % G) * Cg
        row_stride = C
    row_start = (part // COL_BLOCKS) * ROW_CHUNK
    steps = tl.cdiv(tl.minimum(row_start + ROW_CHUNK, ROWS) - row_start, BLOCK_R)
    mean = tl.zeros([BLOCK_R, BLOCK_J], ACC)
    m2 = tl.zeros([BLOCK_R, BLOCK_J], ACC)
    count = tl.zeros([BLOCK_R, BLOCK_J], ACC)
    for k in range(0, steps):
        rows = row_start + k * BLOCK_R + r
        if CONTIGUOUS:
            ok = rows * BLOCK_J + j < size
        else:
            ok = (rows < ROWS) & (j < Cg)
        v = tl.load(base + rows * row_stride + j, mask=ok, other=0.0).to(ACC)
        # A lane is valid in every step before its last, so all valid lanes of step k hold
        # k + 1 values: one reciprocal per step, not per element.
        inv = 1.0 / (tl.zeros([], ACC) + (k + 1))
        delta = v - mean
        mean = tl.where(ok, mean + delta * inv, mean)
        m2 = tl.where(ok, m2 + delta * (v - mean), m2)
        count += ok.to(ACC)
    total = tl.sum(tl.sum(count, axis=1), axis=0)
    chunk_mean = divide(tl.sum(tl.sum(count * mean, axis=1), axis=0), total)
    dev = mean - chunk_mean
    chunk_m2 = tl.sum(tl.sum(m2 + count * dev * dev, axis=1), axis=0)
    field = tl.arange(0, 4)
    record = tl.where(field == 0, total, tl.where(field == 1, chunk_mean, tl.where(field == 2, chunk_m2, 0.0)))
    tl.store(part_ptr + pid * 4 + field, record)


@triton.jit
def merge_statistics(part_ptr, ng, PARTS, eps_hi, eps_lo, PARTS_P2: tl.constexpr, ACC: tl.constexpr):
    """mean and rstd of group ng from its PARTS chunk records (count, mean, M2, -), merged
    in pairwise order (Chan): every program of the group gets the same bits."""
    p = tl.arange(0, PARTS_P2)[:, None]
    field = tl.arange(0, 4)[None, :]
    records = tl.load(part_ptr + (ng * PARTS + p) * 4 + field, mask=(p < PARTS) & (field < 4), other=0.0)
    count_m2, mean_unused = tl.split(tl.reshape(records, [PARTS_P2, 2, 2]))
    count, part_m2 = tl.split(count_m2)
    part_mean, _ = tl.split(mean_unused)
    total = pairwise_sum(count)
    mean = divide(pairwise_dot(count, part_mean), total)
    dev = part_mean - mean
    var = divide(pairwise_sum(tl.fma(count * dev, dev, part_m2)), total)
    # Float arguments reach a kernel as float32: eps comes in two parts so that a float64
    # rstd sees eps to ~48 bits.
    eps = (tl.zeros([], ACC) + eps_hi) + eps_lo
    return mean, divide(tl.full([], 1.0, ACC), sqrt_rn(var + eps))


@triton.jit
def mixer_output(x, box, inv_count, mean, coef, res):
    """y = res * x + coef * (P(x - mean) - (x - mean)), coef = a * rstd."""
    return res * x + coef * (box * inv_count - (x - mean))


# ---------------------------------------------------------------------------------------
# Pass 2: merge the statistics, write y.


@triton.jit
def _apply_kernel(x_ptr, y_ptr, part_ptr, mean_ptr, rstd_ptr, weight_ptr, layer_ptr, res_ptr, sample_ptr,
                  N, G, CG_V, PARTS, eps_hi, eps_lo,
                  HAS_WEIGHT: tl.constexpr, HAS_LAYER: tl.constexpr, HAS_RES: tl.constexpr,
                  HAS_SAMPLE: tl.constexpr, PARTS_P2: tl.constexpr,
                  H: tl.constexpr, W: tl.constexpr, VEC: tl.constexpr, VEC_C: tl.constexpr,
                  CHANNELS_LAST: tl.constexpr, RADIUS_H: tl.constexpr, RADIUS_W: tl.constexpr,
                  HALO: tl.constexpr, WIDE: tl.constexpr, CG_P2: tl.constexpr, BLOCK_W: tl.constexpr,
                  TILE_P: tl.constexpr, TILE_C: tl.constexpr, TILE_W: tl.constexpr, TILE_H: tl.constexpr):
    ACC: tl.constexpr = rstd_ptr.dtype.element_ty
    Cg = CG_V * VEC_C
    C = G * Cg
    TC: tl.constexpr = tile_channels(CHANNELS_LAST, TILE_P, TILE_C, H, CG_P2)
    TH: tl.constexpr = tile_rows(CHANNELS_LAST, TILE_P, TILE_H, H)
    TILES_W: tl.constexpr = tiles_along(W, tile_columns(CHANNELS_LAST, TILE_P, TILE_W, BLOCK_W, W))
    ng, cb, hb, wb = tile_coords(tl.program_id(0), Cg, tiles_along(H, TH), TILES_W, TC)
    n = ng // G
    mean, rstd = merge_statistics(part_ptr, ng, PARTS, eps_hi, eps_lo, PARTS_P2, ACC)
    first = (cb == 0) & (hb == 0) & (wb == 0)
    tl.store(mean_ptr + ng, mean, mask=first)
    tl.store(rstd_ptr + ng, rstd, mask=first)
    factor = rstd
    if HAS_SAMPLE:
        factor = factor * tl.load(sample_ptr + n).to(ACC)
    base = n.to(tl.int64) * C * H * W
    x = x_ptr + base
    y = y_ptr + base
    if CHANNELS_LAST:
        TW: tl.constexpr = strip_columns(TILE_W, W)
        w_first, p_ok, c, c_ok = cl_tile_setup(ng, cb, wb, G, Cg, W, WIDE, CG_P2, TILE_P, TILE_C, TILE_W)
        coef, res = channel_factors(weight_ptr, layer_ptr, res_ptr, c, c_ok, factor, HAS_WEIGHT, HAS_LAYER,
                                    HAS_RES, ACC)
        h_first = hb * TH
        sums, kept = cl_window_start(x, mean, h_first, p_ok, c, c_ok, w_first, C, H, W, TW, RADIUS_H, RADIUS_W,
                                     WIDE, False, ACC)
        for h in range(h_first, tl.minimum(h_first + TH, H)):
            sums, kept, centres, boxes, offsets, masks, invs = cl_window_step(
                sums, kept, x, mean, h, p_ok, c, c_ok, w_first, C, H, W, TW, RADIUS_H, RADIUS_W, WIDE, False, ACC)
            for t in tl.static_range(TW):
                out = mixer_output(centres[t], boxes[t], invs[t], mean, coef, res)
                tl.store(y + offsets[t], out.to(y_ptr.dtype.element_ty), mask=masks[t])
    else:
        centres, boxes, offsets, masks, invs, c, c_ok = nchw_pooled_tile(
            x, mean, ng, cb, hb, wb, G, Cg, H, W, VEC, RADIUS_H, RADIUS_W, HALO, WIDE, CG_P2, BLOCK_W, TILE_P,
            False, ACC)
        coef, res = channel_factors(weight_ptr, layer_ptr, res_ptr, c, c_ok, factor, HAS_WEIGHT, HAS_LAYER,
                                    HAS_RES, ACC)
        for o in tl.static_range(len(centres)):
            out = mixer_output(centres[o], boxes[o], invs[o], mean, coef, res)
            tl.store(y + offsets[o], out.to(y_ptr.dtype.element_ty), mask=masks[o])


_APPLY = {cl: autotuned(_apply_kernel, cl) for cl in (False, True)}


# ---------------------------------------------------------------------------------------
# Host side.


class StatisticsPlan:
    """How the statistics pass cuts each group (fixed by the shape)."""

    def __init__(self, geo: TileGeometry):
        self.contiguous = not geo.channels_last or geo.G == 1
        self.vec = geo.vec
        size = geo.Cg * geo.H * geo.W
        if self.contiguous:
            self.block_j = min(next_pow2(size), _STATS_MAX_COLS)
            self.rows = triton.cdiv(size, self.block_j)
            self.col_blocks = 1
        else:
            self.block_j = min(geo.cg_p2, _STATS_MAX_COLS)
            self.rows = geo.H * geo.W
            self.col_blocks = triton.cdiv(geo.Cg, self.block_j)
        self.block_j = max(self.block_j, self.vec)
        self.block_r = min(next_pow2(self.rows), max(1, _STATS_STEP // self.block_j))
        groups = geo.N * geo.G * self.col_blocks
        chunks = min(MAX_PARTS // self.col_blocks or 1, max(1, _STATS_PROGRAMS // groups),
                     triton.cdiv(self.rows, self.block_r))
        chunks = max(chunks, 1)
        self.row_chunk = triton.cdiv(triton.cdiv(self.rows, chunks), self.block_r) * self.block_r
        self.parts = triton.cdiv(self.rows, self.row_chunk) * self.col_blocks


def _split_eps(eps: float) -> Tuple[float, float]:
    hi = struct.unpack("f", struct.pack("f", eps))[0]
    return hi, eps - hi


def forward_launches(x: Tensor, y: Tensor, mean: Tensor, rstd: Tensor, workspace: Optional[Tensor],
                     weight, layer_scale, res_scale, sample_scale, geo: TileGeometry, eps: float):
    """The two launches of the forward as (kernel, grid, keyword arguments)."""
    stats = StatisticsPlan(geo)
    groups = geo.N * geo.G
    eps_hi, eps_lo = _split_eps(eps)
    placeholder = rstd
    statistics = (_statistics_kernel, (groups * stats.parts,), dict(
        x_ptr=x, part_ptr=workspace, G=geo.G, CG_V=geo.Cg // geo.vec_c,
        GROUP_V=geo.Cg * geo.H * geo.W // geo.vec, HW=geo.H * geo.W, ROWS=stats.rows,
        ROW_CHUNK=stats.row_chunk, COL_BLOCKS=stats.col_blocks, PARTS=stats.parts, VEC=geo.vec,
        CONTIGUOUS=stats.contiguous, BLOCK_R=stats.block_r, BLOCK_J=stats.block_j, WIDE=geo.wide,
        num_warps=8,
    ))
    apply_args = dict(
        x_ptr=x, y_ptr=y, part_ptr=workspace, mean_ptr=mean, rstd_ptr=rstd,
        weight_ptr=placeholder if weight is None else weight,
        layer_ptr=placeholder if layer_scale is None else layer_scale,
        res_ptr=placeholder if res_scale is None else res_scale,
        sample_ptr=placeholder if sample_scale is None else sample_scale,
        N=geo.N, PARTS=stats.parts, eps_hi=eps_hi, eps_lo=eps_lo,
        HAS_WEIGHT=weight is not None, HAS_LAYER=layer_scale is not None, HAS_RES=res_scale is not None,
        HAS_SAMPLE=sample_scale is not None, PARTS_P2=next_pow2(stats.parts), **geo.shape_args(),
    )
    apply = (_APPLY[geo.channels_last], lambda meta: (geo.tile_programs(meta),), apply_args)
    return [statistics, apply]


def workspace_numel(geo: TileGeometry) -> int:
    """Elements of the forward workspace: a (count, mean, M2, -) record per chunk."""
    return RECORD * geo.N * geo.G * StatisticsPlan(geo).parts

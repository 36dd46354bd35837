"""Backward Triton kernels (docs/math.md, "Backward"): with D = P x - x, a = sample_scale *
weight * layer_scale and M = Cg * H * W elements per group,

    S[n, g] = sum over the group of a * D * dy
    dx      = res_scale * dy + a * rstd * (P^T dy - dy) - rstd^3 / M * S[n, g] * (x - mean)
    T[c]    = sum over n, h, w of rstd * sample_scale * D * dy
    dweight = layer_scale * T,  dlayer_scale = weight * T,  dres_scale = sum x * dy,  dbias = 0

Two launches:
  1. ``_sums_kernel``: per tile and channel, the sums of D * dy and x * dy (D from the same
     separable box sum as the forward), written to fixed slots; per group, at most eight
     partials of S (each program loops over a chunk of its group's tiles);
  2. ``_dx_kernel``: its first C programs finish the parameter gradients (one channel each:
     T[c] and sum x * dy over its slots, written in each parameter's dtype, dbias as zeros);
     every other program folds S[n, g] from its group's partials in its prologue and writes
     a tile of dx from the adjoint box sum of dy, scaled per row and column.
No float atomics: every sum has a fixed order, so the result is bitwise reproducible; the
dx kernel, which is autotuned, merges with ``pairwise_sum`` only.
"""

import triton
import triton.language as tl

from .common import (
    INTERPRET,
    TileGeometry,
    autotuned,
    channel_factors,
    cl_tile_setup,
    cl_window_start,
    cl_window_step,
    divide,
    fitting_tiles,
    nchw_pooled_tile,
    next_pow2,
    pairwise_sum,
    strip_columns,
    tile_channels,
    tile_columns,
    tile_coords,
    tile_rows,
    tiles_along,
    vector_or_ones,
)

# The sums pass is not autotuned (its partial sums are merged, so its tiles are fixed by the
# shape): its tiles, most preferred first (the first that fits the shape is used), NCHW as
# (strips, warps), channels_last as (strips, channels, columns per strip, rows, warps).  The
# interpreter gets small NCHW tiles, so that the tests' small planes have several.
_SUMS_NCHW_TILES = [(4, 4)] if INTERPRET else [
    (64, 8), (32, 8), (32, 4), (16, 4), (8, 4), (4, 4), (2, 4), (1, 4),
]
_SUMS_CL_TILES = [(16, 64, 1, 64, 4)] if INTERPRET else [
    (16, 64, 2, 16, 8), (8, 128, 2, 16, 8), (16, 64, 2, 16, 4), (8, 128, 2, 16, 4), (4, 256, 2, 16, 4),
    (8, 64, 2, 16, 4), (4, 128, 2, 16, 4), (4, 64, 2, 16, 4), (2, 64, 2, 16, 4), (1, 64, 2, 16, 4),
]
_SUMS_PROGRAMS = 8 if INTERPRET else 1024  # programs to aim for
# Every dx program folds its group's S partials (each thread loads them all), so a group
# has at most this many: the sums programs of a group each loop over a chunk of its tiles.
MAX_PARTS = 8
_PARAM_ROWS = 256  # (sample, slot) partials per step of a parameter-gradient program


# ---------------------------------------------------------------------------------------
# Pass 1: per-tile sums.  Program (n, g, k) loops over the k-th chunk of group (n, g)'s
# tiles; for each tile and channel c it writes
#     partial_t[c, n, slot] = rstd * sample_scale * sum(D * dy)      (T[c] once summed)
#     partial_xdy[c, n, slot] = sum(x * dy)                              (dres_scale)
# (slot = the tile's place in the plane), and at the end
#     partial_s[n, g, k]    = sum over its tiles and channels of a * D * dy.


@triton.jit
def _sums_kernel(x_ptr, dy_ptr, mean_ptr, rstd_ptr, weight_ptr, layer_ptr, sample_ptr,
                 partial_t_ptr, partial_xdy_ptr, partial_s_ptr, N, G, CG_V, PARTS,
                 HAS_WEIGHT: tl.constexpr, HAS_LAYER: tl.constexpr, HAS_SAMPLE: tl.constexpr,
                 H: tl.constexpr, W: tl.constexpr, VEC: tl.constexpr, VEC_C: tl.constexpr,
                 CHANNELS_LAST: tl.constexpr, RADIUS_H: tl.constexpr, RADIUS_W: tl.constexpr,
                 HALO: tl.constexpr, WIDE: tl.constexpr, CG_P2: tl.constexpr, BLOCK_W: tl.constexpr,
                 TILE_P: tl.constexpr, TILE_C: tl.constexpr, TILE_W: tl.constexpr, TILE_H: tl.constexpr):
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    Cg = CG_V * VEC_C
    C = G * Cg
    TC: tl.constexpr = tile_channels(CHANNELS_LAST, TILE_P, TILE_C, H, CG_P2)
    TH: tl.constexpr = tile_rows(CHANNELS_LAST, TILE_P, TILE_H, H)
    TILES_W: tl.constexpr = tiles_along(W, tile_columns(CHANNELS_LAST, TILE_P, TILE_W, BLOCK_W, W))
    SLOTS: tl.constexpr = tiles_along(H, TH) * TILES_W
    pid = tl.program_id(0)
    ng = pid // PARTS
    k = pid % PARTS
    n = ng // G
    mean = tl.load(mean_ptr + ng)
    sample = tl.full([], 1.0, ACC)
    if HAS_SAMPLE:
        sample = tl.load(sample_ptr + n).to(ACC)
    t_factor = tl.load(rstd_ptr + ng) * sample
    base = n.to(tl.int64) * C * H * W
    x = x_ptr + base
    dy_base = dy_ptr + base
    tiles = tl.cdiv(Cg, TC) * SLOTS
    per_part = tl.cdiv(tiles, PARTS)
    rows = N * SLOTS  # partials per channel in partial_t and partial_xdy
    group_sum = tl.zeros([], ACC)
    for q in range(k * per_part, tl.minimum((k + 1) * per_part, tiles)):
        cb = q // SLOTS
        slot = q % SLOTS
        if CHANNELS_LAST:
            TW: tl.constexpr = strip_columns(TILE_W, W)
            w_first, p_ok, c, c_ok = cl_tile_setup(ng, cb, slot % TILES_W, G, Cg, W, WIDE, CG_P2, TILE_P, TILE_C,
                                                   TILE_W)
            h_first = (slot // TILES_W) * TH
            sums, kept = cl_window_start(x, mean, h_first, p_ok, c, c_ok, w_first, C, H, W, TW, RADIUS_H,
                                         RADIUS_W, WIDE, False, ACC)
            prod_d = tl.zeros([TILE_P, TC], ACC)
            prod_x = tl.zeros([TILE_P, TC], ACC)
            for h in range(h_first, tl.minimum(h_first + TH, H)):
                sums, kept, centres, boxes, offsets, masks, invs = cl_window_step(
                    sums, kept, x, mean, h, p_ok, c, c_ok, w_first, C, H, W, TW, RADIUS_H, RADIUS_W, WIDE, False,
                    ACC)
                for t in tl.static_range(TW):
                    dy = tl.load(dy_base + offsets[t], mask=masks[t], other=0.0).to(ACC)
                    d = boxes[t] * invs[t] - (centres[t] - mean)
                    prod_d += tl.where(masks[t], d * dy, 0.0)
                    prod_x += centres[t] * dy
            sum_d = tl.sum(prod_d, axis=0)  # [P, TC]: channels along the last axis
            sum_x = tl.sum(prod_x, axis=0)
        else:
            centres, boxes, offsets, masks, invs, c, c_ok = nchw_pooled_tile(
                x, mean, ng, cb, slot // TILES_W, slot % TILES_W, G, Cg, H, W, VEC, RADIUS_H, RADIUS_W, HALO, WIDE,
                CG_P2, BLOCK_W, TILE_P, False, ACC)
            prod_d = tl.zeros(centres[0].shape, ACC)
            prod_x = tl.zeros(centres[0].shape, ACC)
            for o in tl.static_range(len(centres)):
                dy = tl.load(dy_base + offsets[o], mask=masks[o], other=0.0).to(ACC)
                d = boxes[o] * invs[o] - (centres[o] - mean)
                prod_d += tl.where(masks[o], d * dy, 0.0)
                prod_x += centres[o] * dy
            # [TC * bands, columns / VEC, VEC]: each channel's bands are consecutive.
            sum_d = tl.sum(tl.reshape(prod_d, [TC, prod_d.numel // TC]), axis=1)
            sum_x = tl.sum(tl.reshape(prod_x, [TC, prod_x.numel // TC]), axis=1)
        c_in_group = cb * TC + tl.arange(0, TC)
        channel = (ng % G) * Cg + c_in_group
        channel_ok = c_in_group < Cg
        at = channel.to(tl.int64) * rows + n * SLOTS + slot
        tl.store(partial_t_ptr + at, t_factor * sum_d, mask=channel_ok)
        tl.store(partial_xdy_ptr + at, sum_x, mask=channel_ok)
        factor = vector_or_ones(weight_ptr, channel, channel_ok, HAS_WEIGHT, ACC) * vector_or_ones(
            layer_ptr, channel, channel_ok, HAS_LAYER, ACC)
        group_sum += tl.sum(tl.where(channel_ok, factor * sum_d, 0.0), axis=0)
    tl.store(partial_s_ptr + pid, sample * group_sum)


# ---------------------------------------------------------------------------------------
# Pass 2: parameter gradients and dx.


@triton.jit
def _parameter_gradients(c, partial_t_ptr, partial_xdy_ptr, weight_ptr, layer_ptr, dweight_ptr, dbias_ptr, dlayer_ptr,
                         dres_ptr, ROWS, HAS_WEIGHT: tl.constexpr, HAS_LAYER: tl.constexpr,
                         WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, WANT_DLS: tl.constexpr,
                         WANT_DRES: tl.constexpr, BLOCK_ROWS: tl.constexpr, ACC: tl.constexpr):
    """Channel c: T[c] and sum x * dy from its ROWS partials (contiguous), in pairwise order
    within a step of BLOCK_ROWS and in sequence across steps; then the requested gradients,
    each in its parameter's dtype, and zeros for the bias."""
    t_sum = tl.zeros([], ACC)
    x_sum = tl.zeros([], ACC)
    for r0 in range(0, ROWS, BLOCK_ROWS):
        r = r0 + tl.arange(0, BLOCK_ROWS)
        at = c.to(tl.int64) * ROWS + r
        t_sum += pairwise_sum(tl.load(partial_t_ptr + at, mask=r < ROWS, other=0.0))
        x_sum += pairwise_sum(tl.load(partial_xdy_ptr + at, mask=r < ROWS, other=0.0))
    if WANT_DW:
        dw = t_sum
        if HAS_LAYER:
            dw = tl.load(layer_ptr + c).to(ACC) * t_sum
        tl.store(dweight_ptr + c, dw.to(dweight_ptr.dtype.element_ty))
    if WANT_DLS:
        dls = t_sum
        if HAS_WEIGHT:
            dls = tl.load(weight_ptr + c).to(ACC) * t_sum
        tl.store(dlayer_ptr + c, dls.to(dlayer_ptr.dtype.element_ty))
    if WANT_DRES:
        tl.store(dres_ptr + c, x_sum.to(dres_ptr.dtype.element_ty))
    if WANT_DB:
        tl.store(dbias_ptr + c, tl.zeros([], dbias_ptr.dtype.element_ty))


@triton.jit
def dx_output(dy, pooled_t, x, mean, coef, res, corr):
    """dx = res * dy + coef * (P^T dy - dy) - corr * (x - mean)."""
    return res * dy + coef * (pooled_t - dy) - corr * (x - mean)


@triton.jit
def _dx_kernel(x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, partial_t_ptr, partial_xdy_ptr, partial_s_ptr,
               weight_ptr, layer_ptr, res_ptr, sample_ptr, dweight_ptr, dbias_ptr, dlayer_ptr, dres_ptr,
               N, G, CG_V, PARTS, ROWS, PARAM_PROGRAMS,
               HAS_WEIGHT: tl.constexpr, HAS_LAYER: tl.constexpr, HAS_RES: tl.constexpr,
               HAS_SAMPLE: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
               WANT_DLS: tl.constexpr, WANT_DRES: tl.constexpr, WRITE_DX: tl.constexpr,
               PARTS_P2: tl.constexpr, PARAM_ROWS: tl.constexpr,
               H: tl.constexpr, W: tl.constexpr, VEC: tl.constexpr, VEC_C: tl.constexpr,
               CHANNELS_LAST: tl.constexpr, RADIUS_H: tl.constexpr, RADIUS_W: tl.constexpr,
               HALO: tl.constexpr, WIDE: tl.constexpr, CG_P2: tl.constexpr, BLOCK_W: tl.constexpr,
               TILE_P: tl.constexpr, TILE_C: tl.constexpr, TILE_W: tl.constexpr, TILE_H: tl.constexpr):
    ACC: tl.constexpr = rstd_ptr.dtype.element_ty
    Cg = CG_V * VEC_C
    C = G * Cg
    pid = tl.program_id(0)
    # One program per channel for the parameter gradients, first, so that they start early
    # and overlap the tiles.
    if pid < PARAM_PROGRAMS:
        _parameter_gradients(pid, partial_t_ptr, partial_xdy_ptr, weight_ptr, layer_ptr, dweight_ptr, dbias_ptr,
                             dlayer_ptr, dres_ptr, ROWS, HAS_WEIGHT, HAS_LAYER, WANT_DW, WANT_DB, WANT_DLS,
                             WANT_DRES, PARAM_ROWS, ACC)
    elif WRITE_DX:
        TC: tl.constexpr = tile_channels(CHANNELS_LAST, TILE_P, TILE_C, H, CG_P2)
        TH: tl.constexpr = tile_rows(CHANNELS_LAST, TILE_P, TILE_H, H)
        TILES_W: tl.constexpr = tiles_along(W, tile_columns(CHANNELS_LAST, TILE_P, TILE_W, BLOCK_W, W))
        ng, cb, hb, wb = tile_coords(pid - PARAM_PROGRAMS, Cg, tiles_along(H, TH), TILES_W, TC)
        n = ng // G
        mean = tl.load(mean_ptr + ng)
        rstd = tl.load(rstd_ptr + ng)
        p = tl.arange(0, PARTS_P2)
        group_sum = pairwise_sum(tl.load(partial_s_ptr + ng * PARTS + p, mask=p < PARTS, other=0.0))
        corr = divide(rstd * rstd * rstd * group_sum, tl.zeros([], ACC) + Cg * H * W)
        factor = rstd
        if HAS_SAMPLE:
            factor = factor * tl.load(sample_ptr + n).to(ACC)
        base = n.to(tl.int64) * C * H * W
        x = x_ptr + base
        dy = dy_ptr + base
        dx = dx_ptr + base
        if CHANNELS_LAST:
            TW: tl.constexpr = strip_columns(TILE_W, W)
            w_first, p_ok, c, c_ok = cl_tile_setup(ng, cb, wb, G, Cg, W, WIDE, CG_P2, TILE_P, TILE_C, TILE_W)
            coef, res = channel_factors(weight_ptr, layer_ptr, res_ptr, c, c_ok, factor, HAS_WEIGHT, HAS_LAYER,
                                        HAS_RES, ACC)
            h_first = hb * TH
            sums, kept = cl_window_start(dy, 0.0, h_first, p_ok, c, c_ok, w_first, C, H, W, TW, RADIUS_H,
                                         RADIUS_W, WIDE, True, ACC)
            for h in range(h_first, tl.minimum(h_first + TH, H)):
                sums, kept, grads, pooled, offsets, masks, _ = cl_window_step(
                    sums, kept, dy, 0.0, h, p_ok, c, c_ok, w_first, C, H, W, TW, RADIUS_H, RADIUS_W, WIDE, True,
                    ACC)
                for t in tl.static_range(TW):
                    xv = tl.load(x + offsets[t], mask=masks[t], other=0.0).to(ACC)
                    out = dx_output(grads[t], pooled[t], xv, mean, coef, res, corr)
                    tl.store(dx + offsets[t], out.to(dx_ptr.dtype.element_ty), mask=masks[t])
        else:
            grads, pooled, offsets, masks, _, c, c_ok = nchw_pooled_tile(
                dy, 0.0, ng, cb, hb, wb, G, Cg, H, W, VEC, RADIUS_H, RADIUS_W, HALO, WIDE, CG_P2, BLOCK_W, TILE_P,
                True, ACC)
            coef, res = channel_factors(weight_ptr, layer_ptr, res_ptr, c, c_ok, factor, HAS_WEIGHT, HAS_LAYER,
                                        HAS_RES, ACC)
            for o in tl.static_range(len(grads)):
                xv = tl.load(x + offsets[o], mask=masks[o], other=0.0).to(ACC)
                out = dx_output(grads[o], pooled[o], xv, mean, coef, res, corr)
                tl.store(dx + offsets[o], out.to(dx_ptr.dtype.element_ty), mask=masks[o])


_DX = {cl: autotuned(_dx_kernel, cl) for cl in (False, True)}


# ---------------------------------------------------------------------------------------
# Host side.


class SumsPlan:
    """The tile of the sums pass (the first candidate that fits the shape, see
    ``fitting_tiles``) and how each group's tiles are shared among its programs: fixed by
    the shape."""

    def __init__(self, geo: TileGeometry):
        if geo.channels_last:
            candidates = [triton.Config({"TILE_P": p, "TILE_C": c, "TILE_W": w, "TILE_H": h}, num_warps=warps)
                          for p, c, w, h, warps in _SUMS_CL_TILES]
        else:
            candidates = [triton.Config({"TILE_P": p}, num_warps=warps) for p, warps in _SUMS_NCHW_TILES]
        args = geo.shape_args()
        best = fitting_tiles(candidates, args, geo.registers_per_value)[0]
        chosen = {**args, **best.kwargs}
        self.tile = {k: chosen[k] for k in ("TILE_P", "TILE_C", "TILE_W", "TILE_H")}
        self.num_warps = best.num_warps
        self.slots = geo.slots(self.tile)
        tiles = geo.tiles_per_group(self.tile)
        self.parts = max(1, min(MAX_PARTS, tiles, _SUMS_PROGRAMS // (geo.N * geo.G)))
        self.rows = geo.N * self.slots  # partials per channel of T and sum x * dy


def workspace_numel(geo: TileGeometry) -> int:
    """Elements of the backward workspace: the T and x * dy partials of every channel and
    the S partials of every group."""
    plan = SumsPlan(geo)
    return 2 * geo.C * plan.rows + geo.N * geo.G * plan.parts


def backward_launches(x, dy, dx, mean, rstd, workspace, weight, layer_scale, res_scale, sample_scale,
                      grads, geo: TileGeometry):
    """The two launches of the backward as (kernel, grid, keyword arguments).  ``grads`` holds
    (dweight, dbias, dlayer_scale, dres_scale), None where not asked for; dx is None when
    not asked for."""
    plan = SumsPlan(geo)
    channel_partials = geo.C * plan.rows
    partial_t = workspace[:channel_partials]
    partial_xdy = workspace[channel_partials:2 * channel_partials]
    partial_s = workspace[2 * channel_partials:]
    shape = geo.shape_args()
    placeholder = rstd
    vectors = dict(
        weight_ptr=placeholder if weight is None else weight,
        layer_ptr=placeholder if layer_scale is None else layer_scale,
        sample_ptr=placeholder if sample_scale is None else sample_scale,
        HAS_WEIGHT=weight is not None, HAS_LAYER=layer_scale is not None, HAS_SAMPLE=sample_scale is not None,
    )
    sums = (_sums_kernel, (geo.N * geo.G * plan.parts,), dict(
        x_ptr=x, dy_ptr=dy, mean_ptr=mean, rstd_ptr=rstd,
        partial_t_ptr=partial_t, partial_xdy_ptr=partial_xdy, partial_s_ptr=partial_s,
        N=geo.N, PARTS=plan.parts, **vectors, **{**shape, **plan.tile}, num_warps=plan.num_warps,
    ))
    dweight, dbias, dlayer, dres = grads
    param_programs = geo.C if any(g is not None for g in grads) else 0
    dx_args = dict(
        x_ptr=x, dy_ptr=dy, dx_ptr=placeholder if dx is None else dx, mean_ptr=mean, rstd_ptr=rstd,
        partial_t_ptr=partial_t, partial_xdy_ptr=partial_xdy, partial_s_ptr=partial_s,
        res_ptr=placeholder if res_scale is None else res_scale,
        dweight_ptr=placeholder if dweight is None else dweight,
        dbias_ptr=placeholder if dbias is None else dbias,
        dlayer_ptr=placeholder if dlayer is None else dlayer,
        dres_ptr=placeholder if dres is None else dres,
        N=geo.N, PARTS=plan.parts, ROWS=plan.rows, PARAM_PROGRAMS=param_programs,
        HAS_RES=res_scale is not None, WANT_DW=dweight is not None, WANT_DB=dbias is not None,
        WANT_DLS=dlayer is not None, WANT_DRES=dres is not None, WRITE_DX=dx is not None,
        PARTS_P2=next_pow2(plan.parts), PARAM_ROWS=min(next_pow2(plan.rows), _PARAM_ROWS), **vectors, **shape,
    )

    def dx_grid(meta):
        return (param_programs + (geo.tile_programs(meta) if dx is not None else 0),)

    launches = [sums]
    if dx is not None or param_programs:
        launches.append((_DX[geo.channels_last], dx_grid, dx_args))
    return launches

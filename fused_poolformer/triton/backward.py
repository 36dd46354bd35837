"""Backward Triton kernels (docs/math.md, "Backward"): with D = P x - x, a = sample_scale *
weight * layer_scale and M = Cg * H * W elements per group,

    S[n, g] = sum over the group of a * D * dy
    dx      = res_scale * dy + a * rstd * (P^T dy - dy) - rstd^3 / M * S[n, g] * (x - mean)
    T[c]    = sum over n, h, w of rstd * sample_scale * D * dy
    dweight = layer_scale * T,  dlayer_scale = weight * T,  dres_scale = sum x * dy,  dbias = 0

Two launches:
  1. ``_sums_kernel``: per tile and channel, the sums of D * dy and x * dy (D from the same
     separable box sum as the forward), written to fixed slots (N, tiles, C);
  2. ``_dx_kernel``: its first programs finish the parameter gradients (T[c] and sum x * dy
     over the slots, in a fixed order, written in each parameter's dtype, dbias as zeros);
     every other program folds S[n, g] for its group from the slots in its prologue and
     writes a tile of dx from the adjoint box sum of dy, scaled per row and column.
No float atomics: every sum has a fixed order, so the result is bitwise reproducible.
"""

import triton
import triton.language as tl

from .common import (
    INTERPRET,
    Geometry,
    autotuned,
    divide,
    cl_pool,
    cl_rows_channels,
    inv_window_count,
    nchw_columns,
    nchw_pool,
    nchw_rows,
    next_pow2,
    pairwise_dot,
    pairwise_sum,
    row_taps,
    tile_c,
    tile_coords,
    tile_h,
    tile_w,
    vector_or_ones,
)

# The sums pass is not autotuned (its slots are merged, so its tiles are fixed by the shape).
# The interpreter gets small tiles, so that the tests' small planes have several slots.
_SUMS_TILE_ELEMENTS = 128 if INTERPRET else 4096
_SUMS_CL_TILE = (8, 8)  # rows, columns
_PARAM_BLOCK_C = 32  # channels per parameter-gradient program
_PARAM_BLOCK_ROWS = 64  # (sample, slot) rows per step of a parameter-gradient program
_FOLD_BLOCK = 2048  # elements per step of the S[n, g] fold


# ---------------------------------------------------------------------------------------
# Pass 1: per (tile, channel) sums of D * dy and x * dy.


@triton.jit
def _sums_kernel(x_ptr, dy_ptr, mean_ptr, part_d_ptr, part_x_ptr, G, CG_V, H, W_V,
                 VEC_C: tl.constexpr, VEC_W: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                 RADIUS_H: tl.constexpr, RADIUS_W: tl.constexpr, HALO: tl.constexpr, WIDE: tl.constexpr,
                 H_P2: tl.constexpr, W_P2: tl.constexpr, CG_P2: tl.constexpr, BLOCK_C: tl.constexpr,
                 TILE_ROWS: tl.constexpr, TILE_COLS: tl.constexpr):
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    TC: tl.constexpr = tile_c(CHANNELS_LAST, TILE_ROWS, BLOCK_C, H_P2, CG_P2)
    TH: tl.constexpr = tile_h(TILE_ROWS, H_P2)
    TW: tl.constexpr = tile_w(CHANNELS_LAST, TILE_COLS, W_P2)
    Cg = CG_V * VEC_C
    W = W_V * VEC_W
    C = G * Cg
    ng, cb, hb, wb = tile_coords(tl.program_id(0), Cg, H, W, TC, TH, TW)
    n = ng // G
    mean = tl.load(mean_ptr + ng)
    base = n.to(tl.int64) * C * H * W
    slots = tl.cdiv(H, TH) * tl.cdiv(W, TW)
    slot_base = (n.to(tl.int64) * slots + hb * tl.cdiv(W, TW) + wb) * C
    if CHANNELS_LAST:
        h, row_ok, row_off, c, c_ok = cl_rows_channels(ng, cb, hb, G, Cg, H, W, C, TC, TH, WIDE)
        w0 = wb * TW
        taps = row_taps(row_off, h, row_ok, W * C, H, RADIUS_H, False, ACC)
        centres, boxes = cl_pool(x_ptr + base, taps, c, c_ok, w0, C, W, mean, RADIUS_W, TW, False, ACC)
        inv_h = inv_window_count(h, RADIUS_H, H, ACC)
        sum_d = tl.zeros([TC], ACC)
        sum_x = tl.zeros([TC], ACC)
        for i in tl.static_range(TW):
            w = w0 + i
            ok = row_ok & c_ok & (w < W)
            dy = tl.load(dy_ptr + base + row_off + w * C + c, mask=ok, other=0.0).to(ACC)
            d = boxes[i] * (inv_h * inv_window_count(w, RADIUS_W, W, ACC)) - (centres[i] - mean)
            sum_d += tl.sum(tl.where(ok, d * dy, 0.0), axis=0)
            sum_x += tl.sum(centres[i] * dy, axis=0)
        channel = tl.reshape(c, [TC])
        tl.store(part_d_ptr + slot_base + channel, sum_d, mask=tl.reshape(c_ok, [TC]))
        tl.store(part_x_ptr + slot_base + channel, sum_x, mask=tl.reshape(c_ok, [TC]))
    else:
        c, h, row_ok, row_off = nchw_rows(ng, cb, hb, G, Cg, H, W, TC, TH, WIDE)
        cols, left, right = nchw_columns(wb, TW, VEC_W, HALO, WIDE)
        taps = row_taps(row_off, h, row_ok, W, H, RADIUS_H, False, ACC)
        centre, box = nchw_pool(x_ptr + base, taps, cols, left, right, W, mean, RADIUS_W, False, ACC)
        ok = row_ok & (cols < W)
        dy = tl.load(dy_ptr + base + row_off + cols, mask=ok, other=0.0).to(ACC)
        inv_count = inv_window_count(h, RADIUS_H, H, ACC) * inv_window_count(cols, RADIUS_W, W, ACC)
        d = box * inv_count - (centre - mean)
        # Rows are TC planes of TH rows: per-channel sums over each plane's rows and columns.
        sum_d = tl.sum(tl.reshape(tl.where(ok, d * dy, 0.0), [TC, TH * TW]), axis=1)
        sum_x = tl.sum(tl.reshape(centre * dy, [TC, TH * TW]), axis=1)
        c_in_group = cb * TC + tl.arange(0, TC)
        channel = (ng % G) * Cg + c_in_group
        tl.store(part_d_ptr + slot_base + channel, sum_d, mask=c_in_group < Cg)
        tl.store(part_x_ptr + slot_base + channel, sum_x, mask=c_in_group < Cg)


# ---------------------------------------------------------------------------------------
# Pass 2: parameter gradients and dx.


@triton.jit
def _group_fold(part_d_ptr, weight_ptr, layer_ptr, n, g, Cg, C, SLOTS, HAS_WEIGHT: tl.constexpr,
                HAS_LAYER: tl.constexpr, FOLD_C: tl.constexpr, FOLD_T: tl.constexpr, ACC: tl.constexpr):
    """sum over the group's channels c of weight * layer_scale * (sum over slots of D * dy),
    in a fixed pairwise order."""
    total = tl.zeros([], ACC)
    for c0 in range(0, Cg, FOLD_C):
        c_in_group = c0 + tl.arange(0, FOLD_C)
        c_ok = c_in_group < Cg
        c = g * Cg + c_in_group
        per_channel = tl.zeros([FOLD_C], ACC)
        for t0 in range(0, SLOTS, FOLD_T):
            t = t0 + tl.arange(0, FOLD_T)[None, :]
            at = (n.to(tl.int64) * SLOTS + t) * C + c[:, None]
            per_channel += pairwise_sum(tl.load(part_d_ptr + at, mask=c_ok[:, None] & (t < SLOTS), other=0.0))
        factor = vector_or_ones(weight_ptr, c, c_ok, HAS_WEIGHT, ACC) * vector_or_ones(
            layer_ptr, c, c_ok, HAS_LAYER, ACC)
        total += pairwise_dot(factor, per_channel)
    return total


@triton.jit
def _parameter_gradients(program, part_d_ptr, part_x_ptr, rstd_ptr, weight_ptr, layer_ptr, sample_ptr,
                         dweight_ptr, dbias_ptr, dlayer_ptr, dres_ptr, N, G, Cg, C, SLOTS,
                         HAS_WEIGHT: tl.constexpr, HAS_LAYER: tl.constexpr, HAS_SAMPLE: tl.constexpr,
                         WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, WANT_DLS: tl.constexpr,
                         WANT_DRES: tl.constexpr, BLOCK_PC: tl.constexpr, BLOCK_NT: tl.constexpr,
                         ACC: tl.constexpr):
    """Channels [program * BLOCK_PC, +BLOCK_PC): T[c] = sum over (n, slot) of rstd *
    sample_scale * (D dy partial) and sum of the x dy partials, in a fixed order."""
    c = program * BLOCK_PC + tl.arange(0, BLOCK_PC)
    c_ok = c < C
    g = c // Cg
    t_sum = tl.zeros([BLOCK_PC], ACC)
    x_sum = tl.zeros([BLOCK_PC], ACC)
    rows = N * SLOTS
    for i0 in range(0, rows, BLOCK_NT):
        i = i0 + tl.arange(0, BLOCK_NT)[None, :]
        ok = c_ok[:, None] & (i < rows)
        at = i.to(tl.int64) * C + c[:, None]
        n = i // SLOTS
        factor = tl.load(rstd_ptr + n * G + g[:, None], mask=ok, other=0.0)
        if HAS_SAMPLE:
            factor = factor * tl.load(sample_ptr + n, mask=i < rows, other=0.0).to(ACC)
        t_sum += pairwise_dot(factor, tl.load(part_d_ptr + at, mask=ok, other=0.0))
        x_sum += pairwise_sum(tl.load(part_x_ptr + at, mask=ok, other=0.0))
    if WANT_DW:
        dw = vector_or_ones(layer_ptr, c, c_ok, HAS_LAYER, ACC) * t_sum
        tl.store(dweight_ptr + c, dw.to(dweight_ptr.dtype.element_ty), mask=c_ok)
    if WANT_DLS:
        dls = vector_or_ones(weight_ptr, c, c_ok, HAS_WEIGHT, ACC) * t_sum
        tl.store(dlayer_ptr + c, dls.to(dlayer_ptr.dtype.element_ty), mask=c_ok)
    if WANT_DRES:
        tl.store(dres_ptr + c, x_sum.to(dres_ptr.dtype.element_ty), mask=c_ok)
    if WANT_DB:
        tl.store(dbias_ptr + c, tl.zeros([BLOCK_PC], dbias_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def dx_output(dy, pooled_t, x, mean, coef, res, corr):
    """dx = res * dy + coef * (P^T dy - dy) - corr * (x - mean)."""
    return res * dy + coef * (pooled_t - dy) - corr * (x - mean)


@triton.jit
def _dx_kernel(x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, part_d_ptr, part_x_ptr,
               weight_ptr, layer_ptr, res_ptr, sample_ptr, dweight_ptr, dbias_ptr, dlayer_ptr, dres_ptr,
               N, G, CG_V, H, W_V, SLOTS, PARAM_PROGRAMS,
               HAS_WEIGHT: tl.constexpr, HAS_LAYER: tl.constexpr, HAS_RES: tl.constexpr,
               HAS_SAMPLE: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
               WANT_DLS: tl.constexpr, WANT_DRES: tl.constexpr, WRITE_DX: tl.constexpr,
               FOLD_C: tl.constexpr, FOLD_T: tl.constexpr, BLOCK_PC: tl.constexpr, BLOCK_NT: tl.constexpr,
               VEC_C: tl.constexpr, VEC_W: tl.constexpr, CHANNELS_LAST: tl.constexpr,
               RADIUS_H: tl.constexpr, RADIUS_W: tl.constexpr, HALO: tl.constexpr, WIDE: tl.constexpr,
               H_P2: tl.constexpr, W_P2: tl.constexpr, CG_P2: tl.constexpr, BLOCK_C: tl.constexpr,
               TILE_ROWS: tl.constexpr, TILE_COLS: tl.constexpr):
    ACC: tl.constexpr = rstd_ptr.dtype.element_ty
    Cg = CG_V * VEC_C
    W = W_V * VEC_W
    C = G * Cg
    pid = tl.program_id(0)
    # The parameter programs come first, so that they start early and overlap the tiles.
    if pid < PARAM_PROGRAMS:
        _parameter_gradients(pid, part_d_ptr, part_x_ptr, rstd_ptr, weight_ptr, layer_ptr, sample_ptr,
                             dweight_ptr, dbias_ptr, dlayer_ptr, dres_ptr, N, G, Cg, C, SLOTS,
                             HAS_WEIGHT, HAS_LAYER, HAS_SAMPLE, WANT_DW, WANT_DB, WANT_DLS, WANT_DRES,
                             BLOCK_PC, BLOCK_NT, ACC)
    elif WRITE_DX:
        TC: tl.constexpr = tile_c(CHANNELS_LAST, TILE_ROWS, BLOCK_C, H_P2, CG_P2)
        TH: tl.constexpr = tile_h(TILE_ROWS, H_P2)
        TW: tl.constexpr = tile_w(CHANNELS_LAST, TILE_COLS, W_P2)
        ng, cb, hb, wb = tile_coords(pid - PARAM_PROGRAMS, Cg, H, W, TC, TH, TW)
        n = ng // G
        g = ng % G
        mean = tl.load(mean_ptr + ng)
        rstd = tl.load(rstd_ptr + ng)
        sample = tl.full([], 1.0, ACC)
        if HAS_SAMPLE:
            sample = tl.load(sample_ptr + n).to(ACC)
        group_sum = sample * _group_fold(part_d_ptr, weight_ptr, layer_ptr, n, g, Cg, C, SLOTS, HAS_WEIGHT,
                                         HAS_LAYER, FOLD_C, FOLD_T, ACC)
        corr = divide(rstd * rstd * rstd * group_sum, (Cg * H * W).to(ACC))
        factor = sample * rstd
        base = n.to(tl.int64) * C * H * W
        if CHANNELS_LAST:
            h, row_ok, row_off, c, c_ok = cl_rows_channels(ng, cb, hb, G, Cg, H, W, C, TC, TH, WIDE)
            coef = (vector_or_ones(weight_ptr, c, c_ok, HAS_WEIGHT, ACC)
                    * vector_or_ones(layer_ptr, c, c_ok, HAS_LAYER, ACC)) * factor
            res = vector_or_ones(res_ptr, c, c_ok, HAS_RES, ACC)
            w0 = wb * TW
            taps = row_taps(row_off, h, row_ok, W * C, H, RADIUS_H, True, ACC)
            grads, pooled = cl_pool(dy_ptr + base, taps, c, c_ok, w0, C, W, 0.0, RADIUS_W, TW, True, ACC)
            for i in tl.static_range(TW):
                w = w0 + i
                ok = row_ok & c_ok & (w < W)
                at = base + row_off + w * C + c
                xv = tl.load(x_ptr + at, mask=ok, other=0.0).to(ACC)
                out = dx_output(grads[i], pooled[i], xv, mean, coef, res, corr)
                tl.store(dx_ptr + at, out.to(dx_ptr.dtype.element_ty), mask=ok)
        else:
            c, h, row_ok, row_off = nchw_rows(ng, cb, hb, G, Cg, H, W, TC, TH, WIDE)
            cols, left, right = nchw_columns(wb, TW, VEC_W, HALO, WIDE)
            coef = (vector_or_ones(weight_ptr, c, row_ok, HAS_WEIGHT, ACC)
                    * vector_or_ones(layer_ptr, c, row_ok, HAS_LAYER, ACC)) * factor
            res = vector_or_ones(res_ptr, c, row_ok, HAS_RES, ACC)
            taps = row_taps(row_off, h, row_ok, W, H, RADIUS_H, True, ACC)
            grad, pooled = nchw_pool(dy_ptr + base, taps, cols, left, right, W, 0.0, RADIUS_W, True, ACC)
            ok = row_ok & (cols < W)
            at = base + row_off + cols
            xv = tl.load(x_ptr + at, mask=ok, other=0.0).to(ACC)
            out = dx_output(grad, pooled, xv, mean, coef, res, corr)
            tl.store(dx_ptr + at, out.to(dx_ptr.dtype.element_ty), mask=ok)


_DX = {cl: autotuned(_dx_kernel, cl) for cl in (False, True)}


# ---------------------------------------------------------------------------------------
# Host side.


def sums_tile(geo: Geometry):
    """(TILE_ROWS, TILE_COLS) of the sums pass: fixed by the shape, never autotuned."""
    if geo.channels_last:
        return _SUMS_CL_TILE
    return max(1, _SUMS_TILE_ELEMENTS // geo.block_w), geo.block_w


def slots_per_sample(geo: Geometry) -> int:
    """Spatial tiles of the sums pass per channel plane: the partial-sum slots."""
    return geo.tiles_per_sample(*sums_tile(geo))[1]


def workspace_numel(geo: Geometry) -> int:
    """Elements of the backward workspace: the D * dy and x * dy slots."""
    return 2 * geo.N * slots_per_sample(geo) * geo.C


def backward_launches(x, dy, dx, mean, rstd, workspace, weight, layer_scale, res_scale, sample_scale,
                      grads, geo: Geometry):
    """The two launches of the backward as (kernel, grid, keyword arguments).  ``grads`` holds
    (dweight, dbias, dlayer_scale, dres_scale), None where not asked for; dx is None when
    not asked for."""
    rows, cols = sums_tile(geo)
    slots = slots_per_sample(geo)
    partial = geo.N * slots * geo.C
    part_d, part_x = workspace[:partial], workspace[partial:]
    shape = geo.shape_args()
    sums = (_sums_kernel, (geo.tile_programs(dict(TILE_ROWS=rows, TILE_COLS=cols)),), dict(
        x_ptr=x, dy_ptr=dy, mean_ptr=mean, part_d_ptr=part_d, part_x_ptr=part_x, **shape,
        TILE_ROWS=rows, TILE_COLS=cols, num_warps=8,
    ))
    placeholder = rstd
    dweight, dbias, dlayer, dres = grads
    param_programs = triton.cdiv(geo.C, _PARAM_BLOCK_C) if any(g is not None for g in grads) else 0
    fold_c = min(geo.cg_p2, _FOLD_BLOCK)
    dx_args = dict(
        x_ptr=x, dy_ptr=dy, dx_ptr=placeholder if dx is None else dx, mean_ptr=mean, rstd_ptr=rstd,
        part_d_ptr=part_d, part_x_ptr=part_x,
        weight_ptr=placeholder if weight is None else weight,
        layer_ptr=placeholder if layer_scale is None else layer_scale,
        res_ptr=placeholder if res_scale is None else res_scale,
        sample_ptr=placeholder if sample_scale is None else sample_scale,
        dweight_ptr=placeholder if dweight is None else dweight,
        dbias_ptr=placeholder if dbias is None else dbias,
        dlayer_ptr=placeholder if dlayer is None else dlayer,
        dres_ptr=placeholder if dres is None else dres,
        N=geo.N, SLOTS=slots, PARAM_PROGRAMS=param_programs,
        HAS_WEIGHT=weight is not None, HAS_LAYER=layer_scale is not None, HAS_RES=res_scale is not None,
        HAS_SAMPLE=sample_scale is not None, WANT_DW=dweight is not None, WANT_DB=dbias is not None,
        WANT_DLS=dlayer is not None, WANT_DRES=dres is not None, WRITE_DX=dx is not None,
        FOLD_C=fold_c, FOLD_T=min(next_pow2(slots), max(1, _FOLD_BLOCK // fold_c)),
        BLOCK_PC=_PARAM_BLOCK_C, BLOCK_NT=min(next_pow2(geo.N * slots), _PARAM_BLOCK_ROWS), **shape,
    )
    if not geo.channels_last:
        dx_args["TILE_COLS"] = geo.block_w

    def dx_grid(meta):
        return (param_programs + (geo.tile_programs(meta) if dx is not None else 0),)

    launches = [sums]
    if dx is not None or param_programs:
        launches.append((_DX[geo.channels_last], dx_grid, dx_args))
    return launches

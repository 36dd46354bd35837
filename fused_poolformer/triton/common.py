"""Pieces shared by the forward and backward Triton kernels (docs/math.md).

Device helpers (``@triton.jit``):
  * ``pairwise_sum`` / ``pairwise_dot``: fixed-order tree reductions built from elementwise
    adds only, for every sum whose result several programs must agree on bit for bit;
  * ``inv_window_count``: 1 / (valid taps) of the pool window (padding excluded, contract.pool_arguments),
    one per row or column, as a select between constants;
  * ``split_last`` / ``join_last``: a thread's vector as a tuple of its entries and back
    (register renames, no arithmetic);
  * the tiles: ``nchw_tile`` (a static loop down the rows) and ``cl_row`` /
    ``cl_window_start`` / ``cl_window_step`` (the body of a channels_last row loop).

Host side: ``TileGeometry`` (vector width, radii, tile sizes, grids of one call), the tile cost
model that prunes autotuning configurations, and the configurations.

The box sum is separable and every element of a tile and its halo is loaded once: each
loaded row's horizontal window sums are formed in registers, and each output row adds the
2r + 1 row sums around it (the order of the adds is fixed: centre first, then the pairs at
distance 1, 2, ...).  Loads are as wide as the contiguous axis allows (16 bytes when its
length is a multiple of the vector).
  NCHW: a program owns P strips (channel planes x bands of rows) of BLOCK_W columns, held
    as [P, BLOCK_W / VEC, VEC]: each thread loads VEC consecutive columns and the HALO
    columns either side of them, and walks the TH rows of its band in a static loop.
  channels_last: a program owns P strips of TW columns side by side, BLOCK_C channels
    each ([P, BLOCK_C] per column: one vector of channels per thread), and walks its rows
    in a dynamic loop that carries the last 2r row sums.
No tile crosses a group, so its mean, rstd and S[n, g] are scalars, merged once per program.

Determinism.  Reductions whose inputs are fixed by the shape (statistics and backward
partial sums) use ``tl.sum`` in kernels that are not autotuned.  The autotuned kernels
(apply, dx) merge those partials with ``pairwise_sum`` / ``pairwise_dot``, whose order and
rounding do not depend on the layout the compiler picks for a tile, and compute every
output element by the same expression whatever the tile: no autotuning choice can change
a bit of the result.
"""

import os

import torch
import triton
import triton.language as tl
from triton.runtime.jit import constexpr_function

from ..contract import pool_radius

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

INT32_LIMIT = 2**31
VECTOR_BYTES = 16  # one 128-bit load or store per thread and vector


@constexpr_function
def log2(n):
    return max(int(n).bit_length() - 1, 0)


# ---------------------------------------------------------------------------------------
# Fixed-order reductions.


@triton.jit
def pairwise_sum(v):
    """Sum over the last axis of v (a power of two long) as a balanced tree of pairs,
    ((v0 + v1) + (v2 + v3)) + ...  Only elementwise adds: the bits do not depend on how the
    compiler lays v out over threads (tl.sum's order does)."""
    if v.shape[-1] == 1:
        return tl.sum(v, axis=len(v.shape) - 1)
    else:
        for _ in tl.static_range(log2(v.shape[-1]) - 1):
            a, b = tl.split(tl.reshape(v, v.shape[:-1] + [v.shape[-1] // 2, 2]))
            v = a + b
        a, b = tl.split(v)
        return a + b


@triton.jit
def pairwise_dot(a, b):
    """sum(a * b) over the last axis in pairwise order.  The first level is an explicit
    fma(a0, b0, a1 * b1), so floating-point contraction cannot differ between layouts."""
    if a.shape[-1] == 1:
        return tl.sum(a * b, axis=len(a.shape) - 1)
    else:
        new_shape: tl.constexpr = a.shape[:-1] + [a.shape[-1] // 2, 2]
        a0, a1 = tl.split(tl.reshape(a, new_shape))
        b0, b1 = tl.split(tl.reshape(b, new_shape))
        return pairwise_sum(tl.fma(a0, b0, a1 * b1))


@triton.jit
def divide(a, b):
    """a / b rounded to nearest (Triton's float32 ``/`` is the approximate div.full)."""
    if b.dtype == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def sqrt_rn(v):
    if v.dtype == tl.float32:
        return tl.sqrt_rn(v)
    else:
        return tl.sqrt(v)


# ---------------------------------------------------------------------------------------
# Pool windows (the rule: contract.pool_arguments; padding excluded from the count).


@triton.jit
def inv_window_count(i, RADIUS: tl.constexpr, L: tl.constexpr, ACC: tl.constexpr):
    """1 / (valid taps of the window centred on i) along an axis of constexpr length L: a
    select between the few constants it can be (correctly rounded by the compiler), not a
    division.  Lanes outside the axis get some finite value."""
    count = tl.minimum(i + RADIUS, L - 1) - tl.maximum(i - RADIUS, 0) + 1
    inv = tl.full(count.shape, 1.0 / (2 * RADIUS + 1), ACC)
    for k in tl.static_range(1, 2 * RADIUS + 1):
        inv = tl.where(count == k, 1.0 / k, inv)
    return inv


@triton.jit
def vector_or_ones(ptr, index, mask, PRESENT: tl.constexpr, ACC: tl.constexpr):
    """An optional parameter vector (weight, layer_scale, ...) at index; ones when absent."""
    if PRESENT:
        return tl.load(ptr + index, mask=mask, other=1.0).to(ACC)
    else:
        return tl.full(index.shape, 1.0, ACC)


@triton.jit
def channel_factors(weight_ptr, layer_ptr, res_ptr, c, c_ok, factor, HAS_WEIGHT: tl.constexpr,
                    HAS_LAYER: tl.constexpr, HAS_RES: tl.constexpr, ACC: tl.constexpr):
    """(coef, res) of channels c: coef = weight * layer_scale * factor (factor = rstd, times
    the sample's scale), res = res_scale; absent vectors count as ones."""
    coef = (vector_or_ones(weight_ptr, c, c_ok, HAS_WEIGHT, ACC)
            * vector_or_ones(layer_ptr, c, c_ok, HAS_LAYER, ACC)) * factor
    return coef, vector_or_ones(res_ptr, c, c_ok, HAS_RES, ACC)


@constexpr_function
def bit_reverse(k, bits):
    return int(format(k, f"0{bits}b")[::-1], 2) if bits else 0


@triton.jit
def split_last(v):
    """The entries of v's last axis (a power of two long, held by one thread) as a tuple of
    tensors: tl.split halves, which are register renames, not arithmetic."""
    N: tl.constexpr = v.shape[-1]
    if N == 1:
        return (tl.reshape(v, v.shape[:-1]),)
    else:
        parts = (v,)
        for _ in tl.static_range(log2(N)):
            halves = ()
            for t in tl.static_range(len(parts)):
                p = parts[t]
                if p.shape[-1] == 2:
                    a, b = tl.split(p)
                else:
                    a, b = tl.split(tl.reshape(p, p.shape[:-1] + [p.shape[-1] // 2, 2]))
                halves = halves + (a, b)
            parts = halves
        out = ()
        for k in tl.static_range(N):  # the halving left them in bit-reversed order
            out = out + (parts[bit_reverse(k, log2(N))],)
        return out


@triton.jit
def join_last(slots):
    """The inverse of split_last: a tuple of tensors joined along a new last axis."""
    N: tl.constexpr = len(slots)
    if N == 1:
        return tl.expand_dims(slots[0], len(slots[0].shape))
    else:
        parts = ()
        for k in tl.static_range(N):
            parts = parts + (slots[bit_reverse(k, log2(N))],)
        for level in tl.static_range(log2(N)):
            pairs = ()
            for t in tl.static_range(len(parts) // 2):
                j = tl.join(parts[2 * t], parts[2 * t + 1])
                if level > 0:
                    j = tl.reshape(j, j.shape[:-2] + [j.shape[-2] * 2])
                pairs = pairs + (j,)
            parts = pairs
        return parts[0]


@triton.jit
def _window_sums(seq, first, count: tl.constexpr, RADIUS: tl.constexpr):
    """(seq[i - r] + ... + seq[i + r] for i = first .. first + count - 1), added centre
    first, then the pairs at distance 1, 2, ... (one fixed order for every tile)."""
    out = ()
    for i in tl.static_range(first, first + count):
        acc = seq[i]
        for d in tl.static_range(1, RADIUS + 1):
            acc += seq[i - d] + seq[i + d]
        out = out + (acc,)
    return out


@triton.jit
def _prepare(v, ok, mean, inv_row, col, RADIUS_W: tl.constexpr, W: tl.constexpr, ADJOINT: tl.constexpr,
             ACC: tl.constexpr):
    """A loaded block as the box sum wants it: centred (v - mean, zero outside the plane)
    or, for the adjoint, scaled by 1 / cnt of its row and of its column ``col`` (v is zero
    outside)."""
    if ADJOINT:
        return v * inv_row * inv_window_count(col, RADIUS_W, W, ACC)
    else:
        return tl.where(ok, v - mean, 0.0)


# ---------------------------------------------------------------------------------------
# The tiles.  A program owns P independent strips (NCHW: channel planes x bands of rows;
# channels_last: bands of rows) and walks TH rows down each of them in a static loop.  Each
# row of the tile and of its halo is loaded once; its horizontal window sums are formed in
# registers, and each output row's box sum adds the 2r + 1 row sums around it.  The loads
# are as wide as the contiguous axis allows (VEC elements), and every loaded element is
# reused for all the taps that need it.


@constexpr_function
def tile_bands(TILE_P, H):
    """Bands of rows per strip: enough for about six rows each (halo rows cost (TH + 2r) /
    TH), at most TILE_P."""
    target = max(1, H // 6)
    return min(TILE_P, 1 << (target.bit_length() - 1))


MAX_BAND_ROWS = 16  # the static row loop is unrolled: cap its length


@constexpr_function
def band_rows(TILE_P, H):
    bands = tile_bands(TILE_P, H)
    return min(MAX_BAND_ROWS, -(-H // bands))


@triton.jit
def nchw_tile(src, mean, p_ok, p_c, h0, starts, H: tl.constexpr, W: tl.constexpr, TH: tl.constexpr,
              VEC: tl.constexpr, RADIUS_H: tl.constexpr, RADIUS_W: tl.constexpr, HALO: tl.constexpr,
              ADJOINT: tl.constexpr, ACC: tl.constexpr):
    """TH rows of an NCHW tile.  Strip p is channel p_c[p] from row h0[p] ([P, 1, 1] each);
    ``starts`` the first columns of the tile's vectors, [1, BLOCK_W / VEC, 1] (one vector of
    VEC columns per thread and group).  Each row is loaded with HALO columns either side of
    every vector.

    Returns tuples over the TH output rows: the values as loaded; the box sums (centred:
    of x - mean, not yet divided by the counts; adjoint: of dy / cnt_h / cnt_w); the
    in-sample offsets; the masks; 1 / (cnt_h * cnt_w)."""
    cols = starts + tl.arange(0, VEC)[None, None, :]
    left = starts - HALO + tl.arange(0, HALO)[None, None, :]
    right = starts + VEC + tl.arange(0, HALO)[None, None, :]
    col_ok, left_ok, right_ok = cols < W, left >= 0, right < W
    inv_c = inv_window_count(cols, RADIUS_W, W, ACC)
    row_sums = ()
    centres = ()
    offsets = ()
    masks = ()
    invs = ()
    for j in tl.static_range(TH + 2 * RADIUS_H):
        h = h0 + (j - RADIUS_H)
        row_ok = p_ok & (h >= 0) & (h < H)
        at = (p_c * H + h) * W
        inv_h = inv_window_count(h, RADIUS_H, H, ACC)
        ok_c, ok_l, ok_r = row_ok & col_ok, row_ok & left_ok, row_ok & right_ok
        v_c = tl.load(src + at + cols, mask=ok_c, other=0.0).to(ACC)
        v_l = tl.load(src + at + left, mask=ok_l, other=0.0).to(ACC)
        v_r = tl.load(src + at + right, mask=ok_r, other=0.0).to(ACC)
        seq = (split_last(_prepare(v_l, ok_l, mean, inv_h, left, RADIUS_W, W, ADJOINT, ACC))
               + split_last(_prepare(v_c, ok_c, mean, inv_h, cols, RADIUS_W, W, ADJOINT, ACC))
               + split_last(_prepare(v_r, ok_r, mean, inv_h, right, RADIUS_W, W, ADJOINT, ACC)))
        row_sums = row_sums + (_window_sums(seq, HALO, VEC, RADIUS_W),)
        if j >= RADIUS_H:
            if j < RADIUS_H + TH:
                centres = centres + (v_c,)
                offsets = offsets + (at + cols,)
                masks = masks + (ok_c,)
                invs = invs + (inv_h * inv_c,)
    boxes = ()
    for i in tl.static_range(TH):
        slots = ()
        for k in tl.static_range(VEC):
            acc = row_sums[i + RADIUS_H][k]
            for d in tl.static_range(1, RADIUS_H + 1):
                acc += row_sums[i + RADIUS_H - d][k] + row_sums[i + RADIUS_H + d][k]
            slots = slots + (acc,)
        boxes = boxes + (join_last(slots),)
    return centres, boxes, offsets, masks, invs


@triton.jit
def cl_row(src, mean, h, p_ok, c, c_ok, w_first, C, H: tl.constexpr, W: tl.constexpr, TW: tl.constexpr,
           RADIUS_H: tl.constexpr, RADIUS_W: tl.constexpr, WIDE: tl.constexpr, ADJOINT: tl.constexpr,
           ACC: tl.constexpr):
    """Row h of a channels_last tile: strip p covers columns w_first[p] .. + TW - 1
    ([P, 1]); ``c`` the tile's channels ([1, BLOCK_C], one vector per thread).  Each of the
    TW + 2r columns is one [P, BLOCK_C] load.  Returns (the TW columns as loaded, their
    horizontal window sums)."""
    row_ok = p_ok & c_ok & (h >= 0) & (h < H)
    inv_h = inv_window_count(h, RADIUS_H, H, ACC)
    if WIDE:
        h = h.to(tl.int64)
    row = src + h * (W * C) + c
    seq = ()
    centres = ()
    for e in tl.static_range(TW + 2 * RADIUS_W):
        w = w_first + (e - RADIUS_W)
        ok = row_ok & (w >= 0) & (w < W)
        v = tl.load(row + w * C, mask=ok, other=0.0).to(ACC)
        seq = seq + (_prepare(v, ok, mean, inv_h, w, RADIUS_W, W, ADJOINT, ACC),)
        if e >= RADIUS_W:
            if e < RADIUS_W + TW:
                centres = centres + (v,)
    return centres, _window_sums(seq, RADIUS_W, TW, RADIUS_W)


@triton.jit
def cl_window_start(src, mean, h_first, p_ok, c, c_ok, w_first, C, H: tl.constexpr, W: tl.constexpr,
                    TW: tl.constexpr, RADIUS_H: tl.constexpr, RADIUS_W: tl.constexpr, WIDE: tl.constexpr,
                    ADJOINT: tl.constexpr, ACC: tl.constexpr):
    """The state a channels_last row loop carries into its first output row h_first: the
    row sums of rows h_first - r .. h_first + r - 1 and the loaded values of rows h_first ..
    h_first + r - 1."""
    sums = ()
    centres = ()
    for j in tl.static_range(2 * RADIUS_H):
        row_centres, row_sums = cl_row(src, mean, h_first + (j - RADIUS_H), p_ok, c, c_ok, w_first, C, H, W, TW,
                                       RADIUS_H, RADIUS_W, WIDE, ADJOINT, ACC)
        sums = sums + (row_sums,)
        if j >= RADIUS_H:
            centres = centres + (row_centres,)
    return sums, centres


@triton.jit
def cl_window_step(sums, centres, src, mean, h, p_ok, c, c_ok, w_first, C, H: tl.constexpr, W: tl.constexpr,
                   TW: tl.constexpr, RADIUS_H: tl.constexpr, RADIUS_W: tl.constexpr, WIDE: tl.constexpr,
                   ADJOINT: tl.constexpr, ACC: tl.constexpr):
    """One step of a channels_last row loop at output row h: loads row h + r, and returns
    the carried state for row h + 1 and, for the TW outputs of row h in each strip, tuples of
    the values as loaded, the box sums (as ``nchw_tile``), the in-sample offsets, the masks
    and 1 / (cnt_h * cnt_w)."""
    new_centres, new_sums = cl_row(src, mean, h + RADIUS_H, p_ok, c, c_ok, w_first, C, H, W, TW, RADIUS_H,
                                   RADIUS_W, WIDE, ADJOINT, ACC)
    window = sums + (new_sums,)
    row_ok = p_ok & c_ok & (h < H)
    inv_h = inv_window_count(h, RADIUS_H, H, ACC)
    if WIDE:
        h = h.to(tl.int64)
    boxes = ()
    offsets = ()
    masks = ()
    invs = ()
    for t in tl.static_range(TW):
        acc = window[RADIUS_H][t]
        for d in tl.static_range(1, RADIUS_H + 1):
            acc += window[RADIUS_H - d][t] + window[RADIUS_H + d][t]
        boxes = boxes + (acc,)
        w = w_first + t
        offsets = offsets + (h * (W * C) + w * C + c,)
        masks = masks + (row_ok & (w < W),)
        invs = invs + (inv_h * inv_window_count(w, RADIUS_W, W, ACC),)
    if RADIUS_H == 0:
        out_centres = new_centres
        next_centres = centres
    else:
        out_centres = centres[0]
        next_centres = ()
        for j in tl.static_range(1, RADIUS_H):
            next_centres = next_centres + (centres[j],)
        next_centres = next_centres + (new_centres,)
    next_sums = ()
    for j in tl.static_range(1, 2 * RADIUS_H + 1):
        next_sums = next_sums + (window[j],)
    return next_sums, next_centres, out_centres, boxes, offsets, masks, invs


@triton.jit
def nchw_pooled_tile(src, mean, ng, cb, hb, wb, G, Cg, H: tl.constexpr, W: tl.constexpr, VEC: tl.constexpr,
                     RADIUS_H: tl.constexpr, RADIUS_W: tl.constexpr, HALO: tl.constexpr, WIDE: tl.constexpr,
                     CG_P2: tl.constexpr, BLOCK_W: tl.constexpr, TILE_P: tl.constexpr, ADJOINT: tl.constexpr,
                     ACC: tl.constexpr):
    """NCHW tile (cb, hb, wb) of group ng of one sample (``src`` points at the sample): the
    tuples of ``nchw_tile``, then the channel of each strip and its validity ([P, 1, 1])."""
    TC: tl.constexpr = tile_channels(False, TILE_P, 1, H, CG_P2)
    BANDS: tl.constexpr = tile_bands(TILE_P, H)
    TH: tl.constexpr = band_rows(TILE_P, H)
    p = tl.arange(0, TC * BANDS)
    c_in_group = cb * TC + (p // BANDS)[:, None, None]
    h0 = hb * (BANDS * TH) + (p % BANDS)[:, None, None] * TH
    if WIDE:
        c_in_group = c_in_group.to(tl.int64)
    c = (ng % G) * Cg + c_in_group
    c_ok = c_in_group < Cg
    starts = wb * BLOCK_W + tl.arange(0, BLOCK_W // VEC)[None, :, None] * VEC
    centres, boxes, offsets, masks, invs = nchw_tile(src, mean, c_ok, c, h0, starts, H, W, TH, VEC, RADIUS_H,
                                                     RADIUS_W, HALO, ADJOINT, ACC)
    return centres, boxes, offsets, masks, invs, c, c_ok


@triton.jit
def cl_tile_setup(ng, cb, wb, G, Cg, W: tl.constexpr, WIDE: tl.constexpr, CG_P2: tl.constexpr,
                  TILE_P: tl.constexpr, TILE_C: tl.constexpr, TILE_W: tl.constexpr):
    """channels_last tile (cb, -, wb) of group ng: the strips' first columns and validity
    ([P, 1]: P strips of TILE_W columns side by side) and the channels and their validity
    ([1, TC])."""
    TC: tl.constexpr = tile_channels(True, TILE_P, TILE_C, 1, CG_P2)
    TW: tl.constexpr = strip_columns(TILE_W, W)
    w_first = (wb * TILE_P + tl.arange(0, TILE_P)[:, None]) * TW
    c_in_group = cb * TC + tl.arange(0, TC)[None, :]
    if WIDE:
        w_first = w_first.to(tl.int64)
        c_in_group = c_in_group.to(tl.int64)
    return w_first, w_first < W, (ng % G) * Cg + c_in_group, c_in_group < Cg


@constexpr_function
def tiles_along(length, tile):
    return -(-length // tile)


@triton.jit
def tile_coords(pid, Cg, TILES_H: tl.constexpr, TILES_W: tl.constexpr, TC: tl.constexpr):
    """(n * G + g, channel block, row block, column block) of tile program pid.  Programs
    run along W fastest, then H, then the channel blocks of a group, then groups and
    samples, so neighbouring programs share their halo rows in cache."""
    wb = pid % TILES_W
    rest = pid // TILES_W
    hb = rest % TILES_H
    rest = rest // TILES_H
    tiles_c = tl.cdiv(Cg, TC)
    return rest // tiles_c, rest % tiles_c, hb, wb


# ---------------------------------------------------------------------------------------
# Tile sizes.  An autotuning configuration names TILE_P, the strips of a program (the first
# axis of its tensors: NCHW channel planes x bands of rows; channels_last groups of TILE_W
# columns side by side) and, for channels_last, TILE_C (channels) and TILE_H (rows walked
# by the row loop); the host passes BLOCK_W (NCHW columns per tile).  These functions, run
# by the compiler on constexprs and by the host for the grid, fit a configuration to the
# shape, so that every configuration is valid for every shape.


@constexpr_function
def tile_channels(CHANNELS_LAST, TILE_P, TILE_C, H, CG_P2):
    """Channels of a tile: NCHW stacks planes (strips beyond the bands); channels_last
    takes up to TILE_C of one group."""
    if CHANNELS_LAST:
        return min(TILE_C, CG_P2)
    return min(max(TILE_P // tile_bands(TILE_P, H), 1), CG_P2)


@constexpr_function
def tile_rows(CHANNELS_LAST, TILE_P, TILE_H, H):
    if CHANNELS_LAST:
        return min(TILE_H, H)
    return tile_bands(TILE_P, H) * band_rows(TILE_P, H)


@constexpr_function
def strip_columns(TILE_W, W):
    """channels_last: columns per strip."""
    return min(TILE_W, W)


@constexpr_function
def tile_columns(CHANNELS_LAST, TILE_P, TILE_W, BLOCK_W, W):
    return TILE_P * min(TILE_W, W) if CHANNELS_LAST else BLOCK_W


def tile_shape(args):
    """(channels, rows, columns) of a tile, from a kernel's arguments (with a configuration)."""
    cl, tile_p, H = args["CHANNELS_LAST"], args["TILE_P"], args["H"]
    return (tile_channels(cl, tile_p, args["TILE_C"], H, args["CG_P2"]), tile_rows(cl, tile_p, args["TILE_H"], H),
            tile_columns(cl, tile_p, args["TILE_W"], args["BLOCK_W"], args["W"]))


# Values a thread may hold at once: ptxas hoists the loads of a whole static loop to
# overlap them, and each needs a register, as does every row sum a channels_last row loop
# carries.  Past this many a kernel nears 255 registers (``python -m
# fused_poolformer.triton.aot`` prints them).
VALUES_IN_FLIGHT = 160


def tile_cost(args, num_warps: int):
    """(elements per thread along the contiguous axis of one loaded block, values in
    flight per thread) of a tile: the first must reach the vector width for 16-byte
    accesses."""
    cl, H, rh, rw = args["CHANNELS_LAST"], args["H"], args["RADIUS_H"], args["RADIUS_W"]
    tc, _, tw = tile_shape(args)
    threads = 32 * num_warps
    if cl:
        per_thread = args["TILE_P"] * tc / threads
        cols = tw // args["TILE_P"]
        return per_thread, per_thread * ((cols + 2 * rw) + (2 * rh + 1) * cols + (rh + 1) * cols)
    strips = tile_channels(False, args["TILE_P"], 1, H, args["CG_P2"]) * tile_bands(args["TILE_P"], H)
    per_thread = strips * tw / threads
    rows = band_rows(args["TILE_P"], H) + 2 * rh
    return per_thread, per_thread * rows * (1 + 2 * args["HALO"] / args["VEC"])


def fitting_tiles(configs, args, registers_per_value: int):
    """The configurations whose tiles give every thread whole vectors without exceeding
    VALUES_IN_FLIGHT 32-bit registers (a float64 value takes two); failing that, those
    within the budget; failing that, the cheapest.  ``args``: the kernel's arguments."""
    scored = []
    for cfg in configs:
        per_thread, in_flight = tile_cost({**args, **cfg.kwargs}, cfg.num_warps)
        in_flight *= registers_per_value
        scored.append((cfg, per_thread >= args["VEC"], in_flight <= VALUES_IN_FLIGHT, in_flight))
    good = [cfg for cfg, whole, fits, _ in scored if whole and fits]
    if good:
        return good
    fits = [cfg for cfg, _, fits, _ in scored if fits]
    return fits or [min(scored, key=lambda s: s[3])[0]]


def next_pow2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


def largest_pow2_dividing(n: int, cap: int) -> int:
    v = 1
    while v * 2 <= cap and n % (v * 2) == 0:
        v *= 2
    return v


# NCHW: one tile row spans up to this many columns (wider planes are cut into column
# blocks whose halo columns are loaded from the neighbours).
MAX_NCHW_BLOCK_W = 128


class TileGeometry:
    """Shape, layout and the block sizes fixed by the shape (not autotuned) of one call.

    ``vec`` is the vector width in elements along the contiguous axis (W for NCHW, C for
    channels_last): the largest power of two up to 16 bytes that divides it (and the
    group's channel count), so that every row of a tile starts on a vector boundary.  H and
    W reach the kernels as constants; the channels_last channel count as Cg / vec, which
    tells the compiler its alignment (it only infers divisibility by 16 from arguments).
    """

    def __init__(self, shape, element_size: int, channels_last: bool, num_groups: int, pool_size: int):
        self.N, self.C, self.H, self.W = (int(s) for s in shape)
        self.G = num_groups
        self.Cg = self.C // num_groups
        self.channels_last = channels_last
        radius = pool_radius(pool_size)
        # A radius past the plane reaches no further element: the clipped one unrolls less.
        self.radius_h = min(radius, max(self.H - 1, 0))
        self.radius_w = min(radius, max(self.W - 1, 0))
        self.halo = next_pow2(self.radius_w)
        max_vec = VECTOR_BYTES // element_size
        self.vec = largest_pow2_dividing(self.Cg if channels_last else self.W, max_vec)
        self.vec_c = self.vec if channels_last else 1
        self.wide = self.C * self.H * self.W >= INT32_LIMIT
        self.registers_per_value = 2 if element_size == 8 else 1  # float64 accumulates in float64
        self.cg_p2 = next_pow2(self.Cg)
        self.block_w = max(self.vec, min(next_pow2(self.W), MAX_NCHW_BLOCK_W))  # NCHW columns

    def shape_args(self):
        """The shape arguments of the tile kernels, by name (NCHW: with its column block)."""
        args = dict(
            G=self.G, CG_V=self.Cg // self.vec_c, H=self.H, W=self.W, VEC=self.vec, VEC_C=self.vec_c,
            CHANNELS_LAST=self.channels_last, RADIUS_H=self.radius_h, RADIUS_W=self.radius_w, HALO=self.halo,
            WIDE=self.wide, CG_P2=self.cg_p2, BLOCK_W=self.block_w,
        )
        if not self.channels_last:
            args.update(TILE_C=1, TILE_W=1, TILE_H=1)
        return args

    def tiles_per_group(self, meta) -> int:
        tc, th, tw = tile_shape({**self.shape_args(), **meta})
        return triton.cdiv(self.Cg, tc) * triton.cdiv(self.H, th) * triton.cdiv(self.W, tw)

    def slots(self, meta) -> int:
        """Spatial tiles per channel plane."""
        _, th, tw = tile_shape({**self.shape_args(), **meta})
        return triton.cdiv(self.H, th) * triton.cdiv(self.W, tw)

    def tile_programs(self, meta) -> int:
        """Programs of a tile kernel launched with configuration ``meta``."""
        return self.N * self.G * self.tiles_per_group(meta)


# ---------------------------------------------------------------------------------------
# Autotuning of the apply and dx kernels, keyed on shape, layout (and, by Triton, the
# tensors' dtypes); configurations whose tiles do not fit the shape are pruned first
# (``fitting_tiles``).  The interpreter gets one configuration; pinned.py, one per stage
# shape when asked for.

PINNED_ENV_VAR = "FUSED_POOLFORMER_TRITON_PINNED"  # pinned.py: "1" launches the pinned configurations
AUTOTUNE_KEY = ["N", "G", "CG_V", "H", "W", "CHANNELS_LAST", "RADIUS_H", "RADIUS_W", "WRITE_DX"]

NCHW_CONFIGS = [
    triton.Config({"TILE_P": strips}, num_warps=warps)
    for strips, warps in ((8, 4), (16, 4), (32, 4), (16, 8), (32, 8), (64, 8))
]
CHANNELS_LAST_CONFIGS = [
    triton.Config({"TILE_P": strips, "TILE_C": chans, "TILE_W": cols, "TILE_H": rows}, num_warps=warps)
    for strips, chans, cols, rows, warps in (
        (8, 64, 2, 16, 4), (8, 64, 4, 16, 4), (4, 128, 2, 16, 4), (4, 128, 4, 16, 4), (16, 64, 2, 16, 4),
        (8, 128, 2, 16, 4), (2, 256, 2, 16, 4), (4, 256, 2, 16, 4), (8, 64, 2, 32, 8), (16, 64, 2, 8, 8),
        (8, 128, 2, 8, 8), (2, 64, 2, 16, 4), (1, 64, 2, 16, 4),
    )
]
# The interpreter pays per operation, not per element: large tiles, few programs.  (Tests
# that need several tiles per plane swap in small ones.)
INTERPRETER_CONFIGS = {
    False: [triton.Config({"TILE_P": 16})],
    True: [triton.Config({"TILE_P": 16, "TILE_C": 64, "TILE_W": 1, "TILE_H": 64})],
}


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}  # (also traced by torch.compile: plain Python on the arguments)
    return fitting_tiles(configs, args, 2 if args["rstd_ptr"].dtype == torch.float64 else 1)


def autotuned(kernel, channels_last: bool):
    """kernel under triton.autotune with the configurations of a layout.  With
    FUSED_POOLFORMER_TRITON_PINNED=1 (pinned.py), a PoolFormer-S12 stage shape launches its
    pinned configuration instead, without autotuning."""
    configs = CHANNELS_LAST_CONFIGS if channels_last else NCHW_CONFIGS
    if INTERPRET:
        configs = INTERPRETER_CONFIGS[channels_last]
    tuner = triton.autotune(configs=configs, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune})(kernel)
    if os.environ.get(PINNED_ENV_VAR, "") == "1" and not INTERPRET:
        # Imported here, not at the top: `python -m fused_poolformer.triton.pinned` imports
        # this package before it runs that module.
        from . import pinned

        pinned.honour_pins(tuner)
    return tuner

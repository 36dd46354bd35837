"""Pieces shared by the forward and backward Triton kernels (docs/math.md).

Device helpers (``@triton.jit``):
  * ``pairwise_sum`` / ``pairwise_dot``: fixed-order tree reductions built from elementwise
    adds only, for every sum whose result several programs must agree on bit for bit;
  * window counts and their reciprocals (count_include_pad=False), one per row or column;
  * ``vertical_window``: the vertical half of the separable box sum, one load per row of
    the window (aligned vector loads), centred on the group mean (forward) or scaled by
    1 / count per row and column (the adjoint pool of the backward);
  * ``horizontal_window``: the horizontal half, inside each thread's registers (NCHW);
  * tile coordinates of the NCHW and channels_last tiles.

Host side: ``Geometry`` (vector width, radii, tile sizes, grids of one call) and the
autotuning configurations.

Tiles.  No tile crosses a group: its mean and rstd are two scalars, merged once per
program.  NCHW: rows of BLOCK_C channel planes x BLOCK_H rows (a whole small plane per
channel, or a band of a large one) by BLOCK_W columns held as [rows, BLOCK_W / VEC, VEC]:
each thread owns VEC consecutive columns (one 16-byte load), the vertical sums are 2r+1
such loads, and the horizontal sums combine a thread's own columns with r halo columns on
either side.  channels_last: BLOCK_H rows by BLOCK_C channels (one vector of channels per
thread) at each of BLOCK_W columns; the 2r+1 columns around an output are separate tensors
of the same tile, so the horizontal sums add whole tensors.

Determinism.  Reductions whose inputs are fixed by the shape (statistics and backward
partial sums) use ``tl.sum`` in kernels that are not autotuned.  The autotuned kernels
(apply, dx) merge those partials with ``pairwise_sum`` / ``pairwise_dot``, whose order and
rounding do not depend on the layout the compiler picks for a tile, and compute every
output element by the same expression whatever the tile: no autotuning choice can change
a bit of the result.
"""

import os

import triton
import triton.language as tl
from triton.runtime.jit import constexpr_function

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
# Pool windows (stride 1, padding r, count_include_pad=False).


@triton.jit
def window_count(i, RADIUS: tl.constexpr, L):
    """Valid taps of the window centred on i along an axis of length L (at least 1, so that
    lanes outside the plane stay finite)."""
    return tl.maximum(tl.minimum(i + RADIUS, L - 1) - tl.maximum(i - RADIUS, 0) + 1, 1)


@triton.jit
def inv_window_count(i, RADIUS: tl.constexpr, L, ACC: tl.constexpr):
    count = window_count(i, RADIUS, L).to(ACC)
    return divide(tl.full(count.shape, 1.0, ACC), count)


@triton.jit
def vector_or_ones(ptr, index, mask, PRESENT: tl.constexpr, ACC: tl.constexpr):
    """An optional parameter vector (weight, layer_scale, ...) at index; ones when absent."""
    if PRESENT:
        return tl.load(ptr + index, mask=mask, other=1.0).to(ACC)
    else:
        return tl.full(index.shape, 1.0, ACC)


@triton.jit
def row_taps(row_off, h, row_ok, ROW_STEP, H, RADIUS_H: tl.constexpr, ADJOINT: tl.constexpr,
             ACC: tl.constexpr):
    """The rows of the vertical window around row h, centre first, then h -+ 1, h -+ 2, ...:
    a tuple of (offset, validity, 1 / cnt_h of that row (adjoint only)) per row, computed
    once per tile and shared by every column."""
    taps = ()
    for i in tl.static_range(2 * RADIUS_H + 1):
        dh = (i + 1) // 2 * (1 if i % 2 == 0 else -1)
        if dh == 0:
            ok = row_ok
        else:
            ok = row_ok & (h + dh >= 0) & (h + dh < H)
        inv = 0.0
        if ADJOINT:
            inv = inv_window_count(h + dh, RADIUS_H, H, ACC)
        taps = taps + ((row_off + dh * ROW_STEP, ok, inv),)
    return taps


@triton.jit
def vertical_window(src, taps, col_off, col_ok, mean, col, RADIUS_W: tl.constexpr, L,
                    ADJOINT: tl.constexpr, ACC: tl.constexpr):
    """The vertical half of the box sum at the given columns of a tile.

    ``src + tap offset + col_off`` addresses a row of the window (``row_taps``); ``col_ok``
    says which columns lie in the plane.  One load per row of the window, each as wide as
    the tile's columns allow.

    Returns (the values of the centre row as loaded, in ACC; the window sums):
      centred (forward):  sum over the valid rows of (v - mean);
      adjoint (backward): sum over the valid rows of v / cnt_h(row), times 1 / cnt_w(col)
                          (col: the columns' index along an axis of length L).
    """
    centre = 0.0
    acc = 0.0
    column = src + col_off
    for i in tl.static_range(len(taps)):
        tap_off, tap_ok, tap_inv = taps[i]
        ok = tap_ok & col_ok
        v = tl.load(column + tap_off, mask=ok, other=0.0).to(ACC)
        if ADJOINT:
            term = v * tap_inv
        else:
            term = tl.where(ok, v - mean, 0.0)
        if i == 0:
            centre = v
            acc = term
        else:
            acc += term
    if ADJOINT:
        acc = acc * inv_window_count(col, RADIUS_W, L, ACC)
    return centre, acc


@triton.jit
def _slot(v, k: tl.constexpr):
    """Entry k of the last (in-thread) axis of v: a masked sum that adds exact zeros."""
    lane = tl.arange(0, v.shape[2])[None, None, :]
    return tl.sum(tl.where(lane == k, v, 0.0), axis=2)


@triton.jit
def horizontal_window(left, centre, right, RADIUS_W: tl.constexpr):
    """The horizontal half of the box sum for NCHW tiles held as [rows, groups, VEC]: each
    thread's VEC consecutive columns (``centre``) plus the HALO columns before (``left``)
    and after (``right``) them, all already summed vertically.  The window of column j is
    a fixed sequence of register adds over those VEC + 2 HALO columns; nothing leaves the
    thread."""
    VEC: tl.constexpr = centre.shape[2]
    HALO: tl.constexpr = left.shape[2]
    ext = ()
    for k in tl.static_range(HALO):
        ext = ext + (_slot(left, k),)
    for k in tl.static_range(VEC):
        ext = ext + (_slot(centre, k),)
    for k in tl.static_range(HALO):
        ext = ext + (_slot(right, k),)
    lane = tl.arange(0, VEC)[None, None, :]
    box = tl.zeros(centre.shape, centre.dtype)
    for j in tl.static_range(VEC):
        acc = ext[HALO + j]
        for d in tl.static_range(1, RADIUS_W + 1):
            acc += ext[HALO + j - d] + ext[HALO + j + d]
        box = tl.where(lane == j, acc[:, :, None], box)
    return box


# ---------------------------------------------------------------------------------------
# Tile coordinates.  Programs run along W fastest, then H, then the channel blocks of a
# group, then groups and samples, so neighbouring programs share their halo rows in cache.


@triton.jit
def tile_coords(pid, Cg, H, W, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """(n * G + g, channel block, row block, column block) of program pid."""
    tiles_w = tl.cdiv(W, BLOCK_W)
    tiles_h = tl.cdiv(H, BLOCK_H)
    tiles_c = tl.cdiv(Cg, BLOCK_C)
    wb = pid % tiles_w
    rest = pid // tiles_w
    hb = rest % tiles_h
    rest = rest // tiles_h
    return rest // tiles_c, rest % tiles_c, hb, wb


@triton.jit
def nchw_rows(ng, cb, hb, G, Cg, H, W, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, WIDE: tl.constexpr):
    """The rows of an NCHW tile: BLOCK_C channel planes of BLOCK_H rows each, as
    [rows, 1, 1] tensors: channel index, row index h, validity and in-sample offset."""
    r = tl.arange(0, BLOCK_C * BLOCK_H)
    c_in_group = cb * BLOCK_C + r // BLOCK_H
    h = hb * BLOCK_H + r % BLOCK_H
    if WIDE:
        c_in_group = c_in_group.to(tl.int64)
        h = h.to(tl.int64)
    c = (ng % G) * Cg + c_in_group
    row_ok = (c_in_group < Cg) & (h < H)
    row_off = (c * H + h) * W
    return c[:, None, None], h[:, None, None], row_ok[:, None, None], row_off[:, None, None]


@triton.jit
def nchw_columns(wb, BLOCK_W: tl.constexpr, VEC: tl.constexpr, HALO: tl.constexpr, WIDE: tl.constexpr):
    """The columns of an NCHW tile as [1, BLOCK_W / VEC, VEC] (each thread's vector) and the
    HALO columns before and after each vector, [1, BLOCK_W / VEC, HALO] each."""
    start = wb * BLOCK_W + tl.arange(0, BLOCK_W // VEC)[None, :, None] * VEC
    if WIDE:
        start = start.to(tl.int64)
    cols = start + tl.arange(0, VEC)[None, None, :]
    left = start - HALO + tl.arange(0, HALO)[None, None, :]
    right = start + VEC + tl.arange(0, HALO)[None, None, :]
    return cols, left, right


@triton.jit
def nchw_pool(src, taps, cols, left, right, W, mean, RADIUS_W: tl.constexpr, ADJOINT: tl.constexpr,
              ACC: tl.constexpr):
    """The centre row of src over an NCHW tile and its box sum (vertical then horizontal;
    see ``vertical_window`` for the centred and adjoint forms)."""
    centre, v_centre = vertical_window(src, taps, cols, cols < W, mean, cols, RADIUS_W, W, ADJOINT, ACC)
    _, v_left = vertical_window(src, taps, left, left >= 0, mean, left, RADIUS_W, W, ADJOINT, ACC)
    _, v_right = vertical_window(src, taps, right, right < W, mean, right, RADIUS_W, W, ADJOINT, ACC)
    return centre, horizontal_window(v_left, v_centre, v_right, RADIUS_W)


@triton.jit
def cl_pool(src, taps, c, c_ok, w0, C, W, mean, RADIUS_W: tl.constexpr, BLOCK_W: tl.constexpr,
            ADJOINT: tl.constexpr, ACC: tl.constexpr):
    """Columns w0 .. w0 + BLOCK_W - 1 of a channels_last tile ([BLOCK_H, BLOCK_C] each):
    the tuple of their values as loaded and the tuple of their box sums.  Each of the
    BLOCK_W + 2r columns the windows touch is summed vertically once."""
    vsum = ()
    centres = ()
    for e in tl.static_range(BLOCK_W + 2 * RADIUS_W):
        w = w0 + (e - RADIUS_W)
        centre, v = vertical_window(src, taps, w * C + c, c_ok & (w >= 0) & (w < W), mean, w, RADIUS_W, W,
                                    ADJOINT, ACC)
        vsum = vsum + (v,)
        if e >= RADIUS_W:
            if e < RADIUS_W + BLOCK_W:
                centres = centres + (centre,)
    boxes = ()
    for i in tl.static_range(BLOCK_W):
        acc = vsum[i + RADIUS_W]
        for d in tl.static_range(1, RADIUS_W + 1):
            acc += vsum[i + RADIUS_W - d] + vsum[i + RADIUS_W + d]
        boxes = boxes + (acc,)
    return centres, boxes


@triton.jit
def cl_rows_channels(ng, cb, hb, G, Cg, H, W, C, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, WIDE: tl.constexpr):
    """Rows ([BLOCK_H, 1]: h, validity, in-sample offset of (h, w=0)) and channels
    ([1, BLOCK_C]: index, validity) of a channels_last tile."""
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    c_in_group = cb * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    if WIDE:
        h = h.to(tl.int64)
        c_in_group = c_in_group.to(tl.int64)
    return h, h < H, h * W * C, (ng % G) * Cg + c_in_group, c_in_group < Cg


# ---------------------------------------------------------------------------------------
# Tile sizes.  An autotuning configuration names TILE_ROWS (NCHW: channel planes x rows;
# channels_last: rows) and, for channels_last, TILE_COLS and TILE_CHANNELS; the host passes
# the rest (NCHW: TILE_COLS = its column block).  These functions, run by the compiler on
# constexprs and by the host for the grid, clip a configuration to the plane, so that every
# configuration is valid for every shape.


@constexpr_function
def tile_h(TILE_ROWS, H_P2):
    """Rows of a tile (per channel plane for NCHW)."""
    return min(TILE_ROWS, H_P2)


@constexpr_function
def tile_c(CHANNELS_LAST, TILE_ROWS, TILE_CHANNELS, H_P2, CG_P2):
    """Channels of a tile: NCHW stacks whole small planes; channels_last takes up to
    TILE_CHANNELS of one group."""
    if CHANNELS_LAST:
        return min(TILE_CHANNELS, CG_P2)
    return min(max(TILE_ROWS // min(TILE_ROWS, H_P2), 1), CG_P2)


@constexpr_function
def tile_w(CHANNELS_LAST, TILE_COLS, W_P2):
    """Columns of a tile (NCHW: the host's column block)."""
    return min(TILE_COLS, W_P2) if CHANNELS_LAST else TILE_COLS


def tile_shape(args, tile_rows: int, tile_cols: int, tile_channels: int):
    """(channels, rows, columns) of a tile, from the kernel's shape arguments ``args``."""
    cl = args["CHANNELS_LAST"]
    return (tile_c(cl, tile_rows, tile_channels, args["H_P2"], args["CG_P2"]), tile_h(tile_rows, args["H_P2"]),
            tile_w(cl, tile_cols, args["W_P2"]))


# Loaded values a thread may hold at once: ptxas hoists the loads of the whole window to
# overlap them, and each needs a register (measured: about 1.2 registers per value, see
# ``python -m fused_poolformer.triton.aot``).  Past this many a kernel nears 255 registers.
LOADS_IN_FLIGHT = 160


def tile_cost(args, tile_rows: int, tile_cols: int, tile_channels: int, num_warps: int):
    """(elements per thread along the contiguous axis, loads in flight per thread) of a
    tile: the first must reach the vector width for 16-byte accesses."""
    tc, th, tw = tile_shape(args, tile_rows, tile_cols, tile_channels)
    taps = 2 * args["RADIUS_H"] + 1
    threads = 32 * num_warps
    if args["CHANNELS_LAST"]:
        per_thread = tc * th / threads  # of one column
        return per_thread, per_thread * (tw + 2 * args["RADIUS_W"]) * taps
    per_thread = tc * th * tw / threads
    return per_thread, per_thread * (1 + 2 * args["HALO"] / args["VEC_W"]) * taps


def fitting_tiles(configs, args):
    """The configurations whose tiles give every thread whole vectors without exceeding
    LOADS_IN_FLIGHT; failing that, the cheapest one."""
    vec = args["VEC_C"] if args["CHANNELS_LAST"] else args["VEC_W"]
    scored = []
    for cfg in configs:
        kw = {**args, **cfg.kwargs}
        per_thread, in_flight = tile_cost(args, kw["TILE_ROWS"], kw["TILE_COLS"], kw.get("TILE_CHANNELS", 1),
                                          cfg.num_warps)
        scored.append((cfg, per_thread >= vec, in_flight <= LOADS_IN_FLIGHT, in_flight))
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


class Geometry:
    """Shape, layout and the block sizes fixed by the shape (not autotuned) of one call.

    ``vec`` is the vector width in elements along the contiguous axis (W for NCHW, C for
    channels_last): the largest power of two up to 16 bytes that divides it (and the
    group's channel count), so that every row of a tile starts on a vector boundary.  The
    kernels receive that axis' length divided by ``vec`` and multiply it back, which tells
    the compiler the alignment (it only infers divisibility by 16 from arguments).
    """

    def __init__(self, shape, element_size: int, channels_last: bool, num_groups: int, pool_size: int):
        self.N, self.C, self.H, self.W = (int(s) for s in shape)
        self.G = num_groups
        self.Cg = self.C // num_groups
        self.channels_last = channels_last
        radius = pool_size // 2
        # A radius past the plane reaches no further element: the clipped one unrolls less.
        self.radius_h = min(radius, max(self.H - 1, 0))
        self.radius_w = min(radius, max(self.W - 1, 0))
        self.halo = next_pow2(self.radius_w)
        max_vec = VECTOR_BYTES // element_size
        if channels_last:
            self.vec = largest_pow2_dividing(self.Cg, max_vec)
            self.vec_c, self.vec_w = self.vec, 1
        else:
            self.vec = largest_pow2_dividing(self.W, max_vec)
            self.vec_c, self.vec_w = 1, self.vec
        self.wide = self.C * self.H * self.W >= INT32_LIMIT
        self.h_p2, self.w_p2, self.cg_p2 = next_pow2(self.H), next_pow2(self.W), next_pow2(self.Cg)
        self.block_w = max(self.vec, min(self.w_p2, MAX_NCHW_BLOCK_W))  # NCHW columns

    def shape_args(self):
        """The shape arguments of the tile kernels, by name (NCHW: with its column block)."""
        args = dict(
            G=self.G, CG_V=self.Cg // self.vec_c, H=self.H, W_V=self.W // self.vec_w,
            VEC_C=self.vec_c, VEC_W=self.vec_w, CHANNELS_LAST=self.channels_last,
            RADIUS_H=self.radius_h, RADIUS_W=self.radius_w, HALO=self.halo, WIDE=self.wide,
            H_P2=self.h_p2, W_P2=self.w_p2, CG_P2=self.cg_p2,
        )
        if not self.channels_last:
            args.update(TILE_COLS=self.block_w, TILE_CHANNELS=1)
        return args

    def tiles_per_sample(self, meta):
        """(tiles per (n, g), spatial tiles per channel plane) for a configuration."""
        tc, th, tw = tile_shape({**self.shape_args(), **meta}, meta["TILE_ROWS"], meta["TILE_COLS"],
                                meta["TILE_CHANNELS"])
        spatial = triton.cdiv(self.H, th) * triton.cdiv(self.W, tw)
        return triton.cdiv(self.Cg, tc) * spatial, spatial

    def tile_programs(self, meta) -> int:
        """Programs of a tile kernel launched with configuration ``meta``."""
        return self.N * self.G * self.tiles_per_sample({**self.shape_args(), **meta})[0]


# ---------------------------------------------------------------------------------------
# Autotuning of the apply and dx kernels, keyed on shape, layout (and, by Triton, the
# tensors' dtypes); configurations whose tiles do not fit the shape are pruned first
# (``fitting_tiles``).  The interpreter gets one configuration.

AUTOTUNE_KEY = ["N", "G", "CG_V", "H", "W_V", "CHANNELS_LAST", "RADIUS_H", "RADIUS_W", "WRITE_DX"]

NCHW_CONFIGS = [
    triton.Config({"TILE_ROWS": rows}, num_warps=warps)
    for rows, warps in ((8, 4), (16, 4), (32, 4), (16, 8), (32, 8), (64, 8), (128, 8))
]
CHANNELS_LAST_CONFIGS = [
    triton.Config({"TILE_ROWS": rows, "TILE_COLS": cols, "TILE_CHANNELS": chans}, num_warps=warps)
    for rows, cols, chans, warps in (
        (8, 4, 64, 4), (8, 8, 64, 4), (16, 4, 64, 4), (16, 2, 64, 4), (16, 4, 64, 8), (32, 4, 64, 8),
        (4, 4, 128, 4), (4, 8, 128, 4), (8, 4, 128, 4), (8, 2, 128, 4), (8, 4, 128, 8), (2, 4, 256, 4),
        (4, 4, 256, 4), (4, 2, 64, 4), (2, 2, 64, 4),
    )
]
# The interpreter pays per operation, not per element: large tiles, few programs.  (Tests
# that need several tiles per plane swap in small ones.)
INTERPRETER_CONFIGS = {
    False: [triton.Config({"TILE_ROWS": 64})],
    True: [triton.Config({"TILE_ROWS": 16, "TILE_COLS": 16, "TILE_CHANNELS": 64})],
}


def _prune(configs, named_args, **kwargs):
    return fitting_tiles(configs, {**named_args, **kwargs})


def autotuned(kernel, channels_last: bool):
    """kernel under triton.autotune with the configurations of a layout."""
    configs = CHANNELS_LAST_CONFIGS if channels_last else NCHW_CONFIGS
    if INTERPRET:
        configs = INTERPRETER_CONFIGS[channels_last]
    return triton.autotune(configs=configs, key=AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": _prune})(kernel)

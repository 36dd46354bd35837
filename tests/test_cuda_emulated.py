"""The CUDA kernels, run on the CPU, against the unfused reference.

tests/cuda_emulation.py compiles csrc/cuda (the very kernel source nvcc compiles, through the
execution model of csrc/cuda/simt.h) for the CPU emulator: every block's 256 threads run as
fibers with real barriers and warp shuffles; shared memory and the workspace start as NaN;
every global access is bounds- and alignment-checked.  The launch sequences and tile plans
are the CUDA launcher's own (csrc/cuda/launch.h, plan.h), planned for an H200 unless a test
asks for a smaller device to force more, smaller tiles.

Needs a C++20 compiler, no GPU.  The first run builds the emulator (about a minute on two
cores); later runs reuse it until csrc/cuda changes.
"""

import itertools
import random

import pytest
import torch

import cuda_emulation as emu
from helpers import OPTION_NAMES, TOL, assert_close_to, call, make_inputs
from fused_poolformer import reference

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="no C++ compiler for the CUDA emulator")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# A small machine: two tiles' worth of shared memory and many multiprocessors, so the planner
# cuts every shape into many small tiles (halo rows and columns, split rows and channels).
SMALL_DEVICE = dict(multiprocessors=100000, shared_bytes_optin=10 * 1024)


@pytest.fixture(scope="module", autouse=True)
def emulator():
    emu.library()


def layout(t, channels_last):
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def shifted(t, elements):
    """A copy of dense t whose data starts `elements` past a 16-byte boundary."""
    if elements == 0:
        return t
    strides = t.stride()
    buffer = torch.empty(t.numel() + elements, dtype=t.dtype)
    out = buffer[elements:].as_strided(t.shape, strides)
    out.copy_(t)
    return out


def reference_results(x, kw, dy, num_groups, pool_size, eps=1e-5):
    """float64 y, mean, rstd and the gradients of x and of every present parameter."""
    leaves = {"x": x.detach().double().clone().requires_grad_()}
    params = {k: (None if v is None else v.detach().double()) for k, v in kw.items()}
    for name in emu.GRAD_NAMES:
        if params[name] is not None:
            leaves[name] = params[name] = params[name].clone().requires_grad_()
    opts = dict(num_groups=num_groups, pool_size=pool_size, eps=eps)
    y = call(reference.pool_mixer, leaves["x"], params, **opts)
    grads = dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), dy.double())))
    groups = x.detach().double().reshape(x.shape[0], num_groups, -1)
    mean = groups.mean(-1)
    rstd = (groups.var(-1, unbiased=False) + eps).rsqrt()
    return y.detach(), mean, rstd, grads


def check_case(shape, dtype, channels_last, *, num_groups=1, pool_size=3, options=OPTION_NAMES, seed=0,
               device=emu.H200, offset=0, param_dtype=None, param_stride=1, want=emu.GRAD_NAMES, schedule=None):
    """Forward and backward through the emulated CUDA kernels against the float64 reference.
    Returns the counters of both calls.  The thread schedule varies from case to case (a race
    then shows as a wrong result somewhere) unless given."""
    if schedule is None:
        schedule = (seed + sum(shape) + pool_size) % 3
    x, kw = make_inputs(shape, dtype, channels_last, options=options, seed=seed, param_dtype=param_dtype)
    if param_stride != 1:  # strided parameter vectors (every other element of a longer one)
        kw = {k: None if v is None else torch.stack([v, -v], 1).reshape(-1)[::param_stride] for k, v in kw.items()}
    x = shifted(x, offset)
    opts = dict(num_groups=num_groups, pool_size=pool_size)
    y, mean, rstd, forward_counts = emu.forward(x, kw, device=device, schedule=schedule, seed=seed, **opts)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    dy = shifted(layout(dy.to(dtype), channels_last), offset)
    ref_y, ref_mean, ref_rstd, ref_grads = reference_results(x, kw, dy, **opts)

    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close_to(y, ref_y, dtype)
    stats_tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert (mean.double() - ref_mean).abs().max().item() <= stats_tol * (1 + ref_mean.abs().max().item())
    assert ((rstd.double() - ref_rstd).abs() / ref_rstd).max().item() <= stats_tol * 10

    want = tuple(want)
    dx, grads, backward_counts = emu.backward(dy, x, mean, rstd, kw, device=device, want=want, schedule=schedule,
                                              seed=seed, **opts)
    try:
        assert_close_to(dx, ref_grads["x"], dtype)
    except AssertionError as err:
        raise AssertionError(f"grad_x: {err}") from None
    for name in want:
        if name == "bias":
            assert torch.equal(grads[name], torch.zeros_like(grads[name])), "bias gradient must be exactly zero"
            continue
        expected_dtype = kw[name].dtype if kw[name] is not None else dtype
        assert grads[name].dtype == expected_dtype
        if kw[name] is None:  # the gradient of an absent parameter (= 1): its sum formula still holds
            continue
        try:
            assert_close_to(grads[name], ref_grads[name], dtype)
        except AssertionError as err:
            raise AssertionError(f"gradient of {name}: {err}") from None

    # The operator's budget: 2 launches forward, 3 backward, one workspace each.
    assert forward_counts["launches"] == 2 and forward_counts["allocations"] == 1
    assert backward_counts["launches"] == 3 and backward_counts["allocations"] == 1
    return forward_counts, backward_counts


# Odd shapes: 1s, primes, H != W, planes smaller than the window, 1-wide planes.
SHAPES = [((2, 8, 8, 8), 2), ((3, 5, 7, 13), 5), ((2, 12, 13, 9), 3), ((1, 3, 1, 1), 1), ((2, 4, 1, 9), 2),
          ((2, 6, 9, 1), 3), ((1, 2, 2, 3), 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape,num_groups", SHAPES, ids=[str(s) for s, _ in SHAPES])
def test_matches_reference(shape, num_groups, dtype, channels_last):
    check_case(shape, dtype, channels_last, num_groups=num_groups, seed=sum(shape))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("pool_size", [1, 3, 5, 7, 9])
def test_pool_sizes(pool_size, channels_last, dtype):
    # H = 5 < 7, 9: the largest windows cover the whole height.
    check_case((2, 6, 5, 11), dtype, channels_last, num_groups=2, pool_size=pool_size, seed=pool_size)


def test_window_wider_than_the_plane():
    check_case((1, 4, 9, 12), torch.float64, True, pool_size=31)
    check_case((2, 4, 1, 1), torch.float64, False, pool_size=9)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("num_groups", [1, 2, 3, 6])
def test_groups(num_groups, channels_last):
    # channels_last with G > 1: the statistics read strided runs of C/G channels.
    check_case((2, 6, 7, 6), torch.float32, channels_last, num_groups=num_groups, seed=num_groups)


@pytest.mark.parametrize("present", [c for r in range(6) for c in itertools.combinations(OPTION_NAMES, r)],
                         ids=lambda c: "+".join(c) or "none")
def test_every_option_combination(present):
    check_case((2, 6, 5, 4), torch.float64, len(present) % 2 == 1, num_groups=3, options=present, seed=len(present))


@pytest.mark.parametrize("want", [(), ("weight",), ("res_scale", "bias"), ("layer_scale",)], ids=str)
def test_subsets_of_gradients(want):
    check_case((2, 6, 5, 7), torch.float32, True, num_groups=2, want=want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_float32_and_strided_parameters_with_half_input(dtype, channels_last):
    check_case((2, 8, 7, 7), dtype, channels_last, num_groups=2, param_dtype=torch.float32, param_stride=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("offset", [1, 3])
def test_unaligned_data(offset, channels_last, dtype):
    # x, dy and (through the copy) every run start sit `offset` elements past a 16-byte
    # boundary: every staged run begins and ends with a partial slot.
    counts, _ = check_case((2, 8, 6, 10), dtype, channels_last, num_groups=2, offset=offset, seed=offset)
    assert counts["wide_loads"] > 0 and counts["narrow_loads"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_vector_accesses(dtype, channels_last):
    # Aligned data whose planes and channel runs are multiples of 16 bytes: every element of
    # x and y moves in 16-byte accesses (the scalar loads left are the statistics, the
    # parameters and the per-block pivot).
    shape = (2, 64, 8, 8)
    numel, vec = 2 * 64 * 8 * 8, 16 // dtype.itemsize
    few_sms = dict(emu.H200, multiprocessors=2)  # whole planes: no halo loads
    forward_counts, backward_counts = check_case(shape, dtype, channels_last, device=few_sms)
    assert forward_counts["wide_stores"] * vec == numel          # y
    assert forward_counts["wide_loads"] * vec == 2 * numel       # x twice: statistics, apply
    assert backward_counts["wide_stores"] * vec == numel         # dx
    assert backward_counts["wide_loads"] * vec >= 4 * numel      # x, dy in both passes
    assert forward_counts["narrow_stores"] <= 4 * 64             # partials, mean and rstd only


@pytest.mark.parametrize("case", [
    ((1, 3, 20, 150), torch.float64, False, 3),   # rows split: halo columns
    ((1, 3, 20, 150), torch.float64, False, 7),
    ((2, 5, 40, 33), torch.float32, False, 5),    # bands of rows: halo rows
    ((1, 70, 9, 10), torch.float32, True, 3),     # channel tiles and patches with halos
    ((1, 70, 9, 10), torch.bfloat16, True, 5),
    ((2, 37, 11, 6), torch.float64, True, 3),
], ids=str)
def test_small_tiles(case):
    shape, dtype, channels_last, pool_size = case
    plan = emu.plan(shape, dtype, channels_last, "apply", pool_size=pool_size, device=SMALL_DEVICE)
    n, c, h, w = shape
    assert plan["TH"] < h or plan["TW"] < w, plan
    if channels_last:
        assert plan["TC"] < c, plan
    check_case(shape, dtype, channels_last, num_groups=1 if c % 2 else 2, pool_size=pool_size, device=SMALL_DEVICE)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_stage_shape(channels_last):
    # The first PoolFormer stage at batch 2, planned for an H200.
    check_case((2, 64, 56, 56), torch.float32, channels_last, seed=3)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape,device", [((2, 12, 13, 9), SMALL_DEVICE), ((2, 70, 5, 6), dict(emu.H200, multiprocessors=2))],
                         ids=["small-tiles", "70-channel-tiles"])
def test_schedules_agree_bitwise(shape, device, channels_last):
    # Threads between two barriers run in ascending, descending or shuffled order (and the
    # blocks forwards or backwards): a missing barrier or an order-dependent reduction
    # would change some bit.  Tiles of 70 channels: several rounds of the channel reductions.
    x, kw = make_inputs(shape, torch.float32, channels_last, seed=5)
    dy = layout(torch.randn(x.shape, generator=torch.Generator().manual_seed(6)), channels_last)
    runs = []
    for schedule in (0, 1, 2):
        y, mean, rstd, _ = emu.forward(x, kw, num_groups=2, schedule=schedule, seed=schedule + 7, device=device)
        dx, grads, _ = emu.backward(dy, x, mean, rstd, kw, num_groups=2, schedule=schedule, device=device)
        runs.append([y, mean, rstd, dx] + [grads[k] for k in sorted(grads)])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("seed", range(10))
def test_random_configurations(seed):
    rng = random.Random(seed)
    c = rng.choice([1, 2, 3, 6, 12, 40])
    shape = (rng.randint(1, 3), c, rng.randint(1, 17), rng.randint(1, 17))
    check_case(shape, rng.choice(DTYPES), rng.random() < 0.5,
               num_groups=rng.choice([g for g in (1, 2, 3, 6) if c % g == 0]),
               pool_size=rng.choice([1, 3, 3, 5, 7, 9]),
               options=tuple(o for o in OPTION_NAMES if rng.random() < 0.7), seed=seed,
               device=rng.choice([emu.H200, SMALL_DEVICE]), offset=rng.choice([0, 0, 1, 2]))


STAGES = [(64, 64, 56, 56), (64, 128, 28, 28), (64, 320, 14, 14), (64, 512, 7, 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", STAGES, ids=str)
def test_tile_shapes_per_stage(shape, dtype):
    """NCHW: whole rows (bands or whole planes) at 56 and 28, several whole planes at 14 and 7;
    channels_last: 128-byte channel vectors; every stage staged and stored in 16-byte slots."""
    _, c, h, w = shape
    for mode in ("apply", "sums", "dx"):
        nchw = emu.plan(shape, dtype, False, mode)
        assert nchw["TW"] == w and nchw["halo_cols"] == 0, nchw
        if h <= 14:
            assert nchw["TH"] == h and nchw["TC"] > 1, nchw
        cl = emu.plan(shape, dtype, True, mode)
        assert cl["TC"] * dtype.itemsize % 128 == 0 and (cl["TC"] < c or c * dtype.itemsize == 128), cl
        for plan in (nchw, cl):
            assert plan["stage_vectorized"] and plan["store_vectorized"], plan
            # The byte budget that keeps loads in flight: >= 6 KB staged per block.
            assert plan["staged_bytes"] >= 6 * 1024, plan
    assert emu.plan(shape, dtype, False, "stats")["vectorized"]


def test_sample_of_2_pow_31_elements_is_refused():
    with pytest.raises(emu.EmulatorError, match=r"fewer than 2\*\*31 per sample"):
        emu.plan((1, 2**15, 2**8, 2**8), torch.float32, False, "apply")
    assert emu.plan((3, 2**14, 2**8, 2**8), torch.float32, False, "apply")["blocks"] > 0


def test_emulator_catches_a_kernel_failure():
    # The emulator's own checks are live: a launch that asks for more shared memory than
    # the device has is refused, not run.
    x, kw = make_inputs((1, 4, 5, 5), torch.float32)
    with pytest.raises(emu.EmulatorError, match="shared memory"):
        emu.forward(x, kw, pool_size=31, device=dict(multiprocessors=1, shared_bytes_optin=256))

"""The Triton backend against the unfused reference graph.

Without CUDA the kernels run on CPU tensors through Triton's interpreter: TRITON_INTERPRET=1
is set here, before the kernels are imported (triton.jit reads it when a kernel is
defined).  The interpreter handles float32 and float64 only and cannot trace a triton_op
into fake tensors, so the half-precision, opcheck and torch.compile tests need CUDA.  The
machine code (registers, spills, vector accesses) is checked without a GPU by
tests/test_triton_aot.py.

The interpreter pays per operation, so it runs large tiles; the tests that need several
tiles per plane (halo rows and columns from neighbouring tiles, channel blocks, several
partial sums per group) swap in small ones.
"""

import os
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import fused_poolformer as fp  # noqa: E402
from fused_poolformer import ops  # noqa: E402
from helpers import assert_close_to, call, make_inputs, reference64, requires_cuda  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_NAMES = ("weight", "bias", "layer_scale", "res_scale")


def _unavailable_reason():
    try:
        available = ops.triton_available()
    except Exception as exc:  # e.g. a Triton build whose interpreter cannot start
        return f"the Triton kernels cannot be loaded: {exc!r}"
    if not available:
        return "triton cannot be imported"
    if DEVICE == "cpu" and not ops.triton_interpreted():
        return ("fused_poolformer.triton was imported before TRITON_INTERPRET=1 was set; "
                "run this file in its own pytest process")
    return None


pytestmark = [pytest.mark.skipif(_unavailable_reason() is not None, reason=str(_unavailable_reason()))]
if DEVICE == "cuda":  # every test here then runs the compiled kernels: `pytest -m gpu -k triton` selects them
    pytestmark.append(pytest.mark.gpu)
requires_cuda_compile = pytest.mark.skipif(
    DEVICE != "cuda",
    reason="torch.compile and opcheck's fake-tensor checks cannot trace a triton_op under the "
    "Triton interpreter (fake tensors have no data pointer); they run where CUDA is available",
)


def triton_mixer(*args, **kwargs):
    return fp.pool_mixer(*args, backend="triton", **kwargs)


def forward_op():
    return ops.triton_operators()[0]


def backward_op():
    return ops.triton_operators()[1]


def assert_named_close(name, actual, expected, dtype):
    try:
        assert_close_to(actual, expected, dtype)
    except AssertionError as exc:
        raise AssertionError(f"{name}: {exc}") from None


def gradients(fn, x, kw, dy, **opts):
    """y and the gradients of x and every present parameter in GRAD_NAMES."""
    x = x.detach().clone().requires_grad_()
    kw = {k: (None if v is None else v.detach().clone().requires_grad_(k in GRAD_NAMES)) for k, v in kw.items()}
    y = call(fn, x, kw, **opts)
    names = ["x"] + [k for k in GRAD_NAMES if kw[k] is not None]
    leaves = [x] + [kw[k] for k in names[1:]]
    return y, dict(zip(names, torch.autograd.grad(y, leaves, dy.to(device=y.device, dtype=y.dtype))))


def check_against_reference(shape, dtype, channels_last, num_groups, pool_size, options, param_dtype=None,
                            seed=0):
    x, kw = make_inputs(shape, dtype, channels_last, options=options, seed=seed, device=DEVICE,
                        param_dtype=param_dtype)
    opts = dict(num_groups=num_groups, pool_size=pool_size)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    y, got = gradients(triton_mixer, x, kw, dy, **opts)
    kw64 = {k: (None if v is None else v.double().cpu()) for k, v in kw.items()}
    y64, want = gradients(fp.reference.pool_mixer, x.double().cpu(), kw64, dy, **opts)
    assert y.dtype == dtype and y.device == x.device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt), "y must keep x's memory format"
    assert_named_close("y", y, y64, dtype)
    for name, g in got.items():
        expected_dtype = dtype if name == "x" or param_dtype is None else param_dtype
        assert g.dtype == expected_dtype, f"grad of {name} has dtype {g.dtype}"
        if name == "bias":  # the bias cancels out of y: its gradient is exact zeros
            assert torch.equal(g, torch.zeros_like(g)), "grad of bias must be exact zeros"
        else:
            assert_named_close(f"grad of {name}", g, want[name], dtype)


ALL = ("weight", "bias", "layer_scale", "res_scale", "sample_scale")

# Small enough for the interpreter, each case adding coverage: several row tiles (H = 11),
# k = 5 and k = 7, a window larger than the plane, G > 1, both layouts, absent options.
CASES = [
    pytest.param((2, 8, 6, 7), torch.float32, False, 1, 3, ALL, id="nchw-f32-k3"),
    pytest.param((2, 12, 5, 9), torch.float64, True, 3, 5, ALL, id="cl-f64-G3-k5"),
    pytest.param((1, 4, 11, 3), torch.float64, False, 2, 7, ("weight", "layer_scale"), id="nchw-f64-k7-tall"),
    # No weight (and no bias: torch 2.11's CPU group_norm backward fails for a bias without weight).
    pytest.param((2, 6, 2, 3), torch.float32, True, 2, 5, ("layer_scale", "res_scale", "sample_scale"),
                 id="cl-f32-window-larger-than-plane"),
]


@pytest.mark.parametrize("shape,dtype,channels_last,num_groups,pool_size,options", CASES)
def test_forward_and_gradients_match_reference(shape, dtype, channels_last, num_groups, pool_size, options):
    check_against_reference(shape, dtype, channels_last, num_groups, pool_size, options)


# Every pool size of the paper's ablation (and 1), both layouts; the planes are just large
# enough for the whole window (k = 9 needs 9 x 9), and odd where possible.
POOL_CASES = [
    (1, (2, 4, 3, 5)), (3, (1, 4, 5, 7)), (5, (1, 4, 6, 5)), (7, (1, 2, 7, 9)), (9, (1, 2, 9, 10)),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("pool_size,shape", POOL_CASES, ids=[f"k{k}" for k, _ in POOL_CASES])
def test_every_pool_size(pool_size, shape, channels_last):
    check_against_reference(shape, torch.float64, channels_last, 2 if shape[1] % 2 == 0 else 1, pool_size, ALL,
                            seed=pool_size)


# ---------------------------------------------------------------------------------------
# Small tiles: the plane is cut into several tiles in every direction.


def tile_config(kwargs):
    import triton

    return triton.Config(kwargs)


@contextmanager
def small_tiles(monkeypatch, channels_last):
    """Tiles of a few rows, columns and channels for the apply/dx kernels (as autotuning
    configurations), the sums pass and the NCHW column blocks."""
    from fused_poolformer.triton import backward, common, forward

    if channels_last:
        config = {"TILE_P": 2, "TILE_C": 2, "TILE_W": 2, "TILE_H": 3}
        monkeypatch.setattr(backward, "_SUMS_CL_TILES", [(2, 2, 1, 4, 4)])
    else:
        config = {"TILE_P": 2}
        monkeypatch.setattr(backward, "_SUMS_NCHW_TILES", [(4, 4)])
        monkeypatch.setattr(common, "MAX_NCHW_BLOCK_W", 4)
    monkeypatch.setattr(common, "MAX_BAND_ROWS", 3)
    for kernel in (forward._APPLY[channels_last], backward._DX[channels_last]):
        monkeypatch.setattr(kernel, "configs", [tile_config(config)])
    yield


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_several_tiles_per_plane(monkeypatch, channels_last):
    """Halo rows and columns come from the neighbouring tiles, a group spans several
    channel blocks, and the statistics and sums have several partials per group."""
    with small_tiles(monkeypatch, channels_last):
        check_against_reference((1, 4, 7, 9), torch.float64, channels_last, 1, 5, ALL, seed=5)


def forward_backward_outputs(x, kw, num_groups, pool_size, mask=(True,) * 5):
    """Every output of the two operators, for a fixed grad_y."""
    args = (x, kw["weight"], kw["bias"], kw["layer_scale"], kw["res_scale"], kw["sample_scale"])
    y, mean, rstd = forward_op()(*args, num_groups, pool_size, 1e-5)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype).to(y.device)
    grads = backward_op()(dy, x, mean, rstd, *args[1:], num_groups, pool_size, 1e-5, list(mask))
    return (y, mean, rstd, *grads)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_autotuned_tiles_do_not_change_bits(monkeypatch, channels_last):
    """The apply and dx tiles are autotuned: every output must be bitwise the same whatever
    tile runs (the statistics and sums tiles, fixed by the shape, are left alone)."""
    from fused_poolformer.triton import backward, forward

    x, kw = make_inputs((1, 4, 5, 6), torch.float64, channels_last, seed=4, device=DEVICE)
    default = forward_backward_outputs(x, kw, 2, 3)
    small = {"TILE_P": 2, "TILE_C": 2, "TILE_W": 2, "TILE_H": 2} if channels_last else {"TILE_P": 2}
    for kernel in (forward._APPLY[channels_last], backward._DX[channels_last]):
        monkeypatch.setattr(kernel, "configs", [tile_config(small)])
    for name, a, b in zip(("y", "mean", "rstd", "dx", "dweight", "dbias", "dlayer_scale", "dres_scale"),
                          default, forward_backward_outputs(x, kw, 2, 3)):
        assert torch.equal(a, b), f"{name} depends on the tile"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gradcheck_float64(channels_last):
    x, kw = make_inputs((1, 4, 3, 5), torch.float64, channels_last, device=DEVICE)
    leaves = [x] + [kw[k] for k in GRAD_NAMES]
    for t in leaves:
        t.requires_grad_(True)

    def f(x, w, b, ls, rs):
        return triton_mixer(x, w, b, layer_scale=ls, res_scale=rs, sample_scale=kw["sample_scale"],
                            num_groups=2, pool_size=3)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=DEVICE == "cpu")


GRAD_OUTPUTS = ("grad_x", "grad_weight", "grad_bias", "grad_layer_scale", "grad_res_scale")


@pytest.mark.parametrize("mask", [(False, True, True, False, True), (True, False, False, False, False),
                                  (False, False, False, True, False), (False,) * 5],
                         ids=["params-no-dx", "dx-only", "one-param", "nothing"])
def test_output_mask_returns_empty_gradients(mask):
    x, kw = make_inputs((2, 4, 3, 5), torch.float64, channels_last=True, device=DEVICE)
    full = forward_backward_outputs(x, kw, 2, 3)[3:]
    part = forward_backward_outputs(x, kw, 2, 3, mask)[3:]
    assert full[0].is_contiguous(memory_format=torch.channels_last), "dx must keep x's memory format"
    assert torch.equal(full[2], torch.zeros_like(full[2])), "the bias gradient must be exact zeros"
    for name, wanted, got, want in zip(GRAD_OUTPUTS, mask, part, full):
        if wanted:
            assert torch.equal(got, want), f"{name} depends on the mask"
        else:
            assert got.shape == (0,), f"{name} was masked out but has shape {tuple(got.shape)}"


class _AtenCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# What the host code may do around the launches: allocate and take views.
ALLOCATIONS_AND_VIEWS = {"empty", "empty_like", "new_empty", "empty_strided", "slice", "view", "alias", "detach",
                         "as_strided", "contiguous", "clone"}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_two_launches_and_no_tensor_arithmetic(monkeypatch, channels_last):
    """Each direction is two kernel launches with only allocations around them."""
    import fused_poolformer.triton as backend

    launched = []
    monkeypatch.setattr(backend, "_launch", lambda launches: launched.append(len(launches)))
    x, kw = make_inputs((2, 4, 5, 6), torch.float32, channels_last, device=DEVICE)
    args = (kw["weight"], kw["bias"], kw["layer_scale"], kw["res_scale"], kw["sample_scale"], 2, 3, 1e-5)
    # The operators' Python bodies, called directly: a dispatch mode does not see inside a
    # custom operator that the dispatcher runs.
    with _AtenCalls() as forward_calls:
        y, mean, rstd = backend.forward_op._init_fn(x, *args)
    dy = torch.ones_like(y)
    with _AtenCalls() as backward_calls:
        backend.backward_op._init_fn(dy, x, mean, rstd, *args, [True] * 5)
    assert launched == [2, 2], f"launches per direction: {launched}"
    for direction, calls in (("forward", forward_calls.calls), ("backward", backward_calls.calls)):
        others = set(calls) - ALLOCATIONS_AND_VIEWS
        assert not others, f"the {direction} host path runs tensor operations {sorted(others)}"


def test_large_mean_float32():
    """x - mean is pooled, so a mean far above the spread does not cancel the mixer term."""
    g = torch.Generator().manual_seed(11)
    x = 1e4 + torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    _, kw = make_inputs(x.shape, torch.float32, options=GRAD_NAMES, device=DEVICE)
    y = triton_mixer(x.float().to(DEVICE), kw["weight"], kw["bias"], layer_scale=kw["layer_scale"],
                     res_scale=kw["res_scale"]).double().cpu()
    ref = reference64(x, kw)
    res = kw["res_scale"].double().cpu().view(1, -1, 1, 1)
    mix, mix_ref = y - x * res, ref - x * res
    assert ((mix - mix_ref).norm() / mix_ref.norm()).item() < 2e-3


def test_non_dense_input_and_repeatability():
    base, kw = make_inputs((2, 4, 8, 10), torch.float32, device=DEVICE)
    x = base[:, :, 1:7, ::2]  # dense in neither layout: copied once, read as NCHW
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y1, g1 = gradients(triton_mixer, x, kw, dy)
    y2, g2 = gradients(triton_mixer, x, kw, dy)
    assert_named_close("y", y1, reference64(x, kw), torch.float32)
    assert torch.equal(y1, y2), "forward is not bitwise repeatable"
    for name in g1:
        assert torch.equal(g1[name], g2[name]), f"grad of {name} is not bitwise repeatable"


def test_channels_last_repeatability():
    x, kw = make_inputs((2, 6, 5, 7), torch.float32, channels_last=True, device=DEVICE)
    first = forward_backward_outputs(x, kw, 3, 5)
    for name, a, b in zip(("y", "mean", "rstd") + GRAD_OUTPUTS, first, forward_backward_outputs(x, kw, 3, 5)):
        assert torch.equal(a, b), f"{name} is not bitwise repeatable"


def test_tiles_of_poolformer_stages_hold_whole_vectors():
    """For the PoolFormer stage planes whose contiguous axis is a whole number of 16-byte
    vectors, the autotuner only tries tiles that give every thread whole vectors within the
    register budget (the ahead-of-time test checks what ptxas makes of them)."""
    from fused_poolformer.triton import common

    for C, H in ((64, 56), (128, 28), (320, 14), (512, 7)):
        for dtype in (torch.float32, torch.bfloat16):
            for channels_last in (False, True):
                size = torch.empty((), dtype=dtype).element_size()
                geo = common.TileGeometry((64, C, H, H), size, channels_last, 1, 3)
                if geo.vec * size < common.VECTOR_BYTES:
                    continue  # NCHW 14x14 and 7x7: no row starts on a 16-byte boundary
                configs = common.CHANNELS_LAST_CONFIGS if channels_last else common.NCHW_CONFIGS
                args = geo.shape_args()
                kept = common.fitting_tiles(configs, args, geo.registers_per_value)
                for cfg in kept:
                    per_thread, in_flight = common.tile_cost({**args, **cfg.kwargs}, cfg.num_warps)
                    assert per_thread >= geo.vec and in_flight <= common.VALUES_IN_FLIGHT, (C, H, dtype, cfg)


def test_empty_batch():
    x, kw = make_inputs((0, 4, 5, 5), torch.float32, options=("weight", "layer_scale"), device=DEVICE)
    x.requires_grad_(True)
    y = triton_mixer(x, kw["weight"], layer_scale=kw["layer_scale"])
    assert y.shape == (0, 4, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_operator_validates_its_arguments():
    x, kw = make_inputs((1, 4, 3, 3), torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="pool_size"):
        forward_op()(x, None, None, None, None, None, 1, 4, 1e-5)
    with pytest.raises(ValueError, match="num_groups"):
        forward_op()(x, None, None, None, None, None, 3, 3, 1e-5)
    with pytest.raises(ValueError, match="weight"):
        forward_op()(x, kw["weight"][:3], None, None, None, None, 1, 3, 1e-5)


# ---------------------------------------------------------------------------------------
# GPU only.


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_every_dtype_on_gpu(dtype, channels_last):
    check_against_reference((2, 64, 28, 28), dtype, channels_last, 4, 3, ALL, seed=7)
    check_against_reference((3, 20, 7, 9), dtype, channels_last, 2, 5, ALL, seed=8)


@requires_cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_parameters_with_half_input_on_gpu(channels_last):
    check_against_reference((2, 32, 14, 14), torch.bfloat16, channels_last, 1, 3, ALL,
                            param_dtype=torch.float32)


@requires_cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_first_stage_shape_on_gpu(channels_last):
    """A PoolFormer first-stage plane: several tiles per plane and a real autotune."""
    check_against_reference((2, 64, 56, 56), torch.float32, channels_last, 1, 3, ALL, seed=9)


@requires_cuda
@pytest.mark.slow
def test_offsets_past_two_to_the_31_on_gpu():
    """N*C*H*W > 2**31: per-sample base offsets need 64 bits. Checks the last sample."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    n = 2**31 // (8 * 512 * 512) + 2
    x = torch.randn((n, 8, 512, 512), device="cuda", dtype=torch.bfloat16).requires_grad_()
    y = triton_mixer(x, num_groups=2)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    last = x[-1:].detach().float().requires_grad_()
    y_ref = fp.reference.pool_mixer(last, num_groups=2)
    (dx_ref,) = torch.autograd.grad(y_ref, last, dy[-1:].float())
    assert_named_close("y (last sample)", y[-1:], y_ref, torch.bfloat16)
    assert_named_close("grad of x (last sample)", dx[-1:], dx_ref, torch.bfloat16)


@requires_cuda_compile
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_on_gpu(channels_last):
    x, kw = make_inputs((2, 4, 5, 6), torch.float32, channels_last, device="cuda")
    args = (x, kw["weight"], kw["bias"], kw["layer_scale"], kw["res_scale"], kw["sample_scale"], 2, 3, 1e-5)
    x.requires_grad_(True)
    torch.library.opcheck(forward_op(), args)
    y, mean, rstd = forward_op()(*args)
    bargs = (torch.randn_like(y), x.detach(), mean, rstd, kw["weight"], kw["bias"], kw["layer_scale"],
             kw["res_scale"], kw["sample_scale"], 2, 3, 1e-5, [True, True, True, False, True])
    torch.library.opcheck(backward_op(), bargs)


@requires_cuda_compile
@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_compile_fullgraph_matches_eager(channels_last):
    x, kw = make_inputs((2, 16, 14, 14), torch.float32, channels_last, device="cuda")

    def f(x, w, b, ls):
        return triton_mixer(x, w, b, layer_scale=ls, num_groups=2) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    args = (x, kw["weight"], kw["bias"], kw["layer_scale"])
    torch.testing.assert_close(compiled(*args), f(*args), rtol=0, atol=0)
    xs = x.clone().requires_grad_()
    compiled(xs, *args[1:]).sum().backward()
    xe = x.clone().requires_grad_()
    f(xe, *args[1:]).sum().backward()
    torch.testing.assert_close(xs.grad, xe.grad, rtol=1e-5, atol=1e-6)


@requires_cuda
@pytest.mark.skipif(not fp.HAS_CUDA_KERNELS, reason="the CUDA C++ kernels were not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_agrees_with_cuda_kernels(dtype, channels_last):
    x, kw = make_inputs((4, 32, 28, 28), dtype, channels_last, device="cuda", seed=3)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y_t, g_t = gradients(triton_mixer, x, kw, dy, num_groups=2)
    y_c, g_c = gradients(lambda *a, **k: fp.pool_mixer(*a, backend="cuda", **k), x, kw, dy, num_groups=2)
    assert_named_close("y", y_t, y_c, dtype)
    for name in g_t:
        assert_named_close(f"grad of {name}", g_t[name], g_c[name], dtype)

"""The fused operator on the CUDA kernels against the unfused reference and the CPU kernels.

Skipped without a GPU.  Shapes are chosen to cross the kernels' tile boundaries (several
tiles along H, W and C in both layouts), to have planes smaller than the window, 1x1
planes and odd non-square ones, plus the first PoolFormer stage (2, 64, 56, 56).
"""

import itertools

import pytest
import torch

import fused_poolformer as fp
from fused_poolformer import contract, ops
from conftest import (OPTION_NAMES, TOL, assert_close_to, call, make_inputs, opcheck_forward_and_backward,
                      reference64, requires_cuda)

pytestmark = [
    requires_cuda,
    pytest.mark.skipif(not ops.HAS_CUDA_KERNELS, reason="extension built without CUDA kernels"),
]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(2, 8, 1, 1), (2, 4, 2, 3), (3, 8, 5, 7), (2, 12, 13, 9), (2, 64, 56, 56)]
# Several tiles along H (NCHW), along W and C (both layouts), 1-wide planes.
TILE_SHAPES = [(1, 2, 67, 45), (1, 300, 3, 5), (1, 130, 17, 19), (2, 3, 1, 150), (1, 70, 20, 1)]
GRAD_NAMES = ("weight", "bias", "layer_scale", "res_scale")


def cuda_inputs(shape, dtype=torch.float32, channels_last=False, **kw):
    return make_inputs(shape, dtype, channels_last, device="cuda", **kw)


def fused(x, kw, **opts):
    return call(fp.pool_mixer, x, kw, backend="cuda", **opts)


def output_and_gradients(fn, x, kw, dy, **opts):
    """y and the gradients of x and of every present vector in GRAD_NAMES."""
    leaves = {"x": x.detach().clone().requires_grad_()}
    params = dict(kw)
    for name in GRAD_NAMES:
        if kw[name] is not None:
            leaves[name] = params[name] = kw[name].detach().clone().requires_grad_()
    y = call(fn, leaves["x"], params, **opts)
    grads = torch.autograd.grad(y, list(leaves.values()), dy.to(device=y.device, dtype=y.dtype))
    return y.detach(), dict(zip(leaves.keys(), grads))


def on_cpu(kw, dtype=None):
    return {k: (None if v is None else v.detach().cpu().to(dtype or v.dtype)) for k, v in kw.items()}


def check_against_reference_and_cpu(x, kw, dtype, seed=0, **opts):
    """Forward and every gradient vs the float64 reference, and vs the CPU kernels."""
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    y, grads = output_and_gradients(lambda *a, **k: fp.pool_mixer(*a, backend="cuda", **k), x, kw, dy, **opts)
    assert y.device.type == "cuda" and y.dtype == dtype
    fmt = torch.channels_last if contract.dense_format(x) == torch.channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    ref_y, ref_grads = output_and_gradients(fp.reference.pool_mixer, x.double().cpu(), on_cpu(kw, torch.float64), dy, **opts)
    assert_close_to(y, ref_y, dtype)
    for name, g in grads.items():
        assert g.dtype == (dtype if name == "x" or kw[name] is None else kw[name].dtype), name
        try:
            assert_close_to(g, ref_grads[name], dtype)
        except AssertionError as err:
            raise AssertionError(f"gradient of {name}: {err}") from None
    if "bias" in grads:
        assert torch.equal(grads["bias"], torch.zeros_like(grads["bias"]))
    if ops.HAS_CPU_KERNELS:
        cpu_y, cpu_grads = output_and_gradients(
            lambda *a, **k: fp.pool_mixer(*a, backend="cpu", **k), x.cpu(), on_cpu(kw), dy, **opts)
        tol = TOL[dtype]
        scale = ref_y.abs().max().item()
        assert (y.cpu().double() - cpu_y.double()).abs().max().item() <= 2 * (tol["atol"] + tol["rtol"] * scale)
        for name, g in grads.items():
            scale = ref_grads[name].abs().max().item()
            err = (g.cpu().double() - cpu_grads[name].double()).abs().max().item()
            assert err <= 2 * (tol["atol"] + tol["rtol"] * scale), f"{name} differs from the CPU kernels by {err:.3e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_and_cpu(shape, dtype, channels_last):
    x, kw = cuda_inputs(shape, dtype, channels_last, seed=sum(shape))
    check_against_reference_and_cpu(x, kw, dtype, num_groups=2 if shape[1] % 2 == 0 else 1)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", TILE_SHAPES)
@pytest.mark.parametrize("pool_size", [3, 7])
def test_tile_boundaries_float64(shape, pool_size, channels_last):
    x, kw = cuda_inputs(shape, torch.float64, channels_last, seed=pool_size)
    check_against_reference_and_cpu(x, kw, torch.float64, num_groups=1, pool_size=pool_size)


@pytest.mark.parametrize("num_groups", [1, 2, 4])
@pytest.mark.parametrize("pool_size", [3, 5, 7])
@pytest.mark.parametrize("channels_last", [False, True])
def test_groups_and_pool_sizes(num_groups, pool_size, channels_last):
    # H = 6 < 7: the largest window covers the whole height.
    x, kw = cuda_inputs((2, 8, 6, 11), torch.float32, channels_last, seed=pool_size)
    check_against_reference_and_cpu(x, kw, torch.float32, num_groups=num_groups, pool_size=pool_size)


@pytest.mark.parametrize("present", [c for r in range(6) for c in itertools.combinations(OPTION_NAMES, r)])
def test_every_option_combination(present):
    x, kw = cuda_inputs((2, 6, 5, 4), torch.float64, options=present, seed=len(present))
    check_against_reference_and_cpu(x, kw, torch.float64, num_groups=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_parameters_with_half_input(dtype):
    x, kw = cuda_inputs((2, 8, 7, 7), dtype, True, param_dtype=torch.float32)
    check_against_reference_and_cpu(x, kw, dtype)


def test_huge_window_and_one_by_one_planes():
    x, kw = cuda_inputs((2, 4, 1, 1), torch.float64)
    check_against_reference_and_cpu(x, kw, torch.float64, pool_size=9)
    x, kw = cuda_inputs((1, 4, 9, 12), torch.float64, True)
    check_against_reference_and_cpu(x, kw, torch.float64, pool_size=31)


def test_large_mean_float32():
    g = torch.Generator().manual_seed(11)
    x = 1e4 + torch.randn(2, 16, 14, 14, generator=g, dtype=torch.float64)
    _, kw = cuda_inputs(x.shape, torch.float32)
    y = fused(x.float().cuda(), kw).cpu().double()
    ref = reference64(x, kw)
    res = kw["res_scale"].double().cpu().view(1, -1, 1, 1)
    mix, mix_ref = y - x * res, ref - x * res
    assert ((y - ref).norm() / ref.norm()).item() < 1e-5
    assert ((mix - mix_ref).norm() / mix_ref.norm()).item() < 2e-3


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_float64(channels_last):
    x, kw = cuda_inputs((2, 4, 5, 6), torch.float64, channels_last)
    leaves = [x] + [kw[k] for k in GRAD_NAMES]
    for t in leaves:
        t.requires_grad_(True)

    def f(x, w, b, ls, rs):
        return fp.pool_mixer(x, w, b, layer_scale=ls, res_scale=rs, sample_scale=kw["sample_scale"],
                             num_groups=2, pool_size=3, backend="cuda")

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(channels_last):
    opcheck_forward_and_backward(*cuda_inputs((2, 4, 5, 6), torch.float32, channels_last))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bitwise_repeatable(dtype, channels_last):
    x, kw = cuda_inputs((2, 64, 28, 28), dtype, channels_last, seed=4)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    runs = [output_and_gradients(lambda *a, **k: fp.pool_mixer(*a, backend="cuda", **k), x, kw, dy) for _ in range(3)]
    for y, grads in runs[1:]:
        assert torch.equal(y, runs[0][0])
        for name in grads:
            assert torch.equal(grads[name], runs[0][1][name]), name


@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_graph_capture_and_replay(channels_last):
    x, kw = cuda_inputs((2, 16, 14, 14), torch.float32, channels_last, seed=2)
    static_x = x.clone().requires_grad_()
    weight = kw["weight"].clone().requires_grad_()
    static_dy = torch.randn_like(x)

    def step():
        y = fp.pool_mixer(static_x, weight, kw["bias"], layer_scale=kw["layer_scale"],
                          res_scale=kw["res_scale"], sample_scale=kw["sample_scale"], backend="cuda")
        return (y,) + torch.autograd.grad(y, [static_x, weight], static_dy)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    new_x, _ = cuda_inputs(x.shape, torch.float32, channels_last, seed=7)
    with torch.no_grad():
        static_x.copy_(new_x)
        static_dy.copy_(torch.randn_like(static_dy))
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for got, want in zip(captured, eager):
        assert torch.equal(got, want)


def test_empty_batch():
    x, kw = cuda_inputs((0, 4, 5, 5), torch.float32, options=("weight", "layer_scale"))
    x.requires_grad_(True)
    y = fused(x, kw)
    assert y.shape == (0, 4, 5, 5) and y.is_cuda
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_non_dense_input():
    base, kw = cuda_inputs((2, 8, 10, 12), torch.float32)
    x = base[:, :, 1:9, ::2]
    check_against_reference_and_cpu(x, kw, torch.float32)


def test_auto_picks_cuda_kernels():
    assert ops.choose_backend("auto", torch.empty(1, 1, 1, 1, device="cuda")) == "cuda"
    assert "cuda" in fp.ops.available_backends("cuda")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    x, kw = make_inputs((2, 8, 9, 9), torch.float32, device="cuda:1")
    check_against_reference_and_cpu(x, kw, torch.float32)


def _free_gpu_bytes():
    try:
        return torch.cuda.mem_get_info()[0]
    except RuntimeError:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.skipif(not torch.cuda.is_available() or _free_gpu_bytes() < 40 * 2**30,
                    reason="needs 40 GiB of free GPU memory")
def test_more_than_2_pow_31_elements(channels_last):
    # 131073 samples of 4 x 64 x 64 = 2**31 + 16384 elements; each sample is independent, so a
    # few samples (first, middle, last) are checked against the reference on their own.
    n = 2**31 // (4 * 64 * 64) + 1
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((n, 4, 64, 64), generator=g, device="cuda", dtype=torch.float16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert x.numel() > 2**31
    _, kw = cuda_inputs((1, 4, 1, 1), torch.float16, options=("weight", "layer_scale", "res_scale"))
    y, mean, rstd = torch.ops.fused_poolformer.pool_mixer_forward(
        x, kw["weight"], None, kw["layer_scale"], kw["res_scale"], None, 2, 3, 1e-5)
    dy = torch.randn(x.shape, generator=g, device="cuda", dtype=torch.float16)
    dx = torch.ops.fused_poolformer.pool_mixer_backward(
        dy, x, mean, rstd, kw["weight"], kw["layer_scale"], kw["res_scale"], None, 2, 3,
        [True, False, False, False])[0]
    for i in (0, n // 2, n - 1):
        xi = x[i:i + 1].double().cpu().requires_grad_()
        ref = call(fp.reference.pool_mixer, xi, on_cpu(kw, torch.float64), num_groups=2)
        assert_close_to(y[i:i + 1], ref, torch.float16)
        (ref_dx,) = torch.autograd.grad(ref, [xi], dy[i:i + 1].double().cpu())
        assert_close_to(dx[i:i + 1], ref_dx, torch.float16)

"""What only the CUDA backend has: CUDA graph capture and replay, the allocation budget per
call, tensors on a second device, tensors of more than 2**31 elements.
Skipped without a GPU; the same properties of every backend are in the other files."""

import pytest
import torch

import fused_poolformer as fp
from helpers import assert_close_to, call, check_forward_backward, make_inputs, on_cpu, unavailable_reason

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(unavailable_reason("cuda") is not None, reason=str(unavailable_reason("cuda"))),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cuda_graph_capture_and_replay(channels_last):
    x, kw = make_inputs((2, 16, 14, 14), torch.float32, channels_last, seed=2, device="cuda")
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

    new_x, _ = make_inputs(x.shape, torch.float32, channels_last, seed=7, device="cuda")
    with torch.no_grad():
        static_x.copy_(new_x)
        static_dy.copy_(torch.randn_like(static_dy))
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for got, want in zip(captured, eager):
        assert torch.equal(got, want)


def allocations(fn):
    """aten::empty calls while fn runs (the CUDA caching allocator serves each)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name == "aten::empty" for e in prof.events())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_allocations_per_call(channels_last):
    """Forward: y, which carries the call's workspace in its own allocation (csrc/host.cpp,
    empty_with_tail), mean and rstd.  Backward: grad_x, which carries that call's workspace,
    and one tensor per requested parameter gradient -- 4 for timm's PoolFormer (weight,
    bias, layer_scale)."""
    x, kw = make_inputs((4, 16, 14, 14), torch.float32, channels_last, seed=3, device="cuda")
    x.requires_grad_(True)
    params = [kw[n].clone().requires_grad_() for n in ("weight", "bias", "layer_scale")]
    y = fp.pool_mixer(x, *params[:2], layer_scale=params[2], backend="cuda")
    grad_y = torch.randn_like(y)
    with torch.no_grad():
        assert allocations(lambda: fp.pool_mixer(x, *params[:2], layer_scale=params[2], backend="cuda")) == 3
    assert y.storage_offset() == 0 and y.untyped_storage().nbytes() > y.numel() * y.element_size()
    grads = []
    assert allocations(lambda: grads.extend(torch.autograd.grad(y, [x, *params], grad_y, retain_graph=True))) == 4
    dx = grads[0]
    assert dx.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert dx.storage_offset() == 0 and dx.untyped_storage().nbytes() > dx.numel() * dx.element_size()
    leaves64 = [t.detach().double().requires_grad_() for t in (x, *params)]
    expected = torch.autograd.grad(
        fp.reference.pool_mixer(leaves64[0], *leaves64[1:3], layer_scale=leaves64[3]), leaves64, grad_y.double())
    for got, want in zip(grads, expected):
        assert_close_to(got, want, torch.float32)
    # Without grad_x the workspace is an allocation of its own.
    assert allocations(lambda: torch.autograd.grad(y, params, grad_y, retain_graph=True)) == 4


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    x, kw = make_inputs((2, 8, 9, 9), torch.float32, device="cuda:1")
    check_forward_backward("cuda", x, kw)


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_more_than_2_pow_31_elements(channels_last):
    """131073 samples of 4 x 64 x 64 = 2**31 + 16384 elements: 64-bit offsets.  Each sample
    is independent, so a few (first, middle, last) are checked against the reference."""
    if torch.cuda.mem_get_info()[0] < 40 * 2**30:
        pytest.skip("needs 40 GiB of free GPU memory")
    n = 2**31 // (4 * 64 * 64) + 1
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((n, 4, 64, 64), generator=g, device="cuda", dtype=torch.float16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert x.numel() > 2**31
    _, kw = make_inputs((1, 4, 1, 1), torch.float16, options=("weight", "layer_scale", "res_scale"), device="cuda")
    y, mean, rstd = torch.ops.fused_poolformer.pool_mixer_forward(
        x, kw["weight"], None, kw["layer_scale"], kw["res_scale"], None, 2, 3, 1e-5)
    dy = torch.randn(x.shape, generator=g, device="cuda", dtype=torch.float16)
    dx = torch.ops.fused_poolformer.pool_mixer_backward(
        dy, x, mean, rstd, kw["weight"], None, kw["layer_scale"], kw["res_scale"], None, 2, 3, 1e-5,
        [True, False, False, False, False])[0]
    for i in (0, n // 2, n - 1):
        xi = x[i:i + 1].double().cpu().requires_grad_()
        ref = call(fp.reference.pool_mixer, xi, on_cpu(kw, torch.float64), num_groups=2)
        assert_close_to(y[i:i + 1], ref, torch.float16, "y")
        (ref_dx,) = torch.autograd.grad(ref, [xi], dy[i:i + 1].double().cpu())
        assert_close_to(dx[i:i + 1], ref_dx, torch.float16, "grad_x")

"""Forward and backward of every backend against the float64 unfused graph, over shapes,
dtypes, memory layouts, groups, pool sizes and every combination of the optional vectors.

Shapes cross the kernels' tile boundaries (several tiles along H, W and C in both layouts,
wide channels_last rows), have planes smaller than the window, 1x1 planes and odd
non-square ones, plus PoolFormer's first stage.  Off the CPU, results are also compared
with the CPU kernels.  Random inputs and gradients throughout (helpers.make_inputs)."""

import itertools

import pytest
import torch

from helpers import (DIFFERENTIABLE, FUSED, OPTION_NAMES, check_forward_backward, forward_backward, make_inputs,
                     with_backend)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CL = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
SHAPES = [(2, 8, 1, 1), (2, 4, 2, 3), (3, 8, 5, 7), (2, 12, 13, 9), (1, 16, 56, 56), (2, 64, 56, 56)]
# Several tiles along H (NCHW), along W and C (both layouts), 1-wide planes.
TILE_SHAPES = [(1, 2, 67, 45), (1, 300, 3, 5), (1, 130, 17, 19), (2, 3, 1, 150), (1, 70, 20, 1)]
# Channels_last rows of 256-512 channels (long rows, several vector chunks per pixel) and a
# 23-pixel row with 96 channels.
WIDE_ROW_SHAPES = [(1, 256, 5, 9), (2, 512, 3, 7), (1, 96, 4, 23)]


# The fused backends only: the reference backend (torch's own ops) gets the cheaper sweeps below.
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@CL
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, device, shape, dtype, channels_last):
    x, kw = make_inputs(shape, dtype, channels_last, seed=sum(shape), device=device)
    check_forward_backward(backend, x, kw, num_groups=2 if shape[1] % 2 == 0 else 1)


@CL
@pytest.mark.parametrize("shape", TILE_SHAPES, ids=str)
@pytest.mark.parametrize("pool_size", [3, 7])
def test_tile_boundaries_float64(backend, device, shape, pool_size, channels_last):
    x, kw = make_inputs(shape, torch.float64, channels_last, seed=pool_size, device=device)
    check_forward_backward(backend, x, kw, num_groups=1, pool_size=pool_size)


@pytest.mark.parametrize("pool_size", [3, 5, 9])
@pytest.mark.parametrize("shape", WIDE_ROW_SHAPES, ids=str)
def test_wide_channels_last_rows_float64(backend, device, shape, pool_size):
    x, kw = make_inputs(shape, torch.float64, channels_last=True, seed=pool_size, device=device)
    check_forward_backward(backend, x, kw, num_groups=4, pool_size=pool_size)


@pytest.mark.parametrize("num_groups", [1, 2, 4])
@pytest.mark.parametrize("pool_size", [1, 3, 5, 7, 9])
@CL
def test_groups_and_pool_sizes(backend, device, num_groups, pool_size, channels_last):
    # H = 6 < 7: the largest windows cover the whole height.
    x, kw = make_inputs((2, 8, 6, 11), torch.float32, channels_last, seed=pool_size, device=device)
    check_forward_backward(backend, x, kw, num_groups=num_groups, pool_size=pool_size)


def test_huge_window_and_one_by_one_planes(backend, device):
    x, kw = make_inputs((2, 4, 1, 1), torch.float64, device=device)
    check_forward_backward(backend, x, kw, pool_size=9)
    x, kw = make_inputs((1, 4, 9, 12), torch.float64, True, device=device)
    check_forward_backward(backend, x, kw, pool_size=31)


@pytest.mark.parametrize("present", [c for r in range(6) for c in itertools.combinations(OPTION_NAMES, r)],
                         ids=lambda c: "+".join(c) or "none")
def test_every_option_combination(backend, device, present):
    x, kw = make_inputs((2, 6, 5, 4), torch.float64, options=present, seed=len(present), device=device)
    check_forward_backward(backend, x, kw, num_groups=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@CL
def test_float32_parameters_with_half_input(backend, device, dtype, channels_last):
    x, kw = make_inputs((2, 8, 7, 7), dtype, channels_last, param_dtype=torch.float32, device=device)
    check_forward_backward(backend, x, kw)


def test_non_dense_input(backend, device):
    """A view dense in neither NCHW nor channels_last (copied once by the fused backends)."""
    base, kw = make_inputs((2, 8, 10, 12), torch.float32, device=device)
    check_forward_backward(backend, base[:, :, 1:9, ::2], kw)


def test_empty_batch_gives_empty_output_and_zero_parameter_gradients(backend, device):
    x, kw = make_inputs((0, 4, 5, 5), torch.float32, device=device)
    y, grads = forward_backward(with_backend(backend), x, kw, torch.empty(0, 4, 5, 5, device=device), num_groups=2)
    assert y.shape == (0, 4, 5, 5) and y.device.type == device
    assert grads["x"].shape == (0, 4, 5, 5)
    for name in DIFFERENTIABLE:
        assert grads[name].shape == (4,) and torch.count_nonzero(grads[name]) == 0, name  # every sum is empty
    # y.sum().backward(): the expanded (stride 0) gradient of an empty tensor.
    x = x.detach().requires_grad_(True)
    with_backend(backend)(x, kw["weight"], layer_scale=kw["layer_scale"]).sum().backward()
    assert x.grad.shape == x.shape

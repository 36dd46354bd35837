"""Property-based tests: every fused backend against the float64 unfused graph over random
shapes (1, primes, H != W, planes smaller than the window), groups, pool sizes, dtypes,
memory layouts (dense, channels_last, sliced, permuted, expanded), subsets of the optional
vectors (contiguous or strided) and of the gradients asked for -- forward and backward.

Examples are derandomized (the same cases on every run, so CI is reproducible) and sized
so that the file runs in well under a minute on two cores."""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fused_poolformer import contract, ops
from helpers import (DIFFERENTIABLE, FUSED, OPTION_NAMES, assert_close_to, device_of, forward_backward, make_inputs,
                     random_like, reference_forward_backward)

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# How x is laid out in memory.  The kernels read NCHW or channels_last; anything dense in
# neither is copied once to NCHW (csrc/host.cpp) -- these cases check the result.
LAYOUTS = ("contiguous", "channels_last", "sliced", "channels_last_sliced", "permuted_hw", "permuted_nc", "expanded")
GRAD_LAYOUTS = ("contiguous", "channels_last", "expanded")
SIDES = (1, 2, 3, 4, 5, 7, 8, 11, 13)  # 1, primes, below/above every window size

PROPERTY_SETTINGS = settings(
    max_examples=800, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def arrange(x, layout, seed):
    """x's values (all but "expanded", which repeats sample 0) with the strides of ``layout``."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout in ("sliced", "channels_last_sliced"):
        n, c, h, w = x.shape
        # Random values around the view: reading outside it would change the result.
        big = random_like(torch.empty(n + 1, c + 2, h + 3, 2 * w + 1, dtype=x.dtype, device=x.device), seed) * 1e3
        if layout == "channels_last_sliced":
            big = big.contiguous(memory_format=torch.channels_last)
        view = big[1:, 1 : c + 1, 2 : h + 2, 1::2]
        view.copy_(x)
        return view
    if layout == "permuted_hw":  # stored as (N, C, W, H)
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "permuted_nc":  # stored as (C, N, H, W)
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "expanded":  # stride 0 along N
        return x[:1].expand_as(x)
    raise ValueError(layout)


def arrange_grad(grad_y, layout):
    if layout == "channels_last":
        return grad_y.contiguous(memory_format=torch.channels_last)
    if layout == "expanded":  # what y.sum().backward() sends: one value, all strides 0
        return grad_y.flatten()[:1].reshape(1, 1, 1, 1).expand_as(grad_y)
    return grad_y


@st.composite
def cases(draw):
    groups = draw(st.integers(1, 3))
    shape = (draw(st.integers(1, 3)), groups * draw(st.integers(1, 4)), draw(st.sampled_from(SIDES)),
             draw(st.sampled_from(SIDES)))
    # F.group_norm (the reference) refuses N * C/G * H * W == 1; test_numerics covers it.
    assume(shape[0] * shape[1] // groups * shape[2] * shape[3] > 1)
    dtype = draw(st.sampled_from(DTYPES))
    return dict(
        shape=shape,
        dtype=dtype,
        num_groups=groups,
        pool_size=draw(st.sampled_from((1, 3, 5, 7, 9))),
        eps=draw(st.sampled_from((1e-5, 1e-6, 0.25))),
        layout=draw(st.sampled_from(LAYOUTS)),
        grad_layout=draw(st.sampled_from(GRAD_LAYOUTS)),
        options=draw(st.sets(st.sampled_from(OPTION_NAMES))),
        # Mixed precision: float32 parameters of a half activation.
        param_dtype=draw(st.sampled_from((dtype, torch.float32))) if dtype in (torch.float16, torch.bfloat16) else dtype,
        wanted=draw(st.sets(st.sampled_from(("x",) + DIFFERENTIABLE), min_size=1)),
        strided_vectors=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def check_case(case, backend, device):
    x, kw = make_inputs(case["shape"], case["dtype"], options=case["options"], seed=case["seed"],
                        device=device, param_dtype=case["param_dtype"])
    x = arrange(x, case["layout"], case["seed"] + 1)
    if case["strided_vectors"]:  # every other element of a longer vector
        kw = {k: None if v is None else torch.stack([v, -v], 1).flatten()[::2] for k, v in kw.items()}
    x_before = x.clone()
    grad_y = arrange_grad(random_like(x, case["seed"] + 2), case["grad_layout"])
    opts = dict(num_groups=case["num_groups"], pool_size=case["pool_size"], eps=case["eps"])

    y, grads = forward_backward(ops.pool_mixer, x, kw, grad_y, case["wanted"], backend=backend, **opts)
    y_ref, grads_ref = reference_forward_backward(x, kw, grad_y, case["wanted"], **opts)

    assert torch.equal(x, x_before), "the input was modified"
    assert y.dtype == x.dtype and y.shape == x.shape and y.device == x.device
    assert y.is_contiguous(memory_format=contract.dense_format(x)), "y does not keep x's memory format"
    assert_close_to(y, y_ref, case["dtype"])
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        source = x if name == "x" else kw[name]
        assert grad.dtype == source.dtype and grad.shape == source.shape, name
        assert_close_to(grad, grads_ref[name], grad.dtype)
    if "bias" in grads:  # the bias cancels out of y: its gradient is exactly zero
        assert torch.count_nonzero(grads["bias"]) == 0


@pytest.mark.parametrize("backend", FUSED)
@PROPERTY_SETTINGS
@given(case=cases())
def test_forward_backward_match_float64_reference(backend, case):
    check_case(case, backend, device_of(backend))


@pytest.mark.parametrize("backend", FUSED)
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.sampled_from(SIDES), st.sampled_from(SIDES)),
    groups_per_channel=st.integers(1, 3),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    shift=st.sampled_from((0.0, 50.0, -3e3)),
    seed=st.integers(0, 2**16),
)
def test_statistics_are_the_float64_group_mean_and_rstd(backend, shape, groups_per_channel, dtype, layout, shift, seed):
    """The (N, G) mean and rstd the forward saves for the backward."""
    device = device_of(backend)  # not the fixture: hypothesis reruns the body, not fixtures
    n, groups, h, w = shape
    c = groups * groups_per_channel
    x, _ = make_inputs((n, c, h, w), dtype, options=(), seed=seed, device=device)
    x = arrange((x.double() + shift).to(dtype), layout, seed)
    x64 = x.double().cpu().reshape(n, groups, -1)
    var, mean = torch.var_mean(x64, dim=2, unbiased=False)
    rstd = (var + 1e-5).rsqrt()
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    rtol = 1e-10 if dtype == torch.float64 else 2e-5  # float32 accumulation (Chan merge)
    _, got_mean, got_rstd = ops.forward_operator(backend)(x, None, None, None, None, None, groups, 3, 1e-5)
    assert got_mean.shape == (n, groups) and got_mean.dtype == stats_dtype
    assert got_rstd.shape == (n, groups) and got_rstd.dtype == stats_dtype
    # The mean's error is relative to its magnitude plus the group's spread.
    mean_err = (got_mean.cpu().double() - mean).abs() - rtol * (mean.abs() + var.sqrt())
    assert mean_err.max().item() <= 0
    torch.testing.assert_close(got_rstd.cpu().double(), rstd, rtol=rtol, atol=0)

"""Numerical robustness of every fused backend against the float64 unfused graph: a large
mean, a tiny spread, constant planes (variance 0), +-Inf and NaN, half-precision inputs
whose sums overflow the half range.  Each test states the bound it proves."""

import math

import pytest
import torch

from fused_poolformer import ops
from helpers import (DIFFERENTIABLE, FUSED, TOL, assert_close_to, call, forward_backward, make_inputs, random_like,
                     reference64, reference_forward_backward, with_backend)

BACKENDS = pytest.mark.parametrize("backend", FUSED)
CL = pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])


def shifted_inputs(shape, mean, std, device, channels_last=False, dtype=torch.float32, param_dtype=None, seed=0):
    """make_inputs' vectors with x ~ N(mean, std) (float64 draw, rounded once to dtype)."""
    x, kw = make_inputs(shape, torch.float64, seed=seed, device=device)
    kw = {k: v.to(param_dtype or dtype) for k, v in kw.items()}
    x = ((x - 0.5) / 1.3 * std + mean).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, kw


def relative_to_max(actual, expected):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def elementwise_relative(actual, expected):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((actual - expected).abs() / expected.abs()).max().item()


def run_both(x, kw, backend, wanted=("x",) + DIFFERENTIABLE, **opts):
    grad_y = random_like(x, 99)
    fused = forward_backward(ops.pool_mixer, x, kw, grad_y, wanted, backend=backend, **opts)
    return fused, reference_forward_backward(x, kw, grad_y, wanted, **opts)


# ---------------------------------------------------------------------------------------
# Large mean, tiny spread.


@BACKENDS
@CL
@pytest.mark.parametrize("mean", [1e4, -1e4])
def test_large_mean_float32(backend, device, channels_last, mean):
    """mean 1e4, std 1 in float32.  Bounds: every output element within 1e-5 relative of
    float64 (measured ~1e-7); grad_x within 2e-5 of max|grad_x| (measured ~2e-6: the
    float32 group mean, off by ~1 ulp of 1e4, enters the (x - mean) term of the
    backward); parameter gradients within 1e-5 of their max (measured <= 3e-7)."""
    x, kw = shifted_inputs((2, 8, 14, 13), mean, 1.0, device, channels_last)
    (y, grads), (y_ref, grads_ref) = run_both(x, kw, backend, num_groups=2)
    assert elementwise_relative(y, y_ref) < 1e-5
    assert relative_to_max(grads["x"], grads_ref["x"]) < 2e-5
    for name in ("weight", "layer_scale", "res_scale"):
        assert relative_to_max(grads[name], grads_ref[name]) < 1e-5, name


@BACKENDS
@CL
def test_large_mean_mixer_term_keeps_its_precision(backend, device, channels_last):
    """With res_scale = 0 the output is the mixer term alone (size ~1 on top of a mean of
    1e4): the kernels pool x - mean, so it keeps float32 precision: within 1e-5 of its max
    (measured ~2e-7).  For comparison, the unfused graph in float32 is off by 3e-5 of the
    max in NCHW and by 300x the max in channels_last (torch 2.14's CPU GroupNorm loses the
    variance to cancellation there)."""
    x, kw = shifted_inputs((2, 8, 14, 13), 1e4, 1.0, device, channels_last)
    kw["res_scale"] = torch.zeros_like(kw["res_scale"])
    (y, _), (y_ref, _) = run_both(x, kw, backend, wanted=("x",), num_groups=2)
    assert relative_to_max(y, y_ref) < 1e-5


@BACKENDS
def test_large_mean_float32_one_group(backend, device):
    """mean 1e4, std 1 in float32 with one group over 16 channels: the output within 1e-5
    (in norm) of float64, and the mixer term alone (y - res_scale * x, the part that cancels
    catastrophically if done naively) within 2e-3."""
    g = torch.Generator().manual_seed(11)
    x = 1e4 + torch.randn(2, 16, 14, 14, generator=g, dtype=torch.float64)
    _, kw = make_inputs(x.shape, torch.float32, device=device)
    y = call(with_backend(backend), x.float().to(device), kw).double().cpu()
    ref = reference64(x, kw)
    res = kw["res_scale"].double().cpu().view(1, -1, 1, 1)
    mix, mix_ref = y - x * res, ref - x * res
    assert ((y - ref).norm() / ref.norm()).item() < 1e-5
    assert ((mix - mix_ref).norm() / mix_ref.norm()).item() < 2e-3


@BACKENDS
@CL
@pytest.mark.parametrize("eps", [1e-5, 1e-12])
def test_tiny_spread_float32(backend, device, channels_last, eps):
    """mean 1, std 1e-4 in float32; eps 1e-5 dominates the variance (rstd ~ 316), eps
    1e-12 does not (rstd ~ 1e4).  Bounds: the mixer term (res_scale = 0) within 2e-5 of
    its max (measured <= 1e-6); every gradient within 1e-4 of its max (measured <= 2e-5
    for grad_x at eps 1e-12)."""
    x, kw = shifted_inputs((2, 8, 14, 13), 1.0, 1e-4, device, channels_last)
    kw["res_scale"] = torch.zeros_like(kw["res_scale"])
    (y, grads), (y_ref, grads_ref) = run_both(x, kw, backend, num_groups=2, eps=eps)
    assert relative_to_max(y, y_ref) < 2e-5
    for name in ("x", "weight", "layer_scale", "res_scale"):
        assert relative_to_max(grads[name], grads_ref[name]) < 1e-4, name


# ---------------------------------------------------------------------------------------
# Variance zero.


@BACKENDS
@CL
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_constant_group_has_rstd_of_eps_and_no_nan(backend, device, channels_last, dtype):
    """Group 0 of every sample is one constant (variance 0): rstd = 1/sqrt(eps) (to the
    stats dtype's rounding), its outputs are res_scale * x (the pool of a constant is that
    constant), nothing is NaN, and forward and backward match the reference."""
    x, kw = make_inputs((2, 6, 7, 9), dtype, channels_last, seed=4, device=device)
    x = x.clone()
    x[:, :3] = 0.371  # num_groups=2: channels 0-2 are group 0
    eps = 1e-5
    op = ops.forward_operator(backend)
    _, mean, rstd = op(x, kw["weight"], kw["bias"], kw["layer_scale"], kw["res_scale"], kw["sample_scale"], 2, 3, eps)
    torch.testing.assert_close(rstd[:, 0].double().cpu(), torch.full((2,), 1 / math.sqrt(eps), dtype=torch.float64),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(mean[:, 0].double().cpu(), torch.full((2,), 0.371, dtype=torch.float64).to(dtype).double(),
                               rtol=1e-6, atol=0)
    (y, grads), (y_ref, grads_ref) = run_both(x, kw, backend, num_groups=2, eps=eps)
    assert all(t.isfinite().all() for t in (y, *grads.values()))
    shortcut = (x[:, :3].double() * kw["res_scale"][:3].double().view(1, -1, 1, 1)).to(dtype)
    torch.testing.assert_close(y[:, :3], shortcut, **{k: v / 10 for k, v in TOL[dtype].items()})
    assert_close_to(y, y_ref, dtype)
    for name, grad in grads.items():
        assert_close_to(grad, grads_ref[name], grad.dtype)


@BACKENDS
def test_constant_planes_with_different_levels(backend, device):
    """Every (n, c) plane constant but the levels differ: variance > 0 yet P x - x = 0,
    so y = res_scale * x exactly up to rounding, and the gradients match the reference."""
    g = torch.Generator().manual_seed(5)
    x, kw = make_inputs((2, 4, 6, 5), seed=5, device=device)
    levels = torch.randn(2, 4, 1, 1, generator=g).to(device)
    x = levels.expand(2, 4, 6, 5).contiguous()
    (y, grads), (y_ref, grads_ref) = run_both(x, kw, backend, num_groups=2)
    assert_close_to(y, x * kw["res_scale"].view(1, -1, 1, 1), torch.float32)
    for name, grad in grads.items():
        assert_close_to(grad, grads_ref[name], grad.dtype)


@BACKENDS
@pytest.mark.parametrize("pool_size", [1, 3])
def test_single_element_groups(backend, device, pool_size):
    """N = C/G = H = W = 1: F.group_norm (the reference) refuses this shape; the fused op
    gives the limit it has for every other constant group: y = res_scale * x, grad_x =
    res_scale * grad_y, rstd = 1/sqrt(eps)."""
    x, kw = make_inputs((1, 3, 1, 1), seed=6, device=device)
    grad_y = random_like(x, 7)
    y, grads = forward_backward(ops.pool_mixer, x, kw, grad_y, backend=backend, num_groups=3, pool_size=pool_size)
    res = kw["res_scale"].view(1, -1, 1, 1)
    torch.testing.assert_close(y, x * res, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads["x"], grad_y * res, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads["res_scale"], (x * grad_y).flatten(), rtol=1e-6, atol=1e-7)
    assert torch.count_nonzero(grads["weight"]) == 0 and torch.count_nonzero(grads["layer_scale"]) == 0


# ---------------------------------------------------------------------------------------
# Non-finite values: NaN and Inf spread through a group exactly as in the unfused graph.

NAN, INF = float("nan"), float("inf")


def same_nonfinite_pattern(actual, expected):
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    return all(torch.equal(f(actual), f(expected)) for f in (torch.isnan, torch.isposinf, torch.isneginf))


NONFINITE = pytest.mark.parametrize("values", [[NAN], [INF], [-INF], [INF, -INF], [INF, NAN]],
                                    ids=["nan", "inf", "-inf", "inf_and_-inf", "inf_and_nan"])


def with_bad_values(t, values):
    """A copy of t with the values planted in sample 0, channel 1 (group 0 of 2)."""
    t = t.clone()
    for i, v in enumerate(values):
        t[0, 1, 1 + 2 * i, 2] = v
    return t


def compare_nonfinite(x, kw, grad_y, backend, pattern):
    opts = dict(num_groups=2)
    y, grads = forward_backward(ops.pool_mixer, x, kw, grad_y, backend=backend, **opts)
    y_ref, grads_ref = reference_forward_backward(x, kw, grad_y, **opts)
    for name, actual, expected in [("y", y, y_ref)] + [(k, grads[k], grads_ref[k]) for k in grads if k != "bias"]:
        assert pattern(actual, expected), name
        finite = expected.isfinite()
        assert_close_to(actual.cpu()[finite], expected[finite], torch.float32)
    # The bias cancels out of y (docs/math.md): its gradient is zero by construction,
    # whatever grad_y holds (the unfused graph gets 0 * Inf = NaN where grad_y is not finite).
    assert torch.count_nonzero(grads["bias"]) == 0
    # Sample 1 and group 1 of sample 0 never see the bad values.
    assert y[1].isfinite().all() and y[0, 2:].isfinite().all()
    assert grads["x"][1].isfinite().all() and grads["x"][0, 2:].isfinite().all()


@BACKENDS
@CL
@NONFINITE
def test_nonfinite_x_propagates_exactly_like_the_reference(backend, device, channels_last, values):
    """NaN/Inf in x: the NaN, +Inf and -Inf masks of y and of every gradient equal the
    float64 reference's (the statistics make the whole group NaN), finite entries agree."""
    x, kw = make_inputs((2, 4, 6, 5), channels_last=channels_last, seed=8, device=device)
    compare_nonfinite(with_bad_values(x, values), kw, random_like(x, 9), backend, same_nonfinite_pattern)


@BACKENDS
@CL
@NONFINITE
def test_nonfinite_grad_y_gives_the_reference_nonfinite_set(backend, device, channels_last, values):
    """NaN/Inf in grad_y: the set of non-finite gradient entries equals the reference's
    and finite entries agree.  With an Inf in grad_y the kind may differ: the unfused
    GroupNorm backward subtracts infinite sums (Inf - Inf = NaN over the whole group),
    the fused formula scales them (+-Inf, NaN only where two infinite terms meet)."""
    x, kw = make_inputs((2, 4, 6, 5), channels_last=channels_last, seed=8, device=device)
    same_finite_set = lambda a, b: torch.equal(a.detach().cpu().isfinite(), b.detach().cpu().isfinite())
    compare_nonfinite(x, kw, with_bad_values(random_like(x, 9), values), backend, same_finite_set)


# ---------------------------------------------------------------------------------------
# Half precision: sums and squares beyond the half range.


@BACKENDS
@CL
def test_float16_sums_beyond_half_range(backend, device, channels_last):
    """float16 x ~ 3e4 +- 1e3 on 4 x 64 x 64 planes: group sums ~5e8 and squared
    deviations far beyond float16's 65504.  The kernels accumulate in float32, so the
    output is finite and, with res_scale = 0 (the mixer term alone, size ~1), within the
    float16 tolerance (4e-3 of max) of float64; with float32 parameters every gradient is
    finite and within 4e-3 of its max too."""
    x, kw = shifted_inputs((2, 4, 64, 64), 3e4, 1e3, device, channels_last, torch.float16, torch.float32)
    kw["res_scale"] = torch.zeros_like(kw["res_scale"])
    (y, grads), (y_ref, grads_ref) = run_both(x, kw, backend)
    assert y.isfinite().all()
    assert_close_to(y, y_ref, torch.float16)
    for name, grad in grads.items():
        assert grad.isfinite().all(), name
        assert_close_to(grad, grads_ref[name], torch.float16)


@BACKENDS
@CL
def test_bfloat16_sums_beyond_half_range(backend, device, channels_last):
    """bfloat16 x ~ 2e4 +- 5e2 on 4 x 64 x 64 planes (sums ~3e8, past float16's range;
    bfloat16 keeps 8 bits, so its own sums of 16 K values would be off by whole ulps of
    the sum).  Output finite and within the bfloat16 tolerance (2e-2 of max) of float64."""
    x, kw = shifted_inputs((2, 4, 64, 64), 2e4, 5e2, device, channels_last, torch.bfloat16)
    kw["res_scale"] = torch.zeros_like(kw["res_scale"])
    (y, grads), (y_ref, grads_ref) = run_both(x, kw, backend, wanted=("x", "weight"))
    assert y.isfinite().all()
    assert_close_to(y, y_ref, torch.bfloat16)
    for name, grad in grads.items():
        assert grad.isfinite().all(), name
        assert_close_to(grad, grads_ref[name], torch.bfloat16)

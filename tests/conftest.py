"""Shared test helpers: random inputs (never zeros), tolerances, the float64 reference."""

import os
import sys

import pytest
import torch

# Without CUDA the Triton kernels run through Triton's interpreter, which triton.jit
# selects when a kernel is defined: set it before anything imports the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

from fused_poolformer import reference  # noqa: E402

# Max-abs error allowed against the float64 reference, relative to max |ref| (plus atol).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}
OPTION_NAMES = ("weight", "bias", "layer_scale", "res_scale", "sample_scale")


def make_inputs(shape, dtype=torch.float32, channels_last=False, options=OPTION_NAMES, seed=0,
                device="cpu", param_dtype=None):
    """x ~ N(0.5, 1.3) and the named optional vectors, all random (never zeros or ones)."""
    g = torch.Generator().manual_seed(seed)
    n, c = shape[0], shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.3 + 0.5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pdt = param_dtype or dtype
    vec = lambda m, lo, hi: (torch.rand(m, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(pdt)
    params = {
        "weight": vec(c, 0.5, 1.5),
        "bias": vec(c, -0.5, 0.5),
        "layer_scale": vec(c, -1.0, 1.0),
        "res_scale": vec(c, 0.5, 1.5),
        "sample_scale": vec(n, 0.0, 2.0),
    }
    kw = {k: (params[k].to(device) if k in options else None) for k in OPTION_NAMES}
    return x.to(device), kw


def call(fn, x, kw, **opts):
    return fn(x, kw["weight"], kw["bias"], layer_scale=kw["layer_scale"], res_scale=kw["res_scale"],
              sample_scale=kw["sample_scale"], **opts)


def reference64(x, kw, **opts):
    """The unfused graph in float64 on the CPU."""
    kw64 = {k: (None if v is None else v.detach().double().cpu()) for k, v in kw.items()}
    return call(reference.pool_mixer, x.detach().double().cpu(), kw64, **opts)


def assert_close_to(actual, expected, dtype):
    tol = TOL[dtype]
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    scale = expected.abs().max().item() if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol["atol"] + tol["rtol"] * scale, f"max error {err:.3e} vs scale {scale:.3e} ({dtype})"


def opcheck_forward_and_backward(x, kw):
    """torch.library.opcheck on both C++ operators (whichever device x is on)."""
    args = (x, kw["weight"], kw["bias"], kw["layer_scale"], kw["res_scale"], kw["sample_scale"], 2, 3, 1e-5)
    x.requires_grad_(True)
    torch.library.opcheck(torch.ops.fused_poolformer.pool_mixer_forward.default, args)
    y, mean, rstd = torch.ops.fused_poolformer.pool_mixer_forward(*args)
    backward = torch.ops.fused_poolformer.pool_mixer_backward.default
    bargs = (torch.randn_like(y), x.detach(), mean, rstd, kw["weight"], kw["bias"], kw["layer_scale"], kw["res_scale"],
             kw["sample_scale"], 2, 3, 1e-5, [True, True, True, False, True])
    torch.library.opcheck(backward, bargs)
    # With inputs that require grad, the backward operator's own autograd (the
    # differentiable double-backward formula) is checked as well.
    grad_args = [t.detach().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) and i in (0, 1)
                 else t for i, t in enumerate(bargs)]
    torch.library.opcheck(backward, tuple(grad_args))


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

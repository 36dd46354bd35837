"""Helpers shared by the hardening tests (properties, numerics, determinism, memory,
concurrency): forward + backward of any pool_mixer implementation, and the backends to test."""

import torch

import fused_poolformer
from conftest import call

# The vectors that get a gradient (sample_scale is the drop-path constant: none flows to it).
DIFFERENTIABLE = ("weight", "bias", "layer_scale", "res_scale")


def fused_backends(device="cpu"):
    """Every backend that runs fused kernels on ``device`` in this process (new ones are
    picked up as they are built)."""
    # The Triton interpreter is too slow for these sweeps; tests/test_triton.py covers
    # the Triton kernels on the CPU.
    skip = ("reference", "triton") if torch.device(device).type == "cpu" else ("reference",)
    return [b for b in fused_poolformer.available_backends(device) if b not in skip]


def forward_backward(fn, x, kw, grad_y, wanted=("x",) + DIFFERENTIABLE, **opts):
    """y = fn(x, **kw, **opts) and the gradients of <y, grad_y> w.r.t. x and every given
    vector named in ``wanted``, as a dict {"x": ..., "weight": ..., ...}."""
    x = x.detach().requires_grad_("x" in wanted)
    kw = {k: (None if v is None else v.detach().requires_grad_(k in wanted and k in DIFFERENTIABLE))
          for k, v in kw.items()}
    y = call(fn, x, kw, **opts)
    leaves = {k: v for k, v in {"x": x, **kw}.items() if v is not None and v.requires_grad}
    if not leaves:
        return y.detach(), {}
    grads = torch.autograd.grad(y, list(leaves.values()), grad_y)
    return y.detach(), dict(zip(leaves, grads))


def reference_forward_backward(x, kw, grad_y, wanted=("x",) + DIFFERENTIABLE, **opts):
    """forward_backward of the unfused graph in float64 on the CPU."""
    as64 = lambda t: None if t is None else t.detach().double().cpu()
    return forward_backward(fused_poolformer.reference.pool_mixer, as64(x), {k: as64(v) for k, v in kw.items()},
                            as64(grad_y), wanted, **opts)


def random_like(x, seed):
    """A random tensor of x's shape, dtype and device (a grad_y that is never all ones)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype).to(x.device)


__all__ = ["DIFFERENTIABLE", "forward_backward", "fused_backends", "random_like",
           "reference_forward_backward"]

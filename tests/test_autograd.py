"""Autograd of the fused operators: first and second derivatives against the unfused graph,
opcheck of both operators with inputs that require grad, and the backward's output mask.

The C++ operators' autograd lives in csrc/autograd.cpp (a torch::autograd::Function at the
Autograd key); the Triton operators' in fused_poolformer/contract.py.
"""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import fused_poolformer as fp
from conftest import call, make_inputs, opcheck_forward_and_backward
from fused_poolformer import ops
from hardening_utils import fused_backends

CPU_FUSED = fused_backends("cpu")
# The Triton interpreter is too slow for gradgradcheck's many calls; one double backward is fine.
WITH_TRITON = CPU_FUSED + (["triton"] if ops.triton_interpreted() else [])
GRAD_NAMES = ("weight", "bias", "layer_scale", "res_scale")


def leaves(shape, channels_last, options, dtype=torch.float64, seed=0):
    x, kw = make_inputs(shape, dtype, channels_last, options=options, seed=seed)
    x.requires_grad_(True)
    for name in GRAD_NAMES:
        if kw[name] is not None:
            kw[name].requires_grad_(True)
    return x, kw


def mixer(backend, kw, **opts):
    def f(x, *params):
        named = dict(zip([n for n in GRAD_NAMES if kw[n] is not None], params))
        return fp.pool_mixer(x, named.get("weight"), named.get("bias"), layer_scale=named.get("layer_scale"),
                             res_scale=named.get("res_scale"), sample_scale=kw["sample_scale"], backend=backend,
                             **opts)

    return f


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("options", [("weight", "bias", "layer_scale", "res_scale", "sample_scale"), ("weight",), ()],
                         ids=["all_vectors", "weight_only", "no_vectors"])
def test_gradgradcheck_float64(backend, channels_last, options):
    """Second derivatives are exact (G > 1, every optional vector present or absent)."""
    x, kw = leaves((2, 4, 5, 6), channels_last, options)
    f = mixer(backend, kw, num_groups=2, pool_size=3)
    inputs = (x, *[kw[n] for n in GRAD_NAMES if kw[n] is not None])
    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("backend", WITH_TRITON)
def test_double_backward_matches_unfused_graph(backend):
    """The issue's own example: d/dx of |d(sum y^2)/dx|^2, which used to come back as zeros."""
    x, kw = leaves((2, 6, 7, 5), False, ("weight", "bias", "layer_scale", "sample_scale"), seed=3)

    def second(fn):
        y = call(fn, x, kw, num_groups=3, pool_size=5)
        (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), [x, kw["weight"], kw["layer_scale"]])

    fused = second(lambda *a, **k: fp.pool_mixer(*a, backend=backend, **k))
    unfused = second(fp.reference.pool_mixer)
    for a, b in zip(fused, unfused):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif("cpu" not in CPU_FUSED, reason="the CPU kernels were not built")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_opcheck_both_operators_with_and_without_grad(channels_last):
    x, kw = make_inputs((2, 4, 5, 6), torch.float32, channels_last)
    opcheck_forward_and_backward(x, kw)


@pytest.mark.skipif("cpu" not in CPU_FUSED, reason="the CPU kernels were not built")
def test_backward_operator_returns_only_requested_gradients():
    """Unrequested gradients are not computed (None); the bias gradient is exact zeros."""
    x, kw = make_inputs((2, 4, 5, 6), torch.float32)
    args = (x, kw["weight"], kw["bias"], kw["layer_scale"], kw["res_scale"], kw["sample_scale"], 2, 3, 1e-5)
    y, mean, rstd = torch.ops.fused_poolformer.pool_mixer_forward(*args)
    common = (torch.randn_like(y), x, mean, rstd, kw["weight"], kw["bias"], kw["layer_scale"], kw["res_scale"],
              kw["sample_scale"], 2, 3, 1e-5)
    full = torch.ops.fused_poolformer.pool_mixer_backward(*common, [True] * 5)
    part = torch.ops.fused_poolformer.pool_mixer_backward(*common, [False, True, True, False, False])
    assert part[0] is None and part[3] is None and part[4] is None
    assert torch.equal(part[1], full[1])
    assert torch.equal(part[2], torch.zeros(4)) and torch.equal(full[2], torch.zeros(4))


@pytest.mark.skipif("cpu" not in CPU_FUSED, reason="the CPU kernels were not built")
def test_statistics_are_not_differentiable_and_their_gradients_never_materialised():
    x, kw = leaves((2, 4, 5, 6), False, ("weight",), dtype=torch.float32)
    y, mean, rstd = torch.ops.fused_poolformer.pool_mixer_forward(x, kw["weight"], None, None, None, None, 2, 3, 1e-5)
    assert y.requires_grad and not mean.requires_grad and not rstd.requires_grad


@pytest.mark.skipif("cpu" not in CPU_FUSED, reason="the CPU kernels were not built")
def test_gradient_only_for_the_inputs_asked_for():
    """autograd.grad(y, x) does not compute the parameter gradients (needs_input_grad)."""
    x, kw = leaves((2, 4, 5, 6), False, ("weight", "layer_scale"), dtype=torch.float32)
    y = call(fp.pool_mixer, x, kw)
    with torch.profiler.profile() as prof:
        torch.autograd.grad(y, x, torch.ones_like(y))
    empties = [e for e in prof.events() if e.name == "aten::empty"]
    assert len(empties) == 1, [e.name for e in prof.events()]  # grad_x only


@pytest.mark.skipif(not ops.triton_interpreted(), reason="the Triton kernels are not interpreted on the CPU here")
def test_triton_operator_called_directly_has_autograd():
    """Importing the Triton backend registers its autograd (not only pool_mixer's path)."""
    x, kw = leaves((2, 4, 5, 6), False, ("weight", "layer_scale"))
    forward = ops.triton_operators()[0]
    y = forward(x, kw["weight"], None, kw["layer_scale"], None, None, 2, 3, 1e-5)[0]
    grads = torch.autograd.grad(y.pow(2).sum(), [x, kw["weight"], kw["layer_scale"]])
    ref = fp.reference.pool_mixer(x, kw["weight"], layer_scale=kw["layer_scale"], num_groups=2)
    expected = torch.autograd.grad(ref.pow(2).sum(), [x, kw["weight"], kw["layer_scale"]])
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)

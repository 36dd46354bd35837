"""torch.compile(fullgraph=True) through pool_mixer: no graph break, the same forward and
gradient as eager (the C++ operators have fake kernels and C++ autograd).  The Triton
operators' torch.compile test is in test_triton.py; the modules' in test_modules.py."""

import pytest
import torch

import fused_poolformer as fp
from helpers import CPP_BACKENDS, make_inputs

# "auto" takes pool_mixer's shortcut straight into C++ (on CPU tensors, as picked here).
BACKENDS = [pytest.param("auto", id="auto")] + CPP_BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend, device):
    x, kw = make_inputs((2, 8, 7, 7), torch.float32, device=device)

    def f(x, w, b, ls):
        return fp.pool_mixer(x, w, b, layer_scale=ls, backend=backend) * 2.0

    args = (x, kw["weight"], kw["bias"], kw["layer_scale"])
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(*args), f(*args), rtol=0, atol=0)
    xs = x.clone().requires_grad_()
    compiled(xs, *args[1:]).sum().backward()
    xe = x.clone().requires_grad_()
    f(xe, *args[1:]).sum().backward()
    torch.testing.assert_close(xs.grad, xe.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_autograd_matches_eager(backend, device):
    """Compiled autograd traces the C++ autograd node (PoolMixerBackward implements
    compiled_args and apply_with_saved): the same gradients as eager."""
    x, kw = make_inputs((2, 8, 7, 7), torch.float32, device=device)
    w, ls = kw["weight"].requires_grad_(), kw["layer_scale"].requires_grad_()

    def step(x):
        fp.pool_mixer(x, w, None, layer_scale=ls, backend=backend).pow(2).sum().backward()

    xe = x.clone().requires_grad_()
    step(xe)
    eager = [t.grad.clone() for t in (xe, w, ls)]
    w.grad = ls.grad = None
    xc = x.clone().requires_grad_()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(compiled_autograd=True):
        torch.compile(step)(xc)
    for got, want in zip((xc.grad, w.grad, ls.grad), eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

"""Autograd of the fused operators: first and second derivatives against the unfused graph
(gradcheck, gradgradcheck in float64), opcheck of both operators with and without inputs
that require grad, the backward's output mask, and which inputs get a gradient.

The C++ operators' autograd lives in csrc/autograd.cpp (a hand-written autograd node,
PoolMixerBackward, recorded by the Autograd kernel); the Triton operators' in
fused_poolformer/contract.py.
"""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import fused_poolformer as fp
from fused_poolformer import ops
from helpers import (CPP_BACKENDS, CPU_KERNELS, DIFFERENTIABLE, FUSED, FUSED_OR_INTERPRETED, OPTION_NAMES,
                     backend_params, call, make_inputs, opcheck_forward_and_backward, random_like, with_backend)

CL = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])


def leaves(shape, channels_last, options, dtype=torch.float64, seed=0, device="cpu"):
    x, kw = make_inputs(shape, dtype, channels_last, options=options, seed=seed, device=device)
    x.requires_grad_(True)
    for name in DIFFERENTIABLE:
        if kw[name] is not None:
            kw[name].requires_grad_(True)
    return x, kw


def mixer(backend, kw, **opts):
    """pool_mixer as a function of x and the present differentiable vectors."""
    def f(x, *params):
        named = dict(zip([n for n in DIFFERENTIABLE if kw[n] is not None], params))
        return fp.pool_mixer(x, named.get("weight"), named.get("bias"), layer_scale=named.get("layer_scale"),
                             res_scale=named.get("res_scale"), sample_scale=kw["sample_scale"], backend=backend,
                             **opts)

    return f


@pytest.mark.parametrize("backend", FUSED)
@CL
@pytest.mark.parametrize("num_groups,pool_size,shape", [(1, 3, (2, 4, 5, 6)), (2, 3, (2, 4, 5, 6)),
                                                        (2, 5, (2, 4, 3, 7)), (4, 3, (1, 8, 4, 4))])
def test_gradcheck_float64(backend, device, channels_last, num_groups, pool_size, shape):
    x, kw = leaves(shape, channels_last, OPTION_NAMES, device=device)
    f = mixer(backend, kw, num_groups=num_groups, pool_size=pool_size)
    assert gradcheck(f, (x, *[kw[n] for n in DIFFERENTIABLE]), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
@CL
@pytest.mark.parametrize("options", [("weight", "bias", "layer_scale", "res_scale", "sample_scale"), ("weight",), ()],
                         ids=["all_vectors", "weight_only", "no_vectors"])
def test_gradgradcheck_float64(backend, device, channels_last, options):
    """Second derivatives are exact (G > 1, every optional vector present or absent)."""
    x, kw = leaves((2, 4, 5, 6), channels_last, options, device=device)
    f = mixer(backend, kw, num_groups=2, pool_size=3)
    inputs = (x, *[kw[n] for n in DIFFERENTIABLE if kw[n] is not None])
    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("backend", FUSED_OR_INTERPRETED)
def test_double_backward_matches_unfused_graph(backend, device):
    """d/dx of |d(sum y^2)/dx|^2, which used to come back as zeros."""
    x, kw = leaves((2, 6, 7, 5), False, ("weight", "bias", "layer_scale", "sample_scale"), seed=3, device=device)

    def second(fn):
        y = call(fn, x, kw, num_groups=3, pool_size=5)
        (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), [x, kw["weight"], kw["layer_scale"]])

    fused = second(with_backend(backend))
    unfused = second(fp.reference.pool_mixer)
    for a, b in zip(fused, unfused):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPP_BACKENDS)
@CL
def test_opcheck_both_operators_with_and_without_grad(backend, device, channels_last):
    x, kw = make_inputs((2, 4, 5, 6), torch.float32, channels_last, device=device)
    opcheck_forward_and_backward(x, kw, backend)


@pytest.mark.parametrize("backend", CPP_BACKENDS)
def test_backward_operator_returns_only_requested_gradients(backend, device):
    """Unrequested gradients are not computed (None); the bias gradient is exact zeros."""
    x, kw = make_inputs((2, 4, 5, 6), torch.float32, device=device)
    args = (x, kw["weight"], kw["bias"], kw["layer_scale"], kw["res_scale"], kw["sample_scale"], 2, 3, 1e-5)
    y, mean, rstd = torch.ops.fused_poolformer.pool_mixer_forward(*args)
    common = (random_like(y, 5), x, mean, rstd, kw["weight"], kw["bias"], kw["layer_scale"], kw["res_scale"],
              kw["sample_scale"], 2, 3, 1e-5)
    full = torch.ops.fused_poolformer.pool_mixer_backward(*common, [True] * 5)
    part = torch.ops.fused_poolformer.pool_mixer_backward(*common, [False, True, True, False, False])
    assert part[0] is None and part[3] is None and part[4] is None
    # Same value; not always the same bits: the CPU sums pass that also folds x * dy (for
    # the res_scale gradient) is a separately compiled variant, whose FMA contraction the
    # compiler may choose differently.  A channel's sum can cancel to a small value, so the
    # rounding is measured against the largest gradient, not each element's own size.
    torch.testing.assert_close(part[1], full[1], rtol=1e-6, atol=1e-5 * full[1].abs().max().item())
    zeros = torch.zeros(4, device=device)
    assert torch.equal(part[2], zeros) and torch.equal(full[2], zeros)


@pytest.mark.parametrize("backend", CPP_BACKENDS)
def test_statistics_are_not_differentiable(backend, device):
    x, kw = leaves((2, 4, 5, 6), False, ("weight",), dtype=torch.float32, device=device)
    y, mean, rstd = torch.ops.fused_poolformer.pool_mixer_forward(x, kw["weight"], None, None, None, None, 2, 3, 1e-5)
    assert y.requires_grad and not mean.requires_grad and not rstd.requires_grad


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_gradient_only_for_the_inputs_asked_for(backend):
    """autograd.grad(y, x) does not compute the parameter gradients (needs_input_grad):
    the CPU backward allocates grad_x and nothing else."""
    x, kw = leaves((2, 4, 5, 6), False, ("weight", "layer_scale"), dtype=torch.float32)
    y = call(with_backend(backend), x, kw)
    with torch.profiler.profile() as prof:
        torch.autograd.grad(y, x, torch.ones_like(y))
    empties = [e for e in prof.events() if e.name == "aten::empty"]
    assert len(empties) == 1, [e.name for e in prof.events()]  # grad_x only


@pytest.mark.parametrize("backend", FUSED_OR_INTERPRETED)
def test_bias_gradient_is_exact_zeros(backend, device):
    """Through y.sum().backward() (an expanded, stride-0 grad_y)."""
    x, kw = make_inputs((2, 4, 5, 5), torch.float32, device=device)
    kw["bias"].requires_grad_(True)
    call(with_backend(backend), x, kw).sum().backward()
    assert kw["bias"].grad is not None and torch.equal(kw["bias"].grad, torch.zeros(4, device=device))


@pytest.mark.parametrize("backend", FUSED_OR_INTERPRETED)
def test_sample_scale_gets_no_gradient(backend, device):
    x, kw = make_inputs((3, 4, 5, 5), torch.float64, device=device)
    kw["sample_scale"].requires_grad_(True)
    x.requires_grad_(True)
    call(with_backend(backend), x, kw).sum().backward()
    assert kw["sample_scale"].grad is None and x.grad is not None


@pytest.mark.parametrize("backend", backend_params("triton", interpreted_triton=True))
def test_triton_operator_called_directly_has_autograd(backend, device):
    """Importing the Triton backend registers its autograd (not only pool_mixer's path)."""
    x, kw = leaves((2, 4, 5, 6), False, ("weight", "layer_scale"), device=device)
    forward = ops.forward_operator(backend)
    y = forward(x, kw["weight"], None, kw["layer_scale"], None, None, 2, 3, 1e-5)[0]
    grads = torch.autograd.grad(y.pow(2).sum(), [x, kw["weight"], kw["layer_scale"]])
    ref = fp.reference.pool_mixer(x, kw["weight"], layer_scale=kw["layer_scale"], num_groups=2)
    expected = torch.autograd.grad(ref.pow(2).sum(), [x, kw["weight"], kw["layer_scale"]])
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------------------
# The C++ autograd node behaves as autograd's own nodes do.


@pytest.mark.parametrize("backend", CPP_BACKENDS)
def test_node_records_one_edge_per_tensor_argument(backend, device):
    x, kw = leaves((2, 4, 5, 5), False, ("weight", "layer_scale"), device=device)
    y = fp.pool_mixer(x, kw["weight"], layer_scale=kw["layer_scale"], backend=backend)
    assert y.grad_fn.name() == "PoolMixerBackward"
    # x, weight, bias, layer_scale, res_scale, sample_scale; absent ones have no edge.
    edges = [fn is not None for fn, _ in y.grad_fn.next_functions]
    assert edges == [True, True, False, True, False, False]
    with torch.no_grad():
        assert fp.pool_mixer(x, kw["weight"], backend=backend).grad_fn is None


@pytest.mark.parametrize("backend", CPP_BACKENDS)
def test_second_backward_without_retain_graph_raises(backend, device):
    x, kw = leaves((2, 4, 5, 5), False, ("weight",), device=device)
    y = fp.pool_mixer(x, kw["weight"], backend=backend)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()


@pytest.mark.parametrize("backend", CPP_BACKENDS)
def test_retain_graph_gives_the_same_gradient_twice(backend, device):
    x, kw = leaves((2, 4, 5, 5), False, ("weight", "layer_scale"), device=device)
    y = fp.pool_mixer(x, kw["weight"], layer_scale=kw["layer_scale"], backend=backend)
    grad_y = torch.randn_like(y)
    first = torch.autograd.grad(y, [x, kw["weight"]], grad_y, retain_graph=True)
    second = torch.autograd.grad(y, [x, kw["weight"]], grad_y)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPP_BACKENDS)
def test_in_place_change_of_a_saved_input_is_detected(backend, device):
    x, kw = leaves((2, 4, 5, 5), False, ("weight",), device=device)
    h = x * 1.0  # a non-leaf that can be modified in place
    y = fp.pool_mixer(h, kw["weight"], backend=backend)
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("backend", CPP_BACKENDS)
def test_forward_mode_ad_is_refused_not_dropped(backend, device):
    import torch.autograd.forward_ad as fwAD

    x, kw = make_inputs((2, 4, 5, 5), torch.float64, device=device)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            fp.pool_mixer(dual, kw["weight"], backend=backend)


@pytest.mark.parametrize("backend", CPP_BACKENDS)
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["hooks", "reentrant"])
def test_activation_checkpointing_gives_the_same_gradients(backend, device, use_reentrant):
    """torch.utils.checkpoint (timm's set_grad_checkpointing): the non-reentrant form packs
    the node's saved tensors through saved-tensor hooks, the reentrant one reruns the forward
    inside the backward."""
    from torch.utils.checkpoint import checkpoint

    x, kw = leaves((2, 4, 5, 5), False, ("weight", "bias", "layer_scale"), device=device)

    def block(h):
        return fp.pool_mixer(h * 1.5, kw["weight"], kw["bias"], layer_scale=kw["layer_scale"], num_groups=2,
                             backend=backend).tanh()

    grad_y = torch.randn_like(x)
    leaves_ = [x, kw["weight"], kw["bias"], kw["layer_scale"]]

    def gradients(y):  # through .backward(): the reentrant form does not support .grad()
        y.backward(grad_y)
        out = [t.grad for t in leaves_]
        for t in leaves_:
            t.grad = None
        return out

    plain = gradients(block(x))
    checkpointed = gradients(checkpoint(block, x, use_reentrant=use_reentrant))
    for a, b in zip(checkpointed, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

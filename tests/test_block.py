"""The whole-block operators (``poolformer_block``, docs/block.md): against the unfused graph
in float64, every gradient, gradcheck / gradgradcheck, opcheck, torch.compile / export, what
the backward saves, numerics at large means, argument errors; then the block-level modules
and ``convert_model(fuse="block")`` on timm and the official models."""

import pytest
import torch
import torch.nn.functional as F

from helpers import HAS_CUDA_DEVICE, backend_params, device_of

import fused_poolformer
from fused_poolformer import backends, block_contract, reference

BLOCK_BACKENDS = backend_params(*[b.name for b in backends.all_backends()
                                  if b.fused and b.serves(device_of(b.name)) and b.has_family("block")]
                                + (["cuda"] if not HAS_CUDA_DEVICE else []), interpreted_triton=True)
VECTORS = ("norm1_weight", "norm1_bias", "layer_scale1", "res_scale1", "norm2_weight", "norm2_bias", "fc1_bias",
           "fc2_bias", "layer_scale2", "res_scale2")


def block_arguments(n=2, c=8, hidden=24, dtype=torch.float64, device="cpu", activation="gelu", absent=(),
                    generator=None, requires_grad=True):
    """Random arguments (never zeros) of a block, keyed by the operator's names; ``absent``
    names the optional ones left out."""
    g = generator or torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0, offset=0.0):
        t = (offset + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype=dtype, device=device)
        return t.requires_grad_(requires_grad)

    args = dict(
        norm1_weight=rand(c, offset=1.0, scale=0.3), norm1_bias=rand(c, scale=0.3),
        layer_scale1=rand(c, scale=0.5), res_scale1=rand(c, offset=1.0, scale=0.2),
        sample_scale1=(torch.rand(n, generator=g, dtype=torch.float64) + 0.5).to(dtype=dtype, device=device),
        norm2_weight=rand(c, offset=1.0, scale=0.3), norm2_bias=rand(c, scale=0.3),
        fc1_weight=rand(hidden, c, scale=c ** -0.5), fc1_bias=rand(hidden, scale=0.2),
        fc2_weight=rand(c, hidden, scale=hidden ** -0.5), fc2_bias=rand(c, scale=0.2),
        layer_scale2=rand(c, scale=0.5), res_scale2=rand(c, offset=1.0, scale=0.2),
        sample_scale2=(torch.rand(n, generator=g, dtype=torch.float64) + 0.5).to(dtype=dtype, device=device),
        activation=activation,
    )
    if activation == "star_relu":
        args.update(act_scale=rand(1, offset=0.9, scale=0.1), act_bias=rand(1, scale=0.1))
    for name in absent:
        args[name] = None
    return args


def reference_block(x, args):
    kwargs = dict(args)
    kwargs["activation_kind"] = kwargs.pop("activation", "gelu")
    return reference.poolformer_block(x, **kwargs)


def differentiable(x, args):
    return [x] + [v for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]


def random_x(n=2, c=8, h=5, w=6, dtype=torch.float64, device="cpu", channels_last=False, seed=1, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (offset + torch.randn(n, c, h, w, generator=g, dtype=torch.float64)).to(dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


# ---------------------------------------------------------------------------------------
# The operator against the unfused graph.


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
@pytest.mark.parametrize("case", [
    dict(),
    dict(activation="gelu_tanh", channels_last=True),
    dict(activation="star_relu"),
    dict(activation="star_relu", absent=("fc1_bias", "fc2_bias", "layer_scale2", "norm1_bias"), channels_last=True),
    dict(absent=("res_scale1", "res_scale2", "sample_scale1", "sample_scale2", "norm2_weight", "norm2_bias",
                 "layer_scale1")),
    dict(save_hidden=False, groups=2, pool_size=5),
], ids=["gelu", "gelu_tanh-cl", "star_relu", "star_relu-sparse-cl", "no-vectors", "recompute-g2-k5"])
def test_matches_the_unfused_graph_in_float64(backend, case):
    device = device_of(backend)
    case = dict(case)
    channels_last = case.pop("channels_last", False)
    save_hidden = case.pop("save_hidden", True)
    groups, pool_size = case.pop("groups", 1), case.pop("pool_size", 3)
    args = block_arguments(device=device, **case)
    args.update(num_groups1=groups, pool_size=pool_size)
    x = random_x(device=device, channels_last=channels_last)
    out = fused_poolformer.poolformer_block(x, **args, save_hidden=save_hidden, backend=backend)
    expected = reference_block(x, args)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(out)
    inputs = differentiable(x, args)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad)
    for name, a, b in zip(["x"] + [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad],
                          got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"gradient of {name}: {m}")


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "star_relu"])
def test_gradcheck_and_gradgradcheck(backend, activation):
    """Second derivatives: exact on the C++ family; a clear error on Triton's (below)."""
    if backend == "triton":
        pytest.skip("double backward is refused on the triton backend (test_triton_double_backward_is_refused)")
    device = device_of(backend)
    args = block_arguments(n=2, c=4, hidden=6, device=device, activation=activation)
    x = random_x(n=2, c=4, h=4, w=3, device=device)
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    fixed = {k: v for k, v in args.items() if k not in names}

    def block(x, *params):
        return fused_poolformer.poolformer_block(x, **fixed, **dict(zip(names, params)), backend=backend)

    inputs = [x] + [args[k] for k in names]
    assert torch.autograd.gradcheck(block, inputs, eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(block, inputs, eps=1e-6, atol=1e-5)


def _op_args(x, args, save_hidden=True):
    named = dict(args)
    return (x, *[named.get(name, block_contract_default(name)) for name in block_contract.FORWARD_ARGUMENTS],
            save_hidden)


def block_contract_default(name):
    return {"num_groups1": 1, "pool_size": 3, "eps1": 1e-5, "eps2": 1e-5, "activation": "gelu"}.get(name)


@pytest.mark.parametrize("backend", [p for p in BLOCK_BACKENDS if p.values[0] != "reference"])
def test_opcheck(backend):
    device = device_of(backend)
    forward, backward = backends.get(backend).operators("block")
    for activation, save_hidden in (("gelu", True), ("star_relu", False)):
        args = block_arguments(device=device, activation=activation, dtype=torch.float32)
        x = random_x(device=device, dtype=torch.float32, channels_last=save_hidden)
        torch.library.opcheck(forward, _op_args(x, args, save_hidden))
        out, hidden, mean1, rstd1, mean2, rstd2 = forward(*_op_args(x.detach(), args, save_hidden))
        if backend == "triton":  # no double backward there: its backward takes constants
            args = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        forward_args = _op_args(x.detach(), args)[1:-1]
        torch.library.opcheck(backward, (torch.randn_like(out), x.detach(), hidden, mean1, rstd1, mean2, rstd2,
                                         *forward_args, [True] * 15))


def test_compile_fullgraph_and_export():
    args = block_arguments(dtype=torch.float32)
    x = random_x(dtype=torch.float32)

    def block(x):
        return fused_poolformer.poolformer_block(x, **args)

    expected = block(x)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected)
    grads = torch.autograd.grad(compiled(x).square().sum(), [x, args["fc1_weight"]])
    want = torch.autograd.grad(expected.square().sum(), [x, args["fc1_weight"]])
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)

    constants = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}

    class Block(torch.nn.Module):
        def forward(self, x):
            return fused_poolformer.poolformer_block(x, **constants)

    exported = torch.export.export(Block(), (x.detach(),))
    assert any("block_forward" in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x.detach()), expected.detach())


# ---------------------------------------------------------------------------------------
# Memory: what the backward keeps.


def _saved_storages(fn):
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("save_hidden", [True, False])
def test_the_backward_saves_x_hidden_and_the_statistics_only(save_hidden):
    args = block_arguments(dtype=torch.float32, hidden=32)
    x = random_x(dtype=torch.float32, h=7, w=7)
    out, saved = _saved_storages(lambda: fused_poolformer.poolformer_block(x, **args, save_hidden=save_hidden))
    params = {v.untyped_storage().data_ptr() for v in args.values() if isinstance(v, torch.Tensor)}
    activations = [t for ptr, t in saved.items() if ptr not in params and ptr != x.untyped_storage().data_ptr()]
    shapes = sorted(tuple(t.shape) for t in activations if t.numel() > 0)
    want = [(2, 1), (2, 1), (2, 1), (2, 1)] + ([(2, 32, 7, 7)] if save_hidden else [])
    assert shapes == sorted(want)
    assert x.untyped_storage().data_ptr() in saved
    out.sum().backward()  # and the backward runs from them
    assert args["fc1_weight"].grad is not None


# ---------------------------------------------------------------------------------------
# Numerics: large means (Norm2's input x1 ~ x), float32 and bfloat16.


def _unfused_hidden(x, args, dtype):
    x1 = reference.pool_mixer(x, args["norm1_weight"], args["norm1_bias"], layer_scale=args["layer_scale1"],
                              res_scale=args["res_scale1"], sample_scale=args["sample_scale1"])
    u = F.group_norm(x1, 1, args["norm2_weight"].to(dtype), args["norm2_bias"].to(dtype), 1e-5)
    return F.conv2d(u, args["fc1_weight"].to(dtype)[..., None, None], args["fc1_bias"].to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 10.0, 1e3])
def test_large_mean_within_twice_the_unfused_error(dtype, offset):
    args64 = block_arguments(c=16, hidden=64, requires_grad=False)
    x64 = random_x(c=16, h=8, w=8, offset=offset).detach()
    args = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in args64.items()}
    x = x64.to(dtype)
    exact_hidden = _unfused_hidden(x.double(), {k: (v.double() if isinstance(v, torch.Tensor) else v)
                                                for k, v in args.items()}, torch.float64)
    exact_out = reference_block(x.double(), {k: (v.double() if isinstance(v, torch.Tensor) else v)
                                             for k, v in args.items()})
    forward = backends.get("cpu").operators("block")[0] if backends.get("cpu").serves("cpu") else None
    if forward is None:
        pytest.skip("the C++ CPU kernels were not built")
    out, hidden = forward(*_op_args(x, args))[:2]
    unfused_hidden = _unfused_hidden(x, args, dtype)
    unfused_out = reference_block(x, args)

    def err(a, b):
        return (a.double() - b).abs().max().item() / b.abs().max().item()

    assert err(hidden, exact_hidden) <= 2 * err(unfused_hidden, exact_hidden) + 1e-7
    assert err(out, exact_out) <= 2 * err(unfused_out, exact_out) + 1e-7


# ---------------------------------------------------------------------------------------
# Argument errors name the argument, in C++ and in Python alike.


@pytest.mark.parametrize("backend", [p for p in BLOCK_BACKENDS if p.values[0] in ("cpu", "reference")])
@pytest.mark.parametrize("change, error, match", [
    (dict(fc1_weight=torch.randn(24, 7)), ValueError, r"fc1_weight must have shape \(hidden, 8\)"),
    (dict(fc2_weight=torch.randn(8, 23)), ValueError, r"fc2_weight must have shape \(8, 24\)"),
    (dict(activation="relu"), ValueError, "activation must be one of"),
    (dict(act_scale=torch.ones(1)), ValueError, "act_scale is given but activation 'gelu' takes none"),
    (dict(eps2=-1.0), ValueError, "eps2 must be a finite number > 0"),
    (dict(norm1_weight=torch.ones(7)), ValueError, r"norm1_weight must have shape \(C,\)"),
    (dict(layer_scale2=torch.ones(7)), ValueError, r"layer_scale2 must have shape \(C,\)"),
    (dict(num_groups1=3), ValueError, r"num_groups1 \(3\) must divide"),
    (dict(sample_scale2=torch.ones(3)), ValueError, r"sample_scale2 must have shape \(N,\)"),
    (dict(fc1_bias=torch.ones(24, dtype=torch.float64)), TypeError, "fc1_bias has dtype torch.float64"),
    (dict(gemm_dtype=torch.float64), TypeError, "gemm_dtype torch.float64 cannot serve"),
])
def test_bad_arguments_are_named(backend, change, error, match):
    args = block_arguments(dtype=torch.float32, requires_grad=False)
    args.update(change)
    x = random_x(dtype=torch.float32).detach()
    with pytest.raises(error, match="poolformer_block: " + match):
        fused_poolformer.poolformer_block(x, **args, backend=backend)


@pytest.fixture
def mixer_only_backend():
    """A backend with the mixer's operators and no block ones (the reference mixer)."""
    reference_backend = backends.get("reference")
    backends.register_backend(backends.Backend(
        name="mixer-only", devices=("cpu",), summary="test", unavailable_reason=lambda device: None,
        load_operators=lambda: {"pool_mixer": reference_backend.operators("pool_mixer")}, checks_in_python=True,
        fused=False))
    yield "mixer-only"
    backends.unregister_backend("mixer-only")


def test_a_backend_without_block_operators_is_refused_by_name(mixer_only_backend):
    args = block_arguments(dtype=torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="backend='mixer-only' has no block operators"):
        fused_poolformer.poolformer_block(random_x(dtype=torch.float32), **args, backend=mixer_only_backend)


@pytest.mark.parametrize("backend", [p for p in BLOCK_BACKENDS if p.values[0] == "triton"])
def test_triton_double_backward_is_refused(backend):
    args = block_arguments(n=2, c=4, hidden=6, device=device_of(backend))
    x = random_x(n=2, c=4, h=4, w=3, device=device_of(backend))
    out = fused_poolformer.poolformer_block(x, **args, backend=backend)
    with pytest.raises(NotImplementedError, match="double backward .* not supported on the triton backend"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)


# ---------------------------------------------------------------------------------------
# Inference on the CPU: the activation and the residual ride in oneDNN's fused convolutions.


@pytest.mark.skipif(not backends.get("cpu").serves("cpu"), reason="the C++ CPU kernels were not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_fuses_the_activation_and_the_residual_into_the_gemms(dtype, activation, channels_last):
    from torch.profiler import profile

    args = block_arguments(c=16, hidden=40, dtype=dtype, activation=activation, requires_grad=False,
                           absent=("res_scale2", "sample_scale2"))
    x = random_x(c=16, h=6, w=7, dtype=dtype, channels_last=channels_last).detach()
    with profile() as prof:
        out = fused_poolformer.poolformer_block(x, **args, save_hidden=False, backend="cpu")
    names = [event.name for event in prof.events()]
    if torch.backends.mkldnn.is_available():
        assert names.count("mkldnn::_convolution_pointwise") == 2, names
    exact = reference_block(x.double(), {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in args.items()})
    unfused = reference_block(x, args)
    err = (out.double() - exact).abs().max().item()
    assert err <= 2 * (unfused.double() - exact).abs().max().item() + 1e-6
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    saved_path = fused_poolformer.poolformer_block(x, **args, save_hidden=True, backend="cpu")
    torch.testing.assert_close(out, saved_path, rtol=0, atol=4 * err + 1e-6)


# ---------------------------------------------------------------------------------------
# Norm2's statistics come from the mixer's apply pass on the CPU (x1 is not read again).


@pytest.mark.skipif(not backends.get("cpu").serves("cpu"), reason="the C++ CPU kernels were not built")
@pytest.mark.parametrize("shape, channels_last", [((2, 16, 8, 8), False), ((2, 8, 72, 72), False),
                                                  ((3, 24, 9, 11), True), ((1, 64, 56, 56), True)])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_norm2_statistics_from_the_mixer_are_as_precise_as_group_norm(shape, channels_last, offset):
    n, c, h, w = shape
    args = block_arguments(n=n, c=c, hidden=8, dtype=torch.float32, requires_grad=False)
    x = random_x(n=n, c=c, h=h, w=w, dtype=torch.float32, channels_last=channels_last, offset=offset).detach()
    forward = backends.get("cpu").operators("block")[0]
    _, _, mean1, _, mean2, rstd2 = forward(*_op_args(x, args))
    x1 = reference.pool_mixer(x, args["norm1_weight"], args["norm1_bias"], layer_scale=args["layer_scale1"],
                              res_scale=args["res_scale1"], sample_scale=args["sample_scale1"])
    exact = x1.double().reshape(n, -1)
    exact_mean, exact_rstd = exact.mean(1, keepdim=True), (exact.var(1, unbiased=False, keepdim=True) + 1e-5).rsqrt()
    _, aten_mean, aten_rstd = torch.ops.aten.native_group_norm(x1, None, None, n, c, h * w, 1, 1e-5)
    # Errors in units of what they change: the mean's in standard deviations, rstd's relative.
    for ours, aten, want, unit in ((mean2, aten_mean, exact_mean, exact_rstd), (rstd2, aten_rstd, exact_rstd,
                                                                               1 / exact_rstd)):
        assert ours.dtype == torch.float32 and ours.shape == (n, 1)
        ours_err = ((ours.double() - want).abs() * unit).max().item()
        aten_err = ((aten.double().view(n, 1) - want).abs() * unit).max().item()
        assert ours_err <= 2 * aten_err + 1e-6, (ours_err, aten_err)

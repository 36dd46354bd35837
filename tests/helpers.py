"""Helpers shared by the operator tests: the backends and where they run, random inputs
(never zeros), the float64 reference, tolerances, forward + backward of any implementation,
opcheck of the operators.  Fixtures built on them live in conftest.py; the model-level
helpers of the conversion tests in conversion_checks.py."""

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

import fused_poolformer  # noqa: E402
from fused_poolformer import backends, contract, ops, reference  # noqa: E402

# ---------------------------------------------------------------------------------------
# Backends: which can run here, on which device, and pytest parameters for them.

HAS_CUDA_DEVICE = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA_DEVICE, reason="CUDA is not available")
requires_cpu_kernels = pytest.mark.skipif(not ops.HAS_CPU_KERNELS, reason="the C++ CPU kernels were not built")
TRITON_INTERPRETED_REASON = (
    "no CUDA device: the Triton kernels run only under Triton's interpreter here, too slow for "
    "this test (tests/test_triton.py covers the interpreted kernels)")


def device_of(backend):
    """The device whose tensors ``backend`` serves in these tests: the first of its devices
    that runs compiled code here (CUDA only with a GPU), else one it serves interpreted (Triton
    on the CPU), else its first; for "auto", the CPU."""
    if backend == "auto":
        return "cpu"
    record = backends.get(backend)
    compiled = [d for d in record.devices
                if d not in record.interpreted_devices and (d != "cuda" or HAS_CUDA_DEVICE)]
    return (compiled or list(record.interpreted_devices) or list(record.devices))[0]


def unavailable_reason(backend, interpreted_triton=False):
    """Why ``backend`` cannot run here (None when it can).  ``interpreted_triton``: whether
    the test is small enough for an interpreted backend (Triton without a GPU)."""
    record = backends.get(backend)
    device = device_of(backend)
    if device == "cuda" and not HAS_CUDA_DEVICE:
        return "no CUDA device"
    reason = record.unavailable_reason(device)
    if reason is not None:
        return f"backend {backend!r}: {reason}"
    if device in record.interpreted_devices and not interpreted_triton:
        return TRITON_INTERPRETED_REASON
    return None


def backend_params(*names, interpreted_triton=False):
    """pytest parameters for the backends ``names``: each marked ``gpu`` where it needs a
    GPU and skipped, with the reason, where it cannot run here."""
    params = []
    for name in names:
        marks = []
        record = backends.get(name)
        interpreted = device_of(name) in record.interpreted_devices
        if device_of(name) == "cuda" or (interpreted and not interpreted_triton) or (
                record.devices == ("cuda",)):
            marks.append(pytest.mark.gpu)
        reason = unavailable_reason(name, interpreted_triton)
        if reason is not None:
            marks.append(pytest.mark.skip(reason=reason))
        params.append(pytest.param(name, id=name, marks=marks))
    return params


# Every backend (the default of the ``backend`` fixture), the fused ones, the fused ones
# including the Triton interpreter (for tests of a few small calls), the CPU kernels alone.
ALL_BACKENDS = backend_params(*(b.name for b in backends.all_backends()))
FUSED = backend_params(*(b.name for b in backends.all_backends() if b.fused))
FUSED_OR_INTERPRETED = backend_params(*(b.name for b in backends.all_backends() if b.fused), interpreted_triton=True)
CPU_KERNELS = backend_params("cpu")
CPP_BACKENDS = backend_params("cpu", "cuda")  # the C++ operators torch.ops.fused_poolformer.*


def fused_backends(device="cpu"):
    """Every backend that runs fused kernels on ``device`` in this process (new ones are
    picked up as they are built)."""
    # An interpreter is too slow for these sweeps; tests/test_triton.py covers the Triton
    # kernels on the CPU.
    kind = torch.device(device).type
    return [b.name for b in backends.all_backends()
            if b.fused and b.serves(kind) and kind not in b.interpreted_devices]


# ---------------------------------------------------------------------------------------
# Inputs, the reference, tolerances.

# Max-abs error allowed against the float64 reference, relative to max |ref| (plus atol).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}
OPTION_NAMES = ("weight", "bias", "layer_scale", "res_scale", "sample_scale")
# The vectors that get a gradient (sample_scale is the drop-path constant: none flows to it).
DIFFERENTIABLE = ("weight", "bias", "layer_scale", "res_scale")


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


def random_like(x, seed):
    """A random tensor of x's shape, dtype and device (a grad_y that is never all ones)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype).to(x.device)


def call(fn, x, kw, **opts):
    return fn(x, kw["weight"], kw["bias"], layer_scale=kw["layer_scale"], res_scale=kw["res_scale"],
              sample_scale=kw["sample_scale"], **opts)


def on_cpu(kw, dtype=None):
    """The vectors of ``kw`` on the CPU, cast to ``dtype`` if given."""
    return {k: (None if v is None else v.detach().cpu().to(dtype or v.dtype)) for k, v in kw.items()}


def reference64(x, kw, **opts):
    """The unfused graph in float64 on the CPU."""
    return call(reference.pool_mixer, x.detach().double().cpu(), on_cpu(kw, torch.float64), **opts)


def assert_close_to(actual, expected, dtype, name=None):
    """Max-abs error within TOL[dtype] of max |expected|; ``name`` labels the failure."""
    tol = TOL[dtype]
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    scale = expected.abs().max().item() if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    label = f"{name}: " if name else ""
    assert err <= tol["atol"] + tol["rtol"] * scale, f"{label}max error {err:.3e} vs scale {scale:.3e} ({dtype})"


# ---------------------------------------------------------------------------------------
# Forward + backward.


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
    grads = torch.autograd.grad(y, list(leaves.values()), grad_y.to(device=y.device, dtype=y.dtype))
    return y.detach(), dict(zip(leaves, grads))


def reference_forward_backward(x, kw, grad_y, wanted=("x",) + DIFFERENTIABLE, **opts):
    """forward_backward of the unfused graph in float64 on the CPU."""
    as64 = lambda t: None if t is None else t.detach().double().cpu()
    return forward_backward(reference.pool_mixer, as64(x), {k: as64(v) for k, v in kw.items()},
                            as64(grad_y), wanted, **opts)


def with_backend(backend):
    """pool_mixer bound to ``backend``, with forward_backward's signature for ``fn``."""
    return lambda *args, **kwargs: fused_poolformer.pool_mixer(*args, backend=backend, **kwargs)


def assert_matches_cpu_kernels(x, kw, grad_y, y, grads, y_ref, grads_ref, **opts):
    """A backend off the CPU agrees with the CPU kernels within twice the tolerance."""
    if not ops.HAS_CPU_KERNELS:
        return
    cpu_y, cpu_grads = forward_backward(with_backend("cpu"), x.cpu(), on_cpu(kw), grad_y.cpu(), **opts)
    tol = TOL[x.dtype]
    for name, got, cpu, ref in [("y", y, cpu_y, y_ref)] + [(k, grads[k], cpu_grads[k], grads_ref[k]) for k in grads]:
        err = (got.cpu().double() - cpu.double()).abs().max().item() if got.numel() else 0.0
        scale = ref.abs().max().item() if ref.numel() else 0.0
        assert err <= 2 * (tol["atol"] + tol["rtol"] * scale), f"{name} differs from the CPU kernels by {err:.3e}"


def check_forward_backward(backend, x, kw, seed=0, **opts):
    """y and the gradients of x and of every present vector against the float64 reference:
    values, dtypes, y in x's memory format; the bias gradient exactly zero (the bias cancels
    out of y, docs/math.md; the unfused graph's own is rounding noise, so not compared)."""
    dtype = x.dtype
    # In x's layout, as the next layer of a network sends it (test_properties mixes layouts).
    grad_y = random_like(x, seed + 1).contiguous(memory_format=contract.dense_format(x))
    y, grads = forward_backward(with_backend(backend), x, kw, grad_y, **opts)
    y_ref, grads_ref = reference_forward_backward(x, kw, grad_y, **opts)
    assert y.device == x.device and y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=contract.dense_format(x)), "y does not keep x's memory format"
    assert_close_to(y, y_ref, dtype, "y")
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        source = x if name == "x" else kw[name]
        assert grad.dtype == source.dtype and grad.shape == source.shape, name
        if name == "bias":
            if backend != "reference":
                assert torch.count_nonzero(grad) == 0, "the bias gradient is not exactly zero"
            continue
        assert_close_to(grad, grads_ref[name], dtype, f"gradient of {name}")
    if x.device.type != "cpu":
        assert_matches_cpu_kernels(x, kw, grad_y, y, grads, y_ref, grads_ref, **opts)


# ---------------------------------------------------------------------------------------
# opcheck.


def opcheck_forward_and_backward(x, kw, backend="cpu"):
    """torch.library.opcheck on both operators of ``backend`` (on x's device), the backward
    both without and with inputs that require grad."""
    forward, backward = ops.forward_operator(backend), ops.backward_operator(backend)
    args = (x, kw["weight"], kw["bias"], kw["layer_scale"], kw["res_scale"], kw["sample_scale"], 2, 3, 1e-5)
    x.requires_grad_(True)
    torch.library.opcheck(forward, args)
    y, mean, rstd = forward(*args)
    bargs = (torch.randn_like(y), x.detach(), mean, rstd, kw["weight"], kw["bias"], kw["layer_scale"], kw["res_scale"],
             kw["sample_scale"], 2, 3, 1e-5, [True, True, True, False, True])
    torch.library.opcheck(backward, bargs)
    # With inputs that require grad, the backward operator's own autograd (the
    # differentiable double-backward formula) is checked as well.
    grad_args = [t.detach().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) and i in (0, 1)
                 else t for i, t in enumerate(bargs)]
    torch.library.opcheck(backward, tuple(grad_args))

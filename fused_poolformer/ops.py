"""The fused pool-mixer operator: validation, backend choice, fake kernels and autograd.

The operator schemas live in C++ (``csrc/ops.cpp``); the CPU and CUDA kernels register
against them.  The Triton kernels are ``torch.library.triton_op`` operators of the same
signature (``fused_poolformer/triton_kernels.py``).  Both pairs share the autograd formula
registered here: the forward saves x, mean and rstd (and the small vectors) -- nothing
else of size N*C*H*W -- and the backward operator returns every gradient in one pass.
"""

from typing import Optional

import torch
from torch import Tensor

from . import reference

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.fused_poolformer.*)

    _EXTENSION_ERROR: Optional[BaseException] = None
except ImportError as exc:  # not built: the CPU/CUDA backends are unavailable
    _EXTENSION_ERROR = exc

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _has_kernel(dispatch_key: str) -> bool:
    if _EXTENSION_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        "fused_poolformer::pool_mixer_forward", dispatch_key
    )


# Decided once at import, so that torch.compile sees constants.
HAS_CPU_KERNELS = _has_kernel("CPU")
HAS_CUDA_KERNELS = _has_kernel("CUDA")


_TRITON_OPS: dict = {}


def _triton_ops():
    """The Triton (forward, backward) operators, or None where Triton cannot be imported.
    Cached in a plain dict: torch.compile ignores functools.lru_cache and would trace the
    body (and refuse register_autograd)."""
    if "ops" not in _TRITON_OPS:
        try:
            from . import triton_kernels
        except ImportError:
            _TRITON_OPS["ops"] = None
        else:
            _register_autograd(triton_kernels.forward_op, triton_kernels.backward_op)
            _TRITON_OPS["ops"] = (
                torch.ops.fused_poolformer.triton_pool_mixer_forward.default,
                torch.ops.fused_poolformer.triton_pool_mixer_backward.default,
            )
    return _TRITON_OPS["ops"]


def triton_available() -> bool:
    return _triton_ops() is not None


def triton_interpreted() -> bool:
    """Whether the Triton kernels were defined under TRITON_INTERPRET=1 (so they run on CPU
    tensors); triton.jit reads the variable when the kernels are imported, not per call."""
    if not triton_available():
        return False
    from . import triton_kernels

    return bool(triton_kernels._INTERPRET)


def available_backends(device: str = "cpu") -> list:
    """Backends that can serve tensors on ``device`` ("cpu" or "cuda") in this process."""
    dev = torch.device(device).type
    out = []
    if dev == "cpu" and HAS_CPU_KERNELS:
        out.append("cpu")
    if dev == "cuda" and HAS_CUDA_KERNELS:
        out.append("cuda")
    if triton_available() and (dev == "cuda" or triton_interpreted()):
        out.append("triton")
    out.append("reference")
    return out


# ---------------------------------------------------------------------------------------
# Validation: one place for the public API; every message names the argument.


def _check_vector(v, name, length, length_name, x):
    if v is None:
        return
    if not isinstance(v, Tensor):
        raise TypeError(f"pool_mixer: {name} must be a Tensor or None, got {type(v).__name__}")
    if v.dim() != 1 or v.shape[0] != length:
        raise ValueError(
            f"pool_mixer: {name} must have shape ({length_name},) = ({length},), got {tuple(v.shape)}"
        )
    if v.device != x.device:
        raise ValueError(f"pool_mixer: {name} is on {v.device} but x is on {x.device}")
    ok_dtype = v.dtype == x.dtype or (v.dtype == torch.float32 and x.dtype != torch.float64)
    if not ok_dtype:
        raise TypeError(
            f"pool_mixer: {name} has dtype {v.dtype} but x has dtype {x.dtype} "
            "(parameters must match x, or be float32 for a half-precision x)"
        )


def validate(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, eps, backend="auto"):
    """Raises TypeError/ValueError naming the offending argument.  The fake kernels run it
    too, so torch.compile and torch.export reject what the real kernels reject."""
    if not isinstance(x, Tensor):
        raise TypeError(f"pool_mixer: x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"pool_mixer: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"pool_mixer: x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    n, c = x.shape[0], x.shape[1]
    for name, v in (("weight", weight), ("bias", bias), ("layer_scale", layer_scale), ("res_scale", res_scale)):
        _check_vector(v, name, c, "C", x)
    _check_vector(sample_scale, "sample_scale", n, "N", x)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"pool_mixer: num_groups must be an integer >= 1, got {num_groups!r}")
    if c % num_groups != 0:
        raise ValueError(f"pool_mixer: num_groups ({num_groups}) must divide the number of channels C ({c})")
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1 or pool_size % 2 == 0:
        raise ValueError(f"pool_mixer: pool_size must be a positive odd integer, got {pool_size!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0.0 < float(eps) < float("inf")):
        raise ValueError(f"pool_mixer: eps must be a finite number > 0, got {eps!r}")
    if backend not in BACKENDS:
        raise ValueError(f"pool_mixer: backend must be one of {BACKENDS}, got {backend!r}")


def choose_backend(backend: str, x: Tensor) -> str:
    """The backend that will serve ``x``; a clear error where the requested one cannot."""
    dev = x.device.type
    if backend == "auto":
        if dev == "cpu" and HAS_CPU_KERNELS:
            return "cpu"
        if dev == "cuda" and HAS_CUDA_KERNELS:
            return "cuda"
        if dev == "cuda" and triton_available():
            return "triton"
        return "reference"
    if backend == "cpu":
        if dev != "cpu":
            raise ValueError(f"pool_mixer: backend='cpu' cannot serve a tensor on {x.device}")
        if not HAS_CPU_KERNELS:
            raise RuntimeError(f"pool_mixer: backend='cpu' is unavailable: the extension did not load ({_EXTENSION_ERROR})")
    if backend == "cuda":
        if dev != "cuda":
            raise ValueError(f"pool_mixer: backend='cuda' cannot serve a tensor on {x.device}")
        if not HAS_CUDA_KERNELS:
            raise RuntimeError("pool_mixer: backend='cuda' is unavailable: the extension was built without CUDA kernels")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("pool_mixer: backend='triton' is unavailable: triton cannot be imported")
        if dev == "cpu" and not triton_interpreted():
            raise ValueError(
                "pool_mixer: backend='triton' serves CPU tensors only when TRITON_INTERPRET=1 was set "
                "before fused_poolformer.triton_kernels was imported"
            )
        if dev not in ("cpu", "cuda"):
            raise ValueError(f"pool_mixer: backend='triton' cannot serve a tensor on {x.device}")
    return backend


# ---------------------------------------------------------------------------------------
# Fake kernels and autograd.


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dense_format(x: Tensor) -> torch.memory_format:
    """The layout the kernels use for x (and give y): NCHW unless x is channels_last only."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def fake_forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, eps):
    validate(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, eps)
    y = torch.empty_like(x, memory_format=dense_format(x))
    stats = x.new_empty((x.shape[0], num_groups), dtype=stats_dtype(x.dtype))
    return y, stats, torch.empty_like(stats)


def fake_backward(grad_y, x, mean, rstd, weight, layer_scale, res_scale, sample_scale, num_groups, pool_size, output_mask):
    validate(x, weight, None, layer_scale, res_scale, sample_scale, num_groups, pool_size, 1.0)
    if grad_y.shape != x.shape or grad_y.dtype != x.dtype or grad_y.device != x.device:
        raise ValueError("pool_mixer: grad_y must have x's shape, dtype and device")
    for name, t in (("mean", mean), ("rstd", rstd)):
        if tuple(t.shape) != (x.shape[0], num_groups) or t.dtype != stats_dtype(x.dtype) or t.device != x.device:
            raise ValueError(f"pool_mixer: {name} must have shape (N, num_groups) and dtype {stats_dtype(x.dtype)} on {x.device}")
    def grad(wanted, param):
        if not wanted:
            return x.new_empty((0,))
        return x.new_empty((x.shape[1],), dtype=x.dtype if param is None else param.dtype)

    dx = torch.empty_like(x, memory_format=dense_format(x)) if output_mask[0] else x.new_empty((0,))
    return dx, grad(output_mask[1], weight), grad(output_mask[2], layer_scale), grad(output_mask[3], res_scale)


if _EXTENSION_ERROR is None:
    torch.library.register_fake("fused_poolformer::pool_mixer_forward")(fake_forward)
    torch.library.register_fake("fused_poolformer::pool_mixer_backward")(fake_backward)


def _setup_context(ctx, inputs, output):
    x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight, layer_scale, res_scale, sample_scale)
    ctx.num_groups, ctx.pool_size = num_groups, pool_size
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _make_backward(backward_op):
    def backward(ctx, grad_y, grad_mean, grad_rstd):
        x, mean, rstd, weight, layer_scale, res_scale, sample_scale = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[1], needs[3], needs[4]]
        dx = dweight = dlayer = dres = None
        if any(mask):
            dx, dweight, dlayer, dres = backward_op(
                grad_y, x, mean, rstd, weight, layer_scale, res_scale, sample_scale,
                ctx.num_groups, ctx.pool_size, mask,
            )
        # The bias cancels out of the output (DESIGN.md section 2): its gradient is exactly
        # zero, returned as zeros so that optimizers see what the unfused graph gives them.
        dbias = x.new_zeros((x.shape[1],), dtype=ctx.bias_dtype) if needs[2] else None
        return (
            dx if mask[0] else None,
            dweight if mask[1] else None,
            dbias,
            dlayer if mask[2] else None,
            dres if mask[3] else None,
            None, None, None, None,
        )

    return backward


def _register_autograd(forward_op, backward_op):
    torch.library.register_autograd(forward_op, _make_backward(backward_op), setup_context=_setup_context)


if _EXTENSION_ERROR is None:
    _register_autograd(
        torch.ops.fused_poolformer.pool_mixer_forward.default,
        torch.ops.fused_poolformer.pool_mixer_backward.default,
    )


def _forward_op(backend: str):
    if backend in ("cpu", "cuda"):
        return torch.ops.fused_poolformer.pool_mixer_forward.default
    return _triton_ops()[0]


# ---------------------------------------------------------------------------------------
# The public entry point.


def pool_mixer(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    *,
    layer_scale: Optional[Tensor] = None,
    res_scale: Optional[Tensor] = None,
    sample_scale: Optional[Tensor] = None,
    num_groups: int = 1,
    pool_size: int = 3,
    eps: float = 1e-5,
    backend: str = "auto",
) -> Tensor:
    """Fused PoolFormer token mixer with its residual:

        y = res_scale * x + layer_scale * sample_scale * (Pool(GroupNorm(x)) - GroupNorm(x))

    equal (to rounding) to :func:`fused_poolformer.reference.pool_mixer`.  ``x`` is
    (N, C, H, W) float32/float64/float16/bfloat16, NCHW or channels_last (y keeps the
    layout); ``weight``/``bias`` are the GroupNorm affine, ``layer_scale``/``res_scale`` are
    per-channel (C,) vectors, ``sample_scale`` a per-sample (N,) factor (drop path).  Pool
    is AvgPool2d(pool_size, stride=1, padding=pool_size//2, count_include_pad=False).
    ``backend`` is "auto", "cpu", "cuda", "triton" or "reference".
    """
    validate(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, eps, backend)
    impl = choose_backend(backend, x)
    if impl == "reference":
        return reference.pool_mixer(
            x, weight, bias, layer_scale=layer_scale, res_scale=res_scale, sample_scale=sample_scale,
            num_groups=num_groups, pool_size=pool_size, eps=eps,
        )
    y, _, _ = _forward_op(impl)(
        x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, float(eps)
    )
    return y


"""The operator contract every backend honours (docs/contract.md), in one leaf module.

- Argument rules in Python, for the fake kernels (so ``torch.compile`` and ``torch.export``
  reject what the C++ kernels reject, with the same exception type and message) and for
  the Triton operators, which have no C++ prologue.  The C++ operators check their own
  arguments once, in ``csrc/host.cpp``; the messages and exception types agree: a wrong
  shape, value or device is a ``ValueError``, a wrong dtype or type a ``TypeError``.
- Dtype and layout rules: statistics in float32 (float64 for float64 x); outputs keep x's
  memory format (NCHW, or channels_last when x is dense only in that).
- Fake kernels of the four operators (C++ and Triton, forward and backward).
- The autograd formula of the Triton operators (the C++ operators have theirs in
  ``csrc/autograd.cpp``).

- The pool rule (``pool_arguments`` and its checks): the only place Python states it
  (``csrc/pool_mixer.h`` states it for C++ and CUDA).

This module imports nothing from the package at import time (``reference``, which uses the
pool rule, is imported where the Triton autograd needs it): the backends import it, never
the other way round.
"""

from typing import Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
VECTOR_NAMES = ("weight", "bias", "layer_scale", "res_scale")  # (C,) vectors; sample_scale is (N,)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of mean and rstd: float64 for float64 x, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dense_format(x: Tensor) -> torch.memory_format:
    """The layout the kernels use for x (and give y): NCHW unless x is channels_last only."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# ---------------------------------------------------------------------------------------
# The pool rule, PoolFormer's setting: AvgPool2d(pool_size, stride=1, padding=pool_size//2,
# count_include_pad=False) with an odd pool_size >= 1.  The window centred on a pixel is then
# symmetric (its radius is the padding), which the backward's adjoint pool relies on, and a
# window clipped by the border divides by its valid taps.  A plane smaller than the window is
# fine: the window is clipped to it.

POOL_SIZE_RULE = "pool_size must be a positive odd integer"


def valid_pool_size(pool_size) -> bool:
    return not isinstance(pool_size, bool) and isinstance(pool_size, int) and pool_size >= 1 and pool_size % 2 == 1


def pool_radius(pool_size: int) -> int:
    """The pool window's radius, also its padding."""
    return pool_size // 2


def pool_arguments(pool_size: int) -> dict:
    """The keyword arguments of ``F.avg_pool2d`` / ``nn.AvgPool2d`` for the pool the fused
    operators compute."""
    return dict(kernel_size=pool_size, stride=1, padding=pool_radius(pool_size), count_include_pad=False)


def avg_pool_mismatch(pool) -> Optional[str]:
    """None where the ``nn.AvgPool2d`` ``pool`` computes the fused operators' pool, else what
    differs (for the conversion report)."""
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    kh, kw = pair(pool.kernel_size)
    if kh != kw or not valid_pool_size(kh):
        return f"pool kernel_size {pool.kernel_size} is not a square odd window"
    rule = pool_arguments(kh)
    if pair(pool.stride if pool.stride is not None else pool.kernel_size) != pair(rule["stride"]):
        return f"pool stride {pool.stride} is not {rule['stride']}"
    if pair(pool.padding) != pair(rule["padding"]):
        return f"pool padding {pool.padding} is not kernel_size // 2 = {rule['padding']}"
    if pool.count_include_pad != rule["count_include_pad"]:
        return f"pool has count_include_pad={pool.count_include_pad}"
    if pool.ceil_mode or pool.divisor_override is not None:
        return "pool has ceil_mode or divisor_override set"
    return None


def check_pool_size(pool_size, who: str = "pool_mixer") -> None:
    if not valid_pool_size(pool_size):
        raise ValueError(f"{who}: {POOL_SIZE_RULE}, got {pool_size!r}")


# ---------------------------------------------------------------------------------------
# Argument rules.  Messages match csrc/host.cpp word for word where both check.


def check_activation(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"pool_mixer: {name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"pool_mixer: {name} must be 4-D (N, C, H, W), got {t.dim()}-D with shape {list(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"pool_mixer: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def check_vector(v, name: str, length: int, length_name: str, x: Tensor) -> None:
    if v is None:
        return
    if not isinstance(v, Tensor):
        raise TypeError(f"pool_mixer: {name} must be a Tensor or None, got {type(v).__name__}")
    if v.dim() != 1 or v.shape[0] != length:
        raise ValueError(f"pool_mixer: {name} must have shape ({length_name},) = ({length},), got {list(v.shape)}")
    if v.device != x.device:
        raise ValueError(f"pool_mixer: {name} is on {v.device} but x is on {x.device}")
    if not (v.dtype == x.dtype or (v.dtype == torch.float32 and x.dtype != torch.float64)):
        raise TypeError(
            f"pool_mixer: {name} has dtype {v.dtype} but x has dtype {x.dtype} "
            "(parameters must match x, or be float32 for a half-precision x)"
        )


def check_vectors(x, weight, bias, layer_scale, res_scale, sample_scale) -> None:
    n, c = x.shape[0], x.shape[1]
    for name, v in zip(VECTOR_NAMES, (weight, bias, layer_scale, res_scale)):
        check_vector(v, name, c, "C", x)
    check_vector(sample_scale, "sample_scale", n, "N", x)


def check_options(x: Tensor, num_groups, pool_size, eps) -> None:
    """num_groups, pool_size and eps: Python ints / a real number, with the C++ operators'
    value rules (a bool is refused, although Python counts it as an int)."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"pool_mixer: num_groups must be an integer >= 1, got {num_groups!r}")
    if x.shape[1] % num_groups != 0:
        raise ValueError(f"pool_mixer: num_groups ({num_groups}) must divide the number of channels C ({x.shape[1]})")
    check_pool_size(pool_size)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0.0 < float(eps) < float("inf")):
        raise ValueError(f"pool_mixer: eps must be a finite number > 0, got {eps!r}")


def check_forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, eps) -> None:
    check_activation(x, "x")
    check_vectors(x, weight, bias, layer_scale, res_scale, sample_scale)
    check_options(x, num_groups, pool_size, eps)


def check_statistics(t, name: str, x: Tensor, num_groups: int) -> None:
    want_shape, want_dtype = (x.shape[0], num_groups), stats_dtype(x.dtype)
    if not isinstance(t, Tensor) or tuple(t.shape) != want_shape:
        got = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"pool_mixer: {name} must have shape (N, num_groups) = {want_shape}, got {got}")
    if t.dtype != want_dtype:
        raise TypeError(f"pool_mixer: {name} must be {want_dtype} on {x.device}, got {t.dtype} on {t.device}")
    if t.device != x.device:
        raise ValueError(f"pool_mixer: {name} must be {want_dtype} on {x.device}, got {t.dtype} on {t.device}")


def check_backward(grad_y, x, mean, rstd, weight, bias, layer_scale, res_scale, sample_scale, num_groups,
                   pool_size, eps, output_mask) -> None:
    check_activation(x, "x")
    check_activation(grad_y, "grad_y")
    if grad_y.shape != x.shape:
        raise ValueError(f"pool_mixer: grad_y has shape {list(grad_y.shape)} but x has shape {list(x.shape)}")
    if grad_y.dtype != x.dtype:
        raise TypeError(f"pool_mixer: grad_y must have x's dtype and device, got {grad_y.dtype} for {x.dtype}")
    if grad_y.device != x.device:
        raise ValueError(f"pool_mixer: grad_y must have x's dtype and device, got {grad_y.device} for {x.device}")
    check_options(x, num_groups, pool_size, eps)
    check_statistics(mean, "mean", x, num_groups)
    check_statistics(rstd, "rstd", x, num_groups)
    check_vectors(x, weight, bias, layer_scale, res_scale, sample_scale)
    if len(output_mask) != 5:
        raise ValueError(f"pool_mixer: output_mask must have 5 entries, got {len(output_mask)}")


# ---------------------------------------------------------------------------------------
# Fake kernels (shapes, dtypes and layouts of the outputs; no data).


def fake_forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, eps):
    check_forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, eps)
    y = torch.empty_like(x, memory_format=dense_format(x))
    mean = x.new_empty((x.shape[0], num_groups), dtype=stats_dtype(x.dtype))
    return y, mean, torch.empty_like(mean)


def gradient_like(wanted: bool, param: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """A requested (C,) gradient in its parameter's dtype (x's when absent), else None."""
    if not wanted:
        return None
    return x.new_empty((x.shape[1],), dtype=x.dtype if param is None else param.dtype)


def fake_backward(grad_y, x, mean, rstd, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size,
                  eps, output_mask):
    check_backward(grad_y, x, mean, rstd, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size,
                   eps, output_mask)
    dx = torch.empty_like(x, memory_format=dense_format(x)) if output_mask[0] else None
    params = (weight, bias, layer_scale, res_scale)
    return (dx, *(gradient_like(output_mask[i + 1], p, x) for i, p in enumerate(params)))


def register_fake_kernels(forward_name: str, backward_name: str) -> None:
    torch.library.register_fake(forward_name)(fake_forward)
    torch.library.register_fake(backward_name)(fake_backward)


# ---------------------------------------------------------------------------------------
# Autograd of the Triton operators: the forward saves x, mean, rstd and the small vectors
# (nothing else of size N*C*H*W); the backward operator returns every gradient in one pass.
# When the backward is itself differentiated (create_graph=True) the gradients come from
# the unfused graph instead, so that second (and higher) derivatives are exact.

def _setup_context(ctx, inputs, output):
    x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight, bias, layer_scale, res_scale, sample_scale)
    ctx.options = (num_groups, pool_size, eps)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _differentiable_gradients(grad_y, tensors: Sequence[Optional[Tensor]], needs: Sequence[bool], options):
    """The gradients of the unfused graph, built with create_graph=True."""
    from . import reference  # imports this module

    x, weight, bias, layer_scale, res_scale, sample_scale = tensors
    num_groups, pool_size, eps = options
    y = reference.pool_mixer(x, weight, bias, layer_scale=layer_scale, res_scale=res_scale,
                             sample_scale=sample_scale, num_groups=num_groups, pool_size=pool_size, eps=eps)
    wanted = [t for t, need in zip(tensors, needs) if need]
    grads = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True, allow_unused=True))
    out = []
    for t, need in zip(tensors, needs):
        g = next(grads) if need else None
        out.append(torch.zeros_like(t) if need and g is None else g)
    return out


def _make_backward(backward_op):
    def backward(ctx, grad_y, grad_mean, grad_rstd):
        x, mean, rstd, weight, bias, layer_scale, res_scale, sample_scale = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:6])
        needs[5] = False  # sample_scale is a constant (a drop-path mask)
        if grad_y is None or not any(needs):
            return (None,) * 9
        if torch.is_grad_enabled():
            tensors = (x, weight, bias, layer_scale, res_scale, sample_scale)
            return (*_differentiable_gradients(grad_y, tensors, needs, ctx.options), None, None, None)
        num_groups, pool_size, eps = ctx.options
        grads = backward_op(grad_y, x, mean, rstd, weight, bias, layer_scale, res_scale, sample_scale,
                            num_groups, pool_size, eps, needs[:5])
        # A gradient not asked for comes back empty from a Python operator: pass None on.
        return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None)

    return backward


def register_autograd(forward_op, backward_op) -> None:
    """Autograd of a (forward, backward) operator pair with the contract's signatures."""
    torch.library.register_autograd(forward_op, _make_backward(backward_op), setup_context=_setup_context)

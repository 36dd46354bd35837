"""The contract of the whole-block operators (docs/block.md), in one leaf module: the argument
list, the argument rules, the fake kernels and the Python autograd of Python-defined block
operators (Triton).  The mixer's own contract (``contract``) is reused for the first branch.

    block_forward(x, <first branch>, <second branch>, save_hidden)
        -> (out, hidden, mean1, rstd1, mean2, rstd2)
    block_backward(grad_out, x, hidden, mean1, rstd1, mean2, rstd2, <both branches>, output_mask)
        -> the 15 gradients of GRADIENT_NAMES

``<first branch>`` is the mixer's arguments (``norm1_weight`` ... ``eps1``), ``<second
branch>`` the MLP's (``norm2_weight`` ... ``gemm_dtype``), in the order of FORWARD_ARGUMENTS.
``hidden`` is fc1's output before the activation (N, hidden, H, W) in x's layout, kept for
the backward (an empty tensor when ``save_hidden`` is false: the backward then recomputes it);
``mean1``/``rstd1`` are the mixer's (N, G) statistics of x, ``mean2``/``rstd2`` the (N, 1)
statistics of the mixer's output x1 that Norm2 uses.
"""

import re
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import contract

ACTIVATIONS = ("gelu", "gelu_tanh", "star_relu")

# The operator's arguments after x, in schema order (csrc/ops.cpp).
MIXER_ARGUMENTS = ("norm1_weight", "norm1_bias", "layer_scale1", "res_scale1", "sample_scale1",
                   "num_groups1", "pool_size", "eps1")
MLP_ARGUMENTS = ("norm2_weight", "norm2_bias", "eps2", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias",
                 "layer_scale2", "res_scale2", "sample_scale2", "activation", "act_scale", "act_bias",
                 "gemm_dtype")
FORWARD_ARGUMENTS = MIXER_ARGUMENTS + MLP_ARGUMENTS
# The tensors that get a gradient, in the backward's output order (x first).
GRADIENT_NAMES = ("x", "norm1_weight", "norm1_bias", "layer_scale1", "res_scale1", "norm2_weight", "norm2_bias",
                  "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "layer_scale2", "res_scale2", "act_scale",
                  "act_bias")
STATISTICS = ("mean1", "rstd1", "mean2", "rstd2")


# The mixer's argument names -> the block's (the first branch's rules are the mixer's).
_FIRST_BRANCH_NAMES = {"weight": "norm1_weight", "bias": "norm1_bias", "layer_scale": "layer_scale1",
                       "res_scale": "res_scale1", "sample_scale": "sample_scale1", "num_groups": "num_groups1",
                       "eps": "eps1"}


def _as_block_error(exc: Exception) -> Exception:
    """A ``pool_mixer:`` argument error restated for the block operator's argument names."""
    match = re.match(r"pool_mixer: (\w+)(.*)", str(exc), re.S)
    if match is None:
        return exc
    name, rest = match.groups()
    return type(exc)(f"poolformer_block: {_FIRST_BRANCH_NAMES.get(name, name)}{rest}")


def _fail(error, message: str):
    raise error(f"poolformer_block: {message}")


def _check_matrix(w, name: str, shape, x: Tensor) -> None:
    if not isinstance(w, Tensor):
        _fail(TypeError, f"{name} must be a Tensor, got {type(w).__name__}")
    if w.dim() != 2 or (shape[0] is not None and w.shape[0] != shape[0]) or w.shape[1] != shape[1]:
        want = f"({shape[0] if shape[0] is not None else 'hidden'}, {shape[1]})"
        _fail(ValueError, f"{name} must have shape {want}, got {list(w.shape)}")
    if w.device != x.device:
        _fail(ValueError, f"{name} is on {w.device} but x is on {x.device}")
    if not (w.dtype == x.dtype or (w.dtype == torch.float32 and x.dtype != torch.float64)):
        _fail(TypeError, f"{name} has dtype {w.dtype} but x has dtype {x.dtype} "
              "(parameters must match x, or be float32 for a half-precision x)")


def _check_vector(v, name: str, length: int, length_name: str, x: Tensor) -> None:
    try:
        contract.check_vector(v, name, length, length_name, x)
    except (TypeError, ValueError) as exc:
        raise type(exc)(str(exc).replace("pool_mixer:", "poolformer_block:", 1)) from None


def check_forward(x, norm1_weight, norm1_bias, layer_scale1, res_scale1, sample_scale1, num_groups1, pool_size,
                  eps1, norm2_weight, norm2_bias, eps2, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale2,
                  res_scale2, sample_scale2, activation, act_scale, act_bias, gemm_dtype) -> None:
    """The block's argument rules (messages name the argument; csrc/block_host.cpp has the C++ twin)."""
    try:
        contract.check_forward(x, norm1_weight, norm1_bias, layer_scale1, res_scale1, sample_scale1, num_groups1,
                               pool_size, eps1)
    except (TypeError, ValueError) as exc:
        raise _as_block_error(exc) from None
    n, c = x.shape[0], x.shape[1]
    for name, v in (("norm2_weight", norm2_weight), ("norm2_bias", norm2_bias), ("layer_scale2", layer_scale2),
                    ("res_scale2", res_scale2)):
        _check_vector(v, name, c, "C", x)
    _check_vector(sample_scale2, "sample_scale2", n, "N", x)
    if isinstance(eps2, bool) or not isinstance(eps2, (int, float)) or not (0.0 < float(eps2) < float("inf")):
        _fail(ValueError, f"eps2 must be a finite number > 0, got {eps2!r}")
    _check_matrix(fc1_weight, "fc1_weight", (None, c), x)
    hidden = fc1_weight.shape[0]
    _check_matrix(fc2_weight, "fc2_weight", (c, hidden), x)
    _check_vector(fc1_bias, "fc1_bias", hidden, "hidden", x)
    _check_vector(fc2_bias, "fc2_bias", c, "C", x)
    if activation not in ACTIVATIONS:
        _fail(ValueError, f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    for name, v in (("act_scale", act_scale), ("act_bias", act_bias)):
        if v is not None and activation != "star_relu":
            _fail(ValueError, f"{name} is given but activation {activation!r} takes none (only 'star_relu' does)")
        _check_vector(v, name, 1, "1", x)
    if gemm_dtype is not None:
        if gemm_dtype not in contract.FLOAT_DTYPES:
            _fail(TypeError, f"gemm_dtype must be a floating dtype or None, got {gemm_dtype}")
        if (gemm_dtype == torch.float64) != (x.dtype == torch.float64):
            _fail(TypeError, f"gemm_dtype {gemm_dtype} cannot serve an x of dtype {x.dtype} "
                  "(float64 computes in float64 throughout)")


def check_scalars(norm1_weight, norm1_bias, layer_scale1, res_scale1, sample_scale1, num_groups1, pool_size, eps1,
                  norm2_weight, norm2_bias, eps2, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale2,
                  res_scale2, sample_scale2, activation, act_scale, act_bias, gemm_dtype) -> None:
    """What only Python can see (a bool or a float where an int goes, a string for a
    number); the C++ operators check every tensor and value themselves."""
    for name, value in (("num_groups1", num_groups1), ("pool_size", pool_size)):
        if type(value) is not int:
            _fail(TypeError, f"{name} must be an int, got {type(value).__name__}")
    for name, value in (("eps1", eps1), ("eps2", eps2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(TypeError, f"{name} must be a number, got {type(value).__name__}")
    if not isinstance(activation, str):
        _fail(TypeError, f"activation must be a str, got {type(activation).__name__}")
    for name, value in (("fc1_weight", fc1_weight), ("fc2_weight", fc2_weight)):
        if not isinstance(value, Tensor):
            _fail(TypeError, f"{name} must be a Tensor, got {type(value).__name__}")


def check_statistics(t, name: str, x: Tensor, groups: int) -> None:
    try:
        contract.check_statistics(t, name, x, groups)
    except (TypeError, ValueError) as exc:
        raise type(exc)(str(exc).replace("pool_mixer:", "poolformer_block:", 1).replace(
            "(N, num_groups)", "(N, num_groups1)" if name.endswith("1") else "(N, 1)")) from None


def check_backward(grad_out, x, hidden, mean1, rstd1, mean2, rstd2, *arguments, output_mask) -> None:
    check_forward(x, *arguments)
    contract.check_activation(grad_out, "grad_out")
    if grad_out.shape != x.shape or grad_out.dtype != x.dtype or grad_out.device != x.device:
        _fail(ValueError, f"grad_out must have x's shape, dtype and device, got {list(grad_out.shape)} "
              f"{grad_out.dtype} on {grad_out.device} for {list(x.shape)} {x.dtype} on {x.device}")
    named = dict(zip(FORWARD_ARGUMENTS, arguments))
    check_statistics(mean1, "mean1", x, named["num_groups1"])
    check_statistics(rstd1, "rstd1", x, named["num_groups1"])
    check_statistics(mean2, "mean2", x, 1)
    check_statistics(rstd2, "rstd2", x, 1)
    want = hidden_shape(x, named["fc1_weight"])
    if hidden.numel() != 0 and tuple(hidden.shape) != want:
        _fail(ValueError, f"hidden must have shape {want} (or be empty: recomputed), got {list(hidden.shape)}")
    if len(output_mask) != len(GRADIENT_NAMES):
        _fail(ValueError, f"output_mask must have {len(GRADIENT_NAMES)} entries, got {len(output_mask)}")


# ---------------------------------------------------------------------------------------
# Fake kernels.


def hidden_shape(x: Tensor, fc1_weight: Tensor):
    return (x.shape[0], fc1_weight.shape[0], x.shape[2], x.shape[3])


def fake_forward(x, *arguments_and_flag):
    *arguments, save_hidden = arguments_and_flag
    check_forward(x, *arguments)
    named = dict(zip(FORWARD_ARGUMENTS, arguments))
    fmt = contract.dense_format(x)
    out = torch.empty_like(x, memory_format=fmt)
    gemm = named["gemm_dtype"] or x.dtype
    if save_hidden:
        hidden = x.new_empty(hidden_shape(x, named["fc1_weight"]), dtype=gemm).contiguous(memory_format=fmt)
    else:
        hidden = x.new_empty((0,), dtype=gemm)
    stats = contract.stats_dtype(x.dtype)
    mean1 = x.new_empty((x.shape[0], named["num_groups1"]), dtype=stats)
    mean2 = x.new_empty((x.shape[0], 1), dtype=stats)
    return out, hidden, mean1, torch.empty_like(mean1), mean2, torch.empty_like(mean2)


def fake_backward(grad_out, x, hidden, mean1, rstd1, mean2, rstd2, *arguments_and_mask):
    *arguments, output_mask = arguments_and_mask
    check_backward(grad_out, x, hidden, mean1, rstd1, mean2, rstd2, *arguments, output_mask=output_mask)
    named = dict(zip(FORWARD_ARGUMENTS, arguments))
    grads = [torch.empty_like(x, memory_format=contract.dense_format(x)) if output_mask[0] else None]
    for wanted, name in zip(output_mask[1:], GRADIENT_NAMES[1:]):
        param = named[name]
        grads.append(torch.empty_like(param) if wanted and param is not None else None)
    return tuple(grads)


def register_fake_kernels(forward_name: str, backward_name: str) -> None:
    torch.library.register_fake(forward_name)(fake_forward)
    torch.library.register_fake(backward_name)(fake_backward)


# ---------------------------------------------------------------------------------------
# The unfused graph with the operator's argument list, and its gradients.


def reference_forward(x, *arguments):
    """The block's output by the unfused graph (``reference.poolformer_block``)."""
    from . import reference  # imports contract

    named = dict(zip(FORWARD_ARGUMENTS, arguments))
    mlp = {k: v for k, v in named.items() if k in MLP_ARGUMENTS}
    mlp["activation_kind"] = mlp.pop("activation")
    gemm_dtype = mlp.pop("gemm_dtype")
    return reference.poolformer_block(
        x, **{k: v for k, v in named.items() if k in MIXER_ARGUMENTS}, gemm_dtype=gemm_dtype, **mlp)


def differentiable_gradients(grad_out, x, arguments: Sequence, needs: Sequence[bool]):
    """The 15 gradients of the unfused graph, built with create_graph=True (None where not
    needed; zeros for a needed input the output does not depend on)."""
    named = dict(zip(FORWARD_ARGUMENTS, arguments))
    inputs = [x] + [named[n] for n in GRADIENT_NAMES[1:]]
    out = reference_forward(x, *arguments)
    wanted = [t for t, need in zip(inputs, needs) if need and t is not None]
    grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True, allow_unused=True))
    result = []
    for t, need in zip(inputs, needs):
        g = next(grads) if need and t is not None else None
        result.append(torch.zeros_like(t) if g is None and need and t is not None else g)
    return result


def gradients_needed(inputs: Sequence[Optional[Tensor]]) -> list:
    return [t is not None and isinstance(t, Tensor) and t.requires_grad for t in inputs]

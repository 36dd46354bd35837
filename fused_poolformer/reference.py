"""The unfused PyTorch graph of the pool token mixer: the baseline of every test and benchmark.

GroupNorm -> AvgPool2d (the pool rule of ``contract.pool_arguments``) -> subtract the
normed input -> layer scale -> drop-path (per-sample) scale -> residual add, exactly as
timm's ``MetaFormerBlock(token_mixer=Pooling)`` and the original PoolFormer block compute it.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .contract import pool_arguments


def _channel(v: Tensor, dtype: torch.dtype) -> Tensor:
    return v.to(dtype).view(1, -1, 1, 1)


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
    backend: Optional[str] = None,  # accepted for signature parity; the graph is always eager
) -> Tensor:
    """``res_scale * x + layer_scale * sample_scale * (Pool(GroupNorm(x)) - GroupNorm(x))``.

    Parameters given in float32 for a half-precision ``x`` are cast to ``x``'s dtype, as
    the fused kernels read them.
    """
    dt = x.dtype
    if weight is None and bias is not None:
        # Same function; torch 2.11's CPU group_norm backward fails for a bias without a weight.
        weight = torch.ones_like(bias)
    normed = F.group_norm(
        x,
        num_groups,
        None if weight is None else weight.to(dt),
        None if bias is None else bias.to(dt),
        eps,
    )
    pooled = F.avg_pool2d(normed, **pool_arguments(pool_size))
    mixed = pooled - normed
    if layer_scale is not None:
        mixed = mixed * _channel(layer_scale, dt)
    if sample_scale is not None:
        mixed = mixed * sample_scale.to(dt).view(-1, 1, 1, 1)
    shortcut = x if res_scale is None else x * _channel(res_scale, dt)
    return shortcut + mixed


# ---------------------------------------------------------------------------------------
# The whole block: the mixer above, then the MLP branch.

ACTIVATIONS = ("gelu", "gelu_tanh", "star_relu")


def activation(h: Tensor, kind: str, scale: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    """The MLP activation: GELU (erf, or its tanh approximation), or StarReLU
    ``scale * relu(h) ** 2 + bias`` (scale and bias: (1,) tensors, 1 and 0 when absent)."""
    if kind == "gelu":
        return F.gelu(h)
    if kind == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if kind == "star_relu":
        out = F.relu(h) ** 2
        if scale is not None:
            out = scale.to(h.dtype) * out
        return out if bias is None else out + bias.to(h.dtype)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {kind!r}")


def _linear_1x1(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """A 1x1 convolution of (N, C, H, W) by a (out, C) weight."""
    return F.conv2d(x, weight.to(x.dtype).view(*weight.shape, 1, 1), None if bias is None else bias.to(x.dtype))


def mlp_branch(
    x1: Tensor,
    *,
    norm2_weight: Optional[Tensor] = None,
    norm2_bias: Optional[Tensor] = None,
    eps2: float = 1e-5,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor] = None,
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor] = None,
    layer_scale2: Optional[Tensor] = None,
    res_scale2: Optional[Tensor] = None,
    sample_scale2: Optional[Tensor] = None,
    activation_kind: str = "gelu",
    act_scale: Optional[Tensor] = None,
    act_bias: Optional[Tensor] = None,
    gemm_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """``res_scale2 * x1 + layer_scale2 * sample_scale2 * fc2(act(fc1(GroupNorm1(x1))))``:
    the second branch of a block, as timm computes it (fc weights (hidden, C) and (C, hidden)).

    ``gemm_dtype`` (None: x1's) is the dtype of fc1, the activation and fc2, as autocast runs
    them; the norm, the scales and the residual stay in x1's dtype."""
    dt = x1.dtype
    gemm = gemm_dtype or dt
    u = F.group_norm(x1, 1, None if norm2_weight is None else norm2_weight.to(dt),
                     None if norm2_bias is None else norm2_bias.to(dt), eps2)
    h = _linear_1x1(u.to(gemm), fc1_weight, fc1_bias)
    o = _linear_1x1(activation(h, activation_kind, act_scale, act_bias), fc2_weight, fc2_bias).to(dt)
    if layer_scale2 is not None:
        o = o * _channel(layer_scale2, dt)
    if sample_scale2 is not None:
        o = o * sample_scale2.to(dt).view(-1, 1, 1, 1)
    shortcut = x1 if res_scale2 is None else x1 * _channel(res_scale2, dt)
    return shortcut + o


def poolformer_block(
    x: Tensor,
    *,
    norm1_weight: Optional[Tensor] = None,
    norm1_bias: Optional[Tensor] = None,
    layer_scale1: Optional[Tensor] = None,
    res_scale1: Optional[Tensor] = None,
    sample_scale1: Optional[Tensor] = None,
    num_groups1: int = 1,
    pool_size: int = 3,
    eps1: float = 1e-5,
    **mlp,
) -> Tensor:
    """A whole PoolFormer / MetaFormer pooling block: :func:`pool_mixer` (the token-mixer
    branch with its residual), then :func:`mlp_branch` (keyword arguments as there)."""
    x1 = pool_mixer(x, norm1_weight, norm1_bias, layer_scale=layer_scale1, res_scale=res_scale1,
                    sample_scale=sample_scale1, num_groups=num_groups1, pool_size=pool_size, eps=eps1)
    return mlp_branch(x1, **mlp)

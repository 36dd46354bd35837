"""The unfused PyTorch graph of the pool token mixer: the baseline of every test and benchmark.

GroupNorm -> AvgPool2d(k, stride 1, padding k//2, count_include_pad=False) -> subtract the
normed input -> layer scale -> drop-path (per-sample) scale -> residual add, exactly as
timm's ``MetaFormerBlock(token_mixer=Pooling)`` and the original PoolFormer block compute it.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


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
    pooled = F.avg_pool2d(normed, pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)
    mixed = pooled - normed
    if layer_scale is not None:
        mixed = mixed * _channel(layer_scale, dt)
    if sample_scale is not None:
        mixed = mixed * sample_scale.to(dt).view(-1, 1, 1, 1)
    shortcut = x if res_scale is None else x * _channel(res_scale, dt)
    return shortcut + mixed

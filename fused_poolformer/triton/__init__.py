"""The Triton backend: two ``torch.library.triton_op`` operators with the C++ operators'
contract (``fused_poolformer.contract``), registered with their autograd formula when this
package is imported:

    triton_pool_mixer_forward(x, weight, bias, layer_scale, res_scale, sample_scale,
                              num_groups, pool_size, eps) -> (y, mean, rstd)
    triton_pool_mixer_backward(grad_y, x, mean, rstd, weight, bias, layer_scale, res_scale,
                               sample_scale, num_groups, pool_size, eps, output_mask)
        -> (grad_x, grad_weight, grad_bias, grad_layer_scale, grad_res_scale)

A gradient not asked for comes back as an empty tensor (a Python custom operator cannot
return None); the autograd formula passes None on for it.  Each direction is one argument
check, its allocations (outputs and one workspace) and two kernel launches through
``wrap_triton`` (so that ``torch.compile(fullgraph=True)`` traces into them); no tensor
arithmetic runs around the launches.

Layout of the package, as the C++ backends: ``forward.py`` (statistics and apply kernels),
``backward.py`` (sums and dx kernels), ``common.py`` (shared device helpers, tile
geometry, autotuning), ``aot.py`` (ahead-of-time compilation for a GPU this machine may
not have: registers, spills and vector accesses of every kernel).

Under ``TRITON_INTERPRET=1`` (set before this import) the kernels run on CPU tensors
through Triton's interpreter (float32 and float64).
"""

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .. import contract
from . import backward, forward
from .common import INTERPRET as INTERPRETED
from .common import TileGeometry

__all__ = ["INTERPRETED", "backward_op", "forward_op", "geometry"]


def geometry(x: Tensor, num_groups: int, pool_size: int) -> TileGeometry:
    """The tile geometry of a (dense) x."""
    channels_last = contract.dense_format(x) == torch.channels_last
    return TileGeometry(x.shape, x.element_size(), channels_last, num_groups, pool_size)


def _launch(launches) -> None:
    for kernel, grid, kwargs in launches:
        wrap_triton(kernel)[grid](**kwargs)


@triton_op("fused_poolformer::triton_pool_mixer_forward", mutates_args=())
def forward_op(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    layer_scale: Optional[Tensor],
    res_scale: Optional[Tensor],
    sample_scale: Optional[Tensor],
    num_groups: int,
    pool_size: int,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    contract.check_forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, eps)
    fmt = contract.dense_format(x)
    x = x.contiguous(memory_format=fmt)
    y = torch.empty_like(x, memory_format=fmt)
    acc = contract.stats_dtype(x.dtype)
    if x.numel() == 0:  # as the C++ kernels: mean 0 and rstd 1/sqrt(eps) for empty groups
        shape = (x.shape[0], num_groups)
        return y, x.new_zeros(shape, dtype=acc), x.new_full(shape, 1.0 / math.sqrt(eps), dtype=acc)
    geo = geometry(x, num_groups, pool_size)
    mean = x.new_empty((geo.N, geo.G), dtype=acc)
    rstd = torch.empty_like(mean)
    workspace = x.new_empty((forward.workspace_numel(geo),), dtype=acc)
    _launch(forward.forward_launches(x, y, mean, rstd, workspace, weight, layer_scale, res_scale, sample_scale,
                                     geo, eps))
    return y, mean, rstd


@triton_op("fused_poolformer::triton_pool_mixer_backward", mutates_args=())
def backward_op(
    grad_y: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    layer_scale: Optional[Tensor],
    res_scale: Optional[Tensor],
    sample_scale: Optional[Tensor],
    num_groups: int,
    pool_size: int,
    eps: float,
    output_mask: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    contract.check_backward(grad_y, x, mean, rstd, weight, bias, layer_scale, res_scale, sample_scale, num_groups,
                            pool_size, eps, output_mask)
    fmt = contract.dense_format(x)
    x = x.contiguous(memory_format=fmt)
    dy = grad_y.contiguous(memory_format=fmt)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    dx = torch.empty_like(x, memory_format=fmt) if output_mask[0] else None
    params = (weight, bias, layer_scale, res_scale)
    grads = [contract.gradient_like(wanted, p, x) for wanted, p in zip(output_mask[1:], params)]
    if x.numel() == 0:  # nothing to sum: zero parameter gradients
        grads = [None if g is None else g.zero_() for g in grads]
    elif dx is not None or any(g is not None for g in grads):
        geo = geometry(x, num_groups, pool_size)
        workspace = x.new_empty((backward.workspace_numel(geo),), dtype=contract.stats_dtype(x.dtype))
        _launch(backward.backward_launches(x, dy, dx, mean, rstd, workspace, weight, layer_scale, res_scale,
                                           sample_scale, grads, geo))
    outputs = (dx, *grads)
    return tuple(x.new_empty((0,)) if g is None else g for g in outputs)


contract.register_autograd(forward_op, backward_op)

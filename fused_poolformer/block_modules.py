"""The block-level fused modules: a whole PoolFormer / MetaFormer pooling block -- token
mixer, Norm2, fc1, the activation, fc2, both layer scales, both drop paths and both
residuals -- in one operator pair (``poolformer_block``, docs/block.md).

They subclass the mixer-level blocks of ``fused_poolformer.modules`` and adopt the original
block's state the same way (same submodules, parameters and ``state_dict()``; no derived
weight is stored: the operator folds Norm2's affine and layer scale 2 into the GEMMs on
every call).  ``convert_model(model, fuse="block")`` (the default) builds them where
``convert.check_block_level`` allows; the mixer-level class stays the fallback.

Under ``torch.jit.is_tracing()`` (fvcore's MAC counting, ``torch.jit.trace``) a block runs
the original forward module by module (``unfused_forward``): plain fvcore then counts the
paper's MACs, with no op handles.  ``poolformer_block`` is an fx leaf (one ``call_function``
node per block under ``torch.fx.symbolic_trace``), and under ``torch.jit.script`` the blocks
call the C++ operator through ``torch.ops`` (``_scripted_forward``), as the mixer-level ones do.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .modules import (FusedMetaFormerBlock, FusedPoolFormerBlock, _module_drop_path_scale, drop_path_scale,
                      norm_arguments, scale_parameter_name)
from .ops import poolformer_block

# An fx leaf, as modules.py makes pool_mixer one: torch.fx.symbolic_trace (and the fx feature
# extractors) record each block's call as one call_function node.
torch.fx.wrap("poolformer_block")

__all__ = ["BlockFusedMetaFormerBlock", "BlockFusedPoolFormerBlock", "activation_of", "RECOMPUTE_CHOICES"]

# What the backward may recompute instead of saving: None (save x, fc1's output and the
# statistics) or "mlp" (save x and the statistics; fc1 runs again in the backward).
RECOMPUTE_CHOICES = (None, "mlp")


def activation_of(act: nn.Module) -> Tuple[Optional[str], Optional[Tensor], Optional[Tensor], Optional[str]]:
    """(kind, scale, bias, None) of an MLP activation module the block operator computes,
    or (None, None, None, reason)."""
    name = type(act).__name__
    if name == "GELU":
        approximate = getattr(act, "approximate", "none")
        kind = {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
        if kind is None:
            return None, None, None, f"mlp.act is GELU(approximate={approximate!r})"
        return kind, None, None, None
    if name == "StarReLU":
        scale, bias = getattr(act, "scale", None), getattr(act, "bias", None)
        for what, p in (("scale", scale), ("bias", bias)):
            if not isinstance(p, nn.Parameter) or tuple(p.shape) != (1,):
                return None, None, None, f"mlp.act.{what} is not a (1,) Parameter"
        return "star_relu", scale, bias, None
    return None, None, None, f"mlp.act is {name}, not GELU or StarReLU"


class _BlockLevel:
    """What both block-level classes share: the MLP's arguments and the call."""

    level = "block"

    def _read_mlp_settings(self, recompute: Optional[str] = None) -> None:
        self.activation, _, _, _ = activation_of(self.mlp.act)
        self.recompute = recompute

    def set_recompute(self, recompute: Optional[str]) -> None:
        """None: the backward reads the saved fc1 output; "mlp": it is not saved, and the
        backward runs fc1 again (less memory, one more GEMM)."""
        if recompute not in RECOMPUTE_CHOICES:
            raise ValueError(f"{type(self).__name__}: recompute must be one of {RECOMPUTE_CHOICES}, got {recompute!r}")
        self.recompute = recompute

    def forward(self, x: Tensor) -> Tensor:
        """The fused call (``_forward``); under TorchScript its twin through torch.ops
        (``_scripted_forward``; the reference backend: the original modules); under
        ``torch.jit.trace`` (fvcore) the original modules (``unfused_forward``)."""
        if torch.jit.is_scripting():
            if self.backend == "reference":
                return self.unfused_forward(x)
            return self._scripted_forward(x)
        if torch.jit.is_tracing():
            return self.unfused_forward(x)
        return self._forward(x)

    @torch.jit.unused
    def _block(self, x: Tensor, layer_scale1, res_scale1, drop_path1, layer_scale2, res_scale2,
               drop_path2) -> Tensor:
        weight1, bias1, groups1, eps1 = norm_arguments(self.norm1)
        weight2, bias2, _, eps2 = norm_arguments(self.norm2)
        _, act_scale, act_bias, _ = activation_of(self.mlp.act)
        # Drop path draws in the original's order: the mixer branch's mask, then the MLP's.
        sample1 = _module_drop_path_scale(x, drop_path1)
        sample2 = _module_drop_path_scale(x, drop_path2)
        return poolformer_block(
            x,
            norm1_weight=weight1, norm1_bias=bias1, layer_scale1=layer_scale1, res_scale1=res_scale1,
            sample_scale1=sample1, num_groups1=groups1, pool_size=self.pool_size, eps1=eps1,
            norm2_weight=weight2, norm2_bias=bias2, eps2=eps2,
            fc1_weight=self.mlp.fc1.weight, fc1_bias=self.mlp.fc1.bias,
            fc2_weight=self.mlp.fc2.weight, fc2_bias=self.mlp.fc2.bias,
            layer_scale2=layer_scale2, res_scale2=res_scale2, sample_scale2=sample2,
            activation=self.activation, act_scale=act_scale, act_bias=act_bias,
            # No backward to feed (inference): fc1's output need not exist at all.
            save_hidden=self.recompute != "mlp" and torch.is_grad_enabled(), backend=self.backend,
        )


def _scripted_block(x: Tensor, norm1_weight: Optional[Tensor], norm1_bias: Optional[Tensor],
                    layer_scale1: Optional[Tensor], res_scale1: Optional[Tensor], sample_scale1: Optional[Tensor],
                    num_groups1: int, pool_size: int, eps1: float, norm2_weight: Optional[Tensor],
                    norm2_bias: Optional[Tensor], eps2: float, fc1_weight: Tensor, fc1_bias: Optional[Tensor],
                    fc2_weight: Tensor, fc2_bias: Optional[Tensor], layer_scale2: Optional[Tensor],
                    res_scale2: Optional[Tensor], sample_scale2: Optional[Tensor], activation: str,
                    act_scale: Optional[Tensor], act_bias: Optional[Tensor], backend: str) -> Tensor:
    """``poolformer_block`` as the scripted blocks call it: the C++ operator through torch.ops
    (its autograd is registered in C++).  ``__prepare_scriptable__`` refuses the backends
    TorchScript cannot reach; the reference backend runs the original modules instead."""
    if backend == "cpu" and not x.is_cpu:
        raise ValueError("poolformer_block: backend='cpu' cannot serve a tensor on " + str(x.device))
    if backend == "cuda" and not x.is_cuda:
        raise ValueError("poolformer_block: backend='cuda' cannot serve a tensor on " + str(x.device))
    return torch.ops.fused_poolformer.block_forward(
        x, norm1_weight, norm1_bias, layer_scale1, res_scale1, sample_scale1, num_groups1, pool_size, eps1,
        norm2_weight, norm2_bias, eps2, fc1_weight.flatten(1), fc1_bias, fc2_weight.flatten(1), fc2_bias,
        layer_scale2, res_scale2, sample_scale2, activation, act_scale, act_bias, None,
        torch.is_grad_enabled())[0]


class BlockFusedMetaFormerBlock(_BlockLevel, FusedMetaFormerBlock):
    """A ``MetaFormerBlock`` with a ``Pooling`` token mixer and a plain MLP, whole (timm's on
    (N, C, H, W), the MetaFormer-baselines one on (N, H, W, C)); keeps every submodule of
    :class:`~fused_poolformer.modules.FusedMetaFormerBlock`."""

    BYPASSED = FusedMetaFormerBlock.BYPASSED + ("norm2", "mlp", "drop_path2", "layer_scale2", "res_scale2")

    def _read_settings(self) -> None:
        super()._read_settings()
        self.layer_scale2_name = scale_parameter_name(self.layer_scale2)
        self.res_scale2_name = scale_parameter_name(self.res_scale2)
        self._read_mlp_settings()

    def unfused_forward(self, x: Tensor) -> Tensor:
        """The original block's forward, module by module (what fvcore and torch.jit.trace see)."""
        x = self.res_scale1(x) + self.layer_scale1(self.drop_path1(self.token_mixer(self.norm1(x))))
        return self.res_scale2(x) + self.layer_scale2(self.drop_path2(self.mlp(self.norm2(x))))

    def _scripted_forward(self, x: Tensor) -> Tensor:
        """``_forward`` under TorchScript: every argument read as the scripted mixer-level
        block reads its own (``hasattr`` is decided when the block is compiled)."""
        nhwc = self.layout == "NHWC"
        if nhwc:
            if x.dim() != 4:
                raise ValueError("BlockFusedMetaFormerBlock: x must be 4-D (N, H, W, C)")
            x = x.permute(0, 3, 1, 2)
        norm1_weight: Optional[Tensor] = None
        norm1_bias: Optional[Tensor] = None
        norm2_weight: Optional[Tensor] = None
        norm2_bias: Optional[Tensor] = None
        num_groups1 = 1
        if hasattr(self.norm1, "use_scale"):  # LayerNormGeneral over (H, W, C): one group
            if self.norm1.use_scale:
                norm1_weight = self.norm1.weight
            if self.norm1.use_bias:
                norm1_bias = self.norm1.bias
            if self.norm2.use_scale:
                norm2_weight = self.norm2.weight
            if self.norm2.use_bias:
                norm2_bias = self.norm2.bias
        else:  # nn.GroupNorm
            norm1_weight, norm1_bias, num_groups1 = self.norm1.weight, self.norm1.bias, self.norm1.num_groups
            norm2_weight, norm2_bias = self.norm2.weight, self.norm2.bias
        layer_scale1: Optional[Tensor] = None
        layer_scale2: Optional[Tensor] = None
        res_scale1: Optional[Tensor] = None
        res_scale2: Optional[Tensor] = None
        if hasattr(self.layer_scale1, "scale"):
            layer_scale1 = self.layer_scale1.scale
        elif hasattr(self.layer_scale1, "gamma"):
            layer_scale1 = self.layer_scale1.gamma
        if hasattr(self.layer_scale2, "scale"):
            layer_scale2 = self.layer_scale2.scale
        elif hasattr(self.layer_scale2, "gamma"):
            layer_scale2 = self.layer_scale2.gamma
        if hasattr(self.res_scale1, "scale"):
            res_scale1 = self.res_scale1.scale
        elif hasattr(self.res_scale1, "gamma"):
            res_scale1 = self.res_scale1.gamma
        if hasattr(self.res_scale2, "scale"):
            res_scale2 = self.res_scale2.scale
        elif hasattr(self.res_scale2, "gamma"):
            res_scale2 = self.res_scale2.gamma
        sample_scale1: Optional[Tensor] = None
        sample_scale2: Optional[Tensor] = None
        if hasattr(self.drop_path1, "drop_prob"):
            keep1 = True
            if hasattr(self.drop_path1, "scale_by_keep"):
                keep1 = self.drop_path1.scale_by_keep
            sample_scale1 = drop_path_scale(x, self.drop_path1.drop_prob, self.drop_path1.training, keep1)
        if hasattr(self.drop_path2, "drop_prob"):
            keep2 = True
            if hasattr(self.drop_path2, "scale_by_keep"):
                keep2 = self.drop_path2.scale_by_keep
            sample_scale2 = drop_path_scale(x, self.drop_path2.drop_prob, self.drop_path2.training, keep2)
        act_scale: Optional[Tensor] = None
        act_bias: Optional[Tensor] = None
        if hasattr(self.mlp.act, "scale"):  # StarReLU
            act_scale, act_bias = self.mlp.act.scale, self.mlp.act.bias
        out = _scripted_block(x, norm1_weight, norm1_bias, layer_scale1, res_scale1, sample_scale1, num_groups1,
                              self.pool_size, self.norm1.eps, norm2_weight, norm2_bias, self.norm2.eps,
                              self.mlp.fc1.weight, self.mlp.fc1.bias, self.mlp.fc2.weight, self.mlp.fc2.bias,
                              layer_scale2, res_scale2, sample_scale2, self.activation, act_scale, act_bias,
                              self.backend)
        if nhwc:
            return out.permute(0, 2, 3, 1)
        return out

    @torch.jit.unused
    def _forward(self, x: Tensor) -> Tensor:
        # (fx: a Proxy has no number of dimensions to check; the op checks it when the graph runs)
        if self.layout == "NHWC" and not isinstance(x, torch.fx.Proxy) and x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: x must be 4-D (N, H, W, C), got shape {tuple(x.shape)}")
        nchw = x.permute(0, 3, 1, 2) if self.layout == "NHWC" else x
        out = self._block(
            nchw,
            layer_scale1=self._vector(self.layer_scale1, self.layer_scale1_name),
            res_scale1=self._vector(self.res_scale1, self.res_scale1_name),
            drop_path1=self.drop_path1,
            layer_scale2=self._vector(self.layer_scale2, self.layer_scale2_name),
            res_scale2=self._vector(self.res_scale2, self.res_scale2_name),
            drop_path2=self.drop_path2,
        )
        return out.permute(0, 2, 3, 1) if self.layout == "NHWC" else out

    def extra_repr(self) -> str:
        return (f"fused block: layout={self.layout}, pool_size={self.pool_size}, activation={self.activation!r}, "
                f"recompute={self.recompute!r}, backend={self.backend!r}")


class BlockFusedPoolFormerBlock(_BlockLevel, FusedPoolFormerBlock):
    """The original PoolFormer repository's ``PoolFormerBlock``, whole.  Its one ``drop_path``
    module serves both branches: two draws, in the original's order."""

    BYPASSED = FusedPoolFormerBlock.BYPASSED + ("norm2", "mlp")

    def _read_settings(self) -> None:
        super()._read_settings()
        self._read_mlp_settings()

    def unfused_forward(self, x: Tensor) -> Tensor:
        """The original block's forward, module by module (what fvcore and torch.jit.trace see)."""
        if self.use_layer_scale:
            x = x + self.drop_path(self.layer_scale_1.unsqueeze(-1).unsqueeze(-1) * self.token_mixer(self.norm1(x)))
            return x + self.drop_path(self.layer_scale_2.unsqueeze(-1).unsqueeze(-1) * self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.token_mixer(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _scripted_forward(self, x: Tensor) -> Tensor:
        """``_forward`` under TorchScript (as the original's forward, this compiles only
        where use_layer_scale is True)."""
        layer_scale1: Optional[Tensor] = None
        layer_scale2: Optional[Tensor] = None
        if self.use_layer_scale:
            layer_scale1, layer_scale2 = self.layer_scale_1, self.layer_scale_2
        sample_scale1: Optional[Tensor] = None
        sample_scale2: Optional[Tensor] = None
        if hasattr(self.drop_path, "drop_prob"):  # one module, two draws in the original's order
            keep = True
            if hasattr(self.drop_path, "scale_by_keep"):
                keep = self.drop_path.scale_by_keep
            sample_scale1 = drop_path_scale(x, self.drop_path.drop_prob, self.drop_path.training, keep)
            sample_scale2 = drop_path_scale(x, self.drop_path.drop_prob, self.drop_path.training, keep)
        return _scripted_block(x, self.norm1.weight, self.norm1.bias, layer_scale1, None, sample_scale1,
                               self.norm1.num_groups, self.pool_size, self.norm1.eps, self.norm2.weight,
                               self.norm2.bias, self.norm2.eps, self.mlp.fc1.weight, self.mlp.fc1.bias,
                               self.mlp.fc2.weight, self.mlp.fc2.bias, layer_scale2, None, sample_scale2,
                               self.activation, None, None, self.backend)

    @torch.jit.unused
    def _forward(self, x: Tensor) -> Tensor:
        scale1 = self.layer_scale_1 if self.use_layer_scale else None
        scale2 = self.layer_scale_2 if self.use_layer_scale else None
        return self._block(x, layer_scale1=scale1, res_scale1=None, drop_path1=self.drop_path,
                           layer_scale2=scale2, res_scale2=None, drop_path2=self.drop_path)

    def extra_repr(self) -> str:
        return (f"fused block: layout=NCHW, pool_size={self.pool_size}, activation={self.activation!r}, "
                f"recompute={self.recompute!r}, backend={self.backend!r}")

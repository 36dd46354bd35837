"""The official MetaFormer baselines (sail-sg/metaformer, ``metaformer_baselines.py``:
IdentityFormer, RandFormer, PoolFormerV2, ConvFormer, CAFormer), re-implemented for the
tests from the structure of the original, which cannot be imported here.

Between the downsampling layers every tensor is (N, H, W, C).  ``MetaFormerBlock`` has the
attribute names of timm's block; its norms are ``LayerNormGeneral`` (over (H, W, C) in
PoolFormerV2, over C in ConvFormer / CAFormer), its scales ``Scale`` modules multiplying
the last dimension, its drop paths timm's ``DropPath``, as in the original.  Attribute
names, module order and forward formulas follow the original, since that is what
``convert_model`` reads and what the fused blocks must reproduce.
"""

from functools import partial

import torch
from timm.layers import DropPath
from torch import nn


class LayerNormGeneral(nn.Module):
    """Normalizes over ``normalized_dim`` (population variance, ``x / sqrt(var + eps)``),
    then multiplies by ``weight`` and adds ``bias``, both of ``affine_shape``.  Over dims
    (1, 2, 3) of (N, H, W, C) with a (C,) weight it is GroupNorm(1) in NHWC; over (-1,)
    it is a LayerNorm over the channels of each position."""

    def __init__(self, affine_shape=None, normalized_dim=(-1,), scale=True, bias=True, eps=1e-5):
        super().__init__()
        self.normalized_dim = normalized_dim
        self.use_scale = scale
        self.use_bias = bias
        self.weight = nn.Parameter(torch.ones(affine_shape)) if scale else None
        self.bias = nn.Parameter(torch.zeros(affine_shape)) if bias else None
        self.eps = eps

    def forward(self, x):
        centred = x - x.mean(self.normalized_dim, keepdim=True)
        variance = centred.pow(2).mean(self.normalized_dim, keepdim=True)
        out = centred / torch.sqrt(variance + self.eps)
        if self.use_scale:
            out = out * self.weight
        if self.use_bias:
            out = out + self.bias
        return out


class Scale(nn.Module):
    """Per-channel scale of the last dimension (no ``shape`` attribute, unlike timm's)."""

    def __init__(self, dim, init_value=1.0, trainable=True):
        super().__init__()
        self.scale = nn.Parameter(init_value * torch.ones(dim), requires_grad=trainable)

    def forward(self, x):
        return x * self.scale


class StarReLU(nn.Module):
    """s * relu(x)^2 + b with learnable scalars s and b."""

    def __init__(self, scale_value=1.0, bias_value=0.0):
        super().__init__()
        self.relu = nn.ReLU()
        self.scale = nn.Parameter(scale_value * torch.ones(1))
        self.bias = nn.Parameter(bias_value * torch.ones(1))

    def forward(self, x):
        return self.scale * self.relu(x) ** 2 + self.bias


class Pooling(nn.Module):
    """Pools (N, H, W, C) through its (N, C, H, W) view, minus x."""

    def __init__(self, pool_size=3, **kwargs):
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x):
        pooled = self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return pooled - x


class RandomMixing(nn.Module):
    """RandFormer's token mixer: a fixed random (tokens x tokens) matrix."""

    def __init__(self, num_tokens=196, **kwargs):
        super().__init__()
        self.random_matrix = nn.Parameter(torch.softmax(torch.rand(num_tokens, num_tokens), dim=-1),
                                          requires_grad=False)

    def forward(self, x):
        n, h, w, c = x.shape
        mixed = torch.einsum("mn,bnc->bmc", self.random_matrix, x.reshape(n, h * w, c))
        return mixed.reshape(n, h, w, c)


class SepConv(nn.Module):
    """ConvFormer's token mixer: pointwise, depthwise 7x7, pointwise."""

    def __init__(self, dim, expansion_ratio=2, kernel_size=7, padding=3, **kwargs):
        super().__init__()
        hidden = int(expansion_ratio * dim)
        self.pwconv1 = nn.Linear(dim, hidden, bias=False)
        self.act1 = StarReLU()
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size, padding=padding, groups=hidden, bias=False)
        self.act2 = nn.Identity()
        self.pwconv2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        x = self.act1(self.pwconv1(x))
        x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.pwconv2(self.act2(x))


class BaselineMlp(nn.Module):
    """Two Linear layers on the last dimension, StarReLU between, no biases."""

    def __init__(self, dim, mlp_ratio=4, act_layer=StarReLU, drop=0.0, bias=False, **kwargs):
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class MetaFormerBlock(nn.Module):
    """The baselines' block on (N, H, W, C): the attribute names of timm's block, with
    ``Scale`` / ``nn.Identity`` scales and ``DropPath`` / ``nn.Identity`` drop paths."""

    def __init__(self, dim, token_mixer=nn.Identity, mlp=BaselineMlp, norm_layer=nn.LayerNorm, drop=0.0,
                 drop_path=0.0, layer_scale_init_value=None, res_scale_init_value=None):
        super().__init__()
        scale = lambda init: Scale(dim, init_value=init) if init else nn.Identity()
        self.norm1 = norm_layer(dim)
        self.token_mixer = token_mixer(dim=dim, drop=drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.layer_scale1 = scale(layer_scale_init_value)
        self.res_scale1 = scale(res_scale_init_value)
        self.norm2 = norm_layer(dim)
        self.mlp = mlp(dim=dim, drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.layer_scale2 = scale(layer_scale_init_value)
        self.res_scale2 = scale(res_scale_init_value)

    def forward(self, x):
        x = self.res_scale1(x) + self.layer_scale1(self.drop_path1(self.token_mixer(self.norm1(x))))
        return self.res_scale2(x) + self.layer_scale2(self.drop_path2(self.mlp(self.norm2(x))))


class Downsampling(nn.Module):
    """Optional norm, optional (N, H, W, C) -> (N, C, H, W), a strided convolution, back
    to (N, H, W, C) (a view: the result is channels-last only if the conv's output was
    channels_last), optional norm."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, pre_norm=None,
                 post_norm=None, pre_permute=False):
        super().__init__()
        self.pre_norm = pre_norm(in_channels) if pre_norm else nn.Identity()
        self.pre_permute = pre_permute
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.post_norm = post_norm(out_channels) if post_norm else nn.Identity()

    def forward(self, x):
        x = self.pre_norm(x)
        if self.pre_permute:
            x = x.permute(0, 3, 1, 2)
        return self.post_norm(self.conv(x).permute(0, 2, 3, 1))


BASELINE_NORM = partial(LayerNormGeneral, bias=False, eps=1e-6)  # over C: the default norm_layers
POOLFORMERV2_NORM = partial(LayerNormGeneral, normalized_dim=(1, 2, 3), bias=False, eps=1e-6)
DOWNSAMPLING = [partial(Downsampling, kernel_size=7, stride=4, padding=2, post_norm=BASELINE_NORM)] + [
    partial(Downsampling, kernel_size=3, stride=2, padding=1, pre_norm=BASELINE_NORM, pre_permute=True)] * 3


def per_stage(value, stages):
    return list(value) if isinstance(value, (list, tuple)) else [value] * stages


class BaselineMetaFormer(nn.Module):
    """The baselines' ``MetaFormer``: ``downsample_layers`` and ``stages`` (Sequentials of
    MetaFormerBlocks) alternate, then a LayerNorm of the pooled features and the head."""

    def __init__(self, in_chans=3, num_classes=1000, depths=(2, 2, 6, 2), dims=(64, 128, 320, 512),
                 token_mixers=nn.Identity, mlps=BaselineMlp, norm_layers=BASELINE_NORM, drop_path_rate=0.0,
                 layer_scale_init_values=None, res_scale_init_values=(None, None, 1.0, 1.0)):
        super().__init__()
        stages = len(depths)
        down_dims = [in_chans] + list(dims)
        self.num_stage = stages
        self.downsample_layers = nn.ModuleList(DOWNSAMPLING[i](down_dims[i], down_dims[i + 1]) for i in range(stages))
        mixers, mlps, norms = (per_stage(v, stages) for v in (token_mixers, mlps, norm_layers))
        layer_scales, res_scales = (per_stage(v, stages) for v in (layer_scale_init_values, res_scale_init_values))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.stages.append(nn.Sequential(*[
                MetaFormerBlock(dims[i], token_mixer=mixers[i], mlp=mlps[i], norm_layer=norms[i],
                                drop_path=rates[first + j], layer_scale_init_value=layer_scales[i],
                                res_scale_init_value=res_scales[i])
                for j in range(depth)]))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x):
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return self.head(self.norm(x.mean((1, 2))))


def poolformerv2_s12(**kwargs) -> BaselineMetaFormer:
    """The baselines' ``poolformerv2_s12``: 12 pooling blocks, GroupNorm(1)-like norms."""
    return BaselineMetaFormer(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512), token_mixers=Pooling,
                              norm_layers=POOLFORMERV2_NORM, **kwargs)


def convformer_s18(**kwargs) -> BaselineMetaFormer:
    """The baselines' ``convformer_s18`` (its MLP head left out): SepConv mixers, norms over C."""
    return BaselineMetaFormer(depths=(3, 3, 9, 3), dims=(64, 128, 320, 512), token_mixers=SepConv, **kwargs)

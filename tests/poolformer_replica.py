"""The original PoolFormer repository's model (sail-sg/poolformer, ``models/poolformer.py``),
re-implemented for the tests since that repository cannot be imported: ``PoolFormerBlock``
on (N, C, H, W) tensors with a bare ``layer_scale_1`` Parameter and timm's ``DropPath``, as
the original has.  Attribute names, module order and forward formulas follow the original,
since that is what ``convert_model`` reads and what the fused blocks must reproduce.
"""

import torch
from timm.layers import DropPath
from torch import nn


class OriginalGroupNorm(nn.GroupNorm):
    """GroupNorm with 1 group (the repository's ``GroupNorm``)."""

    def __init__(self, num_channels, **kwargs):
        super().__init__(1, num_channels, **kwargs)


class LayerNormChannel(nn.Module):
    """The repository's channel-only LayerNorm (an alternative ``norm_layer``)."""

    def __init__(self, num_channels, eps=1e-05):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight.unsqueeze(-1).unsqueeze(-1) * x + self.bias.unsqueeze(-1).unsqueeze(-1)


class Pooling(nn.Module):
    def __init__(self, pool_size=3, count_include_pad=False):
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=count_include_pad)

    def forward(self, x):
        return self.pool(x) - x


class OriginalMlp(nn.Module):
    def __init__(self, in_features, hidden_features, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden_features, in_features, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PoolFormerBlock(nn.Module):
    def __init__(self, dim, pool_size=3, mlp_ratio=4.0, act_layer=nn.GELU, norm_layer=OriginalGroupNorm,
                 drop=0.0, drop_path=0.0, use_layer_scale=True, layer_scale_init_value=1e-5,
                 count_include_pad=False):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.token_mixer = Pooling(pool_size=pool_size, count_include_pad=count_include_pad)
        self.norm2 = norm_layer(dim)
        self.mlp = OriginalMlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.use_layer_scale = use_layer_scale
        if use_layer_scale:
            self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones((dim)), requires_grad=True)
            self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones((dim)), requires_grad=True)

    def forward(self, x):
        if self.use_layer_scale:
            x = x + self.drop_path(self.layer_scale_1.unsqueeze(-1).unsqueeze(-1) * self.token_mixer(self.norm1(x)))
            x = x + self.drop_path(self.layer_scale_2.unsqueeze(-1).unsqueeze(-1) * self.mlp(self.norm2(x)))
        else:
            x = x + self.drop_path(self.token_mixer(self.norm1(x)))
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, stride, padding, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x))


class OriginalPoolFormer(nn.Module):
    """The repository's ``PoolFormer`` (classification), small: ``network`` alternates
    stages (Sequential of PoolFormerBlocks) and downsampling PatchEmbeds."""

    def __init__(self, layers=(2, 2), embed_dims=(16, 32), pool_size=3, use_layer_scale=True,
                 layer_scale_init_value=1e-5, drop_path_rate=0.0, norm_layer=OriginalGroupNorm,
                 num_classes=10, count_include_pad=False):
        super().__init__()
        self.patch_embed = PatchEmbed(7, 4, 2, 3, embed_dims[0])
        network = []
        for i, depth in enumerate(layers):
            blocks = []
            for j in range(depth):
                rate = drop_path_rate * (j + sum(layers[:i])) / max(sum(layers) - 1, 1)
                blocks.append(PoolFormerBlock(
                    embed_dims[i], pool_size=pool_size, norm_layer=norm_layer, drop_path=rate,
                    use_layer_scale=use_layer_scale, layer_scale_init_value=layer_scale_init_value,
                    count_include_pad=count_include_pad))
            network.append(nn.Sequential(*blocks))
            if i + 1 < len(layers):
                network.append(PatchEmbed(3, 2, 1, embed_dims[i], embed_dims[i + 1]))
        self.network = nn.ModuleList(network)
        self.norm = norm_layer(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        for stage in self.network:
            x = stage(x)
        return self.head(self.norm(x).mean([-2, -1]))

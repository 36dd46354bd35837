"""convert_model on timm PoolFormers, hybrid MetaFormers and the original repository's layout.

Every test compares a converted model with the unconverted one on random data: outputs
and every parameter gradient (relative error < 1e-4 in float32), the fused operator
running once per converted block in the forward and once in the backward, and
``state_dict()`` unchanged.  The helpers here (the original PoolFormer re-implementation,
comparisons, op counting) are shared with test_modules.py and test_ddp.py.
"""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import metaformer as timm_metaformer
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fused_poolformer.convert import check_block, convert_model
from fused_poolformer.modules import FusedMetaFormerBlock, FusedPoolFormerBlock

REL_TOL = 1e-4


# ---------------------------------------------------------------------------------------
# The original PoolFormer repository's model (sail-sg/poolformer, models/poolformer.py),
# re-implemented faithfully since that repository cannot be imported.  It uses timm's
# DropPath, as the original does.


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


# ---------------------------------------------------------------------------------------
# Shared helpers.


def tiny_metaformer(**kwargs) -> timm_metaformer.MetaFormer:
    """A small timm MetaFormer with pooling mixers, v1 layer scale and v2 res scale."""
    from timm.layers import GroupNorm1

    args = dict(depths=(2, 2), dims=(16, 32), token_mixers=timm_metaformer.Pooling, norm_layers=GroupNorm1,
                downsample_norm=None, mlp_act=nn.GELU, mlp_bias=True, layer_scale_init_values=1e-5,
                res_scale_init_values=(None, 1.0), use_mlp_head=False, num_classes=10)
    args.update(kwargs)
    return timm_metaformer.MetaFormer(**args)


def randomize_vectors(model: nn.Module, seed: int = 0) -> None:
    """Random values for every 1-D parameter (norm affines, layer/res scales), so that
    the token mixer contributes to the output and every one of them gets a gradient
    (the default layer scale of 1e-5 would hide the mixer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.numel() > 1:
                sign = torch.randint(0, 2, p.shape, generator=g) * 2 - 1
                p.copy_(sign * (torch.rand(p.shape, generator=g) * 0.8 + 0.2))


def random_timm_model(name: str, seed: int = 0) -> nn.Module:
    """A timm model with random weights, built on the meta device and filled directly:
    timm's truncated-normal init of 50-70 M parameters costs seconds on 2 cores."""
    model = timm.create_model(name, pretrained=False, num_classes=10, device="meta").to_empty(device="cpu")
    assert not list(model.buffers()), "random_timm_model fills parameters only"
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("act.scale", "act.bias")):  # StarReLU: s * relu(x)**2 + b
                p.fill_(1.0 if name.endswith("scale") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    randomize_vectors(model, seed)
    return model.eval()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.detach().double()
    return ((actual.detach().double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def analytically_zero(name: str, fused: nn.Module) -> bool:
    """The token-mixer norm bias of a converted block: its gradient is exactly zero
    (it cancels out of pool(n) - n, DESIGN.md section 2)."""
    block_name, _, param = name.rpartition(".")
    if param != "bias" or not block_name.endswith("norm1"):
        return False
    block = fused.get_submodule(block_name.rpartition(".")[0])
    return isinstance(block, (FusedMetaFormerBlock, FusedPoolFormerBlock))


def gradients(model: nn.Module) -> dict:
    return {name: p.grad for name, p in model.named_parameters()}


def assert_gradients_match(expected: dict, fused: nn.Module, tol: float = REL_TOL) -> None:
    """Every parameter gradient of ``fused`` equals ``expected[name]`` (the unfused
    model's; relative error < tol).  A converted norm1 bias gets exact zeros; the unfused
    graph gets rounding noise there, small against the norm1 weight's gradient."""
    actual = gradients(fused)
    assert list(actual) == list(expected), "parameter names changed"
    for name, grad in expected.items():
        assert actual[name] is not None, f"{name}: no gradient in the converted model"
        if analytically_zero(name, fused):
            assert torch.count_nonzero(actual[name]) == 0, f"{name}: gradient should be exactly zero"
            weight_grad = expected[name[: -len("bias")] + "weight"]
            assert grad.abs().max() <= tol * weight_grad.abs().max(), f"{name}: unfused gradient not ~0"
            continue
        err = relative_error(actual[name], grad)
        assert err < tol, f"{name}: gradient relative error {err:.2e}"


def assert_state_dict_unchanged(before: dict, model: nn.Module) -> None:
    after = model.state_dict()
    assert list(after) == list(before), "state_dict keys (or their order) changed"
    for key, value in before.items():
        assert torch.equal(after[key], value), f"state_dict value {key} changed"


class CountFusedOps(TorchDispatchMode):
    """Counts the fused forward and backward operators as they are dispatched, and
    records the (dtype, channels_last) of each forward's input and output."""

    def __init__(self):
        super().__init__()
        self.forward = self.backward = 0
        self.forward_layouts = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.fused_poolformer.pool_mixer_forward.default:
            self.forward += 1
            y = func(*args, **(kwargs or {}))
            layout = lambda t: (t.dtype, t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous())
            self.forward_layouts.append((layout(args[0]), layout(y[0])))
            return y
        elif func is torch.ops.fused_poolformer.pool_mixer_backward.default:
            self.backward += 1
        return func(*args, **(kwargs or {}))


def count_pooling_blocks(model: nn.Module) -> int:
    return sum(type(m).__name__ == "Pooling" for m in model.modules())


def forward_backward(model: nn.Module, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Output of ``model`` and backward of a random projection of it.  The global RNG is
    seeded first, so that models in training mode draw the same drop-path masks."""
    torch.manual_seed(seed)
    y = model(x)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * grad_out).sum().backward()
    return y.detach()


def run_and_compare(model: nn.Module, x: torch.Tensor, expect_converted=None, inplace=False):
    """Runs ``model`` unfused, converts it and checks outputs, gradients, fused-op counts
    and state_dict.  ``inplace`` converts ``model`` itself (saving a copy of a big model;
    its unfused gradients are set aside first), else a copy, and checks that ``model``
    is left as it was.  Returns the converted model."""
    expected_blocks = count_pooling_blocks(model) if expect_converted is None else expect_converted
    y_ref = forward_backward(model, x)
    expected_grads = gradients(model)
    before = model.state_dict() if inplace else {k: v.clone() for k, v in model.state_dict().items()}
    fused = convert_model(model, backend="cpu", inplace=inplace)
    if inplace:
        model.zero_grad(set_to_none=True)
    assert len(fused.fused_poolformer_report.converted) == expected_blocks, str(fused.fused_poolformer_report)
    assert_state_dict_unchanged(before, fused)

    with CountFusedOps() as counter:
        y = forward_backward(fused, x)
    assert counter.forward == expected_blocks, f"fused forward ran {counter.forward} times for {expected_blocks} blocks"
    assert counter.backward == expected_blocks, f"fused backward ran {counter.backward} times for {expected_blocks} blocks"
    err = relative_error(y, y_ref)
    assert err < REL_TOL, f"output relative error {err:.2e}"
    assert_gradients_match(expected_grads, fused)
    if not inplace:
        assert_state_dict_unchanged(before, model)
        assert all(p.grad is g for p, g in zip(model.parameters(), expected_grads.values())), "original touched"
    return fused


# ---------------------------------------------------------------------------------------
# timm models.

# Input sizes keep the deep models fast on a 2-core CPU; 32x32 still leaves a 2x2 map
# (1x1 at the last stage) so the pool windows are clipped at every border.
TIMM_MODELS = [
    ("poolformer_s12", 64),
    ("poolformer_s24", 32),
    ("poolformer_s36", 32),
    ("poolformer_m36", 32),
    ("poolformer_m48", 32),
    ("poolformerv2_s12", 64),
]


@pytest.mark.parametrize("name,size", TIMM_MODELS)
def test_timm_poolformer_matches_unfused(name, size):
    model = random_timm_model(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2)) * 1.3 + 0.5
    fused = run_and_compare(model, x, inplace=True)
    assert all(isinstance(fused.get_submodule(n), FusedMetaFormerBlock) for n in fused.fused_poolformer_report.converted)
    assert fused.fused_poolformer_report.skipped == []


def test_hybrid_metaformer_converts_only_pooling_stages():
    torch.manual_seed(0)
    mixers = (timm_metaformer.Pooling,) * 2 + (timm_metaformer.Attention,) * 2
    norms = (timm_metaformer.GroupNorm1NoBias,) * 2 + (timm_metaformer.LayerNormNoBias,) * 2
    model = timm_metaformer.MetaFormer(depths=(1, 1, 1, 1), dims=(8, 16, 32, 32), token_mixers=mixers,
                                       norm_layers=norms, num_classes=10, head_dim=8)
    randomize_vectors(model)
    x = torch.randn(2, 3, 64, 64)
    fused = run_and_compare(model, x, expect_converted=2)
    report = fused.fused_poolformer_report
    assert report.converted == ["stages.0.blocks.0", "stages.1.blocks.0"]
    assert report.skipped == [
        ("stages.2.blocks.0", "token_mixer is Attention, not a Pooling mixer"),
        ("stages.3.blocks.0", "token_mixer is Attention, not a Pooling mixer"),
    ]


def test_caformer_converts_nothing_and_reports_why():
    model = timm.create_model("caformer_s18", pretrained=False, device="meta")  # structure only
    report = convert_model(model).fused_poolformer_report
    assert report.converted == []
    assert [r for _, r in report.skipped] == ["token_mixer is SepConv, not a Pooling mixer"] * 6 + [
        "token_mixer is Attention, not a Pooling mixer"] * 12


def test_pooling_block_with_layernorm_is_skipped():
    """poolformerv2's default MetaFormer norm (LayerNorm2dNoBias) is not a GroupNorm."""
    model = tiny_metaformer(norm_layers=timm.layers.LayerNorm2d)
    fused = convert_model(model)
    report = fused.fused_poolformer_report
    assert report.converted == []
    assert report.skipped[0] == ("stages.0.blocks.0", "norm1 is LayerNorm2d, not a GroupNorm")
    assert len(report.skipped) == 4


# ---------------------------------------------------------------------------------------
# The original repository's layout.


@pytest.mark.parametrize("use_layer_scale,pool_size", [(True, 3), (False, 3), (True, 5), (False, 5)])
def test_original_poolformer_matches_unfused(use_layer_scale, pool_size):
    torch.manual_seed(0)
    model = OriginalPoolFormer(pool_size=pool_size, use_layer_scale=use_layer_scale).eval()
    randomize_vectors(model)
    x = torch.randn(2, 3, 32, 32) * 1.3 + 0.5
    fused = run_and_compare(model, x, expect_converted=4)
    assert fused.fused_poolformer_report.converted == [f"network.{s}.{b}" for s in (0, 2) for b in (0, 1)]
    block = fused.network[0][0]
    assert isinstance(block, FusedPoolFormerBlock) and block.pool_size == pool_size
    assert hasattr(block, "layer_scale_1") == use_layer_scale


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        (dict(norm_layer=LayerNormChannel), "norm1 is LayerNormChannel, not a GroupNorm"),
        (dict(norm_layer=nn.BatchNorm2d), "norm1 is BatchNorm2d, not a GroupNorm"),
        (dict(count_include_pad=True), "pool has count_include_pad=True"),
    ],
)
def test_original_blocks_the_op_does_not_cover_are_skipped(kwargs, reason):
    torch.manual_seed(0)
    model = OriginalPoolFormer(layers=(1, 1), **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    fused = convert_model(model)
    report = fused.fused_poolformer_report
    assert report.converted == []
    assert report.skipped == [("network.0.0", reason), ("network.2.0", reason)]
    assert type(fused.network[0][0]) is PoolFormerBlock
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)


def test_pool_settings_outside_the_op_are_skipped():
    block = PoolFormerBlock(8)
    cases = {
        "pool stride 2 is not 1": dict(stride=2),
        "pool padding 0 is not kernel_size // 2 = 1": dict(padding=0),
        "pool kernel_size 4 is not a square odd window": dict(kernel_size=4, padding=2),
        "pool kernel_size (3, 5) is not a square odd window": dict(kernel_size=(3, 5), padding=(1, 2)),
    }
    for reason, pool_args in cases.items():
        args = dict(kernel_size=3, stride=1, padding=1, count_include_pad=False)
        args.update(pool_args)
        block.token_mixer.pool = nn.AvgPool2d(**args)
        assert check_block(block) == (None, reason)
    block.token_mixer.pool = nn.MaxPool2d(3, 1, 1)
    assert check_block(block) == (None, "token_mixer.pool is MaxPool2d, not AvgPool2d")


# ---------------------------------------------------------------------------------------
# Conversion semantics.


def test_inplace_keeps_parameter_objects_and_optimizer_state():
    """An optimizer built before an in-place conversion keeps training the same tensors,
    with the same result as the unconverted model."""
    torch.manual_seed(0)
    model = OriginalPoolFormer(layers=(1, 1))
    randomize_vectors(model)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    target = torch.randint(0, 10, (2,))

    params_before = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for net, opt in ((model, optimizer), (twin, twin_optimizer)):  # a step before converting
        F.cross_entropy(net(x), target).backward()
        opt.step()
        opt.zero_grad()

    converted = convert_model(model, inplace=True)
    assert converted is model
    assert all(a is b for a, b in zip(params_before, converted.parameters()))
    assert len(params_before) == len(list(converted.parameters()))
    for net, opt in ((converted, optimizer), (twin, twin_optimizer)):
        F.cross_entropy(net(x), target).backward()
        opt.step()
    for (name, p), q in zip(twin.named_parameters(), converted.parameters()):
        assert relative_error(q, p) < REL_TOL, name


def test_not_inplace_leaves_the_model_alone():
    model = tiny_metaformer()
    fused = convert_model(model)
    assert fused is not model
    assert count_pooling_blocks(model) == 4
    assert not any(isinstance(m, FusedMetaFormerBlock) for m in model.modules())
    assert not hasattr(model, "fused_poolformer_report")


def test_converting_twice_and_converting_a_block():
    fused = convert_model(tiny_metaformer())
    again = convert_model(fused).fused_poolformer_report
    assert again.converted == [] and all(reason == "already fused" for _, reason in again.skipped)
    block = PoolFormerBlock(8)
    converted = convert_model(block)
    assert isinstance(converted, FusedPoolFormerBlock)
    assert converted.fused_poolformer_report.converted == [""]


def test_report_is_logged(caplog):
    with caplog.at_level("INFO", logger="fused_poolformer"):
        convert_model(tiny_metaformer(norm_layers=(timm.layers.GroupNorm1, nn.BatchNorm2d)))
    assert "converted 2 block(s), skipped 2" in caplog.text
    assert "stages.1.blocks.0: norm1 is BatchNorm2d, not a GroupNorm" in caplog.text


def test_bad_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        convert_model(tiny_metaformer(), backend="gpu")


def test_train_mode_is_kept():
    model = tiny_metaformer().train()
    model.stages[0].eval()
    fused = convert_model(model)
    assert [m.training for m in fused.modules()] == [m.training for m in model.modules()]

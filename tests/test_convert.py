"""convert_model on timm PoolFormers, hybrid MetaFormers and the original repository's layout,
and the hook rule.

Every test compares a converted model with the unconverted one on random data: outputs
and every parameter gradient (relative error < 1e-4 in float32), the fused operator
running once per converted block in the forward and once in the backward, and
``state_dict()`` unchanged (helpers in conversion_checks.py; the official MetaFormer
baselines are in test_convert_official.py).
"""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import metaformer as timm_metaformer
from torch import nn

from conversion_checks import (
    REL_TOL,
    count_pooling_blocks,
    random_timm_model,
    randomize_vectors,
    relative_error,
    run_and_compare,
    tiny_metaformer,
)
from fused_poolformer.convert import check_block, convert_model
from fused_poolformer.modules import FusedMetaFormerBlock, FusedPoolFormerBlock
from poolformer_replica import LayerNormChannel, OriginalPoolFormer, PoolFormerBlock


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
    """poolformerv2's default MetaFormer norm (LayerNorm2dNoBias) normalizes over C per position."""
    model = tiny_metaformer(norm_layers=timm.layers.LayerNorm2d)
    fused = convert_model(model)
    report = fused.fused_poolformer_report
    assert report.converted == []
    assert report.skipped[0] == ("stages.0.blocks.0", "norm1 is LayerNorm2d, not a GroupNorm or a LayerNormGeneral over (H, W, C)")
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
        (dict(norm_layer=LayerNormChannel), "norm1 is LayerNormChannel, not a GroupNorm or a LayerNormGeneral over (H, W, C)"),
        (dict(norm_layer=nn.BatchNorm2d), "norm1 is BatchNorm2d, not a GroupNorm or a LayerNormGeneral over (H, W, C)"),
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


# ---------------------------------------------------------------------------------------
# Hooks: a hook on a module the fused op stands in for must keep firing.

# (module under stages.1.blocks.0, how the hook is registered, what the report calls it)
BYPASSED_HOOK_SITES = [
    ("norm1", "register_forward_hook", "forward hook"),
    ("token_mixer", "register_forward_pre_hook", "forward pre-hook"),
    ("token_mixer.pool", "register_forward_hook", "forward hook"),
    ("layer_scale1", "register_forward_hook", "forward hook"),
    ("norm1", "register_full_backward_hook", "backward hook"),
]


def recording_hook(register: str, calls: list):
    """A hook of the kind ``register`` registers that records the tensor it sees: the
    output of a forward hook, the input of a pre-hook, the output gradient of a backward hook."""
    picks = {
        "register_forward_hook": lambda args: args[1],
        "register_forward_pre_hook": lambda args: args[0][0],
        "register_full_backward_hook": lambda args: args[1][0],
    }
    return lambda module, *args: calls.append(picks[register](args).detach().clone())


@pytest.mark.parametrize("site,register,kind", BYPASSED_HOOK_SITES)
def test_block_with_a_hook_on_a_bypassed_module_is_left_unfused(site, register, kind):
    torch.manual_seed(0)
    model = tiny_metaformer()
    randomize_vectors(model)
    calls = []
    getattr(model.stages[1].blocks[0].get_submodule(site), register)(recording_hook(register, calls))

    fused = run_and_compare(model, torch.randn(2, 3, 32, 32), expect_converted=3)
    report = fused.fused_poolformer_report
    assert report.skipped == [
        ("stages.1.blocks.0", f"{site} has a {kind}, which would not fire in a fused block (it does not call {site})")]
    assert type(fused.stages[1].blocks[0]) is timm_metaformer.MetaFormerBlock
    assert len(calls) == 2, "the hook fired once in the unfused run and once in the converted one"
    assert relative_error(calls[1], calls[0]) < REL_TOL


def test_hooks_on_the_block_and_its_other_modules_keep_firing():
    """Hooks on the block itself, norm2 and mlp do not stop the conversion: the fused
    block is called as the block was and calls norm2 and mlp."""
    torch.manual_seed(0)
    model = tiny_metaformer()
    randomize_vectors(model)
    block = model.stages[0].blocks[1]
    calls = {name: [] for name in ("block pre", "block", "norm2", "mlp")}
    block.register_forward_pre_hook(recording_hook("register_forward_pre_hook", calls["block pre"]))
    block.register_forward_hook(recording_hook("register_forward_hook", calls["block"]))
    block.norm2.register_forward_hook(recording_hook("register_forward_hook", calls["norm2"]))
    block.mlp.register_full_backward_hook(recording_hook("register_full_backward_hook", calls["mlp"]))

    fused = run_and_compare(model, torch.randn(2, 3, 32, 32))
    assert isinstance(fused.stages[0].blocks[1], FusedMetaFormerBlock)
    for name, seen in calls.items():
        assert len(seen) == 2, f"{name}: fired {len(seen)} times in two runs"
        assert relative_error(seen[1], seen[0]) < REL_TOL, name


def test_original_block_with_a_hook_on_drop_path_is_left_unfused():
    """The original block calls drop_path in both branches: a hook on it fires twice."""
    torch.manual_seed(0)
    model = OriginalPoolFormer(layers=(1, 1), drop_path_rate=0.5).train()
    randomize_vectors(model)
    calls = []
    model.network[2][0].drop_path.register_forward_hook(recording_hook("register_forward_hook", calls))
    fused = run_and_compare(model, torch.randn(4, 3, 32, 32), expect_converted=1)
    assert fused.fused_poolformer_report.skipped == [
        ("network.2.0", "drop_path has a forward hook, which would not fire in a fused block (it does not call drop_path)")]
    assert len(calls) == 4
    assert all(relative_error(after, before) < REL_TOL for before, after in zip(calls[:2], calls[2:]))

"""convert_model on the official MetaFormer-baselines code (sail-sg/metaformer,
``metaformer_baselines.py``; replica in metaformer_baselines_replica.py): blocks on
(N, H, W, C) tensors with a LayerNormGeneral over (H, W, C) are fused with timm's blocks'
guarantees -- same parameter objects, state_dict unchanged, drop-path masks drawn as
timm's DropPath draws them, outputs and every gradient equal to rounding (float64 and
float32), no layout copy -- and the other baselines are skipped with their blocker."""

from functools import partial

import pytest
import torch
from timm.layers import LayerScale2d
from timm.models.metaformer import Scale as TimmScale
from torch import nn

from conversion_checks import CountFusedOps, forward_backward, randomize_vectors, relative_error, run_and_compare
from fused_poolformer.convert import check_block, convert_model
from fused_poolformer.modules import FusedMetaFormerBlock
from metaformer_baselines_replica import (
    POOLFORMERV2_NORM,
    BaselineMetaFormer,
    LayerNormGeneral,
    MetaFormerBlock,
    Pooling,
    RandomMixing,
    Scale,
    SepConv,
    convformer_s18,
    poolformerv2_s12,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def tiny_poolformerv2(norm=POOLFORMERV2_NORM, pool_size=3, **kwargs) -> BaselineMetaFormer:
    """Two stages of the baselines' PoolFormerV2 with layer scale in both and res scale in
    the second, so every kind of block and scale is there."""
    args = dict(depths=(2, 2), dims=(16, 32), num_classes=10, token_mixers=partial(Pooling, pool_size=pool_size),
                norm_layers=norm, layer_scale_init_values=1e-5, res_scale_init_values=(None, 1.0))
    args.update(kwargs)
    torch.manual_seed(0)
    model = BaselineMetaFormer(**args)
    randomize_vectors(model)
    return model


def test_poolformerv2_s12_converts_every_block():
    model = poolformerv2_s12(num_classes=10).eval()
    randomize_vectors(model)
    parameters = list(model.parameters())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 1.3 + 0.5
    fused = run_and_compare(model, x, inplace=True)
    report = fused.fused_poolformer_report
    print(report)
    assert report.converted == [f"stages.{s}.{b}" for s, depth in enumerate((2, 2, 6, 2)) for b in range(depth)]
    assert report.skipped == []
    assert all(a is b for a, b in zip(parameters, fused.parameters(), strict=True))
    assert {fused.get_submodule(name).layout for name in report.converted} == {"NHWC"}


NORMS = {
    "weight": POOLFORMERV2_NORM,
    "weight+bias": partial(LayerNormGeneral, normalized_dim=(1, 2, 3), eps=1e-6),
    "none": partial(LayerNormGeneral, normalized_dim=(-3, -2, -1), scale=False, bias=False, eps=1e-5),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("norm", NORMS, ids=str)
@pytest.mark.parametrize("pool_size,training", [(3, True), (5, False)])
def test_poolformerv2_matches_unfused(dtype, norm, pool_size, training):
    """Drop path in training draws the unfused model's masks (batch 6, rate 0.5: some
    samples are dropped); in eval the model is deterministic."""
    model = tiny_poolformerv2(NORMS[norm], pool_size, drop_path_rate=0.5).to(dtype).train(training)
    x = torch.randn(6, 3, 32, 32, dtype=dtype)
    fused = run_and_compare(model, x, expect_converted=4, tol=TOL[dtype])
    assert all(isinstance(fused.stages[s][b], FusedMetaFormerBlock) for s in (0, 1) for b in (0, 1))
    if training:
        with torch.no_grad():
            torch.manual_seed(0)
            assert relative_error(model(x), model.eval()(x)) > 1e-3, "drop path dropped nothing"


def test_channels_last_model_hands_the_op_channels_last_tensors():
    """A channels_last image gives the blocks contiguous (N, H, W, C) tensors: the op gets
    their channels_last (N, C, H, W) view and its output goes back as a view."""
    model = tiny_poolformerv2().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    fused = run_and_compare(model, x, expect_converted=4)
    with CountFusedOps() as counter:
        forward_backward(fused, x)
    assert counter.forward_layouts == [((torch.float32, True), (torch.float32, True))] * 4


@pytest.mark.parametrize("contiguous_nhwc", [True, False])
def test_block_runs_on_nhwc_views_without_a_copy(contiguous_nhwc):
    """Contiguous (N, H, W, C) reaches the op as channels_last (N, C, H, W); the
    (N, H, W, C) view of a contiguous (N, C, H, W) tensor -- what the baselines'
    Downsampling hands the first block of a stage -- as contiguous (N, C, H, W).  No
    tensor is copied on the way in or out, and the result keeps the input's strides."""
    torch.manual_seed(0)
    block = MetaFormerBlock(8, token_mixer=Pooling, norm_layer=POOLFORMERV2_NORM, res_scale_init_value=1.0)
    randomize_vectors(block)
    nchw = torch.randn(2, 8, 5, 7)
    x = nchw.permute(0, 2, 3, 1).contiguous() if contiguous_nhwc else nchw.permute(0, 2, 3, 1)
    fused = convert_model(block, backend="cpu")
    with CountFusedOps() as counter, torch.no_grad():
        y = fused.token_mixer_branch(x)
    copies = [op for op in counter.ops if op in ("aten.clone", "aten.copy_", "aten._to_copy", "aten.contiguous")]
    assert counter.forward == 1 and copies == [], counter.ops
    assert counter.forward_layouts[0][0] == (torch.float32, contiguous_nhwc)
    assert y.stride() == x.stride()
    with torch.no_grad():
        expected = block.res_scale1(x) + block.layer_scale1(block.token_mixer(block.norm1(x)))
    assert relative_error(y, expected) < 1e-5


def test_block_with_a_hook_on_its_norm_is_left_unfused():
    model = tiny_poolformerv2()
    outputs = []
    model.stages[0][1].norm1.register_forward_hook(lambda module, args, output: outputs.append(output.detach()))
    fused = run_and_compare(model, torch.randn(2, 3, 32, 32), expect_converted=3)
    assert fused.fused_poolformer_report.skipped == [
        ("stages.0.1", "norm1 has a forward hook, which would not fire in a fused block (it does not call norm1)")]
    assert len(outputs) == 2 and outputs[1].shape == (2, 8, 8, 16)
    assert relative_error(outputs[1], outputs[0]) < 1e-4


def baseline_block(mixer=Pooling, norm=POOLFORMERV2_NORM, **kwargs) -> MetaFormerBlock:
    return MetaFormerBlock(16, token_mixer=mixer, norm_layer=norm, **kwargs)


def replaced(block: nn.Module, name: str, module_or_parameter) -> nn.Module:
    """``block`` with its submodule (or parameter) at the dotted ``name`` replaced."""
    parent, _, attribute = name.rpartition(".")
    setattr(block.get_submodule(parent), attribute, module_or_parameter)
    return block


SKIPPED_BLOCKS = {
    "IdentityFormer": (lambda: baseline_block(mixer=nn.Identity), "token_mixer is Identity, not a Pooling mixer"),
    "RandFormer": (lambda: baseline_block(mixer=partial(RandomMixing, num_tokens=20)),
                   "token_mixer is RandomMixing, not a Pooling mixer"),
    "ConvFormer": (lambda: baseline_block(mixer=SepConv), "token_mixer is SepConv, not a Pooling mixer"),
    "pooling, LayerNorm over C": (
        lambda: baseline_block(norm=partial(LayerNormGeneral, bias=False, eps=1e-6)),
        "norm1 is a LayerNormGeneral over C only (statistics per position, as in ConvFormer / CAFormer), "
        "not over (H, W, C) per sample"),
    "pooling, norm over (H, W)": (
        lambda: baseline_block(norm=partial(LayerNormGeneral, normalized_dim=(1, 2))),
        "norm1 is a LayerNormGeneral over dims (1, 2), not over (H, W, C) = (1, 2, 3)"),
    "pooling, norm weight (C, 1, 1)": (
        lambda: replaced(baseline_block(), "norm1.weight", nn.Parameter(torch.ones(16, 1, 1))),
        "norm1.weight is not a (C,) Parameter (it would not scale the channels of (N, H, W, C))"),
    "pooling, timm's NCHW Scale": (
        lambda: replaced(baseline_block(), "layer_scale1", TimmScale(16, use_nchw=True)),
        "layer_scale1 does not scale the 16 channels of an NHWC tensor (shape (16, 1, 1))"),
    "NCHW GroupNorm, the baselines' Scale": (
        lambda: replaced(baseline_block(norm=partial(nn.GroupNorm, 1)), "layer_scale1", Scale(16)),
        "layer_scale1 does not scale the 16 channels of an NCHW tensor (shape (16,))"),
    "pooling, LayerScale2d": (
        lambda: replaced(baseline_block(), "layer_scale1", LayerScale2d(16)),
        "layer_scale1 is LayerScale2d, not Identity, Scale or LayerScale (for NHWC tensors)"),
    "pooling, scale of 8 channels": (
        lambda: replaced(baseline_block(), "res_scale1", Scale(8)),
        "res_scale1.scale is not a (16,) Parameter"),
}


@pytest.mark.parametrize("case", SKIPPED_BLOCKS)
def test_blocks_the_op_does_not_cover_are_skipped_with_their_blocker(case):
    make_block, reason = SKIPPED_BLOCKS[case]
    block = make_block()
    assert check_block(block) == (None, reason)
    model = nn.Sequential(block)
    converted = convert_model(model)
    assert converted.fused_poolformer_report.skipped == [("0", reason)]
    assert type(converted[0]) is MetaFormerBlock


def test_convformer_converts_nothing():
    model = convformer_s18(num_classes=10)
    report = convert_model(model).fused_poolformer_report
    assert report.converted == []
    assert report.skipped == [(f"stages.{s}.{b}", "token_mixer is SepConv, not a Pooling mixer")
                              for s, depth in enumerate((3, 3, 9, 3)) for b in range(depth)]


def test_nhwc_block_rejects_a_tensor_that_is_not_4d():
    block = convert_model(MetaFormerBlock(8, token_mixer=Pooling, norm_layer=POOLFORMERV2_NORM))
    with pytest.raises(ValueError, match=r"x must be 4-D \(N, H, W, C\), got shape \(2, 5, 8\)"):
        block(torch.randn(2, 5, 8))

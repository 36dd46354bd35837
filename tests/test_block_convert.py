"""convert_model(fuse="block"): which blocks are fused whole and why the others stay at the
mixer level, the same draws of drop path, recompute="mlp", autocast, memory, MACs.  (The
model-wide equivalence runs of test_convert*.py convert at the default level, "block".)"""

import pytest
import torch
from timm.models import metaformer as timm_metaformer
from torch import nn

from conversion_checks import (CountFusedOps, assert_gradients_match, forward_backward, gradients, randomize_vectors,
                               relative_error, run_and_compare, tiny_metaformer)
from poolformer_replica import OriginalPoolFormer

import fused_poolformer
from fused_poolformer import BlockFusedMetaFormerBlock, BlockFusedPoolFormerBlock, convert_model
from fused_poolformer.modules import FusedMetaFormerBlock


def _levels(model):
    return sorted(set(model.fused_poolformer_report.levels.values()))


def test_timm_blocks_are_fused_whole_and_the_mixer_level_stays_available():
    torch.manual_seed(0)
    model = tiny_metaformer()
    randomize_vectors(model)
    whole = run_and_compare(model, torch.randn(2, 3, 32, 32))
    assert _levels(whole) == ["block"]
    assert all(isinstance(m, BlockFusedMetaFormerBlock) for m in whole.modules() if isinstance(m, FusedMetaFormerBlock))
    model.zero_grad(set_to_none=True)
    mixer = run_and_compare(model, torch.randn(2, 3, 32, 32), fuse="mixer")
    assert _levels(mixer) == ["mixer"]
    assert not any(isinstance(m, BlockFusedMetaFormerBlock) for m in mixer.modules())


def _first_block_changed(change):
    torch.manual_seed(0)
    model = tiny_metaformer()
    randomize_vectors(model)
    change(model.stages[0].blocks[0])
    return model


@pytest.mark.parametrize("change, reason", [
    (lambda b: setattr(b.mlp, "drop1", nn.Dropout(0.1)), "mlp.drop1 is Dropout(p=0.1, inplace=False)"),
    (lambda b: setattr(b.mlp, "act", nn.ReLU()), "mlp.act is ReLU, not GELU or StarReLU"),
    (lambda b: setattr(b.mlp, "norm", nn.BatchNorm2d(64)), "mlp.norm is BatchNorm2d, not Identity"),
    (lambda b: setattr(b, "norm2", nn.GroupNorm(2, 16)), "norm2 has 2 groups"),
    (lambda b: b.mlp.fc1.register_forward_hook(lambda *a: None),
     "mlp.fc1 has a forward hook, which would not fire in a fused block"),
    (lambda b: b.norm2.register_forward_pre_hook(lambda *a: None), "norm2 has a forward pre-hook"),
])
def test_a_block_the_block_operator_does_not_cover_stays_at_the_mixer_level(change, reason):
    model = _first_block_changed(change)
    fused = run_and_compare(model.eval(), torch.randn(2, 3, 32, 32))
    report = fused.fused_poolformer_report
    assert report.levels["stages.0.blocks.0"] == "mixer"
    assert [name for name, _ in report.mixer_only] == ["stages.0.blocks.0"]
    assert report.mixer_only[0][1].startswith(reason), report.mixer_only
    assert type(fused.stages[0].blocks[0]) is FusedMetaFormerBlock
    assert "token mixer only: 1" in str(report)


def test_gelu_tanh_and_any_hidden_width_are_fused_whole():
    from timm.layers import Mlp

    torch.manual_seed(0)
    model = tiny_metaformer()
    for block in model.stages[0].blocks:  # 16 channels, 40 hidden (not 4C)
        block.mlp = Mlp(16, 40, act_layer=lambda: nn.GELU(approximate="tanh"), use_conv=True)
    randomize_vectors(model)
    fused = run_and_compare(model, torch.randn(2, 3, 32, 32))
    assert _levels(fused) == ["block"]
    assert fused.stages[0].blocks[0].activation == "gelu_tanh"


def test_a_backend_without_block_operators_keeps_the_mixer_level():
    from fused_poolformer import backends

    reference_backend = backends.get("reference")
    backends.register_backend(backends.Backend(
        name="mixer-only", devices=("cpu",), summary="test", unavailable_reason=lambda device: None,
        load_operators=lambda: {"pool_mixer": reference_backend.operators("pool_mixer")}, checks_in_python=True,
        fused=False))
    try:
        fused = convert_model(tiny_metaformer(), backend="mixer-only")
    finally:
        backends.unregister_backend("mixer-only")
    report = fused.fused_poolformer_report
    assert _levels(fused) == ["mixer"]
    assert all(reason == "backend 'mixer-only' has no block operators" for _, reason in report.mixer_only)


def test_the_triton_backend_fuses_whole_blocks():
    """Triton's block operators: the block composition over the Triton mixer (interpreted here)."""
    from helpers import unavailable_reason

    reason = unavailable_reason("triton", interpreted_triton=True)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    model = tiny_metaformer(depths=(1, 1), dims=(8, 16)).train()
    randomize_vectors(model)
    x = torch.randn(2, 3, 32, 32)
    fused = convert_model(model, backend="triton")
    assert _levels(fused) == ["block"]
    y_ref = forward_backward(model, x)
    with CountFusedOps() as counter:
        y = forward_backward(fused, x)
    assert "fused_poolformer.triton_block_forward" in counter.ops
    assert relative_error(y, y_ref) < 1e-4
    assert_gradients_match(gradients(model), fused, 1e-4)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match=r"convert_model: fuse must be one of \('block', 'mixer'\), got 'all'"):
        convert_model(tiny_metaformer(), fuse="all")
    with pytest.raises(ValueError, match="convert_model: recompute must be one of"):
        convert_model(tiny_metaformer(), recompute="everything")
    fused = convert_model(tiny_metaformer())
    with pytest.raises(ValueError, match="recompute must be one of"):
        fused.stages[0].blocks[0].set_recompute("x")


def test_drop_path_draws_as_timm_does_in_training():
    torch.manual_seed(0)
    model = tiny_metaformer(drop_path_rate=0.6).train()
    randomize_vectors(model)
    fused = run_and_compare(model, torch.randn(4, 3, 32, 32))
    assert _levels(fused) == ["block"]


def test_the_original_block_shares_one_drop_path_between_its_branches():
    torch.manual_seed(0)
    model = OriginalPoolFormer(layers=(1, 1), drop_path_rate=0.6).train()
    randomize_vectors(model)
    fused = run_and_compare(model, torch.randn(4, 3, 32, 32), expect_converted=2)
    assert _levels(fused) == ["block"]
    assert any(isinstance(m, BlockFusedPoolFormerBlock) for m in fused.modules())


def test_recompute_mlp_gives_the_same_gradients_and_saves_less():
    torch.manual_seed(0)
    model = tiny_metaformer().train()
    randomize_vectors(model)
    x = torch.randn(2, 3, 32, 32)
    saving = convert_model(model)
    recomputing = convert_model(model, recompute="mlp")
    y = forward_backward(saving, x)
    y_recomputed = forward_backward(recomputing, x)
    # (Without fc1's output to keep, GELU rides in fc1 as a oneDNN post-op: rounding differs.)
    assert relative_error(y_recomputed, y) < 1e-6
    assert_gradients_match(gradients(saving), recomputing, 1e-5)
    assert _saved_bytes(recomputing, x) < _saved_bytes(saving, x)


def _saved_bytes(model, x, parameters=True):
    """Bytes of the storages saved-tensor hooks see in a forward (parameters: with theirs)."""
    storages = {}
    skip = set() if parameters else {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


def test_saved_activations_of_a_training_step():
    """The block saves x, fc1's output and (N, .) statistics (5E per block against the
    original's 14E): 0.44x the original's saved bytes on poolformer_s12 at batch 8, 224x224,
    parameters included (benchmark); here, activations only at a smaller size."""
    import timm

    model = timm.create_model("poolformer_s12", num_classes=10).train()
    x = torch.randn(4, 3, 128, 128)
    original, mixer, block, recompute = (
        _saved_bytes(m, x, parameters=False)
        for m in (model, convert_model(model, fuse="mixer"), convert_model(model), convert_model(model, recompute="mlp")))
    assert block < 0.45 * original and 0.8 * original < mixer
    assert recompute < 0.15 * original


@pytest.mark.parametrize("channels_last", [False, True])
def test_autocast_bfloat16_runs_the_gemms_in_bfloat16(channels_last):
    torch.manual_seed(0)
    model = tiny_metaformer().eval()
    randomize_vectors(model)
    fused = convert_model(model)
    x = torch.randn(2, 3, 32, 32)
    if channels_last:
        model, fused = model.to(memory_format=torch.channels_last), fused.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    exact = model(x).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unfused = model(x)
        with CountFusedOps() as counter:
            y = fused(x)
    assert counter.forward == 4
    assert y.dtype == unfused.dtype
    assert relative_error(y, exact) <= max(2 * relative_error(unfused, exact), 1e-2)


def test_plain_fvcore_and_the_torch_counter_count_the_papers_macs():
    from fused_poolformer import flops

    torch.manual_seed(0)
    model = tiny_metaformer().eval()
    fused = convert_model(model)
    x = torch.randn(1, 3, 32, 32)
    assert flops.count_macs(fused, x, "torch") == flops.count_macs(model, x, "torch")
    if flops.fvcore_available():
        from fvcore.nn import FlopCountAnalysis

        plain = FlopCountAnalysis(fused, x)
        plain.unsupported_ops_warnings(False)
        plain.uncalled_modules_warnings(False)
        assert plain.total() == flops.count_macs(model, x, "fvcore")[0]


def test_the_block_flop_formulas_count_the_gemms_of_the_backward():
    from torch.utils.flop_counter import FlopCounterMode

    from fused_poolformer import flops

    flops.register_flop_counter_formulas()
    torch.manual_seed(0)
    model = tiny_metaformer().train()
    x = torch.randn(1, 3, 32, 32)
    counts = []
    for m in (model, convert_model(model), convert_model(model, recompute="mlp")):
        with FlopCounterMode(display=False) as mode:
            m(x).sum().backward()
        counts.append(mode.get_total_flops())
    assert counts[1] == counts[0]  # fc1, fc2: forward + input and weight gradients
    assert counts[2] > counts[1]  # and fc1 once more


def test_the_official_metaformer_baselines_blocks_are_fused_whole():
    from metaformer_baselines_replica import POOLFORMERV2_NORM, BaselineMetaFormer, Pooling

    torch.manual_seed(0)
    model = BaselineMetaFormer(depths=(1, 1), dims=(16, 32), num_classes=10, token_mixers=Pooling,
                               norm_layers=POOLFORMERV2_NORM, layer_scale_init_values=1e-5,
                               res_scale_init_values=(None, 1.0)).eval()
    randomize_vectors(model)
    fused = run_and_compare(model, torch.randn(2, 3, 64, 64))
    assert _levels(fused) == ["block"]
    assert fused.fused_poolformer_report.skipped == []

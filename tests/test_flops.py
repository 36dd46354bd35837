"""The MAC-counter integration of the fused op: torch.utils.flop_counter and fvcore must
count a fused model exactly as the unfused one.  (The op's byte/FLOP cost model is tested
with the benchmarks, in test_bench.py.)"""

import importlib.util

import pytest
import torch
from torch import nn

import fused_poolformer
from fused_poolformer import flops

SHAPE = (2, 8, 6, 6)
E = 2 * 8 * 6 * 6

requires_cpu_kernels = pytest.mark.skipif(not fused_poolformer.HAS_CPU_KERNELS, reason="CPU extension not built")
requires_fvcore = pytest.mark.skipif(importlib.util.find_spec("fvcore") is None, reason="fvcore is not installed")


class ToyBlock(nn.Module):
    """A PoolFormer v1 block (GroupNorm(1) pool mixer + 1x1-conv MLP), fused or not."""

    def __init__(self, channels, fused, affine=True):
        super().__init__()
        self.fused = fused
        self.norm1 = nn.GroupNorm(1, channels, affine=affine)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.layer_scale = nn.Parameter(torch.rand(channels) + 0.5)
        self.norm2 = nn.GroupNorm(1, channels)
        self.fc1 = nn.Conv2d(channels, 2 * channels, 1)
        self.fc2 = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, x):
        if self.fused:
            x = fused_poolformer.pool_mixer(x, self.norm1.weight, self.norm1.bias, layer_scale=self.layer_scale)
        else:
            normed = self.norm1(x)
            x = x + self.layer_scale.view(1, -1, 1, 1) * (self.pool(normed) - normed)
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


def _pair(affine=True):
    unfused = ToyBlock(8, fused=False, affine=affine)
    fused = ToyBlock(8, fused=True, affine=affine)
    for p in unfused.parameters():  # random, not the init's ones and zeros
        nn.init.uniform_(p, 0.5, 1.5)
    fused.load_state_dict(unfused.state_dict())
    return unfused.eval(), fused.eval()


def _x():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * 1.3 + 0.5


@requires_cpu_kernels
def test_toy_blocks_compute_the_same():
    unfused, fused = _pair()
    with torch.no_grad():
        torch.testing.assert_close(fused(_x()), unfused(_x()), rtol=1e-5, atol=1e-5)


@requires_cpu_kernels
def test_torch_flop_counter_counts_fused_as_unfused():
    from torch.utils.flop_counter import FlopCounterMode

    names = flops.register_flop_counter_formulas()
    assert "fused_poolformer::pool_mixer_forward" in names
    assert flops.register_flop_counter_formulas() == names  # idempotent
    unfused, fused = _pair()
    macs_unfused, counter = flops.count_macs(unfused, _x(), "torch")
    macs_fused, _ = flops.count_macs(fused, _x(), "torch")
    assert counter == "torch.utils.flop_counter"
    convs = 2 * (8 * 16 * 36)  # fc1 + fc2 MACs per sample
    assert macs_unfused == macs_fused == SHAPE[0] * convs
    # The fused op was seen by the counter (registered formula), at 0 FLOPs.
    with FlopCounterMode(display=False) as mode:
        fused(_x())
    counted = {str(op) for op in mode.get_flop_counts()["Global"]}
    assert any("pool_mixer_forward" in op for op in counted), counted


@requires_cpu_kernels
@requires_fvcore
@pytest.mark.parametrize("affine", [True, False])
def test_fvcore_counts_fused_as_unfused(affine):
    unfused, fused = _pair(affine)
    macs_unfused, counter = flops.count_macs(unfused, _x(), "fvcore")
    macs_fused, _ = flops.count_macs(fused, _x(), "fvcore")
    assert counter == "fvcore"
    convs = SHAPE[0] * 2 * (8 * 16 * 36)
    # fvcore: group_norm = 5 MACs/element with affine, 4 without; norm2 always affine.
    norms = E * (5 if affine else 4) + E * 5
    assert macs_unfused == macs_fused == convs + norms


def _convert_model():
    try:
        from fused_poolformer.convert import convert_model
    except ImportError as exc:
        pytest.skip(f"fused_poolformer.convert is unavailable: {exc}")
    return convert_model


@requires_cpu_kernels
@pytest.mark.parametrize("counter", ["torch", pytest.param("fvcore", marks=requires_fvcore)])
def test_converted_timm_model_counts_as_original(counter):
    convert_model = _convert_model()
    timm = pytest.importorskip("timm")
    model = timm.create_model("poolformer_s12", pretrained=False).eval()
    converted = convert_model(model, inplace=False).eval()
    example = torch.randn(1, 3, 224, 224)
    original_macs, _ = flops.count_macs(model, example, counter)
    converted_macs, _ = flops.count_macs(converted, example, counter)
    assert converted_macs == original_macs
    assert abs(original_macs / 1e9 - 1.8) / 1.8 < 0.02  # the paper's S12 MACs

"""FusedPoolMixer on its own, and the fused blocks in training (drop path), under
torch.compile, autocast bf16 and channels_last."""

import copy

import pytest
import torch
from timm.layers import DropPath
from timm.layers.drop import drop_path as timm_drop_path
from torch import nn

from conversion_checks import (
    CountFusedOps,
    forward_backward,
    gradients,
    randomize_vectors,
    relative_error,
    run_and_compare,
    tiny_metaformer,
)
from fused_poolformer.convert import convert_model
from fused_poolformer.modules import FusedPoolMixer, drop_path_scale
from helpers import backend_params
from poolformer_replica import OriginalPoolFormer


class UnfusedMixer(nn.Module):
    """The graph FusedPoolMixer replaces, from stock modules (float64 in these tests)."""

    def __init__(self, dim, pool_size, num_groups, eps, affine, layer_scale, res_scale, drop_path):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, dim, eps=eps, affine=affine)
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)
        self.drop_path = DropPath(drop_path)
        self.layer_scale = nn.Parameter(torch.rand(dim) * 2 - 1) if layer_scale else None
        self.res_scale = nn.Parameter(torch.rand(dim) + 0.5) if res_scale else None

    def forward(self, x):
        normed = self.norm(x)
        mixed = self.pool(normed) - normed
        if self.layer_scale is not None:
            mixed = mixed * self.layer_scale.view(1, -1, 1, 1)
        shortcut = x if self.res_scale is None else x * self.res_scale.view(1, -1, 1, 1)
        return shortcut + self.drop_path(mixed)


MIXER_CASES = [
    # pool_size, num_groups, eps, affine, layer_scale, res_scale, drop_path, training
    (3, 1, 1e-5, True, True, False, 0.0, False),
    (5, 2, 1e-6, True, True, True, 0.4, True),
    (3, 4, 1e-5, False, False, True, 0.4, True),
]


@pytest.mark.parametrize("backend", backend_params("cpu", "reference"))
@pytest.mark.parametrize("case", MIXER_CASES)
def test_fused_pool_mixer_matches_stock_modules(case, backend):
    pool_size, groups, eps, affine, layer_scale, res_scale, drop, training = case
    torch.manual_seed(0)
    unfused = UnfusedMixer(8, pool_size, groups, eps, affine, layer_scale, res_scale, drop).double()
    randomize_vectors(unfused)
    fused = FusedPoolMixer(8, pool_size=pool_size, num_groups=groups, eps=eps, affine=affine,
                           layer_scale_init_value=1.0 if layer_scale else None,
                           res_scale_init_value=1.0 if res_scale else None,
                           drop_path=drop, backend=backend, dtype=torch.float64)
    # GroupNorm-compatible names: the norm's state dict loads into the mixer.
    state = {k.replace("norm.", ""): v for k, v in unfused.state_dict().items()}
    fused.load_state_dict(state)
    unfused.train(training)
    fused.train(training)

    x = (torch.randn(6, 8, 7, 5, dtype=torch.float64) * 1.3 + 0.5).requires_grad_()
    y_ref = forward_backward(unfused, x)
    x_grad_ref, x.grad = x.grad, None
    y = forward_backward(fused, x)
    assert relative_error(y, y_ref) < 1e-10
    assert relative_error(x.grad, x_grad_ref) < 1e-10
    for name, grad in gradients(unfused).items():
        actual = fused.get_parameter(name.replace("norm.", "")).grad
        if name == "norm.bias":  # cancels out of the output: exactly zero from the kernels
            assert actual.abs().max() < 1e-10 and grad.abs().max() < 1e-10
            assert backend == "reference" or torch.count_nonzero(actual) == 0
        else:
            assert relative_error(actual, grad) < 1e-10, name
    if training:  # the masks must have dropped some samples for the test to mean anything
        with torch.no_grad():
            assert relative_error(fused.eval()(x), y) > 1e-3


def test_fused_pool_mixer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="pool_size"):
        FusedPoolMixer(8, pool_size=4)
    with pytest.raises(ValueError, match="num_groups"):
        FusedPoolMixer(8, num_groups=3)
    with pytest.raises(ValueError, match="drop_path"):
        FusedPoolMixer(8, drop_path=1.5)
    with pytest.raises(ValueError, match="backend"):
        FusedPoolMixer(8, backend="gpu")
    with pytest.raises(ValueError, match=r"weight must have shape \(C,\) = \(6,\)"):
        FusedPoolMixer(8)(torch.randn(2, 6, 4, 4))  # channels don't match dim


@pytest.mark.parametrize("drop_prob,scale_by_keep", [(0.4, True), (0.4, False), (1.0, True)])
def test_drop_path_scale_draws_what_timm_draws(drop_prob, scale_by_keep):
    x = torch.randn(16, 3, 4, 4)
    torch.manual_seed(5)
    expected = timm_drop_path(torch.ones_like(x), drop_prob, True, scale_by_keep)[:, 0, 0, 0]
    after_timm = torch.rand(4)
    torch.manual_seed(5)
    scale = drop_path_scale(x, drop_prob, True, scale_by_keep)
    assert torch.equal(scale, expected)
    assert torch.equal(torch.rand(4), after_timm), "a different number of random draws"
    assert drop_path_scale(x, drop_prob, False) is None and drop_path_scale(x, 0.0, True) is None


@pytest.mark.parametrize("make_model", [
    lambda: tiny_metaformer(drop_path_rate=0.5),
    lambda: OriginalPoolFormer(drop_path_rate=0.5),
], ids=["timm", "original"])
def test_seeded_training_matches_unfused(make_model):
    """Drop path in training draws the unfused model's masks: same outputs and gradients."""
    torch.manual_seed(0)
    model = make_model().train()
    randomize_vectors(model)
    x = torch.randn(6, 3, 32, 32)
    fused = run_and_compare(model, x, expect_converted=4)
    with torch.no_grad():  # drop path did drop something
        torch.manual_seed(0)
        y_train = model(x)
        assert relative_error(y_train, model.eval()(x)) > 1e-3
        assert relative_error(fused.eval()(x), model(x)) < 1e-4


def test_channels_last_model():
    torch.manual_seed(0)
    model = tiny_metaformer().to(memory_format=torch.channels_last)
    randomize_vectors(model)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    fused = convert_model(model)
    with CountFusedOps() as counter:
        forward_backward(fused, x)
    assert counter.forward_layouts == [((torch.float32, True), (torch.float32, True))] * 4
    run_and_compare(model, x)


def test_autocast_bf16():
    """Under CPU autocast the fused op gets bfloat16 activations with float32 parameters;
    the converted model stays as close to float32 as the unconverted one."""
    torch.manual_seed(0)
    model = tiny_metaformer()
    randomize_vectors(model)
    x = torch.randn(2, 3, 32, 32)
    y32 = forward_backward(model, x)
    grads32 = {k: v.clone() for k, v in gradients(model).items()}
    fused = convert_model(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_unfused = forward_backward(model, x)
        with CountFusedOps() as counter:
            y_fused = forward_backward(fused, x)
    assert counter.forward == 4 and counter.backward == 4
    assert (torch.bfloat16, False) in [inp for inp, _ in counter.forward_layouts]
    unfused_err, fused_err = relative_error(y_unfused, y32), relative_error(y_fused, y32)
    assert fused_err < max(2 * unfused_err, 2e-2), f"bf16 output error {fused_err:.2e} vs unfused {unfused_err:.2e}"
    for name, grad in gradients(fused).items():
        if name.endswith("norm1.bias"):
            continue  # exactly zero when fused, noise when not
        unfused_err = relative_error(model.get_parameter(name).grad, grads32[name])
        err = relative_error(grad, grads32[name])
        assert err < max(2 * unfused_err, 5e-2), f"{name}: bf16 gradient error {err:.2e} vs unfused {unfused_err:.2e}"


@pytest.mark.parametrize("fuse, op", [("block", "block_forward"), ("mixer", "pool_mixer_forward")])
def test_torch_compile_fullgraph(fuse, op):
    """One small model: compiling on 2 CPU cores is slow."""
    from torch._inductor.compile_fx import compile_fx

    torch.manual_seed(0)
    model = tiny_metaformer(depths=(1, 1), dims=(8, 16)).eval()
    randomize_vectors(model)
    fused = convert_model(model, fuse=fuse)
    eager = copy.deepcopy(fused)
    graphs = []

    def inductor_recording_graphs(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(fused, fullgraph=True, backend=inductor_recording_graphs)
    x = torch.randn(2, 3, 32, 32)
    y_ref = forward_backward(eager, x)
    y = forward_backward(compiled, x)
    ops = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert ops.count(getattr(torch.ops.fused_poolformer, op).default) == 2
    assert relative_error(y, y_ref) < 1e-4
    for name, grad in gradients(eager).items():
        actual = fused.get_parameter(name).grad
        if name.endswith("norm1.bias"):
            assert torch.count_nonzero(actual) == 0, name
        else:
            assert relative_error(actual, grad) < 1e-4, name


def test_drop_path_schedule_changes_are_followed():
    """Training scripts that anneal DropPath.drop_prob keep working after conversion."""
    torch.manual_seed(0)
    model = tiny_metaformer(drop_path_rate=0.1).train()
    randomize_vectors(model)
    fused = convert_model(model)
    x = torch.randn(6, 3, 32, 32)
    for drop_prob in (0.0, 0.7):
        for net in (model, fused):
            for m in net.modules():
                if isinstance(m, DropPath):
                    m.drop_prob = drop_prob
        with torch.no_grad():
            outputs = []
            for net in (model, fused):
                torch.manual_seed(1)
                outputs.append(net(x))
            assert relative_error(outputs[1], outputs[0]) < 1e-4, drop_prob
            assert (relative_error(outputs[0], model.eval()(x)) > 1e-3) == (drop_prob > 0)
            model.train()

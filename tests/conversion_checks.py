"""Shared helpers of the conversion tests (test_convert*.py, test_modules.py, test_ddp.py):
small random models, comparisons of a converted model with the unconverted one (outputs,
every parameter gradient, fused-op counts, state_dict), op counting."""

import timm
import torch
from timm.models import metaformer as timm_metaformer
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fused_poolformer.convert import convert_model
from fused_poolformer.modules import FusedMetaFormerBlock, FusedPoolFormerBlock

REL_TOL = 1e-4  # float32, relative to the largest magnitude


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


def pooling_norm_bias_block(name: str, model: nn.Module):
    """The block of ``name`` where it is the norm1 bias of a pooling block (fused or not),
    else None.  That gradient is analytically zero: the bias cancels out of pool(n) - n
    (docs/math.md)."""
    block_name, _, param = name.rpartition(".")
    if param != "bias" or not block_name.endswith("norm1"):
        return None
    block = model.get_submodule(block_name.rpartition(".")[0])
    return block if type(block.token_mixer).__name__ == "Pooling" else None


def gradients(model: nn.Module) -> dict:
    return {name: p.grad for name, p in model.named_parameters()}


def assert_gradients_match(expected: dict, fused: nn.Module, tol: float = REL_TOL) -> None:
    """Every parameter gradient of ``fused`` equals ``expected[name]`` (the unfused
    model's; relative error < tol).  A pooling block's norm1 bias gets exact zeros where
    the block was converted; the unfused graph gets rounding noise there, small against
    the norm1 weight's gradient (or any gradient, where the norm has no weight)."""
    actual = gradients(fused)
    assert list(actual) == list(expected), "parameter names changed"
    for name, grad in expected.items():
        assert actual[name] is not None, f"{name}: no gradient in the converted model"
        block = pooling_norm_bias_block(name, fused)
        if block is not None:
            if isinstance(block, (FusedMetaFormerBlock, FusedPoolFormerBlock)):
                assert torch.count_nonzero(actual[name]) == 0, f"{name}: gradient should be exactly zero"
            scale = expected.get(name[: -len("bias")] + "weight")
            scale = max(g.abs().max() for g in expected.values()) if scale is None else scale.abs().max()
            for which, g in (("unfused", grad), ("converted", actual[name])):
                assert g.abs().max() <= tol * scale, f"{name}: {which} gradient not ~0"
            continue
        err = relative_error(actual[name], grad)
        assert err < tol, f"{name}: gradient relative error {err:.2e}"


def assert_state_dict_unchanged(before: dict, model: nn.Module) -> None:
    after = model.state_dict()
    assert list(after) == list(before), "state_dict keys (or their order) changed"
    for key, value in before.items():
        assert torch.equal(after[key], value), f"state_dict value {key} changed"


# A block's fused operator: the mixer's or, for a block fused whole, the block's.
FUSED_FORWARDS = (torch.ops.fused_poolformer.pool_mixer_forward.default, torch.ops.fused_poolformer.block_forward.default)
FUSED_BACKWARDS = (torch.ops.fused_poolformer.pool_mixer_backward.default,
                   torch.ops.fused_poolformer.block_backward.default)


class CountFusedOps(TorchDispatchMode):
    """Counts the fused forward and backward operators (the mixer's or the whole block's) as
    they are dispatched, records
    the (dtype, channels_last) of each forward's input and output, and the name of every
    operator dispatched (``ops``)."""

    def __init__(self):
        super().__init__()
        self.forward = self.backward = 0
        self.forward_layouts = []
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        if func in FUSED_FORWARDS:
            self.forward += 1
            y = func(*args, **(kwargs or {}))
            layout = lambda t: (t.dtype, t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous())
            self.forward_layouts.append((layout(args[0]), layout(y[0])))
            return y
        elif func in FUSED_BACKWARDS:
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


def run_and_compare(model: nn.Module, x: torch.Tensor, expect_converted=None, inplace=False, tol=REL_TOL,
                    fuse="block"):
    """Runs ``model`` unfused, converts it and checks outputs, gradients (relative error
    < ``tol``), fused-op counts and state_dict.  ``inplace`` converts ``model`` itself (saving a copy of a big model;
    its unfused gradients are set aside first), else a copy, and checks that ``model``
    is left as it was.  Returns the converted model."""
    expected_blocks = count_pooling_blocks(model) if expect_converted is None else expect_converted
    y_ref = forward_backward(model, x)
    expected_grads = gradients(model)
    before = model.state_dict() if inplace else {k: v.clone() for k, v in model.state_dict().items()}
    fused = convert_model(model, backend="cpu", inplace=inplace, fuse=fuse)
    if inplace:
        model.zero_grad(set_to_none=True)
    assert len(fused.fused_poolformer_report.converted) == expected_blocks, str(fused.fused_poolformer_report)
    assert_state_dict_unchanged(before, fused)

    with CountFusedOps() as counter:
        y = forward_backward(fused, x)
    assert counter.forward == expected_blocks, f"fused forward ran {counter.forward} times for {expected_blocks} blocks"
    assert counter.backward == expected_blocks, f"fused backward ran {counter.backward} times for {expected_blocks} blocks"
    err = relative_error(y, y_ref)
    assert err < tol, f"output relative error {err:.2e}"
    assert_gradients_match(expected_grads, fused, tol)
    if not inplace:
        assert_state_dict_unchanged(before, model)
        assert all(p.grad is g for p, g in zip(model.parameters(), expected_grads.values())), "original touched"
    return fused

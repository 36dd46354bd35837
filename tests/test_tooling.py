"""Tracing, scripting and unconverting a converted model (issue 21; docs/deploy.md).

- ``torch.fx.symbolic_trace`` and timm's fx feature extractor: the fused operator is an fx
  leaf (one ``call_function`` node per block) and the traced graph gives the converted
  model's output exactly, the original's to rounding;
- ``torch.jit.script``: the fused blocks call the C++ operator through ``torch.ops``, forward
  and backward (a training step);
- ``fused_poolformer.unconvert_model``: the original block classes around the same
  submodules and parameters (same ``state_dict``, same output, hooks fire again), at both
  fusion levels;

on timm's ``poolformer_s12`` and ``poolformerv2_s12`` (random weights, 64x64 inputs) and on the
official repositories' blocks (tests/poolformer_replica.py, tests/metaformer_baselines_replica.py)
wherever the original model traces or scripts."""

import copy
import io
import warnings
from functools import partial

import pytest
import torch
from timm.layers import DropPath
from torch import nn

import fused_poolformer
from conversion_checks import random_timm_model, randomize_vectors, relative_error, tiny_metaformer
from fused_poolformer import ops
from fused_poolformer.convert import convert_model
from fused_poolformer.modules import (FusedMetaFormerBlock, FusedPoolFormerBlock, FusedPoolMixer, _AdoptedBlock,
                                      drop_path_scale)
from fused_poolformer.unconvert import is_fused_block, unconvert_block, unconvert_model

timm_models = pytest.importorskip("timm.models")
poolformer_replica = pytest.importorskip("poolformer_replica")
baselines = pytest.importorskip("metaformer_baselines_replica")

pytestmark = [
    pytest.mark.skipif(not ops.HAS_CPU_KERNELS, reason="the C++ CPU kernels were not built"),
    # torch.jit.script's deprecation notice
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
]

MODELS = ("poolformer_s12", "poolformerv2_s12")
FUSE_LEVELS = ("mixer", "block")
REL_TOL = 1e-5  # fused vs unfused in float32, relative to the largest |output|
@pytest.fixture(scope="module")
def timm_model():
    """name -> (the original in eval mode, a 2x3x64x64 input, its output)."""
    cache = {}

    def get(name):
        if name not in cache:
            model = random_timm_model(name)
            x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                cache[name] = (model, x, model(x))
        return cache[name]

    return get


FUSED_ENTRIES = (fused_poolformer.pool_mixer, fused_poolformer.poolformer_block)


def assert_same_computation(got, want, fuse):
    """Bit for bit at the mixer level.  At the block level a traced graph keeps what the block
    decided while tracing (gradients on: fc1's output kept, GELU applied separately), while an
    eager call without gradients lets oneDNN apply GELU inside fc1: the same math, rounded
    in another order."""
    if fuse == "mixer":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def fused_calls(graph_module: torch.fx.GraphModule):
    """The fx nodes calling a fused entry point (the mixer's or, at the block level, the block's)."""
    return [n for n in graph_module.graph.nodes if n.op == "call_function" and n.target in FUSED_ENTRIES]


def norm_weight_argument(node: torch.fx.Node):
    return node.args[1] if node.target is fused_poolformer.pool_mixer else node.kwargs["norm1_weight"]


# --- torch.fx ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fuse", FUSE_LEVELS)
@pytest.mark.parametrize("name", MODELS)
def test_fx_symbolic_trace_matches_the_original(timm_model, name, fuse):
    model, x, expected = timm_model(name)
    torch.fx.symbolic_trace(model)  # the original traces
    fused = convert_model(model, fuse=fuse)
    traced = torch.fx.symbolic_trace(fused)
    # The fused op is one leaf node per block, not traced into (its inputs: the parameters).
    calls = fused_calls(traced)
    assert len(calls) == len(fused.fused_poolformer_report.converted) == 12
    assert norm_weight_argument(calls[0]).op == "get_attr"  # the norm weight
    with torch.no_grad():
        out = traced(x)
        assert_same_computation(out, fused(x), fuse)
    assert relative_error(out, expected) < REL_TOL


@pytest.mark.parametrize("fuse", FUSE_LEVELS)
@pytest.mark.parametrize("name", MODELS)
def test_timm_fx_feature_extractor_matches_the_original(timm_model, name, fuse):
    """timm's create_feature_extractor (torchvision's, with timm's leaf modules): the stage
    outputs that detection / segmentation frameworks pull."""
    model, x, expected = timm_model(name)
    nodes = {f"stages.{i}": f"stage{i}" for i in range(4)} | {"head": "logits"}
    original = timm_models.create_feature_extractor(model, return_nodes=nodes)
    extractor = timm_models.create_feature_extractor(convert_model(model, fuse=fuse), return_nodes=nodes)
    with torch.no_grad():
        want, got = original(x), extractor(x)
    assert list(got) == list(want)
    for key in want:
        assert got[key].shape == want[key].shape, key
        assert relative_error(got[key], want[key]) < REL_TOL, key
    assert relative_error(got["logits"], expected) < REL_TOL


@pytest.mark.parametrize("fuse", FUSE_LEVELS)
def test_fx_training_mode_draws_the_originals_drop_path_masks(fuse):
    """Drop path in a traced training graph: its factor is one leaf node, drawn with the RNG
    calls of timm's DropPath, so a seeded traced step equals the seeded original."""
    torch.manual_seed(0)
    model = tiny_metaformer(drop_path_rate=0.5).train()
    randomize_vectors(model)
    fused = convert_model(model, fuse=fuse)
    traced = torch.fx.symbolic_trace(fused)
    dropping = [m for m in model.modules() if isinstance(m, DropPath) and m.drop_prob > 0]
    # One node per fused branch whose drop path is active (the first block's rate is 0): the
    # mixer branch at the mixer level, both branches at the block level.
    fused_branches = len(dropping) // 2 if fuse == "mixer" else len(dropping)
    assert sum(1 for n in traced.graph.nodes if n.target is drop_path_scale) == fused_branches
    x = torch.randn(6, 3, 32, 32)
    torch.manual_seed(3)
    want = torch.fx.symbolic_trace(model)(x)
    torch.manual_seed(3)
    got = traced(x)
    assert relative_error(got, want) < REL_TOL
    torch.manual_seed(4)
    assert not torch.equal(traced(x), got)  # a new draw, not a mask frozen into the graph


@pytest.mark.parametrize("fuse", FUSE_LEVELS)
def test_fx_official_repositories(fuse):
    """The original PoolFormer repository's model (NCHW) and the MetaFormer baselines'
    PoolFormerV2 (NHWC blocks) trace as their originals do."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for model in (poolformer_replica.OriginalPoolFormer(), baselines.poolformerv2_s12(num_classes=10)):
        model.eval()
        randomize_vectors(model)
        fused = convert_model(model, fuse=fuse)
        assert fused.fused_poolformer_report.converted
        traced = torch.fx.symbolic_trace(fused)
        assert len(fused_calls(traced)) == len(fused.fused_poolformer_report.converted)
        with torch.no_grad():
            want = torch.fx.symbolic_trace(model)(x)
            got = traced(x)
            assert_same_computation(got, fused(x), fuse)
        assert relative_error(got, want) < REL_TOL, type(model).__name__


# --- TorchScript -------------------------------------------------------------------------------


def scripted_operators(scripted) -> str:
    return str(scripted.inlined_graph)


@pytest.mark.parametrize("fuse", FUSE_LEVELS)
@pytest.mark.parametrize("name", MODELS)
def test_torchscript_matches_the_original(timm_model, name, fuse):
    model, x, expected = timm_model(name)
    torch.jit.script(model)  # the original scripts
    fused = convert_model(model, fuse=fuse)
    classes = [type(m) for m in fused.modules()]
    scripted = torch.jit.script(fused)
    assert [type(m) for m in fused.modules()] == classes  # scripting left the eager model as it was
    graph = scripted_operators(scripted)
    if fuse == "mixer":
        assert graph.count("fused_poolformer::pool_mixer_forward") == 12
    assert "fused_poolformer::" in graph
    with torch.no_grad():
        out = scripted(x)
        assert torch.equal(out, fused(x))
    assert relative_error(out, expected) < REL_TOL
    # Saved and loaded (what TorchScript deployment does), it still calls the operator.
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


@pytest.mark.parametrize("fuse", FUSE_LEVELS)
def test_scripted_training_step_matches_the_original(fuse):
    """Forward, backward (the C++ autograd of the operator, reached through torch.ops) and an
    optimizer step of a scripted converted model, against the original in eager mode, with
    drop path active (the scripted mask draws the original's random numbers)."""
    torch.manual_seed(0)
    model = tiny_metaformer(drop_path_rate=0.5).train()
    randomize_vectors(model)
    fused = convert_model(model, fuse=fuse)
    scripted = torch.jit.script(fused)
    x = torch.randn(6, 3, 32, 32)
    target = torch.randn(6, 10)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    results = []
    for net in (model, scripted):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        torch.manual_seed(7)
        loss = nn.functional.mse_loss(net(x), target)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        optimizer.step()
        results.append((loss.detach(), grads, {n: p.detach().clone() for n, p in net.named_parameters()}))
    (loss_want, grads_want, params_want), (loss_got, grads_got, params_got) = results
    assert relative_error(loss_got, loss_want) < REL_TOL
    assert list(grads_got) == list(grads_want)
    for name, grad in grads_want.items():
        if name.endswith("norm1.bias"):  # it cancels out of the fused op: exact zeros
            assert torch.count_nonzero(grads_got[name]) == 0, name
        else:
            assert relative_error(grads_got[name], grad) < 1e-4, name
    # The step changed the scripted module's parameters as it changed the original's.
    for name, value in params_want.items():
        assert relative_error(params_got[name], value) < 1e-4, name
    name = "stages.0.blocks.0.layer_scale1.scale"
    assert not torch.equal(params_got[name], initial[name])
    assert torch.equal(fused.get_parameter(name).detach(), params_got[name])  # scripting shares them


@pytest.mark.parametrize("fuse", FUSE_LEVELS)
def test_torchscript_official_repositories(fuse):
    """The original PoolFormer repository's model scripts (with layer scale, as its forward
    needs), and so does a MetaFormer-baselines block whose norms script (a LayerNormGeneral
    with weight and bias; the baselines' models themselves do not script: their bias-free
    LayerNormGeneral adds None)."""
    torch.manual_seed(0)
    original = poolformer_replica.OriginalPoolFormer().eval()
    norm = lambda dim: baselines.LayerNormGeneral((dim,), normalized_dim=(1, 2, 3), eps=1e-6)
    block = baselines.MetaFormerBlock(16, token_mixer=baselines.Pooling, norm_layer=norm, drop_path=0.2,
                                      layer_scale_init_value=1e-5, res_scale_init_value=1.0).eval()
    for model, x in ((original, torch.randn(2, 3, 32, 32)), (block, torch.randn(2, 8, 8, 16))):
        randomize_vectors(model)
        torch.jit.script(model)
        fused = convert_model(model, fuse=fuse)
        scripted = torch.jit.script(fused)
        assert "fused_poolformer::" in scripted_operators(scripted)
        with torch.no_grad():
            assert relative_error(scripted(x), model(x)) < REL_TOL, type(model).__name__
    # Without layer scale the original's forward does not script (the fused blocks, like it, read
    # layer_scale_1 and layer_scale_2 under use_layer_scale: they script where it does).
    # (Once per process: TorchScript caches the failed class and reports a redefinition after.)
    if fuse == FUSE_LEVELS[0]:
        with pytest.raises(RuntimeError, match="layer_scale"):
            torch.jit.script(poolformer_replica.OriginalPoolFormer(use_layer_scale=False))


def test_torchscript_fused_pool_mixer_module():
    torch.manual_seed(0)
    mixer = FusedPoolMixer(8, pool_size=5, num_groups=2, layer_scale_init_value=0.5, res_scale_init_value=0.7,
                           drop_path=0.3)
    scripted = torch.jit.script(mixer)
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    for training in (False, True):
        mixer.train(training), scripted.train(training)
        torch.manual_seed(1)
        want = mixer(x)
        torch.manual_seed(1)
        got = scripted(x)
        assert torch.equal(got, want), training
    (grad_want,) = torch.autograd.grad(want.sum(), x)
    (grad_got,) = torch.autograd.grad(got.sum(), x)
    assert torch.equal(grad_got, grad_want)


def test_torchscript_reference_backend_is_the_unfused_graph():
    torch.manual_seed(0)
    model = tiny_metaformer().eval()
    randomize_vectors(model)
    x = torch.randn(2, 3, 32, 32)
    fused = convert_model(model, fuse="mixer", backend="reference")
    scripted = torch.jit.script(fused)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        out = scripted(x)
    called = {event.name for event in profile.events()}
    assert "aten::group_norm" in called and not any(n.startswith("fused_poolformer::") for n in called)
    assert torch.equal(out, fused(x))
    assert relative_error(out, model(x)) < REL_TOL


@pytest.mark.parametrize("backend", ["triton"])
def test_torchscript_refuses_a_backend_it_cannot_reach(backend):
    fused = convert_model(tiny_metaformer(), fuse="mixer", backend=backend)
    with pytest.raises(RuntimeError, match=rf"FusedMetaFormerBlock: backend='{backend}' cannot be scripted"):
        torch.jit.script(fused)
    with pytest.raises(RuntimeError, match=rf"FusedPoolMixer: backend='{backend}' cannot be scripted"):
        torch.jit.script(FusedPoolMixer(4, backend=backend))


def test_scripted_explicit_backend_refuses_other_devices():
    """The scripted path keeps the eager path's device check for an explicit backend."""
    scripted = torch.jit.script(FusedPoolMixer(4, backend="cuda"))
    with pytest.raises(Exception, match="backend='cuda' cannot serve a tensor on cpu"):
        scripted(torch.randn(1, 4, 3, 3))


# --- unconvert_model ---------------------------------------------------------------------------


def assert_same_modules(original: nn.Module, restored: nn.Module) -> None:
    """Same module types, same attribute names in the same order."""
    pairs = list(zip(original.named_modules(), restored.named_modules(), strict=True))
    for (name, a), (name_b, b) in pairs:
        assert name == name_b and type(a) is type(b), (name, type(a), type(b))
        assert list(vars(a)) == list(vars(b)), name


def assert_same_structure(original: nn.Module, restored: nn.Module) -> None:
    """Same modules and the same state_dict (keys, order, values)."""
    assert_same_modules(original, restored)
    want, got = original.state_dict(), restored.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("fuse", FUSE_LEVELS)
@pytest.mark.parametrize("name", MODELS)
def test_unconvert_restores_the_original(timm_model, name, fuse):
    model, x, expected = timm_model(name)
    fused = convert_model(model, fuse=fuse)
    assert all(is_fused_block(fused.get_submodule(n)) for n in fused.fused_poolformer_report.converted)
    restored = fused_poolformer.unconvert_model(fused)
    assert_same_structure(model, restored)
    assert not any(is_fused_block(m) for m in restored.modules())
    assert not hasattr(restored, "fused_poolformer_report")
    with torch.no_grad():
        assert torch.equal(restored(x), expected)  # the unfused graph, bit for bit
    # inplace=False left the converted model as it was.
    assert is_fused_block(fused.stages[0].blocks[0]) and hasattr(fused, "fused_poolformer_report")


@pytest.mark.parametrize("fuse", FUSE_LEVELS)
def test_unconvert_inplace_keeps_parameters_and_hooks_fire_again(fuse):
    torch.manual_seed(0)
    model = tiny_metaformer().train()
    randomize_vectors(model)
    fused = convert_model(model, fuse=fuse)
    optimizer = torch.optim.SGD(fused.parameters(), lr=0.1)
    fused(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # trained values must come back, not the pre-conversion ones
    parameters = list(fused.parameters())
    trained = copy.deepcopy(fused.state_dict())
    calls = []
    fused.stages[0].blocks[0].norm1.register_forward_hook(lambda *a: calls.append("norm1"))
    fused.stages[0].blocks[0].token_mixer.pool.register_forward_hook(lambda *a: calls.append("pool"))
    fused.stages[0].blocks[0].register_forward_hook(lambda *a: calls.append("block"))
    x = torch.randn(2, 3, 32, 32)
    fused(x)
    assert calls == ["block"]  # the fused op bypasses norm1 and the pool
    restored = unconvert_model(fused, inplace=True)
    assert restored is fused
    assert type(restored.stages[0].blocks[0]).__name__ == "MetaFormerBlock"
    assert all(a is b for a, b in zip(parameters, restored.parameters(), strict=True))
    assert_same_modules(model, restored)
    assert list(restored.state_dict()) == list(trained)
    for key, value in trained.items():
        assert torch.equal(restored.state_dict()[key], value), key
    calls.clear()
    restored.eval()(x)
    assert calls == ["norm1", "pool", "block"]
    assert restored.stages[0].blocks[0].training is False  # the mode follows the model
    optimizer.zero_grad()
    restored(x).sum().backward()
    optimizer.step()  # the optimizer built on the fused model still drives the parameters
    assert all(p.grad is not None for p in parameters)


def test_unconvert_official_repositories_and_a_fused_root():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for model in (poolformer_replica.OriginalPoolFormer(drop_path_rate=0.1),
                  poolformer_replica.OriginalPoolFormer(use_layer_scale=False),
                  baselines.poolformerv2_s12(num_classes=10)):
        model.eval()
        randomize_vectors(model)
        for fuse in FUSE_LEVELS:
            restored = unconvert_model(convert_model(model, fuse=fuse))
            assert_same_structure(model, restored)
            with torch.no_grad():
                assert torch.equal(restored(x), model(x))
    # A block converted on its own comes back as a block.
    block = poolformer_replica.PoolFormerBlock(8).eval()
    fused = convert_model(block)
    assert isinstance(fused, FusedPoolFormerBlock)
    restored = unconvert_model(fused, inplace=True)
    assert type(restored) is poolformer_replica.PoolFormerBlock
    assert_same_structure(block, restored)


def test_unconvert_any_fused_subclass():
    """A fusion level unconvert_model has never heard of (a subclass adopting the block with
    _adopt, adding attributes, a buffer and shadowing one of the original's) turns back."""

    class ShadowingBlock(FusedPoolFormerBlock):
        def _read_settings(self) -> None:
            self.use_layer_scale = "shadowed"  # a setting of its own under an original name
            self.register_buffer("packed", torch.ones(3))
            self.extra_setting = 5

        def forward(self, x):
            return x

    block = poolformer_replica.PoolFormerBlock(8, drop_path=0.1).eval()
    fused = ShadowingBlock.from_block(block)
    assert fused.original_class is poolformer_replica.PoolFormerBlock
    restored = unconvert_block(fused)
    assert type(restored) is poolformer_replica.PoolFormerBlock
    assert restored.use_layer_scale is True
    assert not hasattr(restored, "extra_setting") and "packed" not in dict(restored.named_buffers())
    assert_same_structure(block, restored)
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(restored(x), block(x))
    assert isinstance(fused.packed, torch.Tensor)  # the fused block itself is left as it was

    # A module that records only the class it replaced.
    class Recorded(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)
            self.original_class = nn.Sequential

    assert is_fused_block(Recorded()) and not isinstance(Recorded(), _AdoptedBlock)
    back = unconvert_model(nn.Sequential(Recorded()))
    assert type(back[0]) is nn.Sequential and not hasattr(back[0], "original_class")


def test_unconvert_then_convert_again():
    torch.manual_seed(0)
    model = tiny_metaformer().eval()
    randomize_vectors(model)
    x = torch.randn(2, 3, 32, 32)
    twice = convert_model(unconvert_model(convert_model(model, fuse="mixer")), fuse="mixer")
    assert len(twice.fused_poolformer_report.converted) == 4
    with torch.no_grad():
        assert torch.equal(twice(x), convert_model(model, fuse="mixer")(x))


def test_unconvert_bad_input_and_unfused_models():
    with pytest.raises(TypeError, match="unconvert_model: model must be an nn.Module, got str"):
        unconvert_model("poolformer_s12")
    with pytest.raises(TypeError, match="unconvert_model: inplace must be a bool, got int"):
        unconvert_model(nn.Linear(2, 2), inplace=1)
    with pytest.raises(TypeError, match="unconvert_block: block must be a fused block"):
        unconvert_block(nn.Linear(2, 2))
    plain = tiny_metaformer()
    same = unconvert_model(plain, inplace=True)
    assert same is plain
    copied = unconvert_model(plain)
    assert copied is not plain and list(copied.state_dict()) == list(plain.state_dict())

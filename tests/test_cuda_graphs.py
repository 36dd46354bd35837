"""CUDA graphs of a converted model (issue 21; docs/deploy.md): the inference forward and a
whole training step -- forward, loss, backward, optimizer step -- captured into one CUDA
graph each with static inputs, then replayed on new data, match the same model run eagerly.

The fused operators allocate through the caching allocator only and never synchronize the
host, so they capture like ATen's own kernels.  The op-level capture (forward and backward of
``pool_mixer`` alone) is in test_cuda_only.py.  GPU only (marked ``gpu``): skipped here, run by
``bash benchmarks/gpu_check.sh``."""

import copy

import pytest
import torch
from torch import nn

from conversion_checks import randomize_vectors, relative_error, tiny_metaformer
from fused_poolformer.convert import convert_model
from helpers import HAS_CUDA_DEVICE, backend_params

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA_DEVICE, reason="no CUDA device")]

# The backends that serve CUDA tensors with fused kernels (each skipped with its reason where
# it cannot run).  Triton has no block operator: its "block" model is fused at the mixer level.
GPU_BACKENDS = backend_params("cuda", "triton")
FUSE_LEVELS = ("block", "mixer")
BATCH = 4
# Graph replay against eager on the same device with TF32 off: the same kernels on the same
# data (a stale replay, one that did not recompute, is off by O(1)).
REL_TOL = 1e-5
WARMUP_STEPS = 3  # on a side stream before capture: autotuning, lazy optimizer state, cuBLAS workspaces


@pytest.fixture(autouse=True)
def no_tf32():
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        matmul = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul


def converted_model(backend: str, fuse: str) -> nn.Module:
    """timm's MetaFormer classes, a PoolFormer-v1 stage (GroupNorm with bias, layer scale)
    and a v2-like one (res scale), random per-channel vectors; no drop path (its random
    masks would differ between the eager and the graphed run)."""
    torch.manual_seed(0)
    model = tiny_metaformer()
    randomize_vectors(model)
    fused = convert_model(model, backend=backend, fuse=fuse).cuda()
    assert len(fused.fused_poolformer_report.converted) == 4, fused.fused_poolformer_report
    return fused


def batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 3, 32, 32, generator=generator)
    target = torch.randn(BATCH, 10, generator=generator)
    return x.cuda(), target.cuda()


def warm_up(fn) -> None:
    """Runs ``fn`` a few times on a side stream, as CUDA graph capture requires."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            fn()
    torch.cuda.current_stream().wait_stream(side)


@pytest.mark.parametrize("fuse", FUSE_LEVELS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_inference_graph_replays_to_the_eager_result(backend, fuse):
    model = converted_model(backend, fuse).eval()
    static_x, _ = batch(0)
    with torch.no_grad():
        warm_up(lambda: model(static_x))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = model(static_x)
    replayed = []
    for seed in (1, 2):
        x, _ = batch(seed)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            eager = model(x)
        assert relative_error(static_y, eager) < REL_TOL, seed
        replayed.append(static_y.clone())
    assert not torch.equal(replayed[0], replayed[1])  # each replay computed its own input


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor):
    # set_to_none: in the captured step, backward creates the .grad tensors from the
    # graph's memory pool, and every replay writes them again.
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.mse_loss(model(x), target)
    loss.backward()
    optimizer.step()
    return loss


@pytest.mark.parametrize("fuse", FUSE_LEVELS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_training_step_graph_replays_to_the_eager_result(backend, fuse):
    """The whole step in one graph (PyTorch's "whole-network capture"): gradients land in
    the same .grad tensors and SGD with momentum updates the parameters in place on every
    replay.  An eager twin of the model takes the same steps on the same batches; loss and
    every parameter must agree after each."""
    graphed = converted_model(backend, fuse).train()
    eager = copy.deepcopy(graphed)
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9) for net in (graphed, eager)]
    static_x, static_target = batch(0)
    # Warm-up steps change the parameters: the twin takes the same ones.
    for _ in range(WARMUP_STEPS):
        train_step(eager, optimizers[1], static_x, static_target)
    warm_up(lambda: train_step(graphed, optimizers[0], static_x, static_target))
    assert_same_parameters(graphed, eager)

    graph = torch.cuda.CUDAGraph()
    optimizers[0].zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = train_step(graphed, optimizers[0], static_x, static_target)
    before = [p.detach().clone() for p in graphed.parameters()]
    for seed in (1, 2, 3):
        x, target = batch(seed)
        static_x.copy_(x)
        static_target.copy_(target)
        graph.replay()
        torch.cuda.synchronize()
        loss = train_step(eager, optimizers[1], x, target)
        assert relative_error(static_loss, loss) < REL_TOL, seed
        assert_same_parameters(graphed, eager)
    # The replays trained the model: the fused blocks' own parameters moved.
    moved = [name for (name, p), old in zip(graphed.named_parameters(), before) if not torch.equal(p, old)]
    assert "stages.0.blocks.0.norm1.weight" in moved and "stages.1.blocks.1.res_scale1.scale" in moved, moved


def assert_same_parameters(graphed: nn.Module, eager: nn.Module) -> None:
    for (name, p), q in zip(graphed.named_parameters(), eager.parameters(), strict=True):
        assert relative_error(p, q) < REL_TOL, name

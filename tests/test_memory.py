"""Memory: what the fused training step keeps and allocates.

- Saved for backward (torch.autograd.graph.saved_tensors_hooks): x and the (N, G) mean and
  rstd plus the (C,)/(N,) vectors -- about 1x the activation bytes; the unfused graph keeps
  3x (x, the normed input and the pooled difference).
- Allocations per call on the CPU, read from the profiler's allocation trace
  (torch.profiler with profile_memory=True: every tensor allocation through the c10 CPU
  allocator is one "[memory]" event with its byte count, freed ones negative).  The
  kernels' own std::vector scratch (one row of column sums per task, per-task partial
  sums, per-(sample, channel) sums) does not pass through that allocator and is not
  counted; none of it grows with H * W beyond one row.
- RSS does not grow over 10**4 forward + backward calls (psutil).
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from fused_poolformer import contract, ops, reference
from helpers import (CPU_KERNELS, DIFFERENTIABLE, FUSED, call, forward_backward, make_inputs, random_like,
                     requires_cpu_kernels, with_backend)

CL = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])


def saved_tensor_bytes(fn, x, kw, **opts):
    """Bytes of the distinct tensors autograd saves for the backward of fn(x, **kw)."""
    saved = {}

    def pack(t):
        saved[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    x = x.detach().requires_grad_(True)
    kw = {k: None if v is None else v.detach().requires_grad_(k in DIFFERENTIABLE) for k, v in kw.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call(fn, x, kw, **opts)
    return sum(saved.values())


@pytest.mark.parametrize("backend", FUSED)
@CL
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_saves_only_x_and_statistics(backend, device, channels_last, dtype):
    x, kw = make_inputs((4, 16, 28, 28), dtype, channels_last, device=device)
    activation = x.numel() * x.element_size()
    n, c, groups = x.shape[0], x.shape[1], 4
    small = 4 * c * 4 + n * 4 + 2 * n * groups * 4  # vectors (float32 at most) and float32 stats
    fused = saved_tensor_bytes(ops.pool_mixer, x, kw, backend=backend, num_groups=groups)
    unfused = saved_tensor_bytes(reference.pool_mixer, x, kw, num_groups=groups)
    assert activation <= fused <= activation + small
    assert unfused >= 3 * activation  # x, the normed input and the pooled difference


@pytest.mark.parametrize("backend", FUSED)
def test_the_one_large_saved_tensor_is_x_itself(backend, device):
    """Autograd keeps x (no copy of it) and nothing else of x's size."""
    x, kw = make_inputs((2, 8, 6, 6), torch.float32, device=device)
    x.requires_grad_(True)
    large = []

    def pack(t):
        if t.numel() >= x.numel():
            large.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call(with_backend(backend), x, kw)
    assert len(large) == 1 and large[0].data_ptr() == x.data_ptr()


# ---------------------------------------------------------------------------------------
# Allocations per call.


def allocations(fn):
    """Sizes in bytes of the tensor allocations made while fn() runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sorted(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0)


def forward_call(x, kw, groups):
    return lambda: torch.ops.fused_poolformer.pool_mixer_forward(
        x, kw["weight"], kw["bias"], kw["layer_scale"], kw["res_scale"], kw["sample_scale"], groups, 3, 1e-5)


def backward_call(x, kw, groups):
    y, mean, rstd = forward_call(x, kw, groups)()
    # In x's layout, as autograd passes it when the next op keeps the layout (a grad_y in
    # the other layout is copied once, like x in test_cpu_copies_...).
    grad_y = random_like(y, 1).contiguous(memory_format=contract.dense_format(y))
    return lambda: torch.ops.fused_poolformer.pool_mixer_backward(
        grad_y, x, mean, rstd, kw["weight"], kw["bias"], kw["layer_scale"], kw["res_scale"], kw["sample_scale"],
        groups, 3, 1e-5, [True] * 5)


def allocations_beyond(sizes, tensor_bytes, count):
    """The allocations left after removing ``count`` of exactly tensor_bytes each."""
    sizes = list(sizes)
    for _ in range(count):
        assert tensor_bytes in sizes, f"no allocation of {tensor_bytes} bytes in {sizes}"
        sizes.remove(tensor_bytes)
    return sizes


@requires_cpu_kernels
@CL
@pytest.mark.parametrize("make_call", [forward_call, backward_call], ids=["forward", "backward"])
def test_cpu_allocates_only_the_output_and_small_buffers(channels_last, make_call):
    """One allocation of the output's size (y or grad_x); every other allocation is the
    same list of small (N, C)/(N, G)/(C,) buffers whatever the plane size."""
    beyond = []
    for side in (16, 48):
        x, kw = make_inputs((2, 8, side, side), channels_last=channels_last)
        fn = make_call(x, kw, 2)
        fn()  # warm up (lazy initialisation)
        beyond.append(allocations_beyond(allocations(fn), x.numel() * x.element_size(), 1))
    assert beyond[0] == beyond[1], "an allocation grows with H * W"
    assert sum(beyond[0]) <= 16 * 1024, beyond[0]


@requires_cpu_kernels
def test_cpu_copies_an_input_dense_in_neither_format_once():
    """A permuted x (dense in neither NCHW nor channels_last) costs one copy of x."""
    x, kw = make_inputs((2, 8, 24, 24))
    x = x.transpose(2, 3).contiguous().transpose(2, 3)
    fn = forward_call(x, kw, 2)
    fn()
    beyond = allocations_beyond(allocations(fn), x.numel() * x.element_size(), 2)
    assert sum(beyond) <= 16 * 1024, beyond


# ---------------------------------------------------------------------------------------
# No growth over many calls.


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_rss_does_not_grow_over_ten_thousand_calls(backend):
    psutil = pytest.importorskip("psutil")
    process = psutil.Process()
    x, kw = make_inputs((2, 8, 16, 16))
    grad_y = random_like(x, 2)

    def step():
        forward_backward(ops.pool_mixer, x, kw, grad_y, backend=backend, num_groups=2)

    for _ in range(500):  # reach the allocator's steady state
        step()
    before = process.memory_info().rss
    for _ in range(10**4):
        step()
    growth = process.memory_info().rss - before
    # Leaking the output alone would be 10**4 * 8 KiB = 80 MiB; allow allocator noise.
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"

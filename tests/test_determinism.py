"""Determinism: every fused backend gives bitwise-identical outputs and gradients across
repeated calls, CPU thread counts and processes, and runs under
torch.use_deterministic_algorithms(True).  The kernels partition work by shape alone and
merge partial sums in a fixed order (no float atomics), so this holds exactly."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from fused_poolformer import ops
from helpers import CPU_KERNELS, FUSED, ROOT, forward_backward, make_inputs, random_like

# 2 x 8 x 33 x 31 with one group: 8184 elements per group, so the statistics merge two
# blocks and the stencil passes split every plane into several row chunks.
SHAPE = (2, 8, 33, 31)
# A PoolFormer-like stage with N = 1 (the CPU kernels split its planes across threads) and
# one with 64 channels (many tiles per plane on the GPU).
SHAPES = pytest.mark.parametrize("shape", [SHAPE, (1, 32, 28, 28), (2, 64, 28, 28)], ids=str)
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
CL = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])


def results(backend, dtype, channels_last, device="cpu", num_groups=1, shape=SHAPE):
    """y and every gradient, as a tuple of tensors."""
    x, kw = make_inputs(shape, dtype, channels_last, seed=11, device=device)
    y, grads = forward_backward(ops.pool_mixer, x, kw, random_like(x, 12), backend=backend, num_groups=num_groups)
    return (y,) + tuple(grads[k] for k in sorted(grads))


def assert_bitwise_equal(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.dtype == v.dtype and u.shape == v.shape and u.stride() == v.stride(), i
        # Compare bits, not values (NaN != NaN, -0.0 == 0.0).
        assert torch.equal(u.contiguous().view(torch.uint8), v.contiguous().view(torch.uint8)), i


def digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class num_threads:
    """Context manager: torch's intra-op thread count, restored afterwards."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


@pytest.mark.parametrize("backend", FUSED)
@DTYPES
@CL
@SHAPES
def test_repeated_calls_are_bitwise_identical(backend, device, dtype, channels_last, shape):
    first = results(backend, dtype, channels_last, device, shape=shape)
    for _ in range(2):
        assert_bitwise_equal(results(backend, dtype, channels_last, device, shape=shape), first)


@pytest.mark.parametrize("backend", CPU_KERNELS)
@DTYPES
@CL
@pytest.mark.parametrize("shape", [SHAPE, (1, 32, 28, 28)], ids=str)
def test_thread_count_does_not_change_a_bit(backend, dtype, channels_last, shape):
    with num_threads(1):
        one = results(backend, dtype, channels_last, num_groups=2, shape=shape)
    with num_threads(2):
        two = results(backend, dtype, channels_last, num_groups=2, shape=shape)
    with num_threads(3):  # more threads than tasks per plane divide evenly into
        three = results(backend, dtype, channels_last, num_groups=2, shape=shape)
    assert_bitwise_equal(one, two)
    assert_bitwise_equal(one, three)


DIGEST_SCRIPT = """
import sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
torch.set_num_threads(1)
import test_determinism as t
print(t.digest(t.results({backend!r}, torch.float32, True)))
"""


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_another_process_with_one_thread_gets_the_same_bits(backend):
    script = DIGEST_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), backend=backend)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    with num_threads(2):
        here = digest(results(backend, torch.float32, True))
    assert out.stdout.strip().splitlines()[-1] == here


@pytest.mark.parametrize("backend", FUSED)
@DTYPES
@CL
def test_deterministic_algorithms_mode_is_accepted(backend, device, dtype, channels_last):
    expected = results(backend, dtype, channels_last, device)
    saved, saved_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = results(backend, dtype, channels_last, device)
    finally:
        torch.use_deterministic_algorithms(saved, warn_only=saved_warn)
    assert_bitwise_equal(got, expected)

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

from conftest import ROOT, make_inputs, requires_cuda
from fused_poolformer import ops
from hardening_utils import forward_backward, fused_backends, random_like

# 2 x 8 x 33 x 31 with one group: 8184 elements per group, so the statistics merge two
# blocks and the stencil passes split every plane into several row chunks.
SHAPE = (2, 8, 33, 31)
CPU_CASES = [
    pytest.param(backend, dtype, channels_last, id=f"{backend}-{str(dtype)[6:]}-{'cl' if channels_last else 'nchw'}")
    for backend in fused_backends("cpu")
    for dtype in (torch.float32, torch.bfloat16)
    for channels_last in (False, True)
]


def results(backend, dtype, channels_last, device="cpu", num_groups=1):
    """y and every gradient, as a tuple of tensors."""
    x, kw = make_inputs(SHAPE, dtype, channels_last, seed=11, device=device)
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


@pytest.mark.parametrize("backend,dtype,channels_last", CPU_CASES)
def test_repeated_calls_are_bitwise_identical(backend, dtype, channels_last):
    first = results(backend, dtype, channels_last)
    for _ in range(2):
        assert_bitwise_equal(results(backend, dtype, channels_last), first)


@pytest.mark.parametrize("backend,dtype,channels_last", CPU_CASES)
def test_thread_count_does_not_change_a_bit(backend, dtype, channels_last):
    with num_threads(1):
        one = results(backend, dtype, channels_last, num_groups=2)
    with num_threads(2):
        two = results(backend, dtype, channels_last, num_groups=2)
    with num_threads(3):  # more threads than tasks per plane divide evenly into
        three = results(backend, dtype, channels_last, num_groups=2)
    assert_bitwise_equal(one, two)
    assert_bitwise_equal(one, three)


DIGEST_SCRIPT = """
import sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
torch.set_num_threads(1)
import test_determinism as t
print(t.digest(t.results({backend!r}, torch.float32, True)))
"""


@pytest.mark.parametrize("backend", fused_backends("cpu"))
def test_another_process_with_one_thread_gets_the_same_bits(backend):
    script = DIGEST_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), backend=backend)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    with num_threads(2):
        here = digest(results(backend, torch.float32, True))
    assert out.stdout.strip().splitlines()[-1] == here


@pytest.mark.parametrize("backend", fused_backends("cpu"))
def test_deterministic_algorithms_mode_is_accepted(backend):
    expected = results(backend, torch.float32, False)
    saved, saved_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = results(backend, torch.float32, False)
    finally:
        torch.use_deterministic_algorithms(saved, warn_only=saved_warn)
    assert_bitwise_equal(got, expected)


@requires_cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cuda_repeated_calls_and_deterministic_mode(dtype, channels_last):
    saved, saved_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    for backend in fused_backends("cuda"):
        first = results(backend, dtype, channels_last, device="cuda")
        assert_bitwise_equal(results(backend, dtype, channels_last, device="cuda"), first)
        torch.use_deterministic_algorithms(True)
        try:
            assert_bitwise_equal(results(backend, dtype, channels_last, device="cuda"), first)
        finally:
            torch.use_deterministic_algorithms(saved, warn_only=saved_warn)

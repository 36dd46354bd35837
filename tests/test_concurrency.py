"""Concurrency: calls from several Python threads at once (each kernel also runs its own
at::parallel_for inside) give the same results as sequential calls -- bitwise, since every
backend is deterministic -- and match the float64 reference."""

import threading

import pytest
import torch

from fused_poolformer import ops
from helpers import FUSED, assert_close_to, forward_backward, make_inputs, random_like, reference_forward_backward

THREADS = 4
CALLS_PER_THREAD = 15


def job(index, device, shared):
    """Inputs of one thread: its own shape, layout and dtype, or the one shared input."""
    seed = 0 if shared else index
    shape = (2, 4, 9, 11) if shared else (1 + index % 2, 2 * (1 + index), 7 + index, 12 - index)
    dtype = torch.float32 if shared or index % 2 == 0 else torch.float64
    x, kw = make_inputs(shape, dtype, channels_last=not shared and index % 3 == 1, seed=seed, device=device)
    return x, kw, random_like(x, seed + 100), dict(num_groups=2, pool_size=3 + 2 * (0 if shared else index % 3))


def run(backend, device, inputs):
    x, kw, grad_y, opts = inputs
    y, grads = forward_backward(ops.pool_mixer, x, kw, grad_y, backend=backend, **opts)
    return (y,) + tuple(grads[k] for k in sorted(grads))


def run_threads(backend, device, jobs):
    """Every job CALLS_PER_THREAD times in its own thread, all released at once."""
    barrier = threading.Barrier(len(jobs))
    outputs = [[] for _ in jobs]
    errors = []

    def worker(i):
        try:
            barrier.wait()
            for _ in range(CALLS_PER_THREAD):
                outputs[i].append(run(backend, device, jobs[i]))
            if device == "cuda":
                torch.cuda.synchronize()
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    return outputs


def check_concurrent(backend, device, shared):
    jobs = [job(i, device, shared) for i in range(THREADS)]
    sequential = [run(backend, device, j) for j in jobs]
    for i, results in enumerate(run_threads(backend, device, jobs)):
        for result in results:
            for got, want in zip(result, sequential[i]):
                assert torch.equal(got, want), f"thread {i} differs from the sequential call"
    for (x, kw, grad_y, opts), result in zip(jobs, sequential):
        y_ref, grads_ref = reference_forward_backward(x, kw, grad_y, **opts)
        assert_close_to(result[0], y_ref, x.dtype)
        for got, name in zip(result[1:], sorted(grads_ref)):
            assert_close_to(got, grads_ref[name], got.dtype)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shared", [False, True], ids=["own_inputs", "shared_input"])
def test_threads_match_sequential_calls_and_the_reference(backend, device, shared):
    check_concurrent(backend, device, shared)

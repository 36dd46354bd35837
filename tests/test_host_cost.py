"""The host path: what one call costs around the kernels, and loading the library.

Speed itself is measured by the benchmark (`python -m fused_poolformer.bench --parts host`);
these tests hold the budget that makes it fast: the number of operator calls one CPU
forward+backward dispatches, and no Python between the user's call and the kernels.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_poolformer as fp
from helpers import ROOT, requires_cpu_kernels

ATEN_CALL_BUDGET = 12  # per forward+backward (issue 10; it was 133)


def dispatched_operator_calls(fn):
    """Names of the operator calls (aten::*, fused_poolformer::*) recorded while fn runs,
    nested calls included; autograd-engine bookkeeping events are not operator calls."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith(("aten::", "fused_poolformer::"))]


@requires_cpu_kernels
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_forward_backward_dispatches_at_most_twelve_operator_calls(channels_last):
    x = torch.randn(2, 8, 4, 4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    params = [torch.rand(8, requires_grad=True) for _ in range(4)]  # weight, bias, layer_scale, res_scale
    grad_y = torch.randn_like(x)

    def step():
        y = fp.pool_mixer(x, params[0], params[1], layer_scale=params[2], res_scale=params[3])
        torch.autograd.grad(y, [x, *params], grad_y)

    step()  # warm up
    calls = dispatched_operator_calls(step)
    assert len(calls) <= ATEN_CALL_BUDGET, calls
    assert calls.count("fused_poolformer::pool_mixer_forward") == 1
    assert calls.count("fused_poolformer::pool_mixer_backward") == 1
    # Everything else is an output allocation: no coefficient tables, casts or reductions.
    assert set(calls) <= {"fused_poolformer::pool_mixer_forward", "fused_poolformer::pool_mixer_backward",
                          "aten::empty"}, calls


@requires_cpu_kernels
def test_no_python_runs_between_the_call_and_the_kernels():
    """The autograd of the C++ operators is C++: forward runs pool_mixer's own dispatch and
    nothing else of fused_poolformer; the backward runs no Python of the package at all."""
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    w = torch.rand(8, requires_grad=True)
    package = os.path.dirname(fp.__file__)

    def python_frames(fn):
        frames = []

        def tracer(frame, event, arg):
            if event == "call" and frame.f_code.co_filename.startswith(package):
                frames.append(frame.f_code.co_name)

        sys.setprofile(tracer)
        try:
            out = fn()
        finally:
            sys.setprofile(None)
        return frames, out

    forward_frames, y = python_frames(lambda: fp.pool_mixer(x, w))
    assert forward_frames == ["pool_mixer"], forward_frames
    backward_frames, _ = python_frames(lambda: torch.autograd.grad(y, [x, w], torch.ones_like(y)))
    assert backward_frames == [], backward_frames


class LoggingTensor(torch.Tensor):
    """A tensor subclass whose __torch_function__ records what it is called with."""
    calls = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


class LoggingMode(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


@requires_cpu_kernels
def test_fast_entry_leaves_subclasses_and_modes_to_torch_ops():
    """pool_mixer's entry into C++ (fused_poolformer._C.forward) reads only plain tensors;
    a tensor subclass or a __torch_function__ mode gets the call through torch.ops, so
    its override sees the operator, and the result is the same."""
    x, w = torch.randn(2, 4, 5, 5), torch.rand(4)
    expected = fp.pool_mixer(x, w, num_groups=2)
    forward_op = torch.ops.fused_poolformer.pool_mixer_forward.default

    logged = x.as_subclass(LoggingTensor)
    assert fp.ops._C.forward(logged, w, None, None, None, None, 2, 3, 1e-5) is None
    LoggingTensor.calls.clear()
    y = fp.pool_mixer(logged, w, num_groups=2)
    assert forward_op in LoggingTensor.calls
    torch.testing.assert_close(y.as_subclass(torch.Tensor), expected, rtol=0, atol=0)

    with LoggingMode() as mode:
        assert fp.ops._C.forward(x, w, None, None, None, None, 2, 3, 1e-5) is None
        y = fp.pool_mixer(x, w, num_groups=2)
    assert forward_op in mode.calls
    torch.testing.assert_close(y, expected, rtol=0, atol=0)

    # A Parameter is a plain tensor to C++: it takes the fast entry.
    assert torch.equal(fp.ops._C.forward(x, torch.nn.Parameter(w), None, None, None, None, 2, 3, 1e-5), expected)


@requires_cpu_kernels
@pytest.mark.parametrize("bad", [dict(weight=[1.0] * 4), dict(num_groups=2**70), dict(num_groups=True)],
                         ids=["list", "huge-int", "bool"])
def test_fast_entry_leaves_other_argument_types_to_the_checked_path(bad):
    """What _C.forward does not read (a list for a tensor, an int beyond int64, a bool for
    an int) still gets the checked path's TypeError / ValueError naming the argument."""
    x = torch.randn(2, 4, 5, 5)
    name = next(iter(bad))
    with pytest.raises((TypeError, ValueError), match=name):
        fp.pool_mixer(x, **{"num_groups": 2, **bad})


def test_failed_library_load_warns_once_and_auto_falls_back():
    """A broken or missing fused_poolformer._C: the package imports, warns (once) with the
    load error and the fix, and backend='auto' gives the unfused graph's result."""
    script = textwrap.dedent("""
        import importlib.abc, sys, warnings

        class Broken(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "fused_poolformer._C":
                    raise ImportError("undefined symbol: _ZN3c1010simulated")
                return None

        sys.meta_path.insert(0, Broken())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            import fused_poolformer as fp
            import fused_poolformer.ops  # a second import must not warn again
        ours = [w for w in caught if "fused_poolformer" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        message = str(ours[0].message)
        assert "simulated" in message and "pip install --no-build-isolation -e ." in message, message
        assert fp.available_backends("cpu") == ["reference"] or fp.available_backends("cpu")[-1] == "reference"
        assert not fp.HAS_CPU_KERNELS and fp.EXTENSION_ERROR is not None
        x = torch.randn(2, 4, 5, 5)
        assert torch.equal(fp.pool_mixer(x, num_groups=2), fp.reference.pool_mixer(x, num_groups=2))
        try:
            fp.pool_mixer(x, backend="cpu")
        except RuntimeError as exc:
            assert "simulated" in str(exc)
        else:
            raise AssertionError("backend='cpu' did not refuse")
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr

"""Errors: bad input is a Python exception that names the argument -- never an abort, a
segfault or a silent wrong answer.

- The C++ checks (csrc/host.cpp), reached by calling the operators
  torch.ops.fused_poolformer.pool_mixer_forward/backward directly, run in a subprocess
  (`python tests/test_errors.py cpu|cuda` prints one JSON line per bad call): the test
  checks that the process survives all of them and that each message names the argument.
- The public pool_mixer: every rule, in-process, through backend="auto" (straight into
  C++) and through each backend by name (the C++ prologue, or fused_poolformer/contract.py
  for Triton and the reference): same exception type, same message.
- The backend choice: "auto" picks the fused kernels of x's device; a backend that cannot
  serve the input says why.
"""

import functools
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

if __name__ == "__main__":  # run as the subprocess: helpers puts the checkout on sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import CPP_BACKENDS, ROOT, backend_params, make_inputs, requires_cuda  # noqa: E402

import fused_poolformer  # noqa: E402
from fused_poolformer import backends, ops  # noqa: E402

SHAPE = (2, 4, 5, 5)  # N = 2, C = 4; the calls below use num_groups = 2
GOOD_FORWARD = dict(weight=None, bias=None, layer_scale=None, res_scale=None, sample_scale=None, num_groups=2,
                    pool_size=3, eps=1e-5)
FORWARD_ORDER = ("x",) + tuple(GOOD_FORWARD)
BACKWARD_ORDER = ("grad_y", "x", "mean", "rstd", "weight", "bias", "layer_scale", "res_scale", "sample_scale",
                  "num_groups", "pool_size", "eps", "output_mask")


def vector(n, dtype=torch.float32, device="cpu"):
    return (torch.rand(n, dtype=torch.float64) + 0.5).to(dtype).to(device)


def forward_args(device, **changes):
    x, _ = make_inputs(SHAPE, device=device)
    args = dict(x=x, **GOOD_FORWARD)
    args.update(changes)
    return [args[k] for k in FORWARD_ORDER]


def backward_args(device, **changes):
    x, _ = make_inputs(SHAPE, device=device)
    args = dict(grad_y=torch.randn_like(x), x=x, mean=torch.randn(2, 2, device=device),
                rstd=torch.rand(2, 2, device=device) + 0.5, weight=None, bias=None, layer_scale=None, res_scale=None,
                sample_scale=None, num_groups=2, pool_size=3, eps=1e-5, output_mask=[True] * 5)
    args.update(changes)
    return [args[k] for k in BACKWARD_ORDER]


def x_of(device, dtype=torch.float32, shape=SHAPE):
    return make_inputs(shape, dtype, device=device)[0]


def cpu_cases(d):
    """(name, "forward"/"backward", args, expected message fragment) for device d."""
    fwd = lambda **c: forward_args(d, **c)
    bwd = lambda **c: backward_args(d, **c)
    cases = [
        ("x_rank_3", "forward", fwd(x=x_of(d)[0]), "x must be 4-D"),
        ("x_rank_5", "forward", fwd(x=x_of(d)[None]), "x must be 4-D"),
        ("x_int", "forward", fwd(x=x_of(d).int()), "x must be float32, float64, float16 or bfloat16"),
        ("x_bool", "forward", fwd(x=x_of(d) > 0), "x must be float32, float64, float16 or bfloat16"),
        ("weight_2d", "forward", fwd(weight=vector(4, device=d)[:, None]), "weight must have shape (C,) = (4,)"),
        ("sample_scale_length_C", "forward", fwd(sample_scale=vector(4, device=d)), "sample_scale must have shape (N,) = (2,)"),
        ("weight_float64", "forward", fwd(weight=vector(4, torch.float64, d)), "weight has dtype"),
        ("layer_scale_float16", "forward", fwd(layer_scale=vector(4, torch.float16, d)), "layer_scale has dtype"),
        ("res_scale_bfloat16_for_float16_x", "forward",
         fwd(x=x_of(d, torch.float16), res_scale=vector(4, torch.bfloat16, d)), "res_scale has dtype"),
        ("bias_float32_for_float64_x", "forward", fwd(x=x_of(d, torch.float64), bias=vector(4, device=d)), "bias has dtype"),
        ("sample_scale_int", "forward", fwd(sample_scale=vector(2, device=d).int()), "sample_scale has dtype"),
        ("num_groups_3_of_4_channels", "forward", fwd(num_groups=3), "num_groups (3) must divide the number of channels C (4)"),
        ("output_mask_length_3", "backward", bwd(output_mask=[True] * 3), "size 5"),  # torch's own message
        ("grad_y_rank_3", "backward", bwd(grad_y=x_of(d)[0]), "grad_y must be 4-D"),
        ("grad_y_int", "backward", bwd(grad_y=x_of(d).int()), "grad_y must be float32, float64, float16 or bfloat16"),
        ("grad_y_shape", "backward", bwd(grad_y=x_of(d, shape=(2, 4, 5, 6))), "grad_y has shape"),
        ("grad_y_dtype", "backward", bwd(grad_y=x_of(d, torch.float64)), "grad_y must have x's dtype"),
        ("x_rank_3_backward", "backward", bwd(x=x_of(d)[0]), "x must be 4-D"),
        ("x_int_backward", "backward", bwd(x=x_of(d).int(), grad_y=x_of(d).int()), "x must be float32"),
        ("mean_shape_N_1", "backward", bwd(mean=torch.zeros(2, 1, device=d)), "mean must have shape (N, num_groups) = (2, 2)"),
        ("mean_1d", "backward", bwd(mean=torch.zeros(4, device=d)), "mean must have shape (N, num_groups) = (2, 2)"),
        ("rstd_shape_3_2", "backward", bwd(rstd=torch.ones(3, 2, device=d)), "rstd must have shape (N, num_groups) = (2, 2)"),
        ("mean_float64", "backward", bwd(mean=torch.zeros(2, 2, dtype=torch.float64, device=d)), "mean must be torch.float32"),
        ("rstd_float16", "backward", bwd(rstd=torch.ones(2, 2, dtype=torch.float16, device=d)), "rstd must be torch.float32"),
        ("rstd_float32_for_float64_x", "backward",
         bwd(x=x_of(d, torch.float64), grad_y=x_of(d, torch.float64), mean=torch.zeros(2, 2, dtype=torch.float64, device=d)),
         "rstd must be torch.float64"),
    ]
    for name in ("weight", "bias", "layer_scale", "res_scale"):
        cases.append((f"{name}_length_3", "forward", fwd(**{name: vector(3, device=d)}), f"{name} must have shape (C,) = (4,)"))
    cases.append(("sample_scale_length_3", "forward", fwd(sample_scale=vector(3, device=d)), "sample_scale must have shape (N,) = (2,)"))
    for name in ("weight", "bias", "layer_scale", "res_scale"):
        cases.append((f"{name}_length_5_backward", "backward", bwd(**{name: vector(5, device=d)}), f"{name} must have shape (C,) = (4,)"))
        cases.append((f"{name}_float64_backward", "backward", bwd(**{name: vector(4, torch.float64, d)}), f"{name} has dtype"))
    cases.append(("sample_scale_length_4_backward", "backward", bwd(sample_scale=vector(4, device=d)), "sample_scale must have shape (N,) = (2,)"))
    for op, make in (("forward", fwd), ("backward", bwd)):
        for groups in (0, -2):
            cases.append((f"num_groups_{groups}_{op}", op, make(num_groups=groups), f"num_groups must be an integer >= 1, got {groups}"))
        cases.append((f"num_groups_3_{op}", op, make(num_groups=3), "num_groups (3) must divide"))
        for k in (2, 0, -1, -3):
            cases.append((f"pool_size_{k}_{op}", op, make(pool_size=k), f"pool_size must be a positive odd integer, got {k}"))
    for eps in (0.0, -1e-5, math.inf, -math.inf, math.nan):
        cases.append((f"eps_{eps}", "forward", fwd(eps=eps), "eps must be a finite number > 0"))
        cases.append((f"eps_{eps}_backward", "backward", bwd(eps=eps), "eps must be a finite number > 0"))
    return cases


# A wrong dtype is a TypeError, a wrong shape, value or device a ValueError (TORCH_CHECK_TYPE
# and TORCH_CHECK_VALUE in csrc/host.cpp); a list of the wrong length is refused by torch's
# own argument parser before the operator runs.
TYPE_FRAGMENTS = ("dtype", "must be float32", "must be torch.float")
ERROR_TYPE_OVERRIDES = {"output_mask_length_3": "RuntimeError", "cuda_output_mask_length_3": "RuntimeError",
                        "grad_y_on_cpu": "ValueError", "mean_on_cpu": "ValueError", "rstd_on_cpu": "ValueError"}


def expected_error_type(name, fragment):
    if name in ERROR_TYPE_OVERRIDES:
        return ERROR_TYPE_OVERRIDES[name]
    return "TypeError" if any(f in fragment for f in TYPE_FRAGMENTS) else "ValueError"


def cuda_cases():
    """Device mismatches (the dispatcher sends these to the CUDA kernels, whose checks must
    name the argument) on top of every CPU case run on the GPU."""
    cpu, gpu = "cpu", "cuda"
    cases = [(f"cuda_{name}", op, args, msg) for name, op, args, msg in cpu_cases(gpu)]
    for name in ("weight", "bias", "layer_scale", "res_scale"):
        cases.append((f"{name}_on_cpu", "forward", forward_args(gpu, **{name: vector(4, device=cpu)}), f"{name} is on cpu"))
    cases += [
        ("sample_scale_on_cpu", "forward", forward_args(gpu, sample_scale=vector(2, device=cpu)), "sample_scale is on cpu"),
        ("grad_y_on_cpu", "backward", backward_args(gpu, grad_y=x_of(cpu)), "grad_y must have x's dtype and device"),
        ("mean_on_cpu", "backward", backward_args(gpu, mean=torch.zeros(2, 2)), "mean must be torch.float32 on cuda"),
        ("rstd_on_cpu", "backward", backward_args(gpu, rstd=torch.ones(2, 2)), "rstd must be torch.float32 on cuda"),
        ("weight_on_cpu_backward", "backward", backward_args(gpu, weight=vector(4, device=cpu)), "weight is on cpu"),
    ]
    return cases


def run_bad_calls(device):
    """Every bad call; one JSON line each.  Reaching the end proves the process survived."""
    cases = cpu_cases("cpu") if device == "cpu" else cuda_cases()
    ops_by_name = {"forward": torch.ops.fused_poolformer.pool_mixer_forward,
                   "backward": torch.ops.fused_poolformer.pool_mixer_backward}
    for name, op, args, _ in cases:
        try:
            ops_by_name[op](*args)
            if device == "cuda":
                torch.cuda.synchronize()
            result = dict(case=name, raised=None)
        except Exception as exc:  # the point: every failure is an ordinary exception
            result = dict(case=name, raised=type(exc).__name__, message=str(exc))
        print(json.dumps(result), flush=True)
    print("SURVIVED", flush=True)


def bad_call_results(device):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), device], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.rstrip().endswith("SURVIVED"), (
        f"the process died (exit code {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return {r["case"]: r for r in map(json.loads, out.stdout.splitlines()[:-1])}


def check_bad_calls(results, cases):
    assert sorted(results) == sorted(name for name, *_ in cases)
    problems = []
    for name, _, _, expected in cases:
        r = results[name]
        if r["raised"] is None:
            problems.append(f"{name}: no exception")
        elif expected not in r["message"]:
            problems.append(f"{name}: {r['raised']}: {r['message'].splitlines()[0]!r} lacks {expected!r}")
        elif r["raised"] != expected_error_type(name, expected):
            problems.append(f"{name}: raised {r['raised']}, expected {expected_error_type(name, expected)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("backend", CPP_BACKENDS)
def test_operator_errors_name_the_argument_and_the_process_survives(backend):
    check_bad_calls(bad_call_results(backend), cpu_cases("cpu") if backend == "cpu" else cuda_cases())


@pytest.mark.skipif(not ops.HAS_CPU_KERNELS, reason="the C++ operators were not built")
def test_fake_kernels_reject_bad_arguments():
    x = x_of("cpu").to("meta")
    with pytest.raises(Exception, match=re.escape("weight must have shape")):
        torch.ops.fused_poolformer.pool_mixer_forward(x, vector(3).to("meta"), None, None, None, None, 2, 3, 1e-5)


# ---------------------------------------------------------------------------------------
# The public API.

X = make_inputs(SHAPE)[0]


@functools.lru_cache(maxsize=None)
def public_cases(device="cpu"):
    """{id: (positional x, keyword arguments, exception type, message fragment)}, on device."""
    x = make_inputs(SHAPE, device=device)[0]
    v = lambda n, dtype=torch.float32: vector(n, dtype, device)
    cases = [
        ("x_list", [[1.0]], {}, TypeError, "x must be a Tensor"),
        ("x_rank_3", x[0], {}, ValueError, "x must be 4-D (N, C, H, W)"),
        ("x_int", x.int(), {}, TypeError, "x must be float32, float64, float16 or bfloat16"),
        ("weight_list", x, dict(weight=[1.0] * 4), TypeError, "weight must be a Tensor or None"),
        ("bias_4x1", x, dict(bias=v(4)[:, None]), ValueError, "bias must have shape (C,) = (4,)"),
        ("sample_scale_length_3", x, dict(sample_scale=v(3)), ValueError, "sample_scale must have shape (N,) = (2,)"),
        ("sample_scale_length_4", x, dict(sample_scale=v(4)), ValueError, "sample_scale must have shape (N,) = (2,)"),
        ("sample_scale_on_meta", x, dict(sample_scale=v(2).to("meta")), ValueError, "sample_scale is on meta"),
        ("num_groups_3", x, dict(num_groups=3), ValueError, "num_groups (3) must divide the number of channels C (4)"),
    ]
    for name in ("weight", "bias", "layer_scale", "res_scale"):
        cases += [
            (f"{name}_length_3", x, {name: v(3)}, ValueError, f"{name} must have shape (C,) = (4,)"),
            (f"{name}_length_5", x, {name: v(5)}, ValueError, f"{name} must have shape (C,) = (4,)"),
            (f"{name}_on_meta", x, {name: v(4).to("meta")}, ValueError, f"{name} is on meta"),
            (f"{name}_float64", x, {name: v(4, torch.float64)}, TypeError, f"{name} has dtype torch.float64"),
        ]
    for groups in (0, -1, True, 2.0, "2"):
        cases.append((f"num_groups_{groups!r}", x, dict(num_groups=groups), ValueError,
                      "num_groups must be an integer >= 1"))
    for k in (4, 2, 0, -1, -3, True, 3.0):
        cases.append((f"pool_size_{k!r}", x, dict(pool_size=k), ValueError, "pool_size must be a positive odd integer"))
    for eps in (0, 0.0, -1e-5, math.inf, math.nan, True, "1e-5", None):
        cases.append((f"eps_{eps!r}", x, dict(eps=eps), ValueError, "eps must be a finite number > 0"))
    return {name: case for name, *case in cases}


@pytest.mark.parametrize("case", list(public_cases()))
def test_public_api_errors_name_the_argument(case):
    """backend="auto" on CPU tensors: straight into the C++ operator where it is built."""
    x, kwargs, error, fragment = public_cases()[case]
    with pytest.raises(error, match=re.escape(fragment)):
        fused_poolformer.pool_mixer(x, **kwargs)


@pytest.mark.parametrize("backend", backend_params("cpu", "cuda", "triton", "reference", interpreted_triton=True))
@pytest.mark.parametrize("case", list(public_cases()))
def test_every_backend_raises_the_same_errors(backend, device, case):
    """Each backend by name, on its device: the same exception and message as "auto"."""
    x, kwargs, error, fragment = public_cases(device)[case]
    with pytest.raises(error, match=re.escape(fragment)):
        fused_poolformer.pool_mixer(x, backend=backend, **kwargs)


# ---------------------------------------------------------------------------------------
# The backend choice.

BACKEND_CASES = [
    ("backend_gpu", X, "gpu", ValueError, "backend must be one of"),
    ("backend_nope", X, "nope", ValueError, "backend must be one of"),
    ("backend_cuda_for_cpu_tensor", X, "cuda", ValueError, "backend='cuda' cannot serve a tensor on cpu"),
    ("backend_cpu_for_meta_tensor", X.to("meta"), "cpu", ValueError, "backend='cpu' cannot serve a tensor on meta"),
]


@pytest.mark.parametrize("x,backend,error,fragment", [pytest.param(*c[1:], id=c[0]) for c in BACKEND_CASES])
def test_bad_backend_argument_says_why(x, backend, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        fused_poolformer.pool_mixer(x, backend=backend)


@pytest.mark.parametrize("backend", CPP_BACKENDS)
def test_auto_picks_the_fused_kernels_of_the_device(backend, device):
    x, _ = make_inputs((1, 4, 3, 3), device=device)
    assert ops.choose_backend("auto", x) == backend
    assert backend in ops.available_backends(device)
    assert torch.equal(fused_poolformer.pool_mixer(x), fused_poolformer.pool_mixer(x, backend=backend))


def test_unavailable_cpu_backend_says_why(monkeypatch):
    monkeypatch.setattr(backends, "HAS_CPU_KERNELS", False)
    with pytest.raises(RuntimeError, match=re.escape("backend='cpu' is unavailable")):
        fused_poolformer.pool_mixer(X, backend="cpu")
    # "auto" falls back to the unfused graph rather than failing.
    assert torch.equal(fused_poolformer.pool_mixer(X), fused_poolformer.reference.pool_mixer(X))


def test_unavailable_triton_backend_says_why(monkeypatch):
    monkeypatch.setattr(backends, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match=re.escape("backend='triton' is unavailable")):
        fused_poolformer.pool_mixer(X, backend="triton")


@pytest.mark.skipif(not ops.triton_available(), reason="triton cannot be imported")
def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(backends, "triton_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match=re.escape("it serves CPU tensors only when TRITON_INTERPRET=1")):
        fused_poolformer.pool_mixer(X, backend="triton")


@pytest.mark.gpu
@requires_cuda
def test_unavailable_cuda_backend_says_why(monkeypatch):
    monkeypatch.setattr(backends, "HAS_CUDA_KERNELS", False)
    with pytest.raises(RuntimeError, match=re.escape("backend='cuda' is unavailable")):
        fused_poolformer.pool_mixer(X.cuda(), backend="cuda")


@pytest.mark.gpu
@requires_cuda
def test_cpu_backend_refuses_cuda_tensors():
    with pytest.raises(ValueError, match=re.escape("backend='cpu' cannot serve a tensor on cuda")):
        fused_poolformer.pool_mixer(X.cuda(), backend="cpu")


if __name__ == "__main__":
    run_bad_calls(sys.argv[1])

"""Inputs of the pool mixer for benchmarks and GPU checks, and the check of any
implementation's outputs and gradients against the unfused graph in float64.

Every tensor is random (never zeros or ones), so a kernel that drops a term shows up.
"""

from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch

from .. import reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
# (low, high) of each optional vector; sample_scale is (N,), the others (C,).
PARAM_RANGES = {"weight": (0.5, 1.5), "bias": (-0.5, 0.5), "layer_scale": (-1.0, 1.0),
                "res_scale": (0.5, 1.5), "sample_scale": (0.0, 2.0)}
# The PoolFormer v1 mixer: GroupNorm weight and bias, layer scale.
V1_PARAMS = ("weight", "bias", "layer_scale")
# sample_scale is the drop-path constant: no gradient flows to it.
DIFFERENTIABLE = ("weight", "bias", "layer_scale", "res_scale")
# Max-abs error allowed against the float64 reference: TOLERANCE * (1 + max |reference|).
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def random_input(shape: Sequence[int], dtype: torch.dtype, layout: str, device, generator) -> torch.Tensor:
    """x ~ N(0.5, 1.3) in ``layout`` ("contiguous" or "channels_last")."""
    x = torch.randn(tuple(shape), generator=generator, device=device) * 1.3 + 0.5
    return x.to(dtype).contiguous(memory_format=LAYOUTS[layout])


def mixer_params(batch: int, channels: int, dtype: torch.dtype, device, names: Iterable[str] = V1_PARAMS,
                 requires_grad: bool = False, seed: int = 0) -> Dict[str, torch.Tensor]:
    """The named optional vectors, uniform in PARAM_RANGES; those in DIFFERENTIABLE
    require grad when ``requires_grad``."""
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    params = {}
    for name in names:
        low, high = PARAM_RANGES[name]
        size = batch if name == "sample_scale" else channels
        value = (torch.rand(size, generator=gen, device=device) * (high - low) + low).to(dtype)
        params[name] = value.requires_grad_(requires_grad and name in DIFFERENTIABLE)
    return params


def mixer(fn: Callable, **options) -> Callable:
    """``call(x, params)`` = fn(x, weight, bias, layer_scale=..., ..., **options) with
    absent vectors as None; options default to PoolFormer's (one group, pool 3)."""
    options = {"num_groups": 1, "pool_size": 3, "eps": 1e-5, **options}

    def call(x, params):
        return fn(x, params.get("weight"), params.get("bias"), layer_scale=params.get("layer_scale"),
                  res_scale=params.get("res_scale"), sample_scale=params.get("sample_scale"), **options)
    return call


def forward_backward(call: Callable, x: torch.Tensor, params: Dict[str, torch.Tensor],
                     grad_y: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """{"y": call(x, params)} and, when ``grad_y`` is given, the gradient of <y, grad_y>
    with respect to x and every vector that requires grad (keys: "x", "weight", ...)."""
    if grad_y is None:
        with torch.no_grad():
            return {"y": call(x, params)}
    leaves = {"x": x, **{k: v for k, v in params.items() if v.requires_grad}}
    y = call(x, params)
    grads = torch.autograd.grad(y, tuple(leaves.values()), grad_y)
    return {"y": y, **dict(zip(leaves, grads))}


def reference_outputs(x: torch.Tensor, params: Dict[str, torch.Tensor], grad_y: Optional[torch.Tensor],
                      wanted: Iterable[str], **options) -> Dict[str, torch.Tensor]:
    """The unfused graph's outputs in float64 on x's device, for the keys in ``wanted``."""
    wanted = set(wanted)
    x64 = x.detach().double().requires_grad_(grad_y is not None and "x" in wanted)
    p64 = {k: v.detach().double().requires_grad_(grad_y is not None and k in wanted) for k, v in params.items()}
    grad64 = None if grad_y is None else grad_y.double()
    if grad64 is not None and not (x64.requires_grad or any(v.requires_grad for v in p64.values())):
        grad64 = None
    outputs = forward_backward(mixer(reference.pool_mixer, **options), x64, p64, grad64)
    return {k: v.detach() for k, v in outputs.items() if k in wanted or k == "y"}


class ReferenceMismatch(RuntimeError):
    """An implementation's output or gradient is not the reference's."""


NAMES = {"y": "output", "x": "input gradient"}


def errors(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor],
           dtype: torch.dtype) -> Dict[str, Tuple[float, float]]:
    """Per tensor of ``expected``: (max |actual - expected|, the dtype's allowance
    TOLERANCE * (1 + max |expected|)); NaN where the output holds a NaN."""
    out = {}
    for key, want in expected.items():
        got = actual[key].detach().double().to(want.device)
        err = (got - want).abs().max().item() if want.numel() else 0.0
        allowed = TOLERANCE[dtype] * (1.0 + (want.abs().max().item() if want.numel() else 0.0))
        out[key] = (err, allowed)
    return out


def compare(impl: str, actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor],
            dtype: torch.dtype) -> Dict[str, float]:
    """Raises ReferenceMismatch naming ``impl`` and the tensor when an output differs from
    the float64 reference by more than the dtype's allowance; returns, per tensor, the
    error as a fraction of that allowance."""
    ratios = {}
    for key, (err, allowed) in errors(actual, expected, dtype).items():
        if not err <= allowed:  # also catches NaN
            name = NAMES.get(key, f"{key} gradient")
            raise ReferenceMismatch(f"{impl}: {name} differs from the reference by {err:.3e} (allowed {allowed:.3e}, "
                                    f"shape {tuple(actual['y'].shape)}, {dtype})")
        ratios[key] = err / allowed
    return ratios

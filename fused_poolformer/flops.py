"""MAC, FLOP and byte counts for the fused pool mixer and the unfused graph it replaces.

Two kinds of numbers live here:

* The DESIGN.md section 5 **memory-traffic model** (the op is memory-bound, so bytes are
  what bound its speed) and an **elementwise FLOP model**, per implementation and pass.
  With E = N*C*H*W elements of s bytes:

  ========  ==============================  ==========================================
  pass      fused                           unfused eager
  ========  ==============================  ==========================================
  forward   3*E*s (x twice, y once)         13*E*s (GroupNorm 3, pool 2, sub 3,
                                            scale 2, add 3)
  backward  5*E*s (x and dy twice, dx once)  20*E*s
  ========  ==============================  ==========================================

* **MAC counter integration** for whole models.  Both counters must give a converted
  model (fused mixer) the same MACs as the unfused one, each following its own convention
  for the ops the fused operator replaces (GroupNorm -> AvgPool2d -> sub -> scale -> add):

  - ``torch.utils.flop_counter`` counts only matmuls and convolutions: GroupNorm, pooling
    and elementwise ops count 0, so the fused operators register a formula returning 0.
  - fvcore (the counter behind the PoolFormer paper's table) counts ``aten::group_norm``
    as 5 MACs per element with an affine weight (4 without) and leaves ``avg_pool2d`` and
    elementwise ops uncounted, so the fused forward's handle is fvcore's own norm handle
    applied to ``x`` and ``weight``.  The backward is never traced by fvcore (0).
"""

import functools
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

PASSES = ("fwd", "fwd+bwd")

# Elements of size s moved per element of x (DESIGN.md section 5).
_FUSED_TRAFFIC = {"fwd": 3, "bwd": 5}
_EAGER_TRAFFIC = {"fwd": 13, "bwd": 20}


def _traffic(table: Dict[str, int], pass_: str) -> int:
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    return table["fwd"] + (table["bwd"] if pass_ == "fwd+bwd" else 0)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def fused_bytes(shape: Sequence[int], element_size: int, pass_: str = "fwd") -> int:
    """Bytes the fused operator moves (the floor every implementation is judged by)."""
    return _traffic(_FUSED_TRAFFIC, pass_) * _numel(shape) * element_size


def eager_bytes(shape: Sequence[int], element_size: int, pass_: str = "fwd") -> int:
    """Bytes the unfused eager graph moves (one read/write per op input/output)."""
    return _traffic(_EAGER_TRAFFIC, pass_) * _numel(shape) * element_size


# Elementwise FLOPs per element of x, pool size k; estimates of the arithmetic each form
# executes (what an op-level table can compare, not what MAC counters report).
def _fused_forward_flops_per_element(k: int) -> int:
    statistics = 3  # x, x*x, accumulate (Welford costs about the same)
    separable_pool = 2 * (k - 1) + 1  # vertical and horizontal box sums, times 1/count
    difference = 1
    output = 3  # res_scale*x + coefficient*D
    return statistics + separable_pool + difference + output


def _fused_backward_flops_per_element(k: int) -> int:
    recompute_difference = 2 * k  # separable pool + subtract
    scaled_grad = 1  # b = a*dy
    reductions = 4  # S += a*D*dy, T += D*dy
    transposed_pool = 2 * k - 1  # b/count, then two box sums
    input_grad = 7  # res_scale*dy + r*(P^T b - b) - c*(x - mean)
    return recompute_difference + scaled_grad + reductions + transposed_pool + input_grad


def _eager_forward_flops_per_element(k: int) -> int:
    group_norm = 5  # statistics 3 + affine normalisation 2 (fvcore's estimate too)
    dense_pool = k * k  # k*k - 1 adds and a divide, no separability
    sub_scale_add = 3
    return group_norm + dense_pool + sub_scale_add


def _eager_backward_flops_per_element(k: int) -> int:
    scale = 3  # grad*layer_scale, and its reduction for d(layer_scale)
    sub = 1
    pool = k * k + 1
    sum_of_branches = 1
    group_norm = 8  # d(gamma), d(beta) reductions and the input-gradient formula
    residual = 1
    return scale + sub + pool + sum_of_branches + group_norm + residual


_FLOP_MODEL: Dict[str, Tuple[Callable[[int], int], Callable[[int], int]]] = {
    "fused": (_fused_forward_flops_per_element, _fused_backward_flops_per_element),
    "eager": (_eager_forward_flops_per_element, _eager_backward_flops_per_element),
}


def elementwise_flops(shape: Sequence[int], form: str, pass_: str = "fwd", pool_size: int = 3) -> int:
    """Elementwise FLOPs of ``form`` ("fused" or "eager") for one pass over x of ``shape``."""
    if form not in _FLOP_MODEL:
        raise ValueError(f"form must be one of {tuple(_FLOP_MODEL)}, got {form!r}")
    forward, backward = _FLOP_MODEL[form]
    per_element = forward(pool_size) + (backward(pool_size) if pass_ == "fwd+bwd" else 0)
    _traffic(_FUSED_TRAFFIC, pass_)  # validates pass_
    return per_element * _numel(shape)


def impl_form(impl: str) -> Optional[str]:
    """The cost model of a benchmark implementation name: fused-* -> "fused", eager ->
    "eager"; torch.compile's generated kernels are not modelled (None)."""
    if impl.startswith("fused"):
        return "fused"
    if impl == "eager":
        return "eager"
    return None


def op_costs(shape: Sequence[int], element_size: int, impl: str, pass_: str,
             pool_size: int = 3) -> Tuple[Optional[int], int]:
    """(bytes, flops) of one benchmark row.  torch.compile runs the unfused math (eager
    FLOPs) with traffic we do not model (bytes None)."""
    form = impl_form(impl)
    flops = elementwise_flops(shape, form or "eager", pass_, pool_size)
    if form == "fused":
        return fused_bytes(shape, element_size, pass_), flops
    if form == "eager":
        return eager_bytes(shape, element_size, pass_), flops
    return None, flops


# ---------------------------------------------------------------------------------------
# MAC counters.

_FORWARD_OPS = ("pool_mixer_forward", "triton_pool_mixer_forward")
_BACKWARD_OPS = ("pool_mixer_backward", "triton_pool_mixer_backward")


def _fused_op_packets():
    """The fused operator overload packets that exist in this process (C++ and Triton)."""
    from . import ops  # loads the extension, registering torch.ops.fused_poolformer.*

    if ops.triton_available():
        ops.triton_operators()  # registers the Triton operators
    namespace = torch.ops.fused_poolformer
    present = lambda names: [getattr(namespace, n) for n in names if hasattr(namespace, n)]
    return present(_FORWARD_OPS), present(_BACKWARD_OPS)


def _zero_macs(*args, **kwargs) -> int:
    # torch.utils.flop_counter counts no FLOPs for GroupNorm, pooling or elementwise ops,
    # which is all the fused operator replaces.
    return 0


_registered = set()


def register_flop_counter_formulas() -> list:
    """Registers the fused operators with ``torch.utils.flop_counter`` (idempotent);
    returns the qualified names registered so far."""
    from torch.utils.flop_counter import register_flop_formula

    forwards, backwards = _fused_op_packets()
    for packet in forwards + backwards:
        name = packet._qualified_op_name
        if name not in _registered:
            register_flop_formula(packet)(_zero_macs)
            _registered.add(name)
    return sorted(_registered)


def _fvcore_forward_handle():
    from fvcore.nn.jit_handles import norm_flop_counter

    # Inputs: (x, weight, bias, ...): the replaced aten::group_norm's count, whose affine
    # weight is argument 1 of the fused operator.
    return norm_flop_counter(1)


def fvcore_handles() -> Dict[str, Callable]:
    """fvcore op handles for the fused operators, keyed by traced op name."""
    forward = _fvcore_forward_handle()
    handles = {}
    for name in _FORWARD_OPS:
        handles[f"fused_poolformer::{name}"] = forward
    for name in _BACKWARD_OPS:
        handles[f"fused_poolformer::{name}"] = _zero_macs
    return handles


@functools.lru_cache(maxsize=None)
def fvcore_available() -> bool:
    try:
        import fvcore.nn  # noqa: F401
    except ImportError:
        return False
    return True


def count_macs(model: torch.nn.Module, example: torch.Tensor, counter: str = "auto") -> Tuple[int, str]:
    """(MACs, counter name) of ``model(example)``.  ``counter``: "fvcore" (the paper's
    counter), "torch" (torch.utils.flop_counter, FLOPs / 2) or "auto" (fvcore if installed)."""
    if counter == "auto":
        counter = "fvcore" if fvcore_available() else "torch"
    with torch.no_grad():
        if counter == "fvcore":
            from fvcore.nn import FlopCountAnalysis

            analysis = FlopCountAnalysis(model, example).set_op_handle(**fvcore_handles())
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            return int(analysis.total()), "fvcore"
        if counter == "torch":
            from torch.utils.flop_counter import FlopCounterMode

            register_flop_counter_formulas()
            with FlopCounterMode(display=False) as mode:
                model(example)
            return mode.get_total_flops() // 2, "torch.utils.flop_counter"
    raise ValueError(f"counter must be 'auto', 'fvcore' or 'torch', got {counter!r}")

"""MAC counting of models that use the fused pool mixer.

Both counters must give a converted model (fused mixer) the same MACs as the unfused one,
each following its own convention for the ops the fused operator replaces (GroupNorm ->
AvgPool2d -> sub -> scale -> add):

- ``torch.utils.flop_counter`` counts only matmuls and convolutions: GroupNorm, pooling
  and elementwise ops count 0, so the fused operators register a formula returning 0.
- fvcore (the counter behind the PoolFormer paper's table) counts ``aten::group_norm``
  as 5 MACs per element with an affine weight (4 without) and leaves ``avg_pool2d`` and
  elementwise ops uncounted, so the fused forward's handle is fvcore's own norm handle
  applied to ``x`` and ``weight``.  The backward is never traced by fvcore (0).

The op's own cost model (bytes moved, elementwise FLOPs, the byte floor) lives with the
benchmarks, in ``fused_poolformer.bench.costs``.
"""

import functools
from typing import Callable, Dict, Tuple

import torch

from . import backends, block_contract


def _packet(name):
    namespace, op = name.split("::")
    return getattr(getattr(torch.ops, namespace), op)


def _fused_op_packets(family: str = "pool_mixer"):
    """The fused operator overload packets of ``family`` of every backend that serves a device here."""
    forwards, backwards = backends.fused_operator_names(family)
    return [_packet(n) for n in forwards], [_packet(n) for n in backwards]


def _zero_macs(*args, **kwargs) -> int:
    # torch.utils.flop_counter counts no FLOPs for GroupNorm, pooling or elementwise ops,
    # which is all the fused mixer replaces.
    return 0


# The block operators: their GEMMs are the unfused block's two 1x1 convolutions (and, in the
# backward, each one's input and weight gradients, plus fc1 again when hidden was not saved).
_BLOCK_FC1 = 1 + block_contract.FORWARD_ARGUMENTS.index("fc1_weight")  # in block_forward's arguments
_BLOCK_BACKWARD_FC1 = 7 + block_contract.FORWARD_ARGUMENTS.index("fc1_weight")  # after the 7 tensors


# The formulas get the arguments' shapes (torch.utils.flop_counter passes shapes for tensors).
def _gemm_flops(x_shape, fc1_shape) -> int:
    """FLOPs of one of the block's two GEMMs: 2 * N * H * W * C * hidden."""
    n, c, h, w = x_shape
    return 2 * n * h * w * c * fc1_shape[0]


def _block_forward_flops(*args, **kwargs) -> int:
    return 2 * _gemm_flops(args[0], args[_BLOCK_FC1])


def _block_backward_flops(*args, **kwargs) -> int:
    hidden_saved = len(args[2]) == 4
    gemms = 4 if hidden_saved else 5  # fc1 again when hidden is empty
    return gemms * _gemm_flops(args[1], args[_BLOCK_BACKWARD_FC1])


_registered = set()


def register_flop_counter_formulas() -> list:
    """Registers the fused operators with ``torch.utils.flop_counter`` (idempotent);
    returns the qualified names registered so far."""
    from torch.utils.flop_counter import register_flop_formula

    for family, formulas in (("pool_mixer", (_zero_macs, _zero_macs)),
                             ("block", (_block_forward_flops, _block_backward_flops))):
        for packets, formula in zip(_fused_op_packets(family), formulas):
            for packet in packets:
                name = packet._qualified_op_name
                if name not in _registered:
                    register_flop_formula(packet)(formula)
                    _registered.add(name)
    return sorted(_registered)


def _fvcore_forward_handle():
    from fvcore.nn.jit_handles import norm_flop_counter

    # Inputs: (x, weight, bias, ...): the replaced aten::group_norm's count, whose affine
    # weight is argument 1 of the fused operator.
    return norm_flop_counter(1)


def _fvcore_block_forward(inputs, outputs) -> int:
    """The unfused block's fvcore MACs: two group_norms (5 per element with an affine weight,
    4 without) and the two 1x1 convolutions (N * H * W * C * hidden each)."""
    from fvcore.nn.jit_handles import get_shape

    x = get_shape(inputs[0])
    elements = x[0] * x[1] * x[2] * x[3]
    hidden = get_shape(inputs[_BLOCK_FC1])[0]
    norms = sum(5 if get_shape(inputs[i]) is not None else 4 for i in (1, _BLOCK_FC1 - 3))
    return elements * norms + 2 * elements * hidden


def fvcore_handles() -> Dict[str, Callable]:
    """fvcore op handles for the fused operators, keyed by traced op name.  (A block-level
    module traced by fvcore takes its unfused path, so plain fvcore counts it as well.)"""
    forward = _fvcore_forward_handle()
    handles = {}
    for family, (fwd, bwd) in (("pool_mixer", (forward, _zero_macs)), ("block", (_fvcore_block_forward, _zero_macs))):
        forwards, backwards = backends.fused_operator_names(family)
        handles.update({name: fwd for name in forwards})
        handles.update({name: bwd for name in backwards})
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

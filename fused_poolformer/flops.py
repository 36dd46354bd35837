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

from . import backends


def _fused_op_packets():
    """The fused operator overload packets of every backend that serves a device here."""
    forwards, backwards = backends.fused_operator_names()

    def packet(name):
        namespace, op = name.split("::")
        return getattr(getattr(torch.ops, namespace), op)

    return [packet(n) for n in forwards], [packet(n) for n in backwards]


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
    forwards, backwards = backends.fused_operator_names()
    return {**{name: forward for name in forwards}, **{name: _zero_macs for name in backwards}}


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

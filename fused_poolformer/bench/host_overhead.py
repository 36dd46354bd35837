"""Host overhead: per-call time of the fused operator on a tiny tensor, where the kernels
cost nothing and what is left is the host path (argument checks, allocations, dispatch,
autograd), next to ``F.group_norm`` alone and the unfused graph on the same device; plus
the operator calls one fused forward+backward dispatches.

Each forward+backward is ``torch.autograd.grad(y, inputs, grad_y)``, so no loss op is
counted or timed.  Times: the median per-call time on one CPU thread, from blocks of
back-to-back calls that end with a device synchronize, the implementations' blocks
alternating (``timing.interleaved_block_times``: a shared machine's drift hits them
alike).  Operator calls: the operator events (``namespace::name``) torch.profiler records
in one call, nested calls included, and the top-level ones among them.
"""

from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import reference
from . import timing
from .inputs import forward_backward, mixer, mixer_params, random_input
from .op_level import Implementations, default_fused_impls

SHAPE = (2, 8, 4, 4)
PASSES = ("fwd", "fwd+bwd")


def _group_norm(x, weight, bias, **options):
    """F.group_norm alone, with the mixer's signature (its other vectors ignored)."""
    return F.group_norm(x, options["num_groups"], weight, bias, options["eps"])


def host_impls(device: str, fused: Optional[Sequence[str]] = None) -> Dict[str, Callable]:
    """name -> pool_mixer-like function: F.group_norm alone (the baseline, first), the
    fused implementations ``fused`` (default: every fused backend for ``device``), the
    unfused graph."""
    impls = Implementations()
    functions = {"F.group_norm": _group_norm}
    functions.update({impl: impls.function(impl) for impl in (fused or default_fused_impls(device))})
    functions["unfused graph"] = reference.pool_mixer
    return functions


def _step(fn: Callable, pass_: str, device: str) -> Callable:
    gen = torch.Generator(device=device).manual_seed(0)
    with_grad = pass_ == "fwd+bwd"
    x = random_input(SHAPE, torch.float32, "contiguous", device, gen).requires_grad_(with_grad)
    grad_y = random_input(SHAPE, torch.float32, "contiguous", device, gen) if with_grad else None
    params = mixer_params(SHAPE[0], SHAPE[1], torch.float32, device, requires_grad=with_grad)
    if fn is _group_norm:  # its inputs are x, weight and bias
        params = {k: v for k, v in params.items() if k in ("weight", "bias")}
    call = mixer(fn)
    return lambda: forward_backward(call, x, params, grad_y)


MIN_RUN_TIME = 0.3  # seconds per row: microsecond calls need many blocks for a steady median


def host_overhead_rows(device: str, emit: Callable, min_run_time: float = MIN_RUN_TIME,
                       fused: Optional[Sequence[str]] = None) -> List[dict]:
    """The host table's rows (``fused``: the fused implementations, default every one the
    device runs)."""
    rows = []
    for pass_ in PASSES:
        baseline_us = None
        steps = {name: _step(fn, pass_, device) for name, fn in host_impls(device, fused).items()}
        times = timing.interleaved_block_times(steps, device, min_run_time, threads=1)
        for name, step in steps.items():
            t = times[name]
            calls = timing.operator_calls(step)
            row = dict(impl=name, **{"pass": pass_}, shape=list(SHAPE), dtype="fp32", device=device,
                       median_us=t["median_ms"] * 1e3, q25_us=t["q25_ms"] * 1e3, q75_us=t["q75_ms"] * 1e3,
                       operator_calls=calls["total"], top_level_calls=calls["top_level"],
                       operator_calls_by_name=calls["by_name"])
            baseline_us = baseline_us or row["median_us"]
            row["vs_group_norm"] = row["median_us"] / baseline_us
            rows.append(row)
            emit("host", row)
    return rows

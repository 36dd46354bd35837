"""Op level: the fused pool mixer against the unfused graph (eager) and torch.compile of it,
on the same inputs, at the PoolFormer-S12 stage shapes.

Each case (shape, dtype, layout, pass) is checked against the float64 reference before
anything is timed, then every implementation is timed three ways (``timing``): eager
loop, CUDA-graph replay and per-kernel profiler times.  Inputs rotate through enough
sets that one sweep exceeds the caches, so every timed call reads from memory.  The
torch.compile baseline of a case is compiled once (its first call, timed as
``compile_s``) and reused by the three timings.
"""

import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import available_backends, pool_mixer, reference
from . import costs, timing
from .inputs import DTYPES, ReferenceMismatch, compare, forward_backward, mixer, mixer_params, random_input
from .inputs import reference_outputs

STAGE_SHAPES = ((64, 56), (128, 28), (320, 14), (512, 7))  # PoolFormer-S12 (C, H) at 224x224
FUSED_IMPLS = {"cpu": "fused-cpu", "cuda": "fused-cuda", "triton": "fused-triton"}
BASELINE_IMPLS = ("eager", "compile")
POOL_SIZE = 3
ROTATION_BYTES = 128 << 20  # input sets rotated per call: more than any L2 (and this L3)
MAX_INPUT_SETS = 64


def default_fused_impls(device: str) -> List[str]:
    """Every fused backend that runs compiled kernels on ``device`` (Triton on the CPU only
    runs in its interpreter, far too slow to time: ask for it by name)."""
    fused = [FUSED_IMPLS[b] for b in available_backends(device) if b in FUSED_IMPLS]
    return [i for i in fused if not (device == "cpu" and i == "fused-triton")]


@dataclass(frozen=True)
class OpCase:
    shape: Tuple[int, int, int, int]
    dtype: str
    layout: str
    pass_: str

    @property
    def label(self) -> str:
        return f"{'x'.join(map(str, self.shape))} {self.dtype} {self.layout} {self.pass_}"


def op_cases(cfg) -> List[OpCase]:
    """Every case, in the order asked for (stage shapes first: under a time budget the
    first stages matter most; the host-overhead rows have printed by then)."""
    return [OpCase(tuple(s), d, l, p) for s in cfg.shapes for d in cfg.dtypes for l in cfg.layouts for p in cfg.passes]


def _raise_dynamo_cache_limits() -> None:
    """One graph per shape/dtype/layout/pass stays in dynamo's cache: without higher
    limits dynamo would fall back to eager after 8 recompiles."""
    import torch._dynamo.config as dynamo_config

    for name, value in (("recompile_limit", 1024), ("cache_size_limit", 1024), ("accumulated_recompile_limit", 4096),
                        ("accumulated_cache_size_limit", 4096)):  # older and newer names
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), value))


class Implementations:
    """The callables of every implementation name; torch.compile of the reference built
    once (static shapes, default mode) and shared by every case."""

    def __init__(self, compile_backend: str = "inductor"):
        self.compile_backend = compile_backend
        self._compiled = None

    def function(self, impl: str) -> Callable:
        if impl == "eager":
            return reference.pool_mixer
        if impl == "compile":
            if self._compiled is None:
                _raise_dynamo_cache_limits()
                self._compiled = torch.compile(reference.pool_mixer, dynamic=False, backend=self.compile_backend)
            return self._compiled
        backend = {v: k for k, v in FUSED_IMPLS.items()}.get(impl)
        if backend is None:
            raise ValueError(f"unknown implementation {impl!r}")
        return lambda *args, **kwargs: pool_mixer(*args, backend=backend, **kwargs)


def _rotation_sets(case: OpCase, device: str, seed: int, count: Optional[int] = None) -> List[Tuple]:
    """(x, dy) pairs, by default enough that one sweep through them (inputs + outputs)
    exceeds the caches; dy is None for the forward pass."""
    dtype = DTYPES[case.dtype]
    with_grad = case.pass_ == "fwd+bwd"
    per_set = math.prod(case.shape) * costs.element_size(dtype) * (3 if with_grad else 2)
    count = count or max(1, min(MAX_INPUT_SETS, math.ceil(ROTATION_BYTES / per_set)))
    gen = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(count):
        x = random_input(case.shape, dtype, case.layout, device, gen).requires_grad_(with_grad)
        dy = random_input(case.shape, dtype, case.layout, device, gen) if with_grad else None
        sets.append((x, dy))
    return sets


def case_step(call: Callable, params: Dict[str, torch.Tensor], pass_: str) -> Callable:
    """step(x, dy) -> {"y"} (forward, no grad) or {"y", "x", ...} (forward + backward
    with the gradients of x and every parameter)."""
    def step(x, dy):
        return forward_backward(call, x, params, dy if pass_ == "fwd+bwd" else None)
    return step


def _rotating(step: Callable, sets: List[Tuple]) -> Callable:
    cycle = itertools.cycle(sets)

    def run():
        return step(*next(cycle))
    return run


def _first_call(step: Callable, x, dy, device: str) -> Tuple[dict, float]:
    """The outputs of the first call and its seconds (compilation included)."""
    start = time.perf_counter()
    outputs = step(x, dy)
    timing.synchronize(device)
    return outputs, time.perf_counter() - start


def _time_three_ways(run: Callable, calls: int, impl: str, cfg) -> dict:
    loop = timing.loop_time(run, cfg.device, cfg.min_run_time)
    graph, graph_note = timing.graph_time(run, calls, cfg.device, cfg.min_run_time)
    if cfg.device == "cpu" and impl == "compile":
        profile = {"kernel_ms": None, "launches": None,
                   "method": "n/a: inductor's generated C++ kernels are not profiler operator events"}
    else:
        profile = timing.profiler_time(run, max(calls, 3), cfg.device)
    return dict(**loop, graph_ms=graph and graph["median_ms"], graph_q25_ms=graph and graph["q25_ms"],
                graph_q75_ms=graph and graph["q75_ms"], graph_note=graph_note,
                kernel_ms=profile["kernel_ms"], kernel_launches=profile["launches"], kernel_method=profile["method"])


def _fraction(floor: float, measured) -> object:
    return None if not measured else floor / measured


def _case_params(case: OpCase, device: str) -> Dict[str, torch.Tensor]:
    return mixer_params(case.shape[0], case.shape[1], DTYPES[case.dtype], device,
                        requires_grad=case.pass_ == "fwd+bwd", seed=sum(case.shape))


def _step_of(impls: Implementations, impl: str, case: OpCase, params) -> Callable:
    return case_step(mixer(impls.function(impl), pool_size=POOL_SIZE), params, case.pass_)


def bench_case(case: OpCase, cfg, impls: Implementations, bandwidth_gbs: float, emit: Callable) -> List[dict]:
    dtype = DTYPES[case.dtype]
    sets = _rotation_sets(case, cfg.device, seed=sum(case.shape))
    params = _case_params(case, cfg.device)
    x0, dy0 = sets[0]
    expected = reference_outputs(x0, params, dy0, wanted=("y", "x"), pool_size=POOL_SIZE)
    size = costs.element_size(dtype)
    floor = costs.floor_ms(costs.fused_bytes(case.shape, size, case.pass_), bandwidth_gbs)
    rows = []
    for impl in cfg.impls:
        step = _step_of(impls, impl, case, params)
        cfg.say(f"{case.label} {impl}" + (" (compiling)" if impl == "compile" else ""))
        try:
            outputs, first_call_s = _first_call(step, x0, dy0, cfg.device)
            check = compare(impl, {k: outputs[k] for k in expected}, expected, dtype)
        except ReferenceMismatch:
            raise
        except Exception as exc:
            if impl != "compile":
                raise
            # A machine without a working compiler still gets the other rows.
            cfg.notes.append(f"compile skipped for {case.label}: {type(exc).__name__}: {exc}".splitlines()[0])
            continue
        timings = _time_three_ways(_rotating(step, sets), len(sets), impl, cfg)
        nbytes, nflops = costs.op_costs(case.shape, size, impl, case.pass_, POOL_SIZE)
        row = dict(shape=list(case.shape), dtype=case.dtype, layout=case.layout, **{"pass": case.pass_}, impl=impl,
                   **timings, floor_ms=floor, frac_floor=floor / timings["median_ms"],
                   frac_floor_graph=_fraction(floor, timings["graph_ms"]),
                   frac_floor_kernel=_fraction(floor, timings["kernel_ms"]),
                   bytes=nbytes, flops=nflops,
                   gbs=None if nbytes is None else nbytes / (timings["median_ms"] * 1e-3) / 1e9,
                   checked=True, check_error_ratio=max(check.values()), input_sets=len(sets),
                   compile_s=first_call_s if impl == "compile" else None)
        rows.append(row)
        add_speedups(rows)
        emit("ops", row)
    return rows


def add_speedups(rows: List[dict]) -> None:
    """speedup_vs_<base> from the eager-loop medians, device_speedup_vs_<base> from the
    graph-replay medians, for base in eager and compile (None where either is missing)."""
    loop = {r["impl"]: r["median_ms"] for r in rows}
    graph = {r["impl"]: r.get("graph_ms") for r in rows}
    for r in rows:
        for base in BASELINE_IMPLS:
            r[f"speedup_vs_{base}"] = loop[base] / r["median_ms"] if base in loop else None
            r[f"device_speedup_vs_{base}"] = (graph[base] / r["graph_ms"]
                                              if graph.get(base) and r.get("graph_ms") else None)


def run_ops(cfg, bandwidth_gbs: float, emit: Callable) -> List[dict]:
    impls = Implementations(cfg.compile_backend)
    rows = []
    for case in op_cases(cfg):
        if cfg.out_of_time():
            cfg.notes.append(f"op rows from {case.label} on skipped: --time-budget reached")
            break
        rows += bench_case(case, cfg, impls, bandwidth_gbs, emit)
    return rows


def warm_compile_ops(cfg) -> Dict[str, float]:
    """Compiles the torch.compile baseline of every case once (the first call of a timing
    run, without the timing), so that the compile caches are warm for a later timing run;
    returns seconds per case."""
    impls = Implementations(cfg.compile_backend)
    seconds = {}
    for case in op_cases(cfg):
        cfg.say(f"warming {case.label} compile")
        (x, dy), = _rotation_sets(case, cfg.device, seed=sum(case.shape), count=1)
        step = _step_of(impls, "compile", case, _case_params(case, cfg.device))
        seconds[case.label] = _first_call(step, x, dy, cfg.device)[1]
    return seconds

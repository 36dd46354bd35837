"""Op level: the fused pool mixer against the unfused graph (eager) and torch.compile of it,
on the same inputs, at the PoolFormer-S12 stage shapes.

Each case (shape, dtype, layout, pass) is checked against the float64 reference before
anything is timed, then every implementation is timed three ways (``timing``): eager
loop, CUDA-graph replay and per-kernel profiler times.  A row whose outputs miss the
reference is still timed and says so (``status`` "mismatch", ``checked`` False, the
error); one that raises is a row with ``status`` "error" and no times; the run goes on
(a GPU window is too short to lose the remaining rows to one bad kernel).  Inputs rotate through enough
sets that one sweep exceeds the caches, so every timed call reads from memory.  The
torch.compile baseline of a case is compiled once (its first call, timed as
``compile_s``) and reused by the three timings.
"""

import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import backends, pool_mixer, reference
from . import costs, timing
from .inputs import DTYPES, ReferenceMismatch, compare, forward_backward, mixer, mixer_params, random_input
from .inputs import reference_outputs

STAGE_SHAPES = ((64, 56), (128, 28), (320, 14), (512, 7))  # PoolFormer-S12 (C, H) at 224x224
BASELINE_IMPLS = ("eager", "compile")
FUSED_PREFIX = "fused-"  # a fused implementation is "fused-<backend>", one per fused backend
POOL_SIZE = 3
ROTATION_BYTES = 128 << 20  # input sets rotated per call: more than any L2 (and this L3)
MAX_INPUT_SETS = 64


def fused_impls() -> Dict[str, str]:
    """Implementation name -> backend name, for every fused backend of the registry
    (``fused_poolformer.backends``: a backend registered there is benchmarked as
    "fused-<name>" with no change here)."""
    return {FUSED_PREFIX + b.name: b.name for b in backends.all_backends() if b.fused}


def known_impls() -> Tuple[str, ...]:
    """Every implementation name ``--impls`` accepts."""
    return BASELINE_IMPLS + tuple(fused_impls())


def default_fused_impls(device: str) -> List[str]:
    """Every fused backend that serves ``device`` in this process with compiled kernels
    (one that serves it only through an interpreter -- Triton on the CPU -- is far too slow
    to time: ask for it by name)."""
    return [FUSED_PREFIX + b.name for b in backends.all_backends()
            if b.fused and b.serves(device) and device not in b.interpreted_devices]


@dataclass(frozen=True)
class OpCase:
    shape: Tuple[int, int, int, int]
    dtype: str
    layout: str
    pass_: str

    @property
    def label(self) -> str:
        return f"{'x'.join(map(str, self.shape))} {self.dtype} {self.layout} {self.pass_}"


CASE_ORDERS = ("shape", "variant")


def op_cases(cfg) -> List[OpCase]:
    """Every case, in the order asked for.  "shape": shape by shape (under a time budget
    the first stages matter most); "variant": dtype by dtype and layout by layout, every
    shape of one variant before the next, so a run cut short still covers every shape."""
    if getattr(cfg, "case_order", "shape") == "variant":
        return [OpCase(tuple(s), d, l, p) for d in cfg.dtypes for l in cfg.layouts for s in cfg.shapes
                for p in cfg.passes]
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

    def __init__(self, compile_backend: str = "inductor", perturbed: Sequence[str] = ()):
        self.compile_backend = compile_backend
        self.perturbed = tuple(perturbed)  # test only (--inject-mismatch): outputs scaled by 1.001
        self._compiled = None

    def function(self, impl: str) -> Callable:
        fn = self._function(impl)
        if impl in self.perturbed:
            return lambda *args, **kwargs: fn(*args, **kwargs) * 1.001
        return fn

    def _function(self, impl: str) -> Callable:
        if impl == "eager":
            return reference.pool_mixer
        if impl == "compile":
            if self._compiled is None:
                _raise_dynamo_cache_limits()
                self._compiled = torch.compile(reference.pool_mixer, dynamic=False, backend=self.compile_backend)
            return self._compiled
        backend = fused_impls().get(impl)
        if backend is None:
            raise ValueError(f"unknown implementation {impl!r} (choose from {', '.join(known_impls())})")
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


TIMING_FIELDS = ("median_ms", "q25_ms", "q75_ms", "min_ms", "max_ms", "reps", "graph_ms", "graph_q25_ms",
                 "graph_q75_ms", "graph_note", "kernel_ms", "kernel_launches", "kernel_method", "frac_floor",
                 "frac_floor_graph", "frac_floor_kernel", "gbs", "check_error_ratio")


class DeviceLost(RuntimeError):
    """The device cannot run anything more in this process (a sticky CUDA error)."""


def _device_usable(device: str) -> bool:
    if device != "cuda":
        return True
    try:
        torch.cuda.synchronize()
        return True
    except Exception:  # an illegal address or launch failure poisons the context
        return False


def _error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


class CaseBench:
    """One case's inputs, reference and floor, shared by its implementations."""

    def __init__(self, case: OpCase, cfg, bandwidth_gbs: float):
        self.case, self.cfg = case, cfg
        self.dtype = DTYPES[case.dtype]
        self.sets = _rotation_sets(case, cfg.device, seed=sum(case.shape))
        self.params = _case_params(case, cfg.device)
        x0, dy0 = self.sets[0]
        self.expected = reference_outputs(x0, self.params, dy0, wanted=("y", "x"), pool_size=POOL_SIZE)
        self.size = costs.element_size(self.dtype)
        self.floor = costs.floor_ms(costs.fused_bytes(case.shape, self.size, case.pass_), bandwidth_gbs)

    def base_row(self, impl: str) -> dict:
        """The row's identity and cost model, every timing field empty."""
        case = self.case
        nbytes, nflops = costs.op_costs(case.shape, self.size, impl, case.pass_, POOL_SIZE)
        return dict(shape=list(case.shape), dtype=case.dtype, layout=case.layout, **{"pass": case.pass_}, impl=impl,
                    **{k: None for k in TIMING_FIELDS}, floor_ms=self.floor, bytes=nbytes, flops=nflops,
                    checked=False, status="ok", error=None, input_sets=len(self.sets), compile_s=None)

    def check(self, impl: str, step: Callable, row: dict) -> None:
        """The first call (compiling a compiled baseline) and the reference check, into
        ``row``: a miss sets status "mismatch" and the error, and the row is still timed."""
        outputs, first_call_s = _first_call(step, *self.sets[0], self.cfg.device)
        row["compile_s"] = first_call_s if impl == "compile" else None
        actual = {k: outputs[k] for k in self.expected}
        try:
            ratios = compare(impl, actual, self.expected, self.dtype)
            row.update(checked=True, check_error_ratio=max(ratios.values()))
        except ReferenceMismatch as exc:
            row.update(status="mismatch", error=str(exc))

    def time(self, impl: str, step: Callable, row: dict) -> None:
        timings = _time_three_ways(_rotating(step, self.sets), len(self.sets), impl, self.cfg)
        row.update(timings, frac_floor=self.floor / timings["median_ms"],
                   frac_floor_graph=_fraction(self.floor, timings["graph_ms"]),
                   frac_floor_kernel=_fraction(self.floor, timings["kernel_ms"]))
        if row["bytes"] is not None:
            row["gbs"] = row["bytes"] / (timings["median_ms"] * 1e-3) / 1e9


def bench_case(case: OpCase, cfg, impls: Implementations, bandwidth_gbs: float, emit: Callable,
               baselines: Optional[List[dict]] = None) -> List[dict]:
    """Every implementation of ``case`` checked and timed, one row each (see the module
    docstring for mismatches and exceptions); ``baselines``: rows of this case measured
    before (another run), for the speed-ups.  Raises DeviceLost when the device is gone."""
    bench = CaseBench(case, cfg, bandwidth_gbs)
    rows = []
    for impl in cfg.impls:
        step = _step_of(impls, impl, case, bench.params)
        cfg.say(f"{case.label} {impl}" + (" (compiling)" if impl == "compile" else ""))
        row = bench.base_row(impl)
        try:
            bench.check(impl, step, row)
            bench.time(impl, step, row)
        except Exception as exc:  # a row that says so; the other implementations still run
            row.update(status="error", error=_error_text(exc), checked=False)
            row.update({k: None for k in TIMING_FIELDS if k != "check_error_ratio"})
        rows.append(row)
        add_speedups(rows + [r for r in baselines or () if r["impl"] not in cfg.impls])
        emit("ops", row)
        if row["status"] == "error" and not _device_usable(cfg.device):
            raise DeviceLost(f"{case.label} {impl}: {row['error']}")
    return rows


def add_speedups(rows: List[dict]) -> None:
    """speedup_vs_<base> from the eager-loop medians, device_speedup_vs_<base> from the
    graph-replay medians, for base in eager and compile (None where either is missing)."""
    loop = {r["impl"]: r["median_ms"] for r in rows}
    graph = {r["impl"]: r.get("graph_ms") for r in rows}
    for r in rows:
        for base in BASELINE_IMPLS:
            r[f"speedup_vs_{base}"] = loop[base] / r["median_ms"] if loop.get(base) and r["median_ms"] else None
            r[f"device_speedup_vs_{base}"] = (graph[base] / r["graph_ms"]
                                              if graph.get(base) and r.get("graph_ms") else None)


def load_baselines(path: Optional[str]) -> Dict[tuple, List[dict]]:
    """The eager and compile rows of a recorded op run, by case, for the speed-ups of a
    run that times other implementations (``--baseline-json``)."""
    if not path:
        return {}
    import json

    with open(path) as f:
        rows = json.load(f).get("ops", [])
    out: Dict[tuple, List[dict]] = {}
    for r in rows:
        if r["impl"] in BASELINE_IMPLS and r.get("status", "ok") == "ok":
            out.setdefault((tuple(r["shape"]), r["dtype"], r["layout"], r["pass"]), []).append(r)
    return out


def run_ops(cfg, bandwidth_gbs: float, emit: Callable) -> List[dict]:
    impls = Implementations(cfg.compile_backend, getattr(cfg, "inject_mismatch", ()))
    baselines = load_baselines(getattr(cfg, "baseline_json", None))
    rows = []
    for case in op_cases(cfg):
        if cfg.out_of_time():
            cfg.notes.append(f"op rows from {case.label} on skipped: --time-budget reached")
            break
        try:
            rows += bench_case(case, cfg, impls, bandwidth_gbs, emit,
                               baselines.get((case.shape, case.dtype, case.layout, case.pass_)))
        except DeviceLost as exc:
            cfg.notes.append(f"op rows after {exc} not measured: the device is unusable in this process")
            break
    return rows


def warm_compile_ops(cfg) -> Dict[str, float]:
    """Compiles the torch.compile baseline of every case once, in the order a timing run
    with the same arguments times them (the first call of a timing run, without the
    timing), so that the compile caches are warm for it; returns seconds per case (a case
    that fails is noted and skipped)."""
    impls = Implementations(cfg.compile_backend)
    seconds = {}
    for case in op_cases(cfg):
        cfg.say(f"warming {case.label} compile")
        (x, dy), = _rotation_sets(case, cfg.device, seed=sum(case.shape), count=1)
        step = _step_of(impls, "compile", case, _case_params(case, cfg.device))
        try:
            seconds[case.label] = _first_call(step, x, dy, cfg.device)[1]
            print(f"compiled {case.label}: {seconds[case.label]:.1f} s", flush=True)
        except Exception as exc:
            print(f"warming {case.label} compile failed: {_error_text(exc)}", flush=True)
    return seconds

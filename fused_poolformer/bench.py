"""Benchmarks: bytes, FLOPs, MACs and latency of the fused pool mixer against the unfused
graph (eager) and torch.compile of it, at op level and for whole timm PoolFormer models.

    python -m fused_poolformer.bench --device cpu --quick --json out.json
    fused-poolformer-bench --device cuda --ops-only --markdown out.md --plot out.png

Op level: the four PoolFormer-S12 stage shapes (plus any ``--shape``), forward and
forward+backward, every implementation on the same inputs in one process.  Outputs (and
input gradients) are checked against the float64 reference before anything is timed.
Each row reports the median time and its spread, the DESIGN.md section 5 byte/FLOP model
(``fused_poolformer.flops``), the byte floor (fused bytes / copy bandwidth measured in
this run) and the fraction of it reached, and speedups over eager and torch.compile.

Model level: timm ``poolformer_s12`` ... ``poolformer_m48``: parameters, MACs (fvcore, as
the paper's table, else torch.utils.flop_counter), inference latency, training-step time
and peak memory for the original model, the converted (fused) model and torch.compile.
"""

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import flops, ops, reference

STAGE_SHAPES = ((64, 56), (128, 28), (320, 14), (512, 7))  # PoolFormer-S12 (C, H) at 224x224
MODELS = ("poolformer_s12", "poolformer_s24", "poolformer_s36", "poolformer_m36", "poolformer_m48")
PAPER_MACS_G = {"poolformer_s12": 1.8, "poolformer_s24": 3.4, "poolformer_s36": 5.0,
                "poolformer_m36": 8.8, "poolformer_m48": 11.6}
PAPER_PARAMS_M = {"poolformer_s12": 12, "poolformer_s24": 21, "poolformer_s36": 31,
                  "poolformer_m36": 56, "poolformer_m48": 73}
FUSED_IMPLS = {"cpu": "fused-cpu", "cuda": "fused-cuda", "triton": "fused-triton"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
POOL_SIZE = 3
EPS = 1e-5
ROTATION_BYTES = 128 << 20  # input sets rotated per call: more than any L2 (and this L3)
MAX_INPUT_SETS = 64
COPY_BUFFER_BYTES = 256 << 20  # much larger than the last-level cache
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 2e-2, torch.float16: 4e-3}


# ---------------------------------------------------------------------------------------
# Configuration.


@dataclass
class Config:
    device: str
    batch: int
    shapes: List[Tuple[int, int, int, int]]
    dtypes: List[str]
    layouts: List[str]
    passes: List[str]
    impls: List[str]
    min_run_time: float
    models: List[str]
    latency_models: List[str]
    compile_models: List[str]
    model_impls: List[str]
    model_batch: int
    model_reps: int
    run_ops: bool = True
    run_models: bool = True
    notes: List[str] = field(default_factory=list)


def _parse_shape(text: str) -> Tuple[int, int, int, int]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"--shape takes N,C,H,W (four positive integers), got {text!r}")
    return dims


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _model_name(short: str) -> str:
    name = short if short.startswith("poolformer_") else f"poolformer_{short}"
    if name not in MODELS:
        raise SystemExit(f"--models: unknown model {short!r} (choose from {', '.join(MODELS)}, all, none)")
    return name


def _model_list(text: Optional[str], default: Sequence[str]) -> List[str]:
    if text is None:
        return list(default)
    if text in ("all", "none"):
        return list(MODELS) if text == "all" else []
    return [_model_name(t) for t in _csv(text)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fused-poolformer-bench",
        description="Fused vs unfused vs torch.compile: bytes, FLOPs, MACs and latency of the PoolFormer token mixer.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--quick", action="store_true", help="a reduced set (under 3 minutes on a 2-core CPU)")
    p.add_argument("--ops-only", action="store_true", help="skip the model table")
    p.add_argument("--models-only", action="store_true", help="skip the op table")
    p.add_argument("--batch", type=int, default=None, help="op-level batch of the stage shapes (default: 8 CPU, 64 GPU)")
    p.add_argument("--shape", type=_parse_shape, action="append", default=[], metavar="N,C,H,W",
                   help="an extra op shape (repeatable)")
    p.add_argument("--stages", default=None,
                   help="PoolFormer-S12 stages to benchmark: comma list of 0-3, 'all' or 'none' (default all; quick CPU: 0,3)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16,fp64 (default: fp32 CPU, fp32,bf16 GPU)")
    p.add_argument("--layouts", default=None,
                   help="comma list of contiguous,channels_last (default: both, but only contiguous for a quick CPU run)")
    p.add_argument("--passes", default="fwd,fwd+bwd", help="comma list of fwd,fwd+bwd")
    p.add_argument("--impls", default=None,
                   help="comma list of eager,compile,fused-cpu,fused-cuda,fused-triton (default: eager, compile, every available fused backend)")
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile (op and model level)")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds of timing per op row")
    p.add_argument("--models", default=None,
                   help="model table: comma list of s12,s24,s36,m36,m48, 'all' or 'none' (default all; quick: s12)")
    p.add_argument("--latency-models", default=None,
                   help="models whose latency/memory are measured, the others get params and MACs only (default: all; quick: s12)")
    p.add_argument("--compile-models", default=None,
                   help="models that also get a torch.compile row (default: s12 on CPU, none for a quick CPU run, all on GPU)")
    p.add_argument("--model-batch", type=int, default=None, help="batch of the model timings (default: 4 CPU, 64 GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's); 1 gives steadier numbers on a busy machine")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the results as a Markdown report")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: speedup over eager and fraction of the floor")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _default_impls(device: str) -> List[str]:
    # Triton on CPU only runs in its interpreter, far too slow to time: ask for it by name.
    fused = [FUSED_IMPLS[b] for b in ops.available_backends(device) if b in FUSED_IMPLS]
    if device == "cpu":
        fused = [i for i in fused if i != "fused-triton"]
    return ["eager", "compile"] + fused


def _stage_ids(text: str) -> List[int]:
    if text in ("all", "none"):
        return list(range(len(STAGE_SHAPES))) if text == "all" else []
    try:
        ids = [int(s) for s in _csv(text)]
    except ValueError:
        ids = [-1]
    if not all(0 <= i < len(STAGE_SHAPES) for i in ids):
        raise SystemExit(f"--stages takes a comma list of 0-{len(STAGE_SHAPES) - 1}, 'all' or 'none', got {text!r}")
    return ids


def make_config(args: argparse.Namespace) -> Config:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    gpu = device == "cuda"
    quick_cpu = args.quick and not gpu
    batch = args.batch or (64 if gpu else 8)
    stages = args.stages or ("0,3" if quick_cpu else "all")
    stage_ids = _stage_ids(stages)
    shapes = [(batch, STAGE_SHAPES[i][0], STAGE_SHAPES[i][1], STAGE_SHAPES[i][1]) for i in stage_ids]
    shapes += args.shape
    impls = _csv(args.impls) if args.impls else _default_impls(device)
    if args.no_compile:
        impls = [i for i in impls if i != "compile"]
    model_impls = ["original", "converted"] + ([] if args.no_compile else ["compile"])
    cfg = Config(
        device=device,
        batch=batch,
        shapes=shapes,
        dtypes=_csv(args.dtypes or ("fp32,bf16" if gpu else "fp32")),
        layouts=_csv(args.layouts or ("contiguous" if quick_cpu else "contiguous,channels_last")),
        passes=_csv(args.passes),
        impls=impls,
        min_run_time=args.min_run_time or (0.1 if gpu or args.quick else 0.5),
        models=_model_list(args.models, ["poolformer_s12"] if args.quick else MODELS),
        latency_models=_model_list(args.latency_models, ["poolformer_s12"] if args.quick else MODELS),
        compile_models=_model_list(args.compile_models, [] if quick_cpu else ["poolformer_s12"] if not gpu else MODELS),
        model_impls=model_impls,
        model_batch=args.model_batch or (64 if gpu else (2 if args.quick else 4)),
        model_reps=20 if gpu else (2 if args.quick else 3),
        run_ops=not args.models_only,
        run_models=not args.ops_only,
    )
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    known_impls = ("eager", "compile") + tuple(FUSED_IMPLS.values())
    for name, values, allowed in (("--dtypes", cfg.dtypes, DTYPES), ("--layouts", cfg.layouts, LAYOUTS),
                                  ("--passes", cfg.passes, flops.PASSES), ("--impls", cfg.impls, known_impls)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise SystemExit(f"{name}: unknown {bad} (choose from {', '.join(allowed)})")
    if "eager" not in cfg.impls and cfg.run_ops:
        raise SystemExit("--impls must include eager (every row is compared with it)")


# ---------------------------------------------------------------------------------------
# Timing.


def _summary(times_s: Sequence[float]) -> Dict[str, float]:
    ms = sorted(t * 1e3 for t in times_s)
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "q25_ms": q[0], "q75_ms": q[2],
            "min_ms": ms[0], "max_ms": ms[-1], "reps": len(ms)}


def _time_cuda(fn: Callable, min_run_time: float, warmup: int = 5, min_reps: int = 10) -> List[float]:
    """Per-call CUDA-event times of ``fn`` after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    estimate = max(time.perf_counter() - start, 1e-6)
    reps = int(min(max(min_reps, min_run_time / estimate), 1000))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for begin, end in events:
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [begin.elapsed_time(end) / 1e3 for begin, end in events]


def _time_cpu(fn: Callable, min_run_time: float) -> List[float]:
    """Per-call times of blocks measured by torch.utils.benchmark on every thread."""
    from torch.utils import benchmark

    fn()  # warm-up
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return list(timer.blocked_autorange(min_run_time=min_run_time).times)


def time_fn(fn: Callable, device: str, min_run_time: float) -> Dict[str, float]:
    times = _time_cuda(fn, min_run_time) if device == "cuda" else _time_cpu(fn, min_run_time)
    return _summary(times)


def time_repeated(fn: Callable, device: str, reps: int, warmup: int = 1) -> Dict[str, float]:
    """For calls too long to block (model steps): ``reps`` timed calls after ``warmup``."""
    if device == "cuda":
        return _summary(_time_cuda(fn, 0.0, warmup=warmup, min_reps=reps))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return _summary(times)


def copy_bandwidth_gbs(device: str, min_run_time: float) -> float:
    """Read + write bandwidth of a large ``dst.copy_(src)`` (GB/s, 1e9 bytes)."""
    n = COPY_BUFFER_BYTES // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    median_ms = time_fn(lambda: dst.copy_(src), device, max(min_run_time, 0.3))["median_ms"]
    return 2 * src.nbytes / (median_ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------
# Op level.


def _rotation_sets(shape, dtype, layout, device, with_grad: bool, seed: int) -> List[Tuple]:
    """(x, dy) pairs, enough that one sweep through them (inputs + outputs) exceeds the
    caches, so every timed call reads from memory."""
    numel = math.prod(shape)
    per_set = numel * torch.finfo(dtype).bits // 8 * (3 if with_grad else 2)
    count = max(1, min(MAX_INPUT_SETS, math.ceil(ROTATION_BYTES / per_set)))
    gen = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(count):
        x = (torch.randn(shape, generator=gen, device=device) * 1.3 + 0.5).to(dtype)
        x = x.contiguous(memory_format=LAYOUTS[layout]).requires_grad_(with_grad)
        dy = torch.randn(shape, generator=gen, device=device).to(dtype).contiguous(memory_format=LAYOUTS[layout])
        sets.append((x, dy if with_grad else None))
    return sets


def _params(channels: int, dtype, device, requires_grad: bool, seed: int) -> Dict[str, torch.Tensor]:
    """The PoolFormer v1 mixer's vectors: GroupNorm weight and bias, layer scale."""
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    ranges = {"weight": (0.5, 1.5), "bias": (-0.5, 0.5), "layer_scale": (-1.0, 1.0)}
    return {k: (torch.rand(channels, generator=gen, device=device) * (hi - lo) + lo).to(dtype).requires_grad_(requires_grad)
            for k, (lo, hi) in ranges.items()}


def _mixer(fn: Callable, **options) -> Callable:
    def call(x, p):
        return fn(x, p["weight"], p["bias"], layer_scale=p["layer_scale"], num_groups=1,
                  pool_size=POOL_SIZE, eps=EPS, **options)
    return call


_COMPILED: Dict[str, Callable] = {}


def _compiled_reference() -> Callable:
    """torch.compile of the reference, static shapes: one graph per shape/dtype/layout/pass
    (dynamo keeps them all in its cache: the recompile limit is raised for that)."""
    if "reference" not in _COMPILED:
        import torch._dynamo.config as dynamo_config

        for name, value in (("recompile_limit", 1024), ("cache_size_limit", 1024), ("accumulated_recompile_limit", 4096),
                            ("accumulated_cache_size_limit", 4096)):  # older and newer names
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), value))
        _COMPILED["reference"] = torch.compile(reference.pool_mixer, dynamic=False)
    return _COMPILED["reference"]


def impl_function(impl: str) -> Callable:
    if impl == "eager":
        return _mixer(reference.pool_mixer)
    if impl == "compile":
        return _mixer(_compiled_reference())
    backend = {v: k for k, v in FUSED_IMPLS.items()}[impl]
    return _mixer(ops.pool_mixer, backend=backend)


def _step(call: Callable, params: Dict[str, torch.Tensor], pass_: str) -> Callable:
    """One forward (no grad) or forward+backward (x and parameter gradients) on (x, dy)."""
    if pass_ == "fwd":
        def forward(x, dy):
            with torch.no_grad():
                return (call(x, params),)
        return forward
    leaves = tuple(params.values())

    def forward_backward(x, dy):
        y = call(x, params)
        grads = torch.autograd.grad(y, (x,) + leaves, dy)
        return y, grads[0]
    return forward_backward


def _rotating(step: Callable, sets: List[Tuple]) -> Callable:
    cycle = itertools.cycle(sets)

    def run():
        return step(*next(cycle))
    return run


def _max_error(actual: torch.Tensor, expected: torch.Tensor, dtype) -> Tuple[float, float]:
    """(max abs error, allowed error) against the float64 expected value."""
    err = (actual.detach().double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    return err, CHECK_TOLERANCE[dtype] * (1.0 + scale)


def _reference_outputs(x, dy, params, pass_) -> Tuple[torch.Tensor, ...]:
    """y (and dx) of the unfused graph in float64 on the same device."""
    x64 = x.detach().double().requires_grad_(pass_ == "fwd+bwd")
    p64 = {k: v.detach().double() for k, v in params.items()}
    y = _mixer(reference.pool_mixer)(x64, p64)
    if pass_ == "fwd":
        return (y.detach(),)
    (dx,) = torch.autograd.grad(y, x64, dy.double())
    return y.detach(), dx


class ReferenceMismatch(RuntimeError):
    """An implementation's output or gradient is not the reference's."""


def check_outputs(impl: str, step: Callable, x, dy, expected, dtype) -> float:
    """Raises if ``impl``'s outputs (y, and dx for fwd+bwd) are not the reference's;
    returns the largest error relative to its allowance."""
    worst = 0.0
    for name, actual, want in zip(("output", "input gradient"), step(x, dy), expected):
        err, allowed = _max_error(actual, want, dtype)
        if not err <= allowed:  # also catches NaN
            raise ReferenceMismatch(f"{impl}: {name} differs from the reference by {err:.3e} (allowed {allowed:.3e}, "
                               f"shape {tuple(x.shape)}, {dtype})")
        worst = max(worst, err / allowed)
    return worst


@dataclass(frozen=True)
class OpCase:
    shape: Tuple[int, int, int, int]
    dtype: str
    layout: str
    pass_: str


def op_cases(cfg: Config) -> List[OpCase]:
    return [OpCase(tuple(s), d, l, p) for s in cfg.shapes for d in cfg.dtypes for l in cfg.layouts for p in cfg.passes]


def bench_case(case: OpCase, cfg: Config, bandwidth_gbs: float, progress) -> List[dict]:
    dtype = DTYPES[case.dtype]
    with_grad = case.pass_ == "fwd+bwd"
    sets = _rotation_sets(case.shape, dtype, case.layout, cfg.device, with_grad, seed=sum(case.shape))
    params = _params(case.shape[1], dtype, cfg.device, with_grad, seed=sum(case.shape))
    expected = _reference_outputs(*sets[0], params, case.pass_)
    element_size = torch.finfo(dtype).bits // 8
    floor_ms = flops.fused_bytes(case.shape, element_size, case.pass_) / (bandwidth_gbs * 1e9) * 1e3
    rows = []
    for impl in cfg.impls:
        progress.set_postfix_str(f"{impl} {','.join(map(str, case.shape))} {case.dtype} {case.pass_}")
        step = _step(impl_function(impl), params, case.pass_)
        try:
            check = check_outputs(impl, step, *sets[0], expected, dtype)
        except ReferenceMismatch:
            raise
        except Exception as exc:
            if impl != "compile":
                raise
            # A machine without a working compiler still gets the other rows.
            cfg.notes.append(f"compile skipped for {case}: {type(exc).__name__}: {exc}".splitlines()[0])
            progress.update(1)
            continue
        timing = time_fn(_rotating(step, sets), cfg.device, cfg.min_run_time)
        nbytes, nflops = flops.op_costs(case.shape, element_size, impl, case.pass_, POOL_SIZE)
        rows.append(dict(
            shape=list(case.shape), dtype=case.dtype, layout=case.layout, **{"pass": case.pass_}, impl=impl,
            **timing, floor_ms=floor_ms, frac_floor=floor_ms / timing["median_ms"],
            bytes=nbytes, flops=nflops,
            gbs=None if nbytes is None else nbytes / (timing["median_ms"] * 1e-3) / 1e9,
            checked=True, check_error_ratio=check, input_sets=len(sets),
        ))
        progress.update(1)
    _add_speedups(rows)
    return rows


def _add_speedups(rows: List[dict]) -> None:
    by_impl = {r["impl"]: r["median_ms"] for r in rows}
    for r in rows:
        for base in ("eager", "compile"):
            r[f"speedup_vs_{base}"] = by_impl[base] / r["median_ms"] if base in by_impl else None


def run_ops(cfg: Config, bandwidth_gbs: float, progress_factory) -> List[dict]:
    cases = op_cases(cfg)
    rows = []
    with progress_factory(total=len(cases) * len(cfg.impls), desc="ops") as progress:
        for case in cases:
            rows += bench_case(case, cfg, bandwidth_gbs, progress)
    return rows


# ---------------------------------------------------------------------------------------
# Model level.


def _converter():
    """fused_poolformer.convert.convert_model, or the reason it cannot be used."""
    try:
        from .convert import convert_model
    except ImportError as exc:
        return None, f"converted rows skipped: fused_poolformer.convert is unavailable ({exc})"
    return convert_model, None


def _release_free_heap() -> None:
    """Returns freed heap pages to the OS (glibc), so that the RSS before a step counts
    live memory only and the step's own peak shows up in the high-water mark."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PeakMemory:
    """Peak memory of a block above what was held when it began: the CUDA caching
    allocator's peak, or on the CPU the process's resident-set high-water mark (VmHWM,
    reset through /proc/self/clear_refs) minus the RSS before the block."""

    def __init__(self, device: str):
        self.device = device
        self.method = ("torch.cuda.max_memory_allocated - allocated before" if device == "cuda"
                       else "RSS high-water mark (VmHWM) - RSS before, after malloc_trim")

    @staticmethod
    def _status_kb(key: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def measure(self, fn: Callable) -> Optional[float]:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - before) / 2**20
        _release_free_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            return None
        before = self._status_kb("VmRSS")
        fn()
        peak = self._status_kb("VmHWM")
        return None if before is None or peak is None else (peak - before) / 1024


def _train_step(model, optimizer, images, labels) -> Callable:
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
    return step


def _time_model(model, cfg: Config, memory: _PeakMemory) -> dict:
    gen = torch.Generator(device=cfg.device).manual_seed(0)
    images = torch.randn(cfg.model_batch, 3, 224, 224, generator=gen, device=cfg.device)
    labels = torch.randint(0, 1000, (cfg.model_batch,), generator=gen, device=cfg.device)
    model.eval()

    def infer():
        with torch.no_grad():
            model(images)
    infer_t = time_repeated(infer, cfg.device, cfg.model_reps)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    step = _train_step(model, optimizer, images, labels)
    step()  # warm-up: the optimizer state exists before memory is measured
    peak = memory.measure(step)
    train_t = time_repeated(step, cfg.device, cfg.model_reps, warmup=0)
    model.eval()
    return dict(infer_ms=infer_t["median_ms"], infer_min_ms=infer_t["min_ms"], infer_max_ms=infer_t["max_ms"],
                images_per_s=cfg.model_batch / (infer_t["median_ms"] * 1e-3),
                train_step_ms=train_t["median_ms"], train_min_ms=train_t["min_ms"], train_max_ms=train_t["max_ms"],
                peak_mem_mb=peak, peak_mem_method=memory.method)


def _model_impls(name: str, cfg: Config) -> List[str]:
    return [i for i in cfg.model_impls if i != "compile" or name in cfg.compile_models]


def _model_variants(model, model_name: str, cfg: Config, convert_model):
    """(impl, module) for each model implementation asked for."""
    for impl in _model_impls(model_name, cfg):
        if impl == "original":
            yield impl, model
        elif impl == "converted":
            yield impl, convert_model(model, inplace=False)
        elif impl == "compile":
            yield impl, torch.compile(model)


def bench_model(name: str, cfg: Config, convert_model, progress) -> List[dict]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    example = torch.randn(1, 3, 224, 224)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    memory = _PeakMemory(cfg.device)
    rows = []
    for impl, variant in _model_variants(model, name, cfg, convert_model):
        progress.set_postfix_str(f"{name} {impl}")
        # MACs of the module torch.compile wraps: compiling does not change the math.
        counted = getattr(variant, "_orig_mod", variant).eval()
        macs, counter = flops.count_macs(counted, example)
        row = dict(model=name, impl=impl, params_m=params_m, macs_g=macs / 1e9, macs_counter=counter,
                   paper_macs_g=PAPER_MACS_G[name], paper_params_m=PAPER_PARAMS_M[name],
                   macs_vs_paper_pct=100.0 * (macs / 1e9 / PAPER_MACS_G[name] - 1.0),
                   batch=None, infer_ms=None, images_per_s=None, train_step_ms=None, peak_mem_mb=None)
        if name in cfg.latency_models:
            variant.to(cfg.device)
            row.update(batch=cfg.model_batch, **_time_model(variant, cfg, memory))
            variant.to("cpu")
        rows.append(row)
        progress.update(1)
    return rows


def run_models(cfg: Config, progress_factory) -> List[dict]:
    convert_model, reason = _converter()
    if convert_model is None and "converted" in cfg.model_impls:
        cfg.notes.append(reason)
        cfg.model_impls = [i for i in cfg.model_impls if i != "converted"]
    rows = []
    total = sum(len(_model_impls(name, cfg)) for name in cfg.models)
    with progress_factory(total=total, desc="models") as progress:
        for name in cfg.models:
            rows += bench_model(name, cfg, convert_model, progress)
    return rows


# ---------------------------------------------------------------------------------------
# Presentation.


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:.0f}"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.3g}"
    return str(value)


def _speedup(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


OP_COLUMNS = (
    ("shape", lambda r: "x".join(map(str, r["shape"]))), ("dtype", "dtype"), ("layout", "layout"),
    ("pass", "pass"), ("impl", "impl"), ("median ms", "median_ms"),
    ("IQR ms", lambda r: f"{_fmt(r['q25_ms'])}-{_fmt(r['q75_ms'])}"),
    ("floor ms", "floor_ms"), ("% floor", lambda r: f"{100 * r['frac_floor']:.0f}%"),
    ("vs eager", lambda r: _speedup(r["speedup_vs_eager"])),
    ("vs compile", lambda r: _speedup(r["speedup_vs_compile"])),
    ("MB (model)", lambda r: None if r["bytes"] is None else r["bytes"] / 1e6),
    ("MFLOP", lambda r: r["flops"] / 1e6), ("GB/s", "gbs"), ("checked", lambda r: "yes" if r["checked"] else "NO"),
)
MODEL_COLUMNS = (
    ("model", "model"), ("impl", "impl"), ("params M", "params_m"), ("MACs G", "macs_g"),
    ("paper G", "paper_macs_g"), ("vs paper", lambda r: f"{r['macs_vs_paper_pct']:+.1f}%"),
    ("counter", "macs_counter"), ("batch", "batch"), ("infer ms", "infer_ms"), ("img/s", "images_per_s"),
    ("train step ms", "train_step_ms"), ("train peak MB", "peak_mem_mb"),
)


def _cells(columns, rows) -> Tuple[List[str], List[List[str]]]:
    header = [c[0] for c in columns]
    body = [[_fmt(get(r) if callable(get) else r[get]) for _, get in columns] for r in rows]
    return header, body


def text_table(columns, rows) -> str:
    header, body = _cells(columns, rows)
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


def markdown_table(columns, rows) -> str:
    header, body = _cells(columns, rows)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(b) + " |" for b in body])


def _machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def _preamble(results: dict) -> List[str]:
    lines = [f"device: {results['device']}  |  torch {results['torch']}  |  {results['timestamp']}",
             f"copy bandwidth (read + write): {results['copy_bandwidth_gbs']:.1f} GB/s  |  "
             f"1-min load average at start/end: {_fmt(results['load_average'][0])}/{_fmt(results['load_average'][1])} "
             f"on {os.cpu_count()} CPUs"]
    if results["ops"]:
        lines.append("floor = fused bytes (DESIGN.md s5: fwd 3*E*s, bwd 5*E*s) / copy bandwidth; "
                     "% floor = floor / median; MB (model): bytes each form moves by that model "
                     "(eager fwd 13*E*s, bwd 20*E*s; compile not modelled)")
    return lines


def render_text(results: dict) -> str:
    parts = _preamble(results)
    if results["ops"]:
        parts += ["", "op level (pool size 3, GroupNorm(1) weight+bias, layer scale)", text_table(OP_COLUMNS, results["ops"])]
    if results["models"]:
        parts += ["", "model level (MACs at 1x3x224x224)", text_table(MODEL_COLUMNS, results["models"])]
    parts += [f"note: {n}" for n in results["notes"]]
    return "\n".join(parts)


def render_markdown(results: dict) -> str:
    parts = ["# fused_poolformer benchmark", ""] + [f"- {line}" for line in _preamble(results)]
    parts.append(f"- command: `{results['command']}`")
    if results["ops"]:
        parts += ["", "## Op level", "", "Pool size 3, GroupNorm(1) with weight and bias, layer scale. "
                  "Outputs and input gradients checked against the float64 reference before timing.", "",
                  markdown_table(OP_COLUMNS, results["ops"])]
    if results["models"]:
        parts += ["", "## Model level", "", "MACs at 1x3x224x224; latency and training step (AdamW) at the "
                  "batch shown; peak memory of a training step: " + (results["models"][0].get("peak_mem_method") or "not measured")
                  + ".", "", markdown_table(MODEL_COLUMNS, results["models"])]
    if results["notes"]:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(parts) + "\n"


def write_plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["ops"]
    cases = list(dict.fromkeys((tuple(r["shape"]), r["dtype"], r["layout"], r["pass"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    value = {(tuple(r["shape"]), r["dtype"], r["layout"], r["pass"], r["impl"]): r for r in rows}
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(cases) + 3), 8), sharex=True)
    width = 0.8 / max(len(impls), 1)
    for ax, key, title in ((axes[0], "speedup_vs_eager", "speedup over eager (x)"),
                           (axes[1], "frac_floor", "fraction of the byte floor reached")):
        for i, impl in enumerate(impls):
            if key == "speedup_vs_eager" and impl == "eager":
                continue  # 1 by definition: the gray line
            ys = [value[c + (impl,)][key] if c + (impl,) in value else 0 for c in cases]
            ax.bar([j + i * width for j in range(len(cases))], ys, width, label=impl, color=f"C{i}")
        ax.set_ylabel(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set_yscale("log")  # speedups span slower-than-eager to two orders faster
    for ax in axes:
        ax.legend(ncol=len(impls), fontsize=8)
    labels = [f"{s[1]}x{s[2]}x{s[3]} n{s[0]}\n{d} {'CL' if l == 'channels_last' else 'NCHW'} {p}"
              for s, d, l, p in cases]
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], labels, fontsize=7, rotation=45, ha="right")
    fig.suptitle(f"fused_poolformer pool mixer -- {results['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _progress_factory(disabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None

    def make(total: int, desc: str):
        if tqdm is None or disabled:
            return _NoProgress()
        return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)
    return make


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass


def _write(path: str, text: str) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _load_average() -> Optional[float]:
    """The 1-minute load average: other processes on the machine scatter CPU timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run(cfg: Config, progress_factory, command: str) -> dict:
    load_at_start = _load_average()
    bandwidth = copy_bandwidth_gbs(cfg.device, cfg.min_run_time)
    results = dict(
        device=_machine(cfg.device), device_type=cfg.device, torch=torch.__version__,
        timestamp=datetime.datetime.now().isoformat(timespec="seconds"),
        command=command,
        copy_bandwidth_gbs=bandwidth,
        ops=run_ops(cfg, bandwidth, progress_factory) if cfg.run_ops else [],
        models=run_models(cfg, progress_factory) if cfg.run_models and cfg.models else [],
    )
    results["load_average"] = [load_at_start, _load_average()]
    results["notes"] = cfg.notes
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = make_config(args)
    if cfg.run_models and cfg.models and not flops.fvcore_available():
        cfg.notes.append("fvcore is not installed: MACs come from torch.utils.flop_counter (convolutions and matmuls only)")
    start = time.perf_counter()
    command = " ".join(["python -m fused_poolformer.bench"] + argv)
    results = run(cfg, _progress_factory(args.no_progress), command)
    results["wall_s"] = time.perf_counter() - start
    print(render_text(results))
    print(f"({results['wall_s']:.0f} s)")
    if args.json:
        _write(args.json, json.dumps(results, indent=1) + "\n")
    if args.markdown:
        _write(args.markdown, render_markdown(results))
    if args.plot and results["ops"]:
        write_plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

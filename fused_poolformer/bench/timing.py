"""Timers.  Three ways to time an op, so one run separates host from device time:

* :func:`loop_time` -- the **eager loop**: back-to-back calls, each timed (CUDA events
  around each call on a GPU, blocks of calls on the CPU; :func:`block_time` times blocks
  on a GPU too, for microsecond calls).  Host and
  device time together: whichever is larger shows.
* :func:`graph_time` -- **CUDA-graph replay**: the calls captured once and replayed, so
  no host work is left: device time only (CUDA only; "n/a" with the reason elsewhere).
* :func:`profiler_time` -- **per-kernel times** from ``torch.profiler``: on a GPU the sum
  of the kernel (and memcpy/memset) durations per call and the number of launches; on the
  CPU the self time of every operator event per call (time inside operators, without
  the Python and autograd glue around them).

:func:`interleaved_times` times long steps (model inference, training steps) with the
candidates alternating call by call, so drift in machine load hits all of them alike.
"""

import os
import re
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

COPY_BUFFER_BYTES = 256 << 20  # much larger than any last-level cache
# An operator event of the profiler: "namespace::name" or "namespace::name.overload".
OPERATOR_EVENT = re.compile(r"^(?!autograd::|profiler::)\w+::\w+(\.\w+)?$")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def summarize(times_s: Sequence[float]) -> Dict[str, float]:
    """Median, quartiles, extremes (ms) and count of per-call times in seconds."""
    ms = sorted(t * 1e3 for t in times_s)
    quartiles = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "q25_ms": quartiles[0], "q75_ms": quartiles[2],
            "min_ms": ms[0], "max_ms": ms[-1], "reps": len(ms)}


def _reps_for(fn: Callable, device: str, min_run_time: float, min_reps: int, max_reps: int) -> int:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    estimate = max(time.perf_counter() - start, 1e-6)
    return int(min(max(min_reps, min_run_time / estimate), max_reps))


def _cuda_event_times(fn: Callable, reps: int) -> List[float]:
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for begin, end in events:
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [begin.elapsed_time(end) / 1e3 for begin, end in events]


def _block(fn: Callable, device: str, number: int) -> float:
    """Seconds of ``number`` back-to-back calls ending with a device synchronize."""
    start = time.perf_counter()
    for _ in range(number):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def _calls_per_block(fn: Callable, device: str, min_run_time: float) -> int:
    """Enough calls that a block lasts >= 1 ms (or a tenth of min_run_time): the clock's
    cost vanishes."""
    block_s = min(1e-3, min_run_time / 10)
    number = 1
    while _block(fn, device, number) < block_s and number < 1 << 20:
        number *= 2
    return number


def _block_times(fn: Callable, device: str, min_run_time: float, min_blocks: int = 5) -> List[float]:
    """Per-call times of blocks of back-to-back calls (see _calls_per_block), until
    min_run_time and min_blocks."""
    number = _calls_per_block(fn, device, min_run_time)
    times: List[float] = []
    deadline = time.perf_counter() + min_run_time
    while len(times) < min_blocks or time.perf_counter() < deadline:
        times.append(_block(fn, device, number) / number)
    return times


def interleaved_block_times(steps: Dict[str, Callable], device: str, min_run_time: float, warmup: int = 5,
                            threads: Optional[int] = None) -> Dict[str, dict]:
    """block_time of each step, the steps' blocks alternating round by round (about
    min_run_time per step in all), so that drift in the machine's speed hits them alike."""
    def measure():
        numbers = {}
        for name, fn in steps.items():
            for _ in range(warmup):
                fn()
            numbers[name] = _calls_per_block(fn, device, min_run_time)
        times: Dict[str, List[float]] = {name: [] for name in steps}
        deadline = time.perf_counter() + min_run_time * len(steps)
        while min(len(t) for t in times.values()) < 5 or time.perf_counter() < deadline:
            for name, fn in steps.items():
                times[name].append(_block(fn, device, numbers[name]) / numbers[name])
        return {name: summarize(t) for name, t in times.items()}
    return _with_threads(threads, measure)


def _with_threads(threads: Optional[int], measure: Callable[[], dict]) -> dict:
    """``measure()`` with ``threads`` CPU threads (default: torch's)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        return measure()
    finally:
        torch.set_num_threads(previous)


def loop_time(fn: Callable, device: str, min_run_time: float, warmup: int = 3, threads: Optional[int] = None) -> dict:
    """Per-call times of ``fn`` in a back-to-back loop (host + device): CUDA events around
    each call on a GPU, blocks of calls on the CPU."""
    def measure():
        for _ in range(warmup):
            fn()
        if device == "cuda":
            reps = _reps_for(fn, device, min_run_time, min_reps=10, max_reps=2000)
            return summarize(_cuda_event_times(fn, reps))
        return summarize(_block_times(fn, device, min_run_time))
    return _with_threads(threads, measure)


def block_time(fn: Callable, device: str, min_run_time: float, warmup: int = 5, threads: Optional[int] = None) -> dict:
    """Per-call times of blocks of back-to-back calls ending with a synchronize, on any
    device: the throughput of a short call, host or device bound, with nothing added
    between calls (for microsecond calls, where even a CUDA event per call would count)."""
    def measure():
        for _ in range(warmup):
            fn()
        return summarize(_block_times(fn, device, min_run_time))
    return _with_threads(threads, measure)


def graph_time(fn: Callable, calls: int, device: str, min_run_time: float) -> Tuple[Optional[dict], str]:
    """(per-call summary, "") of replaying a CUDA graph of ``calls`` calls of ``fn``, or
    (None, why not).  ``fn`` must have run before (compiled, autotuned, workspaces
    allocated)."""
    if device != "cuda":
        return None, "n/a: CUDA graphs need a CUDA device"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as exc:  # not capturable (host syncs, CPU work, ...): say why
        _recover_from_capture()
        return None, f"n/a: not capturable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    reps = _reps_for(graph.replay, device, min_run_time, min_reps=5, max_reps=500)
    times = _cuda_event_times(graph.replay, reps)
    del graph
    return summarize([t / calls for t in times]), ""


def _recover_from_capture() -> None:
    """After a failed capture: let the device finish and drop what the capture held."""
    try:
        torch.cuda.synchronize()
    except Exception:
        pass
    torch.cuda.empty_cache()


def _operator_events(events) -> list:
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and OPERATOR_EVENT.match(e.name)]


def profiler_time(fn: Callable, calls: int, device: str) -> dict:
    """Per-call device time of ``calls`` calls of ``fn`` from torch.profiler:
    {"kernel_ms", "launches", "method"}."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no profiler start/stop chatter
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    events = prof.events()
    if device == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        total_us = sum(e.time_range.elapsed_us() for e in kernels)
        return {"kernel_ms": total_us / calls * 1e-3, "launches": len(kernels) / calls,
                "method": "sum of CUDA kernel/memcpy/memset durations per call (torch.profiler)"}
    operators = _operator_events(events)
    total_us = sum(e.self_cpu_time_total for e in operators)
    return {"kernel_ms": total_us / calls * 1e-3, "launches": len(operators) / calls,
            "method": "self CPU time of every operator event per call (torch.profiler)"}


def operator_calls(fn: Callable) -> Dict[str, object]:
    """The operator events (``namespace::name``, nested calls included) that one call of
    ``fn`` records in torch.profiler on the CPU side: total, top-level ones (not inside
    another operator) and a count per name."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    operators = _operator_events(prof.events())
    ids = {id(e) for e in operators}

    def nested(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if id(parent) in ids:
                return True
            parent = parent.cpu_parent
        return False

    by_name: Dict[str, int] = {}
    for e in operators:
        by_name[e.name] = by_name.get(e.name, 0) + 1
    return {"total": len(operators), "top_level": sum(not nested(e) for e in operators),
            "by_name": dict(sorted(by_name.items(), key=lambda kv: -kv[1]))}


def interleaved_times(steps: Dict[str, Callable], reps: int, device: str) -> Dict[str, List[float]]:
    """Seconds per call of each zero-argument step, the steps alternating call by call
    (wall clock with the device synchronized around each call)."""
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def copy_bandwidth_gbs(device: str, min_run_time: float) -> float:
    """Read + write bandwidth of a large ``dst.copy_(src)`` (GB/s, 1e9 bytes)."""
    src = torch.rand(COPY_BUFFER_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    median_ms = loop_time(lambda: dst.copy_(src), device, max(min_run_time, 0.3), warmup=1)["median_ms"]
    return 2 * src.nbytes / (median_ms * 1e-3) / 1e9

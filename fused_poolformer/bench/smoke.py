"""Smoke checks: one fused call (forward, or forward + backward) against the float64
unfused graph, reported as one line -- PASS or FAIL with the largest error of every tensor
against its allowance, or ERROR with the exception -- and as one JSON record.  The GPU
check's first answer (``benchmarks/gpu_smoke.py``: every PoolFormer-S12 stage shape,
float32 and bfloat16, both layouts, both passes, each fused backend) and the cases of
``benchmarks/gpu_sanitize.py``.

A sticky CUDA error (an illegal address, a launch failure) leaves the process unable to
run anything; :func:`run_cases` then reports the remaining cases as NOT-RUN.
"""

import json
import time
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch

from .. import pool_mixer
from .inputs import DTYPES, V1_PARAMS, errors, forward_backward, mixer, mixer_params, random_input, reference_outputs
from .op_level import STAGE_SHAPES

PASSES = ("fwd", "bwd")
LAYOUT_NAMES = {"contiguous": "NCHW", "channels_last": "CL"}


@dataclass(frozen=True)
class SmokeCase:
    backend: str
    shape: Tuple[int, int, int, int]
    dtype: str  # a key of inputs.DTYPES
    layout: str  # "contiguous" or "channels_last"
    pass_: str  # "fwd" (no grad) or "bwd" (forward + backward)
    num_groups: int = 1
    pool_size: int = 3
    params: Tuple[str, ...] = V1_PARAMS

    @property
    def label(self) -> str:
        extra = "" if (self.num_groups, self.pool_size) == (1, 3) else f" G={self.num_groups} k={self.pool_size}"
        return (f"{self.backend:6s} {self.dtype:4s} {LAYOUT_NAMES[self.layout]:4s} {self.pass_} "
                f"{'x'.join(map(str, self.shape))}{extra}")


def stage_shapes(batch: int) -> List[Tuple[int, int, int, int]]:
    return [(batch, c, h, h) for c, h in STAGE_SHAPES]


def smoke_cases(backends: Sequence[str], shapes: Sequence[Tuple[int, int, int, int]], dtypes: Sequence[str],
                layouts: Sequence[str], passes: Sequence[str] = PASSES) -> List[SmokeCase]:
    """Backend by backend (each may run in its own process), then shape, dtype, layout, pass."""
    return [SmokeCase(b, tuple(s), d, l, p) for b in backends for s in shapes for d in dtypes for l in layouts
            for p in passes]


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def run_case(case: SmokeCase, device: str, reference_device: Optional[str] = None) -> dict:
    """The case's record: status PASS / FAIL / ERROR, per tensor [error, allowed], the
    exception, seconds.  ``reference_device``: where the float64 reference runs (default:
    the case's device; the sanitizer keeps it on the CPU, out of the tool's view)."""
    start = time.perf_counter()
    record = dict(backend=case.backend, shape=list(case.shape), dtype=case.dtype, layout=case.layout,
                  **{"pass": case.pass_}, num_groups=case.num_groups, pool_size=case.pool_size,
                  status="ERROR", errors={}, error=None)
    try:
        gen = torch.Generator(device=device).manual_seed(sum(case.shape))
        dtype = DTYPES[case.dtype]
        with_grad = case.pass_ == "bwd"
        x = random_input(case.shape, dtype, case.layout, device, gen).requires_grad_(with_grad)
        grad_y = random_input(case.shape, dtype, case.layout, device, gen) if with_grad else None
        params = mixer_params(case.shape[0], case.shape[1], dtype, device, names=case.params,
                              requires_grad=with_grad, seed=sum(case.shape))
        options = dict(num_groups=case.num_groups, pool_size=case.pool_size)
        call = mixer(lambda *a, **k: pool_mixer(*a, backend=case.backend, **k), **options)
        actual = forward_backward(call, x, params, grad_y)
        _synchronize(device)
        where = reference_device or device
        moved = lambda t: None if t is None else t.detach().to(where)  # noqa: E731
        expected = reference_outputs(moved(x), {k: moved(v) for k, v in params.items()}, moved(grad_y),
                                     wanted=actual, **options)
        record["errors"] = {k: list(v) for k, v in errors(actual, expected, dtype).items()}
        record["status"] = "PASS" if all(err <= allowed for err, allowed in record["errors"].values()) else "FAIL"
    except Exception as exc:  # the line says what was raised; the next case still runs
        record["error"] = _error_text(exc)
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def format_line(case: SmokeCase, record: dict) -> str:
    """``PASS cuda   fp32 NCHW fwd 64x64x56x56  y 1.2e-06/1.0e-04 ...  (0.4 s)``."""
    if record["status"] in ("PASS", "FAIL"):
        detail = "  ".join(f"{k} {err:.1e}/{allowed:.1e}" for k, (err, allowed) in record["errors"].items())
    else:
        detail = record["error"] or ""
    return f"{record['status']:7s} {case.label}  {detail}  ({record.get('seconds', 0):.1f} s)"


def _device_usable(device: str) -> bool:
    try:
        _synchronize(device)
        return True
    except Exception:
        return False


def run_cases(cases: Iterable[SmokeCase], device: str, emit: Callable[[SmokeCase, dict], None],
              reference_device: Optional[str] = None) -> int:
    """Runs every case, emitting each record as it is known; returns the number that did
    not pass."""
    failures = 0
    lost = None
    for case in cases:
        if lost is None:
            record = run_case(case, device, reference_device)
            if record["status"] == "ERROR" and not _device_usable(device):
                lost = f"the device is unusable in this process after {case.label.split()[0]} ({record['error']})"
        else:
            record = dict(backend=case.backend, shape=list(case.shape), dtype=case.dtype, layout=case.layout,
                          **{"pass": case.pass_}, status="NOT-RUN", errors={}, error=lost, seconds=0.0)
        failures += record["status"] != "PASS"
        emit(case, record)
    return failures


def line_writer(jsonl_path: Optional[str]) -> Callable[[SmokeCase, dict], None]:
    """emit(case, record): prints the line and appends the record to ``jsonl_path``
    (flushed each time: a run cut short keeps every line it printed)."""
    def emit(case: SmokeCase, record: dict) -> None:
        print(format_line(case, record), flush=True)
        if jsonl_path:
            with open(jsonl_path, "a") as f:
                f.write(json.dumps(record) + "\n")
    return emit

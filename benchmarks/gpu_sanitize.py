"""Small forward + backward runs of the fused kernels, for compute-sanitizer:

    compute-sanitizer --tool memcheck  python benchmarks/gpu_sanitize.py
    compute-sanitizer --tool racecheck python benchmarks/gpu_sanitize.py

One small case per layout (NCHW, channels_last), dtype (float32, float64, float16,
bfloat16) and shape family (a plane smaller than the window, a prime-sized one with
several groups, one large enough to split each group over several blocks), every
optional vector given.  Each output and gradient is compared with the float64 unfused
graph (computed on the CPU, outside the sanitizer's view), so a kernel that reads out of
bounds or races shows up here even where the sanitizer's report is missed.  Prints one
line per case (``fused_poolformer.bench.smoke``); exits 1 on any mismatch or exception, 2
where there is no CUDA device, 3 where no fused backend serves the device.

--device cpu runs the same cases on the CPU backends (to check the script itself without
a GPU, as `benchmarks/gpu_check.sh --dry-run` does).
"""

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

import fused_poolformer  # noqa: E402
from fused_poolformer.bench.inputs import PARAM_RANGES  # noqa: E402
from fused_poolformer.bench.smoke import SmokeCase, line_writer, run_cases  # noqa: E402

DTYPES = ("fp32", "fp64", "fp16", "bf16")
# (shape, num_groups, pool_size)
SHAPES = (
    ((2, 3, 2, 3), 3, 9),  # plane smaller than the window
    ((2, 6, 7, 5), 2, 3),  # primes, H != W, several groups
    ((2, 16, 40, 36), 1, 5),  # one group of 23 K elements: split over several blocks
)


def fused_backends(device: str) -> list:
    """Every backend that runs fused kernels on ``device`` (the Triton interpreter on a CPU
    is far too slow for this sweep)."""
    skip = ("reference", "triton") if device == "cpu" else ("reference",)
    return [b for b in fused_poolformer.available_backends(device) if b not in skip]


def sanitizer_cases(backends) -> list:
    """Forward + backward, every optional vector given, per backend, shape family, dtype and
    layout."""
    return [SmokeCase(backend, shape, dtype, layout, "bwd", groups, pool_size, tuple(PARAM_RANGES))
            for backend in backends for shape, groups, pool_size in SHAPES for dtype in DTYPES
            for layout in ("contiguous", "channels_last")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="all",
                        help="comma-separated fused backends (default: every one the device runs)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize: no CUDA device", flush=True)
        return 2
    available = fused_backends(args.device)
    wanted = available if args.backends == "all" else args.backends.split(",")
    backends = [b for b in wanted if b in available]
    if not backends:
        print(f"gpu_sanitize: none of {wanted} serves {args.device} (available: {available})", flush=True)
        return 3
    print(f"gpu_sanitize: torch {torch.__version__}, device {args.device}"
          f"{' ' + torch.cuda.get_device_name() if args.device == 'cuda' else ''}, backends {backends}", flush=True)
    cases = sanitizer_cases(backends)
    # The reference runs on the CPU, outside the sanitizer's view.
    failures = run_cases(cases, args.device, line_writer(None), reference_device="cpu")
    print(f"gpu_sanitize: {len(cases) - failures}/{len(cases)} cases match the float64 reference", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

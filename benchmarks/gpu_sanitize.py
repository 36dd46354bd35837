"""Small forward + backward runs of the fused kernels, for compute-sanitizer:

    compute-sanitizer --tool memcheck  python benchmarks/gpu_sanitize.py
    compute-sanitizer --tool racecheck python benchmarks/gpu_sanitize.py

One small case per layout (NCHW, channels_last), dtype (float32, float64, float16,
bfloat16) and shape family (a plane smaller than the window, a prime-sized one with
several groups, one large enough to split each group over several blocks), every
optional vector given.  Each output and gradient is compared with the float64 unfused
graph (computed on the CPU, outside the sanitizer's view), so a kernel that reads out of
bounds or races shows up here even where the sanitizer's report is missed.  Prints one
line per case; exits 1 on any mismatch, 2 where there is no CUDA device, 3 where no fused
backend serves the device.

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
from fused_poolformer.bench.inputs import (PARAM_RANGES, ReferenceMismatch, compare, forward_backward,  # noqa: E402
                                           mixer, mixer_params, random_input, reference_outputs)

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
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


def run_case(backend: str, device: str, shape, groups: int, pool_size: int, dtype, layout: str) -> bool:
    """True when y and every gradient match the float64 reference."""
    gen = torch.Generator(device=device).manual_seed(sum(shape))
    x = random_input(shape, dtype, layout, device, gen).requires_grad_(True)
    grad_y = random_input(shape, dtype, layout, device, gen)
    params = mixer_params(shape[0], shape[1], dtype, device, names=PARAM_RANGES, requires_grad=True, seed=sum(shape))
    options = dict(num_groups=groups, pool_size=pool_size)
    call = mixer(lambda *a, **k: fused_poolformer.pool_mixer(*a, backend=backend, **k), **options)
    actual = forward_backward(call, x, params, grad_y)
    if device == "cuda":
        torch.cuda.synchronize()
    cpu = lambda t: t.detach().cpu()
    expected = reference_outputs(cpu(x), {k: cpu(v) for k, v in params.items()},
                                 cpu(grad_y), wanted=actual, **options)
    label = f"{backend:7s} {str(dtype)[6:]:9s} {layout:13s} x{tuple(shape)} G={groups} k={pool_size}"
    try:
        ratios = compare(backend, actual, expected, dtype)
    except ReferenceMismatch as exc:
        print(f"FAIL {label}  {exc}", flush=True)
        return False
    worst = " ".join(f"{k}={v:.2f}" for k, v in ratios.items())
    print(f"ok   {label}  error/allowed {worst}", flush=True)
    return True


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
    failures = total = 0
    for backend in backends:
        for shape, groups, pool_size in SHAPES:
            for dtype in DTYPES:
                for layout in ("contiguous", "channels_last"):
                    total += 1
                    failures += not run_case(backend, args.device, shape, groups, pool_size, dtype, layout)
    print(f"gpu_sanitize: {total - failures}/{total} cases match the float64 reference", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Small forward + backward runs of the fused CUDA kernels, for compute-sanitizer:

    compute-sanitizer --tool memcheck  python tests/gpu_sanitize.py
    compute-sanitizer --tool racecheck python tests/gpu_sanitize.py

One small case per layout (NCHW, channels_last) and dtype (float32, float64, float16,
bfloat16) and shape family (a plane smaller than the window, a prime-sized one with
several groups, one large enough to split each group over several blocks), every
optional vector given.  Each result is compared with the float64 unfused graph, so a
kernel that reads out of bounds or races shows up here even where the sanitizer's
report is missed.  Prints one line per case; exits 1 on any mismatch, 2 where there is
no CUDA device, 3 where no fused backend serves it.

Options: --backends cuda,triton (default: cuda, or every fused backend with "all");
--device cpu runs the same cases on the CPU backends (to check the script itself).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import TOL, make_inputs  # noqa: E402  (also puts the checkout on sys.path)
from hardening_utils import forward_backward, fused_backends, random_like, reference_forward_backward  # noqa: E402

from fused_poolformer import contract, ops  # noqa: E402

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# (shape, num_groups, pool_size)
SHAPES = (
    ((2, 3, 2, 3), 3, 9),  # plane smaller than the window
    ((2, 6, 7, 5), 2, 3),  # primes, H != W, several groups
    ((2, 16, 40, 36), 1, 5),  # one group of 23 K elements: split over several blocks
)


def max_error(actual, expected):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().item() if expected.numel() else 1.0
    return (actual - expected).abs().max().item() if expected.numel() else 0.0, scale


def run_case(backend, device, shape, groups, pool_size, dtype, channels_last):
    """True when y and every gradient match the float64 reference."""
    x, kw = make_inputs(shape, dtype, channels_last, seed=sum(shape), device=device)
    grad_y = random_like(x, 1).contiguous(memory_format=contract.dense_format(x))
    opts = dict(num_groups=groups, pool_size=pool_size)
    y, grads = forward_backward(ops.pool_mixer, x, kw, grad_y, backend=backend, **opts)
    if device == "cuda":
        torch.cuda.synchronize()
    y_ref, grads_ref = reference_forward_backward(x, kw, grad_y, **opts)
    ok, worst = True, []
    for name, actual, expected in [("y", y, y_ref)] + [(k, grads[k], grads_ref[k]) for k in sorted(grads)]:
        tol = TOL[actual.dtype]
        err, scale = max_error(actual, expected)
        good = err <= tol["atol"] + tol["rtol"] * scale
        ok &= good
        # The bias gradient is 0 (the reference's is rounding noise): show its absolute error.
        shown = err if name == "bias" else err / max(scale, 1e-30)
        worst.append(f"{name}={shown:.1e}{'' if good else '!'}")
    layout = "channels_last" if channels_last else "nchw"
    print(f"{'ok  ' if ok else 'FAIL'} {backend:7s} {str(dtype)[6:]:9s} {layout:13s} x{tuple(shape)} G={groups} "
          f"k={pool_size}  err/max {' '.join(worst)}", flush=True)
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="cuda", help="comma-separated fused backends, or 'all'")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize: no CUDA device", flush=True)
        return 2
    available = fused_backends(args.device)
    wanted = available if args.backends == "all" else args.backends.split(",")
    if args.device == "cpu" and args.backends == "cuda":
        wanted = available
    backends = [b for b in wanted if b in available]
    if not backends:
        print(f"gpu_sanitize: none of {wanted} serves {args.device} (available: {available})", flush=True)
        return 3
    print(f"gpu_sanitize: {torch.__version__}, device {args.device}"
          f"{' ' + torch.cuda.get_device_name() if args.device == 'cuda' else ''}, backends {backends}", flush=True)
    failures = total = 0
    for backend in backends:
        for shape, groups, pool_size in SHAPES:
            for dtype in DTYPES:
                for channels_last in (False, True):
                    total += 1
                    failures += not run_case(backend, args.device, shape, groups, pool_size, dtype, channels_last)
    print(f"gpu_sanitize: {total - failures}/{total} cases match the float64 reference", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

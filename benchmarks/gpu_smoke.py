"""The smoke run of the GPU check: does every fused kernel compute the right thing at the
shapes that matter?  Every PoolFormer-S12 stage shape (batch 64: 64x56x56, 128x28x28,
320x14x14, 512x7x7) in float32 and bfloat16, NCHW and channels_last, forward and forward +
backward, for each backend asked for, against the float64 unfused graph: one line per case
(PASS / FAIL with each tensor's largest error against its allowance, ERROR with the
exception, NOT-RUN after the device was lost), each also appended to --jsonl.

    CUDA_LAUNCH_BLOCKING=1 python benchmarks/gpu_smoke.py --backends cuda --jsonl smoke.jsonl
    python benchmarks/gpu_smoke.py --device cpu --backends cpu,triton --shape 2,8,6,6   # no GPU

Run each backend in its own process where one may lose the device (a sticky CUDA error
ends every later case of the process).  --device cpu runs Triton through its interpreter
(TRITON_INTERPRET=1 is set here, before the kernels are imported).

Exit status: 0 every case passed; 1 some case failed, raised or did not run; 2 no CUDA
device, or none of the backends serves the device.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shape(text: str):
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"--shape takes N,C,H,W (four positive integers), got {text!r}")
    return dims


def _csv(text: str):
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--backends", default="cuda,triton", help="comma list of fused backends (default cuda,triton)")
    parser.add_argument("--batch", type=int, default=64, help="batch of the stage shapes (default 64)")
    parser.add_argument("--shape", type=_shape, action="append", default=[], metavar="N,C,H,W",
                        help="a shape instead of the stage shapes (repeatable)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16,fp16,fp64")
    parser.add_argument("--layouts", default="contiguous,channels_last")
    parser.add_argument("--passes", default="fwd,bwd", help="fwd (no grad) and/or bwd (forward + backward)")
    parser.add_argument("--jsonl", metavar="PATH", help="append one JSON record per case")
    args = parser.parse_args(argv)
    for name, values, allowed in (("--dtypes", _csv(args.dtypes), ("fp32", "bf16", "fp16", "fp64")),
                                  ("--layouts", _csv(args.layouts), ("contiguous", "channels_last")),
                                  ("--passes", _csv(args.passes), ("fwd", "bwd"))):
        bad = [v for v in values if v not in allowed]
        if bad:
            parser.error(f"{name}: unknown {bad} (choose from {', '.join(allowed)})")
    if args.batch < 1:
        parser.error(f"--batch must be positive, got {args.batch}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":  # before the Triton kernels are defined
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if ROOT not in sys.path:  # run from a checkout without installing
        sys.path.insert(0, ROOT)
    import torch

    import fused_poolformer
    from fused_poolformer.bench import smoke

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device", flush=True)
        return 2
    available = fused_poolformer.available_backends(args.device)
    wanted = _csv(args.backends)
    backends = [b for b in wanted if b in available]
    for missing in (b for b in wanted if b not in available):
        print(f"gpu_smoke: backend {missing!r} does not serve {args.device} here (available: {available})",
              flush=True)
    if not backends:
        return 2
    shapes = args.shape or smoke.stage_shapes(args.batch)
    cases = smoke.smoke_cases(backends, shapes, _csv(args.dtypes), _csv(args.layouts), _csv(args.passes))
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"gpu_smoke: torch {torch.__version__}, {name}, backends {backends}, {len(cases)} cases, "
          f"CUDA_LAUNCH_BLOCKING={os.environ.get('CUDA_LAUNCH_BLOCKING', '0')}", flush=True)
    failures = smoke.run_cases(cases, args.device, smoke.line_writer(args.jsonl))
    print(f"gpu_smoke: {len(cases) - failures}/{len(cases)} cases pass", flush=True)
    return 1 if failures or len(backends) < len(wanted) else 0


if __name__ == "__main__":
    sys.exit(main())

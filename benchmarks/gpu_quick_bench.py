"""Minimal op-level GPU timing of the fused pool mixer (the fallback of gpu_check.sh when
fused_poolformer.bench is absent).

For (64, 64, 56, 56) and (64, 320, 14, 14), bf16 and fp32, NCHW and channels_last: forward
and forward + backward of the fused CUDA op, the eager unfused reference and torch.compile
of it; the byte floor of DESIGN.md section 5 (forward 3*E*s, backward 5*E*s bytes) from a
measured device-to-device copy bandwidth, and the fraction of the floor reached.

    python benchmarks/gpu_quick_bench.py --json out.json --markdown out.md [--no-compile]
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fused_poolformer as fp  # noqa: E402
from fused_poolformer import reference  # noqa: E402

SHAPES = [(64, 64, 56, 56), (64, 320, 14, 14)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def time_ms(fn, warmup=3, iters=20):
    """Median of CUDA-event timings of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth():
    """Bytes per second of a 1 GiB device-to-device copy, counting read + write."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, iters=10)
    return 2 * src.numel() / (ms * 1e-3)


def make_case(shape, dtype, channels_last):
    g = torch.Generator(device="cuda").manual_seed(0)
    c = shape[1]
    x = torch.randn(shape, generator=g, device="cuda").to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    params = {
        "weight": torch.rand(c, generator=g, device="cuda").to(dtype) + 0.5,
        "bias": torch.rand(c, generator=g, device="cuda").to(dtype) - 0.5,
        "layer_scale": torch.rand(c, generator=g, device="cuda").to(dtype) * 1e-2,
    }
    return x, params, torch.randn_like(x)


def variants(no_compile):
    def fused(x, p):
        return fp.pool_mixer(x, p["weight"], p["bias"], layer_scale=p["layer_scale"], backend="cuda")

    def eager(x, p):
        return reference.pool_mixer(x, p["weight"], p["bias"], layer_scale=p["layer_scale"])

    out = {"fused_cuda": fused, "eager": eager}
    if not no_compile:
        out["compile"] = torch.compile(eager, dynamic=False)
    return out


def measure(fn, x, params, dy):
    with torch.no_grad():
        fwd = time_ms(lambda: fn(x, params))
    xg = x.detach().clone().requires_grad_()
    pg = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    leaves = [xg] + list(pg.values())
    both = time_ms(lambda: torch.autograd.grad(fn(xg, pg), leaves, dy))
    return fwd, both


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    bandwidth = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"{device}: device-to-device copy {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    rows = []
    for shape in SHAPES:
        for dname, dtype in DTYPES.items():
            for channels_last in (False, True):
                x, params, dy = make_case(shape, dtype, channels_last)
                nbytes = x.numel() * x.element_size()
                floor_fwd = 3 * nbytes / bandwidth * 1e3
                floor_bwd = 5 * nbytes / bandwidth * 1e3
                row = dict(shape=list(shape), dtype=dname, layout="channels_last" if channels_last else "nchw",
                           floor_fwd_ms=floor_fwd, floor_bwd_ms=floor_bwd)
                for name, fn in variants(args.no_compile).items():
                    try:
                        fwd, both = measure(fn, x, params, dy)
                    except Exception as exc:  # one failing variant must not end the run
                        print(f"  {name} failed: {exc!r}", flush=True)
                        fwd = both = float("nan")
                    row[f"{name}_fwd_ms"], row[f"{name}_fwdbwd_ms"] = fwd, both
                fused_bwd = row["fused_cuda_fwdbwd_ms"] - row["fused_cuda_fwd_ms"]
                row["fused_fwd_floor_frac"] = floor_fwd / row["fused_cuda_fwd_ms"]
                row["fused_bwd_floor_frac"] = floor_bwd / fused_bwd if fused_bwd > 0 else float("nan")
                for ref in ("eager", "compile"):
                    if f"{ref}_fwdbwd_ms" in row:
                        row[f"speedup_vs_{ref}_fwdbwd"] = row[f"{ref}_fwdbwd_ms"] / row["fused_cuda_fwdbwd_ms"]
                rows.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    result = dict(device=device, torch=torch.__version__, copy_bandwidth_Bps=bandwidth,
                  time=time.strftime("%Y-%m-%d %H:%M:%S"), rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    lines = [
        f"# Fused pool mixer, {device}, torch {torch.__version__}",
        "",
        f"Copy bandwidth {bandwidth / 1e12:.2f} TB/s. Times in ms (median of 20). Floor: forward 3*E*s, "
        "backward 5*E*s bytes at that bandwidth. bwd = (fwd+bwd) - fwd.",
        "",
        "| shape | dtype | layout | fused fwd | floor % | fused bwd | floor % | fused f+b | eager f+b | compile f+b | vs eager | vs compile |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        fused_bwd = r["fused_cuda_fwdbwd_ms"] - r["fused_cuda_fwd_ms"]
        lines.append(
            f"| {tuple(r['shape'])} | {r['dtype']} | {r['layout']} | {r['fused_cuda_fwd_ms']:.3f} | "
            f"{100 * r['fused_fwd_floor_frac']:.0f}% | {fused_bwd:.3f} | {100 * r['fused_bwd_floor_frac']:.0f}% | "
            f"{r['fused_cuda_fwdbwd_ms']:.3f} | {r['eager_fwdbwd_ms']:.3f} | {r.get('compile_fwdbwd_ms', float('nan')):.3f} | "
            f"{r.get('speedup_vs_eager_fwdbwd', float('nan')):.2f}x | {r.get('speedup_vs_compile_fwdbwd', float('nan')):.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()

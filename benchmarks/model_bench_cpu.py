"""Model-level CPU benchmark: timm poolformer_s12, original vs converted (fused token mixers).

Measures inference latency (forward under inference_mode, eval) and training-step time
(forward + cross-entropy + backward + SGD step, train mode) for the unconverted model and
``fused_poolformer.convert.convert_model`` of it, with the same weights and inputs.  The
two models alternate iteration by iteration, so that drift in machine load (the CPU may be
shared) hits both alike; medians are reported next to minima.

Prints a table and writes benchmarks/results/cpu-model-<date>.md and .json, recording the
machine (lscpu model name, cores, torch threads), versions and the load average.

    python benchmarks/model_bench_cpu.py [--batch 8] [--size 224] [--iters 10] [--threads N]
"""

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

import timm  # noqa: E402

from fused_poolformer.convert import convert_model  # noqa: E402


def cpu_model_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def machine_info() -> dict:
    return {
        "cpu_model": cpu_model_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


def time_alternating(steps: dict, iters: int, warmup: int) -> dict:
    """Seconds per call of each zero-argument function, calls alternating between them."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times = {name: [] for name in steps}
    for _ in range(iters):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def inference_step(model, x):
    def step():
        with torch.inference_mode():
            model(x)

    return step


def training_step(model, x, target):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()

    return step


def unfused_mixer_branch(block, x):
    """The first residual branch of a timm MetaFormerBlock, as the original computes it."""
    return block.res_scale1(x) + block.layer_scale1(block.drop_path1(block.token_mixer(block.norm1(x))))


def block_inputs(model, names, x) -> list:
    """The input each named block receives in a forward of ``x``."""
    inputs = []
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
             for n in names]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    return [t.clone() for t in inputs]


def mixer_branches_step(branches: list, train: bool):
    """All token-mixer branches of a model, each on its own recorded input; with
    ``train`` also their backward (a unit cotangent per branch)."""
    inputs = [x.requires_grad_(train) for _, x in branches]

    def step():
        if not train:
            with torch.inference_mode():
                for (fn, _), x in zip(branches, inputs):
                    fn(x)
            return
        for (fn, _), x in zip(branches, inputs):
            fn(x).sum().backward()

    return step


def summarize(seconds: list) -> dict:
    return {"median_ms": 1e3 * statistics.median(seconds), "min_ms": 1e3 * min(seconds),
            "samples_ms": [round(1e3 * s, 3) for s in seconds]}


def run(batch: int, size: int, iters: int, warmup: int, model_name: str) -> dict:
    machine = machine_info()
    torch.manual_seed(0)
    original = timm.create_model(model_name, pretrained=False)
    converted = convert_model(original, backend="cpu")
    report = converted.fused_poolformer_report
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 1000, (batch,))

    original.eval()
    converted.eval()
    with torch.inference_mode():
        y_ref, y = original(x), converted(x)
        max_rel_diff = ((y - y_ref).abs().max() / y_ref.abs().max()).item()

    results = {}
    infer = time_alternating({"original": inference_step(original, x), "converted": inference_step(converted, x)},
                             iters, warmup)
    # Training mutates the weights: give each model its own copy so the two stay comparable.
    original_train, converted_train = copy.deepcopy(original).train(), copy.deepcopy(converted).train()
    train = time_alternating({"original": training_step(original_train, x, target),
                              "converted": training_step(converted_train, x, target)}, iters, warmup)
    # The part of the model the conversion changes: every token-mixer branch on its own.
    inputs = block_inputs(original, report.converted, x)
    branches = {
        "original": [(lambda t, b=original.get_submodule(n): unfused_mixer_branch(b, t), x) for n, x in
                     zip(report.converted, inputs)],
        "converted": [(converted.get_submodule(n).token_mixer_branch, x.clone()) for n, x in
                      zip(report.converted, inputs)],
    }
    # These are short: three times the iterations for steadier medians.
    mixer_infer = time_alternating({k: mixer_branches_step(v, False) for k, v in branches.items()}, 3 * iters, warmup)
    mixer_train = time_alternating({k: mixer_branches_step(v, True) for k, v in branches.items()}, 3 * iters, warmup)
    for mode, times in (("inference", infer), ("training_step", train),
                        ("mixer_branches_forward", mixer_infer), ("mixer_branches_forward_backward", mixer_train)):
        orig, conv = summarize(times["original"]), summarize(times["converted"])
        results[mode] = {"original": orig, "converted": conv, "speedup": orig["median_ms"] / conv["median_ms"]}
    return {
        "benchmark": "model_bench_cpu",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model_name,
        "input": [batch, 3, size, size],
        "dtype": "float32",
        "iters": iters,
        "warmup": warmup,
        "blocks_converted": len(report.converted),
        "blocks_skipped": len(report.skipped),
        "max_rel_output_diff": max_rel_diff,
        "machine": machine,
        "results": results,
        "load_average_at_end": os.getloadavg(),
    }


def markdown(record: dict) -> str:
    m = record["machine"]
    lines = [
        f"# CPU model benchmark: {record['model']} original vs converted ({record['date_utc']})",
        "",
        f"- Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs, torch threads {m['torch_threads']}",
        f"- torch {m['torch']}, timm {m['timm']}, Python {m['python']}",
        f"- Input {tuple(record['input'])} {record['dtype']}; {record['iters']} timed iterations after "
        f"{record['warmup']} warm-up (mixer branches: {3 * record['iters']}), original and converted alternating",
        f"- Converted blocks: {record['blocks_converted']} (skipped {record['blocks_skipped']}); "
        f"max relative output difference {record['max_rel_output_diff']:.2e}",
        f"- Load average (1, 5, 15 min) at start {tuple(round(v, 2) for v in m['load_average_at_start'])}, "
        f"at end {tuple(round(v, 2) for v in record['load_average_at_end'])} (the machine may be shared)",
        "",
        "| mode | original median (min) ms | converted median (min) ms | speedup (median) |",
        "| --- | --- | --- | --- |",
    ]
    for mode, r in record["results"].items():
        o, c = r["original"], r["converted"]
        lines.append(f"| {mode} | {o['median_ms']:.1f} ({o['min_ms']:.1f}) | {c['median_ms']:.1f} ({c['min_ms']:.1f}) "
                     f"| {r['speedup']:.3f}x |")
    lines += ["", "Inference: forward under torch.inference_mode, eval. Training step: zero_grad, forward, "
              "cross-entropy, backward, SGD(momentum) step, train mode (drop path rate 0). "
              "Mixer branches: the part the conversion changes -- every block's norm1 -> pool - x -> "
              "layer scale -> residual add, each on the input that block receives in the model, summed over "
              "the blocks (forward under inference_mode; forward + backward with parameter gradients).", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="poolformer_s12")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    record = run(args.batch, args.size, args.iters, args.warmup, args.model)
    text = markdown(record)
    print(text)
    if not args.no_save:
        os.makedirs(args.out_dir, exist_ok=True)
        stem = os.path.join(args.out_dir, f"cpu-model-{record['date_utc'][:10]}")
        with open(stem + ".md", "w") as f:
            f.write(text)
        with open(stem + ".json", "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {stem}.md and {stem}.json")
    return record


if __name__ == "__main__":
    main()

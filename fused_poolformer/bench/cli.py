"""The command line: ``python -m fused_poolformer.bench`` / ``fused-poolformer-bench``.

    python -m fused_poolformer.bench --device cpu --quick --json out.json
    fused-poolformer-bench --device cuda --parts host,ops --markdown out.md --plot out.png
    python -m fused_poolformer.bench --gpu-notes benchmarks/results/GPU_NOTES.md --notes-run LABEL=run.json

Parts, in the order they run: ``host`` (host overhead of the operator on a tiny tensor),
``ops`` (the stage shapes, three timings per row) and ``models`` (timm PoolFormers).
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from .. import flops
from . import costs, notes, report, timing
from .host_overhead import host_overhead_rows
from .inputs import DTYPES, LAYOUTS
from .model_level import MODEL_IMPLS, MODELS, run_models, warm_compile_models
from .op_level import (BASELINE_IMPLS, CASE_ORDERS, FUSED_PREFIX, STAGE_SHAPES, default_fused_impls, known_impls,
                       run_ops, warm_compile_ops)

PARTS = ("host", "ops", "models")


@dataclass
class Config:
    device: str
    parts: List[str]
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
    model_dtype: str
    model_layouts: List[str]
    model_image_size: int = 224
    compile_backend: str = "inductor"
    deadline: Optional[float] = None
    progress: bool = True
    notes: List[str] = field(default_factory=list)
    case_order: str = "shape"
    baseline_json: Optional[str] = None
    ready_file: Optional[str] = None
    go_file: Optional[str] = None
    time_budget: Optional[float] = None
    inject_mismatch: List[str] = field(default_factory=list)
    inject_kill_after_rows: Optional[int] = None
    _budget_started: bool = False

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def signal_ready(self, info: dict) -> None:
        """Writes ``ready_file`` (what was warmed, seconds each), when there is one."""
        if self.ready_file:
            report.write_text(self.ready_file, json.dumps(info, indent=1) + "\n")

    def go_given(self) -> bool:
        """Whether ``go_file`` exists (False without one)."""
        return bool(self.go_file) and os.path.exists(self.go_file)

    def start_budget(self) -> None:
        """Starts the time budget now (once): a process that warms up first and waits for
        ``go_file`` spends its budget on timing only."""
        if not self._budget_started:
            self._budget_started = True
            if self.time_budget is not None:
                self.deadline = time.monotonic() + self.time_budget

    def wait_for_go(self, poll_s: float = 0.1) -> None:
        """Blocks until ``go_file`` exists, then starts the time budget."""
        if not self.go_file:
            return
        if not self.go_given():
            self.say(f"waiting for {self.go_file}")
        while not self.go_given():
            time.sleep(poll_s)
        self.start_budget()

    def say(self, text: str) -> None:
        """What is being measured now, on stderr (a compile can take a while)."""
        if self.progress:
            print(f"... {text}", file=sys.stderr, flush=True)


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


def _model_list(option: str, text: Optional[str], default: Sequence[str]) -> List[str]:
    if text is None:
        return list(default)
    if text in ("all", "none"):
        return list(MODELS) if text == "all" else []
    names = [t if t.startswith("poolformer_") else f"poolformer_{t}" for t in _csv(text)]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"{option}: unknown model {unknown[0]!r} (choose from {', '.join(MODELS)}, all, none)")
    return names


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fused-poolformer-bench",
        description="Fused vs unfused vs torch.compile: host overhead, bytes, FLOPs, MACs and latency of the "
                    "PoolFormer token mixer, at op and model level.")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--quick", action="store_true", help="a reduced set (about 3 minutes on a 2-core CPU)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (default: all)")
    p.add_argument("--ops-only", action="store_true", help="= --parts host,ops")
    p.add_argument("--models-only", action="store_true", help="= --parts models")
    p.add_argument("--warm-compile", action="store_true",
                   help="only compile the torch.compile baselines of the chosen ops and models once (no timing), "
                        "so the compile caches are warm for a timing run that follows")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="start no new op case or model layout after S seconds (what is left is noted as skipped)")
    g = p.add_argument_group("op level")
    g.add_argument("--batch", type=int, default=None, help="batch of the stage shapes (default: 8 CPU, 64 GPU)")
    g.add_argument("--shape", type=_parse_shape, action="append", default=[], metavar="N,C,H,W",
                   help="an extra op shape (repeatable)")
    g.add_argument("--stages", default=None,
                   help="PoolFormer-S12 stages: comma list of 0-3, 'all' or 'none' (default all; quick CPU: 0,3)")
    g.add_argument("--dtypes", default=None,
                   help="comma list of fp32,bf16,fp16,fp64 (default: fp32 CPU, fp32,bf16 GPU)")
    g.add_argument("--layouts", default=None,
                   help="comma list of contiguous,channels_last (default: both; quick CPU: contiguous)")
    g.add_argument("--passes", default="fwd,fwd+bwd", help="comma list of fwd,fwd+bwd")
    g.add_argument("--impls", default=None,
                   help=f"comma list of {','.join(known_impls())} (fused-<backend>, one per fused backend of "
                        "fused_poolformer/backends.py; default: eager, every fused backend the device runs, compile)")
    g.add_argument("--no-compile", action="store_true", help="leave out torch.compile (op and model level)")
    g.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the baselines (default inductor; aot_eager checks the plumbing fast)")
    g.add_argument("--min-run-time", type=float, default=None, help="seconds of timing per op row and method")
    g.add_argument("--case-order", choices=CASE_ORDERS, default="shape",
                   help="shape: shape by shape (default); variant: every shape of one dtype and layout before the "
                        "next (a run cut short still covers every shape)")
    g.add_argument("--baseline-json", metavar="PATH",
                   help="eager / compile rows of a recorded op run: the speed-ups of implementations timed now")
    g = p.add_argument_group("model level")
    g.add_argument("--models", default=None,
                   help="comma list of s12,s24,s36,m36,m48, 'all' or 'none' (default all; quick: s12)")
    g.add_argument("--latency-models", default=None,
                   help="models whose latency and memory are measured, the others get params and MACs only "
                        "(default: all; quick: s12)")
    g.add_argument("--compile-models", default=None,
                   help="models that also get torch.compile variants (default: s12; none for a quick CPU run)")
    g.add_argument("--model-impls", default=None,
                   help=f"comma list of {', '.join(MODEL_IMPLS)} (default: all; mixer / block: "
                        "convert_model(fuse=...), a form the installed convert_model cannot build is a row that "
                        "says 'unavailable')")
    g.add_argument("--model-batch", type=int, default=None, help="default: 4 CPU (quick 2), 64 GPU")
    g.add_argument("--model-reps", type=int, default=None, help="interleaved repetitions (default: 5 CPU, 20 GPU)")
    g.add_argument("--model-dtype", default=None, choices=("fp32", "bf16", "fp16"),
                   help="bf16/fp16: autocast (default: fp32 CPU, bf16 GPU)")
    g.add_argument("--model-layouts", default=None,
                   help="comma list of contiguous,channels_last (default: both)")
    g.add_argument("--model-image-size", type=int, default=224, help="input resolution of the timed models")
    g.add_argument("--ready-file", metavar="PATH",
                   help="models: build and warm (compile) every timed variant first, then write PATH")
    g.add_argument("--go-file", metavar="PATH",
                   help="models: after warming, wait until PATH exists before timing (the time budget starts then)")
    g = p.add_argument_group("output")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's); 1 gives steadier numbers on a busy machine")
    g.add_argument("--json", metavar="PATH", help="write the results as JSON (updated as rows are measured)")
    g.add_argument("--markdown", metavar="PATH", help="write the results as Markdown (updated as rows are measured)")
    g.add_argument("--plot", metavar="PATH", help="write a PNG: speedup over eager and fraction of the floor")
    g.add_argument("--no-progress", action="store_true", help="no '... measuring' lines on stderr")
    # Fault injection for the tests of benchmarks/gpu_check.sh (tests/test_gpu_check.py): a
    # fused implementation whose outputs miss the reference, a process killed mid-run.
    g.add_argument("--inject-mismatch", default="", help=argparse.SUPPRESS)
    g.add_argument("--inject-kill-after-rows", type=int, default=None, help=argparse.SUPPRESS)
    g = p.add_argument_group("GPU notes (no benchmark is run)")
    g.add_argument("--gpu-notes", metavar="PATH", help="write the floor / predicted / measured tables into PATH")
    g.add_argument("--notes-run", action="append", default=[], metavar="LABEL=JSON",
                   help="a recorded run (repeatable; the same label merges files); the last one's copy "
                        "bandwidth sets the floor column, each run's % of the floor uses its own")
    g.add_argument("--notes-bandwidth", type=float, default=None, metavar="GBS", help="floor bandwidth override")
    return p


def _default_impls(device: str) -> List[str]:
    # Eager first (every row is compared with it), compile last (it compiles first).
    return ["eager"] + default_fused_impls(device) + ["compile"]


def _parts(args) -> List[str]:
    parts = ["host", "ops"] if args.ops_only else ["models"] if args.models_only else _csv(args.parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown} (choose from {', '.join(PARTS)})")
    return parts


def make_config(args: argparse.Namespace) -> Config:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    gpu = device == "cuda"
    quick_cpu = args.quick and not gpu
    batch = args.batch or (64 if gpu else 8)
    stage_ids = _stage_ids(args.stages or ("0,3" if quick_cpu else "all"))
    shapes = [(batch, STAGE_SHAPES[i][0], STAGE_SHAPES[i][1], STAGE_SHAPES[i][1]) for i in stage_ids] + args.shape
    impls = _csv(args.impls) if args.impls else _default_impls(device)
    model_impls = _csv(args.model_impls) if args.model_impls else list(MODEL_IMPLS)
    if args.no_compile:
        impls = [i for i in impls if i != "compile"]
        model_impls = [i for i in model_impls if not i.endswith("+compile")]
    cfg = Config(
        device=device,
        parts=_parts(args),
        batch=batch,
        shapes=shapes,
        dtypes=_csv(args.dtypes or ("fp32,bf16" if gpu else "fp32")),
        layouts=_csv(args.layouts or ("contiguous" if quick_cpu else "contiguous,channels_last")),
        passes=_csv(args.passes),
        impls=impls,
        min_run_time=args.min_run_time or (0.1 if gpu or args.quick else 0.5),
        models=_model_list("--models", args.models, ["poolformer_s12"] if args.quick else MODELS),
        latency_models=_model_list("--latency-models", args.latency_models,
                                   ["poolformer_s12"] if args.quick else MODELS),
        compile_models=_model_list("--compile-models", args.compile_models, [] if quick_cpu else ["poolformer_s12"]),
        model_impls=model_impls,
        model_batch=args.model_batch or (64 if gpu else (2 if args.quick else 4)),
        model_reps=args.model_reps or (20 if gpu else 5),
        model_dtype=args.model_dtype or ("bf16" if gpu else "fp32"),
        model_layouts=_csv(args.model_layouts or "contiguous,channels_last"),
        model_image_size=args.model_image_size,
        compile_backend=args.compile_backend,
        deadline=None if args.time_budget is None or args.go_file else time.monotonic() + args.time_budget,
        progress=not args.no_progress,
        case_order=args.case_order,
        baseline_json=args.baseline_json,
        ready_file=args.ready_file,
        go_file=args.go_file,
        time_budget=args.time_budget,
        inject_mismatch=_csv(args.inject_mismatch),
        inject_kill_after_rows=args.inject_kill_after_rows,
    )
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    for name, values, allowed in (("--dtypes", cfg.dtypes, DTYPES), ("--layouts", cfg.layouts, LAYOUTS),
                                  ("--passes", cfg.passes, costs.PASSES), ("--impls", cfg.impls, known_impls()),
                                  ("--model-impls", cfg.model_impls, MODEL_IMPLS),
                                  ("--model-layouts", cfg.model_layouts, LAYOUTS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise SystemExit(f"{name}: unknown {bad} (choose from {', '.join(allowed)})")
    if cfg.baseline_json and not os.path.isfile(cfg.baseline_json):
        raise SystemExit(f"--baseline-json: no such file {cfg.baseline_json!r}")
    # Baselines run around the fused rows: eager first, compile last.
    cfg.impls = sorted(cfg.impls, key=lambda i: (i != BASELINE_IMPLS[0], i == BASELINE_IMPLS[1]))


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def _git_revision() -> Optional[str]:
    """The checkout's commit (and -dirty), so a recorded run names the kernels it timed;
    None for an installed copy outside a checkout."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.isfile(os.path.join(root, "setup.py")):
        return None
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _load_average() -> Optional[float]:
    """The 1-minute load average: other processes on the machine scatter CPU timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run(cfg: Config, command: str, recorder_paths=(None, None)) -> dict:
    results = dict(device=machine(cfg.device), device_type=cfg.device, torch=torch.__version__, git=_git_revision(),
                   timestamp=datetime.datetime.now().isoformat(timespec="seconds"), command=command,
                   copy_bandwidth_gbs=None, load_average=[_load_average()], notes=cfg.notes)
    recorder = report.Recorder(results, *recorder_paths)
    if cfg.inject_kill_after_rows is not None:
        _die_after_rows(recorder, cfg.inject_kill_after_rows)
    if "host" in cfg.parts:
        # The fused implementations asked for (a GPU check's core leaves Triton, which would
        # compile its kernels here, to a later step); none asked for: every one the device runs.
        fused = [i for i in cfg.impls if i.startswith(FUSED_PREFIX)]
        host_overhead_rows(cfg.device, recorder.emit, fused=fused or None)
    if "ops" in cfg.parts and cfg.shapes:
        results["copy_bandwidth_gbs"] = timing.copy_bandwidth_gbs(cfg.device, cfg.min_run_time)
        run_ops(cfg, results["copy_bandwidth_gbs"], recorder.emit)
    if "models" in cfg.parts and cfg.models:
        if not flops.fvcore_available():
            cfg.notes.append("fvcore is not installed: MACs come from torch.utils.flop_counter "
                             "(convolutions and matmuls only)")
        run_models(cfg, recorder.emit)
    results["load_average"].append(_load_average())
    recorder.save()
    return results


def _die_after_rows(recorder: report.Recorder, rows: int) -> None:
    """--inject-kill-after-rows (tests only): SIGKILL this process once ``rows`` op or model
    rows are written, as a step killed outright would be."""
    emit = recorder.emit

    def emit_then_die(section: str, row: dict) -> None:
        emit(section, row)
        if len(recorder.results["ops"]) + len(recorder.results["models"]) >= rows:
            print(f"--inject-kill-after-rows {rows}: killing this process", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    recorder.emit = emit_then_die


def warm_compile(cfg: Config) -> int:
    seconds = {}
    if "ops" in cfg.parts and "compile" in cfg.impls:
        seconds.update(warm_compile_ops(cfg))
    if "models" in cfg.parts:
        seconds.update(warm_compile_models(cfg))
    print(f"compiled {len(seconds)} baselines in {sum(seconds.values()):.0f} s")  # each printed as it was done
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "-m", "fused_poolformer.bench"] + argv)
    if args.gpu_notes:
        notes.write_notes(args.gpu_notes, args.notes_run, args.notes_bandwidth, command)
        print(f"wrote {args.gpu_notes}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = make_config(args)
    start = time.perf_counter()
    if args.warm_compile:
        return warm_compile(cfg)
    results = run(cfg, command, (args.json, args.markdown))
    results["wall_s"] = time.perf_counter() - start
    print("\n" + report.render_text(results))
    print(f"({results['wall_s']:.0f} s)")
    if args.json or args.markdown:
        report.Recorder(results, args.json, args.markdown).save()
    if args.plot and results["ops"]:
        report.write_plot(results, args.plot)
    return 1 if failures(results) else 0


def failures(results: dict) -> List[str]:
    """What failed in a run (every row was still written): op rows that missed the
    reference or raised, model variants whose output differs from the original's or that
    raised (an "unavailable" form is not a failure)."""
    out = report.failed_rows(results)  # op rows and model rows that raised
    for r in results.get("models", []):
        if r.get("output_matches") is False:
            out.append(f"{r['model']} {r['layout']} {r['impl']}: output differs from the original by "
                       f"{r['max_rel_output_diff']:.2e}")
    return out

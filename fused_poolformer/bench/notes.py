"""The GPU notes: per PoolFormer-S12 stage shape (batch 64, fp32 and bf16) the byte floor
at a recorded copy bandwidth, the time each recorded kernel version measured, and the
time the cost model predicts for the kernels being written -- so the next person with a
GPU starts where the last one stopped.

    python -m fused_poolformer.bench --gpu-notes benchmarks/results/GPU_NOTES.md \\
        --notes-run "2026-11-26 kernels=benchmarks/results/NVIDIA-H200-2026-11-26-ops-nocompile.json"

The tables are written between two marker lines; the rest of the file (hand-written
observations) is kept as it is.
"""

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from . import costs
from .inputs import DTYPES
from .op_level import STAGE_SHAPES
from .report import write_text

BEGIN = "<!-- begin generated tables: python -m fused_poolformer.bench --gpu-notes (do not edit by hand) -->"
END = "<!-- end generated tables -->"
BATCH = 64
NOTE_DTYPES = ("fp32", "bf16")
LAYOUTS = (("contiguous", "NCHW"), ("channels_last", "CL"))
FUSED_IMPL = "fused-cuda"
HEADER = """# GPU notes

Where the CUDA kernels stand against the byte floor, per stage shape and kernel version.
Measured columns come from recorded runs of `benchmarks/gpu_check.sh`; predicted columns
from the cost model in `fused_poolformer/bench/costs.py` (regenerate with the command in
the generated section's first line).
"""


def parse_run(spec: str) -> Tuple[str, str]:
    """"LABEL=PATH" -> (label, path); a bare PATH is labelled by its file name."""
    label, sep, path = spec.partition("=")
    if not sep:
        path, label = spec, os.path.splitext(os.path.basename(spec))[0]
    if not os.path.isfile(path):
        raise SystemExit(f"--notes-run: no such file {path!r}")
    return label, path


def load_runs(specs: Sequence[str]) -> List[Tuple[str, dict]]:
    """(label, results) per run; runs with the same label (say, the two files of one
    recorded session) are merged."""
    runs: Dict[str, dict] = {}
    for spec in specs:
        label, path = parse_run(spec)
        with open(path) as f:
            results = json.load(f)
        merged = runs.setdefault(label, {"ops": [], "copy_bandwidth_gbs": results.get("copy_bandwidth_gbs"),
                                         "device": results.get("device")})
        merged["ops"] += results.get("ops", [])
    return list(runs.items())


def measured(results: dict, shape, dtype: str, layout: str, pass_: str) -> Optional[Tuple[Optional[float], str]]:
    """(ms, method) of the fused CUDA row: the graph-replay (device) time where the run has
    one, else the eager-loop (host + device) median; a row that missed the reference says
    so in the method ("loop, MISMATCH"), one that raised is (None, "ERROR")."""
    for r in results["ops"]:
        if (r["impl"] == FUSED_IMPL and tuple(r["shape"]) == tuple(shape) and r["dtype"] == dtype
                and r["layout"] == layout and r["pass"] == pass_):
            status = r.get("status", "ok")
            if status == "error" or not (r.get("graph_ms") or r.get("median_ms")):
                return None, "ERROR" if status == "error" else "no time"
            ms, method = (r["graph_ms"], "graph") if r.get("graph_ms") else (r["median_ms"], "loop")
            return ms, method if status == "ok" else f"{method}, {status.upper()}"
    return None


def _us(ms: Optional[float]) -> str:
    return "-" if ms is None else f"{ms * 1e3:.1f}"


def _measured_cell(results: dict, shape, dtype: str, pass_: str, floor: float) -> str:
    """The fused CUDA times of a run in both layouts, each with the % of ``floor`` (the
    floor at that run's own copy bandwidth, where it recorded one)."""
    if results.get("copy_bandwidth_gbs"):
        nbytes = costs.fused_bytes(shape, costs.element_size(DTYPES[dtype]), pass_)
        floor = costs.floor_ms(nbytes, results["copy_bandwidth_gbs"])
    cells = []
    for layout, short in LAYOUTS:
        m = measured(results, shape, dtype, layout, pass_)
        if m is None:
            cells.append(f"{short} -")
        elif m[0] is None:
            cells.append(f"{short} {m[1]}")
        else:
            cells.append(f"{short} {_us(m[0])} ({100 * floor / m[0]:.0f}%, {m[1]})")
    return " / ".join(cells)


def notes_tables(runs: List[Tuple[str, dict]], bandwidth_gbs: float, bandwidth_source: str,
                 target: costs.KernelTarget = costs.VECTORIZED_CUDA) -> str:
    shapes = [(BATCH, c, h, h) for c, h in STAGE_SHAPES]
    lines = [
        f"Copy bandwidth {bandwidth_gbs:.1f} GB/s (read + write), from {bandwidth_source}. Times in µs. "
        "Floor = fused bytes (forward 3·E·s, backward 5·E·s) / bandwidth. "
        "Measured: the fused CUDA op, `graph` = CUDA-graph replay (device only), `loop` = eager loop "
        "(host + device), with the % of the floor at that run's own copy bandwidth; where a label merges runs, "
        "the first file's row. "
        f"Predicted: {target.name}: the floor / {target.floor_fraction['fwd']:.0%} forward, "
        f"/ {target.floor_fraction['bwd']:.0%} backward, plus {target.launches['fwd']} + {target.launches['bwd']} "
        f"launches x {target.launch_us:g} µs.", ""]
    header = ["shape", "dtype", "pass", "MB moved", "floor µs", f"{target.name}: predicted µs"]
    header += [f"{label}: measured µs" for label, _ in runs]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for shape in shapes:
        for dtype in NOTE_DTYPES:
            size = costs.element_size(DTYPES[dtype])
            for pass_ in costs.PASSES:
                nbytes = costs.fused_bytes(shape, size, pass_)
                floor = costs.floor_ms(nbytes, bandwidth_gbs)
                cells = ["x".join(map(str, shape)), dtype, pass_, f"{nbytes / 1e6:.1f}", _us(floor),
                         _us(costs.predicted_ms(shape, size, pass_, bandwidth_gbs, target))]
                cells += [_measured_cell(results, shape, dtype, pass_, floor) for _, results in runs]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_notes(path: str, run_specs: Sequence[str], bandwidth_gbs: Optional[float] = None,
                command: str = "") -> str:
    """Writes (or updates between the markers) the notes file; returns its text."""
    runs = load_runs(run_specs)
    recorded = [(r["copy_bandwidth_gbs"], f"the run '{label}' ({r['device']})") for label, r in runs
                if r.get("copy_bandwidth_gbs")]
    # The newest run (the last given) sets the floor: a run on another GPU measures its own.
    bandwidth, source = (bandwidth_gbs, "--notes-bandwidth") if bandwidth_gbs else (recorded or [(None, None)])[-1]
    if bandwidth is None:
        raise SystemExit("--gpu-notes needs a recorded run (--notes-run) or --notes-bandwidth")
    generated = "\n".join([BEGIN, "", f"`{command}`" if command else "", "",
                           notes_tables(runs, bandwidth, source), "", END])
    text = HEADER + "\n" + generated + "\n"
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if BEGIN in old and END in old:
            text = old[:old.index(BEGIN)] + generated + old[old.index(END) + len(END):]
    write_text(path, text)
    return text

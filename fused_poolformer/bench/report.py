"""Reports: rows printed as they are measured, text and Markdown tables, JSON, the plot.

:class:`Recorder` collects the rows of a run; each row is printed (flushed) the moment it
is measured and the JSON / Markdown files are rewritten, so a run cut short by a timeout
still leaves every row it measured.
"""

import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:.0f}"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.3g}"
    return str(value)


def _times(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _shape(r) -> str:
    return "x".join(map(str, r["shape"]))


def _graph(r) -> str:
    return fmt(r["graph_ms"]) if r.get("graph_ms") else "n/a"


def _status(r) -> str:
    """ok, or MISMATCH / ERROR in capitals (rows recorded before statuses existed: ok)."""
    status = r.get("status", "ok")
    return status if status == "ok" else status.upper()


HOST_COLUMNS = (
    ("device", "device"), ("shape", _shape), ("pass", "pass"), ("impl", "impl"), ("median us", "median_us"),
    ("IQR us", lambda r: f"{fmt(r['q25_us'])}-{fmt(r['q75_us'])}"),
    ("vs group_norm", lambda r: _times(r["vs_group_norm"])),
    ("operator calls", "operator_calls"), ("top-level", "top_level_calls"),
)
OP_COLUMNS = (
    ("shape", _shape), ("dtype", "dtype"), ("layout", "layout"), ("pass", "pass"), ("impl", "impl"),
    ("loop ms", "median_ms"), ("IQR ms", lambda r: f"{fmt(r['q25_ms'])}-{fmt(r['q75_ms'])}"),
    ("graph ms", _graph), ("kernels ms", "kernel_ms"), ("launches", "kernel_launches"), ("floor ms", "floor_ms"),
    ("% floor loop", lambda r: _percent(r["frac_floor"])), ("% floor graph", lambda r: _percent(r["frac_floor_graph"])),
    ("vs eager", lambda r: _times(r.get("speedup_vs_eager"))),
    ("vs compile", lambda r: _times(r.get("speedup_vs_compile"))),
    ("graph vs compile", lambda r: _times(r.get("device_speedup_vs_compile"))),
    ("MB (model)", lambda r: None if r["bytes"] is None else r["bytes"] / 1e6), ("MFLOP", lambda r: r["flops"] / 1e6),
    ("compile s", "compile_s"), ("checked", "checked"), ("status", _status),
)
SUMMARY_COLUMNS = (
    ("shape", _shape), ("dtype", "dtype"), ("layout", "layout"), ("pass", "pass"), ("fused", "impl"),
    ("floor ms", "floor_ms"), ("eager ms", "eager_ms"), ("compile ms", "compile_ms"), ("fused ms", "median_ms"),
    ("fused graph ms", _graph), ("% floor graph", lambda r: _percent(r["frac_floor_graph"])),
    ("% floor loop", lambda r: _percent(r["frac_floor"])),
    ("vs eager", lambda r: _times(r.get("speedup_vs_eager"))),
    ("vs compile", lambda r: _times(r.get("speedup_vs_compile"))), ("status", _status),
)
def _mb(value) -> Optional[float]:
    return None if value is None else value / 2**20


MODEL_COLUMNS = (
    ("model", "model"), ("layout", "layout"), ("impl", "impl"), ("params M", "params_m"), ("MACs G", "macs_g"),
    ("paper G", "paper_macs_g"),
    ("vs paper", lambda r: "-" if r.get("macs_vs_paper_pct") is None else f"{r['macs_vs_paper_pct']:+.1f}%"),
    ("counter", "macs_counter"), ("dtype", "dtype"), ("batch", "batch"), ("infer ms", "infer_ms"),
    ("infer x orig", lambda r: _times(r.get("infer_speedup_vs_original"))),
    ("infer x orig+c", lambda r: _times(r.get("infer_speedup_vs_original_compile"))),
    ("train step ms", "train_step_ms"),
    ("train x orig", lambda r: _times(r.get("train_step_speedup_vs_original"))),
    ("train x orig+c", lambda r: _times(r.get("train_step_speedup_vs_original_compile"))),
    ("saved MB", lambda r: _mb(r.get("saved_bytes"))),
    ("saved / orig", lambda r: _times(r.get("saved_vs_original"))),
    ("saved / orig+c", lambda r: _times(r.get("saved_vs_original_compile"))),
    ("train peak MB", "peak_mem_mb"), ("mixer fwd ms", "mixer_fwd_ms"), ("mixer f+b ms", "mixer_fwd_bwd_ms"),
    ("first calls s", "first_calls_s"), ("output diff", "max_rel_output_diff"), ("status", _status),
)
COLUMNS = {"host": HOST_COLUMNS, "ops": OP_COLUMNS, "models": MODEL_COLUMNS}
TITLES = {
    "host": "host overhead (per call, one thread; operator calls: torch.profiler operator events, nested included)",
    "ops": "op level (pool size 3, GroupNorm(1) weight+bias, layer scale; loop = eager loop, host + device; "
           "graph = CUDA-graph replay, device only; kernels = torch.profiler per call)",
    "models": "model level (MACs at 1x3x224x224; mixer / block = convert_model(fuse='mixer' / 'block'); x orig, "
              "x orig+c = speed-up over the original eager / original + torch.compile, same layout; saved = bytes "
              "of the storages the training forward saves for the backward, parameters included)",
}


def _cell(get, row) -> str:
    return fmt(get(row) if callable(get) else row.get(get))


def _cells(columns, rows) -> Tuple[List[str], List[List[str]]]:
    return [c[0] for c in columns], [[_cell(get, r) for _, get in columns] for r in rows]


def text_table(columns, rows) -> str:
    header, body = _cells(columns, rows)
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


def markdown_table(columns, rows) -> str:
    header, body = _cells(columns, rows)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(b) + " |" for b in body])


def summary_rows(op_rows: Sequence[dict]) -> List[dict]:
    """One row per case and fused implementation: its times next to eager and
    torch.compile on the same inputs, and the fraction of the byte floor."""
    baselines: Dict[tuple, Dict[str, float]] = {}
    for r in op_rows:
        key = (tuple(r["shape"]), r["dtype"], r["layout"], r["pass"])
        baselines.setdefault(key, {})[r["impl"]] = r["median_ms"]
    out = []
    for r in op_rows:
        if r["impl"].startswith("fused"):
            base = baselines[(tuple(r["shape"]), r["dtype"], r["layout"], r["pass"])]
            out.append(dict(r, eager_ms=base.get("eager"), compile_ms=base.get("compile")))
    return out


def _preamble(results: dict) -> List[str]:
    lines = [f"device: {results['device']}  |  torch {results['torch']}  |  {results['timestamp']}"
             + (f"  |  git {results['git']}" if results.get("git") else "")]
    if results.get("copy_bandwidth_gbs"):
        load = results.get("load_average") or [None, None]
        lines.append(f"copy bandwidth (read + write): {results['copy_bandwidth_gbs']:.1f} GB/s  |  "
                     f"1-min load average at start/end: {fmt(load[0])}/{fmt(load[-1])} on {os.cpu_count()} CPUs")
    if results.get("ops"):
        lines.append("floor = fused bytes (docs/performance.md: fwd 3*E*s, bwd 5*E*s) / copy bandwidth; "
                     "% floor = floor / time; MB (model): bytes each form moves by that model "
                     "(eager fwd 13*E*s, bwd 20*E*s; compile not modelled)")
        methods = sorted({r["kernel_method"] for r in results["ops"] if r.get("kernel_method")})
        lines.append("kernels: " + "; ".join(methods))
    return lines


def failed_rows(results: dict) -> List[str]:
    """One line per op row whose status is not ok (the case, the implementation, the
    error), and per model row that raised."""
    out = [f"{_shape(r)} {r['dtype']} {r['layout']} {r['pass']} {r['impl']}: {_status(r)}: {r.get('error')}"
           for r in results.get("ops", []) if r.get("status", "ok") != "ok"]
    out += [f"{r['model']} {r['layout']} {r['impl']}: ERROR: {r.get('error')}"
            for r in results.get("models", []) if r.get("status") == "error"]
    return out


def unavailable_rows(results: dict) -> List[str]:
    """One line per model variant that could not be built (not a failure)."""
    seen = dict.fromkeys(f"{r['model']} {r['impl']}: {r.get('error')}" for r in results.get("models", [])
                         if r.get("status") == "unavailable")
    return list(seen)


def render_text(results: dict) -> str:
    parts = _preamble(results)
    if results.get("ops"):
        parts += ["", "fused vs eager vs torch.compile (same inputs)",
                  text_table(SUMMARY_COLUMNS, summary_rows(results["ops"]))]
    for section in ("host", "ops", "models"):
        if results.get(section):
            parts += ["", TITLES[section], text_table(COLUMNS[section], results[section])]
    parts += [f"failed: {line}" for line in failed_rows(results)]
    parts += [f"unavailable: {line}" for line in unavailable_rows(results)]
    parts += [f"note: {n}" for n in results.get("notes", [])]
    return "\n".join(parts)


def render_markdown(results: dict) -> str:
    parts = ["# fused_poolformer benchmark", ""] + [f"- {line}" for line in _preamble(results)]
    parts.append(f"- command: `{results['command']}`")
    if results.get("ops"):
        parts += ["", "## Fused vs eager vs torch.compile", "",
                  "Same inputs; checked against the float64 reference before timing. Loop: eager loop "
                  "(host + device); graph: CUDA-graph replay (device only).", "",
                  markdown_table(SUMMARY_COLUMNS, summary_rows(results["ops"]))]
    if results.get("host"):
        parts += ["", "## Host overhead", "", TITLES["host"] + ".", "", markdown_table(HOST_COLUMNS, results["host"])]
    if results.get("ops"):
        parts += ["", "## Op level", "", TITLES["ops"] + ".", "", markdown_table(OP_COLUMNS, results["ops"])]
    if results.get("models"):
        method = next((r.get("peak_mem_method") for r in results["models"] if r.get("peak_mem_method")), "not measured")
        parts += ["", "## Model level", "", "MACs at 1x3x224x224; latency and training step (AdamW) at the batch "
                  "shown, the variants alternating call by call (medians); peak memory of a training step: "
                  f"{method}; saved MB: the storages the saved-tensor hooks see in the training forward "
                  "(parameters included); mixer fwd / f+b: every converted block's token-mixer branch on its own "
                  "input.", "",
                  markdown_table(MODEL_COLUMNS, results["models"])]
    if failed_rows(results):
        parts += ["", "## Rows that failed", ""] + [f"- {line}" for line in failed_rows(results)]
    if unavailable_rows(results):
        parts += ["", "## Variants unavailable", ""] + [f"- {line}" for line in unavailable_rows(results)]
    if results.get("notes"):
        parts += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(parts) + "\n"


def write_text(path: str, text: str) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # a run killed mid-write leaves the previous version


class Recorder:
    """The results of one run: prints each row as it is measured and keeps the JSON and
    Markdown files (when asked for) up to date."""

    def __init__(self, results: dict, json_path: Optional[str] = None, markdown_path: Optional[str] = None,
                 stream=None):
        self.results = results
        self.json_path, self.markdown_path = json_path, markdown_path
        self.stream = stream or sys.stdout
        self._widths: Dict[str, List[int]] = {}
        for section in COLUMNS:
            results.setdefault(section, [])

    def _line(self, section: str, cells: List[str]) -> str:
        widths = self._widths[section]
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths))

    def emit(self, section: str, row: dict) -> None:
        self.results[section].append(row)
        columns = COLUMNS[section]
        cells = [_cell(get, row) for _, get in columns]
        if section not in self._widths:
            header = [c[0] for c in columns]
            self._widths[section] = [max(len(h), 12) for h in header]
            print(f"\n{TITLES[section]}", file=self.stream)
            print(self._line(section, header), file=self.stream)
        print(self._line(section, cells), file=self.stream, flush=True)
        self.save()

    def save(self) -> None:
        if self.json_path:
            write_text(self.json_path, json.dumps(self.results, indent=1) + "\n")
        if self.markdown_path:
            write_text(self.markdown_path, render_markdown(self.results))


def write_plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["ops"]
    cases = list(dict.fromkeys((tuple(r["shape"]), r["dtype"], r["layout"], r["pass"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    value = {(tuple(r["shape"]), r["dtype"], r["layout"], r["pass"], r["impl"]): r for r in rows}
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(cases) + 3), 8), sharex=True)
    width = 0.8 / max(len(impls), 1)
    for ax, key, title in ((axes[0], "speedup_vs_eager", "speedup over eager (x)"),
                           (axes[1], "frac_floor", "fraction of the byte floor reached")):
        for i, impl in enumerate(impls):
            if key == "speedup_vs_eager" and impl == "eager":
                continue  # 1 by definition: the gray line
            ys = [value[c + (impl,)][key] or 0 if c + (impl,) in value else 0 for c in cases]
            ax.bar([j + i * width for j in range(len(cases))], ys, width, label=impl, color=f"C{i}")
        ax.set_ylabel(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set_yscale("log")  # speedups span slower-than-eager to two orders faster
    for ax in axes:
        ax.legend(ncol=len(impls), fontsize=8)
    labels = [f"{s[1]}x{s[2]}x{s[3]} n{s[0]}\n{d} {'CL' if l == 'channels_last' else 'NCHW'} {p}"
              for s, d, l, p in cases]
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], labels, fontsize=7, rotation=45, ha="right")
    fig.suptitle(f"fused_poolformer pool mixer -- {results['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)

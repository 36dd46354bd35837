"""benchmarks/gpu_check.sh without a GPU.

The dry run (full and --core) walks every step in the check's order -- build, smoke,
sanitizer, the eager / fused / compile op timings then Triton, the model rows, the GPU
tests last -- with the GPU-only steps reported as skipped, writes one archive, and runs
where fvcore is absent; a mismatch and a step killed outright (GPU_CHECK_INJECT) still leave
their rows and a complete summary.  Also: the schedule in the script's header against the
limits the script uses, its arguments, the pytest plugin of its test step (value order,
per-test limit, SIGINT still writing the summary and the junit XML), and the Triton pins.

The two dry runs start together (module fixture) so that the file stays near a minute
and a half on two CPU cores.
"""

import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
# The foreground steps, in the order the check runs them (background jobs interleave).
ORDER = ["env", "build", "smoke-cuda", "smoke-triton", "memcheck", "racecheck", "ops-core", "ops-block",
         "ops-triton", "models-core", "models-cl", "notes", "tests"]
NOT_IN_CORE = {"smoke-triton", "ops-triton", "models-cl", "tests"}
BACKGROUND = {"warm-ops", "warm-triton", "warm-models"}
MODEL_IMPLS = {"original", "mixer", "block", "original+compile", "mixer+compile", "block+compile"}


def _no_fvcore(tmp_path_factory) -> str:
    """A directory that, first on PYTHONPATH, makes `import fvcore` fail."""
    root = tmp_path_factory.mktemp("no_fvcore")
    (root / "fvcore").mkdir()
    (root / "fvcore" / "__init__.py").write_text("raise ImportError('fvcore hidden by tests/test_gpu_check.py')\n")
    return str(root)


class DryRun:
    """One dry run: its exit status, output, results folder, summary rows and archive."""

    def __init__(self, out, process):
        self.out, self.process = out, process

    def finish(self, timeout: float):
        self.stdout, _ = self.process.communicate(timeout=timeout)
        self.returncode = self.process.returncode
        folders = [d for d in os.listdir(self.out) if os.path.isdir(os.path.join(self.out, d))]
        assert len(folders) == 1, (folders, self.stdout[-3000:])
        self.results = os.path.join(self.out, folders[0])
        self.archive = os.path.join(self.out, folders[0] + ".tar.gz")
        with open(os.path.join(self.results, "summary.txt")) as f:
            self.summary = [line.split(None, 2)[:2] for line in f.read().splitlines() if line.strip()]
        return self

    def status(self, step: str) -> str:
        return dict(self.summary)[step]

    def load(self, name: str) -> dict:
        with open(os.path.join(self.results, name)) as f:
            return json.load(f)

    def explain(self) -> str:
        return self.stdout[-4000:]


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """The full dry run with a mismatch injected into ops-core's fused rows and the
    contiguous model worker killed after its first row, and a --core dry run; fvcore
    hidden from both."""
    env = dict(os.environ, PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([_no_fvcore(tmp_path_factory), ROOT]))
    for name in ("GPU_CHECK_INJECT", "OUT", "TRITON_INTERPRET"):  # helpers.py sets the last one for this process
        env.pop(name, None)
    runs = {}
    for name, args, inject in (("full", [], "mismatch,kill=models-core"), ("core", ["--core"], "")):
        out = tmp_path_factory.mktemp(f"dry_{name}")
        process = subprocess.Popen(["bash", SCRIPT, "--dry-run", *args, "--out", str(out)], cwd=ROOT,
                                   env=dict(env, GPU_CHECK_INJECT=inject), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        runs[name] = DryRun(out, process)
    return {name: run.finish(timeout=600) for name, run in runs.items()}


def _foreground(summary):
    return [step for step, _ in summary if step not in BACKGROUND]


@pytest.mark.parametrize("which", ["full", "core"])
def test_dry_run_walks_every_step_in_order(dry_runs, which):
    run = dry_runs[which]
    assert _foreground(run.summary) == ORDER, run.explain()
    assert run.status("build") == "SKIPPED" and run.status("ops-block") == "SLOT"
    assert run.status("memcheck") == run.status("racecheck") == "SKIPPED"  # no compute-sanitizer here
    for step in ("env", "smoke-cuda", "notes"):
        assert run.status(step) == "OK", (step, run.explain())
    for step in NOT_IN_CORE:
        assert (run.status(step) == "SKIPPED") if which == "core" else run.status(step) != "NO-TIME"
    # The background jobs are reaped before the steps they serve.
    steps = [step for step, _ in run.summary]
    assert steps.index("warm-ops") < steps.index("ops-block") and steps.index("warm-models") < steps.index("models-core")
    # Everything in one archive, the summary and the log included.
    with tarfile.open(run.archive) as tar:
        names = {os.path.relpath(n, os.path.basename(run.results)) for n in tar.getnames()}
    assert {"summary.txt", "gpu_check.log", "env.txt", "smoke.txt", "ops-core.json", "models-contiguous.json",
            "GPU_NOTES.md"} <= names, names
    assert "=== summary" in run.stdout


def test_dry_run_core_passes_without_fvcore(dry_runs):
    run = dry_runs["core"]
    assert run.returncode == 0, run.explain()
    with open(os.path.join(run.results, "env.txt")) as f:
        assert "fvcore: not installed" in f.read()
    models = run.load("models-contiguous.json")["models"]
    assert {r["impl"] for r in models} == MODEL_IMPLS
    for r in models:
        assert r["macs_counter"] == "torch.utils.flop_counter" and r["layout"] == "contiguous"
        if r["status"] == "ok":
            assert r["train_step_ms"] > 0 and r["infer_ms"] > 0 and r["saved_bytes"] > 0
            assert r["train_step_speedup_vs_original"] > 0 and r["saved_vs_original_compile"] > 0
        else:  # a form the installed convert_model cannot build
            assert r["status"] == "unavailable" and r["impl"].startswith("block") and r["error"]
    ops = run.load("ops-core.json")
    assert {r["impl"] for r in ops["ops"]} == {"eager", "fused-cpu", "compile"}
    assert all(r["status"] == "ok" for r in ops["ops"]) and ops["host"]
    notes = open(os.path.join(run.results, "GPU_NOTES.md")).read()
    assert f"Copy bandwidth {ops['copy_bandwidth_gbs']:.1f} GB/s" in notes  # this run's, not a recorded one


def test_a_mismatch_is_a_row_and_the_run_goes_on(dry_runs):
    run = dry_runs["full"]
    assert run.returncode == 1, run.explain()  # what failed is in the exit status
    assert run.status("ops-core") == "FAIL(1)"
    rows = run.load("ops-core.json")["ops"]
    fused = [r for r in rows if r["impl"] == "fused-cpu"]
    assert len(fused) == 4 and all(r["status"] == "mismatch" and "fused-cpu" in r["error"] for r in fused)
    assert all(r["median_ms"] > 0 for r in fused)  # still timed
    assert all(r["status"] == "ok" and r["checked"] for r in rows if r["impl"] != "fused-cpu")
    with open(os.path.join(run.results, "ops-core.md")) as f:
        assert "## Rows that failed" in f.read()
    # Every later step ran.
    assert run.status("models-cl") == "OK" and run.status("notes") == "OK"


def test_a_killed_step_keeps_its_rows_and_the_summary(dry_runs):
    run = dry_runs["full"]
    assert run.status("models-core") == "KILLED", run.explain()
    kept = run.load("models-contiguous.json")["models"]
    assert len(kept) == 1 and kept[0]["train_step_ms"] > 0  # the row written before the kill
    line = next(l for l in open(os.path.join(run.results, "summary.txt")) if l.startswith("models-core"))
    assert "1 timed model rows" in line
    others = run.load("models-channels_last.json")["models"]  # the dry run compiles in the first layout only
    assert {r["impl"] for r in others} == {"original", "mixer", "block"}
    assert all(r["layout"] == "channels_last" and r["status"] in ("ok", "unavailable") for r in others)


# ---------------------------------------------------------------------------------------
# The script itself.

def _header_schedule():
    """step -> (starts, limit) from the header's table (starts: one number, or core/full)."""
    with open(SCRIPT) as f:
        header = f.read().split("\nset -u", 1)[0]
    table = header.split("step            start  limit  yields", 1)[1]
    rows = {}
    for line in table.splitlines():
        m = re.match(r"#\s+(\[bg\] )?([a-z][\w<>-]*)\s+([\d/-]+)\s+([\d-]+)\s", line)
        if m:
            rows[m.group(2)] = (m.group(3), m.group(4))
    return header, rows


def test_header_states_the_schedule():
    header, rows = _header_schedule()
    foreground = [step for step in rows if step not in BACKGROUND and not step.startswith("worker")
                  and step not in ("memcheck", "racecheck", "sanitizer", "archive")]
    assert [s for s in ORDER if s not in ("memcheck", "racecheck")] == foreground
    with open(SCRIPT) as f:
        body = f.read().split("\nset -u", 1)[1]
    # Every limit the header states is the one the script uses.
    for step, max_s in re.findall(r"run_step ([a-z-]+) (\d+) ", body):
        assert rows[step][1] == max_s, (step, rows[step], max_s)
    for step, max_s in re.findall(r"models_step (models-[a-z]+) [a-z_]+ (\d+)", body):
        assert rows[step][1] == max_s, (step, rows[step], max_s)
    # The budgets: core within 4 minutes, the full run within 7, build included.
    core_budget, full_budget = map(int, re.search(r"BUDGET=\$\(\((\d+) \* SCALE\)\) \|\| BUDGET=\$\(\((\d+) \* SCALE",
                                                  body).groups())
    assert core_budget <= 240 and full_budget <= 420
    assert f"--core ~{core_budget} s" in header and f"full ~{full_budget} s" in header
    assert re.search(r"build.*\n.*\d+ s of CPU", header)  # the measured build time


def test_arguments_are_checked():
    run = lambda *args: subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    shown = run("--help")
    assert shown.returncode == 0 and "--dry-run" in shown.stdout and "models-core" in shown.stdout
    for args in (["--frobnicate"], ["--budget", "soon"], ["--limit", "ops-core"]):
        refused = run(*args)
        assert refused.returncode == 2 and args[0] in refused.stderr


# ---------------------------------------------------------------------------------------
# The test step's pytest plugin.

def test_plugin_value_order_and_slot():
    sys.path.insert(0, ROOT)
    try:
        from benchmarks import gpu_tests_plugin as plugin
    finally:
        sys.path.remove(ROOT)

    class Item:
        def __init__(self, nodeid, backend=None):
            self.nodeid = nodeid
            self.callspec = type("CallSpec", (), {"params": {"backend": backend}})()

    labels = [plugin.value_group(Item(n, b))[2] for n, b in (
        ("tests/test_cuda_streaming.py::test_x", None), ("tests/test_cuda_graphs.py::test_capture", None),
        ("tests/test_correctness.py::test_y[cuda]", "cuda"), ("tests/test_correctness.py::test_y[triton]", "triton"),
        ("tests/test_unknown.py::test_z", None))]
    assert labels == ["streaming and edge cases", "converted model CUDA-graph capture", "correctness, CUDA backend",
                      "correctness, Triton backend", plugin.REST]


def test_plugin_limit_and_sigint_keep_the_summary(tmp_path):
    """A test past --test-limit fails; SIGINT (the step's limit) still prints the summary and
    writes the junit XML and the results JSON lines."""
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import time
        def test_quick():
            pass
        def test_past_the_limit():
            time.sleep(30)
        def test_hangs():
            time.sleep(60)
    """))
    (tmp_path / "conftest.py").write_text("")
    xml, jsonl = tmp_path / "tests.xml", tmp_path / "tests.jsonl"
    env = dict(os.environ, PYTHONPATH=ROOT)
    args = [sys.executable, "-m", "pytest", "-p", "benchmarks.gpu_tests_plugin", "--test-limit", "1",
            "--results-jsonl", str(jsonl), f"--junitxml={xml}", "-v", "-p", "no:cacheprovider",
            "-k", "quick or past_the_limit", str(tmp_path)]
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "1 failed, 1 passed" in done.stdout and "TimeLimitExceeded" in done.stdout, done.stdout[-3000:]
    # No per-test limit and a hanging test: stopped by SIGINT, as the check's step does.
    args[args.index("--test-limit") + 1] = "1000"
    args[args.index("-k") + 1] = "quick or hangs"
    stopped = subprocess.run(["timeout", "-s", "INT", "6"] + args, cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
    assert "KeyboardInterrupt" in stopped.stdout and re.search(r"=+ .*1 passed.* =+", stopped.stdout), \
        stopped.stdout[-3000:]
    assert "testcase" in xml.read_text()
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert records[-1]["session"] == "finished" and any(r.get("outcome") == "passed" for r in records)


# ---------------------------------------------------------------------------------------
# Triton pins (no autotuning in the window).

def test_pins_cover_every_stage_case():
    pytest.importorskip("triton")
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-m", "fused_poolformer.triton.pinned", "--check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "every pinned case covered" in done.stdout, done.stdout + done.stderr[-2000:]


def test_pinned_launch_skips_the_autotuner():
    pytest.importorskip("triton")
    import torch

    from fused_poolformer.triton import pinned

    class Fn:
        __name__ = "_apply_kernel"

        def __init__(self):
            self.launches = []

        def run(self, *args, **kwargs):
            self.launches.append(kwargs)

    class Tuner:
        arg_names = ["x_ptr", "G", "RADIUS_H", "RADIUS_W", "CHANNELS_LAST", "CG_V", "VEC_C", "H", "W"]

        def __init__(self):
            self.fn, self.best_config, self.tuned = Fn(), None, 0

        def run(self, *args, **kwargs):
            self.tuned += 1

    x = torch.empty(1, dtype=torch.float32)
    key = ("_apply_kernel", "nchw", "float32", 64, 56, 56)
    tuner = pinned.honour_pins(Tuner(), table={key: ({"TILE_P": 16}, 8)})
    tuner.run(x, 1, 1, 1, 0, 16, 4, 56, 56, grid=(1,), warmup=False)  # a stage shape: pinned
    assert tuner.tuned == 0 and tuner.fn.launches[0]["TILE_P"] == 16 and tuner.fn.launches[0]["num_warps"] == 8
    assert tuner.best_config.kwargs == {"TILE_P": 16}
    tuner.run(x, 2, 1, 1, 0, 16, 4, 56, 56, grid=(1,), warmup=False)  # two groups: no pin, autotuned
    tuner.run(x, 1, 2, 2, 0, 16, 4, 56, 56, grid=(1,), warmup=False)  # pool 5: no pin
    assert tuner.tuned == 2 and len(tuner.fn.launches) == 1

"""The benchmark runs end to end in a tiny configuration, writes every documented field,
and refuses to time an implementation whose output is wrong."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fused_poolformer
from fused_poolformer import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device", "cpu", "--quick", "--stages", "none", "--shape", "2,8,6,6", "--min-run-time", "0.01", "--no-progress"]
OP_FIELDS = {"shape", "dtype", "layout", "pass", "impl", "median_ms", "floor_ms", "bytes", "flops",
             "q25_ms", "q75_ms", "frac_floor", "speedup_vs_eager", "speedup_vs_compile", "checked"}
MODEL_FIELDS = {"model", "impl", "params_m", "macs_g", "infer_ms", "train_step_ms", "peak_mem_mb", "macs_counter"}

requires_cpu_kernels = pytest.mark.skipif(not fused_poolformer.HAS_CPU_KERNELS, reason="CPU extension not built")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`python -m fused_poolformer.bench` as a user runs it: ops without compile, the S12
    model's parameters and MACs (no latency, to stay quick)."""
    out = tmp_path_factory.mktemp("bench")
    paths = {k: str(out / f"bench.{ext}") for k, ext in (("json", "json"), ("markdown", "md"), ("plot", "png"))}
    cmd = [sys.executable, "-m", "fused_poolformer.bench", *TINY, "--no-compile", "--models", "s12",
           "--latency-models", "none", "--json", paths["json"], "--markdown", paths["markdown"], "--plot", paths["plot"]]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(paths["json"]) as f:
        return json.load(f), paths, done.stdout


@requires_cpu_kernels
def test_json_has_every_field(quick_run):
    results, _, _ = quick_run
    assert {"device", "copy_bandwidth_gbs", "ops", "models", "notes"} <= set(results)
    assert results["copy_bandwidth_gbs"] > 0
    rows = results["ops"]
    assert {(r["pass"], r["impl"]) for r in rows} == {(p, i) for p in ("fwd", "fwd+bwd") for i in ("eager", "fused-cpu")}
    for r in rows:
        assert OP_FIELDS <= set(r), OP_FIELDS - set(r)
        assert r["shape"] == [2, 8, 6, 6] and r["dtype"] == "fp32" and r["layout"] == "contiguous"
        assert r["checked"] is True and 0 <= r["check_error_ratio"] <= 1
        assert r["q25_ms"] <= r["median_ms"] <= r["q75_ms"]
        assert r["frac_floor"] == pytest.approx(r["floor_ms"] / r["median_ms"])
        assert r["speedup_vs_compile"] is None  # --no-compile
    fused = {r["pass"]: r for r in rows if r["impl"] == "fused-cpu"}
    assert fused["fwd"]["bytes"] == 3 * 2 * 8 * 6 * 6 * 4
    assert fused["fwd+bwd"]["bytes"] == 8 * 2 * 8 * 6 * 6 * 4


@requires_cpu_kernels
def test_model_rows_reproduce_the_paper(quick_run):
    results, _, _ = quick_run
    rows = {r["impl"]: r for r in results["models"]}
    assert "original" in rows
    for r in rows.values():
        assert MODEL_FIELDS <= set(r), MODEL_FIELDS - set(r)
        assert r["model"] == "poolformer_s12"
        assert abs(r["macs_g"] - 1.8) / 1.8 < 0.02 and abs(r["params_m"] - 11.9) < 0.1
        assert r["infer_ms"] is None  # --latency-models none
    if "converted" in rows:
        assert rows["converted"]["macs_g"] == rows["original"]["macs_g"]
    else:
        assert any("convert" in n for n in results["notes"])


@requires_cpu_kernels
def test_reports_are_written(quick_run):
    results, paths, stdout = quick_run
    with open(paths["markdown"]) as f:
        markdown = f.read()
    assert "## Op level" in markdown and "## Model level" in markdown and "fused-cpu" in markdown
    with open(paths["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "fused-cpu" in stdout and "poolformer_s12" in stdout


@requires_cpu_kernels
def test_compile_rows_and_speedups(tmp_path):
    path = str(tmp_path / "compile.json")
    assert bench.main(TINY + ["--passes", "fwd", "--ops-only", "--json", path]) == 0
    with open(path) as f:
        rows = {r["impl"]: r for r in json.load(f)["ops"]}
    assert set(rows) == {"eager", "compile", "fused-cpu"}
    assert rows["compile"]["bytes"] is None and rows["compile"]["checked"]
    for r in rows.values():
        assert r["speedup_vs_compile"] == pytest.approx(rows["compile"]["median_ms"] / r["median_ms"])
        assert r["speedup_vs_eager"] == pytest.approx(rows["eager"]["median_ms"] / r["median_ms"])


def _wrong(call):
    def wrong(x, p):
        return call(x, p) * 1.001
    return wrong


@requires_cpu_kernels
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_wrong_output_is_refused(monkeypatch, tmp_path, pass_):
    right = bench.impl_function
    monkeypatch.setattr(bench, "impl_function",
                        lambda impl: _wrong(right(impl)) if impl == "fused-cpu" else right(impl))
    with pytest.raises(bench.ReferenceMismatch, match="fused-cpu: output"):
        bench.main(TINY + ["--no-compile", "--passes", pass_, "--ops-only"])


def test_gradient_is_checked():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64) + 0.5
    dy = torch.randn_like(x)
    params = bench._params(4, torch.float64, "cpu", True, seed=0)
    expected = bench._reference_outputs(x, dy, params, "fwd+bwd")
    step = bench._step(bench.impl_function("eager"), params, "fwd+bwd")
    x.requires_grad_(True)
    assert bench.check_outputs("eager", step, x, dy, expected, torch.float64) <= 1
    doubled = lambda x, dy: (lambda y, dx: (y, 2 * dx))(*step(x, dy))
    with pytest.raises(bench.ReferenceMismatch, match="input gradient"):
        bench.check_outputs("eager", doubled, x, dy, expected, torch.float64)


def test_model_timing_fields():
    cfg = bench.make_config(bench.build_parser().parse_args(["--device", "cpu", "--quick"]))
    model = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.GroupNorm(1, 4), nn.Flatten(), nn.LazyLinear(1000))
    model(torch.randn(1, 3, 224, 224))  # materialize the lazy layer
    timing = bench._time_model(model, cfg, bench._PeakMemory("cpu"))
    assert timing["infer_ms"] > 0 and timing["train_step_ms"] > 0
    assert timing["images_per_s"] == pytest.approx(cfg.model_batch / (timing["infer_ms"] * 1e-3))
    assert timing["peak_mem_mb"] is None or timing["peak_mem_mb"] >= 0


def test_bad_arguments_are_named():
    for argv, word in ((["--shape", "1,2,3"], "--shape"), (["--stages", "7"], "--stages"),
                       (["--dtypes", "int8"], "--dtypes"), (["--models", "s99"], "--models")):
        with pytest.raises(SystemExit) as info:
            bench.make_config(bench.build_parser().parse_args(["--device", "cpu"] + argv))
        assert word in str(info.value) or info.value.code == 2

"""The benchmark harness: a quick CPU run end to end writes every documented field; the
host-overhead table; the cost model against hand-derived numbers; the timers; a wrong or
raising implementation becomes a row that says so; the fused implementations come from the
backend registry; the model rows (forms, alternating timing, saved-activation bytes,
ratios, unavailable forms); the GPU notes.  benchmarks/gpu_check.sh: tests/test_gpu_check.py."""

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fused_poolformer
from fused_poolformer import bench
from fused_poolformer.bench import costs, inputs, model_level, notes, op_level, timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device", "cpu", "--quick", "--stages", "none", "--shape", "2,8,6,6", "--min-run-time", "0.01",
        "--no-progress", "--threads", "1"]
OP_FIELDS = {"shape", "dtype", "layout", "pass", "impl", "median_ms", "q25_ms", "q75_ms", "graph_ms", "graph_note",
             "kernel_ms", "kernel_launches", "kernel_method", "floor_ms", "frac_floor", "frac_floor_graph",
             "bytes", "flops", "speedup_vs_eager", "speedup_vs_compile", "device_speedup_vs_compile", "checked",
             "status", "error"}
HOST_FIELDS = {"impl", "pass", "shape", "median_us", "q25_us", "q75_us", "vs_group_norm", "operator_calls",
               "top_level_calls", "operator_calls_by_name"}
MODEL_FIELDS = {"model", "impl", "form", "params_m", "macs_g", "infer_ms", "train_step_ms", "peak_mem_mb", "macs_counter",
                "saved_bytes", "status", "train_step_speedup_vs_original", "train_step_speedup_vs_original_compile",
                "saved_vs_original", "saved_vs_original_compile"}
BLOCK_FORM = "fuse" in inspect.signature(fused_poolformer.convert_model).parameters

requires_cpu_kernels = pytest.mark.skipif(not fused_poolformer.HAS_CPU_KERNELS, reason="CPU extension not built")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """A quick CPU run as a user starts it: host table, ops without compile, the S12
    model's parameters and MACs (no latency, to stay quick)."""
    out = tmp_path_factory.mktemp("bench")
    paths = {k: str(out / f"bench.{ext}") for k, ext in (("json", "json"), ("markdown", "md"), ("plot", "png"))}
    argv = TINY + ["--no-compile", "--models", "s12", "--latency-models", "none", "--json", paths["json"],
                   "--markdown", paths["markdown"], "--plot", paths["plot"]]
    done = subprocess.run([sys.executable, "-m", "fused_poolformer.bench", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stderr[-3000:]
    with open(paths["json"]) as f:
        return json.load(f), paths, done.stdout


@requires_cpu_kernels
def test_json_has_every_field(quick_run):
    results, _, _ = quick_run
    assert {"device", "copy_bandwidth_gbs", "host", "ops", "models", "notes", "git"} <= set(results)
    assert results["copy_bandwidth_gbs"] > 0
    rows = results["ops"]
    assert {(r["pass"], r["impl"]) for r in rows} == {(p, i) for p in costs.PASSES for i in ("eager", "fused-cpu")}
    for r in rows:
        assert OP_FIELDS <= set(r), OP_FIELDS - set(r)
        assert r["shape"] == [2, 8, 6, 6] and r["dtype"] == "fp32" and r["layout"] == "contiguous"
        assert r["checked"] is True and 0 <= r["check_error_ratio"] <= 1
        assert r["q25_ms"] <= r["median_ms"] <= r["q75_ms"]
        assert r["frac_floor"] == pytest.approx(r["floor_ms"] / r["median_ms"])
        assert r["graph_ms"] is None and r["graph_note"].startswith("n/a")  # no CUDA here
        assert r["kernel_ms"] > 0 and r["kernel_launches"] >= 1
        assert r["speedup_vs_compile"] is None  # --no-compile
    fused = {r["pass"]: r for r in rows if r["impl"] == "fused-cpu"}
    assert fused["fwd"]["bytes"] == 3 * 2 * 8 * 6 * 6 * 4
    assert fused["fwd+bwd"]["bytes"] == 8 * 2 * 8 * 6 * 6 * 4


@requires_cpu_kernels
def test_host_overhead_table(quick_run):
    results, _, stdout = quick_run
    rows = {(r["impl"], r["pass"]): r for r in results["host"]}
    assert set(rows) == {(i, p) for i in ("F.group_norm", "fused-cpu", "unfused graph") for p in ("fwd", "fwd+bwd")}
    for r in rows.values():
        assert HOST_FIELDS <= set(r), HOST_FIELDS - set(r)
        assert r["shape"] == [2, 8, 4, 4] and r["median_us"] > 0
        assert r["vs_group_norm"] == pytest.approx(r["median_us"] / rows[("F.group_norm", r["pass"])]["median_us"])
        assert r["top_level_calls"] <= r["operator_calls"] == sum(r["operator_calls_by_name"].values())
    fused = rows[("fused-cpu", "fwd+bwd")]["operator_calls_by_name"]
    assert fused.get("fused_poolformer::pool_mixer_forward", 0) >= 1  # >1 where autograd redispatches
    assert fused.get("fused_poolformer::pool_mixer_backward", 0) >= 1
    # The grad_y is given: no loss op (sum, ones_like) is counted.
    assert "aten::sum" not in rows[("F.group_norm", "fwd+bwd")]["operator_calls_by_name"]
    # Cheapest first: the host table is printed before any op row.
    assert 0 <= stdout.index("host overhead") < stdout.index("op level")


@requires_cpu_kernels
def test_model_rows_reproduce_the_paper(quick_run):
    results, _, _ = quick_run
    rows = {r["impl"]: r for r in results["models"]}
    assert set(rows) == {"original", "mixer", "block"}  # --no-compile; s12 is not in --latency-models
    for r in rows.values():
        assert MODEL_FIELDS <= set(r), MODEL_FIELDS - set(r)
        assert r["model"] == "poolformer_s12" and r["infer_ms"] is None
    for impl in ("original", "mixer") + (("block",) if BLOCK_FORM else ()):
        r = rows[impl]
        assert r["status"] == "ok" and abs(r["macs_g"] - 1.8) / 1.8 < 0.02 and abs(r["params_m"] - 11.9) < 0.1
        assert r["macs_g"] == rows["original"]["macs_g"]
    assert rows["mixer"]["blocks_converted"] == 12
    if not BLOCK_FORM:  # the installed convert_model has no fuse=: the row says so
        assert rows["block"]["status"] == "unavailable" and "fuse" in rows["block"]["error"]


@requires_cpu_kernels
def test_reports_are_written(quick_run):
    results, paths, stdout = quick_run
    with open(paths["markdown"]) as f:
        markdown = f.read()
    for section in ("## Fused vs eager vs torch.compile", "## Host overhead", "## Op level", "## Model level"):
        assert section in markdown
    with open(paths["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "fused-cpu" in stdout and "poolformer_s12" in stdout


@requires_cpu_kernels
def test_compile_rows_and_speedups(tmp_path):
    path = str(tmp_path / "compile.json")
    assert bench.main(TINY + ["--passes", "fwd", "--parts", "ops", "--json", path]) == 0
    with open(path) as f:
        rows = {r["impl"]: r for r in json.load(f)["ops"]}
    assert list(rows) == ["eager", "fused-cpu", "compile"]  # compile last: it compiles first
    assert rows["compile"]["bytes"] is None and rows["compile"]["checked"] and rows["compile"]["compile_s"] > 0
    for r in rows.values():
        assert r["speedup_vs_compile"] == pytest.approx(rows["compile"]["median_ms"] / r["median_ms"])
        assert r["speedup_vs_eager"] == pytest.approx(rows["eager"]["median_ms"] / r["median_ms"])


@requires_cpu_kernels
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_wrong_output_is_a_mismatch_row(monkeypatch, tmp_path, pass_):
    """A fused implementation that misses the reference is still timed, its row says
    "mismatch" with the error, the other rows are measured, and the exit status is 1."""
    right = op_level.Implementations.function

    def wrong_fused(self, impl):
        fn = right(self, impl)
        return (lambda *a, **k: fn(*a, **k) * 1.001) if impl == "fused-cpu" else fn
    monkeypatch.setattr(op_level.Implementations, "function", wrong_fused)
    path = str(tmp_path / "ops.json")
    assert bench.main(TINY + ["--no-compile", "--passes", pass_, "--parts", "ops", "--json", path]) == 1
    with open(path) as f:
        rows = {r["impl"]: r for r in json.load(f)["ops"]}
    assert rows["fused-cpu"]["status"] == "mismatch" and rows["fused-cpu"]["checked"] is False
    assert "fused-cpu: output" in rows["fused-cpu"]["error"] and rows["fused-cpu"]["median_ms"] > 0
    assert rows["eager"]["status"] == "ok" and rows["eager"]["checked"]


@requires_cpu_kernels
def test_raising_implementation_is_an_error_row(monkeypatch, tmp_path):
    right = op_level.Implementations.function

    def raising(self, impl):
        if impl != "fused-cpu":
            return right(self, impl)

        def fn(*args, **kwargs):
            raise RuntimeError("kernel exploded")
        return fn
    monkeypatch.setattr(op_level.Implementations, "function", raising)
    path = str(tmp_path / "ops.json")
    assert bench.main(TINY + ["--no-compile", "--passes", "fwd", "--parts", "ops", "--json", path]) == 1
    with open(path) as f:
        rows = json.load(f)["ops"]
    assert [(r["impl"], r["status"]) for r in rows] == [("eager", "ok"), ("fused-cpu", "error")]
    assert rows[1]["error"] == "RuntimeError: kernel exploded" and rows[1]["median_ms"] is None


def test_fused_implementations_come_from_the_backend_registry():
    """A backend registered in fused_poolformer.backends is benchmarked as fused-<name>, with
    no change in the benchmark."""
    from fused_poolformer import backends

    assert set(op_level.fused_impls()) == {f"fused-{b.name}" for b in backends.all_backends() if b.fused}
    assert "fused-reference" not in op_level.known_impls()  # the unfused graph is the eager baseline
    reference = backends.get("reference")
    backends.register_backend(backends.Backend(
        name="testdevice", devices=("cpu",), summary="test", unavailable_reason=lambda device: None,
        load_operators=reference.load_operators, checks_in_python=True))
    try:
        assert "fused-testdevice" in op_level.known_impls()
        assert "fused-testdevice" in op_level.default_fused_impls("cpu")
        assert op_level.fused_impls()["fused-testdevice"] == "testdevice"
        cfg = bench.make_config(bench.build_parser().parse_args(["--device", "cpu", "--impls", "eager,fused-testdevice"]))
        assert cfg.impls == ["eager", "fused-testdevice"]
    finally:
        backends.unregister_backend("testdevice")
    assert "fused-testdevice" not in op_level.known_impls()
    if fused_poolformer.backends.triton_available():  # interpreted on the CPU: not timed by default
        assert "fused-triton" not in op_level.default_fused_impls("cpu")


def test_gradient_is_checked():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64) + 0.5
    dy = torch.randn_like(x)
    params = inputs.mixer_params(2, 4, torch.float64, "cpu", requires_grad=True)
    expected = inputs.reference_outputs(x, params, dy, wanted=("y", "x", "weight"))
    step = op_level.case_step(inputs.mixer(fused_poolformer.reference.pool_mixer), params, "fwd+bwd")
    x.requires_grad_(True)
    assert max(inputs.compare("eager", step(x, dy), expected, torch.float64).values()) <= 1
    doubled = dict(step(x, dy))
    doubled["x"] = 2 * doubled["x"]
    with pytest.raises(bench.ReferenceMismatch, match="eager: input gradient"):
        inputs.compare("eager", doubled, expected, torch.float64)
    doubled = dict(step(x, dy), weight=2 * step(x, dy)["weight"])
    with pytest.raises(bench.ReferenceMismatch, match="weight gradient"):
        inputs.compare("eager", doubled, expected, torch.float64)


# ---------------------------------------------------------------------------------------
# The cost model (docs/performance.md), against numbers derived by hand.

SHAPE = (2, 8, 6, 6)
E = 2 * 8 * 6 * 6


@pytest.mark.parametrize("element_size", [4, 2])
def test_byte_model_is_design_section_5(element_size):
    assert costs.fused_bytes(SHAPE, element_size, "fwd") == 3 * E * element_size
    assert costs.fused_bytes(SHAPE, element_size, "fwd+bwd") == (3 + 5) * E * element_size
    assert costs.eager_bytes(SHAPE, element_size, "fwd") == 13 * E * element_size
    assert costs.eager_bytes(SHAPE, element_size, "fwd+bwd") == (13 + 20) * E * element_size


def test_op_costs_per_implementation():
    fused = costs.op_costs(SHAPE, 4, "fused-cpu", "fwd")
    assert fused == costs.op_costs(SHAPE, 4, "fused-triton", "fwd")
    eager = costs.op_costs(SHAPE, 4, "eager", "fwd+bwd")
    assert eager == (costs.eager_bytes(SHAPE, 4, "fwd+bwd"), costs.elementwise_flops(SHAPE, "eager", "fwd+bwd"))
    compiled_bytes, compiled_flops = costs.op_costs(SHAPE, 4, "compile", "fwd")
    assert compiled_bytes is None  # inductor's traffic is not modelled
    assert compiled_flops == costs.elementwise_flops(SHAPE, "eager", "fwd")


def test_flop_model_fused_does_less_arithmetic():
    # Per element at k = 3: fused forward 3 + 5 + 1 + 3, backward 6 + 1 + 4 + 5 + 7;
    # eager forward 5 + 9 + 3, backward 3 + 1 + 10 + 1 + 8 + 1.
    assert costs.elementwise_flops(SHAPE, "fused", "fwd") == 12 * E
    assert costs.elementwise_flops(SHAPE, "fused", "fwd+bwd") == (12 + 23) * E
    assert costs.elementwise_flops(SHAPE, "eager", "fwd") == 17 * E
    assert costs.elementwise_flops(SHAPE, "eager", "fwd+bwd") == (17 + 24) * E
    # The dense pool grows with k*k, the separable one with 2k.
    grow = lambda form: costs.elementwise_flops(SHAPE, form, "fwd", 7) - costs.elementwise_flops(SHAPE, form, "fwd", 3)
    assert grow("fused") == 8 * E and grow("eager") == 40 * E


def test_bad_pass_and_form_are_named():
    with pytest.raises(ValueError, match="pass"):
        costs.fused_bytes(SHAPE, 4, "bwd")
    with pytest.raises(ValueError, match="form"):
        costs.elementwise_flops(SHAPE, "compiled")


def test_floor_and_prediction_at_the_h200_bandwidth():
    # 64x64x56x56 fp32: E = 12,845,056; forward 3*E*4 = 154,140,672 bytes; at 4142.5 GB/s
    # that is 37.21 us; the vectorized target is 37.21 / 0.8 + 2 launches x 2 us = 50.51 us
    # (the CUDA forward makes 2 launches: statistics, then the output).
    shape, bandwidth = (64, 64, 56, 56), 4142.5
    assert costs.VECTORIZED_CUDA.launches == {"fwd": 2, "bwd": 3}
    assert costs.fused_bytes(shape, 4, "fwd") == 154_140_672
    assert costs.floor_ms(154_140_672, bandwidth) == pytest.approx(0.0372098, rel=1e-5)
    assert costs.predicted_ms(shape, 4, "fwd", bandwidth) == pytest.approx(0.0372098 / 0.8 + 0.004, rel=1e-5)
    # Backward: 5*E*4 bytes at 70 % plus 3 launches.
    backward = 5 * 12_845_056 * 4 / 4142.5e9 * 1e3 / 0.7 + 0.006
    both = costs.predicted_ms(shape, 4, "fwd+bwd", bandwidth)
    assert both == pytest.approx(0.0372098 / 0.8 + 0.004 + backward, rel=1e-5)


# ---------------------------------------------------------------------------------------
# Timers.


def test_timers_on_the_cpu():
    a, b = torch.randn(64), torch.randn(64)
    summary = timing.loop_time(lambda: torch.add(a, b), "cpu", 0.01)
    assert 0 < summary["min_ms"] <= summary["q25_ms"] <= summary["median_ms"] <= summary["q75_ms"] <= summary["max_ms"]
    assert summary["reps"] >= 5
    graph, why = timing.graph_time(lambda: torch.add(a, b), 2, "cpu", 0.01)
    assert graph is None and why.startswith("n/a")
    profile = timing.profiler_time(lambda: torch.mul(torch.add(a, b), b), 3, "cpu")
    assert profile["launches"] == 2 and profile["kernel_ms"] > 0
    calls = timing.operator_calls(lambda: torch.mul(torch.add(a, b), 2))  # 2 becomes a tensor: nested calls
    assert calls["by_name"]["aten::add"] == 1 and calls["by_name"]["aten::mul"] == 1
    assert calls["top_level"] == 2 < calls["total"] == sum(calls["by_name"].values())


def test_interleaved_times_alternate():
    order = []
    steps = {"original": lambda: order.append("original"), "converted": lambda: order.append("converted")}
    times = timing.interleaved_times(steps, 3, "cpu")
    assert order == ["original", "converted"] * 3
    assert {k: len(v) for k, v in times.items()} == {"original": 3, "converted": 3}


# ---------------------------------------------------------------------------------------
# Model level.


def _tiny_config(*extra):
    return bench.make_config(bench.build_parser().parse_args(
        ["--device", "cpu", "--quick", "--model-image-size", "16", "--model-reps", "2", *extra]))


def test_model_bench_times_a_group_alternating():
    cfg = _tiny_config()
    model = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.GroupNorm(1, 4), nn.Flatten(), nn.Linear(64, 1000))
    variants = {"original": model, "mixer": nn.Sequential(*[m for m in model])}  # the same weights
    timings = model_level.ModelBench(cfg, variants, [], "contiguous").run()
    for impl, timing_ in timings.items():
        assert timing_["infer_ms"] > 0 and timing_["train_step_ms"] > 0 and timing_["first_calls_s"] > 0
        assert timing_["images_per_s"] == pytest.approx(cfg.model_batch / (timing_["infer_ms"] * 1e-3))
        assert timing_["peak_mem_mb"] is None or timing_["peak_mem_mb"] >= 0
        assert timing_["mixer_fwd_ms"] is None  # no converted blocks
        # The parameters are saved for the backward (conv and linear weights) with the input.
        params = sum(p.numel() * 4 for p in model.parameters() if p.dim() > 1)
        assert timing_["saved_bytes"] >= params + 2 * 3 * 16 * 16 * 4 and timing_["saved_storages"] >= 3
    assert timings["mixer"]["max_rel_output_diff"] == 0 and timings["mixer"]["output_matches"]
    assert timings["mixer"]["saved_bytes"] == timings["original"]["saved_bytes"]


def test_saved_activation_bytes_count_each_storage_once():
    weight = nn.Parameter(torch.randn(256, 256))
    x = torch.randn(2, 256, requires_grad=True)  # so that the products save the weight (for x's gradient)
    labels = torch.tensor([1, 2])
    once = lambda t: t @ weight  # noqa: E731
    twice = lambda t: (t @ weight) @ weight  # the same weight saved by both products
    amp = model_level._autocast("cpu", torch.float32)
    saved_once, _ = model_level.saved_activation_bytes(once, x, labels, amp)
    saved_twice, _ = model_level.saved_activation_bytes(twice, x, labels, amp)
    assert saved_once >= weight.numel() * 4 + x.numel() * 4
    # One more saved activation (2x256 floats), not a second copy of the 256 KiB weight.
    assert saved_twice - saved_once < weight.numel() * 4 // 2


def test_a_variant_that_raises_is_an_error_row():
    cfg = _tiny_config()
    good = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.Flatten(), nn.Linear(64, 1000))

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("no kernel for this")
    bench_ = model_level.ModelBench(cfg, {"original": good, "mixer": Broken()}, [], "contiguous")
    timings = bench_.run()
    assert set(timings) == {"original"} and bench_.failed == {"mixer": "RuntimeError: no kernel for this"}


@requires_cpu_kernels
def test_bf16_autocast_model_step():
    """The converted timm model runs under CPU bf16 autocast (the GPU check's setting)."""
    pytest.importorskip("timm")
    cfg = _tiny_config("--model-dtype", "bf16")
    forms = model_level.ModelForms("poolformer_s12", cfg, fused_poolformer.convert_model)
    impls = ["mixer", "block"] if BLOCK_FORM else ["mixer"]
    bench_ = model_level.ModelBench(cfg, forms.variants(impls, "channels_last"), [], "channels_last")
    warmed = bench_.warm()
    assert not bench_.failed and set(warmed) == set(impls) and min(warmed.values()) > 0


@requires_cpu_kernels
def test_block_form_is_unavailable_without_fuse_argument():
    """An installed convert_model without fuse= (before block fusion) gives "unavailable"
    block rows, and the mixer form is its plain conversion."""
    pytest.importorskip("timm")

    def old_convert_model(model, backend="auto", inplace=False):
        kwargs = {"fuse": "mixer"} if BLOCK_FORM else {}
        return fused_poolformer.convert_model(model, backend=backend, inplace=inplace, **kwargs)
    converters = model_level.form_converters(old_convert_model)
    assert converters["block"][0] is None and "fuse=" in converters["block"][1]
    cfg = _tiny_config("--latency-models", "none", "--model-impls", "original,mixer,block")
    rows = []
    run = model_level.ModelRun("poolformer_s12", cfg, old_convert_model)
    run.emit_macs_rows(lambda section, row: rows.append(row))
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["original"]["status"] == by_impl["mixer"]["status"] == "ok"
    assert by_impl["mixer"]["blocks_converted"] == 12
    assert by_impl["block"]["status"] == "unavailable" and "fuse=" in by_impl["block"]["error"]
    assert by_impl["block"]["macs_g"] is None and by_impl["block"]["train_step_ms"] is None


def test_model_speedups_against_both_baselines():
    rows = [dict(impl=i, layout="contiguous", infer_ms=ms, train_step_ms=2 * ms, saved_bytes=saved)
            for i, ms, saved in (("original", 4.0, 100), ("mixer", 2.0, 80), ("block", 1.0, 50),
                                 ("original+compile", 3.0, 90), ("mixer+compile", 1.5, 75))]
    rows.append(dict(impl="block+compile", layout="contiguous", infer_ms=None, train_step_ms=None, saved_bytes=None))
    model_level._speedups(rows, "contiguous")
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["mixer"]["train_step_speedup_vs_original"] == 2.0
    assert by_impl["mixer"]["train_step_speedup_vs_original_compile"] == 1.5
    assert by_impl["mixer+compile"]["infer_speedup_vs_original_compile"] == 2.0
    assert by_impl["block"]["saved_vs_original"] == 0.5 and by_impl["block"]["saved_vs_original_compile"] == 50 / 90
    assert by_impl["original"]["train_step_speedup_vs_original"] == 1.0
    assert "train_step_speedup_vs_original" not in by_impl["block+compile"]  # not timed: no ratios
    assert [g for g in model_level.MODEL_GROUPS] == [("original", "mixer", "block"),
                                                     ("original+compile", "mixer+compile", "block+compile")]


@requires_cpu_kernels
def test_warm_compile_ops(capsys):
    assert bench.main(TINY + ["--warm-compile", "--parts", "ops", "--compile-backend", "aot_eager"]) == 0
    assert "compiled 2 baselines" in capsys.readouterr().out  # one shape, contiguous (quick CPU), two passes


def test_bad_arguments_are_named():
    for argv, word in ((["--shape", "1,2,3"], "--shape"), (["--stages", "7"], "--stages"),
                       (["--dtypes", "int8"], "--dtypes"), (["--models", "s99"], "--models"),
                       (["--model-impls", "converted"], "--model-impls"), (["--parts", "kernels"], "--parts"),
                       (["--impls", "fused-nowhere"], "--impls")):
        with pytest.raises(SystemExit) as info:
            bench.make_config(bench.build_parser().parse_args(["--device", "cpu"] + argv))
        assert word in str(info.value) or info.value.code == 2


# ---------------------------------------------------------------------------------------
# GPU notes and the GPU check.


def _recorded_run(path, graph_ms=None, bandwidth=4000.0, device="NVIDIA H200", **extra):
    row = dict(impl="fused-cuda", shape=[64, 512, 7, 7], dtype="bf16", layout="channels_last", median_ms=0.2, **extra)
    rows = [dict(row, **{"pass": p}, graph_ms=graph_ms) for p in costs.PASSES]
    with open(path, "w") as f:
        json.dump({"device": device, "copy_bandwidth_gbs": bandwidth, "ops": rows}, f)
    return str(path)


def test_gpu_notes_regenerate_between_markers(tmp_path):
    old = _recorded_run(tmp_path / "old.json")
    new = _recorded_run(tmp_path / "new.json", graph_ms=0.004)
    path = str(tmp_path / "GPU_NOTES.md")
    notes.write_notes(path, [f"old kernels={old}", f"new kernels={new}"])
    with open(path) as f:
        text = f.read()
    # 64x512x7x7 bf16 forward: 3 * 1,605,632 * 2 bytes = 9.63 MB; at 4000 GB/s 2.4 us.
    line = next(l for l in text.splitlines() if l.startswith("| 64x512x7x7 | bf16 | fwd |"))
    assert "| 9.6 | 2.4 |" in line and "CL 200.0 (1%, loop)" in line and "CL 4.0 (60%, graph)" in line
    assert line.count("NCHW -") == 2  # not measured in that layout
    assert f"{costs.predicted_ms((64, 512, 7, 7), 2, 'fwd', 4000.0) * 1e3:.1f}" in line
    assert text.count("| 64x") == 4 * 2 * 2  # shapes x dtypes x passes
    with open(path, "w") as f:
        f.write("# GPU notes\n\nHand-written findings.\n\n" + text[text.index(notes.BEGIN):] + "\nMore findings.\n")
    notes.write_notes(path, [f"old kernels={old}"])
    with open(path) as f:
        updated = f.read()
    assert "Hand-written findings." in updated and "More findings." in updated and "new kernels" not in updated


def test_gpu_notes_use_the_newest_runs_bandwidth(tmp_path):
    """The floor column comes from the last run given (this run, on its own GPU), each
    run's % of the floor from its own bandwidth; a row that raised says ERROR."""
    old = _recorded_run(tmp_path / "old.json", bandwidth=4800.0)  # an H200
    new = _recorded_run(tmp_path / "new.json", graph_ms=0.004, bandwidth=3000.0, device="NVIDIA H100")
    broken = _recorded_run(tmp_path / "broken.json", bandwidth=3000.0, device="NVIDIA H100", status="error")
    path = str(tmp_path / "GPU_NOTES.md")
    text = notes.write_notes(path, [f"h200={old}", f"h100={new}", f"broken={broken}"])
    assert "Copy bandwidth 3000.0 GB/s (read + write), from the run 'broken' (NVIDIA H100)" in text
    assert "2 + 3 launches" in text  # the CUDA forward makes 2, the backward 3
    line = next(l for l in text.splitlines() if l.startswith("| 64x512x7x7 | bf16 | fwd |"))
    floor_3000 = 3 * 64 * 512 * 7 * 7 * 2 / 3000e9 * 1e3
    assert f"| {floor_3000 * 1e3:.1f} |" in line  # the floor column at the newest bandwidth
    floor_4800 = floor_3000 * 3000 / 4800
    assert f"CL 200.0 ({100 * floor_4800 / 0.2:.0f}%, loop)" in line  # the H200 run at its own bandwidth
    assert f"CL 4.0 ({100 * floor_3000 / 0.004:.0f}%, graph)" in line and "CL ERROR" in line


@requires_cpu_kernels
def test_host_table_times_the_fused_implementations_asked_for():
    from fused_poolformer.bench import host_overhead

    assert list(host_overhead.host_impls("cpu", ["fused-cpu"])) == ["F.group_norm", "fused-cpu", "unfused graph"]
    assert list(host_overhead.host_impls("cpu")) == ["F.group_norm"] + op_level.default_fused_impls("cpu") + [
        "unfused graph"]
